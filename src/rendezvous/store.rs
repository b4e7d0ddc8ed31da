//! The TCP key/value store: [`StoreServer`] (hosted by rank 0) and [`StoreClient`] (one per rank).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::frame::{
    self, ReadError, Request, Response, HEADER_LEN, MAX_PAYLOAD, MAX_TOKEN_LEN, READ_PIECE,
    WAIT_FOREVER_MS,
};
use crate::{Error, Result};

/// How long a new connection may take to send its AUTH frame before the server drops it: short,
/// because a real client sends AUTH the moment it connects, and every second a silent socket is kept
/// is a second it holds a slot of [`StoreLimits::max_unauthenticated`].
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Default [`StoreLimits::max_unauthenticated`].
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 256;
/// Default [`StoreLimits::max_inflight_bytes`] (128 MiB: two frames of the largest size at once).
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 128 << 20;
/// New connections taken per turn of the accept loop before the pending AUTH frames are read, so a
/// flood of connections cannot keep the server from reading the AUTH of a real client.
const ACCEPT_BATCH: usize = 32;
/// Frames up to this size (every ordinary rendezvous request) need no reservation of in-flight
/// memory, so a full budget never blocks the ranks' own small requests; the bound on partial frames
/// is therefore `max_inflight_bytes + max_connections × SMALL_FRAME`.
const SMALL_FRAME: usize = READ_PIECE;
/// Rejected connections kept at once while their final ERROR frame drains (see [`Closing`]).
const MAX_CLOSING: usize = 256;
/// Default [`StoreLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`StoreLimits::max_keys`].
pub const DEFAULT_MAX_KEYS: usize = 1 << 20;
/// Default [`StoreLimits::max_bytes`] (256 MiB).
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;
/// Once the first byte of a frame arrived, the rest must follow within this time.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Granularity at which server threads notice shutdown (and a waiting GET a vanished client).
const POLL: Duration = Duration::from_millis(50);
/// Server-side write timeout, so a peer that stops reading cannot pin a thread.
const SERVER_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Smallest client reply bound (a zero socket timeout would mean "none" to the OS).
const MIN_REPLY_TIMEOUT: Duration = Duration::from_millis(10);

/// What one [`StoreServer`] is willing to hold for its job. Each limit turns a runaway or hostile
/// client into a named error instead of exhausting rank 0's threads, memory or descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLimits {
    /// A new connection that has not sent its AUTH frame within this time is dropped (default
    /// [`DEFAULT_AUTH_TIMEOUT`], 10 s).
    pub auth_timeout: Duration,
    /// Authenticated connections served at once (default [`DEFAULT_MAX_CONNECTIONS`]); one more is
    /// sent an ERROR frame after its AUTH and closed (a [`StoreClient`] retries until its timeout). A
    /// job needs one per rank (plus one per split communicator's client, if any). Connections that
    /// have not authenticated do not count here: they have their own budget,
    /// [`StoreLimits::max_unauthenticated`], so strangers cannot lock the ranks out.
    pub max_connections: usize,
    /// Keys stored at once (default [`DEFAULT_MAX_KEYS`]); a SET or ADD that would create one more
    /// gets an ERROR reply, and the connection stays usable.
    pub max_keys: usize,
    /// Bytes of keys plus values stored at once (default [`DEFAULT_MAX_BYTES`], 256 MiB); a SET or ADD
    /// that would exceed it gets an ERROR reply, and the connection stays usable.
    pub max_bytes: usize,
    /// Longest one GET waits on the server, whatever it asks for ([`WAIT_FOREVER_MS`] included);
    /// the GET then gets a TIMEOUT reply (default [`crate::config::DEFAULT_TIMEOUT`], 300 s;
    /// [`EnvRendezvous::connect`](super::EnvRendezvous::connect) uses its timeout, i.e.
    /// `FERROCCL_TIMEOUT`). A waiting GET whose client disconnects ends at once either way.
    pub max_wait: Duration,
    /// Connections that have not sent their AUTH frame yet, kept at once (default
    /// [`DEFAULT_MAX_UNAUTHENTICATED`]). When a new connection arrives with the budget full, the
    /// *oldest* unauthenticated one is closed, so a flood of silent sockets churns through this
    /// budget while a real client, which sends AUTH at once, gets through. They cost no thread: the
    /// accept thread reads their AUTH frames without blocking.
    pub max_unauthenticated: usize,
    /// Bytes of partly received request frames over 64 KiB, over all connections (default
    /// [`DEFAULT_MAX_INFLIGHT_BYTES`]). Each such frame reserves its declared length when its header
    /// arrives; one that would not fit is refused on the header (its payload is read into a small
    /// scratch buffer and discarded, the request gets an ERROR reply and the connection stays
    /// usable), so partial frames cannot take the store past this bound plus 64 KiB per connection,
    /// however many connections send them. Small frames (every ordinary rendezvous request) need no
    /// reservation, so a full budget never blocks them.
    pub max_inflight_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_keys: DEFAULT_MAX_KEYS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_wait: crate::config::DEFAULT_TIMEOUT,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
        }
    }
}

/// The stored keys and values, and their size.
#[derive(Default)]
struct Data {
    map: HashMap<String, Vec<u8>>,
    /// Sum of `key.len() + value.len()` over `map`.
    bytes: usize,
}

