//! Traffic accounting: what a communicator moved, per operation kind.
//!
//! Every communicator keeps one [`Traffic`] — three relaxed atomic counters per operation kind (calls,
//! payload bytes sent, payload bytes received) — and [`crate::Communicator::stats`] reads a [`Stats`]
//! snapshot of it; [`crate::Communicator::reset_stats`] zeroes it. Counting is a relaxed
//! `fetch_add` per message, cheap enough to leave on (the engine already took a lock or a channel
//! send for that message).
//!
//! What counts as a byte depends on where the backend can see it:
//! - **local and tcp** (the shared engine): the payload of every message this rank posts to another
//!   rank (sent) and of every message it takes from another rank (received), charged to the operation
//!   that moved it. Message headers, the TCP framing and messages to itself are not counted. In-process
//!   loans count their length like copies (the bytes a network transport would move); the two-shot
//!   all-reduce's direct writes into the peers' outputs count as the chunks a network all-gather phase
//!   would send and receive.
//! - **mpi and nccl**: the library chooses its own algorithms, so the counters hold what the
//!   bandwidth-optimal algorithm behind nccl-tests' bus bandwidth moves for each completed operation
//!   (see `src/mpi/mod.rs` and `src/nccl/mod.rs` for the per-operation formulas); point-to-point
//!   counts the message.
//!
//! Calls are counted once per user-level operation in [`crate::Communicator::run`] /
//! [`crate::Communicator::start`] (a device buffer staged through host memory counts once). Internal
//! traffic without a user call (checked mode's signature exchange, `split`'s all-gather through the
//! parent) shows up in the byte counters of the operation it uses. A sub-communicator from `split` has
//! its own counters.

use crate::Collective;
use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of operation a communicator counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// `all_reduce` (in place or not).
    AllReduce,
    /// `reduce_scatter`.
    ReduceScatter,
    /// `all_gather`.
    AllGather,
    /// `broadcast`.
    Broadcast,
    /// `reduce`.
    Reduce,
    /// `all_to_all`.
    AllToAll,
    /// `all_to_allv`.
    AllToAllv,
    /// Point-to-point `send`.
    Send,
    /// Point-to-point `recv`.
    Recv,
    /// `barrier`.
    Barrier,
}

impl OpKind {
    /// Number of kinds.
    pub const COUNT: usize = 10;
    /// Every kind, in index order.
    pub const ALL: [OpKind; OpKind::COUNT] = [
        OpKind::AllReduce,
        OpKind::ReduceScatter,
        OpKind::AllGather,
        OpKind::Broadcast,
        OpKind::Reduce,
        OpKind::AllToAll,
        OpKind::AllToAllv,
        OpKind::Send,
        OpKind::Recv,
        OpKind::Barrier,
    ];

    /// Position in [`OpKind::ALL`] (and in [`Stats::ops`]).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The operation's name, as [`Collective::name`] spells it.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllGather => "all_gather",
            OpKind::Broadcast => "broadcast",
            OpKind::Reduce => "reduce",
            OpKind::AllToAll => "all_to_all",
            OpKind::AllToAllv => "all_to_allv",
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::Barrier => "barrier",
        }
    }
}

impl<S, R> Collective<S, R> {
    /// The kind of operation, for the traffic counters.
    pub fn kind(&self) -> OpKind {
        match self {
            Collective::AllReduce { .. } => OpKind::AllReduce,
            Collective::ReduceScatter { .. } => OpKind::ReduceScatter,
            Collective::AllGather { .. } => OpKind::AllGather,
            Collective::Broadcast { .. } => OpKind::Broadcast,
            Collective::Reduce { .. } => OpKind::Reduce,
            Collective::AllToAll { .. } => OpKind::AllToAll,
            Collective::AllToAllv { .. } => OpKind::AllToAllv,
            Collective::Send { .. } => OpKind::Send,
            Collective::Recv { .. } => OpKind::Recv,
            Collective::Barrier => OpKind::Barrier,
        }
    }
}

