//! Local SGD: workers take many inner optimizer steps on their own copy of the model and only now
//! and then exchange *pseudo-gradients* (`Δ = φ − θ`, the global copy minus the local one) or models.
//!
//! One primitive, [`LocalSgd`], runs every algorithm of the family:
//!
//! | [`Algorithm`] | what is exchanged, when | source of the defaults |
//! |---|---|---|
//! | [`Algorithm::Periodic`] | models averaged every `h` steps (after optional synchronous warm-up; optionally inside `split` groups every `h_group` steps) | torch's `PostLocalSGDOptimizer` / `PeriodicModelAverager` / `HierarchicalModelAverager` |
//! | [`Algorithm::DiLoCo`] | Δ averaged every `h` steps, outer Nesterov SGD (lr 0.7, momentum 0.9) | Douillard et al. 2023; torchft `DiLoCo` |
//! | [`Algorithm::Streaming`] | `F` flat fragments, staggered by `h/F` steps; each exchange started non-blocking and applied `delay` steps later, mixed into the local copy with factor `mixing` (0.5) | Douillard et al. 2025, *Streaming DiLoCo*; torchft `StreamingDiLoCo` |
//! | [`Algorithm::Edit`] | layer by layer in forward order ([`LocalSgd::layer`]), with the pseudo-gradient penalty ([`penalty`]) | Cheng et al., *EDiT*, ICLR 2025; atorch `local_sgd` |
//! | [`Algorithm::AEdit`] | as EDiT, but every `interval` of (virtual or wall-clock) time instead of every `h` steps | A-EDiT, same paper |
//! | [`Algorithm::NoLoCo`] | no all-reduce: each worker averages with one random partner (send/recv), modified Nesterov step | Kolehmainen et al. 2025, *NoLoCo* |
//! | [`Algorithm::SingleMerge`] | gossip with neighbours (ring, random pairs or none) every `h` steps, one global average at [`LocalSgd::finish`] | *A Single Merging Suffices* (2025) |
//!
//! # Roles
//! The **trainer** owns its parameters (a list of named f32 tensors — its layers) and its inner
//! optimizer, and calls [`LocalSgd::step`] after every inner step (EDiT/A-EDiT trainers also call
//! [`LocalSgd::layer`] before using each layer in the forward pass). The **primitive** owns the global
//! copy, the outer optimizer's momentum, the step counters, the EDiT statistics and all
//! communication, and decides when to sync. It is generic over the [`Communicator`], and its
//! exchange is pluggable ([`Exchange`]): dense all-reduce, bf16 on the wire, or DGC-compressed
//! pseudo-gradients through [`crate::dgc`] — one field of [`LocalSgdConfig`].
//!
//! ```
//! use ferroccl::local_sgd::{LocalSgd, LocalSgdConfig};
//! use ferroccl::prelude::*;
//! let out = ferroccl::local::run(2, |comm| {
//!     let mut w = vec![1.0f32; 4];                         // the trainer's one layer
//!     let mut lsgd = LocalSgd::new(comm, LocalSgdConfig::periodic(2), &["w"], &mut [&mut w])?;
//!     for _ in 0..2 {
//!         w.iter_mut().for_each(|x| *x -= 0.5 * (comm.rank() as f32 + 1.0)); // an "inner step"
//!         lsgd.step(comm, &mut [&mut w])?;
//!     }
//!     Ok(w)
//! }).unwrap();
//! // after 2 steps rank 0 is at 0, rank 1 at −1: averaged to −0.5 on both
//! assert_eq!(out[0], vec![-0.5; 4]);
//! assert_eq!(out[1], vec![-0.5; 4]);
//! ```
//!
//! # Checkpoints
//! [`LocalSgd::state`] returns a serde-serialisable [`LocalSgdState`] (global copy, momentum, step and
//! round counters, EDiT statistics, DGC residuals); [`LocalSgd::from_state`] resumes. A checkpoint is
//! taken between syncs (an exchange in flight is refused with an error).
//!
//! # Bad input
//! Each is a named error, returned before any state changes:
//! mismatched layouts across ranks ([`Error::LayoutMismatch`], checked collectively by a layout hash
//! at construction), a NaN/Inf pseudo-gradient or model on any rank ([`Error::NonFinite`] on every
//! rank: a flag travels with the exchange, so no rank is left waiting), `h = 0` and other invalid
//! settings ([`Error::InvalidArgument`]), an EDiT layer synced out of forward order
//! ([`Error::OutOfOrder`]), an empty parameter list. The global copy is untouched by all of them.
//!
//! # Traffic
//! Every byte goes through the communicator, so `comm.stats()` ([`crate::stats`]) counts it; the
//! hierarchical form's group traffic is on [`LocalSgd::group_stats`].

pub mod outer;
pub mod penalty;

#[cfg(feature = "cuda")]
pub mod gpu;

use crate::comm::LinkClock;
use crate::dgc::{Dgc, DgcConfig, DgcState};
use crate::stats::Stats;
use crate::{Communicator, CommunicatorExt, Error, ReduceOp, Result, Work};
use half::bf16;
pub use outer::Outer;
pub use penalty::{Detector, Penalty};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The fused outer-update kernels (`cuda/local_sgd.cu`, registered as
/// `kernels::registry::LOCAL_SGD`); CPU twins in [`outer`].
pub const LOCAL_SGD_CU: &str = crate::kernels::registry::LOCAL_SGD.source;

/// Tags of the point-to-point exchanges (NoLoCo, gossip): `TAG_BASE + (round mod 2^20)`.
pub const TAG_BASE: u32 = 0x4c50_0000;

/// How pseudo-gradients (or models) travel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Exchange {
    /// f32 all-reduce (average).
    Dense,
    /// bf16 on the wire (half the bytes; the average is rounded to bf16).
    Bf16,
    /// Deep Gradient Compression of the pseudo-gradient ([`crate::dgc`], one `Dgc` per synced range,
    /// residuals kept across rounds; the round number is DGC's epoch). All-reduce algorithms only.
    Dgc(DgcConfig),
}

/// Gossip topology of [`Algorithm::SingleMerge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Topology {
    /// Average with both ring neighbours.
    Ring,
    /// Average with one random partner per round (the same pairing as NoLoCo).
    Random,
    /// No communication until the final merge.
    None,
}

/// The clock of A-EDiT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSource {
    /// The communicator's virtual clock (`comm.virtual_time()`, the link model), else wall time.
    Virtual,
    /// Wall-clock time since construction.
    Wall,
}

