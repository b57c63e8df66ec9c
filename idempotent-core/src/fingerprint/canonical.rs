//! The canonical encoding: a serde [`Serializer`](ser::Serializer) that writes
//! the canonical form of a value into a byte buffer, which the caller hashes
//! once. No JSON is built: the buffer holds the tagged form below.
//!
//! Grammar (every item is self-delimiting, so concatenations never collide):
//!
//! | item            | bytes                                                         |
//! |-----------------|---------------------------------------------------------------|
//! | null            | `NULL`                                                        |
//! | bool            | `FALSE` / `TRUE`                                              |
//! | integer         | `INT`, sign byte (0 = non-negative, 1 = negative), magnitude as LEB128 |
//! | float           | `FLOAT`, `f64` bits LE (NaN canonicalised)                    |
//! | string          | `STR`, byte length as LEB128, UTF-8 bytes                     |
//! | ordered seq     | `SEQ`, items…, `SEQ_END`                                      |
//! | map             | `MAP`, entry count as LEB128, entries sorted by their bytes   |
//! | unordered set   | `SET`, element count as LEB128, elements sorted by their bytes |
//!
//! An entry is `key item ‖ value item`. Items are self-delimiting, so sorted
//! entries concatenate without ambiguity, and sorting their bytes (rather than
//! hashing each one and sorting the digests, a SHA-256 finalisation per entry)
//! keeps one SHA-256 pass per fingerprint.
//! Fixed-width payloads carry no length: their tag fixes it. Sequences end
//! with a terminator rather than a count because `serialize_seq` may not know
//! its length up front.

use std::any::type_name;

use serde::ser::{self, Serialize};

use super::FingerprintError;

/// Tag bytes. Changing any of them changes every fingerprint: bump the
/// domain tag in the parent module instead of editing these in place.
pub(super) mod tag {
    pub const NULL: u8 = 0x00;
    pub const FALSE: u8 = 0x01;
    pub const TRUE: u8 = 0x02;
    pub const INT: u8 = 0x03;
    pub const FLOAT: u8 = 0x04;
    pub const STR: u8 = 0x05;
    pub const SEQ: u8 = 0x06;
    pub const SEQ_END: u8 = 0x07;
    pub const MAP: u8 = 0x08;
    pub const SET: u8 = 0x09;
    pub const ARG: u8 = 0x0a;
    pub const ARGS_END: u8 = 0x0b;
    /// Never starts a valid item, so a stream cut short by an error can
    /// never be mistaken for a complete one.
    pub const POISON: u8 = 0xff;
}

/// The quiet NaN every NaN is folded into, so that NaN payload bits (which
/// JSON cannot express anyway) never split fingerprints.
const CANONICAL_NAN_BITS: u64 = 0x7ff8_0000_0000_0000;

/// Writes the canonical item for `value` into `out`.
pub(super) fn write_value<T: Serialize + ?Sized>(
    out: &mut Buffer,
    value: &T,
) -> Result<(), FingerprintError> {
    value.serialize(Canonical {
        out,
        unordered: is_unordered::<T>(),
    })
}

