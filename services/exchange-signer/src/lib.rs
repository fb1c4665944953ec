//! The exchange-signer service: the only holder of the exchange API key; typed orders under
//! a trading policy, signed as Binance documents, never placed twice, recorded before they
//! leave. There is no withdrawal or transfer code path.
//!
//! `main.rs` hands [`SPEC`] and [`routes`] to the shared runtime.

pub mod client;
pub mod config;
pub mod policy;
pub mod service;
pub mod signing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engram_proto::service_names;
use engram_proto::v1::exchange_signer_server::ExchangeSignerServer;
use engram_runtime::admin::Check;
use engram_runtime::secrets::SecretBundle;
use engram_runtime::{ServiceContext, ServiceSpec};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;
use tonic::service::Routes;

use crate::client::{ClientSettings, Credentials, ExchangeClient};
use crate::config::SignerConfig;
use crate::service::{ExchangeSignerService, KeyState, Signer, SignerMetrics};
use crate::signing::{Query, SigningKey};

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "exchange-signer",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::EXCHANGE_SIGNER,
    secret_path: "engram/exchange",
    required_secret_fields: &["api_key"],
    default_grpc_port: 50052,
    default_admin_port: 9102,
};

/// The key from `engram/exchange`: `api_key` plus either `ed25519_private_key` (preferred,
/// as Binance recommends) or `api_secret` (HMAC).
///
/// # Errors
///
/// A description of what is missing or malformed (never the material).
pub fn credentials_from(bundle: &SecretBundle) -> Result<Credentials, String> {
    let api_key = bundle.field("api_key").ok_or("api_key is missing")?.clone();
    let key = if let Some(ed25519) = bundle.field("ed25519_private_key") {
        SigningKey::ed25519(ed25519).map_err(|e| e.to_string())?
    } else if let Some(secret) = bundle.field("api_secret") {
        SigningKey::hmac(SecretString::from(secret.expose_secret().to_owned()))
            .map_err(|e| e.to_string())?
    } else {
        return Err("neither ed25519_private_key nor api_secret is present".to_owned());
    };
    Ok(Credentials { api_key, key })
}

/// Why the key's restrictions make it unfit to trade with, if they do.
fn dangerous(restrictions: &serde_json::Value) -> Vec<&'static str> {
    [
        ("enableWithdrawals", "withdrawals"),
        ("enableInternalTransfer", "internal transfers"),
        ("permitsUniversalTransfer", "universal transfers"),
    ]
    .into_iter()
    // A missing field counts as enabled: unknown is not safe.
    .filter(|(field, _)| restrictions[*field].as_bool().unwrap_or(true))
    .map(|(_, what)| what)
    .collect()
}

