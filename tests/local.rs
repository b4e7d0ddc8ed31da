//! The in-process backend against naive references, plus its failure semantics.
mod common;

use ferroccl::local::{self, Options};
use ferroccl::prelude::*;
use ferroccl::Config;
use std::time::{Duration, Instant};

#[test]
fn every_collective_every_dtype_world_1_to_8() {
    for (name, opts) in transports() {
        for world in 1..=8 {
            let checks = local::run_with(world, &opts, |c| {
                let mut k = 0;
                for n in [0usize, 1, 2, 13, 1031] {
                    k += common::suite::all_dtypes(c, n)?;
                }
                Ok(k)
            })
            .unwrap_or_else(|e| panic!("{name}, world {world}: {e}"));
            assert!(checks.iter().all(|&k| k > 500), "{checks:?}");
        }
    }
}

/// Below this many bytes all_reduce takes recursive doubling, above the two-shot or the ring
/// (`SMALL_BYTES` in src/engine/algo.rs).
const SMALL_BYTES: usize = 64 << 10;
/// Outputs of at least this many bytes over all ranks are written with non-temporal stores by the
/// direct collectives (`STREAM_BYTES` in src/engine/direct.rs).
const STREAM_BYTES: usize = 8 << 20;

/// The transports of one process: direct collectives over loans (the default), the ring with copies
/// (`copy_only`), and the ring with loans (what a link model selects; virtual time, so nothing sleeps).
fn transports() -> [(&'static str, Options); 3] {
    use ferroccl::local::{Link, LinkModel, TimeMode};
    let link = LinkModel::uniform(
        TimeMode::Virtual,
        Link {
            bandwidth: 1e10,
            latency: Duration::from_micros(1),
        },
    );
    [
        ("direct", Options::default()),
        (
            "ring copies",
            Options {
                copy_only: true,
                ..Options::default()
            },
        ),
        (
            "ring loans",
            Options {
                link: Some(link),
                ..Options::default()
            },
        ),
    ]
}

/// Lengths (elements of `es` bytes) just past a threshold at `world`: `(all_reduce count,
/// reduce_scatter block, all_gather block)`. With `stream` false the all_reduce output is just past
/// [`SMALL_BYTES`] per rank; with `stream` true each collective's output over all ranks is just
/// past [`STREAM_BYTES`] (all_reduce: `world` outputs of the count, reduce_scatter: `world` blocks,
/// all_gather: `world²` blocks). The all_reduce count is `1 mod world`, so the two-shot and ring
/// chunks are ragged.
fn large_lengths(world: usize, es: usize, stream: bool) -> (usize, usize, usize) {
    if stream {
        let ar = world * STREAM_BYTES.div_ceil(world * world * es) + 1;
        let rs = STREAM_BYTES.div_ceil(world * es) + 1;
        let ag = STREAM_BYTES.div_ceil(world * world * es) + 1;
        (ar, rs, ag)
    } else {
        let b = SMALL_BYTES.div_ceil(world * es) + 1;
        (world * b + 1, b, b)
    }
}

/// Every op of all_reduce (in place, out of place, both non-blocking), reduce_scatter (blocking and
/// not; past 8 MiB one of the two per op) and all_gather (blocking and not) for dtype T at the
/// lengths of [`large_lengths`]; below 8 MiB reduce (every op) and broadcast too.
fn large_paths_t<T: common::TestElem>(world: usize, opts: &Options, stream: bool, what: &str) {
    use common::suite::eq;
    let es = std::mem::size_of::<T>();
    let (count, rs_block, ag_block) = large_lengths(world, es, stream);
    assert!(count * es >= SMALL_BYTES && count % world == 1);
    let streams = |bytes: usize| bytes >= STREAM_BYTES;
    assert_eq!(streams(count * es * world), stream);
    assert_eq!(streams(rs_block * es * world), stream);
    assert_eq!(streams(ag_block * es * world * world), stream);
    // one input per rank and kind of op (Sum, Min, Max and Avg share theirs), the all_reduce and
    // all_gather inputs being prefixes of the reduce_scatter input; references computed once here
    let len = count.max(world * rs_block).max(ag_block);
    let wants: Vec<Vec<T>> = ReduceOp::ALL
        .iter()
        .map(|&op| common::reduced_vec(world, count, op))
        .collect();
    let ag_want: Vec<T> = common::all_gather_want(world, ag_block, ReduceOp::Sum);
    local::run_with(world, opts, |c| {
        let r = c.rank();
        let sum_inp: Vec<T> = common::input(r, len, ReduceOp::Sum);
        let prod_inp: Vec<T> = common::input(r, len, ReduceOp::Prod);
        for (k, (op, want)) in ReduceOp::ALL.into_iter().zip(&wants).enumerate() {
            let tag = |s: &str| format!("{s} {} {} count={count}", T::DTYPE, op.name());
            let full = if op == ReduceOp::Prod {
                &prod_inp
            } else {
                &sum_inp
            };
            let inp = &full[..count];
            let mut v = inp.to_vec();
            c.all_reduce(&mut v, op)?;
            eq(&tag("all_reduce"), &v, want)?;
            let send = inp.to_vec();
            let mut out = vec![T::poison(); count];
            c.all_reduce_into(&send, &mut out, op)?;
            eq(&tag("all_reduce_into"), &out, want)?;
            eq(&tag("all_reduce_into left send alone"), &send, inp)?;
            let w1 = c.iall_reduce(inp.to_vec(), op)?;
            let w2 = c.iall_reduce_into(inp.to_vec(), vec![T::poison(); count], op)?;
            eq(&tag("iall_reduce"), &w1.wait()?, want)?;
            eq(&tag("iall_reduce_into"), &w2.wait()?.1, want)?;
            if !stream {
                // the binomial trees with large (lent) messages, to the last rank
                let root = world - 1;
                let mut out = vec![T::poison(); count];
                c.reduce(inp, (r == root).then_some(&mut out), op, root)?;
                let recv = (r == root).then(|| vec![T::poison(); count]);
                let (_, out2) = c.ireduce(inp.to_vec(), recv, op, root)?.wait()?;
                if r == root {
                    eq(&tag("reduce"), &out, want)?;
                    eq(&tag("ireduce"), &out2.unwrap_or_default(), want)?;
                }
            }
            let tag = |s: &str| format!("{s} {} {} block={rs_block}", T::DTYPE, op.name());
            let rs_want: Vec<T> = common::reduce_scatter_want(world, r, rs_block, op);
            let send = &full[..world * rs_block];
            // Past 8 MiB the reduce_scatter input is 8 MiB per rank, the largest cost of this test,
            // so there the blocking and non-blocking forms alternate by op; both reach the same engine
            // code, and both forms of every op run just past 64 KiB.
            if !stream || k % 2 == 0 {
                let mut out = vec![T::poison(); rs_block];
                c.reduce_scatter(send, &mut out, op)?;
                eq(&tag("reduce_scatter"), &out, &rs_want)?;
            }
            if !stream || k % 2 == 1 {
                let (_, out) = c
                    .ireduce_scatter(send.to_vec(), vec![T::poison(); rs_block], op)?
                    .wait()?;
                eq(&tag("ireduce_scatter"), &out, &rs_want)?;
            }
        }
        if !stream {
            let root = 1 % world;
            let from_root = |x: &[T]| {
                if r == root {
                    x.to_vec()
                } else {
                    vec![T::poison(); count]
                }
            };
            let mut b = from_root(&sum_inp[..count]);
            c.broadcast(&mut b, root)?;
            let want: Vec<T> = common::input(root, count, ReduceOp::Sum);
            eq(&format!("broadcast {} count={count}", T::DTYPE), &b, &want)?;
            let b = c.ibroadcast(from_root(&sum_inp[..count]), root)?.wait()?;
            eq(&format!("ibroadcast {} count={count}", T::DTYPE), &b, &want)?;
        }
        let mine = &sum_inp[..ag_block];
        let tag = |s: &str| format!("{s} {} block={ag_block}", T::DTYPE);
        let mut out = vec![T::poison(); world * ag_block];
        c.all_gather(mine, &mut out)?;
        eq(&tag("all_gather"), &out, &ag_want)?;
        let (_, out) = c
            .iall_gather(mine.to_vec(), vec![T::poison(); world * ag_block])?
            .wait()?;
        eq(&tag("iall_gather"), &out, &ag_want)
    })
    .unwrap_or_else(|e| panic!("{what}, world {world}: {e}"));
}

/// [`large_paths_t`] for every dtype.
fn large_paths(world: usize, opts: &Options, stream: bool, what: &str) {
    large_paths_t::<f32>(world, opts, stream, what);
    large_paths_t::<f64>(world, opts, stream, what);
    large_paths_t::<half::f16>(world, opts, stream, what);
    large_paths_t::<half::bf16>(world, opts, stream, what);
    large_paths_t::<i32>(world, opts, stream, what);
    large_paths_t::<i64>(world, opts, stream, what);
    large_paths_t::<u8>(world, opts, stream, what);
}

#[test]
fn large_messages_take_the_two_shot_and_ring_paths_every_dtype_and_op() {
    // Just past 64 KiB: the two-shot all-reduce and direct reduce_scatter / all_gather over loans,
    // and the ring (with copies, and with loans under a link model), all with ragged chunks.
    for (name, opts) in transports() {
        for world in 2..=8 {
            large_paths(world, &opts, false, name);
        }
    }
}

#[test]
fn large_messages_stream_past_8_mib_every_dtype_and_op() {
    // Outputs of 8 MiB over all ranks: the direct collectives write with non-temporal stores.
    for world in [2, 3, 4, 5, 7, 8] {
        large_paths(world, &Options::default(), true, "direct, streaming");
    }
}

#[test]
fn results_are_bit_identical_across_ranks_for_random_floats() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (name, opts) in transports() {
        for world in 2..=8 {
            // recursive doubling, two-shot / ring, and (direct) streaming stores
            let mut lengths = vec![1000, SMALL_BYTES / 4 + world + 1];
            if name == "direct" {
                lengths.push(STREAM_BYTES / (4 * world) + 3);
            }
            for n in lengths {
                let out = local::run_with(world, &opts, |c| {
                    let x = common::random_f32(c.rank() as u64, n);
                    let mut v = x.clone();
                    c.all_reduce(&mut v, ReduceOp::Sum)?;
                    let mut o = vec![0f32; n];
                    c.all_reduce_into(&x, &mut o, ReduceOp::Sum)?;
                    let w = c.iall_reduce(x, ReduceOp::Sum)?.wait()?;
                    Ok([v, o, w])
                })
                .unwrap();
                let first = bits(&out[0][0]);
                for (r, variants) in out.iter().enumerate() {
                    for (k, v) in variants.iter().enumerate() {
                        assert!(
                            bits(v) == first,
                            "{name} world {world} n {n}: rank {r} variant {k} differs from rank 0"
                        );
                    }
                }
                // and within rounding of the exact sum: (n−1)·u·Σ|x| for any order (u = 2^-24)
                let inputs: Vec<Vec<f32>> = (0..world)
                    .map(|r| common::random_f32(r as u64, n))
                    .collect();
                let mut inexact = 0;
                for (i, g) in out[0][0].iter().enumerate() {
                    let want: f64 = inputs.iter().map(|x| x[i] as f64).sum();
                    let mag: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
                    let tol = world as f64 * f32::EPSILON as f64 / 2.0 * mag;
                    assert!(
                        (*g as f64 - want).abs() <= tol,
                        "{name} world {world}: {g} vs {want}"
                    );
                    inexact += usize::from(*g as f64 != want);
                }
                // the data is not secretly exact
                assert!(
                    inexact > n / 10,
                    "{name} world {world} n {n}: {inexact} inexact sums"
                );
            }
        }
    }
}

