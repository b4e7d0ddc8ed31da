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

pub(crate) mod algo;
pub(crate) mod direct;
pub(crate) mod msg;

use crate::buffer::BufMut;
use crate::comm::CollectiveOwned;
use crate::local::link::Clock;
use crate::{Collective, Config, Error, Result};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use msg::{Lend, LendGuard, Msg, Payload, Tag};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Liveness of the ranks of one communicator.
#[derive(Debug)]
pub(crate) struct Health {
    /// `gone[r]`: rank r will send nothing more (set after its last message was queued).
    pub gone: Vec<AtomicBool>,
    /// usize::MAX while healthy; otherwise the rank whose loss broke the communicator.
    pub broken: AtomicUsize,
}

impl Health {
    pub fn new(n: usize) -> Arc<Health> {
        Arc::new(Health {
            gone: (0..n).map(|_| AtomicBool::new(false)).collect(),
            broken: AtomicUsize::new(usize::MAX),
        })
    }
    pub fn break_for(&self, rank: usize) {
        let _ = self
            .broken
            .compare_exchange(usize::MAX, rank, Ordering::AcqRel, Ordering::Acquire);
    }
    pub fn check(&self, during: &'static str) -> Result<()> {
        match self.broken.load(Ordering::Acquire) {
            usize::MAX => Ok(()),
            rank => Err(Error::PeerLost { rank, during }),
        }
    }
}

