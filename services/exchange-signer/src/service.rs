//! The `engram.v1.ExchangeSigner` gRPC service: validation at the edge, idempotent order
//! placement under the policy, fail-closed audit, the kill switch, and status.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engram_proto::v1::exchange_signer_server::ExchangeSigner;
use engram_proto::v1::{
    AuditCategory, Balance, CancelOrderRequest, CancelOrderResponse, GetBalancesRequest,
    GetBalancesResponse, GetOrderRequest, GetPriceRequest, GetPriceResponse, GetStatusRequest,
    HaltRequest, KeyRestrictions, ListOpenOrdersRequest, ListOpenOrdersResponse, Order, OrderSide,
    OrderStatus, OrderType, PlaceOrderRequest, PlaceOrderResponse, Policy as PolicyProto,
    ResumeRequest, SignerStatus, TimeInForce,
};
use engram_runtime::ServiceContext;
use engram_runtime::audit::{event, text};
use prometheus::{IntCounterVec, IntGauge, Opts};
use rust_decimal::Decimal;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::client::{ExchangeClient, ExchangeError};
use crate::policy::{
    OrderIntent, OrderKind, Policy, Side, Usage, parse_client_order_id, parse_positive_decimal,
    parse_symbol,
};
use crate::signing::Query;

/// The key's restrictions as last read from the exchange.
#[derive(Debug, Clone, Default)]
pub struct KeyState {
    /// `None` until read.
    pub restrictions: Option<Value>,
    /// When they were read (Unix ms).
    pub checked_at_ms: u64,
}

/// The counters behind the caps, rebuilt from the exchange at start.
#[derive(Debug, Default)]
pub struct Counters {
    day: u64,
    today_notional: Decimal,
    open: std::collections::HashSet<String>,
    recent: VecDeque<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Counters {
    fn roll(&mut self, now: u64) {
        let day = now / 86_400_000;
        if day != self.day {
            self.day = day;
            self.today_notional = Decimal::ZERO;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= 60_000)
        {
            self.recent.pop_front();
        }
    }

    /// The current usage.
    pub fn usage(&mut self) -> Usage {
        self.roll(now_ms());
        Usage {
            today_notional: self.today_notional,
            open_orders: u32::try_from(self.open.len()).unwrap_or(u32::MAX),
            orders_last_minute: u32::try_from(self.recent.len()).unwrap_or(u32::MAX),
        }
    }

    /// Counts an order the exchange accepted (or that the rebuild found).
    pub fn record(&mut self, order: &Value, notional: Decimal, placed_at: u64) {
        self.roll(now_ms());
        if placed_at / 86_400_000 == self.day {
            self.today_notional += notional;
        }
        if now_ms().saturating_sub(placed_at) < 60_000 {
            self.recent.push_back(placed_at);
        }
        let id = order["clientOrderId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if matches!(order["status"].as_str(), Some("NEW" | "PARTIALLY_FILLED")) {
            self.open.insert(id);
        } else {
            self.open.remove(&id);
        }
    }
}

/// The signer's metrics.
#[derive(Clone, Debug)]
pub struct SignerMetrics {
    orders: IntCounterVec,
    rejections: IntCounterVec,
    halted: IntGauge,
    weight: IntGauge,
    clock_offset: IntGauge,
    daily_notional: prometheus::Gauge,
    daily_notional_cap: prometheus::Gauge,
}

impl SignerMetrics {
    /// Registers every metric.
    ///
    /// # Errors
    ///
    /// On a duplicate registration.
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            orders: IntCounterVec::new(
                Opts::new(
                    "engram_signer_orders_total",
                    "PlaceOrder outcomes: placed, replayed, rejected, failed, unknown.",
                ),
                &["outcome"],
            )?,
            rejections: IntCounterVec::new(
                Opts::new(
                    "engram_signer_policy_rejections_total",
                    "Orders refused by the policy, by rule.",
                ),
                &["rule"],
            )?,
            halted: IntGauge::new(
                "engram_signer_halted",
                "1 while trading is halted (kill switch or exchange ban).",
            )?,
            weight: IntGauge::new(
                "engram_exchange_weight_used",
                "Request weight used in the current minute, as the exchange reports it.",
            )?,
            clock_offset: IntGauge::new(
                "engram_exchange_clock_offset_ms",
                "Exchange time minus local time, in milliseconds.",
            )?,
            daily_notional: prometheus::Gauge::new(
                "engram_signer_daily_notional",
                "Notional of today's orders (UTC day, quote currency), as the daily cap counts it.",
            )?,
            daily_notional_cap: prometheus::Gauge::new(
                "engram_signer_daily_notional_cap",
                "The policy's max_daily_notional.",
            )?,
        };
        registry.register(Box::new(metrics.orders.clone()))?;
        registry.register(Box::new(metrics.rejections.clone()))?;
        registry.register(Box::new(metrics.halted.clone()))?;
        registry.register(Box::new(metrics.weight.clone()))?;
        registry.register(Box::new(metrics.clock_offset.clone()))?;
        registry.register(Box::new(metrics.daily_notional.clone()))?;
        registry.register(Box::new(metrics.daily_notional_cap.clone()))?;
        Ok(metrics)
    }
}

