//! The [`Communicator`] trait: one API over every backend.
//!
//! Layering, in the manner of rsmpi's capability traits:
//! - [`Communicator`] is object-safe (`Box<dyn Communicator>` is what [`crate::init`] returns). A backend
//!   implements four things: identity (`rank`, `world_size`, `backend`), [`Communicator::exec`] for a
//!   blocking [`Collective`] over borrowed views, [`Communicator::exec_async`] for a non-blocking one
//!   over owned buffers, and [`Communicator::split`].
//! - The provided [`Communicator::run`]/[`Communicator::start`] wrap those hooks with what every backend
//!   needs identically: argument validation (named errors, never a panic), checked mode
//!   (`FERROCCL_CHECK=1`) and one tracing span per collective.
//! - [`CommunicatorExt`] (blanket-implemented) gives the typed methods users call: `all_reduce(&mut v,
//!   ReduceOp::Sum)`, `iall_reduce(v, op)?.wait()?`, and so on, for any [`Buffer`]: host slices today,
//!   device slices with the `cuda` feature — the same methods, no second API.
//!
//! Semantics follow MPI/NCCL: every rank calls the same collectives in the same order; buffer length
//! rules are those of NCCL (`reduce_scatter`: send = world × recv; `all_gather`: recv = world × send;
//! `all_to_all`: equal splits of send.len / world).

use crate::buffer::{Buffer, BufferMut, Empty, OwnedBuffer};
use crate::work::Work;
use crate::{Config, DType, Error, ReduceOp, Result};
use std::time::{Duration, Instant};

pub use crate::collective::{describe_signature, Collective, CollectiveOwned, CollectiveRef};

/// A group of ranks that communicate. See the module docs for the layering.
pub trait Communicator: Send + Sync {
    /// This process's (or thread's) rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Backend name: `local`, `tcp`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    /// Settings (timeout, checked mode).
    fn config(&self) -> &Config;

