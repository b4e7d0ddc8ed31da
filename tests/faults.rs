//! Failure semantics of the engine and the in-process backend: one deadline per operation, cancelled
//! receives, `Work` timeouts, unchecked `exec` calls, link-model validation and saturation, and
//! panics on a rank's worker thread. Every expected value is computed here, independently of the
//! library.

use crossbeam::channel::unbounded;
use ferroccl::buffer::{Buf, BufMut, Buffer, BufferMut, Mem, MemMut, OwnedBuffer};
use ferroccl::local::{self, Link, LinkModel, Options, TimeMode};
use ferroccl::prelude::*;
use ferroccl::{Collective, Config};
use std::time::{Duration, Instant};

fn opts(timeout: Duration, link: Option<LinkModel>) -> Options {
    Options {
        config: Some(Config::default().with_timeout(timeout)),
        link,
        ..Options::default()
    }
}

/// A real-time model whose links cost `latency` each and (practically) nothing per byte.
fn real_latency(latency: Duration) -> LinkModel {
    LinkModel::uniform(
        TimeMode::Real,
        Link {
            bandwidth: 1e15,
            latency,
        },
    )
}

/// Rank r's input: small integers, so f32 sums are exact.
fn input(r: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((r * 31 + i) % 17) as f32).collect()
}

fn sum_reference(world: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (0..world).map(|r| ((r * 31 + i) % 17) as f64).sum::<f64>() as f32)
        .collect()
}

// ---- item 1: one deadline per collective -------------------------------------------------------

#[test]
fn a_ring_all_reduce_times_out_after_one_timeout_not_one_per_step() {
    // Real time, 0.3 s per message: the ring all-reduce of 4 ranks has 2(4-1) = 6 dependent steps,
    // about 1.8 s, and every single message comes well within the 0.5 s timeout. The collective as a
    // whole does not, so it must fail after about 0.5 s (a per-message deadline lets it run 1.8 s).
    let timeout = Duration::from_millis(500);
    let out = local::run_with(
        4,
        &opts(timeout, Some(real_latency(Duration::from_millis(300)))),
        |c| {
            let mut v = input(c.rank(), 100_000); // 400 kB: the ring (a link model is set)
            let t0 = Instant::now();
            let r = c.all_reduce(&mut v, ReduceOp::Sum);
            Ok((r, t0.elapsed()))
        },
    )
    .unwrap();
    for (rank, (r, took)) in out.iter().enumerate() {
        assert!(
            matches!(r, Err(Error::Hang { after, .. }) if *after == timeout),
            "rank {rank}: {r:?} after {took:?}"
        );
        assert!(*took < 2 * timeout, "rank {rank} took {took:?}");
        assert!(
            *took >= timeout - Duration::from_millis(50),
            "rank {rank}: {took:?}"
        );
    }
}

#[test]
fn a_real_time_ring_within_its_deadline_is_charged_and_correct() {
    // The same ring with 50 ms per message and a 5 s timeout: 6 steps take at least 0.3 s of real
    // time (the model is charged), and the result is the exact sum.
    let n = 100_000;
    let out = local::run_with(
        4,
        &opts(
            Duration::from_secs(5),
            Some(real_latency(Duration::from_millis(50))),
        ),
        |c| {
            let mut v = input(c.rank(), n);
            let t0 = Instant::now();
            c.all_reduce(&mut v, ReduceOp::Sum)?;
            Ok((v, t0.elapsed()))
        },
    )
    .unwrap();
    let want = sum_reference(4, n);
    for (rank, (v, took)) in out.iter().enumerate() {
        assert_eq!(v, &want, "rank {rank}");
        assert!(*took >= Duration::from_millis(290), "rank {rank}: {took:?}");
    }
}

// ---- items 2 and 3: cancelled receives, one timeout per wait -----------------------------------

