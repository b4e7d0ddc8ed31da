//! The TCP backend: one process per rank, a full mesh of sockets, the engine's algorithms.
//!
//! What `ferroccl::init()` gives when a job is launched torchrun-style (`RANK`, `WORLD_SIZE`, ...) and
//! neither MPI nor NCCL applies — Gloo's role in torch.distributed. Workflow:
//!
//! 1. [`crate::rendezvous::EnvRendezvous`] connects every rank to the store on rank 0.
//! 2. Each rank listens on an ephemeral port (`FERROCCL_TCP_BIND`, default `0.0.0.0:0`; without a
//!    `FERROCCL_TOKEN`, only the advertised address below, i.e. loopback on one machine) and publishes
//!    the address its peers should dial (`FERROCCL_TCP_ADDR`, default: the local address of the route
//!    to `MASTER_ADDR`).
//! 3. Rank i dials every rank j < i and accepts every j > i. The first bytes on each socket are a hello
//!    `["FCCH"][rank u32][token length u32][token]` carrying the shared token and the dialer's rank; a
//!    wrong token or rank closes that socket. Hellos are read without blocking from every accepted
//!    socket at once, each with its own deadline, so a stranger on the port (garbage, a wrong token,
//!    silence, a trickle) is closed on its own and never holds up the real peers. The whole setup is
//!    bounded by `Config::timeout`.
//! 4. Per peer, a writer thread drains a channel of messages and a reader thread feeds the rank's inbox,
//!    so the same engine (`src/engine`) runs the collectives as in-process.
//!
//! Frames: `[magic "FCC1"][kind u8][seq u64][step/tag u32][len u64][payload]`, little-endian. A frame
//! with a bad magic, kind or oversize length ends that peer's connection: the peer counts as lost and
//! collectives waiting on it fail with `PeerLost`. The reader grows a frame's buffer as its payload
//! arrives (past a first 16 MiB), so a garbage length cannot make it allocate more than that plus
//! twice what was really sent.
//!
//! Large blocks reach the writer as loans of the caller's memory (no copy into a message). The writer
//! copies a loan into its socket buffer piece by piece under the loan's lock and writes to the socket
//! with no lock held, and every mesh socket has a write timeout of `Config::timeout`: a peer that stops
//! reading makes the collective time out (the caller's loan is revoked at once) and then its
//! connection fail, so that peer counts as lost; dropping the communicator stays bounded.

use crate::comm::plan_split;
use crate::engine::health::Ctl;
use crate::engine::msg::{Aligned, Lend, Msg, Payload, Sig, Tag};
use crate::engine::{Engine, Health, Worker};
use crate::rendezvous::frame::{constant_time_eq, MAX_TOKEN_LEN};
use crate::rendezvous::{StoreClient, StoreServer};
use crate::{Communicator, Config, Error, Result};
use crossbeam::channel::{unbounded, Receiver, Sender};
use std::collections::VecDeque;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"FCC1";
const HELLO: &[u8; 4] = b"FCCH";
/// Bytes of a hello before the token: magic, rank, token length.
const HELLO_HEADER: usize = 12;
/// Bytes of a frame header: magic, kind, seq, step/tag, length, the collective's signature.
const FRAME_HEADER: usize = 25 + Sig::WIRE;
const KIND_COLL: u8 = 1;
const KIND_P2P: u8 = 2;
/// A control frame (`engine::health::Ctl`): lost peer, mismatch, goodbye, progress probe/report.
const KIND_CTL: u8 = 3;
/// Largest control frame payload (a mismatch carries two call descriptions).
const MAX_CTL: u64 = 64 << 10;
/// Largest payload accepted in one frame (1 TiB: a sanity bound against garbage, not a quota; the
/// reader allocates as bytes arrive, never the declared length up front).
const MAX_FRAME: u64 = 1 << 40;
/// A frame's payload buffer starts at most this large (one zeroed allocation, as cheap as sizing it
/// from the header for typical blocks) and beyond it doubles as bytes arrive, so a garbage length
/// costs at most this much plus twice what the peer really sent.
const FIRST_PIECE: usize = 16 << 20;
/// The writer's buffer in front of the socket; lent payloads are copied into it piece by piece.
const WRITE_BUF: usize = 1 << 20;
/// How long an accepted connection may take to deliver its hello (bounded by the setup deadline).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections with an incomplete hello kept at once during setup; past it the oldest is closed, so
/// a flood of strangers costs bounded memory and descriptors.
const MAX_PENDING_HELLOS: usize = 256;
/// One connect attempt to a peer's transport port (retried until the setup deadline).
const DIAL_ATTEMPT: Duration = Duration::from_secs(5);
/// How long a broken or timed-out communicator's drop lets its writers flush what is left.
const BROKEN_FLUSH: Duration = Duration::from_secs(1);
/// How long a healthy communicator's drop waits for its peers to reach theirs.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// A rank's communicator over TCP.
pub struct TcpComm {
    rank: usize,
    size: usize,
    cfg: Config,
    worker: Worker,
    health: Arc<Health>,
    sockets: Vec<TcpStream>,
    io_threads: Vec<JoinHandle<()>>,
    traffic: Arc<crate::stats::Traffic>,
    store: Arc<StoreClient>,
    _server: Arc<Option<StoreServer>>,
    prefix: String,
    /// The token this communicator's mesh was built with; [`Communicator::split`] reuses it.
    token: String,
    splits: AtomicU64,
}

