//! `audit-bench`: durable appends per second and latency through the real audit sink over
//! gRPC, for 1, 16 and 64 concurrent clients, unary, batched and streamed; and in the same run
//! the references: the seed document's Python `AuditLogger` (with and without an fsync per
//! entry) and a bare loop writing the same bytes with one `fdatasync` per 64 lines.
//!
//! It prints figures; it asserts nothing. Run it with `make bench-audit`, which builds in
//! release mode and pins the sink and this client to separate cores.
//!
//! Usage: `audit-bench [--sink PATH] [--seconds N] [--sink-cpu N]`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use engram_bench::percentile;
use engram_proto::v1::audit_sink_client::AuditSinkClient;
use engram_proto::v1::{Actor, AppendBatchRequest, AppendRequest, AuditCategory, AuditEvent};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Details sized so one record line is about 200 bytes, like the seed's example entries.
fn event(i: u64) -> AppendRequest {
    AppendRequest {
        event: Some(AuditEvent {
            category: AuditCategory::Audit as i32,
            action: "TRADE_EXECUTED".to_owned(),
            actor: Some(Actor {
                service: "exchange-signer".to_owned(),
                ..Actor::default()
            }),
            details: Some(prost_types::Struct {
                fields: [
                    ("pair".to_owned(), engram_runtime::audit::text("BTC/USDT")),
                    (
                        "amount".to_owned(),
                        engram_runtime::audit::text(format!("0.{i:04}")),
                    ),
                ]
                .into_iter()
                .collect(),
            }),
            correlation_id: format!("bench-{i}"),
            trace_id: String::new(),
            occurred_at: None,
        }),
        idempotency_key: String::new(),
    }
}

