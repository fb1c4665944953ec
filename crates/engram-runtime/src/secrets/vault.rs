//! The Vault (or OpenBao) secret source: KV v2 reads with versions and `custom_metadata`,
//! token, AppRole and Kubernetes auth, token renewal before expiry and re-login when
//! renewal fails or a read is refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, RwLock};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{SecretBundle, SecretError, SecretSource};

/// How a service proves who it is to Vault.
pub enum VaultAuth {
    /// A token given directly (dev) or in a file kept fresh by an agent (re-read at re-login).
    Token {
        /// The token itself.
        token: Option<SecretString>,
        /// A file holding the token; wins over `token` at each (re-)login.
        token_file: Option<PathBuf>,
    },
    /// AppRole, for VMs: role id plus secret id.
    AppRole {
        /// Auth mount, usually `approle`.
        mount: String,
        /// The role id (an identifier, but still not logged).
        role_id: SecretString,
        /// The secret id.
        secret_id: SecretString,
    },
    /// Kubernetes service-account auth, for clusters; the JWT file is re-read at each login
    /// because projected tokens rotate.
    Kubernetes {
        /// Auth mount, usually `kubernetes`.
        mount: String,
        /// The Vault role bound to this service account.
        role: String,
        /// Path of the projected service-account token.
        jwt_path: PathBuf,
    },
}

impl VaultAuth {
    /// `token`, `approle` or `kubernetes`.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Token { .. } => "token",
            Self::AppRole { .. } => "approle",
            Self::Kubernetes { .. } => "kubernetes",
        }
    }
}

impl std::fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { token_file, .. } => f
                .debug_struct("Token")
                .field("token_file", token_file)
                .finish_non_exhaustive(),
            Self::AppRole { mount, .. } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .finish_non_exhaustive(),
            Self::Kubernetes {
                mount,
                role,
                jwt_path,
            } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("jwt_path", jwt_path)
                .finish(),
        }
    }
}

/// Where Vault is and how to use it.
#[derive(Debug)]
pub struct VaultSettings {
    /// Vault's address, for example `http://127.0.0.1:8200`.
    pub address: Url,
    /// The KV v2 mount holding Engram's paths, usually `secret`.
    pub kv_mount: String,
    /// How to log in.
    pub auth: VaultAuth,
    /// Timeout of each Vault request.
    pub request_timeout: Duration,
    /// A PEM bundle of extra CAs that may have issued Vault's own certificate (a Vault behind
    /// a private CA), on top of the platform's trust store.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The state of the current token, kept to schedule renewal.
#[derive(Debug, Clone, Copy)]
struct TokenLease {
    /// When the token expires; `None` for a token without expiry (a dev root token).
    expires_at: Option<Instant>,
    /// Its full lifetime at issue or last renewal.
    ttl: Duration,
    renewable: bool,
}

#[derive(Clone)]
struct VaultMetrics {
    logins: IntCounterVec,
    renewals: IntCounterVec,
    token_ttl: IntGauge,
}

impl VaultMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let logins = IntCounterVec::new(
            Opts::new(
                "engram_vault_logins_total",
                "Vault logins by auth method and outcome.",
            ),
            &["method", "outcome"],
        )?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "engram_vault_token_renewals_total",
                "Vault token renewals by outcome.",
            ),
            &["outcome"],
        )?;
        let token_ttl = IntGauge::new(
            "engram_vault_token_ttl_seconds",
            "Lifetime of the Vault token at its last login or renewal (0: no expiry).",
        )?;
        registry.register(Box::new(logins.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(token_ttl.clone()))?;
        Ok(Self {
            logins,
            renewals,
            token_ttl,
        })
    }
}

/// Reads secrets from Vault KV v2 and keeps its token alive.
pub struct VaultSource {
    settings: VaultSettings,
    // vaultrs keeps the token inside the client; a re-login swaps it under the write lock
    // while reads share the read lock. (vaultrs stores it as a plain `String`: we never
    // format the client, whose derived `Debug` would print it.)
    client: RwLock<VaultClient>,
    lease: Mutex<Option<TokenLease>>,
    // Serializes logins: the first read and the maintenance task both want a token at start.
    login_lock: tokio::sync::Mutex<()>,
    relogin: Notify,
    metrics: VaultMetrics,
}

