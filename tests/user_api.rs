//! Written as an external crate would be, against the public API only (no `common` helpers, no
//! `&*` tricks): what `init()` returns — a `Box<dyn Communicator>` — goes straight into the
//! bucketer with the DGC hook, `Dgc::step` and the coded aggregation; so do `&C` and `Arc<C>`.

use ferroccl::prelude::*;
use ferroccl::{CollectiveRef, Config};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Tensor sizes of a toy model.
const SIZES: [usize; 4] = [300, 40, 1200, 9];

/// A rank's gradient of tensor `t` at `step`: small integers, so sums and averages are exact.
fn grad(rank: usize, step: usize, t: usize) -> Vec<f32> {
    (0..SIZES[t])
        .map(|i| ((rank * 7 + step * 3 + t * 11 + i) % 17) as f32 - 8.0)
        .collect()
}

/// (last DGC updates + the flat Dgc's, dense sums, coded sum, DGC buckets)
type Trained = (Vec<Vec<f32>>, Vec<Vec<f32>>, f32, usize);

/// What a trainer writes: DGC-bucketed training steps, a dense bucketed step, a direct `Dgc`
/// step and a coded aggregation — generic over whatever communicator it is handed.
fn train<C: Communicator>(comm: C) -> Result<Trained> {
    let (rank, n) = (comm.rank(), comm.world_size());

    // several steps through one bucketer with the DGC hook: the epoch is counted, the step ends
    // in finish
    let cfg = DgcConfig::default().final_density(0.05);
    let mut b = Bucketer::with_hook(&comm, 2048, DgcHook::new(cfg.clone(), 2)?);
    let mut updates = Vec::new();
    for step in 0..6 {
        let mut g: Vec<Vec<f32>> = (0..SIZES.len()).map(|t| grad(rank, step, t)).collect();
        for (id, t) in g.iter().enumerate().rev() {
            b.push(id, t)?;
        }
        b.finish(|id, update| g[id].copy_from_slice(update))?;
        updates = g;
    }
    let dgc_buckets = b.hook().buckets();
    assert_eq!(b.hook().epoch(), 3.0);

    // the dense form, and a single Dgc over a flat vector
    let mut dense: Vec<Vec<f32>> = (0..SIZES.len()).map(|t| grad(rank, 0, t)).collect();
    let mut d = Bucketer::new(&comm, 2048, ReduceOp::Sum);
    for (id, t) in dense.iter().enumerate().rev() {
        d.push(id, t)?;
    }
    d.finish(|id, sum| dense[id].copy_from_slice(sum))?;
    let mut flat = grad(rank, 0, 2);
    let mut dgc = Dgc::new(flat.len(), cfg)?;
    dgc.step(&comm, &mut flat, 0.0)?;

    // coded aggregation tolerating one straggler (none with a single rank)
    let code = Arc::new(GradientCode::cyclic(n, usize::from(n > 1), 42)?);
    let parts: Vec<Vec<f32>> = code
        .partitions(rank)
        .iter()
        .map(|&p| vec![p as f32 + 1.0])
        .collect();
    let views: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
    let coded = code.encode(rank, &views)?;
    let mut agg = CodedAllReduce::new(code.clone(), Aggregator::Fixed(0));
    let mut sum = [0f32];
    agg.round(&comm, &coded, &mut sum)?;
    agg.finish(&comm, Duration::from_secs(10))?;
    updates.push(flat);
    Ok((updates, dense, sum[0], dgc_buckets))
}

#[test]
fn what_init_returns_composes_with_every_primitive() -> Result<()> {
    // no launcher variables here: init() gives a one-rank in-process communicator
    let comm = ferroccl::init()?;
    assert_eq!(comm.local_rank(), comm.rank());
    assert_eq!(comm.device(), None);
    let (_, dense, sum, buckets) = train(&comm)?;
    assert!(buckets >= 2);
    assert_eq!(
        dense[0],
        grad(0, 0, 0),
        "a one-rank sum is the gradient itself"
    );
    assert_eq!(sum, 1.0, "one partition, gradient [1]");
    // and by value: the box itself is a communicator
    train(comm)?;
    Ok(())
}

