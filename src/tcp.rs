//! TCP backend (placeholder module, filled below in this issue).
