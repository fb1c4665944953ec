//! The exchange client: signed requests to a Binance-compatible spot REST API, with the
//! behaviour an operator needs from a client that moves money.
//!
//! - Clock: the offset to the exchange's server time is measured and applied to every
//!   `timestamp`; an error -1021 (timestamp outside recvWindow) resyncs and retries once.
//! - Rate limits: the used-weight header is tracked; past 90 % of the limit the client slows
//!   itself down; an HTTP 429 sets one shared "not before" deadline from `Retry-After`, which
//!   every later request waits for (no retry storm); a 418 (IP ban) halts the client: every
//!   later request fails at once without reaching the exchange.
//! - Unknown outcomes: a 5xx, a timeout or error -1007 means an order may or may not exist.
//!   `place_order` then asks the exchange for the order by its client order id before it
//!   does anything else, so one client order id never becomes two orders.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;
use url::Url;

use crate::signing::{Query, SigningKey};

/// The credentials in use; swapped whole on rotation.
pub struct Credentials {
    /// Sent in `X-MBX-APIKEY`.
    pub api_key: SecretString,
    /// Signs the request.
    pub key: SigningKey,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials([redacted])")
    }
}

/// What went wrong talking to the exchange. Messages carry Binance's code and message, never
/// a key or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The exchange refused the request (its code and message).
    #[error("exchange refused the request: {code} {msg}")]
    Rejected {
        /// Binance's error code, for example -2010.
        code: i64,
        /// Binance's message.
        msg: String,
    },
    /// The request may or may not have been carried out (5xx, timeout, -1007).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// HTTP 429: wait this long before the next request.
    #[error("rate limited by the exchange; retry after {0:?}")]
    RateLimited(Duration),
    /// HTTP 418: the IP is banned; the client refuses to send anything more.
    #[error("the exchange banned this IP (HTTP 418); trading must halt")]
    Banned,
    /// The exchange could not be reached, or answered something unreadable.
    #[error("exchange unreachable: {0}")]
    Transport(String),
}

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Base URL, for example `https://api.binance.com` or the double's.
    pub base_url: Url,
    /// `recvWindow` in milliseconds (1..=60000).
    pub recv_window_ms: u64,
    /// Timeout of each request.
    pub request_timeout: Duration,
    /// The exchange's weight limit per minute (Binance spot: 6000).
    pub weight_limit: u32,
}

/// A signed-request client shared by every RPC of the signer.
pub struct ExchangeClient {
    http: reqwest::Client,
    settings: ClientSettings,
    credentials: ArcSwapOption<Credentials>,
    clock_offset_ms: AtomicI64,
    weight_used: AtomicU32,
    banned: AtomicBool,
    not_before: Mutex<Option<Instant>>,
    /// `engram_exchange_responses_total{status}`, registered by the service.
    responses: prometheus::IntCounterVec,
}

impl std::fmt::Debug for ExchangeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeClient")
            .field("base_url", &self.settings.base_url.as_str())
            .field("clock_offset_ms", &self.clock_offset_ms())
            .field("weight_used", &self.weight_used())
            .field("banned", &self.is_banned())
            .finish_non_exhaustive()
    }
}

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

