//! The virtual-time simulator: traces, exactness of every scheme, GC at the (n − s)-th order
//! statistic, and the M-SGC vs GC target at n = 256 on the bursty model.

use ferroccl::coding::sequential::{Gc, MSgc, Planner, SrSgc, Uncoded};
use ferroccl::coding::Scheme;
use ferroccl::sim::{order_statistic, simulate, simulate_with, CostModel, Model, Trace, WaitRule};
use std::time::Instant;

fn ge() -> Model {
    Model::GilbertElliott {
        shift: 1.0,
        rate: 10.0,
        p_gb: 0.005,
        p_bg: 0.2,
        slow: 5.0,
    }
}

/// Uncoded, GC(s = 7), SR-SGC (B = 2, W = 3, λ = 14: s = 7), M-SGC (B = 4, W = 5, λ = 15) and M-SGC
/// (B = 1, W = 2, λ = 7).
fn planners(n: usize) -> Vec<Box<dyn Planner>> {
    vec![
        Box::new(Uncoded::new(n).unwrap()),
        Box::new(Gc::new(Scheme::FractionalRepetition, n, 7, 3).unwrap()),
        Box::new(SrSgc::new(n, 2, 3, 14, 3).unwrap()),
        Box::new(MSgc::new(n, 4, 5, 15, 3).unwrap()),
        Box::new(MSgc::new(n, 1, 2, 7, 3).unwrap()),
    ]
}

#[test]
fn csv_round_trip_and_errors() {
    let t = Trace::generate(&ge(), 5, 7, 1).unwrap();
    let back = Trace::from_csv(&format!("w0,w1,w2,w3,w4\n{}", t.to_csv())).unwrap();
    assert_eq!((back.rounds(), back.n()), (7, 5));
    assert!((back.row(3)[2] - t.row(3)[2]).abs() < 1e-5);
    assert!(Trace::from_csv("1,2\n3\n").is_err());
    assert!(Trace::from_csv("1,-2\n").is_err());
    assert!(Trace::from_csv("").is_err());
    assert!(Trace::generate(
        &Model::ShiftedExp {
            shift: 1.0,
            rate: 0.0
        },
        4,
        4,
        1
    )
    .is_err());
}

#[test]
fn every_scheme_decodes_every_job_exactly() {
    for model in [
        ge(),
        Model::ShiftedExp {
            shift: 1.0,
            rate: 2.0,
        },
    ] {
        let trace = Trace::generate(&model, 64, 300, 7).unwrap();
        for rule in [WaitRule::Earliest, WaitRule::Mu(0.3)] {
            for mut p in planners(64) {
                let r = simulate_with(p.as_mut(), &trace, &CostModel::default(), rule).unwrap();
                assert!(
                    r.exact,
                    "{}: error {} residual {}",
                    r.scheme, r.max_error, r.max_residual
                );
                assert_eq!(r.jobs_decoded + r.jobs_open, 300, "{}", r.scheme);
                assert!(r.jobs_open <= r.delay, "{}", r.scheme);
            }
        }
    }
}

#[test]
fn gc_round_is_the_order_statistic() {
    let (n, s) = (32, 3);
    let trace = Trace::generate(
        &Model::ShiftedExp {
            shift: 1.0,
            rate: 1.0,
        },
        n,
        200,
        2,
    )
    .unwrap();
    let cost = CostModel {
        overhead: 2.0,
        master: 0.0,
    };
    let mut gc = Gc::new(Scheme::Cyclic, n, s, 1).unwrap();
    let r = simulate(&mut gc, &trace, &cost).unwrap();
    for (k, &t) in r.round_times.iter().enumerate() {
        let f: Vec<f64> = trace
            .row(k)
            .iter()
            .map(|x| x * (2.0 + (s + 1) as f64))
            .collect();
        assert!((t - order_statistic(&f, n - s)).abs() < 1e-12);
    }
    assert!(r.exact);
    assert_eq!(r.max_stragglers, s);
}