    /// Backend hook: run a validated blocking collective. Call [`Communicator::run`] instead.
    fn exec(&self, c: CollectiveRef<'_>) -> Result<()>;
    /// Backend hook: start a validated non-blocking collective. Call [`Communicator::start`] instead.
    fn exec_async(&self, c: CollectiveOwned) -> Result<Work<CollectiveOwned>>;

    /// Split into sub-communicators: ranks passing the same `color` form one, ordered by `(key, rank)`;
    /// `None` opts out (returns `Ok(None)`), like `MPI_UNDEFINED`. Collective over this communicator.
    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>>;

    /// This rank's index among the ranks on its host — what Horovod's `local_rank()` and torchrun's
    /// `LOCAL_RANK` give, typically the GPU to use. In-process ranks all share one host, so there
    /// it is the rank itself; TCP reads `LOCAL_RANK` (the rank when unset: a single-host launch);
    /// MPI asks MPI which ranks share memory with this one; NCCL is its device's launch slot.
    /// Backends that know nothing better report [`Communicator::rank`].
    fn local_rank(&self) -> usize {
        self.rank()
    }

    /// The CUDA ordinal this communicator works on (NCCL: its device), `None` for host backends,
    /// which take device buffers of any device through staging.
    fn device(&self) -> Option<usize> {
        None
    }

    /// True if the backend works on device memory directly (NCCL); host-only backends get device
    /// buffers staged through pinned host memory by [`Communicator::run`]/[`Communicator::start`].
    fn supports_device(&self) -> bool {
        false
    }

    /// Checked mode's exchange: all-gather each rank's call signature (`mine`, 5 words) into `all`.
    /// Backends whose collectives need device memory override this.
    fn exchange_signatures(&self, mine: &[i64], all: &mut [i64]) -> Result<()> {
        self.exec(Collective::AllGather {
            send: mine.buf(),
            recv: all.buf_mut(),
        })
    }

    /// Wait until every operation this communicator has enqueued in stream order is complete, with
    /// the timeout. Only the NCCL backend with [`Config::stream_ordered`] returns from a blocking
    /// call before the operation completed on the GPU (like NCCL itself and `torch.distributed`);
    /// everywhere else every call is already complete when it returns and this does nothing.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Backend hook: this communicator's traffic counters ([`crate::stats`] says what each backend
    /// counts). `None` (the default) counts nothing and [`Communicator::stats`] reads zeros.
    fn traffic(&self) -> Option<&crate::stats::Traffic> {
        None
    }

    /// A snapshot of what this communicator moved: calls, bytes sent and received per operation kind.
    fn stats(&self) -> crate::stats::Stats {
        self.traffic().map(|t| t.snapshot()).unwrap_or_default()
    }

    /// Zero the traffic counters.
    fn reset_stats(&self) {
        if let Some(t) = self.traffic() {
            t.reset();
        }
    }

    /// Bytes this rank has sent so far (payload, all operations): `stats().bytes_sent()`.
    fn bytes_sent(&self) -> u64 {
        self.stats().bytes_sent()
    }

    /// This rank's clock under a link model, if the communicator runs under one (the in-process
    /// backend with `local::Options::link`). The link-model hooks themselves, `compute` and
    /// `virtual_time`, are the capability trait [`LinkClock`] (in the prelude), which every
    /// communicator has through this accessor.
    fn link_clock(&self) -> Option<&crate::link::RankClock> {
        None
    }

    /// Run a blocking collective: validation, checked mode, tracing, then the backend.
    fn run(&self, c: CollectiveRef<'_>) -> Result<()> {
        c.validate(self.rank(), self.world_size())?;
        #[cfg(feature = "cuda")]
        if !self.supports_device() && crate::device::stage::has_device(&c) {
            return crate::device::stage::run_staged(c, |host| self.run(host));
        }
        if let Some(t) = self.traffic() {
            t.call(c.kind());
        }
        if self.config().check {
            check_signatures(self, &c)?;
        }
        let name = c.name();
        let bytes = c.bytes();
        let span = tracing::debug_span!(
            "collective",
            op = name,
            bytes,
            backend = self.backend(),
            duration_us = tracing::field::Empty
        );
        if span.is_disabled() {
            return self.exec(c); // no subscriber: skip the clock (it costs ~5% of a tiny MPI all-reduce)
        }
        let _g = span.enter();
        let t0 = Instant::now();
        let r = self.exec(c);
        span.record("duration_us", t0.elapsed().as_secs_f64() * 1e6);
        r
    }

    /// Start a non-blocking collective: validation and checked mode now, then the backend.
    fn start(&self, mut c: CollectiveOwned) -> Result<Work<CollectiveOwned>> {
        let (name, bytes) = {
            let v = c.views();
            v.validate(self.rank(), self.world_size())?;
            #[cfg(feature = "cuda")]
            if !self.supports_device() && crate::device::stage::has_device(&v) {
                return crate::device::stage::start_staged(c, |host| self.start(host));
            }
            if let Some(t) = self.traffic() {
                t.call(v.kind());
            }
            if self.config().check {
                check_signatures(self, &v)?;
            }
            (v.name(), v.bytes())
        };
        // One span per collective here too: opened now, closed when the work completes (a span may
        // outlive the call that entered it), with the time from start to completion.
        let span = tracing::debug_span!(
            "collective",
            op = name,
            bytes,
            backend = self.backend(),
            nonblocking = true,
            duration_us = tracing::field::Empty
        );
        if span.is_disabled() {
            return self.exec_async(c);
        }
        let t0 = Instant::now();
        let w = span.in_scope(|| self.exec_async(c))?;
        Ok(w.map(move |c| {
            span.record("duration_us", t0.elapsed().as_secs_f64() * 1e6);
            drop(span);
            Ok(c)
        }))
    }
}

/// The link model's hooks, a capability of its own (as rsmpi splits capabilities into traits) rather
/// than methods of the core [`Communicator`]: implemented for every communicator (boxed, borrowed or
/// shared too) through [`Communicator::link_clock`], so `comm.compute(d)` works wherever the prelude
/// is imported. Without a link model `compute` does nothing (the computation took real time) and
/// `virtual_time` is `None`.
pub trait LinkClock {
    /// Charge `d` of computation to this rank. Real backends do nothing; the in-process backend
    /// with a link model scales it by the rank's slowdown and advances its clock (or sleeps, in real
    /// mode).
    fn compute(&self, d: Duration) -> Result<()>;

