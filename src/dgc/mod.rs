//! Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, *Deep Gradient Compression: Reducing the
//! Communication Bandwidth for Distributed Training*, ICLR 2018).
//!
//! Each rank sends only the ~0.1% largest entries of its accumulated gradient as `(index, value)`
//! pairs; everything else stays in a per-parameter residual and is added to later steps, so nothing
//! is lost, only delayed. Four techniques keep accuracy at 99.9% sparsity, each switchable in
//! [`DgcConfig`] so its effect can be measured:
//!
//! * **momentum correction** — accumulate the velocity, not the gradient: `u ← m·u + g`,
//!   `v ← v + u`, sparsify `v`. The returned update then already contains the momentum, so the
//!   optimizer must apply it with **plain SGD**: `w ← w − lr · update`. With it off, `v ← v + g` and
//!   the optimizer applies its own momentum to the returned sparse gradient.
//! * **local gradient clipping** — scale `g` so that `‖g‖ ≤ clip_norm / √N` before accumulating.
//! * **momentum factor masking** — zero `u` where values were sent (`v` is always cleared there: it
//!   was sent), so stale momentum does not keep pushing a parameter that was just updated.
//! * **warm-up** — the density falls exponentially over the first epochs (by default 25% → 6.25% →
//!   1.5625% → 0.4% → then [`DgcConfig::final_density`], 0.1%).
//!
//! The top-k threshold is estimated from a random sample (`sample_fraction` of the values, 0.1–1%,
//! drawn as runs of [`select::SAMPLE_RUN`] consecutive values at hashed positions, so that the GPU
//! reads one memory sector per run; its k-th largest rounded down in the last 10 bits,
//! [`select::truncated_kth`]) and corrected as the paper's code does: more than `1.3·k` pass → raise it and select again; between
//! `k` and `1.3·k` → keep the top k of those; fewer than `0.8·k` → lower it and select again.
//! [`Selection::ExactTopK`] is there for comparison.
//!
//! # Workflow
//!
//! ```
//! use ferroccl::dgc::{Dgc, DgcConfig};
//! use ferroccl::prelude::*;
//! let updates = ferroccl::local::run(2, |comm| {
//!     let mut dgc = Dgc::new(8, DgcConfig::default().final_density(0.25).warmup(vec![]))?;
//!     let mut grad = vec![0.0f32; 8];
//!     grad[comm.rank()] = 4.0; // rank 0: index 0, rank 1: index 1
//!     grad[7] = 1.0;
//!     let stats = dgc.step(comm, &mut grad, 0.0)?; // grad now holds the averaged sparse update
//!     assert_eq!(stats.selected, 2);
//!     // with momentum correction on (the default) apply it as plain SGD: w -= lr * grad
//!     Ok(grad)
//! }).unwrap();
//! assert_eq!(updates[0], vec![2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
//! ```
//!
//! One call per step per rank, with the whole (flattened) gradient; every rank must pass the same
//! `epoch` (it sets the density, so every rank sends the same `k`). The exchange is an all-gather of
//! the encoded messages ([`Exchange`]), decoded by scatter-add in rank order, so every rank gets the
//! bit-identical update and replicas stay identical. [`StepStats`] reports the bytes and the
//! compression ratio. [`Dgc::state`]/[`Dgc::from_state`] checkpoint the residuals (serde).
//!
//! Composition: [`Dgc::step`] only needs a [`Communicator`], so it works on every backend and on
//! sub-communicators from `split`, and can compress any vector — e.g. local SGD's pseudo-gradients.
//! Parameter groups can use one `Dgc` each (the paper selects per layer; one flat vector is also fine).
//!
//! # Bad input
//!
//! A NaN or ±Inf in the gradient (or a gradient whose squared norm overflows) is detected *before*
//! the state is touched; so is a finite gradient whose step *produces* a non-finite value (the
//! accumulated momentum or velocity overflows with clipping off, or a value rounds to ±Inf in bf16):
//! the step's output is checked and the state put back as it was. [`NonFinite::Error`] (the default) returns [`Error::InvalidArgument`]
//! naming the first bad index; [`NonFinite::SkipStep`] makes the step a no-op on every rank (the ranks
//! agree through the exchange: a rank that skips sends an empty message with a skip flag, and the
//! returned update is all zeros everywhere). Either way residuals and velocities are unchanged, so a
//! bad batch never poisons later steps. With `Error`, the other ranks must not be left waiting: the
//! failing rank should abort the job (as after any error in a collective program).
//!
//! # Device memory
//!
//! The compression step is split into kernels (`cuda/dgc.cu`), each with its CPU twin in [`select`]
//! and the same semantics; see that module for the mapping. The host path here runs the twins.
//! With the feature `cuda`, [`gpu::DeviceDgc`] is the same step for a gradient in device memory
//! (`CudaSlice<f32>`, state on the device, any communicator); see [`gpu`].

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hook;
pub use hook::DgcHook;
pub mod select;
pub mod wire;

