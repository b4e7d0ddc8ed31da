//! Blocking all-reduces over `MPI_Isend`/`MPI_Irecv`: recursive doubling for small vectors,
//! Rabenseifner's halving/doubling above.
//!
//! Why not `MPI_Iallreduce` + `MPI_Test` (what non-blocking calls use): Open MPI's non-blocking
//! collectives (libnbc) build a schedule on every call, a fixed cost of about 10 µs at 4 ranks that
//! doubled the time of a tiny all-reduce compared with the blocking `MPI_Allreduce`, and libnbc's
//! algorithm choice left medium sizes at up to 1.4× (measured in `benches/RESULTS.md`). The blocking
//! call has no timeout, which ferroccl promises for every blocking call. MPI's own tuned blocking
//! all-reduce is built from the same point-to-point steps (`ompi_coll_base_allreduce_intra_*`), so
//! doing them from here, with requests polled by `MPI_Testall` until the deadline, costs what MPI's
//! own call costs and keeps the timeout.
//!
//! Memory: each calling thread keeps one scratch buffer as large as its largest all-reduce so far
//! (up to [`CACHE_BYTES`]; larger ones are allocated per call).
//!
//! The messages travel on a private duplicate of the communicator, so they never match the
//! application's sends and receives. Every pair of partners combines the same two operands in the same
//! order (lower rank on the left), and non-powers of two fold the first `2·rem` ranks pairwise first,
//! so all ranks end bit-identical, as with the other backends.

use super::flight::Target;
use crate::dtype::{finish_avg, reduce3, reduce_into};
use crate::{DType, Error, ReduceOp, Result};
use mpi::ffi;
use std::os::raw::{c_int, c_void};
use std::time::Instant;

/// Blocking all-reduces of at most this many bytes take this path (MPI counts are C ints: a larger
/// one goes through `MPI_Iallreduce`, which counts elements).
pub(crate) const MAX_BYTES: usize = i32::MAX as usize;

/// Scratch buffers up to this size are kept for the next call on the same thread.
const CACHE_BYTES: usize = 256 << 20;

/// Up to this many bytes (at up to 4 ranks; `RD_BYTES · 4 / p` at `p` > 4) whole vectors are
/// exchanged (recursive doubling, `log p` messages of `S`); above, Rabenseifner's halving/doubling
/// (`2 log p` messages of `S/2, S/4, …`). Chosen by measurement (`benches/run_mpi_bench.sh` and the
/// 16-core device host): at 2 and 4 ranks 8 KiB whole exchanges beat halving/doubling; at 8 ranks
/// the three whole 8 KiB exchanges were 6–8 % slower than `MPI_Allreduce` (Rabenseifner there).
const RD_BYTES: usize = 8192;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Tags of the steps (on the private communicator, so any values work).
const FOLD: c_int = 1;
const UNFOLD: c_int = 2;
const STEP: c_int = 16;
/// Polls between two yields (and deadline checks): ranks may share cores.
const SPIN: u32 = 1024;

/// What one call needs: where to send, the deadline, how to report a timeout.
pub(crate) struct P2p<'a> {
    pub t: Target<'a>,
    /// The private duplicate of `t.comm`.
    pub p2p: ffi::MPI_Comm,
    /// Set at the first yield (an idle wait), not at the start: reading the clock costs ~5% of a
    /// tiny all-reduce, and the first yield comes after at most [`SPIN`] polls.
    pub deadline: std::cell::Cell<Option<Option<Instant>>>,
    pub timeout: std::time::Duration,
}

