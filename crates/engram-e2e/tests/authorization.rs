//! Every method of every service, called by every identity (and with no certificate, and with
//! a certificate from another CA), against the four real services on mutual TLS: every pair
//! in DESIGN.md's table reaches its handler, every other pair is refused, and refusals are
//! in the audit trail.

use engram_e2e::{IDENTITIES, Options, Stack, text_detail};
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{AppendRequest, AuditRecord, QueryRequest};
use engram_testkit::{http_get, metric_value};
use tonic::codegen::http::uri::PathAndQuery;

/// Each service's methods, from the protos.
const METHODS: &[(&str, &str, &[&str])] = &[
    (
        "exchange-signer",
        "engram.v1.ExchangeSigner",
        &[
            "PlaceOrder",
            "CancelOrder",
            "GetOrder",
            "ListOpenOrders",
            "GetBalances",
            "GetPrice",
            "GetStatus",
            "Halt",
            "Resume",
        ],
    ),
    ("llm-advisor", "engram.v1.LlmAdvisor", &["Advise"]),
    (
        "audit-sink",
        "engram.v1.AuditSink",
        &[
            "Append",
            "AppendBatch",
            "AppendStream",
            "Query",
            "Verify",
            "Head",
        ],
    ),
    (
        "telegram-gateway",
        "engram.v1.TelegramGateway",
        &["SendAlert"],
    ),
];

/// DESIGN.md's "who may call what" (plus Head, see docs/ARCHITECTURE.md), written out here
/// on its own so that a wrong table in the code fails this test.
fn expected(caller: &str, method: &str) -> bool {
    let signer_all = method.starts_with("/engram.v1.ExchangeSigner/");
    match caller {
        "telegram-gateway" => {
            signer_all
                || method == "/engram.v1.LlmAdvisor/Advise"
                || [
                    "/engram.v1.AuditSink/Append",
                    "/engram.v1.AuditSink/Query",
                    "/engram.v1.AuditSink/Verify",
                    "/engram.v1.AuditSink/Head",
                ]
                .contains(&method)
        }
        "exchange-signer" => [
            "/engram.v1.AuditSink/Append",
            "/engram.v1.TelegramGateway/SendAlert",
        ]
        .contains(&method),
        "llm-advisor" => method == "/engram.v1.AuditSink/Append",
        "audit-sink" => method == "/engram.v1.TelegramGateway/SendAlert",
        "engramctl" => [
            "/engram.v1.AuditSink/Query",
            "/engram.v1.AuditSink/Verify",
            "/engram.v1.AuditSink/Head",
            "/engram.v1.ExchangeSigner/GetStatus",
            "/engram.v1.ExchangeSigner/Halt",
            "/engram.v1.ExchangeSigner/Resume",
        ]
        .contains(&method),
        _ => false,
    }
}

/// Calls `path` with an empty message (every request type decodes from it).
async fn call(channel: tonic::transport::Channel, path: &str) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::try_from(path.to_owned()).expect("path");
    grpc.unary(tonic::Request::new(()), path, codec)
        .await
        .map(|_| ())
}

