//! Gradient codes (Tandon et al., ICML 2017): the encoding matrix `B`, the assignment of data
//! partitions to workers, and decoding vectors for any set of responders.

use crate::rng::Rng;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Largest residual `max |B_Fᵀ a − 1|` accepted as an exact decoding.
pub const RESIDUAL_TOL: f64 = 1e-9;

/// Decoding vectors kept per code before the cache is cleared (bounds memory under random sets).
const CACHE_CAP: usize = 4096;

/// Which construction of Tandon et al. builds the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Scheme {
    /// Fractional repetition (needs `(s + 1) | n`): workers form `n / (s + 1)` groups of `s + 1`; every
    /// member of group `g` sends the plain sum of the group's `s + 1` partitions. Decoding takes one
    /// responder per group (closed form).
    FractionalRepetition,
    /// Cyclic repetition (any `n > s`): worker `i` holds partitions `i, i+1, …, i+s (mod n)` and sends
    /// a combination with coefficients from a seeded random construction (Tandon et al., Algorithm 2),
    /// so that `1` lies in the span of any `n − s` rows. Decoding solves a small linear system.
    Cyclic,
}

impl std::str::FromStr for Scheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<Scheme> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fr" | "fractional" | "fractional-repetition" => Ok(Scheme::FractionalRepetition),
            "cyclic" | "cr" | "cyclic-repetition" => Ok(Scheme::Cyclic),
            other => Err(Error::InvalidArgument(format!(
                "unknown gradient-coding scheme {other:?}; use \"fr\" (fractional repetition) or \"cyclic\""
            ))),
        }
    }
}

/// An `(n, s)` gradient code: `n` workers, `n` data partitions, any `s` stragglers tolerated.
///
/// Worker `i` computes the gradients of [`GradientCode::partitions`]`(i)` and sends
/// [`GradientCode::encode`] of them (row `i` of `B`). From any `n − s` responders `F` the master finds
/// `a` with `aᵀ B_F = 1ᵀ` ([`GradientCode::decoding_vector`], cached per set) and recovers the sum of
/// all partition gradients ([`GradientCode::decode`]).
#[derive(Debug)]
pub struct GradientCode {
    n: usize,
    s: usize,
    scheme: Scheme,
    seed: u64,
    /// `B`, row-major `n × n`: row = worker, column = partition.
    b: Vec<f64>,
    support: Vec<Vec<usize>>,
    cache: Mutex<HashMap<Vec<usize>, Arc<Vec<f64>>>>,
}

