//! Gradient bucketing: fuse many small tensors into few large all-reduces, and overlap them with
//! the backward pass.
//!
//! A backward pass produces gradients last layer first. [`Bucketer::push`] copies each gradient into
//! the open bucket; when the bucket reaches its byte size (default 25 MiB, as PyTorch DDP) it is
//! launched at once as a non-blocking all-reduce, so the communication of late layers overlaps the
//! computation of earlier layers' gradients. [`Bucketer::finish`] launches the last partial bucket,
//! waits for all of them, hands every tensor's reduced values back by id — and ends the step: the
//! next push starts the next step at bucket 0, so one bucketer (and its hook's per-bucket state)
//! serves the whole training run.
//!
//! ```
//! use ferroccl::prelude::*;
//! let out = ferroccl::local::run(2, |comm| {
//!     let mut grads = vec![vec![1.0f32; 3], vec![2.0; 5]];
//!     let mut b = Bucketer::new(comm, 16, ReduceOp::Sum); // 16-byte buckets for the example
//!     for _step in 0..2 {
//!         for (id, g) in grads.iter().enumerate().rev() {
//!             b.push(id, g)?;
//!         }
//!         b.finish(|id, reduced| grads[id].copy_from_slice(reduced))?;
//!     }
//!     Ok(grads)
//! }).unwrap();
//! assert_eq!(out[0], vec![vec![4.0; 3], vec![8.0; 5]]);
//! ```
//!
//! # Gradients as bucket views
//!
//! [`Bucketer::views`] lays the buckets out once, from the tensors' lengths, and hands out each
//! tensor's gradient memory *inside* its bucket ([`Bucketer::grad_mut`]), as DDP's
//! `gradient_as_bucket_view`: the backward pass writes the gradient there, [`Bucketer::mark_ready`]
//! says it is complete (a bucket launches once all its tensors are ready, buckets in order), and
//! after [`Bucketer::finish_in_place`] the reduced values are read in place ([`Bucketer::grad`]).
//! No gradient is copied by the bucketer at all.
//!
//! ```
//! use ferroccl::prelude::*;
//! let out = ferroccl::local::run(2, |comm| {
//!     // tensor ids with their lengths, in the order the backward pass completes them
//!     let mut b = Bucketer::views(comm, 16, ReduceOp::Sum, &[(1, 5), (0, 3)])?;
//!     for id in [1, 0] {
//!         b.grad_mut(id)?.fill(id as f32 + 1.0); // "backward" writes into the bucket
//!         b.mark_ready(id)?;
//!     }
//!     b.finish_in_place()?;
//!     Ok((b.grad(0)?.to_vec(), b.grad(1)?.to_vec()))
//! }).unwrap();
//! assert_eq!(out[0], (vec![2.0; 3], vec![4.0; 5]));
//! ```
//!
//! Each element is reduced exactly as a per-tensor all-reduce would reduce it when the values are
//! exactly representable (integers, small sums); for general floats the order of additions may differ
//! with the bucket layout, as in every bucketing implementation, so results agree to rounding.

use crate::{Communicator, CommunicatorExt, Element, Error, ReduceOp, Result, Work};
use std::collections::HashMap;

/// What a [`Bucketer`] does with a full bucket — PyTorch DDP's "communication hook". The default,
/// [`AllReduceHook`], all-reduces it; [`crate::dgc::DgcHook`] compresses it with Deep Gradient
/// Compression instead. `bucket` numbers the buckets of a step in launch order (the same on every
/// rank, restarting at 0 every step, so per-bucket state such as DGC residuals stays aligned).
///
/// [`BucketHook::launch`] should only *start* the communication (a non-blocking collective), so that
/// it overlaps the rest of the backward pass; [`BucketHook::complete`] finishes it in
/// [`Bucketer::finish`], in launch order.
pub trait BucketHook<T: Element> {
    /// What is in flight for one bucket between `launch` and `complete`.
    type Flight;
    /// Start communicating one bucket.
    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        bucket: usize,
        data: Vec<T>,
    ) -> Result<Self::Flight>;
    /// Finish one bucket; the result must have the bucket's length.
    fn complete<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        bucket: usize,
        flight: Self::Flight,
    ) -> Result<Vec<T>>;
    /// Every bucket of the step completed (per-step counters advance here).
    fn end_step(&mut self) {}
    /// The step failed part way (its completed buckets' bookkeeping should be dropped).
    fn abort_step(&mut self) {}
    /// True if the hook keeps state per bucket position: the bucketer then refuses, with
    /// [`Error::LayoutChanged`], a step whose tensors differ from the first step's.
    fn fixed_layout(&self) -> bool {
        false
    }
}

/// The default hook: a non-blocking all-reduce of the bucket with `op`.
#[derive(Debug, Clone, Copy)]
pub struct AllReduceHook(pub ReduceOp);

