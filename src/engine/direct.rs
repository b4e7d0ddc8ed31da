//! Direct collectives for ranks that share an address space: two-shot all-reduce, reduce-scatter
//! and all-gather over loans.
//!
//! The ring moves every byte through `n − 1` hand-offs, each a read-modify-write of memory; between
//! threads of one process that is wasted bandwidth, because a rank can read and write its peers'
//! buffers directly (NCCL does the same within a node with P2P/NVLS, TensorRT-LLM's custom all-reduce
//! calls it "two-shot"). All-reduce:
//!
//! 1. every rank lends chunk `j` of its input *and* of its output to rank `j` (one read-write loan per
//!    peer, see [`super::msg::with_loans`]);
//! 2. rank `r` reduces chunk `r` tile by tile — a cache-sized tile of every rank's input, combined in
//!    rank order into a scratch tile — and writes the finished tile into **every** rank's output.
//!
//! Each input byte is read once and each output byte written once: `n·S` reads and `n·S` writes in
//! total, the least any all-reduce can move (the ring moves about twice that). Large outputs are
//! written with non-temporal stores, as glibc's `memcpy` does past its cache threshold, so the writes
//! do not first read the destination lines. Every chunk is reduced by one rank in rank order, so
//! all ranks end bit-identical. In place is safe: chunk `r` of any buffer is touched only by rank `r`,
//! and within a tile every read finishes before the writes start.
//!
//! Reduce-scatter is step 2 with only the own output (read-only loans of block `r` of every input);
//! all-gather lends every input to every peer, which copies it into place. One phase each, where the
//! ring needs `n − 1` dependent steps (and reduce-scatter's ring re-reads its partial sums).
//!
//! Used when the peers share this address space and no link model is charging messages (the ring
//! then models the network); see [`super::algo`].

use super::msg::{with_loans, Msg, Region, Tag};
use super::{Engine, Raw};
use crate::dtype::{reduce3, reduce_into};
use crate::{DType, Error, ReduceOp, Result};
use std::sync::atomic::Ordering;

/// Bytes per scratch tile: small enough for L1/L2 next to the streamed inputs.
const TILE: usize = 16 * 1024;

/// Outputs at least this large in total (all ranks) bypass the cache on write.
pub const STREAM_BYTES: usize = 8 << 20;

impl Engine {
    /// Two-shot all-reduce (see the module docs). `count ≥ n`.
    pub(crate) fn twoshot_allreduce(
        &mut self,
        seq: u64,
        inp: Option<Raw>,
        out: Raw,
        dtype: DType,
        op: ReduceOp,
        count: usize,
    ) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let es = dtype.size();
        let range = |c: usize| (c * count / n * es, (c + 1) * count / n * es);
        let src = inp.unwrap_or(out);
        let tag = Tag::Coll { seq, step: 0 };
        let mut guards = Vec::with_capacity(n);
        for j in (0..n).filter(|&j| j != r) {
            let (a, b) = range(j);
            guards.push(self.send_lend_rw(j, tag, src.get(a, b), out.ptr_at(a))?);
        }
        let (a, b) = range(r);
        let msgs = self.recv_all(tag, b - a, "all_reduce")?;
        let own = Region {
            src: src.ptr_at(a),
            dst: out.ptr_at(a),
            len: b - a,
        };
        let stream = out.len() * n >= STREAM_BYTES;
        held(&msgs, r, own, true, |all| {
            let dsts: Vec<*mut u8> = all.iter().map(|g| g.dst).collect();
            reduce_tiles(all, &dsts, dtype, op, stream)
        })??;
        // what a network transport would have sent: the reduced chunk to every peer
        // (and would have received: every peer's reduced chunk)
        self.traffic.sent(self.cur, ((n - 1) * (b - a)) as u64);
        let others: usize = (0..n)
            .filter(|&j| j != r)
            .map(|j| range(j).1 - range(j).0)
            .sum();
        self.traffic.received(self.cur, others as u64);
        for g in &guards {
            self.wait_guard(g)?;
        }
        Ok(())
    }

    /// Direct reduce-scatter: rank `r` reduces block `r` of every input into its output.
    pub(crate) fn direct_reduce_scatter(
        &mut self,
        seq: u64,
        inp: Raw,
        out: Raw,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let bl = out.len();
        let tag = Tag::Coll { seq, step: 0 };
        let mut guards = Vec::with_capacity(n);
        for j in (0..n).filter(|&j| j != r) {
            guards.push(self.send_lend(j, tag, inp.get(j * bl, (j + 1) * bl))?);
        }
        let msgs = self.recv_all(tag, bl, "reduce_scatter")?;
        let own = Region {
            src: inp.ptr_at(r * bl),
            dst: std::ptr::null_mut(),
            len: bl,
        };
        let stream = bl * n >= STREAM_BYTES;
        held(&msgs, r, own, false, |all| {
            reduce_tiles(all, &[out.ptr_at(0)], dtype, op, stream)
        })??;
        for g in &guards {
            self.wait_guard(g)?;
        }
        Ok(())
    }

    /// Direct all-gather: every rank lends its block to every peer, which copies it into place.
    pub(crate) fn direct_all_gather(&mut self, seq: u64, inp: &[u8], out: Raw) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let bl = inp.len();
        out.get_mut(r * bl, (r + 1) * bl).copy_from_slice(inp);
        let tag = Tag::Coll { seq, step: 0 };
        let mut guards = Vec::with_capacity(n);
        for j in (0..n).filter(|&j| j != r) {
            guards.push(self.send_lend(j, tag, inp)?);
        }
        let msgs = self.recv_all(tag, bl, "all_gather")?;
        let stream = out.len() * n >= STREAM_BYTES;
        for m in &msgs {
            let j = m.src;
            m.payload.with(j, |x| {
                let dst = out.get_mut(j * bl, (j + 1) * bl);
                if stream {
                    stream_copy(dst, x);
                } else {
                    dst.copy_from_slice(x);
                }
            })?;
        }
        if stream {
            store_fence(); // before the caller (another thread) is told the output is ready
        }
        for g in &guards {
            self.wait_guard(g)?;
        }
        Ok(())
    }

    /// Receive this step's message from every peer, in rank order, each `len` bytes.
    fn recv_all(&mut self, tag: Tag, len: usize, during: &'static str) -> Result<Vec<Msg>> {
        let (n, r) = (self.size, self.rank);
        let mut msgs = Vec::with_capacity(n);
        for j in (0..n).filter(|&j| j != r) {
            let m = self.recv(j, tag, during)?;
            super::algo::check_len(self.op_dtype, j, m.payload.len(), len)?;
            msgs.push(m);
        }
        Ok(msgs)
    }
}

