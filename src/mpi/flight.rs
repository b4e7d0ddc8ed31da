//! One MPI operation in flight: posting the immediate (`MPI_I*`) call for a [`CollectiveRef`] and
//! polling it with `MPI_Test` until it completes.
//!
//! Blocking and non-blocking collectives share this code: a blocking call posts and then polls in a
//! loop bounded by the communicator's timeout ([`super::MpiComm`]), a non-blocking one hands the
//! [`Flight`] to a [`crate::Work`].
//!
//! Receives are two-staged so that a length mismatch is reported exactly, whatever the message's size:
//! `MPI_Improbe` matches the message and reports its element count; if it equals the buffer's length
//! the message is received with `MPI_Imrecv` into the buffer, otherwise into a scratch buffer and the
//! receive fails with [`Error::LengthMismatch`] (the message is consumed, as with the other backends).
//! Until the probe matched, nothing refers to the buffer, so a receive that times out in that stage can
//! be abandoned safely.

use super::session::{InPlace, Session};
use crate::comm::CollectiveRef;
use crate::{Buf, BufMut, Collective, DType, Error, ReduceOp, Result};
use mpi::ffi;
use std::os::raw::{c_int, c_void};

/// What a flight needs of its communicator.
pub(crate) struct Target<'a> {
    pub(crate) session: &'a Session,
    pub(crate) comm: ffi::MPI_Comm,
    pub(crate) world: usize,
    pub(crate) rank: usize,
    pub(crate) tag_ub: c_int,
}

enum Stage {
    /// A receive waiting for its message to arrive (nothing posted yet).
    Probe {
        buf: *mut u8,
        len: usize,
        dtype: DType,
        peer: c_int,
        tag: c_int,
    },
    /// An MPI request to test.
    Request(ffi::MPI_Request),
    /// Completed (or failed).
    Done,
}

enum After {
    Nothing,
    /// Divide the reduced buffer by the world size (`ReduceOp::Avg`).
    Avg {
        ptr: *mut u8,
        bytes: usize,
        dtype: DType,
        n: usize,
    },
    /// The message had a different length; fail once it has been drained.
    Mismatch {
        peer: c_int,
        tag: c_int,
        expected: usize,
        got: usize,
    },
}

/// An operation in flight. Holds raw pointers into the caller's buffers (borrowed views for blocking
/// calls, the boxed owned buffers for non-blocking ones) and the arrays MPI may read until completion.
pub(crate) struct Flight {
    stage: Stage,
    /// `MPI_Ialltoallv`'s counts and displacements, which must outlive the request.
    arrays: Vec<Vec<c_int>>,
    /// In-place copy (unknown MPI library) or the drain buffer of a mismatched receive.
    scratch: Vec<u8>,
    after: After,
}

// SAFETY: the raw pointers point into buffers that the owner of the Flight keeps alive and untouched
// until the flight completes (the boxed buffers of a non-blocking collective travel with it); the MPI
// request handle may be tested from any thread under the session's threading policy.
unsafe impl Send for Flight {}

fn count(n: usize, what: &str) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| {
        Error::InvalidArgument(format!(
            "{what}: {n} elements exceed MPI's int count limit ({}); split the buffer into smaller collectives",
            c_int::MAX
        ))
    })
}

fn rank_arg(r: usize) -> Result<c_int> {
    c_int::try_from(r)
        .map_err(|_| Error::InvalidArgument(format!("rank {r} does not fit an MPI int")))
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what}: the MPI backend takes host buffers only; copy device memory to the host first, or use the \
         NCCL backend (feature `cuda`) for device buffers"
    ))
}

/// Where empty buffers point. An empty Rust slice has a dangling address equal to its alignment — 1
/// for `u8`, which is Open MPI's `MPI_IN_PLACE` — so zero-length buffers are handed to MPI as this
/// (never accessed) address instead.
static EMPTY: [u64; 1] = [0];

fn host(b: &Buf<'_>, what: &str) -> Result<*const c_void> {
    let bytes = b.host_bytes().ok_or_else(|| unsupported(what))?;
    Ok(if bytes.is_empty() {
        EMPTY.as_ptr().cast()
    } else {
        bytes.as_ptr().cast()
    })
}

fn host_mut(b: &mut BufMut<'_>, what: &str) -> Result<*mut u8> {
    let bytes = b.host_bytes_mut().ok_or_else(|| unsupported(what))?;
    Ok(if bytes.is_empty() {
        // MPI never writes through it: every count involved is zero.
        EMPTY.as_ptr().cast_mut().cast()
    } else {
        bytes.as_mut_ptr()
    })
}

