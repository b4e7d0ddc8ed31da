//! Handles for non-blocking collectives.
//!
//! `i*` methods return a [`Work`] at once; the caller computes, then calls [`Work::wait`] (bounded by the
//! communicator's timeout) to get its buffers back. Backends complete a `Work` from a worker thread (the
//! in-process and TCP backends), from `MPI_Test` (MPI) or from a CUDA event (NCCL).

use crate::{Error, Result};
use std::time::{Duration, Instant};

/// How a backend reports progress of one pending operation.
///
/// Dropping one must be safe at any time, finished or not (own the buffers until the backend is done
/// with them, or leak them): [`Work::wait`] drops it without waiting once it timed out.
pub trait Pending<T>: Send {
    /// Return the result if the operation has finished, without blocking.
    fn poll(&mut self) -> Option<Result<T>>;
    /// Block up to `d` for the result.
    fn wait_for(&mut self, d: Duration) -> Option<Result<T>> {
        let end = Instant::now().checked_add(d); // None: "forever" (d does not fit an Instant)
        loop {
            if let Some(r) = self.poll() {
                return Some(r);
            }
            if end.is_some_and(|end| Instant::now() >= end) {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    /// Called by [`Work::wait`] once it has waited its whole timeout, just before dropping this:
    /// a backend whose drop would otherwise wait for the operation again gives up at once here
    /// (NCCL aborts the communicator), so that `wait` is bounded by one timeout in total.
    fn abandon(&mut self) {}
}

/// A pending operation delivered through a one-shot channel (worker-thread backends).
///
/// The worker owns the operation's buffers, so dropping this early is safe: the worker finishes (or
/// fails) the operation on its own and drops the result nobody takes.
pub struct ChannelPending<T> {
    rx: crossbeam::channel::Receiver<Result<T>>,
    rank: usize,
}

impl<T> ChannelPending<T> {
    /// The result of an operation of rank `rank`'s worker arrives on `rx`; if the worker drops the
    /// sender without replying (it stopped or panicked), the result is [`Error::PeerLost`] naming
    /// `rank`, which is fatal: that communicator is broken.
    pub fn new(rx: crossbeam::channel::Receiver<Result<T>>, rank: usize) -> Self {
        ChannelPending { rx, rank }
    }
}

impl<T: Send> Pending<T> for ChannelPending<T> {
    fn poll(&mut self) -> Option<Result<T>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(crossbeam::channel::TryRecvError::Empty) => None,
            Err(crossbeam::channel::TryRecvError::Disconnected) => Some(Err(Error::PeerLost {
                rank: self.rank,
                during:
                    "a non-blocking operation (this rank's worker stopped before completing it: \
                         the communicator was dropped or the worker panicked)",
            })),
        }
    }
    fn wait_for(&mut self, d: Duration) -> Option<Result<T>> {
        match self.rx.recv_timeout(d) {
            Ok(r) => Some(r),
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => self.poll(),
        }
    }
}

type MapFn<T, U> = Box<dyn FnOnce(T) -> Result<U> + Send>;

struct Mapped<T, U> {
    inner: Box<dyn Pending<T>>,
    f: Option<MapFn<T, U>>,
}

impl<T: Send, U: Send> Pending<U> for Mapped<T, U> {
    fn poll(&mut self) -> Option<Result<U>> {
        let r = self.inner.poll()?;
        Some(self.finish(r))
    }
    fn wait_for(&mut self, d: Duration) -> Option<Result<U>> {
        let r = self.inner.wait_for(d)?;
        Some(self.finish(r))
    }
    fn abandon(&mut self) {
        self.inner.abandon();
    }
}

impl<T, U> Mapped<T, U> {
    fn finish(&mut self, r: Result<T>) -> Result<U> {
        let f = self
            .f
            .take()
            .ok_or_else(|| Error::InvalidArgument("work handle completed twice".into()))?;
        r.and_then(f)
    }
}

enum State<T> {
    Pending(Box<dyn Pending<T>>),
    Done(Result<T>),
    Taken,
}

/// A non-blocking collective in flight. Dropping it without waiting blocks until the operation has
/// finished (bounded by the timeout), because the backend may still be reading or writing the buffers.
///
/// [`Work::wait`] is bounded by one timeout in total: when it times out, the pending operation is
/// dropped at once rather than waited for a second time. That is safe with every built-in backend,
/// whose pending operations own their buffers and make dropping safe by themselves: the in-process
/// and TCP workers own the buffers of the jobs they run (a dropped `irecv` is also cancelled, so a
/// message that arrives after the drop waits for the next receive instead of vanishing; one that
/// completes the receive while the handle is being dropped goes with it); MPI leaks buffers that MPI may
/// still use; NCCL waits for the operation's event in its own `Drop`, or, after
/// [`Pending::abandon`], aborts the communicator. A [`Pending`] of another backend must do the same.
pub struct Work<T: Send + 'static> {
    state: State<T>,
    timeout: Duration,
    during: &'static str,
}

