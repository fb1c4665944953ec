//! The audit HMAC key: the current version from the secret store, and older versions (read
//! again from the source when needed) so checkpoints signed before a rotation still verify.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use engram_runtime::secrets::{SecretSource, SecretStore};
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use crate::log::KeyProvider;

/// The field of `engram/audit` that holds the key.
pub const KEY_FIELD: &str = "hmac_key";

/// Current and past audit keys.
#[derive(Clone)]
pub struct KeyRing {
    store: SecretStore,
    source: Arc<dyn SecretSource>,
    known: Arc<Mutex<BTreeMap<u64, Zeroizing<Vec<u8>>>>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<u64> = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        f.debug_struct("KeyRing")
            .field("versions", &versions)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// A key ring over the service's secret store and its source.
    pub fn new(store: SecretStore, source: Arc<dyn SecretSource>) -> Self {
        Self {
            store,
            source,
            known: Arc::default(),
        }
    }

    /// The key in use now, remembered for later verification.
    pub fn current(&self) -> Option<(u64, Zeroizing<Vec<u8>>)> {
        let bundle = self.store.current()?;
        let key = Zeroizing::new(bundle.field(KEY_FIELD)?.expose_secret().as_bytes().to_vec());
        let version = bundle.version();
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(version)
            .or_insert_with(|| key.clone());
        Some((version, key))
    }

    /// The writer's view: the current key.
    pub fn provider(&self) -> KeyProvider {
        let ring = self.clone();
        Arc::new(move || ring.current())
    }

    /// The keys of `versions`: from memory, else read from the source. Versions the source
    /// no longer has (destroyed) are left out, and verification reports their checkpoints as
    /// unchecked.
    pub async fn keys_for(
        &self,
        versions: impl IntoIterator<Item = u64>,
    ) -> BTreeMap<u64, Zeroizing<Vec<u8>>> {
        let _ = self.current();
        let mut found = BTreeMap::new();
        for version in versions {
            let known = self
                .known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&version)
                .cloned();
            let key = match known {
                Some(key) => Some(key),
                None => match self.source.read_version(self.store.path(), version).await {
                    Ok(bundle) => bundle
                        .field(KEY_FIELD)
                        .map(|k| Zeroizing::new(k.expose_secret().as_bytes().to_vec())),
                    Err(error) => {
                        tracing::warn!(version, error = %error, "cannot read an older audit key version");
                        None
                    }
                },
            };
            if let Some(key) = key {
                self.known
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(version, key.clone());
                found.insert(version, key);
            }
        }
        found
    }
}
