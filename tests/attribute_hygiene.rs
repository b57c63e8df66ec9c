//! Names in user code never clash with the names the attribute generates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_core::{Error, MemoryStore, idempotent};

#[derive(Debug)]
pub struct AppError(Error);

impl From<Error> for AppError {
    fn from(error: Error) -> Self {
        AppError(error)
    }
}

/// A `Result` alias with one parameter, as many crates define.
type Result<T> = std::result::Result<T, AppError>;

static RUNS: AtomicU32 = AtomicU32::new(0);

#[allow(clippy::too_many_arguments)]
#[idempotent(key = key, scope = scope)]
async fn generated_names_as_arguments(
    key: String,
    scope: String,
    store: u32,
    fingerprint: u32,
    options: u32,
    __idempotent_key: u32,
    __idempotent_store: u32,
    __idempotent_call: u32,
) -> Result<u32> {
    // The same names as locals in the body, too.
    let call = 1;
    let __idempotent_options = 2;
    let __idempotent_fingerprinter = 3;
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(store
        + fingerprint
        + options
        + __idempotent_key
        + __idempotent_store
        + __idempotent_call
        + call
        + __idempotent_options
        + __idempotent_fingerprinter
        + key.len() as u32
        + scope.len() as u32)
}

#[tokio::test]
async fn arguments_and_locals_named_like_generated_code() {
    let call = || generated_names_as_arguments("k".into(), "tenant".into(), 1, 2, 3, 4, 5, 6);
    assert_eq!(
        call().await.unwrap(),
        1 + 2 + 3 + 4 + 5 + 6 + 1 + 2 + 3 + 1 + 6
    );
    assert_eq!(call().await.unwrap(), 34);
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    let other_args =
        generated_names_as_arguments("k".into(), "tenant".into(), 9, 2, 3, 4, 5, 6).await;
    assert!(matches!(other_args, Err(AppError(Error::KeyReused))));
}

mod shadowing {
    //! A module that shadows the names the expansion uses: `idempotent_core`, `core`, `Option`.
    #![allow(dead_code)]
    use super::*;

    mod idempotent_core {}
    mod core {}
    enum Option {
        Some,
        None,
    }

    pub static RUNS: AtomicU32 = AtomicU32::new(0);

    #[idempotent(key = id, name = "hygiene.shadowed")]
    pub async fn shadowed(id: u64) -> Result<u64> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }
}

#[tokio::test]
async fn shadowed_paths_do_not_break_the_expansion() {
    assert_eq!(shadowing::shadowed(5).await.unwrap(), 5);
    assert_eq!(shadowing::shadowed(5).await.unwrap(), 5);
    assert_eq!(shadowing::RUNS.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_local_named_store_is_not_the_store_option() {
    static SEEN: AtomicU32 = AtomicU32::new(0);
    #[idempotent(key = "fixed", store = store, skip(store))]
    async fn uses_store(store: Arc<MemoryStore>) -> Result<u32> {
        Ok(SEEN.fetch_add(1, Ordering::SeqCst))
    }
    let store = Arc::new(MemoryStore::new());
    uses_store(store.clone()).await.unwrap();
    uses_store(store.clone()).await.unwrap();
    assert_eq!(SEEN.load(Ordering::SeqCst), 1);
    assert_eq!(store.len(), 1, "the record went to the argument's store");
}
