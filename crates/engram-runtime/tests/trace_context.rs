//! W3C trace context crosses a gRPC hop: the server's span joins the client's trace.

use std::sync::{Arc, Mutex};

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::audit_sink_server::{AuditSink, AuditSinkServer};
use engram_runtime::grpc::{GrpcServer, inject_trace_context};
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::service::Routes;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

struct Stub;
impl AuditSink for Stub {}

fn current_trace_id() -> TraceId {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
}

// Current-thread runtime: the thread-local subscriber covers client and server tasks alike.
#[tokio::test]
async fn the_server_span_joins_the_callers_trace() {
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let seen: Arc<Mutex<Vec<TraceId>>> = Arc::default();
    let recorder = seen.clone();
    let service = tonic::service::interceptor::InterceptedService::new(
        AuditSinkServer::new(Stub),
        move |request: tonic::Request<()>| {
            recorder.lock().expect("lock").push(current_trace_id());
            Ok(request)
        },
    );
    let server = GrpcServer::bind("127.0.0.1:0".parse().expect("addr"), "engram.v1.AuditSink")
        .await
        .expect("bind");
    let addr = server.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let serve = tokio::spawn(server.serve(
        Routes::new(service),
        engram_runtime::grpc::ServerSecurity::Open,
        stop.clone().cancelled_owned(),
    ));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut traced = AuditSinkClient::with_interceptor(channel.clone(), inject_trace_context);
    let span = tracing::info_span!("client.command");
    let client_trace = span.in_scope(current_trace_id);
    assert_ne!(client_trace, TraceId::INVALID);
    let status = traced
        .head(engram_proto::v1::HeadRequest {})
        .instrument(span)
        .await
        .expect_err("stub answers UNIMPLEMENTED");
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // Without the interceptor the server starts a trace of its own.
    let mut untraced = AuditSinkClient::new(channel);
    let _ = untraced
        .head(engram_proto::v1::HeadRequest {})
        .instrument(tracing::info_span!("other.command"))
        .await;

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0], client_trace,
        "the server span continues the caller's trace"
    );
    assert_ne!(seen[1], client_trace);
    assert_ne!(seen[1], TraceId::INVALID);

    stop.cancel();
    serve.await.expect("join").expect("clean stop");
}
