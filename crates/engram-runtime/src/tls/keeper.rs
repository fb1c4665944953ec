//! Where a service's certificate comes from and how it stays fresh: issued by Vault's PKI
//! engine and renewed at two thirds of its life, or read from mounted files (cert-manager, a
//! Secret) and reloaded when they change.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::{Material, MutualTls, TlsError, spiffe_id};
use crate::config::ConfigReader;
use crate::secrets::VaultSource;

/// The longest certificate lifetime asked of Vault: a stolen certificate is worth a day.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How a service gets its mutual-TLS identity (`ENGRAM_TLS_MODE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSettings {
    /// Plain gRPC: dev and tests only (no peer identity, so no per-RPC authorization).
    Off,
    /// Issued by Vault's PKI engine at `<mount>/issue/<role>`.
    Vault {
        /// `ENGRAM_TLS_PKI_MOUNT`, default `pki`.
        mount: String,
        /// `ENGRAM_TLS_PKI_ROLE`, default the service's name.
        role: String,
        /// `ENGRAM_TLS_CERT_TTL_SECS`, at most a day.
        ttl: Duration,
    },
    /// Files mounted by cert-manager or from a Secret, re-read when they change.
    Files(CertFiles),
}

/// Certificate files mounted by cert-manager or from a Secret (`ENGRAM_TLS_MODE=file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// `ENGRAM_TLS_CERT_FILE`: the chain, leaf first (PEM).
    pub cert: PathBuf,
    /// `ENGRAM_TLS_KEY_FILE`: the private key (PEM).
    pub key: PathBuf,
    /// `ENGRAM_TLS_CA_FILE`: the trust anchors (PEM).
    pub ca: PathBuf,
    /// `ENGRAM_TLS_FILE_REFRESH_SECS`: how often the files are checked.
    pub refresh: Duration,
}

impl TlsSettings {
    /// Reads `ENGRAM_TLS_MODE` and its settings. `vault_secrets` says whether the service
    /// reads its secrets from Vault (the PKI mode reuses that login).
    pub fn read(service: &str, reader: &mut ConfigReader<'_>, vault_secrets: bool) -> Self {
        match reader.choice_or("ENGRAM_TLS_MODE", "vault", &["vault", "file", "off"]) {
            "off" => Self::Off,
            "file" => {
                let mut file = |name: &str| {
                    let path = reader.optional_string(name).map(PathBuf::from);
                    if path.is_none() {
                        reader.problem(name, "is required with ENGRAM_TLS_MODE=file");
                    }
                    path.unwrap_or_default()
                };
                let (cert, key, ca) = (
                    file("ENGRAM_TLS_CERT_FILE"),
                    file("ENGRAM_TLS_KEY_FILE"),
                    file("ENGRAM_TLS_CA_FILE"),
                );
                let refresh = reader
                    .positive_secs_or("ENGRAM_TLS_FILE_REFRESH_SECS", Duration::from_secs(60));
                Self::Files(CertFiles {
                    cert,
                    key,
                    ca,
                    refresh,
                })
            }
            _ => {
                if !vault_secrets {
                    reader.problem(
                        "ENGRAM_TLS_MODE",
                        "vault (the default) needs ENGRAM_SECRET_SOURCE=vault; use file, or off for local development",
                    );
                }
                let mount = reader.string_or("ENGRAM_TLS_PKI_MOUNT", "pki");
                let role = reader.string_or("ENGRAM_TLS_PKI_ROLE", service);
                let ttl = reader.parsed_or(
                    "ENGRAM_TLS_CERT_TTL_SECS",
                    MAX_CERT_TTL,
                    "seconds between 10 and 86400",
                    |raw| match raw.parse::<u64>() {
                        Ok(secs) if (10..=MAX_CERT_TTL.as_secs()).contains(&secs) => {
                            Ok(Duration::from_secs(secs))
                        }
                        _ => Err("out of range".to_owned()),
                    },
                );
                Self::Vault { mount, role, ttl }
            }
        }
    }

    /// Whether gRPC runs over mutual TLS.
    pub fn is_on(&self) -> bool {
        !matches!(self, Self::Off)
    }
}

