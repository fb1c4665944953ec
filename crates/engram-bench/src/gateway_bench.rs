//! `gateway-bench`: the Telegram gateway end to end through the Telegram double. The release
//! gateway (pinned to CPU 0) long-polls the double; the double, the exchange double, the
//! audit sink, the signer and this client share CPU 1. It measures
//! - the latency of `/price` and `/whoami` one at a time: from the update injected at the
//!   double to the reply recorded there (what a person waits, minus Telegram's own network);
//! - updates handled per second with 64 updates in flight;
//! - the gateway's memory idle and after the load.
//!
//! Telegram's send limits (1 message per second per chat) are lifted for the run, or they
//! would be all it measures; so are the gateway's own rate limits. It runs twice: with
//! teloxide's throttle on (as shipped: it releases messages in 250 ms ticks) and off (the
//! gateway's own cost). It prints figures and asserts nothing. Run it with
//! `make bench-gateway`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use engram_bench::{percentile, release, rss_kib, spawn_service, wait_ready};
use serde_json::{Value, json};

const CHAT: i64 = 4242;
const TOKEN: &str = "9:bench-only-bot-token";
const KEY: &str = "bench-only-api-key";
const SECRET: &str = "bench-only-api-secret";
const SEQUENTIAL: usize = 200;
const BURST: usize = 2000;
const IN_FLIGHT: usize = 64;