impl Data {
    /// Store `value` under `key` if the limits allow it (the caller wakes waiters).
    fn put(&mut self, key: String, value: Vec<u8>, limits: &StoreLimits) -> Response {
        let old = self.map.get(&key).map(|v| key.len() + v.len());
        let new = key.len() + value.len();
        if old.is_none() && self.map.len() >= limits.max_keys {
            return Response::Error(format!(
                "storing key {key:?} would exceed the store's limit of {} keys (StoreLimits::max_keys on rank 0); delete keys that are no longer needed",
                limits.max_keys
            ));
        }
        let total = self.bytes - old.unwrap_or(0) + new;
        if total > limits.max_bytes {
            return Response::Error(format!(
                "storing {new} bytes under key {key:?} would bring the store to {total} bytes, over its limit of {} (StoreLimits::max_bytes on rank 0); the store is for small values such as ids and addresses: delete keys that are no longer needed",
                limits.max_bytes
            ));
        }
        self.bytes = total;
        self.map.insert(key, value);
        Response::Ok
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.map.remove(key) {
            Some(v) => {
                self.bytes -= key.len() + v.len();
                true
            }
            None => false,
        }
    }
}

/// State shared by the accept thread and every connection thread.
struct Shared {
    map: Mutex<Data>,
    /// Signalled on every SET/ADD (and on shutdown) so blocked GETs re-check their key.
    changed: Condvar,
    shutdown: AtomicBool,
    token: Vec<u8>,
    limits: StoreLimits,
    /// Bytes reserved by partly received frames (see [`StoreLimits::max_inflight_bytes`]).
    inflight: AtomicUsize,
    /// Authenticated connections being served.
    authed: AtomicUsize,
}

/// A reservation of in-flight frame memory, returned when the frame has been handled.
struct Reserved<'a> {
    shared: &'a Shared,
    bytes: usize,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.shared.inflight.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock cannot leave the map half-updated (each operation is a single
        // insert/remove), so poisoning is safe to ignore.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Reserve `bytes` of in-flight frame memory, or `None` if that would pass the limit.
    fn reserve(&self, bytes: usize) -> Option<Reserved<'_>> {
        let max = self.limits.max_inflight_bytes;
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(bytes).filter(|&t| t <= max)
            })
            .ok()?;
        Some(Reserved {
            shared: self,
            bytes,
        })
    }
}

/// The rendezvous key/value store server that rank 0 hosts.
///
/// It accepts connections on a background thread and serves each connection on its own thread, so a
/// slow, silent or malicious peer only ever ties up its own thread; [`StoreLimits`] caps the
/// connections, the stored keys and bytes, and how long a GET waits. Dropping the server stops it: the
/// listener closes, blocked `get`s are released, every connection is closed and all threads are joined
/// (this takes up to ~50 ms).
pub struct StoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl StoreServer {
    /// Bind `addr` (e.g. `"0.0.0.0:29500"`, or `"127.0.0.1:0"` for an ephemeral port) and start serving.
    ///
    /// `token` is the shared secret every client must present as its first frame; the empty string means
    /// "no secret" (clients must then also use the empty token). Anyone who can reach the port and knows
    /// the token can read and write every key, so bind to a private interface on shared networks.
    pub fn bind(addr: &str, token: &str) -> Result<StoreServer> {
        Self::bind_with_auth_timeout(addr, token, DEFAULT_AUTH_TIMEOUT)
    }

    /// Like [`StoreServer::bind`], but a new connection that has not sent its AUTH frame within
    /// `auth_timeout` (default 10 s) is dropped. Mainly for tests that exercise silent peers.
    pub fn bind_with_auth_timeout(
        addr: &str,
        token: &str,
        auth_timeout: Duration,
    ) -> Result<StoreServer> {
        Self::bind_with_limits(
            addr,
            token,
            StoreLimits {
                auth_timeout,
                ..StoreLimits::default()
            },
        )
    }

