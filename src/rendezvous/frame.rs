//! Wire format of the rendezvous store.
//!
//! Every message, in both directions, is one frame:
//!
//! ```text
//! +-------+---------+--------+----------------+-----------------+
//! | magic | version | opcode | payload length | payload         |
//! | 0xFC  | 0x01    | u8     | u32 big-endian | `length` bytes  |
//! +-------+---------+--------+----------------+-----------------+
//! ```
//!
//! The payload length is at most [`MAX_PAYLOAD`] (64 MiB), and at most [`MAX_TOKEN_LEN`] (4 KiB) for
//! `AUTH`, the only frame a server reads before a connection has authenticated. Requests (client → server) use opcodes
//! `0x01..=0x06`, replies (server → client) use `0x80..=0x86`; each request gets exactly one reply.
//! Integers inside payloads are big-endian, keys are UTF-8.
//!
//! | opcode | name         | payload                                        |
//! |--------|--------------|------------------------------------------------|
//! | 0x01   | AUTH         | the token bytes (must be the first frame)      |
//! | 0x02   | SET          | key length `u32`, key, value (rest)            |
//! | 0x03   | GET          | wait in milliseconds `u64`, key (rest)         |
//! | 0x04   | ADD          | delta `i64`, key (rest)                        |
//! | 0x05   | CHECK        | key                                            |
//! | 0x06   | DELETE       | key                                            |
//! | 0x80   | OK           | empty                                          |
//! | 0x81   | VALUE        | the value                                      |
//! | 0x82   | INT          | `i64`                                          |
//! | 0x83   | BOOL         | one byte, 0 or 1                               |
//! | 0x84   | TIMEOUT      | empty (a GET waited its whole wait)            |
//! | 0x85   | ERROR        | UTF-8 message                                  |
//! | 0x86   | AUTH_FAILED  | empty (the token was wrong; connection closes) |

use std::io::Read;

/// First byte of every frame; lets the server reject random garbage (and HTTP probes) at once.
pub const MAGIC: u8 = 0xFC;
/// Protocol version; bumped on any incompatible change so mixed builds fail loudly.
pub const VERSION: u8 = 1;
/// Bytes in a frame header: magic, version, opcode, `u32` length.
pub const HEADER_LEN: usize = 7;
/// Largest payload accepted (64 MiB): a rendezvous value is an id or an address, not a tensor, and the
/// cap keeps a corrupt length prefix from allocating gigabytes.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Longest token (`FERROCCL_TOKEN`) accepted, in bytes: the largest payload of an `AUTH` frame, and of
/// the TCP transport's hello. Before a connection has authenticated, the store reads no frame longer
/// than this, so an unauthenticated peer cannot make it allocate more.
pub const MAX_TOKEN_LEN: usize = 4096;
/// "Wait forever" on the wire. Servers bound every wait by their own limit
/// ([`StoreLimits::max_wait`](super::StoreLimits::max_wait)), so this asks for the longest wait the
/// server allows.
pub const WAIT_FOREVER_MS: u64 = u64::MAX;

const OP_AUTH: u8 = 0x01;
const OP_SET: u8 = 0x02;
const OP_GET: u8 = 0x03;
const OP_ADD: u8 = 0x04;
const OP_CHECK: u8 = 0x05;
const OP_DELETE: u8 = 0x06;
const OP_OK: u8 = 0x80;
const OP_VALUE: u8 = 0x81;
const OP_INT: u8 = 0x82;
const OP_BOOL: u8 = 0x83;
const OP_TIMEOUT: u8 = 0x84;
const OP_ERROR: u8 = 0x85;
const OP_AUTH_FAILED: u8 = 0x86;

/// A client → server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The shared secret; must be the first frame of a connection.
    Auth(Vec<u8>),
    /// Store `value` under `key`, replacing any old value, and wake waiters.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Wait up to `wait_ms` for `key` to exist and return its value.
    Get {
        /// The key.
        key: String,
        /// How long the server may wait, in milliseconds ([`WAIT_FOREVER_MS`]: no limit).
        wait_ms: u64,
    },
    /// Add `delta` to the decimal counter under `key` (created at 0); reply with the new value.
    Add {
        /// The key.
        key: String,
        /// The increment.
        delta: i64,
    },
    /// Does `key` exist? Never waits.
    Check {
        /// The key.
        key: String,
    },
    /// Remove `key`; reply whether it existed.
    Delete {
        /// The key.
        key: String,
    },
}

