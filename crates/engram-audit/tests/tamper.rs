//! The verifier against the five ways to tamper with a log: each is found, and the report
//! names the first bad record.

use std::path::Path;

use engram_audit::format::{CHECKPOINT_FILE, Checkpoint, segment_path};
use engram_audit::record::{GENESIS_HASH, Record, RecordActor};
use engram_audit::verify::{VerifyReport, verify_dir};

const KEY: &[u8] = b"test-audit-key";

/// Writes `count` chained records, `per_segment` to a segment, with a checkpoint after every
/// `checkpoint_every` records (and one at the end).
fn write_log(dir: &Path, count: u64, per_segment: u64, checkpoint_every: u64) {
    let mut prev = GENESIS_HASH.to_owned();
    let mut segment = String::new();
    let mut segment_first = 1;
    let mut checkpoints = String::new();
    for seq in 1..=count {
        let record = Record {
            seq,
            ts: format!("2026-12-03T00:00:{:02}.000000000Z", seq % 60),
            category: "audit".to_owned(),
            action: "TRADE_EXECUTED".to_owned(),
            actor: RecordActor {
                service: "exchange-signer".to_owned(),
                telegram_user_id: Some(7),
                telegram_chat_id: None,
            },
            details: serde_json::from_str(&format!(r#"{{"n":{seq},"pair":"BTCUSDT"}}"#))
                .expect("json"),
            correlation_id: format!("c-{seq}"),
            trace_id: String::new(),
            occurred_at: None,
            idempotency_key: String::new(),
            key_version: 1,
            prev_hash: prev.clone(),
            hash: String::new(),
        }
        .seal();
        segment.push_str(&record.to_line());
        segment.push('\n');
        prev = record.hash.clone();
        if seq % checkpoint_every == 0 || seq == count {
            let mut checkpoint = Checkpoint {
                seq,
                head_hash: record.hash.clone(),
                ts: "2026-12-03T00:01:00.000000000Z".to_owned(),
                key_version: 1,
                signature: String::new(),
            };
            checkpoint.signature = checkpoint.sign(KEY);
            checkpoints.push_str(&serde_json::to_string(&checkpoint).expect("json"));
            checkpoints.push('\n');
        }
        if seq % per_segment == 0 || seq == count {
            std::fs::write(segment_path(dir, segment_first), &segment).expect("segment");
            segment.clear();
            segment_first = seq + 1;
        }
    }
    std::fs::write(dir.join(CHECKPOINT_FILE), checkpoints).expect("checkpoints");
}

fn verify(dir: &Path) -> VerifyReport {
    verify_dir(dir, &|version| (version == 1).then(|| KEY.to_vec())).expect("readable")
}

/// Rewrites the lines of the segment starting at `first` with `edit`.
fn edit_segment(dir: &Path, first: u64, edit: impl FnOnce(&mut Vec<String>)) {
    let path = segment_path(dir, first);
    let text = std::fs::read_to_string(&path).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(path, out).expect("write");
}

fn fresh() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    // 30 records over three segments (1-10, 11-20, 21-30), checkpoints at 10, 20, 30.
    write_log(dir.path(), 30, 10, 10);
    dir
}

#[test]
fn an_untouched_log_verifies_with_every_checkpoint_signature() {
    let dir = fresh();
    let report = verify(dir.path());
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records_checked, 30);
    assert_eq!(report.checkpoints_checked, 3);
    assert_eq!(report.signatures_unchecked, 0);
}

#[test]
fn an_edited_byte_is_found_at_its_record() {
    let dir = fresh();
    edit_segment(dir.path(), 11, |lines| {
        // Record 15 is the fifth line of the second segment: change one digit of its details.
        lines[4] = lines[4].replace(r#""n":15"#, r#""n":16"#);
    });
    let report = verify(dir.path());
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, 15, "{report:?}");
    assert!(report.reason.contains("edited"), "{report:?}");
    assert_eq!(report.first_bad_segment, "audit-00000000000000000011.jsonl");
}

#[test]
fn a_deleted_record_is_found_where_it_is_missing() {
    let dir = fresh();
    edit_segment(dir.path(), 1, |lines| {
        lines.remove(6); // record 7
    });
    let report = verify(dir.path());
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, 7, "{report:?}");
    assert!(report.reason.contains("deleted"), "{report:?}");
}

#[test]
fn two_swapped_records_are_found_at_the_first() {
    let dir = fresh();
    edit_segment(dir.path(), 21, |lines| lines.swap(2, 3)); // records 23 and 24
    let report = verify(dir.path());
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, 23, "{report:?}");
    assert!(report.reason.contains("reordered"), "{report:?}");
}

#[test]
fn a_removed_middle_segment_is_found_at_its_first_record() {
    let dir = fresh();
    std::fs::remove_file(segment_path(dir.path(), 11)).expect("remove");
    let report = verify(dir.path());
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, 11, "{report:?}");
    assert!(report.reason.contains("segment"), "{report:?}");
}

#[test]
fn a_truncated_tail_is_found_against_the_last_checkpoint() {
    let dir = fresh();
    edit_segment(dir.path(), 21, |lines| lines.truncate(5)); // keep 21-25
    let report = verify(dir.path());
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, 26, "{report:?}");
    assert!(report.reason.contains("truncated"), "{report:?}");
}

#[test]
fn a_rewritten_history_with_a_consistent_chain_is_found_by_the_checkpoint() {
    // An attacker rewrites record 25 and re-hashes everything after it: the chain alone
    // is consistent again, but the signed checkpoint at 30 no longer matches.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 30, 10, 10);
    let path = segment_path(dir.path(), 21);
    let mut records: Vec<Record> = std::fs::read_to_string(&path)
        .expect("read")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let mut prev = records[3].hash.clone();
    for record in records.iter_mut().skip(4) {
        if record.seq == 25 {
            record
                .details
                .insert("n".to_owned(), serde_json::json!(999));
        }
        record.prev_hash = prev.clone();
        record.hash = record.compute_hash();
        prev = record.hash.clone();
    }
    let text: String = records
        .iter()
        .map(|r| format!("{}\n", r.to_line()))
        .collect();
    std::fs::write(&path, text).expect("write");
    let report = verify(dir.path());
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, 30, "{report:?}");
    assert!(report.reason.contains("rewritten"), "{report:?}");
}

#[test]
fn a_forged_checkpoint_signature_is_found() {
    let dir = fresh();
    let path = dir.path().join(CHECKPOINT_FILE);
    let text = std::fs::read_to_string(&path).expect("read").replace(
        "\"key_version\":1,\"signature\":\"",
        "\"key_version\":1,\"signature\":\"00",
    );
    std::fs::write(&path, text).expect("write");
    let report = verify(dir.path());
    assert!(!report.ok);
    assert!(report.reason.contains("bad signature"), "{report:?}");
}

#[test]
fn without_keys_signatures_are_reported_unchecked_not_passed() {
    let dir = fresh();
    let report = verify_dir(dir.path(), &|_| None).expect("readable");
    assert!(report.ok);
    assert_eq!(report.signatures_unchecked, 3);
}
