//! Data-movement kernels with a CPU twin: gather/scatter rows, sparse scatter-add, float casts,
//! scale-and-add.
//!
//! Every kernel is a method of the [`Kernels`] trait, which has two implementations with identical
//! semantics:
//!
//! * [`CpuKernels`] — plain Rust over `Vec<T>`; always available; it is the reference.
//! * `CudaKernels` (feature `cuda`) — CUDA kernels over `cudarc::driver::CudaSlice<T>` on one
//!   stream of one device.
//!
//! The memory type is the trait's generic associated type [`Kernels::Buf`], so algorithm code is
//! written once, generic over `K: Kernels`, and runs on host or device memory:
//!
//! ```
//! use ferroccl::kernels::{CpuKernels, Kernels};
//!
//! fn pack_then_scale<K: Kernels>(k: &K) -> ferroccl::Result<Vec<f32>> {
//!     let src = k.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?; // 3 rows of 2
//!     let idx = k.upload(&[2u32, 0])?;
//!     let mut packed = k.alloc::<f32>(4)?;
//!     k.gather_rows(&src, &idx, 2, &mut packed)?; // [5, 6, 1, 2]
//!     let ones = k.upload(&[1.0f32; 4])?;
//!     k.scale_add(0.5, &ones, &mut packed)?; // packed += 0.5 * ones
//!     k.download(&packed)
//! }
//! assert_eq!(pack_then_scale(&CpuKernels).unwrap(), vec![5.5, 6.5, 1.5, 2.5]);
//! // With the `cuda` feature: pack_then_scale(&CudaKernels::new(0)?)
//! ```
//!
//! # How the CUDA side is built
//!
//! The kernels are the `.cu` files of the crate's `cuda/` folder, embedded in the library with
//! `include_str!` (plus the shared header `cuda/common.cuh`) and listed in one place, the
//! [`registry`] (adding a kernel file is one line there). Nothing is compiled at build time (no
//! `nvcc`): the first call that needs a file compiles it with NVRTC for the running GPU's architecture
//! (`sm_XY` from its compute capability) and loads the resulting CUBIN (the PTX is kept as a
//! fallback). Loaded modules are cached per (device, file) for the life of the process. If the
//! environment variable `FERROCCL_KERNEL_CACHE` names a directory, the compiled CUBIN and PTX are also
//! stored there, keyed by a hash of the sources, the architecture, the compile options and the NVRTC
//! version, and later processes load them instead of compiling.
//!
//! The CUDA implementation needs `libcuda.so` (the driver) and `libnvrtc.so.13` at run time; both
//! are looked up when `CudaKernels::new` is called, and their absence is a clear
//! [`Error::Cuda`], never a panic. `compile_all` compiles every kernel for
//! a given architecture with NVRTC alone (no GPU needed); CI uses it to fail on any error or warning.
//!
//! # Semantics shared by both implementations
//!
//! * Arguments are checked before any work: wrong lengths are
//!   [`Error::LengthMismatch`], `row_len == 0` is
//!   [`Error::InvalidArgument`].
//! * An index that is not smaller than the number of rows (or the dense length) is
//!   [`Error::InvalidArgument`] on both. The CPU twin checks all
//!   indices before writing anything; the CUDA kernels skip such rows and raise a device-side error
//!   flag which is read back after the launch (see `CudaKernels` for the deferred mode), so on
//!   that error the destination's contents are unspecified.
//! * Float arithmetic is never fused: `w * s` and `d + v` are rounded separately on both sides
//!   (`__fmul_rn`/`__fadd_rn` on the GPU), so results are bit-identical whenever the order of additions
//!   is fixed. The exceptions, where only a tolerance holds, are accumulations into the same element
//!   from several places: [`Kernels::scatter_rows`] with `accumulate` and duplicate indices, and
//!   [`Kernels::scatter_add`] with duplicate indices (CUDA uses atomics in unspecified order; the CPU
//!   adds in index order); and weighted 16-bit accumulation (below). NaN payloads produced by
//!   arithmetic may differ (the GPU produces the canonical NaN); casts and copies preserve them
//!   exactly as the `half` crate does.
//! * 16-bit float types ([`half::bf16`], [`half::f16`]) are computed in f32 and rounded once per
//!   stored value, round to nearest even (like `half`'s `from_f32`) — on the CPU twin always. On CUDA,
//!   [`Kernels::scatter_rows`] with `accumulate` uses the GPU's native 16-bit atomic add where the
//!   architecture has it (bf16: sm_90 and newer; f16: sm_70 and newer; elsewhere a compare-and-swap
//!   loop that rounds once, like the CPU twin). Its addend is a 16-bit value, so with weights the
//!   product `w * s` is first rounded to the 16-bit type (round to nearest even) and the hardware then
//!   rounds the sum: two roundings per contribution instead of one. Each element then lies within
//!   `2 · (adds + 1) · u · (|d| + Σ|w·s|) + u · Σ|w·s|` of the CPU twin's result, with or without
//!   duplicate indices (`u` = 2⁻⁸ for bf16, 2⁻¹¹ for f16: the unit roundoff, half an ulp relative;
//!   `adds` = contributions to that element; plus half the smallest subnormal per rounding near
//!   zero). Without weights the addend is the source value itself and, without duplicates, the
//!   result is bit-identical. Non-accumulating scatters are always bit-identical.