impl GradientCode {
    /// Build a code; `seed` fixes the random coefficients of the cyclic scheme (unused for FR).
    pub fn new(scheme: Scheme, n: usize, s: usize, seed: u64) -> Result<GradientCode> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "gradient code: n (workers) must be at least 1".into(),
            ));
        }
        if s >= n {
            return Err(Error::InvalidArgument(format!(
                "gradient code: s = {s} stragglers needs more than {s} workers (n = {n}); lower s or add workers"
            )));
        }
        let (b, support) = match scheme {
            Scheme::FractionalRepetition => fractional(n, s)?,
            Scheme::Cyclic => cyclic(n, s, seed)?,
        };
        Ok(GradientCode {
            n,
            s,
            scheme,
            seed,
            b,
            support,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Fractional repetition code (`(s + 1)` must divide `n`).
    pub fn fractional(n: usize, s: usize) -> Result<GradientCode> {
        Self::new(Scheme::FractionalRepetition, n, s, 0)
    }

    /// Cyclic repetition code with coefficients fixed by `seed`.
    pub fn cyclic(n: usize, s: usize, seed: u64) -> Result<GradientCode> {
        Self::new(Scheme::Cyclic, n, s, seed)
    }

    /// Number of workers (and partitions).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Stragglers tolerated.
    pub fn s(&self) -> usize {
        self.s
    }

    /// The construction.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Responders always sufficient: `n − s`.
    pub fn min_responders(&self) -> usize {
        self.n - self.s
    }

    /// Partitions per worker (`s + 1`): the computational load, in partitions, of every worker.
    pub fn load(&self) -> usize {
        self.s + 1
    }

    /// The partitions worker `i` computes, in the order [`GradientCode::encode`] expects them
    /// (empty for an out-of-range worker).
    pub fn partitions(&self, worker: usize) -> &[usize] {
        self.support.get(worker).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Row `i` of `B` (length `n`, one coefficient per partition).
    pub fn row(&self, worker: usize) -> Result<&[f64]> {
        self.check_worker(worker)?;
        Ok(&self.b[worker * self.n..(worker + 1) * self.n])
    }

    /// The coefficients of worker `i`'s partitions, aligned with [`GradientCode::partitions`].
    pub fn coefficients(&self, worker: usize) -> Result<Vec<f64>> {
        let row = self.row(worker)?;
        Ok(self.partitions(worker).iter().map(|&p| row[p]).collect())
    }

    fn check_worker(&self, worker: usize) -> Result<()> {
        if worker < self.n {
            Ok(())
        } else {
            Err(Error::RankOutOfRange {
                what: "gradient-code worker",
                rank: worker,
                world: self.n,
            })
        }
    }

    /// Worker `i`'s coded gradient: `Σ_j B[i][p_j] · partials[j]` over its partitions `p_j`
    /// (`partials[j]` is the gradient of partition [`GradientCode::partitions`]`(i)[j]`), accumulated in f64.
    pub fn encode(&self, worker: usize, partials: &[&[f32]]) -> Result<Vec<f32>> {
        let coef = self.coefficients(worker)?;
        if partials.len() != coef.len() {
            return Err(Error::LengthMismatch {
                what: format!(
                    "gradient code: worker {worker} needs one gradient per assigned partition {:?}",
                    self.partitions(worker)
                ),
                expected: coef.len(),
                got: partials.len(),
            });
        }
        let d = partials.first().map_or(0, |p| p.len());
        let mut acc = vec![0f64; d];
        for (c, g) in coef.iter().zip(partials) {
            if g.len() != d {
                return Err(Error::LengthMismatch {
                    what: "gradient code: every partition gradient must have the same length"
                        .into(),
                    expected: d,
                    got: g.len(),
                });
            }
            for (a, &x) in acc.iter_mut().zip(g.iter()) {
                *a += c * f64::from(x);
            }
        }
        Ok(acc.into_iter().map(|x| x as f32).collect())
    }

    /// True if the sum can be recovered from `responders`.
    pub fn is_decodable(&self, responders: &[usize]) -> bool {
        self.decoding_vector(responders).is_ok()
    }

    /// A decoding vector for `responders` (any order, duplicates ignored): `a` of length `n` with
    /// `a[i] = 0` for non-responders and `Σ_i a[i] B[i] = 1ᵀ` (residual checked below
    /// [`RESIDUAL_TOL`]). Cached per responder set. Errors name the cause: an out-of-range worker, fewer
    /// than `n − s` responders where those do not span `1`, or a set that is numerically not decodable.
    pub fn decoding_vector(&self, responders: &[usize]) -> Result<Arc<Vec<f64>>> {
        let mut key: Vec<usize> = responders.to_vec();
        key.sort_unstable();
        key.dedup();
        if let Some(&w) = key.iter().find(|&&w| w >= self.n) {
            self.check_worker(w)?;
        }
        if let Some(a) = self.lock_cache().get(&key) {
            return Ok(a.clone());
        }
        let a = match self.scheme {
            Scheme::FractionalRepetition => self.fr_vector(&key),
            Scheme::Cyclic => self.solve_vector(&key),
        };
        let a = Arc::new(a.map_err(|e| self.explain(&key, e))?);
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_CAP {
            cache.clear();
        }
        cache.insert(key, a.clone());
        Ok(a)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<usize>, Arc<Vec<f64>>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn explain(&self, key: &[usize], why: String) -> Error {
        let need = self.min_responders();
        if key.len() < need {
            Error::InvalidArgument(format!(
                "gradient code ({:?}, n = {}, s = {}): only {} workers responded and they do not cover \
                 every partition ({why}); wait for at least n - s = {need} responders",
                self.scheme,
                self.n,
                self.s,
                key.len()
            ))
        } else {
            Error::InvalidArgument(format!(
                "gradient code ({:?}, n = {}, s = {}): responder set of {} workers is not decodable ({why}); \
                 wait for more responders or rebuild the code with another seed",
                self.scheme,
                self.n,
                self.s,
                key.len()
            ))
        }
    }

    /// FR closed form: the first responder of every group gets coefficient 1.
    fn fr_vector(&self, key: &[usize]) -> std::result::Result<Vec<f64>, String> {
        let g = self.s + 1;
        let mut a = vec![0f64; self.n];
        let mut covered = vec![false; self.n / g];
        for &w in key {
            if !covered[w / g] {
                covered[w / g] = true;
                a[w] = 1.0;
            }
        }
        match covered.iter().position(|c| !c) {
            None => Ok(a),
            Some(grp) => Err(format!(
                "no responder from group {grp} (workers {}..{})",
                grp * g,
                (grp + 1) * g
            )),
        }
    }

    /// General case: solve `B_Fᵀ a_F = 1` by Gaussian elimination with partial pivoting (free columns
    /// set to zero), then check the residual on all `n` equations.
    fn solve_vector(&self, key: &[usize]) -> std::result::Result<Vec<f64>, String> {
        let (n, k) = (self.n, key.len());
        if k == 0 {
            return Err("no responders".into());
        }
        // A = B_Fᵀ (n × k) augmented with the right-hand side 1: row-major n × (k + 1).
        let w = k + 1;
        let mut m = vec![0f64; n * w];
        for (c, &wk) in key.iter().enumerate() {
            for (p, &v) in self.b[wk * n..(wk + 1) * n].iter().enumerate() {
                m[p * w + c] = v;
            }
        }
        for p in 0..n {
            m[p * w + k] = 1.0;
        }
        let scale = m.iter().fold(0f64, |a, &v| a.max(v.abs())).max(1.0);
        let tol = 1e-11 * scale;
        let mut pivots: Vec<(usize, usize)> = Vec::new(); // (row, col)
        let mut row = 0;
        for col in 0..k {
            if row == n {
                break;
            }
            let (best, val) = (row..n)
                .map(|r| (r, m[r * w + col].abs()))
                .fold((row, -1.0), |acc, x| if x.1 > acc.1 { x } else { acc });
            if val <= tol {
                continue; // free column: its unknown stays 0
            }
            if best != row {
                for c in 0..w {
                    m.swap(best * w + c, row * w + c);
                }
            }
            let piv = m[row * w + col];
            for r in row + 1..n {
                let f = m[r * w + col] / piv;
                if f != 0.0 {
                    for c in col..w {
                        m[r * w + c] -= f * m[row * w + c];
                    }
                }
            }
            pivots.push((row, col));
            row += 1;
        }
        let mut x = vec![0f64; k];
        for &(r, c) in pivots.iter().rev() {
            let mut v = m[r * w + k];
            for c2 in c + 1..k {
                v -= m[r * w + c2] * x[c2];
            }
            x[c] = v / m[r * w + c];
        }
        let mut a = vec![0f64; n];
        for (c, &wk) in key.iter().enumerate() {
            a[wk] = x[c];
        }
        let res = self.residual(&a);
        if res.is_finite() && res < RESIDUAL_TOL {
            Ok(a)
        } else {
            Err(format!(
                "the all-ones vector is not in the span of their rows: residual {res:.3e} >= {RESIDUAL_TOL:e}"
            ))
        }
    }

    /// `max_p |Σ_i a[i] B[i][p] − 1|`.
    pub fn residual(&self, a: &[f64]) -> f64 {
        let n = self.n;
        let mut sum = vec![0f64; n];
        for (i, &ai) in a.iter().enumerate().take(n) {
            if ai != 0.0 {
                for (s, &b) in sum.iter_mut().zip(&self.b[i * n..(i + 1) * n]) {
                    *s += ai * b;
                }
            }
        }
        sum.iter().fold(0f64, |m, &v| m.max((v - 1.0).abs()))
    }

    /// Recover `Σ_p g_p` from the coded gradients of `responders` (`coded[j]` came from
    /// `responders[j]`), accumulating in f64.
    pub fn decode(&self, responders: &[usize], coded: &[&[f32]]) -> Result<Vec<f32>> {
        if responders.len() != coded.len() {
            return Err(Error::LengthMismatch {
                what: "gradient decode: one coded gradient per responder".into(),
                expected: responders.len(),
                got: coded.len(),
            });
        }
        let a = self.decoding_vector(responders)?;
        let d = coded.first().map_or(0, |c| c.len());
        let mut acc = vec![0f64; d];
        let mut used = vec![false; self.n];
        for (&w, c) in responders.iter().zip(coded) {
            if c.len() != d {
                return Err(Error::LengthMismatch {
                    what: format!("gradient decode: coded gradient of worker {w}"),
                    expected: d,
                    got: c.len(),
                });
            }
            if used[w] || a[w] == 0.0 {
                continue;
            }
            used[w] = true;
            for (x, &v) in acc.iter_mut().zip(c.iter()) {
                *x += a[w] * f64::from(v);
            }
        }
        Ok(acc.into_iter().map(|x| x as f32).collect())
    }

    /// The code as JSON: parameters, each worker's partitions and coefficients, and `B`.
    pub fn to_json(&self) -> serde_json::Value {
        let workers: Vec<serde_json::Value> = (0..self.n)
            .map(|i| {
                serde_json::json!({
                    "worker": i,
                    "partitions": self.partitions(i),
                    "coefficients": self.coefficients(i).unwrap_or_default(),
                })
            })
            .collect();
        let b: Vec<&[f64]> = self.b.chunks(self.n).collect();
        serde_json::json!({
            "scheme": self.scheme,
            "n": self.n,
            "s": self.s,
            "seed": self.seed,
            "load_partitions_per_worker": self.load(),
            "min_responders": self.min_responders(),
            "assignment": workers,
            "B": b,
        })
    }
}

fn fractional(n: usize, s: usize) -> Result<(Vec<f64>, Vec<Vec<usize>>)> {
    let g = s + 1;
    if n % g != 0 {
        return Err(Error::InvalidArgument(format!(
            "fractional repetition needs (s + 1) to divide n, but {g} does not divide {n}; \
             use the cyclic scheme or pick s with (s + 1) | n"
        )));
    }
    let mut b = vec![0f64; n * n];
    let mut support = Vec::with_capacity(n);
    for i in 0..n {
        let parts: Vec<usize> = (i / g * g..(i / g + 1) * g).collect();
        for &p in &parts {
            b[i * n + p] = 1.0;
        }
        support.push(parts);
    }
    Ok((b, support))
}

/// Tandon et al., Algorithm 2: random `H` (`s × n`) with `H 1 = 0`; row `i` of `B` is supported on
/// `i..=i+s (mod n)`, has `B[i][i] = 1` and satisfies `H B[i]ᵀ = 0`. The rows then span `null(H)`,
/// which contains `1`, and any `n − s` of them are independent with probability 1.
fn cyclic(n: usize, s: usize, seed: u64) -> Result<(Vec<f64>, Vec<Vec<usize>>)> {
    let mut b = vec![0f64; n * n];
    let support: Vec<Vec<usize>> = (0..n)
        .map(|i| (0..=s).map(|j| (i + j) % n).collect())
        .collect();
    if s == 0 {
        for i in 0..n {
            b[i * n + i] = 1.0;
        }
        return Ok((b, support));
    }
    // Retry with a derived seed in the (probability-zero) event of a singular s × s block.
    for attempt in 0..16u64 {
        let mut rng = Rng::new(seed ^ attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut h = vec![0f64; s * n]; // row-major s × n
        for r in 0..s {
            let mut sum = 0.0;
            for c in 0..n - 1 {
                let v = rng.normal();
                h[r * n + c] = v;
                sum += v;
            }
            h[r * n + n - 1] = -sum;
        }
        let mut ok = true;
        for i in 0..n {
            // Solve H[:, supp \ {i}] x = -H[:, i] (s × s).
            let cols: Vec<usize> = support[i][1..].to_vec();
            let mut m: Vec<f64> = Vec::with_capacity(s * (s + 1));
            for r in 0..s {
                for &c in &cols {
                    m.push(h[r * n + c]);
                }
                m.push(-h[r * n + i]);
            }
            match solve_square(&mut m, s) {
                Some(x) => {
                    b[i * n + i] = 1.0;
                    for (&c, v) in cols.iter().zip(x) {
                        b[i * n + c] = v;
                    }
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok((b, support));
        }
        b.iter_mut().for_each(|v| *v = 0.0);
    }
    Err(Error::InvalidArgument(format!(
        "cyclic gradient code (n = {n}, s = {s}): could not build a non-singular construction from seed {seed}; try another seed"
    )))
}

/// Solve the `k × k` system stored row-major with the right-hand side as column `k`; `None` if singular.
fn solve_square(m: &mut [f64], k: usize) -> Option<Vec<f64>> {
    let w = k + 1;
    for col in 0..k {
        let best =
            (col..k).max_by(|&a, &b| m[a * w + col].abs().total_cmp(&m[b * w + col].abs()))?;
        if m[best * w + col].abs() < 1e-12 {
            return None;
        }
        for c in 0..w {
            m.swap(best * w + c, col * w + c);
        }
        for r in 0..k {
            if r != col {
                let f = m[r * w + col] / m[col * w + col];
                for c in col..w {
                    m[r * w + c] -= f * m[col * w + c];
                }
            }
        }
    }
    Some((0..k).map(|r| m[r * w + k] / m[r * w + r]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_codes_decode_every_set() {
        for (scheme, n, s) in [
            (Scheme::FractionalRepetition, 6, 2),
            (Scheme::Cyclic, 5, 2),
            (Scheme::Cyclic, 4, 0),
        ] {
            let c = GradientCode::new(scheme, n, s, 1).unwrap();
            for mask in 0u32..(1 << n) {
                let set: Vec<usize> = (0..n).filter(|i| mask >> i & 1 == 1).collect();
                if set.len() >= n - s {
                    let a = c.decoding_vector(&set).unwrap();
                    assert!(c.residual(&a) < RESIDUAL_TOL);
                }
            }
        }
        let c = GradientCode::cyclic(5, 2, 1).unwrap();
        assert!(c.decoding_vector(&[0, 1]).is_err());
        assert!(GradientCode::fractional(5, 1).is_err());
    }
}
