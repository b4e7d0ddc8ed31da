//! Buffers: what a collective reads from and writes into.
//!
//! A collective sees a buffer as a typed view — [`Buf`] (read) or [`BufMut`] (write) — that carries the
//! element type, the element count and *where* the memory lives. Host slices are one kind of memory;
//! device memory (CUDA, next to the NCCL backend) is another variant of the same [`Mem`]/[`MemMut`]
//! enums, so there is one API for both, in the way candle keeps `CpuStorage` and `CudaStorage` behind one
//! `Storage`. Backends match on the variant and either use the memory directly or stage it.
//!
//! Users never build views by hand: anything implementing [`Buffer`]/[`BufferMut`] (`[T]`, `Vec<T>`,
//! and with the `cuda` feature `CudaSlice<T>` and its views `CudaView`/`CudaViewMut`) is accepted by the typed methods of [`crate::CommunicatorExt`].
//! Non-blocking collectives take ownership of an [`OwnedBuffer`] and hand it back on completion, so the
//! memory cannot be touched while the communication is in flight.

use crate::{DType, Element};
use std::any::Any;

/// Where a buffer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Host (CPU) memory.
    Host,
    /// Device memory on the given CUDA ordinal.
    Device(usize),
}

/// The memory behind a read-only view.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Mem<'a> {
    /// Host bytes.
    Host(&'a [u8]),
    /// Device memory (feature `cuda`).
    #[cfg(feature = "cuda")]
    Device(DevPtr<'a>),
}

/// The memory behind a writable view.
#[derive(Debug)]
#[non_exhaustive]
pub enum MemMut<'a> {
    /// Host bytes.
    Host(&'a mut [u8]),
    /// Device memory (feature `cuda`).
    #[cfg(feature = "cuda")]
    Device(DevPtr<'a>),
}

/// A span of device memory and the stream that orders work on it. Collectives on it are enqueued on
/// that stream (as NCCL's are), so they are ordered after the kernels that produced the data.
///
/// The fields are private: a backend hands the address to NCCL or to a copy engine, so a span made
/// up in safe code could have the device write anywhere. `CudaSlice` builds them; anything else
/// goes through the `unsafe` [`DevPtr::new`].
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
pub struct DevPtr<'a> {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    pub(crate) stream: &'a std::sync::Arc<cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl<'a> DevPtr<'a> {
    /// A span of `bytes` bytes at device address `ptr`, ordered by `stream`.
    ///
    /// # Safety
    /// `ptr..ptr + bytes` must be device memory allocated in `stream`'s context that stays allocated,
    /// and is not written by anything else, for as long as a collective may use the view (until the
    /// call returns, or until `synchronize` in stream-ordered mode).
    pub unsafe fn new(
        ptr: u64,
        bytes: usize,
        stream: &'a std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> DevPtr<'a> {
        DevPtr { ptr, bytes, stream }
    }
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The buffer's stream (and through it, its context and device).
    pub fn stream(&self) -> &'a std::sync::Arc<cudarc::driver::CudaStream> {
        self.stream
    }
    /// The CUDA ordinal of the device.
    pub fn ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }
}

/// A read-only typed view of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct Buf<'a> {
    /// Element type.
    pub dtype: DType,
    /// Number of elements.
    pub len: usize,
    /// The memory.
    pub mem: Mem<'a>,
}

/// A writable typed view of a buffer.
#[derive(Debug)]
pub struct BufMut<'a> {
    /// Element type.
    pub dtype: DType,
    /// Number of elements.
    pub len: usize,
    /// The memory.
    pub mem: MemMut<'a>,
}

impl<'a> Buf<'a> {
    /// View host bytes as elements of `dtype` (`bytes.len() / dtype.size()` of them; a length that
    /// is not a multiple of the element size is refused by every collective with a named error).
    pub fn host(dtype: DType, bytes: &'a [u8]) -> Buf<'a> {
        Buf {
            dtype,
            len: bytes.len() / dtype.size(),
            mem: Mem::Host(bytes),
        }
    }
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        match self.mem {
            Mem::Host(_) => Location::Host,
            #[cfg(feature = "cuda")]
            Mem::Device(d) => Location::Device(d.ordinal()),
        }
    }
    /// The host bytes, if this is host memory.
    pub fn host_bytes(&self) -> Option<&'a [u8]> {
        match self.mem {
            Mem::Host(b) => Some(b),
            #[cfg(feature = "cuda")]
            Mem::Device(_) => None,
        }
    }
    /// The device span, if this is device memory.
    #[cfg(feature = "cuda")]
    pub fn device(&self) -> Option<DevPtr<'a>> {
        match self.mem {
            Mem::Device(d) => Some(d),
            Mem::Host(_) => None,
        }
    }
    /// Size in bytes (`len × dtype size`; saturates instead of overflowing on a made-up `len`).
    pub fn byte_len(&self) -> usize {
        self.len.saturating_mul(self.dtype.size())
    }
    /// Bytes of memory actually behind the view (what [`Buf::byte_len`] must equal).
    pub fn mem_bytes(&self) -> usize {
        match self.mem {
            Mem::Host(b) => b.len(),
            #[cfg(feature = "cuda")]
            Mem::Device(d) => d.bytes,
        }
    }
}