/// Live counters of one communicator (relaxed atomics; see the module docs for what they count).
#[derive(Debug, Default)]
pub struct Traffic {
    calls: [AtomicU64; OpKind::COUNT],
    sent: [AtomicU64; OpKind::COUNT],
    received: [AtomicU64; OpKind::COUNT],
}

impl Traffic {
    /// Fresh, all zero.
    pub fn new() -> Traffic {
        Traffic::default()
    }
    /// Count one call of `kind`.
    pub fn call(&self, kind: OpKind) {
        self.calls[kind.index()].fetch_add(1, Ordering::Relaxed);
    }
    /// Count `bytes` sent for `kind`.
    pub fn sent(&self, kind: OpKind, bytes: u64) {
        self.sent[kind.index()].fetch_add(bytes, Ordering::Relaxed);
    }
    /// Count `bytes` received for `kind`.
    pub fn received(&self, kind: OpKind, bytes: u64) {
        self.received[kind.index()].fetch_add(bytes, Ordering::Relaxed);
    }
    /// A snapshot of every counter.
    pub fn snapshot(&self) -> Stats {
        let mut s = Stats::default();
        for k in OpKind::ALL {
            let i = k.index();
            s.ops[i] = OpStats {
                calls: self.calls[i].load(Ordering::Relaxed),
                bytes_sent: self.sent[i].load(Ordering::Relaxed),
                bytes_received: self.received[i].load(Ordering::Relaxed),
            };
        }
        s
    }
    /// Zero every counter (operations in flight meanwhile may be counted on either side).
    pub fn reset(&self) {
        for a in self.calls.iter().chain(&self.sent).chain(&self.received) {
            a.store(0, Ordering::Relaxed);
        }
    }
}

/// Counters of one operation kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpStats {
    /// Operations started.
    pub calls: u64,
    /// Payload bytes sent to other ranks.
    pub bytes_sent: u64,
    /// Payload bytes received from other ranks.
    pub bytes_received: u64,
}

/// A snapshot of a communicator's traffic counters ([`crate::Communicator::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Counters per kind, indexed by [`OpKind::index`].
    pub ops: [OpStats; OpKind::COUNT],
}

impl Stats {
    /// The counters of one kind.
    pub fn op(&self, kind: OpKind) -> OpStats {
        self.ops[kind.index()]
    }
    /// Bytes sent, all kinds.
    pub fn bytes_sent(&self) -> u64 {
        self.ops.iter().map(|o| o.bytes_sent).sum()
    }
    /// Bytes received, all kinds.
    pub fn bytes_received(&self) -> u64 {
        self.ops.iter().map(|o| o.bytes_received).sum()
    }
    /// Calls, all kinds.
    pub fn calls(&self) -> u64 {
        self.ops.iter().map(|o| o.calls).sum()
    }
    /// What happened between `earlier` and this snapshot (saturating: a reset in between gives 0s).
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut d = *self;
        for (o, e) in d.ops.iter_mut().zip(&earlier.ops) {
            o.calls = o.calls.saturating_sub(e.calls);
            o.bytes_sent = o.bytes_sent.saturating_sub(e.bytes_sent);
            o.bytes_received = o.bytes_received.saturating_sub(e.bytes_received);
        }
        d
    }
    /// Element-wise sum (e.g. a communicator and its sub-communicators from `split`).
    pub fn plus(&self, other: &Stats) -> Stats {
        let mut d = *self;
        for (o, e) in d.ops.iter_mut().zip(&other.ops) {
            o.calls += e.calls;
            o.bytes_sent += e.bytes_sent;
            o.bytes_received += e.bytes_received;
        }
        d
    }
    /// The kinds with any activity, with their counters (for printing).
    pub fn nonzero(&self) -> impl Iterator<Item = (OpKind, OpStats)> + '_ {
        OpKind::ALL
            .into_iter()
            .map(|k| (k, self.op(k)))
            .filter(|(_, o)| *o != OpStats::default())
    }
}
