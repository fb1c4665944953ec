//! An OpenAI-compatible LLM endpoint (what LM Studio serves): `GET /v1/models` and
//! `POST /v1/chat/completions` with the real JSON shapes, honouring `response_format` of type
//! `json_schema` by answering with advice that fits it. Knobs make it misbehave the ways a real
//! model server does: latency, malformed JSON (always or for the next N answers), values that
//! break the schema, HTTP 500, hanging forever, and echoing the prompt it was sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// How the double answers chat completions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmMode {
    /// Valid advice that fits the requested schema.
    Good,
    /// Content that is not JSON, for the next N answers (then good).
    MalformedNext(u32),
    /// Content that is never JSON.
    AlwaysMalformed,
    /// JSON that breaks the schema (confidence 1.7).
    SchemaBreaking,
    /// HTTP 500.
    ServerError,
    /// Never answers.
    Hang,
    /// Good advice whose rationale is the user message it received (to inspect prompts).
    EchoPrompt,
}

#[derive(Debug)]
struct LlmState {
    model: String,
    mode: LlmMode,
    latency: Duration,
    api_key: Option<String>,
    received: Vec<Value>,
}

/// A handle to a running LLM double.
#[derive(Clone, Debug)]
pub struct LlmDouble {
    state: Arc<Mutex<LlmState>>,
    addr: SocketAddr,
}

impl LlmDouble {
    /// Starts the double on `addr` (port 0 for a free one) serving `model`.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr, model: &str) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(LlmState {
            model: model.to_owned(),
            mode: LlmMode::Good,
            latency: Duration::ZERO,
            api_key: None,
            received: Vec::new(),
        }));
        let router = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { state, addr })
    }

    /// `http://127.0.0.1:PORT` (LM Studio's `LMSTUDIO_URL` form).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut LlmState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sets how completions are answered.
    pub fn set_mode(&self, mode: LlmMode) {
        self.with(|s| s.mode = mode);
    }

    /// Adds latency before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.with(|s| s.latency = latency);
    }

    /// Requires `Authorization: Bearer <key>` from now on.
    pub fn require_key(&self, key: &str) {
        self.with(|s| s.api_key = Some(key.to_owned()));
    }

    /// Every chat request body received so far.
    pub fn received(&self) -> Vec<Value> {
        self.with(|s| s.received.clone())
    }
}

fn openai_error(status: StatusCode, message: &str, code: &str) -> Response {
    (status, Json(json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": code } }))).into_response()
}

fn authorized(state: &LlmState, headers: &HeaderMap) -> bool {
    state.api_key.as_ref().is_none_or(|key| {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}"))
    })
}

async fn models(State(state): State<Arc<Mutex<LlmState>>>, headers: HeaderMap) -> Response {
    let s = state.lock().unwrap_or_else(PoisonError::into_inner);
    if !authorized(&s, &headers) {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_api_key",
        );
    }
    Json(json!({ "object": "list", "data": [{ "id": s.model, "object": "model", "owned_by": "engram-doubles" }] })).into_response()
}

async fn chat(
    State(state): State<Arc<Mutex<LlmState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let (mode, latency, model) = {
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        if !authorized(&s, &headers) {
            return openai_error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_api_key",
            );
        }
        s.received.push(body.clone());
        let mode = s.mode.clone();
        if let LlmMode::MalformedNext(n) = mode {
            s.mode = if n <= 1 {
                LlmMode::Good
            } else {
                LlmMode::MalformedNext(n - 1)
            };
        }
        (mode, s.latency, s.model.clone())
    };
    if body["model"].as_str() != Some(model.as_str()) {
        return openai_error(
            StatusCode::NOT_FOUND,
            &format!(
                "The model `{}` does not exist.",
                body["model"].as_str().unwrap_or_default()
            ),
            "model_not_found",
        );
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let user_text: String = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let wants_schema = body["response_format"]["type"] == "json_schema";
    let content = match mode {
        LlmMode::Hang => {
            futures_pending().await;
            String::new()
        }
        LlmMode::ServerError => return openai_error(StatusCode::INTERNAL_SERVER_ERROR, "The server had an error while processing your request.", "server_error"),
        LlmMode::MalformedNext(_) | LlmMode::AlwaysMalformed => "Sure! I think you should BUY, confidence high.".to_owned(),
        LlmMode::SchemaBreaking => json!({ "action": "BUY", "confidence": 1.7, "rationale": "Very sure." }).to_string(),
        LlmMode::EchoPrompt => json!({ "action": "HOLD", "confidence": 0.5, "rationale": user_text }).to_string(),
        LlmMode::Good if wants_schema => json!({ "action": "HOLD", "confidence": 0.62, "rationale": "Momentum is flat; waiting costs little." }).to_string(),
        LlmMode::Good => "HOLD".to_owned(),
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let prompt_tokens = body["messages"].to_string().len() / 4;
    let completion_tokens = content.len() / 4;
    Json(json!({
        "id": format!("chatcmpl-{created}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens },
    }))
    .into_response()
}

async fn futures_pending() {
    std::future::pending::<()>().await;
}
