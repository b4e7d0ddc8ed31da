//! Deep Gradient Compression: hand-computed steps per technique, threshold sampling, wire format,
//! bad input, checkpoints, the dense limit, and (feature `cuda`) the kernels against their CPU twins.

use ferroccl::dgc::{
    select, wire, Dgc, DgcConfig, Exchange, IndexCoding, NonFinite, Selection, ValueFormat,
};
use ferroccl::prelude::*;
use proptest::prelude::*;

/// Only the technique under test: exact top-k, no warm-up, no clipping, no momentum tricks.
fn plain(density: f64) -> DgcConfig {
    DgcConfig::default()
        .final_density(density)
        .warmup_enabled(false)
        .clipping(false)
        .momentum_correction(false)
        .momentum_masking(false)
        .selection(Selection::ExactTopK)
}

/// Run `steps` DGC steps on 2 ranks; `grads[step][rank]`; returns per rank (updates, final state).
fn run2(
    cfg: DgcConfig,
    grads: Vec<[Vec<f32>; 2]>,
) -> Vec<(Vec<Vec<f32>>, ferroccl::dgc::DgcState)> {
    ferroccl::local::run(2, |comm| {
        let n = grads[0][0].len();
        let mut dgc = Dgc::new(n, cfg.clone())?;
        let mut ups = Vec::new();
        for g in &grads {
            let mut x = g[comm.rank()].clone();
            dgc.step(comm, &mut x, 10.0)?;
            ups.push(x);
        }
        Ok((ups, dgc.state().clone()))
    })
    .unwrap()
}

#[test]
fn sparsification_with_local_accumulation() {
    let z = vec![0.0; 8];
    let out = run2(
        plain(0.25), // n = 8 -> k = 2
        vec![
            [
                vec![1.0, -5.0, 0.5, 3.0, 0.0, 0.0, 0.25, 0.0],
                vec![0.0, 2.0, 0.0, 0.0, -4.0, 6.0, 0.0, 1.0],
            ],
            [vec![2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], z.clone()],
        ],
    );
    // Step 1: rank 0 sends (1, -5), (3, 3); rank 1 sends (4, -4), (5, 6); average.
    assert_eq!(out[0].0[0], vec![0.0, -2.5, 0.0, 1.5, -2.0, 3.0, 0.0, 0.0]);
    // Step 2: rank 0's residual [1, 0, 0.5, 0, 0, 0, 0.25, 0] + [2, 0, ...] sends (0, 3), (2, 0.5);
    // rank 1's residual [0, 2, 0, 0, 0, 0, 0, 1] sends (1, 2), (7, 1).
    assert_eq!(out[0].0[1], vec![1.5, 1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.5]);
    assert_eq!(out[0].0, out[1].0, "every rank gets the same update");
    assert_eq!(out[0].1.v, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0]);
    assert_eq!(out[1].1.v, z);
}

