//! Verification of a log directory: the hash chain across segments, and every checkpoint.
//! Used by the Verify RPC and by the offline verifier; it only reads.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::Path;

use crate::format::{CHECKPOINT_FILE, Checkpoint, list_segments};
use crate::record::{GENESIS_HASH, Record};

/// The outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Whether everything checked out.
    pub ok: bool,
    /// Records read.
    pub records_checked: u64,
    /// Checkpoints checked against the chain.
    pub checkpoints_checked: u64,
    /// Checkpoints whose signature could not be checked (no key for their version).
    pub signatures_unchecked: u64,
    /// The first bad record, when not ok.
    pub first_bad_seq: u64,
    /// The segment (file name) it is in, when known.
    pub first_bad_segment: String,
    /// What is wrong.
    pub reason: String,
}

impl VerifyReport {
    fn fail(mut self, seq: u64, segment: &str, reason: String) -> Self {
        self.ok = false;
        self.first_bad_seq = seq;
        self.first_bad_segment = segment.to_owned();
        self.reason = reason;
        self
    }
}

/// Walks every segment in `dir` and then every checkpoint. `key_for_version` gives the audit
/// key of a version, when known, to check checkpoint signatures.
///
/// # Errors
///
/// Only when the directory cannot be read; a bad log is a report with `ok == false`.
pub fn verify_dir(
    dir: &Path,
    key_for_version: &dyn Fn(u64) -> Option<Vec<u8>>,
) -> std::io::Result<VerifyReport> {
    let checkpoints = read_checkpoints(dir)?;
    let wanted: BTreeSet<u64> = checkpoints
        .iter()
        .filter_map(|(_, c)| c.as_ref().map(|c| c.seq))
        .collect();
    let mut hashes_at: BTreeMap<u64, String> = BTreeMap::new();
    let mut report = VerifyReport::default();

    let mut expected_seq = 1u64;
    let mut prev_hash = GENESIS_HASH.to_owned();
    for (first_seq, path) in list_segments(dir)? {
        let segment = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if first_seq != expected_seq {
            let reason = format!(
                "segment {segment} starts at sequence {first_seq} but {expected_seq} was expected: \
                 a segment is missing or renamed"
            );
            return Ok(report.fail(expected_seq, &segment, reason));
        }
        let file = std::fs::File::open(&path)?;
        for (index, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let line = line?;
            let record = match std::str::from_utf8(&line)
                .ok()
                .and_then(|l| serde_json::from_str::<Record>(l).ok())
            {
                Some(record) => record,
                None => {
                    let reason = format!(
                        "line {} of {segment} is not a valid record: edited or corrupt",
                        index + 1
                    );
                    return Ok(report.fail(expected_seq, &segment, reason));
                }
            };
            if record.seq != expected_seq {
                let reason = format!(
                    "sequence {} where {expected_seq} was expected: a record was deleted or records were reordered",
                    record.seq
                );
                return Ok(report.fail(expected_seq, &segment, reason));
            }
            if record.prev_hash != prev_hash {
                let reason =
                    "prev_hash does not match the previous record's hash: the chain is broken here"
                        .to_owned();
                return Ok(report.fail(record.seq, &segment, reason));
            }
            if record.compute_hash() != record.hash {
                let reason =
                    "hash does not match the record's content: the record was edited".to_owned();
                return Ok(report.fail(record.seq, &segment, reason));
            }
            if wanted.contains(&record.seq) {
                hashes_at.insert(record.seq, record.hash.clone());
            }
            report.records_checked += 1;
            prev_hash = record.hash;
            expected_seq += 1;
        }
    }
    let last_seq = expected_seq - 1;

    for (line, checkpoint) in &checkpoints {
        let segment = CHECKPOINT_FILE;
        let Some(checkpoint) = checkpoint else {
            let reason = format!("line {line} of {CHECKPOINT_FILE} is not a valid checkpoint");
            return Ok(report.fail(last_seq + 1, segment, reason));
        };
        if checkpoint.seq > last_seq {
            let reason = format!(
                "the log ends at sequence {last_seq} but a checkpoint vouches for {}: records were truncated",
                checkpoint.seq
            );
            return Ok(report.fail(last_seq + 1, segment, reason));
        }
        if checkpoint.seq > 0 && hashes_at.get(&checkpoint.seq) != Some(&checkpoint.head_hash) {
            let reason = format!(
                "record {} differs from the checkpoint made at {}: history was rewritten",
                checkpoint.seq, checkpoint.ts
            );
            return Ok(report.fail(checkpoint.seq, segment, reason));
        }
        match key_for_version(checkpoint.key_version) {
            Some(key) if checkpoint.sign(&key) != checkpoint.signature => {
                let reason = format!(
                    "checkpoint at sequence {} has a bad signature (key version {})",
                    checkpoint.seq, checkpoint.key_version
                );
                return Ok(report.fail(checkpoint.seq, segment, reason));
            }
            Some(_) => {}
            None => report.signatures_unchecked += 1,
        }
        report.checkpoints_checked += 1;
    }
    report.ok = true;
    Ok(report)
}

/// Checkpoint lines, numbered from 1; `None` for a line that does not parse.
fn read_checkpoints(dir: &Path) -> std::io::Result<Vec<(usize, Option<Checkpoint>)>> {
    let path = dir.join(CHECKPOINT_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, serde_json::from_str(line).ok()))
        .collect())
}
