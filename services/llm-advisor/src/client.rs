//! The OpenAI-compatible client: `GET /v1/models` and `POST /v1/chat/completions`, with a
//! connect timeout, a total timeout per call, and an optional bearer key from Vault.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use url::Url;

/// What went wrong calling the model server. Never includes the key or the prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// No answer within the time allowed.
    #[error("the model server did not answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error status.
    #[error("the model server answered HTTP {0}")]
    Status(u16),
    /// The server could not be reached.
    #[error("the model server is unreachable: {0}")]
    Transport(String),
    /// The answer was not a chat completion.
    #[error("the model server's answer is not a chat completion")]
    BadResponse,
}

/// One completion: the content and its token counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The assistant message's content.
    pub content: String,
    /// Prompt tokens, as the server counted them.
    pub prompt_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
    /// The model that answered.
    pub model: String,
}

/// How to sample: the same for every request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 to 2.
    pub temperature: f64,
    /// Most tokens in the answer.
    pub max_tokens: u32,
}

/// The client.
#[derive(Debug, Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    base: Url,
}

impl LlmClient {
    /// A client for `base` (LM Studio's `LMSTUDIO_URL`).
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(base: Url, connect_timeout: Duration) -> Result<Self, LlmError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| LlmError::Transport(e.to_string()))?;
        Ok(Self { http, base })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.as_str().trim_end_matches('/'))
    }

    fn authorize(
        request: reqwest::RequestBuilder,
        key: Option<&SecretString>,
    ) -> reqwest::RequestBuilder {
        match key {
            Some(key) if !key.expose_secret().is_empty() => {
                request.bearer_auth(key.expose_secret())
            }
            _ => request,
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Value, LlmError> {
        let response = request.timeout(timeout).send().await.map_err(|e| {
            if e.is_timeout() {
                LlmError::Timeout(timeout)
            } else {
                LlmError::Transport(if e.is_connect() {
                    "connection refused".to_owned()
                } else {
                    "request failed".to_owned()
                })
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(LlmError::Status(status.as_u16()));
        }
        response.json().await.map_err(|e| {
            if e.is_timeout() {
                LlmError::Timeout(timeout)
            } else {
                LlmError::BadResponse
            }
        })
    }

    /// The model ids the server offers.
    ///
    /// # Errors
    ///
    /// [`LlmError`].
    pub async fn models(
        &self,
        key: Option<&SecretString>,
        timeout: Duration,
    ) -> Result<Vec<String>, LlmError> {
        let body = self
            .send(
                Self::authorize(self.http.get(self.url("/v1/models")), key),
                timeout,
            )
            .await?;
        Ok(body["data"]
            .as_array()
            .ok_or(LlmError::BadResponse)?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// One chat completion with the strict response format.
    ///
    /// # Errors
    ///
    /// [`LlmError`].
    #[tracing::instrument(name = "llm.request", skip_all, fields(otel.kind = "client"))]
    pub async fn complete(
        &self,
        key: Option<&SecretString>,
        model: &str,
        messages: Value,
        response_format: Value,
        sampling: Sampling,
        timeout: Duration,
    ) -> Result<Completion, LlmError> {
        let body = json!({
            "model": model,
            "messages": messages,
            "response_format": response_format,
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_tokens,
            "stream": false,
        });
        let answer = self
            .send(
                Self::authorize(
                    self.http.post(self.url("/v1/chat/completions")).json(&body),
                    key,
                ),
                timeout,
            )
            .await?;
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .ok_or(LlmError::BadResponse)?
            .to_owned();
        let count = |field: &str| {
            u32::try_from(answer["usage"][field].as_u64().unwrap_or(0)).unwrap_or(u32::MAX)
        };
        Ok(Completion {
            content,
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
            model: answer["model"].as_str().unwrap_or(model).to_owned(),
        })
    }
}
