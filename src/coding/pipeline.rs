//! Sequential gradient coding over a [`Communicator`]: the planners of [`super::sequential`] (uncoded,
//! GC, SR-SGC, M-SGC) run on real ranks.
//!
//! Every rank holds a replica of the same [`Planner`] and calls [`SequentialRuntime::step`] once per
//! round, in order. Rank `master` is also the aggregator (it computes its own tasks too).
//!
//! Round `r`:
//! - every rank plans the round on its replica and computes its tasks ([`Planner::tasks`]) through the
//!   caller's closure (one gradient vector of length `dim` per task);
//! - a worker sends its results with `isend` (a plain, eager send in-process), one message per job, tagged by `(job, round)`
//!   ([`result_tag`]), the job's tasks concatenated in task order;
//! - the master posts one `irecv` per `(worker, job)` of the round, polls them, reports every worker
//!   whose messages all arrived to its planner ([`Planner::complete`]) and ends the round as soon as
//!   [`Planner::ready`] holds (the scheme's waiting rule); it decodes every job the planner declares
//!   decodable ([`super::sequential::Decoded`]) exactly, in f64, from the stored results, and sends every
//!   worker the round's record (which workers completed, [`record_tag`]) and then the decoded
//!   gradients ([`grad_tag`]);
//! - a worker takes the record, replays it on its replica (so every replica plans the next round
//!   identically) and takes the decoded gradients.
//!
//! Late results never leak into another job or round: a receive is posted for exactly one
//! `(worker, job, round)`, a round's receives still open at its end stay posted (stale, polled and
//! discarded in later rounds — never dropped while pending, since dropping a pending [`Work`] blocks),
//! and their results are not given to the planner (the scheme treats the worker as a straggler of that
//! round). A worker that finds the record of its next round already there (it fell behind) skips the
//! round: it sends placeholders that meet the master's stale receives, and does not compute. Tags are
//! reused every [`SequentialRuntime::tag_window`] rounds; that is safe because every posted receive
//! is eventually met by its own message (messages of a pair arrive in order and match the oldest posted
//! receive, in-process and in MPI).
//!
//! A worker whose receive fails with [`Error::PeerLost`] is a permanent straggler; rounds then end when
//! every live worker answered and the due jobs decode (the bursty model does not cover a worker that
//! never comes back, so the scheme waits for the others rather than cutting off new stragglers).
//!
//! To decode the last jobs, run `T` = [`Planner::delay`] extra rounds; their new jobs can be computed
//! as zeros.

use super::sends::Sends;
use super::sequential::{Decoded, Planner, Source, Task};
use crate::work::Work;
use crate::{Communicator, CommunicatorExt, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// First tag used (above the tags of [`super::CodedAllReduce`], below 32767, the smallest `MPI_TAG_UB`).
pub const TAG_BASE: u32 = 0x6000;
/// Tags available from [`TAG_BASE`].
pub const TAG_SPACE: u32 = 32767 - TAG_BASE;

fn tags_per_round(delay: usize) -> u32 {
    delay as u32 + 3
}

/// Rounds before a tag is reused for a planner of delay `T`.
pub fn tag_window(delay: usize) -> u32 {
    (TAG_SPACE / tags_per_round(delay)).max(1)
}

fn round_base(round: usize, delay: usize) -> u32 {
    TAG_BASE + (round as u64 % u64::from(tag_window(delay))) as u32 * tags_per_round(delay)
}

/// Tag of a worker's results of `job` computed in `round` (`round − T ≤ job ≤ round`).
pub fn result_tag(job: usize, round: usize, delay: usize) -> u32 {
    round_base(round, delay) + (round.saturating_sub(job)).min(delay) as u32
}

/// Tag of the record of `round` (which workers completed it).
pub fn record_tag(round: usize, delay: usize) -> u32 {
    round_base(round, delay) + delay as u32 + 1
}

/// Tag of the gradients decoded in `round`.
pub fn grad_tag(round: usize, delay: usize) -> u32 {
    round_base(round, delay) + delay as u32 + 2
}

/// One decoded job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobResult {
    /// Job.
    pub job: usize,
    /// Round in which it was decoded.
    pub round: usize,
    /// The exact sum of the job's unit gradients.
    pub gradient: Vec<f32>,
}

/// What one round did, as seen by this rank.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqRound {
    /// Round.
    pub round: usize,
    /// Workers whose results of this round were used (sorted).
    pub completed: Vec<usize>,
    /// This rank skipped the round (it ended before this rank got to it).
    pub skipped: bool,
    /// Jobs decoded in this round.
    pub decoded: Vec<JobResult>,
    /// Late messages of earlier rounds received and discarded during this call (master).
    pub stale_discarded: usize,
    /// Time this rank spent in the call.
    pub elapsed: Duration,
}

