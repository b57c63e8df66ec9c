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

pub struct Pool;

#[idempotent(key = id, skip(pol))]
async fn charge(id: u64, pool: &Pool) -> Result<u64, AppError> {
    let _ = pool;
    Ok(id)
}

fn main() {}
