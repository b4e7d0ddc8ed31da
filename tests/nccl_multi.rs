//! The NCCL backend on several GPUs, one process per GPU, every collective on device buffers against
//! the naive references of `common` (the idea of `tests/gpu.rs`'s device suite, with world > 1).
//!
//! Launch one process per GPU, by mpirun or torchrun-style variables (benches/multi_gpu.sh does both):
//!
//! ```text
//! mpirun --allow-run-as-root --oversubscribe -np 4 .device/bin/test-nccl_multi --ignored --test-threads=1
//! for r in 0 1 2 3; do RANK=$r LOCAL_RANK=$r WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29600 \
//!   .device/bin/test-nccl_multi --ignored --test-threads=1 & done; wait
//! ```
//!
//! `ferroccl::init()` must pick NCCL there. Every rank runs the same collectives in the same order; a
//! wrong value is recorded (not a panic, which would leave the other ranks waiting), the counts of
//! failures are summed over ranks at the end, and each rank prints one summary line.
#![cfg(feature = "cuda")]
mod common;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use ferroccl::prelude::*;
use ferroccl::{Communicator, Config};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

trait DevElem: TestElem + Default + DeviceRepr + ValidAsZeroBits + Debug {}
impl<T: TestElem + Default + DeviceRepr + ValidAsZeroBits + Debug> DevElem for T {}

fn cu<E: Debug>(e: E) -> Error {
    Error::cuda(format!("{e:?}"))
}

fn up<T: DevElem>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        return s.alloc_zeros::<T>(0).map_err(cu);
    }
    s.clone_htod(v).map_err(cu)
}

fn zeros<T: DevElem>(s: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(n).map_err(cu)
}

fn down<T: DevElem>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Result<Vec<T>> {
    if d.is_empty() {
        return Ok(Vec::new());
    }
    s.clone_dtoh(d).map_err(cu)
}

/// Checks made and failures seen on this rank.
#[derive(Default)]
struct Tally {
    checks: usize,
    fails: Vec<String>,
}

impl Tally {
    fn eq<T: PartialEq + Debug>(&mut self, what: impl FnOnce() -> String, got: &[T], want: &[T]) {
        self.checks += 1;
        if got.len() != want.len() {
            self.fails.push(format!(
                "{}: length {} vs {}",
                what(),
                got.len(),
                want.len()
            ));
        } else if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            self.fails.push(format!(
                "{}: element {i} of {}: got {:?}, want {:?}",
                what(),
                got.len(),
                got[i],
                want[i]
            ));
        }
    }
    fn ok(&mut self, what: &str, cond: bool, detail: impl FnOnce() -> String) {
        self.checks += 1;
        if !cond {
            self.fails.push(format!("{what}: {}", detail()));
        }
    }
}

