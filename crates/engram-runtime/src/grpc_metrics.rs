//! Per-method request counts and latencies of every gRPC server, for the dashboards' "errors
//! and latency per service": `engram_grpc_server_requests_total{method,code}` and
//! `engram_grpc_server_seconds{method}`. A middleware in front of the routes (outside the
//! authorization check, so refusals count as PermissionDenied).
//!
//! The code is the `grpc-status` of the response headers: tonic puts it there for every
//! error of a unary call ("trailers-only"); a response without it is counted OK, and a
//! stream's time is the time to its first headers.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The two metrics, cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct GrpcMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

impl GrpcMetrics {
    /// Registers both metrics.
    ///
    /// # Errors
    ///
    /// On a duplicate registration.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "engram_grpc_server_requests_total",
                "gRPC calls served, by method and status code.",
            ),
            &["method", "code"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "engram_grpc_server_seconds",
                "Time from a call's arrival to its response headers, by method.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Self { requests, seconds })
    }
}

/// The canonical name of a gRPC status code (as in the gRPC spec's status codes).
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "Cancelled",
        "2" => "Unknown",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "10" => "Aborted",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "15" => "DataLoss",
        "16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// Method label: the path for Engram's and the health service's methods; anything else (a
/// scanner's made-up paths) is "other", so a caller cannot grow the label set.
fn method_label(path: &str) -> &str {
    if crate::authz::is_known_method(path) {
        path
    } else {
        "other"
    }
}

/// The middleware.
pub async fn observe(State(metrics): State<GrpcMetrics>, request: Request, next: Next) -> Response {
    let method = method_label(request.uri().path()).to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map_or("OK", code_name);
    metrics
        .requests
        .with_label_values(&[method.as_str(), code])
        .inc();
    metrics
        .seconds
        .with_label_values(&[method.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_their_names_and_junk_is_unknown() {
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("7"), "PermissionDenied");
        assert_eq!(code_name("16"), "Unauthenticated");
        assert_eq!(code_name("99"), "Unknown");
        assert_eq!(code_name("OK"), "Unknown");
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(
            method_label("/engram.v1.AuditSink/Append"),
            "/engram.v1.AuditSink/Append"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/evil.Service/Anything"), "other");
        assert_eq!(method_label("/engram.v1.AuditSink/Append?x"), "other");
    }
}
