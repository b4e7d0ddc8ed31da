//! Backend selection (filled below in this issue).
use crate::{Communicator, Result};
/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In-process.
    Local,
}
/// Pick a backend from the environment.
pub fn init() -> Result<Box<dyn Communicator>> {
    init_with(None)
}
/// Pick a backend, optionally forcing one.
pub fn init_with(b: Option<Backend>) -> Result<Box<dyn Communicator>> {
    let _ = b;
    Err(crate::Error::Unsupported("todo".into()))
}
