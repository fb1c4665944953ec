//! The audit-sink service: the append-only, hash-chained, durable audit trail.
//!
//! Records are JSON lines in segment files under `ENGRAM_AUDIT_DIR`, acknowledged only after
//! `fdatasync`, chained by SHA-256 and vouched for by checkpoints signed with the audit key
//! from Vault (`engram/audit`). `main.rs` hands [`SPEC`] and [`routes`] to the shared runtime.

pub mod convert;
pub mod keys;
pub mod log;
pub mod metrics;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engram_proto::service_names;
use engram_proto::v1::AppendRequest;
use engram_proto::v1::audit_sink_server::AuditSinkServer;
use engram_runtime::admin::Check;
use engram_runtime::audit::{AuditRecordError, AuditRecorder};
use engram_runtime::config::ConfigReader;
use engram_runtime::{ServiceConfig, ServiceContext, ServiceSpec};
use futures::FutureExt;
use futures::future::BoxFuture;
use tonic::service::Routes;

use crate::keys::{KEY_FIELD, KeyRing};
use crate::log::{AuditLog, LogSettings};
use crate::metrics::AuditMetrics;
use crate::service::{AuditSinkService, validate};

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "audit-sink",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::AUDIT_SINK,
    secret_path: "engram/audit",
    required_secret_fields: &[KEY_FIELD],
    default_grpc_port: 50054,
    default_admin_port: 9104,
};

/// Detail fields stored only as their HMAC unless configured otherwise.
pub const DEFAULT_SENSITIVE_FIELDS: &str =
    "api_key,api_secret,secret,token,bot_token,password,private_key,hmac_key,secret_id";

/// The audit sink's own settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where segments and checkpoints live (`ENGRAM_AUDIT_DIR`).
    pub dir: PathBuf,
    /// Segment size limit (`ENGRAM_AUDIT_SEGMENT_MAX_BYTES`, default 10 MiB).
    pub segment_max_bytes: u64,
    /// A checkpoint every this many records (`ENGRAM_AUDIT_CHECKPOINT_EVERY`, default 1000).
    pub checkpoint_every: u64,
    /// …or this often when records arrived (`ENGRAM_AUDIT_CHECKPOINT_INTERVAL_SECS`, default 60).
    pub checkpoint_interval: Duration,
    /// Detail fields stored as HMACs (`ENGRAM_AUDIT_SENSITIVE_FIELDS`, comma-separated).
    pub sensitive_fields: Vec<String>,
    /// How often the sink verifies its own trail (`ENGRAM_AUDIT_VERIFY_INTERVAL_SECS`,
    /// default 3600), so tampering is noticed without anyone asking.
    pub verify_interval: Duration,
}

impl ServiceConfig for AuditConfig {
    fn read(reader: &mut ConfigReader<'_>) -> Self {
        let dir = reader.path_or("ENGRAM_AUDIT_DIR", ".engram/audit");
        let segment_max_bytes = reader.parsed_or(
            "ENGRAM_AUDIT_SEGMENT_MAX_BYTES",
            10 * 1024 * 1024,
            "a size in bytes between 4096 and 1073741824",
            |raw| match raw.parse::<u64>() {
                Ok(n) if (4096..=1 << 30).contains(&n) => Ok(n),
                Ok(_) => Err("out of range".to_owned()),
                Err(e) => Err(e.to_string()),
            },
        );
        let checkpoint_every =
            u64::from(reader.positive_u32_or("ENGRAM_AUDIT_CHECKPOINT_EVERY", 1000));
        let checkpoint_interval = reader.positive_secs_or(
            "ENGRAM_AUDIT_CHECKPOINT_INTERVAL_SECS",
            Duration::from_secs(60),
        );
        let fields = reader.string_or("ENGRAM_AUDIT_SENSITIVE_FIELDS", DEFAULT_SENSITIVE_FIELDS);
        let sensitive_fields: Vec<String> = fields
            .split(',')
            .map(|f| f.trim().to_ascii_lowercase())
            .filter(|f| !f.is_empty())
            .collect();
        if sensitive_fields.iter().any(|f| {
            !f.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }) {
            reader.problem(
                "ENGRAM_AUDIT_SENSITIVE_FIELDS",
                "must be a comma-separated list of field names",
            );
        }
        let verify_interval = reader.positive_secs_or(
            "ENGRAM_AUDIT_VERIFY_INTERVAL_SECS",
            Duration::from_secs(3600),
        );
        Self {
            dir,
            segment_max_bytes,
            checkpoint_every,
            checkpoint_interval,
            sensitive_fields,
            verify_interval,
        }
    }
}

