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

use crate::buffer::{Buf, BufMut, Buffer, BufferMut, Empty, OwnedBuffer};
use crate::work::Work;
use crate::{Config, DType, Error, ReduceOp, Result};
use std::time::{Duration, Instant};

/// One collective operation. `S` is a source buffer, `R` a destination; borrowed views for blocking
/// calls ([`CollectiveRef`]), owned boxes for non-blocking ones ([`CollectiveOwned`]).
#[derive(Debug)]
pub enum Collective<S, R> {
    /// `recv = op over ranks of send` (`send: None` = in place on `recv`).
    AllReduce {
        /// Input (None: in place).
        send: Option<S>,
        /// Output (and input when in place).
        recv: R,
        /// Reduction.
        op: ReduceOp,
    },
    /// Reduce, then rank r keeps block r: `send.len == world * recv.len`.
    ReduceScatter {
        /// Input, world × count.
        send: S,
        /// Output, count.
        recv: R,
        /// Reduction.
        op: ReduceOp,
    },
    /// Concatenate every rank's `send` in rank order: `recv.len == world * send.len`.
    AllGather {
        /// Input, count.
        send: S,
        /// Output, world × count.
        recv: R,
    },
    /// Copy `root`'s buffer to every rank.
    Broadcast {
        /// Input on root, output elsewhere.
        buf: R,
        /// The source rank.
        root: usize,
    },
    /// Reduce onto `root` only (`recv` is required on root and ignored elsewhere).
    Reduce {
        /// Input.
        send: S,
        /// Output on root.
        recv: Option<R>,
        /// Reduction.
        op: ReduceOp,
        /// The destination rank.
        root: usize,
    },
    /// Block j of `send` goes to rank j; block i of `recv` comes from rank i (equal blocks).
    AllToAll {
        /// Input, world × block.
        send: S,
        /// Output, world × block.
        recv: R,
    },
    /// All-to-all with per-peer element counts (blocks packed back to back, in rank order).
    AllToAllv {
        /// Input.
        send: S,
        /// Elements for each destination rank.
        send_counts: Vec<usize>,
        /// Output.
        recv: R,
        /// Elements from each source rank.
        recv_counts: Vec<usize>,
    },
    /// Point-to-point send.
    Send {
        /// Input.
        buf: S,
        /// Destination rank.
        peer: usize,
        /// Message tag (matches the receive's tag).
        tag: u32,
    },
    /// Point-to-point receive (the length must match the message).
    Recv {
        /// Output.
        buf: R,
        /// Source rank.
        peer: usize,
        /// Message tag.
        tag: u32,
    },
    /// Wait until every rank arrived.
    Barrier,
}

/// A collective over borrowed views (blocking calls).
pub type CollectiveRef<'a> = Collective<Buf<'a>, BufMut<'a>>;
/// A collective over owned buffers (non-blocking calls).
pub type CollectiveOwned = Collective<Box<dyn OwnedBuffer>, Box<dyn OwnedBuffer>>;

impl<S, R> Collective<S, R> {
    /// The operation's name, as nccl-tests and traces spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Collective::AllReduce { .. } => "all_reduce",
            Collective::ReduceScatter { .. } => "reduce_scatter",
            Collective::AllGather { .. } => "all_gather",
            Collective::Broadcast { .. } => "broadcast",
            Collective::Reduce { .. } => "reduce",
            Collective::AllToAll { .. } => "all_to_all",
            Collective::AllToAllv { .. } => "all_to_allv",
            Collective::Send { .. } => "send",
            Collective::Recv { .. } => "recv",
            Collective::Barrier => "barrier",
        }
    }

    fn kind_code(&self) -> u64 {
        match self {
            Collective::AllReduce { .. } => 1,
            Collective::ReduceScatter { .. } => 2,
            Collective::AllGather { .. } => 3,
            Collective::Broadcast { .. } => 4,
            Collective::Reduce { .. } => 5,
            Collective::AllToAll { .. } => 6,
            Collective::AllToAllv { .. } => 7,
            Collective::Send { .. } => 8,
            Collective::Recv { .. } => 9,
            Collective::Barrier => 10,
        }
    }
}

