//! `sign-bench`: the cost of signing one Binance order request, in nanoseconds, for HMAC and
//! Ed25519 keys, next to the bare HMAC-SHA256 of the same payload (the floor). It prints
//! figures; it asserts nothing. Run it with `make bench-sign` (release build, one core).

use std::hint::black_box;
use std::time::Instant;

use exchange_signer::signing::{Query, SigningKey};
use hmac::{KeyInit, Mac};
use secrecy::SecretString;

/// Median of `rounds` timings of `iterations` calls each, in nanoseconds per call.
fn measure(rounds: usize, iterations: u32, mut f: impl FnMut()) -> f64 {
    let mut per_call: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    per_call[rounds / 2]
}

fn order() -> Query {
    Query::new()
        .param("symbol", "BTCUSDT")
        .param("side", "BUY")
        .param("type", "LIMIT")
        .param("timeInForce", "GTC")
        .param("quantity", "0.00100000")
        .param("price", "43250.10")
        .param("newClientOrderId", "c-3f1e2d4c5b6a79880123456789abcdef")
}

fn main() {
    let secret = "x".repeat(64);
    let hmac =
        SigningKey::hmac(SecretString::from(secret.clone())).unwrap_or_else(|e| panic!("{e}"));
    let seed = SecretString::from("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned());
    let ed25519 = SigningKey::ed25519(&seed).unwrap_or_else(|e| panic!("{e}"));
    let payload = format!(
        "{}&recvWindow=5000&timestamp=1764720000000",
        order().as_str()
    );
    println!("payload: {} bytes", payload.len());
    println!("| operation | ns per request (median of 15 rounds) |");
    println!("|---|---|");
    let raw = measure(15, 200_000, || {
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!());
        mac.update(black_box(payload.as_bytes()));
        black_box(mac.finalize());
    });
    println!("| bare HMAC-SHA256 of the payload (floor) | {raw:.0} |");
    let signed_hmac = measure(15, 200_000, || {
        black_box(
            order()
                .signed(&hmac, 1_764_720_000_000, 5000, "")
                .unwrap_or_default(),
        );
    });
    println!("| build + sign an order query, HMAC key | {signed_hmac:.0} |");
    let sign_only = measure(15, 200_000, || {
        black_box(hmac.sign(black_box(payload.as_bytes())));
    });
    println!("| sign only (hex), HMAC key | {sign_only:.0} |");
    let signed_ed = measure(15, 20_000, || {
        black_box(
            order()
                .signed(&ed25519, 1_764_720_000_000, 5000, "")
                .unwrap_or_default(),
        );
    });
    println!("| build + sign an order query, Ed25519 key | {signed_ed:.0} |");
}