#[test]
fn a_dropped_irecv_does_not_swallow_the_late_message() {
    let timeout = Duration::from_millis(400);
    let (go_tx, go_rx) = unbounded::<()>();
    let out = local::run_with(2, &opts(timeout, None), |c| {
        if c.rank() == 1 {
            go_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("rank 0 gives the go");
            c.send(&[1i32, 2, 3], 0, 5)?;
            c.send(&[4i32, 5, 6], 0, 5)?;
            return Ok(None);
        }
        // An irecv polled briefly, then abandoned (its drop waits at most the timeout).
        let mut w = c.irecv(vec![0i32; 3], 1, 5)?;
        assert!(!w.wait_timeout(Duration::from_millis(50)));
        drop(w);
        // An irecv whose wait times out: one timeout in all, wait and drop together.
        let t0 = Instant::now();
        let e = c.irecv(vec![0i32; 3], 1, 5)?.wait().unwrap_err();
        let waited = t0.elapsed();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(e.is_fatal());
        go_tx.send(()).unwrap();
        // Both messages reach the receives posted now, in order.
        let mut first = [0i32; 3];
        c.recv(&mut first, 1, 5)?;
        let second = c.irecv(vec![0i32; 3], 1, 5)?.wait()?;
        Ok(Some((first.to_vec(), second, waited)))
    })
    .unwrap();
    let (first, second, waited) = out[0].clone().unwrap();
    assert_eq!(first, vec![1, 2, 3]);
    assert_eq!(second, vec![4, 5, 6]);
    assert!(
        waited < timeout + timeout / 2,
        "wait + drop took {waited:?}"
    );
}

#[test]
fn work_wait_on_a_stuck_receive_takes_one_timeout() {
    let timeout = Duration::from_millis(500);
    let out = local::run_with(2, &opts(timeout, None), |c| {
        if c.rank() == 1 {
            std::thread::sleep(3 * timeout);
            return Ok(None);
        }
        let t0 = Instant::now();
        let r = c.irecv(vec![0u8; 4], 1, 3)?.wait();
        Ok(Some((r, t0.elapsed())))
    })
    .unwrap();
    let (r, took) = out[0].as_ref().unwrap();
    assert!(
        matches!(r, Err(Error::Timeout { after, .. }) if *after == timeout),
        "{r:?}"
    );
    assert!(
        *took >= timeout && *took < timeout + timeout / 2,
        "{took:?}"
    );
}

// ---- item 5: `exec` is public and unvalidated ------------------------------------------------

#[test]
fn unvalidated_exec_calls_are_errors_and_the_communicator_survives() {
    let world = 3;
    let out = local::run_with(world, &opts(Duration::from_secs(10), None), |c| {
        let mut errs = Vec::new();
        let data = [1f32, 2.0];
        let mut buf = [0f32; 2];
        errs.push(c.exec(Collective::Send {
            buf: data.buf(),
            peer: 9,
            tag: 0,
        }));
        errs.push(c.exec(Collective::Recv {
            buf: buf.buf_mut(),
            peer: 9,
            tag: 0,
        }));
        errs.push(c.exec(Collective::Broadcast {
            buf: buf.buf_mut(),
            root: 7,
        }));
        errs.push(c.exec(Collective::Reduce {
            send: data.buf(),
            recv: Some(buf.buf_mut()),
            op: ReduceOp::Sum,
            root: 4,
        }));
        // counts for 2 ranks in a world of 3
        errs.push(c.exec(Collective::AllToAllv {
            send: data.buf(),
            send_counts: vec![1, 1],
            recv: buf.buf_mut(),
            recv_counts: vec![1, 1],
        }));
        // counts that do not fill the buffers
        let mut six = [0f32; 6];
        errs.push(c.exec(Collective::AllToAllv {
            send: data.buf(),
            send_counts: vec![1, 1, 1],
            recv: six.buf_mut(),
            recv_counts: vec![2, 2, 2],
        }));
        // a view whose element count claims more than its bytes hold: 3 x 2 f32 for a 2-f32 buffer
        let mut small = [0u8; 8];
        errs.push(c.exec(Collective::AllGather {
            send: data.buf(),
            recv: BufMut {
                dtype: DType::F32,
                len: 2 * world,
                mem: MemMut::Host(&mut small),
            },
        }));
        errs.push(c.exec(Collective::ReduceScatter {
            send: Buf {
                dtype: DType::F32,
                len: 2 * world,
                mem: Mem::Host(bytemuck::cast_slice(&data)),
            },
            recv: buf.buf_mut(),
            op: ReduceOp::Sum,
        }));
        errs.push(c.exec(Collective::AllReduce {
            send: Some(Buf {
                dtype: DType::F32,
                len: 2,
                mem: Mem::Host(&[0u8; 4]),
            }),
            recv: buf.buf_mut(),
            op: ReduceOp::Sum,
        }));
        // the non-blocking hook too
        let r = c
            .exec_async(Collective::Recv {
                buf: Box::new(vec![0f32; 2]),
                peer: 11,
                tag: 0,
            })?
            .wait();
        errs.push(r.map(|_| ()));
        let r = c
            .exec_async(Collective::Send {
                buf: Box::new(vec![0f32; 2]),
                peer: 12,
                tag: 0,
            })?
            .wait();
        errs.push(r.map(|_| ()));
        // nothing panicked or broke: a collective still works
        let mut v = input(c.rank(), 1000);
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok((errs, v))
    })
    .unwrap();
    let want = sum_reference(world, 1000);
    for (rank, (errs, v)) in out.iter().enumerate() {
        assert_eq!(v, &want, "rank {rank}");
        let ranks = [9, 9, 7, 4];
        for (i, e) in errs.iter().enumerate() {
            match (i, e) {
                (
                    0..=3,
                    Err(Error::RankOutOfRange {
                        rank: bad,
                        world: w,
                        ..
                    }),
                ) => {
                    assert_eq!((*bad, *w), (ranks[i], world), "rank {rank}, call {i}")
                }
                (4..=8, Err(Error::LengthMismatch { .. })) => {}
                (9, Err(Error::RankOutOfRange { rank: 11, .. })) => {}
                (10, Err(Error::RankOutOfRange { rank: 12, .. })) => {}
                _ => panic!("rank {rank}, call {i}: {e:?}"),
            }
        }
    }
}

