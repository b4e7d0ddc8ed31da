//! Point-to-point on NCCL: `isend`/`irecv` are *posted*, and launched together as one NCCL group.
//!
//! NCCL has no progress engine: a lone `ncclRecv` kernel waits on the GPU for its peer's send, and
//! operations of one communicator run in launch order. So the MPI idiom `irecv(prev); send(next)`
//! deadlocks if every call launches at once (each rank's receive waits for a send queued behind the
//! peer's own receive). ferroccl therefore keeps posted operations in a queue and launches the whole
//! queue inside one `ncclGroupStart`/`ncclGroupEnd` (as `torch.distributed.batch_isend_irecv`
//! does) when any of these happens first:
//! - a blocking `send`/`recv` (it joins the group),
//! - `wait`, `wait_timeout` or `is_done` on one of the posted operations, or its drop,
//! - any collective (launched after the group, so issue order is kept).
//!
//! What this cannot do without a progress thread: an `irecv` posted before a collective whose
//! matching send the peer posts only after that collective deadlocks (the receive launches ahead
//! of the collective and waits on the GPU for a send queued behind the peer's collective). Post the
//! matching operations on the same side of every collective, as `torch.distributed` requires too.
//!
//! A group's operations may use different streams; NCCL orders them together. Each operation's own
//! completion event is recorded on its buffer's stream after the group.

use super::wait::Handle;
use super::{ck, nccl_dtype};
use crate::device::drv;
use crate::{DType, Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::sys;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Where a posted operation's completion event lands once its group was launched.
#[derive(Default)]
pub(super) struct Slot(Mutex<Option<Result<CudaEvent>>>);

impl Slot {
    pub(super) fn take(&self) -> Option<Result<CudaEvent>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    fn put(&self, r: Result<CudaEvent>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }
}

/// One send or receive waiting for its group.
pub(super) struct Posted {
    pub(super) send: bool,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: DType,
    pub(super) peer: usize,
    pub(super) stream: Arc<CudaStream>,
    pub(super) slot: Arc<Slot>,
}

/// Queue `op` until the next launch.
pub(super) fn post(h: &Handle, op: Posted) {
    h.posted.lock().unwrap_or_else(|e| e.into_inner()).push(op);
}

/// Launch every posted operation, plus `extra`, as one NCCL group; each one's event goes to its
/// slot (or the error, so that every waiter learns it).
pub(super) fn launch(h: &Handle, extra: Option<Posted>) -> Result<()> {
    // the queue's lock is held through the launch, so concurrent launchers keep the posting order
    let mut q = h.posted.lock().unwrap_or_else(|e| e.into_inner());
    let ops: Vec<Posted> = q.drain(..).chain(extra).collect();
    if ops.is_empty() {
        return Ok(());
    }
    let res = group(h, &ops);
    drop(q);
    match res {
        Ok(()) => {
            for op in &ops {
                op.slot.put(
                    op.stream
                        .record_event(None)
                        .map_err(|e| drv("recording a point-to-point completion event", e)),
                );
            }
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            for op in &ops {
                op.slot.put(Err(Error::cuda(format!(
                    "launching a group of point-to-point operations: {msg}"
                ))));
            }
            Err(e)
        }
    }
}

/// Drop every posted operation unlaunched (the communicator is going away): their waiters get an
/// error instead of waiting on a destroyed communicator.
pub(super) fn cancel(h: &Handle) {
    let mut q = h.posted.lock().unwrap_or_else(|e| e.into_inner());
    for op in q.drain(..) {
        op.slot.put(Err(Error::PeerLost {
            rank: h.rank,
            during: "a posted send/recv whose communicator was dropped before it launched",
        }));
    }
}

fn group(h: &Handle, ops: &[Posted]) -> Result<()> {
    h.ctx
        .bind_to_thread()
        .map_err(|e| drv("binding the CUDA context", e))?;
    let g = h.comm.lock().unwrap_or_else(|e| e.into_inner());
    if h.broken.load(std::sync::atomic::Ordering::Acquire) {
        return Err(h.lost("a send/recv on an aborted NCCL communicator"));
    }
    // SAFETY: a live communicator; pointers come from validated device views that the posted
    // operations' owners keep alive until their events complete.
    unsafe {
        ck(sys::ncclGroupStart(), "group_start")?;
        let mut res = Ok(());
        for op in ops {
            let st = op.stream.cu_stream() as sys::cudaStream_t;
            let (dt, peer) = (nccl_dtype(op.dtype), op.peer as i32);
            let r = if op.send {
                sys::ncclSend(op.ptr as *const c_void, op.len, dt, peer, g.0, st)
            } else {
                sys::ncclRecv(op.ptr as *mut c_void, op.len, dt, peer, g.0, st)
            };
            res = ck(r, if op.send { "send" } else { "recv" });
            if res.is_err() {
                break;
            }
        }
        let end = ck(sys::ncclGroupEnd(), "group_end");
        res.and(end)
    }
}
