//! Counters for `GET /metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::Taken;

/// Per-volume counters.
#[derive(Clone, Debug, Default)]
pub struct VolumeCounters {
    pub snapshots_taken: u64,
    pub snapshots_failed: u64,
    pub bytes_scanned: u64,
    pub bytes_changed: u64,
    pub bytes_stored: u64,
    pub last_freeze_seconds: f64,
    pub last_snapshot_seconds: f64,
    pub last_snapshot_timestamp: f64,
    pub revert_blocks_written: u64,
    pub snapshots_tracked: u64,
    pub snapshots_full_scan: u64,
    pub verifications: u64,
    pub unmarked_blocks: u64,
    pub last_rounds: f64,
    pub last_quiesced_blocks: f64,
}

/// All counters since the daemon started.
#[derive(Debug, Default)]
pub struct Metrics {
    volumes: Mutex<BTreeMap<String, VolumeCounters>>,
    /// Jobs that panicked (their records were marked error).
    panics: AtomicU64,
}

impl Metrics {
    fn with(&self, v: &str, f: impl FnOnce(&mut VolumeCounters)) {
        let mut m = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(v.to_string()).or_default());
    }

    pub fn snapshot_ok(&self, v: &str, out: &Taken) {
        self.with(v, |c| {
            c.snapshots_taken += 1;
            c.bytes_scanned += out.device_size;
            c.bytes_changed += out.changed_bytes;
            c.bytes_stored += out.stored_bytes;
            c.last_freeze_seconds = out.freeze.as_secs_f64();
            c.last_snapshot_seconds = out.duration.as_secs_f64();
            c.last_snapshot_timestamp = crate::util::now_micros() as f64 / 1e6;
            use crate::chain::format::TakeMethod;
            match out.record.method {
                TakeMethod::Tracked => c.snapshots_tracked += 1,
                TakeMethod::FullScan => c.snapshots_full_scan += 1,
                TakeMethod::Verified => {
                    c.snapshots_full_scan += 1;
                    c.verifications += 1;
                }
            }
            c.unmarked_blocks += out.record.unmarked_blocks;
            c.last_rounds = out.record.rounds as f64;
            c.last_quiesced_blocks = out.record.quiesced_blocks as f64;
        });
    }

    pub fn snapshot_failed(&self, v: &str) {
        self.with(v, |c| c.snapshots_failed += 1);
    }

    pub fn reverted(&self, v: &str, blocks: u64) {
        self.with(v, |c| c.revert_blocks_written += blocks);
    }

    pub fn job_panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// The text exposition for the volumes in `visible`.
    pub fn render(&self, visible: &[String]) -> String {
        let m = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        let zero = VolumeCounters::default();
        let rows: Vec<(&String, &VolumeCounters)> = visible
            .iter()
            .map(|v| (v, m.get(v).unwrap_or(&zero)))
            .collect();
        let mut out = String::new();
        let metric = |out: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      get: &dyn Fn(&VolumeCounters) -> f64| {
            let _ = writeln!(out, "# HELP blocksnap_{name} {help}");
            let _ = writeln!(out, "# TYPE blocksnap_{name} {kind}");
            for (v, c) in &rows {
                let _ = writeln!(out, "blocksnap_{name}{{volume=\"{v}\"}} {}", get(c));
            }
        };
        metric(
            &mut out,
            "snapshots_taken_total",
            "counter",
            "Snapshots that became available.",
            &|c| c.snapshots_taken as f64,
        );
        metric(
            &mut out,
            "snapshots_failed_total",
            "counter",
            "Snapshots that ended in error.",
            &|c| c.snapshots_failed as f64,
        );
        metric(
            &mut out,
            "scanned_bytes_total",
            "counter",
            "Bytes of devices scanned by snapshots.",
            &|c| c.bytes_scanned as f64,
        );
        metric(
            &mut out,
            "changed_bytes_total",
            "counter",
            "Bytes found changed by snapshots.",
            &|c| c.bytes_changed as f64,
        );
        metric(
            &mut out,
            "stored_bytes_total",
            "counter",
            "Bytes appended to chain files by snapshots.",
            &|c| c.bytes_stored as f64,
        );
        metric(
            &mut out,
            "last_freeze_seconds",
            "gauge",
            "Freeze window of the last snapshot.",
            &|c| c.last_freeze_seconds,
        );
        metric(
            &mut out,
            "last_snapshot_duration_seconds",
            "gauge",
            "Duration of the last snapshot.",
            &|c| c.last_snapshot_seconds,
        );
        metric(
            &mut out,
            "last_snapshot_timestamp_seconds",
            "gauge",
            "Unix time the last snapshot became available.",
            &|c| c.last_snapshot_timestamp,
        );
        metric(
            &mut out,
            "snapshots_tracked_total",
            "counter",
            "Snapshots that read only the blocks write tracking reported.",
            &|c| c.snapshots_tracked as f64,
        );
        metric(
            &mut out,
            "snapshots_full_scan_total",
            "counter",
            "Snapshots that read the whole device (no tracking, a gap, a verification).",
            &|c| c.snapshots_full_scan as f64,
        );
        metric(
            &mut out,
            "tracking_verifications_total",
            "counter",
            "Snapshots that checked write tracking against a full diff.",
            &|c| c.verifications as f64,
        );
        metric(
            &mut out,
            "tracking_unmarked_blocks_total",
            "counter",
            "Blocks a verification found changed that write tracking had not reported.",
            &|c| c.unmarked_blocks as f64,
        );
        metric(
            &mut out,
            "last_precopy_rounds",
            "gauge",
            "Live rounds of the last snapshot before it quiesced the volume.",
            &|c| c.last_rounds,
        );
        metric(
            &mut out,
            "last_quiesced_blocks",
            "gauge",
            "Blocks the last snapshot read while the volume was quiesced.",
            &|c| c.last_quiesced_blocks,
        );
        metric(
            &mut out,
            "revert_blocks_written_total",
            "counter",
            "Blocks written by reverts.",
            &|c| c.revert_blocks_written as f64,
        );
        let _ = writeln!(
            out,
            "# HELP blocksnap_job_panics_total Operations that ended in a panic (their records were marked error).\n# TYPE blocksnap_job_panics_total counter\nblocksnap_job_panics_total {}",
            self.panics()
        );
        out
    }
}
