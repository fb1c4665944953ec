//! The signer's own settings: where the exchange is, how to talk to it, and the policy.

use std::time::Duration;

use engram_runtime::ServiceConfig;
use engram_runtime::config::ConfigReader;
use rust_decimal::Decimal;
use url::Url;

use crate::policy::{Policy, parse_symbol};
use crate::signing::MAX_RECV_WINDOW_MS;

/// Everything the signer reads beyond the shared runtime settings.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// `ENGRAM_EXCHANGE_URL` (default Binance spot).
    pub exchange_url: Url,
    /// `ENGRAM_EXCHANGE_RECV_WINDOW_MS` (default 5000, at most 60000).
    pub recv_window_ms: u64,
    /// `ENGRAM_EXCHANGE_TIMEOUT_SECS` (default 10).
    pub request_timeout: Duration,
    /// `ENGRAM_EXCHANGE_WEIGHT_LIMIT` (default 6000 per minute).
    pub weight_limit: u32,
    /// `ENGRAM_EXCHANGE_KEY_CHECK_SECS`: how often the key's restrictions are re-read (3600).
    pub key_check_interval: Duration,
    /// `ENGRAM_SIGNER_DEV_ALLOW_DANGEROUS_KEY`: dev only; a key that can withdraw or transfer
    /// becomes a loud warning instead of keeping the signer not ready.
    pub allow_dangerous_key: bool,
    /// The trading policy (`ENGRAM_POLICY_*`).
    pub policy: Policy,
    /// `ENGRAM_SIGNER_STATE_DIR`: where the kill switch survives restarts (a volume in a
    /// cluster; default `.engram/signer`).
    pub state_dir: std::path::PathBuf,
}

