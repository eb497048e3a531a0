//! Scheduled snapshots and their retention.
//!
//! A configured volume with a `schedule` (see [`calendar`]) is snapshotted
//! by the scheduler at each due time, through the same operation the API
//! uses ([`Ops::create_scheduled_snapshot`]), so claims keep a run from
//! overlapping anything else running on the volume: a volume that is busy
//! is not snapshotted, the run is recorded as `busy` and retried a minute
//! later, and however many due times pass meanwhile it stays one run.
//! After each run (and when the daemon starts) the volume's `keep` rules
//! ([`retention`]) pick the scheduled snapshots to prune, which are deleted
//! (merged) one after the other through the delete operation.
//!
//! Missed runs: the next due time is the first one after the last run (or,
//! before the first run, after the volume was first scheduled). A daemon
//! that was stopped across any number of due times finds one due time in
//! the past when it starts, and takes one catch-up snapshot. The last run
//! of each volume is kept in `schedules.json` in the state directory
//! (replaced atomically), never on a volume.
//!
//! Time comes from a [`Clock`], so tests drive days of schedules without
//! sleeping: [`Scheduler::tick`] runs what is due now, synchronously.

pub mod calendar;
pub mod retention;

pub use calendar::{Schedule, ScheduleError};
pub use retention::{to_prune, Candidate, Keep};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::catalog::SnapStatus;
use super::ops::{CreateSnapshot, OpError};
use super::store::{SnapshotQuery, StoreError};
use super::Daemon;
use crate::clock::Clock;
use crate::config::VolumeSchedule;

/// The scheduler's state file in the state directory.
pub const STATE_FILE: &str = "schedules.json";
/// A run that found its volume busy is tried again this much later.
pub const BUSY_RETRY: SignedDuration = SignedDuration::from_secs(60);
/// Longest sleep of the scheduler's loop on the real clock (so a changed
/// system time is noticed).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Sleep of the scheduler's loop on a test clock.
const TEST_CLOCK_POLL: Duration = Duration::from_millis(100);

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The snapshot became available.
    Ok,
    /// The volume was busy with another operation: not taken, retried.
    Busy,
    /// The snapshot could not be taken (the cause is in `last_error`).
    Error,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Busy => "busy",
            Outcome::Error => "error",
        }
    }
}

/// What the scheduler remembers of a volume (persisted). Times in
/// microseconds since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    /// When the volume was first scheduled (due times before it are not
    /// caught up).
    pub since_us: i64,
    /// The last run that took or failed to take a snapshot (busy runs do
    /// not count: they are retried).
    #[serde(default)]
    pub last_run_us: Option<i64>,
    /// The last attempt, busy ones included.
    #[serde(default)]
    pub last_attempt_us: Option<i64>,
    #[serde(default)]
    pub last_outcome: Option<Outcome>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_snapshot: Option<Uuid>,
    #[serde(default)]
    pub last_success_us: Option<i64>,
    #[serde(default)]
    pub last_failure_us: Option<i64>,
    #[serde(default)]
    pub runs_ok: u64,
    #[serde(default)]
    pub runs_failed: u64,
    #[serde(default)]
    pub runs_busy: u64,
    #[serde(default)]
    pub pruned: u64,
    /// Why the last pruning stopped early, if it did.
    #[serde(default)]
    pub prune_error: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    volumes: BTreeMap<String, VolumeState>,
}

/// What is running now (not persisted).
#[derive(Debug, Default)]
struct Live {
    running: bool,
    retry_at: Option<Timestamp>,
}

/// A scheduled volume as `GET .../os-blocksnap-schedules` and `blocksnap
/// schedule list` show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduleStatus {
    pub volume_id: String,
    pub schedule: String,
    pub keep: Keep,
    pub prune_api_snapshots: bool,
    pub running: bool,
    /// The state (last run and its outcome, counters).
    #[serde(flatten)]
    pub state: VolumeState,
    /// When the next run is due (in the past: it runs now).
    pub next_run_us: Option<i64>,
}

