//! Mutual TLS on every gRPC hop: each service holds a certificate whose URI SAN is
//! `spiffe://engram/<service>` (issued by Vault's PKI engine, or mounted as files), renews it
//! at two thirds of its life without dropping connections, accepts only callers with a
//! certificate from the same CA, and reaches a peer only when the peer proves the identity
//! the caller meant to reach.
//!
//! The live configuration sits behind an `ArcSwap`: each new TCP connection (in or out)
//! takes the current one, so a renewal changes what new connections present while open
//! connections and their streams carry on untouched.

mod io;
mod keeper;
mod material;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::crypto::CryptoProvider;
use tonic::transport::{Channel, Endpoint};

pub use io::{MtlsConnector, PeerInfo, TlsIo, tls_incoming};
pub use keeper::{CertFiles, CertificateSource, MAX_CERT_TTL, TlsSettings, keep};
pub use material::{
    Material, SpiffeServerVerifier, TRUST_DOMAIN, TlsError, identity_of, spiffe_id, validity,
};

use crate::admin::{Check, Readiness};

/// The configuration in force, built from one [`Material`].
struct Installed {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    not_after: SystemTime,
    renew_at: SystemTime,
    serial: String,
}

/// TLS metrics (names start with `engram_tls_`).
#[derive(Clone)]
struct TlsMetrics {
    expiry: IntGauge,
    renewals: IntCounterVec,
    handshake_failures: IntCounterVec,
}

impl TlsMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let expiry = IntGauge::with_opts(Opts::new(
            "engram_tls_cert_expiry_timestamp_seconds",
            "When this service's mutual-TLS certificate expires (Unix time)",
        ))?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "engram_tls_cert_renewals_total",
                "Certificate loads and renewals by outcome",
            ),
            &["outcome"],
        )?;
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "engram_tls_handshake_failures_total",
                "TLS handshakes that failed, by side (server: a caller refused) and reason",
            ),
            &["side", "reason"],
        )?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        Ok(Self {
            expiry,
            renewals,
            handshake_failures,
        })
    }
}

/// One service's mutual-TLS identity: the live server and client configurations.
pub struct MutualTls {
    service: String,
    provider: Arc<CryptoProvider>,
    installed: ArcSwapOption<Installed>,
    last_error: Mutex<Option<String>>,
    metrics: Option<TlsMetrics>,
}

impl std::fmt::Debug for MutualTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MutualTls")
            .field("service", &self.service)
            .field("loaded", &self.installed.load().is_some())
            .finish_non_exhaustive()
    }
}

impl MutualTls {
    /// An identity for `service`, with no certificate yet (connections fail until one is
    /// installed), exporting metrics into `registry`.
    ///
    /// # Errors
    ///
    /// When the metrics cannot be registered.
    pub fn new(service: &str, registry: &Registry) -> prometheus::Result<Arc<Self>> {
        Ok(Arc::new(Self::unregistered(
            service,
            Some(TlsMetrics::register(registry)?),
        )))
    }

    fn unregistered(service: &str, metrics: Option<TlsMetrics>) -> Self {
        Self {
            service: service.to_owned(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            installed: ArcSwapOption::empty(),
            last_error: Mutex::new(None),
            metrics,
        }
    }

    /// A fixed identity from material already at hand (a command-line client such as
    /// `engramctl`, which lives shorter than its certificate).
    ///
    /// # Errors
    ///
    /// When rustls refuses the material.
    pub fn fixed(material: &Material) -> Result<Arc<Self>, TlsError> {
        let tls = Self::unregistered(&material.service, None);
        tls.install(material)?;
        Ok(Arc::new(tls))
    }

    /// This service's name (its identity is `spiffe://engram/<name>`).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Makes `material` the configuration for new connections.
    ///
    /// # Errors
    ///
    /// When rustls refuses it; the previous configuration stays.
    pub fn install(&self, material: &Material) -> Result<(), TlsError> {
        if material.service != self.service {
            return Err(TlsError::WrongIdentity {
                found: spiffe_id(&material.service),
                expected: spiffe_id(&self.service),
            });
        }
        let installed = Installed {
            server: Arc::new(material.server_config(&self.provider)?),
            client: Arc::new(material.client_config(&self.provider)?),
            not_after: material.not_after,
            renew_at: material.renew_at(material.not_before),
            serial: material.serial.clone(),
        };
        self.installed.store(Some(Arc::new(installed)));
        if let Some(metrics) = &self.metrics {
            let expiry = material
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            metrics.expiry.set(expiry);
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }

    fn record_failure(&self, error: &TlsError) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
        self.count_renewal("failure");
    }

    fn count_renewal(&self, outcome: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.renewals.with_label_values(&[outcome]).inc();
        }
    }

