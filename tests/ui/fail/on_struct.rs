use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent(key = id)]
struct Order {
    id: u64,
}

fn main() {}
