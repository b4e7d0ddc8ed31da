//! Gradient coding for stragglers: GC, sequential GC (SR-SGC, M-SGC) and their runtime.
//!
//! Sources:
//! - Tandon, Lei, Dimakis, Karampatziakis, *Gradient Coding: Avoiding Stragglers in Distributed
//!   Learning*, ICML 2017 — the codes of [`code`] (fractional and cyclic repetition).
//! - Krishnan, Ebrahimi, Khisti, *Sequential Gradient Coding for Straggler Mitigation*, ICLR 2023 —
//!   the sequential schemes of [`sequential`]: GC with selective repetition (SR-SGC) and the
//!   multiplexed scheme (M-SGC).
//!
//! Workflow:
//! 1. Split the data into `n` partitions (one per worker) and build a code:
//!    `GradientCode::fractional(n, s)` (needs `(s + 1) | n`) or `GradientCode::cyclic(n, s, seed)`.
//!    [`GradientCode::partitions`]`(i)` is what worker `i` computes (`s + 1` partitions).
//! 2. Each step, worker `i` computes the gradients of its partitions and encodes them,
//!    [`GradientCode::encode`]; then [`CodedAllReduce::round`] sends the coded gradient to the round's
//!    aggregator, which finishes at the first `n − s` arrivals, decodes the exact sum and hands it
//!    back to every rank. Late messages of stragglers are received and discarded, never mixed into
//!    another round; a lost worker becomes a permanent straggler.
//! 3. A straggler that fell behind calls [`CodedAllReduce::poll_ahead`] first and skips rounds that
//!    already finished without it.
//!
//! ```
//! use ferroccl::coding::{Aggregator, CodedAllReduce, GradientCode};
//! use ferroccl::Communicator;
//! use std::sync::Arc;
//! let code = Arc::new(GradientCode::cyclic(4, 1, 7).unwrap());
//! let sums = ferroccl::local::run(4, |comm| {
//!     // Partition p's "gradient" is [p + 1]; the sum over 4 partitions is 10.
//!     let parts: Vec<Vec<f32>> = code.partitions(comm.rank()).iter().map(|&p| vec![p as f32 + 1.0]).collect();
//!     let views: Vec<&[f32]> = parts.iter().map(|v| v.as_slice()).collect();
//!     let coded = code.encode(comm.rank(), &views)?;
//!     let mut agg = CodedAllReduce::new(code.clone(), Aggregator::Fixed(0));
//!     let mut out = vec![0f32; 1];
//!     agg.round(comm, &coded, &mut out)?;
//!     agg.finish(comm, std::time::Duration::from_secs(5))?;
//!     Ok(out[0])
//! }).unwrap();
//! assert!(sums.iter().all(|s| (s - 10.0).abs() < 1e-4));
//! ```
//!
//! The sequential schemes are planners ([`sequential::Planner`], `(n, B, W, λ)` as in the paper): per
//! round they say what each worker computes and, from the set of workers that finished, which jobs
//! decode and how ([`sequential::Decoded`]). The virtual-time simulator ([`crate::sim`]) runs them
//! against uncoded training and GC on the same straggler trace; [`SequentialRuntime`]
//! ([`pipeline`]) runs them over a real communicator (per-`(job, round)` tags, `isend`/`irecv`, the
//! scheme's waiting rule, exact decoding by round `t + T`, late results discarded).

pub mod code;
pub mod pipeline;
pub mod runtime;
mod sends;
pub mod sequential;

pub use code::{GradientCode, Scheme};
pub use pipeline::{JobResult, SequentialRuntime};
pub use runtime::{Aggregator, CodedAllReduce, RoundInfo};
