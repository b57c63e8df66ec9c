use idempotent_core::idempotent;

#[derive(Debug)]
pub struct AppError;

impl From<idempotent_core::Error> for AppError {
    fn from(_: idempotent_core::Error) -> Self {
        AppError
    }
}

pub type Result<T> = std::result::Result<T, AppError>;

mod errors {
    pub type Result<T, E = super::AppError> = std::result::Result<T, E>;
}

/// Named otherwise than `Result`, and with its parameters swapped.
type Res<T> = std::result::Result<T, AppError>;
type Swapped<E, T> = std::result::Result<T, E>;

#[idempotent(key = id)]
async fn alias_not_named_result(id: u64) -> Res<u64> {
    Ok(id)
}

#[idempotent(key = id)]
async fn swapped_alias(id: u64) -> Swapped<AppError, u64> {
    Ok(id)
}

#[idempotent(key = id)]
async fn one_parameter_alias(id: u64) -> Result<u64> {
    Ok(id)
}

#[idempotent(key = id)]
async fn qualified_alias(id: u64) -> errors::Result<u64> {
    Ok(id)
}

#[idempotent(key = id)]
async fn std_io_result(id: u64) -> std::io::Result<u64> {
    Ok(id)
}

#[idempotent(key = id)]
async fn question_mark_and_early_return(id: u64) -> Result<u64> {
    if id == 0 {
        return Err(AppError);
    }
    let parsed: u64 = "42".parse().map_err(|_| AppError)?;
    Ok(parsed + id)
}

fn main() {
    let _ = alias_not_named_result(1);
    let _ = swapped_alias(1);
    let _ = one_parameter_alias(1);
    let _ = qualified_alias(1);
    let _ = question_mark_and_early_return(1);
}