/// A server → client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The request succeeded and has no result.
    Ok,
    /// The value of a GET.
    Value(Vec<u8>),
    /// The new counter value of an ADD.
    Int(i64),
    /// The answer of a CHECK or DELETE.
    Bool(bool),
    /// A GET waited its whole wait without the key appearing.
    Timeout,
    /// The request was refused; the message says why.
    Error(String),
    /// The AUTH token was wrong; the server closes the connection after sending this.
    AuthFailed,
}

/// Check a frame header, returning `(opcode, payload length)` or why it is not a frame.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), String> {
    if h[0] != MAGIC {
        return Err(format!(
            "bad magic byte 0x{:02x} (expected 0x{MAGIC:02x}; is this a ferroccl rendezvous peer?)",
            h[0]
        ));
    }
    if h[1] != VERSION {
        return Err(format!(
            "protocol version {} is not supported (this build speaks version {VERSION}); run the same ferroccl version on every rank",
            h[1]
        ));
    }
    let len = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(format!(
            "frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        ));
    }
    Ok((h[2], len))
}

/// True for opcodes a client may send (checked before reading the payload).
pub fn is_request_op(op: u8) -> bool {
    (OP_AUTH..=OP_DELETE).contains(&op)
}

/// True for the AUTH opcode, the only one a server accepts before a connection has authenticated
/// (checked before reading the payload).
pub fn is_auth_op(op: u8) -> bool {
    op == OP_AUTH
}

/// The name of a request opcode, for logs and error messages.
pub fn request_name(op: u8) -> &'static str {
    match op {
        OP_AUTH => "AUTH",
        OP_SET => "SET",
        OP_GET => "GET",
        OP_ADD => "ADD",
        OP_CHECK => "CHECK",
        OP_DELETE => "DELETE",
        _ => "an unknown request",
    }
}

/// True for opcodes a server may send.
pub fn is_response_op(op: u8) -> bool {
    (OP_OK..=OP_AUTH_FAILED).contains(&op)
}

fn frame(op: u8, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.push(MAGIC);
    out.push(VERSION);
    out.push(op);
    // Callers check `payload_len <= MAX_PAYLOAD` (which fits in u32) before encoding.
    out.extend_from_slice(&(payload_len.min(u32::MAX as usize) as u32).to_be_bytes());
    out
}

fn key_str(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| format!("key is not valid UTF-8: {e}"))
}

fn be_u64(p: &[u8], what: &str) -> Result<([u8; 8], usize), String> {
    match p.get(..8) {
        Some(b) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Ok((a, 8))
        }
        None => Err(format!(
            "{what} payload of {} bytes is too short for its 8-byte integer",
            p.len()
        )),
    }
}

