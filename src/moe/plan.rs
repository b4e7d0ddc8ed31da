//! FSMoE-style planning: profile, fit α + β·x models, choose the chunk count, 1D or 2D, and where
//! the dense gradients' all-reduce goes.
//!
//! 1. **Profile** ([`profile`], collective): time the dispatch + combine at a few row counts (along
//!    a routed handle, as the pipeline runs them: no counts or status exchange) (on the
//!    1D route and, given ranks per node, the 2D one), the caller's experts at a few row counts and
//!    the all-reduce at a few sizes; every rank takes the maximum over ranks, so all ranks fit the
//!    same numbers and choose the same plan. In the simulator, [`Costs::from_model`] samples a
//!    [`MoeCluster`] the same way.
//! 2. **Fit** [`AlphaBeta`] models by least squares ([`AlphaBeta::fit`]).
//! 3. **Plan** ([`plan`]): for each candidate chunk count and route, simulate the pipeline
//!    ([`schedule`]: a FIFO communication stream, the caller's thread computing, as
//!    [`super::pipeline::forward`] issues them) and fill the gaps that the pipeline leaves on the
//!    communication stream with pieces of the dense all-reduce, greedily per gap ([`fill_gaps`],
//!    FSMoE's adaptive gradient partitioning); the rest is all-reduced after the layer. The
//!    fastest predicted schedule wins.
//!
//! A [`Plan`] is a serde value: print it, store it, edit it, and hand it back
//! ([`Plan::validate`] checks an edited one).

use super::{Layout, LayoutConfig, Moe, MoeElem, MoeError};
use crate::kernels::Kernels;
use crate::sim::moe::MoeCluster;
use crate::{Communicator, CommunicatorExt, OwnedBuffer, ReduceOp, Result};
use half::bf16;
use std::time::Instant;

/// `t(x) = alpha + beta · x`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlphaBeta {
    /// Fixed cost, seconds.
    pub alpha: f64,
    /// Cost per unit (byte or row), seconds.
    pub beta: f64,
}

impl AlphaBeta {
    /// The least-squares line through `(x, seconds)` samples, with both coefficients clamped at
    /// zero (a negative fixed cost is noise). Needs two distinct `x`.
    pub fn fit(samples: &[(f64, f64)]) -> Result<AlphaBeta> {
        let n = samples.len() as f64;
        let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
        let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
        let sxx: f64 = samples.iter().map(|s| (s.0 - mx) * (s.0 - mx)).sum();
        if samples.len() < 2 || sxx <= 0.0 || !sxx.is_finite() {
            return Err(MoeError::Config(
                "fitting alpha + beta x needs samples at two or more distinct sizes".into(),
            )
            .into());
        }
        let sxy: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
        let beta = (sxy / sxx).max(0.0);
        let alpha = (my - beta * mx).max(0.0);
        Ok(AlphaBeta { alpha, beta })
    }

    /// The time at `x` (zero at `x = 0`: nothing to do costs nothing).
    pub fn at(&self, x: f64) -> f64 {
        if x <= 0.0 {
            0.0
        } else {
            self.alpha + self.beta * x
        }
    }
}

/// What a layer costs: all-to-all (per call, by bytes sent per rank), experts (by rows) and the
/// dense all-reduce (by bytes).
pub trait CostModel {
    /// One dispatch or combine of `bytes` per rank.
    fn all_to_all(&self, bytes: f64, hierarchical: bool) -> f64;
    /// Whether the 2D route is available.
    fn has_2d(&self) -> bool;
    /// The experts on `rows` rows.
    fn expert(&self, rows: f64) -> f64;
    /// An all-reduce of `bytes`.
    fn all_reduce(&self, bytes: f64) -> f64;
}

/// Fitted costs (the planner's view).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Costs {
    /// 1D dispatch or combine, by bytes per rank.
    pub a2a: AlphaBeta,
    /// 2D dispatch or combine, by bytes per rank (absent: not profiled).
    pub a2a_2d: Option<AlphaBeta>,
    /// The experts, by rows.
    pub expert: AlphaBeta,
    /// The dense all-reduce, by bytes.
    pub all_reduce: AlphaBeta,
}

impl CostModel for Costs {
    fn all_to_all(&self, bytes: f64, hierarchical: bool) -> f64 {
        match (hierarchical, self.a2a_2d) {
            (true, Some(m)) => m.at(bytes),
            _ => self.a2a.at(bytes),
        }
    }
    fn has_2d(&self) -> bool {
        self.a2a_2d.is_some()
    }
    fn expert(&self, rows: f64) -> f64 {
        self.expert.at(rows)
    }
    fn all_reduce(&self, bytes: f64) -> f64 {
        self.all_reduce.at(bytes)
    }
}