#[test]
fn split_even_odd_with_reversed_keys() {
    let out = local::run(6, |c| {
        let sub = c
            .split(Some((c.rank() % 2) as u32), -(c.rank() as i32))?
            .expect("member");
        let mut v = vec![c.rank() as i64];
        sub.all_reduce(&mut v, ReduceOp::Sum)?;
        let none = c.split(None, 0)?;
        Ok((sub.rank(), sub.world_size(), v[0], none.is_none()))
    })
    .unwrap();
    // evens 0,2,4 reversed by key: rank 4 -> 0, 2 -> 1, 0 -> 2
    assert_eq!(out[4], (0, 3, 6, true));
    assert_eq!(out[0], (2, 3, 6, true));
    assert_eq!(out[1], (2, 3, 9, true));
    assert_eq!(out[5], (0, 3, 9, true));
}

#[test]
fn bad_arguments_are_named_errors() {
    local::run(3, |c| {
        let mut out = vec![0f32; 4];
        let e = c
            .reduce_scatter(&vec![0f32; 11], &mut out, ReduceOp::Sum)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::LengthMismatch {
                    expected: 12,
                    got: 11,
                    ..
                }
            ),
            "{e}"
        );
        let e = c.broadcast(&mut out, 3).unwrap_err();
        assert!(
            matches!(
                e,
                Error::RankOutOfRange {
                    rank: 3,
                    world: 3,
                    ..
                }
            ),
            "{e}"
        );
        let e = c.send(&out, 9, 0).unwrap_err();
        assert!(matches!(e, Error::RankOutOfRange { .. }), "{e}");
        let e = c
            .all_reduce_into(&vec![0f32; 4], &mut vec![0f64; 4], ReduceOp::Sum)
            .unwrap_err();
        assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
        let e = c.all_to_all(&vec![0u8; 4], &mut vec![0u8; 4]).unwrap_err();
        assert!(e.to_string().contains("all_to_allv"), "{e}");
        // the communicator still works after rejected calls
        let mut v = vec![1u8];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        assert_eq!(v, [3]);
        Ok(())
    })
    .unwrap();
}

