//! The CUDA path of DGC (feature `cuda`): the kernels of `cuda/dgc.cu`, compiled with NVRTC for the
//! running GPU, launched on one stream. Each kernel's CPU twin is in [`super::select`]; the parity
//! test is `tests/dgc.rs::gpu_kernels_match_cpu_twins`, the benchmark `benches/dgc_kernels.rs`.
//!
//! [`DgcKernels::compress`] runs the whole compression step on device memory in the order of
//! [`super::select::compress`]: (clip norm) → sample → k-th largest of the sample → fused pass →
//! read the count (the only host synchronisation) → threshold correction passes if needed → top k of
//! the candidates (k-th largest + filter) → mask. The selected pairs are left on the device, unsorted;
//! with ties at the k-th magnitude the filter may keep a different tied candidate than the CPU twin
//! (which keeps the lowest index), so parity is tested on the candidate sets.

use super::select::{SelectParams, Update};
use crate::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
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

/// Device buffers of one compression step's outputs.
pub struct Candidates {
    /// Candidate indices (capacity `cap`).
    pub idx: CudaSlice<u32>,
    /// Candidate values.
    pub val: CudaSlice<f32>,
    /// Selected indices (capacity `k`).
    pub sel_idx: CudaSlice<u32>,
    /// Selected values.
    pub sel_val: CudaSlice<f32>,
    /// Candidate counter.
    pub count: CudaSlice<u32>,
    /// Selected counter.
    pub sel_count: CudaSlice<u32>,
    /// Sample scratch.
    pub sample: CudaSlice<f32>,
    /// Threshold scratch.
    pub thr: CudaSlice<f32>,
    /// Sum of squares scratch.
    pub sumsq: CudaSlice<f64>,
}

/// The DGC kernels on one device and stream.
pub struct DgcKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    sum_squares: CudaFunction,
    sample: CudaFunction,
    kth: CudaFunction,
    fused: CudaFunction,
    select: CudaFunction,
    mask: CudaFunction,
    filter: CudaFunction,
    scatter_add_fixed: CudaFunction,
    blocks: u32,
}

const THREADS: u32 = 256;

