//! The development secret source: the seed document's environment variables and `.env` file.
//!
//! It exists so a person can run the stack with their own testnet key and bot without a
//! Vault. It never rotates (version 1 forever) and it announces itself loudly at start.

use std::collections::BTreeMap;
use std::path::Path;

use futures::FutureExt;
use futures::future::BoxFuture;
use secrecy::SecretString;

use super::{SecretBundle, SecretError, SecretSource};
use crate::config::{ConfigSource, MapSource};

/// How each Engram secret path maps onto the seed's variable names.
/// (path, field, variable).
const MAPPING: &[(&str, &str, &str)] = &[
    ("engram/telegram", "bot_token", "TELEGRAM_BOT_TOKEN"),
    ("engram/telegram", "allowed_chats", "TELEGRAM_CHAT_ID"),
    ("engram/telegram", "admin_chat", "TELEGRAM_CHAT_ID"),
    ("engram/exchange", "api_key", "BINANCE_API_KEY"),
    ("engram/exchange", "api_secret", "BINANCE_API_SECRET"),
    ("engram/audit", "hmac_key", "ENGRAM_AUDIT_HMAC_KEY"),
    ("engram/llm", "api_key", "LMSTUDIO_API_KEY"),
];

/// Secrets from environment variables, with a `.env` file underneath. Dev only.
pub struct EnvSecretSource {
    bundles: BTreeMap<String, SecretBundle>,
}

impl std::fmt::Debug for EnvSecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvSecretSource")
            .field("paths", &self.bundles.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl EnvSecretSource {
    /// Reads the seed variables from `env`, falling back to the `.env` file at `dotenv`
    /// (when it exists). Prints a loud warning: this source is for development only.
    ///
    /// # Errors
    ///
    /// [`SecretError::Invalid`] when the `.env` file exists but cannot be read or parsed.
    pub fn load(env: &dyn ConfigSource, dotenv: Option<&Path>) -> Result<Self, SecretError> {
        let file_layer = match dotenv {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|e| SecretError::Invalid {
                    path: path.display().to_string(),
                    reason: format!("cannot read: {e}"),
                })?;
                parse_dotenv(&text).map_err(|reason| SecretError::Invalid {
                    path: path.display().to_string(),
                    reason,
                })?
            }
            _ => MapSource::default(),
        };
        let lookup = |name: &str| {
            env.get(name)
                .or_else(|| file_layer.get(name))
                .filter(|v| !v.trim().is_empty())
        };

        let mut bundles: BTreeMap<String, SecretBundle> = BTreeMap::new();
        for (path, field, variable) in MAPPING {
            let Some(value) = lookup(variable) else {
                continue;
            };
            let bundle = bundles.entry((*path).to_owned()).or_insert_with(|| {
                SecretBundle::new(*path, 1, None, BTreeMap::new(), BTreeMap::new())
            });
            bundle
                .fields
                .insert((*field).to_owned(), SecretString::from(value));
        }
        // The chat id of a private chat is also its user's id: make that user an admin, as
        // DESIGN.md's local defaults describe.
        if let Some(chat) = lookup("TELEGRAM_CHAT_ID")
            && let Some(bundle) = bundles.get_mut("engram/telegram")
        {
            bundle.fields.insert(
                "users".to_owned(),
                SecretString::from(format!("{}:admin", chat.trim())),
            );
        }
        if let Some(created) = lookup("API_KEY_CREATED_DATE")
            && let Some(bundle) = bundles.get_mut("engram/exchange")
        {
            bundle
                .custom_metadata
                .insert("created".to_owned(), created.trim().to_owned());
        }
        // The LLM key is optional: an empty bundle still counts as loaded.
        bundles.entry("engram/llm".to_owned()).or_insert_with(|| {
            SecretBundle::new("engram/llm", 1, None, BTreeMap::new(), BTreeMap::new())
        });

        tracing::warn!(
            target: "security",
            paths = ?bundles.keys().collect::<Vec<_>>(),
            "DEV ONLY: secrets come from environment variables / .env, not Vault; \
             they cannot rotate and are visible to anything that can read this process's environment"
        );
        eprintln!(
            "\n!!! ENGRAM DEV SECRET SOURCE: secrets are read from the environment / .env, not Vault. \
             Never run this way in production. !!!\n"
        );
        Ok(Self { bundles })
    }
}

