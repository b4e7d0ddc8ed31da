//! The local-SGD family (`ferroccl::local_sgd`) against hand-computed two-rank (and small) cases,
//! synchronous SGD, and its bad-input contract.
use ferroccl::dgc::DgcConfig;
use ferroccl::local::{self};
use ferroccl::local_sgd::{
    Algorithm, Exchange, LocalSgd, LocalSgdConfig, LocalSgdState, Outer, Penalty, Topology,
};
use ferroccl::prelude::*;
use ferroccl::stats::OpKind;
use proptest::prelude::*;

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn diloco_two_ranks_by_hand() {
    // θ0 = [1, 2]; rank r steps θ −= 0.5·g_r with g_0 = [1, 1], g_1 = [2, 1]; h = 2, so Δ_r = g_r and
    // Δ̄ = [1.5, 1]. Round 1: m = Δ̄, step = Δ̄ + 0.9·m = 1.9·Δ̄, φ = θ0 − 0.7·1.9·Δ̄ = [−0.995, 0.67].
    // Round 2: m = 1.9·Δ̄, step = Δ̄ + 0.9·1.9·Δ̄ = 2.71·Δ̄, φ −= 0.7·2.71·Δ̄ → [−3.8405, −1.227].
    let out = local::run(2, |c| {
        let mut w = vec![1.0f32, 2.0];
        let mut l = LocalSgd::new(c, LocalSgdConfig::diloco(2), &["w"], &mut [&mut w])?;
        let g = [c.rank() as f32 + 1.0, 1.0];
        let mut after = Vec::new();
        for _ in 0..4 {
            w.iter_mut().zip(&g).for_each(|(x, g)| *x -= 0.5 * g);
            if l.step(c, &mut [&mut w])?.synced {
                after.push(w.clone());
                assert_eq!(l.global(), &w[..]);
            }
        }
        Ok((after, l.rounds()))
    })
    .unwrap();
    for (after, rounds) in out {
        assert_eq!(rounds, 2);
        assert!(close(&after[0], &[-0.995, 0.67], 1e-6), "{after:?}");
        assert!(close(&after[1], &[-3.8405, -1.227], 2e-6), "{after:?}");
    }
}

#[test]
fn periodic_hierarchical_and_warmup_by_hand() {
    // world 4, groups {0,1} {2,3}: every step inside the group, every 2nd globally
    let out = local::run(4, |c| {
        let mut cfg = LocalSgdConfig::periodic(2);
        if let Algorithm::Periodic { hierarchy, .. } = &mut cfg.algorithm {
            *hierarchy = Some(ferroccl::local_sgd::Hierarchy {
                group_size: 2,
                h_group: 1,
            });
        }
        let mut w = vec![0.0f32];
        let mut l = LocalSgd::new(c, cfg, &["w"], &mut [&mut w])?;
        let r = c.rank() as f32;
        w[0] = r;
        l.step(c, &mut [&mut w])?; // group average: 0.5 / 2.5
        let first = w[0];
        w[0] += r; // 0.5, 1.5, 4.5, 5.5
        let rep = l.step(c, &mut [&mut w])?; // global: 3.0
        assert!(rep.synced);
        let group = l.group_stats().unwrap();
        Ok((first, w[0], group.op(OpKind::AllReduce).calls))
    })
    .unwrap();
    let firsts: Vec<f32> = out.iter().map(|o| o.0).collect();
    assert_eq!(firsts, vec![0.5, 0.5, 2.5, 2.5]);
    assert!(out.iter().all(|o| o.1 == 3.0 && o.2 == 1), "{out:?}");

    // synchronous warm-up: gradients averaged through the bucketer, no model sync until it ends
    let out = local::run(2, |c| {
        let mut cfg = LocalSgdConfig::periodic(1);
        if let Algorithm::Periodic { warmup_steps, .. } = &mut cfg.algorithm {
            *warmup_steps = 2;
        }
        let mut w = vec![1.0f32, 1.0];
        let mut b = vec![0.0f32];
        let mut l = LocalSgd::new(c, cfg, &["w", "b"], &mut [&mut w, &mut b])?;
        let mut warm = Vec::new();
        for _ in 0..2 {
            warm.push(l.in_warmup());
            let mut gw = vec![c.rank() as f32; 2];
            let mut gb = vec![2.0 * c.rank() as f32];
            l.allreduce_grads(c, &mut [&mut gw, &mut gb])?;
            w.iter_mut().zip(&gw).for_each(|(x, g)| *x -= g);
            b[0] -= gb[0];
            l.step(c, &mut [&mut w, &mut b])?;
        }
        warm.push(l.in_warmup());
        Ok((warm, w, b, l.global().to_vec(), l.rounds()))
    })
    .unwrap();
    for (warm, w, b, g, rounds) in out {
        assert_eq!(warm, vec![true, true, false]);
        assert_eq!((w.clone(), b.clone()), (vec![0.0, 0.0], vec![-2.0]));
        assert_eq!(g, vec![0.0, 0.0, -2.0]);
        assert_eq!(rounds, 0);
    }
}

