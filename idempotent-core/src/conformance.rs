//! The protocol conformance suite (being written).
