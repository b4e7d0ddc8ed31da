//! C interface to ferroccl. Empty for now: the C ABI (`ferroccl.h`, opaque communicator handles, error
//! codes) is filled by a later issue. The crate exists so the workspace layout is fixed from the start.
#![deny(missing_docs)]

pub use ferroccl;
