//! Every saved input of every fuzz target, through the target's checks, on the stable
//! toolchain: the seeds in `seeds/<target>/` (committed; there must be some), and when they
//! exist the fuzzer's local `corpus/<target>/` and the inputs it saved in
//! `artifacts/<target>/` (crashes, timeouts). A failure names each failing file.

use std::any::Any;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The regular files of `dir`, sorted; none if `dir` does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())))
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .map(|entry| entry.path())
        .collect();
    files.sort();
    files
}

fn message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)")
}

/// Runs `check` on every saved input of `target`; fails naming every input that panics.
fn replay(target: &str) {
    let check = idempotent_fuzz::TARGETS
        .iter()
        .find_map(|&(name, check)| (name == target).then_some(check))
        .unwrap_or_else(|| panic!("no fuzz target named {target}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = files(&root.join("seeds").join(target));
    assert!(
        !seeds.is_empty(),
        "no seeds in fuzz/seeds/{target}/: the replay would prove nothing"
    );
    let inputs: Vec<PathBuf> = seeds
        .into_iter()
        .chain(files(&root.join("corpus").join(target)))
        .chain(files(&root.join("artifacts").join(target)))
        .collect();

    let mut failures = Vec::new();
    for path in &inputs {
        let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| check(&data))) {
            failures.push(format!("{}: {}", path.display(), message(&*panic)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} inputs of the `{target}` fuzz target fail its checks:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
    println!("{target}: {} inputs pass", inputs.len());
}

#[test]
fn fingerprint_inputs_pass() {
    replay("fingerprint");
}

#[test]
fn stored_record_inputs_pass() {
    replay("stored_record");
}

/// A target added to `TARGETS` without a test above would never be replayed.
#[test]
fn every_target_is_replayed() {
    let names: Vec<&str> = idempotent_fuzz::TARGETS
        .iter()
        .map(|&(name, _)| name)
        .collect();
    assert_eq!(names, ["fingerprint", "stored_record"]);
    for name in names {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz_targets")
            .join(format!("{name}.rs"));
        assert!(binary.is_file(), "no {}", binary.display());
    }
}
