//! The gateway's test stack: one real OpenBao; the audit sink, the signer and the advisor
//! running in this process on random ports; the Telegram, exchange and LLM doubles; and the
//! gateway binary itself as a child process (so it can be restarted and killed).

#![allow(dead_code)]

use std::time::Duration;

use engram_doubles::exchange::{ExchangeDouble, KeyKind, Restrictions};
use engram_doubles::llm::LlmDouble;
use engram_doubles::telegram::{BotAction, TelegramDouble};
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{AuditRecord, QueryRequest};
use engram_runtime::InProcessService;
use engram_testkit::{OpenBao, ServiceProcess, http_get, poll_until};
use serde_json::json;

pub const BIN: &str = env!("CARGO_BIN_EXE_telegram-gateway");
/// The bot token (a canary: it must never appear in any output).
pub const TOKEN: &str = "100:canary-bot-token-one";
pub const ADMIN: i64 = 1001;
pub const TRADER: i64 = 1002;
pub const VIEWER: i64 = 1003;
/// An allow-listed group chat.
pub const GROUP: i64 = -100_500;
/// Someone who is on no list.
pub const OUTSIDER: i64 = 6666;
const EXCHANGE_KEY: &str = "gateway-test-exchange-key";
const EXCHANGE_SECRET: &str = "gateway-test-exchange-secret";

/// Options for one stack.
#[derive(Debug, Clone)]
pub struct Options {
    pub confirm_ttl_secs: u32,
    pub user_commands: u32,
    pub extra: Vec<(&'static str, String)>,
    pub webhook_secret: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            confirm_ttl_secs: 30,
            user_commands: 30,
            extra: Vec::new(),
            webhook_secret: None,
        }
    }
}

