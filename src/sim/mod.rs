//! A virtual-time cluster simulator for straggler studies.
//!
//! `n` workers (up to 1024 and beyond: the cost is `O(rounds · n log n)`), per-worker per-round compute
//! speeds from a [`Trace`]: i.i.d. shifted exponential, bursty Gilbert–Elliott (two states per
//! worker), or a CSV file (rows = rounds, columns = workers). [`simulate`] runs a round planner of
//! [`crate::coding::sequential`] — uncoded, GC (Tandon et al., ICML 2017), SR-SGC or M-SGC (Krishnan,
//! Ebrahimi, Khisti, ICLR 2023) — over the trace and reports per-round and total time, load per worker,
//! stragglers cut off per round, and whether every decoded gradient equals the uncoded sum.
//!
//! Workflow: build a trace ([`Trace::generate`] or [`Trace::from_csv`]), build planners with the same
//! `n`, call [`simulate`] on each with the same trace and [`CostModel`], compare the
//! [`SchemeReport`]s. `examples/straggler_sim.rs` does this and plots the round times.
//!
//! Everything is deterministic given the seeds ([`rng::Rng`] is a small xoshiro256**).

pub mod cluster;
pub mod moe;
/// The seeded PRNG now lives at [`crate::rng`] (coding uses it too, and coding must not import the
/// simulator that drives it); this re-export keeps `ferroccl::sim::rng::Rng` working.
pub use crate::rng;
pub mod trace;

pub use cluster::{order_statistic, simulate, simulate_with, CostModel, SchemeReport, WaitRule};
pub use trace::{Model, Trace, TraceStats};
