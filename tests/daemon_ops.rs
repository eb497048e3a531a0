//! The daemon's operations when they overlap, on the real daemon: deletes
//! while a snapshot is read, concurrent catalog updates and a kill -9,
//! kill -9 during reverts, a panicking job, metadata limits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::Digest;

const VOL: &str = "c849a193-5275-4527-9e5a-69b2a05933aa";

fn sha(path: &Path, len: u64) -> String {
    use std::io::Read;
    let f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f.take(len), &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Fill `mib` MiB of `dev` with random data, 1 MiB at a time, and fsync.
fn fill(dev: &Path, mib: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    for i in 0..mib {
        f.write_all_at(&random_bytes(seed ^ (i * 7919), 1 << 20), i << 20)
            .unwrap();
    }
    f.sync_all().unwrap();
}

/// Rewrite `percent`% of the 1 MiB regions of `dev` with random data.
fn rewrite(dev: &Path, size: u64, percent: u64, rng: &mut Rng) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    for i in 0..(size >> 20) {
        if rng.below(100) < percent {
            f.write_all_at(&random_bytes(rng.next(), 1 << 20), i << 20)
                .unwrap();
        }
    }
    f.sync_all().unwrap();
}

fn wait_file(p: &Path, d: &DaemonProc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "fault point not reached:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const TENANTS: [(&str, &str); 2] = [(TENANT, TOKEN), (TENANT2, TOKEN2)];

/// A call as tenant `t` (0 or 1); `Err` if no answer came.
fn call_as(
    socket: &Path,
    t: usize,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Resp> {
    let (tenant, token) = TENANTS[t];
    try_http(
        socket,
        method,
        &format!("/v1/{tenant}{path}"),
        Some(token),
        body,
        &[],
    )
}

/// A snapshot as tenant `t` sees it, once it is no longer being created.
fn wait_snapshot_as(d: &DaemonProc, id: &str, t: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = call_as(&d.socket, t, "GET", &format!("/snapshots/{id}"), None).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let s = r.json()["snapshot"].clone();
        if s["status"] != "creating" {
            return s;
        }
        assert!(Instant::now() < deadline, "snapshot {id} stuck: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn revert(d: &DaemonProc, snap: &str) -> Resp {
    d.call(
        "POST",
        &format!("/volumes/{VOL}/action"),
        Some(&format!(r#"{{"revert": {{"snapshot_id": "{snap}"}}}}"#)),
    )
}

/// Issue 10 item 1: a snapshot that is read (a volume made from it, a
/// revert to it) or that the next snapshot builds on is not deleted under
/// the operation; the delete is refused, naming what runs.
#[test]
fn deletes_are_refused_while_a_volume_is_made_a_revert_or_the_next_take_runs() {
    if !root("deletes_are_refused_while_a_volume_is_made_a_revert_or_the_next_take_runs") {
        return;
    }
    const SIZE: u64 = 320 << 20;
    let vol = Loop::new(SIZE);
    fill(&vol.dev, 300, 11);
    let mut d = DaemonProc::start("", &volume_toml(VOL, &vol.dev, "quiesce = \"none\""));
    let s1 = d.snapshot(VOL, "big");
    let want = sha(&vol.dev, SIZE);

    // A volume from it, and at once a delete of it.
    let r = d.call(
        "POST",
        "/volumes",
        Some(&format!(r#"{{"volume": {{"snapshot_id": "{s1}"}}}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let made = r.json()["volume"]["id"].as_str().unwrap().to_string();
    let r = d.call("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(r.status, 400, "the delete was accepted: {}", r.body);
    assert_eq!(
        r.error(),
        (
            "badRequest".into(),
            format!("Invalid snapshot: snapshot {s1} is in use: volume {made} is being created from it; try again when it has finished")
        )
    );
    let v = d.wait_volume(&made, &["creating"]);
    assert_eq!(v["status"], "available", "{v}\n{}", d.log_text());
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sha(Path::new(&dev), SIZE), want, "made volume differs");
    assert_eq!(
        d.call("GET", &format!("/snapshots/{s1}"), None).json()["snapshot"]["status"],
        "available"
    );
    assert_eq!(
        d.call("DELETE", &format!("/volumes/{made}"), None).status,
        202
    );
    assert!(d.wait_volume(&made, &["deleting"]).is_null());

    // During a revert to it.
    let signal = d.dir.path().join("reached");
    let sig = signal.to_str().unwrap().to_string();
    d.stop();
    d.set_env(&[
        ("BLOCKSNAP_FAULT_POINT", "revert-mid"),
        ("BLOCKSNAP_FAULT_ACTION", "delay:3000"),
        ("BLOCKSNAP_FAULT_SIGNAL_FILE", &sig),
    ]);
    d.spawn();
    let mut rng = Rng::new(5);
    rewrite(&vol.dev, SIZE, 30, &mut rng);
    assert_eq!(revert(&d, &s1).status, 202);
    wait_file(&signal, &d);
    let r = d.call("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(
        r.error(),
        (
            "badRequest".into(),
            format!("Invalid snapshot: volume {VOL} is busy: volume {VOL} is being reverted to snapshot {s1}; try again when it has finished")
        )
    );
    let v = d.wait_volume(VOL, &["reverting"]);
    assert_eq!(v["metadata"]["blocksnap:reverted_to"], s1.as_str(), "{v}");
    assert_eq!(sha(&vol.dev, SIZE), want, "reverted volume differs");

    // During the next snapshot's take.
    std::fs::remove_file(&signal).unwrap();
    d.stop();
    d.set_env(&[
        ("BLOCKSNAP_FAULT_POINT", "mid-scan"),
        ("BLOCKSNAP_FAULT_ACTION", "delay:3000"),
        ("BLOCKSNAP_FAULT_SIGNAL_FILE", &sig),
    ]);
    d.spawn();
    rewrite(&vol.dev, SIZE, 10, &mut rng);
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    let s2 = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    wait_file(&signal, &d);
    let r = d.call("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(
        r.error(),
        (
            "badRequest".into(),
            format!("Invalid snapshot: volume {VOL} is busy: snapshot {s2} is being created; try again when it has finished")
        )
    );
    assert_eq!(d.wait_snapshot(&s2)["status"], "available");
    let now = sha(&vol.dev, SIZE);
    // Now it can go, and the later snapshot still restores exactly.
    assert_eq!(
        d.call("DELETE", &format!("/snapshots/{s1}"), None).status,
        202
    );
    assert!(d.wait_snapshot(&s1).is_null());
    let img = restore_image(&d.chain(VOL), &s2);
    assert_eq!(sha(&img.image, SIZE), now);
}

/// Issue 10 item 2: 8 clients renaming snapshots and setting metadata at
/// once; the catalog file is always valid; kill -9 while they run; after
/// the restart every answered change is there and each tenant sees only
/// its own snapshots.
#[test]
fn concurrent_updates_are_never_lost_even_by_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 4 << 20, 3);
    let mut d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    let socket = d.socket.clone();
    let call = |t: usize, method: &str, path: &str, body: Option<&str>| {
        call_as(&socket, t, method, path, body)
    };
    // Snapshot i belongs to tenant i % 2.
    let mut snaps = Vec::new();
    for i in 0..8 {
        let r = call(
            i % 2,
            "POST",
            "/snapshots",
            Some(&format!(
                r#"{{"snapshot": {{"volume_id": "{VOL}", "display_name": "s{i}"}}}}"#
            )),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
        assert_eq!(wait_snapshot_as(&d, &id, i % 2)["status"], "available");
        snaps.push(id);
    }
    let stop = AtomicBool::new(false);
    let invalid = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    // Per client: answered renames of its snapshot (in order), the name in
    // flight when the daemon died, answered metadata keys per snapshot.
    #[derive(Default)]
    struct Client {
        names: Vec<String>,
        in_flight: Option<String>,
        keys: BTreeMap<String, Vec<String>>,
        unanswered_keys: BTreeMap<String, Vec<String>>,
    }
    let clients: Vec<Mutex<Client>> = (0..8).map(|_| Mutex::new(Client::default())).collect();
    let catalog = d.state.join("catalog.json");
    std::thread::scope(|s| {
        // The reader: the catalog file, whenever it is one JSON file, is
        // valid JSON; and the API's list is always a valid answer. (A
        // catalog kept in a database has no such file; its list still
        // counts.)
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(b) = std::fs::read(&catalog) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if serde_json::from_slice::<Value>(&b).is_err() {
                        invalid.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Ok(r) = call(0, "GET", "/snapshots/detail", None) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    let ok = r.status == 200
                        && serde_json::from_str::<Value>(&r.body)
                            .is_ok_and(|v| v["snapshots"].is_array());
                    if !ok {
                        invalid.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        for i in 0..8 {
            let (clients, stop, snaps, call) = (&clients, &stop, &snaps, &call);
            s.spawn(move || {
                let t = i % 2;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let name = format!("c{i}-{n}");
                    clients[i].lock().unwrap().in_flight = Some(name.clone());
                    let r = call(
                        t,
                        "PUT",
                        &format!("/snapshots/{}", snaps[i]),
                        Some(&format!(r#"{{"snapshot": {{"display_name": "{name}"}}}}"#)),
                    );
                    match r {
                        Ok(r) => {
                            assert_eq!(r.status, 200, "{}", r.body);
                            let mut c = clients[i].lock().unwrap();
                            c.names.push(name);
                            c.in_flight = None;
                        }
                        Err(_) => break,
                    }
                    // Metadata on a snapshot of the same tenant another
                    // client renames.
                    let target = &snaps[(i + 2 * (n as usize % 4)) % 8];
                    let key = format!("k{i}-{n}");
                    let r = call(
                        t,
                        "POST",
                        &format!("/snapshots/{target}/metadata"),
                        Some(&format!(r#"{{"metadata": {{"{key}": "v"}}}}"#)),
                    );
                    let mut c = clients[i].lock().unwrap();
                    match r {
                        Ok(r) => {
                            assert_eq!(r.status, 200, "{}", r.body);
                            c.keys.entry(target.clone()).or_default().push(key);
                        }
                        Err(_) => {
                            c.unanswered_keys
                                .entry(target.clone())
                                .or_default()
                                .push(key);
                            break;
                        }
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(4));
        // The worst moment: every client has a request in flight.
        d.kill9();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
    });
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "the reader never read the catalog"
    );
    assert_eq!(
        invalid.load(Ordering::Relaxed),
        0,
        "the catalog (file or list) was invalid in {} of {} reads",
        invalid.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed)
    );
    d.spawn();
    let answered: usize = clients.iter().map(|c| c.lock().unwrap().names.len()).sum();
    assert!(
        answered > 50,
        "only {answered} renames in 4 s:\n{}",
        d.log_text()
    );
    for (i, id) in snaps.iter().enumerate() {
        let s = wait_snapshot_as(&d, id, i % 2);
        let name = s["display_name"].as_str().unwrap();
        {
            let c = clients[i].lock().unwrap();
            let ok: Vec<&String> = c
                .names
                .last()
                .into_iter()
                .chain(c.in_flight.iter())
                .collect();
            assert!(
                ok.iter().any(|n| *n == name),
                "snapshot {i}: name {name:?} is not its last answered rename {ok:?}"
            );
        }
        for c in &clients {
            let c = c.lock().unwrap();
            for k in c.keys.get(id).into_iter().flatten() {
                assert!(
                    s["metadata"].get(k).is_some(),
                    "snapshot {i}: answered metadata {k} lost"
                );
            }
        }
    }
    // Each tenant sees only its own.
    for (t, (tenant, _)) in TENANTS.iter().enumerate() {
        let list = call_as(&d.socket, t, "GET", "/snapshots", None)
            .unwrap()
            .json();
        let seen: BTreeSet<String> = list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        let own: BTreeSet<String> = snaps
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == t)
            .map(|(_, s)| s.clone())
            .collect();
        assert_eq!(seen, own, "tenant {tenant}");
    }
}

/// Issue 10 item 3: kill -9 during a revert, many rounds: afterwards the
/// volume holds the snapshot (the revert was resumed), or it is marked
/// partly reverted when it cannot be resumed; never silently half done.
#[test]
fn kill_9_during_a_revert_never_leaves_it_half_done_in_silence() {
    if !root("kill_9_during_a_revert_never_leaves_it_half_done_in_silence") {
        return;
    }
    const SIZE: u64 = 256 << 20;
    let vol = Loop::new(SIZE);
    fill(&vol.dev, 256, 21);
    let mut d = DaemonProc::start("", &volume_toml(VOL, &vol.dev, "quiesce = \"none\""));
    let snap = d.snapshot(VOL, "base");
    let want = sha(&vol.dev, SIZE);
    // An earlier, completed revert: its metadata must not survive a later
    // revert that did not complete.
    let mut rng = Rng::new(77);
    rewrite(&vol.dev, SIZE, 5, &mut rng);
    assert_eq!(revert(&d, &snap).status, 202);
    d.wait_volume(VOL, &["reverting"]);
    let mut interrupted = 0;
    for round in 0..8 {
        rewrite(&vol.dev, SIZE, 60, &mut rng);
        // Odd rounds kill at the revert's midpoint; even ones at a random moment.
        let deterministic = round % 2 == 1;
        d.stop();
        if deterministic {
            d.set_env(&[
                ("BLOCKSNAP_FAULT_POINT", "revert-mid"),
                ("BLOCKSNAP_FAULT_ACTION", "kill"),
            ]);
        } else {
            d.set_env(&[]);
        }
        d.spawn();
        let r = revert(&d, &snap);
        assert_eq!(r.status, 202, "{}", r.body);
        if deterministic {
            let deadline = Instant::now() + Duration::from_secs(60);
            while d.child.as_mut().unwrap().try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "revert-mid never reached");
                std::thread::sleep(Duration::from_millis(10));
            }
            d.child = None;
        } else {
            std::thread::sleep(Duration::from_millis(100 + rng.below(800)));
            d.kill9();
        }
        let mid = sha(&vol.dev, SIZE) != want;
        if mid {
            interrupted += 1;
        }
        d.set_env(&[]);
        // Once: the device is held by someone else at the restart, so the
        // revert cannot be resumed.
        let holder = (round == 3).then(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&vol.dev)
                .unwrap()
        });
        d.spawn();
        let v = d.wait_volume(VOL, &["reverting"]);
        if holder.is_some() {
            assert_eq!(v["status"], "error", "round {round}: {v}");
            let e = v["blocksnap:error"].as_str().unwrap();
            assert!(
                e.starts_with(&format!("partly reverted to {snap}; revert again")),
                "round {round}: {e}"
            );
            assert!(v["metadata"].get("blocksnap:reverted_to").is_none(), "{v}");
            drop(holder);
            assert_eq!(revert(&d, &snap).status, 202);
            let v = d.wait_volume(VOL, &["reverting"]);
            assert_eq!(v["status"], "available", "{v}");
        } else {
            assert_eq!(v["status"], "available", "round {round}: {v}");
            assert_eq!(v["metadata"]["blocksnap:reverted_to"], snap.as_str(), "{v}");
        }
        assert_eq!(
            sha(&vol.dev, SIZE),
            want,
            "round {round}: the volume is not fully reverted and not marked"
        );
        writeln!(std::io::stderr(), "round {round}: killed mid-revert: {mid}").unwrap();
    }
    assert!(
        interrupted >= 4,
        "only {interrupted} rounds were killed mid-revert"
    );
}

/// Issue 10 item 4: a job that panics frees the volume and marks its record
/// error; a frozen filesystem is thawed on the way out.
#[test]
fn a_panicking_job_frees_the_volume_and_marks_the_record() {
    if !root("a_panicking_job_frees_the_volume_and_marks_the_record") {
        return;
    }
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    std::fs::write(m.dir.join("f"), random_bytes(9, 4 << 20)).unwrap();
    let d = DaemonProc::start_with_env(
        "",
        &volume_toml(VOL, &vol.dev, ""),
        &[
            ("BLOCKSNAP_FAULT_POINT", "mid-scan"),
            ("BLOCKSNAP_FAULT_ACTION", "panic"),
        ],
    );
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let s = d.wait_snapshot(&id);
    assert_eq!(s["status"], "error", "{s}");
    assert_eq!(
        s["blocksnap:error"],
        "internal error: injected panic at fault point mid-scan; see the log"
    );
    assert!(!is_frozen(&m.dir), "the panic left the filesystem frozen");
    assert!(d.log_text().contains("a job panicked"));
    let metrics = http(&d.socket, "GET", "/metrics", Some(TOKEN), None).body;
    assert!(
        metrics.contains("blocksnap_job_panics_total 1"),
        "{metrics}"
    );
    // The volume is free: the next snapshot runs (the fault fires once).
    let next = d.snapshot(VOL, "after");
    let (rm, _l, _t) = restore_and_mount(&d.chain(VOL), &next);
    assert!(rm.dir.join("f").exists());
}

/// Issue 12 §3: Cinder's limits on metadata, answered 400/413.
#[test]
fn metadata_is_limited_as_in_cinder() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    let snap = d.snapshot(VOL, "s");
    let post = |body: String| d.call("POST", &format!("/snapshots/{snap}/metadata"), Some(&body));
    let r = post(format!(r#"{{"metadata": {{"k": "{}"}}}}"#, "v".repeat(256)));
    assert_eq!(
        r.error(),
        (
            "overLimit".into(),
            "Invalid metadata size: Metadata property value greater than 255 characters.".into()
        )
    );
    let r = post(format!(r#"{{"metadata": {{"{}": "v"}}}}"#, "k".repeat(256)));
    assert_eq!(r.status, 413, "{}", r.body);
    let r = post(r#"{"metadata": {"": "v"}}"#.into());
    assert_eq!(
        r.error(),
        (
            "badRequest".into(),
            "Invalid metadata: Metadata property key blank.".into()
        )
    );
    let many: Vec<String> = (0..129).map(|i| format!(r#""k{i}": "v""#)).collect();
    let r = post(format!(r#"{{"metadata": {{{}}}}}"#, many.join(",")));
    assert_eq!(
        r.error(),
        (
            "overLimit".into(),
            "Maximum number of metadata items exceeds 128".into()
        )
    );
    // Nothing of the refused requests was kept; 128 items are fine.
    let r = post(format!(r#"{{"metadata": {{{}}}}}"#, many[..128].join(",")));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["metadata"].as_object().unwrap().len(), 128);
    let r = d.call(
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"size": 1, "metadata": {{"k": "{}"}}}}}}"#,
            "v".repeat(300)
        )),
    );
    assert_eq!(r.status, 413, "{}", r.body);
}
