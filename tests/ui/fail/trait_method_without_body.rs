use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

trait Payments {
    #[idempotent(key = id)]
    async fn charge(&self, id: u64) -> Result<u64, idempotent_core::Error>;
}

fn main() {}
