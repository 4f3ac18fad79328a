//! Deterministic simulator (see README).
