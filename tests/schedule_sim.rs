//! Scheduled snapshots and retention on the simulated host (daemon::sim)
//! with a test clock: days of schedules in a second, catch-up after
//! downtime, busy volumes, failures, pruning through the delete
//! operation. No root, no devices, no sleeping for hours.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use blocksnap::clock::{Clock, TestClock};
use blocksnap::config::Config;
use blocksnap::daemon::catalog::{SnapStatus, SnapshotRecord};
use blocksnap::daemon::ops::{Caller, CreateSnapshot};
use blocksnap::daemon::schedule::{self, Outcome, Scheduler};
use blocksnap::daemon::sim::{Action, SimEngine, Step};
use blocksnap::daemon::store::{MemStore, SnapshotQuery, Store};
use blocksnap::daemon::Daemon;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

const T1: &str = "tenant-one";

/// A daemon on the simulator with scheduled volumes:
/// - `hourly`: schedule hourly, keep { hourly = 6, daily = 3 }
/// - `quarter`: every 15 minutes, keep { hourly = 2 }, API snapshots pruned too
/// - `plain`: no schedule
struct World {
    _dir: tempfile::TempDir,
    config: Config,
    sim: Arc<SimEngine>,
    store: Arc<MemStore>,
    clock: Arc<TestClock>,
    d: Option<Arc<Daemon>>,
    sched: Option<Arc<Scheduler>>,
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

impl World {
    fn new(start: Timestamp) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut vols = String::new();
        for (v, extra) in [
            (
                "hourly",
                "schedule = \"hourly\"\nkeep = { hourly = 6, daily = 3 }\n",
            ),
            (
                "quarter",
                "schedule = \"every 15 minutes\"\nkeep = { hourly = 2 }\nprune_api_snapshots = true\n",
            ),
            ("plain", ""),
        ] {
            let dev = dir.path().join(format!("{v}.img"));
            std::fs::write(&dev, b"sim").unwrap();
            vols.push_str(&format!(
                "[[volumes]]\nid = \"{v}\"\ndevice = \"{}\"\nquiesce = \"none\"\n{extra}\n",
                dev.display()
            ));
        }
        let text = format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n[[tokens]]\ntenant = \"{T1}\"\ntoken = \"token-one\"\n\n{vols}",
            dir.path().join("sock").display(),
            dir.path().join("state").display(),
        );
        let config = Config::parse(&dir.path().join("blocksnap.toml"), &text).unwrap();
        let sim = SimEngine::new();
        for (i, v) in config.volumes.iter().enumerate() {
            sim.add_device(&v.device, (0..8).map(|b| b + 100 * i as u64).collect());
        }
        let mut w = World {
            _dir: dir,
            config,
            sim,
            store: Arc::new(MemStore::new()),
            clock: Arc::new(TestClock::new(start)),
            d: None,
            sched: None,
        };
        w.start();
        w
    }

    /// Start the daemon and its scheduler (which prunes at once, as the
    /// daemon's loop does first).
    fn start(&mut self) {
        let store = self.store.clone();
        let d = Daemon::start(
            self.config.clone(),
            self.sim.clone(),
            Box::new(move |_| Ok(store as Arc<dyn Store>)),
        )
        .unwrap();
        let s = schedule::install(&d, self.clock.clone(), TimeZone::UTC).unwrap();
        s.prune_all(&d);
        self.d = Some(d);
        self.sched = Some(s);
    }

    /// The daemon stops (its jobs finish first).
    fn stop(&mut self) {
        let d = self.d.take().unwrap();
        self.sched = None;
        assert!(d.wait_idle(Duration::from_secs(10)));
        for _ in 0..200 {
            if Arc::strong_count(&d) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(d);
    }

    fn d(&self) -> &Arc<Daemon> {
        self.d.as_ref().unwrap()
    }
    fn s(&self) -> &Arc<Scheduler> {
        self.sched.as_ref().unwrap()
    }

    /// Set the clock and run what is due.
    fn at(&self, t: Timestamp) -> Vec<schedule::RunReport> {
        self.clock.set(t);
        let r = self.s().tick(self.d());
        assert!(self.d().wait_idle(Duration::from_secs(10)));
        r
    }

    fn snapshots(&self, v: &str) -> Vec<SnapshotRecord> {
        self.store
            .snapshots(&SnapshotQuery {
                volume_id: Some(v.to_string()),
                ..SnapshotQuery::default()
            })
            .unwrap()
    }

    /// Times of the available scheduled snapshots of `v`, oldest first.
    fn scheduled_times(&self, v: &str) -> Vec<String> {
        let mut t: Vec<String> = self
            .snapshots(v)
            .iter()
            .filter(|r| r.status == SnapStatus::Available)
            .filter_map(|r| r.scheduled_us)
            .map(|u| Timestamp::from_microsecond(u).unwrap().to_string())
            .collect();
        t.sort();
        t
    }

    /// The catalog and the (simulated) chain hold the same snapshots.
    fn check_chain(&self, v: &str) {
        let chain: BTreeSet<_> = self
            .sim
            .snapshots(&self.d().chain_path(v))
            .into_iter()
            .map(|s| s.id)
            .collect();
        let catalog: BTreeSet<_> = self
            .snapshots(v)
            .into_iter()
            .filter(|r| r.status == SnapStatus::Available)
            .map(|r| r.id)
            .collect();
        assert_eq!(chain, catalog, "chain and catalog of {v} differ");
    }
}

