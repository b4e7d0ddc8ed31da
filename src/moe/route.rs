//! The route of one dispatch: from the global count matrix to the stages that move rows.
//!
//! Every rank knows `counts[s][g]` (rows rank `s` sends to expert `g`, after dropping) once the
//! counts are all-gathered, so each rank derives its own send/receive counts and permutations with
//! no further messages. A route is a list of [`Stage`]s run forward by dispatch and backward (in
//! reverse, each stage inverted) by combine:
//! - 1D: one all-to-all-v over the world, then a transpose from `[source][local expert]` to
//!   `[local expert][source]`.
//! - 2D (hierarchical, `g` ranks per node, ranks `n·g .. n·g + g` on node `n`): the sender packs rows
//!   ordered `[dest local index][dest node]`; an all-to-all-v within the node delivers to each local
//!   peer `l` every row bound for a rank with local index `l`; a transpose to `[dest node][source
//!   local]`; an all-to-all-v among the ranks of equal local index (one message per node, `g` times
//!   larger than 1D's); the rows then arrive in global source order, as in 1D, and the same
//!   transpose groups them per expert.

use super::Layout;

/// Which communicator a stage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Net {
    World,
    Intra,
    Inter,
}

/// One step of a route.
#[derive(Debug, Clone)]
pub(crate) enum Stage {
    /// All-to-all-v: rows to / from each peer of `net`.
    Exchange {
        net: Net,
        send: Vec<usize>,
        recv: Vec<usize>,
    },
    /// Gather rows by `fwd` (forward); `inv` undoes it (backward).
    Permute { fwd: Vec<u32>, inv: Vec<u32> },
}

/// A whole route (one rank's view).
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Token side: per wire row (packed order), its token.
    pub wire_token: Vec<u32>,
    /// Token side: per wire row, its routing weight.
    pub wire_weight: Vec<f32>,
    /// The stages, in dispatch order.
    pub stages: Vec<Stage>,
    /// Expert side: rows received in total.
    pub recv_rows: usize,
    /// Expert side: rows per local expert.
    pub expert_counts: Vec<usize>,
    /// Ranks per node of a 2D route.
    pub per_node: Option<usize>,
}

/// Gather index taking `[a][b]`-ordered blocks (`sizes[a·nb + b]` rows each) to `[b][a]` order,
/// and its inverse.
pub(crate) fn transpose(sizes: &[usize], na: usize, nb: usize) -> Stage {
    let mut start = vec![0usize; na * nb];
    let mut acc = 0;
    for (i, &s) in sizes.iter().enumerate() {
        start[i] = acc;
        acc += s;
    }
    let mut fwd = Vec::with_capacity(acc);
    for b in 0..nb {
        for a in 0..na {
            let i = a * nb + b;
            fwd.extend((start[i]..start[i] + sizes[i]).map(|r| r as u32));
        }
    }
    let mut inv = vec![0u32; acc];
    for (i, &f) in fwd.iter().enumerate() {
        inv[f as usize] = i as u32;
    }
    Stage::Permute { fwd, inv }
}

impl Route {
    /// The route of `layout` on rank `me`, given every rank's kept counts per expert
    /// (`counts[s · E + g]`) and, for 2D, the ranks per node.
    pub fn new(layout: &Layout, me: usize, counts: &[usize], per_node: Option<usize>) -> Route {
        let w = layout.world();
        let e_n = layout.experts();
        let mine = layout.experts_of(me);
        let c = |s: usize, g: usize| counts[s * e_n + g];
        // rows of rank `s` for this rank's experts, [s][local e]
        let from: Vec<usize> = (0..w)
            .flat_map(|s| mine.iter().map(move |&g| (s, g)))
            .map(|(s, g)| c(s, g))
            .collect();
        let recv_rows = from.iter().sum();
        let expert_counts = mine
            .iter()
            .map(|&g| (0..w).map(|s| c(s, g)).sum())
            .collect();
        let regroup = transpose(&from, w, mine.len());
        let rows = layout.rows_per_rank();
        let mut start = vec![0usize; w + 1];
        for d in 0..w {
            start[d + 1] = start[d] + rows[d];
        }
        let dest_order: Vec<usize> = match per_node {
            None => (0..w).collect(),
            Some(g) => (0..g)
                .flat_map(|l| (0..w / g).map(move |n| n * g + l))
                .collect(),
        };
        let mut wire_token = Vec::with_capacity(layout.send_rows());
        let mut wire_weight = Vec::with_capacity(layout.send_rows());
        for &d in &dest_order {
            for r in start[d]..start[d + 1] {
                wire_token.push(layout.row_token(r) as u32);
                wire_weight.push(layout.row_weight(r));
            }
        }
        let per_rank_recv: Vec<usize> = (0..w)
            .map(|s| mine.iter().map(|&g| c(s, g)).sum())
            .collect();
        let stages = match per_node {
            None => vec![
                Stage::Exchange {
                    net: Net::World,
                    send: rows.to_vec(),
                    recv: per_rank_recv,
                },
                regroup,
            ],
            Some(g) => {
                let nodes = w / g;
                let (n_me, l_me) = (me / g, me % g);
                let s1_send = (0..g)
                    .map(|l| (0..nodes).map(|n| rows[n * g + l]).sum())
                    .collect();
                // block (l', n'') of the intra receive: rows from (n_me, l') for the experts of
                // rank (n'', l_me)
                let block = |lp: usize, n2: usize| -> usize {
                    let s = n_me * g + lp;
                    layout
                        .experts_of(n2 * g + l_me)
                        .iter()
                        .map(|&e| c(s, e))
                        .sum()
                };
                let mid: Vec<usize> = (0..g)
                    .flat_map(|lp| (0..nodes).map(move |n2| (lp, n2)))
                    .map(|(lp, n2)| block(lp, n2))
                    .collect();
                let s1_recv = (0..g)
                    .map(|lp| (0..nodes).map(|n2| block(lp, n2)).sum())
                    .collect();
                let s2_send = (0..nodes)
                    .map(|n2| (0..g).map(|lp| block(lp, n2)).sum())
                    .collect();
                let s2_recv = (0..nodes)
                    .map(|np| (0..g).map(|lp| per_rank_recv[np * g + lp]).sum())
                    .collect();
                vec![
                    Stage::Exchange {
                        net: Net::Intra,
                        send: s1_send,
                        recv: s1_recv,
                    },
                    transpose(&mid, g, nodes),
                    Stage::Exchange {
                        net: Net::Inter,
                        send: s2_send,
                        recv: s2_recv,
                    },
                    regroup,
                ]
            }
        };
        Route {
            wire_token,
            wire_weight,
            stages,
            recv_rows,
            expert_counts,
            per_node,
        }
    }
}
