//! Collective algorithms over the engine's messages.
//!
//! - all_reduce: recursive doubling (with the usual fold for non-powers of two) below
//!   [`SMALL_BYTES`]; above, two-shot over read-write loans where the peers share this address space
//!   and no link model is charging ([`super::direct`]), else ring reduce-scatter + all-gather — the
//!   bandwidth-optimal choice NCCL's ring makes over a network. All give bit-identical results on
//!   every rank.
//! - reduce_scatter, all_gather: ring. broadcast, reduce: binomial tree. barrier: dissemination.
//! - all_to_all(v): every rank posts all its blocks at once, then takes its incoming blocks (what
//!   NCCL's grouped send/recv does).
//!
//! Large blocks travel as loans (single copy in one process); see [`super::msg`].

use super::msg::{Aligned, LendGuard, Tag};
use super::{copy_in, Engine, Raw};
use crate::dtype::{finish_avg, reduce3, reduce_into};
use crate::{Collective, CollectiveRef, DType, Error, ReduceOp, Result};

/// Below this many bytes all_reduce uses recursive doubling (latency-bound regime).
pub const SMALL_BYTES: usize = 64 * 1024;

fn host<'a>(b: &crate::Buf<'a>) -> Result<&'a [u8]> {
    b.host_bytes().ok_or_else(|| {
        Error::Unsupported(
            "this backend only takes host buffers (device buffers need the cuda feature's staging)"
                .into(),
        )
    })
}

fn host_mut<'a>(b: &'a mut crate::BufMut<'_>) -> Result<&'a mut [u8]> {
    b.host_bytes_mut().ok_or_else(|| {
        Error::Unsupported(
            "this backend only takes host buffers (device buffers need the cuda feature's staging)"
                .into(),
        )
    })
}

/// A message's byte length against the one this rank expects, reported in elements of the
/// operation's `dtype` (what the ranks' buffers count in).
pub(super) fn check_len(dtype: DType, src: usize, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::byte_lengths(
            format!("message from rank {src}: peers disagree on the collective's size"),
            dtype,
            want,
            got,
        ))
    }
}

fn rank_in(what: &'static str, rank: usize, world: usize) -> Result<()> {
    if rank < world {
        Ok(())
    } else {
        Err(Error::RankOutOfRange { what, rank, world })
    }
}

/// Byte lengths must agree (`want` is `None` when it overflowed, which no real buffer matches);
/// reported in elements of `dtype`.
fn bytes_eq(dtype: DType, what: &'static str, want: Option<usize>, got: usize) -> Result<()> {
    match want {
        Some(w) if w == got => Ok(()),
        Some(w) => Err(Error::byte_lengths(what, dtype, w, got)),
        None => Err(Error::InvalidArgument(format!(
            "{what}: the expected length overflows usize"
        ))),
    }
}

impl Engine {
    /// Run one collective as one operation: a single deadline, `Config::timeout` from now, bounds
    /// every wait inside it (see the module docs of [`super`]).
    ///
    /// `Communicator::exec` is public and skips `Communicator::run`'s validation, so the few facts
    /// the algorithms index by — ranks and byte lengths — are checked here (a handful of integer
    /// comparisons), and a bad call is an error rather than a panic on the worker.
    pub fn execute(&mut self, c: CollectiveRef<'_>) -> Result<()> {
        self.cur = c.kind();
        let p2p = matches!(c, Collective::Send { .. } | Collective::Recv { .. });
        self.sig = if p2p {
            super::msg::Sig::NONE
        } else {
            super::msg::Sig::of(&c)
        };
        let before = self.seq;
        let r = self.with_deadline(|e| e.execute_op(c));
        if !p2p && self.seq != before {
            self.finish_collective();
        }
        self.cur = crate::stats::OpKind::Recv;
        r
    }

