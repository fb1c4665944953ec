//! The llm-advisor binary end to end: real OpenBao, random ports, health, an honest UNIMPLEMENTED
//! for the logic still to come, rotation, a clean SIGTERM, no secret in output or metrics,
//! and exit code 64 on bad configuration.

use engram_testkit::{assert_bad_config_exits_64, assert_service_contract};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_llm-advisor");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_service_contract_on_vault() {
    assert_service_contract(
        BIN,
        "llm-advisor",
        "engram.v1.LlmAdvisor",
        "engram/llm",
        json!({ "api_key": "canary-llm-key" }),
        &[("LMSTUDIO_URL", "http://127.0.0.1:9".to_owned())],
        |channel| async move {
            // No model server in this test: advice is a clear UNAVAILABLE, never a guess.
            match engram_proto::v1::llm_advisor_client::LlmAdvisorClient::new(channel)
                .advise(engram_proto::v1::AdviseRequest {
                    symbol: "BTCUSDT".to_owned(),
                    ..Default::default()
                })
                .await
            {
                Err(status) if status.code() == tonic::Code::Unavailable => Ok(()),
                other => anyhow::bail!("expected UNAVAILABLE, got {other:?}"),
            }
        },
    )
    .await
    .expect("service contract");
}

#[tokio::test]
async fn bad_config_lists_every_problem_and_exits_64() {
    assert_bad_config_exits_64(BIN)
        .await
        .expect("exit 64 with every problem listed");
}
