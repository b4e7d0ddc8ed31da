//! One gradient sync, dense against Deep Gradient Compression, timed on whatever network the ranks
//! have — and the link model's prediction of the same run — for `benches/slow_link.sh` (issue 24).
//!
//! ```text
//! # measured: 4 TCP ranks over a 1 Gbit/s shaped loopback
//! benches/slow_link.sh 1gbit -- target/release/examples/slow_link
//! # predicted: 4 in-process ranks under the link model of that loopback, in virtual time
//! target/release/examples/slow_link --model-gbit 1 --sweep
//! ```
//!
//! Per rep, on one communicator (every rank, barrier before each): the dense all-reduce (Avg) of an
//! `--n`-float gradient (ResNet-50: 25,557,032), `Dgc::step` on it at `--density` after warm-up, then
//! the same gradient as `--tensors` equal tensors through a `Bucketer` (25 MiB buckets) with the plain
//! all-reduce hook and with `DgcHook`. The first rep is a warm-up; the median of the others is
//! reported, the maximum over ranks. Then `Dgc::step` on a world of one (no network; the compression
//! alone, under the same machine load), so a DGC sync splits into compression and exchange. `--sweep` also times all-reduces of 1 KiB–256 MiB (×4).
//!
//! `--model-gbit R` runs `--world` in-process ranks under `local::run_with` with a [`LinkModel`] in
//! virtual time instead, modelling the shaped loopback: `tc tbf` on `lo` shares its rate among every
//! flow of every rank, and the ring algorithms keep `world` flows busy at once, so each directed link
//! gets `R / world`; the latency is `--latency-us` (loopback's, measured ~10–20 µs). Virtual time charges
//! only the network: DGC's compression (CPU) is not in the prediction, which the table says.
//!
//! Rank 0 prints a table and one `RESULT {json}` line.

use clap::Parser;
use ferroccl::bucket::Bucketer;
use ferroccl::dgc::{Dgc, DgcConfig, DgcHook};
use ferroccl::local::{Link, LinkModel, Options, TimeMode};
use ferroccl::prelude::*;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Gradient length in floats (ResNet-50: 25,557,032).
    #[arg(long, default_value_t = 25_557_032)]
    n: usize,
    /// DGC density after warm-up (0.001 = 99.9% sparsity).
    #[arg(long, default_value_t = 0.001)]
    density: f64,
    /// Timed reps (after one warm-up rep); the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tensors the gradient is cut into for the bucketer runs.
    #[arg(long, default_value_t = 16)]
    tensors: usize,
    /// Bucket size in MiB.
    #[arg(long, default_value_t = 25)]
    bucket_mib: usize,
    /// Also time all-reduces of 1 KiB to 256 MiB (factor 4).
    #[arg(long)]
    sweep: bool,
    /// Largest sweep size in MiB.
    #[arg(long, default_value_t = 256)]
    sweep_max_mib: usize,
    /// Predict instead of measure: in-process ranks under the link model of a loopback shaped to
    /// this many Gbit/s (shared by all flows).
    #[arg(long)]
    model_gbit: Option<f64>,
    /// Ranks for `--model-gbit` (otherwise the launcher's world).
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// One-way latency of the modelled link, µs.
    #[arg(long, default_value_t = 15.0)]
    latency_us: f64,
    /// Report instead of run: read the JSON results `benches/slow_link_all.sh` wrote into DIR, print
    /// the markdown tables (measured beside the model) and draw `--plot`.
    #[arg(long, value_name = "DIR")]
    report: Option<String>,
    /// `--report`: SVG of time per sync against link rate (measured points, model lines).
    #[arg(long, default_value = "benches/slow_link.svg")]
    plot: String,
}

/// Seconds on this rank's clock: virtual under the link model, else wall time since `t0`.
fn now(comm: &dyn Communicator, t0: Instant) -> f64 {
    comm.virtual_time()
        .map(|d| d.as_secs_f64())
        .unwrap_or_else(|| t0.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Time `f` after a barrier: seconds on this rank.
fn timed(comm: &dyn Communicator, t0: Instant, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    comm.barrier()?;
    let a = now(comm, t0);
    f()?;
    Ok(now(comm, t0) - a)
}

/// Rank `r`'s gradient: small integers, different on every rank.
fn grad(n: usize, r: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u64).wrapping_mul(2_654_435_761) ^ (r as u64 * 97)) % 17) as f32 - 8.0)
        .collect()
}