impl DgcKernels {
    /// Open device `ordinal` and compile the kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<DgcKernels> {
        // cudarc's dynamic loading panics when libcuda is missing: turn that into an error.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::Cuda("libcuda.so (the NVIDIA driver) could not be loaded".into()))?
            .map_err(cuda("open device"))?;
        let (maj, min) = ctx
            .compute_capability()
            .map_err(cuda("compute capability"))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda("SM count"))?;
        let ptx = compile_ptx(&format!("sm_{maj}{min}"))?;
        let module = ctx.load_module(ptx).map_err(cuda("load module"))?;
        let f = |name: &str| module.load_function(name).map_err(cuda("load function"));
        Ok(DgcKernels {
            stream: ctx.default_stream(),
            sum_squares: f("dgc_sum_squares")?,
            sample: f("dgc_sample")?,
            kth: f("dgc_kth_largest")?,
            fused: f("dgc_fused")?,
            select: f("dgc_select")?,
            mask: f("dgc_mask")?,
            filter: f("dgc_filter")?,
            scatter_add_fixed: f("dgc_scatter_add_fixed")?,
            blocks: (sms.max(1) as u32) * 8,
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
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(x).map_err(cuda("upload"))
    }

    /// Download a device buffer.
    pub fn download<T: cudarc::driver::DeviceRepr>(&self, x: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(x).map_err(cuda("download"))
    }

    /// Scratch buffers for `n` parameters, `k` selected, sample of `s`, candidate capacity `cap`.
    pub fn candidates(&self, k: usize, cap: usize, s: usize) -> Result<Candidates> {
        let z = |e| cuda::<cudarc::driver::DriverError>("alloc")(e);
        Ok(Candidates {
            idx: self.stream.alloc_zeros(cap.max(1)).map_err(z)?,
            val: self.stream.alloc_zeros(cap.max(1)).map_err(z)?,
            sel_idx: self.stream.alloc_zeros(k.max(1)).map_err(z)?,
            sel_val: self.stream.alloc_zeros(k.max(1)).map_err(z)?,
            count: self.stream.alloc_zeros(1).map_err(z)?,
            sel_count: self.stream.alloc_zeros(1).map_err(z)?,
            sample: self.stream.alloc_zeros(s.max(1)).map_err(z)?,
            thr: self.stream.alloc_zeros(1).map_err(z)?,
            sumsq: self.stream.alloc_zeros(1).map_err(z)?,
        })
    }

    /// Launch `dgc_sum_squares` (accumulates into `out[0]`, which the caller zeroes).
    pub fn launch_sum_squares(&self, g: &CudaSlice<f32>, out: &mut CudaSlice<f64>) -> Result<()> {
        let n = g.len() as u64;
        let mut b = self.stream.launch_builder(&self.sum_squares);
        b.arg(g).arg(&n).arg(out);
        unsafe { b.launch(self.grid(n)) }
            .map(drop)
            .map_err(cuda("sum_squares"))
    }

    /// Launch `dgc_sample` (`out.len()` samples).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_sample(
        &self,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        up: Update,
        seed: u64,
        step: u64,
        s: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (n, s) = (g.len() as u64, s as u64);
        let mc = i32::from(up.momentum_correction);
        let mut b = self.stream.launch_builder(&self.sample);
        b.arg(g)
            .arg(u)
            .arg(v)
            .arg(&n)
            .arg(&up.scale)
            .arg(&up.momentum)
            .arg(&mc);
        b.arg(&seed).arg(&step).arg(&s).arg(out);
        unsafe { b.launch(self.grid(s)) }
            .map(drop)
            .map_err(cuda("sample"))
    }

    /// Launch `dgc_kth_largest` over the first `s` values of `xs` (one block).
    pub fn launch_kth(
        &self,
        xs: &CudaSlice<f32>,
        s: usize,
        rank: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (s, rank) = (s as u32, rank.max(1) as u32);
        let mut b = self.stream.launch_builder(&self.kth);
        b.arg(xs).arg(&s).arg(&rank).arg(out);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(cuda("kth_largest"))
    }

    /// Launch `dgc_fused`; `count` (one u32) must be zeroed.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_fused(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        thr: f32,
        idx: &mut CudaSlice<u32>,
        val: &mut CudaSlice<f32>,
        count: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let n = g.len() as u64;
        let cap = idx.len() as u32;
        let mc = i32::from(up.momentum_correction);
        let mut b = self.stream.launch_builder(&self.fused);
        b.arg(g)
            .arg(u)
            .arg(v)
            .arg(&n)
            .arg(&up.scale)
            .arg(&up.momentum)
            .arg(&mc)
            .arg(&thr);
        b.arg(&cap).arg(idx).arg(val).arg(count);
        unsafe { b.launch(self.grid(n / 4 + 1)) }
            .map(drop)
            .map_err(cuda("fused"))
    }

    /// Launch `dgc_select`; `count` must be zeroed.
    pub fn launch_select(
        &self,
        v: &CudaSlice<f32>,
        thr: f32,
        idx: &mut CudaSlice<u32>,
        val: &mut CudaSlice<f32>,
        count: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let n = v.len() as u64;
        let cap = idx.len() as u32;
        let mut b = self.stream.launch_builder(&self.select);
        b.arg(v)
            .arg(&n)
            .arg(&thr)
            .arg(&cap)
            .arg(idx)
            .arg(val)
            .arg(count);
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
        let (c, mm) = (cnt as u32, i32::from(mask_momentum));
        let mut b = self.stream.launch_builder(&self.mask);
        b.arg(u).arg(v).arg(idx).arg(sent).arg(&c).arg(&mm);
        unsafe { b.launch(self.grid(cnt as u64)) }
            .map(drop)
            .map_err(cuda("mask"))
    }

    /// Launch `dgc_filter`: keep candidates with magnitude ≥ `thr` (at most `out_idx.len()`).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_filter(
        &self,
        idx: &CudaSlice<u32>,
        val: &CudaSlice<f32>,
        cnt: usize,
        thr: f32,
        out_idx: &mut CudaSlice<u32>,
        out_val: &mut CudaSlice<f32>,
        count: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let (c, cap) = (cnt as u32, out_idx.len() as u32);
        let mut b = self.stream.launch_builder(&self.filter);
        b.arg(idx)
            .arg(val)
            .arg(&c)
            .arg(&thr)
            .arg(&cap)
            .arg(out_idx)
            .arg(out_val)
            .arg(count);
        unsafe { b.launch(self.grid(cnt as u64)) }
            .map(drop)
            .map_err(cuda("filter"))
    }

    /// Launch `dgc_scatter_add_fixed` over `world` gathered fixed-k messages (`dense += values`).
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

    fn read_u32(&self, x: &CudaSlice<u32>, i: usize) -> Result<u32> {
        let v = self.download(x)?;
        v.get(i)
            .copied()
            .ok_or_else(|| Error::Cuda("dgc: counter buffer too short".into()))
    }

    fn zero<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        x: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream.memset_zeros(x).map_err(cuda("memset"))
    }

    /// The whole compression step on the device (see the module docs). Clipping, if wanted, is in
    /// `up.scale` (compute it from [`DgcKernels::launch_sum_squares`]). Returns
    /// `(selected, threshold)`; the selected pairs are `c.sel_idx[..selected]`, `c.sel_val[..selected]`,
    /// and `u`, `v` are updated and masked (f32 values sent).
    #[allow(clippy::too_many_arguments)]
    pub fn compress(
        &self,
        g: &CudaSlice<f32>,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        up: Update,
        p: &SelectParams,
        mask_momentum: bool,
        c: &mut Candidates,
    ) -> Result<(usize, f32)> {
        let n = g.len();
        let k = p.k.clamp(1, n.max(1));
        let cap = c.idx.len();
        let s = p.sample.unwrap_or(n).clamp(1, c.sample.len());
        self.launch_sample(g, u, v, up, p.seed, p.step, s, &mut c.sample)?;
        let rank = ((k as f64) * (s as f64) / (n as f64)).ceil().max(1.0) as usize;
        self.launch_kth(&c.sample, s, rank, &mut c.thr)?;
        let mut thr = self.download(&c.thr)?.first().copied().unwrap_or(0.0);
        self.zero(&mut c.count)?;
        self.launch_fused(g, u, v, up, thr, &mut c.idx, &mut c.val, &mut c.count)?;
        let mut count = self.read_u32(&c.count, 0)? as usize;
        let (mut too_many, mut too_few): (Option<f32>, Option<f32>) = (None, None);
        let few = |c: usize| (c as f64) < p.lower * k as f64;
        let mut adapt = 0;
        while adapt < p.max_adapt {
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
            adapt += 1;
            self.zero(&mut c.count)?;
            self.launch_select(v, thr, &mut c.idx, &mut c.val, &mut c.count)?;
            count = self.read_u32(&c.count, 0)? as usize;
        }
        if count > cap {
            return Err(Error::Unsupported(format!(
                "dgc on the device: {count} candidates exceed the capacity {cap} after {adapt} corrections; raise the capacity"
            )));
        }
        // Top k of the candidates: the k-th largest magnitude among them, then a filter.
        let cnt = count.min(cap);
        let kth = if cnt > k {
            self.launch_kth(&c.val, cnt, k, &mut c.thr)?;
            self.download(&c.thr)?.first().copied().unwrap_or(thr)
        } else {
            thr
        };
        self.zero(&mut c.sel_count)?;
        self.launch_filter(
            &c.idx,
            &c.val,
            cnt,
            kth,
            &mut c.sel_idx,
            &mut c.sel_val,
            &mut c.sel_count,
        )?;
        let selected = cnt.min(k);
        self.launch_mask(u, v, &c.sel_idx, &c.sel_val, selected, mask_momentum)?;
        Ok((selected, kth))
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
        let mut out = self.stream.alloc_zeros(s.max(1)).map_err(cuda("alloc"))?;
        self.launch_sample(&g, &u, &v, up, seed, step, s, &mut out)?;
        let mut r = self.download(&out)?;
        r.truncate(s);
        Ok(r)
    }

    /// `dgc_kth_largest` on host data.
    pub fn kth_largest(&self, xs: &[f32], rank: usize) -> Result<f32> {
        let x = self.upload(xs)?;
        let mut out = self.stream.alloc_zeros(1).map_err(cuda("alloc"))?;
        self.launch_kth(&x, xs.len(), rank, &mut out)?;
        Ok(self.download(&out)?.first().copied().unwrap_or(0.0))
    }

    /// `dgc_sum_squares` on host data.
    pub fn sum_squares(&self, g: &[f32]) -> Result<f64> {
        let g = self.upload(g)?;
        let mut out = self.stream.alloc_zeros(1).map_err(cuda("alloc"))?;
        self.launch_sum_squares(&g, &mut out)?;
        Ok(self.download(&out)?.first().copied().unwrap_or(0.0))
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
        let mut idx = self.stream.alloc_zeros(cap.max(1)).map_err(cuda("alloc"))?;
        let mut val = self.stream.alloc_zeros(cap.max(1)).map_err(cuda("alloc"))?;
        let mut count = self.stream.alloc_zeros(1).map_err(cuda("alloc"))?;
        self.launch_fused(&g, &mut u, &mut v, up, thr, &mut idx, &mut val, &mut count)?;
        let cnt = self.read_u32(&count, 0)? as usize;
        let mut i = self.download(&idx)?;
        let mut x = self.download(&val)?;
        i.truncate(cnt.min(cap));
        x.truncate(cnt.min(cap));
        Ok((self.download(&u)?, self.download(&v)?, i, x, cnt))
    }
}