fn scratch_ptr(v: &mut [u8]) -> *mut u8 {
    if v.is_empty() {
        EMPTY.as_ptr().cast_mut().cast()
    } else {
        v.as_mut_ptr()
    }
}

impl Flight {
    fn new() -> Flight {
        Flight {
            stage: Stage::Done,
            arrays: Vec::new(),
            scratch: Vec::new(),
            after: After::Nothing,
        }
    }

    fn avg(&mut self, op: ReduceOp, ptr: *mut u8, bytes: usize, dtype: DType, n: usize) {
        if op == ReduceOp::Avg && bytes > 0 {
            self.after = After::Avg {
                ptr,
                bytes,
                dtype,
                n,
            };
        }
    }

    /// True while MPI may still read or write the buffers (a request has been posted and not completed).
    pub(crate) fn in_flight(&self) -> bool {
        matches!(self.stage, Stage::Request(_))
    }

    /// Post the immediate MPI call for a validated collective.
    pub(crate) fn post(t: &Target<'_>, c: CollectiveRef<'_>) -> Result<Flight> {
        use Collective as C;
        let s = t.session;
        s.alive()?;
        let mut f = Flight::new();
        // SAFETY: reading rsmpi's exported null handle.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let comm = t.comm;
        match c {
            C::AllReduce { send, mut recv, op } => {
                let what = "all_reduce";
                let (dt, mop, n) = (
                    s.datatype(recv.dtype)?,
                    s.op(recv.dtype, op)?,
                    count(recv.len, what)?,
                );
                let rp = host_mut(&mut recv, what)?;
                let sp: *const c_void = match send {
                    Some(b) => host(&b, what)?,
                    None => match s.in_place {
                        InPlace::Sentinel(p) => p as *const c_void,
                        InPlace::Copy => {
                            f.scratch = recv
                                .host_bytes_mut()
                                .map(|b| b.to_vec())
                                .unwrap_or_default();
                            scratch_ptr(&mut f.scratch).cast_const().cast()
                        }
                    },
                };
                f.avg(op, rp, recv.byte_len(), recv.dtype, t.world);
                // SAFETY: pointers to `n` elements of `dt` that stay valid until the request completes.
                s.call("MPI_Iallreduce", || unsafe {
                    ffi::MPI_Iallreduce(sp, rp.cast(), n, dt, mop, comm, &mut req)
                })?;
            }
            C::ReduceScatter { send, mut recv, op } => {
                let what = "reduce_scatter";
                let (dt, mop, n) = (
                    s.datatype(recv.dtype)?,
                    s.op(recv.dtype, op)?,
                    count(recv.len, what)?,
                );
                count(send.len, what)?;
                let sp = host(&send, what)?;
                let rp = host_mut(&mut recv, what)?;
                f.avg(op, rp, recv.byte_len(), recv.dtype, t.world);
                // SAFETY: as above (send holds world × n elements, checked by validation).
                s.call("MPI_Ireduce_scatter_block", || unsafe {
                    ffi::MPI_Ireduce_scatter_block(sp, rp.cast(), n, dt, mop, comm, &mut req)
                })?;
            }
            C::AllGather { send, mut recv } => {
                let what = "all_gather";
                let (dt, n) = (s.datatype(send.dtype)?, count(send.len, what)?);
                count(recv.len, what)?;
                let sp = host(&send, what)?;
                let rp = host_mut(&mut recv, what)?;
                // SAFETY: as above (recv holds world × n elements).
                s.call("MPI_Iallgather", || unsafe {
                    ffi::MPI_Iallgather(sp, n, dt, rp.cast(), n, dt, comm, &mut req)
                })?;
            }
            C::Broadcast { mut buf, root } => {
                let what = "broadcast";
                let (dt, n, root) = (
                    s.datatype(buf.dtype)?,
                    count(buf.len, what)?,
                    rank_arg(root)?,
                );
                let p = host_mut(&mut buf, what)?;
                // SAFETY: as above.
                s.call("MPI_Ibcast", || unsafe {
                    ffi::MPI_Ibcast(p.cast(), n, dt, root, comm, &mut req)
                })?;
            }
            C::Reduce {
                send,
                recv,
                op,
                root,
            } => {
                let what = "reduce";
                let (dt, mop, n) = (
                    s.datatype(send.dtype)?,
                    s.op(send.dtype, op)?,
                    count(send.len, what)?,
                );
                let is_root = t.rank == root;
                let root = rank_arg(root)?;
                let sp = host(&send, what)?;
                let rp: *mut u8 = match recv {
                    Some(mut r) if is_root => {
                        let p = host_mut(&mut r, what)?;
                        f.avg(op, p, r.byte_len(), r.dtype, t.world);
                        p
                    }
                    _ => std::ptr::null_mut(),
                };
                // SAFETY: as above; the receive buffer is significant at the root only.
                s.call("MPI_Ireduce", || unsafe {
                    ffi::MPI_Ireduce(sp, rp.cast(), n, dt, mop, root, comm, &mut req)
                })?;
            }
            C::AllToAll { send, mut recv } => {
                let what = "all_to_all";
                let block = send.len / t.world.max(1);
                let (dt, n) = (s.datatype(send.dtype)?, count(block, what)?);
                count(send.len, what)?;
                let sp = host(&send, what)?;
                let rp = host_mut(&mut recv, what)?;
                // SAFETY: as above (world blocks of n elements each side).
                s.call("MPI_Ialltoall", || unsafe {
                    ffi::MPI_Ialltoall(sp, n, dt, rp.cast(), n, dt, comm, &mut req)
                })?;
            }
            C::AllToAllv {
                send,
                send_counts,
                mut recv,
                recv_counts,
            } => {
                let what = "all_to_allv";
                let dt = s.datatype(send.dtype)?;
                let ints = |v: &[usize]| -> Result<(Vec<c_int>, Vec<c_int>)> {
                    let counts = v
                        .iter()
                        .map(|&x| count(x, what))
                        .collect::<Result<Vec<_>>>()?;
                    let mut displs = Vec::with_capacity(v.len());
                    let mut at = 0usize;
                    for &x in v {
                        displs.push(count(at, "all_to_allv displacement")?);
                        at += x;
                    }
                    count(at, what)?;
                    Ok((counts, displs))
                };
                let (sc, sd) = ints(&send_counts)?;
                let (rc, rd) = ints(&recv_counts)?;
                let sp = host(&send, what)?;
                let rp = host_mut(&mut recv, what)?;
                f.arrays = vec![sc, sd, rc, rd];
                let a = &f.arrays;
                let (scp, sdp, rcp, rdp) =
                    (a[0].as_ptr(), a[1].as_ptr(), a[2].as_ptr(), a[3].as_ptr());
                // SAFETY: as above; the count/displacement arrays live in `f.arrays` (heap memory that
                // does not move with `f`) until the request completes.
                s.call("MPI_Ialltoallv", || unsafe {
                    ffi::MPI_Ialltoallv(sp, scp, sdp, dt, rp.cast(), rcp, rdp, dt, comm, &mut req)
                })?;
            }
            C::Send { buf, peer, tag } => {
                let what = "send";
                let (dt, n, peer, tag) = (
                    s.datatype(buf.dtype)?,
                    count(buf.len, what)?,
                    rank_arg(peer)?,
                    tag_arg(tag, t)?,
                );
                let p = host(&buf, what)?;
                // SAFETY: as above.
                s.call("MPI_Isend", || unsafe {
                    ffi::MPI_Isend(p, n, dt, peer, tag, comm, &mut req)
                })?;
            }
            C::Recv { mut buf, peer, tag } => {
                let what = "recv";
                count(buf.len, what)?;
                let tag = tag_arg(tag, t)?;
                f.stage = Stage::Probe {
                    buf: host_mut(&mut buf, what)?,
                    len: buf.len,
                    dtype: buf.dtype,
                    peer: rank_arg(peer)?,
                    tag,
                };
                return Ok(f);
            }
            C::Barrier => {
                // SAFETY: no buffers.
                s.call("MPI_Ibarrier", || unsafe {
                    ffi::MPI_Ibarrier(comm, &mut req)
                })?;
            }
        }
        f.stage = Stage::Request(req);
        Ok(f)
    }