impl Request {
    /// Payload size of the encoded frame (used to refuse oversize values before sending).
    pub fn payload_len(&self) -> usize {
        match self {
            Request::Auth(t) => t.len(),
            Request::Set { key, value } => 4 + key.len() + value.len(),
            Request::Get { key, .. } | Request::Add { key, .. } => 8 + key.len(),
            Request::Check { key } | Request::Delete { key } => key.len(),
        }
    }

    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Auth(_) => "AUTH",
            Request::Set { .. } => "SET",
            Request::Get { .. } => "GET",
            Request::Add { .. } => "ADD",
            Request::Check { .. } => "CHECK",
            Request::Delete { .. } => "DELETE",
        }
    }

    /// Encode as one frame (header + payload). The caller checks [`Request::payload_len`] first.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.payload_len();
        match self {
            Request::Auth(t) => {
                let mut f = frame(OP_AUTH, len);
                f.extend_from_slice(t);
                f
            }
            Request::Set { key, value } => {
                let mut f = frame(OP_SET, len);
                f.extend_from_slice(&(key.len().min(u32::MAX as usize) as u32).to_be_bytes());
                f.extend_from_slice(key.as_bytes());
                f.extend_from_slice(value);
                f
            }
            Request::Get { key, wait_ms } => {
                let mut f = frame(OP_GET, len);
                f.extend_from_slice(&wait_ms.to_be_bytes());
                f.extend_from_slice(key.as_bytes());
                f
            }
            Request::Add { key, delta } => {
                let mut f = frame(OP_ADD, len);
                f.extend_from_slice(&delta.to_be_bytes());
                f.extend_from_slice(key.as_bytes());
                f
            }
            Request::Check { key } => {
                let mut f = frame(OP_CHECK, len);
                f.extend_from_slice(key.as_bytes());
                f
            }
            Request::Delete { key } => {
                let mut f = frame(OP_DELETE, len);
                f.extend_from_slice(key.as_bytes());
                f
            }
        }
    }

    /// Decode a request payload whose header carried `op`.
    pub fn decode(op: u8, p: Vec<u8>) -> Result<Request, String> {
        match op {
            OP_AUTH => Ok(Request::Auth(p)),
            OP_SET => {
                let Some(kl) = p.get(..4) else {
                    return Err(format!(
                        "SET payload of {} bytes has no key length",
                        p.len()
                    ));
                };
                let kl = u32::from_be_bytes([kl[0], kl[1], kl[2], kl[3]]) as usize;
                let Some(key) = p.get(4..4usize.saturating_add(kl)) else {
                    return Err(format!(
                        "SET key length {kl} exceeds the {}-byte payload",
                        p.len()
                    ));
                };
                let key = key_str(key)?;
                let value = p.get(4 + kl..).unwrap_or_default().to_vec();
                Ok(Request::Set { key, value })
            }
            OP_GET => {
                let (b, n) = be_u64(&p, "GET")?;
                Ok(Request::Get {
                    key: key_str(&p[n..])?,
                    wait_ms: u64::from_be_bytes(b),
                })
            }
            OP_ADD => {
                let (b, n) = be_u64(&p, "ADD")?;
                Ok(Request::Add {
                    key: key_str(&p[n..])?,
                    delta: i64::from_be_bytes(b),
                })
            }
            OP_CHECK => Ok(Request::Check { key: key_str(&p)? }),
            OP_DELETE => Ok(Request::Delete { key: key_str(&p)? }),
            other => Err(format!("unknown request opcode 0x{other:02x}")),
        }
    }
}

impl Response {
    /// Encode as one frame (header + payload); an oversize value is replaced by an ERROR reply.
    pub fn encode(&self) -> Vec<u8> {
        let with = |op: u8, payload: &[u8]| {
            let mut f = frame(op, payload.len());
            f.extend_from_slice(payload);
            f
        };
        match self {
            Response::Ok => with(OP_OK, &[]),
            Response::Value(v) if v.len() > MAX_PAYLOAD => Response::Error(format!(
                "value of {} bytes exceeds the {MAX_PAYLOAD}-byte frame limit",
                v.len()
            ))
            .encode(),
            Response::Value(v) => with(OP_VALUE, v),
            Response::Int(i) => with(OP_INT, &i.to_be_bytes()),
            Response::Bool(b) => with(OP_BOOL, &[u8::from(*b)]),
            Response::Timeout => with(OP_TIMEOUT, &[]),
            Response::Error(m) => {
                // Truncate on a char boundary so a huge message still fits a frame.
                let mut end = m.len().min(64 * 1024);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                with(OP_ERROR, &m.as_bytes()[..end])
            }
            Response::AuthFailed => with(OP_AUTH_FAILED, &[]),
        }
    }

    /// Decode a reply payload whose header carried `op`.
    pub fn decode(op: u8, p: Vec<u8>) -> Result<Response, String> {
        let empty = |r: Response, name: &str| {
            if p.is_empty() {
                Ok(r)
            } else {
                Err(format!(
                    "{name} reply carries {} unexpected payload bytes",
                    p.len()
                ))
            }
        };
        match op {
            OP_OK => empty(Response::Ok, "OK"),
            OP_VALUE => Ok(Response::Value(p)),
            OP_INT => {
                let b: [u8; 8] = p
                    .as_slice()
                    .try_into()
                    .map_err(|_| format!("INT reply has {} bytes, expected 8", p.len()))?;
                Ok(Response::Int(i64::from_be_bytes(b)))
            }
            OP_BOOL => match p.as_slice() {
                [0] => Ok(Response::Bool(false)),
                [1] => Ok(Response::Bool(true)),
                _ => Err(format!("BOOL reply payload {p:?} is not [0] or [1]")),
            },
            OP_TIMEOUT => empty(Response::Timeout, "TIMEOUT"),
            OP_ERROR => Ok(Response::Error(String::from_utf8_lossy(&p).into_owned())),
            OP_AUTH_FAILED => empty(Response::AuthFailed, "AUTH_FAILED"),
            other => Err(format!("unknown reply opcode 0x{other:02x}")),
        }
    }
}