impl P2p<'_> {
    /// `out ← op over ranks of (send or out)`; then the Avg division.
    ///
    /// Out of place, `send` is never copied into `out`: the first step that combines reads it
    /// directly (`out ← op(send, received)`), which saves a pass over the whole vector — at
    /// 0.5–1 MiB that copy was most of the gap to MPI's own `MPI_Allreduce`, which does copy.
    pub(crate) fn all_reduce(
        &self,
        send: Option<&[u8]>,
        out: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.t.world;
        let len = out.len();
        if let Some(s) = send {
            if s.len() != len {
                return Err(Error::byte_lengths(
                    "all_reduce: recv must have as many elements as send",
                    dtype,
                    len,
                    s.len(),
                ));
            }
        }
        if n > 1 && len > 0 {
            // one scratch buffer per thread, reused: an allocation costs ~5% of a tiny all-reduce
            let mut words = SCRATCH.with(|c| c.take());
            words.resize(len.div_ceil(8), 0);
            let scratch = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len];
            let r = self.steps(send, out, scratch, dtype, op);
            if r.is_err() && self.t.session.is_poisoned() {
                std::mem::forget(words); // a receive into it may still be posted
            } else if words.len() * 8 <= CACHE_BYTES {
                SCRATCH.with(|c| c.set(words));
            }
            r?;
        } else if let Some(s) = send {
            out.copy_from_slice(s);
        }
        finish_avg(dtype, op, out, n)
    }

    /// The fold of ranks beyond the largest power of two, the power-of-two phase, the unfold.
    /// `src` is the caller's input while `out` does not hold it yet (out of place, before the
    /// first combine); `None` once `out` holds this rank's running value.
    fn steps(
        &self,
        src: Option<&[u8]>,
        out: &mut [u8],
        scratch: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, r) = (self.t.world, self.t.rank);
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let rem = n - p;
        let mut cur = Running { src };
        let newrank = if r < 2 * rem {
            if r % 2 == 0 {
                self.exchange(r + 1, FOLD, Some(cur.get(out, 0..out.len())), None, dtype)?;
                None
            } else {
                self.exchange(r - 1, FOLD, None, Some(scratch), dtype)?;
                cur.combine(dtype, op, out, scratch, true)?;
                Some(r / 2)
            }
        } else {
            Some(r - rem)
        };
        if let Some(nr) = newrank {
            let plan = Plan {
                dtype,
                op,
                nr,
                p,
                rem,
            };
            if out.len() <= RD_BYTES * 4 / p.max(4) || out.len() / dtype.size() < p {
                self.recursive_doubling(cur, out, scratch, &plan)?;
            } else {
                self.halving_doubling(cur, out, scratch, &plan)?;
            }
        }
        if r < 2 * rem {
            if r % 2 == 1 {
                self.exchange(r - 1, UNFOLD, Some(out), None, dtype)?;
            } else {
                self.exchange(r + 1, UNFOLD, None, Some(out), dtype)?;
            }
        }
        Ok(())
    }

    /// Every rank exchanges its whole vector with partners at distance 1, 2, 4, … (`log p` steps).
    fn recursive_doubling(
        &self,
        mut cur: Running<'_>,
        out: &mut [u8],
        scratch: &mut [u8],
        plan: &Plan,
    ) -> Result<()> {
        let (r, p, nr) = (self.t.rank, plan.p, plan.nr);
        let mut mask = 1;
        let mut step = STEP;
        while mask < p {
            let peer = plan.real(nr ^ mask);
            self.exchange(
                peer,
                step,
                Some(cur.get(out, 0..out.len())),
                Some(scratch),
                plan.dtype,
            )?;
            cur.combine(plan.dtype, plan.op, out, scratch, peer < r)?;
            mask <<= 1;
            step += 1;
        }
        Ok(())
    }

    /// Rabenseifner: recursive halving reduce-scatter (each step sends half of what is left), then
    /// recursive doubling all-gather: `2(p−1)/p·S` bytes per rank instead of recursive doubling's
    /// `log p · S`.
    fn halving_doubling(
        &self,
        mut cur: Running<'_>,
        out: &mut [u8],
        scratch: &mut [u8],
        plan: &Plan,
    ) -> Result<()> {
        let (r, p, nr) = (self.t.rank, plan.p, plan.nr);
        let (dtype, op) = (plan.dtype, plan.op);
        let es = dtype.size();
        let count = out.len() / es;
        let at = |blk: usize| blk * count / p * es; // byte offset of block `blk`
        let (mut lo, mut hi) = (0usize, p); // the blocks this rank is still responsible for
        let mut mask = p >> 1;
        let mut step = STEP;
        while mask > 0 {
            let peer = plan.real(nr ^ mask);
            let mid = lo + (hi - lo) / 2;
            let (keep, give) = if nr & mask == 0 {
                ((lo, mid), (mid, hi))
            } else {
                ((mid, hi), (lo, mid))
            };
            let (k0, k1) = (at(keep.0), at(keep.1));
            self.exchange(
                peer,
                step,
                Some(cur.get(out, at(give.0)..at(give.1))),
                Some(&mut scratch[k0..k1]),
                dtype,
            )?;
            cur.combine_range(dtype, op, out, scratch, k0..k1, peer < r)?;
            (lo, hi) = keep;
            mask >>= 1;
            step += 1;
        }
        let mut mask = 1;
        while mask < p {
            let peer = plan.real(nr ^ mask);
            // our range and the partner's are the two halves of their parent range
            let span = hi - lo;
            let (plo, phi) = if nr & mask == 0 {
                (hi, hi + span)
            } else {
                (lo - span, lo)
            };
            let (a, b, c) = (at(lo.min(plo)), at(lo.max(plo)), at(hi.max(phi)));
            let (first, second) = out[a..c].split_at_mut(b - a);
            let (mine, theirs) = if nr & mask == 0 {
                (first, second)
            } else {
                (second, first)
            };
            self.exchange(peer, step, Some(mine), Some(theirs), dtype)?;
            (lo, hi) = (lo.min(plo), hi.max(phi));
            mask <<= 1;
            step += 1;
        }
        Ok(())
    }

    /// Send `send` to and/or receive `recv` from `peer`, polling until both completed or the deadline.
    fn exchange(
        &self,
        peer: usize,
        tag: c_int,
        send: Option<&[u8]>,
        recv: Option<&mut [u8]>,
        dtype: DType,
    ) -> Result<()> {
        let s = self.t.session;
        let peer_c = c_int::try_from(peer)
            .map_err(|_| Error::InvalidArgument(format!("rank {peer} exceeds MPI's int ranks")))?;
        // SAFETY: reading rsmpi's exported constants.
        let (byte, null) = unsafe { (ffi::RSMPI_UINT8_T, ffi::RSMPI_REQUEST_NULL) };
        let mut reqs = [null, null];
        let comm = self.p2p;
        // both counts first: nothing may fail between posting the receive and the send
        let (nr, ns) = (
            count(recv.as_ref().map_or(0, |b| b.len()))?,
            count(send.map_or(0, |b| b.len()))?,
        );
        if let Some(b) = recv {
            let n = nr;
            let p = b.as_mut_ptr().cast::<c_void>();
            // SAFETY: `b` holds `n` bytes and outlives the request: we return only once it completed,
            // or poison the session (no further MPI use) and leak nothing MPI could still write into
            // except this buffer, which the caller owns (see the module docs of `super`).
            s.call("MPI_Irecv", || unsafe {
                ffi::MPI_Irecv(p, n, byte, peer_c, tag, comm, &mut reqs[0])
            })?;
        }
        if let Some(b) = send {
            let n = ns;
            let p = b.as_ptr().cast::<c_void>();
            // SAFETY: as above, for reading.
            let r = s.call("MPI_Isend", || unsafe {
                ffi::MPI_Isend(p, n, byte, peer_c, tag, comm, &mut reqs[1])
            });
            if let Err(e) = r {
                if reqs[0] != null {
                    s.poison(); // the receive stays posted
                }
                return Err(e);
            }
        }
        let posted_recv = reqs[0] != null;
        // SAFETY: a zeroed status is a valid MPI_Status.
        let mut statuses = unsafe { std::mem::zeroed::<[ffi::MPI_Status; 2]>() };
        let mut spins = 0u32;
        loop {
            let mut flag: c_int = 0;
            // SAFETY: two request handles (null ones are ignored by MPI) and two statuses.
            let r = s.call("MPI_Testall", || unsafe {
                ffi::MPI_Testall(2, reqs.as_mut_ptr(), &mut flag, statuses.as_mut_ptr())
            });
            if let Err(e) = r {
                s.poison();
                return Err(e);
            }
            if flag != 0 {
                // A longer message fails the receive (MPI_ERR_TRUNCATE, above); a shorter one
                // completes it silently, and the rest of the buffer would be combined as stale bytes.
                if posted_recv {
                    let mut got: c_int = 0;
                    // SAFETY: the status of the completed receive.
                    s.call("MPI_Get_count", || unsafe {
                        ffi::MPI_Get_count(&statuses[0], byte, &mut got)
                    })?;
                    if got != nr {
                        // The ranks disagree on the length and this rank leaves the steps midway:
                        // partners' later steps (fixed tags on the private communicator) could match
                        // the next all-reduce, so no further MPI use, as on the partner's truncation.
                        s.poison();
                        return Err(Error::byte_lengths(
                            format!(
                                "all_reduce: message from rank {peer} (every rank must pass the \
                                 same length)"
                            ),
                            dtype,
                            nr as usize,
                            usize::try_from(got).unwrap_or(0),
                        ));
                    }
                }
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins % SPIN != 0 {
                continue; // reading the clock costs as much as a poll
            }
            std::thread::yield_now();
            let now = Instant::now();
            let deadline = match self.deadline.get() {
                Some(d) => d,
                None => {
                    let d = now.checked_add(self.timeout);
                    self.deadline.set(Some(d));
                    d
                }
            };
            if deadline.is_some_and(|d| now >= d) {
                s.poison();
                return Err(Error::Timeout {
                    during: "all_reduce",
                    after: self.timeout,
                    waiting_for: Some(peer),
                });
            }
        }
    }
}

