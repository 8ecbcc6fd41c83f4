//! The state codec: MessagePack (rmp-serde) with a versioned header, a byte cap checked
//! before anything is decoded, a nesting-depth cap, and optional LZ4 compression.
//!
//! Blob layout: `b'H'`, format version (1), flags (bit 0: LZ4), then the payload. With LZ4
//! the payload is the uncompressed length (u32 LE) followed by one LZ4 block; the length is
//! checked against the cap before any buffer is allocated, so a forged header cannot
//! make the decoder allocate more than the cap.

use serde::Serialize;
use serde::de::DeserializeOwned;

const MAGIC: u8 = b'H';
pub const FORMAT_VERSION: u8 = 1;
const FLAG_LZ4: u8 = 0b1;
const HEADER_LEN: usize = 3;
/// Payloads smaller than this are stored uncompressed even when compression is on.
const COMPRESS_MIN_BYTES: usize = 256;
/// The deepest nesting the decoder accepts, whatever the configuration says (rmp-serde's
/// own default of 1024 can overflow a tokio worker stack in debug builds).
pub const MAX_DEPTH_CEILING: usize = 64;

/// Why a blob could not be encoded or decoded. [`CodecError::code`] gives the stable error
/// code recorded on a quarantined process.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("state of {size} bytes exceeds the cap of {cap} bytes")]
    TooLarge { size: usize, cap: usize },
    #[error("state blob has no Honua header")]
    BadHeader,
    #[error("state blob has unknown format version {0}")]
    UnknownVersion(u8),
    #[error("state blob is nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("state blob is corrupt: {0}")]
    Corrupt(String),
    #[error("state cannot be encoded: {0}")]
    Encode(String),
}

impl CodecError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "state_too_large",
            Self::BadHeader | Self::Corrupt(_) | Self::TooDeep(_) => "state_corrupt",
            Self::UnknownVersion(_) => "state_unknown_version",
            Self::Encode(_) => "state_unencodable",
        }
    }
}

/// Encodes and decodes state blobs within configured bounds.
#[derive(Debug, Clone, Copy)]
pub struct StateCodec {
    max_bytes: usize,
    max_depth: usize,
    compress: bool,
}

