//! The dispatch layout: where each (token, choice) slot of the router's output goes.
//!
//! DeepEP's `get_dispatch_layout` and Megatron-Core's token dispatcher in one value. From the router's
//! top-k expert ids and weights (per token, `top_k` of each; id `-1` marks an unused choice, as in
//! DeepEP), an expert [`Placement`] over the ranks and a [`Capacity`], a [`Layout`] holds
//! - tokens per expert (routed and kept) and, per destination rank, rows and distinct tokens;
//! - each slot's row in the send buffer (or none: dropped or unused);
//! - each send row's source token and weight.
//!
//! **Send order.** Rows are ordered by destination rank, then by the expert's local index on that
//! rank, then by slot index (`token · top_k + choice`). So each rank's block is contiguous (one
//! all-to-all-v) and arrives already grouped per expert: the receiver only interleaves sources.
//!
//! **Capacity** (Megatron-Core): `capacity = ceil(tokens · top_k · factor / experts)` per expert, on
//! this rank's tokens, decided before anything is sent. [`DropPolicy::Position`] keeps each expert's
//! first `capacity` slots in slot order; [`DropPolicy::Probability`] keeps the `capacity` slots of
//! highest weight (ties: lower slot index first). Dropped slots contribute nothing to the combine,
//! and [`Layout::dropped`] counts them. [`Capacity::Dropless`] keeps everything.
//!
//! The position policy (and dropless) is what the device kernel `cuda/moe.cu` computes; its CPU
//! twin is [`positions`], which [`Layout::new`] uses for those policies.

use super::MoeError;
use crate::Result;

/// Which rank holds each expert.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Placement {
    /// `experts / world` consecutive experts per rank (expert `e` on rank `e / (experts / world)`);
    /// `experts` must be a multiple of the world size.
    Even,
    /// `owner[e]` is the rank of expert `e` (any assignment; a rank may hold none).
    Explicit(Vec<usize>),
}

/// Which slots of an over-full expert are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DropPolicy {
    /// Keep the slots of highest routing weight (Megatron's `probs`).
    Probability,
    /// Keep the earliest slots in token order (Megatron's `position`).
    Position,
}

/// How many slots an expert takes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Capacity {
    /// Every slot is kept (variable-size all-to-all-v).
    Dropless,
    /// `ceil(tokens · top_k · factor / experts)` slots per expert, the rest dropped by `policy`.
    Factor {
        /// The capacity factor (1.0: exactly the mean load).
        factor: f64,
        /// Which slots are dropped.
        policy: DropPolicy,
    },
}

/// The layout's parameters (the same on every rank).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayoutConfig {
    /// Number of experts `E`.
    pub experts: usize,
    /// Number of ranks.
    pub world: usize,
    /// Where the experts live.
    pub placement: Placement,
    /// Capacity and dropping.
    pub capacity: Capacity,
}

impl LayoutConfig {
    /// `experts` spread evenly over `world` ranks, dropless.
    pub fn even(experts: usize, world: usize) -> LayoutConfig {
        LayoutConfig {
            experts,
            world,
            placement: Placement::Even,
            capacity: Capacity::Dropless,
        }
    }

    /// Builder: a capacity factor with a drop policy.
    pub fn with_capacity(mut self, factor: f64, policy: DropPolicy) -> Self {
        self.capacity = Capacity::Factor { factor, policy };
        self
    }

    /// The owner rank of every expert, checked.
    pub fn owners(&self) -> Result<Vec<usize>> {
        if self.world == 0 {
            return Err(MoeError::Config("the world size must be at least 1".into()).into());
        }
        match &self.placement {
            Placement::Even => {
                if self.experts == 0 || self.experts % self.world != 0 {
                    return Err(MoeError::Config(format!(
                        "Placement::Even needs a positive multiple of the world size ({}) experts, got {}; use Placement::Explicit for another spread",
                        self.world, self.experts
                    ))
                    .into());
                }
                let per = self.experts / self.world;
                Ok((0..self.experts).map(|e| e / per).collect())
            }
            Placement::Explicit(owner) => {
                if owner.len() != self.experts {
                    return Err(MoeError::Shape {
                        what: "Placement::Explicit (one owner rank per expert)".into(),
                        expected: self.experts,
                        got: owner.len(),
                    }
                    .into());
                }
                if let Some((e, &r)) = owner.iter().enumerate().find(|(_, &r)| r >= self.world) {
                    return Err(MoeError::Config(format!(
                        "Placement::Explicit: expert {e} on rank {r}, but the world has {} ranks",
                        self.world
                    ))
                    .into());
                }
                Ok(owner.clone())
            }
        }
    }

