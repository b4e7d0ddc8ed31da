//! Messages between engines, and zero-copy lending.
//!
//! In one process a message can carry a *loan* instead of a copy: a pointer into the sender's buffer,
//! guarded by a mutex. The receiver reads (or reduces from) the sender's memory directly under the lock
//! and acknowledges; the sender waits for the acknowledgement before it overwrites or releases the
//! memory. If the sender gives up (timeout, lost peer, panic), dropping its [`LendGuard`] revokes the
//! loan under the same lock, so a late reader finds nothing rather than freed memory. This is what
//! makes the in-process ring single-copy, as NCCL's P2P transport is within a node.

use crate::{Error, Result};
use crossbeam::channel::{bounded, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which operation and step a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Tag {
    /// Step `step` of collective number `seq` on this communicator.
    Coll { seq: u64, step: u32 },
    /// Point-to-point message with a user tag.
    P2p(u32),
    /// A control frame between TCP ranks (see `engine::health`); never reaches an engine.
    Ctl,
}

/// The signature of the collective a message belongs to: what checked mode compares up front, here
/// carried by every collective message (in memory, and in the TCP frame header) so the receiver
/// compares it with its own call for free and a mismatch is [`Error::CollectiveMismatch`] without
/// `FERROCCL_CHECK=1`. The sequence number travels in the [`Tag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sig {
    pub kind: u8,
    pub dtype: u8,
    /// `u8::MAX`: no reduction.
    pub op: u8,
    /// `u32::MAX`: no root.
    pub root: u32,
    /// `u64::MAX`: no single count (all_to_allv, barrier).
    pub count: u64,
}

impl Sig {
    /// The signature of point-to-point messages (never compared).
    pub const NONE: Sig = Sig {
        kind: 0,
        dtype: 0,
        op: u8::MAX,
        root: u32::MAX,
        count: u64::MAX,
    };
    /// Bytes of the signature in a TCP frame header.
    pub const WIRE: usize = 15;

    /// The signature of `c` (from [`crate::Collective::signature`]).
    pub fn of(c: &crate::CollectiveRef<'_>) -> Sig {
        let s = c.signature();
        Sig {
            kind: s[0] as u8,
            dtype: s[1] as u8,
            op: if s[4] == u64::MAX {
                u8::MAX
            } else {
                s[4] as u8
            },
            root: if s[3] == u64::MAX {
                u32::MAX
            } else {
                s[3].min(u32::MAX as u64 - 1) as u32
            },
            count: s[2],
        }
    }

    /// Human-readable, as checked mode writes it, with the collective's number.
    pub fn describe(&self, seq: u64) -> String {
        let w = |x: u64, none: u64| if x == none { u64::MAX } else { x };
        let words = [
            self.kind as u64,
            self.dtype as u64,
            self.count,
            w(self.root as u64, u32::MAX as u64),
            w(self.op as u64, u8::MAX as u64),
        ];
        format!(
            "{} as collective #{seq}",
            crate::comm::describe_signature(&words)
        )
    }

    pub fn to_wire(self) -> [u8; Sig::WIRE] {
        let mut b = [0u8; Sig::WIRE];
        b[0] = self.kind;
        b[1] = self.dtype;
        b[2] = self.op;
        b[3..7].copy_from_slice(&self.root.to_le_bytes());
        b[7..15].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    pub fn from_wire(b: &[u8; Sig::WIRE]) -> Sig {
        Sig {
            kind: b[0],
            dtype: b[1],
            op: b[2],
            root: u32::from_le_bytes([b[3], b[4], b[5], b[6]]),
            count: u64::from_le_bytes([b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14]]),
        }
    }
}

struct LendSlot {
    mem: Mutex<Option<(usize, usize)>>,
    /// Address of a writable region of the same length, for read-write loans; 0 for read-only ones.
    out: usize,
    ack: Sender<()>,
}

/// A loan of the sender's memory (see the module docs).
pub(crate) struct Lend(Arc<LendSlot>);

/// The sender's side of a loan; drop revokes it.
pub(crate) struct LendGuard {
    slot: Arc<LendSlot>,
    ack: Receiver<()>,
    pub peer: usize,
    /// Set once the acknowledgement was taken, so waiting twice is harmless.
    acked: std::cell::Cell<bool>,
}

