//! The compression half of DGC as pure functions over host slices.
//!
//! Each function here is also the *CPU twin* of a kernel in `cuda/dgc.cu` with the same semantics:
//!
//! | function | kernel | what |
//! |---|---|---|
//! | [`sum_squares`] | `dgc_sum_squares` | `Σ g²` in f64 (for local clipping; the GPU sums in another order) |
//! | [`sample_magnitudes`] | `dgc_sample` | `|v'_j|` at hashed sample indices (runs of [`SAMPLE_RUN`]), `v'` the would-be accumulator |
//! | [`kth_largest`] | `dgc_radix_round` ×3 | exact k-th largest (top k of the candidates, exact selection) |
//! | [`truncated_kth`] | `dgc_radix_round` ×2 | the sampled threshold |
//! | [`fused_update_select`] | `dgc_fused` | clip-scale, momentum, accumulate, threshold test, compaction |
//! | [`select_above`] | `dgc_select` | the threshold test alone (read-only), for the threshold correction |
//! | [`mask_sent`] | `dgc_mask` (and `dgc_filter` with masking) | remove the sent values from `v` (and `u` with momentum masking) |
//! | [`finish_selection`] | `dgc_filter` after `dgc_radix_round` ×3 (+ `dgc_tie_round` ×3), or `dgc_topk_select` | the top k of the candidates: all above the k-th largest magnitude, ties at it by lower index |
//!
//! Arithmetic is never fused (`m·u + s·g` is a product, a product and a sum, each rounded; the CUDA
//! side uses `__fmul_rn`/`__fadd_rn`), so the twin and the kernels produce bit-identical `u`, `v` and
//! candidate sets; only the *order* of compacted candidates differs on the GPU (atomics), which is
//! why [`finish_selection`] sorts them by index.

use crate::{Error, Result};

/// SplitMix64's finaliser: the hash that picks sample indices (the same on the GPU).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Samples come in runs of this many consecutive indices, each run at a hashed position aligned to
/// the run length: on the GPU a run of f32 is one 32-byte memory sector per array, where independent
/// random indices cost a sector per sample (`dgc_sample` took ~20 µs for 1% of 25.5 M that way, on
/// an H200). 1% of 25.5 M is still ~32 k independent runs, far more than a threshold estimate needs.
pub const SAMPLE_RUN: u64 = 8;

/// The `j`-th sample index of step `step` with `seed`, in `0..n` (`n > 0`): element `j % SAMPLE_RUN`
/// of run `j / SAMPLE_RUN` (wrapping at `n`).
#[inline]
pub fn sample_index(seed: u64, step: u64, j: u64, n: u64) -> u64 {
    let run = j / SAMPLE_RUN;
    let start = mix64(seed ^ mix64(step.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ run)) % n;
    ((start & !(SAMPLE_RUN - 1)) + j % SAMPLE_RUN) % n
}

/// How the accumulators are updated by one gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// Clip scale applied to the gradient (1.0: no clipping).
    pub scale: f32,
    /// Momentum factor `m`.
    pub momentum: f32,
    /// Momentum correction: `u ← m·u + s·g; v ← v + u`. Off: `v ← v + s·g` (`u` untouched).
    pub momentum_correction: bool,
}

impl Update {
    /// The new `(u, v)` of one element.
    #[inline(always)]
    pub fn apply(&self, g: f32, u: f32, v: f32) -> (f32, f32) {
        let sg = if self.scale == 1.0 { g } else { self.scale * g };
        if self.momentum_correction {
            let u2 = self.momentum * u + sg;
            (u2, v + u2)
        } else {
            (u, v + sg)
        }
    }
}

