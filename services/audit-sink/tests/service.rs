//! The audit-sink binary end to end: real OpenBao, random ports, health, rotation, a clean SIGTERM, no secret in output or metrics,
//! and exit code 64 on bad configuration.

use engram_testkit::{VaultBackedService, assert_bad_config_exits_64, assert_service_contract};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_audit-sink");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_service_contract_on_vault() {
    assert_service_contract(
        BIN,
        "audit-sink",
        "engram.v1.AuditSink",
        "engram/audit",
        json!({ "hmac_key": "canary-audit-key" }),
        &[],
        |channel| async move {
            let client = engram_proto::v1::audit_sink_client::AuditSinkClient::new(channel);
            // SERVICE_STARTED is recorded once the service is ready.
            engram_testkit::poll_until(
                "SERVICE_STARTED recorded",
                std::time::Duration::from_secs(10),
                || {
                    let mut client = client.clone();
                    async move {
                        let head = client
                            .head(engram_proto::v1::HeadRequest {})
                            .await
                            .ok()?
                            .into_inner();
                        (head.sequence >= 1).then_some(())
                    }
                },
            )
            .await
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
