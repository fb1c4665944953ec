//! Certificates and keys for mutual TLS: PEM parsing, a certificate's SPIFFE identity and
//! validity, the rustls server and client configurations, and the verifier that checks a
//! server's SPIFFE identity (its URI SAN) instead of a DNS name.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};

/// The SPIFFE trust domain of every Engram identity.
pub const TRUST_DOMAIN: &str = "engram";

/// `spiffe://engram/<service>`.
pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{service}")
}

/// A service name as it may appear in an identity: lower-case words joined by hyphens.
fn is_service_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The service named by a certificate's one `spiffe://engram/<service>` URI SAN. An SVID
/// carries exactly one URI SAN (the SPIFFE X.509 spec); a certificate with none, several, or
/// one outside the trust domain has no identity here.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut uris = parsed.valid_uri_names();
    let only = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    let name = only.strip_prefix(&format!("spiffe://{TRUST_DOMAIN}/"))?;
    is_service_name(name).then(|| name.to_owned())
}

/// Why certificate material could not be used. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM or DER could not be parsed.
    #[error("{what}: {reason}")]
    Malformed {
        /// Which piece: certificate, private key, CA.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The certificate names another identity than this service's.
    #[error("the certificate's identity is {found}, expected {expected}")]
    WrongIdentity {
        /// What the certificate says (or "none").
        found: String,
        /// `spiffe://engram/<service>`.
        expected: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate authority could not be used to verify peers.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The material could not be obtained.
    #[error("{0}")]
    Unavailable(String),
}

fn malformed(what: &'static str, reason: impl fmt::Display) -> TlsError {
    TlsError::Malformed {
        what,
        reason: reason.to_string(),
    }
}

/// One identity's certificate chain, private key and trust anchors, checked.
pub struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    /// The service this certificate identifies.
    pub service: String,
    /// Start of the validity period.
    pub not_before: SystemTime,
    /// End of the validity period.
    pub not_after: SystemTime,
    /// The serial number, hex.
    pub serial: String,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("service", &self.service)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Material {
    /// Parses a PEM certificate chain (leaf first), a PEM private key (PKCS#8, SEC1 or
    /// PKCS#1) and PEM trust anchors, and checks that the leaf is `service`'s identity.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the piece that is malformed or the identity that does not match.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        roots_pem: &[u8],
        service: &str,
    ) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| malformed("certificate", e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| malformed("certificate", "no CERTIFICATE block"))?;
        // The key's own parse error could quote nothing secret, but say less anyway.
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| malformed("private key", "no usable PRIVATE KEY block"))?;
        let roots = CertificateDer::pem_slice_iter(roots_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| malformed("CA", e))?;
        if roots.is_empty() {
            return Err(malformed("CA", "no CERTIFICATE block"));
        }
        let found = identity_of(leaf);
        if found.as_deref() != Some(service) {
            return Err(TlsError::WrongIdentity {
                found: found.map_or_else(|| "none".to_owned(), |s| spiffe_id(&s)),
                expected: spiffe_id(service),
            });
        }
        let (not_before, not_after) =
            validity(leaf).ok_or_else(|| malformed("certificate", "no readable validity"))?;
        let serial = webpki::EndEntityCert::try_from(leaf)
            .map(|c| hex::encode(c.serial()))
            .map_err(|e| malformed("certificate", format!("{e:?}")))?;
        Ok(Self {
            chain,
            key,
            roots,
            service: service.to_owned(),
            not_before,
            not_after,
            serial,
        })
    }

    /// The moment to renew: two thirds of the way from `start` to expiry. For a certificate
    /// just issued, `start` is now: Vault back-dates `notBefore` (30 s by default, for clock
    /// skew), which would otherwise make a short certificate look two thirds spent at birth.
    pub fn renew_at(&self, start: SystemTime) -> SystemTime {
        let start = start.max(self.not_before);
        let remaining = self
            .not_after
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        start + remaining * 2 / 3
    }

    /// A server configuration that requires a client certificate from the trust anchors
    /// (TLS 1.3, ALPN h2). The caller's identity is read after the handshake.
    ///
    /// # Errors
    ///
    /// When rustls refuses the certificate, key or anchors.
    pub fn server_config(&self, provider: &Arc<CryptoProvider>) -> Result<ServerConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        for root in &self.roots {
            roots.add(root.clone())?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A client configuration that presents this identity and accepts a server only when
    /// its certificate chains to the trust anchors and its SPIFFE identity is the service
    /// named as the connection's server name (see [`SpiffeServerVerifier`]).
    ///
    /// # Errors
    ///
    /// When rustls refuses the certificate, key or anchors.
    pub fn client_config(&self, provider: &Arc<CryptoProvider>) -> Result<ClientConfig, TlsError> {
        let verifier = SpiffeServerVerifier::new(&self.roots, provider.clone())?;
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// Verifies a server certificate the SPIFFE way: the chain must lead to a trust anchor (with
/// the server-auth usage), and the one URI SAN must be `spiffe://engram/<name>` where `name`
/// is the server name the client connected with (the service it meant to reach, not a DNS
/// name: the same service has many addresses).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier over `roots`.
    ///
    /// # Errors
    ///
    /// When a root is not a usable trust anchor.
    pub fn new(
        roots: &[CertificateDer<'static>],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let anchors = roots
            .iter()
            .map(|root| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| malformed("CA", format!("{e:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { anchors, provider })
    }
}

fn certificate_error(error: webpki::Error) -> rustls::Error {
    let mapped = match error {
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        _ => CertificateError::BadEncoding,
    };
    rustls::Error::InvalidCertificate(mapped)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(certificate_error)?;
        let ServerName::DnsName(expected) = server_name else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        };
        match identity_of(end_entity) {
            Some(found) if found == expected.as_ref() => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A certificate's `notBefore` and `notAfter`, read from its DER: webpki checks validity
/// but does not expose it, and expiry is what renewal, metrics and `engramctl doctor` need.
pub fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (certificate, _) = der_element(cert.as_ref(), 0x30)?;
    let (tbs, _) = der_element(certificate, 0x30)?;
    let mut rest = tbs;
    // version [0] EXPLICIT is optional.
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest, 0xa0)?.1;
    }
    rest = der_element(rest, 0x02)?.1; // serialNumber
    rest = der_element(rest, 0x30)?.1; // signature
    rest = der_element(rest, 0x30)?.1; // issuer
    let (validity, _) = der_element(rest, 0x30)?;
    let (not_before, after) = der_time(validity)?;
    let (not_after, _) = der_time(after)?;
    Some((not_before, not_after))
}

/// The content of the DER element at the start of `input` if its tag is `tag`, and what
/// follows it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (length, &rest[count..])
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

/// A UTCTime or GeneralizedTime (`Z` only, as RFC 5280 requires) and what follows it.
fn der_time(input: &[u8]) -> Option<(SystemTime, &[u8])> {
    let (tag, digits_len) = match input.first()? {
        0x17 => (0x17, 12),
        0x18 => (0x18, 14),
        _ => return None,
    };
    let (content, rest) = der_element(input, tag)?;
    let text = std::str::from_utf8(content).ok()?;
    let digits = text.strip_suffix('Z')?;
    if digits.len() != digits_len || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| digits[range].parse::<i64>().ok();
    let (year, offset) = if tag == 0x17 {
        let yy = number(0..2)?;
        (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
    } else {
        (number(0..4)?, 4)
    };
    let month = number(offset..offset + 2)?;
    let day = number(offset + 2..offset + 4)?;
    let hour = number(offset + 4..offset + 6)?;
    let minute = number(offset + 6..offset + 8)?;
    let second = number(offset + 8..offset + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(60);
    let secs = u64::try_from(secs).ok()?;
    Some((SystemTime::UNIX_EPOCH + Duration::from_secs(secs), rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 4), 20_791);
    }

    #[test]
    fn times_parse_in_both_encodings_and_bad_ones_are_refused() {
        let utc = [&[0x17, 13][..], b"261204103000Z"].concat();
        let (at, rest) = der_time(&utc).expect("utc time");
        assert!(rest.is_empty());
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            20_791 * 86_400 + 10 * 3600 + 30 * 60
        );
        let generalized = [&[0x18, 15][..], b"20261204103000Z"].concat();
        assert_eq!(der_time(&generalized).map(|t| t.0), Some(at));
        for bad in [
            [&[0x17, 13][..], b"261304103000Z"].concat(), // month 13
            [&[0x17, 13][..], b"26120410300+Z"].concat(),
            [&[0x17, 12][..], b"261204103000"].concat(), // no Z
            [&[0x17, 40][..], b"261204103000Z"].concat(), // length past the end
            vec![0x02, 1, 0],
            vec![],
        ] {
            assert!(der_time(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_certificates_have_no_validity_or_identity() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"not der at all",
        ] {
            let der = CertificateDer::from(bad.to_vec());
            assert!(validity(&der).is_none());
            assert!(identity_of(&der).is_none());
        }
    }

    #[test]
    fn service_names_are_strict() {
        for good in ["exchange-signer", "engramctl", "a1"] {
            assert!(is_service_name(good), "{good}");
        }
        for bad in ["", "-x", "x-", "Exchange", "a/b", "a.b", &"x".repeat(64)] {
            assert!(!is_service_name(bad), "{bad}");
        }
    }

    #[test]
    fn garbage_pem_is_a_clear_error_without_key_bytes() {
        let key = b"-----BEGIN PRIVATE KEY-----\nnot-base64!!\n-----END PRIVATE KEY-----\n"; // pragma: allowlist secret
        let error = Material::from_pem(b"junk", key, b"junk", "audit-sink").unwrap_err();
        assert!(error.to_string().starts_with("certificate:"), "{error}");
        assert!(!error.to_string().contains("not-base64"));
    }
}
