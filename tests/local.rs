//! The in-process backend against naive references, plus its failure semantics.
mod common;

use ferroccl::local::{self, Options};
use ferroccl::prelude::*;
use ferroccl::Config;
use std::time::{Duration, Instant};

#[test]
fn every_collective_every_dtype_world_1_to_8() {
    for world in 1..=8 {
        let checks = local::run(world, |c| {
            let mut k = 0;
            for n in [0usize, 1, 2, 13, 1031] {
                k += common::suite::all_dtypes(c, n)?;
            }
            Ok(k)
        })
        .unwrap_or_else(|e| panic!("world {world}: {e}"));
        assert!(checks.iter().all(|&k| k > 500), "{checks:?}");
    }
}

#[test]
fn large_messages_take_the_two_shot_and_ring_paths() {
    // 300k f32 = 1.2 MB per rank: two-shot all-reduce over read-write loans (world 7 writes 8.4 MB in
    // total, past the non-temporal-store threshold), ring reduce-scatter / all-gather with loans; and
    // the copy-only transport, where all_reduce takes the ring.
    for copy_only in [false, true] {
        let opts = Options {
            copy_only,
            ..Options::default()
        };
        for world in [2usize, 3, 4, 7] {
            local::run_with(world, &opts, |c| {
                common::suite::collectives_t::<f32>(
                    c,
                    300_007,
                    &[ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg],
                )?;
                common::suite::collectives_t::<half::bf16>(c, 100_003, &[ReduceOp::Sum])
            })
            .unwrap_or_else(|e| panic!("world {world} copy_only {copy_only}: {e}"));
        }
    }
}

#[test]
fn results_are_bit_identical_across_ranks_for_random_floats() {
    use rand::{Rng, SeedableRng};
    for n in [1000usize, 100_000] {
        let out = local::run(5, |c| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c.rank() as u64);
            let mut v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            c.all_reduce(&mut v, ReduceOp::Sum)?;
            Ok(v)
        })
        .unwrap();
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for v in &out[1..] {
            assert_eq!(bits(v), bits(&out[0]));
        }
        // and close to an f64 reference
        let mut want = vec![0f64; n];
        for r in 0..5 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(r as u64);
            for w in want.iter_mut() {
                *w += rng.gen_range(-1.0f32..1.0) as f64;
            }
        }
        for (g, w) in out[0].iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
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
                expected: 8,
                got: 12,
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
            matches!(e, Error::Timeout { .. } | Error::PeerLost { .. }),
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
