//! The `#[idempotent]` attribute. Use it through `idempotent_core::idempotent`.