    /// Make progress; `Ok(true)` once complete (and the Avg division applied), `Ok(false)` while pending.
    pub(crate) fn poll(&mut self, t: &Target<'_>) -> Result<bool> {
        let s = t.session;
        loop {
            match &mut self.stage {
                Stage::Done => return Ok(true),
                Stage::Probe {
                    buf,
                    len,
                    dtype,
                    peer,
                    tag,
                } => {
                    let (buf, len, dtype, peer, tag) = (*buf, *len, *dtype, *peer, *tag);
                    let mut flag: c_int = 0;
                    // SAFETY: reading rsmpi's exported null handle; a zeroed status is a valid MPI_Status.
                    let (mut msg, mut status) = unsafe {
                        (
                            ffi::RSMPI_MESSAGE_NULL,
                            std::mem::zeroed::<ffi::MPI_Status>(),
                        )
                    };
                    // SAFETY: valid out-pointers.
                    s.call("MPI_Improbe", || unsafe {
                        ffi::MPI_Improbe(peer, tag, t.comm, &mut flag, &mut msg, &mut status)
                    })?;
                    if flag == 0 {
                        return Ok(false);
                    }
                    let dt = s.datatype(dtype)?;
                    let mut got: c_int = 0;
                    // SAFETY: `status` was filled by the matching probe.
                    s.call("MPI_Get_count", || unsafe {
                        ffi::MPI_Get_count(&status, dt, &mut got)
                    })?;
                    let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
                    // SAFETY: reading rsmpi's exported constant.
                    let undefined = got == unsafe { ffi::RSMPI_UNDEFINED };
                    if !undefined && usize::try_from(got).ok() == Some(len) {
                        // SAFETY: `buf` holds `len` == `got` elements and outlives the request.
                        s.call("MPI_Imrecv", || unsafe {
                            ffi::MPI_Imrecv(buf.cast(), got, dt, &mut msg, &mut req)
                        })?;
                    } else {
                        // Drain the message into scratch memory so it does not stay matched forever.
                        let mut bytes: c_int = 0;
                        // SAFETY: as above.
                        s.call("MPI_Get_count", || unsafe {
                            ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut bytes)
                        })?;
                        let nbytes = usize::try_from(bytes).unwrap_or(0);
                        self.scratch = vec![0u8; nbytes];
                        let p = scratch_ptr(&mut self.scratch);
                        // SAFETY: `scratch` holds `bytes` bytes and lives in `self` until completion.
                        s.call("MPI_Imrecv", || unsafe {
                            ffi::MPI_Imrecv(p.cast(), bytes, ffi::RSMPI_UINT8_T, &mut msg, &mut req)
                        })?;
                        self.after = After::Mismatch {
                            peer,
                            tag,
                            expected: len,
                            got: nbytes / dtype.size(),
                        };
                    }
                    self.stage = Stage::Request(req);
                }
                Stage::Request(req) => {
                    let mut flag: c_int = 0;
                    // SAFETY: a zeroed status is a valid MPI_Status.
                    let mut status = unsafe { std::mem::zeroed::<ffi::MPI_Status>() };
                    // SAFETY: `req` is a live request of this flight.
                    let r = s.call("MPI_Test", || unsafe {
                        ffi::MPI_Test(req, &mut flag, &mut status)
                    });
                    if let Err(e) = r {
                        if !s.is_poisoned() {
                            self.stage = Stage::Done; // MPI completed the request with an error
                        }
                        return Err(e);
                    }
                    if flag == 0 {
                        return Ok(false);
                    }
                    self.stage = Stage::Done;
                    return self.finish();
                }
            }
        }
    }

    fn finish(&mut self) -> Result<bool> {
        match std::mem::replace(&mut self.after, After::Nothing) {
            After::Nothing => Ok(true),
            After::Avg { ptr, bytes, dtype, n } => {
                // SAFETY: the operation completed, MPI no longer touches the buffer, and the owner keeps
                // it alive; `ptr` points at `bytes` bytes of it.
                let b = unsafe { std::slice::from_raw_parts_mut(ptr, bytes) };
                crate::dtype::finish_avg(dtype, ReduceOp::Avg, b, n)?;
                Ok(true)
            }
            After::Mismatch {
                peer,
                tag,
                expected,
                got,
            } => Err(Error::LengthMismatch {
                what: format!(
                    "recv from rank {peer} with tag {tag}: the message's element count differs from the buffer's \
                     (the message was consumed)"
                ),
                expected,
                got,
            }),
        }
    }
}

fn tag_arg(tag: u32, t: &Target<'_>) -> Result<c_int> {
    match c_int::try_from(tag) {
        Ok(v) if v <= t.tag_ub => Ok(v),
        _ => Err(Error::InvalidArgument(format!(
            "tag {tag} exceeds this MPI library's MPI_TAG_UB ({}); use a smaller tag",
            t.tag_ub
        ))),
    }
}
