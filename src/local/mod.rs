//! The in-process backend: N ranks as threads of one process.
//!
//! No system dependencies; it is the default backend, what the tests and the quickstart use, and —
//! with a [`LinkModel`] — a laboratory for what compression and straggler tolerance buy on a slow
//! network. Ranks talk through crossbeam channels; large blocks move single-copy (the receiver reads
//! the sender's memory under a loan, see `engine::msg`); the algorithms are the ring and tree
//! algorithms of `engine::algo`, not a gather to rank 0.
//!
//! ```
//! use ferroccl::prelude::*;
//! let out = ferroccl::local::run(3, |comm| {
//!     let mut v = vec![0i64; 6];
//!     comm.all_gather(&[comm.rank() as i64, 1], &mut v)?;
//!     Ok(v)
//! }).unwrap();
//! assert_eq!(out[2], vec![0, 1, 1, 1, 2, 1]);
//! ```
//!
//! Failure semantics: if a rank's closure panics or a rank drops its communicator while others still
//! wait on it, the others' pending and later collectives return [`crate::Error::PeerLost`] (never a
//! hang); [`run`] returns the cause: the panicking rank and its message ([`crate::Error::RankPanicked`]) or the failing rank's own error, not a peer's `PeerLost`. The same holds when something
//! panics on a rank's worker thread (a buffer implementation, an internal assertion): that rank's
//! call returns `PeerLost` naming itself and the peers see the rank gone at once, not after their
//! timeout. A bad [`LinkModel`] or a zero timeout is rejected by [`world`]/[`run_with`].

/// The link model now lives at [`crate::link`] (the shared engine uses it, and the engine must not
/// import a backend); this re-export keeps `ferroccl::local::link::*` paths working.
pub use crate::link;

use crate::comm::plan_split;
use crate::engine::{Engine, Health, Worker};
use crate::{Communicator, Config, Error, Result};
use crossbeam::channel::{unbounded, Sender};
use link::Clock;
pub use link::{Link, LinkModel, TimeMode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Options for an in-process world.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Timeout and checked mode (default: from the environment).
    pub config: Option<Config>,
    /// A link model (default: none — memory speed).
    pub link: Option<LinkModel>,
    /// Disable single-copy loans (every message is copied), for comparison.
    pub copy_only: bool,
}

/// State shared by all communicators of one `run` (for `split`).
struct WorldShared {
    next_id: AtomicU64,
    splits: Mutex<HashMap<(u64, u64, u32), Arc<GroupSetup>>>,
    epoch: Instant,
}

/// The channels of one new group, created by whichever member arrives first.
struct GroupSetup {
    id: u64,
    senders: Vec<Sender<crate::engine::msg::Msg>>,
    inboxes: Mutex<Vec<Option<crossbeam::channel::Receiver<crate::engine::msg::Msg>>>>,
    health: Arc<Health>,
}

impl GroupSetup {
    fn new(id: u64, n: usize) -> GroupSetup {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded()).unzip();
        GroupSetup {
            id,
            senders,
            inboxes: Mutex::new(inboxes.into_iter().map(Some).collect()),
            health: Health::new(n),
        }
    }
}

/// One rank's communicator in an in-process world.
pub struct LocalComm {
    rank: usize,
    size: usize,
    id: u64,
    cfg: Config,
    worker: Worker,
    health: Arc<Health>,
    clock: Option<link::RankClock>,
    traffic: Arc<crate::stats::Traffic>,
    world: Arc<WorldShared>,
    opts: Options,
    splits: AtomicU64,
}

impl LocalComm {
    fn spawn(
        rank: usize,
        setup: &GroupSetup,
        cfg: Config,
        opts: &Options,
        world: Arc<WorldShared>,
    ) -> Result<LocalComm> {
        let size = setup.senders.len();
        let inbox = setup
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(rank)
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("internal: rank {rank} joined its group twice"))
            })?;
        let clock = opts
            .link
            .clone()
            .map(|m| Arc::new(Mutex::new(Clock::new(m, rank, size, world.epoch))));
        let traffic = Arc::new(crate::stats::Traffic::new());
        let mut engine = Engine::new(
            rank,
            size,
            setup.senders.clone(),
            inbox,
            setup.health.clone(),
            clock.clone(),
            cfg.clone(),
            traffic.clone(),
            !opts.copy_only,
        );
        engine.peers_share_memory = true;
        let worker = Worker::spawn(engine, format!("ferroccl-local-{rank}"))?;
        Ok(LocalComm {
            rank,
            size,
            id: setup.id,
            cfg,
            worker,
            health: setup.health.clone(),
            clock: clock.map(link::RankClock),
            traffic,
            world,
            opts: opts.clone(),
            splits: AtomicU64::new(0),
        })
    }

    /// The link model's clock as seconds, if a model is set.
    pub fn now(&self) -> Option<f64> {
        self.clock.as_ref().map(link::RankClock::seconds)
    }
}

