//! A Binance-compatible spot exchange: the REST subset Engram's signer uses, with Binance's own
//! request signing rules, error codes and JSON shapes, and knobs for the failures a real
//! exchange has (latency, a 5xx after accepting an order, 429 with `Retry-After`, a 418 ban).
//!
//! It checks the API key (`X-MBX-APIKEY`), the signature (HMAC-SHA256 hex, or Ed25519 base64,
//! over the query string followed by the body, exactly as received) and the timestamp window
//! (`recvWindow`, default 5000, at most 60000). Market orders fill at the ticker price and move
//! balances; limit orders rest and lock funds. A client order id is refused while an order with
//! that id is still open (Binance's rule), and accepted again once it is closed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use hmac::{KeyInit, Mac};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

/// How an API key signs.
#[derive(Clone, Debug)]
pub enum KeyKind {
    /// HMAC-SHA256 with this secret.
    Hmac(String),
    /// Ed25519 with the private key whose public half this is (32 bytes).
    Ed25519(Vec<u8>),
}

/// The key's restrictions, as `/sapi/v1/account/apiRestrictions` reports them.
#[derive(Clone, Debug, Deserialize)]
pub struct Restrictions {
    /// Whether the key is bound to an IP allowlist.
    #[serde(rename = "ipRestrict")]
    pub ip_restrict: bool,
    /// Whether the key may withdraw.
    #[serde(rename = "enableWithdrawals")]
    pub enable_withdrawals: bool,
    /// Whether the key may transfer internally.
    #[serde(rename = "enableInternalTransfer")]
    pub enable_internal_transfer: bool,
    /// Whether the key may make universal transfers.
    #[serde(rename = "permitsUniversalTransfer")]
    pub permits_universal_transfer: bool,
    /// Whether the key may trade spot.
    #[serde(rename = "enableSpotAndMarginTrading")]
    pub enable_spot_trading: bool,
}

impl Default for Restrictions {
    /// What Engram wants: read and spot trading only, IP-restricted.
    fn default() -> Self {
        Self {
            ip_restrict: true,
            enable_withdrawals: false,
            enable_internal_transfer: false,
            permits_universal_transfer: false,
            enable_spot_trading: true,
        }
    }
}

/// One tradable symbol and its filters.
#[derive(Clone, Debug)]
pub struct SymbolRules {
    /// For example `BTCUSDT`.
    pub symbol: String,
    /// For example `BTC`.
    pub base: String,
    /// For example `USDT`.
    pub quote: String,
    /// LOT_SIZE.
    pub min_qty: Decimal,
    /// LOT_SIZE.
    pub max_qty: Decimal,
    /// LOT_SIZE.
    pub step_size: Decimal,
    /// PRICE_FILTER.
    pub tick_size: Decimal,
    /// NOTIONAL.
    pub min_notional: Decimal,
}

/// Failure knobs, set through the control API.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Knobs {
    /// Added latency per request, in milliseconds.
    pub latency_ms: u64,
    /// The next N order placements are carried out but answered with HTTP 500.
    pub fail_after_accept: u32,
    /// The next N signed requests get 429 with this `Retry-After` (seconds).
    pub rate_limit_next: u32,
    /// `Retry-After` for those 429s.
    pub retry_after_secs: u64,
    /// Every request gets 418 (an IP ban) while set.
    pub banned: bool,
    /// Server time minus real time, in milliseconds (simulates clock skew).
    pub clock_skew_ms: i64,
}

#[derive(Clone, Debug)]
struct Order {
    symbol: String,
    order_id: i64,
    client_order_id: String,
    side: String,
    kind: String,
    time_in_force: Option<String>,
    price: Decimal,
    orig_qty: Decimal,
    executed_qty: Decimal,
    cumulative_quote: Decimal,
    status: String,
    time: u64,
}

impl Order {
    fn is_open(&self) -> bool {
        matches!(self.status.as_str(), "NEW" | "PARTIALLY_FILLED")
    }

    fn json(&self) -> Value {
        json!({
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
            "price": self.price.to_string(),
            "origQty": self.orig_qty.to_string(),
            "executedQty": self.executed_qty.to_string(),
            "cummulativeQuoteQty": self.cumulative_quote.to_string(),
            "status": self.status,
            "timeInForce": self.time_in_force.clone().unwrap_or_else(|| "GTC".to_owned()),
            "type": self.kind,
            "side": self.side,
            "time": self.time,
            "updateTime": self.time,
            "transactTime": self.time,
            "workingTime": self.time,
        })
    }
}