/// Why the state file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot save the schedule state {path}; the last runs will be forgotten at the next start")]
pub struct SaveError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The daemon's scheduler.
#[derive(Debug)]
pub struct Scheduler {
    clock: Arc<dyn Clock>,
    tz: TimeZone,
    /// Scheduled volumes, in config order.
    entries: Vec<(String, VolumeSchedule)>,
    path: PathBuf,
    state: Mutex<BTreeMap<String, VolumeState>>,
    /// Held from copying the state to writing it, so the file is never
    /// replaced by an older copy.
    saving: Mutex<()>,
    live: Mutex<BTreeMap<String, Live>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn us(t: Timestamp) -> i64 {
    t.as_microsecond()
}

fn ts(us: i64) -> Timestamp {
    Timestamp::from_microsecond(us).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// How a run of [`Scheduler::run`] ended, for tests and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    pub volume: String,
    pub outcome: Outcome,
    pub snapshot: Option<Uuid>,
    pub error: Option<String>,
    /// Snapshots pruned after it.
    pub pruned: Vec<Uuid>,
}

impl Scheduler {
    /// The scheduler of `d`'s configured schedules, with the state of
    /// earlier runs from the state directory, on `clock` in time zone `tz`.
    /// A state file that cannot be read is logged and set aside: the
    /// volumes count as scheduled from now.
    pub fn new(d: &Daemon, clock: Arc<dyn Clock>, tz: TimeZone) -> Scheduler {
        let entries: Vec<(String, VolumeSchedule)> = d
            .config
            .volumes
            .iter()
            .filter_map(|v| Some((v.id.clone(), v.schedule.clone()?)))
            .collect();
        let path = d.config.state_dir.join(STATE_FILE);
        // Not through a symlink planted where the file would be.
        let read = |p: &std::path::Path| -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            let mut b = Vec::new();
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(p)?
                .read_to_end(&mut b)?;
            Ok(b)
        };
        let mut saved = match read(&path) {
            Ok(b) => match serde_json::from_slice::<StateFile>(&b) {
                Ok(f) => f.volumes,
                Err(e) => {
                    tracing::error!(
                        "the schedule state {} is not valid ({e}); starting from now (no catch-up runs)",
                        path.display()
                    );
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(
                    "cannot read the schedule state {}: {e}; starting from now (no catch-up runs)",
                    path.display()
                );
                BTreeMap::new()
            }
        };
        let now = us(clock.now());
        let mut state = BTreeMap::new();
        for (id, _) in &entries {
            let s = saved.remove(id).unwrap_or_else(|| VolumeState {
                since_us: now,
                ..VolumeState::default()
            });
            state.insert(id.clone(), s);
        }
        let s = Scheduler {
            clock,
            tz,
            entries,
            path,
            state: Mutex::new(state),
            saving: Mutex::new(()),
            live: Mutex::new(BTreeMap::new()),
        };
        if let Err(e) = s.save() {
            tracing::error!("{}", crate::util::error_chain(&e));
        }
        s
    }

    /// The daemon's time zone (the system's), or UTC if it cannot be told.
    pub fn local_time_zone() -> TimeZone {
        TimeZone::try_system().unwrap_or(TimeZone::UTC)
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Whether any volume is scheduled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ids of the scheduled volumes.
    pub fn volumes(&self) -> Vec<String> {
        self.entries.iter().map(|(id, _)| id.clone()).collect()
    }

    fn entry(&self, id: &str) -> Option<&VolumeSchedule> {
        self.entries.iter().find(|(v, _)| v == id).map(|(_, s)| s)
    }

    /// Write the state file (atomically, in the state directory).
    fn save(&self) -> Result<(), SaveError> {
        let _saving = lock(&self.saving);
        let file = StateFile {
            version: 1,
            volumes: lock(&self.state).clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("the schedule state serialises");
        crate::util::write_atomic(&self.path, &bytes).map_err(|source| SaveError {
            path: self.path.clone(),
            source,
        })
    }

    fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::error!("{}", crate::util::error_chain(&e));
        }
    }

    /// A copy of a volume's state.
    pub fn state_of(&self, id: &str) -> Option<VolumeState> {
        lock(&self.state).get(id).cloned()
    }

