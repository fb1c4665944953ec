//! The telegram-gateway service: the Telegram bot a person steers Engram with (allowlists,
//! roles, rate limits, a strict grammar, trade confirmations, alerts to the admin chat).
//!
//! `main.rs` hands [`SPEC`] and [`routes`] to the shared runtime. [`routes`] starts the
//! background work: following the bot token in Vault, restoring the limits from the audit
//! trail, receiving updates (long polling or a webhook) and expiring confirmations.

pub mod access;
pub mod config;
pub mod confirm;
pub mod gateway;
pub mod grammar;
pub mod limits;
pub mod reply;
pub mod telegram;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use engram_proto::service_names;
use engram_proto::v1::telegram_gateway_server::{TelegramGateway, TelegramGatewayServer};
use engram_proto::v1::{SendAlertRequest, SendAlertResponse, Severity};
use engram_runtime::admin::Check;
use engram_runtime::secrets::SecretBundle;
use engram_runtime::{ServiceContext, ServiceSpec};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::config::{GatewayConfig, UpdateMode};
use crate::gateway::Gateway;
use crate::telegram::{TelegramBot, secret_matches};

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "telegram-gateway",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::TELEGRAM_GATEWAY,
    secret_path: "engram/telegram",
    required_secret_fields: &["bot_token", "allowed_chats", "users", "admin_chat"],
    default_grpc_port: 50051,
    default_admin_port: 9101,
};

/// The path Telegram posts updates to in webhook mode.
pub const WEBHOOK_PATH: &str = "/telegram/webhook";
/// The header carrying the webhook secret (Telegram's name).
pub const WEBHOOK_SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// Most updates handled at once.
pub const MAX_CONCURRENT_UPDATES: usize = 64;
/// Longest accepted alert message, in characters.
pub const MAX_ALERT_CHARS: usize = 1000;

/// The SendAlert RPC: other services' alerts to the admin chat.
#[derive(Debug)]
pub struct TelegramGatewayService {
    gateway: Arc<Gateway>,
}

/// Checks a SendAlert request.
///
/// # Errors
///
/// INVALID_ARGUMENT naming the field.
#[allow(clippy::result_large_err)]
pub fn validate_alert(request: &SendAlertRequest) -> Result<(String, Severity), Status> {
    let severity = Severity::try_from(request.severity)
        .ok()
        .filter(|s| *s != Severity::Unspecified)
        .ok_or_else(|| Status::invalid_argument("severity: must be INFO, WARNING or CRITICAL"))?;
    let kind_ok = (1..=64).contains(&request.kind.len())
        && request.kind.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | ':' | '-')
        });
    if !kind_ok {
        return Err(Status::invalid_argument(
            "kind: must be 1-64 characters of a-z, 0-9, _ . : -",
        ));
    }
    let chars = request.message.chars().count();
    if request.message.trim().is_empty() || chars > MAX_ALERT_CHARS {
        return Err(Status::invalid_argument(format!(
            "message: must be 1-{MAX_ALERT_CHARS} characters"
        )));
    }
    let source = request
        .context
        .as_ref()
        .and_then(|c| c.actor.as_ref())
        .map(|a| a.service.clone())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .unwrap_or_else(|| "unknown".to_owned());
    Ok((source, severity))
}

#[tonic::async_trait]
impl TelegramGateway for TelegramGatewayService {
    async fn send_alert(
        &self,
        request: Request<SendAlertRequest>,
    ) -> Result<Response<SendAlertResponse>, Status> {
        let request = request.into_inner();
        let (source, severity) = validate_alert(&request)?;
        let outcome = self
            .gateway
            .alert(&source, &request.kind, severity, &request.message)
            .await;
        Ok(Response::new(match outcome {
            Ok(()) => SendAlertResponse {
                delivered: true,
                suppressed_reason: String::new(),
            },
            Err(reason) => SendAlertResponse {
                delivered: false,
                suppressed_reason: reason,
            },
        }))
    }
}