/// Hold the loans of `msgs` (from every peer in rank order, so the first `rank` are below us) and
/// call `f` with every rank's region in rank order, `own` in slot `rank`.
fn held<R>(
    msgs: &[Msg],
    rank: usize,
    own: Region,
    write: bool,
    f: impl FnOnce(&[Region]) -> R,
) -> Result<R> {
    let loans: Vec<(usize, &super::msg::Payload)> =
        msgs.iter().map(|m| (m.src, &m.payload)).collect();
    let r = rank.min(msgs.len());
    with_loans(&loans, write, |peers| {
        let mut all: Vec<Region> = Vec::with_capacity(peers.len() + 1);
        all.extend_from_slice(&peers[..r]);
        all.push(own);
        all.extend_from_slice(&peers[r..]);
        f(&all)
    })
}

/// Reduce `srcs[0] ⊕ … ⊕ srcs[n-1]` (their `src` views) tile by tile into every pointer of `dsts`.
fn reduce_tiles(
    srcs: &[Region],
    dsts: &[*mut u8],
    dtype: DType,
    op: ReduceOp,
    stream: bool,
) -> Result<()> {
    let len = srcs.first().map_or(0, |g| g.len);
    if srcs.iter().any(|g| g.len != len) || srcs.len() < 2 {
        return Err(Error::InvalidArgument(
            "internal: direct-collective regions differ in length".into(),
        ));
    }
    let es = dtype.size();
    let tile = TILE / es * es;
    let mut scratch = super::msg::Aligned::zeroed(tile);
    let mut at = 0;
    while at < len {
        let t = tile.min(len - at);
        let acc = &mut scratch.as_bytes_mut()[..t];
        {
            // SAFETY: every region is valid for `len` bytes (held loans, or our own borrowed
            // buffers); these read views end before the writes below, which may alias them.
            let view = |g: &Region| unsafe { std::slice::from_raw_parts(g.src.add(at), t) };
            reduce3(dtype, op, acc, view(&srcs[0]), view(&srcs[1]))?;
            for g in &srcs[2..] {
                reduce_into(dtype, op, acc, view(g))?;
            }
        }
        for &d in dsts {
            // SAFETY: as above; no read view of this range is alive now.
            let dst = unsafe { std::slice::from_raw_parts_mut(d.add(at), t) };
            if stream {
                stream_copy(dst, acc);
            } else {
                dst.copy_from_slice(acc);
            }
        }
        at += t;
    }
    if stream {
        store_fence();
    }
    Ok(())
}

/// Copy with non-temporal stores where the CPU has them (SSE2 on x86-64), else a plain copy.
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let n = dst.len().min(src.len());
        let head = dst.as_ptr().align_offset(16).min(n);
        dst[..head].copy_from_slice(&src[..head]);
        let body = (n - head) / 16 * 16;
        let mut i = head;
        while i < head + body {
            // SAFETY: dst+i is 16-byte aligned and i+16 ≤ n for both slices; SSE2 is part of the
            // x86-64 baseline.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm_stream_si128(dst.as_mut_ptr().add(i) as *mut __m128i, v);
            }
            i += 16;
        }
        dst[i..n].copy_from_slice(&src[i..n]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Order non-temporal stores before the acknowledgements that publish them.
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    std::sync::atomic::fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_copy_matches_copy_at_every_alignment() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..17 {
            for len in [0, 1, 15, 16, 17, 100, 283 - off] {
                let mut dst = vec![0u8; 300];
                stream_copy(&mut dst[off..off + len], &src[..len]);
                store_fence();
                assert_eq!(&dst[off..off + len], &src[..len], "off {off} len {len}");
                assert!(dst[..off].iter().all(|&b| b == 0));
                assert!(dst[off + len..].iter().all(|&b| b == 0));
            }
        }
    }
}