/// Hierarchical averaging: inside groups of `group_size` consecutive ranks every `h_group` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hierarchy {
    /// Ranks per group (from `split(rank / group_size)`).
    pub group_size: usize,
    /// Group averaging period (a divisor of the global period is typical).
    pub h_group: u64,
}

/// Which member of the family, with its own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Algorithm {
    /// Periodic model averaging (PostLocalSGD).
    Periodic {
        /// Steps between global averages.
        h: u64,
        /// Synchronous steps first (the trainer all-reduces gradients: [`LocalSgd::allreduce_grads`]).
        warmup_steps: u64,
        /// Optional group averaging between the global ones.
        hierarchy: Option<Hierarchy>,
    },
    /// DiLoCo.
    DiLoCo {
        /// Inner steps per round.
        h: u64,
        /// Outer optimizer.
        outer: Outer,
    },
    /// Streaming DiLoCo.
    Streaming {
        /// Inner steps per round of each fragment.
        h: u64,
        /// Number of fragments F (equal flat slices of the parameters).
        fragments: usize,
        /// Steps between starting a fragment's exchange and applying it (τ < h).
        delay: u64,
        /// Mixing factor α: `θ ← α·θ + (1 − α)·φ` (torchft's `fragment_update_alpha`).
        mixing: f32,
        /// Outer optimizer.
        outer: Outer,
    },
    /// EDiT.
    Edit {
        /// Inner steps per round.
        h: u64,
        /// Outer optimizer.
        outer: Outer,
        /// Pseudo-gradient penalty.
        penalty: Penalty,
    },
    /// A-EDiT.
    AEdit {
        /// Seconds between syncs.
        interval: f64,
        /// Which clock.
        time: TimeSource,
        /// Outer optimizer.
        outer: Outer,
        /// Pseudo-gradient penalty.
        penalty: Penalty,
    },
    /// NoLoCo.
    NoLoCo {
        /// Inner steps per round.
        h: u64,
        /// β: weight of the group's mean pseudo-gradient.
        outer_lr: f32,
        /// α: momentum.
        momentum: f32,
        /// γ: pull towards the group's mean slow weights.
        gamma: f32,
    },
    /// Decentralised training with a single final merge.
    SingleMerge {
        /// Steps between gossip rounds.
        h: u64,
        /// Gossip topology.
        topology: Topology,
    },
}

impl Algorithm {
    /// The key used in examples and reports (`periodic`, `diloco`, …).
    pub fn key(&self) -> &'static str {
        match self {
            Algorithm::Periodic { .. } => "periodic",
            Algorithm::DiLoCo { .. } => "diloco",
            Algorithm::Streaming { .. } => "streaming_diloco",
            Algorithm::Edit { .. } => "edit",
            Algorithm::AEdit { .. } => "a_edit",
            Algorithm::NoLoCo { .. } => "noloco",
            Algorithm::SingleMerge { .. } => "single_merge",
        }
    }
}

/// Configuration of [`LocalSgd`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalSgdConfig {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// How pseudo-gradients travel.
    pub exchange: Exchange,
    /// Seed shared by every rank (NoLoCo's and random gossip's pairings).
    pub seed: u64,
}

impl LocalSgdConfig {
    fn of(algorithm: Algorithm) -> LocalSgdConfig {
        LocalSgdConfig {
            algorithm,
            exchange: Exchange::Dense,
            seed: 0x10ca_15ed,
        }
    }
    /// Periodic averaging every `h` steps.
    pub fn periodic(h: u64) -> LocalSgdConfig {
        Self::of(Algorithm::Periodic {
            h,
            warmup_steps: 0,
            hierarchy: None,
        })
    }
    /// DiLoCo with its defaults (outer Nesterov, lr 0.7, momentum 0.9).
    pub fn diloco(h: u64) -> LocalSgdConfig {
        Self::of(Algorithm::DiLoCo {
            h,
            outer: Outer::DILOCO,
        })
    }
    /// Streaming DiLoCo: `fragments` fragments, applied `delay` steps after they start, mixing 0.5
    /// (the paper's α = 0.5), DiLoCo's outer optimizer.
    pub fn streaming(h: u64, fragments: usize, delay: u64) -> LocalSgdConfig {
        Self::of(Algorithm::Streaming {
            h,
            fragments,
            delay,
            mixing: 0.5,
            outer: Outer::DILOCO,
        })
    }
    /// EDiT with atorch's penalty defaults and DiLoCo's outer optimizer.
    pub fn edit(h: u64) -> LocalSgdConfig {
        Self::of(Algorithm::Edit {
            h,
            outer: Outer::DILOCO,
            penalty: Penalty::default(),
        })
    }
    /// A-EDiT syncing every `interval` seconds of virtual time (the link model's clock; wall time
    /// where the backend has none).
    pub fn a_edit(interval: f64) -> LocalSgdConfig {
        Self::of(Algorithm::AEdit {
            interval,
            time: TimeSource::Virtual,
            outer: Outer::DILOCO,
            penalty: Penalty::default(),
        })
    }
    /// NoLoCo: β = 0.7 and α = 0.3 as the reference repository's NoLoCo configs
    /// (`outer_lr: 0.7`, `outer_momentum: 0.3`); γ = 0.5 is our choice (set it with the field).
    pub fn noloco(h: u64) -> LocalSgdConfig {
        Self::of(Algorithm::NoLoCo {
            h,
            outer_lr: 0.7,
            momentum: 0.3,
            gamma: 0.5,
        })
    }
    /// Gossip every `h` steps on `topology`, one global average at [`LocalSgd::finish`].
    pub fn single_merge(h: u64, topology: Topology) -> LocalSgdConfig {
        Self::of(Algorithm::SingleMerge { h, topology })
    }
    /// Builder: the exchange.
    pub fn with_exchange(mut self, e: Exchange) -> LocalSgdConfig {
        self.exchange = e;
        self
    }
    /// Builder: the shared seed.
    pub fn with_seed(mut self, seed: u64) -> LocalSgdConfig {
        self.seed = seed;
        self
    }

