//! `engramctl doctor`: the seed document's compliance checklist as checks that pass or fail:
//! Vault reachable and unsealed, every secret younger than 90 days, the exchange key unable
//! to withdraw or transfer and bound to IPs, the allowlists not empty, the audit chain
//! intact, certificates far from expiry, no `.env` in git, and a clean secret scan. Values
//! are never printed: ages, counts and versions only.

use std::path::Path;
use std::time::{Duration, SystemTime};

use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_proto::v1::{GetStatusRequest, VerifyRequest};
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

use crate::grpc::TlsArgs;
use crate::vault::{VaultAccess, call, http_client};

/// The seed's rotation rule.
const MAX_SECRET_AGE_DAYS: u64 = 90;
/// A warning this long before a secret is due.
const WARN_SECRET_AGE_DAYS: u64 = 76;
/// A certificate with less left than this fails: renewal at two thirds of a 24 h life leaves
/// 8 h, so 4 h means renewals have been failing for hours.
const MIN_CERT_REMAINING: Duration = Duration::from_secs(4 * 3600);

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Pass,
    /// Fine for now; look at it.
    Warn,
    /// Not compliant.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// Why, in a few words (never a secret).
    pub detail: String,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
    }
}

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The signer's gRPC URL.
    pub signer: String,
    /// The audit sink's gRPC URL.
    pub audit: String,
    /// Each service's admin URL (`http://host:port`), for certificate expiry.
    pub admin: Vec<String>,
    /// The operator's certificate files.
    pub tls: TlsArgs,
}

async fn vault_health(http: &reqwest::Client, access: &VaultAccess) -> Check {
    let name = "Vault reachable and unsealed";
    match http
        .get(format!("{}/v1/sys/health", access.addr))
        .send()
        .await
    {
        Ok(response) => match response.status().as_u16() {
            200 | 429 | 473 => check(name, Status::Pass, format!("{} answers", access.addr)),
            501 => check(name, Status::Fail, "not initialized"),
            503 => check(name, Status::Fail, "sealed"),
            code => check(name, Status::Fail, format!("health answered HTTP {code}")),
        },
        Err(error) => check(name, Status::Fail, format!("unreachable: {error}")),
    }
}

/// Days since `created` (`YYYY-MM-DD` or RFC 3339).
fn age_days(created: &str, now: SystemTime) -> Option<u64> {
    let full = if created.len() == 10 {
        format!("{created}T00:00:00Z")
    } else {
        created.to_owned()
    };
    let at = humantime::parse_rfc3339_weak(full.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(&full))
        .ok()?;
    Some(now.duration_since(at).unwrap_or(Duration::ZERO).as_secs() / 86_400)
}

async fn secret_age(
    http: &reqwest::Client,
    access: &VaultAccess,
    path: &str,
    required: bool,
    now: SystemTime,
) -> Check {
    let name = format!("{path} younger than {MAX_SECRET_AGE_DAYS} days");
    let metadata = match call(
        http,
        access,
        reqwest::Method::GET,
        &format!("{}/metadata/{path}", access.mount),
        None,
    )
    .await
    {
        Ok(Value::Null) => {
            let status = if required { Status::Fail } else { Status::Warn };
            return check(name, status, "no such secret");
        }
        Ok(body) => body,
        Err(error) => return check(name, Status::Fail, error),
    };
    let data = &metadata["data"];
    let version = data["current_version"].as_u64().unwrap_or(0);
    let created = data["custom_metadata"]["created"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            data["versions"][version.to_string()]["created_time"]
                .as_str()
                .map(str::to_owned)
        });
    let Some(days) = created.as_deref().and_then(|c| age_days(c, now)) else {
        return check(
            name,
            Status::Fail,
            format!("version {version}: no readable creation date"),
        );
    };
    let detail = format!("version {version}, {days} days old");
    match days {
        d if d > MAX_SECRET_AGE_DAYS => check(name, Status::Fail, format!("{detail}: rotate it")),
        d if d > WARN_SECRET_AGE_DAYS => check(name, Status::Warn, format!("{detail}: due soon")),
        _ => check(name, Status::Pass, detail),
    }
}

