//! Gradient bucketing: fuse many small tensors into few large all-reduces, and overlap them with
//! the backward pass.
//!
//! A backward pass produces gradients last layer first. [`Bucketer::push`] copies each gradient into
//! the open bucket; when the bucket reaches its byte size (default 25 MiB, as PyTorch DDP) it is
//! launched at once as a non-blocking all-reduce, so the communication of late layers overlaps the
//! computation of earlier layers' gradients. [`Bucketer::finish`] launches the last partial bucket,
//! waits for all of them and hands every tensor's reduced values back by id.
//!
//! ```
//! use ferroccl::{bucket::Bucketer, prelude::*};
//! let out = ferroccl::local::run(2, |comm| {
//!     let mut grads = vec![vec![1.0f32; 3], vec![2.0; 5]];
//!     let mut b = Bucketer::new(comm, 16, ReduceOp::Sum); // 16-byte buckets for the example
//!     for (id, g) in grads.iter().enumerate().rev() {
//!         b.push(id, g)?;
//!     }
//!     b.finish(|id, reduced| grads[id].copy_from_slice(reduced))?;
//!     Ok(grads)
//! }).unwrap();
//! assert_eq!(out[0], vec![vec![2.0; 3], vec![4.0; 5]]);
//! ```
//!
//! Each element is reduced exactly as a per-tensor all-reduce would reduce it when the values are
//! exactly representable (integers, small sums); for general floats the order of additions may differ
//! with the bucket layout, as in every bucketing implementation, so results agree to rounding.

use crate::{Communicator, CommunicatorExt, Element, Error, ReduceOp, Result, Work};

/// What a [`Bucketer`] does with a full bucket — PyTorch DDP's "communication hook". The default,
/// [`AllReduceHook`], all-reduces it; [`crate::dgc::DgcHook`] compresses it with Deep Gradient
/// Compression instead. `bucket` numbers the buckets of a step in launch order (the same on every
/// rank, so per-bucket state such as DGC residuals stays aligned across steps).
pub trait BucketHook<T: Element> {
    /// Start communicating one bucket; the result must have the bucket's length.
    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        bucket: usize,
        data: Vec<T>,
    ) -> Result<Work<Vec<T>>>;
}

/// The default hook: a non-blocking all-reduce of the bucket with `op`.
#[derive(Debug, Clone, Copy)]
pub struct AllReduceHook(pub ReduceOp);

impl<T: Element> BucketHook<T> for AllReduceHook {
    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        _bucket: usize,
        data: Vec<T>,
    ) -> Result<Work<Vec<T>>> {
        comm.iall_reduce(data, self.0)
    }
}

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Where a tensor sits in a bucket.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: usize,
    offset: usize,
    len: usize,
}

struct InFlight<T: Element> {
    work: Work<Vec<T>>,
    slots: Vec<Slot>,
}

/// Fuses tensors into buckets and hands each bucket to its hook (all-reduce by default) as soon as it
/// is full.
pub struct Bucketer<'c, T: Element, C: Communicator + ?Sized, H: BucketHook<T> = AllReduceHook> {
    comm: &'c C,
    cap: usize,
    hook: H,
    open: Vec<T>,
    slots: Vec<Slot>,
    flights: Vec<InFlight<T>>,
    bytes_launched: usize,
    buckets_launched: usize,
}

impl<'c, T: Element, C: Communicator + ?Sized> Bucketer<'c, T, C> {
    /// A bucketer with buckets of `bucket_bytes` (at least one element) reducing with `op`.
    pub fn new(comm: &'c C, bucket_bytes: usize, op: ReduceOp) -> Self {
        Bucketer::with_hook(comm, bucket_bytes, AllReduceHook(op))
    }

    /// [`DEFAULT_BUCKET_BYTES`] buckets.
    pub fn with_default_size(comm: &'c C, op: ReduceOp) -> Self {
        Self::new(comm, DEFAULT_BUCKET_BYTES, op)
    }
}

impl<'c, T: Element, C: Communicator + ?Sized, H: BucketHook<T>> Bucketer<'c, T, C, H> {
    /// A bucketer whose full buckets go to `hook` (e.g. [`crate::dgc::DgcHook`]).
    pub fn with_hook(comm: &'c C, bucket_bytes: usize, hook: H) -> Self {
        let cap = (bucket_bytes / std::mem::size_of::<T>()).max(1);
        Bucketer {
            comm,
            cap,
            hook,
            open: Vec::with_capacity(cap.min(1 << 24)),
            slots: Vec::new(),
            flights: Vec::new(),
            bytes_launched: 0,
            buckets_launched: 0,
        }
    }

    /// Add a tensor (copied). A tensor larger than a bucket gets a bucket of its own.
    pub fn push(&mut self, id: usize, data: &[T]) -> Result<()> {
        if self.slots.iter().any(|s| s.id == id)
            || self
                .flights
                .iter()
                .any(|f| f.slots.iter().any(|s| s.id == id))
        {
            return Err(Error::InvalidArgument(format!(
                "bucketer: tensor id {id} pushed twice in one step"
            )));
        }
        if !self.open.is_empty() && self.open.len() + data.len() > self.cap {
            self.launch()?;
        }
        self.slots.push(Slot {
            id,
            offset: self.open.len(),
            len: data.len(),
        });
        self.open.extend_from_slice(data);
        if self.open.len() >= self.cap {
            self.launch()?;
        }
        Ok(())
    }

    /// Launch the open bucket now (e.g. at the end of a layer group).
    pub fn launch(&mut self) -> Result<()> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let bucket = std::mem::replace(&mut self.open, Vec::with_capacity(self.cap.min(1 << 24)));
        self.bytes_launched += bucket.len() * std::mem::size_of::<T>();
        self.buckets_launched += 1;
        let work = self
            .hook
            .launch(self.comm, self.buckets_launched - 1, bucket)?;
        self.flights.push(InFlight {
            work,
            slots: std::mem::take(&mut self.slots),
        });
        Ok(())
    }

    /// Launch what is open, wait for every bucket, and give each tensor's reduced values to `sink`.
    pub fn finish(&mut self, mut sink: impl FnMut(usize, &[T])) -> Result<()> {
        self.launch()?;
        for f in self.flights.drain(..) {
            let bucket = f.work.wait()?;
            // a custom hook may hand back fewer values than were launched: an error, not a panic
            let want = f.slots.last().map_or(0, |s| s.offset + s.len);
            if bucket.len() != want {
                return Err(Error::LengthMismatch {
                    what: "bucketer: values the hook returned for a bucket".into(),
                    expected: want,
                    got: bucket.len(),
                });
            }
            for s in f.slots {
                sink(s.id, &bucket[s.offset..s.offset + s.len]);
            }
        }
        Ok(())
    }

    /// (buckets, bytes) launched so far.
    pub fn launched(&self) -> (usize, usize) {
        (self.buckets_launched, self.bytes_launched)
    }

    /// The hook (e.g. to read DGC statistics or advance its epoch between steps).
    pub fn hook_mut(&mut self) -> &mut H {
        &mut self.hook
    }

    /// Give the hook back (to reuse its state in the next step's bucketer).
    pub fn into_hook(self) -> H {
        self.hook
    }

    /// Start a new step: bucket numbering restarts at 0 (call after [`Bucketer::finish`]).
    pub fn next_step(&mut self) {
        self.buckets_launched = 0;
        self.bytes_launched = 0;
    }
}