/// `Σ g²` in f64 (input of the local clipping scale).
pub fn sum_squares(g: &[f32]) -> f64 {
    g.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// The local-clipping scale: `min(1, clip / (√world · ‖g‖))`.
pub fn clip_scale(sum_sq: f64, clip_norm: f64, world: usize) -> f32 {
    let norm = sum_sq.sqrt();
    let limit = clip_norm / (world.max(1) as f64).sqrt();
    if norm > limit && norm > 0.0 {
        (limit / norm) as f32
    } else {
        1.0
    }
}

/// Index of the first non-finite value, if any.
pub fn first_non_finite(g: &[f32]) -> Option<usize> {
    g.iter().position(|x| !x.is_finite())
}

/// Twin of `dgc_sample`: `out[j] = |v'_{idx(j)}|` where `v'` is what [`fused_update_select`] would
/// store, without changing anything.
pub fn sample_magnitudes(
    g: &[f32],
    u: &[f32],
    v: &[f32],
    up: Update,
    seed: u64,
    step: u64,
    out: &mut [f32],
) {
    let n = g.len() as u64;
    for (j, o) in out.iter_mut().enumerate() {
        let i = sample_index(seed, step, j as u64, n) as usize;
        *o = up.apply(g[i], u[i], v[i]).1.abs();
    }
}

/// The `rank`-th largest value (1-based) of `xs` (reorders `xs`). `xs` must hold at least `rank`.
pub fn kth_largest(xs: &mut [f32], rank: usize) -> f32 {
    let r = rank.clamp(1, xs.len().max(1));
    if xs.is_empty() {
        return 0.0;
    }
    let (_, kth, _) = xs.select_nth_unstable_by(r - 1, |a, b| b.total_cmp(a));
    *kth
}

/// The sampled threshold: the `rank`-th largest of the sample (magnitudes) with the low 10 bits of
/// its f32 pattern cleared, i.e. rounded down by less than 2⁻¹³ (0.012 %) relative; the sample's
/// own error is far larger (at 0.1 % density and a 1 % sample the rank is ~250: ~6 %). The GPU's
/// radix select stops after its second round (11 + 11 bits) for it, one launch fewer per step. A
/// 16-bit truncation (one histogram, no radix rounds) was tried and dropped: where the largest
/// values crowd within 2⁻⁷ of each other (the benchmark's gradient), it let 3× k candidates pass.
pub fn truncated_kth(xs: &mut [f32], rank: usize) -> f32 {
    f32::from_bits(kth_largest(xs, rank).to_bits() & !0x3FF)
}

/// Selection test shared by every kernel: sent iff `|v| ≥ thr` and `v ≠ 0`.
#[inline(always)]
pub fn passes(v: f32, thr: f32) -> bool {
    v != 0.0 && v.abs() >= thr
}

/// Twin of `dgc_fused`: one pass that updates `u` and `v` with `g` and compacts every `(i, v_i)`
/// that passes `thr` into `idx`/`val` (at most `cap` are stored; the return value is the number
/// that passed, which may exceed `cap`).
#[allow(clippy::too_many_arguments)]
pub fn fused_update_select(
    g: &[f32],
    u: &mut [f32],
    v: &mut [f32],
    up: Update,
    thr: f32,
    cap: usize,
    idx: &mut Vec<u32>,
    val: &mut Vec<f32>,
) -> usize {
    idx.clear();
    val.clear();
    let mut count = 0;
    for (i, ((&gi, ui), vi)) in g.iter().zip(u.iter_mut()).zip(v.iter_mut()).enumerate() {
        let (u2, v2) = up.apply(gi, *ui, *vi);
        *ui = u2;
        *vi = v2;
        if passes(v2, thr) {
            if count < cap {
                idx.push(i as u32);
                val.push(v2);
            }
            count += 1;
        }
    }
    count
}

/// Twin of `dgc_select`: compact the `(i, v_i)` passing `thr` (at most `cap`); returns how many passed.
pub fn select_above(
    v: &[f32],
    thr: f32,
    cap: usize,
    idx: &mut Vec<u32>,
    val: &mut Vec<f32>,
) -> usize {
    idx.clear();
    val.clear();
    let mut count = 0;
    for (i, &x) in v.iter().enumerate() {
        if passes(x, thr) {
            if count < cap {
                idx.push(i as u32);
                val.push(x);
            }
            count += 1;
        }
    }
    count
}

/// Twin of `dgc_mask`: `v[i] -= sent[i]` (exactly 0 when the value was sent in f32; the rounding
/// error stays in the residual when it was sent as bf16), and `u[i] = 0` when `mask_momentum`.
pub fn mask_sent(u: &mut [f32], v: &mut [f32], idx: &[u32], sent: &[f32], mask_momentum: bool) {
    for (&i, &s) in idx.iter().zip(sent) {
        let i = i as usize;
        v[i] = if v[i] == s { 0.0 } else { v[i] - s };
        if mask_momentum {
            u[i] = 0.0;
        }
    }
}

/// Keep the `k` largest-magnitude candidates (ties: lower index first) and sort the result by index.
///
/// The device's top k (`gpu::DgcKernels::compress_step`, feature `cuda`) keeps the same set: every
/// candidate above the k-th largest magnitude, and of those equal to it the lowest indices.
pub fn finish_selection(idx: &mut Vec<u32>, val: &mut Vec<f32>, k: usize) {
    let mut pairs: Vec<(u32, f32)> = idx.iter().copied().zip(val.iter().copied()).collect();
    if pairs.len() > k {
        pairs.select_nth_unstable_by(k, |a, b| {
            b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0))
        });
        pairs.truncate(k);
    }
    pairs.sort_unstable_by_key(|p| p.0);
    idx.clear();
    val.clear();
    for (i, x) in pairs {
        idx.push(i);
        val.push(x);
    }
}

