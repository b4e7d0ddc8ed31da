//! Element types and reduction operators.
//!
//! Collectives move bytes; a [`DType`] tag says how to interpret them when reducing. Any type that is
//! [`bytemuck::Pod`] and implements [`Element`] can be communicated. Half-precision types reduce in f32
//! and round once per pairwise reduction step, as NCCL does.

use crate::{Error, Result};
use half::{bf16, f16};

/// The element type of a buffer, as a runtime tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Unsigned byte.
    U8,
}

impl DType {
    /// Every dtype, for tests and benches.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// nccl-tests' short name (`float`, `half`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
        }
    }

    /// Parse nccl-tests' or Rust's name.
    pub fn parse(s: &str) -> Result<DType> {
        Ok(match s {
            "float" | "f32" | "float32" => DType::F32,
            "double" | "f64" | "float64" => DType::F64,
            "half" | "f16" | "float16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "int32" | "i32" | "int" => DType::I32,
            "int64" | "i64" => DType::I64,
            "uint8" | "u8" => DType::U8,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown dtype {s:?}; use one of float, double, half, bfloat16, int32, int64, uint8"
                )))
            }
        })
    }

    /// Small integer code used on the wire (checked mode, TCP frames).
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(c: u8) -> Option<DType> {
        DType::ALL.get(c as usize).copied()
    }

    /// True for floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A type that can be communicated: plain old data plus its dtype tag.
pub trait Element: bytemuck::Pod + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// The runtime tag for this type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(impl Element for $t { const DTYPE: DType = DType::$d; })*};
}
element!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i32 => I32, i64 => I64, u8 => U8);

/// Reduction operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise product.
    Prod,
    /// Elementwise minimum.
    Min,
    /// Elementwise maximum.
    Max,
    /// Sum divided by the number of ranks (integer division for integer types, as NCCL's `ncclAvg`).
    Avg,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ];

    /// nccl-tests' name.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// Parse nccl-tests' name.
    pub fn parse(s: &str) -> Result<ReduceOp> {
        ReduceOp::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown reduction {s:?}; use sum, prod, min, max or avg"
                ))
            })
    }

    /// Wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The operator that is applied pairwise (Avg reduces as Sum and divides once at the end).
    pub const fn pairwise(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            o => o,
        }
    }
}

/// Elementwise arithmetic used by the reductions, implemented once per element type.
trait Arith: Copy {
    fn combine(self, other: Self, op: ReduceOp) -> Self;
    fn div_n(self, n: usize) -> Self;
}

macro_rules! arith_float {
    ($($t:ty),*) => {$(impl Arith for $t {
        #[inline(always)]
        fn combine(self, o: Self, op: ReduceOp) -> Self {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => self + o,
                ReduceOp::Prod => self * o,
                ReduceOp::Min => if o < self { o } else { self },
                ReduceOp::Max => if o > self { o } else { self },
            }
        }
        #[inline(always)]
        fn div_n(self, n: usize) -> Self { self / n as $t }
    })*};
}
arith_float!(f32, f64);

macro_rules! arith_int {
    ($($t:ty),*) => {$(impl Arith for $t {
        #[inline(always)]
        fn combine(self, o: Self, op: ReduceOp) -> Self {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => self.wrapping_add(o),
                ReduceOp::Prod => self.wrapping_mul(o),
                ReduceOp::Min => self.min(o),
                ReduceOp::Max => self.max(o),
            }
        }
        // `n as u8` would be 0 at 256 ranks (a division by zero) and wrong above: a count beyond
        // the type's range exceeds every value's magnitude, so the quotient truncates to 0.
        #[inline(always)]
        fn div_n(self, n: usize) -> Self {
            match <$t>::try_from(n.max(1)) {
                Ok(d) => self / d,
                Err(_) => 0,
            }
        }
    })*};
}
arith_int!(i32, i64, u8);

macro_rules! arith_half {
    ($($t:ty),*) => {$(impl Arith for $t {
        #[inline(always)]
        fn combine(self, o: Self, op: ReduceOp) -> Self {
            <$t>::from_f32(self.to_f32().combine(o.to_f32(), op))
        }
        #[inline(always)]
        fn div_n(self, n: usize) -> Self { <$t>::from_f32(self.to_f32() / n as f32) }
    })*};
}
arith_half!(f16, bf16);

// Monomorphic per-op loops so the compiler vectorises each (a `match` inside the loop would not).
fn combine_slice<T: Arith + bytemuck::Pod>(dst: &mut [T], src: &[T], op: ReduceOp) {
    macro_rules! lp {
        ($op:expr) => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = d.combine(*s, $op);
            }
        };
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => lp!(ReduceOp::Sum),
        ReduceOp::Prod => lp!(ReduceOp::Prod),
        ReduceOp::Min => lp!(ReduceOp::Min),
        ReduceOp::Max => lp!(ReduceOp::Max),
    }
}

fn combine3_slice<T: Arith + bytemuck::Pod>(dst: &mut [T], a: &[T], b: &[T], op: ReduceOp) {
    macro_rules! lp {
        ($op:expr) => {
            for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
                *d = x.combine(*y, $op);
            }
        };
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => lp!(ReduceOp::Sum),
        ReduceOp::Prod => lp!(ReduceOp::Prod),
        ReduceOp::Min => lp!(ReduceOp::Min),
        ReduceOp::Max => lp!(ReduceOp::Max),
    }
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
        }
    };
}

