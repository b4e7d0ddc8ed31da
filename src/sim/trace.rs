//! Per-round, per-worker compute speeds: `x[r][i]` is the time worker `i` needs in round `r` for one
//! unit of load (one partition); a worker with load `L` and fixed per-round overhead `α` takes
//! `x[r][i] · (α + L)`.

use crate::rng::Rng;
use crate::{Error, Result};

/// A rounds × workers matrix of unit compute times (seconds per partition).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    rounds: usize,
    n: usize,
    x: Vec<f64>,
}

/// How a trace is generated.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Model {
    /// I.i.d. shifted exponential: `shift + Exp(rate)` per worker and round.
    ShiftedExp {
        /// Minimum time.
        shift: f64,
        /// Rate of the exponential tail (mean tail `1 / rate`).
        rate: f64,
    },
    /// Bursty Gilbert–Elliott, per worker: a two-state Markov chain (good → bad with `p_gb`, bad → good
    /// with `p_bg` per round); good rounds draw `shift + Exp(rate)`, bad rounds `slow` times that.
    GilbertElliott {
        /// Minimum time in the good state.
        shift: f64,
        /// Rate of the exponential tail.
        rate: f64,
        /// Good → bad transition probability per round.
        p_gb: f64,
        /// Bad → good transition probability per round (mean burst `1 / p_bg`).
        p_bg: f64,
        /// Slowdown factor in the bad state.
        slow: f64,
    },
}

impl Model {
    fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("straggler model: {why}")));
        match *self {
            Model::ShiftedExp { shift, rate } | Model::GilbertElliott { shift, rate, .. }
                if !(shift >= 0.0 && rate > 0.0 && shift.is_finite() && rate.is_finite()) =>
            {
                bad(format!(
                    "need shift >= 0 and rate > 0 (got shift = {shift}, rate = {rate})"
                ))
            }
            Model::GilbertElliott {
                p_gb, p_bg, slow, ..
            } if !((0.0..=1.0).contains(&p_gb) && (0.0..=1.0).contains(&p_bg) && slow >= 1.0) => {
                bad(format!(
                    "Gilbert–Elliott needs probabilities in [0, 1] and slow >= 1 (got p_gb = {p_gb}, p_bg = {p_bg}, slow = {slow})"
                ))
            }
            _ => Ok(()),
        }
    }
}

impl Trace {
    /// Generate `rounds × n` samples from `model`, reproducibly from `seed`.
    pub fn generate(model: &Model, n: usize, rounds: usize, seed: u64) -> Result<Trace> {
        model.validate()?;
        if n == 0 || rounds == 0 {
            return Err(Error::InvalidArgument(format!(
                "trace needs at least one worker and one round (got n = {n}, rounds = {rounds})"
            )));
        }
        let mut rng = Rng::new(seed);
        let mut x = vec![0f64; rounds * n];
        match *model {
            Model::ShiftedExp { shift, rate } => {
                for v in &mut x {
                    *v = shift + rng.exponential(rate);
                }
            }
            Model::GilbertElliott {
                shift,
                rate,
                p_gb,
                p_bg,
                slow,
            } => {
                // Start each worker in its stationary distribution.
                let pi_bad = if p_gb + p_bg > 0.0 {
                    p_gb / (p_gb + p_bg)
                } else {
                    0.0
                };
                let mut bad: Vec<bool> = (0..n).map(|_| rng.uniform() < pi_bad).collect();
                for r in 0..rounds {
                    for (i, b) in bad.iter_mut().enumerate() {
                        let base = shift + rng.exponential(rate);
                        x[r * n + i] = if *b { base * slow } else { base };
                        let u = rng.uniform();
                        *b = if *b { u >= p_bg } else { u < p_gb };
                    }
                }
            }
        }
        Ok(Trace { rounds, n, x })
    }

