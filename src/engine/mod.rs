//! The message engine shared by the in-process and TCP backends.
//!
//! Each rank runs one worker thread that owns an [`Engine`]: the rank's inbox, a sender to every peer's
//! inbox, the stash of messages that arrived early, the posted (non-blocking) receives, and the link
//! model's clock. Every operation of the rank — blocking or not — is a job executed by that worker in
//! program order, so all ranks execute collectives in the same order and a non-blocking collective
//! progresses while the caller computes. Point-to-point receives posted with `irecv` never block the
//! worker: incoming messages are matched against them whenever the worker takes messages.
//!
//! Transports only differ in how a message reaches a peer's inbox: a crossbeam channel (in-process) or
//! a socket pumped by reader/writer threads (TCP). The algorithms live in [`algo`].
//!
//! Time: every operation has one deadline, `Config::timeout` after [`Engine::execute`] started it;
//! every wait inside it (a message, a loan's acknowledgement, a real-time link-model sleep) ends at
//! that deadline, so a collective of many steps still fails after about one timeout, never
//! steps × timeout. Failure: a panic on the worker (a buffer that panics, an internal assertion)
//! stops the worker and marks this rank gone, so the caller and the peers get `PeerLost` promptly.

pub(crate) mod algo;
pub(crate) mod direct;
pub(crate) mod health;
pub(crate) mod msg;

pub(crate) use health::Health;

use crate::buffer::BufMut;
use crate::collective::CollectiveOwned;
use crate::config::deadline_after;
use crate::link::Clock;
use crate::stats::{OpKind, Traffic};
use crate::{Collective, Config, Error, Result};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use msg::{Lend, LendGuard, Msg, Payload, Sig, Tag};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The [`Communicator`](crate::Communicator) methods that every engine-backed communicator (the
/// in-process and the TCP backend) has identically, said once: identity, config, `exec`/`exec_async`
/// through the engine's worker, traffic counters. Used inside `impl Communicator for X { .. }`; `X`
/// has the fields `rank`, `size`, `cfg`, `worker` ([`Worker`]) and `traffic`
/// ([`Arc<Traffic>`](Traffic)). The backend adds `split` and whatever is its own.
macro_rules! engine_communicator {
    ($backend:literal) => {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn backend(&self) -> &'static str {
            $backend
        }
        fn config(&self) -> &crate::Config {
            &self.cfg
        }
        fn exec(&self, c: crate::CollectiveRef<'_>) -> crate::Result<()> {
            self.worker.exec(c)
        }
        fn exec_async(
            &self,
            c: crate::CollectiveOwned,
        ) -> crate::Result<crate::Work<crate::CollectiveOwned>> {
            self.worker.exec_async(c)
        }
        fn traffic(&self) -> Option<&crate::stats::Traffic> {
            Some(&self.traffic)
        }
    };
}
pub(crate) use engine_communicator;

fn out_of_range(what: &'static str, rank: usize, world: usize) -> Error {
    Error::RankOutOfRange { what, rank, world }
}

/// A job for the worker.
pub(crate) type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// A receive posted by `irecv`, completed when its message arrives.
struct Posted {
    src: usize,
    tag: u32,
    op: CollectiveOwned,
    reply: Sender<Result<CollectiveOwned>>,
    /// Set when the caller's `Work` was dropped (waited out or abandoned): the entry must not take a
    /// message any more (nobody would see it), and is swept.
    cancel: Arc<AtomicBool>,
}

impl Posted {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// The pending side of an `irecv`: dropping it cancels the posted receive (see [`Posted::cancel`]).
struct RecvPending {
    inner: crate::work::ChannelPending<CollectiveOwned>,
    cancel: Arc<AtomicBool>,
}

impl crate::work::Pending<CollectiveOwned> for RecvPending {
    fn poll(&mut self) -> Option<Result<CollectiveOwned>> {
        self.inner.poll()
    }
    fn wait_for(&mut self, d: Duration) -> Option<Result<CollectiveOwned>> {
        self.inner.wait_for(d)
    }
}

impl Drop for RecvPending {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
    }
}