/// Every collective (blocking and non-blocking) on device buffers, for dtype T and length n.
fn device_suite<T: DevElem>(
    c: &dyn Communicator,
    s: &Arc<CudaStream>,
    n: usize,
    t: &mut Tally,
) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let tag = |what: &str, op: ReduceOp| format!("{what} {} {op:?} n={n} rank={r}/{w}", T::DTYPE);
    for op in ReduceOp::ALL {
        let want: Vec<T> = reduced_vec(w, n, op);
        let mut d = up(s, &input::<T>(r, n, op))?;
        c.all_reduce(&mut d, op)?;
        t.eq(|| tag("all_reduce", op), &down(s, &d)?, &want);
        let inp = up(s, &input::<T>(r, n, op))?;
        let mut out = zeros::<T>(s, n)?;
        c.all_reduce_into(&inp, &mut out, op)?;
        t.eq(|| tag("all_reduce_into", op), &down(s, &out)?, &want);
        t.eq(
            || tag("all_reduce_into left send alone", op),
            &down(s, &inp)?,
            &input::<T>(r, n, op),
        );
        // two non-blocking in flight at once
        let w1 = c.iall_reduce(up(s, &input::<T>(r, n, op))?, op)?;
        let w2 = c.iall_reduce_into(up(s, &input::<T>(r, n, op))?, zeros::<T>(s, n)?, op)?;
        t.eq(|| tag("iall_reduce", op), &down(s, &w1.wait()?)?, &want);
        t.eq(
            || tag("iall_reduce_into", op),
            &down(s, &w2.wait()?.1)?,
            &want,
        );
        let full: Vec<T> = reduced_vec(w, w * n, op);
        let mut rs = zeros::<T>(s, n)?;
        c.reduce_scatter(&up(s, &input::<T>(r, w * n, op))?, &mut rs, op)?;
        t.eq(
            || tag("reduce_scatter", op),
            &down(s, &rs)?,
            &full[r * n..(r + 1) * n],
        );
        let (_, rs2) = c
            .ireduce_scatter(up(s, &input::<T>(r, w * n, op))?, zeros::<T>(s, n)?, op)?
            .wait()?;
        t.eq(
            || tag("ireduce_scatter", op),
            &down(s, &rs2)?,
            &full[r * n..(r + 1) * n],
        );
        let root = (w - 1).min(1);
        let mut red = zeros::<T>(s, n)?;
        c.reduce(
            &up(s, &input::<T>(r, n, op))?,
            (r == root).then_some(&mut red),
            op,
            root,
        )?;
        if r == root {
            t.eq(|| tag("reduce", op), &down(s, &red)?, &want);
        }
        let recv = if r == 0 {
            Some(zeros::<T>(s, n)?)
        } else {
            None
        };
        let (_, red2) = c
            .ireduce(up(s, &input::<T>(r, n, op))?, recv, op, 0)?
            .wait()?;
        if let Some(red2) = red2 {
            t.eq(|| tag("ireduce", op), &down(s, &red2)?, &want);
        }
    }
    let op = ReduceOp::Sum;
    let gathered: Vec<T> = (0..w).flat_map(|q| input::<T>(q, n, op)).collect();
    let mut ag = zeros::<T>(s, w * n)?;
    c.all_gather(&up(s, &input::<T>(r, n, op))?, &mut ag)?;
    t.eq(|| tag("all_gather", op), &down(s, &ag)?, &gathered);
    let (_, ag2) = c
        .iall_gather(up(s, &input::<T>(r, n, op))?, zeros::<T>(s, w * n)?)?
        .wait()?;
    t.eq(|| tag("iall_gather", op), &down(s, &ag2)?, &gathered);
    for root in [0, w - 1] {
        let mine = if r == root {
            input::<T>(root, n, op)
        } else {
            vec![T::default(); n]
        };
        let mut b = up(s, &mine)?;
        c.broadcast(&mut b, root)?;
        t.eq(
            || tag(&format!("broadcast root {root}"), op),
            &down(s, &b)?,
            &input::<T>(root, n, op),
        );
        let b2 = c.ibroadcast(up(s, &mine)?, root)?.wait()?;
        t.eq(
            || tag(&format!("ibroadcast root {root}"), op),
            &down(s, &b2)?,
            &input::<T>(root, n, op),
        );
    }
    let a2a_want: Vec<T> = (0..w)
        .flat_map(|q| input::<T>(q, w * n, op)[r * n..(r + 1) * n].to_vec())
        .collect();
    let mut a2a = zeros::<T>(s, w * n)?;
    c.all_to_all(&up(s, &input::<T>(r, w * n, op))?, &mut a2a)?;
    t.eq(|| tag("all_to_all", op), &down(s, &a2a)?, &a2a_want);
    let (_, a2a2) = c
        .iall_to_all(up(s, &input::<T>(r, w * n, op))?, zeros::<T>(s, w * n)?)?
        .wait()?;
    t.eq(|| tag("iall_to_all", op), &down(s, &a2a2)?, &a2a_want);
    // send/recv around the ring, both directions, blocking and non-blocking
    if w > 1 {
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let pending = c.irecv(zeros::<T>(s, n)?, prev, 3)?;
        c.send(&up(s, &input::<T>(r, n, op))?, next, 3)?;
        t.eq(
            || tag("send/irecv ring", op),
            &down(s, &pending.wait()?)?,
            &input::<T>(prev, n, op),
        );
        let sending = c.isend(up(s, &input::<T>(r, n, op))?, prev, 4)?;
        let mut got = zeros::<T>(s, n)?;
        c.recv(&mut got, next, 4)?;
        sending.wait()?;
        t.eq(
            || tag("isend/recv ring (reverse)", op),
            &down(s, &got)?,
            &input::<T>(next, n, op),
        );
    }
    c.barrier()?;
    c.ibarrier()?.wait()?;
    Ok(())
}

