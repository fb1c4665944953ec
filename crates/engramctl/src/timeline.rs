//! `engramctl audit tail` and `engramctl audit export`: the audit trail as the running sink
//! serves it (the `Query` RPC), as readable lines, JSON lines or CSV. Export pages through a
//! time window of any size; tail can follow new records.

use std::time::{Duration, SystemTime};

use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{AuditCategory, AuditRecord, QueryRequest};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// The sink's page size (its maximum).
const PAGE: u32 = 1000;

/// How exported records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// A client of the audit sink at `addr` (mutual TLS for `https://`).
///
/// # Errors
///
/// When the address or the operator's certificate is unusable.
pub fn connect(addr: &str, tls: &crate::grpc::TlsArgs) -> Result<AuditSinkClient<Channel>, String> {
    crate::grpc::channel(addr, "audit-sink", tls).map(AuditSinkClient::new)
}

/// Parses `2026-12-03T10:00:00Z` (RFC 3339) or a date `2026-12-03` (its midnight UTC).
///
/// # Errors
///
/// When it is neither.
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    humantime::parse_rfc3339_weak(&full)
        .map_err(|_| format!("{text:?} is not a time such as 2026-12-03T10:00:00Z or 2026-12-03"))
}

fn timestamp(time: Option<&prost_types::Timestamp>) -> String {
    time.and_then(|t| {
        let since_epoch =
            Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
        Some(humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + since_epoch).to_string())
    })
    .unwrap_or_default()
}

fn category(value: i32) -> &'static str {
    match AuditCategory::try_from(value) {
        Ok(AuditCategory::Audit) => "audit",
        Ok(AuditCategory::Security) => "security",
        _ => "unspecified",
    }
}

fn proto_value(value: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &value.kind {
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => details(Some(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(proto_value).collect()),
        Some(Kind::NullValue(_)) | None => Value::Null,
    }
}

fn details(details: Option<&prost_types::Struct>) -> Value {
    Value::Object(
        details
            .map(|s| {
                s.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), proto_value(v)))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// A record as one JSON object.
pub fn to_json(record: &AuditRecord) -> Value {
    let actor = record.actor.clone().unwrap_or_default();
    json!({
        "sequence": record.sequence,
        "recorded_at": timestamp(record.recorded_at.as_ref()),
        "category": category(record.category),
        "action": record.action,
        "service": actor.service,
        "telegram_user_id": actor.telegram_user_id,
        "telegram_chat_id": actor.telegram_chat_id,
        "correlation_id": record.correlation_id,
        "trace_id": record.trace_id,
        "details": details(record.details.as_ref()),
        "key_version": record.key_version,
        "hash": record.hash,
    })
}

/// The CSV header row.
pub const CSV_HEADER: &str = "sequence,recorded_at,category,action,service,telegram_user_id,telegram_chat_id,correlation_id,trace_id,details,key_version,hash";

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// A record as one CSV row (details as a JSON cell).
pub fn to_csv(record: &AuditRecord) -> String {
    let value = to_json(record);
    [
        "sequence",
        "recorded_at",
        "category",
        "action",
        "service",
        "telegram_user_id",
        "telegram_chat_id",
        "correlation_id",
        "trace_id",
        "details",
        "key_version",
        "hash",
    ]
    .iter()
    .map(|field| match &value[*field] {
        Value::String(s) => csv_field(s),
        other => csv_field(&other.to_string()),
    })
    .collect::<Vec<_>>()
    .join(",")
}

/// A record as one readable line.
pub fn to_line(record: &AuditRecord) -> String {
    let actor = record.actor.clone().unwrap_or_default();
    let user = if actor.telegram_user_id == 0 {
        String::new()
    } else {
        format!(
            " user={} chat={}",
            actor.telegram_user_id, actor.telegram_chat_id
        )
    };
    format!(
        "#{} {} {:<8} {:<24} {}{user} {}",
        record.sequence,
        timestamp(record.recorded_at.as_ref()),
        category(record.category),
        record.action,
        actor.service,
        details(record.details.as_ref()),
    )
}

async fn page(
    client: &mut AuditSinkClient<Channel>,
    request: QueryRequest,
) -> Result<Vec<AuditRecord>, String> {
    let mut stream = client
        .query(request)
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => format!("cannot reach the audit sink: {}", s.message()),
            _ => format!("the audit sink refused the query: {}", s.message()),
        })?
        .into_inner();
    let mut records = Vec::new();
    while let Some(record) = stream
        .message()
        .await
        .map_err(|s| format!("the audit query failed: {}", s.message()))?
    {
        records.push(record);
    }
    Ok(records)
}

