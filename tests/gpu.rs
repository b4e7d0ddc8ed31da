//! Device buffers: the NCCL backend (world size 1 on one GPU), four in-process ranks sharing one GPU
//! through pinned staging, and the clear error when CUDA libraries are missing (runs in CI).
//! The GPU tests are `#[ignore = "needs a GPU"]`: run them on the device with `--ignored`.
#![cfg(feature = "cuda")]
mod common;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use ferroccl::device::{probe, probe_with, Lib};
use ferroccl::prelude::*;
use ferroccl::{Communicator, Config};
use std::sync::Arc;

#[test]
fn missing_library_is_a_clear_error_not_a_panic() {
    let e = probe_with(&[Lib::Cuda, Lib::Nccl], |l| l != Lib::Nccl).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("libnccl.so.2") && m.contains("LD_LIBRARY_PATH"),
        "{m}"
    );
    if probe(&[Lib::Cuda]).is_err() {
        // this machine has no driver (CI): the real entry points say so instead of panicking
        let e = ferroccl::nccl::NcclComm::single(0, Config::default())
            .err()
            .expect("no driver");
        assert!(e.to_string().contains("libcuda.so.1"), "{e}");
        let e = ferroccl::init_with(ferroccl::Backend::Nccl)
            .err()
            .expect("no driver");
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
        assert_eq!(ferroccl::device::device_count(), 0);
    }
}

trait DevElem: TestElem + Default + DeviceRepr + ValidAsZeroBits {}
impl<T: TestElem + Default + DeviceRepr + ValidAsZeroBits> DevElem for T {}

fn up<T: DevElem>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    if v.is_empty() {
        return s.alloc_zeros::<T>(0).unwrap();
    }
    s.clone_htod(v).unwrap()
}
fn down<T: DevElem>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    if d.is_empty() {
        return Vec::new();
    }
    s.clone_dtoh(d).unwrap()
}

/// Every collective on device buffers against the naive reference.
fn device_suite<T: DevElem>(
    c: &dyn Communicator,
    s: &Arc<CudaStream>,
    n: usize,
    p2p: bool,
) -> Result<usize> {
    let (r, w) = (c.rank(), c.world_size());
    let mut k = 0;
    for op in ReduceOp::ALL {
        let want: Vec<T> = reduced_vec(w, n, op);
        let mut d = up(s, &input::<T>(r, n, op));
        c.all_reduce(&mut d, op)?;
        assert_eq!(down(s, &d), want, "all_reduce {} {op:?} n={n}", T::DTYPE);
        let inp = up(s, &input::<T>(r, n, op));
        let mut out = s.alloc_zeros::<T>(n).unwrap();
        c.all_reduce_into(&inp, &mut out, op)?;
        assert_eq!(down(s, &out), want, "all_reduce_into {} {op:?}", T::DTYPE);
        let d2 = c.iall_reduce(up(s, &input::<T>(r, n, op)), op)?.wait()?;
        assert_eq!(down(s, &d2), want, "iall_reduce {} {op:?}", T::DTYPE);
        let full: Vec<T> = reduced_vec(w, w * n, op);
        let mut rs = s.alloc_zeros::<T>(n).unwrap();
        c.reduce_scatter(&up(s, &input::<T>(r, w * n, op)), &mut rs, op)?;
        assert_eq!(
            down(s, &rs),
            full[r * n..(r + 1) * n].to_vec(),
            "reduce_scatter {op:?}"
        );
        let mut red = s.alloc_zeros::<T>(n).unwrap();
        c.reduce(
            &up(s, &input::<T>(r, n, op)),
            (r == 0).then_some(&mut red),
            op,
            0,
        )?;
        if r == 0 {
            assert_eq!(down(s, &red), want, "reduce {op:?}");
        }
        k += 5;
    }
    let op = ReduceOp::Sum;
    let mut ag = s.alloc_zeros::<T>(w * n).unwrap();
    c.all_gather(&up(s, &input::<T>(r, n, op)), &mut ag)?;
    let want: Vec<T> = (0..w).flat_map(|q| input::<T>(q, n, op)).collect();
    assert_eq!(down(s, &ag), want, "all_gather");
    let root = w - 1;
    let mut b = up(
        s,
        &if r == root {
            input::<T>(root, n, op)
        } else {
            vec![T::default(); n]
        },
    );
    c.broadcast(&mut b, root)?;
    assert_eq!(down(s, &b), input::<T>(root, n, op), "broadcast");
    let mut a2a = s.alloc_zeros::<T>(w * n).unwrap();
    c.all_to_all(&up(s, &input::<T>(r, w * n, op)), &mut a2a)?;
    let want: Vec<T> = (0..w)
        .flat_map(|q| input::<T>(q, w * n, op)[r * n..(r + 1) * n].to_vec())
        .collect();
    assert_eq!(down(s, &a2a), want, "all_to_all");
    let (_, out) = c
        .iall_gather(
            up(s, &input::<T>(r, n, op)),
            s.alloc_zeros::<T>(w * n).unwrap(),
        )?
        .wait()?;
    assert_eq!(
        down(s, &out),
        (0..w)
            .flat_map(|q| input::<T>(q, n, op))
            .collect::<Vec<_>>(),
        "iall_gather"
    );
    if p2p && w > 1 {
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let pending = c.irecv(s.alloc_zeros::<T>(n).unwrap(), prev, 3)?;
        c.send(&up(s, &input::<T>(r, n, op)), next, 3)?;
        assert_eq!(
            down(s, &pending.wait()?),
            input::<T>(prev, n, op),
            "send/irecv"
        );
    }
    c.barrier()?;
    Ok(k + 5)
}

