//! The TCP key/value store: [`StoreServer`] (hosted by rank 0) and [`StoreClient`] (one per rank).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::frame::{
    self, ReadError, Request, Response, HEADER_LEN, MAX_PAYLOAD, MAX_TOKEN_LEN, READ_PIECE,
    WAIT_FOREVER_MS,
};
use crate::{Error, Result};

/// How long a new connection may take to send its AUTH frame before the server drops it.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Connections served at once (default [`DEFAULT_MAX_CONNECTIONS`]); one more is sent an ERROR
    /// frame and closed. A job needs one per rank (plus one per split communicator's client, if any).
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
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_keys: DEFAULT_MAX_KEYS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_wait: crate::config::DEFAULT_TIMEOUT,
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

/// Turn away a connection over [`StoreLimits::max_connections`]: an ERROR frame if the socket takes
/// it at once (it is fresh, so it does), then close. Never blocks the accept thread.
fn refuse(stream: TcpStream, peer: SocketAddr, max: usize, refused: &mut u64) {
    *refused += 1;
    // A flood would otherwise log a line per connection.
    if refused.is_power_of_two() {
        tracing::warn!(%peer, refused = *refused, "rendezvous store: {max} connections open (StoreLimits::max_connections); refusing new ones");
    }
    let msg = Response::Error(format!(
        "the store already serves {max} connections, its limit (StoreLimits::max_connections on rank 0); close idle clients or raise the limit"
    ));
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(&msg.encode());
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut refused = 0u64;
    while !shared.stopping() {
        match listener.accept() {
            Ok((stream, peer)) => {
                conns.retain(|h| !h.is_finished());
                if conns.len() >= shared.limits.max_connections {
                    refuse(stream, peer, shared.limits.max_connections, &mut refused);
                    continue;
                }
                let s = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name(format!("ferroccl-store-conn-{peer}"))
                    .spawn(move || serve_connection(stream, peer, s));
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "rendezvous store: cannot spawn a connection thread; dropping the connection");
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                // E.g. EMFILE or a connection reset before accept: log and keep serving.
                tracing::warn!(error = %e, "rendezvous store: accept failed");
                std::thread::sleep(POLL);
            }
        }
        // Reap finished connection threads so a long-lived server does not accumulate handles.
        conns.retain(|h| !h.is_finished());
    }
    drop(listener);
    for h in conns {
        let _ = h.join();
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

/// Read one request. `first_deadline` bounds the wait for the frame to start (None: idle forever);
/// once it has started, the rest must arrive within [`FRAME_TIMEOUT`] (and by `first_deadline`).
///
/// Before authentication (`authed == false`) only an AUTH frame of at most [`MAX_TOKEN_LEN`] bytes
/// is read: anything else is refused on its header, before any payload is allocated. The payload
/// buffer grows as bytes arrive, so a length prefix alone cannot allocate [`MAX_PAYLOAD`] either.
fn read_request(
    stream: &mut TcpStream,
    first_deadline: Option<Instant>,
    shared: &Shared,
    authed: bool,
) -> std::result::Result<Request, Stop> {
    let mut h = [0u8; HEADER_LEN];
    read_full(stream, &mut h[..1], 0, first_deadline, shared)?;
    if h[0] != frame::MAGIC {
        // Reject garbage on its first byte instead of waiting for a whole header that may never come.
        h[1] = frame::VERSION;
        return Err(Stop::Bad(
            frame::parse_header(&h)
                .err()
                .unwrap_or_else(|| "bad magic byte".into()),
        ));
    }
    let frame_deadline = Instant::now() + FRAME_TIMEOUT;
    let deadline = Some(first_deadline.map_or(frame_deadline, |d| d.min(frame_deadline)));
    read_full(stream, &mut h[1..], 1, deadline, shared)?;
    let (op, len) = frame::parse_header(&h).map_err(Stop::Bad)?;
    if !frame::is_request_op(op) {
        return Err(Stop::Bad(format!("unknown request opcode 0x{op:02x}")));
    }
    if !authed {
        if !frame::is_auth_op(op) {
            return Err(Stop::Bad(format!(
                "{} before AUTH: the first frame must authenticate",
                frame::request_name(op)
            )));
        }
        if len > MAX_TOKEN_LEN {
            return Err(Stop::Bad(format!(
                "AUTH payload of {len} bytes exceeds the {MAX_TOKEN_LEN}-byte token limit"
            )));
        }
    }
    let mut payload = Vec::new();
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
    Request::decode(op, payload).map_err(Stop::Bad)
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

fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_nodelay(true))
        .and_then(|_| stream.set_read_timeout(Some(POLL)))
        .and_then(|_| stream.set_write_timeout(Some(SERVER_WRITE_TIMEOUT)));
    if let Err(e) = setup {
        tracing::warn!(%peer, error = %e, "rendezvous store: cannot configure connection; dropping it");
        return;
    }

    // Authentication: the very first frame must be AUTH with the right token.
    let deadline = Instant::now().checked_add(shared.limits.auth_timeout);
    match read_request(&mut stream, deadline, &shared, false) {
        Ok(Request::Auth(tok)) => {
            if !frame::constant_time_eq(&tok, &shared.token) {
                tracing::warn!(%peer, "rendezvous store: wrong token; dropping connection");
                send_and_close(&mut stream, &Response::AuthFailed);
                return;
            }
            if send(&mut stream, &Response::Ok).is_err() {
                return;
            }
        }
        Ok(other) => {
            tracing::warn!(%peer, request = other.name(), "rendezvous store: request before AUTH; dropping connection");
            send_and_close(
                &mut stream,
                &Response::Error(format!(
                    "{} before AUTH: the first frame must authenticate",
                    other.name()
                )),
            );
            return;
        }
        Err(stop) => return reject(&mut stream, peer, "AUTH", stop),
    }
    tracing::debug!(%peer, "rendezvous store: client authenticated");

    loop {
        let req = match read_request(&mut stream, None, &shared, true) {
            Ok(r) => r,
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
            Request::Get { key, wait_ms } => match wait_for(&shared, &key, wait_ms, &stream) {
                Some(r) => r,
                // shutting down (closing tells the client), or the client is gone
                None => return,
            },
            Request::Add { key, delta } => add(&shared, key, delta),
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
    /// `timeout`, because rank 0 may start its server after other ranks start connecting. A wrong token
    /// gives [`Error::BadToken`]; running out of time gives [`Error::Rendezvous`] quoting the last
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
        let mut last_err: Option<String> = None;
        let stream = 'retry: loop {
            match addr.to_socket_addrs() {
                Ok(addrs) => {
                    for sa in addrs {
                        let per_try = remaining()
                            .unwrap_or(Duration::from_secs(5))
                            .clamp(Duration::from_millis(10), Duration::from_secs(5));
                        match TcpStream::connect_timeout(&sa, per_try) {
                            Ok(s) => break 'retry s,
                            Err(e) => last_err = Some(format!("{sa}: {e}")),
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::InvalidInput => {
                    return Err(Error::Config {
                        var: "rendezvous address".into(),
                        value: addr.into(),
                        why: format!("{e}; expected host:port"),
                    });
                }
                Err(e) => last_err = Some(format!("resolve {addr}: {e}")),
            }
            if remaining().is_some_and(|r| r.is_zero()) {
                return Err(Error::Rendezvous(format!(
                    "could not connect to the store at {addr} within {:?} (last error: {}); is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?",
                    start.elapsed(),
                    last_err.as_deref().unwrap_or("none")
                )));
            }
            tracing::debug!(addr, last_error = ?last_err, "rendezvous: store not reachable yet; retrying");
            std::thread::sleep(backoff.min(remaining().unwrap_or(backoff)));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        };
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io(format!("rendezvous: configure connection to {addr}"), e))?;
        let client = StoreClient {
            addr: addr.to_string(),
            conn: Mutex::new(Conn {
                stream,
                broken: None,
            }),
            reply_timeout: timeout.max(MIN_REPLY_TIMEOUT),
        };
        let auth = Request::Auth(token.as_bytes().to_vec());
        match client.request(&auth, Duration::ZERO)? {
            Response::Ok => Ok(client),
            Response::AuthFailed => Err(Error::BadToken {
                addr: addr.to_string(),
            }),
            other => Err(client.unexpected("AUTH", &other)),
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
