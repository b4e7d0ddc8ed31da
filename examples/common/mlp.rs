//! The small MLP and the digits data shared by the training examples (`quickstart`, `straggler`,
//! `dgc_train`), included by each with `#[path = "common/mlp.rs"] mod mlp;`.
//!
//! A 64 → `hidden` (ReLU) → 10 (softmax) network on the digits dataset bundled with smartcore
//! (1797 8×8 images, nothing downloaded). The parameters (and gradients) live in one flat `Vec<f32>`
//! in layer order W1 (hidden×64), b1, W2 (10×hidden), b2; [`Mlp::w1`] … [`Mlp::b2`] name the slices.

// Each example uses only part of this module.
#![allow(dead_code)]

use ferroccl::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use std::ops::Range;

/// Input features (8×8 pixels).
pub const INPUT: usize = 64;
/// Output classes (digits 0–9).
pub const CLASSES: usize = 10;

/// The digits dataset, features scaled to [0, 1], with a fixed 80/20 split.
pub struct Data {
    pub x: Vec<f32>,
    pub y: Vec<usize>,
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

impl Data {
    /// Loads the digits and splits them by a shuffle seeded with `seed`.
    pub fn load(seed: u64) -> Data {
        let d = smartcore::dataset::digits::load_dataset();
        assert_eq!(d.num_features, INPUT, "digits has 8x8 images");
        let mut idx: Vec<usize> = (0..d.num_samples).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        let test = idx.split_off(d.num_samples * 4 / 5);
        Data {
            x: d.data.iter().map(|v| v / 16.0).collect(),
            y: d.target.iter().map(|&t| t as usize).collect(),
            train: idx,
            test,
        }
    }

    /// Features and label of sample `i`.
    pub fn sample(&self, i: usize) -> (&[f32], usize) {
        (&self.x[i * INPUT..(i + 1) * INPUT], self.y[i])
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Index of the largest probability (the first one on ties).
fn argmax(prob: &[f32; CLASSES]) -> usize {
    (0..CLASSES).fold(0, |b, k| if prob[k] > prob[b] { k } else { b })
}

/// The network's shape: 64 → `hidden` (ReLU) → 10 (softmax), over a flat parameter vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mlp {
    pub hidden: usize,
}

impl Mlp {
    pub fn new(hidden: usize) -> Mlp {
        Mlp { hidden }
    }

    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.b2().end
    }

    /// W1 (hidden×INPUT, row-major) in the flat vector.
    pub fn w1(&self) -> Range<usize> {
        0..self.hidden * INPUT
    }

    /// b1 (hidden).
    pub fn b1(&self) -> Range<usize> {
        let s = self.w1().end;
        s..s + self.hidden
    }

    /// W2 (CLASSES×hidden, row-major).
    pub fn w2(&self) -> Range<usize> {
        let s = self.b1().end;
        s..s + CLASSES * self.hidden
    }

    /// b2 (CLASSES).
    pub fn b2(&self) -> Range<usize> {
        let s = self.w2().end;
        s..s + CLASSES
    }

    /// The tensors in layer order: W1, b1, W2, b2.
    pub fn tensors(&self) -> [Range<usize>; 4] {
        [self.w1(), self.b1(), self.w2(), self.b2()]
    }

    /// An all-zero parameter (or gradient) vector.
    pub fn zeros(&self) -> Vec<f32> {
        vec![0.0; self.n_params()]
    }

    /// He-uniform weights for the ReLU layer, Glorot-uniform for the output layer, zero biases.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = self.zeros();
        let a1 = (6.0 / INPUT as f32).sqrt();
        let a2 = (6.0 / (self.hidden + CLASSES) as f32).sqrt();
        p[self.w1()]
            .iter_mut()
            .for_each(|w| *w = rng.gen_range(-a1..a1));
        p[self.w2()]
            .iter_mut()
            .for_each(|w| *w = rng.gen_range(-a2..a2));
        p
    }

    /// One sample through the network: the hidden activations go to `h` (length `hidden`), the
    /// class probabilities are returned.
    pub fn forward(&self, p: &[f32], x: &[f32], h: &mut [f32]) -> [f32; CLASSES] {
        for ((hj, w), b) in h
            .iter_mut()
            .zip(p[self.w1()].chunks(INPUT))
            .zip(&p[self.b1()])
        {
            *hj = (b + dot(w, x)).max(0.0);
        }
        let mut z = [0f32; CLASSES];
        for ((zk, w), b) in z
            .iter_mut()
            .zip(p[self.w2()].chunks(self.hidden))
            .zip(&p[self.b2()])
        {
            *zk = b + dot(w, h);
        }
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        z.iter_mut().for_each(|v| *v = (*v - max).exp());
        let sum: f32 = z.iter().sum();
        z.iter_mut().for_each(|v| *v /= sum);
        z
    }