#[derive(Debug)]
struct Exchange {
    keys: HashMap<String, (KeyKind, Restrictions)>,
    symbols: BTreeMap<String, SymbolRules>,
    prices: BTreeMap<String, Decimal>,
    /// asset → (free, locked)
    balances: BTreeMap<String, (Decimal, Decimal)>,
    orders: Vec<Order>,
    next_order_id: i64,
    knobs: Knobs,
    weight_minute: u64,
    weight_used: u32,
    /// Signed requests that authenticated, per API key.
    requests_by_key: HashMap<String, usize>,
}

/// A handle to a running exchange double.
#[derive(Clone, Debug)]
pub struct ExchangeDouble {
    state: Arc<Mutex<Exchange>>,
    addr: SocketAddr,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn dec(text: &str) -> Decimal {
    text.parse().unwrap_or_default()
}

/// A Binance error response.
fn error(status: StatusCode, code: i32, msg: &str) -> Response {
    (status, axum::Json(json!({ "code": code, "msg": msg }))).into_response()
}

impl ExchangeDouble {
    /// Starts the double on `addr` (port 0 for a free one) with one BTCUSDT and one ETHUSDT
    /// market and the given balances.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut symbols = BTreeMap::new();
        for (symbol, base) in [("BTCUSDT", "BTC"), ("ETHUSDT", "ETH")] {
            symbols.insert(
                symbol.to_owned(),
                SymbolRules {
                    symbol: symbol.to_owned(),
                    base: base.to_owned(),
                    quote: "USDT".to_owned(),
                    min_qty: dec("0.00001"),
                    max_qty: dec("9000"),
                    step_size: dec("0.00001"),
                    tick_size: dec("0.01"),
                    min_notional: dec("5"),
                },
            );
        }
        let prices = [("BTCUSDT", "43250.10"), ("ETHUSDT", "2310.55")]
            .into_iter()
            .map(|(s, p)| (s.to_owned(), dec(p)))
            .collect();
        let balances = [("USDT", "100000"), ("BTC", "1"), ("ETH", "10")]
            .into_iter()
            .map(|(a, f)| (a.to_owned(), (dec(f), Decimal::ZERO)))
            .collect();
        let state = Arc::new(Mutex::new(Exchange {
            keys: HashMap::new(),
            symbols,
            prices,
            balances,
            orders: Vec::new(),
            next_order_id: 1000,
            knobs: Knobs::default(),
            weight_minute: 0,
            weight_used: 0,
            requests_by_key: HashMap::new(),
        }));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let router = router(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { state, addr })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Exchange) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Accepts `api_key` signed by `kind`, with `restrictions`. Several keys may be valid at
    /// once, as during a rotation.
    pub fn add_key(&self, api_key: &str, kind: KeyKind, restrictions: Restrictions) {
        self.with(|x| x.keys.insert(api_key.to_owned(), (kind, restrictions)));
    }

    /// Stops accepting `api_key`.
    pub fn remove_key(&self, api_key: &str) {
        self.with(|x| x.keys.remove(api_key));
    }

    /// Sets the ticker price of `symbol`.
    pub fn set_price(&self, symbol: &str, price: &str) {
        self.with(|x| x.prices.insert(symbol.to_owned(), dec(price)));
    }

    /// Replaces the failure knobs.
    pub fn set_knobs(&self, knobs: Knobs) {
        self.with(|x| x.knobs = knobs);
    }

    /// How many orders carry `client_order_id` (the "never two orders" check).
    pub fn orders_with_client_id(&self, client_order_id: &str) -> usize {
        self.with(|x| {
            x.orders
                .iter()
                .filter(|o| o.client_order_id == client_order_id)
                .count()
        })
    }

    /// How many orders the exchange holds, in any state.
    pub fn order_count(&self) -> usize {
        self.with(|x| x.orders.len())
    }

    /// How many signed requests `api_key` has made that passed authentication.
    pub fn requests_by_key(&self, api_key: &str) -> usize {
        self.with(|x| x.requests_by_key.get(api_key).copied().unwrap_or(0))
    }