impl<'a> BufMut<'a> {
    /// View host bytes as elements of `dtype`; see [`Buf::host`].
    pub fn host(dtype: DType, bytes: &'a mut [u8]) -> BufMut<'a> {
        BufMut {
            dtype,
            len: bytes.len() / dtype.size(),
            mem: MemMut::Host(bytes),
        }
    }
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        match &self.mem {
            MemMut::Host(_) => Location::Host,
            #[cfg(feature = "cuda")]
            MemMut::Device(d) => Location::Device(d.ordinal()),
        }
    }
    /// Reborrow as a read-only view.
    pub fn as_buf(&self) -> Buf<'_> {
        Buf {
            dtype: self.dtype,
            len: self.len,
            mem: match &self.mem {
                MemMut::Host(b) => Mem::Host(b),
                #[cfg(feature = "cuda")]
                MemMut::Device(d) => Mem::Device(*d),
            },
        }
    }
    /// Reborrow mutably (so a view can be passed on without giving it up).
    pub fn reborrow(&mut self) -> BufMut<'_> {
        BufMut {
            dtype: self.dtype,
            len: self.len,
            mem: match &mut self.mem {
                MemMut::Host(b) => MemMut::Host(b),
                #[cfg(feature = "cuda")]
                MemMut::Device(d) => MemMut::Device(*d),
            },
        }
    }
    /// The host bytes, if this is host memory.
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.mem {
            MemMut::Host(b) => Some(b),
            #[cfg(feature = "cuda")]
            MemMut::Device(_) => None,
        }
    }
    /// The device span, if this is device memory.
    #[cfg(feature = "cuda")]
    pub fn device(&self) -> Option<DevPtr<'_>> {
        match &self.mem {
            MemMut::Device(d) => Some(*d),
            MemMut::Host(_) => None,
        }
    }
    /// Size in bytes (`len × dtype size`; saturates instead of overflowing on a made-up `len`).
    pub fn byte_len(&self) -> usize {
        self.len.saturating_mul(self.dtype.size())
    }
    /// Bytes of memory actually behind the view (what [`BufMut::byte_len`] must equal).
    pub fn mem_bytes(&self) -> usize {
        match &self.mem {
            MemMut::Host(b) => b.len(),
            #[cfg(feature = "cuda")]
            MemMut::Device(d) => d.bytes,
        }
    }
}

/// Something a collective can read from.
pub trait Buffer {
    /// A read-only view.
    fn buf(&self) -> Buf<'_>;
}

/// Something a collective can write into.
pub trait BufferMut: Buffer {
    /// A writable view.
    fn buf_mut(&mut self) -> BufMut<'_>;
}

/// A buffer that a non-blocking collective can own while it is in flight and hand back afterwards.
pub trait OwnedBuffer: BufferMut + Send + 'static {
    /// For handing the concrete type back out of a type-erased box.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Element> Buffer for [T] {
    fn buf(&self) -> Buf<'_> {
        Buf {
            dtype: T::DTYPE,
            len: self.len(),
            mem: Mem::Host(bytemuck::cast_slice(self)),
        }
    }
}
impl<T: Element> BufferMut for [T] {
    fn buf_mut(&mut self) -> BufMut<'_> {
        BufMut {
            dtype: T::DTYPE,
            len: self.len(),
            mem: MemMut::Host(bytemuck::cast_slice_mut(self)),
        }
    }
}
impl<T: Element> Buffer for Vec<T> {
    fn buf(&self) -> Buf<'_> {
        self.as_slice().buf()
    }
}
impl<T: Element> BufferMut for Vec<T> {
    fn buf_mut(&mut self) -> BufMut<'_> {
        self.as_mut_slice().buf_mut()
    }
}
impl<T: Element> OwnedBuffer for Vec<T> {
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
impl<T: Element, const N: usize> Buffer for [T; N] {
    fn buf(&self) -> Buf<'_> {
        self.as_slice().buf()
    }
}
impl<T: Element, const N: usize> BufferMut for [T; N] {
    fn buf_mut(&mut self) -> BufMut<'_> {
        self.as_mut_slice().buf_mut()
    }
}

