//! The telegram-gateway binary end to end: real OpenBao, random ports, health, an honest UNIMPLEMENTED
//! for the logic still to come, a clean SIGTERM, and no secret in its output or metrics.

use std::time::Duration;

use engram_testkit::{VaultBackedService, assert_bad_config_exits_64, http_get, metric_value};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_telegram-gateway");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_on_vault_serves_health_and_keeps_secrets_out_of_output() {
    let secret = json!({ "bot_token": "canary-bot-token", "allowed_chats": "canary-100000001", "users": "canary-100000001:admin", "admin_chat": "canary-100000001" });
    let running = VaultBackedService::start(BIN, "engram/telegram", secret.clone())
        .await
        .expect("ready");
    running
        .assert_grpc_serving("engram.v1.TelegramGateway")
        .await
        .expect("SERVING");

    let status = engram_proto::v1::telegram_gateway_client::TelegramGatewayClient::new(
        running.channel().await.expect("channel"),
    )
    .send_alert(engram_proto::v1::SendAlertRequest::default())
    .await
    .expect_err("not implemented yet");
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let (code, metrics) = http_get(running.service.admin_addr, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric_value(
            &metrics,
            "engram_build_info",
            &["service=\"telegram-gateway\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "engram_secret_version", &["engram/telegram"]),
        Some(1.0)
    );

    // A rotation is picked up without a restart; the version is logged, never the value.
    let mut rotated = secret.clone();
    for value in rotated.as_object_mut().expect("object").values_mut() {
        *value = json!(format!("{}-rotated", value.as_str().unwrap_or_default()));
    }
    running
        .bao
        .put_secret("engram/telegram", rotated)
        .await
        .expect("rotate");
    let admin = running.service.admin_addr;
    engram_testkit::poll_until("version 2 in use", Duration::from_secs(10), || async move {
        let text = http_get(admin, "/metrics").await.ok()?.1;
        (metric_value(&text, "engram_secret_version", &["engram/telegram"]) == Some(2.0))
            .then_some(())
    })
    .await
    .expect("rotation seen");

    let (_, readyz) = http_get(admin, "/readyz").await.expect("readyz");
    let (_, metrics) = http_get(admin, "/metrics").await.expect("metrics");
    let root_token = running.bao.root_token().to_owned();
    let output = running.stop().await.expect("clean exit on SIGTERM");
    assert!(
        output.contains("secret rotated"),
        "rotation is logged:\n{output}"
    );
    assert!(
        output.contains("\"version\":2"),
        "the new version is logged:\n{output}"
    );
    for haystack in [&output, &metrics, &readyz] {
        assert!(
            !haystack.contains("canary"),
            "a secret value leaked:\n{haystack}"
        );
        assert!(
            !haystack.contains(&root_token),
            "the Vault token leaked:\n{haystack}"
        );
    }
}

#[tokio::test]
async fn bad_config_lists_every_problem_and_exits_64() {
    assert_bad_config_exits_64(BIN)
        .await
        .expect("exit 64 with every problem listed");
}
