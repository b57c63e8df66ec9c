//! `idempotent-core` under another name: `crate = renamed_idempotency` makes the generated code
//! find it. Without the option this crate would not compile (`::idempotent_core` is unknown).

use std::sync::atomic::{AtomicU32, Ordering};

use renamed_idempotency::{Error, idempotent};

/// Counts executions of [`welcome`].
pub static RUNS: AtomicU32 = AtomicU32::new(0);

/// Sends one welcome message per user.
#[idempotent(key = user, crate = renamed_idempotency)]
pub async fn welcome(user: &str) -> Result<String, Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("welcome, {user}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renamed_dependency_works_through_the_crate_option() {
        assert_eq!(welcome("ada").await.unwrap(), "welcome, ada");
        assert_eq!(welcome("ada").await.unwrap(), "welcome, ada");
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    }
}
