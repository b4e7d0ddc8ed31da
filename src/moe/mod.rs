//! Mixture-of-experts all-to-all: layout, dispatch and combine with handles, their backward passes,
//! chunked pipelining, a hierarchical (2D) route and an FSMoE-style planner.
//!
//! The pieces, in the order a layer uses them:
//! 1. [`Layout::new`] (DeepEP's `get_dispatch_layout`, Megatron-Core's capacity and dropping): from
//!    the router's top-k expert ids and weights, where each (token, choice) slot goes.
//! 2. [`Moe::dispatch`]: counts first, then one all-to-all-v of the rows (or two, hierarchically);
//!    the received rows come grouped per local expert, with a [`Handle`].
//! 3. the experts run on their rows (the caller's code);
//! 4. [`Moe::combine`] with the handle: rows back to their tokens, weighted and summed in token
//!    order. Backward: [`Moe::combine_backward`] (a weighted dispatch) and
//!    [`Moe::dispatch_backward`] (an unweighted combine), with the same handle.
//!
//! [`pipeline::forward`] runs 2–4 in chunks so that chunk `i+1`'s dispatch, chunk `i`'s experts
//! and chunk `i−1`'s combine overlap; [`plan`] profiles the all-to-all and the experts, fits
//! α + β·bytes models and chooses the chunk count, 1D or 2D, and where the dense gradients'
//! all-reduce goes ([`plan::Plan`] is a serde value). `cuda/moe.cu` computes the layout's positions
//! on the device ([`layout::positions`] is its CPU twin).
//!
//! ```
//! use ferroccl::kernels::CpuKernels;
//! use ferroccl::moe::{Layout, LayoutConfig, Moe};
//! let out = ferroccl::local::run(2, |comm| {
//!     let k = CpuKernels;
//!     // two tokens of hidden size 2, top-1: token 0 to expert 1 (rank 1), token 1 to expert 0
//!     let layout = Layout::new(&[1, 0], &[1.0, 0.5], 1, &LayoutConfig::even(2, 2))?;
//!     let x = vec![1.0f32, 2.0, 3.0, 4.0];
//!     let moe = Moe::new(comm);
//!     let d = moe.dispatch(&k, &x, 2, &layout)?;
//!     // identity experts: send the rows straight back
//!     moe.combine(&k, &d.rows, &d.handle)
//! }).unwrap();
//! assert_eq!(out[0], vec![1.0, 2.0, 1.5, 2.0]);
//! ```

mod error;
pub mod exchange;
pub mod layout;
pub mod pipeline;
pub mod plan;
mod route;

pub use error::MoeError;
pub use exchange::{weight_grad, Dispatched, Handle, InFlight, Moe, MoeElem, Wire};
pub use layout::{Capacity, DropPolicy, Layout, LayoutConfig, Placement};
