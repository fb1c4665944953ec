//! The audit sink over gRPC on real files: appends (unary, batch, stream) with durable acks,
//! bad input, redaction, query, verify, key rotation, lifecycle records, idempotency and
//! readiness.

use std::path::Path;
use std::time::Duration;

use engram_audit::format::{CHECKPOINT_FILE, list_segments};
use engram_audit::redact::hmac_value;
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{
    Actor, AppendBatchRequest, AppendRequest, AuditCategory, AuditEvent, HeadRequest, QueryRequest,
    VerifyRequest,
};
use engram_testkit::{VaultBackedService, http_get, metric_value, poll_until};
use serde_json::json;
use tonic::transport::Channel;

mod common;
use common::records;

const BIN: &str = env!("CARGO_BIN_EXE_audit-sink");
const KEY_V1: &str = "audit-key-v1-for-tests";

async fn start(dir: &Path, extra: &[(&str, String)]) -> VaultBackedService {
    let mut env = vec![
        ("ENGRAM_AUDIT_DIR", dir.display().to_string()),
        ("ENGRAM_AUDIT_CHECKPOINT_EVERY", "5".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    VaultBackedService::start_with_env(BIN, "engram/audit", json!({ "hmac_key": KEY_V1 }), &env)
        .await
        .expect("audit sink ready")
}

async fn client(running: &VaultBackedService) -> AuditSinkClient<Channel> {
    AuditSinkClient::new(running.channel().await.expect("channel"))
}

fn event(action: &str, details: serde_json::Value) -> AuditEvent {
    let fields = match details {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                let value = match v {
                    serde_json::Value::String(s) => engram_runtime::audit::text(s),
                    serde_json::Value::Number(n) => {
                        engram_runtime::audit::number(n.as_f64().unwrap_or_default())
                    }
                    other => engram_runtime::audit::text(other.to_string()),
                };
                (k, value)
            })
            .collect(),
        _ => Default::default(),
    };
    AuditEvent {
        category: AuditCategory::Audit as i32,
        action: action.to_owned(),
        actor: Some(Actor {
            service: "exchange-signer".to_owned(),
            telegram_user_id: 42,
            telegram_chat_id: 0,
        }),
        details: Some(prost_types::Struct { fields }),
        correlation_id: "corr-1".to_owned(),
        trace_id: String::new(),
        occurred_at: None,
    }
}

fn append(event: AuditEvent) -> AppendRequest {
    AppendRequest {
        event: Some(event),
        idempotency_key: String::new(),
    }
}

async fn head_seq(client: &mut AuditSinkClient<Channel>) -> u64 {
    client
        .head(HeadRequest {})
        .await
        .expect("head")
        .into_inner()
        .sequence
}

/// A sink whose SERVICE_STARTED is already recorded, and a client.
async fn start_settled(
    dir: &Path,
    extra: &[(&str, String)],
) -> (VaultBackedService, AuditSinkClient<Channel>) {
    let running = start(dir, extra).await;
    let client = client(&running).await;
    settled(&client).await;
    (running, client)
}

