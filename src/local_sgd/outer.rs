//! The update rules, element-wise over slices: the CPU twins of `cuda/local_sgd.cu` (same operations
//! in the same order, every product and sum rounded separately — the kernels are compiled with
//! `--fmad=false` and use `__fmul_rn`/`__fadd_rn` — so host and device agree bit for bit).
//!
//! Notation: `θ` a worker's local parameters, `φ` the global (outer) copy, `Δ = φ − θ` the
//! pseudo-gradient (it points downhill, like a gradient), `m` the outer momentum.

use serde::{Deserialize, Serialize};

/// The outer optimizer: SGD with optional (Nesterov) momentum, as `torch.optim.SGD`.
///
/// `m ← μ·m + Δ`; the step is `Δ + μ·m` with Nesterov, `m` without; `φ ← φ − lr·step`. With `μ = 0`
/// the step is `Δ` itself (no momentum buffer is kept). DiLoCo's defaults (Douillard et al., *DiLoCo:
/// Distributed Low-Communication Training of Language Models*, 2023, and torchft's `DiLoCo`): lr 0.7,
/// momentum 0.9, Nesterov. Model averaging (PostLocalSGD) is lr 1, no momentum: `φ ← φ − mean(φ − θ_i)
/// = mean(θ_i)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outer {
    /// Outer learning rate.
    pub lr: f32,
    /// Momentum factor μ (0: none).
    pub momentum: f32,
    /// Nesterov momentum (torch's `nesterov=True`).
    pub nesterov: bool,
}

impl Outer {
    /// DiLoCo's outer optimizer: Nesterov SGD, lr 0.7, momentum 0.9 (the paper's and torchft's defaults).
    pub const DILOCO: Outer = Outer {
        lr: 0.7,
        momentum: 0.9,
        nesterov: true,
    };
    /// Plain averaging: lr 1, no momentum (`φ ← mean of the workers' θ`).
    pub const AVERAGE: Outer = Outer {
        lr: 1.0,
        momentum: 0.0,
        nesterov: false,
    };
    /// Outer SGD with Nesterov momentum.
    pub fn nesterov(lr: f32, momentum: f32) -> Outer {
        Outer {
            lr,
            momentum,
            nesterov: true,
        }
    }
    /// True when a momentum buffer is needed.
    pub fn has_momentum(&self) -> bool {
        self.momentum != 0.0
    }
}

/// `Δ = φ − θ` (the pseudo-gradient), into `out`.
pub fn pseudo_gradient(global: &[f32], local: &[f32], out: &mut [f32]) {
    for ((o, &g), &l) in out.iter_mut().zip(global).zip(local) {
        *o = g - l;
    }
}

/// The fused outer step over one range: momentum, global update and write-back of the local copy.
///
/// `delta` is the averaged pseudo-gradient; `mom` is empty when `outer` has no momentum. The local
/// copy becomes `α·θ + (1 − α)·φ_new` (`alpha` = 0: `θ ← φ_new`, every DiLoCo variant but Streaming
/// DiLoCo's mixing).
pub fn apply(
    outer: &Outer,
    alpha: f32,
    delta: &[f32],
    global: &mut [f32],
    mom: &mut [f32],
    local: &mut [f32],
) {
    let (lr, mu) = (outer.lr, outer.momentum);
    let beta = 1.0 - alpha;
    let n = delta.len();
    debug_assert!(global.len() == n && local.len() == n);
    let with_mom = outer.has_momentum() && mom.len() == n;
    for i in 0..n {
        let d = delta[i];
        let step = if with_mom {
            let m = mu * mom[i] + d;
            mom[i] = m;
            if outer.nesterov {
                d + mu * m
            } else {
                m
            }
        } else {
            d
        };
        let g = global[i] - lr * step;
        global[i] = g;
        local[i] = if alpha == 0.0 {
            g
        } else {
            alpha * local[i] + beta * g
        };
    }
}

/// NoLoCo's modified Nesterov step for one worker (Kolehmainen et al., *NoLoCo*, 2025): with the mean
/// pseudo-gradient `Δ̄` and mean slow weights `φ̄` of the worker's group (itself and its partner),
/// `δ ← α·δ − β·Δ̄ − γ·(φ − φ̄)`, `φ ← φ + δ`, `θ ← φ`. The `γ` term pulls the replicas together
/// without any all-reduce.
#[allow(clippy::too_many_arguments)]
pub fn noloco(
    alpha: f32,
    beta: f32,
    gamma: f32,
    mean_delta: &[f32],
    mean_global: &[f32],
    global: &mut [f32],
    mom: &mut [f32],
    local: &mut [f32],
) {
    for i in 0..global.len() {
        let d = alpha * mom[i] - beta * mean_delta[i] - gamma * (global[i] - mean_global[i]);
        mom[i] = d;
        let g = global[i] + d;
        global[i] = g;
        local[i] = g;
    }
}

/// Squared L2 norm, accumulated in f64 (the EDiT penalty compares norms across workers).
pub fn norm2(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// Index of the first NaN/±Inf.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    x.iter().position(|v| !v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_matches_a_hand_computed_step() {
        // φ = 1, Δ = 0.5, m = 0.2, lr 0.5, μ 0.5:
        // m = 0.5·0.2 + 0.5 = 0.6; step = 0.5 + 0.5·0.6 = 0.8; φ = 1 − 0.4 = 0.6
        let o = Outer::nesterov(0.5, 0.5);
        let (mut g, mut m, mut l) = (vec![1.0f32], vec![0.2f32], vec![7.0f32]);
        apply(&o, 0.0, &[0.5], &mut g, &mut m, &mut l);
        assert!(
            (m[0] - 0.6).abs() < 1e-7 && (g[0] - 0.6).abs() < 1e-7,
            "{m:?} {g:?}"
        );
        assert_eq!(l, g);
        // mixing α = 0.25: θ = 0.25·θ + 0.75·φ
        let (mut g, mut m, mut l) = (vec![1.0f32], vec![0.0f32], vec![2.0f32]);
        apply(&Outer::AVERAGE, 0.25, &[0.5], &mut g, &mut m, &mut l);
        assert_eq!((g[0], l[0]), (0.5, 0.25 * 2.0 + 0.75 * 0.5));
        // plain momentum (not Nesterov): step = m
        let o = Outer {
            lr: 1.0,
            momentum: 0.5,
            nesterov: false,
        };
        let (mut g, mut m, mut l) = (vec![1.0f32], vec![1.0f32], vec![0.0f32]);
        apply(&o, 0.0, &[0.5], &mut g, &mut m, &mut l);
        assert_eq!((m[0], g[0]), (1.0, 0.0));
    }

    #[test]
    fn noloco_step_by_hand() {
        // δ = 0.5·0.2 − 0.5·0.25 − 0.5·(1 − 0.5) = 0.1 − 0.125 − 0.25 = −0.275
        let (mut g, mut m, mut l) = (vec![1.0f32], vec![0.2f32], vec![9.0f32]);
        noloco(0.5, 0.5, 0.5, &[0.25], &[0.5], &mut g, &mut m, &mut l);
        assert!((m[0] + 0.275).abs() < 1e-7, "{m:?}");
        assert!((g[0] - 0.725).abs() < 1e-7 && l == g);
    }
}
