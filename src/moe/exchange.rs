//! [`Moe`]: dispatch and combine over any [`Communicator`], on host or device memory.
//!
//! One generic path serves every backend and both kinds of memory: rows live in a [`Kernels`]
//! buffer (`Vec<T>` with [`crate::kernels::CpuKernels`], `CudaSlice<T>` with `CudaKernels`), packing
//! is [`Kernels::gather_rows`] by the layout's permutation, the weighted combine is
//! [`Kernels::scatter_rows`] with accumulation, and the rows move with `all_to_allv` on the
//! communicator (NCCL on device buffers; the host backends stage device memory themselves).
//!
//! Protocol of a [`Moe::dispatch`]: every rank first all-gathers a header `[status, hidden, experts,
//! dtype]`, so a rank whose input failed its local checks makes every rank return an error before
//! any row is sent, and ranks that disagree on the hidden size are told so by name; then the kept
//! counts per expert (`experts` words per rank), from which each rank derives its whole route
//! (the private `route` module); then the rows. The counts are all-gathered rather than all-to-all'ed so
//! that the hierarchical route, which needs counts between other pairs of ranks, costs the same
//! one exchange. [`Moe::combine`] and the backward passes reuse the handle's route: only a
//! one-word status exchange (skippable with [`Moe::set_check`]) precedes the rows.
//!
//! Backward: dispatch sends `x[t]` to every kept slot, so its gradient is the unweighted sum of the
//! slots' gradients: a combine without weights ([`Moe::dispatch_backward`]). Combine computes
//! `out[t] = Σ w·y[slot]`, so `∂y[slot] = w · ∂out[t]`: a dispatch with weights
//! ([`Moe::combine_backward`]); the routing weights' gradient `∂w = ⟨∂out[t], y[slot]⟩` needs the
//! expert outputs on the token side: [`Moe::combine_with_rows`] returns them and
//! [`weight_grad`] computes it.

use super::route::{Net, Route, Stage};
use super::{Layout, MoeError};
use crate::kernels::{FloatElem, FloatKind, Kernels};
use crate::{Communicator, CommunicatorExt, Error, OwnedBuffer, Result, Work};
use half::{bf16, f16};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the rows travel as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Wire {
    /// The rows' own type.
    #[default]
    Native,
    /// bf16 (f32 and f16 rows are rounded to nearest even before sending and widened after; bf16
    /// rows are sent as they are). Halves an f32 layer's bytes.
    Bf16,
}

/// A row type [`Moe`] moves: f32, bf16 or f16, with its conversion to and from the bf16 wire.
pub trait MoeElem: FloatElem {
    /// `y = bf16(x)` on `k`'s memory.
    fn to_bf16<K: Kernels>(k: &K, x: &K::Buf<Self>, y: &mut K::Buf<bf16>) -> Result<()>;
    /// `y = Self(x)` on `k`'s memory.
    fn from_bf16<K: Kernels>(k: &K, x: &K::Buf<bf16>, y: &mut K::Buf<Self>) -> Result<()>;
}

impl MoeElem for f32 {
    fn to_bf16<K: Kernels>(k: &K, x: &K::Buf<f32>, y: &mut K::Buf<bf16>) -> Result<()> {
        k.cast_f32_to_bf16(x, y)
    }
    fn from_bf16<K: Kernels>(k: &K, x: &K::Buf<bf16>, y: &mut K::Buf<f32>) -> Result<()> {
        k.cast_bf16_to_f32(x, y)
    }
}

impl MoeElem for f16 {
    fn to_bf16<K: Kernels>(k: &K, x: &K::Buf<f16>, y: &mut K::Buf<bf16>) -> Result<()> {
        // f16 → f32 is exact, so this rounds once
        let mut t = k.alloc::<f32>(k.len(x))?;
        k.cast_f16_to_f32(x, &mut t)?;
        k.cast_f32_to_bf16(&t, y)
    }
    fn from_bf16<K: Kernels>(k: &K, x: &K::Buf<bf16>, y: &mut K::Buf<f16>) -> Result<()> {
        let mut t = k.alloc::<f32>(k.len(x))?;
        k.cast_bf16_to_f32(x, &mut t)?;
        k.cast_f32_to_f16(&t, y)
    }
}