use crate::dtype::Element;
use crate::{Error, Result};
use half::{bf16, f16};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod registry;

pub use cpu::CpuKernels;
#[cfg(feature = "cuda")]
pub use cuda::{compile_all, compile_source, kernel_sources, CudaKernels};
pub use registry::KernelFile;

mod sealed {
    pub trait Sealed {}
}

/// An element type the kernels can hold in a buffer: the crate's [`Element`] types plus `u32`
/// (indices). With the `cuda` feature it also implies cudarc's `DeviceRepr + ValidAsZeroBits`.
#[cfg(not(feature = "cuda"))]
pub trait KernelElem:
    sealed::Sealed + bytemuck::Pod + Send + Sync + PartialEq + std::fmt::Debug + 'static
{
}

/// An element type the kernels can hold in a buffer: the crate's [`Element`] types plus `u32`
/// (indices). With the `cuda` feature it also implies cudarc's `DeviceRepr + ValidAsZeroBits`.
#[cfg(feature = "cuda")]
pub trait KernelElem:
    sealed::Sealed
    + bytemuck::Pod
    + Send
    + Sync
    + PartialEq
    + std::fmt::Debug
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}

macro_rules! kernel_elem {
    ($($t:ty),*) => {$(impl sealed::Sealed for $t {} impl KernelElem for $t {})*};
}
kernel_elem!(f32, f64, f16, bf16, i32, i64, u8, u32);

/// Which float format a [`FloatElem`] is (selects the CUDA kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatKind {
    /// 32-bit float.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
}

/// A float element type that [`Kernels::scatter_rows`] can weight and accumulate: f32, bf16, f16
/// (the 16-bit types are computed in f32 and rounded once per stored value; see the
/// [module docs](self) for CUDA's native 16-bit atomic accumulation).
pub trait FloatElem: KernelElem + Element {
    /// The format, as a runtime tag.
    const KIND: FloatKind;
    /// Widen to f32 (exact).
    fn to_f32(self) -> f32;
    /// Narrow from f32, round to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl FloatElem for f32 {
    const KIND: FloatKind = FloatKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl FloatElem for bf16 {
    const KIND: FloatKind = FloatKind::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl FloatElem for f16 {
    const KIND: FloatKind = FloatKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The kernels, over a memory type chosen by the implementation. See the [module docs](self) for the
/// shared semantics (argument checks, rounding, tolerances).
///
/// All methods are stream-ordered: on CUDA they are enqueued on the implementation's stream and
/// return before the work is done (except `download`, and the index check described in the module
/// docs); [`Kernels::synchronize`] waits for everything enqueued.
pub trait Kernels {
    /// The buffer type. Host: `Vec<T>`; CUDA: `cudarc::driver::CudaSlice<T>`.
    type Buf<T: KernelElem>;

    /// A buffer of `n` zeroed elements.
    fn alloc<T: KernelElem>(&self, n: usize) -> Result<Self::Buf<T>>;

    /// A buffer holding a copy of `host`.
    fn upload<T: KernelElem>(&self, host: &[T]) -> Result<Self::Buf<T>>;

    /// Copy a buffer back to host memory (waits for the work enqueued before it).
    fn download<T: KernelElem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;

    /// Number of elements in a buffer.
    fn len<T: KernelElem>(&self, buf: &Self::Buf<T>) -> usize;

    /// Gather rows ("pack"): `dst[r, :] = src[idx[r], :]` for every `r < idx.len()`, rows of
    /// `row_len` elements. Works on the raw bytes of any `T` (16-byte vectorised on CUDA when the row
    /// size and pointers allow), so it is exact for every type, NaN payloads included.
    ///
    /// Needs `src.len() % row_len == 0`, `dst.len() == idx.len() * row_len` and every
    /// `idx[r] < src.len() / row_len`.
    fn gather_rows<T: KernelElem>(
        &self,
        src: &Self::Buf<T>,
        idx: &Self::Buf<u32>,
        row_len: usize,
        dst: &mut Self::Buf<T>,
    ) -> Result<()>;

    /// Scatter rows ("unpack" / MoE "combine"): for every `r < idx.len()`,
    /// `dst[idx[r], :] = w[r] * src[r, :]`, or `+=` when `accumulate`. Without weights the factor is
    /// omitted (not multiplied by 1), so an overwriting scatter without weights is an exact copy.
    /// 16-bit types compute in f32 and round once per stored value, except weighted accumulation on
    /// CUDA GPUs with native 16-bit atomics, which also rounds each product `w * s` to the 16-bit type
    /// before adding it (see the [module docs](self) for the tolerance).
    ///
    /// Needs `src.len() == idx.len() * row_len`, `dst.len() % row_len == 0`,
    /// `weights.len() == idx.len()` and every `idx[r] < dst.len() / row_len`.
    ///
    /// Duplicate indices: with `accumulate`, every contribution is added (CUDA: atomics in
    /// unspecified order, so float results may differ from the CPU's row-order sum by rounding);
    /// without `accumulate`, which duplicate wins is unspecified on CUDA (the CPU twin: the last).
    fn scatter_rows<T: FloatElem>(
        &self,
        src: &Self::Buf<T>,
        idx: &Self::Buf<u32>,
        weights: Option<&Self::Buf<f32>>,
        row_len: usize,
        accumulate: bool,
        dst: &mut Self::Buf<T>,
    ) -> Result<()>;

    /// Sparse scatter-add: `dense[idx[i]] += val[i]` for every `i`. Needs
    /// `idx.len() == val.len()` and every `idx[i] < dense.len()`. Duplicate indices are summed
    /// (in unspecified order on CUDA).
    fn scatter_add(
        &self,
        idx: &Self::Buf<u32>,
        val: &Self::Buf<f32>,
        dense: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `y[i] = bf16::from_f32(x[i])` (round to nearest even). Needs `x.len() == y.len()`.
    fn cast_f32_to_bf16(&self, x: &Self::Buf<f32>, y: &mut Self::Buf<bf16>) -> Result<()>;

    /// `y[i] = x[i].to_f32()` (exact). Needs `x.len() == y.len()`.
    fn cast_bf16_to_f32(&self, x: &Self::Buf<bf16>, y: &mut Self::Buf<f32>) -> Result<()>;

    /// `y[i] = f16::from_f32(x[i])` (round to nearest even). Needs `x.len() == y.len()`.
    fn cast_f32_to_f16(&self, x: &Self::Buf<f32>, y: &mut Self::Buf<f16>) -> Result<()>;

    /// `y[i] = x[i].to_f32()` (exact). Needs `x.len() == y.len()`.
    fn cast_f16_to_f32(&self, x: &Self::Buf<f16>, y: &mut Self::Buf<f32>) -> Result<()>;

    /// Scale-and-add: `y[i] = a * x[i] + y[i]`, product and sum rounded separately (no FMA). Needs
    /// `x.len() == y.len()`.
    fn scale_add(&self, a: f32, x: &Self::Buf<f32>, y: &mut Self::Buf<f32>) -> Result<()>;

    /// Wait for all enqueued work (a no-op on the host). On CUDA in deferred index-check mode this
    /// also reports an out-of-range index seen since the last check.
    fn synchronize(&self) -> Result<()>;
}

// ------------------------------------------------------------------------------------------------
// Argument checks shared by both implementations, so their errors are identical.

pub(crate) fn check_row_len(op: &str, row_len: usize) -> Result<()> {
    if row_len == 0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: row_len must be at least 1"
        )));
    }
    Ok(())
}

