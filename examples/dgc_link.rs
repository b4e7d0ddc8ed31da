//! Time per gradient sync on a slow link: dense all-reduce vs Deep Gradient Compression.
//!
//! ```text
//! cargo run --release --example dgc_link                      # 4 ranks, 25.5 M floats, 1 and 10 Gbit/s
//! cargo run --release --example dgc_link -- --world 8 --gbit 1,10,25
//! ```
//!
//! The in-process backend's link model charges every message `latency + bytes / bandwidth` in
//! *virtual* time (nothing sleeps), so a ResNet-50-sized gradient (25,557,032 floats, 97.5 MiB) over
//! 1 Gbit/s costs only the real time of the memory traffic. For each link speed the program runs a
//! dense ring all-reduce (Avg) and a DGC step at 99.9% sparsity (fixed-k u32/f32, and the compact
//! format: counts-then-gather, delta-varint, bf16), and reports the modelled communication time per
//! sync. The CPU time of DGC's compression (sampling, fused update, selection, encode) is measured in
//! the same run with one rank alone on a core, and reported separately: the link model charges
//! communication only. Ends with one `RESULT {json}` line; exits non-zero if DGC is less than
//! `--min-speedup` times faster than dense on any link (communication time).

use clap::Parser;
use ferroccl::dgc::{Dgc, DgcConfig};
use ferroccl::local::{Link, LinkModel, Options, TimeMode};
use ferroccl::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Dense vs DGC sync time on modelled slow links.
#[derive(Parser, Debug)]
struct Args {
    /// Ranks.
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Gradient length (ResNet-50: 25,557,032).
    #[arg(long, default_value_t = 25_557_032)]
    n: usize,
    /// Link speeds in Gbit/s.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    gbit: Vec<f64>,
    /// One-way link latency in microseconds.
    #[arg(long, default_value_t = 50)]
    latency_us: u64,
    /// DGC density after warm-up.
    #[arg(long, default_value_t = 0.001)]
    density: f64,
    /// Syncs measured per variant (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Fail if DGC's sync is less than this many times faster than dense.
    #[arg(long, default_value_t = 20.0)]
    min_speedup: f64,
}