fn all_types(c: &dyn Communicator, s: &Arc<CudaStream>, p2p: bool) -> Result<usize> {
    let mut k = 0;
    for n in [0usize, 1, 13, 1031, 300_007] {
        k += device_suite::<f32>(c, s, n, p2p)?;
        k += device_suite::<half::bf16>(c, s, n, p2p)?;
        k += device_suite::<i64>(c, s, n, p2p)?;
        k += device_suite::<u8>(c, s, n, p2p)?;
    }
    Ok(k)
}

#[test]
#[ignore = "needs a GPU"]
fn nccl_world_1_every_collective_on_device_buffers() {
    let c = ferroccl::nccl::NcclComm::single(0, Config::default()).unwrap();
    let s = c.stream().clone();
    let k = all_types(&c, &s, false).unwrap();
    println!(
        "nccl world 1: {k} checks passed on {}",
        c.context().name().unwrap_or_default()
    );
    // host buffers are refused with a message saying what to do
    let e = c.all_reduce(&mut vec![1f32; 4], ReduceOp::Sum).unwrap_err();
    assert!(e.to_string().contains("device buffers"), "{e}");
}

#[test]
#[ignore = "needs a GPU"]
fn four_in_process_ranks_share_one_gpu_through_pinned_staging() {
    let ks = ferroccl::local::run(4, |c| {
        let ctx = CudaContext::new(0).map_err(|e| Error::cuda(format!("{e:?}")))?;
        let s = ctx
            .new_stream()
            .map_err(|e| Error::cuda(format!("{e:?}")))?;
        all_types(c, &s, true)
    })
    .unwrap();
    println!("4 local ranks on one GPU: {ks:?} checks passed");
}

#[test]
#[ignore = "needs a GPU"]
fn init_picks_nccl_when_forced_and_a_gpu_is_present() {
    std::env::set_var("FERROCCL_BACKEND", "nccl");
    let c = ferroccl::init().unwrap();
    assert_eq!(c.backend(), "nccl");
    assert_eq!(c.world_size(), 1);
}

#[test]
#[ignore = "needs a GPU"]
fn nccl_init_times_out_when_a_rank_never_joins_and_bad_colors_are_refused() {
    use std::time::{Duration, Instant};
    // rank 0 of 2; rank 1 never calls ncclCommInitRank
    let id = ferroccl::nccl::unique_id().unwrap();
    let cfg = Config::default().with_timeout(Duration::from_secs(3));
    let t0 = Instant::now();
    let e = ferroccl::nccl::NcclComm::new(0, 2, id, 0, cfg)
        .err()
        .expect("a world of 2 with one rank must not initialise");
    let waited = t0.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    println!("nccl init with a missing rank: {e} after {waited:.2?}");
    // the abandoned init does not stand in the way of a new communicator
    let c = ferroccl::nccl::NcclComm::single(0, Config::default()).unwrap();
    let s = c.stream().clone();
    let mut v = up(&s, &[1.5f32, -2.0]);
    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(down(&s, &v), vec![1.5, -2.0]);
    // a color beyond NCCL's int range is an error, not NCCL_SPLIT_NOCOLOR in disguise
    let e = c
        .split(Some(u32::MAX), 0)
        .err()
        .expect("color out of range");
    assert!(e.to_string().contains("color"), "{e}");
    let sub = c
        .split(Some(7), 0)
        .unwrap()
        .expect("color 7 keeps this rank");
    assert_eq!((sub.rank(), sub.world_size()), (0, 1));
}

#[test]
#[ignore = "needs a GPU"]
fn a_slice_of_a_larger_allocation_is_a_buffer() {
    // Two ranks share one GPU through staging; each all-reduces only elements 100..300 of a
    // 1000-element allocation (a CudaViewMut), reads another part through a CudaView, and the rest
    // of the allocation is untouched.
    let out = ferroccl::local::run(2, |c| {
        let ctx = CudaContext::new(0).map_err(|e| Error::cuda(format!("{e:?}")))?;
        let s = ctx
            .new_stream()
            .map_err(|e| Error::cuda(format!("{e:?}")))?;
        let host: Vec<f32> = (0..1000).map(|i| (i + c.rank()) as f32).collect();
        let mut d = up(&s, &host);
        {
            let mut view = d.slice_mut(100..300);
            c.all_reduce(&mut view, ReduceOp::Sum)?;
        }
        let mut gathered = vec![0f32; 20];
        // host destination, device source: staged
        let view = d.slice(0..10);
        c.all_gather(&view, &mut gathered)?;
        Ok((down(&s, &d), gathered))
    })
    .unwrap();
    for (r, (v, g)) in out.iter().enumerate() {
        for (i, x) in v.iter().enumerate() {
            let want = if (100..300).contains(&i) {
                (2 * i + 1) as f32
            } else {
                (i + r) as f32
            };
            assert_eq!(*x, want, "rank {r} element {i}");
        }
        let want: Vec<f32> = (0..2)
            .flat_map(|q| (0..10).map(move |i| (i + q) as f32))
            .collect();
        assert_eq!(g, &want);
    }
}
