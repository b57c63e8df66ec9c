//! A `Result` alias hides the output type from the attribute: the error must still name it,
//! at the return type.
use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

pub type Result<T> = std::result::Result<T, idempotent_core::Error>;

#[derive(Deserialize)]
pub struct Receipt {
    id: u64,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt> {
    Ok(Receipt { id })
}

fn main() {}
