//! The append-only log on disk: JSON-lines segments, group commit with `fdatasync`, rotation,
//! crash recovery of a torn tail, and signed checkpoints.
//!
//! One writer thread owns the files. Callers send batches over a bounded channel and wait for
//! the acknowledgement, which comes only after the bytes are synced. Every batch waiting when
//! the writer comes round is written with one `write` and one `fdatasync`: concurrent
//! appends share a sync (group commit).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::collections::{HashMap, VecDeque};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use engram_audit::format::{CHECKPOINT_FILE, Checkpoint, list_segments, now_rfc3339, segment_path};
use engram_audit::record::{GENESIS_HASH, Record, RecordActor};
use engram_audit::redact::redact_sensitive;

/// Most events written by one sync.
const MAX_GROUP: usize = 8192;
/// Idempotency keys remembered (oldest forgotten first). At start the newest segment's keys
/// are loaded again, so a retry across a restart is still recognised.
const MAX_REMEMBERED_KEYS: usize = 100_000;

/// Where and how the log is kept.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// The directory holding segments and checkpoints.
    pub dir: PathBuf,
    /// A segment is closed once it would grow past this size.
    pub segment_max_bytes: u64,
    /// A checkpoint after this many records…
    pub checkpoint_every: u64,
    /// …or this long after the last one, when records were added since.
    pub checkpoint_interval: Duration,
    /// Detail fields stored only as their HMAC under the audit key.
    pub sensitive_fields: Vec<String>,
}

/// An event ready to be recorded (validated). Sensitive fields are HMAC'd by the writer with
/// the same key version it stamps on the record, so the two always agree.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// `audit` or `security`.
    pub category: String,
    /// Upper snake case action.
    pub action: String,
    /// Who caused it.
    pub actor: RecordActor,
    /// A JSON object.
    pub details: Map<String, Value>,
    /// Correlation id.
    pub correlation_id: String,
    /// W3C trace id.
    pub trace_id: String,
    /// The caller's time, RFC 3339.
    pub occurred_at: Option<String>,
    /// The caller's idempotency key (empty: none).
    pub idempotency_key: String,
}

/// A durable acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The record's sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// Its recorded time, RFC 3339.
    pub ts: String,
}

/// The audit key in use: its version and bytes. Provided by the service from Vault.
pub type KeyProvider = Arc<dyn Fn() -> Option<(u64, Zeroizing<Vec<u8>>)> + Send + Sync>;

/// What can go wrong appending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// Writing or syncing failed (disk full, I/O error); nothing of the batch was kept.
    #[error("audit log write failed: {0}")]
    Write(String),
    /// An earlier failure could not be rolled back; the log refuses writes until restart.
    #[error("audit log is unavailable after an unrecoverable write failure: {0}")]
    Broken(String),
    /// No audit key is loaded yet.
    #[error("no audit key loaded")]
    NoKey,
    /// The writer has stopped.
    #[error("audit log is shut down")]
    Closed,
}

/// Head of the chain, shared with readers.
#[derive(Debug, Clone, Default)]
pub struct HeadState {
    /// Last sequence number written (0 when empty).
    pub seq: u64,
    /// Its hash (GENESIS_HASH when empty).
    pub hash: String,
    /// The last checkpoint.
    pub checkpoint: Option<Checkpoint>,
    /// Number of segment files.
    pub segments: u32,
}

/// What recovery found at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the end of the last segment (a torn, never acknowledged write).
    pub segment_bytes_cut: u64,
    /// Bytes cut from the end of the checkpoint file.
    pub checkpoint_bytes_cut: u64,
}

/// Where the writer answers one append request.
type Reply = oneshot::Sender<Result<Vec<Ack>, LogError>>;

enum Job {
    Append { events: Vec<NewEvent>, reply: Reply },
    Tick,
    Close(oneshot::Sender<()>),
}

/// Observations for metrics, reported by the writer after each sync.
pub trait LogObserver: Send + Sync {
    /// A group was synced: `events` records, `bytes` bytes, the sync took `sync`.
    fn synced(&self, events: &[(String, String)], bytes: u64, sync: Duration);
    /// A write or sync failed.
    fn failed(&self, error: &LogError);
    /// The head moved or a segment was added.
    fn head(&self, head: &HeadState);
}

