//! The body's inner attributes stay on the function.
use idempotent_core::idempotent;

#[derive(Debug)]
pub struct AppError;

impl From<idempotent_core::Error> for AppError {
    fn from(_: idempotent_core::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, AppError> {
    #![allow(unused_variables)]
    let unused = 1;
    Ok(id)
}

fn main() {
    let _ = charge(1);
}