fn decimal(reader: &mut ConfigReader<'_>, name: &str, default: &str) -> Decimal {
    let fallback: Decimal = default.parse().unwrap_or_default();
    reader.parsed_or(name, fallback, "a positive decimal", |raw| {
        match raw.parse::<Decimal>() {
            Ok(value) if value > Decimal::ZERO => Ok(value),
            Ok(_) => Err("must be greater than zero".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    })
}

fn list(reader: &mut ConfigReader<'_>, name: &str, default: &str) -> Vec<String> {
    reader
        .string_or(name, default)
        .split(',')
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect()
}

impl ServiceConfig for SignerConfig {
    fn read(reader: &mut ConfigReader<'_>) -> Self {
        let exchange_url = reader
            .url_or("ENGRAM_EXCHANGE_URL", "https://api.binance.com")
            .unwrap_or_else(|| {
                Url::parse("https://api.binance.com").unwrap_or_else(|_| unreachable!())
            });
        let recv_window_ms = reader.parsed_or(
            "ENGRAM_EXCHANGE_RECV_WINDOW_MS",
            5000,
            "milliseconds between 1 and 60000",
            |raw| match raw.parse::<u64>() {
                Ok(n) if (1..=MAX_RECV_WINDOW_MS).contains(&n) => Ok(n),
                _ => Err(format!("{raw:?} is out of range")),
            },
        );
        let request_timeout =
            reader.positive_secs_or("ENGRAM_EXCHANGE_TIMEOUT_SECS", Duration::from_secs(10));
        let weight_limit = reader.positive_u32_or("ENGRAM_EXCHANGE_WEIGHT_LIMIT", 6000);
        let key_check_interval =
            reader.positive_secs_or("ENGRAM_EXCHANGE_KEY_CHECK_SECS", Duration::from_secs(3600));
        let allow_dangerous_key = reader.choice_or(
            "ENGRAM_SIGNER_DEV_ALLOW_DANGEROUS_KEY",
            "false",
            &["true", "false"],
        ) == "true";

        let symbols = list(reader, "ENGRAM_POLICY_SYMBOLS", "BTCUSDT,ETHUSDT");
        if symbols.is_empty() || symbols.iter().any(|s| parse_symbol(s).is_err()) {
            reader.problem(
                "ENGRAM_POLICY_SYMBOLS",
                "must be a comma-separated list of symbols such as BTCUSDT,ETHUSDT",
            );
        }
        let sides = list(reader, "ENGRAM_POLICY_SIDES", "BUY,SELL");
        if sides.is_empty() || sides.iter().any(|s| s != "BUY" && s != "SELL") {
            reader.problem("ENGRAM_POLICY_SIDES", "must list BUY and/or SELL");
        }
        let types = list(reader, "ENGRAM_POLICY_ORDER_TYPES", "MARKET,LIMIT");
        if types.is_empty() || types.iter().any(|t| t != "MARKET" && t != "LIMIT") {
            reader.problem("ENGRAM_POLICY_ORDER_TYPES", "must list MARKET and/or LIMIT");
        }
        let policy = Policy {
            symbols,
            allow_buy: sides.iter().any(|s| s == "BUY"),
            allow_sell: sides.iter().any(|s| s == "SELL"),
            allow_market: types.iter().any(|t| t == "MARKET"),
            allow_limit: types.iter().any(|t| t == "LIMIT"),
            max_order_notional: decimal(reader, "ENGRAM_POLICY_MAX_ORDER_NOTIONAL", "1000"),
            max_daily_notional: decimal(reader, "ENGRAM_POLICY_MAX_DAILY_NOTIONAL", "5000"),
            max_open_orders: reader.positive_u32_or("ENGRAM_POLICY_MAX_OPEN_ORDERS", 5),
            max_orders_per_minute: reader
                .positive_u32_or("ENGRAM_POLICY_MAX_ORDERS_PER_MINUTE", 10),
            price_band_bps: reader.positive_u32_or("ENGRAM_POLICY_PRICE_BAND_BPS", 500),
        };
        if policy.max_order_notional > policy.max_daily_notional {
            reader.problem(
                "ENGRAM_POLICY_MAX_ORDER_NOTIONAL",
                "must not exceed ENGRAM_POLICY_MAX_DAILY_NOTIONAL",
            );
        }
        let state_dir = reader.path_or("ENGRAM_SIGNER_STATE_DIR", ".engram/signer");
        Self {
            state_dir,
            exchange_url,
            recv_window_ms,
            request_timeout,
            weight_limit,
            key_check_interval,
            allow_dangerous_key,
            policy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_runtime::config::MapSource;

    #[test]
    fn every_bad_policy_value_is_reported() {
        let env = MapSource::from_pairs([
            ("ENGRAM_EXCHANGE_URL", "ftp://x"),
            ("ENGRAM_EXCHANGE_RECV_WINDOW_MS", "60001"),
            ("ENGRAM_POLICY_SYMBOLS", "btcusdt"),
            ("ENGRAM_POLICY_SIDES", "HOLD"),
            ("ENGRAM_POLICY_ORDER_TYPES", "STOP"),
            ("ENGRAM_POLICY_MAX_ORDER_NOTIONAL", "-5"),
            ("ENGRAM_POLICY_MAX_OPEN_ORDERS", "0"),
            ("ENGRAM_SIGNER_DEV_ALLOW_DANGEROUS_KEY", "maybe"),
        ]);
        let mut reader = ConfigReader::new(vec![&env]);
        let _ = SignerConfig::read(&mut reader);
        let errors = reader.finish().expect_err("bad values");
        let names: Vec<&str> = errors.0.iter().map(|p| p.name.as_str()).collect();
        for expected in [
            "ENGRAM_EXCHANGE_URL",
            "ENGRAM_EXCHANGE_RECV_WINDOW_MS",
            "ENGRAM_POLICY_SYMBOLS",
            "ENGRAM_POLICY_SIDES",
            "ENGRAM_POLICY_ORDER_TYPES",
            "ENGRAM_POLICY_MAX_ORDER_NOTIONAL",
            "ENGRAM_POLICY_MAX_OPEN_ORDERS",
            "ENGRAM_SIGNER_DEV_ALLOW_DANGEROUS_KEY",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
    }
}
