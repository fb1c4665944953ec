//! The llm-advisor service: schema-checked trading advice from an LM Studio /
//! OpenAI-compatible endpoint, or a clear "unavailable", never anything in between. It has no
//! route to the signer and no code that trades.
//!
//! `main.rs` hands [`SPEC`] and [`routes`] to the shared runtime.

pub mod advice;
pub mod breaker;
pub mod client;
pub mod config;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engram_proto::service_names;
use engram_proto::v1::llm_advisor_server::{LlmAdvisor, LlmAdvisorServer};
use engram_proto::v1::{AdviceAction, AdviseRequest, AdviseResponse, AuditCategory, TokenUsage};
use engram_runtime::admin::Check;
use engram_runtime::audit::{event, number, text};
use engram_runtime::{ServiceContext, ServiceSpec};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use secrecy::SecretString;
use tokio::sync::Semaphore;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::advice::{
    Action, Advice, MarketContext, build_messages, parse_advice, repair_messages, response_format,
};
use crate::breaker::{CircuitBreaker, MinuteBudget};
use crate::client::{LlmClient, LlmError};
use crate::config::AdvisorConfig;

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "llm-advisor",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::LLM_ADVISOR,
    secret_path: "engram/llm",
    required_secret_fields: &[],
    default_grpc_port: 50053,
    default_admin_port: 9103,
};

/// Longest question accepted at all (it is cut further before reaching the model).
pub const MAX_QUESTION_BYTES: usize = 2000;

#[derive(Clone, Debug)]
struct Metrics {
    requests: IntCounterVec,
    latency: Histogram,
    tokens: IntCounterVec,
    breaker: IntGauge,
    budget_rejections: prometheus::IntCounter,
}

impl Metrics {
    fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "engram_llm_requests_total",
                    "Advise outcomes: ok, repaired, invalid, unavailable, timeout, breaker_open, budget, bad_request.",
                ),
                &["outcome"],
            )?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "engram_llm_latency_seconds",
                    "Time to an answer from the model server.",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            )?,
            tokens: IntCounterVec::new(
                Opts::new(
                    "engram_llm_tokens_total",
                    "Tokens used, by kind (prompt, completion).",
                ),
                &["kind"],
            )?,
            breaker: IntGauge::new(
                "engram_llm_breaker_state",
                "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            )?,
            budget_rejections: prometheus::IntCounter::new(
                "engram_llm_budget_rejections_total",
                "Requests refused by the per-minute budget.",
            )?,
        };
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.latency.clone()))?;
        registry.register(Box::new(metrics.tokens.clone()))?;
        registry.register(Box::new(metrics.breaker.clone()))?;
        registry.register(Box::new(metrics.budget_rejections.clone()))?;
        Ok(metrics)
    }
}

/// The gRPC service.
#[derive(Debug)]
pub struct AdvisorService {
    config: AdvisorConfig,
    client: LlmClient,
    context: ServiceContext,
    breaker: CircuitBreaker,
    budget: MinuteBudget,
    slots: Semaphore,
    model: tokio::sync::OnceCell<String>,
    metrics: Metrics,
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
pub fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

fn action_proto(action: Action) -> AdviceAction {
    match action {
        Action::Buy => AdviceAction::Buy,
        Action::Sell => AdviceAction::Sell,
        Action::Hold => AdviceAction::Hold,
    }
}

impl AdvisorService {
    fn sampling(&self) -> client::Sampling {
        client::Sampling {
            temperature: self.config.temperature,
            max_tokens: self.config.max_tokens,
        }
    }

    fn key(&self) -> Option<SecretString> {
        self.context
            .secrets
            .current()
            .and_then(|b| b.field("api_key").cloned())
    }

    async fn model(&self, timeout: Duration) -> Result<String, LlmError> {
        if let Some(model) = &self.config.model {
            return Ok(model.clone());
        }
        let key = self.key();
        self.model
            .get_or_try_init(|| async {
                self.client
                    .models(key.as_ref(), timeout)
                    .await?
                    .into_iter()
                    .next()
                    .ok_or(LlmError::BadResponse)
            })
            .await
            .cloned()
    }