fn runs_of(r: &[schedule::RunReport], v: &str) -> Vec<Outcome> {
    r.iter()
        .filter(|x| x.volume == v)
        .map(|x| x.outcome)
        .collect()
}

#[test]
fn nothing_runs_before_the_first_due_time_and_then_exactly_once() {
    let w = World::new(ts("2026-01-01T00:07:00Z"));
    assert!(w.at(ts("2026-01-01T00:14:59Z")).is_empty());
    assert_eq!(w.s().next_run("hourly"), Some(ts("2026-01-01T01:00:00Z")));
    assert_eq!(w.s().next_run("quarter"), Some(ts("2026-01-01T00:15:00Z")));
    assert_eq!(w.s().next_run("plain"), None);
    let r = w.at(ts("2026-01-01T00:15:00Z"));
    assert_eq!(runs_of(&r, "quarter"), [Outcome::Ok]);
    assert!(runs_of(&r, "hourly").is_empty());
    // The same instant again: nothing more.
    assert!(w.at(ts("2026-01-01T00:15:00Z")).is_empty());
    assert!(w.at(ts("2026-01-01T00:29:59Z")).is_empty());
    let snaps = w.snapshots("quarter");
    assert_eq!(snaps.len(), 1);
    let s = &snaps[0];
    assert_eq!(s.status, SnapStatus::Available);
    assert_eq!(s.tenant, None, "scheduled snapshots belong to the volume");
    assert_eq!(
        s.scheduled_us,
        Some(ts("2026-01-01T00:15:00Z").as_microsecond())
    );
    assert_eq!(s.display_name, "scheduled-2026-01-01T00:15:00Z");
    let st = w.s().state_of("quarter").unwrap();
    assert_eq!(st.last_outcome, Some(Outcome::Ok));
    assert_eq!(st.last_snapshot, Some(s.id));
    assert_eq!(st.runs_ok, 1);
    assert!(w.snapshots("plain").is_empty());
}