/// Shared state of the signer.
pub struct Signer {
    /// The exchange client.
    pub client: Arc<ExchangeClient>,
    /// The policy in force; replaced whole on reload (SIGHUP).
    pub policy: arc_swap::ArcSwap<Policy>,
    /// The runtime context (secrets, audit recorder).
    pub context: ServiceContext,
    /// Metrics.
    pub metrics: SignerMetrics,
    /// Why trading is halted, when it is.
    pub halted: StdMutex<Option<String>>,
    /// Where the halt survives a restart (`None`: in memory only, for tests that want it).
    halt_file: Option<std::path::PathBuf>,
    /// The caps' counters.
    pub counters: StdMutex<Counters>,
    /// The key's restrictions.
    pub key: StdMutex<KeyState>,
    /// First outcome per client order id.
    outcomes: StdMutex<HashMap<String, Order>>,
    /// One request at a time per client order id.
    key_locks: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Signer {
    /// A signer over `client` with `policy`. A halt recorded in `halt_file` by an earlier run
    /// is restored: a restart is never a way around the kill switch.
    ///
    /// # Errors
    ///
    /// When `halt_file` exists but cannot be read or parsed: the signer refuses to guess.
    pub fn new(
        client: Arc<ExchangeClient>,
        policy: Policy,
        context: ServiceContext,
        metrics: SignerMetrics,
        halt_file: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        let restored = match &halt_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                let state: Value = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{} is not valid JSON: {e}", path.display()))?;
                // A file that does not say "not halted" counts as halted: fail safe.
                state["halted"].as_bool().unwrap_or(true).then(|| {
                    state["reason"]
                        .as_str()
                        .unwrap_or("restored halt")
                        .to_owned()
                })
            }
            _ => None,
        };
        if let Some(reason) = &restored {
            tracing::error!(target: "security", reason, "TRADING HALTED (restored from before the restart)");
            metrics.halted.set(1);
        }
        Ok(Self {
            client,
            policy: arc_swap::ArcSwap::from_pointee(policy),
            context,
            metrics,
            halted: StdMutex::new(restored),
            halt_file,
            counters: StdMutex::new(Counters::default()),
            key: StdMutex::new(KeyState::default()),
            outcomes: StdMutex::new(HashMap::new()),
            key_locks: StdMutex::new(HashMap::new()),
        })
    }

    /// Writes the halt state durably (temporary file, fsync, rename, fsync of the directory).
    fn persist_halt(&self, reason: Option<&str>) -> std::io::Result<()> {
        let Some(path) = &self.halt_file else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
        std::fs::create_dir_all(dir)?;
        let temporary = path.with_extension("tmp");
        let body =
            serde_json::json!({ "halted": reason.is_some(), "reason": reason, "at_ms": now_ms() })
                .to_string();
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(body.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Replaces the policy, and records the change.
    pub async fn replace_policy(&self, policy: Policy) {
        let before = self.policy.load_full();
        if *before == policy {
            tracing::info!("policy reload: unchanged");
            return;
        }
        self.policy.store(Arc::new(policy.clone()));
        self.observe_caps();
        tracing::warn!(target: "security", ?policy, "trading policy reloaded");
        if let Err(status) = self
            .audit(
                AuditCategory::Audit,
                "CONFIG_CHANGED",
                "",
                &[
                    ("setting", text("trading_policy")),
                    ("policy", text(format!("{policy:?}"))),
                ],
            )
            .await
        {
            tracing::error!(target: "security", error = %status.message(), "CONFIG_CHANGED could not be recorded");
        }
    }

    /// Stops all new orders, with a reason.
    pub fn halt(&self, reason: &str) {
        *lock(&self.halted) = Some(reason.to_owned());
        self.metrics.halted.set(1);
        tracing::error!(target: "security", reason, "TRADING HALTED");
        if let Err(error) = self.persist_halt(Some(reason)) {
            // The halt holds in memory regardless; only its survival across a restart is at risk.
            tracing::error!(target: "security", error = %error, "cannot persist the halt");
        }
    }

    /// Exports today's notional next to its cap (after every order and every rebuild).
    pub fn observe_caps(&self) {
        use rust_decimal::prelude::ToPrimitive;
        let today = lock(&self.counters).usage().today_notional;
        self.metrics
            .daily_notional
            .set(today.to_f64().unwrap_or(f64::MAX));
        self.metrics.daily_notional_cap.set(
            self.policy
                .load()
                .max_daily_notional
                .to_f64()
                .unwrap_or(f64::MAX),
        );
    }

    fn observe_client(&self) {
        self.metrics
            .weight
            .set(i64::from(self.client.weight_used()));
        self.metrics.clock_offset.set(self.client.clock_offset_ms());
        self.observe_caps();
        if self.client.is_banned() && lock(&self.halted).is_none() {
            self.halt("the exchange banned this IP (HTTP 418)");
        }
    }

    /// Rebuilds the caps' counters from the exchange: open orders and every order since
    /// 00:00 UTC of the allowed symbols, so a restart is never a way around a cap.
    ///
    /// # Errors
    ///
    /// When the exchange cannot be asked.
    pub async fn rebuild_counters(&self) -> Result<(), ExchangeError> {
        let midnight = now_ms() / 86_400_000 * 86_400_000;
        let mut fresh = Counters::default();
        fresh.roll(now_ms());
        let policy = self.policy.load_full();
        for symbol in &policy.symbols {
            let orders = self
                .client
                .signed(
                    reqwest::Method::GET,
                    "/api/v3/allOrders",
                    Query::new()
                        .param("symbol", symbol)
                        .param("startTime", midnight.to_string()),
                )
                .await?;
            for order in orders.as_array().into_iter().flatten() {
                fresh.record(
                    order,
                    order_notional(order),
                    order["time"].as_u64().unwrap_or_default(),
                );
            }
        }
        let usage = fresh.usage();
        tracing::info!(today_notional = %usage.today_notional, open_orders = usage.open_orders, orders_last_minute = usage.orders_last_minute, "rebuilt the caps' counters from the exchange");
        *lock(&self.counters) = fresh;
        self.observe_caps();
        Ok(())
    }

    async fn audit(
        &self,
        category: AuditCategory,
        action: &str,
        correlation: &str,
        details: &[(&str, prost_types::Value)],
    ) -> Result<(), Status> {
        let Some(recorder) = self.context.audit() else {
            return Err(Status::unavailable(
                "no audit sink configured: refusing to act unrecorded",
            ));
        };
        let mut record = event("exchange-signer", category, action, details);
        record.correlation_id = correlation.to_owned();
        recorder.record(record).await.map_err(|error| {
            Status::unavailable(format!("audit sink unavailable, nothing was sent: {error}"))
        })
    }

    fn key_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.key_locks)
            .entry(id.to_owned())
            .or_default()
            .clone()
    }
}

