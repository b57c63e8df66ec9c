use idempotent_core::idempotent;
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

#[idempotent]
const LIMIT: u32 = 3;

fn main() {}
