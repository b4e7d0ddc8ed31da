//! Chunked pipelining of one MoE layer: chunk `i+1`'s dispatch, chunk `i`'s experts and chunk
//! `i−1`'s combine overlap.
//!
//! The tokens are cut into `c` contiguous chunks ([`Layout::chunk`], which keeps the layout's
//! dropping decisions, so the chunks together send exactly the layout's rows). One header and one
//! counts exchange route all chunks ([`Moe::route_chunks`]); then, in program order (the same on
//! every rank, so the collectives match):
//!
//! ```text
//! start dispatch 0
//! for i in 0..c:
//!     start dispatch i+1            (its rows move while chunk i computes)
//!     finish dispatch i → experts(i) (the caller's closure)
//!     start combine i; gap(i)       (the caller may launch gradient buckets here)
//!     finish combine i−1            (it moved while chunk i computed)
//! finish combine c−1
//! ```
//!
//! Non-blocking operations run on the communicator's progress engine (local, TCP: a worker thread
//! per rank; MPI: immediate calls; NCCL: the buffer's stream), so the closure's computation overlaps
//! them. On the 2D route only the first of a dispatch's two exchanges is in flight during the
//! closure; the second runs when the dispatch is finished.

use super::{Handle, Layout, Moe, MoeElem};
use crate::kernels::Kernels;
use crate::{Communicator, OwnedBuffer, Result};
use half::bf16;

/// What the expert closure gets for one chunk.
#[derive(Debug)]
pub struct ExpertBatch<'a, B> {
    /// The chunk's index.
    pub chunk: usize,
    /// Received rows, grouped per local expert ([`super::Dispatched::rows`]).
    pub rows: &'a B,
    /// Rows per local expert.
    pub counts: &'a [usize],
}

/// A pipelined layer's result.
#[derive(Debug)]
pub struct Pipelined<B> {
    /// The combined output, `tokens × hidden`, token order.
    pub out: B,
    /// The chunks' layouts (token ranges of the parent, in order).
    pub layouts: Vec<Layout>,
    /// The chunks' handles, for the backward passes chunk by chunk.
    pub handles: Vec<Handle>,
}

/// Token ranges of `c` near-equal chunks of `tokens`.
pub fn chunk_ranges(tokens: usize, c: usize) -> Vec<std::ops::Range<usize>> {
    let c = c.max(1);
    (0..c)
        .map(|i| (tokens * i / c)..(tokens * (i + 1) / c))
        .collect()
}

fn rows_of<K: Kernels, T: MoeElem>(
    k: &K,
    x: &K::Buf<T>,
    r: std::ops::Range<usize>,
    h: usize,
) -> Result<K::Buf<T>> {
    let idx: Vec<u32> = (r.start as u32..r.end as u32).collect();
    let mut out = k.alloc::<T>(idx.len() * h)?;
    if !idx.is_empty() {
        let i = k.upload(&idx)?;
        k.gather_rows(x, &i, h, &mut out)?;
    }
    Ok(out)
}

fn place<K: Kernels, T: MoeElem>(
    k: &K,
    part: &K::Buf<T>,
    r: std::ops::Range<usize>,
    h: usize,
    out: &mut K::Buf<T>,
) -> Result<()> {
    if r.is_empty() {
        return Ok(());
    }
    let idx: Vec<u32> = (r.start as u32..r.end as u32).collect();
    let i = k.upload(&idx)?;
    k.scatter_rows(part, &i, None, h, false, out)
}

/// One MoE layer forward in `chunks` pipelined chunks (see the [module docs](self)): `expert`
/// maps each chunk's received rows to its outputs (same shape), `gap(i)` runs right after chunk
/// `i`'s combine is started (launch dense-gradient buckets there; see `plan::Plan::grad_split`).
/// Collective: every rank passes the same `chunks` and `hidden`. `chunks = 1` is the unpipelined
/// layer (dispatch, experts, combine in sequence) through the same code.
#[allow(clippy::too_many_arguments)]
pub fn forward<C, K, T, F, G>(
    moe: &Moe<'_, C>,
    k: &K,
    x: &K::Buf<T>,
    hidden: usize,
    layout: &Layout,
    chunks: usize,
    mut expert: F,
    mut gap: G,
) -> Result<Pipelined<K::Buf<T>>>
where
    C: Communicator + ?Sized,
    K: Kernels,
    T: MoeElem,
    K::Buf<T>: OwnedBuffer,
    K::Buf<bf16>: OwnedBuffer,
    K::Buf<i64>: OwnedBuffer,
    F: FnMut(ExpertBatch<'_, K::Buf<T>>) -> Result<K::Buf<T>>,
    G: FnMut(usize) -> Result<()>,
{
    if chunks == 0 {
        return Err(super::MoeError::Config("chunks must be at least 1".into()).into());
    }
    let ranges = chunk_ranges(layout.tokens(), chunks);
    let layouts = ranges
        .iter()
        .map(|r| layout.chunk(r.clone()))
        .collect::<Result<Vec<_>>>()?;
    // every rank checks its x before the (collective) routing, so a bad x fails everywhere
    let x_ok = if k.len(x) == layout.tokens() * hidden {
        Ok(())
    } else {
        Err(crate::Error::LengthMismatch {
            what: format!(
                "pipelined forward: x must hold tokens ({}) x hidden ({hidden})",
                layout.tokens()
            ),
            expected: layout.tokens() * hidden,
            got: k.len(x),
        })
    };
    let handles = match x_ok {
        Ok(()) => moe.route_chunks::<K, T>(k, hidden, &layouts)?,
        Err(e) => {
            let _ = moe.route_chunks::<K, T>(k, 0, &layouts);
            return Err(e);
        }
    };
    let mut out = k.alloc::<T>(layout.tokens() * hidden)?;
    let xs = ranges
        .iter()
        .map(|r| rows_of(k, x, r.clone(), hidden))
        .collect::<Result<Vec<_>>>()?;
    let mut next = Some(moe.start_dispatch(k, &xs[0], &handles[0])?);
    let mut pending: Option<(usize, super::InFlight<K, T>)> = None;
    for i in 0..chunks {
        let Some(this) = next.take() else {
            return Err(crate::Error::InvalidArgument(
                "pipelined forward: internal: no dispatch in flight".into(),
            ));
        };
        if i + 1 < chunks {
            next = Some(moe.start_dispatch(k, &xs[i + 1], &handles[i + 1])?);
        }
        let rows = moe.finish(k, this)?;
        let y = expert(ExpertBatch {
            chunk: i,
            rows: &rows,
            counts: handles[i].expert_counts(),
        })?;
        let c = moe.start_combine(k, &y, &handles[i])?;
        gap(i)?;
        if let Some((j, p)) = pending.take() {
            let part = moe.finish(k, p)?;
            place(k, &part, ranges[j].clone(), hidden, &mut out)?;
        }
        pending = Some((i, c));
    }
    if let Some((j, p)) = pending.take() {
        let part = moe.finish(k, p)?;
        place(k, &part, ranges[j].clone(), hidden, &mut out)?;
    }
    Ok(Pipelined {
        out,
        layouts,
        handles,
    })
}
