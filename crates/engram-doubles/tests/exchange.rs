//! The exchange double against requests signed by Engram's own signer code: Binance's shapes,
//! error codes and rules, and the failure knobs.

use std::time::{SystemTime, UNIX_EPOCH};

use engram_doubles::exchange::{ExchangeDouble, KeyKind, Knobs, Restrictions};
use exchange_signer::signing::{Query, SigningKey};
use secrecy::SecretString;
use serde_json::Value;

const API_KEY: &str = "test-api-key";
const SECRET: &str = "test-api-secret-for-the-double";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: SigningKey,
    key_name: String,
}

impl Client {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Query,
        timestamp: u64,
        recv_window: u64,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let signed = query
            .signed(&self.key, timestamp, recv_window, "")
            .expect("signed");
        let response = self
            .http
            .request(method, format!("{}{path}?{signed}", self.base))
            .header("X-MBX-APIKEY", &self.key_name)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    async fn order(&self, query: Query) -> (u16, Value) {
        let (status, body, _) = self
            .send(
                reqwest::Method::POST,
                "/api/v3/order",
                query,
                now_ms(),
                5000,
            )
            .await;
        (status, body)
    }
}

async fn setup() -> (ExchangeDouble, Client) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = ExchangeDouble::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("start");
    double.add_key(
        API_KEY,
        KeyKind::Hmac(SECRET.to_owned()),
        Restrictions::default(),
    );
    let client = Client {
        http: reqwest::Client::new(),
        base: double.url(),
        key: SigningKey::hmac(SecretString::from(SECRET)).expect("key"),
        key_name: API_KEY.to_owned(),
    };
    (double, client)
}

fn market(side: &str, qty: &str, client_id: &str) -> Query {
    Query::new()
        .param("symbol", "BTCUSDT")
        .param("side", side)
        .param("type", "MARKET")
        .param("quantity", qty)
        .param("newClientOrderId", client_id)
}

fn limit(qty: &str, price: &str, client_id: &str) -> Query {
    Query::new()
        .param("symbol", "BTCUSDT")
        .param("side", "BUY")
        .param("type", "LIMIT")
        .param("timeInForce", "GTC")
        .param("quantity", qty)
        .param("price", price)
        .param("newClientOrderId", client_id)
}

#[tokio::test]
async fn public_endpoints_answer_in_binances_shapes() {
    let (double, client) = setup().await;
    let time: Value = client
        .http
        .get(format!("{}/api/v3/time", double.url()))
        .send()
        .await
        .expect("time")
        .json()
        .await
        .expect("json");
    assert!(time["serverTime"].as_u64().is_some());
    let info: Value = client
        .http
        .get(format!("{}/api/v3/exchangeInfo", double.url()))
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    let btc = info["symbols"]
        .as_array()
        .expect("symbols")
        .iter()
        .find(|s| s["symbol"] == "BTCUSDT")
        .expect("BTCUSDT");
    assert!(
        btc["filters"]
            .as_array()
            .expect("filters")
            .iter()
            .any(|f| f["filterType"] == "LOT_SIZE")
    );
    let price: Value = client
        .http
        .get(format!(
            "{}/api/v3/ticker/price?symbol=BTCUSDT",
            double.url()
        ))
        .send()
        .await
        .expect("price")
        .json()
        .await
        .expect("json");
    assert_eq!(price["price"], "43250.10");
    let unknown = client
        .http
        .get(format!("{}/api/v3/ticker/price?symbol=NOPE", double.url()))
        .send()
        .await
        .expect("price");
    assert_eq!(unknown.status(), 400);
    assert_eq!(unknown.json::<Value>().await.expect("json")["code"], -1121);
}