#[test]
fn recv_length_mismatch_is_an_error() {
    let out = local::run(2, |c| {
        if c.rank() == 0 {
            c.send(&[1f32, 2.0, 3.0], 1, 5)?;
            Ok(None)
        } else {
            let mut b = [0f32; 2];
            Ok(Some(c.recv(&mut b, 0, 5).unwrap_err()))
        }
    })
    .unwrap();
    assert!(
        matches!(
            out[1],
            Some(Error::LengthMismatch {
                expected: 2,
                got: 3,
                ..
            })
        ),
        "{:?}",
        out[1]
    );
}

#[test]
fn checked_mode_names_both_calls() {
    let opts = Options {
        config: Some(
            Config::default()
                .with_check(true)
                .with_timeout(Duration::from_secs(10)),
        ),
        ..Options::default()
    };
    let out = local::run_with(3, &opts, |c| {
        let n = if c.rank() == 1 { 5 } else { 4 };
        let mut v = vec![1f32; n];
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        // nothing was sent with mismatched arguments: the communicator still works
        let mut w = vec![1f32; 2];
        c.all_reduce(&mut w, ReduceOp::Sum)?;
        assert_eq!(w, [3.0, 3.0]);
        Ok(e.to_string())
    })
    .unwrap();
    assert!(
        out[0].contains("all_reduce(float x 4, sum)")
            && out[0].contains("all_reduce(float x 5, sum)"),
        "{}",
        out[0]
    );
    assert!(out[1].contains("rank 0"), "{}", out[1]);
}

