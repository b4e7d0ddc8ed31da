//! Liveness, progress and failure propagation of one communicator's ranks.
//!
//! In one process every rank shares one [`Health`]; over TCP each process has its own, kept in step
//! by control frames ([`Ctl`]): a rank that finds a peer lost (or a collective mismatched) breaks its
//! communicator *and tells every peer at once* ([`Health::break_for`]), as NCCL's abort and ULFM's
//! revoke do, so every survivor fails naming the rank that died, whatever it was waiting for. A
//! clean close is announced with a goodbye carrying the last collective the rank entered, so a
//! survivor knows that a departed rank will never join a later collective. On a timeout the
//! engine asks every peer how far it got ([`Health::probe`]) to name the ranks that have not
//! entered the collective.

use super::msg::{Aligned, Msg, Payload, Tag};
use crate::{Error, Result};
use crossbeam::channel::Sender;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a timed-out rank waits for its peers' progress reports (TCP).
const PROBE_WAIT: Duration = Duration::from_millis(300);

/// A mismatch between two ranks' calls, found by the signature every collective message carries.
#[derive(Debug, Clone)]
pub(crate) struct Mismatch {
    pub rank: usize,
    pub mine: String,
    pub other_rank: usize,
    pub theirs: String,
}

/// This process's rank, and a sender to each peer's writer (TCP).
type Links = (usize, Vec<(usize, Sender<Msg>)>);

/// Liveness of the ranks of one communicator.
#[derive(Debug)]
pub(crate) struct Health {
    /// `gone[r]`: rank r will send nothing more (set after its last message was queued).
    pub gone: Vec<AtomicBool>,
    /// usize::MAX while healthy; otherwise the rank whose loss broke the communicator (for a
    /// mismatch: the rank that found it, and `mismatch` says what).
    pub broken: AtomicUsize,
    mismatch: Mutex<Option<Mismatch>>,
    /// Per rank: sequence number of the last collective it entered (0: none yet). In one process
    /// every rank writes its own; over TCP the remote entries come from goodbyes and progress reports.
    pub entered: Vec<AtomicU64>,
    /// Per rank: sequence number of the last collective it finished.
    pub completed: Vec<AtomicU64>,
    /// Over TCP: rank r closed cleanly (its goodbye arrived), so `entered[r]` is final.
    pub bye: Vec<AtomicBool>,
    /// Over TCP: rank r answered the latest probe.
    pub reported: Vec<AtomicBool>,
    /// A collective of this communicator timed out (its messages may be left over, and a drop
    /// need not wait for the peers).
    pub timed_out: AtomicBool,
    /// Over TCP: this process's rank and a sender to every peer's writer, for control frames;
    /// `None` in one process (the ranks share this struct) and once the communicator is dropped.
    links: Mutex<Option<Links>>,
}

/// A control frame between TCP ranks (never sent in one process).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ctl {
    /// The sender found rank `0` lost: break the communicator for it.
    Lost(usize),
    /// The sender found a mismatch: break the communicator with it.
    Mismatch {
        rank: usize,
        other_rank: usize,
        mine: String,
        theirs: String,
    },
    /// The sender closes cleanly after entering collective `entered` and finishing `completed`.
    Bye { entered: u64, completed: u64 },
    /// How far are you? (answered by the reader thread, whatever the engine is doing)
    Probe,
    /// The answer to a probe.
    Status { entered: u64, completed: u64 },
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

impl Ctl {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        match self {
            Ctl::Lost(r) => {
                v.push(1);
                v.extend_from_slice(&(*r as u64).to_le_bytes());
            }
            Ctl::Mismatch {
                rank,
                other_rank,
                mine,
                theirs,
            } => {
                v.push(2);
                v.extend_from_slice(&(*rank as u64).to_le_bytes());
                v.extend_from_slice(&(*other_rank as u64).to_le_bytes());
                v.extend_from_slice(&(mine.len() as u64).to_le_bytes());
                v.extend_from_slice(mine.as_bytes());
                v.extend_from_slice(theirs.as_bytes());
            }
            Ctl::Bye { entered, completed } | Ctl::Status { entered, completed } => {
                v.push(if matches!(self, Ctl::Bye { .. }) {
                    3
                } else {
                    5
                });
                v.extend_from_slice(&entered.to_le_bytes());
                v.extend_from_slice(&completed.to_le_bytes());
            }
            Ctl::Probe => v.push(4),
        }
        v
    }

    pub fn decode(b: &[u8]) -> std::result::Result<Ctl, String> {
        let bad = || format!("malformed control frame of {} bytes", b.len());
        let rank = |at| {
            u64_at(b, at)
                .and_then(|r| usize::try_from(r).ok())
                .ok_or_else(bad)
        };
        match b.first() {
            Some(1) => Ok(Ctl::Lost(rank(1)?)),
            Some(2) => {
                let (r, o) = (rank(1)?, rank(9)?);
                let ml = rank(17)?;
                let mine = b.get(25..25usize.saturating_add(ml)).ok_or_else(bad)?;
                let theirs = &b[25 + ml..];
                Ok(Ctl::Mismatch {
                    rank: r,
                    other_rank: o,
                    mine: String::from_utf8_lossy(mine).into_owned(),
                    theirs: String::from_utf8_lossy(theirs).into_owned(),
                })
            }
            Some(k @ (3 | 5)) => {
                let entered = u64_at(b, 1).ok_or_else(bad)?;
                let completed = u64_at(b, 9).ok_or_else(bad)?;
                Ok(if *k == 3 {
                    Ctl::Bye { entered, completed }
                } else {
                    Ctl::Status { entered, completed }
                })
            }
            Some(4) => Ok(Ctl::Probe),
            _ => Err(bad()),
        }
    }

    pub fn msg(&self, src: usize) -> Msg {
        Msg {
            src,
            tag: Tag::Ctl,
            payload: Payload::Bytes(Aligned::copy_of(&self.encode())),
            arrive: 0.0,
            sig: super::msg::Sig::NONE,
        }
    }
}

