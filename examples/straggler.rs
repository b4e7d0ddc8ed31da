//! Gradient coding on a real training job: an MLP on the digits dataset (bundled with smartcore,
//! nothing downloaded) trained by 8 ranks, with slow ranks and a rank that dies mid-training.
//!
//! ```text
//! cargo run --release --example straggler                 # all scenarios, in-process ranks
//! cargo run --release --example straggler -- --scenario gc-slow
//! mpirun -n 8 target/release/examples/straggler --scenario gc-slow   # (feature mpi) one per process
//! ```
//!
//! Every step the global batch is split into `n` partitions (one per rank). Uncoded training
//! all-reduces the partition gradients and so waits for the slowest rank. Gradient-coded training
//! ([`ferroccl::coding`], cyclic `(n, s)` code) has each rank compute the gradients of its `s + 1`
//! partitions and send one coded combination; the aggregator (rank 0) decodes the exact sum from the
//! first `n − s` arrivals and hands it back, and a slow rank skips the rounds that finished without it.
//!
//! Scenarios (in-process: stragglers are the link model's per-rank compute delay, `TimeMode::Real`):
//! `uncoded` and `gc` (no stragglers), `uncoded-slow` and `gc-slow` (`--slow` ranks delayed by
//! `--delay-ms` per step), `gc-kill` and `uncoded-kill` (rank `--kill` dies at step `--kill-step`: its
//! closure returns and drops its communicator; GC keeps going on the other `n − 1 ≥ n − s`, since
//! point-to-point messages between live ranks still flow; uncoded training's all-reduce fails with
//! `PeerLost` — bounded by the timeout, `--timeout-s` — and reports the error instead of hanging). Rank
//! 0 evaluates the test accuracy. Ends with one `RESULT {json}` line. Under MPI only the `uncoded*`
//! and `gc*` scenarios without `kill` are run (Open MPI aborts the whole job when a rank exits early).

use clap::Parser;
use ferroccl::coding::{Aggregator, CodedAllReduce, GradientCode};
use ferroccl::local::{Link, LinkModel, Options, TimeMode};
use ferroccl::prelude::*;
use ferroccl::{Backend, Config};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Gradient coding vs uncoded training with stragglers and a dead rank.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Ranks (= partitions of each global batch).
    #[arg(long, default_value_t = 8)]
    world: usize,
    /// Stragglers the code tolerates.
    #[arg(long, default_value_t = 2)]
    s: usize,
    /// Scenario: all, uncoded, gc, uncoded-slow, gc-slow, gc-kill, uncoded-kill.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Samples per partition and step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.3)]
    lr: f32,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Slow ranks (comma-separated).
    #[arg(long, default_value = "6,7", value_delimiter = ',')]
    slow: Vec<usize>,
    /// Delay of a slow rank per step, ms.
    #[arg(long, default_value_t = 40)]
    delay_ms: u64,
    /// Nominal compute per partition and step, ms (charged through the link model).
    #[arg(long, default_value_t = 2)]
    compute_ms: u64,
    /// Rank that dies in the kill scenarios.
    #[arg(long, default_value_t = 5)]
    kill: usize,
    /// Step at which it dies.
    #[arg(long, default_value_t = 30)]
    kill_step: usize,
    /// Communicator timeout, seconds (bounds how long uncoded training hangs on a dead rank).
    #[arg(long, default_value_t = 2.0)]
    timeout_s: f64,
}

#[path = "common/mlp.rs"]
mod mlp;
use mlp::{Data, Mlp};

/// The network: 64 → 64 (ReLU) → 10.
const MLP: Mlp = Mlp { hidden: 64 };

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Uncoded,
    Gc,
}

/// What a scenario reports (from rank 0).
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Report {
    scenario: String,
    ok: bool,
    error: Option<String>,
    seconds: f64,
    steps: usize,
    test_accuracy: f64,
    mean_responders: f64,
    late_discarded: u64,
    lost: Vec<usize>,
}

