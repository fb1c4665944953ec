//! The gateway binary against the Telegram double with a real signer, advisor and audit sink:
//! the allowlist, every role boundary, each command with good and bad arguments, hostile
//! text, confirmations, and the records all of it leaves.

mod common;

use common::{ADMIN, GROUP, OUTSIDER, Options, Stack, TRADER, VIEWER, buttons};
use engram_doubles::llm::LlmMode;

fn has(text: &str, needle: &str) -> bool {
    text.contains(needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_one_notice_and_raise_one_alert() {
    let stack = Stack::start(Options::default()).await;

    // A chat that is not allow-listed: one notice, an alert to the admin chat.
    let first = stack.say(OUTSIDER, OUTSIDER, "/status").await;
    let to_outsider: Vec<_> = first.iter().filter(|a| a.chat_id == OUTSIDER).collect();
    assert_eq!(to_outsider.len(), 1, "{first:#?}");
    assert_eq!(to_outsider[0].text, "Unauthorized access");
    let alerts: Vec<_> = first.iter().filter(|a| a.chat_id == ADMIN).collect();
    assert_eq!(alerts.len(), 1, "{first:#?}");
    assert!(
        has(&alerts[0].text, "chat 6666, user 6666"),
        "{}",
        alerts[0].text
    );

    // Again within the hour: silence, and no second alert (no amplification).
    for text in ["/buy BTCUSDT 1", "hello", "/help"] {
        let again = stack.say(OUTSIDER, OUTSIDER, text).await;
        assert!(again.is_empty(), "{again:#?}");
    }

    // An allowed group, a user on no list: refused the same way, its own alert.
    let group = stack.say(GROUP, OUTSIDER, "/price BTCUSDT").await;
    assert!(
        group
            .iter()
            .any(|a| a.chat_id == GROUP && a.text == "Unauthorized access"),
        "{group:#?}"
    );
    assert!(
        group
            .iter()
            .any(|a| a.chat_id == ADMIN && has(&a.text, "in an allowed chat")),
        "{group:#?}"
    );

    let metrics = stack.metrics().await;
    assert_eq!(
        engram_testkit::metric_value(
            &metrics,
            "engram_telegram_unauthorized_total",
            &["reason=\"chat\""]
        ),
        Some(4.0)
    );
    assert_eq!(
        engram_testkit::metric_value(
            &metrics,
            "engram_telegram_unauthorized_total",
            &["reason=\"user\""]
        ),
        Some(1.0)
    );

    let denied: Vec<_> = stack
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r.action == "AUTH_DENIED")
        .collect();
    assert_eq!(denied.len(), 5);
    let actor = denied[0].actor.clone().expect("actor");
    assert_eq!(
        (actor.telegram_chat_id, actor.telegram_user_id),
        (OUTSIDER, OUTSIDER)
    );
    let output = stack.stop().await;
    assert!(
        !output.contains("canary"),
        "a secret leaked into the output:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_boundary_holds() {
    let stack = Stack::start(Options::default()).await;
    let viewer_may = [
        "/help",
        "/whoami",
        "/status",
        "/balance",
        "/price BTCUSDT",
        "/orders",
        "/orders BTCUSDT",
    ];
    let trader_only = [
        "/buy BTCUSDT 0.001",
        "/sell BTCUSDT 0.001",
        "/cancel BTCUSDT 1",
    ];
    let admin_only = ["/halt testing", "/resume", "/audit", "/keys"];
    for text in viewer_may {
        let reply = stack.reply(VIEWER, VIEWER, text).await;
        assert!(!has(&reply, "Not allowed"), "{text}: {reply}");
    }
    for text in trader_only.iter().chain(&admin_only) {
        let reply = stack.reply(VIEWER, VIEWER, text).await;
        assert!(has(&reply, "Not allowed"), "viewer {text}: {reply}");
    }
    for text in trader_only {
        let reply = stack.reply(TRADER, TRADER, text).await;
        assert!(has(&reply, "Confirm:"), "trader {text}: {reply}");
    }
    for text in admin_only {
        let reply = stack.reply(TRADER, TRADER, text).await;
        assert!(
            has(&reply, "needs the admin role"),
            "trader {text}: {reply}"
        );
    }
    for text in admin_only {
        let reply = stack.reply(ADMIN, ADMIN, text).await;
        assert!(!has(&reply, "Not allowed"), "admin {text}: {reply}");
    }
    // Role checks in a group use the user, not the chat.
    let reply = stack.reply(GROUP, VIEWER, "/buy BTCUSDT 0.001").await;
    assert!(has(&reply, "Not allowed"), "{reply}");
    let records = stack.audit_records().await;
    assert!(
        records
            .iter()
            .filter(|r| r.action == "COMMAND_DENIED")
            .count()
            >= 8
    );
    let denied_category = records
        .iter()
        .find(|r| r.action == "COMMAND_DENIED")
        .expect("denied")
        .category;
    assert_eq!(
        denied_category,
        engram_proto::v1::AuditCategory::Security as i32
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_answers_and_bad_arguments_get_usage() {
    let stack = Stack::start(Options::default()).await;
    let cases = [
        ("/help", "/price SYMBOL"),
        ("/whoami", "role <b>admin</b>"),
        ("/status", "Signer: <b>trading</b>"),
        ("/balance", "USDT"),
        ("/price BTCUSDT", "BTCUSDT <b>43250.10</b>"),
        ("/orders", "No open orders."),
        ("/keys", "Telegram bot token: version 1"),
        ("/audit 3", "Audit chain verified"),
    ];
    for (text, expected) in cases {
        let reply = stack.reply(ADMIN, ADMIN, text).await;
        assert!(has(&reply, expected), "{text}: {reply}");
    }
    let keys = stack.reply(ADMIN, ADMIN, "/keys").await;
    assert!(
        has(&keys, "exchange key: version 1") && has(&keys, "rotate by 2027-01-30"),
        "{keys}"
    );

    let advice = stack
        .reply(ADMIN, ADMIN, "/advice BTCUSDT should I buy?")
        .await;
    assert!(
        has(&advice, "Advice for BTCUSDT") && has(&advice, "nothing was traded"),
        "{advice}"
    );

    // A command that waited at Telegram while the gateway was down is not run late.
    let late = stack.say_late(ADMIN, ADMIN, "/halt stale", 600).await;
    assert!(
        late.iter()
            .any(|a| a.text.contains("Not run: this was sent 10 min ago")),
        "{late:#?}"
    );
    assert!(
        stack
            .reply(ADMIN, ADMIN, "/status")
            .await
            .contains("<b>trading</b>")
    );
    let recent = stack.say_late(ADMIN, ADMIN, "/whoami", 30).await;
    assert!(
        recent.iter().any(|a| a.text.contains("role <b>admin</b>")),
        "{recent:#?}"
    );

    let halted = stack.reply(ADMIN, ADMIN, "/halt maintenance window").await;
    assert!(has(&halted, "halted</b>: maintenance window"), "{halted}");
    let status = stack.reply(ADMIN, ADMIN, "/status").await;
    assert!(has(&status, "HALTED"), "{status}");
    let resumed = stack.reply(ADMIN, ADMIN, "/resume").await;
    assert!(has(&resumed, "resumed"), "{resumed}");

    let bad = [
        ("/price", "SYMBOL is missing\nUsage: /price SYMBOL"),
        ("/price btcusdt", "Usage: /price SYMBOL"),
        ("/buy BTCUSDT -1", "QTY must be a plain decimal"),
        ("/buy BTCUSDT 1e-3", "Usage: /buy SYMBOL QTY [PRICE]"),
        ("/sell BTCUSDT 0.000000001", "more than 8 decimal places"),
        ("/cancel BTCUSDT", "ORDER_ID is missing"),
        ("/orders BTCUSDT ETHUSDT", "too many arguments"),
        ("/audit 500", "from 1 to 20"),
        ("/withdraw BTC 1", "unknown command"),
        ("just chatting", "send a command"),
    ];
    for (text, expected) in bad {
        let reply = stack.reply(ADMIN, ADMIN, text).await;
        assert!(has(&reply, expected), "{text}: {reply}");
    }
    // A command for another bot in the group is not ours to answer.
    let other = stack.say(GROUP, ADMIN, "/status@SomeOtherBot").await;
    assert!(other.is_empty(), "{other:#?}");
    let ours = stack.reply(GROUP, ADMIN, "/status@EngramDevBot").await;
    assert!(has(&ours, "Signer:"), "{ours}");

    let records = stack.audit_records().await;
    let received: Vec<_> = records
        .iter()
        .filter(|r| r.action == "COMMAND_RECEIVED")
        .collect();
    assert!(received.len() >= 12, "{}", received.len());
    let rejected = records
        .iter()
        .filter(|r| r.action == "COMMAND_REJECTED")
        .count();
    assert_eq!(rejected, bad.len());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_is_escaped_never_echoed_raw() {
    let stack = Stack::start(Options::default()).await;
    // The model repeats the prompt it got, the person's question included.
    stack.llm.set_mode(LlmMode::EchoPrompt);
    let hostile = "<b>pwned</b> & <a href=\"https://evil.example\">click</a> </code>";
    let reply = stack
        .reply(ADMIN, ADMIN, &format!("/advice BTCUSDT {hostile}"))
        .await;
    // The double refuses markup that does not parse, so arriving at all proves the escaping;
    // the hostile tags arrive as text.
    assert!(has(&reply, "&lt;b&gt;pwned&lt;/b&gt; &amp;"), "{reply}");
    assert!(!has(&reply, "<a href"), "{reply}");
    // Errors never repeat what was typed.
    let error = stack
        .reply(ADMIN, ADMIN, "/price <script>alert(1)</script>")
        .await;
    assert!(!has(&error, "script"), "{error}");
    // A halt reason comes back from the signer: escaped too.
    let halted = stack
        .reply(ADMIN, ADMIN, "/halt <i>because</i> & why")
        .await;
    assert!(
        has(&halted, "&lt;i&gt;because&lt;/i&gt; &amp; why"),
        "{halted}"
    );
    let metrics = stack.metrics().await;
    assert_eq!(
        engram_testkit::metric_value(&metrics, "engram_telegram_api_errors_total", &[]),
        None,
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_wait_for_their_owners_confirmation_and_place_once() {
    let stack = Stack::start(Options::default()).await;
    let asked = stack.say(TRADER, TRADER, "/buy BTCUSDT 0.001").await;
    let question = asked
        .iter()
        .find(|a| a.kind == "send")
        .expect("question")
        .clone();
    assert!(
        has(
            &question.text,
            "Confirm: <b>BUY 0.001 BTCUSDT</b> at market?"
        ),
        "{}",
        question.text
    );
    assert!(
        has(&question.text, "Estimated notional: 43.2501"),
        "{}",
        question.text
    );
    let (confirm, cancel) = buttons(&question);
    assert!(confirm.starts_with("ok:eg") && cancel.starts_with("no:eg"));
    let nonce = confirm.trim_start_matches("ok:").to_owned();
    assert_eq!(
        stack.exchange.order_count(),
        0,
        "nothing is placed before the confirmation"
    );

    // Someone else (even an admin) cannot confirm it; it stays open for its owner.
    let stolen = stack
        .press(TRADER, ADMIN, question.message_id, &confirm)
        .await;
    assert!(
        stolen
            .iter()
            .any(|a| a.kind == "answer" && has(&a.text, "Only the person who asked")),
        "{stolen:#?}"
    );
    assert_eq!(stack.exchange.order_count(), 0);

    // The owner confirms: one order, with the nonce as its client order id.
    let confirmed = stack
        .press(TRADER, TRADER, question.message_id, &confirm)
        .await;
    let edit = confirmed.iter().find(|a| a.kind == "edit").expect("edited");
    assert!(
        has(&edit.text, "Order placed: #") && has(&edit.text, "FILLED"),
        "{}",
        edit.text
    );
    assert_eq!(stack.exchange.orders_with_client_id(&nonce), 1);

    // A double press does nothing more.
    let again = stack
        .press(TRADER, TRADER, question.message_id, &confirm)
        .await;
    assert!(
        again
            .iter()
            .any(|a| a.kind == "answer" && has(&a.text, "Already handled")),
        "{again:#?}"
    );
    assert_eq!(stack.exchange.order_count(), 1);

    // Cancel says no.
    let asked = stack.say(TRADER, TRADER, "/sell BTCUSDT 0.001 50000").await;
    let question = asked
        .iter()
        .find(|a| a.kind == "send")
        .expect("question")
        .clone();
    let (_, cancel) = buttons(&question);
    let cancelled = stack
        .press(TRADER, TRADER, question.message_id, &cancel)
        .await;
    assert!(
        cancelled
            .iter()
            .any(|a| a.kind == "edit" && has(&a.text, "Cancelled: nothing was placed")),
        "{cancelled:#?}"
    );
    assert_eq!(stack.exchange.order_count(), 1);

    // A resting limit order, then /cancel of it, confirmed.
    let asked = stack.say(TRADER, TRADER, "/buy BTCUSDT 0.001 42000").await;
    let question = asked
        .iter()
        .find(|a| a.kind == "send")
        .expect("question")
        .clone();
    let placed = stack
        .press(TRADER, TRADER, question.message_id, &buttons(&question).0)
        .await;
    let placed = placed
        .iter()
        .find(|a| a.kind == "edit")
        .expect("edited")
        .text
        .clone();
    assert!(has(&placed, "NEW"), "{placed}");
    let order_id: String = placed
        .split('#')
        .nth(1)
        .expect("id")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let asked = stack
        .say(TRADER, TRADER, &format!("/cancel BTCUSDT {order_id}"))
        .await;
    let question = asked
        .iter()
        .find(|a| a.kind == "send")
        .expect("question")
        .clone();
    assert!(
        has(&question.text, &format!("CANCEL order <b>{order_id}</b>")),
        "{}",
        question.text
    );
    let done = stack
        .press(TRADER, TRADER, question.message_id, &buttons(&question).0)
        .await;
    assert!(
        done.iter()
            .any(|a| a.kind == "edit" && has(&a.text, "Cancelled: #") && has(&a.text, "CANCELED")),
        "{done:#?}"
    );

    let records = stack.audit_records().await;
    for action in [
        "CONFIRMATION_REQUESTED",
        "CONFIRMATION_ACCEPTED",
        "CONFIRMATION_CANCELLED",
        "CONFIRMATION_REFUSED",
        "ORDER_REQUESTED",
    ] {
        assert!(records.iter().any(|r| r.action == action), "no {action}");
    }
    assert!(
        !format!("{records:?}").contains("canary"),
        "a secret reached the audit trail"
    );
    let output = stack.stop().await;
    assert!(
        !output.contains("canary"),
        "a secret leaked into the output:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_confirmation_says_so_and_places_nothing() {
    let stack = Stack::start(Options {
        confirm_ttl_secs: 1,
        ..Options::default()
    })
    .await;
    let asked = stack.say(TRADER, TRADER, "/buy BTCUSDT 0.001").await;
    let question = asked
        .iter()
        .find(|a| a.kind == "send")
        .expect("question")
        .clone();
    assert!(has(&question.text, "Valid for 1 s"), "{}", question.text);
    // The sweeper edits the question once it has expired.
    let telegram = &stack.telegram;
    let expired = engram_testkit::poll_until(
        "the expiry notice",
        std::time::Duration::from_secs(10),
        || async move {
            telegram
                .actions_after(question.seq)
                .into_iter()
                .find(|a| a.kind == "edit" && a.message_id == question.message_id)
        },
    )
    .await
    .expect("expired");
    assert!(
        has(&expired.text, "Expired after 1 s: nothing was placed"),
        "{}",
        expired.text
    );
    let late = stack
        .press(TRADER, TRADER, question.message_id, &buttons(&question).0)
        .await;
    assert!(
        late.iter()
            .any(|a| a.kind == "answer" && has(&a.text, "Already handled or expired")),
        "{late:#?}"
    );
    assert_eq!(stack.exchange.order_count(), 0);
    assert!(
        stack
            .audit_records()
            .await
            .iter()
            .any(|r| r.action == "CONFIRMATION_EXPIRED")
    );
    stack.stop().await;
}
