//! The TCP backend: one process per rank, a full mesh of sockets, the engine's algorithms.
//!
//! What `ferroccl::init()` gives when a job is launched torchrun-style (`RANK`, `WORLD_SIZE`, ...) and
//! neither MPI nor NCCL applies — Gloo's role in torch.distributed. Workflow:
//!
//! 1. [`crate::rendezvous::EnvRendezvous`] connects every rank to the store on rank 0.
//! 2. Each rank listens on an ephemeral port (`FERROCCL_TCP_BIND`, default `0.0.0.0:0`) and publishes
//!    the address its peers should dial (`FERROCCL_TCP_ADDR`, default: the local address of the route
//!    to `MASTER_ADDR`).
//! 3. Rank i dials every rank j < i and accepts every j > i. The first bytes on each socket are a hello
//!    carrying the shared token and the dialer's rank; a wrong token or rank closes that socket.
//! 4. Per peer, a writer thread drains a channel of messages and a reader thread feeds the rank's inbox,
//!    so the same engine (`src/engine`) runs the collectives as in-process.
//!
//! Frames: `[magic "FCC1"][kind u8][seq u64][step/tag u32][len u64][payload]`, little-endian. A frame
//! with a bad magic, kind or oversize length ends that peer's connection: the peer counts as lost and
//! collectives waiting on it fail with `PeerLost`.

use crate::comm::{plan_split, CollectiveOwned, CollectiveRef};
use crate::engine::msg::{Aligned, Msg, Payload, Tag};
use crate::engine::{Engine, Health, Worker};
use crate::rendezvous::{StoreClient, StoreServer};
use crate::work::Work;
use crate::{Communicator, Config, Error, Result};
use crossbeam::channel::{unbounded, Receiver, Sender};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"FCC1";
const HELLO: &[u8; 4] = b"FCCH";
/// Largest payload accepted in one frame (1 TiB: a sanity bound against garbage, not a quota).
const MAX_FRAME: u64 = 1 << 40;

/// A rank's communicator over TCP.
pub struct TcpComm {
    rank: usize,
    size: usize,
    cfg: Config,
    worker: Worker,
    sockets: Vec<TcpStream>,
    io_threads: Vec<JoinHandle<()>>,
    bytes_sent: Arc<AtomicU64>,
    store: Arc<StoreClient>,
    _server: Arc<Option<StoreServer>>,
    prefix: String,
    splits: AtomicU64,
}

fn token_hello(token: &str, rank: usize) -> Vec<u8> {
    let mut v = HELLO.to_vec();
    v.extend_from_slice(&(rank as u32).to_le_bytes());
    v.extend_from_slice(&(token.len() as u32).to_le_bytes());
    v.extend_from_slice(token.as_bytes());
    v
}