/// Train on `comm`; rank `kill` (if any) returns at step `--kill-step`, dropping its communicator;
/// `done` is set at the end.
fn train<C: Communicator + ?Sized>(
    comm: &C,
    a: &Args,
    mode: Mode,
    kill: Option<usize>,
    data: &Data,
    done: &AtomicBool,
    slow_sleep: bool,
) -> Result<Report> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let global = a.batch * n;
    let steps = data.train.len() / global;
    let code = Arc::new(GradientCode::cyclic(n, a.s, a.seed)?);
    let mut agg = CodedAllReduce::new(code.clone(), Aggregator::Fixed(0));
    let mut params = MLP.init_params(a.seed); // same seed on every rank: identical replicas
    let mut grads = MLP.zeros();
    let mut sum = MLP.zeros();
    let show = rank == 0;
    let bar = if show {
        ProgressBar::with_draw_target(
            Some((a.epochs * steps) as u64),
            ProgressDrawTarget::stderr(),
        )
        .with_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} [{elapsed}]")
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        )
    } else {
        ProgressBar::hidden()
    };
    let t0 = Instant::now();
    let (mut responders, mut rounds) = (0usize, 0usize);
    let mut step_no = 0;
    let mut orders = Vec::new();
    for epoch in 1..=a.epochs {
        let mut order = data.train.clone();
        order.shuffle(&mut StdRng::seed_from_u64(
            a.seed.wrapping_add(epoch as u64),
        ));
        orders.push(order);
    }
    let total = a.epochs * steps;
    let part = |t: usize, p: usize| -> &[usize] {
        let (e, s) = (t / steps, t % steps);
        &orders[e][s * global + p * a.batch..][..a.batch]
    };
    let is_slow = a.slow.contains(&rank);
    while step_no < total {
        if kill == Some(rank) && step_no >= a.kill_step {
            // This rank dies: its closure returns and its communicator is dropped mid-training.
            return Ok(Report {
                steps: step_no,
                ..Report::default()
            });
        }
        if mode == Mode::Gc {
            if let Some(info) = agg.poll_ahead(comm, &mut sum)? {
                let _ = info;
                apply(&mut params, &sum, a.lr / n as f32);
                step_no += 1;
                continue;
            }
        }
        let mine: Vec<usize> = match mode {
            Mode::Uncoded => vec![rank],
            Mode::Gc => code.partitions(rank).to_vec(),
        };
        comm.compute(Duration::from_millis(a.compute_ms * mine.len() as u64))?;
        if slow_sleep && is_slow {
            std::thread::sleep(Duration::from_millis(a.delay_ms));
        }
        let mut parts = Vec::with_capacity(mine.len());
        for &p in &mine {
            MLP.loss_and_grad(&params, data, part(step_no, p), &mut grads);
            parts.push(grads.clone());
        }
        match mode {
            Mode::Uncoded => {
                sum.copy_from_slice(&parts[0]);
                comm.all_reduce(&mut sum, ReduceOp::Sum)?;
                responders += n;
            }
            Mode::Gc => {
                let views: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                let coded = code.encode(rank, &views)?;
                let info = agg.round(comm, &coded, &mut sum)?;
                responders += info.responders.len();
            }
        }
        rounds += 1;
        apply(&mut params, &sum, a.lr / n as f32);
        step_no += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Release);
    let discarded = agg.discarded();
    let lost = agg.lost();
    if mode == Mode::Gc {
        agg.finish(comm, Duration::from_secs_f64(a.timeout_s))?;
    }
    Ok(Report {
        scenario: String::new(),
        ok: true,
        error: None,
        seconds,
        steps: total,
        test_accuracy: if rank == 0 {
            MLP.accuracy(&params, data)
        } else {
            0.0
        },
        mean_responders: responders as f64 / rounds.max(1) as f64,
        late_discarded: discarded,
        lost,
    })
}

fn apply(p: &mut [f32], sum: &[f32], scale: f32) {
    p.iter_mut().zip(sum).for_each(|(w, s)| *w -= scale * s);
}

fn scenario(a: &Args, name: &str, data: &Data) -> Report {
    let (mode, slow, kill) = match name {
        "uncoded" => (Mode::Uncoded, false, None),
        "gc" => (Mode::Gc, false, None),
        "uncoded-slow" => (Mode::Uncoded, true, None),
        "gc-slow" => (Mode::Gc, true, None),
        "gc-kill" => (Mode::Gc, false, Some(a.kill)),
        _ => (Mode::Uncoded, false, Some(a.kill)),
    };
    let mut model = LinkModel::uniform(TimeMode::Real, Link::gbit(10.0, Duration::from_micros(10)));
    if slow {
        for &r in &a.slow {
            model = model.with_delay(r, Duration::from_millis(a.delay_ms));
        }
    }
    let opts = Options {
        config: Some(Config::default().with_timeout(Duration::from_secs_f64(a.timeout_s))),
        link: Some(model),
        copy_only: false,
    };
    let done = AtomicBool::new(false);
    let t0 = Instant::now();
    let r = ferroccl::local::run_with(a.world, &opts, |comm| {
        let r = train(comm, a, mode, kill, data, &done, false);
        if r.is_err() {
            done.store(true, Ordering::Release);
        }
        r
    });
    let mut rep = match r {
        Ok(mut v) => v.swap_remove(0),
        Err(e) => Report {
            ok: false,
            error: Some(e.to_string()),
            seconds: t0.elapsed().as_secs_f64(),
            ..Report::default()
        },
    };
    rep.scenario = name.to_string();
    rep
}