pub struct Stack {
    pub bao: OpenBao,
    pub telegram: TelegramDouble,
    pub exchange: ExchangeDouble,
    pub llm: LlmDouble,
    pub audit: Option<InProcessService>,
    pub signer: Option<InProcessService>,
    pub advisor: Option<InProcessService>,
    pub gateway: Option<ServiceProcess>,
    gateway_env: Vec<(&'static str, String)>,
    _dirs: Vec<tempfile::TempDir>,
}

pub fn telegram_secret(token: &str, webhook_secret: Option<&str>) -> serde_json::Value {
    let mut secret = json!({
        "bot_token": token,
        "allowed_chats": format!("{ADMIN},{TRADER},{VIEWER},{GROUP}"),
        "users": format!("{ADMIN}:admin,{TRADER}:trader,{VIEWER}:viewer"),
        "admin_chat": ADMIN.to_string(),
    });
    if let Some(webhook) = webhook_secret {
        secret["webhook_secret"] = json!(webhook);
    }
    secret
}

impl Stack {
    pub async fn start(options: Options) -> Self {
        engram_runtime::service::install_crypto_provider();
        let bao = OpenBao::start().await.expect("openbao");
        bao.put_secret("engram/audit", json!({ "hmac_key": "canary-audit-key" }))
            .await
            .expect("audit secret");
        bao.put_secret(
            "engram/exchange",
            json!({ "api_key": EXCHANGE_KEY, "api_secret": EXCHANGE_SECRET }),
        )
        .await
        .expect("exchange secret");
        bao.put_custom_metadata("engram/exchange", json!({ "created": "2026-11-01" }))
            .await
            .expect("metadata");
        bao.put_secret("engram/llm", json!({ "api_key": "canary-llm-key" }))
            .await
            .expect("llm secret");
        bao.put_secret(
            "engram/telegram",
            telegram_secret(TOKEN, options.webhook_secret.as_deref()),
        )
        .await
        .expect("telegram secret");
        let any = "127.0.0.1:0".parse().expect("addr");
        let telegram = TelegramDouble::start(any, TOKEN)
            .await
            .expect("telegram double");
        let exchange = ExchangeDouble::start(any).await.expect("exchange double");
        exchange.add_key(
            EXCHANGE_KEY,
            KeyKind::Hmac(EXCHANGE_SECRET.to_owned()),
            Restrictions::default(),
        );
        let llm = LlmDouble::start(any, "gateway-test-model")
            .await
            .expect("llm double");
        llm.require_key("canary-llm-key");

        let vault = vec![
            ("ENGRAM_VAULT_ADDR", bao.addr()),
            ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
        ];
        let audit_dir = tempfile::tempdir().expect("tempdir");
        let state_dir = tempfile::tempdir().expect("tempdir");
        let mut env = vault.clone();
        env.push(("ENGRAM_AUDIT_DIR", audit_dir.path().display().to_string()));
        let audit = InProcessService::start(audit_sink::SPEC, env, audit_sink::routes)
            .await
            .expect("audit sink");
        // The gateway's gRPC port is chosen now, so the signer can send it alerts.
        let gateway_port = engram_testkit::free_port_pair();
        let mut env = vault.clone();
        env.extend([
            (
                "ENGRAM_ALERT_ADDR",
                format!("http://127.0.0.1:{gateway_port}"),
            ),
            (
                "ENGRAM_SIGNER_STATE_DIR",
                state_dir.path().display().to_string(),
            ),
            ("ENGRAM_EXCHANGE_URL", exchange.url()),
            ("ENGRAM_AUDIT_ADDR", audit.grpc_url()),
            ("ENGRAM_POLICY_SYMBOLS", "BTCUSDT,ETHUSDT".to_owned()),
        ]);
        let signer = InProcessService::start(exchange_signer::SPEC, env, exchange_signer::routes)
            .await
            .expect("signer");
        let mut env = vault.clone();
        env.extend([
            ("LMSTUDIO_URL", llm.url()),
            ("ENGRAM_AUDIT_ADDR", audit.grpc_url()),
        ]);
        let advisor = InProcessService::start(llm_advisor::SPEC, env, llm_advisor::routes)
            .await
            .expect("advisor");

        let mut gateway_env = vault;
        gateway_env.extend([
            ("ENGRAM_GRPC_ADDR", format!("127.0.0.1:{gateway_port}")),
            ("ENGRAM_SECRET_REFRESH_SECS", "0.5".to_owned()),
            ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0".to_owned()),
            ("ENGRAM_TELEGRAM_API_URL", telegram.url()),
            ("ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS", "5".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT", "50".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT", "1000".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC", "100".to_owned()),
            ("ENGRAM_SIGNER_ADDR", signer.grpc_url()),
            ("ENGRAM_ADVISOR_ADDR", advisor.grpc_url()),
            ("ENGRAM_AUDIT_ADDR", audit.grpc_url()),
            (
                "ENGRAM_GATEWAY_CONFIRM_TTL_SECS",
                options.confirm_ttl_secs.to_string(),
            ),
            (
                "ENGRAM_GATEWAY_USER_COMMANDS",
                options.user_commands.to_string(),
            ),
        ]);
        gateway_env.extend(options.extra.iter().cloned());
        let mut stack = Self {
            bao,
            telegram,
            exchange,
            llm,
            audit: Some(audit),
            signer: Some(signer),
            advisor: Some(advisor),
            gateway: None,
            gateway_env,
            _dirs: vec![audit_dir, state_dir],
        };
        stack.start_gateway().await;
        stack
    }

    /// Spawns the gateway binary and waits for `/readyz` 200.
    pub async fn start_gateway(&mut self) {
        let gateway = ServiceProcess::spawn(BIN, &self.gateway_env)
            .await
            .expect("spawn gateway");
        let admin = gateway.admin_addr;
        let ready = poll_until("gateway ready", Duration::from_secs(30), || async move {
            matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await;
        if let Err(error) = ready {
            panic!("{error}\n{}", gateway.output());
        }
        self.gateway = Some(gateway);
    }

    /// SIGTERM, expecting a clean exit; returns the gateway's output.
    pub async fn stop_gateway(&mut self) -> String {
        let mut gateway = self.gateway.take().expect("gateway running");
        let code = gateway
            .terminate(Duration::from_secs(20))
            .await
            .expect("terminate");
        let output = gateway.output();
        assert_eq!(code, Some(0), "{output}");
        output
    }

    pub fn gateway(&self) -> &ServiceProcess {
        self.gateway.as_ref().expect("gateway running")
    }

    pub async fn metrics(&self) -> String {
        http_get(self.gateway().admin_addr, "/metrics")
            .await
            .expect("metrics")
            .1
    }

    /// Updates the gateway has finished handling (every reply sent by then).
    pub async fn handled(&self) -> u64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("engram_telegram_command_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    async fn wait_handled(&self, target: u64) {
        poll_until(
            "the update handled",
            Duration::from_secs(20),
            || async move { (self.handled().await >= target).then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.gateway().output()));
    }

    /// `user` sends `text` in `chat`; returns what the bot did in answer (possibly nothing).
    pub async fn say(&self, chat: i64, user: i64, text: &str) -> Vec<BotAction> {
        let before = self.handled().await;
        let seq = self.telegram.last_seq();
        self.telegram.send_from(chat, user, text);
        self.wait_handled(before + 1).await;
        self.telegram.actions_after(seq)
    }

    /// As [`Self::say`], for a message Telegram dated `age_secs` ago.
    pub async fn say_late(
        &self,
        chat: i64,
        user: i64,
        text: &str,
        age_secs: i64,
    ) -> Vec<BotAction> {
        let before = self.handled().await;
        let seq = self.telegram.last_seq();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        self.telegram.send_dated(chat, user, text, now - age_secs);
        self.wait_handled(before + 1).await;
        self.telegram.actions_after(seq)
    }

    /// As [`Self::say`], expecting exactly one message back in `chat` (alerts to the admin
    /// chat, which arrive on their own time, aside); returns its text.
    pub async fn reply(&self, chat: i64, user: i64, text: &str) -> String {
        let actions = self.say(chat, user, text).await;
        let sent: Vec<&BotAction> = actions
            .iter()
            .filter(|a| a.kind == "send" && a.chat_id == chat && !is_alert(a))
            .collect();
        assert_eq!(sent.len(), 1, "{text:?} got {actions:#?}");
        sent[0].text.clone()
    }

    /// `user` presses the button with `data` under `message_id` in `chat`.
    pub async fn press(&self, chat: i64, user: i64, message_id: i64, data: &str) -> Vec<BotAction> {
        let before = self.handled().await;
        let seq = self.telegram.last_seq();
        self.telegram
            .press(chat, user, message_id, data)
            .expect("press");
        self.wait_handled(before + 1).await;
        self.telegram.actions_after(seq)
    }

    pub async fn audit_records(&self) -> Vec<AuditRecord> {
        let mut client = AuditSinkClient::connect(self.audit.as_ref().expect("audit").grpc_url())
            .await
            .expect("audit client");
        let mut stream = client
            .query(QueryRequest::default())
            .await
            .expect("query")
            .into_inner();
        let mut records = Vec::new();
        while let Some(record) = stream.message().await.expect("record") {
            records.push(record);
        }
        records
    }

    pub async fn stop(mut self) -> String {
        let output = if self.gateway.is_some() {
            self.stop_gateway().await
        } else {
            String::new()
        };
        for service in [self.advisor.take(), self.signer.take(), self.audit.take()]
            .into_iter()
            .flatten()
        {
            service.stop().await;
        }
        self.bao.stop().await;
        output
    }
}

/// Whether the bot's message is an alert (`[CRITICAL] ...`).
pub fn is_alert(action: &BotAction) -> bool {
    ["<b>[CRITICAL]", "<b>[WARNING]", "<b>[INFO]"]
        .iter()
        .any(|p| action.text.starts_with(p))
}

/// The buttons' callback data of a confirmation question.
pub fn buttons(action: &BotAction) -> (String, String) {
    let row = action.buttons.first().expect("a row of buttons");
    (row[0].1.clone(), row[1].1.clone())
}