/// Handle to the log: append, and read the head.
#[derive(Clone)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
    head: Arc<Mutex<HeadState>>,
    dir: PathBuf,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating if needed) the log in `settings.dir`, recovers a torn tail, and
    /// starts the writer thread and the checkpoint ticker.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created or read.
    pub fn open(
        settings: LogSettings,
        key: KeyProvider,
        observer: Arc<dyn LogObserver>,
    ) -> std::io::Result<(Self, Recovery)> {
        fs::create_dir_all(&settings.dir)?;
        let (writer, recovery) = Writer::open(settings.clone(), key, observer)?;
        let head = writer.head.clone();
        let (jobs, receiver) = mpsc::channel(1024);
        std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || writer.run(receiver))?;
        let ticker = jobs.clone();
        let interval = settings.checkpoint_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if ticker.send(Job::Tick).await.is_err() {
                    return;
                }
            }
        });
        Ok((
            Self {
                jobs,
                head,
                dir: settings.dir,
            },
            recovery,
        ))
    }

    /// Appends events in order as one atomic group; returns once they are on disk.
    ///
    /// # Errors
    ///
    /// [`LogError`] when nothing was recorded.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Ack>, LogError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Append { events, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    /// Writes a final checkpoint and stops the writer; later appends fail with `Closed`.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.jobs.send(Job::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The current head.
    pub fn head(&self) -> HeadState {
        self.head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

struct Writer {
    settings: LogSettings,
    /// Path of the open segment, to notice when it is removed or replaced under us.
    path: PathBuf,
    key: KeyProvider,
    observer: Arc<dyn LogObserver>,
    head: Arc<Mutex<HeadState>>,
    file: File,
    file_len: u64,
    next_seq: u64,
    prev_hash: String,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    broken: Option<String>,
    seen_keys: HashMap<String, Ack>,
    seen_order: VecDeque<String>,
}

/// Cuts everything after the last complete, valid line of `path` for which `valid` holds.
/// Returns the bytes cut.
fn cut_torn_tail(
    path: &Path,
    valid: impl Fn(&str) -> bool,
) -> std::io::Result<(u64, Option<String>)> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut keep = bytes.len();
    let mut last_line = None;
    // Walk back over lines: a missing final newline or an invalid last line is a torn write.
    loop {
        let end = if keep > 0 && bytes[keep - 1] == b'\n' {
            keep - 1
        } else {
            // No newline at the end: drop back to the previous newline.
            match bytes[..keep].iter().rposition(|b| *b == b'\n') {
                Some(pos) => {
                    keep = pos + 1;
                    continue;
                }
                None => {
                    keep = 0;
                    break;
                }
            }
        };
        let start = bytes[..end]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        match std::str::from_utf8(&bytes[start..end]) {
            Ok(line) if valid(line) => {
                last_line = Some(line.to_owned());
                break;
            }
            _ => {
                keep = start;
                if keep == 0 {
                    break;
                }
            }
        }
    }
    let cut = (bytes.len() - keep) as u64;
    if cut > 0 {
        file.set_len(keep as u64)?;
        file.sync_all()?;
    }
    Ok((cut, last_line))
}

