//! The virtual-time simulator: traces, exactness of every scheme, GC at the (n − s)-th order
//! statistic, and the M-SGC vs GC target at n = 256 on the bursty model.

use ferroccl::coding::sequential::{Gc, MSgc, Planner, SrSgc, Uncoded};
use ferroccl::coding::Scheme;
use ferroccl::sim::{order_statistic, simulate, CostModel, Model, Trace};
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

fn planners(n: usize, lambda: usize, sr_s: usize) -> Vec<Box<dyn Planner>> {
    vec![
        Box::new(Uncoded::new(n, 3).unwrap()),
        Box::new(Gc::new(Scheme::FractionalRepetition, n, lambda, 3).unwrap()),
        Box::new(SrSgc::new(n, sr_s, lambda, 2, 3).unwrap()),
        Box::new(MSgc::new(n, lambda, 2, 0.1, 8, 3).unwrap()),
        Box::new(MSgc::new(n, lambda, 1, 0.0, 4, 3).unwrap()),
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
        for mut p in planners(64, 7, 3) {
            let r = simulate(p.as_mut(), &trace, &CostModel::default()).unwrap();
            assert!(r.exact, "{}: error {}", r.scheme, r.max_error);
            assert_eq!(r.jobs_decoded + r.jobs_open, 300, "{}", r.scheme);
            assert!(r.jobs_open <= r.delay, "{}", r.scheme);
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
    for mut p in planners(256, 7, 3).into_iter().take(4) {
        reports.push(simulate(p.as_mut(), &trace, &cost).unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    let (gc, msgc) = (&reports[1], &reports[3]);
    assert!(reports.iter().all(|r| r.exact));
    assert!(
        msgc.total_time <= 0.9 * gc.total_time,
        "M-SGC {} vs GC {}",
        msgc.total_time,
        gc.total_time
    );
    if !cfg!(debug_assertions) {
        assert!(
            secs < 1.0,
            "1000 rounds x 256 workers x 4 schemes took {secs} s"
        );
    }
}

#[test]
fn sr_sgc_reattempts_only_missing_groups_and_meets_deadlines() {
    // Workers 0..4 (group 0 of an s = 3 FR code) are all very slow in round 0 only.
    let n = 16;
    let mut csv = String::new();
    for r in 0..6 {
        let row: Vec<String> = (0..n)
            .map(|i| if r == 0 && i < 4 { "50" } else { "1" }.to_string())
            .collect();
        csv += &(row.join(",") + "\n");
    }
    let trace = Trace::from_csv(&csv).unwrap();
    let mut sr = SrSgc::new(n, 3, 4, 2, 1).unwrap();
    let r = simulate(&mut sr, &trace, &CostModel::default()).unwrap();
    assert!(r.exact);
    assert_eq!(r.round_times[0], 4.0, "round 0 ends without the slow group");
    // Round 1: one member re-attempts (it carries double load and may be cut off); round 2 is job 0's
    // deadline: all four members re-attempt and the master waits for one. Nothing else is repeated.
    assert!((1..=12).contains(&sr.reattempts()), "{}", sr.reattempts());
}