#[test]
fn momentum_correction_and_factor_masking() {
    let z = vec![0.0; 8];
    let grads = vec![
        [vec![4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0], z.clone()],
        [vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], z.clone()],
    ];
    let mc = plain(0.25).momentum_correction(true).momentum(0.5);

    // Masking on: step 1 sends (0, 4), (7, -2) and zeroes u and v there: u = v = [0, 1, 0...].
    // Step 2: u = 0.5·u + g = [0, 1.5, ...], v = [0, 2.5, ...]: only index 1 is non-zero.
    let on = run2(mc.clone().momentum_masking(true), grads.clone());
    assert_eq!(on[0].0[0], vec![2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
    assert_eq!(on[0].0[1], vec![0.0, 1.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(on[0].1.u, vec![0.0; 8]);
    assert_eq!(on[0].1.v, vec![0.0; 8]);

    // Masking off: u keeps [4, 1, 0, ..., -2]; step 2: u = [2, 1.5, ..., -1], v = [2, 2.5, ..., -1]:
    // the stale momentum sends index 0 again.
    let off = run2(mc.momentum_masking(false), grads);
    assert_eq!(off[0].0[1], vec![1.0, 1.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(off[0].1.u, vec![2.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
    assert_eq!(off[0].1.v, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
}

#[test]
fn local_gradient_clipping_scales_by_world_size() {
    // ‖g‖ = 5; clip_norm 2·√2 over 2 ranks -> local limit 2 -> scale 0.4.
    let g = vec![3.0, 4.0, 0.0, 0.0];
    let cfg = plain(1.0)
        .clipping(true)
        .clip_norm(2.0 * std::f64::consts::SQRT_2);
    let out = run2(cfg, vec![[g.clone(), g]]);
    let u = &out[0].0[0];
    assert!(
        (u[0] - 1.2).abs() < 1e-6 && (u[1] - 1.6).abs() < 1e-6,
        "{u:?}"
    );
    assert_eq!(
        select::clip_scale(25.0, 100.0, 4),
        1.0,
        "below the limit: untouched"
    );
}

#[test]
fn warm_up_schedule() {
    let cfg = DgcConfig::default();
    let d: Vec<f64> = (0..6).map(|e| cfg.density_at(e as f64)).collect();
    assert_eq!(d, vec![0.25, 0.0625, 0.015625, 0.004, 0.001, 0.001]);
    assert_eq!(cfg.density_at(1.7), 0.0625);
    let dgc = Dgc::new(1000, cfg.clone()).unwrap();
    let k: Vec<usize> = (0..6).map(|e| dgc.k_at(e as f64)).collect();
    assert_eq!(k, vec![250, 63, 16, 4, 1, 1]);
    let off = Dgc::new(1000, cfg.warmup_enabled(false)).unwrap();
    assert_eq!(off.k_at(0.0), 1);
}

fn random_grad(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = select::mix64(s);
            // Heavy-ish tails, like gradients: a product of two uniforms with a random sign.
            let a = (s >> 40) as f32 / (1u64 << 24) as f32;
            let b = ((s >> 16) & 0xFFFFFF) as f32 / (1u64 << 24) as f32;
            let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
            sign * a * a * b
        })
        .collect()
}

/// A compression step whose top k meets heavy exact ties at the k-th largest magnitude: more
/// candidates equal it than the top k has room for, and many lie strictly above it. Gradients of
/// bf16 or f16 precision (8 or 11 significant bits) have such ties everywhere.
struct TieCase {
    name: String,
    g: Vec<f32>,
    p: select::SelectParams,
    /// The count after the first threshold is in the band: the device runs the top k
    /// speculatively (`dgc_topk_select`, or the multi-launch rounds and the host's tie cut);
    /// otherwise after the threshold correction (`DgcKernels::launch_filter`).
    speculative: bool,
    /// The k-th lies at least 2²² ulps above the threshold: the one-launch top k takes its
    /// three-round fallback before cutting the ties.
    three_rounds: bool,
}

/// The update `tie_cases` are compressed with: `u = v = 0` before, so `v' = 0.5·g` exactly and the
/// ties of `g` are ties of `v'`.
const TIE_UPDATE: select::Update = select::Update {
    scale: 0.5,
    momentum: 0.9,
    momentum_correction: true,
};

/// `groups[i] = (count, magnitude, step)`: `count` values `±(magnitude + j·step)` at spread
/// positions, the rest tiny (below 2⁻⁸) and rounded to bf16.
fn small_set(n: usize, groups: &[(usize, f32, f32)], seed: u64) -> Vec<f32> {
    let mut g: Vec<f32> = random_grad(n, seed).iter().map(|x| x * 3e-3).collect();
    wire::quantize(&mut g, ValueFormat::Bf16);
    let mut j = 0usize;
    for &(count, mag, step) in groups {
        for i in 0..count {
            let sign = if select::mix64(seed ^ j as u64) & 1 == 0 {
                1.0
            } else {
                -1.0
            };
            g[(j * 7919) % n] = sign * (mag + i as f32 * step);
            j += 1;
        }
    }
    g
}

/// The heavy-tie cases, on `n = 2^20` elements with `k = 1000`, each checked on the host by
/// `tie_cases_have_heavy_ties_at_the_kth`: (a) gradients rounded to bf16, sampled threshold, eight
/// steps (some corrected, some with fewer than k candidates in the end); (b) 700 values of magnitude 3 and 500 of magnitude 2, exact threshold (= 2, so 1200
/// candidates: in the band, the top k keeps 300 of the 500 ties); (c) the same with 100 more near
/// 1 and a sampled threshold at a step where it lands among those (so the k-th lies more than a
/// half binade above it: the one-launch top k's three-round fallback before the tie cut); (d) 600
/// of magnitude 3 and 2000 of magnitude 2, exact threshold: 2600 candidates, so corrections, and
/// the top k after them keeps 400 of the 2000 ties.
fn tie_cases() -> Vec<TieCase> {
    let (n, k) = (1usize << 20, 1000);
    let p = |sample, step| select::SelectParams {
        k,
        sample,
        seed: 11,
        step,
        upper: 1.3,
        lower: 0.8,
        max_adapt: 8,
    };
    let mut cases = Vec::new();
    for step in 0..8u64 {
        let mut g = random_grad(n, 80 + step);
        wire::quantize(&mut g, ValueFormat::Bf16);
        let p = p(Some(n / 100), step);
        let (mut u, mut v) = (vec![0.0; n], vec![0.0; n]);
        let sel = select::compress(&g, &mut u, &mut v, TIE_UPDATE, &p).unwrap();
        cases.push(TieCase {
            name: format!("bf16 gradient, step {step}"),
            g,
            p,
            speculative: sel.adaptations == 0,
            three_rounds: false,
        });
    }
    cases.push(TieCase {
        name: "700 x 3, 500 x 2, exact threshold".into(),
        g: small_set(n, &[(700, 3.0, 0.0), (500, 2.0, 0.0)], 90),
        p: p(None, 0),
        speculative: true,
        three_rounds: false,
    });
    let g = small_set(n, &[(700, 3.0, 0.0), (500, 2.0, 0.0), (100, 1.0, 1e-3)], 91);
    let step = (0..256)
        .find(|&step| {
            let (mut u, mut v) = (vec![0.0; n], vec![0.0; n]);
            let sel = select::compress(&g, &mut u, &mut v, TIE_UPDATE, &p(Some(n / 100), step));
            let sel = sel.unwrap();
            sel.adaptations == 0 && sel.first_count > k && sel.threshold < 0.6
        })
        .expect("no step whose sampled threshold lands among the values near 1");
    cases.push(TieCase {
        name: format!("700 x 3, 500 x 2, 100 near 1, sampled threshold near 1 (step {step})"),
        g,
        p: p(Some(n / 100), step),
        speculative: true,
        three_rounds: true,
    });
    cases.push(TieCase {
        name: "600 x 3, 2000 x 2, exact threshold, corrections".into(),
        g: small_set(n, &[(600, 3.0, 0.0), (2000, 2.0, 0.0)], 92),
        p: p(None, 0),
        speculative: false,
        three_rounds: false,
    });
    cases
}

/// The CPU twin on `tie_cases`: each case really has the ties it is meant to have (so the GPU test
/// `gpu_compress_step_cuts_exact_ties` cannot pass vacuously), takes the path it is meant to take,
/// and the twin keeps every candidate above the k-th largest magnitude and the lowest-index ties.
#[test]
fn tie_cases_have_heavy_ties_at_the_kth() {
    let cases = tie_cases();
    let mut bf16_cut = 0;
    for c in &cases {
        let n = c.g.len();
        let k = c.p.k;
        let (mut u, mut v) = (vec![0.0; n], vec![0.0; n]);
        let sel = select::compress(&c.g, &mut u, &mut v, TIE_UPDATE, &c.p).unwrap();
        let ctx = &c.name;
        assert_eq!(sel.adaptations == 0, c.speculative, "{ctx}: {sel:?}");
        // v' = 0.5·g exactly, nothing masked yet.
        assert!(v.iter().zip(&c.g).all(|(a, b)| *a == 0.5 * b), "{ctx}");
        if sel.idx.len() < k {
            // A bf16 step whose final count is below k (within the band): every candidate is
            // sent, there is no top k to cut.
            assert!(ctx.starts_with("bf16"), "{ctx}: {sel:?}");
            let cand = v
                .iter()
                .filter(|x| select::passes(**x, sel.threshold))
                .count();
            assert_eq!(sel.idx.len(), cand, "{ctx}");
            continue;
        }
        assert_eq!(sel.idx.len(), k, "{ctx}");
        let kth = sel
            .val
            .iter()
            .map(|x| x.abs())
            .fold(f32::INFINITY, f32::min);
        if c.speculative {
            assert!(
                sel.first_count > k && sel.first_count <= 1300,
                "{ctx}: {sel:?}"
            );
            let far = kth.to_bits() - sel.threshold.to_bits() >= 1 << 22;
            assert_eq!(
                far, c.three_rounds,
                "{ctx}: k-th {kth}, threshold {}",
                sel.threshold
            );
        }
        let above: Vec<u32> = (0..n as u32)
            .filter(|&i| v[i as usize].abs() > kth)
            .collect();
        let ties: Vec<u32> = (0..n as u32)
            .filter(|&i| v[i as usize].abs() == kth)
            .collect();
        let keep = k - above.len();
        assert!(ties.len() > keep, "{ctx}: {} ties, {keep} kept", ties.len());
        // The twin: all of `above`, then the lowest `keep` tie indices.
        let mut want: Vec<u32> = above
            .iter()
            .copied()
            .chain(ties[..keep].iter().copied())
            .collect();
        want.sort_unstable();
        assert_eq!(sel.idx, want, "{ctx}");
        if ctx.starts_with("bf16") {
            bf16_cut += usize::from(c.speculative && above.len() >= k / 2);
        } else {
            assert!(
                above.len() >= 600 && ties.len() >= 500,
                "{ctx}: {} above",
                above.len()
            );
        }
        eprintln!(
            "{ctx}: {} candidates first, {} above the k-th ({kth}), {} ties of which {keep} kept, \
             threshold {}, {} corrections",
            sel.first_count,
            above.len(),
            ties.len(),
            sel.threshold,
            sel.adaptations
        );
    }
    assert!(
        bf16_cut >= 2,
        "too few bf16 steps with a speculative top k that cuts ties"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// The CPU twin's top k of unordered candidates (`finish_selection`, which the device's top k
    /// must equal as a set), with many exact ties: every candidate above the k-th largest
    /// magnitude, then those equal to it by lower index, the result ascending by index.
    #[test]
    fn finish_selection_keeps_all_above_and_lowest_index_ties(
        pairs in proptest::collection::vec((0u8..4, any::<bool>()), 1..300)
            .prop_map(|v| v.into_iter().enumerate().collect::<Vec<_>>())
            .prop_shuffle(),
        k in 1usize..320,
    ) {
        let (mut idx, mut val): (Vec<u32>, Vec<f32>) = pairs
            .iter()
            .map(|&(i, (m, neg))| {
                let x = f32::from(1u8 << m) * 0.5;
                (i as u32 * 3 + 1, if neg { -x } else { x })
            })
            .unzip();
        let mut want: Vec<(u32, f32)> = idx.iter().copied().zip(val.iter().copied()).collect();
        want.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
        want.truncate(k);
        let kth = want.last().map_or(0.0, |p| p.1.abs());
        want.sort_by_key(|p| p.0);
        select::finish_selection(&mut idx, &mut val, k);
        let got: Vec<(u32, f32)> = idx.iter().copied().zip(val.iter().copied()).collect();
        prop_assert_eq!(got.len(), k.min(pairs.len()));
        prop_assert!(idx.windows(2).all(|w| w[0] < w[1]));
        // Every candidate above the k-th is in; a tie is out only if every tie in has a lower index.
        for &(i, (m, _)) in &pairs {
            let (i, x) = (i as u32 * 3 + 1, f32::from(1u8 << m) * 0.5);
            let sent = idx.binary_search(&i).is_ok();
            if x > kth {
                prop_assert!(sent, "{} above the k-th {} not sent", i, kth);
            } else if x == kth && !sent {
                prop_assert!(got.iter().all(|p| p.1.abs() > kth || p.0 < i));
            }
        }
        prop_assert_eq!(got, want);
    }
}

#[test]
fn sampled_threshold_stays_in_the_correction_band() {
    let n = 200_000;
    let k = 200; // 0.1%
    let up = select::Update {
        scale: 1.0,
        momentum: 0.9,
        momentum_correction: false,
    };
    for seed in 0..8u64 {
        let g = random_grad(n, seed + 100);
        let mut exact_mags: Vec<f32> = g.iter().map(|x| x.abs()).collect();
        let exact_thr = select::kth_largest(&mut exact_mags, k);
        let p = select::SelectParams {
            k,
            sample: Some(n / 100),
            seed,
            step: seed,
            upper: 1.3,
            lower: 0.8,
            max_adapt: 8,
        };
        let (mut u, mut v) = (vec![0.0; n], vec![0.0; n]);
        let sel = select::compress(&g, &mut u, &mut v, up, &p).unwrap();
        assert!(
            sel.idx.len() <= k && sel.idx.len() as f64 >= 0.8 * k as f64,
            "seed {seed}: {} selected for k = {k} (first estimate passed {})",
            sel.idx.len(),
            sel.first_count
        );
        // Everything sent is among the largest: at least 0.8k of the exact top k.
        let in_exact = sel.val.iter().filter(|x| x.abs() >= exact_thr).count();
        assert!(in_exact as f64 >= 0.8 * k as f64, "seed {seed}: {in_exact}");
        assert!(sel.idx.windows(2).all(|w| w[0] < w[1]), "ascending");

        let pe = select::SelectParams { sample: None, ..p };
        let (mut u, mut v) = (vec![0.0; n], vec![0.0; n]);
        let ex = select::compress(&g, &mut u, &mut v, up, &pe).unwrap();
        assert_eq!(ex.idx.len(), k);
        assert!(ex.val.iter().all(|x| x.abs() >= exact_thr));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn wire_roundtrip(
        set in proptest::collection::btree_map(0u32..5_000_000, -1e6f32..1e6, 0..200),
        delta in any::<bool>(),
        bf in any::<bool>(),
        pad in 0usize..5,
    ) {
        let idx: Vec<u32> = set.keys().copied().collect();
        let val: Vec<f32> = set.values().copied().collect();
        let coding = if delta { IndexCoding::DeltaVarint } else { IndexCoding::U32 };
        let values = if bf { ValueFormat::Bf16 } else { ValueFormat::F32 };
        let pad_to = (!delta && pad > 0).then_some(idx.len() + pad);
        let mut msg = Vec::new();
        wire::encode(&idx, &val, coding, values, pad_to, &mut msg).unwrap();
        if let Some(p) = pad_to {
            prop_assert_eq!(msg.len(), wire::fixed_len(p, values));
        }
        msg.extend_from_slice(&[0, 0, 0]); // gather padding is allowed
        let mut got = Vec::new();
        let cnt = wire::decode(&msg, 5_000_000, coding, values, |i, x| got.push((i, x))).unwrap();
        prop_assert_eq!(cnt, idx.len());
        let mut want = val.clone();
        wire::quantize(&mut want, values);
        let want: Vec<(u32, f32)> = idx.iter().copied().zip(want).collect();
        prop_assert_eq!(got, want);
        // Any index out of range is caught.
        if let Some(&last) = idx.last() {
            let r = wire::decode(&msg, last as usize, coding, values, |_, _| ());
            prop_assert!(r.is_err());
        }
    }
}

#[test]
fn delta_varint_is_compact_and_needs_counts() {
    let idx: Vec<u32> = (0..1000).map(|i| i * 1000).collect();
    let val = vec![1.0f32; 1000];
    let mut msg = Vec::new();
    wire::encode(
        &idx,
        &val,
        IndexCoding::DeltaVarint,
        ValueFormat::Bf16,
        None,
        &mut msg,
    )
    .unwrap();
    assert_eq!(msg.len(), 4 + 1 + 999 * 2 + 1000 * 2); // 1000 < 2^14: two varint bytes
    assert!(DgcConfig::default()
        .index_coding(IndexCoding::DeltaVarint)
        .validate()
        .is_err());
    assert!(DgcConfig::default().compact().validate().is_ok());
    assert!(wire::decode(
        &msg[..msg.len() - 1],
        1 << 20,
        IndexCoding::DeltaVarint,
        ValueFormat::Bf16,
        |_, _| {}
    )
    .is_err());
}

#[test]
fn compact_wire_format_gives_the_same_update() {
    // Values exactly representable in bf16, so both formats must agree exactly.
    let g0: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 - 32.0).collect();
    let g1: Vec<f32> = (0..64).map(|i| ((i * 11) % 64) as f32 - 30.0).collect();
    let base = plain(0.125)
        .momentum_correction(true)
        .momentum_masking(true);
    let a = run2(base.clone(), vec![[g0.clone(), g1.clone()]]);
    let b = run2(base.compact(), vec![[g0, g1]]);
    assert_eq!(a[0].0, b[0].0);
    assert_eq!(a[1].1, {
        let mut s = b[1].1.clone();
        s.config = a[1].1.config.clone();
        s
    });
}

#[test]
fn bytes_and_compression_ratio() {
    let n = 100_000;
    let out = ferroccl::local::run(4, |comm| {
        let mut dgc = Dgc::new(n, DgcConfig::default().warmup_enabled(false))?;
        let mut g = random_grad(n, comm.rank() as u64);
        dgc.step(comm, &mut g, 0.0)
    })
    .unwrap();
    let s = out[0];
    assert_eq!(s.k, 100);
    assert_eq!(s.message_bytes, 4 + 100 * 8);
    assert!((s.compression_ratio - 400_000.0 / 804.0).abs() < 1e-9);
    assert_eq!(
        s.bytes_sent,
        3 * 804,
        "ring all-gather: (N-1) messages per rank"
    );
    let compact = ferroccl::local::run(4, |comm| {
        let mut dgc = Dgc::new(n, DgcConfig::default().warmup_enabled(false).compact())?;
        let mut g = random_grad(n, comm.rank() as u64);
        dgc.step(comm, &mut g, 0.0)
    })
    .unwrap();
    assert!(compact[0].compression_ratio > 900.0, "{:?}", compact[0]);
}

#[test]
fn non_finite_gradient_is_an_error_and_leaves_the_state_alone() {
    ferroccl::local::run(1, |comm| {
        let mut g = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut d = Dgc::new(6, plain(0.5).momentum_correction(true))?;
        d.step(comm, &mut g, 0.0)?;
        let before = d.state().clone();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut g = vec![1.0, bad, 3.0, 4.0, 5.0, 6.0];
            let e = d.step(comm, &mut g, 0.0).unwrap_err();
            assert!(
                e.to_string().contains("non-finite") && e.to_string().contains("index 1"),
                "{e}"
            );
            assert_eq!(d.state(), &before, "residual not poisoned");
        }
        let mut g = vec![1.0; 6];
        d.step(comm, &mut g, 0.0)?; // later steps work
        assert!(d.state().v.iter().all(|x| x.is_finite()));
        Ok(())
    })
    .unwrap();
}

#[test]
fn skip_policy_skips_on_every_rank() {
    for exchange in [Exchange::FixedK, Exchange::CountsThenGather] {
        let cfg = plain(0.5)
            .momentum_correction(true)
            .non_finite(NonFinite::SkipStep)
            .exchange(exchange);
        let out = ferroccl::local::run(2, |comm| {
            let mut dgc = Dgc::new(4, cfg.clone())?;
            let mut g = vec![1.0, -2.0, 3.0, 0.5];
            dgc.step(comm, &mut g, 0.0)?;
            let before = dgc.state().clone();
            let mut g = if comm.rank() == 0 {
                vec![1.0, f32::NAN, 0.0, 0.0]
            } else {
                vec![7.0, 7.0, 7.0, 7.0]
            };
            let s = dgc.step(comm, &mut g, 0.0)?;
            assert!(s.skipped);
            assert_eq!(g, vec![0.0; 4], "zero update");
            assert_eq!(
                dgc.state(),
                &before,
                "state unchanged on rank {}",
                comm.rank()
            );
            let mut g = vec![1.0; 4];
            let s = dgc.step(comm, &mut g, 0.0)?;
            assert!(!s.skipped);
            Ok(g)
        })
        .unwrap();
        assert_eq!(out[0], out[1]);
    }
}

#[test]
fn checkpoint_restore_gives_the_identical_next_step() {
    let n = 5000;
    let out = ferroccl::local::run(2, |comm| {
        let mut dgc = Dgc::new(n, DgcConfig::default())?;
        for s in 0..3 {
            let mut g = random_grad(n, 10 * s + comm.rank() as u64);
            dgc.step(comm, &mut g, s as f64)?;
        }
        let json = serde_json::to_string(dgc.state()).unwrap();
        let mut restored = Dgc::from_state(serde_json::from_str(&json).unwrap())?;
        let g = random_grad(n, 99 + comm.rank() as u64);
        let (mut a, mut b) = (g.clone(), g);
        let sa = dgc.step(comm, &mut a, 3.0)?;
        let sb = restored.step(comm, &mut b, 3.0)?;
        assert_eq!(sa.selected, sb.selected);
        assert_eq!(dgc.state(), restored.state());
        Ok(a == b)
    })
    .unwrap();
    assert!(out.iter().all(|&same| same));
    // A poisoned checkpoint is refused.
    let mut st = Dgc::new(3, DgcConfig::default()).unwrap().state().clone();
    st.v[2] = f32::NAN;
    assert!(Dgc::from_state(st).is_err());
}

#[test]
fn density_one_without_momentum_correction_equals_dense_all_reduce() {
    for exchange in [Exchange::FixedK, Exchange::CountsThenGather] {
        let out = ferroccl::local::run(4, |comm| {
            let n = 1000;
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + comm.rank() * 13) % 41) as f32 - 20.0)
                .collect();
            let mut dense = g.clone();
            comm.all_reduce(&mut dense, ReduceOp::Avg)?;
            let mut dgc = Dgc::new(
                n,
                plain(1.0).exchange(exchange).selection(Selection::Sampled),
            )?;
            let mut x = g;
            dgc.step(comm, &mut x, 0.0)?;
            assert!(
                dgc.state().v.iter().all(|&r| r == 0.0),
                "nothing left behind"
            );
            Ok(x == dense)
        })
        .unwrap();
        assert!(out.iter().all(|&eq| eq), "{exchange:?}");
    }
    // And the dense baseline switch is the all-reduce itself.
    let out = ferroccl::local::run(2, |comm| {
        let mut dgc = Dgc::new(3, DgcConfig::default().sparsify(false))?;
        let mut g = vec![comm.rank() as f32; 3];
        let s = dgc.step(comm, &mut g, 0.0)?;
        assert_eq!(s.compression_ratio, 1.0);
        Ok(g)
    })
    .unwrap();
    assert_eq!(out[0], vec![0.5; 3]);
}

#[test]
fn wrong_lengths_and_bad_configs_are_errors() {
    assert!(Dgc::new(4, DgcConfig::default().final_density(0.0)).is_err());
    assert!(Dgc::new(4, DgcConfig::default().warmup(vec![0.5, 2.0])).is_err());
    assert!(Dgc::new(4, DgcConfig::default().momentum(1.0)).is_err());
    ferroccl::local::run(1, |comm| {
        let mut d = Dgc::new(4, DgcConfig::default())?;
        assert!(d.step(comm, &mut [1.0; 3], 0.0).is_err());
        Ok(())
    })
    .unwrap();
}

/// The fused kernel and its CPU twin agree bit for bit (u, v, candidate set), then the whole GPU
/// compression step matches the host step.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU"]
fn gpu_kernels_match_cpu_twins() {
    use ferroccl::dgc::gpu::DgcKernels;
    let k = DgcKernels::new(0).unwrap();
    for &(n, mc, scale) in &[
        (1usize << 20, true, 1.0f32),
        (1_000_003, false, 0.37),
        (37, true, 0.5),
    ] {
        let g = random_grad(n, n as u64);
        let u0 = random_grad(n, 7);
        let v0 = random_grad(n, 8);
        let up = select::Update {
            scale,
            momentum: 0.9,
            momentum_correction: mc,
        };
        // Sample.
        let s = (n / 100).max(1);
        let mut cs = vec![0.0; s];
        select::sample_magnitudes(&g, &u0, &v0, up, 5, 3, &mut cs);
        let gs = k.sample(&g, &u0, &v0, up, 5, 3, s).unwrap();
        assert_eq!(cs, gs, "sample n={n}");
        // k-th largest of the sample.
        let rank = (s / 10).max(1);
        let thr_gpu = k.kth_largest(&gs, rank).unwrap();
        let thr_cpu = select::kth_largest(&mut cs.clone(), rank);
        assert_eq!(thr_cpu, thr_gpu);
        // Fused pass.
        let (mut cu, mut cv) = (u0.clone(), v0.clone());
        let (mut ci, mut cx) = (Vec::new(), Vec::new());
        let cap = n;
        let ccount =
            select::fused_update_select(&g, &mut cu, &mut cv, up, thr_cpu, cap, &mut ci, &mut cx);
        let (gu, gv, mut gi, mut gx, gcount) = k.fused(&g, &u0, &v0, up, thr_gpu, cap).unwrap();
        assert_eq!(ccount, gcount);
        assert!(cu == gu && cv == gv, "u/v bit-identical, n={n}");
        select::finish_selection(&mut gi, &mut gx, usize::MAX);
        assert_eq!((ci, cx), (gi, gx));
        // Sum of squares (f64, different order: tolerance), the clip scale from it, finiteness.
        let a = select::sum_squares(&g);
        let (b, scale, bad) = k.check_norm(&g, 0.01).unwrap();
        assert!(((a - b) / a).abs() < 1e-12);
        assert_eq!(bad, None);
        assert_eq!(scale, select::clip_scale(b, 0.01, 1));
        let mut gbad = g.clone();
        gbad[n - 1] = f32::INFINITY;
        gbad[n / 2] = f32::NAN;
        assert_eq!(k.check_norm(&gbad, 0.0).unwrap().2, Some(n / 2));
        // The multi-block radix select at several ranks, with ties.
        let mut ties = g.clone();
        for x in ties.iter_mut().step_by(3) {
            *x = 0.25;
        }
        for rank in [1, 2, n / 3 + 1, n] {
            let got = k.kth_largest(&ties, rank).unwrap();
            let mut abs: Vec<f32> = ties.iter().map(|x| x.abs()).collect();
            assert_eq!(
                got,
                select::kth_largest(&mut abs, rank),
                "rank {rank} of {n}"
            );
        }
    }
}

/// The whole device compression (`compress_step`: speculative top k and masking in the common case,
/// the correction path otherwise) against `select::compress` + `mask_sent` on the host.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU"]
fn gpu_compress_step_matches_host() {
    use ferroccl::dgc::gpu::DgcKernels;
    let kern = DgcKernels::new(0).unwrap();
    let n = 1 << 20;
    let up = select::Update {
        scale: 0.5,
        momentum: 0.9,
        momentum_correction: true,
    };
    let params = |step, lower, k| select::SelectParams {
        k,
        sample: Some(n / 100),
        seed: 3,
        step,
        upper: 1.3,
        lower,
        max_adapt: 8,
    };
    // Cases where the speculative top k had to drop candidates (more than k in the band).
    let mut dropped = [0; 3];
    // lower = 0.999 forces corrections on most steps; 0.8 is the paper's band.
    // k = 1001 makes the sample's rank ⌈k·s/n⌉ round up to 11 (of 10 485), so about 1.1 k candidates
    // pass and the top k must drop some.
    for (step, lower, k) in [
        (0u64, 0.8, 1000),
        (1, 0.8, 1001),
        (2, 0.999, 1000),
        (3, 0.8, 1001),
        (4, 0.8, 1000),
        (5, 0.8, 1001),
    ] {
        let g = random_grad(n, 40 + step);
        let (u0, v0) = (random_grad(n, 50 + step), random_grad(n, 60 + step));
        compress_step_three_ways(
            &kern,
            &g,
            &u0,
            &v0,
            up,
            &params(step, lower, k),
            &mut dropped,
            &mut [0; 3],
        );
    }
    assert!(
        dropped.iter().all(|&d| d > 0),
        "no case selected among more than k candidates: {dropped:?}"
    );
    // A gap at the k-th largest: k values of magnitude 100-199 and k/4 near 1, the rest tiny. When
    // the sample catches fewer large ones than its rank, the estimated threshold is ~1, 1.25 k
    // candidates pass (within the band) and the k-th of them (~100) lies far beyond the offsets that
    // the two-round top k resolves above the threshold: the kernel must fall back to three rounds.
    // The sample depends on the step, so find (on the host) a step where that happens.
    let k = 1000;
    let mut g: Vec<f32> = random_grad(n, 70).iter().map(|x| x * 1e-3).collect();
    for j in 0..k + k / 4 {
        let at = (j * 7919) % n;
        let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
        g[at] = sign
            * if j < k {
                100.0 + (j % 100) as f32
            } else {
                1.0 + j as f32 * 1e-6
            };
    }
    let zeros = vec![0.0f32; n];
    let step = (0..64)
        .find(|&step| {
            let (mut cu, mut cv) = (zeros.clone(), zeros.clone());
            let p = params(step, 0.8, k);
            let sel = select::compress(&g, &mut cu, &mut cv, up, &p).unwrap();
            sel.adaptations == 0 && sel.first_count > k
        })
        .expect("no step whose sample misses enough of the large values");
    let (mut cu, mut cv) = (zeros.clone(), zeros.clone());
    let sel = select::compress(&g, &mut cu, &mut cv, up, &params(step, 0.8, k)).unwrap();
    let smallest = sel
        .val
        .iter()
        .map(|x| x.abs())
        .fold(f32::INFINITY, f32::min);
    assert!(
        smallest > 10.0,
        "the k-th ({smallest}) is not beyond the two-round range"
    );
    let mut gap = [0; 3];
    compress_step_three_ways(
        &kern,
        &g,
        &zeros,
        &zeros,
        up,
        &params(step, 0.8, k),
        &mut gap,
        &mut [0; 3],
    );
    assert_eq!(gap, [1; 3], "the gap case must run the top k on the device");
}

/// One `compress_step` case against `select::compress` + `mask_sent` on the host, run each way the
/// selects can run: one launch each with and without programmatic dependent launch (cooperative
/// then), and one launch per round. Besides the same selected pairs, threshold, `u` and `v`: exactly
/// `min(candidates, k)` pairs are selected (`CTL_SEL + CTL_TIES` of them on the device), among them
/// every candidate above the k-th largest magnitude. `dropped[way]` counts the cases whose top k ran
/// on the device and dropped candidates, `cut[way]` those whose top k (speculative or not) had more
/// ties at the k-th than room and cut them (`CTL_EQ > CTL_KEEP`).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn compress_step_three_ways(
    kern: &ferroccl::dgc::gpu::DgcKernels,
    g: &[f32],
    u0: &[f32],
    v0: &[f32],
    up: select::Update,
    p: &select::SelectParams,
    dropped: &mut [usize; 3],
    cut: &mut [usize; 3],
) {
    use ferroccl::dgc::gpu::{CTL_EQ, CTL_KEEP, CTL_KTH, CTL_SEL, CTL_TIES};
    let n = g.len();
    let (mut cu, mut cv) = (u0.to_vec(), v0.to_vec());
    let sel = select::compress(g, &mut cu, &mut cv, up, p).unwrap();
    // Every candidate above the k-th largest magnitude is sent (every candidate, when the host
    // selected fewer than k).
    let full = sel.idx.len() == p.k;
    let kth = sel
        .val
        .iter()
        .map(|x| x.abs())
        .fold(f32::INFINITY, f32::min);
    let above: Vec<u32> = (0..n as u32)
        .filter(|&i| {
            let x = cv[i as usize];
            if full {
                x.abs() > kth
            } else {
                select::passes(x, sel.threshold)
            }
        })
        .collect();
    select::mask_sent(&mut cu, &mut cv, &sel.idx, &sel.val, true);
    for (mode, (one_launch, pdl)) in [(true, true), (true, false), (false, false)]
        .into_iter()
        .enumerate()
    {
        kern.set_one_launch_select(one_launch);
        kern.set_pdl(pdl);
        let gd = kern.upload(g).unwrap();
        let (mut gu, mut gv) = (kern.upload(u0).unwrap(), kern.upload(v0).unwrap());
        let mut ws = kern.workspace(p.k, 1300, n / 100).unwrap();
        let (c, got) = kern
            .compress_step(&gd, &mut gu, &mut gv, up, None, p, true, &mut ws, None)
            .unwrap();
        let ctl = kern.read_ctl(&ws).unwrap();
        let mut i = kern.download(&ws.sel_idx).unwrap();
        let mut x = kern.download(&ws.sel_val).unwrap();
        i.truncate(got);
        x.truncate(got);
        select::finish_selection(&mut i, &mut x, usize::MAX);
        let ctx = format!(
            "one launch {one_launch}, pdl {pdl}, step {}, lower {}, k {}, {c:?}, ctl {ctl:?}",
            p.step, p.lower, p.k
        );
        assert_eq!(got, c.count.min(p.k), "{ctx}");
        assert_eq!((ctl[CTL_SEL] + ctl[CTL_TIES]) as usize, got, "{ctx}");
        assert!(
            above.iter().all(|a| i.binary_search(a).is_ok()),
            "a candidate above the k-th ({kth}) was not sent, {ctx}"
        );
        assert_eq!((&i, &x), (&sel.idx, &sel.val), "{ctx}");
        assert_eq!(c.threshold, sel.threshold, "{ctx}");
        assert!(kern.download(&gu).unwrap() == cu, "u, {ctx}");
        assert!(kern.download(&gv).unwrap() == cv, "v, {ctx}");
        dropped[mode] += usize::from(c.top_k_done && c.count > p.k);
        cut[mode] += usize::from(ctl[CTL_KTH] != 0 && ctl[CTL_EQ] > ctl[CTL_KEEP]);
    }
}

/// The device top k with heavy exact ties at the k-th largest magnitude (`tie_cases`: bf16-rounded
/// gradients, and values from a small set), each way the selects run, on the speculative path
/// (two-round and three-round one-launch top k; the multi-launch rounds, whose ties the host cuts
/// after the read-back) and after corrections: the selected set is the host twin's (every candidate
/// above the k-th, then the lowest-index ties), exactly k pairs, `u` and `v` bit for bit.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU"]
fn gpu_compress_step_cuts_exact_ties() {
    use ferroccl::dgc::gpu::DgcKernels;
    let kern = DgcKernels::new(0).unwrap();
    let (mut spec, mut corrected) = ([0; 3], [0; 3]);
    for c in tie_cases() {
        let n = c.g.len();
        let zeros = vec![0.0f32; n];
        let (mut dropped, mut cut) = ([0; 3], [0; 3]);
        eprintln!("{}", c.name);
        compress_step_three_ways(
            &kern,
            &c.g,
            &zeros,
            &zeros,
            TIE_UPDATE,
            &c.p,
            &mut dropped,
            &mut cut,
        );
        if !c.name.starts_with("bf16") {
            assert_eq!(cut, [1; 3], "{}: the device top k did not cut ties", c.name);
            let want = if c.speculative { [1; 3] } else { [0; 3] };
            assert_eq!(dropped, want, "{}: speculative top k", c.name);
        }
        for w in 0..3 {
            spec[w] += usize::from(c.speculative) * cut[w];
            corrected[w] += usize::from(!c.speculative) * cut[w];
        }
    }
    // bf16 steps included: tie cuts on both paths, each way.
    assert!(
        spec.iter().all(|&s| s >= 4),
        "speculative tie cuts {spec:?}"
    );
    assert!(
        corrected.iter().all(|&s| s >= 2),
        "tie cuts after corrections {corrected:?}"
    );
}

/// The device step (`DeviceDgc`, gradient and state on the GPU) against the host step (`Dgc`) on
/// 2–4 in-process ranks sharing one GPU, over several steps through the warm-up, for several
/// configurations. While every step's clip scale is the same on both (the device sums `g²` in
/// another order, so the scale can differ in its last bit), updates, `u`, `v` and the statistics
/// must be bit-identical; after a differing scale, within 1e-5 relative. Also: a checkpoint taken on
/// the device and resumed mid-run, and a non-finite gradient under both policies.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU"]
fn device_step_matches_host_step() {
    use ferroccl::dgc::gpu::{DeviceDgc, DgcKernels};
    use std::sync::Arc;
    let n = 100_003;
    let cfgs = [
        DgcConfig::default().clip_norm(1.0),
        DgcConfig::default().compact().clip_norm(1.0),
        DgcConfig::default().non_finite(NonFinite::SkipStep),
        plain(0.01).momentum_correction(true).momentum_masking(true),
    ];
    for (ci, cfg) in cfgs.iter().enumerate() {
        for world in [2usize, 3, 4] {
            let skip = cfg.non_finite == NonFinite::SkipStep;
            ferroccl::local::run(world, |comm| {
                let kern = Arc::new(DgcKernels::new(0)?);
                let mut host = Dgc::new(n, cfg.clone())?;
                let mut dev = DeviceDgc::new(kern.clone(), n, cfg.clone())?;
                let mut exact = true;
                for step in 0..7u64 {
                    let epoch = step as f64;
                    let mut g = random_grad(n, 1000 * ci as u64 + 10 * step + comm.rank() as u64);
                    if skip && step == 3 && comm.rank() == world - 1 {
                        g[17] = f32::NAN;
                    }
                    if step == 4 {
                        // Checkpoint on the device, resume from it.
                        let st = dev.state()?;
                        assert_eq!(st, host.state().clone(), "checkpoint before step {step}");
                        dev = DeviceDgc::from_state(kern.clone(), st)?;
                    }
                    let mut dg = kern.upload(&g)?;
                    let hs = host.step(comm, &mut g, epoch)?;
                    let ds = dev.step(comm, &mut dg, epoch)?;
                    let du = kern.download(&dg)?;
                    exact &= hs.clip_scale == ds.clip_scale;
                    let ctx = format!("cfg {ci}, world {world}, step {step}, rank {}", comm.rank());
                    assert_eq!(hs.skipped, ds.skipped, "{ctx}");
                    assert_eq!(hs.skipped, skip && step == 3, "{ctx}");
                    let dst = dev.state()?;
                    if exact {
                        assert_eq!(hs, ds, "stats, {ctx}");
                        assert!(
                            g.iter().zip(&du).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "update, {ctx}"
                        );
                        assert_eq!(&dst, host.state(), "state, {ctx}");
                    } else {
                        assert_eq!((hs.k, hs.message_bytes), (ds.k, ds.message_bytes), "{ctx}");
                        let close = |a: &[f32], b: &[f32]| {
                            let m = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
                            a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * m)
                        };
                        assert!(close(&g, &du), "update, {ctx}");
                        assert!(close(&host.state().v, &dst.v), "v, {ctx}");
                        assert!(close(&host.state().u, &dst.u), "u, {ctx}");
                    }
                }
                // Error policy: a bad gradient is an error naming the index; the state is unchanged.
                if !skip {
                    let before = dev.state()?;
                    let mut g = random_grad(n, 99);
                    g[12345] = f32::INFINITY;
                    let mut dg = kern.upload(&g)?;
                    let e = dev.step(comm, &mut dg, 9.0).unwrap_err().to_string();
                    assert!(e.contains("12345"), "{e}");
                    assert_eq!(dev.state()?, before);
                }
                Ok(())
            })
            .unwrap();
        }
    }
}

/// dgc.cu compiles with NVRTC without errors or warnings (no GPU needed, only libnvrtc).
#[cfg(feature = "cuda")]
#[test]
fn dgc_cu_compiles_with_nvrtc() {
    // Runs wherever libnvrtc loads (CI installs it from PyPI); skips otherwise, except that
    // FERROCCL_REQUIRE_NVRTC=1 (CI) turns the skip into a failure, as tests/kernels.rs does.
    if !ferroccl::kernels::cuda::nvrtc_available() {
        assert_ne!(
            std::env::var("FERROCCL_REQUIRE_NVRTC").as_deref(),
            Ok("1"),
            "FERROCCL_REQUIRE_NVRTC=1 but libnvrtc.so.13 cannot be loaded (LD_LIBRARY_PATH)"
        );
        eprintln!("SKIPPED dgc_cu_compiles_with_nvrtc: libnvrtc.so.13 not found");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = ferroccl::dgc::gpu::compile_ptx(arch).unwrap().to_src();
        // Every kernel the host loads is defined (a missing one only fails at load time on a GPU).
        for name in ferroccl::dgc::gpu::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: no kernel {name}"
            );
        }
    }
}

