//! The bucketer gives what per-tensor all-reduces give, buckets as configured, and launches each
//! bucket as soon as it is full.
mod common;

use ferroccl::bucket::{BucketHook, Bucketer};
use ferroccl::prelude::*;
use ferroccl::{Communicator, Work};
use std::time::Duration;

/// Integer-valued gradients from the tests' reference data (tensor `t` takes the indices after the
/// previous tensors', so no two tensors repeat each other): every sum is exact in f32, whatever the
/// order, and so is Avg over 4 ranks.
fn grads(rank: usize, sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut off = 0;
    sizes
        .iter()
        .map(|&n| {
            off += n;
            (off - n..off)
                .map(|i| common::val(rank, i, DType::F32, ReduceOp::Sum) as f32)
                .collect()
        })
        .collect()
}

/// The reference Avg over `world` ranks of [`grads`].
fn avg_grads(world: usize, sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut off = 0;
    sizes
        .iter()
        .map(|&n| {
            off += n;
            (off - n..off)
                .map(|i| common::reduced::<f32>(world, i, ReduceOp::Avg))
                .collect()
        })
        .collect()
}

/// General floats (see `common::random_f32`), different for every rank and tensor.
fn random_grads(rank: usize, sizes: &[usize]) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .enumerate()
        .map(|(t, &n)| common::random_f32((rank * 1000 + t) as u64, n))
        .collect()
}

#[test]
fn bucketed_equals_per_tensor() {
    let sizes = [3usize, 1000, 1, 0, 40_000, 17, 257, 5];
    let want = avg_grads(4, &sizes);
    for bucket_bytes in [4usize, 64, 4096, 1 << 20, 25 << 20] {
        let out = ferroccl::local::run(4, |c| {
            let mut per_tensor = grads(c.rank(), &sizes);
            for g in per_tensor.iter_mut() {
                c.all_reduce(g, ReduceOp::Avg)?;
            }
            let mut bucketed = grads(c.rank(), &sizes);
            let mut b = Bucketer::new(c, bucket_bytes, ReduceOp::Avg);
            for (id, g) in bucketed.iter().enumerate().rev() {
                b.push(id, g)?;
            }
            b.finish(|id, r| bucketed[id].copy_from_slice(r))?;
            Ok((per_tensor, bucketed, b.launched()))
        })
        .unwrap();
        for (r, (p, q, (buckets, bytes))) in out.iter().enumerate() {
            // exact data: both equal the reference, bit for bit
            assert_eq!(p, &want, "rank {r} per tensor");
            assert_eq!(q, &want, "rank {r} bucket {bucket_bytes}");
            let total: usize = sizes.iter().sum::<usize>() * 4;
            assert_eq!(*bytes, total);
            if bucket_bytes == 4096 {
                // pushed in reverse: 5+257+17 fused, 40000 alone, then 0+1+1000+3 fused (1024-float cap)
                assert_eq!(*buckets, 3);
            }
            if bucket_bytes >= total {
                assert_eq!(*buckets, 1);
            }
            if bucket_bytes == 4 {
                // one per tensor; the empty tensor rides with the next one
                assert_eq!(*buckets, sizes.iter().filter(|&&s| s > 0).count());
            }
        }
    }
}

