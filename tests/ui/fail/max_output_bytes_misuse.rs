use idempotent_core::idempotent;

#[derive(Debug)]
pub struct AppError(idempotent_core::Error);
impl From<idempotent_core::Error> for AppError {
    fn from(error: idempotent_core::Error) -> Self {
        AppError(error)
    }
}

#[idempotent(key = id, max_output_bytes = 0)]
async fn zero(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

#[idempotent(key = id, max_output_bytes = "64KiB")]
async fn not_a_number(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {}
