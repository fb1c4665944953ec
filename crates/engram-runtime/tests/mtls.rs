//! Mutual TLS on a real service skeleton with certificates from a real OpenBao PKI: a stream
//! that outlives a certificate renewal, callers without a certificate or with one from
//! another CA refused at the handshake, an identity outside the table refused per RPC, a
//! client that will not talk to the wrong server, file mode with reloads, and bad settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::audit_sink_server::{AuditSink, AuditSinkServer};
use engram_proto::v1::{AuditRecord, HeadRequest, HeadResponse, QueryRequest};
use engram_runtime::config::MapSource;
use engram_runtime::tls::{Material, MutualTls, Transport};
use engram_runtime::{Application, RuntimeConfig, ServiceSpec};
use engram_testkit::{IssuedPem, OpenBao, http_get, metric_value, poll_until};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

const SPEC: ServiceSpec = ServiceSpec {
    name: "audit-sink",
    version: "test",
    grpc_service: "engram.v1.AuditSink",
    secret_path: "engram/audit",
    required_secret_fields: &["hmac_key"],
    default_grpc_port: 0,
    default_admin_port: 0,
};

/// Head answers at once; Query ticks a record every 100 ms until told to stop.
#[derive(Clone, Default)]
struct Ticking {
    stop: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl AuditSink for Ticking {
    async fn head(
        &self,
        _: tonic::Request<HeadRequest>,
    ) -> Result<tonic::Response<HeadResponse>, tonic::Status> {
        Ok(tonic::Response::new(HeadResponse {
            sequence: 7,
            ..HeadResponse::default()
        }))
    }

    async fn query(
        &self,
        _: tonic::Request<QueryRequest>,
    ) -> Result<tonic::Response<tonic::codegen::BoxStream<AuditRecord>>, tonic::Status> {
        let ticks = futures::stream::unfold(self.stop.clone(), |stop| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            (!stop.load(Ordering::SeqCst)).then(|| (Ok(AuditRecord::default()), stop))
        });
        Ok(tonic::Response::new(Box::pin(ticks)))
    }
}

struct Server {
    bao: OpenBao,
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    service: Ticking,
}

async fn pki() -> OpenBao {
    engram_runtime::service::install_crypto_provider();
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret("engram/audit", serde_json::json!({ "hmac_key": "k" }))
        .await
        .expect("seed");
    bao.enable_pki(
        "pki",
        &["audit-sink", "telegram-gateway", "exchange-signer"],
    )
    .await
    .expect("pki");
    // Another CA that happily issues the gateway's identity: it must get nowhere.
    bao.enable_pki("pki-rogue", &["telegram-gateway"])
        .await
        .expect("rogue pki");
    bao
}

async fn serve(bao: OpenBao, tls: &[(&str, String)]) -> Server {
    let mut pairs = vec![
        ("ENGRAM_GRPC_ADDR", "127.0.0.1:0".to_owned()),
        ("ENGRAM_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
        ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0".to_owned()),
    ];
    pairs.extend(tls.iter().cloned());
    let config = RuntimeConfig::load(&SPEC, &MapSource::from_pairs(pairs)).expect("config");
    let service = Ticking::default();
    let routes_service = service.clone();
    let app = Application::build(SPEC, config, move |_| {
        Ok(Routes::new(AuditSinkServer::new(routes_service)))
    })
    .await
    .expect("build");
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    poll_until(
        "ready with a certificate",
        Duration::from_secs(20),
        || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(()) },
    )
    .await
    .expect("ready");
    Server {
        bao,
        grpc,
        admin,
        shutdown,
        task,
        service,
    }
}

impl Server {
    async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.expect("metrics").1
    }

    async fn stop(mut self) {
        self.service.stop.store(true, Ordering::SeqCst);
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
        self.bao.stop().await;
    }
}

