//! The runtime against a real OpenBao dev server: readiness, rotation, Vault outages,
//! AppRole with renewal and re-login, and the per-service policies in deploy/vault.

use std::time::Duration;

use engram_proto::v1::audit_sink_server::{AuditSink, AuditSinkServer};
use engram_runtime::config::MapSource;
use engram_runtime::{Application, RuntimeConfig, ServiceSpec};
use engram_testkit::{OpenBao, http_get, metric_value, poll_until};
use reqwest::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

const PATH: &str = "engram/test";

const SPEC: ServiceSpec = ServiceSpec {
    name: "runtime-test",
    version: "0.0.0",
    grpc_service: "engram.v1.AuditSink",
    secret_path: PATH,
    required_secret_fields: &["hmac_key"],
    default_grpc_port: 0,
    default_admin_port: 0,
};

struct Stub;
impl AuditSink for Stub {}

struct Running {
    admin: std::net::SocketAddr,
    context: engram_runtime::ServiceContext,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops within the grace period")
            .expect("task not panicked");
        result.expect("clean shutdown");
    }

    async fn readyz(&self) -> (u16, serde_json::Value) {
        let (status, body) = http_get(self.admin, "/readyz").await.expect("readyz");
        (status, serde_json::from_str(&body).expect("json"))
    }

    async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.expect("metrics").1
    }
}

