//! Sequential gradient coding (Krishnan, Ebrahimi, Khisti, *Sequential Gradient Coding for Straggler
//! Mitigation*, ICLR 2023) as round planners, next to uncoded training and plain GC.
//!
//! A sequence of jobs (one gradient per training step, or one per model when several models train
//! concurrently, as in the paper's experiments): job `t` starts in round `t` and is decoded by the end
//! of round `t + T` (delay `T`; uncoded and plain GC have `T = 0`). Each job's data is cut into *units*
//! ([`Planner::units`], sizes in partitions, `n` partitions per job); a [`Task`] is a linear combination
//! of one job's unit gradients. A [`Planner`] says, every round, what each worker computes
//! ([`Planner::tasks`]); the driver — the simulator ([`crate::sim`]) or the runtime
//! ([`super::pipeline::SequentialRuntime`]) — reports the workers whose results arrived
//! ([`Planner::complete`]) and ends the round once [`Planner::ready`]. Workers still running are the
//! round's stragglers: all of their work of that round is lost (late results are discarded).
//! [`Planner::end_round`] returns a [`Decoded`] recipe for every job decodable now: which results
//! ([`Source`]: round, worker, slot) to combine with which coefficients. [`Decoded::residual`] checks
//! the recipe exactly (the coefficients of every unit must sum to 1).
//!
//! ## The `(B, W, λ)`-bursty straggler model (paper, Section 2)
//! In every window of `W` consecutive rounds at most `λ` distinct workers straggle, and a worker's
//! straggling rounds inside a window form one burst of at most `B` rounds. Checked per round as in the
//! authors' reference code: a candidate straggler set `S` of round `r` is *admissible* iff
//! `|S ∪ (stragglers of rounds r−W+1..r−1)| ≤ λ` and no worker of `S` straggled in rounds
//! `r−W+1..=r−B`.
//!
//! ## Waiting rule
//! A round ends at the first moment at which (a) the workers still missing form an admissible straggler
//! set for the scheme's model (or every worker has answered), and (b) every job due this round
//! (`t + T = r`) is decodable from what arrived ([`Planner::admissible`], [`Planner::due_decodable`]).
//! For GC, (a) is "at most `s` missing", so a GC round ends at the `(n − s)`-th arrival. Under patterns
//! of the model (a) implies (b) (the paper's theorems); (b) is kept as a guard, so every decoded job is
//! exact under *any* pattern — outside the model the master just waits longer. The simulator also has
//! the rule of the paper's experiments (stragglers = slower than `(1 + μ)` × the fastest worker; if
//! that pattern is not admissible, wait for everyone), see [`crate::sim::WaitRule`].
//!
//! ## Schemes
//! - [`Uncoded`]: worker `i` computes partition `i`; the round waits for all `n` (load 1).
//! - [`Gc`] (Tandon et al., ICML 2017): an `(n, s)` code, `T = 0`, load `s + 1`.
//! - [`SrSgc`] (paper, Section 3.1, "GC with selective repetition"): `B | (W − 1)`,
//!   `s = ⌈Bλ / (W − 1 + B)⌉`, an `(n, s)` GC per job, `T = B`. In round `t` every worker computes its
//!   GC task of job `t`, except: if `v > s` workers did not return job `t − B`'s task in round `t − B`,
//!   `v − s` of them (lowest indices first) compute their job-`(t − B)` task instead. Job `t − B` is
//!   decoded in round `t` from any `n − s` of its tasks returned in rounds `t − B` and `t` (earlier if
//!   round `t − B` alone gave `n − s`). Load `s + 1` partitions per round. As in the reference code,
//!   rounds with at most `s` stragglers and no repetition are exempt from the model's history.
//! - [`MSgc`] (paper, Section 3.2, multiplexed SGC): `T = W − 2 + B`. Each job's data is split into
//!   `D1` (fraction `(λ+1)(W−1) / (B + (λ+1)(W−1))`, worker `i`'s own share cut into `W − 1` pieces) and
//!   `D2` (the rest, `B` groups, each with an `(n, λ)` GC). Every round a worker runs `W − 1 + B`
//!   equal-size mini-tasks; mini-task `m` belongs to job `r − m`. Slots `m < W − 1` compute the worker's
//!   next missing D1 piece of that job; slot `W − 1 + g` computes the GC task of D2 group `g` if all of
//!   the worker's D1 pieces of the job have arrived, and otherwise its next missing D1 piece (so D1
//!   pieces lost to a burst are repeated, adaptively, in the D2 slots). Job `t` is decoded in round
//!   `t + T` once every D1 piece arrived and every D2 group has `n − λ` decodable rows. Load per round
//!   `(W − 1 + B)(λ + 1) / (B + (λ + 1)(W − 1))` partitions.

