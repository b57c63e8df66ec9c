//! An application sets the default store once, before the first call.
//! (Its own test binary: the default store is process-wide.)

mod support;

use std::sync::Arc;

use idempotent_core::{
    Call, Fingerprint, Idempotency, MemoryStore, Store, default_store, set_default_store,
};
use support::{AppError, DownStore};

#[tokio::test]
async fn the_store_set_at_startup_is_the_one_used() {
    let chosen: Arc<dyn Store> = Arc::new(DownStore);
    set_default_store(Arc::clone(&chosen)).unwrap();
    assert!(Arc::ptr_eq(default_store(), &chosen));

    // The engine consults it: a down store means the body never runs.
    let call = Call::new("tests::default", Fingerprint::of(&1).unwrap()).key("k");
    let error = Idempotency::with_default_store()
        .run(call, async { Ok::<u32, AppError>(1) })
        .await
        .unwrap_err();
    assert!(
        error.idempotency().starts_with("Store(Unavailable"),
        "{error:?}"
    );

    assert!(set_default_store(Arc::new(MemoryStore::new())).is_err());
    assert!(
        Arc::ptr_eq(default_store(), &chosen),
        "a second set changes nothing"
    );
}