/// Issue 19: a finite gradient whose step would produce a non-finite state or value.
fn overflowing_steps() -> Vec<(&'static str, DgcConfig, Vec<f32>)> {
    vec![
        (
            "momentum overflow with clipping off",
            plain(0.25).momentum_correction(true),
            vec![0.0, 2e38, 2e38, 0.0],
        ),
        (
            "bf16 rounds a finite value to Inf",
            plain(0.25).momentum(0.0).values(ValueFormat::Bf16),
            vec![f32::MAX, 0.0, 0.0, 0.0],
        ),
    ]
}

/// A gradient the state can take after either case: it cancels most of the large momentum of the
/// momentum case (whose residual alone would overflow again with any small gradient).
fn recover(bf16: bool) -> Vec<f32> {
    if bf16 {
        vec![1.0; 4]
    } else {
        vec![1.0, -2e38, -2e38, 1.0]
    }
}

#[test]
fn a_finite_gradient_that_overflows_the_state_is_caught_under_both_policies() {
    for (name, cfg, g) in overflowing_steps() {
        // Error policy: a named error, the state exactly as before the step, later steps fine.
        ferroccl::local::run(1, |comm| {
            let mut d = Dgc::new(4, cfg.clone())?;
            let mut first = g.clone();
            // the momentum case overflows on its second step, the bf16 case on its first
            let bf16 = cfg.values == ValueFormat::Bf16;
            if !bf16 {
                d.step(comm, &mut first, 0.0)?;
            }
            let before = d.state().clone();
            let mut x = g.clone();
            let e = d.step(comm, &mut x, 0.0).unwrap_err();
            assert!(e.to_string().contains("non-finite"), "{name}: {e}");
            assert_eq!(d.state(), &before, "{name}: state poisoned");
            // a later step that the (unchanged) state can take works
            let mut ok = recover(bf16);
            d.step(comm, &mut ok, 0.0)?;
            assert!(ok.iter().all(|x| x.is_finite()), "{name}: {ok:?}");
            assert!(
                d.state()
                    .u
                    .iter()
                    .chain(&d.state().v)
                    .all(|x| x.is_finite()),
                "{name}: {:?}",
                d.state()
            );
            Ok(())
        })
        .unwrap();
        // Skip policy: every rank skips (only rank 0's step overflows), states unchanged.
        let skip = cfg.clone().non_finite(NonFinite::SkipStep);
        let out = ferroccl::local::run(2, |comm| {
            let mut d = Dgc::new(4, skip.clone())?;
            let bf16 = skip.values == ValueFormat::Bf16;
            let mine = if comm.rank() == 0 {
                g.clone()
            } else {
                vec![1.0, 1.0, 1.0, 1.0]
            };
            if !bf16 {
                d.step(comm, &mut mine.clone(), 0.0)?;
            }
            let before = d.state().clone();
            let mut x = mine.clone();
            let s = d.step(comm, &mut x, 0.0)?;
            assert!(s.skipped, "{name}: rank {} did not skip", comm.rank());
            assert_eq!(x, vec![0.0; 4], "{name}: zero update");
            assert_eq!(
                d.state(),
                &before,
                "{name}: state changed on rank {}",
                comm.rank()
            );
            let mut ok = recover(bf16);
            let s = d.step(comm, &mut ok, 0.0)?;
            assert!(!s.skipped);
            Ok(ok)
        })
        .unwrap();
        assert_eq!(out[0], out[1], "{name}");
        assert!(out[0].iter().all(|x| x.is_finite()), "{name}: {:?}", out[0]);
    }
}
