//! Completion: what a blocking call, a [`Work`](crate::Work) and `synchronize` wait for.
//!
//! Every wait polls a CUDA event and NCCL's asynchronous error flag together, so a failed peer shows
//! up as an error within the timeout. On an error or a timeout the communicator is aborted
//! (`ncclCommAbort`): the peers' pending calls then fail too, instead of hanging.

use super::p2p::{self, Posted};
use super::{ck, Raw};
use crate::comm::CollectiveOwned;
use crate::device::drv;
use crate::work::Pending;
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaEvent};
use cudarc::nccl::sys;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What waits and late launches need of a communicator; cloned into every pending operation.
#[derive(Clone)]
pub(super) struct Handle {
    pub(super) comm: Arc<Mutex<Raw>>,
    /// Set by an abort, and after the communicator was destroyed: NCCL must not be called again.
    pub(super) broken: Arc<AtomicBool>,
    pub(super) ctx: Arc<CudaContext>,
    /// Point-to-point operations posted by `isend`/`irecv` and not launched yet ([`p2p`]).
    pub(super) posted: Arc<Mutex<Vec<Posted>>>,
    pub(super) rank: usize,
}

impl Handle {
    pub(super) fn new(raw: sys::ncclComm_t, ctx: Arc<CudaContext>, rank: usize) -> Handle {
        Handle {
            comm: Arc::new(Mutex::new(Raw(raw))),
            broken: Arc::new(AtomicBool::new(false)),
            ctx,
            posted: Arc::new(Mutex::new(Vec::new())),
            rank,
        }
    }

    pub(super) fn lost(&self, during: &'static str) -> Error {
        Error::PeerLost {
            rank: self.rank,
            during,
        }
    }

    /// NCCL's asynchronous error, if any (the communicator is aborted then).
    pub(super) fn async_error(&self) -> Result<()> {
        let g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // checked under the lock: NcclComm's Drop destroys the communicator and sets `broken`
        // while holding it, so a handle that outlives the communicator never calls into it
        if self.broken.load(Ordering::Acquire) {
            return Err(self.lost("a collective on an aborted NCCL communicator"));
        }
        let mut r = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (not aborted nor destroyed, see above) and an out-pointer.
        let q = unsafe { sys::ncclCommGetAsyncError(g.0, &mut r) };
        drop(g);
        let res = ck(q, "ncclCommGetAsyncError").and_then(|_| ck(r, "asynchronous error"));
        if res.is_err() {
            self.abort();
        }
        res
    }

    pub(super) fn abort(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            let g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: valid communicator; after this it is never used again.
            let r = unsafe { sys::ncclCommAbort(g.0) };
            if let Err(e) = ck(r, "ncclCommAbort") {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Wait for an event while watching NCCL's asynchronous errors; abort on error or timeout.
pub(super) struct EventWait {
    pub(super) event: CudaEvent,
    pub(super) h: Handle,
}

impl EventWait {
    pub(super) fn poll_once(&self) -> Option<Result<()>> {
        match self.event.try_is_complete() {
            Ok(true) => return Some(Ok(())),
            Ok(false) => {}
            Err(e) => return Some(Err(drv("waiting for a collective", e))),
        }
        self.h.async_error().err().map(Err)
    }

    pub(super) fn wait(&self, timeout: Duration, during: &'static str) -> Result<()> {
        match poll_for(timeout, || self.poll_once()) {
            Some(r) => r,
            None => {
                self.h.abort();
                Err(Error::Timeout {
                    during,
                    after: timeout,
                    waiting_for: None,
                })
            }
        }
    }
}

/// Call `poll` until it gives a result or `d` has passed. It polls without sleeping for the first
/// 20 ms (spinning 50 us, then yielding): a sleep costs 50-80 us of timer slack, which was 20 % of
/// a 64 MiB all-reduce on NVLink. Longer waits (a slow peer) back off to 100 us sleeps.
fn poll_for<T>(d: Duration, mut poll: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(r) = poll() {
            return Some(r);
        }
        let waited = start.elapsed();
        if waited >= d {
            return None;
        }
        if waited < Duration::from_micros(50) {
            std::hint::spin_loop();
        } else if waited < Duration::from_millis(20) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// A non-blocking operation: launched (an event to wait for) or posted (point-to-point, launched
/// with the next group).
pub(super) enum State {
    Launched(EventWait),
    Posted(Arc<p2p::Slot>, Handle),
}

pub(super) struct NcclPending {
    pub(super) state: State,
    pub(super) op: Option<CollectiveOwned>,
    /// The communicator's timeout: how long a drop waits before aborting (so that the buffers can
    /// be freed safely).
    pub(super) timeout: Duration,
}

impl NcclPending {
    /// Launch a posted operation (with every other one posted) and switch to its event.
    fn launch(&mut self) -> Result<()> {
        if let State::Posted(slot, h) = &self.state {
            let event = match slot.take() {
                Some(r) => r?,
                None => {
                    p2p::launch(h, None)?;
                    slot.take().ok_or_else(|| {
                        Error::InvalidArgument("internal: a posted NCCL operation was lost".into())
                    })??
                }
            };
            self.state = State::Launched(EventWait {
                event,
                h: h.clone(),
            });
        }
        Ok(())
    }

    fn poll_launched(&mut self) -> Option<Result<()>> {
        if let Err(e) = self.launch() {
            return Some(Err(e));
        }
        match &self.state {
            State::Launched(w) => w.poll_once(),
            State::Posted(..) => None,
        }
    }
}

impl Pending<CollectiveOwned> for NcclPending {
    fn poll(&mut self) -> Option<Result<CollectiveOwned>> {
        let r = self.poll_launched()?;
        Some(r.and_then(|_| {
            self.op
                .take()
                .ok_or_else(|| Error::InvalidArgument("work completed twice".into()))
        }))
    }
    fn wait_for(&mut self, d: Duration) -> Option<Result<CollectiveOwned>> {
        poll_for(d, || self.poll())
    }
    /// `Work::wait` timed out: abort now (the wait already took the whole timeout), so that the
    /// drop below finds the operation failed instead of waiting a second timeout.
    fn abandon(&mut self) {
        if self.op.is_some() {
            match &self.state {
                State::Launched(w) => w.h.abort(),
                State::Posted(_, h) => h.abort(),
            }
        }
    }
}

impl Drop for NcclPending {
    fn drop(&mut self) {
        // the device may still read/write the buffers: never free them before the event
        if self.op.is_some() && self.poll_launched().is_none() {
            if let State::Launched(w) = &self.state {
                let _ = w.wait(self.timeout, "dropping a pending NCCL operation");
            }
        }
    }
}
