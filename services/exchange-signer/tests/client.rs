//! The exchange client against the exchange double: clock skew, an order accepted behind a
//! 5xx, 429 and 418 handling, weight tracking and key rotation.

use std::time::Duration;

use engram_doubles::exchange::{ExchangeDouble, KeyKind, Knobs, Restrictions};
use exchange_signer::client::{ClientSettings, Credentials, ExchangeClient, ExchangeError};
use exchange_signer::signing::{Query, SigningKey};
use secrecy::SecretString;

async fn setup() -> (ExchangeDouble, std::sync::Arc<ExchangeClient>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = ExchangeDouble::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("double");
    double.add_key(
        "key-v1",
        KeyKind::Hmac("secret-v1".to_owned()),
        Restrictions::default(),
    );
    let client = ExchangeClient::new(
        ClientSettings {
            base_url: double.url().parse().expect("url"),
            recv_window_ms: 5000,
            request_timeout: Duration::from_secs(5),
            weight_limit: 6000,
        },
        Some(credentials("key-v1", "secret-v1")),
    )
    .expect("client");
    (double, client)
}

fn credentials(key: &str, secret: &str) -> Credentials {
    Credentials {
        api_key: SecretString::from(key.to_owned()),
        key: SigningKey::hmac(SecretString::from(secret.to_owned())).expect("key"),
    }
}

fn market_buy() -> Query {
    Query::new()
        .param("symbol", "BTCUSDT")
        .param("side", "BUY")
        .param("type", "MARKET")
        .param("quantity", "0.01")
}

#[tokio::test]
async fn a_skewed_clock_is_resynchronised_and_the_request_retried_once() {
    let (double, client) = setup().await;
    double.set_knobs(Knobs {
        clock_skew_ms: 45_000,
        ..Knobs::default()
    });
    assert_eq!(client.clock_offset_ms(), 0);
    let order = client
        .place_order("BTCUSDT", market_buy(), "skew-1")
        .await
        .expect("placed after resync");
    assert_eq!(order["status"], "FILLED");
    let offset = client.clock_offset_ms();
    assert!((44_000..=46_000).contains(&offset), "offset {offset}");
}

#[tokio::test]
async fn an_order_accepted_behind_a_5xx_is_found_not_placed_twice() {
    let (double, client) = setup().await;
    double.set_knobs(Knobs {
        fail_after_accept: 1,
        ..Knobs::default()
    });
    let order = client
        .place_order("BTCUSDT", market_buy(), "nonce-5xx")
        .await
        .expect("reconciled");
    assert_eq!(order["clientOrderId"], "nonce-5xx");
    assert_eq!(order["status"], "FILLED");
    assert_eq!(
        double.orders_with_client_id("nonce-5xx"),
        1,
        "exactly one order exists"
    );
}

#[tokio::test]
async fn rejections_keep_binances_code_and_message() {
    let (_double, client) = setup().await;
    let too_big = Query::new()
        .param("symbol", "BTCUSDT")
        .param("side", "BUY")
        .param("type", "MARKET")
        .param("quantity", "100");
    match client.place_order("BTCUSDT", too_big, "big-1").await {
        Err(ExchangeError::Rejected { code, msg }) => {
            assert_eq!(code, -2010);
            assert!(msg.contains("insufficient balance"), "{msg}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(client.weight_used() > 0, "the used weight is tracked");
}

#[tokio::test]
async fn a_429_sets_one_deadline_that_every_later_request_waits_for() {
    let (double, client) = setup().await;
    double.set_knobs(Knobs {
        rate_limit_next: 1,
        retry_after_secs: 1,
        ..Knobs::default()
    });
    let first = client
        .signed(reqwest::Method::GET, "/api/v3/account", Query::new())
        .await;
    assert_eq!(
        first,
        Err(ExchangeError::RateLimited(Duration::from_secs(1)))
    );
    // The next request is held until the deadline instead of hammering the exchange.
    let started = std::time::Instant::now();
    client
        .signed(reqwest::Method::GET, "/api/v3/account", Query::new())
        .await
        .expect("after the wait");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited {:?}",
        started.elapsed()
    );
    let responses = client.response_metrics();
    assert_eq!(responses.with_label_values(&["429"]).get(), 1);
    assert_eq!(responses.with_label_values(&["2xx"]).get(), 1);
}

#[tokio::test]
async fn a_418_halts_the_client_without_further_requests() {
    let (double, client) = setup().await;
    double.set_knobs(Knobs {
        banned: true,
        ..Knobs::default()
    });
    assert_eq!(
        client
            .signed(reqwest::Method::GET, "/api/v3/account", Query::new())
            .await,
        Err(ExchangeError::Banned)
    );
    assert!(client.is_banned());
    assert_eq!(
        client.response_metrics().with_label_values(&["418"]).get(),
        1
    );
    // Even once the exchange would answer again, the client stays halted until an operator acts.
    double.set_knobs(Knobs::default());
    assert_eq!(
        client
            .place_order("BTCUSDT", market_buy(), "after-ban")
            .await,
        Err(ExchangeError::Banned)
    );
    assert_eq!(
        double.orders_with_client_id("after-ban"),
        0,
        "nothing was sent"
    );
}

#[tokio::test]
async fn a_rotated_key_is_used_from_the_next_request() {
    let (double, client) = setup().await;
    double.add_key(
        "key-v2",
        KeyKind::Hmac("secret-v2".to_owned()),
        Restrictions::default(),
    );
    client.rotate(credentials("key-v2", "secret-v2"));
    double.remove_key("key-v1");
    let order = client
        .place_order("BTCUSDT", market_buy(), "rotated-1")
        .await
        .expect("new key works");
    assert_eq!(order["status"], "FILLED");
    assert!(
        !format!("{client:?}").contains("secret-v2"),
        "Debug never shows key material"
    );
}