/// Quote notional of an exchange order: filled quote plus what is still open at its price.
fn order_notional(order: &Value) -> Decimal {
    let dec = |field: &str| {
        order[field]
            .as_str()
            .and_then(|v| v.parse::<Decimal>().ok())
            .unwrap_or_default()
    };
    let filled = dec("cummulativeQuoteQty");
    let open = if matches!(order["status"].as_str(), Some("NEW" | "PARTIALLY_FILLED")) {
        (dec("origQty") - dec("executedQty")) * dec("price")
    } else {
        Decimal::ZERO
    };
    filled + open
}

fn timestamp(ms: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(
        UNIX_EPOCH + Duration::from_millis(ms),
    ))
}

/// A Binance order as the proto `Order`.
pub fn order_from_exchange(order: &Value) -> Order {
    let text = |field: &str| order[field].as_str().unwrap_or_default().to_owned();
    let status = match order["status"].as_str() {
        Some("NEW") => OrderStatus::New,
        Some("PARTIALLY_FILLED") => OrderStatus::PartiallyFilled,
        Some("FILLED") => OrderStatus::Filled,
        Some("CANCELED") => OrderStatus::Canceled,
        Some("REJECTED") => OrderStatus::Rejected,
        Some("EXPIRED" | "EXPIRED_IN_MATCH") => OrderStatus::Expired,
        _ => OrderStatus::Unknown,
    };
    let side = match order["side"].as_str() {
        Some("BUY") => OrderSide::Buy,
        Some("SELL") => OrderSide::Sell,
        _ => OrderSide::Unspecified,
    };
    let kind = match order["type"].as_str() {
        Some("MARKET") => OrderType::Market,
        Some("LIMIT") => OrderType::Limit,
        _ => OrderType::Unspecified,
    };
    let tif = match order["timeInForce"].as_str() {
        Some("GTC") => TimeInForce::Gtc,
        Some("IOC") => TimeInForce::Ioc,
        Some("FOK") => TimeInForce::Fok,
        _ => TimeInForce::Unspecified,
    };
    let created = order["time"]
        .as_u64()
        .or_else(|| order["transactTime"].as_u64())
        .unwrap_or_default();
    Order {
        symbol: text("symbol"),
        exchange_order_id: order["orderId"].as_i64().unwrap_or_default(),
        client_order_id: text("clientOrderId"),
        side: side as i32,
        r#type: kind as i32,
        status: status as i32,
        quantity: text("origQty"),
        executed_quantity: text("executedQty"),
        cumulative_quote_quantity: text("cummulativeQuoteQty"),
        limit_price: if kind == OrderType::Limit {
            text("price")
        } else {
            String::new()
        },
        time_in_force: tif as i32,
        created_at: timestamp(created),
        updated_at: timestamp(order["updateTime"].as_u64().unwrap_or(created)),
    }
}

