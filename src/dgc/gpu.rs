//! The CUDA path of DGC (feature `cuda`): the kernels of `cuda/dgc.cu`, compiled with NVRTC for the
//! running GPU (through [`CudaKernels::load`], so they share its compile caches), launched on
//! one stream; and [`DeviceDgc`], the whole [`Dgc::step`](super::Dgc::step) with the gradient and the
//! state in device memory.
//!
//! Each kernel's CPU twin is in [`super::select`]; the parity tests are in `tests/dgc.rs`
//! (`gpu_kernels_match_cpu_twins`, `device_step_matches_host_step`), the benchmark
//! `benches/dgc_kernels.rs`.
//!
//! # The compression step on the device
//!
//! [`DgcKernels::find_candidates`] runs, all enqueued without waiting for the device:
//!
//! 1. `dgc_check_norm` — one read of `g`: first non-finite index, `Σ g²` (f64) and the clip scale,
//!    computed on the device by the last block (no host round trip); that block also zeroes the
//!    step's counters and its own scratch, so a step needs no memset ([`Workspace`]'s `clean`);
//! 2. `dgc_sample_select` — `|v'|` at the sample indices (runs of [`select::SAMPLE_RUN`]
//!    consecutive indices at hashed positions, one thread per run), `v'` computed on the fly from
//!    `g`, `u`, `v`, then a radix select (11 + 11 bits) of the sample's `⌈k·s/n⌉`-th largest
//!    value, its low 10 bits cleared ([`select::truncated_kth`]) — all in one launch: the grid is
//!    co-resident, the samples stay in registers and the rounds are separated by a grid-wide wait
//!    (three rounds, exact, for [`Selection::ExactTopK`](super::Selection)). Where the grid cannot
//!    hold the sample, `dgc_sample` and one `dgc_radix_round` launch per round do the same;
//! 3. `dgc_fused` — clip-scale, momentum, accumulate, threshold test and compaction in one pass, reading
//!    the scale and the threshold from device memory; it does nothing when step 1 found a non-finite
//!    value, so the state is untouched without a host synchronisation;
//!
//! then reads the control words back — the only synchronisation in the common case. Only when the
//! count is outside the band (`> upper·k` or `< lower·k`) does it correct the threshold with
//! read-only `dgc_select` passes, exactly as [`select::compress`] does.
//! [`DgcKernels::compress_step`] adds the top k of the candidates: `dgc_topk_select`, one launch
//! (two radix rounds over the candidates' offsets above the estimated threshold, held in
//! registers — three when the k-th lies more than a half binade above it — the filter and the
//! masking), whose last block writes the control words straight to page-locked host memory, so
//! the read-back is a spin on one host word rather than a device-to-host copy and a stream
//! synchronisation (or, where it does not fit, three `dgc_radix_round`s and `dgc_filter`, then a
//! copy).
//!
//! The top k is the CPU twin's set exactly ([`select::finish_selection`]: ties at the k-th
//! magnitude go to the lower indices): every candidate above the k-th largest magnitude is kept
//! (slots `0..`, counted in `CTL_SEL`), then those equal to it (slots from `k − CTL_KEEP`, counted
//! in `CTL_TIES`), where `CTL_KEEP`, k minus the candidates above, comes out of the radix select
//! itself, with `CTL_EQ`, how many equal it. Only when more candidates tie than that (`CTL_EQ >
//! CTL_KEEP`; exact ties are common in gradients of bf16 or f16 precision) is a second radix select
//! run, over the tied indices, for the last one kept (`CTL_TIE_LAST`): three more rounds inside
//! `dgc_topk_select`; three `dgc_tie_round` launches and the filter again after the read-back on
//! the multi-launch path (whose filter leaves such a case untouched). Without such ties the
//! speculative top k costs no extra round, launch or synchronisation; after a threshold correction
//! (no read-back between the select and the filter) the three tie rounds are enqueued anyway and
//! return at once.
//!
//! On compute capability 9.0 and later the step uses programmatic dependent launch
//! ([`DgcKernels::set_pdl`]): `dgc_check_norm` lets the sample select start at once, whose blocks
//! gather their runs as the check's blocks retire and wait (`griddepcontrol.wait`) only before
//! they need the clip scale; the fused pass loads its first vectors before waiting for the select.
//! Measured on an H200 (benches/RESULTS.md): 0.225 → 0.202 ms per step at 25.5 M parameters.
//!
//! Every launch takes plain device addresses, taken once per step (`StepAddrs`), not `&CudaSlice`
//! arguments (each of which costs event waits and records per launch).
//!
//! Clipping needs the global norm before the update; the norm is fused into the pass that checks the
//! gradient for NaN/Inf, which the non-finite policy needs before the state changes anyway. A
//! one-step-lagged norm would save that read only if the finiteness check were dropped too, so it is
//! not offered; `benches/dgc_kernels.rs` reports the pass's cost separately.

use super::select::{self, SelectParams, Update};
use super::{exchange, skip_message, wire, DgcConfig, DgcState, Exchange, NonFinite, StepStats};
use super::{IndexCoding, Selection};
use crate::kernels::CudaKernels;
use crate::{Communicator, CommunicatorExt, Error, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    result as cu, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, SyncOnDrop,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The crate's CUDA error helper ([`crate::device::drv`]) with this module's `dgc` prefix.
fn cuda(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| crate::device::drv(&format!("dgc {what}"), e)
}

/// Every kernel of `cuda/dgc.cu` that [`DgcKernels`] loads.
pub const KERNELS: [&str; 12] = [
    "dgc_check_norm",
    "dgc_sample",
    "dgc_radix_round",
    "dgc_fused",
    "dgc_select",
    "dgc_mask",
    "dgc_filter",
    "dgc_tie_round",
    "dgc_decode_sorted",
    "dgc_scatter_add_fixed",
    "dgc_sample_select",
    "dgc_topk_select",
];

/// Compile `cuda/dgc.cu` to PTX for `arch` (e.g. `"sm_90"`); needs only libnvrtc. The same NVRTC
/// path and options as at run time ([`crate::kernels::cuda::compile_ptx`]).
pub fn compile_ptx(arch: &str) -> Result<Ptx> {
    crate::kernels::cuda::compile_ptx(crate::kernels::registry::DGC, arch).map(Ptx::from_src)
}

/// Set when a one-launch select gave up waiting for its blocks.
const CTL_STUCK: usize = 14;

/// Index of the step's sequence number in the host copy of the control words.
const CTL_SEQ: usize = 19;

/// Index of the candidate count in the control words (see `cuda/dgc.cu`).
pub const CTL_COUNT: usize = 0;
/// Index of the sampled threshold (f32 bits).
pub const CTL_THR: usize = 1;
/// Index of the clip scale (f32 bits).
pub const CTL_SCALE: usize = 2;
/// Index of `u32::MAX − first non-finite index` (0: none).
pub const CTL_BAD: usize = 3;
/// Index of the squared-norm overflow flag.
pub const CTL_OVF: usize = 4;
/// Index of the number of selected pairs strictly above the k-th largest magnitude (`dgc_filter`;
/// stored in slots `0..`). The number selected is `CTL_SEL + CTL_TIES`.
pub const CTL_SEL: usize = 5;
/// Index of the k-th largest candidate magnitude (f32 bits; 0 when there were at most k candidates).
pub const CTL_KTH: usize = 9;
/// Index of the number of selected pairs equal to the k-th largest magnitude (`dgc_filter`; stored
/// in slots `k − CTL_KEEP..k`).
pub const CTL_TIES: usize = 15;
/// Index of how many candidates equal to the k-th largest magnitude the top k keeps: `k` minus the
/// candidates strictly above it (written by the top k's radix select, with `CTL_KTH`).
pub const CTL_KEEP: usize = 16;
/// Index of how many candidates equal the k-th largest magnitude (written with `CTL_KTH`). More than
/// `CTL_KEEP`: the ties are cut, the lowest indices kept.
pub const CTL_EQ: usize = 17;
/// Index of the highest index among the ties kept, when they were cut (`CTL_EQ > CTL_KEEP`).
pub const CTL_TIE_LAST: usize = 18;
/// Number of control words.
pub const CTL_LEN: usize = 20;
const RADIX_BINS: usize = 2048;

/// Device buffers of one compression step (scratch and outputs; also named [`Candidates`]). Sized by
/// [`DgcKernels::workspace`]; the candidate buffers grow when a step needs more.
pub struct Workspace {
    /// Candidate indices (capacity = `idx.len()`).
    pub idx: CudaSlice<u32>,
    /// Candidate values.
    pub val: CudaSlice<f32>,
    /// Selected indices (capacity `k`).
    pub sel_idx: CudaSlice<u32>,
    /// Selected values.
    pub sel_val: CudaSlice<f32>,
    /// Sample scratch (the magnitudes the threshold is estimated from).
    pub sample: CudaSlice<f32>,
    /// Control words (`CTL_*`).
    pub ctl: CudaSlice<u32>,
    /// Global radix histogram (zero between calls).
    pub hist: CudaSlice<u32>,
    /// Sum of squares (f64).
    pub sumsq: CudaSlice<f64>,
    /// Page-locked host copy of `ctl`: the read-back is one asynchronous copy and a stream wait,
    /// or (the one-launch top k) written by the kernel itself, `host_ctl[CTL_SEQ]` last.
    host_ctl: PinnedHostSlice<u32>,
    /// Sequence number of the last step whose control words the kernel wrote to `host_ctl`.
    seq: u32,
    /// The scratch words a compression step needs zero on entry (`sumsq`, the tickets, the
    /// non-finite accumulator, `hist`) are zero: the last step left them so (its `dgc_check_norm`
    /// ran with `self_clean`, the radix rounds clear theirs), so the next step needs no memset.
    /// [`DgcKernels::launch_check_norm`] (which leaves the sum for its caller) clears it, and so
    /// does a step that fails before its read-back.
    clean: bool,
}

/// What [`DgcKernels::launch_sample`] samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// The update the sample anticipates (`v'` as the fused pass would store it).
    pub up: Update,
    /// Take the clip scale from the device (`CTL_SCALE`) instead of `up.scale`.
    pub scale_from_ctl: bool,
    /// Seed of the sample positions.
    pub seed: u64,
    /// Step (the positions change every step).
    pub step: u64,
    /// Number of samples.
    pub s: usize,
    /// Every element in order instead (`s = n`), for [`Selection::ExactTopK`].
    pub exact: bool,
}

