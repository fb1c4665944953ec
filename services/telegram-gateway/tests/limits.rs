//! Limits under real conditions: the per-user rate limit and the unauthorized notice survive
//! a restart, Telegram's 429 is obeyed, a burst is throttled below Telegram's flood limits,
//! alerts are de-duplicated and rate-limited, a new bot token restarts polling without a
//! process restart, and webhook mode checks its secret.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, OUTSIDER, Options, Stack, TOKEN, TRADER, VIEWER, telegram_secret};
use engram_proto::v1::telegram_gateway_client::TelegramGatewayClient;
use engram_proto::v1::{Actor, RequestContext, SendAlertRequest, Severity};
use engram_testkit::{metric_value, poll_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_survive_a_restart() {
    let mut stack = Stack::start(Options {
        user_commands: 3,
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        let reply = stack.reply(VIEWER, VIEWER, "/whoami").await;
        assert!(reply.contains("role <b>viewer</b>"), "{reply}");
    }
    let notice = stack.reply(VIEWER, VIEWER, "/whoami").await;
    assert!(
        notice.contains("Too many commands: you may send 3 per 60 s"),
        "{notice}"
    );
    assert!(
        stack.say(VIEWER, VIEWER, "/whoami").await.is_empty(),
        "one notice, then silence"
    );
    // Someone else is not affected.
    assert!(
        stack
            .reply(TRADER, TRADER, "/whoami")
            .await
            .contains("trader")
    );
    // An outsider's notice is spent.
    assert_eq!(
        stack.reply(OUTSIDER, OUTSIDER, "/help").await,
        "Unauthorized access"
    );

    // A restart resets none of it: the limits come back from the audit trail.
    let output = stack.stop_gateway().await;
    assert!(!output.contains("canary"), "{output}");
    stack.start_gateway().await;
    let after = stack.say(VIEWER, VIEWER, "/whoami").await;
    assert!(
        after.iter().all(|a| !a.text.contains("role <b>viewer</b>")),
        "the limit was reset by the restart: {after:#?}"
    );
    let outsider = stack.say(OUTSIDER, OUTSIDER, "/help").await;
    assert!(
        outsider.iter().all(|a| a.chat_id != OUTSIDER),
        "a second notice after the restart: {outsider:#?}"
    );
    let metrics = stack.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "engram_telegram_rate_limited_total",
            &["scope=\"user\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegrams_429_is_obeyed_and_a_burst_earns_none() {
    let options = Options {
        extra: vec![
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT", "5".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT", "300".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC", "30".to_owned()),
        ],
        ..Options::default()
    };
    let stack = Stack::start(options).await;
    // One 429 with retry_after 2: the reply comes, after the wait, on the second try.
    stack.telegram.answer_429("sendMessage", 1, 2);
    let started = Instant::now();
    let reply = stack.reply(ADMIN, ADMIN, "/whoami").await;
    let waited = started.elapsed();
    assert!(reply.contains("admin"));
    assert!(
        waited >= Duration::from_secs(2),
        "retried after {waited:?}, before retry_after"
    );
    let stats = stack.telegram.stats();
    assert_eq!(stats["too_many_requests"], 1);
    assert_eq!(stats["calls"]["sendMessage"], 2, "{stats}");

    // Telegram's flood limit at the double (6 per second per chat, with the gateway set to 5):
    // a burst of 24 commands in one chat is throttled, never refused.
    stack.telegram.enforce_flood_limits(6, 30);
    let before = stack.handled().await;
    let seq = stack.telegram.last_seq();
    for i in 0..24 {
        let user = [ADMIN, TRADER, VIEWER][i % 3];
        stack.telegram.send_from(common::GROUP, user, "/whoami");
    }
    let telegram = &stack.telegram;
    poll_until("24 replies", Duration::from_secs(30), || async move {
        (telegram.actions_after(seq).len() >= 24).then_some(())
    })
    .await
    .expect("all replies");
    assert!(stack.handled().await >= before + 24);
    assert_eq!(
        stack.telegram.stats()["too_many_requests"],
        1,
        "the burst earned a 429"
    );
    stack.stop().await;
}

fn alert(kind: &str, message: &str) -> SendAlertRequest {
    SendAlertRequest {
        context: Some(RequestContext {
            actor: Some(Actor {
                service: "exchange-signer".to_owned(),
                ..Actor::default()
            }),
            ..RequestContext::default()
        }),
        severity: Severity::Critical as i32,
        kind: kind.to_owned(),
        message: message.to_owned(),
        occurred_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_deduplicated_rate_limited_and_escaped() {
    let options = Options {
        extra: vec![("ENGRAM_GATEWAY_ALERTS_PER_MINUTE", "3".to_owned())],
        ..Options::default()
    };
    let stack = Stack::start(options).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", stack.gateway().grpc_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
    let mut client = TelegramGatewayClient::new(channel);
    let seq = stack.telegram.last_seq();
    let first = client
        .send_alert(alert("trading_halted", "Halted: <b>reason</b> & more"))
        .await
        .expect("alert")
        .into_inner();
    assert!(first.delivered, "{first:?}");
    let repeat = client
        .send_alert(alert("trading_halted", "Halted again"))
        .await
        .expect("alert")
        .into_inner();
    assert_eq!(
        (repeat.delivered, repeat.suppressed_reason.as_str()),
        (false, "deduplicated")
    );
    for kind in ["vault_unreachable", "audit_write_failed"] {
        assert!(
            client
                .send_alert(alert(kind, "m"))
                .await
                .expect("alert")
                .into_inner()
                .delivered
        );
    }
    let over = client
        .send_alert(alert("key_too_old", "m"))
        .await
        .expect("alert")
        .into_inner();
    assert_eq!(
        (over.delivered, over.suppressed_reason.as_str()),
        (false, "rate_limited")
    );

    let delivered = stack.telegram.actions_after(seq);
    assert_eq!(delivered.len(), 3, "{delivered:#?}");
    assert!(delivered.iter().all(|a| a.chat_id == ADMIN));
    assert!(delivered[0].text.contains("[CRITICAL] exchange-signer</b>: trading_halted\nHalted: &lt;b&gt;reason&lt;/b&gt; &amp; more"), "{}", delivered[0].text);

    for bad in [
        alert("", "m"),
        alert("k", ""),
        SendAlertRequest {
            severity: 0,
            ..alert("k", "m")
        },
    ] {
        let status = client.send_alert(bad).await.expect_err("invalid");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let records = stack.audit_records().await;
    assert_eq!(
        records.iter().filter(|r| r.action == "ALERT_SENT").count(),
        3
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signers_halt_alert_reaches_the_admin_chat() {
    let stack = Stack::start(Options::default()).await;
    let seq = stack.telegram.last_seq();
    let halted = stack.reply(common::GROUP, ADMIN, "/halt fire drill").await;
    assert!(halted.contains("halted"), "{halted}");
    let telegram = &stack.telegram;
    let alert = poll_until(
        "the signer's alert",
        Duration::from_secs(10),
        || async move {
            telegram
                .actions_after(seq)
                .into_iter()
                .find(|a| a.chat_id == ADMIN && a.text.contains("trading_halted"))
        },
    )
    .await
    .expect("alert");
    assert!(
        alert.text.starts_with(
            "<b>[CRITICAL] exchange-signer</b>: trading_halted\nTrading halted: fire drill"
        ),
        "{}",
        alert.text
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bot_token_restarts_polling_without_a_restart() {
    let stack = Stack::start(Options::default()).await;
    assert!(stack.reply(ADMIN, ADMIN, "/whoami").await.contains("admin"));
    let pid = stack.gateway().pid();

    // BotFather issues a new token and revokes the old one; Vault gets the new version.
    let new_token = "100:canary-bot-token-two";
    stack.telegram.accept_token(new_token);
    stack.telegram.revoke_token(TOKEN);
    stack
        .bao
        .put_secret("engram/telegram", telegram_secret(new_token, None))
        .await
        .expect("rotate");
    let stack_ref = &stack;
    let records = poll_until(
        "the rotation audited",
        Duration::from_secs(15),
        || async move {
            let records = stack_ref.audit_records().await;
            records
                .iter()
                .any(|r| r.action == "BOT_TOKEN_ROTATED")
                .then_some(records)
        },
    )
    .await
    .expect("rotation");
    let rotated = records
        .iter()
        .find(|r| r.action == "BOT_TOKEN_ROTATED")
        .expect("record");
    let details = serde_json::to_string(&format!("{:?}", rotated.details)).expect("json");
    assert!(!details.contains("canary"), "{details}");

    assert!(stack.reply(ADMIN, ADMIN, "/whoami").await.contains("admin"));
    assert_eq!(stack.gateway().pid(), pid, "the process was not restarted");
    let output = stack.stop().await;
    assert!(
        !output.contains("canary"),
        "a token leaked into the output:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_mode_takes_updates_only_with_the_secret() {
    let port = engram_testkit::free_port_pair();
    let webhook_url = format!("http://127.0.0.1:{port}{}", telegram_gateway::WEBHOOK_PATH);
    let options = Options {
        webhook_secret: Some("canary-webhook-secret".to_owned()),
        extra: vec![
            ("ENGRAM_TELEGRAM_MODE", "webhook".to_owned()),
            ("ENGRAM_TELEGRAM_WEBHOOK_ADDR", format!("127.0.0.1:{port}")),
            ("ENGRAM_TELEGRAM_WEBHOOK_URL", webhook_url.clone()),
        ],
        ..Options::default()
    };
    let stack = Stack::start(options).await;
    let telegram = &stack.telegram;
    let webhook_url = &webhook_url;
    poll_until("the webhook set", Duration::from_secs(10), || async move {
        (telegram.stats()["webhook"] == webhook_url.as_str()).then_some(())
    })
    .await
    .expect("setWebhook");
    assert!(stack.reply(ADMIN, ADMIN, "/whoami").await.contains("admin"));
    assert!(
        stack.telegram.stats()["calls"].get("getUpdates").is_none(),
        "polled in webhook mode"
    );

    let update = serde_json::json!({ "update_id": 1, "message": { "message_id": 1, "date": 0,
        "chat": { "id": ADMIN, "type": "private" }, "from": { "id": ADMIN, "is_bot": false, "first_name": "x" },
        "text": "/halt forged" } });
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}{}", telegram_gateway::WEBHOOK_PATH);
    for secret in [None, Some("wrong"), Some("canary-webhook-secre")] {
        let mut request = client.post(&url).json(&update);
        if let Some(secret) = secret {
            request = request.header(telegram_gateway::WEBHOOK_SECRET_HEADER, secret);
        }
        assert_eq!(request.send().await.expect("post").status(), 401);
    }
    // The right secret with a body Telegram could not have sent: refused, nothing handled.
    let garbage = client
        .post(&url)
        .header(
            telegram_gateway::WEBHOOK_SECRET_HEADER,
            "canary-webhook-secret",
        )
        .header("content-type", "application/json")
        .body("{\"update_id\": \"not a number\"")
        .send()
        .await
        .expect("post");
    assert_eq!(garbage.status(), 400);
    let status = stack.reply(ADMIN, ADMIN, "/status").await;
    assert!(
        status.contains("<b>trading</b>"),
        "a forged delivery halted trading: {status}"
    );
    let records = format!("{:?}", stack.audit_records().await);
    assert!(
        !records.contains("canary"),
        "a secret reached the audit trail"
    );
    let output = stack.stop().await;
    assert!(
        !output.contains("canary"),
        "a secret leaked into the output:\n{output}"
    );
}