async fn start(vars: &[(&str, String)]) -> Running {
    let mut pairs = vec![
        ("ENGRAM_GRPC_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("ENGRAM_ADMIN_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("ENGRAM_SECRET_REFRESH_SECS".to_owned(), "0.5".to_owned()),
        ("ENGRAM_SHUTDOWN_GRACE_SECS".to_owned(), "5".to_owned()),
        ("ENGRAM_TLS_MODE".to_owned(), "off".to_owned()),
    ];
    pairs.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let env = MapSource::from_pairs(pairs);
    let config = RuntimeConfig::load(&SPEC, &env).expect("valid config");
    let app = Application::build(SPEC, config, |_| {
        Ok(Routes::new(AuditSinkServer::new(Stub)))
    })
    .await
    .expect("builds");
    let admin = app.admin_addr();
    let context = app.context().clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    Running {
        admin,
        context,
        shutdown,
        task,
    }
}

fn token_env(bao: &OpenBao) -> Vec<(&'static str, String)> {
    vec![
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
    ]
}

async fn wait_ready(running: &Running, deadline: Duration) {
    poll_until("/readyz 200", deadline, || async {
        (running.readyz().await.0 == 200).then_some(())
    })
    .await
    .expect("becomes ready");
}

async fn wait_metric(
    running: &Running,
    metric: &str,
    labels: &[&str],
    predicate: impl Fn(f64) -> bool,
    deadline: Duration,
) {
    let what = format!("{metric}{labels:?}");
    poll_until(&what, deadline, || async {
        let text = running.metrics().await;
        metric_value(&text, metric, labels)
            .filter(|v| predicate(*v))
            .map(|_| ())
    })
    .await
    .expect("metric reaches the expected value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_200_only_after_the_secret_is_read() {
    let bao = OpenBao::start().await.expect("openbao");
    let running = start(&token_env(&bao)).await;

    // Nothing stored yet: not ready, and the reason names the path.
    let (status, body) = running.readyz().await;
    assert_eq!(status, 503);
    assert!(body["reasons"].to_string().contains(PATH), "{body}");

    // A version missing a required field is refused, not half-loaded.
    bao.put_secret(PATH, json!({ "other": "x" }))
        .await
        .expect("write");
    wait_metric(
        &running,
        "engram_secret_refresh_total",
        &["outcome=\"invalid\""],
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(running.readyz().await.0, 503);

    bao.put_secret(PATH, json!({ "hmac_key": "k1" }))
        .await
        .expect("write");
    wait_ready(&running, Duration::from_secs(10)).await;
    assert_eq!(
        running.context.secrets.current().map(|b| b.version()),
        Some(2)
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_is_used_within_two_refresh_intervals_without_restart() {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret(PATH, json!({ "hmac_key": "canary-v1-8c1f" }))
        .await
        .expect("write");
    bao.put_custom_metadata(PATH, json!({ "created": "2026-11-01" }))
        .await
        .expect("metadata");
    let running = start(&token_env(&bao)).await;
    wait_ready(&running, Duration::from_secs(10)).await;
    let mut updates = running.context.secrets.subscribe();
    updates.borrow_and_update();

    bao.put_secret(PATH, json!({ "hmac_key": "canary-v2-51ab" }))
        .await
        .expect("write v2");
    // Refresh interval is 0.5 s: the new version must be in use within two intervals (1 s);
    // the subscriber is told. One more second of margin covers this noisy 2-core machine.
    tokio::time::timeout(Duration::from_secs(2), updates.changed())
        .await
        .expect("subscriber told within two intervals")
        .expect("channel open");
    let current = running.context.secrets.current().expect("loaded");
    assert_eq!(current.version(), 2);
    use secrecy::ExposeSecret;
    assert_eq!(
        current
            .field("hmac_key")
            .map(|s| s.expose_secret().to_owned())
            .as_deref(),
        Some("canary-v2-51ab")
    );

    let metrics = running.metrics().await;
    assert_eq!(
        metric_value(&metrics, "engram_secret_version", &[PATH]),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&metrics, "engram_secret_rotations_total", &[PATH]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "engram_secret_created_timestamp_seconds", &[PATH]),
        Some(1_793_491_200.0)
    );
    assert!(!metrics.contains("canary-v"), "no value in metrics");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_last_good_secret_while_vault_is_down_and_recovers() {
    let mut bao = OpenBao::start().await.expect("openbao");
    bao.put_secret(PATH, json!({ "hmac_key": "kept" }))
        .await
        .expect("write");
    let running = start(&token_env(&bao)).await;
    wait_ready(&running, Duration::from_secs(10)).await;

    bao.stop().await;
    wait_metric(
        &running,
        "engram_secret_source_up",
        &["vault"],
        |v| v == 0.0,
        Duration::from_secs(10),
    )
    .await;
    let (status, body) = running.readyz().await;
    assert_eq!(
        status, 200,
        "still serving with the last good secret: {body}"
    );
    assert!(
        body["warnings"].to_string().contains("vault unreachable"),
        "{body}"
    );
    assert_eq!(
        running.context.secrets.current().map(|b| b.version()),
        Some(1)
    );

    // The dev server comes back empty; the operator (here the test) writes the secret again.
    bao.launch().await.expect("restart");
    bao.put_secret(PATH, json!({ "hmac_key": "kept" }))
        .await
        .expect("write");
    wait_metric(
        &running,
        "engram_secret_source_up",
        &["vault"],
        |v| v == 1.0,
        Duration::from_secs(10),
    )
    .await;
    poll_until("warnings to clear", Duration::from_secs(10), || async {
        running.readyz().await.1["warnings"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await
    .expect("recovers");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_without_vault_retries_and_stays_not_ready_until_it_appears() {
    let mut bao = OpenBao::unstarted().expect("ports");
    let running = start(&token_env(&bao)).await;
    // Several failed attempts (backoff starts at 0.2 s), and not ready meanwhile.
    wait_metric(
        &running,
        "engram_secret_refresh_total",
        &["outcome=\"error\""],
        |v| v >= 2.0,
        Duration::from_secs(10),
    )
    .await;
    let (status, body) = running.readyz().await;
    assert_eq!(status, 503);
    assert!(
        body["reasons"].to_string().contains("unreachable"),
        "{body}"
    );

    bao.launch().await.expect("start late");
    bao.put_secret(PATH, json!({ "hmac_key": "late" }))
        .await
        .expect("write");
    wait_ready(&running, Duration::from_secs(15)).await;
    running.stop().await;
}

/// The `runtime-test` policy: read the test path's data and metadata, as a service's would.
async fn write_test_policy(bao: &OpenBao) {
    let policy = format!(
        "path \"secret/data/{PATH}\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{PATH}\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.api(
        Method::PUT,
        "sys/policies/acl/runtime-test",
        Some(json!({ "policy": policy })),
    )
    .await
    .expect("policy");
}

async fn setup_approle(bao: &OpenBao, ttl: &str) -> (String, String) {
    bao.api(
        Method::POST,
        "sys/auth/approle",
        Some(json!({ "type": "approle" })),
    )
    .await
    .expect("enable approle");
    write_test_policy(bao).await;
    bao.api(
        Method::POST,
        "auth/approle/role/runtime-test",
        Some(
            json!({ "token_policies": ["runtime-test"], "token_ttl": ttl, "token_max_ttl": "10m" }),
        ),
    )
    .await
    .expect("role");
    let role_id = bao
        .api(Method::GET, "auth/approle/role/runtime-test/role-id", None)
        .await
        .expect("role id");
    let secret_id = bao
        .api(
            Method::POST,
            "auth/approle/role/runtime-test/secret-id",
            None,
        )
        .await
        .expect("secret id");
    (
        role_id["data"]["role_id"]
            .as_str()
            .expect("role_id")
            .to_owned(),
        secret_id["data"]["secret_id"]
            .as_str()
            .expect("secret_id")
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_login_renews_before_expiry_and_logs_in_again_after_revocation() {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret(PATH, json!({ "hmac_key": "k" }))
        .await
        .expect("write");
    let (role_id, secret_id) = setup_approle(&bao, "3s").await;
    let running = start(&[
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_AUTH", "approle".to_owned()),
        ("ENGRAM_VAULT_ROLE_ID", role_id),
        ("ENGRAM_VAULT_SECRET_ID", secret_id),
    ])
    .await;
    wait_ready(&running, Duration::from_secs(10)).await;

    // A 3 s token is renewed at two thirds of its life, well before it expires.
    wait_metric(
        &running,
        "engram_vault_token_renewals_total",
        &["success"],
        |v| v >= 2.0,
        Duration::from_secs(15),
    )
    .await;
    let metrics = running.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "engram_vault_logins_total",
            &["approle", "success"]
        ),
        Some(1.0)
    );

    // Revoke every AppRole token behind the service's back.
    let accessors = bao
        .api(
            Method::from_bytes(b"LIST").expect("method"),
            "auth/token/accessors",
            None,
        )
        .await
        .expect("accessors");
    for accessor in accessors["data"]["keys"].as_array().expect("keys") {
        let accessor = accessor.as_str().expect("accessor");
        let info = bao
            .api(
                Method::POST,
                "auth/token/lookup-accessor",
                Some(json!({ "accessor": accessor })),
            )
            .await
            .expect("lookup");
        if info["data"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("auth/approle"))
        {
            bao.api(
                Method::POST,
                "auth/token/revoke-accessor",
                Some(json!({ "accessor": accessor })),
            )
            .await
            .expect("revoke");
        }
    }
    wait_metric(
        &running,
        "engram_vault_logins_total",
        &["approle", "success"],
        |v| v >= 2.0,
        Duration::from_secs(15),
    )
    .await;

    // And the new token reads: a new version is still picked up.
    bao.put_secret(PATH, json!({ "hmac_key": "k2" }))
        .await
        .expect("write v2");
    wait_metric(
        &running,
        "engram_secret_version",
        &[PATH],
        |v| v == 2.0,
        Duration::from_secs(10),
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_policy_reads_its_own_path_and_nothing_else() {
    let bao = OpenBao::start().await.expect("openbao");
    let services = [
        ("telegram-gateway", "engram/telegram"),
        ("exchange-signer", "engram/exchange"),
        ("llm-advisor", "engram/llm"),
        ("audit-sink", "engram/audit"),
    ];
    for (_, path) in services {
        bao.put_secret(path, json!({ "value": "x" }))
            .await
            .expect("seed");
    }
    bao.put_secret("engram/other", json!({ "value": "x" }))
        .await
        .expect("seed");
    let names: Vec<&str> = services.iter().map(|(name, _)| *name).collect();
    bao.enable_pki("pki", &names).await.expect("pki");
    let root = engram_testkit::repo_root();
    for (service, own_path) in services {
        let policy =
            std::fs::read_to_string(root.join(format!("deploy/vault/policies/{service}.hcl")))
                .expect("policy file exists");
        bao.api(
            Method::PUT,
            &format!("sys/policies/acl/{service}"),
            Some(json!({ "policy": policy })),
        )
        .await
        .expect("policy accepted by the server");
        let token = bao
            .api(
                Method::POST,
                "auth/token/create",
                Some(json!({ "policies": [service], "ttl": "5m" })),
            )
            .await
            .expect("token");
        let token = token["auth"]["client_token"]
            .as_str()
            .expect("client_token")
            .to_owned();

        for (_, path) in services.iter().chain([&("other", "engram/other")]) {
            for kind in ["data", "metadata"] {
                let result = bao
                    .api_as(&token, Method::GET, &format!("secret/{kind}/{path}"), None)
                    .await;
                if *path == own_path {
                    result.unwrap_or_else(|e| {
                        panic!("{service} must read secret/{kind}/{path}: {e}")
                    });
                } else {
                    let error = result.expect_err("must be refused").to_string();
                    assert!(
                        error.contains("HTTP 403"),
                        "{service} reading {kind}/{path}: {error}"
                    );
                }
            }
        }
        let write = bao
            .api_as(
                &token,
                Method::POST,
                &format!("secret/data/{own_path}"),
                Some(json!({ "data": { "v": "y" } })),
            )
            .await
            .expect_err("no write");
        assert!(
            write.to_string().contains("HTTP 403"),
            "{service} must not write: {write}"
        );
        let list = bao
            .api_as(
                &token,
                Method::from_bytes(b"LIST").expect("method"),
                "secret/metadata/engram",
                None,
            )
            .await
            .expect_err("no list");
        assert!(
            list.to_string().contains("HTTP 403"),
            "{service} must not list: {list}"
        );
        // Its own mutual-TLS identity, and no other: not through another role, and not by
        // asking its own role for someone else's SAN.
        for (other, _) in services {
            let issued = bao
                .api_as(
                    &token,
                    Method::POST,
                    &format!("pki/issue/{other}"),
                    Some(json!({ "uri_sans": format!("spiffe://engram/{other}"), "ttl": "60s" })),
                )
                .await;
            if other == service {
                issued.unwrap_or_else(|e| panic!("{service} must get its certificate: {e}"));
            } else {
                let error = issued.expect_err("another identity").to_string();
                assert!(error.contains("HTTP 403"), "{service} as {other}: {error}");
                let forged = bao
                    .api_as(
                        &token,
                        Method::POST,
                        &format!("pki/issue/{service}"),
                        Some(json!({ "uri_sans": format!("spiffe://engram/{other}") })),
                    )
                    .await
                    .expect_err("a forged SAN");
                assert!(
                    forged.to_string().contains("HTTP 400"),
                    "{service} asking for {other}'s SAN: {forged}"
                );
            }
        }
    }
}

/// A stand-in for the Kubernetes API's TokenReview endpoint, which OpenBao's Kubernetes auth
/// calls to check a service-account JWT. It accepts exactly one token.
async fn fake_token_review(
    accepted_jwt: String,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::Json;
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        post(move |Json(review): Json<serde_json::Value>| {
            let accepted = accepted_jwt.clone();
            async move {
                let ok = review["spec"]["token"].as_str() == Some(accepted.as_str());
                Json(json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "status": {
                        "authenticated": ok,
                        "user": {
                            "username": "system:serviceaccount:trading:audit-sink",
                            "uid": "7f0c0e6e-1111-2222-3333-444455556666",
                        },
                        "audiences": ["vault"],
                    }
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// An unsigned-looking service-account JWT: OpenBao does not check the signature itself when
/// it delegates to TokenReview, only the claims.
fn service_account_jwt() -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let header = b64(json!({ "alg": "RS256", "kid": "test" }));
    let claims = b64(json!({
        "iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:trading:audit-sink",
        "aud": ["vault"],
        "kubernetes.io/serviceaccount/namespace": "trading",
        "kubernetes.io/serviceaccount/service-account.name": "audit-sink",
        "kubernetes.io/serviceaccount/service-account.uid": "7f0c0e6e-1111-2222-3333-444455556666",
    }));
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 256]);
    format!("{header}.{claims}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_auth_logs_in_with_the_service_account_token() {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret(PATH, json!({ "hmac_key": "k" }))
        .await
        .expect("write");
    let jwt = service_account_jwt();
    let (review_addr, review) = fake_token_review(jwt.clone()).await;
    bao.api(
        Method::POST,
        "sys/auth/kubernetes",
        Some(json!({ "type": "kubernetes" })),
    )
    .await
    .expect("enable");
    // The config insists on a CA certificate for the cluster API (unused over plain HTTP
    // here): OpenBao's own PKI engine issues one.
    bao.api(
        Method::POST,
        "sys/mounts/pki",
        Some(json!({ "type": "pki" })),
    )
    .await
    .expect("pki");
    let root = bao
        .api(
            Method::POST,
            "pki/root/generate/internal",
            Some(json!({ "common_name": "test-cluster-ca", "ttl": "1h" })),
        )
        .await
        .expect("root ca");
    let ca_pem = root["data"]["certificate"]
        .as_str()
        .expect("certificate")
        .to_owned();
    bao.api(
        Method::POST,
        "auth/kubernetes/config",
        Some(json!({
            "kubernetes_host": format!("http://{review_addr}"),
            "kubernetes_ca_cert": ca_pem,
            "disable_local_ca_jwt": true,
        })),
    )
    .await
    .expect("config");
    write_test_policy(&bao).await;
    bao.api(
        Method::POST,
        "auth/kubernetes/role/audit-sink",
        Some(json!({
            "bound_service_account_names": ["audit-sink"],
            "bound_service_account_namespaces": ["trading"],
            "token_policies": ["runtime-test"],
            "token_ttl": "10m",
        })),
    )
    .await
    .expect("role");

    let dir = tempfile::tempdir().expect("tempdir");
    let jwt_path = dir.path().join("token");
    std::fs::write(&jwt_path, &jwt).expect("write jwt");
    let running = start(&[
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_AUTH", "kubernetes".to_owned()),
        ("ENGRAM_VAULT_K8S_ROLE", "audit-sink".to_owned()),
        ("ENGRAM_VAULT_K8S_JWT_FILE", jwt_path.display().to_string()),
    ])
    .await;
    wait_ready(&running, Duration::from_secs(10)).await;
    let metrics = running.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "engram_vault_logins_total",
            &["kubernetes", "success"]
        ),
        Some(1.0)
    );
    running.stop().await;
    review.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_keep_the_service_not_ready_and_out_of_every_message() {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret(PATH, json!({ "hmac_key": "k" }))
        .await
        .expect("write");
    let (role_id, _) = setup_approle(&bao, "1m").await;
    let running = start(&[
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_AUTH", "approle".to_owned()),
        ("ENGRAM_VAULT_ROLE_ID", role_id),
        (
            "ENGRAM_VAULT_SECRET_ID",
            "canary-wrong-secret-id".to_owned(),
        ),
    ])
    .await;
    wait_metric(
        &running,
        "engram_vault_logins_total",
        &["approle", "failure"],
        |v| v >= 2.0,
        Duration::from_secs(10),
    )
    .await;
    let (status, body) = running.readyz().await;
    assert_eq!(status, 503);
    assert!(body.to_string().contains("authentication failed"), "{body}");
    let status = running.context.secrets.status();
    let error = status.last_error.expect("an error is recorded");
    for text in [body.to_string(), error, running.metrics().await] {
        assert!(
            !text.contains("canary-wrong"),
            "the secret id leaked: {text}"
        );
    }
    running.stop().await;
}

#[test]
fn a_missing_or_empty_ca_file_is_a_clear_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    for (value, expected) in [
        ("/nonexistent/ca.pem".to_owned(), "cannot be read"),
        (junk.display().to_string(), "holds no PEM certificate"),
    ] {
        let source = MapSource::from_pairs([
            (
                "ENGRAM_VAULT_ADDR".to_owned(),
                "https://127.0.0.1:1".to_owned(),
            ),
            ("ENGRAM_VAULT_TOKEN".to_owned(), "t".to_owned()),
            ("ENGRAM_VAULT_CA_FILE".to_owned(), value),
        ]);
        let Err(errors) = RuntimeConfig::load(&SPEC, &source) else {
            panic!("a bad ENGRAM_VAULT_CA_FILE was accepted");
        };
        let errors = errors.to_string();
        assert!(
            errors.contains("ENGRAM_VAULT_CA_FILE") && errors.contains(expected),
            "{errors}"
        );
    }
}
