//! Two-shot all-reduce for ranks that share an address space.
//!
//! The ring moves every byte through `n − 1` hand-offs, each a read-modify-write of memory; between
//! threads of one process that is wasted bandwidth, because a rank can read and write its peers'
//! buffers directly (NCCL does the same within a node with P2P/NVLS, TensorRT-LLM's custom all-reduce
//! calls it "two-shot"). Here:
//!
//! 1. every rank lends chunk `j` of its input *and* of its output to rank `j` (one read-write loan per
//!    peer, see [`super::msg::with_loans_rw`]);
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
//! Used when loans are allowed (in-process) and no link model is charging messages (the ring then
//! models the network); see [`super::algo`].

use super::msg::{with_loans_rw, RwRegion, Tag};
use super::{Engine, Raw};
use crate::dtype::{reduce3, reduce_into};
use crate::{DType, Error, ReduceOp, Result};
use std::sync::atomic::Ordering;

/// Bytes per scratch tile: small enough for L1/L2 next to the streamed inputs.
const TILE: usize = 16 * 1024;

/// Outputs at least this large in total (all ranks) bypass the cache on write.
pub const STREAM_BYTES: usize = 8 << 20;

impl Engine {
    /// See the module docs. `count ≥ n` (every rank owns a non-empty chunk boundary).
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
        let mut msgs = Vec::with_capacity(n);
        for j in (0..n).filter(|&j| j != r) {
            let m = self.recv(j, tag, "all_reduce")?;
            if m.payload.len() != b - a {
                return Err(Error::LengthMismatch {
                    what: format!(
                        "message from rank {j} (bytes): peers disagree on the collective's size"
                    ),
                    expected: b - a,
                    got: m.payload.len(),
                });
            }
            msgs.push(m);
        }
        let loans: Vec<(usize, &super::msg::Payload)> =
            msgs.iter().map(|m| (m.src, &m.payload)).collect();
        let own = RwRegion {
            src: src.ptr_at(a),
            dst: out.ptr_at(a),
            len: b - a,
        };
        let stream = (out.len() * n) >= STREAM_BYTES;
        with_loans_rw(&loans, |peers| {
            // regions in rank order: peers arrive ordered by rank with our own slot missing
            let mut all: Vec<RwRegion> = Vec::with_capacity(n);
            all.extend_from_slice(&peers[..r]);
            all.push(own);
            all.extend_from_slice(&peers[r..]);
            reduce_tiles(&all, dtype, op, stream)
        })??;
        // what a network transport would have sent: the reduced chunk to every peer
        self.bytes_sent
            .fetch_add(((n - 1) * (b - a)) as u64, Ordering::Relaxed);
        for g in &guards {
            self.wait_guard(g)?;
        }
        Ok(())
    }
}

/// Reduce `regions[0].src ⊕ … ⊕ regions[n-1].src` tile by tile into every `regions[k].dst`.
fn reduce_tiles(regions: &[RwRegion], dtype: DType, op: ReduceOp, stream: bool) -> Result<()> {
    let len = regions.first().map_or(0, |g| g.len);
    if regions.iter().any(|g| g.len != len) || regions.len() < 2 {
        return Err(Error::InvalidArgument(
            "internal: two-shot regions differ in length".into(),
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
            let view = |g: &RwRegion| unsafe { std::slice::from_raw_parts(g.src.add(at), t) };
            reduce3(dtype, op, acc, view(&regions[0]), view(&regions[1]))?;
            for g in &regions[2..] {
                reduce_into(dtype, op, acc, view(g))?;
            }
        }
        for g in regions {
            // SAFETY: as above; no read view of this range is alive now.
            let dst = unsafe { std::slice::from_raw_parts_mut(g.dst.add(at), t) };
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