    /// The per-expert capacity for `tokens` tokens of `top_k` choices, or `None` when dropless.
    pub fn capacity_for(&self, tokens: usize, top_k: usize) -> Result<Option<usize>> {
        match self.capacity {
            Capacity::Dropless => Ok(None),
            Capacity::Factor { factor, .. } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(MoeError::Config(format!(
                        "capacity factor {factor} must be a finite positive number"
                    ))
                    .into());
                }
                let c = (tokens as f64 * top_k as f64 * factor / self.experts.max(1) as f64).ceil();
                Ok(Some(c.min(u32::MAX as f64 - 1.0) as usize))
            }
        }
    }
}

/// Result of the position kernel (and its CPU twin [`positions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    /// Slots routed to each expert, before dropping.
    pub routed: Vec<u32>,
    /// Slots kept per expert.
    pub kept: Vec<u32>,
    /// Per slot: its row in the send buffer, or -1 (unused or dropped).
    pub slot_row: Vec<i32>,
    /// Per send row: its slot index (`token · top_k + choice`).
    pub row_slot: Vec<u32>,
}

/// The CPU twin of `cuda/moe.cu`: histogram, prefix sum and stable positions.
///
/// `ids[s]` is slot `s`'s expert (`-1`: unused; ids must already be checked to lie in `-1..E`),
/// `order[e]` the expert's place in send order (a permutation of `0..E`), `capacity` the per-expert
/// limit (`u32::MAX`: dropless). A slot's position within its expert is the number of earlier slots
/// (lower index) routed to the same expert; it is kept when that is below the capacity, and its row
/// is the kept counts of the experts before it in send order plus that position.
pub fn positions(ids: &[i32], order: &[u32], capacity: u32) -> Positions {
    let e_n = order.len();
    let mut routed = vec![0u32; e_n];
    for &id in ids {
        if id >= 0 {
            routed[id as usize] += 1;
        }
    }
    let kept: Vec<u32> = routed.iter().map(|&c| c.min(capacity)).collect();
    // base row of each expert: kept counts of the experts before it in send order
    let mut by_order = vec![0usize; e_n];
    for (e, &o) in order.iter().enumerate() {
        by_order[o as usize] = e;
    }
    let mut base = vec![0u32; e_n];
    let mut acc = 0u32;
    for &e in &by_order {
        base[e] = acc;
        acc += kept[e];
    }
    let mut seen = vec![0u32; e_n];
    let mut slot_row = vec![-1i32; ids.len()];
    let mut row_slot = vec![0u32; acc as usize];
    for (s, &id) in ids.iter().enumerate() {
        if id < 0 {
            continue;
        }
        let e = id as usize;
        let p = seen[e];
        seen[e] += 1;
        if p < capacity {
            let row = base[e] + p;
            slot_row[s] = row as i32;
            row_slot[row as usize] = s as u32;
        }
    }
    Positions {
        routed,
        kept,
        slot_row,
        row_slot,
    }
}

/// Where every slot of one rank's router output goes; see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    tokens: usize,
    top_k: usize,
    config: LayoutConfig,
    owner: Vec<usize>,
    local: Vec<usize>,
    rank_experts: Vec<Vec<usize>>,
    capacity: Option<usize>,
    weights: Vec<f32>,
    routed: Vec<usize>,
    kept: Vec<usize>,
    slot_row: Vec<i64>,
    row_slot: Vec<u32>,
    row_expert: Vec<u32>,
    rank_rows: Vec<usize>,
    rank_tokens: Vec<usize>,
    fingerprint: u64,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

