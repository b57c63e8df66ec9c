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

#[derive(Serialize)]
pub struct OrderId {
    value: u64,
}

#[idempotent(key = order)]
async fn charge(order: OrderId) -> Result<u64, AppError> {
    Ok(order.value)
}

fn main() {}