#[test]
fn streaming_two_fragments_by_hand() {
    // 2 elements = 2 fragments, h = 4, τ = 1, α = 0.5, outer lr 1 without momentum; rank r steps
    // θ −= c_r (c_0 = 1, c_1 = 3, mean 2). Fragment 0 starts at step 4 (Δ̄ = 8), is applied at 5:
    // φ0 = −8, θ0 = ½(−5c) + ½(−8). Fragment 1 starts at 6 (Δ̄ = 12), applied at 7: φ1 = −12,
    // θ1 = ½(−7c) − 6. After step 7: rank 0 θ = [−8.5, −9.5], rank 1 θ = [−17.5, −16.5].
    let out = local::run(2, |c| {
        let mut cfg = LocalSgdConfig::streaming(4, 2, 1);
        if let Algorithm::Streaming { outer, .. } = &mut cfg.algorithm {
            *outer = Outer::AVERAGE;
        }
        let mut w = vec![0.0f32; 2];
        let mut l = LocalSgd::new(c, cfg, &["w"], &mut [&mut w])?;
        c.reset_stats();
        let cr = if c.rank() == 0 { 1.0 } else { 3.0 };
        let mut synced = Vec::new();
        for _ in 0..7 {
            w.iter_mut().for_each(|x| *x -= cr);
            synced.push(l.step(c, &mut [&mut w])?.synced);
        }
        let peak = c.stats().op(OpKind::AllReduce);
        Ok((w, l.global().to_vec(), synced, l.rounds(), peak))
    })
    .unwrap();
    assert_eq!(out[0].0, vec![-8.5, -9.5]);
    assert_eq!(out[1].0, vec![-17.5, -16.5]);
    for (_, g, synced, rounds, ar) in &out {
        assert_eq!(g, &vec![-8.0, -12.0]);
        assert_eq!(synced, &vec![false, false, false, false, true, false, true]);
        assert_eq!(*rounds, 1);
        // two fragment exchanges of 1 value + the flag, recursive doubling over 2 ranks: 8 B each
        assert_eq!((ar.calls, ar.bytes_sent), (2, 16));
    }
}