impl Layout {
    /// The layout of `ids` / `weights` (both `tokens × top_k`, row-major; `ids[t·k + j]` is token
    /// `t`'s `j`-th expert or -1). Checks every id and weight first: an id outside `-1..E` is
    /// [`MoeError::ExpertOutOfRange`], a NaN or infinite weight [`MoeError::BadWeight`], wrong
    /// lengths [`MoeError::Shape`]. Local: nothing is communicated.
    pub fn new(
        ids: &[i64],
        weights: &[f32],
        top_k: usize,
        config: &LayoutConfig,
    ) -> Result<Layout> {
        if top_k == 0 {
            return Err(MoeError::Config("top_k must be at least 1".into()).into());
        }
        if ids.len() % top_k != 0 {
            return Err(MoeError::Shape {
                what: format!(
                    "expert ids: tokens x top_k ({top_k}); the length is not a multiple of top_k"
                ),
                expected: ids.len().div_ceil(top_k) * top_k,
                got: ids.len(),
            }
            .into());
        }
        if weights.len() != ids.len() {
            return Err(MoeError::Shape {
                what: format!(
                    "routing weights: one per expert id (tokens x top_k = {} x {top_k})",
                    ids.len() / top_k
                ),
                expected: ids.len(),
                got: weights.len(),
            }
            .into());
        }
        let owner = config.owners()?;
        let e_n = config.experts;
        if e_n > i32::MAX as usize {
            return Err(MoeError::Config(format!("{e_n} experts: at most 2^31 - 1")).into());
        }
        if ids.len() > i32::MAX as usize {
            return Err(MoeError::Config(format!(
                "{} slots in one layout: at most 2^31 - 1 (split the tokens into chunks)",
                ids.len()
            ))
            .into());
        }
        for (s, (&id, &w)) in ids.iter().zip(weights).enumerate() {
            if id < -1 || id >= e_n as i64 {
                return Err(MoeError::ExpertOutOfRange {
                    token: s / top_k,
                    choice: s % top_k,
                    id,
                    experts: e_n,
                }
                .into());
            }
            if id >= 0 && !w.is_finite() {
                return Err(MoeError::BadWeight {
                    token: s / top_k,
                    choice: s % top_k,
                    weight: w,
                }
                .into());
            }
        }
        let tokens = ids.len() / top_k;
        let capacity = config.capacity_for(tokens, top_k)?;
        let (local, order) = send_order(&owner, config.world);
        let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let pos = match config.capacity {
            Capacity::Factor {
                policy: DropPolicy::Probability,
                ..
            } => by_probability(&ids32, weights, &order, capacity.unwrap_or(usize::MAX)),
            _ => positions(
                &ids32,
                &order,
                capacity.map(|c| c as u32).unwrap_or(u32::MAX),
            ),
        };
        Layout::assemble(tokens, top_k, config, owner, local, capacity, weights, pos)
    }