/// A receive the master expects in the current round.
struct Expect {
    worker: usize,
    slots: Vec<usize>,
    work: Work<Vec<f32>>,
}

/// Runs a [`Planner`] over a communicator; see the module docs.
pub struct SequentialRuntime<P: Planner> {
    planner: P,
    master: usize,
    dim: usize,
    round: usize,
    lost: Vec<bool>,
    /// Master: receives of past rounds still open.
    stale: Vec<(usize, Work<Vec<f32>>)>,
    /// Master: results of open jobs.
    store: BTreeMap<usize, HashMap<Source, Vec<f32>>>,
    /// Sends in flight.
    sends: Sends,
    /// Worker: the posted receive of a round's record.
    record: Option<(usize, Work<Vec<f32>>)>,
    discarded: u64,
    skipped: u64,
}

impl<P: Planner> SequentialRuntime<P> {
    /// A runtime for `planner` (its `n` must be the world size), gradients of `dim` elements, the
    /// master (aggregator) rank `master`.
    pub fn new(planner: P, master: usize, dim: usize) -> SequentialRuntime<P> {
        let n = planner.n();
        SequentialRuntime {
            planner,
            master,
            dim,
            round: 0,
            lost: vec![false; n],
            stale: Vec::new(),
            store: BTreeMap::new(),
            sends: Sends::default(),
            record: None,
            discarded: 0,
            skipped: 0,
        }
    }

    /// The planner replica.
    pub fn planner(&self) -> &P {
        &self.planner
    }

    /// The next round.
    pub fn rounds(&self) -> usize {
        self.round
    }

    /// Late messages received and discarded so far (master).
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Rounds this rank skipped.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Receives of past rounds still posted (master).
    pub fn pending_stale(&self) -> usize {
        self.stale.len()
    }

    /// Workers the master saw fail.
    pub fn lost(&self) -> Vec<usize> {
        (0..self.lost.len()).filter(|&w| self.lost[w]).collect()
    }

    /// Rounds before a tag is reused.
    pub fn tag_window(&self) -> u32 {
        tag_window(self.planner.delay())
    }

    fn check<C: Communicator + ?Sized>(&self, comm: &C) -> Result<()> {
        if comm.world_size() != self.planner.n() {
            return Err(Error::InvalidArgument(format!(
                "sequential coding: the planner {} has n = {} workers but the communicator has {} ranks",
                self.planner.name(),
                self.planner.n(),
                comm.world_size()
            )));
        }
        if self.master >= comm.world_size() {
            return Err(Error::RankOutOfRange {
                what: "sequential coding master",
                rank: self.master,
                world: comm.world_size(),
            });
        }
        Ok(())
    }

    /// This worker's tasks of the round grouped by job: `(job, slots)` in order of first appearance.
    fn groups(&self, worker: usize) -> Vec<(usize, Vec<usize>)> {
        let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
        for (slot, t) in self.planner.tasks(worker).iter().enumerate() {
            match out.iter_mut().find(|g| g.0 == t.job) {
                Some(g) => g.1.push(slot),
                None => out.push((t.job, vec![slot])),
            }
        }
        out
    }

    /// Master: discard late results that arrived.
    fn sweep(&mut self) -> Result<usize> {
        let mut n = 0;
        let mut keep = Vec::with_capacity(self.stale.len());
        for (w, mut work) in self.stale.drain(..) {
            if work.is_done() {
                match work.wait() {
                    Ok(_) => n += 1,
                    Err(Error::PeerLost { .. }) => self.lost[w] = true,
                    Err(e) => return Err(e),
                }
            } else {
                keep.push((w, work));
            }
        }
        self.stale = keep;
        self.discarded += n as u64;
        Ok(n)
    }

    /// Run one round on this rank. `compute(task)` returns the task's result (a combination of unit
    /// gradients of `task.job`, `Σ coef · grad(job, unit)` over `task.terms`, `dim` elements). Every
    /// rank gets the gradients decoded in the round.
    pub fn step<C, F>(&mut self, comm: &C, mut compute: F) -> Result<SeqRound>
    where
        C: Communicator + ?Sized,
        F: FnMut(&Task) -> Result<Vec<f32>>,
    {
        let t0 = Instant::now();
        self.check(comm)?;
        let r = self.round;
        self.round += 1;
        self.planner.begin_round(r)?;
        self.sends.reap()?;
        if comm.rank() == self.master {
            self.master_round(comm, r, t0, &mut compute)
        } else {
            self.worker_round(comm, r, t0, &mut compute)
        }
    }

