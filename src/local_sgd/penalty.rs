//! EDiT's pseudo-gradient penalty (Cheng et al., *EDiT*, ICLR 2025; atorch's `local_sgd`):
//!
//! 1. **anomaly elimination** — every rank keeps, for every worker, an exponentially weighted mean
//!    and variance of that worker's pseudo-gradient norm (seeded by the plain mean and variance of
//!    the warm-up rounds); once a worker has `warmup` rounds of history, a norm more than `threshold` standard deviations above its mean marks it anomalous for
//!    the round (weight 0, and its statistics are not updated with the outlier);
//! 2. **weighted averaging** — the remaining workers are weighted by a softmax of their negative
//!    norms (`w_i ∝ exp(−‖Δ_i‖ / T)`), so a worker that moved unusually far counts less;
//! 3. **clipping** — the averaged pseudo-gradient is clipped to a norm bound.
//!
//! Defaults are atorch's (`LocalSGDConfig`): EWMA factor 0.02, 120 warm-up rounds, threshold 3σ;
//! softmax temperature 1 (atorch's `weight_softmax_temperature=None`); clip bound 10 (its README:
//! "usually 1 or 10").
//!
//! Every rank sees the same all-gathered norms and runs the same arithmetic, so every rank computes
//! the same weights and its detector state stays identical across ranks.

use serde::{Deserialize, Serialize};

/// Settings of the penalty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Penalty {
    /// Drop anomalous workers for the round.
    pub skip_anomalies: bool,
    /// EWMA factor of the norm statistics.
    pub ewma_alpha: f64,
    /// Rounds of history before a worker can be judged anomalous.
    pub warmup: u64,
    /// Z-score above which a worker is anomalous.
    pub threshold: f64,
    /// Weight workers by a softmax of their negative norms (off: equal weights).
    pub norm_weighting: bool,
    /// Softmax temperature.
    pub temperature: f64,
    /// Clip the averaged pseudo-gradient to this L2 norm (`None`: no clipping).
    pub clip: Option<f64>,
}

impl Default for Penalty {
    fn default() -> Self {
        Penalty {
            skip_anomalies: true,
            ewma_alpha: 0.02,
            warmup: 120,
            threshold: 3.0,
            norm_weighting: true,
            temperature: 1.0,
            clip: Some(10.0),
        }
    }
}

impl Penalty {
    /// No penalty at all: equal weights, no anomaly detection, no clipping (plain DiLoCo averaging).
    pub fn off() -> Penalty {
        Penalty {
            skip_anomalies: false,
            norm_weighting: false,
            clip: None,
            ..Penalty::default()
        }
    }
    /// Builder: the warm-up rounds.
    pub fn with_warmup(mut self, rounds: u64) -> Penalty {
        self.warmup = rounds;
        self
    }
    /// Builder: the clip bound.
    pub fn with_clip(mut self, clip: Option<f64>) -> Penalty {
        self.clip = clip;
        self
    }
}

/// Per-worker norm statistics (checkpointed with the rest of the state).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Detector {
    /// EWMA of each worker's norm.
    pub mean: Vec<f64>,
    /// EWMA variance of each worker's norm.
    pub var: Vec<f64>,
    /// Rounds of history per worker.
    pub count: Vec<u64>,
}

impl Detector {
    /// Fresh statistics for `world` workers.
    pub fn new(world: usize) -> Detector {
        Detector {
            mean: vec![0.0; world],
            var: vec![0.0; world],
            count: vec![0; world],
        }
    }

    /// Judge this round's norms: returns the anomalous workers' flags and updates the statistics of
    /// the others.
    pub fn judge(&mut self, p: &Penalty, norms: &[f64]) -> Vec<bool> {
        let mut bad = vec![false; norms.len()];
        for (i, &x) in norms.iter().enumerate() {
            if p.skip_anomalies && self.count[i] >= p.warmup && self.count[i] > 0 {
                let sd = self.var[i].sqrt();
                let z = if sd > 0.0 {
                    (x - self.mean[i]) / sd
                } else if x > self.mean[i] * (1.0 + 1e-6) + 1e-12 {
                    f64::INFINITY
                } else {
                    0.0
                };
                if z > p.threshold {
                    bad[i] = true;
                    continue;
                }
            }
            if self.count[i] < p.warmup.max(1) {
                // warm-up: the plain running mean and variance of the samples so far (Welford), so
                // the EWMA starts from a real estimate instead of a variance of ~0
                let k = (self.count[i] + 1) as f64;
                let diff = x - self.mean[i];
                self.mean[i] += diff / k;
                let m2 = self.var[i] * (k - 1.0) + diff * (x - self.mean[i]);
                self.var[i] = m2 / k;
            } else {
                let diff = x - self.mean[i];
                let incr = p.ewma_alpha * diff;
                self.mean[i] += incr;
                self.var[i] = (1.0 - p.ewma_alpha) * (self.var[i] + diff * incr);
            }
            self.count[i] += 1;
        }
        bad
    }
}

/// The averaging weights (summing to 1) for `norms` with the anomalous workers `bad` at 0. If every
/// worker is anomalous the round falls back to equal weights over all of them.
pub fn weights(p: &Penalty, norms: &[f64], bad: &[bool]) -> Vec<f64> {
    let keep: Vec<usize> = (0..norms.len()).filter(|&i| !bad[i]).collect();
    let keep = if keep.is_empty() {
        (0..norms.len()).collect()
    } else {
        keep
    };
    let mut w = vec![0.0; norms.len()];
    if p.norm_weighting {
        let t = p.temperature.max(1e-12);
        let lo = keep.iter().map(|&i| norms[i]).fold(f64::INFINITY, f64::min);
        let mut sum = 0.0;
        for &i in &keep {
            w[i] = (-(norms[i] - lo) / t).exp();
            sum += w[i];
        }
        w.iter_mut().for_each(|x| *x /= sum);
    } else {
        let each = 1.0 / keep.len() as f64;
        keep.iter().for_each(|&i| w[i] = each);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_weights_by_hand() {
        let p = Penalty::default();
        let w = weights(&p, &[1.0, 2.0], &[false, false]);
        let e = (-1.0f64).exp();
        assert!((w[0] - 1.0 / (1.0 + e)).abs() < 1e-12 && (w[1] - e / (1.0 + e)).abs() < 1e-12);
        let w = weights(&p, &[1.0, 2.0, 9.0], &[false, false, true]);
        assert_eq!(w[2], 0.0);
        let w = weights(&Penalty::off(), &[1.0, 5.0], &[false, false]);
        assert_eq!(w, vec![0.5, 0.5]);
    }

    #[test]
    fn detector_flags_a_spike_after_warmup_only() {
        let p = Penalty::default().with_warmup(3);
        let mut d = Detector::new(2);
        for r in 0..6 {
            let jitter = 0.01 * (r % 2) as f64;
            assert_eq!(
                d.judge(&p, &[1.0 + jitter, 2.0 - jitter]),
                vec![false, false]
            );
        }
        let bad = d.judge(&p, &[100.0, 2.0]);
        assert_eq!(bad, vec![true, false]);
        // the outlier did not enter worker 0's statistics
        assert!(d.mean[0] < 1.02, "{:?}", d.mean);
        // before the warm-up nothing is judged
        let mut d = Detector::new(1);
        assert_eq!(d.judge(&p, &[1.0]), vec![false]);
        assert_eq!(d.judge(&p, &[100.0]), vec![false]);
    }
}