    /// Like [`StoreServer::bind`], with explicit [`StoreLimits`].
    pub fn bind_with_limits(addr: &str, token: &str, limits: StoreLimits) -> Result<StoreServer> {
        if limits.max_unauthenticated == 0 {
            return Err(Error::InvalidArgument(format!(
                "rendezvous store on {addr}: StoreLimits::max_unauthenticated is 0, so no client could ever authenticate; use at least a few (default {DEFAULT_MAX_UNAUTHENTICATED})"
            )));
        }
        if limits.max_connections == 0 {
            return Err(Error::InvalidArgument(format!(
                "rendezvous store on {addr}: StoreLimits::max_connections is 0, so no client could connect; use at least one per rank (default {DEFAULT_MAX_CONNECTIONS})"
            )));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(token_too_long(token));
        }
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("rendezvous store: cannot bind {addr}"), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io(format!("rendezvous store: local address of {addr}"), e))?;
        // Non-blocking accept lets the accept thread notice shutdown without a wake-up connection.
        listener.set_nonblocking(true).map_err(|e| {
            Error::io(
                format!("rendezvous store: set {local_addr} non-blocking"),
                e,
            )
        })?;
        let shared = Arc::new(Shared {
            map: Mutex::new(Data::default()),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            token: token.as_bytes().to_vec(),
            limits,
            inflight: AtomicUsize::new(0),
            authed: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name(format!("ferroccl-store-{}", local_addr.port()))
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::io("rendezvous store: spawn the accept thread", e))?;
        tracing::debug!(%local_addr, "rendezvous store listening");
        Ok(StoreServer {
            local_addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Bytes currently reserved by partly received request frames, the quantity
    /// [`StoreLimits::max_inflight_bytes`] bounds (for monitoring, and the tests that prove the bound).
    pub fn inflight_bytes(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }

    /// Authenticated connections being served now (those [`StoreLimits::max_connections`] bounds).
    pub fn authenticated_connections(&self) -> usize {
        self.shared.authed.load(Ordering::Acquire)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.lock();
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.accept_thread.take() {
            if t.join().is_err() {
                tracing::warn!(addr = %self.local_addr, "rendezvous store accept thread panicked");
            }
        }
        tracing::debug!(addr = %self.local_addr, "rendezvous store stopped");
    }
}

fn token_too_long(token: &str) -> Error {
    Error::InvalidArgument(format!(
        "the rendezvous token (FERROCCL_TOKEN) is {} bytes; at most {MAX_TOKEN_LEN} are allowed",
        token.len()
    ))
}

/// A connection whose AUTH frame has not fully arrived. The accept thread reads these without
/// blocking, a few bytes at a time, so an unauthenticated peer costs a socket and at most
/// `HEADER_LEN + MAX_TOKEN_LEN` bytes, never a thread.
struct Unauthed {
    stream: TcpStream,
    peer: SocketAddr,
    got: Vec<u8>,
    /// Bytes of the AUTH frame expected in total (the header, then header + token).
    need: usize,
    deadline: Instant,
}

/// What reading an [`Unauthed`] connection gave.
enum AuthState {
    /// More bytes are needed.
    Incomplete,
    /// A complete AUTH frame carrying this token.
    Token(Vec<u8>),
    /// The peer closed; `got` bytes had arrived.
    Closed(usize),
    /// Not an AUTH frame; why (sent back in an ERROR frame).
    Bad(String),
}

impl Unauthed {
    /// Read what has arrived, never past the AUTH frame (requests may follow it at once).
    fn advance(&mut self) -> AuthState {
        let mut tmp = [0u8; 1024];
        loop {
            if self.got.len() == self.need {
                if self.need > HEADER_LEN {
                    return AuthState::Token(self.got[HEADER_LEN..].to_vec());
                }
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(&self.got);
                let (op, len) = match frame::parse_header(&h) {
                    Ok(x) => x,
                    Err(why) => return AuthState::Bad(why),
                };
                if let Err(why) = check_auth_header(op, len) {
                    return AuthState::Bad(why);
                }
                if len == 0 {
                    return AuthState::Token(Vec::new());
                }
                self.need = HEADER_LEN + len;
                continue;
            }
            let want = (self.need - self.got.len()).min(tmp.len());
            match self.stream.read(&mut tmp[..want]) {
                Ok(0) => return AuthState::Closed(self.got.len()),
                Ok(n) => {
                    let first = self.got.is_empty();
                    self.got.extend_from_slice(&tmp[..n]);
                    if first && self.got[0] != frame::MAGIC {
                        // Reject garbage on its first byte instead of waiting for a whole header.
                        let mut h = [0u8; HEADER_LEN];
                        h[0] = self.got[0];
                        h[1] = frame::VERSION;
                        return AuthState::Bad(
                            frame::parse_header(&h)
                                .err()
                                .unwrap_or_else(|| "bad magic byte".into()),
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return AuthState::Incomplete,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return AuthState::Bad(format!("socket error: {e}")),
            }
        }
    }
}

/// Before authentication only an AUTH frame of at most [`MAX_TOKEN_LEN`] bytes is read: anything
/// else is refused on its header, before any payload is read.
fn check_auth_header(op: u8, len: usize) -> std::result::Result<(), String> {
    if !frame::is_request_op(op) {
        return Err(format!("unknown request opcode 0x{op:02x}"));
    }
    if !frame::is_auth_op(op) {
        return Err(format!(
            "{} before AUTH: the first frame must authenticate",
            frame::request_name(op)
        ));
    }
    if len > MAX_TOKEN_LEN {
        return Err(format!(
            "AUTH payload of {len} bytes exceeds the {MAX_TOKEN_LEN}-byte token limit"
        ));
    }
    Ok(())
}

/// A connection being turned away: its final frame was written (without blocking) and its write
/// side shut; what the peer still sends is read and discarded for a short while, because closing a
/// socket with unread input makes the kernel send a reset that can destroy the reply in flight.
struct Closing {
    stream: TcpStream,
    until: Instant,
    drained: usize,
}

/// Write `r` to a fresh non-blocking socket (a few bytes: the socket buffer takes them at once),
/// half-close it and queue it in `closing` (or drop it at once if that queue is full).
fn turn_away(stream: TcpStream, r: &Response, closing: &mut VecDeque<Closing>) {
    let _ = (&stream).write(&r.encode());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if closing.len() >= MAX_CLOSING {
        closing.pop_front();
    }
    closing.push_back(Closing {
        stream,
        until: Instant::now() + Duration::from_millis(200),
        drained: 0,
    });
}

/// Drain the connections being closed; drop those done (peer closed, drained enough, or late).
fn drain_closing(closing: &mut VecDeque<Closing>, now: Instant) {
    let mut sink = [0u8; 4096];
    closing.retain_mut(|c| loop {
        if now >= c.until || c.drained >= (1 << 20) {
            return false;
        }
        match c.stream.read(&mut sink) {
            Ok(0) => return false,
            Ok(n) => c.drained += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    });
}

/// Counters for rate-limited warnings (a flood would otherwise log a line per connection).
#[derive(Default)]
struct Refusals {
    evicted: u64,
    full: u64,
}

/// The accept thread: takes new connections, reads their AUTH frames without blocking (each has
/// [`StoreLimits::auth_timeout`]; at most [`StoreLimits::max_unauthenticated`] are kept, the oldest
/// closed first), and hands each authenticated connection to a thread of its own (at most
/// [`StoreLimits::max_connections`] at once; one more is refused after its AUTH).
fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut pending: VecDeque<Unauthed> = VecDeque::new();
    let mut closing: VecDeque<Closing> = VecDeque::new();
    let mut refused = Refusals::default();
    let limits = &shared.limits;
    while !shared.stopping() {
        let mut busy = false;
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((stream, peer)) => {
                    busy = true;
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(%peer, error = %e, "rendezvous store: cannot configure a new connection; dropping it");
                        continue;
                    }
                    if pending.len() >= limits.max_unauthenticated {
                        if let Some(old) = pending.pop_front() {
                            refused.evicted += 1;
                            if refused.evicted.is_power_of_two() {
                                tracing::warn!(peer = %old.peer, evicted = refused.evicted, "rendezvous store: {} connections without AUTH (StoreLimits::max_unauthenticated); closing the oldest", limits.max_unauthenticated);
                            }
                            let msg = Response::Error(format!(
                                "closed before authenticating: {} newer connections are waiting to authenticate (StoreLimits::max_unauthenticated); send AUTH at once after connecting",
                                limits.max_unauthenticated
                            ));
                            turn_away(old.stream, &msg, &mut closing);
                        }
                    }
                    let deadline = Instant::now()
                        .checked_add(limits.auth_timeout)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
                    pending.push_back(Unauthed {
                        stream,
                        peer,
                        got: Vec::new(),
                        need: HEADER_LEN,
                        deadline,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE or a connection reset before accept: log and keep serving.
                    tracing::warn!(error = %e, "rendezvous store: accept failed");
                    break;
                }
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let state = pending[i].advance();
            if matches!(state, AuthState::Incomplete) && now < pending[i].deadline {
                i += 1;
                continue;
            }
            busy = true;
            let Some(u) = pending.remove(i) else { break };
            match state {
                AuthState::Incomplete => {
                    let why = if u.got.is_empty() {
                        "no AUTH frame arrived in time".to_string()
                    } else {
                        format!("frame incomplete after {} bytes", u.got.len())
                    };
                    tracing::warn!(peer = %u.peer, "rendezvous store: {why}; dropping connection");
                    turn_away(u.stream, &Response::Error(why), &mut closing);
                }
                AuthState::Closed(0) => {
                    tracing::debug!(peer = %u.peer, "rendezvous store: connection closed by peer");
                }
                AuthState::Closed(got) => {
                    tracing::warn!(peer = %u.peer, got, "rendezvous store: truncated frame (peer closed mid-frame); dropping connection");
                }
                AuthState::Bad(why) => {
                    tracing::warn!(peer = %u.peer, "rendezvous store: malformed frame ({why}); dropping connection");
                    let r = Response::Error(format!("malformed frame: {why}"));
                    turn_away(u.stream, &r, &mut closing);
                }
                AuthState::Token(tok) => {
                    if !frame::constant_time_eq(&tok, &shared.token) {
                        tracing::warn!(peer = %u.peer, "rendezvous store: wrong token; dropping connection");
                        turn_away(u.stream, &Response::AuthFailed, &mut closing);
                        continue;
                    }
                    conns.retain(|h| !h.is_finished());
                    if shared.authed.load(Ordering::Acquire) >= limits.max_connections {
                        refused.full += 1;
                        if refused.full.is_power_of_two() {
                            tracing::warn!(peer = %u.peer, refused = refused.full, "rendezvous store: {} authenticated connections open (StoreLimits::max_connections); refusing new ones", limits.max_connections);
                        }
                        let msg = Response::Error(format!(
                            "the store already serves {} connections, its limit (StoreLimits::max_connections on rank 0); close idle clients or raise the limit",
                            limits.max_connections
                        ));
                        turn_away(u.stream, &msg, &mut closing);
                        continue;
                    }
                    start_serving(u, &shared, &mut conns);
                }
            }
        }
        drain_closing(&mut closing, now);
        // Reap finished connection threads so a long-lived server does not accumulate handles.
        conns.retain(|h| !h.is_finished());
        if !busy {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    drop(listener);
    for h in conns {
        let _ = h.join();
    }
}

/// Answer a successful AUTH and serve the connection on a thread of its own.
fn start_serving(u: Unauthed, shared: &Arc<Shared>, conns: &mut Vec<JoinHandle<()>>) {
    let Unauthed { stream, peer, .. } = u;
    // The OK reply is 7 bytes on a fresh socket: the non-blocking write takes it whole.
    // Counted before the reply, so a client that has its OK is already counted.
    shared.authed.fetch_add(1, Ordering::AcqRel);
    let ok = Response::Ok.encode();
    if !matches!((&stream).write(&ok), Ok(n) if n == ok.len()) {
        shared.authed.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%peer, "rendezvous store: cannot answer AUTH; dropping connection");
        return;
    }
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("ferroccl-store-conn-{peer}"))
        .spawn(move || {
            serve_connection(stream, peer, &s);
            s.authed.fetch_sub(1, Ordering::AcqRel);
        });
    match spawned {
        Ok(h) => conns.push(h),
        Err(e) => {
            shared.authed.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%peer, error = %e, "rendezvous store: cannot spawn a connection thread; dropping the connection");
        }
    }
}

/// Why the server stopped reading a frame.
enum Stop {
    /// The peer closed; `got` bytes of the current frame had arrived (0: a clean close).
    Closed { got: usize },
    /// The deadline passed with the frame incomplete (`got` bytes arrived).
    Deadline { got: usize },
    /// The server is shutting down.
    Shutdown,
    /// A socket error.
    Io(std::io::Error),
    /// The bytes are not a valid request frame.
    Bad(String),
}

/// Fill `buf`, polling the shutdown flag between short read timeouts; `deadline` bounds the whole read.
fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    base: usize,
    deadline: Option<Instant>,
    shared: &Shared,
) -> std::result::Result<(), Stop> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(Stop::Closed { got: base + got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                if shared.stopping() {
                    return Err(Stop::Shutdown);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Stop::Deadline { got: base + got });
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Stop::Io(e)),
        }
    }
    Ok(())
}

/// One request read by [`read_request`].
enum Got<'a> {
    /// A request, and the in-flight memory its payload reserved (returned once it is handled).
    Req(Request, Option<Reserved<'a>>),
    /// A frame refused on its header because its payload would pass
    /// [`StoreLimits::max_inflight_bytes`]; the payload was read and discarded, the connection stays
    /// usable, and this is the ERROR reply.
    Refused(String),
}

/// Read one request of an authenticated connection, waiting for it as long as it takes (the
/// connection is idle until the client asks something); once a frame has started, the rest must
/// arrive within [`FRAME_TIMEOUT`].
///
/// The payload reserves its declared length of in-flight memory on the header
/// ([`StoreLimits::max_inflight_bytes`]); a frame that cannot fit is read into a small scratch buffer
/// and discarded, so the sum of the payload buffers of all connections never passes the bound.
fn read_request<'a>(
    stream: &mut TcpStream,
    shared: &'a Shared,
) -> std::result::Result<Got<'a>, Stop> {
    let mut h = [0u8; HEADER_LEN];
    read_full(stream, &mut h[..1], 0, None, shared)?;
    if h[0] != frame::MAGIC {
        // Reject garbage on its first byte instead of waiting for a whole header that may never come.
        h[1] = frame::VERSION;
        return Err(Stop::Bad(
            frame::parse_header(&h)
                .err()
                .unwrap_or_else(|| "bad magic byte".into()),
        ));
    }
    let deadline = Some(Instant::now() + FRAME_TIMEOUT);
    read_full(stream, &mut h[1..], 1, deadline, shared)?;
    let (op, len) = frame::parse_header(&h).map_err(Stop::Bad)?;
    if !frame::is_request_op(op) {
        return Err(Stop::Bad(format!("unknown request opcode 0x{op:02x}")));
    }
    let reserved = if len <= SMALL_FRAME {
        None
    } else {
        match shared.reserve(len) {
            Some(r) => Some(r),
            None => {
                let mut scratch = [0u8; 16 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(scratch.len());
                    read_full(
                        stream,
                        &mut scratch[..n],
                        HEADER_LEN + len - left,
                        deadline,
                        shared,
                    )?;
                    left -= n;
                }
                return Ok(Got::Refused(format!(
                    "a {len}-byte {} frame does not fit in the store's memory for frames in flight ({} of {} bytes taken by other connections' partial frames, StoreLimits::max_inflight_bytes on rank 0); retry, or send smaller values",
                    frame::request_name(op),
                    shared.inflight.load(Ordering::Acquire),
                    shared.limits.max_inflight_bytes
                )));
            }
        }
    };
    // Reserved: the whole payload may be allocated at once (it is touched only as bytes arrive).
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let start = payload.len();
        payload.resize(start + (len - start).min(READ_PIECE), 0);
        read_full(
            stream,
            &mut payload[start..],
            HEADER_LEN + start,
            deadline,
            shared,
        )?;
    }
    Request::decode(op, payload)
        .map(|r| Got::Req(r, reserved))
        .map_err(Stop::Bad)
}

