//! Virtual-time cluster simulator (work in progress).
pub mod rng;
