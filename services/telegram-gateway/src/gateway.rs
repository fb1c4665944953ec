//! What the gateway does with each Telegram update: who is asking (allowlist and role), how
//! often (rate limits), what (the grammar), then the command itself against the signer, the
//! advisor or the audit sink, with trades waiting behind a confirmation. Every step leaves an
//! audit record; refusals are security records and raise alerts to the admin chat.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_proto::v1::llm_advisor_client::LlmAdvisorClient;
use engram_proto::v1::{
    Actor, AdviceContext, AdviseRequest, AuditCategory, AuditEvent, CancelOrderRequest,
    GetBalancesRequest, GetPriceRequest, GetStatusRequest, HaltRequest, HeadRequest,
    ListOpenOrdersRequest, OrderSide, OrderType, PlaceOrderRequest, QueryRequest, RequestContext,
    ResumeRequest, Severity, TimeInForce, VerifyRequest, cancel_order_request,
};
use engram_runtime::ServiceContext;
use engram_runtime::audit::{number, text};
use engram_runtime::grpc::inject_trace_context;
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use ring::rand::SystemRandom;
use rust_decimal::Decimal;
use teloxide::types::{CallbackQuery, Message, Update, UpdateKind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::access::{AccessList, Denied};
use crate::config::GatewayConfig;
use crate::confirm::{CANCEL_PREFIX, CONFIRM_PREFIX, Confirmations, Pending, Press, new_nonce};
use crate::grammar::{self, Command, OrderRef, Parsed, Role, Side};
use crate::limits::{OncePerWindow, RateDecision, SlidingWindow, instant_ago};
use crate::reply::{self, escape, escape_bounded};
use crate::telegram::TelegramBot;

/// The service name in actors and audit records.
pub const SERVICE: &str = "telegram-gateway";
/// Commands older than this (by Telegram's date) are not run: they waited in Telegram's queue
/// while the gateway was down.
pub const MAX_COMMAND_AGE_SECS: i64 = 120;

/// Most AUTH_DENIED records per chat per notice window; later refusals are only counted.
pub const MAX_DENIED_RECORDS_PER_CHAT: u32 = 20;

type Interceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type Traced = InterceptedService<Channel, Interceptor>;

#[derive(Clone, Debug)]
struct Metrics {
    updates: IntCounterVec,
    commands: IntCounterVec,
    unauthorized: IntCounterVec,
    rate_limited: IntCounterVec,
    confirmations: IntCounterVec,
    alerts: IntCounterVec,
    telegram_errors: IntCounterVec,
    latency: HistogramVec,
}

impl Metrics {
    fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "engram_telegram_command_seconds",
                "Time from an update's arrival to the reply being sent, by command.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["command"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self {
            updates: counter(
                "engram_telegram_updates_total",
                "Updates received, by kind (message, callback, other).",
                &["kind"],
            )?,
            commands: counter(
                "engram_telegram_commands_total",
                "Commands from allowed users, by command and outcome (ok, error, bad_syntax, denied_role, audit_unavailable).",
                &["command", "outcome"],
            )?,
            unauthorized: counter(
                "engram_telegram_unauthorized_total",
                "Updates refused by the allowlist, by reason (chat, user).",
                &["reason"],
            )?,
            rate_limited: counter(
                "engram_telegram_rate_limited_total",
                "Commands refused by a rate limit, by scope (user, global).",
                &["scope"],
            )?,
            confirmations: counter(
                "engram_telegram_confirmations_total",
                "Trade confirmations, by outcome (requested, confirmed, cancelled, expired, wrong_user, unknown).",
                &["outcome"],
            )?,
            alerts: counter(
                "engram_telegram_alerts_total",
                "Alerts to the admin chat, by severity and outcome (delivered, deduplicated, rate_limited, failed).",
                &["severity", "outcome"],
            )?,
            telegram_errors: counter(
                "engram_telegram_api_errors_total",
                "Failed Bot API calls, by method and kind.",
                &["method", "kind"],
            )?,
            latency,
        }
        .with_zero_series())
    }

    /// Creates the series whose labels are known in advance at 0, so the first refusal is an
    /// increase Prometheus can see (a series born at 1 never moves `increase()`, and the
    /// unauthorized-spike alert would miss the first burst after a start).
    fn with_zero_series(self) -> Self {
        for reason in ["chat", "user"] {
            self.unauthorized.with_label_values(&[reason]);
        }
        for scope in ["user", "global"] {
            self.rate_limited.with_label_values(&[scope]);
        }
        self
    }
}

/// The gateway's limits and open confirmations (one lock: every use is short and in memory).
#[derive(Debug)]
struct Limits {
    per_user: SlidingWindow<i64>,
    global: SlidingWindow<()>,
    denied_notice: OncePerWindow<i64>,
    denied_records: SlidingWindow<i64>,
    alert_dedup: OncePerWindow<String>,
    alert_rate: SlidingWindow<()>,
    confirmations: Confirmations,
}

/// Who sent an update, once the allowlist has let them through.
#[derive(Debug, Clone)]
struct Caller {
    user_id: i64,
    chat_id: i64,
    role: Role,
    correlation_id: String,
}

/// A reply: HTML text and optional buttons.
#[derive(Debug, Default)]
struct Reply {
    html: String,
    buttons: Vec<(String, String)>,
    /// The nonce of a confirmation this reply asks for.
    nonce: Option<String>,
    outcome: &'static str,
}

