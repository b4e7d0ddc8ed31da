//! The one error type of ferroccl.
//!
//! Every fallible call returns [`Result`]. Messages say what went wrong *and* what to change, because the
//! person reading them is usually looking at a log line from rank 37 of 64.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ferroccl.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A peer rank died, dropped its communicator, or closed its connection; the communicator is now
    /// broken (like NCCL after `ncclCommAbort`) and every later collective on it returns this error.
    #[error("peer rank {rank} was lost during {during}: its thread panicked, it dropped its communicator or its connection closed; rebuild the communicator (the collective did not complete)")]
    PeerLost {
        /// The rank that was lost (in the communicator that noticed it).
        rank: usize,
        /// The operation that was running.
        during: &'static str,
    },
    /// A blocking call did not complete in time.
    #[error("{during} timed out after {after:?}{}; raise FERROCCL_TIMEOUT (seconds) if the peers are just slow, otherwise check that every rank calls the same collectives in the same order", waiting_for.map(|r| format!(" waiting for rank {r}")).unwrap_or_default())]
    Timeout {
        /// The operation that was running.
        during: &'static str,
        /// How long it waited.
        after: Duration,
        /// The rank it was waiting for, if known.
        waiting_for: Option<usize>,
    },
    /// A buffer had the wrong number of elements.
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// Which buffer and why.
        what: String,
        /// The length that was needed.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// Two buffers of one call had different element types.
    #[error("{what}: dtype {got} does not match {expected}")]
    DtypeMismatch {
        /// Which buffer.
        what: &'static str,
        /// The dtype that was needed.
        expected: crate::DType,
        /// The dtype that was passed.
        got: crate::DType,
    },
    /// A rank argument (root, peer, color member) outside `0..world_size`.
    #[error("{what} {rank} is out of range for a communicator of world size {world}; ranks are 0..{world}")]
    RankOutOfRange {
        /// Which argument.
        what: &'static str,
        /// The rank passed.
        rank: usize,
        /// The communicator's world size.
        world: usize,
    },
    /// Checked mode (`FERROCCL_CHECK=1`) found ranks calling different collectives.
    #[error("collective mismatch: rank {rank} called {mine} but rank {other_rank} called {theirs}; every rank must call the same collectives, in the same order, with matching dtype/count/root")]
    CollectiveMismatch {
        /// This rank.
        rank: usize,
        /// What this rank called.
        mine: String,
        /// The first rank that disagreed.
        other_rank: usize,
        /// What that rank called.
        theirs: String,
    },
    /// A reduction operator that is not defined for the element type.
    #[error("reduction {op:?} is not supported for {dtype}: {why}")]
    UnsupportedOp {
        /// The operator.
        op: crate::ReduceOp,
        /// The element type.
        dtype: crate::DType,
        /// Why not.
        why: &'static str,
    },
    /// The backend cannot do this (e.g. device memory on a host-only backend).
    #[error("{0}")]
    Unsupported(String),
    /// An argument that is wrong in some other way.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An environment variable or configuration value could not be used.
    #[error("configuration {var}={value:?} is invalid: {why}")]
    Config {
        /// The variable or setting.
        var: String,
        /// The value found.
        value: String,
        /// What is wrong and what is expected.
        why: String,
    },
    /// The rendezvous store rejected our token (or we rejected the peer's).
    #[error("rendezvous at {addr}: authentication failed (the FERROCCL_TOKEN of this process and of the store differ)")]
    BadToken {
        /// The store address.
        addr: String,
    },
    /// A malformed frame arrived on a ferroccl socket (rendezvous store or TCP transport).
    #[error("malformed frame from {peer}: {why}")]
    BadFrame {
        /// Who sent it.
        peer: String,
        /// What was wrong.
        why: String,
    },
    /// A rendezvous protocol failure other than the token or framing.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// An MPI call failed.
    #[error("MPI: {0}")]
    Mpi(String),
    /// A CUDA, NVRTC or NCCL call failed, or one of their libraries is missing.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// An MoE layout, dispatch or combine was given bad input (see [`crate::moe::MoeError`]).
    #[error("MoE: {0}")]
    Moe(#[from] crate::moe::MoeError),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wrap an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// True for errors after which the communicator must be rebuilt.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::PeerLost { .. } | Error::Timeout { .. })
    }
}