/// all_to_allv with uneven blocks (zeros included): rank `from` sends `cnt(from, to)` elements to
/// `to`, with values that name both ranks and the position.
fn all_to_allv_uneven(c: &dyn Communicator, s: &Arc<CudaStream>, t: &mut Tally) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let cnt = |from: usize, to: usize| (from * 2 + to * 3 + 1) % 5 * 37;
    let val = |from: usize, to: usize, i: usize| (from * 1_000_000 + to * 10_000 + i) as f32;
    let sc: Vec<usize> = (0..w).map(|j| cnt(r, j)).collect();
    let rc: Vec<usize> = (0..w).map(|j| cnt(j, r)).collect();
    let send: Vec<f32> = (0..w)
        .flat_map(|j| (0..cnt(r, j)).map(move |i| val(r, j, i)))
        .collect();
    let want: Vec<f32> = (0..w)
        .flat_map(|j| (0..cnt(j, r)).map(move |i| val(j, r, i)))
        .collect();
    let mut out = zeros::<f32>(s, want.len())?;
    c.all_to_allv(&up(s, &send)?, &sc, &mut out, &rc)?;
    t.eq(
        || format!("all_to_allv uneven rank={r}/{w}"),
        &down(s, &out)?,
        &want,
    );
    let (_, out2) = c
        .iall_to_allv(up(s, &send)?, sc, zeros::<f32>(s, want.len())?, rc)?
        .wait()?;
    t.eq(
        || format!("iall_to_allv uneven rank={r}/{w}"),
        &down(s, &out2)?,
        &want,
    );
    Ok(())
}

/// split into even and odd ranks (key = rank), and the reversed order (key = -rank).
fn split_even_odd(c: &dyn Communicator, s: &Arc<CudaStream>, t: &mut Tally) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    for (key, reversed) in [(r as i32, false), (-(r as i32), true)] {
        let Some(sub) = c.split(Some((r % 2) as u32), key)? else {
            t.ok("split", false, || format!("rank {r}: no communicator"));
            continue;
        };
        let members: Vec<usize> = (0..w).filter(|q| q % 2 == r % 2).collect();
        let pos = members.iter().position(|&q| q == r).unwrap_or(0);
        let want_rank = if reversed {
            members.len() - 1 - pos
        } else {
            pos
        };
        t.ok(
            "split rank/size",
            sub.world_size() == members.len() && sub.rank() == want_rank,
            || {
                format!(
                    "rank {r} (key {key}): got {}/{}, want {want_rank}/{}",
                    sub.rank(),
                    sub.world_size(),
                    members.len()
                )
            },
        );
        let mut v = up(s, &[r as f32 + 1.0, 1.0])?;
        sub.all_reduce(&mut v, ReduceOp::Sum)?;
        let sum: f32 = members.iter().map(|&q| q as f32 + 1.0).sum();
        t.eq(
            || format!("split all_reduce rank={r} color={}", r % 2),
            &down(s, &v)?,
            &[sum, members.len() as f32],
        );
        let mut g = zeros::<i64>(s, members.len())?;
        sub.all_gather(&up(s, &[r as i64])?, &mut g)?;
        let mut want: Vec<i64> = members.iter().map(|&q| q as i64).collect();
        if reversed {
            want.reverse();
        }
        t.eq(
            || format!("split all_gather rank={r} key={key}"),
            &down(s, &g)?,
            &want,
        );
        sub.barrier()?;
    }
    Ok(())
}

