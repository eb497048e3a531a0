//! Backups to a real S3 server (moto, on 127.0.0.1), through the real CLI:
//! round trips restored on a "new host", a kill -9 mid-upload and its
//! resume, injected server faults, damage in the bucket, deletes from the
//! middle of a series, and encryption.

mod backup_support;
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backup_support::*;
use common::*;

const KEY: [u8; 32] = [0x5a; 32];

fn blocksnap(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    Command::new(bin("blocksnap"))
        .args(args.iter().map(|a| a.as_ref()))
        .env("BLOCKSNAP_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = blocksnap(args);
    assert!(
        out.status.success(),
        "blocksnap {:?} failed ({}): {}{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `chain backup` of `snap`; returns the backup id.
fn backup(chain: &Path, snap: &str, cfg: &Path, volume: &str, extra: &[&str]) -> String {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"chain",
        &"backup",
        &chain,
        &snap,
        &"--config",
        &cfg,
        &"--remote",
        &"s3",
        &"--volume",
        &volume,
    ];
    for e in extra {
        args.push(e);
    }
    let id = last_line(&ok(&args));
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "not an id: {id:?}");
    id
}

/// Restore `id` into a new file under `dir`; its bytes.
fn restored(cfg: &Path, volume: &str, id: &str, dir: &Path) -> Vec<u8> {
    let t = dir.join(format!("restored-{id}"));
    ok(&[
        &"backup",
        &"restore",
        &"--config",
        &cfg,
        &"s3",
        &volume,
        &id,
        &t,
    ]);
    let b = read_all(&t);
    std::fs::remove_file(&t).unwrap();
    b
}

fn list_ids(cfg: &Path, volume: &str) -> Vec<String> {
    let out = ok(&[
        &"backup",
        &"list",
        &"--config",
        &cfg,
        &"s3",
        &volume,
        &"--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Change `n` scattered 4 KiB blocks of `dev`, a few to zeros.
fn scribble(dev: &Path, size: u64, n: u64, rng: &mut Rng) {
    for k in 0..n {
        let off = rng.below(size / 4096) * 4096;
        let data = if k % 7 == 0 {
            vec![0u8; 4096]
        } else {
            random_bytes(rng.next(), 4096)
        };
        write_at(dev, off, &data);
    }
}

fn remote_store(cfg: &Path) -> blocksnap::backup::Remote {
    let rs = blocksnap::config::load_remotes(cfg).unwrap();
    blocksnap::backup::Remote::open(&rs[0]).unwrap()
}

#[test]
fn a_full_and_five_incrementals_restore_exactly_on_a_new_host() {
    if !root("backup round trip") || !have_server("backup round trip") {
        return;
    }
    let server = S3Server::start();
    let files = remote_files(
        &server.endpoint(),
        Some(&KEY),
        "object_size = \"6MiB\"\npart_size = \"5MiB\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let size = 40u64 << 20;
    let img = work.path().join("seed.img");
    make_image(&img, size, 15);
    let dev = Loop::from_image(&img);
    let chain = work.path().join("vol.chain");
    let mut rng = Rng::new(15);
    let mut expected = Vec::new();
    for round in 0..6 {
        if round > 0 {
            scribble(&dev.dev, size, 200, &mut rng);
        }
        let snap = take(&dev.dev, &chain, &["--quiesce", "none"]);
        let id = backup(&chain, &snap, &files.config, "vol-1", &[]);
        expected.push((id, read_all(&dev.dev)));
    }
    let ids = list_ids(&files.config, "vol-1");
    assert_eq!(
        ids,
        expected.iter().map(|e| e.0.clone()).collect::<Vec<_>>()
    );
    // A new host: no chain, no local state; only the remote's settings,
    // its credentials and the key, copied into a fresh directory.
    let host = tempfile::tempdir().unwrap();
    let cfg = host.path().join("remotes.toml");
    let text = std::fs::read_to_string(&files.config).unwrap().replace(
        &files.dir.path().display().to_string(),
        &host.path().display().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    for f in ["credentials.toml", "backup.key"] {
        std::fs::copy(files.dir.path().join(f), host.path().join(f)).unwrap();
    }
    drop(files);
    for (id, want) in &expected {
        assert_same(&restored(&cfg, "vol-1", id, host.path()), want, id);
    }
    // A block device target: the newest onto another loop device.
    let target = Loop::new(size + (1 << 20));
    let (last, want) = expected.last().unwrap();
    ok(&[
        &"backup",
        &"restore",
        &"--config",
        &cfg,
        &"s3",
        &"vol-1",
        last,
        &target.dev,
    ]);
    assert_same(
        &read_all(&target.dev)[..size as usize],
        want,
        "device target",
    );
    ok(&[&"backup", &"verify", &"--config", &cfg, &"s3", &"vol-1"]);
}

#[test]
fn a_backup_killed_mid_upload_resumes_without_uploading_anything_twice() {
    if !have_server("backup kill -9") {
        return;
    }
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    // Slow enough to be killed in the middle; objects in several parts.
    let files = remote_files(
        &proxy.endpoint(),
        None,
        "object_size = \"12MiB\"\npart_size = \"5MiB\"\nbandwidth_limit = \"12MiB\"\nconcurrency = 2\n",
    );
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    std::fs::write(&img, random_bytes(3, 64 << 20)).unwrap();
    let chain = work.path().join("c.chain");
    let snap = take(&img, &chain, &[]);
    let mut child = Command::new(bin("blocksnap"))
        .args(["chain", "backup"])
        .arg(&chain)
        .arg(&snap)
        .arg("--config")
        .arg(&files.config)
        .args(["--remote", "s3", "--volume", "v"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let done = proxy
            .log()
            .iter()
            .filter(|e| e.upload_id().is_some_and(|k| k.contains("/objects/")))
            .count();
        if done >= 4 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        list_ids(&files.config, "v").is_empty(),
        "a killed backup looks complete"
    );
    let first = backup(&chain, &snap, &files.config, "v", &[]);
    let mut uploads: HashMap<String, usize> = HashMap::new();
    for e in proxy.log() {
        if let Some(k) = e.upload_id().filter(|k| k.contains("/objects/")) {
            *uploads.entry(k).or_default() += 1;
        }
    }
    let twice: Vec<_> = uploads.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "uploaded twice: {twice:?}");
    assert_eq!(list_ids(&files.config, "v"), vec![first.clone()]);
    assert_same(
        &restored(&files.config, "v", &first, work.path()),
        &read_all(&img),
        "resumed backup",
    );
}

#[test]
fn server_faults_are_retried_and_a_failed_backup_leaves_nothing_complete() {
    if !have_server("backup server faults") {
        return;
    }
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    let files = remote_files(
        &proxy.endpoint(),
        None,
        "object_size = \"2MiB\"\ntimeout_seconds = 1\nretries = 4\nretry_delay_seconds = 0.05\n",
    );
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    make_image(&img, 24 << 20, 8);
    let chain = work.path().join("c.chain");
    let snap = take(&img, &chain, &[]);
    // Every third request fails with 500 or 503, every third object upload
    // is slower than the client waits.
    proxy.set(Faults {
        fail_every: Some(3),
        statuses: vec![500, 503],
        slow_every: Some(3),
        slow_match: ("PUT".into(), "/objects/".into()),
        slow_for: Duration::from_millis(1500),
        ..Default::default()
    });
    let id = backup(&chain, &snap, &files.config, "v", &[]);
    let log = proxy.log();
    assert!(log.iter().any(|e| e.injected && e.status == 500));
    assert!(log.iter().any(|e| e.injected && e.status == 503));
    // A request held past the client's timeout was sent again.
    let path = |e: &Entry| e.target.split('?').next().unwrap_or("").to_string();
    assert!(
        log.iter().enumerate().any(|(i, e)| e.slowed
            && log.iter().enumerate().any(|(j, l)| j != i
                && !l.injected
                && !l.slowed
                && l.status == 200
                && l.method == e.method
                && path(l) == path(e))),
        "no slow request was retried"
    );
    proxy.set(Faults::default());
    assert_same(
        &restored(&files.config, "v", &id, work.path()),
        &read_all(&img),
        "faulty backup",
    );
    // A server that keeps failing: the backup fails, and nothing of it
    // looks complete.
    write_at(&img, 4096, &random_bytes(1, 1 << 20));
    let snap2 = take(&img, &chain, &[]);
    proxy.set(Faults {
        fail_all: true,
        ..Default::default()
    });
    let out = blocksnap(&[
        &"chain",
        &"backup",
        &chain,
        &snap2,
        &"--config",
        &files.config,
        &"--remote",
        &"s3",
        &"--volume",
        &"v",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("503") && err.contains("after 5 attempt(s)"),
        "{err}"
    );
    proxy.set(Faults::default());
    assert_eq!(list_ids(&files.config, "v"), vec![id]);
}

#[test]
fn damaged_and_missing_objects_are_named_and_stop_a_restore() {
    if !have_server("backup damage") {
        return;
    }
    let server = S3Server::start();
    let files = remote_files(&server.endpoint(), None, "object_size = \"1MiB\"\n");
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    make_image(&img, 8 << 20, 4);
    let chain = work.path().join("c.chain");
    let snap = take(&img, &chain, &[]);
    let id = backup(&chain, &snap, &files.config, "v", &[]);
    ok(&[
        &"backup",
        &"verify",
        &"--config",
        &files.config,
        &"s3",
        &"v",
    ]);
    let remote = remote_store(&files.config);
    let objects = remote.store().list("v/objects/").unwrap();
    assert!(objects.len() >= 3);
    let damaged = &objects[0].key;
    let missing = &objects[1].key;
    let mut bytes = remote.store().get(damaged).unwrap().unwrap();
    bytes[1000] ^= 0x40;
    remote
        .store()
        .put(
            damaged,
            &bytes,
            blocksnap::backup::store::PutMode::Overwrite,
        )
        .unwrap();
    remote.store().delete(missing).unwrap();
    let out = blocksnap(&[
        &"backup",
        &"verify",
        &"--config",
        &files.config,
        &"s3",
        &"v",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(damaged.as_str()) && l.contains("damaged") && l.contains(&id)),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(missing.as_str()) && l.contains("missing")),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("DAMAGED")).count(),
        2,
        "{text}"
    );
    let t = work.path().join("t");
    let out = blocksnap(&[
        &"backup",
        &"restore",
        &"--config",
        &files.config,
        &"s3",
        &"v",
        &id,
        &t,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(damaged.as_str()) || err.contains(missing.as_str()),
        "{err}"
    );
}

#[test]
fn deleting_a_backup_from_the_middle_keeps_every_other_one_exact() {
    if !have_server("backup delete") {
        return;
    }
    let server = S3Server::start();
    let files = remote_files(&server.endpoint(), None, "object_size = \"1MiB\"\n");
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    make_image(&img, 16 << 20, 5);
    let chain = work.path().join("c.chain");
    let mut rng = Rng::new(5);
    let mut all = Vec::new();
    for round in 0..5 {
        if round > 0 {
            scribble(&img, 16 << 20, 300, &mut rng);
        }
        let snap = take(&img, &chain, &[]);
        all.push((
            backup(&chain, &snap, &files.config, "v", &[]),
            read_all(&img),
        ));
    }
    let (gone, _) = all.remove(2);
    ok(&[
        &"backup",
        &"delete",
        &"--config",
        &files.config,
        &"s3",
        &"v",
        &gone,
    ]);
    assert_eq!(
        list_ids(&files.config, "v"),
        all.iter().map(|a| a.0.clone()).collect::<Vec<_>>()
    );
    for (id, want) in &all {
        assert_same(&restored(&files.config, "v", id, work.path()), want, id);
    }
    ok(&[
        &"backup",
        &"verify",
        &"--config",
        &files.config,
        &"s3",
        &"v",
    ]);
    // Nothing was left that no backup needs.
    let out = ok(&[&"backup", &"gc", &"--config", &files.config, &"s3", &"v"]);
    let _ = out;
    let remote = remote_store(&files.config);
    let listed = remote.store().list("v/objects/").unwrap().len();
    let mut referenced = std::collections::HashSet::new();
    for (s, i) in remote.backups("v").unwrap() {
        for o in remote.manifest("v", s, i).unwrap().objects {
            referenced.insert(o.name);
        }
    }
    assert_eq!(listed, referenced.len());
}

#[test]
fn encrypted_backups_hold_no_plaintext_and_a_wrong_key_is_named() {
    if !have_server("backup encryption") {
        return;
    }
    let server = S3Server::start();
    let files = remote_files(&server.endpoint(), Some(&KEY), "");
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    // Text-like data: easy to find if it leaked.
    let line = b"blocksnap plaintext marker line 0123456789\n";
    let data: Vec<u8> = line.iter().copied().cycle().take(4 << 20).collect();
    std::fs::write(&img, &data).unwrap();
    let chain = work.path().join("c.chain");
    let snap = take(&img, &chain, &[]);
    let id = backup(&chain, &snap, &files.config, "v", &[]);
    let remote = remote_store(&files.config);
    let everything = remote.store().list("").unwrap();
    assert!(everything.iter().any(|o| o.key.starts_with("v/objects/")));
    for o in &everything {
        let b = remote.store().get(&o.key).unwrap().unwrap();
        assert!(
            !b.windows(16).any(|w| w == &line[..16]),
            "plaintext in {}",
            o.key
        );
    }
    // Another key file: named as the wrong key, not as damage.
    let other = remote_files(&server.endpoint(), Some(&[1u8; 32]), "");
    let t = work.path().join("t");
    let out = blocksnap(&[
        &"backup",
        &"restore",
        &"--config",
        &other.config,
        &"s3",
        &"v",
        &id,
        &t,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key file") && err.contains("use the key file the backup was made with"),
        "{err}"
    );
    assert_same(
        &restored(&files.config, "v", &id, work.path()),
        &data,
        "encrypted",
    );
}

#[test]
fn credentials_never_appear_in_logs_or_errors() {
    if !have_server("backup credentials") {
        return;
    }
    let server = S3Server::start();
    let proxy = Proxy::start(server.port);
    let files = remote_files(
        &proxy.endpoint(),
        None,
        "retries = 1\nretry_delay_seconds = 0.01\n",
    );
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    make_image(&img, 4 << 20, 2);
    let chain = work.path().join("c.chain");
    let snap = take(&img, &chain, &[]);
    let run = |faults: Faults| {
        proxy.set(faults);
        Command::new(bin("blocksnap"))
            .args(["chain", "backup"])
            .arg(&chain)
            .arg(&snap)
            .arg("--config")
            .arg(&files.config)
            .args(["--remote", "s3", "--volume", "v", "--json"])
            .env("BLOCKSNAP_LOG", "trace")
            .output()
            .unwrap()
    };
    let good = run(Faults::default());
    assert!(good.status.success());
    let bad = run(Faults {
        fail_all: true,
        ..Default::default()
    });
    assert!(!bad.status.success());
    for out in [good, bad] {
        for text in [&out.stdout, &out.stderr] {
            let t = String::from_utf8_lossy(text);
            assert!(!t.is_empty() || text == &out.stdout);
            for secret in [
                ACCESS_KEY,
                SECRET_KEY,
                "X-Amz-Credential",
                "X-Amz-Signature",
            ] {
                assert!(!t.contains(secret), "{secret} in output: {t}");
            }
        }
    }
    // The configuration's Debug form has none of them either.
    let rs = blocksnap::config::load_remotes(&files.config).unwrap();
    let dbg = format!("{rs:?} {:?}", remote_store(&files.config));
    assert!(
        !dbg.contains(ACCESS_KEY) && !dbg.contains(SECRET_KEY),
        "{dbg}"
    );
}
