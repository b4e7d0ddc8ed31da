//! Straggler simulator: uncoded, GC, SR-SGC and M-SGC on the same virtual-time trace.
//!
//! ```text
//! cargo run --release --example straggler_sim                       # n = 256, 1000 rounds, bursty
//! cargo run --release --example straggler_sim -- --model exp --n 64
//! cargo run --release --example straggler_sim -- --trace times.csv   # rows = rounds, cols = workers
//! ```
//!
//! Schemes: uncoded; GC with `--gc-s` (and the best GC over s ∈ {1, 3, 7, 15, 31}); SR-SGC and M-SGC
//! (Krishnan et al., ICLR 2023) with their `(B, W, λ)` parameters (`--sr-b --sr-w --sr-lambda`,
//! `--ms-b --ms-w --ms-lambda`). `--wait earliest` (default) ends a round at the first arrival after
//! which the missing workers form an admissible straggler set; `--wait mu --mu 0.5` is the rule of the
//! paper's experiments. Prints the trace's straggler statistics and one table row per scheme (total and
//! per-round time, load per worker, stragglers per round, rounds that waited for everyone, exactness
//! of every decoded job), writes an SVG of the round times (`--plot`, default
//! `target/straggler_sim.svg`) and ends with one `RESULT {json}` line. Checks (non-zero exit if
//! violated): every scheme exact; GC's mean round time within 5% of the mean `(n − s)`-th order
//! statistic of its workers' finishing times.

use clap::Parser;
use ferroccl::coding::sequential::{Gc, MSgc, Planner, SrSgc, Uncoded};
use ferroccl::coding::Scheme;
use ferroccl::sim::{
    order_statistic, simulate_with, CostModel, Model, SchemeReport, Trace, WaitRule,
};
use plotters::prelude::*;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Workers.
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Rounds (jobs).
    #[arg(long, default_value_t = 1000)]
    rounds: usize,
    /// Straggler model: `ge` (bursty Gilbert–Elliott) or `exp` (i.i.d. shifted exponential).
    #[arg(long, default_value = "ge")]
    model: String,
    /// Replay a CSV trace instead (rows = rounds, columns = workers, seconds per partition).
    #[arg(long)]
    trace: Option<String>,
    /// Shift of the exponential (seconds per partition).
    #[arg(long, default_value_t = 1.0)]
    shift: f64,
    /// Rate of the exponential tail.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Gilbert–Elliott good → bad probability per round.
    #[arg(long, default_value_t = 0.005)]
    p_gb: f64,
    /// Gilbert–Elliott bad → good probability per round.
    #[arg(long, default_value_t = 0.2)]
    p_bg: f64,
    /// Slowdown in the bad state.
    #[arg(long, default_value_t = 5.0)]
    slow: f64,
    /// GC's s (stragglers per round; (s+1) | n for the fractional-repetition code).
    #[arg(long, default_value_t = 7)]
    gc_s: usize,
    /// SR-SGC's burst length B (B | W − 1).
    #[arg(long, default_value_t = 2)]
    sr_b: usize,
    /// SR-SGC's window W.
    #[arg(long, default_value_t = 3)]
    sr_w: usize,
    /// SR-SGC's λ (distinct stragglers per window); s = ceil(Bλ / (W − 1 + B)).
    #[arg(long, default_value_t = 15)]
    sr_lambda: usize,
    /// M-SGC's burst length B.
    #[arg(long, default_value_t = 30)]
    ms_b: usize,
    /// M-SGC's window W (> B).
    #[arg(long, default_value_t = 31)]
    ms_w: usize,
    /// M-SGC's λ.
    #[arg(long, default_value_t = 127)]
    ms_lambda: usize,
    /// Waiting rule: `earliest` or `mu`.
    #[arg(long, default_value = "earliest")]
    wait: String,
    /// μ of `--wait mu`.
    #[arg(long, default_value_t = 0.5)]
    mu: f64,
    /// Fixed per-round worker work, in partitions (invocation, model transfer).
    #[arg(long, default_value_t = 4.0)]
    overhead: f64,
    /// Fixed per-round master cost, seconds.
    #[arg(long, default_value_t = 0.0)]
    master: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// SVG output.
    #[arg(long, default_value = "target/straggler_sim.svg")]
    plot: String,
}

