//! Gradient codes: decodability (exhaustive at small n, random sets at n = 256), exactness of the
//! decoded sum, and the coded all-reduce over the in-process backend (stragglers, stale rounds).

use ferroccl::coding::{Aggregator, CodedAllReduce, GradientCode, Scheme};
use ferroccl::local::{Link, LinkModel, Options, TimeMode};
use ferroccl::sim::rng::Rng;
use ferroccl::{Communicator, Config, LinkClock};
use std::sync::Arc;
use std::time::Duration;

fn subsets(n: usize) -> impl Iterator<Item = Vec<usize>> {
    (0u32..(1 << n)).map(move |m| (0..n).filter(|i| m >> i & 1 == 1).collect())
}

#[test]
fn every_responder_set_decodes_small_n() {
    let mut checked = 0;
    for n in 1..=10 {
        for s in 0..n {
            let mut codes = vec![GradientCode::cyclic(n, s, 11).unwrap()];
            if n % (s + 1) == 0 {
                codes.push(GradientCode::fractional(n, s).unwrap());
            }
            for code in &codes {
                for set in subsets(n) {
                    if set.len() >= n - s {
                        let a = code.decoding_vector(&set).unwrap_or_else(|e| {
                            panic!("{:?} n={n} s={s} {set:?}: {e}", code.scheme())
                        });
                        assert!(code.residual(&a) < 1e-9);
                        assert!(set.iter().all(|&w| w < n));
                        // Non-responders get no weight.
                        assert!((0..n).filter(|w| !set.contains(w)).all(|w| a[w] == 0.0));
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 5000, "{checked}");
}

#[test]
fn random_sets_decode_at_n256() {
    let mut rng = Rng::new(5);
    for (code, sets) in [
        (GradientCode::fractional(256, 7).unwrap(), 2000),
        (GradientCode::fractional(256, 15).unwrap(), 2000),
        (GradientCode::cyclic(256, 2, 1).unwrap(), 50),
        (GradientCode::cyclic(256, 3, 1).unwrap(), 50),
    ] {
        for _ in 0..sets {
            let set = rng.subset(256, 256 - code.s());
            let a = code.decoding_vector(&set).unwrap();
            assert!(code.residual(&a) < 1e-9);
        }
    }
}

#[test]
fn too_few_or_bad_responders_are_named_errors() {
    let c = GradientCode::cyclic(6, 2, 3).unwrap();
    let e = c.decoding_vector(&[0, 1, 2]).unwrap_err().to_string();
    assert!(e.contains("n - s = 4"), "{e}");
    let fr = GradientCode::fractional(6, 2).unwrap();
    // Two responders that cover both groups decode even though fewer than n - s = 4.
    assert!(fr.decoding_vector(&[0, 3]).is_ok());
    let e = fr.decoding_vector(&[0, 1, 2]).unwrap_err().to_string();
    assert!(e.contains("group 1"), "{e}");
    assert!(c.decoding_vector(&[0, 9]).is_err());
    assert!(GradientCode::fractional(7, 1).is_err());
    assert!(GradientCode::cyclic(3, 3, 0).is_err());
    assert!("nope".parse::<Scheme>().is_err());
}

/// Decoded sum vs uncoded sum. Decoding is exact in f64 (`aᵀB_F = 1ᵀ` to 1e-9); on the f32 path every
/// coded gradient carries a rounding of at most `(s + 1)·ε₃₂·|c_i|`-ish, amplified by the decoding
/// vector: the bound used is `4·ε₃₂·(s + 2)·Σ_i |a_i|·max|c_i|` (random cyclic codes can have large
/// `|a_i|`, as Tandon et al. note; FR has `a_i ∈ {0, 1}` and meets 1e-6 relative).
#[test]
fn decoded_sum_equals_uncoded_sum() {
    let mut rng = Rng::new(9);
    let d = 64;
    for (code, trials) in [
        (GradientCode::cyclic(12, 3, 2).unwrap(), 200),
        (GradientCode::fractional(12, 3).unwrap(), 200),
        (GradientCode::cyclic(64, 4, 2).unwrap(), 20),
    ] {
        let n = code.n();
        for _ in 0..trials {
            let g: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..d).map(|_| rng.normal() as f32).collect())
                .collect();
            let truth: Vec<f64> = (0..d)
                .map(|k| g.iter().map(|v| f64::from(v[k])).sum())
                .collect();
            let set = rng.subset(n, n - code.s());
            let coded: Vec<Vec<f32>> = set
                .iter()
                .map(|&w| {
                    let parts: Vec<&[f32]> = code
                        .partitions(w)
                        .iter()
                        .map(|&p| g[p].as_slice())
                        .collect();
                    code.encode(w, &parts).unwrap()
                })
                .collect();
            let views: Vec<&[f32]> = coded.iter().map(|c| c.as_slice()).collect();
            let got = code.decode(&set, &views).unwrap();
            let norm = truth.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&truth)
                .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
            let a = code.decoding_vector(&set).unwrap();
            let cmax = coded
                .iter()
                .flatten()
                .fold(0f64, |m, v| m.max(f64::from(v.abs())));
            let a1: f64 = a.iter().map(|v| v.abs()).sum();
            let bound = 4.0 * f64::from(f32::EPSILON) * (code.s() as f64 + 2.0) * a1 * cmax;
            assert!(
                err <= bound,
                "{:?}: err {err} > bound {bound}",
                code.scheme()
            );
            if code.scheme() == Scheme::FractionalRepetition {
                assert!(err <= 1e-6 * norm.max(1.0), "FR: err {err} norm {norm}");
            }
            // f64 path: a^T B = 1 exactly up to rounding.
            assert!(code.residual(&a) < 1e-9);
        }
    }
}

/// Per-round, per-partition gradient: round-dependent, so a message leaking into another round
/// would change the sum.
fn grad(round: u64, p: usize, d: usize) -> Vec<f32> {
    (0..d)
        .map(|k| (round * 1000 + p as u64 * 10 + k as u64) as f32)
        .collect()
}

fn expected(round: u64, n: usize, d: usize) -> Vec<f32> {
    (0..d)
        .map(|k| (0..n).map(|p| grad(round, p, d)[k]).sum())
        .collect()
}

fn coded_for(code: &GradientCode, w: usize, round: u64, d: usize) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = code
        .partitions(w)
        .iter()
        .map(|&p| grad(round, p, d))
        .collect();
    let views: Vec<&[f32]> = parts.iter().map(|v| v.as_slice()).collect();
    code.encode(w, &views).unwrap()
}

