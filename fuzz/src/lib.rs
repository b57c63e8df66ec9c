//! The fuzz targets' checks, as plain functions of one input. `fuzz_targets/<target>.rs`
//! hands them what libFuzzer generates (nightly, `cargo +nightly fuzz run <target>`);
//! `tests/replay.rs` hands them every saved input (the seeds, and any local corpus or
//! crash) on the stable toolchain, so `scripts/test` builds the targets and replays their
//! seeds on every run.
//!
//! A check panics when the input breaks a property; it returns quietly otherwise, including
//! for inputs it cannot use.

mod fingerprint;
mod stored_record;

/// The `fingerprint` target: see `src/fingerprint.rs`.
pub fn fingerprint(data: &[u8]) {
    fingerprint::check_input(data);
}

/// The `stored_record` target: see `src/stored_record.rs`.
pub fn stored_record(data: &[u8]) {
    stored_record::check_input(data);
}

/// A target's checks on one input.
pub type Check = fn(&[u8]);

/// Every target by name, the name being that of its binary and of its directories under
/// `seeds/`, `corpus/` and `artifacts/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("fingerprint", fingerprint),
    ("stored_record", stored_record),
];