struct Args {
    sink: PathBuf,
    seconds: u64,
    sink_cpu: Option<u32>,
    /// Drive an already running sink (for profiling it) instead of starting one.
    connect: Option<SocketAddr>,
    /// Run only the scenarios whose name contains this.
    only: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sink: PathBuf::from("target/release/audit-sink"),
        seconds: 3,
        sink_cpu: None,
        connect: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sink" => args.sink = PathBuf::from(value),
            "--seconds" => args.seconds = value.parse().context("--seconds must be a number")?,
            "--sink-cpu" => {
                args.sink_cpu = Some(value.parse().context("--sink-cpu must be a number")?)
            }
            "--connect" => {
                args.connect = Some(value.parse().context("--connect must be host:port")?)
            }
            "--only" => args.only = Some(value),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

async fn start_sink(args: &Args, dir: &Path) -> anyhow::Result<engram_bench::Spawned> {
    engram_bench::spawn_service(
        &args.sink,
        args.sink_cpu,
        &[
            ("ENGRAM_SECRET_SOURCE", "env".to_owned()),
            ("ENGRAM_AUDIT_HMAC_KEY", "bench-only-audit-key".to_owned()),
            (
                "ENGRAM_DOTENV_FILE",
                dir.join("none.env").display().to_string(),
            ),
            ("ENGRAM_AUDIT_DIR", dir.join("audit").display().to_string()),
        ],
        &dir.join("sink.log"),
    )
    .await
}

/// Records per second and latency percentiles of one scenario.
struct Figures {
    records_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

#[derive(Clone, Copy)]
enum Mode {
    Unary,
    Batch(usize),
    Stream,
}

/// Runs `clients` concurrent callers for `seconds`; each call's latency is recorded.
async fn scenario(
    channel: Channel,
    mode: Mode,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let records = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = AuditSinkClient::new(channel.clone());
        let latencies = latencies.clone();
        let records = records.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = c as u64 * 1_000_000_000;
            match mode {
                Mode::Unary => {
                    while Instant::now() < end {
                        let t = Instant::now();
                        client.append(event(i)).await?;
                        mine.push(t.elapsed());
                        records.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        i += 1;
                    }
                }
                Mode::Batch(size) => {
                    while Instant::now() < end {
                        let events = (0..size as u64).map(|k| event(i + k)).collect();
                        let t = Instant::now();
                        client.append_batch(AppendBatchRequest { events }).await?;
                        mine.push(t.elapsed());
                        records.fetch_add(size as u64, std::sync::atomic::Ordering::Relaxed);
                        i += size as u64;
                    }
                }
                Mode::Stream => {
                    // One stream per client; latency is send-to-ack per event.
                    // At most 64 events in flight per stream, so latency is send-to-ack and
                    // not time spent queued behind our own backlog.
                    let window = Arc::new(tokio::sync::Semaphore::new(64));
                    let producer_window = window.clone();
                    let (sender, receiver) = tokio::sync::mpsc::channel::<AppendRequest>(64);
                    let sent_at = Arc::new(Mutex::new(std::collections::VecDeque::new()));
                    let producer_times = sent_at.clone();
                    let producer = tokio::spawn(async move {
                        let mut i = i;
                        while Instant::now() < end {
                            let Ok(permit) = producer_window.acquire().await else {
                                break;
                            };
                            permit.forget();
                            let request = event(i);
                            producer_times.lock().await.push_back(Instant::now());
                            if sender.send(request).await.is_err() {
                                break;
                            }
                            i += 1;
                        }
                    });
                    let mut acks = client
                        .append_stream(tokio_stream_from(receiver))
                        .await?
                        .into_inner();
                    while let Some(_ack) = acks.message().await? {
                        if let Some(t) = sent_at.lock().await.pop_front() {
                            mine.push(t.elapsed());
                        }
                        window.add_permits(1);
                        records.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let _ = producer.await;
                }
            }
            latencies.lock().await.extend(mine);
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = latencies.lock().await.clone();
    all.sort_unstable();
    Ok(Figures {
        records_per_sec: records.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    })
}

fn tokio_stream_from(
    receiver: tokio::sync::mpsc::Receiver<AppendRequest>,
) -> impl futures::Stream<Item = AppendRequest> {
    futures::stream::unfold(receiver, |mut r| async move {
        r.recv().await.map(|item| (item, r))
    })
}

/// The same ~200-byte lines, written with one fdatasync per `per_sync` lines.
fn bare_loop(dir: &Path, lines: usize, per_sync: usize) -> anyhow::Result<f64> {
    let line = format!("{}\n", "x".repeat(199));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("bare.jsonl"))?;
    let started = Instant::now();
    let mut buffer = Vec::with_capacity(per_sync * line.len());
    for n in 0..lines {
        buffer.extend_from_slice(line.as_bytes());
        if (n + 1) % per_sync == 0 {
            file.write_all(&buffer)?;
            file.sync_data()?;
            buffer.clear();
        }
    }
    Ok(lines as f64 / started.elapsed().as_secs_f64())
}

/// The seed document's AuditLogger, verbatim in spirit: open, append a JSON line, close.
fn python_baseline(dir: &Path, entries: usize, fsync: bool) -> anyhow::Result<f64> {
    let script = format!(
        r#"
import json, os, time
from datetime import datetime
class AuditLogger:
    def __init__(self, log_file):
        self.log_file = log_file
    def log(self, action, user, details=None):
        entry = {{'timestamp': datetime.utcnow().isoformat(), 'action': action, 'user': user, 'details': details or {{}}}}
        with open(self.log_file, 'a') as f:
            f.write(json.dumps(entry) + '\n')
            {sync}
audit = AuditLogger({path:?})
n = {entries}
t = time.perf_counter()
for i in range(n):
    audit.log('TRADE_EXECUTED', 'bot', {{'pair': 'BTC/USDT', 'amount': 0.01}})
print(n / (time.perf_counter() - t))
"#,
        sync = if fsync {
            "f.flush(); os.fsync(f.fileno())"
        } else {
            "pass"
        },
        path = dir
            .join(if fsync { "py-fsync.log" } else { "py.log" })
            .display()
            .to_string(),
        entries = entries,
    );
    let output = std::process::Command::new("python3")
        .args(["-W", "ignore", "-c", &script])
        .output()?;
    if !output.status.success() {
        bail!(
            "python3 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // One worker thread for the client, as TOOLS.md advises on these 2-core machines.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let scratch = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in("target")?;
    runtime.block_on(async {
        let mut sink = match args.connect {
            Some(_) => None,
            None => Some(start_sink(&args, scratch.path()).await?),
        };
        let addr = match (&sink, args.connect) {
            (Some(sink), _) => sink.grpc,
            (None, Some(addr)) => addr,
            (None, None) => bail!("no sink"),
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        println!("| scenario | clients | durable records/s | p50 | p99 |");
        println!("|---|---|---|---|---|");
        for (name, mode) in [
            ("unary Append", Mode::Unary),
            ("AppendBatch ×64", Mode::Batch(64)),
            ("AppendStream", Mode::Stream),
        ] {
            if args
                .only
                .as_ref()
                .is_some_and(|only| !name.contains(only.as_str()))
            {
                continue;
            }
            for clients in [1, 16, 64] {
                let f = scenario(channel.clone(), mode, clients, args.seconds).await?;
                println!(
                    "| {name} | {clients} | {:.0} | {:.2} ms | {:.2} ms |",
                    f.records_per_sec,
                    f.p50.as_secs_f64() * 1e3,
                    f.p99.as_secs_f64() * 1e3
                );
            }
        }
        if let Some(sink) = &mut sink {
            let _ = sink.child.kill().await;
        }
        anyhow::Ok(())
    })?;
    if args.connect.is_some() {
        return Ok(());
    }
    println!();
    println!("| reference (same machine, same run, same filesystem) | lines/s |");
    println!("|---|---|");
    println!(
        "| bare loop, 200-byte lines, one fdatasync per 64 lines | {:.0} |",
        bare_loop(scratch.path(), 200_000, 64)?
    );
    println!(
        "| bare loop, one fdatasync per line | {:.0} |",
        bare_loop(scratch.path(), 5_000, 1)?
    );
    println!(
        "| seed AuditLogger (Python, open/append/close, no fsync) | {:.0} |",
        python_baseline(scratch.path(), 100_000, false)?
    );
    println!(
        "| seed AuditLogger + fsync per entry | {:.0} |",
        python_baseline(scratch.path(), 5_000, true)?
    );
    Ok(())
}
