//! Shared pieces of the benchmark binaries: starting a release service pinned to a core and
//! learning its ports, and latency percentiles.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A service started by a benchmark; killed on drop.
#[derive(Debug)]
pub struct Spawned {
    /// The child process.
    pub child: tokio::process::Child,
    /// Its gRPC address, from its "listening" log line.
    pub grpc: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
}

/// Starts `bin` (optionally pinned to `cpu` with taskset) with exactly `env` plus PATH and
/// ports 0, logging to `log`, and waits for its "listening" line.
///
/// # Errors
///
/// When it cannot start or does not listen within 20 s.
pub async fn spawn_service(
    bin: &Path,
    cpu: Option<u32>,
    env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<Spawned> {
    let mut command = match cpu {
        Some(cpu) => {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Plain gRPC unless the caller asks for mutual TLS (ENGRAM_TLS_MODE in `env`).
        .env("ENGRAM_TLS_MODE", "off")
        .env("ENGRAM_GRPC_ADDR", "127.0.0.1:0")
        .env("ENGRAM_ADMIN_ADDR", "127.0.0.1:0")
        .env("ENGRAM_LOG_LEVEL", "warn,engram_runtime::service=info")
        .env("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0")
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let field = |name: &str| -> Option<SocketAddr> {
            text.lines()
                .find(|l| l.contains("\"listening\""))?
                .split(&format!("\"{name}\":\""))
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()
        };
        if let (Some(grpc), Some(admin)) = (field("grpc_addr"), field("admin_addr")) {
            return Ok(Spawned { child, grpc, admin });
        }
        if Instant::now() > deadline {
            bail!("{} did not start:\n{text}", bin.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs `clients` concurrent loops of `call` for `seconds`; returns (calls per second, p50,
/// p99). `call` gets the client index and a running counter and returns whether it succeeded.
pub async fn closed_loop<F, Fut>(
    clients: usize,
    seconds: u64,
    call: F,
) -> (f64, Duration, Duration, u64)
where
    F: Fn(usize, u64) -> Fut + Clone + 'static,
    Fut: Future<Output = bool> + 'static,
{
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let call = call.clone();
        tasks.spawn_local(async move {
            let (mut latencies, mut failures, mut i) = (Vec::new(), 0u64, 0u64);
            while Instant::now() < end {
                let t = Instant::now();
                if call(client, i).await {
                    latencies.push(t.elapsed());
                } else {
                    failures += 1;
                }
                i += 1;
            }
            (latencies, failures)
        });
    }
    let (mut all, mut failures) = (Vec::new(), 0);
    while let Some(Ok((latencies, failed))) = tasks.join_next().await {
        all.extend(latencies);
        failures += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (
        all.len() as f64 / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        failures,
    )
}

/// A release binary of this workspace (benchmarks run from the repo root).
pub fn release(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from("target/release").join(name)
}

/// Resident memory of process `pid`, in KiB (0 when unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        })
        .unwrap_or(0)
}

/// Waits (at most 30 s) until `admin`'s `/readyz` answers 200; the error carries `log`.
///
/// # Errors
///
/// When it is not ready in time.
pub async fn wait_ready(
    http: &reqwest::Client,
    admin: SocketAddr,
    log: &Path,
) -> anyhow::Result<()> {
    let readyz = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(&readyz)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        if Instant::now() > deadline {
            bail!(
                "{} did not become ready:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