/// A call that died in the transport (a refused handshake, or plain HTTP/2 sent to a TLS
/// port), never an answer from a handler or the authorization layer.
fn is_transport_failure(status: &tonic::Status) -> bool {
    let transport = format!("{status:?}").contains("tonic::transport::Error");
    let code = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
    );
    (transport || status.code() == tonic::Code::Unavailable) && code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_against_every_method() {
    let stack = Stack::start(Options::default()).await.expect("stack");
    let mut allowed = 0;
    let mut denied = 0;
    for identity in IDENTITIES {
        let transport = stack.transport_as(identity).await.expect("transport");
        for (service, package, methods) in METHODS {
            let channel = stack.channel(&transport, service);
            for method in *methods {
                let path = format!("/{package}/{method}");
                let outcome = call(channel.clone(), &path).await;
                let refused =
                    matches!(&outcome, Err(s) if s.code() == tonic::Code::PermissionDenied);
                // An allowed call must have reached its handler, not died on the way.
                if let Err(status) = &outcome {
                    assert!(
                        !format!("{status:?}").contains("transport error"),
                        "{identity} {path}: {status:?}"
                    );
                }
                assert_eq!(
                    !refused,
                    expected(identity, &path),
                    "{identity} calling {path}: {outcome:?}"
                );
                if refused {
                    denied += 1;
                } else {
                    allowed += 1;
                }
            }
        }
    }
    // 24 allowed pairs (9 + 1 + 4 for the gateway, 2, 1, 1, 6 for the operator).
    assert_eq!((allowed, denied), (24, 6 * 17 - 24));

    // Trading was halted and resumed above: the signer ends as it began.
    let ops = stack.transport_as("engramctl").await.expect("operator");
    call(
        stack.channel(&ops, "exchange-signer"),
        "/engram.v1.ExchangeSigner/Resume",
    )
    .await
    .ok();

    // No certificate, or another CA's certificate for a real identity: refused at the
    // handshake by every server, before any method.
    let rogue = {
        stack
            .bao
            .enable_pki("pki-rogue", &["telegram-gateway"])
            .await
            .expect("rogue CA");
        stack
            .transport_from("pki-rogue", "telegram-gateway")
            .await
            .expect("rogue transport")
    };
    for (service, package, methods) in METHODS {
        let path = format!("/{package}/{}", methods[0]);
        let status = call(stack.channel(&rogue, service), &path)
            .await
            .expect_err("another CA");
        assert!(is_transport_failure(&status), "{service}: {status:?}");
        let plain = engram_runtime::tls::Transport::Plain;
        let status = call(stack.channel(&plain, service), &path)
            .await
            .expect_err("no certificate");
        assert!(is_transport_failure(&status), "{service}: {status:?}");
    }
    for service in [&stack.audit, &stack.signer, &stack.advisor, &stack.gateway] {
        let (_, metrics) = http_get(service.admin_addr, "/metrics")
            .await
            .expect("metrics");
        let refused = metric_value(
            &metrics,
            "engram_tls_handshake_failures_total",
            &["side=\"server\"", "reason=\"refused\""],
        );
        assert!(refused >= Some(2.0), "{metrics}");
        // The matrix's refusals are counted per method, as PermissionDenied.
        let denied = metric_value(
            &metrics,
            "engram_grpc_server_requests_total",
            &["code=\"PermissionDenied\""],
        );
        assert!(denied >= Some(1.0), "{metrics}");
    }
    // The signer served the gateway's GetStatus: counted OK, with a latency.
    let (_, metrics) = http_get(stack.signer.admin_addr, "/metrics")
        .await
        .expect("metrics");
    assert!(
        metric_value(
            &metrics,
            "engram_grpc_server_requests_total",
            &[
                "method=\"/engram.v1.ExchangeSigner/GetStatus\"",
                "code=\"OK\""
            ],
        ) >= Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "engram_grpc_server_seconds_count",
            &["method=\"/engram.v1.ExchangeSigner/GetStatus\""],
        ) >= Some(1.0),
        "{metrics}"
    );

    // Each denial is in the trail as a security event, naming who tried what.
    let gateway = stack
        .transport_as("telegram-gateway")
        .await
        .expect("gateway");
    let mut audit = AuditSinkClient::new(stack.channel(&gateway, "audit-sink"));
    let mut stream = audit
        .query(QueryRequest {
            action: "RPC_DENIED".to_owned(),
            limit: 1000,
            ..QueryRequest::default()
        })
        .await
        .expect("query")
        .into_inner();
    let mut records: Vec<AuditRecord> = Vec::new();
    while let Some(record) = stream.message().await.expect("record") {
        records.push(record);
    }
    assert!(
        records
            .iter()
            .any(|r| text_detail(r, "caller") == "intruder"
                && text_detail(r, "method") == "/engram.v1.ExchangeSigner/PlaceOrder"),
        "{records:#?}"
    );
    assert!(
        records
            .iter()
            .any(|r| text_detail(r, "caller") == "llm-advisor"
                && text_detail(r, "method") == "/engram.v1.ExchangeSigner/PlaceOrder")
    );

    // A service may append, but only in its own name: the advisor cannot write a record
    // that says the signer did something.
    let advisor = stack.transport_as("llm-advisor").await.expect("advisor");
    let mut as_advisor = AuditSinkClient::new(stack.channel(&advisor, "audit-sink"));
    let append = |service: &str| AppendRequest {
        event: Some(engram_runtime::audit::event(
            service,
            engram_proto::v1::AuditCategory::Audit,
            "ORDER_PLACED",
            &[],
        )),
        idempotency_key: String::new(),
    };
    let forged = as_advisor
        .append(append("exchange-signer"))
        .await
        .expect_err("forged actor");
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
    assert!(forged.message().contains("not the caller"), "{forged:?}");
    as_advisor
        .append(append("llm-advisor"))
        .await
        .expect("its own name");

    assert!(!stack.outputs().contains(engram_e2e::EXCHANGE_SECRET));
    stack.stop().await;
}
