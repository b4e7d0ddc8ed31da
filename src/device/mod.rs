//! Device memory support (feature `cuda`): library probing and staging.
//!
//! cudarc loads libcuda, libnvrtc and libnccl lazily and *panics* when one is missing; every entry
//! point of ferroccl that touches CUDA calls [`probe`] first, which turns a missing library into an
//! [`Error::Cuda`] naming the library and how to point at it.
//!
//! Backends that cannot use device memory (in-process, TCP, MPI) receive device buffers through
//! [`stage`]: inputs are copied device → pinned host, the host collective runs, outputs are copied back
//! on the buffer's stream — what Gloo and Horovod do. So one GPU can host several in-process ranks
//! (tests), and MPI-only clusters work with device tensors.

pub mod stage;

use crate::{Error, Result};
use std::sync::OnceLock;

/// A CUDA library ferroccl loads at run time. This is the crate's one library probe: the kernels
/// (`kernels::CudaKernels`, `kernels::compile_all`), DGC's device path and NCCL all check through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lib {
    /// The driver, libcuda.so.1 (comes with the NVIDIA driver).
    Cuda,
    /// The run-time compiler, libnvrtc.so (CUDA toolkit, or `pip install nvidia-cuda-nvrtc`).
    Nvrtc,
    /// NCCL, libnccl.so.2 (NCCL package, or `pip install nvidia-nccl-cu13`).
    Nccl,
}

impl Lib {
    /// Whether the loader finds the library (looked up once per process: a library does not appear
    /// or vanish while the process runs, and the check is a `dlopen`).
    fn present(self) -> bool {
        static CUDA: OnceLock<bool> = OnceLock::new();
        static NVRTC: OnceLock<bool> = OnceLock::new();
        static NCCL: OnceLock<bool> = OnceLock::new();
        // SAFETY: these only try to dlopen candidate names; nothing is called.
        match self {
            Lib::Cuda => *CUDA.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() }),
            Lib::Nvrtc => *NVRTC.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }),
            Lib::Nccl => *NCCL.get_or_init(|| unsafe { cudarc::nccl::sys::is_culib_present() }),
        }
    }

    /// The error for a missing library: which one, and how to point at it.
    pub fn missing(self) -> Error {
        let (name, hint) = match self {
            Lib::Cuda => (
                "libcuda.so.1 (the NVIDIA driver library)",
                "this machine has no NVIDIA driver or it is not on the loader path: install the driver, or add the folder holding libcuda.so.1 to LD_LIBRARY_PATH; on machines without a GPU use kernels::CpuKernels and host buffers",
            ),
            Lib::Nvrtc => (
                "libnvrtc.so (the CUDA run-time compiler)",
                "ferroccl compiles its CUDA kernels at run time with NVRTC: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`, then add the folder holding libnvrtc.so.13 (e.g. .../site-packages/nvidia/cu13/lib) to LD_LIBRARY_PATH, or set FERROCCL_KERNEL_CACHE to a folder already holding compiled kernels",
            ),
            Lib::Nccl => (
                "libnccl.so.2 (NCCL)",
                "install NCCL or `pip install nvidia-nccl-cu13`, then add the folder holding libnccl.so.2 to LD_LIBRARY_PATH",
            ),
        };
        Error::cuda(format!("{name} could not be loaded: {hint}"))
    }
}

/// Check that the libraries are loadable; call before any cudarc function.
pub fn probe(libs: &[Lib]) -> Result<()> {
    probe_with(libs, |l| l.present())
}

/// [`probe`] with an injectable check (tests): the first library of `libs` for which `present` is
/// false is the error.
pub fn probe_with(libs: &[Lib], present: impl Fn(Lib) -> bool) -> Result<()> {
    match libs.iter().find(|&&l| !present(l)) {
        Some(&l) => Err(l.missing()),
        None => Ok(()),
    }
}

/// True if `libnvrtc` can be loaded (so `kernels::compile_all` can run; no GPU needed).
pub fn nvrtc_available() -> bool {
    Lib::Nvrtc.present()
}

/// True if `libcuda` (the driver) can be loaded. A GPU may still be absent.
pub fn driver_available() -> bool {
    Lib::Cuda.present()
}

/// Number of CUDA devices (0 when the driver is missing).
pub fn device_count() -> usize {
    if probe(&[Lib::Cuda]).is_err() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// Wrap a CUDA driver error: the crate's one CUDA error helper (`what` failed, and the driver's
/// `CUresult`). The closure form is [`cu_err`].
pub(crate) fn drv(context: &str, e: cudarc::driver::DriverError) -> Error {
    Error::cuda_code(e.0 as i32, format!("{context}: {e:?}"))
}

/// [`drv`] as a `map_err` argument: `.map_err(cu_err("copying to the host"))`.
pub(crate) fn cu_err(
    what: impl std::fmt::Display,
) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| drv(&what.to_string(), e)
}
