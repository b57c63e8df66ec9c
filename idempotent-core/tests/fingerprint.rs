//! Behaviour of the public fingerprint API, including across processes.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::error::Error;
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;

use idempotent_core::{
    CanonicalArguments, Fingerprint, FingerprintError, Fingerprinter, MAX_EXACT_ARGUMENTS,
};
use proptest::prelude::*;
use serde::ser::{Error as _, SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::json;

type TestResult = Result<(), Box<dyn Error>>;

fn fp<T: Serialize + ?Sized>(value: &T) -> Fingerprint {
    match Fingerprint::of(value) {
        Ok(fingerprint) => fingerprint,
        Err(error) => panic!("fingerprinting failed: {error}"),
    }
}

// ---------------------------------------------------------------------------
// Values whose maps and sets iterate in a per-instance random order.

const ELEMENTS: u32 = 50;

#[derive(Serialize)]
struct Call {
    counts: HashMap<String, u32>,
    tags: HashSet<String>,
    nested: HashMap<String, HashMap<String, Vec<u32>>>,
    groups: Vec<HashSet<u32>>,
    label: Option<String>,
}

/// The same logical value every time; `reverse` flips insertion order and
/// every collection gets a fresh `RandomState`, so iteration orders differ.
fn build_call(reverse: bool) -> Call {
    let mut ids: Vec<u32> = (0..ELEMENTS).collect();
    if reverse {
        ids.reverse();
    }
    let mut counts = HashMap::with_hasher(RandomState::new());
    let mut tags = HashSet::with_hasher(RandomState::new());
    let mut nested = HashMap::with_hasher(RandomState::new());
    for &id in &ids {
        counts.insert(format!("key-{id}"), id * 7);
        tags.insert(format!("tag-{id}"));
        nested
            .entry(format!("outer-{}", id % 10))
            .or_insert_with(|| HashMap::with_hasher(RandomState::new()))
            .insert(format!("inner-{id}"), vec![id, id % 3]);
    }
    let groups = (0..3)
        .map(|g| {
            let mut set = HashSet::with_hasher(RandomState::new());
            set.extend(ids.iter().map(|id| id * 3 + g));
            set
        })
        .collect();
    Call {
        counts,
        tags,
        nested,
        groups,
        label: Some("transfer".to_owned()),
    }
}

fn tag_order(call: &Call) -> String {
    call.tags
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn equal_values_with_different_iteration_orders_have_equal_fingerprints() {
    let first = build_call(false);
    let second = build_call(true);
    let first_keys: Vec<_> = first.counts.keys().collect();
    let second_keys: Vec<_> = second.counts.keys().collect();
    assert!(
        first_keys != second_keys || tag_order(&first) != tag_order(&second),
        "iteration orders happen to match; the test would prove nothing"
    );
    assert_eq!(fp(&first), fp(&second));

    let mut changed = build_call(true);
    changed.tags.insert("one-more".to_owned());
    assert_ne!(fp(&first), fp(&changed));
}

// ---------------------------------------------------------------------------
// Cross-process: a child run of this binary has other RandomState seeds.

const CHILD_ENV: &str = "SCRATCH_FINGERPRINT_CROSS_PROCESS_CHILD";
const CHILD_MARKER: &str = "fingerprint-child:";

/// The child process of `cross_process_fingerprints_agree`, which runs it with `--ignored`;
/// run any other way it has nothing to check, so it is ignored rather than passing vacuously.
#[test]
#[ignore = "a child process of cross_process_fingerprints_agree, which runs it"]
fn cross_process_child() -> Result<(), FingerprintError> {
    if std::env::var_os(CHILD_ENV).is_none() {
        return Ok(());
    }
    let call = build_call(true);
    println!(
        "{CHILD_MARKER}{} {}",
        Fingerprint::of(&call)?,
        tag_order(&call)
    );
    Ok(())
}

#[test]
fn cross_process_fingerprints_agree() -> TestResult {
    let output = Command::new(std::env::current_exe()?)
        .args(["cross_process_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    assert!(output.status.success(), "child failed:\n{stdout}");
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix(CHILD_MARKER))
        .ok_or_else(|| format!("child printed no fingerprint:\n{stdout}"))?;
    let (child_hex, child_order) = line.split_once(' ').ok_or("malformed child line")?;

    let call = build_call(false);
    assert_ne!(
        child_order,
        tag_order(&call),
        "both processes iterate alike; the test would prove nothing"
    );
    assert_eq!(child_hex, fp(&call).to_hex());
    Ok(())
}

// ---------------------------------------------------------------------------
// Equal and different values.

#[derive(Serialize)]
enum E {
    A,
    B,
    N(u32),
    T(u32, u32),
    S { a: u32, b: u32 },
}

#[derive(Serialize)]
struct Point {
    x: u32,
    y: u32,
}

#[derive(Serialize)]
struct Unit;

#[derive(Serialize)]
struct Wrapper(u32);

#[derive(Serialize)]
struct Optional {
    a: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    b: Option<u32>,
}

struct Bytes(&'static [u8]);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Asserts equal fingerprints and, as the module promises, equal JSON.
fn assert_equal_like_json<A: Serialize + ?Sized, B: Serialize + ?Sized>(what: &str, a: &A, b: &B) {
    assert_eq!(
        serde_json::to_value(a).ok(),
        serde_json::to_value(b).ok(),
        "{what}: JSON differs"
    );
    assert_eq!(fp(a), fp(b), "{what}: fingerprints differ");
}

#[test]
fn values_with_equal_json_have_equal_fingerprints() {
    assert_equal_like_json("u8 vs i64", &1u8, &1i64);
    assert_equal_like_json("u128 vs i128", &1u128, &1i128);
    assert_equal_like_json("i8 vs i64", &-5i8, &-5i64);
    assert_equal_like_json("u64 max vs u128", &u64::MAX, &u128::from(u64::MAX));
    assert_equal_like_json("char vs str", &'a', "a");
    assert_equal_like_json("String vs str", &"a".to_owned(), "a");
    assert_equal_like_json("Some(v) vs v", &Some(5), &5);
    assert_equal_like_json("Some(None) vs None", &Some(None::<u8>), &None::<u8>);
    assert_equal_like_json("unit vs None", &(), &None::<u8>);
    assert_equal_like_json("unit struct vs null", &Unit, &json!(null));
    assert_equal_like_json(
        "struct vs map",
        &Point { x: 1, y: 2 },
        &json!({"y": 2, "x": 1}),
    );
    assert_equal_like_json(
        "struct vs BTreeMap",
        &Point { x: 1, y: 2 },
        &BTreeMap::from([("x", 1), ("y", 2)]),
    );
    assert_equal_like_json("unit variant vs str", &E::A, "A");
    assert_equal_like_json("newtype variant vs map", &E::N(1), &json!({"N": 1}));
    assert_equal_like_json("tuple variant vs map", &E::T(1, 2), &json!({"T": [1, 2]}));
    assert_equal_like_json(
        "struct variant vs map",
        &E::S { a: 1, b: 2 },
        &json!({"S": {"b": 2, "a": 1}}),
    );
    assert_equal_like_json("newtype struct vs inner", &Wrapper(5), &5);
    assert_equal_like_json("tuple vs array", &(1, "a"), &json!([1, "a"]));
    assert_equal_like_json("array vs slice", &[1, 2], &vec![1u64, 2][..]);
    assert_equal_like_json("bytes vs Vec<u8>", &Bytes(b"ab"), &vec![97u8, 98]);
    assert_equal_like_json("empty bytes vs []", &Bytes(b""), &json!([]));
    assert_equal_like_json("f32 vs f64", &1.5f32, &1.5f64);
    assert_equal_like_json(
        "skipped field",
        &Optional { a: 1, b: None },
        &json!({"a": 1}),
    );
    assert_equal_like_json(
        "HashMap vs BTreeMap",
        &HashMap::from([("a", 1), ("b", 2)]),
        &BTreeMap::from([("b", 2), ("a", 1)]),
    );

    // JSON cannot write NaN; every NaN is one canonical NaN instead.
    assert_eq!(fp(&f64::NAN), fp(&-f64::NAN));
    assert_eq!(fp(&f64::NAN), fp(&f32::NAN));
    assert_eq!(fp(&f64::NAN), fp(&f64::from_bits(0x7ff0_0000_0000_0001)));
}

#[test]
fn different_values_have_different_fingerprints() {
    let pairs: Vec<(&str, Fingerprint, Fingerprint)> = vec![
        ("string framing", fp(&["ab", "c"]), fp(&["a", "bc"])),
        // 0x05 is the string tag: without length prefixes these would match.
        (
            "tag byte inside a string",
            fp(&["a\u{5}b"]),
            fp(&["a", "b"]),
        ),
        ("string vs integer", fp("1"), fp(&1)),
        ("integer vs float", fp(&1), fp(&1.0)),
        ("sequence order", fp(&[1, 2]), fp(&[2, 1])),
        ("None vs Some(0)", fp(&None::<u32>), fp(&Some(0))),
        ("map value", fp(&json!({"a": 1})), fp(&json!({"a": 2}))),
        (
            "map key vs value",
            fp(&json!({"a": "b"})),
            fp(&json!({"b": "a"})),
        ),
        (
            "map values swapped",
            fp(&json!({"a": 1, "b": 2})),
            fp(&json!({"a": 2, "b": 1})),
        ),
        (
            "struct fields swapped",
            fp(&Point { x: 1, y: 2 }),
            fp(&Point { x: 2, y: 1 }),
        ),
        ("unit variants", fp(&E::A), fp(&E::B)),
        ("newtype variant vs value", fp(&E::N(1)), fp(&1)),
        ("tuple variant vs pair", fp(&E::T(1, 2)), fp(&("T", [1, 2]))),
        (
            "empty map vs empty seq",
            fp(&BTreeMap::<u8, u8>::new()),
            fp(&Vec::<u8>::new()),
        ),
        (
            "map vs pair list",
            fp(&json!({"a": "b"})),
            fp(&json!(["a", "b"])),
        ),
        ("zero vs negative zero", fp(&0.0), fp(&-0.0)),
        ("bool vs integer", fp(&true), fp(&1)),
        ("null vs false", fp(&()), fp(&false)),
        ("empty string vs null", fp(""), fp(&())),
        ("empty string vs empty seq", fp(""), fp(&Vec::<u8>::new())),
        ("nesting", fp(&json!([[1], [2]])), fp(&json!([[1, 2]]))),
        ("nesting depth", fp(&json!([])), fp(&json!([[]]))),
        (
            "nesting shape",
            fp(&json!([1, [2, 3]])),
            fp(&json!([[1, 2], 3])),
        ),
        (
            "nested vs flat map",
            fp(&json!({"a": {"b": 1}})),
            fp(&json!({"a": 1, "b": 1})),
        ),
        ("sign", fp(&-1), fp(&1)),
        ("-1 vs u128::MAX", fp(&-1i8), fp(&u128::MAX)),
        ("i128::MIN vs 2^127", fp(&i128::MIN), fp(&(1u128 << 127))),
        ("unit struct vs unit variant", fp(&Unit), fp(&E::A)),
        (
            "set size",
            fp(&HashSet::from([1])),
            fp(&HashSet::from([1, 2])),
        ),
        // Documented deviations from JSON equality:
        ("hash set vs vec", fp(&HashSet::from([1])), fp(&vec![1])),
        (
            "hash set vs BTreeSet",
            fp(&HashSet::from([1])),
            fp(&BTreeSet::from([1])),
        ),
        ("NaN vs null", fp(&f64::NAN), fp(&())),
        ("infinity vs NaN", fp(&f64::INFINITY), fp(&f64::NAN)),
        (
            "integer key vs string key",
            fp(&BTreeMap::from([(1, 0)])),
            fp(&json!({"1": 0})),
        ),
    ];
    for (what, a, b) in pairs {
        assert_ne!(a, b, "{what}");
    }
}

// ---------------------------------------------------------------------------
// Hash sets wherever they appear.

fn shuffled_sets() -> (HashSet<u32>, HashSet<u32>) {
    let mut first = HashSet::with_hasher(RandomState::new());
    let mut second = HashSet::with_hasher(RandomState::new());
    first.extend(0..ELEMENTS);
    second.extend((0..ELEMENTS).rev());
    assert!(
        first.iter().ne(second.iter()),
        "iteration orders happen to match; the test would prove nothing"
    );
    (first, second)
}

#[derive(Serialize)]
struct Tags(HashSet<u32>);

/// Forwards to the inner set, so the set's type is never seen.
struct Forwarding(HashSet<u32>);

impl Serialize for Forwarding {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

#[test]
fn hash_sets_are_order_independent_behind_wrappers_and_in_containers() {
    let (a, b) = shuffled_sets();
    assert_eq!(fp(&a), fp(&b));
    assert_eq!(fp(&Box::new(a.clone())), fp(&Box::new(b.clone())));
    assert_eq!(fp(&Arc::new(a.clone())), fp(&Arc::new(b.clone())));
    assert_eq!(
        fp(&Rc::new(Box::new(a.clone()))),
        fp(&Rc::new(Box::new(b.clone())))
    );
    assert_eq!(fp(&&a), fp(&&b));
    assert_eq!(fp(&Some(a.clone())), fp(&Some(b.clone())));
    assert_eq!(fp(&Tags(a.clone())), fp(&Tags(b.clone())));
    assert_eq!(
        fp(&vec![a.clone(), a.clone()]),
        fp(&vec![b.clone(), b.clone()])
    );
    assert_eq!(
        fp(&HashMap::from([("k", a.clone())])),
        fp(&HashMap::from([("k", b.clone())]))
    );
    // Wrappers are transparent: the same set hashes the same through them.
    assert_eq!(fp(&a), fp(&Arc::new(Box::new(b.clone()))));
    assert_eq!(fp(&a), fp(&Tags(b.clone())));
}

#[test]
fn hash_set_behind_forwarding_impl_is_hashed_in_iteration_order() {
    // The documented limitation, pinned: the forwarded set is an ordered
    // sequence, so its fingerprint depends on iteration order.
    let (a, _) = shuffled_sets();
    let in_iteration_order: Vec<u32> = a.iter().copied().collect();
    assert_eq!(fp(&Forwarding(a.clone())), fp(&in_iteration_order));
    assert_ne!(fp(&Forwarding(a.clone())), fp(&a));
}

/// The same limitation through the two forwarding impls the docs name: serde's
/// `#[serde(transparent)]` and `Cow` hand the set's elements to the serializer as a
/// sequence it cannot tell from a `Vec`, so they are hashed in iteration order (and two
/// processes' orders differ: a keyless call's retry would get another key).
#[test]
fn a_set_behind_serde_transparent_or_cow_is_hashed_in_iteration_order() {
    #[derive(Serialize)]
    #[serde(transparent)]
    struct Transparent(HashSet<u32>);

    let (a, b) = shuffled_sets();
    let order = |set: &HashSet<u32>| set.iter().copied().collect::<Vec<u32>>();
    assert_ne!(
        order(&a),
        order(&b),
        "the sets iterate alike; the test would prove nothing"
    );
    assert_eq!(fp(&Transparent(a.clone())), fp(&order(&a)));
    assert_ne!(fp(&Transparent(a.clone())), fp(&Transparent(b.clone())));
    let cow = |set: &HashSet<u32>| fp(&std::borrow::Cow::<HashSet<u32>>::Borrowed(set));
    assert_eq!(cow(&a), fp(&order(&a)));
    assert_ne!(cow(&a), cow(&b));
}

// ---------------------------------------------------------------------------
// Integers: every width the serializer has a method for is one kind.

/// The integer widths serde serializes with a method of their own (`usize` and `isize` go
/// through `serialize_u64` and `serialize_i64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    U8,
    U16,
    U32,
    U64,
    U128,
    I8,
    I16,
    I32,
    I64,
    I128,
}

const WIDTHS: [Width; 10] = [
    Width::U8,
    Width::U16,
    Width::U32,
    Width::U64,
    Width::U128,
    Width::I8,
    Width::I16,
    Width::I32,
    Width::I64,
    Width::I128,
];

impl Width {
    fn fits(self, v: i128) -> bool {
        match self {
            Width::U8 => u8::try_from(v).is_ok(),
            Width::U16 => u16::try_from(v).is_ok(),
            Width::U32 => u32::try_from(v).is_ok(),
            Width::U64 => u64::try_from(v).is_ok(),
            Width::U128 => u128::try_from(v).is_ok(),
            Width::I8 => i8::try_from(v).is_ok(),
            Width::I16 => i16::try_from(v).is_ok(),
            Width::I32 => i32::try_from(v).is_ok(),
            Width::I64 => i64::try_from(v).is_ok(),
            Width::I128 => true,
        }
    }

    /// The widths `v` fits, narrowest first within each signedness.
    fn all_fitting(v: i128) -> Vec<Width> {
        WIDTHS.into_iter().filter(|w| w.fits(v)).collect()
    }

    /// The `pick`th (modulo their number) of the widths `v` fits; `I128` fits them all.
    fn fitting(v: i128, pick: usize) -> Width {
        let widths = Width::all_fitting(v);
        widths[pick % widths.len()]
    }
}

/// `value` serialized with the method of `width`, which it must fit.
#[derive(Clone, Copy, Debug)]
struct Int(i128, Width);

impl Serialize for Int {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Int(v, width) = *self;
        let misfit = |_| S::Error::custom(format!("{v} does not fit {width:?}"));
        match width {
            Width::U8 => serializer.serialize_u8(u8::try_from(v).map_err(misfit)?),
            Width::U16 => serializer.serialize_u16(u16::try_from(v).map_err(misfit)?),
            Width::U32 => serializer.serialize_u32(u32::try_from(v).map_err(misfit)?),
            Width::U64 => serializer.serialize_u64(u64::try_from(v).map_err(misfit)?),
            Width::U128 => serializer.serialize_u128(u128::try_from(v).map_err(misfit)?),
            Width::I8 => serializer.serialize_i8(i8::try_from(v).map_err(misfit)?),
            Width::I16 => serializer.serialize_i16(i16::try_from(v).map_err(misfit)?),
            Width::I32 => serializer.serialize_i32(i32::try_from(v).map_err(misfit)?),
            Width::I64 => serializer.serialize_i64(i64::try_from(v).map_err(misfit)?),
            Width::I128 => serializer.serialize_i128(v),
        }
    }
}

/// What JSON can hold: `i64::MIN..=u64::MAX`.
const JSON_INTEGERS: std::ops::RangeInclusive<i128> = (i64::MIN as i128)..=(u64::MAX as i128);

/// The bounds of every width within `JSON_INTEGERS`, where a narrowing or a sign mix-up
/// first shows.
const BOUNDS: [i128; 13] = [
    0,
    i8::MIN as i128,
    i8::MAX as i128,
    u8::MAX as i128,
    i16::MIN as i128,
    i16::MAX as i128,
    u16::MAX as i128,
    i32::MIN as i128,
    i32::MAX as i128,
    u32::MAX as i128,
    i64::MIN as i128,
    i64::MAX as i128,
    u64::MAX as i128,
];

/// An integer in `JSON_INTEGERS`: small ones, each width's full range (so that values fitting
/// `u8`, `i8`, `u16`, … are common, not one in 2^48), and the widths' bounds and their
/// neighbours.
fn integer() -> impl Strategy<Value = i128> {
    prop_oneof![
        3 => -300i128..300,
        1 => any::<u8>().prop_map(i128::from),
        1 => any::<i8>().prop_map(i128::from),
        1 => any::<u16>().prop_map(i128::from),
        1 => any::<i16>().prop_map(i128::from),
        1 => any::<u32>().prop_map(i128::from),
        1 => any::<i32>().prop_map(i128::from),
        1 => any::<u64>().prop_map(i128::from),
        1 => any::<i64>().prop_map(i128::from),
        2 => (proptest::sample::select(BOUNDS.to_vec()), -1i128..=1)
            .prop_map(|(bound, step)| (bound + step)
                .clamp(*JSON_INTEGERS.start(), *JSON_INTEGERS.end())),
    ]
}

/// An integer and one of the widths it fits, every width being reachable.
fn int() -> impl Strategy<Value = Int> {
    (integer(), any::<usize>()).prop_map(|(v, pick)| Int(v, Width::fitting(v, pick)))
}

/// The stream of a one-argument call of the integer `v`, written here from the grammar in
/// `src/fingerprint/canonical.rs` rather than by the serializer: `ARG`, `INT`, the sign
/// byte, the magnitude as LEB128, `ARGS_END`, one argument.
fn integer_stream(v: i128) -> Vec<u8> {
    let mut stream = vec![0x0a, 0x03, u8::from(v < 0)];
    let mut magnitude = v.unsigned_abs();
    loop {
        let low = (magnitude & 0x7f) as u8;
        magnitude >>= 7;
        if magnitude == 0 {
            stream.push(low);
            break;
        }
        stream.push(low | 0x80);
    }
    stream.extend_from_slice(&[0x0b, 0x01]);
    stream
}

/// The extreme value of each width and its call's stream and fingerprint, both written
/// independently of the serializer (`integer_stream`'s grammar; Python's hashlib over the
/// zero-padded `v3` domain block and the stream, as for the pins below).
const PINNED_INTEGERS: [(Int, &str, &str); 10] = [
    (
        Int(u8::MAX as i128, Width::U8),
        "0a0300ff010b01",
        "f685db57358cc51815d4a1f277aaac9002b797fbdf9c2b6c90d42bf85b7c13b1",
    ),
    (
        Int(u16::MAX as i128, Width::U16),
        "0a0300ffff030b01",
        "f45b9e5097e3831d2e4f47cc1fdd70f5bac6cf56b8005ea108df394b6059763e",
    ),
    (
        Int(u32::MAX as i128, Width::U32),
        "0a0300ffffffff0f0b01",
        "c6973180f1ce95d2e9fa26dd912b48bda94e3f5dacfc7f8b1f48c8b95d057500",
    ),
    (
        Int(u64::MAX as i128, Width::U64),
        "0a0300ffffffffffffffffff010b01",
        "e245acc50dd8da4deee1afbaf9da1bdca37bfadeb3c92c5a1f75d4a62ab0b08d",
    ),
    (
        Int(i128::MAX, Width::U128),
        "0a0300ffffffffffffffffffffffffffffffffffff010b01",
        "faa694727db7113924307f026799c2205fae8b407bd1146536475d2f723546db",
    ),
    (
        Int(i8::MIN as i128, Width::I8),
        "0a030180010b01",
        "52e89443e9074e0f6883b83a0afeb658667f01227d804dd15e6fbacc138c477d",
    ),
    (
        Int(i16::MIN as i128, Width::I16),
        "0a03018080020b01",
        "a675cd11ba9ade98bbc6e81be90f22731466a6121a458f73f6e1d7fcf8eb010f",
    ),
    (
        Int(i32::MIN as i128, Width::I32),
        "0a030180808080080b01",
        "fecf122557f2d15bc5c07dd4d1b9a389f9bfeaa52922dd3d2cf3566e6bbea4d4",
    ),
    (
        Int(i64::MIN as i128, Width::I64),
        "0a0301808080808080808080010b01",
        "27e5c518053e875e2e747d945bfab93618a44d77297df4486e0e94500639c993",
    ),
    (
        Int(i128::MIN, Width::I128),
        "0a0301808080808080808080808080808080808080020b01",
        "2349e5bd26ae0afad93efafc0bf65eb2d93cdaf16578e6fff320c4f3298f2a20",
    ),
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every width has a known encoding and fingerprint: an encoding change, or a width written
/// as another number or another kind, fails here even if all widths change alike.
#[test]
fn known_integer_fingerprints_are_pinned() -> Result<(), FingerprintError> {
    let mut seen = Vec::new();
    for (int, stream, fingerprint) in PINNED_INTEGERS {
        let Int(v, width) = int;
        seen.push(width);
        assert_eq!(hex(&integer_stream(v)), stream, "{int:?}: the pin's stream");
        let arguments = CanonicalArguments::of(&int)?;
        assert_eq!(
            arguments.exact().map(hex).as_deref(),
            Some(stream),
            "{int:?}"
        );
        assert_eq!(Fingerprint::of(&int)?.to_hex(), fingerprint, "{int:?}");
        assert_eq!(arguments.fingerprint().to_hex(), fingerprint, "{int:?}");
    }
    assert_eq!(seen, WIDTHS, "every width is pinned");
    Ok(())
}

proptest! {
    /// The documented rule, "integers of every width are one kind": at every width it fits
    /// (and as `usize`/`isize`, and as a JSON number), an integer has the stream written from
    /// the grammar, so the same fingerprint; never that of the float or the string.
    #[test]
    fn integer_widths_are_one_kind(v in integer()) {
        let stream = integer_stream(v);
        let json = match u64::try_from(v) {
            Ok(x) => serde_json::Value::from(x),
            Err(_) => serde_json::Value::from(i64::try_from(v)?),
        };
        let base = Fingerprint::of(&json)?;
        prop_assert_eq!(CanonicalArguments::of(&json)?.exact().map(hex), Some(hex(&stream)));
        let widths = Width::all_fitting(v);
        prop_assert!(widths.contains(&Width::I128));
        for width in widths {
            let int = Int(v, width);
            prop_assert_eq!(
                CanonicalArguments::of(&int)?.exact().map(hex),
                Some(hex(&stream)),
                "{:?}",
                int
            );
            prop_assert_eq!(Fingerprint::of(&int)?, base, "{:?}", int);
        }
        if let Ok(x) = usize::try_from(v) {
            prop_assert_eq!(Fingerprint::of(&x)?, base);
        }
        if let Ok(x) = isize::try_from(v) {
            prop_assert_eq!(Fingerprint::of(&x)?, base);
        }
        prop_assert_ne!(Fingerprint::of(&(v as f64))?, base);
        prop_assert_ne!(Fingerprint::of(&v.to_string())?, base);
    }

    /// Two integers at any widths they fit have equal fingerprints exactly when they are the
    /// same number.
    #[test]
    fn integers_at_any_widths_are_equal_iff_equal(
        a in int(),
        b in int(),
        pick in any::<usize>(),
    ) {
        prop_assert_eq!(Fingerprint::of(&a)? == Fingerprint::of(&b)?, a.0 == b.0);
        // The same number at another width it fits.
        let other = Int(a.0, Width::fitting(a.0, pick));
        prop_assert_eq!(Fingerprint::of(&a)?, Fingerprint::of(&other)?, "{:?}", other);
    }
}

// ---------------------------------------------------------------------------
// JSON equivalence, property-based.

#[derive(Clone, Debug)]
enum Tree {
    Null,
    Bool(bool),
    Int(Int),
    Str(String),
    Seq(Vec<Tree>),
    /// Serialized in vector order; keys are unique.
    Map(Vec<(String, Tree)>),
}

impl Serialize for Tree {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Tree::Null => serializer.serialize_unit(),
            Tree::Bool(b) => serializer.serialize_bool(*b),
            Tree::Int(int) => int.serialize(serializer),
            Tree::Str(s) => serializer.serialize_str(s),
            Tree::Seq(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Tree::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

/// Deterministic randomness for rearranging a generated tree.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        // Test-only: modulo bias is irrelevant here.
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Same JSON, different serialization: map entries reordered, each integer at another
/// width it fits.
fn rearrange(tree: &Tree, rng: &mut SplitMix) -> Tree {
    match tree {
        Tree::Int(Int(v, _)) => Tree::Int(Int(*v, Width::fitting(*v, rng.below(WIDTHS.len())))),
        Tree::Seq(items) => Tree::Seq(items.iter().map(|t| rearrange(t, rng)).collect()),
        Tree::Map(entries) => {
            let mut entries: Vec<_> = entries
                .iter()
                .map(|(k, v)| (k.clone(), rearrange(v, rng)))
                .collect();
            for i in (1..entries.len()).rev() {
                entries.swap(i, rng.below(i + 1));
            }
            Tree::Map(entries)
        }
        leaf => leaf.clone(),
    }
}

/// A small edit somewhere in the tree; it may or may not change the JSON.
fn mutate(tree: &Tree, rng: &mut SplitMix) -> Tree {
    let descend = rng.below(3) != 0;
    match tree {
        Tree::Seq(items) if descend && !items.is_empty() => {
            let mut items = items.clone();
            let i = rng.below(items.len());
            items[i] = mutate(&items[i], rng);
            Tree::Seq(items)
        }
        Tree::Map(entries) if descend && !entries.is_empty() => {
            let mut entries = entries.clone();
            let i = rng.below(entries.len());
            entries[i].1 = mutate(&entries[i].1, rng);
            Tree::Map(entries)
        }
        Tree::Null => Tree::Bool(false),
        Tree::Bool(b) => Tree::Bool(!b),
        Tree::Int(Int(v, w)) => match rng.below(3) {
            0 => Tree::Str(v.to_string()),
            1 => {
                // A neighbour, still within what JSON holds, at the same width if it fits.
                let next = if v < JSON_INTEGERS.end() {
                    v + 1
                } else {
                    v - 1
                };
                let width = if w.fits(next) { *w } else { Width::I128 };
                Tree::Int(Int(next, width))
            }
            _ => tree.clone(),
        },
        Tree::Str(s) => Tree::Str(format!("{s}a")),
        Tree::Seq(items) if items.len() >= 2 => {
            let mut items = items.clone();
            items.swap(0, 1);
            Tree::Seq(items)
        }
        Tree::Seq(_) => Tree::Seq(vec![tree.clone()]),
        Tree::Map(entries) if !entries.is_empty() => {
            let mut entries = entries.clone();
            entries.remove(rng.below(entries.len()));
            Tree::Map(entries)
        }
        Tree::Map(_) => Tree::Seq(Vec::new()),
    }
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        1 => Just(Tree::Null),
        1 => any::<bool>().prop_map(Tree::Bool),
        3 => int().prop_map(Tree::Int),
        1 => "[ab1]{0,2}".prop_map(Tree::Str),
    ];
    leaf.prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Tree::Seq),
            proptest::collection::btree_map("[ab1]{0,2}", inner, 0..4)
                .prop_map(|m| Tree::Map(m.into_iter().collect())),
        ]
    })
}

fn pair() -> impl Strategy<Value = (Tree, Tree)> {
    prop_oneof![
        (tree(), any::<u64>()).prop_map(|(a, seed)| {
            let b = rearrange(&a, &mut SplitMix(seed));
            (a, b)
        }),
        (tree(), any::<u64>()).prop_map(|(a, seed)| {
            let mut rng = SplitMix(seed);
            let b = rearrange(&mutate(&a, &mut rng), &mut rng);
            (a, b)
        }),
        (tree(), tree()),
    ]
}

/// Whether `a` and `b` have the same JSON (neither fails to convert: every generated integer
/// is within what JSON holds).
fn json_equal(a: &Tree, b: &Tree) -> Result<bool, serde_json::Error> {
    Ok(serde_json::to_value(a)? == serde_json::to_value(b)?)
}

proptest! {
    #[test]
    fn fingerprints_are_equal_iff_json_is_equal((a, b) in pair()) {
        prop_assert_eq!(Fingerprint::of(&a)? == Fingerprint::of(&b)?, json_equal(&a, &b)?);
    }
}

// ---------------------------------------------------------------------------
// Errors from Serialize impls.

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Boom;

impl Serialize for Boom {
    fn serialize<S: Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
        Err(S::Error::custom("boom"))
    }
}