fn atomics<T>(n: usize, f: impl Fn() -> T) -> Vec<T> {
    (0..n).map(|_| f()).collect()
}

impl Health {
    pub fn new(n: usize) -> Arc<Health> {
        Arc::new(Health {
            gone: atomics(n, || AtomicBool::new(false)),
            broken: AtomicUsize::new(usize::MAX),
            mismatch: Mutex::new(None),
            entered: atomics(n, || AtomicU64::new(0)),
            completed: atomics(n, || AtomicU64::new(0)),
            bye: atomics(n, || AtomicBool::new(false)),
            reported: atomics(n, || AtomicBool::new(false)),
            timed_out: AtomicBool::new(false),
            links: Mutex::new(None),
        })
    }

    /// Over TCP: `me`'s senders to its peers' writers, for control frames.
    pub fn set_links(&self, me: usize, links: Vec<(usize, Sender<Msg>)>) {
        *self.links.lock().unwrap_or_else(|e| e.into_inner()) = Some((me, links));
    }

    /// Drop the senders to the writers (so they can finish); no control frame is sent after this.
    pub fn clear_links(&self) {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Send `c` to `to` (every peer if `None`); nothing in one process.
    pub fn send_ctl(&self, to: Option<usize>, c: &Ctl) {
        let g = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((me, links)) = g.as_ref() {
            for (j, tx) in links {
                if to.map_or(true, |t| t == *j) {
                    let _ = tx.send(c.msg(*me));
                }
            }
        }
    }

    /// Break the communicator for the loss of `rank` (the first break wins) and tell every peer.
    pub fn break_for(&self, rank: usize) {
        if self.set_broken(rank, None) {
            self.send_ctl(None, &Ctl::Lost(rank));
        }
    }

    /// Break the communicator for a mismatch (the first break wins) and tell every peer.
    pub fn break_mismatch(&self, m: Mismatch) {
        let ctl = Ctl::Mismatch {
            rank: m.rank,
            other_rank: m.other_rank,
            mine: m.mine.clone(),
            theirs: m.theirs.clone(),
        };
        if self.set_broken(m.rank, Some(m)) {
            self.send_ctl(None, &ctl);
        }
    }

    /// Set the break (without telling anyone); true if this was the first.
    fn set_broken(&self, rank: usize, m: Option<Mismatch>) -> bool {
        let mut g = self.mismatch.lock().unwrap_or_else(|e| e.into_inner());
        let first = self
            .broken
            .compare_exchange(usize::MAX, rank, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            *g = m;
        }
        first
    }

    /// Break for the loss of `rank` (unless already broken) and return the communicator's error,
    /// which names the *first* break, so every rank reports the same cause.
    pub fn fail(&self, rank: usize, during: &'static str) -> Error {
        self.break_for(rank);
        match self.broken.load(Ordering::Acquire) {
            usize::MAX => Error::PeerLost { rank, during },
            first => self.broken_error(first, during),
        }
    }

    /// The control frame that tells a peer why this communicator broke (`None` while healthy): a
    /// closing rank sends it before its goodbye, so a peer that hears of the close first still
    /// learns the cause rather than blaming the closing rank.
    pub fn broken_ctl(&self) -> Option<Ctl> {
        let rank = self.broken.load(Ordering::Acquire);
        if rank == usize::MAX {
            return None;
        }
        Some(
            match &*self.mismatch.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(m) => Ctl::Mismatch {
                    rank: m.rank,
                    other_rank: m.other_rank,
                    mine: m.mine.clone(),
                    theirs: m.theirs.clone(),
                },
                None => Ctl::Lost(rank),
            },
        )
    }

