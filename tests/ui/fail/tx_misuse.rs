use idempotent_core::idempotent;

// The transaction argument must exist, a store must be named, and errors cannot be
// recorded in a transaction that an error rolls back.
#[idempotent(key = id, tx = transaction, cache_errors)]
async fn charge(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

fn main() {}