#[test]
fn bucketed_matches_per_tensor_for_random_floats() {
    // General f32 gradients are not reduced bit-identically: a per-tensor all-reduce of a small
    // tensor takes recursive doubling (world 5: ranks 0+1 folded, then pairwise exchanges), a fused
    // bucket past 64 KiB the two-shot (ranks summed in rank order), and f32 addition is not
    // associative. Both are within the rounding of a 5-term sum: |Σ error| ≤ (n−1)·u·Σ|x| per
    // algorithm (u = 2^-24), so two of them, divided by n for Avg, differ by at most
    // 2n·u·Σ|x|/n = n·ε·mean|x| (ε = 2^-23), the bound below. (With buckets of 1 MiB and more, about
    // a fifth of the small tensors' elements do differ in the last bits.)
    const WORLD: usize = 5;
    let sizes = [3usize, 1000, 1, 0, 40_000, 17, 257, 5, 20_000, 16_385];
    let inputs: Vec<Vec<Vec<f32>>> = (0..WORLD).map(|r| random_grads(r, &sizes)).collect();
    let bound = |t: usize, i: usize| -> (f64, f64) {
        let xs = inputs.iter().map(|g| g[t][i] as f64);
        let mean = xs.clone().sum::<f64>() / WORLD as f64;
        let mag = xs.map(f64::abs).sum::<f64>() / WORLD as f64;
        (mean, WORLD as f64 * f32::EPSILON as f64 * mag)
    };
    for bucket_bytes in [4usize, 4096, 1 << 20, 25 << 20] {
        let out = ferroccl::local::run(WORLD, |c| {
            let mut per_tensor = random_grads(c.rank(), &sizes);
            for g in per_tensor.iter_mut() {
                c.all_reduce(g, ReduceOp::Avg)?;
            }
            let mut bucketed = random_grads(c.rank(), &sizes);
            let mut b = Bucketer::new(c, bucket_bytes, ReduceOp::Avg);
            for (id, g) in bucketed.iter().enumerate().rev() {
                b.push(id, g)?;
            }
            b.finish(|id, r| bucketed[id].copy_from_slice(r))?;
            Ok((per_tensor, bucketed))
        })
        .unwrap();
        // every rank ends with the same bits either way
        for (r, o) in out.iter().enumerate().skip(1) {
            assert!(
                o == &out[0],
                "rank {r} differs from rank 0, bucket {bucket_bytes}"
            );
        }
        let (p, q) = &out[0];
        for t in 0..sizes.len() {
            for i in 0..sizes[t] {
                let (mean, tol) = bound(t, i);
                let (a, b) = (p[t][i] as f64, q[t][i] as f64);
                assert!(
                    (a - b).abs() <= tol,
                    "bucket {bucket_bytes} tensor {t}[{i}]: per tensor {a}, bucketed {b}, bound {tol:e}"
                );
                for x in [a, b] {
                    assert!((x - mean).abs() <= tol, "tensor {t}[{i}]: {x} vs {mean}");
                }
            }
        }
    }
}

/// The default hook, recording the length of every bucket it is handed.
struct Recording(Vec<usize>);

impl BucketHook<f32> for Recording {
    type Flight = Work<Vec<f32>>;
    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        _bucket: usize,
        data: Vec<f32>,
    ) -> Result<Work<Vec<f32>>> {
        self.0.push(data.len());
        comm.iall_reduce(data, ReduceOp::Sum)
    }
    fn complete<C: Communicator + ?Sized>(
        &mut self,
        _comm: &C,
        _bucket: usize,
        flight: Work<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        flight.wait()
    }
}

/// Tensors for 1024-float buckets, with what has been launched once each is pushed: 600+424 fill a
/// bucket exactly, 2000 overflows one alone, 10 waits until 1020 does not fit beside it, 1020+4
/// fill the last; nothing is left for `finish`.
const PUSHES: [(usize, usize, &[usize]); 6] = [
    (600, 0, &[]),
    (424, 1, &[1024]),
    (2000, 2, &[1024, 2000]),
    (10, 2, &[1024, 2000]),
    (1020, 3, &[1024, 2000, 10]),
    (4, 4, &[1024, 2000, 10, 1024]),
];

#[test]
fn a_bucket_is_launched_by_the_push_that_fills_it() {
    let out = ferroccl::local::run(2, |c| {
        let sizes: Vec<usize> = PUSHES.iter().map(|p| p.0).collect();
        let g = grads(c.rank(), &sizes);
        let mut b = Bucketer::with_hook(c, 4096, Recording(Vec::new()));
        for (id, (&(_, buckets, log), t)) in PUSHES.iter().zip(&g).enumerate() {
            b.push(id, t)?;
            assert_eq!(b.launched().0, buckets, "after pushing tensor {id}");
            assert_eq!(b.hook_mut().0, log, "after pushing tensor {id}");
        }
        let mut got = vec![Vec::new(); g.len()];
        b.finish(|id, r| got[id] = r.to_vec())?;
        assert_eq!(b.launched().0, 4, "finish had nothing left to launch");
        Ok(got)
    })
    .unwrap();
    let sizes: Vec<usize> = PUSHES.iter().map(|p| p.0).collect();
    let (g0, g1) = (grads(0, &sizes), grads(1, &sizes));
    for got in out {
        for (t, v) in got.iter().enumerate() {
            let want: Vec<f32> = g0[t].iter().zip(&g1[t]).map(|(a, b)| a + b).collect();
            assert_eq!(v, &want, "tensor {t}");
        }
    }
}