/// LEB128, minimal: lengths, counts and most integers take one byte, which
/// keeps the buffer (and so the SHA-256 work) small. Self-delimiting.
fn write_varint(out: &mut Vec<u8>, mut value: u128) {
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Writes a tag followed by a count.
pub(super) fn write_header(out: &mut Vec<u8>, tag: u8, count: usize) {
    out.push(tag);
    write_varint(out, count as u128);
}

fn write_str(out: &mut Vec<u8>, value: &str) {
    write_header(out, tag::STR, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn write_int(out: &mut Vec<u8>, negative: bool, magnitude: u128) {
    out.push(tag::INT);
    out.push(u8::from(negative));
    write_varint(out, magnitude);
}

fn write_i128(out: &mut Vec<u8>, value: i128) {
    write_int(out, value < 0, value.unsigned_abs());
}

fn write_f64(out: &mut Vec<u8>, value: f64) {
    let bits = if value.is_nan() {
        CANONICAL_NAN_BITS
    } else {
        value.to_bits()
    };
    let mut buf = [0u8; 9];
    buf[0] = tag::FLOAT;
    buf[1..].copy_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(&buf);
}

/// Opens a one-entry map, which is how JSON writes enum variants carrying
/// data (`{"Variant": …}`); the caller writes the entry's value next.
fn begin_single_entry(out: &mut Vec<u8>, variant: &str) {
    write_header(out, tag::MAP, 1);
    write_str(out, variant);
}

/// Whether a value of static type `T` is a hash set, whose iteration order is
/// arbitrary and must therefore be hashed as a multiset.
fn is_unordered<T: ?Sized>() -> bool {
    is_unordered_type_name(type_name::<T>())
}

/// Serde cannot tell a `HashSet` from a `Vec` (both call `serialize_seq`), so
/// the static type name is the only signal. `type_name` output is not
/// guaranteed stable by Rust; the unit tests pin the spellings relied on.
fn is_unordered_type_name(name: &str) -> bool {
    const TRANSPARENT: [&str; 5] = [
        "&mut ",
        "&",
        "alloc::boxed::Box<",
        "alloc::sync::Arc<",
        "alloc::rc::Rc<",
    ];
    const SETS: [&str; 2] = [
        "std::collections::hash::set::HashSet<",
        "hashbrown::set::HashSet<",
    ];

    // This runs for every value serialized, and most names (`u32`, `alloc::string::String`,
    // `&my_crate::Order`) are settled without a comparison: a hash set's name is generic, so
    // it ends with `>`, and starts with one of the bytes below.
    if name.as_bytes().last() != Some(&b'>')
        || !matches!(name.as_bytes().first(), Some(b'&' | b'a' | b's' | b'h'))
    {
        return false;
    }
    let mut rest = name;
    // `&mut ` is listed before `&` so it is stripped whole.
    while let Some(inner) = TRANSPARENT.iter().find_map(|p| rest.strip_prefix(p)) {
        rest = inner;
    }
    SETS.iter().any(|set| rest.starts_with(set))
}

/// The encoding being written, and the entries of the maps and hash sets still open in it.
#[derive(Default)]
pub(super) struct Buffer {
    pub(super) bytes: Vec<u8>,
    /// The `(start, end)` in `bytes` of each entry of every open map or set, innermost last:
    /// one stack for all of them, so a map is a few indices rather than a buffer of its own.
    ranges: Vec<(usize, usize)>,
    /// Where a map's unsorted entries wait while they are written back sorted, so the
    /// encoding never needs room for two copies of them.
    unsorted: Vec<u8>,
}

impl Buffer {
    pub(super) const fn new() -> Self {
        Self {
            bytes: Vec::new(),
            ranges: Vec::new(),
            unsorted: Vec::new(),
        }
    }

    /// Empties it, keeping its capacity; also what an encoding cut short by an error left.
    pub(super) fn clear(&mut self) {
        self.bytes.clear();
        self.ranges.clear();
        self.unsorted.clear();
    }

    /// Bytes held for reuse.
    pub(super) fn capacity(&self) -> usize {
        self.bytes.capacity()
            + self.ranges.capacity() * size_of::<(usize, usize)>()
            + self.unsorted.capacity()
    }
}

/// Entries or elements, each encoded on its own and sorted by their bytes at
/// the end, so iteration order is irrelevant.
///
/// The entries are written in place at the end of the output buffer, and
/// `finish` appends them in sorted order behind the header and removes the
/// unsorted run: a map costs no buffer of its own, which matters because most
/// fingerprinted arguments are structs and fingerprints are taken on every call.
struct Entries {
    /// Where the first entry starts in the output bytes.
    start: usize,
    /// Where the entry being written starts.
    entry_start: usize,
    /// Where this map's ranges start on the buffer's stack of ranges.
    first_range: usize,
}

impl Entries {
    fn begin(out: &Buffer) -> Self {
        Self {
            start: out.bytes.len(),
            entry_start: out.bytes.len(),
            first_range: out.ranges.len(),
        }
    }

    fn close_entry(&mut self, out: &mut Buffer) {
        let end = out.bytes.len();
        out.ranges.push((self.entry_start, end));
        self.entry_start = end;
    }

    fn push_value<T: Serialize + ?Sized>(
        &mut self,
        out: &mut Buffer,
        value: &T,
    ) -> Result<(), FingerprintError> {
        write_value(out, value)?;
        self.close_entry(out);
        Ok(())
    }

    fn push_field<T: Serialize + ?Sized>(
        &mut self,
        out: &mut Buffer,
        key: &str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        write_str(&mut out.bytes, key);
        self.push_value(out, value)
    }

    /// Replaces the unsorted entries with `variant`'s single-entry prefix (for a
    /// struct variant), the header, and the entries sorted by their bytes.
    fn finish(self, tag: u8, variant: Option<&str>, out: &mut Buffer) {
        let Buffer {
            bytes,
            ranges,
            unsorted,
        } = out;
        let entries = &mut ranges[self.first_range..];
        entries.sort_unstable_by(|a, b| bytes[a.0..a.1].cmp(&bytes[b.0..b.1]));
        unsorted.clear();
        unsorted.extend_from_slice(&bytes[self.start..]);
        bytes.truncate(self.start);
        if let Some(variant) = variant {
            begin_single_entry(bytes, variant);
        }
        write_header(bytes, tag, entries.len());
        for &(start, end) in entries.iter() {
            bytes.extend_from_slice(&unsorted[start - self.start..end - self.start]);
        }
        ranges.truncate(self.first_range);
    }
}

struct Canonical<'a> {
    out: &'a mut Buffer,
    /// Set when the value being serialized is a hash set; only its own
    /// `serialize_seq` call looks at it, nested values get a fresh decision.
    unordered: bool,
}

impl<'a> ser::Serializer for Canonical<'a> {
    type Ok = ();
    type Error = FingerprintError;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Ordered<'a>;
    type SerializeTupleStruct = Ordered<'a>;
    type SerializeTupleVariant = TupleVariant<'a>;
    type SerializeMap = Map<'a>;
    type SerializeStruct = Map<'a>;
    type SerializeStructVariant = StructVariant<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), FingerprintError> {
        self.out
            .bytes
            .extend_from_slice(&[if v { tag::TRUE } else { tag::FALSE }]);
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i64(self, v: i64) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i128(self, v: i128) -> Result<(), FingerprintError> {
        write_i128(&mut self.out.bytes, v);
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u128(self, v: u128) -> Result<(), FingerprintError> {
        write_int(&mut self.out.bytes, false, v);
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<(), FingerprintError> {
        self.serialize_f64(v.into())
    }

    fn serialize_f64(self, v: f64) -> Result<(), FingerprintError> {
        write_f64(&mut self.out.bytes, v);
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), FingerprintError> {
        let mut buf = [0u8; 4];
        write_str(&mut self.out.bytes, v.encode_utf8(&mut buf));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), FingerprintError> {
        write_str(&mut self.out.bytes, v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), FingerprintError> {
        // serde_json writes bytes as an array of numbers, so hash exactly
        // what a `Vec<u8>` would.
        self.out.bytes.extend_from_slice(&[tag::SEQ]);
        for &byte in v {
            write_int(&mut self.out.bytes, false, byte.into());
        }
        self.out.bytes.extend_from_slice(&[tag::SEQ_END]);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), FingerprintError> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), FingerprintError> {
        write_value(self.out, value)
    }

    fn serialize_unit(self) -> Result<(), FingerprintError> {
        self.out.bytes.extend_from_slice(&[tag::NULL]);
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), FingerprintError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), FingerprintError> {
        write_str(&mut self.out.bytes, variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        write_value(self.out, value)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        begin_single_entry(&mut self.out.bytes, variant);
        write_value(self.out, value)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Seq<'a>, FingerprintError> {
        if self.unordered {
            Ok(Seq::Unordered {
                elements: Entries::begin(self.out),
                out: self.out,
            })
        } else {
            Ok(Seq::Ordered(Ordered::begin(self.out)))
        }
    }

    fn serialize_tuple(self, _len: usize) -> Result<Ordered<'a>, FingerprintError> {
        Ok(Ordered::begin(self.out))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Ordered<'a>, FingerprintError> {
        Ok(Ordered::begin(self.out))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<TupleVariant<'a>, FingerprintError> {
        begin_single_entry(&mut self.out.bytes, variant);
        self.out.bytes.push(tag::SEQ);
        Ok(TupleVariant { out: self.out })
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Map<'a>, FingerprintError> {
        Ok(Map {
            entries: Entries::begin(self.out),
            out: self.out,
            key_pending: false,
        })
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Map<'a>, FingerprintError> {
        self.serialize_map(Some(len))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<StructVariant<'a>, FingerprintError> {
        Ok(StructVariant {
            fields: Entries::begin(self.out),
            out: self.out,
            variant,
        })
    }
}

/// Sequences, tuples and tuple structs: order matters, as in JSON arrays.
struct Ordered<'a> {
    out: &'a mut Buffer,
}

impl<'a> Ordered<'a> {
    fn begin(out: &'a mut Buffer) -> Self {
        out.bytes.extend_from_slice(&[tag::SEQ]);
        Self { out }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), FingerprintError> {
        write_value(self.out, value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        self.out.bytes.extend_from_slice(&[tag::SEQ_END]);
        Ok(())
    }
}

impl ser::SerializeTuple for Ordered<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_element<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.element(value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        Ordered::end(self)
    }
}

impl ser::SerializeTupleStruct for Ordered<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.element(value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        Ordered::end(self)
    }
}

enum Seq<'a> {
    Ordered(Ordered<'a>),
    /// A hash set: elements are digested one by one and sorted (a multiset
    /// hash), under the `SET` tag so it never equals an ordered sequence.
    Unordered {
        out: &'a mut Buffer,
        elements: Entries,
    },
}

impl ser::SerializeSeq for Seq<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_element<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        match self {
            Seq::Ordered(ordered) => ordered.element(value),
            Seq::Unordered { out, elements } => elements.push_value(out, value),
        }
    }

    fn end(self) -> Result<(), FingerprintError> {
        match self {
            Seq::Ordered(ordered) => ordered.end(),
            Seq::Unordered { out, elements } => {
                elements.finish(tag::SET, None, out);
                Ok(())
            }
        }
    }
}