impl SecretSource for EnvSecretSource {
    fn kind(&self) -> &'static str {
        "env"
    }

    fn current_version<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, SecretError>> {
        let result = self
            .bundles
            .get(path)
            .map(SecretBundle::version)
            .ok_or_else(|| SecretError::NotFound {
                path: path.to_owned(),
            });
        futures::future::ready(result).boxed()
    }

    fn read<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<SecretBundle, SecretError>> {
        let result = self
            .bundles
            .get(path)
            .cloned()
            .ok_or_else(|| SecretError::NotFound {
                path: path.to_owned(),
            });
        futures::future::ready(result).boxed()
    }

    fn read_version<'a>(
        &'a self,
        path: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<SecretBundle, SecretError>> {
        // The environment has exactly one version.
        let result = self
            .bundles
            .get(path)
            .filter(|bundle| bundle.version() == version)
            .cloned()
            .ok_or_else(|| SecretError::NotFound {
                path: format!("{path} version {version}"),
            });
        futures::future::ready(result).boxed()
    }
}

/// Parses a `.env` file: `NAME=value` lines, `#` comments, optional `export ` prefix, and
/// values optionally in single or double quotes.
///
/// # Errors
///
/// The line number and what is wrong with it (never the value).
pub fn parse_dotenv(text: &str) -> Result<MapSource, String> {
    let mut values = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!("line {number}: expected NAME=value"));
        };
        let name = name.trim();
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!("line {number}: invalid variable name"));
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                let Some(inner) = value[1..].strip_suffix(quote) else {
                    return Err(format!("line {number}: unterminated quote"));
                };
                inner
            }
            _ => value.split(" #").next().unwrap_or_default().trim(),
        };
        values.insert(name.to_owned(), value.to_owned());
    }
    Ok(MapSource(values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn dotenv_parses_comments_quotes_and_export() {
        let parsed =
            parse_dotenv("# comment\nexport A=1\nB=\"two words\"\nC='x=y'\nD=plain # trailing\n\n")
                .expect("valid");
        assert_eq!(parsed.get("A").as_deref(), Some("1"));
        assert_eq!(parsed.get("B").as_deref(), Some("two words"));
        assert_eq!(parsed.get("C").as_deref(), Some("x=y"));
        assert_eq!(parsed.get("D").as_deref(), Some("plain"));
    }

    #[test]
    fn dotenv_rejects_bad_lines_without_echoing_values() {
        for (text, expected) in [
            ("NOEQUALS", "line 1: expected NAME=value"),
            ("\n1BAD=x", "line 2: invalid variable name"),
            ("A=\"open-secret", "line 1: unterminated quote"),
            ("BAD NAME=x", "line 1: invalid variable name"),
        ] {
            let error = parse_dotenv(text).expect_err(text);
            assert_eq!(error, expected);
            assert!(!error.contains("open-secret"));
        }
    }

    #[tokio::test]
    async fn maps_seed_variables_onto_engram_paths() {
        let env = MapSource::from_pairs([
            ("TELEGRAM_BOT_TOKEN", "dev-bot-token"),
            ("TELEGRAM_CHAT_ID", "4242"),
            ("BINANCE_API_KEY", "dev-key"),
            ("API_KEY_CREATED_DATE", "2026-11-01"),
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let dotenv = dir.path().join(".env");
        std::fs::write(
            &dotenv,
            "BINANCE_API_SECRET=from-file\nBINANCE_API_KEY=ignored\n",
        )
        .expect("write");
        let source = EnvSecretSource::load(&env, Some(&dotenv)).expect("loads");

        let telegram = source.read("engram/telegram").await.expect("telegram");
        assert_eq!(
            telegram
                .field("users")
                .map(|s| s.expose_secret().to_owned()),
            Some("4242:admin".to_owned())
        );
        let exchange = source.read("engram/exchange").await.expect("exchange");
        assert_eq!(
            exchange
                .field("api_key")
                .map(|s| s.expose_secret().to_owned()),
            Some("dev-key".to_owned()),
            "the environment wins over .env"
        );
        assert_eq!(
            exchange
                .field("api_secret")
                .map(|s| s.expose_secret().to_owned()),
            Some("from-file".to_owned())
        );
        assert_eq!(
            exchange
                .custom_metadata()
                .get("created")
                .map(String::as_str),
            Some("2026-11-01")
        );
        assert!(
            source.read("engram/audit").await.is_err(),
            "unset path is not found"
        );
        assert_eq!(source.current_version("engram/llm").await, Ok(1));
    }
}