/// Records this service's own events (lifecycle) straight into its log.
struct LocalRecorder {
    log: AuditLog,
}

impl AuditRecorder for LocalRecorder {
    fn record(
        &self,
        event: engram_proto::v1::AuditEvent,
    ) -> BoxFuture<'_, Result<(), AuditRecordError>> {
        async move {
            let event = validate(AppendRequest {
                event: Some(event),
                idempotency_key: String::new(),
            })
            .map_err(|status| AuditRecordError(status.message().to_owned()))?;
            self.log
                .append(vec![event])
                .await
                .map(|_| ())
                .map_err(|e| AuditRecordError(e.to_string()))
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.log.close().boxed()
    }
}

/// Opens the log (recovering a torn tail), registers metrics and readiness, and returns the
/// gRPC routes.
///
/// # Errors
///
/// When the audit directory cannot be created or read.
pub fn routes(context: &ServiceContext, config: AuditConfig) -> anyhow::Result<Routes> {
    let metrics = AuditMetrics::register(context.metrics.registry())?;
    let keys = KeyRing::new(context.secrets.clone(), context.secret_source.clone());
    let (log, recovery) = AuditLog::open(
        LogSettings {
            dir: config.dir.clone(),
            segment_max_bytes: config.segment_max_bytes,
            checkpoint_every: config.checkpoint_every,
            checkpoint_interval: config.checkpoint_interval,
            sensitive_fields: config.sensitive_fields,
        },
        keys.provider(),
        Arc::new(metrics.clone()),
    )
    .with_context(|| format!("cannot open the audit directory {}", config.dir.display()))?;
    if recovery.segment_bytes_cut > 0 || recovery.checkpoint_bytes_cut > 0 {
        tracing::warn!(
            target: "security",
            segment_bytes_cut = recovery.segment_bytes_cut,
            checkpoint_bytes_cut = recovery.checkpoint_bytes_cut,
            "cut a torn, never acknowledged tail left by a crash"
        );
    }
    let head = log.head();
    tracing::info!(dir = %config.dir.display(), head_sequence = head.seq, segments = head.segments, "audit log open");

    let dir = config.dir.clone();
    context.readiness.add_check("audit_dir", move || {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || match dir_is_writable(&dir) {
                Ok(()) => Check::Ready,
                Err(error) => {
                    Check::NotReady(format!("{} is not writable: {error}", dir.display()))
                }
            })
            .await
            .unwrap_or_else(|_| Check::NotReady("writability check failed".to_owned()))
        }
    });
    context.set_audit_recorder(Arc::new(LocalRecorder { log: log.clone() }));
    survive_file_size_limit();
    let service = AuditSinkService::new(log, keys, metrics);
    spawn_periodic_verify(service.clone(), config.verify_interval, context.clone());
    Ok(Routes::new(AuditSinkServer::new(service)))
}

/// Verifies the trail every `interval` (first after one interval) until shutdown; a failure
/// is counted and logged by `run_verify`.
fn spawn_periodic_verify(service: AuditSinkService, interval: Duration, context: ServiceContext) {
    let stop = context.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match service.run_verify().await {
                Ok(report) if report.ok => {
                    tracing::info!(records = report.records_checked, "audit trail verified")
                }
                Ok(report) => context.alert(
                    engram_proto::v1::Severity::Critical,
                    "audit_verify_failed",
                    &format!(
                        "The audit trail does not verify at record {} ({}): {}",
                        report.first_bad_seq, report.first_bad_segment, report.reason
                    ),
                ),
                Err(status) => {
                    tracing::error!(error = %status.message(), "periodic audit verification failed to run")
                }
            }
        }
    });
}

/// A write past `RLIMIT_FSIZE` raises SIGXFSZ, whose default action kills the process. The
/// sink must instead see the failed write (EFBIG), roll it back and answer UNAVAILABLE, as for
/// a full disk: installing a handler replaces that default.
fn survive_file_size_limit() {
    const SIGXFSZ: i32 = 25;
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ)) {
        Ok(mut signals) => {
            tokio::spawn(async move {
                while signals.recv().await.is_some() {
                    tracing::warn!(target: "security", "file size limit reached (SIGXFSZ)");
                }
            });
        }
        Err(error) => tracing::warn!(error = %error, "cannot handle SIGXFSZ"),
    }
}

/// Creates and removes a probe file: the real test of writability (permissions, read-only
/// mounts, a full inode table).
fn dir_is_writable(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(".writable-probe");
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}
