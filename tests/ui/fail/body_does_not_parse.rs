//! A body that does not parse gets the compiler's own error only: the attribute adds none.
use idempotent_core::idempotent;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, idempotent_core::Error> {
    let total = id +;
    Ok(total)
}

fn main() {
    let _ = charge(1);
}
