//! Sequential gradient coding (placeholder).
