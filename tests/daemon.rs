//! blocksnapd end to end: the real daemon on a real Unix socket, called with
//! curl and a raw HTTP client, on image files, loop devices and mounted ext4.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const VOL: &str = "c849a193-5275-4527-9e5a-69b2a05933aa";

fn is_uuid(v: &Value) -> bool {
    v.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

fn is_timestamp(v: &Value) -> bool {
    // %Y-%m-%dT%H:%M:%S.%f, no zone.
    let Some(s) = v.as_str() else { return false };
    s.len() == 26
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && s.chars().filter(|c| c.is_ascii_digit()).count() == 20
}

fn image_volume(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("vol.img");
    make_image(&img, size, 42);
    img
}

#[test]
fn the_seeds_curl_call_works_with_only_the_url_changed() {
    if !root("the_seeds_curl_call_works_with_only_the_url_changed") {
        return;
    }
    // The seed's own volume id, on a real block device with a mounted ext4:
    // the default quiesce mode freezes it.
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    let content = random_bytes(1, 1 << 20);
    std::fs::write(m.dir.join("file"), &content).unwrap();
    let d = DaemonProc::start("", &volume_toml("yourVolumeID", &vol.dev, ""));
    let out = Command::new("curl")
        .arg("-i")
        .arg("--unix-socket")
        .arg(&d.socket)
        .args([
            "-X",
            "POST",
            "-d",
            r#"{
      "snapshot": {
          "display_name": "snap-001",
          "display_description": "Daily Backup",
          "volume_id": "yourVolumeID"
        }
      }"#,
            "-H",
            "X-Auth-Token: yourAuthToken",
            "-H",
            "Content-Type: application/json",
            "http://localhost/v1/yourAccountID/snapshots",
        ])
        .output()
        .expect("curl runs (.ci/run installs it)");
    assert!(out.status.success());
    let r = parse_response(&out.stdout).expect("an HTTP response");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("X-Compute-Request-Id")
        .is_some_and(|v| v.starts_with("req-") && uuid::Uuid::parse_str(&v[4..]).is_ok()));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert!(r.header("Content-Length").is_some());
    let v = r.json();
    let s = &v["snapshot"];
    let fields: Vec<&String> = s.as_object().unwrap().keys().collect();
    for f in [
        "status",
        "display_name",
        "created_at",
        "display_description",
        "volume_id",
        "metadata",
        "id",
        "size",
    ] {
        assert!(s.get(f).is_some(), "field {f} missing: {fields:?}");
    }
    assert_eq!(s["status"], "creating");
    assert_eq!(s["display_name"], "snap-001");
    assert_eq!(s["display_description"], "Daily Backup");
    assert_eq!(s["volume_id"], "yourVolumeID");
    assert_eq!(s["metadata"], serde_json::json!({}));
    assert!(is_uuid(&s["id"]));
    assert!(is_timestamp(&s["created_at"]), "{}", s["created_at"]);
    assert_eq!(s["size"], 1);
    let id = s["id"].as_str().unwrap();
    let done = d.wait_snapshot(id);
    assert_eq!(done["status"], "available", "{done}");
    assert_eq!(done["os-extended-snapshot-attributes:progress"], "100%");
    assert_eq!(done["os-extended-snapshot-attributes:project_id"], TENANT);
    assert!(
        done["blocksnap:freeze_ms"].as_f64().unwrap() > 0.0,
        "the mounted volume was not frozen"
    );
    // How it was taken: the daemon tracks the volume from its start, so the
    // first snapshot reads it whole in live rounds, then freezes briefly.
    assert_eq!(done["blocksnap:taken"], "full-scan", "{done}");
    assert_eq!(
        done["blocksnap:full_scan_reason"], "first snapshot",
        "{done}"
    );
    assert!(done["blocksnap:rounds"].as_u64().unwrap() >= 1, "{done}");
    assert!(
        done["blocksnap:quiesced_blocks"].as_u64().is_some(),
        "{done}"
    );
    // A second one reads only what was written since.
    std::fs::write(m.dir.join("more"), random_bytes(3, 64 << 10)).unwrap();
    std::fs::File::open(m.dir.join("more"))
        .unwrap()
        .sync_all()
        .unwrap();
    let r2 = d.call(
        "POST",
        "/snapshots",
        Some(r#"{"snapshot": {"volume_id": "yourVolumeID"}}"#),
    );
    let id2 = r2.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let second = d.wait_snapshot(&id2);
    assert_eq!(second["blocksnap:taken"], "tracked", "{second}");
    assert!(
        second["blocksnap:tracked_blocks"].as_u64().unwrap() >= 16,
        "{second}"
    );
    let metrics = http(&d.socket, "GET", "/metrics", Some(TOKEN), None).body;
    assert!(
        metrics.contains("blocksnap_snapshots_tracked_total{volume=\"yourVolumeID\"} 1")
            && metrics.contains("blocksnap_snapshots_full_scan_total{volume=\"yourVolumeID\"} 1"),
        "{metrics}"
    );
    // It restores to a clean filesystem holding the file. (Not compared byte
    // for byte with the live device: ext4 marks its superblock clean while
    // frozen and sets needs_recovery again when thawed.)
    let (rm, _l, _t) = restore_and_mount(&d.chain("yourVolumeID"), id);
    assert!(std::fs::read(rm.dir.join("file")).unwrap() == content);
    assert!(d.log_text().contains("snapshot available"));
    assert!(!d.log_text().contains(TOKEN), "a token reached the log");
}