/// Builds the signer: the exchange client (its key arrives from Vault and rotates in place),
/// the background checks of the key's restrictions, the caps rebuilt from the exchange, and
/// the gRPC routes.
///
/// # Errors
///
/// When the HTTP client or the metrics cannot be set up.
pub fn routes(context: &ServiceContext, config: SignerConfig) -> anyhow::Result<Routes> {
    let client = ExchangeClient::new(
        ClientSettings {
            base_url: config.exchange_url.clone(),
            recv_window_ms: config.recv_window_ms,
            request_timeout: config.request_timeout,
            weight_limit: config.weight_limit,
        },
        None,
    )?;
    let metrics = SignerMetrics::register(context.metrics.registry())?;
    context
        .metrics
        .registry()
        .register(Box::new(client.response_metrics().clone()))?;
    let signer = Arc::new(Signer::new(
        client.clone(),
        config.policy.clone(),
        context.clone(),
        metrics,
        Some(config.state_dir.join("halt.json")),
    )?);
    let recheck = Arc::new(Notify::new());
    let counters_ready = Arc::new(AtomicBool::new(false));

    // Key rotation: every new version of engram/exchange is used from the next request on.
    {
        let context = context.clone();
        let client = client.clone();
        let recheck = recheck.clone();
        tokio::spawn(async move {
            let mut updates = context.secrets.subscribe();
            loop {
                let bundle = updates.borrow_and_update().clone();
                if let Some(bundle) = bundle {
                    match credentials_from(&bundle) {
                        Ok(credentials) => {
                            client.rotate(credentials);
                            tracing::info!(target: "security", version = bundle.version(), "exchange key in use");
                            recheck.notify_one();
                        }
                        Err(reason) => {
                            tracing::error!(target: "security", version = bundle.version(), %reason, "unusable exchange key version; keeping the previous one")
                        }
                    }
                }
                tokio::select! {
                    () = context.shutdown.cancelled() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    // The key's restrictions, at start, after each rotation and periodically; then the caps.
    {
        let signer = signer.clone();
        let recheck = recheck.clone();
        let counters_ready = counters_ready.clone();
        let stop = context.shutdown.clone();
        let interval = config.key_check_interval;
        tokio::spawn(async move {
            loop {
                let mut wait = interval;
                if signer.client.has_credentials() {
                    match check_key(&signer).await {
                        Ok(()) => {
                            if !counters_ready.load(Ordering::SeqCst) {
                                match signer.rebuild_counters().await {
                                    Ok(()) => counters_ready.store(true, Ordering::SeqCst),
                                    Err(error) => {
                                        tracing::warn!(error = %error, "cannot rebuild the caps' counters yet");
                                        wait = std::time::Duration::from_secs(2);
                                    }
                                }
                            }
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "cannot check the exchange key yet");
                            wait = std::time::Duration::from_secs(2);
                        }
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = recheck.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    {
        let signer = signer.clone();
        let allow_dangerous = config.allow_dangerous_key;
        context.readiness.add_check("exchange_key", move || {
            let signer = signer.clone();
            let counters_ready = counters_ready.clone();
            async move {
                if !signer.client.has_credentials() {
                    return Check::NotReady("no usable exchange key loaded".to_owned());
                }
                let key: KeyState = signer
                    .key
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let Some(restrictions) = key.restrictions else {
                    return Check::NotReady(
                        "the key's restrictions have not been read from the exchange yet"
                            .to_owned(),
                    );
                };
                let risks = dangerous(&restrictions);
                if !risks.is_empty() {
                    let message = format!(
                        "the exchange key allows {}: refusing to trade with it",
                        risks.join(", ")
                    );
                    return if allow_dangerous {
                        Check::Degraded(format!("DEV OVERRIDE: {message}"))
                    } else {
                        Check::NotReady(message)
                    };
                }
                if !counters_ready.load(Ordering::SeqCst) {
                    return Check::NotReady(
                        "the caps' counters have not been rebuilt from the exchange yet".to_owned(),
                    );
                }
                let halted = signer
                    .halted
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                match (
                    halted,
                    restrictions["ipRestrict"].as_bool().unwrap_or(false),
                ) {
                    (Some(reason), _) => Check::Degraded(format!("trading halted: {reason}")),
                    (None, false) => {
                        Check::Degraded("the exchange key is not IP-restricted".to_owned())
                    }
                    (None, true) => Check::Ready,
                }
            }
        });
    }
    spawn_policy_reload(signer.clone(), context.shutdown.clone());
    Ok(Routes::new(ExchangeSignerServer::new(
        ExchangeSignerService::new(signer),
    )))
}

/// Re-reads the policy (environment and `ENGRAM_CONFIG_FILE`) on SIGHUP. A policy with any
/// bad value is refused whole, with every problem logged, and the old one stays in force.
fn spawn_policy_reload(signer: Arc<Signer>, stop: tokio_util::sync::CancellationToken) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: the policy will not reload");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            match reload_policy(&engram_runtime::config::ProcessEnv) {
                Ok(policy) => signer.replace_policy(policy).await,
                Err(errors) => {
                    tracing::error!(target: "security", problems = %errors, "policy reload refused; the previous policy stays in force")
                }
            }
        }
    });
}

/// Reads the policy afresh from `env` (and the file it names).
///
/// # Errors
///
/// Every bad value, as at start.
pub fn reload_policy(
    env: &dyn engram_runtime::config::ConfigSource,
) -> Result<policy::Policy, engram_runtime::config::ConfigErrors> {
    let file = engram_runtime::config::load_file_layer(env)
        .map_err(|p| engram_runtime::config::ConfigErrors(vec![p]))?;
    let mut reader = engram_runtime::config::ConfigReader::new(vec![env, &file]);
    let config = <SignerConfig as engram_runtime::ServiceConfig>::read(&mut reader);
    reader.finish()?;
    Ok(config.policy)
}

/// The seed document's rule: rotate exchange keys every 90 days. The age comes from the
/// `created` date in the secret's Vault metadata (also exported as
/// `engram_secret_created_timestamp_seconds` for alerting).
fn warn_if_old(signer: &Signer) {
    let Some(bundle) = signer.context.secrets.current() else {
        return;
    };
    let Some(created) = bundle.custom_metadata().get("created") else {
        tracing::warn!(target: "security", "the exchange key has no 'created' date in its Vault metadata: its age is unknown");
        return;
    };
    let parsed = humantime::parse_rfc3339_weak(&format!("{created}T00:00:00Z"))
        .or_else(|_| humantime::parse_rfc3339_weak(created));
    match parsed
        .ok()
        .and_then(|c| std::time::SystemTime::now().duration_since(c).ok())
    {
        Some(age) if age.as_secs() > 90 * 86_400 => tracing::warn!(
            target: "security",
            age_days = age.as_secs() / 86_400,
            "the exchange key is older than 90 days: rotate it"
        ),
        Some(_) => {}
        None => {
            tracing::warn!(target: "security", "the exchange key's 'created' date is not a date")
        }
    }
}

/// Syncs the clock and reads the key's restrictions; logs a security event when they are
/// dangerous (readiness reports it too).
async fn check_key(signer: &Signer) -> Result<(), client::ExchangeError> {
    signer.client.sync_clock().await?;
    let restrictions = signer
        .client
        .signed(
            reqwest::Method::GET,
            "/sapi/v1/account/apiRestrictions",
            Query::new(),
        )
        .await?;
    let risks = dangerous(&restrictions);
    if !risks.is_empty() {
        tracing::error!(target: "security", risks = ?risks, "the exchange key can move funds out: the signer will not become ready");
        signer.context.alert(
            engram_proto::v1::Severity::Critical,
            "exchange_key_dangerous",
            &format!(
                "The exchange key allows {}: the signer refuses to trade with it. Replace the key.",
                risks.join(", ")
            ),
        );
    } else if !restrictions["ipRestrict"].as_bool().unwrap_or(false) {
        tracing::warn!(target: "security", "the exchange key is not IP-restricted");
    }
    warn_if_old(signer);
    let mut key = signer
        .key
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    key.restrictions = Some(restrictions);
    key.checked_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or_default())
        .unwrap_or_default();
    Ok(())
}
