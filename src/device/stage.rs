//! Staging device buffers through pinned host memory for host-only backends.

use super::drv;
use crate::buffer::{Buf, BufMut, Buffer, BufferMut, DevPtr, Mem, MemMut, OwnedBuffer};
use crate::collective::{Collective, CollectiveOwned, CollectiveRef};
use crate::{DType, Error, Result, Work};
use cudarc::driver::{CudaContext, CudaStream, PinnedHostSlice};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Pinned buffers kept for reuse, per device (pinned allocation costs far more than a copy).
fn pool() -> &'static Mutex<HashMap<usize, Vec<PinnedHostSlice<u8>>>> {
    static P: OnceLock<Mutex<HashMap<usize, Vec<PinnedHostSlice<u8>>>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A pinned host buffer of `len` bytes (8-aligned: page-aligned allocations), returned to the pool
/// on drop.
pub struct Pinned {
    buf: Option<PinnedHostSlice<u8>>,
    len: usize,
    ordinal: usize,
}

impl Pinned {
    fn take(ctx: &Arc<CudaContext>, len: usize) -> Result<Pinned> {
        let ordinal = ctx.ordinal();
        let reuse = {
            let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
            let v = p.entry(ordinal).or_default();
            v.iter()
                .position(|b| b.len() >= len)
                .map(|i| v.swap_remove(i))
        };
        let buf = match reuse {
            Some(b) => b,
            None => {
                ctx.bind_to_thread()
                    .map_err(|e| drv("binding the CUDA context", e))?;
                // SAFETY: plain pinned allocation; contents are written before they are read.
                unsafe { ctx.alloc_pinned_with_flags::<u8>(len.max(1).next_power_of_two(), 0) }
                    .map_err(|e| drv("allocating pinned host memory for staging", e))?
            }
        };
        Ok(Pinned {
            buf: Some(buf),
            len,
            ordinal,
        })
    }

    fn ptr(&self) -> *mut u8 {
        self.buf
            .as_ref()
            .and_then(|b| b.as_ptr().ok())
            .map(|p| p as *mut u8)
            .unwrap_or(std::ptr::NonNull::dangling().as_ptr())
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
            p.entry(self.ordinal).or_default().push(b);
        }
    }
}

fn d2h(d: &DevPtr<'_>, out: &mut [u8]) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    d.stream
        .context()
        .bind_to_thread()
        .map_err(|e| drv("binding the CUDA context", e))?;
    // SAFETY: `out` holds d.bytes bytes; the copy is complete when the stream synchronised.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(out, d.ptr, d.stream.cu_stream()) }
        .map_err(|e| drv("copying device → host for staging", e))?;
    d.stream
        .synchronize()
        .map_err(|e| drv("synchronising the staging copy", e))
}

fn h2d(src: &[u8], d: &DevPtr<'_>) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    d.stream
        .context()
        .bind_to_thread()
        .map_err(|e| drv("binding the CUDA context", e))?;
    // SAFETY: the device span holds src.len() bytes (validated); synchronised before src is reused.
    unsafe { cudarc::driver::result::memcpy_htod_async(d.ptr, src, d.stream.cu_stream()) }
        .map_err(|e| drv("copying host → device after staging", e))?;
    d.stream
        .synchronize()
        .map_err(|e| drv("synchronising the staging copy", e))
}

/// True if any buffer of the collective is device memory.
pub fn has_device(c: &CollectiveRef<'_>) -> bool {
    let mut any = false;
    // A cheap walk: views are Copy-able references.
    let probe = |b: &Buf<'_>| matches!(b.mem, Mem::Device(_));
    use crate::collective::Collective as C;
    match c {
        C::AllReduce { send, recv, .. } => {
            any |= send.as_ref().is_some_and(probe) || recv.device().is_some()
        }
        C::ReduceScatter { send, recv, .. }
        | C::AllGather { send, recv }
        | C::AllToAll { send, recv } => any |= probe(send) || recv.device().is_some(),
        C::AllToAllv { send, recv, .. } => any |= probe(send) || recv.device().is_some(),
        C::Broadcast { buf, .. } | C::Recv { buf, .. } => any |= buf.device().is_some(),
        C::Reduce { send, recv, .. } => {
            any |= probe(send) || recv.as_ref().is_some_and(|r| r.device().is_some())
        }
        C::Send { buf, .. } => any |= probe(buf),
        C::Barrier => {}
    }
    any
}

/// A source buffer during staging: host memory as is, device memory copied into pinned memory.
enum Src<'a> {
    Host(Buf<'a>),
    Staged(DType, Pinned),
}

/// A destination buffer during staging; `Staged` remembers where to copy the result back.
enum Dst<'a> {
    Host(BufMut<'a>),
    Staged(DType, Pinned, DevPtr<'a>),
}

impl Buffer for Src<'_> {
    fn buf(&self) -> Buf<'_> {
        match self {
            Src::Host(b) => *b,
            Src::Staged(d, p) => Buf::host(*d, p.bytes()),
        }
    }
}

impl Buffer for Dst<'_> {
    fn buf(&self) -> Buf<'_> {
        match self {
            Dst::Host(b) => b.as_buf(),
            Dst::Staged(d, p, _) => Buf::host(*d, p.bytes()),
        }
    }
}