#[test]
fn boxed_arced_and_borrowed_communicators_give_the_same_results() {
    let world = 4;
    let expected_sum = (1..=world).sum::<usize>() as f32;
    for how in ["box", "arc", "ref"] {
        let comms = ferroccl::local::world(world, &Default::default()).unwrap();
        let outs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || match how {
                        "box" => train(Box::new(c) as Box<dyn Communicator>),
                        "arc" => train(Arc::new(c)),
                        _ => train(&c),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        for (rank, (updates, dense, sum, _)) in outs.iter().enumerate() {
            assert_eq!(
                updates, &outs[0].0,
                "{how}: rank {rank}'s DGC updates differ"
            );
            for (t, v) in dense.iter().enumerate() {
                let want: Vec<f32> = (0..SIZES[t])
                    .map(|i| (0..world).map(|r| grad(r, 0, t)[i]).sum())
                    .collect();
                assert_eq!(v, &want, "{how}: tensor {t}");
            }
            assert!((sum - expected_sum).abs() < 1e-3, "{how}: coded sum {sum}");
        }
    }
}

/// A communicator that overrides every provided method: a wrapper must forward each of them
/// rather than fall back to the trait's defaults.
struct Tagged {
    inner: ferroccl::local::LocalComm,
    runs: AtomicUsize,
}

impl Communicator for Tagged {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        "tagged"
    }
    fn config(&self) -> &Config {
        self.inner.config()
    }
    fn exec(&self, c: CollectiveRef<'_>) -> Result<()> {
        self.inner.exec(c)
    }
    fn exec_async(&self, c: ferroccl::CollectiveOwned) -> Result<Work<ferroccl::CollectiveOwned>> {
        self.inner.exec_async(c)
    }
    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
        self.inner.split(color, key)
    }
    fn local_rank(&self) -> usize {
        7
    }
    fn device(&self) -> Option<usize> {
        Some(3)
    }
    fn bytes_sent(&self) -> u64 {
        12345
    }
    fn link_clock(&self) -> Option<&ferroccl::link::RankClock> {
        // the inner world runs under a link model (slowdown 3); the default would be None
        self.inner.link_clock()
    }
    fn synchronize(&self) -> Result<()> {
        Err(Error::user("synchronize forwarded"))
    }
    fn run(&self, c: CollectiveRef<'_>) -> Result<()> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.inner.run(c)
    }
}

fn check_forwarding<C: Communicator>(c: &C, runs: &AtomicUsize) {
    assert_eq!(c.backend(), "tagged");
    assert_eq!(c.local_rank(), 7);
    assert_eq!(c.device(), Some(3));
    assert_eq!(c.bytes_sent(), 12345);
    // LinkClock (compute/virtual_time) reaches the wrapped clock through link_clock
    let t0 = c.virtual_time().expect("link_clock forwarded");
    c.compute(Duration::from_secs(2)).unwrap();
    assert_eq!(c.virtual_time().unwrap() - t0, Duration::from_secs(6));
    assert!(c
        .synchronize()
        .unwrap_err()
        .to_string()
        .contains("synchronize"));
    let before = runs.load(Ordering::Relaxed);
    let mut v = [2f32; 3];
    c.all_reduce(&mut v, ReduceOp::Sum).unwrap(); // CommunicatorExt, through the wrapper's run
    assert_eq!(v, [2.0; 3]);
    assert_eq!(
        runs.load(Ordering::Relaxed),
        before + 1,
        "run was forwarded, not re-provided"
    );
}

#[test]
fn wrappers_forward_every_method_including_the_provided_ones() {
    use ferroccl::local::{Link, LinkModel, Options, TimeMode};
    let model = LinkModel::uniform(TimeMode::Virtual, Link::gbit(10.0, Duration::ZERO))
        .with_slowdown(0, 3.0);
    let opts = Options {
        link: Some(model),
        ..Options::default()
    };
    let mut w = ferroccl::local::world(1, &opts).unwrap();
    let t = Arc::new(Tagged {
        inner: w.pop().unwrap(),
        runs: AtomicUsize::new(0),
    });
    let borrowed: &Tagged = t.as_ref();
    check_forwarding(&borrowed, &t.runs);
    check_forwarding(&t, &t.runs);
    let runs = &t.runs;
    let boxed: Box<&Tagged> = Box::new(&*t);
    check_forwarding(&boxed, runs);
    let dynbox: Box<dyn Communicator> = Box::new(t.clone());
    check_forwarding(&dynbox, runs);
}