/// How the threshold is chosen and corrected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectParams {
    /// Target number of values to send (`k ≥ 1`).
    pub k: usize,
    /// Estimate the threshold from a sample (`Some(sample size)`) or use the exact k-th largest.
    pub sample: Option<usize>,
    /// Seed of the sample indices.
    pub seed: u64,
    /// Step number (varies the sample).
    pub step: u64,
    /// More than `upper·k` candidates: raise the threshold by this factor and select again
    /// (between `k` and `upper·k`: keep the top k of the candidates).
    pub upper: f64,
    /// Fewer than `lower·k`: lower the threshold by this factor and select again.
    pub lower: f64,
    /// How many corrections at most.
    pub max_adapt: u32,
}

/// What a compression step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selected {
    /// Indices, ascending.
    pub idx: Vec<u32>,
    /// Values (f32, before any bf16 rounding).
    pub val: Vec<f32>,
    /// The final threshold.
    pub threshold: f32,
    /// How many passed the first (estimated) threshold.
    pub first_count: usize,
    /// Threshold corrections done.
    pub adaptations: u32,
}

/// The whole compression step (sampling, fused update, correction, top-k of the candidates) on the
/// host, in the order the GPU path runs the kernels. Updates `u` and `v` with `g` but does *not*
/// mask the sent values (call [`mask_sent`] with what was actually sent).
pub fn compress(
    g: &[f32],
    u: &mut [f32],
    v: &mut [f32],
    up: Update,
    p: &SelectParams,
) -> Result<Selected> {
    let n = g.len();
    if u.len() != n || v.len() != n {
        return Err(Error::LengthMismatch {
            what: "dgc: residual state (one value per parameter)".into(),
            expected: n,
            got: u.len().min(v.len()),
        });
    }
    let k = p.k.clamp(1, n.max(1));
    let mut out = Selected::default();
    if n == 0 {
        return Ok(out);
    }
    if k >= n {
        // Dense: send every element (zeros included), no threshold.
        for (i, ((&gi, ui), vi)) in g.iter().zip(u.iter_mut()).zip(v.iter_mut()).enumerate() {
            let (u2, v2) = up.apply(gi, *ui, *vi);
            *ui = u2;
            *vi = v2;
            out.idx.push(i as u32);
            out.val.push(v2);
        }
        out.first_count = n;
        return Ok(out);
    }
    let cap = ((k as f64) * p.upper.max(1.0)).floor() as usize;
    let cap = cap.max(k);
    let mut thr = match p.sample {
        Some(s) if s < n => {
            let s = s.max(1);
            let mut buf = vec![0f32; s];
            sample_magnitudes(g, u, v, up, p.seed, p.step, &mut buf);
            let rank = ((k as f64) * (s as f64) / (n as f64)).ceil().max(1.0) as usize;
            truncated_kth(&mut buf, rank)
        }
        _ => {
            let mut mags: Vec<f32> = g
                .iter()
                .zip(u.iter())
                .zip(v.iter())
                .map(|((&gi, &ui), &vi)| up.apply(gi, ui, vi).1.abs())
                .collect();
            kth_largest(&mut mags, k)
        }
    };
    let mut count = fused_update_select(g, u, v, up, thr, cap, &mut out.idx, &mut out.val);
    out.first_count = count;
    // Correct the estimate: multiply by `upper`/`lower` until the count is bracketed, then bisect
    // (geometric mean) between the last too-many and too-few thresholds.
    let (mut too_many, mut too_few): (Option<f32>, Option<f32>) = (None, None);
    let few = |c: usize| (c as f64) < p.lower * k as f64;
    while out.adaptations < p.max_adapt {
        let next = if count > cap {
            too_many = Some(thr);
            match too_few {
                Some(h) => (f64::from(thr) * f64::from(h)).sqrt(),
                None => f64::from(thr) * p.upper,
            }
        } else if few(count) && thr > 0.0 {
            too_few = Some(thr);
            match too_many {
                Some(l) => (f64::from(thr) * f64::from(l)).sqrt(),
                None => f64::from(thr) * p.lower,
            }
        } else {
            break;
        };
        thr = next as f32;
        out.adaptations += 1;
        count = select_above(v, thr, cap, &mut out.idx, &mut out.val);
    }
    if count > cap || (few(count) && too_many.is_some()) {
        // Not settled: the exact top k of everything above the last too-many threshold (or the
        // current one). A full pass on the host; rare.
        if count <= cap {
            thr = too_many.unwrap_or(thr);
        }
        select_above(v, thr, usize::MAX, &mut out.idx, &mut out.val);
    }
    finish_selection(&mut out.idx, &mut out.val, k);
    out.threshold = thr;
    Ok(out)
}