#[derive(Serialize)]
enum Carrier {
    Newtype(Boom),
    Tuple(u8, Boom),
    Struct { ok: u8, bad: Boom },
}

#[derive(Serialize)]
struct Partial {
    fine: Vec<u32>,
    bad: Boom,
}

fn assert_boom(what: &str, result: Result<Fingerprint, FingerprintError>) {
    match result {
        Ok(_) => panic!("{what}: a failing Serialize impl was fingerprinted"),
        Err(error) => assert!(error.to_string().contains("boom"), "{what}: {error}"),
    }
}

#[test]
fn serialize_errors_are_returned_not_panicked() {
    assert_boom("top level", Fingerprint::of(&Boom));
    assert_boom("in a vec", Fingerprint::of(&vec![Boom]));
    assert_boom("in a hash set", Fingerprint::of(&HashSet::from([Boom])));
    assert_boom(
        "as a map key",
        Fingerprint::of(&BTreeMap::from([(Boom, 1)])),
    );
    assert_boom(
        "as a map value",
        Fingerprint::of(&HashMap::from([("k", Boom)])),
    );
    assert_boom("in an option", Fingerprint::of(&Some(Boom)));
    assert_boom("newtype variant", Fingerprint::of(&Carrier::Newtype(Boom)));
    assert_boom("tuple variant", Fingerprint::of(&Carrier::Tuple(1, Boom)));
    assert_boom(
        "struct variant",
        Fingerprint::of(&Carrier::Struct { ok: 1, bad: Boom }),
    );
    assert_boom(
        "after partial output",
        Fingerprint::of(&Partial {
            fine: vec![1, 2],
            bad: Boom,
        }),
    );
    let mut args = Fingerprinter::new();
    assert!(args.push(&1).is_ok());
    assert_boom(
        "second argument",
        args.push(&Boom).map(|args| args.finish()),
    );
}