    /// Build from a [`Positions`] (computed on the host or by the device kernel).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        tokens: usize,
        top_k: usize,
        config: &LayoutConfig,
        owner: Vec<usize>,
        local: Vec<usize>,
        capacity: Option<usize>,
        weights: &[f32],
        pos: Positions,
    ) -> Result<Layout> {
        let world = config.world;
        let mut rank_experts = vec![Vec::new(); world];
        for (e, &r) in owner.iter().enumerate() {
            rank_experts[r].push(e);
        }
        let mut rank_rows = vec![0usize; world];
        for (e, &k) in pos.kept.iter().enumerate() {
            rank_rows[owner[e]] += k as usize;
        }
        // each row's expert: experts in send order, each repeated by its kept count
        let mut row_expert = Vec::with_capacity(pos.row_slot.len());
        for experts in &rank_experts {
            for &e in experts {
                row_expert.extend(std::iter::repeat(e as u32).take(pos.kept[e] as usize));
            }
        }
        if row_expert.len() != pos.row_slot.len() {
            return Err(MoeError::Config(format!(
                "layout: {} rows but the kept counts sum to {}",
                pos.row_slot.len(),
                row_expert.len()
            ))
            .into());
        }
        // distinct tokens per rank (DeepEP's num_tokens_per_rank)
        let mut rank_tokens = vec![0usize; world];
        let mut last = vec![usize::MAX; world];
        for t in 0..tokens {
            for j in 0..top_k {
                if let Ok(row) = usize::try_from(pos.slot_row[t * top_k + j]) {
                    let r = owner[row_expert[row] as usize];
                    if last[r] != t {
                        last[r] = t;
                        rank_tokens[r] += 1;
                    }
                }
            }
        }
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        fnv(&mut h, &(tokens as u64).to_le_bytes());
        fnv(&mut h, &(top_k as u64).to_le_bytes());
        fnv(&mut h, &(world as u64).to_le_bytes());
        for &o in &owner {
            fnv(&mut h, &(o as u64).to_le_bytes());
        }
        fnv(
            &mut h,
            &(capacity.unwrap_or(usize::MAX) as u64).to_le_bytes(),
        );
        fnv(&mut h, bytemuck::cast_slice(&pos.slot_row));
        fnv(&mut h, bytemuck::cast_slice(&pos.kept));
        fnv(&mut h, bytemuck::cast_slice(&row_expert));
        fnv(&mut h, bytemuck::cast_slice(weights));
        Ok(Layout {
            tokens,
            top_k,
            config: config.clone(),
            owner,
            local,
            rank_experts,
            capacity,
            weights: weights.to_vec(),
            routed: pos.routed.iter().map(|&c| c as usize).collect(),
            kept: pos.kept.iter().map(|&c| c as usize).collect(),
            slot_row: pos.slot_row.iter().map(|&r| r as i64).collect(),
            row_slot: pos.row_slot,
            row_expert,
            rank_rows,
            rank_tokens,
            fingerprint: h,
        })
    }

    /// Tokens of this rank.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Choices per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.config.experts
    }
    /// Number of ranks the layout was made for.
    pub fn world(&self) -> usize {
        self.config.world
    }
    /// The parameters.
    pub fn config(&self) -> &LayoutConfig {
        &self.config
    }
    /// The rank holding expert `e`.
    pub fn owner(&self, e: usize) -> usize {
        self.owner[e]
    }
    /// Expert `e`'s index among its rank's experts.
    pub fn local_index(&self, e: usize) -> usize {
        self.local[e]
    }
    /// The experts on `rank`, in local-index order.
    pub fn experts_of(&self, rank: usize) -> &[usize] {
        &self.rank_experts[rank]
    }
    /// The per-expert capacity (`None`: dropless).
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }
    /// Slots routed to each expert before dropping.
    pub fn routed_per_expert(&self) -> &[usize] {
        &self.routed
    }
    /// Slots kept (sent) per expert.
    pub fn tokens_per_expert(&self) -> &[usize] {
        &self.kept
    }
    /// Rows sent to each rank (one per kept slot).
    pub fn rows_per_rank(&self) -> &[usize] {
        &self.rank_rows
    }
    /// Distinct tokens with at least one kept slot on each rank (DeepEP's `num_tokens_per_rank`).
    pub fn tokens_per_rank(&self) -> &[usize] {
        &self.rank_tokens
    }
    /// Whether token `t` has a kept slot on `rank` (DeepEP's `is_token_in_rank`).
    pub fn is_token_in_rank(&self, t: usize, rank: usize) -> bool {
        (0..self.top_k).any(|j| {
            let r = self.slot_row[t * self.top_k + j];
            r >= 0 && self.owner[self.row_expert(r as usize)] == rank
        })
    }
    /// Slots dropped by the capacity (unused `-1` choices are not counted).
    pub fn dropped(&self) -> usize {
        self.routed.iter().sum::<usize>() - self.kept.iter().sum::<usize>()
    }
    /// Dropped slots per expert.
    pub fn dropped_per_expert(&self) -> Vec<usize> {
        self.routed
            .iter()
            .zip(&self.kept)
            .map(|(r, k)| r - k)
            .collect()
    }
    /// Slot `token · top_k + choice`'s row in the send buffer, or `None` (dropped or unused).
    pub fn slot_row(&self, slot: usize) -> Option<usize> {
        usize::try_from(self.slot_row[slot]).ok()
    }
    /// Rows in the send buffer (kept slots).
    pub fn send_rows(&self) -> usize {
        self.row_slot.len()
    }
    /// Send row `r`'s slot.
    pub fn row_slot(&self, r: usize) -> usize {
        self.row_slot[r] as usize
    }
    /// Send row `r`'s source token.
    pub fn row_token(&self, r: usize) -> usize {
        self.row_slot[r] as usize / self.top_k
    }
    /// Send row `r`'s routing weight.
    pub fn row_weight(&self, r: usize) -> f32 {
        self.weights[self.row_slot[r] as usize]
    }
    /// Send row `r`'s expert (rows are grouped by expert in send order).
    pub fn row_expert(&self, r: usize) -> usize {
        self.row_expert[r] as usize
    }
    /// The routing weights (per slot).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }
    /// A hash of everything that decides where rows go and how they are weighted; two layouts with
    /// the same fingerprint route identically, so a handle checks it.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The layout of tokens `range` alone, with the same kept/dropped decisions (for chunked
    /// pipelining: the chunks of a layout together send exactly its rows).
    pub fn chunk(&self, range: std::ops::Range<usize>) -> Result<Layout> {
        if range.start > range.end || range.end > self.tokens {
            return Err(MoeError::Config(format!(
                "chunk {range:?} is outside the layout's {} tokens",
                self.tokens
            ))
            .into());
        }
        let k = self.top_k;
        let slots = range.start * k..range.end * k;
        let e_n = self.config.experts;
        let order = send_order(&self.owner, self.config.world).1;
        let mut by_order = vec![0usize; e_n];
        for (e, &o) in order.iter().enumerate() {
            by_order[o as usize] = e;
        }
        // keep exactly the slots kept by the parent, renumbered per expert in slot order
        let mut kept = vec![0u32; e_n];
        let mut routed = vec![0u32; e_n];
        let mut expert_of_slot = vec![-1i64; slots.len()];
        for (i, s) in slots.clone().enumerate() {
            if let Some(r) = self.slot_row(s) {
                let e = self.row_expert(r);
                expert_of_slot[i] = e as i64;
                kept[e] += 1;
            }
        }
        // routed before dropping, for the report: the parent's routing of these slots is not
        // kept per slot, so a chunk reports its kept slots as routed (its own dropping is none)
        routed.copy_from_slice(&kept);
        let mut base = vec![0u32; e_n];
        let mut acc = 0u32;
        for &e in &by_order {
            base[e] = acc;
            acc += kept[e];
        }
        let mut seen = vec![0u32; e_n];
        let mut slot_row = vec![-1i32; slots.len()];
        let mut row_slot = vec![0u32; acc as usize];
        for (i, &e) in expert_of_slot.iter().enumerate() {
            if e >= 0 {
                let e = e as usize;
                let row = base[e] + seen[e];
                seen[e] += 1;
                slot_row[i] = row as i32;
                row_slot[row as usize] = i as u32;
            }
        }
        let pos = Positions {
            routed,
            kept,
            slot_row,
            row_slot,
        };
        Layout::assemble(
            range.len(),
            k,
            &self.config,
            self.owner.clone(),
            self.local.clone(),
            self.capacity,
            &self.weights[slots],
            pos,
        )
    }
}

