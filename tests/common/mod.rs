//! Naive references shared by the backend tests: every rank's input is a function of (rank, i), so each
//! rank can compute what any collective must return without communicating.
//!
//! The inputs are hashed, not periodic, so that data in the wrong place changes the result:
//!
//! - For Sum, Min, Max and Avg, element `i` of rank `r` is `(a_i·r + b_i) mod 32` (minus 16 except for
//!   u8), where `a_i` (odd) and `b_i` come from a hash of `i`. An odd `a_i` makes `r ↦ a_i·r + b_i` a
//!   bijection of Z/32, so at **every** index the ranks of a world of up to 32 hold pairwise different
//!   values: a block that comes from the wrong rank (swapped, reversed, shifted by a rank) is wrong at
//!   every element, even for one-element blocks. Across indices the values are a hash, so a block
//!   shifted by any number of elements is wrong almost everywhere, and reductions over any world
//!   (Sum, Min, Max: of distinct values) vary from index to index.
//! - For Prod, each (rank, index) picks one of four factors by two hashed bits: floats
//!   {2, −1, ½, −2}, signed integers {−1, 2, −2, 3}, u8 {1, 2, 3, 5}.
//!
//! Exactness: partial sums of any subset of up to 8 ranks lie in [−128, 120] (u8: [0, 248]), exact in
//! bf16 (8 significant bits) and f16 and without u8 overflow; float products are ±2^k with |k| ≤ 8,
//! exact in every float type; integer products wrap as the library's do, and the reference wraps the
//! same way. So every dtype and every reduction order gives the reference exactly (Avg on floats: the
//! exact sum divided once, correctly rounded either way). bf16 sums stay exact up to 16 ranks.
#![allow(dead_code)]

use ferroccl::{DType, Element, ReduceOp};
use half::{bf16, f16};
use std::ops::Range;

/// Seed of every input (change it and every reference changes with it).
pub const SEED: u64 = 0xfe44_0cc1_5eed_2024;

/// Residues of the Sum/Min/Max/Avg inputs: values are distinct across up to this many ranks.
pub const LEVELS: u64 = 32;

/// SplitMix64's finaliser: a bijection of u64 with full avalanche.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash of index `i` (SplitMix64's sequence from [`SEED`]).
pub fn index_hash(i: usize) -> u64 {
    mix(SEED.wrapping_add(
        (i as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15),
    ))
}

/// Which of the values of [`value`] element i of rank r takes, from the index's hash `h`: for Prod
/// two bits of `h` per rank (rehashed every 32 ranks); else `(a·r + b) mod LEVELS`, `a` (odd) and `b`
/// from bits 0–4 and 8–12 of `h`.
fn level(h: u64, r: usize, op: ReduceOp) -> usize {
    if op == ReduceOp::Prod {
        let word = if r < 32 { h } else { mix(h ^ (r / 32) as u64) };
        return ((word >> (2 * (r % 32))) & 3) as usize;
    }
    let a = (h % LEVELS) | 1;
    let b = (h >> 8) % LEVELS;
    (a.wrapping_mul(r as u64).wrapping_add(b) % LEVELS) as usize
}

/// The bits of an index's hash that the reduction over `world` ranks depends on (see [`level`]),
/// when there are few enough of them to tabulate.
fn reduction_bits(world: usize, op: ReduceOp) -> Option<u64> {
    match op {
        ReduceOp::Prod => (world <= 8).then(|| (1u64 << (2 * world)) - 1),
        _ => Some((LEVELS - 1) | ((LEVELS - 1) << 8)),
    }
}

/// The value of level `l` (see the module docs).
fn value(dtype: DType, op: ReduceOp, l: usize) -> f64 {
    match (op, dtype) {
        (ReduceOp::Prod, DType::U8) => [1.0, 2.0, 3.0, 5.0][l],
        (ReduceOp::Prod, DType::I32 | DType::I64) => [-1.0, 2.0, -2.0, 3.0][l],
        (ReduceOp::Prod, _) => [2.0, -1.0, 0.5, -2.0][l],
        (_, DType::U8) => l as f64,
        _ => l as f64 - (LEVELS / 2) as f64,
    }
}