    fn count_handshake_failure(&self, side: &str, reason: &str) {
        if let Some(metrics) = &self.metrics {
            metrics
                .handshake_failures
                .with_label_values(&[side, reason])
                .inc();
        }
    }

    /// The server configuration for the next accepted connection.
    pub fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.installed.load().as_ref().map(|i| i.server.clone())
    }

    /// The client configuration for the next outgoing connection.
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.installed.load().as_ref().map(|i| i.client.clone())
    }

    /// When the certificate in use expires, if one is loaded.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.installed.load().as_ref().map(|i| i.not_after)
    }

    /// The serial number of the certificate in use.
    pub fn serial(&self) -> Option<String> {
        self.installed.load().as_ref().map(|i| i.serial.clone())
    }

    fn renew_at(&self) -> Option<SystemTime> {
        self.installed.load().as_ref().map(|i| i.renew_at)
    }

    /// Adds the `tls` readiness check: not ready without a valid certificate, degraded while
    /// renewals fail (the one in use still works).
    pub fn add_readiness_check(self: &Arc<Self>, readiness: &Readiness) {
        let tls = self.clone();
        readiness.add_check("tls", move || {
            let tls = tls.clone();
            async move {
                let error = tls
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                match (tls.not_after(), error) {
                    (None, error) => Check::NotReady(format!(
                        "no mutual-TLS certificate yet{}",
                        error.map(|e| format!(": {e}")).unwrap_or_default()
                    )),
                    (Some(expiry), _) if expiry <= SystemTime::now() => {
                        Check::NotReady("the mutual-TLS certificate has expired".to_owned())
                    }
                    (Some(_), Some(error)) => Check::Degraded(format!(
                        "certificate renewal failing (the current one is still valid): {error}"
                    )),
                    (Some(_), None) => Check::Ready,
                }
            }
        });
    }
}

/// How a service's gRPC clients and server talk: plain (dev and tests only) or mutual TLS.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Plain HTTP/2: no peer identity, so no per-RPC authorization.
    Plain,
    /// Mutual TLS with this identity.
    Mutual(Arc<MutualTls>),
}

impl Transport {
    /// A lazily connected channel to `peer` (a service name: its certificate must say
    /// `spiffe://engram/<peer>`) at `endpoint`'s address.
    pub fn channel(&self, endpoint: Endpoint, peer: &str) -> Channel {
        match self {
            Self::Plain => endpoint.tcp_nodelay(true).connect_lazy(),
            Self::Mutual(tls) => {
                endpoint.connect_with_connector_lazy(MtlsConnector::new(tls.clone(), peer))
            }
        }
    }

    /// A channel to `peer` at `url` with the usual connect timeout and a per-call timeout.
    ///
    /// # Errors
    ///
    /// When `url` is not a usable endpoint.
    pub fn channel_to(
        &self,
        url: &url::Url,
        peer: &str,
        call_timeout: Duration,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(url.to_string())?
            .connect_timeout(call_timeout.min(Duration::from_secs(5)))
            .timeout(call_timeout);
        Ok(self.channel(endpoint, peer))
    }

    /// Whether this transport authenticates peers.
    pub fn is_mutual(&self) -> bool {
        matches!(self, Self::Mutual(_))
    }
}
