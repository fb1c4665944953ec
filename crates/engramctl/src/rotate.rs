//! `engramctl rotate exchange|telegram|audit`: writes a new version of a service's secret to
//! Vault (KV v2), stamped with its creation date in the custom metadata, which the services
//! pick up without a restart. New values come from a file or standard input as JSON, never
//! from the command line (where `ps` and shell history would keep them); the audit key can
//! also be generated. The write is check-and-set on the version read, so two operators
//! rotating at once cannot silently overwrite each other. Nothing secret is printed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use crate::vault::VaultAccess;

/// Which secret to rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// `engram/exchange`: `api_key` with `api_secret` or `ed25519_private_key`.
    Exchange,
    /// `engram/telegram`: `bot_token` (and optionally `webhook_secret`); the allowlist stays.
    Telegram,
    /// `engram/audit`: `hmac_key` (or `--generate`).
    Audit,
}

impl Target {
    /// The KV path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Exchange => "engram/exchange",
            Self::Telegram => "engram/telegram",
            Self::Audit => "engram/audit",
        }
    }

    /// The fields a rotation may set.
    fn allowed(self) -> &'static [&'static str] {
        match self {
            Self::Exchange => &["api_key", "api_secret", "ed25519_private_key"],
            Self::Telegram => &["bot_token", "webhook_secret"],
            Self::Audit => &["hmac_key"],
        }
    }
}

/// Reads the new values: a JSON object of strings from `source` (a path, or `-` for stdin).
///
/// # Errors
///
/// When it cannot be read or is not such an object (the message never holds a value).
pub fn read_values(source: &Path) -> Result<BTreeMap<String, Zeroizing<String>>, String> {
    let mut text = Zeroizing::new(String::new());
    if source == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
    } else {
        *text = std::fs::read_to_string(source)
            .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
    }
    let value: Value = serde_json::from_str(&text)
        .map_err(|_| "the new values must be a JSON object of strings".to_owned())?;
    let object = value
        .as_object()
        .ok_or("the new values must be a JSON object of strings")?;
    object
        .iter()
        .map(|(name, value)| match value.as_str() {
            Some(v) if !v.trim().is_empty() => Ok((name.clone(), Zeroizing::new(v.to_owned()))),
            _ => Err(format!("{name} must be a non-empty string")),
        })
        .collect()
}

/// Checks the new values against what `target` accepts.
///
/// # Errors
///
/// Which field is unknown or missing.
pub fn check_values(
    target: Target,
    values: &BTreeMap<String, Zeroizing<String>>,
) -> Result<(), String> {
    if let Some(unknown) = values
        .keys()
        .find(|k| !target.allowed().contains(&k.as_str()))
    {
        return Err(format!(
            "{unknown} is not a field of {} (allowed: {})",
            target.path(),
            target.allowed().join(", ")
        ));
    }
    let has = |name: &str| values.contains_key(name);
    let complete = match target {
        Target::Exchange => has("api_key") && (has("api_secret") != has("ed25519_private_key")),
        Target::Telegram => has("bot_token") || has("webhook_secret"),
        Target::Audit => has("hmac_key"),
    };
    if complete {
        Ok(())
    } else {
        Err(match target {
            Target::Exchange => {
                "exchange needs api_key and exactly one of api_secret or ed25519_private_key"
            }
            Target::Telegram => "telegram needs bot_token and/or webhook_secret",
            Target::Audit => "audit needs hmac_key (or use --generate)",
        }
        .to_owned())
    }
}

/// A fresh audit key: 32 bytes from the system's secure random source, hex-encoded.
///
/// # Errors
///
/// When the random source fails.
pub fn generate_key() -> Result<Zeroizing<String>, String> {
    use ring::rand::SecureRandom;
    let mut bytes = Zeroizing::new([0_u8; 32]);
    ring::rand::SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| "the system's random source failed".to_owned())?;
    Ok(Zeroizing::new(hex::encode(bytes.as_ref())))
}

