//! The canonical encoding (bincode 2, standard configuration) that every frame, digest and
//! signature is computed over, with the frame size limit applied on decode.

use super::{WireError, FRAME_BYTES_MAX};
use serde::{de::DeserializeOwned, Serialize};

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Byte strings as one block rather than a sequence of `u8`s. The encoding is the same (a
/// varint length, then the bytes: bincode writes a `u8` as one raw byte), but the serde
/// default visits every byte, which costs about a second per megabyte sealed and opened in a
/// test build: simulating 4 MiB operations was dominated by it.
pub(super) mod byte_string {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                // Self-describing formats (JSON) hand a byte string back as a sequence.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// Canonical encoding (bincode 2 standard configuration).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    bincode::serde::encode_to_vec(value, codec()).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes with the frame size limit; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes: bytes.len() });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, codec())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Decode("trailing bytes".into()));
    }
    Ok(value)
}