fn grad(n: usize, rank: usize, rep: usize) -> Vec<f32> {
    let mut s = (rank as u64) << 32 | rep as u64;
    (0..n)
        .map(|_| {
            s = ferroccl::dgc::select::mix64(s);
            let a = (s >> 40) as f32 / (1u64 << 24) as f32;
            let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
            sign * a * a * a * 1e-2
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Modelled seconds per sync for each variant on one link (rank 0's clock).
fn sync_times(
    args: &Args,
    gbit: f64,
    cfgs: &[(&str, Option<DgcConfig>)],
) -> Result<Vec<(f64, u64)>> {
    let model = LinkModel::uniform(
        TimeMode::Virtual,
        Link::gbit(gbit, Duration::from_micros(args.latency_us)),
    );
    let opts = Options {
        link: Some(model),
        ..Default::default()
    };
    let out = ferroccl::local::run_with(args.world, &opts, |comm| {
        let mut res = Vec::new();
        for (_, cfg) in cfgs {
            let mut dgc = cfg.clone().map(|c| Dgc::new(args.n, c)).transpose()?;
            let (mut times, mut bytes) = (Vec::new(), 0);
            for rep in 0..args.reps {
                let mut g = grad(args.n, comm.rank(), rep);
                comm.barrier()?;
                let t0 = comm.virtual_time().unwrap_or_default();
                let b0 = comm.bytes_sent();
                match dgc.as_mut() {
                    Some(d) => {
                        d.step(comm, &mut g, 10.0)?;
                    }
                    None => comm.all_reduce(&mut g, ReduceOp::Avg)?,
                }
                // Everyone done: the sync's time is when the last rank has its result.
                let mut t = [(comm.virtual_time().unwrap_or_default() - t0).as_secs_f64()];
                comm.all_reduce(&mut t, ReduceOp::Max)?;
                times.push(t[0]);
                bytes = comm.bytes_sent() - b0;
            }
            res.push((median(times), bytes));
        }
        Ok(res)
    })?;
    Ok(out.into_iter().next().unwrap_or_default())
}

/// CPU time of one DGC compression step (rank alone, world of 1: the exchange is a local copy).
fn compress_seconds(args: &Args, cfg: &DgcConfig) -> Result<f64> {
    let t = ferroccl::local::run(1, |comm| {
        let mut d = Dgc::new(args.n, cfg.clone())?;
        let mut times = Vec::new();
        for rep in 0..args.reps.max(2) {
            let mut g = grad(args.n, 0, rep);
            let t0 = Instant::now();
            d.step(comm, &mut g, 10.0)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        Ok(median(times))
    })?;
    Ok(t[0])
}

fn run(args: &Args) -> std::result::Result<bool, String> {
    let base = DgcConfig::default().final_density(args.density);
    let cfgs: Vec<(&str, Option<DgcConfig>)> = vec![
        ("dense all-reduce", None),
        ("DGC u32+f32 fixed-k", Some(base.clone())),
        ("DGC delta-varint+bf16", Some(base.clone().compact())),
    ];
    let bar = ProgressBar::with_draw_target(
        Some(args.gbit.len() as u64 + 1),
        ProgressDrawTarget::stderr(),
    )
    .with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}")
            .map_err(|e| e.to_string())?,
    );
    bar.set_message("CPU compress time");
    let cpu = compress_seconds(args, &base).map_err(|e| e.to_string())?;
    let cpu_compact = compress_seconds(args, &base.clone().compact()).map_err(|e| e.to_string())?;
    bar.inc(1);
    let mut rows = Vec::new();
    let mut ok = true;
    for &g in &args.gbit {
        bar.set_message(format!("{g} Gbit/s"));
        let t = sync_times(args, g, &cfgs).map_err(|e| e.to_string())?;
        let dense = t[0].0;
        for (i, ((name, _), (secs, bytes))) in cfgs.iter().zip(&t).enumerate() {
            let speedup = dense / secs;
            if i > 0 && speedup < args.min_speedup {
                ok = false;
            }
            rows.push(serde_json::json!({
                "gbit": g, "variant": name, "seconds_per_sync": secs, "bytes_sent_rank0": bytes,
                "speedup_vs_dense": speedup,
                "cpu_compress_seconds": match i { 0 => 0.0, 1 => cpu, _ => cpu_compact },
            }));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{} floats ({:.1} MiB), {} ranks, latency {} µs, density {}; link time from the model (virtual), CPU compress measured alone",
        args.n,
        args.n as f64 * 4.0 / (1 << 20) as f64,
        args.world,
        args.latency_us,
        args.density
    );
    println!("| link | variant | time/sync (link model) | bytes sent (rank 0) | speedup vs dense | + CPU compress | speedup incl. CPU compress |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let secs = r["seconds_per_sync"].as_f64().unwrap_or(f64::NAN);
        let cpu = r["cpu_compress_seconds"].as_f64().unwrap_or(0.0);
        let dense = secs * r["speedup_vs_dense"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} Gbit/s | {} | {:.2} ms | {} | {:.1}× | {:.1} ms | {:.1}× |",
            r["gbit"],
            r["variant"].as_str().unwrap_or(""),
            secs * 1e3,
            r["bytes_sent_rank0"],
            r["speedup_vs_dense"].as_f64().unwrap_or(f64::NAN),
            cpu * 1e3,
            dense / (secs + cpu)
        );
    }
    let result = serde_json::json!({
        "n": args.n, "world": args.world, "latency_us": args.latency_us, "density": args.density,
        "cpu_compress_seconds": cpu, "cpu_compress_seconds_compact": cpu_compact, "rows": rows,
    });
    println!("RESULT {result}");
    Ok(ok)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "dgc_link: DGC is less than {}× faster than dense on some link",
                args.min_speedup
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dgc_link: {e}");
            ExitCode::FAILURE
        }
    }
}
