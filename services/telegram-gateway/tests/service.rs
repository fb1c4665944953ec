//! The telegram-gateway binary end to end: real OpenBao, random ports, health, SendAlert
//! refusing a malformed alert, rotation, a clean SIGTERM, no secret in output or metrics, and
//! exit code 64 on bad configuration.

use engram_doubles::telegram::TelegramDouble;
use engram_runtime::InProcessService;
use engram_testkit::{OpenBao, assert_bad_config_exits_64, assert_service_contract};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_telegram-gateway");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_service_contract_on_vault() {
    engram_runtime::service::install_crypto_provider();
    // The gateway restores its limits from the audit trail before it is ready, and checks its
    // token with getMe: both need their peers, each on its own Vault.
    let audit_bao = OpenBao::start().await.expect("openbao");
    audit_bao
        .put_secret("engram/audit", json!({ "hmac_key": "canary-audit-key" }))
        .await
        .expect("audit secret");
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let audit = InProcessService::start(
        audit_sink::SPEC,
        vec![
            ("ENGRAM_VAULT_ADDR", audit_bao.addr()),
            ("ENGRAM_VAULT_TOKEN", audit_bao.root_token().to_owned()),
            ("ENGRAM_AUDIT_DIR", audit_dir.path().display().to_string()),
        ],
        audit_sink::routes,
    )
    .await
    .expect("audit sink");
    let telegram =
        TelegramDouble::start("127.0.0.1:0".parse().expect("addr"), "7:canary-bot-token")
            .await
            .expect("telegram double");
    assert_service_contract(
        BIN,
        "telegram-gateway",
        "engram.v1.TelegramGateway",
        "engram/telegram",
        // Chat and user ids are not secret (and must be numbers); the token is the canary.
        json!({ "bot_token": "7:canary-bot-token", "allowed_chats": "100000001", "users": "100000001:admin", "admin_chat": "100000001" }),
        &[
            ("ENGRAM_AUDIT_ADDR", audit.grpc_url()),
            ("ENGRAM_TELEGRAM_API_URL", telegram.url()),
            ("ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS", "2".to_owned()),
        ],
        |channel| async move {
            let status = engram_proto::v1::telegram_gateway_client::TelegramGatewayClient::new(channel)
                .send_alert(engram_proto::v1::SendAlertRequest::default())
                .await
                .expect_err("an empty alert is refused");
            anyhow::ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");
            Ok(())
        },
    )
    .await
    .expect("service contract");
    audit.stop().await;
}

#[tokio::test]
async fn bad_config_lists_every_problem_and_exits_64() {
    assert_bad_config_exits_64(BIN)
        .await
        .expect("exit 64 with every problem listed");
}