    /// This rank's clock under a link model, if any (virtual time, or the model's real time since
    /// the world started).
    fn virtual_time(&self) -> Option<Duration>;
}

impl<C: Communicator + ?Sized> LinkClock for C {
    fn compute(&self, d: Duration) -> Result<()> {
        if let Some(c) = self.link_clock() {
            c.charge(d);
        }
        Ok(())
    }

    fn virtual_time(&self) -> Option<Duration> {
        self.link_clock().map(|c| c.now())
    }
}

/// Forward every method, the provided ones included, so that a wrapped communicator behaves
/// exactly as the one it wraps (its own `run`/`start` overrides, link-model hooks and byte counts,
/// and no second validation) — `Bucketer::new(&comm, ..)` and `dgc.step(&comm, ..)` then take
/// what [`crate::init`] returns (`Box<dyn Communicator>`), a reference or an `Arc` as written.
macro_rules! forward_communicator {
    ($($t:tt)*) => {
        impl<C: Communicator + ?Sized> Communicator for $($t)* {
            fn rank(&self) -> usize {
                (**self).rank()
            }
            fn world_size(&self) -> usize {
                (**self).world_size()
            }
            fn backend(&self) -> &'static str {
                (**self).backend()
            }
            fn config(&self) -> &Config {
                (**self).config()
            }
            fn exec(&self, c: CollectiveRef<'_>) -> Result<()> {
                (**self).exec(c)
            }
            fn exec_async(&self, c: CollectiveOwned) -> Result<Work<CollectiveOwned>> {
                (**self).exec_async(c)
            }
            fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
                (**self).split(color, key)
            }
            fn local_rank(&self) -> usize {
                (**self).local_rank()
            }
            fn device(&self) -> Option<usize> {
                (**self).device()
            }
            fn supports_device(&self) -> bool {
                (**self).supports_device()
            }
            fn exchange_signatures(&self, mine: &[i64], all: &mut [i64]) -> Result<()> {
                (**self).exchange_signatures(mine, all)
            }
            fn synchronize(&self) -> Result<()> {
                (**self).synchronize()
            }
            fn traffic(&self) -> Option<&crate::stats::Traffic> {
                (**self).traffic()
            }
            fn stats(&self) -> crate::stats::Stats {
                (**self).stats()
            }
            fn reset_stats(&self) {
                (**self).reset_stats()
            }
            fn bytes_sent(&self) -> u64 {
                (**self).bytes_sent()
            }
            fn link_clock(&self) -> Option<&crate::link::RankClock> {
                (**self).link_clock()
            }
            fn run(&self, c: CollectiveRef<'_>) -> Result<()> {
                (**self).run(c)
            }
            fn start(&self, c: CollectiveOwned) -> Result<Work<CollectiveOwned>> {
                (**self).start(c)
            }
        }
    };
}

forward_communicator!(&C);
forward_communicator!(Box<C>);
forward_communicator!(std::sync::Arc<C>);