impl<T: Element> BucketHook<T> for AllReduceHook {
    type Flight = Work<Vec<T>>;
    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        _bucket: usize,
        data: Vec<T>,
    ) -> Result<Work<Vec<T>>> {
        comm.iall_reduce(data, self.0)
    }
    fn complete<C: Communicator + ?Sized>(
        &mut self,
        _comm: &C,
        _bucket: usize,
        flight: Work<Vec<T>>,
    ) -> Result<Vec<T>> {
        flight.wait()
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

struct InFlight<F> {
    bucket: usize,
    flight: F,
    /// The tensors of the bucket (push mode; view mode keeps them in its table).
    slots: Vec<Slot>,
}

/// One bucket of the view form: its memory (absent while in flight) and tensors.
struct ViewBucket<T> {
    data: Option<Vec<T>>,
    slots: Vec<Slot>,
    ready: usize,
}

/// The view form's layout: fixed at construction.
struct Views<T> {
    buckets: Vec<ViewBucket<T>>,
    /// Tensor id → (bucket, slot index).
    index: HashMap<usize, (usize, usize)>,
    /// Per tensor (same order as `index` values): marked ready in this step.
    ready: HashMap<usize, bool>,
    /// The next bucket to launch.
    next: usize,
}

/// Fuses tensors into buckets and hands each bucket to its hook (all-reduce by default) as soon as it
/// is full. One bucketer serves every step: [`Bucketer::finish`] (or
/// [`Bucketer::finish_in_place`]) ends a step.
pub struct Bucketer<'c, T: Element, C: Communicator + ?Sized, H: BucketHook<T> = AllReduceHook> {
    comm: &'c C,
    cap: usize,
    hook: H,
    open: Vec<T>,
    slots: Vec<Slot>,
    flights: Vec<InFlight<H::Flight>>,
    /// Bucket memory handed back by earlier steps, reused for the next buckets.
    pool: Vec<Vec<T>>,
    /// The first step's pushes `(id, len)`, for hooks with per-bucket state.
    layout: Vec<(usize, usize)>,
    layout_fixed: bool,
    pushed: usize,
    step: u64,
    step_open: bool,
    bytes_launched: usize,
    buckets_launched: usize,
    views: Option<Views<T>>,
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

    /// The bucket-view form (see the module docs) reducing with `op`: `tensors` lists `(id,
    /// length)` in the order the backward pass completes them (last layer first).
    pub fn views(
        comm: &'c C,
        bucket_bytes: usize,
        op: ReduceOp,
        tensors: &[(usize, usize)],
    ) -> Result<Self> {
        Bucketer::views_with_hook(comm, bucket_bytes, AllReduceHook(op), tensors)
    }
}