impl BufferMut for Dst<'_> {
    fn buf_mut(&mut self) -> BufMut<'_> {
        match self {
            Dst::Host(b) => b.reborrow(),
            Dst::Staged(d, p, _) => BufMut::host(*d, p.bytes_mut()),
        }
    }
}

fn stage_src(b: Buf<'_>) -> Result<Src<'_>> {
    match b.mem {
        Mem::Device(d) => {
            let mut p = Pinned::take(d.stream.context(), d.bytes)?;
            d2h(&d, p.bytes_mut())?;
            Ok(Src::Staged(b.dtype, p))
        }
        _ => Ok(Src::Host(b)),
    }
}

/// `copy_in`: whether the destination's current contents are an input (in-place all-reduce,
/// broadcast root, receive buffers are not).
fn stage_dst(b: BufMut<'_>, copy_in: bool) -> Result<Dst<'_>> {
    let dtype = b.dtype;
    match b.mem {
        MemMut::Device(d) => {
            let mut p = Pinned::take(d.stream.context(), d.bytes)?;
            if copy_in {
                d2h(&d, p.bytes_mut())?;
            }
            Ok(Dst::Staged(dtype, p, d))
        }
        mem => Ok(Dst::Host(BufMut {
            dtype,
            len: b.len,
            mem,
        })),
    }
}

/// Run a collective with device buffers on a host-only backend (blocking): `run` runs the staged
/// host collective (`Communicator::run` passes itself, so this module names no communicator).
pub fn run_staged(
    c: CollectiveRef<'_>,
    run: impl FnOnce(CollectiveRef<'_>) -> Result<()>,
) -> Result<()> {
    let copy_in = matches!(
        c,
        Collective::AllReduce { send: None, .. } | Collective::Broadcast { .. }
    );
    let staged = c.map(stage_src, |d| stage_dst(d, copy_in))?;
    let mut boxed = staged.map(|s| Ok(Box::new(s)), |d| Ok(Box::new(d)))?;
    run(boxed.views())?;
    boxed.map(
        |_| Ok(()),
        |d| match *d {
            Dst::Staged(_, p, dev) => h2d(p.bytes(), &dev),
            Dst::Host(_) => Ok(()),
        },
    )?;
    Ok(())
}

/// An owned pinned staging buffer, for non-blocking collectives.
struct PinnedOwned(DType, Pinned);

impl Buffer for PinnedOwned {
    fn buf(&self) -> Buf<'_> {
        Buf::host(self.0, self.1.bytes())
    }
}
impl BufferMut for PinnedOwned {
    fn buf_mut(&mut self) -> BufMut<'_> {
        BufMut::host(self.0, self.1.bytes_mut())
    }
}
impl OwnedBuffer for PinnedOwned {
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Where a staged result goes back to: the device address and stream of an owned device buffer.
struct Back {
    ptr: u64,
    bytes: usize,
    stream: Arc<CudaStream>,
}

/// Start a non-blocking collective whose buffers are all device memory on a host-only backend: inputs
/// are staged now, the host collective runs asynchronously (`start` starts it: `Communicator::start`
/// passes itself), results are copied back on completion.
pub fn start_staged(
    mut c: CollectiveOwned,
    start: impl FnOnce(CollectiveOwned) -> Result<Work<CollectiveOwned>>,
) -> Result<Work<CollectiveOwned>> {
    let copy_in = matches!(
        c,
        Collective::AllReduce { send: None, .. } | Collective::Broadcast { .. }
    );
    // Stage from views of the owned op; remember where each destination goes back to.
    let mut backs: Vec<Back> = Vec::new();
    let host: CollectiveOwned = {
        let v = c.views();
        v.map(
            |s| -> Result<Box<dyn OwnedBuffer>> {
                match s.mem {
                    Mem::Device(d) => {
                        let mut p = Pinned::take(d.stream.context(), d.bytes)?;
                        d2h(&d, p.bytes_mut())?;
                        Ok(Box::new(PinnedOwned(s.dtype, p)))
                    }
                    _ => Err(mixed()),
                }
            },
            |r| -> Result<Box<dyn OwnedBuffer>> {
                let dtype = r.dtype;
                match r.mem {
                    MemMut::Device(d) => {
                        let mut p = Pinned::take(d.stream.context(), d.bytes)?;
                        if copy_in {
                            d2h(&d, p.bytes_mut())?;
                        }
                        backs.push(Back {
                            ptr: d.ptr,
                            bytes: d.bytes,
                            stream: d.stream.clone(),
                        });
                        Ok(Box::new(PinnedOwned(dtype, p)))
                    }
                    _ => Err(mixed()),
                }
            },
        )?
    };
    let w = start(host)?;
    Ok(w.map(move |mut done| {
        let mut i = 0;
        let mut result = Ok(());
        let _ = done.views().map(
            |_| Ok(()),
            |mut r| {
                if let (Some(b), Some(bytes)) = (backs.get(i), r.host_bytes_mut()) {
                    let d = DevPtr {
                        ptr: b.ptr,
                        bytes: b.bytes,
                        stream: &b.stream,
                    };
                    if let Err(e) = h2d(&bytes[..b.bytes.min(bytes.len())], &d) {
                        result = Err(e);
                    }
                }
                i += 1;
                Ok(())
            },
        );
        result.map(|_| c)
    }))
}

fn mixed() -> Error {
    Error::Unsupported(
        "a non-blocking collective mixing host and device buffers on a host-only backend; use one kind of memory per call".into(),
    )
}
