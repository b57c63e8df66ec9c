//! A body that does not parse gets the compiler's own error only: the attribute adds none.
use idempotent_core::idempotent;

#[derive(Debug)]
pub struct AppError(idempotent_core::Error);
impl From<idempotent_core::Error> for AppError {
    fn from(error: idempotent_core::Error) -> Self {
        AppError(error)
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, AppError> {
    let total = id +;
    Ok(total)
}

fn main() {
    let _ = charge(1);
}
