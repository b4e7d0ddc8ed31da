//! Naive references shared by the backend tests: every rank's input is a function of (rank, i), so each
//! rank can compute what any collective must return without communicating.
#![allow(dead_code)]

use ferroccl::{DType, Element, ReduceOp};
use half::{bf16, f16};

/// Value of element i on rank r, small integers so sums are exact in every dtype.
pub fn val(r: usize, i: usize, dtype: DType, op: ReduceOp) -> f64 {
    let x = ((r * 7 + i * 3) % 5) as f64;
    match (op, dtype) {
        // keep products small: 1 or 2
        (ReduceOp::Prod, _) => 1.0 + ((r + i) % 2) as f64,
        (_, DType::U8) => x,
        _ => x - 2.0,
    }
}

pub trait TestElem: Element {
    fn from_f64(x: f64) -> Self;
}
impl TestElem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl TestElem for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}
impl TestElem for f16 {
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}
impl TestElem for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}
impl TestElem for i32 {
    fn from_f64(x: f64) -> Self {
        x as i32
    }
}
impl TestElem for i64 {
    fn from_f64(x: f64) -> Self {
        x as i64
    }
}
impl TestElem for u8 {
    fn from_f64(x: f64) -> Self {
        x as u8
    }
}

pub fn input<T: TestElem>(r: usize, n: usize, op: ReduceOp) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f64(val(r, i, T::DTYPE, op)))
        .collect()
}

/// Reduction of element i over `world` ranks, computed naively in f64 then converted.
pub fn reduced<T: TestElem>(world: usize, i: usize, op: ReduceOp) -> T {
    let xs: Vec<f64> = (0..world).map(|r| val(r, i, T::DTYPE, op)).collect();
    let v = match op {
        ReduceOp::Sum => xs.iter().sum(),
        ReduceOp::Prod => xs.iter().product(),
        ReduceOp::Min => xs.iter().cloned().fold(f64::INFINITY, f64::min),
        ReduceOp::Max => xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        ReduceOp::Avg => {
            let s: f64 = xs.iter().sum();
            if T::DTYPE.is_float() {
                s / world as f64
            } else {
                // integer division truncating toward zero, as Rust and NCCL do
                (s as i64 / world as i64) as f64
            }
        }
    };
    T::from_f64(v)
}

pub fn reduced_vec<T: TestElem>(world: usize, n: usize, op: ReduceOp) -> Vec<T> {
    (0..n).map(|i| reduced(world, i, op)).collect()
}

pub mod suite;