// ---- item 6: link-model validation and saturation ------------------------------------------

#[test]
fn bad_link_models_and_options_are_named_errors() {
    let ok = Link {
        bandwidth: 1e9,
        latency: Duration::from_micros(5),
    };
    let bad_bw = |bandwidth: f64| Link {
        bandwidth,
        latency: Duration::ZERO,
    };
    let cases: Vec<(LinkModel, &str, &str)> = vec![
        (
            LinkModel::uniform(TimeMode::Virtual, bad_bw(0.0)),
            "default.bandwidth",
            "= 0 ",
        ),
        (
            LinkModel::uniform(TimeMode::Real, bad_bw(-5.0)),
            "default.bandwidth",
            "= -5 ",
        ),
        (
            LinkModel::uniform(TimeMode::Virtual, bad_bw(f64::NAN)),
            "default.bandwidth",
            "NaN",
        ),
        (
            LinkModel::uniform(TimeMode::Virtual, ok).with_link(0, 1, bad_bw(f64::NAN)),
            "overrides[0] (link 0 -> 1) bandwidth",
            "NaN",
        ),
        (
            LinkModel::uniform(TimeMode::Virtual, ok).with_slowdown(1, f64::INFINITY),
            "slowdown[1]",
            "inf",
        ),
        (
            LinkModel::uniform(TimeMode::Virtual, ok).with_slowdown(0, f64::NAN),
            "slowdown[0]",
            "NaN",
        ),
        (
            LinkModel::uniform(TimeMode::Virtual, ok).with_slowdown(1, -2.0),
            "slowdown[1]",
            "-2",
        ),
    ];
    for (model, field, value) in cases {
        let o = opts(Duration::from_secs(5), Some(model.clone()));
        for e in [
            local::run_with(2, &o, |_| Ok(())).unwrap_err(),
            local::world(2, &o).err().expect("world rejects it too"),
            model.validate().unwrap_err(),
        ] {
            let s = e.to_string();
            assert!(matches!(e, Error::InvalidArgument(_)), "{field}: {e:?}");
            assert!(s.contains(field) && s.contains(value), "{field}: {s}");
        }
    }
    let e = local::run_with(2, &opts(Duration::ZERO, None), |_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("timeout"), "{e}");
    // infinite bandwidth is allowed: no per-byte cost
    let free = LinkModel::uniform(TimeMode::Virtual, bad_bw(f64::INFINITY));
    let t = local::run_with(2, &opts(Duration::from_secs(5), Some(free)), |c| {
        let mut v = [1f64; 4];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        assert_eq!(v, [2.0; 4]);
        Ok(c.virtual_time())
    })
    .unwrap();
    assert_eq!(t, vec![Some(Duration::ZERO); 2]);
}

