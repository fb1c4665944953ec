//! The llm-advisor service: schema-checked trading advice from an OpenAI-compatible model; it can never trade.
//!
//! This crate holds the service's logic; `main.rs` only hands [`SPEC`] and [`routes`] to
//! the shared runtime. The RPCs are registered with their generated defaults, which answer
//! UNIMPLEMENTED until the service's own issue gives them behaviour.

pub mod advice;

use engram_proto::service_names;
use engram_proto::v1::llm_advisor_server::LlmAdvisorServer;
use engram_runtime::{ServiceContext, ServiceSpec};
use tonic::service::Routes;

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "llm-advisor",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::LLM_ADVISOR,
    secret_path: "engram/llm",
    required_secret_fields: &[],
    default_grpc_port: 50053,
    default_admin_port: 9103,
};

/// The gRPC implementation. Holds the service context for the logic to come.
#[derive(Debug)]
pub struct LlmAdvisorService {
    #[allow(dead_code)]
    context: ServiceContext,
}

// Every method keeps the generated default: Status::unimplemented.
impl engram_proto::v1::llm_advisor_server::LlmAdvisor for LlmAdvisorService {}

/// The service's gRPC routes, built once the runtime has the context ready. The service has
/// no settings of its own yet (`()`).
///
/// # Errors
///
/// None yet; the signature is the one the runtime expects.
pub fn routes(context: &ServiceContext, _config: ()) -> anyhow::Result<Routes> {
    Ok(Routes::new(LlmAdvisorServer::new(LlmAdvisorService {
        context: context.clone(),
    })))
}
