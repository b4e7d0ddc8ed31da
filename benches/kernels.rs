//! Kernel bandwidth on one GPU: pack (gather rows), unpack (scatter rows: copy, weighted, weighted
//! accumulate), sparse scatter-add, casts and scale-add, each against a device-to-device copy of the
//! same number of bytes measured in the same run.
//!
//! `bytes` counts the minimum traffic (bytes read + bytes written); `GB/s` is bytes / time; `vs_copy`
//! is that bandwidth over the bandwidth of `memcpy_dtod` moving the same traffic (a copy of bytes / 2
//! reads and writes bytes / 2 each). Times are CUDA-event medians of `ITERS` runs after `WARMUP`.
//! Prints a table, one `RESULT {json}` line, and writes `$OUT/kernels.json` when `OUT` is set.
//!
//! `cargo bench --features cuda --bench kernels` (needs a GPU; `FERROCCL_BENCH_QUICK=1` for small
//! shapes). `benches/torch_kernels.py` times the same shapes with torch.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("the kernel benchmark needs a GPU: cargo bench --features cuda --bench kernels");
}

#[cfg(feature = "cuda")]
fn main() -> ferroccl::Result<()> {
    imp::main()
}

#[cfg(feature = "cuda")]
mod imp {
    use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
    use ferroccl::kernels::{CudaKernels, Kernels};
    use ferroccl::{Error, Result};
    use half::bf16;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::sync::Arc;

    const WARMUP: usize = 5;
    const ITERS: usize = 25;

    struct Row {
        kernel: String,
        shape: String,
        bytes: u64,
        ms: f64,
        copy_ms: f64,
    }

    impl Row {
        fn gbps(&self) -> f64 {
            self.bytes as f64 / (self.ms * 1e-3) / 1e9
        }
        fn vs_copy(&self) -> f64 {
            self.copy_ms / self.ms
        }
    }

    fn cu(e: impl std::fmt::Display) -> Error {
        Error::cuda(e.to_string())
    }