/// Maps and structs: a struct is the map of its field names to values, as
/// in JSON.
struct Map<'a> {
    out: &'a mut Buffer,
    entries: Entries,
    /// Guards against `Serialize` impls that break the key/value alternation,
    /// which would otherwise silently merge two entries into one.
    key_pending: bool,
}

impl Map<'_> {
    fn misuse(what: &str) -> FingerprintError {
        FingerprintError::new(format!("its Serialize impl {what}"))
    }
}

impl ser::SerializeMap for Map<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), FingerprintError> {
        if self.key_pending {
            return Err(Self::misuse("serialized two map keys in a row"));
        }
        write_value(self.out, key)?;
        self.key_pending = true;
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        if !self.key_pending {
            return Err(Self::misuse("serialized a map value without a key"));
        }
        self.key_pending = false;
        self.entries.push_value(self.out, value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        if self.key_pending {
            return Err(Self::misuse("ended a map after a key without its value"));
        }
        self.entries.finish(tag::MAP, None, self.out);
        Ok(())
    }
}

impl ser::SerializeStruct for Map<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.entries.push_field(self.out, key, value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        ser::SerializeMap::end(self)
    }
}

/// `Variant(a, b)` hashes as `{"Variant": [a, b]}`.
struct TupleVariant<'a> {
    /// Already holds the one-entry map's header, the variant name and the
    /// opening `SEQ`.
    out: &'a mut Buffer,
}

