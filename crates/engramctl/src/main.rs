//! `engramctl`, the operator's tool. `engramctl audit verify DIR` checks an audit directory
//! offline: the hash chain across segments and every checkpoint (signatures too, when the
//! audit keys are given in a file or on standard input, never on the command line).
//! `engramctl chat` talks to the bot from a terminal through the local Telegram double.
//! `engramctl rotate exchange|telegram|audit` writes a new secret version to Vault, the new
//! values read from a file or standard input.

mod chat;
mod doctor;
mod grpc;
mod incident;
mod rotate;
mod timeline;
mod vault;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use engram_audit::verify::verify_dir;
use zeroize::Zeroizing;

/// Exit code when the audit trail does not verify.
const EXIT_BAD_TRAIL: u8 = 1;
/// Exit code for bad usage or unreadable input (EX_USAGE is 64 elsewhere; clap uses 2).
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "engramctl", version, about = "Operate an Engram installation.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The local stack's dev chat id (`scripts/stack.sh`): allowed chat, admin chat and admin.
const DEV_CHAT_ID: i64 = 100_000_001;

#[derive(Subcommand, Debug)]
enum Command {
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write a new version of a service's secret to Vault (values from a file or stdin as a
    /// JSON object, never from arguments), stamped with today's date as `created`.
    Rotate {
        /// Which secret.
        #[arg(value_enum)]
        target: rotate::Target,
        /// A JSON file with the new values, or `-` for standard input; e.g. for exchange
        /// {"api_key": "...", "api_secret": "..."}.
        #[arg(long, value_name = "FILE", required_unless_present = "generate")]
        from: Option<PathBuf>,
        /// audit only: generate a new 256-bit key instead of reading one.
        #[arg(long, conflicts_with = "from")]
        generate: bool,
        #[command(flatten)]
        vault: vault::VaultArgs,
    },
    /// The compliance checklist as checks: a PASS/WARN/FAIL table, exit 1 when any fails.
    Doctor {
        #[command(flatten)]
        vault: vault::VaultArgs,
        /// The signer (the exchange key's restrictions) and the sink (the chain).
        #[command(flatten)]
        addrs: grpc::ServiceAddrs,
        /// The services' admin URLs, comma-separated (for certificate expiry).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "http://127.0.0.1:9101,http://127.0.0.1:9102,http://127.0.0.1:9103,http://127.0.0.1:9104"
        )]
        admin: Vec<String>,
        #[command(flatten)]
        tls: grpc::TlsArgs,
        /// The checkout the git and secret-scan checks look at.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Incident response: halt trading, export the audit timeline, revoke the services'
    /// Vault credentials, and print what is left to do. Exit 1 when a step failed.
    Incident {
        /// Why (at most 200 characters; shown in the signer's status and the alert).
        #[arg(long)]
        reason: String,
        /// Export from this time (RFC 3339 or a date), or this long ago (e.g. 24h, 7d).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Export until this time.
        #[arg(long)]
        until: Option<String>,
        /// `json` (one object per line) or `csv`.
        #[arg(long, value_enum, default_value = "json")]
        format: timeline::Format,
        /// The export file (created, never overwritten; mode 600).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Vault auth mounts whose logins are revoked (approle, kubernetes, token).
        #[arg(long, value_delimiter = ',', default_value = "approle,kubernetes")]
        revoke: Vec<String>,
        #[command(flatten)]
        addrs: grpc::ServiceAddrs,
        #[command(flatten)]
        tls: grpc::TlsArgs,
        #[command(flatten)]
        vault: vault::VaultArgs,
    },
    /// Talk to the bot from this terminal, through the local Telegram Bot API double.
    Chat {
        /// The double's URL.
        #[arg(
            long,
            env = "ENGRAM_TELEGRAM_DOUBLE_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        url: String,
        /// The Telegram user id to speak as (the dev stack's admin by default).
        #[arg(long, default_value_t = DEV_CHAT_ID)]
        user: i64,
        /// The chat to speak in (default: the private chat with that user).
        #[arg(long)]
        chat: Option<i64>,
        /// The username the bot sees.
        #[arg(long, default_value = "operator")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Print the newest records from the running audit sink (and follow new ones).
    Tail {
        /// The audit sink's gRPC URL (https: mutual TLS as engramctl).
        #[arg(
            long,
            env = "ENGRAM_AUDIT_ADDR",
            default_value = "https://127.0.0.1:50054"
        )]
        addr: String,
        #[command(flatten)]
        tls: grpc::TlsArgs,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: u32,
        /// Keep printing new records as they arrive.
        #[arg(long)]
        follow: bool,
    },
    /// Export the records of a time window from the running audit sink, as JSON lines or CSV.
    Export {
        /// The audit sink's gRPC URL (https: mutual TLS as engramctl).
        #[arg(
            long,
            env = "ENGRAM_AUDIT_ADDR",
            default_value = "https://127.0.0.1:50054"
        )]
        addr: String,
        #[command(flatten)]
        tls: grpc::TlsArgs,
        /// From this time (RFC 3339, or a date for its midnight UTC), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// Until this time, exclusive.
        #[arg(long)]
        until: Option<String>,
        /// `json` (one object per line) or `csv`.
        #[arg(long, value_enum, default_value = "json")]
        format: timeline::Format,
    },
    /// Verify an audit directory offline and name the first bad record.
    Verify {
        /// The audit directory (segments and checkpoints.jsonl).
        dir: PathBuf,
        /// A JSON file mapping key versions to audit keys, e.g. {"1": "...", "2": "..."};
        /// `-` reads it from standard input. Without it, signatures are reported unchecked.
        #[arg(long, value_name = "FILE")]
        keys: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

type Keys = BTreeMap<u64, Zeroizing<Vec<u8>>>;

/// Parses the keys file: a JSON object of version → key.
fn parse_keys(text: &str) -> Result<Keys, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the keys file is not JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or("the keys file must be a JSON object of version -> key")?;
    let mut keys = Keys::new();
    for (version, key) in object {
        let version: u64 = version
            .parse()
            .map_err(|_| format!("key version {version:?} is not a number"))?;
        let key = key
            .as_str()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("the key of version {version} must be a non-empty string"))?;
        keys.insert(version, Zeroizing::new(key.as_bytes().to_vec()));
    }
    Ok(keys)
}