/// A second communicator (id broadcast over `c`) with the given config.
fn second_comm(
    c: &dyn Communicator,
    s: &Arc<CudaStream>,
    ordinal: usize,
    cfg: Config,
) -> Result<ferroccl::nccl::NcclComm> {
    let (r, w) = (c.rank(), c.world_size());
    let id = if r == 0 {
        ferroccl::nccl::unique_id()?
    } else {
        [0u8; 128]
    };
    let mut d = up(s, &id)?;
    c.broadcast(&mut d, 0)?;
    let id: [u8; 128] = down(s, &d)?
        .try_into()
        .map_err(|_| Error::InvalidArgument("id length".into()))?;
    ferroccl::nccl::NcclComm::new(r, w, id, ordinal, cfg)
}

/// Stream-ordered mode: 20 in-place all-reduces enqueued back to back without waiting, then a
/// send/recv ring, then `synchronize`; the results are what blocking calls give.
fn stream_ordered(
    c: &dyn Communicator,
    s: &Arc<CudaStream>,
    ordinal: usize,
    t: &mut Tally,
) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let so = second_comm(c, s, ordinal, Config::from_env()?.with_stream_ordered(true))?;
    // sum of (q + 1) over ranks, then times w per further all-reduce: exact in f64
    let k = 20;
    let mut v = up(s, &[r as f64 + 1.0, 1.0])?;
    for _ in 0..k {
        so.all_reduce(&mut v, ReduceOp::Sum)?;
    }
    let first = (w * (w + 1) / 2) as f64;
    let scale = (w as f64).powi(k - 1);
    let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
    let mut got = zeros::<f64>(s, 3)?;
    let pending = so.irecv(zeros::<f64>(s, 3)?, prev, 0)?;
    so.send(&up(s, &[r as f64, 7.0, -1.0])?, next, 0)?;
    let sending = so.isend(up(s, &[r as f64, 8.0, -2.0])?, prev, 0)?;
    so.recv(&mut got, next, 0)?;
    so.synchronize()?;
    sending.wait()?;
    t.eq(
        || format!("stream-ordered all_reduce x{k} rank={r}/{w}"),
        &down(s, &v)?,
        &[first * scale, (w as f64).powi(k)],
    );
    t.eq(
        || format!("stream-ordered irecv/send ring rank={r}/{w}"),
        &down(s, &pending.wait()?)?,
        &[prev as f64, 7.0, -1.0],
    );
    t.eq(
        || format!("stream-ordered isend/recv ring rank={r}/{w}"),
        &down(s, &got)?,
        &[next as f64, 8.0, -2.0],
    );
    Ok(())
}

/// Checked mode on a second communicator (its NCCL id broadcast over the first): mismatched counts
/// are an error naming both calls on every rank, and nothing was sent, so the next call works.
fn checked_mode_mismatch(
    c: &dyn Communicator,
    s: &Arc<CudaStream>,
    ordinal: usize,
    t: &mut Tally,
) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let checked = second_comm(c, s, ordinal, Config::from_env()?.with_check(true))?;
    let n = if r == 1 { 5 } else { 4 };
    let mut v = up(s, &vec![1f32; n])?;
    match checked.all_reduce(&mut v, ReduceOp::Sum) {
        Err(Error::CollectiveMismatch { .. }) if w == 1 => {
            t.ok("checked mode", false, || "mismatch with world 1".into())
        }
        Err(e @ Error::CollectiveMismatch { .. }) => {
            let m = e.to_string();
            let names_both = if r == 1 {
                m.contains("x 5") && m.contains("x 4")
            } else {
                m.contains("all_reduce(float x 4, sum)") && m.contains("all_reduce(float x 5, sum)")
            };
            t.ok("checked mode names both calls", names_both, || m.clone());
        }
        Ok(()) if w == 1 => t.ok("checked mode (world 1)", true, String::new),
        other => t.ok("checked mode mismatch", false, || {
            format!("rank {r}: expected CollectiveMismatch, got {other:?}")
        }),
    }
    let mut ok = up(s, &[1f32, 2.0])?;
    match checked.all_reduce(&mut ok, ReduceOp::Sum) {
        Ok(()) => t.eq(
            || format!("checked mode: the call after a mismatch rank={r}"),
            &down(s, &ok)?,
            &[w as f32, 2.0 * w as f32],
        ),
        Err(e) => t.ok("checked mode: the call after a mismatch", false, || {
            e.to_string()
        }),
    }
    Ok(())
}