    fn validate(&self, world: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("local SGD: {m}")));
        let h = match &self.algorithm {
            Algorithm::Periodic { h, hierarchy, .. } => {
                if let Some(hy) = hierarchy {
                    if hy.h_group == 0 {
                        return bad("hierarchy.h_group = 0; use at least 1".into());
                    }
                    if hy.group_size == 0 || world % hy.group_size != 0 {
                        return bad(format!(
                            "hierarchy.group_size {} must divide the world size {world}",
                            hy.group_size
                        ));
                    }
                }
                *h
            }
            Algorithm::DiLoCo { h, .. }
            | Algorithm::Edit { h, .. }
            | Algorithm::NoLoCo { h, .. }
            | Algorithm::SingleMerge { h, .. } => *h,
            Algorithm::Streaming {
                h,
                fragments,
                delay,
                mixing,
                ..
            } => {
                if *fragments == 0 || *fragments as u64 > (*h).max(1) {
                    return bad(format!(
                        "streaming: {fragments} fragments for h = {h}; use 1 ≤ F ≤ h"
                    ));
                }
                if *h > 0 && *delay >= *h {
                    return bad(format!(
                        "streaming: delay τ = {delay} must be below h = {h} (one exchange per fragment in flight)"
                    ));
                }
                if !(0.0..1.0).contains(mixing) {
                    return bad(format!(
                        "streaming: mixing factor {mixing} must be in [0, 1)"
                    ));
                }
                *h
            }
            Algorithm::AEdit { interval, .. } => {
                if !(interval.is_finite() && *interval > 0.0) {
                    return bad(format!(
                        "a_edit: interval {interval} s must be a positive number of seconds"
                    ));
                }
                1
            }
        };
        if h == 0 {
            return bad(format!(
                "{}: h = 0 inner steps per round; use h ≥ 1 (h = 1 syncs after every step)",
                self.algorithm.key()
            ));
        }
        if matches!(self.exchange, Exchange::Dgc(_))
            && matches!(
                self.algorithm,
                Algorithm::NoLoCo { .. }
                    | Algorithm::SingleMerge { .. }
                    | Algorithm::Periodic { .. }
            )
        {
            return bad(format!(
                "{}: the DGC exchange compresses pseudo-gradients through all-gather; use Dense or Bf16 here",
                self.algorithm.key()
            ));
        }
        if let Exchange::Dgc(c) = &self.exchange {
            c.validate()?;
        }
        Ok(())
    }
}

/// Everything needed to resume (serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalSgdState {
    /// The configuration.
    pub config: LocalSgdConfig,
    /// Tensor names and lengths, in order.
    pub layout: Vec<(String, usize)>,
    /// The global (outer) copy, flat in layer order.
    pub global: Vec<f32>,
    /// Outer momentum (empty without momentum).
    pub momentum: Vec<f32>,
    /// Inner steps reported so far.
    pub step: u64,
    /// Sync rounds completed.
    pub rounds: u64,
    /// EDiT's norm statistics.
    pub detector: Option<Detector>,
    /// DGC residuals, one per synced range.
    pub dgc: Vec<DgcState>,
    /// A-EDiT: clock reading (seconds) of the last sync.
    pub last_sync: f64,
}

/// What one [`LocalSgd::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Report {
    /// An exchange completed (or, EDiT, a layer-wise pass started) at this step.
    pub synced: bool,
    /// Rounds completed so far.
    pub rounds: u64,
    /// EDiT: workers excluded as anomalous in the pass started at this step.
    pub excluded: usize,
}

enum InFlight {
    F32(Work<Vec<f32>>),
    Bf16(Work<Vec<bf16>>),
    Ready(Vec<f32>),
}

struct Flight {
    due: u64,
    work: InFlight,
}

/// A layer-wise pass in progress (EDiT / A-EDiT).
struct Pass {
    next: usize,
    bufs: Vec<Option<Vec<f32>>>,
    flights: Vec<Option<InFlight>>,
}

/// One rank's local-SGD synchroniser. See the [module docs](self).
pub struct LocalSgd {
    st: LocalSgdState,
    /// Start offset of every tensor in the flat order, plus the total.
    offsets: Vec<usize>,
    /// Synced ranges (flat offsets): the whole model, the fragments, or the layers.
    ranges: Vec<(usize, usize)>,
    dgc: Vec<Dgc>,
    flights: Vec<Option<Flight>>,
    pass: Option<Pass>,
    group: Option<Box<dyn Communicator>>,
    t0: Instant,
}

fn layout_hash(layout: &[(String, usize)]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |b: u8| h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    for (name, len) in layout {
        name.bytes().for_each(&mut eat);
        eat(0xff);
        len.to_le_bytes().into_iter().for_each(&mut eat);
    }
    h
}

fn describe(layout_len: i64, total: i64, hash: i64) -> String {
    format!(
        "({layout_len} tensors, {total} elements, hash {:016x})",
        hash as u64
    )
}