    /// One question to the model, with one repair attempt after an invalid answer.
    async fn ask(
        &self,
        symbol: &str,
        question: &str,
        market: &MarketContext,
        timeout: Duration,
    ) -> Result<(Advice, client::Completion, bool), Result<LlmError, advice::AdviceError>> {
        let started = tokio::time::Instant::now();
        let key = self.key();
        let model = self.model(timeout).await.map_err(Ok)?;
        let remaining = || timeout.saturating_sub(started.elapsed());
        let first = self
            .client
            .complete(
                key.as_ref(),
                &model,
                build_messages(symbol, question, market),
                response_format(),
                self.sampling(),
                remaining(),
            )
            .await
            .map_err(Ok)?;
        match parse_advice(&first.content) {
            Ok(advice) => Ok((advice, first, false)),
            Err(problem) => {
                let second = self
                    .client
                    .complete(
                        key.as_ref(),
                        &model,
                        repair_messages(symbol, question, market, &problem),
                        response_format(),
                        self.sampling(),
                        remaining(),
                    )
                    .await
                    .map_err(Ok)?;
                let advice = parse_advice(&second.content).map_err(Err)?;
                Ok((advice, second, true))
            }
        }
    }

    async fn record(
        &self,
        correlation: &str,
        symbol: &str,
        outcome: &str,
        model: &str,
        latency: Duration,
    ) {
        let Some(recorder) = self.context.audit() else {
            return;
        };
        let mut record = event(
            "llm-advisor",
            AuditCategory::Audit,
            "ADVICE_GIVEN",
            &[
                ("symbol", text(symbol)),
                ("outcome", text(outcome)),
                ("model", text(model)),
                ("latency_ms", number(latency.as_millis() as f64)),
            ],
        );
        record.correlation_id = correlation.to_owned();
        if let Err(error) = recorder.record(record).await {
            tracing::warn!(error = %error, "advice outcome could not be recorded");
        }
    }
}

#[tonic::async_trait]
impl LlmAdvisor for AdvisorService {
    #[tracing::instrument(skip_all, fields(rpc = "Advise", symbol = %request.get_ref().symbol))]
    async fn advise(
        &self,
        request: Request<AdviseRequest>,
    ) -> Result<Response<AdviseResponse>, Status> {
        let deadline = caller_deadline(request.metadata());
        let request = request.into_inner();
        let symbol_ok = (2..=20).contains(&request.symbol.len())
            && request
                .symbol
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if !symbol_ok {
            self.metrics
                .requests
                .with_label_values(&["bad_request"])
                .inc();
            return Err(Status::invalid_argument(
                "symbol: must be 2-20 characters of A-Z and 0-9",
            ));
        }
        if request.question.len() > MAX_QUESTION_BYTES {
            self.metrics
                .requests
                .with_label_values(&["bad_request"])
                .inc();
            return Err(Status::invalid_argument(format!(
                "question: at most {MAX_QUESTION_BYTES} bytes"
            )));
        }
        let market = request
            .market
            .map(|m| MarketContext {
                last_price: m.last_price,
                position: m.position,
                recent_orders: m.recent_orders,
            })
            .unwrap_or_default();
        let correlation = request
            .context
            .map(|c| c.correlation_id)
            .unwrap_or_default();
        // The caller's deadline wins when it is shorter than LMSTUDIO_TIMEOUT.
        let timeout = deadline.map_or(self.config.timeout, |d| d.min(self.config.timeout));

        if !self.breaker.try_acquire() {
            self.metrics.breaker.set(self.breaker.state() as i64);
            self.metrics
                .requests
                .with_label_values(&["breaker_open"])
                .inc();
            return Err(Status::unavailable(
                "advice unavailable: the model server is failing (circuit open)",
            ));
        }
        if !self.budget.try_take() {
            self.breaker.record(true);
            self.metrics.budget_rejections.inc();
            self.metrics.requests.with_label_values(&["budget"]).inc();
            return Err(Status::resource_exhausted(
                "advice budget for this minute is spent",
            ));
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(timeout, self.slots.acquire()).await {
            Ok(Ok(_permit)) => tokio::time::timeout(
                timeout,
                self.ask(&request.symbol, &request.question, &market, timeout),
            )
            .await
            .unwrap_or(Err(Ok(LlmError::Timeout(timeout)))),
            _ => Err(Ok(LlmError::Timeout(timeout))),
        };
        let latency = started.elapsed();
        self.metrics.latency.observe(latency.as_secs_f64());
        let result = match outcome {
            Ok((advice, completion, repaired)) => {
                self.breaker.record(true);
                self.metrics
                    .tokens
                    .with_label_values(&["prompt"])
                    .inc_by(u64::from(completion.prompt_tokens));
                self.metrics
                    .tokens
                    .with_label_values(&["completion"])
                    .inc_by(u64::from(completion.completion_tokens));
                let label = if repaired { "repaired" } else { "ok" };
                self.metrics.requests.with_label_values(&[label]).inc();
                self.record(
                    &correlation,
                    &request.symbol,
                    label,
                    &completion.model,
                    latency,
                )
                .await;
                Ok(Response::new(AdviseResponse {
                    action: action_proto(advice.action) as i32,
                    confidence: advice.confidence,
                    rationale: advice.rationale,
                    model: completion.model,
                    latency: prost_types::Duration::try_from(latency).ok(),
                    usage: Some(TokenUsage {
                        prompt_tokens: completion.prompt_tokens,
                        completion_tokens: completion.completion_tokens,
                    }),
                }))
            }
            Err(Err(problem)) => {
                // The server answered, twice, with no valid advice: not a server failure.
                self.breaker.record(true);
                self.metrics.requests.with_label_values(&["invalid"]).inc();
                self.record(&correlation, &request.symbol, "invalid", "", latency)
                    .await;
                Err(Status::unavailable(format!(
                    "advice unavailable: {problem} (after one repair attempt)"
                )))
            }
            Err(Ok(error)) => {
                self.breaker.record(false);
                let label = if matches!(error, LlmError::Timeout(_)) {
                    "timeout"
                } else {
                    "unavailable"
                };
                self.metrics.requests.with_label_values(&[label]).inc();
                self.record(&correlation, &request.symbol, label, "", latency)
                    .await;
                if matches!(error, LlmError::Timeout(_))
                    && deadline.is_some_and(|d| d <= self.config.timeout)
                {
                    return Err(Status::deadline_exceeded(format!(
                        "advice unavailable: {error}"
                    )));
                }
                Err(Status::unavailable(format!("advice unavailable: {error}")))
            }
        };
        self.metrics.breaker.set(self.breaker.state() as i64);
        result
    }
}

/// Builds the advisor and its routes; readiness reports whether the model server answers
/// `/v1/models` (detail only: an unreachable model server makes advice unavailable, it does
/// not make the advisor unfit to answer that clearly).
///
/// # Errors
///
/// When the HTTP client or the metrics cannot be set up.
pub fn routes(context: &ServiceContext, config: AdvisorConfig) -> anyhow::Result<Routes> {
    let metrics = Metrics::register(context.metrics.registry())?;
    let client = LlmClient::new(config.base_url.clone(), config.connect_timeout)?;
    let service = Arc::new(AdvisorService {
        breaker: CircuitBreaker::new(config.breaker_failures, config.breaker_cooldown),
        budget: MinuteBudget::new(config.requests_per_minute),
        slots: Semaphore::new(config.max_concurrent as usize),
        model: tokio::sync::OnceCell::new(),
        client: client.clone(),
        context: context.clone(),
        metrics,
        config,
    });
    {
        let service = service.clone();
        context.readiness.add_check("model_server", move || {
            let service = service.clone();
            async move {
                let key = service.key();
                match service
                    .client
                    .models(key.as_ref(), Duration::from_secs(2))
                    .await
                {
                    Ok(models) if models.is_empty() => {
                        Check::Degraded("the model server lists no model".to_owned())
                    }
                    Ok(_) => Check::Ready,
                    Err(error) => {
                        Check::Degraded(format!("{error}: advice will answer UNAVAILABLE"))
                    }
                }
            }
        });
    }
    Ok(Routes::new(LlmAdvisorServer::from_arc(service)))
}