    /// When a volume's next run is due: the first due time after its last
    /// run (or after it was first scheduled); a busy volume's retry time.
    pub fn next_run(&self, id: &str) -> Option<Timestamp> {
        let sched = self.entry(id)?;
        let st = self.state_of(id)?;
        let after = ts(st.last_run_us.unwrap_or(st.since_us));
        let due = sched.schedule.next_after(after, &self.tz)?;
        match lock(&self.live).get(id).and_then(|l| l.retry_at) {
            Some(r) if r > due => Some(r),
            _ => Some(due),
        }
    }

    /// The volumes due now that are not running; each is marked running
    /// until [`Scheduler::run`] for it returns.
    pub fn take_due(&self) -> Vec<String> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for (id, _) in &self.entries {
            let Some(next) = self.next_run(id) else {
                continue;
            };
            let mut live = lock(&self.live);
            let l = live.entry(id.clone()).or_default();
            if next <= now && !l.running {
                l.running = true;
                out.push(id.clone());
            }
        }
        out
    }

    /// How long the loop may sleep before something can be due.
    fn sleep_hint(&self) -> Duration {
        if !self.clock.is_real() {
            return TEST_CLOCK_POLL;
        }
        let now = self.clock.now();
        // A running volume is not due again before its run ends, and then
        // its next due time is in the future (or, after a run longer than
        // the interval, found at the next wake-up).
        let running: Vec<String> = lock(&self.live)
            .iter()
            .filter(|(_, l)| l.running)
            .map(|(id, _)| id.clone())
            .collect();
        self.entries
            .iter()
            .filter(|(id, _)| !running.contains(id))
            .filter_map(|(id, _)| self.next_run(id))
            .map(|t| {
                let d = t.duration_since(now);
                Duration::try_from(d).unwrap_or(Duration::ZERO)
            })
            .min()
            .unwrap_or(MAX_SLEEP)
            .clamp(Duration::from_millis(100), MAX_SLEEP)
    }

    /// Run every volume that is due now, one after the other, waiting for
    /// each snapshot and its pruning (tests, and nothing else, call this;
    /// the daemon's loop runs volumes in parallel).
    pub fn tick(&self, d: &Arc<Daemon>) -> Vec<RunReport> {
        self.take_due()
            .into_iter()
            .map(|id| self.run(d, &id))
            .collect()
    }