impl ExchangeClient {
    /// A client with `credentials` (`None` until the key is loaded: signed requests then fail
    /// with `Transport("no exchange key loaded")`).
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(
        settings: ClientSettings,
        credentials: Option<Credentials>,
    ) -> Result<Arc<Self>, ExchangeError> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .build()
            .map_err(|e| ExchangeError::Transport(e.to_string()))?;
        let responses = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "engram_exchange_responses_total",
                "Answers to signed requests: 2xx, 4xx, 5xx, 429 (weight exhausted), 418 (IP banned), or none (no answer).",
            ),
            &["status"],
        )
        .map_err(|e| ExchangeError::Transport(e.to_string()))?;
        // Every status exists from the start at 0, so the first 418 or 429 is an increase.
        for status in ["2xx", "4xx", "5xx", "429", "418", "none"] {
            responses.with_label_values(&[status]);
        }
        Ok(Arc::new(Self {
            http,
            settings,
            credentials: ArcSwapOption::from(credentials.map(Arc::new)),
            clock_offset_ms: AtomicI64::new(0),
            weight_used: AtomicU32::new(0),
            banned: AtomicBool::new(false),
            not_before: Mutex::new(None),
            responses,
        }))
    }

    /// The response counter, for the service's metrics registry.
    pub fn response_metrics(&self) -> &prometheus::IntCounterVec {
        &self.responses
    }

    fn count_response(&self, status: &str) {
        self.responses.with_label_values(&[status]).inc();
    }

    /// Uses new credentials from the next request on; requests in flight finish with theirs.
    pub fn rotate(&self, credentials: Credentials) {
        self.credentials.store(Some(Arc::new(credentials)));
    }

    /// Whether a key is loaded.
    pub fn has_credentials(&self) -> bool {
        self.credentials.load().is_some()
    }

    /// Public (unsigned) GET, with the same pacing and weight tracking.
    ///
    /// # Errors
    ///
    /// See [`ExchangeError`].
    #[tracing::instrument(name = "exchange.request", skip_all, fields(otel.kind = "client", http.method = "GET", url.path = path))]
    pub async fn public(&self, path: &str, query: Query) -> Result<Value, ExchangeError> {
        self.pace().await?;
        let response = self
            .http
            .get(self.url(path, query.as_str()))
            .send()
            .await
            .map_err(|e| ExchangeError::Transport(e.to_string()))?;
        self.finish(response).await
    }

    /// Exchange time minus local time, in milliseconds, as last measured.
    pub fn clock_offset_ms(&self) -> i64 {
        self.clock_offset_ms.load(Ordering::Relaxed)
    }

    /// Request weight used in the current minute, as the exchange last reported.
    pub fn weight_used(&self) -> u32 {
        self.weight_used.load(Ordering::Relaxed)
    }

    /// Whether a 418 has halted the client.
    pub fn is_banned(&self) -> bool {
        self.banned.load(Ordering::Relaxed)
    }

    fn url(&self, path: &str, query: &str) -> String {
        let base = self.settings.base_url.as_str().trim_end_matches('/');
        if query.is_empty() {
            format!("{base}{path}")
        } else {
            format!("{base}{path}?{query}")
        }
    }

    /// Measures the offset to the exchange's clock (half the round trip is assumed each way).
    ///
    /// # Errors
    ///
    /// When the time cannot be fetched.
    pub async fn sync_clock(&self) -> Result<i64, ExchangeError> {
        let sent = local_ms();
        let response = self
            .http
            .get(self.url("/api/v3/time", ""))
            .send()
            .await
            .map_err(|e| ExchangeError::Transport(e.to_string()))?;
        let received = local_ms();
        let body: Value = response
            .json()
            .await
            .map_err(|e| ExchangeError::Transport(e.to_string()))?;
        let server = body["serverTime"]
            .as_i64()
            .ok_or_else(|| ExchangeError::Transport("no serverTime".to_owned()))?;
        let offset = server - (sent + received) / 2;
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
        tracing::info!(offset_ms = offset, "synchronised with the exchange clock");
        Ok(offset)
    }

    /// Waits for a 429's deadline, and slows down near the weight limit.
    async fn pace(&self) -> Result<(), ExchangeError> {
        if self.is_banned() {
            return Err(ExchangeError::Banned);
        }
        let deadline = *self.not_before.lock().await;
        if let Some(deadline) = deadline {
            tokio::time::sleep_until(deadline.into()).await;
        }
        let used = self.weight_used();
        let limit = self.settings.weight_limit.max(1);
        if used * 10 >= limit * 9 {
            // Past 90 %: spread what is left of the minute over the remaining budget.
            let pause = Duration::from_millis(u64::from(used - limit * 9 / 10) * 10);
            tracing::warn!(
                used,
                limit,
                pause_ms = pause.as_millis() as u64,
                "near the exchange's weight limit: slowing down"
            );
            tokio::time::sleep(pause.min(Duration::from_secs(5))).await;
        }
        Ok(())
    }

    /// One signed request. `query` holds the parameters without timestamp and signature.
    ///
    /// # Errors
    ///
    /// See [`ExchangeError`]; -1021 is retried once after a clock resync.
    pub async fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Query,
    ) -> Result<Value, ExchangeError> {
        match self.signed_once(method.clone(), path, query.clone()).await {
            Err(ExchangeError::Rejected { code: -1021, msg }) => {
                tracing::warn!(%msg, "timestamp outside recvWindow: resynchronising the clock and retrying once");
                self.sync_clock().await?;
                self.signed_once(method, path, query).await
            }
            other => other,
        }
    }

    #[tracing::instrument(name = "exchange.request", skip_all, fields(otel.kind = "client", http.method = %method, url.path = path))]
    async fn signed_once(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Query,
    ) -> Result<Value, ExchangeError> {
        self.pace().await?;
        let Some(credentials) = self.credentials.load_full() else {
            return Err(ExchangeError::Transport(
                "no exchange key loaded".to_owned(),
            ));
        };
        let timestamp = u64::try_from(local_ms() + self.clock_offset_ms()).unwrap_or_default();
        let signed = query
            .signed(
                &credentials.key,
                timestamp,
                self.settings.recv_window_ms,
                "",
            )
            .map_err(|e| ExchangeError::Transport(e.to_string()))?;
        let response = self
            .http
            .request(method, self.url(path, &signed))
            .header("X-MBX-APIKEY", credentials.api_key.expose_secret())
            .send()
            .await
            .map_err(|e| {
                self.count_response("none");
                if e.is_timeout() {
                    ExchangeError::Unknown(format!(
                        "no answer within {:?}",
                        self.settings.request_timeout
                    ))
                } else if e.is_connect() {
                    ExchangeError::Transport(format!(
                        "cannot connect to {}",
                        self.settings.base_url
                    ))
                } else {
                    ExchangeError::Unknown("the connection failed mid-request".to_owned())
                }
            })?;
        self.finish(response).await
    }

    /// Reads weight, status and body of a response into a result.
    async fn finish(&self, response: reqwest::Response) -> Result<Value, ExchangeError> {
        if let Some(used) = response
            .headers()
            .get("X-MBX-USED-WEIGHT-1M")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
        {
            self.weight_used.store(used, Ordering::Relaxed);
        }
        let status = response.status().as_u16();
        self.count_response(match status {
            418 => "418",
            429 => "429",
            200..=299 => "2xx",
            500..=599 => "5xx",
            _ => "4xx",
        });
        let retry_after = response
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(body),
            418 => {
                self.banned.store(true, Ordering::Relaxed);
                tracing::error!(target: "security", "the exchange banned this IP (HTTP 418): halting all exchange requests");
                Err(ExchangeError::Banned)
            }
            429 => {
                let wait = retry_after.unwrap_or(Duration::from_secs(60));
                *self.not_before.lock().await = Some(Instant::now() + wait);
                tracing::warn!(
                    retry_after_secs = wait.as_secs(),
                    "rate limited by the exchange (HTTP 429)"
                );
                Err(ExchangeError::RateLimited(wait))
            }
            500..=599 => Err(ExchangeError::Unknown(format!(
                "HTTP {status} from the exchange"
            ))),
            _ => {
                let code = body["code"].as_i64().unwrap_or_default();
                let msg = body["msg"].as_str().unwrap_or_default().to_owned();
                if code == -1007 {
                    return Err(ExchangeError::Unknown(msg));
                }
                Err(ExchangeError::Rejected { code, msg })
            }
        }
    }

    /// Places an order whose `newClientOrderId` is `client_order_id`. When the outcome is
    /// unknown, asks the exchange for that id before anything is retried, and returns the
    /// order it finds; only when the exchange confirms there is no such order is the placement
    /// sent again (once).
    ///
    /// # Errors
    ///
    /// The exchange's refusal, or `Unknown` when even the follow-up query cannot tell.
    pub async fn place_order(
        &self,
        symbol: &str,
        order: Query,
        client_order_id: &str,
    ) -> Result<Value, ExchangeError> {
        let query = order.param("newClientOrderId", client_order_id);
        match self
            .signed(reqwest::Method::POST, "/api/v3/order", query.clone())
            .await
        {
            Err(ExchangeError::Unknown(reason)) => {
                tracing::warn!(client_order_id, %reason, "order outcome unknown: asking the exchange before anything else");
                match self.order_by_client_id(symbol, client_order_id).await {
                    Ok(found) => Ok(found),
                    Err(ExchangeError::Rejected { code: -2013, .. }) => {
                        tracing::info!(
                            client_order_id,
                            "the exchange has no such order: placing it again, once"
                        );
                        self.signed(reqwest::Method::POST, "/api/v3/order", query)
                            .await
                    }
                    Err(other) => Err(ExchangeError::Unknown(format!(
                        "{reason}; follow-up query failed: {other}"
                    ))),
                }
            }
            other => other,
        }
    }

    /// The order with `client_order_id`.
    ///
    /// # Errors
    ///
    /// `Rejected { code: -2013 }` when the exchange has no such order.
    pub async fn order_by_client_id(
        &self,
        symbol: &str,
        client_order_id: &str,
    ) -> Result<Value, ExchangeError> {
        let query = Query::new()
            .param("symbol", symbol)
            .param("origClientOrderId", client_order_id);
        self.signed(reqwest::Method::GET, "/api/v3/order", query)
            .await
    }
}
