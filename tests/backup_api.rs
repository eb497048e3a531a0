//! Backups through the real daemon: Cinder's v3 (and v2) backups API and
//! the CLI's daemon forms, against a real S3 server (moto on 127.0.0.1,
//! behind the fault-injecting proxy of tests/backup.rs).

mod backup_support;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use backup_support::*;
use common::*;
use serde_json::Value;

const VOL: &str = "vol-a";
const PLAIN: &str = "vol-plain";

fn v3(d: &DaemonProc, method: &str, path: &str, body: Option<&str>) -> Resp {
    http(
        &d.socket,
        method,
        &format!("/v3/{TENANT}{path}"),
        Some(TOKEN),
        body,
    )
}

/// The daemon with `vol-a` (backed up to the remote) and `vol-plain` (no
/// backup_remote), both image files of `size` bytes under `dir`.
fn daemon(dir: &Path, files: &RemoteFiles, size: u64) -> DaemonProc {
    daemon_with(dir, files, size, &[])
}

fn daemon_with(dir: &Path, files: &RemoteFiles, size: u64, env: &[(&str, &str)]) -> DaemonProc {
    make_image(&dir.join("a.img"), size, 3);
    make_image(&dir.join("plain.img"), 1 << 20, 4);
    let remotes = std::fs::read_to_string(&files.config).unwrap();
    DaemonProc::start_with_env(
        "",
        &format!(
            "{remotes}\n{}\n{}",
            volume_toml(
                VOL,
                &dir.join("a.img"),
                &format!("tenant = \"{TENANT}\"\nbackup_remote = \"s3\"")
            ),
            volume_toml(PLAIN, &dir.join("plain.img"), "")
        ),
        env,
    )
}

