//! The runtime every Engram service shares: typed config, Vault secrets that rotate without
//! restarts, telemetry (JSON logs, OTLP traces, Prometheus metrics), the admin HTTP server,
//! gRPC bootstrap with health and trace propagation, mutual TLS with per-RPC authorization,
//! and graceful shutdown.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod authz;
pub mod config;
pub mod grpc;
pub mod grpc_metrics;
pub mod secrets;
pub mod service;
pub mod telemetry;
pub mod tls;

pub use service::{
    Application, InProcessService, RuntimeConfig, ServiceConfig, ServiceContext, ServiceSpec,
    run_main,
};
