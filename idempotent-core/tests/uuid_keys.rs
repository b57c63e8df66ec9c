//! A `uuid::Uuid` names one operation everywhere: as the attribute's `key` and `scope`, through
//! `Call::key` and `Call::scope`, and as the hyphenated text an `Idempotency-Key` header
//! carries. Each test runs the two sides on one memory store and shows the second replays the
//! first's record; the UUID's 16 raw bytes are another operation.
#![cfg(feature = "uuid")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_core::{
    Call, Error, Fingerprint, Idempotency, IdempotencyKey, MemoryStore, Outcome, idempotent,
};
use uuid::Uuid;

const NAME: &str = "uuid_keys.create_order";

fn order_id() -> Uuid {
    Uuid::from_u128(0x3f1c_7a52_0b44_4b8e_9b43_1d2f_3d9b_8d10)
}

fn tenant() -> Uuid {
    Uuid::from_u128(0x9d2e_41b0_77c3_4f5a_a1e8_52c6_0f3b_e917)
}

/// The attribute's side: keyed by `id`, scoped by `tenant`, both `Uuid`s, with only `amount`
/// in the fingerprint. Returns the run it is, counted in `runs`.
#[idempotent(key = id, scope = tenant, name = "uuid_keys.create_order", store = store, skip(store, runs, tenant, id))]
async fn create_order(
    store: Arc<MemoryStore>,
    runs: &AtomicU32,
    tenant: Uuid,
    id: Uuid,
    amount: u64,
) -> Result<u32, Error> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

/// The same function's call through `Call`: the fingerprint of the one argument the attribute
/// fingerprints.
fn call(amount: u64) -> Call<'static> {
    Call::new(NAME, Fingerprint::of(&amount).unwrap())
}

/// Runs `call` on `engine`, counting a run in `runs`.
async fn run(engine: &Idempotency, call: Call<'_>, runs: &AtomicU32) -> Outcome<u32> {
    engine
        .run(call, async {
            Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await
        .unwrap()
}

#[test]
fn a_uuid_call_has_the_storage_key_of_its_text_not_of_its_raw_bytes() {
    let (id, tenant) = (order_id(), tenant());
    let text = (id.to_string(), tenant.to_string());
    assert_eq!(&*id.key_bytes(), text.0.as_bytes());
    assert_eq!(text.0.len(), 36);

    let by_uuid = call(4200).key(&id).scope(&tenant).storage_key().unwrap();
    let by_text = call(4200)
        .key(&text.0)
        .scope(&text.1)
        .storage_key()
        .unwrap();
    let by_raw = call(4200)
        .key(id.as_bytes())
        .scope(tenant.as_bytes())
        .storage_key()
        .unwrap();
    assert_eq!(by_uuid, by_text);
    assert_ne!(by_uuid, by_raw, "the 16 raw bytes are another operation");

    let upper = (
        text.0.to_uppercase().into_bytes(),
        text.1.to_uppercase().into_bytes(),
    );
    assert_ne!(
        by_uuid,
        call(4200)
            .key(&upper.0)
            .scope(&upper.1)
            .storage_key()
            .unwrap(),
        "keys are bytes: the lowercase text is the one form"
    );
}

#[tokio::test]
async fn the_attribute_records_and_a_call_by_uuid_or_by_its_text_replays() {
    let store = Arc::new(MemoryStore::new());
    let engine = Idempotency::new(store.clone());
    let runs = AtomicU32::new(0);
    let (id, tenant) = (order_id(), tenant());

    let first = create_order(store.clone(), &runs, tenant, id, 4200)
        .await
        .unwrap();
    assert_eq!(first, 1);
    assert_eq!(store.len(), 1);

    let by_uuid = run(&engine, call(4200).key(&id).scope(&tenant), &runs).await;
    assert_eq!(
        by_uuid,
        Outcome::Replayed(1),
        "the attribute's record, replayed"
    );

    let header = id.to_string();
    let scope = tenant.to_string();
    let by_text = run(
        &engine,
        call(4200).key(header.as_str()).scope(&scope),
        &runs,
    )
    .await;
    assert_eq!(
        by_text,
        Outcome::Replayed(1),
        "the header's text is the same key"
    );

    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    assert_eq!(store.len(), 1, "one record for every form of the UUID");
}

#[tokio::test]
async fn a_call_by_uuid_records_and_the_attribute_replays() {
    let store = Arc::new(MemoryStore::new());
    let engine = Idempotency::new(store.clone());
    let runs = AtomicU32::new(0);
    let (id, tenant) = (order_id(), tenant());

    let first = run(&engine, call(4200).key(&id).scope(&tenant), &runs).await;
    assert_eq!(first, Outcome::Executed(1));

    let again = create_order(store.clone(), &runs, tenant, id, 4200)
        .await
        .unwrap();
    assert_eq!(again, 1, "the call's record, replayed by the attribute");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");

    let other_tenant = Uuid::from_u128(1);
    let elsewhere = create_order(store.clone(), &runs, other_tenant, id, 4200)
        .await
        .unwrap();
    assert_eq!(
        elsewhere, 2,
        "the same key in another scope is another operation"
    );
}

#[tokio::test]
async fn the_raw_bytes_of_a_uuid_are_another_operation() {
    let store = Arc::new(MemoryStore::new());
    let engine = Idempotency::new(store.clone());
    let runs = AtomicU32::new(0);
    let (id, tenant) = (order_id(), tenant());

    create_order(store.clone(), &runs, tenant, id, 4200)
        .await
        .unwrap();
    let raw = call(4200).key(id.as_bytes()).scope(tenant.as_bytes());
    assert!(
        !engine.forget(raw).await.unwrap(),
        "nothing is recorded under the raw bytes"
    );
    assert_eq!(run(&engine, raw, &runs).await, Outcome::Executed(2));

    let by_uuid = call(4200).key(&id).scope(&tenant);
    assert!(
        engine.forget(by_uuid).await.unwrap(),
        "the attribute's record"
    );
    assert_eq!(store.len(), 1, "only the raw bytes' record is left");
}