fn check_signatures<C: Communicator + ?Sized>(comm: &C, c: &CollectiveRef<'_>) -> Result<()> {
    if matches!(c, Collective::Send { .. } | Collective::Recv { .. }) {
        return Ok(()); // point-to-point is not collective
    }
    let mine = c.signature();
    let mut all = vec![0u64; 5 * comm.world_size()];
    let mine_i: Vec<i64> = mine.iter().map(|&x| x as i64).collect();
    let mut all_i: Vec<i64> = vec![0; all.len()];
    comm.exchange_signatures(&mine_i, &mut all_i)?;
    for (a, b) in all.iter_mut().zip(&all_i) {
        *a = *b as u64;
    }
    for (r, theirs) in all.chunks(5).enumerate() {
        if theirs != mine {
            return Err(Error::CollectiveMismatch {
                rank: comm.rank(),
                mine: describe_signature(&mine),
                other_rank: r,
                theirs: describe_signature(theirs),
            });
        }
    }
    Ok(())
}

fn take<B: 'static>(b: Box<dyn OwnedBuffer>) -> Result<B> {
    b.into_any()
        .downcast::<B>()
        .map(|b| *b)
        .map_err(|_| Error::InvalidArgument("internal: buffer type changed in flight".into()))
}

fn unexpected() -> Error {
    Error::InvalidArgument("internal: backend returned a different operation".into())
}

/// Typed methods over any [`Communicator`]; implemented for every communicator, boxed or not.
pub trait CommunicatorExt: Communicator {
    /// In-place all-reduce.
    fn all_reduce<B: BufferMut + ?Sized>(&self, buf: &mut B, op: ReduceOp) -> Result<()> {
        self.run(Collective::AllReduce {
            send: None,
            recv: buf.buf_mut(),
            op,
        })
    }
    /// Out-of-place all-reduce.
    fn all_reduce_into<S: Buffer + ?Sized, R: BufferMut + ?Sized>(
        &self,
        send: &S,
        recv: &mut R,
        op: ReduceOp,
    ) -> Result<()> {
        self.run(Collective::AllReduce {
            send: Some(send.buf()),
            recv: recv.buf_mut(),
            op,
        })
    }
    /// Reduce-scatter: `send.len() == world * recv.len()`.
    fn reduce_scatter<S: Buffer + ?Sized, R: BufferMut + ?Sized>(
        &self,
        send: &S,
        recv: &mut R,
        op: ReduceOp,
    ) -> Result<()> {
        self.run(Collective::ReduceScatter {
            send: send.buf(),
            recv: recv.buf_mut(),
            op,
        })
    }
    /// All-gather: `recv.len() == world * send.len()`.
    fn all_gather<S: Buffer + ?Sized, R: BufferMut + ?Sized>(
        &self,
        send: &S,
        recv: &mut R,
    ) -> Result<()> {
        self.run(Collective::AllGather {
            send: send.buf(),
            recv: recv.buf_mut(),
        })
    }
    /// Broadcast from `root`.
    fn broadcast<B: BufferMut + ?Sized>(&self, buf: &mut B, root: usize) -> Result<()> {
        self.run(Collective::Broadcast {
            buf: buf.buf_mut(),
            root,
        })
    }
    /// Reduce onto `root`; `recv` must be `Some` on the root.
    fn reduce<S: Buffer + ?Sized, R: BufferMut + ?Sized>(
        &self,
        send: &S,
        recv: Option<&mut R>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.run(Collective::Reduce {
            send: send.buf(),
            recv: recv.map(|r| r.buf_mut()),
            op,
            root,
        })
    }
    /// All-to-all with equal blocks.
    fn all_to_all<S: Buffer + ?Sized, R: BufferMut + ?Sized>(
        &self,
        send: &S,
        recv: &mut R,
    ) -> Result<()> {
        self.run(Collective::AllToAll {
            send: send.buf(),
            recv: recv.buf_mut(),
        })
    }
    /// All-to-all with per-peer counts.
    fn all_to_allv<S: Buffer + ?Sized, R: BufferMut + ?Sized>(
        &self,
        send: &S,
        send_counts: &[usize],
        recv: &mut R,
        recv_counts: &[usize],
    ) -> Result<()> {
        self.run(Collective::AllToAllv {
            send: send.buf(),
            send_counts: send_counts.to_vec(),
            recv: recv.buf_mut(),
            recv_counts: recv_counts.to_vec(),
        })
    }
    /// Send to `peer` with `tag`.
    fn send<S: Buffer + ?Sized>(&self, buf: &S, peer: usize, tag: u32) -> Result<()> {
        self.run(Collective::Send {
            buf: buf.buf(),
            peer,
            tag,
        })
    }
    /// Receive from `peer` with `tag`; the buffer's length must equal the message's.
    fn recv<R: BufferMut + ?Sized>(&self, buf: &mut R, peer: usize, tag: u32) -> Result<()> {
        self.run(Collective::Recv {
            buf: buf.buf_mut(),
            peer,
            tag,
        })
    }
    /// Barrier.
    fn barrier(&self) -> Result<()> {
        self.run(Collective::Barrier)
    }