/// One rank's engine. See the module docs.
pub(crate) struct Engine {
    pub rank: usize,
    pub size: usize,
    pub peers: Vec<Sender<Msg>>,
    pub inbox: Receiver<Msg>,
    pub health: Arc<Health>,
    pub clock: Option<Arc<Mutex<Clock>>>,
    pub cfg: Config,
    /// This communicator's traffic counters (see [`crate::stats`]).
    pub traffic: Arc<Traffic>,
    /// The kind of the operation being executed: what its messages are charged to (a receive posted
    /// by `irecv` and completed while idle is charged to `Recv`).
    pub cur: OpKind,
    /// Allow loans (zero-copy) to peers — or, for TCP, to the socket writer threads.
    pub lend_ok: bool,
    /// Peers run in this process and read loans directly (in-process transport), so algorithms may
    /// hand them read-write loans (two-shot all-reduce). False for TCP, whose peers get copies.
    pub peers_share_memory: bool,
    stash: VecDeque<Msg>,
    posted: Vec<Posted>,
    seq: u64,
    /// The deadline of the operation being executed (`None` while idle); see the module docs.
    op_deadline: Option<Instant>,
    /// The element type of the operation being executed: length errors found on raw bytes are
    /// reported in its elements.
    pub(crate) op_dtype: crate::DType,
    /// The signature of the collective being executed (carried by its messages, compared on receipt).
    pub(crate) sig: Sig,
    /// The previous collective's number and signature (to describe a late message of it).
    prev: (u64, Sig),
}

/// Raw view of a host buffer for the algorithms: sub-slices can be lent and written independently.
#[derive(Clone, Copy)]
pub(crate) struct Raw {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a Raw is only created from a buffer that the calling job borrows for its whole duration.
unsafe impl Send for Raw {}

impl Raw {
    pub fn from_mut(b: &mut [u8]) -> Raw {
        Raw {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        }
    }
    pub fn from_ref(b: &[u8]) -> Raw {
        Raw {
            ptr: b.as_ptr() as *mut u8,
            len: b.len(),
        }
    }
    pub fn len(self) -> usize {
        self.len
    }
    /// Address of byte `a` (for read-write loans); `a` must be within the buffer.
    pub fn ptr_at(self, a: usize) -> *mut u8 {
        assert!(a <= self.len, "internal: offset {a} out of {}", self.len);
        // SAFETY: in bounds (asserted).
        unsafe { self.ptr.add(a) }
    }
    /// Bytes `[a, b)`. Callers never hold a read and a write of overlapping ranges at once.
    pub fn get<'x>(self, a: usize, b: usize) -> &'x [u8] {
        assert!(
            a <= b && b <= self.len,
            "internal: range {a}..{b} out of {}",
            self.len
        );
        // SAFETY: in bounds (asserted); the buffer outlives the job (see type docs).
        unsafe { std::slice::from_raw_parts(self.ptr.add(a), b - a) }
    }
    /// Writable bytes `[a, b)`; see [`Raw::get`].
    #[allow(clippy::mut_from_ref)]
    pub fn get_mut<'x>(self, a: usize, b: usize) -> &'x mut [u8] {
        assert!(
            a <= b && b <= self.len,
            "internal: range {a}..{b} out of {}",
            self.len
        );
        // SAFETY: as above; only created from a mutable borrow, and ranges written are never lent.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(a), b - a) }
    }
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rank: usize,
        size: usize,
        peers: Vec<Sender<Msg>>,
        inbox: Receiver<Msg>,
        health: Arc<Health>,
        clock: Option<Arc<Mutex<Clock>>>,
        cfg: Config,
        traffic: Arc<Traffic>,
        lend_ok: bool,
    ) -> Engine {
        Engine {
            rank,
            size,
            peers,
            inbox,
            health,
            clock,
            cfg,
            traffic,
            cur: OpKind::Recv,
            lend_ok,
            peers_share_memory: false,
            stash: VecDeque::new(),
            posted: Vec::new(),
            seq: 0,
            op_deadline: None,
            sig: Sig::NONE,
            prev: (0, Sig::NONE),
            op_dtype: crate::DType::U8,
        }
    }

