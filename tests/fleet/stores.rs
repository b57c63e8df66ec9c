//! The stores the fleet tests run against, chosen by name in child processes.

use std::sync::Arc;

use idempotent_core::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    #[cfg(feature = "redis")]
    Redis,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "redis")]
            Kind::Redis => "redis",
        }
    }

    pub fn from_name(name: &str) -> Kind {
        match name {
            #[cfg(feature = "redis")]
            "redis" => Kind::Redis,
            other => panic!("unknown store kind {other:?}"),
        }
    }
}

/// Connects to the store; must run inside a Tokio runtime.
pub async fn connect(kind: Kind, url: &str) -> Arc<dyn Store> {
    match kind {
        #[cfg(feature = "redis")]
        Kind::Redis => Arc::new(
            idempotent_core::stores::redis::RedisStore::builder(url)
                .build()
                .expect("a valid Redis URL"),
        ),
    }
}

/// The fence of the record under `key` (of `crate::child::NAME`), read straight from the
/// store's storage, beside the protocol.
pub async fn current_fence(kind: Kind, url: &str, key: &str) -> u64 {
    let storage_key = crate::child::storage_key(key);
    match kind {
        #[cfg(feature = "redis")]
        Kind::Redis => {
            let store = idempotent_core::stores::redis::RedisStore::builder(url)
                .build()
                .expect("a valid Redis URL");
            let client = redis::Client::open(url).expect("a valid Redis URL");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let fence: String = redis::cmd("HGET")
                .arg(store.record_key(&storage_key))
                .arg("fence")
                .query_async(&mut connection)
                .await
                .expect("the record has a fence");
            fence.parse().expect("a numeric fence")
        }
    }
}