    /// Mean cross-entropy over `batch`; its gradient overwrites `g`.
    pub fn loss_and_grad(&self, p: &[f32], data: &Data, batch: &[usize], g: &mut [f32]) -> f32 {
        let (hidden, w1, b1, w2, b2) = (self.hidden, self.w1(), self.b1(), self.w2(), self.b2());
        g.fill(0.0);
        let scale = 1.0 / batch.len() as f32;
        let mut loss = 0.0;
        let mut h = vec![0f32; hidden];
        let mut dh = vec![0f32; hidden];
        for &i in batch {
            let (x, y) = data.sample(i);
            let mut dz = self.forward(p, x, &mut h);
            loss -= dz[y].max(1e-30).ln();
            dz[y] -= 1.0; // d loss / d logits = softmax - one_hot
            dh.fill(0.0);
            for (k, &d) in dz.iter().enumerate() {
                let d = d * scale;
                g[b2.start + k] += d;
                let row = w2.start + k * hidden..w2.start + (k + 1) * hidden;
                for (((gw, w), hj), dhj) in
                    g[row.clone()].iter_mut().zip(&p[row]).zip(&h).zip(&mut dh)
                {
                    *gw += d * hj;
                    *dhj += d * w;
                }
            }
            for (j, (&hj, &d)) in h.iter().zip(&dh).enumerate() {
                if hj > 0.0 {
                    g[b1.start + j] += d;
                    let row = w1.start + j * INPUT..w1.start + (j + 1) * INPUT;
                    for (gw, xi) in g[row].iter_mut().zip(x) {
                        *gw += d * xi;
                    }
                }
            }
        }
        loss * scale
    }

    /// Correct predictions among the test samples `idx`.
    fn correct<'a>(&self, p: &[f32], data: &Data, idx: impl Iterator<Item = &'a usize>) -> usize {
        let mut h = vec![0f32; self.hidden];
        idx.filter(|&&i| {
            let (x, y) = data.sample(i);
            argmax(&self.forward(p, x, &mut h)) == y
        })
        .count()
    }

    /// Accuracy on the whole test set, computed locally.
    pub fn accuracy(&self, p: &[f32], data: &Data) -> f64 {
        self.correct(p, data, data.test.iter()) as f64 / data.test.len() as f64
    }

    /// Test accuracy: each rank scores every world-th test sample, the counts are summed across
    /// ranks.
    pub fn evaluate<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        p: &[f32],
        data: &Data,
    ) -> Result<f64> {
        let mine = data
            .test
            .iter()
            .skip(comm.rank())
            .step_by(comm.world_size());
        let mut counts = [
            self.correct(p, data, mine.clone()) as f64, // correct
            mine.count() as f64,                        // seen
        ];
        comm.all_reduce(&mut counts, ReduceOp::Sum)?;
        Ok(counts[0] / counts[1])
    }
}

/// FNV-1a over the bits of every parameter: equal on two ranks iff their parameters are identical.
pub fn checksum(p: &[f32]) -> i64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in p {
        h = (h ^ u64::from(w.to_bits())).wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written backward pass against central differences of the loss.
    #[test]
    fn gradient_matches_finite_differences() {
        let mlp = Mlp::new(64);
        let data = Data::load(1);
        let batch = &data.train[..8];
        let mut p = mlp.init_params(3);
        p[mlp.b1()]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = 0.05 * (i % 5) as f32);
        let mut g = mlp.zeros();
        mlp.loss_and_grad(&p, &data, batch, &mut g);
        let mut scratch = mlp.zeros();
        let tensors = mlp.tensors();
        for (t, i) in [(0, 5), (0, 700), (1, 3), (2, 17), (2, 600), (3, 4)] {
            let at = tensors[t].start + i;
            assert!(at < tensors[t].end);
            let eps = 1e-2;
            let w = p[at];
            p[at] = w + eps;
            let up = mlp.loss_and_grad(&p, &data, batch, &mut scratch);
            p[at] = w - eps;
            let down = mlp.loss_and_grad(&p, &data, batch, &mut scratch);
            p[at] = w;
            let numeric = (up - down) / (2.0 * eps);
            assert!(
                (numeric - g[at]).abs() < 2e-3,
                "tensor {t}[{i}]: {numeric} vs {}",
                g[at]
            );
        }
    }
}
