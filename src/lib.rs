//! # ferroccl
//!
//! Collective communication for distributed training, in Rust. One [`Communicator`] trait over four
//! backends — in-process threads ([`local`], the default, no system dependencies), TCP for
//! torchrun-style launches ([`tcp`]), MPI (feature `mpi`) and NCCL (feature `cuda`) — and, on top,
//! primitives that compose: bucketed all-reduce ([`bucket`]), Deep Gradient Compression ([`dgc`]),
//! gradient coding for stragglers ([`coding`]), local SGD ([`local_sgd`]), MoE all-to-all
//! dispatch/combine and its scheduling ([`moe`]) and a virtual-time cluster simulator ([`sim`]).
//!
//! ```
//! use ferroccl::prelude::*;
//! let sums = ferroccl::local::run(4, |comm| {
//!     let mut v = vec![comm.rank() as f32; 3];
//!     comm.all_reduce(&mut v, ReduceOp::Sum)?;
//!     Ok(v)
//! }).unwrap();
//! assert!(sums.iter().all(|v| v == &vec![6.0; 3]));
//! ```
//!
//! What [`init`] returns (a `Box<dyn Communicator>`) is a communicator itself, as are `&C` and
//! `Arc<C>`, so it goes into every primitive as written — the README's first program:
//!
//! ```no_run
//! use ferroccl::prelude::*;
//!
//! fn main() -> ferroccl::Result<()> {
//!     let comm = ferroccl::init()?;
//!     let mut grad = vec![comm.rank() as f32; 1024];
//!     comm.all_reduce(&mut grad, ReduceOp::Avg)?;
//!     let work = comm.iall_reduce(grad, ReduceOp::Sum)?;
//!     let grad = work.wait()?;
//!     let _ = grad;
//!     let mut b = Bucketer::with_hook(&comm, 25 << 20, DgcHook::new(DgcConfig::default(), 100)?);
//!     for _step in 0..3 {
//!         let mut g = vec![vec![0.5f32; 4096], vec![1.0; 512]];
//!         for (id, t) in g.iter().enumerate().rev() {
//!             b.push(id, t)?;
//!         }
//!         b.finish(|id, update| g[id].copy_from_slice(update))?;
//!     }
//!     Ok(())
//! }
//! ```
//!
//! See ARCHITECTURE.md for the layers and where each algorithm lives.
#![deny(missing_docs)]

pub mod bucket;
pub mod buffer;
pub mod coding;
mod collective;
pub mod comm;
pub mod config;
#[cfg(feature = "cuda")]
pub mod device;
pub mod dgc;
pub mod dtype;
mod engine;
pub mod error;
mod init;
pub mod kernels;
pub mod link;
pub mod local;
pub mod local_sgd;
pub mod moe;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod rng;
pub mod sim;
pub mod stats;
pub mod tcp;
pub mod work;

pub use bucket::{BucketHook, Bucketer};
pub use buffer::{Buf, BufMut, Buffer, BufferMut, Location, OwnedBuffer};
pub use coding::{Aggregator, CodedAllReduce, GradientCode, SequentialRuntime};
pub use collective::{Collective, CollectiveOwned, CollectiveRef};
pub use comm::{Communicator, CommunicatorExt, LinkClock};
pub use config::Config;
pub use dgc::{Dgc, DgcConfig, DgcHook};
pub use dtype::{DType, Element, ReduceOp};
pub use error::{Error, Result};
pub use init::{init, init_with, Backend};
pub use work::Work;

/// The `half` crate ferroccl was built with (its `f16`/`bf16` are element types here), so that a
/// program names the very types the collectives accept without pinning a matching version.
pub use half;

/// The `cudarc` crate ferroccl was built with (feature `cuda`): its `CudaSlice`, `CudaView` and
/// `CudaViewMut` are buffers here, and a second copy of another version would not be.
#[cfg(feature = "cuda")]
pub use cudarc;

/// The names most programs need.
pub mod prelude {
    pub use crate::{
        Aggregator, Bucketer, CodedAllReduce, Communicator, CommunicatorExt, DType, Dgc, DgcConfig,
        DgcHook, Error, GradientCode, LinkClock, ReduceOp, Result, Work,
    };
}
