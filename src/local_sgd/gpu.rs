//! DiLoCo on device memory (feature `cuda`): the global copy and the outer momentum live on the GPU
//! next to the trainer's `CudaSlice<f32>` parameters, and the outer step is one fused kernel
//! (`cuda/local_sgd.cu`, CPU twin [`super::outer::apply`]).
//!
//! [`DeviceDiloco::sync`] is one round: `lsgd_pseudo_grad` (Δ = φ − θ), an all-reduce Avg of Δ on any
//! communicator (NCCL directly; local/tcp/MPI stage the device buffer through pinned host memory),
//! then `lsgd_outer` (momentum, Nesterov step, φ update, θ write-back) — five arrays touched once.
//! Unlike the host [`super::LocalSgd`], this path has no NaN flag (the check would need a reduction
//! kernel) and one flat tensor per instance; it is compiled in CI but only runs on a GPU.

use super::outer::Outer;
use crate::kernels::CudaKernels;
use crate::{Communicator, CommunicatorExt, Error, ReduceOp, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

fn cu(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        code: None,
        message: format!("local_sgd: {what}: {e}"),
    }
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch `lsgd_pseudo_grad`: `out = global − local`.
pub fn pseudo_gradient(
    k: &CudaKernels,
    global: &CudaSlice<f32>,
    local: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = global.len();
    if local.len() != n || out.len() != n {
        return Err(Error::LengthMismatch {
            what: "local_sgd::gpu::pseudo_gradient: global, local and out".into(),
            expected: n,
            got: local.len().min(out.len()),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let f = k.load(crate::kernels::registry::LOCAL_SGD, "lsgd_pseudo_grad")?;
    let n64 = n as u64;
    let mut b = k.stream().launch_builder(&f);
    b.arg(global).arg(local).arg(out).arg(&n64);
    // SAFETY: (const float*, const float*, float*, u64 n), all of length n (checked above).
    unsafe { b.launch(cfg(n)) }.map_err(cu("launching lsgd_pseudo_grad"))?;
    Ok(())
}

/// Launch the fused `lsgd_outer` (see [`super::outer::apply`] for the semantics). `mom` may be
/// empty when `outer` has no momentum.
pub fn apply(
    k: &CudaKernels,
    outer: &Outer,
    alpha: f32,
    delta: &CudaSlice<f32>,
    global: &mut CudaSlice<f32>,
    mom: &mut CudaSlice<f32>,
    local: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = delta.len();
    let has_mom = i32::from(outer.has_momentum() && mom.len() == n);
    if global.len() != n || local.len() != n || (outer.has_momentum() && has_mom == 0) {
        return Err(Error::LengthMismatch {
            what: "local_sgd::gpu::apply: delta, global, momentum and local".into(),
            expected: n,
            got: global.len().min(local.len()),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let f = k.load(crate::kernels::registry::LOCAL_SGD, "lsgd_outer")?;
    let (n64, nesterov) = (n as u64, i32::from(outer.nesterov));
    let mut b = k.stream().launch_builder(&f);
    b.arg(delta)
        .arg(global)
        .arg(mom)
        .arg(local)
        .arg(&n64)
        .arg(&outer.lr)
        .arg(&outer.momentum)
        .arg(&nesterov)
        .arg(&has_mom)
        .arg(&alpha);
    // SAFETY: the kernel's signature is (const float*, float*, float*, float*, u64, float, float,
    // int, int, float); every array has n elements (mom only read when has_mom).
    unsafe { b.launch(cfg(n)) }.map_err(cu("launching lsgd_outer"))?;
    Ok(())
}

/// DiLoCo's outer state on the device for one flat parameter tensor.
pub struct DeviceDiloco {
    k: CudaKernels,
    outer: Outer,
    h: u64,
    step: u64,
    rounds: u64,
    global: CudaSlice<f32>,
    mom: CudaSlice<f32>,
    delta: CudaSlice<f32>,
}

impl DeviceDiloco {
    /// Start from `params` (copied to the global copy); every rank must pass equal parameters.
    pub fn new(k: CudaKernels, outer: Outer, h: u64, params: &CudaSlice<f32>) -> Result<Self> {
        if h == 0 {
            return Err(Error::InvalidArgument(
                "local SGD: h = 0 inner steps per round; use h ≥ 1".into(),
            ));
        }
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "local SGD: empty parameter tensor".into(),
            ));
        }
        let s = k.stream().clone();
        let global = s.clone_dtod(params).map_err(cu("copying the parameters"))?;
        let mom = if outer.has_momentum() {
            s.alloc_zeros(params.len()).map_err(cu("allocating"))?
        } else {
            s.alloc_zeros(1).map_err(cu("allocating"))?
        };
        let delta = s.alloc_zeros(params.len()).map_err(cu("allocating"))?;
        Ok(DeviceDiloco {
            k,
            outer,
            h,
            step: 0,
            rounds: 0,
            global,
            mom,
            delta,
        })
    }

    /// Rounds completed.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The global copy.
    pub fn global(&self) -> &CudaSlice<f32> {
        &self.global
    }

    /// Report an inner step; every `h`-th one syncs (returns true).
    pub fn step<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut CudaSlice<f32>,
    ) -> Result<bool> {
        if params.len() != self.global.len() {
            return Err(Error::LengthMismatch {
                what: "local SGD (device): parameters".into(),
                expected: self.global.len(),
                got: params.len(),
            });
        }
        self.step += 1;
        if self.step % self.h != 0 {
            return Ok(false);
        }
        self.sync(comm, params)?;
        Ok(true)
    }

    /// One round now: pseudo-gradient kernel, all-reduce Avg, fused outer kernel.
    pub fn sync<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        params: &mut CudaSlice<f32>,
    ) -> Result<()> {
        pseudo_gradient(&self.k, &self.global, params, &mut self.delta)?;
        self.k
            .stream()
            .synchronize()
            .map_err(cu("waiting for the pseudo-gradient"))?;
        comm.all_reduce(&mut self.delta, ReduceOp::Avg)?;
        let mut empty;
        let mom = if self.outer.has_momentum() {
            &mut self.mom
        } else {
            empty = self
                .k
                .stream()
                .alloc_zeros::<f32>(0)
                .map_err(cu("allocating"))?;
            &mut empty
        };
        apply(
            &self.k,
            &self.outer,
            0.0,
            &self.delta,
            &mut self.global,
            mom,
            params,
        )?;
        self.k
            .stream()
            .synchronize()
            .map_err(cu("waiting for the outer step"))?;
        self.rounds += 1;
        Ok(())
    }
}