#[test]
fn edit_two_ranks_weighted_by_hand_and_layer_order() {
    // two tensors a (1) and b (1); rank 0 moves a by −1 (‖Δ‖ = 1), rank 1 moves b by −2 (‖Δ‖ = 2).
    // Weights softmax(−norm): w0 = 1/(1+e⁻¹), w1 = e⁻¹/(1+e⁻¹); outer lr 1: φ = −Δ̄.
    let out = local::run(2, |c| {
        let cfg = LocalSgdConfig::of_edit_for_test();
        let (mut a, mut b) = (vec![0.0f32], vec![0.0f32]);
        let mut l = LocalSgd::new(c, cfg, &["a", "b"], &mut [&mut a, &mut b])?;
        if c.rank() == 0 {
            a[0] -= 1.0;
        } else {
            b[0] -= 2.0;
        }
        let rep = l.step(c, &mut [&mut a, &mut b])?;
        assert!(rep.synced && rep.excluded == 0);
        // out of order: layer 1 before layer 0, and another step before the pass completed
        let e1 = l.layer(c, 1, &mut b).unwrap_err();
        assert!(
            matches!(
                e1,
                Error::OutOfOrder {
                    expected: 0,
                    got: 1,
                    ..
                }
            ),
            "{e1}"
        );
        let e2 = l.step(c, &mut [&mut a, &mut b]).unwrap_err();
        assert!(matches!(e2, Error::OutOfOrder { .. }), "{e2}");
        assert_eq!(l.global(), &[0.0, 0.0], "errors changed the global copy");
        l.layer(c, 0, &mut a)?;
        l.layer(c, 1, &mut b)?;
        l.layer(c, 0, &mut a)?; // no pass pending: a no-op
        Ok((a[0], b[0], l.rounds()))
    })
    .unwrap();
    let e = (-1.0f64).exp();
    let (w0, w1) = (1.0 / (1.0 + e), e / (1.0 + e));
    for (a, b, rounds) in out {
        assert_eq!(rounds, 1);
        assert!((f64::from(a) + w0).abs() < 1e-6, "{a} vs {}", -w0);
        assert!(
            (f64::from(b) + 2.0 * w1).abs() < 1e-6,
            "{b} vs {}",
            -2.0 * w1
        );
    }
}

trait EditForTest {
    fn of_edit_for_test() -> LocalSgdConfig;
}
impl EditForTest for LocalSgdConfig {
    fn of_edit_for_test() -> LocalSgdConfig {
        let mut cfg = LocalSgdConfig::edit(1);
        if let Algorithm::Edit { outer, penalty, .. } = &mut cfg.algorithm {
            *outer = Outer::AVERAGE;
            *penalty = Penalty {
                skip_anomalies: false,
                clip: None,
                ..Penalty::default()
            };
        }
        cfg
    }
}

#[test]
fn noloco_two_ranks_by_hand_without_all_reduce() {
    // h = 1, θ0 = φ0 = 1, rank r steps θ −= c_r (1 and 3): Δ̄ = 2 every round, φ̄ = φ (equal).
    // δ1 = −0.7·2 = −1.4 → φ = −0.4; δ2 = 0.3·(−1.4) − 1.4 = −1.82 → φ = −2.22.
    let out = local::run(2, |c| {
        let mut w = vec![1.0f32];
        let mut l = LocalSgd::new(c, LocalSgdConfig::noloco(1), &["w"], &mut [&mut w])?;
        c.reset_stats();
        let cr = if c.rank() == 0 { 1.0 } else { 3.0 };
        let mut seen = Vec::new();
        for _ in 0..2 {
            w[0] -= cr;
            l.step(c, &mut [&mut w])?;
            seen.push(w[0]);
        }
        Ok((seen, c.stats()))
    })
    .unwrap();
    for (seen, st) in out {
        assert!(close(&seen, &[-0.4, -2.22], 1e-6), "{seen:?}");
        assert_eq!(st.op(OpKind::AllReduce).calls, 0);
        assert_eq!(st.op(OpKind::Send).calls, 2);
        // φ, Δ and the flag: 3 floats per message
        assert_eq!(st.op(OpKind::Send).bytes_sent, 2 * 12);
    }
}

