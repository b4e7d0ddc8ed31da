//! The MoE module's named errors (wrapped in [`crate::Error::Moe`]).
//!
//! Each says what was wrong and what to change. Every one is raised before any row is sent: local
//! checks run first, and in [`super::Moe`]'s collectives every rank's verdict travels with the
//! counts (or a one-word status exchange), so when one rank's input is bad every rank returns an
//! error instead of some ranks waiting for rows that never come.

/// What went wrong in an MoE layout, dispatch or combine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MoeError {
    /// A router output named an expert that does not exist.
    #[error("token {token}, choice {choice}: expert id {id} is out of range for {experts} experts (ids are 0..{experts}; -1 marks an unused choice)")]
    ExpertOutOfRange {
        /// The token.
        token: usize,
        /// Which of its top-k choices.
        choice: usize,
        /// The id found.
        id: i64,
        /// The number of experts.
        experts: usize,
    },
    /// The router's ids and weights do not have the shapes the layout needs.
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        /// Which input, and the shape it must have.
        what: String,
        /// The number of values needed.
        expected: usize,
        /// The number passed.
        got: usize,
    },
    /// A routing weight was NaN or infinite.
    #[error("token {token}, choice {choice}: routing weight {weight} is not finite; check the router (softmax of NaN logits?)")]
    BadWeight {
        /// The token.
        token: usize,
        /// Which choice.
        choice: usize,
        /// The value.
        weight: f32,
    },
    /// A handle was used with a layout other than the one it was made from.
    #[error("the handle was made from layout {handle:016x} but this call passes layout {layout:016x}; use the handle that dispatch returned for this layout")]
    HandleMismatch {
        /// The handle's layout fingerprint.
        handle: u64,
        /// The layout passed.
        layout: u64,
    },
    /// A handle outlived the communication setup it describes.
    #[error("stale handle: it was made by {made_by} at generation {handle}, this dispatcher is {this} at generation {now}; re-run dispatch after changing the wire format or the 1D/2D mode")]
    StaleHandle {
        /// Which dispatcher made it.
        made_by: u64,
        /// Its generation.
        handle: u64,
        /// This dispatcher.
        this: u64,
        /// This dispatcher's generation now.
        now: u64,
    },
    /// Ranks disagree on the hidden size, the expert count or the row type.
    #[error("rank {rank} has {what} {theirs} but rank {me} has {mine}; every rank must dispatch rows of the same hidden size, dtype and expert count")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// The first rank that differs.
        rank: usize,
        /// Its value.
        theirs: i64,
        /// This rank.
        me: usize,
        /// This rank's value.
        mine: i64,
    },
    /// Another rank's input was invalid (its own error names the problem); nothing was sent.
    #[error(
        "rank {rank} reported invalid input to {during}; nothing was sent (see that rank's error)"
    )]
    PeerInvalid {
        /// The rank.
        rank: usize,
        /// The operation.
        during: &'static str,
    },
    /// A placement, capacity or plan that cannot be used.
    #[error("{0}")]
    Config(String),
}