impl<S, R> Collective<S, R> {
    /// Replace every buffer: sources through `fs`, destinations through `fr` (the rest is kept).
    pub fn map<S2, R2>(
        self,
        mut fs: impl FnMut(S) -> Result<S2>,
        mut fr: impl FnMut(R) -> Result<R2>,
    ) -> Result<Collective<S2, R2>> {
        use Collective as C;
        Ok(match self {
            C::AllReduce { send, recv, op } => C::AllReduce {
                send: send.map(&mut fs).transpose()?,
                recv: fr(recv)?,
                op,
            },
            C::ReduceScatter { send, recv, op } => C::ReduceScatter {
                send: fs(send)?,
                recv: fr(recv)?,
                op,
            },
            C::AllGather { send, recv } => C::AllGather {
                send: fs(send)?,
                recv: fr(recv)?,
            },
            C::Broadcast { buf, root } => C::Broadcast {
                buf: fr(buf)?,
                root,
            },
            C::Reduce {
                send,
                recv,
                op,
                root,
            } => C::Reduce {
                send: fs(send)?,
                recv: recv.map(&mut fr).transpose()?,
                op,
                root,
            },
            C::AllToAll { send, recv } => C::AllToAll {
                send: fs(send)?,
                recv: fr(recv)?,
            },
            C::AllToAllv {
                send,
                send_counts,
                recv,
                recv_counts,
            } => C::AllToAllv {
                send: fs(send)?,
                send_counts,
                recv: fr(recv)?,
                recv_counts,
            },
            C::Send { buf, peer, tag } => C::Send {
                buf: fs(buf)?,
                peer,
                tag,
            },
            C::Recv { buf, peer, tag } => C::Recv {
                buf: fr(buf)?,
                peer,
                tag,
            },
            C::Barrier => C::Barrier,
        })
    }
}

impl<S: Buffer + ?Sized, R: BufferMut + ?Sized> Collective<Box<S>, Box<R>> {
    /// Borrow the boxed buffers as views.
    pub fn views(&mut self) -> CollectiveRef<'_> {
        use Collective as C;
        match self {
            C::AllReduce { send, recv, op } => C::AllReduce {
                send: send.as_ref().map(|s| s.buf()),
                recv: recv.buf_mut(),
                op: *op,
            },
            C::ReduceScatter { send, recv, op } => C::ReduceScatter {
                send: send.buf(),
                recv: recv.buf_mut(),
                op: *op,
            },
            C::AllGather { send, recv } => C::AllGather {
                send: send.buf(),
                recv: recv.buf_mut(),
            },
            C::Broadcast { buf, root } => C::Broadcast {
                buf: buf.buf_mut(),
                root: *root,
            },
            C::Reduce {
                send,
                recv,
                op,
                root,
            } => C::Reduce {
                send: send.buf(),
                recv: recv.as_mut().map(|r| r.buf_mut()),
                op: *op,
                root: *root,
            },
            C::AllToAll { send, recv } => C::AllToAll {
                send: send.buf(),
                recv: recv.buf_mut(),
            },
            C::AllToAllv {
                send,
                send_counts,
                recv,
                recv_counts,
            } => C::AllToAllv {
                send: send.buf(),
                send_counts: send_counts.clone(),
                recv: recv.buf_mut(),
                recv_counts: recv_counts.clone(),
            },
            C::Send { buf, peer, tag } => C::Send {
                buf: buf.buf(),
                peer: *peer,
                tag: *tag,
            },
            C::Recv { buf, peer, tag } => C::Recv {
                buf: buf.buf_mut(),
                peer: *peer,
                tag: *tag,
            },
            C::Barrier => C::Barrier,
        }
    }
}