fn token_hello(token: &str, rank: usize) -> Vec<u8> {
    let mut v = HELLO.to_vec();
    v.extend_from_slice(&(rank as u32).to_le_bytes());
    v.extend_from_slice(&(token.len() as u32).to_le_bytes());
    v.extend_from_slice(token.as_bytes());
    v
}

/// An accepted connection whose hello has not fully arrived. Hellos are read without blocking, a
/// few bytes at a time, from every such connection in turn, so a silent or trickling stranger only
/// holds its own slot (until its deadline) and never delays the real peers.
struct Pending {
    s: TcpStream,
    peer: SocketAddr,
    got: Vec<u8>,
    /// Hello bytes expected in total: the header, then header + token once the header is in.
    need: usize,
    header_done: bool,
    deadline: Instant,
}

enum HelloState {
    /// More bytes are needed.
    Incomplete,
    /// A complete hello with the right token, claiming this rank.
    Done(usize),
    /// Not a valid hello; why.
    Rejected(String),
}

impl Pending {
    fn new(s: TcpStream, peer: SocketAddr, deadline: Instant) -> Pending {
        Pending {
            s,
            peer,
            got: Vec::new(),
            need: HELLO_HEADER,
            header_done: false,
            deadline,
        }
    }

    /// Read what has arrived (never more than the hello: frames may follow it at once).
    fn advance(&mut self, token: &[u8]) -> HelloState {
        let mut tmp = [0u8; 1024];
        loop {
            if self.got.len() == self.need {
                if !self.header_done {
                    let tl =
                        u32::from_le_bytes([self.got[8], self.got[9], self.got[10], self.got[11]])
                            as usize;
                    if tl > MAX_TOKEN_LEN {
                        return HelloState::Rejected(format!(
                            "hello declares a {tl}-byte token (at most {MAX_TOKEN_LEN})"
                        ));
                    }
                    self.header_done = true;
                    self.need = HELLO_HEADER + tl;
                    continue;
                }
                if !constant_time_eq(&self.got[HELLO_HEADER..], token) {
                    return HelloState::Rejected(
                        "wrong token (its FERROCCL_TOKEN differs from this job's)".into(),
                    );
                }
                let r = u32::from_le_bytes([self.got[4], self.got[5], self.got[6], self.got[7]]);
                return HelloState::Done(r as usize);
            }
            let want = (self.need - self.got.len()).min(tmp.len());
            match self.s.read(&mut tmp[..want]) {
                Ok(0) => {
                    return HelloState::Rejected(format!(
                        "closed after {} bytes, before its hello was complete",
                        self.got.len()
                    ))
                }
                Ok(n) => {
                    self.got.extend_from_slice(&tmp[..n]);
                    let k = self.got.len().min(HELLO.len());
                    if self.got[..k] != HELLO[..k] {
                        return HelloState::Rejected("not a ferroccl hello".into());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return HelloState::Incomplete,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return HelloState::Rejected(format!("socket error: {e}")),
            }
        }
    }
}

fn advertised_ip(master: &str) -> Result<String> {
    if let Ok(a) = std::env::var("FERROCCL_TCP_ADDR") {
        return Ok(a);
    }
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| Error::io("finding the local address", e))?;
    s.connect(master).map_err(|e| {
        Error::io(
            format!("finding the route to MASTER_ADDR {master} (set FERROCCL_TCP_ADDR)"),
            e,
        )
    })?;
    Ok(s.local_addr()
        .map_err(|e| Error::io("finding the local address", e))?
        .ip()
        .to_string())
}

/// `ip:port`, bracketing IPv6 addresses.
fn join_ip_port(ip: &str, port: u16) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Dial `addr` (rank `j`'s transport port) until it answers or `deadline` passes: the peer may not
/// listen yet, and every attempt is bounded by what is left of the deadline.
fn dial(addr: &str, j: usize, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
    let mut last: Option<std::io::Error> = None;
    loop {
        match addr.to_socket_addrs() {
            Ok(addrs) => {
                for sa in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&sa, left.min(DIAL_ATTEMPT)) {
                        Ok(s) => return Ok(s),
                        Err(e) => {
                            tracing::debug!("dialing rank {j} at {sa}: {e}; retrying");
                            last = Some(e);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!("resolving rank {j}'s address {addr}: {e}; retrying");
                last = Some(e);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(match last {
                Some(e) => Error::io(
                    format!(
                        "dialing rank {j} at {addr}: no connection within FERROCCL_TIMEOUT ({timeout:?}); is that rank running and its port reachable?"
                    ),
                    e,
                ),
                None => Error::Timeout {
                    during: "TCP transport: dialing a lower rank",
                    after: timeout,
                    waiting_for: Some(j),
                },
            });
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Accept the hellos of ranks `rank+1..size` into `sockets`, until all arrived or `deadline`.
///
/// Every accepted connection gets its own hello deadline ([`HELLO_TIMEOUT`], within the overall
/// one) and hellos are read without blocking, so strangers (a wrong token, garbage, silence, a
/// trickle of bytes) are closed on their own schedule while the real peers keep arriving.
fn accept_higher(
    listener: &TcpListener,
    rank: usize,
    size: usize,
    token: &str,
    deadline: Instant,
    timeout: Duration,
    sockets: &mut [Option<TcpStream>],
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("TCP transport: configuring the listener", e))?;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    while let Some(first_missing) = (rank + 1..size).find(|&j| sockets[j].is_none()) {
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                during: "TCP transport: waiting for higher ranks to connect",
                after: timeout,
                waiting_for: Some(first_missing),
            });
        }
        let mut busy = false;
        loop {
            match listener.accept() {
                Ok((s, peer)) => {
                    busy = true;
                    if let Err(e) = s.set_nonblocking(true) {
                        tracing::warn!("TCP transport: connection from {peer}: {e}; closed");
                        continue;
                    }
                    if pending.len() >= MAX_PENDING_HELLOS {
                        if let Some(old) = pending.pop_front() {
                            tracing::warn!(
                                "TCP transport: {MAX_PENDING_HELLOS} connections without a complete hello; closed the oldest, from {}",
                                old.peer
                            );
                        }
                    }
                    pending.push_back(Pending::new(s, peer, (now + HELLO_TIMEOUT).min(deadline)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of descriptors or a connection reset before accept: not fatal,
                    // the real peers can still arrive.
                    tracing::warn!("TCP transport: accepting a connection: {e}");
                    break;
                }
            }
        }
        let mut i = 0;
        while i < pending.len() {
            match pending[i].advance(token.as_bytes()) {
                HelloState::Incomplete if now < pending[i].deadline => i += 1,
                HelloState::Incomplete => {
                    if let Some(p) = pending.remove(i) {
                        tracing::warn!(
                            "TCP transport: no complete hello from {} within {HELLO_TIMEOUT:?}; closed",
                            p.peer
                        );
                    }
                }
                HelloState::Done(j) => {
                    busy = true;
                    let Some(p) = pending.remove(i) else { break };
                    if j > rank && j < size && sockets[j].is_none() {
                        p.s.set_nonblocking(false).map_err(|e| {
                            Error::io(format!("TCP transport: rank {j}'s socket"), e)
                        })?;
                        sockets[j] = Some(p.s);
                    } else {
                        tracing::warn!(
                            "TCP transport: unexpected hello from rank {j} at {} (this is rank {rank} of {size}, accepting ranks above it once each); closed",
                            p.peer
                        );
                    }
                }
                HelloState::Rejected(why) => {
                    busy = true;
                    if let Some(p) = pending.remove(i) {
                        tracing::warn!("TCP transport: rejected connection from {}: {why}", p.peer);
                    }
                }
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

fn revoked() -> std::io::Error {
    std::io::Error::other(
        "the sender revoked its loan (it gave up on the collective); the frame cannot be completed",
    )
}

/// The writer thread's side of a socket: a buffer of up to [`WRITE_BUF`] bytes in front of it.
///
/// A lent payload is copied into the buffer one piece at a time, each piece under the loan's lock,
/// and the buffer goes to the socket with no lock held. A peer that stops reading therefore blocks
/// only this thread, in a socket write bounded by the write timeout, and never the lender: its
/// timeout can revoke the loan at once (the next piece then finds it gone and the connection,
/// holding a partial frame, is closed).
struct FrameWriter {
    s: TcpStream,
    buf: Vec<u8>,
}

impl FrameWriter {
    fn new(s: TcpStream) -> FrameWriter {
        FrameWriter {
            s,
            buf: Vec::with_capacity(WRITE_BUF),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.s.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + b.len() > WRITE_BUF {
            self.flush()?;
        }
        if b.len() >= WRITE_BUF {
            return self.s.write_all(b);
        }
        self.buf.extend_from_slice(b);
        Ok(())
    }

    fn put_lent(&mut self, l: &Lend, len: usize) -> std::io::Result<()> {
        let mut off = 0;
        while off < len {
            if self.buf.len() >= WRITE_BUF {
                self.flush()?;
            }
            let n = (WRITE_BUF - self.buf.len()).min(len - off);
            let buf = &mut self.buf;
            // Within capacity: a memcpy, no allocation and no I/O under the lock.
            l.with_part(off, n, |b| buf.extend_from_slice(b))
                .ok_or_else(revoked)?;
            off += n;
        }
        // Everything is copied: the lender may reuse its memory before the bytes hit the wire.
        l.ack();
        Ok(())
    }

    fn write_msg(&mut self, m: &Msg) -> std::io::Result<()> {
        let (kind, seq, step) = match m.tag {
            Tag::Coll { seq, step } => (KIND_COLL, seq, step),
            Tag::P2p(t) => (KIND_P2P, 0, t),
            Tag::Ctl => (KIND_CTL, 0, 0),
        };
        let len = match &m.payload {
            Payload::Bytes(b) => b.as_bytes().len(),
            Payload::Lent(l) => l.live_len().ok_or_else(revoked)?,
        };
        let mut h = [0u8; FRAME_HEADER];
        h[..4].copy_from_slice(MAGIC);
        h[4] = kind;
        h[5..13].copy_from_slice(&seq.to_le_bytes());
        h[13..17].copy_from_slice(&step.to_le_bytes());
        h[17..25].copy_from_slice(&(len as u64).to_le_bytes());
        h[25..].copy_from_slice(&m.sig.to_wire());
        self.put(&h)?;
        match &m.payload {
            Payload::Bytes(b) => self.put(b.as_bytes()),
            Payload::Lent(l) => self.put_lent(l, len),
        }
    }
}

/// Pump `rx` into the socket to rank `j`. On any failure (a write timeout: the peer stopped reading;
/// a reset; a revoked loan mid-frame) the connection is shut down and rank `j` counts as lost.
fn writer_loop(
    s: TcpStream,
    rx: Receiver<Msg>,
    (me, j): (usize, usize),
    health: Arc<Health>,
    timeout: Duration,
) {
    let mut w = FrameWriter::new(s);
    for m in rx.iter() {
        let r = w
            .write_msg(&m)
            .and_then(|()| if rx.is_empty() { w.flush() } else { Ok(()) });
        if let Err(e) = r {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                tracing::warn!(
                    "TCP transport: rank {j} read nothing for {timeout:?} (FERROCCL_TIMEOUT); closing the connection, rank {j} counts as lost"
                );
            } else {
                tracing::warn!(
                    "TCP transport: writing to rank {j}: {e}; closing the connection, rank {j} counts as lost"
                );
            }
            health.gone[j].store(true, Ordering::Release);
            health.break_for(j);
            let _ = w.s.shutdown(Shutdown::Both);
            return;
        }
    }
    // The engine is gone: deliver what is buffered and a goodbye (a clean close: how far this rank
    // got, so the peer knows it will join no later collective), then tell the peer we are done.
    if let Some(why) = health.broken_ctl() {
        let _ = w.write_msg(&why.msg(me));
    }
    let bye = Ctl::Bye {
        entered: health.entered[me].load(Ordering::Acquire),
        completed: health.completed[me].load(Ordering::Acquire),
    };
    let _ = w.write_msg(&bye.msg(me));
    let _ = w.flush();
    let _ = w.s.shutdown(Shutdown::Write);
}

/// Why a reader stopped.
enum ReadEnd {
    /// The peer closed (or reset) the connection between frames.
    Closed(String),
    /// A malformed or truncated frame.
    Bad(String),
}

fn read_msg(r: &mut impl Read, src: usize) -> std::result::Result<Msg, ReadEnd> {
    let mut h = [0u8; FRAME_HEADER];
    let mut got = 0;
    while got < FRAME_HEADER {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(ReadEnd::Closed("end of stream".into())),
            Ok(0) => {
                return Err(ReadEnd::Bad(format!(
                    "closed after {got} of {FRAME_HEADER} header bytes"
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if got == 0 => return Err(ReadEnd::Closed(e.to_string())),
            Err(e) => return Err(ReadEnd::Bad(format!("reading a frame header: {e}"))),
        }
    }
    if &h[..4] != MAGIC {
        return Err(ReadEnd::Bad("bad magic (not a ferroccl frame)".into()));
    }
    let word = |a: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[a..a + 8]);
        u64::from_le_bytes(b)
    };
    let seq = word(5);
    let step = u32::from_le_bytes([h[13], h[14], h[15], h[16]]);
    let len = word(17);
    let tag = match h[4] {
        KIND_COLL => Tag::Coll { seq, step },
        KIND_P2P => Tag::P2p(step),
        KIND_CTL if len <= MAX_CTL => Tag::Ctl,
        KIND_CTL => {
            return Err(ReadEnd::Bad(format!(
                "control frame of {len} bytes (at most {MAX_CTL})"
            )))
        }
        k => return Err(ReadEnd::Bad(format!("unknown frame kind {k}"))),
    };
    if len > MAX_FRAME {
        return Err(ReadEnd::Bad(format!(
            "frame length {len} over the {MAX_FRAME}-byte limit"
        )));
    }
    let len = usize::try_from(len).map_err(|_| {
        ReadEnd::Bad(format!(
            "frame length {len} does not fit this machine's address space"
        ))
    })?;
    // Grow the buffer as the payload arrives instead of trusting the declared length.
    let mut a = Aligned::zeroed(len.min(FIRST_PIECE));
    let mut got = 0;
    while got < len {
        let end = len.min(got.saturating_mul(2)).max(a.as_bytes().len());
        a.try_resize(end).map_err(|e| {
            ReadEnd::Bad(format!(
                "cannot allocate {end} bytes for a {len}-byte frame: {e}"
            ))
        })?;
        r.read_exact(&mut a.as_bytes_mut()[got..end]).map_err(|e| {
            ReadEnd::Bad(format!(
                "truncated frame: fewer than {end} of {len} payload bytes arrived ({e})"
            ))
        })?;
        got = end;
    }
    let mut sig = [0u8; Sig::WIRE];
    sig.copy_from_slice(&h[25..]);
    Ok(Msg {
        src,
        tag,
        payload: Payload::Bytes(a),
        arrive: 0.0,
        sig: Sig::from_wire(&sig),
    })
}

/// Feed frames from rank `j` into the rank's inbox until the connection ends; then rank `j` is gone.
fn reader_loop(s: TcpStream, j: usize, inbox: Sender<Msg>, health: Arc<Health>) {
    let mut r = BufReader::with_capacity(1 << 20, s);
    // Once the engine is gone, frames are read and dropped until the peer closes, so our socket is
    // never closed with unread input (which would reset the connection under the peer's last reads).
    let mut engine_gone = false;
    let clean = loop {
        match read_msg(&mut r, j) {
            Ok(m) if m.tag == Tag::Ctl => match m.payload.with(j, Ctl::decode) {
                Ok(Ok(c)) => health.on_ctl(j, c),
                Ok(Err(why)) | Err(Error::InvalidArgument(why)) => {
                    tracing::warn!("TCP transport: rank {j} sent a bad control frame: {why}");
                }
                Err(_) => {}
            },
            Ok(m) => {
                if !engine_gone && inbox.send(m).is_err() {
                    engine_gone = true;
                }
            }
            Err(ReadEnd::Closed(why)) => {
                tracing::debug!("TCP transport: rank {j} closed the connection ({why})");
                break health.bye[j].load(Ordering::Acquire);
            }
            Err(ReadEnd::Bad(why)) => {
                tracing::warn!(
                    "TCP transport: malformed frame from rank {j}: {why}; closing the connection, rank {j} counts as lost"
                );
                // Nothing after garbage can be trusted; the shutdown also ends our writer to it.
                let _ = r.get_ref().shutdown(Shutdown::Both);
                break false;
            }
        }
    };
    health.gone[j].store(true, Ordering::Release);
    if !clean {
        // Closed without a goodbye (killed, crashed, or its connection failed): rank j is lost, and
        // every peer hears it from us at once (issue 19).
        health.break_for(j);
    }
}

impl TcpComm {
    /// Build the mesh for `rank` of `size` over `store`, with key `prefix` (unique per communicator).
    ///
    /// Every step (publishing the address, waiting for the lower ranks' addresses, dialing them,
    /// accepting the higher ranks) runs against one deadline, `cfg.timeout` from now. `token` must
    /// be the same on every rank; it is at most [`MAX_TOKEN_LEN`] bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        store: Arc<StoreClient>,
        server: Arc<Option<StoreServer>>,
        master: &str,
        prefix: &str,
        rank: usize,
        size: usize,
        token: &str,
        cfg: Config,
    ) -> Result<TcpComm> {
        if size == 0 {
            return Err(Error::InvalidArgument(
                "TcpComm::connect with world size 0: a communicator needs at least one rank".into(),
            ));
        }
        if rank >= size {
            return Err(Error::RankOutOfRange {
                what: "TcpComm::connect rank",
                rank,
                world: size,
            });
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::InvalidArgument(format!(
                "the token (FERROCCL_TOKEN) is {} bytes; at most {MAX_TOKEN_LEN} are allowed",
                token.len()
            )));
        }
        let deadline = crate::config::deadline_after(cfg.timeout);
        let left = |j: usize| {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() {
                Err(Error::Timeout {
                    during: "TCP transport: building the mesh",
                    after: cfg.timeout,
                    waiting_for: Some(j),
                })
            } else {
                Ok(d)
            }
        };
        let ip = advertised_ip(master)?;
        // Without a token, listen only where the peers dial (loopback for a one-machine job), not
        // on every interface (issue 19); FERROCCL_TCP_BIND overrides either way.
        let bind = std::env::var("FERROCCL_TCP_BIND").unwrap_or_else(|_| {
            if token.is_empty() {
                join_ip_port(&ip, 0)
            } else {
                "0.0.0.0:0".into()
            }
        });
        let listener = TcpListener::bind(&bind).map_err(|e| {
            Error::io(
                format!("binding the TCP transport on {bind} (FERROCCL_TCP_BIND)"),
                e,
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))?
            .port();
        let me = join_ip_port(&ip, port);
        store.set(&format!("{prefix}/addr/{rank}"), me.as_bytes())?;
        let mut sockets: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        // dial lower ranks
        for (j, slot) in sockets.iter_mut().enumerate().take(rank) {
            let addr = match store.get(&format!("{prefix}/addr/{j}"), left(j)?) {
                Ok(a) => a,
                Err(Error::Timeout { .. }) => {
                    return Err(Error::Timeout {
                        during: "TCP transport: waiting for a lower rank to publish its address",
                        after: cfg.timeout,
                        waiting_for: Some(j),
                    })
                }
                Err(e) => return Err(e),
            };
            let addr = String::from_utf8(addr)
                .map_err(|_| Error::Rendezvous(format!("rank {j}'s address is not UTF-8")))?;
            let mut s = dial(&addr, j, deadline, cfg.timeout)?;
            s.set_write_timeout(Some(left(j)?))
                .and_then(|()| s.write_all(&token_hello(token, rank)))
                .map_err(|e| Error::io(format!("hello to rank {j} at {addr}"), e))?;
            *slot = Some(s);
        }
        // accept higher ranks (strangers are closed without holding up the real peers)
        accept_higher(
            &listener,
            rank,
            size,
            token,
            deadline,
            cfg.timeout,
            &mut sockets,
        )?;
        drop(listener);
        // A stuck write (a peer that stopped reading) errors out after the timeout instead of
        // blocking its writer forever; zero would mean "no timeout" to the OS, hence the floor.
        let write_timeout = cfg.timeout.max(Duration::from_millis(1));
        let mut streams = Vec::with_capacity(size);
        for (j, s) in sockets.into_iter().enumerate() {
            let Some(s) = s else { continue };
            s.set_read_timeout(None)
                .and_then(|()| s.set_write_timeout(Some(write_timeout)))
                .and_then(|()| s.set_nodelay(true))
                .map_err(|e| {
                    Error::io(format!("TCP transport: configuring rank {j}'s socket"), e)
                })?;
            streams.push((j, s));
        }
        let health = Health::new(size);
        let (inbox_tx, inbox) = unbounded::<Msg>();
        let mut peers: Vec<Sender<Msg>> = (0..size).map(|_| inbox_tx.clone()).collect();
        let mut io_threads = Vec::new();
        let mut kept: Vec<TcpStream> = Vec::new();
        // If anything below fails, the threads already started must not outlive the attempt.
        let fail = |kept: &[TcpStream], e: Error| {
            for s in kept {
                let _ = s.shutdown(Shutdown::Both);
            }
            e
        };
        for (j, s) in streams {
            let clones = s.try_clone().and_then(|w| Ok((w, s.try_clone()?)));
            kept.push(s);
            let (ws, rs) = clones.map_err(|e| fail(&kept, Error::io("socket", e)))?;
            let (tx, rx): (Sender<Msg>, Receiver<Msg>) = unbounded();
            peers[j] = tx;
            let (h, t) = (health.clone(), cfg.timeout);
            let w = std::thread::Builder::new()
                .name(format!("ferroccl-tcp-w{j}"))
                .spawn(move || writer_loop(ws, rx, (rank, j), h, t))
                .map_err(|e| fail(&kept, Error::io("spawning a writer", e)))?;
            io_threads.push(w);
            let (h, itx) = (health.clone(), inbox_tx.clone());
            let r = std::thread::Builder::new()
                .name(format!("ferroccl-tcp-r{j}"))
                .spawn(move || reader_loop(rs, j, itx, h))
                .map_err(|e| fail(&kept, Error::io("spawning a reader", e)))?;
            io_threads.push(r);
        }
        drop(inbox_tx);
        // Control frames (a lost peer, a mismatch, progress probes) go straight to the writers.
        health.set_links(
            rank,
            (0..size)
                .filter(|&j| j != rank)
                .map(|j| (j, peers[j].clone()))
                .collect(),
        );
        let traffic = Arc::new(crate::stats::Traffic::new());
        let engine = Engine::new(
            rank,
            size,
            peers,
            inbox,
            health.clone(),
            None,
            cfg.clone(),
            traffic.clone(),
            true,
        );
        let worker =
            Worker::spawn(engine, format!("ferroccl-tcp-{rank}")).map_err(|e| fail(&kept, e))?;
        Ok(TcpComm {
            rank,
            size,
            cfg,
            worker,
            health,
            sockets: kept,
            io_threads,
            traffic,
            store,
            _server: server,
            prefix: prefix.to_string(),
            token: token.to_string(),
            splits: AtomicU64::new(0),
        })
    }
}

impl Communicator for TcpComm {
    crate::engine::engine_communicator!("tcp");

    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
        let no = self.splits.fetch_add(1, Ordering::Relaxed);
        let Some(plan) = plan_split(self, color, key)? else {
            return Ok(None);
        };
        let master = self.store.addr().to_string();
        let c = TcpComm::connect(
            self.store.clone(),
            self._server.clone(),
            &master,
            &format!("{}/split{no}/c{}", self.prefix, plan.color),
            plan.new_rank,
            plan.size,
            &self.token,
            self.cfg.clone(),
        )?;
        Ok(Some(Box::new(c)))
    }
    fn local_rank(&self) -> usize {
        // torchrun's LOCAL_RANK (a process property, the same for sub-communicators); without
        // it the launch is taken as single-host, where the rank is the local rank
        match std::env::var("LOCAL_RANK")
            .ok()
            .map(|v| v.trim().parse::<usize>())
        {
            Some(Ok(r)) => r,
            _ => self.rank,
        }
    }
}

impl Drop for TcpComm {
    /// Bounded: the worker finishes what is queued, for at most one timeout (after that a watchdog
    /// shuts the sockets down, every peer counts as lost and the rest of the queue fails at once);
    /// the writers then deliver what is left and a goodbye. A healthy communicator waits up to 10 s
    /// (or the timeout, if shorter) for its peers to reach their drop, so nobody closes a socket a
    /// peer still reads from; after a timeout or a lost peer it waits only for its writers to
    /// flush what is left (at most 1 s), not for the peers (issue 19). Then every
    /// socket is shut down, which also wakes a writer blocked on a peer that stopped reading, and
    /// the I/O threads are joined.
    fn drop(&mut self) {
        let watchdog = self.watchdog();
        // The engine (and the writers' channels) drop here: writers flush what is queued and exit.
        self.worker.stop();
        if let Some((done, t)) = watchdog {
            drop(done);
            let _ = t.join();
        }
        self.health.clear_links();
        // A broken (or timed-out) communicator runs no more collectives: arrive at the barrier (so
        // healthy peers are not kept waiting for us) but do not wait for anyone.
        let healthy =
            self.health.check("closing").is_ok() && !self.health.timed_out.load(Ordering::Acquire);
        if !healthy {
            let until = Instant::now() + BROKEN_FLUSH;
            // writers are the even entries (each peer's writer, then its reader)
            while Instant::now() < until
                && !self
                    .io_threads
                    .iter()
                    .step_by(2)
                    .all(JoinHandle::is_finished)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let wait = if healthy {
            CLOSE_WAIT.min(self.cfg.timeout)
        } else {
            Duration::ZERO
        };
        let _ = self
            .store
            .barrier(&format!("{}/close", self.prefix), self.size, wait);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.io_threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl TcpComm {
    /// A thread that shuts the sockets down unless the returned sender is dropped within the
    /// timeout (`None` if it cannot be started: drop is then bounded by the queued jobs' timeouts).
    fn watchdog(&self) -> Option<(Sender<()>, JoinHandle<()>)> {
        let socks = self
            .sockets
            .iter()
            .map(TcpStream::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .ok()?;
        let (done, wait) = crossbeam::channel::bounded::<()>(0);
        let (timeout, rank) = (self.cfg.timeout, self.rank);
        let t = std::thread::Builder::new()
            .name(format!("ferroccl-tcp-close{rank}"))
            .spawn(move || {
                if let Err(crossbeam::channel::RecvTimeoutError::Timeout) =
                    wait.recv_timeout(timeout)
                {
                    tracing::warn!(
                        "TCP transport: rank {rank}'s queued operations did not finish within {timeout:?} of dropping the communicator; closing its connections"
                    );
                    for s in &socks {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            })
            .ok()?;
        Some((done, t))
    }
}