fn cast_mut<T: bytemuck::Pod>(b: &mut [u8]) -> Result<&mut [T]> {
    bytemuck::try_cast_slice_mut(b).map_err(|e| {
        Error::InvalidArgument(format!(
            "buffer is not a whole number of aligned elements: {e}"
        ))
    })
}
fn cast<T: bytemuck::Pod>(b: &[u8]) -> Result<&[T]> {
    bytemuck::try_cast_slice(b).map_err(|e| {
        Error::InvalidArgument(format!(
            "buffer is not a whole number of aligned elements: {e}"
        ))
    })
}

fn reduce_into_t<T: Arith + bytemuck::Pod>(dst: &mut [u8], src: &[u8], op: ReduceOp) -> Result<()> {
    combine_slice(cast_mut::<T>(dst)?, cast::<T>(src)?, op);
    Ok(())
}

fn reduce3_t<T: Arith + bytemuck::Pod>(
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    op: ReduceOp,
) -> Result<()> {
    combine3_slice(cast_mut::<T>(dst)?, cast::<T>(a)?, cast::<T>(b)?, op);
    Ok(())
}

fn div_t<T: Arith + bytemuck::Pod>(buf: &mut [u8], n: usize) -> Result<()> {
    for x in cast_mut::<T>(buf)? {
        *x = x.div_n(n);
    }
    Ok(())
}

/// `dst[i] = op(dst[i], src[i])` over raw bytes of `dtype`. `Avg` accumulates as `Sum`; call
/// [`finish_avg`] once at the end.
pub fn reduce_into(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) -> Result<()> {
    if dst.len() != src.len() {
        return Err(Error::byte_lengths(
            "reduction operands",
            dtype,
            dst.len(),
            src.len(),
        ));
    }
    dispatch!(dtype, reduce_into_t, dst, src, op)
}

/// `dst[i] = op(a[i], b[i])`: a fused copy-and-reduce, so out-of-place reductions read each input once.
pub fn reduce3(dtype: DType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) -> Result<()> {
    if dst.len() != a.len() || a.len() != b.len() {
        return Err(Error::byte_lengths(
            "reduction operands",
            dtype,
            dst.len(),
            a.len().min(b.len()),
        ));
    }
    dispatch!(dtype, reduce3_t, dst, a, b, op)
}

/// Apply the final division of [`ReduceOp::Avg`] over `n` ranks; a no-op for other operators.
pub fn finish_avg(dtype: DType, op: ReduceOp, buf: &mut [u8], n: usize) -> Result<()> {
    if op != ReduceOp::Avg || n <= 1 {
        return Ok(());
    }
    dispatch!(dtype, div_t, buf, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_each_dtype_by_hand() {
        let mut a = [1.0f32, -2.0, 3.5];
        let b = [4.0f32, 5.0, -1.0];
        reduce_into(
            DType::F32,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut a),
            bytemuck::cast_slice(&b),
        )
        .unwrap();
        assert_eq!(a, [5.0, 3.0, 2.5]);
        let mut i = [3i64, -7, 9];
        reduce_into(
            DType::I64,
            ReduceOp::Min,
            bytemuck::cast_slice_mut(&mut i),
            bytemuck::cast_slice(&[4i64, -8, 1]),
        )
        .unwrap();
        assert_eq!(i, [3, -8, 1]);
        let mut u = [250u8, 2];
        reduce_into(DType::U8, ReduceOp::Sum, &mut u, &[10, 3]).unwrap();
        assert_eq!(u, [4, 5], "u8 sum wraps like NCCL's");
        let mut h = [f16::from_f32(1.5), f16::from_f32(2.0)];
        reduce_into(
            DType::F16,
            ReduceOp::Prod,
            bytemuck::cast_slice_mut(&mut h),
            bytemuck::cast_slice(&[f16::from_f32(2.0), f16::from_f32(-0.5)]),
        )
        .unwrap();
        assert_eq!(h, [f16::from_f32(3.0), f16::from_f32(-1.0)]);
        let mut avg = [6i32, 7];
        finish_avg(
            DType::I32,
            ReduceOp::Avg,
            bytemuck::cast_slice_mut(&mut avg),
            3,
        )
        .unwrap();
        assert_eq!(avg, [2, 2]);
    }

    #[test]
    fn integer_avg_over_many_ranks_does_not_divide_by_zero() {
        // 256 ranks: `n as u8` is 0; 300 ranks: `n as u8` is 44.
        for (n, sum, want) in [
            (256usize, 255u8, 0u8),
            (300, 200, 0),
            (2, 201, 100),
            (255, 255, 1),
        ] {
            let mut u = [sum];
            finish_avg(DType::U8, ReduceOp::Avg, &mut u, n).unwrap();
            assert_eq!(u, [want], "u8 avg of sum {sum} over {n} ranks");
        }
        let mut i = [-7i32, 1 << 30];
        finish_avg(
            DType::I32,
            ReduceOp::Avg,
            bytemuck::cast_slice_mut(&mut i),
            1 << 20,
        )
        .unwrap();
        assert_eq!(i, [0, 1 << 10], "truncates toward zero like ncclAvg");
        let mut l = [i64::MIN];
        finish_avg(
            DType::I64,
            ReduceOp::Avg,
            bytemuck::cast_slice_mut(&mut l),
            3,
        )
        .unwrap();
        assert_eq!(l, [i64::MIN / 3]);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut a = [0u8; 4];
        assert!(matches!(
            reduce_into(DType::U8, ReduceOp::Sum, &mut a, &[1, 2]),
            Err(Error::LengthMismatch { .. })
        ));
    }
}
