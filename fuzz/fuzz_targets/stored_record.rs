//! Decoding a completed record's output from arbitrary bytes; the checks are in
//! `src/stored_record.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| idempotent_fuzz::stored_record(data));
