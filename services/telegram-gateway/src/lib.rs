//! The telegram-gateway service: the Telegram bot a person steers Engram with (allowlists, roles, rate limits, confirmations, alerts).
//!
//! This crate holds the service's logic; `main.rs` only hands [`SPEC`] and [`routes`] to
//! the shared runtime. The RPCs are registered with their generated defaults, which answer
//! UNIMPLEMENTED until the service's own issue gives them behaviour.

use engram_proto::service_names;
use engram_proto::v1::telegram_gateway_server::TelegramGatewayServer;
use engram_runtime::{ServiceContext, ServiceSpec};
use tonic::service::Routes;

/// Runtime-level facts about this service: names, secret path, default ports.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "telegram-gateway",
    version: env!("CARGO_PKG_VERSION"),
    grpc_service: service_names::TELEGRAM_GATEWAY,
    secret_path: "engram/telegram",
    required_secret_fields: &["bot_token", "allowed_chats", "users", "admin_chat"],
    default_grpc_port: 50051,
    default_admin_port: 9101,
};

/// The gRPC implementation. Holds the service context for the logic to come.
#[derive(Debug)]
pub struct TelegramGatewayService {
    #[allow(dead_code)]
    context: ServiceContext,
}

// Every method keeps the generated default: Status::unimplemented.
impl engram_proto::v1::telegram_gateway_server::TelegramGateway for TelegramGatewayService {}

/// The service's gRPC routes, built once the runtime has the context ready. The service has
/// no settings of its own yet (`()`).
///
/// # Errors
///
/// None yet; the signature is the one the runtime expects.
pub fn routes(context: &ServiceContext, _config: ()) -> anyhow::Result<Routes> {
    Ok(Routes::new(TelegramGatewayServer::new(
        TelegramGatewayService {
            context: context.clone(),
        },
    )))
}