#[test]
fn every_call_and_error_of_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 8 << 20);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, "display_name = \"data\""));
    let sock = &d.socket;
    let base = format!("/v1/{TENANT}");

    // Authentication and tenants.
    let r = http(sock, "GET", &format!("{base}/snapshots"), None, None);
    assert_eq!((r.status, r.error().0.as_str()), (401, "unauthorized"));
    let r = http(
        sock,
        "GET",
        &format!("{base}/snapshots"),
        Some("wrong-token"),
        None,
    );
    assert_eq!((r.status, r.error().0.as_str()), (401, "unauthorized"));
    let r = http(
        sock,
        "GET",
        &format!("{base}/snapshots"),
        Some(TOKEN2),
        None,
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error(),
        ("badRequest".into(), "Malformed request url".into())
    );
    assert!(
        r.header("X-Compute-Request-Id").is_some(),
        "errors carry a request id too"
    );

    // Create.
    let create = |body: &str| d.call("POST", "/snapshots", Some(body));
    let r = create(&format!(
        r#"{{"snapshot": {{"volume_id": "{VOL}", "display_name": "one", "metadata": {{"k": "v"}}, "force": "no"}}}}"#
    ));
    assert_eq!(r.status, 200, "{}", r.body);
    let s = r.json()["snapshot"].clone();
    assert_eq!(s["status"], "creating");
    assert!(
        s.get("os-extended-snapshot-attributes:progress").is_none(),
        "the create response is a summary"
    );
    let one = s["id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_snapshot(&one)["status"], "available");
    let two = d.snapshot(VOL, "two");
    let three = d.snapshot(VOL, "three");

    // Bad create bodies.
    let r = create(&format!(
        r#"{{"snapshot": {{"volume_id": "{VOL}", "force": "maybe"}}}}"#
    ));
    assert_eq!(
        r.error(),
        (
            "badRequest".into(),
            "Invalid value 'maybe' for force. ".into()
        )
    );
    let r = create(r#"{"snap": {}}"#);
    assert_eq!((r.status, r.error().0.as_str()), (422, "computeFault"));
    let r = create(r#"{"snapshot": "#);
    assert_eq!(r.status, 400);
    assert!(r.error().1.contains("Malformed"));
    let r = create(&format!(
        r#"{{"snapshot": {{"volume_id": "{VOL}", "display_name": 7}}}}"#
    ));
    assert_eq!(r.status, 400);
    assert!(r.error().1.contains("snapshot.display_name"), "{}", r.body);
    // Fields the API does not know are ignored, as Cinder ignores them
    // (python-cinderclient 4.3 sends attach_status, user_id, status...):
    // this body fails only on its unknown volume.
    let r = create(
        r#"{"snapshot": {"volume_id": "no-such-volume", "colour": "red", "attach_status": "detached"}}"#,
    );
    assert_eq!(
        (r.status, r.error().0.as_str()),
        (404, "itemNotFound"),
        "{}",
        r.body
    );
    let r = create(r#"{"snapshot": {"volume_id": "no-such-volume"}}"#);
    assert_eq!((r.status, r.error().0.as_str()), (404, "itemNotFound"));
    let big = format!(
        r#"{{"snapshot": {{"volume_id": "{VOL}", "display_description": "{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    let r = create(&big);
    assert_eq!((r.status, r.error().0.as_str()), (413, "overLimit"));
    let r = try_http(
        sock,
        "POST",
        &format!("{base}/snapshots"),
        Some(TOKEN),
        Some("volume_id=x"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
    )
    .unwrap();
    assert_eq!((r.status, r.error().0.as_str()), (415, "badMediaType"));

    // Lists, detail, paging, filters.
    let list = d.call("GET", "/snapshots", None).json();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["display_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["three", "two", "one"]);
    for x in list["snapshots"].as_array().unwrap() {
        let keys: Vec<&str> = x.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "created_at",
            "display_description",
            "display_name",
            "id",
            "metadata",
            "size",
            "status",
            "volume_id",
        ];
        want.sort();
        assert_eq!(keys, want, "summary fields");
    }
    let detail = d.call("GET", "/snapshots/detail", None).json();
    for x in detail["snapshots"].as_array().unwrap() {
        assert_eq!(x["os-extended-snapshot-attributes:progress"], "100%");
        assert_eq!(x["os-extended-snapshot-attributes:project_id"], TENANT);
    }
    assert_eq!(
        d.call("GET", "/snapshots?limit=2", None).json()["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let off = d.call("GET", "/snapshots?limit=2&offset=2", None).json();
    assert_eq!(off["snapshots"][0]["id"], one.as_str());
    assert_eq!(
        d.call("GET", "/snapshots?limit=0", None).json()["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let r = d.call("GET", "/snapshots?limit=abc", None);
    assert_eq!(
        r.error(),
        ("badRequest".into(), "limit param must be an integer".into())
    );
    let r = d.call("GET", "/snapshots/detail?limit=-1", None);
    assert_eq!(
        r.error(),
        ("badRequest".into(), "limit param must be positive".into())
    );
    assert_eq!(
        d.call("GET", "/snapshots?display_name=two", None).json()["snapshots"][0]["id"],
        two.as_str()
    );
    assert_eq!(
        d.call("GET", "/snapshots?status=error", None).json()["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        d.call(
            "GET",
            &format!("/snapshots?volume_id={VOL}&colour=blue"),
            None
        )
        .json()["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Show, update.
    let r = d.call("GET", &format!("/snapshots/{one}"), None);
    assert_eq!(r.json()["snapshot"]["metadata"]["k"], "v");
    let r = d.call(
        "GET",
        "/snapshots/0b1d0a2c-0000-4000-8000-000000000000",
        None,
    );
    assert_eq!(
        r.error(),
        (
            "itemNotFound".into(),
            "Snapshot 0b1d0a2c-0000-4000-8000-000000000000 could not be found.".into()
        )
    );
    let r = d.call(
        "PUT",
        &format!("/snapshots/{one}"),
        Some(r#"{"snapshot": {"display_name": "renamed", "display_description": "d"}}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["snapshot"]["display_name"], "renamed");
    let r = d.call(
        "PUT",
        &format!("/snapshots/{one}"),
        Some(r#"{"snapshot": {"status": "error"}}"#),
    );
    // Cinder's v1 update changes only names and descriptions and ignores
    // every other field.
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        d.call("GET", &format!("/snapshots/{one}"), None).json()["snapshot"]["status"],
        "available"
    );

    // Metadata.
    let meta = |m: &str, path: &str, body: Option<&str>| {
        d.call(m, &format!("/snapshots/{one}/metadata{path}"), body)
    };
    assert_eq!(
        meta("GET", "", None).json(),
        serde_json::json!({"metadata": {"k": "v"}})
    );
    assert_eq!(
        meta("POST", "", Some(r#"{"metadata": {"a": "1"}}"#)).json(),
        serde_json::json!({"metadata": {"a": "1", "k": "v"}})
    );
    assert_eq!(
        meta("PUT", "", Some(r#"{"metadata": {"b": "2"}}"#)).json(),
        serde_json::json!({"metadata": {"b": "2"}})
    );
    assert_eq!(
        meta("GET", "/b", None).json(),
        serde_json::json!({"meta": {"b": "2"}})
    );
    assert_eq!(
        meta("PUT", "/c", Some(r#"{"meta": {"c": "3"}}"#)).json(),
        serde_json::json!({"meta": {"c": "3"}})
    );
    assert_eq!(
        meta("PUT", "/c", Some(r#"{"meta": {"d": "3"}}"#)).error().1,
        "Request body and URI mismatch"
    );
    assert_eq!(
        meta("PUT", "/c", Some(r#"{"meta": {"c": "3", "d": "4"}}"#))
            .error()
            .1,
        "Request body contains too many items"
    );
    assert_eq!(meta("DELETE", "/c", None).status, 200);
    assert_eq!(meta("GET", "/c", None).status, 404);
    assert_eq!(meta("DELETE", "/c", None).status, 404);
    assert_eq!(
        meta("GET", "", None).json(),
        serde_json::json!({"metadata": {"b": "2"}})
    );

    // Volumes.
    let vols = d.call("GET", "/volumes", None).json();
    let v = &vols["volumes"][0];
    for f in [
        "id",
        "status",
        "size",
        "availability_zone",
        "created_at",
        "bootable",
        "attachments",
        "display_name",
        "display_description",
        "volume_type",
        "snapshot_id",
        "source_volid",
        "encrypted",
        "metadata",
    ] {
        assert!(v.get(f).is_some(), "volume field {f} missing: {v}");
    }
    assert_eq!(v["id"], VOL);
    assert_eq!(v["status"], "available");
    assert_eq!(v["bootable"], "false");
    assert_eq!(v["size"], 1);
    assert!(is_timestamp(&v["created_at"]));
    let detail = d.call("GET", "/volumes/detail", None).json();
    assert_eq!(detail["volumes"][0]["os-vol-tenant-attr:tenant_id"], TENANT);
    assert_eq!(
        d.call("GET", "/volumes?status=in-use", None).json()["volumes"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let r = d.call(
        "PUT",
        &format!("/volumes/{VOL}"),
        Some(r#"{"volume": {"display_name": "data2", "metadata": {"x": "y"}}}"#),
    );
    assert_eq!(r.json()["volume"]["display_name"], "data2");
    assert_eq!(
        d.call("GET", &format!("/volumes/{VOL}"), None).json()["volume"]["metadata"]["x"],
        "y"
    );
    let r = d.call("DELETE", &format!("/volumes/{VOL}"), None);
    assert_eq!(r.status, 400);
    assert!(r.error().1.contains("configured"), "{}", r.body);
    let r = d.call("GET", "/volumes/..%2F..%2Fetc", None);
    assert_eq!(r.status, 404);
    // Volumes from snapshots: the reference's errors.
    let r = d.call(
        "POST",
        "/volumes",
        Some(r#"{"volume": {"snapshot_id": "0b1d0a2c-0000-4000-8000-000000000000"}}"#),
    );
    assert_eq!(
        r.error(),
        (
            "itemNotFound".into(),
            "snapshot id:0b1d0a2c-0000-4000-8000-000000000000 not found".into()
        )
    );
    let r = d.call(
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"snapshot_id": "{one}", "source_volid": "{VOL}"}}}}"#
        )),
    );
    assert_eq!(r.status, 400);

    // Delete: 202 with no body, then gone.
    let r = d.call("DELETE", &format!("/snapshots/{two}"), None);
    assert_eq!(r.status, 202);
    assert!(r.body.is_empty());
    assert!(d.wait_snapshot(&two).is_null());
    assert_eq!(
        d.call("GET", &format!("/snapshots/{two}"), None).status,
        404
    );
    // The others still restore to what they were.
    let c = blocksnap::chain::Chain::open(&d.chain(VOL), blocksnap::chain::Access::Read).unwrap();
    assert_eq!(c.snapshots().len(), 2);
    for id in [&one, &three] {
        assert_same(
            &restore_bytes(&d.chain(VOL), id, d.dir.path()),
            &read_all(&img),
            id,
        );
    }

    // Unknown paths and methods.
    let r = http(sock, "GET", "/v2/nothing", Some(TOKEN), None);
    assert_eq!(
        r.error(),
        (
            "itemNotFound".into(),
            "The resource could not be found.".into()
        )
    );
    let r = http(
        sock,
        "PATCH",
        &format!("{base}/snapshots"),
        Some(TOKEN),
        None,
    );
    assert_eq!((r.status, r.error().0.as_str()), (405, "badMethod"));

    // Health and metrics.
    assert_eq!(http(sock, "GET", "/healthz", None, None).status, 200);
    assert_eq!(http(sock, "GET", "/metrics", None, None).status, 401);
    let m = http(sock, "GET", "/metrics", Some(TOKEN), None);
    assert_eq!(m.status, 200);
    assert!(
        m.body.contains(&format!(
            "blocksnap_snapshots_taken_total{{volume=\"{VOL}\"}} 3"
        )),
        "{}",
        m.body
    );
    assert!(m.body.contains("blocksnap_last_freeze_seconds"));
}

#[test]
fn one_operation_at_a_time_and_sigterm_abandons_a_running_scan() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 16 << 20);
    let signal = dir.path().join("reached");
    let d_env = [
        ("BLOCKSNAP_FAULT_POINT", "mid-scan"),
        ("BLOCKSNAP_FAULT_ACTION", "delay:4000"),
        ("BLOCKSNAP_FAULT_SIGNAL_FILE", signal.to_str().unwrap()),
    ];
    let mut d = DaemonProc::start_with_env("", &volume_toml(VOL, &img, ""), &d_env);
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !signal.exists() {
        assert!(
            Instant::now() < deadline,
            "scan never reached its middle:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mid-scan: live progress, and a second operation is refused.
    let s = d.call("GET", &format!("/snapshots/{id}"), None).json()["snapshot"].clone();
    assert_eq!(s["status"], "creating");
    let p: f64 = s["os-extended-snapshot-attributes:progress"]
        .as_str()
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(p > 0.0 && p < 100.0, "progress {p}");
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.error().1.contains(&id) && r.error().1.contains("busy"),
        "{}",
        r.body
    );
    let r = d.call("DELETE", &format!("/snapshots/{id}"), None);
    assert_eq!(
        r.error().1,
        "Invalid snapshot: Volume Snapshot status must be available or error"
    );
    // SIGTERM: the scan is abandoned, the daemon exits 0.
    let status = d.stop();
    assert!(status.success(), "exit status {status}:\n{}", d.log_text());
    d.set_env(&[]);
    d.spawn();
    let s = d.wait_snapshot(&id);
    assert_eq!(s["status"], "error");
    assert!(
        s["blocksnap:error"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{s}"
    );
    // Nothing half-made in the chain, and the next snapshot works.
    assert!(
        blocksnap::chain::Chain::open(&d.chain(VOL), blocksnap::chain::Access::Read)
            .unwrap()
            .snapshots()
            .is_empty()
    );
    let ok = d.snapshot(VOL, "after");
    assert_same(
        &restore_bytes(&d.chain(VOL), &ok, d.dir.path()),
        &read_all(&img),
        "after restart",
    );
}

#[test]
fn kill_9_during_a_freeze_then_restart() {
    if !root("kill_9_during_a_freeze_then_restart") {
        return;
    }
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    let a = random_bytes(3, 4 << 20);
    std::fs::write(m.dir.join("a"), &a).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = dir.path().join("frozen");
    let mut d = DaemonProc::start_with_env(
        "",
        &volume_toml(VOL, &vol.dev, ""),
        &[
            ("BLOCKSNAP_FAULT_POINT", "mid-scan"),
            ("BLOCKSNAP_FAULT_HIT", "2"),
            ("BLOCKSNAP_FAULT_SIGNAL_FILE", signal.to_str().unwrap()),
        ],
    );
    let first = d.snapshot(VOL, "first");
    std::fs::write(m.dir.join("b"), random_bytes(4, 1 << 20)).unwrap();
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    let second = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !signal.exists() {
        assert!(
            Instant::now() < deadline,
            "second snapshot never paused:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    // Killed while frozen: still frozen (the kernel never thaws on its own).
    let probe = std::fs::File::open(&m.dir).unwrap();
    use std::os::fd::AsFd;
    assert_eq!(
        blocksnap::sys::freeze(probe.as_fd())
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EBUSY),
        "expected the filesystem to be left frozen by the killed daemon"
    );
    d.set_env(&[]);
    d.spawn();
    // Start thawed it.
    blocksnap::sys::freeze(probe.as_fd()).expect("filesystem still frozen after restart");
    blocksnap::sys::thaw(probe.as_fd()).unwrap();
    std::fs::write(m.dir.join("c"), b"writable").unwrap();
    assert!(d.log_text().contains("thawed a filesystem left frozen"));
    let s = d.call("GET", &format!("/snapshots/{second}"), None).json()["snapshot"].clone();
    assert_eq!(s["status"], "error", "{s}");
    assert_eq!(
        d.call("GET", &format!("/snapshots/{first}"), None).json()["snapshot"]["status"],
        "available"
    );
    let (rm, _l, _t) = restore_and_mount(&d.chain(VOL), &first);
    assert!(
        std::fs::read(rm.dir.join("a")).unwrap() == a,
        "first snapshot lost its file"
    );
    assert!(
        !rm.dir.join("b").exists(),
        "first snapshot holds a later file"
    );
    drop(rm);
    cli_ok([
        "chain".as_ref(),
        "verify".as_ref(),
        d.chain(VOL).as_os_str(),
    ]);
}

#[test]
fn volumes_from_snapshots_and_revert_in_place() {
    if !root("volumes_from_snapshots_and_revert_in_place") {
        return;
    }
    let src = Loop::new(24 << 20);
    write_at(&src.dev, 0, &random_bytes(5, 24 << 20));
    let d = DaemonProc::start("", &volume_toml(VOL, &src.dev, "quiesce = \"none\""));
    let snap = d.snapshot(VOL, "base");
    let at_snap = read_all(&src.dev);

    // Too small.
    let r = d.call(
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"snapshot_id": "{snap}", "size": 0}}}}"#
        )),
    );
    assert_eq!(r.status, 400);
    // A new volume: a loop device holding the snapshot.
    let r = d.call(
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"snapshot_id": "{snap}", "display_name": "copy"}}}}"#
        )),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["volume"]["status"], "creating");
    assert_eq!(r.json()["volume"]["snapshot_id"], snap.as_str());
    let made = r.json()["volume"]["id"].as_str().unwrap().to_string();
    let v = d.wait_volume(&made, &["creating"]);
    assert_eq!(v["status"], "available", "{v}");
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .expect("device in metadata")
        .to_string();
    assert!(dev.starts_with("/dev/loop"));
    assert_same(
        &read_all(Path::new(&dev))[..at_snap.len()],
        &at_snap,
        "volume from snapshot",
    );
    // It can itself be snapshotted, and then not deleted until that goes.
    let inner = d.snapshot(&made, "of-copy");
    let r = d.call("DELETE", &format!("/volumes/{made}"), None);
    assert_eq!(
        r.error().1,
        "Invalid volume: Volume still has 1 dependent snapshots"
    );
    assert_eq!(
        d.call("DELETE", &format!("/snapshots/{inner}"), None)
            .status,
        202
    );
    d.wait_snapshot(&inner);

    // Revert: change 7 blocks, revert, count what was written.
    for b in [0u64, 9, 10, 11, 300, 4000, 6143] {
        write_at(&src.dev, b * 4096 + 100, b"changed!");
    }
    let r = d.call(
        "POST",
        &format!("/volumes/{VOL}/action"),
        Some(&format!(r#"{{"revert": {{"snapshot_id": "{snap}"}}}}"#)),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let v = d.wait_volume(VOL, &["reverting"]);
    assert_eq!(v["metadata"]["blocksnap:reverted_blocks"], "7", "{v}");
    assert_same(&read_all(&src.dev), &at_snap, "reverted volume");
    let r = d.call(
        "POST",
        &format!("/volumes/{VOL}/action"),
        Some(r#"{"frobnicate": {}}"#),
    );
    assert_eq!(r.status, 400);

    // A blank volume: a sparse 1 GB image on a loop device.
    let r = d.call(
        "POST",
        "/volumes",
        Some(r#"{"volume": {"size": 1, "display_name": "blank"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let blank = r.json()["volume"]["id"].as_str().unwrap().to_string();
    let v = d.wait_volume(&blank, &["creating"]);
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(v["size"], 1);
    let bdev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(read_all(Path::new(&bdev)).iter().all(|&b| b == 0));
    assert_eq!(
        d.call("DELETE", &format!("/volumes/{blank}"), None).status,
        202
    );
    assert!(d.wait_volume(&blank, &["deleting"]).is_null());

    // Delete the made volume: detached and removed.
    assert_eq!(
        d.call("DELETE", &format!("/volumes/{made}"), None).status,
        202
    );
    assert!(d.wait_volume(&made, &["deleting"]).is_null());
    assert!(
        blocksnap::loopdev::find_by_backing(&d.state.join(format!("volumes/{made}.img"))).is_none()
    );
    assert!(!d.state.join(format!("volumes/{made}.img")).exists());

    // The same through the blocksnap CLI.
    let client = |args: &[&str]| {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--socket".into(),
            d.socket.display().to_string(),
            "--token".into(),
            TOKEN.into(),
            "--tenant".into(),
            TENANT.into(),
        ]);
        cli_ok(&a)
    };
    let id = last_line(&client(&[
        "snapshot", "create", VOL, "--name", "cli", "--wait",
    ]));
    assert!(client(&["snapshot", "list"]).contains(&id));
    let shown: Value = serde_json::from_str(&client(&["snapshot", "show", &id, "--json"])).unwrap();
    assert_eq!(shown["display_name"], "cli");
    let vid = last_line(&client(&["volume", "create", "--snapshot", &id, "--wait"]));
    assert!(client(&["volume", "list"]).contains(&vid));
    client(&["volume", "delete", &vid, "--wait"]);
    write_at(&src.dev, 4096, b"again");
    client(&["volume", "revert", VOL, "--snapshot", &id, "--wait"]);
    assert_same(&read_all(&src.dev), &at_snap, "CLI revert");
    client(&["snapshot", "delete", &id, "--wait"]);
    assert!(!client(&["snapshot", "list"]).contains(&id));
}

#[test]
fn tenants_see_only_their_own_and_peers_are_checked() {
    if !root("tenants_see_only_their_own_and_peers_are_checked") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let c = dir.path().join("c.img");
    for p in [&a, &b, &c] {
        make_image(p, 4 << 20, 1);
    }
    let vols = format!(
        "{}{}{}",
        volume_toml("vol-a", &a, &format!("tenant = \"{TENANT}\"")),
        volume_toml("vol-b", &b, &format!("tenant = \"{TENANT2}\"")),
        volume_toml("vol-c", &c, "")
    );
    let d = DaemonProc::start("allowed_uids = [0]\nsocket_mode = \"0666\"", &vols);
    let as2 = |m: &str, p: &str, body: Option<&str>| {
        http(
            &d.socket,
            m,
            &format!("/v1/{TENANT2}{p}"),
            Some(TOKEN2),
            body,
        )
    };
    let ids = |v: Value, key: &str| -> Vec<String> {
        let mut x: Vec<String> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        x.sort();
        x
    };
    assert_eq!(
        ids(d.call("GET", "/volumes", None).json(), "volumes"),
        ["vol-a", "vol-c"]
    );
    assert_eq!(
        ids(as2("GET", "/volumes", None).json(), "volumes"),
        ["vol-b", "vol-c"]
    );
    assert_eq!(d.call("GET", "/volumes/vol-b", None).status, 404);
    let sa = d.snapshot("vol-a", "a");
    let sc = d.snapshot("vol-c", "c");
    assert!(ids(as2("GET", "/snapshots", None).json(), "snapshots").is_empty());
    assert_eq!(as2("GET", &format!("/snapshots/{sa}"), None).status, 404);
    assert_eq!(as2("GET", &format!("/snapshots/{sc}"), None).status, 404);
    assert_eq!(as2("DELETE", &format!("/snapshots/{sc}"), None).status, 404);
    let r = as2(
        "POST",
        "/snapshots",
        Some(r#"{"snapshot": {"volume_id": "vol-a"}}"#),
    );
    assert_eq!(r.status, 404);

    // A peer whose uid is not allowed gets 403, whatever its token.
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let uid = nobody.uid.as_raw();
    let r = as_user(
        uid,
        &d.socket,
        &format!("/v1/{TENANT}/snapshots"),
        Some(TOKEN),
    )
    .expect("nobody can connect to a 0666 socket");
    assert_eq!((r.status, r.error().0.as_str()), (403, "forbidden"));
    // With mode 0600 it cannot even connect.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_user(uid, &d.socket, "/healthz", None);
    assert_eq!(out.map(|r| r.status), Err(libc::EACCES));
}

#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 4 << 20);
    let mut first = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    // A second daemon with another state directory but the same socket.
    let cfg = dir.path().join("second.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\n[[tokens]]\ntenant = \"t\"\ntoken = \"secret-token\"\n",
            first.socket.display(),
            dir.path().join("state2").display()
        ),
    )
    .unwrap();
    let out = Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already answers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        http(&first.socket, "GET", "/healthz", None, None).status,
        200,
        "the live daemon was disturbed"
    );
    // The first dies hard; its socket file stays and is replaced.
    first.kill9();
    assert!(first.socket.exists());
    first.spawn();
    assert_eq!(
        http(&first.socket, "GET", "/healthz", None, None).status,
        200
    );
}

#[test]
fn config_mistakes_stop_the_daemon_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[daemon]\nsocket = \"/tmp/x.sock\"\nstat_dir = \"/tmp\"\n",
    )
    .unwrap();
    let out = Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:", cfg.display())) && err.contains("stat_dir"),
        "{err}"
    );
    let img = image_volume(dir.path(), 4 << 20);
    std::fs::write(
        &cfg,
        format!(
            "[[tokens]]\ntenant = \"t\"\ntoken = \"secret-token\"\n{}",
            volume_toml(VOL, &img, "")
        ),
    )
    .unwrap();
    let out = Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_state_directory_on_a_configured_volume_is_refused() {
    if !root("a_state_directory_on_a_configured_volume_is_refused") {
        return;
    }
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nstate_dir = \"{}/state\"\n[[tokens]]\ntenant = \"t\"\ntoken = \"secret-token\"\n{}",
            m.dir.display(),
            volume_toml(VOL, &vol.dev, "")
        ),
    )
    .unwrap();
    let out = Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2:") && err.contains("state_dir") && err.contains("another filesystem"),
        "{err}"
    );
}

#[test]
fn the_number_of_made_volumes_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 1 << 20);
    let d = DaemonProc::start("max_made_volumes = 0", &volume_toml(VOL, &img, ""));
    let snap = d.snapshot(VOL, "s");
    for body in [
        r#"{"volume": {"size": 1}}"#.to_string(),
        format!(r#"{{"volume": {{"snapshot_id": "{snap}"}}}}"#),
    ] {
        let r = d.call("POST", "/volumes", Some(&body));
        assert_eq!(r.status, 413, "{}", r.body);
        let (name, message) = r.error();
        assert_eq!(name, "overLimit");
        assert!(message.contains("max_made_volumes"), "{message}");
    }
    assert_eq!(
        d.call("GET", "/volumes", None).json()["volumes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn log_lines_to_a_pipe_carry_the_numbers_and_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 4 << 20);
    let mut d = DaemonProc::configure("", &volume_toml(VOL, &img, ""), &[]);
    // The daemon's stderr is a pipe here, as under a supervisor or `| tee`.
    let mut child = Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&d.config)
        .env("BLOCKSNAP_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("INVOCATION_ID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut out).unwrap();
        out
    });
    d.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while try_http(&d.socket, "GET", "/healthz", None, None, &[])
        .map(|r| r.status)
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "the daemon did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    let id = d.snapshot(VOL, "first");
    write_at(&img, 0, &random_bytes(7, 8192));
    // A snapshot shows `available` a moment before its volume is free for
    // the next operation (a race of the daemon core, reported): retry then.
    let when_free = |method: &str, path: &str, body: Option<&str>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = d.call(method, path, body);
            if !(r.status == 400 && r.body.contains("is busy")) || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let body = format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#);
    let r = when_free("POST", "/snapshots", Some(&body));
    assert_eq!(r.status, 200, "{}", r.body);
    let id2 = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_snapshot(&id2)["status"], "available");
    let r = when_free("DELETE", &format!("/snapshots/{id}"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(d.wait_snapshot(&id).is_null());
    assert!(d.stop().success());
    let log = reader.join().unwrap();
    assert!(
        !log.contains(&0x1b),
        "ANSI escapes in a log written to a pipe:\n{}",
        String::from_utf8_lossy(&log)
    );
    let log = String::from_utf8(log).unwrap();
    // The message itself, not only the fields after it, carries the values.
    let line = |prefix: &str| {
        log.lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no line with {prefix:?}:\n{log}"))
            .to_string()
    };
    let l = line(&format!(
        "snapshot available: volume {VOL}, snapshot {id2}, changed 8192 B (8.0 KiB), stored "
    ));
    assert!(
        l.contains(", freeze window 0.0 ms (image file, read as is; full scan (")
            && l.contains("), duration "),
        "{l}"
    );
    line(&format!("snapshot requested: volume {VOL}, snapshot {id2}"));
    line(&format!(
        "snapshot deleted: volume {VOL}, snapshot {id}, merged "
    ));
}

#[test]
fn files_the_daemon_creates_are_owner_only_under_umask_022() {
    if !root("files_the_daemon_creates_are_owner_only_under_umask_022") {
        return;
    }
    set_umask(0o022);
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 4 << 20);
    // A state directory the daemon creates itself, below one it creates too.
    let state = dir.path().join("new/state");
    let d = DaemonProc::start(
        &format!("state_dir = \"{}\"", state.display()),
        &volume_toml(VOL, &img, ""),
    );
    let id = d.snapshot(VOL, "s");
    let made = |body: &str| {
        let r = d.call("POST", "/volumes", Some(body));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json()["volume"]["id"].as_str().unwrap().to_string();
        assert_eq!(d.wait_volume(&v, &["creating"])["status"], "available");
        v
    };
    let from_snapshot = made(&format!(r#"{{"volume": {{"snapshot_id": "{id}"}}}}"#));
    let blank = made(r#"{"volume": {"size": 1}}"#);
    for sub in ["", "chains", "volumes", "freeze-intents"] {
        let p = state.join(sub);
        assert_eq!(mode_of(&p), 0o700, "{} is {:o}", p.display(), mode_of(&p));
    }
    let chain = d.chain(VOL);
    for f in [
        chain.clone(),
        blocksnap::chain::side_file(&chain),
        state.join("catalog.db"),
        state.join("chains").join(format!("{VOL}.notes")),
        state.join("volumes").join(format!("{from_snapshot}.notes")),
        state.join("volumes").join(format!("{from_snapshot}.img")),
        state.join("volumes").join(format!("{blank}.img")),
    ] {
        assert_eq!(mode_of(&f), 0o600, "{} is {:o}", f.display(), mode_of(&f));
    }
}

#[test]
fn the_cli_prints_names_with_control_characters_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_volume(dir.path(), 1 << 20);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    // Clears the screen, then fakes a row of the table on a new line.
    let evil = "\u{1b}[2J\u{1b}[31mok\nfffffff-fake  row\u{1b}]0;title\u{7}\u{9b}1m\u{7f}";
    let body = serde_json::json!({"snapshot": {
        "volume_id": VOL,
        "display_name": evil,
        "display_description": evil,
        "metadata": {"k": evil},
    }});
    let r = d.call("POST", "/snapshots", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_snapshot(&id)["status"], "available");
    let r = d.call(
        "PUT",
        &format!("/volumes/{VOL}"),
        Some(&serde_json::json!({"volume": {"display_name": evil}}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let client = |args: &[&str]| {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--socket".into(),
            d.socket.display().to_string(),
            "--token".into(),
            TOKEN.into(),
            "--tenant".into(),
            TENANT.into(),
        ]);
        cli_ok(&a)
    };
    let chain = d.chain(VOL).display().to_string();
    let escaped = r"\u{1b}[2J\u{1b}[31mok\nfffffff";
    // chain list cuts names to 16 characters.
    for (args, rows, shown) in [
        (vec!["snapshot", "list"], 2, escaped),
        (vec!["snapshot", "show", &id], 0, escaped),
        (vec!["volume", "list"], 2, escaped),
        (vec!["volume", "show", VOL], 0, escaped),
        (vec!["chain", "list", &chain], 2, r"\u{1b}[2J\u{1b}…"),
    ] {
        let out = if args[0] == "chain" {
            cli_ok(&args)
        } else {
            client(&args)
        };
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed control characters: {out:?}"
        );
        assert!(
            !out.contains("\nfffffff-fake"),
            "{args:?} printed a fake row: {out}"
        );
        assert!(out.contains(shown), "{args:?}: {out}");
        if rows > 0 {
            assert_eq!(out.lines().count(), rows, "{args:?}: {out}");
        }
    }
    // JSON output stays JSON: the name comes back exactly as given.
    let v: Value = serde_json::from_str(&client(&["snapshot", "show", &id, "--json"])).unwrap();
    assert_eq!(v["display_name"], evil);
    assert_eq!(v["metadata"]["k"], evil);
    let v: Value =
        serde_json::from_str(&cli_ok(["chain", "list", chain.as_str(), "--json"])).unwrap();
    assert_eq!(v[0]["name"], evil);
}

#[test]
fn the_demo_prints_commands_that_run_as_printed() {
    if !root("the_demo_prints_commands_that_run_as_printed") {
        return;
    }
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("my demo");
    let mut child = Command::new(bin("blocksnapd"))
        .arg("--demo")
        .arg(&demo_dir)
        .env("BLOCKSNAP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stopped with SIGINT (Ctrl-C) whatever happens, releasing the volume.
    struct Interrupt(u32);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGINT,
            );
        }
    }
    let guard = Interrupt(child.id());
    let mut printed = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        if line.starts_with("Stop with Ctrl-C") {
            break;
        }
        line.clear();
    }
    assert!(printed.contains("Stop with Ctrl-C"), "{printed}");
    let cli = bin("blocksnap").display().to_string();
    let commands: Vec<&str> = printed
        .lines()
        .filter(|l| {
            l.starts_with("curl ")
                || l.starts_with("export ")
                || l.starts_with("SNAP=")
                || l.starts_with(&cli)
        })
        .collect();
    assert!(
        commands.len() >= 8 && commands.iter().any(|c| c.contains(" volume create ")),
        "{printed}"
    );
    // Exactly as printed, one after the other, in a shell with no PATH help.
    let script = format!("set -euo pipefail\n{}\n", commands.join("\n"));
    let run = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "the demo's commands failed:\n{script}\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("HTTP/1.1 200"), "{stdout}");
    assert!(
        stdout.contains("snap-001") && stdout.contains("second"),
        "{stdout}"
    );
    // Ctrl-C: the daemon stops, the demo volume is unmounted and detached.
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(blocksnap::loopdev::find_by_backing(&demo_dir.join("volume.img")).is_none());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&demo_dir.display().to_string().replace(' ', "\\040")));
}
