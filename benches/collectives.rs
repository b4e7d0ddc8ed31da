//! Collective-communication benchmark in the manner of nccl-tests, with a peer measured in the same run.
//!
//! ```text
//! cargo bench --bench collectives -- --backend local --world 4 --op all_reduce -b 8 -e 64M -f 2 --check
//! benches/run_mpi_bench.sh            # MPI backend under mpirun, against rsmpi's own all_reduce
//! # NCCL on device buffers, one process per GPU (feature cuda; benches/multi_gpu.sh does this):
//! RANK=r WORLD_SIZE=n LOCAL_RANK=r ... collectives --backend nccl --op all_reduce,all_gather -b 8 -e 1G
//! ```
//!
//! Flags and columns follow nccl-tests (`-b/-e/-f/-n/-w/-d/-o/-r/-c`, out-of-place table `size count
//! type redop root time algbw busbw #wrong`, `# Avg bus bandwidth`). `size` is the larger of the send
//! and receive buffers in bytes (so the total `world × count` bytes for reduce_scatter, all_gather and
//! all_to_all), `algbw = size / time`, `busbw = algbw × factor` with nccl-tests' factors (all_reduce
//! `2(n-1)/n`; reduce_scatter, all_gather, all_to_all `(n-1)/n`; broadcast, reduce `1`), GB = 1e9 B.
//! Time per operation: every rank runs a barrier, times `iters` back-to-back operations and divides;
//! the figure reported is the maximum over ranks.
//!
//! Machines are noisy, so every figure comes with a peer measured in the same run, size by size:
//! `--peer memcpy` (the default for in-process ranks) times a single-threaded `copy_from_slice` of
//! `size` bytes between two buffers; `--peer rsmpi` (the default for `--backend mpi`; f32 sum
//! all_reduce only) times rsmpi's safe `all_reduce_into` on the same communicator and buffers, in
//! blocks interleaved with ferroccl's (ABBA order, so linear drift cancels).
//!
//! Backends: `local` (every rank a thread of `ferroccl::local::run_with`), `mpi` (feature `mpi`, under
//! `mpirun`), `tcp` (with `RANK`/`WORLD_SIZE` set this process is one rank; without them it starts
//! `--world` copies of itself on 127.0.0.1 and waits for them), `init` (`ferroccl::init()`: whatever
//! the environment asks for), `nccl` (feature `cuda`; one process per GPU launched torchrun-style or
//! by mpirun, the id through the env rendezvous store, device = the local rank; implies `--device`).
//! `--device` (feature `cuda`) puts the buffers in GPU memory (`CudaSlice<u8>` viewed with the chosen
//! dtype); for host backends they are staged through pinned memory. Blocking ferroccl calls return
//! when the operation is complete on the GPU, so host timers measure it; `--check` downloads the
//! result and compares it on the host. Per-rank figures (times, wrong counts) are combined with
//! collectives on the benchmarked communicator itself (through device buffers where it needs them).
//!
//! `--op dgc_sync` times one Deep Gradient Compression sync of a `--dgc-n`-float gradient at
//! `--dgc-density` (ResNet-50: 25,557,032 floats, 0.1%) against the dense all-reduce (Avg) of the same
//! gradient, on the same communicator: on the host, `Dgc::step` vs `all_reduce`; on device buffers,
//! `DgcKernels::compress` + packing into fixed-k messages (u32 indices, f32 values) + `all_gather` +
//! the scatter-add kernel vs `all_reduce` of the device gradient. Only rank 0 prints. Inputs are small integers, so with `--check` every
//! result is compared exactly with a reference computed locally (Avg on floats to within rounding).

use clap::{Parser, ValueEnum};
use ferroccl::{Buf, BufMut, Collective, Communicator, CommunicatorExt, DType, ReduceOp};
use half::{bf16, f16};
use serde_json::json;
use std::error::Error as StdError;
use std::hint::black_box;
use std::time::Instant;

type AnyResult<T> = std::result::Result<T, Box<dyn StdError>>;

/// Sizes at and above which the peer summaries are taken (the project's targets are stated there).
const LARGE: usize = 16 << 20;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "collectives",
    about = "ferroccl collectives bench (nccl-tests flags and columns, with a same-run peer)"
)]
struct Args {
    /// Backend: local (threads), mpi (feature `mpi`, under mpirun), tcp, init (ferroccl::init()),
    /// nccl (feature `cuda`, one process per GPU).
    #[arg(long, value_enum, default_value = "local")]
    backend: BackendArg,
    /// Number of ranks (local: threads; tcp: processes started when RANK is unset). Default 4.
    #[arg(long)]
    world: Option<usize>,
    /// Collective(s) to time (comma-separated), `all` for each in turn, or `dgc_sync`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all_reduce")]
    op: Vec<OpArg>,
    /// Buffers in GPU memory (feature `cuda`; implied by `--backend nccl`).
    #[arg(long)]
    device: bool,
    /// `--op dgc_sync`: gradient length in floats (ResNet-50: 25,557,032).
    #[arg(long, default_value_t = 25_557_032)]
    dgc_n: usize,
    /// `--op dgc_sync`: density after warm-up (0.001 = 99.9% sparsity).
    #[arg(long, default_value_t = 0.001)]
    dgc_density: f64,
    /// `--op dgc_sync`: timed syncs of each kind (the median is reported).
    #[arg(long, default_value_t = 10)]
    dgc_reps: usize,
    /// Smallest size (suffixes K, M, G: powers of 1024).
    #[arg(short = 'b', long, default_value = "8", value_parser = parse_size)]
    minbytes: usize,
    /// Largest size (suffixes K, M, G).
    #[arg(short = 'e', long, default_value = "64M", value_parser = parse_size)]
    maxbytes: usize,
    /// Multiply the size by this factor from one row to the next.
    #[arg(short = 'f', long, default_value_t = 2)]
    stepfactor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long, default_value_t = 20)]
    iters: usize,
    /// Untimed warm-up iterations per size.
    #[arg(short = 'w', long, default_value_t = 5)]
    warmup: usize,
    /// Element type (float, double, half, bfloat16, int32, int64, uint8 or the Rust names).
    #[arg(short = 'd', long, default_value = "float", value_parser = parse_dtype)]
    datatype: DType,
    /// Reduction (sum, prod, min, max, avg).
    #[arg(short = 'o', long, default_value = "sum", value_parser = parse_redop)]
    redop: ReduceOp,
    /// Root rank of broadcast and reduce.
    #[arg(short = 'r', long, default_value_t = 0)]
    root: usize,
    /// Check every result against a local reference (`-c`, `--check`, or nccl-tests' `-c 1` / `-c 0`).
    #[arg(short = 'c', long, num_args = 0..=1, default_value = "0", default_missing_value = "1",
          value_parser = parse_flag)]
    check: bool,
    /// Write every row as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Draw busbw against size (log2 axis) into FILE.svg, one series per op and peer.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<String>,
    /// Peer measured in the same run: memcpy (default for host buffers except mpi), rsmpi (default
    /// for mpi), none (default for device buffers: their peers, nccl-tests and torch, run separately).
    #[arg(long, value_enum)]
    peer: Option<PeerArg>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long = "bench", hide = true)]
    cargo_bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Local,
    Mpi,
    Tcp,
    Init,
    Nccl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OpArg {
    #[value(name = "all_reduce")]
    AllReduce,
    #[value(name = "reduce_scatter")]
    ReduceScatter,
    #[value(name = "all_gather")]
    AllGather,
    #[value(name = "broadcast")]
    Broadcast,
    #[value(name = "reduce")]
    Reduce,
    #[value(name = "all_to_all")]
    AllToAll,
    #[value(name = "all")]
    All,
    #[value(name = "dgc_sync")]
    DgcSync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PeerArg {
    Memcpy,
    Rsmpi,
    None,
}

impl PeerArg {
    fn name(self) -> &'static str {
        match self {
            PeerArg::Memcpy => "memcpy",
            PeerArg::Rsmpi => "rsmpi",
            PeerArg::None => "none",
        }
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number with an optional K, M or G suffix)"))?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).map_err(|e| e.to_string())
}

