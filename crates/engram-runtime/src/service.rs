//! The service skeleton every Engram binary runs: telemetry → config → build (bind and
//! report addresses) → run until SIGTERM/SIGINT → drain within a grace period, with gRPC
//! health NOT_SERVING and `/readyz` 503 first.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use engram_proto::v1::AuditCategory;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use url::Url;

use crate::admin::{self, AdminState, Check, Readiness};
use crate::audit::{AuditRecorder, GrpcAuditRecorder, event, number, text};
use crate::authz::Authorizer;
use crate::config::{
    ConfigErrors, ConfigReader, ConfigSource, EXIT_CONFIG, ProcessEnv, load_file_layer,
};
use crate::grpc::{GrpcHealth, GrpcServer, ServerSecurity};
use crate::secrets::{
    EnvSecretSource, SecretSource, SecretStore, SecretWatcher, VaultAuth, VaultSettings,
    VaultSource, WatcherSettings,
};
use crate::telemetry::{self, Metrics};
use crate::tls::{CertificateSource, MutualTls, TlsSettings, Transport};

/// What distinguishes one Engram service from another at the runtime level.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Binary and service name, for example `audit-sink`.
    pub name: &'static str,
    /// Version reported in `engram_build_info` and logs.
    pub version: &'static str,
    /// Fully qualified gRPC service name, for the health service.
    pub grpc_service: &'static str,
    /// The service's own Vault KV path, for example `engram/audit`.
    pub secret_path: &'static str,
    /// Fields that must be present and non-empty before the service is ready.
    pub required_secret_fields: &'static [&'static str],
    /// Default gRPC port on 127.0.0.1 (DESIGN.md's local defaults).
    pub default_grpc_port: u16,
    /// Default admin HTTP port on 127.0.0.1.
    pub default_admin_port: u16,
}

/// Where a service's secrets come from.
#[derive(Debug)]
pub enum SecretsConfig {
    /// Vault or OpenBao.
    Vault(VaultSettings),
    /// The seed's environment variables and `.env` (dev only).
    Env {
        /// The `.env` file read under the environment, if it exists.
        dotenv: PathBuf,
    },
}

/// The configuration every service shares.
#[derive(Debug)]
pub struct RuntimeConfig {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_addr: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long to keep accepting after turning NOT_SERVING, so that load balancers and
    /// Kubernetes endpoints see the flip before connections are refused.
    pub drain_delay: Duration,
    /// The secret path this service reads.
    pub secret_path: String,
    /// How often to poll for a new secret version.
    pub secret_refresh: Duration,
    /// Secret source settings.
    pub secrets: SecretsConfig,
    /// OTLP/gRPC endpoint for traces, when set.
    pub otlp_endpoint: Option<Url>,
    /// The audit sink's gRPC address, for lifecycle and the service's own events. Unset:
    /// nothing is recorded unless the service installs its own recorder (the sink does).
    pub audit_addr: Option<Url>,
    /// `ENGRAM_ALERT_ADDR`: the Telegram gateway's gRPC URL, where alerts go (unset: alerts
    /// are only logged).
    pub alert_addr: Option<Url>,
    /// Mutual TLS for every gRPC hop (`ENGRAM_TLS_MODE`).
    pub tls: TlsSettings,
}

/// A service's own settings, read from the same sources and validated with the shared ones,
/// so one run reports every bad value.
pub trait ServiceConfig: Sized + Send + 'static {
    /// Reads the service's settings, recording problems in `reader`.
    fn read(reader: &mut ConfigReader<'_>) -> Self;
}

