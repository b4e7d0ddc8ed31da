//! Sequential gradient coding (Krishnan, Ebrahimi, Khisti, ICLR 2023) as round planners.
//!
//! A sequence of jobs (one gradient per training step, or one per model when several models train
//! concurrently, as in the paper's Lambda experiments): job `t` starts in round `t` and must be decoded
//! by the end of round `t + T` (delay `T`; plain GC is `T = 0`). A [`Planner`] says, each round, what
//! every worker computes ([`Planner::tasks`], [`Planner::load`]); the driver (the simulator in
//! [`crate::sim`], or a runtime) reports workers as they finish ([`Planner::complete`]) and ends the
//! round once [`Planner::ready`]; workers still running then are the round's stragglers and their
//! work of that round is lost. [`Planner::end_round`] returns the jobs decoded in the round, each with
//! its decoded value and the uncoded truth, so exactness is checked on every job.
//!
//! Schemes (loads are in partitions, `1/n` of a job's data each):
//! - [`Uncoded`]: worker `i` computes partition `i`; the round waits for all `n` (load 1).
//! - [`Gc`]: an `(n, s)` code ([`GradientCode`]), `T = 0`; the round ends at the `(n − s)`-th arrival
//!   (load `s + 1`).
//! - [`SrSgc`] (GC with selective repetition): an `(n, s)` fractional-repetition code for job `t` in
//!   round `t`, but the round may end with up to `λ ≥ s` stragglers. A job whose responders miss a
//!   group is not lost: only the missing groups' tasks are re-attempted in later rounds — by one member
//!   that was fast in the previous round, and at the deadline round `t + T` by every member of the
//!   group — and the master never ends the deadline round before the job decodes.
//! - [`MSgc`] (multiplexed): job `t`'s data is split into a repetition part (fraction `1 − δ`, one
//!   uncoded mini-task per worker) and a GC part (fraction `δ`, an `(n, λ)` fractional-repetition code).
//!   Both are computed in round `t`; the mini-tasks of round `t`'s stragglers are cut into pieces and
//!   multiplexed over the workers that were fast in the previous round, in later rounds, one copy each,
//!   and at the deadline round `t + T` every still-missing piece is replicated on `λ + 1` distinct
//!   workers, so any `λ` stragglers leave one copy. Rounds end at the `(n − λ)`-th arrival once the jobs
//!   due are complete. Per round a worker carries `(1 − δ) + δ(λ + 1)` plus its share of the repairs,
//!   against `λ + 1` for GC tolerating the same `λ` stragglers per round.
//!
//! The paper analyses these schemes under a `(B, W, λ)`-bursty straggler model; the planners here keep
//! its structure (GC for part of the work, adaptive repetition for the rest, exploiting `T > 0`) but
//! enforce exactness by their waiting rule for *any* straggler pattern: under patterns the design
//! covers (at most `λ` stragglers per round, bursts that end before the deadline) no round waits
//! beyond the `(n − λ)`-th arrival; otherwise the master waits for what the due jobs need.

use super::code::{GradientCode, Scheme};
use crate::{Error, Result};
use std::collections::{BTreeMap, VecDeque};