#[test]
fn single_merge_ring_gossip_then_one_average() {
    let out = local::run(4, |c| {
        let mut w = vec![0.0f32];
        let cfg = LocalSgdConfig::single_merge(1, Topology::Ring);
        let mut l = LocalSgd::new(c, cfg, &["w"], &mut [&mut w])?;
        c.reset_stats();
        w[0] = c.rank() as f32;
        l.step(c, &mut [&mut w])?;
        let gossiped = w[0];
        let before = c.stats().op(OpKind::AllReduce).calls;
        l.finish(c, &mut [&mut w])?;
        Ok((
            gossiped,
            w[0],
            before,
            c.stats().op(OpKind::AllReduce).calls,
        ))
    })
    .unwrap();
    let want = [4.0 / 3.0, 1.0, 2.0, 5.0 / 3.0];
    for (r, (g, merged, before, after)) in out.into_iter().enumerate() {
        assert!((g - want[r]).abs() < 1e-6, "rank {r}: {g}");
        assert!((merged - 1.5).abs() < 1e-6);
        assert_eq!((before, after), (0, 1));
    }
}

/// A least-squares problem split over 4 ranks: rank r holds rows of `X w* + noise`.
struct Lsq {
    x: Vec<Vec<f32>>,
    y: Vec<Vec<f32>>,
}

const D: usize = 8;

impl Lsq {
    fn new() -> Lsq {
        let mut s = 12345u64;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let wstar: Vec<f32> = (0..D).map(|i| i as f32 * 0.3 - 1.0).collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            let (mut xr, mut yr) = (Vec::new(), Vec::new());
            for _ in 0..32 {
                let row: Vec<f32> = (0..D).map(|_| rnd() * 2.0).collect();
                let t: f32 = row.iter().zip(&wstar).map(|(a, b)| a * b).sum::<f32>() + 0.05 * rnd();
                xr.extend(row);
                yr.push(t);
            }
            x.push(xr);
            y.push(yr);
        }
        Lsq { x, y }
    }
    fn grad(&self, r: usize, w: &[f32], g: &mut [f32]) {
        g.fill(0.0);
        for (row, t) in self.x[r].chunks(D).zip(&self.y[r]) {
            let e: f32 = row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() - t;
            g.iter_mut()
                .zip(row)
                .for_each(|(gi, a)| *gi += 2.0 * e * a / 32.0);
        }
    }
    fn loss(&self, w: &[f32]) -> f64 {
        let mut l = 0.0;
        for r in 0..4 {
            for (row, t) in self.x[r].chunks(D).zip(&self.y[r]) {
                let e: f32 = row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() - t;
                l += f64::from(e * e);
            }
        }
        l / 128.0
    }
}

/// Train 12 rounds of h = 4 with `cfg`; rank 0's pseudo-gradient is multiplied by 100 at `corrupt`.
/// Returns the global loss after every round.
fn penalty_run(cfg: LocalSgdConfig, corrupt: Option<u64>) -> Vec<f64> {
    let p = Lsq::new();
    let out = local::run(4, |c| {
        let mut w = vec![0.0f32; D];
        let mut l = LocalSgd::new(c, cfg.clone(), &["w"], &mut [&mut w])?;
        let mut g = vec![0.0f32; D];
        let mut losses = Vec::new();
        for s in 1..=48u64 {
            p.grad(c.rank(), &w, &mut g);
            w.iter_mut().zip(&g).for_each(|(x, g)| *x -= 0.05 * g);
            if s % 4 == 0 && c.rank() == 0 && corrupt == Some(s / 4) {
                let phi = l.global().to_vec();
                w.iter_mut()
                    .zip(&phi)
                    .for_each(|(x, f)| *x = f - 100.0 * (f - *x));
            }
            if l.step(c, &mut [&mut w])?.synced {
                l.layer(c, 0, &mut w)?;
                losses.push(p.loss(l.global()));
            }
        }
        Ok(losses)
    })
    .unwrap();
    out.into_iter().next().unwrap()
}