#[test]
fn coded_all_reduce_survives_a_slow_rank_and_never_mixes_rounds() {
    let (n, s, d, rounds) = (4, 1, 8, 12u64);
    let code = Arc::new(GradientCode::cyclic(n, s, 4).unwrap());
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        link: Some(
            LinkModel::uniform(TimeMode::Real, Link::gbit(10.0, Duration::from_micros(10)))
                .with_delay(3, Duration::from_millis(30)),
        ),
        copy_only: false,
    };
    let out = ferroccl::local::run_with(n, &opts, |comm| {
        let mut agg = CodedAllReduce::new(code.clone(), Aggregator::Fixed(0));
        let mut used_slow = 0;
        let mut out = vec![0f32; d];
        while agg.rounds() < rounds {
            if agg.poll_ahead(comm, &mut out)?.is_some() {
                let t = agg.rounds() - 1;
                let want = expected(t, n, d);
                let err = out
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 0.05,
                    "skipped round {t} rank {}: {out:?} vs {want:?}",
                    comm.rank()
                );
                continue;
            }
            let t = agg.rounds();
            comm.compute(Duration::from_millis(1))?; // rank 3: + 30 ms
            let info = agg.round(comm, &coded_for(&code, comm.rank(), t, d), &mut out)?;
            let want = expected(t, n, d);
            let err = out
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Values are ~1e4 and rounds 1000 apart: a leaked round would be off by >= 1000.
            assert!(
                err <= 0.05,
                "round {t} rank {}: {out:?} vs {want:?}",
                comm.rank()
            );
            assert_eq!(info.round, t);
            assert!(info.responders.len() >= n - s);
            used_slow += usize::from(info.responders.contains(&3));
        }
        let left = agg.finish(comm, Duration::from_secs(5))?;
        Ok((used_slow, left, agg.discarded(), agg.skipped()))
    })
    .unwrap();
    // The aggregator almost never waited for rank 3, and nothing is left posted.
    assert!(out[0].0 <= 2, "rank 3 used in {} rounds", out[0].0);
    assert_eq!(out[0].1, 0, "stale receives left on the aggregator");
    assert!(out[0].2 > 0, "late messages were discarded");
    assert!(
        out[3].3 > 0,
        "the slow rank skipped rounds that finished without it"
    );
}

