//! `engram-doubles`: runs the outside-world doubles for the local stack (dev only).
//!
//! `engram-doubles exchange` serves the Binance-compatible exchange on
//! `ENGRAM_DOUBLE_EXCHANGE_ADDR` (default 127.0.0.1:8082), accepting the key in the JSON file
//! named by `ENGRAM_DOUBLE_EXCHANGE_KEYS_FILE` (`{"api_key": ..., "api_secret": ...}`, the
//! dev secrets `make up` wrote into the local Vault). Keys are read from a file, never from
//! arguments or the environment.
//!
//! `engram-doubles telegram` serves the Telegram Bot API on `ENGRAM_DOUBLE_TELEGRAM_ADDR`
//! (default 127.0.0.1:8081), accepting the bot token in the JSON file named by
//! `ENGRAM_DOUBLE_TELEGRAM_TOKEN_FILE` (`{"bot_token": ...}`); its control API is what
//! `engramctl chat` talks to.
//!
//! `engram-doubles llm` serves the OpenAI-compatible LLM on `ENGRAM_DOUBLE_LLM_ADDR` (default
//! 127.0.0.1:1234, LM Studio's port) with the model `ENGRAM_DOUBLE_LLM_MODEL`
//! (default `engram-dev-model`).

use std::process::ExitCode;

use engram_doubles::exchange::{ExchangeDouble, KeyKind, Restrictions};

fn usage() -> ExitCode {
    eprintln!("usage: engram-doubles telegram|exchange|llm");
    ExitCode::from(64)
}

async fn llm() -> anyhow::Result<()> {
    let addr =
        std::env::var("ENGRAM_DOUBLE_LLM_ADDR").unwrap_or_else(|_| "127.0.0.1:1234".to_owned());
    let model =
        std::env::var("ENGRAM_DOUBLE_LLM_MODEL").unwrap_or_else(|_| "engram-dev-model".to_owned());
    let double = engram_doubles::llm::LlmDouble::start(addr.parse()?, &model).await?;
    // A model's own think time, for benchmarks that compare against it.
    if let Some(ms) = std::env::var("ENGRAM_DOUBLE_LLM_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        double.set_latency(std::time::Duration::from_millis(ms));
    }
    println!("LLM double listening on {}", double.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Reads one string field from a JSON file of dev secrets.
fn field_from_file(variable: &str, field: &str) -> anyhow::Result<String> {
    let file = std::env::var(variable).map_err(|_| anyhow::anyhow!("{variable} is required"))?;
    let keys: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)
        .map_err(|e| anyhow::anyhow!("{file} is not JSON: {e}"))?;
    keys[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{file} must hold {field}"))
}

async fn telegram() -> anyhow::Result<()> {
    let addr = std::env::var("ENGRAM_DOUBLE_TELEGRAM_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8081".to_owned());
    let token = field_from_file("ENGRAM_DOUBLE_TELEGRAM_TOKEN_FILE", "bot_token")?;
    let double = engram_doubles::telegram::TelegramDouble::start(addr.parse()?, &token).await?;
    println!("Telegram Bot API double listening on {}", double.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn exchange() -> anyhow::Result<()> {
    let addr = std::env::var("ENGRAM_DOUBLE_EXCHANGE_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8082".to_owned());
    let api_key = field_from_file("ENGRAM_DOUBLE_EXCHANGE_KEYS_FILE", "api_key")?;
    let secret = field_from_file("ENGRAM_DOUBLE_EXCHANGE_KEYS_FILE", "api_secret")?;
    let double = ExchangeDouble::start(addr.parse()?).await?;
    double.add_key(&api_key, KeyKind::Hmac(secret), Restrictions::default());
    println!("exchange double listening on {}", double.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn main() -> ExitCode {
    let Some(command) = std::env::args().nth(1) else {
        return usage();
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("engram-doubles: {error}");
            return ExitCode::from(70);
        }
    };
    let result = match command.as_str() {
        "exchange" | "llm" | "telegram" => runtime.block_on(async {
            tokio::select! {
                result = async {
                    match command.as_str() {
                        "llm" => llm().await,
                        "telegram" => telegram().await,
                        _ => exchange().await,
                    }
                } => result,
                () = async {
                    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                        term.recv().await;
                    }
                } => Ok(()),
            }
        }),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("engram-doubles: {error:#}");
            ExitCode::FAILURE
        }
    }
}