    /// Free balance of `asset`.
    pub fn free(&self, asset: &str) -> Decimal {
        self.with(|x| x.balances.get(asset).map(|b| b.0).unwrap_or_default())
    }
}

fn router(state: Arc<Mutex<Exchange>>) -> Router {
    Router::new()
        .route("/api/v3/ping", get(|| async { axum::Json(json!({})) }))
        .route("/api/v3/time", get(server_time))
        .route("/api/v3/exchangeInfo", get(exchange_info))
        .route("/api/v3/ticker/price", get(ticker_price))
        .route("/api/v3/order", post(signed).get(signed).delete(signed))
        .route("/api/v3/openOrders", get(signed))
        .route("/api/v3/allOrders", get(signed))
        .route("/api/v3/account", get(signed))
        .route("/sapi/v1/account/apiRestrictions", get(signed))
        .with_state(state)
}

type Shared = State<Arc<Mutex<Exchange>>>;

fn lock(state: &Arc<Mutex<Exchange>>) -> std::sync::MutexGuard<'_, Exchange> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Applies latency, bans and rate limits common to every endpoint, and counts weight.
async fn gate(
    state: &Arc<Mutex<Exchange>>,
    weight: u32,
    signed: bool,
) -> Result<(u32, i64), Response> {
    let latency = lock(state).knobs.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut x = lock(state);
    if x.knobs.banned {
        return Err(error(
            StatusCode::IM_A_TEAPOT,
            -1003,
            "Way too much request weight used; IP banned until 9999999999999. Please use WebSocket Streams for live updates to avoid bans.",
        ));
    }
    if signed && x.knobs.rate_limit_next > 0 {
        x.knobs.rate_limit_next -= 1;
        let retry = x.knobs.retry_after_secs.to_string();
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            -1003,
            "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        );
        if let Ok(value) = retry.parse() {
            response.headers_mut().insert("Retry-After", value);
        }
        return Err(response);
    }
    let minute = now_ms() / 60_000;
    if minute != x.weight_minute {
        x.weight_minute = minute;
        x.weight_used = 0;
    }
    x.weight_used += weight;
    Ok((x.weight_used, x.knobs.clock_skew_ms))
}

fn with_weight(mut response: Response, used: u32) -> Response {
    if let Ok(value) = used.to_string().parse() {
        response.headers_mut().insert("X-MBX-USED-WEIGHT-1M", value);
    }
    response
}

fn server_now(skew_ms: i64) -> u64 {
    now_ms().saturating_add_signed(skew_ms)
}

async fn server_time(State(state): Shared) -> Response {
    match gate(&state, 1, false).await {
        Ok((used, skew)) => with_weight(
            axum::Json(json!({ "serverTime": server_now(skew) })).into_response(),
            used,
        ),
        Err(response) => response,
    }
}

async fn exchange_info(State(state): Shared) -> Response {
    let (used, _) = match gate(&state, 20, false).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let x = lock(&state);
    let symbols: Vec<Value> = x
        .symbols
        .values()
        .map(|s| {
            json!({
                "symbol": s.symbol, "status": "TRADING", "baseAsset": s.base, "quoteAsset": s.quote,
                "orderTypes": ["LIMIT", "MARKET"],
                "filters": [
                    { "filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000.00", "tickSize": s.tick_size.to_string() },
                    { "filterType": "LOT_SIZE", "minQty": s.min_qty.to_string(), "maxQty": s.max_qty.to_string(), "stepSize": s.step_size.to_string() },
                    { "filterType": "NOTIONAL", "minNotional": s.min_notional.to_string(), "applyMinToMarket": true },
                ],
            })
        })
        .collect();
    with_weight(
        axum::Json(json!({ "timezone": "UTC", "serverTime": now_ms(), "symbols": symbols }))
            .into_response(),
        used,
    )
}

async fn ticker_price(State(state): Shared, RawQuery(query): RawQuery) -> Response {
    let (used, _) = match gate(&state, 2, false).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let params = parse_params(query.as_deref().unwrap_or(""));
    let x = lock(&state);
    let Some(symbol) = params.get("symbol") else {
        return error(
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
        );
    };
    match x.prices.get(symbol) {
        Some(price) => with_weight(
            axum::Json(json!({ "symbol": symbol, "price": price.to_string() })).into_response(),
            used,
        ),
        None => error(StatusCode::BAD_REQUEST, -1121, "Invalid symbol."),
    }
}