/// Why a blocking frame read stopped (client side).
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection; `got` bytes of the frame had arrived.
    Closed {
        /// Bytes of the frame received before the close.
        got: usize,
    },
    /// A socket error (a read timeout shows up here as `WouldBlock`/`TimedOut`).
    Io(std::io::Error),
    /// The bytes are not a valid frame.
    Bad(String),
}

fn read_exact_counting(r: &mut impl Read, buf: &mut [u8], base: usize) -> Result<(), ReadError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadError::Closed { got: base + got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// A payload buffer grows by this much at a time as bytes arrive, so a length prefix alone (garbage,
/// or a peer that stops sending) never makes the reader allocate more than about twice what arrived.
pub const READ_PIECE: usize = 64 << 10;

/// Read one reply frame from a blocking reader (the reader's own timeout bounds the wait).
pub fn read_response(r: &mut impl Read) -> Result<Response, ReadError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact_counting(r, &mut h, 0)?;
    let (op, len) = parse_header(&h).map_err(ReadError::Bad)?;
    if !is_response_op(op) {
        return Err(ReadError::Bad(format!("unknown reply opcode 0x{op:02x}")));
    }
    let mut p = Vec::new();
    while p.len() < len {
        let start = p.len();
        p.resize(start + (len - start).min(READ_PIECE), 0);
        read_exact_counting(r, &mut p[start..], HEADER_LEN + start)?;
    }
    Response::decode(op, p).map_err(ReadError::Bad)
}

/// Compare a received token with the expected one without leaking, through timing, how many leading
/// bytes matched. (The length of the expected token may leak; it is not the secret.)
pub fn constant_time_eq(got: &[u8], want: &[u8]) -> bool {
    let mut diff = u8::from(got.len() != want.len());
    for (i, w) in want.iter().enumerate() {
        let g = got.get(i).copied().unwrap_or(!*w);
        diff |= std::hint::black_box(g ^ w);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(f: &[u8]) -> (u8, Vec<u8>) {
        let h: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap_or([0; HEADER_LEN]);
        let (op, len) = parse_header(&h).unwrap_or((0, 0));
        assert_eq!(len, f.len() - HEADER_LEN);
        (op, f[HEADER_LEN..].to_vec())
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Auth(b"secret".to_vec()),
            Request::Set {
                key: "k/é".into(),
                value: vec![0, 1, 2, 255],
            },
            Request::Get {
                key: "g".into(),
                wait_ms: 1234,
            },
            Request::Add {
                key: "c".into(),
                delta: -7,
            },
            Request::Check { key: "".into() },
            Request::Delete { key: "d".into() },
        ];
        for r in reqs {
            let (op, p) = split(&r.encode());
            assert!(is_request_op(op));
            assert_eq!(Request::decode(op, p), Ok(r));
        }
    }

    #[test]
    fn responses_round_trip() {
        let resps = [
            Response::Ok,
            Response::Value(b"v".to_vec()),
            Response::Int(i64::MIN),
            Response::Bool(true),
            Response::Timeout,
            Response::Error("nope".into()),
            Response::AuthFailed,
        ];
        for r in resps {
            let f = r.encode();
            assert_eq!(read_response(&mut f.as_slice()).ok(), Some(r));
        }
    }

    #[test]
    fn bad_frames_are_rejected() {
        assert!(parse_header(&[0, VERSION, OP_OK, 0, 0, 0, 0]).is_err());
        assert!(parse_header(&[MAGIC, 9, OP_OK, 0, 0, 0, 0]).is_err());
        assert!(parse_header(&[MAGIC, VERSION, OP_OK, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Request::decode(OP_SET, vec![0, 0, 0, 9, b'a']).is_err());
        assert!(Request::decode(OP_GET, vec![1, 2]).is_err());
        assert!(Request::decode(OP_CHECK, vec![0xff, 0xfe]).is_err());
        assert!(Request::decode(0x42, vec![]).is_err());
        assert!(Response::decode(OP_INT, vec![1]).is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }
}