fn run(a: &Args) -> std::result::Result<(), String> {
    if a.s >= a.world || a.slow.iter().any(|&r| r >= a.world) || a.kill >= a.world || a.kill == 0 {
        return Err(
            "need s < world, slow ranks < world and 0 < kill < world (rank 0 aggregates)".into(),
        );
    }
    let data = Data::load(a.seed);
    let names: Vec<&str> = if a.scenario == "all" {
        vec![
            "uncoded",
            "gc",
            "uncoded-slow",
            "gc-slow",
            "gc-kill",
            "uncoded-kill",
        ]
    } else {
        vec![a.scenario.as_str()]
    };
    let mut reports = Vec::new();
    if Backend::detect().map_err(|e| e.to_string())? == Backend::Local {
        for name in names {
            let r = scenario(a, name, &data);
            println!(
                "{:<14} {:>7.2} s  accuracy {:.4}  mean responders {:.2}  late discarded {:>4}  {}",
                r.scenario,
                r.seconds,
                r.test_accuracy,
                r.mean_responders,
                r.late_discarded,
                r.error
                    .as_deref()
                    .map(|e| format!("ERROR: {e}"))
                    .unwrap_or_default()
            );
            reports.push(r);
        }
    } else {
        // One rank per process (mpirun, torchrun): stragglers sleep (no link model there).
        let name = names[0];
        if name.ends_with("kill") {
            // Open MPI aborts the whole job (mpirun kills every rank) when one rank exits without
            // MPI_Finalize or calls MPI_Abort; without ULFM there is no surviving a dead rank.
            return Err(format!(
                "scenario {name} is not run under MPI: Open MPI aborts the job when a rank exits early; \
                 run it in-process (without mpirun)"
            ));
        }
        if names.len() > 1 {
            return Err(
                "under MPI pass one --scenario (uncoded, gc, uncoded-slow or gc-slow)".into(),
            );
        }
        let comm = ferroccl::init().map_err(|e| e.to_string())?;
        let mode = if name.starts_with("gc") {
            Mode::Gc
        } else {
            Mode::Uncoded
        };
        let done = AtomicBool::new(false);
        let kill = name.ends_with("kill").then_some(a.kill);
        let mut r = train(&*comm, a, mode, kill, &data, &done, name.ends_with("slow"))
            .map_err(|e| e.to_string())?;
        r.scenario = name.into();
        if comm.rank() != 0 {
            return Ok(());
        }
        println!(
            "{name:<14} {:>7.2} s  accuracy {:.4}  mean responders {:.2}  late discarded {:>4}  (MPI, {} ranks)",
            r.seconds,
            r.test_accuracy,
            r.mean_responders,
            r.late_discarded,
            comm.world_size()
        );
        reports.push(r);
    }
    let get = |s: &str| reports.iter().find(|r| r.scenario == s);
    let mut failures = Vec::new();
    if let (Some(u), Some(g)) = (get("uncoded"), get("gc-slow")) {
        if (u.test_accuracy - g.test_accuracy).abs() > 0.02 {
            failures.push(format!(
                "GC with stragglers reached {:.4}, uncoded {:.4}",
                g.test_accuracy, u.test_accuracy
            ));
        }
    }
    for r in &reports {
        if r.scenario.starts_with("gc") && !r.ok {
            failures.push(format!("{} failed: {:?}", r.scenario, r.error));
        }
        if r.scenario == "uncoded-kill" && (r.ok || r.seconds > a.timeout_s + 30.0) {
            failures.push(format!(
                "uncoded-kill should fail within the timeout, got ok = {} after {:.1} s",
                r.ok, r.seconds
            ));
        }
    }
    let result = serde_json::json!({ "world": a.world, "s": a.s, "scenarios": reports });
    println!("RESULT {result}");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("straggler: {e}");
            ExitCode::FAILURE
        }
    }
}