/// Value of element i on rank r (see the module docs).
pub fn val(r: usize, i: usize, dtype: DType, op: ReduceOp) -> f64 {
    value(dtype, op, level(index_hash(i), r, op))
}

pub trait TestElem: Element {
    /// Exact conversion of a reference value (an integer in range, or a float the type represents).
    fn from_f64(x: f64) -> Self;
    /// A value no reference result takes, to fill outputs before a collective writes them (NaN for
    /// floats, which equals nothing, not even itself).
    fn poison() -> Self;
}
impl TestElem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn poison() -> Self {
        f32::NAN
    }
}
impl TestElem for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn poison() -> Self {
        f64::NAN
    }
}
impl TestElem for f16 {
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn poison() -> Self {
        f16::NAN
    }
}
impl TestElem for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn poison() -> Self {
        bf16::NAN
    }
}
impl TestElem for i32 {
    fn from_f64(x: f64) -> Self {
        x as i32
    }
    fn poison() -> Self {
        i32::MIN
    }
}
impl TestElem for i64 {
    fn from_f64(x: f64) -> Self {
        x as i64
    }
    fn poison() -> Self {
        i64::MIN
    }
}
impl TestElem for u8 {
    fn from_f64(x: f64) -> Self {
        x as u8
    }
    fn poison() -> Self {
        // above every Sum/Min/Max/Avg result (≤ 248); a wrapped u8 product can be anything
        u8::MAX
    }
}

/// Rank r's input: elements `0..n` of [`val`].
pub fn input<T: TestElem>(r: usize, n: usize, op: ReduceOp) -> Vec<T> {
    // every value converted once (f16/bf16 conversions are slow next to the hash)
    let levels = if op == ReduceOp::Prod {
        4
    } else {
        LEVELS as usize
    };
    let table: Vec<T> = (0..levels)
        .map(|l| T::from_f64(value(T::DTYPE, op, l)))
        .collect();
    (0..n).map(|i| table[level(index_hash(i), r, op)]).collect()
}

/// An integer result wrapped into the dtype's range, as the library's wrapping arithmetic leaves it.
fn wrap(dtype: DType, x: i64) -> i64 {
    match dtype {
        DType::U8 => x.rem_euclid(256),
        DType::I32 => x as i32 as i64,
        _ => x,
    }
}

/// Reduction of element i over `world` ranks, computed naively and exactly (in f64 for float
/// products, else in wrapping i64: every other value is an integer), then converted.
pub fn reduced<T: TestElem>(world: usize, i: usize, op: ReduceOp) -> T {
    reduced_hash(world, index_hash(i), op)
}

/// [`reduced`] of an index of hash `h`.
fn reduced_hash<T: TestElem>(world: usize, h: u64, op: ReduceOp) -> T {
    let dt = T::DTYPE;
    let xs = (0..world).map(|r| value(dt, op, level(h, r, op)));
    if dt.is_float() {
        let v = match op {
            ReduceOp::Sum => xs.sum(),
            ReduceOp::Prod => xs.product(),
            ReduceOp::Min => xs.fold(f64::INFINITY, f64::min),
            ReduceOp::Max => xs.fold(f64::NEG_INFINITY, f64::max),
            ReduceOp::Avg => xs.sum::<f64>() / world as f64,
        };
        return T::from_f64(v);
    }
    let xs = xs.map(|x| x as i64);
    let v = match op {
        ReduceOp::Sum | ReduceOp::Avg => xs.fold(0, i64::wrapping_add),
        ReduceOp::Prod => xs.fold(1, i64::wrapping_mul),
        ReduceOp::Min => xs.fold(i64::MAX, i64::min),
        ReduceOp::Max => xs.fold(i64::MIN, i64::max),
    };
    let v = wrap(T::DTYPE, v);
    // Avg: the wrapped sum divided, truncating toward zero, as Rust and NCCL do
    let v = if op == ReduceOp::Avg {
        v / world as i64
    } else {
        v
    };
    T::from_f64(v as f64)
}