/// A perfect matching of `0..world` drawn from `(seed, round)` — every rank computes the same one
/// without talking. Returns each rank's partner (`None` for the odd one out).
pub fn pairing(world: usize, seed: u64, round: u64) -> Vec<Option<usize>> {
    let mut rng = crate::sim::rng::Rng::new(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut p: Vec<usize> = (0..world).collect();
    for i in (1..world).rev() {
        let j = rng.below(i + 1);
        p.swap(i, j);
    }
    let mut partner = vec![None; world];
    for pair in p.chunks_exact(2) {
        partner[pair[0]] = Some(pair[1]);
        partner[pair[1]] = Some(pair[0]);
    }
    partner
}

fn tag(round: u64, k: u32) -> u32 {
    TAG_BASE | (((round as u32) & 0x3ffff) << 2) | (k & 3)
}

impl LocalSgd {
    /// Set up over `params` (the trainer's tensors, in forward order, named by `names`). Collective:
    /// checks that every rank has the same layout, then broadcasts rank 0's parameters into every
    /// rank's `params` so all replicas start equal; the global copy is that model.
    pub fn new<C: Communicator + ?Sized>(
        comm: &C,
        config: LocalSgdConfig,
        names: &[&str],
        params: &mut [&mut [f32]],
    ) -> Result<LocalSgd> {
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "local SGD: empty parameter list; hand over at least one tensor".into(),
            ));
        }
        if names.len() != params.len() {
            return Err(Error::LengthMismatch {
                what: "local SGD: one name per parameter tensor".into(),
                expected: params.len(),
                got: names.len(),
            });
        }
        config.validate(comm.world_size())?;
        let layout: Vec<(String, usize)> = names
            .iter()
            .zip(params.iter())
            .map(|(n, p)| (n.to_string(), p.len()))
            .collect();
        check_layouts(comm, &layout)?;
        for p in params.iter_mut() {
            comm.broadcast(&mut **p, 0)?;
        }
        let global: Vec<f32> = params.iter().flat_map(|p| p.iter().copied()).collect();
        if let Some(i) = outer::first_non_finite(&global) {
            return Err(Error::NonFinite {
                what: format!("local SGD: the initial parameters (flat index {i})"),
            });
        }
        let st = LocalSgdState {
            momentum: Vec::new(),
            step: 0,
            rounds: 0,
            detector: None,
            dgc: Vec::new(),
            last_sync: 0.0,
            global,
            layout,
            config,
        };
        Self::build(comm, st, true)
    }

    /// Resume from a checkpoint (collective: the layout is checked across ranks again).
    pub fn from_state<C: Communicator + ?Sized>(comm: &C, st: LocalSgdState) -> Result<LocalSgd> {
        st.config.validate(comm.world_size())?;
        let total: usize = st.layout.iter().map(|l| l.1).sum();
        if st.layout.is_empty() || st.global.len() != total {
            return Err(Error::LengthMismatch {
                what: "LocalSgdState::global (the layout's elements)".into(),
                expected: total,
                got: st.global.len(),
            });
        }
        if let Some(i) =
            outer::first_non_finite(&st.global).or_else(|| outer::first_non_finite(&st.momentum))
        {
            return Err(Error::NonFinite {
                what: format!("LocalSgdState (flat index {i})"),
            });
        }
        check_layouts(comm, &st.layout)?;
        Self::build(comm, st, false)
    }

    fn build<C: Communicator + ?Sized>(
        comm: &C,
        mut st: LocalSgdState,
        fresh: bool,
    ) -> Result<LocalSgd> {
        let mut offsets = vec![0];
        for (_, len) in &st.layout {
            offsets.push(offsets.last().copied().unwrap_or(0) + len);
        }
        let n = *offsets.last().unwrap_or(&0);
        let ranges: Vec<(usize, usize)> = match &st.config.algorithm {
            Algorithm::Streaming { fragments, .. } => (0..*fragments)
                .map(|f| (f * n / fragments, (f + 1) * n / fragments))
                .collect(),
            Algorithm::Edit { .. } | Algorithm::AEdit { .. } => {
                offsets.windows(2).map(|w| (w[0], w[1])).collect()
            }
            _ => vec![(0, n)],
        };
        let (outer, penalty) = match &st.config.algorithm {
            Algorithm::DiLoCo { outer, .. } | Algorithm::Streaming { outer, .. } => {
                (Some(*outer), None)
            }
            Algorithm::Edit { outer, penalty, .. } | Algorithm::AEdit { outer, penalty, .. } => {
                (Some(*outer), Some(*penalty))
            }
            Algorithm::NoLoCo { .. } => (Some(Outer::nesterov(1.0, 1.0)), None),
            _ => (None, None),
        };
        let world = comm.world_size();
        if fresh {
            if outer.is_some_and(|o| o.has_momentum()) {
                st.momentum = vec![0.0; n];
            }
            if penalty.is_some() {
                st.detector = Some(Detector::new(world));
            }
        } else if outer.is_some_and(|o| o.has_momentum()) && st.momentum.len() != n {
            return Err(Error::LengthMismatch {
                what: "LocalSgdState::momentum".into(),
                expected: n,
                got: st.momentum.len(),
            });
        }
        let dgc = match &st.config.exchange {
            Exchange::Dgc(cfg) => {
                if fresh {
                    ranges
                        .iter()
                        .map(|&(a, b)| Dgc::new(b - a, cfg.clone()))
                        .collect::<Result<Vec<_>>>()?
                } else {
                    if st.dgc.len() != ranges.len() {
                        return Err(Error::LengthMismatch {
                            what: "LocalSgdState::dgc (one per synced range)".into(),
                            expected: ranges.len(),
                            got: st.dgc.len(),
                        });
                    }
                    st.dgc
                        .drain(..)
                        .map(Dgc::from_state)
                        .collect::<Result<Vec<_>>>()?
                }
            }
            _ => Vec::new(),
        };
        let group = match &st.config.algorithm {
            Algorithm::Periodic {
                hierarchy: Some(hy),
                ..
            } => comm.split(
                Some((comm.rank() / hy.group_size) as u32),
                comm.rank() as i32,
            )?,
            _ => None,
        };
        Ok(LocalSgd {
            flights: (0..ranges.len()).map(|_| None).collect(),
            st,
            offsets,
            ranges,
            dgc,
            pass: None,
            group,
            t0: Instant::now(),
        })
    }

    /// The global copy (flat, layer order).
    pub fn global(&self) -> &[f32] {
        &self.st.global
    }
    /// Sync rounds completed.
    pub fn rounds(&self) -> u64 {
        self.st.rounds
    }
    /// Inner steps reported.
    pub fn steps(&self) -> u64 {
        self.st.step
    }
    /// The configuration.
    pub fn config(&self) -> &LocalSgdConfig {
        &self.st.config
    }
    /// The traffic of the hierarchical form's group communicator (`None` without one).
    pub fn group_stats(&self) -> Option<Stats> {
        self.group.as_ref().map(|g| g.stats())
    }
    /// The state to checkpoint; refused while an exchange is in flight.
    pub fn state(&self) -> Result<LocalSgdState> {
        if self.pass.is_some() || self.flights.iter().any(|f| f.is_some()) {
            return Err(Error::InvalidArgument(
                "local SGD: an exchange is in flight; checkpoint after it completed (after finish(), or between syncs)".into(),
            ));
        }
        let mut st = self.st.clone();
        st.dgc = self.dgc.iter().map(|d| d.state().clone()).collect();
        Ok(st)
    }

    /// True while synchronous warm-up steps remain ([`Algorithm::Periodic`]'s `warmup_steps`): the
    /// trainer should average its gradients with [`LocalSgd::allreduce_grads`] before its step.
    pub fn in_warmup(&self) -> bool {
        matches!(self.st.config.algorithm, Algorithm::Periodic { warmup_steps, .. } if self.st.step < warmup_steps)
    }

    /// Average gradients across ranks through the bucketer (25 MiB buckets, launched last layer
    /// first as a backward pass produces them): the synchronous warm-up's data parallelism.
    pub fn allreduce_grads<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        grads: &mut [&mut [f32]],
    ) -> Result<()> {
        self.check_params(grads)?;
        let mut b = crate::bucket::Bucketer::with_default_size(comm, ReduceOp::Avg);
        for (id, g) in grads.iter().enumerate().rev() {
            b.push(id, g)?;
        }
        b.finish(|id, reduced| grads[id].copy_from_slice(reduced))
    }

    fn check_params(&self, params: &[&mut [f32]]) -> Result<()> {
        if params.len() != self.st.layout.len() {
            return Err(Error::LengthMismatch {
                what: "local SGD: parameter tensors (as at construction)".into(),
                expected: self.st.layout.len(),
                got: params.len(),
            });
        }
        for (p, (name, len)) in params.iter().zip(&self.st.layout) {
            if p.len() != *len {
                return Err(Error::LengthMismatch {
                    what: format!("local SGD: tensor {name:?}"),
                    expected: *len,
                    got: p.len(),
                });
            }
        }
        Ok(())
    }

    /// The (tensor, start, end, flat offset) pieces of the flat range `[a, b)`.
    fn pieces(&self, a: usize, b: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for (l, w) in self.offsets.windows(2).enumerate() {
            let (lo, hi) = (w[0].max(a), w[1].min(b));
            if lo < hi {
                out.push((l, lo - w[0], hi - w[0], lo));
            }
        }
        out
    }

    /// `Δ = φ − θ` over `[a, b)` into a buffer with a trailing flag slot (1.0: non-finite here).
    fn delta(&self, params: &[&mut [f32]], a: usize, b: usize, scale: f32) -> (Vec<f32>, bool) {
        let mut buf = vec![0.0f32; b - a + 1];
        for (l, lo, hi, off) in self.pieces(a, b) {
            outer::pseudo_gradient(
                &self.st.global[off..off + hi - lo],
                &params[l][lo..hi],
                &mut buf[off - a..off - a + hi - lo],
            );
        }
        let bad = outer::first_non_finite(&buf[..b - a]).is_some();
        if bad {
            buf.fill(0.0);
            buf[b - a] = 1.0;
        } else if scale != 1.0 {
            buf[..b - a].iter_mut().for_each(|x| *x *= scale);
        }
        (buf, bad)
    }

    /// The models over `[a, b)` with a flag slot.
    fn model(&self, params: &[&mut [f32]], a: usize, b: usize) -> (Vec<f32>, bool) {
        let mut buf = Vec::with_capacity(b - a + 1);
        for (l, lo, hi, _) in self.pieces(a, b) {
            buf.extend_from_slice(&params[l][lo..hi]);
        }
        let bad = outer::first_non_finite(&buf).is_some();
        buf.push(if bad { 1.0 } else { 0.0 });
        if bad {
            buf[..b - a].fill(0.0);
        }
        (buf, bad)
    }

    fn start<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        range: usize,
        mut buf: Vec<f32>,
    ) -> Result<InFlight> {
        Ok(match &self.st.config.exchange {
            Exchange::Dense => InFlight::F32(comm.iall_reduce(buf, ReduceOp::Avg)?),
            Exchange::Bf16 => {
                let h: Vec<bf16> = buf.iter().map(|&x| bf16::from_f32(x)).collect();
                InFlight::Bf16(comm.iall_reduce(h, ReduceOp::Avg)?)
            }
            Exchange::Dgc(_) => {
                let n = buf.len() - 1;
                let mut flag = [buf[n]];
                comm.all_reduce(&mut flag, ReduceOp::Max)?;
                if flag[0] > 0.0 {
                    buf[n] = 1.0;
                } else {
                    let epoch = self.st.rounds as f64;
                    self.dgc[range].step(comm, &mut buf[..n], epoch)?;
                }
                InFlight::Ready(buf)
            }
        })
    }

    fn finish_flight(w: InFlight) -> Result<Vec<f32>> {
        match w {
            InFlight::F32(w) => w.wait(),
            InFlight::Bf16(w) => Ok(w.wait()?.into_iter().map(f32::from).collect()),
            InFlight::Ready(v) => Ok(v),
        }
    }

    /// Check an exchanged buffer: the flag, then the values.
    fn checked(buf: &[f32], bad_here: bool, what: &str, rank: usize) -> Result<()> {
        let n = buf.len() - 1;
        if buf[n] != 0.0 {
            return Err(Error::NonFinite {
                what: if bad_here {
                    format!("local SGD: rank {rank}'s {what}")
                } else {
                    format!("local SGD: another rank's {what} (reported through the exchange)")
                },
            });
        }
        if let Some(i) = outer::first_non_finite(&buf[..n]) {
            return Err(Error::NonFinite {
                what: format!("local SGD: the averaged {what} (index {i}: overflow)"),
            });
        }
        Ok(())
    }

    /// Apply the averaged Δ of `[a, b)` with `outer` and write back the local copy (mixing `alpha`).
    fn apply(
        &mut self,
        params: &mut [&mut [f32]],
        a: usize,
        b: usize,
        delta: &[f32],
        outer: Outer,
        alpha: f32,
    ) {
        for (l, lo, hi, off) in self.pieces(a, b) {
            let len = hi - lo;
            let mom: &mut [f32] = if self.st.momentum.is_empty() {
                &mut []
            } else {
                &mut self.st.momentum[off..off + len]
            };
            outer::apply(
                &outer,
                alpha,
                &delta[off - a..off - a + len],
                &mut self.st.global[off..off + len],
                mom,
                &mut params[l][lo..hi],
            );
        }
    }

    /// Report one inner step; syncs when the algorithm says so. Every rank calls it after every
    /// inner step (the same number of times).
    pub fn step<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut [&mut [f32]],
    ) -> Result<Report> {
        self.check_params(params)?;
        if let Some(p) = &self.pass {
            return Err(Error::OutOfOrder {
                what: "EDiT: step() while a layer-wise sync is pending; call layer(i) for every layer in forward order first".into(),
                expected: p.next,
                got: self.offsets.len() - 1,
            });
        }
        let s = self.st.step + 1;
        let algo = self.st.config.algorithm.clone();
        let mut report = Report::default();
        match algo {
            Algorithm::Periodic {
                h,
                warmup_steps,
                hierarchy,
            } => {
                if s <= warmup_steps {
                    // synchronous warm-up: replicas stay equal; the global copy follows
                    if s == warmup_steps {
                        self.copy_global(params);
                    }
                } else {
                    let t = s - warmup_steps;
                    if t % h == 0 {
                        self.average_models(comm, params, false)?;
                        report.synced = true;
                    } else if let Some(hy) = hierarchy {
                        if t % hy.h_group == 0 {
                            self.average_models(comm, params, true)?;
                        }
                    }
                }
            }
            Algorithm::DiLoCo { h, outer } => {
                if s % h == 0 {
                    self.sync_blocking(comm, params, outer)?;
                    report.synced = true;
                }
            }
            Algorithm::Streaming {
                h,
                fragments,
                delay,
                mixing,
                outer,
            } => {
                // apply what is due first (the fragment's exchange ran during the last τ steps)
                for f in 0..fragments {
                    if self.flights[f].as_ref().is_some_and(|fl| fl.due <= s) {
                        self.complete_fragment(params, f, outer, mixing, comm.rank())?;
                        report.synced = true;
                    }
                }
                for f in 0..fragments {
                    let offset = f as u64 * h / fragments as u64;
                    if s >= h && s % h == offset {
                        let (a, b) = self.ranges[f];
                        let (buf, _) = self.delta(params, a, b, 1.0);
                        let work = self.start(comm, f, buf)?;
                        self.flights[f] = Some(Flight {
                            due: s + delay,
                            work,
                        });
                        if delay == 0 {
                            self.complete_fragment(params, f, outer, mixing, comm.rank())?;
                            report.synced = true;
                        }
                    }
                }
            }
            Algorithm::Edit { h, penalty, .. } => {
                if s % h == 0 {
                    report.excluded = self.start_pass(comm, params, &penalty)?;
                    report.synced = true;
                }
            }
            Algorithm::AEdit {
                interval,
                time,
                penalty,
                ..
            } => {
                let now = self.now(comm, time);
                // every rank must agree that this is a sync step: the all-reduce of the "due" flag
                // would cost a round trip per step, so the decision is local and collective calls
                // match because every rank's clock crosses the same boundaries (see docs)
                if now - self.st.last_sync >= interval {
                    report.excluded = self.start_pass(comm, params, &penalty)?;
                    report.synced = true;
                }
            }
            Algorithm::NoLoCo {
                h,
                outer_lr,
                momentum,
                gamma,
            } => {
                if s % h == 0 {
                    self.noloco(comm, params, outer_lr, momentum, gamma)?;
                    report.synced = true;
                }
            }
            Algorithm::SingleMerge { h, topology } => {
                if s % h == 0 && topology != Topology::None {
                    self.gossip(comm, params, topology)?;
                    report.synced = true;
                }
            }
        }
        self.st.step = s;
        report.rounds = self.st.rounds;
        Ok(report)
    }

    fn now<C: Communicator + ?Sized>(&self, comm: &C, time: TimeSource) -> f64 {
        match (time, comm.virtual_time()) {
            (TimeSource::Virtual, Some(t)) => t.as_secs_f64(),
            _ => self.t0.elapsed().as_secs_f64(),
        }
    }

    fn copy_global(&mut self, params: &[&mut [f32]]) {
        for (l, p) in params.iter().enumerate() {
            self.st.global[self.offsets[l]..self.offsets[l + 1]].copy_from_slice(p);
        }
    }

    fn set_all(&mut self, params: &mut [&mut [f32]], flat: &[f32]) {
        for (l, p) in params.iter_mut().enumerate() {
            let r = self.offsets[l]..self.offsets[l + 1];
            p.copy_from_slice(&flat[r.clone()]);
            self.st.global[r].copy_from_slice(&flat[self.offsets[l]..self.offsets[l + 1]]);
        }
    }

    fn average_models<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut [&mut [f32]],
        in_group: bool,
    ) -> Result<()> {
        let n = self.st.global.len();
        let (buf, bad) = self.model(params, 0, n);
        let group = if in_group { self.group.take() } else { None };
        let r = match &group {
            Some(g) => self.start(&**g, 0, buf).and_then(Self::finish_flight),
            None => self.start(comm, 0, buf).and_then(Self::finish_flight),
        };
        if group.is_some() {
            self.group = group;
        }
        let buf = r?;
        Self::checked(&buf, bad, "model", comm.rank())?;
        self.set_all(params, &buf[..n]);
        if !in_group {
            self.st.rounds += 1;
        }
        Ok(())
    }

    fn sync_blocking<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut [&mut [f32]],
        outer: Outer,
    ) -> Result<()> {
        let n = self.st.global.len();
        let (buf, bad) = self.delta(params, 0, n, 1.0);
        let buf = Self::finish_flight(self.start(comm, 0, buf)?)?;
        Self::checked(&buf, bad, "pseudo-gradient", comm.rank())?;
        self.apply(params, 0, n, &buf[..n], outer, 0.0);
        self.st.rounds += 1;
        Ok(())
    }

    fn complete_fragment(
        &mut self,
        params: &mut [&mut [f32]],
        f: usize,
        outer: Outer,
        mixing: f32,
        rank: usize,
    ) -> Result<()> {
        let Some(fl) = self.flights[f].take() else {
            return Ok(());
        };
        let buf = Self::finish_flight(fl.work)?;
        let (a, b) = self.ranges[f];
        let bad_here = false; // the flag says whether any rank was bad
        Self::checked(&buf, bad_here, "pseudo-gradient fragment", rank)?;
        self.apply(params, a, b, &buf[..b - a], outer, mixing);
        if f + 1 == self.ranges.len() {
            self.st.rounds += 1;
        }
        Ok(())
    }

    /// Start an EDiT pass: the penalty's norm exchange (tiny, blocking), the weights, then layer 0's
    /// exchange (non-blocking). Returns the number of workers excluded.
    fn start_pass<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &[&mut [f32]],
        penalty: &Penalty,
    ) -> Result<usize> {
        let world = comm.world_size();
        let layers = self.offsets.len() - 1;
        let mut bufs = Vec::with_capacity(layers);
        let mut bad = false;
        let mut norm2 = 0.0;
        for l in 0..layers {
            let (b, bd) = self.delta(params, self.offsets[l], self.offsets[l + 1], 1.0);
            bad |= bd;
            norm2 += outer::norm2(&b[..b.len() - 1]);
            bufs.push(b);
        }
        let mine = [norm2.sqrt(), if bad { 1.0 } else { 0.0 }];
        let mut all = vec![0.0f64; 2 * world];
        comm.all_gather(&mine, &mut all)?;
        if let Some(r) = (0..world).find(|&r| all[2 * r + 1] != 0.0 || !all[2 * r].is_finite()) {
            return Err(Error::NonFinite {
                what: format!("local SGD (EDiT): rank {r}'s pseudo-gradient"),
            });
        }
        let norms: Vec<f64> = (0..world).map(|r| all[2 * r]).collect();
        let mut det = self
            .st
            .detector
            .clone()
            .unwrap_or_else(|| Detector::new(world));
        let flags = if penalty.skip_anomalies {
            det.judge(penalty, &norms)
        } else {
            vec![false; world]
        };
        let w = penalty::weights(penalty, &norms, &flags);
        let scale = (w[comm.rank()] * world as f64) as f32;
        if scale != 1.0 {
            for b in &mut bufs {
                let n = b.len() - 1;
                b[..n].iter_mut().for_each(|x| *x *= scale);
            }
        }
        let mut pass = Pass {
            next: 0,
            bufs: bufs.into_iter().map(Some).collect(),
            flights: (0..layers).map(|_| None).collect(),
        };
        let first = pass.bufs[0].take().unwrap_or_default();
        pass.flights[0] = Some(self.start(comm, 0, first)?);
        self.st.detector = Some(det);
        self.pass = Some(pass);
        Ok(flags.iter().filter(|&&b| b).count())
    }

    /// EDiT / A-EDiT: call before using tensor `i` in the forward pass, in order `0, 1, …`. When a
    /// layer-wise sync is pending it starts tensor `i + 1`'s exchange (overlapping tensor `i`'s
    /// compute), completes tensor `i`'s and writes the synced values into `param`; otherwise it does
    /// nothing (so a trainer can call it every forward pass, and for every algorithm).
    pub fn layer<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        i: usize,
        param: &mut [f32],
    ) -> Result<()> {
        let Some(next) = self.pass.as_ref().map(|p| p.next) else {
            return Ok(());
        };
        let layers = self.offsets.len() - 1;
        if i != next {
            return Err(Error::OutOfOrder {
                what:
                    "EDiT: layers must be synced in forward order (layer(i) before using tensor i)"
                        .into(),
                expected: next,
                got: i,
            });
        }
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        if param.len() != b - a {
            return Err(Error::LengthMismatch {
                what: format!("local SGD: tensor {:?}", self.st.layout[i].0),
                expected: b - a,
                got: param.len(),
            });
        }
        if i + 1 < layers {
            let buf = self
                .pass
                .as_mut()
                .and_then(|p| p.bufs[i + 1].take())
                .unwrap_or_default();
            let w = self.start(comm, i + 1, buf)?;
            if let Some(p) = self.pass.as_mut() {
                p.flights[i + 1] = Some(w);
            }
        }
        let w = self.pass.as_mut().and_then(|p| p.flights[i].take());
        let Some(w) = w else {
            return Err(Error::InvalidArgument(
                "internal: EDiT layer exchange missing".into(),
            ));
        };
        let mut buf = match Self::finish_flight(w) {
            Ok(b) => b,
            Err(e) => {
                self.pass = None;
                return Err(e);
            }
        };
        if let Err(e) = Self::checked(&buf, false, "pseudo-gradient", comm.rank()) {
            self.pass = None;
            return Err(e);
        }
        let (outer, penalty) = match &self.st.config.algorithm {
            Algorithm::Edit { outer, penalty, .. } | Algorithm::AEdit { outer, penalty, .. } => {
                (*outer, *penalty)
            }
            _ => (Outer::DILOCO, Penalty::off()),
        };
        let n = b - a;
        if let Some(c) = penalty.clip {
            // the whole-model bound c, shared out by size: Σ over layers of the bounds² = c²
            let bound = c * (n as f64 / self.st.global.len() as f64).sqrt();
            let norm = outer::norm2(&buf[..n]).sqrt();
            if norm > bound {
                let s = (bound / norm) as f32;
                buf[..n].iter_mut().for_each(|x| *x *= s);
            }
        }
        let mom: &mut [f32] = if self.st.momentum.is_empty() {
            &mut []
        } else {
            &mut self.st.momentum[a..b]
        };
        outer::apply(
            &outer,
            0.0,
            &buf[..n],
            &mut self.st.global[a..b],
            mom,
            param,
        );
        let done = match self.pass.as_mut() {
            Some(p) => {
                p.next += 1;
                p.next == layers
            }
            None => false,
        };
        if done {
            self.pass = None;
            self.st.rounds += 1;
            if let Algorithm::AEdit { time, .. } = self.st.config.algorithm {
                self.st.last_sync = self.now(comm, time);
            }
        }
        Ok(())
    }

    fn noloco<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut [&mut [f32]],
        beta: f32,
        alpha: f32,
        gamma: f32,
    ) -> Result<()> {
        let n = self.st.global.len();
        let (delta, bad) = self.delta(params, 0, n, 1.0);
        // message: φ, Δ, flag
        let mut msg = Vec::with_capacity(2 * n + 1);
        msg.extend_from_slice(&self.st.global);
        msg.extend_from_slice(&delta[..n]);
        msg.push(delta[n]);
        let round = self.st.rounds;
        let partner = pairing(comm.world_size(), self.st.config.seed, round)[comm.rank()];
        let (mean_phi, mean_delta) = match partner {
            None => (self.st.global.clone(), delta[..n].to_vec()),
            Some(p) => {
                let theirs = self.swap(comm, p, &msg, tag(round, 0))?;
                if theirs[2 * n] != 0.0 || bad {
                    return Err(Error::NonFinite {
                        what: format!(
                            "local SGD (NoLoCo): the pseudo-gradient of rank {}",
                            if bad { comm.rank() } else { p }
                        ),
                    });
                }
                let avg = |a: &[f32], b: &[f32]| -> Vec<f32> {
                    a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect()
                };
                (
                    avg(&self.st.global, &theirs[..n]),
                    avg(&delta[..n], &theirs[n..2 * n]),
                )
            }
        };
        if bad {
            return Err(Error::NonFinite {
                what: format!(
                    "local SGD (NoLoCo): the pseudo-gradient of rank {}",
                    comm.rank()
                ),
            });
        }
        let mut mom = std::mem::take(&mut self.st.momentum);
        let mut global = std::mem::take(&mut self.st.global);
        let mut flat_local = global.clone();
        outer::noloco(
            alpha,
            beta,
            gamma,
            &mean_delta,
            &mean_phi,
            &mut global,
            &mut mom,
            &mut flat_local,
        );
        self.st.momentum = mom;
        self.st.global = global;
        self.set_all(params, &flat_local);
        self.st.rounds += 1;
        Ok(())
    }

    /// Send `msg` to `peer` and receive its message of the same length (non-blocking send first, so
    /// two partners never wait on each other's blocking send).
    fn swap<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        peer: usize,
        msg: &[f32],
        tag: u32,
    ) -> Result<Vec<f32>> {
        match &self.st.config.exchange {
            Exchange::Bf16 => {
                let out: Vec<bf16> = msg.iter().map(|&x| bf16::from_f32(x)).collect();
                let w = comm.isend(out, peer, tag)?;
                let mut back = vec![bf16::ZERO; msg.len()];
                comm.recv(&mut back, peer, tag)?;
                w.wait()?;
                Ok(back.into_iter().map(f32::from).collect())
            }
            _ => {
                let w = comm.isend(msg.to_vec(), peer, tag)?;
                let mut back = vec![0.0f32; msg.len()];
                comm.recv(&mut back, peer, tag)?;
                w.wait()?;
                Ok(back)
            }
        }
    }

    fn gossip<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut [&mut [f32]],
        topology: Topology,
    ) -> Result<()> {
        let (world, rank) = (comm.world_size(), comm.rank());
        let n = self.st.global.len();
        let (mine, bad) = self.model(params, 0, n);
        let round = self.st.rounds;
        let peers: Vec<usize> = match topology {
            Topology::Ring if world > 2 => vec![(rank + world - 1) % world, (rank + 1) % world],
            Topology::Ring if world == 2 => vec![1 - rank],
            Topology::Random => pairing(world, self.st.config.seed, round)[rank]
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        let mut sum: Vec<f32> = mine[..n].to_vec();
        let mut any_bad = bad;
        // ring: send both ways first, then receive both (tags say which direction)
        let mut sends = Vec::new();
        for (k, &p) in peers.iter().enumerate() {
            let t = if topology == Topology::Ring && world > 2 {
                tag(round, if k == 0 { 1 } else { 2 })
            } else {
                tag(round, 0)
            };
            sends.push(comm.isend(mine.clone(), p, t)?);
        }
        for (k, &p) in peers.iter().enumerate() {
            // what the left neighbour sent rightwards (tag 2) arrives from the left, and vice versa
            let t = if topology == Topology::Ring && world > 2 {
                tag(round, if k == 0 { 2 } else { 1 })
            } else {
                tag(round, 0)
            };
            let mut back = vec![0.0f32; n + 1];
            comm.recv(&mut back, p, t)?;
            any_bad |= back[n] != 0.0;
            sum.iter_mut().zip(&back[..n]).for_each(|(s, x)| *s += x);
        }
        for w in sends {
            w.wait()?;
        }
        if any_bad {
            return Err(Error::NonFinite {
                what: "local SGD (gossip): a model in this neighbourhood".into(),
            });
        }
        let k = (peers.len() + 1) as f32;
        sum.iter_mut().for_each(|s| *s /= k);
        self.set_all(params, &sum);
        self.st.rounds += 1;
        Ok(())
    }

    /// End of training: completes exchanges still in flight (Streaming DiLoCo's last fragments) and,
    /// for [`Algorithm::SingleMerge`], performs the single global merge (all-reduce average of the
    /// models). Collective.
    pub fn finish<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut [&mut [f32]],
    ) -> Result<()> {
        self.check_params(params)?;
        if let Some(p) = &self.pass {
            return Err(Error::OutOfOrder {
                what: "EDiT: finish() while a layer-wise sync is pending; call layer(i) for the remaining layers".into(),
                expected: p.next,
                got: self.offsets.len() - 1,
            });
        }
        if let Algorithm::Streaming { outer, mixing, .. } = self.st.config.algorithm {
            for f in 0..self.flights.len() {
                self.complete_fragment(params, f, outer, mixing, comm.rank())?;
            }
        }
        if let Algorithm::SingleMerge { .. } = self.st.config.algorithm {
            self.average_models(comm, params, false)?;
        }
        Ok(())
    }
}