fn read_keys(path: &Path) -> Result<Keys, String> {
    let mut text = Zeroizing::new(String::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read keys from standard input: {e}"))?;
    } else {
        *text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    }
    parse_keys(&text)
}

fn audit_verify(dir: &Path, keys: Option<&Path>, json: bool) -> ExitCode {
    if !dir.is_dir() {
        eprintln!("engramctl: {} is not a directory", dir.display());
        return ExitCode::from(EXIT_USAGE);
    }
    let keys = match keys.map(read_keys).transpose() {
        Ok(keys) => keys.unwrap_or_default(),
        Err(message) => {
            eprintln!("engramctl: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let report = match verify_dir(dir, &|version| keys.get(&version).map(|k| k.to_vec())) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("engramctl: cannot read {}: {error}", dir.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if json {
        let value = serde_json::json!({
            "ok": report.ok,
            "records_checked": report.records_checked,
            "checkpoints_checked": report.checkpoints_checked,
            "signatures_unchecked": report.signatures_unchecked,
            "first_bad_sequence": report.first_bad_seq,
            "first_bad_segment": report.first_bad_segment,
            "reason": report.reason,
        });
        println!("{value}");
    } else if report.ok {
        println!(
            "OK: {} records, {} checkpoints verified{}",
            report.records_checked,
            report.checkpoints_checked,
            if report.signatures_unchecked > 0 {
                format!(
                    " ({} signatures unchecked: give --keys)",
                    report.signatures_unchecked
                )
            } else {
                String::new()
            }
        );
    } else {
        println!(
            "FAILED at record {} ({}): {}\n{} records verified before it",
            report.first_bad_seq, report.first_bad_segment, report.reason, report.records_checked
        );
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BAD_TRAIL)
    }
}

/// Exit code when Vault or a service refuses, or cannot be reached.
const EXIT_REFUSED: u8 = 1;

fn rotate_secret(
    target: rotate::Target,
    from: Option<&Path>,
    generate: bool,
    access: Result<vault::VaultAccess, String>,
) -> ExitCode {
    let fail = |message: String, code: u8| {
        eprintln!("engramctl: {message}");
        ExitCode::from(code)
    };
    let values = match (from, generate) {
        (_, true) if target != rotate::Target::Audit => {
            return fail(
                "--generate is only for the audit key".to_owned(),
                EXIT_USAGE,
            );
        }
        (_, true) => match rotate::generate_key() {
            Ok(key) => BTreeMap::from([("hmac_key".to_owned(), key)]),
            Err(message) => return fail(message, EXIT_USAGE),
        },
        (Some(from), false) => match rotate::read_values(from) {
            Ok(values) => values,
            Err(message) => return fail(message, EXIT_USAGE),
        },
        (None, false) => return fail("give --from FILE or -".to_owned(), EXIT_USAGE),
    };
    if let Err(message) = rotate::check_values(target, &values) {
        return fail(message, EXIT_USAGE);
    }
    let access = match access {
        Ok(access) => access,
        Err(message) => return fail(message, EXIT_USAGE),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(error.to_string(), EXIT_USAGE),
    };
    match runtime.block_on(rotate::rotate(&access, target, &values)) {
        Ok(done) => {
            println!(
                "{}: version {} written ({} changed), created {}. The service picks it up at its next refresh.",
                done.path,
                done.version,
                done.fields.join(", "),
                done.created
            );
            ExitCode::SUCCESS
        }
        Err(message) => fail(message, EXIT_REFUSED),
    }
}

/// Why a command failed, and the exit code that says so.
#[derive(Debug)]
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// The operator's input is wrong (exit 2).
    fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_USAGE,
        }
    }

    /// Vault or a service refused or could not be reached (exit 1).
    fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_REFUSED,
        }
    }
}

