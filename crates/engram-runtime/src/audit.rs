//! Recording audit events from any service: a small trait with a gRPC implementation that
//! talks to the audit sink, and the lifecycle events every service leaves behind
//! (`SERVICE_STARTED` once ready, `SERVICE_STOPPED` at shutdown).

use std::time::Duration;

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{Actor, AppendRequest, AuditCategory, AuditEvent};
use futures::FutureExt;
use futures::future::BoxFuture;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use url::Url;

use crate::grpc::inject_trace_context;
use crate::tls::Transport;

/// Why an event could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit append failed: {0}")]
pub struct AuditRecordError(pub String);

/// Something that durably records audit events.
pub trait AuditRecorder: Send + Sync + 'static {
    /// Records one event; `Ok` only once it is durable.
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditRecordError>>;

    /// Called once at the very end of shutdown, after the last event.
    fn close(&self) -> BoxFuture<'_, ()> {
        futures::future::ready(()).boxed()
    }
}

type TracedChannel = InterceptedService<
    Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

/// Records events through the audit sink's `Append` RPC.
#[derive(Clone)]
pub struct GrpcAuditRecorder {
    client: AuditSinkClient<TracedChannel>,
}

impl std::fmt::Debug for GrpcAuditRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAuditRecorder").finish_non_exhaustive()
    }
}

impl GrpcAuditRecorder {
    /// A recorder for the sink at `addr` over `transport`; connects lazily, each call
    /// bounded by `timeout`.
    ///
    /// # Errors
    ///
    /// When `addr` is not a usable endpoint.
    pub fn new(
        transport: &Transport,
        addr: &Url,
        timeout: Duration,
    ) -> Result<Self, AuditRecordError> {
        let channel = transport
            .channel_to(addr, "audit-sink", timeout)
            .map_err(|e| AuditRecordError(format!("bad audit sink address: {e}")))?;
        let interceptor: fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> =
            inject_trace_context;
        Ok(Self {
            client: AuditSinkClient::with_interceptor(channel, interceptor),
        })
    }
}

impl AuditRecorder for GrpcAuditRecorder {
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditRecordError>> {
        let mut client = self.client.clone();
        async move {
            client
                .append(AppendRequest {
                    event: Some(event),
                    idempotency_key: String::new(),
                })
                .await
                .map(|_| ())
                .map_err(|status| {
                    AuditRecordError(format!("{}: {}", status.code(), status.message()))
                })
        }
        .boxed()
    }
}

/// An event from `service` with string details.
pub fn event(
    service: &str,
    category: AuditCategory,
    action: &str,
    details: &[(&str, prost_types::Value)],
) -> AuditEvent {
    let fields = details
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    AuditEvent {
        category: category as i32,
        action: action.to_owned(),
        actor: Some(Actor {
            service: service.to_owned(),
            telegram_user_id: 0,
            telegram_chat_id: 0,
        }),
        details: Some(prost_types::Struct { fields }),
        correlation_id: String::new(),
        trace_id: String::new(),
        occurred_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
    }
}

/// A string as a protobuf value.
pub fn text(value: impl Into<String>) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(value.into())),
    }
}

/// A number as a protobuf value.
pub fn number(value: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(value)),
    }
}
