//! How engramctl reaches the services: over mutual TLS as `spiffe://engram/engramctl` (the
//! operator's identity in the authorization table) when the address is `https://`, plain
//! gRPC when it is `http://` (a stack run with `ENGRAM_TLS_MODE=off`).

use std::path::PathBuf;
use std::time::Duration;

use engram_runtime::tls::{Material, MutualTls, Transport};
use tonic::transport::{Channel, Endpoint};

pub use engram_runtime::authz::OPERATOR;

/// The signer's and the audit sink's gRPC URLs (the local stack's by default).
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceAddrs {
    /// The signer's gRPC URL.
    #[arg(
        long = "signer-addr",
        env = "ENGRAM_SIGNER_ADDR",
        default_value = "https://127.0.0.1:50052"
    )]
    pub signer: String,
    /// The audit sink's gRPC URL.
    #[arg(
        long = "audit-addr",
        env = "ENGRAM_AUDIT_ADDR",
        default_value = "https://127.0.0.1:50054"
    )]
    pub audit: String,
}

/// The operator's certificate files (`make up` writes them to `.engram/pki/`).
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// The operator's certificate (PEM, issued for spiffe://engram/engramctl).
    #[arg(
        long = "tls-cert",
        env = "ENGRAM_TLS_CERT_FILE",
        default_value = ".engram/pki/engramctl.crt"
    )]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(
        long = "tls-key",
        env = "ENGRAM_TLS_KEY_FILE",
        default_value = ".engram/pki/engramctl.key"
    )]
    pub key: PathBuf,
    /// The CA that issued the services' certificates (PEM).
    #[arg(
        long = "tls-ca",
        env = "ENGRAM_TLS_CA_FILE",
        default_value = ".engram/pki/ca.crt"
    )]
    pub ca: PathBuf,
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// A channel to `peer` (a service name) at `addr`, connected lazily.
///
/// # Errors
///
/// When the address is unusable or, for `https://`, the certificate files are missing or
/// not the operator's identity.
pub fn channel(addr: &str, peer: &str, tls: &TlsArgs) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let transport = if addr.starts_with("https://") {
        let material = Material::from_pem(
            &read(&tls.cert, "certificate")?,
            &read(&tls.key, "private key")?,
            &read(&tls.ca, "CA certificate")?,
            OPERATOR,
        )
        .map_err(|e| format!("the operator's certificate cannot be used: {e}"))?;
        Transport::Mutual(MutualTls::fixed(&material).map_err(|e| e.to_string())?)
    } else {
        Transport::Plain
    };
    Ok(transport.channel(endpoint, peer))
}
