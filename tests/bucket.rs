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