#[test]
fn msgc_beats_gc_by_ten_percent_at_n256_bursty() {
    let trace = Trace::generate(&ge(), 256, 1000, 1).unwrap();
    let cost = CostModel {
        overhead: 4.0,
        master: 0.0,
    };
    let t0 = Instant::now();
    let mut reports = Vec::new();
    let mut ps: Vec<Box<dyn Planner>> = vec![
        Box::new(Gc::new(Scheme::FractionalRepetition, 256, 7, 1).unwrap()),
        Box::new(Gc::new(Scheme::FractionalRepetition, 256, 15, 1).unwrap()),
        Box::new(MSgc::new(256, 30, 31, 127, 1).unwrap()),
    ];
    for p in ps.iter_mut() {
        reports.push(simulate(p.as_mut(), &trace, &cost).unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    let msgc = &reports[2];
    assert!(reports.iter().all(|r| r.exact));
    for gc in &reports[..2] {
        assert!(
            msgc.total_time <= 0.9 * gc.total_time,
            "M-SGC {} vs {} {}",
            msgc.total_time,
            gc.scheme,
            gc.total_time
        );
    }
    if !cfg!(debug_assertions) {
        assert!(
            secs < 20.0,
            "1000 rounds x 256 workers x 3 schemes took {secs} s"
        );
    }
}

/// Slow workers as a CSV trace: `slow(r, i)` → 50 s/partition, else 1.
fn csv_trace(n: usize, rounds: usize, slow: impl Fn(usize, usize) -> bool) -> Trace {
    let mut csv = String::new();
    for r in 0..rounds {
        let row: Vec<String> = (0..n)
            .map(|i| if slow(r, i) { "50" } else { "1" }.to_string())
            .collect();
        csv += &(row.join(",") + "\n");
    }
    Trace::from_csv(&csv).unwrap()
}

#[test]
fn sr_sgc_repeats_v_minus_s_tasks_of_a_burst() {
    // (B, W, λ) = (1, 2, 6): s = ceil(6 / 2) = 3, FR (16, 3) code. Workers 0..4 (all of group 0) are
    // slow in round 0 only: job 0 misses a group, v = 4 > s, so v − s = 1 worker repeats it in round 1.
    let n = 16;
    let trace = csv_trace(n, 6, |r, i| r == 0 && i < 4);
    let mut sr = SrSgc::new(n, 1, 2, 6, 1).unwrap();
    assert_eq!(sr.code().s(), 3);
    let r = simulate(&mut sr, &trace, &CostModel::default()).unwrap();
    assert!(r.exact);
    assert_eq!(r.round_times[0], 4.0, "round 0 ends without the slow group");
    assert_eq!(sr.repeats(), 1);
    assert_eq!(r.jobs_decoded, 6);
}

#[test]
fn msgc_repeats_lost_pieces_in_d2_slots_and_decodes_at_t() {
    // (B, W, λ) = (2, 3, 3): T = 3, 4 mini-tasks per round. Worker 5 straggles in rounds 2 and 3 (a
    // burst of B): its D1 pieces of jobs 1..3 are re-attempted in D2 slots, and every job decodes at
    // round t + T.
    let n = 8;
    let trace = csv_trace(n, 12, |r, i| i == 5 && (r == 2 || r == 3));
    let mut m = MSgc::new(n, 2, 3, 3, 1).unwrap();
    let r = simulate(&mut m, &trace, &CostModel::default()).unwrap();
    assert!(r.exact, "{} {}", r.max_error, r.max_residual);
    assert_eq!(r.jobs_decoded, 12 - 3);
    assert_eq!(r.rounds_waited_all, 12 - 2, "only the burst was cut off");
    assert!(m.repeats() > 0);
    let load = m.round_load();
    // (W−1+B)(λ+1) / (B + (λ+1)(W−1)) = 4·4 / (2 + 8) = 1.6 partitions.
    assert!((load - 1.6).abs() < 1e-12, "{load}");
}

#[test]
fn bursts_longer_than_b_are_waited_for() {
    // Worker 2 is slow in rounds 1..=5; M-SGC with (B, W) = (2, 3) cuts it off in rounds 1 and 2 (a
    // burst of B), must wait for it in rounds 3 and 4 (it straggled at r − B), and may cut it off again
    // in round 5 (a new burst: no straggling in r−W+1..=r−B).
    let n = 8;
    let trace = csv_trace(n, 10, |r, i| i == 2 && (1..6).contains(&r));
    let mut m = MSgc::new(n, 2, 3, 3, 1).unwrap();
    let r = simulate(&mut m, &trace, &CostModel::default()).unwrap();
    assert!(r.exact);
    let waited: Vec<usize> = (0..10).filter(|&k| r.round_times[k] > 10.0).collect();
    assert_eq!(waited, vec![3, 4], "{:?}", r.round_times);
}
