//! A `Result` alias hides the output type from the attribute: the error must still name it,
//! at the return type.
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

pub type Result<T> = std::result::Result<T, AppError>;

#[derive(Deserialize)]
pub struct Receipt {
    id: u64,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt> {
    Ok(Receipt { id })
}

fn main() {}
