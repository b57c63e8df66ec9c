use std::sync::Arc;
use std::time::Duration;

use idempotent_core::{MemoryStore, Store, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub enum PaymentError {
    Declined,
    Idempotency(String),
}

impl From<idempotent_core::Error> for PaymentError {
    fn from(error: idempotent_core::Error) -> Self {
        PaymentError::Idempotency(error.to_string())
    }
}

pub struct Pool;

#[derive(Serialize)]
pub struct User {
    pub tenant_id: String,
}

pub struct Service {
    store: Arc<dyn Store>,
    ttl: Duration,
}

impl Service {
    #[idempotent(
        key = order_id,
        ttl = self.ttl,
        lease = "10s",
        store = self.store,
        skip(db),
        scope = user.tenant_id,
        name = "checkout.v1",
        on_conflict = "reject",
        cache_errors,
        crate = ::idempotent_core,
    )]
    pub async fn checkout(
        &self,
        order_id: u64,
        db: &Pool,
        user: &User,
    ) -> Result<String, PaymentError> {
        let _ = db;
        Ok(format!("{order_id} for {}", user.tenant_id))
    }
}

#[idempotent(ttl = Duration::from_secs(60), lease = "1s 500ms", on_conflict = "wait")]
async fn keyed_by_arguments(a: u32, b: Vec<String>) -> Result<u32, PaymentError> {
    Ok(a + b.len() as u32)
}

fn main() {
    let service = Service {
        store: Arc::new(MemoryStore::new()),
        ttl: Duration::from_secs(3600),
    };
    let _ = service.checkout(1, &Pool, &User { tenant_id: "t".into() });
    let _ = keyed_by_arguments(1, vec![]);
}