/// Checks a PlaceOrder request at the edge.
///
/// # Errors
///
/// INVALID_ARGUMENT naming the field.
pub fn validate(request: &PlaceOrderRequest) -> Result<OrderIntent, Status> {
    let bad = |e: crate::policy::InvalidField| Status::invalid_argument(e.to_string());
    let client_order_id = parse_client_order_id(
        request
            .context
            .as_ref()
            .map(|c| c.idempotency_key.as_str())
            .unwrap_or_default(),
    )
    .map_err(bad)?;
    let symbol = parse_symbol(&request.symbol).map_err(bad)?;
    let side = match OrderSide::try_from(request.side) {
        Ok(OrderSide::Buy) => Side::Buy,
        Ok(OrderSide::Sell) => Side::Sell,
        _ => return Err(Status::invalid_argument("side: must be BUY or SELL")),
    };
    let quantity = parse_positive_decimal("quantity", &request.quantity).map_err(bad)?;
    let kind = match OrderType::try_from(request.r#type) {
        Ok(OrderType::Market) if request.limit_price.is_empty() => OrderKind::Market,
        Ok(OrderType::Market) => {
            return Err(Status::invalid_argument(
                "limit_price: must be empty for a MARKET order",
            ));
        }
        Ok(OrderType::Limit) => OrderKind::Limit(
            parse_positive_decimal("limit_price", &request.limit_price).map_err(bad)?,
        ),
        _ => return Err(Status::invalid_argument("type: must be MARKET or LIMIT")),
    };
    Ok(OrderIntent {
        symbol,
        side,
        kind,
        quantity,
        client_order_id,
    })
}