async fn allowlists(http: &reqwest::Client, access: &VaultAccess) -> Check {
    let name = "Telegram allowlists not empty";
    let body = match call(
        http,
        access,
        reqwest::Method::GET,
        &format!("{}/data/engram/telegram", access.mount),
        None,
    )
    .await
    {
        Ok(Value::Null) => return check(name, Status::Fail, "engram/telegram does not exist"),
        Ok(body) => body,
        Err(error) => return check(name, Status::Fail, error),
    };
    let field = |key: &str| -> usize {
        body["data"]["data"][key].as_str().map_or(0, |list| {
            list.split(',')
                .filter(|item| !item.trim().is_empty())
                .count()
        })
    };
    let (chats, users, admin) = (field("allowed_chats"), field("users"), field("admin_chat"));
    let detail = format!(
        "{chats} chats, {users} users, admin chat {}",
        if admin > 0 { "set" } else { "unset" }
    );
    if chats > 0 && users > 0 && admin > 0 {
        check(name, Status::Pass, detail)
    } else {
        check(name, Status::Fail, detail)
    }
}

async fn exchange_key(targets: &Targets) -> Vec<Check> {
    let names = [
        "exchange key cannot withdraw",
        "exchange key cannot transfer",
        "exchange key IP-restricted",
    ];
    let status = match crate::grpc::channel(&targets.signer, "exchange-signer", &targets.tls) {
        Ok(channel) => ExchangeSignerClient::new(channel)
            .get_status(GetStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("the signer answered {:?}: {}", s.code(), s.message())),
        Err(error) => Err(error),
    };
    let restrictions = match status {
        Ok(status) => status.key_restrictions,
        Err(error) => {
            return names
                .iter()
                .map(|n| check(*n, Status::Fail, error.clone()))
                .collect();
        }
    };
    let Some(r) = restrictions else {
        return names
            .iter()
            .map(|n| {
                check(
                    *n,
                    Status::Fail,
                    "the signer has not read the key's restrictions yet",
                )
            })
            .collect();
    };
    let verdict = |bad: bool, what: &str| {
        if bad {
            (
                Status::Fail,
                format!("{what}: revoke this key at the exchange"),
            )
        } else {
            (Status::Pass, "as the exchange reports it".to_owned())
        }
    };
    let checks = [
        verdict(r.enable_withdrawals, "withdrawals enabled"),
        verdict(
            r.enable_internal_transfer || r.permits_universal_transfer,
            "transfers enabled",
        ),
        if r.ip_restricted {
            (Status::Pass, "bound to an IP allowlist".to_owned())
        } else {
            (
                Status::Fail,
                "usable from any IP: restrict it at the exchange".to_owned(),
            )
        },
    ];
    names
        .iter()
        .zip(checks)
        .map(|(name, (status, detail))| check(*name, status, detail))
        .collect()
}

async fn audit_chain(targets: &Targets) -> Check {
    let name = "audit chain verifies";
    let answer = match crate::timeline::connect(&targets.audit, &targets.tls) {
        Ok(mut client) => client
            .verify(VerifyRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("the audit sink answered {:?}: {}", s.code(), s.message())),
        Err(error) => Err(error),
    };
    match answer {
        Ok(report) if report.ok => check(
            name,
            Status::Pass,
            format!(
                "{} records, {} checkpoints",
                report.records_checked, report.checkpoints_checked
            ),
        ),
        Ok(report) => check(
            name,
            Status::Fail,
            format!(
                "record {} in {}: {}",
                report.first_bad_sequence, report.first_bad_segment, report.reason
            ),
        ),
        Err(error) => check(name, Status::Fail, error),
    }
}

/// `remedy` says what a short remaining life means for this certificate.
fn remaining_check(name: String, expiry: SystemTime, now: SystemTime, remedy: &str) -> Check {
    match expiry.duration_since(now) {
        Ok(left) if left >= MIN_CERT_REMAINING => check(
            name,
            Status::Pass,
            format!("{}h left", left.as_secs() / 3600),
        ),
        Ok(left) => check(
            name,
            Status::Fail,
            format!("{} min left: {remedy}", left.as_secs() / 60),
        ),
        Err(_) => check(name, Status::Fail, "expired"),
    }
}

async fn certificates(http: &reqwest::Client, targets: &Targets, now: SystemTime) -> Vec<Check> {
    let mut checks = Vec::new();
    for admin in &targets.admin {
        let name = format!("certificate of {admin} not near expiry");
        let metrics = match http.get(format!("{admin}/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => {
                checks.push(check(name, Status::Fail, format!("unreachable: {error}")));
                continue;
            }
        };
        let expiry = metrics
            .lines()
            .find(|l| l.starts_with("engram_tls_cert_expiry_timestamp_seconds "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        checks.push(match expiry {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(secs) if secs > 0.0 => remaining_check(
                name,
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64),
                now,
                "its renewals are failing (see engram_tls_cert_renewals_total)",
            ),
            _ => check(
                name,
                Status::Fail,
                "no mutual-TLS certificate (ENGRAM_TLS_MODE=off?)",
            ),
        });
    }
    let name = "the operator's certificate not near expiry".to_owned();
    checks.push(match std::fs::read(&targets.tls.cert) {
        Ok(pem) => match rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok)
            .and_then(|der| engram_runtime::tls::validity(&der))
        {
            Some((_, not_after)) => remaining_check(
                name,
                not_after,
                now,
                "issue a new one (make up writes .engram/pki/)",
            ),
            None => check(name, Status::Fail, "not a PEM certificate"),
        },
        Err(error) => check(
            name,
            Status::Warn,
            format!("{}: {error}", targets.tls.cert.display()),
        ),
    });
    checks
}