    /// One run of a volume that [`Scheduler::take_due`] marked running:
    /// take a snapshot through the operations layer, wait for it, record
    /// the outcome, prune. Blocks until done.
    pub fn run(&self, d: &Arc<Daemon>, id: &str) -> RunReport {
        struct Running<'a>(&'a Scheduler, &'a str);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if let Some(l) = lock(&self.0.live).get_mut(self.1) {
                    l.running = false;
                }
            }
        }
        let _running = Running(self, id);
        let mut report = RunReport {
            volume: id.to_string(),
            outcome: Outcome::Error,
            snapshot: None,
            error: None,
            pruned: Vec::new(),
        };
        let Some(sched) = self.entry(id).cloned() else {
            report.error = Some(format!("volume {id} has no schedule"));
            return report;
        };
        if d.shutdown.load(Ordering::SeqCst) {
            report.outcome = Outcome::Busy;
            report.error = Some("the daemon is stopping".into());
            return report;
        }
        let now = self.clock.now();
        let run_us = us(now);
        let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let req = CreateSnapshot {
            volume_id: id.to_string(),
            name: Some(format!("scheduled-{stamp}")),
            description: Some(format!("taken by schedule \"{}\"", sched.schedule)),
            ..CreateSnapshot::default()
        };
        let started = d.ops().create_scheduled_snapshot(run_us, req);
        let (outcome, snapshot, error) = match started {
            Err(OpError::InUse { conflict, .. }) => {
                let cause = format!("the volume is busy ({conflict})");
                tracing::info!(
                    volume = %id,
                    "scheduled snapshot of volume {id} deferred by {}s: {cause}",
                    BUSY_RETRY.as_secs()
                );
                (Outcome::Busy, None, Some(cause))
            }
            Err(e) => (Outcome::Error, None, Some(crate::util::error_chain(&e))),
            Ok(s) => {
                let sid = s.record.id;
                match self.wait_for_take(d, sid) {
                    Ok(None) => (Outcome::Ok, Some(sid), None),
                    Ok(Some(cause)) => (Outcome::Error, Some(sid), Some(cause)),
                    Err(e) => (
                        Outcome::Error,
                        Some(sid),
                        Some(crate::util::error_chain(&e)),
                    ),
                }
            }
        };
        if outcome == Outcome::Error {
            tracing::warn!(
                volume = %id,
                "scheduled snapshot of volume {id} failed: {}",
                error.as_deref().unwrap_or("unknown cause")
            );
        } else if outcome == Outcome::Ok {
            tracing::info!(
                volume = %id,
                "scheduled snapshot {} of volume {id} taken (schedule \"{}\")",
                snapshot.map(|s| s.to_string()).unwrap_or_default(),
                sched.schedule
            );
        }
        {
            let mut st = lock(&self.state);
            let s = st.entry(id.to_string()).or_default();
            s.last_attempt_us = Some(run_us);
            s.last_outcome = Some(outcome);
            s.last_error = error.clone();
            match outcome {
                Outcome::Busy => s.runs_busy += 1,
                Outcome::Ok => {
                    s.last_run_us = Some(run_us);
                    s.last_snapshot = snapshot;
                    s.last_success_us = Some(run_us);
                    s.runs_ok += 1;
                }
                Outcome::Error => {
                    s.last_run_us = Some(run_us);
                    s.last_snapshot = snapshot;
                    s.last_failure_us = Some(run_us);
                    s.runs_failed += 1;
                }
            }
        }
        lock(&self.live).entry(id.to_string()).or_default().retry_at =
            (outcome == Outcome::Busy).then(|| now.checked_add(BUSY_RETRY).unwrap_or(now));
        self.save_logged();
        report.outcome = outcome;
        report.snapshot = snapshot;
        report.error = error;
        if outcome != Outcome::Busy {
            report.pruned = self.prune_volume(d, id);
        }
        report
    }

    /// Wait until snapshot `sid` is no longer being taken: `None` if it
    /// became available, else why not.
    fn wait_for_take(&self, d: &Daemon, sid: Uuid) -> Result<Option<String>, StoreError> {
        let mut pause = Duration::from_millis(1);
        loop {
            match d.store().snapshot(sid)? {
                None => return Ok(Some(format!("snapshot {sid} disappeared"))),
                Some(r) if r.status == SnapStatus::Creating => {}
                Some(r) if r.status == SnapStatus::Available => return Ok(None),
                Some(r) => {
                    return Ok(Some(r.error.unwrap_or_else(|| {
                        format!("snapshot {sid} ended {}", r.status.as_str())
                    })))
                }
            }
            if d.shutdown.load(Ordering::SeqCst) && d.running() == 0 {
                return Ok(Some(
                    "the daemon stopped before the snapshot finished".into(),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Prune every scheduled volume (the daemon's start), each while
    /// marked running.
    pub fn prune_all(&self, d: &Arc<Daemon>) {
        for id in self.volumes() {
            {
                let mut live = lock(&self.live);
                let l = live.entry(id.clone()).or_default();
                if l.running {
                    continue;
                }
                l.running = true;
            }
            self.prune_volume(d, &id);
            if let Some(l) = lock(&self.live).get_mut(&id) {
                l.running = false;
            }
        }
    }

    /// Which snapshots of a volume the keep rules prune now.
    pub fn prune_plan(&self, d: &Daemon, id: &str) -> Result<Vec<Uuid>, StoreError> {
        let Some(sched) = self.entry(id) else {
            return Ok(Vec::new());
        };
        if sched.keep.is_empty() {
            return Ok(Vec::new());
        }
        let snaps = d.store().snapshots(&SnapshotQuery {
            volume_id: Some(id.to_string()),
            ..SnapshotQuery::default()
        })?;
        let candidates: Vec<Candidate> = snaps
            .iter()
            .filter(|r| r.status == SnapStatus::Available)
            .filter(|r| r.scheduled_us.is_some() || sched.prune_api_snapshots)
            .map(|r| Candidate {
                id: r.id,
                at: ts(r.scheduled_us.unwrap_or(r.created_us)),
                scheduled: r.scheduled_us.is_some(),
            })
            .collect();
        let mut plan = to_prune(&candidates, &sched.keep, &self.tz);
        // Scheduled snapshots that failed hold no data: once a newer
        // scheduled snapshot is available their record has served.
        let newest_ok = candidates
            .iter()
            .filter(|c| c.scheduled)
            .map(|c| c.at)
            .max();
        if let Some(newest) = newest_ok {
            plan.extend(
                snaps
                    .iter()
                    .filter(|r| r.status == SnapStatus::Error)
                    .filter(|r| r.scheduled_us.is_some_and(|t| ts(t) < newest))
                    .map(|r| r.id),
            );
        }
        Ok(plan)
    }

    /// Delete what the keep rules no longer keep, one snapshot at a time
    /// (each delete claims the volume). Stops at the first refusal (the
    /// volume is busy: the next run prunes) or failure, and records why.
    fn prune_volume(&self, d: &Arc<Daemon>, id: &str) -> Vec<Uuid> {
        let plan = match self.prune_plan(d, id) {
            Ok(p) => p,
            Err(e) => {
                let cause = crate::util::error_chain(&e);
                tracing::warn!(volume = %id, "pruning volume {id} failed: {cause}");
                self.record_prune(id, 0, Some(cause));
                return Vec::new();
            }
        };
        let ops = d.ops();
        let mut done = Vec::new();
        let mut stopped = None;
        for sid in plan {
            if d.shutdown.load(Ordering::SeqCst) {
                break;
            }
            match ops.prune_snapshot(sid) {
                Ok(()) => {}
                // Gone or changed meanwhile: nothing to prune.
                Err(OpError::SnapshotNotFound(_) | OpError::SnapshotNotDeletable) => continue,
                Err(e) => {
                    stopped = Some(format!(
                        "snapshot {sid} not pruned: {}",
                        crate::util::error_chain(&e)
                    ));
                    break;
                }
            }
            match self.wait_for_delete(d, sid) {
                Ok(None) => {
                    tracing::info!(volume = %id, "pruned snapshot {sid} of volume {id}");
                    done.push(sid);
                }
                Ok(Some(cause)) => {
                    stopped = Some(cause);
                    break;
                }
                Err(e) => {
                    stopped = Some(crate::util::error_chain(&e));
                    break;
                }
            }
        }
        if let Some(cause) = &stopped {
            tracing::warn!(volume = %id, "pruning volume {id} stopped: {cause}");
        }
        self.record_prune(id, done.len() as u64, stopped);
        done
    }

    fn record_prune(&self, id: &str, n: u64, error: Option<String>) {
        {
            let mut st = lock(&self.state);
            let s = st.entry(id.to_string()).or_default();
            s.pruned += n;
            s.prune_error = error;
        }
        self.save_logged();
    }

    /// Wait until a pruned snapshot's record is gone: `None`, or why not.
    fn wait_for_delete(&self, d: &Daemon, sid: Uuid) -> Result<Option<String>, StoreError> {
        let mut pause = Duration::from_millis(1);
        loop {
            match d.store().snapshot(sid)? {
                None => return Ok(None),
                Some(r) if r.status == SnapStatus::Deleting => {}
                Some(r) => {
                    return Ok(Some(format!(
                        "deleting snapshot {sid} ended {}{}",
                        r.status.as_str(),
                        r.error.map(|e| format!(": {e}")).unwrap_or_default()
                    )))
                }
            }
            if d.shutdown.load(Ordering::SeqCst) && d.running() == 0 {
                return Ok(Some("the daemon stopped before the delete finished".into()));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Every scheduled volume's status, in config order.
    pub fn status(&self) -> Vec<ScheduleStatus> {
        self.entries
            .iter()
            .map(|(id, s)| {
                let running = lock(&self.live).get(id).is_some_and(|l| l.running);
                ScheduleStatus {
                    volume_id: id.clone(),
                    schedule: s.schedule.to_string(),
                    keep: s.keep,
                    prune_api_snapshots: s.prune_api_snapshots,
                    running,
                    state: self.state_of(id).unwrap_or_default(),
                    next_run_us: self.next_run(id).map(us),
                }
            })
            .collect()
    }

    /// Metrics of the volumes in `visible`, in the Prometheus text format.
    pub fn render_metrics(&self, visible: &[String]) -> String {
        use std::fmt::Write;
        let rows: Vec<ScheduleStatus> = self
            .status()
            .into_iter()
            .filter(|s| visible.contains(&s.volume_id))
            .collect();
        let mut out = String::new();
        let secs = |u: Option<i64>| u.map_or(0.0, |u| u as f64 / 1e6);
        let gauge =
            |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ScheduleStatus) -> f64| {
                let _ = writeln!(out, "# HELP blocksnap_{name} {help}");
                let _ = writeln!(out, "# TYPE blocksnap_{name} gauge");
                for r in &rows {
                    let _ = writeln!(
                        out,
                        "blocksnap_{name}{{volume=\"{}\"}} {}",
                        r.volume_id,
                        get(r)
                    );
                }
            };
        gauge(
            &mut out,
            "schedule_last_success_timestamp_seconds",
            "Unix time of the last scheduled run whose snapshot became available (0: none).",
            &|r| secs(r.state.last_success_us),
        );
        gauge(
            &mut out,
            "schedule_last_failure_timestamp_seconds",
            "Unix time of the last scheduled run that failed (0: none).",
            &|r| secs(r.state.last_failure_us),
        );
        gauge(
            &mut out,
            "schedule_next_run_timestamp_seconds",
            "Unix time the next scheduled run is due.",
            &|r| secs(r.next_run_us),
        );
        let _ = writeln!(
            out,
            "# HELP blocksnap_schedule_runs_total Scheduled runs by result (busy: deferred, the volume was in use).\n# TYPE blocksnap_schedule_runs_total counter"
        );
        for r in &rows {
            for (result, n) in [
                ("ok", r.state.runs_ok),
                ("error", r.state.runs_failed),
                ("busy", r.state.runs_busy),
            ] {
                let _ = writeln!(
                    out,
                    "blocksnap_schedule_runs_total{{volume=\"{}\",result=\"{result}\"}} {n}",
                    r.volume_id
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP blocksnap_schedule_pruned_total Snapshots deleted by keep rules.\n# TYPE blocksnap_schedule_pruned_total counter"
        );
        for r in &rows {
            let _ = writeln!(
                out,
                "blocksnap_schedule_pruned_total{{volume=\"{}\"}} {}",
                r.volume_id, r.state.pruned
            );
        }
        out
    }
}

/// Set up the scheduler of `d` (see [`Scheduler::new`]) and make it the
/// one the API shows. `None` if no volume is scheduled.
pub fn install(d: &Arc<Daemon>, clock: Arc<dyn Clock>, tz: TimeZone) -> Option<Arc<Scheduler>> {
    let s = Arc::new(Scheduler::new(d, clock, tz));
    if s.is_empty() {
        return None;
    }
    // Only the first scheduler of a daemon is shown (there is only one).
    let _ = d.scheduler.set(s.clone());
    Some(s)
}

/// The scheduler's loop: prune once, then run each volume when it is due
/// (each on the blocking pool, in parallel with other volumes), until the
/// daemon stops.
pub async fn run_loop(d: Arc<Daemon>, s: Arc<Scheduler>) {
    {
        let (d, s) = (d.clone(), s.clone());
        let _ = tokio::task::spawn_blocking(move || s.prune_all(&d)).await;
    }
    tracing::info!(
        volumes = s.entries.len(),
        "scheduler started for {} volume(s)",
        s.entries.len()
    );
    loop {
        if d.shutdown.load(Ordering::SeqCst) {
            break;
        }
        for id in s.take_due() {
            let (d, s) = (d.clone(), s.clone());
            tokio::task::spawn_blocking(move || s.run(&d, &id));
        }
        tokio::time::sleep(s.sleep_hint()).await;
    }
}
