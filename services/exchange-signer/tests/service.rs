//! The exchange-signer binary end to end: real OpenBao, the exchange double, random ports,
//! health, status, key rotation, a clean SIGTERM, no secret in output or metrics, and exit
//! code 64 on bad configuration.

use engram_doubles::exchange::{ExchangeDouble, KeyKind, Restrictions};
use engram_testkit::{assert_bad_config_exits_64, assert_service_contract};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_exchange-signer");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_service_contract_on_vault() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = ExchangeDouble::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("double");
    // The key version the test starts with, and the one the contract rotates to.
    for suffix in ["", "-rotated"] {
        double.add_key(
            &format!("canary-api-key{suffix}"),
            KeyKind::Hmac(format!("canary-api-secret{suffix}")),
            Restrictions::default(),
        );
    }
    assert_service_contract(
        BIN,
        "exchange-signer",
        "engram.v1.ExchangeSigner",
        "engram/exchange",
        json!({ "api_key": "canary-api-key", "api_secret": "canary-api-secret" }),
        &[("ENGRAM_EXCHANGE_URL", double.url())],
        |channel| async move {
            let status =
                engram_proto::v1::exchange_signer_client::ExchangeSignerClient::new(channel)
                    .get_status(engram_proto::v1::GetStatusRequest {})
                    .await?
                    .into_inner();
            anyhow::ensure!(
                status.key_version == 1,
                "key version {}",
                status.key_version
            );
            anyhow::ensure!(
                status
                    .key_restrictions
                    .is_some_and(|r| !r.enable_withdrawals),
                "the key's restrictions are read"
            );
            Ok(())
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