/// Where certificates come from at run time.
#[derive(Debug)]
pub enum CertificateSource {
    /// Vault's PKI engine, with the service's own Vault login.
    Vault {
        /// The service's Vault client.
        vault: Arc<VaultSource>,
        /// PKI mount.
        mount: String,
        /// PKI role.
        role: String,
        /// Requested lifetime.
        ttl: Duration,
    },
    /// Mounted files.
    Files(CertFiles),
}

fn read_file(path: &PathBuf) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| TlsError::Unavailable(format!("cannot read {}: {e}", path.display())))
}

impl CertificateSource {
    /// New material, or `None` when the files have not changed since `fingerprint`.
    async fn obtain(
        &self,
        service: &str,
        fingerprint: &mut Option<u64>,
    ) -> Result<Option<Material>, TlsError> {
        match self {
            Self::Vault {
                vault,
                mount,
                role,
                ttl,
            } => {
                let issued = vault
                    .issue_certificate(mount, role, &spiffe_id(service), *ttl)
                    .await
                    .map_err(|e| TlsError::Unavailable(format!("Vault PKI: {e}")))?;
                let mut chain = issued.certificate.clone();
                for ca in &issued.ca_chain {
                    chain.push('\n');
                    chain.push_str(ca);
                }
                Material::from_pem(
                    chain.as_bytes(),
                    issued.private_key.expose_secret().as_bytes(),
                    issued.issuing_ca.as_bytes(),
                    service,
                )
                .map(Some)
            }
            Self::Files(CertFiles { cert, key, ca, .. }) => {
                let (cert, key, ca) = (read_file(cert)?, read_file(key)?, read_file(ca)?);
                let mut hasher = DefaultHasher::new();
                (&*cert, &*key, &*ca).hash(&mut hasher);
                let seen = hasher.finish();
                if *fingerprint == Some(seen) {
                    return Ok(None);
                }
                let material = Material::from_pem(&cert, &key, &ca, service)?;
                *fingerprint = Some(seen);
                Ok(Some(material))
            }
        }
    }
}

/// Keeps `tls` supplied from `source` until `stop`: loads at once (retrying with backoff
/// while it fails), then renews at two thirds of each certificate's life (Vault) or checks
/// the files every refresh interval. A failed renewal keeps the current certificate and is
/// retried; readiness turns degraded, then not ready if it expires.
pub async fn keep(tls: Arc<MutualTls>, source: CertificateSource, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    let mut fingerprint = None;
    loop {
        let renewing = tls.serial().is_some();
        let obtained_at = SystemTime::now();
        let wait = match source.obtain(tls.service(), &mut fingerprint).await {
            Ok(Some(material)) => match tls.install(&material) {
                Ok(()) => {
                    tls.count_renewal(if renewing { "renewed" } else { "loaded" });
                    tracing::info!(
                        target: "security",
                        identity = %spiffe_id(tls.service()),
                        serial = %material.serial,
                        not_after = %humantime::format_rfc3339_seconds(material.not_after),
                        "mutual-TLS certificate installed"
                    );
                    backoff = Duration::from_millis(200);
                    match &source {
                        CertificateSource::Vault { .. } => material
                            .renew_at(obtained_at)
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                            .max(Duration::from_secs(1)),
                        CertificateSource::Files(files) => files.refresh,
                    }
                }
                Err(error) => failed(&tls, &error, &mut backoff),
            },
            Ok(None) => match &source {
                CertificateSource::Files(files) => {
                    if tls.renew_at().is_some_and(|at| at <= SystemTime::now()) {
                        tracing::warn!(
                            target: "security",
                            "mutual-TLS certificate files are past two thirds of their life and have not been renewed"
                        );
                    }
                    files.refresh
                }
                CertificateSource::Vault { .. } => backoff,
            },
            Err(error) => failed(&tls, &error, &mut backoff),
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn failed(tls: &MutualTls, error: &TlsError, backoff: &mut Duration) -> Duration {
    tls.record_failure(error);
    tracing::warn!(target: "security", error = %error, retry_in = ?*backoff, "could not obtain a mutual-TLS certificate");
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(30));
    wait
}
