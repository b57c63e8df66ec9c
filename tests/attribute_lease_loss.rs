//! `on_lease_loss = "cancel"` on a real call: a body whose renewal is fenced (an operator
//! purged its record and another caller claimed the key) is dropped at its next heartbeat, and
//! the call returns `Error::LeaseLost`; `CallContext` is there inside the body.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::{
    CallContext, CanonicalArguments, Claim, Error, Fingerprint, MemoryStore, Store, idempotent,
};

struct Shop {
    store: Arc<dyn Store>,
    seen: Mutex<Option<CallContext>>,
}

impl Shop {
    #[idempotent(key = order, lease = "300ms", on_lease_loss = "cancel", store = self.store, name = "shop.charge")]
    async fn charge(&self, order: &str) -> Result<String, Error> {
        *self.seen.lock().unwrap() = CallContext::current();
        std::future::pending::<()>().await;
        unreachable!()
    }

    #[idempotent(key = order, lease = "300ms", store = self.store, name = "shop.charge")]
    async fn charge_on_regardless(&self, order: &str) -> Result<String, Error> {
        *self.seen.lock().unwrap() = CallContext::current();
        std::future::pending::<()>().await;
        unreachable!()
    }
}

/// Starts a call, waits until its body runs, then purges the record and claims the key
/// elsewhere; returns what became of the call within about three leases.
async fn fence_out(shop: Arc<Shop>, cancel: bool) -> Option<Result<String, Error>> {
    let call = {
        let shop = Arc::clone(&shop);
        tokio::spawn(async move {
            if cancel {
                shop.charge("order-7").await
            } else {
                shop.charge_on_regardless("order-7").await
            }
        })
    };
    let context = loop {
        if let Some(context) = *shop.seen.lock().unwrap() {
            break context;
        }
        tokio::task::yield_now().await;
    };
    let key = context.storage_key();
    assert!(shop.store.remove(&key).await.unwrap());
    let claim = shop
        .store
        .claim(
            &key,
            &CanonicalArguments::from(Fingerprint::of("other").unwrap()),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }), "{claim:?}");
    let ended = tokio::time::timeout(Duration::from_secs(1), call).await;
    ended.ok().map(|joined| joined.unwrap())
}

fn shop() -> Arc<Shop> {
    Arc::new(Shop {
        store: Arc::new(MemoryStore::new()),
        seen: Mutex::new(None),
    })
}

#[tokio::test]
async fn a_fenced_body_is_cancelled_with_on_lease_loss_cancel() {
    let ended = fence_out(shop(), true).await;
    assert!(
        matches!(ended, Some(Err(Error::LeaseLost))),
        "the body must be dropped at its first fenced renewal: {ended:?}"
    );
}

#[tokio::test]
async fn without_the_option_a_fenced_body_runs_on() {
    let ended = fence_out(shop(), false).await;
    assert!(ended.is_none(), "the body runs on: {ended:?}");
}
