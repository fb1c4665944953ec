//! The `engram.v1.AuditSink` gRPC service: validation at the edge, appends (unary, batch,
//! stream), query, verify and head.

use std::pin::Pin;
use std::sync::Arc;

use engram_audit::format::{CHECKPOINT_FILE, Checkpoint as StoredCheckpoint, list_segments};
use engram_audit::record::{Record, RecordActor};
use engram_audit::verify::{VerifyReport, verify_dir};
use engram_proto::v1::audit_sink_server::AuditSink;
use engram_proto::v1::{
    Actor, AppendBatchRequest, AppendBatchResponse, AppendRequest, AppendResponse, AuditCategory,
    AuditEvent, AuditRecord, Checkpoint, HeadRequest, HeadResponse, QueryRequest, VerifyRequest,
    VerifyResponse,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{json_to_struct, rfc3339_to_timestamp, struct_to_json, timestamp_to_rfc3339};
use crate::keys::KeyRing;
use crate::log::{Ack, AuditLog, LogError, NewEvent};
use crate::metrics::AuditMetrics;

/// Largest accepted event, serialized (details included).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Most events in one batch.
pub const MAX_BATCH: usize = 1000;
/// Most records one query returns (also the default).
pub const MAX_QUERY_LIMIT: u32 = 1000;
/// Most appends of one stream in flight at once (they share syncs).
const STREAM_WINDOW: usize = 256;

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct AuditSinkService {
    log: AuditLog,
    keys: KeyRing,
    metrics: AuditMetrics,
}

impl AuditSinkService {
    /// A service over an open log.
    pub fn new(log: AuditLog, keys: KeyRing, metrics: AuditMetrics) -> Self {
        Self { log, keys, metrics }
    }

    /// Verifies the whole directory with every key version its checkpoints name; a failure
    /// is counted and logged as a security event.
    ///
    /// # Errors
    ///
    /// INTERNAL when the directory cannot be read.
    pub async fn run_verify(&self) -> Result<VerifyReport, Status> {
        let dir = self.log.dir().to_path_buf();
        let versions = checkpoint_key_versions(&dir);
        let keys = Arc::new(self.keys.keys_for(versions).await);
        let report = tokio::task::spawn_blocking(move || {
            verify_dir(&dir, &|version| keys.get(&version).map(|k| k.to_vec()))
        })
        .await
        .map_err(|_| Status::internal("verification did not finish"))?
        .map_err(|error| {
            tracing::error!(error = %error, "cannot read the audit directory");
            Status::internal("cannot read the audit directory")
        })?;
        if !report.ok {
            self.metrics.verify_failures.inc();
            tracing::error!(
                target: "security",
                first_bad_sequence = report.first_bad_seq,
                segment = %report.first_bad_segment,
                reason = %report.reason,
                "AUDIT VERIFY FAILED: the audit trail does not verify"
            );
        }
        Ok(report)
    }

    async fn append_checked(&self, events: Vec<NewEvent>) -> Result<Vec<Ack>, Status> {
        self.log.append(events).await.map_err(|error| match error {
            LogError::NoKey => Status::unavailable("the audit key is not loaded yet"),
            other => Status::unavailable(format!("audit log unavailable: {other}")),
        })
    }
}

/// The category as stored.
fn category_name(category: i32) -> Result<&'static str, Status> {
    match AuditCategory::try_from(category) {
        Ok(AuditCategory::Audit) => Ok("audit"),
        Ok(AuditCategory::Security) => Ok("security"),
        _ => Err(Status::invalid_argument(
            "event.category must be AUDIT or SECURITY",
        )),
    }
}

