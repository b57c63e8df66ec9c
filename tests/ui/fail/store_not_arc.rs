use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct AppError(idempotent_core::Error);
impl From<idempotent_core::Error> for AppError {
    fn from(error: idempotent_core::Error) -> Self {
        AppError(error)
    }
}

pub struct Service {
    store: idempotent_core::MemoryStore,
}

impl Service {
    #[idempotent(key = id, store = self.store)]
    async fn charge(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

fn main() {}
