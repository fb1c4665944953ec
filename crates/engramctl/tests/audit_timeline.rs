//! `engramctl audit tail` and `audit export` against a real audit sink (in this process, on
//! a real OpenBao): paging through more records than one query returns, CSV and JSON, time
//! windows, and clear errors for bad times and an unreachable sink.

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{AppendBatchRequest, AppendRequest, AuditCategory};
use engram_runtime::InProcessService;
use engram_testkit::OpenBao;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_engramctl");

async fn engramctl(args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .output()
        .await
        .expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_and_export_page_through_the_trail() {
    engram_runtime::service::install_crypto_provider();
    let mut bao = OpenBao::start().await.expect("openbao");
    bao.put_secret("engram/audit", json!({ "hmac_key": "canary-audit-key" }))
        .await
        .expect("secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = InProcessService::start(
        audit_sink::SPEC,
        vec![
            ("ENGRAM_VAULT_ADDR", bao.addr()),
            ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
            ("ENGRAM_AUDIT_DIR", dir.path().display().to_string()),
        ],
        audit_sink::routes,
    )
    .await
    .expect("sink");
    let admin = sink.admin_addr;
    engram_testkit::poll_until(
        "the sink ready",
        std::time::Duration::from_secs(20),
        || async move {
            matches!(
                engram_testkit::http_get(admin, "/readyz").await,
                Ok((200, _))
            )
            .then_some(())
        },
    )
    .await
    .expect("ready");
    let addr = sink.grpc_url();
    let mut client = AuditSinkClient::connect(addr.clone())
        .await
        .expect("client");
    // 2500 records: more than the sink's 1000 per query, so export has to page.
    for batch in 0..25 {
        let events = (0..100)
            .map(|i| AppendRequest {
                event: Some(engram_runtime::audit::event(
                    "test",
                    AuditCategory::Audit,
                    "TEST_EVENT",
                    &[
                        (
                            "n",
                            engram_runtime::audit::number(f64::from(batch * 100 + i)),
                        ),
                        ("note", engram_runtime::audit::text("a, \"quoted\" value")),
                    ],
                )),
                idempotency_key: String::new(),
            })
            .collect();
        client
            .append_batch(AppendBatchRequest { events })
            .await
            .expect("append");
    }
    let head = client
        .head(engram_proto::v1::HeadRequest {})
        .await
        .expect("head")
        .into_inner()
        .sequence;
    assert!(head >= 2500);

    let (code, csv, stderr) =
        engramctl(&["audit", "export", "--addr", &addr, "--format", "csv"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("sequence,recorded_at,"));
    assert_eq!(
        rows.len() as u64,
        head + 1,
        "every record once, plus the header"
    );
    let sequences: Vec<u64> = rows[1..]
        .iter()
        .map(|r| r.split(',').next().expect("seq").parse().expect("number"))
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, no gaps or repeats"
    );
    assert!(csv.contains(r#"a, \""quoted\"" value"#), "CSV quoting");

    let (code, lines, _) = engramctl(&[
        "audit",
        "export",
        "--addr",
        &addr,
        "--since",
        "2000-01-01",
        "--until",
        "2000-01-02",
    ])
    .await;
    assert_eq!((code, lines.as_str()), (Some(0), ""), "an empty window");
    let (code, json_lines, _) =
        engramctl(&["audit", "export", "--addr", &addr, "--since", "2000-01-01"]).await;
    assert_eq!(code, Some(0));
    let first: serde_json::Value =
        serde_json::from_str(json_lines.lines().next().expect("line")).expect("json");
    assert_eq!(first["sequence"], 1);

    let (code, tail, _) = engramctl(&["audit", "tail", "--addr", &addr, "-n", "3"]).await;
    assert_eq!(code, Some(0));
    let tail: Vec<&str> = tail.lines().collect();
    assert_eq!(tail.len(), 3);
    assert!(tail[2].starts_with(&format!("#{head} ")), "{tail:?}");
    assert!(!csv.contains("canary") && !json_lines.contains("canary"));

    for (args, code, expected) in [
        (
            vec![
                "audit",
                "export",
                "--addr",
                addr.as_str(),
                "--since",
                "yesterday",
            ],
            2,
            "is not a time",
        ),
        (
            vec![
                "audit",
                "export",
                "--addr",
                addr.as_str(),
                "--since",
                "2026-12-03",
                "--until",
                "2026-12-01",
            ],
            2,
            "--until must be after --since",
        ),
        (
            vec!["audit", "tail", "--addr", "http://127.0.0.1:9"],
            1,
            "cannot reach the audit sink",
        ),
    ] {
        let (got, _, stderr) = engramctl(&args).await;
        assert_eq!(got, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    sink.stop().await;
    bao.stop().await;
}