impl CollectiveRef<'_> {
    /// Bytes this rank contributes (the size nccl-tests reports for the operation).
    pub fn bytes(&self) -> usize {
        use Collective as C;
        match self {
            C::AllReduce { recv, .. } => recv.byte_len(),
            C::ReduceScatter { send, .. } | C::AllGather { send, .. } => send.byte_len(),
            C::Broadcast { buf, .. } => buf.byte_len(),
            C::Reduce { send, .. } | C::AllToAll { send, .. } | C::AllToAllv { send, .. } => {
                send.byte_len()
            }
            C::Send { buf, .. } => buf.byte_len(),
            C::Recv { buf, .. } => buf.byte_len(),
            C::Barrier => 0,
        }
    }

    /// Element type of the operation (U8 for a barrier).
    pub fn dtype(&self) -> DType {
        use Collective as C;
        match self {
            C::AllReduce { recv, .. } => recv.dtype,
            C::ReduceScatter { send, .. }
            | C::AllGather { send, .. }
            | C::Reduce { send, .. }
            | C::AllToAll { send, .. }
            | C::AllToAllv { send, .. }
            | C::Send { buf: send, .. } => send.dtype,
            C::Broadcast { buf, .. } | C::Recv { buf, .. } => buf.dtype,
            C::Barrier => DType::U8,
        }
    }

    /// Check lengths, dtypes and ranks; every backend may then assume a well-formed call.
    pub fn validate(&self, rank: usize, world: usize) -> Result<()> {
        use Collective as C;
        let same = |what: &'static str, a: DType, b: DType| {
            if a == b {
                Ok(())
            } else {
                Err(Error::DtypeMismatch {
                    what,
                    expected: a,
                    got: b,
                })
            }
        };
        // the message is built only on failure: validation runs before every call, and a String
        // per call costs a measurable share of a tiny MPI all-reduce
        fn len(what: impl FnOnce() -> String, expected: usize, got: usize) -> Result<()> {
            if expected == got {
                Ok(())
            } else {
                Err(Error::LengthMismatch {
                    what: what(),
                    expected,
                    got,
                })
            }
        }
        let in_range = |what: &'static str, r: usize| {
            if r < world {
                Ok(())
            } else {
                Err(Error::RankOutOfRange {
                    what,
                    rank: r,
                    world,
                })
            }
        };
        self.check_views()?;
        // `a × b` elements, or a named error where it would overflow (made-up lengths)
        let times = |what: &'static str, a: usize, b: usize| {
            a.checked_mul(b).ok_or_else(|| {
                Error::InvalidArgument(format!("{what}: {a} x {b} elements overflow usize"))
            })
        };
        let total = |what: &'static str, counts: &[usize]| {
            counts
                .iter()
                .try_fold(0usize, |acc, &c| acc.checked_add(c))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("{what}: the counts' sum overflows usize"))
                })
        };
        match self {
            C::AllReduce { send, recv, .. } => {
                if let Some(s) = send {
                    same("all_reduce recv", s.dtype, recv.dtype)?;
                    len(
                        || "all_reduce: recv must have as many elements as send".into(),
                        s.len,
                        recv.len,
                    )?;
                }
            }
            C::ReduceScatter { send, recv, .. } => {
                same("reduce_scatter recv", send.dtype, recv.dtype)?;
                len(
                    || {
                        format!(
                            "reduce_scatter: send must hold world_size ({world}) x recv ({})",
                            recv.len
                        )
                    },
                    times("reduce_scatter", recv.len, world)?,
                    send.len,
                )?;
            }
            C::AllGather { send, recv } => {
                same("all_gather recv", send.dtype, recv.dtype)?;
                len(
                    || {
                        format!(
                            "all_gather: recv must hold world_size ({world}) x send ({})",
                            send.len
                        )
                    },
                    times("all_gather", send.len, world)?,
                    recv.len,
                )?;
            }
            C::Broadcast { root, .. } => in_range("broadcast root", *root)?,
            C::Reduce {
                send, recv, root, ..
            } => {
                in_range("reduce root", *root)?;
                if rank == *root {
                    let r = recv.as_ref().ok_or_else(|| {
                        Error::InvalidArgument(
                            "reduce: the root rank must pass a receive buffer".into(),
                        )
                    })?;
                    same("reduce recv", send.dtype, r.dtype)?;
                    len(
                        || "reduce: recv must have as many elements as send".into(),
                        send.len,
                        r.len,
                    )?;
                }
            }
            C::AllToAll { send, recv } => {
                same("all_to_all recv", send.dtype, recv.dtype)?;
                len(
                    || "all_to_all: recv must have as many elements as send".into(),
                    send.len,
                    recv.len,
                )?;
                if send.len % world != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "all_to_all: {} elements do not split into {world} equal blocks; use all_to_allv",
                        send.len
                    )));
                }
            }
            C::AllToAllv {
                send,
                send_counts,
                recv,
                recv_counts,
            } => {
                same("all_to_allv recv", send.dtype, recv.dtype)?;
                len(
                    || "all_to_allv: send_counts needs one entry per rank".into(),
                    world,
                    send_counts.len(),
                )?;
                len(
                    || "all_to_allv: recv_counts needs one entry per rank".into(),
                    world,
                    recv_counts.len(),
                )?;
                len(
                    || "all_to_allv: send must hold sum(send_counts)".into(),
                    total("all_to_allv send_counts", send_counts)?,
                    send.len,
                )?;
                len(
                    || "all_to_allv: recv must hold sum(recv_counts)".into(),
                    total("all_to_allv recv_counts", recv_counts)?,
                    recv.len,
                )?;
            }
            C::Send { peer, .. } => in_range("send peer", *peer)?,
            C::Recv { peer, .. } => in_range("recv peer", *peer)?,
            C::Barrier => {}
        }
        Ok(())
    }

    /// Every view's element count must describe exactly the memory behind it: backends index and
    /// hand pointers to MPI/NCCL by `len`, so a view built by hand with a larger `len` than its
    /// slice (or a byte length that is not a multiple of the element size) is refused here.
    fn check_views(&self) -> Result<()> {
        use Collective as C;
        let op = self.name();
        let one = |role: &'static str, dtype: DType, len: usize, mem: usize| {
            let want = len.checked_mul(dtype.size());
            if want == Some(mem) {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "{op}: the {role} view claims {len} {} elements but has {mem} bytes of \
                     memory (a whole number of elements is needed; build views with \
                     Buf::host/BufMut::host or pass slices)",
                    dtype.name()
                )))
            }
        };
        let src = |role, b: &Buf<'_>| one(role, b.dtype, b.len, b.mem_bytes());
        let dst = |role, b: &BufMut<'_>| one(role, b.dtype, b.len, b.mem_bytes());
        match self {
            C::AllReduce { send, recv, .. } => {
                if let Some(s) = send {
                    src("send", s)?;
                }
                dst("recv", recv)
            }
            C::ReduceScatter { send, recv, .. }
            | C::AllGather { send, recv }
            | C::AllToAll { send, recv }
            | C::AllToAllv { send, recv, .. } => {
                src("send", send)?;
                dst("recv", recv)
            }
            C::Reduce { send, recv, .. } => {
                src("send", send)?;
                match recv {
                    Some(r) => dst("recv", r),
                    None => Ok(()),
                }
            }
            C::Broadcast { buf, .. } | C::Recv { buf, .. } => dst("buffer", buf),
            C::Send { buf, .. } => src("buffer", buf),
            C::Barrier => Ok(()),
        }
    }

    /// The signature compared in checked mode: (operation, dtype, count, root, reduction).
    pub fn signature(&self) -> [u64; 5] {
        use Collective as C;
        let none = u64::MAX;
        let (count, root, op) = match self {
            C::AllReduce { recv, op, .. } => (recv.len as u64, none, op.code() as u64),
            C::ReduceScatter { recv, op, .. } => (recv.len as u64, none, op.code() as u64),
            C::AllGather { send, .. } => (send.len as u64, none, none),
            C::Broadcast { buf, root } => (buf.len as u64, *root as u64, none),
            C::Reduce { send, op, root, .. } => (send.len as u64, *root as u64, op.code() as u64),
            C::AllToAll { send, .. } => (send.len as u64, none, none),
            C::AllToAllv { .. } | C::Barrier | C::Send { .. } | C::Recv { .. } => {
                (none, none, none)
            }
        };
        [
            self.kind_code(),
            self.dtype().code() as u64,
            count,
            root,
            op,
        ]
    }
}