#[test]
fn a_panicking_rank_gives_peer_lost_not_a_hang() {
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        ..Options::default()
    };
    let t0 = Instant::now();
    let errors = std::sync::Mutex::new(Vec::new());
    let r = local::run_with(4, &opts, |c| {
        let mut v = vec![1f32; 100_000];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        if c.rank() == 2 {
            panic!("rank 2 dies mid-training");
        }
        // ranks 0, 1, 3 go on: their next collective must fail with PeerLost
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        let later = c.barrier().unwrap_err();
        errors
            .lock()
            .unwrap()
            .push((c.rank(), e.to_string(), later.to_string()));
        assert!(matches!(e, Error::PeerLost { .. }), "{e}");
        assert!(matches!(later, Error::PeerLost { .. }), "{later}");
        Ok(())
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("rank 2 panicked"), "{e}");
    assert_eq!(
        errors.lock().unwrap().len(),
        3,
        "{:?}",
        errors.lock().unwrap()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_rank_that_drops_its_communicator_is_lost_for_the_others() {
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        ..Options::default()
    };
    let mut comms = local::world(3, &opts).unwrap();
    let c2 = comms.pop().unwrap();
    drop(c2);
    let t0 = Instant::now();
    let errs: Vec<Error> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mut v = vec![1f64; 10];
                    c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errs {
        assert!(matches!(e, Error::PeerLost { .. }), "{e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_silent_peer_times_out() {
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_millis(300))),
        ..Options::default()
    };
    let out = local::run_with(2, &opts, |c| {
        if c.rank() == 0 {
            let mut v = [0u8; 3];
            Ok(Some(c.recv(&mut v, 1, 1).unwrap_err()))
        } else {
            std::thread::sleep(Duration::from_millis(600));
            Ok(None)
        }
    })
    .unwrap();
    assert!(
        matches!(
            out[0],
            Some(Error::Timeout {
                waiting_for: Some(1),
                ..
            })
        ),
        "{:?}",
        out[0]
    );
}

#[test]
fn a_silent_peer_times_out_in_a_two_shot_all_reduce_and_the_buffer_is_left_alone() {
    // 3 ranks, 1 MB each: the two-shot path lends read-write views of every buffer; rank 2 never
    // joins, so ranks 0 and 1 time out, revoke their loans and keep their inputs.
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_millis(300))),
        ..Options::default()
    };
    let t0 = Instant::now();
    let out = local::run_with(3, &opts, |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(900));
            return Ok(None);
        }
        let mut v: Vec<f32> = (0..250_000).map(|i| (i % 97) as f32).collect();
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        Ok(Some((e, v)))
    })
    .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    for (r, o) in out.iter().take(2).enumerate() {
        let (e, v) = o.as_ref().expect("ranks 0 and 1 report");
        assert!(
            matches!(
                e,
                Error::Timeout { .. } | Error::Hang { .. } | Error::PeerLost { .. }
            ),
            "rank {r}: {e}"
        );
        // A rank reduces only once it holds every peer's loan, so nothing was written.
        assert!(
            v.iter().enumerate().all(|(i, &x)| x == (i % 97) as f32),
            "rank {r}: the buffer changed"
        );
    }
}

