use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent(key = id, ttl = "soon")]
async fn charge(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

// Only the attribute error is reported: the function is still there for its callers.
async fn caller() -> Result<u64, idempotent_core::Error> {
    charge(7).await
}

fn main() {
    let _ = caller();
}