/// The synthetic gradient of `(job, partition, piece)`: a deterministic value in `[-1, 1)`, used by the
/// planners to check that every decoded job equals its uncoded sum.
pub fn synthetic(seed: u64, job: usize, partition: usize, piece: usize) -> f64 {
    let mut x = seed
        ^ (job as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (partition as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ (piece as u64).wrapping_mul(0x1656_67b1_9e37_79f9);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// One unit of work given to a worker in a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Task {
    /// Uncoded: the gradient of one partition of a job.
    Partition {
        /// Job.
        job: usize,
        /// Partition.
        partition: usize,
    },
    /// Row `row` of a gradient code applied to a job's (GC part of the) partitions.
    Coded {
        /// Job.
        job: usize,
        /// Row of `B` (for FR, any member of a group computes the group's row).
        row: usize,
        /// Load in partitions.
        load: f64,
    },
    /// One piece of a job's uncoded mini-task (M-SGC's repetition part).
    Piece {
        /// Job.
        job: usize,
        /// Mini-task (partition).
        partition: usize,
        /// Piece index, `0..pieces`.
        piece: usize,
        /// Load in partitions.
        load: f64,
    },
}

impl Task {
    /// Load in partitions.
    pub fn load(&self) -> f64 {
        match self {
            Task::Partition { .. } => 1.0,
            Task::Coded { load, .. } | Task::Piece { load, .. } => *load,
        }
    }
}

/// A decoded job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobDone {
    /// Job number.
    pub job: usize,
    /// Round in which it was decoded.
    pub round: usize,
    /// Decoded gradient (synthetic scalar).
    pub value: f64,
    /// The uncoded sum it must equal.
    pub truth: f64,
}

impl JobDone {
    /// `|value − truth| / max(1, |truth|)`.
    pub fn error(&self) -> f64 {
        (self.value - self.truth).abs() / self.truth.abs().max(1.0)
    }
}

/// A round-by-round plan of who computes what; see the module docs.
pub trait Planner {
    /// Short label, e.g. `GC(s=7)`.
    fn name(&self) -> String;
    /// Workers.
    fn n(&self) -> usize;
    /// Delay `T`: job `t` is decoded by round `t + T`.
    fn delay(&self) -> usize;
    /// Plan round `round` (rounds are `0, 1, 2, …`; job `t` starts in round `t`).
    fn begin_round(&mut self, round: usize) -> Result<()>;
    /// What `worker` computes this round.
    fn tasks(&self, worker: usize) -> &[Task];
    /// Load of `worker` this round, in partitions.
    fn load(&self, worker: usize) -> f64 {
        self.tasks(worker).iter().map(Task::load).sum()
    }
    /// `worker` finished all of its tasks of this round.
    fn complete(&mut self, worker: usize);
    /// The round may end now (its waiting rule holds).
    fn ready(&self) -> bool;
    /// End the round: workers not completed are stragglers. Returns the jobs decoded this round.
    fn end_round(&mut self) -> Result<Vec<JobDone>>;
    /// Jobs started but not decoded yet.
    fn open_jobs(&self) -> usize;
}

/// Shared per-round bookkeeping.
#[derive(Debug)]
struct RoundState {
    n: usize,
    round: usize,
    tasks: Vec<Vec<Task>>,
    done: Vec<bool>,
    finished: usize,
    /// Workers that finished in the previous round.
    fast: Vec<bool>,
}

impl RoundState {
    fn new(n: usize) -> RoundState {
        RoundState {
            n,
            round: 0,
            tasks: vec![Vec::new(); n],
            done: vec![false; n],
            finished: 0,
            fast: vec![true; n],
        }
    }
    fn begin(&mut self, round: usize) {
        self.round = round;
        self.tasks.iter_mut().for_each(Vec::clear);
        self.done.iter_mut().for_each(|d| *d = false);
        self.finished = 0;
    }
    fn complete(&mut self, w: usize) -> bool {
        if w < self.n && !self.done[w] {
            self.done[w] = true;
            self.finished += 1;
            true
        } else {
            false
        }
    }
    fn end(&mut self) {
        self.fast.clone_from(&self.done);
    }
}

fn check_n(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidArgument(
            "planner: need at least one worker".into(),
        ));
    }
    Ok(())
}

/// Uncoded: wait for every worker.
#[derive(Debug)]
pub struct Uncoded {
    st: RoundState,
    seed: u64,
}

impl Uncoded {
    /// `n` workers; `seed` fixes the synthetic gradients.
    pub fn new(n: usize, seed: u64) -> Result<Uncoded> {
        check_n(n)?;
        Ok(Uncoded {
            st: RoundState::new(n),
            seed,
        })
    }
}

