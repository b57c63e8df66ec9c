use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent(key = id)]
fn not_async(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

fn main() {}
