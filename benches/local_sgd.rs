//! DiLoCo's outer step on the CPU (the all-reduce excluded) against memcpy, in the same run.
//!
//! The outer step is what `LocalSgd` does around the exchange: `Δ = φ − θ` (read 2 arrays, write 1),
//! then the fused Nesterov update and write-back `m ← μm + Δ; φ ← φ − lr(Δ + μm); θ ← φ` (read Δ, φ,
//! m; write m, φ, θ): 9 array passes, 36 bytes per parameter touched. The peer is `copy_from_slice`
//! of one array into another (8 bytes per element touched). Both single-threaded, best of the
//! repetitions. The ratio of the two bandwidths (bytes touched / time) is the figure of merit;
//! target ≥ 0.6.
//!
//! `cargo bench --bench local_sgd [-- --n 100000000 --reps 5 | --quick]`
use ferroccl::local_sgd::outer::{self, Outer};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let quick = args.iter().any(|a| a == "--quick");
    let n = get("--n").unwrap_or(if quick { 4_000_000 } else { 100_000_000 });
    let reps = get("--reps").unwrap_or(if quick { 2 } else { 5 });
    let mut phi: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut theta: Vec<f32> = phi.iter().map(|x| x - 1e-4).collect();
    let mut mom = vec![0.0f32; n];
    let mut delta = vec![0.0f32; n];
    let o = Outer::DILOCO;

    let t_copy = best(reps, || {
        delta.copy_from_slice(black_box(&phi));
        black_box(&delta);
    });
    let t_outer = best(reps, || {
        outer::pseudo_gradient(&phi, &theta, &mut delta);
        outer::apply(&o, 0.0, &delta, &mut phi, &mut mom, &mut theta);
        black_box((&phi, &theta));
    });
    let t_pg = best(reps, || {
        outer::pseudo_gradient(&phi, &theta, &mut delta);
        black_box(&delta);
    });
    let gb = |bytes: f64, t: Duration| bytes / t.as_secs_f64() / 1e9;
    let bw_copy = gb(8.0 * n as f64, t_copy);
    let bw_outer = gb(36.0 * n as f64, t_outer);
    let bw_pg = gb(12.0 * n as f64, t_pg);
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "operation", "params", "time (ms)", "GB/s touched"
    );
    println!(
        "{:<34} {:>12} {:>12.2} {:>14.2}",
        "memcpy (peer)",
        n,
        t_copy.as_secs_f64() * 1e3,
        bw_copy
    );
    println!(
        "{:<34} {:>12} {:>12.2} {:>14.2}",
        "pseudo-gradient only",
        n,
        t_pg.as_secs_f64() * 1e3,
        bw_pg
    );
    println!(
        "{:<34} {:>12} {:>12.2} {:>14.2}",
        "outer step (Δ + Nesterov + θ←φ)",
        n,
        t_outer.as_secs_f64() * 1e3,
        bw_outer
    );
    let ratio = bw_outer / bw_copy;
    println!(
        "ratio outer/memcpy bandwidth: {ratio:.3} (target >= 0.6: {})",
        if ratio >= 0.6 { "met" } else { "not met" }
    );
    println!(
        "RESULT {}",
        serde_json::json!({"n": n, "memcpy_gbs": bw_copy, "outer_gbs": bw_outer,
            "pseudo_grad_gbs": bw_pg, "ratio": ratio, "target": 0.6, "met": ratio >= 0.6})
    );
}
