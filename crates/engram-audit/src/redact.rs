//! Sensitive detail fields are stored as `hmac-sha256:<hex>` under the audit key, as Vault's
//! audit device does: a known value can be matched by computing its HMAC, but nothing can be
//! read back.

use serde_json::{Map, Value};

use crate::format::hmac_hex;
use crate::record::write_canonical;

/// Prefix of a redacted value.
pub const HMAC_PREFIX: &str = "hmac-sha256:";

/// The stored form of one sensitive value: strings by their bytes, anything else by its
/// canonical JSON.
pub fn hmac_value(key: &[u8], value: &Value) -> String {
    let digest = match value {
        Value::String(text) => hmac_hex(key, text.as_bytes()),
        other => {
            let mut canonical = String::new();
            write_canonical(other, &mut canonical);
            hmac_hex(key, canonical.as_bytes())
        }
    };
    format!("{HMAC_PREFIX}{digest}")
}

/// Replaces, at any depth, the value of every key whose name is in `sensitive` (compared
/// case-insensitively) by its HMAC. Returns how many values were replaced.
pub fn redact_sensitive(
    details: &mut Map<String, Value>,
    key: &[u8],
    sensitive: &[String],
) -> usize {
    let mut replaced = 0;
    for (name, value) in details.iter_mut() {
        if sensitive.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            *value = Value::String(hmac_value(key, value));
            replaced += 1;
        } else {
            replaced += redact_value(value, key, sensitive);
        }
    }
    replaced
}

fn redact_value(value: &mut Value, key: &[u8], sensitive: &[String]) -> usize {
    match value {
        Value::Object(map) => redact_sensitive(map, key, sensitive),
        Value::Array(items) => items
            .iter_mut()
            .map(|item| redact_value(item, key, sensitive))
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_fields_are_replaced_at_any_depth_and_can_be_matched() {
        let mut details: Map<String, Value> = serde_json::from_str(
            r#"{"api_key":"canary-123","nested":{"Token":"t-9","keep":"x"},"list":[{"password":1}],"pair":"BTCUSDT"}"#,
        )
        .expect("json");
        let sensitive = vec![
            "api_key".to_owned(),
            "token".to_owned(),
            "password".to_owned(),
        ];
        assert_eq!(redact_sensitive(&mut details, b"k", &sensitive), 3);
        let text = Value::Object(details.clone()).to_string();
        assert!(
            !text.contains("canary-123") && !text.contains("t-9"),
            "{text}"
        );
        assert_eq!(details["pair"], "BTCUSDT");
        assert_eq!(details["nested"]["keep"], "x");
        assert_eq!(
            details["api_key"],
            Value::String(hmac_value(b"k", &Value::String("canary-123".into())))
        );
        assert!(
            details["list"][0]["password"]
                .as_str()
                .is_some_and(|s| s.starts_with(HMAC_PREFIX))
        );
        assert_ne!(
            hmac_value(b"k", &Value::String("canary-123".into())),
            hmac_value(b"other", &Value::String("canary-123".into()))
        );
    }
}