/// Lend `bytes` to a receiver.
///
/// Safety contract (upheld by the engine): the memory stays valid and unmodified until the returned
/// guard has either received its acknowledgement ([`LendGuard::wait`]) or been dropped.
pub(crate) fn lend(bytes: &[u8], peer: usize) -> (Lend, LendGuard) {
    lend_slot(bytes, 0, peer)
}

/// Lend `src` for reading and `dst` (same length; it may be `src` itself) for writing.
///
/// Safety contract: as [`lend`], and the lender does not touch `dst` either until the guard was
/// acknowledged or dropped; `dst` must be valid for `src.len()` bytes of writes.
pub(crate) fn lend_rw(src: &[u8], dst: *mut u8, peer: usize) -> (Lend, LendGuard) {
    lend_slot(src, dst as usize, peer)
}

fn lend_slot(bytes: &[u8], out: usize, peer: usize) -> (Lend, LendGuard) {
    let (tx, rx) = bounded(1);
    let slot = Arc::new(LendSlot {
        mem: Mutex::new(Some((bytes.as_ptr() as usize, bytes.len()))),
        out,
        ack: tx,
    });
    (
        Lend(slot.clone()),
        LendGuard {
            slot,
            ack: rx,
            peer,
            acked: std::cell::Cell::new(false),
        },
    )
}

impl Lend {
    /// Read the lent bytes; `None` if the lender revoked the loan.
    pub fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let g = self.0.mem.lock().unwrap_or_else(|e| e.into_inner());
        let (ptr, len) = (*g)?;
        // SAFETY: the lender keeps [ptr, ptr+len) valid and unmodified until it has our ack or has
        // revoked the loan, and revoking takes this lock, which we hold until we are done reading.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let r = f(bytes);
        drop(g);
        let _ = self.0.ack.try_send(());
        Some(r)
    }

    pub fn len(&self) -> usize {
        self.live_len().unwrap_or(0)
    }

    /// The lent length; `None` once the lender revoked the loan.
    pub fn live_len(&self) -> Option<usize> {
        let g = self.0.mem.lock().unwrap_or_else(|e| e.into_inner());
        g.map(|(_, l)| l)
    }

    /// Run `f` on bytes `[offset, offset + len)` of the loan *without* acknowledging it; `None` if
    /// the lender revoked the loan or the range is outside it.
    ///
    /// For a reader that consumes a loan in pieces (the TCP writer copies one chunk at a time into
    /// its socket buffer, so that the revocation lock is never held across a socket write): `f` runs
    /// under the loan's lock, so it must be short and must not block. Call [`Lend::ack`] after the
    /// last piece.
    pub fn with_part<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let g = self.0.mem.lock().unwrap_or_else(|e| e.into_inner());
        let (ptr, total) = (*g)?;
        if offset.checked_add(len)? > total {
            return None;
        }
        // SAFETY: as in `with`: the lender keeps [ptr, ptr+total) valid and unmodified until it has
        // our ack or has revoked the loan (under this lock, which we hold); the range is in bounds.
        let bytes = unsafe { std::slice::from_raw_parts((ptr as *const u8).add(offset), len) };
        let r = f(bytes);
        drop(g);
        Some(r)
    }

    /// Tell the lender we are done with its memory (after the last [`Lend::with_part`]).
    pub fn ack(&self) {
        let _ = self.0.ack.try_send(());
    }
}

/// One loan held by [`with_loans`]: where to read and (read-write loans) where to write `len` bytes.
#[derive(Clone, Copy)]
pub(crate) struct Region {
    pub src: *const u8,
    /// Null for a read-only loan.
    pub dst: *mut u8,
    pub len: usize,
}

