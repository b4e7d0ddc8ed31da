//! Deep Gradient Compression on real data: dense vs DGC at 99.9% final sparsity, same seed and schedule.
//!
//! ```text
//! cargo run --release --example dgc_train                       # 4 in-process ranks, dense vs DGC
//! cargo run --release --example dgc_train -- --ablation         # + each technique switched off in turn
//! cargo run --release --example dgc_train -- --world 8 --epochs 30 --plot target/dgc.svg
//! mpirun -np 4 target/release/examples/dgc_train                # (built with --features mpi)
//! ```
//!
//! The model is a 64 → 1536 (ReLU) → 10 MLP (115,210 parameters) on the digits data set bundled with
//! smartcore (1797 8×8 images, 80/20 split). Every variant starts from the same weights and sees the
//! same batches. Dense: all-reduce Avg of the gradient, then SGD with momentum. DGC: [`Dgc::step`] on
//! the flattened gradient; with momentum correction the update already holds the momentum and is
//! applied as plain SGD, without it the optimizer applies its momentum to the sparse update.
//!
//! Rank 0 prints a table, writes an SVG of the loss curves (`--plot`) and ends with one line
//! `RESULT {json}`. Exit status non-zero if DGC's accuracy is more than `--max-drop` below dense or its
//! compression ratio after warm-up is below `--min-ratio`.

use clap::Parser;
use ferroccl::dgc::{Dgc, DgcConfig};
use ferroccl::prelude::*;
use ferroccl::Backend;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use plotters::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::process::ExitCode;
use std::time::Instant;

#[path = "common/mlp.rs"]
mod mlp;
use mlp::{Data, Mlp};

/// The network: 64 → 1536 (ReLU) → 10, flat parameter layout W1, b1, W2, b2.
const MLP: Mlp = Mlp { hidden: 1536 };

/// Dense vs DGC training of an MLP on the digits data set.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// In-process ranks (threads).
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Passes over the training set.
    #[arg(long, default_value_t = 16)]
    epochs: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Momentum (the optimizer's for dense, DGC's for momentum correction).
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Samples per rank and step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Final density of DGC (0.001 = 99.9% sparsity).
    #[arg(long, default_value_t = 0.001)]
    density: f64,
    /// Global gradient-norm bound for DGC's local clipping.
    #[arg(long, default_value_t = 2.0)]
    clip_norm: f64,
    /// Compact wire format: counts-then-gather, delta-varint indices, bf16 values.
    #[arg(long)]
    compact: bool,
    /// Also run DGC with each technique switched off in turn.
    #[arg(long)]
    ablation: bool,
    /// Also run DGC with one selection per tensor (w1, b1, w2, b2), as the paper selects per layer;
    /// each tensor is clipped against the same bound.
    #[arg(long)]
    per_tensor: bool,
    /// Seed of the split, the weights and the shuffles.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// SVG of the loss curves.
    #[arg(long, default_value = "target/dgc_train.svg")]
    plot: String,
    /// Fail if DGC's final test accuracy is more than this many points below dense.
    #[arg(long, default_value_t = 0.5)]
    max_drop: f64,
    /// Fail if DGC's compression ratio after warm-up is below this.
    #[arg(long, default_value_t = 270.0)]
    min_ratio: f64,
}

/// One training variant.
#[derive(Clone)]
struct Variant {
    name: &'static str,
    dgc: Option<DgcConfig>,
    /// One `Dgc` per tensor instead of one for the flat gradient.
    per_tensor: bool,
}

#[derive(Clone, serde::Serialize)]
struct Outcome {
    name: &'static str,
    test_accuracy: f64,
    final_loss: f64,
    losses: Vec<f64>,
    /// Mean compression ratio (4n ÷ message bytes) over the steps after warm-up.
    compression_ratio: f64,
    /// Mean compression ratio over all steps (warm-up included).
    compression_ratio_all: f64,
    /// Bytes rank 0 sent for gradient synchronisation, whole run.
    bytes_sent: u64,
    /// Bytes rank 0 sent per step after warm-up.
    bytes_per_step: f64,
    seconds: f64,
}

