//! Secrets: typed bundles read from a [`SecretSource`] (Vault, or the environment in dev),
//! held in a [`SecretStore`] that swaps atomically when a new version appears.
//!
//! A value is a [`SecretString`]: it zeroizes on drop and has no `Debug`/`Display` that
//! shows it. Code calls `expose_secret()` only at the point of use.

mod env;
mod store;
mod vault;

use std::collections::BTreeMap;
use std::fmt;

use futures::future::BoxFuture;
use secrecy::SecretString;

pub use env::{EnvSecretSource, parse_dotenv};
pub use store::{SecretStore, SecretWatcher, SecretsStatus, WatcherSettings};
pub use vault::{IssuedCertificate, VaultAuth, VaultSettings, VaultSource};

/// One version of one secret path: its fields (secret) and its metadata (not secret).
#[derive(Clone)]
pub struct SecretBundle {
    path: String,
    version: u64,
    created_time: Option<String>,
    custom_metadata: BTreeMap<String, String>,
    fields: BTreeMap<String, SecretString>,
}

impl SecretBundle {
    /// Builds a bundle. `custom_metadata` must hold no secret values: it is logged.
    pub fn new(
        path: impl Into<String>,
        version: u64,
        created_time: Option<String>,
        custom_metadata: BTreeMap<String, String>,
        fields: BTreeMap<String, SecretString>,
    ) -> Self {
        Self {
            path: path.into(),
            version,
            created_time,
            custom_metadata,
            fields,
        }
    }

    /// The path this bundle was read from, for example `engram/exchange`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The source's version number (Vault KV v2 version; 1 for the environment source).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When this version was written (RFC 3339), when the source knows.
    pub fn created_time(&self) -> Option<&str> {
        self.created_time.as_deref()
    }

    /// Non-secret metadata, such as a key's `created` date.
    pub fn custom_metadata(&self) -> &BTreeMap<String, String> {
        &self.custom_metadata
    }

    /// One secret field, if present.
    pub fn field(&self, name: &str) -> Option<&SecretString> {
        self.fields.get(name)
    }

    /// The names (never the values) of the fields present.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// The required field names that are missing or empty.
    pub fn missing_fields<'a>(&self, required: &[&'a str]) -> Vec<&'a str> {
        use secrecy::ExposeSecret;
        required
            .iter()
            .copied()
            .filter(|name| {
                self.fields
                    .get(*name)
                    .is_none_or(|value| value.expose_secret().trim().is_empty())
            })
            .collect()
    }
}

impl fmt::Debug for SecretBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretBundle")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("created_time", &self.created_time)
            .field("custom_metadata", &self.custom_metadata)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a secret could not be read. Messages name paths and causes, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The source could not be reached (network, Vault sealed or down).
    #[error("secret source unreachable: {0}")]
    Unreachable(String),
    /// The source refused: the token is invalid, revoked or lacks the policy.
    #[error("permission denied reading {path}")]
    PermissionDenied {
        /// The path that was refused.
        path: String,
    },
    /// Nothing is stored at the path.
    #[error("no secret at {path}")]
    NotFound {
        /// The path that was empty.
        path: String,
    },
    /// Logging in to the source failed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The stored data has the wrong shape.
    #[error("invalid secret at {path}: {reason}")]
    Invalid {
        /// The path with bad data.
        path: String,
        /// What is wrong (never the value).
        reason: String,
    },
}

/// Where secrets come from. Implementations must never put a value into an error.
pub trait SecretSource: Send + Sync + 'static {
    /// A short name for logs and metrics: `vault` or `env`.
    fn kind(&self) -> &'static str;

    /// The newest version number at `path`: a cheap call used to poll for rotation.
    fn current_version<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, SecretError>>;

    /// Reads the newest version at `path`.
    fn read<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<SecretBundle, SecretError>>;

    /// Reads one given version at `path` (for example an older audit key, to verify what it
    /// signed).
    fn read_version<'a>(
        &'a self,
        path: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<SecretBundle, SecretError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> SecretBundle {
        let mut fields = BTreeMap::new();
        fields.insert("api_key".to_owned(), SecretString::from("sk-live-abcdef"));
        fields.insert("empty".to_owned(), SecretString::from("  "));
        SecretBundle::new("engram/exchange", 3, None, BTreeMap::new(), fields)
    }

    #[test]
    fn debug_names_fields_but_never_values() {
        let text = format!("{:?}", bundle());
        assert!(text.contains("api_key"), "{text}");
        assert!(!text.contains("sk-live-abcdef"), "{text}");
    }

    #[test]
    fn missing_fields_treats_blank_as_missing() {
        assert_eq!(
            bundle().missing_fields(&["api_key", "empty", "api_secret"]),
            ["empty", "api_secret"]
        );
    }
}
