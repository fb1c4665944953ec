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
        hex(&Sha256::digest(self.canonical_without_hash().as_bytes()))
    }

    /// The canonical form (keys sorted, no whitespace) of every field but `hash`, written
    /// field by field: the same bytes as `write_canonical` of the record's JSON object
    /// (a test holds the two together), without building that object on the hot path.
    pub fn canonical_without_hash(&self) -> String {
        let mut out = String::with_capacity(256 + self.details.len() * 32);
        let string = push_json_string;
        out.push_str("{\"action\":");
        string(&mut out, &self.action);
        out.push_str(",\"actor\":{\"service\":");
        string(&mut out, &self.actor.service);
        // Keys sorted: service < telegram_chat_id < telegram_user_id.
        if let Some(chat) = self.actor.telegram_chat_id {
            out.push_str(&format!(",\"telegram_chat_id\":{chat}"));
        }
        if let Some(user) = self.actor.telegram_user_id {
            out.push_str(&format!(",\"telegram_user_id\":{user}"));
        }
        out.push_str("},\"category\":");
        string(&mut out, &self.category);
        out.push_str(",\"correlation_id\":");
        string(&mut out, &self.correlation_id);
        out.push_str(",\"details\":");
        write_canonical_map(&self.details, &mut out);
        if !self.idempotency_key.is_empty() {
            out.push_str(",\"idempotency_key\":");
            string(&mut out, &self.idempotency_key);
        }
        out.push_str(&format!(",\"key_version\":{}", self.key_version));
        if let Some(occurred) = &self.occurred_at {
            out.push_str(",\"occurred_at\":");
            string(&mut out, occurred);
        }
        out.push_str(",\"prev_hash\":");
        string(&mut out, &self.prev_hash);
        out.push_str(&format!(",\"seq\":{}", self.seq));
        out.push_str(",\"trace_id\":");
        string(&mut out, &self.trace_id);
        out.push_str(",\"ts\":");
        string(&mut out, &self.ts);
        out.push('}');
        out
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

    /// Appends the JSON line and its newline to `out` (the writer's group buffer).
    pub fn write_line(&self, out: &mut Vec<u8>) {
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        }
    }
}

/// Writes a JSON object canonically (see [`write_canonical`]).
pub fn write_canonical_map(map: &Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    out.push('{');
    for (index, key) in keys.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        push_json_string(out, key);
        out.push(':');
        write_canonical(&map[key], out);
    }
    out.push('}');
}

/// Writes `value` as canonical JSON: object keys sorted at every level, no whitespace.
/// Independent of serde_json's map ordering features, which another crate could switch on.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => write_canonical_map(map, out),
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

/// Lower-case hex (a table lookup: this runs twice per record on the write path).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Appends `text` as a JSON string literal (quoted and escaped as serde_json does).
fn push_json_string(out: &mut String, text: &str) {
    match serde_json::to_string(text) {
        Ok(quoted) => out.push_str(&quoted),
        // Serializing a &str cannot fail.
        Err(_) => out.push_str("\"\""),
    }
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
    fn the_fast_canonical_form_equals_the_generic_one() {
        let mut variants = vec![record()];
        let mut full = record();
        full.actor.telegram_chat_id = Some(-100);
        full.occurred_at = Some("2026-12-03T00:00:00.000000001Z".to_owned());
        full.idempotency_key = "nonce-\"quoted\"".to_owned();
        full.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".to_owned();
        full.details =
            serde_json::from_str(r#"{"z":[1,{"b":2,"a":"é\n"}],"a":null}"#).expect("json");
        variants.push(full);
        for record in variants {
            let mut value = serde_json::to_value(&record).expect("value");
            if let Value::Object(map) = &mut value {
                map.remove("hash");
            }
            let mut generic = String::new();
            write_canonical(&value, &mut generic);
            assert_eq!(record.canonical_without_hash(), generic);
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut line: Value = serde_json::from_str(&record().to_line()).expect("json");
        line["extra"] = Value::Bool(true);
        assert!(serde_json::from_value::<Record>(line).is_err());
    }
}