fn train<C: Communicator + ?Sized>(
    comm: &C,
    args: &Args,
    data: &Data,
    v: &Variant,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let global = args.batch * world;
    let steps = data.train.len() / global;
    let mut params = MLP.init_params(args.seed);
    comm.broadcast(&mut params, 0)?;
    let mut grad = MLP.zeros();
    let mut mom = MLP.zeros();
    let groups: Vec<std::ops::Range<usize>> = if v.per_tensor {
        MLP.tensors().to_vec()
    } else {
        std::iter::once(0..MLP.n_params()).collect()
    };
    let mut dgc: Option<Vec<(std::ops::Range<usize>, Dgc)>> = match &v.dgc {
        Some(c) => Some(
            groups
                .iter()
                .map(|g| Ok((g.clone(), Dgc::new(g.len(), c.clone())?)))
                .collect::<Result<_>>()?,
        ),
        None => None,
    };
    let plain_sgd = v
        .dgc
        .as_ref()
        .is_some_and(|c| c.momentum_correction && c.sparsify);
    let warm = v
        .dgc
        .as_ref()
        .map_or(0, |c| if c.warmup_enabled { c.warmup.len() } else { 0 });
    let (mut ratio_sum, mut ratio_n, mut ratio_all, mut n_all) = (0.0, 0usize, 0.0, 0usize);
    let (mut bytes, mut bytes_after, mut steps_after) = (0u64, 0u64, 0usize);
    let mut losses = Vec::new();
    let mut acc = 0.0;
    for epoch in 0..args.epochs {
        let mut order = data.train.clone();
        order.shuffle(&mut StdRng::seed_from_u64(
            args.seed.wrapping_add(epoch as u64 + 1),
        ));
        let mut loss_sum = 0.0;
        for step in 0..steps {
            let shard = &order[step * global + rank * args.batch..][..args.batch];
            loss_sum += f64::from(MLP.loss_and_grad(&params, data, shard, &mut grad));
            let before = comm.bytes_sent();
            let ep = epoch as f64 + step as f64 / steps as f64;
            let r = match dgc.as_mut() {
                Some(ds) => {
                    let (mut dense, mut msg) = (0usize, 0usize);
                    for (g, d) in ds.iter_mut() {
                        let st = d.step(comm, &mut grad[g.clone()], ep)?;
                        dense += 4 * g.len();
                        msg += st.message_bytes;
                    }
                    dense as f64 / msg.max(1) as f64
                }
                None => {
                    comm.all_reduce(&mut grad, ReduceOp::Avg)?;
                    1.0
                }
            };
            let sent = comm.bytes_sent() - before;
            bytes += sent;
            ratio_all += r;
            n_all += 1;
            if epoch >= warm {
                ratio_sum += r;
                ratio_n += 1;
                bytes_after += sent;
                steps_after += 1;
            }
            if plain_sgd {
                params
                    .iter_mut()
                    .zip(&grad)
                    .for_each(|(w, g)| *w -= args.lr * g);
            } else {
                for ((w, m), g) in params.iter_mut().zip(&mut mom).zip(&grad) {
                    *m = args.momentum * *m + g;
                    *w -= args.lr * *m;
                }
            }
        }
        let mut l = [loss_sum / steps as f64];
        comm.all_reduce(&mut l, ReduceOp::Avg)?;
        losses.push(l[0]);
        acc = MLP.evaluate(comm, &params, data)?;
        bar.set_message(format!("{:<22} loss {:.4} acc {:.4}", v.name, l[0], acc));
        bar.inc(1);
    }
    Ok(Outcome {
        name: v.name,
        test_accuracy: acc,
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        losses,
        compression_ratio: ratio_sum / ratio_n.max(1) as f64,
        compression_ratio_all: ratio_all / n_all.max(1) as f64,
        bytes_sent: bytes,
        bytes_per_step: bytes_after as f64 / steps_after.max(1) as f64,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn variants(args: &Args) -> Vec<Variant> {
    let mut base = DgcConfig::default()
        .final_density(args.density)
        .momentum(args.momentum)
        .clip_norm(args.clip_norm)
        .seed(args.seed);
    if args.compact {
        base = base.compact();
    }
    let mut v = vec![
        Variant {
            name: "dense",
            dgc: None,
            per_tensor: false,
        },
        Variant {
            name: "dgc",
            dgc: Some(base.clone()),
            per_tensor: false,
        },
    ];
    if args.per_tensor {
        v.push(Variant {
            name: "dgc per tensor",
            dgc: Some(base.clone()),
            per_tensor: true,
        });
    }
    if args.ablation {
        v.extend([
            Variant {
                name: "dgc - momentum corr.",
                dgc: Some(base.clone().momentum_correction(false)),
                per_tensor: false,
            },
            Variant {
                name: "dgc - clipping",
                dgc: Some(base.clone().clipping(false)),
                per_tensor: false,
            },
            Variant {
                name: "dgc - momentum masking",
                dgc: Some(base.clone().momentum_masking(false)),
                per_tensor: false,
            },
            Variant {
                name: "dgc - warm-up",
                dgc: Some(base.clone().warmup_enabled(false)),
                per_tensor: false,
            },
            Variant {
                name: "sparsify only",
                dgc: Some(
                    base.momentum_correction(false)
                        .clipping(false)
                        .momentum_masking(false)
                        .warmup_enabled(false),
                ),
                per_tensor: false,
            },
        ]);
    }
    v
}

fn all_variants<C: Communicator + ?Sized>(
    comm: &C,
    args: &Args,
    data: &Data,
) -> Result<Vec<Outcome>> {
    let vs = variants(args);
    let bar = if comm.rank() == 0 {
        ProgressBar::with_draw_target(
            Some((vs.len() * args.epochs) as u64),
            ProgressDrawTarget::stderr(),
        )
        .with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} epochs [{elapsed}] {msg}")
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        )
    } else {
        ProgressBar::hidden()
    };
    let out = vs
        .iter()
        .map(|v| train(comm, args, data, v, &bar))
        .collect();
    bar.finish_and_clear();
    out
}

fn plot(path: &str, outs: &[Outcome]) -> std::result::Result<(), String> {
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let epochs = outs.iter().map(|o| o.losses.len()).max().unwrap_or(1);
    let ymax = outs
        .iter()
        .flat_map(|o| o.losses.iter().copied())
        .fold(0.0, f64::max)
        * 1.05;
    let ymin = outs
        .iter()
        .flat_map(|o| o.losses.iter().copied())
        .fold(f64::INFINITY, f64::min)
        .max(1e-4);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "digits MLP (115k params): training loss, dense vs DGC",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..epochs as f64, (ymin * 0.9..ymax).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("train loss")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, o) in outs.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                o.losses
                    .iter()
                    .enumerate()
                    .map(|(e, &l)| (e as f64 + 1.0, l)),
                c.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("{} (acc {:.2}%)", o.name, 100.0 * o.test_accuracy))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn run(args: &Args) -> std::result::Result<(), String> {
    let data = Data::load(args.seed);
    let t0 = Instant::now();
    let (outs, world, backend) = if Backend::detect().map_err(|e| e.to_string())? == Backend::Local
    {
        let mut all = ferroccl::local::run(args.world, |comm| all_variants(comm, args, &data))
            .map_err(|e| e.to_string())?;
        (all.swap_remove(0), args.world, "local")
    } else {
        let comm = ferroccl::init().map_err(|e| e.to_string())?;
        let outs = all_variants(&*comm, args, &data).map_err(|e| e.to_string())?;
        if comm.rank() != 0 {
            return Ok(());
        }
        (outs, comm.world_size(), comm.backend())
    };
    println!(
        "{} parameters, {world} ranks ({backend}), {} epochs, batch {} per rank, final density {}",
        MLP.n_params(),
        args.epochs,
        args.batch,
        args.density
    );
    println!(
        "| variant | test acc. | Δ vs dense (points) | final loss | compression (after warm-up) | compression (all steps) | bytes sent/step (rank 0, after warm-up) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let dense_acc = outs[0].test_accuracy;
    for o in &outs {
        println!(
            "| {} | {:.2}% | {:+.2} | {:.4} | {:.0}× | {:.0}× | {:.0} |",
            o.name,
            100.0 * o.test_accuracy,
            100.0 * (o.test_accuracy - dense_acc),
            o.final_loss,
            o.compression_ratio,
            o.compression_ratio_all,
            o.bytes_per_step
        );
    }
    plot(&args.plot, &outs)?;
    eprintln!("loss curves: {}", args.plot);
    let dgc = &outs[1];
    let drop = 100.0 * (dense_acc - dgc.test_accuracy);
    let result = serde_json::json!({
        "world": world,
        "backend": backend,
        "params": MLP.n_params(),
        "epochs": args.epochs,
        "final_density": args.density,
        "dense_accuracy": dense_acc,
        "dgc_accuracy": dgc.test_accuracy,
        "accuracy_drop_points": drop,
        "compression_ratio": dgc.compression_ratio,
        "compression_ratio_all_steps": dgc.compression_ratio_all,
        "dense_bytes_sent": outs[0].bytes_sent,
        "dgc_bytes_sent": dgc.bytes_sent,
        "variants": outs.iter().map(|o| serde_json::json!({
            "name": o.name, "test_accuracy": o.test_accuracy, "final_loss": o.final_loss,
            "compression_ratio": o.compression_ratio, "bytes_sent": o.bytes_sent,
            "bytes_per_step": o.bytes_per_step, "seconds": o.seconds,
        })).collect::<Vec<_>>(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    println!("RESULT {result}");
    let mut fail = Vec::new();
    if drop > args.max_drop {
        fail.push(format!(
            "DGC accuracy is {drop:.2} points below dense (> {})",
            args.max_drop
        ));
    }
    if dgc.compression_ratio < args.min_ratio {
        fail.push(format!(
            "compression {:.0}× < {}×",
            dgc.compression_ratio, args.min_ratio
        ));
    }
    if fail.is_empty() {
        Ok(())
    } else {
        Err(fail.join("; "))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dgc_train: {e}");
            ExitCode::FAILURE
        }
    }
}