/// The power-of-two phase of an all-reduce after the fold: this rank is `nr` of `p`.
struct Plan {
    dtype: DType,
    op: ReduceOp,
    nr: usize,
    p: usize,
    /// Ranks beyond the largest power of two (folded into their odd partners).
    rem: usize,
}

impl Plan {
    /// The real rank of phase rank `q`.
    fn real(&self, q: usize) -> usize {
        if q < self.rem {
            q * 2 + 1
        } else {
            q + self.rem
        }
    }
}

fn count(n: usize) -> Result<c_int> {
    c_int::try_from(n)
        .map_err(|_| Error::InvalidArgument(format!("{n} bytes exceed MPI's int count")))
}

/// Where this rank's running value is: the caller's send buffer until the first combine (out of
/// place), `out` after it.
struct Running<'a> {
    src: Option<&'a [u8]>,
}

impl Running<'_> {
    /// The running value's bytes in `range` (to send).
    fn get<'b>(&'b self, out: &'b [u8], range: std::ops::Range<usize>) -> &'b [u8] {
        match self.src {
            Some(s) => &s[range],
            None => &out[range],
        }
    }

    /// `out ← op(running, received)` over the whole vector.
    fn combine(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        out: &mut [u8],
        theirs: &mut [u8],
        theirs_first: bool,
    ) -> Result<()> {
        let all = 0..out.len();
        self.combine_range(dtype, op, out, theirs, all, theirs_first)
    }

    /// `out[range] ← op(running[range], theirs[range])`, the lower rank's operand on the left;
    /// afterwards `out[range]` is the running value (ranges outside it are never read again).
    fn combine_range(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        out: &mut [u8],
        theirs: &mut [u8],
        range: std::ops::Range<usize>,
        theirs_first: bool,
    ) -> Result<()> {
        let (out, theirs) = (&mut out[range.clone()], &mut theirs[range.clone()]);
        match self.src.take() {
            Some(s) if theirs_first => reduce3(dtype, op, out, theirs, &s[range]),
            Some(s) => reduce3(dtype, op, out, &s[range], theirs),
            None => combine(dtype, op, out, theirs, theirs_first),
        }
    }
}

/// `out ← op(peer, out)` if the peer's rank is lower, else `out ← op(out, peer)`; `theirs` is scratch.
/// Sum (Avg) and Prod are commutative bit for bit (IEEE `+`/`×`, wrapping integers, half types
/// computed in f32), so they skip the copy; Min/Max keep the order, which matters for NaN.
fn combine(
    dtype: DType,
    op: ReduceOp,
    out: &mut [u8],
    theirs: &mut [u8],
    theirs_first: bool,
) -> Result<()> {
    if theirs_first && matches!(op, ReduceOp::Min | ReduceOp::Max) {
        reduce_into(dtype, op, theirs, out)?;
        out.copy_from_slice(theirs);
        Ok(())
    } else {
        reduce_into(dtype, op, out, theirs)
    }
}