pub fn reduced_vec<T: TestElem>(world: usize, n: usize, op: ReduceOp) -> Vec<T> {
    reduced_range(world, 0..n, op)
}

/// [`reduced`] of every index of `range`; long ranges look each result up by the bits of the hash
/// it depends on (see [`reduction_bits`]), which makes the references of the large-message tests
/// cheap next to the collectives they check.
pub fn reduced_range<T: TestElem>(world: usize, range: Range<usize>, op: ReduceOp) -> Vec<T> {
    match reduction_bits(world, op) {
        Some(mask) if range.len() >= 1 << 12 => {
            let mut memo: Vec<Option<T>> = vec![None; mask as usize + 1];
            range
                .map(|i| {
                    let key = index_hash(i) & mask;
                    *memo[key as usize].get_or_insert_with(|| reduced_hash(world, key, op))
                })
                .collect()
        }
        _ => range.map(|i| reduced(world, i, op)).collect(),
    }
}

/// What rank `r` receives from `reduce_scatter` of blocks of `n`: block `r` of the reduction of
/// `input(q, world·n)` over ranks `q`.
pub fn reduce_scatter_want<T: TestElem>(world: usize, r: usize, n: usize, op: ReduceOp) -> Vec<T> {
    reduced_range(world, r * n..(r + 1) * n, op)
}

/// What every rank receives from `all_gather` of `input(q, n, op)`.
pub fn all_gather_want<T: TestElem>(world: usize, n: usize, op: ReduceOp) -> Vec<T> {
    (0..world).flat_map(|q| input::<T>(q, n, op)).collect()
}

/// What rank `r` receives from `all_to_all` when rank `q` sends `input(q, world·n, op)`: block `r` of
/// every rank's send, in rank order.
pub fn all_to_all_want<T: TestElem>(world: usize, r: usize, n: usize, op: ReduceOp) -> Vec<T> {
    (0..world)
        .flat_map(|q| (r * n..(r + 1) * n).map(move |i| T::from_f64(val(q, i, T::DTYPE, op))))
        .collect()
}

/// `all_to_allv` where rank `i` sends `counts[i][j]` elements to rank `j`, its send buffer being
/// `input(i, Σ_j counts[i][j], op)`: rank `r`'s send buffer, send counts, receive counts and the
/// expected receive buffer.
pub fn all_to_allv_case<T: TestElem>(
    counts: &[Vec<usize>],
    r: usize,
    op: ReduceOp,
) -> (Vec<T>, Vec<usize>, Vec<usize>, Vec<T>) {
    let w = counts.len();
    let sc = counts[r].clone();
    let rc: Vec<usize> = (0..w).map(|i| counts[i][r]).collect();
    let send = input::<T>(r, sc.iter().sum(), op);
    let want = (0..w)
        .flat_map(|i| {
            let off: usize = counts[i][..r].iter().sum();
            (off..off + counts[i][r]).map(move |k| T::from_f64(val(i, k, T::DTYPE, op)))
        })
        .collect();
    (send, sc, rc, want)
}

/// General (inexact) f32 data: full 24-bit significands over 16 binades, of both signs, so that
/// sums round and their order matters. (`gen_range(-1.0f32..1.0)` is not that: its values lie on a
/// 2^-22 grid, and sums of a few of them are exact.)
pub fn random_f32(seed: u64, n: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ SEED);
    (0..n)
        .map(|_| {
            let m: f64 = rng.gen_range(-1.0..1.0);
            (m * 2f64.powi(rng.gen_range(-8..8))) as f32
        })
        .collect()
}

pub mod suite;
pub mod traffic;
