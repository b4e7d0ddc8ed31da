//! Coded aggregation over a [`Communicator`]: each round finishes as soon as any `n − s` coded
//! gradients arrived.
//!
//! Protocol of round `t` (every rank calls [`CodedAllReduce::round`] once per round, in the same order):
//! - the aggregator `a(t)` ([`Aggregator::Fixed`] or [`Aggregator::Rotate`]) posts one non-blocking
//!   receive per live worker with tag [`coded_tag`]`(t)`, polls them, and stops at the first set of
//!   `≥ n − s` arrivals that decodes; it decodes the exact sum and sends it (plus the responder mask)
//!   to every other rank with tag [`result_tag`]`(t)`;
//! - every other rank sends its coded gradient to `a(t)` and receives the result of round `t`.
//!
//! A receive posted for `(worker, round t)` matches only round `t`'s message: a straggler's late message
//! completes that old receive (kept in a stale list and polled in later rounds, never dropped while
//! pending — dropping a pending [`Work`] would block) and is discarded, never mixed into another round.
//! Tags live in `[TAG_BASE, TAG_BASE + 2·TAG_WINDOW)`, reused every `TAG_WINDOW` rounds; reuse is safe
//! because both the in-process engine and MPI match a message to the *oldest* posted receive of the same
//! `(source, tag)`, and a stale receive stays posted until its message arrives.
//!
//! A worker whose receive (or the send of a result to it) fails with [`Error::PeerLost`] is a permanent
//! straggler: no receive is posted for it again, and rounds go on while at least `n − s` workers
//! respond. This survives a rank that dies — its thread returns or panics and drops its communicator —
//! on the in-process backend, where point-to-point traffic between live ranks keeps working after a
//! loss (collectives fail with `PeerLost`), and a rank that hangs (stops sending).

use super::code::GradientCode;
use super::sends::Sends;
use crate::work::Work;
use crate::{Communicator, CommunicatorExt, Error, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First tag used by coded aggregation (below 32767, the smallest `MPI_TAG_UB` MPI allows).
pub const TAG_BASE: u32 = 0x4000;
/// Rounds before a tag is reused.
pub const TAG_WINDOW: u32 = 4096;

/// Tag of the coded gradients of round `t`.
pub fn coded_tag(round: u64) -> u32 {
    TAG_BASE + 2 * (round % u64::from(TAG_WINDOW)) as u32
}

/// Tag of the decoded result of round `t`.
pub fn result_tag(round: u64) -> u32 {
    coded_tag(round) + 1
}

/// Which rank decodes each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregator {
    /// Always this rank.
    Fixed(usize),
    /// Rank `t mod n` in round `t` (spreads the decode and fan-out cost; a slow rank slows its rounds).
    Rotate,
}

/// What one round did, as seen by this rank.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundInfo {
    /// Round number (0-based, counted per [`CodedAllReduce`]).
    pub round: u64,
    /// The rank that decoded.
    pub aggregator: usize,
    /// Workers whose coded gradients were used (sorted).
    pub responders: Vec<usize>,
    /// Late messages of earlier rounds this rank received and discarded during this call.
    pub stale_discarded: usize,
    /// Workers this rank considers lost (aggregator only; empty elsewhere).
    pub lost: Vec<usize>,
    /// Time this rank spent in the call.
    pub elapsed: Duration,
}

/// Receive-side state of one worker on this rank: at most one receive is posted per worker at a time,
/// so a late message always meets the receive of its own round (messages between a pair arrive in
/// order), and a silent worker costs one pending receive, not one per round.
#[derive(Default)]
struct Lane {
    /// A receive of an earlier round still waiting (round, handle).
    outstanding: Option<(u64, Work<Vec<f32>>)>,
    /// Rounds whose messages this worker still owes; their receives are posted one after another.
    owed: std::collections::VecDeque<(u64, usize)>,
    lost: bool,
}

/// Coded all-reduce (sum) over a communicator whose ranks are the code's workers.
pub struct CodedAllReduce {
    code: Arc<GradientCode>,
    aggregator: Aggregator,
    round: u64,
    lanes: Vec<Lane>,
    /// A receive for the result of a round, posted by [`CodedAllReduce::poll_ahead`].
    ahead: Option<(u64, Work<Vec<f32>>)>,
    discarded_total: u64,
    skipped: u64,
    /// Sends in flight (non-blocking: a blocking send of a large message waits for the receiver's
    /// matching receive under MPI, which can deadlock against the aggregator's own sends).
    sends: Sends,
}