/// Today's date (UTC) as `YYYY-MM-DD`, the format the services read as `created`.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let days = i64::try_from(days).unwrap_or(0);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{m:02}-{d:02}", yoe + era * 400 + i64::from(m <= 2))
}

/// A call under the KV mount (`<mount>/<path>`): every rotation path is relative to it.
async fn vault(
    http: &reqwest::Client,
    access: &VaultAccess,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    crate::vault::call(
        http,
        access,
        method,
        &format!("{}/{path}", access.mount),
        body,
    )
    .await
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The KV path.
    pub path: &'static str,
    /// The version written.
    pub version: u64,
    /// The `created` date recorded.
    pub created: String,
    /// Which fields changed (names only).
    pub fields: Vec<String>,
}

/// Writes the new version: the current data with `values` replacing their fields, then the
/// `created` date in the custom metadata.
///
/// # Errors
///
/// When Vault refuses (including a concurrent rotation: the check-and-set fails).
pub async fn rotate(
    access: &VaultAccess,
    target: Target,
    values: &BTreeMap<String, Zeroizing<String>>,
) -> Result<Rotated, String> {
    let http = crate::vault::http_client(access)?;
    let path = target.path();
    let current = vault(
        &http,
        access,
        reqwest::Method::GET,
        &format!("data/{path}"),
        None,
    )
    .await?;
    let version = current["data"]["metadata"]["version"].as_u64().unwrap_or(0);
    let mut data: Map<String, Value> = current["data"]["data"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if target == Target::Exchange {
        // A key of the other kind must not linger next to the new one.
        data.remove("api_secret");
        data.remove("ed25519_private_key");
    }
    for (name, value) in values {
        data.insert(name.clone(), Value::String(value.as_str().to_owned()));
    }
    let body = json!({ "options": { "cas": version }, "data": data });
    let written = vault(
        &http,
        access,
        reqwest::Method::POST,
        &format!("data/{path}"),
        Some(body),
    )
    .await?;
    let new_version = written["data"]["version"]
        .as_u64()
        .ok_or_else(|| format!("Vault did not confirm a new version of {path}"))?;
    let created = today();
    vault(
        &http,
        access,
        reqwest::Method::POST,
        &format!("metadata/{path}"),
        Some(json!({ "custom_metadata": { "created": created } })),
    )
    .await?;
    Ok(Rotated {
        path,
        version: new_version,
        created,
        fields: values.keys().cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, Zeroizing<String>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Zeroizing::new((*v).to_owned())))
            .collect()
    }

    #[test]
    fn each_target_takes_its_own_fields() {
        assert!(
            check_values(
                Target::Exchange,
                &values(&[("api_key", "k"), ("api_secret", "s")])
            )
            .is_ok()
        );
        assert!(
            check_values(
                Target::Exchange,
                &values(&[("api_key", "k"), ("ed25519_private_key", "p")])
            )
            .is_ok()
        );
        assert!(check_values(Target::Exchange, &values(&[("api_key", "k")])).is_err());
        assert!(
            check_values(
                Target::Exchange,
                &values(&[
                    ("api_key", "k"),
                    ("api_secret", "s"),
                    ("ed25519_private_key", "p")
                ])
            )
            .is_err()
        );
        assert!(check_values(Target::Telegram, &values(&[("bot_token", "t")])).is_ok());
        let error = check_values(Target::Telegram, &values(&[("users", "1:admin")]))
            .expect_err("not rotatable");
        assert!(error.contains("users is not a field"), "{error}");
        assert!(check_values(Target::Audit, &values(&[])).is_err());
    }

    #[test]
    fn generated_keys_are_fresh_and_long() {
        let (a, b) = (generate_key().expect("key"), generate_key().expect("key"));
        assert_ne!(*a, *b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn today_is_a_date() {
        let today = today();
        assert_eq!(today.len(), 10);
        assert!(today.starts_with("20"));
        assert_eq!(today.as_bytes()[4], b'-');
    }
}