impl SampleParams {
    /// The kernels' integer flags: (momentum correction, scale from ctl, exact).
    fn flags(&self) -> (i32, i32, i32) {
        (
            i32::from(self.up.momentum_correction),
            i32::from(self.scale_from_ctl),
            i32::from(self.exact),
        )
    }
}

/// `dgc_fused`'s scalar arguments.
struct FusedParams {
    up: Update,
    scale_from_ctl: bool,
    thr: f32,
    thr_slot: Option<usize>,
    guard: bool,
    /// Launched with programmatic stream serialization (after a kernel that triggers it).
    pdl: bool,
}

/// A device address passed to a kernel as a plain 64-bit argument.
type Addr = cudarc::driver::sys::CUdeviceptr;

/// The addresses of the buffers one compression step touches, taken once per step.
///
/// cudarc's `arg(&CudaSlice)` makes every launch wait on and re-record each buffer's events once
/// the context has a second stream (ours does): up to three driver calls per buffer and launch. A
/// step takes each address once instead (one wait when taken, one record when this is dropped), so
/// other streams still see the step as one unit, and launches with plain addresses in between, all
/// on [`DgcKernels::stream`], which orders them. It cuts the step's driver calls by about 60; on
/// the H200 the GPU was the bottleneck, so the step time did not change measurably.
struct StepAddrs<'a> {
    g: Addr,
    u: Addr,
    v: Addr,
    idx: Addr,
    val: Addr,
    sel_idx: Addr,
    sel_val: Addr,
    sample: Addr,
    ctl: Addr,
    hist: Addr,
    _sync: Vec<SyncOnDrop<'a>>,
}

fn addr<'a, T>(x: &'a CudaSlice<T>, s: &'a CudaStream, keep: &mut Vec<SyncOnDrop<'a>>) -> Addr {
    let (p, guard) = x.device_ptr(s);
    keep.push(guard);
    p
}

fn addr_mut<'a, T>(
    x: &'a mut CudaSlice<T>,
    s: &'a CudaStream,
    keep: &mut Vec<SyncOnDrop<'a>>,
) -> Addr {
    let (p, guard) = x.device_ptr_mut(s);
    keep.push(guard);
    p
}

/// The earlier name of [`Workspace`].
pub type Candidates = Workspace;

/// What the device found wrong with a gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadGradient {
    /// A NaN or ±Inf at this index (the first).
    NonFinite(usize),
    /// The squared norm overflows (only checked with clipping).
    NormOverflow,
}

/// The outcome of [`DgcKernels::find_candidates`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateSet {
    /// Candidates in `Workspace::idx/val[..count]` (unordered).
    pub count: usize,
    /// How many passed the first (estimated) threshold.
    pub first_count: usize,
    /// The final threshold.
    pub threshold: f32,
    /// Threshold corrections made.
    pub adaptations: u32,
    /// The clip scale applied.
    pub clip_scale: f32,
    /// `k ≥ n`: every element is sent (no candidates were compacted; read `v` itself).
    pub dense: bool,
    /// Set when the gradient was rejected; `u` and `v` are then unchanged.
    pub bad: Option<BadGradient>,
    /// [`DgcKernels::compress_step`] only: the top k and the masking were already done on the device
    /// (speculatively, before the count was read; the count needed no correction).
    pub top_k_done: bool,
}

/// CUDA events between the stages of one [`DgcKernels::compress_step`] (for the benchmark).
#[derive(Debug, Default)]
pub struct StageTimes {
    marks: Vec<(&'static str, CudaEvent)>,
}

impl StageTimes {
    fn mark(&mut self, stream: &Arc<CudaStream>, name: &'static str) -> Result<()> {
        let e = stream
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda("event"))?;
        e.record(stream).map_err(cuda("record event"))?;
        self.marks.push((name, e));
        Ok(())
    }

    /// `(stage, milliseconds)` between consecutive marks; each stage is named by the mark ending it.
    pub fn durations(&self) -> Result<Vec<(&'static str, f64)>> {
        self.marks
            .windows(2)
            .map(|w| {
                let ms = w[0].1.elapsed_ms(&w[1].1).map_err(cuda("elapsed"))?;
                Ok((w[1].0, f64::from(ms)))
            })
            .collect()
    }
}

/// The DGC kernels on one device and stream.
pub struct DgcKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    check_norm: CudaFunction,
    sample: CudaFunction,
    radix: CudaFunction,
    fused: CudaFunction,
    select: CudaFunction,
    mask: CudaFunction,
    filter: CudaFunction,
    tie_round: CudaFunction,
    decode_sorted: CudaFunction,
    scatter_add_fixed: CudaFunction,
    sample_select: CudaFunction,
    topk_select: CudaFunction,
    /// The most blocks of `THREADS` that can be co-resident for each one-launch select (0: the
    /// occupancy query failed, so the multi-launch path is used).
    coop_sample: u32,
    coop_topk: u32,
    /// Use the one-launch selects when they fit (default); off: the multi-launch rounds always.
    one_launch: AtomicBool,
    /// Host memory is addressable from the device (unified addressing): `dgc_topk_select` writes
    /// the control words there.
    uva: bool,
    /// Bound on the wait for the step's control words (`FERROCCL_TIMEOUT`, read once).
    timeout: std::time::Duration,
    /// Programmatic dependent launch between the step's kernels (sm_90+; see `pdl_wait` in
    /// cuda/dgc.cu).
    pdl: AtomicBool,
    /// The GPU has programmatic dependent launch (compute capability 9.0 or later).
    pdl_ok: bool,
    blocks: u32,
    sms: u32,
}

/// Kernel arguments for [`DgcKernels::launch_ex`]: pointers to the values (which must outlive it).
macro_rules! kargs {
    ($($a:expr),* $(,)?) => { [$(std::ptr::from_ref($a).cast_mut().cast::<c_void>()),*] };
}

/// Values per thread the one-launch selects hold in registers (`COOP_PER` in cuda/dgc.cu).
const COOP_PER: usize = 16;

const THREADS: u32 = 256;

fn to_u32(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::InvalidArgument(format!("dgc: {what} {x} exceeds u32")))
}