impl ser::SerializeTupleVariant for TupleVariant<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        write_value(self.out, value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        self.out.bytes.push(tag::SEQ_END);
        Ok(())
    }
}

/// `Variant { a, b }` hashes as `{"Variant": {"a": a, "b": b}}`.
struct StructVariant<'a> {
    out: &'a mut Buffer,
    variant: &'static str,
    fields: Entries,
}

impl ser::SerializeStructVariant for StructVariant<'_> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.fields.push_field(self.out, key, value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        self.fields.finish(tag::MAP, Some(self.variant), self.out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap, HashSet};
    use std::rc::Rc;
    use std::sync::Arc;

    use super::*;

    /// A tuple struct is an ordered sequence of its fields, as in its JSON form (an array):
    /// every field counts, and it fingerprints as the tuple and the array of the same values.
    #[test]
    fn tuple_structs_are_their_fields_in_order() {
        #[derive(serde::Serialize)]
        struct Pair(u32, u32);
        fn of<T: Serialize>(value: &T) -> crate::Fingerprint {
            crate::Fingerprint::of(value).unwrap()
        }
        assert_ne!(of(&Pair(1, 2)), of(&Pair(1, 3)));
        assert_ne!(of(&Pair(1, 2)), of(&Pair(2, 1)));
        assert_eq!(of(&Pair(1, 2)), of(&(1u32, 2u32)));
        assert_eq!(of(&Pair(1, 2)), of(&[1u32, 2]));
    }

    #[test]
    fn hash_sets_are_unordered_through_references_and_smart_pointers() {
        assert!(is_unordered::<HashSet<u8>>());
        assert!(is_unordered::<&HashSet<u8>>());
        assert!(is_unordered::<&&HashSet<String>>());
        assert!(is_unordered::<&mut HashSet<u8>>());
        assert!(is_unordered::<Box<HashSet<u8>>>());
        assert!(is_unordered::<Arc<Rc<Box<HashSet<u8>>>>>());
        assert!(is_unordered::<&Arc<HashSet<u8>>>());
        assert!(is_unordered_type_name(
            "hashbrown::set::HashSet<u8, foldhash::fast::RandomState>"
        ));
    }

    #[test]
    fn containers_of_hash_sets_are_ordered_but_their_elements_are_not() {
        // The outer Vec keeps its order; each element is judged on its own
        // when `serialize_element::<HashSet<u8>>` runs.
        assert!(!is_unordered::<Vec<HashSet<u8>>>());
        assert!(is_unordered::<HashSet<u8>>());
        assert!(!is_unordered::<[HashSet<u8>]>());
        assert!(!is_unordered::<&[HashSet<u8>]>());
        assert!(!is_unordered::<Option<HashSet<u8>>>());
        assert!(!is_unordered::<HashMap<HashSet<u8>, u8>>());
    }

    #[test]
    fn sorted_and_ordered_collections_are_ordered() {
        // BTreeSet already iterates in sorted order, so plain sequence
        // hashing is canonical for it.
        assert!(!is_unordered::<BTreeSet<u8>>());
        assert!(!is_unordered::<Vec<u8>>());
        assert!(!is_unordered::<String>());
        assert!(!is_unordered::<str>());
        assert!(!is_unordered::<(HashSet<u8>, u8)>());
    }

    #[test]
    fn std_spelling_of_hash_set_is_pinned() {
        // If rustc ever changes this spelling, hash sets silently become
        // ordered; this test is the tripwire.
        assert!(type_name::<HashSet<u8>>().starts_with("std::collections::hash::set::HashSet<"));
        assert!(type_name::<Box<u8>>().starts_with("alloc::boxed::Box<"));
        assert!(type_name::<Arc<u8>>().starts_with("alloc::sync::Arc<"));
        assert!(type_name::<Rc<u8>>().starts_with("alloc::rc::Rc<"));
        assert!(type_name::<&mut u8>().starts_with("&mut "));
    }

    struct BrokenMap(&'static str);

    impl Serialize for BrokenMap {
        fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use ser::SerializeMap;
            let mut map = serializer.serialize_map(None)?;
            match self.0 {
                "value-first" => map.serialize_value(&1)?,
                "two-keys" => {
                    map.serialize_key("a")?;
                    map.serialize_key("b")?;
                }
                _ => map.serialize_key("dangling")?,
            }
            map.end()
        }
    }

    #[test]
    fn broken_key_value_alternation_is_an_error() {
        for case in ["value-first", "two-keys", "dangling-key"] {
            let mut out = Buffer::new();
            let result = write_value(&mut out, &BrokenMap(case));
            assert!(result.is_err(), "{case} was accepted");
        }
    }

    #[test]
    fn huge_length_hints_are_not_trusted() {
        struct Liar;
        impl Serialize for Liar {
            fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use ser::SerializeMap;
                serializer.serialize_map(Some(usize::MAX))?.end()
            }
        }
        let mut out = Buffer::new();
        assert!(write_value(&mut out, &Liar).is_ok());
    }
}
