//! The bucketer gives what per-tensor all-reduces give, and buckets as configured.
use ferroccl::bucket::Bucketer;
use ferroccl::prelude::*;

fn grads(rank: usize, sizes: &[usize]) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            (0..n)
                .map(|i| ((rank * 31 + t * 7 + i) % 13) as f32 - 6.0)
                .collect()
        })
        .collect()
}

#[test]
fn bucketed_equals_per_tensor() {
    let sizes = [3usize, 1000, 1, 0, 40_000, 17, 257, 5];
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
            assert_eq!(p, q, "rank {r} bucket {bucket_bytes}");
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
        let mut b = Bucketer::with_hook(c, 4096, DgcHook::new(plain(1.0))?);
        for (id, g) in via_dgc.iter().enumerate().rev() {
            b.push(id, g)?;
        }
        b.finish(|id, r| via_dgc[id].copy_from_slice(r))?;
        let buckets = b.launched().0;
        // sparse: two steps with the same hook, residuals carried per bucket
        let mut hook = DgcHook::new(plain(0.01))?;
        let mut sent = 0usize;
        for _step in 0..2 {
            let mut g = grads(c.rank(), &sizes);
            let mut b = Bucketer::with_hook(c, 4096, hook);
            for (id, t) in g.iter().enumerate().rev() {
                b.push(id, t)?;
            }
            b.finish(|id, r| g[id].copy_from_slice(r))?;
            hook = b.into_hook();
            sent += hook.take_stats().iter().map(|s| s.selected).sum::<usize>();
        }
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