impl DgcKernels {
    /// Open device `ordinal` on a new stream and compile the kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<DgcKernels> {
        DgcKernels::with_kernels(&CudaKernels::new(ordinal)?)
    }

    /// The kernels on `k`'s device and stream, compiled and cached by [`CudaKernels::load`].
    pub fn with_kernels(k: &CudaKernels) -> Result<DgcKernels> {
        let ctx = k.context().clone();
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda("SM count"))?;
        let f = |name: &str| {
            debug_assert!(KERNELS.contains(&name), "{name} missing from KERNELS");
            k.load(crate::kernels::registry::DGC, name)
        };
        let sms = (sms.max(1)) as u32;
        let major = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .unwrap_or(0);
        // Co-residency for the cooperative launches; a failed query only disables them.
        let coop = |f: &CudaFunction| {
            f.occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
                .map_or(0, |b| b * sms)
        };
        let (sample_select, topk_select) = (f("dgc_sample_select")?, f("dgc_topk_select")?);
        Ok(DgcKernels {
            coop_sample: coop(&sample_select),
            coop_topk: coop(&topk_select),
            sample_select,
            topk_select,
            one_launch: AtomicBool::new(true),
            timeout: crate::Config::from_env()
                .map_or(crate::config::DEFAULT_TIMEOUT, |c| c.timeout),
            uva: ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING,
                )
                .is_ok_and(|x| x != 0),
            pdl: AtomicBool::new(major >= 9),
            pdl_ok: major >= 9,
            stream: k.stream().clone(),
            check_norm: f("dgc_check_norm")?,
            sample: f("dgc_sample")?,
            radix: f("dgc_radix_round")?,
            fused: f("dgc_fused")?,
            select: f("dgc_select")?,
            mask: f("dgc_mask")?,
            filter: f("dgc_filter")?,
            tie_round: f("dgc_tie_round")?,
            decode_sorted: f("dgc_decode_sorted")?,
            scatter_add_fixed: f("dgc_scatter_add_fixed")?,
            blocks: sms * 8,
            sms,
            ctx,
        })
    }

    /// Choose how the two radix selects of a step run: `true` (the default) as one cooperative
    /// launch each, the values held in registers between rounds (`dgc_sample_select`,
    /// `dgc_topk_select`), when the grid can hold them; `false` always as one launch per round
    /// (`dgc_sample`, `dgc_radix_round`, `dgc_filter`). Both give the same result; the switch is
    /// for the parity tests and the benchmark's A/B.
    pub fn set_one_launch_select(&self, on: bool) {
        self.one_launch.store(on, Ordering::Relaxed);
    }

    /// Choose whether the step's kernels use programmatic dependent launch (default: on where the
    /// GPU has it, compute capability 9.0 or later; ignored elsewhere): the sample select starts
    /// gathering while `dgc_check_norm` streams `g`, the fused pass loads its first vectors while
    /// the select finishes, and each launch's latency overlaps the kernel before. Off, the
    /// one-launch selects use cooperative launches. The result is the same either way.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on && self.pdl_ok, Ordering::Relaxed);
    }

    fn pdl_on(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// Launch `f` on the stream with `cuLaunchKernelEx`, with programmatic stream serialization
    /// when `pdl` (the kernel may start before the one before it ends; it calls `pdl_wait()`
    /// before reading that one's output). `args` point to the argument values.
    fn launch_ex(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
        pdl: bool,
        what: &str,
    ) -> Result<()> {
        use cudarc::driver::sys;
        // SAFETY: a zeroed attribute is a valid (ignored) value; the id and its field are set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let lc = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl),
        };
        self.ctx.bind_to_thread().map_err(cuda(what))?;
        // SAFETY: `args` holds one pointer per kernel parameter, to values of the parameter's
        // type that live until this returns (the driver copies them at launch).
        unsafe {
            sys::cuLaunchKernelEx(
                &lc,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(cuda(what))
    }

    /// Blocks for a one-launch select of `s` values (about eight per thread, as the multi-launch
    /// rounds), or `None` when it does not fit a co-resident grid (or is switched off).
    fn coop_grid(&self, s: usize, max_blocks: u32, vpt: usize) -> Option<LaunchConfig> {
        if !self.one_launch.load(Ordering::Relaxed) || max_blocks == 0 {
            return None;
        }
        let per_block = THREADS as usize;
        let vpt = vpt.clamp(1, COOP_PER);
        let want = s.div_ceil(per_block * vpt).max(1);
        let blocks = want.min(max_blocks as usize);
        (blocks * per_block * COOP_PER >= s).then_some(LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream everything is launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn grid(&self, n: u64) -> LaunchConfig {
        let want = n.div_ceil(u64::from(THREADS)).max(1);
        LaunchConfig {
            grid_dim: (want.min(u64::from(self.blocks)) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Upload a host slice.
    pub fn upload<T: DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(x).map_err(cuda("upload"))
    }

    /// Download a device buffer.
    pub fn download<T: DeviceRepr>(&self, x: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(x).map_err(cuda("download"))
    }

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(cuda("alloc"))
    }

    fn zero<T: DeviceRepr + ValidAsZeroBits>(&self, x: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memset_zeros(x).map_err(cuda("memset"))
    }

    /// Scratch for `k` selected values, `cap` candidates and a sample of `s`.
    pub fn workspace(&self, k: usize, cap: usize, s: usize) -> Result<Workspace> {
        // Plain page-locked memory (not write-combined: the host reads it).
        let host_ctl = unsafe { self.ctx.alloc_pinned_with_flags::<u32>(CTL_LEN, 0) }
            .map_err(cuda("pinned control words"))?;
        Ok(Workspace {
            idx: self.alloc(cap)?,
            val: self.alloc(cap)?,
            sel_idx: self.alloc(k)?,
            sel_val: self.alloc(k)?,
            sample: self.alloc(s)?,
            ctl: self.alloc(CTL_LEN)?,
            hist: self.alloc(RADIX_BINS)?,
            sumsq: self.alloc(1)?,
            host_ctl,
            seq: 0,
            clean: true,
        })
    }

    /// Enqueue the copy of the control words at `ctl` into `host` (page-locked).
    fn k_ctl_to_host(&self, ctl: Addr, host: &mut PinnedHostSlice<u32>) -> Result<()> {
        let h = host.as_mut_slice().map_err(cuda("pinned control words"))?;
        let n = h.len().min(CTL_LEN);
        unsafe { cu::memcpy_dtoh_async(&mut h[..n], ctl, self.stream.cu_stream()) }
            .map_err(cuda("control words read-back"))
    }

    /// Wait for the stream, then the control words copied by [`DgcKernels::k_ctl_to_host`].
    fn host_ctl(&self, host: &PinnedHostSlice<u32>) -> Result<Vec<u32>> {
        self.stream.synchronize().map_err(cuda("synchronize"))?;
        let c = host.as_slice().map_err(cuda("pinned control words"))?;
        if c.len() < CTL_LEN {
            return Err(Error::cuda("dgc: control buffer too short"));
        }
        Ok(c.to_vec())
    }

    /// Wait until `dgc_topk_select` has written step `seq`'s control words to `host` (spinning on
    /// `host[CTL_SEQ]`, checking the stream for errors now and then), under the timeout.
    fn wait_published(&self, host: &PinnedHostSlice<u32>, seq: u32) -> Result<Vec<u32>> {
        let p = host.as_ptr().map_err(cuda("pinned control words"))?;
        if host.len() < CTL_LEN {
            return Err(Error::cuda("dgc: control buffer too short"));
        }
        let t0 = std::time::Instant::now();
        let limit = self.timeout;
        let mut spins = 0u32;
        // SAFETY: `p` points to CTL_LEN u32 of page-locked memory that only the kernel writes
        // while we read; volatile reads see its PCIe writes, the sequence word last.
        while unsafe { std::ptr::read_volatile(p.add(CTL_SEQ)) } != seq {
            spins = spins.wrapping_add(1);
            if spins % 4096 == 0 {
                // A faulted kernel never publishes: surface its error instead of the timeout.
                let st = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
                if st != cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY {
                    st.result().map_err(cuda("dgc step"))?;
                    // The stream is done: the words are there (or the kernel did not write them).
                    if unsafe { std::ptr::read_volatile(p.add(CTL_SEQ)) } != seq {
                        return Err(Error::cuda(
                            "dgc: the top-k kernel finished without publishing its control words",
                        ));
                    }
                    break;
                }
                if t0.elapsed() > limit {
                    return Err(Error::Timeout {
                        during: "dgc compression step (waiting for the GPU)",
                        after: t0.elapsed(),
                        waiting_for: None,
                    });
                }
            }
            std::hint::spin_loop();
        }
        std::sync::atomic::fence(Ordering::Acquire);
        Ok((0..CTL_LEN)
            .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
            .collect())
    }

    /// Read the control words (waits for the stream).
    pub fn read_ctl(&self, ws: &Workspace) -> Result<Vec<u32>> {
        let c = self.download(&ws.ctl)?;
        if c.len() < CTL_LEN {
            return Err(Error::cuda("dgc: control buffer too short"));
        }
        Ok(c)
    }

    /// Zero the control words and the norm accumulator (start of a step).
    pub fn reset(&self, ws: &mut Workspace) -> Result<()> {
        ws.clean = false;
        self.zero(&mut ws.ctl)?;
        self.zero(&mut ws.sumsq)?;
        ws.clean = true;
        Ok(())
    }

    fn k_zero(&self, at: Addr, bytes: usize) -> Result<()> {
        unsafe { cu::memset_d8_async(at, 0, bytes, self.stream.cu_stream()) }
            .map_err(cuda("memset"))
    }

    /// Launch `dgc_check_norm`: finiteness of `g`, `Σ g²` and the clip scale for `limit`
    /// (`clip_norm / √world`; `≤ 0`: scale 1). Needs [`DgcKernels::reset`] first.
    pub fn launch_check_norm(
        &self,
        g: &CudaSlice<f32>,
        limit: f64,
        ws: &mut Workspace,
    ) -> Result<()> {
        let mut k = Vec::with_capacity(3);
        let gp = addr(g, &self.stream, &mut k);
        let sq = addr_mut(&mut ws.sumsq, &self.stream, &mut k);
        let ctl = addr_mut(&mut ws.ctl, &self.stream, &mut k);
        ws.clean = false;
        self.k_check_norm(gp, g.len(), limit, sq, ctl, false)
    }

    /// `self_clean`: leave the sum of squares and the scratch words zero for the next step (see
    /// [`Workspace::clean`]).
    fn k_check_norm(
        &self,
        g: Addr,
        n: usize,
        limit: f64,
        sumsq: Addr,
        ctl: Addr,
        self_clean: bool,
    ) -> Result<()> {
        let n = n as u64;
        let sc = i32::from(self_clean);
        let mut b = self.stream.launch_builder(&self.check_norm);
        b.arg(&g).arg(&n).arg(&limit).arg(&sumsq).arg(&ctl).arg(&sc);
        // The whole GPU: capped at half of it (so that the sample select, launched early under
        // PDL, fits beside it) this pass was ~2 µs slower at 25.5 M (benches/RESULTS.md).
        let cfg = self.grid(n / 16 + 1);
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(cuda("check_norm"))
    }

    /// Launch `dgc_sample`: `p.s` magnitudes of the would-be `v` into `ws.sample` (every element in
    /// order when `p.exact`).
    pub fn launch_sample(
        &self,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        p: &SampleParams,
        ws: &mut Workspace,
    ) -> Result<()> {
        if p.s > ws.sample.len() {
            return Err(Error::InvalidArgument(format!(
                "dgc sample: {} samples exceed the buffer of {}",
                p.s,
                ws.sample.len()
            )));
        }
        let st = &*self.stream;
        let mut k = Vec::with_capacity(5);
        let (gp, up_, vp) = (
            addr(g, st, &mut k),
            addr(u, st, &mut k),
            addr(v, st, &mut k),
        );
        let out = addr_mut(&mut ws.sample, st, &mut k);
        let ctl = addr(&ws.ctl, st, &mut k);
        self.k_sample(gp, up_, vp, g.len(), p, out, ctl)
    }

    #[allow(clippy::too_many_arguments)]
    fn k_sample(
        &self,
        g: Addr,
        u: Addr,
        v: Addr,
        n: usize,
        p: &SampleParams,
        out: Addr,
        ctl: Addr,
    ) -> Result<()> {
        let (n, s64) = (n as u64, p.s as u64);
        let (mc, sfc, ex) = p.flags();
        let mut b = self.stream.launch_builder(&self.sample);
        b.arg(&g).arg(&u).arg(&v).arg(&n).arg(&p.up.scale).arg(&sfc);
        b.arg(&p.up.momentum)
            .arg(&mc)
            .arg(&p.seed)
            .arg(&p.step)
            .arg(&s64)
            .arg(&ex);
        b.arg(&out).arg(&ctl);
        unsafe { b.launch(self.grid(s64)) }
            .map(drop)
            .map_err(cuda("sample"))
    }

    /// `dgc_sample_select`: the sample and its radix select (to `CTL_THR`; two rounds, three when
    /// `p.exact`) in one cooperative launch. `Ok(false)`: it does not fit, nothing was launched.
    #[allow(clippy::too_many_arguments)]
    fn k_sample_select(
        &self,
        g: Addr,
        u: Addr,
        v: Addr,
        n: usize,
        p: &SampleParams,
        rank: usize,
        ctl: Addr,
        hist: Addr,
    ) -> Result<bool> {
        // Whole runs per thread; the float4 loads need 16-byte aligned tensors.
        let runs = p.s.div_ceil(select::SAMPLE_RUN as usize) * select::SAMPLE_RUN as usize;
        // One run per thread.
        let Some(cfg) = self.coop_grid(runs, self.coop_sample, select::SAMPLE_RUN as usize) else {
            return Ok(false);
        };
        if (g | u | v) % 16 != 0 {
            return Ok(false);
        }
        let (n, s64) = (n as u64, p.s as u64);
        let (mc, sfc, ex) = p.flags();
        let rank32 = to_u32(rank.clamp(1, p.s.max(1)), "rank")?;
        let (last, slot) = (if p.exact { 2i32 } else { 1 }, CTL_THR as i32);
        if self.pdl_on() {
            let mut a = kargs![
                &g,
                &u,
                &v,
                &n,
                &p.up.scale,
                &sfc,
                &p.up.momentum,
                &mc,
                &p.seed,
                &p.step,
                &s64,
                &ex,
                &rank32,
                &last,
                &slot,
                &ctl,
                &hist
            ];
            return self
                .launch_ex(&self.sample_select, cfg, &mut a, true, "sample_select")
                .map(|()| true);
        }
        let mut b = self.stream.launch_builder(&self.sample_select);
        b.arg(&g).arg(&u).arg(&v).arg(&n).arg(&p.up.scale).arg(&sfc);
        b.arg(&p.up.momentum).arg(&mc).arg(&p.seed).arg(&p.step);
        b.arg(&s64).arg(&ex).arg(&rank32).arg(&last).arg(&slot);
        b.arg(&ctl).arg(&hist);
        unsafe { b.launch_cooperative(cfg) }
            .map(|_| true)
            .map_err(cuda("sample_select"))
    }

    /// `dgc_topk_select`: the speculative top k of `cnt` candidates (two or three radix rounds and
    /// the filter, masking with `mask = Some((u, v, mask_momentum))`) in one cooperative launch.
    /// `Ok(false)`: it does not fit, nothing was launched.
    #[allow(clippy::too_many_arguments)]
    fn k_topk_select(
        &self,
        cand: (Addr, Addr),
        cnt: usize,
        k: usize,
        out: (Addr, Addr, usize),
        ctl: Addr,
        hist: Addr,
        band: (u32, u32),
        mask: (Addr, Addr, bool),
        publish: (Addr, u32),
    ) -> Result<bool> {
        // Four candidates per thread: twice the blocks of eight, for the masking's random stores.
        if !self.uva {
            return Ok(false);
        }
        let Some(cfg) = self.coop_grid(cnt, self.coop_topk, 4) else {
            return Ok(false);
        };
        let (c, rank, cap) = (
            to_u32(cnt, "count")?,
            to_u32(k.max(1), "k")?,
            to_u32(out.2, "k")?,
        );
        let mm = 1 + i32::from(mask.2);
        if self.pdl_on() {
            let mut a = kargs![
                &cand.0, &cand.1, &c, &rank, &cap, &out.0, &out.1, &ctl, &hist, &band.0, &band.1,
                &mask.0, &mask.1, &mm, &publish.0, &publish.1
            ];
            return self
                .launch_ex(&self.topk_select, cfg, &mut a, true, "topk_select")
                .map(|()| true);
        }
        let mut b = self.stream.launch_builder(&self.topk_select);
        b.arg(&cand.0).arg(&cand.1).arg(&c).arg(&rank).arg(&cap);
        b.arg(&out.0).arg(&out.1).arg(&ctl).arg(&hist);
        b.arg(&band.0).arg(&band.1).arg(&mask.0).arg(&mask.1);
        b.arg(&mm).arg(&publish.0).arg(&publish.1);
        unsafe { b.launch_cooperative(cfg) }
            .map(|_| true)
            .map_err(cuda("topk_select"))
    }

    /// The `rank`-th largest magnitude of `xs[..s]` into `ctl[out_slot]` (f32 bits): three launches
    /// of `dgc_radix_round`, no host synchronisation. `1 ≤ rank ≤ s` (clamped).
    pub fn launch_kth(
        &self,
        xs: &CudaSlice<f32>,
        s: usize,
        rank: usize,
        out_slot: usize,
        ctl: &mut CudaSlice<u32>,
        hist: &mut CudaSlice<u32>,
    ) -> Result<()> {
        self.launch_kth_spec(xs, s, rank, out_slot, ctl, hist, None)
    }

    /// [`DgcKernels::launch_kth`]; with `spec = Some((min_ok, cap))`, speculative: `s` is capped by
    /// `CTL_COUNT` on the device, and nothing happens unless `min_ok ≤ CTL_COUNT ≤ cap` (or the
    /// threshold is 0) and `CTL_COUNT > rank`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_kth_spec(
        &self,
        xs: &CudaSlice<f32>,
        s: usize,
        rank: usize,
        out_slot: usize,
        ctl: &mut CudaSlice<u32>,
        hist: &mut CudaSlice<u32>,
        spec: Option<(u32, u32)>,
    ) -> Result<()> {
        let st = &*self.stream;
        let mut k = Vec::with_capacity(3);
        let x = addr(xs, st, &mut k);
        let (c, h) = (addr_mut(ctl, st, &mut k), addr_mut(hist, st, &mut k));
        self.k_kth(x, s.min(xs.len()), rank, out_slot, c, h, spec, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn k_kth(
        &self,
        xs: Addr,
        s: usize,
        rank: usize,
        out_slot: usize,
        ctl: Addr,
        hist: Addr,
        spec: Option<(u32, u32)>,
        exact: bool,
    ) -> Result<()> {
        let (sp, min_ok, bcap) = spec.map_or((0i32, 0u32, 0u32), |(a, b)| (1, a, b));
        // Not exact: two rounds, the top 22 bits (select::truncated_kth).
        let last = if exact { 2i32 } else { 1 };
        let (s32, rank32) = (
            to_u32(s, "sample")?,
            to_u32(rank.clamp(1, s.max(1)), "rank")?,
        );
        let slot = out_slot as i32;
        // About eight values per thread.
        let blocks = (s.div_ceil(THREADS as usize * 8) as u32).clamp(1, self.sms * 2);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        for round in 0..=last {
            let mut b = self.stream.launch_builder(&self.radix);
            b.arg(&xs).arg(&s32).arg(&rank32).arg(&round);
            b.arg(&ctl).arg(&hist).arg(&slot).arg(&last);
            b.arg(&sp).arg(&min_ok).arg(&bcap);
            unsafe { b.launch(cfg) }
                .map(drop)
                .map_err(cuda("radix_round"))?;
        }
        Ok(())
    }

    /// Launch `dgc_fused` (count into `CTL_COUNT`, which must be zero). The threshold is
    /// `ctl[thr_slot]` when given, else `thr`; with `guard`, nothing happens when `dgc_check_norm`
    /// flagged the gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_fused(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        scale_from_ctl: bool,
        thr: f32,
        thr_slot: Option<usize>,
        guard: bool,
        ws: &mut Workspace,
    ) -> Result<()> {
        let st = &*self.stream;
        let cap = ws.idx.len();
        let mut k = Vec::with_capacity(6);
        let (gp, up_, vp) = (
            addr(g, st, &mut k),
            addr_mut(u, st, &mut k),
            addr_mut(v, st, &mut k),
        );
        let (i, x) = (
            addr_mut(&mut ws.idx, st, &mut k),
            addr_mut(&mut ws.val, st, &mut k),
        );
        let ctl = addr_mut(&mut ws.ctl, st, &mut k);
        let f = FusedParams {
            up,
            scale_from_ctl,
            thr,
            thr_slot,
            guard,
            pdl: false,
        };
        self.k_fused(gp, up_, vp, g.len(), &f, cap, i, x, ctl)
    }

    #[allow(clippy::too_many_arguments)]
    fn k_fused(
        &self,
        g: Addr,
        u: Addr,
        v: Addr,
        n: usize,
        f: &FusedParams,
        cap: usize,
        idx: Addr,
        val: Addr,
        ctl: Addr,
    ) -> Result<()> {
        let n = n as u64;
        let cap = to_u32(cap, "candidate capacity")?;
        let (mc, sfc, gd) = (
            i32::from(f.up.momentum_correction),
            i32::from(f.scale_from_ctl),
            i32::from(f.guard),
        );
        let slot = f.thr_slot.map_or(-1, |s| s as i32);
        if f.pdl {
            let mut a = kargs![
                &g,
                &u,
                &v,
                &n,
                &f.up.scale,
                &sfc,
                &f.up.momentum,
                &mc,
                &f.thr,
                &slot,
                &gd,
                &cap,
                &idx,
                &val,
                &ctl
            ];
            return self.launch_ex(&self.fused, self.grid(n / 4 + 1), &mut a, true, "fused");
        }
        let mut b = self.stream.launch_builder(&self.fused);
        b.arg(&g).arg(&u).arg(&v).arg(&n).arg(&f.up.scale).arg(&sfc);
        b.arg(&f.up.momentum)
            .arg(&mc)
            .arg(&f.thr)
            .arg(&slot)
            .arg(&gd)
            .arg(&cap);
        b.arg(&idx).arg(&val).arg(&ctl);
        unsafe { b.launch(self.grid(n / 4 + 1)) }
            .map(drop)
            .map_err(cuda("fused"))
    }

    /// Launch `dgc_select` (count into `CTL_COUNT`, which must be zero).
    pub fn launch_select(&self, v: &CudaSlice<f32>, thr: f32, ws: &mut Workspace) -> Result<()> {
        let n = v.len() as u64;
        let cap = to_u32(ws.idx.len(), "candidate capacity")?;
        let mut b = self.stream.launch_builder(&self.select);
        b.arg(v).arg(&n).arg(&thr).arg(&cap);
        b.arg(&mut ws.idx).arg(&mut ws.val).arg(&mut ws.ctl);
        unsafe { b.launch(self.grid(n)) }
            .map(drop)
            .map_err(cuda("select"))
    }

    /// Launch `dgc_mask` over the first `cnt` pairs.
    pub fn launch_mask(
        &self,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        idx: &CudaSlice<u32>,
        sent: &CudaSlice<f32>,
        cnt: usize,
        mask_momentum: bool,
    ) -> Result<()> {
        self.launch_mask_spec(u, v, idx, sent, cnt, mask_momentum, None)
    }

    /// [`DgcKernels::launch_mask`]; with `spec = Some((ctl, min_ok, cap))`, speculative: the count
    /// is capped by `CTL_SEL`, and nothing happens unless the candidate count is in the band.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_mask_spec(
        &self,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        idx: &CudaSlice<u32>,
        sent: &CudaSlice<f32>,
        cnt: usize,
        mask_momentum: bool,
        spec: Option<(&CudaSlice<u32>, u32, u32)>,
    ) -> Result<()> {
        let st = &*self.stream;
        let cnt = cnt.min(idx.len()).min(sent.len());
        let mut k = Vec::with_capacity(5);
        let (up_, vp) = (addr_mut(u, st, &mut k), addr_mut(v, st, &mut k));
        let (i, x) = (addr(idx, st, &mut k), addr(sent, st, &mut k));
        let spec = spec.map(|(c, a, b)| (addr(c, st, &mut k), a, b));
        self.k_mask(up_, vp, i, x, cnt, mask_momentum, spec)
    }

    #[allow(clippy::too_many_arguments)]
    fn k_mask(
        &self,
        u: Addr,
        v: Addr,
        idx: Addr,
        sent: Addr,
        cnt: usize,
        mask_momentum: bool,
        spec: Option<(Addr, u32, u32)>,
    ) -> Result<()> {
        if cnt == 0 {
            return Ok(());
        }
        let (c, mm) = (to_u32(cnt, "count")?, i32::from(mask_momentum));
        // Without spec the kernel never reads ctl; any address will do.
        let (sp, min_ok, bcap, ctl) =
            spec.map_or((0i32, 0u32, 0u32, idx), |(c, a, b)| (1, a, b, c));
        let mut b = self.stream.launch_builder(&self.mask);
        b.arg(&u).arg(&v).arg(&idx).arg(&sent).arg(&c).arg(&mm);
        b.arg(&sp).arg(&min_ok).arg(&bcap).arg(&ctl);
        unsafe { b.launch(self.grid(cnt as u64)) }
            .map(drop)
            .map_err(cuda("mask"))
    }

    /// Launch the top k's filter: of the candidates `ws.idx/val[..cnt]`, every one whose magnitude is
    /// above `CTL_KTH` (the k-th largest, from [`DgcKernels::launch_kth`] with `out_slot = CTL_KTH`
    /// and rank `k`; 0: keep every candidate) and, of those equal to it, the `CTL_KEEP` with the
    /// lowest indices (the host's [`select::finish_selection`] order), into `ws.sel_idx/sel_val`
    /// (unordered; counts into `CTL_SEL` and `CTL_TIES`). When `cnt > k`, first the three
    /// `dgc_tie_round`s that find the last tie kept (on the device they do nothing unless the ties
    /// need cutting, `CTL_EQ > CTL_KEEP`).
    /// With `spec = Some((min_ok, cap))`, speculative: the count is capped by `CTL_COUNT`, and
    /// nothing happens unless it is in the band.
    pub fn launch_filter(
        &self,
        cnt: usize,
        k: usize,
        ws: &mut Workspace,
        spec: Option<(u32, u32)>,
    ) -> Result<()> {
        let st = &*self.stream;
        let cap = ws.sel_idx.len().min(ws.sel_val.len());
        let mut keep = Vec::with_capacity(6);
        let (i, x) = (addr(&ws.idx, st, &mut keep), addr(&ws.val, st, &mut keep));
        let (si, sx) = (
            addr_mut(&mut ws.sel_idx, st, &mut keep),
            addr_mut(&mut ws.sel_val, st, &mut keep),
        );
        let (ctl, hist) = (
            addr_mut(&mut ws.ctl, st, &mut keep),
            addr_mut(&mut ws.hist, st, &mut keep),
        );
        let cnt = cnt.min(ws.idx.len());
        if cnt > k {
            self.k_tie_rounds(i, x, cnt, ctl, hist, spec)?;
        }
        // the rank as launch_kth clamps it: ties go after the `min(k, cnt) − CTL_KEEP` above
        self.k_filter(i, x, cnt, k.min(cnt), cap, si, sx, ctl, spec, None, true)
    }

    /// `dgc_filter` over `cnt` candidates: the top `rank` (see [`DgcKernels::launch_filter`]) into at
    /// most `cap` slots. `cut`: `dgc_tie_round` ran before (else the kernel does nothing when the
    /// ties need cutting, and the host runs the rounds and this again).
    #[allow(clippy::too_many_arguments)]
    fn k_filter(
        &self,
        idx: Addr,
        val: Addr,
        cnt: usize,
        rank: usize,
        cap: usize,
        sel_idx: Addr,
        sel_val: Addr,
        ctl: Addr,
        spec: Option<(u32, u32)>,
        mask: Option<(Addr, Addr, bool)>,
        cut: bool,
    ) -> Result<()> {
        let (c, rank, cap) = (to_u32(cnt, "count")?, to_u32(rank, "k")?, to_u32(cap, "k")?);
        let (sp, min_ok, bcap) = spec.map_or((0i32, 0u32, 0u32), |(a, b)| (1, a, b));
        // mask: (u, v, mask_momentum); the kernel touches u and v only when asked to.
        let (u, v, mm) = mask.map_or((0, 0, 0i32), |(u, v, m)| (u, v, 1 + i32::from(m)));
        let cut = i32::from(cut);
        let mut b = self.stream.launch_builder(&self.filter);
        b.arg(&idx).arg(&val).arg(&c).arg(&rank).arg(&cap);
        b.arg(&sel_idx).arg(&sel_val).arg(&ctl);
        b.arg(&sp).arg(&min_ok).arg(&bcap);
        b.arg(&u).arg(&v).arg(&mm).arg(&cut);
        unsafe { b.launch(self.grid(cnt as u64)) }
            .map(drop)
            .map_err(cuda("filter"))
    }

    /// The three `dgc_tie_round`s over `cnt` candidates: when more of them equal `CTL_KTH` than the
    /// top k keeps (`CTL_EQ > CTL_KEEP`), the highest index among the `CTL_KEEP` lowest of those
    /// into `CTL_TIE_LAST`; otherwise each launch returns at once. `spec` as in
    /// [`DgcKernels::launch_kth_spec`].
    fn k_tie_rounds(
        &self,
        idx: Addr,
        val: Addr,
        cnt: usize,
        ctl: Addr,
        hist: Addr,
        spec: Option<(u32, u32)>,
    ) -> Result<()> {
        let (sp, min_ok, bcap) = spec.map_or((0i32, 0u32, 0u32), |(a, b)| (1, a, b));
        let c = to_u32(cnt, "count")?;
        let blocks = (cnt.div_ceil(THREADS as usize * 8) as u32).clamp(1, self.sms * 2);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        for round in 0..3i32 {
            let mut b = self.stream.launch_builder(&self.tie_round);
            b.arg(&idx).arg(&val).arg(&c).arg(&round);
            b.arg(&ctl).arg(&hist).arg(&sp).arg(&min_ok).arg(&bcap);
            unsafe { b.launch(cfg) }
                .map(drop)
                .map_err(cuda("tie_round"))?;
        }
        Ok(())
    }

    /// Launch `dgc_decode_sorted`: `world` messages of `stride` pairs each (strictly ascending
    /// indices, padded with [`wire::PAD_INDEX`]) summed in rank order and divided by `world` into
    /// `dense`, which must be zero.
    pub fn launch_decode_sorted(
        &self,
        idx: &CudaSlice<u32>,
        val: &CudaSlice<f32>,
        world: usize,
        stride: usize,
        dense: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if world * stride == 0 {
            return Ok(());
        }
        let (w, st, n) = (
            to_u32(world, "world")?,
            to_u32(stride, "stride")?,
            dense.len() as u64,
        );
        let mut b = self.stream.launch_builder(&self.decode_sorted);
        b.arg(idx).arg(val).arg(&w).arg(&st).arg(dense).arg(&n);
        unsafe { b.launch(self.grid((world * stride) as u64)) }
            .map(drop)
            .map_err(cuda("decode_sorted"))
    }

    /// Launch `dgc_scatter_add_fixed` over `world` gathered fixed-k messages (`dense += values`,
    /// unordered atomics).
    pub fn launch_scatter_add_fixed(
        &self,
        msgs: &CudaSlice<u8>,
        world: usize,
        k: usize,
        bf16: bool,
        dense: &mut CudaSlice<f32>,
        err: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let (w, kk, b16, n) = (world as u32, k as u32, i32::from(bf16), dense.len() as u64);
        let mut b = self.stream.launch_builder(&self.scatter_add_fixed);
        b.arg(msgs)
            .arg(&w)
            .arg(&kk)
            .arg(&b16)
            .arg(dense)
            .arg(&n)
            .arg(err);
        unsafe { b.launch(self.grid((world * k) as u64)) }
            .map(drop)
            .map_err(cuda("scatter_add_fixed"))
    }

    /// Grow the candidate buffers to hold `cap` pairs.
    fn grow(&self, ws: &mut Workspace, cap: usize) -> Result<()> {
        if ws.idx.len() < cap {
            ws.idx = self.alloc(cap)?;
            ws.val = self.alloc(cap)?;
        }
        Ok(())
    }

    fn select_count(&self, v: &CudaSlice<f32>, thr: f32, ws: &mut Workspace) -> Result<usize> {
        let mut c0 = ws
            .ctl
            .try_slice_mut(CTL_COUNT..CTL_COUNT + 1)
            .ok_or_else(|| Error::cuda("dgc: control buffer too short"))?;
        self.stream.memset_zeros(&mut c0).map_err(cuda("memset"))?;
        self.launch_select(v, thr, ws)?;
        Ok(self.read_ctl(ws)?[CTL_COUNT] as usize)
    }

    /// Steps 1–4 of the module docs and the threshold correction: updates `u`, `v` with `g` and
    /// leaves the candidates (every `(i, v_i)` above the final threshold, between `lower·k` and
    /// `upper·k` of them unless the correction ran out) in `ws.idx/val[..count]`, unordered. Same
    /// semantics as [`select::compress`] before its `finish_selection`. `clip_limit`:
    /// `Some(clip_norm / √world)` to clip (the scale is computed on the device), `None` to use
    /// `up.scale`. A rejected gradient (see [`CandidateSet::bad`]) leaves `u`, `v` unchanged.
    #[allow(clippy::too_many_arguments)]
    pub fn find_candidates(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        clip_limit: Option<f64>,
        p: &SelectParams,
        ws: &mut Workspace,
        prof: Option<&mut StageTimes>,
    ) -> Result<CandidateSet> {
        self.candidates_impl(g, u, v, up, clip_limit, p, ws, prof, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn candidates_impl(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        clip_limit: Option<f64>,
        p: &SelectParams,
        ws: &mut Workspace,
        mut prof: Option<&mut StageTimes>,
        spec_mask: Option<bool>,
    ) -> Result<CandidateSet> {
        let n = g.len();
        if u.len() != n || v.len() != n {
            return Err(Error::LengthMismatch {
                what: "dgc: residual state on the device (one value per parameter)".into(),
                expected: n,
                got: u.len().min(v.len()),
            });
        }
        let mut out = CandidateSet {
            count: 0,
            first_count: 0,
            threshold: 0.0,
            adaptations: 0,
            clip_scale: up.scale,
            dense: false,
            bad: None,
            top_k_done: false,
        };
        if n == 0 {
            return Ok(out);
        }
        let mut mark = |name| match prof.as_deref_mut() {
            Some(t) => t.mark(&self.stream, name),
            None => Ok(()),
        };
        let k = p.k.clamp(1, n);
        let from_ctl = clip_limit.is_some();
        let cap = ((k as f64 * p.upper.max(1.0)).floor() as usize).max(k);
        // The smallest count that is not too few (count < lower·k).
        let min_ok = (p.lower * k as f64).ceil().max(0.0) as usize;
        let dense = k >= n;
        let (s, exact) = match p.sample {
            Some(s) if s < n => (s.max(1), false),
            _ => (n, true),
        };
        let rank = if exact {
            k
        } else {
            ((k as f64) * (s as f64) / (n as f64)).ceil().max(1.0) as usize
        };
        // Buffers first (they grow rarely), then one set of addresses for the whole enqueue.
        self.grow(ws, cap)?;
        if !dense && ws.sample.len() < s {
            ws.sample = self.alloc(s)?;
        }
        if spec_mask.is_some() && ws.sel_idx.len() < k {
            ws.sel_idx = self.alloc(k)?;
            ws.sel_val = self.alloc(k)?;
        }
        let (idx_cap, sel_cap) = (ws.idx.len(), ws.sel_idx.len());
        let band = (to_u32(min_ok, "band")?, to_u32(cap, "capacity")?);
        let fused = |thr, thr_slot| FusedParams {
            up,
            scale_from_ctl: from_ctl,
            thr,
            thr_slot,
            guard: true,
            pdl: self.pdl_on(),
        };
        mark("start")?;
        let mut published = None;
        {
            let Workspace {
                idx,
                val,
                sel_idx,
                sel_val,
                sample,
                ctl,
                hist,
                sumsq,
                host_ctl,
                seq,
                clean,
            } = ws;
            // The addresses check_norm needs first, the rest while it runs (each takes one or two
            // driver calls).
            let st = &*self.stream;
            let mut keep = Vec::with_capacity(11);
            let (gp, cp, sq) = (
                addr(g, st, &mut keep),
                addr_mut(ctl, st, &mut keep),
                addr_mut(sumsq, st, &mut keep),
            );
            if !*clean {
                self.k_zero(cp, CTL_LEN * 4)?;
                self.k_zero(sq, 8)?;
            }
            *clean = false;
            self.k_check_norm(gp, n, clip_limit.unwrap_or(0.0), sq, cp, true)?;
            let a = StepAddrs {
                g: gp,
                ctl: cp,
                u: addr_mut(u, st, &mut keep),
                v: addr_mut(v, st, &mut keep),
                idx: addr_mut(idx, st, &mut keep),
                val: addr_mut(val, st, &mut keep),
                sel_idx: addr_mut(sel_idx, st, &mut keep),
                sel_val: addr_mut(sel_val, st, &mut keep),
                sample: addr_mut(sample, st, &mut keep),
                hist: addr_mut(hist, st, &mut keep),
                _sync: keep,
            };
            mark("check + norm")?;
            if dense {
                let f = fused(f32::INFINITY, None);
                self.k_fused(a.g, a.u, a.v, n, &f, idx_cap, a.idx, a.val, a.ctl)?;
            } else {
                let sp = SampleParams {
                    up,
                    scale_from_ctl: from_ctl,
                    seed: p.seed,
                    step: p.step,
                    s,
                    exact,
                };
                if !self.k_sample_select(a.g, a.u, a.v, n, &sp, rank, a.ctl, a.hist)? {
                    self.k_sample(a.g, a.u, a.v, n, &sp, a.sample, a.ctl)?;
                    self.k_kth(a.sample, s, rank, CTL_THR, a.ctl, a.hist, None, exact)?;
                }
                mark("sample + threshold")?;
                let f = fused(0.0, Some(CTL_THR));
                self.k_fused(a.g, a.u, a.v, n, &f, idx_cap, a.idx, a.val, a.ctl)?;
                mark("fused pass")?;
                if let Some(mm) = spec_mask {
                    // The common case needs no correction: enqueue the top k and the masking now,
                    // guarded on the device by the band test, so that the count read-back is the
                    // only wait.
                    // Either way, at most k pairs are kept, and masked by the same launch.
                    let (c, b, kk) = (idx_cap, Some(band), k.min(sel_cap));
                    let (cand, out) = ((a.idx, a.val), (a.sel_idx, a.sel_val, kk));
                    let m = (a.u, a.v, mm);
                    // The kernel writes the control words to host_ctl itself (host memory is
                    // addressable from the device under unified addressing).
                    let next = seq.wrapping_add(1).max(1);
                    let hp = host_ctl
                        .as_mut_ptr()
                        .map_err(cuda("pinned control words"))?;
                    let publish = (hp as Addr, next);
                    if self.k_topk_select(cand, c, k, out, a.ctl, a.hist, band, m, publish)? {
                        *seq = next;
                        published = Some(next);
                    } else {
                        // Without the tie rounds: should the ties need cutting (CTL_EQ >
                        // CTL_KEEP, rare), the filter does nothing and the host finishes below.
                        self.k_kth(a.val, c, k, CTL_KTH, a.ctl, a.hist, b, true)?;
                        self.k_filter(
                            a.idx,
                            a.val,
                            c,
                            k,
                            kk,
                            a.sel_idx,
                            a.sel_val,
                            a.ctl,
                            b,
                            Some(m),
                            false,
                        )?;
                    }
                    mark("top k + mask (speculative)")?;
                }
            }
            if published.is_none() {
                self.k_ctl_to_host(a.ctl, host_ctl)?;
            }
        }
        out.dense = dense;
        let ctl = match published {
            Some(seq) => self.wait_published(&ws.host_ctl, seq)?,
            None => self.host_ctl(&ws.host_ctl)?,
        };
        // Every kernel of the step ran: dgc_check_norm and the radix rounds left their scratch zero.
        ws.clean = true;
        if ctl[CTL_STUCK] != 0 {
            // A one-launch select gave up on blocks that never became resident: its result is
            // void. Later steps use one launch per round; this one is an error.
            ws.clean = false;
            self.set_one_launch_select(false);
            return Err(Error::cuda(
                "dgc: a one-launch radix select timed out waiting for its own blocks (is the GPU \
                 partitioned, e.g. by MPS?); this step's selection is void, later steps use one \
                 launch per round (DgcKernels::set_one_launch_select(false))",
            ));
        }
        mark("count read-back")?;
        out.clip_scale = if from_ctl {
            f32::from_bits(ctl[CTL_SCALE])
        } else {
            up.scale
        };
        if ctl[CTL_BAD] != 0 {
            out.bad = Some(BadGradient::NonFinite((u32::MAX - ctl[CTL_BAD]) as usize));
            return Ok(out);
        }
        if ctl[CTL_OVF] != 0 {
            out.bad = Some(BadGradient::NormOverflow);
            return Ok(out);
        }
        if out.dense {
            return Ok(out);
        }
        let mut thr = f32::from_bits(ctl[CTL_THR]);
        let mut count = ctl[CTL_COUNT] as usize;
        out.first_count = count;
        out.top_k_done = spec_mask.is_some() && count <= cap && (count >= min_ok || thr == 0.0);
        // The multi-launch top k leaves ties that need cutting to the host (its filter did nothing
        // then); the one-launch top k cuts them itself.
        let uncut = ctl[CTL_KTH] != 0 && ctl[CTL_EQ] > ctl[CTL_KEEP];
        if let (Some(mm), true) = (spec_mask, out.top_k_done && published.is_none() && uncut) {
            self.cut_ties(u, v, count, k, mm, ws)?;
        }
        // The correction of select::compress, with read-only passes.
        let (mut too_many, mut too_few): (Option<f32>, Option<f32>) = (None, None);
        let few = |c: usize| (c as f64) < p.lower * k as f64;
        while out.adaptations < p.max_adapt {
            let next = if count > cap {
                too_many = Some(thr);
                too_few.map_or(f64::from(thr) * p.upper, |h| {
                    (f64::from(thr) * f64::from(h)).sqrt()
                })
            } else if few(count) && thr > 0.0 {
                too_few = Some(thr);
                too_many.map_or(f64::from(thr) * p.lower, |l| {
                    (f64::from(thr) * f64::from(l)).sqrt()
                })
            } else {
                break;
            };
            thr = next as f32;
            out.adaptations += 1;
            count = self.select_count(v, thr, ws)?;
        }
        if count > cap || (few(count) && too_many.is_some()) {
            // Not settled: everything above the last too-many threshold (or the current one).
            if count <= cap {
                thr = too_many.unwrap_or(thr);
            }
            count = self.select_count(v, thr, ws)?;
            if count > ws.idx.len() {
                self.grow(ws, count)?;
                count = self.select_count(v, thr, ws)?;
            }
        }
        mark("threshold correction")?;
        out.count = count.min(ws.idx.len());
        out.threshold = thr;
        Ok(out)
    }

    /// The end of the multi-launch speculative top k when its ties needed cutting (its `dgc_filter`
    /// then did nothing): the tie rounds, then the filter with the masking.
    fn cut_ties(
        &self,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        cnt: usize,
        k: usize,
        mask_momentum: bool,
        ws: &mut Workspace,
    ) -> Result<()> {
        let st = &*self.stream;
        let cnt = cnt.min(ws.idx.len());
        let cap = k.min(ws.sel_idx.len()).min(ws.sel_val.len());
        let mut keep = Vec::with_capacity(8);
        let m = (
            addr_mut(u, st, &mut keep),
            addr_mut(v, st, &mut keep),
            mask_momentum,
        );
        let (i, x) = (addr(&ws.idx, st, &mut keep), addr(&ws.val, st, &mut keep));
        let (si, sx) = (
            addr_mut(&mut ws.sel_idx, st, &mut keep),
            addr_mut(&mut ws.sel_val, st, &mut keep),
        );
        let (ctl, hist) = (
            addr_mut(&mut ws.ctl, st, &mut keep),
            addr_mut(&mut ws.hist, st, &mut keep),
        );
        self.k_tie_rounds(i, x, cnt, ctl, hist, None)?;
        self.k_filter(i, x, cnt, k, cap, si, sx, ctl, None, Some(m), true)
    }

    /// The whole compression step on the device: [`DgcKernels::find_candidates`], then the top k of the
    /// candidates into `ws.sel_idx/sel_val[..selected]` (unordered) and the masking of the sent
    /// (f32) values. Returns the candidate set and the number selected, `min(count, k)`.
    ///
    /// The top k is exactly [`select::finish_selection`]'s set: a radix select finds the k-th
    /// largest candidate magnitude; every candidate above it is kept, and of those equal to it the
    /// ones with the lowest indices, as many as fill k. Where more candidates tie at the k-th than
    /// that (exact ties are common in gradients of bf16 or f16 precision), a second radix select
    /// over the tied indices finds the last one kept: three more rounds in the one-launch kernel,
    /// three `dgc_tie_round` launches otherwise (in the speculative multi-launch path after the
    /// control words are read back, only then). Without such ties the speculative top k costs no
    /// extra round or launch; after a threshold correction the tie rounds are enqueued anyway
    /// (three launches that return at once).
    #[allow(clippy::too_many_arguments)]
    pub fn compress_step(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        clip_limit: Option<f64>,
        p: &SelectParams,
        mask_momentum: bool,
        ws: &mut Workspace,
        mut prof: Option<&mut StageTimes>,
    ) -> Result<(CandidateSet, usize)> {
        let c = self.candidates_impl(
            g,
            u,
            v,
            up,
            clip_limit,
            p,
            ws,
            prof.as_deref_mut(),
            Some(mask_momentum),
        )?;
        if c.bad.is_some() || c.dense || g.is_empty() {
            return Ok((c, 0));
        }
        let k = p.k.clamp(1, g.len());
        if c.top_k_done {
            return Ok((c, c.count.min(k)));
        }
        if ws.sel_idx.len() < k {
            ws.sel_idx = self.alloc(k)?;
            ws.sel_val = self.alloc(k)?;
        }
        if c.count > k {
            self.launch_kth(&ws.val, c.count, k, CTL_KTH, &mut ws.ctl, &mut ws.hist)?;
        }
        // CTL_KTH is 0 (keep every candidate) when there are at most k.
        self.launch_filter(c.count, k, ws, None)?;
        if let Some(t) = prof.as_deref_mut() {
            t.mark(&self.stream, "top k of candidates")?;
        }
        let selected = c.count.min(k);
        self.launch_mask(u, v, &ws.sel_idx, &ws.sel_val, selected, mask_momentum)?;
        if let Some(t) = prof {
            t.mark(&self.stream, "mask")?;
        }
        Ok((c, selected))
    }

    // The earlier API, kept for its callers.

    /// Scratch buffers (the earlier name of [`DgcKernels::workspace`]).
    pub fn candidates(&self, k: usize, cap: usize, s: usize) -> Result<Workspace> {
        self.workspace(k, cap, s)
    }

    /// `Σ g²` (f64) added into `out[0]`, which the caller zeroes (the norm half of
    /// `dgc_check_norm`, with its own control words).
    pub fn launch_sum_squares(&self, g: &CudaSlice<f32>, out: &mut CudaSlice<f64>) -> Result<()> {
        let n = g.len() as u64;
        let mut ctl = self.alloc::<u32>(CTL_LEN)?;
        let mut k = Vec::with_capacity(3);
        let gp = addr(g, &self.stream, &mut k);
        let o = addr_mut(out, &self.stream, &mut k);
        let c = addr_mut(&mut ctl, &self.stream, &mut k);
        self.k_check_norm(gp, n as usize, 0.0, o, c, false)
    }

    /// [`DgcKernels::compress_step`] with the scale given in `up` (no clipping on the device, no
    /// profile). Returns `(selected, final threshold)`; the pairs are `ws.sel_idx/sel_val[..selected]`.
    /// A non-finite gradient is an error (`u`, `v` unchanged).
    #[allow(clippy::too_many_arguments)]
    pub fn compress(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        p: &SelectParams,
        mask_momentum: bool,
        ws: &mut Workspace,
    ) -> Result<(usize, f32)> {
        let (c, selected) = self.compress_step(g, u, v, up, None, p, mask_momentum, ws, None)?;
        if let Some(bad) = c.bad {
            return Err(Error::InvalidArgument(format!(
                "dgc: non-finite gradient ({bad:?}); the residuals were not changed"
            )));
        }
        Ok((selected, c.threshold))
    }

    // Host-memory conveniences for the parity tests.

    /// `dgc_sample` on host data.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        g: &[f32],
        u: &[f32],
        v: &[f32],
        up: Update,
        seed: u64,
        step: u64,
        s: usize,
    ) -> Result<Vec<f32>> {
        let (g, u, v) = (self.upload(g)?, self.upload(u)?, self.upload(v)?);
        let mut ws = self.workspace(1, 1, s)?;
        let p = SampleParams {
            up,
            scale_from_ctl: false,
            seed,
            step,
            s,
            exact: false,
        };
        self.launch_sample(&g, &u, &v, &p, &mut ws)?;
        let mut r = self.download(&ws.sample)?;
        r.truncate(s);
        Ok(r)
    }

    /// The multi-block radix select on host data: the `rank`-th largest magnitude.
    pub fn kth_largest(&self, xs: &[f32], rank: usize) -> Result<f32> {
        let x = self.upload(xs)?;
        let mut ws = self.workspace(1, 1, 1)?;
        self.launch_kth(&x, xs.len(), rank, CTL_THR, &mut ws.ctl, &mut ws.hist)?;
        Ok(f32::from_bits(self.read_ctl(&ws)?[CTL_THR]))
    }

    /// First non-finite element of a device buffer (one `dgc_check_norm` pass; waits for the
    /// stream), for checking what a step produced.
    pub fn first_non_finite(&self, x: &CudaSlice<f32>) -> Result<Option<usize>> {
        let mut ws = self.workspace(1, 1, 1)?;
        self.reset(&mut ws)?;
        self.launch_check_norm(x, 0.0, &mut ws)?;
        let ctl = self.read_ctl(&ws)?;
        Ok((ctl[CTL_BAD] != 0).then(|| (u32::MAX - ctl[CTL_BAD]) as usize))
    }

    /// `dgc_check_norm` on host data: `(Σ g², clip scale for limit, first non-finite index)`.
    pub fn check_norm(&self, g: &[f32], limit: f64) -> Result<(f64, f32, Option<usize>)> {
        let gd = self.upload(g)?;
        let mut ws = self.workspace(1, 1, 1)?;
        self.reset(&mut ws)?;
        self.launch_check_norm(&gd, limit, &mut ws)?;
        let ctl = self.read_ctl(&ws)?;
        let sumsq = self.download(&ws.sumsq)?.first().copied().unwrap_or(0.0);
        let bad = (ctl[CTL_BAD] != 0).then(|| (u32::MAX - ctl[CTL_BAD]) as usize);
        Ok((sumsq, f32::from_bits(ctl[CTL_SCALE]), bad))
    }

    /// `dgc_fused` on host data: `(u, v, candidate idx, candidate val, count)` (candidates unordered).
    #[allow(clippy::type_complexity)]
    pub fn fused(
        &self,
        g: &[f32],
        u: &[f32],
        v: &[f32],
        up: Update,
        thr: f32,
        cap: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<u32>, Vec<f32>, usize)> {
        let g = self.upload(g)?;
        let (mut u, mut v) = (self.upload(u)?, self.upload(v)?);
        let mut ws = self.workspace(1, cap, 1)?;
        self.launch_fused(&g, &mut u, &mut v, up, false, thr, None, false, &mut ws)?;
        let cnt = self.read_ctl(&ws)?[CTL_COUNT] as usize;
        let mut i = self.download(&ws.idx)?;
        let mut x = self.download(&ws.val)?;
        i.truncate(cnt.min(cap));
        x.truncate(cnt.min(cap));
        Ok((self.download(&u)?, self.download(&v)?, i, x, cnt))
    }
}

/// One rank's DGC synchronizer with the gradient and the state (`u`, `v`) in device memory: the
/// device twin of [`Dgc`](super::Dgc), with the same configuration, wire format, exchange, statistics,
/// non-finite policy and checkpoints.
///
/// [`DeviceDgc::step`] compresses on the GPU ([`DgcKernels::find_candidates`]), downloads only the
/// candidates (about `upper·k` pairs), keeps the top k on the host exactly as the CPU does (ties:
/// lower index), encodes, all-gathers the messages through any [`Communicator`] (host memory, so any
/// backend), and decodes on the GPU (`dgc_decode_sorted`: the rank-ordered sum ÷ world, bit-identical
/// to the host decode) into the device gradient. Its `u`, `v` and updates are bit-identical to
/// [`Dgc::step`](super::Dgc::step)'s whenever the selected sets agree, i.e. except for the last bit
/// of a clip scale (the device sums `g²` in another order) and its consequences.
///
/// ```no_run
/// use ferroccl::dgc::{gpu::{DeviceDgc, DgcKernels}, DgcConfig};
/// use std::sync::Arc;
/// ferroccl::local::run(1, |comm| {
///     let kern = Arc::new(DgcKernels::new(0)?);
///     let mut dgc = DeviceDgc::new(kern.clone(), 1 << 20, DgcConfig::default())?;
///     let mut grad = kern.upload(&vec![0.5f32; 1 << 20])?; // this rank's gradient, on the device
///     let stats = dgc.step(comm, &mut grad, 0.0)?; // grad: the averaged sparse update
///     // with momentum correction on: w -= lr * grad (plain SGD)
///     Ok(stats)
/// })?;
/// # Ok::<(), ferroccl::Error>(())
/// ```
pub struct DeviceDgc {
    kern: Arc<DgcKernels>,
    cfg: DgcConfig,
    u: CudaSlice<f32>,
    v: CudaSlice<f32>,
    step: u64,
    ws: Workspace,
    backup: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    msg: Vec<u8>,
    gathered: Vec<u8>,
}

impl DeviceDgc {
    /// A synchronizer for `n_params` parameters on `kern`'s device (state zeroed there).
    pub fn new(kern: Arc<DgcKernels>, n_params: usize, cfg: DgcConfig) -> Result<DeviceDgc> {
        let st = super::Dgc::new(n_params, cfg)?;
        DeviceDgc::from_state(kern, st.state().clone())
    }

    /// Resume from a checkpoint (taken on the host or the device): uploads `u` and `v`.
    pub fn from_state(kern: Arc<DgcKernels>, st: DgcState) -> Result<DeviceDgc> {
        // The host constructor validates the configuration, lengths and finiteness.
        let st = super::Dgc::from_state(st)?.state().clone();
        let n = st.v.len();
        if n >= wire::PAD_INDEX as usize {
            return Err(Error::InvalidArgument(format!(
                "dgc: {n} parameters do not fit u32 indices; use one DeviceDgc per parameter group"
            )));
        }
        let ws = kern.workspace(1, 1, 1)?;
        Ok(DeviceDgc {
            u: kern.upload(&st.u)?,
            v: kern.upload(&st.v)?,
            kern,
            cfg: st.config,
            step: st.step,
            ws,
            backup: None,
            msg: Vec::new(),
            gathered: Vec::new(),
        })
    }

    /// The state, downloaded (to checkpoint, or to continue on the host with
    /// [`Dgc::from_state`](super::Dgc::from_state)).
    pub fn state(&self) -> Result<DgcState> {
        Ok(DgcState {
            config: self.cfg.clone(),
            u: self.kern.download(&self.u)?,
            v: self.kern.download(&self.v)?,
            step: self.step,
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.v.len()
    }

    /// True for zero parameters.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// The configuration.
    pub fn config(&self) -> &DgcConfig {
        &self.cfg
    }

    /// The kernels.
    pub fn kernels(&self) -> &Arc<DgcKernels> {
        &self.kern
    }

    /// The target number of values per rank at `epoch` (as [`Dgc::k_at`](super::Dgc::k_at)).
    pub fn k_at(&self, epoch: f64) -> usize {
        let n = self.len();
        ((self.cfg.density_at(epoch) * n as f64).ceil() as usize).clamp(1, n.max(1))
    }

    fn bad_error(&self, grad: &CudaSlice<f32>, bad: BadGradient) -> Error {
        let what = match bad {
            BadGradient::NormOverflow => "its squared norm overflows".to_string(),
            BadGradient::NonFinite(i) => {
                let x = grad
                    .try_slice(i..i + 1)
                    .and_then(|s| self.kern.stream.clone_dtoh(&s).ok())
                    .and_then(|v| v.first().copied());
                match x {
                    Some(x) => format!("value {x} at index {i}"),
                    None => format!("a non-finite value at index {i}"),
                }
            }
        };
        Error::InvalidArgument(format!(
            "dgc: non-finite gradient ({what}); the residuals were not changed"
        ))
    }

    /// One synchronisation step, as [`Dgc::step`](super::Dgc::step) with `grad` in device memory
    /// (same context as the kernels): compress into the device residuals, exchange the sparse
    /// messages through `comm`, and write the averaged sparse update into `grad`.
    pub fn step<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        grad: &mut CudaSlice<f32>,
        epoch: f64,
    ) -> Result<StepStats> {
        let n = self.len();
        if grad.len() != n {
            return Err(Error::LengthMismatch {
                what: "dgc step: device gradient (one value per parameter)".into(),
                expected: n,
                got: grad.len(),
            });
        }
        if **grad.context() != *self.kern.ctx {
            return Err(Error::InvalidArgument(
                "dgc step: the gradient lives in another CUDA context than the DGC kernels".into(),
            ));
        }
        let world = comm.world_size();
        let before = comm.bytes_sent();
        let mut stats = StepStats {
            clip_scale: 1.0,
            ..StepStats::default()
        };
        let cfg = self.cfg.clone();
        let kern = self.kern.clone();

        if !cfg.sparsify {
            kern.reset(&mut self.ws)?;
            kern.launch_check_norm(grad, 0.0, &mut self.ws)?;
            let ctl = kern.read_ctl(&self.ws)?;
            let bad = ctl[CTL_BAD] != 0;
            if bad && cfg.non_finite == NonFinite::Error {
                let i = (u32::MAX - ctl[CTL_BAD]) as usize;
                return Err(self.bad_error(grad, BadGradient::NonFinite(i)));
            }
            let mut flag = [f32::from(u8::from(bad))];
            if cfg.non_finite == NonFinite::SkipStep {
                comm.all_reduce(&mut flag, crate::ReduceOp::Max)?;
            }
            if flag[0] > 0.0 {
                kern.zero(grad)?;
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

        // Keep a copy of the state to undo the update if another rank skips, or if this step
        // produces a non-finite state or value from a finite gradient (issue 19; either policy).
        {
            if self.backup.is_none() {
                self.backup = Some((kern.alloc(n)?, kern.alloc(n)?));
            }
            if let Some((bu, bv)) = self.backup.as_mut() {
                kern.stream
                    .memcpy_dtod(&self.u, bu)
                    .map_err(cuda("backup"))?;
                kern.stream
                    .memcpy_dtod(&self.v, bv)
                    .map_err(cuda("backup"))?;
            }
        }
        let k = self.k_at(epoch);
        let up = Update {
            scale: 1.0,
            momentum: cfg.momentum,
            momentum_correction: cfg.momentum_correction,
        };
        let clip_limit = cfg
            .clipping
            .then(|| cfg.clip_norm / (world.max(1) as f64).sqrt());
        let p = SelectParams {
            k,
            sample: match cfg.selection {
                Selection::Sampled => {
                    Some(((cfg.sample_fraction * n as f64).ceil() as usize).max(1))
                }
                Selection::ExactTopK => None,
            },
            seed: cfg.seed,
            step: self.step,
            upper: cfg.upper_bound,
            lower: cfg.lower_bound,
            max_adapt: cfg.max_adapt,
        };
        let c = kern.find_candidates(
            grad,
            &mut self.u,
            &mut self.v,
            up,
            clip_limit,
            &p,
            &mut self.ws,
            None,
        )?;
        let mut stepped = false;
        if let Some(bad) = c.bad {
            match cfg.non_finite {
                NonFinite::Error => return Err(self.bad_error(grad, bad)),
                NonFinite::SkipStep => {
                    skip_message(&cfg, k, &mut self.msg);
                    stats.skipped = true;
                }
            }
        } else {
            let (mut idx, mut val) = if n == 0 {
                (Vec::new(), Vec::new())
            } else if c.dense {
                ((0..n as u32).collect(), kern.download(&self.v)?)
            } else {
                let i = self.ws.idx.try_slice(0..c.count);
                let x = self.ws.val.try_slice(0..c.count);
                match (i, x) {
                    (Some(i), Some(x)) => (
                        kern.stream.clone_dtoh(&i).map_err(cuda("download"))?,
                        kern.stream.clone_dtoh(&x).map_err(cuda("download"))?,
                    ),
                    _ => return Err(Error::cuda("dgc: candidate count out of range")),
                }
            };
            select::finish_selection(&mut idx, &mut val, k);
            wire::quantize(&mut val, cfg.values);
            // What the step produced must be finite too (issue 19): the quantized values (here on
            // the host) and the accumulated state (one `dgc_check_norm` pass over each). Untested
            // on a GPU in the session that added it (no device was available).
            let produced = match select::first_non_finite(&val) {
                Some(i) => Some(format!("quantized value {} (of index {})", val[i], idx[i])),
                None => match kern.first_non_finite(&self.v)? {
                    Some(i) => Some(format!("accumulated velocity at index {i}")),
                    None => kern
                        .first_non_finite(&self.u)?
                        .map(|i| format!("momentum at index {i}")),
                },
            };
            if let Some(what) = produced {
                if let Some((bu, bv)) = self.backup.as_ref() {
                    kern.stream
                        .memcpy_dtod(bu, &mut self.u)
                        .map_err(cuda("restore"))?;
                    kern.stream
                        .memcpy_dtod(bv, &mut self.v)
                        .map_err(cuda("restore"))?;
                }
                if cfg.non_finite == NonFinite::Error {
                    return Err(Error::InvalidArgument(format!(
                        "dgc: the step would make a non-finite {what} from a finite gradient (values near the f32 maximum with clipping off, or a bf16 overflow); the residuals were not changed: enable clipping or scale the loss down"
                    )));
                }
                skip_message(&cfg, k, &mut self.msg);
                stats.skipped = true;
                let (max_len, _) = exchange(comm, &cfg, &mut self.msg, &mut self.gathered)?;
                kern.zero(grad)?;
                stats.message_bytes = max_len;
                stats.compression_ratio = (4 * n) as f64 / max_len.max(1) as f64;
                stats.bytes_sent = comm.bytes_sent() - before;
                return Ok(stats);
            }
            let pad = (cfg.exchange == Exchange::FixedK).then_some(k);
            wire::encode(&idx, &val, cfg.index_coding, cfg.values, pad, &mut self.msg)?;
            if !idx.is_empty() {
                let di = kern.upload(&idx)?;
                let dx = kern.upload(&val)?;
                kern.launch_mask(
                    &mut self.u,
                    &mut self.v,
                    &di,
                    &dx,
                    idx.len(),
                    cfg.momentum_masking,
                )?;
            }
            self.step += 1;
            stepped = true;
            stats = StepStats {
                density: k as f64 / n.max(1) as f64,
                selected: idx.len(),
                k,
                threshold: c.threshold,
                adaptations: c.adaptations,
                clip_scale: c.clip_scale,
                ..stats
            };
        }

        let (max_len, any_skip) = exchange(comm, &cfg, &mut self.msg, &mut self.gathered)?;
        if any_skip {
            if stepped {
                if let Some((bu, bv)) = self.backup.as_ref() {
                    kern.stream
                        .memcpy_dtod(bu, &mut self.u)
                        .map_err(cuda("restore"))?;
                    kern.stream
                        .memcpy_dtod(bv, &mut self.v)
                        .map_err(cuda("restore"))?;
                }
                self.step -= 1;
            }
            kern.zero(grad)?;
            stats.skipped = true;
        } else {
            self.decode(grad, max_len, world, cfg.index_coding, &cfg)?;
        }
        stats.message_bytes = max_len;
        stats.compression_ratio = (4 * n) as f64 / max_len.max(1) as f64;
        stats.bytes_sent = comm.bytes_sent() - before;
        Ok(stats)
    }

    /// Decode the gathered messages into `grad`: parse on the host (validation as
    /// [`wire::decode`]), then the rank-ordered sum on the device. Messages whose indices are not
    /// strictly ascending (not produced by this crate) are decoded on the host instead.
    fn decode(
        &mut self,
        grad: &mut CudaSlice<f32>,
        max_len: usize,
        world: usize,
        coding: IndexCoding,
        cfg: &DgcConfig,
    ) -> Result<()> {
        let n = grad.len();
        let msgs: Vec<&[u8]> = self.gathered.chunks(max_len.max(1)).collect();
        let mut per: Vec<(Vec<u32>, Vec<f32>)> = Vec::with_capacity(world);
        let mut sorted = true;
        for (r, m) in msgs.iter().enumerate() {
            let (mut i, mut x) = (Vec::new(), Vec::new());
            wire::decode(m, n, coding, cfg.values, |a, b| {
                i.push(a);
                x.push(b);
            })
            .map_err(|e| Error::InvalidArgument(format!("dgc: message from rank {r}: {e}")))?;
            sorted &= i.windows(2).all(|w| w[0] < w[1]);
            per.push((i, x));
        }
        if !sorted {
            let mut dense = vec![0.0f32; n];
            wire::decode_average(&msgs, coding, cfg.values, &mut dense)?;
            self.kern
                .stream
                .memcpy_htod(&dense, grad)
                .map_err(cuda("upload"))?;
            return Ok(());
        }
        let stride = per.iter().map(|p| p.0.len()).max().unwrap_or(0);
        let mut idx = vec![wire::PAD_INDEX; world * stride];
        let mut val = vec![0.0f32; world * stride];
        for (r, (i, x)) in per.iter().enumerate() {
            idx[r * stride..r * stride + i.len()].copy_from_slice(i);
            val[r * stride..r * stride + x.len()].copy_from_slice(x);
        }
        self.kern.zero(grad)?;
        if stride > 0 {
            let di = self.kern.upload(&idx)?;
            let dx = self.kern.upload(&val)?;
            self.kern
                .launch_decode_sorted(&di, &dx, msgs.len(), stride, grad)?;
        }
        Ok(())
    }
}
