use idempotent_core::idempotent;

#[derive(Debug)]
pub struct AppError(idempotent_core::Error);
impl From<idempotent_core::Error> for AppError {
    fn from(error: idempotent_core::Error) -> Self {
        AppError(error)
    }
}

// The transaction argument must exist, a PostgresStore must be named, and errors cannot be
// recorded in a transaction that an error rolls back.
#[idempotent(key = id, tx = transaction, cache_errors)]
async fn charge(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {}
