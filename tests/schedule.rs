//! Scheduled snapshots on the real daemon: a loop device, blocksnapd on a
//! real socket, its schedule clock driven through BLOCKSNAP_TEST_CLOCK_FILE
//! (so an hourly schedule runs in seconds), the API, the CLI, the metrics,
//! a restart across missed due times, pruning.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const VOL: &str = "sched-vol";
const OTHER: &str = "other-tenants-vol";

fn set_clock(file: &Path, t: &str) {
    std::fs::write(file, t).unwrap();
}

fn schedules(d: &DaemonProc) -> Vec<Value> {
    let r = d.call("GET", "/os-blocksnap-schedules", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["schedules"].as_array().unwrap().clone()
}

fn schedule_of(d: &DaemonProc, v: &str) -> Value {
    schedules(d)
        .into_iter()
        .find(|s| s["volume_id"] == v)
        .unwrap_or_else(|| panic!("no schedule for {v}"))
}

/// Wait until the volume's schedule has `n` successful runs and none running.
fn wait_runs(d: &DaemonProc, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = schedule_of(d, VOL);
        if s["runs"]["ok"].as_u64() == Some(n) && s["running"] == false {
            return s;
        }
        assert!(
            s["runs"]["ok"].as_u64().unwrap() <= n,
            "more runs than expected: {s}"
        );
        assert!(
            Instant::now() < deadline,
            "no run {n} in time: {s}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshot_ids(d: &DaemonProc) -> Vec<String> {
    let r = d.call("GET", &format!("/snapshots/detail?volume_id={VOL}"), None);
    r.json()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_hourly_schedule_runs_catches_up_once_and_prunes_on_the_real_daemon() {
    if !root("an_hourly_schedule_runs_catches_up_once_and_prunes_on_the_real_daemon") {
        return;
    }
    let vol = Loop::new(16 << 20);
    write_at(&vol.dev, 0, &random_bytes(7, 1 << 20));
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = clock_dir.path().join("clock");
    set_clock(&clock, "2030-01-01T00:30:00Z");
    let other_img = clock_dir.path().join("other.img");
    make_image(&other_img, 1 << 20, 3);
    let volumes = format!(
        "{}{}",
        volume_toml(
            VOL,
            &vol.dev,
            "quiesce = \"none\"\nschedule = \"hourly\"\nkeep = { hourly = 2 }\n"
        ),
        volume_toml(
            OTHER,
            &other_img,
            &format!("tenant = \"{TENANT2}\"\nschedule = \"daily\"\n")
        ),
    );
    let clock_env = clock.display().to_string();
    let mut d = DaemonProc::start_with_env(
        "",
        &volumes,
        // Local time UTC, whatever the host's zone: "hourly" is then due
        // on the UTC hours this test expects.
        &[
            ("BLOCKSNAP_TEST_CLOCK_FILE", clock_env.as_str()),
            ("TZ", "UTC"),
        ],
    );

    // Tenant-scoped: the first tenant sees only its volume's schedule.
    let list = schedules(&d);
    assert_eq!(list.len(), 1, "{list:?}");
    let s = &list[0];
    assert_eq!(s["volume_id"], VOL);
    assert_eq!(s["schedule"], "hourly");
    assert_eq!(s["keep"]["hourly"], 2);
    assert_eq!(s["last_result"], Value::Null);
    assert_eq!(s["next_run_at"], "2030-01-01T01:00:00.000000");
    let other = http(
        &d.socket,
        "GET",
        &format!("/v1/{TENANT2}/os-blocksnap-schedules"),
        Some(TOKEN2),
        None,
    );
    assert_eq!(other.json()["schedules"].as_array().unwrap().len(), 2);
    // The same view under the Cinder versions' prefixes.
    for v in ["v2", "v3"] {
        let r = http(
            &d.socket,
            "GET",
            &format!("/{v}/{TENANT}/os-blocksnap-schedules"),
            Some(TOKEN),
            None,
        );
        assert_eq!(r.status, 200, "{v}: {}", r.body);
        assert_eq!(r.json()["schedules"].as_array().unwrap().len(), 1);
    }
    // Another tenant's URL with this tenant's token is refused.
    let r = http(
        &d.socket,
        "GET",
        &format!("/v1/{TENANT2}/os-blocksnap-schedules"),
        Some(TOKEN),
        None,
    );
    assert_ne!(r.status, 200, "{}", r.body);

    // The first due time.
    set_clock(&clock, "2030-01-01T01:00:00Z");
    let s = wait_runs(&d, 1);
    assert_eq!(s["last_result"], "ok");
    assert_eq!(s["last_run_at"], "2030-01-01T01:00:00.000000");
    assert_eq!(s["next_run_at"], "2030-01-01T02:00:00.000000");
    let first = s["last_snapshot_id"].as_str().unwrap().to_string();
    let snap = d.wait_snapshot(&first);
    assert_eq!(snap["status"], "available");
    assert_eq!(snap["display_name"], "scheduled-2030-01-01T01:00:00Z");
    let restored = restore_image(&d.chain(VOL), &first);
    assert_same(
        &read_all(&restored.image),
        &read_all(&vol.dev),
        "scheduled snapshot",
    );

    // The CLI shows the same.
    let args = |json: bool| {
        let mut a = vec![
            "schedule".to_string(),
            "list".into(),
            "--socket".into(),
            d.socket.display().to_string(),
            "--tenant".into(),
            TENANT.into(),
            "--token".into(),
            TOKEN.into(),
        ];
        if json {
            a.push("--json".into());
        }
        a
    };
    let out = cli_ok(args(true));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["last_snapshot_id"], first.as_str());
    assert_eq!(v[0]["next_run_at"], "2030-01-01T02:00:00.000000");
    let table = cli_ok(args(false));
    let row = table.lines().find(|l| l.starts_with(VOL)).expect(&table);
    for want in [
        "hourly",
        "hourly=2",
        "2030-01-01T01:00:00Z",
        " ok ",
        "2030-01-01T02:00:00Z",
        first.as_str(),
    ] {
        assert!(row.contains(want), "{want:?} missing in {row:?}");
    }

    // Down from 01:30 to 06:30: five due times missed, one catch-up run.
    set_clock(&clock, "2030-01-01T01:30:00Z");
    d.stop();
    write_at(&vol.dev, 4096, &random_bytes(8, 8192));
    set_clock(&clock, "2030-01-01T06:30:00Z");
    d.spawn();
    let s = wait_runs(&d, 2);
    assert_eq!(s["last_run_at"], "2030-01-01T06:30:00.000000");
    assert_eq!(s["next_run_at"], "2030-01-01T07:00:00.000000");
    // Nothing more until the next due time (the loop polls a test clock
    // every 100 ms: give it ten chances).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(schedule_of(&d, VOL)["runs"]["ok"], 2);
    assert_eq!(snapshot_ids(&d).len(), 2);

    // 07:00: a third run; keep hourly = 2 prunes the 01:00 one.
    set_clock(&clock, "2030-01-01T07:00:00Z");
    let s = wait_runs(&d, 3);
    let deadline = Instant::now() + Duration::from_secs(20);
    while schedule_of(&d, VOL)["pruned"] != 1 {
        assert!(Instant::now() < deadline, "not pruned: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids = snapshot_ids(&d);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&first));
    assert_eq!(
        d.call("GET", &format!("/snapshots/{first}"), None).status,
        404
    );
    // The newest still restores to the device (the deleted one was merged).
    let newest = s["last_snapshot_id"].as_str().unwrap();
    let restored = restore_image(&d.chain(VOL), newest);
    assert_same(
        &read_all(&restored.image),
        &read_all(&vol.dev),
        "newest after pruning",
    );

    // Metrics and the log.
    let metrics = http(&d.socket, "GET", "/metrics", Some(TOKEN), None).body;
    for want in [
        format!(
            "blocksnap_schedule_last_success_timestamp_seconds{{volume=\"{VOL}\"}} {}",
            "2030-01-01T07:00:00Z"
                .parse::<jiff::Timestamp>()
                .unwrap()
                .as_second()
        ),
        format!("blocksnap_schedule_runs_total{{volume=\"{VOL}\",result=\"ok\"}} 3"),
        format!("blocksnap_schedule_pruned_total{{volume=\"{VOL}\"}} 1"),
    ] {
        assert!(metrics.contains(&want), "{want} missing in\n{metrics}");
    }
    assert!(!metrics.contains(OTHER), "{metrics}");
    let log = d.log_text();
    assert!(log.contains("BLOCKSNAP_TEST_CLOCK_FILE is set"), "{log}");
    assert!(
        log.contains(&format!("scheduled snapshot {first} of volume {VOL} taken")),
        "{log}"
    );
    assert!(
        log.contains(&format!("pruned snapshot {first} of volume {VOL}")),
        "{log}"
    );
    // The state lives in the state directory.
    assert!(d.state.join("schedules.json").exists());
    d.stop();
}
