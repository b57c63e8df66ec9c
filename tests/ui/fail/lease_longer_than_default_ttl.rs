//! A literal checked against a default or a limit of the runtime is still a compile error on
//! the literal: the check names `Options::DEFAULT_TTL`, `Options::DEFAULT_LEASE` and
//! `MAX_DURATION` rather than copying them.
use idempotent_core::idempotent;

#[derive(Debug)]
pub struct AppError(idempotent_core::Error);
impl From<idempotent_core::Error> for AppError {
    fn from(error: idempotent_core::Error) -> Self {
        AppError(error)
    }
}

#[idempotent(key = id, lease = "48h")]
async fn lease_over_the_default_ttl(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

#[idempotent(key = id, ttl = "10s")]
async fn ttl_under_the_default_lease(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {}