    /// Median milliseconds of `f` over ITERS runs (after WARMUP), timed with CUDA events on `stream`.
    fn time(stream: &Arc<CudaStream>, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..WARMUP {
            f()?;
        }
        stream.synchronize().map_err(cu)?;
        let mut ms = Vec::with_capacity(ITERS);
        for _ in 0..ITERS {
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cu)?;
            f()?;
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cu)?;
            ms.push(start.elapsed_ms(&end).map_err(cu)? as f64);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok(ms[ms.len() / 2])
    }

    /// Device-to-device copy times, cached by traffic (copy of traffic / 2 bytes).
    struct CopyRef {
        stream: Arc<CudaStream>,
        cache: HashMap<u64, f64>,
    }

    impl CopyRef {
        fn ms(&mut self, traffic: u64) -> Result<f64> {
            if let Some(&t) = self.cache.get(&traffic) {
                return Ok(t);
            }
            let n = (traffic / 2).max(1) as usize;
            let a: CudaSlice<u8> = self.stream.alloc_zeros(n).map_err(cu)?;
            let mut b: CudaSlice<u8> = self.stream.alloc_zeros(n).map_err(cu)?;
            let s = self.stream.clone();
            let t = time(&self.stream, || s.memcpy_dtod(&a, &mut b).map_err(cu))?;
            self.cache.insert(traffic, t);
            Ok(t)
        }
    }

    fn permutation(rng: &mut StdRng, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        p.shuffle(rng);
        p
    }

    pub fn main() -> Result<()> {
        let quick = std::env::var("FERROCCL_BENCH_QUICK").as_deref() == Ok("1");
        let k = CudaKernels::new(0)?.with_deferred_index_checks(true);
        k.warm_up()?;
        let stream = k.stream().clone();
        let name = k.context().name().unwrap_or_else(|_| "?".into());
        eprintln!("device 0: {name} ({}), quick={quick}", k.arch());
        let mut copy = CopyRef {
            stream: stream.clone(),
            cache: HashMap::new(),
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut rows: Vec<Row> = Vec::new();

        // Pack / unpack: (rows, row bytes). f32 rows (row_len = bytes / 4); bf16 for the bf16 case.
        let shapes: &[(usize, usize)] = if quick {
            &[(16384, 4096), (65536, 256)]
        } else {
            &[
                (262144, 4096),
                (65536, 4096),
                (262144, 1024),
                (1048576, 256),
                (32768, 7168),
            ]
        };
        for &(n_rows, row_bytes) in shapes {
            let row_len = row_bytes / 4;
            let shape = format!("{n_rows}x{row_bytes}B");
            let payload = (n_rows * row_bytes) as u64;
            let idx = k.upload(&permutation(&mut rng, n_rows))?;
            let src = k.alloc::<f32>(n_rows * row_len)?;
            let mut dst = k.alloc::<f32>(n_rows * row_len)?;
            let w = k.upload(
                &(0..n_rows)
                    .map(|_| rng.gen_range(0.0f32..1.0))
                    .collect::<Vec<_>>(),
            )?;
            let idx_bytes = 4 * n_rows as u64;
            let w_bytes = 4 * n_rows as u64;

            let mut push = |kernel: &str, bytes: u64, ms: f64, copy: &mut CopyRef| -> Result<()> {
                rows.push(Row {
                    kernel: kernel.into(),
                    shape: shape.clone(),
                    bytes,
                    ms,
                    copy_ms: copy.ms(bytes)?,
                });
                Ok(())
            };
            let t = time(&stream, || k.gather_rows(&src, &idx, row_len, &mut dst))?;
            push("pack (gather_rows)", 2 * payload + idx_bytes, t, &mut copy)?;
            let t = time(&stream, || {
                k.scatter_rows(&src, &idx, None, row_len, false, &mut dst)
            })?;
            push(
                "unpack copy (scatter_rows)",
                2 * payload + idx_bytes,
                t,
                &mut copy,
            )?;
            let t = time(&stream, || {
                k.scatter_rows(&src, &idx, Some(&w), row_len, false, &mut dst)
            })?;
            push(
                "unpack weighted f32",
                2 * payload + idx_bytes + w_bytes,
                t,
                &mut copy,
            )?;
            let t = time(&stream, || {
                k.scatter_rows(&src, &idx, Some(&w), row_len, true, &mut dst)
            })?;
            push(
                "unpack weighted+acc f32",
                3 * payload + idx_bytes + w_bytes,
                t,
                &mut copy,
            )?;
            drop((src, dst));

            let half_len = row_bytes / 2;
            let src = k.alloc::<bf16>(n_rows * half_len)?;
            let mut dst = k.alloc::<bf16>(n_rows * half_len)?;
            let t = time(&stream, || {
                k.scatter_rows(&src, &idx, Some(&w), half_len, true, &mut dst)
            })?;
            push(
                "unpack weighted+acc bf16",
                3 * payload + idx_bytes + w_bytes,
                t,
                &mut copy,
            )?;
            let t = time(&stream, || k.gather_rows(&src, &idx, half_len, &mut dst))?;
            push("pack bf16", 2 * payload + idx_bytes, t, &mut copy)?;
        }

        // Sparse scatter-add at 1% density (DGC), unique random indices.
        let denses: &[usize] = if quick {
            &[1 << 20]
        } else {
            &[25_500_000, 100_000_000]
        };
        for &n in denses {
            let pairs = n / 100;
            let idx: Vec<u32> = rand::seq::index::sample(&mut rng, n, pairs)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            let val: Vec<f32> = (0..pairs).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let (idx, val) = (k.upload(&idx)?, k.upload(&val)?);
            let mut dense = k.alloc::<f32>(n)?;
            let t = time(&stream, || k.scatter_add(&idx, &val, &mut dense))?;
            let bytes = 16 * pairs as u64; // idx + val read, dense read + written
            rows.push(Row {
                kernel: "scatter_add 1%".into(),
                shape: format!("{n}"),
                bytes,
                ms: t,
                copy_ms: copy.ms(bytes)?,
            });
        }

        // Casts and scale-add.
        let n = if quick { 1 << 22 } else { 100_000_000 };
        {
            let x = k.alloc::<f32>(n)?;
            let mut y = k.alloc::<f32>(n)?;
            let mut h = k.alloc::<bf16>(n)?;
            let t = time(&stream, || k.cast_f32_to_bf16(&x, &mut h))?;
            let bytes = 6 * n as u64;
            rows.push(Row {
                kernel: "cast f32->bf16".into(),
                shape: format!("{n}"),
                bytes,
                ms: t,
                copy_ms: copy.ms(bytes)?,
            });
            let t = time(&stream, || k.cast_bf16_to_f32(&h, &mut y))?;
            rows.push(Row {
                kernel: "cast bf16->f32".into(),
                shape: format!("{n}"),
                bytes,
                ms: t,
                copy_ms: copy.ms(bytes)?,
            });
            let t = time(&stream, || k.scale_add(0.5, &x, &mut y))?;
            let bytes = 12 * n as u64;
            rows.push(Row {
                kernel: "scale_add".into(),
                shape: format!("{n}"),
                bytes,
                ms: t,
                copy_ms: copy.ms(bytes)?,
            });
        }
        k.synchronize()?;

        println!(
            "{:<28} {:>14} {:>14} {:>10} {:>9} {:>8}",
            "kernel", "shape", "bytes", "time_ms", "GB/s", "vs_copy"
        );
        for r in &rows {
            println!(
                "{:<28} {:>14} {:>14} {:>10.4} {:>9.1} {:>8.3}",
                r.kernel,
                r.shape,
                r.bytes,
                r.ms,
                r.gbps(),
                r.vs_copy()
            );
        }
        let json = serde_json::json!({
            "device": name,
            "arch": k.arch(),
            "iters": ITERS,
            "rows": rows.iter().map(|r| serde_json::json!({
                "kernel": r.kernel,
                "shape": r.shape,
                "bytes": r.bytes,
                "time_ms": r.ms,
                "gbps": r.gbps(),
                "copy_ms": r.copy_ms,
                "vs_copy": r.vs_copy(),
            })).collect::<Vec<_>>(),
        });
        println!("RESULT {json}");
        if let Some(out) = std::env::var_os("OUT") {
            let path = std::path::Path::new(&out).join("kernels.json");
            std::fs::write(&path, serde_json::to_string_pretty(&json).map_err(cu)?)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}
