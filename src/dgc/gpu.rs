//! The CUDA path of DGC (feature `cuda`): the kernels of `cuda/dgc.cu`, compiled with NVRTC for the
//! running GPU (through [`CudaKernels::load_function`], so they share its compile caches), launched on
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
//! 2. `dgc_sample` — `|v'|` at the sample indices (runs of [`select::SAMPLE_RUN`] consecutive
//!    indices at hashed positions), `v'` computed on the fly from `g`, `u`, `v` (a gather of
//!    `3·s` values, one 32-byte sector per run and array, not a pass over the tensor);
//! 3. `dgc_radix_round` ×2 — a multi-block radix select (11 + 11 bits) of the sample's
//!    `⌈k·s/n⌉`-th largest value, its low 10 bits cleared ([`select::truncated_kth`]), left in
//!    device memory (×3, exact, for [`Selection::ExactTopK`](super::Selection));
//! 4. `dgc_fused` — clip-scale, momentum, accumulate, threshold test and compaction in one pass, reading
//!    the scale and the threshold from device memory; it does nothing when step 1 found a non-finite
//!    value, so the state is untouched without a host synchronisation;
//!
//! then copies the control words to page-locked memory and waits for the stream — the only
//! synchronisation in the common case. Only when the
//! count is outside the band (`> upper·k` or `< lower·k`) does it correct the threshold with
//! read-only `dgc_select` passes, exactly as [`select::compress`] does.
//! [`DgcKernels::compress_step`] adds the top k of the candidates (three radix rounds among the
//! candidates, then `dgc_filter`, which also does the masking), all on the device and, in the
//! common case, enqueued before the read-back.
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
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::sync::Arc;

fn cuda<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Cuda(format!("dgc {what}: {e:?}"))
}

/// Compile `cuda/dgc.cu` to PTX for `arch` (e.g. `"sm_90"`); needs only libnvrtc.
pub fn compile_ptx(arch: &str) -> Result<Ptx> {
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "-default-device".into(),
        ],
        name: Some("dgc.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(super::DGC_CU, opts).map_err(cuda("NVRTC compile of cuda/dgc.cu"))
}

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
/// Index of the filtered (selected) count.
pub const CTL_SEL: usize = 5;
/// Index of the k-th largest candidate magnitude (f32 bits).
pub const CTL_KTH: usize = 9;
/// Number of control words.
pub const CTL_LEN: usize = 16;
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
    /// Page-locked host copy of `ctl`: the read-back is one asynchronous copy and a stream wait.
    host_ctl: PinnedHostSlice<u32>,
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

/// `dgc_fused`'s scalar arguments.
struct FusedParams {
    up: Update,
    scale_from_ctl: bool,
    thr: f32,
    thr_slot: Option<usize>,
    guard: bool,
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
    decode_sorted: CudaFunction,
    scatter_add_fixed: CudaFunction,
    blocks: u32,
    sms: u32,
}

const THREADS: u32 = 256;

fn to_u32(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::InvalidArgument(format!("dgc: {what} {x} exceeds u32")))
}