fn exchange_status(error: ExchangeError) -> Status {
    match error {
        ExchangeError::Rejected { code, msg } => {
            Status::failed_precondition(format!("exchange refused: {code} {msg}"))
        }
        ExchangeError::Unknown(reason) => Status::unavailable(format!(
            "order outcome unknown ({reason}); retry with the same idempotency key"
        )),
        ExchangeError::RateLimited(wait) => Status::unavailable(format!(
            "exchange rate limit: retry after {}s",
            wait.as_secs()
        )),
        ExchangeError::Banned => {
            Status::unavailable("the exchange banned this IP; trading is halted")
        }
        ExchangeError::Transport(reason) => {
            Status::unavailable(format!("exchange unreachable: {reason}"))
        }
    }
}

/// FAILED_PRECONDITION with a `google.rpc.ErrorInfo` whose reason is the broken rule, so a
/// caller (the gateway) can tell the person which rule without parsing the message.
fn policy_status(rule: &str, message: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let metadata: HashMap<String, String> =
        [("rule".to_owned(), rule.to_owned())].into_iter().collect();
    Status::with_error_details(
        tonic::Code::FailedPrecondition,
        message,
        ErrorDetails::with_error_info(
            rule.to_ascii_uppercase(),
            "engram.exchange-signer.policy",
            metadata,
        ),
    )
}

