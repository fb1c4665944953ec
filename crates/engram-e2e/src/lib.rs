//! The whole stack for end-to-end tests: a real OpenBao with the committed Vault policies and
//! a PKI, the four service binaries (each its own process, its own Vault token limited by its
//! own policy, mutual TLS on every hop), and the Telegram, exchange and LLM doubles. Tests
//! speak to it as a person through the Telegram double, or as any identity over gRPC.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use engram_doubles::exchange::{ExchangeDouble, KeyKind, Restrictions};
use engram_doubles::llm::LlmDouble;
use engram_doubles::telegram::{BotAction, TelegramDouble};
use engram_runtime::tls::{Material, MutualTls, Transport};
use engram_testkit::{OpenBao, ServiceProcess, http_get, poll_until, repo_root};
use serde_json::json;

/// Every identity the PKI issues: the services, the operator, and one the table never names.
pub const IDENTITIES: [&str; 6] = [
    "telegram-gateway",
    "exchange-signer",
    "llm-advisor",
    "audit-sink",
    "engramctl",
    "intruder",
];
/// The bot token of the stack (a canary: it must appear in no output).
pub const BOT_TOKEN: &str = "300:e2e-canary-bot-token";
/// The admin, in a private chat (the admin chat for alerts).
pub const ADMIN: i64 = 2001;
/// A trader, in a private chat.
pub const TRADER: i64 = 2002;
/// Someone on no list.
pub const OUTSIDER: i64 = 7777;
/// The exchange key's public half (the secret half is [`EXCHANGE_SECRET`]).
pub const EXCHANGE_KEY: &str = "e2e-exchange-key-1";
/// A canary secret.
pub const EXCHANGE_SECRET: &str = "e2e-canary-exchange-secret-1";
/// The first audit key (a canary).
pub const AUDIT_KEY: &str = "e2e-canary-audit-key-1";

/// A service binary of this workspace, built next to the running executable: beside it (a
/// benchmark in `target/release/`) or one folder up (a test in `target/debug/deps/`; `cargo
/// test --workspace` builds them all).
///
/// # Errors
///
/// When it has not been built.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("the executable has no folder")?;
    for dir in [Some(here), here.parent()].into_iter().flatten() {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} is missing beside {}: run `cargo build --workspace` (make test does)",
        exe.display()
    );
}

