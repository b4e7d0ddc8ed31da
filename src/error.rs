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
    /// An MPI call failed. `code` is the MPI error code the call returned (`None` when ferroccl
    /// itself refused the call, e.g. after a timeout poisoned the session), so a caller can match on
    /// `MPI_ERR_*` without parsing the message.
    #[error("MPI: {message}{}", code.map(|c| format!(" (MPI error code {c})")).unwrap_or_default())]
    Mpi {
        /// The MPI error code, if an MPI call returned one.
        code: Option<i32>,
        /// What failed, with `MPI_Error_string`'s text.
        message: String,
    },
    /// A CUDA, NVRTC or NCCL call failed, or one of their libraries is missing. `code` is the
    /// library's own result code (`CUresult`, `nvrtcResult` or `ncclResult_t`, as a number; the
    /// message names the library), `None` when no call returned one (a missing library, a check of
    /// ferroccl's own).
    #[error("CUDA: {message}{}", code.map(|c| format!(" (error code {c})")).unwrap_or_default())]
    Cuda {
        /// The library's result code, if a call returned one.
        code: Option<i32>,
        /// What failed, naming the library and the call.
        message: String,
    },
    /// A rank of an in-process world ([`crate::local::run`]) panicked; the other ranks saw it as
    /// [`Error::PeerLost`], and `run` reports this instead, because the panic is the cause.
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank whose closure panicked.
        rank: usize,
        /// The panic's message (or "non-string panic").
        message: String,
    },
    /// A bucketer whose hook keeps state per bucket (DGC residuals) was given a different set of
    /// tensors than in its first step, which would silently apply one tensor's residuals to another.
    #[error("bucket layout changed in step {step}: push #{position} is {got}, but the first step pushed {expected} there; a hook with per-bucket state (DgcHook) needs the same tensors, in the same order, every step (start a new Bucketer and hook to change the model)")]
    LayoutChanged {
        /// The step (0-based) in which the change was found.
        step: u64,
        /// The position of the push within the step (0-based).
        position: usize,
        /// What the first step pushed there (e.g. "tensor 3 (120 elements)").
        expected: String,
        /// What was pushed now (or "the end of the step").
        got: String,
    },
    /// An error of the caller's own code, carried through ferroccl so that a closure given to
    /// [`crate::local::run`] (or any function returning [`Result`]) can use `?` on it. Build it
    /// with [`Error::user`]; I/O errors convert into [`Error::Io`] by `?` directly.
    #[error("{0}")]
    User(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// An MoE layout, dispatch or combine was given bad input (see [`crate::moe::MoeError`]).
    #[error("MoE: {0}")]
    Moe(#[from] crate::moe::MoeError),
    /// The ranks of a local-SGD group hand over different parameter layouts ([`crate::local_sgd`]).
    #[error("local SGD: rank {rank} has parameter layout {mine} but rank {other_rank} has {theirs}; every rank must hand over the same tensors (names, lengths, order)")]
    LayoutMismatch {
        /// This rank.
        rank: usize,
        /// This rank's layout (tensor count, elements, hash).
        mine: String,
        /// The first rank that disagreed.
        other_rank: usize,
        /// That rank's layout.
        theirs: String,
    },
    /// A NaN or infinity where only finite values can be used (nothing was changed).
    #[error("{what} is not finite (NaN or infinity); nothing was updated: lower the learning rate, check the data, or skip this batch")]
    NonFinite {
        /// Which value, on which rank.
        what: String,
    },
    /// Calls made in the wrong order (e.g. an EDiT layer synced out of forward order); nothing changed.
    #[error("{what}: expected {expected}, got {got}")]
    OutOfOrder {
        /// What was called and what order is required.
        what: String,
        /// The call that was due.
        expected: usize,
        /// The call that was made.
        got: usize,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A collective of the local or TCP backend timed out: a hang diagnosis. Besides the rank this
    /// one waited for, it names every rank that has not entered the collective and the last
    /// collective each rank finished (collectives are numbered per communicator from 1), what
    /// torch's flight recorder tells and NCCL users ask for. Fatal, like [`Error::Timeout`].
    #[error("{during} (collective #{seq} on this communicator) timed out after {after:?}{}; {}; raise FERROCCL_TIMEOUT (seconds) if the peers are just slow, otherwise check that every rank calls the same collectives in the same order", waiting_for.map(|r| format!(" waiting for rank {r}")).unwrap_or_default(), describe_hang(*seq, not_entered, last_completed))]
    Hang {
        /// The operation that was running.
        during: &'static str,
        /// How long it waited.
        after: Duration,
        /// The rank it was waiting for, if known.
        waiting_for: Option<usize>,
        /// The collective's sequence number on this communicator (the first is 1).
        seq: u64,
        /// Ranks that had not entered collective `seq` when this one gave up (among those whose
        /// progress is known).
        not_entered: Vec<usize>,
        /// Per rank, the sequence number of the last collective it finished (0: none); `None`
        /// where a TCP peer did not answer the progress probe (hung hard, or gone).
        last_completed: Vec<Option<u64>>,
    },
}

fn describe_hang(seq: u64, not_entered: &[usize], last: &[Option<u64>]) -> String {
    let who = if not_entered.is_empty() {
        format!("every rank that answered has entered #{seq}")
    } else {
        format!("ranks {not_entered:?} have not entered #{seq}")
    };
    let per: Vec<String> = last
        .iter()
        .enumerate()
        .map(|(r, c)| match c {
            Some(c) => format!("{r}:#{c}"),
            None => format!("{r}:no answer"),
        })
        .collect();
    format!(
        "{who}; last collective finished per rank: {}",
        per.join(" ")
    )
}

impl Error {
    /// Wrap an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Carry an error of the caller's own code (anything implementing `std::error::Error`, or a
    /// `String`/`&str` message): `parse().map_err(Error::user)?`.
    pub fn user(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Error::User(e.into())
    }

    /// A CUDA/NVRTC/NCCL failure without a result code (a check of ferroccl's own).
    pub fn cuda(message: impl Into<String>) -> Self {
        Error::Cuda {
            code: None,
            message: message.into(),
        }
    }

    /// A CUDA/NVRTC/NCCL failure with the library's result code.
    pub fn cuda_code(code: i32, message: impl Into<String>) -> Self {
        Error::Cuda {
            code: Some(code),
            message: message.into(),
        }
    }

    /// An MPI failure without an MPI error code (refused by ferroccl itself).
    pub fn mpi(message: impl Into<String>) -> Self {
        Error::Mpi {
            code: None,
            message: message.into(),
        }
    }

    /// An MPI failure with the code the call returned.
    pub fn mpi_code(code: i32, message: impl Into<String>) -> Self {
        Error::Mpi {
            code: Some(code),
            message: message.into(),
        }
    }

    /// A length mismatch counted in bytes by the layer that found it (a received message, a raw
    /// operand), reported in elements of `dtype` — the unit the caller's buffers count in. When a
    /// byte count is not a whole number of elements (the peers use different element types) the
    /// error says so in bytes instead.
    pub fn byte_lengths(
        what: impl Into<String>,
        dtype: crate::DType,
        expected_bytes: usize,
        got_bytes: usize,
    ) -> Self {
        let es = dtype.size();
        let what = what.into();
        if expected_bytes % es == 0 && got_bytes % es == 0 {
            Error::LengthMismatch {
                what,
                expected: expected_bytes / es,
                got: got_bytes / es,
            }
        } else {
            Error::InvalidArgument(format!(
                "{what}: expected {expected_bytes} bytes ({} elements), got {got_bytes} bytes, \
                 which is not a whole number of {} elements (do the ranks pass different element types?)",
                expected_bytes / es,
                dtype.name()
            ))
        }
    }

    /// True for errors after which the communicator must be rebuilt.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::PeerLost { .. } | Error::Timeout { .. } | Error::Hang { .. }
        )
    }
}

/// `?` on an I/O error inside a function returning [`Result`] (a `local::run` closure reading a
/// file, say) gives [`Error::Io`].
impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io {
            context: "I/O".into(),
            source,
        }
    }
}

/// `?` on a boxed error of the caller's code gives [`Error::User`].
impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for Error {
    fn from(e: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        Error::User(e)
    }
}

macro_rules! user_from {
    ($($t:ty),*) => {$(
        /// `?` on this common error type of the caller's code gives [`Error::User`].
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::User(Box::new(e))
            }
        }
    )*};
}
user_from!(
    std::num::ParseIntError,
    std::num::ParseFloatError,
    std::str::Utf8Error,
    std::string::FromUtf8Error
);