impl std::fmt::Debug for VaultSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSource")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl VaultSource {
    /// Prepares a client; no request is made until the first read or [`Self::maintain_token`].
    ///
    /// # Errors
    ///
    /// [`SecretError::Invalid`] when the client cannot be built, or metrics cannot register.
    pub fn new(settings: VaultSettings, registry: &Registry) -> Result<Arc<Self>, SecretError> {
        let client = build_client(&settings, "")?;
        let metrics = VaultMetrics::register(registry).map_err(|e| SecretError::Invalid {
            path: "metrics".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(Self {
            settings,
            client: RwLock::new(client),
            lease: Mutex::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            relogin: Notify::new(),
            metrics,
        }))
    }

    fn lease(&self) -> Option<TokenLease> {
        *self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_lease(&self, lease: Option<TokenLease>) {
        let ttl = lease.map_or(0, |l| l.ttl.as_secs());
        self.metrics
            .token_ttl
            .set(i64::try_from(ttl).unwrap_or(i64::MAX));
        *self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = lease;
    }

    /// Logs in with the configured method and installs the new token.
    ///
    /// # Errors
    ///
    /// [`SecretError::Auth`] or [`SecretError::Unreachable`] when login fails.
    pub async fn login(&self) -> Result<(), SecretError> {
        let method = self.settings.auth.method();
        let result = self.login_inner().await;
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .logins
            .with_label_values(&[method, outcome])
            .inc();
        match &result {
            Ok(()) => tracing::info!(target: "security", method, "logged in to Vault"),
            Err(error) => {
                tracing::warn!(target: "security", method, error = %error, "Vault login failed");
            }
        }
        result
    }

    async fn login_inner(&self) -> Result<(), SecretError> {
        let (token, lease) = match &self.settings.auth {
            VaultAuth::Token { token, token_file } => {
                let token = match token_file {
                    Some(path) => SecretString::from(
                        std::fs::read_to_string(path)
                            .map_err(|e| {
                                SecretError::Auth(format!("cannot read {}: {e}", path.display()))
                            })?
                            .trim()
                            .to_owned(),
                    ),
                    None => token
                        .clone()
                        .ok_or_else(|| SecretError::Auth("no Vault token configured".to_owned()))?,
                };
                let probe = build_client(&self.settings, token.expose_secret())?;
                let info = vaultrs::token::lookup_self(&probe)
                    .await
                    .map_err(|e| map_auth_error(&e))?;
                let lease = lease_from(info.ttl, info.renewable.unwrap_or(false));
                (token, lease)
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let anonymous = build_client(&self.settings, "")?;
                let auth = vaultrs::auth::approle::login(
                    &anonymous,
                    mount,
                    role_id.expose_secret(),
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| map_auth_error(&e))?;
                let lease = lease_from(auth.lease_duration, auth.renewable);
                (SecretString::from(auth.client_token), lease)
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_path,
            } => {
                let jwt = SecretString::from(
                    std::fs::read_to_string(jwt_path)
                        .map_err(|e| {
                            SecretError::Auth(format!("cannot read {}: {e}", jwt_path.display()))
                        })?
                        .trim()
                        .to_owned(),
                );
                let anonymous = build_client(&self.settings, "")?;
                let auth =
                    vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.expose_secret())
                        .await
                        .map_err(|e| map_auth_error(&e))?;
                let lease = lease_from(auth.lease_duration, auth.renewable);
                (SecretString::from(auth.client_token), lease)
            }
        };
        self.client.write().await.set_token(token.expose_secret());
        self.set_lease(Some(lease));
        Ok(())
    }

    /// Renews the current token once.
    async fn renew(&self) -> Result<(), SecretError> {
        let result = {
            let client = self.client.read().await;
            vaultrs::token::renew_self(&*client, None).await
        };
        match result {
            Ok(auth) => {
                self.metrics.renewals.with_label_values(&["success"]).inc();
                let previous = self.lease();
                let lease = lease_from(auth.lease_duration, auth.renewable);
                self.set_lease(Some(lease));
                tracing::debug!(ttl_secs = auth.lease_duration, "renewed Vault token");
                // Near the token's max TTL a renewal grants less and less time: log in
                // afresh instead of riding it to expiry.
                if let Some(previous) = previous
                    && lease.ttl < previous.ttl / 3
                {
                    return Err(SecretError::Auth("token is near its max TTL".to_owned()));
                }
                Ok(())
            }
            Err(error) => {
                self.metrics.renewals.with_label_values(&["failure"]).inc();
                Err(map_auth_error(&error))
            }
        }
    }

    /// Keeps the token alive until `shutdown`: logs in if needed, renews at two thirds of
    /// its lifetime, and logs in again when a renewal fails or a read was refused. Failed
    /// logins are retried with capped exponential backoff.
    pub async fn maintain_token(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Some(lease) = self.lease() else {
                if self.ensure_token().await.is_ok() {
                    backoff = Duration::from_millis(250);
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            };
            let renew_at = lease
                .expires_at
                .filter(|_| lease.renewable)
                .map(|expiry| expiry - lease.ttl / 3);
            let renew_sleep = async {
                match renew_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.relogin.notified() => {
                    tracing::info!(target: "security", "Vault refused a request: logging in again");
                    self.set_lease(None);
                }
                () = renew_sleep => {
                    if let Err(error) = self.renew().await {
                        tracing::warn!(target: "security", error = %error, "Vault token renewal failed: logging in again");
                        self.set_lease(None);
                    }
                }
            }
        }
    }

    async fn read_metadata(
        &self,
        path: &str,
    ) -> Result<vaultrs::api::kv2::responses::ReadSecretMetadataResponse, SecretError> {
        self.ensure_token().await?;
        let client = self.client.read().await;
        vaultrs::kv2::read_metadata(&*client, &self.settings.kv_mount, path)
            .await
            .map_err(|e| self.map_read_error(&e, path))
    }

    /// Logs in unless a token is already held (or another task just got one).
    async fn ensure_token(&self) -> Result<(), SecretError> {
        let _serialized = self.login_lock.lock().await;
        if self.lease().is_none() {
            self.login().await?;
        }
        Ok(())
    }

    fn map_read_error(&self, error: &ClientError, path: &str) -> SecretError {
        let mapped = map_client_error(error, path);
        if matches!(mapped, SecretError::PermissionDenied { .. }) {
            // A revoked or expired token shows up as 403: wake the maintenance task.
            self.relogin.notify_one();
        }
        mapped
    }
}

