//! The dashboards and the alert rules against a real Prometheus: it scrapes the running
//! stack (every second) while a short workload touches every metric a panel reads: trades,
//! advice, an outsider, a rate-limited user, a policy rejection, a rotation, a refused caller
//! and a refused handshake. Every panel's query must parse and return data, every dashboard
//! must be well-formed Grafana JSON, and the rule file must load with EngramRpcDenied firing
//! for the refused caller.

use std::path::PathBuf;
use std::time::Duration;

use engram_e2e::{ADMIN, Options, Stack, TRADER};
use engram_proto::v1::GetStatusRequest;
use engram_proto::v1::exchange_signer_client::ExchangeSignerClient;
use engram_testkit::{poll_until, repo_root};
use serde_json::{Value, json};

/// A Prometheus server of the machine's (`make setup` installs Debian's `prometheus`).
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(stack: &Stack) -> Prometheus {
        let binary = which("prometheus").expect("prometheus is not installed: run `make setup`");
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = repo_root().join("deploy/prometheus/engram-rules.yaml");
        let targets: Vec<Value> = [
            ("telegram-gateway", stack.gateway.admin_addr),
            ("exchange-signer", stack.signer.admin_addr),
            ("llm-advisor", stack.advisor.admin_addr),
            ("audit-sink", stack.audit.admin_addr),
        ]
        .iter()
        .map(|(service, addr)| {
            json!({ "targets": [addr.to_string()], "labels": { "service": service, "namespace": "trading" } })
        })
        .collect();
        // JSON is YAML: the config as the chart's ServiceMonitor would make it (job="engram").
        let config = json!({
            "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
            "rule_files": [rules.display().to_string()],
            "scrape_configs": [{ "job_name": "engram", "static_configs": targets }],
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.to_string()).expect("config");
        let port = engram_testkit::free_port_pair();
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        poll_until(
            "Prometheus scraping all four services",
            Duration::from_secs(30),
            || async {
                let up = prometheus.query("sum(up{job=\"engram\"})").await.ok()?;
                (up.first()?["value"][1].as_str()? == "4").then_some(())
            },
        )
        .await
        .expect("targets up");
        prometheus
    }

    /// An instant query's result vector; Err carries Prometheus's own error (a bad query).
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits (30 s at most) until `expr` returns at least one series.
    async fn wait_for(&self, what: &str, expr: &str) {
        poll_until(what, Duration::from_secs(30), || async {
            let found = self.query(expr).await.ok()?;
            (!found.is_empty()).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

/// Grafana's own variables, as Grafana would expand them over a short range.
fn expand(expr: &str) -> String {
    // Windows wide enough to hold the whole test run: a panel checked last still sees it.
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "10m")
        .replace("$__interval", "5s")
        .replace("$namespace", ".*")
}

/// Whether a result holds at least one number (NaN is no data for a person reading the panel).
fn has_number(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| !v.is_nan())
    })
}

/// The structure Grafana needs to import a dashboard and draw each panel from the chosen
/// Prometheus. Returns every (panel title, query) pair.
fn check_dashboard(name: &str, dashboard: &Value) -> Vec<(String, String)> {
    for field in ["uid", "title", "schemaVersion", "panels", "templating"] {
        assert!(!dashboard[field].is_null(), "{name}: no {field}");
    }
    assert!(dashboard["schemaVersion"].as_u64() >= Some(30), "{name}");
    let variables = dashboard["templating"]["list"].as_array().expect("list");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "{name}: no Prometheus datasource variable"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{name}: only {} panels", panels.len());
    let mut ids = std::collections::HashSet::new();
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("title").to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "{name}: duplicate id"
        );
        assert!(
            ["timeseries", "stat", "gauge", "table", "bargauge"]
                .contains(&panel["type"].as_str().unwrap_or_default()),
            "{name}/{title}: panel type"
        );
        let grid = &panel["gridPos"];
        for field in ["x", "y", "w", "h"] {
            assert!(grid[field].is_u64(), "{name}/{title}: gridPos.{field}");
        }
        assert!(grid["x"].as_u64().unwrap_or(99) + grid["w"].as_u64().unwrap_or(99) <= 24);
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{name}/{title}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{name}/{title}: no query");
        for target in targets {
            assert!(target["refId"].is_string(), "{name}/{title}: refId");
            let expr = target["expr"].as_str().expect("expr");
            queries.push((format!("{name}/{title}"), expr.to_owned()));
        }
    }
    queries
}

