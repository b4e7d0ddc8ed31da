//! DGC as a [`Bucketer`](crate::bucket::Bucketer) hook: buckets are compressed instead of
//! all-reduced, so DGC composes with gradient bucketing the way PyTorch DDP's PowerSGD hook does.
//!
//! The hook keeps one [`Dgc`] state per bucket *position within a step* (bucket 0, 1, … in launch
//! order), created in the first step and reused by every later one, so residuals and velocities
//! follow the same parameters every step and the state stays the same size however many steps run.
//! The bucketer ends a step in [`Bucketer::finish`](crate::bucket::Bucketer::finish), and refuses a
//! push that differs from the first step's layout with [`Error::LayoutChanged`], so a trainer
//! cannot forget a step boundary or silently mix up residuals.
//!
//! The epoch, which sets the warm-up density, is counted: [`DgcHook::new`] takes the number of
//! steps per epoch and every finished step advances it by `1 / steps_per_epoch`.
//!
//! Overlap: [`launch`](crate::bucket::BucketHook::launch) compresses the bucket (local work, the
//! residual update) and *starts* the exchange as a non-blocking all-gather; the bucketer's
//! `finish` waits for it and decodes. So a bucket's messages travel while the backward pass
//! computes the next layers' gradients, as with the dense hook. With
//! [`Exchange::CountsThenGather`](super::Exchange) the message lengths are gathered without
//! blocking and the messages themselves (whose padded size needs every length) in `finish`.

use super::{any_skipped, gather_messages, Backup, Dgc, DgcConfig, Exchange, StepStats};
use crate::bucket::BucketHook;
use crate::{Communicator, CommunicatorExt, Error, Result, Work};

/// DGC per bucket; see the [module docs](self).
#[derive(Debug)]
pub struct DgcHook {
    cfg: DgcConfig,
    states: Vec<Dgc>,
    steps_per_epoch: u64,
    steps: u64,
    /// Statistics of the buckets of the step in progress.
    current: Vec<StepStats>,
    /// Statistics of the last finished step.
    last: Vec<StepStats>,
}

/// One bucket between [`BucketHook::launch`] and [`BucketHook::complete`].
pub struct DgcFlight {
    data: Vec<f32>,
    stage: Stage,
    backup: Option<Backup>,
    stats: StepStats,
    before: u64,
}

enum Stage {
    /// Already exchanged (the dense baseline, `sparsify: false`, runs blocking).
    Done,
    /// Fixed-size messages in flight: (this rank's message, everyone's).
    Messages(Work<(Vec<u8>, Vec<u8>)>),
    /// Message lengths in flight; the messages follow in `complete`.
    Lengths(Work<(Vec<i64>, Vec<i64>)>),
}