    /// Non-blocking in-place all-reduce; the buffer comes back from [`Work::wait`].
    fn iall_reduce<B: OwnedBuffer>(&self, buf: B, op: ReduceOp) -> Result<Work<B>> {
        let c = Collective::AllReduce {
            send: None,
            recv: Box::new(buf) as Box<dyn OwnedBuffer>,
            op,
        };
        start_typed(self, c, |_, r| need(r))
    }
    /// Non-blocking out-of-place all-reduce.
    fn iall_reduce_into<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
        op: ReduceOp,
    ) -> Result<Work<(S, R)>> {
        let c = Collective::AllReduce {
            send: Some(Box::new(send) as Box<dyn OwnedBuffer>),
            recv: Box::new(recv) as Box<dyn OwnedBuffer>,
            op,
        };
        start_typed(self, c, both)
    }
    /// Non-blocking reduce-scatter.
    fn ireduce_scatter<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
        op: ReduceOp,
    ) -> Result<Work<(S, R)>> {
        let c = Collective::ReduceScatter {
            send: Box::new(send) as Box<dyn OwnedBuffer>,
            recv: Box::new(recv) as Box<dyn OwnedBuffer>,
            op,
        };
        start_typed(self, c, both)
    }
    /// Non-blocking all-gather.
    fn iall_gather<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
    ) -> Result<Work<(S, R)>> {
        let c = Collective::AllGather {
            send: Box::new(send) as Box<dyn OwnedBuffer>,
            recv: Box::new(recv) as Box<dyn OwnedBuffer>,
        };
        start_typed(self, c, both)
    }
    /// Non-blocking broadcast.
    fn ibroadcast<B: OwnedBuffer>(&self, buf: B, root: usize) -> Result<Work<B>> {
        let c = Collective::Broadcast {
            buf: Box::new(buf) as Box<dyn OwnedBuffer>,
            root,
        };
        start_typed(self, c, |_, r| need(r))
    }
    /// Non-blocking reduce; `recv` must be `Some` on the root.
    fn ireduce<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: Option<R>,
        op: ReduceOp,
        root: usize,
    ) -> Result<Work<(S, Option<R>)>> {
        let c = Collective::Reduce {
            send: Box::new(send) as Box<dyn OwnedBuffer>,
            recv: recv.map(|r| Box::new(r) as Box<dyn OwnedBuffer>),
            op,
            root,
        };
        start_typed(self, c, |s, r| Ok((need(s)?, r.map(take).transpose()?)))
    }
    /// Non-blocking all-to-all.
    fn iall_to_all<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
    ) -> Result<Work<(S, R)>> {
        let c = Collective::AllToAll {
            send: Box::new(send) as Box<dyn OwnedBuffer>,
            recv: Box::new(recv) as Box<dyn OwnedBuffer>,
        };
        start_typed(self, c, both)
    }
    /// Non-blocking all-to-allv.
    fn iall_to_allv<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        send_counts: Vec<usize>,
        recv: R,
        recv_counts: Vec<usize>,
    ) -> Result<Work<(S, R)>> {
        let c = Collective::AllToAllv {
            send: Box::new(send) as Box<dyn OwnedBuffer>,
            send_counts,
            recv: Box::new(recv) as Box<dyn OwnedBuffer>,
            recv_counts,
        };
        start_typed(self, c, both)
    }
    /// Non-blocking send.
    fn isend<S: OwnedBuffer>(&self, buf: S, peer: usize, tag: u32) -> Result<Work<S>> {
        let c = Collective::Send {
            buf: Box::new(buf) as Box<dyn OwnedBuffer>,
            peer,
            tag,
        };
        start_typed(self, c, |s, _| need(s))
    }
    /// Non-blocking receive.
    fn irecv<R: OwnedBuffer>(&self, buf: R, peer: usize, tag: u32) -> Result<Work<R>> {
        let c = Collective::Recv {
            buf: Box::new(buf) as Box<dyn OwnedBuffer>,
            peer,
            tag,
        };
        start_typed(self, c, |_, r| need(r))
    }
    /// Non-blocking barrier.
    fn ibarrier(&self) -> Result<Work<()>> {
        start_typed(self, Collective::Barrier, |_, _| Ok(()))
    }
}

