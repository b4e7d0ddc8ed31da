//! Quickstart: data-parallel training of a small MLP with ferroccl, in plain Rust.
//!
//! ```text
//! cargo run --release --example quickstart                                  # 4 in-process ranks
//! cargo run --release --example quickstart -- --check-serial --epochs 1     # compare with 1 rank
//! ```
//!
//! Four ranks (threads, [`ferroccl::local::run`]) train a 64 → 64 (ReLU) → 10 (softmax) network on the
//! digits dataset bundled with smartcore (1797 8×8 images, nothing downloaded), the way PyTorch DDP does:
//!
//! 1. rank 0 initialises the parameters and `broadcast`s them, so every replica starts identical;
//! 2. every step each rank computes the gradient on its own shard of the global batch;
//! 3. the gradients are averaged across ranks by a [`Bucketer`]: tensors are pushed last layer first
//!    (the order a backward pass produces them), fused into buckets, and every full bucket starts a
//!    non-blocking all-reduce (`ReduceOp::Avg`) at once;
//! 4. every rank applies the same SGD update to the same averaged gradient, so replicas stay
//!    identical — checked at the end by all-reducing a hash of the parameters with `Max` and `Min`.
//!
//! Because the shards have equal sizes, the average of the per-shard mean gradients is the mean
//! gradient of the global batch: `--check-serial` trains the same model on one rank with the whole
//! global batch and checks that the parameters agree (to float rounding).
//!
//! Launched by torchrun-style variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), by
//! `mpirun` (feature `mpi`) or with `FERROCCL_BACKEND` set, the same program runs one rank per process
//! through [`ferroccl::init`] instead of threads.
//!
//! Rank 0 prints one line per epoch and ends with one line `RESULT {json}`. The program exits non-zero
//! if the replicas diverged, if the serial check fails, or if the test accuracy after 10 or more
//! epochs is below `--min-accuracy` (0.85).

use clap::Parser;
use ferroccl::bucket::Bucketer;
use ferroccl::prelude::*;
use ferroccl::Backend;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::process::ExitCode;
use std::time::Instant;

#[path = "common/mlp.rs"]
mod mlp;
use mlp::{checksum, Data, Mlp};

/// The network: 64 → 64 (ReLU) → 10.
const MLP: Mlp = Mlp { hidden: 64 };

/// Data-parallel MLP training on the digits dataset.
#[derive(Parser, Debug)]
struct Args {
    /// Number of in-process ranks (threads).
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Passes over the training set.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.2)]
    lr: f32,
    /// Samples per rank and step (the global batch is world × batch).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seed of the train/test split, the initial weights and the shuffles.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Gradient bucket size in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    bucket_bytes: usize,
    /// Also train on one rank with the whole global batch and compare the parameters.
    #[arg(long)]
    check_serial: bool,
    /// Fail if the final test accuracy is below this (checked when epochs >= 10).
    #[arg(long, default_value_t = 0.85)]
    min_accuracy: f64,
}

/// What each rank returns.
struct Outcome {
    rank: usize,
    world: usize,
    params: Vec<f32>,
    final_loss: f64,
    test_accuracy: f64,
    replicas_identical: bool,
    bytes_communicated: u64,
    buckets_per_step: usize,
    backend: &'static str,
}