impl Planner for Uncoded {
    fn name(&self) -> String {
        "uncoded".into()
    }
    fn n(&self) -> usize {
        self.st.n
    }
    fn delay(&self) -> usize {
        0
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        for (w, t) in self.st.tasks.iter_mut().enumerate() {
            t.push(Task::Partition {
                job: round,
                partition: w,
            });
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks.get(worker).map(Vec::as_slice).unwrap_or(&[])
    }
    fn complete(&mut self, worker: usize) {
        self.st.complete(worker);
    }
    fn ready(&self) -> bool {
        self.st.finished == self.st.n
    }
    fn end_round(&mut self) -> Result<Vec<JobDone>> {
        if !self.ready() {
            return Err(Error::InvalidArgument(format!(
                "uncoded round {} ended before every worker finished",
                self.st.round
            )));
        }
        let (j, n, seed) = (self.st.round, self.st.n, self.seed);
        let value: f64 = (0..n).map(|p| synthetic(seed, j, p, 0)).sum();
        let truth: f64 = (0..n).rev().map(|p| synthetic(seed, j, p, 0)).sum();
        self.st.end();
        Ok(vec![JobDone {
            job: j,
            round: j,
            value,
            truth,
        }])
    }
    fn open_jobs(&self) -> usize {
        0
    }
}

/// Value of row `row` of `code` on job `job`'s synthetic partition gradients (GC part `piece`).
fn coded_value(code: &GradientCode, seed: u64, job: usize, row: usize, piece: usize) -> f64 {
    let coef = code.coefficients(row).unwrap_or_default();
    code.partitions(row)
        .iter()
        .zip(coef)
        .map(|(&p, c)| c * synthetic(seed, job, p, piece))
        .sum()
}

fn truth_of(n: usize, seed: u64, job: usize, piece: usize) -> f64 {
    (0..n).rev().map(|p| synthetic(seed, job, p, piece)).sum()
}

/// Decode job `job` from the coded rows received (`rows[i]` true if row `i` arrived).
fn decode_rows(
    code: &GradientCode,
    seed: u64,
    job: usize,
    rows: &[usize],
    piece: usize,
) -> Result<f64> {
    let a = code.decoding_vector(rows)?;
    Ok(rows
        .iter()
        .filter(|&&r| a[r] != 0.0)
        .map(|&r| a[r] * coded_value(code, seed, job, r, piece))
        .sum())
}

/// Plain gradient coding: an `(n, s)` code per round, `T = 0`.
#[derive(Debug)]
pub struct Gc {
    st: RoundState,
    code: GradientCode,
    seed: u64,
}

impl Gc {
    /// GC with `scheme` (`(n, s)`), synthetic gradients from `seed`.
    pub fn new(scheme: Scheme, n: usize, s: usize, seed: u64) -> Result<Gc> {
        Ok(Gc {
            st: RoundState::new(n),
            code: GradientCode::new(scheme, n, s, seed)?,
            seed,
        })
    }
    /// The code.
    pub fn code(&self) -> &GradientCode {
        &self.code
    }
}

impl Planner for Gc {
    fn name(&self) -> String {
        format!("GC(s={})", self.code.s())
    }
    fn n(&self) -> usize {
        self.st.n
    }
    fn delay(&self) -> usize {
        0
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        let load = self.code.load() as f64;
        for (w, t) in self.st.tasks.iter_mut().enumerate() {
            t.push(Task::Coded {
                job: round,
                row: w,
                load,
            });
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks.get(worker).map(Vec::as_slice).unwrap_or(&[])
    }
    fn complete(&mut self, worker: usize) {
        self.st.complete(worker);
    }
    fn ready(&self) -> bool {
        self.st.finished >= self.code.min_responders()
    }
    fn end_round(&mut self) -> Result<Vec<JobDone>> {
        let rows: Vec<usize> = (0..self.st.n).filter(|&w| self.st.done[w]).collect();
        let j = self.st.round;
        let value = decode_rows(&self.code, self.seed, j, &rows, 0)?;
        self.st.end();
        Ok(vec![JobDone {
            job: j,
            round: j,
            value,
            truth: truth_of(self.st.n, self.seed, j, 0),
        }])
    }
    fn open_jobs(&self) -> usize {
        0
    }
}

/// SR-SGC: GC with selective repetition of unfinished tasks (see the module docs).
#[derive(Debug)]
pub struct SrSgc {
    st: RoundState,
    code: GradientCode,
    lambda: usize,
    delay: usize,
    seed: u64,
    /// Open jobs: job → rows received.
    open: BTreeMap<usize, Vec<bool>>,
    /// Groups still missing per open job due this round (for `ready`).
    due_missing: usize,
    reattempts: u64,
}

impl SrSgc {
    /// `n` workers, an `(n, s)` fractional-repetition code, rounds end with up to `lambda ≥ s`
    /// stragglers, delay `delay ≥ 1`.
    pub fn new(n: usize, s: usize, lambda: usize, delay: usize, seed: u64) -> Result<SrSgc> {
        if lambda < s || lambda >= n || delay == 0 {
            return Err(Error::InvalidArgument(format!(
                "SR-SGC needs s <= lambda < n and a delay T >= 1 (got s = {s}, lambda = {lambda}, n = {n}, T = {delay})"
            )));
        }
        Ok(SrSgc {
            st: RoundState::new(n),
            code: GradientCode::fractional(n, s)?,
            lambda,
            delay,
            seed,
            open: BTreeMap::new(),
            due_missing: 0,
            reattempts: 0,
        })
    }