fn send(stream: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    stream.write_all(&r.encode())?;
    stream.flush()
}

/// Send a final reply and close gracefully: half-close, then briefly discard whatever the peer still
/// sends. Closing a socket with unread input makes the kernel send a reset, which can destroy the reply
/// before the peer reads it.
fn send_and_close(stream: &mut TcpStream, r: &Response) {
    if send(stream, r).is_err() {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while Instant::now() < deadline && drained < (1 << 20) {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Log why a connection is being dropped, tell the peer if possible, and return (closing it).
fn reject(stream: &mut TcpStream, peer: SocketAddr, stage: &str, stop: Stop) {
    match stop {
        Stop::Closed { got: 0 } => {
            tracing::debug!(%peer, "rendezvous store: connection closed by peer");
        }
        Stop::Closed { got } => {
            tracing::warn!(%peer, stage, got, "rendezvous store: truncated frame (peer closed mid-frame); dropping connection");
        }
        Stop::Deadline { got } => {
            let why = if got == 0 {
                format!("no {stage} frame arrived in time")
            } else {
                format!("frame incomplete after {got} bytes")
            };
            tracing::warn!(%peer, stage, "rendezvous store: {why}; dropping connection");
            send_and_close(stream, &Response::Error(why));
        }
        Stop::Shutdown => {}
        Stop::Io(e) => {
            tracing::warn!(%peer, stage, error = %e, "rendezvous store: socket error; dropping connection");
        }
        Stop::Bad(why) => {
            tracing::warn!(%peer, stage, "rendezvous store: malformed frame ({why}); dropping connection");
            send_and_close(stream, &Response::Error(format!("malformed frame: {why}")));
        }
    }
}

/// Serve one authenticated connection (its AUTH was answered by the accept thread).
fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_nodelay(true))
        .and_then(|_| stream.set_read_timeout(Some(POLL)))
        .and_then(|_| stream.set_write_timeout(Some(SERVER_WRITE_TIMEOUT)));
    if let Err(e) = setup {
        tracing::warn!(%peer, error = %e, "rendezvous store: cannot configure connection; dropping it");
        return;
    }
    tracing::debug!(%peer, "rendezvous store: client authenticated");

    loop {
        let (req, reserved) = match read_request(&mut stream, shared) {
            Ok(Got::Req(r, reserved)) => (r, reserved),
            Ok(Got::Refused(why)) => {
                tracing::warn!(%peer, "rendezvous store: {why}");
                if send(&mut stream, &Response::Error(why)).is_err() {
                    return;
                }
                continue;
            }
            Err(stop) => return reject(&mut stream, peer, "request", stop),
        };
        let resp = match req {
            Request::Auth(_) => {
                tracing::warn!(%peer, "rendezvous store: second AUTH on one connection; dropping connection");
                send_and_close(
                    &mut stream,
                    &Response::Error("AUTH sent twice on one connection".into()),
                );
                return;
            }
            Request::Set { key, value } => {
                let mut data = shared.lock();
                let r = data.put(key, value, &shared.limits);
                if r == Response::Ok {
                    shared.changed.notify_all();
                }
                r
            }
            Request::Get { key, wait_ms } => {
                // A GET's payload is its key: nothing of it stays in flight while it waits.
                drop(reserved);
                match wait_for(shared, &key, wait_ms, &stream) {
                    Some(r) => r,
                    // shutting down (closing tells the client), or the client is gone
                    None => return,
                }
            }
            Request::Add { key, delta } => add(shared, key, delta),
            Request::Check { key } => Response::Bool(shared.lock().map.contains_key(&key)),
            Request::Delete { key } => Response::Bool(shared.lock().remove(&key)),
        };
        if let Err(e) = send(&mut stream, &resp) {
            tracing::warn!(%peer, error = %e, "rendezvous store: cannot send reply; dropping connection");
            return;
        }
    }
}

/// Whether the client at the other end of `s` has closed (or reset) its connection. Peeks without
/// blocking; bytes it sent ahead (a pipelined request) are left for the next read. A client that
/// only half-closes (shuts down its writing side and waits for the reply) counts as gone; the
/// [`StoreClient`] never does that.
fn client_gone(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    // A socket left non-blocking would make every later read spin: give up on it instead.
    if s.set_nonblocking(false).is_err() {
        return true;
    }
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    }
}

