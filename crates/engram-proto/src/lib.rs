//! Generated gRPC clients, servers and messages for Engram's `engram.v1` contracts.
//!
//! The `.proto` files live in `proto/engram/v1/` at the repository root; this is the one
//! crate that compiles them.

/// The `engram.v1` package: every Engram service contract.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("engram.v1");
}

/// Fully qualified gRPC service names, as the health service and authorization use them.
pub mod service_names {
    /// `engram.v1.AuditSink`.
    pub const AUDIT_SINK: &str = "engram.v1.AuditSink";
    /// `engram.v1.ExchangeSigner`.
    pub const EXCHANGE_SIGNER: &str = "engram.v1.ExchangeSigner";
    /// `engram.v1.LlmAdvisor`.
    pub const LLM_ADVISOR: &str = "engram.v1.LlmAdvisor";
    /// `engram.v1.TelegramGateway`.
    pub const TELEGRAM_GATEWAY: &str = "engram.v1.TelegramGateway";
}