fn client_as(
    issued: &IssuedPem,
    ca: &str,
    identity: &str,
    addr: std::net::SocketAddr,
    peer: &str,
) -> AuditSinkClient<tonic::transport::Channel> {
    let material = Material::from_pem(
        issued.chain.as_bytes(),
        issued.key.as_bytes(),
        ca.as_bytes(),
        identity,
    )
    .expect("material");
    let transport = Transport::Mutual(MutualTls::fixed(&material).expect("tls"));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    AuditSinkClient::new(transport.channel(endpoint, peer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_certificate_renewal_and_strangers_are_refused() {
    let bao = pki().await;
    let gateway = bao
        .issue("pki", "telegram-gateway", 3600)
        .await
        .expect("issue");
    let signer = bao
        .issue("pki", "exchange-signer", 3600)
        .await
        .expect("issue");
    let rogue = bao
        .issue("pki-rogue", "telegram-gateway", 3600)
        .await
        .expect("issue");
    // A 12 s certificate is renewed 8 s after it is issued.
    let server = serve(
        bao,
        &[
            ("ENGRAM_TLS_MODE", "vault".to_owned()),
            ("ENGRAM_TLS_CERT_TTL_SECS", "12".to_owned()),
        ],
    )
    .await;
    let ca = gateway.ca.clone();

    let mut client = client_as(&gateway, &ca, "telegram-gateway", server.grpc, "audit-sink");
    assert_eq!(
        client
            .head(HeadRequest {})
            .await
            .expect("allowed")
            .into_inner()
            .sequence,
        7
    );
    let first_expiry = metric_value(
        &server.metrics().await,
        "engram_tls_cert_expiry_timestamp_seconds",
        &[],
    )
    .expect("expiry exported");

    // A stream opened on the first certificate keeps flowing across the renewal.
    let mut stream = client
        .query(QueryRequest::default())
        .await
        .expect("query allowed")
        .into_inner();
    poll_until("a renewal", Duration::from_secs(30), || async {
        let metrics = server.metrics().await;
        let renewed = metric_value(&metrics, "engram_tls_cert_renewals_total", &["renewed"]);
        let expiry = metric_value(&metrics, "engram_tls_cert_expiry_timestamp_seconds", &[]);
        (renewed >= Some(1.0) && expiry > Some(first_expiry)).then_some(())
    })
    .await
    .expect("renewed at two thirds of its life");
    for _ in 0..3 {
        let item = stream.next().await.expect("still streaming");
        item.expect("no error after the renewal");
    }
    // A new connection gets the new certificate and works too.
    let mut fresh = client_as(&gateway, &ca, "telegram-gateway", server.grpc, "audit-sink");
    fresh.head(HeadRequest {}).await.expect("new connection");

    // A valid identity the table does not allow this method: PERMISSION_DENIED, counted.
    let mut wrong_caller = client_as(&signer, &ca, "exchange-signer", server.grpc, "audit-sink");
    let denied = wrong_caller.head(HeadRequest {}).await.expect_err("denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("spiffe://engram/exchange-signer"));
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "engram_grpc_denied_total",
            &["caller=\"exchange-signer\"", "/engram.v1.AuditSink/Head"]
        ),
        Some(1.0),
        "{metrics}"
    );

    // Another CA's certificate for the same identity: refused at the handshake.
    let refused_before = metric_value(
        &metrics,
        "engram_tls_handshake_failures_total",
        &["side=\"server\"", "reason=\"refused\""],
    )
    .unwrap_or(0.0);
    let mut impostor = client_as(&rogue, &ca, "telegram-gateway", server.grpc, "audit-sink");
    let error = impostor
        .head(HeadRequest {})
        .await
        .expect_err("impostor refused");
    // A transport failure, never an answer: with TLS 1.3 the client finishes first and learns
    // of the refusal as the server's UnknownCA alert or a closed connection (timing decides).
    // That the server refused is checked on its handshake counter below.
    assert!(
        matches!(
            error.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ),
        "{error:?}"
    );
    // No certificate at all (plain HTTP/2): refused too.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let error = AuditSinkClient::new(plain)
        .head(HeadRequest {})
        .await
        .expect_err("no certificate refused");
    assert_ne!(error.code(), tonic::Code::Ok);
    poll_until(
        "both handshakes counted",
        Duration::from_secs(10),
        || async {
            let now = metric_value(
                &server.metrics().await,
                "engram_tls_handshake_failures_total",
                &["side=\"server\"", "reason=\"refused\""],
            )
            .unwrap_or(0.0);
            (now >= refused_before + 2.0).then_some(())
        },
    )
    .await
    .expect("the server refused both");

    // The client side: a server that is not the service we meant to reach is refused.
    let mut confused = client_as(
        &gateway,
        &ca,
        "telegram-gateway",
        server.grpc,
        "exchange-signer",
    );
    let error = confused
        .head(HeadRequest {})
        .await
        .expect_err("wrong server");
    assert!(
        format!("{error:?}").contains("NotValidForName"),
        "the client names the mismatch: {error:?}"
    );

    let (_, metrics_text) = http_get(server.admin, "/metrics").await.expect("metrics");
    let (_, readyz) = http_get(server.admin, "/readyz").await.expect("readyz");
    for text in [&metrics_text, &readyz] {
        assert!(!text.contains("PRIVATE KEY") && !text.contains(&gateway.key[40..80]));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_reloads_changed_files_and_keeps_the_last_good_ones() {
    let bao = pki().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |issued: &IssuedPem, key: &str| {
        std::fs::write(dir.path().join("tls.crt"), &issued.chain).expect("write");
        std::fs::write(dir.path().join("tls.key"), key).expect("write");
        std::fs::write(dir.path().join("ca.crt"), &issued.ca).expect("write");
    };
    let first = bao.issue("pki", "audit-sink", 3600).await.expect("issue");
    write(&first, &first.key);
    let gateway = bao
        .issue("pki", "telegram-gateway", 3600)
        .await
        .expect("issue");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let server = serve(
        bao,
        &[
            ("ENGRAM_TLS_MODE", "file".to_owned()),
            ("ENGRAM_TLS_CERT_FILE", path("tls.crt")),
            ("ENGRAM_TLS_KEY_FILE", path("tls.key")),
            ("ENGRAM_TLS_CA_FILE", path("ca.crt")),
            ("ENGRAM_TLS_FILE_REFRESH_SECS", "0.2".to_owned()),
        ],
    )
    .await;
    let mut client = client_as(
        &gateway,
        &gateway.ca,
        "telegram-gateway",
        server.grpc,
        "audit-sink",
    );
    client
        .head(HeadRequest {})
        .await
        .expect("served from files");

    // cert-manager renews: new files, picked up without a restart.
    let second = server
        .bao
        .issue("pki", "audit-sink", 7200)
        .await
        .expect("issue");
    write(&second, &second.key);
    poll_until("the new files loaded", Duration::from_secs(10), || async {
        (metric_value(
            &server.metrics().await,
            "engram_tls_cert_renewals_total",
            &["renewed"],
        ) >= Some(1.0))
        .then_some(())
    })
    .await
    .expect("reloaded");

    // A broken write (key missing): the last good certificate stays, readiness warns.
    write(&second, "not a key");
    poll_until(
        "the bad files reported",
        Duration::from_secs(10),
        || async {
            let (status, body) = http_get(server.admin, "/readyz").await.ok()?;
            (status == 200 && body.contains("certificate renewal failing")).then_some(())
        },
    )
    .await
    .expect("degraded, still ready");
    let mut fresh = client_as(
        &gateway,
        &gateway.ca,
        "telegram-gateway",
        server.grpc,
        "audit-sink",
    );
    fresh.head(HeadRequest {}).await.expect("still served");
    server.stop().await;
}

#[test]
fn bad_tls_settings_are_each_reported() {
    let problems = |pairs: &[(&str, &str)]| -> Vec<String> {
        let mut all = vec![
            ("ENGRAM_VAULT_ADDR", "http://127.0.0.1:8200"),
            ("ENGRAM_VAULT_TOKEN", "t"),
        ];
        all.extend_from_slice(pairs);
        RuntimeConfig::load(
            &SPEC,
            &MapSource::from_pairs(all.iter().map(|(k, v)| (*k, *v))),
        )
        .err()
        .map(|e| e.0.into_iter().map(|p| p.name).collect())
        .unwrap_or_default()
    };
    assert!(problems(&[]).is_empty(), "vault PKI is the default");
    assert_eq!(
        problems(&[("ENGRAM_TLS_MODE", "maybe")]),
        ["ENGRAM_TLS_MODE"]
    );
    for ttl in ["0", "9", "86401", "1h", "-5"] {
        assert_eq!(
            problems(&[("ENGRAM_TLS_CERT_TTL_SECS", ttl)]),
            ["ENGRAM_TLS_CERT_TTL_SECS"],
            "{ttl}"
        );
    }
    assert_eq!(
        problems(&[("ENGRAM_TLS_MODE", "file"), ("ENGRAM_TLS_CERT_FILE", "/x")]),
        ["ENGRAM_TLS_KEY_FILE", "ENGRAM_TLS_CA_FILE"]
    );
    assert_eq!(
        problems(&[("ENGRAM_SECRET_SOURCE", "env")]),
        ["ENGRAM_TLS_MODE"],
        "PKI mode needs a Vault login"
    );
    assert_eq!(
        problems(&[("ENGRAM_AUDIT_ADDR", "http://127.0.0.1:50054")]),
        ["ENGRAM_AUDIT_ADDR"],
        "a plain peer URL under mutual TLS"
    );
    assert!(
        problems(&[
            ("ENGRAM_TLS_MODE", "off"),
            ("ENGRAM_AUDIT_ADDR", "http://127.0.0.1:50054")
        ])
        .is_empty()
    );
}