    fn run_tasks<F>(&self, worker: usize, compute: &mut F) -> Result<Vec<Vec<f32>>>
    where
        F: FnMut(&Task) -> Result<Vec<f32>>,
    {
        let mut out = Vec::new();
        for t in self.planner.tasks(worker) {
            let v = compute(t)?;
            if v.len() != self.dim {
                return Err(Error::LengthMismatch {
                    what: format!("sequential coding: result of a task of job {}", t.job),
                    expected: self.dim,
                    got: v.len(),
                });
            }
            out.push(v);
        }
        Ok(out)
    }

    fn worker_round<C, F>(
        &mut self,
        comm: &C,
        r: usize,
        t0: Instant,
        compute: &mut F,
    ) -> Result<SeqRound>
    where
        C: Communicator + ?Sized,
        F: FnMut(&Task) -> Result<Vec<f32>>,
    {
        let (me, n, delay, d) = (
            comm.rank(),
            comm.world_size(),
            self.planner.delay(),
            self.dim,
        );
        let mut work = match self.record.take() {
            Some((rr, w)) if rr == r => w,
            Some((rr, w)) => {
                let _ = w.wait();
                return Err(Error::InvalidArgument(format!(
                    "sequential coding: internal: record receive of round {rr} left over in round {r}"
                )));
            }
            None => comm.irecv(vec![0f32; n], self.master, record_tag(r, delay))?,
        };
        let behind = work.wait_timeout(Duration::from_micros(100));
        let groups = self.groups(me);
        if behind {
            // The round ended without us: meet the master's receives with placeholders.
            for (job, slots) in &groups {
                self.sends.send(
                    comm,
                    vec![0f32; d * slots.len()],
                    self.master,
                    result_tag(*job, r, delay),
                )?;
            }
            self.skipped += 1;
        } else {
            let results = self.run_tasks(me, compute)?;
            for (job, slots) in &groups {
                let mut buf = Vec::with_capacity(d * slots.len());
                for &s in slots {
                    buf.extend_from_slice(&results[s]);
                }
                self.sends
                    .send(comm, buf, self.master, result_tag(*job, r, delay))?;
            }
        }
        let mask = work.wait()?;
        let completed: Vec<usize> = (0..n).filter(|&w| mask[w] != 0.0).collect();
        for &w in &completed {
            self.planner.complete(w);
        }
        let decoded = self.planner.end_round()?;
        let mut out = Vec::with_capacity(decoded.len());
        if !decoded.is_empty() {
            let mut buf = vec![0f32; d * decoded.len()];
            comm.recv(&mut buf[..], self.master, grad_tag(r, delay))?;
            for (k, dj) in decoded.iter().enumerate() {
                out.push(JobResult {
                    job: dj.job,
                    round: r,
                    gradient: buf[k * d..(k + 1) * d].to_vec(),
                });
            }
        }
        Ok(SeqRound {
            round: r,
            completed,
            skipped: behind,
            decoded: out,
            stale_discarded: 0,
            elapsed: t0.elapsed(),
        })
    }

