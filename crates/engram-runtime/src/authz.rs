//! Per-RPC authorization: which caller identity may call which method, default deny. The
//! table is DESIGN.md's "who may call what"; every server checks it on every request before
//! any handler runs. A refusal answers PERMISSION_DENIED, is logged on the `security` target,
//! counted, and recorded in the audit trail as `RPC_DENIED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use engram_proto::v1::AuditCategory;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::ServiceContext;
use crate::audit::{event, text};
use crate::tls::PeerInfo;

/// The operator's command-line tool, as a caller.
pub const OPERATOR: &str = "engramctl";

/// Caller → gRPC service → methods it may call. Nothing else is allowed.
const TABLE: &[(&str, &str, &[&str])] = &[
    (
        "telegram-gateway",
        "engram.v1.ExchangeSigner",
        &[
            "PlaceOrder",
            "CancelOrder",
            "GetOrder",
            "ListOpenOrders",
            "GetBalances",
            "GetPrice",
            "GetStatus",
            "Halt",
            "Resume",
        ],
    ),
    ("telegram-gateway", "engram.v1.LlmAdvisor", &["Advise"]),
    // Head: the gateway's /audit and /status show how long the trail is.
    (
        "telegram-gateway",
        "engram.v1.AuditSink",
        &["Append", "Query", "Verify", "Head"],
    ),
    ("exchange-signer", "engram.v1.AuditSink", &["Append"]),
    (
        "exchange-signer",
        "engram.v1.TelegramGateway",
        &["SendAlert"],
    ),
    ("llm-advisor", "engram.v1.AuditSink", &["Append"]),
    ("audit-sink", "engram.v1.TelegramGateway", &["SendAlert"]),
    (
        OPERATOR,
        "engram.v1.AuditSink",
        &["Query", "Verify", "Head"],
    ),
    (
        OPERATOR,
        "engram.v1.ExchangeSigner",
        &["GetStatus", "Halt", "Resume"],
    ),
];

/// The standard health service: any authenticated Engram identity may ask.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Every (caller, `/service/method`) pair the table allows, for tests and docs.
pub fn allowed_pairs() -> Vec<(&'static str, String)> {
    TABLE
        .iter()
        .flat_map(|(caller, service, methods)| {
            methods
                .iter()
                .map(move |method| (*caller, format!("/{service}/{method}")))
        })
        .collect()
}

/// Whether `caller` (a service name from its certificate, `None` without one) may call the
/// gRPC method at `path` (`/package.Service/Method`).
pub fn is_allowed(caller: Option<&str>, path: &str) -> bool {
    let Some(caller) = caller else {
        return false;
    };
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    if service == HEALTH_SERVICE {
        return true;
    }
    TABLE
        .iter()
        .any(|(who, svc, methods)| *who == caller && *svc == service && methods.contains(&method))
}

/// At most one `RPC_DENIED` record per caller and method in this window: a misbehaving peer
/// must not be able to flood the audit trail (every denial is still counted and logged).
const RECORD_WINDOW: Duration = Duration::from_secs(60);
const MAX_TRACKED: usize = 1024;

/// What the authorization middleware needs.
#[derive(Clone)]
pub struct Authorizer {
    context: ServiceContext,
    service: &'static str,
    denied: IntCounterVec,
    recorded: Arc<Mutex<HashMap<(String, String), Instant>>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// The authorizer of `service`'s server.
    ///
    /// # Errors
    ///
    /// When the metric cannot be registered.
    pub fn new(
        service: &'static str,
        context: &ServiceContext,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let denied = IntCounterVec::new(
            Opts::new(
                "engram_grpc_denied_total",
                "Calls refused by per-RPC authorization, by caller identity and method",
            ),
            &["caller", "method"],
        )?;
        registry.register(Box::new(denied.clone()))?;
        Ok(Self {
            context: context.clone(),
            service,
            denied,
            recorded: Arc::default(),
        })
    }