/// Every record in `[since, until)`, oldest first, paged through `PAGE` at a time.
///
/// # Errors
///
/// When the sink refuses or fails.
pub async fn window(
    client: &mut AuditSinkClient<Channel>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
) -> Result<Vec<AuditRecord>, String> {
    let mut all: Vec<AuditRecord> = Vec::new();
    let mut from = since.map(prost_types::Timestamp::from);
    loop {
        let records = page(
            client,
            QueryRequest {
                since: from,
                until: until.map(prost_types::Timestamp::from),
                limit: PAGE,
                ..QueryRequest::default()
            },
        )
        .await?;
        let full = records.len() == PAGE as usize;
        let last_seen = all.last().map(|r| r.sequence);
        let fresh: Vec<AuditRecord> = records
            .into_iter()
            .filter(|r| last_seen.is_none_or(|seen| r.sequence > seen))
            .collect();
        let Some(last) = fresh.last() else {
            return Ok(all);
        };
        // The next page starts at the last record's time (inclusive: ties are filtered above).
        from = last.recorded_at;
        all.extend(fresh);
        if !full {
            return Ok(all);
        }
    }
}

/// The newest `count` records, oldest first.
///
/// # Errors
///
/// When the sink refuses or fails.
pub async fn newest(
    client: &mut AuditSinkClient<Channel>,
    count: u32,
) -> Result<Vec<AuditRecord>, String> {
    let mut records = page(
        client,
        QueryRequest {
            limit: count.clamp(1, PAGE),
            newest_first: true,
            ..QueryRequest::default()
        },
    )
    .await?;
    records.reverse();
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            sequence: 7,
            recorded_at: Some(prost_types::Timestamp {
                seconds: 1_796_300_000,
                nanos: 0,
            }),
            category: AuditCategory::Security as i32,
            action: "AUTH_DENIED".to_owned(),
            actor: Some(engram_proto::v1::Actor {
                service: "telegram-gateway".to_owned(),
                telegram_user_id: 5,
                telegram_chat_id: 6,
            }),
            details: Some(prost_types::Struct {
                fields: [(
                    "reason".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(
                            "a \"b\", c".to_owned(),
                        )),
                    },
                )]
                .into(),
            }),
            ..AuditRecord::default()
        }
    }

    #[test]
    fn records_render_as_json_csv_and_lines() {
        let value = to_json(&record());
        assert_eq!(value["recorded_at"], "2026-12-03T12:13:20.000Z");
        assert_eq!(value["details"]["reason"], "a \"b\", c");
        let row = to_csv(&record());
        assert!(
            row.starts_with(
                "7,2026-12-03T12:13:20.000Z,security,AUTH_DENIED,telegram-gateway,5,6,,,"
            ),
            "{row}"
        );
        assert!(row.contains(r#""{""reason"":""a \""b\"", c""}""#), "{row}");
        assert_eq!(CSV_HEADER.split(',').count(), 12);
        assert!(row.ends_with(",0,"), "{row}");
        assert!(
            to_line(&record()).contains("AUTH_DENIED")
                && to_line(&record()).contains("user=5 chat=6")
        );
    }

    #[test]
    fn times_are_checked() {
        assert!(parse_time("2026-12-03").is_ok());
        assert!(parse_time("2026-12-03T10:00:00Z").is_ok());
        for bad in ["yesterday", "2026-13-01", "03/12/2026", ""] {
            let error = parse_time(bad).expect_err(bad);
            assert!(error.contains("is not a time"), "{error}");
        }
    }
}