type Part = Option<Box<dyn OwnedBuffer>>;

/// The pattern of every `i*` method, said once: start `c`, and on completion check that the
/// backend handed back the same kind of operation, split it into its source and destination
/// buffers ([`Collective::into_buffers`]) and give them back typed (`back`).
fn start_typed<C: Communicator + ?Sized, T: Send + 'static>(
    comm: &C,
    c: CollectiveOwned,
    back: impl FnOnce(Part, Part) -> Result<T> + Send + 'static,
) -> Result<Work<T>> {
    let name = c.name();
    let w = comm.start(c)?;
    Ok(w.map(move |done| {
        if done.name() != name {
            return Err(unexpected());
        }
        let (s, r) = done.into_buffers();
        back(s, r)
    }))
}

/// A buffer the operation must hand back, as its type.
fn need<B: 'static>(b: Part) -> Result<B> {
    take(b.ok_or_else(unexpected)?)
}

/// Both buffers of a two-buffer operation.
fn both<S: 'static, R: 'static>(s: Part, r: Part) -> Result<(S, R)> {
    Ok((need(s)?, need(r)?))
}

impl<C: Communicator + ?Sized> CommunicatorExt for C {}

/// This rank's place in the group it joins by `split`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    /// The color (group) joined.
    pub color: u32,
    /// Rank in the new group (ordered by `(key, old rank)`).
    pub new_rank: usize,
    /// Size of the new group.
    pub size: usize,
}

/// The collective part of `split` for backends that build groups themselves: all-gather every rank's
/// `(color, key)` and work out this rank's new rank and group size (`None` when it opted out).
pub fn plan_split<C: Communicator + ?Sized>(
    comm: &C,
    color: Option<u32>,
    key: i32,
) -> Result<Option<SplitPlan>> {
    let n = comm.world_size();
    let mine = [color.map(i64::from).unwrap_or(-1), key as i64];
    let mut all = vec![0i64; 2 * n];
    comm.all_gather(&mine, &mut all)?;
    let Some(color) = color else { return Ok(None) };
    let mut members: Vec<(i64, usize)> = (0..n)
        .filter(|&r| all[2 * r] == color as i64)
        .map(|r| (all[2 * r + 1], r))
        .collect();
    members.sort();
    let new_rank = members
        .iter()
        .position(|&(_, r)| r == comm.rank())
        .ok_or_else(|| Error::InvalidArgument("internal: not a member of own color".into()))?;
    Ok(Some(SplitPlan {
        color,
        new_rank,
        size: members.len(),
    }))
}

/// Convenience for callers that need an empty receive buffer of a dtype.
pub fn empty(dtype: DType) -> Empty {
    Empty(dtype)
}
