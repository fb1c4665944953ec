//! One trace per command: a confirmed order's Telegram update, the gateway's handling, the
//! signer's RPC, its policy check and exchange requests, and the audit appends all arrive at
//! an OTLP receiver with one trace id and unbroken parent links; so do `/advice`'s gateway,
//! advisor and model call.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use engram_e2e::{Options, Stack, TRADER};
use engram_testkit::{OtlpReceiver, ReceivedSpan, poll_until};

/// The trace holding a span named `name` from `service` whose `rpc.method` is `method`.
fn trace_with(spans: &[ReceivedSpan], service: &str, method: &str) -> Option<Vec<ReceivedSpan>> {
    let anchor = spans.iter().find(|s| {
        s.service_name == service
            && s.name == "grpc.server"
            && s.attributes.get("rpc.method").map(String::as_str) == Some(method)
    })?;
    Some(
        spans
            .iter()
            .filter(|s| s.trace_id == anchor.trace_id)
            .cloned()
            .collect(),
    )
}

/// Asserts the trace is one tree rooted at the gateway's `telegram.update` span.
fn assert_one_tree(trace: &[ReceivedSpan]) {
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&ReceivedSpan> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {trace:#?}");
    assert_eq!(
        (roots[0].service_name.as_str(), roots[0].name.as_str()),
        ("telegram-gateway", "telegram.update")
    );
    for span in trace {
        assert!(
            span.parent_span_id.is_empty() || ids.contains(span.parent_span_id.as_str()),
            "{} {} has a parent outside the trace: {trace:#?}",
            span.service_name,
            span.name
        );
    }
}

fn names_by_service(trace: &[ReceivedSpan]) -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for span in trace {
        let label = match span.attributes.get("rpc.method") {
            Some(method) => format!("{} {method}", span.name),
            None => span.name.clone(),
        };
        names
            .entry(span.service_name.clone())
            .or_default()
            .insert(label);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_order_and_an_advice_are_one_trace_each() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let stack = Stack::start(Options {
        otlp_endpoint: Some(receiver.endpoint()),
        ..Options::default()
    })
    .await
    .expect("stack");

    let outcome = stack
        .trade(TRADER, "/buy BTCUSDT 0.001")
        .await
        .expect("trade");
    assert!(outcome.contains("Order placed"), "{outcome}");
    let advice = stack.say(TRADER, "/advice BTCUSDT").await.expect("advice");
    assert!(
        advice
            .iter()
            .any(|a| a.text.contains("HOLD") || a.text.contains("BUY") || a.text.contains("SELL")),
        "{advice:#?}"
    );

    let receiver = &receiver;
    let (order, advise) = poll_until(
        "both traces exported",
        Duration::from_secs(40),
        || async move {
            let spans = receiver.spans();
            let order = trace_with(
                &spans,
                "exchange-signer",
                "/engram.v1.ExchangeSigner/PlaceOrder",
            )?;
            let advise = trace_with(&spans, "llm-advisor", "/engram.v1.LlmAdvisor/Advise")?;
            // The batch exporters flush on their own schedule: wait for every part.
            let complete = |trace: &[ReceivedSpan], needed: &[(&str, &str)]| {
                needed.iter().all(|(service, name)| {
                    trace
                        .iter()
                        .any(|s| s.service_name == *service && s.name == *name)
                })
            };
            (complete(
                &order,
                &[
                    ("telegram-gateway", "telegram.update"),
                    ("exchange-signer", "policy.check"),
                    ("exchange-signer", "exchange.request"),
                    ("audit-sink", "grpc.server"),
                ],
            ) && complete(
                &advise,
                &[
                    ("telegram-gateway", "telegram.update"),
                    ("llm-advisor", "llm.request"),
                ],
            ))
            .then_some((order, advise))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", names_by_service(&receiver.spans())));

    assert_one_tree(&order);
    let order_names = names_by_service(&order);
    let signer = &order_names["exchange-signer"];
    for needed in [
        "grpc.server /engram.v1.ExchangeSigner/PlaceOrder",
        "policy.check",
        "exchange.request",
    ] {
        assert!(signer.contains(needed), "{order_names:#?}");
    }
    assert!(
        order_names["audit-sink"].contains("grpc.server /engram.v1.AuditSink/Append"),
        "the signer's ORDER_REQUESTED append is in the trace: {order_names:#?}"
    );
    // The signer's spans hang under the gateway's, the sink's under the signer's or gateway's.
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        order.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let place = order
        .iter()
        .find(|s| {
            s.attributes.get("rpc.method").map(String::as_str)
                == Some("/engram.v1.ExchangeSigner/PlaceOrder")
        })
        .expect("PlaceOrder span");
    assert_eq!(
        by_id[place.parent_span_id.as_str()].service_name,
        "telegram-gateway"
    );

    assert_one_tree(&advise);
    let advise_names = names_by_service(&advise);
    assert!(
        advise_names["llm-advisor"].contains("llm.request"),
        "{advise_names:#?}"
    );
    assert_ne!(
        order[0].trace_id, advise[0].trace_id,
        "one trace per command"
    );
    stack.stop().await;
}
