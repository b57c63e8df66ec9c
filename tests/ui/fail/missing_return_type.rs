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
async fn charge(id: u64) {
    let _ = id;
}

fn main() {}