impl<T: Send + 'static> Work<T> {
    /// A handle that is already complete.
    pub fn ready(r: Result<T>, during: &'static str) -> Self {
        Work {
            state: State::Done(r),
            timeout: Duration::ZERO,
            during,
        }
    }

    /// Wrap a backend's pending operation; `timeout` bounds [`Work::wait`].
    pub fn new(p: Box<dyn Pending<T>>, timeout: Duration, during: &'static str) -> Self {
        Work {
            state: State::Pending(p),
            timeout,
            during,
        }
    }

    /// True once the operation has finished (successfully or not). Never blocks.
    pub fn is_done(&mut self) -> bool {
        if let State::Pending(p) = &mut self.state {
            if let Some(r) = p.poll() {
                self.state = State::Done(r);
            }
        }
        !matches!(self.state, State::Pending(_))
    }

    /// Block up to `d`; true once the operation has finished. Get the result with [`Work::wait`].
    pub fn wait_timeout(&mut self, d: Duration) -> bool {
        if let State::Pending(p) = &mut self.state {
            if let Some(r) = p.wait_for(d) {
                self.state = State::Done(r);
            }
        }
        !matches!(self.state, State::Pending(_))
    }

    /// Block until the operation finishes (at most the communicator's timeout) and return its buffers.
    pub fn wait(mut self) -> Result<T> {
        match std::mem::replace(&mut self.state, State::Taken) {
            State::Done(r) => r,
            State::Taken => Err(Error::InvalidArgument(
                "work handle already waited on".into(),
            )),
            State::Pending(mut p) => match p.wait_for(self.timeout) {
                Some(r) => r,
                None => {
                    // Dropped here, not drained again by `Drop` (that was a second timeout): a
                    // `Pending` makes its own drop safe (see the type docs), and gives up at once
                    // after `abandon`.
                    p.abandon();
                    drop(p);
                    Err(Error::Timeout {
                        during: self.during,
                        after: self.timeout,
                        waiting_for: None,
                    })
                }
            },
        }
    }

    /// Transform the result when it completes.
    pub fn map<U: Send + 'static>(
        mut self,
        f: impl FnOnce(T) -> Result<U> + Send + 'static,
    ) -> Work<U> {
        let state = match std::mem::replace(&mut self.state, State::Taken) {
            State::Done(r) => State::Done(r.and_then(f)),
            State::Taken => State::Done(Err(Error::InvalidArgument(
                "work handle already waited on".into(),
            ))),
            State::Pending(p) => State::Pending(Box::new(Mapped {
                inner: p,
                f: Some(Box::new(f)),
            })),
        };
        Work {
            state,
            timeout: self.timeout,
            during: self.during,
        }
    }
}

impl<T: Send + 'static> Drop for Work<T> {
    fn drop(&mut self) {
        if let State::Pending(p) = &mut self.state {
            let _ = p.wait_for(self.timeout);
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for Work<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self.state {
            State::Pending(_) => "pending",
            State::Done(Ok(_)) => "done",
            State::Done(Err(_)) => "failed",
            State::Taken => "taken",
        };
        write!(f, "Work({}: {s})", self.during)
    }
}
