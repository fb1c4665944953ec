//! The audit-sink service: the append-only, hash-chained, durable audit trail.
//!
//! This crate holds the service's logic; `main.rs` only hands [`SPEC`] and [`routes`] to
//! the shared runtime. The RPCs are registered with their generated defaults, which answer
//! UNIMPLEMENTED until the service's own issue gives them behaviour.

use engram_proto::service_names;
use engram_proto::v1::audit_sink_server::AuditSinkServer;
use engram_runtime::{ServiceContext, ServiceSpec};
use tonic::service::Routes;

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "audit-sink",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::AUDIT_SINK,
    secret_path: "engram/audit",
    required_secret_fields: &["hmac_key"],
    default_grpc_port: 50054,
    default_admin_port: 9104,
};

/// The gRPC implementation. Holds the service context for the logic to come.
#[derive(Debug)]
pub struct AuditSinkService {
    #[allow(dead_code)]
    context: ServiceContext,
}

// Every method keeps the generated default: Status::unimplemented.
impl engram_proto::v1::audit_sink_server::AuditSink for AuditSinkService {}

/// The service's gRPC routes, built once the runtime has the context ready.
pub fn routes(context: &ServiceContext) -> Routes {
    Routes::new(AuditSinkServer::new(AuditSinkService {
        context: context.clone(),
    }))
}
