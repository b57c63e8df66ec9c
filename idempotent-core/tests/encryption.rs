//! `EncryptedStore` on every store: the memory store, a SQLite file, and PostgreSQL and Redis
//! servers started here, and the sqlx stores on SQLite and PostgreSQL. A round trip through the engine; rotation; a sealed output copied
//! under another key; a bit flipped in each part of it; a wrong key ring; and the rows and
//! values as Redis and PostgreSQL hold them, read back raw, with no plaintext in them. And
//! `KeyedStore`: keys and fingerprints under a secret, and what becomes of records written
//! before it.
#![cfg(all(
    feature = "encryption",
    feature = "sqlite",
    feature = "postgres",
    feature = "redis"
))]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idempotent_core::encryption::{EncryptedStore, KeyRing, KeyedStore};
use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::stores::sqlite::SqliteStore;
use idempotent_core::{
    Bytes, Call, CanonicalArguments, Claim, Error, Fingerprint, Idempotency, MemoryStore,
    StorageKey, Store, StoreError,
};
use idempotent_test_support::{PostgresServer, RedisServer};

const NAME: &str = "payments::charge";
/// What every recorded output holds: searched for in the raw records.
const SECRET: &str = "4242-card-receipt-visible-to-nobody";
const HOUR: Duration = Duration::from_secs(3600);
/// The arguments of every call but one.
const AMOUNT: u32 = 4200;

fn ring() -> KeyRing {
    KeyRing::new("2026-12", [7; 32]).unwrap()
}

fn engine(store: impl Store + 'static) -> Idempotency {
    Idempotency::new(Arc::new(store))
}

/// A call of `key` whose body counts its runs in `runs` and returns the receipt.
async fn charge(
    engine: &Idempotency,
    key: &str,
    runs: &AtomicUsize,
) -> Result<(String, bool), Error> {
    charge_amount(engine, key, AMOUNT, runs).await
}

/// [`charge`] with another amount: other arguments.
async fn charge_amount(
    engine: &Idempotency,
    key: &str,
    amount: u32,
    runs: &AtomicUsize,
) -> Result<(String, bool), Error> {
    let call = Call::new(NAME, Fingerprint::of(&amount).unwrap()).key(key);
    let outcome = engine
        .run(call, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(format!("{SECRET} for {key}"))
        })
        .await?;
    let replayed = outcome.is_replayed();
    Ok((outcome.into_value(), replayed))
}

fn storage_key(key: &str) -> StorageKey {
    StorageKey::derive(NAME, None, key.as_bytes()).unwrap()
}

/// The sealed output of `key` as the inner store holds it.
async fn sealed(inner: &dyn Store, key: &str) -> Bytes {
    let arguments = CanonicalArguments::from(Fingerprint::of(&AMOUNT).unwrap());
    match inner
        .claim(&storage_key(key), &arguments, HOUR)
        .await
        .unwrap()
    {
        Claim::Completed { output } => output,
        other => panic!("{key} is recorded: {other:?}"),
    }
}

/// Writes `output` under `key` through the inner store, as someone with write access to the
/// store could.
async fn plant(inner: &dyn Store, key: &str, output: Bytes) {
    plant_amount(inner, key, AMOUNT, output).await
}

/// [`plant`], with the fingerprint of `amount` beside the output.
async fn plant_amount(inner: &dyn Store, key: &str, amount: u32, output: Bytes) {
    let storage = storage_key(key);
    inner.remove(&storage).await.unwrap();
    let arguments = CanonicalArguments::from(Fingerprint::of(&amount).unwrap());
    let Claim::Acquired { fence } = inner.claim(&storage, &arguments, HOUR).await.unwrap() else {
        panic!("{key} was removed");
    };
    inner.complete(&storage, fence, output, HOUR).await.unwrap();
}