/// Each expert's local index on its rank and its place in send order (by owner, then expert id).
pub(crate) fn send_order(owner: &[usize], world: usize) -> (Vec<usize>, Vec<u32>) {
    let mut local = vec![0usize; owner.len()];
    let mut per_rank = vec![0usize; world];
    for (e, &r) in owner.iter().enumerate() {
        local[e] = per_rank[r];
        per_rank[r] += 1;
    }
    let mut first = vec![0usize; world + 1];
    for r in 0..world {
        first[r + 1] = first[r] + per_rank[r];
    }
    let order = owner
        .iter()
        .enumerate()
        .map(|(e, &r)| (first[r] + local[e]) as u32)
        .collect();
    (local, order)
}

/// The probability drop policy: per expert, keep the `capacity` slots of highest weight (ties:
/// lower slot first); rows in slot order within each expert, as for [`positions`].
fn by_probability(ids: &[i32], weights: &[f32], order: &[u32], capacity: usize) -> Positions {
    let e_n = order.len();
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); e_n];
    for (s, &id) in ids.iter().enumerate() {
        if id >= 0 {
            per[id as usize].push(s);
        }
    }
    let mut keep = vec![false; ids.len()];
    for slots in &mut per {
        if slots.len() > capacity {
            let mut by_w = slots.clone();
            by_w.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
            for &s in &by_w[..capacity] {
                keep[s] = true;
            }
        } else {
            for &s in slots.iter() {
                keep[s] = true;
            }
        }
    }
    let masked: Vec<i32> = ids
        .iter()
        .zip(&keep)
        .map(|(&id, &k)| if k { id } else { -1 })
        .collect();
    let mut p = positions(&masked, order, u32::MAX);
    p.routed = per.iter().map(|s| s.len() as u32).collect();
    p
}