use crate::{Communicator, CommunicatorExt, Error, Result};
use serde::{Deserialize, Serialize};

/// The source of the fused kernels (`cuda/dgc.cu`), compiled with NVRTC by the CUDA path; the
/// file is registered as [`crate::kernels::registry::DGC`].
pub const DGC_CU: &str = crate::kernels::registry::DGC.source;

/// How the top-k threshold is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selection {
    /// Estimate it from a random sample and correct it (the paper's method).
    Sampled,
    /// The exact k-th largest magnitude (a full selection over all values).
    ExactTopK,
}

/// How the sparse messages are exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exchange {
    /// All-gather exactly `k` pairs per rank (padded); U32 indices only.
    FixedK,
    /// All-gather the message lengths, then the messages padded to the longest.
    CountsThenGather,
}

/// How indices are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexCoding {
    /// 4 bytes each.
    U32,
    /// Differences of ascending indices, LEB128 (1–2 bytes each at 0.1% density). Needs
    /// [`Exchange::CountsThenGather`].
    DeltaVarint,
}

/// How values are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueFormat {
    /// 4 bytes each, exact.
    F32,
    /// 2 bytes each; the rounding error stays in the residual (error feedback).
    Bf16,
}

/// What to do with a NaN/Inf gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NonFinite {
    /// Return an error; the state is unchanged.
    Error,
    /// Skip the step on every rank (zero update); the state is unchanged.
    SkipStep,
}

/// Configuration of [`Dgc`]: every technique is a switch. Builder methods consume and return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DgcConfig {
    /// Sparsify with local accumulation (off: a plain dense all-reduce Avg, the baseline).
    pub sparsify: bool,
    /// Momentum correction (see the module docs for what the optimizer must do).
    pub momentum_correction: bool,
    /// Local gradient clipping to `clip_norm / √N`.
    pub clipping: bool,
    /// Momentum factor masking.
    pub momentum_masking: bool,
    /// Warm-up: use [`DgcConfig::warmup`]'s densities during the first epochs.
    pub warmup_enabled: bool,
    /// Momentum factor `m` (used by momentum correction).
    pub momentum: f32,
    /// Density after warm-up (0.001 = 99.9% sparsity).
    pub final_density: f64,
    /// Density of each warm-up epoch: epoch `e` (`0 ≤ e < len`) uses `warmup[floor(e)]`.
    pub warmup: Vec<f64>,
    /// Global gradient-norm bound for local clipping (each rank clips to `clip_norm / √N`).
    pub clip_norm: f64,
    /// Fraction of the values sampled to estimate the threshold (0.001–0.01 in the paper).
    pub sample_fraction: f64,
    /// Sampled or exact threshold.
    pub selection: Selection,
    /// Exchange pattern.
    pub exchange: Exchange,
    /// Index coding.
    pub index_coding: IndexCoding,
    /// Value coding.
    pub values: ValueFormat,
    /// NaN/Inf policy.
    pub non_finite: NonFinite,
    /// Seed of the threshold samples.
    pub seed: u64,
    /// Threshold correction: raise by this factor when more than `upper·k` pass.
    pub upper_bound: f64,
    /// Threshold correction: lower by this factor when fewer than `lower·k` pass.
    pub lower_bound: f64,
    /// At most this many threshold corrections per step.
    pub max_adapt: u32,
}