/// The simulator's cluster with an expert cost per row: the "true" costs of the planner tests.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterCosts {
    /// The cluster.
    pub cluster: MoeCluster,
    /// FLOPs of the experts per row.
    pub flops_per_row: f64,
}

impl CostModel for ClusterCosts {
    fn all_to_all(&self, bytes: f64, hierarchical: bool) -> f64 {
        self.cluster.all_to_all(bytes, hierarchical)
    }
    fn has_2d(&self) -> bool {
        self.cluster.nodes > 1
    }
    fn expert(&self, rows: f64) -> f64 {
        self.cluster.expert(rows, self.flops_per_row)
    }
    fn all_reduce(&self, bytes: f64) -> f64 {
        self.cluster.all_reduce(bytes)
    }
}

impl Costs {
    /// Profile a cost model (the simulator's cluster) as [`profile`] profiles a communicator: the
    /// all-to-all and all-reduce at 1/16, 1/4 and all of the workload's bytes, the experts at the
    /// same fractions of its rows; then fit.
    pub fn from_model<M: CostModel>(m: &M, w: &Workload) -> Result<Costs> {
        let fr = [1.0 / 16.0, 0.25, 1.0];
        let bytes = (w.rows * w.row_bytes) as f64;
        let s = |f: &dyn Fn(f64) -> f64, total: f64| -> Vec<(f64, f64)> {
            fr.iter().map(|q| (q * total, f(q * total))).collect()
        };
        let a2a = AlphaBeta::fit(&s(&|b| m.all_to_all(b, false), bytes))?;
        let a2a_2d = if m.has_2d() {
            Some(AlphaBeta::fit(&s(&|b| m.all_to_all(b, true), bytes))?)
        } else {
            None
        };
        let expert = AlphaBeta::fit(&s(&|r| m.expert(r), w.rows as f64))?;
        let all_reduce = AlphaBeta::fit(&s(&|b| m.all_reduce(b), w.grad_bytes.max(1) as f64))?;
        Ok(Costs {
            a2a,
            a2a_2d,
            expert,
            all_reduce,
        })
    }
}

/// One layer's work per rank.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// Rows dispatched per rank (tokens × top-k, kept).
    pub rows: usize,
    /// Bytes per row on the wire.
    pub row_bytes: usize,
    /// Dense gradient bytes to all-reduce alongside the layer.
    pub grad_bytes: usize,
}

/// A schedule for one layer: a serde value to print, store and override.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Pipeline chunks (1: unpipelined).
    pub chunks: usize,
    /// The 2D route.
    pub hierarchical: bool,
    /// Dense-gradient bytes all-reduced in the gap after each chunk's combine starts (one entry
    /// per chunk); the rest goes after the layer.
    pub grad_split: Vec<usize>,
    /// The schedule's time under the model the plan was made with, seconds.
    pub predicted_s: f64,
    /// The unpipelined layer's time under that model (one chunk, 1D, all-reduce after), seconds.
    pub unpipelined_s: f64,
}

impl Plan {
    /// Check an (edited) plan against a workload: at least one chunk, one split entry per chunk,
    /// no more gradient bytes than the workload has.
    pub fn validate(&self, w: &Workload) -> Result<()> {
        if self.chunks == 0 || self.grad_split.len() != self.chunks {
            return Err(MoeError::Config(format!(
                "plan: {} chunks need as many grad_split entries (got {})",
                self.chunks,
                self.grad_split.len()
            ))
            .into());
        }
        let s: usize = self.grad_split.iter().sum();
        if s > w.grad_bytes {
            return Err(MoeError::Config(format!(
                "plan: grad_split places {s} bytes but the workload has {}",
                w.grad_bytes
            ))
            .into());
        }
        Ok(())
    }

    /// The predicted speed-up over the unpipelined layer.
    pub fn speedup(&self) -> f64 {
        self.unpipelined_s / self.predicted_s
    }
}

