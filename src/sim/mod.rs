//! Virtual-time cluster simulator (work in progress).
