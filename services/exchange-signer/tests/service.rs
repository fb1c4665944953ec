//! The exchange-signer binary end to end: real OpenBao, random ports, health, an honest UNIMPLEMENTED
//! for the logic still to come, rotation, a clean SIGTERM, no secret in output or metrics,
//! and exit code 64 on bad configuration.

use engram_testkit::{assert_bad_config_exits_64, assert_service_contract, expect_unimplemented};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_exchange-signer");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_service_contract_on_vault() {
    assert_service_contract(
        BIN,
        "exchange-signer",
        "engram.v1.ExchangeSigner",
        "engram/exchange",
        json!({ "api_key": "canary-api-key", "api_secret": "canary-api-secret" }),
        |channel| async move {
            expect_unimplemented(
                engram_proto::v1::exchange_signer_client::ExchangeSignerClient::new(channel)
                    .get_status(engram_proto::v1::GetStatusRequest {})
                    .await,
            )
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
