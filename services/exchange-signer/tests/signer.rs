//! The real signer over gRPC against the exchange double and a real audit sink, both on one
//! real OpenBao: audit before send, idempotency, every policy rule, the kill switch, bad
//! input, an unknown outcome, a dangerous key, caps across a restart, rotation under load.

use std::time::Duration;

use engram_doubles::exchange::{ExchangeDouble, KeyKind, Knobs, Restrictions};
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_proto::v1::{
    GetStatusRequest, HaltRequest, OrderSide, OrderStatus, OrderType, PlaceOrderRequest,
    QueryRequest, RequestContext, ResumeRequest,
};
use engram_runtime::{InProcessService, ServiceConfig, ServiceContext};
use engram_testkit::{OpenBao, http_get, poll_until};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Channel;

type Running = InProcessService;

async fn start_app<C: ServiceConfig>(
    spec: engram_runtime::ServiceSpec,
    env: Vec<(&'static str, String)>,
    build: impl FnOnce(&ServiceContext, C) -> anyhow::Result<Routes>,
) -> Running {
    InProcessService::start(spec, env, build)
        .await
        .expect("service starts")
}

struct Stack {
    bao: OpenBao,
    double: ExchangeDouble,
    _audit_dir: tempfile::TempDir,
    _state_dir: tempfile::TempDir,
    audit: Option<Running>,
    signer: Option<Running>,
    signer_env: Vec<(&'static str, String)>,
}

const KEY: &str = "signer-test-key";
const SECRET: &str = "signer-test-secret";

impl Stack {
    async fn start(policy: &[(&'static str, &str)], restrictions: Restrictions) -> Self {
        let secret = json!({ "api_key": KEY, "api_secret": SECRET });
        Self::start_with_key(
            policy,
            restrictions,
            secret,
            KeyKind::Hmac(SECRET.to_owned()),
        )
        .await
    }

    async fn start_with_key(
        policy: &[(&'static str, &str)],
        restrictions: Restrictions,
        secret: serde_json::Value,
        kind: KeyKind,
    ) -> Self {
        let bao = OpenBao::start().await.expect("openbao");
        bao.put_secret("engram/audit", json!({ "hmac_key": "audit-key" }))
            .await
            .expect("audit secret");
        bao.put_secret("engram/exchange", secret)
            .await
            .expect("exchange secret");
        bao.put_custom_metadata("engram/exchange", json!({ "created": "2026-11-01" }))
            .await
            .expect("metadata");
        let double = ExchangeDouble::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("double");
        double.add_key(KEY, kind, restrictions);
        let audit_dir = tempfile::tempdir().expect("tempdir");
        let vault = vec![
            ("ENGRAM_VAULT_ADDR", bao.addr()),
            ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
        ];
        let mut audit_env = vault.clone();
        audit_env.push(("ENGRAM_AUDIT_DIR", audit_dir.path().display().to_string()));
        let audit = start_app(audit_sink::SPEC, audit_env, audit_sink::routes).await;
        let state_dir = tempfile::tempdir().expect("tempdir");
        let mut signer_env = vault;
        signer_env.push((
            "ENGRAM_SIGNER_STATE_DIR",
            state_dir.path().display().to_string(),
        ));
        signer_env.push(("ENGRAM_EXCHANGE_URL", double.url()));
        signer_env.push(("ENGRAM_AUDIT_ADDR", format!("http://{}", audit.grpc_addr)));
        signer_env.push(("ENGRAM_POLICY_SYMBOLS", "BTCUSDT".to_owned()));
        for (name, value) in policy {
            signer_env.push((name, (*value).to_owned()));
        }
        let mut stack = Self {
            bao,
            double,
            _audit_dir: audit_dir,
            _state_dir: state_dir,
            audit: Some(audit),
            signer: None,
            signer_env,
        };
        stack.start_signer().await;
        stack
    }

    async fn start_signer(&mut self) {
        let signer = start_app(
            exchange_signer::SPEC,
            self.signer_env.clone(),
            exchange_signer::routes,
        )
        .await;
        self.signer = Some(signer);
    }

    fn signer(&self) -> &Running {
        self.signer.as_ref().expect("signer running")
    }

    async fn wait_ready(&self) {
        let admin = self.signer().admin_addr;
        poll_until("signer /readyz 200", Duration::from_secs(20), || async move {
            matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await
        .expect("signer ready");
    }

    async fn client(&self) -> ExchangeSignerClient<Channel> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.signer().grpc_addr))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
        ExchangeSignerClient::new(channel)
    }

    async fn audit_actions(&self) -> Vec<(String, String)> {
        let addr = self.audit.as_ref().expect("audit").grpc_addr;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut stream = AuditSinkClient::new(channel)
            .query(QueryRequest {
                actor_service: "exchange-signer".to_owned(),
                ..Default::default()
            })
            .await
            .expect("query")
            .into_inner();
        let mut out = Vec::new();
        while let Some(record) = stream.message().await.expect("record") {
            out.push((record.action, record.correlation_id));
        }
        out
    }
}

fn order(id: &str, symbol: &str, kind: OrderType, qty: &str, price: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        context: Some(RequestContext {
            idempotency_key: id.to_owned(),
            correlation_id: format!("corr-{id}"),
            actor: None,
        }),
        symbol: symbol.to_owned(),
        side: OrderSide::Buy as i32,
        r#type: kind as i32,
        quantity: qty.to_owned(),
        limit_price: price.to_owned(),
        time_in_force: 0,
    }
}

fn market(id: &str, qty: &str) -> PlaceOrderRequest {
    order(id, "BTCUSDT", OrderType::Market, qty, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_audited_before_it_is_sent_and_a_repeat_replays_it() {
    let stack = Stack::start(&[], Restrictions::default()).await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    let first = client
        .place_order(market("nonce-1", "0.01"))
        .await
        .expect("placed")
        .into_inner();
    assert!(!first.replayed);
    let placed = first.order.expect("order");
    assert_eq!(placed.status, OrderStatus::Filled as i32);
    assert_eq!(placed.client_order_id, "nonce-1");

    let again = client
        .place_order(market("nonce-1", "0.01"))
        .await
        .expect("replayed")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(
        again.order.expect("order").exchange_order_id,
        placed.exchange_order_id
    );
    assert_eq!(
        stack.double.orders_with_client_id("nonce-1"),
        1,
        "one order, not two"
    );

    // ORDER_PLACED is recorded just after the answer: wait for it, then check the order.
    let mine = poll_until("ORDER_PLACED recorded", Duration::from_secs(10), || async {
        let actions = stack.audit_actions().await;
        let mine: Vec<String> = actions
            .into_iter()
            .filter(|(_, c)| c == "corr-nonce-1")
            .map(|(a, _)| a)
            .collect();
        (mine.len() >= 2).then_some(mine)
    })
    .await
    .expect("both records");
    assert_eq!(
        mine,
        ["ORDER_REQUESTED", "ORDER_PLACED"],
        "requested is recorded before the result"
    );
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.key_version, 1);
    assert!(
        status
            .key_restrictions
            .is_some_and(|r| !r.enable_withdrawals && r.ip_restricted)
    );
    assert_eq!(status.today_notional, "432.5010");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_rule_refuses_with_its_name_and_the_kill_switch_holds() {
    let stack = Stack::start(
        &[
            ("ENGRAM_POLICY_MAX_ORDER_NOTIONAL", "1000"),
            ("ENGRAM_POLICY_MAX_DAILY_NOTIONAL", "1500"),
            ("ENGRAM_POLICY_PRICE_BAND_BPS", "100"),
            ("ENGRAM_POLICY_ORDER_TYPES", "MARKET,LIMIT"),
            ("ENGRAM_POLICY_SIDES", "BUY"),
        ],
        Restrictions::default(),
    )
    .await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    let mut sell = market("sell-1", "0.01");
    sell.side = OrderSide::Sell as i32;
    let cases = [
        (
            "symbol_allowlist",
            order("r1", "ETHUSDT", OrderType::Market, "0.1", ""),
        ),
        ("allowed_sides", sell),
        (
            "price_band",
            order("r3", "BTCUSDT", OrderType::Limit, "0.01", "45000.00"),
        ),
        ("max_order_notional", market("r4", "0.03")),
    ];
    for (rule, request) in cases {
        let status = client.place_order(request).await.expect_err(rule);
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{rule}: {status:?}"
        );
        assert!(
            status.message().contains(rule),
            "{rule}: {}",
            status.message()
        );
    }
    client
        .place_order(market("ok-1", "0.02"))
        .await
        .expect("865 USDT fits");
    let daily = client
        .place_order(market("r5", "0.02"))
        .await
        .expect_err("over the daily cap");
    assert!(
        daily.message().contains("max_daily_notional"),
        "{}",
        daily.message()
    );

    client
        .halt(HaltRequest {
            context: None,
            reason: "operator test".to_owned(),
        })
        .await
        .expect("halt");
    let halted = client
        .place_order(market("h-1", "0.001"))
        .await
        .expect_err("halted");
    assert!(
        halted.message().contains("kill_switch"),
        "{}",
        halted.message()
    );
    assert!(
        client
            .halt(HaltRequest {
                context: None,
                reason: String::new()
            })
            .await
            .is_err(),
        "a reason is required"
    );
    let status = client
        .resume(ResumeRequest { context: None })
        .await
        .expect("resume")
        .into_inner();
    assert!(!status.halted);
    assert_eq!(stack.double.orders_with_client_id("h-1"), 0);
    let (_, metrics) = http_get(stack.signer().admin_addr, "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics.contains("engram_signer_policy_rejections_total{rule=\"price_band\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_invalid_argument_naming_the_field() {
    let stack = Stack::start(&[], Restrictions::default()).await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    let mut no_key = market("x", "0.01");
    no_key.context = None;
    let mut no_side = market("s", "0.01");
    no_side.side = 0;
    let cases = [
        ("quantity", market("q1", "-1")),
        ("quantity", market("q2", "0")),
        ("quantity", market("q3", "0.000000001")),
        ("quantity", market("q4", "1e3")),
        (
            "symbol",
            order("s1", "btcusdt", OrderType::Market, "0.01", ""),
        ),
        (
            "symbol",
            order("s2", "NOT-A-SYMBOL", OrderType::Market, "0.01", ""),
        ),
        ("idempotency_key", no_key),
        ("idempotency_key", market("has spaces", "0.01")),
        ("side", no_side),
        (
            "limit_price",
            order("l1", "BTCUSDT", OrderType::Limit, "0.01", ""),
        ),
        (
            "limit_price",
            order("l2", "BTCUSDT", OrderType::Market, "0.01", "40000"),
        ),
        (
            "type",
            order("t1", "BTCUSDT", OrderType::Unspecified, "0.01", ""),
        ),
    ];
    for (field, request) in cases {
        let status = client.place_order(request).await.expect_err(field);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    // A symbol that is well formed but unknown to the policy is a policy refusal, not a crash.
    let unknown = client
        .place_order(order("u1", "NOSUCHCOIN", OrderType::Market, "1", ""))
        .await
        .expect_err("unknown symbol");
    assert_eq!(unknown.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_audit_sink_down_nothing_is_sent() {
    let mut stack = Stack::start(&[], Restrictions::default()).await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    stack.audit.take().expect("audit").stop().await;
    let status = client
        .place_order(market("no-audit", "0.01"))
        .await
        .expect_err("fail closed");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("nothing was sent"),
        "{}",
        status.message()
    );
    assert_eq!(stack.double.orders_with_client_id("no-audit"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_acceptance_leaves_exactly_one_order() {
    let stack = Stack::start(&[], Restrictions::default()).await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    stack.double.set_knobs(Knobs {
        fail_after_accept: 1,
        ..Knobs::default()
    });
    let placed = client
        .place_order(market("five-xx", "0.01"))
        .await
        .expect("reconciled")
        .into_inner();
    assert_eq!(placed.order.expect("order").client_order_id, "five-xx");
    assert_eq!(stack.double.orders_with_client_id("five-xx"), 1);
    // And the caller's retry is answered with the first outcome.
    assert!(
        client
            .place_order(market("five-xx", "0.01"))
            .await
            .expect("retry")
            .into_inner()
            .replayed
    );
    assert_eq!(stack.double.orders_with_client_id("five-xx"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_can_withdraw_never_becomes_ready() {
    let stack = Stack::start(
        &[],
        Restrictions {
            enable_withdrawals: true,
            ..Restrictions::default()
        },
    )
    .await;
    let admin = stack.signer().admin_addr;
    let body = poll_until(
        "the withdrawal risk reported",
        Duration::from_secs(20),
        || async move {
            match http_get(admin, "/readyz").await {
                Ok((503, body)) if body.contains("withdrawals") => Some(body),
                _ => None,
            }
        },
    )
    .await
    .expect("reported");
    assert!(body.contains("refusing to trade"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_cap_survives_a_restart() {
    let mut stack = Stack::start(
        &[
            ("ENGRAM_POLICY_MAX_DAILY_NOTIONAL", "1000"),
            ("ENGRAM_POLICY_MAX_ORDER_NOTIONAL", "1000"),
        ],
        Restrictions::default(),
    )
    .await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    client
        .place_order(market("cap-1", "0.02"))
        .await
        .expect("865 USDT");
    stack.signer.take().expect("signer").stop().await;
    stack.start_signer().await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    let refused = client
        .place_order(market("cap-2", "0.01"))
        .await
        .expect_err("the restart did not reset the cap");
    assert!(
        refused.message().contains("max_daily_notional"),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_key_under_a_stream_of_orders_fails_none() {
    let stack = Stack::start(
        &[
            ("ENGRAM_POLICY_MAX_DAILY_NOTIONAL", "100000"),
            ("ENGRAM_POLICY_MAX_ORDERS_PER_MINUTE", "1000"),
        ],
        Restrictions::default(),
    )
    .await;
    stack.wait_ready().await;
    let client = stack.client().await;
    let stop = CancellationToken::new();
    let worker = {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            let mut i = 0;
            while !stop.is_cancelled() {
                match client
                    .place_order(market(&format!("rot-{i}"), "0.001"))
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(status) => failed.push(status.message().to_owned()),
                }
                i += 1;
            }
            (ok, failed)
        })
    };
    // New key at the exchange, new version in Vault; the old key goes once v2 is in use.
    stack.double.add_key(
        "canary-key-2",
        KeyKind::Hmac("canary-secret-2".to_owned()),
        Restrictions::default(),
    );
    stack
        .bao
        .put_secret(
            "engram/exchange",
            json!({ "api_key": "canary-key-2", "api_secret": "canary-secret-2" }),
        )
        .await
        .expect("rotate");
    let admin = stack.signer().admin_addr;
    poll_until(
        "key version 2 in use",
        Duration::from_secs(10),
        || async move {
            let text = http_get(admin, "/metrics").await.ok()?.1;
            text.contains("engram_secret_version{path=\"engram/exchange\"} 2")
                .then_some(())
        },
    )
    .await
    .expect("rotated");
    // The old key may go once the signer has signed with the new one.
    let double = stack.double.clone();
    poll_until(
        "a request signed with the new key",
        Duration::from_secs(10),
        || {
            let double = double.clone();
            async move { (double.requests_by_key("canary-key-2") > 0).then_some(()) }
        },
    )
    .await
    .expect("new key in use");
    stack.double.remove_key(KEY);
    tokio::time::sleep(Duration::from_millis(500)).await; // let orders flow on the new key only
    stop.cancel();
    let (ok, failed) = worker.await.expect("worker");
    assert!(ok > 5, "orders kept flowing: {ok}");
    assert!(
        failed.is_empty(),
        "no request failed because of the rotation: {failed:?}"
    );
    let status = stack
        .client()
        .await
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.key_version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_key_signs_orders_end_to_end() {
    use base64::Engine;
    use ring::signature::KeyPair;
    // A fresh key for this test only; Vault holds the seed, the exchange the public key.
    let seed: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 % 251).unwrap_or(0));
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("pair");
    let stack = Stack::start_with_key(
        &[],
        Restrictions::default(),
        json!({ "api_key": KEY, "ed25519_private_key": base64::engine::general_purpose::STANDARD.encode(seed) }),
        KeyKind::Ed25519(pair.public_key().as_ref().to_vec()),
    )
    .await;
    stack.wait_ready().await;
    let placed = stack
        .client()
        .await
        .place_order(market("ed-1", "0.01"))
        .await
        .expect("placed")
        .into_inner();
    assert_eq!(
        placed.order.expect("order").status,
        OrderStatus::Filled as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_418_halts_trading_and_429_is_reported_as_unavailable() {
    let stack = Stack::start(&[], Restrictions::default()).await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    stack.double.set_knobs(Knobs {
        rate_limit_next: 1,
        retry_after_secs: 1,
        ..Knobs::default()
    });
    let limited = client
        .place_order(market("rl-1", "0.01"))
        .await
        .expect_err("429");
    assert_eq!(limited.code(), tonic::Code::Unavailable);
    assert!(
        limited.message().contains("rate limit"),
        "{}",
        limited.message()
    );

    stack.double.set_knobs(Knobs {
        banned: true,
        ..Knobs::default()
    });
    let banned = client
        .place_order(market("ban-1", "0.01"))
        .await
        .expect_err("418");
    assert_eq!(banned.code(), tonic::Code::Unavailable);
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(
        status.halted && status.halt_reason.contains("418"),
        "{status:?}"
    );
    // Even after the exchange lifts the ban, nothing more is sent until an operator acts.
    stack.double.set_knobs(Knobs::default());
    assert!(client.place_order(market("ban-2", "0.01")).await.is_err());
    assert_eq!(stack.double.orders_with_client_id("ban-2"), 0);
    assert!(
        client
            .resume(ResumeRequest { context: None })
            .await
            .is_err(),
        "resume is refused while the ban holds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_survives_a_restart_and_so_does_a_resume() {
    let mut stack = Stack::start(&[], Restrictions::default()).await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    client
        .halt(HaltRequest {
            context: None,
            reason: "incident 42".to_owned(),
        })
        .await
        .expect("halt");
    stack.signer.take().expect("signer").stop().await;
    stack.start_signer().await;
    stack.wait_ready().await;
    let mut client = stack.client().await;
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.halted, "the restart did not lift the kill switch");
    assert_eq!(status.halt_reason, "incident 42");
    let refused = client
        .place_order(market("after-restart", "0.01"))
        .await
        .expect_err("still halted");
    assert!(
        refused.message().contains("kill_switch"),
        "{}",
        refused.message()
    );

    client
        .resume(ResumeRequest { context: None })
        .await
        .expect("resume");
    stack.signer.take().expect("signer").stop().await;
    stack.start_signer().await;
    stack.wait_ready().await;
    let status = stack
        .client()
        .await
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(!status.halted, "a recorded resume survives the restart too");
}
