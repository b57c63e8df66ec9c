use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
pub struct Receipt {
    id: u64,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, idempotent_core::Error> {
    Ok(Receipt { id })
}

fn main() {}
