use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent(key = id, on_conflict = "wiat")]
async fn charge(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

fn main() {}
