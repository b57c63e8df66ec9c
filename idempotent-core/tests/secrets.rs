//! No secret reaches an error, its sources, or a `Debug` string: passwords in connection
//! strings (with URL-special characters, escaped or not), and recorded values in decode errors.

use std::sync::Arc;
use std::time::Duration;

use idempotent_core::{
    Call, CanonicalArguments, Claim, Fingerprint, Idempotency, MemoryStore, Store,
};

/// Everything a log could show of an error: its message, its `Debug`, and each source's.
fn everything_shown(error: &(dyn std::error::Error + 'static)) -> String {
    let mut shown = format!("{error} | {error:?}");
    let mut source = error.source();
    while let Some(inner) = source {
        shown.push_str(&format!(" | {inner} | {inner:?}"));
        source = inner.source();
    }
    shown
}

/// Passwords with URL-special characters, raw and percent-encoded, and what of each must not
/// show.
#[cfg(any(feature = "redis", feature = "postgres"))]
const PASSWORDS: [(&str, &str); 3] = [
    ("p@ss:w/rd#?&=", "p@ss"),
    ("p%40ss%3Aw%2Frd%23", "p%40ss"),
    ("s3cret-T0ken", "s3cret"),
];

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_urls_show_no_password() {
    use idempotent_core::stores::redis::RedisStore;
    for (password, secret) in PASSWORDS {
        // A valid URL: the builder's Debug must mask it.
        let url = format!("redis://admin:{password}@127.0.0.1:6379/0");
        let debug = format!("{:?}", RedisStore::builder(url.as_str()));
        assert!(
            !debug.contains(secret),
            "builder Debug shows the password: {debug}"
        );
        assert!(debug.contains("admin:***@127.0.0.1"), "{debug}");
        // An invalid one: the error must mask it.
        let url = format!("redis://admin:{password}@127.0.0.1:notaport/0");
        let error = RedisStore::builder(url.as_str()).build().unwrap_err();
        let shown = everything_shown(&error);
        assert!(
            !shown.contains(secret),
            "the error shows the password: {shown}"
        );
        assert!(shown.contains("admin:***@"), "{shown}");
    }
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_urls_show_no_password() {
    use idempotent_core::stores::postgres::PostgresStore;
    for (password, secret) in PASSWORDS {
        for url in [
            format!("postgres://app:{password}@127.0.0.1:5432/shop"),
            format!("host=127.0.0.1 user=app password='{password}' dbname=shop"),
        ] {
            let debug = format!("{:?}", PostgresStore::builder(url.as_str()));
            assert!(
                !debug.contains(secret),
                "builder Debug shows the password: {debug}"
            );
        }
        for url in [
            format!("postgres://app:{password}@127.0.0.1:notaport/shop"),
            format!("host=127.0.0.1 user=app password='{password}' port=notaport"),
        ] {
            let error = PostgresStore::builder(url.as_str())
                .timeout(Duration::from_millis(200))
                .build()
                .await
                .unwrap_err();
            let shown = everything_shown(&error);
            assert!(
                !shown.contains(secret),
                "the error shows the password: {shown}"
            );
        }
    }
}

#[tokio::test]
async fn decode_errors_quote_no_recorded_value() {
    let store = Arc::new(MemoryStore::new());
    let engine = Idempotency::new(store.clone());
    let call = Call::new("billing::card", Fingerprint::of(&1).unwrap()).key("order-1");
    engine
        .run(call, async {
            Ok::<_, idempotent_core::Error>("4111111111111111".to_string())
        })
        .await
        .unwrap();
    let key = call.storage_key().unwrap();
    let fingerprint = Fingerprint::of(&1).unwrap();
    assert!(matches!(
        store
            .claim(
                &key,
                &CanonicalArguments::from(fingerprint),
                Duration::from_secs(1)
            )
            .await
            .unwrap(),
        Claim::Completed { .. }
    ));
    // The same key read as another type: the recorded string does not decode as a number.
    let error = engine
        .run(call, async { Ok::<u64, idempotent_core::Error>(0) })
        .await
        .unwrap_err();
    assert!(
        matches!(error, idempotent_core::Error::Decode(_)),
        "{error:?}"
    );
    let shown = everything_shown(&error);
    assert!(
        !shown.contains("4111"),
        "the error quotes the recorded value: {shown}"
    );
    assert!(shown.contains("line 1"), "it still says where: {shown}");
}