fn local_rank() -> usize {
    ferroccl::rendezvous::EnvRendezvous::from_env()
        .ok()
        .flatten()
        .map(|e| e.local_rank)
        .or_else(|| {
            [
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "SLURM_LOCALID",
            ]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
        })
        .unwrap_or(0)
}

fn launcher() -> &'static str {
    if std::env::var_os("RANK").is_some() {
        "env"
    } else if std::env::var_os("OMPI_COMM_WORLD_RANK").is_some()
        || std::env::var_os("PMI_RANK").is_some()
    {
        "mpirun"
    } else {
        "none"
    }
}

#[test]
#[ignore = "needs several GPUs"]
fn one_process_per_gpu_every_collective_on_device_buffers() {
    let t0 = Instant::now();
    let c = ferroccl::init().expect("ferroccl::init()");
    let (r, w) = (c.rank(), c.world_size());
    assert_eq!(
        c.backend(),
        "nccl",
        "init() under launcher `{}` gave {} with world {w}: launch one process per GPU with mpirun or \
         torchrun-style variables, on a build with --features cuda (under mpirun without the `mpi` \
         feature init() must read OMPI_COMM_WORLD_* through EnvRendezvous)",
        launcher(),
        c.backend()
    );
    assert!(w > 1, "world size {w}: this suite wants several processes");
    let ordinal = local_rank();
    let ctx = CudaContext::new(ordinal).expect("CUDA context");
    let s = ctx.new_stream().expect("stream");
    let mut t = Tally::default();
    let run = |t: &mut Tally| -> Result<()> {
        for n in [0usize, 1, 13, 1031, 300_007] {
            device_suite::<f32>(&*c, &s, n, t)?;
            device_suite::<half::bf16>(&*c, &s, n, t)?;
            device_suite::<half::f16>(&*c, &s, n, t)?;
            device_suite::<f64>(&*c, &s, n, t)?;
            device_suite::<i32>(&*c, &s, n, t)?;
            device_suite::<i64>(&*c, &s, n, t)?;
            device_suite::<u8>(&*c, &s, n, t)?;
        }
        // one large buffer through the main paths (16 M floats, 64 MiB)
        device_suite::<f32>(&*c, &s, 16 << 20, t)?;
        all_to_allv_uneven(&*c, &s, t)?;
        split_even_odd(&*c, &s, t)?;
        checked_mode_mismatch(&*c, &s, ordinal, t)?;
        stream_ordered(&*c, &s, ordinal, t)?;
        Ok(())
    };
    let res = run(&mut t);
    // every rank learns the total number of failures (if the communicator still works)
    let total = res.as_ref().ok().and_then(|_| {
        let mut f = up(&s, &[t.fails.len() as f64]).ok()?;
        c.all_reduce(&mut f, ReduceOp::Sum).ok()?;
        down(&s, &f).ok()?.first().copied()
    });
    println!(
        "nccl_multi: rank {r}/{w} launcher {} GPU {ordinal} ({}): {} checks, {} failed on this rank, {} on all ranks, {}, {:.1} s",
        launcher(),
        ctx.name().unwrap_or_default(),
        t.checks,
        t.fails.len(),
        total.map_or_else(|| "?".to_string(), |x| format!("{x}")),
        match &res {
            Ok(()) => "no errors".to_string(),
            Err(e) => format!("error: {e}"),
        },
        t0.elapsed().as_secs_f64()
    );
    for f in t.fails.iter().take(20) {
        println!("nccl_multi: rank {r}: FAIL {f}");
    }
    drop(c);
    res.expect("a collective returned an error");
    assert!(
        t.fails.is_empty(),
        "{} checks failed on rank {r}",
        t.fails.len()
    );
    assert_eq!(total, Some(0.0), "checks failed on other ranks");
}
