//! The `Idempotency-Key` contract as a tower layer.
