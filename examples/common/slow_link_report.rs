//! `slow_link --report DIR`: the markdown tables of benches/RESULTS.md's issue-24 section and the SVG
//! of time per sync against link rate, from the JSON lines `benches/slow_link_all.sh` wrote. Measured
//! figures are medians over the repetitions found; each sits beside the link model's prediction.

use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

type R<T> = Result<T, String>;

/// `1gbit` → 1.0, `2500mbit` → 2.5 (Gbit/s).
fn gbit(rate: &str) -> Option<f64> {
    if let Some(n) = rate.strip_suffix("gbit") {
        n.parse().ok()
    } else {
        rate.strip_suffix("mbit")
            .and_then(|n| n.parse::<f64>().ok())
            .map(|m| m / 1e3)
    }
}

fn load(path: &Path) -> R<Value> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(s.trim()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Files `prefix<rate><suffix>` in `dir`, keyed by rate (Gbit/s, as an ordered key ×1000).
fn by_rate(dir: &Path, prefix: &str, suffix: &str) -> R<BTreeMap<u64, (String, Vec<Value>)>> {
    let mut out: BTreeMap<u64, (String, Vec<Value>)> = BTreeMap::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(suffix) else {
            continue;
        };
        let rate = rest.split('_').next().unwrap_or(rest);
        let Some(g) = gbit(rate) else { continue };
        let v = load(&dir.join(&name))?;
        out.entry((g * 1e3).round() as u64)
            .or_insert_with(|| (rate.to_string(), Vec::new()))
            .1
            .push(v);
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

pub fn report(dir: &str, plot: &str) -> R<()> {
    let dir = Path::new(dir);
    let models = by_rate(dir, "model_", ".json")?;
    let model = |key: u64| models.get(&key).and_then(|m| m.1.first());

    // all_reduce sweeps
    for (key, (rate, runs)) in by_rate(dir, "allreduce_", ".json")? {
        let bps = key as f64 / 1e3 * 1e9 / 8.0;
        let world = runs[0]["world"].as_f64().unwrap_or(4.0);
        println!("\n**all_reduce over TCP, 4 processes, lo shaped to {rate}** (median of {} runs, each `-n 3 -w 1`; wire rate = bytes all ranks sent / time, against the shaped {:.3} GB/s)\n", runs.len(), bps / 1e9);
        println!("| size (B) | time (µs) | busbw (GB/s) | wire rate (GB/s) | wire / shaped | model time (µs) | measured / model |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        let sizes: Vec<f64> = runs[0]["rows"]
            .as_array()
            .map(|r| r.iter().map(|x| f(x, "size")).collect())
            .unwrap_or_default();
        let mut large = Vec::new();
        for size in sizes {
            let rows: Vec<&Value> = runs
                .iter()
                .filter_map(|r| r["rows"].as_array()?.iter().find(|x| f(x, "size") == size))
                .collect();
            let t = median(rows.iter().map(|x| f(x, "time_us")).collect());
            let bus = median(rows.iter().map(|x| f(x, "busbw_gbps")).collect());
            let sent = f(rows[0], "rank0_bytes_sent_per_op") * world;
            let wire = sent / (t * 1e-6) / 1e9;
            let m = model(key)
                .and_then(|m| {
                    m["sweep"]
                        .as_array()?
                        .iter()
                        .find(|x| f(x, "bytes") == size)
                })
                .map(|x| f(x, "s") * 1e6)
                .unwrap_or(f64::NAN);
            if size >= (16 << 20) as f64 {
                large.push(wire / (bps / 1e9));
            }
            println!(
                "| {size} | {t:.1} | {bus:.4} | {wire:.4} | {:.3} | {m:.1} | {:.2} |",
                wire / (bps / 1e9),
                t / m
            );
        }
        let min = large.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "\nwire / shaped at >= 16 MiB: min {min:.3} — target >= 0.85: {}",
            if min >= 0.85 { "met" } else { "not met" }
        );
    }

    // sync: dense vs DGC
    let syncs = by_rate(dir, "sync_", ".json")?;
    println!("\n**One sync of a 25,557,032-float gradient, 4 processes over TCP, 99.9% sparsity** (median of the reps in each run; model = link model in virtual time, network only)\n");
    println!("| rate | dense all_reduce (s) | Dgc::step (s) | dense / Dgc::step | Dgc::step compression alone (s) | Bucketer (s) | Bucketer+DgcHook (s) | Bucketer / +DgcHook | model dense (s) | model DGC (s) | dense measured / model |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut pts: Vec<(f64, [f64; 4])> = Vec::new();
    for (key, (rate, runs)) in &syncs {
        let r = &runs[0];
        let (d, g, bd, bg) = (
            f(r, "dense_s"),
            f(r, "dgc_s"),
            f(r, "bucket_dense_s"),
            f(r, "bucket_dgc_s"),
        );
        let (md, mg) = model(*key)
            .map(|m| (f(m, "dense_s"), f(m, "dgc_s")))
            .unwrap_or((f64::NAN, f64::NAN));
        println!("| {rate} | {d:.3} | {g:.4} | {:.1}× | {:.4} | {bd:.3} | {bg:.4} | {:.1}× | {md:.3} | {mg:.4} | {:.2} |", d / g, f(r, "dgc_compute_only_s"), bd / bg, d / md);
        pts.push((*key as f64 / 1e3, [d, g, md, mg]));
    }

    // dgc_train
    println!("\n**dgc_train (MLP, digits, 16 epochs), 4 processes over TCP** (one run per rate)\n");
    println!("| rate | variant | test accuracy | wall time (s) | bytes sent |");
    println!("|---|---|---:|---:|---:|");
    for (_, (rate, runs)) in by_rate(dir, "dgc_train_", ".json")? {
        for v in runs[0]["variants"].as_array().into_iter().flatten() {
            println!(
                "| {rate} | {} | {:.2}% | {:.2} | {:.0} |",
                v["name"].as_str().unwrap_or("?"),
                100.0 * f(v, "test_accuracy"),
                f(v, "seconds"),
                f(v, "bytes_sent")
            );
        }
    }

    // gradient coding
    println!("\n**Gradient coding, 4 processes over TCP, cyclic (4, 1) code, rank 3 sleeping `--delay-ms` 40 per step** (one run each; model = the example's in-process run under its link model, real time)\n");
    println!("| rate | scenario | wall time (s) | test accuracy | mean responders |");
    println!("|---|---|---:|---:|---:|");
    for sc in ["uncoded", "uncoded-slow", "gc-slow"] {
        for (_, (rate, runs)) in by_rate(dir, &format!("straggler_{sc}_"), ".json")? {
            let r = &runs[0]["scenarios"][0];
            println!(
                "| {rate} | {sc} | {:.2} | {:.4} | {:.2} |",
                f(r, "seconds"),
                f(r, "test_accuracy"),
                f(r, "mean_responders")
            );
        }
        let p = dir.join(format!("model_straggler_{sc}.json"));
        if p.exists() {
            let r = &load(&p)?["scenarios"][0];
            println!(
                "| model | {sc} | {:.2} | {:.4} | {:.2} |",
                f(r, "seconds"),
                f(r, "test_accuracy"),
                f(r, "mean_responders")
            );
        }
    }
    draw(plot, &pts)?;
    println!("\n# wrote {plot}");
    Ok(())
}

/// Time per sync (log) against link rate (log): measured dense and DGC as points joined by lines,
/// the model's predictions dashed.
fn draw(path: &str, pts: &[(f64, [f64; 4])]) -> R<()> {
    if pts.is_empty() {
        return Err("no sync_*.json results to plot".into());
    }
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let root = SVGBackend::new(path, (720, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    let ys: Vec<f64> = pts.iter().flat_map(|p| p.1).filter(|y| *y > 0.0).collect();
    let (x0, x1) = (xs[0] / 1.3, xs[xs.len() - 1] * 1.3);
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::INFINITY, f64::min) / 2.0,
        ys.iter().cloned().fold(0.0, f64::max) * 2.0,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "25.5 M-float gradient sync, 4 ranks, TCP over shaped loopback",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("loopback rate, Gbit/s (shared by all ranks)")
        .y_desc("seconds per sync")
        .draw()
        .map_err(|e| e.to_string())?;
    let series = [
        (0, "dense all_reduce, measured", RED, false),
        (1, "DGC 99.9% (Dgc::step), measured", BLUE, false),
        (2, "dense, link model", RED, true),
        (3, "DGC, link model (network only)", BLUE, true),
    ];
    for (i, name, c, dashed) in series {
        let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.1[i])).collect();
        if dashed {
            chart
                .draw_series(DashedLineSeries::new(line, 6, 4, c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        } else {
            chart
                .draw_series(LineSeries::new(line.clone(), c.stroke_width(1)))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