fn read_hello(s: &mut TcpStream, token: &str, peer: &str) -> Result<usize> {
    let bad = |why: &str| Error::BadFrame {
        peer: peer.to_string(),
        why: why.to_string(),
    };
    let mut h = [0u8; 12];
    s.read_exact(&mut h)
        .map_err(|e| Error::io(format!("reading hello from {peer}"), e))?;
    if &h[..4] != HELLO {
        return Err(bad("not a ferroccl hello"));
    }
    let rank = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let tl = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if tl > 4096 {
        return Err(bad("token length over 4096"));
    }
    let mut t = vec![0u8; tl];
    s.read_exact(&mut t)
        .map_err(|e| Error::io(format!("reading hello from {peer}"), e))?;
    if !crate::rendezvous::frame::constant_time_eq(&t, token.as_bytes()) {
        return Err(Error::BadToken {
            addr: peer.to_string(),
        });
    }
    Ok(rank)
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

fn write_msg(w: &mut impl Write, m: &Msg) -> std::io::Result<()> {
    let (kind, seq, step) = match m.tag {
        Tag::Coll { seq, step } => (1u8, seq, step),
        Tag::P2p(t) => (2u8, 0, t),
    };
    let mut h = [0u8; 25];
    h[..4].copy_from_slice(MAGIC);
    h[4] = kind;
    h[5..13].copy_from_slice(&seq.to_le_bytes());
    h[13..17].copy_from_slice(&step.to_le_bytes());
    h[17..25].copy_from_slice(&(m.payload.len() as u64).to_le_bytes());
    w.write_all(&h)?;
    match &m.payload {
        Payload::Bytes(b) => w.write_all(b.as_bytes())?,
        Payload::Lent(l) => {
            l.with(|b| w.write_all(b))
                .unwrap_or(Err(std::io::Error::other("loan revoked")))?;
        }
    }
    Ok(())
}

fn read_msg(r: &mut impl Read, src: usize) -> std::result::Result<Msg, String> {
    let mut h = [0u8; 25];
    r.read_exact(&mut h).map_err(|e| format!("closed: {e}"))?;
    if &h[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let seq = u64::from_le_bytes(h[5..13].try_into().map_err(|_| "header")?);
    let step = u32::from_le_bytes(h[13..17].try_into().map_err(|_| "header")?);
    let len = u64::from_le_bytes(h[17..25].try_into().map_err(|_| "header")?);
    let tag = match h[4] {
        1 => Tag::Coll { seq, step },
        2 => Tag::P2p(step),
        k => return Err(format!("unknown frame kind {k}")),
    };
    if len > MAX_FRAME {
        return Err(format!("frame length {len} over the limit"));
    }
    let mut a = Aligned::zeroed(len as usize);
    r.read_exact(a.as_bytes_mut())
        .map_err(|e| format!("truncated frame: {e}"))?;
    Ok(Msg {
        src,
        tag,
        payload: Payload::Bytes(a),
        arrive: 0.0,
    })
}

impl TcpComm {
    /// Build the mesh for `rank` of `size` over `store`, with key `prefix` (unique per communicator).
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
        let bind = std::env::var("FERROCCL_TCP_BIND").unwrap_or_else(|_| "0.0.0.0:0".into());
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
        let me = format!("{}:{port}", advertised_ip(master)?);
        store.set(&format!("{prefix}/addr/{rank}"), me.as_bytes())?;
        let deadline = Instant::now() + cfg.timeout;
        let mut sockets: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        // dial lower ranks
        for (j, slot) in sockets.iter_mut().enumerate().take(rank) {
            let addr = String::from_utf8(store.get(&format!("{prefix}/addr/{j}"), cfg.timeout)?)
                .map_err(|_| Error::Rendezvous(format!("rank {j}'s address is not UTF-8")))?;
            let mut s = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("dialing rank {j} at {addr}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(Error::io(format!("dialing rank {j} at {addr}"), e)),
                }
            };
            s.write_all(&token_hello(token, rank))
                .map_err(|e| Error::io(format!("hello to rank {j}"), e))?;
            *slot = Some(s);
        }
        // accept higher ranks (ignoring strangers with a bad hello)
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("listener", e))?;
        let mut missing = size - rank - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| Error::io("socket", e))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| Error::io("socket", e))?;
                    match read_hello(&mut s, token, &peer.to_string()) {
                        Ok(j) if j > rank && j < size && sockets[j].is_none() => {
                            sockets[j] = Some(s);
                            missing -= 1;
                        }
                        Ok(j) => tracing::warn!(
                            "TCP transport: unexpected hello from rank {j} at {peer}; closed"
                        ),
                        Err(e) => {
                            tracing::warn!("TCP transport: rejected connection from {peer}: {e}")
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            during: "TCP transport: waiting for higher ranks to connect",
                            after: cfg.timeout,
                            waiting_for: sockets
                                .iter()
                                .enumerate()
                                .skip(rank + 1)
                                .find(|(_, s)| s.is_none())
                                .map(|(j, _)| j),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Error::io("accepting a peer", e)),
            }
        }
        let health = Health::new(size);
        let (inbox_tx, inbox) = unbounded::<Msg>();
        let mut peers = Vec::with_capacity(size);
        let mut io_threads = Vec::new();
        let mut kept = Vec::new();
        for (j, s) in sockets.into_iter().enumerate() {
            let Some(s) = s else {
                peers.push(inbox_tx.clone());
                continue;
            };
            s.set_read_timeout(None)
                .map_err(|e| Error::io("socket", e))?;
            s.set_nodelay(true).map_err(|e| Error::io("socket", e))?;
            let (tx, rx): (Sender<Msg>, Receiver<Msg>) = unbounded();
            peers.push(tx);
            let ws = s.try_clone().map_err(|e| Error::io("socket", e))?;
            let rs = s.try_clone().map_err(|e| Error::io("socket", e))?;
            kept.push(s);
            let h = health.clone();
            io_threads.push(
                std::thread::Builder::new()
                    .name(format!("ferroccl-tcp-w{j}"))
                    .spawn(move || {
                        let mut w = BufWriter::with_capacity(1 << 20, ws);
                        for m in rx.iter() {
                            if let Err(e) = write_msg(&mut w, &m).and_then(|_| {
                                if rx.is_empty() {
                                    w.flush()
                                } else {
                                    Ok(())
                                }
                            }) {
                                tracing::warn!("TCP transport: writing to rank {j}: {e}");
                                h.gone[j].store(true, Ordering::Release);
                                return;
                            }
                        }
                        let _ = w.flush();
                        let _ = w.get_ref().shutdown(Shutdown::Write);
                    })
                    .map_err(|e| Error::io("spawning a writer", e))?,
            );
            let h = health.clone();
            let itx = inbox_tx.clone();
            io_threads.push(
                std::thread::Builder::new()
                    .name(format!("ferroccl-tcp-r{j}"))
                    .spawn(move || {
                        let mut r = BufReader::with_capacity(1 << 20, rs);
                        loop {
                            match read_msg(&mut r, j) {
                                Ok(m) => {
                                    if itx.send(m).is_err() {
                                        break;
                                    }
                                }
                                Err(e) => {
                                    if !e.starts_with("closed") {
                                        tracing::warn!(
                                            "TCP transport: malformed frame from rank {j}: {e}"
                                        );
                                    }
                                    break;
                                }
                            }
                        }
                        h.gone[j].store(true, Ordering::Release);
                    })
                    .map_err(|e| Error::io("spawning a reader", e))?,
            );
        }
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let engine = Engine::new(
            rank,
            size,
            peers,
            inbox,
            health,
            None,
            cfg.clone(),
            bytes_sent.clone(),
            true,
        );
        let worker = Worker::spawn(engine, format!("ferroccl-tcp-{rank}"))?;
        Ok(TcpComm {
            rank,
            size,
            cfg,
            worker,
            sockets: kept,
            io_threads,
            bytes_sent,
            store,
            _server: server,
            prefix: prefix.to_string(),
            splits: AtomicU64::new(0),
        })
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn exec(&self, c: CollectiveRef<'_>) -> Result<()> {
        self.worker.exec(c)
    }
    fn exec_async(&self, c: CollectiveOwned) -> Result<Work<CollectiveOwned>> {
        self.worker.exec_async(c)
    }
    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
        let no = self.splits.fetch_add(1, Ordering::Relaxed);
        let Some(plan) = plan_split(self, color, key)? else {
            return Ok(None);
        };
        let token = std::env::var("FERROCCL_TOKEN").unwrap_or_default();
        let master = self.store.addr().to_string();
        let c = TcpComm::connect(
            self.store.clone(),
            self._server.clone(),
            &master,
            &format!("{}/split{no}/c{}", self.prefix, plan.color),
            plan.new_rank,
            plan.size,
            &token,
            self.cfg.clone(),
        )?;
        Ok(Some(Box::new(c)))
    }
    fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        self.worker.stop(); // the engine (and the writers' channels) drop here: writers flush and exit
                            // wait for peers to finish with us, bounded: once everyone is done the readers see EOF
        let _ = self.store.barrier(
            &format!("{}/close", self.prefix),
            self.size,
            Duration::from_secs(10).min(self.cfg.timeout),
        );
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.io_threads.drain(..) {
            let _ = t.join();
        }
    }
}