impl std::fmt::Debug for DgcFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DgcFlight")
            .field("len", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl DgcHook {
    /// A hook compressing every bucket with `cfg`; `steps_per_epoch` (at least 1) is how many
    /// finished steps make one epoch of the warm-up schedule ([`DgcConfig::density_at`]).
    pub fn new(cfg: DgcConfig, steps_per_epoch: usize) -> Result<DgcHook> {
        cfg.validate()?;
        if steps_per_epoch == 0 {
            return Err(Error::Config {
                var: "DgcHook::new steps_per_epoch".into(),
                value: "0".into(),
                why: "must be at least 1 (the number of optimizer steps in one epoch)".into(),
            });
        }
        Ok(DgcHook {
            cfg,
            states: Vec::new(),
            steps_per_epoch: steps_per_epoch as u64,
            steps: 0,
            current: Vec::new(),
            last: Vec::new(),
        })
    }

    /// The epoch (fractional) the next step runs at: finished steps / steps per epoch.
    pub fn epoch(&self) -> f64 {
        self.steps as f64 / self.steps_per_epoch as f64
    }

    /// Steps finished so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Continue counting from `steps` finished steps (when resuming from a checkpoint).
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// Per-bucket statistics of the last finished step, in launch order.
    pub fn step_stats(&self) -> &[StepStats] {
        &self.last
    }

    /// The DGC state of bucket `b` (its position within a step), if it was used (for checkpoints).
    pub fn state(&self, b: usize) -> Option<&Dgc> {
        self.states.get(b)
    }

    /// Number of per-bucket states (the buckets of one step).
    pub fn buckets(&self) -> usize {
        self.states.len()
    }

    /// Host memory the hook holds, in bytes: residuals and velocities (4 bytes per parameter each)
    /// and the message buffers' capacity. Constant from the second step on.
    pub fn memory_bytes(&self) -> usize {
        self.states
            .iter()
            .map(|d| {
                4 * (d.st.u.capacity() + d.st.v.capacity())
                    + d.msg.capacity()
                    + d.gathered.capacity()
            })
            .sum()
    }

    fn state_for(&mut self, bucket: usize, len: usize) -> Result<&mut Dgc> {
        if bucket == self.states.len() {
            self.states.push(Dgc::new(len, self.cfg.clone())?);
        }
        let have = self.states.get(bucket).map(Dgc::len);
        match have {
            Some(n) if n == len => Ok(&mut self.states[bucket]),
            Some(n) => Err(Error::LayoutChanged {
                step: self.steps,
                position: bucket,
                expected: format!("a bucket of {n} values"),
                got: format!("a bucket of {len} values"),
            }),
            None => Err(Error::InvalidArgument(format!(
                "dgc hook: bucket {bucket} launched before bucket {}; buckets are launched in order",
                self.states.len()
            ))),
        }
    }
}

impl BucketHook<f32> for DgcHook {
    type Flight = DgcFlight;

    fn launch<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        bucket: usize,
        mut data: Vec<f32>,
    ) -> Result<DgcFlight> {
        let epoch = self.epoch();
        let world = comm.world_size();
        let dgc = self.state_for(bucket, data.len())?;
        let before = comm.bytes_sent();
        if !dgc.st.config.sparsify {
            let stats = dgc.step(comm, &mut data, epoch)?;
            return Ok(DgcFlight {
                data,
                stage: Stage::Done,
                backup: None,
                stats,
                before,
            });
        }
        let mut stats = StepStats {
            clip_scale: 1.0,
            ..StepStats::default()
        };
        let backup = dgc.backup();
        dgc.compress(&data, world, epoch, &mut stats)?;
        let stage = match dgc.st.config.exchange {
            Exchange::FixedK => {
                let msg = std::mem::take(&mut dgc.msg);
                let mut gathered = std::mem::take(&mut dgc.gathered);
                gathered.resize(msg.len() * world, 0);
                Stage::Messages(comm.iall_gather(msg, gathered)?)
            }
            Exchange::CountsThenGather => {
                Stage::Lengths(comm.iall_gather(vec![dgc.msg.len() as i64], vec![0i64; world])?)
            }
        };
        Ok(DgcFlight {
            data,
            stage,
            backup,
            stats,
            before,
        })
    }

    fn complete<C: Communicator + ?Sized>(
        &mut self,
        comm: &C,
        bucket: usize,
        f: DgcFlight,
    ) -> Result<Vec<f32>> {
        let DgcFlight {
            mut data,
            stage,
            backup,
            mut stats,
            before,
        } = f;
        let dgc = self.state_for(bucket, data.len())?;
        let max_len = match stage {
            Stage::Done => {
                self.current.push(stats);
                return Ok(data);
            }
            Stage::Messages(w) => {
                let (msg, gathered) = w.wait()?;
                let n = msg.len();
                dgc.msg = msg;
                dgc.gathered = gathered;
                n
            }
            Stage::Lengths(w) => {
                let (_, lens) = w.wait()?;
                let max_len = lens.iter().copied().max().unwrap_or(0).max(0) as usize;
                gather_messages(comm, max_len, &mut dgc.msg, &mut dgc.gathered)?;
                max_len
            }
        };
        let skipped = any_skipped(&dgc.gathered, max_len);
        dgc.conclude(max_len, skipped, backup, &mut data, &mut stats)?;
        // from launch to completion: with buckets overlapping, this includes their traffic too
        stats.bytes_sent = comm.bytes_sent().saturating_sub(before);
        self.current.push(stats);
        Ok(data)
    }

    fn end_step(&mut self) {
        self.steps += 1;
        self.last = std::mem::take(&mut self.current);
    }

    fn abort_step(&mut self) {
        self.current.clear();
    }

    fn fixed_layout(&self) -> bool {
        true
    }
}
