//! The in-memory home of a service's secret, and the watcher that keeps it current.
//!
//! Readers take an `Arc` snapshot with [`SecretStore::current`] (lock-free); a request that
//! started with the old version finishes with it while new requests see the new one.
//! Subscribers get every new version through a `watch` channel.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{SecretBundle, SecretError, SecretSource};

/// How often to poll and how to back off while nothing is loaded yet.
#[derive(Debug, Clone, Copy)]
pub struct WatcherSettings {
    /// Poll interval once a secret is loaded: a new version is seen within this time.
    pub refresh_interval: Duration,
    /// First retry delay while the first load keeps failing; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest retry delay for the first load.
    pub max_backoff: Duration,
}

/// What the watcher last learned about the source, for readiness and metrics.
#[derive(Debug, Clone, Default)]
pub struct SecretsStatus {
    /// Whether the last request to the source succeeded.
    pub source_reachable: bool,
    /// The last error, if the last request failed (never contains a secret value).
    pub last_error: Option<String>,
    /// When the last request succeeded.
    pub last_success: Option<SystemTime>,
}

struct StoreInner {
    path: String,
    source_kind: &'static str,
    required_fields: Vec<&'static str>,
    current: ArcSwapOption<SecretBundle>,
    notify: watch::Sender<Option<Arc<SecretBundle>>>,
    status: Mutex<SecretsStatus>,
}

/// A service's secret bundle: the current version, swapped atomically on rotation.
#[derive(Clone)]
pub struct SecretStore {
    inner: Arc<StoreInner>,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore")
            .field("path", &self.inner.path)
            .field("version", &self.current().map(|b| b.version()))
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    /// An empty store for `path`, filled by a [`SecretWatcher`].
    pub fn new(
        path: impl Into<String>,
        source_kind: &'static str,
        required_fields: &[&'static str],
    ) -> Self {
        let (notify, _) = watch::channel(None);
        Self {
            inner: Arc::new(StoreInner {
                path: path.into(),
                source_kind,
                required_fields: required_fields.to_vec(),
                current: ArcSwapOption::empty(),
                notify,
                status: Mutex::new(SecretsStatus::default()),
            }),
        }
    }

    /// The secret path, for example `engram/audit`.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// `vault` or `env`.
    pub fn source_kind(&self) -> &'static str {
        self.inner.source_kind
    }

    /// The current bundle, if one has been loaded.
    pub fn current(&self) -> Option<Arc<SecretBundle>> {
        self.inner.current.load_full()
    }

    /// Whether a bundle has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.inner.current.load().is_some()
    }

    /// A receiver that sees every newly loaded version.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<SecretBundle>>> {
        self.inner.notify.subscribe()
    }

    /// What the watcher last learned about the source.
    pub fn status(&self) -> SecretsStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record_status(&self, result: Result<(), &SecretError>) {
        let mut status = self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => {
                status.source_reachable = true;
                status.last_error = None;
                status.last_success = Some(SystemTime::now());
            }
            Err(error) => {
                status.source_reachable = !matches!(error, SecretError::Unreachable(_));
                status.last_error = Some(error.to_string());
            }
        }
    }

    fn install(&self, bundle: SecretBundle) -> Arc<SecretBundle> {
        let bundle = Arc::new(bundle);
        self.inner.current.store(Some(bundle.clone()));
        self.inner.notify.send_replace(Some(bundle.clone()));
        bundle
    }
}

#[derive(Clone)]
struct WatcherMetrics {
    version: IntGaugeVec,
    loaded: IntGaugeVec,
    created: IntGaugeVec,
    refreshes: IntCounterVec,
    rotations: IntCounterVec,
    source_up: IntGaugeVec,
}

impl WatcherMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = Self {
            version: gauge(
                "engram_secret_version",
                "Version of the secret in use.",
                &["path"],
            )?,
            loaded: gauge(
                "engram_secret_loaded",
                "1 once a valid secret has been loaded.",
                &["path"],
            )?,
            created: gauge(
                "engram_secret_created_timestamp_seconds",
                "When the secret in use was created (custom_metadata `created`, else the version's time).",
                &["path"],
            )?,
            refreshes: counter(
                "engram_secret_refresh_total",
                "Secret polls by outcome: unchanged, loaded, rotated, invalid, error.",
                &["path", "outcome"],
            )?,
            rotations: counter(
                "engram_secret_rotations_total",
                "New secret versions taken into use.",
                &["path"],
            )?,
            source_up: gauge(
                "engram_secret_source_up",
                "1 when the last request to the secret source (vault or env) succeeded.",
                &["source"],
            )?,
        };
        registry.register(Box::new(metrics.version.clone()))?;
        registry.register(Box::new(metrics.loaded.clone()))?;
        registry.register(Box::new(metrics.created.clone()))?;
        registry.register(Box::new(metrics.refreshes.clone()))?;
        registry.register(Box::new(metrics.rotations.clone()))?;
        registry.register(Box::new(metrics.source_up.clone()))?;
        Ok(metrics)
    }
}

/// Polls a source and keeps a [`SecretStore`] current.
pub struct SecretWatcher {
    store: SecretStore,
    source: Arc<dyn SecretSource>,
    settings: WatcherSettings,
    metrics: WatcherMetrics,
}

