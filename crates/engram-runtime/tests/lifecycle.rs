//! Shutdown: gRPC health and `/readyz` go NOT_SERVING first, in-flight calls finish within
//! the grace period, and a call that outlives it does not hold the process hostage.

use std::sync::Arc;
use std::time::Duration;

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::audit_sink_server::{AuditSink, AuditSinkServer};
use engram_proto::v1::{HeadRequest, HeadResponse};
use engram_runtime::config::MapSource;
use engram_runtime::{Application, RuntimeConfig, ServiceSpec};
use engram_testkit::{OpenBao, http_get, poll_until};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SPEC: ServiceSpec = ServiceSpec {
    name: "lifecycle-test",
    version: "0.0.0",
    grpc_service: "engram.v1.AuditSink",
    secret_path: "engram/lifecycle",
    required_secret_fields: &["hmac_key"],
    default_grpc_port: 0,
    default_admin_port: 0,
};

/// `Head` blocks until released, so a call can be held in flight across a shutdown.
struct SlowHead {
    entered: Arc<Semaphore>,
    release: Arc<Notify>,
}

#[tonic::async_trait]
impl AuditSink for SlowHead {
    async fn head(
        &self,
        _: tonic::Request<HeadRequest>,
    ) -> Result<tonic::Response<HeadResponse>, tonic::Status> {
        self.entered.add_permits(1);
        self.release.notified().await;
        Ok(tonic::Response::new(HeadResponse {
            sequence: 7,
            ..HeadResponse::default()
        }))
    }
}

struct Harness {
    _bao: OpenBao,
    app: Option<Application>,
    entered: Arc<Semaphore>,
    release: Arc<Notify>,
}

async fn harness(grace: &str, drain_delay: &str) -> Harness {
    let bao = OpenBao::start().await.expect("openbao");
    bao.put_secret("engram/lifecycle", serde_json::json!({ "hmac_key": "k" }))
        .await
        .expect("seed");
    let env = MapSource::from_pairs([
        ("ENGRAM_GRPC_ADDR", "127.0.0.1:0".to_owned()),
        ("ENGRAM_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("ENGRAM_VAULT_ADDR", bao.addr()),
        ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
        ("ENGRAM_SHUTDOWN_GRACE_SECS", grace.to_owned()),
        ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", drain_delay.to_owned()),
        ("ENGRAM_TLS_MODE", "off".to_owned()),
    ]);
    let config = RuntimeConfig::load(&SPEC, &env).expect("config");
    let entered = Arc::new(Semaphore::new(0));
    let release = Arc::new(Notify::new());
    let service = SlowHead {
        entered: entered.clone(),
        release: release.clone(),
    };
    let app = Application::build(SPEC, config, |_| {
        Ok(Routes::new(AuditSinkServer::new(service)))
    })
    .await
    .expect("build");
    Harness {
        _bao: bao,
        app: Some(app),
        entered,
        release,
    }
}

async fn health_status(client: &mut HealthClient<tonic::transport::Channel>) -> i32 {
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: "engram.v1.AuditSink".to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_in_flight_calls_after_marking_not_serving() {
    let mut harness = harness("10", "3").await;
    let app = harness.app.take().expect("app");
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    poll_until("SERVING", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move { (health_status(&mut health).await == ServingStatus::Serving as i32).then_some(()) }
    })
    .await
    .expect("serving once the secret is loaded");

    let mut client = AuditSinkClient::new(channel);
    let in_flight = tokio::spawn(async move { client.head(HeadRequest {}).await });
    let _permit = harness
        .entered
        .acquire()
        .await
        .expect("call entered the handler");

    shutdown.cancel();
    // During the drain delay (3 s) the listener still accepts, so probes can see the flip.
    poll_until(
        "NOT_SERVING while the call is in flight",
        Duration::from_secs(3),
        || {
            let mut health = health.clone();
            async move {
                (health_status(&mut health).await == ServingStatus::NotServing as i32).then_some(())
            }
        },
    )
    .await
    .expect("health flips first");
    let (status, body) = http_get(admin, "/readyz")
        .await
        .expect("admin still answers while draining");
    assert_eq!(status, 503);
    assert!(body.contains("shutting down"), "{body}");
    // After the drain delay the listener closes, yet the run waits for the call in flight.
    poll_until(
        "the listener to close",
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(grpc)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await
    .expect("stops accepting");
    assert!(
        !task.is_finished(),
        "the server waits for the call in flight"
    );

    harness.release.notify_one();
    let response = in_flight
        .await
        .expect("join")
        .expect("the in-flight call completes");
    assert_eq!(response.into_inner().sequence, 7);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops after draining")
        .expect("join")
        .expect("clean");
    health_status(&mut health).await; // the connection is gone; nothing to assert beyond not hanging
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_outlives_the_grace_period_does_not_block_shutdown() {
    let mut harness = harness("0.5", "0.1").await;
    let app = harness.app.take().expect("app");
    let grpc = app.grpc_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = AuditSinkClient::new(channel);
    let in_flight = tokio::spawn(async move { client.head(HeadRequest {}).await });
    let _permit = harness.entered.acquire().await.expect("entered");

    shutdown.cancel();
    // Never released: the run must still end once the 0.5 s grace period is over.
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("ends after the grace period")
        .expect("join")
        .expect("grace expiry is not an error");
    // In a binary, returning from the run ends the process and with it the abandoned call;
    // here the test lets it go itself.
    harness.release.notify_one();
    in_flight.abort();
}