fn field(bundle: &SecretBundle, name: &str) -> Option<SecretString> {
    bundle.field(name).cloned()
}

/// Shared flags behind the readiness checks and the update loop.
#[derive(Debug, Default)]
struct Progress {
    /// The current token answered getMe.
    connected: AtomicBool,
    /// The limits were rebuilt from the audit trail.
    restored: AtomicBool,
    /// The last Telegram problem, for `/readyz`.
    problem: std::sync::Mutex<Option<String>>,
}

impl Progress {
    fn set_problem(&self, problem: Option<String>) {
        *self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

async fn pause(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(duration) => true,
    }
}

/// Follows `engram/telegram`: a new bot token (or webhook secret) rebuilds the connection and
/// checks it with getMe. `ready` carries a counter that moves on every successful switch.
async fn follow_token(
    context: ServiceContext,
    gateway: Arc<Gateway>,
    progress: Arc<Progress>,
    switched: watch::Sender<u64>,
) {
    let mut bundles = context.secrets.subscribe();
    let mut first = true;
    let mut backoff = Duration::from_millis(200);
    loop {
        let bundle = bundles.borrow_and_update().clone();
        if let Some(bundle) = bundle
            && let Some(token) = field(&bundle, "bot_token")
        {
            let changed = !gateway.bot().uses_token(&token);
            if changed {
                progress.connected.store(false, Ordering::SeqCst);
                if let Err(error) = gateway.bot().set_token(&token) {
                    progress.set_problem(Some(error));
                }
            }
            if changed || !progress.connected.load(Ordering::SeqCst) {
                match gateway.bot().username().await {
                    Ok(username) => {
                        gateway.set_username(username);
                        progress.connected.store(true, Ordering::SeqCst);
                        progress.set_problem(None);
                        backoff = Duration::from_millis(200);
                        tracing::info!(version = bundle.version(), "bot token in use");
                        if !first {
                            gateway.record_rotation(bundle.version()).await;
                        }
                        first = false;
                        switched.send_modify(|n| *n += 1);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Telegram did not accept the bot token (getMe)");
                        progress.set_problem(Some(error.to_string()));
                        if !pause(&context.shutdown, backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
        }
        tokio::select! {
            () = context.shutdown.cancelled() => return,
            changed = bundles.changed() => if changed.is_err() { return },
        }
    }
}

/// Rebuilds the limits from the audit trail, retrying until the sink answers.
async fn restore(context: ServiceContext, gateway: Arc<Gateway>, progress: Arc<Progress>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match gateway.restore_from_audit().await {
            Ok(count) => {
                tracing::info!(records = count, "limits restored from the audit trail");
                progress.restored.store(true, Ordering::SeqCst);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot restore the limits from the audit trail yet; not taking updates");
                if !pause(&context.shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Waits until the token works and the limits are restored (or shutdown).
async fn wait_until_ready(
    shutdown: &CancellationToken,
    progress: &Progress,
    switched: &mut watch::Receiver<u64>,
) -> bool {
    loop {
        if progress.restored.load(Ordering::SeqCst) && progress.connected.load(Ordering::SeqCst) {
            return true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            _ = switched.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

fn dispatch(gateway: &Arc<Gateway>, slots: &Arc<Semaphore>, update: teloxide::types::Update) {
    let gateway = gateway.clone();
    let slots = slots.clone();
    tokio::spawn(async move {
        let Ok(_permit) = slots.acquire_owned().await else {
            return;
        };
        gateway.handle_update(update).await;
    });
}

/// Long polling: one getUpdates at a time, restarted at once when the token changes. The
/// offset moves past every update as soon as it is received, so an update is handled at most
/// once even across a crash (a trade is never repeated; a lost one is sent again by a person).
async fn poll_updates(
    context: ServiceContext,
    gateway: Arc<Gateway>,
    progress: Arc<Progress>,
    mut switched: watch::Receiver<u64>,
    poll_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_UPDATES));
    let mut offset = 0_i32;
    let mut backoff = Duration::from_millis(200);
    let mut webhook_cleared = false;
    loop {
        if !wait_until_ready(&context.shutdown, &progress, &mut switched).await {
            return;
        }
        if !webhook_cleared {
            match gateway.bot().delete_webhook().await {
                Ok(()) => webhook_cleared = true,
                Err(error) => tracing::warn!(%error, "deleteWebhook failed; polling anyway"),
            }
        }
        switched.borrow_and_update();
        let result = tokio::select! {
            () = context.shutdown.cancelled() => return,
            _ = switched.changed() => continue,
            result = gateway.bot().poll(offset, poll_timeout) => result,
        };
        match result {
            Ok(updates) => {
                backoff = Duration::from_millis(200);
                progress.set_problem(None);
                for update in updates {
                    offset = offset.max(
                        i32::try_from(update.id.0)
                            .unwrap_or(i32::MAX)
                            .saturating_add(1),
                    );
                    dispatch(&gateway, &slots, update);
                }
            }
            Err(error) => {
                if error.kind == "conflict" {
                    tracing::error!(target: "security", %error, "another process is taking this bot's updates");
                    webhook_cleared = false;
                } else {
                    tracing::warn!(%error, "getUpdates failed");
                }
                progress.set_problem(Some(error.to_string()));
                if !pause(&context.shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[derive(Clone)]
struct WebhookState {
    context: ServiceContext,
    gateway: Arc<Gateway>,
    slots: Arc<Semaphore>,
}

async fn webhook(State(state): State<WebhookState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let expected = state
        .context
        .secrets
        .current()
        .and_then(|b| field(&b, "webhook_secret"));
    let presented = headers
        .get(WEBHOOK_SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let Some(expected) = expected else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    if !secret_matches(presented, expected.expose_secret().as_bytes()) {
        tracing::warn!(target: "security", "webhook delivery with a wrong or missing secret token refused");
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice::<teloxide::types::Update>(&body) {
        Ok(update) => {
            dispatch(&state.gateway, &state.slots, update);
            StatusCode::OK
        }
        // Telegram retries non-2xx deliveries; a body it cannot have sent is dropped.
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// Webhook mode: a small HTTP listener for Telegram's deliveries, and setWebhook again
/// whenever the token or the secret changes.
async fn serve_webhook(
    context: ServiceContext,
    gateway: Arc<Gateway>,
    progress: Arc<Progress>,
    mut switched: watch::Receiver<u64>,
    listener: tokio::net::TcpListener,
    public_url: url::Url,
) {
    let state = WebhookState {
        context: context.clone(),
        gateway: gateway.clone(),
        slots: Arc::new(Semaphore::new(MAX_CONCURRENT_UPDATES)),
    };
    let router = axum::Router::new()
        .route(WEBHOOK_PATH, axum::routing::post(webhook))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state);
    let shutdown = context.shutdown.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    let mut secrets = context.secrets.subscribe();
    loop {
        if !wait_until_ready(&context.shutdown, &progress, &mut switched).await {
            break;
        }
        let secret = context
            .secrets
            .current()
            .and_then(|b| field(&b, "webhook_secret"));
        match secret {
            None => progress.set_problem(Some(
                "webhook mode needs webhook_secret in engram/telegram".to_owned(),
            )),
            Some(secret) => match gateway.bot().set_webhook(&public_url, &secret).await {
                Ok(()) => progress.set_problem(None),
                Err(error) => {
                    tracing::warn!(%error, "setWebhook failed");
                    progress.set_problem(Some(error.to_string()));
                    if pause(&context.shutdown, Duration::from_secs(2)).await {
                        continue;
                    }
                    break;
                }
            },
        }
        switched.borrow_and_update();
        secrets.borrow_and_update();
        tokio::select! {
            () = context.shutdown.cancelled() => break,
            _ = switched.changed() => {}
            _ = secrets.changed() => {}
        }
    }
    let _ = server.await;
}

/// The service's gRPC routes and background work.
///
/// # Errors
///
/// When the webhook listener cannot be bound, an address is unusable or the metrics cannot
/// be registered.
pub fn routes(context: &ServiceContext, config: GatewayConfig) -> anyhow::Result<Routes> {
    let request_timeout = config.poll_timeout + Duration::from_secs(10);
    let bot = TelegramBot::new(
        config.telegram_api_url.clone(),
        config.send_limits,
        request_timeout,
    );
    let mode = config.mode.clone();
    let poll_timeout = config.poll_timeout;
    let sweep_every =
        (config.confirm_ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let gateway = Gateway::new(context, config, bot)?;
    let progress = Arc::new(Progress::default());
    let (switched_tx, switched_rx) = watch::channel(0_u64);

    {
        let (progress, gateway) = (progress.clone(), gateway.clone());
        context.readiness.add_check("telegram", move || {
            let (progress, gateway) = (progress.clone(), gateway.clone());
            async move {
                if let Some(problem) = gateway.access_problem() {
                    return Check::NotReady(format!("access list: {problem}"));
                }
                if !progress.restored.load(Ordering::SeqCst) {
                    return Check::NotReady("restoring limits from the audit trail".to_owned());
                }
                if !progress.connected.load(Ordering::SeqCst) {
                    return Check::NotReady(
                        progress
                            .problem()
                            .unwrap_or_else(|| "connecting to Telegram".to_owned()),
                    );
                }
                match progress.problem() {
                    Some(problem) => Check::Degraded(problem),
                    None => Check::Ready,
                }
            }
        });
    }

    tokio::spawn(follow_token(
        context.clone(),
        gateway.clone(),
        progress.clone(),
        switched_tx,
    ));
    tokio::spawn(restore(context.clone(), gateway.clone(), progress.clone()));
    {
        let (gateway, shutdown) = (gateway.clone(), context.shutdown.clone());
        tokio::spawn(async move {
            while pause(&shutdown, sweep_every).await {
                gateway.sweep_expired().await;
            }
        });
    }
    match mode {
        UpdateMode::Polling => {
            tokio::spawn(poll_updates(
                context.clone(),
                gateway.clone(),
                progress,
                switched_rx,
                poll_timeout,
            ));
        }
        UpdateMode::Webhook { listen, public_url } => {
            let listener = std::net::TcpListener::bind(listen).map_err(|e| {
                anyhow::anyhow!("cannot bind the webhook listener on {listen}: {e}")
            })?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!(addr = %listener.local_addr()?, "webhook listener bound");
            tokio::spawn(serve_webhook(
                context.clone(),
                gateway.clone(),
                progress,
                switched_rx,
                listener,
                public_url,
            ));
        }
    }
    Ok(Routes::new(TelegramGatewayServer::new(
        TelegramGatewayService { gateway },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_proto::v1::{Actor, RequestContext};

    fn alert(kind: &str, message: &str, severity: Severity) -> SendAlertRequest {
        SendAlertRequest {
            context: Some(RequestContext {
                actor: Some(Actor {
                    service: "exchange-signer".to_owned(),
                    ..Actor::default()
                }),
                ..RequestContext::default()
            }),
            severity: severity as i32,
            kind: kind.to_owned(),
            message: message.to_owned(),
            occurred_at: None,
        }
    }

    #[test]
    fn alerts_are_validated() {
        assert_eq!(
            validate_alert(&alert("trading_halted", "halted", Severity::Critical))
                .expect("valid")
                .0,
            "exchange-signer"
        );
        let bad = [
            alert("", "m", Severity::Info),
            alert("Has Spaces", "m", Severity::Info),
            alert(&"k".repeat(65), "m", Severity::Info),
            alert("k", "", Severity::Info),
            alert("k", "  ", Severity::Info),
            alert("k", &"m".repeat(MAX_ALERT_CHARS + 1), Severity::Info),
            alert("k", "m", Severity::Unspecified),
        ];
        for request in bad {
            let status = validate_alert(&request).expect_err("invalid");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
        let mut unknown = alert("k", "m", Severity::Info);
        unknown.severity = 42;
        assert!(validate_alert(&unknown).is_err());
    }
}
