//! The whole stack driven from the Telegram double, as people use it: a trader's confirmed
//! order fills at the exchange double, `/audit` shows the trail, the chain verifies, an
//! outsider is refused and the admin chat alerted, the advisor answers; and the same with
//! the exchange key, the bot token and the audit key rotated while orders stream through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use engram_doubles::exchange::{KeyKind, Restrictions};
use engram_e2e::{
    ADMIN, AUDIT_KEY, BOT_TOKEN, EXCHANGE_SECRET, OUTSIDER, Options, Stack, TRADER, text_detail,
};
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_proto::v1::{
    AuditRecord, OrderSide, OrderType, PlaceOrderRequest, QueryRequest, RequestContext,
    VerifyRequest,
};
use engram_testkit::poll_until;
use serde_json::json;

async fn records(stack: &Stack, action: &str) -> Vec<AuditRecord> {
    let gateway = stack
        .transport_as("telegram-gateway")
        .await
        .expect("transport");
    let mut audit = AuditSinkClient::new(stack.channel(&gateway, "audit-sink"));
    let mut stream = audit
        .query(QueryRequest {
            action: action.to_owned(),
            limit: 1000,
            ..QueryRequest::default()
        })
        .await
        .expect("query")
        .into_inner();
    let mut found = Vec::new();
    while let Some(record) = stream.message().await.expect("record") {
        found.push(record);
    }
    found
}

async fn verify(stack: &Stack) -> engram_proto::v1::VerifyResponse {
    let gateway = stack
        .transport_as("telegram-gateway")
        .await
        .expect("transport");
    AuditSinkClient::new(stack.channel(&gateway, "audit-sink"))
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner()
}