/// Hold several loans at once (every lock for the whole call), run `f` on their regions, then
/// acknowledge them all. A revoked loan (or a copied message, which has no lender to write back to)
/// is an error naming its sender; with `write`, so is a read-only loan.
///
/// `f` may read `src` and write `dst` of each region; they may alias (an in-place lender), so `f`
/// must not keep a read view and a write view of one region alive at the same time.
pub(crate) fn with_loans<R>(
    loans: &[(usize, &Payload)],
    write: bool,
    f: impl FnOnce(&[Region]) -> R,
) -> Result<R> {
    let mut locks = Vec::with_capacity(loans.len());
    let mut regions = Vec::with_capacity(loans.len());
    for &(src, p) in loans {
        let lost = Error::PeerLost {
            rank: src,
            during: "reading a message (the sender gave up)",
        };
        let Payload::Lent(l) = p else {
            return Err(lost);
        };
        let g = l.0.mem.lock().unwrap_or_else(|e| e.into_inner());
        let Some((ptr, len)) = *g else {
            return Err(lost);
        };
        if write && l.0.out == 0 {
            return Err(Error::InvalidArgument(
                "internal: a read-only loan was used for writing".into(),
            ));
        }
        regions.push(Region {
            src: ptr as *const u8,
            dst: l.0.out as *mut u8,
            len,
        });
        locks.push(g);
    }
    let r = f(&regions);
    drop(locks);
    for &(_, p) in loans {
        if let Payload::Lent(l) = p {
            let _ = l.0.ack.try_send(());
        }
    }
    Ok(r)
}

impl LendGuard {
    /// Wait until the receiver has read the loan. `alive` is polled so a lost peer ends the wait.
    pub fn wait(&self, deadline: Instant, alive: &dyn Fn() -> Result<()>) -> Result<()> {
        while !self.acked.get() {
            match self.ack.recv_timeout(Duration::from_millis(5)) {
                Ok(()) | Err(crossbeam::channel::RecvTimeoutError::Disconnected) => {
                    self.acked.set(true);
                    return Ok(());
                }
                Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
            }
            alive()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    during: "waiting for a peer to read a loaned buffer",
                    after: Duration::ZERO,
                    waiting_for: Some(self.peer),
                });
            }
        }
        Ok(())
    }
}

impl Drop for LendGuard {
    fn drop(&mut self) {
        let mut g = self.slot.mem.lock().unwrap_or_else(|e| e.into_inner());
        *g = None;
    }
}

/// What a message carries.
pub(crate) enum Payload {
    /// An owned copy, 8-byte aligned so it can be viewed as any element type.
    Bytes(Aligned),
    /// A loan of the sender's memory (in-process only).
    Lent(Lend),
}

impl Payload {
    /// Read the payload; a revoked loan is reported as a lost sender.
    pub fn with<R>(&self, src: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        match self {
            Payload::Bytes(b) => Ok(f(b.as_bytes())),
            Payload::Lent(l) => l.with(f).ok_or(Error::PeerLost {
                rank: src,
                during: "reading a message (the sender gave up)",
            }),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len,
            Payload::Lent(l) => l.len(),
        }
    }
}

/// One message.
pub(crate) struct Msg {
    /// Sender's rank in the communicator.
    pub src: usize,
    pub tag: Tag,
    pub payload: Payload,
    /// Modelled arrival time (seconds) under a link model; 0 otherwise.
    pub arrive: f64,
    /// The signature of the sender's collective ([`Sig::NONE`] for point-to-point).
    pub sig: Sig,
}

/// An 8-byte-aligned byte buffer (a `Vec<u8>` is only 1-aligned, and reductions view payloads as
/// `f64`/`i64`).
pub(crate) struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    /// Resize to `len` bytes (new bytes are zero), reporting an allocation failure instead of
    /// aborting. Growth is amortised (the capacity at most doubles past what is asked for), so a
    /// buffer grown piece by piece as bytes arrive costs linear time and never holds more than about
    /// twice the bytes that did arrive.
    pub fn try_resize(
        &mut self,
        len: usize,
    ) -> std::result::Result<(), std::collections::TryReserveError> {
        if len < self.len {
            // keep the promise that bytes past `len` read as zero if the buffer grows again
            let old = self.len;
            bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[len..old].fill(0);
        }
        let words = len.div_ceil(8);
        if words > self.words.len() {
            self.words.try_reserve(words - self.words.len())?;
        }
        self.words.resize(words, 0);
        self.len = len;
        Ok(())
    }
    pub fn zeroed(len: usize) -> Aligned {
        Aligned {
            words: vec![0u64; len.div_ceil(8)],
            len,
        }
    }
    pub fn copy_of(b: &[u8]) -> Aligned {
        let mut a = Aligned::zeroed(b.len());
        a.as_bytes_mut().copy_from_slice(b);
        a
    }
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}
