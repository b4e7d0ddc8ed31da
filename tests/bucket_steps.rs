//! One bucketer across many steps: the step ends in `finish`, the DGC hook's state stays the same
//! size and carries its residuals (checked value for value against plain `Dgc` per bucket), a layout
//! change is a named error, the bucket-view form equals the copying form, and the DGC hook's
//! exchange overlaps the rest of the backward pass.
mod common;

use ferroccl::bucket::Bucketer;
use ferroccl::dgc::{DgcConfig, DgcHook, Exchange, Selection};
use ferroccl::prelude::*;
use std::time::Duration;

/// Different general floats for every (rank, step, tensor).
fn grads(rank: usize, step: usize, sizes: &[usize]) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .enumerate()
        .map(|(t, &n)| common::random_f32((rank * 1_000_000 + step * 100 + t) as u64, n))
        .collect()
}

fn cfg() -> DgcConfig {
    // the paper's techniques on, warm-up over the first 4 epochs (so the counted epoch matters)
    DgcConfig::default()
        .final_density(0.01)
        .selection(Selection::Sampled)
}

/// The hook's (buckets, state length, memory bytes) after a step.
type Sizes = (usize, usize, usize);

/// `steps` steps through one bucketer with the DGC hook, and the same through one plain `Dgc` per
/// bucket (the bucket's tensors concatenated in push order, epoch = step / steps_per_epoch); returns
/// whether every update was bit-identical, and the hook's (buckets, state length, memory) per step.
fn hook_vs_reference(
    bucket_bytes: usize,
    layout: &[&[usize]],
    sizes: &[usize],
    steps: usize,
    steps_per_epoch: usize,
    cfg: DgcConfig,
) -> Vec<(bool, Vec<Sizes>)> {
    ferroccl::local::run(2, |c| {
        let mut b =
            Bucketer::with_hook(c, bucket_bytes, DgcHook::new(cfg.clone(), steps_per_epoch)?);
        let mut refs: Vec<Dgc> = layout
            .iter()
            .map(|ts| Dgc::new(ts.iter().map(|&t| sizes[t]).sum(), cfg.clone()))
            .collect::<Result<_>>()?;
        let mut same = true;
        let mut sizes_seen = Vec::new();
        for step in 0..steps {
            let g = grads(c.rank(), step, sizes);
            let mut via_hook = g.clone();
            for (id, t) in g.iter().enumerate().rev() {
                b.push(id, t)?;
            }
            b.finish(|id, r| via_hook[id].copy_from_slice(r))?;
            let epoch = step as f64 / steps_per_epoch as f64;
            for (bucket, ts) in layout.iter().enumerate() {
                let mut flat: Vec<f32> = ts.iter().flat_map(|&t| g[t].iter().copied()).collect();
                refs[bucket].step(c, &mut flat, epoch)?;
                let got: Vec<f32> = ts
                    .iter()
                    .flat_map(|&t| via_hook[t].iter().copied())
                    .collect();
                same &= got
                    .iter()
                    .map(|x| x.to_bits())
                    .eq(flat.iter().map(|x| x.to_bits()));
            }
            let h = b.hook();
            let state_len: usize = (0..h.buckets())
                .map(|i| {
                    let s = h.state(i).unwrap().state();
                    s.u.len() + s.v.len()
                })
                .sum();
            sizes_seen.push((h.buckets(), state_len, h.memory_bytes()));
            assert_eq!(h.steps(), step as u64 + 1);
        }
        Ok((same, sizes_seen))
    })
    .unwrap()
}

#[test]
fn a_hundred_steps_keep_the_dgc_state_constant_and_carry_residuals() {
    let sizes = [300usize, 5, 2000, 17];
    let total: usize = sizes.iter().sum();
    // 1024-float buckets, pushed in reverse: [17], [2000] alone, [5, 300]
    let multi: &[&[usize]] = &[&[3], &[2], &[1, 0]];
    // one bucket holding everything, in push order
    let single: &[&[usize]] = &[&[3, 2, 1, 0]];
    for (bytes, layout, ex) in [
        (4096, multi, Exchange::FixedK),
        (1 << 20, single, Exchange::FixedK),
        (4096, multi, Exchange::CountsThenGather),
    ] {
        let out = hook_vs_reference(bytes, layout, &sizes, 100, 10, cfg().exchange(ex));
        for (rank, (same, seen)) in out.iter().enumerate() {
            assert!(
                same,
                "rank {rank}, {bytes}-byte buckets, {ex:?}: the hook's updates differ from plain Dgc per bucket"
            );
            let (buckets, state_len, mem) = seen[0];
            assert_eq!(buckets, layout.len());
            assert_eq!(
                state_len,
                2 * total,
                "u and v: one value per parameter each"
            );
            // from the second step on nothing grows: same states, same memory
            for (step, s) in seen.iter().enumerate().skip(1) {
                assert_eq!(
                    *s, seen[1],
                    "rank {rank} step {step}: {s:?} vs {:?}",
                    seen[1]
                );
            }
            assert_eq!((seen[1].0, seen[1].1), (buckets, state_len));
            assert!(mem >= 8 * total, "{mem}");
        }
    }
}