    /// The worker loop: run jobs in order, file incoming messages while idle.
    ///
    /// A panic in a job (user buffer code, an internal assertion) must not leave the peers waiting
    /// for their timeout: it is caught, the communicator is broken for this rank and the rank is
    /// marked gone (it will send nothing more: only this thread sends for it), then the worker stops.
    /// Unwinding already dropped the job's reply sender (the caller gets `PeerLost` naming this rank)
    /// and its loan guards (every loan of the caller's buffers is revoked); dropping `jobs` discards
    /// the queued jobs, whose callers get `PeerLost` the same way.
    pub fn serve(mut self, jobs: Receiver<Job>) {
        let served = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve_jobs(&jobs)));
        let lost = match served {
            Ok(()) => None,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                tracing::error!(
                    rank = self.rank,
                    "ferroccl: this rank's worker panicked ({msg}); the communicator is broken"
                );
                self.health.break_for(self.rank);
                if let Some(g) = self.health.gone.get(self.rank) {
                    g.store(true, Ordering::Release);
                }
                Some(self.rank)
            }
        };
        drop(jobs);
        // Fail what is still posted: nobody will complete it.
        for p in self.posted.drain(..) {
            let _ = p.reply.send(Err(match lost {
                None => Error::PeerLost {
                    rank: p.src,
                    during: "irecv (communicator dropped)",
                },
                Some(rank) => Error::PeerLost {
                    rank,
                    during: "irecv (this rank's worker panicked)",
                },
            }));
        }
    }

    fn serve_jobs(&mut self, jobs: &Receiver<Job>) {
        loop {
            crossbeam::select! {
                recv(jobs) -> j => match j {
                    Ok(job) => job(self),
                    Err(_) => break,
                },
                recv(self.inbox) -> m => {
                    if let Ok(m) = m {
                        self.file(m);
                    }
                },
                default(Duration::from_millis(20)) => self.sweep_posted(),
            }
        }
    }

    /// Number the collective being started (and publish that this rank entered it).
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        if let Some(e) = self.health.entered.get(self.rank) {
            e.store(self.seq, Ordering::Release);
        }
        self.seq
    }

    /// Publish that this rank finished the collective it entered last, whatever its outcome.
    pub(crate) fn finish_collective(&mut self) {
        if let Some(c) = self.health.completed.get(self.rank) {
            c.store(self.seq, Ordering::Release);
        }
        self.prev = (self.seq, self.sig);
    }

    /// A collective message `m` that does not belong to this rank's call: a mismatch (it carries
    /// another signature for the same collective, or it is for a collective this rank already
    /// finished without it). Breaks the communicator and tells every peer.
    fn mismatch_in(&self, m: &Msg, cur: u64) -> Option<Error> {
        let Tag::Coll { seq, .. } = m.tag else {
            return None;
        };
        let (mine, theirs) = if seq == cur {
            if m.sig == self.sig {
                return None;
            }
            (self.sig.describe(cur), m.sig.describe(seq))
        } else if seq < cur && !self.health.timed_out.load(Ordering::Acquire) {
            let mine = if seq == self.prev.0 {
                self.prev.1.describe(seq)
            } else {
                format!("collective #{seq} (finished)")
            };
            (
                format!("{mine}, which expected no message from rank {}", m.src),
                m.sig.describe(seq),
            )
        } else {
            return None;
        };
        let mm = health::Mismatch {
            rank: self.rank,
            mine,
            other_rank: m.src,
            theirs,
        };
        self.health.break_mismatch(mm.clone());
        Some(Error::CollectiveMismatch {
            rank: mm.rank,
            mine: mm.mine,
            other_rank: mm.other_rank,
            theirs: mm.theirs,
        })
    }

    /// The collective timed out: a hang diagnosis (see [`Error::Hang`]).
    fn hang(&self, during: &'static str, waiting_for: Option<usize>) -> Error {
        self.health
            .hang(self.rank, self.seq, during, self.cfg.timeout, waiting_for)
    }

    /// The deadline every wait uses: the current operation's, or (outside one: the worker completing
    /// a posted receive while idle) one timeout from now.
    fn deadline(&self) -> Instant {
        self.op_deadline
            .unwrap_or_else(|| deadline_after(self.cfg.timeout))
    }

    /// Run `f` as one operation: one deadline for every wait inside it (see the module docs).
    pub(crate) fn with_deadline<R>(&mut self, f: impl FnOnce(&mut Engine) -> R) -> R {
        self.op_deadline = Some(deadline_after(self.cfg.timeout));
        let r = f(self);
        self.op_deadline = None;
        r
    }

    fn timeout(&self, during: &'static str, waiting_for: Option<usize>) -> Error {
        Error::Timeout {
            during,
            after: self.cfg.timeout,
            waiting_for,
        }
    }

    fn post(&mut self, dst: usize, tag: Tag, payload: Payload) -> Result<()> {
        // Checked: `Communicator::exec` is public and does not validate, so `dst` may be anything.
        let size = self.size;
        let peer = self
            .peers
            .get(dst)
            .ok_or_else(|| out_of_range("destination rank", dst, size))?;
        let n = payload.len();
        let arrive = match &self.clock {
            Some(c) => c.lock().unwrap_or_else(|e| e.into_inner()).send(dst, n),
            None => 0.0,
        };
        if dst != self.rank {
            self.traffic.sent(self.cur, n as u64);
        }
        let sig = match tag {
            Tag::Coll { .. } => self.sig,
            _ => Sig::NONE,
        };
        peer.send(Msg {
            src: self.rank,
            tag,
            payload,
            arrive,
            sig,
        })
        .map_err(|_| {
            if !matches!(tag, Tag::P2p(_)) {
                self.health.break_for(dst);
            }
            Error::PeerLost {
                rank: dst,
                during: "send",
            }
        })
    }

    /// Send a copy of `bytes` (eager: returns at once).
    pub fn send_copy(&mut self, dst: usize, tag: Tag, bytes: &[u8]) -> Result<()> {
        self.post(dst, tag, Payload::Bytes(msg::Aligned::copy_of(bytes)))
    }

    /// Lend `bytes` to `dst`; keep the guard until [`Engine::wait_guard`] succeeded. Falls back to a
    /// copy (and an already-satisfied guard) where loans are not allowed.
    pub fn send_lend(&mut self, dst: usize, tag: Tag, bytes: &[u8]) -> Result<Option<LendGuard>> {
        if !self.lend_ok || dst == self.rank {
            self.send_copy(dst, tag, bytes)?;
            return Ok(None);
        }
        let (l, g): (Lend, LendGuard) = msg::lend(bytes, dst);
        self.post(dst, tag, Payload::Lent(l))?;
        Ok(Some(g))
    }

    /// Lend `src` for reading and `dst` (same length) for writing to `dst_rank`; only where loans are
    /// allowed (the caller checks [`Engine::lend_ok`]). Keep the guard until
    /// [`Engine::wait_guard`] succeeded: the peer may write `dst` until then.
    pub fn send_lend_rw(
        &mut self,
        dst_rank: usize,
        tag: Tag,
        src: &[u8],
        dst: *mut u8,
    ) -> Result<Option<LendGuard>> {
        if !self.lend_ok || !self.peers_share_memory || dst_rank == self.rank {
            return Err(Error::InvalidArgument(
                "internal: read-write loans need an in-process transport".into(),
            ));
        }
        let (l, g) = msg::lend_rw(src, dst, dst_rank);
        self.post(dst_rank, tag, Payload::Lent(l))?;
        Ok(Some(g))
    }

    /// Wait until a loan was read (until the operation's deadline).
    pub fn wait_guard(&self, g: &Option<LendGuard>) -> Result<()> {
        match g {
            None => Ok(()),
            Some(g) => {
                let health = self.health.clone();
                let (peer, me, seq) = (g.peer, self.rank, self.seq);
                g.wait(self.deadline(), &|| {
                    health.check("waiting for a peer to read")?;
                    // peer < size: the guard was made by `post`, which checked it
                    let gone = health
                        .gone
                        .get(peer)
                        .is_some_and(|g| g.load(Ordering::Acquire));
                    let lost = if gone {
                        Some(peer)
                    } else {
                        health.left_before(me, seq)
                    };
                    if let Some(rank) = lost {
                        return Err(health.fail(rank, "waiting for a peer to read"));
                    }
                    Ok(())
                })
                .map_err(|e| match e {
                    Error::Timeout {
                        during,
                        waiting_for,
                        ..
                    } => self.hang(during, waiting_for),
                    e => e,
                })
            }
        }
    }

    /// Charge the link model for taking `m`; false if, in real time, it would arrive after `limit`
    /// (the real-time sleep stops there).
    fn take_clock(&self, m: &Msg, limit: Instant) -> bool {
        match &self.clock {
            Some(c) => crate::link::take(c, m.arrive, limit),
            None => true,
        }
    }

    /// Put an incoming message where it belongs: a posted receive or the stash.
    ///
    /// Cancelled receives (their `Work` is gone) never take a message: it goes to the next posted
    /// receive for `(src, tag)` or to the stash, where a later `recv`/`irecv` finds it. The same holds
    /// when the cancellation races with the completion (the reply fails) and, in real time, when the
    /// message would arrive after the deadline (that receive fails with `Timeout`). One deadline
    /// bounds all the real-time sleeps of one call.
    fn file(&mut self, mut m: Msg) {
        if let Tag::P2p(t) = m.tag {
            let mut limit = None;
            while let Some(i) = self
                .posted
                .iter()
                .position(|p| p.src == m.src && p.tag == t && !p.cancelled())
            {
                let p = self.posted.remove(i);
                let l = *limit.get_or_insert_with(|| self.deadline());
                match self.complete_posted(p, m, l) {
                    None => return,
                    Some(back) => m = back,
                }
            }
        }
        self.stash.push_back(m);
    }

    /// Complete `p` with `m`; gives `m` back if nobody received it (the `Work` was dropped meanwhile,
    /// or in real time it arrives after `limit`). A copy-in error (length mismatch) consumes it, as a
    /// truncated MPI receive does, unless nobody saw the error.
    fn complete_posted(&mut self, mut p: Posted, m: Msg, limit: Instant) -> Option<Msg> {
        if !self.take_clock(&m, limit) {
            let _ = p.reply.send(Err(self.timeout("irecv", Some(p.src))));
            return Some(m);
        }
        let r = match &mut p.op {
            Collective::Recv { buf, .. } => copy_in(buf.buf_mut(), &m),
            _ => Err(Error::InvalidArgument(
                "internal: posted op is not a receive".into(),
            )),
        };
        let got = (r.is_ok() && m.src != self.rank).then(|| m.payload.len() as u64);
        match p.reply.send(r.map(|_| p.op)) {
            Ok(()) => {
                if let Some(n) = got {
                    self.traffic.received(OpKind::Recv, n);
                }
                None
            }
            // Nobody saw it: give it back. Only point-to-point copies are posted, and reading a
            // copy leaves it intact.
            Err(_) => Some(m),
        }
    }

    /// Fail posted receives whose sender is gone; drop cancelled ones.
    fn sweep_posted(&mut self) {
        self.posted.retain(|p| !p.cancelled());
        if self.posted.is_empty() {
            return;
        }
        // Messages that were queued before a gone flag was set are visible now: file them first.
        while let Ok(m) = self.inbox.try_recv() {
            self.file(m);
        }
        // Point-to-point traffic between live ranks survives a lost rank (as in ULFM MPI): only a
        // receive from the lost rank itself fails, and the group is not broken for it.
        let mut keep = Vec::new();
        for p in self.posted.drain(..) {
            // p.src < size: checked by `post_recv` (an unknown rank would count as gone)
            let gone = match self.health.gone.get(p.src) {
                Some(g) => g.load(Ordering::Acquire),
                None => true,
            };
            if gone {
                let _ = p.reply.send(Err(Error::PeerLost {
                    rank: p.src,
                    during: "irecv",
                }));
            } else {
                keep.push(p);
            }
        }
        self.posted = keep;
    }

    /// Post a non-blocking receive (never blocks the worker). `cancel` is set when the caller's
    /// `Work` is dropped (see [`Posted::cancel`]).
    pub fn post_recv(
        &mut self,
        op: CollectiveOwned,
        reply: Sender<Result<CollectiveOwned>>,
        cancel: Arc<AtomicBool>,
    ) {
        let (src, tag) = match &op {
            Collective::Recv { peer, tag, .. } => (*peer, *tag),
            _ => {
                let _ = reply.send(Err(Error::InvalidArgument(
                    "internal: not a receive".into(),
                )));
                return;
            }
        };
        if src >= self.size {
            let _ = reply.send(Err(out_of_range("irecv peer", src, self.size)));
            return;
        }
        // Cancelled entries would otherwise only go at the next idle sweep.
        self.posted.retain(|p| !p.cancelled());
        let p = Posted {
            src,
            tag,
            op,
            reply,
            cancel,
        };
        if let Some(i) = self
            .stash
            .iter()
            .position(|m| m.src == src && m.tag == Tag::P2p(tag))
        {
            if let Some(m) = self.stash.remove(i) {
                let limit = self.deadline();
                if let Some(m) = self.complete_posted(p, m, limit) {
                    // Not delivered (the Work is already gone, or in real time the message arrives
                    // after the deadline and this receive failed): it stays first in line.
                    self.stash.insert(i, m);
                }
                return;
            }
        }
        self.posted.push(p);
    }

    /// Block (until the operation's deadline) for the message `(src, tag)`.
    pub fn recv(&mut self, src: usize, tag: Tag, during: &'static str) -> Result<Msg> {
        // Checked: `Communicator::exec` is public and does not validate, so `src` may be anything;
        // `gone[src]` below is in range from here on.
        if src >= self.health.gone.len() {
            return Err(out_of_range("source rank", src, self.size));
        }
        let deadline = self.deadline();
        // The collective this message belongs to: its messages' signatures are compared with ours.
        let cur = match tag {
            Tag::Coll { seq, .. } => Some(seq),
            _ => None,
        };
        if let Some(c) = cur {
            // a message that arrived earlier (filed while idle, or during another wait) may already
            // tell of a mismatch: a late message of a finished collective, or another signature
            if let Some(e) = self.stash.iter().find_map(|m| self.mismatch_in(m, c)) {
                return Err(e);
            }
        }
        if let Some(i) = self.stash.iter().position(|m| m.src == src && m.tag == tag) {
            if let Some(m) = self.stash.remove(i) {
                return self.take_in_time(m, deadline, Some(i), during);
            }
        }
        let p2p = cur.is_none();
        loop {
            if let Some(c) = cur {
                self.health.check(during)?;
                // A rank that left before this collective will never send its part: fail now,
                // naming it, whoever this rank waits for (issue 19).
                if let Some(r) = self.health.left_before(self.rank, c) {
                    return Err(self.health.fail(r, during));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(left.min(Duration::from_millis(10))) {
                Ok(m) if m.src == src && m.tag == tag => {
                    if let Some(e) = cur.and_then(|c| self.mismatch_in(&m, c)) {
                        return Err(e);
                    }
                    return self.take_in_time(m, deadline, None, during);
                }
                // another message: file it, then the checks below (a steady stream of other
                // messages must not keep this wait past its deadline or hide a lost sender)
                Ok(m) => {
                    if let Some(e) = cur.and_then(|c| self.mismatch_in(&m, c)) {
                        return Err(e);
                    }
                    self.file(m)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if !p2p {
                        self.health.break_for(src);
                    }
                    return Err(Error::PeerLost { rank: src, during });
                }
            }
            if self.health.gone[src].load(Ordering::Acquire) {
                // Everything src sent before leaving is already queued: drain once more.
                while let Ok(m) = self.inbox.try_recv() {
                    if m.src == src && m.tag == tag {
                        return self.take_in_time(m, deadline, None, during);
                    }
                    self.file(m);
                }
                if !p2p {
                    return Err(self.health.fail(src, during));
                }
                return Err(Error::PeerLost { rank: src, during });
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_for(tag, during, Some(src)));
            }
        }
    }

    /// A receive's timeout: a hang diagnosis for a collective, a plain timeout for point-to-point.
    fn timeout_for(&self, tag: Tag, during: &'static str, waiting_for: Option<usize>) -> Error {
        match tag {
            Tag::Coll { .. } => self.hang(during, waiting_for),
            _ => self.timeout(during, waiting_for),
        }
    }

    /// Take the matched message `m` under the link model; if in real time it arrives after the
    /// deadline, it goes back to the stash (at `at`, where it was, or in front: it is the oldest of
    /// its `(src, tag)`) for a later receive, and this one times out.
    fn take_in_time(
        &mut self,
        m: Msg,
        deadline: Instant,
        at: Option<usize>,
        during: &'static str,
    ) -> Result<Msg> {
        if self.take_clock(&m, deadline) {
            if m.src != self.rank {
                self.traffic.received(self.cur, m.payload.len() as u64);
            }
            return Ok(m);
        }
        let (src, tag) = (m.src, m.tag);
        match at {
            Some(i) => self.stash.insert(i, m),
            None => self.stash.push_front(m),
        }
        Err(self.timeout_for(tag, during, Some(src)))
    }
}