fn parse_redop(s: &str) -> Result<ReduceOp, String> {
    ReduceOp::parse(s).map_err(|e| e.to_string())
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("expected 1 or 0, got {s:?}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Reduce,
    AllToAll,
}

/// Buffer lengths (elements) of one operation at one size, and what the table prints.
struct Layout {
    count: usize,
    send: usize,
    recv: usize,
    size: usize,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::AllReduce,
        Op::ReduceScatter,
        Op::AllGather,
        Op::Broadcast,
        Op::Reduce,
        Op::AllToAll,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Reduce => "reduce",
            Op::AllToAll => "all_to_all",
        }
    }

    /// nccl-tests' busbw factor (PERFORMANCE.md).
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            Op::ReduceScatter | Op::AllGather | Op::AllToAll => (n - 1.0) / n,
            Op::Broadcast | Op::Reduce => 1.0,
        }
    }

    fn reduces(self) -> bool {
        matches!(self, Op::AllReduce | Op::ReduceScatter | Op::Reduce)
    }

    fn rooted(self) -> bool {
        matches!(self, Op::Broadcast | Op::Reduce)
    }

    /// As nccl-tests: `count` is the per-rank count (recv count of reduce_scatter, send count of
    /// all_gather, per-peer block of all_to_all); `size` the larger buffer in bytes. At least one
    /// element per rank.
    fn layout(self, bytes: usize, elt: usize, n: usize) -> Layout {
        let whole = (bytes / elt).max(1);
        let split = (bytes / elt / n).max(1);
        let (count, send, recv) = match self {
            Op::AllReduce | Op::Reduce => (whole, whole, whole),
            Op::Broadcast => (whole, 0, whole),
            Op::ReduceScatter => (split, n * split, split),
            Op::AllGather => (split, split, n * split),
            Op::AllToAll => (split, n * split, n * split),
        };
        Layout {
            count,
            send,
            recv,
            size: send.max(recv) * elt,
        }
    }
}

/// What every rank runs.
struct Plan {
    backend: String,
    ops: Vec<Op>,
    sizes: Vec<usize>,
    iters: usize,
    warmup: usize,
    dtype: DType,
    redop: ReduceOp,
    root: usize,
    check: bool,
    peer: PeerArg,
    minbytes: usize,
    maxbytes: usize,
    stepfactor: usize,
    world_flag: Option<usize>,
    /// Buffers in GPU memory.
    device: bool,
    /// `--op dgc_sync`: (gradient length, density, timed reps).
    dgc: Option<(usize, f64, usize)>,
}

/// One row of the table.
#[derive(Debug, Clone)]
struct Row {
    size: usize,
    count: usize,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: Option<u64>,
    memcpy_gbps: Option<f64>,
    rsmpi_us: Option<f64>,
    rsmpi_busbw: Option<f64>,
    bytes_sent_per_op: f64,
}

/// Rank 0's results for one operation.
struct OpReport {
    op: Op,
    peer: PeerArg,
    rows: Vec<Row>,
}

/// Rank 0's results.
struct Report {
    ops: Vec<OpReport>,
    dgc: Option<DgcRow>,
}

/// `--op dgc_sync`: one DGC sync against the dense all-reduce of the same gradient (max over ranks
/// of each rank's median).
#[derive(Debug, Clone)]
struct DgcRow {
    n: usize,
    k: usize,
    density: f64,
    reps: usize,
    message_bytes: usize,
    dense_ms: f64,
    dgc_ms: f64,
    compress_ms: f64,
    path: &'static str,
}

/// rsmpi's all-reduce on the benchmarked communicator (the MPI peer).
type RawAllReduce<'a> = &'a dyn Fn(&[f32], &mut [f32]) -> ferroccl::Result<()>;

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match real_main(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("collectives: error: {e}");
            std::process::exit(1);
        }
    }
}

fn plan_from(args: &Args) -> AnyResult<Plan> {
    if args.minbytes == 0 {
        return Err("--minbytes must be at least 1".into());
    }
    if args.maxbytes < args.minbytes {
        return Err(format!(
            "--maxbytes ({}) is smaller than --minbytes ({})",
            args.maxbytes, args.minbytes
        )
        .into());
    }
    if args.stepfactor < 2 {
        return Err("--stepfactor must be at least 2".into());
    }
    if args.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    if args.world == Some(0) {
        return Err("--world must be at least 1".into());
    }
    let mut ops: Vec<Op> = Vec::new();
    let mut dgc = None;
    for a in &args.op {
        let more = match a {
            OpArg::AllReduce => vec![Op::AllReduce],
            OpArg::ReduceScatter => vec![Op::ReduceScatter],
            OpArg::AllGather => vec![Op::AllGather],
            OpArg::Broadcast => vec![Op::Broadcast],
            OpArg::Reduce => vec![Op::Reduce],
            OpArg::AllToAll => vec![Op::AllToAll],
            OpArg::All => Op::ALL.to_vec(),
            OpArg::DgcSync => {
                if args.dgc_n == 0 || args.dgc_reps == 0 {
                    return Err("--dgc-n and --dgc-reps must be at least 1".into());
                }
                if !(args.dgc_density > 0.0 && args.dgc_density <= 1.0) {
                    return Err("--dgc-density must be in (0, 1]".into());
                }
                dgc = Some((args.dgc_n, args.dgc_density, args.dgc_reps));
                vec![]
            }
        };
        for o in more {
            if !ops.contains(&o) {
                ops.push(o);
            }
        }
    }
    let device = args.device || args.backend == BackendArg::Nccl;
    if device && args.peer == Some(PeerArg::Rsmpi) {
        return Err("--peer rsmpi times host buffers: leave out --device".into());
    }
    if device && !cfg!(feature = "cuda") {
        return Err("--device and --backend nccl need the `cuda` feature: cargo bench --features cuda --bench collectives".into());
    }
    let rsmpi_fits =
        args.datatype == DType::F32 && args.redop == ReduceOp::Sum && ops.contains(&Op::AllReduce);
    let peer = match args.peer {
        Some(PeerArg::Rsmpi) => {
            if args.backend != BackendArg::Mpi {
                return Err(
                    "--peer rsmpi needs --backend mpi (under mpirun, built with --features mpi)"
                        .into(),
                );
            }
            if !rsmpi_fits {
                return Err("--peer rsmpi times f32 sum all_reduce only: use -d float -o sum and --op all_reduce (or all)".into());
            }
            PeerArg::Rsmpi
        }
        Some(p) => p,
        None if device => PeerArg::None,
        None if args.backend == BackendArg::Mpi => {
            if rsmpi_fits {
                PeerArg::Rsmpi
            } else {
                PeerArg::None
            }
        }
        None => PeerArg::Memcpy,
    };
    let mut sizes = Vec::new();
    let mut s = args.minbytes;
    while s <= args.maxbytes {
        sizes.push(s);
        match s.checked_mul(args.stepfactor) {
            Some(next) => s = next,
            None => break,
        }
    }
    Ok(Plan {
        backend: match args.backend {
            BackendArg::Local => "local",
            BackendArg::Mpi => "mpi",
            BackendArg::Tcp => "tcp",
            BackendArg::Init => "init",
            BackendArg::Nccl => "nccl",
        }
        .into(),
        ops,
        sizes,
        iters: args.iters,
        warmup: args.warmup,
        dtype: args.datatype,
        redop: args.redop,
        root: args.root,
        check: args.check,
        peer,
        minbytes: args.minbytes,
        maxbytes: args.maxbytes,
        stepfactor: args.stepfactor,
        world_flag: args.world,
        device,
        dgc,
    })
}

