//! The ledger: what the bodies did and what the callers got, in files outside the store.
//!
//! Each execution appends one line `exec KEY VALUE` to one shared file opened in append mode
//! (one `write` per line, so lines from several processes never interleave); each caller
//! appends `got KEY VALUE` to its process's own file.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn executions(dir: &Path) -> PathBuf {
    dir.join("executions.log")
}

pub fn results(dir: &Path, process: usize) -> PathBuf {
    dir.join(format!("results-{process}.log"))
}

/// Appends one line with a single write.
pub fn append(path: &Path, line: &str) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open a ledger file");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("write a ledger line");
}

pub struct Ledger {
    executed: HashMap<u32, Vec<String>>,
    got: Vec<(u32, String)>,
}

fn parse(line: &str, tag: &str) -> (u32, String) {
    let mut parts = line.splitn(3, ' ');
    assert_eq!(parts.next(), Some(tag), "malformed ledger line {line:?}");
    let key = parts.next().and_then(|k| k.parse().ok()).expect("a key");
    let value = parts.next().expect("a value").to_string();
    (key, value)
}

impl Ledger {
    pub fn read(dir: &Path) -> Ledger {
        let mut executed: HashMap<u32, Vec<String>> = HashMap::new();
        let text = std::fs::read_to_string(executions(dir)).unwrap_or_default();
        for line in text.lines() {
            let (key, value) = parse(line, "exec");
            executed.entry(key).or_default().push(value);
        }
        let mut got = Vec::new();
        for process in 0..crate::PROCESSES {
            let text = std::fs::read_to_string(results(dir, process)).unwrap_or_default();
            got.extend(text.lines().map(|line| parse(line, "got")));
        }
        Ledger { executed, got }
    }

    pub fn assert_exactly_once(&self, keys: u32, callers: usize) {
        let mut twice = Vec::new();
        for key in 0..keys {
            match self.executed.get(&key).map(Vec::len) {
                Some(1) => {}
                Some(n) => twice.push(format!("key {key} executed {n} times")),
                None => twice.push(format!("key {key} never executed")),
            }
        }
        assert!(
            twice.is_empty(),
            "not exactly once for {} of {keys} keys, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
        assert_eq!(
            self.executed.len(),
            keys as usize,
            "executions of unknown keys"
        );
        // Every caller called every key at least once and got the one execution's value.
        assert!(
            self.got.len() >= keys as usize * callers,
            "{} results for {} calls",
            self.got.len(),
            keys as usize * callers
        );
        for (key, value) in &self.got {
            assert_eq!(
                Some(value),
                self.executed[key].first(),
                "a caller of key {key} got a value no execution produced"
            );
        }
    }
}
