use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent(key = id, tll = "1h")]
async fn charge(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

fn main() {}
