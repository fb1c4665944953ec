//! `signer-bench`: PlaceOrder round trips through the real signer (policy, a durable audit
//! append before and after, Binance signing, the exchange double on loopback) at 1, 16 and 64
//! concurrent clients. In the same run, as references: a bare tonic unary call (the gRPC
//! health Check) against a one-worker server, which is what gRPC alone costs here, and
//! OpenBao's transit HMAC over HTTP on the same payloads ("signing as a service").
//!
//! It prints figures; it asserts nothing. `make bench-signer` builds in release mode and pins
//! the signer and the echo server to CPU 0, everything else to CPU 1.

use std::path::PathBuf;
use std::rc::Rc;

use anyhow::Context;
use engram_bench::{closed_loop, release, spawn_service, wait_ready};
use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_proto::v1::{OrderSide, OrderType, PlaceOrderRequest, RequestContext};

const KEY: &str = "bench-only-api-key";
const SECRET: &str = "bench-only-api-secret";
const SECONDS: u64 = 4;

fn order(client: usize, i: u64, run: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        context: Some(RequestContext {
            idempotency_key: format!("{run}-{client}-{i}"),
            correlation_id: String::new(),
            actor: None,
        }),
        symbol: "BTCUSDT".to_owned(),
        // Alternate sides so balances stay level however long the run.
        side: if i % 2 == 0 {
            OrderSide::Buy as i32
        } else {
            OrderSide::Sell as i32
        },
        r#type: OrderType::Market as i32,
        quantity: "0.001".to_owned(),
        limit_price: String::new(),
        time_in_force: 0,
    }
}

