//! Vault behind a private CA (OpenBao's `-dev-tls`), with a real service binary: it trusts
//! that CA only through ENGRAM_VAULT_CA_FILE, and the variables vaultrs would otherwise read
//! from the environment (VAULT_SKIP_VERIFY=true, VAULT_CACERT) change nothing.

use std::time::Duration;

use engram_e2e::binary;
use engram_testkit::{OpenBao, ServiceProcess, http_get, poll_until};
use serde_json::json;

async fn sink(bao: &OpenBao, dir: &std::path::Path, extra: &[(&str, String)]) -> ServiceProcess {
    let mut env = vec![
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
        ("ENGRAM_SECRET_REFRESH_SECS", "0.5".to_owned()),
        ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0".to_owned()),
        ("ENGRAM_AUDIT_DIR", dir.display().to_string()),
        // What an operator's shell (or a copied Vault agent config) might leave behind.
        ("VAULT_SKIP_VERIFY", "true".to_owned()),
        ("VAULT_CACERT", bao.ca_file().display().to_string()),
    ];
    env.extend(extra.iter().cloned());
    let bin = binary("audit-sink").expect("audit-sink");
    ServiceProcess::spawn(bin.to_str().expect("path"), &env)
        .await
        .expect("spawn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_vault_ca_is_trusted_only_through_engram_vault_ca_file() {
    let bao = OpenBao::start_tls().await.expect("openbao over TLS");
    bao.put_secret("engram/audit", json!({ "hmac_key": "e2e-tls-only-key" }))
        .await
        .expect("write");
    let dir = tempfile::tempdir().expect("tempdir");

    // Without the CA it cannot read its secret: it stays not ready and says why.
    let mut untrusting = sink(&bao, dir.path(), &[]).await;
    let admin = untrusting.admin_addr;
    let refused = poll_until("a failed Vault read", Duration::from_secs(20), || async {
        let (_, metrics) = http_get(admin, "/metrics").await.ok()?;
        engram_testkit::metric_value(
            &metrics,
            "engram_secret_refresh_total",
            &["outcome=\"error\""],
        )
        .filter(|v| *v >= 1.0)
    })
    .await;
    let (status, body) = http_get(admin, "/readyz").await.expect("readyz");
    assert!(refused.is_ok(), "{}", untrusting.output());
    assert_eq!(status, 503, "trusted a CA it was never given: {body}");
    let _ = untrusting.terminate(Duration::from_secs(10)).await;

    // Given the CA: ready.
    let ca = bao.ca_file().display().to_string();
    let mut trusting = sink(&bao, dir.path(), &[("ENGRAM_VAULT_CA_FILE", ca)]).await;
    let admin = trusting.admin_addr;
    poll_until("/readyz 200", Duration::from_secs(20), || async {
        matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", trusting.output()));
    assert_eq!(
        trusting
            .terminate(Duration::from_secs(10))
            .await
            .ok()
            .flatten(),
        Some(0)
    );

    // The operator's tool, too: refused without the CA, a new version with it.
    let token = dir.path().join("token");
    std::fs::write(&token, bao.root_token()).expect("token");
    let rotate = |with_ca: bool| {
        let mut command = tokio::process::Command::new(binary("engramctl").expect("engramctl"));
        command
            .args(["rotate", "audit", "--generate"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ENGRAM_VAULT_ADDR", bao.addr())
            .env("ENGRAM_VAULT_TOKEN_FILE", &token)
            .env("VAULT_SKIP_VERIFY", "true");
        if with_ca {
            command.args(["--vault-ca", &bao.ca_file().display().to_string()]);
        }
        command
    };
    let refused = rotate(false).output().await.expect("run");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let rotated = rotate(true).output().await.expect("run");
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let metadata = bao
        .api(reqwest::Method::GET, "secret/metadata/engram/audit", None)
        .await
        .expect("metadata");
    assert_eq!(metadata["data"]["current_version"], 2, "{metadata}");
}