impl MoeElem for bf16 {
    // never called (bf16 rows travel as they are); exact round trips through f32
    fn to_bf16<K: Kernels>(k: &K, x: &K::Buf<bf16>, y: &mut K::Buf<bf16>) -> Result<()> {
        let mut t = k.alloc::<f32>(k.len(x))?;
        k.cast_bf16_to_f32(x, &mut t)?;
        k.cast_f32_to_bf16(&t, y)
    }
    fn from_bf16<K: Kernels>(k: &K, x: &K::Buf<bf16>, y: &mut K::Buf<bf16>) -> Result<()> {
        Self::to_bf16(k, x, y)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What a dispatch leaves for the combine and the backward passes: the route and what it was made
/// for. Cheap to clone (the route is shared).
#[derive(Debug, Clone)]
pub struct Handle {
    made_by: u64,
    generation: u64,
    fingerprint: u64,
    hidden: usize,
    kind: FloatKind,
    tokens: usize,
    route: Arc<Route>,
}

impl Handle {
    /// Rows this rank received (and must return to combine).
    pub fn recv_rows(&self) -> usize {
        self.route.recv_rows
    }
    /// Received rows per local expert (in local-expert order; rows are grouped so).
    pub fn expert_counts(&self) -> &[usize] {
        &self.route.expert_counts
    }
    /// The hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    /// Tokens on this rank's side (the combine's output rows).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Rows this rank sent (kept slots).
    pub fn sent_rows(&self) -> usize {
        self.route.wire_token.len()
    }
    /// The fingerprint of the layout it was made from.
    pub fn layout_fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// The result of a dispatch.
#[derive(Debug)]
pub struct Dispatched<B> {
    /// Received rows, grouped per local expert (expert 0's rows first, from every source rank in
    /// rank order, then expert 1's, …), `recv_rows × hidden`.
    pub rows: B,
    /// Rows per local expert.
    pub expert_counts: Vec<usize>,
    /// For combine and the backward passes.
    pub handle: Handle,
}

/// A hierarchical (2D) setup: the node's communicator and the one of equal local ranks.
struct Hier {
    per_node: usize,
    intra: Box<dyn Communicator>,
    inter: Box<dyn Communicator>,
}

/// MoE dispatch and combine over a communicator; see the [module docs](self).
pub struct Moe<'c, C: Communicator + ?Sized> {
    comm: &'c C,
    id: u64,
    generation: u64,
    wire: Wire,
    check: bool,
    hier: Option<Hier>,
}

impl<C: Communicator + ?Sized> std::fmt::Debug for Moe<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moe")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .field("wire", &self.wire)
            .field("check", &self.check)
            .field("per_node", &self.hier.as_ref().map(|h| h.per_node))
            .field("generation", &self.generation)
            .finish()
    }
}

/// An element-typed buffer for the wire: the rows' own type or bf16.
enum WireBuf<K: Kernels, T: MoeElem> {
    Native(K::Buf<T>),
    Bf16(K::Buf<bf16>),
}

/// A dispatch or combine whose first exchange is in flight ([`Moe::start_dispatch`],
/// [`Moe::start_combine`]); finish it with [`Moe::finish`].
pub struct InFlight<K: Kernels, T: MoeElem>
where
    K::Buf<T>: OwnedBuffer,
    K::Buf<bf16>: OwnedBuffer,
{
    state: Flight<K, T>,
    next: usize,
    reverse: bool,
    weighted: bool,
    handle: Handle,
}

enum Flight<K: Kernels, T: MoeElem>
where
    K::Buf<T>: OwnedBuffer,
    K::Buf<bf16>: OwnedBuffer,
{
    Ready(WireBuf<K, T>),
    Native(Work<(K::Buf<T>, K::Buf<T>)>),
    Bf16(Work<(K::Buf<bf16>, K::Buf<bf16>)>),
}

impl<K: Kernels, T: MoeElem> std::fmt::Debug for InFlight<K, T>
where
    K::Buf<T>: OwnedBuffer,
    K::Buf<bf16>: OwnedBuffer,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("reverse", &self.reverse)
            .field("next_stage", &self.next)
            .finish()
    }
}