/// The time of one layer under `m` with `chunks` chunks, the 1D or 2D route and `grad_split`
/// bytes of all-reduce in the gaps (the rest after the layer), as [`super::pipeline::forward`]
/// issues the operations: one FIFO communication stream, computation on the caller's thread.
pub fn schedule<M: CostModel>(
    m: &M,
    w: &Workload,
    chunks: usize,
    hierarchical: bool,
    grad_split: &[usize],
) -> f64 {
    let c = chunks.max(1);
    let bytes = (w.rows * w.row_bytes) as f64 / c as f64;
    let d = m.all_to_all(bytes, hierarchical);
    let e = m.expert(w.rows as f64 / c as f64);
    let mut comm_free = 0.0f64;
    let mut host = 0.0f64;
    let issue = |at: f64, dur: f64, comm_free: &mut f64| -> f64 {
        let start = at.max(*comm_free);
        *comm_free = start + dur;
        *comm_free
    };
    let mut dd = vec![0.0; c];
    let mut cc = vec![0.0; c];
    dd[0] = issue(host, d, &mut comm_free);
    let mut placed = 0usize;
    for i in 0..c {
        if i + 1 < c {
            dd[i + 1] = issue(host, d, &mut comm_free);
        }
        host = host.max(dd[i]) + e;
        cc[i] = issue(host, d, &mut comm_free);
        let g = grad_split.get(i).copied().unwrap_or(0);
        if g > 0 {
            placed += g;
            issue(host, m.all_reduce(g as f64), &mut comm_free);
        }
        if i > 0 {
            host = host.max(cc[i - 1]);
        }
    }
    host = host.max(cc[c - 1]);
    let rest = w.grad_bytes.saturating_sub(placed);
    if rest > 0 {
        issue(host, m.all_reduce(rest as f64), &mut comm_free);
    }
    host.max(comm_free)
}

/// Greedy gap filling: for each gap in turn, the share of the remaining gradient bytes (in 32nds)
/// that minimises the layer's time with the rest after it.
pub fn fill_gaps<M: CostModel>(
    m: &M,
    w: &Workload,
    chunks: usize,
    hierarchical: bool,
) -> Vec<usize> {
    let mut split = vec![0usize; chunks];
    if w.grad_bytes == 0 {
        return split;
    }
    for i in 0..chunks {
        let placed: usize = split.iter().sum();
        let left = w.grad_bytes - placed;
        let mut best = (schedule(m, w, chunks, hierarchical, &split), 0usize);
        for j in 1..=32 {
            split[i] = left * j / 32;
            let t = schedule(m, w, chunks, hierarchical, &split);
            if t < best.0 - 1e-12 {
                best = (t, split[i]);
            }
        }
        split[i] = best.1;
    }
    split
}

/// The chunk counts the planner considers.
pub const CANDIDATE_CHUNKS: [usize; 8] = [1, 2, 3, 4, 6, 8, 12, 16];

fn best_of<M: CostModel>(
    m: &M,
    w: &Workload,
    chunks: impl Iterator<Item = usize> + Clone,
    greedy_only: bool,
) -> Plan {
    let unpipelined_s = schedule(m, w, 1, false, &[0]);
    let mut best: Option<Plan> = None;
    let routes: &[bool] = if m.has_2d() { &[false, true] } else { &[false] };
    for &hier in routes {
        for c in chunks.clone() {
            let mut splits = vec![fill_gaps(m, w, c, hier)];
            if !greedy_only {
                splits.push(vec![0; c]);
                splits.push(vec![w.grad_bytes / c; c]);
            }
            for s in splits {
                let t = schedule(m, w, c, hier, &s);
                if best.as_ref().map_or(true, |b| t < b.predicted_s) {
                    best = Some(Plan {
                        chunks: c,
                        hierarchical: hier,
                        grad_split: s,
                        predicted_s: t,
                        unpipelined_s,
                    });
                }
            }
        }
    }
    best.unwrap_or(Plan {
        chunks: 1,
        hierarchical: false,
        grad_split: vec![0],
        predicted_s: unpipelined_s,
        unpipelined_s,
    })
}

/// The planner: the fastest of [`CANDIDATE_CHUNKS`] (up to `max_chunks`) × {1D, 2D} with greedy
/// gap filling, as predicted by `m` (the fitted [`Costs`]).
pub fn plan<M: CostModel>(m: &M, w: &Workload, max_chunks: usize) -> Plan {
    let max = max_chunks.max(1);
    best_of(
        m,
        w,
        CANDIDATE_CHUNKS.iter().copied().filter(move |&c| c <= max),
        true,
    )
}

/// Exhaustive search, for judging the planner: every chunk count `1..=max_chunks` × {1D, 2D} ×
/// {greedy gaps, all after the layer, an even split over the gaps}, under `m` (the true costs).
pub fn exhaustive<M: CostModel>(m: &M, w: &Workload, max_chunks: usize) -> Plan {
    best_of(m, w, 1..=max_chunks.max(1), false)
}

/// Re-time `plan` under another model (e.g. a plan made from fitted costs, under the true ones).
pub fn evaluate<M: CostModel>(m: &M, w: &Workload, plan: &Plan) -> Plan {
    Plan {
        predicted_s: schedule(m, w, plan.chunks, plan.hierarchical, &plan.grad_split),
        unpipelined_s: schedule(m, w, 1, false, &[0]),
        ..plan.clone()
    }
}