impl Reply {
    fn ok(html: impl Into<String>) -> Self {
        Self {
            html: html.into(),
            outcome: "ok",
            ..Self::default()
        }
    }

    fn error(html: impl Into<String>) -> Self {
        Self {
            html: html.into(),
            outcome: "error",
            ..Self::default()
        }
    }
}

/// The gateway's state and its clients.
pub struct Gateway {
    config: GatewayConfig,
    context: ServiceContext,
    bot: TelegramBot,
    signer: ExchangeSignerClient<Traced>,
    advisor: LlmAdvisorClient<Traced>,
    audit: AuditSinkClient<Traced>,
    limits: Mutex<Limits>,
    access: Mutex<Option<(u64, Arc<AccessList>)>>,
    username: Mutex<String>,
    random: SystemRandom,
    metrics: Metrics,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("bot", &self.bot)
            .finish_non_exhaustive()
    }
}

/// A gRPC status as a short reply, escaped (a service's message is not markup).
fn refusal(what: &str, status: &tonic::Status) -> String {
    let reason = match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            format!("unavailable: {}", status.message())
        }
        tonic::Code::PermissionDenied => "the gateway is not allowed to do that".to_owned(),
        _ => status.message().to_owned(),
    };
    format!(
        "{} refused: {}",
        escape(what),
        escape_bounded(&reason, reply::MAX_FREE_TEXT)
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn age_of(time: Option<&prost_types::Timestamp>) -> Option<Duration> {
    let time = time?;
    let at = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(time.seconds).ok()?,
            u32::try_from(time.nanos).unwrap_or(0),
        );
    // A record from the future (clock skew) counts as now.
    Some(
        SystemTime::now()
            .duration_since(at)
            .unwrap_or(Duration::ZERO),
    )
}

fn detail<'a>(
    record: &'a engram_proto::v1::AuditRecord,
    name: &str,
) -> Option<&'a prost_types::value::Kind> {
    record.details.as_ref()?.fields.get(name)?.kind.as_ref()
}

impl Gateway {
    /// The gateway over `bot`, with lazily connected clients to the other services.
    ///
    /// # Errors
    ///
    /// When an address is unusable or the metrics cannot be registered.
    pub fn new(
        context: &ServiceContext,
        config: GatewayConfig,
        bot: TelegramBot,
    ) -> anyhow::Result<Arc<Self>> {
        let interceptor: Interceptor = inject_trace_context;
        let transport = &context.transport;
        let signer = ExchangeSignerClient::with_interceptor(
            transport.channel_to(&config.signer_addr, "exchange-signer", config.call_timeout)?,
            interceptor,
        );
        let advisor = LlmAdvisorClient::with_interceptor(
            transport.channel_to(&config.advisor_addr, "llm-advisor", config.advice_timeout)?,
            interceptor,
        );
        let audit = AuditSinkClient::with_interceptor(
            transport.channel_to(&config.audit_addr, "audit-sink", config.call_timeout)?,
            interceptor,
        );
        let limits = Limits {
            per_user: SlidingWindow::new(config.user_commands, config.rate_window),
            global: SlidingWindow::new(config.global_commands, config.rate_window),
            denied_notice: OncePerWindow::new(config.denied_notice_window),
            denied_records: SlidingWindow::new(
                MAX_DENIED_RECORDS_PER_CHAT,
                config.denied_notice_window,
            ),
            alert_dedup: OncePerWindow::new(config.alert_dedup_window),
            alert_rate: SlidingWindow::new(config.alerts_per_minute, Duration::from_secs(60)),
            confirmations: Confirmations::new(config.confirm_ttl),
        };
        Ok(Arc::new(Self {
            metrics: Metrics::register(context.metrics.registry())?,
            config,
            context: context.clone(),
            bot,
            signer,
            advisor,
            audit,
            limits: Mutex::new(limits),
            access: Mutex::new(None),
            username: Mutex::new(String::new()),
            random: SystemRandom::new(),
        }))
    }

    /// The bot this gateway speaks through.
    pub fn bot(&self) -> &TelegramBot {
        &self.bot
    }

    /// Records the bot's username (from `getMe`), so `/cmd@ThisBot` is recognised.
    pub fn set_username(&self, username: String) {
        *lock(&self.username) = username;
    }

    /// The access rules of the current secret version (parsed once per version).
    fn access(&self) -> Option<Arc<AccessList>> {
        let bundle = self.context.secrets.current()?;
        let mut cached = lock(&self.access);
        if let Some((version, access)) = cached.as_ref()
            && *version == bundle.version()
        {
            return Some(access.clone());
        }
        match AccessList::from_bundle(&bundle) {
            Ok(access) => {
                let access = Arc::new(access);
                *cached = Some((bundle.version(), access.clone()));
                Some(access)
            }
            Err(error) => {
                tracing::error!(target: "security", version = bundle.version(), %error, "engram/telegram has an unusable access list; refusing everyone");
                None
            }
        }
    }

    /// Whether the current secret's access list parses (a readiness check).
    pub fn access_problem(&self) -> Option<String> {
        let bundle = self.context.secrets.current()?;
        AccessList::from_bundle(&bundle).err()
    }