impl Default for DgcConfig {
    fn default() -> Self {
        DgcConfig {
            sparsify: true,
            momentum_correction: true,
            clipping: true,
            momentum_masking: true,
            warmup_enabled: true,
            momentum: 0.9,
            final_density: 0.001,
            warmup: vec![0.25, 0.0625, 0.015625, 0.004],
            clip_norm: 10.0,
            sample_fraction: 0.01,
            selection: Selection::Sampled,
            exchange: Exchange::FixedK,
            index_coding: IndexCoding::U32,
            values: ValueFormat::F32,
            non_finite: NonFinite::Error,
            seed: 0x5eed,
            upper_bound: 1.3,
            lower_bound: 0.8,
            max_adapt: 8,
        }
    }
}

macro_rules! setter {
    ($($(#[$m:meta])* $name:ident: $t:ty),* $(,)?) => {$(
        $(#[$m])*
        pub fn $name(mut self, x: $t) -> Self {
            self.$name = x;
            self
        }
    )*};
}

impl DgcConfig {
    setter! {
        /// Set [`DgcConfig::sparsify`].
        sparsify: bool,
        /// Set [`DgcConfig::momentum_correction`].
        momentum_correction: bool,
        /// Set [`DgcConfig::clipping`].
        clipping: bool,
        /// Set [`DgcConfig::momentum_masking`].
        momentum_masking: bool,
        /// Set [`DgcConfig::warmup_enabled`].
        warmup_enabled: bool,
        /// Set [`DgcConfig::momentum`].
        momentum: f32,
        /// Set [`DgcConfig::final_density`].
        final_density: f64,
        /// Set [`DgcConfig::warmup`].
        warmup: Vec<f64>,
        /// Set [`DgcConfig::clip_norm`].
        clip_norm: f64,
        /// Set [`DgcConfig::sample_fraction`].
        sample_fraction: f64,
        /// Set [`DgcConfig::selection`].
        selection: Selection,
        /// Set [`DgcConfig::exchange`].
        exchange: Exchange,
        /// Set [`DgcConfig::index_coding`].
        index_coding: IndexCoding,
        /// Set [`DgcConfig::values`].
        values: ValueFormat,
        /// Set [`DgcConfig::non_finite`].
        non_finite: NonFinite,
        /// Set [`DgcConfig::seed`].
        seed: u64,
    }

    /// The most compact wire format: counts-then-gather, delta-varint indices, bf16 values.
    pub fn compact(self) -> Self {
        self.exchange(Exchange::CountsThenGather)
            .index_coding(IndexCoding::DeltaVarint)
            .values(ValueFormat::Bf16)
    }

    /// Check the settings; a message says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |var: &str, value: String, why: &str| {
            Err(Error::Config {
                var: format!("DgcConfig::{var}"),
                value,
                why: why.into(),
            })
        };
        let density_ok = |d: f64| d > 0.0 && d <= 1.0;
        if !density_ok(self.final_density) {
            return bad(
                "final_density",
                self.final_density.to_string(),
                "must be in (0, 1]",
            );
        }
        if let Some(d) = self.warmup.iter().find(|d| !density_ok(**d)) {
            return bad(
                "warmup",
                d.to_string(),
                "every warm-up density must be in (0, 1]",
            );
        }
        if !(self.sample_fraction > 0.0 && self.sample_fraction <= 1.0) {
            return bad(
                "sample_fraction",
                self.sample_fraction.to_string(),
                "must be in (0, 1]",
            );
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return bad("momentum", self.momentum.to_string(), "must be in [0, 1)");
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return bad("clip_norm", self.clip_norm.to_string(), "must be positive");
        }
        if !(self.upper_bound >= 1.0 && self.lower_bound > 0.0 && self.lower_bound <= 1.0) {
            return bad(
                "upper_bound/lower_bound",
                format!("{}/{}", self.upper_bound, self.lower_bound),
                "need upper ≥ 1 and 0 < lower ≤ 1",
            );
        }
        if self.exchange == Exchange::FixedK && self.index_coding == IndexCoding::DeltaVarint {
            return bad(
                "index_coding",
                "DeltaVarint".into(),
                "variable-length indices need Exchange::CountsThenGather (FixedK pads to k u32 pairs)",
            );
        }
        Ok(())
    }

    /// The density used at `epoch` (fractional epochs allowed).
    pub fn density_at(&self, epoch: f64) -> f64 {
        if self.warmup_enabled && epoch >= 0.0 {
            if let Some(&d) = self.warmup.get(epoch.floor() as usize) {
                return d;
            }
        }
        self.final_density
    }
}

