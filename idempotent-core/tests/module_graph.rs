//! The crate's modules depend on each other one way only: the attribute's runtime on the
//! engine, the engine on the store protocol, the stores on the protocol, and nothing back.
//! An import cycle makes a module impossible to change (or test, or read) without the others,
//! which is how a second protocol driver once grew inside the PostgreSQL store.
//!
//! This test reads `src/` and builds the graph of `crate::` paths between modules: each
//! top-level module is a node, and each store under `stores/` is a node of its own. Paths in
//! comments and in the `#[cfg(test)] mod tests` at the end of a file do not count (a unit test
//! may use anything). Names the crate root re-exports (`crate::Outcome`) count as the module
//! that defines them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph_of(&src);
    assert!(
        graph.contains_key("engine") && graph.contains_key("stores::memory"),
        "the graph was not read: {graph:?}"
    );
    let cycles = cycles(&graph);
    assert!(
        cycles.is_empty(),
        "modules of idempotent-core import each other in a cycle: {cycles:?}\nthe graph: {graph:#?}"
    );
}

/// The checker sees a cycle where there is one (so the test above can fail).
#[test]
fn a_cycle_is_found() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
    graph.get_mut("c").unwrap().remove("a");
    assert!(cycles(&graph).is_empty());
}

/// The node a file belongs to: `engine.rs` and `engine/x.rs` are `engine`; `stores/redis.rs`
/// and `stores/redis/x.rs` are `stores::redis`; `lib.rs` is none.
fn node_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [lib] if lib == "lib" => None,
        [stores, store, ..] if stores == "stores" && store != "mod" => {
            Some(format!("stores::{store}"))
        }
        [first, ..] => Some(first.clone()),
        [] => None,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// What a file says, without comments and without its unit tests.
fn code_of(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("a source file is readable");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers after each occurrence of `prefix` (`crate::engine::Call` → `engine`,
/// `Call`), and after the braces of a grouped import (`crate::{engine, key}`).
fn paths_after(code: &str, prefix: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let item = item.trim();
                let first = ident(item);
                let second = item
                    .strip_prefix(first.as_str())
                    .and_then(|s| s.strip_prefix("::"))
                    .map(ident);
                if !first.is_empty() {
                    found.push((first, second));
                }
            }
            continue;
        }
        let first = ident(rest);
        let second = rest[first.len()..].strip_prefix("::").map(ident);
        if !first.is_empty() {
            found.push((first, second));
        }
    }
    found
}

/// Where the crate root's `pub use module::{Name, ..}` re-exports come from.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut reexports = BTreeMap::new();
    for statement in lib.split(';') {
        let statement = statement.trim();
        let Some(path) = statement.strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim();
        let (module, names) = match path.find("::{") {
            Some(at) => (&path[..at], &path[at + 3..path.len() - 1]),
            None => match path.rfind("::") {
                Some(at) => (&path[..at], &path[at + 2..]),
                None => continue,
            },
        };
        let module = match module.strip_prefix("stores::") {
            Some(store) => format!("stores::{}", store.split("::").next().unwrap_or(store)),
            None => module.to_string(),
        };
        for name in names.split(',') {
            let name = name.trim();
            if !name.is_empty() {
                reexports.insert(name.to_string(), module.clone());
            }
        }
    }
    reexports
}

fn graph_of(src: &Path) -> Graph {
    let lib = code_of(&src.join("lib.rs"));
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for path in files {
        let relative = path.strip_prefix(src).expect("below src/");
        let Some(node) = node_of(relative) else {
            continue;
        };
        let code = code_of(&path);
        let mut targets = BTreeSet::new();
        for (first, second) in paths_after(&code, "crate::") {
            let target = if first == "stores" {
                match second {
                    Some(store) if !store.is_empty() => format!("stores::{store}"),
                    _ => continue,
                }
            } else if let Some(module) = reexports.get(&first) {
                module.clone()
            } else {
                first
            };
            targets.insert(target);
        }
        // `super::x` in a store's own file (`stores/redis.rs`) names a sibling under `stores/`.
        let depth = relative.components().count();
        if node.starts_with("stores::") && depth == 2 {
            for (first, _) in paths_after(&code, "super::") {
                targets.insert(format!("stores::{first}"));
            }
        }
        targets.remove(&node);
        // Macro-internal names (`crate::__private`, `crate::__conformance_tests`) are not modules.
        targets.retain(|target| !target.starts_with("__") && target != "self");
        graph.entry(node).or_default().extend(targets);
    }
    graph
}

/// The strongly connected components of more than one node (Tarjan), each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(state: &mut State<'g>, node: &'g str) {
        let next = state.index.len();
        state.index.insert(node, next);
        state.low.insert(node, next);
        state.stack.push(node);
        state.on_stack.insert(node);
        for target in state.graph.get(node).into_iter().flatten() {
            let target = target.as_str();
            if !state.index.contains_key(target) {
                visit(state, target);
                let low = state.low[node].min(state.low[target]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(target) {
                let low = state.low[node].min(state.index[target]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member.to_string());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}
