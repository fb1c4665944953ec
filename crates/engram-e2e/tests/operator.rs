//! The operator's tool against the running stack: `engramctl doctor` passes a healthy stack
//! and names the check that fails on a stale key; `engramctl incident` halts trading, exports
//! the timeline and revokes the services' Vault credentials; neither prints a secret.

use std::time::Duration;

use engram_e2e::{AUDIT_KEY, BOT_TOKEN, EXCHANGE_SECRET, Options, Stack, TRADER, binary};
use engram_testkit::{http_get, poll_until, repo_root};
use serde_json::json;

struct Operator {
    dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
}

/// The operator's certificate (spiffe://engram/engramctl) and Vault token, in files.
async fn operator(stack: &Stack) -> Operator {
    let dir = tempfile::tempdir().expect("tempdir");
    let issued = stack
        .bao
        .issue("pki", "engramctl", 24 * 3600)
        .await
        .expect("issue");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let env = vec![
        ("ENGRAM_VAULT_ADDR", stack.bao.addr()),
        (
            "ENGRAM_VAULT_TOKEN_FILE",
            file("token", stack.bao.root_token()),
        ),
        ("ENGRAM_TLS_CERT_FILE", file("op.crt", &issued.chain)),
        ("ENGRAM_TLS_KEY_FILE", file("op.key", &issued.key)),
        ("ENGRAM_TLS_CA_FILE", file("ca.crt", &issued.ca)),
        (
            "ENGRAM_SIGNER_ADDR",
            format!("https://{}", stack.signer.grpc_addr),
        ),
        (
            "ENGRAM_AUDIT_ADDR",
            format!("https://{}", stack.audit.grpc_addr),
        ),
    ];
    Operator { dir, env }
}

impl Operator {
    async fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let output = tokio::process::Command::new(binary("engramctl").expect("engramctl"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .await
            .expect("run engramctl");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        for canary in [BOT_TOKEN, EXCHANGE_SECRET, AUDIT_KEY] {
            assert!(
                !stdout.contains(canary) && !stderr.contains(canary),
                "a secret printed"
            );
        }
        (output.status.code(), stdout, stderr)
    }
}

fn admin_urls(stack: &Stack) -> String {
    [&stack.gateway, &stack.signer, &stack.advisor, &stack.audit]
        .iter()
        .map(|s| format!("http://{}", s.admin_addr))
        .collect::<Vec<_>>()
        .join(",")
}

fn status_of<'a>(report: &'a serde_json::Value, check: &str) -> &'a str {
    report
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["check"] == check))
        .and_then(|r| r["status"].as_str())
        .unwrap_or("missing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_healthy_stack_and_names_a_stale_key() {
    let stack = Stack::start(Options::default()).await.expect("stack");
    let op = operator(&stack).await;
    let repo = repo_root().display().to_string();
    let admin = admin_urls(&stack);
    let args = ["doctor", "--admin", &admin, "--repo", &repo, "--json"];
    let (code, stdout, stderr) = op.run(&args).await;
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
    assert_eq!(code, Some(0), "{report:#}\n{stderr}");
    let rows = report.as_array().expect("rows");
    assert_eq!(rows.len(), 17, "{report:#}");
    assert!(rows.iter().all(|r| r["status"] == "PASS"), "{report:#}");

    // A key created long ago fails its check, and doctor says so with exit 1.
    stack
        .bao
        .put_custom_metadata("engram/exchange", json!({ "created": "2020-01-01" }))
        .await
        .expect("metadata");
    let (code, stdout, _) = op.run(&args).await;
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
    assert_eq!(code, Some(1));
    assert_eq!(
        status_of(&report, "engram/exchange younger than 90 days"),
        "FAIL"
    );
    assert_eq!(
        status_of(&report, "engram/audit younger than 90 days"),
        "PASS"
    );
    let (code, table, _) = op.run(&args[..5]).await;
    assert_eq!(code, Some(1));
    assert!(
        table.contains("FAIL") && table.contains("rotate it"),
        "{table}"
    );

    // Without Vault's token file or a reachable signer: clear failures, not a crash.
    let (code, _, stderr) = op
        .run(&["doctor", "--token-file", "/nonexistent/token"])
        .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read the Vault token file"),
        "{stderr}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_halts_exports_and_revokes() {
    let stack = Stack::start(Options::default()).await.expect("stack");
    let outcome = stack
        .trade(TRADER, "/buy BTCUSDT 0.001")
        .await
        .expect("trade");
    assert!(outcome.contains("Order placed"), "{outcome}");
    let op = operator(&stack).await;
    let out = op.dir.path().join("timeline.jsonl").display().to_string();

    for (args, expected) in [
        (
            vec!["incident", "--reason", " "],
            "--reason must be 1 to 200",
        ),
        (
            vec!["incident", "--reason", "x", "--revoke", "everything"],
            "--revoke everything",
        ),
        (
            vec!["incident", "--reason", "x", "--since", "last tuesday"],
            "is not a time",
        ),
    ] {
        let (code, _, stderr) = op.run(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    let (code, stdout, stderr) = op
        .run(&[
            "incident",
            "--reason",
            "e2e drill: key leak suspected",
            "--revoke",
            "token",
            "--out",
            &out,
        ])
        .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for step in [
        "[done] halt trading: trading halted",
        "[done] export the audit timeline",
        "[done] revoke the services' Vault credentials: token: every login token revoked",
        "Still to do:",
    ] {
        assert!(stdout.contains(step), "{stdout}");
    }
    let timeline = std::fs::read_to_string(&out).expect("timeline written");
    for action in ["ORDER_PLACED", "TRADING_HALTED"] {
        assert!(timeline.contains(action), "{timeline}");
    }
    // The export never overwrites.
    let (code, stdout, _) = op
        .run(&[
            "incident", "--reason", "again", "--revoke", "token", "--out", &out,
        ])
        .await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("[FAILED] export the audit timeline: cannot create"),
        "{stdout}"
    );

    // Trading is halted: a confirmed order is refused, nothing reaches the exchange.
    let before = stack.exchange.order_count();
    let refused = stack
        .trade(TRADER, "/buy BTCUSDT 0.001")
        .await
        .expect("trade answer");
    assert!(refused.to_lowercase().contains("halt"), "{refused}");
    assert_eq!(stack.exchange.order_count(), before);
    // The services' Vault tokens are gone: they serve from memory and say Vault refuses.
    let admin = stack.signer.admin_addr;
    poll_until(
        "the signer notices",
        Duration::from_secs(20),
        || async move {
            let (_, body) = http_get(admin, "/readyz").await.ok()?;
            body.contains("refusing").then_some(())
        },
    )
    .await
    .expect("Vault refuses the revoked token");
    stack.stop().await;
}
