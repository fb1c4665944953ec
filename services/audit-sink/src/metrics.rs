//! The audit sink's metrics, fed by the log writer after every sync.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::log::{HeadState, LogError, LogObserver};

/// Every `engram_audit_*` metric.
#[derive(Clone, Debug)]
pub struct AuditMetrics {
    appends: IntCounterVec,
    sync_seconds: Histogram,
    batch_size: Histogram,
    bytes_written: IntCounter,
    head_sequence: IntGauge,
    checkpoint_sequence: IntGauge,
    segments: IntGauge,
    write_failures: IntCounter,
    /// Verifications that found a bad record.
    pub verify_failures: IntCounter,
}

impl AuditMetrics {
    /// Registers every metric.
    ///
    /// # Errors
    ///
    /// On a duplicate registration.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            appends: IntCounterVec::new(
                Opts::new(
                    "engram_audit_appends_total",
                    "Records appended, by category and action.",
                ),
                &["category", "action"],
            )?,
            sync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "engram_audit_sync_seconds",
                    "Time to write and fdatasync one group.",
                )
                .buckets(vec![
                    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "engram_audit_batch_size",
                    "Records written by one fdatasync (group commit).",
                )
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 14)?),
            )?,
            bytes_written: IntCounter::new(
                "engram_audit_bytes_written_total",
                "Bytes of records written.",
            )?,
            head_sequence: IntGauge::new(
                "engram_audit_head_sequence",
                "Sequence number of the newest record.",
            )?,
            checkpoint_sequence: IntGauge::new(
                "engram_audit_checkpoint_sequence",
                "Sequence number covered by the newest signed checkpoint.",
            )?,
            segments: IntGauge::new(
                "engram_audit_segments",
                "Segment files in the audit directory.",
            )?,
            write_failures: IntCounter::new(
                "engram_audit_write_failures_total",
                "Appends or checkpoints that failed to reach the disk (nothing of them was kept).",
            )?,
            verify_failures: IntCounter::new(
                "engram_audit_verify_failures_total",
                "Verifications that found a bad or missing record.",
            )?,
        };
        registry.register(Box::new(metrics.appends.clone()))?;
        registry.register(Box::new(metrics.sync_seconds.clone()))?;
        registry.register(Box::new(metrics.batch_size.clone()))?;
        registry.register(Box::new(metrics.bytes_written.clone()))?;
        registry.register(Box::new(metrics.head_sequence.clone()))?;
        registry.register(Box::new(metrics.checkpoint_sequence.clone()))?;
        registry.register(Box::new(metrics.segments.clone()))?;
        registry.register(Box::new(metrics.write_failures.clone()))?;
        registry.register(Box::new(metrics.verify_failures.clone()))?;
        Ok(metrics)
    }
}

impl LogObserver for AuditMetrics {
    fn synced(&self, events: &[(String, String)], bytes: u64, sync: Duration) {
        for (category, action) in events {
            self.appends
                .with_label_values(&[category.as_str(), action.as_str()])
                .inc();
        }
        #[allow(clippy::cast_precision_loss)]
        self.batch_size.observe(events.len() as f64);
        self.sync_seconds.observe(sync.as_secs_f64());
        self.bytes_written.inc_by(bytes);
    }

    fn failed(&self, error: &LogError) {
        self.write_failures.inc();
        tracing::error!(target: "security", error = %error, "audit write failed; nothing of the failed group was kept");
    }

    fn head(&self, head: &HeadState) {
        self.head_sequence
            .set(i64::try_from(head.seq).unwrap_or(i64::MAX));
        self.segments.set(i64::from(head.segments));
        if let Some(checkpoint) = &head.checkpoint {
            self.checkpoint_sequence
                .set(i64::try_from(checkpoint.seq).unwrap_or(i64::MAX));
        }
    }
}
