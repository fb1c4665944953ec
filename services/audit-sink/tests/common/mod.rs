//! Helpers shared by the audit sink's integration tests.

use std::path::Path;

use engram_audit::format::list_segments;
use engram_audit::record::Record;

/// Every record on disk, in order; panics on a line that is not a whole record.
pub fn records(dir: &Path) -> Vec<Record> {
    list_segments(dir)
        .expect("segments")
        .into_iter()
        .flat_map(|(_, path)| {
            std::fs::read_to_string(path)
                .expect("read")
                .lines()
                .map(|l| serde_json::from_str::<Record>(l).expect("every line is a whole record"))
                .collect::<Vec<_>>()
        })
        .collect()
}