/// Copy a received message into a receive buffer, checking the length.
pub(crate) fn copy_in(mut buf: BufMut<'_>, m: &Msg) -> Result<()> {
    let n = m.payload.len();
    let want = buf.byte_len();
    let dtype = buf.dtype;
    let dst = buf
        .host_bytes_mut()
        .ok_or_else(|| Error::Unsupported("this backend only takes host buffers".into()))?;
    if n != want {
        return Err(Error::byte_lengths(
            format!(
                "recv from rank {}: the message's length differs from the buffer's",
                m.src
            ),
            dtype,
            want,
            n,
        ));
    }
    m.payload.with(m.src, |b| dst.copy_from_slice(b))
}

/// The handle a communicator keeps on its rank's worker thread.
pub(crate) struct Worker {
    rank: usize,
    timeout: Duration,
    jobs: Option<Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Address of the caller's `Option<CollectiveRef>` handed to the worker by [`Worker::exec`].
#[derive(Clone, Copy)]
struct SlotPtr(usize);

impl Worker {
    /// Start the worker thread serving `engine`.
    pub fn spawn(engine: Engine, name: String) -> Result<Worker> {
        let (rank, timeout) = (engine.rank, engine.cfg.timeout);
        let (jobs, job_rx) = crossbeam::channel::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || engine.serve(job_rx))
            .map_err(|e| Error::io("spawning a rank's worker thread", e))?;
        Ok(Worker {
            rank,
            timeout,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn lost(&self, during: &'static str) -> Error {
        Error::PeerLost {
            rank: self.rank,
            during,
        }
    }

    fn submit(&self, job: Job) -> Result<()> {
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.lost("submitting to this rank's worker (it stopped)")),
        }
    }