#[test]
fn edit_penalty_suppresses_a_corrupted_worker_that_spikes_diloco() {
    let edit = {
        let mut cfg = LocalSgdConfig::edit(4);
        if let Algorithm::Edit { penalty, .. } = &mut cfg.algorithm {
            *penalty = Penalty::default().with_warmup(3);
        }
        cfg
    };
    let diloco = LocalSgdConfig::diloco(4);
    let (d_clean, d_bad) = (
        penalty_run(diloco.clone(), None),
        penalty_run(diloco, Some(6)),
    );
    let (e_clean, e_bad) = (penalty_run(edit.clone(), None), penalty_run(edit, Some(6)));
    let i = 5; // the loss right after the corrupted round
    let d_jump = d_bad[i] / d_clean[i];
    let e_dev = (e_bad[i] / e_clean[i] - 1.0).abs();
    let e_end = (e_bad[11] / e_clean[11] - 1.0).abs();
    assert!(
        d_jump >= 1.2,
        "DiLoCo did not spike: {d_bad:?} vs {d_clean:?}"
    );
    assert!(
        e_dev <= 0.02 && e_end <= 0.02,
        "EDiT moved {e_dev} (end {e_end}): {e_bad:?} vs {e_clean:?}"
    );
}

#[test]
fn bad_input_is_a_named_error_and_changes_nothing() {
    // h = 0, empty list
    let r = local::run(2, |c| {
        let mut w = vec![0.0f32];
        let e = LocalSgd::new(c, LocalSgdConfig::diloco(0), &["w"], &mut [&mut w]).err();
        let e0 = LocalSgd::new(c, LocalSgdConfig::diloco(1), &[], &mut []).err();
        Ok((e.map(|e| e.to_string()), e0.map(|e| e.to_string())))
    })
    .unwrap();
    assert!(r[0].0.as_deref().unwrap().contains("h = 0"), "{r:?}");
    assert!(
        r[0].1.as_deref().unwrap().contains("empty parameter list"),
        "{r:?}"
    );
    // mismatched layouts: every rank gets the named error
    let r = local::run(2, |c| {
        let mut w = vec![0.0f32; 3 + c.rank()];
        Ok(LocalSgd::new(c, LocalSgdConfig::diloco(1), &["w"], &mut [&mut w]).err())
    })
    .unwrap();
    for e in r {
        assert!(matches!(e, Some(Error::LayoutMismatch { .. })), "{e:?}");
    }
    // a NaN pseudo-gradient on rank 1: NonFinite on both ranks, global copy untouched, next sync fine
    for exchange in [
        Exchange::Dense,
        Exchange::Bf16,
        Exchange::Dgc(DgcConfig::default().warmup_enabled(false)),
    ] {
        let r = local::run(2, |c| {
            let cfg = LocalSgdConfig::diloco(1).with_exchange(exchange.clone());
            let mut w = vec![1.0f32; 4];
            let mut l = LocalSgd::new(c, cfg, &["w"], &mut [&mut w])?;
            if c.rank() == 1 {
                w[2] = f32::NAN;
            }
            let e = l.step(c, &mut [&mut w]).unwrap_err();
            let untouched = l.global() == [1.0; 4];
            w = vec![0.5; 4];
            l.step(c, &mut [&mut w])?;
            Ok((e, untouched, l.rounds()))
        })
        .unwrap();
        for (e, untouched, rounds) in r {
            assert!(matches!(e, Error::NonFinite { .. }), "{exchange:?}: {e}");
            assert!(untouched && rounds == 1, "{exchange:?}");
        }
    }
}