/// Runs `work` on a one-thread runtime and turns its outcome into the exit code.
fn run_async(work: impl Future<Output = Result<(), Failure>>) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure::usage(error.to_string()))
        .and_then(|runtime| runtime.block_on(work));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("engramctl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn audit_tail(
    addr: &str,
    tls: &grpc::TlsArgs,
    count: u32,
    follow: bool,
) -> Result<(), Failure> {
    let mut client = timeline::connect(addr, tls).map_err(Failure::usage)?;
    let records = timeline::newest(&mut client, count)
        .await
        .map_err(Failure::refused)?;
    for record in &records {
        println!("{}", timeline::to_line(record));
    }
    let mut last = records.last().map(|r| (r.sequence, r.recorded_at));
    if !follow {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        let since = last.and_then(|(_, at)| at).and_then(|t| {
            std::time::SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(
                u64::try_from(t.seconds).ok()?,
                u32::try_from(t.nanos).ok()?,
            ))
        });
        let records = timeline::window(&mut client, since, None)
            .await
            .map_err(Failure::refused)?;
        for record in records {
            if last.is_none_or(|(seq, _)| record.sequence > seq) {
                println!("{}", timeline::to_line(&record));
                last = Some((record.sequence, record.recorded_at));
            }
        }
    }
    Ok(())
}

async fn audit_export(
    addr: &str,
    tls: &grpc::TlsArgs,
    since: Option<&str>,
    until: Option<&str>,
    format: timeline::Format,
) -> Result<(), Failure> {
    let since = since
        .map(timeline::parse_time)
        .transpose()
        .map_err(Failure::usage)?;
    let until = until
        .map(timeline::parse_time)
        .transpose()
        .map_err(Failure::usage)?;
    if let (Some(since), Some(until)) = (since, until)
        && until <= since
    {
        return Err(Failure::usage("--until must be after --since"));
    }
    let mut client = timeline::connect(addr, tls).map_err(Failure::usage)?;
    let records = timeline::window(&mut client, since, until)
        .await
        .map_err(Failure::refused)?;
    if format == timeline::Format::Csv {
        println!("{}", timeline::CSV_HEADER);
    }
    for record in &records {
        match format {
            timeline::Format::Json => println!("{}", timeline::to_json(record)),
            timeline::Format::Csv => println!("{}", timeline::to_csv(record)),
        }
    }
    eprintln!("engramctl: {} records exported", records.len());
    Ok(())
}

async fn doctor(
    access: Result<vault::VaultAccess, String>,
    targets: doctor::Targets,
    repo: PathBuf,
    json: bool,
) -> Result<(), Failure> {
    let access = access.map_err(Failure::usage)?;
    let checks = doctor::run(&access, &targets, &repo)
        .await
        .map_err(Failure::usage)?;
    if json {
        println!("{}", doctor::to_json(&checks));
    } else {
        print!("{}", doctor::table(&checks));
    }
    if checks.iter().any(|c| c.status == doctor::Status::Fail) {
        return Err(Failure::refused("not compliant: see the failed checks"));
    }
    Ok(())
}