fn parse_symbol_field(symbol: &str) -> Result<String, Status> {
    parse_symbol(symbol).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct ExchangeSignerService {
    signer: Arc<Signer>,
}

impl ExchangeSignerService {
    /// A service over a signer.
    pub fn new(signer: Arc<Signer>) -> Self {
        Self { signer }
    }

    async fn last_price(&self, symbol: &str) -> Result<Decimal, Status> {
        let ticker = self
            .signer
            .client
            .public("/api/v3/ticker/price", Query::new().param("symbol", symbol))
            .await
            .map_err(exchange_status)?;
        ticker["price"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Status::unavailable("the exchange gave no price"))
    }

    fn status(&self) -> SignerStatus {
        let s = &self.signer;
        let bundle = s.context.secrets.current();
        let created = bundle
            .as_ref()
            .and_then(|b| b.custom_metadata().get("created").cloned());
        let created_at = created.as_deref().and_then(|c| {
            humantime::parse_rfc3339_weak(&format!("{c}T00:00:00Z"))
                .ok()
                .or_else(|| humantime::parse_rfc3339_weak(c).ok())
        });
        let age_days = created_at
            .and_then(|c| SystemTime::now().duration_since(c).ok())
            .map(|d| u32::try_from(d.as_secs() / 86_400).unwrap_or(u32::MAX));
        let key = lock(&s.key).clone();
        let restrictions = key.restrictions.as_ref().map(|r| KeyRestrictions {
            enable_reading: r["enableReading"].as_bool().unwrap_or(false),
            enable_spot_trading: r["enableSpotAndMarginTrading"].as_bool().unwrap_or(false),
            enable_withdrawals: r["enableWithdrawals"].as_bool().unwrap_or(true),
            enable_internal_transfer: r["enableInternalTransfer"].as_bool().unwrap_or(true),
            permits_universal_transfer: r["permitsUniversalTransfer"].as_bool().unwrap_or(true),
            ip_restricted: r["ipRestrict"].as_bool().unwrap_or(false),
            checked_at: timestamp(key.checked_at_ms),
        });
        let usage = lock(&s.counters).usage();
        let p = s.policy.load_full();
        let mut sides = Vec::new();
        if p.allow_buy {
            sides.push(OrderSide::Buy as i32);
        }
        if p.allow_sell {
            sides.push(OrderSide::Sell as i32);
        }
        let mut types = Vec::new();
        if p.allow_market {
            types.push(OrderType::Market as i32);
        }
        if p.allow_limit {
            types.push(OrderType::Limit as i32);
        }
        let halted = lock(&s.halted).clone();
        SignerStatus {
            key_version: bundle.as_ref().map(|b| b.version()).unwrap_or_default(),
            key_created_at: created_at.map(prost_types::Timestamp::from),
            key_age_days: age_days.unwrap_or_default(),
            key_restrictions: restrictions,
            halted: halted.is_some(),
            halt_reason: halted.unwrap_or_default(),
            policy: Some(PolicyProto {
                allowed_symbols: p.symbols.clone(),
                allowed_sides: sides,
                allowed_order_types: types,
                max_order_notional: p.max_order_notional.to_string(),
                max_daily_notional: p.max_daily_notional.to_string(),
                max_open_orders: p.max_open_orders,
                max_orders_per_minute: p.max_orders_per_minute,
                limit_price_band_bps: p.price_band_bps,
            }),
            clock_offset_ms: s.client.clock_offset_ms(),
            request_weight_used: s.client.weight_used(),
            request_weight_limit: 6000,
            today_notional: usage.today_notional.to_string(),
            open_orders: usage.open_orders,
        }
    }
}

#[tonic::async_trait]
impl ExchangeSigner for ExchangeSignerService {
    #[tracing::instrument(skip_all, fields(rpc = "PlaceOrder", symbol = %request.get_ref().symbol))]
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let request = request.into_inner();
        let intent = validate(&request)?;
        let s = &self.signer;
        let id = intent.client_order_id.clone();
        let correlation = request
            .context
            .as_ref()
            .map(|c| c.correlation_id.clone())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| id.clone());
        // One request per client order id at a time: a double press cannot race itself.
        let key_lock = s.key_lock(&id);
        let _serialized = key_lock.lock().await;
        let replay = |order: Order| {
            s.metrics.orders.with_label_values(&["replayed"]).inc();
            Ok(Response::new(PlaceOrderResponse {
                order: Some(order),
                replayed: true,
            }))
        };
        if let Some(order) = lock(&s.outcomes).get(&id).cloned() {
            return replay(order);
        }
        if let Some(reason) = lock(&s.halted).clone() {
            s.metrics
                .rejections
                .with_label_values(&["kill_switch"])
                .inc();
            return Err(policy_status(
                "kill_switch",
                &format!("policy rule kill_switch: trading is halted ({reason})"),
            ));
        }
        // The exchange remembers client order ids across our restarts: ask it first.
        match s.client.order_by_client_id(&intent.symbol, &id).await {
            Ok(existing) => {
                let order = order_from_exchange(&existing);
                lock(&s.outcomes).insert(id, order.clone());
                return replay(order);
            }
            Err(ExchangeError::Rejected { code: -2013, .. }) => {}
            Err(error) => {
                s.observe_client();
                return Err(exchange_status(error));
            }
        }
        let price = self.last_price(&intent.symbol).await?;
        let usage = lock(&s.counters).usage();
        let verdict = tracing::info_span!("policy.check", symbol = %intent.symbol)
            .in_scope(|| s.policy.load().check(&intent, price, usage));
        let notional = match verdict {
            Ok(notional) => notional,
            Err(violation) => {
                s.metrics
                    .rejections
                    .with_label_values(&[violation.rule])
                    .inc();
                s.metrics.orders.with_label_values(&["rejected"]).inc();
                // Recording the refusal is best effort: refusing does not need the sink.
                let _ = s
                    .audit(
                        AuditCategory::Audit,
                        "ORDER_REJECTED",
                        &correlation,
                        &[
                            ("client_order_id", text(&id)),
                            ("rule", text(violation.rule)),
                            ("symbol", text(&intent.symbol)),
                        ],
                    )
                    .await;
                return Err(policy_status(violation.rule, &violation.to_string()));
            }
        };
        let (kind, limit) = match intent.kind {
            OrderKind::Market => ("MARKET", None),
            OrderKind::Limit(price) => ("LIMIT", Some(price)),
        };
        let details = [
            ("client_order_id", text(&id)),
            ("symbol", text(&intent.symbol)),
            ("side", text(intent.side.as_str())),
            ("type", text(kind)),
            ("quantity", text(intent.quantity.to_string())),
            ("notional", text(notional.to_string())),
        ];
        // Fail closed: without a durable ORDER_REQUESTED, nothing leaves.
        s.audit(
            AuditCategory::Audit,
            "ORDER_REQUESTED",
            &correlation,
            &details,
        )
        .await?;

        let mut query = Query::new()
            .param("symbol", &intent.symbol)
            .param("side", intent.side.as_str())
            .param("type", kind)
            .param("quantity", intent.quantity.to_string());
        if let Some(price) = limit {
            query = query
                .param("timeInForce", "GTC")
                .param("price", price.to_string());
        }
        let result = s.client.place_order(&intent.symbol, query, &id).await;
        s.observe_client();
        match result {
            Ok(placed) => {
                lock(&s.counters).record(&placed, notional, now_ms());
                let order = order_from_exchange(&placed);
                lock(&s.outcomes).insert(id.clone(), order.clone());
                s.metrics.orders.with_label_values(&["placed"]).inc();
                // The result is recorded after the answer: the durable record that matters for
                // fail-closed (ORDER_REQUESTED) is already in, and the caller should not wait
                // for a second sync.
                let details = vec![
                    ("client_order_id", text(&id)),
                    (
                        "exchange_order_id",
                        text(order.exchange_order_id.to_string()),
                    ),
                    (
                        "status",
                        text(placed["status"].as_str().unwrap_or_default()),
                    ),
                ];
                let signer = self.signer.clone();
                let correlation = correlation.clone();
                tokio::spawn(async move {
                    if let Err(status) = signer
                        .audit(AuditCategory::Audit, "ORDER_PLACED", &correlation, &details)
                        .await
                    {
                        tracing::error!(target: "security", error = %status.message(), "ORDER_PLACED could not be recorded");
                    }
                });
                Ok(Response::new(PlaceOrderResponse {
                    order: Some(order),
                    replayed: false,
                }))
            }
            Err(error) => {
                let outcome = if matches!(error, ExchangeError::Unknown(_)) {
                    "unknown"
                } else {
                    "failed"
                };
                s.metrics.orders.with_label_values(&[outcome]).inc();
                let _ = s
                    .audit(
                        AuditCategory::Audit,
                        "ORDER_FAILED",
                        &correlation,
                        &[
                            ("client_order_id", text(&id)),
                            ("error", text(error.to_string())),
                        ],
                    )
                    .await;
                Err(exchange_status(error))
            }
        }
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        use engram_proto::v1::cancel_order_request::Target;
        let request = request.into_inner();
        let symbol = parse_symbol_field(&request.symbol)?;
        let mut query = Query::new().param("symbol", &symbol);
        query = match request.target {
            Some(Target::ExchangeOrderId(id)) if id > 0 => query.param("orderId", id.to_string()),
            Some(Target::ClientOrderId(id)) => query.param(
                "origClientOrderId",
                parse_client_order_id(&id).map_err(|e| Status::invalid_argument(e.to_string()))?,
            ),
            _ => {
                return Err(Status::invalid_argument(
                    "target: an exchange order id or a client order id is required",
                ));
            }
        };
        let correlation = request
            .context
            .as_ref()
            .map(|c| c.correlation_id.clone())
            .unwrap_or_default();
        self.signer
            .audit(
                AuditCategory::Audit,
                "ORDER_CANCEL_REQUESTED",
                &correlation,
                &[("symbol", text(&symbol)), ("query", text(query.as_str()))],
            )
            .await?;
        let canceled = self
            .signer
            .client
            .signed(reqwest::Method::DELETE, "/api/v3/order", query)
            .await
            .map_err(exchange_status)?;
        lock(&self.signer.counters).record(&canceled, Decimal::ZERO, 0);
        Ok(Response::new(CancelOrderResponse {
            order: Some(order_from_exchange(&canceled)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        use engram_proto::v1::get_order_request::Target;
        let request = request.into_inner();
        let symbol = parse_symbol_field(&request.symbol)?;
        let query = match request.target {
            Some(Target::ExchangeOrderId(id)) if id > 0 => Query::new()
                .param("symbol", &symbol)
                .param("orderId", id.to_string()),
            Some(Target::ClientOrderId(id)) => Query::new()
                .param("symbol", &symbol)
                .param("origClientOrderId", id),
            _ => {
                return Err(Status::invalid_argument(
                    "target: an exchange order id or a client order id is required",
                ));
            }
        };
        match self
            .signer
            .client
            .signed(reqwest::Method::GET, "/api/v3/order", query)
            .await
        {
            Ok(order) => Ok(Response::new(order_from_exchange(&order))),
            Err(ExchangeError::Rejected { code: -2013, .. }) => {
                Err(Status::not_found("no such order"))
            }
            Err(error) => Err(exchange_status(error)),
        }
    }

    async fn list_open_orders(
        &self,
        request: Request<ListOpenOrdersRequest>,
    ) -> Result<Response<ListOpenOrdersResponse>, Status> {
        let symbol = request.into_inner().symbol;
        let mut query = Query::new();
        if !symbol.is_empty() {
            query = query.param("symbol", parse_symbol_field(&symbol)?);
        }
        let orders = self
            .signer
            .client
            .signed(reqwest::Method::GET, "/api/v3/openOrders", query)
            .await
            .map_err(exchange_status)?;
        Ok(Response::new(ListOpenOrdersResponse {
            orders: orders
                .as_array()
                .into_iter()
                .flatten()
                .map(order_from_exchange)
                .collect(),
        }))
    }

    async fn get_balances(
        &self,
        request: Request<GetBalancesRequest>,
    ) -> Result<Response<GetBalancesResponse>, Status> {
        let non_zero = request.into_inner().non_zero_only;
        let account = self
            .signer
            .client
            .signed(reqwest::Method::GET, "/api/v3/account", Query::new())
            .await
            .map_err(exchange_status)?;
        let balances = account["balances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| Balance {
                asset: b["asset"].as_str().unwrap_or_default().to_owned(),
                free: b["free"].as_str().unwrap_or_default().to_owned(),
                locked: b["locked"].as_str().unwrap_or_default().to_owned(),
            })
            .filter(|b| {
                !non_zero
                    || b.free.parse::<Decimal>().unwrap_or_default()
                        + b.locked.parse::<Decimal>().unwrap_or_default()
                        > Decimal::ZERO
            })
            .collect();
        Ok(Response::new(GetBalancesResponse {
            balances,
            as_of: Some(prost_types::Timestamp::from(SystemTime::now())),
        }))
    }

    async fn get_price(
        &self,
        request: Request<GetPriceRequest>,
    ) -> Result<Response<GetPriceResponse>, Status> {
        let symbol = parse_symbol_field(&request.into_inner().symbol)?;
        let price = self.last_price(&symbol).await?;
        Ok(Response::new(GetPriceResponse {
            symbol,
            price: price.to_string(),
            as_of: Some(prost_types::Timestamp::from(SystemTime::now())),
        }))
    }

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<SignerStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn halt(&self, request: Request<HaltRequest>) -> Result<Response<SignerStatus>, Status> {
        let request = request.into_inner();
        let reason = request.reason.trim();
        if reason.is_empty() || reason.chars().count() > 200 {
            return Err(Status::invalid_argument(
                "reason: 1-200 characters are required",
            ));
        }
        self.signer.halt(reason);
        self.signer.context.alert(
            engram_proto::v1::Severity::Critical,
            "trading_halted",
            &format!("Trading halted: {reason}"),
        );
        let correlation = request
            .context
            .as_ref()
            .map(|c| c.correlation_id.clone())
            .unwrap_or_default();
        // Halting is the safe direction: it takes effect even when the sink cannot record it.
        if let Err(status) = self
            .signer
            .audit(
                AuditCategory::Security,
                "TRADING_HALTED",
                &correlation,
                &[("reason", text(reason))],
            )
            .await
        {
            tracing::error!(target: "security", error = %status.message(), "TRADING_HALTED could not be recorded");
        }
        Ok(Response::new(self.status()))
    }

    async fn resume(
        &self,
        request: Request<ResumeRequest>,
    ) -> Result<Response<SignerStatus>, Status> {
        if self.signer.client.is_banned() {
            return Err(Status::failed_precondition(
                "the exchange ban (HTTP 418) is still in force; restart the signer once it is lifted",
            ));
        }
        let correlation = request
            .into_inner()
            .context
            .map(|c| c.correlation_id)
            .unwrap_or_default();
        // Resuming is the risky direction: it happens only once it is recorded.
        self.signer
            .audit(
                AuditCategory::Security,
                "TRADING_RESUMED",
                &correlation,
                &[],
            )
            .await?;
        // Resuming must survive a restart too, and must not happen if it cannot.
        self.signer
            .persist_halt(None)
            .map_err(|e| Status::unavailable(format!("cannot persist the resume: {e}")))?;
        *lock(&self.signer.halted) = None;
        self.signer.metrics.halted.set(0);
        tracing::warn!(target: "security", "trading resumed");
        Ok(Response::new(self.status()))
    }
}