#[test]
fn coded_all_reduce_with_rotating_aggregator_is_exact() {
    let (n, s, d) = (6, 2, 5);
    let code = Arc::new(GradientCode::fractional(n, s).unwrap());
    ferroccl::local::run(n, |comm| {
        let mut agg = CodedAllReduce::new(code.clone(), Aggregator::Rotate);
        let mut out = vec![0f32; d];
        for t in 0..2 * n as u64 {
            let info = agg.round(comm, &coded_for(&code, comm.rank(), t, d), &mut out)?;
            assert_eq!(info.aggregator, (t % n as u64) as usize);
            assert_eq!(out, expected(t, n, d));
        }
        agg.finish(comm, Duration::from_secs(5))?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn mismatched_world_is_a_named_error() {
    let code = Arc::new(GradientCode::cyclic(3, 1, 0).unwrap());
    let r = ferroccl::local::run(2, |comm| {
        let mut agg = CodedAllReduce::new(code.clone(), Aggregator::Fixed(0));
        let mut out = vec![0f32; 1];
        agg.round(comm, &[1.0], &mut out).map(|_| ())
    });
    let e = r.unwrap_err().to_string();
    assert!(e.contains("n = 3"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The sequential runtime (uncoded, GC, SR-SGC, M-SGC over a communicator).

use ferroccl::coding::sequential::{Gc, MSgc, Planner, SrSgc, Task, Uncoded};
use ferroccl::coding::{JobResult, SequentialRuntime};

/// Unit gradient of `(job, unit)`: small integers plus `100·job`, so sums are exact in f32 and a
/// result of another job would be off by a multiple of 100.
fn unit_grad(job: usize, unit: usize, d: usize) -> Vec<f32> {
    (0..d)
        .map(|k| ((job * 7 + unit * 3 + k) % 13) as f32 - 6.0 + 100.0 * job as f32)
        .collect()
}

fn job_truth(job: usize, units: usize, d: usize) -> Vec<f32> {
    let mut acc = vec![0f64; d];
    for u in 0..units {
        for (a, v) in acc.iter_mut().zip(unit_grad(job, u, d)) {
            *a += f64::from(v);
        }
    }
    acc.into_iter().map(|x| x as f32).collect()
}

fn task_result(t: &Task, d: usize) -> Vec<f32> {
    let mut acc = vec![0f64; d];
    for &(u, c) in t.terms.iter() {
        for (a, v) in acc.iter_mut().zip(unit_grad(t.job, u, d)) {
            *a += c * f64::from(v);
        }
    }
    acc.into_iter().map(|x| x as f32).collect()
}

struct SeqOut {
    jobs: Vec<JobResult>,
    discarded: u64,
    skipped: u64,
    left: usize,
    cut: usize,
}

/// Run `jobs + T` rounds of `make()` on `n` in-process ranks; `slow(rank, round)` sleeps that long in
/// the rank's first task of the round (on top of the link model's per-rank delay).
fn run_seq<P, M, S>(n: usize, jobs: usize, link: Option<LinkModel>, make: M, slow: S) -> Vec<SeqOut>
where
    P: Planner,
    M: Fn() -> P + Sync,
    S: Fn(usize, usize) -> Option<Duration> + Sync,
{
    let d = 5;
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs(20))),
        link,
        copy_only: false,
    };
    ferroccl::local::run_with(n, &opts, |comm| {
        let planner = make();
        let rounds = jobs + planner.delay();
        let units = planner.units().len();
        let mut rt = SequentialRuntime::new(planner, 0, d);
        let mut out = Vec::new();
        let mut cut = 0;
        while rt.rounds() < rounds {
            let r = rt.rounds();
            let mut first = true;
            let info = rt.step(comm, |t| {
                if first {
                    first = false;
                    comm.compute(Duration::from_micros(300))?;
                    if let Some(s) = slow(comm.rank(), r) {
                        std::thread::sleep(s);
                    }
                }
                Ok(task_result(t, d))
            })?;
            cut += usize::from(info.completed.len() < n);
            for j in info.decoded {
                let want = job_truth(j.job, units, d);
                assert_eq!(
                    j.gradient,
                    want,
                    "rank {} job {} decoded in round {}",
                    comm.rank(),
                    j.job,
                    j.round
                );
                out.push(j);
            }
        }
        let left = rt.finish(comm, Duration::from_secs(10))?;
        Ok(SeqOut {
            jobs: out,
            discarded: rt.discarded(),
            skipped: rt.skipped(),
            left,
            cut,
        })
    })
    .unwrap()
}

fn check_all_jobs(out: &[SeqOut], jobs: usize, delay: usize) {
    for (rank, o) in out.iter().enumerate() {
        // Jobs of the flush rounds may decode early (SR-SGC); the real ones all decode, once each.
        let ids: Vec<usize> = o.jobs.iter().map(|j| j.job).filter(|&j| j < jobs).collect();
        assert_eq!(ids, (0..jobs).collect::<Vec<_>>(), "rank {rank}");
        assert!(
            o.jobs.iter().all(|j| j.round <= j.job + delay),
            "rank {rank}"
        );
    }
    assert_eq!(out[0].left, 0, "stale receives left on the master");
}

#[test]
fn seq_runtime_gc_and_uncoded_with_a_slow_rank() {
    let (n, jobs) = (6, 12);
    let link = || {
        Some(
            LinkModel::uniform(TimeMode::Real, Link::gbit(10.0, Duration::from_micros(10)))
                .with_delay(5, Duration::from_millis(30)),
        )
    };
    let gc = run_seq(
        n,
        jobs,
        link(),
        || Gc::new(Scheme::FractionalRepetition, n, 1, 1).unwrap(),
        |_, _| None,
    );
    check_all_jobs(&gc, jobs, 0);
    assert!(
        gc[0].cut >= jobs - 2,
        "GC cut off the slow rank: {}",
        gc[0].cut
    );
    assert!(gc[0].discarded > 0, "late results were discarded");
    assert!(gc[5].skipped > 0, "the slow rank skipped rounds");
    let un = run_seq(n, jobs, link(), || Uncoded::new(n).unwrap(), |_, _| None);
    check_all_jobs(&un, jobs, 0);
    assert_eq!(un[0].cut, 0);
}

#[test]
fn seq_runtime_sr_sgc_exact_under_bursts() {
    // (B, W, λ) = (1, 2, 2): s = 1, FR (6, 1), T = 1. Ranks 2 and 3 (one FR group) are slow in round
    // 3 (v = 2 > s: one of them repeats job 3 in round 4) and rank 4 in round 7.
    let (n, jobs) = (6, 12);
    let out = run_seq(
        n,
        jobs,
        None,
        || SrSgc::new(n, 1, 2, 2, 1).unwrap(),
        |rank, r| {
            ((r == 3 && (rank == 2 || rank == 3)) || (r == 7 && rank == 4))
                .then(|| Duration::from_millis(150))
        },
    );
    check_all_jobs(&out, jobs, 1);
    assert!(out[0].cut >= 2, "the bursts were cut off: {}", out[0].cut);
}

#[test]
fn seq_runtime_msgc_exact_under_bursts_and_late_messages_never_leak() {
    // (B, W, λ) = (2, 3, 2): T = 3, FR (6, 2) for D2, 4 mini-tasks per round. Rank 1 is slow in rounds
    // 2 and 3 (a burst of B), rank 4 in round 8; their late results arrive while later rounds run.
    let (n, jobs) = (6, 14);
    let out = run_seq(
        n,
        jobs,
        None,
        || MSgc::new(n, 2, 3, 2, 1).unwrap(),
        |rank, r| {
            ((rank == 1 && (r == 2 || r == 3)) || (rank == 4 && r == 8))
                .then(|| Duration::from_millis(150))
        },
    );
    check_all_jobs(&out, jobs, 3);
    assert!(out[0].cut >= 2, "the bursts were cut off: {}", out[0].cut);
    assert!(
        out[0].discarded > 0,
        "late results were received and discarded"
    );
}

#[test]
fn seq_runtime_msgc_with_a_permanently_slow_rank_stays_exact() {
    // Outside the model (a burst longer than B): the master waits where the model says so; every job
    // is still exact.
    let (n, jobs) = (6, 10);
    let link = LinkModel::uniform(TimeMode::Real, Link::gbit(10.0, Duration::from_micros(10)))
        .with_delay(3, Duration::from_millis(20));
    let out = run_seq(
        n,
        jobs,
        Some(link),
        || MSgc::new(n, 1, 2, 2, 1).unwrap(),
        |_, _| None,
    );
    check_all_jobs(&out, jobs, 1);
}