fn parse_params(text: &str) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Removes `signature=...` from a raw query or body; returns (rest, signature).
fn split_signature(raw: &str) -> (String, Option<String>) {
    let mut rest = Vec::new();
    let mut signature = None;
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("signature=") {
            Some(value) => signature = Some(value.to_owned()),
            None => rest.push(pair),
        }
    }
    (rest.join("&"), signature)
}

fn verify_signature(kind: &KeyKind, payload: &str, signature: &str) -> bool {
    match kind {
        KeyKind::Hmac(secret) => {
            let Ok(mut mac) =
                <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
            else {
                return false;
            };
            mac.update(payload.as_bytes());
            let Ok(given) = hex::decode(signature.to_ascii_lowercase()) else {
                return false;
            };
            mac.verify_slice(&given).is_ok()
        }
        KeyKind::Ed25519(public) => {
            let decoded: String = url::form_urlencoded::parse(format!("s={signature}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(decoded) else {
                return false;
            };
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
                .verify(payload.as_bytes(), &raw)
                .is_ok()
        }
    }
}

/// Every SIGNED endpoint: checks key, signature and timestamp, then dispatches.
async fn signed(
    State(state): Shared,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let weight = match (uri.path(), &method) {
        ("/api/v3/account", _) | ("/api/v3/allOrders", _) => 20,
        ("/api/v3/openOrders", _) => 6,
        ("/api/v3/order", &Method::GET) => 4,
        _ => 1,
    };
    let (used, skew) = match gate(&state, weight, true).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let raw_query = query.unwrap_or_default();
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    let (query_rest, query_sig) = split_signature(&raw_query);
    let (body_rest, body_sig) = split_signature(&raw_body);
    let Some(signature) = query_sig.or(body_sig) else {
        return error(
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
        );
    };
    let payload = format!("{query_rest}{body_rest}");
    let mut params = parse_params(&query_rest);
    params.extend(parse_params(&body_rest));

    let api_key = headers
        .get("X-MBX-APIKEY")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let key = lock(&state).keys.get(&api_key).cloned();
    let Some((kind, restrictions)) = key else {
        return error(
            StatusCode::UNAUTHORIZED,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        );
    };
    if !verify_signature(&kind, &payload, &signature) {
        return error(
            StatusCode::BAD_REQUEST,
            -1022,
            "Signature for this request is not valid.",
        );
    }
    let Some(timestamp) = params.get("timestamp").and_then(|t| t.parse::<u64>().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
        );
    };
    let recv_window = params
        .get("recvWindow")
        .and_then(|r| r.parse::<u64>().ok())
        .unwrap_or(5000);
    if recv_window > 60_000 {
        return error(
            StatusCode::BAD_REQUEST,
            -1131,
            "recvWindow must be less than 60000",
        );
    }
    let server = server_now(skew);
    if timestamp > server + 1000 {
        return error(
            StatusCode::BAD_REQUEST,
            -1021,
            "Timestamp for this request was 1000ms ahead of the server's time.",
        );
    }
    if server.saturating_sub(timestamp) > recv_window {
        return error(
            StatusCode::BAD_REQUEST,
            -1021,
            "Timestamp for this request is outside of the recvWindow.",
        );
    }

    let mut x = lock(&state);
    *x.requests_by_key.entry(api_key).or_default() += 1;
    let response = match (uri.path(), method) {
        ("/api/v3/order", Method::POST) => {
            if !restrictions.enable_spot_trading {
                return error(
                    StatusCode::UNAUTHORIZED,
                    -2015,
                    "Invalid API-key, IP, or permissions for action.",
                );
            }
            place_order(&mut x, &params)
        }
        ("/api/v3/order", Method::GET) => match find_order(&x, &params) {
            Some(order) => axum::Json(order.json()).into_response(),
            None => error(StatusCode::BAD_REQUEST, -2013, "Order does not exist."),
        },
        ("/api/v3/order", Method::DELETE) => cancel_order(&mut x, &params),
        ("/api/v3/openOrders", _) => {
            let symbol = params.get("symbol");
            let open: Vec<Value> = x
                .orders
                .iter()
                .filter(|o| o.is_open() && symbol.is_none_or(|s| &o.symbol == s))
                .map(Order::json)
                .collect();
            axum::Json(Value::Array(open)).into_response()
        }
        ("/api/v3/allOrders", _) => {
            let symbol = params.get("symbol").cloned().unwrap_or_default();
            let since = params
                .get("startTime")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
            let all: Vec<Value> = x
                .orders
                .iter()
                .filter(|o| o.symbol == symbol && o.time >= since)
                .map(Order::json)
                .collect();
            axum::Json(Value::Array(all)).into_response()
        }
        ("/api/v3/account", _) => {
            let balances: Vec<Value> = x
                .balances
                .iter()
                .map(|(asset, (free, locked))| json!({ "asset": asset, "free": free.to_string(), "locked": locked.to_string() }))
                .collect();
            axum::Json(json!({ "canTrade": restrictions.enable_spot_trading, "canWithdraw": restrictions.enable_withdrawals, "canDeposit": true, "accountType": "SPOT", "balances": balances, "permissions": ["SPOT"] })).into_response()
        }
        ("/sapi/v1/account/apiRestrictions", _) => axum::Json(json!({
            "ipRestrict": restrictions.ip_restrict,
            "createTime": 1_764_000_000_000_u64,
            "enableReading": true,
            "enableSpotAndMarginTrading": restrictions.enable_spot_trading,
            "enableWithdrawals": restrictions.enable_withdrawals,
            "enableInternalTransfer": restrictions.enable_internal_transfer,
            "permitsUniversalTransfer": restrictions.permits_universal_transfer,
            "enableMargin": false,
            "enableFutures": false,
            "enableVanillaOptions": false,
            "enablePortfolioMarginTrading": false,
        }))
        .into_response(),
        _ => error(
            StatusCode::NOT_FOUND,
            -1000,
            "An unknown error occurred while processing the request.",
        ),
    };
    with_weight(response, used)
}