fn plot(path: &str, reports: &[SchemeReport]) -> Result<(), String> {
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let rounds = reports
        .iter()
        .map(|r| r.round_times.len())
        .max()
        .unwrap_or(1);
    let ymax = reports
        .iter()
        .flat_map(|r| r.round_times.iter().copied())
        .fold(0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "round time per scheme (virtual seconds)",
            ("sans-serif", 22),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0..rounds, 0f64..ymax.max(1e-9))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("seconds")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for (k, r) in reports.iter().enumerate() {
        let c = colors[k % colors.len()];
        chart
            .draw_series(LineSeries::new(
                r.round_times.iter().enumerate().map(|(i, &t)| (i, t)),
                c.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("{} (total {:.0})", r.scheme, r.total_time))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn run(a: &Args) -> Result<(), String> {
    let e = |e: ferroccl::Error| e.to_string();
    let (trace, model_desc) = match &a.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            (Trace::from_csv(&text).map_err(e)?, format!("csv:{path}"))
        }
        None => {
            let model = match a.model.as_str() {
                "exp" => Model::ShiftedExp {
                    shift: a.shift,
                    rate: a.rate,
                },
                "ge" => Model::GilbertElliott {
                    shift: a.shift,
                    rate: a.rate,
                    p_gb: a.p_gb,
                    p_bg: a.p_bg,
                    slow: a.slow,
                },
                m => return Err(format!("unknown --model {m}; use ge or exp")),
            };
            let desc = serde_json::to_string(&model).unwrap_or_default();
            (
                Trace::generate(&model, a.n, a.rounds, a.seed).map_err(e)?,
                desc,
            )
        }
    };
    let n = trace.n();
    let stats = trace.stats(2.0);
    println!(
        "trace {model_desc}: n = {n}, rounds = {}, median {:.3} s/partition, p99 {:.3}; slow (> 2x median): \
         {:.2}% of samples, {:.1} per round (max {}), mean burst {:.1} rounds (longest {})",
        trace.rounds(),
        stats.median,
        stats.p99,
        100.0 * stats.slow_fraction,
        stats.mean_slow_per_round,
        stats.max_slow_per_round,
        stats.mean_burst,
        stats.longest_burst
    );
    let cost = CostModel {
        overhead: a.overhead,
        master: a.master,
    };
    let rule = match a.wait.as_str() {
        "earliest" => WaitRule::Earliest,
        "mu" => WaitRule::Mu(a.mu),
        w => return Err(format!("unknown --wait {w}; use earliest or mu")),
    };
    let mut planners: Vec<Box<dyn Planner>> = vec![
        Box::new(Uncoded::new(n).map_err(e)?),
        Box::new(Gc::new(Scheme::FractionalRepetition, n, a.gc_s, a.seed).map_err(e)?),
        Box::new(SrSgc::new(n, a.sr_b, a.sr_w, a.sr_lambda, a.seed).map_err(e)?),
        Box::new(MSgc::new(n, a.ms_b, a.ms_w, a.ms_lambda, a.seed).map_err(e)?),
    ];
    let t0 = Instant::now();
    let mut reports = Vec::new();
    for p in planners.iter_mut() {
        reports.push(simulate_with(p.as_mut(), &trace, &cost, rule).map_err(e)?);
    }
    // The best plain GC over a few s (fractional repetition where (s+1) | n, cyclic otherwise).
    let mut best_gc: Option<SchemeReport> = None;
    for s in [1usize, 3, 7, 15, 31].into_iter().filter(|&s| s < n) {
        let scheme = if n % (s + 1) == 0 {
            Scheme::FractionalRepetition
        } else {
            Scheme::Cyclic
        };
        let mut g = Gc::new(scheme, n, s, a.seed).map_err(e)?;
        let r = simulate_with(&mut g, &trace, &cost, rule).map_err(e)?;
        if best_gc
            .as_ref()
            .map_or(true, |b| r.total_time < b.total_time)
        {
            best_gc = Some(r);
        }
    }
    if let Some(b) = best_gc.clone() {
        let mut b = b;
        b.scheme = format!("best {}", b.scheme);
        reports.push(b);
    }
    let sim_seconds = t0.elapsed().as_secs_f64();

    // GC against the (n − s)-th order statistic of its workers' finishing times.
    let k = n - a.gc_s;
    let gc_load = (a.gc_s + 1) as f64;
    let os_mean: f64 = (0..trace.rounds())
        .map(|r| {
            let f: Vec<f64> = trace
                .row(r)
                .iter()
                .map(|x| x * (a.overhead + gc_load))
                .collect();
            order_statistic(&f, k)
        })
        .sum::<f64>()
        / trace.rounds() as f64;
    let gc_ratio = reports[1].mean_round / os_mean;

    println!(
        "{:<30} {:>10} {:>9} {:>9} {:>9} {:>7} {:>8} {:>10} {:>7} {:>6} {:>6}",
        "scheme",
        "total s",
        "mean s",
        "p50 s",
        "p99 s",
        "load",
        "max load",
        "stragglers",
        "waitall",
        "jobs",
        "exact"
    );
    for r in &reports {
        println!(
            "{:<30} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>7.3} {:>8.3} {:>10.2} {:>7} {:>6} {:>6}",
            r.scheme,
            r.total_time,
            r.mean_round,
            r.p50_round,
            r.p99_round,
            r.mean_load,
            r.max_load,
            r.mean_stragglers,
            r.rounds_waited_all,
            r.jobs_decoded,
            if r.exact { "yes" } else { "NO" }
        );
    }
    let gc = reports[1].total_time;
    let speedup = |i: usize| 1.0 - reports[i].total_time / gc;
    let best = reports.get(4).map_or(gc, |b| b.total_time);
    let msgc_vs_best = 1.0 - reports[3].total_time / best;
    println!(
        "vs {}: uncoded {:+.1}%, SR-SGC {:+.1}%, M-SGC {:+.1}% faster; M-SGC vs {} {:+.1}%; GC mean round / mean (n-s)-th order statistic = {:.4}; simulated in {:.3} s",
        reports[1].scheme,
        100.0 * speedup(0),
        100.0 * speedup(2),
        100.0 * speedup(3),
        reports.get(4).map_or("GC", |b| b.scheme.as_str()),
        100.0 * msgc_vs_best,
        gc_ratio,
        sim_seconds
    );
    if let Some(dir) = std::path::Path::new(&a.plot).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    plot(&a.plot, &reports)?;
    println!("plot: {}", a.plot);

    let mut failures = Vec::new();
    if let Some(r) = reports.iter().find(|r| !r.exact) {
        failures.push(format!(
            "{} decoded a job inexactly (error {:e})",
            r.scheme, r.max_error
        ));
    }
    if rule == WaitRule::Earliest && (gc_ratio - 1.0).abs() > 0.05 {
        failures.push(format!(
            "GC round time is {gc_ratio:.3}x the (n-s)-th order statistic"
        ));
    }
    let result = serde_json::json!({
        "n": n,
        "rounds": trace.rounds(),
        "model": model_desc,
        "cost": cost,
        "trace_stats": stats,
        "schemes": reports,
        "gc_over_order_statistic": gc_ratio,
        "wait": rule,
        "msgc_faster_than_gc": speedup(3),
        "msgc_faster_than_best_gc": msgc_vs_best,
        "srsgc_faster_than_gc": speedup(2),
        "uncoded_faster_than_gc": speedup(0),
        "sim_seconds": sim_seconds,
    });
    println!("RESULT {result}");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("straggler_sim: {e}");
            ExitCode::FAILURE
        }
    }
}