fn check_len(what: String, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::LengthMismatch {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

fn rows_of(op: &str, name: &str, len: usize, row_len: usize) -> Result<usize> {
    if len % row_len != 0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: {name} has {len} elements, not a whole number of rows of {row_len}"
        )));
    }
    Ok(len / row_len)
}

/// Checks `gather_rows`' lengths; returns the number of source rows.
pub(crate) fn check_gather(
    src_len: usize,
    idx_len: usize,
    row_len: usize,
    dst_len: usize,
) -> Result<usize> {
    const OP: &str = "gather_rows";
    check_row_len(OP, row_len)?;
    let src_rows = rows_of(OP, "src", src_len, row_len)?;
    let want = idx_len
        .checked_mul(row_len)
        .ok_or_else(|| Error::InvalidArgument(format!("{OP}: idx.len() * row_len overflows")))?;
    check_len(
        format!("{OP}: dst (idx.len() = {idx_len} rows of {row_len})"),
        want,
        dst_len,
    )?;
    Ok(src_rows)
}

/// Checks `scatter_rows`' lengths; returns the number of destination rows.
pub(crate) fn check_scatter(
    src_len: usize,
    idx_len: usize,
    weights_len: Option<usize>,
    row_len: usize,
    dst_len: usize,
) -> Result<usize> {
    const OP: &str = "scatter_rows";
    check_row_len(OP, row_len)?;
    let want = idx_len
        .checked_mul(row_len)
        .ok_or_else(|| Error::InvalidArgument(format!("{OP}: idx.len() * row_len overflows")))?;
    check_len(
        format!("{OP}: src (idx.len() = {idx_len} rows of {row_len})"),
        want,
        src_len,
    )?;
    if let Some(w) = weights_len {
        check_len(format!("{OP}: weights (one per index)"), idx_len, w)?;
    }
    rows_of(OP, "dst", dst_len, row_len)
}

pub(crate) fn check_same_len(op: &str, x: usize, y: usize) -> Result<()> {
    check_len(format!("{op}: output (same length as the input)"), x, y)
}

pub(crate) fn check_scatter_add(idx_len: usize, val_len: usize) -> Result<()> {
    check_len(
        "scatter_add: val (one value per index)".to_string(),
        idx_len,
        val_len,
    )
}

pub(crate) fn bad_index(op: &str, index: u32, what: &str, bound: usize) -> Error {
    Error::InvalidArgument(format!(
        "{op}: index {index} is out of range for {what} of {bound}"
    ))
}
