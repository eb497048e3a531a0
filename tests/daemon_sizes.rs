//! Sizes on the real daemon (issue 12, items 7 to 9): a volume the state
//! directory's filesystem cannot hold is refused when asked; after a
//! configured device shrank, snapshots say how to go on and a full one
//! works; a revert to a snapshot of another size is refused and writes
//! nothing, also when the device grows after the request was accepted.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::Digest;

const VOL: &str = "c849a193-5275-4527-9e5a-69b2a05933aa";
const MIB: u64 = 1 << 20;

fn sha(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Fill `dev` from `offset` with `len` bytes of random data, and fsync.
fn fill(dev: &Path, offset: u64, len: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let mut at = 0;
    while at < len {
        let n = MIB.min(len - at);
        f.write_all_at(&random_bytes(seed ^ at, n as usize), offset + at)
            .unwrap();
        at += n;
    }
    f.sync_all().unwrap();
}

/// Change the size of a loop device's backing file and tell the device.
fn resize(l: &Loop, size: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&l.backing)
        .unwrap();
    f.set_len(size).unwrap();
    drop(f);
    blocksnap::loopdev::refresh_capacity(&l.dev).unwrap();
    let now = blocksnap::device::Device::open(&l.dev, false)
        .unwrap()
        .size();
    assert_eq!(now, size, "the loop device did not take the new size");
}

/// Text without terminal color sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()).starts_with(dir) {
                out.push(format!(
                    "{} -> {}",
                    e.file_name().to_string_lossy(),
                    b.trim()
                ));
            }
        }
    }
    out
}

fn made_volumes(d: &DaemonProc) -> Vec<Value> {
    let r = d.call("GET", "/volumes/detail", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["id"] != VOL)
        .cloned()
        .collect()
}