/// Injects one message and returns its update id.
async fn inject(http: &reqwest::Client, base: &str, text: &str) -> anyhow::Result<()> {
    http.post(format!("{base}/control/messages"))
        .json(&json!({ "chat_id": CHAT, "user_id": CHAT, "text": text }))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// Waits for the bot's actions after `after`; returns the newest sequence number seen.
async fn actions_after(
    http: &reqwest::Client,
    base: &str,
    after: u64,
) -> anyhow::Result<Vec<Value>> {
    Ok(http
        .get(format!("{base}/control/actions?after={after}&wait=10"))
        .send()
        .await?
        .json()
        .await?)
}

fn spawn_double(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new("taskset");
    command
        .args(["-c", "1"])
        .arg(release("engram-doubles"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .spawn()
        .context("engram-doubles: run `make bench-gateway`, which builds it")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run() -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in("target")?;
    let dir = scratch.path();
    let http = reqwest::Client::new();

    let token_file = dir.join("token.json");
    std::fs::write(&token_file, json!({ "bot_token": TOKEN }).to_string())?;
    let keys_file = dir.join("keys.json");
    std::fs::write(
        &keys_file,
        json!({ "api_key": KEY, "api_secret": SECRET }).to_string(),
    )?;
    let (telegram_port, exchange_port) = (free_port()?, free_port()?);
    let _telegram = spawn_double(
        &["telegram"],
        &[
            (
                "ENGRAM_DOUBLE_TELEGRAM_ADDR",
                format!("127.0.0.1:{telegram_port}"),
            ),
            (
                "ENGRAM_DOUBLE_TELEGRAM_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ],
    )?;
    let _exchange = spawn_double(
        &["exchange"],
        &[
            (
                "ENGRAM_DOUBLE_EXCHANGE_ADDR",
                format!("127.0.0.1:{exchange_port}"),
            ),
            (
                "ENGRAM_DOUBLE_EXCHANGE_KEYS_FILE",
                keys_file.display().to_string(),
            ),
        ],
    )?;
    let base = format!("http://127.0.0.1:{telegram_port}");

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
        Some(1),
        &env_source(&[
            ("BINANCE_API_KEY", KEY.to_owned()),
            ("BINANCE_API_SECRET", SECRET.to_owned()),
            (
                "ENGRAM_EXCHANGE_URL",
                format!("http://127.0.0.1:{exchange_port}"),
            ),
            ("ENGRAM_AUDIT_ADDR", format!("http://{}", sink.grpc)),
            ("ENGRAM_POLICY_SYMBOLS", "BTCUSDT".to_owned()),
            ("ENGRAM_EXCHANGE_WEIGHT_LIMIT", "1000000000".to_owned()),
        ]),
        &dir.join("signer.log"),
    )
    .await?;
    wait_ready(&http, signer.admin, &dir.join("signer.log")).await?;
    println!("| throttle | measure | command | value |");
    println!("|---|---|---|---|");
    let mut seen = 0;
    for throttle in ["off", "on"] {
        let log = dir.join(format!("gateway-{throttle}.log"));
        let mut gateway = spawn_service(
            &release("telegram-gateway"),
            Some(0),
            &env_source(&[
                ("TELEGRAM_BOT_TOKEN", TOKEN.to_owned()),
                ("TELEGRAM_CHAT_ID", CHAT.to_string()),
                ("ENGRAM_TELEGRAM_API_URL", base.clone()),
                ("ENGRAM_SIGNER_ADDR", format!("http://{}", signer.grpc)),
                ("ENGRAM_AUDIT_ADDR", format!("http://{}", sink.grpc)),
                ("ENGRAM_TELEGRAM_THROTTLE", throttle.to_owned()),
                (
                    "ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT",
                    "1000000".to_owned(),
                ),
                (
                    "ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT",
                    "1000000".to_owned(),
                ),
                ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC", "1000000".to_owned()),
                ("ENGRAM_GATEWAY_USER_COMMANDS", "1000000".to_owned()),
                ("ENGRAM_GATEWAY_GLOBAL_COMMANDS", "1000000".to_owned()),
            ]),
            &log,
        )
        .await?;
        wait_ready(&http, gateway.admin, &log).await?;
        let pid = gateway.child.id().unwrap_or(0);
        // Settle, then read idle memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = rss_kib(pid);

        for command in ["/whoami", "/price BTCUSDT"] {
            let mut latencies = Vec::with_capacity(SEQUENTIAL);
            for _ in 0..SEQUENTIAL {
                let started = Instant::now();
                inject(&http, &base, command).await?;
                loop {
                    let actions = actions_after(&http, &base, seen).await?;
                    let Some(last) = actions.last() else { continue };
                    seen = last["seq"].as_u64().unwrap_or(seen);
                    break;
                }
                latencies.push(started.elapsed());
            }
            latencies.sort_unstable();
            for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
                println!(
                    "| {throttle} | one at a time, update to reply, {label} | `{command}` | {:.2} ms |",
                    percentile(&latencies, p).as_secs_f64() * 1e3
                );
            }
        }

        for command in ["/whoami", "/price BTCUSDT"] {
            let started = Instant::now();
            let start_seq = seen;
            let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            let injector = {
                let (http, base, slots) = (http.clone(), base.clone(), slots.clone());
                tokio::spawn(async move {
                    for _ in 0..BURST {
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            break;
                        };
                        permit.forget();
                        let _ = inject(&http, &base, command).await;
                    }
                })
            };
            let mut replied = 0;
            while replied < BURST {
                let actions = actions_after(&http, &base, seen).await?;
                let Some(last) = actions.last() else { continue };
                seen = last["seq"].as_u64().unwrap_or(seen);
                let new = usize::try_from(seen - start_seq).unwrap_or(0) - replied;
                replied += new;
                slots.add_permits(new);
            }
            injector.await?;
            let rate = BURST as f64 / started.elapsed().as_secs_f64();
            println!(
                "| {throttle} | {IN_FLIGHT} in flight, updates handled per second | `{command}` | {rate:.0} |"
            );
        }
        let loaded = rss_kib(pid);
        println!(
            "| {throttle} | gateway RSS idle | | {:.1} MiB |",
            idle as f64 / 1024.0
        );
        println!(
            "| {throttle} | gateway RSS after the load | | {:.1} MiB |",
            loaded as f64 / 1024.0
        );
        let _ = gateway.child.kill().await;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
