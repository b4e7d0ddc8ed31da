//! All-reduce 1<<20 f32 and check the result against its closed form. One binary, any launcher:
//! `ferroccl::init()` picks MPI under mpirun, the TCP backend under torchrun-style variables, and a
//! single in-process rank otherwise.
//!
//! ```text
//! cargo build --release --features mpi --example allreduce
//! mpirun -np 4 target/release/examples/allreduce
//! for r in 0 1 2 3; do RANK=$r WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
//!     target/release/examples/allreduce & done; wait
//! ```
//!
//! Rank `r` holds `x[i] = r + i·1e-3`, so the sum over `n` ranks is `n(n-1)/2 + n·i·1e-3`. Every rank
//! prints its own check; rank 0 ends with one line `RESULT {json}` (world size, elements, seconds of
//! the all-reduce, ok).

use ferroccl::prelude::*;
use std::time::Instant;

const ELEMENTS: usize = 1 << 20;

fn main() -> Result<()> {
    let comm = ferroccl::init()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut x: Vec<f32> = (0..ELEMENTS)
        .map(|i| rank as f32 + i as f32 * 1e-3)
        .collect();

    comm.barrier()?;
    let t0 = Instant::now();
    comm.all_reduce(&mut x, ReduceOp::Sum)?;
    let seconds = t0.elapsed().as_secs_f64();

    // Compare with the closed form in f64; allow the f32 rounding of n terms of magnitude up to ~1e3.
    let base = (n * (n - 1)) as f64 / 2.0;
    let mut max_rel = 0f64;
    for (i, &v) in x.iter().enumerate() {
        let want = base + n as f64 * (i as f32 * 1e-3) as f64;
        let rel = (v as f64 - want).abs() / want.abs().max(1.0);
        max_rel = max_rel.max(rel);
    }
    let ok = max_rel <= 1e-6 * n as f64;
    println!(
        "rank {rank}/{n}: {} (max relative error {max_rel:.2e}, {seconds:.4} s)",
        if ok { "ok" } else { "WRONG" }
    );

    // Every rank's verdict: the minimum over ranks.
    let mut all_ok = [i32::from(ok)];
    comm.all_reduce(&mut all_ok, ReduceOp::Min)?;
    let mut slowest = [seconds];
    comm.all_reduce(&mut slowest, ReduceOp::Max)?;
    let all_ok = all_ok[0] == 1;
    if rank == 0 {
        let result = serde_json::json!({
            "backend": comm.backend(),
            "world_size": n,
            "elements": ELEMENTS,
            "bytes": ELEMENTS * std::mem::size_of::<f32>(),
            "seconds": slowest[0],
            "ok": all_ok,
        });
        println!("RESULT {result}");
    }
    drop(comm); // MPI_Finalize under MPI; closes sockets under TCP
    if !all_ok {
        std::process::exit(1);
    }
    Ok(())
}
