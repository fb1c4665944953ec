//! The gateway's own settings: where Telegram and the other services are, how updates
//! arrive (long polling or a webhook), and the limits that protect the system and its users.

use std::net::SocketAddr;
use std::time::Duration;

use engram_runtime::ServiceConfig;
use engram_runtime::config::ConfigReader;
use url::Url;

/// How updates reach the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateMode {
    /// `getUpdates` long polling (the default; one poller per bot token).
    Polling,
    /// Telegram posts updates to `public_url`; the gateway listens on `listen`.
    Webhook {
        /// Where the webhook HTTP listener binds.
        listen: SocketAddr,
        /// The HTTPS URL Telegram posts to (set with `setWebhook`).
        public_url: Url,
    },
}

/// Telegram's outgoing message limits, enforced before sending (teloxide's throttling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimits {
    /// `ENGRAM_TELEGRAM_THROTTLE` (default `on`). teloxide's throttle releases messages in
    /// 250 ms ticks, so it adds up to a quarter second to each reply; `off` is only for a Bot
    /// API that does not rate-limit (a benchmark against the double), never for Telegram.
    pub throttle: bool,
    /// `ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT` (Telegram: 1).
    pub per_sec_chat: u32,
    /// `ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT` (Telegram: 20 in groups).
    pub per_min_chat: u32,
    /// `ENGRAM_TELEGRAM_MESSAGES_PER_SEC` in total (Telegram: 30).
    pub per_sec_overall: u32,
}

/// Everything the gateway reads beyond the shared runtime settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `ENGRAM_TELEGRAM_API_URL` (default `https://api.telegram.org`).
    pub telegram_api_url: Url,
    /// `ENGRAM_TELEGRAM_MODE`: `polling` (default) or `webhook`, with
    /// `ENGRAM_TELEGRAM_WEBHOOK_ADDR` and `ENGRAM_TELEGRAM_WEBHOOK_URL`.
    pub mode: UpdateMode,
    /// `ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS`: the long poll's server-side wait (default 25).
    pub poll_timeout: Duration,
    /// Outgoing limits.
    pub send_limits: SendLimits,
    /// `ENGRAM_SIGNER_ADDR` (default `http://127.0.0.1:50052`).
    pub signer_addr: Url,
    /// `ENGRAM_ADVISOR_ADDR` (default `http://127.0.0.1:50053`).
    pub advisor_addr: Url,
    /// `ENGRAM_AUDIT_ADDR`: required, because every command is audited.
    pub audit_addr: Url,
    /// `ENGRAM_GATEWAY_CALL_TIMEOUT_SECS`: deadline of a call to the signer or the audit sink
    /// (default 10).
    pub call_timeout: Duration,
    /// `ENGRAM_GATEWAY_ADVICE_TIMEOUT_SECS`: deadline of an `/advice` call (default 30).
    pub advice_timeout: Duration,
    /// `ENGRAM_GATEWAY_USER_COMMANDS` per `ENGRAM_GATEWAY_RATE_WINDOW_SECS` (default 10 per 60).
    pub user_commands: u32,
    /// `ENGRAM_GATEWAY_GLOBAL_COMMANDS` per window, all users together (default 60).
    pub global_commands: u32,
    /// The rate-limit window.
    pub rate_window: Duration,
    /// `ENGRAM_GATEWAY_CONFIRM_TTL_SECS`: how long a trade confirmation stays valid (default 60).
    pub confirm_ttl: Duration,
    /// `ENGRAM_GATEWAY_DENIED_NOTICE_SECS`: at most one "Unauthorized access" per chat in this
    /// window (default 3600).
    pub denied_notice_window: Duration,
    /// `ENGRAM_GATEWAY_ALERT_DEDUP_SECS`: identical alerts are folded within it (default 300).
    pub alert_dedup_window: Duration,
    /// `ENGRAM_GATEWAY_ALERTS_PER_MINUTE` to the admin chat (default 20).
    pub alerts_per_minute: u32,
}

fn default_url(text: &str) -> Url {
    Url::parse(text).unwrap_or_else(|_| unreachable!("the default {text} is a URL"))
}