#[derive(Default)]
struct Out {
    dense: Vec<f64>,
    dgc: Vec<f64>,
    bucket_dense: Vec<f64>,
    bucket_dgc: Vec<f64>,
    dgc_message_bytes: usize,
    sweep: Vec<(usize, f64)>,
}

fn run_rank(comm: &dyn Communicator, a: &Args) -> Result<Option<serde_json::Value>> {
    let t0 = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let base = grad(a.n, rank);
    let cfg = DgcConfig::default()
        .final_density(a.density)
        .warmup_enabled(false);
    let mut dgc = Dgc::new(a.n, cfg.clone())?;
    let mut hook = Some(DgcHook::new(cfg)?);
    let per = a.n.div_ceil(a.tensors.max(1));
    let bucket_bytes = a.bucket_mib << 20;
    let mut o = Out::default();
    let mut g = base.clone();
    for rep in 0..=a.reps {
        g.copy_from_slice(&base);
        let d = timed(comm, t0, &mut || comm.all_reduce(&mut g, ReduceOp::Avg))?;
        g.copy_from_slice(&base);
        let mut msg = 0;
        let s = timed(comm, t0, &mut || {
            msg = dgc.step(comm, &mut g, 1e3)?.message_bytes;
            Ok(())
        })?;
        let bd = timed(comm, t0, &mut || {
            let mut b = Bucketer::new(comm, bucket_bytes, ReduceOp::Avg);
            for (id, t) in base.chunks(per).enumerate() {
                b.push(id, t)?;
            }
            b.finish(|id, v| g[id * per..id * per + v.len()].copy_from_slice(v))
        })?;
        let bs = timed(comm, t0, &mut || {
            let mut h = hook.take().expect("hook");
            h.epoch = 1e3;
            let mut b = Bucketer::with_hook(comm, bucket_bytes, h);
            for (id, t) in base.chunks(per).enumerate() {
                b.push(id, t)?;
            }
            let r = b.finish(|id, v| g[id * per..id * per + v.len()].copy_from_slice(v));
            hook = Some(b.into_hook());
            r
        })?;
        if rep > 0 {
            o.dense.push(d);
            o.dgc.push(s);
            o.bucket_dense.push(bd);
            o.bucket_dgc.push(bs);
            o.dgc_message_bytes = msg;
        }
    }
    // DGC's CPU part alone: the same steps on a world of one (no network) on this rank, under the same
    // machine load, so the sync time splits into compression and exchange.
    let compute = if comm.virtual_time().is_some() {
        f64::NAN // the model charges the network only
    } else {
        let (n, density, reps) = (a.n, a.density, a.reps);
        let base = &base;
        ferroccl::local::run(1, move |c| {
            let cfg = DgcConfig::default()
                .final_density(density)
                .warmup_enabled(false);
            let mut d = Dgc::new(n, cfg)?;
            let mut g = base.clone();
            let mut ts = Vec::new();
            for rep in 0..=reps {
                g.copy_from_slice(base);
                let t = Instant::now();
                d.step(c, &mut g, 1e3)?;
                if rep > 0 {
                    ts.push(t.elapsed().as_secs_f64());
                }
            }
            Ok(median(ts))
        })?[0]
    };
    if a.sweep {
        let mut bytes = 1024;
        while bytes <= a.sweep_max_mib << 20 {
            let mut v = vec![1.0f32; bytes / 4];
            let mut ts = Vec::new();
            for rep in 0..=a.reps {
                let t = timed(comm, t0, &mut || comm.all_reduce(&mut v, ReduceOp::Sum))?;
                if rep > 0 {
                    ts.push(t);
                }
            }
            o.sweep.push((bytes, median(ts)));
            bytes *= 4;
        }
    }
    // The slowest rank's medians.
    let mut t = vec![
        median(o.dense.clone()),
        median(o.dgc.clone()),
        median(o.bucket_dense.clone()),
        median(o.bucket_dgc.clone()),
        compute,
    ];
    t.extend(o.sweep.iter().map(|s| s.1));
    // (under the link model the compute run is real time; the network-only prediction is dgc_s)
    comm.all_reduce(&mut t, ReduceOp::Max)?;
    if rank != 0 {
        return Ok(None);
    }
    Ok(Some(serde_json::json!({
        "world": world,
        "n": a.n,
        "density": a.density,
        "reps": a.reps,
        "dgc_message_bytes": o.dgc_message_bytes,
        "dense_s": t[0],
        "dgc_s": t[1],
        "bucket_dense_s": t[2],
        "bucket_dgc_s": t[3],
        "dgc_compute_only_s": t[4],
        "sweep": o.sweep.iter().zip(&t[5..]).map(|(s, &x)| serde_json::json!({"bytes": s.0, "s": x})).collect::<Vec<_>>(),
    })))
}