fn is_action(action: &str) -> bool {
    (1..=64).contains(&action.len())
        && action.starts_with(|c: char| c.is_ascii_uppercase())
        && action
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn is_service_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_printable_id(id: &str, max: usize) -> bool {
    id.len() <= max && id.chars().all(|c| c.is_ascii_graphic())
}

/// Checks one request at the edge and turns it into a log event.
///
/// # Errors
///
/// INVALID_ARGUMENT naming the field.
pub fn validate(request: AppendRequest) -> Result<NewEvent, Status> {
    let AppendRequest {
        event,
        idempotency_key,
    } = request;
    let event: AuditEvent = event.ok_or_else(|| Status::invalid_argument("event is required"))?;
    let event_size_probe = prost::Message::encoded_len(&event);
    let category = category_name(event.category)?;
    if !is_action(&event.action) {
        return Err(Status::invalid_argument(
            "event.action must be 1-64 characters of A-Z, 0-9 and _, starting with a letter",
        ));
    }
    let actor = event
        .actor
        .ok_or_else(|| Status::invalid_argument("event.actor is required"))?;
    if !is_service_name(&actor.service) {
        return Err(Status::invalid_argument(
            "event.actor.service must be 1-64 characters of a-z, 0-9 and -",
        ));
    }
    if !is_printable_id(&event.correlation_id, 128) {
        return Err(Status::invalid_argument(
            "event.correlation_id must be at most 128 printable ASCII characters",
        ));
    }
    let trace_ok = event.trace_id.is_empty()
        || (event.trace_id.len() == 32
            && event
                .trace_id
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    if !trace_ok {
        return Err(Status::invalid_argument(
            "event.trace_id must be empty or 32 lower-case hex characters",
        ));
    }
    if !is_printable_id(&idempotency_key, 128) {
        return Err(Status::invalid_argument(
            "idempotency_key must be at most 128 printable ASCII characters",
        ));
    }
    let details = match &event.details {
        Some(details) => struct_to_json(details)
            .map_err(|reason| Status::invalid_argument(format!("event.details: {reason}")))?,
        None => serde_json::Map::new(),
    };
    let occurred_at = event
        .occurred_at
        .as_ref()
        .map(timestamp_to_rfc3339)
        .transpose()
        .map_err(|reason| Status::invalid_argument(format!("event.occurred_at: {reason}")))?;
    // The event's size as it arrived (protobuf); its JSON form is of the same order.
    let size = event_size_probe + idempotency_key.len();
    if size > MAX_EVENT_BYTES {
        return Err(Status::invalid_argument(format!(
            "event is {size} bytes, over the {MAX_EVENT_BYTES}-byte limit"
        )));
    }
    Ok(NewEvent {
        category: category.to_owned(),
        action: event.action,
        actor: RecordActor {
            service: actor.service,
            telegram_user_id: (actor.telegram_user_id != 0).then_some(actor.telegram_user_id),
            telegram_chat_id: (actor.telegram_chat_id != 0).then_some(actor.telegram_chat_id),
        },
        details,
        correlation_id: event.correlation_id,
        trace_id: event.trace_id,
        occurred_at,
        idempotency_key,
    })
}

/// The caller's certificate identity, when the call came over mutual TLS (`None` on a
/// plain-gRPC dev or test server).
fn caller_identity<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<engram_runtime::tls::PeerInfo>()
        .and_then(|peer| peer.identity.clone())
}

/// A record names the service that did it; over mutual TLS that must be the caller itself,
/// so a service cannot write records in another's name (the authorization table only says
/// who may append at all).
fn check_actor(event: &NewEvent, caller: Option<&str>) -> Result<(), Status> {
    match caller {
        Some(caller) if event.actor.service != caller => Err(Status::permission_denied(format!(
            "actor.service {:?} is not the caller's identity ({caller})",
            event.actor.service
        ))),
        _ => Ok(()),
    }
}

fn ack_response(ack: Ack) -> AppendResponse {
    AppendResponse {
        sequence: ack.seq,
        hash: ack.hash,
        recorded_at: rfc3339_to_timestamp(&ack.ts),
    }
}

fn record_to_proto(record: Record) -> AuditRecord {
    let category = match record.category.as_str() {
        "audit" => AuditCategory::Audit,
        "security" => AuditCategory::Security,
        _ => AuditCategory::Unspecified,
    };
    AuditRecord {
        sequence: record.seq,
        recorded_at: rfc3339_to_timestamp(&record.ts),
        category: category as i32,
        action: record.action,
        actor: Some(Actor {
            service: record.actor.service,
            telegram_user_id: record.actor.telegram_user_id.unwrap_or(0),
            telegram_chat_id: record.actor.telegram_chat_id.unwrap_or(0),
        }),
        details: Some(json_to_struct(&record.details)),
        correlation_id: record.correlation_id,
        trace_id: record.trace_id,
        prev_hash: record.prev_hash,
        hash: record.hash,
        key_version: record.key_version,
    }
}

fn checkpoint_to_proto(checkpoint: StoredCheckpoint) -> Checkpoint {
    Checkpoint {
        sequence: checkpoint.seq,
        head_hash: checkpoint.head_hash,
        created_at: rfc3339_to_timestamp(&checkpoint.ts),
        key_version: checkpoint.key_version,
        signature: checkpoint.signature,
    }
}

/// A query filter, checked.
struct Filter {
    since: Option<String>,
    until: Option<String>,
    action: String,
    category: Option<&'static str>,
    actor_service: String,
    actor_user: i64,
    limit: usize,
    newest_first: bool,
}

impl Filter {
    fn from_request(request: QueryRequest) -> Result<Self, Status> {
        let since = request
            .since
            .as_ref()
            .map(timestamp_to_rfc3339)
            .transpose()
            .map_err(|r| Status::invalid_argument(format!("since: {r}")))?;
        let until = request
            .until
            .as_ref()
            .map(timestamp_to_rfc3339)
            .transpose()
            .map_err(|r| Status::invalid_argument(format!("until: {r}")))?;
        if let (Some(since), Some(until)) = (&since, &until)
            && since >= until
        {
            return Err(Status::invalid_argument("since must be before until"));
        }
        if !request.action.is_empty() && !is_action(&request.action) {
            return Err(Status::invalid_argument(
                "action must be an upper-case action name",
            ));
        }
        let category = match request.category {
            0 => None,
            other => Some(category_name(other)?),
        };
        if request.limit > MAX_QUERY_LIMIT {
            return Err(Status::invalid_argument(format!(
                "limit must be at most {MAX_QUERY_LIMIT}"
            )));
        }
        let limit = if request.limit == 0 {
            MAX_QUERY_LIMIT
        } else {
            request.limit
        };
        Ok(Self {
            since,
            until,
            action: request.action,
            category,
            actor_service: request.actor_service,
            actor_user: request.actor_telegram_user_id,
            limit: limit as usize,
            newest_first: request.newest_first,
        })
    }

    fn matches(&self, record: &Record) -> bool {
        // Stored times are fixed-width RFC 3339 UTC, so text order is time order.
        self.since
            .as_ref()
            .is_none_or(|s| record.ts.as_str() >= s.as_str())
            && self
                .until
                .as_ref()
                .is_none_or(|u| record.ts.as_str() < u.as_str())
            && (self.action.is_empty() || record.action == self.action)
            && self.category.is_none_or(|c| record.category == c)
            && (self.actor_service.is_empty() || record.actor.service == self.actor_service)
            && (self.actor_user == 0 || record.actor.telegram_user_id == Some(self.actor_user))
    }
}

/// Reads matching records (blocking; run on a blocking thread) into `out`.
fn run_query(
    dir: &std::path::Path,
    filter: &Filter,
    out: &mpsc::Sender<Result<AuditRecord, Status>>,
) -> std::io::Result<()> {
    let mut segments = list_segments(dir)?;
    if filter.newest_first {
        segments.reverse();
    }
    let mut sent = 0;
    for (_, path) in segments {
        let text = std::fs::read_to_string(&path)?;
        let lines: Box<dyn Iterator<Item = &str>> = if filter.newest_first {
            Box::new(text.lines().rev())
        } else {
            Box::new(text.lines())
        };
        for line in lines {
            let Ok(record) = serde_json::from_str::<Record>(line) else {
                continue;
            };
            if !filter.matches(&record) {
                continue;
            }
            if out.blocking_send(Ok(record_to_proto(record))).is_err() {
                return Ok(()); // the caller went away
            }
            sent += 1;
            if sent >= filter.limit {
                return Ok(());
            }
        }
    }
    Ok(())
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AuditSink for AuditSinkService {
    #[tracing::instrument(skip_all, fields(rpc = "Append"))]
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let caller = caller_identity(&request);
        let event = validate(request.into_inner())?;
        check_actor(&event, caller.as_deref())?;
        let mut acks = self.append_checked(vec![event]).await?;
        let ack = acks
            .pop()
            .ok_or_else(|| Status::internal("no acknowledgement"))?;
        Ok(Response::new(ack_response(ack)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "AppendBatch", events))]
    async fn append_batch(
        &self,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        let caller = caller_identity(&request);
        let requests = request.into_inner().events;
        tracing::Span::current().record("events", requests.len());
        if requests.is_empty() || requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch holds 1 to {MAX_BATCH} events"
            )));
        }
        let events = requests
            .into_iter()
            .enumerate()
            .map(|(index, request)| {
                let event = validate(request).and_then(|event| {
                    check_actor(&event, caller.as_deref())?;
                    Ok(event)
                });
                event.map_err(|status| {
                    Status::new(
                        status.code(),
                        format!("events[{index}]: {}", status.message()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let acks = self.append_checked(events).await?;
        Ok(Response::new(AppendBatchResponse {
            acks: acks.into_iter().map(ack_response).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "AppendStream"))]
    async fn append_stream(
        &self,
        request: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<ResponseStream<AppendResponse>>, Status> {
        let caller = caller_identity(&request);
        let incoming = request.into_inner();
        let service = self.clone();
        // Up to STREAM_WINDOW appends in flight, acknowledged in order; they share syncs.
        let acks = incoming
            .map(move |message| {
                let service = service.clone();
                let caller = caller.clone();
                async move {
                    let event = validate(message?)?;
                    check_actor(&event, caller.as_deref())?;
                    let mut acks = service.append_checked(vec![event]).await?;
                    acks.pop()
                        .map(ack_response)
                        .ok_or_else(|| Status::internal("no acknowledgement"))
                }
            })
            .buffered(STREAM_WINDOW)
            .scan(false, |failed, result| {
                // After the first error the stream ends: the caller resends from there.
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = result.is_err();
                futures::future::ready(Some(result))
            });
        Ok(Response::new(Box::pin(acks)))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Query"))]
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<ResponseStream<AuditRecord>>, Status> {
        let filter = Filter::from_request(request.into_inner())?;
        let (sender, receiver) = mpsc::channel(64);
        let dir = self.log.dir().to_path_buf();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = run_query(&dir, &filter, &sender) {
                tracing::error!(error = %error, "audit query failed");
                let _ = sender.blocking_send(Err(Status::internal("audit query failed")));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Verify"))]
    async fn verify(
        &self,
        _request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let report = self.run_verify().await?;
        Ok(Response::new(VerifyResponse {
            ok: report.ok,
            records_checked: report.records_checked,
            checkpoints_checked: report.checkpoints_checked,
            first_bad_sequence: report.first_bad_seq,
            first_bad_segment: report.first_bad_segment,
            reason: report.reason,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Head"))]
    async fn head(&self, _request: Request<HeadRequest>) -> Result<Response<HeadResponse>, Status> {
        let head = self.log.head();
        Ok(Response::new(HeadResponse {
            sequence: head.seq,
            head_hash: head.hash,
            last_checkpoint: head.checkpoint.map(checkpoint_to_proto),
            segment_count: head.segments,
        }))
    }
}

/// The key versions the checkpoint file refers to.
fn checkpoint_key_versions(dir: &std::path::Path) -> std::collections::BTreeSet<u64> {
    std::fs::read_to_string(dir.join(CHECKPOINT_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<StoredCheckpoint>(line).ok())
        .map(|c| c.key_version)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_by(service: &str) -> NewEvent {
        validate(AppendRequest {
            event: Some(engram_runtime::audit::event(
                service,
                engram_proto::v1::AuditCategory::Audit,
                "ORDER_PLACED",
                &[],
            )),
            idempotency_key: String::new(),
        })
        .expect("a valid event")
    }

    #[test]
    fn only_the_caller_may_be_the_actor() {
        assert!(check_actor(&event_by("llm-advisor"), Some("llm-advisor")).is_ok());
        let forged = check_actor(&event_by("exchange-signer"), Some("llm-advisor"))
            .expect_err("another service's name");
        assert_eq!(forged.code(), tonic::Code::PermissionDenied);
        assert!(forged.message().contains("llm-advisor"), "{forged:?}");
        // Plain gRPC (dev and tests): there is no identity to compare with.
        assert!(check_actor(&event_by("exchange-signer"), None).is_ok());
    }
}