/// `--since`: a time, or a duration meaning that long ago.
fn since_arg(text: &str) -> Result<std::time::SystemTime, String> {
    match humantime::parse_duration(text) {
        Ok(ago) => std::time::SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("--since {text} is before the epoch")),
        Err(_) => timeline::parse_time(text),
    }
}

#[allow(clippy::too_many_arguments)]
async fn incident(
    reason: String,
    since: &str,
    until: Option<&str>,
    format: timeline::Format,
    out: Option<PathBuf>,
    revoke: Vec<String>,
    addrs: grpc::ServiceAddrs,
    tls: grpc::TlsArgs,
    access: Result<vault::VaultAccess, String>,
) -> Result<(), Failure> {
    let reason = reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > 200 {
        return Err(Failure::usage("--reason must be 1 to 200 characters"));
    }
    if let Some(bad) = revoke
        .iter()
        .find(|m| !["approle", "kubernetes", "token"].contains(&m.as_str()))
    {
        return Err(Failure::usage(format!(
            "--revoke {bad}: expected approle, kubernetes or token"
        )));
    }
    let since = since_arg(since).map_err(Failure::usage)?;
    let until = until
        .map(timeline::parse_time)
        .transpose()
        .map_err(Failure::usage)?;
    if until.is_some_and(|until| until <= since) {
        return Err(Failure::usage("--until must be after --since"));
    }
    let plan = incident::Plan {
        reason,
        signer: addrs.signer,
        audit: addrs.audit,
        tls,
        since,
        until,
        format,
        out: out.unwrap_or_else(|| incident::default_out(format)),
        revoke,
    };
    let steps = incident::run(&plan, access).await;
    for (step, ok, what) in &steps {
        println!("[{}] {step}: {what}", if *ok { "done" } else { "FAILED" });
    }
    println!("\nStill to do:");
    for item in incident::CHECKLIST {
        println!("- [ ] {item}");
    }
    if steps.iter().any(|(_, ok, _)| !ok) {
        return Err(Failure::refused(
            "a step failed: see above, and do it by hand",
        ));
    }
    Ok(())
}

fn chat(settings: chat::ChatSettings) -> ExitCode {
    // reqwest is built without a default TLS provider (see TOOLS.md).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("engramctl: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(chat::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("engramctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Audit {
            command: AuditCommand::Verify { dir, keys, json },
        } => audit_verify(&dir, keys.as_deref(), json),
        Command::Audit {
            command:
                AuditCommand::Tail {
                    addr,
                    tls,
                    count,
                    follow,
                },
        } => run_async(audit_tail(&addr, &tls, count, follow)),
        Command::Audit {
            command:
                AuditCommand::Export {
                    addr,
                    tls,
                    since,
                    until,
                    format,
                },
        } => run_async(audit_export(
            &addr,
            &tls,
            since.as_deref(),
            until.as_deref(),
            format,
        )),
        Command::Rotate {
            target,
            from,
            generate,
            vault,
        } => rotate_secret(target, from.as_deref(), generate, vault.access()),
        Command::Doctor {
            vault,
            addrs,
            admin,
            tls,
            repo,
            json,
        } => run_async(doctor(
            vault.access(),
            doctor::Targets {
                signer: addrs.signer,
                audit: addrs.audit,
                admin,
                tls,
            },
            repo,
            json,
        )),
        Command::Incident {
            reason,
            since,
            until,
            format,
            out,
            revoke,
            addrs,
            tls,
            vault,
        } => run_async(incident(
            reason,
            &since,
            until.as_deref(),
            format,
            out,
            revoke,
            addrs,
            tls,
            vault.access(),
        )),
        Command::Chat {
            url,
            user,
            chat: chat_id,
            name,
        } => chat(chat::ChatSettings {
            url,
            user_id: user,
            chat_id: chat_id.unwrap_or(user),
            username: name,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_file_is_a_version_to_key_object() {
        let keys = parse_keys(r#"{"1":"a","2":"b"}"#).expect("valid");
        assert_eq!(keys.len(), 2);
        for bad in [
            "[]",
            "not json",
            r#"{"one":"a"}"#,
            r#"{"1":""}"#,
            r#"{"1":5}"#,
        ] {
            let error = parse_keys(bad).expect_err(bad);
            assert!(!error.is_empty());
        }
    }

    #[test]
    fn errors_never_echo_a_key() {
        let error = parse_keys(r#"{"x":"super-secret-key"}"#).expect_err("bad version");
        assert!(!error.contains("super-secret-key"), "{error}");
    }
}