#[test]
fn downtime_across_five_due_times_makes_one_catch_up_run() {
    let mut w = World::new(ts("2026-01-01T00:30:00Z"));
    assert_eq!(
        runs_of(&w.at(ts("2026-01-01T01:00:00Z")), "hourly"),
        [Outcome::Ok]
    );
    w.stop();
    // Down from 01:00 to 06:30: 02:00, 03:00, 04:00, 05:00 and 06:00 missed.
    w.clock.set(ts("2026-01-01T06:30:00Z"));
    w.start();
    assert_eq!(
        w.s().state_of("hourly").unwrap().last_run_us,
        Some(ts("2026-01-01T01:00:00Z").as_microsecond()),
        "the last run survives a restart"
    );
    let r = w.at(ts("2026-01-01T06:30:00Z"));
    assert_eq!(runs_of(&r, "hourly"), [Outcome::Ok], "one catch-up run");
    assert!(runs_of(&w.at(ts("2026-01-01T06:30:01Z")), "hourly").is_empty());
    assert!(runs_of(&w.at(ts("2026-01-01T06:59:59Z")), "hourly").is_empty());
    assert_eq!(
        w.scheduled_times("hourly"),
        ["2026-01-01T01:00:00Z", "2026-01-01T06:30:00Z"]
    );
    assert_eq!(w.s().next_run("hourly"), Some(ts("2026-01-01T07:00:00Z")));
    assert_eq!(
        runs_of(&w.at(ts("2026-01-01T07:00:00Z")), "hourly"),
        [Outcome::Ok]
    );
    // Nothing in the past is due twice even after another restart.
    w.stop();
    w.start();
    assert!(runs_of(&w.at(ts("2026-01-01T07:00:00Z")), "hourly").is_empty());
}

#[test]
fn days_of_hourly_runs_keep_what_the_rules_keep() {
    let w = World::new(ts("2030-01-01T00:00:00Z"));
    let hourly_dev = w.config.volumes[0].device.clone();
    // An API snapshot of each volume (made at the real time, before any
    // of the simulated 2030 runs).
    let api_hourly = w
        .d()
        .ops()
        .create_snapshot(
            &Caller::new(T1),
            CreateSnapshot {
                volume_id: "hourly".into(),
                ..CreateSnapshot::default()
            },
        )
        .unwrap()
        .record
        .id;
    let api_quarter = w
        .d()
        .ops()
        .create_snapshot(
            &Caller::new(T1),
            CreateSnapshot {
                volume_id: "quarter".into(),
                ..CreateSnapshot::default()
            },
        )
        .unwrap()
        .record
        .id;
    assert!(w.d().wait_idle(Duration::from_secs(10)));
    // Four days, every 15 minutes, the device changing each hour.
    let mut t = ts("2030-01-01T00:15:00Z");
    let end = ts("2030-01-05T00:00:00Z");
    let mut hourly_runs = 0;
    while t <= end {
        if t.as_second() % 3600 == 0 {
            let n = (t.as_second() / 3600) as u64;
            w.sim
                .write_device(&hourly_dev, (0..8).map(|b| b * 7 + n).collect());
        }
        let r = w.at(t);
        for x in &r {
            assert_eq!(x.outcome, Outcome::Ok, "{x:?}");
        }
        hourly_runs += runs_of(&r, "hourly").len();
        // Never more than the rules allow, plus the run just taken.
        assert!(w.scheduled_times("hourly").len() <= 6 + 3 + 1);
        t = t.checked_add(SignedDuration::from_mins(15)).unwrap();
    }
    assert_eq!(hourly_runs, 96);
    // The last 6 hours, and the newest of each of the 3 newest days.
    assert_eq!(
        w.scheduled_times("hourly"),
        [
            "2030-01-03T23:00:00Z",
            "2030-01-04T19:00:00Z",
            "2030-01-04T20:00:00Z",
            "2030-01-04T21:00:00Z",
            "2030-01-04T22:00:00Z",
            "2030-01-04T23:00:00Z",
            "2030-01-05T00:00:00Z",
        ]
    );
    // The API snapshot of `hourly` stays; that of `quarter` (whose config
    // prunes API snapshots too, and which is older than everything) went.
    assert!(w.store.snapshot(api_hourly).unwrap().is_some());
    assert!(w.store.snapshot(api_quarter).unwrap().is_none());
    // `quarter`: the newest of the last 2 hours.
    assert_eq!(
        w.scheduled_times("quarter"),
        ["2030-01-04T23:45:00Z", "2030-01-05T00:00:00Z"]
    );
    let st = w.s().state_of("hourly").unwrap();
    assert_eq!(st.runs_ok, 96);
    assert_eq!(st.pruned, 96 - 7);
    assert_eq!(st.prune_error, None);
    // Deletes merged into their successors: the chain holds exactly what
    // the catalog lists, and the newest snapshot still reads as the device.
    w.check_chain("hourly");
    w.check_chain("quarter");
    let newest = w.s().state_of("hourly").unwrap().last_snapshot.unwrap();
    let blocks = w
        .sim
        .snapshots(&w.d().chain_path("hourly"))
        .into_iter()
        .find(|s| s.id == newest)
        .unwrap()
        .blocks;
    assert_eq!(blocks, w.sim.device_blocks(&hourly_dev).unwrap());
    assert!(w.sim.violations().is_empty(), "{:?}", w.sim.violations());
}

