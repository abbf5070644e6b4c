//! The node store (being written).
