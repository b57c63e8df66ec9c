use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
pub struct OrderId {
    value: u64,
}

#[idempotent(key = order)]
async fn charge(order: OrderId) -> Result<u64, idempotent_core::Error> {
    Ok(order.value)
}

fn main() {}
