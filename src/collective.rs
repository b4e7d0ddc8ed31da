//! [`Collective`]: one operation as data (which collective, its buffers and arguments), with its
//! validation and its checked-mode signature.
//!
//! Its own module below [`crate::comm`] so that what consumes a collective without being a
//! communicator — device staging (`device::stage`), the engine — depends on this data type only, and
//! the [`Communicator`](crate::Communicator) trait can call them without an import cycle.
//! `crate::comm::{Collective, CollectiveRef, CollectiveOwned}` re-export it.

use crate::buffer::{Buf, BufMut, Buffer, BufferMut, OwnedBuffer};
use crate::{DType, Error, ReduceOp, Result};

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
    /// The operation's buffers, as (source, destination): what the non-blocking calls hand back.
    /// In-place operations (`AllReduce` without `send`, `Broadcast`, `Recv`) have only a
    /// destination, `Send` only a source, `Reduce` a destination only where one was given, and
    /// `Barrier` neither.
    pub fn into_buffers(self) -> (Option<S>, Option<R>) {
        match self {
            Collective::AllReduce { send, recv, .. } => (send, Some(recv)),
            Collective::ReduceScatter { send, recv, .. }
            | Collective::AllGather { send, recv }
            | Collective::AllToAll { send, recv }
            | Collective::AllToAllv { send, recv, .. } => (Some(send), Some(recv)),
            Collective::Broadcast { buf, .. } | Collective::Recv { buf, .. } => (None, Some(buf)),
            Collective::Reduce { send, recv, .. } => (Some(send), recv),
            Collective::Send { buf, .. } => (Some(buf), None),
            Collective::Barrier => (None, None),
        }
    }

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