/// The whole exercise on one store. `raw` reads every recorded value as the store holds it.
async fn exercise(inner: Arc<dyn Store>, raw: impl AsyncFn() -> Vec<Vec<u8>>) {
    let runs = AtomicUsize::new(0);
    let encrypted = engine(EncryptedStore::new(inner.clone(), ring()));

    // Round trip: executed, then replayed, the same value.
    let (first, replayed) = charge(&encrypted, "order-1", &runs).await.unwrap();
    assert!(!replayed);
    let (again, replayed) = charge(&encrypted, "order-1", &runs).await.unwrap();
    assert!(replayed);
    assert_eq!(again, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // No plaintext at rest: the raw read finds the sealed record (its header names the key
    // id), and no receipt in it.
    let values = raw().await;
    assert!(!values.is_empty(), "the raw read finds the record");
    for value in &values {
        assert!(
            contains(value, b"2026-12"),
            "a sealed record: {}",
            String::from_utf8_lossy(value)
        );
        assert!(
            !contains(value, SECRET.as_bytes()),
            "plaintext at rest: {}",
            String::from_utf8_lossy(value)
        );
    }

    // Rotation: a ring with a new key in front still replays what the old one sealed, and seals
    // new records with the new key.
    let rotated = EncryptedStore::new(
        inner.clone(),
        KeyRing::new("2027-06", [9; 32])
            .unwrap()
            .with_old_key("2026-12", [7; 32])
            .unwrap(),
    );
    let rotated = engine(rotated);
    let (old, replayed) = charge(&rotated, "order-1", &runs).await.unwrap();
    assert!(replayed && old == first);
    charge(&rotated, "order-2", &runs).await.unwrap();
    let header = sealed(&*inner, "order-2").await;
    assert_eq!(&header[2..9], b"2027-06", "sealed with the newest key");
    // ... which the old ring alone cannot open: an error, not a run.
    let before = runs.load(Ordering::SeqCst);
    let error = charge(&encrypted, "order-2", &runs).await.unwrap_err();
    assert!(
        matches!(&error, Error::Store(StoreError::Corrupt { message, .. }) if message.contains("\"2027-06\"")),
        "{error:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), before, "the body did not run");

    // A sealed output copied under another key is refused, never replayed.
    let copied = sealed(&*inner, "order-1").await;
    plant(&*inner, "order-3", copied.clone()).await;
    let error = charge(&encrypted, "order-3", &runs).await.unwrap_err();
    assert!(
        matches!(error, Error::Store(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), before);

    // A bit flipped in the nonce, the ciphertext and the tag (under its own key).
    let id_end = 2 + usize::from(copied[1]);
    for (part, at) in [
        ("nonce", id_end + 3),
        ("ciphertext", id_end + 24 + 5),
        ("tag", copied.len() - 2),
    ] {
        let mut altered = copied.to_vec();
        altered[at] ^= 0x10;
        plant(&*inner, "order-1", Bytes::from(altered)).await;
        let error = charge(&encrypted, "order-1", &runs).await.unwrap_err();
        assert!(
            matches!(error, Error::Store(StoreError::Corrupt { .. })),
            "{part}: {error:?}"
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before,
        "no altered record ran a body"
    );

    // A wrong key ring: the right id, another key.
    plant(&*inner, "order-1", copied).await;
    charge(&encrypted, "order-1", &runs).await.unwrap();
    let wrong = engine(EncryptedStore::new(
        inner.clone(),
        KeyRing::new("2026-12", [8; 32]).unwrap(),
    ));
    let error = charge(&wrong, "order-1", &runs).await.unwrap_err();
    assert!(
        matches!(error, Error::Store(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), before);

    // The sealed output left under its key, with the fingerprint of other arguments written
    // beside it: a call with those arguments is refused, where a replay would hand it the
    // output of a call it did not make (and hide that the key was reused).
    let sealed_one = sealed(&*inner, "order-1").await;
    plant_amount(&*inner, "order-1", 1, sealed_one).await;
    let error = charge_amount(&encrypted, "order-1", 1, &runs)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Store(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), before);

    // A plaintext record (written without the wrapper) is refused too: a forger could write one.
    plant(
        &*inner,
        "order-4",
        Bytes::from_static(b"{\"ok\":\"forged\"}"),
    )
    .await;
    let error = charge(&encrypted, "order-4", &runs).await.unwrap_err();
    assert!(
        matches!(error, Error::Store(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), before);

    // The control: the same raw read shows the receipt of a record written without the wrapper.
    inner.remove(&storage_key("order-1")).await.unwrap();
    charge(&engine(inner.clone()), "order-1", &runs)
        .await
        .unwrap();
    let values = raw().await;
    assert!(
        values
            .iter()
            .any(|value| contains(value, SECRET.as_bytes())),
        "the raw read shows a plain record's receipt"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test]
async fn memory() {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let probe = inner.clone();
    // The memory store has no raw form apart from its API: its records, read without the wrapper.
    exercise(inner, async || {
        vec![sealed(&*probe, "order-1").await.to_vec()]
    })
    .await;
}

#[tokio::test]
async fn sqlite() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("sealed.sqlite3");
    let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let raw = async || {
        let connection = rusqlite::Connection::open(&path).unwrap();
        let mut statement = connection
            .prepare("SELECT output FROM idempotent_records WHERE output IS NOT NULL")
            .unwrap();
        statement
            .query_map([], |row| row.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    exercise(inner, raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap();
    let url = server.create_database("sealed");
    let inner: Arc<dyn Store> =
        Arc::new(PostgresStore::builder(url.clone()).build().await.unwrap());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let raw = async || {
        client
            .query(
                "SELECT output FROM idempotent_records WHERE output IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, Vec<u8>>(0))
            .collect()
    };
    exercise(inner, raw).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let store = RedisStore::builder(server.url()).build().unwrap();
    let record_key = store.record_key(&storage_key("order-1"));
    let inner: Arc<dyn Store> = Arc::new(store);
    let raw = async || vec![server.command(&["GET", &record_key]).into_bytes()];
    exercise(inner, raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_reveal_no_testable_key_or_fingerprint_and_earlier_records_are_not_found() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let plain = RedisStore::builder(server.url()).build().unwrap();
    let runs = AtomicUsize::new(0);

    // A record written before the secret was set.
    let (before, replayed) = charge(&engine(plain.clone()), "order-1", &runs)
        .await
        .unwrap();
    assert!(!replayed);

    let keyed = KeyedStore::new(plain.clone(), [42; 32]);
    let keyed_key = plain.record_key(&keyed.keyed(&storage_key("order-1")));
    let keyed = engine(keyed);
    // Not found under the secret: the call runs as a first call, then replays.
    let (_, replayed) = charge(&keyed, "order-1", &runs).await.unwrap();
    assert!(!replayed, "a record written before the secret is not found");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let (_, replayed) = charge(&keyed, "order-1", &runs).await.unwrap();
    assert!(replayed);
    // Nothing else: the earlier record is still there, as it was.
    let (old, replayed) = charge(&engine(plain.clone()), "order-1", &runs)
        .await
        .unwrap();
    assert!(replayed && old == before);
    // Another secret finds neither.
    let other = engine(KeyedStore::new(plain.clone(), [43; 32]));
    let (_, replayed) = charge(&other, "order-1", &runs).await.unwrap();
    assert!(!replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // The store's contents: the plain record carries the testable SHA-256 fingerprint, the
    // keyed one does not, and lives under a key no one can derive without the secret.
    let fingerprint = CanonicalArguments::from(Fingerprint::of(&4200).unwrap())
        .fingerprint()
        .to_hex();
    let plain_record = server.command(&["GET", &plain.record_key(&storage_key("order-1"))]);
    assert!(plain_record.contains(&fingerprint), "{plain_record}");
    let keyed_record = server.command(&["GET", &keyed_key]);
    assert!(
        keyed_record.starts_with("2c"),
        "the keyed record: {keyed_record}"
    );
    assert!(!keyed_record.contains(&fingerprint), "{keyed_record}");
    let unkeyed = storage_key("order-1").to_hex();
    assert!(
        plain.record_key(&storage_key("order-1")).contains(&unkeyed),
        "a plain record's key shows the testable storage key"
    );
    assert!(!keyed_key.contains(&unkeyed), "{keyed_key}");

    // Other arguments under the secret are still a mismatch.
    let call = Call::new(NAME, Fingerprint::of(&9999).unwrap()).key("order-1");
    let error = keyed
        .run(call, async { Ok::<_, Error>("no".to_string()) })
        .await
        .unwrap_err();
    assert!(matches!(error, Error::KeyReused), "{error:?}");

    // With encryption on top: sealed and keyed at once.
    let both = engine(EncryptedStore::new(
        KeyedStore::new(plain, [42; 32]),
        ring(),
    ));
    let (value, replayed) = charge(&both, "order-9", &runs).await.unwrap();
    assert!(!replayed && value.contains(SECRET));
    let (again, replayed) = charge(&both, "order-9", &runs).await.unwrap();
    assert!(replayed && again == value);
}

/// The wrapper seals an output for the arguments its claim was made with, which
/// `Store::complete` is not given: it keeps them until the store answers, so a completion the
/// engine tries again (the first attempt failed, or its answer was lost) seals for the same
/// arguments, and the record replays.
#[tokio::test]
async fn a_completion_tried_again_seals_for_the_claims_arguments() {
    for lost_after_write in [false, true] {
        let inner = support::FlakyComplete::around(MemoryStore::new(), 1, lost_after_write);
        let encrypted = engine(EncryptedStore::new(inner, ring()));
        let runs = AtomicUsize::new(0);
        let (first, replayed) = charge(&encrypted, "order-1", &runs).await.unwrap();
        assert!(!replayed, "lost after write: {lost_after_write}");
        let (again, replayed) = charge(&encrypted, "order-1", &runs).await.unwrap();
        assert!(
            replayed && again == first,
            "lost after write: {lost_after_write}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// A completion of a claim the wrapper did not acquire (another wrapper's) is refused with an
/// error that says why, and nothing is written: the wrapper cannot tell what to seal it for.
#[tokio::test]
async fn a_claim_acquired_through_another_wrapper_is_not_completed_through_this_one() {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let claiming = EncryptedStore::new(inner.clone(), ring());
    let completing = EncryptedStore::new(inner.clone(), ring());
    let arguments = CanonicalArguments::from(Fingerprint::of(&AMOUNT).unwrap());
    let Claim::Acquired { fence } = claiming
        .claim(&storage_key("order-1"), &arguments, HOUR)
        .await
        .unwrap()
    else {
        panic!("a new key is acquired");
    };
    let error = completing
        .complete(
            &storage_key("order-1"),
            fence,
            Bytes::from_static(b"1"),
            HOUR,
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("did not acquire"), "{error}");
    assert!(matches!(
        claiming
            .complete(
                &storage_key("order-1"),
                fence,
                Bytes::from_static(b"1"),
                HOUR
            )
            .await,
        Ok(idempotent_core::FencedWrite::Applied)
    ));
}

/// The sqlx stores behind the wrapper: the same exercise, the rows read back through the
/// store's own pool.
#[cfg(feature = "sqlx-sqlite")]
#[tokio::test]
async fn sqlx_sqlite() {
    use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};

    let folder = tempfile::tempdir().unwrap();
    let pool = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(folder.path().join("sealed.sqlite3"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal),
    )
    .await
    .unwrap();
    let store = SqlxSqliteStore::builder(pool.clone())
        .build()
        .await
        .unwrap();
    let raw = async || {
        sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT output FROM idempotent_records WHERE output IS NOT NULL",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    exercise(Arc::new(store), raw).await;
}

#[cfg(feature = "sqlx-postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_postgres() {
    use idempotent_core::stores::sqlx_postgres::SqlxPgStore;

    let server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap();
    let url = server.create_database("sealed_sqlx");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let store = SqlxPgStore::builder(pool.clone()).build().await.unwrap();
    let raw = async || {
        sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT output FROM idempotent_records WHERE output IS NOT NULL",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    exercise(Arc::new(store), raw).await;
    drop(server);
}