#[test]
fn huge_but_valid_model_values_saturate_instead_of_panicking() {
    // compute_cost: 1e300 x 1 s does not fit a Duration
    let slow = LinkModel::uniform(
        TimeMode::Virtual,
        Link {
            bandwidth: 1e9,
            latency: Duration::ZERO,
        },
    )
    .with_slowdown(1, 1e300)
    .with_delay(1, Duration::from_secs(1));
    assert_eq!(slow.compute_cost(1, Duration::from_secs(1)), Duration::MAX);
    assert_eq!(
        slow.compute_cost(0, Duration::from_secs(1)),
        Duration::from_secs(1)
    );
    let out = local::run_with(2, &opts(Duration::from_secs(5), Some(slow)), |c| {
        c.compute(Duration::from_secs(1))?;
        Ok(c.virtual_time())
    })
    .unwrap();
    assert_eq!(out[0], Some(Duration::from_secs(1)));
    assert_eq!(out[1], Some(Duration::MAX));
    // virtual time past what a Duration holds: a latency of Duration::MAX per message
    let far = LinkModel::uniform(
        TimeMode::Virtual,
        Link {
            bandwidth: 1e9,
            latency: Duration::MAX,
        },
    );
    let out = local::run_with(2, &opts(Duration::from_secs(5), Some(far)), |c| {
        c.barrier()?;
        c.barrier()?;
        Ok(c.virtual_time())
    })
    .unwrap();
    assert_eq!(out, vec![Some(Duration::MAX); 2]);
}

#[test]
fn real_time_sleeps_stop_at_the_deadline_and_keep_the_message() {
    // Each message arrives 1.5 s after it was sent, the timeout is 0.3 s: a receive times out after
    // about 0.3 s instead of sleeping 1.5 s, and the message stays for a later receive.
    let timeout = Duration::from_millis(300);
    let latency = Duration::from_millis(1500);
    let out = local::run_with(2, &opts(timeout, Some(real_latency(latency))), |c| {
        if c.rank() == 0 {
            c.send(&[7i64, 8], 1, 1)?;
            c.send(&[9i64], 1, 2)?;
            return Ok(None);
        }
        let t0 = Instant::now();
        let mut a = [0i64; 2];
        let blocking = c.recv(&mut a, 0, 1).unwrap_err();
        let blocking_took = t0.elapsed();
        // a posted receive: its completion on the worker is bounded the same way
        let t1 = Instant::now();
        let posted = c.irecv(vec![0i64; 1], 0, 2)?.wait().unwrap_err();
        let posted_took = t1.elapsed();
        std::thread::sleep((latency + Duration::from_millis(200)).saturating_sub(t0.elapsed()));
        c.recv(&mut a, 0, 1)?;
        let b = c.irecv(vec![0i64; 1], 0, 2)?.wait()?;
        Ok(Some((blocking, blocking_took, posted, posted_took, a, b)))
    })
    .unwrap();
    let (blocking, blocking_took, posted, posted_took, a, b) = out[1].as_ref().unwrap();
    assert!(
        matches!(
            blocking,
            Error::Timeout {
                waiting_for: Some(0),
                ..
            }
        ),
        "{blocking}"
    );
    assert!(matches!(posted, Error::Timeout { .. }), "{posted}");
    assert!(*blocking_took < 2 * timeout, "{blocking_took:?}");
    assert!(*posted_took < 2 * timeout, "{posted_took:?}");
    assert_eq!(a, &[7, 8]);
    assert_eq!(b, &vec![9]);
}

// ---- item 4: the clock's lock is never held across a sleep -----------------------------------