fn find_order<'a>(x: &'a Exchange, params: &BTreeMap<String, String>) -> Option<&'a Order> {
    let symbol = params.get("symbol")?;
    if let Some(id) = params.get("orderId").and_then(|i| i.parse::<i64>().ok()) {
        return x
            .orders
            .iter()
            .find(|o| &o.symbol == symbol && o.order_id == id);
    }
    let client = params.get("origClientOrderId")?;
    // The newest order with that id (an id can be reused once the first is closed).
    x.orders
        .iter()
        .rev()
        .find(|o| &o.symbol == symbol && &o.client_order_id == client)
}

fn is_multiple(value: Decimal, step: Decimal) -> bool {
    step.is_zero() || (value % step).is_zero()
}

fn place_order(x: &mut Exchange, params: &BTreeMap<String, String>) -> Response {
    let bad = |msg: &str| error(StatusCode::BAD_REQUEST, -1102, msg);
    let Some(symbol) = params.get("symbol") else {
        return bad("Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.");
    };
    let Some(rules) = x.symbols.get(symbol).cloned() else {
        return error(StatusCode::BAD_REQUEST, -1121, "Invalid symbol.");
    };
    let side = params.get("side").cloned().unwrap_or_default();
    if side != "BUY" && side != "SELL" {
        return bad("Mandatory parameter 'side' was not sent, was empty/null, or malformed.");
    }
    let kind = params.get("type").cloned().unwrap_or_default();
    let Some(qty) = params
        .get("quantity")
        .and_then(|q| q.parse::<Decimal>().ok())
    else {
        return bad("Mandatory parameter 'quantity' was not sent, was empty/null, or malformed.");
    };
    let market = x.prices.get(symbol).copied().unwrap_or_default();
    let price = match kind.as_str() {
        "MARKET" => market,
        "LIMIT" => match params.get("price").and_then(|p| p.parse::<Decimal>().ok()) {
            Some(price) => {
                if params.get("timeInForce").is_none() {
                    return bad(
                        "Mandatory parameter 'timeInForce' was not sent, was empty/null, or malformed.",
                    );
                }
                price
            }
            None => {
                return bad(
                    "Mandatory parameter 'price' was not sent, was empty/null, or malformed.",
                );
            }
        },
        _ => return error(StatusCode::BAD_REQUEST, -1116, "Invalid orderType."),
    };
    if qty < rules.min_qty || qty > rules.max_qty || !is_multiple(qty, rules.step_size) {
        return error(StatusCode::BAD_REQUEST, -1013, "Filter failure: LOT_SIZE");
    }
    if kind == "LIMIT" && (price <= Decimal::ZERO || !is_multiple(price, rules.tick_size)) {
        return error(
            StatusCode::BAD_REQUEST,
            -1013,
            "Filter failure: PRICE_FILTER",
        );
    }
    if qty * price < rules.min_notional {
        return error(StatusCode::BAD_REQUEST, -1013, "Filter failure: NOTIONAL");
    }
    let client_order_id = params
        .get("newClientOrderId")
        .cloned()
        .unwrap_or_else(|| format!("x-{}", x.next_order_id));
    if x.orders
        .iter()
        .any(|o| o.client_order_id == client_order_id && o.is_open())
    {
        return error(StatusCode::BAD_REQUEST, -2010, "Duplicate order sent.");
    }
    // Funds: BUY spends quote, SELL spends base.
    let (spend_asset, spend) = if side == "BUY" {
        (rules.quote.clone(), qty * price)
    } else {
        (rules.base.clone(), qty)
    };
    let free = x
        .balances
        .get(&spend_asset)
        .map(|b| b.0)
        .unwrap_or_default();
    if free < spend {
        return error(
            StatusCode::BAD_REQUEST,
            -2010,
            "Account has insufficient balance for requested action.",
        );
    }
    let order_id = x.next_order_id;
    x.next_order_id += 1;
    let now = now_ms();
    let mut order = Order {
        symbol: symbol.clone(),
        order_id,
        client_order_id,
        side: side.clone(),
        kind: kind.clone(),
        time_in_force: params.get("timeInForce").cloned(),
        price: if kind == "MARKET" {
            Decimal::ZERO
        } else {
            price
        },
        orig_qty: qty,
        executed_qty: Decimal::ZERO,
        cumulative_quote: Decimal::ZERO,
        status: "NEW".to_owned(),
        time: now,
    };
    let entry = x.balances.entry(spend_asset).or_default();
    entry.0 -= spend;
    if kind == "MARKET" {
        order.executed_qty = qty;
        order.cumulative_quote = qty * market;
        order.status = "FILLED".to_owned();
        let (receive_asset, receive) = if side == "BUY" {
            (rules.base.clone(), qty)
        } else {
            (rules.quote.clone(), qty * market)
        };
        x.balances.entry(receive_asset).or_default().0 += receive;
    } else {
        entry_locked(x, &order, spend);
    }
    let body = order.json();
    x.orders.push(order);
    if x.knobs.fail_after_accept > 0 {
        x.knobs.fail_after_accept -= 1;
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            -1000,
            "An unknown error occurred while processing the request.",
        );
    }
    axum::Json(body).into_response()
}