/// A text field of an audit record's details (empty when absent or not text).
pub fn text_detail(record: &engram_proto::v1::AuditRecord, name: &str) -> String {
    match record
        .details
        .as_ref()
        .and_then(|d| d.fields.get(name))
        .and_then(|v| v.kind.as_ref())
    {
        Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// How to run the stack.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for every service.
    pub otlp_endpoint: Option<String>,
    /// Extra settings for the signer (policy caps for load).
    pub signer: Vec<(&'static str, String)>,
    /// Extra settings for the audit sink.
    pub audit: Vec<(&'static str, String)>,
    /// Extra settings for the gateway (they override the stack's own).
    pub gateway: Vec<(&'static str, String)>,
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    /// Vault.
    pub bao: OpenBao,
    /// The Telegram Bot API double.
    pub telegram: TelegramDouble,
    /// The exchange double.
    pub exchange: ExchangeDouble,
    /// The LLM double.
    pub llm: LlmDouble,
    /// The audit sink.
    pub audit: ServiceProcess,
    /// The exchange signer.
    pub signer: ServiceProcess,
    /// The LLM advisor.
    pub advisor: ServiceProcess,
    /// The Telegram gateway.
    pub gateway: ServiceProcess,
    _dirs: Vec<tempfile::TempDir>,
}

/// A token for `service` that carries only its own policy (as its AppRole would).
async fn service_token(bao: &OpenBao, service: &str) -> anyhow::Result<String> {
    let response = bao
        .api(
            reqwest::Method::POST,
            "auth/token/create",
            Some(json!({ "policies": [service], "ttl": "2h" })),
        )
        .await?;
    Ok(response["auth"]["client_token"]
        .as_str()
        .context("no token")?
        .to_owned())
}

async fn ready(service: &ServiceProcess, name: &str) -> anyhow::Result<()> {
    let admin = service.admin_addr;
    poll_until(
        &format!("{name} ready"),
        Duration::from_secs(40),
        || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n--- {name} output ---\n{}", service.output()))
}

impl Stack {
    /// Starts everything and waits until all four services are ready.
    ///
    /// # Errors
    ///
    /// When a step fails; a service's output is in the message.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        engram_runtime::service::install_crypto_provider();
        let bao = OpenBao::start().await?;
        let root = repo_root();
        for service in &IDENTITIES[..4] {
            let policy =
                std::fs::read_to_string(root.join(format!("deploy/vault/policies/{service}.hcl")))?;
            bao.api(
                reqwest::Method::PUT,
                &format!("sys/policies/acl/{service}"),
                Some(json!({ "policy": policy })),
            )
            .await?;
        }
        bao.enable_pki("pki", &IDENTITIES).await?;
        bao.put_secret("engram/audit", json!({ "hmac_key": AUDIT_KEY }))
            .await?;
        bao.put_secret(
            "engram/exchange",
            json!({ "api_key": EXCHANGE_KEY, "api_secret": EXCHANGE_SECRET }),
        )
        .await?;
        // Created two weeks ago: young enough for `engramctl doctor` whenever the test runs.
        let created = std::time::SystemTime::now() - Duration::from_secs(14 * 86_400);
        let created = humantime::format_rfc3339(created).to_string();
        bao.put_custom_metadata("engram/exchange", json!({ "created": &created[..10] }))
            .await?;
        bao.put_secret("engram/llm", json!({ "provider": "double" }))
            .await?;
        bao.put_secret(
            "engram/telegram",
            json!({
                "bot_token": BOT_TOKEN,
                "allowed_chats": format!("{ADMIN},{TRADER}"),
                "users": format!("{ADMIN}:admin,{TRADER}:trader"),
                "admin_chat": ADMIN.to_string(),
            }),
        )
        .await?;

        let any = "127.0.0.1:0".parse()?;
        let telegram = TelegramDouble::start(any, BOT_TOKEN).await?;
        let exchange = ExchangeDouble::start(any).await?;
        exchange.add_key(
            EXCHANGE_KEY,
            KeyKind::Hmac(EXCHANGE_SECRET.to_owned()),
            Restrictions::default(),
        );
        let llm = LlmDouble::start(any, "e2e-model").await?;

        let audit_dir = tempfile::tempdir()?;
        let state_dir = tempfile::tempdir()?;
        let gateway_port = engram_testkit::free_port_pair();
        let gateway_url = format!("https://127.0.0.1:{gateway_port}");
        let common = |token: String| {
            let mut env = vec![
                ("ENGRAM_VAULT_ADDR", bao.addr()),
                ("ENGRAM_VAULT_TOKEN", token),
                ("ENGRAM_TLS_MODE", "vault".to_owned()),
                ("ENGRAM_SECRET_REFRESH_SECS", "0.5".to_owned()),
                ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0".to_owned()),
            ];
            if let Some(endpoint) = &options.otlp_endpoint {
                env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
            }
            env
        };

        let mut env = common(service_token(&bao, "audit-sink").await?);
        env.push(("ENGRAM_AUDIT_DIR", audit_dir.path().display().to_string()));
        env.push(("ENGRAM_ALERT_ADDR", gateway_url.clone()));
        env.extend(options.audit.iter().cloned());
        let audit =
            ServiceProcess::spawn(binary("audit-sink")?.to_str().context("path")?, &env).await?;
        let audit_url = format!("https://{}", audit.grpc_addr);

        let mut env = common(service_token(&bao, "exchange-signer").await?);
        env.extend([
            ("ENGRAM_AUDIT_ADDR", audit_url.clone()),
            ("ENGRAM_ALERT_ADDR", gateway_url.clone()),
            ("ENGRAM_EXCHANGE_URL", exchange.url()),
            (
                "ENGRAM_SIGNER_STATE_DIR",
                state_dir.path().display().to_string(),
            ),
            // The test key is not IP-restricted: a warning, not a refusal.
        ]);
        env.extend(options.signer.iter().cloned());
        let signer =
            ServiceProcess::spawn(binary("exchange-signer")?.to_str().context("path")?, &env)
                .await?;

        let mut env = common(service_token(&bao, "llm-advisor").await?);
        env.extend([
            ("ENGRAM_AUDIT_ADDR", audit_url.clone()),
            ("LMSTUDIO_URL", llm.url()),
        ]);
        let advisor =
            ServiceProcess::spawn(binary("llm-advisor")?.to_str().context("path")?, &env).await?;

        let mut env = common(service_token(&bao, "telegram-gateway").await?);
        env.extend([
            ("ENGRAM_GRPC_ADDR", format!("127.0.0.1:{gateway_port}")),
            ("ENGRAM_AUDIT_ADDR", audit_url),
            (
                "ENGRAM_SIGNER_ADDR",
                format!("https://{}", signer.grpc_addr),
            ),
            (
                "ENGRAM_ADVISOR_ADDR",
                format!("https://{}", advisor.grpc_addr),
            ),
            ("ENGRAM_TELEGRAM_API_URL", telegram.url()),
            ("ENGRAM_TELEGRAM_POLL_TIMEOUT_SECS", "5".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC_CHAT", "50".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_MIN_CHAT", "1000".to_owned()),
            ("ENGRAM_TELEGRAM_MESSAGES_PER_SEC", "100".to_owned()),
            ("ENGRAM_GATEWAY_USER_COMMANDS", "100".to_owned()),
            ("ENGRAM_GATEWAY_GLOBAL_COMMANDS", "1000".to_owned()),
        ]);
        env.extend(options.gateway.iter().cloned());
        let gateway =
            ServiceProcess::spawn(binary("telegram-gateway")?.to_str().context("path")?, &env)
                .await?;

        for (service, name) in [
            (&audit, "audit-sink"),
            (&signer, "exchange-signer"),
            (&advisor, "llm-advisor"),
            (&gateway, "telegram-gateway"),
        ] {
            ready(service, name).await?;
        }
        Ok(Self {
            bao,
            telegram,
            exchange,
            llm,
            audit,
            signer,
            advisor,
            gateway,
            _dirs: vec![audit_dir, state_dir],
        })
    }

    /// A client transport with the identity `spiffe://engram/<identity>` from the stack's CA.
    ///
    /// # Errors
    ///
    /// When the certificate cannot be issued or used.
    pub async fn transport_as(&self, identity: &str) -> anyhow::Result<Transport> {
        self.transport_from("pki", identity).await
    }

    /// As [`Self::transport_as`], with a certificate from another PKI mount (another CA),
    /// trusting the stack's CA for the servers.
    ///
    /// # Errors
    ///
    /// When the certificate cannot be issued or used.
    pub async fn transport_from(&self, mount: &str, identity: &str) -> anyhow::Result<Transport> {
        let issued = self.bao.issue(mount, identity, 3600).await?;
        let ca = self.bao.issue("pki", identity, 60).await?.ca;
        let material = Material::from_pem(
            issued.chain.as_bytes(),
            issued.key.as_bytes(),
            ca.as_bytes(),
            identity,
        )?;
        Ok(Transport::Mutual(MutualTls::fixed(&material)?))
    }

    /// A channel to `service` as `transport`.
    pub fn channel(&self, transport: &Transport, service: &str) -> tonic::transport::Channel {
        let addr = match service {
            "telegram-gateway" => self.gateway.grpc_addr,
            "exchange-signer" => self.signer.grpc_addr,
            "llm-advisor" => self.advisor.grpc_addr,
            _ => self.audit.grpc_addr,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap_or_else(|_| unreachable!("a socket address is a valid URI"))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20));
        transport.channel(endpoint, service)
    }

    /// Every command the gateway has finished handling so far.
    pub async fn handled(&self) -> u64 {
        let Ok((_, metrics)) = http_get(self.gateway.admin_addr, "/metrics").await else {
            return 0;
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let total = metrics
            .lines()
            .filter(|l| l.starts_with("engram_telegram_command_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        total
    }

    async fn wait_handled(&self, target: u64) -> anyhow::Result<()> {
        poll_until(
            "the update handled",
            Duration::from_secs(30),
            || async move { (self.handled().await >= target).then_some(()) },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.gateway.output()))
    }

    /// `user` writes `text` in their private chat; what the bot did in answer.
    ///
    /// # Errors
    ///
    /// When the gateway does not handle it in time.
    pub async fn say(&self, user: i64, text: &str) -> anyhow::Result<Vec<BotAction>> {
        let before = self.handled().await;
        let seq = self.telegram.last_seq();
        self.telegram.send_from(user, user, text);
        self.wait_handled(before + 1).await?;
        Ok(self.telegram.actions_after(seq))
    }

    /// `user` presses the button `data` under `message_id` in their chat.
    ///
    /// # Errors
    ///
    /// When the press cannot be injected or is not handled in time.
    pub async fn press(
        &self,
        user: i64,
        message_id: i64,
        data: &str,
    ) -> anyhow::Result<Vec<BotAction>> {
        let before = self.handled().await;
        let seq = self.telegram.last_seq();
        self.telegram
            .press(user, user, message_id, data)
            .map_err(|e| anyhow::anyhow!("press: {e}"))?;
        self.wait_handled(before + 1).await?;
        Ok(self.telegram.actions_after(seq))
    }

    /// `user` asks for a trade and presses Confirm; the bot's final word on it.
    ///
    /// # Errors
    ///
    /// When no confirmation question arrives or the press fails.
    pub async fn trade(&self, user: i64, command: &str) -> anyhow::Result<String> {
        let asked = self.say(user, command).await?;
        let question = asked
            .iter()
            .find(|a| a.kind == "send" && a.chat_id == user && !a.buttons.is_empty())
            .with_context(|| format!("no confirmation for {command}: {asked:#?}"))?;
        let confirm = question.buttons[0][0].1.clone();
        let seq = self.telegram.last_seq();
        self.press(user, question.message_id, &confirm).await?;
        let message_id = question.message_id;
        // The outcome arrives as an edit of the question.
        poll_until(
            "the trade's outcome",
            Duration::from_secs(30),
            || async move {
                self.telegram
                    .actions_after(seq)
                    .into_iter()
                    .rev()
                    .find(|a| {
                        a.kind == "edit"
                            && a.message_id == message_id
                            && !a.text.contains("Sending")
                    })
                    .map(|a| a.text)
            },
        )
        .await
    }

    /// Stops the services (gateway first, the sink last so it records the others), then Vault.
    pub async fn stop(mut self) {
        for service in [
            &mut self.gateway,
            &mut self.advisor,
            &mut self.signer,
            &mut self.audit,
        ] {
            let _ = service.terminate(Duration::from_secs(20)).await;
        }
        self.bao.stop().await;
    }

    /// Everything every service wrote so far.
    pub fn outputs(&self) -> String {
        [&self.audit, &self.signer, &self.advisor, &self.gateway]
            .iter()
            .map(|s| s.output())
            .collect::<Vec<_>>()
            .join("\n")
    }
}