    /// Group tasks re-attempted so far.
    pub fn reattempts(&self) -> u64 {
        self.reattempts
    }

    fn group(&self) -> usize {
        self.code.s() + 1
    }

    fn missing_groups(&self, rows: &[bool]) -> Vec<usize> {
        let g = self.group();
        (0..self.st.n / g)
            .filter(|&k| !rows[k * g..(k + 1) * g].iter().any(|&r| r))
            .collect()
    }
}

impl Planner for SrSgc {
    fn name(&self) -> String {
        format!(
            "SR-SGC(s={},λ={},T={})",
            self.code.s(),
            self.lambda,
            self.delay
        )
    }
    fn n(&self) -> usize {
        self.st.n
    }
    fn delay(&self) -> usize {
        self.delay
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        let (g, load) = (self.group(), self.code.load() as f64);
        for (w, t) in self.st.tasks.iter_mut().enumerate() {
            t.push(Task::Coded {
                job: round,
                row: w,
                load,
            });
        }
        self.open.insert(round, vec![false; self.st.n]);
        self.due_missing = 0;
        let open: Vec<(usize, Vec<usize>)> = self
            .open
            .iter()
            .filter(|(&j, _)| j < round)
            .map(|(&j, rows)| (j, self.missing_groups(rows)))
            .collect();
        for (j, missing) in open {
            let due = j + self.delay <= round;
            if due {
                self.due_missing += missing.len();
            }
            for k in missing {
                let members = k * g..(k + 1) * g;
                if due {
                    for m in members {
                        self.st.tasks[m].push(Task::Coded {
                            job: j,
                            row: m,
                            load,
                        });
                        self.reattempts += 1;
                    }
                } else {
                    let m = members
                        .clone()
                        .find(|&m| self.st.fast[m])
                        .unwrap_or(k * g + (round % g));
                    self.st.tasks[m].push(Task::Coded {
                        job: j,
                        row: m,
                        load,
                    });
                    self.reattempts += 1;
                }
            }
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks.get(worker).map(Vec::as_slice).unwrap_or(&[])
    }
    fn complete(&mut self, worker: usize) {
        if !self.st.complete(worker) {
            return;
        }
        let round = self.st.round;
        for i in 0..self.st.tasks[worker].len() {
            if let Task::Coded { job, row, .. } = self.st.tasks[worker][i] {
                let due = job < round && job + self.delay <= round;
                let newly = if let Some(rows) = self.open.get_mut(&job) {
                    let g = self.code.s() + 1;
                    let k = row / g;
                    let was = rows[k * g..(k + 1) * g].iter().any(|&r| r);
                    rows[row] = true;
                    !was
                } else {
                    false
                };
                if due && newly {
                    self.due_missing = self.due_missing.saturating_sub(1);
                }
            }
        }
    }
    fn ready(&self) -> bool {
        self.st.finished + self.lambda >= self.st.n && self.due_missing == 0
    }
    fn end_round(&mut self) -> Result<Vec<JobDone>> {
        let round = self.st.round;
        let mut out = Vec::new();
        let jobs: Vec<usize> = self.open.keys().copied().collect();
        for j in jobs {
            let decodable = self
                .open
                .get(&j)
                .map(|rows| self.missing_groups(rows).is_empty())
                .unwrap_or(false);
            if decodable {
                let rows: Vec<usize> = self
                    .open
                    .remove(&j)
                    .map(|r| (0..r.len()).filter(|&i| r[i]).collect())
                    .unwrap_or_default();
                out.push(JobDone {
                    job: j,
                    round,
                    value: decode_rows(&self.code, self.seed, j, &rows, 0)?,
                    truth: truth_of(self.st.n, self.seed, j, 0),
                });
            } else if j + self.delay <= round {
                return Err(Error::InvalidArgument(format!(
                    "SR-SGC: job {j} missed its deadline (round {round}); internal error of the waiting rule"
                )));
            }
        }
        self.st.end();
        Ok(out)
    }
    fn open_jobs(&self) -> usize {
        self.open.len()
    }
}

/// M-SGC: GC for part of each job, adaptive repetition for the rest (see the module docs).
#[derive(Debug)]
pub struct MSgc {
    st: RoundState,
    /// `(n, λ)` FR code of the GC part.
    code: GradientCode,
    lambda: usize,
    delay: usize,
    delta: f64,
    pieces: usize,
    seed: u64,
    /// Open jobs: job → (pieces done per mini-task as bitmasks, GC rows received).
    open: BTreeMap<usize, (Vec<u64>, Vec<bool>)>,
    due_missing: usize,
    cursor: usize,
    repaired: u64,
    fast_list: Vec<usize>,
    scratch: VecDeque<usize>,
}

impl MSgc {
    /// `n` workers, `lambda` stragglers per round (`(λ + 1) | n`), delay `delay ≥ 1`, GC fraction
    /// `delta ∈ [0, 1]`, repetition mini-tasks cut into `pieces ≤ 64` pieces when repaired.
    pub fn new(
        n: usize,
        lambda: usize,
        delay: usize,
        delta: f64,
        pieces: usize,
        seed: u64,
    ) -> Result<MSgc> {
        if delay == 0 || !(0.0..=1.0).contains(&delta) || pieces == 0 || pieces > 64 {
            return Err(Error::InvalidArgument(format!(
                "M-SGC needs delay T >= 1, 0 <= delta <= 1 and 1..=64 pieces (got T = {delay}, delta = {delta}, pieces = {pieces})"
            )));
        }
        Ok(MSgc {
            st: RoundState::new(n),
            code: GradientCode::fractional(n, lambda)?,
            lambda,
            delay,
            delta,
            pieces,
            seed,
            open: BTreeMap::new(),
            due_missing: 0,
            cursor: 0,
            repaired: 0,
            fast_list: Vec::new(),
            scratch: VecDeque::new(),
        })
    }

