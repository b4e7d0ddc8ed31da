//! The CPU twin of every kernel: plain, obviously-correct Rust over `Vec<T>`. It is the reference the
//! CUDA kernels are tested against.
//!
//! 16-bit floats are always computed in f32 and rounded once per stored value: an accumulating
//! `scatter_rows` stores `from_f32(d + w * s)` (`w * s` and the sum in f32). CUDA's native 16-bit
//! atomic add (bf16 on sm_90+, f16 on sm_70+) instead rounds `w * s` to the 16-bit type before adding
//! it, so weighted 16-bit accumulation agrees with this twin only within the tolerance given in the
//! [parent module](super); unweighted accumulation without duplicate indices and every
//! non-accumulating path agree bit for bit.

use super::{
    bad_index, check_gather, check_same_len, check_scatter, check_scatter_add, FloatElem,
    KernelElem, Kernels,
};
use crate::Result;
use half::{bf16, f16};

/// Host implementation of [`Kernels`]; buffers are `Vec<T>`. Stateless and always available.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuKernels;

fn check_indices(op: &str, idx: &[u32], bound: usize, what: &str) -> Result<()> {
    match idx.iter().find(|&&i| i as usize >= bound) {
        Some(&i) => Err(bad_index(op, i, what, bound)),
        None => Ok(()),
    }
}

impl Kernels for CpuKernels {
    type Buf<T: KernelElem> = Vec<T>;

    fn alloc<T: KernelElem>(&self, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::zeroed(); n])
    }

    fn upload<T: KernelElem>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn download<T: KernelElem>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }

    fn len<T: KernelElem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn gather_rows<T: KernelElem>(
        &self,
        src: &Vec<T>,
        idx: &Vec<u32>,
        row_len: usize,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let src_rows = check_gather(src.len(), idx.len(), row_len, dst.len())?;
        check_indices("gather_rows", idx, src_rows, "src rows")?;
        for (out, &s) in dst.chunks_exact_mut(row_len).zip(idx.iter()) {
            let s = s as usize * row_len;
            out.copy_from_slice(&src[s..s + row_len]);
        }
        Ok(())
    }

    fn scatter_rows<T: FloatElem>(
        &self,
        src: &Vec<T>,
        idx: &Vec<u32>,
        weights: Option<&Vec<f32>>,
        row_len: usize,
        accumulate: bool,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let dst_rows = check_scatter(
            src.len(),
            idx.len(),
            weights.map(|w| w.len()),
            row_len,
            dst.len(),
        )?;
        check_indices("scatter_rows", idx, dst_rows, "dst rows")?;
        for (r, (row, &d)) in src.chunks_exact(row_len).zip(idx.iter()).enumerate() {
            let d = d as usize * row_len;
            let out = &mut dst[d..d + row_len];
            match (weights, accumulate) {
                // Exact copy (no arithmetic), like the CUDA byte-copy path.
                (None, false) => out.copy_from_slice(row),
                (w, acc) => {
                    let w = w.map(|w| w[r]);
                    for (o, &s) in out.iter_mut().zip(row) {
                        let v = match w {
                            Some(w) => w * s.to_f32(),
                            None => s.to_f32(),
                        };
                        *o = if acc {
                            // One rounding to T per add (CUDA's native 16-bit atomics round `v` to
                            // T first: see the module docs).
                            T::from_f32(o.to_f32() + v)
                        } else {
                            T::from_f32(v)
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn scatter_add(&self, idx: &Vec<u32>, val: &Vec<f32>, dense: &mut Vec<f32>) -> Result<()> {
        check_scatter_add(idx.len(), val.len())?;
        check_indices("scatter_add", idx, dense.len(), "a dense buffer")?;
        for (&i, &v) in idx.iter().zip(val) {
            dense[i as usize] += v;
        }
        Ok(())
    }

    fn cast_f32_to_bf16(&self, x: &Vec<f32>, y: &mut Vec<bf16>) -> Result<()> {
        check_same_len("cast_f32_to_bf16", x.len(), y.len())?;
        for (o, &i) in y.iter_mut().zip(x) {
            *o = bf16::from_f32(i);
        }
        Ok(())
    }

    fn cast_bf16_to_f32(&self, x: &Vec<bf16>, y: &mut Vec<f32>) -> Result<()> {
        check_same_len("cast_bf16_to_f32", x.len(), y.len())?;
        for (o, &i) in y.iter_mut().zip(x) {
            *o = i.to_f32();
        }
        Ok(())
    }

    fn cast_f32_to_f16(&self, x: &Vec<f32>, y: &mut Vec<f16>) -> Result<()> {
        check_same_len("cast_f32_to_f16", x.len(), y.len())?;
        for (o, &i) in y.iter_mut().zip(x) {
            *o = f16::from_f32(i);
        }
        Ok(())
    }

    fn cast_f16_to_f32(&self, x: &Vec<f16>, y: &mut Vec<f32>) -> Result<()> {
        check_same_len("cast_f16_to_f32", x.len(), y.len())?;
        for (o, &i) in y.iter_mut().zip(x) {
            *o = i.to_f32();
        }
        Ok(())
    }

    fn scale_add(&self, a: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        check_same_len("scale_add", x.len(), y.len())?;
        for (o, &i) in y.iter_mut().zip(x) {
            *o += a * i; // a * x + y: product and sum rounded separately
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