    async fn record(
        &self,
        category: AuditCategory,
        action: &str,
        actor: Actor,
        correlation_id: &str,
        details: &[(&str, prost_types::Value)],
    ) -> bool {
        let Some(recorder) = self.context.audit() else {
            return false;
        };
        let event = AuditEvent {
            category: category as i32,
            action: action.to_owned(),
            actor: Some(actor),
            details: Some(prost_types::Struct {
                fields: details
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            }),
            correlation_id: correlation_id.to_owned(),
            trace_id: String::new(),
            occurred_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        };
        match recorder.record(event).await {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, action, "audit append failed");
                false
            }
        }
    }

    fn actor(user_id: i64, chat_id: i64) -> Actor {
        Actor {
            service: SERVICE.to_owned(),
            telegram_user_id: user_id,
            telegram_chat_id: chat_id,
        }
    }

    fn request_context(&self, caller: &Caller, idempotency_key: String) -> RequestContext {
        RequestContext {
            idempotency_key,
            correlation_id: caller.correlation_id.clone(),
            actor: Some(Self::actor(caller.user_id, caller.chat_id)),
        }
    }

    /// Handles one update from polling or the webhook.
    pub async fn handle_update(self: &Arc<Self>, update: Update) {
        let started = Instant::now();
        let update_id = update.id.0;
        let span = tracing::info_span!("telegram.update", update_id, otel.kind = "server");
        let command = async {
            match update.kind {
                UpdateKind::Message(message) => {
                    self.metrics.updates.with_label_values(&["message"]).inc();
                    self.on_message(update_id, &message).await
                }
                UpdateKind::CallbackQuery(query) => {
                    self.metrics.updates.with_label_values(&["callback"]).inc();
                    self.on_callback(update_id, &query).await;
                    "confirmation"
                }
                _ => {
                    self.metrics.updates.with_label_values(&["other"]).inc();
                    "other"
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics
            .latency
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
    }

    async fn send(&self, chat_id: i64, html: &str, buttons: &[(String, String)]) -> Option<i32> {
        match self.bot.send(chat_id, html, buttons).await {
            Ok(id) => Some(id),
            Err(error) => {
                self.metrics
                    .telegram_errors
                    .with_label_values(&[error.method, error.kind])
                    .inc();
                tracing::warn!(%error, "reply not sent");
                None
            }
        }
    }

    async fn edit(&self, chat_id: i64, message_id: i32, html: &str) {
        if let Err(error) = self.bot.edit(chat_id, message_id, html, &[]).await {
            self.metrics
                .telegram_errors
                .with_label_values(&[error.method, error.kind])
                .inc();
            tracing::warn!(%error, "message not edited");
        }
    }

    async fn answer(&self, callback_id: &str, text: &str) {
        if let Err(error) = self.bot.answer(callback_id, text).await {
            self.metrics
                .telegram_errors
                .with_label_values(&[error.method, error.kind])
                .inc();
            tracing::warn!(%error, "button press not answered");
        }
    }

    /// The allowlist check shared by messages and button presses. On refusal: counted,
    /// audited (bounded per chat), an alert to the admin chat (deduplicated per chat) and,
    /// when `notice` and not yet sent within the window, one "Unauthorized access" reply.
    async fn authorize(
        &self,
        chat_id: i64,
        user_id: i64,
        correlation_id: &str,
        notice: bool,
    ) -> Option<(Role, Arc<AccessList>)> {
        let access = self.access()?;
        let denied = match access.authorize(chat_id, user_id) {
            Ok(role) => return Some((role, access)),
            Err(denied) => denied,
        };
        self.metrics
            .unauthorized
            .with_label_values(&[denied.as_str()])
            .inc();
        let now = Instant::now();
        let (send_notice, record) = {
            let mut limits = lock(&self.limits);
            let send_notice = notice && limits.denied_notice.first(&chat_id, now);
            let record = limits.denied_records.check(&chat_id, now) == RateDecision::Allowed;
            (send_notice, record)
        };
        tracing::warn!(target: "security", chat_id, user_id, reason = denied.as_str(), "unauthorized Telegram update refused");
        if record {
            self.record(
                AuditCategory::Security,
                "AUTH_DENIED",
                Self::actor(user_id, chat_id),
                correlation_id,
                &[
                    ("reason", text(denied.as_str())),
                    (
                        "notice_sent",
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::BoolValue(send_notice)),
                        },
                    ),
                ],
            )
            .await;
        }
        let what = match denied {
            Denied::Chat => "a chat that is not allow-listed",
            Denied::User => "a user who is not allow-listed, in an allowed chat",
        };
        let _ = self
            .alert(
                SERVICE,
                &format!("auth_denied:{chat_id}"),
                Severity::Warning,
                &format!(
                    "Unauthorized access attempt from {what}: chat {chat_id}, user {user_id}."
                ),
            )
            .await;
        if send_notice {
            self.send(chat_id, "Unauthorized access", &[]).await;
        }
        None
    }

    async fn on_message(self: &Arc<Self>, update_id: u32, message: &Message) -> &'static str {
        let Some(from) = message.from.as_ref() else {
            return "other";
        };
        let chat_id = message.chat.id.0;
        let user_id = i64::try_from(from.id.0).unwrap_or(i64::MAX);
        let correlation_id = format!("tg-{update_id}");
        // Strangers are refused whatever they send (a sticker too), before anything is read.
        let Some((role, _)) = self
            .authorize(chat_id, user_id, &correlation_id, true)
            .await
        else {
            return "unauthorized";
        };
        let Some(message_text) = message.text() else {
            return "other";
        };
        let caller = Caller {
            user_id,
            chat_id,
            role,
            correlation_id,
        };
        // Rate limits count every allowed message, valid or not, before any parsing work.
        let now = Instant::now();
        let decision = {
            let mut limits = lock(&self.limits);
            match limits.per_user.check(&user_id, now) {
                RateDecision::Allowed => match limits.global.check(&(), now) {
                    RateDecision::Allowed => None,
                    limited => Some(("global", limited)),
                },
                limited => Some(("user", limited)),
            }
        };
        if let Some((
            scope,
            RateDecision::Limited {
                notify,
                retry_after,
            },
        )) = decision
        {
            self.metrics.rate_limited.with_label_values(&[scope]).inc();
            if notify {
                self.record(
                    AuditCategory::Security,
                    "RATE_LIMITED",
                    Self::actor(user_id, chat_id),
                    &caller.correlation_id,
                    &[("scope", text(scope))],
                )
                .await;
                let wait = retry_after.as_secs().max(1);
                let html = if scope == "user" {
                    format!(
                        "Too many commands: you may send {} per {} s. Wait {wait} s; until then I stay silent.",
                        self.config.user_commands,
                        self.config.rate_window.as_secs()
                    )
                } else {
                    format!("The bot is busy (too many commands from everyone). Wait {wait} s.")
                };
                self.send(chat_id, &html, &[]).await;
            }
            return "rate_limited";
        }
        // A command queued at Telegram while the gateway was away is not run late: the market
        // moved, and a late trade or halt is not what was asked for.
        let age = (reply::unix_now() - message.date.timestamp()).max(0);
        if age > MAX_COMMAND_AGE_SECS {
            self.record(
                AuditCategory::Audit,
                "COMMAND_STALE",
                Self::actor(user_id, chat_id),
                &caller.correlation_id,
                &[("age_secs", number(age as f64))],
            )
            .await;
            let html = format!(
                "Not run: this was sent {} min ago, while the bot was unavailable. Send it again if you still want it.",
                age / 60
            );
            self.send(chat_id, &html, &[]).await;
            return "stale";
        }
        let username = lock(&self.username).clone();
        let command = match grammar::parse(message_text, &username) {
            Ok(Parsed::OtherBot) => return "other_bot",
            Ok(Parsed::Command(command)) => command,
            Err(error) => {
                let name = error.command.unwrap_or("unknown");
                self.metrics
                    .commands
                    .with_label_values(&[name, "bad_syntax"])
                    .inc();
                self.record(
                    AuditCategory::Audit,
                    "COMMAND_REJECTED",
                    Self::actor(user_id, chat_id),
                    &caller.correlation_id,
                    &[
                        ("command", text(name)),
                        ("reason", text(error.reason.clone())),
                    ],
                )
                .await;
                self.send(chat_id, &escape(&error.to_string()), &[]).await;
                return "bad_syntax";
            }
        };
        let name = command.name();
        if role < command.required_role() {
            self.metrics
                .commands
                .with_label_values(&[name, "denied_role"])
                .inc();
            self.record(
                AuditCategory::Security,
                "COMMAND_DENIED",
                Self::actor(user_id, chat_id),
                &caller.correlation_id,
                &[
                    ("command", text(name)),
                    ("role", text(role.as_str())),
                    ("required", text(command.required_role().as_str())),
                ],
            )
            .await;
            let html = format!(
                "Not allowed: /{name} needs the {} role; yours is {}.",
                command.required_role().as_str(),
                role.as_str()
            );
            self.send(chat_id, &html, &[]).await;
            return name;
        }
        let mut details = vec![("command", text(name)), ("role", text(role.as_str()))];
        details.extend(command_details(&command));
        let recorded = self
            .record(
                AuditCategory::Audit,
                "COMMAND_RECEIVED",
                Self::actor(user_id, chat_id),
                &caller.correlation_id,
                &details,
            )
            .await;
        // Anything that changes state needs its record first; reads and the kill switch go on.
        let needs_record = matches!(
            command,
            Command::Order(_) | Command::Cancel { .. } | Command::Resume
        );
        if !recorded && needs_record {
            self.metrics
                .commands
                .with_label_values(&[name, "audit_unavailable"])
                .inc();
            self.send(
                chat_id,
                &format!(
                    "The audit trail is unavailable, so /{name} was not run. Try again shortly."
                ),
                &[],
            )
            .await;
            return name;
        }
        let reply = self.run(&caller, command).await;
        self.metrics
            .commands
            .with_label_values(&[name, reply.outcome])
            .inc();
        let sent = self.send(chat_id, &reply.html, &reply.buttons).await;
        if let Some(nonce) = reply.nonce {
            let mut limits = lock(&self.limits);
            match sent {
                Some(message_id) => limits.confirmations.set_message(&nonce, message_id),
                None => limits.confirmations.discard(&nonce),
            }
        }
        self.record(
            AuditCategory::Audit,
            "COMMAND_COMPLETED",
            Self::actor(user_id, chat_id),
            &caller.correlation_id,
            &[("command", text(name)), ("outcome", text(reply.outcome))],
        )
        .await;
        name
    }

    async fn run(&self, caller: &Caller, command: Command) -> Reply {
        match command {
            Command::Help => Reply::ok(reply::help(caller.role)),
            Command::Whoami => {
                Reply::ok(reply::whoami(caller.user_id, caller.chat_id, caller.role))
            }
            Command::Status => match self.signer.clone().get_status(GetStatusRequest {}).await {
                Ok(status) => Reply::ok(reply::signer_status(status.get_ref())),
                Err(status) => Reply::error(refusal("status", &status)),
            },
            Command::Balance => match self
                .signer
                .clone()
                .get_balances(GetBalancesRequest {
                    non_zero_only: true,
                })
                .await
            {
                Ok(balances) => Reply::ok(reply::balances(&balances.get_ref().balances)),
                Err(status) => Reply::error(refusal("balance", &status)),
            },
            Command::Price(symbol) => match self
                .signer
                .clone()
                .get_price(GetPriceRequest {
                    symbol: symbol.as_str().to_owned(),
                })
                .await
            {
                Ok(price) => {
                    let price = price.into_inner();
                    Reply::ok(format!(
                        "{} <b>{}</b> (as of {})",
                        escape(&price.symbol),
                        escape(&price.price),
                        reply::utc(price.as_of.as_ref())
                    ))
                }
                Err(status) => Reply::error(refusal("price", &status)),
            },
            Command::Orders(symbol) => {
                let request = ListOpenOrdersRequest {
                    symbol: symbol.map(|s| s.as_str().to_owned()).unwrap_or_default(),
                };
                match self.signer.clone().list_open_orders(request).await {
                    Ok(list) => Reply::ok(reply::orders(&list.get_ref().orders)),
                    Err(status) => Reply::error(refusal("orders", &status)),
                }
            }
            Command::Advice { symbol, question } => {
                self.advice(caller, symbol.as_str(), question).await
            }
            Command::Order(_) | Command::Cancel { .. } => {
                self.ask_confirmation(caller, command).await
            }
            Command::Halt(reason) => {
                let reason = if reason.is_empty() {
                    format!("halted from Telegram by user {}", caller.user_id)
                } else {
                    reason
                };
                let request = HaltRequest {
                    context: Some(self.request_context(caller, caller.correlation_id.clone())),
                    reason,
                };
                match self.signer.clone().halt(request).await {
                    Ok(status) => Reply::ok(format!(
                        "Trading <b>halted</b>: {}",
                        escape_bounded(&status.get_ref().halt_reason, reply::MAX_FREE_TEXT)
                    )),
                    Err(status) => Reply::error(refusal("halt", &status)),
                }
            }
            Command::Resume => {
                let request = ResumeRequest {
                    context: Some(self.request_context(caller, caller.correlation_id.clone())),
                };
                match self.signer.clone().resume(request).await {
                    Ok(_) => Reply::ok("Trading <b>resumed</b>."),
                    Err(status) => Reply::error(refusal("resume", &status)),
                }
            }
            Command::Audit(count) => self.audit_tail(count).await,
            Command::Keys => self.keys().await,
        }
    }

    async fn advice(&self, caller: &Caller, symbol: &str, question: String) -> Reply {
        // The market context is best effort: advice without a price is still advice.
        let last_price = self
            .signer
            .clone()
            .get_price(GetPriceRequest {
                symbol: symbol.to_owned(),
            })
            .await
            .map(|p| p.into_inner().price)
            .unwrap_or_default();
        let recent_orders = self
            .signer
            .clone()
            .list_open_orders(ListOpenOrdersRequest {
                symbol: symbol.to_owned(),
            })
            .await
            .map(|l| {
                l.into_inner()
                    .orders
                    .iter()
                    .take(10)
                    .map(|o| {
                        format!(
                            "{} {} @ {} {}",
                            if o.side == OrderSide::Buy as i32 {
                                "BUY"
                            } else {
                                "SELL"
                            },
                            o.quantity,
                            o.limit_price,
                            o.status
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let request = AdviseRequest {
            context: Some(self.request_context(caller, String::new())),
            symbol: symbol.to_owned(),
            question,
            market: Some(AdviceContext {
                last_price,
                position: String::new(),
                recent_orders,
            }),
        };
        match self.advisor.clone().advise(request).await {
            Ok(answer) => Reply::ok(reply::advice(symbol, answer.get_ref())),
            Err(status) => Reply::error(refusal("advice", &status)),
        }
    }

    async fn ask_confirmation(&self, caller: &Caller, command: Command) -> Reply {
        let Ok(nonce) = new_nonce(&self.random) else {
            return Reply::error(
                "Could not create a confirmation (no randomness); nothing was placed.",
            );
        };
        let estimate = match &command {
            Command::Order(order) => {
                let price = match &order.limit_price {
                    Some(price) => Some(price.value()),
                    None => self
                        .signer
                        .clone()
                        .get_price(GetPriceRequest {
                            symbol: order.symbol.as_str().to_owned(),
                        })
                        .await
                        .ok()
                        .and_then(|p| p.into_inner().price.parse::<Decimal>().ok()),
                };
                price
                    .and_then(|p| p.checked_mul(order.quantity.value()))
                    .map(|n| n.normalize().to_string())
            }
            _ => None,
        };
        let opened = lock(&self.limits).confirmations.open(
            nonce.clone(),
            command.clone(),
            caller.user_id,
            caller.chat_id,
            caller.correlation_id.clone(),
            Instant::now(),
        );
        if opened.is_err() {
            return Reply::error(format!(
                "You already have {} trades waiting for confirmation; confirm or cancel those first.",
                crate::confirm::MAX_OPEN_PER_USER
            ));
        }
        self.metrics
            .confirmations
            .with_label_values(&["requested"])
            .inc();
        self.record(
            AuditCategory::Audit,
            "CONFIRMATION_REQUESTED",
            Self::actor(caller.user_id, caller.chat_id),
            &caller.correlation_id,
            &[
                ("command", text(command.name())),
                ("nonce", text(nonce.clone())),
            ],
        )
        .await;
        Reply {
            html: reply::confirmation_question(&command, estimate, self.config.confirm_ttl),
            buttons: vec![
                ("Confirm".to_owned(), format!("{CONFIRM_PREFIX}{nonce}")),
                ("Cancel".to_owned(), format!("{CANCEL_PREFIX}{nonce}")),
            ],
            nonce: Some(nonce),
            outcome: "ok",
        }
    }

    async fn on_callback(self: &Arc<Self>, update_id: u32, query: &CallbackQuery) {
        let user_id = i64::try_from(query.from.id.0).unwrap_or(i64::MAX);
        let Some(message) = query.message.as_ref() else {
            self.answer(&query.id.0, "This button no longer works.")
                .await;
            return;
        };
        let chat_id = message.chat().id.0;
        let correlation_id = format!("tg-{update_id}");
        let Some((role, _)) = self
            .authorize(chat_id, user_id, &correlation_id, false)
            .await
        else {
            self.answer(&query.id.0, "Unauthorized access").await;
            return;
        };
        let data = query.data.as_deref().unwrap_or_default();
        let (confirm, nonce) = if let Some(nonce) = data.strip_prefix(CONFIRM_PREFIX) {
            (true, nonce)
        } else if let Some(nonce) = data.strip_prefix(CANCEL_PREFIX) {
            (false, nonce)
        } else {
            self.answer(&query.id.0, "Unknown button.").await;
            return;
        };
        let press = lock(&self.limits)
            .confirmations
            .press(nonce, user_id, confirm, Instant::now());
        let actor = Self::actor(user_id, chat_id);
        match press {
            Press::WrongUser => {
                self.metrics
                    .confirmations
                    .with_label_values(&["wrong_user"])
                    .inc();
                self.record(
                    AuditCategory::Security,
                    "CONFIRMATION_REFUSED",
                    actor,
                    &correlation_id,
                    &[
                        ("nonce", text(nonce)),
                        ("reason", text("not the requester")),
                    ],
                )
                .await;
                self.answer(&query.id.0, "Only the person who asked can confirm this.")
                    .await;
            }
            Press::Unknown => {
                self.metrics
                    .confirmations
                    .with_label_values(&["unknown"])
                    .inc();
                self.answer(
                    &query.id.0,
                    "Already handled or expired: nothing more was done.",
                )
                .await;
            }
            Press::Expired(pending) => {
                self.metrics
                    .confirmations
                    .with_label_values(&["expired"])
                    .inc();
                self.record(
                    AuditCategory::Audit,
                    "CONFIRMATION_EXPIRED",
                    actor,
                    &pending.correlation_id,
                    &[("nonce", text(nonce))],
                )
                .await;
                self.answer(&query.id.0, "Expired.").await;
                self.edit(chat_id, message.id().0, &self.expired_text())
                    .await;
            }
            Press::Cancelled(pending) => {
                self.metrics
                    .confirmations
                    .with_label_values(&["cancelled"])
                    .inc();
                self.record(
                    AuditCategory::Audit,
                    "CONFIRMATION_CANCELLED",
                    actor,
                    &pending.correlation_id,
                    &[("nonce", text(nonce))],
                )
                .await;
                self.answer(&query.id.0, "Cancelled.").await;
                self.edit(chat_id, message.id().0, "Cancelled: nothing was placed.")
                    .await;
            }
            Press::Confirmed(pending) => {
                self.metrics
                    .confirmations
                    .with_label_values(&["confirmed"])
                    .inc();
                let caller = Caller {
                    user_id,
                    chat_id,
                    role,
                    correlation_id: pending.correlation_id.clone(),
                };
                // The role is checked again: the allowlist may have rotated since the question.
                let html = if role < pending.command.required_role() {
                    "Not allowed any more: your role changed. Nothing was placed.".to_owned()
                } else {
                    self.record(
                        AuditCategory::Audit,
                        "CONFIRMATION_ACCEPTED",
                        actor,
                        &pending.correlation_id,
                        &[
                            ("nonce", text(nonce)),
                            ("command", text(pending.command.name())),
                        ],
                    )
                    .await;
                    self.answer(&query.id.0, "Sending to the signer…").await;
                    self.execute(&caller, nonce, &pending).await
                };
                self.edit(chat_id, message.id().0, &html).await;
            }
        }
    }

    /// Places or cancels a confirmed trade; the nonce is the signer's idempotency key.
    async fn execute(&self, caller: &Caller, nonce: &str, pending: &Pending) -> String {
        match &pending.command {
            Command::Order(order) => {
                let request = PlaceOrderRequest {
                    context: Some(self.request_context(caller, nonce.to_owned())),
                    symbol: order.symbol.as_str().to_owned(),
                    side: match order.side {
                        Side::Buy => OrderSide::Buy,
                        Side::Sell => OrderSide::Sell,
                    } as i32,
                    r#type: if order.limit_price.is_some() {
                        OrderType::Limit
                    } else {
                        OrderType::Market
                    } as i32,
                    quantity: order.quantity.as_str().to_owned(),
                    limit_price: order
                        .limit_price
                        .as_ref()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_default(),
                    time_in_force: if order.limit_price.is_some() {
                        TimeInForce::Gtc
                    } else {
                        TimeInForce::Unspecified
                    } as i32,
                };
                match self.signer.clone().place_order(request).await {
                    Ok(placed) => {
                        let placed = placed.into_inner();
                        let line = placed
                            .order
                            .as_ref()
                            .map(reply::order_line)
                            .unwrap_or_default();
                        let again = if placed.replayed {
                            " (already placed earlier: not placed again)"
                        } else {
                            ""
                        };
                        format!("Order placed{again}: {line}")
                    }
                    Err(status)
                        if status.code() == tonic::Code::Unavailable
                            && status.message().contains("unknown") =>
                    {
                        format!(
                            "Outcome unknown: {}. Check /orders before trying again.",
                            escape_bounded(status.message(), 300)
                        )
                    }
                    Err(status) => format!("{}. Nothing was placed.", refusal("order", &status)),
                }
            }
            Command::Cancel { symbol, order } => {
                let target = match order {
                    OrderRef::Exchange(id) => cancel_order_request::Target::ExchangeOrderId(*id),
                    OrderRef::Client(id) => cancel_order_request::Target::ClientOrderId(id.clone()),
                };
                let request = CancelOrderRequest {
                    context: Some(self.request_context(caller, nonce.to_owned())),
                    symbol: symbol.as_str().to_owned(),
                    target: Some(target),
                };
                match self.signer.clone().cancel_order(request).await {
                    Ok(cancelled) => format!(
                        "Cancelled: {}",
                        cancelled
                            .get_ref()
                            .order
                            .as_ref()
                            .map(reply::order_line)
                            .unwrap_or_else(|| reply::order_ref(order))
                    ),
                    Err(status) => refusal("cancel", &status),
                }
            }
            other => escape(other.name()),
        }
    }

    async fn audit_tail(&self, count: u32) -> Reply {
        let mut audit = self.audit.clone();
        let verified = match audit.verify(VerifyRequest {}).await {
            Ok(v) if v.get_ref().ok => Ok(v.get_ref().records_checked),
            Ok(v) => Err(format!(
                "record {}: {}",
                v.get_ref().first_bad_sequence,
                v.get_ref().reason
            )),
            Err(status) => Err(format!("verify failed: {}", status.message())),
        };
        let request = QueryRequest {
            limit: count,
            newest_first: true,
            ..QueryRequest::default()
        };
        let records = match audit.query(request).await {
            Ok(stream) => {
                stream
                    .into_inner()
                    .filter_map(|r| async { r.ok() })
                    .collect::<Vec<_>>()
                    .await
            }
            Err(status) => return Reply::error(refusal("audit", &status)),
        };
        Reply::ok(reply::audit_records(&records, verified))
    }

    async fn keys(&self) -> Reply {
        let mut lines = vec!["<b>Secrets</b> (the seed's rule: rotate every 90 days)".to_owned()];
        if let Some(bundle) = self.context.secrets.current() {
            let created = bundle
                .custom_metadata()
                .get("created")
                .map(|d| format!("{d}T00:00:00Z"))
                .or_else(|| bundle.created_time().map(str::to_owned))
                .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_secs()).ok());
            lines.push(reply::key_line(
                "Telegram bot token",
                bundle.version(),
                created,
            ));
        }
        match self.signer.clone().get_status(GetStatusRequest {}).await {
            Ok(status) => {
                let status = status.into_inner();
                lines.push(reply::key_line(
                    "exchange key",
                    status.key_version,
                    status.key_created_at.map(|t| t.seconds),
                ));
            }
            Err(status) => lines.push(refusal("exchange key", &status)),
        }
        match self.audit.clone().head(HeadRequest {}).await {
            Ok(head) => lines.push(format!(
                "audit HMAC key: version {}",
                head.get_ref()
                    .last_checkpoint
                    .as_ref()
                    .map_or(0, |c| c.key_version)
            )),
            Err(status) => lines.push(refusal("audit key", &status)),
        }
        Reply::ok(lines.join("\n"))
    }

    /// Sends an alert to the admin chat unless an identical one (same `source` and `kind`)
    /// went out within the de-duplication window or the alert rate is used up.
    ///
    /// # Errors
    ///
    /// Why it was not delivered: `deduplicated`, `rate_limited`, `no admin chat` or the
    /// Telegram failure.
    pub async fn alert(
        &self,
        source: &str,
        kind: &str,
        severity: Severity,
        message: &str,
    ) -> Result<(), String> {
        let severity_name = match severity {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            _ => "info",
        };
        let key = format!("{source}/{kind}");
        let now = Instant::now();
        let suppressed = {
            let mut limits = lock(&self.limits);
            if !limits.alert_dedup.first(&key, now) {
                Some("deduplicated")
            } else if limits.alert_rate.check(&(), now) != RateDecision::Allowed {
                Some("rate_limited")
            } else {
                None
            }
        };
        if let Some(reason) = suppressed {
            self.metrics
                .alerts
                .with_label_values(&[severity_name, reason])
                .inc();
            return Err(reason.to_owned());
        }
        let Some(access) = self.access() else {
            self.metrics
                .alerts
                .with_label_values(&[severity_name, "failed"])
                .inc();
            return Err("no admin chat".to_owned());
        };
        let html = format!(
            "<b>[{}] {}</b>: {}\n{}",
            severity_name.to_uppercase(),
            escape(source),
            escape(kind),
            escape_bounded(message, 1000)
        );
        match self.bot.send(access.admin_chat, &html, &[]).await {
            Ok(_) => {
                self.metrics
                    .alerts
                    .with_label_values(&[severity_name, "delivered"])
                    .inc();
                self.record(
                    AuditCategory::Security,
                    "ALERT_SENT",
                    Self::actor(0, access.admin_chat),
                    "",
                    &[
                        ("dedup_key", text(key)),
                        ("severity", text(severity_name)),
                        ("source", text(source)),
                    ],
                )
                .await;
                Ok(())
            }
            Err(error) => {
                lock(&self.limits).alert_dedup.forget(&key);
                self.metrics
                    .alerts
                    .with_label_values(&[severity_name, "failed"])
                    .inc();
                self.metrics
                    .telegram_errors
                    .with_label_values(&[error.method, error.kind])
                    .inc();
                Err(error.to_string())
            }
        }
    }

    /// What an expired confirmation's message becomes.
    fn expired_text(&self) -> String {
        format!(
            "Expired after {} s: nothing was placed. Send the command again.",
            self.config.confirm_ttl.as_secs()
        )
    }

    /// Tells the owners of expired confirmations, and forgets them.
    pub async fn sweep_expired(&self) {
        let expired = lock(&self.limits).confirmations.sweep(Instant::now());
        for (nonce, pending) in expired {
            self.metrics
                .confirmations
                .with_label_values(&["expired"])
                .inc();
            self.record(
                AuditCategory::Audit,
                "CONFIRMATION_EXPIRED",
                Self::actor(pending.user_id, pending.chat_id),
                &pending.correlation_id,
                &[("nonce", text(nonce))],
            )
            .await;
            if let Some(message_id) = pending.message_id {
                self.edit(pending.chat_id, message_id, &self.expired_text())
                    .await;
            }
        }
    }

    /// Rebuilds the limits from the audit trail, so a restart resets none of them: commands
    /// per user and in total, the "Unauthorized access" notices and the alerts sent.
    ///
    /// # Errors
    ///
    /// When the audit sink cannot be queried.
    pub async fn restore_from_audit(&self) -> Result<usize, String> {
        let longest = self
            .config
            .rate_window
            .max(self.config.denied_notice_window)
            .max(self.config.alert_dedup_window)
            .max(Duration::from_secs(60));
        let since = SystemTime::now()
            .checked_sub(longest)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let request = QueryRequest {
            since: Some(prost_types::Timestamp::from(since)),
            actor_service: SERVICE.to_owned(),
            newest_first: true,
            ..QueryRequest::default()
        };
        let mut stream = self
            .audit
            .clone()
            .query(request)
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let mut records = Vec::new();
        while let Some(record) = stream.next().await {
            records.push(record.map_err(|s| format!("{}: {}", s.code(), s.message()))?);
        }
        let now = Instant::now();
        let mut restored = 0;
        let mut limits = lock(&self.limits);
        for record in records {
            let Some(ago) = age_of(record.recorded_at.as_ref()) else {
                continue;
            };
            let at = instant_ago(now, ago);
            let actor = record.actor.clone().unwrap_or_default();
            match record.action.as_str() {
                "COMMAND_RECEIVED" | "COMMAND_REJECTED" | "COMMAND_DENIED" => {
                    limits.per_user.restore(actor.telegram_user_id, at, now);
                    limits.global.restore((), at, now);
                }
                "AUTH_DENIED" => {
                    limits
                        .denied_records
                        .restore(actor.telegram_chat_id, at, now);
                    if matches!(
                        detail(&record, "notice_sent"),
                        Some(prost_types::value::Kind::BoolValue(true))
                    ) {
                        limits.denied_notice.restore(actor.telegram_chat_id, at);
                    }
                }
                "ALERT_SENT" => {
                    if ago < Duration::from_secs(60) {
                        limits.alert_rate.restore((), at, now);
                    }
                    if let Some(prost_types::value::Kind::StringValue(key)) =
                        detail(&record, "dedup_key")
                    {
                        limits.alert_dedup.restore(key.clone(), at);
                    }
                }
                _ => continue,
            }
            restored += 1;
        }
        Ok(restored)
    }

    /// Audits a new bot token version (the version only, never the token).
    pub async fn record_rotation(&self, version: u64) {
        self.record(
            AuditCategory::Security,
            "BOT_TOKEN_ROTATED",
            Self::actor(0, 0),
            "",
            &[("version", number(version as f64))],
        )
        .await;
    }
}

/// The parsed arguments worth recording (never free text verbatim: a question is recorded
/// by its length, since people paste anything into chats).
fn command_details(command: &Command) -> Vec<(&'static str, prost_types::Value)> {
    match command {
        Command::Price(symbol) | Command::Orders(Some(symbol)) => {
            vec![("symbol", text(symbol.as_str()))]
        }
        Command::Order(order) => {
            let mut details = vec![
                ("symbol", text(order.symbol.as_str())),
                ("side", text(order.side.as_str())),
                ("quantity", text(order.quantity.as_str())),
            ];
            if let Some(price) = &order.limit_price {
                details.push(("limit_price", text(price.as_str())));
            }
            details
        }
        Command::Cancel { symbol, order } => vec![
            ("symbol", text(symbol.as_str())),
            ("order", text(order.to_string())),
        ],
        Command::Advice { symbol, question } => vec![
            ("symbol", text(symbol.as_str())),
            ("question_chars", number(question.chars().count() as f64)),
        ],
        Command::Halt(reason) => vec![("reason_chars", number(reason.chars().count() as f64))],
        Command::Audit(count) => vec![("count", number(f64::from(*count)))],
        _ => Vec::new(),
    }
}