#[test]
fn launched_buckets_complete_before_the_peer_calls_finish() {
    // Rank 1 pushes everything (every bucket fills, see PUSHES) and calls `finish` only after rank 0's
    // `finish` returned: that can only happen if rank 1's buckets were all-reduced on their way, while
    // it "computed". Were they held back until `finish`, rank 0 would wait for rank 1, which waits
    // for rank 0, until the channel's timeout fails the test.
    let (done_tx, done_rx) = crossbeam::channel::bounded::<()>(1);
    let sizes: Vec<usize> = PUSHES.iter().map(|p| p.0).collect();
    let out = ferroccl::local::run(2, |c| {
        let g = grads(c.rank(), &sizes);
        let mut b = Bucketer::new(c, 4096, ReduceOp::Sum);
        for (id, t) in g.iter().enumerate() {
            b.push(id, t)?;
        }
        let mut got = vec![Vec::new(); g.len()];
        if c.rank() == 1 {
            done_rx.recv_timeout(Duration::from_secs(30)).expect(
                "rank 0's finish waited for rank 1's finish: buckets were not launched when full",
            );
            b.finish(|id, r| got[id] = r.to_vec())?;
        } else {
            b.finish(|id, r| got[id] = r.to_vec())?;
            done_tx.send(()).unwrap();
        }
        Ok(got)
    })
    .unwrap();
    assert_eq!(out[0], out[1]);
}

#[test]
fn pushing_a_tensor_twice_is_an_error() {
    ferroccl::local::run(2, |c| {
        let mut b = Bucketer::new(c, 1 << 20, ReduceOp::Sum);
        b.push(0, &[1f32])?;
        assert!(matches!(b.push(0, &[1f32]), Err(Error::InvalidArgument(_))));
        b.finish(|_, _| {})?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn dgc_composes_with_the_bucketer() {
    use ferroccl::dgc::{DgcConfig, DgcHook, Selection};
    // DGC at density 1 without momentum correction must equal the dense Avg all-reduce, bucket by
    // bucket; at 1% it must send ~1% and keep the rest in per-bucket residuals across steps.
    let sizes = [300usize, 5, 2000, 17];
    let plain = |d: f64| {
        DgcConfig::default()
            .final_density(d)
            .warmup_enabled(false)
            .clipping(false)
            .momentum_correction(false)
            .momentum_masking(false)
            .selection(Selection::ExactTopK)
    };
    let out = ferroccl::local::run(4, |c| {
        let mut dense = grads(c.rank(), &sizes);
        let mut b = Bucketer::new(c, 4096, ReduceOp::Avg);
        for (id, g) in dense.iter().enumerate().rev() {
            b.push(id, g)?;
        }
        b.finish(|id, r| dense[id].copy_from_slice(r))?;
        let mut via_dgc = grads(c.rank(), &sizes);
        let mut b = Bucketer::with_hook(c, 4096, DgcHook::new(plain(1.0), 1)?);
        for (id, g) in via_dgc.iter().enumerate().rev() {
            b.push(id, g)?;
        }
        b.finish(|id, r| via_dgc[id].copy_from_slice(r))?;
        let buckets = b.launched().0;
        // sparse: two steps with one bucketer, residuals carried per bucket
        let mut b = Bucketer::with_hook(c, 4096, DgcHook::new(plain(0.01), 1)?);
        let mut sent = 0usize;
        for _step in 0..2 {
            let mut g = grads(c.rank(), &sizes);
            for (id, t) in g.iter().enumerate().rev() {
                b.push(id, t)?;
            }
            b.finish(|id, r| g[id].copy_from_slice(r))?;
            sent += b
                .hook()
                .step_stats()
                .iter()
                .map(|s| s.selected)
                .sum::<usize>();
        }
        let hook = b.into_hook();
        let kept: usize = (0..buckets)
            .filter_map(|i| hook.state(i))
            .map(|d| d.state().v.iter().filter(|x| **x != 0.0).count())
            .sum();
        Ok((dense == via_dgc, buckets, sent, kept))
    })
    .unwrap();
    let total: usize = sizes.iter().sum();
    for (eq, buckets, sent, kept) in out {
        assert!(
            eq,
            "density 1 through the hook equals the dense bucketed all-reduce"
        );
        // reverse push order, 1024-float buckets: [17], [2000] alone, [5, 300]
        assert_eq!(buckets, 3);
        assert!(
            sent >= 2 * total / 100 && sent <= 2 * (total / 100 + buckets),
            "sent {sent}"
        );
        assert!(kept > total / 2, "residuals kept per bucket: {kept}");
    }
}
