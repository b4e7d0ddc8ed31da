//! Gradient coding for stragglers (work in progress).