fn record_is_whole(line: &str) -> bool {
    serde_json::from_str::<Record>(line).is_ok_and(|r| r.compute_hash() == r.hash)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Writer {
    fn open(
        settings: LogSettings,
        key: KeyProvider,
        observer: Arc<dyn LogObserver>,
    ) -> std::io::Result<(Self, Recovery)> {
        let dir = settings.dir.clone();
        let mut recovery = Recovery::default();
        let mut segments = list_segments(&dir)?;
        if segments.is_empty() {
            let path = segment_path(&dir, 1);
            File::create(&path)?.sync_all()?;
            sync_dir(&dir)?;
            segments.push((1, path));
        }
        // The head is the last whole record of the newest segment that has one.
        let mut head_record: Option<Record> = None;
        for (index, (_, path)) in segments.iter().enumerate().rev() {
            let (cut, last) = if index == segments.len() - 1 {
                cut_torn_tail(path, record_is_whole)?
            } else {
                (0, last_line(path)?)
            };
            recovery.segment_bytes_cut += cut;
            if let Some(line) = last {
                head_record = serde_json::from_str(&line).ok();
                break;
            }
        }
        let checkpoint_path = dir.join(CHECKPOINT_FILE);
        let mut checkpoint = None;
        if checkpoint_path.exists() {
            let (cut, last) = cut_torn_tail(&checkpoint_path, |line| {
                serde_json::from_str::<Checkpoint>(line).is_ok()
            })?;
            recovery.checkpoint_bytes_cut = cut;
            checkpoint = last.and_then(|line| serde_json::from_str(&line).ok());
        }

        let (_, current_path) = segments
            .last()
            .cloned()
            .unwrap_or_else(|| (1, segment_path(&dir, 1)));
        let file = OpenOptions::new().append(true).open(&current_path)?;
        let file_len = file.metadata()?.len();
        let (next_seq, prev_hash) = head_record
            .as_ref()
            .map_or((1, GENESIS_HASH.to_owned()), |r| {
                (r.seq + 1, r.hash.clone())
            });
        let mut seen_keys = HashMap::new();
        let mut seen_order = VecDeque::new();
        for line in std::io::BufReader::new(File::open(&current_path)?).lines() {
            if let Ok(record) = serde_json::from_str::<Record>(&line?)
                && !record.idempotency_key.is_empty()
            {
                seen_order.push_back(record.idempotency_key.clone());
                seen_keys.insert(
                    record.idempotency_key,
                    Ack {
                        seq: record.seq,
                        hash: record.hash,
                        ts: record.ts,
                    },
                );
            }
        }
        let head = HeadState {
            seq: next_seq - 1,
            hash: prev_hash.clone(),
            checkpoint,
            segments: u32::try_from(segments.len()).unwrap_or(u32::MAX),
        };
        observer.head(&head);
        Ok((
            Self {
                settings,
                path: current_path,
                key,
                observer,
                head: Arc::new(Mutex::new(head)),
                file,
                file_len,
                next_seq,
                prev_hash,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                broken: None,
                seen_keys,
                seen_order,
            },
            recovery,
        ))
    }

    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut closed = None;
        while let Some(job) = jobs.blocking_recv() {
            let mut group = Vec::new();
            let mut tick = false;
            let mut pending = Some(job);
            let mut count = 0;
            while let Some(job) = pending.take() {
                match job {
                    Job::Append { events, reply } => {
                        count += events.len();
                        group.push((events, reply));
                    }
                    Job::Tick => tick = true,
                    Job::Close(done) => closed = Some(done),
                }
                if count < MAX_GROUP && closed.is_none() {
                    pending = jobs.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.write_group(group);
            }
            let due = self.since_checkpoint >= self.settings.checkpoint_every
                || (tick
                    && self.since_checkpoint > 0
                    && self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval);
            if due {
                self.checkpoint();
            }
            if closed.is_some() {
                break;
            }
        }
        // Closing, or every handle dropped: leave a final checkpoint behind.
        if self.since_checkpoint > 0 {
            self.checkpoint();
        }
        jobs.close();
        while let Ok(job) = jobs.try_recv() {
            if let Job::Append { reply, .. } = job {
                let _ = reply.send(Err(LogError::Closed));
            }
        }
        if let Some(done) = closed {
            let _ = done.send(());
        }
    }

    fn write_group(&mut self, group: Vec<(Vec<NewEvent>, Reply)>) {
        if let Some(reason) = &self.broken {
            let error = LogError::Broken(reason.clone());
            for (_, reply) in group {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        let Some((key_version, key)) = (self.key)() else {
            for (_, reply) in group {
                let _ = reply.send(Err(LogError::NoKey));
            }
            return;
        };
        if let Err(reason) = self.check_segment_in_place() {
            // Writing on would land in an unlinked file: refuse until an operator restarts us.
            self.broken = Some(reason.clone());
            let error = LogError::Broken(reason);
            self.observer.failed(&error);
            for (_, reply) in group {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        let total: usize = group.iter().map(|(events, _)| events.len()).sum();
        if self.file_len > 0 && self.file_len >= self.settings.segment_max_bytes {
            if let Err(error) = self.rotate() {
                let error = LogError::Write(format!("cannot open a new segment: {error}"));
                self.observer.failed(&error);
                for (_, reply) in group {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
        }
        let ts = now_rfc3339();
        let mut bytes = Vec::with_capacity(total * 256);
        let mut acks_per_job = Vec::with_capacity(group.len());
        let mut labels = Vec::with_capacity(total);
        let mut new_keys: HashMap<String, Ack> = HashMap::new();
        let (mut seq, mut prev) = (self.next_seq, self.prev_hash.clone());
        let mut replies = Vec::with_capacity(group.len());
        for (events, reply) in group {
            replies.push(reply);
            let mut acks = Vec::with_capacity(events.len());
            for event in events {
                if !event.idempotency_key.is_empty()
                    && let Some(first) = self
                        .seen_keys
                        .get(&event.idempotency_key)
                        .or_else(|| new_keys.get(&event.idempotency_key))
                {
                    // A retry: answer with the first record, write nothing.
                    acks.push(first.clone());
                    continue;
                }
                let mut details = event.details;
                redact_sensitive(&mut details, &key, &self.settings.sensitive_fields);
                let idempotency_key = event.idempotency_key;
                let record = Record {
                    seq,
                    ts: ts.clone(),
                    category: event.category,
                    action: event.action,
                    actor: event.actor,
                    details,
                    correlation_id: event.correlation_id,
                    trace_id: event.trace_id,
                    occurred_at: event.occurred_at,
                    idempotency_key: idempotency_key.clone(),
                    key_version,
                    prev_hash: prev,
                    hash: String::new(),
                }
                .seal();
                record.write_line(&mut bytes);
                labels.push((record.category.clone(), record.action.clone()));
                let ack = Ack {
                    seq,
                    hash: record.hash.clone(),
                    ts: ts.clone(),
                };
                if !idempotency_key.is_empty() {
                    new_keys.insert(idempotency_key, ack.clone());
                }
                acks.push(ack);
                prev = record.hash;
                seq += 1;
            }
            acks_per_job.push(acks);
        }

        if bytes.is_empty() {
            // Every event was a retry: nothing to write.
            for (reply, acks) in replies.into_iter().zip(acks_per_job) {
                let _ = reply.send(Ok(acks));
            }
            return;
        }
        let started = Instant::now();
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.file_len += bytes.len() as u64;
                self.next_seq = seq;
                self.prev_hash = prev;
                self.since_checkpoint += labels.len() as u64;
                self.remember(new_keys);
                self.observer
                    .synced(&labels, bytes.len() as u64, started.elapsed());
                let head = {
                    let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
                    head.seq = seq - 1;
                    head.hash = self.prev_hash.clone();
                    head.clone()
                };
                self.observer.head(&head);
                for (reply, acks) in replies.into_iter().zip(acks_per_job) {
                    let _ = reply.send(Ok(acks));
                }
            }
            Err(error) => {
                // Leave no half record: cut back to where the group started.
                let rolled_back = self
                    .file
                    .set_len(self.file_len)
                    .and_then(|()| self.file.sync_data());
                let error = match rolled_back {
                    Ok(()) => LogError::Write(error.to_string()),
                    Err(rollback) => {
                        let reason = format!("{error}; rollback failed: {rollback}");
                        self.broken = Some(reason.clone());
                        LogError::Broken(reason)
                    }
                };
                self.observer.failed(&error);
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// The open file must still be the one at its path (not deleted, not replaced).
    fn check_segment_in_place(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let open = self
            .file
            .metadata()
            .map_err(|e| format!("cannot stat the open segment: {e}"))?;
        let on_disk = fs::metadata(&self.path)
            .map_err(|e| format!("segment {} is gone: {e}", self.path.display()))?;
        if (open.dev(), open.ino()) != (on_disk.dev(), on_disk.ino()) {
            return Err(format!("segment {} was replaced", self.path.display()));
        }
        Ok(())
    }

    fn remember(&mut self, keys: HashMap<String, Ack>) {
        for (key, ack) in keys {
            self.seen_order.push_back(key.clone());
            self.seen_keys.insert(key, ack);
        }
        while self.seen_order.len() > MAX_REMEMBERED_KEYS {
            if let Some(oldest) = self.seen_order.pop_front() {
                self.seen_keys.remove(&oldest);
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let path = segment_path(&self.settings.dir, self.next_seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        file.sync_all()?;
        sync_dir(&self.settings.dir)?;
        self.file = file;
        self.path = path;
        self.file_len = 0;
        let head = {
            let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
            head.segments += 1;
            head.clone()
        };
        self.observer.head(&head);
        Ok(())
    }

    fn checkpoint(&mut self) {
        let Some((key_version, key)) = (self.key)() else {
            return;
        };
        let mut checkpoint = Checkpoint {
            seq: self.next_seq - 1,
            head_hash: self.prev_hash.clone(),
            ts: now_rfc3339(),
            key_version,
            signature: String::new(),
        };
        checkpoint.signature = checkpoint.sign(&key);
        let line = format!(
            "{}\n",
            serde_json::to_string(&checkpoint).unwrap_or_default()
        );
        let path = self.settings.dir.join(CHECKPOINT_FILE);
        let result = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| {
                let before = file.seek(SeekFrom::End(0))?;
                let written = file
                    .write_all(line.as_bytes())
                    .and_then(|()| file.sync_data());
                if written.is_err() {
                    let _ = file.set_len(before);
                }
                written
            });
        match result {
            Ok(()) => {
                self.since_checkpoint = 0;
                self.last_checkpoint = Instant::now();
                let head = {
                    let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
                    head.checkpoint = Some(checkpoint);
                    head.clone()
                };
                self.observer.head(&head);
            }
            Err(error) => self
                .observer
                .failed(&LogError::Write(format!("checkpoint: {error}"))),
        }
    }
}

fn last_line(path: &Path) -> std::io::Result<Option<String>> {
    let text = fs::read_to_string(path)?;
    Ok(text.lines().last().map(str::to_owned))
}