#[test]
fn the_epoch_is_counted_from_finished_steps() {
    let sizes = [4000usize];
    let out = ferroccl::local::run(2, |c| {
        let mut b = Bucketer::with_hook(c, 1 << 20, DgcHook::new(cfg(), 3)?);
        let mut densities = Vec::new();
        for step in 0..15 {
            for (id, t) in grads(c.rank(), step, &sizes).iter().enumerate() {
                b.push(id, t)?;
            }
            b.finish(|_, _| {})?;
            densities.push(b.hook().step_stats()[0].density);
        }
        Ok((densities, b.hook().epoch()))
    })
    .unwrap();
    let c = cfg();
    for (densities, epoch) in out {
        assert_eq!(epoch, 5.0);
        for (step, d) in densities.iter().enumerate() {
            let k = (c.density_at(step as f64 / 3.0) * 4000.0).ceil();
            assert_eq!(*d, k / 4000.0, "step {step}");
        }
        assert!(densities[0] > densities[14], "warm-up ends: {densities:?}");
    }
}

#[test]
fn a_changed_layout_is_a_named_error_that_changes_nothing() {
    ferroccl::local::run(2, |c| {
        let sizes = [300usize, 5, 2000];
        let mut b = Bucketer::with_hook(c, 4096, DgcHook::new(cfg(), 1)?);
        let g = grads(c.rank(), 0, &sizes);
        for (id, t) in g.iter().enumerate() {
            b.push(id, t)?;
        }
        b.finish(|_, _| {})?;
        let mem = b.hook().memory_bytes();
        // step 1 pushes tensor 1 first: refused before anything is launched
        let e = b.push(1, &g[1]).unwrap_err();
        assert!(matches!(e, Error::LayoutChanged { step: 1, position: 0, .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("push #0 is tensor 1 (5 elements), but the first step pushed tensor 0 (300 elements)"),
            "{text}"
        );
        // a different length at the right position, too
        let e = b.push(0, &g[0][..299]).unwrap_err();
        assert!(matches!(e, Error::LayoutChanged { .. }), "{e}");
        assert_eq!(b.launched().0, 2, "the last step's counts: nothing new launched");
        // the right push still works, and a step that stops early is refused at finish
        b.push(0, &g[0])?;
        b.push(1, &g[1])?;
        let e = b.finish(|_, _| {}).unwrap_err();
        assert!(e.to_string().contains("is the end of the step"), "{e}");
        // after the abandoned step the layout holds and the next full step runs normally
        for (id, t) in g.iter().enumerate() {
            b.push(id, t)?;
        }
        b.finish(|_, _| {})?;
        assert_eq!(b.hook().buckets(), 2);
        assert_eq!(b.hook().memory_bytes(), mem);
        Ok(())
    })
    .unwrap();
}

/// The view form: write into `grad_mut`, `mark_ready`, `finish_in_place`, read `grad`.
fn view_step<H: ferroccl::BucketHook<f32>, C: Communicator + ?Sized>(
    b: &mut Bucketer<'_, f32, C, H>,
    g: &[Vec<f32>],
) -> Result<Vec<Vec<f32>>> {
    for (id, t) in g.iter().enumerate().rev() {
        b.grad_mut(id)?.copy_from_slice(t);
        b.mark_ready(id)?;
    }
    b.finish_in_place()?;
    (0..g.len()).map(|id| Ok(b.grad(id)?.to_vec())).collect()
}

#[test]
fn bucket_views_give_the_copying_path_s_values() {
    let sizes = [3usize, 1000, 1, 0, 40_000, 17, 257, 5];
    let order: Vec<(usize, usize)> = sizes.iter().copied().enumerate().rev().collect();
    for bytes in [4usize, 4096, 1 << 20] {
        let out = ferroccl::local::run(3, |c| {
            let mut copying = Bucketer::new(c, bytes, ReduceOp::Avg);
            let mut views = Bucketer::views(c, bytes, ReduceOp::Avg, &order)?;
            let mut dgc_copy = Bucketer::with_hook(c, bytes, DgcHook::new(cfg(), 2)?);
            let mut dgc_view =
                Bucketer::views_with_hook(c, bytes, DgcHook::new(cfg(), 2)?, &order)?;
            let mut same = true;
            for step in 0..4 {
                let g = grads(c.rank(), step, &sizes);
                let mut a = g.clone();
                for (id, t) in g.iter().enumerate().rev() {
                    copying.push(id, t)?;
                }
                copying.finish(|id, r| a[id].copy_from_slice(r))?;
                same &= view_step(&mut views, &g)? == a;
                assert_eq!(views.launched(), copying.launched(), "same buckets");
                let mut d = g.clone();
                for (id, t) in g.iter().enumerate().rev() {
                    dgc_copy.push(id, t)?;
                }
                dgc_copy.finish(|id, r| d[id].copy_from_slice(r))?;
                same &= view_step(&mut dgc_view, &g)? == d;
            }
            // misuse is refused by name
            assert!(matches!(
                views.push(0, &[1.0; 3]),
                Err(Error::InvalidArgument(_))
            ));
            views.mark_ready(1)?;
            assert!(views.mark_ready(1).is_err(), "twice");
            assert!(views.grad_mut(1).is_err(), "written after ready");
            assert!(views
                .finish_in_place()
                .unwrap_err()
                .to_string()
                .contains("not marked ready"));
            assert!(views.grad_mut(99).is_err());
            Ok(same)
        })
        .unwrap();
        assert!(out.iter().all(|s| *s), "{bytes}-byte buckets: {out:?}");
    }
}

#[test]
fn the_dgc_hook_s_launch_returns_before_the_exchange_finishes() {
    // Rank 0 fills a bucket (its push launches it) and only then lets rank 1 start pushing. Were
    // the DGC exchange run inside the push, rank 0's push would wait for rank 1, which waits for
    // rank 0's signal, until the channel's timeout fails the test. Same for the view form's
    // mark_ready.
    for views in [false, true] {
        let (tx, rx) = crossbeam::channel::bounded::<()>(1);
        let sizes = [1024usize, 1024, 300];
        let out = ferroccl::local::run(2, |c| {
            let g = grads(c.rank(), 0, &sizes);
            let hook = DgcHook::new(cfg(), 1)?;
            let mut got = g.clone();
            if views {
                let order: Vec<(usize, usize)> = sizes.iter().copied().enumerate().collect();
                let mut b = Bucketer::views_with_hook(c, 4096, hook, &order)?;
                if c.rank() == 1 {
                    rx.recv_timeout(Duration::from_secs(30))
                        .expect("rank 0's mark_ready waited for rank 1: the DGC exchange blocked");
                }
                for (id, t) in g.iter().enumerate() {
                    b.grad_mut(id)?.copy_from_slice(t);
                    b.mark_ready(id)?;
                    if c.rank() == 0 && id == 1 {
                        assert_eq!(b.launched().0, 2, "two full buckets launched");
                        tx.send(()).unwrap();
                    }
                }
                b.finish_in_place()?;
                for (id, x) in got.iter_mut().enumerate() {
                    x.copy_from_slice(b.grad(id)?);
                }
            } else {
                let mut b = Bucketer::with_hook(c, 4096, hook);
                if c.rank() == 1 {
                    rx.recv_timeout(Duration::from_secs(30))
                        .expect("rank 0's push waited for rank 1: the DGC exchange blocked");
                }
                for (id, t) in g.iter().enumerate() {
                    b.push(id, t)?;
                    if c.rank() == 0 && id == 1 {
                        assert_eq!(b.launched().0, 2, "two full buckets launched");
                        tx.send(()).unwrap();
                    }
                }
                b.finish(|id, r| got[id].copy_from_slice(r))?;
            }
            Ok(got)
        })
        .unwrap();
        assert_eq!(out[0], out[1], "views {views}: replicas agree");
    }
}
