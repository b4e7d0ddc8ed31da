//! Sends in flight, shared by the coded aggregation and the sequential runtime: started without
//! waiting for the receiver (a blocking MPI send of a gradient can deadlock against the aggregator's
//! own sends) and kept until they completed, since dropping a pending [`Work`] blocks.

use crate::work::Work;
use crate::{Communicator, CommunicatorExt, Error, Result};

/// Handles of sends not yet known to be complete.
#[derive(Default)]
pub(crate) struct Sends(Vec<Work<Vec<f32>>>);

impl Sends {
    /// Send without waiting for the receiver: `isend` (handle kept), or a plain send on the in-process
    /// backend, whose sends are eager copies anyway and cheaper than a handle.
    pub fn send<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        buf: Vec<f32>,
        peer: usize,
        tag: u32,
    ) -> Result<()> {
        if comm.backend() == "local" {
            return comm.send(&buf[..], peer, tag);
        }
        let w = comm.isend(buf, peer, tag)?;
        self.0.push(w);
        Ok(())
    }

    /// Forget the sends that completed; one that failed because its peer was lost is dropped too
    /// (the caller tracks lost peers), any other failure is returned.
    pub fn reap(&mut self) -> Result<()> {
        let mut keep = Vec::with_capacity(self.0.len());
        for mut w in self.0.drain(..) {
            if w.is_done() {
                match w.wait() {
                    Ok(_) | Err(Error::PeerLost { .. }) => {}
                    Err(e) => return Err(e),
                }
            } else {
                keep.push(w);
            }
        }
        self.0 = keep;
        Ok(())
    }

    /// Sends still in flight.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}