/// Human-readable form of a checked-mode signature, for error messages.
pub fn describe_signature(s: &[u64]) -> String {
    let names = [
        "?",
        "all_reduce",
        "reduce_scatter",
        "all_gather",
        "broadcast",
        "reduce",
        "all_to_all",
        "all_to_allv",
        "send",
        "recv",
        "barrier",
    ];
    let name = names.get(s[0] as usize).copied().unwrap_or("?");
    let dtype = DType::from_code(s[1] as u8)
        .map(|d| d.name())
        .unwrap_or("?");
    let mut out = format!("{name}({dtype}");
    if s[2] != u64::MAX {
        out += &format!(" x {}", s[2]);
    }
    if s[3] != u64::MAX {
        out += &format!(", root {}", s[3]);
    }
    if let Some(op) = ReduceOp::ALL.iter().find(|o| o.code() as u64 == s[4]) {
        out += &format!(", {}", op.name());
    }
    out + ")"
}

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

    /// Charge `d` of computation to this rank. Real backends do nothing (the computation took real time);
    /// the in-process backend with a link model scales it by the rank's slowdown and advances its clock.
    fn compute(&self, d: Duration) -> Result<()> {
        let _ = d;
        Ok(())
    }

    /// This rank's virtual clock under a virtual-time link model, if any.
    fn virtual_time(&self) -> Option<Duration> {
        None
    }

    /// Run a blocking collective: validation, checked mode, tracing, then the backend.
    fn run(&self, c: CollectiveRef<'_>) -> Result<()> {
        c.validate(self.rank(), self.world_size())?;
        #[cfg(feature = "cuda")]
        if !self.supports_device() && crate::device::stage::has_device(&c) {
            return crate::device::stage::run_staged(self, c);
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
                return crate::device::stage::start_staged(self, c);
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
            fn compute(&self, d: Duration) -> Result<()> {
                (**self).compute(d)
            }
            fn virtual_time(&self) -> Option<Duration> {
                (**self).virtual_time()
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
        let w = self.start(Collective::AllReduce {
            send: None,
            recv: Box::new(buf),
            op,
        })?;
        Ok(w.map(|c| match c {
            Collective::AllReduce { recv, .. } => take(recv),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking out-of-place all-reduce.
    fn iall_reduce_into<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
        op: ReduceOp,
    ) -> Result<Work<(S, R)>> {
        let w = self.start(Collective::AllReduce {
            send: Some(Box::new(send)),
            recv: Box::new(recv),
            op,
        })?;
        Ok(w.map(|c| match c {
            Collective::AllReduce {
                send: Some(s),
                recv,
                ..
            } => Ok((take(s)?, take(recv)?)),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking reduce-scatter.
    fn ireduce_scatter<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
        op: ReduceOp,
    ) -> Result<Work<(S, R)>> {
        let w = self.start(Collective::ReduceScatter {
            send: Box::new(send),
            recv: Box::new(recv),
            op,
        })?;
        Ok(w.map(|c| match c {
            Collective::ReduceScatter { send, recv, .. } => Ok((take(send)?, take(recv)?)),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking all-gather.
    fn iall_gather<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
    ) -> Result<Work<(S, R)>> {
        let w = self.start(Collective::AllGather {
            send: Box::new(send),
            recv: Box::new(recv),
        })?;
        Ok(w.map(|c| match c {
            Collective::AllGather { send, recv } => Ok((take(send)?, take(recv)?)),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking broadcast.
    fn ibroadcast<B: OwnedBuffer>(&self, buf: B, root: usize) -> Result<Work<B>> {
        let w = self.start(Collective::Broadcast {
            buf: Box::new(buf),
            root,
        })?;
        Ok(w.map(|c| match c {
            Collective::Broadcast { buf, .. } => take(buf),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking reduce; `recv` must be `Some` on the root.
    fn ireduce<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: Option<R>,
        op: ReduceOp,
        root: usize,
    ) -> Result<Work<(S, Option<R>)>> {
        let w = self.start(Collective::Reduce {
            send: Box::new(send),
            recv: recv.map(|r| Box::new(r) as Box<dyn OwnedBuffer>),
            op,
            root,
        })?;
        Ok(w.map(|c| match c {
            Collective::Reduce { send, recv, .. } => Ok((take(send)?, recv.map(take).transpose()?)),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking all-to-all.
    fn iall_to_all<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        recv: R,
    ) -> Result<Work<(S, R)>> {
        let w = self.start(Collective::AllToAll {
            send: Box::new(send),
            recv: Box::new(recv),
        })?;
        Ok(w.map(|c| match c {
            Collective::AllToAll { send, recv } => Ok((take(send)?, take(recv)?)),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking all-to-allv.
    fn iall_to_allv<S: OwnedBuffer, R: OwnedBuffer>(
        &self,
        send: S,
        send_counts: Vec<usize>,
        recv: R,
        recv_counts: Vec<usize>,
    ) -> Result<Work<(S, R)>> {
        let w = self.start(Collective::AllToAllv {
            send: Box::new(send),
            send_counts,
            recv: Box::new(recv),
            recv_counts,
        })?;
        Ok(w.map(|c| match c {
            Collective::AllToAllv { send, recv, .. } => Ok((take(send)?, take(recv)?)),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking send.
    fn isend<S: OwnedBuffer>(&self, buf: S, peer: usize, tag: u32) -> Result<Work<S>> {
        let w = self.start(Collective::Send {
            buf: Box::new(buf),
            peer,
            tag,
        })?;
        Ok(w.map(|c| match c {
            Collective::Send { buf, .. } => take(buf),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking receive.
    fn irecv<R: OwnedBuffer>(&self, buf: R, peer: usize, tag: u32) -> Result<Work<R>> {
        let w = self.start(Collective::Recv {
            buf: Box::new(buf),
            peer,
            tag,
        })?;
        Ok(w.map(|c| match c {
            Collective::Recv { buf, .. } => take(buf),
            _ => Err(unexpected()),
        }))
    }
    /// Non-blocking barrier.
    fn ibarrier(&self) -> Result<Work<()>> {
        let w = self.start(Collective::Barrier)?;
        Ok(w.map(|_| Ok(())))
    }
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