impl<K: Kernels, T: MoeElem> InFlight<K, T>
where
    K::Buf<T>: OwnedBuffer,
    K::Buf<bf16>: OwnedBuffer,
{
    /// The handle of the operation.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

fn kind_code(k: FloatKind) -> i64 {
    match k {
        FloatKind::F32 => 1,
        FloatKind::BF16 => 2,
        FloatKind::F16 => 3,
    }
}

fn elems(rows: &[usize], hidden: usize) -> Vec<usize> {
    rows.iter().map(|&r| r * hidden).collect()
}

impl<'c, C: Communicator + ?Sized> Moe<'c, C> {
    /// A dispatcher over `comm`: 1D, native wire, checked.
    pub fn new(comm: &'c C) -> Self {
        Moe {
            comm,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: 0,
            wire: Wire::Native,
            check: true,
            hier: None,
        }
    }

    /// The communicator.
    pub fn comm(&self) -> &'c C {
        self.comm
    }

    /// The wire format.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// Change the wire format; handles made before are stale afterwards.
    pub fn set_wire(&mut self, wire: Wire) {
        if wire != self.wire {
            self.wire = wire;
            self.generation += 1;
        }
    }

    /// Whether combine and the backward passes first exchange a one-word status, so that one
    /// rank's bad input is an error on every rank (default true). Off saves one small collective
    /// per call; a bad input is then an error on its rank only, and the peers time out.
    pub fn set_check(&mut self, check: bool) {
        self.check = check;
    }

    /// Ranks per node of the 2D route, or `None` for 1D.
    pub fn per_node(&self) -> Option<usize> {
        self.hier.as_ref().map(|h| h.per_node)
    }

    /// Switch to the hierarchical (2D) route with `per_node` consecutive ranks per node, or back
    /// to 1D with `None`. Collective (it splits the communicator twice): every rank calls it with
    /// the same value. Handles made before are stale afterwards.
    pub fn set_hierarchical(&mut self, per_node: Option<usize>) -> Result<()> {
        let w = self.comm.world_size();
        let hier = match per_node {
            None => None,
            Some(g) => {
                if g == 0 || w % g != 0 {
                    return Err(MoeError::Config(format!(
                        "2D all-to-all: {g} ranks per node does not divide the world of {w}"
                    ))
                    .into());
                }
                let r = self.comm.rank();
                let intra = self.comm.split(Some((r / g) as u32), (r % g) as i32)?;
                let inter = self.comm.split(Some((r % g) as u32), (r / g) as i32)?;
                match (intra, inter) {
                    (Some(intra), Some(inter)) => Some(Hier {
                        per_node: g,
                        intra,
                        inter,
                    }),
                    _ => {
                        return Err(Error::InvalidArgument(
                            "2D all-to-all: split returned no group for a member".into(),
                        ))
                    }
                }
            }
        };
        self.hier = hier;
        self.generation += 1;
        Ok(())
    }

    /// Blocking all-to-all-v on the stage's communicator.
    fn a2av<B: crate::Buffer + ?Sized, R: crate::BufferMut + ?Sized>(
        &self,
        n: Net,
        send: &B,
        sc: &[usize],
        recv: &mut R,
        rc: &[usize],
    ) -> Result<()> {
        match (n, &self.hier) {
            (Net::Intra, Some(h)) => h.intra.all_to_allv(send, sc, recv, rc),
            (Net::Inter, Some(h)) => h.inter.all_to_allv(send, sc, recv, rc),
            _ => self.comm.all_to_allv(send, sc, recv, rc),
        }
    }

    /// Non-blocking all-to-all-v on the stage's communicator.
    fn ia2av<B: OwnedBuffer>(
        &self,
        n: Net,
        send: B,
        sc: Vec<usize>,
        recv: B,
        rc: Vec<usize>,
    ) -> Result<Work<(B, B)>> {
        match (n, &self.hier) {
            (Net::Intra, Some(h)) => h.intra.iall_to_allv(send, sc, recv, rc),
            (Net::Inter, Some(h)) => h.inter.iall_to_allv(send, sc, recv, rc),
            _ => self.comm.iall_to_allv(send, sc, recv, rc),
        }
    }

    /// All-gather `words` per rank (on `k`'s memory, so NCCL takes it too).
    fn gather_words<K: Kernels>(&self, k: &K, words: &[i64]) -> Result<Vec<i64>>
    where
        K::Buf<i64>: OwnedBuffer,
    {
        let send = k.upload(words)?;
        let mut recv = k.alloc::<i64>(words.len() * self.comm.world_size())?;
        self.comm.all_gather(&send, &mut recv)?;
        k.download(&recv)
    }

    /// Exchange a status word; an error names the first rank that failed (this rank's own error
    /// when it failed itself).
    fn agree<K: Kernels>(&self, k: &K, local: Result<()>, during: &'static str) -> Result<()>
    where
        K::Buf<i64>: OwnedBuffer,
    {
        let all = self.gather_words(k, &[local.is_err() as i64])?;
        local?;
        match all.iter().position(|&s| s != 0) {
            Some(rank) => Err(MoeError::PeerInvalid { rank, during }.into()),
            None => Ok(()),
        }
    }

    fn check_handle(&self, h: &Handle, kind: FloatKind) -> Result<()> {
        if h.made_by != self.id || h.generation != self.generation {
            return Err(MoeError::StaleHandle {
                made_by: h.made_by,
                handle: h.generation,
                this: self.id,
                now: self.generation,
            }
            .into());
        }
        if h.kind != kind {
            return Err(MoeError::Config(format!(
                "the handle was made for {:?} rows, this call passes {kind:?}",
                h.kind
            ))
            .into());
        }
        Ok(())
    }

    fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
        if expected != got {
            return Err(Error::LengthMismatch {
                what: what.to_string(),
                expected,
                got,
            });
        }
        Ok(())
    }

    fn local_dispatch_checks<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        x: &K::Buf<T>,
        hidden: usize,
        layout: &Layout,
    ) -> Result<()> {
        if layout.world() != self.comm.world_size() {
            return Err(MoeError::Config(format!(
                "the layout was made for {} ranks, the communicator has {}",
                layout.world(),
                self.comm.world_size()
            ))
            .into());
        }
        if hidden == 0 {
            return Err(MoeError::Config("hidden size must be at least 1".into()).into());
        }
        Self::check_len(
            &format!(
                "dispatch: x must hold tokens ({}) x hidden ({hidden})",
                layout.tokens()
            ),
            layout.tokens() * hidden,
            k.len(x),
        )
    }

    /// Exchange headers and counts and build the route of `layout` (collective).
    fn route<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        local: Result<()>,
        hidden: usize,
        layout: &Layout,
    ) -> Result<Route>
    where
        K::Buf<i64>: OwnedBuffer,
    {
        let me = self.comm.rank();
        let w = self.comm.world_size();
        let header = [
            local.is_err() as i64,
            hidden as i64,
            layout.experts() as i64,
            kind_code(T::KIND),
        ];
        let all = self.gather_words(k, &header)?;
        local?;
        if let Some(rank) = (0..w).find(|&r| all[r * 4] != 0) {
            return Err(MoeError::PeerInvalid {
                rank,
                during: "dispatch",
            }
            .into());
        }
        for (i, what) in [
            (1, "hidden size"),
            (2, "expert count"),
            (3, "row dtype code"),
        ] {
            if let Some(rank) = (0..w).find(|&r| all[r * 4 + i] != header[i]) {
                return Err(MoeError::Mismatch {
                    what,
                    rank,
                    theirs: all[rank * 4 + i],
                    me,
                    mine: header[i],
                }
                .into());
            }
        }
        let mine: Vec<i64> = layout
            .tokens_per_expert()
            .iter()
            .map(|&c| c as i64)
            .collect();
        let counts: Vec<usize> = self
            .gather_words(k, &mine)?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        Ok(Route::new(layout, me, &counts, self.per_node()))
    }

    fn handle_for<T: MoeElem>(&self, layout: &Layout, hidden: usize, route: Route) -> Handle {
        Handle {
            made_by: self.id,
            generation: self.generation,
            fingerprint: layout.fingerprint(),
            hidden,
            kind: T::KIND,
            tokens: layout.tokens(),
            route: Arc::new(route),
        }
    }

    /// Dispatch: send each kept slot's row of `x` (`tokens × hidden`, this rank's tokens) to its
    /// expert's rank. Returns the received rows grouped per local expert, the counts and the
    /// handle. Collective; a rank with zero tokens takes part with an empty `x`.
    pub fn dispatch<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        x: &K::Buf<T>,
        hidden: usize,
        layout: &Layout,
    ) -> Result<Dispatched<K::Buf<T>>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
        K::Buf<i64>: OwnedBuffer,
    {
        let local = self.local_dispatch_checks(k, x, hidden, layout);
        let route = self.route::<K, T>(k, local, hidden, layout)?;
        let handle = self.handle_for::<T>(layout, hidden, route);
        let rows = self.run(k, x, &handle, false, false)?;
        Ok(Dispatched {
            rows,
            expert_counts: handle.route.expert_counts.clone(),
            handle,
        })
    }

    /// Dispatch again along a handle's route (DeepEP's cached mode: no counts exchange), e.g. a
    /// second tensor routed like the first. `layout` must be the handle's
    /// ([`MoeError::HandleMismatch`] otherwise).
    pub fn dispatch_cached<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        x: &K::Buf<T>,
        layout: &Layout,
        handle: &Handle,
    ) -> Result<Dispatched<K::Buf<T>>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
        K::Buf<i64>: OwnedBuffer,
    {
        let local = self.check_handle(handle, T::KIND).and_then(|()| {
            if handle.fingerprint != layout.fingerprint() {
                return Err(MoeError::HandleMismatch {
                    handle: handle.fingerprint,
                    layout: layout.fingerprint(),
                }
                .into());
            }
            self.local_dispatch_checks(k, x, handle.hidden, layout)
        });
        self.maybe_agree(k, local, "dispatch")?;
        let rows = self.run(k, x, handle, false, false)?;
        Ok(Dispatched {
            rows,
            expert_counts: handle.route.expert_counts.clone(),
            handle: handle.clone(),
        })
    }

    fn maybe_agree<K: Kernels>(&self, k: &K, local: Result<()>, during: &'static str) -> Result<()>
    where
        K::Buf<i64>: OwnedBuffer,
    {
        if self.check {
            self.agree(k, local, during)
        } else {
            local
        }
    }

    fn expert_side_checks<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        y: &K::Buf<T>,
        handle: &Handle,
        op: &str,
    ) -> Result<()> {
        self.check_handle(handle, T::KIND)?;
        Self::check_len(
            &format!(
                "{op}: rows must hold the handle's received rows ({}) x hidden ({})",
                handle.recv_rows(),
                handle.hidden
            ),
            handle.recv_rows() * handle.hidden,
            k.len(y),
        )
    }

    fn token_side_checks<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        g: &K::Buf<T>,
        handle: &Handle,
        op: &str,
    ) -> Result<()> {
        self.check_handle(handle, T::KIND)?;
        Self::check_len(
            &format!(
                "{op}: the gradient must hold tokens ({}) x hidden ({})",
                handle.tokens, handle.hidden
            ),
            handle.tokens * handle.hidden,
            k.len(g),
        )
    }

    /// Combine: send every expert output row (`y`, laid out like [`Dispatched::rows`]) back to its
    /// token and return `out[t] = Σ_slots weight · y[slot]` (`tokens × hidden`, token order; a token
    /// whose slots were all dropped gets zeros).
    pub fn combine<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        y: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<K::Buf<T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
        K::Buf<i64>: OwnedBuffer,
    {
        let local = self.expert_side_checks(k, y, handle, "combine");
        self.maybe_agree(k, local, "combine")?;
        self.run(k, y, handle, true, true)
    }

    /// [`Moe::combine`], also returning the expert output rows as they arrived on the token side
    /// (one per kept slot, in [`Layout`] send order… for the 1D route; in the route's wire order in
    /// general), for [`weight_grad`].
    pub fn combine_with_rows<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        y: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<(K::Buf<T>, K::Buf<T>)>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
        K::Buf<i64>: OwnedBuffer,
    {
        let local = self.expert_side_checks(k, y, handle, "combine");
        self.maybe_agree(k, local, "combine")?;
        let rows = self.run_stages_to_wire(k, y, handle)?;
        let out = self.scatter(k, &rows, handle, true)?;
        Ok((out, rows))
    }

    /// The gradient of [`Moe::dispatch`]: `∂x[t] = Σ_slots ∂rows[slot]` from the gradient of the
    /// received rows.
    pub fn dispatch_backward<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        grad_rows: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<K::Buf<T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
        K::Buf<i64>: OwnedBuffer,
    {
        let local = self.expert_side_checks(k, grad_rows, handle, "dispatch_backward");
        self.maybe_agree(k, local, "dispatch_backward")?;
        self.run(k, grad_rows, handle, true, false)
    }

    /// The gradient of [`Moe::combine`] with respect to the expert outputs: `∂y[slot] = w ·
    /// ∂out[t]`, laid out like [`Dispatched::rows`].
    pub fn combine_backward<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        grad_out: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<K::Buf<T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
        K::Buf<i64>: OwnedBuffer,
    {
        let local = self.token_side_checks(k, grad_out, handle, "combine_backward");
        self.maybe_agree(k, local, "combine_backward")?;
        self.run(k, grad_out, handle, false, true)
    }

    // --------------------------------------------------------------------------------------------
    // The data path.

    /// Token side, forward: the packed (optionally weighted) rows in wire order.
    fn pack<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        x: &K::Buf<T>,
        handle: &Handle,
        weighted: bool,
    ) -> Result<K::Buf<T>> {
        let r = &handle.route;
        let h = handle.hidden;
        let n = r.wire_token.len();
        let idx = k.upload(&r.wire_token)?;
        let mut packed = k.alloc::<T>(n * h)?;
        k.gather_rows(x, &idx, h, &mut packed)?;
        if !weighted {
            return Ok(packed);
        }
        let ident: Vec<u32> = (0..n as u32).collect();
        let ident = k.upload(&ident)?;
        let w = k.upload(&r.wire_weight)?;
        let mut scaled = k.alloc::<T>(n * h)?;
        k.scatter_rows(&packed, &ident, Some(&w), h, false, &mut scaled)?;
        Ok(scaled)
    }

    /// Token side, backward: `Σ (w ·) rows` per token.
    fn scatter<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        rows: &K::Buf<T>,
        handle: &Handle,
        weighted: bool,
    ) -> Result<K::Buf<T>> {
        let r = &handle.route;
        let h = handle.hidden;
        let mut out = k.alloc::<T>(handle.tokens * h)?;
        if r.wire_token.is_empty() {
            return Ok(out);
        }
        let idx = k.upload(&r.wire_token)?;
        let w = if weighted {
            Some(k.upload(&r.wire_weight)?)
        } else {
            None
        };
        k.scatter_rows(rows, &idx, w.as_ref(), h, true, &mut out)?;
        Ok(out)
    }

    fn to_wire<K: Kernels, T: MoeElem>(&self, k: &K, b: K::Buf<T>) -> Result<WireBuf<K, T>> {
        if self.wire == Wire::Bf16 && T::KIND != FloatKind::BF16 {
            let mut w = k.alloc::<bf16>(k.len(&b))?;
            T::to_bf16(k, &b, &mut w)?;
            Ok(WireBuf::Bf16(w))
        } else {
            Ok(WireBuf::Native(b))
        }
    }

    fn unwire<K: Kernels, T: MoeElem>(&self, k: &K, b: WireBuf<K, T>) -> Result<K::Buf<T>> {
        match b {
            WireBuf::Native(b) => Ok(b),
            WireBuf::Bf16(w) => {
                let mut b = k.alloc::<T>(k.len(&w))?;
                T::from_bf16(k, &w, &mut b)?;
                Ok(b)
            }
        }
    }

    /// One stage, blocking, on a buffer of wire type `W`.
    fn stage<K: Kernels, W: crate::kernels::KernelElem + crate::Element>(
        &self,
        k: &K,
        b: K::Buf<W>,
        s: &Stage,
        reverse: bool,
        h: usize,
    ) -> Result<K::Buf<W>>
    where
        K::Buf<W>: OwnedBuffer,
    {
        match s {
            Stage::Exchange { net, send, recv } => {
                let (send, recv) = if reverse { (recv, send) } else { (send, recv) };
                let total: usize = recv.iter().sum();
                let mut out = k.alloc::<W>(total * h)?;
                self.a2av(*net, &b, &elems(send, h), &mut out, &elems(recv, h))?;
                Ok(out)
            }
            Stage::Permute { fwd, inv } => {
                let idx = if reverse { inv } else { fwd };
                if idx.is_empty() {
                    return k.alloc::<W>(0);
                }
                let i = k.upload(idx)?;
                let mut out = k.alloc::<W>(idx.len() * h)?;
                k.gather_rows(&b, &i, h, &mut out)?;
                Ok(out)
            }
        }
    }

    fn stages<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        b: WireBuf<K, T>,
        handle: &Handle,
        reverse: bool,
        from: usize,
    ) -> Result<WireBuf<K, T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        let st = &handle.route.stages;
        let order: Vec<usize> = if reverse {
            (0..st.len()).rev().collect()
        } else {
            (0..st.len()).collect()
        };
        let h = handle.hidden;
        let mut b = b;
        for &i in &order[from..] {
            b = match b {
                WireBuf::Native(x) => WireBuf::Native(self.stage(k, x, &st[i], reverse, h)?),
                WireBuf::Bf16(x) => WireBuf::Bf16(self.stage(k, x, &st[i], reverse, h)?),
            };
        }
        Ok(b)
    }

    fn run_stages_to_wire<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        y: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<K::Buf<T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        let copy = self.copy(k, y, handle.hidden)?;
        let b = self.to_wire(k, copy)?;
        let b = self.stages(k, b, handle, true, 0)?;
        self.unwire(k, b)
    }

    fn copy<K: Kernels, T: MoeElem>(&self, k: &K, y: &K::Buf<T>, h: usize) -> Result<K::Buf<T>> {
        let n = k.len(y) / h.max(1);
        let ident: Vec<u32> = (0..n as u32).collect();
        let i = k.upload(&ident)?;
        let mut out = k.alloc::<T>(n * h)?;
        k.gather_rows(y, &i, h, &mut out)?;
        Ok(out)
    }

    /// Forward (token → expert) or reverse (expert → token), blocking.
    fn run<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        x: &K::Buf<T>,
        handle: &Handle,
        reverse: bool,
        weighted: bool,
    ) -> Result<K::Buf<T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        if !reverse {
            let packed = self.pack(k, x, handle, weighted)?;
            let b = self.to_wire(k, packed)?;
            let b = self.stages(k, b, handle, false, 0)?;
            self.unwire(k, b)
        } else {
            let rows = self.run_stages_to_wire(k, x, handle)?;
            self.scatter(k, &rows, handle, weighted)
        }
    }

    // --------------------------------------------------------------------------------------------
    // Non-blocking forms, for pipelining.

    /// Start the first exchange of `b` along the stages from `first` (the leading permutes run
    /// now); later stages run in [`Moe::finish`].
    fn launch<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        b: WireBuf<K, T>,
        handle: Handle,
        reverse: bool,
        weighted: bool,
    ) -> Result<InFlight<K, T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        let st = &handle.route.stages;
        let order: Vec<usize> = if reverse {
            (0..st.len()).rev().collect()
        } else {
            (0..st.len()).collect()
        };
        let h = handle.hidden;
        let mut b = b;
        for (pos, &i) in order.iter().enumerate() {
            match &st[i] {
                Stage::Permute { .. } => {
                    b = match b {
                        WireBuf::Native(x) => {
                            WireBuf::Native(self.stage(k, x, &st[i], reverse, h)?)
                        }
                        WireBuf::Bf16(x) => WireBuf::Bf16(self.stage(k, x, &st[i], reverse, h)?),
                    }
                }
                Stage::Exchange { net, send, recv } => {
                    let (send, recv) = if reverse { (recv, send) } else { (send, recv) };
                    let total: usize = recv.iter().sum();
                    let state = match b {
                        WireBuf::Native(x) => {
                            let out = k.alloc::<T>(total * h)?;
                            Flight::Native(self.ia2av(
                                *net,
                                x,
                                elems(send, h),
                                out,
                                elems(recv, h),
                            )?)
                        }
                        WireBuf::Bf16(x) => {
                            let out = k.alloc::<bf16>(total * h)?;
                            Flight::Bf16(self.ia2av(
                                *net,
                                x,
                                elems(send, h),
                                out,
                                elems(recv, h),
                            )?)
                        }
                    };
                    return Ok(InFlight {
                        state,
                        next: pos + 1,
                        reverse,
                        weighted,
                        handle,
                    });
                }
            }
        }
        Ok(InFlight {
            state: Flight::Ready(b),
            next: order.len(),
            reverse,
            weighted,
            handle,
        })
    }

    /// Start a dispatch along an existing handle's route (from [`Moe::route_chunks`] or an earlier
    /// dispatch); the first exchange runs while the caller computes. Local checks only.
    pub fn start_dispatch<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        x: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<InFlight<K, T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        self.token_side_checks(k, x, handle, "start_dispatch")?;
        let packed = self.pack(k, x, handle, false)?;
        let b = self.to_wire(k, packed)?;
        self.launch(k, b, handle.clone(), false, false)
    }

    /// Start a combine of expert outputs `y` (laid out like [`Dispatched::rows`]). Local checks only.
    pub fn start_combine<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        y: &K::Buf<T>,
        handle: &Handle,
    ) -> Result<InFlight<K, T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        self.expert_side_checks(k, y, handle, "start_combine")?;
        let copy = self.copy(k, y, handle.hidden)?;
        let b = self.to_wire(k, copy)?;
        self.launch(k, b, handle.clone(), true, true)
    }

    /// Wait for an operation started by [`Moe::start_dispatch`] / [`Moe::start_combine`] and run
    /// its remaining stages: a dispatch's rows grouped per local expert, or a combine's output.
    pub fn finish<K: Kernels, T: MoeElem>(&self, k: &K, f: InFlight<K, T>) -> Result<K::Buf<T>>
    where
        K::Buf<T>: OwnedBuffer,
        K::Buf<bf16>: OwnedBuffer,
    {
        let b = match f.state {
            Flight::Ready(b) => b,
            Flight::Native(w) => WireBuf::Native(w.wait()?.1),
            Flight::Bf16(w) => WireBuf::Bf16(w.wait()?.1),
        };
        let b = self.stages(k, b, &f.handle, f.reverse, f.next)?;
        let b = self.unwire(k, b)?;
        if f.reverse {
            self.scatter(k, &b, &f.handle, f.weighted)
        } else {
            Ok(b)
        }
    }

    /// The routes of several layouts (e.g. the chunks of one) in one header and one counts
    /// exchange: handles for [`Moe::start_dispatch`]. Collective.
    pub fn route_chunks<K: Kernels, T: MoeElem>(
        &self,
        k: &K,
        hidden: usize,
        layouts: &[Layout],
    ) -> Result<Vec<Handle>>
    where
        K::Buf<i64>: OwnedBuffer,
    {
        let me = self.comm.rank();
        let w = self.comm.world_size();
        let local: Result<()> = (|| {
            if hidden == 0 {
                return Err(MoeError::Config("hidden size must be at least 1".into()).into());
            }
            let e_n = layouts.first().map(|l| l.experts()).unwrap_or(0);
            for l in layouts {
                if l.world() != w || l.experts() != e_n {
                    return Err(MoeError::Config(format!(
                        "route_chunks: every layout must be for {w} ranks and {e_n} experts"
                    ))
                    .into());
                }
            }
            Ok(())
        })();
        let e_n = layouts.first().map(|l| l.experts()).unwrap_or(0);
        let header = [
            local.is_err() as i64,
            hidden as i64,
            e_n as i64,
            kind_code(T::KIND),
            layouts.len() as i64,
        ];
        let all = self.gather_words(k, &header)?;
        local?;
        if let Some(rank) = (0..w).find(|&r| all[r * 5] != 0) {
            return Err(MoeError::PeerInvalid {
                rank,
                during: "route_chunks",
            }
            .into());
        }
        for (i, what) in [
            (1, "hidden size"),
            (2, "expert count"),
            (3, "row dtype code"),
            (4, "chunk count"),
        ] {
            if let Some(rank) = (0..w).find(|&r| all[r * 5 + i] != header[i]) {
                return Err(MoeError::Mismatch {
                    what,
                    rank,
                    theirs: all[rank * 5 + i],
                    me,
                    mine: header[i],
                }
                .into());
            }
        }
        let mine: Vec<i64> = layouts
            .iter()
            .flat_map(|l| l.tokens_per_expert().iter().map(|&c| c as i64))
            .collect();
        let counts = self.gather_words(k, &mine)?;
        let per = layouts.len() * e_n;
        Ok(layouts
            .iter()
            .enumerate()
            .map(|(c, l)| {
                let m: Vec<usize> = (0..w)
                    .flat_map(|s| (0..e_n).map(move |g| (s, g)))
                    .map(|(s, g)| counts[s * per + c * e_n + g] as usize)
                    .collect();
                let route = Route::new(l, me, &m, self.per_node());
                self.handle_for::<T>(l, hidden, route)
            })
            .collect())
    }
}

