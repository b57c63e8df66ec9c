use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent(key = id)]
async fn charge(id: u64) {
    let _ = id;
}

fn main() {}
