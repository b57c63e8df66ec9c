//! Lowercase hex of the 32-byte digests (storage keys, fingerprints), written from the stack:
//! stores and logs format them on every call, and a formatter call per byte costs more than the
//! SHA-256 that made the digest.

use std::fmt;

/// Lowercase hex of 32 bytes.
pub(crate) fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 64];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    hex
}

/// Writes the first `digits` (at most 64) hex digits of `bytes`, in one write.
pub(crate) fn write_hex32(
    f: &mut fmt::Formatter<'_>,
    bytes: &[u8; 32],
    digits: usize,
) -> fmt::Result {
    let hex = hex32(bytes);
    f.write_str(std::str::from_utf8(&hex[..digits]).map_err(|_| fmt::Error)?)
}
