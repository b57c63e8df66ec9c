use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

pub struct Service {
    store: idempotent_core::MemoryStore,
}

impl Service {
    #[idempotent(key = id, store = self.store)]
    async fn charge(&self, id: u64) -> Result<u64, idempotent_core::Error> {
        Ok(id)
    }
}

fn main() {}