#[test]
fn link_model_charges_alpha_beta_in_virtual_time() {
    use ferroccl::local::{Link, LinkModel, TimeMode};
    // 4 ranks, 1 GB/s, 10 us; ring all-reduce of 4 MB: 2(N-1)(a + S/(N b)) = 6 * (10us + 1ms) = 6.06 ms
    let model = LinkModel::uniform(
        TimeMode::Virtual,
        Link {
            bandwidth: 1e9,
            latency: Duration::from_micros(10),
        },
    )
    .with_slowdown(3, 2.0);
    let opts = Options {
        link: Some(model),
        ..Options::default()
    };
    let out = local::run_with(4, &opts, |c| {
        let mut v = vec![1f32; 1_000_000];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        let t_comm = c.virtual_time().unwrap();
        c.compute(Duration::from_millis(5))?;
        Ok((t_comm, c.virtual_time().unwrap() - t_comm, c.bytes_sent()))
    })
    .unwrap();
    for (r, (t, comp, bytes)) in out.iter().enumerate() {
        assert!((t.as_secs_f64() - 6.06e-3).abs() < 1e-6, "rank {r}: {t:?}");
        let want = if r == 3 { 10 } else { 5 };
        assert_eq!(*comp, Duration::from_millis(want));
        assert_eq!(
            *bytes,
            6 * 1_000_000,
            "ring all-reduce sends 2(N-1)/N of the buffer"
        );
    }
}

/// The link-model hooks are a capability trait (`LinkClock`, in the prelude) that every
/// communicator has: on what `split` returns (`Box<dyn Communicator>`), through `&dyn` and `Arc`,
/// the charge is the rank's own (slowdown 3 on rank 1), the same as on the world communicator;
/// without a model `compute` is a no-op and `virtual_time` is `None`.
#[test]
fn link_clock_works_on_boxed_borrowed_and_shared_communicators() {
    use ferroccl::local::{Link, LinkModel, TimeMode};
    use std::sync::Arc;
    let model = LinkModel::uniform(TimeMode::Virtual, Link::gbit(10.0, Duration::ZERO))
        .with_slowdown(1, 3.0);
    let opts = Options {
        link: Some(model),
        ..Options::default()
    };
    let out = local::run_with(2, &opts, |c| {
        let t0 = c.virtual_time().unwrap();
        c.compute(Duration::from_millis(2))?;
        let world = c.virtual_time().unwrap() - t0;
        let sub: Box<dyn Communicator> = c.split(Some(0), 0)?.unwrap();
        let s0 = sub.virtual_time().unwrap();
        sub.compute(Duration::from_millis(2))?;
        let boxed = sub.virtual_time().unwrap() - s0;
        let dynref: &dyn Communicator = &*sub;
        let d0 = dynref.virtual_time().unwrap();
        dynref.compute(Duration::from_millis(2))?;
        let borrowed = dynref.virtual_time().unwrap() - d0;
        let shared = Arc::new(sub);
        let a0 = shared.virtual_time().unwrap();
        shared.compute(Duration::from_millis(2))?;
        let arc = shared.virtual_time().unwrap() - a0;
        Ok([world, boxed, borrowed, arc])
    })
    .unwrap();
    for (r, got) in out.iter().enumerate() {
        let want = Duration::from_millis(if r == 1 { 6 } else { 2 });
        assert_eq!(got, &[want; 4], "rank {r}");
    }
    // No link model: a no-op, and no clock.
    let out = local::run(2, |c| {
        let b: Box<dyn Communicator> = c.split(Some(0), 0)?.unwrap();
        b.compute(Duration::from_secs(3600))?;
        Ok((c.virtual_time(), b.virtual_time()))
    })
    .unwrap();
    assert!(out.iter().all(|t| *t == (None, None)), "{out:?}");
}

#[test]
fn point_to_point_between_live_ranks_survives_a_lost_rank() {
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        ..Options::default()
    };
    let seen = std::sync::Mutex::new(Vec::new());
    let out = local::run_with(3, &opts, |c| {
        if c.rank() == 2 {
            panic!("rank 2 dies");
        }
        std::thread::sleep(Duration::from_millis(100));
        // collectives fail: the group is broken
        let coll = c.barrier().unwrap_err();
        assert!(matches!(coll, Error::PeerLost { .. }), "{coll}");
        // but ranks 0 and 1 still talk
        let peer = 1 - c.rank();
        let w = c.irecv(vec![0i32; 2], peer, 9)?;
        c.send(&[c.rank() as i32, 7], peer, 9)?;
        let got = w.wait()?;
        // and a receive from the dead rank fails instead of hanging
        let dead = c.irecv(vec![0i32; 1], 2, 1)?.wait().unwrap_err();
        assert!(matches!(dead, Error::PeerLost { rank: 2, .. }), "{dead}");
        seen.lock().unwrap().push((c.rank(), got));
        Ok(())
    });
    assert!(out.unwrap_err().to_string().contains("rank 2 panicked"));
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    assert_eq!(seen, vec![(0, vec![1, 7]), (1, vec![0, 7])]);
}