impl CodedAllReduce {
    /// A coded all-reduce for `code` (its `n` must equal the communicator's world size).
    pub fn new(code: Arc<GradientCode>, aggregator: Aggregator) -> CodedAllReduce {
        let n = code.n();
        CodedAllReduce {
            code,
            aggregator,
            round: 0,
            lanes: (0..n).map(|_| Lane::default()).collect(),
            ahead: None,
            discarded_total: 0,
            skipped: 0,
            sends: Sends::default(),
        }
    }

    /// The code.
    pub fn code(&self) -> &GradientCode {
        &self.code
    }

    /// Rounds completed so far (the number of the next round).
    pub fn rounds(&self) -> u64 {
        self.round
    }

    /// Late messages received and discarded so far.
    pub fn discarded(&self) -> u64 {
        self.discarded_total
    }

    /// Rounds this rank skipped with [`CodedAllReduce::poll_ahead`].
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Late messages of earlier rounds not yet received (posted or owed), plus sends not yet completed.
    pub fn pending_stale(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| usize::from(l.outstanding.is_some()) + l.owed.len())
            .sum::<usize>()
            + self.sends.len()
    }

    /// Workers this rank saw fail ([`Error::PeerLost`]): permanent stragglers.
    pub fn lost(&self) -> Vec<usize> {
        (0..self.lanes.len())
            .filter(|&w| self.lanes[w].lost)
            .collect()
    }

    /// The aggregator of round `t`.
    pub fn aggregator_of(&self, round: u64) -> usize {
        match self.aggregator {
            Aggregator::Fixed(r) => r,
            Aggregator::Rotate => (round % self.code.n() as u64) as usize,
        }
    }

    fn check<C: Communicator + ?Sized>(&self, comm: &C, len: usize, out: usize) -> Result<()> {
        if comm.world_size() != self.code.n() {
            return Err(Error::InvalidArgument(format!(
                "coded all-reduce: the code has n = {} workers but the communicator has {} ranks; build the code with n = world_size",
                self.code.n(),
                comm.world_size()
            )));
        }
        if let Aggregator::Fixed(r) = self.aggregator {
            if r >= comm.world_size() {
                return Err(Error::RankOutOfRange {
                    what: "coded all-reduce aggregator",
                    rank: r,
                    world: comm.world_size(),
                });
            }
        }
        if len != out {
            return Err(Error::LengthMismatch {
                what: "coded all-reduce: output must have as many elements as the coded gradient"
                    .into(),
                expected: len,
                got: out,
            });
        }
        Ok(())
    }

    /// Poll stale receives: discard what arrived, post the next owed receive, mark failed workers lost.
    fn sweep<C: Communicator + ?Sized>(&mut self, comm: &C) -> Result<usize> {
        self.advance(comm, None, &mut Vec::new())
    }

    /// Poll stale receives: discard what arrived, post the next owed receive, mark failed workers
    /// lost. A receive owed for `current` (the round in progress) goes to `pending` instead, so a
    /// worker whose late message of an earlier round just arrived can still count in this round.
    fn advance<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        current: Option<u64>,
        pending: &mut Vec<(usize, Work<Vec<f32>>)>,
    ) -> Result<usize> {
        self.sends.reap()?;
        let mut discarded = 0;
        for (w, lane) in self.lanes.iter_mut().enumerate() {
            loop {
                if let Some((round, work)) = &mut lane.outstanding {
                    if !work.is_done() {
                        break;
                    }
                    let round = *round;
                    match lane.outstanding.take().map(|(_, work)| work.wait()) {
                        Some(Ok(_)) => {
                            discarded += 1;
                            tracing::debug!(worker = w, round, "discarded a late coded gradient");
                        }
                        Some(Err(Error::PeerLost { .. })) => {
                            lane.lost = true;
                            lane.owed.clear();
                        }
                        Some(Err(e)) => return Err(e),
                        None => {}
                    }
                }
                match lane.owed.pop_front() {
                    Some((r, len)) if !lane.lost => {
                        let work = comm.irecv(vec![0f32; len], w, coded_tag(r))?;
                        if Some(r) == current {
                            pending.push((w, work));
                            break;
                        }
                        lane.outstanding = Some((r, work));
                    }
                    _ => break,
                }
            }
        }
        self.discarded_total += discarded as u64;
        Ok(discarded)
    }

    /// For a straggling rank (not the aggregator): if the current round already finished without this
    /// rank, take its result into `out`, tell the aggregator the round is skipped (a placeholder message
    /// that meets its stale receive), advance, and return the round's info — the caller then skips
    /// computing this round's gradient. Returns `None` (never blocks) when the round is still open, or
    /// on the aggregator. `len` is the gradient length of the round.
    pub fn poll_ahead<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        out: &mut [f32],
    ) -> Result<Option<RoundInfo>> {
        let t0 = Instant::now();
        self.check(comm, out.len(), out.len())?;
        let (n, d, t) = (comm.world_size(), out.len(), self.round);
        let agg = self.aggregator_of(t);
        if comm.rank() == agg {
            return Ok(None);
        }
        if self.ahead.as_ref().map(|a| a.0) != Some(t) {
            let w = comm.irecv(vec![0f32; d + n], agg, result_tag(t))?;
            self.ahead = Some((t, w));
        }
        let ready = match &mut self.ahead {
            Some((_, w)) => w.wait_timeout(Duration::from_micros(100)),
            None => false,
        };
        if !ready {
            return Ok(None);
        }
        let Some((_, work)) = self.ahead.take() else {
            return Ok(None);
        };
        let result = work.wait()?;
        self.sends.send(comm, vec![0f32; d], agg, coded_tag(t))?;
        self.round += 1;
        self.skipped += 1;
        out.copy_from_slice(&result[..d]);
        Ok(Some(RoundInfo {
            round: t,
            aggregator: agg,
            responders: (0..n).filter(|&i| result[d + i] != 0.0).collect(),
            stale_discarded: 0,
            lost: Vec::new(),
            elapsed: t0.elapsed(),
        }))
    }

    /// One round: contribute `coded` (this rank's row-`rank` combination of its partition gradients,
    /// see [`GradientCode::encode`]) and receive in `out` the exact sum of all partition gradients.
    pub fn round<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        coded: &[f32],
        out: &mut [f32],
    ) -> Result<RoundInfo> {
        let t0 = Instant::now();
        self.check(comm, coded.len(), out.len())?;
        let (n, rank, d) = (comm.world_size(), comm.rank(), coded.len());
        let t = self.round;
        self.round += 1;
        let agg = self.aggregator_of(t);
        let stale_discarded = self.sweep(comm)?;
        if rank != agg {
            self.sends.send(comm, coded.to_vec(), agg, coded_tag(t))?;
            let result = match self.ahead.take() {
                Some((r, w)) if r == t => w.wait()?,
                other => {
                    if let Some((r, w)) = other {
                        // A result receive of another round cannot exist (rounds advance in order).
                        let _ = w.wait();
                        return Err(Error::InvalidArgument(format!(
                            "coded all-reduce: internal: result receive of round {r} left over in round {t}"
                        )));
                    }
                    let mut buf = vec![0f32; d + n];
                    comm.recv(&mut buf[..], agg, result_tag(t))?;
                    buf
                }
            };
            if result.len() != d + n {
                return Err(Error::LengthMismatch {
                    what:
                        "coded all-reduce: the gradient length changed between poll_ahead and round"
                            .into(),
                    expected: result.len() - n,
                    got: d,
                });
            }
            out.copy_from_slice(&result[..d]);
            return Ok(RoundInfo {
                round: t,
                aggregator: agg,
                responders: (0..n).filter(|&i| result[d + i] != 0.0).collect(),
                stale_discarded,
                lost: Vec::new(),
                elapsed: t0.elapsed(),
            });
        }

        // Aggregator: one receive per worker that owes nothing older; take arrivals until a decodable
        // set of >= n - s.
        let mut pending: Vec<(usize, Work<Vec<f32>>)> = Vec::with_capacity(n);
        for (w, lane) in self.lanes.iter_mut().enumerate() {
            if w == rank || lane.lost {
                continue;
            }
            if lane.outstanding.is_some() || !lane.owed.is_empty() {
                lane.owed.push_back((t, d)); // still behind: its message of round t comes later
            } else {
                pending.push((w, comm.irecv(vec![0f32; d], w, coded_tag(t))?));
            }
        }
        let mut got: Vec<(usize, Vec<f32>)> = vec![(rank, coded.to_vec())];
        let need = self.code.min_responders();
        let deadline = crate::config::deadline_from(t0, comm.config().timeout);
        let mut decoded: Option<Vec<f32>> = None;
        let mut last_lost = None;
        let mut failure = None;
        let mut check_now = true;
        let mut late_discarded = 0;
        loop {
            let before = pending.len();
            late_discarded += self.advance(comm, Some(t), &mut pending)?;
            check_now |= pending.len() != before;
            let mut i = 0;
            while i < pending.len() {
                if pending[i].1.is_done() {
                    let (w, work) = pending.swap_remove(i);
                    check_now = true;
                    match work.wait() {
                        Ok(v) => got.push((w, v)),
                        Err(Error::PeerLost { .. }) => {
                            self.lanes[w].lost = true;
                            last_lost = Some(w);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                } else {
                    i += 1;
                }
            }
            if failure.is_some() {
                break;
            }
            if check_now && got.len() >= need {
                let ids: Vec<usize> = got.iter().map(|g| g.0).collect();
                if self.code.is_decodable(&ids) {
                    let views: Vec<&[f32]> = got.iter().map(|g| g.1.as_slice()).collect();
                    match self.code.decode(&ids, &views) {
                        Ok(v) => decoded = Some(v),
                        Err(e) => failure = Some(e),
                    }
                    break;
                }
            }
            let owed_now = self
                .lanes
                .iter()
                .any(|l| !l.lost && l.owed.iter().any(|&(r, _)| r == t));
            if pending.is_empty() && !owed_now {
                break;
            }
            if Instant::now() >= deadline {
                failure = Some(Error::Timeout {
                    during: "coded all-reduce (waiting for n - s coded gradients)",
                    after: comm.config().timeout,
                    waiting_for: None,
                });
                break;
            }
            if !check_now {
                std::thread::sleep(Duration::from_micros(50));
            }
            check_now = false;
        }
        // Receives still open become stale: kept (never dropped while pending), polled later.
        for (w, work) in pending {
            self.lanes[w].outstanding = Some((t, work));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let Some(sum) = decoded else {
            let alive = self.lanes.iter().filter(|l| !l.lost).count();
            return Err(Error::PeerLost {
                rank: last_lost.unwrap_or(rank),
                during: if alive < need {
                    "coded all-reduce: fewer than n - s workers are alive, so the code cannot recover the sum"
                } else {
                    "coded all-reduce: the workers that responded do not form a decodable set"
                },
            });
        };
        let mut result = vec![0f32; d + n];
        result[..d].copy_from_slice(&sum);
        let mut responders: Vec<usize> = got.iter().map(|g| g.0).collect();
        responders.sort_unstable();
        for &w in &responders {
            result[d + w] = 1.0;
        }
        for w in 0..n {
            if w == rank || self.lanes[w].lost {
                continue;
            }
            match self.sends.send(comm, result.clone(), w, result_tag(t)) {
                Ok(()) => {}
                Err(Error::PeerLost { .. }) => {
                    // The worker died: a permanent straggler from now on.
                    self.lanes[w].lost = true;
                    self.lanes[w].owed.clear();
                }
                Err(e) => return Err(e),
            }
        }
        out.copy_from_slice(&sum);
        Ok(RoundInfo {
            round: t,
            aggregator: agg,
            responders,
            stale_discarded: stale_discarded + late_discarded,
            lost: self.lost(),
            elapsed: t0.elapsed(),
        })
    }

    /// Wait (up to `limit`) for the stragglers' late messages of earlier rounds and discard them, so
    /// that nothing is left posted; returns how many are still missing afterwards (the posted ones
    /// are then drained, each bounded by the communicator timeout, when `self` is dropped).
    pub fn finish<C: Communicator + ?Sized>(&mut self, comm: &C, limit: Duration) -> Result<usize> {
        let end = crate::config::deadline_after(limit);
        self.sweep(comm)?;
        while self.pending_stale() > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_micros(200));
            self.sweep(comm)?;
        }
        Ok(self.pending_stale())
    }
}

impl std::fmt::Debug for CodedAllReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodedAllReduce")
            .field("n", &self.code.n())
            .field("s", &self.code.s())
            .field("aggregator", &self.aggregator)
            .field("round", &self.round)
            .field("pending_stale", &self.pending_stale())
            .finish()
    }
}