impl StateCodec {
    /// `max_bytes` caps both the stored blob and the decoded payload; `max_depth` is capped
    /// at [`MAX_DEPTH_CEILING`].
    pub fn new(max_bytes: usize, max_depth: usize, compress: bool) -> Self {
        Self {
            max_bytes,
            max_depth: max_depth.clamp(1, MAX_DEPTH_CEILING),
            compress,
        }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let payload =
            rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode(e.to_string()))?;
        if payload.len() > self.max_bytes {
            return Err(CodecError::TooLarge {
                size: payload.len(),
                cap: self.max_bytes,
            });
        }
        // What this codec could not decode is refused here, not stored to fail later.
        self.decode_payload::<serde::de::IgnoredAny>(&payload)?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&[MAGIC, FORMAT_VERSION, 0]);
        if self.compress && payload.len() >= COMPRESS_MIN_BYTES {
            let block = lz4_flex::block::compress(&payload);
            if block.len() + 4 < payload.len() {
                out[2] = FLAG_LZ4;
                out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&block);
                return Ok(out);
            }
        }
        out.extend_from_slice(&payload);
        Ok(out)
    }

    pub fn decode<T: DeserializeOwned>(&self, blob: &[u8]) -> Result<T, CodecError> {
        if blob.len() > self.max_bytes + HEADER_LEN + 4 {
            return Err(CodecError::TooLarge {
                size: blob.len(),
                cap: self.max_bytes,
            });
        }
        if blob.len() < HEADER_LEN || blob[0] != MAGIC {
            return Err(CodecError::BadHeader);
        }
        if blob[1] != FORMAT_VERSION {
            return Err(CodecError::UnknownVersion(blob[1]));
        }
        let flags = blob[2];
        if flags & !FLAG_LZ4 != 0 {
            return Err(CodecError::Corrupt(format!("unknown flags {flags:#x}")));
        }
        let body = &blob[HEADER_LEN..];
        if flags & FLAG_LZ4 != 0 {
            let (len, block) = body
                .split_first_chunk::<4>()
                .ok_or_else(|| CodecError::Corrupt("truncated length".into()))?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > self.max_bytes {
                return Err(CodecError::TooLarge {
                    size: len,
                    cap: self.max_bytes,
                });
            }
            let mut buf = vec![0u8; len];
            let n = lz4_flex::block::decompress_into(block, &mut buf)
                .map_err(|e| CodecError::Corrupt(e.to_string()))?;
            if n != len {
                return Err(CodecError::Corrupt("length mismatch".into()));
            }
            self.decode_payload(&buf)
        } else {
            self.decode_payload(body)
        }
    }

    fn decode_payload<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, CodecError> {
        let mut de = rmp_serde::Deserializer::from_read_ref(payload);
        de.set_max_depth(self.max_depth);
        T::deserialize(&mut de).map_err(|e| match e {
            rmp_serde::decode::Error::DepthLimitExceeded => CodecError::TooDeep(self.max_depth),
            other => CodecError::Corrupt(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn codec(compress: bool) -> StateCodec {
        StateCodec::new(1024 * 1024, 32, compress)
    }

    #[test]
    fn round_trips_with_and_without_compression() {
        let v = json!({"a": [1, 2, 3], "b": "x".repeat(5000), "c": {"d": null, "e": 1.5}});
        for c in [false, true] {
            let blob = codec(c).encode(&v).unwrap();
            assert_eq!(codec(c).decode::<Value>(&blob).unwrap(), v);
            // Either codec reads both layouts.
            assert_eq!(codec(!c).decode::<Value>(&blob).unwrap(), v);
        }
        assert!(codec(true).encode(&v).unwrap().len() < codec(false).encode(&v).unwrap().len());
    }

    #[test]
    fn rejects_oversized_before_decoding() {
        let small = StateCodec::new(100, 32, false);
        let v = json!({"big": "y".repeat(500)});
        assert!(matches!(small.encode(&v), Err(CodecError::TooLarge { .. })));
        let blob = codec(false).encode(&v).unwrap();
        assert!(matches!(
            small.decode::<Value>(&blob),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn forged_lz4_length_cannot_allocate_past_the_cap() {
        let small = StateCodec::new(1000, 32, true);
        let mut blob = vec![MAGIC, FORMAT_VERSION, FLAG_LZ4];
        blob.extend_from_slice(&u32::MAX.to_le_bytes());
        blob.extend_from_slice(&[0, 0, 0]);
        let err = small.decode::<Value>(&blob).unwrap_err();
        assert_eq!(err.code(), "state_too_large");
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        // 10,000 nested one-element arrays: 0x91 repeated, then nil.
        let mut payload = vec![0x91u8; 10_000];
        payload.push(0xc0);
        let mut blob = vec![MAGIC, FORMAT_VERSION, 0];
        blob.extend_from_slice(&payload);
        let err = codec(false).decode::<Value>(&blob).unwrap_err();
        assert!(matches!(err, CodecError::TooDeep(32)), "{err}");
        assert_eq!(err.code(), "state_corrupt");
    }

    #[test]
    fn garbage_and_unknown_versions_are_typed_errors() {
        assert!(matches!(
            codec(false).decode::<Value>(b"{\"json\":1}"),
            Err(CodecError::BadHeader)
        ));
        assert!(matches!(
            codec(false).decode::<Value>(&[MAGIC, 9, 0, 0xc0]),
            Err(CodecError::UnknownVersion(9))
        ));
        assert!(matches!(
            codec(false).decode::<Value>(&[MAGIC, FORMAT_VERSION, 0, 0xc1]),
            Err(CodecError::Corrupt(_))
        ));
        assert!(matches!(
            codec(false).decode::<Value>(&[MAGIC, FORMAT_VERSION, 0x80]),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse_as_too_deep() {
        let c = StateCodec::new(1 << 20, 8, false);
        let mut deep = json!(1);
        for _ in 0..8 {
            deep = json!({ "a": deep });
        }
        assert!(matches!(c.encode(&deep), Err(CodecError::TooDeep(8))));
        let mut ok = json!(1);
        for _ in 0..7 {
            ok = json!({ "a": ok });
        }
        let blob = c.encode(&ok).unwrap();
        assert_eq!(c.decode::<Value>(&blob).unwrap(), ok);
    }

    #[test]
    fn depth_is_capped_at_the_ceiling() {
        let c = StateCodec::new(1 << 20, 10_000, false);
        assert_eq!(c.max_depth, MAX_DEPTH_CEILING);
    }
}