#[test]
fn split_after_a_rank_opted_out_of_an_earlier_split() {
    // rank 0 opts out of the first split, then everyone joins the second: the groups must still meet
    let out = local::run(4, |c| {
        let first = c.split((c.rank() != 0).then_some(1), 0)?;
        let second = c.split(Some(0), c.rank() as i32)?.expect("member");
        let mut v = [1i32];
        second.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok((first.map(|f| f.world_size()), v[0]))
    })
    .unwrap();
    assert_eq!(
        out,
        vec![(None, 4), (Some(3), 4), (Some(3), 4), (Some(3), 4)]
    );
}

#[test]
fn is_done_and_wait_timeout_follow_a_peer_that_joins_late() {
    // Rank 1 joins the all-reduce only when rank 0 says so: until then rank 0's Work is pending.
    let (go_tx, go_rx) = crossbeam::channel::bounded::<()>(1);
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        ..Options::default()
    };
    let out = local::run_with(2, &opts, |c| {
        let x = vec![c.rank() as i64 + 1; 10];
        if c.rank() == 1 {
            go_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("rank 0 never said go");
            let w = c.iall_reduce_into(x, vec![0i64; 10], ReduceOp::Sum)?;
            return Ok(w.wait()?.1);
        }
        let mut w = c.iall_reduce_into(x, vec![0i64; 10], ReduceOp::Sum)?;
        assert!(!w.is_done(), "done before the peer joined: {w:?}");
        let t0 = Instant::now();
        assert!(
            !w.wait_timeout(Duration::from_millis(100)),
            "wait_timeout says done before the peer joined"
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        assert!(!w.is_done(), "{w:?}");
        go_tx.send(()).unwrap();
        assert!(
            w.wait_timeout(Duration::from_secs(20)),
            "not done after the peer joined"
        );
        // finished stays finished, and a zero wait does not block
        assert!(w.is_done() && w.wait_timeout(Duration::ZERO), "{w:?}");
        let (send, recv) = w.wait()?;
        assert_eq!(send, vec![1i64; 10], "the send buffer comes back untouched");
        Ok(recv)
    })
    .unwrap();
    assert_eq!(out, vec![vec![3i64; 10]; 2]);
}

#[test]
fn is_done_polls_to_completion_while_a_late_peer_joins() {
    let (go_tx, go_rx) = crossbeam::channel::bounded::<()>(1);
    let checked = std::sync::Barrier::new(2);
    let out = local::run(3, |c| {
        let x = vec![c.rank() as f32; 70_000]; // 280 KB: the two-shot path
        if c.rank() == 2 {
            go_rx.recv_timeout(Duration::from_secs(20)).expect("go");
            return c.iall_reduce(x, ReduceOp::Max)?.wait();
        }
        let mut w = c.iall_reduce(x, ReduceOp::Max)?;
        // a short wait times out and keeps the Work pending
        assert!(!w.wait_timeout(Duration::from_millis(50)), "{w:?}");
        assert!(!w.is_done(), "{w:?}");
        assert!(format!("{w:?}").contains("pending"), "{w:?}");
        // rank 2 joins once both waiting ranks have looked
        checked.wait();
        if c.rank() == 0 {
            go_tx.send(()).unwrap();
        }
        let t0 = Instant::now();
        while !w.is_done() {
            assert!(t0.elapsed() < Duration::from_secs(20), "never done: {w:?}");
            std::thread::yield_now();
        }
        assert!(format!("{w:?}").contains("done"), "{w:?}");
        w.wait()
    })
    .unwrap();
    assert!(out.iter().all(|v| v.iter().all(|&x| x == 2.0)));
}

#[test]
fn a_failed_work_is_done_and_wait_returns_the_error() {
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        ..Options::default()
    };
    let seen = std::sync::Mutex::new(Vec::new());
    let r = local::run_with(3, &opts, |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(50));
            panic!("rank 2 dies before joining");
        }
        let mut w = c.iall_reduce(vec![1u8; 1000], ReduceOp::Sum)?;
        let t0 = Instant::now();
        // finished, unsuccessfully: wait_timeout reports it well before the communicator's timeout
        assert!(w.wait_timeout(Duration::from_secs(15)), "{w:?}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(w.is_done(), "{w:?}");
        assert!(format!("{w:?}").contains("failed"), "{w:?}");
        let e = w.wait().unwrap_err();
        seen.lock().unwrap().push((c.rank(), e.to_string()));
        assert!(matches!(e, Error::PeerLost { .. }), "{e}");
        Ok(())
    });
    assert!(r.unwrap_err().to_string().contains("rank 2 panicked"));
    assert_eq!(seen.lock().unwrap().len(), 2, "{:?}", seen.lock().unwrap());
}