/// A job for the worker.
pub(crate) type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// A receive posted by `irecv`, completed when its message arrives.
struct Posted {
    src: usize,
    tag: u32,
    op: CollectiveOwned,
    reply: Sender<Result<CollectiveOwned>>,
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
    pub bytes_sent: Arc<AtomicU64>,
    /// Allow loans (zero-copy) to peers — or, for TCP, to the socket writer threads.
    pub lend_ok: bool,
    /// Peers run in this process and read loans directly (in-process transport), so algorithms may
    /// hand them read-write loans (two-shot all-reduce). False for TCP, whose peers get copies.
    pub peers_share_memory: bool,
    stash: VecDeque<Msg>,
    posted: Vec<Posted>,
    seq: u64,
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
        bytes_sent: Arc<AtomicU64>,
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
            bytes_sent,
            lend_ok,
            peers_share_memory: false,
            stash: VecDeque::new(),
            posted: Vec::new(),
            seq: 0,
        }
    }

    /// The worker loop: run jobs in order, file incoming messages while idle.
    pub fn serve(mut self, jobs: Receiver<Job>) {
        loop {
            crossbeam::select! {
                recv(jobs) -> j => match j {
                    Ok(job) => job(&mut self),
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
        // Fail what is still posted: nobody will complete it.
        for p in self.posted.drain(..) {
            let _ = p.reply.send(Err(Error::PeerLost {
                rank: p.src,
                during: "irecv (communicator dropped)",
            }));
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.timeout
    }

    fn post(&mut self, dst: usize, tag: Tag, payload: Payload) -> Result<()> {
        let n = payload.len();
        let arrive = match &self.clock {
            Some(c) => c.lock().unwrap_or_else(|e| e.into_inner()).send(dst, n),
            None => 0.0,
        };
        if dst != self.rank {
            self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.peers[dst]
            .send(Msg {
                src: self.rank,
                tag,
                payload,
                arrive,
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

    /// Wait until a loan was read.
    pub fn wait_guard(&self, g: &Option<LendGuard>) -> Result<()> {
        match g {
            None => Ok(()),
            Some(g) => {
                let health = self.health.clone();
                let peer = g.peer;
                g.wait(self.deadline(), &|| {
                    health.check("waiting for a peer to read")?;
                    if health.gone[peer].load(Ordering::Acquire) {
                        health.break_for(peer);
                        return Err(Error::PeerLost {
                            rank: peer,
                            during: "waiting for a peer to read",
                        });
                    }
                    Ok(())
                })
                .map_err(|e| match e {
                    Error::Timeout {
                        during,
                        waiting_for,
                        ..
                    } => Error::Timeout {
                        during,
                        after: self.cfg.timeout,
                        waiting_for,
                    },
                    e => e,
                })
            }
        }
    }

    fn take_clock(&self, m: &Msg) {
        if let Some(c) = &self.clock {
            c.lock().unwrap_or_else(|e| e.into_inner()).recv(m.arrive);
        }
    }

    /// Put an incoming message where it belongs: a posted receive or the stash.
    fn file(&mut self, m: Msg) {
        if let Tag::P2p(t) = m.tag {
            if let Some(i) = self
                .posted
                .iter()
                .position(|p| p.src == m.src && p.tag == t)
            {
                let p = self.posted.remove(i);
                self.complete_posted(p, m);
                return;
            }
        }
        self.stash.push_back(m);
    }

    fn complete_posted(&mut self, mut p: Posted, m: Msg) {
        self.take_clock(&m);
        let r = match &mut p.op {
            Collective::Recv { buf, .. } => copy_in(buf.buf_mut(), &m),
            _ => Err(Error::InvalidArgument(
                "internal: posted op is not a receive".into(),
            )),
        };
        let _ = p.reply.send(r.map(|_| p.op));
    }

    /// Fail posted receives whose sender is gone or whose communicator broke.
    fn sweep_posted(&mut self) {
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
            if self.health.gone[p.src].load(Ordering::Acquire) {
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

    /// Post a non-blocking receive (never blocks the worker).
    pub fn post_recv(&mut self, op: CollectiveOwned, reply: Sender<Result<CollectiveOwned>>) {
        let (src, tag) = match &op {
            Collective::Recv { peer, tag, .. } => (*peer, *tag),
            _ => {
                let _ = reply.send(Err(Error::InvalidArgument(
                    "internal: not a receive".into(),
                )));
                return;
            }
        };
        let p = Posted {
            src,
            tag,
            op,
            reply,
        };
        if let Some(i) = self
            .stash
            .iter()
            .position(|m| m.src == src && m.tag == Tag::P2p(tag))
        {
            if let Some(m) = self.stash.remove(i) {
                self.complete_posted(p, m);
                return;
            }
        }
        self.posted.push(p);
    }

    /// Block (bounded) for the message `(src, tag)`.
    pub fn recv(&mut self, src: usize, tag: Tag, during: &'static str) -> Result<Msg> {
        if let Some(i) = self.stash.iter().position(|m| m.src == src && m.tag == tag) {
            if let Some(m) = self.stash.remove(i) {
                self.take_clock(&m);
                return Ok(m);
            }
        }
        let deadline = self.deadline();
        let p2p = matches!(tag, Tag::P2p(_));
        loop {
            if !p2p {
                self.health.check(during)?;
            }
            match self.inbox.recv_timeout(Duration::from_millis(10)) {
                Ok(m) if m.src == src && m.tag == tag => {
                    self.take_clock(&m);
                    return Ok(m);
                }
                Ok(m) => {
                    self.file(m);
                    continue;
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
                        self.take_clock(&m);
                        return Ok(m);
                    }
                    self.file(m);
                }
                if !p2p {
                    self.health.break_for(src);
                }
                return Err(Error::PeerLost { rank: src, during });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    during,
                    after: self.cfg.timeout,
                    waiting_for: Some(src),
                });
            }
        }
    }
}

/// Copy a received message into a receive buffer, checking the length.
pub(crate) fn copy_in(mut buf: BufMut<'_>, m: &Msg) -> Result<()> {
    let n = m.payload.len();
    let want = buf.byte_len();
    let dst = buf
        .host_bytes_mut()
        .ok_or_else(|| Error::Unsupported("this backend only takes host buffers".into()))?;
    if n != want {
        return Err(Error::LengthMismatch {
            what: format!("recv from rank {}: message bytes vs buffer bytes", m.src),
            expected: want,
            got: n,
        });
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
    /// blocks until the worker replied, or until the job was dropped (worker gone) — in both cases the
    /// worker no longer touches the buffers, and every loan made from them was revoked or returned.
    pub fn exec(&self, c: crate::CollectiveRef<'_>) -> Result<()> {
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
        match rx.recv() {
            Ok(r) => r,
            Err(_) => Err(self.lost("this rank's worker stopped during a collective")),
        }
    }

    /// Start a non-blocking collective; receives are posted without blocking the worker.
    pub fn exec_async(&self, c: CollectiveOwned) -> Result<crate::Work<CollectiveOwned>> {
        let (tx, rx) = crossbeam::channel::bounded(1);
        if matches!(c, Collective::Recv { .. }) {
            self.submit(Box::new(move |e: &mut Engine| e.post_recv(c, tx)))?;
        } else {
            let mut c = c;
            self.submit(Box::new(move |e: &mut Engine| {
                let r = e.execute(c.views());
                let _ = tx.send(r.map(|_| c));
            }))?;
        }
        Ok(crate::Work::new(
            Box::new(crate::work::ChannelPending(rx)),
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
