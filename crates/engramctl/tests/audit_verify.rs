//! `engramctl audit verify` as an operator runs it: exit codes, the first bad record, keys
//! from a file or standard input.

use std::io::Write;
use std::process::{Command, Stdio};

use engram_audit::format::{CHECKPOINT_FILE, Checkpoint, segment_path};
use engram_audit::record::{GENESIS_HASH, Record, RecordActor};

const BIN: &str = env!("CARGO_BIN_EXE_engramctl");

fn write_log(dir: &std::path::Path, key: &[u8]) {
    let mut prev = GENESIS_HASH.to_owned();
    let mut lines = String::new();
    for seq in 1..=5 {
        let record = Record {
            seq,
            ts: "2026-12-03T00:00:00.000000000Z".to_owned(),
            category: "audit".to_owned(),
            action: "TRADE_EXECUTED".to_owned(),
            actor: RecordActor {
                service: "exchange-signer".to_owned(),
                ..RecordActor::default()
            },
            details: serde_json::Map::new(),
            correlation_id: String::new(),
            trace_id: String::new(),
            occurred_at: None,
            idempotency_key: String::new(),
            key_version: 1,
            prev_hash: prev.clone(),
            hash: String::new(),
        }
        .seal();
        prev = record.hash.clone();
        lines.push_str(&record.to_line());
        lines.push('\n');
    }
    std::fs::write(segment_path(dir, 1), lines).expect("segment");
    let mut checkpoint = Checkpoint {
        seq: 5,
        head_hash: prev,
        ts: "2026-12-03T00:00:01.000000000Z".to_owned(),
        key_version: 1,
        signature: String::new(),
    };
    checkpoint.signature = checkpoint.sign(key);
    std::fs::write(
        dir.join(CHECKPOINT_FILE),
        format!("{}\n", serde_json::to_string(&checkpoint).expect("json")),
    )
    .expect("checkpoint");
}

fn run(args: &[&str], stdin: Option<&str>) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("wait");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code(), text)
}

#[test]
fn a_good_trail_passes_and_signatures_need_the_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), b"the-key");
    let path = dir.path().to_str().expect("utf-8");
    let (code, out) = run(&["audit", "verify", path], None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 signatures unchecked"), "{out}");

    let (code, out) = run(
        &["audit", "verify", path, "--keys", "-", "--json"],
        Some(r#"{"1":"the-key"}"#),
    );
    assert_eq!(code, Some(0), "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("json report");
    assert_eq!(report["signatures_unchecked"], 0);
    assert_eq!(report["records_checked"], 5);

    let (code, out) = run(
        &["audit", "verify", path, "--keys", "-"],
        Some(r#"{"1":"wrong-key"}"#),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("bad signature"), "{out}");
    assert!(!out.contains("wrong-key"), "keys never printed: {out}");
}

#[test]
fn a_tampered_trail_fails_with_exit_1_naming_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), b"k");
    let segment = segment_path(dir.path(), 1);
    let text = std::fs::read_to_string(&segment).expect("read");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(2);
    std::fs::write(&segment, format!("{}\n", lines.join("\n"))).expect("write");
    let (code, out) = run(
        &["audit", "verify", dir.path().to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAILED at record 3"), "{out}");
}

#[test]
fn bad_usage_and_unreadable_input_exit_2() {
    let (code, _) = run(&["audit", "verify", "/nonexistent/dir"], None);
    assert_eq!(code, Some(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8");
    let (code, out) = run(&["audit", "verify", path, "--keys", "-"], Some("not json"));
    assert_eq!(code, Some(2), "{out}");
    let (code, _) = run(&["audit", "frobnicate"], None);
    assert_eq!(code, Some(2));
}