/// An empty buffer of a dtype, for ranks that contribute nothing (e.g. non-roots' receive side).
#[derive(Debug, Clone, Copy)]
pub struct Empty(pub DType);

impl Buffer for Empty {
    fn buf(&self) -> Buf<'_> {
        Buf {
            dtype: self.0,
            len: 0,
            mem: Mem::Host(&[]),
        }
    }
}
impl BufferMut for Empty {
    fn buf_mut(&mut self) -> BufMut<'_> {
        BufMut {
            dtype: self.0,
            len: 0,
            mem: MemMut::Host(&mut []),
        }
    }
}
impl OwnedBuffer for Empty {
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use cudarc::driver::{
        CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    };

    // The pointer is taken on the slice's own stream; the guard that cudarc returns records a read /
    // write event for its multi-stream tracking and is dropped at once, since ferroccl enqueues its
    // work on that same stream.
    impl<T: Element + DeviceRepr> Buffer for CudaSlice<T> {
        fn buf(&self) -> Buf<'_> {
            let stream = self.stream();
            let (ptr, _sync) = self.device_ptr(stream);
            Buf {
                dtype: T::DTYPE,
                len: self.len(),
                mem: Mem::Device(DevPtr {
                    ptr,
                    bytes: self.num_bytes(),
                    stream,
                }),
            }
        }
    }

    impl<T: Element + DeviceRepr> BufferMut for CudaSlice<T> {
        fn buf_mut(&mut self) -> BufMut<'_> {
            let (len, bytes) = (self.len(), self.num_bytes());
            let stream = self.stream().clone();
            let ptr = {
                let (ptr, _sync) = self.device_ptr_mut(&stream);
                ptr
            };
            BufMut {
                dtype: T::DTYPE,
                len,
                mem: MemMut::Device(DevPtr {
                    ptr,
                    bytes,
                    stream: self.stream(),
                }),
            }
        }
    }

    impl<T: Element + DeviceRepr> OwnedBuffer for CudaSlice<T> {
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    // Views of part of an allocation (`slice.slice(a..b)`, `slice_mut(a..b)`) are buffers too, so a
    // trainer can communicate one tensor of a flat parameter buffer without copying it out. They
    // borrow the allocation, so they serve blocking calls only (non-blocking ones own a buffer).
    impl<T: Element + DeviceRepr> Buffer for CudaView<'_, T> {
        fn buf(&self) -> Buf<'_> {
            let stream = DeviceSlice::stream(self);
            let (ptr, _sync) = self.device_ptr(stream);
            Buf {
                dtype: T::DTYPE,
                len: DeviceSlice::len(self),
                mem: Mem::Device(DevPtr {
                    ptr,
                    bytes: DeviceSlice::num_bytes(self),
                    stream,
                }),
            }
        }
    }

    impl<T: Element + DeviceRepr> Buffer for CudaViewMut<'_, T> {
        fn buf(&self) -> Buf<'_> {
            let stream = DeviceSlice::stream(self);
            let (ptr, _sync) = self.device_ptr(stream);
            Buf {
                dtype: T::DTYPE,
                len: DeviceSlice::len(self),
                mem: Mem::Device(DevPtr {
                    ptr,
                    bytes: DeviceSlice::num_bytes(self),
                    stream,
                }),
            }
        }
    }

    impl<T: Element + DeviceRepr> BufferMut for CudaViewMut<'_, T> {
        fn buf_mut(&mut self) -> BufMut<'_> {
            let (len, bytes) = (DeviceSlice::len(self), DeviceSlice::num_bytes(self));
            let stream = DeviceSlice::stream(self).clone();
            let ptr = {
                let (ptr, _sync) = self.device_ptr_mut(&stream);
                ptr
            };
            BufMut {
                dtype: T::DTYPE,
                len,
                mem: MemMut::Device(DevPtr {
                    ptr,
                    bytes,
                    stream: DeviceSlice::stream(self),
                }),
            }
        }
    }
}
