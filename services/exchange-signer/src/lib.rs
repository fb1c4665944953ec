//! The exchange-signer service: the only holder of the exchange API key; typed orders under a trading policy.
//!
//! This crate holds the service's logic; `main.rs` only hands [`SPEC`] and [`routes`] to
//! the shared runtime. The RPCs are registered with their generated defaults, which answer
//! UNIMPLEMENTED until the service's own issue gives them behaviour.

pub mod client;
pub mod policy;
pub mod signing;

use engram_proto::service_names;
use engram_proto::v1::exchange_signer_server::ExchangeSignerServer;
use engram_runtime::{ServiceContext, ServiceSpec};
use tonic::service::Routes;

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "exchange-signer",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::EXCHANGE_SIGNER,
    secret_path: "engram/exchange",
    required_secret_fields: &["api_key"],
    default_grpc_port: 50052,
    default_admin_port: 9102,
};

/// The gRPC implementation. Holds the service context for the logic to come.
#[derive(Debug)]
pub struct ExchangeSignerService {
    #[allow(dead_code)]
    context: ServiceContext,
}

// Every method keeps the generated default: Status::unimplemented.
impl engram_proto::v1::exchange_signer_server::ExchangeSigner for ExchangeSignerService {}

/// The service's gRPC routes, built once the runtime has the context ready. The service has
/// no settings of its own yet (`()`).
///
/// # Errors
///
/// None yet; the signature is the one the runtime expects.
pub fn routes(context: &ServiceContext, _config: ()) -> anyhow::Result<Routes> {
    Ok(Routes::new(ExchangeSignerServer::new(
        ExchangeSignerService {
            context: context.clone(),
        },
    )))
}