impl DgcKernels {
    /// Open device `ordinal` on a new stream and compile the kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<DgcKernels> {
        DgcKernels::with_kernels(&CudaKernels::new(ordinal)?)
    }

    /// The kernels on `k`'s device and stream, compiled and cached by [`CudaKernels::load_function`].
    pub fn with_kernels(k: &CudaKernels) -> Result<DgcKernels> {
        let ctx = k.context().clone();
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda("SM count"))?;
        let f = |name: &str| k.load_function("dgc.cu", super::DGC_CU, name);
        let sms = (sms.max(1)) as u32;
        Ok(DgcKernels {
            stream: k.stream().clone(),
            check_norm: f("dgc_check_norm")?,
            sample: f("dgc_sample")?,
            radix: f("dgc_radix_round")?,
            fused: f("dgc_fused")?,
            select: f("dgc_select")?,
            mask: f("dgc_mask")?,
            filter: f("dgc_filter")?,
            decode_sorted: f("dgc_decode_sorted")?,
            scatter_add_fixed: f("dgc_scatter_add_fixed")?,
            blocks: sms * 8,
            sms,
            ctx,
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
            return Err(Error::Cuda("dgc: control buffer too short".into()));
        }
        Ok(c.to_vec())
    }

    /// Read the control words (waits for the stream).
    pub fn read_ctl(&self, ws: &Workspace) -> Result<Vec<u32>> {
        let c = self.download(&ws.ctl)?;
        if c.len() < CTL_LEN {
            return Err(Error::Cuda("dgc: control buffer too short".into()));
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
        unsafe { b.launch(self.grid(n / 4 + 1)) }
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
        let (mc, sfc, ex) = (
            i32::from(p.up.momentum_correction),
            i32::from(p.scale_from_ctl),
            i32::from(p.exact),
        );
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

    /// Launch `dgc_filter`: keep the candidates `ws.idx/val[..cnt]` with magnitude ≥ `CTL_KTH` into
    /// `ws.sel_idx/sel_val` (count into `CTL_SEL`).
    /// With `spec = Some((min_ok, cap))`, speculative: the count is capped by `CTL_COUNT`, and
    /// nothing happens unless it is in the band.
    pub fn launch_filter(
        &self,
        cnt: usize,
        ws: &mut Workspace,
        spec: Option<(u32, u32)>,
    ) -> Result<()> {
        let st = &*self.stream;
        let cap = ws.sel_idx.len();
        let mut k = Vec::with_capacity(5);
        let (i, x) = (addr(&ws.idx, st, &mut k), addr(&ws.val, st, &mut k));
        let (si, sx) = (
            addr_mut(&mut ws.sel_idx, st, &mut k),
            addr_mut(&mut ws.sel_val, st, &mut k),
        );
        let ctl = addr_mut(&mut ws.ctl, st, &mut k);
        self.k_filter(i, x, cnt, cap, si, sx, ctl, spec, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn k_filter(
        &self,
        idx: Addr,
        val: Addr,
        cnt: usize,
        cap: usize,
        sel_idx: Addr,
        sel_val: Addr,
        ctl: Addr,
        spec: Option<(u32, u32)>,
        mask: Option<(Addr, Addr, bool)>,
    ) -> Result<()> {
        let (c, cap) = (to_u32(cnt, "count")?, to_u32(cap, "k")?);
        let (sp, min_ok, bcap) = spec.map_or((0i32, 0u32, 0u32), |(a, b)| (1, a, b));
        // mask: (u, v, mask_momentum); the kernel touches u and v only when asked to.
        let (u, v, mm) = mask.map_or((0, 0, 0i32), |(u, v, m)| (u, v, 1 + i32::from(m)));
        let mut b = self.stream.launch_builder(&self.filter);
        b.arg(&idx).arg(&val).arg(&c).arg(&cap);
        b.arg(&sel_idx).arg(&sel_val).arg(&ctl);
        b.arg(&sp).arg(&min_ok).arg(&bcap);
        b.arg(&u).arg(&v).arg(&mm);
        unsafe { b.launch(self.grid(cnt as u64)) }
            .map(drop)
            .map_err(cuda("filter"))
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
            .ok_or_else(|| Error::Cuda("dgc: control buffer too short".into()))?;
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
        };
        mark("start")?;
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
                self.k_sample(a.g, a.u, a.v, n, &sp, a.sample, a.ctl)?;
                self.k_kth(a.sample, s, rank, CTL_THR, a.ctl, a.hist, None, exact)?;
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
                    let m = Some((a.u, a.v, mm));
                    self.k_kth(a.val, c, k, CTL_KTH, a.ctl, a.hist, b, true)?;
                    self.k_filter(a.idx, a.val, c, kk, a.sel_idx, a.sel_val, a.ctl, b, m)?;
                    mark("top k + mask (speculative)")?;
                }
            }
            self.k_ctl_to_host(a.ctl, host_ctl)?;
        }
        out.dense = dense;
        let ctl = self.host_ctl(&ws.host_ctl)?;
        // Every kernel of the step ran: dgc_check_norm and the radix rounds left their scratch zero.
        ws.clean = true;
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

    /// The whole compression step on the device: [`DgcKernels::find_candidates`], then the top k of the
    /// candidates (radix select among them + `dgc_filter`, ties at the k-th magnitude broken
    /// arbitrarily) into `ws.sel_idx/sel_val[..selected]` (unordered) and the masking of the sent
    /// (f32) values. Returns the candidate set and the number selected.
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
        self.launch_filter(c.count, ws, None)?;
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

        // Under SkipStep, keep a copy of the state to undo the update if another rank skips.
        if cfg.non_finite == NonFinite::SkipStep {
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
                    _ => return Err(Error::Cuda("dgc: candidate count out of range".into())),
                }
            };
            select::finish_selection(&mut idx, &mut val, k);
            wire::quantize(&mut val, cfg.values);
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