    fn master_round<C, F>(
        &mut self,
        comm: &C,
        r: usize,
        t0: Instant,
        compute: &mut F,
    ) -> Result<SeqRound>
    where
        C: Communicator + ?Sized,
        F: FnMut(&Task) -> Result<Vec<f32>>,
    {
        let (me, n, delay, d) = (
            comm.rank(),
            comm.world_size(),
            self.planner.delay(),
            self.dim,
        );
        let stale_discarded = self.sweep()?;
        // Post this round's receives.
        let mut expect: Vec<Expect> = Vec::new();
        let mut owed = vec![0usize; n];
        for w in (0..n).filter(|&w| w != me && !self.lost[w]) {
            for (job, slots) in self.groups(w) {
                let work = comm.irecv(vec![0f32; d * slots.len()], w, result_tag(job, r, delay))?;
                owed[w] += 1;
                expect.push(Expect {
                    worker: w,
                    slots,
                    work,
                });
            }
        }
        // Own tasks.
        let mine = self.run_tasks(me, compute)?;
        let mut got: Vec<(Source, usize, Vec<f32>)> = Vec::new();
        for (slot, v) in mine.into_iter().enumerate() {
            let job = self.planner.tasks(me)[slot].job;
            got.push((
                Source {
                    round: r,
                    worker: me,
                    slot,
                },
                job,
                v,
            ));
        }
        self.planner.complete(me);
        let mut partial: Vec<Vec<(Source, usize, Vec<f32>)>> = vec![Vec::new(); n];
        for w in (0..n).filter(|&w| w != me && owed[w] == 0 && !self.lost[w]) {
            self.planner.complete(w); // nothing to send this round
        }
        let deadline = crate::config::deadline_from(t0, comm.config().timeout);
        let mut failure = None;
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < expect.len() {
                if !expect[i].work.is_done() {
                    i += 1;
                    continue;
                }
                progressed = true;
                let e = expect.swap_remove(i);
                let w = e.worker;
                match e.work.wait() {
                    Ok(buf) => {
                        let tasks = self.planner.tasks(w);
                        for (k, &slot) in e.slots.iter().enumerate() {
                            let job = tasks.get(slot).map_or(usize::MAX, |t| t.job);
                            let src = Source {
                                round: r,
                                worker: w,
                                slot,
                            };
                            partial[w].push((src, job, buf[k * d..(k + 1) * d].to_vec()));
                        }
                        owed[w] -= 1;
                        if owed[w] == 0 {
                            got.append(&mut partial[w]);
                            self.planner.complete(w);
                        }
                    }
                    Err(Error::PeerLost { .. }) => {
                        self.lost[w] = true;
                        partial[w].clear();
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if failure.is_some() {
                break;
            }
            if self.planner.ready() {
                break;
            }
            let live_open = (0..n).any(|w| !self.lost[w] && owed[w] > 0);
            if !live_open {
                // Everyone alive answered: end if the due jobs decode, otherwise too many were lost.
                if self.planner.due_decodable() {
                    break;
                }
                failure = Some(Error::PeerLost {
                    rank: self.lost().first().copied().unwrap_or(me),
                    during: "sequential coding: the live workers cannot decode the due job (too many workers lost)",
                });
                break;
            }
            if Instant::now() >= deadline {
                failure = Some(Error::Timeout {
                    during: "sequential coding (waiting for the round's results)",
                    after: comm.config().timeout,
                    waiting_for: None,
                });
                break;
            }
            if !progressed {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // Receives still open become stale: kept, polled later, never dropped while pending.
        for e in expect {
            self.stale.push((e.worker, e.work));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        for (src, job, v) in got {
            self.store.entry(job).or_default().insert(src, v);
        }
        let completed: Vec<usize> = (0..n)
            .filter(|&w| w == me || (!self.lost[w] && owed[w] == 0))
            .collect();
        let decoded = self.planner.end_round()?;
        let mut out = Vec::with_capacity(decoded.len());
        for dj in &decoded {
            let g = self.combine(dj)?;
            self.store.remove(&dj.job);
            out.push(JobResult {
                job: dj.job,
                round: r,
                gradient: g,
            });
        }
        // Record and gradients to every live worker.
        let mut mask = vec![0f32; n];
        for &w in &completed {
            mask[w] = 1.0;
        }
        let grads: Vec<f32> = out
            .iter()
            .flat_map(|j| j.gradient.iter().copied())
            .collect();
        let live: Vec<usize> = (0..n).filter(|&w| w != me && !self.lost[w]).collect();
        for w in live {
            match self.sends.send(comm, mask.clone(), w, record_tag(r, delay)) {
                Ok(()) => {}
                Err(Error::PeerLost { .. }) => {
                    self.lost[w] = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
            if !grads.is_empty() {
                match self.sends.send(comm, grads.clone(), w, grad_tag(r, delay)) {
                    Ok(()) => {}
                    Err(Error::PeerLost { .. }) => self.lost[w] = true,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(SeqRound {
            round: r,
            completed,
            skipped: false,
            decoded: out,
            stale_discarded,
            elapsed: t0.elapsed(),
        })
    }

    /// `Σ coef · result(source)` in f64.
    fn combine(&self, dj: &Decoded) -> Result<Vec<f32>> {
        let mut acc = vec![0f64; self.dim];
        let store = self.store.get(&dj.job);
        for (src, a, _) in &dj.parts {
            let v = store.and_then(|s| s.get(src)).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "sequential coding: internal: result {src:?} of job {} missing at decode",
                    dj.job
                ))
            })?;
            for (x, &y) in acc.iter_mut().zip(v) {
                *x += a * f64::from(y);
            }
        }
        Ok(acc.into_iter().map(|x| x as f32).collect())
    }

    /// Wait (up to `limit`) until the late messages and sends in flight completed; returns how many
    /// are still pending afterwards (they are drained, each bounded by the timeout, on drop).
    pub fn finish<C: Communicator + ?Sized>(&mut self, comm: &C, limit: Duration) -> Result<usize> {
        let _ = comm;
        let end = crate::config::deadline_after(limit);
        loop {
            self.sweep()?;
            self.sends.reap()?;
            let left = self.stale.len() + self.sends.len();
            if left == 0 || Instant::now() >= end {
                return Ok(left);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl<P: Planner> std::fmt::Debug for SequentialRuntime<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequentialRuntime")
            .field("planner", &self.planner.name())
            .field("master", &self.master)
            .field("round", &self.round)
            .field("pending_stale", &self.stale.len())
            .finish()
    }
}