impl SecretSource for VaultSource {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn current_version<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, SecretError>> {
        async move { Ok(self.read_metadata(path).await?.current_version) }.boxed()
    }

    fn read<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<SecretBundle, SecretError>> {
        self.read_at(path, None).boxed()
    }

    fn read_version<'a>(
        &'a self,
        path: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<SecretBundle, SecretError>> {
        self.read_at(path, Some(version)).boxed()
    }
}

impl VaultSource {
    /// Reads `version` (or the newest) with its metadata.
    async fn read_at(&self, path: &str, version: Option<u64>) -> Result<SecretBundle, SecretError> {
        {
            let metadata = self.read_metadata(path).await?;
            let version = version.unwrap_or(metadata.current_version);
            if version == 0 {
                return Err(SecretError::NotFound {
                    path: path.to_owned(),
                });
            }
            let data: BTreeMap<String, serde_json::Value> = {
                let client = self.client.read().await;
                vaultrs::kv2::read_version(&*client, &self.settings.kv_mount, path, version)
                    .await
                    .map_err(|e| self.map_read_error(&e, path))?
            };
            let fields = data
                .into_iter()
                .map(|(name, value)| {
                    let text = match value {
                        serde_json::Value::String(text) => text,
                        other => other.to_string(),
                    };
                    (name, SecretString::from(text))
                })
                .collect();
            let created_time = metadata
                .versions
                .get(&version.to_string())
                .map(|v| v.created_time.clone());
            let custom = metadata
                .custom_metadata
                .unwrap_or_default()
                .into_iter()
                .collect();
            Ok(SecretBundle::new(
                path,
                version,
                created_time,
                custom,
                fields,
            ))
        }
    }
}

/// A certificate issued by Vault's PKI engine. The private key is a secret; the rest is
/// public.
pub struct IssuedCertificate {
    /// The leaf, PEM.
    pub certificate: String,
    /// The issuing CA's chain, PEM each.
    pub ca_chain: Vec<String>,
    /// The issuing CA, PEM: the trust anchor for peers issued by the same CA.
    pub issuing_ca: String,
    /// The private key, PEM (PKCS#8).
    pub private_key: SecretString,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate").finish_non_exhaustive()
    }
}