/// Train on `comm` with `batch` samples per rank and step; rank 0 reports progress when `verbose`.
fn train<C: Communicator + ?Sized>(
    comm: &C,
    args: &Args,
    batch: usize,
    data: &Data,
    verbose: bool,
) -> Result<Outcome> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let global = batch * world;
    let steps = data.train.len() / global; // every shard has `batch` samples: drop the remainder
    if steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "a global batch of {world} x {batch} is larger than the {} training samples",
            data.train.len()
        )));
    }

    // Identical replicas: rank 0 initialises, everyone receives its parameters.
    let mut params = if rank == 0 {
        MLP.init_params(args.seed)
    } else {
        MLP.zeros()
    };
    for t in MLP.tensors() {
        comm.broadcast(&mut params[t], 0)?;
    }

    let show = verbose && rank == 0;
    let bar = if show {
        ProgressBar::with_draw_target(Some(args.epochs as u64), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template("{bar:30} epoch {pos}/{len} [{elapsed}]")
                    .expect("valid template"),
            )
    } else {
        ProgressBar::hidden()
    };

    let mut grads = MLP.zeros();
    let tensors = MLP.tensors();
    let (mut final_loss, mut test_accuracy, mut buckets_per_step) = (f64::NAN, 0.0, 0);
    // one bucketer for the whole run: each `finish` ends a step, and its bucket memory is reused
    let mut bucketer = Bucketer::new(comm, args.bucket_bytes, ReduceOp::Avg);
    for epoch in 1..=args.epochs {
        // The same shuffle on every rank; rank r takes the r-th shard of each global batch.
        let mut order = data.train.clone();
        order.shuffle(&mut StdRng::seed_from_u64(
            args.seed.wrapping_add(epoch as u64),
        ));
        let mut loss_sum = 0.0;
        for step in 0..steps {
            let shard = &order[step * global + rank * batch..][..batch];
            loss_sum += f64::from(MLP.loss_and_grad(&params, data, shard, &mut grads));

            // Average the gradients across ranks. A real backward pass would push each tensor as soon
            // as it is computed, last layer first, so the first buckets travel while later ones are
            // still being computed; here the gradient is computed whole, then pushed in that order.
            for (id, t) in tensors.iter().enumerate().rev() {
                bucketer.push(id, &grads[t.clone()])?;
            }
            bucketer.finish(|id, avg| grads[tensors[id].clone()].copy_from_slice(avg))?;
            buckets_per_step = bucketer.launched().0;

            // The same update from the same gradient on every rank.
            params
                .iter_mut()
                .zip(&grads)
                .for_each(|(w, d)| *w -= args.lr * d);
        }

        let mut loss = [loss_sum / steps as f64];
        comm.all_reduce(&mut loss, ReduceOp::Avg)?;
        final_loss = loss[0];
        test_accuracy = MLP.evaluate(comm, &params, data)?;
        if show {
            bar.suspend(|| {
                println!("epoch {epoch:>3}  train loss {final_loss:.4}  test accuracy {test_accuracy:.4}")
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Did every replica end with the very same parameters?
    let mut hi = [checksum(&params)];
    let mut lo = hi;
    comm.all_reduce(&mut hi, ReduceOp::Max)?;
    comm.all_reduce(&mut lo, ReduceOp::Min)?;

    let mut bytes = [comm.bytes_sent() as i64];
    comm.all_reduce(&mut bytes, ReduceOp::Sum)?;

    Ok(Outcome {
        rank,
        world,
        params,
        final_loss,
        test_accuracy,
        replicas_identical: hi == lo,
        bytes_communicated: bytes[0] as u64,
        buckets_per_step,
        backend: comm.backend(),
    })
}

fn run(args: &Args) -> std::result::Result<(), String> {
    let data = Data::load(args.seed);
    let t0 = Instant::now();
    let out = if Backend::detect().map_err(|e| e.to_string())? == Backend::Local {
        let mut outs = ferroccl::local::run(args.world, |comm| {
            train(comm, args, args.batch, &data, true)
        })
        .map_err(|e| e.to_string())?;
        outs.swap_remove(0)
    } else {
        // One rank per process, started by torchrun, mpirun or FERROCCL_BACKEND.
        let comm = ferroccl::init().map_err(|e| e.to_string())?;
        train(&*comm, args, args.batch, &data, true).map_err(|e| e.to_string())?
    };
    let seconds = t0.elapsed().as_secs_f64();
    if out.rank != 0 {
        return if out.replicas_identical {
            Ok(())
        } else {
            Err("replicas diverged".into())
        };
    }

    let mut failures = Vec::new();
    if !out.replicas_identical {
        failures.push("the replicas' parameters differ after training".to_string());
    }
    if args.check_serial {
        let serial = ferroccl::local::run(1, |comm| {
            train(comm, args, args.batch * out.world, &data, false)
        })
        .map_err(|e| e.to_string())?;
        let (mut max_diff, mut max_abs) = (0f32, 0f32);
        for (a, b) in out.params.iter().zip(&serial[0].params) {
            max_diff = max_diff.max((a - b).abs());
            max_abs = max_abs.max(b.abs());
        }
        let rel = max_diff / max_abs;
        let ok = rel <= 1e-4;
        println!(
            "serial check: {} ranks x batch {} vs 1 rank x batch {}: max abs difference {max_diff:.3e} \
             (relative to the largest parameter {rel:.3e}) {}",
            out.world,
            args.batch,
            args.batch * out.world,
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            failures.push(format!(
                "data-parallel and serial parameters differ by {rel:.3e} relative (> 1e-4)"
            ));
        }
    }
    if args.epochs >= 10 && out.test_accuracy < args.min_accuracy {
        failures.push(format!(
            "test accuracy {:.4} is below {}",
            out.test_accuracy, args.min_accuracy
        ));
    }

    let result = serde_json::json!({
        "world": out.world,
        "epochs": args.epochs,
        "final_loss": out.final_loss,
        "test_accuracy": out.test_accuracy,
        "bytes_communicated": out.bytes_communicated,
        "buckets_per_step": out.buckets_per_step,
        "backend": out.backend,
        "seconds": seconds,
    });
    println!("RESULT {result}");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}