    /// Run a blocking collective on the worker. The worker borrows the caller's buffers; the caller
    /// blocks until the worker replied, or until the job was dropped (worker gone, or it panicked) —
    /// in both cases the worker no longer touches the buffers, and every loan made from them was
    /// revoked or returned.
    ///
    /// That is why the wait below has no timeout of its own: returning early would free buffers the
    /// worker may still use. It is bounded all the same, by this invariant: **every wait inside a
    /// job ends at the operation's deadline** (`Config::timeout` after the job started, see
    /// [`Engine::with_deadline`]): message receives, loan acknowledgements and real-time link-model
    /// sleeps; sends into the in-process and TCP transports are unbounded channels that never block,
    /// locks (loans, the link-model clock) are only held for a copy or a reduction, never across a
    /// wait or a sleep, and a panic ends the job at once. So this returns within about one timeout
    /// after the job starts, plus the time of the computation itself; jobs queued before it (earlier
    /// non-blocking operations) each have their own deadline. (The TCP writer threads copy a loan
    /// under its lock piece by piece and write with no lock held, so they do not hold it up.)
    pub fn exec(&self, c: crate::collective::CollectiveRef<'_>) -> Result<()> {
        let mut c = Some(c);
        let (tx, rx) = crossbeam::channel::bounded::<Result<()>>(1);
        let slot = SlotPtr(&mut c as *mut Option<crate::CollectiveRef<'_>> as usize);
        self.submit(Box::new(move |e: &mut Engine| {
            let slot = slot;
            // SAFETY: see above; the Option outlives this job because the caller waits on `rx`.
            let c = unsafe { (*(slot.0 as *mut Option<crate::CollectiveRef<'static>>)).take() };
            let r = match c {
                Some(c) => e.execute(c),
                None => Err(Error::InvalidArgument("internal: job ran twice".into())),
            };
            let _ = tx.send(r);
        }))?;
        // Bounded by the invariant in the docs above.
        match rx.recv() {
            Ok(r) => r,
            Err(_) => Err(self.lost("this rank's worker stopped during a collective")),
        }
    }

    /// Start a non-blocking collective; receives are posted without blocking the worker.
    pub fn exec_async(&self, c: CollectiveOwned) -> Result<crate::Work<CollectiveOwned>> {
        let (tx, rx) = crossbeam::channel::bounded(1);
        let pending = crate::work::ChannelPending::new(rx, self.rank);
        let pending: Box<dyn crate::work::Pending<CollectiveOwned>> =
            if matches!(c, Collective::Recv { .. }) {
                let cancel = Arc::new(AtomicBool::new(false));
                let flag = cancel.clone();
                self.submit(Box::new(move |e: &mut Engine| e.post_recv(c, tx, flag)))?;
                Box::new(RecvPending {
                    inner: pending,
                    cancel,
                })
            } else {
                let mut c = c;
                self.submit(Box::new(move |e: &mut Engine| {
                    let r = e.execute(c.views());
                    let _ = tx.send(r.map(|_| c));
                }))?;
                Box::new(pending)
            };
        Ok(crate::Work::new(
            pending,
            self.timeout,
            "non-blocking collective",
        ))
    }

    /// Let the worker finish what is queued, then stop it.
    pub fn stop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(n: usize, rank: usize) -> (Engine, Vec<Receiver<Msg>>) {
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..n).map(|_| crossbeam::channel::unbounded()).unzip();
        let mut inboxes: Vec<Option<Receiver<Msg>>> = inboxes.into_iter().map(Some).collect();
        let inbox = inboxes[rank].take().unwrap();
        let e = Engine::new(
            rank,
            n,
            senders,
            inbox,
            Health::new(n),
            None,
            Config::default().with_timeout(Duration::from_secs(1)),
            Arc::new(Traffic::new()),
            true,
        );
        (e, inboxes.into_iter().flatten().collect())
    }

    fn irecv(
        e: &mut Engine,
        src: usize,
        tag: u32,
    ) -> (Receiver<Result<CollectiveOwned>>, Arc<AtomicBool>) {
        let (tx, rx) = crossbeam::channel::bounded(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let op: CollectiveOwned = Collective::Recv {
            buf: Box::new(vec![0u8; 2]),
            peer: src,
            tag,
        };
        e.post_recv(op, tx, cancel.clone());
        (rx, cancel)
    }

    fn msg(src: usize, tag: u32, b: &[u8]) -> Msg {
        Msg {
            src,
            tag: Tag::P2p(tag),
            payload: Payload::Bytes(msg::Aligned::copy_of(b)),
            arrive: 0.0,
            sig: Sig::NONE,
        }
    }

    #[test]
    fn cancelled_receives_are_swept_and_never_take_a_message() {
        let (mut e, _keep) = engine(2, 0);
        let (rx1, c1) = irecv(&mut e, 1, 4);
        let (rx2, _c2) = irecv(&mut e, 1, 4);
        assert_eq!(e.posted.len(), 2);
        // the first is abandoned: the message goes to the second
        c1.store(true, Ordering::Release);
        drop(rx1);
        e.file(msg(1, 4, &[1, 2]));
        match rx2.try_recv() {
            Ok(Ok(Collective::Recv { buf, .. })) => {
                let v = buf.into_any().downcast::<Vec<u8>>().unwrap();
                assert_eq!(*v, vec![1, 2]);
            }
            Ok(Ok(_)) => panic!("not a receive"),
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("the live receive got nothing: {e}"),
        }
        // a cancelled entry left alone is swept, and a message for it goes to the stash
        let (_rx3, c3) = irecv(&mut e, 1, 5);
        c3.store(true, Ordering::Release);
        e.sweep_posted();
        assert!(e.posted.is_empty(), "{} left", e.posted.len());
        e.file(msg(1, 5, &[3, 4]));
        assert_eq!(e.stash.len(), 1);
        // a receiver that vanished without the flag (raced): the message is given back
        let (rx4, _c4) = irecv(&mut e, 1, 6);
        drop(rx4);
        e.file(msg(1, 6, &[5, 6]));
        assert_eq!(e.stash.len(), 2);
        assert!(e.posted.is_empty());
        let m = e.recv(1, Tag::P2p(6), "recv").unwrap();
        m.payload.with(1, |b| assert_eq!(b, &[5, 6])).unwrap();
    }
}
