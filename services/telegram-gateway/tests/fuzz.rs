//! The grammar under arbitrary input: no input panics the parser, everything it accepts is
//! within the grammar's bounds, and (end to end, through the Telegram double) no stream of
//! hostile or malformed commands from a viewer or a stranger reaches the signer.

mod common;

use common::{GROUP, OUTSIDER, Options, Stack, VIEWER};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use telegram_gateway::grammar::{self, Command, MAX_COMMAND_BYTES, Parsed, Role};

/// Text that looks like commands often enough to reach every branch of the parser.
fn commandish() -> impl Strategy<Value = String> {
    let head = prop_oneof![
        Just("/buy".to_owned()),
        Just("/sell".to_owned()),
        Just("/cancel".to_owned()),
        Just("/halt".to_owned()),
        Just("/resume".to_owned()),
        Just("/advice".to_owned()),
        Just("/audit".to_owned()),
        Just("/price@EngramDevBot".to_owned()),
        "/[a-z@]{0,12}",
        ".{0,8}",
    ];
    let arg = prop_oneof![
        "[A-Z0-9]{1,22}",
        "[0-9]{0,22}(\\.[0-9]{0,10})?",
        "[-+]?[0-9]e[0-9]",
        "\\PC{0,12}",
        ".{0,40}",
    ];
    (head, proptest::collection::vec(arg, 0..6))
        .prop_map(|(head, args)| format!("{head} {}", args.join(" ")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn no_input_panics_and_accepted_input_is_in_bounds(text in prop_oneof![commandish(), "\\PC{0,700}", ".{0,700}"]) {
        match grammar::parse(&text, "EngramDevBot") {
            Ok(Parsed::Command(command)) => {
                prop_assert!(text.len() <= MAX_COMMAND_BYTES);
                match &command {
                    Command::Order(order) => {
                        let symbol = order.symbol.as_str();
                        prop_assert!((2..=20).contains(&symbol.len()));
                        prop_assert!(symbol.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()));
                        prop_assert!(order.quantity.value() > rust_decimal::Decimal::ZERO);
                        prop_assert!(order.quantity.value().scale() <= 8);
                        prop_assert!(order.limit_price.as_ref().is_none_or(|p| p.value() > rust_decimal::Decimal::ZERO));
                    }
                    Command::Advice { question, .. } => prop_assert!(question.chars().count() <= grammar::MAX_QUESTION_CHARS),
                    Command::Halt(reason) => prop_assert!(reason.chars().count() <= grammar::MAX_REASON_CHARS),
                    Command::Audit(n) => prop_assert!((1..=grammar::MAX_AUDIT_RECORDS).contains(n)),
                    _ => {}
                }
                // Anything that trades or stops trading is above the viewer role.
                if matches!(command, Command::Order(_) | Command::Cancel { .. } | Command::Halt(_) | Command::Resume) {
                    prop_assert!(command.required_role() > Role::Viewer);
                }
            }
            Ok(Parsed::OtherBot) => prop_assert!(text.trim_start().starts_with('/') && text.contains('@')),
            Err(error) => {
                // An error never repeats a word the person typed (beyond the command itself).
                let shown = error.to_string();
                for word in text.split_whitespace().skip(1).filter(|w| w.len() > 3) {
                    prop_assert!(!shown.contains(word) || grammar::USAGE.iter().any(|(_, u, _)| u.contains(word)) || word.chars().all(|c| c.is_ascii_uppercase()),
                        "{word:?} echoed in {shown:?}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_unauthorized_input_reaches_the_signer() {
    let stack = Stack::start(Options {
        user_commands: 1000,
        extra: vec![("ENGRAM_GATEWAY_GLOBAL_COMMANDS", "1000".to_owned())],
        ..Options::default()
    })
    .await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = commandish();
    let mut sent = 0;
    for _ in 0..150 {
        let text = strategy.new_tree(&mut runner).expect("value").current();
        for (chat, user) in [(VIEWER, VIEWER), (OUTSIDER, OUTSIDER), (GROUP, OUTSIDER)] {
            stack.telegram.send_from(chat, user, &text);
            sent += 1;
        }
    }
    let stack_ref = &stack;
    engram_testkit::poll_until(
        "every update handled",
        std::time::Duration::from_secs(60),
        || async move { (stack_ref.handled().await >= sent).then_some(()) },
    )
    .await
    .expect("handled");
    // Viewers and strangers may also press buttons they never got: forged confirmations.
    let question = stack
        .say(common::TRADER, common::TRADER, "/buy BTCUSDT 0.001")
        .await;
    let question = question
        .iter()
        .find(|a| a.kind == "send" && a.chat_id == common::TRADER)
        .expect("question");
    let (confirm, _) = common::buttons(question);
    for user in [VIEWER, OUTSIDER] {
        let pressed = stack
            .press(common::TRADER, user, question.message_id, &confirm)
            .await;
        assert!(
            pressed
                .iter()
                .all(|a| a.kind == "answer" || a.chat_id == common::ADMIN),
            "{pressed:#?}"
        );
    }
    assert_eq!(stack.exchange.order_count(), 0, "an order was placed");
    let status = stack.reply(common::ADMIN, common::ADMIN, "/status").await;
    assert!(
        status.contains("<b>trading</b>"),
        "trading was halted: {status}"
    );
    let records = stack.audit_records().await;
    assert!(
        !records
            .iter()
            .any(|r| r.action == "ORDER_REQUESTED" || r.action == "TRADING_HALTED")
    );
    stack.stop().await;
}
