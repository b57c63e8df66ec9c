//! Decoding a completed record's output (`{"ok": v}`, or `{"err": e}` with `cache_errors`)
//! from arbitrary bytes, as a replay does: never a panic, only `Ok` or `Err`; what decodes
//! re-encodes to bytes that decode to the same value, and re-encoding is stable.
//!
//! The store row decoders (`Reply::parse` for Redis, `judge_claim` for PostgreSQL,
//! `Record::from_row` for SQLite) are private to their modules and take driver types, so they
//! are not reached from here.

use std::fmt::Debug;

use idempotent_core::__hooks::decode_recorded_output;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A typical recorded output.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Payment {
    id: String,
    cents: u64,
    lines: Vec<String>,
    note: Option<String>,
    parent: Option<u64>,
}

/// A typical recorded error (`cache_errors`).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum PayError {
    Declined { reason: String },
    Insufficient(u64),
    Timeout,
}

/// The recorded form, as `idempotent-core/src/recorded.rs` writes it (its unit tests pin
/// `{"ok":7}` and `{"err":"declined"}`).
#[derive(Serialize)]
enum Encode<'a, T, E> {
    #[serde(rename = "ok")]
    Ok(&'a T),
    #[serde(rename = "err")]
    Err(&'a E),
}

fn encode<T: Serialize, E: Serialize>(result: &Result<T, E>) -> Vec<u8> {
    let envelope = match result {
        Ok(value) => Encode::<T, E>::Ok(value),
        Err(error) => Encode::Err(error),
    };
    serde_json::to_vec(&envelope).expect("a decoded value re-encodes")
}

/// Decodes `bytes` as an output of `Result<T, E>`, with and without `cache_errors`, and
/// checks the two agree and that a decoded result round-trips.
fn check<T, E>(bytes: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
    E: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let cached = decode_recorded_output::<T, E>(bytes, true);
    let ok_only = decode_recorded_output::<T, E>(bytes, false);

    // Without `cache_errors` only `{"ok": v}` decodes, to the same `v`.
    match (&ok_only, &cached) {
        (Ok(Ok(a)), Ok(Ok(b))) => assert_eq!(a, b),
        (Ok(Err(_)), _) => panic!("an Err decoded without cache_errors"),
        (Ok(Ok(_)), _) => panic!("ok-only decoded but cache_errors did not: {cached:?}"),
        (Err(_), Ok(Ok(v))) => panic!("cache_errors decoded Ok({v:?}) but ok-only did not"),
        (Err(_), _) => {}
    }

    let Ok(result) = cached else { return };

    // What decoded is exactly a one-entry object tagged "ok" or "err".
    let json: serde_json::Value = serde_json::from_slice(bytes).expect("decoded bytes are JSON");
    let object = json.as_object().expect("decoded bytes are an object");
    assert_eq!(object.len(), 1, "{json}");
    assert!(
        object.contains_key(if result.is_ok() { "ok" } else { "err" }),
        "{json}"
    );

    // Round trip: re-encoded, it decodes to the same result, and re-encodes identically.
    let encoded = encode(&result);
    let again = decode_recorded_output::<T, E>(&encoded, true).unwrap_or_else(|e| {
        panic!(
            "re-encoded {} does not decode: {e}",
            String::from_utf8_lossy(&encoded)
        )
    });
    // Exact, floats included: serde_json's float_roundtrip (enabled for the library) reads
    // back the very bits it wrote. Without it, this found floats replayed one ULP off.
    assert!(
        result == again,
        "round trip changed the value: {} became {} (via {})",
        serde_json::to_value(&result).unwrap(),
        serde_json::to_value(&again).unwrap(),
        String::from_utf8_lossy(&encoded)
    );
    assert_eq!(encoded, encode(&again));
    if again.is_ok() {
        let replayed =
            decode_recorded_output::<T, E>(&encoded, false).expect("ok-only decodes {\"ok\": v}");
        assert_eq!(again, replayed);
    }
}

/// The `stored_record` target's checks on one input.
pub fn check_input(data: &[u8]) {
    // Every input is tried as the output of several return types, as replays of functions
    // with those types would decode it.
    check::<serde_json::Value, serde_json::Value>(data);
    check::<Payment, PayError>(data);
    check::<Vec<Option<String>>, String>(data);
    check::<(u64, f64, bool), ()>(data);
    check::<f64, i64>(data);
}