/// Wait until `key` exists, for `wait_ms` but at most [`StoreLimits::max_wait`]. `None` when the
/// server is shutting down or `client` went away (checked every [`POLL`], so an abandoned wait does
/// not keep its thread). Releases the map lock while waiting.
fn wait_for(shared: &Shared, key: &str, wait_ms: u64, client: &TcpStream) -> Option<Response> {
    let asked = if wait_ms == WAIT_FOREVER_MS {
        shared.limits.max_wait
    } else {
        Duration::from_millis(wait_ms).min(shared.limits.max_wait)
    };
    // None: a limit too far in the future to represent, i.e. no limit.
    let deadline = Instant::now().checked_add(asked);
    let mut checked = Instant::now();
    let mut data = shared.lock();
    loop {
        if let Some(v) = data.map.get(key) {
            return Some(Response::Value(v.clone()));
        }
        if shared.stopping() {
            return None;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Some(Response::Timeout);
        }
        if now.duration_since(checked) >= POLL {
            drop(data);
            if client_gone(client) {
                tracing::debug!(key, "rendezvous store: client left while its GET waited");
                return None;
            }
            checked = Instant::now();
            data = shared.lock();
            continue;
        }
        let slice = deadline.map_or(POLL, |d| (d - now).min(POLL));
        data = shared
            .changed
            .wait_timeout(data, slice)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn add(shared: &Shared, key: String, delta: i64) -> Response {
    let mut data = shared.lock();
    let old = match data.map.get(&key) {
        None => 0,
        Some(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(n) => n,
            None => {
                return Response::Error(format!(
                    "ADD on key {key:?}, whose value is not a decimal integer counter"
                ))
            }
        },
    };
    let Some(new) = old.checked_add(delta) else {
        return Response::Error(format!(
            "ADD {delta} to counter {key:?} = {old} overflows i64"
        ));
    };
    match data.put(key, new.to_string().into_bytes(), &shared.limits) {
        Response::Ok => {
            shared.changed.notify_all();
            Response::Int(new)
        }
        refused => refused,
    }
}

/// How one connection attempt of [`StoreClient::connect`] failed.
enum Attempt {
    /// Nothing answered (refused, unreachable, unresolvable): retry.
    Unreachable(String),
    /// The store answered but turned this client away (full, or closed before AUTH): retry.
    Refused(Error),
    /// Retrying cannot help (bad address, wrong token, a garbled reply).
    Fatal(Error),
}

/// One connection to the rendezvous store.
///
/// Methods take `&self` (a mutex serialises requests on the single connection), so a client can be
/// shared between threads; a blocking [`get`](StoreClient::get) or [`barrier`](StoreClient::barrier)
/// holds that mutex while it waits, so other threads of the same client queue behind it.
///
/// If a request fails at the socket level (store closed, reply timeout, garbage reply) the connection
/// is in an unknown state and every later call fails too; connect a new client to recover.
pub struct StoreClient {
    addr: String,
    conn: Mutex<Conn>,
    /// How long the store may take to answer, beyond any wait the request asked for.
    reply_timeout: Duration,
}

struct Conn {
    stream: TcpStream,
    /// Set after a socket-level failure: the reply stream is out of sync and cannot be reused.
    broken: Option<String>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(WAIT_FOREVER_MS)
        .min(WAIT_FOREVER_MS - 1)
}

impl StoreClient {
    /// Connect to the store at `addr` (`host:port`), then authenticate with `token`.
    ///
    /// Connection failures (refused, unreachable, unresolvable host) are retried with backoff until
    /// `timeout`, because rank 0 may start its server after other ranks start connecting; so is a
    /// store that turns the client away (all [`StoreLimits::max_connections`] taken, or a flood of
    /// unauthenticated sockets pushing this one out before its AUTH was read), since room may free
    /// up. A wrong token gives [`Error::BadToken`] at once; running out of time gives the last
    /// refusal ([`Error::Rendezvous`] naming the limit), or [`Error::Rendezvous`] quoting the last
    /// connect error.
    ///
    /// `timeout` also bounds every reply of the store on this connection, beyond the wait a request
    /// asks for (a `get`'s own timeout): a store that stops answering gives [`Error::Timeout`]. Pass
    /// the communicator's `Config::timeout` (`FERROCCL_TIMEOUT`), as
    /// [`EnvRendezvous::connect`](super::EnvRendezvous::connect) does.
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<StoreClient> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(token_too_long(token));
        }
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let mut backoff = Duration::from_millis(10);
        let mut last_err: Option<String>;
        let mut refusal: Option<Error> = None;
        loop {
            match Self::try_connect(addr, token, timeout, remaining().unwrap_or(timeout)) {
                Ok(c) => return Ok(c),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Unreachable(why)) => last_err = Some(why),
                // A full store (or one that closed us before our AUTH was read, under a flood of
                // unauthenticated sockets) may have room a moment later: retry under the timeout.
                Err(Attempt::Refused(e)) => {
                    last_err = Some(e.to_string());
                    refusal = Some(e);
                }
            }
            if remaining().is_some_and(|r| r.is_zero()) {
                if let Some(e) = refusal {
                    tracing::warn!(
                        addr,
                        "rendezvous: the store kept refusing this client for {:?}",
                        start.elapsed()
                    );
                    return Err(e);
                }
                return Err(Error::Rendezvous(format!(
                    "could not connect to the store at {addr} within {:?} (last error: {}); is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?",
                    start.elapsed(),
                    last_err.as_deref().unwrap_or("none")
                )));
            }
            tracing::debug!(addr, last_error = ?last_err, "rendezvous: store not reachable or full yet; retrying");
            std::thread::sleep(backoff.min(remaining().unwrap_or(backoff)));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// One connection attempt: connect (bounded by `left`), then AUTH.
    fn try_connect(
        addr: &str,
        token: &str,
        timeout: Duration,
        left: Duration,
    ) -> std::result::Result<StoreClient, Attempt> {
        let mut last_err: Option<String> = None;
        let addrs = match addr.to_socket_addrs() {
            Ok(a) => a,
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                return Err(Attempt::Fatal(Error::Config {
                    var: "rendezvous address".into(),
                    value: addr.into(),
                    why: format!("{e}; expected host:port"),
                }));
            }
            Err(e) => return Err(Attempt::Unreachable(format!("resolve {addr}: {e}"))),
        };
        let mut stream = None;
        for sa in addrs {
            let per_try = left.clamp(Duration::from_millis(10), Duration::from_secs(5));
            match TcpStream::connect_timeout(&sa, per_try) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = Some(format!("{sa}: {e}")),
            }
        }
        let Some(stream) = stream else {
            return Err(Attempt::Unreachable(
                last_err.unwrap_or_else(|| format!("{addr} resolved to no address")),
            ));
        };
        stream.set_nodelay(true).map_err(|e| {
            Attempt::Fatal(Error::io(
                format!("rendezvous: configure connection to {addr}"),
                e,
            ))
        })?;
        let client = StoreClient {
            addr: addr.to_string(),
            conn: Mutex::new(Conn {
                stream,
                broken: None,
            }),
            reply_timeout: timeout.max(MIN_REPLY_TIMEOUT),
        };
        let auth = Request::Auth(token.as_bytes().to_vec());
        match client.request(&auth, Duration::ZERO) {
            Ok(Response::Ok) => Ok(client),
            Ok(Response::AuthFailed) => Err(Attempt::Fatal(Error::BadToken {
                addr: addr.to_string(),
            })),
            Ok(r @ Response::Error(_)) => Err(Attempt::Refused(client.unexpected("AUTH", &r))),
            Ok(other) => Err(Attempt::Fatal(client.unexpected("AUTH", &other))),
            // Closed or reset before the reply: turned away under load (or the store is going).
            Err(e @ (Error::Rendezvous(_) | Error::Io { .. })) => Err(Attempt::Refused(e)),
            Err(e) => Err(Attempt::Fatal(e)),
        }
    }

    /// The address this client connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn closed_error(&self, e: Option<std::io::Error>) -> Error {
        let msg = format!(
            "the store at {} closed the connection (did rank 0 exit or drop its StoreServer?)",
            self.addr
        );
        match e {
            Some(e) => Error::io(msg, e),
            None => Error::Rendezvous(msg),
        }
    }

    fn unexpected(&self, what: &str, r: &Response) -> Error {
        match r {
            Response::Error(m) => {
                Error::Rendezvous(format!("the store at {} refused {what}: {m}", self.addr))
            }
            other => Error::BadFrame {
                peer: self.addr.clone(),
                why: format!("unexpected reply {other:?} to {what}"),
            },
        }
    }

    /// Send one request and read its reply; `wait` is how long the server may legitimately take.
    fn request(&self, req: &Request, wait: Duration) -> Result<Response> {
        if req.payload_len() > MAX_PAYLOAD {
            return Err(Error::InvalidArgument(format!(
                "rendezvous {} of {} bytes exceeds the {MAX_PAYLOAD}-byte frame limit; the store is for small values (ids, addresses)",
                req.name(),
                req.payload_len()
            )));
        }
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &conn.broken {
            return Err(Error::Rendezvous(format!(
                "the connection to the store at {} is unusable after an earlier failure ({why}); connect a new client",
                self.addr
            )));
        }
        let result = self.exchange(&mut conn.stream, req, wait);
        if let Err(e) = &result {
            conn.broken = Some(e.to_string());
        }
        result
    }

    fn exchange(&self, stream: &mut TcpStream, req: &Request, wait: Duration) -> Result<Response> {
        let io_ctx = |what: &str| format!("rendezvous: {what} {} at {}", req.name(), self.addr);
        let reply = self.reply_timeout;
        stream
            .set_write_timeout(Some(reply))
            .and_then(|_| stream.set_read_timeout(Some(wait.saturating_add(reply))))
            .map_err(|e| Error::io(io_ctx("set socket timeouts for"), e))?;
        if let Err(e) = stream.write_all(&req.encode()).and_then(|_| stream.flush()) {
            return Err(match e.kind() {
                ErrorKind::BrokenPipe
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted => self.closed_error(Some(e)),
                ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout {
                    during: "rendezvous store request (the store is not reading)",
                    after: reply,
                    waiting_for: Some(0),
                },
                _ => Error::io(io_ctx("send"), e),
            });
        }
        match frame::read_response(stream) {
            Ok(r) => Ok(r),
            Err(ReadError::Closed { .. }) => Err(self.closed_error(None)),
            Err(ReadError::Io(e)) => Err(match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout {
                    during: "rendezvous store reply",
                    after: wait.saturating_add(reply),
                    waiting_for: Some(0),
                },
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => self.closed_error(Some(e)),
                _ => Error::io(io_ctx("read the reply to"), e),
            }),
            Err(ReadError::Bad(why)) => Err(Error::BadFrame {
                peer: self.addr.clone(),
                why,
            }),
        }
    }

    /// Store `value` under `key`, replacing any previous value and waking every `get` waiting for it.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Set {
            key: key.to_string(),
            value: value.to_vec(),
        };
        match self.request(&req, Duration::ZERO)? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected("SET", &other)),
        }
    }

    /// Return the value of `key`, blocking until some client sets it.
    ///
    /// The wait happens on the server, so it costs no polling traffic. After `timeout` without the key
    /// appearing this returns [`Error::Timeout`] with `during: "rendezvous get"`.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let req = Request::Get {
            key: key.to_string(),
            wait_ms: duration_ms(timeout),
        };
        match self.request(&req, timeout)? {
            Response::Value(v) => Ok(v),
            Response::Timeout => Err(Error::Timeout {
                during: "rendezvous get",
                after: timeout,
                waiting_for: None,
            }),
            other => Err(self.unexpected("GET", &other)),
        }
    }

    /// Atomically add `delta` to the integer counter under `key` (created at 0) and return the new value.
    ///
    /// Counters are stored as decimal ASCII, so `get` on a counter returns e.g. `b"8"`; `add` on a key
    /// holding something else is refused with [`Error::Rendezvous`].
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let req = Request::Add {
            key: key.to_string(),
            delta,
        };
        match self.request(&req, Duration::ZERO)? {
            Response::Int(n) => Ok(n),
            other => Err(self.unexpected("ADD", &other)),
        }
    }

    /// Whether `key` exists right now (never blocks).
    pub fn check(&self, key: &str) -> Result<bool> {
        match self.request(&Request::Check { key: key.into() }, Duration::ZERO)? {
            Response::Bool(b) => Ok(b),
            other => Err(self.unexpected("CHECK", &other)),
        }
    }

    /// Remove `key`; returns whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        match self.request(&Request::Delete { key: key.into() }, Duration::ZERO)? {
            Response::Bool(b) => Ok(b),
            other => Err(self.unexpected("DELETE", &other)),
        }
    }

    /// Block until `world` participants (this one included) have called `barrier` with this `name`.
    ///
    /// Implemented with an ADD-based generation counter: the k-th arrival at counter
    /// `__ferroccl/barrier/<name>/count` belongs to generation `(k-1) / world`; the last arrival of a
    /// generation publishes `__ferroccl/barrier/<name>/<generation>` and everyone else waits for that
    /// key. Calling the same name again therefore starts a new generation, as long as every call uses
    /// the same `world`. After a barrier timeout the name's generations are out of step: use a new name.
    pub fn barrier(&self, name: &str, world: usize, timeout: Duration) -> Result<()> {
        if world == 0 {
            return Err(Error::InvalidArgument(format!(
                "barrier {name:?} with world 0: at least one participant is needed"
            )));
        }
        let start = Instant::now();
        let world = i64::try_from(world).unwrap_or(i64::MAX);
        let base = format!("__ferroccl/barrier/{name}");
        let n = self.add(&format!("{base}/count"), 1)?;
        let generation = (n - 1) / world;
        let done = format!("{base}/{generation}");
        if n % world == 0 {
            // Last to arrive: release everyone. Every participant of the previous generation has
            // already left it (each of them arrived here), so its key can go.
            self.set(&done, b"1")?;
            if generation > 0 {
                self.delete(&format!("{base}/{}", generation - 1))?;
            }
            return Ok(());
        }
        let left = timeout.saturating_sub(start.elapsed());
        match self.get(&done, left) {
            Ok(_) => Ok(()),
            Err(Error::Timeout { .. }) => Err(Error::Timeout {
                during: "rendezvous barrier",
                after: timeout,
                waiting_for: None,
            }),
            Err(e) => Err(e),
        }
    }
}