    fn execute_op(&mut self, c: CollectiveRef<'_>) -> Result<()> {
        // A broken group fails every collective; point-to-point only fails with its own peer.
        if !matches!(c, Collective::Send { .. } | Collective::Recv { .. }) {
            self.health.check(c.name())?;
        }
        let n = self.size;
        self.op_dtype = c.dtype();
        match c {
            Collective::Send { buf, peer, tag } => {
                rank_in("send peer", peer, n)?;
                self.send_copy(peer, Tag::P2p(tag), host(&buf)?)
            }
            Collective::Recv { buf, peer, tag } => {
                rank_in("recv peer", peer, n)?;
                let m = self.recv(peer, Tag::P2p(tag), "recv")?;
                copy_in(buf, &m)
            }
            Collective::Barrier => {
                let seq = self.next_seq();
                self.barrier(seq)
            }
            Collective::AllReduce { send, mut recv, op } => {
                let seq = self.next_seq();
                let dtype = recv.dtype;
                let inp = match &send {
                    Some(s) => Some(Raw::from_ref(host(s)?)),
                    None => None,
                };
                let out = Raw::from_mut(host_mut(&mut recv)?);
                if let Some(i) = inp {
                    bytes_eq(
                        self.op_dtype,
                        "all_reduce: recv vs send",
                        Some(i.len()),
                        out.len(),
                    )?;
                }
                let count = out.len() / dtype.size();
                if self.size == 1 {
                    if let Some(i) = inp {
                        out.get_mut(0, out.len()).copy_from_slice(i.get(0, i.len()));
                    }
                } else if out.len() < SMALL_BYTES || count < self.size {
                    self.rd_allreduce(seq, inp, out, dtype, op)?;
                } else if self.direct_ok() {
                    self.twoshot_allreduce(seq, inp, out, dtype, op, count)?;
                } else {
                    self.ring_allreduce(seq, inp, out, dtype, op, count)?;
                }
                finish_avg(dtype, op, out.get_mut(0, out.len()), self.size)
            }
            Collective::ReduceScatter { send, mut recv, op } => {
                let seq = self.next_seq();
                let dtype = recv.dtype;
                let inp = Raw::from_ref(host(&send)?);
                let out = Raw::from_mut(host_mut(&mut recv)?);
                bytes_eq(
                    self.op_dtype,
                    "reduce_scatter: send vs world_size x recv",
                    out.len().checked_mul(n),
                    inp.len(),
                )?;
                if self.direct_ok() {
                    self.direct_reduce_scatter(seq, inp, out, dtype, op)?;
                } else {
                    self.ring_reduce_scatter(seq, inp, out, dtype, op)?;
                }
                finish_avg(dtype, op, out.get_mut(0, out.len()), self.size)
            }
            Collective::AllGather { send, mut recv } => {
                let seq = self.next_seq();
                let inp = host(&send)?;
                let out = Raw::from_mut(host_mut(&mut recv)?);
                bytes_eq(
                    self.op_dtype,
                    "all_gather: recv vs world_size x send",
                    inp.len().checked_mul(n),
                    out.len(),
                )?;
                if self.direct_ok() {
                    self.direct_all_gather(seq, inp, out)
                } else {
                    self.ring_all_gather(seq, inp, out)
                }
            }
            Collective::Broadcast { mut buf, root } => {
                rank_in("broadcast root", root, n)?;
                let seq = self.next_seq();
                let out = Raw::from_mut(host_mut(&mut buf)?);
                self.tree_broadcast(seq, out, root)
            }
            Collective::Reduce {
                send,
                recv,
                op,
                root,
            } => {
                rank_in("reduce root", root, n)?;
                let seq = self.next_seq();
                let dtype = send.dtype;
                let inp = host(&send)?;
                let mut recv = recv;
                let out = match (self.rank == root, recv.as_mut()) {
                    (true, Some(r)) => Some(Raw::from_mut(host_mut(r)?)),
                    _ => None,
                };
                if let Some(o) = out {
                    bytes_eq(
                        self.op_dtype,
                        "reduce: recv vs send",
                        Some(inp.len()),
                        o.len(),
                    )?;
                }
                self.tree_reduce(seq, inp, out, dtype, op, root)?;
                if let Some(o) = out {
                    finish_avg(dtype, op, o.get_mut(0, o.len()), self.size)?;
                }
                Ok(())
            }
            Collective::AllToAll { send, mut recv } => {
                let seq = self.next_seq();
                let block = send.len / n;
                let counts = vec![block; n];
                let es = send.dtype.size();
                let inp = host(&send)?;
                let out = Raw::from_mut(host_mut(&mut recv)?);
                self.all_to_allv(seq, inp, &counts, out, &counts, es)
            }
            Collective::AllToAllv {
                send,
                send_counts,
                mut recv,
                recv_counts,
            } => {
                // the message is built only on failure (this runs on every all_to_allv)
                let world = |what: &'static str, got: usize| {
                    if got == n {
                        Ok(())
                    } else {
                        Err(Error::LengthMismatch {
                            what: what.into(),
                            expected: n,
                            got,
                        })
                    }
                };
                world("all_to_allv: send_counts entries", send_counts.len())?;
                world("all_to_allv: recv_counts entries", recv_counts.len())?;
                let seq = self.next_seq();
                let es = send.dtype.size();
                let inp = host(&send)?;
                let out = Raw::from_mut(host_mut(&mut recv)?);
                self.all_to_allv(seq, inp, &send_counts, out, &recv_counts, es)
            }
        }
    }

    /// The direct (shared-address-space) algorithms apply: peers read our memory themselves and no
    /// link model wants messages to charge; one rank alone has nothing to exchange.
    fn direct_ok(&self) -> bool {
        self.size > 1 && self.lend_ok && self.peers_share_memory && self.clock.is_none()
    }

    fn barrier(&mut self, seq: u64) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let mut d = 1;
        let mut step = 0;
        while d < n {
            self.send_copy((r + d) % n, Tag::Coll { seq, step }, &[])?;
            self.recv((r + n - d) % n, Tag::Coll { seq, step }, "barrier")?;
            d <<= 1;
            step += 1;
        }
        Ok(())
    }

    fn wait_all(&self, guards: &[Option<LendGuard>]) -> Result<()> {
        for g in guards {
            self.wait_guard(g)?;
        }
        Ok(())
    }

    /// Recursive doubling; non-powers of two fold the first `2·rem` ranks pairwise first.
    fn rd_allreduce(
        &mut self,
        seq: u64,
        inp: Option<Raw>,
        out: Raw,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let len = out.len();
        if let Some(i) = inp {
            out.get_mut(0, len).copy_from_slice(i.get(0, len));
        }
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let rem = n - p;
        let during = "all_reduce";
        let newrank = if r < 2 * rem {
            if r % 2 == 0 {
                self.send_copy(r + 1, Tag::Coll { seq, step: 0 }, out.get(0, len))?;
                None
            } else {
                let m = self.recv(r - 1, Tag::Coll { seq, step: 0 }, during)?;
                check_len(self.op_dtype, r - 1, m.payload.len(), len)?;
                // lower rank's data is the left operand, as in the exchange below
                let mine = Aligned::copy_of(out.get(0, len));
                m.payload.with(r - 1, |b| {
                    reduce3(dtype, op, out.get_mut(0, len), b, mine.as_bytes())
                })??;
                Some(r / 2)
            }
        } else {
            Some(r - rem)
        };
        if let Some(nr) = newrank {
            let mut mask = 1;
            let mut step = 1;
            while mask < p {
                let pnr = nr ^ mask;
                let peer = if pnr < rem { pnr * 2 + 1 } else { pnr + rem };
                self.send_copy(peer, Tag::Coll { seq, step }, out.get(0, len))?;
                let m = self.recv(peer, Tag::Coll { seq, step }, during)?;
                check_len(self.op_dtype, peer, m.payload.len(), len)?;
                if peer < r {
                    let mine = Aligned::copy_of(out.get(0, len));
                    m.payload.with(peer, |b| {
                        reduce3(dtype, op, out.get_mut(0, len), b, mine.as_bytes())
                    })??;
                } else {
                    m.payload
                        .with(peer, |b| reduce_into(dtype, op, out.get_mut(0, len), b))??;
                }
                mask <<= 1;
                step += 1;
            }
        }
        let last = 64;
        if r < 2 * rem {
            if r % 2 == 1 {
                self.send_copy(r - 1, Tag::Coll { seq, step: last }, out.get(0, len))?;
            } else {
                let m = self.recv(r + 1, Tag::Coll { seq, step: last }, during)?;
                check_len(self.op_dtype, r + 1, m.payload.len(), len)?;
                m.payload
                    .with(r + 1, |b| out.get_mut(0, len).copy_from_slice(b))?;
            }
        }
        Ok(())
    }

    /// Ring reduce-scatter then ring all-gather over `n` chunks, single-copy via loans.
    fn ring_allreduce(
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
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let during = "all_reduce";
        let mut rs: Vec<Option<LendGuard>> = Vec::with_capacity(n);
        for k in 0..n - 1 {
            let s = (r + n - k) % n;
            let t = (r + 2 * n - k - 1) % n;
            let (a, b) = range(s);
            let src = match (k, inp) {
                (0, Some(i)) => i.get(a, b),
                _ => out.get(a, b),
            };
            rs.push(self.send_lend(
                next,
                Tag::Coll {
                    seq,
                    step: k as u32,
                },
                src,
            )?);
            let m = self.recv(
                prev,
                Tag::Coll {
                    seq,
                    step: k as u32,
                },
                during,
            )?;
            let (a, b) = range(t);
            check_len(self.op_dtype, prev, m.payload.len(), b - a)?;
            m.payload.with(prev, |x| match inp {
                Some(i) => reduce3(dtype, op, out.get_mut(a, b), i.get(a, b), x),
                None => reduce_into(dtype, op, out.get_mut(a, b), x),
            })??;
        }
        let mut ag: Vec<Option<LendGuard>> = Vec::with_capacity(n);
        for (k, rs_k) in rs.iter().enumerate() {
            let s = (r + 1 + n - k) % n;
            let t = (r + n - k) % n;
            let step = (n - 1 + k) as u32;
            let (a, b) = range(s);
            ag.push(self.send_lend(next, Tag::Coll { seq, step }, out.get(a, b))?);
            let m = self.recv(prev, Tag::Coll { seq, step }, during)?;
            // our reduce-scatter loan of chunk t (step k) must be read before we overwrite it
            self.wait_guard(rs_k)?;
            let (a, b) = range(t);
            check_len(self.op_dtype, prev, m.payload.len(), b - a)?;
            m.payload
                .with(prev, |x| out.get_mut(a, b).copy_from_slice(x))?;
        }
        self.wait_all(&ag)?;
        self.wait_all(&rs)
    }

    /// Ring reduce-scatter: rank r ends with block r; partial sums travel in two scratch buffers.
    fn ring_reduce_scatter(
        &mut self,
        seq: u64,
        inp: Raw,
        out: Raw,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let bl = out.len();
        if n == 1 {
            out.get_mut(0, bl).copy_from_slice(inp.get(0, bl));
            return Ok(());
        }
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let during = "reduce_scatter";
        let mut s0 = Aligned::zeroed(bl);
        let mut s1 = Aligned::zeroed(bl);
        let raws = [
            Raw::from_mut(s0.as_bytes_mut()),
            Raw::from_mut(s1.as_bytes_mut()),
        ];
        let mut guards: Vec<Option<LendGuard>> = Vec::with_capacity(n);
        for k in 0..n - 1 {
            let step = k as u32;
            let src = if k == 0 {
                let b = (r + n - 1) % n;
                inp.get(b * bl, (b + 1) * bl)
            } else {
                raws[(k - 1) % 2].get(0, bl)
            };
            guards.push(self.send_lend(next, Tag::Coll { seq, step }, src)?);
            let t = (r + 2 * n - k - 2) % n;
            let m = self.recv(prev, Tag::Coll { seq, step }, during)?;
            check_len(self.op_dtype, prev, m.payload.len(), bl)?;
            let mine = inp.get(t * bl, (t + 1) * bl);
            if k == n - 2 {
                m.payload
                    .with(prev, |x| reduce3(dtype, op, out.get_mut(0, bl), mine, x))??;
            } else {
                if k >= 1 {
                    // scratch[k % 2] was lent at step k-1
                    self.wait_guard(&guards[k - 1])?;
                }
                let dst = raws[k % 2].get_mut(0, bl);
                m.payload
                    .with(prev, |x| reduce3(dtype, op, dst, mine, x))??;
            }
        }
        self.wait_all(&guards)
    }

    fn ring_all_gather(&mut self, seq: u64, inp: &[u8], out: Raw) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let bl = inp.len();
        out.get_mut(r * bl, (r + 1) * bl).copy_from_slice(inp);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mut guards = Vec::with_capacity(n);
        for k in 0..n.saturating_sub(1) {
            let step = k as u32;
            let s = (r + n - k) % n;
            guards.push(self.send_lend(
                next,
                Tag::Coll { seq, step },
                out.get(s * bl, (s + 1) * bl),
            )?);
            let t = (r + 2 * n - k - 1) % n;
            let m = self.recv(prev, Tag::Coll { seq, step }, "all_gather")?;
            check_len(self.op_dtype, prev, m.payload.len(), bl)?;
            m.payload.with(prev, |x| {
                out.get_mut(t * bl, (t + 1) * bl).copy_from_slice(x)
            })?;
        }
        self.wait_all(&guards)
    }

    fn tree_broadcast(&mut self, seq: u64, buf: Raw, root: usize) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let v = (r + n - root) % n;
        let len = buf.len();
        let mut mask = 1;
        while mask < n {
            if v & mask != 0 {
                let parent = (v - mask + root) % n;
                let m = self.recv(parent, Tag::Coll { seq, step: 0 }, "broadcast")?;
                check_len(self.op_dtype, parent, m.payload.len(), len)?;
                m.payload
                    .with(parent, |x| buf.get_mut(0, len).copy_from_slice(x))?;
                break;
            }
            mask <<= 1;
        }
        let mut guards = Vec::new();
        mask >>= 1;
        while mask > 0 {
            if v + mask < n {
                let child = (v + mask + root) % n;
                guards.push(self.send_lend(child, Tag::Coll { seq, step: 0 }, buf.get(0, len))?);
            }
            mask >>= 1;
        }
        self.wait_all(&guards)
    }

    fn tree_reduce(
        &mut self,
        seq: u64,
        inp: &[u8],
        out: Option<Raw>,
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let v = (r + n - root) % n;
        let len = inp.len();
        let mut scratch;
        let acc: Raw = match out {
            Some(o) => o,
            None => {
                scratch = Aligned::zeroed(len);
                Raw::from_mut(scratch.as_bytes_mut())
            }
        };
        acc.get_mut(0, len).copy_from_slice(inp);
        let mut mask = 1;
        while mask < n {
            if v & mask == 0 {
                if v + mask < n {
                    let child = (v + mask + root) % n;
                    let m = self.recv(child, Tag::Coll { seq, step: 0 }, "reduce")?;
                    check_len(self.op_dtype, child, m.payload.len(), len)?;
                    m.payload
                        .with(child, |x| reduce_into(dtype, op, acc.get_mut(0, len), x))??;
                }
            } else {
                let parent = (v - mask + root) % n;
                let g = self.send_lend(parent, Tag::Coll { seq, step: 0 }, acc.get(0, len))?;
                return self.wait_guard(&g);
            }
            mask <<= 1;
        }
        Ok(())
    }

    fn all_to_allv(
        &mut self,
        seq: u64,
        inp: &[u8],
        sc: &[usize],
        out: Raw,
        rc: &[usize],
        es: usize,
    ) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        // One entry per rank (checked by the caller); the blocks must fill the buffers exactly.
        let sd = offsets(sc, es);
        let rd = offsets(rc, es);
        bytes_eq(
            self.op_dtype,
            "all_to_all(v): send vs sum of send counts",
            sd.as_ref().and_then(|o| o.last().copied()),
            inp.len(),
        )?;
        bytes_eq(
            self.op_dtype,
            "all_to_all(v): recv vs sum of recv counts",
            rd.as_ref().and_then(|o| o.last().copied()),
            out.len(),
        )?;
        let (Some(sd), Some(rd)) = (sd, rd) else {
            return Err(Error::InvalidArgument(
                "internal: all_to_all(v) offsets".into(),
            ));
        };
        out.get_mut(rd[r], rd[r + 1])
            .copy_from_slice(&inp[sd[r]..sd[r + 1]]);
        let mut guards = Vec::with_capacity(n);
        for k in 1..n {
            let dst = (r + k) % n;
            guards.push(self.send_lend(
                dst,
                Tag::Coll { seq, step: 0 },
                &inp[sd[dst]..sd[dst + 1]],
            )?);
        }
        for k in 1..n {
            let src = (r + n - k) % n;
            let m = self.recv(src, Tag::Coll { seq, step: 0 }, "all_to_all")?;
            check_len(self.op_dtype, src, m.payload.len(), rd[src + 1] - rd[src])?;
            m.payload.with(src, |x| {
                out.get_mut(rd[src], rd[src + 1]).copy_from_slice(x)
            })?;
        }
        self.wait_all(&guards)
    }
}

/// Byte offsets of blocks of `counts` elements of `es` bytes; `None` if they overflow (counts come
/// from the caller: they may be anything).
fn offsets(counts: &[usize], es: usize) -> Option<Vec<usize>> {
    let mut o = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0usize;
    o.push(acc);
    for &c in counts {
        acc = acc.checked_add(c.checked_mul(es)?)?;
        o.push(acc);
    }
    Some(o)
}