use super::code::{GradientCode, Scheme};
use crate::{Error, Result};
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Shared `(unit, coefficient)` terms of a task.
pub type Terms = Arc<[(usize, f64)]>;

/// The synthetic gradient of `(job, unit)`: a deterministic value in `[-1, 1)`, used to check that
/// every decoded job equals its uncoded sum.
pub fn synthetic(seed: u64, job: usize, unit: usize) -> f64 {
    let mut x = seed
        ^ (job as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (unit as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// What a task is, for reports and tests (the computation itself is [`Task::terms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Uncoded: one unit.
    Partition,
    /// Row `row` of a gradient code over group `group` of the job's units (group 0 for GC/SR-SGC).
    Coded {
        /// Code group (M-SGC's D2 group; 0 otherwise).
        group: usize,
        /// Row of the code (= the worker).
        row: usize,
        /// True if this re-attempts a task lost in an earlier round (SR-SGC).
        repeat: bool,
    },
    /// M-SGC: piece `piece` of the worker's D1 share (uncoded).
    Piece {
        /// Piece index, `0..W−1`.
        piece: usize,
        /// True if computed in a D2 slot because an earlier attempt was lost.
        repeat: bool,
    },
}

/// One unit of work of a worker in a round: `Σ coef · (gradient of unit u of job)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Job.
    pub job: usize,
    /// `(unit, coefficient)` pairs (shared between the tasks of equal rows).
    pub terms: Terms,
    /// Load in partitions (`n` partitions per job).
    pub load: f64,
    /// What it is.
    pub kind: TaskKind,
}

/// Where a result came from: the round it was computed in, the worker, and its index in that worker's
/// task list of that round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    /// Round.
    pub round: usize,
    /// Worker.
    pub worker: usize,
    /// Index in [`Planner::tasks`] of that worker in that round.
    pub slot: usize,
}

/// How to decode one job: `Σ coef · result(source)` is the sum of all of the job's unit gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Job.
    pub job: usize,
    /// Round in which it was decoded.
    pub round: usize,
    /// `(source, coefficient, the task computed there)`, coefficients non-zero.
    pub parts: Vec<(Source, f64, Task)>,
}

impl Decoded {
    /// Coefficient of every unit in the recipe (`units` = number of units per job).
    pub fn unit_coefficients(&self, units: usize) -> Vec<f64> {
        let mut c = vec![0f64; units];
        for (_, a, t) in &self.parts {
            for &(u, b) in t.terms.iter() {
                if let Some(x) = c.get_mut(u) {
                    *x += a * b;
                }
            }
        }
        c
    }

    /// `max_u |coefficient(u) − 1|`: 0 for an exact recipe (below 1e-9 up to rounding).
    pub fn residual(&self, units: usize) -> f64 {
        self.unit_coefficients(units)
            .iter()
            .fold(0f64, |m, &c| m.max((c - 1.0).abs()))
    }