/// The person's flow: trade, audit, advice, and an outsider (who hears "Unauthorized access"
/// and raises an alert the first time, and then nothing for an hour: no amplification).
async fn people_flow(stack: &Stack, orders_before: usize, outsider_seen_before: bool) {
    let outcome = stack
        .trade(TRADER, "/buy BTCUSDT 0.001")
        .await
        .expect("trade");
    assert!(
        outcome.contains("Order placed") && outcome.contains("FILLED"),
        "{outcome}"
    );
    assert_eq!(
        stack.exchange.order_count(),
        orders_before + 1,
        "one order at the exchange"
    );

    let audit = stack.say(ADMIN, "/audit 20").await.expect("audit");
    let shown = audit
        .iter()
        .find(|a| a.chat_id == ADMIN && a.text.contains("Audit chain verified"))
        .unwrap_or_else(|| panic!("{audit:#?}"));
    for action in ["ORDER_PLACED", "ORDER_REQUESTED", "CONFIRMATION_ACCEPTED"] {
        assert!(shown.text.contains(action), "{}", shown.text);
    }

    let advice = stack
        .say(TRADER, "/advice BTCUSDT is now a good time?")
        .await
        .expect("advice");
    assert!(
        advice
            .iter()
            .any(|a| a.chat_id == TRADER
                && ["BUY", "SELL", "HOLD"].iter().any(|w| a.text.contains(w))),
        "{advice:#?}"
    );

    let seq = stack.telegram.last_seq();
    let refused = stack
        .say(OUTSIDER, "/buy BTCUSDT 1")
        .await
        .expect("outsider");
    if outsider_seen_before {
        assert!(
            refused.iter().all(|a| a.chat_id != OUTSIDER),
            "{refused:#?}"
        );
        assert_eq!(stack.exchange.order_count(), orders_before + 1);
        let check = verify(stack).await;
        assert!(check.ok, "{check:?}");
        return;
    }
    assert!(
        refused
            .iter()
            .any(|a| a.chat_id == OUTSIDER && a.text == "Unauthorized access"),
        "{refused:#?}"
    );
    poll_until(
        "the admin alerted",
        Duration::from_secs(10),
        || async move {
            stack
                .telegram
                .actions_after(seq)
                .into_iter()
                .find(|a| a.chat_id == ADMIN && a.text.contains("Unauthorized access attempt"))
        },
    )
    .await
    .expect("an alert in the admin chat");
    assert_eq!(
        stack.exchange.order_count(),
        orders_before + 1,
        "the outsider placed nothing"
    );
    let check = verify(stack).await;
    assert!(check.ok, "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trader_trades_and_an_outsider_is_refused() {
    let stack = Stack::start(Options::default()).await.expect("stack");
    people_flow(&stack, 0, false).await;
    let outputs = stack.outputs();
    for canary in [BOT_TOKEN, EXCHANGE_SECRET, AUDIT_KEY] {
        assert!(!outputs.contains(canary), "a secret in the logs");
    }
    stack.stop().await;
}

fn order(id: &str, side: OrderSide) -> PlaceOrderRequest {
    PlaceOrderRequest {
        context: Some(RequestContext {
            idempotency_key: id.to_owned(),
            correlation_id: format!("load-{id}"),
            actor: None,
        }),
        symbol: "BTCUSDT".to_owned(),
        side: side as i32,
        r#type: OrderType::Market as i32,
        quantity: "0.001".to_owned(),
        limit_price: String::new(),
        time_in_force: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_load_lose_nothing() {
    let stack = Arc::new(
        Stack::start(Options {
            signer: vec![
                ("ENGRAM_POLICY_MAX_ORDERS_PER_MINUTE", "100000".to_owned()),
                ("ENGRAM_POLICY_MAX_DAILY_NOTIONAL", "100000000".to_owned()),
            ],
            // Checkpoints signed under both audit key versions.
            audit: vec![("ENGRAM_AUDIT_CHECKPOINT_EVERY", "50".to_owned())],
            ..Options::default()
        })
        .await
        .expect("stack"),
    );
    people_flow(&stack, 0, false).await;

    // Orders stream through the signer (as the gateway) from four callers at once.
    let stop = Arc::new(AtomicBool::new(false));
    let (placed, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let gateway = stack
        .transport_as("telegram-gateway")
        .await
        .expect("transport");
    let mut load = Vec::new();
    for worker in 0..4 {
        let mut signer = ExchangeSignerClient::new(stack.channel(&gateway, "exchange-signer"));
        let (stop, placed, failed) = (stop.clone(), placed.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u32;
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let side = if n % 2 == 0 {
                    OrderSide::Sell
                } else {
                    OrderSide::Buy
                };
                match signer
                    .place_order(order(&format!("load-{worker}-{n}"), side))
                    .await
                {
                    Ok(_) => placed.fetch_add(1, Ordering::SeqCst),
                    Err(status) => {
                        errors.push(format!("{status:?}"));
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
            errors
        }));
    }
    let placed_by = |at_least: u64| {
        let placed = placed.clone();
        async move {
            poll_until("orders flowing", Duration::from_secs(30), || {
                let placed = placed.clone();
                async move { (placed.load(Ordering::SeqCst) >= at_least).then_some(()) }
            })
            .await
            .expect("orders flow");
        }
    };
    placed_by(20).await;

    // 1. The exchange key: a new key at the exchange, a new version in Vault; the old key is
    //    revoked once the signer has moved to the new one.
    stack.exchange.add_key(
        "e2e-exchange-key-2",
        KeyKind::Hmac("e2e-canary-exchange-secret-2".to_owned()),
        Restrictions::default(),
    );
    stack
        .bao
        .put_secret(
            "engram/exchange",
            json!({ "api_key": "e2e-exchange-key-2", "api_secret": "e2e-canary-exchange-secret-2" }), // pragma: allowlist secret
        )
        .await
        .expect("new exchange key");
    let stack_ref = &stack;
    poll_until("the signer on the new key", Duration::from_secs(20), || async move {
        (stack_ref.exchange.requests_by_key("e2e-exchange-key-2") > 0).then_some(())
    })
    .await
    .expect("new key in use");
    // Requests signed with the old key just before the swap may still be on the wire.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.exchange.remove_key(engram_e2e::EXCHANGE_KEY);
    let after_exchange = placed.load(Ordering::SeqCst);
    placed_by(after_exchange + 20).await;

    // 2. The bot token.
    stack.telegram.accept_token("300:e2e-canary-bot-token-two");
    stack
        .bao
        .put_secret(
            "engram/telegram",
            json!({
                "bot_token": "300:e2e-canary-bot-token-two",
                "allowed_chats": format!("{ADMIN},{TRADER}"),
                "users": format!("{ADMIN}:admin,{TRADER}:trader"),
                "admin_chat": ADMIN.to_string(),
            }),
        )
        .await
        .expect("new bot token");
    poll_until(
        "the gateway on the new token",
        Duration::from_secs(20),
        || async move { (!records(stack_ref, "BOT_TOKEN_ROTATED").await.is_empty()).then_some(()) },
    )
    .await
    .expect("bot token rotated");
    stack.telegram.revoke_token(BOT_TOKEN);

    // 3. The audit key.
    stack
        .bao
        .put_secret(
            "engram/audit",
            json!({ "hmac_key": "e2e-canary-audit-key-2" }),
        )
        .await
        .expect("new audit key");
    poll_until(
        "the sink on the new key",
        Duration::from_secs(20),
        || async move {
            records(stack_ref, "SECRET_ROTATED")
                .await
                .iter()
                .any(|r| text_detail(r, "secret_path") == "engram/audit")
                .then_some(())
        },
    )
    .await
    .expect("audit key rotated");
    let after_all = placed.load(Ordering::SeqCst);
    placed_by(after_all + 20).await;

    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for worker in load {
        errors.extend(worker.await.expect("worker"));
    }
    let total = placed.load(Ordering::SeqCst);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed requests: {errors:#?}"
    );
    assert!(total >= 60, "{total} orders");

    // Every rotation is in the trail, by version, never by value.
    let rotated = records(&stack, "SECRET_ROTATED").await;
    for path in ["engram/exchange", "engram/telegram", "engram/audit"] {
        assert!(
            rotated
                .iter()
                .any(|r| text_detail(r, "secret_path") == path),
            "{path}: {rotated:#?}"
        );
    }
    // The person's flow works on the new token and key, and the chain verifies across both
    // audit key versions.
    people_flow(&stack, stack.exchange.order_count(), true).await;
    let check = verify(&stack).await;
    assert!(check.ok && check.checkpoints_checked >= 4, "{check:?}");
    let gateway = stack
        .transport_as("telegram-gateway")
        .await
        .expect("transport");
    let head = AuditSinkClient::new(stack.channel(&gateway, "audit-sink"))
        .head(engram_proto::v1::HeadRequest {})
        .await
        .expect("head")
        .into_inner();
    assert_eq!(
        head.last_checkpoint.map(|c| c.key_version),
        Some(2),
        "the newest checkpoint is signed with the new key, and the old ones verified too"
    );
    let outputs = stack.outputs();
    for canary in [
        BOT_TOKEN,
        "e2e-canary-bot-token-two",
        EXCHANGE_SECRET,
        "e2e-canary-exchange-secret-2",
        AUDIT_KEY,
        "e2e-canary-audit-key-2",
    ] {
        assert!(!outputs.contains(canary), "a secret in the logs");
    }
    eprintln!("{total} orders placed through three rotations, none failed");
    Arc::into_inner(stack).expect("one owner").stop().await;
}
