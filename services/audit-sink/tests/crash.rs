//! Crashes and faults on real files: a SIGKILL under load loses no acknowledged record, a torn
//! tail is cut at restart, and a write that fails (the file-size limit, as a full disk would)
//! answers UNAVAILABLE and leaves no half record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use engram_audit::format::list_segments;
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{
    Actor, AppendRequest, AuditCategory, AuditEvent, HeadRequest, VerifyRequest,
};
use engram_testkit::{OpenBao, ServiceProcess, poll_until};
use serde_json::json;
use tonic::transport::Channel;

mod common;
use common::records;

const BIN: &str = env!("CARGO_BIN_EXE_audit-sink");

fn request(i: u64, payload: usize) -> AppendRequest {
    AppendRequest {
        event: Some(AuditEvent {
            category: AuditCategory::Audit as i32,
            action: "ORDER_REQUESTED".to_owned(),
            actor: Some(Actor {
                service: "exchange-signer".to_owned(),
                ..Actor::default()
            }),
            details: Some(prost_types::Struct {
                fields: [
                    ("i".to_owned(), engram_runtime::audit::number(i as f64)),
                    (
                        "pad".to_owned(),
                        engram_runtime::audit::text("x".repeat(payload)),
                    ),
                ]
                .into_iter()
                .collect(),
            }),
            correlation_id: format!("c-{i}"),
            trace_id: String::new(),
            occurred_at: None,
        }),
        idempotency_key: String::new(),
    }
}

async fn spawn(
    bao: &OpenBao,
    dir: &std::path::Path,
    wrapper: &[&str],
) -> (ServiceProcess, AuditSinkClient<Channel>) {
    let service = ServiceProcess::spawn_wrapped(
        wrapper,
        BIN,
        &[
            ("ENGRAM_VAULT_ADDR", bao.addr()),
            ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
            ("ENGRAM_AUDIT_DIR", dir.display().to_string()),
            ("ENGRAM_AUDIT_CHECKPOINT_EVERY", "500".to_owned()),
            ("ENGRAM_AUDIT_SEGMENT_MAX_BYTES", "262144".to_owned()),
            ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0".to_owned()),
        ],
    )
    .await
    .expect("spawn");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let client = AuditSinkClient::new(channel);
    let admin = service.admin_addr;
    poll_until("ready", Duration::from_secs(20), || async move {
        matches!(
            engram_testkit::http_get(admin, "/readyz").await,
            Ok((200, _))
        )
        .then_some(())
    })
    .await
    .expect("ready");
    (service, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_record() {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret("engram/audit", json!({ "hmac_key": "crash-test-key" }))
        .await
        .expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut service, client) = spawn(&bao, dir.path(), &[]).await;

    // 16 clients append as fast as they can; every acknowledgement is remembered.
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let mut client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                match client.append(request(w * 1_000_000 + i, 200)).await {
                    Ok(ack) => {
                        let ack = ack.into_inner();
                        acked.lock().expect("lock").push((ack.sequence, ack.hash));
                    }
                    Err(_) => return, // the sink died
                }
            }
        }));
    }
    poll_until("2000 acknowledged appends", Duration::from_secs(60), || {
        let acked = acked.clone();
        async move { (acked.lock().expect("lock").len() >= 2000).then_some(()) }
    })
    .await
    .expect("load");
    service.kill_hard().await.expect("SIGKILL");
    for writer in writers {
        let _ = writer.await;
    }
    let acked = acked.lock().expect("lock").clone();

    // A crash mid-write can leave a torn line: add one, as the kernel might have.
    let (_, last) = list_segments(dir.path())
        .expect("segments")
        .pop()
        .expect("segment");
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open");
    std::io::Write::write_all(&mut torn, b"{\"seq\":999999,\"ts\":\"2026-").expect("torn write");
    drop(torn);

    let (service, mut client) = spawn(&bao, dir.path(), &[]).await;
    let records = records(dir.path());
    let by_seq: std::collections::HashMap<u64, &str> =
        records.iter().map(|r| (r.seq, r.hash.as_str())).collect();
    for (seq, hash) in &acked {
        assert_eq!(
            by_seq.get(seq).copied(),
            Some(hash.as_str()),
            "acknowledged record {seq} survived the crash"
        );
    }
    let report = client
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok, "{report:?}");
    assert!(
        service.output().contains("cut a torn"),
        "the torn tail is reported"
    );
    let head = client
        .head(HeadRequest {})
        .await
        .expect("head")
        .into_inner();
    assert!(head.sequence >= acked.iter().map(|(s, _)| *s).max().unwrap_or(0));
    assert!(
        head.segment_count >= 2,
        "the load crossed segment boundaries: {head:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_answers_unavailable_and_leaves_no_half_record() {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret("engram/audit", json!({ "hmac_key": "fault-test-key" }))
        .await
        .expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    // Files may not grow past 64 KiB: writes beyond fail with EFBIG, as on a full disk.
    let (service, mut client) = spawn(&bao, dir.path(), &["prlimit", "--fsize=65536"]).await;
    let mut last_ok = None;
    let mut failure = None;
    for i in 0..1000 {
        match client.append(request(i, 1000)).await {
            Ok(ack) => last_ok = Some(ack.into_inner()),
            Err(status) => {
                failure = Some(status);
                break;
            }
        }
    }
    let status = failure.expect("the size limit is reached");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let last_ok = last_ok.expect("some appends fit");

    // Nothing of the failed append is on disk; the chain ends at the last acknowledged record.
    let records = records(dir.path());
    assert_eq!(
        records.last().map(|r| (r.seq, r.hash.clone())),
        Some((last_ok.sequence, last_ok.hash.clone()))
    );
    let report = client
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok, "{report:?}");
    assert!(
        service.output().contains("audit write failed"),
        "logged as a security event"
    );
    let (_, metrics) = engram_testkit::http_get(service.admin_addr, "/metrics")
        .await
        .expect("metrics");
    assert!(
        engram_testkit::metric_value(&metrics, "engram_audit_write_failures_total", &[])
            .unwrap_or(0.0)
            >= 1.0
    );
}