fn env_not_tracked(repo: &Path) -> Check {
    let name = "no .env tracked by git";
    let output = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo)
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let tracked: Vec<String> = output
                .stdout
                .split(|b| *b == 0)
                .filter_map(|p| std::str::from_utf8(p).ok())
                .filter(|p| *p == ".env" || p.ends_with("/.env"))
                .map(str::to_owned)
                .collect();
            if tracked.is_empty() {
                check(name, Status::Pass, "none")
            } else {
                check(
                    name,
                    Status::Fail,
                    format!("{}: remove it and rewrite history", tracked.join(", ")),
                )
            }
        }
        _ => check(name, Status::Warn, "not a git checkout: not checked"),
    }
}

fn secret_scan(repo: &Path) -> Check {
    let name = "repository secret scan clean";
    let script = repo.join("scripts/secret-scan.sh");
    if !script.is_file() {
        return check(
            name,
            Status::Warn,
            "scripts/secret-scan.sh not found: not checked",
        );
    }
    match std::process::Command::new(&script)
        .current_dir(repo)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(status) if status.success() => check(name, Status::Pass, "no findings"),
        Ok(status) => check(
            name,
            Status::Fail,
            format!(
                "findings (exit {}): run scripts/secret-scan.sh",
                status.code().unwrap_or(-1)
            ),
        ),
        Err(error) => check(name, Status::Fail, format!("cannot run the scan: {error}")),
    }
}

/// Runs every check.
///
/// # Errors
///
/// When no HTTP client can be built.
pub async fn run(
    access: &VaultAccess,
    targets: &Targets,
    repo: &Path,
) -> Result<Vec<Check>, String> {
    let http = http_client(access)?;
    let now = SystemTime::now();
    let mut checks = vec![vault_health(&http, access).await];
    for (path, required) in [
        ("engram/telegram", true),
        ("engram/exchange", true),
        ("engram/audit", true),
        ("engram/llm", false),
    ] {
        checks.push(secret_age(&http, access, path, required, now).await);
    }
    checks.extend(exchange_key(targets).await);
    checks.push(allowlists(&http, access).await);
    checks.push(audit_chain(targets).await);
    checks.extend(certificates(&http, targets, now).await);
    checks.push(env_not_tracked(repo));
    checks.push(secret_scan(repo));
    Ok(checks)
}

/// The report as a table.
pub fn table(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!("{:<width$}  STATUS  DETAIL\n", "CHECK");
    for c in checks {
        out.push_str(&format!(
            "{:<width$}  {:<6}  {}\n",
            c.name,
            c.status.label(),
            c.detail
        ));
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    out.push_str(&format!(
        "\n{} checks: {} passed, {warned} warnings, {failed} failed\n",
        checks.len(),
        checks.len() - failed - warned
    ));
    out
}

/// The report as JSON.
pub fn to_json(checks: &[Check]) -> Value {
    Value::Array(
        checks
            .iter()
            .map(|c| json!({ "check": c.name, "status": c.status.label(), "detail": c.detail }))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_come_from_dates_or_timestamps() {
        let now = humantime::parse_rfc3339("2026-12-04T12:00:00Z").unwrap();
        assert_eq!(age_days("2026-09-05", now), Some(90));
        assert_eq!(age_days("2026-12-04T01:02:03.456789Z", now), Some(0));
        assert_eq!(
            age_days("2027-01-01", now),
            Some(0),
            "a future date is not negative"
        );
        for bad in ["", "yesterday", "2026-13-01", "04/12/2026"] {
            assert_eq!(age_days(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn the_table_counts_every_outcome() {
        let checks = [
            check("a", Status::Pass, "fine"),
            check("b", Status::Warn, "soon"),
            check("c", Status::Fail, "broken"),
        ];
        let text = table(&checks);
        assert!(text.contains("c      FAIL    broken"), "{text}");
        assert!(
            text.ends_with("3 checks: 1 passed, 1 warnings, 1 failed\n"),
            "{text}"
        );
    }
}