fn real_main(args: Args) -> AnyResult<i32> {
    let _ = args.cargo_bench;
    let mut plan = plan_from(&args)?;
    let (reports, world) = match args.backend {
        BackendArg::Local => {
            let n = args.world.unwrap_or(4);
            let opts = ferroccl::local::Options::default();
            let out = ferroccl::local::run_with(n, &opts, |comm| run_bench(comm, &plan, None))?;
            (out.into_iter().next().flatten(), n)
        }
        BackendArg::Tcp => {
            if std::env::var_os("RANK").is_none() {
                return launch_tcp(args.world.unwrap_or(4));
            }
            let comm = ferroccl::init_with(ferroccl::Backend::Tcp)?;
            let n = comm.world_size();
            let r = run_bench(&*comm, &plan, None);
            drop(comm);
            (r?, n)
        }
        BackendArg::Init => {
            let comm = ferroccl::init()?;
            let n = comm.world_size();
            plan.backend = format!("init({})", comm.backend());
            let r = run_bench(&*comm, &plan, None);
            drop(comm);
            (r?, n)
        }
        BackendArg::Nccl => {
            let comm = nccl_comm()?;
            let n = comm.world_size();
            let r = run_bench(&*comm, &plan, None);
            drop(comm);
            (r?, n)
        }
        BackendArg::Mpi => run_mpi(&plan)?,
    };
    let Some(report) = reports else {
        return Ok(0); // not rank 0
    };
    if let Some(path) = &args.json {
        write_json(path, &plan, world, &report)?;
        println!("# wrote {path}");
    }
    if let Some(path) = &args.plot {
        if !report.ops.is_empty() {
            write_plot(path, &plan, world, &report.ops)?;
            println!("# wrote {path}");
        }
    }
    let wrong: u64 = report
        .ops
        .iter()
        .flat_map(|r| &r.rows)
        .filter_map(|r| r.wrong)
        .sum();
    Ok(if wrong > 0 { 1 } else { 0 })
}

#[cfg(feature = "mpi")]
fn run_mpi(plan: &Plan) -> AnyResult<(Option<Report>, usize)> {
    let comm = ferroccl::mpi::MpiComm::world(ferroccl::Config::from_env()?)?;
    let n = comm.world_size();
    let raw = |s: &[f32], r: &mut [f32]| ferroccl::mpi::raw_allreduce_into_f32(&comm, s, r);
    let r = run_bench(&comm, plan, Some(&raw));
    drop(comm); // MPI_Finalize
    Ok((r?, n))
}

/// The NCCL communicator of this process: the id through MPI under mpirun when built with `mpi`,
/// else through the env rendezvous store (torchrun-style variables, or mpirun's), else world size 1.
#[cfg(feature = "cuda")]
fn nccl_comm() -> AnyResult<Box<dyn Communicator>> {
    #[cfg(feature = "mpi")]
    if ferroccl::mpi::launched_by_mpirun() {
        return Ok(ferroccl::init_with(ferroccl::Backend::Nccl)?);
    }
    let cfg = ferroccl::Config::from_env()?;
    if ferroccl::rendezvous::EnvRendezvous::from_env()?.is_some() {
        Ok(Box::new(ferroccl::nccl::NcclComm::from_env(cfg)?))
    } else {
        Ok(Box::new(ferroccl::nccl::NcclComm::single(0, cfg)?))
    }
}

#[cfg(not(feature = "cuda"))]
fn nccl_comm() -> AnyResult<Box<dyn Communicator>> {
    Err(
        "--backend nccl needs the `cuda` feature: cargo bench --features cuda --bench collectives"
            .into(),
    )
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_plan: &Plan) -> AnyResult<(Option<Report>, usize)> {
    Err("--backend mpi needs the `mpi` feature: cargo bench --features mpi --bench collectives --no-run, \
         then run the binary under mpirun (benches/run_mpi_bench.sh does both)"
        .into())
}

/// Without `RANK` in the environment: start `world` copies of this binary as the ranks of a TCP job on
/// 127.0.0.1, wait for them, and stop the others if one fails.
fn launch_tcp(world: usize) -> AnyResult<i32> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for rank in 0..world {
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("FERROCCL_STORE_BIND", format!("127.0.0.1:{port}"))
            .spawn();
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(format!("starting tcp rank {rank}: {e}").into());
            }
        }
    }
    let mut code = 0;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            if let Some(status) = c.try_wait()? {
                *slot = None;
                if !status.success() && code == 0 {
                    eprintln!(
                        "collectives: tcp rank {rank} failed ({status}); stopping the others"
                    );
                    code = status.code().unwrap_or(1).max(1);
                }
            }
        }
        if code != 0 {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(code)
}