    /// Whether this (caller, method) denial should be recorded now.
    fn should_record(&self, caller: &str, method: &str) -> bool {
        let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if recorded.len() >= MAX_TRACKED {
            recorded.retain(|_, at| now.duration_since(*at) < RECORD_WINDOW);
            if recorded.len() >= MAX_TRACKED {
                return false;
            }
        }
        let key = (caller.to_owned(), method.to_owned());
        match recorded.get(&key) {
            Some(at) if now.duration_since(*at) < RECORD_WINDOW => false,
            _ => {
                recorded.insert(key, now);
                true
            }
        }
    }

    fn deny(&self, peer: Option<&PeerInfo>, path: &str) {
        let caller = peer
            .and_then(|p| p.identity.as_deref())
            .unwrap_or("unidentified");
        // Bounded label values: callers come from our own CA, methods from our own protos.
        let method = if is_known_method(path) {
            path
        } else {
            "unknown"
        };
        self.denied.with_label_values(&[caller, method]).inc();
        let remote = peer
            .and_then(|p| p.remote_addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::warn!(target: "security", caller, method, remote, "RPC denied by authorization");
        if !self.should_record(caller, method) {
            return;
        }
        if let Some(recorder) = self.context.audit() {
            let record = event(
                self.service,
                AuditCategory::Security,
                "RPC_DENIED",
                &[
                    ("caller", text(caller)),
                    ("method", text(method)),
                    ("remote_addr", text(remote)),
                ],
            );
            tokio::spawn(async move {
                if let Err(error) = recorder.record(record).await {
                    tracing::warn!(target: "security", error = %error, "could not record RPC_DENIED");
                }
            });
        }
    }
}

/// Whether `path` is a method of the table or of the health service.
/// Runs on every call (the metrics label), so it reads the table in place, allocating nothing.
pub(crate) fn is_known_method(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    service == HEALTH_SERVICE
        || TABLE
            .iter()
            .any(|(_, svc, methods)| *svc == service && methods.contains(&method))
}

/// The axum middleware every mutual-TLS server runs in front of its routes.
pub async fn authorize(
    State(authorizer): State<Authorizer>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<PeerInfo>().cloned();
    let path = request.uri().path().to_owned();
    if is_allowed(peer.as_ref().and_then(|p| p.identity.as_deref()), &path) {
        return next.run(request).await;
    }
    authorizer.deny(peer.as_ref(), &path);
    tonic::Status::permission_denied(format!(
        "{} may not call {path}",
        peer.as_ref()
            .and_then(|p| p.identity.as_deref())
            .map_or_else(
                || "an unidentified caller".to_owned(),
                crate::tls::spiffe_id
            )
    ))
    .into_http::<axum::body::Body>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_default_deny() {
        assert!(is_allowed(
            Some("telegram-gateway"),
            "/engram.v1.ExchangeSigner/PlaceOrder"
        ));
        assert!(is_allowed(
            Some("exchange-signer"),
            "/engram.v1.AuditSink/Append"
        ));
        assert!(!is_allowed(
            Some("llm-advisor"),
            "/engram.v1.ExchangeSigner/PlaceOrder"
        ));
        assert!(!is_allowed(
            Some("exchange-signer"),
            "/engram.v1.AuditSink/Query"
        ));
        assert!(!is_allowed(
            Some(OPERATOR),
            "/engram.v1.ExchangeSigner/PlaceOrder"
        ));
        assert!(!is_allowed(None, "/engram.v1.AuditSink/Append"));
        assert!(!is_allowed(None, "/grpc.health.v1.Health/Check"));
        assert!(is_allowed(
            Some("llm-advisor"),
            "/grpc.health.v1.Health/Check"
        ));
        for bad in [
            "",
            "/",
            "//",
            "/engram.v1.AuditSink",
            "engram.v1.AuditSink/Append",
        ] {
            assert!(!is_allowed(Some("telegram-gateway"), bad), "{bad:?}");
        }
    }
}
