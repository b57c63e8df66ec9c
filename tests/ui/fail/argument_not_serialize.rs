use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

pub struct Pool;

#[idempotent(key = id)]
async fn charge(id: u64, pool: &Pool) -> Result<u64, idempotent_core::Error> {
    let _ = pool;
    Ok(id)
}

fn main() {}