#[test]
fn bf16_and_dgc_exchanges_are_one_line_and_count_their_bytes() {
    let run = |ex: Exchange| {
        local::run(2, |c| {
            let mut w = vec![0.0f32; 64];
            let mut l = LocalSgd::new(
                c,
                LocalSgdConfig::diloco(1).with_exchange(ex.clone()),
                &["w"],
                &mut [&mut w],
            )?;
            c.reset_stats();
            for (i, x) in w.iter_mut().enumerate() {
                *x -= ((i % 8) as f32 + c.rank() as f32) / 8.0;
            }
            l.step(c, &mut [&mut w])?;
            Ok((w, c.stats()))
        })
        .unwrap()
    };
    let dense = run(Exchange::Dense);
    let bf = run(Exchange::Bf16);
    // these pseudo-gradients are exact in bf16: same result, half the all-reduce bytes (65 values)
    assert_eq!(dense[0].0, bf[0].0);
    assert_eq!(dense[0].1.op(OpKind::AllReduce).bytes_sent, 65 * 4);
    assert_eq!(bf[0].1.op(OpKind::AllReduce).bytes_sent, 65 * 2);
    // DGC keeping every value (density 1, no warm-up/momentum/clipping): the dense average
    let all = DgcConfig::default()
        .final_density(1.0)
        .warmup_enabled(false)
        .momentum_correction(false)
        .clipping(false)
        .momentum_masking(false);
    let d = run(Exchange::Dgc(all));
    assert!(close(&d[0].0, &dense[0].0, 1e-6), "{:?}", d[0].0);
    assert!(d[0].1.op(OpKind::AllGather).calls >= 1);
    // DGC at 1/4 density moves fewer bytes than dense
    let sparse = DgcConfig::default()
        .final_density(0.25)
        .warmup_enabled(false);
    let s = run(Exchange::Dgc(sparse));
    assert!(s[0].1.bytes_sent() < dense[0].1.bytes_sent() * 2);
}