impl ServiceConfig for () {
    fn read(_: &mut ConfigReader<'_>) -> Self {}
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

impl RuntimeConfig {
    /// Reads the shared settings from `reader`, recording every problem in it. Services with
    /// settings of their own read those from the same reader before calling `finish`.
    pub fn read(spec: &ServiceSpec, reader: &mut ConfigReader<'_>) -> Self {
        let grpc_addr = reader.socket_addr_or("ENGRAM_GRPC_ADDR", local(spec.default_grpc_port));
        let admin_addr = reader.socket_addr_or("ENGRAM_ADMIN_ADDR", local(spec.default_admin_port));
        if grpc_addr == admin_addr && grpc_addr.port() != 0 {
            reader.problem("ENGRAM_ADMIN_ADDR", "must differ from ENGRAM_GRPC_ADDR");
        }
        let shutdown_grace =
            reader.positive_secs_or("ENGRAM_SHUTDOWN_GRACE_SECS", Duration::from_secs(20));
        let drain_delay = reader.parsed_or(
            "ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS",
            Duration::from_secs(1),
            "a number of seconds between 0 and 60",
            |raw| match raw.parse::<f64>() {
                Ok(secs) if (0.0..=60.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
                _ => Err(format!("{raw:?} is out of range")),
            },
        );
        let secret_path = reader.string_or("ENGRAM_SECRET_PATH", spec.secret_path);
        if secret_path.starts_with('/') || secret_path.ends_with('/') || secret_path.contains("..")
        {
            reader.problem(
                "ENGRAM_SECRET_PATH",
                "must be a relative KV path such as engram/audit",
            );
        }
        let secret_refresh =
            reader.positive_secs_or("ENGRAM_SECRET_REFRESH_SECS", Duration::from_secs(30));
        let _ = reader.choice_or("ENGRAM_LOG_FORMAT", "json", &["json", "text"]);
        if let Some(level) = reader
            .raw("ENGRAM_LOG_LEVEL")
            .or_else(|| reader.raw("LOG_LEVEL"))
            && tracing_subscriber::EnvFilter::try_new(level.to_ascii_lowercase()).is_err()
        {
            reader.problem(
                "ENGRAM_LOG_LEVEL",
                "is not a valid level or filter (trace, debug, info, warn, error)",
            );
        }
        let otlp_endpoint = reader.optional_url("OTEL_EXPORTER_OTLP_ENDPOINT");
        let audit_addr = reader.optional_grpc_url("ENGRAM_AUDIT_ADDR");
        let alert_addr = reader.optional_grpc_url("ENGRAM_ALERT_ADDR");

        let secrets = match reader.choice_or("ENGRAM_SECRET_SOURCE", "vault", &["vault", "env"]) {
            "env" => SecretsConfig::Env {
                dotenv: reader.path_or("ENGRAM_DOTENV_FILE", ".env"),
            },
            _ => SecretsConfig::Vault(read_vault(spec, reader)),
        };
        let tls = TlsSettings::read(
            spec.name,
            reader,
            matches!(secrets, SecretsConfig::Vault(_)),
        );
        Self {
            grpc_addr,
            admin_addr,
            shutdown_grace,
            drain_delay,
            secret_path,
            secret_refresh,
            secrets,
            otlp_endpoint,
            audit_addr,
            alert_addr,
            tls,
        }
    }

    /// Reads and validates the shared settings from `env` (and the optional file it names).
    ///
    /// # Errors
    ///
    /// Every bad value at once.
    pub fn load(spec: &ServiceSpec, env: &dyn ConfigSource) -> Result<Self, ConfigErrors> {
        Self::load_with::<()>(spec, env).map(|(config, ())| config)
    }

    /// Reads the shared settings and the service's own `C`, reporting every problem of both.
    ///
    /// # Errors
    ///
    /// Every bad value at once.
    pub fn load_with<C: ServiceConfig>(
        spec: &ServiceSpec,
        env: &dyn ConfigSource,
    ) -> Result<(Self, C), ConfigErrors> {
        let file = load_file_layer(env).map_err(|problem| ConfigErrors(vec![problem]))?;
        let mut reader = ConfigReader::new(vec![env, &file]);
        let config = Self::read(spec, &mut reader);
        let service = C::read(&mut reader);
        reader.finish()?;
        Ok((config, service))
    }
}

fn read_vault(spec: &ServiceSpec, reader: &mut ConfigReader<'_>) -> VaultSettings {
    let address = reader
        .required_url("ENGRAM_VAULT_ADDR")
        .unwrap_or_else(|| Url::parse("http://127.0.0.1:8200").unwrap_or_else(|_| unreachable!()));
    let kv_mount = reader.string_or("ENGRAM_VAULT_KV_MOUNT", "secret");
    let request_timeout =
        reader.positive_secs_or("ENGRAM_VAULT_TIMEOUT_SECS", Duration::from_secs(5));
    let ca_file = reader
        .optional_string("ENGRAM_VAULT_CA_FILE")
        .map(PathBuf::from);
    if let Some(path) = &ca_file {
        match std::fs::read(path) {
            Ok(pem) if reqwest::Certificate::from_pem_bundle(&pem).is_ok_and(|c| !c.is_empty()) => {
            }
            Ok(_) => reader.problem("ENGRAM_VAULT_CA_FILE", "holds no PEM certificate"),
            Err(e) => reader.problem("ENGRAM_VAULT_CA_FILE", format!("cannot be read: {e}")),
        }
    }
    let auth = match reader.choice_or(
        "ENGRAM_VAULT_AUTH",
        "token",
        &["token", "approle", "kubernetes"],
    ) {
        "approle" => {
            let mount = reader.string_or("ENGRAM_VAULT_AUTH_MOUNT", "approle");
            let role_id = reader.optional_secret("ENGRAM_VAULT_ROLE_ID");
            if role_id.is_none() {
                reader.problem(
                    "ENGRAM_VAULT_ROLE_ID",
                    "is required with ENGRAM_VAULT_AUTH=approle",
                );
            }
            let secret_id = match (
                reader.optional_secret("ENGRAM_VAULT_SECRET_ID"),
                reader.optional_string("ENGRAM_VAULT_SECRET_ID_FILE"),
            ) {
                (Some(id), _) => Some(id),
                (None, Some(file)) => match std::fs::read_to_string(&file) {
                    Ok(text) if !text.trim().is_empty() => {
                        Some(SecretString::from(text.trim().to_owned()))
                    }
                    Ok(_) => {
                        reader.problem("ENGRAM_VAULT_SECRET_ID_FILE", "names an empty file");
                        None
                    }
                    Err(e) => {
                        reader.problem(
                            "ENGRAM_VAULT_SECRET_ID_FILE",
                            format!("cannot be read: {e}"),
                        );
                        None
                    }
                },
                (None, None) => {
                    reader.problem(
                        "ENGRAM_VAULT_SECRET_ID",
                        "is required with ENGRAM_VAULT_AUTH=approle (or ENGRAM_VAULT_SECRET_ID_FILE)",
                    );
                    None
                }
            };
            VaultAuth::AppRole {
                mount,
                role_id: role_id.unwrap_or_else(|| SecretString::from("")),
                secret_id: secret_id.unwrap_or_else(|| SecretString::from("")),
            }
        }
        "kubernetes" => VaultAuth::Kubernetes {
            mount: reader.string_or("ENGRAM_VAULT_AUTH_MOUNT", "kubernetes"),
            role: reader.string_or("ENGRAM_VAULT_K8S_ROLE", spec.name),
            jwt_path: reader.path_or(
                "ENGRAM_VAULT_K8S_JWT_FILE",
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
        },
        _ => {
            let token = reader.optional_secret("ENGRAM_VAULT_TOKEN");
            let token_file = reader
                .optional_string("ENGRAM_VAULT_TOKEN_FILE")
                .map(PathBuf::from);
            if token.is_none() && token_file.is_none() {
                reader.problem(
                    "ENGRAM_VAULT_TOKEN",
                    "is required with ENGRAM_VAULT_AUTH=token (or ENGRAM_VAULT_TOKEN_FILE)",
                );
            }
            VaultAuth::Token { token, token_file }
        }
    };
    VaultSettings {
        address,
        kv_mount,
        auth,
        request_timeout,
        ca_file,
    }
}

/// What a service's own code gets at build time.
#[derive(Clone)]
pub struct ServiceContext {
    /// The service's secret bundle (empty until first loaded).
    pub secrets: SecretStore,
    /// The metrics registry, to register the service's own metrics.
    pub metrics: Metrics,
    /// Readiness checks, to add the service's own dependencies.
    pub readiness: Readiness,
    /// Cancelled when the service begins shutting down.
    pub shutdown: CancellationToken,
    /// The source behind `secrets`, for reading older versions (for example to verify what
    /// an earlier audit key signed).
    pub secret_source: Arc<dyn SecretSource>,
    /// How to reach other services: `transport.channel_to(url, "audit-sink", timeout)`.
    pub transport: Transport,
    audit: Arc<std::sync::OnceLock<Arc<dyn AuditRecorder>>>,
    alerts: Option<crate::alerts::AlertSender>,
}

impl ServiceContext {
    /// Where this service's audit events go, when anywhere.
    pub fn audit(&self) -> Option<Arc<dyn AuditRecorder>> {
        self.audit.get().cloned()
    }

    /// Installs the recorder (once; later calls are ignored). The audit sink installs one
    /// that writes to its own log.
    pub fn set_audit_recorder(&self, recorder: Arc<dyn AuditRecorder>) {
        let _ = self.audit.set(recorder);
    }

    /// Raises an alert to the admin chat (through the gateway at `ENGRAM_ALERT_ADDR`), in the
    /// background. `kind` is a short stable name the gateway de-duplicates on. Always logged.
    pub fn alert(&self, severity: engram_proto::v1::Severity, kind: &str, message: &str) {
        tracing::warn!(target: "security", kind, severity = severity.as_str_name(), message, "alert");
        if let Some(sender) = &self.alerts {
            sender.send(severity, kind, message);
        }
    }
}

impl std::fmt::Debug for ServiceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceContext")
            .field("secrets", &self.secrets)
            .field("audit", &self.audit.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Why a service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A listener could not be bound.
    #[error("failed to bind {what} on {addr}: {source}")]
    Bind {
        /// `gRPC` or `admin`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The secret source could not be set up (not: could not be reached).
    #[error("failed to set up the secret source: {0}")]
    Secrets(String),
    /// Metrics could not be registered.
    #[error("failed to register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The service's own set-up failed.
    #[error("failed to set up the service: {0:#}")]
    Service(anyhow::Error),
}

/// A built service: listeners bound, nothing served yet.
pub struct Application {
    spec: ServiceSpec,
    grpc: GrpcServer,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    routes: Routes,
    context: ServiceContext,
    watcher: SecretWatcher,
    vault: Option<Arc<VaultSource>>,
    certificates: Option<(Arc<MutualTls>, CertificateSource)>,
    security: ServerSecurity,
    shutdown_grace: Duration,
    drain_delay: Duration,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("service", &self.spec.name)
            .field("grpc_addr", &self.grpc.local_addr())
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Binds both listeners, prepares the secret watcher and the service's gRPC routes.
    ///
    /// # Errors
    ///
    /// [`BuildError`] when a port cannot be bound or the secret source cannot be set up.
    pub async fn build(
        spec: ServiceSpec,
        config: RuntimeConfig,
        build_routes: impl FnOnce(&ServiceContext) -> anyhow::Result<Routes>,
    ) -> Result<Self, BuildError> {
        install_crypto_provider();
        let metrics = Metrics::new(spec.name, spec.version)?;
        let (source, vault): (Arc<dyn SecretSource>, Option<Arc<VaultSource>>) =
            match config.secrets {
                SecretsConfig::Vault(settings) => {
                    let vault = VaultSource::new(settings, metrics.registry())
                        .map_err(|e| BuildError::Secrets(e.to_string()))?;
                    (vault.clone(), Some(vault))
                }
                SecretsConfig::Env { dotenv } => {
                    let source = EnvSecretSource::load(&ProcessEnv, Some(&dotenv))
                        .map_err(|e| BuildError::Secrets(e.to_string()))?;
                    (Arc::new(source), None)
                }
            };
        let source_for_context = source.clone();
        let store = SecretStore::new(
            config.secret_path.clone(),
            source.kind(),
            spec.required_secret_fields,
        );
        let watcher = SecretWatcher::new(
            store.clone(),
            source,
            WatcherSettings {
                refresh_interval: config.secret_refresh,
                initial_backoff: Duration::from_millis(200),
                max_backoff: config.secret_refresh.max(Duration::from_secs(1)),
            },
            metrics.registry(),
        )?;

        let readiness = Readiness::default();
        add_secret_checks(&readiness, &store);
        let certificates = match config.tls {
            TlsSettings::Off => {
                tracing::warn!(
                    target: "security",
                    "ENGRAM_TLS_MODE=off: gRPC without mutual TLS, so without per-RPC authorization (development only)"
                );
                None
            }
            TlsSettings::Vault { mount, role, ttl } => {
                let vault = vault.clone().ok_or_else(|| {
                    BuildError::Secrets("ENGRAM_TLS_MODE=vault needs Vault secrets".to_owned())
                })?;
                Some(CertificateSource::Vault {
                    vault,
                    mount,
                    role,
                    ttl,
                })
            }
            TlsSettings::Files(files) => Some(CertificateSource::Files(files)),
        };
        let certificates = match certificates {
            Some(source) => {
                let tls = MutualTls::new(spec.name, metrics.registry())?;
                tls.add_readiness_check(&readiness);
                Some((tls, source))
            }
            None => None,
        };
        let transport = certificates
            .as_ref()
            .map_or(Transport::Plain, |(tls, _)| Transport::Mutual(tls.clone()));

        let grpc = GrpcServer::bind(config.grpc_addr, spec.grpc_service)
            .await
            .map_err(|source| BuildError::Bind {
                what: "gRPC",
                addr: config.grpc_addr,
                source,
            })?
            .with_metrics(crate::grpc_metrics::GrpcMetrics::register(
                metrics.registry(),
            )?);
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .map_err(|source| BuildError::Bind {
                what: "admin",
                addr: config.admin_addr,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| BuildError::Bind {
                what: "admin",
                addr: config.admin_addr,
                source,
            })?;

        let context = ServiceContext {
            secrets: store,
            metrics,
            readiness,
            shutdown: CancellationToken::new(),
            secret_source: source_for_context,
            audit: Arc::default(),
            alerts: config
                .alert_addr
                .as_ref()
                .map(|addr| crate::alerts::AlertSender::new(spec.name, &transport, addr))
                .transpose()
                .map_err(BuildError::Service)?,
            transport: transport.clone(),
        };
        let routes = build_routes(&context).map_err(BuildError::Service)?;
        if let Some(addr) = &config.audit_addr {
            let recorder = GrpcAuditRecorder::new(&transport, addr, Duration::from_secs(5))
                .map_err(|e| BuildError::Service(e.into()))?;
            context.set_audit_recorder(Arc::new(recorder));
        }
        let security = match &certificates {
            Some((tls, _)) => ServerSecurity::Mutual {
                tls: tls.clone(),
                authorizer: Box::new(Authorizer::new(
                    spec.name,
                    &context,
                    context.metrics.registry(),
                )?),
            },
            None => ServerSecurity::Open,
        };
        Ok(Self {
            spec,
            grpc,
            admin_listener,
            admin_addr,
            routes,
            context,
            watcher,
            vault,
            certificates,
            security,
            shutdown_grace: config.shutdown_grace,
            drain_delay: config.drain_delay,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr()
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The service context (secrets, metrics, readiness).
    pub fn context(&self) -> &ServiceContext {
        &self.context
    }

    /// Serves until `shutdown` is cancelled, then drains: readiness and gRPC health go
    /// NOT_SERVING first, new connections stop, in-flight calls get the grace period.
    ///
    /// # Errors
    ///
    /// A transport error from the gRPC or admin server.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            spec,
            grpc,
            admin_listener,
            admin_addr: _,
            routes,
            context,
            watcher,
            vault,
            certificates,
            security,
            shutdown_grace,
            drain_delay,
        } = self;
        let background = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(watcher.run(background.clone()));
        if let Some(vault) = vault {
            tasks.spawn(vault.maintain_token(background.clone()));
        }
        if let Some((tls, source)) = certificates {
            tasks.spawn(crate::tls::keep(tls, source, background.clone()));
        }
        let health = grpc.health();
        tasks.spawn(follow_secrets(
            context.secrets.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(record_started(spec, context.clone(), background.clone()));
        tasks.spawn(record_rotations(spec, context.clone(), background.clone()));

        let admin_stop = CancellationToken::new();
        let admin_router = admin::router(AdminState {
            metrics: context.metrics.clone(),
            readiness: context.readiness.clone(),
        });
        let admin_task = tokio::spawn(
            axum::serve(admin_listener, admin_router)
                .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
                .into_future(),
        );

        let drain = {
            let shutdown = shutdown.clone();
            let readiness = context.readiness.clone();
            let service_shutdown = context.shutdown.clone();
            let health = health.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!(
                    service = spec.name,
                    "shutting down: marking NOT_SERVING and draining"
                );
                readiness.set_draining();
                health.set_serving(false).await;
                service_shutdown.cancel();
                tokio::time::sleep(drain_delay).await;
            }
        };
        let serve = grpc.serve(routes, security, drain);
        tokio::pin!(serve);
        let grpc_result = tokio::select! {
            result = &mut serve => result.map_err(anyhow::Error::from),
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(drain_delay + shutdown_grace).await;
            } => {
                tracing::warn!(service = spec.name, grace = ?shutdown_grace, "grace period over: dropping calls still in flight");
                Ok(())
            }
        };

        background.cancel();
        while tasks.join_next().await.is_some() {}
        record_stopped(spec, &context).await;
        admin_stop.cancel();
        let admin_result = admin_task.await;
        tracing::info!(service = spec.name, "stopped");
        grpc_result?;
        admin_result??;
        Ok(())
    }
}

fn add_secret_checks(readiness: &Readiness, store: &SecretStore) {
    let secrets = store.clone();
    readiness.add_check("secrets", move || {
        let secrets = secrets.clone();
        async move {
            match (secrets.current(), secrets.status()) {
                (Some(_), _) => Check::Ready,
                (None, status) => Check::NotReady(format!(
                    "{} not loaded yet{}",
                    secrets.path(),
                    status
                        .last_error
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
            }
        }
    });
    let secrets = store.clone();
    readiness.add_check("secret_source", move || {
        let secrets = secrets.clone();
        async move {
            let status = secrets.status();
            match (status.source_reachable, status.last_error) {
                (true, None) => Check::Ready,
                // Before the first load this is already reported by the "secrets" check;
                // afterwards the last good version keeps the service serving.
                (_, Some(error)) if secrets.is_loaded() => Check::Degraded(format!(
                    "{} unreachable or refusing, serving last good version: {error}",
                    secrets.source_kind()
                )),
                (_, Some(error)) => Check::NotReady(format!("{}: {error}", secrets.source_kind())),
                (false, None) => {
                    Check::NotReady(format!("{} not contacted yet", secrets.source_kind()))
                }
            }
        }
    });
}

/// The lifecycle event's details: the service's version and the version (never the value)
/// of the secret it runs with.
fn lifecycle_details(
    spec: ServiceSpec,
    context: &ServiceContext,
) -> Vec<(&'static str, prost_types::Value)> {
    let mut details = vec![
        ("version", text(spec.version)),
        ("secret_path", text(context.secrets.path())),
        ("secret_source", text(context.secrets.source_kind())),
    ];
    if let Some(bundle) = context.secrets.current() {
        #[allow(clippy::cast_precision_loss)]
        details.push(("secret_version", number(bundle.version() as f64)));
    }
    details
}

/// Once the service is ready, records `SERVICE_STARTED`, retrying (the sink may start later)
/// until it succeeds or the service stops.
async fn record_started(spec: ServiceSpec, context: ServiceContext, stop: CancellationToken) {
    let mut updates = context.secrets.subscribe();
    while !context.secrets.is_loaded() {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(recorder) = context.audit() else {
            return;
        };
        let started = event(
            spec.name,
            AuditCategory::Audit,
            "SERVICE_STARTED",
            &lifecycle_details(spec, &context),
        );
        match recorder.record(started).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(error = %error, retry_in = ?backoff, "could not record SERVICE_STARTED yet")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Records `SECRET_ROTATED` (the path and the versions, never a value) each time a new
/// version of the service's secret replaces the one in use. The first load is not a rotation
/// (`SERVICE_STARTED` names that version). Retries briefly when the sink is away; a rotation
/// that still cannot be recorded is a `security` log event.
async fn record_rotations(spec: ServiceSpec, context: ServiceContext, stop: CancellationToken) {
    let mut updates = context.secrets.subscribe();
    let mut in_use = context.secrets.current().map(|bundle| bundle.version());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
        let Some(version) = context.secrets.current().map(|bundle| bundle.version()) else {
            continue;
        };
        let previous = in_use.replace(version);
        let Some(previous) = previous.filter(|p| *p != version) else {
            continue;
        };
        let Some(recorder) = context.audit() else {
            continue;
        };
        #[allow(clippy::cast_precision_loss)]
        let rotated = event(
            spec.name,
            AuditCategory::Security,
            "SECRET_ROTATED",
            &[
                ("secret_path", text(context.secrets.path())),
                ("from_version", number(previous as f64)),
                ("to_version", number(version as f64)),
            ],
        );
        let mut recorded = false;
        for attempt in 0..5u32 {
            if recorder.record(rotated.clone()).await.is_ok() {
                recorded = true;
                break;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)) => {}
            }
        }
        if !recorded {
            tracing::warn!(
                target: "security",
                path = context.secrets.path(),
                version,
                "could not record SECRET_ROTATED in the audit trail"
            );
        }
    }
}

/// Records `SERVICE_STOPPED` (bounded wait: a missing sink must not hold up the exit), then
/// lets the recorder close.
async fn record_stopped(spec: ServiceSpec, context: &ServiceContext) {
    let Some(recorder) = context.audit() else {
        return;
    };
    let stopped = event(
        spec.name,
        AuditCategory::Audit,
        "SERVICE_STOPPED",
        &lifecycle_details(spec, context),
    );
    match tokio::time::timeout(Duration::from_secs(3), recorder.record(stopped)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(error = %error, "could not record SERVICE_STOPPED"),
        Err(_) => tracing::warn!("recording SERVICE_STOPPED timed out"),
    }
    recorder.close().await;
}

/// Turns gRPC health SERVING once the first secret is loaded.
async fn follow_secrets(store: SecretStore, health: GrpcHealth, shutdown: CancellationToken) {
    let mut updates = store.subscribe();
    loop {
        if store.is_loaded() {
            if !shutdown.is_cancelled() {
                health.set_serving(true).await;
            }
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
    }
}

/// Installs rustls' ring provider once; reqwest and vaultrs clients need it.
pub fn install_crypto_provider() {
    // Err means another part of the process already installed one: that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// The whole `main` of a service binary, in the house order: runtime, telemetry, config
/// (exit 64 on bad values), build (log bound addresses), run until a signal, drain.
pub fn run_main<C: ServiceConfig>(
    spec: ServiceSpec,
    build_routes: impl FnOnce(&ServiceContext, C) -> anyhow::Result<Routes>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{}: failed to start the async runtime: {error}", spec.name);
            return ExitCode::from(70);
        }
    };
    let _entered = runtime.enter();
    let env = ProcessEnv;
    let telemetry = match telemetry::init(spec.name, &env) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("{}: failed to start telemetry: {error:#}", spec.name);
            return ExitCode::from(70);
        }
    };
    let (config, service_config) = match RuntimeConfig::load_with::<C>(&spec, &env) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprint!("{}: {errors}", spec.name);
            tracing::error!(problems = errors.0.len(), "invalid configuration: {errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let outcome = runtime.block_on(async {
        let app = Application::build(spec, config, |context| {
            build_routes(context, service_config)
        })
        .await?;
        tracing::info!(
            service = spec.name,
            version = spec.version,
            grpc_addr = %app.grpc_addr(),
            admin_addr = %app.admin_addr(),
            "listening"
        );
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            trigger.cancel();
        });
        app.run_until_stopped(shutdown).await
    });
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "service failed");
            eprintln!("{}: {error:#}", spec.name);
            ExitCode::FAILURE
        }
    }
}

