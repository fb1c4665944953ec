//! Vault as the operator reaches it: the address, the KV mount and a token from a file or the
//! environment (never from the command line), and one HTTP call helper that never echoes
//! what it sends.

use std::path::PathBuf;

use serde_json::Value;
use zeroize::Zeroizing;

/// `--vault-addr`, `--kv-mount`, `--token-file`, `--vault-ca`.
#[derive(clap::Args, Debug, Clone)]
pub struct VaultArgs {
    /// Vault's address.
    #[arg(
        long,
        env = "ENGRAM_VAULT_ADDR",
        default_value = "http://127.0.0.1:8200"
    )]
    pub vault_addr: String,
    /// The KV v2 mount.
    #[arg(long, env = "ENGRAM_VAULT_KV_MOUNT", default_value = "secret")]
    pub kv_mount: String,
    /// A file holding the Vault token (else VAULT_TOKEN, else .engram/vault-token).
    #[arg(long, env = "ENGRAM_VAULT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A private CA that issued Vault's certificate (PEM), trusted besides the system's.
    #[arg(long = "vault-ca", env = "ENGRAM_VAULT_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl VaultArgs {
    /// The access these arguments describe.
    ///
    /// # Errors
    ///
    /// When no token can be found.
    pub fn access(&self) -> Result<VaultAccess, String> {
        let mut access = VaultAccess::from_env(
            self.vault_addr.clone(),
            self.kv_mount.clone(),
            self.token_file.clone(),
        )?;
        access.ca_file.clone_from(&self.ca_file);
        Ok(access)
    }
}

/// Where Vault is and how to log in (the token from a file or the environment, never argv).
#[derive(Debug, Clone)]
pub struct VaultAccess {
    /// `http(s)://host:port`.
    pub addr: String,
    /// The KV v2 mount.
    pub mount: String,
    /// The token.
    pub token: Zeroizing<String>,
    /// An extra CA for Vault's certificate.
    pub ca_file: Option<PathBuf>,
}

impl VaultAccess {
    /// From `--vault-addr`/`ENGRAM_VAULT_ADDR`, and the token from `ENGRAM_VAULT_TOKEN_FILE`,
    /// `VAULT_TOKEN`, or the local stack's `.engram/vault-token`.
    ///
    /// # Errors
    ///
    /// When no token can be found.
    pub fn from_env(
        addr: String,
        mount: String,
        token_file: Option<PathBuf>,
    ) -> Result<Self, String> {
        let token = match token_file {
            Some(file) => Zeroizing::new(
                std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read the Vault token file {}: {e}", file.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => match std::env::var("VAULT_TOKEN") {
                Ok(token) => Zeroizing::new(token.trim().to_owned()),
                Err(_) => Zeroizing::new(
                    std::fs::read_to_string(".engram/vault-token")
                        .map_err(|_| {
                            "no Vault token: set ENGRAM_VAULT_TOKEN_FILE or VAULT_TOKEN (or run from the repo with the local stack up)".to_owned()
                        })?
                        .trim()
                        .to_owned(),
                ),
            },
        };
        if token.is_empty() {
            return Err("the Vault token is empty".to_owned());
        }
        Ok(Self {
            addr: addr.trim_end_matches('/').to_owned(),
            mount,
            token,
            ca_file: None,
        })
    }
}

/// One call to `/v1/<path>`: the JSON body, `Null` for a 404 (and for an empty 204).
///
/// # Errors
///
/// When Vault is unreachable or answers an error (its own error list, never the request).
pub async fn call(
    http: &reqwest::Client,
    access: &VaultAccess,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut request = http
        .request(method, format!("{}/v1/{path}", access.addr))
        .header("X-Vault-Token", access.token.as_str());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("Vault at {} is unreachable: {e}", access.addr))?;
    let status = response.status();
    if status.as_u16() == 404 {
        return Ok(Value::Null);
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        // Vault's error list names the problem; it never echoes the data written.
        return Err(format!(
            "Vault answered {status} for {path}: {}",
            body["errors"]
        ));
    }
    Ok(body)
}

/// An HTTP client for Vault (rustls on ring, a 10 s timeout), trusting the system's CAs and
/// `access`'s own.
///
/// # Errors
///
/// When the client cannot be built or the CA file is unreadable or holds no certificate.
pub fn http_client(access: &VaultAccess) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
    if let Some(path) = &access.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read the Vault CA {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access_with_ca(ca_file: PathBuf) -> VaultAccess {
        VaultAccess {
            addr: "https://127.0.0.1:1".to_owned(),
            mount: "secret".to_owned(),
            token: Zeroizing::new("test-token".to_owned()),
            ca_file: Some(ca_file),
        }
    }

    #[test]
    fn a_bad_vault_ca_is_a_clear_error() {
        let missing = http_client(&access_with_ca(PathBuf::from("/nonexistent/ca.pem")))
            .expect_err("missing file");
        assert!(missing.contains("cannot read the Vault CA"), "{missing}");
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let junk = http_client(&access_with_ca(junk)).expect_err("junk file");
        assert!(junk.contains("holds no PEM certificate"), "{junk}");
    }
}
