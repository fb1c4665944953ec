//! The LLM double against the advisor's own schema and prompt code: the real OpenAI shapes,
//! `response_format` honoured, and each failure knob.

use std::time::Duration;

use engram_doubles::llm::{LlmDouble, LlmMode};
use llm_advisor::advice::{
    AdviceError, MarketContext, build_messages, parse_advice, response_format,
};
use serde_json::{Value, json};

const MODEL: &str = "engram-test-model";

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn ask(
    http: &reqwest::Client,
    double: &LlmDouble,
    key: Option<&str>,
) -> Result<(u16, Value), reqwest::Error> {
    let mut request = http
        .post(format!("{}/v1/chat/completions", double.url()))
        .json(&json!({
            "model": MODEL,
            "messages": build_messages("BTCUSDT", "Should I buy?", &MarketContext::default()),
            "response_format": response_format(),
            "temperature": 0.2,
            "max_tokens": 200,
        }));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test]
async fn answers_in_openai_shapes_and_honours_the_schema() {
    let double = LlmDouble::start("127.0.0.1:0".parse().expect("addr"), MODEL)
        .await
        .expect("start");
    let http = http();
    let models: Value = http
        .get(format!("{}/v1/models", double.url()))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], MODEL);

    let (status, body) = ask(&http, &double, None).await.expect("answer");
    assert_eq!(status, 200);
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["usage"]["prompt_tokens"]
            .as_u64()
            .is_some_and(|t| t > 0)
    );
    parse_advice(content(&body)).expect("the good answer fits the advisor's schema");

    let wrong_model = http
        .post(format!("{}/v1/chat/completions", double.url()))
        .json(&json!({ "model": "nope", "messages": [] }))
        .send()
        .await
        .expect("send");
    assert_eq!(wrong_model.status(), 404);
}

#[tokio::test]
async fn every_failure_knob_misbehaves_as_promised() {
    let double = LlmDouble::start("127.0.0.1:0".parse().expect("addr"), MODEL)
        .await
        .expect("start");
    let http = http();

    double.set_mode(LlmMode::MalformedNext(1));
    assert_eq!(
        parse_advice(content(&ask(&http, &double, None).await.expect("1").1)),
        Err(AdviceError::NotJson)
    );
    assert!(
        parse_advice(content(&ask(&http, &double, None).await.expect("2").1)).is_ok(),
        "good again after one"
    );

    double.set_mode(LlmMode::SchemaBreaking);
    assert!(matches!(
        parse_advice(content(&ask(&http, &double, None).await.expect("3").1)),
        Err(AdviceError::Schema(_))
    ));

    double.set_mode(LlmMode::ServerError);
    assert_eq!(ask(&http, &double, None).await.expect("4").0, 500);

    double.set_mode(LlmMode::EchoPrompt);
    let echoed =
        parse_advice(content(&ask(&http, &double, None).await.expect("5").1)).expect("echo");
    assert!(
        echoed.rationale.contains("Should I buy?"),
        "{}",
        echoed.rationale
    );
    assert_eq!(double.received().len(), 5);

    double.set_mode(LlmMode::Good);
    double.require_key("canary-llm-key");
    assert_eq!(ask(&http, &double, None).await.expect("6").0, 401);
    assert_eq!(
        ask(&http, &double, Some("canary-llm-key"))
            .await
            .expect("7")
            .0,
        200
    );

    double.set_mode(LlmMode::Hang);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let hung = ask(&impatient, &double, Some("canary-llm-key"))
        .await
        .expect_err("never answers");
    assert!(hung.is_timeout());
}
