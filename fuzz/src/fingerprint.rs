//! The fingerprint serializer on arbitrary values: it never panics, it is deterministic, it
//! ignores the iteration order of hash maps and hash sets, a removed map entry changes it,
//! (outside the documented deviations) it agrees with the value's JSON form, and the value's
//! `CanonicalArguments` agree with its fingerprint.
//!
//! Each input is used twice: parsed as JSON into a `serde_json::Value` when it parses, and
//! as the `arbitrary` source of a value tree with hash maps, hash sets, floats (NaN included),
//! nested options, tuples, bytes, structs and every kind of enum variant.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use idempotent_core::{CanonicalArguments, Fingerprint, Fingerprinter};
use serde::{Serialize, Serializer};

/// Deeper trees only exercise the stack, not the encoding.
const MAX_DEPTH: usize = 48;

#[derive(Arbitrary, Debug, Clone, Serialize)]
enum Node {
    Unit,
    Bool(bool),
    Int(i64),
    Uint(u128),
    Float(f64),
    Single(f32),
    Str(String),
    Char(char),
    Bytes(Bytes),
    Opt(Option<Option<Box<Node>>>),
    Tuple((u8, String, Option<f64>)),
    Seq(Vec<Node>),
    Map(HashMap<String, Node>),
    Sorted(BTreeMap<String, Node>),
    Set(HashSet<String>),
    IntKeys(HashMap<u32, Node>),
    Struct(Box<Record>),
    Newtype(Wrapper),
    Pair(i8, Box<Node>),
    Fields {
        a: Option<Box<Node>>,
        b: BTreeSet<String>,
    },
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
struct Record {
    name: String,
    amount: f64,
    tags: HashSet<String>,
    meta: HashMap<String, Node>,
    maybe: Option<Option<u8>>,
    pair: (i32, String),
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
struct Wrapper(Box<Node>);

/// Serialized with `serialize_bytes`, which the fingerprint treats as a sequence of integers.
#[derive(Arbitrary, Debug, Clone)]
struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

fn fingerprint<T: Serialize + ?Sized>(value: &T) -> Fingerprint {
    // These types' `Serialize` impls never fail, so neither may the fingerprint.
    Fingerprint::of(value).expect("a value whose Serialize impl cannot fail")
}

/// Rebuilds a hash map by inserting its entries in the reverse of its iteration order.
fn reverse_map<K, V>(map: &HashMap<K, V>, mut f: impl FnMut(&V) -> V) -> HashMap<K, V>
where
    K: Clone + Eq + std::hash::Hash,
{
    let mut entries: Vec<_> = map.iter().collect();
    entries.reverse();
    let mut out = HashMap::new();
    for (k, v) in entries {
        out.insert(k.clone(), f(v));
    }
    out
}

fn reverse_set(set: &HashSet<String>) -> HashSet<String> {
    let mut items: Vec<_> = set.iter().cloned().collect();
    items.reverse();
    items.into_iter().collect()
}

impl Node {
    fn depth(&self) -> usize {
        1 + match self {
            Node::Opt(Some(Some(n))) | Node::Pair(_, n) | Node::Newtype(Wrapper(n)) => n.depth(),
            Node::Fields { a: Some(n), .. } => n.depth(),
            Node::Seq(items) => items.iter().map(Node::depth).max().unwrap_or(0),
            Node::Map(m) => m.values().map(Node::depth).max().unwrap_or(0),
            Node::Sorted(m) => m.values().map(Node::depth).max().unwrap_or(0),
            Node::IntKeys(m) => m.values().map(Node::depth).max().unwrap_or(0),
            Node::Struct(r) => r.meta.values().map(Node::depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The same value with every hash map and hash set rebuilt in reverse insertion order.
    fn reversed(&self) -> Node {
        match self {
            Node::Opt(Some(Some(n))) => Node::Opt(Some(Some(Box::new(n.reversed())))),
            Node::Pair(i, n) => Node::Pair(*i, Box::new(n.reversed())),
            Node::Newtype(Wrapper(n)) => Node::Newtype(Wrapper(Box::new(n.reversed()))),
            Node::Fields { a, b } => Node::Fields {
                a: a.as_ref().map(|n| Box::new(n.reversed())),
                b: b.clone(),
            },
            Node::Seq(items) => Node::Seq(items.iter().map(Node::reversed).collect()),
            Node::Map(m) => Node::Map(reverse_map(m, Node::reversed)),
            Node::Sorted(m) => {
                Node::Sorted(m.iter().map(|(k, v)| (k.clone(), v.reversed())).collect())
            }
            Node::IntKeys(m) => Node::IntKeys(reverse_map(m, Node::reversed)),
            Node::Set(s) => Node::Set(reverse_set(s)),
            Node::Struct(r) => Node::Struct(Box::new(Record {
                tags: reverse_set(&r.tags),
                meta: reverse_map(&r.meta, Node::reversed),
                ..(**r).clone()
            })),
            other => other.clone(),
        }
    }

    /// Counts the non-empty maps and sets (the places an entry can be removed from).
    fn removable(&self) -> usize {
        match self {
            Node::Opt(Some(Some(n))) | Node::Pair(_, n) | Node::Newtype(Wrapper(n)) => {
                n.removable()
            }
            Node::Fields { a, b } => {
                usize::from(!b.is_empty()) + a.as_ref().map_or(0, |n| n.removable())
            }
            Node::Seq(items) => items.iter().map(Node::removable).sum(),
            Node::Map(m) => {
                usize::from(!m.is_empty()) + m.values().map(Node::removable).sum::<usize>()
            }
            Node::Sorted(m) => {
                usize::from(!m.is_empty()) + m.values().map(Node::removable).sum::<usize>()
            }
            Node::IntKeys(m) => {
                usize::from(!m.is_empty()) + m.values().map(Node::removable).sum::<usize>()
            }
            Node::Set(s) => usize::from(!s.is_empty()),
            Node::Struct(r) => {
                usize::from(!r.tags.is_empty())
                    + usize::from(!r.meta.is_empty())
                    + r.meta.values().map(Node::removable).sum::<usize>()
            }
            _ => 0,
        }
    }

    /// Removes one entry from the `n`th non-empty map or set (in `removable`'s order).
    fn remove_entry(&mut self, n: &mut usize) -> bool {
        fn here(n: &mut usize, non_empty: bool) -> bool {
            if !non_empty {
                return false;
            }
            if *n == 0 {
                return true;
            }
            *n -= 1;
            false
        }
        match self {
            Node::Opt(Some(Some(node))) | Node::Pair(_, node) | Node::Newtype(Wrapper(node)) => {
                node.remove_entry(n)
            }
            Node::Fields { a, b } => {
                if here(n, !b.is_empty()) {
                    let first = b.iter().next().cloned().unwrap();
                    return b.remove(&first);
                }
                a.as_mut().is_some_and(|node| node.remove_entry(n))
            }
            Node::Seq(items) => items.iter_mut().any(|node| node.remove_entry(n)),
            Node::Map(m) => {
                if here(n, !m.is_empty()) {
                    let first = m.keys().next().cloned().unwrap();
                    return m.remove(&first).is_some();
                }
                m.values_mut().any(|node| node.remove_entry(n))
            }
            Node::Sorted(m) => {
                if here(n, !m.is_empty()) {
                    return m.pop_last().is_some();
                }
                m.values_mut().any(|node| node.remove_entry(n))
            }
            Node::IntKeys(m) => {
                if here(n, !m.is_empty()) {
                    let first = *m.keys().next().unwrap();
                    return m.remove(&first).is_some();
                }
                m.values_mut().any(|node| node.remove_entry(n))
            }
            Node::Set(s) => {
                if here(n, !s.is_empty()) {
                    let first = s.iter().next().cloned().unwrap();
                    return s.remove(&first);
                }
                false
            }
            Node::Struct(r) => {
                if here(n, !r.tags.is_empty()) {
                    let first = r.tags.iter().next().cloned().unwrap();
                    return r.tags.remove(&first);
                }
                if here(n, !r.meta.is_empty()) {
                    let first = r.meta.keys().next().cloned().unwrap();
                    return r.meta.remove(&first).is_some();
                }
                r.meta.values_mut().any(|node| node.remove_entry(n))
            }
            _ => false,
        }
    }

    /// Whether the value avoids every documented deviation from JSON equality (hash sets,
    /// non-finite floats, `f32`, non-string map keys), so its fingerprint must equal that of
    /// its `serde_json::Value`.
    fn json_like(&self) -> bool {
        match self {
            Node::Float(x) => x.is_finite(),
            Node::Single(_) | Node::Set(_) | Node::IntKeys(_) | Node::Struct(_) => false,
            Node::Tuple((_, _, x)) => x.is_none_or(f64::is_finite),
            Node::Opt(Some(Some(n))) | Node::Pair(_, n) | Node::Newtype(Wrapper(n)) => {
                n.json_like()
            }
            Node::Fields { a, .. } => a.as_ref().is_none_or(|n| n.json_like()),
            Node::Seq(items) => items.iter().all(Node::json_like),
            Node::Map(m) => m.values().all(Node::json_like),
            Node::Sorted(m) => m.values().all(Node::json_like),
            _ => true,
        }
    }
}

fn check_node(node: &Node, selector: usize) {
    let first = fingerprint(node);
    // Deterministic: again, through a clone, through the `Fingerprinter`, and through the
    // pointer types the serializer looks through.
    assert_eq!(first, fingerprint(node));
    assert_eq!(first, fingerprint(&node.clone()));
    assert_eq!(first, Fingerprinter::new().push(node).unwrap().finish());
    // The form the in-memory store compares (the encoding itself when short, hashed apart
    // from the fingerprinter) is the same arguments, whatever the hash maps' order.
    let arguments = CanonicalArguments::of(node).unwrap();
    assert_eq!(first, arguments.fingerprint());
    assert_eq!(arguments, CanonicalArguments::from(first));
    assert_eq!(arguments, CanonicalArguments::of(&node.reversed()).unwrap());
    assert_eq!(first, fingerprint(&Box::new(node.clone())));
    assert_eq!(first, fingerprint(&Arc::new(node.clone())));

    // Hash maps and sets built in another insertion order: the same fingerprint.
    let reversed = node.reversed();
    assert_eq!(
        first,
        fingerprint(&reversed),
        "reversed maps/sets changed {node:?}"
    );

    // One entry fewer: another fingerprint.
    let places = node.removable();
    if places > 0 {
        let mut smaller = node.clone();
        assert!(smaller.remove_entry(&mut (selector % places)));
        assert_ne!(
            first,
            fingerprint(&smaller),
            "removing an entry of {node:?} gave {smaller:?}"
        );
    }

    // Outside the documented deviations, the fingerprint is that of the JSON value.
    if node.json_like()
        && let Ok(json) = serde_json::to_value(node)
    {
        assert_eq!(
            first,
            fingerprint(&json),
            "{node:?} differs from its JSON {json}"
        );
    }

    match node {
        // A top-level hash set, by reference and behind each pointer type, in any order.
        Node::Set(set) => {
            let f = fingerprint(set);
            assert_eq!(f, fingerprint(&reverse_set(set)));
            assert_eq!(f, fingerprint(&Box::new(set.clone())));
            assert_eq!(f, fingerprint(&Arc::new(reverse_set(set))));
            assert_eq!(f, fingerprint(&Rc::new(set.clone())));
            assert_eq!(f, fingerprint(&&set));
            // A hash set never equals a sequence of its elements.
            let as_vec: Vec<&String> = set.iter().collect();
            assert_ne!(f, fingerprint(&as_vec));
        }
        // Bytes are the sequence of their integers.
        Node::Bytes(Bytes(bytes)) => {
            assert_eq!(fingerprint(&Bytes(bytes.clone())), fingerprint(bytes))
        }
        _ => {}
    }
}

/// A JSON object rebuilt with its entries inserted in reverse order.
fn reverse_json(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Array(items) => Value::Array(items.iter().map(reverse_json).collect()),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.iter().rev() {
                out.insert(k.clone(), reverse_json(v));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Removes one entry from the `n`th non-empty object.
fn remove_json_entry(value: &mut serde_json::Value, n: &mut usize) -> bool {
    use serde_json::Value;
    match value {
        Value::Array(items) => items.iter_mut().any(|v| remove_json_entry(v, n)),
        Value::Object(map) if !map.is_empty() => {
            if *n == 0 {
                let first = map.keys().next().cloned().unwrap();
                return map.remove(&first).is_some();
            }
            *n -= 1;
            map.values_mut().any(|v| remove_json_entry(v, n))
        }
        _ => false,
    }
}

fn count_json_objects(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Array(items) => items.iter().map(count_json_objects).sum(),
        Value::Object(map) => {
            usize::from(!map.is_empty()) + map.values().map(count_json_objects).sum::<usize>()
        }
        _ => 0,
    }
}

fn check_json(data: &[u8], selector: usize) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let first = fingerprint(&value);
    assert_eq!(first, fingerprint(&value));
    assert_eq!(first, fingerprint(&value.clone()));
    assert_eq!(first, fingerprint(&reverse_json(&value)));
    // The JSON text written back and read again is the same value (serde_json is built with
    // `float_roundtrip`, as the library builds it), with the same fingerprint.
    let again: serde_json::Value =
        serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
    assert_eq!(again, value, "{value} re-read as {again}");
    assert_eq!(first, fingerprint(&again));
    let places = count_json_objects(&value);
    if places > 0 {
        let mut smaller = value.clone();
        assert!(remove_json_entry(&mut smaller, &mut (selector % places)));
        assert_ne!(
            first,
            fingerprint(&smaller),
            "removing an entry of {value} gave {smaller}"
        );
    }
}

/// The `fingerprint` target's checks on one input.
pub fn check_input(data: &[u8]) {
    let selector = data.iter().fold(0usize, |acc, &b| {
        acc.wrapping_mul(31).wrapping_add(b.into())
    });
    check_json(data, selector);

    let mut u = Unstructured::new(data);
    let Ok(node) = Node::arbitrary(&mut u) else {
        return;
    };
    if node.depth() > MAX_DEPTH {
        return;
    }
    let selector = u.arbitrary::<usize>().unwrap_or(selector);
    check_node(&node, selector);
}