#[test]
fn real_time_compute_overlaps_a_nonblocking_collective() {
    // The all-reduce's message takes 0.5 s; the caller computes 0.3 s meanwhile (starting once the
    // worker is surely waiting for the message). Overlapped, the whole takes about 0.5 s; were the
    // worker's sleep to hold the clock, the compute would start only at 0.5 s and end at 0.8 s.
    let out = local::run_with(
        2,
        &opts(
            Duration::from_secs(5),
            Some(real_latency(Duration::from_millis(500))),
        ),
        |c| {
            let t0 = Instant::now();
            let w = c.iall_reduce(input(c.rank(), 64), ReduceOp::Sum)?;
            std::thread::sleep(Duration::from_millis(50));
            c.compute(Duration::from_millis(300))?;
            let v = w.wait()?;
            Ok((v, t0.elapsed()))
        },
    )
    .unwrap();
    let want = sum_reference(2, 64);
    for (rank, (v, took)) in out.iter().enumerate() {
        assert_eq!(v, &want, "rank {rank}");
        assert!(
            *took >= Duration::from_millis(480) && *took < Duration::from_millis(700),
            "rank {rank}: {took:?}"
        );
    }
}

// ---- item 7: a panic on a worker --------------------------------------------------------------

/// A buffer whose views panic when a ferroccl worker thread takes them (the caller's own thread,
/// which validates the call first, is spared): a stand-in for any panic on a worker.
struct PanicsOnWorker(Vec<f32>);

fn on_worker() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("ferroccl-local-"))
}

impl Buffer for PanicsOnWorker {
    fn buf(&self) -> Buf<'_> {
        assert!(!on_worker(), "deliberate panic on the worker (read view)");
        self.0.buf()
    }
}
impl BufferMut for PanicsOnWorker {
    fn buf_mut(&mut self) -> BufMut<'_> {
        assert!(!on_worker(), "deliberate panic on the worker (write view)");
        self.0.buf_mut()
    }
}
impl OwnedBuffer for PanicsOnWorker {
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

#[test]
fn a_panic_on_a_worker_is_peer_lost_for_the_rank_and_at_once_for_its_peers() {
    // Timeout 30 s. Rank 2's worker panics while ranks 0, 1, 3 are inside an all-reduce; rank 2
    // keeps its communicator (it waits until the others reported, at most 20 s), so only the worker's
    // own failure handling can tell the peers.
    let (done_tx, done_rx) = unbounded::<usize>();
    let t0 = Instant::now();
    let out = local::run_with(4, &opts(Duration::from_secs(30), None), |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(200));
            let w = c.iall_reduce(PanicsOnWorker(input(2, 100_000)), ReduceOp::Sum)?;
            let e = w.wait().err().expect("the worker panicked");
            let later = c.barrier().unwrap_err();
            for _ in 0..3 {
                let _ = done_rx.recv_timeout(Duration::from_secs(20));
            }
            return Ok((e, later, Duration::ZERO));
        }
        let mut v = input(c.rank(), 100_000);
        let t = Instant::now();
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        let took = t.elapsed();
        let later = c.barrier().unwrap_err();
        done_tx.send(c.rank()).unwrap();
        Ok((e, later, took))
    })
    .unwrap();
    for (rank, (e, later, took)) in out.iter().enumerate() {
        assert!(
            matches!(e, Error::PeerLost { rank: 2, .. }),
            "rank {rank}: {e}"
        );
        assert!(e.is_fatal());
        assert!(
            matches!(later, Error::PeerLost { rank: 2, .. }),
            "rank {rank}: {later}"
        );
        assert!(*took < Duration::from_secs(5), "rank {rank}: {took:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn a_rank_that_panics_while_the_others_are_inside_an_all_reduce() {
    let t0 = Instant::now();
    let took = std::sync::Mutex::new(Vec::new());
    let r = local::run_with(4, &opts(Duration::from_secs(30), None), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(200));
            panic!("rank 1 dies while the others are inside an all_reduce");
        }
        let mut v = input(c.rank(), 100_000);
        let t = Instant::now();
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        took.lock().unwrap().push((c.rank(), t.elapsed()));
        assert!(matches!(e, Error::PeerLost { rank: 1, .. }), "{e}");
        Ok(())
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("rank 1 panicked"), "{e}");
    let took = took.into_inner().unwrap();
    assert_eq!(took.len(), 3, "{took:?}");
    assert!(
        took.iter().all(|(_, t)| *t < Duration::from_secs(5)),
        "{took:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
}
