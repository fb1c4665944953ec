//! `engramctl rotate` against a real OpenBao: a new version with the new values and today's
//! `created` date, the other fields kept, the audit key generated, and every bad input a clear
//! error (exit 2) or a Vault refusal (exit 1), with no secret ever printed.

use std::process::Stdio;

use engram_testkit::OpenBao;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_engramctl");

/// Runs `engramctl rotate ARGS` with `stdin`; returns (exit code, stdout + stderr).
async fn rotate(bao: &OpenBao, token: &str, args: &[&str], stdin: &str) -> (Option<i32>, String) {
    let mut child = tokio::process::Command::new(BIN)
        .arg("rotate")
        .args(args)
        .env_clear()
        .env("ENGRAM_VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("write");
    drop(input);
    let output = child.wait_with_output().await.expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

async fn read(bao: &OpenBao, path: &str) -> (Value, Value) {
    let data = bao
        .api(reqwest::Method::GET, &format!("secret/data/{path}"), None)
        .await
        .expect("read");
    let metadata = bao
        .api(
            reqwest::Method::GET,
            &format!("secret/metadata/{path}"),
            None,
        )
        .await
        .expect("metadata");
    (data["data"]["data"].clone(), metadata["data"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_write_a_dated_version_and_keep_the_rest() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut bao = OpenBao::start().await.expect("openbao");
    let root = bao.root_token().to_owned();
    bao.put_secret(
        "engram/exchange",
        json!({ "api_key": "canary-old-key", "api_secret": "canary-old-secret" }),
    )
    .await
    .expect("exchange");
    bao.put_secret(
        "engram/telegram",
        json!({ "bot_token": "canary-old-token", "allowed_chats": "42", "users": "42:admin", "admin_chat": "42" }),
    )
    .await
    .expect("telegram");
    bao.put_secret("engram/audit", json!({ "hmac_key": "canary-old-audit" }))
        .await
        .expect("audit");

    let new_exchange = r#"{"api_key": "canary-new-key", "ed25519_private_key": "canary-new-pem"}"#;
    let (code, output) = rotate(&bao, &root, &["exchange", "--from", "-"], new_exchange).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output
            .contains("engram/exchange: version 2 written (api_key, ed25519_private_key changed)"),
        "{output}"
    );
    assert!(!output.contains("canary"), "{output}");
    let (data, metadata) = read(&bao, "engram/exchange").await;
    assert_eq!(
        data,
        json!({ "api_key": "canary-new-key", "ed25519_private_key": "canary-new-pem" }),
        "the HMAC secret must not linger"
    );
    let created = metadata["custom_metadata"]["created"]
        .as_str()
        .expect("created")
        .to_owned();
    assert!(output.contains(&format!("created {created}")), "{output}");

    let (code, output) = rotate(
        &bao,
        &root,
        &["telegram", "--from", "-"],
        r#"{"bot_token": "canary-new-token"}"#,
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
    let (data, _) = read(&bao, "engram/telegram").await;
    assert_eq!(data["bot_token"], "canary-new-token");
    assert_eq!(data["users"], "42:admin", "the allowlist is kept");

    let (code, output) = rotate(&bao, &root, &["audit", "--generate"], "").await;
    assert_eq!(code, Some(0), "{output}");
    let (data, _) = read(&bao, "engram/audit").await;
    let key = data["hmac_key"].as_str().expect("key");
    assert_eq!(key.len(), 64);
    assert!(!output.contains(key), "the generated key was printed");
    bao.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_written() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut bao = OpenBao::start().await.expect("openbao");
    let root = bao.root_token().to_owned();
    bao.put_secret(
        "engram/exchange",
        json!({ "api_key": "canary-old-key", "api_secret": "canary-old-secret" }),
    )
    .await
    .expect("exchange");
    let cases: [(&[&str], &str, &str); 6] = [
        (
            &["exchange", "--from", "-"],
            "not json canary-x",
            "must be a JSON object",
        ),
        (
            &["exchange", "--from", "-"],
            r#"{"api_key": "canary-k"}"#,
            "exactly one of api_secret",
        ),
        (
            &["exchange", "--from", "-"],
            r#"{"api_key": "canary-k", "api_secret": ""}"#,
            "must be a non-empty string",
        ),
        (
            &["exchange", "--from", "-"],
            r#"{"withdraw": "canary-k"}"#,
            "withdraw is not a field",
        ),
        (&["exchange", "--generate"], "", "only for the audit key"),
        (
            &["exchange", "--api-key", "canary-on-argv"],
            "",
            "unexpected argument",
        ),
    ];
    for (args, stdin, expected) in cases {
        let (code, output) = rotate(&bao, &root, args, stdin).await;
        assert_eq!(code, Some(2), "{args:?}: {output}");
        assert!(output.contains(expected), "{args:?}: {output}");
        assert!(
            !output.contains("canary-k") && !output.contains("canary-x"),
            "{output}"
        );
    }
    // A token Vault does not accept: exit 1, the token not repeated.
    let (code, output) = rotate(
        &bao,
        "canary-bad-token",
        &["exchange", "--from", "-"],
        r#"{"api_key": "canary-k", "api_secret": "canary-s"}"#,
    )
    .await;
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("403"), "{output}");
    assert!(!output.contains("canary"), "{output}");
    let (data, _) = read(&bao, "engram/exchange").await;
    assert_eq!(data["api_key"], "canary-old-key", "nothing was written");
    bao.stop().await;
}
