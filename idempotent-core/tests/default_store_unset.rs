//! Without `set_default_store`, the default store is one in-memory store for the process.
//! (Its own test binary: the default store is process-wide.)

mod support;

use std::sync::Arc;

use idempotent_core::{
    Call, Fingerprint, Idempotency, MemoryStore, default_store, set_default_store,
};
use support::{AppError, Runs};

#[tokio::test]
async fn the_default_is_one_shared_memory_store_and_then_fixed() {
    let first = default_store();
    assert!(format!("{first:?}").starts_with("MemoryStore"), "{first:?}");
    assert!(
        Arc::ptr_eq(first, default_store()),
        "one store for the whole process"
    );

    // Two engines made separately share records through it.
    let runs = Runs::default();
    let call = Call::new("tests::default", Fingerprint::of(&1).unwrap()).key("k");
    let body = || async {
        runs.hit();
        Ok::<_, AppError>(runs.count())
    };
    let a = Idempotency::with_default_store()
        .run(call, body())
        .await
        .unwrap();
    let b = Idempotency::with_default_store()
        .run(call, body())
        .await
        .unwrap();
    assert!(!a.is_replayed() && b.is_replayed());
    assert_eq!(runs.count(), 1);

    // Once used, it cannot be swapped: calls before and after would see different records.
    let error = set_default_store(Arc::new(MemoryStore::new())).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("before the first idempotent call")
    );
}