/// Poll a backup until it is neither creating nor deleting; `Null` once gone.
fn wait_backup(d: &DaemonProc, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = v3(d, "GET", &format!("/backups/{id}"), None);
        if r.status == 404 {
            return Value::Null;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        let b = r.json()["backup"].clone();
        if b["status"] != "creating" && b["status"] != "deleting" {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "backup {id} stuck: {b}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create(d: &DaemonProc, body: &str) -> Resp {
    v3(d, "POST", "/backups", Some(body))
}

fn created_id(r: &Resp) -> String {
    assert_eq!(r.status, 202, "{}", r.body);
    let b = r.json()["backup"].clone();
    let mut keys: Vec<&str> = b.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["id", "links", "name"], "Cinder's create answer: {b}");
    assert_eq!(b["links"][0]["rel"], "self");
    b["id"].as_str().unwrap().to_string()
}

/// Restore backup `id` into a new volume through the API; the new volume's
/// device bytes.
fn restore_bytes(d: &DaemonProc, id: &str, name: &str) -> Vec<u8> {
    let r = v3(
        d,
        "POST",
        &format!("/backups/{id}/restore"),
        Some(&format!(r#"{{"restore": {{"name": "{name}"}}}}"#)),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let out = r.json()["restore"].clone();
    assert_eq!(out["backup_id"], id);
    assert_eq!(out["volume_name"], name);
    let vid = out["volume_id"].as_str().unwrap().to_string();
    let v = d.wait_volume(&vid, &["creating"]);
    assert_eq!(v["status"], "available", "{v}\n{}", d.log_text());
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap()
        .to_string();
    read_all(Path::new(&dev))
}

#[test]
fn backups_through_the_v3_api_restore_into_new_volumes() {
    if !root("backups through the API") || !have_server("backups through the API") {
        return;
    }
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    let files = remote_files(
        &proxy.endpoint(),
        None,
        "object_size = \"1MiB\"\nconcurrency = 1\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let size = 6u64 << 20;
    let mut d = daemon(dir.path(), &files, size);
    let img = dir.path().join("a.img");

    // Refusals: incremental without a backup to build on, a volume without
    // a remote, a volume another tenant cannot see, bad fields.
    let r = create(
        &d,
        &format!(r#"{{"backup": {{"volume_id": "{VOL}", "incremental": true}}}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.error().1,
        "Invalid backup: No backups available to do an incremental backup."
    );
    let r = create(&d, &format!(r#"{{"backup": {{"volume_id": "{PLAIN}"}}}}"#));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.error().1.contains(PLAIN) && r.error().1.contains("backup_remote"),
        "{}",
        r.body
    );
    let other = |method: &str, path: &str, body: Option<&str>| {
        http(
            &d.socket,
            method,
            &format!("/v3/{TENANT2}{path}"),
            Some(TOKEN2),
            body,
        )
    };
    let r = other(
        "POST",
        "/backups",
        Some(&format!(r#"{{"backup": {{"volume_id": "{VOL}"}}}}"#)),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = create(
        &d,
        &format!(r#"{{"backup": {{"volume_id": "{VOL}", "incremental": "maybe"}}}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("backup.incremental"), "{}", r.body);
    let r = create(&d, r#"{"volume_id": "x"}"#);
    assert_eq!(r.status, 400, "{}", r.body);

    // A full backup of a given snapshot, its uploads held up by the remote:
    // meanwhile the snapshot cannot be deleted and a second backup of the
    // volume is refused.
    let s1 = d.snapshot(VOL, "first");
    let want1 = read_all(&img);
    proxy.set(Faults {
        slow_every: Some(1),
        slow_match: ("PUT".into(), "/objects/".into()),
        slow_for: Duration::from_millis(700),
        ..Faults::default()
    });
    let b1 = created_id(&create(
        &d,
        &format!(
            r#"{{"backup": {{"volume_id": "{VOL}", "snapshot_id": "{s1}", "name": "one", "description": "the first"}}}}"#
        ),
    ));
    let r = d.call("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.error()
            .1
            .contains(&format!("backup {b1} is being made of it")),
        "{}",
        r.body
    );
    let r = create(&d, &format!(r#"{{"backup": {{"volume_id": "{VOL}"}}}}"#));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.error()
            .1
            .contains(&format!("backup {b1} is being created")),
        "{}",
        r.body
    );
    let running = v3(&d, "GET", &format!("/backups/{b1}"), None).json()["backup"].clone();
    assert_eq!(running["status"], "creating");
    assert!(running["blocksnap:progress"].is_string(), "{running}");
    let b = wait_backup(&d, &b1);
    proxy.set(Faults::default());
    assert_eq!(b["status"], "available", "{b}\n{}", d.log_text());
    assert_eq!(b["is_incremental"], false);
    assert_eq!(b["snapshot_id"], s1.as_str());
    assert_eq!(b["volume_id"], VOL);
    assert_eq!(b["name"], "one");
    assert_eq!(b["description"], "the first");
    assert_eq!(b["size"], 1);
    assert_eq!(b["blocksnap:size_bytes"], size);
    assert_eq!(b["container"], "s3");
    assert_eq!(b["fail_reason"], Value::Null);
    // Objects of at most 1 MiB hold the non-zero data.
    let uploaded = b["blocksnap:uploaded_bytes"].as_u64().unwrap();
    assert!(uploaded > 0 && uploaded <= size, "{b}");
    assert!(
        b["object_count"].as_u64().unwrap() >= uploaded.div_ceil(1 << 20),
        "{b}"
    );
    assert!(b["data_timestamp"].is_string() && b["updated_at"].is_string());
    // The snapshot can go now.
    let r = d.call("DELETE", &format!("/snapshots/{s1}"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(d.wait_snapshot(&s1).is_null());

    // An incremental backup of the volume as it is now: a snapshot is
    // taken for it.
    write_at(&img, 4096 * 100, &random_bytes(9, 4096 * 3));
    write_at(&img, 5 << 20, &[0u8; 8192]);
    let want2 = read_all(&img);
    let b2 = created_id(&create(
        &d,
        &format!(r#"{{"backup": {{"volume_id": "{VOL}", "incremental": true}}}}"#),
    ));
    let b = wait_backup(&d, &b2);
    assert_eq!(b["status"], "available", "{b}\n{}", d.log_text());
    assert_eq!(b["is_incremental"], true);
    assert_eq!(b["blocksnap:parent_id"], b1.as_str());
    assert!(
        b["blocksnap:changed_bytes"].as_u64().unwrap() <= 5 * 4096,
        "{b}"
    );
    let s2 = b["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_snapshot(&s2)["status"], "available");
    let first = v3(&d, "GET", &format!("/backups/{b1}"), None).json()["backup"].clone();
    assert_eq!(first["has_dependent_backups"], true);

    // Lists: newest first; the summary is Cinder's (id, name, links).
    let list = v3(&d, "GET", "/backups", None).json()["backups"].clone();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b2.as_str(), b1.as_str()]);
    assert_eq!(list[0].as_object().unwrap().len(), 3, "{list}");
    let detail = v3(&d, "GET", "/backups/detail", None).json()["backups"].clone();
    assert_eq!(detail[1]["status"], "available");
    assert_eq!(detail[1]["has_dependent_backups"], true);
    let r = http(
        &d.socket,
        "GET",
        &format!("/v2/{TENANT}/backups/{b2}"),
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["backup"]["links"][0]["href"]
        .as_str()
        .unwrap()
        .contains("/v2/"));
    // Another tenant sees none of them.
    assert_eq!(other("GET", &format!("/backups/{b1}"), None).status, 404);
    assert_eq!(other("DELETE", &format!("/backups/{b1}"), None).status, 404);
    let r = other("GET", "/backups/detail", None);
    assert_eq!(r.json()["backups"], serde_json::json!([]));

    // Restores make new volumes holding exactly the snapshots' bytes; an
    // existing volume is not a target.
    let r = v3(
        &d,
        "POST",
        &format!("/backups/{b2}/restore"),
        Some(&format!(r#"{{"restore": {{"volume_id": "{VOL}"}}}}"#)),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("new volume"), "{}", r.body);
    assert_same(&restore_bytes(&d, &b1, "back1"), &want1, "restore of b1");
    assert_same(&restore_bytes(&d, &b2, "back2"), &want2, "restore of b2");

    // Deleting the full backup its incremental depends on is allowed (the
    // remote merges it into its child); the child still restores exactly.
    let r = v3(&d, "DELETE", &format!("/backups/{b1}"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(wait_backup(&d, &b1).is_null(), "{}", d.log_text());
    let b = v3(&d, "GET", &format!("/backups/{b2}"), None).json()["backup"].clone();
    assert_eq!(
        b["is_incremental"], false,
        "merged with its full parent: {b}"
    );
    assert_eq!(b["blocksnap:parent_id"], Value::Null);
    assert_same(
        &restore_bytes(&d, &b2, "back2-again"),
        &want2,
        "b2 after b1 was deleted",
    );

    // Records survive a restart.
    d.stop();
    d.spawn();
    let b = v3(&d, "GET", &format!("/backups/{b2}"), None).json()["backup"].clone();
    assert_eq!(b["status"], "available", "{b}");
    assert_eq!(b["has_dependent_backups"], false);

    // kill -9 in the middle of an upload: the next start resumes it.
    write_at(&img, 0, &random_bytes(11, 3 << 20));
    let want3 = read_all(&img);
    proxy.clear();
    proxy.set(Faults {
        slow_every: Some(1),
        slow_match: ("PUT".into(), "/objects/".into()),
        slow_for: Duration::from_secs(3),
        ..Faults::default()
    });
    let b3 = created_id(&create(
        &d,
        &format!(r#"{{"backup": {{"volume_id": "{VOL}", "incremental": true}}}}"#),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy
        .log()
        .iter()
        .any(|e| e.method == "PUT" && e.target.contains("/objects/"))
    {
        assert!(Instant::now() < deadline, "no upload started");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    proxy.set(Faults::default());
    d.spawn();
    let b = wait_backup(&d, &b3);
    assert_eq!(b["status"], "available", "{b}\n{}", d.log_text());
    assert!(d.log_text().contains("resuming an interrupted backup"));
    assert_same(&restore_bytes(&d, &b3, "back3"), &want3, "resumed b3");

    let log = d.log_text();
    assert!(
        !log.contains(ACCESS_KEY) && !log.contains(SECRET_KEY),
        "credentials reached the log"
    );
}

#[test]
fn the_cli_backs_up_and_lists_through_the_daemon() {
    if !root("backup CLI through the daemon") || !have_server("backup CLI through the daemon") {
        return;
    }
    let server = S3Server::start();
    let files = remote_files(&server.endpoint(), None, "");
    let dir = tempfile::tempdir().unwrap();
    // Everything logged, the HTTP client's trace (signed URLs) included,
    // were it let through.
    let d = daemon_with(dir.path(), &files, 2 << 20, &[("BLOCKSNAP_LOG", "trace")]);
    let sock = d.socket.display().to_string();
    let client = [
        "--socket",
        &sock,
        "--token",
        TOKEN,
        "--tenant",
        TENANT,
        "--token-file",
        "/nonexistent",
    ];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&client);
        cli(&all)
    };
    let out = run(&[
        "backup",
        "create",
        VOL,
        "--wait",
        "--name",
        "nightly\u{1b}[2J",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = last_line(&String::from_utf8_lossy(&out.stdout));
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("available"));
    let out = run(&["backup", "create", VOL, "--incremental", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id2 = last_line(&String::from_utf8_lossy(&out.stdout));

    let out = run(&["backup", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&id) && text.contains(&id2), "{text}");
    assert!(
        text.contains("incremental") && text.contains("full"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "a control character was printed: {text:?}"
    );
    assert!(text.contains("nightly\\u{1b}[2J"), "{text}");
    let out = run(&["backup", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["id"], id2.as_str());

    let out = run(&["backup", "show", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("has_dependent_backups"));

    // The direct form still reads the remote itself, without the daemon.
    let cfg = files.config.display().to_string();
    let out = cli(["backup", "list", "--config", &cfg, "s3", VOL, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    let out = run(&["backup", "delete", &id2, "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["backup", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = run(&["backup", "create", PLAIN]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backup_remote"));
    let log = d.log_text();
    assert!(log.contains("backup available"), "{log}");
    assert!(
        !log.contains(ACCESS_KEY) && !log.contains(SECRET_KEY),
        "credentials reached the daemon's log"
    );
}

/// A v3 request at microversion `mv` (`"3.47"`).
fn v3_at(d: &DaemonProc, mv: &str, method: &str, path: &str, body: Option<&str>) -> Resp {
    try_http(
        &d.socket,
        method,
        &format!("/v3/{TENANT}{path}"),
        Some(TOKEN),
        body,
        &[("OpenStack-API-Version", &format!("volume {mv}"))],
    )
    .unwrap()
}

/// A full backup of the volume as it is now, waited for; its id.
fn backup_now(d: &DaemonProc, name: &str) -> String {
    let id = created_id(&create(
        d,
        &format!(r#"{{"backup": {{"volume_id": "{VOL}", "name": "{name}"}}}}"#),
    ));
    let b = wait_backup(d, &id);
    assert_eq!(b["status"], "available", "{b}\n{}", d.log_text());
    id
}

/// The path and query of a `*_links` next link (the daemon's base URL cut off).
fn next_of(body: &Value, collection: &str) -> Option<String> {
    let links = body.get(format!("{collection}_links"))?;
    assert_eq!(links[0]["rel"], "next", "{links}");
    let href = links[0]["href"].as_str().unwrap();
    let at = href.find(&format!("/v3/{TENANT}/")).expect("a v3 link");
    Some(href[at..].to_string())
}

/// Follow a list's next links from `first`; the ids of each page, and
/// whether each page had a next link.
fn walk(d: &DaemonProc, first: &str) -> Vec<(Vec<String>, bool)> {
    let mut pages = Vec::new();
    let mut path = Some(first.to_string());
    while let Some(p) = path {
        let r = http(&d.socket, "GET", &p, Some(TOKEN), None);
        assert_eq!(r.status, 200, "{p}: {}", r.body);
        let body = r.json();
        let ids = body["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        path = next_of(&body, "backups");
        pages.push((ids, path.is_some()));
        assert!(pages.len() <= 10, "the links never end: {pages:?}");
    }
    pages
}

fn new_volume(r: &Resp) -> (String, Value) {
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json()["volume"].clone();
    (v["id"].as_str().unwrap().to_string(), v)
}

#[test]
fn backup_lists_page_and_volumes_are_made_from_backups() {
    if !root("backup lists and volumes from backups")
        || !have_server("backup lists and volumes from backups")
    {
        return;
    }
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    let files = remote_files(
        &proxy.endpoint(),
        None,
        "object_size = \"1MiB\"\nconcurrency = 1\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let size = 2u64 << 20;
    let d = daemon(dir.path(), &files, size);
    let img = dir.path().join("a.img");

    // Three backups, each of different data, named out of their order.
    let want1 = read_all(&img);
    let b1 = backup_now(&d, "gamma");
    write_at(&img, 4096 * 7, &random_bytes(21, 4096 * 2));
    let want2 = read_all(&img);
    let b2 = backup_now(&d, "alpha");
    write_at(&img, 1 << 20, &random_bytes(22, 4096));
    let want3 = read_all(&img);
    let b3 = backup_now(&d, "beta");
    assert!(want1 != want2 && want2 != want3);

    // One at a time, newest first, following backups_links: a full page
    // has a next link (Cinder's rule), so the last one leads to an empty
    // page without one.
    let pages = walk(&d, &format!("/v3/{TENANT}/backups?limit=1"));
    assert_eq!(
        pages,
        vec![
            (vec![b3.clone()], true),
            (vec![b2.clone()], true),
            (vec![b1.clone()], true),
            (vec![], false),
        ]
    );
    // The detail list by name, two a page; the link keeps the query.
    // Before 3.37 the key is display_name, as in Cinder.
    let r = v3(&d, "GET", "/backups/detail?sort=name:asc", None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("3.37"), "{}", r.body);
    let pages = walk(
        &d,
        &format!("/v3/{TENANT}/backups/detail?limit=2&sort=display_name:asc"),
    );
    assert_eq!(
        pages,
        vec![
            (vec![b2.clone(), b3.clone()], true),
            (vec![b1.clone()], false)
        ]
    );
    let r = v3_at(
        &d,
        "3.45",
        "GET",
        "/backups/detail?sort=name:desc&limit=1&with_count=true",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["count"], 3, "{body}");
    assert_eq!(body["backups"][0]["name"], "gamma");
    assert_eq!(body["backups"][0]["status"], "available");
    // v2's sort_key/sort_dir, and an offset.
    let r = http(
        &d.socket,
        "GET",
        &format!("/v2/{TENANT}/backups?sort_key=created_at&sort_dir=asc&offset=1"),
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<Value> = r.json()["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(ids, [b2.as_str(), b3.as_str()]);
    // Filters: name, status, volume_id; unknown parameters are dropped
    // before 3.31.
    let r = v3(&d, "GET", "/backups/detail?name=alpha&colour=red", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json()["backups"].clone();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], b2.as_str());
    let r = v3(&d, "GET", &format!("/backups?volume_id={PLAIN}"), None);
    assert_eq!(r.json()["backups"], serde_json::json!([]));
    let r = v3(&d, "GET", "/backups?status=error", None);
    assert_eq!(r.json()["backups"], serde_json::json!([]));
    let r = v3(
        &d,
        "GET",
        &format!("/backups?status=available&volume_id={VOL}"),
        None,
    );
    assert_eq!(r.json()["backups"].as_array().unwrap().len(), 3);
    // Bad values: 400s that say what.
    let marker = "6f0b2f9e-0000-4000-8000-000000000000";
    let r = v3(&d, "GET", &format!("/backups?marker={marker}"), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains(marker), "{}", r.body);
    let r = v3(&d, "GET", "/backups/detail?limit=many", None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("limit"), "{}", r.body);
    let r = v3(&d, "GET", "/backups?sort=id:sideways", None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("sort direction"), "{}", r.body);
    let r = v3_at(&d, "3.31", "GET", "/backups?size=1", None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("size"), "{}", r.body);

    // A volume from a backup (3.47): the restore's own operation. While it
    // reads the backup, the backup shows restoring and cannot be deleted.
    proxy.set(Faults {
        slow_every: Some(1),
        slow_match: ("GET".into(), "/objects/".into()),
        slow_for: Duration::from_millis(700),
        ..Faults::default()
    });
    let (vid, v) = new_volume(&v3_at(
        &d,
        "3.47",
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"backup_id": "{b1}", "name": "from-gamma", "size": null, "snapshot_id": null}}}}"#
        )),
    ));
    assert_eq!(v["status"], "creating", "{v}");
    assert_eq!(v["name"], "from-gamma");
    assert_eq!(v["size"], 1, "the backup's size in GB: {v}");
    let b = v3(&d, "GET", &format!("/backups/{b1}"), None).json()["backup"].clone();
    assert_eq!(b["status"], "restoring", "{b}");
    let r = v3(&d, "DELETE", &format!("/backups/{b1}"), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.error()
            .1
            .contains(&format!("is being restored into volume {vid}")),
        "{}",
        r.body
    );
    let v = d.wait_volume(&vid, &["creating"]);
    proxy.set(Faults::default());
    assert_eq!(v["status"], "available", "{v}\n{}", d.log_text());
    assert_eq!(v["metadata"]["blocksnap:backup_id"], b1.as_str());
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap()
        .to_string();
    assert_same(
        &read_all(Path::new(&dev)),
        &want1,
        "volume from backup gamma",
    );
    let b = wait_backup(&d, &b1);
    assert_eq!(b["status"], "available", "{b}");

    // Larger than the backup (Cinder allows size >= the backup's): the
    // backup's bytes, then zeros.
    let (vid, v) = new_volume(&v3_at(
        &d,
        "3.47",
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"backup_id": "{b2}", "size": 2}}}}"#
        )),
    ));
    assert_eq!(v["size"], 2, "{v}");
    let v = d.wait_volume(&vid, &["creating"]);
    assert_eq!(v["status"], "available", "{v}\n{}", d.log_text());
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap()
        .to_string();
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&dev).unwrap();
        assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 2 << 30, "device size");
        let mut head = vec![0u8; want2.len()];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut head).unwrap();
        assert_same(&head, &want2, "volume of 2 GB from backup alpha");
        let mut tail = vec![1u8; 1 << 20];
        f.seek(SeekFrom::End(-(1 << 20))).unwrap();
        f.read_exact(&mut tail).unwrap();
        assert!(
            tail.iter().all(|&b| b == 0),
            "the grown part reads as zeros"
        );
    }

    // Below 3.47 Cinder's controller takes backup_id all the same (its
    // schemas let it through unchecked since the jsonschema change).
    let (vid, _) = new_volume(&v3_at(
        &d,
        "3.46",
        "POST",
        "/volumes",
        Some(&format!(r#"{{"volume": {{"backup_id": "{b3}"}}}}"#)),
    ));
    let v = d.wait_volume(&vid, &["creating"]);
    assert_eq!(v["status"], "available", "{v}\n{}", d.log_text());
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap()
        .to_string();
    assert_same(
        &read_all(Path::new(&dev)),
        &want3,
        "3.46 volume from backup beta",
    );
    // v2's controller never knew it: a blank volume of the size asked.
    let r = http(
        &d.socket,
        "POST",
        &format!("/v2/{TENANT}/volumes"),
        Some(TOKEN),
        Some(&format!(
            r#"{{"volume": {{"backup_id": "{b3}", "size": 1}}}}"#
        )),
    );
    let (vid, _) = new_volume(&r);
    let v = d.wait_volume(&vid, &["creating"]);
    assert_eq!(v["status"], "available", "{v}");
    assert!(v["metadata"].get("blocksnap:backup_id").is_none(), "{v}");

    // Refusals, in Cinder's words.
    let unknown = "0e5f3d4c-1111-4222-8333-944455566677";
    for mv in ["3.47", "3.46"] {
        let r = v3_at(
            &d,
            mv,
            "POST",
            "/volumes",
            Some(&format!(r#"{{"volume": {{"backup_id": "{unknown}"}}}}"#)),
        );
        assert_eq!(r.status, 404, "{mv}: {}", r.body);
        assert_eq!(r.error().1, format!("Backup {unknown} could not be found."));
    }
    let r = v3_at(
        &d,
        "3.47",
        "POST",
        "/volumes",
        Some(r#"{"volume": {"backup_id": "nope"}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("volume.backup_id"), "{}", r.body);
    let s = d.snapshot(VOL, "s");
    let r = v3_at(
        &d,
        "3.47",
        "POST",
        "/volumes",
        Some(&format!(
            r#"{{"volume": {{"backup_id": "{b1}", "snapshot_id": "{s}"}}}}"#
        )),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.error().1.contains("backup_id cannot be combined"),
        "{}",
        r.body
    );
    // Another tenant's backup is unknown to it.
    let r = try_http(
        &d.socket,
        "POST",
        &format!("/v3/{TENANT2}/volumes"),
        Some(TOKEN2),
        Some(&format!(r#"{{"volume": {{"backup_id": "{b1}"}}}}"#)),
        &[("OpenStack-API-Version", "volume 3.47")],
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    // A backup still being made is not available.
    proxy.set(Faults {
        slow_every: Some(1),
        slow_match: ("PUT".into(), "/objects/".into()),
        slow_for: Duration::from_millis(700),
        ..Faults::default()
    });
    let b4 = created_id(&create(
        &d,
        &format!(r#"{{"backup": {{"volume_id": "{VOL}"}}}}"#),
    ));
    let r = v3_at(
        &d,
        "3.47",
        "POST",
        "/volumes",
        Some(&format!(r#"{{"volume": {{"backup_id": "{b4}"}}}}"#)),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.error().1,
        "Invalid backup: Originating backup status must be one of 'available' values"
    );
    proxy.set(Faults::default());
    assert_eq!(wait_backup(&d, &b4)["status"], "available");
}