fn entry_locked(x: &mut Exchange, order: &Order, amount: Decimal) {
    let asset = x
        .symbols
        .get(&order.symbol)
        .map(|r| {
            if order.side == "BUY" {
                r.quote.clone()
            } else {
                r.base.clone()
            }
        })
        .unwrap_or_default();
    x.balances.entry(asset).or_default().1 += amount;
}

fn cancel_order(x: &mut Exchange, params: &BTreeMap<String, String>) -> Response {
    let Some(found) = find_order(x, params).map(|o| o.order_id) else {
        return error(StatusCode::BAD_REQUEST, -2011, "Unknown order sent.");
    };
    let Some(index) = x.orders.iter().position(|o| o.order_id == found) else {
        return error(StatusCode::BAD_REQUEST, -2011, "Unknown order sent.");
    };
    if !x.orders[index].is_open() {
        return error(StatusCode::BAD_REQUEST, -2011, "Unknown order sent.");
    }
    x.orders[index].status = "CANCELED".to_owned();
    let order = x.orders[index].clone();
    let rules = x.symbols.get(&order.symbol).cloned();
    if let Some(rules) = rules {
        let (asset, amount) = if order.side == "BUY" {
            (rules.quote, order.orig_qty * order.price)
        } else {
            (rules.base, order.orig_qty)
        };
        let entry = x.balances.entry(asset).or_default();
        entry.1 -= amount;
        entry.0 += amount;
    }
    axum::Json(order.json()).into_response()
}
