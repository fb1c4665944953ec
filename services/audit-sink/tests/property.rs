//! Property: whatever the batch sizes and however many writers run at once, the log has no
//! gap, no duplicate sequence, every batch is contiguous, and the chain verifies.

use std::sync::Arc;
use std::time::Duration;

use audit_sink::log::{AuditLog, HeadState, LogError, LogObserver, LogSettings, NewEvent};
use engram_audit::record::RecordActor;
use proptest::prelude::*;
use zeroize::Zeroizing;

struct Quiet;
impl LogObserver for Quiet {
    fn synced(&self, _: &[(String, String)], _: u64, _: Duration) {}
    fn failed(&self, _: &LogError) {}
    fn head(&self, _: &HeadState) {}
}

fn event(n: usize) -> NewEvent {
    NewEvent {
        category: "audit".to_owned(),
        action: "TRADE_EXECUTED".to_owned(),
        actor: RecordActor {
            service: "exchange-signer".to_owned(),
            ..RecordActor::default()
        },
        details: serde_json::from_str(&format!(r#"{{"n":{n}}}"#)).expect("json"),
        correlation_id: String::new(),
        trace_id: String::new(),
        occurred_at: None,
        idempotency_key: String::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn concurrent_batches_never_gap_duplicate_or_break_the_chain(
        writers in proptest::collection::vec(proptest::collection::vec(1usize..40, 1..12), 1..8),
        segment_max in 2048u64..65536,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = LogSettings {
            dir: dir.path().to_path_buf(),
            segment_max_bytes: segment_max,
            checkpoint_every: 50,
            checkpoint_interval: Duration::from_secs(3600),
            sensitive_fields: vec![],
        };
        let expected: usize = writers.iter().flatten().sum();
        let batches = runtime.block_on(async move {
            let key: audit_sink::log::KeyProvider = Arc::new(|| Some((1, Zeroizing::new(b"k".to_vec()))));
            let (log, _) = AuditLog::open(settings, key, Arc::new(Quiet)).expect("open");
            let tasks: Vec<_> = writers
                .into_iter()
                .map(|sizes| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let mut acked = Vec::new();
                        for size in sizes {
                            let acks = log.append((0..size).map(event).collect()).await.expect("append");
                            acked.push(acks.into_iter().map(|a| a.seq).collect::<Vec<_>>());
                        }
                        acked
                    })
                })
                .collect();
            let mut batches = Vec::new();
            for task in tasks {
                batches.extend(task.await.expect("join"));
            }
            log.close().await;
            batches
        });
        for batch in &batches {
            prop_assert!(batch.windows(2).all(|w| w[1] == w[0] + 1), "a batch is contiguous: {:?}", batch);
        }
        let mut all: Vec<u64> = batches.into_iter().flatten().collect();
        all.sort_unstable();
        prop_assert_eq!(all, (1..=expected as u64).collect::<Vec<_>>());
        let report = engram_audit::verify::verify_dir(dir.path(), &|_| Some(b"k".to_vec())).expect("verify");
        prop_assert!(report.ok, "{:?}", report);
        prop_assert_eq!(report.records_checked, expected as u64);
    }
}