/// A service running inside the calling process, on its own tasks: how tests and benchmarks
/// run a real service next to the one they exercise, without a binary per dependency.
#[derive(Debug)]
pub struct InProcessService {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound admin address.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessService {
    /// Builds and starts `spec` with the settings in `env` (on top of ports 0, a 0.5 s secret
    /// refresh and no drain delay), using `build` for its routes.
    ///
    /// # Errors
    ///
    /// When the settings are invalid or the service cannot be built.
    pub async fn start<C: ServiceConfig>(
        spec: ServiceSpec,
        env: Vec<(&str, String)>,
        build: impl FnOnce(&ServiceContext, C) -> anyhow::Result<Routes>,
    ) -> anyhow::Result<Self> {
        let mut pairs: Vec<(String, String)> = vec![
            ("ENGRAM_GRPC_ADDR".into(), "127.0.0.1:0".into()),
            ("ENGRAM_ADMIN_ADDR".into(), "127.0.0.1:0".into()),
            ("ENGRAM_SECRET_REFRESH_SECS".into(), "0.5".into()),
            ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS".into(), "0".into()),
            // Tests that exercise mutual TLS say so; the rest talk plain gRPC.
            ("ENGRAM_TLS_MODE".into(), "off".into()),
        ];
        pairs.extend(env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let source = crate::config::MapSource::from_pairs(pairs);
        let (config, service) = RuntimeConfig::load_with::<C>(&spec, &source)
            .map_err(|e| anyhow::anyhow!("invalid settings for {}: {e}", spec.name))?;
        let app = Application::build(spec, config, |context| build(context, service)).await?;
        let (grpc_addr, admin_addr) = (app.grpc_addr(), app.admin_addr());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Ok(Self {
            grpc_addr,
            admin_addr,
            shutdown,
            task,
        })
    }

    /// `http://` and the gRPC address, as other services' settings want it (plain gRPC).
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `https://` and the gRPC address, for peers of a service running with mutual TLS.
    pub fn grpc_tls_url(&self) -> String {
        format!("https://{}", self.grpc_addr)
    }

    /// Shuts the service down and waits (at most 15 s) for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}