// ---------------------------------------------------------------------------
// Positional arguments.

#[test]
fn arguments_are_framed_individually() -> Result<(), FingerprintError> {
    let mut separate = Fingerprinter::new();
    separate.push("alice")?.push(&500u32)?;
    let mut again = Fingerprinter::new();
    again.push("alice")?.push(&500u64)?;
    // Pinned (Python's hashlib, as for the pins below), so the two pushes are checked
    // against the grammar, not only against each other.
    assert_eq!(
        separate.finish().to_hex(),
        "099e2768931f01e0deee9366c72f3c8a0c30445e0c3c03e17b1782aeab3b366c"
    );
    assert_eq!(separate.finish(), again.finish());

    let mut as_tuple = Fingerprinter::new();
    as_tuple.push(&("alice", 500u32))?;
    assert_ne!(separate.finish(), as_tuple.finish());
    // `Fingerprint::of(&x)` is a one-argument call: both equal the pinned fingerprint of the
    // one-argument stream, rather than each other (which is how `of` is written).
    let tuple = "7f34a5ed4aedbabaa1d03f139b67f3092705a8009649491bbe21cbb951044ad3";
    assert_eq!(as_tuple.finish().to_hex(), tuple);
    assert_eq!(Fingerprint::of(&("alice", 500u32))?.to_hex(), tuple);

    let mut ab_c = Fingerprinter::new();
    ab_c.push("ab")?.push("c")?;
    let mut a_bc = Fingerprinter::new();
    a_bc.push("a")?.push("bc")?;
    assert_ne!(ab_c.finish(), a_bc.finish());

    let mut unit = Fingerprinter::new();
    unit.push(&())?;
    assert_ne!(Fingerprinter::new().finish(), unit.finish());
    let unit_pin = "f06150660fcbc4ac52309a5841e4686395a994b9587b804a806e5b0b3db11d19";
    assert_eq!(unit.finish().to_hex(), unit_pin);
    assert_eq!(Fingerprint::of(&())?.to_hex(), unit_pin);
    assert_eq!(
        Fingerprinter::new().finish().to_hex(),
        "b0dd6a073c05ffbfb7fba90667d89bf240ff7af1ff0886d41081b8c55aa5e327"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Determinism pin.

#[derive(Serialize)]
struct Pinned {
    account: &'static str,
    cents: u64,
    tags: HashSet<&'static str>,
    kind: E,
    memo: Option<String>,
}

/// Changing these invalidates the fingerprints of every stored record. If the
/// encoding must change, bump the `v3` domain tag and update them together.
/// Both constants were cross-checked against an independent implementation
/// of the grammar in `src/fingerprint/canonical.rs` (Python's hashlib over the
/// 64-byte zero-padded domain block and the encoding), which also reproduces
/// the `v2` values these replaced.
#[test]
fn known_fingerprints_are_pinned() -> Result<(), FingerprintError> {
    let value = json!({"a": [1, "x", true, null], "b": {"c": 1.5, "d": -7}});
    assert_eq!(
        Fingerprint::of(&value)?.to_hex(),
        "02af6042ab374ca9cdb8a80a4f9c25bbd74858cc72744813520d2e8ff8896a14"
    );
    let mut args = Fingerprinter::new();
    args.push(&Pinned {
        account: "alice",
        cents: 500,
        tags: HashSet::from(["x", "y", "z"]),
        kind: E::S { a: 1, b: 2 },
        memo: None,
    })?
    .push(&'c')?;
    assert_eq!(
        args.finish().to_hex(),
        "9e35acae3d2b334997dea429c3673d5179fb6122075df23d268b7d74023d9b41"
    );
    Ok(())
}

/// A stream (every argument's item and the end marker) of up to `MAX_EXACT_ARGUMENTS` bytes
/// is kept as it is; a longer one, or one that outgrows the limit on a later push, is hashed
/// as it is written. The fingerprints are pinned (Python's hashlib, as above), so the switch
/// can change neither path's hash.
#[test]
fn canonical_arguments_are_exact_up_to_the_limit() -> Result<(), FingerprintError> {
    assert_eq!(
        MAX_EXACT_ARGUMENTS, 128,
        "the pinned streams below sit at this limit"
    );
    // ARG, STR, length 123, the bytes, ARGS_END, one argument: 128 bytes.
    let at_limit = CanonicalArguments::of(&"a".repeat(123))?;
    let mut stream = vec![0x0a, 0x05, 123];
    stream.extend_from_slice(&[b'a'; 123]);
    stream.extend_from_slice(&[0x0b, 0x01]);
    assert_eq!(at_limit.exact(), Some(&stream[..]));
    assert_eq!(
        at_limit.fingerprint().to_hex(),
        "99c34f7de57c184d98895b25f0b59d1df680f243cc2cb6c1af53aa9d20b5fa90"
    );

    let past_limit = CanonicalArguments::of(&"a".repeat(124))?;
    assert_eq!(past_limit.exact(), None, "129 bytes are hashed");
    assert_eq!(
        past_limit.fingerprint().to_hex(),
        "635f5cdb54043755475d09b74a2f857824406f8789e47a4be0e66561de01c1ea"
    );

    // The second push outgrows the limit: what was kept is hashed, then the rest.
    let mut spilled = Fingerprinter::new();
    spilled.push(&"a".repeat(100))?;
    assert!(spilled.arguments().exact().is_some());
    spilled.push(&"b".repeat(100))?.push(&7u32)?;
    assert_eq!(spilled.arguments().exact(), None);
    // Both ways of reading the fingerprint (hashing the end marker on its own, or the
    // arguments' digest) against the pin, rather than against each other.
    let spilled_pin = "52b9b12481badd007527c8c96064a148117cc5cabbcecd9f64886918ce952428";
    assert_eq!(spilled.finish().to_hex(), spilled_pin);
    assert_eq!(spilled.arguments().fingerprint().to_hex(), spilled_pin);
    Ok(())
}

/// A poisoned fingerprinter's arguments, exact or not, equal no successful sequence of pushes.
#[test]
fn poisoned_arguments_equal_no_valid_ones() {
    let mut poisoned = Fingerprinter::new();
    poisoned.push("x").unwrap();
    assert!(poisoned.push(&Boom).is_err());
    let arguments = poisoned.arguments();
    assert!(
        arguments.exact().is_some(),
        "short: the poison is kept in the stream"
    );
    let mut valid = Fingerprinter::new();
    valid.push("x").unwrap();
    assert_ne!(arguments, valid.arguments());
    valid.push(&()).unwrap();
    assert_ne!(arguments, valid.arguments());
}

proptest! {
    /// Both forms of the same arguments are equal, and two values' arguments are equal, in
    /// either form, exactly when their JSON is.
    #[test]
    fn canonical_arguments_agree_with_fingerprints((a, b) in pair()) {
        let (args_a, args_b) = (CanonicalArguments::of(&a)?, CanonicalArguments::of(&b)?);
        let fp_a = Fingerprint::of(&a)?;
        let equal = json_equal(&a, &b)?;
        prop_assert_eq!(args_a.fingerprint(), fp_a);
        prop_assert_eq!(&CanonicalArguments::from(fp_a), &args_a);
        prop_assert_eq!(args_a == args_b, equal);
        prop_assert_eq!(CanonicalArguments::from(fp_a) == args_b, equal);
        prop_assert_eq!(args_a == CanonicalArguments::from(Fingerprint::of(&b)?), equal);
    }
}