impl Communicator for LocalComm {
    crate::engine::engine_communicator!("local");

    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
        // every rank counts every split, members or not, so the registry keys agree
        let split_no = self.splits.fetch_add(1, Ordering::Relaxed);
        let Some(plan) = plan_split(self, color, key)? else {
            return Ok(None);
        };
        let setup = {
            let mut reg = self.world.splits.lock().unwrap_or_else(|e| e.into_inner());
            reg.entry((self.id, split_no, plan.color))
                .or_insert_with(|| {
                    Arc::new(GroupSetup::new(
                        self.world.next_id.fetch_add(1, Ordering::Relaxed),
                        plan.size,
                    ))
                })
                .clone()
        };
        let c = LocalComm::spawn(
            plan.new_rank,
            &setup,
            self.cfg.clone(),
            &self.opts,
            self.world.clone(),
        )?;
        Ok(Some(Box::new(c)))
    }

    fn link_clock(&self) -> Option<&link::RankClock> {
        self.clock.as_ref()
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        // Stop the worker after it finished what was queued; then tell the peers we are gone.
        self.worker.stop();
        if std::thread::panicking() {
            self.health.break_for(self.rank);
        }
        self.health.gone[self.rank].store(true, Ordering::Release);
    }
}

/// Create the communicators of an in-process world of `n` ranks (for callers that manage threads).
pub fn world(n: usize, opts: &Options) -> Result<Vec<LocalComm>> {
    if n == 0 {
        return Err(Error::InvalidArgument(
            "world size must be at least 1".into(),
        ));
    }
    let cfg = match &opts.config {
        Some(c) => c.clone(),
        None => Config::from_env()?,
    };
    validate(&cfg, opts)?;
    let shared = Arc::new(WorldShared {
        next_id: AtomicU64::new(1),
        splits: Mutex::new(HashMap::new()),
        epoch: Instant::now(),
    });
    let setup = GroupSetup::new(0, n);
    (0..n)
        .map(|r| LocalComm::spawn(r, &setup, cfg.clone(), opts, shared.clone()))
        .collect()
}

/// Check what a world computes with before any worker starts, so bad values are a named
/// [`Error::InvalidArgument`] here rather than a panic (or an infinite sleep) on a worker later.
fn validate(cfg: &Config, opts: &Options) -> Result<()> {
    if cfg.timeout.is_zero() {
        return Err(Error::InvalidArgument(
            "options.config.timeout is 0 s: every wait would fail at once; use a positive timeout \
             (Config::with_timeout, or FERROCCL_TIMEOUT seconds)"
                .into(),
        ));
    }
    if let Some(m) = &opts.link {
        m.validate()?;
    }
    Ok(())
}

/// Run `f` on `n` ranks (one thread each) and return every rank's result, in rank order.
///
/// If any rank returns an error or panics, the failure that caused the others is returned: a panic
/// as [`Error::RankPanicked`] naming the rank and its message, else the lowest rank's own error
/// (a user error passed up with `?`, see [`Error::user`]) rather than the `PeerLost` its peers saw;
/// the other ranks are not left hanging (their collectives fail with `PeerLost` within the timeout).
pub fn run<T, F>(n: usize, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&LocalComm) -> Result<T> + Sync,
{
    run_with(n, &Options::default(), f)
}

/// [`run`] with options (link model, timeout, copy-only).
pub fn run_with<T, F>(n: usize, opts: &Options, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&LocalComm) -> Result<T> + Sync,
{
    let comms = world(n, opts)?;
    let f = &f;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::Builder::new()
                    .name(format!("ferroccl-rank-{}", comm.rank))
                    .spawn_scoped(s, move || f(&comm))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| match h {
                Err(e) => Err(Error::io(format!("spawning rank {r}"), e)),
                Ok(h) => h.join().unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    Err(Error::RankPanicked {
                        rank: r,
                        message: msg,
                    })
                }),
            })
            .collect()
    });
    first_cause(results)
}

/// Every rank's value, or the failure that explains the others: a panic first (the other ranks
/// only saw its rank vanish, as `PeerLost`), then the lowest rank's error that is not a
/// consequence of another rank failing (`PeerLost`, `Timeout`), else the lowest rank's error.
fn first_cause<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    if results.iter().all(Result::is_ok) {
        return results.into_iter().collect();
    }
    let rank_of = |e: &Error| match e {
        Error::RankPanicked { .. } => 0,
        e if !e.is_fatal() => 1,
        _ => 2,
    };
    let cause = results
        .into_iter()
        .filter_map(Result::err)
        .enumerate()
        .min_by_key(|(i, e)| (rank_of(e), *i))
        .map(|(_, e)| e);
    Err(cause.unwrap_or_else(|| Error::InvalidArgument("internal: no failure found".into())))
}