fn post_volume(d: &DaemonProc, body: &str) -> Resp {
    d.call(
        "POST",
        "/volumes",
        Some(&format!(r#"{{"volume": {body}}}"#)),
    )
}

/// Item 7: the state directory on a small ext4 (4 KiB blocks: files of at
/// most 16 TiB - 4 KiB). 64 TiB is refused with 413 naming both sizes, as
/// is a volume from a snapshot whose data does not fit in the free space;
/// neither leaves a record, an image or a loop device. A blank volume is
/// sparse and fits.
#[test]
fn a_volume_the_state_filesystem_cannot_hold_is_refused_when_asked() {
    if !root("a_volume_the_state_filesystem_cannot_hold_is_refused_when_asked") {
        return;
    }
    let vol = Loop::new(40 * MIB);
    fill(&vol.dev, 0, 40 * MIB, 71);
    let state_fs = Loop::new(72 * MIB);
    // 4 KiB blocks (mkfs.ext4 picks 1 KiB for a filesystem this small).
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(&state_fs.dev)
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted::new(&state_fs.dev, "ext4", "");
    let state = m.dir.join("state");
    let d = DaemonProc::start(
        &format!("state_dir = \"{}\"", state.display()),
        &volume_toml(VOL, &vol.dev, "quiesce = \"none\""),
    );

    // Far larger than any file ext4 can hold.
    let r = post_volume(&d, r#"{"size": 65536}"#);
    assert_eq!(r.status, 413, "{}", r.body);
    let (name, msg) = r.error();
    assert_eq!(name, "overLimit");
    assert!(
        msg.contains("65536G") && msg.contains("16383G") && msg.contains("70368744177664"),
        "{msg}"
    );
    // A size in GB as a string is the same request.
    assert_eq!(post_volume(&d, r#"{"size": "20000"}"#).status, 413);
    assert!(made_volumes(&d).is_empty());
    assert!(loops_under(&state).is_empty(), "{:?}", loops_under(&state));

    // The snapshot's 40 MiB of data are in the chain on the same
    // filesystem: a second copy does not fit.
    let snap = d.snapshot(VOL, "full of data");
    let r = post_volume(&d, &format!(r#"{{"snapshot_id": "{snap}"}}"#));
    assert_eq!(r.status, 413, "{}", r.body);
    let (name, msg) = r.error();
    assert_eq!(name, "overLimit");
    assert!(
        msg.contains(&snap) && msg.contains(&(40 * MIB).to_string()) && msg.contains("free"),
        "{msg}"
    );
    assert!(made_volumes(&d).is_empty());
    assert!(loops_under(&state).is_empty(), "{:?}", loops_under(&state));
    let images: Vec<_> = std::fs::read_dir(state.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(images.is_empty(), "left in volumes/: {images:?}");

    // A blank volume of 1 GB on a 72 MiB filesystem: sparse, it is made.
    let r = post_volume(&d, r#"{"size": 1}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["volume"]["id"].as_str().unwrap().to_string();
    let v = d.wait_volume(&id, &["creating"]);
    assert_eq!(v["status"], "available", "{v}\n{}", d.log_text());
    assert_eq!(
        d.call("DELETE", &format!("/volumes/{id}"), None).status,
        202
    );
    assert!(d.wait_volume(&id, &["deleting"]).is_null());
    assert!(loops_under(&state).is_empty());
}

/// Item 8: after the device shrank, a snapshot is refused with a message
/// that says how to take a full one through the API and the CLI; a full
/// one (API and CLI) is available, says it was full, and restores the
/// shrunk device bit for bit.
#[test]
fn after_a_shrink_a_full_snapshot_is_offered_and_restores_exactly() {
    if !root("after_a_shrink_a_full_snapshot_is_offered_and_restores_exactly") {
        return;
    }
    let vol = Loop::new(32 * MIB);
    fill(&vol.dev, 0, 32 * MIB, 81);
    let d = DaemonProc::start("", &volume_toml(VOL, &vol.dev, "quiesce = \"none\""));
    let before = d.snapshot(VOL, "before");

    resize(&vol, 24 * MIB);
    fill(&vol.dev, 4 * MIB, MIB, 82);
    let create = |extra: &str| {
        d.call(
            "POST",
            "/snapshots",
            Some(&format!(
                r#"{{"snapshot": {{"volume_id": "{VOL}"{extra}}}}}"#
            )),
        )
    };
    let r = create("");
    assert_eq!(r.status, 400, "{}", r.body);
    let (name, msg) = r.error();
    assert_eq!(name, "badRequest");
    assert!(
        msg.contains("shrank")
            && msg.contains(&(32 * MIB).to_string())
            && msg.contains(&(24 * MIB).to_string())
            && msg.contains(&before)
            && msg.contains(r#""full": true"#)
            && msg.contains("blocksnap snapshot create")
            && msg.contains("--full"),
        "{msg}"
    );
    // A bad value of the field is named.
    let r = create(r#", "full": "sometimes""#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().1.contains("full"), "{}", r.body);

    let r = create(r#", "full": true, "display_name": "after""#);
    assert_eq!(r.status, 200, "{}", r.body);
    let full = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let s = d.wait_snapshot(&full);
    assert_eq!(s["status"], "available", "{s}\n{}", d.log_text());
    assert_eq!(s["blocksnap:full"], true, "{s}");
    assert_eq!(s["blocksnap:taken"], "full-scan", "{s}");
    assert_eq!(s["blocksnap:full_scan_reason"], "requested", "{s}");
    assert_eq!(s["size"], 1, "{s}");
    let dir = tempfile::tempdir().unwrap();
    assert_same(
        &restore_bytes(&d.chain(VOL), &full, dir.path()),
        &read_all(&vol.dev),
        "full snapshot after the shrink",
    );
    // The snapshot from before is intact.
    let old = restore_bytes(&d.chain(VOL), &before, dir.path());
    assert_eq!(old.len() as u64, 32 * MIB);
    // An increment follows the full one.
    fill(&vol.dev, 0, MIB, 83);
    let next = d.snapshot(VOL, "next");
    let shown = d.call("GET", &format!("/snapshots/{next}"), None).json();
    assert_eq!(shown["snapshot"]["blocksnap:full"], false, "{shown}");
    assert_same(
        &restore_bytes(&d.chain(VOL), &next, dir.path()),
        &read_all(&vol.dev),
        "increment after the full snapshot",
    );

    // The CLI: shrink again, refused without --full, taken with it.
    resize(&vol, 20 * MIB);
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
        cli(&a)
    };
    let out = client(&["snapshot", "create", VOL, "--wait"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shrank") && err.contains("--full"), "{err}");
    let out = client(&["snapshot", "create", VOL, "--full", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = last_line(&String::from_utf8_lossy(&out.stdout));
    let s = d.wait_snapshot(&id);
    assert_eq!(s["status"], "available", "{s}");
    assert_eq!(s["blocksnap:full"], true, "{s}");
    assert_same(
        &restore_bytes(&d.chain(VOL), &id, dir.path()),
        &read_all(&vol.dev),
        "full snapshot through the CLI",
    );
    // The log (colored on its own) names full takes.
    let log = strip_ansi(&d.log_text());
    assert!(
        log.lines()
            .any(|l| l.contains("snapshot available") && l.contains("full=true")),
        "{log}"
    );
}

/// Item 9: a revert to a snapshot of another size is refused and the
/// device is untouched: when the device grew after the request was
/// accepted (the job checks again before it writes), and when it had
/// grown before the request.
#[test]
fn a_revert_after_the_device_grew_is_refused_and_writes_nothing() {
    if !root("a_revert_after_the_device_grew_is_refused_and_writes_nothing") {
        return;
    }
    let vol = Loop::new(16 * MIB);
    fill(&vol.dev, 0, 16 * MIB, 91);
    let mut d = DaemonProc::start("", &volume_toml(VOL, &vol.dev, "quiesce = \"none\""));
    let snap = d.snapshot(VOL, "16 MiB");
    fill(&vol.dev, 0, 4 * MIB, 92);

    // Accepted at 16 MiB; the device grows before the job writes.
    let signal = d.dir.path().join("reached");
    let sig = signal.to_str().unwrap().to_string();
    d.stop();
    d.set_env(&[
        ("BLOCKSNAP_FAULT_POINT", "revert-before-write"),
        ("BLOCKSNAP_FAULT_ACTION", "delay:2000"),
        ("BLOCKSNAP_FAULT_SIGNAL_FILE", &sig),
    ]);
    d.spawn();
    let revert = || {
        d.call(
            "POST",
            &format!("/volumes/{VOL}/action"),
            Some(&format!(r#"{{"revert": {{"snapshot_id": "{snap}"}}}}"#)),
        )
    };
    let r = revert();
    assert_eq!(r.status, 202, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !signal.exists() {
        assert!(Instant::now() < deadline, "not reached:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    resize(&vol, 20 * MIB);
    fill(&vol.dev, 16 * MIB, 4 * MIB, 93);
    let grown = sha(&vol.dev);
    let v = d.wait_volume(VOL, &["reverting"]);
    assert_eq!(sha(&vol.dev), grown, "the revert wrote to the grown device");
    assert_eq!(v["status"], "available", "{v}");
    let e = v["blocksnap:error"].as_str().unwrap_or_default();
    assert!(
        e.contains(&(20 * MIB).to_string())
            && e.contains(&(16 * MIB).to_string())
            && e.contains("nothing was written"),
        "{v}"
    );
    assert!(v["metadata"].get("blocksnap:reverted_to").is_none(), "{v}");

    // Asked again now: refused at once, naming both sizes.
    let r = revert();
    assert_eq!(r.status, 400, "{}", r.body);
    let (name, msg) = r.error();
    assert_eq!(name, "badRequest");
    assert!(
        msg.contains(&(20 * MIB).to_string())
            && msg.contains(&(16 * MIB).to_string())
            && msg.contains(&snap),
        "{msg}"
    );
    assert_eq!(sha(&vol.dev), grown, "a refused revert wrote");
    let v = d.call("GET", &format!("/volumes/{VOL}"), None).json();
    assert_eq!(v["volume"]["status"], "available", "{v}");
}