    /// Healthy, or the error every collective now returns.
    pub fn check(&self, during: &'static str) -> Result<()> {
        match self.broken.load(Ordering::Acquire) {
            usize::MAX => Ok(()),
            rank => Err(self.broken_error(rank, during)),
        }
    }

    fn broken_error(&self, rank: usize, during: &'static str) -> Error {
        match &*self.mismatch.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(m) => Error::CollectiveMismatch {
                rank: m.rank,
                mine: m.mine.clone(),
                other_rank: m.other_rank,
                theirs: m.theirs.clone(),
            },
            None => Error::PeerLost { rank, during },
        }
    }

    /// A rank other than `me` that left before entering collective `seq` (so it never will).
    pub fn left_before(&self, me: usize, seq: u64) -> Option<usize> {
        (0..self.gone.len()).find(|&r| {
            r != me
                && self.gone[r].load(Ordering::Acquire)
                && self.entered[r].load(Ordering::Acquire) < seq
        })
    }

    /// Handle a control frame from TCP rank `from` (on its reader thread).
    pub fn on_ctl(&self, from: usize, c: Ctl) {
        match c {
            Ctl::Lost(r) if r < self.gone.len() => {
                // no relay: the sender told every rank itself (full mesh)
                self.set_broken(r, None);
            }
            Ctl::Lost(_) => {}
            Ctl::Mismatch {
                rank,
                other_rank,
                mine,
                theirs,
            } => {
                self.set_broken(
                    rank,
                    Some(Mismatch {
                        rank,
                        mine,
                        other_rank,
                        theirs,
                    }),
                );
            }
            Ctl::Bye { entered, completed } => {
                if let Some(e) = self.entered.get(from) {
                    e.store(entered, Ordering::Release);
                    self.completed[from].store(completed, Ordering::Release);
                    self.bye[from].store(true, Ordering::Release);
                }
            }
            Ctl::Probe => {
                let me = self
                    .links
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|(me, _)| *me);
                if let Some(me) = me {
                    let s = Ctl::Status {
                        entered: self.entered[me].load(Ordering::Acquire),
                        completed: self.completed[me].load(Ordering::Acquire),
                    };
                    self.send_ctl(Some(from), &s);
                }
            }
            Ctl::Status { entered, completed } => {
                if let Some(e) = self.entered.get(from) {
                    e.store(entered, Ordering::Release);
                    self.completed[from].store(completed, Ordering::Release);
                    self.reported[from].store(true, Ordering::Release);
                }
            }
        }
    }

    /// Over TCP: ask every peer how far it got and wait (up to [`PROBE_WAIT`]) for the answers;
    /// returns which ranks' progress is known. In one process every rank's progress is known.
    pub fn probe(&self, me: usize) -> Vec<bool> {
        let n = self.gone.len();
        let over_tcp = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !over_tcp {
            return vec![true; n];
        }
        for r in &self.reported {
            r.store(false, Ordering::Release);
        }
        self.send_ctl(None, &Ctl::Probe);
        let until = Instant::now() + PROBE_WAIT;
        let known = |r: usize| {
            r == me
                || self.reported[r].load(Ordering::Acquire)
                || self.bye[r].load(Ordering::Acquire)
        };
        while Instant::now() < until && !(0..n).all(known) {
            std::thread::sleep(Duration::from_millis(2));
        }
        (0..n).map(known).collect()
    }

    /// The timeout of collective `seq` on rank `me`, naming every rank that has not entered it and
    /// the last collective each finished (see [`Error::Hang`]).
    pub fn hang(
        &self,
        me: usize,
        seq: u64,
        during: &'static str,
        after: Duration,
        waiting_for: Option<usize>,
    ) -> Error {
        self.timed_out.store(true, Ordering::Release);
        let known = self.probe(me);
        let n = self.gone.len();
        let not_entered = (0..n)
            .filter(|&r| known[r] && r != me && self.entered[r].load(Ordering::Acquire) < seq)
            .collect();
        let last_completed = (0..n)
            .map(|r| known[r].then(|| self.completed[r].load(Ordering::Acquire)))
            .collect();
        Error::Hang {
            during,
            after,
            waiting_for,
            seq,
            not_entered,
            last_completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_round_trip() {
        for c in [
            Ctl::Lost(7),
            Ctl::Mismatch {
                rank: 1,
                other_rank: 3,
                mine: "all_reduce(f32 x 4, Sum)".into(),
                theirs: "all_reduce(i32 x 4, Sum)".into(),
            },
            Ctl::Bye {
                entered: 9,
                completed: 8,
            },
            Ctl::Probe,
            Ctl::Status {
                entered: 5,
                completed: 5,
            },
        ] {
            assert_eq!(Ctl::decode(&c.encode()).unwrap(), c);
        }
        assert!(Ctl::decode(&[2, 1]).is_err());
        assert!(Ctl::decode(&[]).is_err());
    }
}