/// What one [`Dgc::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StepStats {
    /// Bytes this rank's communicator sent during the step (0 on backends that do not count).
    pub bytes_sent: u64,
    /// Bytes of this rank's message as gathered (header + pairs + padding).
    pub message_bytes: usize,
    /// Density in force (k / n).
    pub density: f64,
    /// Dense gradient bytes (4·n) ÷ `message_bytes`: the paper's gradient compression ratio.
    pub compression_ratio: f64,
    /// Values this rank sent (≤ k).
    pub selected: usize,
    /// The target k.
    pub k: usize,
    /// The final threshold.
    pub threshold: f32,
    /// Threshold corrections made.
    pub adaptations: u32,
    /// The clip scale applied (1.0: not clipped).
    pub clip_scale: f32,
    /// True if the step was skipped (non-finite gradient on some rank under `SkipStep`).
    pub skipped: bool,
}

/// Checkpointable state: residuals, velocities, step count and the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DgcState {
    /// The configuration.
    pub config: DgcConfig,
    /// Momentum (velocity) accumulator `u`.
    pub u: Vec<f32>,
    /// Residual accumulator `v` (what has not been sent yet).
    pub v: Vec<f32>,
    /// Steps taken (seeds the threshold sample).
    pub step: u64,
}

/// One rank's DGC gradient synchronizer. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Dgc {
    st: DgcState,
    msg: Vec<u8>,
    gathered: Vec<u8>,
}

/// Flag in the message header's top bit: this rank skipped the step (non-finite gradient).
const SKIP_FLAG: u32 = 1 << 31;