#[tokio::test]
async fn a_signed_market_order_fills_at_the_ticker_and_moves_balances() {
    let (double, client) = setup().await;
    let (status, body) = client.order(market("BUY", "0.01", "c-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FILLED");
    assert_eq!(body["clientOrderId"], "c-1");
    assert_eq!(body["cummulativeQuoteQty"], "432.5010");
    assert_eq!(double.free("USDT").to_string(), "99567.4990");
    assert_eq!(double.free("BTC").to_string(), "1.01");

    let (status, body, headers) = client
        .send(
            reqwest::Method::GET,
            "/api/v3/order",
            Query::new()
                .param("symbol", "BTCUSDT")
                .param("origClientOrderId", "c-1"),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "FILLED");
    assert!(
        headers.get("X-MBX-USED-WEIGHT-1M").is_some(),
        "weight is reported"
    );
}

#[tokio::test]
async fn authentication_failures_use_binances_codes() {
    let (_double, client) = setup().await;
    let wrong_secret = Client {
        key: SigningKey::hmac(SecretString::from("wrong")).expect("key"),
        ..client_clone(&client)
    };
    assert_eq!(
        wrong_secret.order(market("BUY", "0.01", "a")).await.1["code"],
        -1022
    );
    let wrong_key = Client {
        key_name: "unknown".to_owned(),
        ..client_clone(&client)
    };
    let (status, body) = wrong_key.order(market("BUY", "0.01", "b")).await;
    assert_eq!((status, body["code"].clone()), (401, Value::from(-2015)));

    let stale = client
        .send(
            reqwest::Method::POST,
            "/api/v3/order",
            market("BUY", "0.01", "c"),
            now_ms() - 10_000,
            5000,
        )
        .await;
    assert_eq!(stale.1["code"], -1021, "{:?}", stale.1);
    let ahead = client
        .send(
            reqwest::Method::POST,
            "/api/v3/order",
            market("BUY", "0.01", "d"),
            now_ms() + 5_000,
            5000,
        )
        .await;
    assert_eq!(ahead.1["code"], -1021);
    assert!(
        ahead.1["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("ahead")
    );
}

fn client_clone(client: &Client) -> Client {
    Client {
        http: client.http.clone(),
        base: client.base.clone(),
        key: SigningKey::hmac(SecretString::from(SECRET)).expect("key"),
        key_name: client.key_name.clone(),
    }
}

#[tokio::test]
async fn filters_balances_and_duplicate_client_ids_are_enforced() {
    let (double, client) = setup().await;
    for (query, code, msg) in [
        (market("BUY", "0.000001", "f1"), -1013, "LOT_SIZE"),
        (market("BUY", "0.000015", "f2"), -1013, "LOT_SIZE"),
        (market("BUY", "0.0001", "f3"), -1013, "NOTIONAL"),
        (limit("0.01", "43000.005", "f4"), -1013, "PRICE_FILTER"),
        (market("BUY", "100", "f5"), -2010, "insufficient balance"),
        (
            Query::new()
                .param("symbol", "NOPE")
                .param("side", "BUY")
                .param("type", "MARKET")
                .param("quantity", "1"),
            -1121,
            "Invalid symbol",
        ),
    ] {
        let (status, body) = client.order(query).await;
        assert_eq!(status, 400);
        assert_eq!(body["code"], code, "{body}");
        assert!(
            body["msg"].as_str().unwrap_or_default().contains(msg),
            "{body}"
        );
    }

    // A resting limit order holds its id: a second order with it is refused...
    let (status, first) = client.order(limit("0.01", "40000.00", "dup-1")).await;
    assert_eq!((status, first["status"].as_str()), (200, Some("NEW")));
    let (_, second) = client.order(limit("0.01", "40000.00", "dup-1")).await;
    assert_eq!(second["code"], -2010);
    assert_eq!(second["msg"], "Duplicate order sent.");
    // ...until it is closed, as on Binance: then the id is accepted again.
    let (status, canceled, _) = client
        .send(
            reqwest::Method::DELETE,
            "/api/v3/order",
            Query::new()
                .param("symbol", "BTCUSDT")
                .param("origClientOrderId", "dup-1"),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!(
        (status, canceled["status"].as_str()),
        (200, Some("CANCELED"))
    );
    assert_eq!(
        double.free("USDT").to_string(),
        "100000.0000",
        "the lock is released"
    );
    assert_eq!(
        client.order(limit("0.01", "40000.00", "dup-1")).await.0,
        200
    );
    assert_eq!(double.orders_with_client_id("dup-1"), 2);

    let (_, missing, _) = client
        .send(
            reqwest::Method::GET,
            "/api/v3/order",
            Query::new()
                .param("symbol", "BTCUSDT")
                .param("origClientOrderId", "nope"),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!(missing["code"], -2013);
    let (_, cancel_missing, _) = client
        .send(
            reqwest::Method::DELETE,
            "/api/v3/order",
            Query::new()
                .param("symbol", "BTCUSDT")
                .param("orderId", "1"),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!(cancel_missing["code"], -2011);
}

#[tokio::test]
async fn ed25519_keys_and_key_restrictions() {
    let (double, client) = setup().await;
    use ring::signature::KeyPair;
    let seed = [7u8; 32];
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("pair");
    double.add_key(
        "ed-key",
        KeyKind::Ed25519(pair.public_key().as_ref().to_vec()),
        Restrictions {
            enable_withdrawals: true,
            ..Restrictions::default()
        },
    );
    use base64::Engine;
    let ed = Client {
        key: SigningKey::ed25519(&SecretString::from(
            base64::engine::general_purpose::STANDARD.encode(seed),
        ))
        .expect("key"),
        key_name: "ed-key".to_owned(),
        ..client_clone(&client)
    };
    let (status, body) = ed.order(market("SELL", "0.01", "ed-1")).await;
    assert_eq!(status, 200, "{body}");
    let (_, restrictions, _) = ed
        .send(
            reqwest::Method::GET,
            "/sapi/v1/account/apiRestrictions",
            Query::new(),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!(restrictions["enableWithdrawals"], true);
    assert_eq!(restrictions["ipRestrict"], true);
    let (_, account, _) = ed
        .send(
            reqwest::Method::GET,
            "/api/v3/account",
            Query::new(),
            now_ms(),
            5000,
        )
        .await;
    assert!(
        account["balances"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
    );
}

#[tokio::test]
async fn knobs_make_the_exchange_fail_like_a_real_one() {
    let (double, client) = setup().await;
    double.set_knobs(Knobs {
        fail_after_accept: 1,
        ..Knobs::default()
    });
    let (status, _) = client.order(market("BUY", "0.01", "unknown-state")).await;
    assert_eq!(status, 500);
    assert_eq!(
        double.orders_with_client_id("unknown-state"),
        1,
        "accepted despite the 5xx"
    );

    double.set_knobs(Knobs {
        rate_limit_next: 1,
        retry_after_secs: 7,
        ..Knobs::default()
    });
    let (status, body, headers) = client
        .send(
            reqwest::Method::GET,
            "/api/v3/account",
            Query::new(),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!((status, body["code"].clone()), (429, Value::from(-1003)));
    assert_eq!(
        headers.get("Retry-After").and_then(|v| v.to_str().ok()),
        Some("7")
    );
    assert_eq!(
        client
            .send(
                reqwest::Method::GET,
                "/api/v3/account",
                Query::new(),
                now_ms(),
                5000
            )
            .await
            .0,
        200
    );

    double.set_knobs(Knobs {
        banned: true,
        ..Knobs::default()
    });
    assert_eq!(
        client
            .send(
                reqwest::Method::GET,
                "/api/v3/account",
                Query::new(),
                now_ms(),
                5000
            )
            .await
            .0,
        418
    );

    double.set_knobs(Knobs {
        clock_skew_ms: 30_000,
        ..Knobs::default()
    });
    let (_, skewed, _) = client
        .send(
            reqwest::Method::GET,
            "/api/v3/account",
            Query::new(),
            now_ms(),
            5000,
        )
        .await;
    assert_eq!(
        skewed["code"], -1021,
        "a local clock 30 s behind the exchange is refused"
    );
}
