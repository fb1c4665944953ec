//! `advisor-bench`: what the advisor adds over asking the model server directly. In one run,
//! for a model that answers at once and one that thinks for 200 ms, it measures p50 and p99 of
//! (a) the chat completion straight to the LLM double over HTTP and (b) Advise through the
//! advisor over gRPC, at 1 and 16 clients, and prints the p50 ratio; then the advisor's idle
//! and loaded memory. It prints figures; it asserts nothing. Run it with `make bench-advisor`.

use std::path::PathBuf;

use engram_bench::{closed_loop, rss_kib, spawn_service};
use engram_proto::v1::AdviseRequest;
use engram_proto::v1::llm_advisor_client::LlmAdvisorClient;
use llm_advisor::advice::{MarketContext, build_messages, response_format};

const SECONDS: u64 = 4;
const MODEL: &str = "engram-dev-model";

async fn run() -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in("target")?;
    let dir = scratch.path();
    println!(
        "| model think time | path | clients | requests/s | p50 | p99 | p50 ratio (advisor / direct) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut memory = Vec::new();
    for think_ms in [0u64, 200] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut double = tokio::process::Command::new("taskset")
            .args(["-c", "1"])
            .arg(PathBuf::from("target/release/engram-doubles"))
            .arg("llm")
            .env("ENGRAM_DOUBLE_LLM_ADDR", format!("127.0.0.1:{port}"))
            .env("ENGRAM_DOUBLE_LLM_LATENCY_MS", think_ms.to_string())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while http.get(format!("{base}/v1/models")).send().await.is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the LLM double did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let advisor = spawn_service(
            &PathBuf::from("target/release/llm-advisor"),
            Some(0),
            &[
                ("ENGRAM_SECRET_SOURCE", "env".to_owned()),
                (
                    "ENGRAM_DOTENV_FILE",
                    dir.join("none.env").display().to_string(),
                ),
                ("LMSTUDIO_URL", base.clone()),
                ("ENGRAM_LLM_MODEL", MODEL.to_owned()),
                ("ENGRAM_LLM_REQUESTS_PER_MINUTE", "1000000".to_owned()),
                ("ENGRAM_LLM_MAX_CONCURRENT", "64".to_owned()),
            ],
            &dir.join(format!("advisor-{think_ms}.log")),
        )
        .await?;
        let pid = advisor.child.id().unwrap_or(0);
        let idle = rss_kib(pid);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", advisor.grpc))?
            .connect()
            .await?;
        for clients in [1usize, 16] {
            let body = serde_json::json!({
                "model": MODEL,
                "messages": build_messages("BTCUSDT", "Should I buy?", &MarketContext::default()),
                "response_format": response_format(),
                "temperature": 0.2,
                "max_tokens": 300,
            });
            let url = std::rc::Rc::new(format!("{base}/v1/chat/completions"));
            let (http2, body2) = (http.clone(), body.clone());
            let direct = closed_loop(clients, SECONDS, move |_, _| {
                let (http, url, body) = (http2.clone(), url.clone(), body2.clone());
                async move {
                    http.post(url.as_str())
                        .json(&body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            })
            .await;
            let client = LlmAdvisorClient::new(channel.clone());
            let via = closed_loop(clients, SECONDS, move |_, _| {
                let mut client = client.clone();
                async move {
                    client
                        .advise(AdviseRequest {
                            symbol: "BTCUSDT".to_owned(),
                            question: "Should I buy?".to_owned(),
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                }
            })
            .await;
            let ratio = via.1.as_secs_f64() / direct.1.as_secs_f64().max(1e-9);
            for (path, (rate, p50, p99, failed)) in
                [("direct HTTP", direct), ("through the advisor", via)]
            {
                let shown_ratio = if path == "direct HTTP" {
                    String::new()
                } else {
                    format!("{ratio:.2}")
                };
                println!(
                    "| {think_ms} ms | {path} | {clients} | {rate:.0}{} | {:.2} ms | {:.2} ms | {shown_ratio} |",
                    if failed > 0 {
                        format!(" ({failed} failed)")
                    } else {
                        String::new()
                    },
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3
                );
            }
        }
        memory.push((think_ms, idle, rss_kib(pid)));
        let _ = double.kill().await;
    }
    println!();
    println!("| model think time | advisor RSS idle | advisor RSS after load |");
    println!("|---|---|---|");
    for (think_ms, idle, loaded) in memory {
        println!(
            "| {think_ms} ms | {:.1} MiB | {:.1} MiB |",
            idle as f64 / 1024.0,
            loaded as f64 / 1024.0
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run())
}
