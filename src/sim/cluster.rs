//! Drive [`Planner`]s over a [`Trace`] in virtual time.
//!
//! Round `r`: the planner assigns loads; worker `i` finishes at `x[r][i] · (α + load_i)`; workers are
//! reported to the planner in finishing order until its waiting rule holds ([`WaitRule`]); the round
//! lasts until that moment plus the master's fixed per-round cost (decode and broadcast). Workers still
//! running are the round's stragglers: their work of the round is lost. Every decoded job's recipe is
//! checked exactly (each unit's coefficients sum to 1) and on synthetic gradients against the uncoded
//! sum. Pure computation: no threads, no sleeping.

use super::trace::Trace;
use crate::coding::sequential::{synthetic, Planner};
use crate::{Error, Result};

/// Cost model of the simulated cluster.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CostModel {
    /// Fixed per-round work of a worker, in partitions (model load/upload, invocation), scaled by the
    /// worker's speed like the load itself.
    pub overhead: f64,
    /// Fixed per-round cost of the master (decode and broadcast), seconds.
    pub master: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            overhead: 0.0,
            master: 0.0,
        }
    }
}

/// When the master ends a round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WaitRule {
    /// At the first arrival after which [`Planner::ready`] holds (the workers still missing form an
    /// admissible straggler set and the due jobs decode). GC: the `(n − s)`-th arrival.
    Earliest,
    /// The rule of the paper's experiments (Krishnan et al., reference code): the workers slower than
    /// `(1 + μ)` × the fastest are the stragglers; if the planner is ready with them missing the round
    /// lasts `(1 + μ)` × the fastest, otherwise the master waits for every worker.
    Mu(f64),
}

/// What one scheme did over a trace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SchemeReport {
    /// The scheme's label.
    pub scheme: String,
    /// Delay `T`.
    pub delay: usize,
    /// Duration of every round, seconds.
    #[serde(skip)]
    pub round_times: Vec<f64>,
    /// Sum of the round times.
    pub total_time: f64,
    /// Mean round time.
    pub mean_round: f64,
    /// Median round time.
    pub p50_round: f64,
    /// 99th percentile round time.
    pub p99_round: f64,
    /// Mean load per worker and round, partitions.
    pub mean_load: f64,
    /// Largest load of one worker in one round.
    pub max_load: f64,
    /// Mean stragglers (workers cut off) per round.
    pub mean_stragglers: f64,
    /// Most stragglers in one round.
    pub max_stragglers: usize,
    /// Jobs decoded.
    pub jobs_decoded: usize,
    /// Jobs still open at the end (started in the last `T` rounds).
    pub jobs_open: usize,
    /// Largest relative error of a decoded job against its uncoded sum.
    pub max_error: f64,
    /// Largest `max_u |Σ coefficients of unit u − 1|` over the decoding recipes.
    pub max_residual: f64,
    /// Every recipe exact (residual < 1e-9) and every decoded job within 1e-9 relative of its
    /// uncoded sum.
    pub exact: bool,
    /// Rounds that ended only once every worker had answered.
    pub rounds_waited_all: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Run `planner` over every round of `trace` with [`WaitRule::Earliest`].
pub fn simulate(
    planner: &mut dyn Planner,
    trace: &Trace,
    cost: &CostModel,
) -> Result<SchemeReport> {
    simulate_with(planner, trace, cost, WaitRule::Earliest)
}

/// Run `planner` over every round of `trace` with the given waiting rule.
pub fn simulate_with(
    planner: &mut dyn Planner,
    trace: &Trace,
    cost: &CostModel,
    rule: WaitRule,
) -> Result<SchemeReport> {
    let n = planner.n();
    if trace.n() != n {
        return Err(Error::InvalidArgument(format!(
            "simulate: the trace has {} workers but the scheme {} has {n}; generate the trace with n = {n}",
            trace.n(),
            planner.name()
        )));
    }
    let seed = 0x5eed_u64;
    let units = planner.units().len();
    let mut round_times = Vec::with_capacity(trace.rounds());
    let (mut load_sum, mut max_load) = (0.0, 0f64);
    let (mut stragglers_sum, mut max_stragglers) = (0usize, 0usize);
    let (mut jobs, mut max_error, mut max_residual) = (0usize, 0f64, 0f64);
    let mut waited_all = 0usize;
    let mut order: Vec<(f64, usize)> = Vec::with_capacity(n);
    for r in 0..trace.rounds() {
        planner.begin_round(r)?;
        let x = trace.row(r);
        order.clear();
        for (i, &xi) in x.iter().enumerate() {
            let l = planner.load(i);
            load_sum += l;
            max_load = max_load.max(l);
            order.push((xi * (cost.overhead + l), i));
        }
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut end = None;
        match rule {
            WaitRule::Earliest => {
                for (k, &(t, w)) in order.iter().enumerate() {
                    planner.complete(w);
                    if planner.ready() {
                        // Workers finishing at the same instant arrive too.
                        let mut k = k + 1;
                        while k < order.len() && order[k].0 <= t {
                            planner.complete(order[k].1);
                            k += 1;
                        }
                        end = Some((t, k));
                        break;
                    }
                }
            }
            WaitRule::Mu(mu) => {
                let cutoff = order.first().map_or(0.0, |o| o.0) * (1.0 + mu);
                let mut k = 0;
                while k < order.len() && order[k].0 <= cutoff {
                    planner.complete(order[k].1);
                    k += 1;
                }
                if planner.ready() {
                    end = Some((cutoff.min(order[order.len() - 1].0), k));
                } else {
                    for &(_, w) in &order[k..] {
                        planner.complete(w);
                    }
                    if planner.ready() {
                        end = Some((order[order.len() - 1].0, n));
                    }
                }
            }
        }
        let Some((t, finished)) = end else {
            return Err(Error::InvalidArgument(format!(
                "simulate: {} could not finish round {r} even with every worker done",
                planner.name()
            )));
        };
        if finished == n {
            waited_all += 1;
        }
        round_times.push(t + cost.master);
        stragglers_sum += n - finished;
        max_stragglers = max_stragglers.max(n - finished);
        for d in planner.end_round()? {
            jobs += 1;
            max_residual = max_residual.max(d.residual(units));
            let value = d.evaluate(|u| synthetic(seed, d.job, u));
            let truth: f64 = (0..units).rev().map(|u| synthetic(seed, d.job, u)).sum();
            max_error = max_error.max((value - truth).abs() / truth.abs().max(1.0));
        }
    }
    let mut sorted = round_times.clone();
    sorted.sort_by(f64::total_cmp);
    let rounds = round_times.len().max(1) as f64;
    let total: f64 = round_times.iter().sum();
    Ok(SchemeReport {
        scheme: planner.name(),
        delay: planner.delay(),
        total_time: total,
        mean_round: total / rounds,
        p50_round: percentile(&sorted, 0.5),
        p99_round: percentile(&sorted, 0.99),
        mean_load: load_sum / (rounds * n as f64),
        max_load,
        mean_stragglers: stragglers_sum as f64 / rounds,
        max_stragglers,
        jobs_decoded: jobs,
        jobs_open: planner.open_jobs(),
        max_error,
        max_residual,
        exact: max_error < 1e-9 && max_residual < 1e-9,
        rounds_waited_all: waited_all,
        round_times,
    })
}

/// The `k`-th smallest (1-based) of `values` (`k` clamped to `1..=len`; 0 for an empty slice).
pub fn order_statistic(values: &[f64], k: usize) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    let k = k.clamp(1, v.len()) - 1;
    let (_, x, _) = v.select_nth_unstable_by(k, f64::total_cmp);
    *x
}