fn check_layouts<C: Communicator + ?Sized>(comm: &C, layout: &[(String, usize)]) -> Result<()> {
    let total: usize = layout.iter().map(|l| l.1).sum();
    let mine = [
        layout.len() as i64,
        total as i64,
        layout_hash(layout) as i64,
    ];
    let mut all = vec![0i64; 3 * comm.world_size()];
    comm.all_gather(&mine, &mut all)?;
    for (r, theirs) in all.chunks(3).enumerate() {
        if theirs != mine {
            return Err(Error::LayoutMismatch {
                rank: comm.rank(),
                mine: describe(mine[0], mine[1], mine[2]),
                other_rank: r,
                theirs: describe(theirs[0], theirs[1], theirs[2]),
            });
        }
    }
    Ok(())
}

/// Split a flat parameter vector into tensors of `lens` (the trainer's layers), for the API's
/// `&mut [&mut [f32]]`.
pub fn split_mut<'a>(flat: &'a mut [f32], lens: &[usize]) -> Result<Vec<&'a mut [f32]>> {
    let total: usize = lens.iter().sum();
    if total != flat.len() {
        return Err(Error::LengthMismatch {
            what: "split_mut: the tensors' lengths must sum to the flat vector's".into(),
            expected: total,
            got: flat.len(),
        });
    }
    let mut out = Vec::with_capacity(lens.len());
    let mut rest = flat;
    for &l in lens {
        let (a, b) = rest.split_at_mut(l);
        out.push(a);
        rest = b;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_is_a_matching_and_varies_by_round() {
        for world in 1..9 {
            for round in 0..5 {
                let p = pairing(world, 7, round);
                for (r, q) in p.iter().enumerate() {
                    if let Some(q) = q {
                        assert_ne!(*q, r);
                        assert_eq!(p[*q], Some(r));
                    }
                }
                assert_eq!(p.iter().filter(|q| q.is_none()).count(), world % 2);
            }
        }
        assert!((0..8).any(|r| pairing(8, 7, r) != pairing(8, 7, 0)));
    }

    #[test]
    fn tags_stay_in_their_band() {
        assert_eq!(tag(0, 0), TAG_BASE);
        assert!(tag(u64::MAX, 3) >= TAG_BASE);
    }
}
