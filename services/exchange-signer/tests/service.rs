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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_policy_and_refuses_a_bad_one() {
    use engram_proto::v1::GetStatusRequest;
    use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
    use std::time::Duration;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = ExchangeDouble::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("double");
    double.add_key(
        "canary-key",
        KeyKind::Hmac("canary-secret".to_owned()),
        Restrictions::default(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("engram.toml");
    std::fs::write(&file, "ENGRAM_POLICY_MAX_ORDER_NOTIONAL = \"250\"\n").expect("config");
    let running = engram_testkit::VaultBackedService::start_with_env(
        BIN,
        "engram/exchange",
        json!({ "api_key": "canary-key", "api_secret": "canary-secret" }),
        &[
            ("ENGRAM_EXCHANGE_URL", double.url()),
            ("ENGRAM_CONFIG_FILE", file.display().to_string()),
        ],
    )
    .await
    .expect("ready");
    let client = ExchangeSignerClient::new(running.channel().await.expect("channel"));
    let limit = || {
        let mut client = client.clone();
        async move {
            client
                .get_status(GetStatusRequest {})
                .await
                .ok()?
                .into_inner()
                .policy
                .map(|p| p.max_order_notional)
        }
    };
    assert_eq!(limit().await.as_deref(), Some("250"));
    let hangup = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
    };
    let pid = running.service.pid().expect("pid");

    std::fs::write(&file, "ENGRAM_POLICY_MAX_ORDER_NOTIONAL = \"750\"\n").expect("config");
    assert!(hangup(pid).success());
    engram_testkit::poll_until("the new policy", Duration::from_secs(10), || async {
        (limit().await.as_deref() == Some("750")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", running.service.output()));

    std::fs::write(
        &file,
        "ENGRAM_POLICY_MAX_ORDER_NOTIONAL = \"-1\"\nENGRAM_POLICY_SIDES = \"HOLD\"\n",
    )
    .expect("config");
    assert!(hangup(pid).success());
    let output = {
        let service = &running.service;
        engram_testkit::poll_until("the refusal logged", Duration::from_secs(10), || async {
            let text = service.output();
            text.contains("policy reload refused").then_some(text)
        })
        .await
        .expect("refused")
    };
    assert!(
        output.contains("ENGRAM_POLICY_SIDES")
            && output.contains("ENGRAM_POLICY_MAX_ORDER_NOTIONAL"),
        "every problem is named"
    );
    assert_eq!(
        limit().await.as_deref(),
        Some("750"),
        "the previous policy stays in force"
    );
    running.stop().await.expect("clean stop");
}