async fn echo_server() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await?;
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in("target")?;
    // BENCH_KEEP=1 keeps the logs (target/bench-*) for a look afterwards.
    let scratch_path = if std::env::var_os("BENCH_KEEP").is_some() {
        scratch.keep()
    } else {
        scratch.path().to_path_buf()
    };
    let dir = scratch_path.as_path();
    let keys = dir.join("keys.json");
    std::fs::write(
        &keys,
        format!(r#"{{"api_key":"{KEY}","api_secret":"{SECRET}"}}"#),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut double = tokio::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(release("engram-doubles"))
        .arg("exchange")
        .env("ENGRAM_DOUBLE_EXCHANGE_ADDR", format!("127.0.0.1:{port}"))
        .env("ENGRAM_DOUBLE_EXCHANGE_KEYS_FILE", &keys)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("engram-doubles: run `make bench-signer`, which builds it")?;
    let env_source = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("ENGRAM_SECRET_SOURCE", "env".to_owned()),
            (
                "ENGRAM_DOTENV_FILE",
                dir.join("none.env").display().to_string(),
            ),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let sink = spawn_service(
        &release("audit-sink"),
        Some(1),
        &env_source(&[
            ("ENGRAM_AUDIT_HMAC_KEY", "bench-only-audit-key".to_owned()),
            ("ENGRAM_AUDIT_DIR", dir.join("audit").display().to_string()),
        ]),
        &dir.join("sink.log"),
    )
    .await?;
    let signer = spawn_service(
        &release("exchange-signer"),
        Some(0),
        &env_source(&[
            ("BINANCE_API_KEY", KEY.to_owned()),
            ("BINANCE_API_SECRET", SECRET.to_owned()),
            ("ENGRAM_EXCHANGE_URL", format!("http://127.0.0.1:{port}")),
            ("ENGRAM_AUDIT_ADDR", format!("http://{}", sink.grpc)),
            ("ENGRAM_POLICY_SYMBOLS", "BTCUSDT".to_owned()),
            ("ENGRAM_POLICY_MAX_ORDER_NOTIONAL", "1000000".to_owned()),
            (
                "ENGRAM_POLICY_MAX_DAILY_NOTIONAL",
                "1000000000000".to_owned(),
            ),
            (
                "ENGRAM_POLICY_MAX_ORDERS_PER_MINUTE",
                "1000000000".to_owned(),
            ),
            // The double does not enforce Binance's 6000 weight per minute; without this the
            // signer's own pacing (right for Binance) would be what is measured.
            ("ENGRAM_EXCHANGE_WEIGHT_LIMIT", "1000000000".to_owned()),
        ]),
        &dir.join("signer.log"),
    )
    .await?;
    let http = reqwest::Client::new();
    wait_ready(&http, signer.admin, &dir.join("signer.log")).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", signer.grpc))?
        .connect()
        .await?;

    println!("| scenario | clients | requests/s | p50 | p99 | failed |");
    println!("|---|---|---|---|---|---|");
    for clients in [1usize, 16, 64] {
        let client = ExchangeSignerClient::new(channel.clone());
        let run = format!("c{clients}");
        let (rate, p50, p99, failed) = closed_loop(clients, SECONDS, move |c, i| {
            let mut client = client.clone();
            let request = order(c, i, &run);
            async move { client.place_order(request).await.is_ok() }
        })
        .await;
        println!(
            "| PlaceOrder through the signer (audit ×2, exchange double) | {clients} | {rate:.0} | {:.2} ms | {:.2} ms | {failed} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }

    // Reference 1: bare tonic unary on the same core, one worker.
    let mut echo = tokio::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(std::env::current_exe()?)
        .arg("--echo-server")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    {
        use tokio::io::AsyncBufReadExt;
        let stdout = echo.stdout.take().context("echo stdout")?;
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
    }
    let echo_channel = tonic::transport::Endpoint::from_shared(format!("http://{}", line.trim()))?
        .connect()
        .await?;
    for clients in [1usize, 16, 64] {
        let client = tonic_health::pb::health_client::HealthClient::new(echo_channel.clone());
        let (rate, p50, p99, failed) = closed_loop(clients, SECONDS, move |_, _| {
            let mut client = client.clone();
            async move {
                client
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok()
            }
        })
        .await;
        println!(
            "| reference: bare tonic unary (health Check) | {clients} | {rate:.0} | {:.2} ms | {:.2} ms | {failed} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    let _ = echo.kill().await;

    // Reference 2: OpenBao transit HMAC over HTTP, the same order payload.
    let bao_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bao_bin = PathBuf::from(".venv/bin/bao");
    let mut bao = tokio::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(&bao_bin)
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=bench-root",
            &format!("-dev-listen-address=127.0.0.1:{bao_port}"),
        ])
        .env("HOME", dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("OpenBao: run `make setup`")?;
    let base = format!("http://127.0.0.1:{bao_port}/v1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http
        .get(format!("{base}/sys/health"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "OpenBao did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    http.post(format!("{base}/sys/mounts/transit"))
        .header("X-Vault-Token", "bench-root")
        .json(&serde_json::json!({"type": "transit"}))
        .send()
        .await?;
    http.post(format!("{base}/transit/keys/bench"))
        .header("X-Vault-Token", "bench-root")
        .json(&serde_json::json!({"type": "hmac", "key_size": 32}))
        .send()
        .await?;
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD.encode("symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0.001&newClientOrderId=c-3f1e2d4c5b6a79880123456789abcdef&recvWindow=5000&timestamp=1764720000000");
    let url = Rc::new(format!("{base}/transit/hmac/bench/sha2-256"));
    for clients in [1usize, 16, 64] {
        let (http, url, payload) = (http.clone(), url.clone(), payload.clone());
        let (rate, p50, p99, failed) = closed_loop(clients, SECONDS, move |_, _| {
            let (http, url, payload) = (http.clone(), url.clone(), payload.clone());
            async move {
                http.post(url.as_str())
                    .header("X-Vault-Token", "bench-root")
                    .json(&serde_json::json!({ "input": payload }))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        println!(
            "| reference: OpenBao transit HMAC over HTTP | {clients} | {rate:.0} | {:.2} ms | {:.2} ms | {failed} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    let _ = bao.kill().await;
    let _ = double.kill().await;
    drop((sink, signer));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One worker thread per process (TOOLS.md): this client runs on a current-thread runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if std::env::args().any(|a| a == "--echo-server") {
        return runtime.block_on(echo_server());
    }
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run())
}