/// Waits until SERVICE_STARTED is in, so tests count from a known head.
async fn settled(client: &AuditSinkClient<Channel>) -> u64 {
    poll_until("SERVICE_STARTED", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let seq = client
                .head(HeadRequest {})
                .await
                .ok()?
                .into_inner()
                .sequence;
            (seq >= 1).then_some(seq)
        }
    })
    .await
    .expect("started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_batch_and_stream_appends_are_acknowledged_in_order_and_chained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(dir.path(), &[]).await;
    let mut client = client(&running).await;
    let start_seq = settled(&client).await;

    let one = client
        .append(append(event(
            "TRADE_EXECUTED",
            json!({ "pair": "BTCUSDT" }),
        )))
        .await
        .expect("append")
        .into_inner();
    assert_eq!(one.sequence, start_seq + 1);
    assert_eq!(one.hash.len(), 64);
    assert!(one.recorded_at.is_some());

    let batch = client
        .append_batch(AppendBatchRequest {
            events: (0..3)
                .map(|i| append(event("CONFIG_CHANGED", json!({ "i": i }))))
                .collect(),
        })
        .await
        .expect("batch")
        .into_inner();
    let batch_seqs: Vec<u64> = batch.acks.iter().map(|a| a.sequence).collect();
    assert_eq!(batch_seqs, [start_seq + 2, start_seq + 3, start_seq + 4]);

    let outgoing =
        futures::stream::iter((0..50).map(|i| append(event("ORDER_REQUESTED", json!({ "i": i })))));
    let mut acks = client
        .append_stream(outgoing)
        .await
        .expect("stream")
        .into_inner();
    let mut stream_seqs = Vec::new();
    while let Some(ack) = acks.message().await.expect("ack") {
        stream_seqs.push(ack.sequence);
    }
    assert_eq!(
        stream_seqs,
        ((start_seq + 5)..(start_seq + 55)).collect::<Vec<_>>(),
        "one ack per event, in order"
    );
    assert_eq!(head_seq(&mut client).await, start_seq + 54);

    // On disk: one JSON line per record, gap-free, each chained to the one before.
    let on_disk = records(dir.path());
    assert_eq!(on_disk.len() as u64, start_seq + 54);
    for pair in on_disk.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert_eq!(on_disk[start_seq as usize].hash, one.hash);
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_get_invalid_argument_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(dir.path(), &[]).await;
    let mut client = client(&running).await;
    let before = settled(&client).await;

    let good = event("TRADE_EXECUTED", json!({ "pair": "BTCUSDT" }));
    let mut cases: Vec<(&str, AppendRequest)> = Vec::new();
    cases.push((
        "event is required",
        AppendRequest {
            event: None,
            idempotency_key: String::new(),
        },
    ));
    let mut e = good.clone();
    e.category = 0;
    cases.push(("category", append(e)));
    let mut e = good.clone();
    e.category = 99;
    cases.push(("category", append(e)));
    for action in [
        "",
        "lower_case",
        "HAS SPACE",
        "1STARTS_WITH_DIGIT",
        &"A".repeat(65),
    ] {
        let mut e = good.clone();
        e.action = action.to_owned();
        cases.push(("action", append(e)));
    }
    let mut e = good.clone();
    e.actor = None;
    cases.push(("actor", append(e)));
    let mut e = good.clone();
    e.actor = Some(Actor {
        service: "Bad Service!".to_owned(),
        ..Actor::default()
    });
    cases.push(("actor.service", append(e)));
    let mut e = good.clone();
    e.trace_id = "not-hex".to_owned();
    cases.push(("trace_id", append(e)));
    let mut e = good.clone();
    e.correlation_id = "x".repeat(129);
    cases.push(("correlation_id", append(e)));
    let mut e = good.clone();
    e.occurred_at = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: -5,
    });
    cases.push(("occurred_at", append(e)));
    let mut e = good.clone();
    e.details = Some(prost_types::Struct {
        fields: [("n".to_owned(), engram_runtime::audit::number(f64::INFINITY))]
            .into_iter()
            .collect(),
    });
    cases.push(("details", append(e)));
    let mut e = good.clone();
    e.details = Some(prost_types::Struct {
        fields: [(
            "blob".to_owned(),
            engram_runtime::audit::text("x".repeat(70 * 1024)),
        )]
        .into_iter()
        .collect(),
    });
    cases.push(("over the 65536-byte limit", append(e)));
    cases.push((
        "idempotency_key",
        AppendRequest {
            event: Some(good.clone()),
            idempotency_key: "key with spaces".to_owned(),
        },
    ));

    for (expected, request) in cases {
        let status = client.append(request).await.expect_err(expected);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{expected}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "{expected}: {}",
            status.message()
        );
    }
    // A batch with one bad event is refused whole, naming the index.
    let mut bad = good.clone();
    bad.action = "bad".to_owned();
    let status = client
        .append_batch(AppendBatchRequest {
            events: vec![append(good.clone()), append(bad)],
        })
        .await
        .expect_err("bad batch");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("events[1]"),
        "{}",
        status.message()
    );
    let status = client
        .append_batch(AppendBatchRequest { events: vec![] })
        .await
        .expect_err("empty batch");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    assert_eq!(head_seq(&mut client).await, before, "nothing was written");
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_details_are_stored_as_hmacs_that_can_be_matched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (running, mut client) = start_settled(dir.path(), &[]).await;
    client
        .append(append(event(
            "SECRET_ROTATED",
            json!({ "api_key": "canary-sk-live-123", "pair": "BTCUSDT" }),
        )))
        .await
        .expect("append");
    let text: String = list_segments(dir.path())
        .expect("segments")
        .into_iter()
        .map(|(_, p)| std::fs::read_to_string(p).expect("read"))
        .collect();
    assert!(
        !text.contains("canary-sk-live-123"),
        "the value is not stored"
    );
    let expected = hmac_value(KEY_V1.as_bytes(), &json!("canary-sk-live-123"));
    assert!(
        text.contains(&expected),
        "the stored HMAC matches the known value"
    );
    assert!(
        text.contains("\"pair\":\"BTCUSDT\""),
        "ordinary fields stay readable"
    );
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_by_action_category_actor_time_and_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (running, mut client) = start_settled(dir.path(), &[]).await;
    for i in 0..5 {
        client
            .append(append(event("TRADE_EXECUTED", json!({ "i": i }))))
            .await
            .expect("append");
    }
    let mut denied = event("AUTH_DENIED", json!({ "chat": 1 }));
    denied.category = AuditCategory::Security as i32;
    denied.actor = Some(Actor {
        service: "telegram-gateway".to_owned(),
        telegram_user_id: 99,
        telegram_chat_id: 1,
    });
    client.append(append(denied)).await.expect("append");

    async fn run(
        client: &mut AuditSinkClient<Channel>,
        request: QueryRequest,
    ) -> Vec<engram_proto::v1::AuditRecord> {
        let mut stream = client.query(request).await.expect("query").into_inner();
        let mut out = Vec::new();
        while let Some(record) = stream.message().await.expect("record") {
            out.push(record);
        }
        out
    }
    let trades = run(
        &mut client,
        QueryRequest {
            action: "TRADE_EXECUTED".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(trades.len(), 5);
    assert!(
        trades.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "oldest first"
    );

    let last_two = run(
        &mut client,
        QueryRequest {
            action: "TRADE_EXECUTED".to_owned(),
            limit: 2,
            newest_first: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(last_two.len(), 2);
    assert_eq!(last_two[0].sequence, trades[4].sequence, "newest first");

    let security = run(
        &mut client,
        QueryRequest {
            category: AuditCategory::Security as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(security.len(), 1);
    assert_eq!(security[0].action, "AUTH_DENIED");
    let by_user = run(
        &mut client,
        QueryRequest {
            actor_telegram_user_id: 99,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_user.len(), 1);
    let by_service = run(
        &mut client,
        QueryRequest {
            actor_service: "telegram-gateway".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_service.len(), 1);
    let future =
        prost_types::Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(3600));
    assert!(
        run(
            &mut client,
            QueryRequest {
                since: Some(future),
                ..Default::default()
            }
        )
        .await
        .is_empty()
    );

    for bad in [
        QueryRequest {
            limit: 1001,
            ..Default::default()
        },
        QueryRequest {
            action: "not an action".to_owned(),
            ..Default::default()
        },
        QueryRequest {
            category: 42,
            ..Default::default()
        },
        QueryRequest {
            since: Some(future),
            until: Some(future),
            ..Default::default()
        },
    ] {
        let status = client.query(bad).await.expect_err("bad query");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_and_then_names_an_edited_record_and_counts_the_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (running, mut client) = start_settled(dir.path(), &[]).await;
    for i in 0..12 {
        client
            .append(append(event(
                "TRADE_EXECUTED",
                json!({ "amount": format!("0.0{i}") }),
            )))
            .await
            .expect("append");
    }
    let report = client
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok, "{report:?}");
    assert!(report.checkpoints_checked >= 2, "{report:?}");

    // Edit one byte of one record.
    let (_, path) = list_segments(dir.path())
        .expect("segments")
        .pop()
        .expect("a segment");
    let text = std::fs::read_to_string(&path).expect("read");
    let edited = text.replacen("0.05", "0.95", 1);
    assert_ne!(text, edited);
    std::fs::write(&path, edited).expect("tamper");
    let report = client
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(!report.ok);
    assert_eq!(
        report.first_bad_sequence,
        records(dir.path())
            .iter()
            .find(|r| r.compute_hash() != r.hash)
            .map(|r| r.seq)
            .expect("edited record")
    );
    let (_, metrics) = http_get(running.service.admin_addr, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(
        metric_value(&metrics, "engram_audit_verify_failures_total", &[]),
        Some(1.0)
    );
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_audit_key_starts_a_new_version_and_verification_spans_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (running, mut client) = start_settled(dir.path(), &[]).await;
    for i in 0..6 {
        client
            .append(append(event("TRADE_EXECUTED", json!({ "i": i }))))
            .await
            .expect("append");
    }
    running
        .bao
        .put_secret(
            "engram/audit",
            json!({ "hmac_key": "audit-key-v2-for-tests" }),
        )
        .await
        .expect("rotate");
    let admin = running.service.admin_addr;
    poll_until(
        "key version 2 in use",
        Duration::from_secs(10),
        || async move {
            let text = http_get(admin, "/metrics").await.ok()?.1;
            (metric_value(&text, "engram_secret_version", &["engram/audit"]) == Some(2.0))
                .then_some(())
        },
    )
    .await
    .expect("rotated");
    for i in 0..6 {
        client
            .append(append(event(
                "TRADE_EXECUTED",
                json!({ "api_key": format!("k{i}") }),
            )))
            .await
            .expect("append");
    }
    let all = records(dir.path());
    let versions: std::collections::BTreeSet<u64> = all.iter().map(|r| r.key_version).collect();
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), [1, 2]);
    let last = all.last().expect("records");
    assert_eq!(
        last.details["api_key"],
        json!(hmac_value(b"audit-key-v2-for-tests", &json!("k5")))
    );
    let checkpoints =
        std::fs::read_to_string(dir.path().join(CHECKPOINT_FILE)).expect("checkpoints");
    assert!(
        checkpoints.contains("\"key_version\":1") && checkpoints.contains("\"key_version\":2"),
        "{checkpoints}"
    );

    let report = client
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok, "{report:?}");
    // Offline, with both keys, every signature checks out too.
    let offline = engram_audit::verify::verify_dir(dir.path(), &|v| match v {
        1 => Some(KEY_V1.as_bytes().to_vec()),
        2 => Some(b"audit-key-v2-for-tests".to_vec()),
        _ => None,
    })
    .expect("verify");
    assert!(
        offline.ok && offline.signatures_unchecked == 0,
        "{offline:?}"
    );
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_records_and_a_final_checkpoint_survive_a_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(
        dir.path(),
        &[("ENGRAM_AUDIT_CHECKPOINT_EVERY", "1000".to_owned())],
    )
    .await;
    let client = client(&running).await;
    settled(&client).await;
    running.stop().await.expect("clean stop");

    let all = records(dir.path());
    assert_eq!(
        all.first().map(|r| r.action.as_str()),
        Some("SERVICE_STARTED")
    );
    assert_eq!(
        all.last().map(|r| r.action.as_str()),
        Some("SERVICE_STOPPED")
    );
    let started = &all[0];
    assert_eq!(started.details["secret_version"], json!(1.0));
    assert_eq!(started.details["secret_path"], json!("engram/audit"));
    assert!(
        !serde_json::to_string(started)
            .expect("json")
            .contains(KEY_V1),
        "versions, never values"
    );
    // The final checkpoint vouches for the very last record.
    let report =
        engram_audit::verify::verify_dir(dir.path(), &|_| Some(KEY_V1.as_bytes().to_vec()))
            .expect("verify");
    assert!(report.ok && report.checkpoints_checked >= 1, "{report:?}");
    let last_checkpoint =
        std::fs::read_to_string(dir.path().join(CHECKPOINT_FILE)).expect("checkpoints");
    assert!(
        last_checkpoint.contains(&format!("\"seq\":{}", all.len())),
        "{last_checkpoint}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_records_once_even_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (running, mut client) = start_settled(dir.path(), &[]).await;
    let request = AppendRequest {
        event: Some(event("ORDER_REQUESTED", json!({ "n": 1 }))),
        idempotency_key: "nonce-123".to_owned(),
    };
    let first = client
        .append(request.clone())
        .await
        .expect("first")
        .into_inner();
    let again = client
        .append(request.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first, again, "a retry gets the first acknowledgement");
    let bao = running.bao;
    let mut service = running.service;
    assert_eq!(
        service
            .terminate(Duration::from_secs(15))
            .await
            .expect("stop"),
        Some(0)
    );

    let restarted = engram_testkit::ServiceProcess::spawn(
        BIN,
        &[
            ("ENGRAM_VAULT_ADDR", bao.addr()),
            ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
            ("ENGRAM_AUDIT_DIR", dir.path().display().to_string()),
        ],
    )
    .await
    .expect("restart");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", restarted.grpc_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
    let mut client = AuditSinkClient::new(channel);
    let after_restart = client
        .append(request)
        .await
        .expect("retry after restart")
        .into_inner();
    assert_eq!(after_restart.sequence, first.sequence);
    assert_eq!(
        records(dir.path())
            .iter()
            .filter(|r| r.idempotency_key == "nonce-123")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_the_directory_cannot_be_written() {
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("audit");
    let running = start(&dir, &[]).await;
    // The volume goes away under the running service.
    std::fs::remove_dir_all(&dir).expect("remove");
    let admin = running.service.admin_addr;
    let body = poll_until("/readyz 503", Duration::from_secs(10), || async move {
        match http_get(admin, "/readyz").await {
            Ok((503, body)) => Some(body),
            _ => None,
        }
    })
    .await
    .expect("not ready");
    assert!(body.contains("not writable"), "{body}");
    // And an append now fails as UNAVAILABLE rather than pretending.
    let mut client = client(&running).await;
    let status = client
        .append(append(event("TRADE_EXECUTED", json!({}))))
        .await
        .expect_err("cannot write");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_verifies_itself_periodically_and_reports_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (running, mut client) = start_settled(
        dir.path(),
        &[("ENGRAM_AUDIT_VERIFY_INTERVAL_SECS", "0.3".to_owned())],
    )
    .await;
    client
        .append(append(event(
            "CONFIG_CHANGED",
            json!({ "setting": "max_position_size" }),
        )))
        .await
        .expect("append");
    let (_, path) = list_segments(dir.path())
        .expect("segments")
        .pop()
        .expect("segment");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(
        &path,
        text.replace("max_position_size", "max_position_sizf"),
    )
    .expect("tamper");

    let admin = running.service.admin_addr;
    poll_until(
        "a verify failure counted",
        Duration::from_secs(10),
        || async move {
            let text = http_get(admin, "/metrics").await.ok()?.1;
            (metric_value(&text, "engram_audit_verify_failures_total", &[]).unwrap_or(0.0) >= 1.0)
                .then_some(())
        },
    )
    .await
    .expect("tampering noticed without a Verify call");
    let output = running.stop().await.expect("stop");
    assert!(
        output.contains("AUDIT VERIFY FAILED"),
        "logged as a security event"
    );
}
