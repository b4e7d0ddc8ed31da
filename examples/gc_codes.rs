//! Print a gradient code — its assignment of partitions to workers and its encoding matrix `B` — as
//! JSON, so it can be inspected and verified.
//!
//! ```text
//! cargo run --release --example gc_codes -- --n 6 --s 2 --scheme fr
//! cargo run --release --example gc_codes -- --n 5 --s 2 --scheme cyclic --seed 3
//! ```
//!
//! The JSON object has `scheme`, `n`, `s`, `seed`, `assignment` (per worker: partitions and their
//! coefficients) and `B` (n × n, rows = workers). The program also checks every responder set of
//! size `n − s` (for n ≤ 16; 2000 random ones above) and ends with one `RESULT {json}` line.

use clap::Parser;
use ferroccl::coding::{GradientCode, Scheme};
use ferroccl::sim::rng::Rng;
use std::process::ExitCode;

#[derive(Parser, Debug)]
struct Args {
    /// Workers (= data partitions).
    #[arg(long, default_value_t = 6)]
    n: usize,
    /// Stragglers tolerated.
    #[arg(long, default_value_t = 2)]
    s: usize,
    /// `fr` (fractional repetition, (s+1) | n) or `cyclic`.
    #[arg(long, default_value = "cyclic")]
    scheme: String,
    /// Seed of the cyclic code's random construction.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn run(a: &Args) -> Result<(), String> {
    let scheme: Scheme = a
        .scheme
        .parse()
        .map_err(|e: ferroccl::Error| e.to_string())?;
    let code = GradientCode::new(scheme, a.n, a.s, a.seed).map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&code.to_json()).map_err(|e| e.to_string())?
    );
    let k = a.n - a.s;
    let mut sets: Vec<Vec<usize>> = Vec::new();
    if a.n <= 16 {
        for mask in 0u32..(1u32 << a.n) {
            if mask.count_ones() as usize == k {
                sets.push((0..a.n).filter(|i| mask >> i & 1 == 1).collect());
            }
        }
    } else {
        let mut rng = Rng::new(a.seed);
        sets = (0..2000).map(|_| rng.subset(a.n, k)).collect();
    }
    let mut worst = 0f64;
    for set in &sets {
        let v = code
            .decoding_vector(set)
            .map_err(|e| format!("responders {set:?}: {e}"))?;
        worst = worst.max(code.residual(&v));
    }
    let result = serde_json::json!({
        "scheme": code.scheme(),
        "n": a.n,
        "s": a.s,
        "responder_sets_checked": sets.len(),
        "exhaustive": a.n <= 16,
        "max_residual": worst,
    });
    println!("RESULT {result}");
    Ok(())
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gc_codes: {e}");
            ExitCode::FAILURE
        }
    }
}
