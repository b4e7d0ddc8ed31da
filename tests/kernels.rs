//! Kernel tests.
//!
//! * CPU twin against hand-computed cases — always run.
//! * `cuda::nvrtc_compiles_every_kernel` (feature `cuda`) — compiles every file of `cuda/` for sm_80
//!   and sm_90 with NVRTC (no GPU needed) and fails on any error or warning. Without libnvrtc it
//!   prints a skip message, unless `FERROCCL_REQUIRE_NVRTC=1`, which makes that a failure.
//! * `cuda::gpu_*` (feature `cuda`, `#[ignore = "needs a GPU"]`) — parity of every CUDA kernel with
//!   its CPU twin on random and edge-case inputs. Run on a GPU machine with
//!   `cargo test --release --features cuda --test kernels -- --include-ignored`.

use ferroccl::kernels::{CpuKernels, Kernels};
use ferroccl::Error;
use half::{bf16, f16};

const K: CpuKernels = CpuKernels;

fn bits_bf16(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn cpu_gather_rows_by_hand() {
    // 3 rows of 2.
    let src = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let idx = vec![2u32, 0, 2];
    let mut dst = K.alloc::<f32>(6).unwrap();
    K.gather_rows(&src, &idx, 2, &mut dst).unwrap();
    assert_eq!(dst, vec![5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);

    // Bytes, odd row length.
    let src: Vec<u8> = (0..12).collect();
    let idx = vec![3u32, 1];
    let mut dst = vec![0u8; 6];
    K.gather_rows(&src, &idx, 3, &mut dst).unwrap();
    assert_eq!(dst, vec![9, 10, 11, 3, 4, 5]);

    // NaN payloads survive (it is a byte copy).
    let nan = bf16::from_bits(0x7F81);
    let src = vec![nan, bf16::ONE];
    let mut dst = vec![bf16::ZERO; 2];
    K.gather_rows(&src, &vec![0u32, 1], 1, &mut dst).unwrap();
    assert_eq!(bits_bf16(&dst), vec![0x7F81, 0x3F80]);

    // Empty.
    let mut dst: Vec<f32> = vec![];
    K.gather_rows(&vec![1.0f32; 4], &vec![], 4, &mut dst)
        .unwrap();
}

#[test]
fn cpu_gather_rows_errors() {
    let src = vec![0.0f32; 6];
    let mut dst = vec![7.0f32; 4];
    let e = K
        .gather_rows(&src, &vec![0u32, 3], 2, &mut dst)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("index 3"), "{e}");
    assert_eq!(
        dst,
        vec![7.0; 4],
        "nothing written when an index is out of range"
    );
    assert!(matches!(
        K.gather_rows(&src, &vec![0u32], 2, &mut dst),
        Err(Error::LengthMismatch {
            expected: 2,
            got: 4,
            ..
        })
    ));
    assert!(matches!(
        K.gather_rows(&src, &vec![0u32], 0, &mut vec![]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        K.gather_rows(&src, &vec![0u32], 4, &mut vec![0.0; 4]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn cpu_scatter_rows_by_hand() {
    // Overwrite, no weights: 2 rows of 2 into 3 rows.
    let src = vec![1.0f32, 2.0, 3.0, 4.0];
    let idx = vec![2u32, 0];
    let mut dst = vec![9.0f32; 6];
    K.scatter_rows(&src, &idx, None, 2, false, &mut dst)
        .unwrap();
    assert_eq!(dst, vec![3.0, 4.0, 9.0, 9.0, 1.0, 2.0]);

    // Weighted overwrite.
    let w = vec![0.5f32, -2.0];
    let mut dst = vec![9.0f32; 6];
    K.scatter_rows(&src, &idx, Some(&w), 2, false, &mut dst)
        .unwrap();
    assert_eq!(dst, vec![-6.0, -8.0, 9.0, 9.0, 0.5, 1.0]);

    // Weighted accumulate with a duplicate index (MoE combine, top-2 into one token).
    let idx = vec![1u32, 1];
    let mut dst = vec![10.0f32; 6];
    K.scatter_rows(&src, &idx, Some(&w), 2, true, &mut dst)
        .unwrap();
    assert_eq!(
        dst,
        vec![10.0, 10.0, 10.0 + 0.5 - 6.0, 10.0 + 1.0 - 8.0, 10.0, 10.0]
    );

    // Accumulate without weights.
    let mut dst = vec![1.0f32; 4];
    K.scatter_rows(&vec![1.0f32, 2.0], &vec![1u32], None, 2, true, &mut dst)
        .unwrap();
    assert_eq!(dst, vec![1.0, 1.0, 2.0, 3.0]);

    // Overwrite with duplicates: the last row wins on the CPU.
    let mut dst = vec![0.0f32; 2];
    K.scatter_rows(&vec![1.0f32, 2.0], &vec![0u32, 0], None, 1, false, &mut dst)
        .unwrap();
    assert_eq!(dst, vec![2.0, 0.0]);
}

#[test]
fn cpu_scatter_rows_half_precision_rounds_once_per_store() {
    // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
    let src = vec![bf16::from_f32(1.0 / 256.0)];
    let mut dst = vec![bf16::ONE];
    K.scatter_rows(&src, &vec![0u32], None, 1, true, &mut dst)
        .unwrap();
    assert_eq!(dst[0].to_bits(), 0x3F80);
    // Three eighths of 2^-7 would round down; two such adds round each time (stay at 1).
    let src = vec![bf16::from_f32(3.0 / 1024.0); 2];
    let mut dst = vec![bf16::ONE];
    K.scatter_rows(&src, &vec![0u32, 0], None, 1, true, &mut dst)
        .unwrap();
    assert_eq!(dst[0], bf16::ONE);
    // Weighted, computed in f32 then rounded once: 0.1 * 3 in f32, then to f16.
    let src = vec![f16::from_f32(3.0)];
    let w = vec![0.1f32];
    let mut dst = vec![f16::ZERO];
    K.scatter_rows(&src, &vec![0u32], Some(&w), 1, false, &mut dst)
        .unwrap();
    assert_eq!(dst[0], f16::from_f32(0.1f32 * 3.0));
}

#[test]
fn cpu_scatter_rows_errors() {
    let src = vec![1.0f32; 4];
    let mut dst = vec![0.0f32; 4];
    let e = K
        .scatter_rows(&src, &vec![0u32, 2], None, 2, true, &mut dst)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(dst, vec![0.0; 4]);
    assert!(matches!(
        K.scatter_rows(&src, &vec![0u32, 1], Some(&vec![1.0]), 2, true, &mut dst),
        Err(Error::LengthMismatch {
            expected: 2,
            got: 1,
            ..
        })
    ));
    assert!(matches!(
        K.scatter_rows(&src, &vec![0u32], None, 2, true, &mut dst),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        K.scatter_rows(&src, &vec![0u32, 1], None, 2, true, &mut vec![0.0; 3]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn cpu_scatter_add_by_hand() {
    let mut dense = vec![1.0f32; 5];
    K.scatter_add(&vec![4u32, 0, 4], &vec![2.0, -1.0, 0.5], &mut dense)
        .unwrap();
    assert_eq!(dense, vec![0.0, 1.0, 1.0, 1.0, 3.5]);
    let e = K
        .scatter_add(&vec![5u32], &vec![1.0], &mut dense)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(matches!(
        K.scatter_add(&vec![0u32, 1], &vec![1.0], &mut dense),
        Err(Error::LengthMismatch { .. })
    ));
    K.scatter_add(&vec![], &vec![], &mut vec![]).unwrap();
}

#[test]
fn cpu_casts_by_hand() {
    let x = vec![
        1.0f32,
        f32::from_bits(0x3F80_8000), // tie, even below: rounds down to 0x3F80
        f32::from_bits(0x3F81_8000), // tie, odd below: rounds up to 0x3F82
        f32::from_bits(0x3F80_8001), // above the tie: up
        f32::from_bits(0x7F80_0001), // signalling NaN: quieted, payload truncated
        f32::NEG_INFINITY,
        -0.0,
    ];
    let mut y = vec![bf16::ZERO; x.len()];
    K.cast_f32_to_bf16(&x, &mut y).unwrap();
    assert_eq!(
        bits_bf16(&y),
        vec![0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7FC0, 0xFF80, 0x8000]
    );
    let mut back = vec![0.0f32; x.len()];
    K.cast_bf16_to_f32(&y, &mut back).unwrap();
    assert_eq!(back[2], f32::from_bits(0x3F82_0000));
    assert!(back[4].is_nan());

    let x = vec![65520.0f32, 65504.0, 5.960_464_5e-8, 1e-9, 1.0 / 3.0];
    let mut h = vec![f16::ZERO; x.len()];
    K.cast_f32_to_f16(&x, &mut h).unwrap();
    let hb: Vec<u16> = h.iter().map(|v| v.to_bits()).collect();
    assert_eq!(hb, vec![0x7C00, 0x7BFF, 0x0001, 0x0000, 0x3555]);
    let mut back = vec![0.0f32; x.len()];
    K.cast_f16_to_f32(&h, &mut back).unwrap();
    assert_eq!(back[1], 65504.0);
    assert_eq!(back[2], 5.960_464_5e-8);

    assert!(matches!(
        K.cast_f32_to_bf16(&vec![1.0], &mut vec![]),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn cpu_scale_add_by_hand() {
    let mut y = vec![10.0f32, 20.0, -1.0];
    K.scale_add(2.0, &vec![1.0, 2.0, 0.5], &mut y).unwrap();
    assert_eq!(y, vec![12.0, 24.0, 0.0]);
    assert!(matches!(
        K.scale_add(1.0, &vec![1.0], &mut y),
        Err(Error::LengthMismatch { .. })
    ));
}

/// Algorithm code written once against the trait.
fn dgc_densify<Kk: Kernels>(
    k: &Kk,
    n: usize,
    idx: &[u32],
    val: &[f32],
) -> ferroccl::Result<Vec<f32>> {
    let idx = k.upload(idx)?;
    let val = k.upload(val)?;
    let mut dense = k.alloc::<f32>(n)?;
    k.scatter_add(&idx, &val, &mut dense)?;
    k.synchronize()?;
    k.download(&dense)
}

#[test]
fn cpu_generic_algorithm_code() {
    assert_eq!(
        dgc_densify(&K, 4, &[3, 1], &[1.5, -2.0]).unwrap(),
        vec![0.0, -2.0, 0.0, 1.5]
    );
}

/// Every `cuda/*.cu` file of the source tree is in the one kernel registry (so `compile_all`, CI's
/// NVRTC check and the loaders see it), every registered file exists, and the embedded copies are
/// the files' current text (the shared header too). Reads the source tree, so it skips when the
/// test binary runs without one (a staged binary).
#[test]
fn every_cuda_file_is_registered() {
    use ferroccl::kernels::registry;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "SKIPPED every_cuda_file_is_registered: no source tree at {}",
            dir.display()
        );
        return;
    };
    let mut on_disk: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let registered: Vec<&str> = registry::ALL.iter().map(|f| f.name).collect();
    for name in &on_disk {
        assert!(
            registry::find(name).is_some(),
            "cuda/{name} is not registered: add one line for it to src/kernels/registry.rs"
        );
    }
    assert_eq!(on_disk, registered, "registry vs cuda/*.cu");
    for f in registry::ALL.iter().chain([&registry::COMMON_HEADER]) {
        let text = std::fs::read_to_string(dir.join(f.name)).unwrap();
        assert_eq!(text, f.source, "embedded {} differs from the file", f.name);
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use ferroccl::device::{probe_with, Lib};
    use ferroccl::kernels::cuda::nvrtc_available;
    use ferroccl::kernels::{
        compile_all, compile_source, kernel_sources, CudaKernels, FloatElem, KernelElem,
    };
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    #[test]
    fn nvrtc_compiles_every_kernel() {
        if !nvrtc_available() {
            let msg = "libnvrtc.so.13 not found: add the folder holding it to LD_LIBRARY_PATH \
                       (pip install nvidia-cuda-nvrtc; .../site-packages/nvidia/cu13/lib)";
            if std::env::var("FERROCCL_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("FERROCCL_REQUIRE_NVRTC=1 but {msg}");
            }
            eprintln!("SKIPPED nvrtc_compiles_every_kernel: {msg}");
            return;
        }
        // The embedded sources of the one registry (what the library compiles at run time), so a
        // staged test binary needs no source tree; `every_cuda_file_is_registered` checks that the
        // registry misses no file of cuda/.
        assert!(kernel_sources().len() >= 6);
        for arch in ["sm_80", "sm_90"] {
            for f in kernel_sources() {
                let log = compile_source(f.name, f.source, arch)
                    .unwrap_or_else(|e| panic!("{arch}: {e}"));
                let lower = log.to_lowercase();
                assert!(
                    !lower.contains("warning") && !lower.contains("error"),
                    "{} for {arch}: NVRTC reported:\n{log}",
                    f.name
                );
                eprintln!("compiled {} for {arch}: clean", f.name);
            }
            let all = compile_all(arch).unwrap();
            let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            let want: Vec<&str> = kernel_sources().iter().map(|f| f.name).collect();
            assert_eq!(names, want, "compile_all compiles exactly the registry");
        }
    }

    #[test]
    fn missing_libraries_give_clear_errors() {
        let e = probe_with(&[Lib::Cuda, Lib::Nvrtc], |l| l == Lib::Cuda).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::Cuda { .. }));
        assert!(
            s.contains("libnvrtc.so") && s.contains("LD_LIBRARY_PATH"),
            "{s}"
        );
        assert!(s.contains("pip install nvidia-cuda-nvrtc"), "{s}");
        let e = probe_with(&[Lib::Cuda, Lib::Nvrtc], |_| false).unwrap_err();
        assert!(e.to_string().contains("libcuda.so"), "{e}");
        probe_with(&[Lib::Cuda, Lib::Nvrtc], |_| true).unwrap();
    }

    #[test]
    fn bad_arch_is_rejected() {
        for arch in ["compute_80", "80", "sm_", "sm_8x"] {
            assert!(
                matches!(compile_all(arch), Err(Error::InvalidArgument(_))),
                "{arch}"
            );
        }
    }

    // --------------------------------------------------------------------------------------------
    // GPU parity.

    const ROWS: [usize; 5] = [0, 1, 1023, 1025, 4097];
    const ROW_LENS: [usize; 5] = [1, 3, 8, 64, 1000];
    const POISON_F32: u32 = 0x7FBA_DBAD; // a NaN pattern no kernel writes
    const POISON_16: u16 = 0x7FAD;

    fn gpu() -> CudaKernels {
        CudaKernels::new(0).unwrap_or_else(|e| panic!("no usable GPU: {e}"))
    }

    fn as_bytes<T: KernelElem>(v: &[T]) -> &[u8] {
        bytemuck::cast_slice(v)
    }

    /// Random bit patterns (NaNs, infinities, subnormals included).
    fn random_bits<T: KernelElem>(rng: &mut StdRng, n: usize) -> Vec<T> {
        let mut v = vec![T::zeroed(); n];
        rng.fill(bytemuck::cast_slice_mut::<T, u8>(&mut v));
        v
    }

    fn random_floats<T: FloatElem>(rng: &mut StdRng, n: usize) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f32(rng.gen_range(-2.0f32..2.0)))
            .collect()
    }

    fn poison<T: KernelElem>(n: usize) -> Vec<T> {
        let mut v = vec![T::zeroed(); n];
        let pattern: Vec<u8> = match std::mem::size_of::<T>() {
            4 => POISON_F32.to_le_bytes().to_vec(),
            2 => POISON_16.to_le_bytes().to_vec(),
            _ => vec![0xA5],
        };
        for (b, p) in bytemuck::cast_slice_mut::<T, u8>(&mut v)
            .iter_mut()
            .zip(pattern.iter().cycle())
        {
            *b = *p;
        }
        v
    }

    fn gather_case<T: KernelElem>(g: &CudaKernels, rng: &mut StdRng, rows: usize, row_len: usize) {
        let src_rows = rows + 7;
        let src: Vec<T> = random_bits(rng, src_rows * row_len);
        let idx: Vec<u32> = (0..rows)
            .map(|_| rng.gen_range(0..src_rows as u32))
            .collect();
        let mut want = poison::<T>(rows * row_len);
        K.gather_rows(&src, &idx, row_len, &mut want).unwrap();
        let (s, i) = (g.upload(&src).unwrap(), g.upload(&idx).unwrap());
        let mut d = g.upload(&poison::<T>(rows * row_len)).unwrap();
        g.gather_rows(&s, &i, row_len, &mut d).unwrap();
        let got = g.download(&d).unwrap();
        assert!(
            as_bytes(&got) == as_bytes(&want),
            "gather_rows {} rows={rows} row_len={row_len}",
            std::any::type_name::<T>()
        );
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_gather_rows_parity() {
        let g = gpu();
        let mut rng = StdRng::seed_from_u64(1);
        for &rows in &ROWS {
            for &row_len in &ROW_LENS {
                gather_case::<f32>(&g, &mut rng, rows, row_len);
                gather_case::<bf16>(&g, &mut rng, rows, row_len);
                gather_case::<u8>(&g, &mut rng, rows, row_len);
                gather_case::<f64>(&g, &mut rng, rows, row_len);
            }
        }
    }

    /// Unit roundoff per element type (half an ulp, relative): the largest relative error of one
    /// rounding to nearest. The 16-bit types get the f32 roundoff added, since the CPU twin rounds
    /// each sum to f32 before rounding it to the 16-bit type.
    fn unit_roundoff<T: FloatElem>() -> f64 {
        match T::KIND {
            ferroccl::kernels::FloatKind::F32 => 2f64.powi(-24),
            ferroccl::kernels::FloatKind::BF16 => 2f64.powi(-8) + 2f64.powi(-24),
            ferroccl::kernels::FloatKind::F16 => 2f64.powi(-11) + 2f64.powi(-24),
        }
    }

    /// Largest absolute error of one rounding in the subnormal range (half the smallest subnormal).
    fn subnormal_roundoff<T: FloatElem>() -> f64 {
        match T::KIND {
            ferroccl::kernels::FloatKind::F16 => 2f64.powi(-25),
            _ => 2f64.powi(-150),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn scatter_case<T: FloatElem>(
        g: &CudaKernels,
        rng: &mut StdRng,
        rows: usize,
        row_len: usize,
        weighted: bool,
        accumulate: bool,
        duplicates: bool,
    ) {
        let dst_rows = if duplicates { rows / 4 + 1 } else { rows + 5 };
        let idx: Vec<u32> = if duplicates {
            (0..rows)
                .map(|_| rng.gen_range(0..dst_rows as u32))
                .collect()
        } else {
            let mut p: Vec<u32> = (0..dst_rows as u32).collect();
            p.shuffle(rng);
            p.truncate(rows);
            p
        };
        let src: Vec<T> = random_floats(rng, rows * row_len);
        let w: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let init: Vec<T> = if accumulate {
            random_floats(rng, dst_rows * row_len)
        } else {
            poison(dst_rows * row_len)
        };
        let weights = weighted.then_some(&w);
        let mut want = init.clone();
        K.scatter_rows(&src, &idx, weights, row_len, accumulate, &mut want)
            .unwrap();

        let (s, i, wd) = (
            g.upload(&src).unwrap(),
            g.upload(&idx).unwrap(),
            g.upload(&w).unwrap(),
        );
        let mut d = g.upload(&init).unwrap();
        g.scatter_rows(&s, &i, weighted.then_some(&wd), row_len, accumulate, &mut d)
            .unwrap();
        let got = g.download(&d).unwrap();
        let what = format!(
            "scatter_rows {} rows={rows} row_len={row_len} weighted={weighted} \
             accumulate={accumulate} duplicates={duplicates}",
            std::any::type_name::<T>()
        );
        // Weighted 16-bit accumulation may use the native 16-bit atomic add (sm_90 for bf16, sm_70
        // for f16), which rounds w * s to the 16-bit type before the add: one extra rounding per
        // contribution compared with the CPU twin, so it is compared within a tolerance even without
        // duplicates. Everything else without duplicates is bit-identical (an unweighted 16-bit
        // atomic add rounds d + s once, like the CPU twin).
        let half = !matches!(T::KIND, ferroccl::kernels::FloatKind::F32);
        let product_rounded = half && weighted && accumulate;
        if !(accumulate && (duplicates || product_rounded)) {
            assert!(
                as_bytes(&got) == as_bytes(&want),
                "{what}: not bit-identical"
            );
            return;
        }
        // Order of the atomic adds is unspecified, and a 16-bit product may be rounded before its
        // add. Every partial sum is at most mag = |init| + sum |w * src| (to first order), so each
        // side's sum roundings are within adds * u * mag of the exact result (u: unit roundoff)
        // and the product roundings within u * sum |w * src|: compare within
        // 2 * (adds + 1) * u * mag (+ u * sum |w * src| when products are rounded), plus the
        // absolute error of that many roundings in the subnormal range.
        let mut mag: Vec<f64> = init.iter().map(|x| x.to_f32().abs() as f64).collect();
        let mut contrib = vec![0f64; dst_rows * row_len];
        let mut adds = vec![0usize; dst_rows];
        for (r, &d) in idx.iter().enumerate() {
            adds[d as usize] += 1;
            let wr = if weighted { w[r] } else { 1.0 };
            for c in 0..row_len {
                let v = (wr as f64 * src[r * row_len + c].to_f32() as f64).abs();
                mag[d as usize * row_len + c] += v;
                contrib[d as usize * row_len + c] += v;
            }
        }
        let u = unit_roundoff::<T>();
        let product_u = if product_rounded { u } else { 0.0 };
        for (e, (a, b)) in got.iter().zip(&want).enumerate() {
            let roundings = 2 * (adds[e / row_len] + 1);
            let tol = roundings as f64 * (u * mag[e] + subnormal_roundoff::<T>())
                + product_u * contrib[e]
                + 1e-30;
            let diff = (a.to_f32() as f64 - b.to_f32() as f64).abs();
            assert!(
                diff <= tol,
                "{what}: element {e}: gpu {} cpu {} (|diff| {diff} > tol {tol})",
                a.to_f32(),
                b.to_f32()
            );
        }
    }

    fn scatter_all<T: FloatElem>(g: &CudaKernels, rng: &mut StdRng) {
        for &rows in &ROWS {
            // 6: the 16-bit two-per-word path (row bytes % 8 != 0); 4 and 12: the 16-bit
            // four-per-word path (row bytes % 16 == 8; 8, 64 and 1000 take the eight-per-vector one).
            for &row_len in ROW_LENS.iter().chain(&[6, 4, 12]) {
                for (weighted, accumulate) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    scatter_case::<T>(g, rng, rows, row_len, weighted, accumulate, false);
                }
                scatter_case::<T>(g, rng, rows, row_len, true, true, true);
                scatter_case::<T>(g, rng, rows, row_len, false, true, true);
            }
        }
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_scatter_rows_parity() {
        let g = gpu();
        let mut rng = StdRng::seed_from_u64(2);
        scatter_all::<f32>(&g, &mut rng);
        scatter_all::<bf16>(&g, &mut rng);
        scatter_all::<f16>(&g, &mut rng);
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_scatter_add_parity() {
        let g = gpu();
        let mut rng = StdRng::seed_from_u64(3);
        for &n in &[1usize, 1023, 1025, 4097, 1 << 20] {
            for duplicates in [false, true] {
                let pairs = if duplicates { n * 2 } else { n / 3 + 1 };
                let idx: Vec<u32> = if duplicates {
                    (0..pairs).map(|_| rng.gen_range(0..n as u32)).collect()
                } else {
                    let mut p: Vec<u32> = (0..n as u32).collect();
                    p.shuffle(&mut rng);
                    p.truncate(pairs);
                    p
                };
                let val: Vec<f32> = (0..idx.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let init: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut want = init.clone();
                K.scatter_add(&idx, &val, &mut want).unwrap();
                let mut d = g.upload(&init).unwrap();
                g.scatter_add(&g.upload(&idx).unwrap(), &g.upload(&val).unwrap(), &mut d)
                    .unwrap();
                let got = g.download(&d).unwrap();
                if !duplicates {
                    assert!(as_bytes(&got) == as_bytes(&want), "scatter_add n={n}");
                    continue;
                }
                let mut mag: Vec<f64> = init.iter().map(|x| x.abs() as f64).collect();
                let mut adds = vec![1usize; n];
                for (&i, &v) in idx.iter().zip(&val) {
                    mag[i as usize] += v.abs() as f64;
                    adds[i as usize] += 1;
                }
                for e in 0..n {
                    let tol = adds[e] as f64 * 2f64.powi(-23) * mag[e] + 1e-30;
                    let diff = (got[e] as f64 - want[e] as f64).abs();
                    assert!(diff <= tol, "scatter_add n={n} element {e}: {diff} > {tol}");
                }
            }
        }
        // Empty.
        let mut d = g.alloc::<f32>(3).unwrap();
        g.scatter_add(&g.alloc(0).unwrap(), &g.alloc(0).unwrap(), &mut d)
            .unwrap();
        assert_eq!(g.download(&d).unwrap(), vec![0.0; 3]);
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_cast_parity() {
        let g = gpu();
        let mut rng = StdRng::seed_from_u64(4);
        // f32 -> 16-bit: random bit patterns plus edge cases, several lengths.
        let mut edge: Vec<f32> = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            65504.0,
            65520.0,
            5.960_464_5e-8,
            2.980_232_2e-8,
            1e-45,
        ]
        .to_vec();
        edge.extend([0x3F80_8000u32, 0x3F81_8000, 0x7F80_0001, 0xFFC0_1234].map(f32::from_bits));
        let mut cases: Vec<Vec<f32>> = vec![vec![], vec![1.5], edge];
        for n in [1023usize, 1025, 4097, 1 << 20] {
            cases.push(random_bits(&mut rng, n));
        }
        for x in &cases {
            let n = x.len();
            let xd = g.upload(x).unwrap();
            let mut want = vec![bf16::ZERO; n];
            K.cast_f32_to_bf16(x, &mut want).unwrap();
            let mut yd = g.upload(&poison::<bf16>(n)).unwrap();
            g.cast_f32_to_bf16(&xd, &mut yd).unwrap();
            assert!(
                as_bytes(&g.download(&yd).unwrap()) == as_bytes(&want),
                "f32->bf16 n={n}"
            );

            let mut want = vec![f16::ZERO; n];
            K.cast_f32_to_f16(x, &mut want).unwrap();
            let mut yd = g.upload(&poison::<f16>(n)).unwrap();
            g.cast_f32_to_f16(&xd, &mut yd).unwrap();
            assert!(
                as_bytes(&g.download(&yd).unwrap()) == as_bytes(&want),
                "f32->f16 n={n}"
            );
        }
        // 16-bit -> f32: every bit pattern.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let xb: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
        let xh: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
        let mut want = vec![0.0f32; all.len()];
        K.cast_bf16_to_f32(&xb, &mut want).unwrap();
        let mut yd = g.upload(&poison::<f32>(all.len())).unwrap();
        g.cast_bf16_to_f32(&g.upload(&xb).unwrap(), &mut yd)
            .unwrap();
        assert!(
            as_bytes(&g.download(&yd).unwrap()) == as_bytes(&want),
            "bf16->f32"
        );
        K.cast_f16_to_f32(&xh, &mut want).unwrap();
        let mut yd = g.upload(&poison::<f32>(all.len())).unwrap();
        g.cast_f16_to_f32(&g.upload(&xh).unwrap(), &mut yd).unwrap();
        assert!(
            as_bytes(&g.download(&yd).unwrap()) == as_bytes(&want),
            "f16->f32"
        );
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_scale_add_parity() {
        let g = gpu();
        let mut rng = StdRng::seed_from_u64(5);
        for n in [0usize, 1, 3, 1023, 1025, 4097, 1 << 20] {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1e3..1e3)).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.gen_range(-1e3..1e3)).collect();
            let a: f32 = rng.gen_range(-3.0..3.0);
            let mut want = y.clone();
            K.scale_add(a, &x, &mut want).unwrap();
            let mut yd = g.upload(&y).unwrap();
            g.scale_add(a, &g.upload(&x).unwrap(), &mut yd).unwrap();
            assert!(
                as_bytes(&g.download(&yd).unwrap()) == as_bytes(&want),
                "scale_add n={n}"
            );
        }
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_out_of_range_index_is_an_error() {
        let g = gpu();
        let src = g.upload(&[1.0f32; 6]).unwrap();
        let mut dst = g.alloc::<f32>(4).unwrap();
        let e = g
            .gather_rows(&src, &g.upload(&[0u32, 3]).unwrap(), 2, &mut dst)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("index 3"), "{e}");
        // The flag was cleared: a good call succeeds.
        g.gather_rows(&src, &g.upload(&[0u32, 2]).unwrap(), 2, &mut dst)
            .unwrap();
        let e = g
            .scatter_rows(
                &dst,
                &g.upload(&[0u32, 9]).unwrap(),
                None,
                2,
                true,
                &mut src.clone(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let mut dense = g.alloc::<f32>(4).unwrap();
        let e = g
            .scatter_add(
                &g.upload(&[4u32]).unwrap(),
                &g.upload(&[1.0f32]).unwrap(),
                &mut dense,
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");

        // Deferred mode: reported by synchronize, then cleared.
        let g = gpu().with_deferred_index_checks(true);
        let src = g.upload(&[1.0f32; 6]).unwrap();
        let mut dst = g.alloc::<f32>(4).unwrap();
        g.gather_rows(&src, &g.upload(&[7u32, 0]).unwrap(), 2, &mut dst)
            .unwrap();
        let e = g.synchronize().unwrap_err();
        assert!(e.to_string().contains("index 7"), "{e}");
        g.synchronize().unwrap();
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_generic_algorithm_code_matches_cpu() {
        let g = gpu();
        let idx = [5u32, 1, 5, 0];
        let val = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(
            dgc_densify(&g, 8, &idx, &val).unwrap(),
            dgc_densify(&K, 8, &idx, &val).unwrap()
        );
    }
}