    /// Parse a CSV trace: one row per round, one column per worker, positive numbers; blank lines and
    /// lines starting with `#` are skipped, a first row that does not parse is taken as a header.
    pub fn from_csv(text: &str) -> Result<Trace> {
        let mut rows: Vec<Vec<f64>> = Vec::new();
        for (ln, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed: std::result::Result<Vec<f64>, _> =
                line.split(',').map(|c| c.trim().parse::<f64>()).collect();
            match parsed {
                Ok(v) => {
                    if let Some(bad) = v.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
                        return Err(Error::InvalidArgument(format!(
                            "trace CSV line {}: compute time {bad} must be a positive number of seconds",
                            ln + 1
                        )));
                    }
                    if let Some(first) = rows.first() {
                        if first.len() != v.len() {
                            return Err(Error::LengthMismatch {
                                what: format!(
                                    "trace CSV line {}: every row needs one column per worker",
                                    ln + 1
                                ),
                                expected: first.len(),
                                got: v.len(),
                            });
                        }
                    }
                    rows.push(v);
                }
                Err(_) if rows.is_empty() => continue, // header
                Err(e) => {
                    return Err(Error::InvalidArgument(format!(
                        "trace CSV line {}: {e}; expected comma-separated seconds, one column per worker",
                        ln + 1
                    )))
                }
            }
        }
        let n = rows.first().map_or(0, Vec::len);
        if n == 0 {
            return Err(Error::InvalidArgument(
                "trace CSV has no data rows (rows = rounds, columns = workers)".into(),
            ));
        }
        Ok(Trace {
            rounds: rows.len(),
            n,
            x: rows.concat(),
        })
    }

    /// The trace as CSV (rows = rounds).
    pub fn to_csv(&self) -> String {
        let mut s = String::new();
        for r in 0..self.rounds {
            let row: Vec<String> = self.row(r).iter().map(|v| format!("{v:.6}")).collect();
            s += &row.join(",");
            s.push('\n');
        }
        s
    }

    /// Rounds.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// Workers.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Unit compute times of round `r` (empty past the end).
    pub fn row(&self, r: usize) -> &[f64] {
        if r < self.rounds {
            &self.x[r * self.n..(r + 1) * self.n]
        } else {
            &[]
        }
    }

    /// Straggler statistics: a sample is "slow" when it exceeds `factor` × the trace median.
    pub fn stats(&self, factor: f64) -> TraceStats {
        let mut sorted = self.x.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
        let thr = factor * median;
        let mut slow = 0usize;
        let mut max_per_round = 0usize;
        let (mut bursts, mut burst_len_sum, mut longest) = (0usize, 0usize, 0usize);
        let mut run = vec![0usize; self.n];
        for r in 0..self.rounds {
            let row = self.row(r);
            let k = row.iter().filter(|&&v| v > thr).count();
            slow += k;
            max_per_round = max_per_round.max(k);
            for (i, &v) in row.iter().enumerate() {
                if v > thr {
                    run[i] += 1;
                } else if run[i] > 0 {
                    bursts += 1;
                    burst_len_sum += run[i];
                    longest = longest.max(run[i]);
                    run[i] = 0;
                }
            }
        }
        for &l in run.iter().filter(|&&l| l > 0) {
            bursts += 1;
            burst_len_sum += l;
            longest = longest.max(l);
        }
        TraceStats {
            median,
            p99,
            slow_fraction: slow as f64 / self.x.len() as f64,
            mean_slow_per_round: slow as f64 / self.rounds as f64,
            max_slow_per_round: max_per_round,
            mean_burst: if bursts > 0 {
                burst_len_sum as f64 / bursts as f64
            } else {
                0.0
            },
            longest_burst: longest,
        }
    }
}

/// Straggler statistics of a trace (see [`Trace::stats`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceStats {
    /// Median unit time.
    pub median: f64,
    /// 99th percentile unit time.
    pub p99: f64,
    /// Fraction of (round, worker) samples that are slow.
    pub slow_fraction: f64,
    /// Mean slow workers per round.
    pub mean_slow_per_round: f64,
    /// Most slow workers in one round.
    pub max_slow_per_round: usize,
    /// Mean length of a slow burst (consecutive slow rounds of one worker).
    pub mean_burst: f64,
    /// Longest burst.
    pub longest_burst: usize,
}