impl Dgc {
    /// A synchronizer for `n_params` parameters.
    pub fn new(n_params: usize, cfg: DgcConfig) -> Result<Dgc> {
        cfg.validate()?;
        if n_params >= PAD as usize {
            return Err(Error::InvalidArgument(format!(
                "dgc: {n_params} parameters do not fit u32 indices; use one Dgc per parameter group"
            )));
        }
        Ok(Dgc {
            st: DgcState {
                config: cfg,
                u: vec![0.0; n_params],
                v: vec![0.0; n_params],
                step: 0,
            },
            msg: Vec::new(),
            gathered: Vec::new(),
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.st.v.len()
    }

    /// True for zero parameters.
    pub fn is_empty(&self) -> bool {
        self.st.v.is_empty()
    }

    /// The configuration.
    pub fn config(&self) -> &DgcConfig {
        &self.st.config
    }

    /// The state to checkpoint.
    pub fn state(&self) -> &DgcState {
        &self.st
    }

    /// Resume from a checkpoint.
    pub fn from_state(st: DgcState) -> Result<Dgc> {
        st.config.validate()?;
        if st.u.len() != st.v.len() {
            return Err(Error::LengthMismatch {
                what: "DgcState::u (one per parameter, as v)".into(),
                expected: st.v.len(),
                got: st.u.len(),
            });
        }
        if let Some(i) = select::first_non_finite(&st.u).or(select::first_non_finite(&st.v)) {
            return Err(Error::InvalidArgument(format!(
                "DgcState holds a non-finite value at index {i}"
            )));
        }
        Ok(Dgc {
            st,
            msg: Vec::new(),
            gathered: Vec::new(),
        })
    }

    /// The target number of values per rank at `epoch`.
    pub fn k_at(&self, epoch: f64) -> usize {
        let n = self.len();
        ((self.st.config.density_at(epoch) * n as f64).ceil() as usize).clamp(1, n.max(1))
    }

    /// Compress `grad` into this rank's message (updates the residuals). Returns the selection
    /// statistics and the encoded message (in `self.msg`). `None` when the gradient was non-finite
    /// under the skip policy (state untouched).
    fn compress(
        &mut self,
        grad: &[f32],
        world: usize,
        epoch: f64,
        stats: &mut StepStats,
    ) -> Result<bool> {
        let cfg = &self.st.config;
        let n = grad.len();
        let mut bad = select::first_non_finite(grad);
        let mut sum_sq = 0.0;
        if bad.is_none() && cfg.clipping {
            sum_sq = select::sum_squares(grad);
            if !sum_sq.is_finite() {
                bad = Some(usize::MAX);
            }
        }
        if let Some(i) = bad {
            let what = if i == usize::MAX {
                "its squared norm overflows".to_string()
            } else {
                format!("value {} at index {i}", grad[i])
            };
            return match cfg.non_finite {
                NonFinite::Error => Err(Error::InvalidArgument(format!(
                    "dgc: non-finite gradient ({what}); the residuals were not changed"
                ))),
                NonFinite::SkipStep => {
                    let k = self.k_at(epoch);
                    skip_message(cfg, k, &mut self.msg);
                    stats.skipped = true;
                    Ok(false)
                }
            };
        }
        let k = self.k_at(epoch);
        let scale = if cfg.clipping {
            select::clip_scale(sum_sq, cfg.clip_norm, world)
        } else {
            1.0
        };
        let up = select::Update {
            scale,
            momentum: cfg.momentum,
            momentum_correction: cfg.momentum_correction,
        };
        let sample = match cfg.selection {
            Selection::Sampled => Some(((cfg.sample_fraction * n as f64).ceil() as usize).max(1)),
            Selection::ExactTopK => None,
        };
        let p = select::SelectParams {
            k,
            sample,
            seed: cfg.seed,
            step: self.st.step,
            upper: cfg.upper_bound,
            lower: cfg.lower_bound,
            max_adapt: cfg.max_adapt,
        };
        // A finite gradient can still make a non-finite step (issue 19): with clipping off and
        // values near the f32 maximum the accumulated velocity overflows, or bf16 rounding turns a
        // large value into ±Inf. So the step's own output is checked too — the accumulated state
        // and the quantized values — against a copy of the state taken first, which is put back
        // before either policy applies: a bad step never poisons later ones.
        let saved = (self.st.u.clone(), self.st.v.clone());
        let mut sel = select::compress(grad, &mut self.st.u, &mut self.st.v, up, &p)?;
        wire::quantize(&mut sel.val, cfg.values);
        let produced = select::first_non_finite(&sel.val)
            .map(|i| format!("quantized value {} (of index {})", sel.val[i], sel.idx[i]))
            .or_else(|| {
                select::first_non_finite(&self.st.v)
                    .map(|i| format!("accumulated velocity {} at index {i}", self.st.v[i]))
            })
            .or_else(|| {
                select::first_non_finite(&self.st.u)
                    .map(|i| format!("momentum {} at index {i}", self.st.u[i]))
            });
        if let Some(what) = produced {
            (self.st.u, self.st.v) = saved;
            return match cfg.non_finite {
                NonFinite::Error => Err(Error::InvalidArgument(format!(
                    "dgc: the step would make a non-finite {what} from a finite gradient (values near the f32 maximum with clipping off, or a bf16 overflow); the residuals were not changed: enable clipping or scale the loss down"
                ))),
                NonFinite::SkipStep => {
                    skip_message(cfg, k, &mut self.msg);
                    stats.skipped = true;
                    Ok(false)
                }
            };
        }
        drop(saved);
        let pad = (cfg.exchange == Exchange::FixedK).then_some(k);
        wire::encode(
            &sel.idx,
            &sel.val,
            cfg.index_coding,
            cfg.values,
            pad,
            &mut self.msg,
        )?;
        select::mask_sent(
            &mut self.st.u,
            &mut self.st.v,
            &sel.idx,
            &sel.val,
            cfg.momentum_masking,
        );
        self.st.step += 1;
        *stats = StepStats {
            density: k as f64 / n.max(1) as f64,
            selected: sel.idx.len(),
            k,
            threshold: sel.threshold,
            adaptations: sel.adaptations,
            clip_scale: scale,
            ..*stats
        };
        Ok(true)
    }

    /// One synchronisation step: compress `grad` into the residuals, exchange the sparse messages
    /// and write the averaged sparse update into `grad`. Every rank must call it with the same
    /// `epoch` (fractional allowed) and a gradient of [`Dgc::len`] values.
    ///
    /// With momentum correction on, apply the result with plain SGD (`w -= lr * grad`).
    pub fn step<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        grad: &mut [f32],
        epoch: f64,
    ) -> Result<StepStats> {
        let n = self.len();
        if grad.len() != n {
            return Err(Error::LengthMismatch {
                what: "dgc step: gradient (one value per parameter)".into(),
                expected: n,
                got: grad.len(),
            });
        }
        let world = comm.world_size();
        let before = comm.bytes_sent();
        let mut stats = StepStats {
            clip_scale: 1.0,
            ..StepStats::default()
        };
        let cfg = self.st.config.clone();

        if !cfg.sparsify {
            if let Some(i) = select::first_non_finite(grad) {
                if cfg.non_finite == NonFinite::Error {
                    return Err(Error::InvalidArgument(format!(
                        "dgc: non-finite gradient (value {} at index {i})",
                        grad[i]
                    )));
                }
            }
            // Dense baseline: a flag all-reduce for the skip policy, then all-reduce Avg.
            let mut flag = [f32::from(u8::from(
                select::first_non_finite(grad).is_some(),
            ))];
            if cfg.non_finite == NonFinite::SkipStep {
                comm.all_reduce(&mut flag, crate::ReduceOp::Max)?;
            }
            if flag[0] > 0.0 {
                grad.fill(0.0);
                stats.skipped = true;
            } else {
                comm.all_reduce(grad, crate::ReduceOp::Avg)?;
            }
            stats.message_bytes = 4 * n;
            stats.density = 1.0;
            stats.k = n;
            stats.selected = n;
            stats.compression_ratio = 1.0;
            stats.bytes_sent = comm.bytes_sent() - before;
            return Ok(stats);
        }

        // Compress (state updated unless the gradient is bad), keeping a copy of the state to undo
        // the update if another rank skipped this step.
        let backup = self.backup();
        self.compress(grad, world, epoch, &mut stats)?;
        let (max_len, any_skip) = exchange(comm, &cfg, &mut self.msg, &mut self.gathered)?;
        self.conclude(max_len, any_skip, backup, grad, &mut stats)?;
        stats.bytes_sent = comm.bytes_sent() - before;
        Ok(stats)
    }

    /// A copy of the state to undo a step with, under the skip policy (`None` otherwise).
    fn backup(&self) -> Option<Backup> {
        (self.st.config.non_finite == NonFinite::SkipStep)
            .then(|| (self.st.u.clone(), self.st.v.clone(), self.st.step))
    }

    /// After the exchange (`self.gathered` holds `world` slots of `max_len` bytes): undo the step if
    /// some rank skipped it, else decode the averaged update into `grad`.
    fn conclude(
        &mut self,
        max_len: usize,
        any_skip: bool,
        backup: Option<Backup>,
        grad: &mut [f32],
        stats: &mut StepStats,
    ) -> Result<()> {
        let cfg = &self.st.config;
        if any_skip {
            if let Some((u, v, step)) = backup {
                self.st.u = u;
                self.st.v = v;
                self.st.step = step;
            }
            grad.fill(0.0);
            stats.skipped = true;
        } else {
            let msgs: Vec<&[u8]> = self.gathered.chunks(max_len.max(1)).collect();
            wire::decode_average(&msgs, cfg.index_coding, cfg.values, grad)?;
        }
        stats.message_bytes = max_len;
        stats.compression_ratio = (4 * grad.len()) as f64 / max_len.max(1) as f64;
        Ok(())
    }
}

/// Residuals, velocities and step count before a step (to undo it when a rank skipped it).
type Backup = (Vec<f32>, Vec<f32>, u64);

const PAD: u32 = wire::PAD_INDEX;

/// This rank's message for a skipped step: the skip flag, padded to the fixed length if needed.
pub(crate) fn skip_message(cfg: &DgcConfig, k: usize, msg: &mut Vec<u8>) {
    msg.clear();
    msg.extend_from_slice(&SKIP_FLAG.to_le_bytes());
    if cfg.exchange == Exchange::FixedK {
        msg.resize(wire::fixed_len(k, cfg.values), 0);
    }
}

/// All-gather every rank's message (`msg`, restored to its length afterwards) into `gathered`
/// (`world` slots of the returned length). Returns `(slot length, some rank skipped)`.
pub(crate) fn exchange<C: Communicator + ?Sized>(
    comm: &C,
    cfg: &DgcConfig,
    msg: &mut Vec<u8>,
    gathered: &mut Vec<u8>,
) -> Result<(usize, bool)> {
    let world = comm.world_size();
    let mlen = msg.len();
    let mut lens = vec![0i64; world];
    let max_len = match cfg.exchange {
        Exchange::FixedK => mlen,
        Exchange::CountsThenGather => {
            comm.all_gather(&[mlen as i64], &mut lens)?;
            lens.iter().copied().max().unwrap_or(0).max(0) as usize
        }
    };
    gather_messages(comm, max_len, msg, gathered)?;
    Ok((max_len, any_skipped(gathered, max_len)))
}

/// The second half of [`exchange`]: all-gather `msg` padded to `max_len` bytes into `gathered`
/// (`msg` keeps its length).
pub(crate) fn gather_messages<C: Communicator + ?Sized>(
    comm: &C,
    max_len: usize,
    msg: &mut Vec<u8>,
    gathered: &mut Vec<u8>,
) -> Result<()> {
    let world = comm.world_size();
    let mlen = msg.len();
    let total = max_len.checked_mul(world).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "dgc exchange: a peer announced a {max_len}-byte message; x {world} ranks overflows"
        ))
    })?;
    msg.resize(max_len, 0);
    gathered.resize(total, 0);
    comm.all_gather(&*msg, gathered)?;
    msg.truncate(mlen);
    Ok(())
}

/// True if some rank's gathered message (slots of `max_len` bytes) carries the skip flag.
pub(crate) fn any_skipped(gathered: &[u8], max_len: usize) -> bool {
    gathered.chunks(max_len.max(1)).any(|m| {
        m.get(..4)
            .and_then(|h| h.try_into().ok())
            .is_some_and(|h: [u8; 4]| u32::from_le_bytes(h) & SKIP_FLAG != 0)
    })
}
