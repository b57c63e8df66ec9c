//! The bytes a completed record holds: the body's result as JSON, readable by an operator.
//!
//! `{"ok": <value>}` for an `Ok` value and, with `cache_errors`, `{"err": <error>}` for an
//! `Err`. The tag keeps room for both and makes a record written with `cache_errors` fail to
//! decode, with a clear error, in a function that no longer caches errors.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How one kind of call records and replays its result.
pub(crate) trait Recording<T, E> {
    fn encode_ok(value: &T) -> serde_json::Result<Vec<u8>>;

    /// `None` when `Err` results are not recorded (the key is released instead).
    fn encode_err(error: &E) -> Option<serde_json::Result<Vec<u8>>>;

    fn decode(bytes: &[u8]) -> serde_json::Result<Result<T, E>>;
}

/// The default: `Ok` values are recorded, an `Err` releases the key so a retry runs again.
pub(crate) struct OkOnly;

/// `cache_errors`: `Err` values are recorded and replayed too.
pub(crate) struct OkAndErr;

#[derive(Serialize)]
enum Encode<'a, T, E> {
    #[serde(rename = "ok")]
    Ok(&'a T),
    #[serde(rename = "err")]
    Err(&'a E),
}

#[derive(Deserialize)]
enum DecodeOk<T> {
    #[serde(rename = "ok")]
    Ok(T),
}

#[derive(Deserialize)]
enum DecodeAny<T, E> {
    #[serde(rename = "ok")]
    Ok(T),
    #[serde(rename = "err")]
    Err(E),
}

impl<T: Serialize + DeserializeOwned, E> Recording<T, E> for OkOnly {
    fn encode_ok(value: &T) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&Encode::<T, ()>::Ok(value))
    }

    fn encode_err(_: &E) -> Option<serde_json::Result<Vec<u8>>> {
        None
    }

    fn decode(bytes: &[u8]) -> serde_json::Result<Result<T, E>> {
        let DecodeOk::Ok(value) = serde_json::from_slice::<DecodeOk<T>>(bytes)?;
        Ok(Ok(value))
    }
}

impl<T, E> Recording<T, E> for OkAndErr
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
{
    fn encode_ok(value: &T) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&Encode::<T, E>::Ok(value))
    }

    fn encode_err(error: &E) -> Option<serde_json::Result<Vec<u8>>> {
        Some(serde_json::to_vec(&Encode::<T, E>::Err(error)))
    }

    fn decode(bytes: &[u8]) -> serde_json::Result<Result<T, E>> {
        Ok(match serde_json::from_slice::<DecodeAny<T, E>>(bytes)? {
            DecodeAny::Ok(value) => Ok(value),
            DecodeAny::Err(error) => Err(error),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_values_are_tagged_json() {
        let bytes = <OkOnly as Recording<u32, ()>>::encode_ok(&7).unwrap();
        assert_eq!(bytes, br#"{"ok":7}"#);
        assert_eq!(
            <OkOnly as Recording<u32, ()>>::decode(&bytes).unwrap(),
            Ok(7)
        );
    }

    #[test]
    fn errors_round_trip_only_when_cached() {
        let bytes = <OkAndErr as Recording<u32, String>>::encode_err(&"declined".to_string())
            .unwrap()
            .unwrap();
        assert_eq!(bytes, br#"{"err":"declined"}"#);
        assert_eq!(
            <OkAndErr as Recording<u32, String>>::decode(&bytes).unwrap(),
            Err("declined".to_string())
        );
        // A function that stopped caching errors does not silently treat the record as a miss.
        assert!(<OkOnly as Recording<u32, String>>::decode(&bytes).is_err());
        assert!(<OkOnly as Recording<u32, String>>::encode_err(&String::new()).is_none());
    }

    #[test]
    fn a_changed_type_fails_to_decode() {
        let bytes = <OkOnly as Recording<String, ()>>::encode_ok(&"x".to_string()).unwrap();
        assert!(<OkOnly as Recording<u32, ()>>::decode(&bytes).is_err());
        assert!(<OkOnly as Recording<u32, ()>>::decode(b"garbage").is_err());
    }

    #[test]
    fn floats_replay_bit_for_bit() {
        // Found by the stored_record fuzz target: without serde_json's float_roundtrip this
        // came back one ULP off.
        for x in [
            1.2345678901234567e-11_f64,
            0.1,
            1e300,
            5e-324,
            -0.0,
            1.2345678901234568e-23,
        ] {
            let bytes = <OkOnly as Recording<f64, ()>>::encode_ok(&x).unwrap();
            let back = <OkOnly as Recording<f64, ()>>::decode(&bytes)
                .unwrap()
                .unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x:e} came back as {back:e}");
        }
    }
}
