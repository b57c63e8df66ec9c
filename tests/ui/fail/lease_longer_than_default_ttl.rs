//! A literal checked against a default or a limit of the runtime is still a compile error on
//! the literal: the check names `Options::DEFAULT_TTL`, `Options::DEFAULT_LEASE` and
//! `MAX_DURATION` rather than copying them.
use idempotent_core::idempotent;

#[idempotent(key = id, lease = "48h")]
async fn lease_over_the_default_ttl(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

#[idempotent(key = id, ttl = "10s")]
async fn ttl_under_the_default_lease(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

fn main() {}