    /// Repair pieces assigned so far (copies included).
    pub fn repaired(&self) -> u64 {
        self.repaired
    }

    fn full(&self) -> u64 {
        if self.pieces == 64 {
            u64::MAX
        } else {
            (1u64 << self.pieces) - 1
        }
    }

    fn gc_ok(&self, rows: &[bool]) -> bool {
        let g = self.lambda + 1;
        (0..self.st.n / g).all(|k| rows[k * g..(k + 1) * g].iter().any(|&r| r))
    }

    fn next_worker(&mut self) -> usize {
        let list = &self.fast_list;
        let w = list[self.cursor % list.len()];
        self.cursor += 1;
        w
    }
}

impl Planner for MSgc {
    fn name(&self) -> String {
        format!("M-SGC(λ={},T={},δ={})", self.lambda, self.delay, self.delta)
    }
    fn n(&self) -> usize {
        self.st.n
    }
    fn delay(&self) -> usize {
        self.delay
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        let n = self.st.n;
        let rep_load = 1.0 - self.delta;
        let gc_load = self.delta * (self.lambda + 1) as f64;
        for (w, t) in self.st.tasks.iter_mut().enumerate() {
            if rep_load > 0.0 {
                t.push(Task::Piece {
                    job: round,
                    partition: w,
                    piece: usize::MAX, // the whole mini-task
                    load: rep_load,
                });
            }
            if gc_load > 0.0 {
                t.push(Task::Coded {
                    job: round,
                    row: w,
                    load: gc_load,
                });
            }
        }
        let full = if rep_load > 0.0 { 0 } else { self.full() };
        let gc = vec![gc_load <= 0.0; n];
        self.open.insert(round, (vec![full; n], gc));
        // Repairs, multiplexed over last round's fast workers.
        self.fast_list = (0..n).filter(|&w| self.st.fast[w]).collect();
        if self.fast_list.len() <= self.lambda {
            self.fast_list = (0..n).collect();
        }
        self.due_missing = 0;
        let piece_load = rep_load / self.pieces as f64;
        let full = self.full();
        let mut work: Vec<(usize, usize, usize, bool)> = Vec::new();
        for (&j, (masks, _)) in self.open.iter().filter(|(&j, _)| j < round) {
            let due = j + self.delay <= round;
            for (p, &m) in masks.iter().enumerate() {
                if m != full {
                    for k in 0..self.pieces {
                        if m >> k & 1 == 0 {
                            work.push((j, p, k, due));
                        }
                    }
                }
            }
        }
        for (job, partition, piece, due) in work {
            let copies = if due { self.lambda + 1 } else { 1 };
            if due {
                self.due_missing += 1;
            }
            self.scratch.clear();
            while self.scratch.len() < copies.min(self.fast_list.len()) {
                let w = self.next_worker();
                if !self.scratch.contains(&w) {
                    self.scratch.push_back(w);
                }
            }
            for &w in &self.scratch {
                self.st.tasks[w].push(Task::Piece {
                    job,
                    partition,
                    piece,
                    load: piece_load,
                });
                self.repaired += 1;
            }
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks.get(worker).map(Vec::as_slice).unwrap_or(&[])
    }
    fn complete(&mut self, worker: usize) {
        if !self.st.complete(worker) {
            return;
        }
        let (round, full) = (self.st.round, self.full());
        for i in 0..self.st.tasks[worker].len() {
            match self.st.tasks[worker][i] {
                Task::Piece {
                    job,
                    partition,
                    piece,
                    ..
                } => {
                    if let Some((masks, _)) = self.open.get_mut(&job) {
                        let before = masks[partition];
                        let bit = if piece == usize::MAX {
                            full
                        } else {
                            1u64 << piece
                        };
                        masks[partition] |= bit;
                        let due = job < round && job + self.delay <= round;
                        if due && before & bit != bit {
                            self.due_missing = self.due_missing.saturating_sub(1);
                        }
                    }
                }
                Task::Coded { job, row, .. } => {
                    if let Some((_, rows)) = self.open.get_mut(&job) {
                        rows[row] = true;
                    }
                }
                Task::Partition { .. } => {}
            }
        }
    }
    fn ready(&self) -> bool {
        // The GC part of this round's job needs one responder per group; n − λ finishers guarantee it.
        self.st.finished + self.lambda >= self.st.n && self.due_missing == 0
    }
    fn end_round(&mut self) -> Result<Vec<JobDone>> {
        let (round, n, seed, full) = (self.st.round, self.st.n, self.seed, self.full());
        let rep = self.delta < 1.0;
        let gc = self.delta > 0.0;
        let mut out = Vec::new();
        let jobs: Vec<usize> = self.open.keys().copied().collect();
        for j in jobs {
            let complete = self
                .open
                .get(&j)
                .map(|(m, rows)| m.iter().all(|&x| x == full) && self.gc_ok(rows))
                .unwrap_or(false);
            if complete {
                let rows: Vec<usize> = self
                    .open
                    .remove(&j)
                    .map(|(_, r)| (0..n).filter(|&i| r[i]).collect())
                    .unwrap_or_default();
                // Repetition part: each piece counted once; GC part: decoded.
                let mut value = 0.0;
                let mut truth = 0.0;
                if rep {
                    for p in 0..n {
                        for k in 0..self.pieces {
                            value += synthetic(seed, j, p, 1 + k);
                        }
                    }
                    for p in (0..n).rev() {
                        for k in (0..self.pieces).rev() {
                            truth += synthetic(seed, j, p, 1 + k);
                        }
                    }
                }
                if gc {
                    value += decode_rows(&self.code, seed, j, &rows, 0)?;
                    truth += truth_of(n, seed, j, 0);
                }
                out.push(JobDone {
                    job: j,
                    round,
                    value,
                    truth,
                });
            } else if j + self.delay <= round {
                return Err(Error::InvalidArgument(format!(
                    "M-SGC: job {j} missed its deadline (round {round}); internal error of the waiting rule"
                )));
            }
        }
        self.st.end();
        Ok(out)
    }
    fn open_jobs(&self) -> usize {
        self.open.len()
    }
}