/// The routing weights' gradient `∂w[slot] = ⟨∂out[t], y[slot]⟩` (host memory), from the
/// combine's gradient `grad_out` (`tokens × hidden`) and the rows [`Moe::combine_with_rows`]
/// returned. Per slot (`tokens × top_k`; zero for dropped and unused slots), in f32.
pub fn weight_grad<T: MoeElem>(
    layout: &Layout,
    handle: &Handle,
    grad_out: &[T],
    rows: &[T],
) -> Result<Vec<f32>> {
    let h = handle.hidden;
    if handle.fingerprint != layout.fingerprint() {
        return Err(MoeError::HandleMismatch {
            handle: handle.fingerprint,
            layout: layout.fingerprint(),
        }
        .into());
    }
    let r = &handle.route;
    if grad_out.len() != handle.tokens * h || rows.len() != r.wire_token.len() * h {
        return Err(Error::LengthMismatch {
            what: "weight_grad: grad_out (tokens x hidden) and rows (sent rows x hidden)".into(),
            expected: handle.tokens * h + r.wire_token.len() * h,
            got: grad_out.len() + rows.len(),
        });
    }
    // wire row → slot: wire rows are the layout's rows, block-permuted per destination rank
    let mut slot_of_wire = Vec::with_capacity(r.wire_token.len());
    let w = layout.world();
    let mut start = vec![0usize; w + 1];
    for d in 0..w {
        start[d + 1] = start[d] + layout.rows_per_rank()[d];
    }
    let order: Vec<usize> = match handle.route.per_node {
        None => (0..w).collect(),
        Some(g) => (0..g)
            .flat_map(|l| (0..w / g).map(move |n| n * g + l))
            .collect(),
    };
    for d in order {
        for row in start[d]..start[d + 1] {
            slot_of_wire.push(layout.row_slot(row));
        }
    }
    let mut g = vec![0f32; layout.tokens() * layout.top_k()];
    for (i, &s) in slot_of_wire.iter().enumerate() {
        let t = s / layout.top_k();
        let a = &grad_out[t * h..(t + 1) * h];
        let b = &rows[i * h..(i + 1) * h];
        g[s] = a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum();
    }
    Ok(g)
}