#[test]
fn a_busy_volume_is_deferred_never_overlapped() {
    let w = World::new(ts("2026-01-01T00:30:00Z"));
    // An API snapshot of `hourly` is held mid-scan.
    w.sim.gate("held");
    w.sim.inject(
        Step::TakeScan,
        Some("hourly"),
        Action::Gate("held".into()),
        1,
    );
    let api = w
        .d()
        .ops()
        .create_snapshot(
            &Caller::new(T1),
            CreateSnapshot {
                volume_id: "hourly".into(),
                ..CreateSnapshot::default()
            },
        )
        .unwrap()
        .record
        .id;
    assert!(w.sim.wait_at_gate("held", 1, Duration::from_secs(5)));
    w.clock.set(ts("2026-01-01T01:00:00Z"));
    let r = w.s().tick(w.d());
    assert_eq!(runs_of(&r, "hourly"), [Outcome::Busy]);
    let st = w.s().state_of("hourly").unwrap();
    assert_eq!(st.last_outcome, Some(Outcome::Busy));
    assert!(st.last_error.as_deref().unwrap().contains("busy"), "{st:?}");
    assert_eq!(st.last_run_us, None, "a busy run does not count as a run");
    assert_eq!(w.s().next_run("hourly"), Some(ts("2026-01-01T01:01:00Z")));
    // Still busy a minute later, and across two more due times.
    w.clock.set(ts("2026-01-01T01:00:59Z"));
    assert!(runs_of(&w.s().tick(w.d()), "hourly").is_empty());
    w.clock.set(ts("2026-01-01T03:10:00Z"));
    assert_eq!(runs_of(&w.s().tick(w.d()), "hourly"), [Outcome::Busy]);
    assert_eq!(w.snapshots("hourly").len(), 1, "only the API snapshot");
    w.sim.open_gate("held");
    assert!(w.d().wait_idle(Duration::from_secs(10)));
    // Not before the retry time; then one run for all that was missed.
    assert!(runs_of(&w.at(ts("2026-01-01T03:10:30Z")), "hourly").is_empty());
    assert_eq!(
        runs_of(&w.at(ts("2026-01-01T03:11:00Z")), "hourly"),
        [Outcome::Ok]
    );
    assert!(runs_of(&w.at(ts("2026-01-01T03:59:00Z")), "hourly").is_empty());
    let st = w.s().state_of("hourly").unwrap();
    assert_eq!((st.runs_ok, st.runs_busy), (1, 2));
    assert_eq!(w.s().next_run("hourly"), Some(ts("2026-01-01T04:00:00Z")));
    assert_eq!(
        w.store.snapshot(api).unwrap().unwrap().status,
        SnapStatus::Available
    );
    assert!(w.sim.violations().is_empty(), "{:?}", w.sim.violations());
}

