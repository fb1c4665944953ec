//! The on-disk format of an audit directory: segment names, the checkpoint file, signed
//! checkpoints. Shared by the sink (which writes) and the verifiers (which only read).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::record::{hex, write_canonical};

/// File name prefix and suffix of a segment: `audit-<first seq, 20 digits>.jsonl`, so that
/// names sort in sequence order.
pub const SEGMENT_PREFIX: &str = "audit-";
/// See [`SEGMENT_PREFIX`].
pub const SEGMENT_SUFFIX: &str = ".jsonl";
/// The checkpoint file, one signed checkpoint per line.
pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";

/// A signed statement of the chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Sequence number of the head record.
    pub seq: u64,
    /// Its hash.
    pub head_hash: String,
    /// When the checkpoint was made, RFC 3339.
    pub ts: String,
    /// Version of the audit key that signed it.
    pub key_version: u64,
    /// Hex HMAC-SHA256 over the canonical form of the other fields.
    pub signature: String,
}

impl Checkpoint {
    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let value = serde_json::json!({
            "seq": self.seq,
            "head_hash": self.head_hash,
            "ts": self.ts,
            "key_version": self.key_version,
        });
        let mut out = String::new();
        write_canonical(&value, &mut out);
        out.into_bytes()
    }

    /// The expected signature with `key`.
    pub fn sign(&self, key: &[u8]) -> String {
        hmac_hex(key, &self.signed_bytes())
    }
}

/// HMAC-SHA256 of `data` with `key`, hex.
pub fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    match <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            hex(&mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => String::new(),
    }
}

/// The segment files in `dir`, in order, with the first sequence number each name claims.
///
/// # Errors
///
/// When the directory cannot be read.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(first) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|rest| rest.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|digits| digits.parse::<u64>().ok())
        {
            segments.push((first, path));
        }
    }
    segments.sort();
    Ok(segments)
}

/// The path of the segment whose first record is `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}"))
}

/// RFC 3339 UTC with nanoseconds (fixed width, so the text sorts in time order).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}
