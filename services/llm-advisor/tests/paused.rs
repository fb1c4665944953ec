//! A hang beyond the timeout, on tokio's paused clock: the model server never answers, the
//! client gives up after exactly `LMSTUDIO_TIMEOUT` of (virtual) time, and the test takes no
//! real time to show it.

use std::time::Duration;

use engram_doubles::llm::{LlmDouble, LlmMode};
use llm_advisor::advice::{MarketContext, build_messages, response_format};
use llm_advisor::client::{LlmClient, LlmError, Sampling};

#[tokio::test(start_paused = true)]
async fn a_hang_is_cut_at_the_timeout_on_tokios_clock() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = LlmDouble::start("127.0.0.1:0".parse().expect("addr"), "m")
        .await
        .expect("double");
    double.set_mode(LlmMode::Hang);
    let client =
        LlmClient::new(double.url().parse().expect("url"), Duration::from_secs(2)).expect("client");
    let started = tokio::time::Instant::now();
    let result = client
        .complete(
            None,
            "m",
            build_messages("BTCUSDT", "q", &MarketContext::default()),
            response_format(),
            Sampling {
                temperature: 0.2,
                max_tokens: 100,
            },
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(result, Err(LlmError::Timeout(Duration::from_secs(10))));
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "the full timeout passed on tokio's clock"
    );
}
