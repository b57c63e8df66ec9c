//! The fingerprint serializer on arbitrary values; the checks are in `src/fingerprint.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| idempotent_fuzz::fingerprint(data));
