use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct PlainError;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, PlainError> {
    Ok(id)
}

fn main() {}