/// Orders and advice: what feeds the histograms and rates.
async fn trading(stack: &Stack) {
    for command in ["/buy BTCUSDT 0.001", "/sell BTCUSDT 0.001"] {
        let outcome = stack.trade(TRADER, command).await.expect("trade");
        assert!(outcome.contains("FILLED"), "{outcome}");
    }
    stack.say(TRADER, "/advice BTCUSDT").await.expect("advice");
}

/// Everything else a panel reads, once.
async fn incidents(stack: &Stack) {
    // Over the order notional cap: the policy refuses it (the panel shows by which rule).
    let refused = stack.trade(TRADER, "/buy BTCUSDT 50").await;
    assert!(!refused.unwrap_or_default().contains("FILLED"));
    stack
        .say(engram_e2e::OUTSIDER, "/help")
        .await
        .expect("outsider");
    // Limits are 16 commands a user for this test: 4 of these are refused.
    for _ in 0..20 {
        stack.telegram.send_from(ADMIN, ADMIN, "/whoami");
    }
    // A rotation the advisor takes up.
    stack
        .bao
        .put_secret(
            "engram/llm",
            json!({ "provider": "double", "note": "rotated" }),
        )
        .await
        .expect("rotate");
    // A caller outside the table, and one without a certificate.
    let intruder = stack.transport_as("intruder").await.expect("intruder");
    let denied = ExchangeSignerClient::new(stack.channel(&intruder, "exchange-signer"))
        .get_status(GetStatusRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let plain = engram_runtime::tls::Transport::Plain;
    let _ = ExchangeSignerClient::new(stack.channel(&plain, "exchange-signer"))
        .get_status(GetStatusRequest::default())
        .await
        .expect_err("no certificate");
}

/// The workload in two rounds with a scrape between them: a series is born with its first
/// event, so a rate needs a second event in a later scrape (the debug stack answers a whole
/// round within one scrape interval).
async fn workload(stack: &Stack, prometheus: &Prometheus) {
    trading(stack).await;
    incidents(stack).await;
    prometheus
        .wait_for(
            "a scrape after the first round",
            "engram_llm_latency_seconds_count > 0",
        )
        .await;
    trading(stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_returns_data_and_the_rules_fire_on_a_real_prometheus() {
    let stack = Stack::start(Options {
        signer: vec![("ENGRAM_POLICY_MAX_ORDER_NOTIONAL", "1000".to_owned())],
        gateway: vec![("ENGRAM_GATEWAY_USER_COMMANDS", "16".to_owned())],
        ..Options::default()
    })
    .await
    .expect("stack");
    let prometheus = Prometheus::start(&stack).await;
    workload(&stack, &prometheus).await;

    let mut queries = Vec::new();
    let folder = repo_root().join("deploy/grafana");
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .expect("deploy/grafana")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "overview, security, trading");
    let mut uids = std::collections::HashSet::new();
    for path in &files {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON");
        assert!(
            uids.insert(dashboard["uid"].to_string()),
            "{name}: uid reused"
        );
        queries.extend(check_dashboard(&name, &dashboard));
    }

    // A panel may need a scrape or two after the workload: poll each, with one deadline.
    for (panel, expr) in &queries {
        let expr = expand(expr);
        let result = poll_until(
            &format!("{panel}: data for {expr}"),
            Duration::from_secs(30),
            || async {
                match prometheus.query(&expr).await {
                    Err(error) => Some(Err(error)),
                    Ok(result) if has_number(&result) => Some(Ok(())),
                    Ok(_) => None,
                }
            },
        )
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("{panel}: {expr} does not parse: {error}"),
            Err(timeout) => panic!(
                "{timeout}: Prometheus answers {:?}",
                prometheus.query(&expr).await
            ),
        }
    }

    // The rules loaded, and the refused caller raised the alert that pages for it.
    let groups: Value = prometheus
        .http
        .get(format!("{}/api/v1/rules", prometheus.url))
        .send()
        .await
        .expect("rules")
        .json()
        .await
        .expect("json");
    let rules: Vec<Value> = groups["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(rules.len(), 14, "{groups:#}");
    assert!(rules.iter().all(|r| r["health"] == "ok"), "{groups:#}");
    prometheus
        .wait_for(
            "EngramRpcDenied firing",
            "ALERTS{alertname=\"EngramRpcDenied\",alertstate=\"firing\",caller=\"intruder\"}",
        )
        .await;
    // And nothing pages for a healthy stack that merely saw one intruder.
    let firing = prometheus
        .query("ALERTS{alertstate=\"firing\",severity=\"critical\",alertname!=\"EngramRpcDenied\"}")
        .await
        .expect("alerts");
    assert!(firing.is_empty(), "{firing:#?}");

    prometheus.stop().await;
    stack.stop().await;
}