/// The bench proper, on every rank; rank 0 prints and returns its rows.
fn run_bench(
    comm: &dyn Communicator,
    plan: &Plan,
    raw: Option<RawAllReduce<'_>>,
) -> ferroccl::Result<Option<Report>> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let dev = open_device(plan)?;
    if plan.root >= n && plan.ops.iter().any(|o| o.rooted()) {
        return Err(ferroccl::Error::InvalidArgument(format!(
            "--root {} is not a rank of this world of {n}",
            plan.root
        )));
    }
    let lead = rank == 0;
    if lead {
        print_header(comm, plan);
    }
    let mut reports = Vec::new();
    for &op in &plan.ops {
        let peer = match plan.peer {
            PeerArg::Rsmpi if op != Op::AllReduce || raw.is_none() => PeerArg::None,
            p => p,
        };
        if lead {
            if peer != plan.peer {
                println!(
                    "# {}: no {} peer for this operation",
                    op.name(),
                    plan.peer.name()
                );
            }
            print_table_header(op, peer);
        }
        let mut rows = Vec::new();
        for &bytes in &plan.sizes {
            let row = measure(comm, plan, op, bytes, peer, raw, &dev)?;
            if lead {
                print_row(plan, op, peer, &row);
            }
            rows.push(row);
        }
        if lead {
            print_summary(plan, op, peer, &rows);
        }
        reports.push(OpReport { op, peer, rows });
    }
    let dgc = match plan.dgc {
        Some(_) => {
            let row = measure_dgc(comm, plan, &dev)?;
            if lead {
                print_dgc(comm, plan, &row);
            }
            Some(row)
        }
        None => None,
    };
    Ok(lead.then_some(Report { ops: reports, dgc }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn print_header(comm: &dyn Communicator, plan: &Plan) {
    let ops: Vec<&str> = plan.ops.iter().map(|o| o.name()).collect();
    println!(
        "# ferroccl collectives bench: backend {} world {} op {} minBytes {} maxBytes {} step: {}(factor) \
         warmup iters: {} iters: {} validation: {} peer: {}",
        plan.backend,
        comm.world_size(),
        ops.join(","),
        plan.minbytes,
        plan.maxbytes,
        plan.stepfactor,
        plan.warmup,
        plan.iters,
        u8::from(plan.check),
        plan.peer.name()
    );
    println!(
        "# type {} redop {} root {} | rank 0: host {} pid {} nproc {} | time = max over ranks of (elapsed / iters)",
        plan.dtype.name(),
        plan.redop.name(),
        plan.root,
        hostname(),
        std::process::id(),
        nproc()
    );
    if let Some(w) = plan.world_flag {
        if w != comm.world_size() {
            println!(
                "# note: --world {w} ignored: this backend's world has {} ranks",
                comm.world_size()
            );
        }
    }
    if comm.world_size() > nproc() {
        println!(
            "# note: {} ranks on {} cores: the CPU is oversubscribed",
            comm.world_size(),
            nproc()
        );
    }
}

fn print_table_header(op: Op, peer: PeerArg) {
    let (label, h1, h2) = match peer {
        PeerArg::Memcpy => (
            "       peer (same run)",
            "  memcpy(GB/s)  busbw/memcpy",
            "        (GB/s)              ",
        ),
        PeerArg::Rsmpi => (
            "       peer (same run)",
            "  rsmpi time(us)    ratio",
            "            (us)  fc/rsmpi",
        ),
        PeerArg::None => ("", "", ""),
    };
    println!("#");
    println!("# {}", op.name());
    println!("#                                                              out-of-place{label}");
    println!(
        "#       size         count      type   redop    root     time   algbw   busbw #wrong{h1}"
    );
    println!(
        "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)       {h2}"
    );
}

/// nccl-tests' time format.
fn time_str(us: f64) -> String {
    if us >= 10000.0 {
        format!("{us:7.0}")
    } else if us >= 100.0 {
        format!("{us:7.1}")
    } else {
        format!("{us:7.2}")
    }
}

fn print_row(plan: &Plan, op: Op, peer: PeerArg, r: &Row) {
    let redop = if op.reduces() {
        plan.redop.name()
    } else {
        "none"
    };
    let root = if op.rooted() { plan.root as i64 } else { -1 };
    let wrong = r.wrong.map_or_else(|| "N/A".to_string(), |w| w.to_string());
    let mut line = format!(
        "{:>12}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6.2}  {:>6.2}  {:>5}",
        r.size,
        r.count,
        plan.dtype.name(),
        redop,
        root,
        time_str(r.time_us),
        r.algbw,
        r.busbw,
        wrong
    );
    match peer {
        PeerArg::Memcpy => {
            let m = r.memcpy_gbps.unwrap_or(f64::NAN);
            line += &format!("  {:>12.2}  {:>12.3}", m, r.busbw / m);
        }
        PeerArg::Rsmpi => {
            let t = r.rsmpi_us.unwrap_or(f64::NAN);
            line += &format!("  {:>14}  {:>7.3}", time_str(t).trim(), r.time_us / t);
        }
        PeerArg::None => {}
    }
    println!("{line}");
}

/// printf's `%g`.
fn fmt_g(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let exp = x.abs().log10().floor() as i64;
    if !(-4..6).contains(&exp) {
        let s = format!("{x:.5e}");
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        let e: i64 = e.parse().unwrap_or(0);
        return format!("{mantissa}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let decimals = (5 - exp).clamp(0, 12) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((min, v.iter().sum::<f64>() / v.len() as f64, max))
}

fn print_summary(plan: &Plan, op: Op, peer: PeerArg, rows: &[Row]) {
    if plan.check {
        let wrong: u64 = rows.iter().filter_map(|r| r.wrong).sum();
        println!(
            "# Wrong values         : {wrong} {}",
            if wrong == 0 { "OK" } else { "FAILED" }
        );
    }
    let avg = rows.iter().map(|r| r.busbw).sum::<f64>() / rows.len().max(1) as f64;
    println!("# Avg bus bandwidth    : {}", fmt_g(avg));
    match peer {
        PeerArg::Memcpy => {
            let large: Vec<f64> = rows
                .iter()
                .filter(|r| r.size >= LARGE)
                .filter_map(|r| r.memcpy_gbps.map(|m| r.busbw / m))
                .collect();
            match stats(&large) {
                None => println!("# busbw/memcpy at >= 16 MiB: no such sizes in this run"),
                Some((min, mean, _)) => {
                    let verdict = if op == Op::AllReduce {
                        format!(
                            " -- target >= 0.5: {}",
                            if min >= 0.5 { "met" } else { "not met" }
                        )
                    } else {
                        String::new()
                    };
                    println!(
                        "# busbw/memcpy at >= 16 MiB: min {} mean {} ({} sizes){verdict}",
                        fmt_g(min),
                        fmt_g(mean),
                        large.len()
                    );
                }
            }
        }
        PeerArg::Rsmpi => {
            for (what, min_size) in [("all sizes", 0), (">= 16 MiB", LARGE)] {
                let ratios: Vec<f64> = rows
                    .iter()
                    .filter(|r| r.size >= min_size)
                    .filter_map(|r| r.rsmpi_us.map(|t| r.time_us / t))
                    .collect();
                match stats(&ratios) {
                    None => println!(
                        "# time ratio vs rsmpi (ferroccl/rsmpi), {what}: no such sizes in this run"
                    ),
                    Some((min, mean, max)) => {
                        let within = ratios.iter().filter(|&&x| x <= 1.03).count();
                        println!(
                            "# time ratio vs rsmpi (ferroccl/rsmpi), {what}: min {} mean {} max {} -- <= 1.03 at {within} of {} sizes",
                            fmt_g(min),
                            fmt_g(mean),
                            fmt_g(max),
                            ratios.len()
                        );
                    }
                }
            }
        }
        PeerArg::None => {}
    }
}

/// This rank's CUDA stream when the buffers live on the GPU (`--device`, `--backend nccl`).
#[cfg(feature = "cuda")]
type Dev = Option<std::sync::Arc<cudarc::driver::CudaStream>>;
/// Without the `cuda` feature there is never a device.
#[cfg(not(feature = "cuda"))]
type Dev = Option<std::convert::Infallible>;

#[cfg(feature = "cuda")]
fn cu<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> ferroccl::Error {
    move |e| ferroccl::Error::cuda(format!("collectives bench: {what}: {e:?}"))
}

/// The GPU of this rank: its local rank (torchrun's `LOCAL_RANK`, or mpirun's), 0 for in-process
/// ranks (which share it).
#[cfg(feature = "cuda")]
fn open_device(plan: &Plan) -> ferroccl::Result<Dev> {
    if !plan.device {
        return Ok(None);
    }
    ferroccl::device::probe(&[ferroccl::device::Lib::Cuda])?;
    let count = ferroccl::device::device_count().max(1);
    let local = if plan.backend == "local" {
        0
    } else {
        match ferroccl::rendezvous::EnvRendezvous::from_env()? {
            Some(e) => e.local_rank,
            None => [
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "SLURM_LOCALID",
            ]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
            .unwrap_or(0),
        }
    };
    let ctx = cudarc::driver::CudaContext::new(local % count).map_err(cu("opening the GPU"))?;
    Ok(Some(ctx.new_stream().map_err(cu("creating a stream"))?))
}

#[cfg(not(feature = "cuda"))]
fn open_device(_plan: &Plan) -> ferroccl::Result<Dev> {
    Ok(None)
}

/// All-reduce a few host numbers across ranks on the benchmarked communicator, through a device
/// buffer when it takes device memory only (NCCL).
fn reduce_f64(
    comm: &dyn Communicator,
    dev: &Dev,
    v: &mut [f64],
    op: ReduceOp,
) -> ferroccl::Result<()> {
    #[cfg(feature = "cuda")]
    if let (Some(s), true) = (dev, comm.supports_device()) {
        let mut d = s.clone_htod(&*v).map_err(cu("upload"))?;
        comm.all_reduce(&mut d, op)?;
        s.memcpy_dtoh(&d, v).map_err(cu("download"))?;
        return s.synchronize().map_err(cu("synchronize"));
    }
    let _ = dev;
    comm.all_reduce(v, op)
}

/// A benchmark buffer: host memory, or `bytes` of device memory viewed with the chosen dtype.
enum Store {
    Host(Storage),
    #[cfg(feature = "cuda")]
    Dev(DevStore),
}

#[cfg(feature = "cuda")]
struct DevStore {
    mem: cudarc::driver::CudaSlice<u8>,
    bytes: usize,
    ptr: u64,
}

impl Store {
    fn new(bytes: usize, dev: &Dev) -> ferroccl::Result<Store> {
        match dev {
            None => Ok(Store::Host(Storage::new(bytes))),
            #[cfg(feature = "cuda")]
            Some(s) => {
                use cudarc::driver::DevicePtr;
                // at least one byte, so that every view has a real address
                let mem = s
                    .alloc_zeros::<u8>(bytes.max(1))
                    .map_err(cu("cudaMalloc"))?;
                let ptr = {
                    let (p, _sync) = mem.device_ptr(s);
                    p
                };
                Ok(Store::Dev(DevStore { mem, bytes, ptr }))
            }
            #[cfg(not(feature = "cuda"))]
            Some(never) => match *never {},
        }
    }

    fn view(&self, dtype: DType) -> Buf<'_> {
        match self {
            Store::Host(h) => Buf::host(dtype, h.bytes()),
            #[cfg(feature = "cuda")]
            Store::Dev(d) => Buf {
                dtype,
                len: d.bytes / dtype.size(),
                // SAFETY: `d.mem` owns `d.bytes` bytes at `d.ptr` on that stream for as long as the
                // view borrows `self`.
                mem: ferroccl::buffer::Mem::Device(unsafe {
                    ferroccl::buffer::DevPtr::new(d.ptr, d.bytes, d.mem.stream())
                }),
            },
        }
    }

    fn view_mut(&mut self, dtype: DType) -> BufMut<'_> {
        match self {
            Store::Host(h) => BufMut::host(dtype, h.bytes_mut()),
            #[cfg(feature = "cuda")]
            Store::Dev(d) => BufMut {
                dtype,
                len: d.bytes / dtype.size(),
                // SAFETY: `d.mem` owns `d.bytes` bytes at `d.ptr` on that stream for as long as the
                // view borrows `self`.
                mem: ferroccl::buffer::MemMut::Device(unsafe {
                    ferroccl::buffer::DevPtr::new(d.ptr, d.bytes, d.mem.stream())
                }),
            },
        }
    }

    /// Set the contents with `f` (on the host; uploaded for device memory).
    fn write(&mut self, f: impl FnOnce(&mut [u8])) -> ferroccl::Result<()> {
        match self {
            Store::Host(h) => {
                f(h.bytes_mut());
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Store::Dev(d) => {
                let mut h = Storage::new(d.bytes);
                f(h.bytes_mut());
                if d.bytes > 0 {
                    let s = d.mem.stream().clone();
                    s.memcpy_htod(h.bytes(), &mut d.mem.slice_mut(..d.bytes))
                        .map_err(cu("upload"))?;
                    s.synchronize().map_err(cu("synchronize"))?;
                }
                Ok(())
            }
        }
    }

    /// The contents on the host (downloaded for device memory).
    fn read(&self) -> ferroccl::Result<std::borrow::Cow<'_, Storage>> {
        match self {
            Store::Host(h) => Ok(std::borrow::Cow::Borrowed(h)),
            #[cfg(feature = "cuda")]
            Store::Dev(d) => {
                let mut h = Storage::new(d.bytes);
                if d.bytes > 0 {
                    let s = d.mem.stream();
                    s.memcpy_dtoh(&d.mem.slice(..d.bytes), h.bytes_mut())
                        .map_err(cu("download"))?;
                    s.synchronize().map_err(cu("synchronize"))?;
                }
                Ok(std::borrow::Cow::Owned(h))
            }
        }
    }
}

/// A ResNet-like gradient: heavy-tailed values, different on every rank.
fn dgc_grad(n: usize, rank: usize) -> Vec<f32> {
    let mut st = (rank as u64 + 1) << 32;
    (0..n)
        .map(|_| {
            st = ferroccl::dgc::select::mix64(st);
            let a = (st >> 40) as f32 / (1u64 << 24) as f32;
            let sign = if st & 1 == 0 { 1.0 } else { -1.0 };
            sign * a * a * a * 1e-2
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// `--op dgc_sync`: one warm-up and `reps` timed syncs of each kind; every sync starts from the
/// same gradient and after a barrier.
fn measure_dgc(comm: &dyn Communicator, plan: &Plan, dev: &Dev) -> ferroccl::Result<DgcRow> {
    let Some((n, density, reps)) = plan.dgc else {
        return Err(ferroccl::Error::InvalidArgument(
            "internal: no dgc plan".into(),
        ));
    };
    let rank = comm.rank();
    let k = ((n as f64 * density).ceil() as usize).clamp(1, n);
    let base = dgc_grad(n, rank);
    let (mut dense_t, mut dgc_t, mut comp_t) = (Vec::new(), Vec::new(), Vec::new());
    let path;
    let message_bytes;
    match dev {
        None => {
            use ferroccl::dgc::{Dgc, DgcConfig};
            path = "host: Dgc::step (CPU compression, fixed-k u32/f32 all_gather) vs all_reduce";
            let cfg = DgcConfig::default()
                .final_density(density)
                .warmup_enabled(false);
            let mut dgc = Dgc::new(n, cfg)?;
            let mut g = base.clone();
            let mut msg = 0;
            for rep in 0..=reps {
                g.copy_from_slice(&base);
                comm.barrier()?;
                let t0 = Instant::now();
                comm.all_reduce(&mut g, ReduceOp::Avg)?;
                let dense = t0.elapsed().as_secs_f64();
                g.copy_from_slice(&base);
                comm.barrier()?;
                let t0 = Instant::now();
                let st = dgc.step(comm, &mut g, 1e3)?;
                let sync = t0.elapsed().as_secs_f64();
                msg = st.message_bytes;
                if rep > 0 {
                    dense_t.push(dense);
                    dgc_t.push(sync);
                    comp_t.push(f64::NAN);
                }
            }
            message_bytes = msg;
        }
        #[cfg(feature = "cuda")]
        Some(stream) => {
            path = "device: DgcKernels::compress + fixed-k pack (u32/f32) + all_gather + scatter-add kernel vs all_reduce";
            message_bytes = 4 + 8 * k;
            dgc_device(
                comm,
                stream,
                &base,
                k,
                reps,
                (&mut dense_t, &mut dgc_t, &mut comp_t),
            )?;
        }
        #[cfg(not(feature = "cuda"))]
        Some(never) => match *never {},
    }
    let comp = median(comp_t);
    let mut t = [
        median(dense_t),
        median(dgc_t),
        if comp.is_nan() { 0.0 } else { comp },
    ];
    reduce_f64(comm, dev, &mut t, ReduceOp::Max)?;
    Ok(DgcRow {
        n,
        k,
        density,
        reps,
        message_bytes,
        dense_ms: t[0] * 1e3,
        dgc_ms: t[1] * 1e3,
        compress_ms: if comp.is_nan() { f64::NAN } else { t[2] * 1e3 },
        path,
    })
}

/// The device DGC sync. Message layout as `wire` fixed-k and the scatter-add kernel expect:
/// `[u32 header][k u32 indices, PAD_INDEX-padded][k f32 values]`.
#[cfg(feature = "cuda")]
fn dgc_device(
    comm: &dyn Communicator,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    base: &[f32],
    k: usize,
    reps: usize,
    out: (&mut Vec<f64>, &mut Vec<f64>, &mut Vec<f64>),
) -> ferroccl::Result<()> {
    use ferroccl::dgc::gpu::DgcKernels;
    use ferroccl::dgc::select::{self, SelectParams, Update};
    let (dense_t, dgc_t, comp_t) = out;
    let (n, world) = (base.len(), comm.world_size());
    let kern = DgcKernels::new(stream.context().ordinal())?;
    let ks = kern.stream().clone();
    let g = kern.upload(base)?;
    let mut dense = kern.upload(base)?;
    let mut u = ks.alloc_zeros::<f32>(n).map_err(cu("alloc"))?;
    let mut v = ks.alloc_zeros::<f32>(n).map_err(cu("alloc"))?;
    let sample = ((n as f64) * 0.01).ceil().max(1.0) as usize;
    let mut c = kern.candidates(k, ((k as f64) * 1.3).ceil() as usize, sample)?;
    let msg_len = 4 + 8 * k;
    let mut msg = ks.alloc_zeros::<u8>(msg_len).map_err(cu("alloc"))?;
    let mut gathered = ks.alloc_zeros::<u8>(msg_len * world).map_err(cu("alloc"))?;
    let mut update = ks.alloc_zeros::<f32>(n).map_err(cu("alloc"))?;
    let mut err = ks.alloc_zeros::<u32>(1).map_err(cu("alloc"))?;
    let pad = vec![0xFFu8; 4 * k];
    for rep in 0..=reps {
        // dense: all-reduce (Avg) of the whole gradient
        ks.memcpy_dtod(&g, &mut dense).map_err(cu("copy"))?;
        ks.synchronize().map_err(cu("synchronize"))?;
        comm.barrier()?;
        let t0 = Instant::now();
        comm.all_reduce(&mut dense, ReduceOp::Avg)?;
        comm.synchronize()?;
        let dense_s = t0.elapsed().as_secs_f64();

        // DGC: clip norm, compress, pack, all_gather, scatter-add
        comm.barrier()?;
        let t0 = Instant::now();
        ks.memset_zeros(&mut c.sumsq).map_err(cu("memset"))?;
        kern.launch_sum_squares(&g, &mut c.sumsq)?;
        let sumsq = kern.download(&c.sumsq)?.first().copied().unwrap_or(0.0);
        let up = Update {
            scale: select::clip_scale(sumsq, 10.0, world),
            momentum: 0.9,
            momentum_correction: true,
        };
        let p = SelectParams {
            k,
            sample: Some(sample),
            seed: 7,
            step: rep as u64,
            upper: 1.3,
            lower: 0.8,
            max_adapt: 8,
        };
        let (sel, _thr) = kern.compress(&g, &mut u, &mut v, up, &p, true, &mut c)?;
        let sel = sel.min(k);
        ks.synchronize().map_err(cu("synchronize"))?;
        let comp_s = t0.elapsed().as_secs_f64();
        if sel > 0 {
            let mut iv = msg.slice_mut(4..4 + 4 * sel);
            // SAFETY: 4·sel bytes viewed as sel u32 (indices); 4-byte aligned offset.
            let mut iv = unsafe { iv.transmute_mut::<u32>(sel) }
                .ok_or_else(|| ferroccl::Error::InvalidArgument("internal: index view".into()))?;
            ks.memcpy_dtod(&c.sel_idx.slice(..sel), &mut iv)
                .map_err(cu("pack indices"))?;
            let mut vv = msg.slice_mut(4 + 4 * k..4 + 4 * k + 4 * sel);
            // SAFETY: 4·sel bytes viewed as sel f32 (values); 4-byte aligned offset.
            let mut vv = unsafe { vv.transmute_mut::<f32>(sel) }
                .ok_or_else(|| ferroccl::Error::InvalidArgument("internal: value view".into()))?;
            ks.memcpy_dtod(&c.sel_val.slice(..sel), &mut vv)
                .map_err(cu("pack values"))?;
        }
        if sel < k {
            ks.memcpy_htod(
                &pad[..4 * (k - sel)],
                &mut msg.slice_mut(4 + 4 * sel..4 + 4 * k),
            )
            .map_err(cu("pad"))?;
        }
        comm.all_gather(&msg, &mut gathered)?;
        ks.memset_zeros(&mut update).map_err(cu("memset"))?;
        kern.launch_scatter_add_fixed(&gathered, world, k, false, &mut update, &mut err)?;
        ks.synchronize().map_err(cu("synchronize"))?;
        let sync_s = t0.elapsed().as_secs_f64();
        if rep > 0 {
            dense_t.push(dense_s);
            dgc_t.push(sync_s);
            comp_t.push(comp_s);
        }
    }
    let e = kern.download(&err)?;
    if e.first().copied().unwrap_or(0) != 0 {
        return Err(ferroccl::Error::InvalidArgument(format!(
            "dgc scatter-add reported {} bad indices",
            e[0]
        )));
    }
    Ok(())
}

fn print_dgc(comm: &dyn Communicator, plan: &Plan, d: &DgcRow) {
    let speedup = d.dense_ms / d.dgc_ms;
    println!("#");
    println!(
        "# dgc_sync: {} floats ({:.1} MiB), density {} (k {} per rank, message {} B), world {}, backend {}{}",
        d.n,
        4.0 * d.n as f64 / (1 << 20) as f64,
        d.density,
        d.k,
        d.message_bytes,
        comm.world_size(),
        plan.backend,
        if plan.device { ", device buffers" } else { "" }
    );
    println!("# path: {}", d.path);
    println!(
        "# dense all_reduce(avg): {:.3} ms | DGC sync: {:.3} ms (compression {:.3} ms) | median of {} each, max over ranks",
        d.dense_ms, d.dgc_ms, d.compress_ms, d.reps
    );
    println!(
        "# DGC speedup per sync: {} -- target >= 20: {}",
        fmt_g(speedup),
        if speedup >= 20.0 { "met" } else { "not met" }
    );
}

/// A host buffer aligned for every dtype.
#[derive(Clone)]
struct Storage {
    words: Vec<u64>,
    bytes: usize,
}

impl Storage {
    fn new(bytes: usize) -> Storage {
        Storage {
            words: vec![0u64; bytes.div_ceil(8)],
            bytes,
        }
    }
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.bytes]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.bytes]
    }
}

/// Rank `rank`'s input element `i`: small integers, so that sums are exact in every dtype (1..=4:
/// bf16 sums stay exact up to 64 ranks, u8 sums up to 63) and products, of ones and twos, stay exact
/// too. They are a hash of `(rank, i)`, not periodic in either, so that each collective's expected
/// result varies along the buffer and from rank to rank: a block in the wrong place is counted as
/// wrong (three elements in four differ from those of another rank or index).
fn input(redop: ReduceOp, rank: usize, i: usize) -> f64 {
    // SplitMix64's finaliser of a mix of rank and index
    let mut z = (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (i as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ 0xfe44_0cc1_5eed_2024;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if redop == ReduceOp::Prod {
        if z % 5 == 0 {
            2.0
        } else {
            1.0
        }
    } else {
        (z % 4 + 1) as f64
    }
}

fn fill(dtype: DType, bytes: &mut [u8], f: impl Fn(usize) -> f64) {
    macro_rules! go {
        ($t:ty, $conv:expr) => {{
            let s: &mut [$t] = bytemuck::cast_slice_mut(bytes);
            for (i, x) in s.iter_mut().enumerate() {
                *x = ($conv)(f(i));
            }
        }};
    }
    match dtype {
        DType::F32 => go!(f32, |v: f64| v as f32),
        DType::F64 => go!(f64, |v: f64| v),
        DType::F16 => go!(f16, f16::from_f64),
        DType::BF16 => go!(bf16, bf16::from_f64),
        DType::I32 => go!(i32, |v: f64| v as i64 as i32),
        DType::I64 => go!(i64, |v: f64| v as i64),
        DType::U8 => go!(u8, |v: f64| v as i64 as u8),
    }
}

/// Elements of `bytes` that differ from `want(i)` (rounded or wrapped into the dtype; relative
/// tolerance `tol`, 0 = exact).
fn count_wrong(dtype: DType, bytes: &[u8], tol: f64, want: impl Fn(usize) -> f64) -> u64 {
    let close = |got: f64, w: f64| {
        if tol == 0.0 {
            got == w
        } else {
            (got - w).abs() <= tol * w.abs().max(1.0)
        }
    };
    macro_rules! go {
        ($t:ty, $get:expr, $quant:expr) => {{
            let s: &[$t] = bytemuck::cast_slice(bytes);
            s.iter()
                .enumerate()
                .filter(|&(i, x)| !close(($get)(*x), ($quant)(want(i))))
                .count() as u64
        }};
    }
    match dtype {
        DType::F32 => go!(f32, |x: f32| x as f64, |w: f64| w as f32 as f64),
        DType::F64 => go!(f64, |x: f64| x, |w: f64| w),
        DType::F16 => go!(f16, |x: f16| x.to_f64(), |w: f64| f16::from_f64(w).to_f64()),
        DType::BF16 => go!(bf16, |x: bf16| x.to_f64(), |w: f64| bf16::from_f64(w)
            .to_f64()),
        DType::I32 => go!(i32, |x: i32| x as f64, |w: f64| w as i64 as i32 as f64),
        DType::I64 => go!(i64, |x: i64| x as f64, |w: f64| w as i64 as f64),
        DType::U8 => go!(u8, |x: u8| x as f64, |w: f64| w as i64 as u8 as f64),
    }
}

/// The naive reduction over ranks of `f(rank)`.
fn reduce_ref(redop: ReduceOp, dtype: DType, n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = f(0);
    for q in 1..n {
        let v = f(q);
        acc = match redop {
            ReduceOp::Sum | ReduceOp::Avg => acc + v,
            ReduceOp::Prod => acc * v,
            ReduceOp::Min => acc.min(v),
            ReduceOp::Max => acc.max(v),
        };
    }
    match redop {
        ReduceOp::Avg if dtype.is_float() => acc / n as f64,
        ReduceOp::Avg => ((acc as i64) / n as i64) as f64,
        _ => acc,
    }
}

/// Tolerance of the check: exact, except Avg on floats (the division rounds).
fn tolerance(redop: ReduceOp, dtype: DType) -> f64 {
    match (redop, dtype) {
        (ReduceOp::Avg, DType::F32) => 1e-6,
        (ReduceOp::Avg, DType::F64) => 1e-12,
        (ReduceOp::Avg, DType::F16) => 2e-3,
        (ReduceOp::Avg, DType::BF16) => 1.6e-2,
        _ => 0.0,
    }
}

/// One operation through ferroccl's blocking API.
fn exec(
    comm: &dyn Communicator,
    plan: &Plan,
    op: Op,
    send: &Store,
    recv: &mut Store,
) -> ferroccl::Result<()> {
    let (dtype, redop, root) = (plan.dtype, plan.redop, plan.root);
    let s = send.view(dtype);
    let r = recv.view_mut(dtype);
    let c = match op {
        Op::AllReduce => Collective::AllReduce {
            send: Some(s),
            recv: r,
            op: redop,
        },
        Op::ReduceScatter => Collective::ReduceScatter {
            send: s,
            recv: r,
            op: redop,
        },
        Op::AllGather => Collective::AllGather { send: s, recv: r },
        Op::Broadcast => Collective::Broadcast { buf: r, root },
        Op::Reduce => Collective::Reduce {
            send: s,
            recv: (comm.rank() == root).then_some(r),
            op: redop,
            root,
        },
        Op::AllToAll => Collective::AllToAll { send: s, recv: r },
    };
    comm.run(c)
}

/// Barrier, then `k` back-to-back operations; seconds elapsed on this rank.
fn time_ferroccl(
    comm: &dyn Communicator,
    plan: &Plan,
    op: Op,
    k: usize,
    send: &Store,
    recv: &mut Store,
) -> ferroccl::Result<f64> {
    comm.barrier()?;
    let t0 = Instant::now();
    for _ in 0..k {
        exec(comm, plan, op, send, recv)?;
    }
    // stream-ordered NCCL (FERROCCL_STREAM_ORDERED=1) enqueued them all: nccl-tests' way of timing
    comm.synchronize()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Barrier, then `k` back-to-back rsmpi all-reduces on the same buffers.
fn time_raw(
    comm: &dyn Communicator,
    raw: RawAllReduce<'_>,
    k: usize,
    send: &Store,
    recv: &mut Store,
) -> ferroccl::Result<f64> {
    comm.barrier()?;
    #[allow(irrefutable_let_patterns)] // without the `cuda` feature every Store is Host
    let (Store::Host(send), Store::Host(recv)) = (send, recv) else {
        return Err(ferroccl::Error::Unsupported(
            "the rsmpi peer times host buffers only".into(),
        ));
    };
    let s: &[f32] = bytemuck::cast_slice(send.bytes());
    let r: &mut [f32] = bytemuck::cast_slice_mut(recv.bytes_mut());
    let t0 = Instant::now();
    for _ in 0..k {
        raw(s, r)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Single-threaded `copy_from_slice` of `size` bytes between two buffers, in GB/s (the local peer).
fn memcpy_gbps(size: usize, iters: usize) -> f64 {
    let src = vec![0x5Au8; size];
    let mut dst = vec![0u8; size];
    // Warm up: fault in `dst`'s pages and bring the copy loop up to speed.
    let reps = iters.max((64usize << 20).div_ceil(size));
    for _ in 0..reps.min(4 + (256usize << 20) / size) {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    let t0 = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    let secs = t0.elapsed().as_secs_f64();
    (size * reps) as f64 / 1e9 / secs
}

/// Check the output of one fresh operation; this rank's count of wrong elements.
fn check_once(
    comm: &dyn Communicator,
    plan: &Plan,
    op: Op,
    lay: &Layout,
    send: &Store,
    recv: &mut Store,
) -> ferroccl::Result<u64> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let (dtype, redop, root) = (plan.dtype, plan.redop, plan.root);
    if !(op == Op::Broadcast && rank == root) {
        recv.write(|b| b.fill(0xFF))?; // poison: NaN for floats, -1 / 255 for integers
    }
    exec(comm, plan, op, send, recv)?;
    let c = lay.count;
    let tol = tolerance(redop, dtype);
    let host = recv.read()?;
    let out = host.bytes();
    Ok(match op {
        Op::AllReduce => count_wrong(dtype, out, tol, |i| {
            reduce_ref(redop, dtype, n, |q| input(redop, q, i))
        }),
        Op::ReduceScatter => count_wrong(dtype, out, tol, |i| {
            reduce_ref(redop, dtype, n, |q| input(redop, q, rank * c + i))
        }),
        Op::AllGather => count_wrong(dtype, out, 0.0, |j| input(redop, j / c, j % c)),
        Op::Broadcast => count_wrong(dtype, out, 0.0, |i| input(redop, root, i)),
        Op::Reduce if rank == root => count_wrong(dtype, out, tol, |i| {
            reduce_ref(redop, dtype, n, |q| input(redop, q, i))
        }),
        Op::Reduce => 0,
        Op::AllToAll => count_wrong(dtype, out, 0.0, |j| input(redop, j / c, rank * c + j % c)),
    })
}

/// One row: warm up, time (interleaved with the rsmpi peer if any), check, time the memcpy peer.
fn measure(
    comm: &dyn Communicator,
    plan: &Plan,
    op: Op,
    bytes: usize,
    peer: PeerArg,
    raw: Option<RawAllReduce<'_>>,
    dev: &Dev,
) -> ferroccl::Result<Row> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let elt = plan.dtype.size();
    let lay = op.layout(bytes, elt, n);
    let mut send = Store::new(lay.send * elt, dev)?;
    let mut recv = Store::new(lay.recv * elt, dev)?;
    send.write(|b| fill(plan.dtype, b, |i| input(plan.redop, rank, i)))?;
    let root_fill = op == Op::Broadcast && rank == plan.root;
    recv.write(|b| {
        b.fill(0xFF);
        if root_fill {
            fill(plan.dtype, b, |i| input(plan.redop, rank, i));
        }
    })?;
    let raw = if peer == PeerArg::Rsmpi { raw } else { None };

    for _ in 0..plan.warmup {
        exec(comm, plan, op, &send, &mut recv)?;
    }
    if let Some(raw) = raw {
        time_raw(comm, raw, plan.warmup, &send, &mut recv)?;
    }

    let sent0 = comm.bytes_sent();
    let mut times = [0.0f64, 0.0];
    match raw {
        None => times[0] = time_ferroccl(comm, plan, op, plan.iters, &send, &mut recv)?,
        Some(raw) => {
            // Blocks in ABBA order: ferroccl, rsmpi | rsmpi, ferroccl | ... so that drift cancels.
            let blocks = plan.iters.min(4);
            for b in 0..blocks {
                let k = plan.iters / blocks + usize::from(b < plan.iters % blocks);
                if b % 2 == 0 {
                    times[0] += time_ferroccl(comm, plan, op, k, &send, &mut recv)?;
                    times[1] += time_raw(comm, raw, k, &send, &mut recv)?;
                } else {
                    times[1] += time_raw(comm, raw, k, &send, &mut recv)?;
                    times[0] += time_ferroccl(comm, plan, op, k, &send, &mut recv)?;
                }
            }
        }
    }
    let bytes_sent_per_op = (comm.bytes_sent() - sent0) as f64 / plan.iters as f64;
    for t in &mut times {
        *t /= plan.iters as f64;
    }
    reduce_f64(comm, dev, &mut times, ReduceOp::Max)?;

    let wrong = if plan.check {
        let mut w = [check_once(comm, plan, op, &lay, &send, &mut recv)? as f64];
        reduce_f64(comm, dev, &mut w, ReduceOp::Sum)?;
        Some(w[0] as u64)
    } else {
        None
    };
    drop(send);
    drop(recv);

    let memcpy = if peer == PeerArg::Memcpy {
        comm.barrier()?;
        let m = (rank == 0).then(|| memcpy_gbps(lay.size, plan.iters));
        comm.barrier()?;
        m
    } else {
        None
    };

    let algbw = lay.size as f64 / 1e9 / times[0];
    let factor = op.bus_factor(n);
    let rsmpi = raw.map(|_| times[1]);
    Ok(Row {
        size: lay.size,
        count: lay.count,
        time_us: times[0] * 1e6,
        algbw,
        busbw: algbw * factor,
        wrong,
        memcpy_gbps: memcpy,
        rsmpi_us: rsmpi.map(|t| t * 1e6),
        rsmpi_busbw: rsmpi.map(|t| lay.size as f64 / 1e9 / t * factor),
        bytes_sent_per_op,
    })
}

fn write_json(path: &str, plan: &Plan, world: usize, report: &Report) -> AnyResult<()> {
    let mut rows = Vec::new();
    for rep in &report.ops {
        for r in &rep.rows {
            rows.push(json!({
                "op": rep.op.name(),
                "peer": rep.peer.name(),
                "size": r.size,
                "count": r.count,
                "type": plan.dtype.name(),
                "redop": if rep.op.reduces() { plan.redop.name() } else { "none" },
                "root": if rep.op.rooted() { plan.root as i64 } else { -1 },
                "time_us": r.time_us,
                "algbw_gbps": r.algbw,
                "busbw_gbps": r.busbw,
                "wrong": r.wrong,
                "memcpy_gbps": r.memcpy_gbps,
                "busbw_over_memcpy": r.memcpy_gbps.map(|m| r.busbw / m),
                "rsmpi_time_us": r.rsmpi_us,
                "rsmpi_busbw_gbps": r.rsmpi_busbw,
                "time_ratio_vs_rsmpi": r.rsmpi_us.map(|t| r.time_us / t),
                "rank0_bytes_sent_per_op": r.bytes_sent_per_op,
            }));
        }
    }
    let doc = json!({
        "bench": "ferroccl collectives",
        "backend": plan.backend,
        "world": world,
        "iters": plan.iters,
        "warmup": plan.warmup,
        "check": plan.check,
        "peer": plan.peer.name(),
        "device": plan.device,
        "host": hostname(),
        "nproc": nproc(),
        "rows": rows,
        "dgc_sync": report.dgc.as_ref().map(|d| json!({
            "n": d.n,
            "k": d.k,
            "density": d.density,
            "reps": d.reps,
            "message_bytes": d.message_bytes,
            "dense_bytes": 4 * d.n,
            "dense_allreduce_ms": d.dense_ms,
            "dgc_sync_ms": d.dgc_ms,
            "dgc_compress_ms": d.compress_ms,
            "speedup": d.dense_ms / d.dgc_ms,
            "path": d.path,
        })),
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
        .map_err(|e| format!("writing {path}: {e}"))?;
    Ok(())
}

fn human_size(b: f64) -> String {
    let b = b.round() as u64;
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{}{unit}", b >> shift);
        }
    }
    if b >= 1 << 10 {
        return format!("{:.1}K", b as f64 / 1024.0);
    }
    format!("{b}")
}

fn write_plot(path: &str, plan: &Plan, world: usize, reports: &[OpReport]) -> AnyResult<()> {
    use plotters::prelude::*;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for rep in reports {
        let pts = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
            rep.rows
                .iter()
                .filter_map(|r| f(r).map(|y| (r.size as f64, y)))
                .filter(|p| p.1.is_finite())
                .collect()
        };
        series.push((format!("{} busbw", rep.op.name()), pts(&|r| Some(r.busbw))));
        match rep.peer {
            PeerArg::Memcpy => series.push((
                format!("memcpy GB/s ({} run)", rep.op.name()),
                pts(&|r| r.memcpy_gbps),
            )),
            PeerArg::Rsmpi => series.push((
                format!("rsmpi {} busbw", rep.op.name()),
                pts(&|r| r.rsmpi_busbw),
            )),
            PeerArg::None => {}
        }
    }
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin {
        (xmin, xmax)
    } else {
        (1.0, 2.0)
    };
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "ferroccl {} bench, backend {}, {} ranks, {}",
        reports
            .iter()
            .map(|r| r.op.name())
            .collect::<Vec<_>>()
            .join("/"),
        plan.backend,
        world,
        plan.dtype.name()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale().base(2.0), 0.0..ymax)?;
    let fmt_x = |x: &f64| human_size(*x);
    chart
        .configure_mesh()
        .x_desc("size (bytes)")
        .y_desc("GB/s")
        .x_label_formatter(&fmt_x)
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