#[test]
fn a_timeout_of_duration_max_means_no_timeout() {
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::MAX)),
        ..Options::default()
    };
    let out = local::run_with(2, &opts, |c| {
        let mut v = vec![1f32; 10];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        let mut w = c.iall_reduce(v, ReduceOp::Sum)?;
        assert!(w.wait_timeout(Duration::MAX));
        w.wait()
    })
    .unwrap();
    assert_eq!(out, vec![vec![4f32; 10]; 2]);
}

#[test]
fn an_out_of_range_timeout_variable_is_a_config_error() {
    let r = std::panic::catch_unwind(|| {
        Config::from_lookup(|k| (k == "FERROCCL_TIMEOUT").then(|| "1e30".to_string()))
    });
    let r = r.expect("Config::from_lookup panicked");
    assert!(matches!(r, Err(Error::Config { .. })), "{r:?}");
}

#[test]
fn a_ready_work_is_done_at_once() {
    let mut w = Work::ready(Ok(vec![1u8, 2]), "test");
    assert!(w.is_done());
    assert!(w.wait_timeout(Duration::ZERO));
    assert_eq!(w.wait().unwrap(), [1, 2]);
}

/// The reference data is what lets the checks above see misplaced data. For worlds 1..=8, every
/// dtype and op: the expected reductions vary along the vector (no short period), the ranks' inputs
/// differ pairwise, and plausible bugs (blocks swapped, reversed, rotated, shifted by one element,
/// the wrong block taken) applied to the expected outputs are rejected by the checker the suite uses.
mod reference_data {
    use super::common::{self, suite::eq, TestElem};
    use ferroccl::ReduceOp;

    /// Plausible bugs on a buffer of `blocks` blocks of `n` elements, as (name, mutated copy); only
    /// mutations that move at least one element.
    fn mutations<T: Clone>(v: &[T], blocks: usize, n: usize) -> Vec<(String, Vec<T>)> {
        let block = |b: usize| v[b * n..(b + 1) * n].to_vec();
        let from_blocks = |order: &[usize]| order.iter().flat_map(|&b| block(b)).collect();
        let mut out: Vec<(String, Vec<T>)> = Vec::new();
        for p in 0..blocks {
            for q in p + 1..blocks {
                let mut order: Vec<usize> = (0..blocks).collect();
                order.swap(p, q);
                out.push((format!("blocks {p} and {q} swapped"), from_blocks(&order)));
            }
        }
        if blocks > 2 {
            let rev: Vec<usize> = (0..blocks).rev().collect();
            out.push(("blocks in reverse order".into(), from_blocks(&rev)));
            let rot: Vec<usize> = (0..blocks).map(|b| (b + 1) % blocks).collect();
            out.push(("every block from the next rank".into(), from_blocks(&rot)));
        }
        if v.len() > 1 {
            let mut left = v.to_vec();
            left.rotate_left(1);
            out.push(("shifted left by one element".into(), left));
            let mut right = v.to_vec();
            right.rotate_right(1);
            out.push(("shifted right by one element".into(), right));
        }
        if n > 1 {
            let inner = (0..blocks)
                .flat_map(|b| {
                    let mut x = block(b);
                    x.rotate_left(1);
                    x
                })
                .collect();
            out.push(("each block shifted by one element".into(), inner));
        }
        out
    }

    fn rejected<T: TestElem>(what: &str, want: &[T], blocks: usize, n: usize) {
        for (bug, got) in mutations(want, blocks, n) {
            assert!(
                eq(what, &got, want).is_err(),
                "{what}: the checker accepts the bug \"{bug}\""
            );
        }
    }

    /// Not constant, and no period up to 16.
    fn aperiodic<T: TestElem>(what: &str, v: &[T]) {
        for p in 1..=16.min(v.len() - 1) {
            assert!(
                (0..v.len() - p).any(|i| v[i] != v[i + p]),
                "{what}: period {p}"
            );
        }
    }