impl VaultSource {
    /// Issues a certificate for `uri_san` from `<mount>/issue/<role>`, valid for `ttl`.
    ///
    /// # Errors
    ///
    /// [`SecretError`] when Vault refuses (403 also wakes the re-login) or cannot be reached.
    pub async fn issue_certificate(
        &self,
        mount: &str,
        role: &str,
        uri_san: &str,
        ttl: Duration,
    ) -> Result<IssuedCertificate, SecretError> {
        self.ensure_token().await?;
        let mut options = vaultrs::api::pki::requests::GenerateCertificateRequest::builder();
        options
            .uri_sans(uri_san)
            .ttl(format!("{}s", ttl.as_secs()))
            .private_key_format("pkcs8")
            .exclude_cn_from_sans(true);
        let what = format!("{mount}/issue/{role}");
        let issued = {
            let client = self.client.read().await;
            vaultrs::pki::cert::generate(&*client, mount, role, Some(&mut options))
                .await
                .map_err(|e| self.map_read_error(&e, &what))?
        };
        // vaultrs derives Debug on the response, key included: move the key out at once.
        let vaultrs::api::pki::responses::GenerateCertificateResponse {
            certificate,
            ca_chain,
            issuing_ca,
            private_key,
            ..
        } = issued;
        Ok(IssuedCertificate {
            certificate,
            ca_chain: ca_chain.unwrap_or_default(),
            issuing_ca,
            private_key: SecretString::from(private_key),
        })
    }
}

fn build_client(settings: &VaultSettings, token: &str) -> Result<VaultClient, SecretError> {
    let mut builder = VaultClientSettingsBuilder::default();
    builder
        .address(settings.address.as_str())
        .token(token)
        .timeout(Some(settings.request_timeout))
        // Never from the environment: vaultrs reads VAULT_SKIP_VERIFY (any value but "false"
        // or "0" turns verification off) and VAULT_CACERT/VAULT_CAPATH by default. Engram
        // always verifies, and trusts extra CAs only through ENGRAM_VAULT_CA_FILE.
        .verify(true)
        .ca_certs(
            settings
                .ca_file
                .iter()
                .map(|path| path.display().to_string())
                .collect(),
        );
    let client_settings = builder.build().map_err(|e| SecretError::Invalid {
        path: "vault settings".to_owned(),
        reason: e.to_string(),
    })?;
    VaultClient::new(client_settings).map_err(|e| SecretError::Invalid {
        path: "vault client".to_owned(),
        reason: e.to_string(),
    })
}

fn lease_from(ttl_secs: u64, renewable: bool) -> TokenLease {
    let ttl = Duration::from_secs(ttl_secs);
    TokenLease {
        expires_at: (ttl_secs > 0).then(|| Instant::now() + ttl),
        ttl,
        renewable,
    }
}

/// Maps a vaultrs error to ours using only its status code and Vault's own error strings
/// (never the request, never a backtrace: vaultrs errors may carry one).
fn map_client_error(error: &ClientError, path: &str) -> SecretError {
    match error {
        ClientError::APIError { code: 403, .. } => SecretError::PermissionDenied {
            path: path.to_owned(),
        },
        ClientError::APIError { code: 404, .. } => SecretError::NotFound {
            path: path.to_owned(),
        },
        ClientError::APIError { code, errors } => {
            SecretError::Unreachable(format!("Vault answered HTTP {code}: {}", errors.join("; ")))
        }
        ClientError::RestClientError { .. } => {
            SecretError::Unreachable(format!("request to Vault failed: {error}"))
        }
        other => SecretError::Invalid {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn map_auth_error(error: &ClientError) -> SecretError {
    match error {
        // 400 "invalid role or secret ID", 403 "permission denied": the credentials.
        ClientError::APIError { code, errors } if (400..500).contains(code) && *code != 429 => {
            SecretError::Auth(format!(
                "Vault refused the credentials: {}",
                errors.join("; ")
            ))
        }
        other => match map_client_error(other, "login") {
            SecretError::Unreachable(reason) => SecretError::Unreachable(reason),
            mapped => SecretError::Auth(mapped.to_string()),
        },
    }
}