fn run(a: &Args) -> std::result::Result<(), String> {
    let (mut res, how) = match a.model_gbit {
        Some(gbit) => {
            if gbit.is_nan() || gbit <= 0.0 || a.world < 2 {
                return Err("--model-gbit needs a positive rate and --world >= 2".into());
            }
            let link = Link::gbit(
                gbit / a.world as f64,
                Duration::from_secs_f64(a.latency_us * 1e-6),
            );
            let opts = Options {
                link: Some(LinkModel::uniform(TimeMode::Virtual, link)),
                ..Options::default()
            };
            let v = ferroccl::local::run_with(a.world, &opts, |c| run_rank(c, a))
                .map_err(|e| e.to_string())?;
            (
                v.into_iter().next().flatten(),
                format!("model: {gbit} Gbit/s shared by {} ranks ({:.3} Gbit/s per link), {} µs, virtual time (network only)", a.world, gbit / a.world as f64, a.latency_us),
            )
        }
        None => {
            let comm = ferroccl::init().map_err(|e| e.to_string())?;
            let how = format!(
                "measured: {} ranks, {} backend, wall time",
                comm.world_size(),
                comm.backend()
            );
            (run_rank(&*comm, a).map_err(|e| e.to_string())?, how)
        }
    };
    let Some(r) = res.as_mut() else {
        return Ok(());
    };
    r["how"] = serde_json::json!(how);
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("# {how}; gradient {} floats, density {}", a.n, a.density);
    println!(
        "| sync | seconds (median of {}) | vs dense all_reduce |",
        a.reps
    );
    println!("|---|---|---|");
    for (name, k) in [
        ("dense all_reduce (Avg)", "dense_s"),
        ("Dgc::step", "dgc_s"),
        ("Bucketer (all-reduce hook)", "bucket_dense_s"),
        ("Bucketer + DgcHook", "bucket_dgc_s"),
        (
            "Dgc::step on a world of 1 (compression only, slowest rank)",
            "dgc_compute_only_s",
        ),
    ] {
        println!(
            "| {name} | {:.4} | {:.1}× faster |",
            f(k),
            f("dense_s") / f(k)
        );
    }
    let w = r["world"].as_f64().unwrap_or(1.0);
    if let Some(s) = r["sweep"].as_array() {
        for row in s {
            let (b, t) = (
                row["bytes"].as_f64().unwrap_or(0.0),
                row["s"].as_f64().unwrap_or(0.0),
            );
            println!(
                "# all_reduce {:>10} B {:>10.6} s  busbw {:.3} GB/s",
                b,
                t,
                b / t * 2.0 * (w - 1.0) / w / 1e9
            );
        }
    }
    println!("RESULT {r}");
    Ok(())
}

#[path = "common/slow_link_report.rs"]
mod report;

fn main() -> ExitCode {
    let a = Args::parse();
    if let Some(dir) = &a.report {
        return match report::report(dir, &a.plot) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("slow_link --report: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slow_link: {e}");
            ExitCode::FAILURE
        }
    }
}
