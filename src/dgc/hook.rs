//! DGC as a [`Bucketer`](crate::bucket::Bucketer) hook: buckets are compressed instead of
//! all-reduced, so DGC composes with gradient bucketing the way PyTorch DDP's PowerSGD hook does.

use super::{Dgc, DgcConfig, StepStats};
use crate::bucket::BucketHook;
use crate::{Communicator, Error, Result, Work};

/// One [`Dgc`] state per bucket (created at a bucket's first use and kept across steps, so residuals
/// and velocities follow the same parameters every step). Each bucket is compressed, exchanged and
/// decoded when it is launched; the returned work is already complete.
#[derive(Debug)]
pub struct DgcHook {
    cfg: DgcConfig,
    states: Vec<Option<Dgc>>,
    /// The training epoch (fractional) passed to every step; advance it between steps.
    pub epoch: f64,
    /// Statistics of the buckets launched since [`DgcHook::take_stats`] was last called.
    stats: Vec<StepStats>,
}

impl DgcHook {
    /// A hook compressing every bucket with `cfg`.
    pub fn new(cfg: DgcConfig) -> Result<DgcHook> {
        cfg.validate()?;
        Ok(DgcHook {
            cfg,
            states: Vec::new(),
            epoch: 0.0,
            stats: Vec::new(),
        })
    }

    /// The per-bucket statistics gathered so far (and forget them).
    pub fn take_stats(&mut self) -> Vec<StepStats> {
        std::mem::take(&mut self.stats)
    }

    /// The DGC state of bucket `b`, if it was used (e.g. for checkpoints).
    pub fn state(&self, b: usize) -> Option<&Dgc> {
        self.states.get(b).and_then(Option::as_ref)
    }
}

impl BucketHook<f32> for DgcHook {
    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        bucket: usize,
        mut data: Vec<f32>,
    ) -> Result<Work<Vec<f32>>> {
        if self.states.len() <= bucket {
            self.states.resize_with(bucket + 1, || None);
        }
        let slot = &mut self.states[bucket];
        let dgc = match slot {
            Some(d) if d.len() == data.len() => d,
            Some(d) => {
                return Err(Error::InvalidArgument(format!(
                    "dgc hook: bucket {bucket} held {} values last step and {} now; push the same tensors in the same order every step (or call Bucketer::next_step between steps)",
                    d.len(),
                    data.len()
                )))
            }
            None => slot.insert(Dgc::new(data.len(), self.cfg.clone())?),
        };
        let s = dgc.step(comm, &mut data, self.epoch)?;
        self.stats.push(s);
        Ok(Work::ready(Ok(data), "dgc bucket"))
    }
}
