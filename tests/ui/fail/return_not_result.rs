//! A return type that is not a `Result` is reported on that type, once, whether the attribute
//! can tell from its spelling (`Option<u64>`) or not (`u32`).
use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct AppError(idempotent_core::Error);
impl From<idempotent_core::Error> for AppError {
    fn from(error: idempotent_core::Error) -> Self {
        AppError(error)
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Option<u64> {
    Some(id)
}

#[idempotent(key = id)]
async fn count(id: u64) -> u32 {
    id as u32
}

fn main() {}