#[test]
fn a_failed_run_is_recorded_and_waits_for_the_next_due_time() {
    let w = World::new(ts("2026-01-01T00:30:00Z"));
    w.sim.inject(Step::Take, Some("hourly"), Action::Fail, 1);
    let r = w.at(ts("2026-01-01T01:00:00Z"));
    let run = r.iter().find(|x| x.volume == "hourly").unwrap();
    assert_eq!(run.outcome, Outcome::Error);
    let cause = run.error.clone().unwrap();
    assert!(!cause.is_empty());
    let st = w.s().state_of("hourly").unwrap();
    assert_eq!(st.last_outcome, Some(Outcome::Error));
    assert_eq!(st.last_error.as_deref(), Some(cause.as_str()));
    assert_eq!(
        st.last_failure_us,
        Some(ts("2026-01-01T01:00:00Z").as_microsecond())
    );
    assert_eq!(st.last_success_us, None);
    // No retry storm: the next run is the next due time.
    assert!(runs_of(&w.at(ts("2026-01-01T01:30:00Z")), "hourly").is_empty());
    assert_eq!(
        runs_of(&w.at(ts("2026-01-01T02:00:00Z")), "hourly"),
        [Outcome::Ok]
    );
    // The failed record is pruned once a newer scheduled one is available.
    let failed = run.snapshot.unwrap();
    assert!(w.store.snapshot(failed).unwrap().is_none());
    let st = w.s().state_of("hourly").unwrap();
    assert_eq!((st.runs_ok, st.runs_failed), (1, 1));
    // Metrics show both timestamps.
    let m = w.s().render_metrics(&["hourly".to_string()]);
    assert!(
        m.contains(&format!(
            "blocksnap_schedule_last_failure_timestamp_seconds{{volume=\"hourly\"}} {}",
            ts("2026-01-01T01:00:00Z").as_second()
        )),
        "{m}"
    );
    assert!(m.contains(&format!(
        "blocksnap_schedule_last_success_timestamp_seconds{{volume=\"hourly\"}} {}",
        ts("2026-01-01T02:00:00Z").as_second()
    )));
    assert!(m.contains("blocksnap_schedule_runs_total{volume=\"hourly\",result=\"error\"} 1"));
    assert!(!m.contains("volume=\"quarter\""), "only visible volumes");
}

#[test]
fn a_lost_state_file_means_no_catch_up_but_no_failure() {
    let mut w = World::new(ts("2026-01-01T00:30:00Z"));
    w.at(ts("2026-01-01T01:00:00Z"));
    w.stop();
    let state = w.config.state_dir.join(schedule::STATE_FILE);
    std::fs::write(&state, b"{ not json").unwrap();
    w.clock.set(ts("2026-01-01T05:30:00Z"));
    w.start();
    assert!(runs_of(&w.at(ts("2026-01-01T05:30:00Z")), "hourly").is_empty());
    assert_eq!(
        runs_of(&w.at(ts("2026-01-01T06:00:00Z")), "hourly"),
        [Outcome::Ok]
    );
    // And the file is whole again.
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"hourly\""), "{text}");
    assert!(w.clock.now() == ts("2026-01-01T06:00:00Z"));
}

#[test]
fn stricter_keep_rules_prune_at_the_next_start() {
    let mut w = World::new(ts("2026-01-01T00:30:00Z"));
    for h in 1..=10 {
        let r = w.at(ts(&format!("2026-01-01T{h:02}:00:00Z")));
        assert_eq!(runs_of(&r, "hourly"), [Outcome::Ok]);
    }
    // hourly = 6, daily = 3: the last six hours.
    assert_eq!(w.scheduled_times("hourly").len(), 6);
    assert_eq!(w.s().state_of("hourly").unwrap().pruned, 4);
    w.stop();
    let s = w.config.volumes[0].schedule.as_mut().unwrap();
    s.keep = schedule::Keep {
        hourly: 2,
        ..schedule::Keep::default()
    };
    w.start();
    // Pruned at start, before any run.
    assert_eq!(
        w.scheduled_times("hourly"),
        ["2026-01-01T09:00:00Z", "2026-01-01T10:00:00Z"]
    );
    assert_eq!(w.s().state_of("hourly").unwrap().pruned, 8);
    w.check_chain("hourly");
}
