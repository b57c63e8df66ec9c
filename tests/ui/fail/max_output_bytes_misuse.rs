use idempotent_core::idempotent;

#[idempotent(key = id, max_output_bytes = 0)]
async fn zero(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

#[idempotent(key = id, max_output_bytes = "64KiB")]
async fn not_a_number(id: u64) -> Result<u64, idempotent_core::Error> {
    Ok(id)
}

fn main() {}
