//! The audit-sink binary end to end: real OpenBao, random ports, health, an honest UNIMPLEMENTED
//! for the logic still to come, a clean SIGTERM, and no secret in its output or metrics.

use std::time::Duration;

use engram_testkit::{VaultBackedService, assert_bad_config_exits_64, http_get, metric_value};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_audit-sink");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_on_vault_serves_health_and_keeps_secrets_out_of_output() {
    let secret = json!({ "hmac_key": "canary-audit-key" });
    let running = VaultBackedService::start(BIN, "engram/audit", secret.clone())
        .await
        .expect("ready");
    running
        .assert_grpc_serving("engram.v1.AuditSink")
        .await
        .expect("SERVING");

    let status = engram_proto::v1::audit_sink_client::AuditSinkClient::new(
        running.channel().await.expect("channel"),
    )
    .head(engram_proto::v1::HeadRequest {})
    .await
    .expect_err("not implemented yet");
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let (code, metrics) = http_get(running.service.admin_addr, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric_value(&metrics, "engram_build_info", &["service=\"audit-sink\""]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "engram_secret_version", &["engram/audit"]),
        Some(1.0)
    );

    // A rotation is picked up without a restart; the version is logged, never the value.
    let mut rotated = secret.clone();
    for value in rotated.as_object_mut().expect("object").values_mut() {
        *value = json!(format!("{}-rotated", value.as_str().unwrap_or_default()));
    }
    running
        .bao
        .put_secret("engram/audit", rotated)
        .await
        .expect("rotate");
    let admin = running.service.admin_addr;
    engram_testkit::poll_until("version 2 in use", Duration::from_secs(10), || async move {
        let text = http_get(admin, "/metrics").await.ok()?.1;
        (metric_value(&text, "engram_secret_version", &["engram/audit"]) == Some(2.0)).then_some(())
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

/// Traces leave over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and the server span of
/// an RPC continues the caller's W3C trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_server_spans_over_otlp_in_the_callers_trace() {
    let receiver = engram_testkit::OtlpReceiver::start()
        .await
        .expect("receiver");
    let running = VaultBackedService::start_with_env(
        BIN,
        "engram/audit",
        json!({ "hmac_key": "canary-audit-key" }),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())],
    )
    .await
    .expect("ready");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(engram_proto::v1::HeadRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01")
            .parse()
            .expect("metadata"),
    );
    let mut client = engram_proto::v1::audit_sink_client::AuditSinkClient::new(
        running.channel().await.expect("channel"),
    );
    let _ = client.head(request).await;
    // SIGTERM flushes the batch exporter before exit.
    running.stop().await.expect("clean exit");

    let spans = receiver.spans();
    let server_span = spans
        .iter()
        .find(|s| s.name == "grpc.server" && s.trace_id == trace_id)
        .unwrap_or_else(|| panic!("no server span in the caller's trace: {spans:#?}"));
    assert_eq!(server_span.service_name, "audit-sink");
    assert_eq!(server_span.parent_span_id, parent_id);
}
