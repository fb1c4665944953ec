//! One audit record: its JSON-lines form, its canonical serialization and its hash.
//!
//! A record is one JSON object per line, fields in a fixed order so `jq` and `grep` read it
//! naturally. Its `hash` is SHA-256 over the canonical serialization (keys sorted at every
//! level, no whitespace) of every field except `hash` itself, `prev_hash` included: changing
//! any byte of any earlier record changes every later hash.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev_hash` of the very first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who caused a record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordActor {
    /// Service name, for example `telegram-gateway`.
    pub service: String,
    /// Telegram user id, when a person is behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_user_id: Option<i64>,
    /// Telegram chat id, when the action came from a chat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<i64>,
}

/// A stored audit record, as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1, 2, 3, … with no gap across segments.
    pub seq: u64,
    /// When the sink recorded it, RFC 3339 UTC with nanoseconds.
    pub ts: String,
    /// `audit` or `security`.
    pub category: String,
    /// Upper snake case, for example `TRADE_EXECUTED`.
    pub action: String,
    /// Who caused it.
    pub actor: RecordActor,
    /// A JSON object; sensitive fields are `hmac-sha256:<hex>`.
    pub details: Map<String, Value>,
    /// Ties the record to the command that caused it.
    pub correlation_id: String,
    /// W3C trace id, when known.
    pub trace_id: String,
    /// When the caller says it happened, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    /// The caller's idempotency key, when it gave one: a retry with the same key gets this
    /// record's acknowledgement instead of a second record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub idempotency_key: String,
    /// Version of the audit HMAC key used for the sensitive fields.
    pub key_version: u64,
    /// `hash` of the record before (GENESIS_HASH for the first).
    pub prev_hash: String,
    /// SHA-256 of this record's canonical form, hex.
    pub hash: String,
}

impl Record {
    /// The hash this record should carry: SHA-256 over its canonical form without `hash`.
    pub fn compute_hash(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.remove("hash");
        }
        let mut canonical = String::new();
        write_canonical(&value, &mut canonical);
        hex(&Sha256::digest(canonical.as_bytes()))
    }

    /// Fills in `hash` from the other fields.
    pub fn seal(mut self) -> Self {
        self.hash = self.compute_hash();
        self
    }

    /// The JSON line (without the newline).
    pub fn to_line(&self) -> String {
        // Serializing a struct of strings, numbers and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Writes `value` as canonical JSON: object keys sorted at every level, no whitespace.
/// Independent of serde_json's map ordering features, which another crate could switch on.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            seq: 1,
            ts: "2026-12-03T00:00:00.000000000Z".to_owned(),
            category: "audit".to_owned(),
            action: "TRADE_EXECUTED".to_owned(),
            actor: RecordActor {
                service: "exchange-signer".to_owned(),
                telegram_user_id: Some(42),
                telegram_chat_id: None,
            },
            details: serde_json::from_str(r#"{"pair":"BTC/USDT","amount":"0.01"}"#).expect("json"),
            correlation_id: "c-1".to_owned(),
            trace_id: String::new(),
            occurred_at: None,
            idempotency_key: String::new(),
            key_version: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            hash: String::new(),
        }
        .seal()
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_level() {
        let value: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":"x"}}"#).expect("json");
        let mut out = String::new();
        write_canonical(&value, &mut out);
        assert_eq!(out, r#"{"a":{"c":"x","d":[{"y":2,"z":1}]},"b":1}"#);
    }

    #[test]
    fn the_hash_covers_every_field_and_round_trips_through_the_line() {
        let sealed = record();
        assert_eq!(sealed.hash.len(), 64);
        let parsed: Record = serde_json::from_str(&sealed.to_line()).expect("parses");
        assert_eq!(parsed, sealed);
        assert_eq!(parsed.compute_hash(), sealed.hash);

        let mut edited = sealed.clone();
        edited.prev_hash = "1".repeat(64);
        assert_ne!(edited.compute_hash(), sealed.hash, "prev_hash is covered");
        let mut edited = sealed.clone();
        edited
            .details
            .insert("amount".to_owned(), Value::String("0.02".to_owned()));
        assert_ne!(edited.compute_hash(), sealed.hash, "details are covered");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut line: Value = serde_json::from_str(&record().to_line()).expect("json");
        line["extra"] = Value::Bool(true);
        assert!(serde_json::from_value::<Record>(line).is_err());
    }
}