impl std::fmt::Debug for SecretWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretWatcher")
            .field("store", &self.store)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SecretWatcher {
    /// A watcher for `store` over `source`.
    ///
    /// # Errors
    ///
    /// When its metrics cannot be registered (a duplicate registration).
    pub fn new(
        store: SecretStore,
        source: Arc<dyn SecretSource>,
        settings: WatcherSettings,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let metrics = WatcherMetrics::register(registry)?;
        metrics.loaded.with_label_values(&[store.path()]).set(0);
        metrics.source_up.with_label_values(&[source.kind()]).set(0);
        Ok(Self {
            store,
            source,
            settings,
            metrics,
        })
    }

    /// Polls until `shutdown`: immediately, then every refresh interval once loaded, or with
    /// capped exponential backoff (with jitter) while the first load keeps failing.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.settings.initial_backoff;
        loop {
            let loaded_before = self.store.is_loaded();
            let result = self.poll_once().await;
            let wait = if self.store.is_loaded() {
                self.settings.refresh_interval
            } else if result.is_err() || !loaded_before {
                let wait = jittered(backoff);
                backoff = (backoff * 2).min(self.settings.max_backoff);
                wait
            } else {
                self.settings.refresh_interval
            };
            if self.store.is_loaded() {
                backoff = self.settings.initial_backoff;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One poll: check the version, load it if new, validate, swap, tell subscribers.
    ///
    /// # Errors
    ///
    /// The source's error, or [`SecretError::Invalid`] when a new version lacks a required
    /// field; in both cases the last good bundle stays in use.
    pub async fn poll_once(&self) -> Result<(), SecretError> {
        let path = self.store.path().to_owned();
        let result = self.poll_inner(&path).await;
        let source_ok = !matches!(result, Err(SecretError::Unreachable(_)));
        self.metrics
            .source_up
            .with_label_values(&[self.source.kind()])
            .set(i64::from(
                source_ok && !matches!(result, Err(SecretError::Auth(_))),
            ));
        match &result {
            Ok(outcome) => {
                self.store.record_status(Ok(()));
                self.metrics
                    .refreshes
                    .with_label_values(&[path.as_str(), outcome])
                    .inc();
            }
            Err(error) => {
                self.store.record_status(Err(error));
                let outcome = if matches!(error, SecretError::Invalid { .. }) {
                    "invalid"
                } else {
                    "error"
                };
                self.metrics
                    .refreshes
                    .with_label_values(&[path.as_str(), outcome])
                    .inc();
                let kept = self.store.current().map(|b| b.version());
                tracing::warn!(
                    target: "security",
                    path = %path,
                    source = self.source.kind(),
                    kept_version = ?kept,
                    error = %error,
                    "secret refresh failed; keeping the last good version"
                );
            }
        }
        result.map(|_| ())
    }

    async fn poll_inner(&self, path: &str) -> Result<&'static str, SecretError> {
        let previous = self.store.current();
        if let Some(previous) = &previous {
            let newest = self.source.current_version(path).await?;
            if newest == previous.version() {
                return Ok("unchanged");
            }
        }
        let bundle = self.source.read(path).await?;
        if previous
            .as_ref()
            .is_some_and(|p| p.version() == bundle.version())
        {
            return Ok("unchanged");
        }
        let missing = bundle.missing_fields(&self.store.inner.required_fields);
        if !missing.is_empty() {
            return Err(SecretError::Invalid {
                path: path.to_owned(),
                reason: format!(
                    "version {} lacks required field(s): {}",
                    bundle.version(),
                    missing.join(", ")
                ),
            });
        }
        let version = bundle.version();
        let created = created_timestamp(&bundle);
        let bundle = self.store.install(bundle);
        self.metrics
            .version
            .with_label_values(&[path])
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.metrics.loaded.with_label_values(&[path]).set(1);
        if let Some(created) = created {
            self.metrics.created.with_label_values(&[path]).set(created);
        }
        let fields: Vec<&str> = bundle.field_names().collect();
        match previous {
            None => {
                tracing::info!(target: "security", path, version, fields = ?fields, source = self.source.kind(), "secret loaded");
                Ok("loaded")
            }
            Some(previous) => {
                self.metrics.rotations.with_label_values(&[path]).inc();
                tracing::info!(
                    target: "security",
                    path,
                    version,
                    previous_version = previous.version(),
                    fields = ?fields,
                    "secret rotated; new version in use"
                );
                Ok("rotated")
            }
        }
    }
}

/// The creation time of a bundle as Unix seconds: the `created` custom metadata (a date or
/// an RFC 3339 time) when present, else the version's own creation time.
fn created_timestamp(bundle: &SecretBundle) -> Option<i64> {
    let parse = |text: &str| {
        let text = text.trim();
        let full = if text.len() == 10 {
            format!("{text}T00:00:00Z")
        } else {
            text.to_owned()
        };
        humantime::parse_rfc3339_weak(&full)
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok())
    };
    bundle
        .custom_metadata()
        .get("created")
        .and_then(|c| parse(c))
        .or_else(|| bundle.created_time().and_then(parse))
}

fn jittered(base: Duration) -> Duration {
    // ±20 % so that replicas restarted together do not retry in lockstep.
    let factor = rand::random_range(0.8..1.2);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn created_prefers_custom_metadata_and_accepts_dates() {
        let mut meta = BTreeMap::new();
        meta.insert("created".to_owned(), "2026-01-01".to_owned());
        let bundle = SecretBundle::new(
            "p",
            1,
            Some("2026-06-01T00:00:00.123456789Z".to_owned()),
            meta,
            BTreeMap::new(),
        );
        assert_eq!(created_timestamp(&bundle), Some(1_767_225_600));
        let bundle = SecretBundle::new(
            "p",
            1,
            Some("2026-06-01T00:00:00.123456789Z".to_owned()),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        assert_eq!(created_timestamp(&bundle), Some(1_780_272_000));
        let mut bad = BTreeMap::new();
        bad.insert("created".to_owned(), "yesterday".to_owned());
        let bundle = SecretBundle::new("p", 1, None, bad, BTreeMap::new());
        assert_eq!(created_timestamp(&bundle), None);
    }
}