    /// Evaluate the recipe on scalar unit gradients `g(unit)`.
    pub fn evaluate(&self, g: impl Fn(usize) -> f64) -> f64 {
        self.parts
            .iter()
            .map(|(_, a, t)| a * t.terms.iter().map(|&(u, b)| b * g(u)).sum::<f64>())
            .sum()
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
    /// Sizes (in partitions; they sum to `n`) of the units a job's data is cut into.
    fn units(&self) -> &[f64];
    /// Plan round `round` (rounds are `0, 1, 2, …`, called in order; job `t` starts in round `t`).
    fn begin_round(&mut self, round: usize) -> Result<()>;
    /// What `worker` computes this round (slot = index in this list).
    fn tasks(&self, worker: usize) -> &[Task];
    /// Load of `worker` this round, in partitions.
    fn load(&self, worker: usize) -> f64 {
        self.tasks(worker).iter().map(|t| t.load).sum()
    }
    /// All results of `worker` for this round arrived.
    fn complete(&mut self, worker: usize);
    /// Workers completed so far this round.
    fn finished(&self) -> usize;
    /// The workers not completed yet form an admissible straggler set for the scheme's model.
    fn admissible(&self) -> bool;
    /// Every job due this round can be decoded from what arrived.
    fn due_decodable(&self) -> bool;
    /// The round may end now: `(admissible or everyone answered) and due jobs decodable`.
    fn ready(&self) -> bool {
        (self.admissible() || self.finished() == self.n()) && self.due_decodable()
    }
    /// End the round (workers not completed are stragglers); returns the jobs decoded in it.
    fn end_round(&mut self) -> Result<Vec<Decoded>>;
    /// Jobs started but not decoded yet.
    fn open_jobs(&self) -> usize;
}

/// Per-round bookkeeping shared by the planners.
#[derive(Debug)]
struct RoundState {
    n: usize,
    round: usize,
    tasks: Vec<Vec<Task>>,
    done: Vec<bool>,
    finished: usize,
}

impl RoundState {
    fn new(n: usize) -> RoundState {
        RoundState {
            n,
            round: 0,
            tasks: vec![Vec::new(); n],
            done: vec![false; n],
            finished: 0,
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
    fn tasks(&self, w: usize) -> &[Task] {
        self.tasks.get(w).map(Vec::as_slice).unwrap_or(&[])
    }
    fn stragglers(&self) -> usize {
        self.n - self.finished
    }
}

/// The `(B, W, λ)`-bursty model's history and the admissibility test of the current round.
#[derive(Debug)]
struct BurstHistory {
    n: usize,
    b: usize,
    w: usize,
    lambda: usize,
    /// Straggler sets of the last `W − 1` rounds (oldest first); `None` for exempt rounds.
    hist: VecDeque<Option<Vec<bool>>>,
    in_h: Vec<bool>,
    in_f: Vec<bool>,
    h_count: usize,
    open_outside_h: usize,
    open_in_f: usize,
}

impl BurstHistory {
    fn new(n: usize, b: usize, w: usize, lambda: usize) -> BurstHistory {
        BurstHistory {
            n,
            b,
            w,
            lambda,
            hist: VecDeque::new(),
            in_h: vec![false; n],
            in_f: vec![false; n],
            h_count: 0,
            open_outside_h: n,
            open_in_f: 0,
        }
    }
    fn begin(&mut self) {
        self.in_h.iter_mut().for_each(|x| *x = false);
        self.in_f.iter_mut().for_each(|x| *x = false);
        let len = self.hist.len();
        // hist[k] is round r − len + k; F covers rounds r−W+1 ..= r−B.
        for (k, s) in self.hist.iter().enumerate() {
            let Some(s) = s else { continue };
            let age = len - k; // round r − age
            for (i, &x) in s.iter().enumerate() {
                if x {
                    self.in_h[i] = true;
                    if age >= self.b && age < self.w {
                        self.in_f[i] = true;
                    }
                }
            }
        }
        self.h_count = self.in_h.iter().filter(|&&x| x).count();
        self.open_outside_h = self.n - self.h_count;
        self.open_in_f = self.in_f.iter().filter(|&&x| x).count();
    }
    fn complete(&mut self, w: usize) {
        if !self.in_h[w] {
            self.open_outside_h -= 1;
        }
        if self.in_f[w] {
            self.open_in_f -= 1;
        }
    }
    fn admissible(&self) -> bool {
        self.h_count + self.open_outside_h <= self.lambda && self.open_in_f == 0
    }
    fn end(&mut self, done: &[bool], exempt: bool) {
        self.hist
            .push_back((!exempt).then(|| done.iter().map(|d| !d).collect()));
        while self.hist.len() > self.w.saturating_sub(1) {
            self.hist.pop_front();
        }
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

/// The `(n, s)` code a scheme uses: fractional repetition when `(s + 1) | n` (well conditioned at any
/// `n`), cyclic repetition otherwise.
fn default_code(n: usize, s: usize, seed: u64) -> Result<GradientCode> {
    if n % (s + 1) == 0 {
        GradientCode::fractional(n, s)
    } else {
        GradientCode::cyclic(n, s, seed)
    }
}

/// The terms of every row of `code` over the units `offset + p`.
fn code_rows(code: &GradientCode, offset: usize) -> Vec<Terms> {
    (0..code.n())
        .map(|row| {
            let coef = code.coefficients(row).unwrap_or_default();
            code.partitions(row)
                .iter()
                .zip(coef)
                .map(|(&p, c)| (offset + p, c))
                .collect()
        })
        .collect()
}

/// A coded task from precomputed row terms, each unit of size `unit`.
fn coded(terms: &Terms, job: usize, row: usize, group: usize, unit: f64, repeat: bool) -> Task {
    Task {
        job,
        load: unit * terms.len() as f64,
        terms: terms.clone(),
        kind: TaskKind::Coded { group, row, repeat },
    }
}

/// Rows of one code (one per worker, at most one each) received for a job.
#[derive(Debug, Clone)]
struct Rows {
    rows: Vec<Option<(Source, Task)>>,
    count: usize,
    /// Fractional repetition: group size `s + 1`, rows per group, groups covered.
    fr: Option<(usize, Vec<u32>, usize)>,
}

impl Rows {
    fn new(code: &GradientCode) -> Rows {
        let n = code.n();
        let fr = (code.scheme() == Scheme::FractionalRepetition)
            .then(|| (code.load(), vec![0u32; n / code.load()], 0));
        Rows {
            rows: vec![None; n],
            count: 0,
            fr,
        }
    }
    fn add(&mut self, w: usize, src: Source, t: Task) {
        if self.rows[w].is_none() {
            self.count += 1;
            if let Some((g, cover, covered)) = &mut self.fr {
                let k = w / *g;
                if cover[k] == 0 {
                    *covered += 1;
                }
                cover[k] += 1;
            }
        }
        self.rows[w] = Some((src, t));
    }
    fn workers(&self) -> Vec<usize> {
        (0..self.rows.len())
            .filter(|&w| self.rows[w].is_some())
            .collect()
    }
    /// Decodable with `code`? Cyclic codes are only tried from `n − s` rows on (the solve is `O(n³)`).
    fn decodable(&self, code: &GradientCode) -> bool {
        if let Some((_, cover, covered)) = &self.fr {
            return *covered == cover.len();
        }
        if self.count < code.min_responders() {
            return false;
        }
        code.is_decodable(&self.workers())
    }
    fn recipe(&self, code: &GradientCode, out: &mut Vec<(Source, f64, Task)>) -> Result<()> {
        let a = code.decoding_vector(&self.workers())?;
        for (w, r) in self.rows.iter().enumerate() {
            if let Some((src, t)) = r {
                if a[w] != 0.0 {
                    out.push((*src, a[w], t.clone()));
                }
            }
        }
        Ok(())
    }
}

/// Uncoded: wait for every worker.
#[derive(Debug)]
pub struct Uncoded {
    st: RoundState,
    units: Vec<f64>,
}

impl Uncoded {
    /// `n` workers.
    pub fn new(n: usize) -> Result<Uncoded> {
        check_n(n)?;
        Ok(Uncoded {
            st: RoundState::new(n),
            units: vec![1.0; n],
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
    fn units(&self) -> &[f64] {
        &self.units
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        for (w, t) in self.st.tasks.iter_mut().enumerate() {
            t.push(Task {
                job: round,
                terms: Arc::from(vec![(w, 1.0)]),
                load: 1.0,
                kind: TaskKind::Partition,
            });
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks(worker)
    }
    fn complete(&mut self, worker: usize) {
        self.st.complete(worker);
    }
    fn finished(&self) -> usize {
        self.st.finished
    }
    fn admissible(&self) -> bool {
        self.st.finished == self.st.n
    }
    fn due_decodable(&self) -> bool {
        self.st.finished == self.st.n
    }
    fn end_round(&mut self) -> Result<Vec<Decoded>> {
        if !self.due_decodable() {
            return Err(Error::InvalidArgument(format!(
                "uncoded round {} ended before every worker finished",
                self.st.round
            )));
        }
        let r = self.st.round;
        let parts = (0..self.st.n)
            .map(|w| {
                let src = Source {
                    round: r,
                    worker: w,
                    slot: 0,
                };
                (src, 1.0, self.st.tasks[w][0].clone())
            })
            .collect();
        Ok(vec![Decoded {
            job: r,
            round: r,
            parts,
        }])
    }
    fn open_jobs(&self) -> usize {
        0
    }
}

/// Plain gradient coding: an `(n, s)` code per round, `T = 0`; a round ends at the `(n − s)`-th arrival.
#[derive(Debug)]
pub struct Gc {
    st: RoundState,
    code: GradientCode,
    terms: Vec<Terms>,
    units: Vec<f64>,
    rows: Rows,
    cache: Cell<Option<(usize, bool)>>,
}

impl Gc {
    /// GC with `scheme` (`(n, s)`); `seed` fixes the cyclic code's coefficients.
    pub fn new(scheme: Scheme, n: usize, s: usize, seed: u64) -> Result<Gc> {
        let code = GradientCode::new(scheme, n, s, seed)?;
        Ok(Gc {
            st: RoundState::new(n),
            terms: code_rows(&code, 0),
            rows: Rows::new(&code),
            code,
            units: vec![1.0; n],
            cache: Cell::new(None),
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
    fn units(&self) -> &[f64] {
        &self.units
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        self.rows = Rows::new(&self.code);
        self.cache.set(None);
        for w in 0..self.st.n {
            let t = coded(&self.terms[w], round, w, 0, 1.0, false);
            self.st.tasks[w].push(t);
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks(worker)
    }
    fn complete(&mut self, worker: usize) {
        if self.st.complete(worker) {
            let src = Source {
                round: self.st.round,
                worker,
                slot: 0,
            };
            self.rows.add(worker, src, self.st.tasks[worker][0].clone());
        }
    }
    fn finished(&self) -> usize {
        self.st.finished
    }
    fn admissible(&self) -> bool {
        self.st.stragglers() <= self.code.s()
    }
    fn due_decodable(&self) -> bool {
        if let Some((k, ok)) = self.cache.get() {
            if k == self.rows.count {
                return ok;
            }
        }
        let ok = self.rows.decodable(&self.code);
        self.cache.set(Some((self.rows.count, ok)));
        ok
    }
    fn end_round(&mut self) -> Result<Vec<Decoded>> {
        let mut parts = Vec::new();
        self.rows.recipe(&self.code, &mut parts)?;
        Ok(vec![Decoded {
            job: self.st.round,
            round: self.st.round,
            parts,
        }])
    }
    fn open_jobs(&self) -> usize {
        0
    }
}

/// Validate `(B, W, λ)`.
fn check_bwl(what: &str, n: usize, b: usize, w: usize, lambda: usize) -> Result<()> {
    check_n(n)?;
    if b == 0 || w <= b || lambda == 0 || lambda >= n {
        return Err(Error::InvalidArgument(format!(
            "{what} needs B >= 1, W > B and 1 <= lambda < n (got B = {b}, W = {w}, lambda = {lambda}, n = {n})"
        )));
    }
    Ok(())
}

/// SR-SGC: GC with selective repetition (paper, Section 3.1; see the module docs).
#[derive(Debug)]
pub struct SrSgc {
    st: RoundState,
    code: GradientCode,
    terms: Vec<Terms>,
    b: usize,
    w: usize,
    lambda: usize,
    units: Vec<f64>,
    hist: BurstHistory,
    /// Open jobs: rows received (from round `t` or `t + B`).
    open: BTreeMap<usize, Rows>,
    cache: Cell<Option<(usize, bool)>>,
    repeats: u64,
}

impl SrSgc {
    /// `n` workers, model `(B, W, λ)` with `B | (W − 1)`; `seed` fixes a cyclic code's coefficients
    /// (used when `(s + 1)` does not divide `n`; fractional repetition otherwise).
    pub fn new(n: usize, b: usize, w: usize, lambda: usize, seed: u64) -> Result<SrSgc> {
        check_bwl("SR-SGC", n, b, w, lambda)?;
        if (w - 1) % b != 0 {
            return Err(Error::InvalidArgument(format!(
                "SR-SGC needs B to divide W - 1 (got B = {b}, W = {w})"
            )));
        }
        let s = Self::s_of(b, w, lambda);
        let code = default_code(n, s, seed)?;
        Ok(SrSgc {
            st: RoundState::new(n),
            terms: code_rows(&code, 0),
            code,
            b,
            w,
            lambda,
            units: vec![1.0; n],
            hist: BurstHistory::new(n, b, w, lambda),
            open: BTreeMap::new(),
            cache: Cell::new(None),
            repeats: 0,
        })
    }

    /// The code parameter `s = ⌈Bλ / (W − 1 + B)⌉`.
    pub fn s_of(b: usize, w: usize, lambda: usize) -> usize {
        (b * lambda).div_ceil(w - 1 + b)
    }

    /// The `(n, s)` code.
    pub fn code(&self) -> &GradientCode {
        &self.code
    }

    /// Tasks re-attempted so far.
    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    fn due(&self) -> Option<usize> {
        self.st.round.checked_sub(self.b)
    }
}

impl Planner for SrSgc {
    fn name(&self) -> String {
        format!(
            "SR-SGC(B={},W={},λ={},s={},T={})",
            self.b,
            self.w,
            self.lambda,
            self.code.s(),
            self.b
        )
    }
    fn n(&self) -> usize {
        self.st.n
    }
    fn delay(&self) -> usize {
        self.b
    }
    fn units(&self) -> &[f64] {
        &self.units
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        self.hist.begin();
        self.cache.set(None);
        let n = self.st.n;
        self.open.insert(round, Rows::new(&self.code));
        let mut repeat = vec![false; n];
        if let Some(j) = self.due() {
            if let Some(rows) = self.open.get(&j) {
                let missing: Vec<usize> = (0..n).filter(|&w| rows.rows[w].is_none()).collect();
                let v = missing.len();
                let k = if v > self.code.s() {
                    v - self.code.s()
                } else {
                    v // numerically undecodable with n − s rows: repeat them all
                };
                for &w in missing.iter().take(k) {
                    repeat[w] = true;
                }
            }
        }
        for (w, &rep) in repeat.iter().enumerate() {
            let job = if rep { round - self.b } else { round };
            self.repeats += u64::from(rep);
            let t = coded(&self.terms[w], job, w, 0, 1.0, rep);
            self.st.tasks[w].push(t);
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks(worker)
    }
    fn complete(&mut self, worker: usize) {
        if !self.st.complete(worker) {
            return;
        }
        self.hist.complete(worker);
        let t = self.st.tasks[worker][0].clone();
        let src = Source {
            round: self.st.round,
            worker,
            slot: 0,
        };
        if let Some(rows) = self.open.get_mut(&t.job) {
            rows.add(worker, src, t);
        }
    }
    fn finished(&self) -> usize {
        self.st.finished
    }
    fn admissible(&self) -> bool {
        self.hist.admissible()
    }
    fn due_decodable(&self) -> bool {
        let Some(j) = self.due() else { return true };
        let Some(rows) = self.open.get(&j) else {
            return true;
        };
        if let Some((k, ok)) = self.cache.get() {
            if k == rows.count {
                return ok;
            }
        }
        let ok = rows.decodable(&self.code);
        self.cache.set(Some((rows.count, ok)));
        ok
    }
    fn end_round(&mut self) -> Result<Vec<Decoded>> {
        let r = self.st.round;
        // Exempt (reference code): at most s stragglers and every responder computed job r.
        let exempt = self.st.stragglers() <= self.code.s()
            && (0..self.st.n)
                .all(|w| !self.st.done[w] || self.st.tasks[w].first().map(|t| t.job) == Some(r));
        self.hist.end(&self.st.done, exempt);
        let mut out = Vec::new();
        let jobs: Vec<usize> = self.open.keys().copied().collect();
        for j in jobs {
            let ok = self
                .open
                .get(&j)
                .is_some_and(|rows| rows.decodable(&self.code));
            if ok {
                if let Some(rows) = self.open.remove(&j) {
                    let mut parts = Vec::new();
                    rows.recipe(&self.code, &mut parts)?;
                    out.push(Decoded {
                        job: j,
                        round: r,
                        parts,
                    });
                }
            } else if j + self.b <= r {
                return Err(Error::InvalidArgument(format!(
                    "SR-SGC: job {j} is not decodable at its deadline (round {r}); end a round only when ready()"
                )));
            }
        }
        Ok(out)
    }
    fn open_jobs(&self) -> usize {
        self.open.len()
    }
}

/// State of one open M-SGC job.
#[derive(Debug, Clone)]
struct MJob {
    /// D1 pieces of each worker received (pieces arrive in order `0, 1, …`).
    d1: Vec<usize>,
    d1_src: Vec<(Source, Task)>,
    d2: Vec<Rows>,
}

/// M-SGC: multiplexed sequential gradient coding (paper, Section 3.2; see the module docs).
#[derive(Debug)]
pub struct MSgc {
    st: RoundState,
    code: GradientCode,
    /// Row terms per D2 group.
    terms: Vec<Vec<Terms>>,
    /// Unit of each D1 piece `(worker, piece)`.
    pieces: Vec<Terms>,
    b: usize,
    w: usize,
    lambda: usize,
    /// Load of one mini-task, partitions.
    mini: f64,
    units: Vec<f64>,
    hist: BurstHistory,
    open: BTreeMap<usize, MJob>,
    cache: Cell<Option<(usize, bool)>>,
    repeats: u64,
}

impl MSgc {
    /// `n` workers, model `(B, W, λ)` (`W > B`, `λ < n`); the D2 groups use an `(n, λ)` fractional
    /// repetition code when `(λ + 1) | n`, a cyclic one (coefficients from `seed`) otherwise.
    pub fn new(n: usize, b: usize, w: usize, lambda: usize, seed: u64) -> Result<MSgc> {
        check_bwl("M-SGC", n, b, w, lambda)?;
        let code = default_code(n, lambda, seed)?;
        let l1 = (lambda + 1) as f64;
        let denom = b as f64 + l1 * (w - 1) as f64;
        let mini = l1 / denom; // partitions per mini-task
        let d2_unit = mini / l1;
        let mut units = vec![mini; n * (w - 1)];
        units.extend(std::iter::repeat(d2_unit).take(n * b));
        let terms = (0..b)
            .map(|g| code_rows(&code, n * (w - 1) + g * n))
            .collect();
        let pieces = (0..n * (w - 1))
            .map(|u| Arc::from(vec![(u, 1.0)]))
            .collect();
        Ok(MSgc {
            st: RoundState::new(n),
            code,
            terms,
            pieces,
            b,
            w,
            lambda,
            mini,
            units,
            hist: BurstHistory::new(n, b, w, lambda),
            open: BTreeMap::new(),
            cache: Cell::new(None),
            repeats: 0,
        })
    }

    /// Load per worker and round, partitions: `(W − 1 + B)(λ + 1) / (B + (λ + 1)(W − 1))`.
    pub fn round_load(&self) -> f64 {
        self.mini * self.slots() as f64
    }

    /// D1 pieces re-attempted in D2 slots so far.
    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    fn slots(&self) -> usize {
        self.w - 1 + self.b
    }

    fn t(&self) -> usize {
        self.w - 2 + self.b
    }

    fn decodable(&self, job: &MJob) -> bool {
        job.d1.iter().all(|&c| c >= self.w - 1) && job.d2.iter().all(|g| g.decodable(&self.code))
    }
}

impl Planner for MSgc {
    fn name(&self) -> String {
        format!(
            "M-SGC(B={},W={},λ={},T={})",
            self.b,
            self.w,
            self.lambda,
            self.t()
        )
    }
    fn n(&self) -> usize {
        self.st.n
    }
    fn delay(&self) -> usize {
        self.t()
    }
    fn units(&self) -> &[f64] {
        &self.units
    }
    fn begin_round(&mut self, round: usize) -> Result<()> {
        self.st.begin(round);
        self.hist.begin();
        self.cache.set(None);
        let (n, d1) = (self.st.n, self.w - 1);
        let d2_unit = self.mini / (self.lambda + 1) as f64;
        self.open.insert(
            round,
            MJob {
                d1: vec![0; n],
                d1_src: Vec::new(),
                d2: vec![Rows::new(&self.code); self.b],
            },
        );
        for m in 0..self.slots().min(round + 1) {
            let j = round - m;
            let Some(job) = self.open.get(&j) else {
                return Err(Error::InvalidArgument(format!(
                    "M-SGC: internal: job {j} closed before its last mini-task (round {round})"
                )));
            };
            for w in 0..n {
                let have = job.d1[w];
                let t = if m >= d1 && have >= d1 {
                    let g = m - d1;
                    coded(&self.terms[g][w], j, w, g, d2_unit, false)
                } else {
                    let repeat = m >= d1;
                    self.repeats += u64::from(repeat);
                    Task {
                        job: j,
                        terms: self.pieces[w * d1 + have.min(d1 - 1)].clone(),
                        load: self.mini,
                        kind: TaskKind::Piece {
                            piece: have,
                            repeat,
                        },
                    }
                };
                self.st.tasks[w].push(t);
            }
        }
        Ok(())
    }
    fn tasks(&self, worker: usize) -> &[Task] {
        self.st.tasks(worker)
    }
    fn complete(&mut self, worker: usize) {
        if !self.st.complete(worker) {
            return;
        }
        self.hist.complete(worker);
        let r = self.st.round;
        for (slot, t) in self.st.tasks[worker].iter().enumerate() {
            let src = Source {
                round: r,
                worker,
                slot,
            };
            let Some(job) = self.open.get_mut(&t.job) else {
                continue;
            };
            match t.kind {
                TaskKind::Piece { .. } => {
                    job.d1[worker] += 1;
                    job.d1_src.push((src, t.clone()));
                }
                TaskKind::Coded { group, .. } => {
                    if let Some(g) = job.d2.get_mut(group) {
                        g.add(worker, src, t.clone());
                    }
                }
                TaskKind::Partition => {}
            }
        }
    }
    fn finished(&self) -> usize {
        self.st.finished
    }
    fn admissible(&self) -> bool {
        self.hist.admissible()
    }
    fn due_decodable(&self) -> bool {
        let Some(j) = self.st.round.checked_sub(self.t()) else {
            return true;
        };
        let Some(job) = self.open.get(&j) else {
            return true;
        };
        if let Some((k, ok)) = self.cache.get() {
            if k == self.st.finished {
                return ok;
            }
        }
        let ok = self.decodable(job);
        self.cache.set(Some((self.st.finished, ok)));
        ok
    }
    fn end_round(&mut self) -> Result<Vec<Decoded>> {
        let r = self.st.round;
        self.hist.end(&self.st.done, false);
        let mut out = Vec::new();
        if let Some(j) = r.checked_sub(self.t()) {
            let ok = self.open.get(&j).is_some_and(|job| self.decodable(job));
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "M-SGC: job {j} is not decodable at its deadline (round {r}); end a round only when ready()"
                )));
            }
            if let Some(job) = self.open.remove(&j) {
                let mut parts: Vec<(Source, f64, Task)> =
                    job.d1_src.into_iter().map(|(s, t)| (s, 1.0, t)).collect();
                for g in &job.d2 {
                    g.recipe(&self.code, &mut parts)?;
                }
                out.push(Decoded {
                    job: j,
                    round: r,
                    parts,
                });
            }
        }
        Ok(out)
    }
    fn open_jobs(&self) -> usize {
        self.open.len()
    }
}
