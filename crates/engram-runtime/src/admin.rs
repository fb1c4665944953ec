//! The admin HTTP listener: `/healthz`, `/readyz` and `/metrics`, on its own port so that
//! no Service meant for users exposes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::telemetry::Metrics;

/// The result of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Fine.
    Ready,
    /// Serving, but something an operator should know (for example Vault unreachable while
    /// the last good secret is still in use).
    Degraded(String),
    /// Not ready: traffic should not come here.
    NotReady(String),
}

type CheckFn = Arc<dyn Fn() -> BoxFuture<'static, Check> + Send + Sync>;

/// The set of checks behind `/readyz`. Components add theirs at build time.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
    draining: Arc<AtomicBool>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What `/readyz` answers, as JSON.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadinessReport {
    /// Whether every check passed.
    pub ready: bool,
    /// Why not, one line per failed check.
    pub reasons: Vec<String>,
    /// Degraded but serving.
    pub warnings: Vec<String>,
}

/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    /// Adds a named check.
    pub fn add_check<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Check> + Send + 'static,
    {
        let check: CheckFn = Arc::new(move || Box::pin(check()));
        self.checks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.into(), check));
    }

    /// From now on, not ready: the service is shutting down.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Runs every check (each bounded by a timeout).
    pub async fn evaluate(&self) -> ReadinessReport {
        let checks: Vec<(String, CheckFn)> = self
            .checks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut report = ReadinessReport {
            ready: true,
            reasons: Vec::new(),
            warnings: Vec::new(),
        };
        if self.draining.load(Ordering::SeqCst) {
            report.ready = false;
            report.reasons.push("shutting down".to_owned());
        }
        let results = futures::future::join_all(checks.iter().map(|(name, check)| async move {
            let outcome = tokio::time::timeout(CHECK_TIMEOUT, check())
                .await
                .unwrap_or_else(|_| {
                    Check::NotReady(format!("check timed out after {CHECK_TIMEOUT:?}"))
                });
            (name, outcome)
        }))
        .await;
        for (name, outcome) in results {
            match outcome {
                Check::Ready => {}
                Check::Degraded(why) => report.warnings.push(format!("{name}: {why}")),
                Check::NotReady(why) => {
                    report.ready = false;
                    report.reasons.push(format!("{name}: {why}"));
                }
            }
        }
        report
    }
}

/// Shared state of the admin routes.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The service's metrics.
    pub metrics: Metrics,
    /// The service's readiness checks.
    pub readiness: Readiness,
}

/// The admin router; a function so tests can drive it with `oneshot`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "status": "ok" })),
    )
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let report = state.readiness.evaluate().await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_json(router: Router, path: &str) -> (StatusCode, serde_json::Value) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn state() -> AdminState {
        AdminState {
            metrics: Metrics::new("test", "0").expect("metrics"),
            readiness: Readiness::default(),
        }
    }

    #[tokio::test]
    async fn readyz_lists_every_failing_reason_and_warnings() {
        let state = state();
        state
            .readiness
            .add_check("secrets", || async { Check::NotReady("not loaded".into()) });
        state
            .readiness
            .add_check("vault", || async { Check::Degraded("unreachable".into()) });
        state.readiness.add_check("disk", || async { Check::Ready });
        let (status, body) = get_json(router(state), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reasons"], serde_json::json!(["secrets: not loaded"]));
        assert_eq!(body["warnings"], serde_json::json!(["vault: unreachable"]));
    }

    #[tokio::test]
    async fn readyz_is_200_when_all_pass_and_503_when_draining() {
        let state = state();
        state.readiness.add_check("ok", || async { Check::Ready });
        let (status, _) = get_json(router(state.clone()), "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        state.readiness.set_draining();
        let (status, body) = get_json(router(state), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reasons"][0], "shutting down");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_times_out_as_not_ready() {
        let state = state();
        state
            .readiness
            .add_check("hangs", futures::future::pending::<Check>);
        let (status, body) = get_json(router(state), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body["reasons"][0]
                .as_str()
                .unwrap_or_default()
                .contains("timed out")
        );
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_healthz_is_200() {
        let (status, _) = get_json(router(state()), "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = get_json(router(state()), "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
    }
}