fn describe(p: Option<&(usize, usize)>) -> String {
    match p {
        Some((id, len)) => format!("tensor {id} ({len} elements)"),
        None => "the end of the step".into(),
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
            open: Vec::new(),
            slots: Vec::new(),
            flights: Vec::new(),
            pool: Vec::new(),
            layout: Vec::new(),
            layout_fixed: false,
            pushed: 0,
            step: 0,
            step_open: false,
            bytes_launched: 0,
            buckets_launched: 0,
            views: None,
        }
    }

    /// The bucket-view form with a hook; see [`Bucketer::views`]. Buckets are laid out as
    /// [`Bucketer::push`] would fill them, and their memory is allocated here, zeroed.
    pub fn views_with_hook(
        comm: &'c C,
        bucket_bytes: usize,
        hook: H,
        tensors: &[(usize, usize)],
    ) -> Result<Self> {
        let mut b = Bucketer::with_hook(comm, bucket_bytes, hook);
        let mut v = Views {
            buckets: Vec::new(),
            index: HashMap::new(),
            ready: HashMap::new(),
            next: 0,
        };
        let mut open: Vec<Slot> = Vec::new();
        let mut open_len = 0usize;
        let close = |slots: &mut Vec<Slot>, len: &mut usize, v: &mut Views<T>| {
            let b = v.buckets.len();
            for (i, s) in slots.iter().enumerate() {
                v.index.insert(s.id, (b, i));
            }
            v.buckets.push(ViewBucket {
                data: Some(vec![T::zeroed(); *len]),
                slots: std::mem::take(slots),
                ready: 0,
            });
            *len = 0;
        };
        for &(id, len) in tensors {
            if v.ready.insert(id, false).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "bucketer views: tensor id {id} is listed twice"
                )));
            }
            if !open.is_empty() && open_len + len > b.cap {
                close(&mut open, &mut open_len, &mut v);
            }
            open.push(Slot {
                id,
                offset: open_len,
                len,
            });
            open_len += len;
            if open_len >= b.cap {
                close(&mut open, &mut open_len, &mut v);
            }
        }
        if !open.is_empty() {
            close(&mut open, &mut open_len, &mut v);
        }
        b.views = Some(v);
        Ok(b)
    }

    fn begin_step(&mut self) {
        if !self.step_open {
            self.step_open = true;
            self.pushed = 0;
            self.buckets_launched = 0;
            self.bytes_launched = 0;
        }
    }

    /// Add a tensor (copied into the open bucket). A tensor larger than a bucket gets a bucket of
    /// its own. With a hook that keeps per-bucket state, a push that differs from the first step's
    /// push at the same position is refused with [`Error::LayoutChanged`] (nothing changes).
    pub fn push(&mut self, id: usize, data: &[T]) -> Result<()> {
        if self.views.is_some() {
            return Err(Error::InvalidArgument(
                "bucketer: this bucketer hands out bucket views (Bucketer::views); write into \
                 grad_mut(id) and call mark_ready(id) instead of push"
                    .into(),
            ));
        }
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
        let position = if self.step_open { self.pushed } else { 0 };
        if self.layout_fixed && self.layout.get(position) != Some(&(id, data.len())) {
            return Err(Error::LayoutChanged {
                step: self.step,
                position,
                expected: describe(self.layout.get(position)),
                got: describe(Some(&(id, data.len()))),
            });
        }
        self.begin_step();
        if !self.layout_fixed && self.hook.fixed_layout() {
            self.layout.push((id, data.len()));
        }
        self.pushed += 1;
        if !self.open.is_empty() && self.open.len() + data.len() > self.cap {
            self.launch()?;
        }
        self.slots.push(Slot {
            id,
            offset: self.open.len(),
            len: data.len(),
        });
        if self.open.capacity() == 0 {
            self.open = self.pool.pop().unwrap_or_default();
            self.open.clear();
            self.open.reserve(self.cap.min(1 << 24).max(data.len()));
        }
        self.open.extend_from_slice(data);
        if self.open.len() >= self.cap {
            self.launch()?;
        }
        Ok(())
    }

    /// Launch the open bucket now (e.g. at the end of a layer group). Push form only (the view
    /// form launches buckets as they become ready).
    pub fn launch(&mut self) -> Result<()> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let bucket = std::mem::take(&mut self.open);
        let slots = std::mem::take(&mut self.slots);
        self.start(bucket, slots)
    }

    fn start(&mut self, data: Vec<T>, slots: Vec<Slot>) -> Result<()> {
        self.bytes_launched += data.len() * std::mem::size_of::<T>();
        let bucket = self.buckets_launched;
        self.buckets_launched += 1;
        let flight = self.hook.launch(self.comm, bucket, data)?;
        self.flights.push(InFlight {
            bucket,
            flight,
            slots,
        });
        Ok(())
    }

    /// Launch what is open, wait for every bucket, give each tensor's reduced values to `sink`, and
    /// end the step (the next push starts the next step at bucket 0). In the view form the values
    /// are also left in place ([`Bucketer::grad`]); every registered tensor must have been marked
    /// ready. On an error the step is abandoned (the bucketer starts the next step afresh).
    pub fn finish(&mut self, mut sink: impl FnMut(usize, &[T])) -> Result<()> {
        let r = self.finish_step(&mut sink);
        if r.is_err() {
            self.flights.clear();
            self.open.clear();
            self.slots.clear();
            if !self.layout_fixed {
                self.layout.clear();
            }
            if let Some(v) = &mut self.views {
                v.next = 0;
                v.ready.values_mut().for_each(|r| *r = false);
                for b in &mut v.buckets {
                    b.ready = 0;
                    if b.data.is_none() {
                        let len = b.slots.last().map_or(0, |s| s.offset + s.len);
                        b.data = Some(vec![T::zeroed(); len]);
                    }
                }
            }
            self.hook.abort_step();
            self.step_open = false;
        }
        r
    }

    /// [`Bucketer::finish`] for the view form: the reduced values stay in bucket memory.
    pub fn finish_in_place(&mut self) -> Result<()> {
        self.finish(|_, _| {})
    }

    fn finish_step(&mut self, sink: &mut impl FnMut(usize, &[T])) -> Result<()> {
        self.begin_step();
        if let Some(v) = &self.views {
            if let Some((&id, _)) = v
                .ready
                .iter()
                .filter(|(_, r)| !**r)
                .min_by_key(|(i, _)| **i)
            {
                return Err(Error::InvalidArgument(format!(
                    "bucketer: finish with tensor {id} not marked ready; call mark_ready for every \
                     registered tensor each step (write zeros for an unused one)"
                )));
            }
        } else {
            if self.layout_fixed && self.pushed != self.layout.len() {
                return Err(Error::LayoutChanged {
                    step: self.step,
                    position: self.pushed,
                    expected: describe(self.layout.get(self.pushed)),
                    got: describe(None),
                });
            }
            self.launch()?;
        }
        let flights = std::mem::take(&mut self.flights);
        for f in flights {
            let bucket = self.hook.complete(self.comm, f.bucket, f.flight)?;
            let slots = match &self.views {
                Some(v) => &v.buckets[f.bucket].slots,
                None => &f.slots,
            };
            // a custom hook may hand back fewer values than were launched: an error, not a panic
            let want = slots.last().map_or(0, |s| s.offset + s.len);
            if bucket.len() != want {
                return Err(Error::LengthMismatch {
                    what: "bucketer: values the hook returned for a bucket".into(),
                    expected: want,
                    got: bucket.len(),
                });
            }
            for s in slots {
                sink(s.id, &bucket[s.offset..s.offset + s.len]);
            }
            match &mut self.views {
                Some(v) => v.buckets[f.bucket].data = Some(bucket),
                None => self.pool.push(bucket),
            }
        }
        if let Some(v) = &mut self.views {
            v.next = 0;
            v.ready.values_mut().for_each(|r| *r = false);
            v.buckets.iter_mut().for_each(|b| b.ready = 0);
        }
        if self.hook.fixed_layout() {
            self.layout_fixed = true;
        }
        self.hook.end_step();
        self.step += 1;
        self.step_open = false;
        Ok(())
    }

    fn view_slot(&self, id: usize) -> Result<(usize, Slot)> {
        let v = self.views.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "bucketer: grad/grad_mut/mark_ready need the view form (Bucketer::views)".into(),
            )
        })?;
        let &(b, i) = v.index.get(&id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "bucketer: tensor id {id} was not registered with Bucketer::views"
            ))
        })?;
        Ok((b, v.buckets[b].slots[i]))
    }

    /// Tensor `id`'s gradient memory inside its bucket, to write the gradient into. It holds what
    /// it held last (the previous step's reduced values): overwrite it, or zero it first to
    /// accumulate. Refused once the tensor was marked ready in this step.
    pub fn grad_mut(&mut self, id: usize) -> Result<&mut [T]> {
        let (b, s) = self.view_slot(id)?;
        let v = self.views.as_mut().expect("view form checked");
        if v.ready.get(&id) == Some(&true) {
            return Err(Error::InvalidArgument(format!(
                "bucketer: tensor {id} was already marked ready in this step; its bucket may be in \
                 flight, so its memory cannot be written until finish"
            )));
        }
        let data = v.buckets[b].data.as_mut().ok_or_else(|| {
            Error::InvalidArgument(format!("bucketer: tensor {id}'s bucket is in flight"))
        })?;
        Ok(&mut data[s.offset..s.offset + s.len])
    }

    /// Tensor `id`'s values in bucket memory: after [`Bucketer::finish_in_place`], the reduced
    /// gradient. Refused while its bucket is in flight.
    pub fn grad(&self, id: usize) -> Result<&[T]> {
        let (b, s) = self.view_slot(id)?;
        let v = self.views.as_ref().expect("view form checked");
        let data = v.buckets[b].data.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "bucketer: tensor {id}'s bucket is in flight; read it after finish"
            ))
        })?;
        Ok(&data[s.offset..s.offset + s.len])
    }

    /// Tensor `id`'s gradient is complete. When every tensor of a bucket is, that bucket is
    /// launched — in bucket order, as every rank must launch them in the same order.
    pub fn mark_ready(&mut self, id: usize) -> Result<()> {
        let (b, _) = self.view_slot(id)?;
        self.begin_step();
        let v = self.views.as_mut().expect("view form checked");
        let r = v.ready.get_mut(&id).expect("registered");
        if *r {
            return Err(Error::InvalidArgument(format!(
                "bucketer: tensor {id} marked ready twice in one step"
            )));
        }
        *r = true;
        v.buckets[b].ready += 1;
        loop {
            let v = self.views.as_mut().expect("view form checked");
            let n = v.next;
            let Some(bk) = v.buckets.get_mut(n) else {
                break;
            };
            if bk.ready < bk.slots.len() {
                break;
            }
            let data = bk.data.take().ok_or_else(|| {
                Error::InvalidArgument(format!("internal: bucket {n} launched twice"))
            })?;
            v.next += 1;
            self.start(data, Vec::new())?;
        }
        Ok(())
    }

    /// (buckets, bytes) launched in the step in progress, or in the last one once it finished.
    pub fn launched(&self) -> (usize, usize) {
        (self.buckets_launched, self.bytes_launched)
    }

    /// Steps finished so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The hook (e.g. to read DGC statistics).
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// The hook, mutably.
    pub fn hook_mut(&mut self) -> &mut H {
        &mut self.hook
    }

    /// Give the hook back.
    pub fn into_hook(self) -> H {
        self.hook
    }
}