impl ServiceConfig for GatewayConfig {
    fn read(reader: &mut ConfigReader<'_>) -> Self {
        let telegram_api_url = reader
            .url_or("ENGRAM_TELEGRAM_API_URL", "https://api.telegram.org")
            .unwrap_or_else(|| default_url("https://api.telegram.org"));
        let mode =
            match reader.choice_or("ENGRAM_TELEGRAM_MODE", "polling", &["polling", "webhook"]) {
                "webhook" => {
                    let listen = reader.socket_addr_or(
                        "ENGRAM_TELEGRAM_WEBHOOK_ADDR",
                        SocketAddr::from(([127, 0, 0, 1], 8443)),
                    );
                    let public_url = reader.required_url("ENGRAM_TELEGRAM_WEBHOOK_URL");
                    public_url.map_or(UpdateMode::Polling, |public_url| UpdateMode::Webhook {
                        listen,
                        public_url,
                    })
                }
                _ => UpdateMode::Polling,
            };
        let poll_timeout = reader.parsed_or(
            "ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS",
            Duration::from_secs(25),
            "whole seconds from 1 to 50",
            |raw| match raw.parse::<u64>() {
                Ok(secs) if (1..=50).contains(&secs) => Ok(Duration::from_secs(secs)),
                _ => Err(format!("{raw:?} is out of range")),
            },
        );
        let send_limits = SendLimits {
            throttle: reader.choice_or("ENGRAM_TELEGRAM_THROTTLE", "on", &["on", "off"]) == "on",
            per_sec_chat: reader.positive_u32_or("ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT", 1),
            per_min_chat: reader.positive_u32_or("ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT", 20),
            per_sec_overall: reader.positive_u32_or("ENGRAM_TELEGRAM_MESSAGES_PER_SEC", 30),
        };
        // https:// with mutual TLS (the default), http:// with ENGRAM_TLS_MODE=off.
        let signer_addr = reader
            .grpc_url_or("ENGRAM_SIGNER_ADDR", "127.0.0.1:50052")
            .unwrap_or_else(|| default_url("http://127.0.0.1:50052"));
        let advisor_addr = reader
            .grpc_url_or("ENGRAM_ADVISOR_ADDR", "127.0.0.1:50053")
            .unwrap_or_else(|| default_url("http://127.0.0.1:50053"));
        let audit_addr = reader
            .required_grpc_url("ENGRAM_AUDIT_ADDR")
            .unwrap_or_else(|| default_url("http://127.0.0.1:50054"));
        Self {
            telegram_api_url,
            mode,
            poll_timeout,
            send_limits,
            signer_addr,
            advisor_addr,
            audit_addr,
            call_timeout: reader
                .positive_secs_or("ENGRAM_GATEWAY_CALL_TIMEOUT_SECS", Duration::from_secs(10)),
            advice_timeout: reader.positive_secs_or(
                "ENGRAM_GATEWAY_ADVICE_TIMEOUT_SECS",
                Duration::from_secs(30),
            ),
            user_commands: reader.positive_u32_or("ENGRAM_GATEWAY_USER_COMMANDS", 10),
            global_commands: reader.positive_u32_or("ENGRAM_GATEWAY_GLOBAL_COMMANDS", 60),
            rate_window: reader
                .positive_secs_or("ENGRAM_GATEWAY_RATE_WINDOW_SECS", Duration::from_secs(60)),
            confirm_ttl: reader
                .positive_secs_or("ENGRAM_GATEWAY_CONFIRM_TTL_SECS", Duration::from_secs(60)),
            denied_notice_window: reader.positive_secs_or(
                "ENGRAM_GATEWAY_DENIED_NOTICE_SECS",
                Duration::from_secs(3600),
            ),
            alert_dedup_window: reader
                .positive_secs_or("ENGRAM_GATEWAY_ALERT_DEDUP_SECS", Duration::from_secs(300)),
            alerts_per_minute: reader.positive_u32_or("ENGRAM_GATEWAY_ALERTS_PER_MINUTE", 20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_runtime::config::MapSource;

    fn problems(pairs: &[(&str, &str)]) -> Vec<String> {
        let env = MapSource::from_pairs(pairs.iter().copied());
        let mut reader = ConfigReader::new(vec![&env]);
        let _ = GatewayConfig::read(&mut reader);
        reader
            .finish()
            .err()
            .map(|e| e.0.into_iter().map(|p| p.name).collect())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_need_only_the_audit_address() {
        assert_eq!(problems(&[]), ["ENGRAM_AUDIT_ADDR"]);
        assert!(problems(&[("ENGRAM_AUDIT_ADDR", "https://127.0.0.1:50054")]).is_empty());
    }

    #[test]
    fn peer_urls_follow_the_tls_mode() {
        // Mutual TLS is the default: a plain http:// peer would be a silent downgrade.
        assert_eq!(
            problems(&[
                ("ENGRAM_AUDIT_ADDR", "http://127.0.0.1:50054"),
                ("ENGRAM_SIGNER_ADDR", "https://127.0.0.1:50052"),
            ]),
            ["ENGRAM_AUDIT_ADDR"]
        );
        assert_eq!(
            problems(&[
                ("ENGRAM_TLS_MODE", "off"),
                ("ENGRAM_AUDIT_ADDR", "http://127.0.0.1:50054"),
                ("ENGRAM_SIGNER_ADDR", "https://127.0.0.1:50052"),
            ]),
            ["ENGRAM_SIGNER_ADDR"]
        );
    }

    #[test]
    fn every_bad_value_is_reported() {
        let names = problems(&[
            ("ENGRAM_AUDIT_ADDR", "127.0.0.1:50054"),
            ("ENGRAM_TELEGRAM_API_URL", "api.telegram.org"),
            ("ENGRAM_TELEGRAM_MODE", "push"),
            ("ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS", "90"),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT", "0"),
            ("ENGRAM_GATEWAY_USER_COMMANDS", "-1"),
            ("ENGRAM_GATEWAY_CONFIRM_TTL_SECS", "0"),
        ]);
        assert_eq!(
            names,
            [
                "ENGRAM_TELEGRAM_API_URL",
                "ENGRAM_TELEGRAM_MODE",
                "ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS",
                "ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT",
                "ENGRAM_AUDIT_ADDR",
                "ENGRAM_GATEWAY_USER_COMMANDS",
                "ENGRAM_GATEWAY_CONFIRM_TTL_SECS",
            ]
        );
    }

    #[test]
    fn webhook_mode_needs_its_public_url() {
        let base = [
            ("ENGRAM_AUDIT_ADDR", "https://127.0.0.1:50054"),
            ("ENGRAM_TELEGRAM_MODE", "webhook"),
        ];
        assert_eq!(problems(&base), ["ENGRAM_TELEGRAM_WEBHOOK_URL"]);
        let mut full = base.to_vec();
        full.push((
            "ENGRAM_TELEGRAM_WEBHOOK_URL",
            "https://bot.example.org/telegram",
        ));
        full.push(("ENGRAM_TELEGRAM_WEBHOOK_ADDR", "nonsense"));
        assert_eq!(problems(&full), ["ENGRAM_TELEGRAM_WEBHOOK_ADDR"]);
    }
}