#[test]
fn checkpoint_round_trip_continues_identically() {
    let train = |stop_at: Option<u64>| {
        local::run(2, move |c| {
            let mut w = vec![0.5f32; 6];
            let mut l = LocalSgd::new(c, LocalSgdConfig::edit(2), &["w"], &mut [&mut w])?;
            for s in 1..=8u64 {
                w.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x -= 0.01 * (i as f32 + c.rank() as f32 + s as f32));
                if l.step(c, &mut [&mut w])?.synced {
                    l.layer(c, 0, &mut w)?;
                }
                if stop_at == Some(s) {
                    let json = serde_json::to_string(&l.state()?).unwrap();
                    let st: LocalSgdState = serde_json::from_str(&json).unwrap();
                    l = LocalSgd::from_state(c, st)?;
                }
            }
            Ok((w, l.global().to_vec(), l.rounds()))
        })
        .unwrap()
    };
    assert_eq!(train(None), train(Some(4)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// H = 1, no momentum, outer lr 1: DiLoCo is synchronous SGD, bit for bit, on exactly
    /// representable data (dyadic values, a power-of-two learning rate).
    #[test]
    fn diloco_h1_equals_synchronous_sgd(
        // powers of two: the average of dyadic values is dyadic (with 3 ranks it is not exact)
        world in prop::sample::select(vec![1usize, 2, 4]),
        init in proptest::collection::vec(-64i32..64, 1..12),
        grads in proptest::collection::vec(-64i32..64, 48),
        steps in 1usize..4,
    ) {
        let n = init.len();
        let out = local::run(world, |c| {
            let mut cfg = LocalSgdConfig::diloco(1);
            if let Algorithm::DiLoCo { outer, .. } = &mut cfg.algorithm {
                *outer = Outer::AVERAGE;
                assert_eq!(outer.lr, 1.0);
            }
            let mut w: Vec<f32> = init.iter().map(|&v| v as f32 / 8.0).collect();
            let mut sync = w.clone();
            let mut l = LocalSgd::new(c, cfg, &["w"], &mut [&mut w])?;
            for s in 0..steps {
                let g: Vec<f32> = (0..n)
                    .map(|i| grads[(s * 7 + i * 3 + c.rank() * 11) % grads.len()] as f32 / 16.0)
                    .collect();
                // synchronous SGD: average the gradients, then step
                let mut avg = g.clone();
                c.all_reduce(&mut avg, ReduceOp::Avg)?;
                sync.iter_mut().zip(&avg).for_each(|(x, g)| *x -= 0.5 * g);
                // DiLoCo: step locally, then the outer step
                w.iter_mut().zip(&g).for_each(|(x, g)| *x -= 0.5 * g);
                l.step(c, &mut [&mut w])?;
            }
            Ok((w, sync))
        }).unwrap();
        for (w, sync) in out {
            let wb: Vec<u32> = w.iter().map(|x| x.to_bits()).collect();
            let sb: Vec<u32> = sync.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(wb, sb);
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use ferroccl::kernels::CudaKernels;
    use ferroccl::local_sgd::{gpu, outer};

    fn data(n: usize, k: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(k) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn fused_outer_kernel_matches_the_cpu_twin_bit_for_bit() {
        let k = CudaKernels::new(0).unwrap();
        let s = k.stream().clone();
        for (o, alpha) in [
            (Outer::DILOCO, 0.0f32),
            (Outer::AVERAGE, 0.5),
            (Outer::nesterov(0.3, 0.5), 0.25),
        ] {
            let n = 100_003;
            let (g, l, m) = (data(n, 1), data(n, 2), data(n, 3));
            // host twin
            let mut d = vec![0.0f32; n];
            outer::pseudo_gradient(&g, &l, &mut d);
            let (mut hg, mut hm, mut hl) = (g.clone(), m.clone(), l.clone());
            if !o.has_momentum() {
                hm.clear();
            }
            outer::apply(&o, alpha, &d, &mut hg, &mut hm, &mut hl);
            // device
            let dg0 = s.clone_htod(&g).unwrap();
            let dl0 = s.clone_htod(&l).unwrap();
            let mut dd = s.alloc_zeros::<f32>(n).unwrap();
            gpu::pseudo_gradient(&k, &dg0, &dl0, &mut dd).unwrap();
            let (mut dg, mut dl) = (dg0, dl0);
            let mut dm = if o.has_momentum() {
                s.clone_htod(&m).unwrap()
            } else {
                s.alloc_zeros::<f32>(0).unwrap()
            };
            gpu::apply(&k, &o, alpha, &dd, &mut dg, &mut dm, &mut dl).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(s.clone_dtoh(&dd).unwrap()), bits(d));
            assert_eq!(bits(s.clone_dtoh(&dg).unwrap()), bits(hg));
            assert_eq!(bits(s.clone_dtoh(&dl).unwrap()), bits(hl));
            if o.has_momentum() {
                assert_eq!(bits(s.clone_dtoh(&dm).unwrap()), bits(hm));
            }
        }
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn device_diloco_with_in_process_ranks_equals_the_host_run() {
        let host = local::run(2, |c| {
            let mut w = data(1000, 9);
            let mut l = LocalSgd::new(c, LocalSgdConfig::diloco(2), &["w"], &mut [&mut w])?;
            for s in 0..4 {
                w.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x -= 0.01 * ((i + s + c.rank()) % 7) as f32);
                l.step(c, &mut [&mut w])?;
            }
            Ok(w)
        })
        .unwrap();
        let dev = local::run(2, |c| {
            let k = CudaKernels::new(0)?;
            let s = k.stream().clone();
            let mut w = data(1000, 9);
            let mut dw = s.clone_htod(&w).unwrap();
            let mut d = gpu::DeviceDiloco::new(k, Outer::DILOCO, 2, &dw)?;
            for st in 0..4 {
                w.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x -= 0.01 * ((i + st + c.rank()) % 7) as f32);
                s.memcpy_htod(&w, &mut dw).unwrap();
                d.step(c, &mut dw)?;
                w = s.clone_dtoh(&dw).unwrap();
            }
            Ok(w)
        })
        .unwrap();
        assert_eq!(host, dev);
    }
}