fn max_over_ranks<C: Communicator + ?Sized, K: Kernels>(
    comm: &C,
    k: &K,
    v: &[f64],
) -> Result<Vec<f64>>
where
    K::Buf<f64>: OwnedBuffer,
{
    let mut b = k.upload(v)?;
    comm.all_reduce(&mut b, ReduceOp::Max)?;
    k.download(&b)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Profile on a live communicator (collective; every rank passes the same arguments): dispatch +
/// combine of `rows[i]` rows of `hidden` elements per rank (top-1, each rank's rows spread evenly
/// over the experts of `experts_per_rank · world` experts), on the 1D route and, with `per_node`,
/// the 2D one; `expert(r)` run on `r` rows for each of `rows`; all-reduces of `grad_elems[i]` f32.
/// Each value is the median of `reps` runs, maximised over the ranks. Restores `moe`'s route.
#[allow(clippy::too_many_arguments)]
pub fn profile<C, K, T, F>(
    moe: &mut Moe<'_, C>,
    k: &K,
    hidden: usize,
    rows: &[usize],
    experts_per_rank: usize,
    per_node: Option<usize>,
    mut expert: F,
    grad_elems: &[usize],
    reps: usize,
) -> Result<Costs>
where
    C: Communicator + ?Sized,
    K: Kernels,
    T: MoeElem,
    K::Buf<T>: OwnedBuffer,
    K::Buf<bf16>: OwnedBuffer,
    K::Buf<i64>: OwnedBuffer,
    K::Buf<f64>: OwnedBuffer,
    K::Buf<f32>: OwnedBuffer,
    F: FnMut(usize) -> Result<()>,
{
    let comm = moe.comm();
    let world = comm.world_size();
    let reps = reps.max(1);
    let saved = moe.per_node();
    let elem = std::mem::size_of::<T>();
    let row_bytes = hidden * elem;
    let e_n = experts_per_rank.max(1) * world;
    let cfg = LayoutConfig::even(e_n, world);
    let time_a2a = |moe: &Moe<'_, C>| -> Result<Vec<(f64, f64)>> {
        let mut out = Vec::new();
        for &r in rows {
            let ids: Vec<i64> = (0..r).map(|t| (t % e_n) as i64).collect();
            let layout = Layout::new(&ids, &vec![1.0; r], 1, &cfg)?;
            let x = k.alloc::<T>(r * hidden)?;
            // routed once; then the path the pipeline takes (no counts or status exchange)
            let d = moe.dispatch(k, &x, hidden, &layout)?;
            let mut ts = Vec::new();
            for _ in 0..reps {
                comm.barrier()?;
                let t0 = Instant::now();
                let f = moe.start_dispatch(k, &x, &d.handle)?;
                let rows = moe.finish(k, f)?;
                let f = moe.start_combine(k, &rows, &d.handle)?;
                let _ = moe.finish(k, f)?;
                k.synchronize()?;
                ts.push(t0.elapsed().as_secs_f64() / 2.0);
            }
            out.push(((r * row_bytes) as f64, median(ts)));
        }
        Ok(out)
    };
    moe.set_hierarchical(None)?;
    let one = time_a2a(moe)?;
    let two = match per_node {
        Some(g) if g > 1 && g < world => {
            moe.set_hierarchical(Some(g))?;
            Some(time_a2a(moe)?)
        }
        _ => None,
    };
    moe.set_hierarchical(saved)?;
    let mut ex = Vec::new();
    for &r in rows {
        let mut ts = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            expert(r)?;
            k.synchronize()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        ex.push((r as f64, median(ts)));
    }
    let mut ar = Vec::new();
    for &n in grad_elems {
        let mut b = k.alloc::<f32>(n)?;
        let mut ts = Vec::new();
        for _ in 0..reps {
            comm.barrier()?;
            let t0 = Instant::now();
            comm.all_reduce(&mut b, ReduceOp::Sum)?;
            k.synchronize()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        ar.push(((n * 4) as f64, median(ts)));
    }
    // the same numbers on every rank: the maximum over ranks
    let mut flat: Vec<f64> = one.iter().map(|s| s.1).collect();
    flat.extend(two.iter().flatten().map(|s| s.1));
    flat.extend(ex.iter().map(|s| s.1));
    flat.extend(ar.iter().map(|s| s.1));
    let flat = max_over_ranks(comm, k, &flat)?;
    let mut it = flat.into_iter();
    let mut take = |v: &[(f64, f64)]| -> Vec<(f64, f64)> {
        v.iter().map(|s| (s.0, it.next().unwrap_or(s.1))).collect()
    };
    let one = take(&one);
    let two = two.map(|t| take(&t));
    let ex = take(&ex);
    let ar = take(&ar);
    Ok(Costs {
        a2a: AlphaBeta::fit(&one)?,
        a2a_2d: two.map(|t| AlphaBeta::fit(&t)).transpose()?,
        expert: AlphaBeta::fit(&ex)?,
        all_reduce: AlphaBeta::fit(&ar)?,
    })
}