    fn properties<T: TestElem>() {
        let dt = T::DTYPE;
        for world in 1..=8 {
            for op in ReduceOp::ALL {
                let what = |s: &str| format!("{s} {dt} {} world {world}", op.name());
                // all_reduce (and reduce): one vector, seen as `world` chunks as the two-shot and
                // the ring split it; 16 elements a chunk, so distinct chunks are not an accident
                let n = 16;
                let ar: Vec<T> = common::reduced_vec(world, world * n, op);
                aperiodic(&what("all_reduce"), &ar);
                rejected(&what("all_reduce"), &ar, world, n);
                // reduce_scatter: rank r's block differs from every other rank's
                let rs: Vec<Vec<T>> = (0..world)
                    .map(|r| common::reduce_scatter_want(world, r, n, op))
                    .collect();
                for p in 0..world {
                    assert_eq!(
                        rs[p][..],
                        ar[p * n..(p + 1) * n],
                        "{}",
                        what("reduce_scatter")
                    );
                    for q in p + 1..world {
                        assert!(rs[p] != rs[q], "{}: ranks {p}, {q}", what("reduce_scatter"));
                    }
                }
                // inputs: pairwise different; for the data of all_gather and all_to_all (every op
                // but Prod) different at every index, so even one-element blocks of two ranks differ
                for p in 0..world {
                    for q in p + 1..world {
                        let (a, b): (Vec<T>, Vec<T>) =
                            (common::input(p, 64, op), common::input(q, 64, op));
                        if op == ReduceOp::Prod {
                            assert!(a != b, "{}: ranks {p} and {q}", what("input"));
                        } else {
                            assert!(
                                a.iter().zip(&b).all(|(x, y)| x != y),
                                "{}: ranks {p} and {q} agree somewhere",
                                what("input")
                            );
                        }
                    }
                }
            }
            // long references are tabulated: the same as the naive one, element by element
            for op in ReduceOp::ALL {
                let naive: Vec<T> = (0..5000).map(|i| common::reduced(world, i, op)).collect();
                let fast: Vec<T> = common::reduced_vec(world, 5000, op);
                assert!(
                    naive == fast,
                    "{dt} {} world {world}: tabulated reference",
                    op.name()
                );
            }
            let op = ReduceOp::Sum;
            for n in [1, 2, 7] {
                let what = |s: &str| format!("{s} {dt} world {world} n {n}");
                let ag: Vec<T> = common::all_gather_want(world, n, op);
                rejected(&what("all_gather"), &ag, world, n);
                let a2a: Vec<Vec<T>> = (0..world)
                    .map(|r| common::all_to_all_want(world, r, n, op))
                    .collect();
                for (r, want) in a2a.iter().enumerate() {
                    rejected(&what("all_to_all"), want, world, n);
                    // the wrong block taken from every rank
                    for (q, other) in a2a.iter().enumerate().filter(|&(q, _)| q != r) {
                        assert!(
                            eq(&what("all_to_all"), other, want).is_err(),
                            "{}: block {q} taken for block {r}",
                            what("all_to_all")
                        );
                    }
                }
                // broadcast: every root's buffer differs from every other's
                aperiodic(&what("input"), &common::input::<T>(0, 64, op));
            }
        }
    }

    #[test]
    fn reference_data_exposes_misplaced_data_every_dtype() {
        properties::<f32>();
        properties::<f64>();
        properties::<half::f16>();
        properties::<half::bf16>();
        properties::<i32>();
        properties::<i64>();
        properties::<u8>();
    }

    #[test]
    fn the_audited_periodic_data_would_have_hidden_these_bugs() {
        // The generator this file used before, as a control: the mutation checks above fail on it.
        let old = |r: usize, i: usize| ((r * 7 + i * 3) % 5) as f32 - 2.0;
        // world 5: Sum is 0 at every index, so chunks in the wrong place go unseen
        let sum5: Vec<f32> = (0..5 * 16)
            .map(|i| (0..5).map(|r| old(r, i)).sum())
            .collect();
        assert!(sum5.iter().all(|&x| x == 0.0));
        // world 6: ranks 0 and 5 hold the same input, so swapping their all_gather blocks passes
        let ag: Vec<f32> = (0..6)
            .flat_map(|r| (0..7).map(move |i| old(r, i)))
            .collect();
        let swapped = mutations(&ag, 6, 7)
            .into_iter()
            .find(|(bug, _)| bug == "blocks 0 and 5 swapped")
            .unwrap()
            .1;
        assert!(eq("old all_gather", &swapped, &ag).is_ok());
        // ...which the new data rejects (as `reference_data_exposes_misplaced_data_every_dtype` checks
        // for every pair, dtype and world)
        let ag: Vec<f32> = common::all_gather_want(6, 7, ReduceOp::Sum);
        let swapped = mutations(&ag, 6, 7)
            .into_iter()
            .find(|(bug, _)| bug == "blocks 0 and 5 swapped")
            .unwrap()
            .1;
        assert!(eq("all_gather", &swapped, &ag).is_err());
    }
}

#[test]
fn traffic_counters_match_a_hand_count_on_every_transport() {
    for (name, opts) in transports() {
        let checks = local::run_with(4, &opts, common::traffic::hand_count)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(checks.iter().all(|&k| k >= 7), "{name}: {checks:?}");
    }
}
