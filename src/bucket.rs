//! Gradient bucketing (filled below in this issue).
