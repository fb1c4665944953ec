//! `engramctl incident`: the seed document's incident response, in the order that limits
//! damage: halt trading (the signer's kill switch, which survives restarts), export the audit
//! timeline of the window for the investigation, revoke the services' Vault credentials (they
//! keep serving from memory, but can read nothing new and renew no certificate), and print
//! what is left for a person to do. Each step runs even when an earlier one failed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_proto::v1::{Actor, HaltRequest, RequestContext};
use serde_json::Value;

use crate::grpc::TlsArgs;
use crate::timeline::{self, Format};
use crate::vault::{VaultAccess, call, http_client};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Why (shown in the signer's status and the halt alert).
    pub reason: String,
    /// The signer's gRPC URL.
    pub signer: String,
    /// The audit sink's gRPC URL.
    pub audit: String,
    /// The operator's certificate files.
    pub tls: TlsArgs,
    /// The window to export.
    pub since: SystemTime,
    /// Its end.
    pub until: Option<SystemTime>,
    /// JSON lines or CSV.
    pub format: Format,
    /// Where the timeline goes.
    pub out: PathBuf,
    /// Vault auth mounts whose logins are revoked (`approle`, `kubernetes`, `token`).
    pub revoke: Vec<String>,
}

/// How each step went: (step, ok, what happened).
pub type Steps = Vec<(&'static str, bool, String)>;

async fn halt(plan: &Plan) -> Result<String, String> {
    let channel = crate::grpc::channel(&plan.signer, "exchange-signer", &plan.tls)?;
    let status = ExchangeSignerClient::new(channel)
        .halt(HaltRequest {
            context: Some(RequestContext {
                idempotency_key: String::new(),
                correlation_id: format!("incident-{}", std::process::id()),
                actor: Some(Actor {
                    service: crate::grpc::OPERATOR.to_owned(),
                    telegram_user_id: 0,
                    telegram_chat_id: 0,
                }),
            }),
            reason: plan.reason.clone(),
        })
        .await
        .map_err(|s| format!("the signer answered {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if status.halted {
        Ok(format!("trading halted: {}", status.halt_reason))
    } else {
        Err("the signer did not report itself halted".to_owned())
    }
}

async fn export(plan: &Plan) -> Result<String, String> {
    let mut client = timeline::connect(&plan.audit, &plan.tls)?;
    let records = timeline::window(&mut client, Some(plan.since), plan.until).await?;
    let mut text = String::new();
    if plan.format == Format::Csv {
        text.push_str(timeline::CSV_HEADER);
        text.push('\n');
    }
    let mut security = 0;
    for record in &records {
        if record.category == engram_proto::v1::AuditCategory::Security as i32 {
            security += 1;
        }
        text.push_str(&match plan.format {
            Format::Json => timeline::to_json(record).to_string(),
            Format::Csv => timeline::to_csv(record),
        });
        text.push('\n');
    }
    write_private(&plan.out, &text)?;
    Ok(format!(
        "{} records ({security} security events) written to {}",
        records.len(),
        plan.out.display()
    ))
}

/// Writes `text` to a new file only the operator can read (the timeline names people).
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

async fn revoke(access: &VaultAccess, mounts: &[String]) -> Result<String, String> {
    let http = http_client(access)?;
    let enabled = call(&http, access, reqwest::Method::GET, "sys/auth", None).await?;
    let mut done = Vec::new();
    for mount in mounts {
        let login_prefix = if mount == "token" {
            // Tokens made with auth/token/create (a dev or hand-made service token).
            "auth/token/create".to_owned()
        } else {
            let key = format!("{mount}/");
            if enabled["data"]
                .get(&key)
                .or_else(|| enabled.get(&key))
                .is_none()
            {
                done.push(format!("{mount}: not enabled"));
                continue;
            }
            format!("auth/{mount}/login")
        };
        call(
            &http,
            access,
            reqwest::Method::PUT,
            &format!("sys/leases/revoke-prefix/{login_prefix}"),
            None,
        )
        .await?;
        let mut note = format!("{mount}: every login token revoked");
        if mount == "approle" {
            note.push_str(&format!(
                ", {} secret ids destroyed",
                destroy_secret_ids(&http, access).await?
            ));
        }
        done.push(note);
    }
    Ok(done.join("; "))
}

/// Destroys every AppRole secret id, so the services cannot log in again until the operator
/// issues new ones.
async fn destroy_secret_ids(http: &reqwest::Client, access: &VaultAccess) -> Result<usize, String> {
    let list = reqwest::Method::from_bytes(b"LIST").map_err(|e| e.to_string())?;
    let roles = call(http, access, list.clone(), "auth/approle/role", None).await?;
    let mut destroyed = 0;
    for role in keys(&roles) {
        let accessors = call(
            http,
            access,
            list.clone(),
            &format!("auth/approle/role/{role}/secret-id"),
            None,
        )
        .await?;
        for accessor in keys(&accessors) {
            call(
                http,
                access,
                reqwest::Method::POST,
                &format!("auth/approle/role/{role}/secret-id-accessor/destroy"),
                Some(serde_json::json!({ "secret_id_accessor": accessor })),
            )
            .await?;
            destroyed += 1;
        }
    }
    Ok(destroyed)
}

fn keys(list: &Value) -> Vec<String> {
    list["data"]["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the plan; every step is attempted.
pub async fn run(plan: &Plan, access: Result<VaultAccess, String>) -> Steps {
    let mut steps = Steps::new();
    let mut record = |step, outcome: Result<String, String>| match outcome {
        Ok(done) => steps.push((step, true, done)),
        Err(error) => steps.push((step, false, error)),
    };
    record("halt trading", halt(plan).await);
    record("export the audit timeline", export(plan).await);
    record(
        "revoke the services' Vault credentials",
        match access {
            Ok(access) => revoke(&access, &plan.revoke).await,
            Err(error) => Err(error),
        },
    );
    steps
}

/// What a person still has to do (the seed's incident checklist, less what was done).
pub const CHECKLIST: &[&str] = &[
    "Identify the compromised credentials: read the exported timeline (AUTH_DENIED, RPC_DENIED, COMMAND_DENIED, SECRET_ROTATED).",
    "Revoke the Telegram bot token with @BotFather, then: engramctl rotate telegram --from FILE",
    "Delete the exchange API key at the exchange, create one (no withdrawals, no transfers, IP-restricted), then: engramctl rotate exchange --from FILE",
    "Rotate the audit key: engramctl rotate audit --generate (old versions stay readable to verify the past)",
    "Review recent transactions at the exchange against ORDER_PLACED records in the timeline.",
    "Check Vault's own audit log for reads of engram/* and pki/issue/* you cannot explain.",
    "Issue new AppRole secret ids (or let Kubernetes auth log in again) and restart the services.",
    "Verify the trail: engramctl audit verify DIR --keys FILE, and engramctl doctor.",
    "Resume trading only after all of the above (the gateway's /resume, or the signer's Resume as engramctl).",
    "Update passwords and 2FA, review git history (scripts/secret-scan.sh), notify those affected, write up the incident.",
];

/// The default export file: `incident-<unix seconds>.<ext>` in the current directory.
pub fn default_out(format: Format) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    PathBuf::from(format!(
        "incident-{secs}.{}",
        if format == Format::Csv {
            "csv"
        } else {
            "jsonl"
        }
    ))
}
