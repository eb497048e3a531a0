//! Consistent snapshots of mounted filesystems on loop devices: freeze,
//! unmount and exclusive modes, page-cache coherence, the freeze limit, and
//! thawing after a killed process.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksnap::quiesce::mountinfo;
use common::*;

/// Write and fsync a file on `mp` from another thread; fail if it does not
/// finish in time (the filesystem would still be frozen).
fn assert_writable(mp: &Path) {
    let p = mp.join(format!("probe-{}", uuid::Uuid::new_v4()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"still writable").unwrap();
        f.sync_all().unwrap();
        std::fs::remove_file(&p).unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{} is not writable (still frozen?)", mp.display()));
}

fn take_args(dev: &Path, chain: &Path, intents: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "chain".into(),
        "take".into(),
        dev.into(),
        chain.into(),
        "--intent-dir".into(),
        intents.into(),
    ];
    a.extend(extra.iter().map(|s| s.into()));
    a
}

fn take_q(dev: &Path, chain: &Path, intents: &Path, extra: &[&str]) -> String {
    last_line(&cli_ok(take_args(dev, chain, intents, extra)))
}

fn list_json(chain: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&cli_ok([
        "chain".as_ref(),
        "list".as_ref(),
        chain.as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap()
}

/// The write a mounted filesystem made after an earlier read of the device
/// must be in the next snapshot (the block device's page cache is stale
/// until invalidated).
fn write_between_snapshots_reaches_the_second(fs: &str, size: u64) {
    let vol = Loop::new(size);
    mkfs(fs, &vol.dev);
    let m = Mounted::new(&vol.dev, fs, "");
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    let file = m.dir.join("data.bin");
    let old = random_bytes(1, 1 << 20);
    let new = random_bytes(2, 1 << 20);
    {
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(&old).unwrap();
        f.sync_all().unwrap();
    }
    let first = take_q(&vol.dev, &chain, &intents, &[]);
    // Fill the block device's page cache with the old bytes, as any earlier
    // reader of the device (a previous scan, a backup tool) would.
    let _ = read_all(&vol.dev);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&new, 0).unwrap();
        f.sync_all().unwrap();
    }
    let second = take_q(&vol.dev, &chain, &intents, &[]);
    assert!(!is_frozen(&m.dir));
    for (id, want) in [(&first, &old), (&second, &new)] {
        let r = restore_image(&chain, id);
        let ro = Loop::from_image(&r.image);
        let rm = Mounted::new(&ro.dev, fs, ro_options(fs));
        let got = std::fs::read(rm.dir.join("data.bin")).unwrap();
        assert!(
            got == *want,
            "{fs}: snapshot {id} does not hold the file as written before it"
        );
    }
    let e = list_json(&chain);
    assert!(
        e[1]["freeze_ms"].as_f64().unwrap() > 0.0,
        "freeze window not recorded"
    );
}

#[test]
fn ext4_write_between_snapshots_reaches_the_second() {
    if root("ext4_write_between_snapshots_reaches_the_second") {
        write_between_snapshots_reaches_the_second("ext4", 64 << 20);
    }
}

#[test]
fn xfs_write_between_snapshots_reaches_the_second() {
    if root("xfs_write_between_snapshots_reaches_the_second") {
        write_between_snapshots_reaches_the_second("xfs", 320 << 20);
    }
}

/// Mount options for a restored copy next to its mounted original (xfs
/// refuses a second filesystem with the same UUID unless told).
fn ro_options(fs: &str) -> &'static str {
    if fs == "xfs" {
        "ro,nouuid"
    } else {
        "ro"
    }
}

const RECORD: usize = 512;

fn record(i: u64) -> Vec<u8> {
    let mut r = random_bytes(i + 1000, RECORD);
    r[..8].copy_from_slice(&i.to_le_bytes());
    r
}

/// A writer appends and fsyncs records during the snapshot; the restored
/// image passes the filesystem's checker and holds every record whose fsync
/// returned before the snapshot began.
fn writer_during_snapshot(fs: &str, size: u64) {
    let vol = Loop::new(size);
    mkfs(fs, &vol.dev);
    let m = Mounted::new(&vol.dev, fs, "");
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    // Some bulk so the scan takes a moment.
    std::fs::write(m.dir.join("bulk"), random_bytes(5, 24 << 20)).unwrap();
    take_q(&vol.dev, &chain, &intents, &[]);

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let log = m.dir.join("log");
    let writer = {
        let (acked, stop, log) = (acked.clone(), stop.clone(), log.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&log).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                f.write_all(&record(i)).unwrap();
                f.sync_data().unwrap();
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    while acked.load(Ordering::SeqCst) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = acked.load(Ordering::SeqCst);
    let id = take_q(&vol.dev, &chain, &intents, &[]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let after = acked.load(Ordering::SeqCst);
    assert!(
        after > before,
        "the writer made no progress during the snapshot"
    );

    let r = restore_image(&chain, &id);
    let check = match fs {
        "ext4" => Command::new("fsck.ext4")
            .args(["-n", "-f"])
            .arg(&r.image)
            .output()
            .unwrap(),
        _ => {
            // A frozen XFS is consistent together with its log, which
            // xfs_repair -n does not replay: mount the copy once to replay
            // it, as recovery would, then check.
            {
                let l = Loop::from_image(&r.image);
                drop(Mounted::new(&l.dev, fs, "nouuid"));
                std::fs::copy(&l.backing, &r.image).unwrap();
            }
            Command::new("xfs_repair")
                .arg("-n")
                .arg("-f")
                .arg(&r.image)
                .output()
                .unwrap()
        }
    };
    assert!(
        check.status.success(),
        "{fs} checker found problems in the restored image:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let ro = Loop::from_image(&r.image);
    let rm = Mounted::new(&ro.dev, fs, ro_options(fs));
    let mut data = Vec::new();
    std::fs::File::open(rm.dir.join("log"))
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    let n = (data.len() / RECORD) as u64;
    assert!(
        n >= before,
        "{fs}: snapshot holds {n} records, {before} were fsynced before it began"
    );
    for i in 1..=before {
        let at = ((i - 1) as usize) * RECORD;
        assert!(
            data[at..at + RECORD] == record(i)[..],
            "{fs}: record {i} damaged in the snapshot"
        );
    }
}

#[test]
fn ext4_writer_during_snapshot() {
    if root("ext4_writer_during_snapshot") {
        writer_during_snapshot("ext4", 96 << 20);
    }
}

#[test]
fn xfs_writer_during_snapshot() {
    if root("xfs_writer_during_snapshot") {
        writer_during_snapshot("xfs", 320 << 20);
    }
}

fn mounts_of(dev: &Path) -> Vec<mountinfo::Mount> {
    use blocksnap::quiesce::System;
    let mut m = blocksnap::quiesce::Host.mounts_of(dev).unwrap();
    m.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    m
}

/// The parts of a mount that must survive an unmount and remount.
fn shape(m: &[mountinfo::Mount]) -> Vec<(PathBuf, PathBuf, String, String, String)> {
    m.iter()
        .map(|x| {
            (
                x.mount_point.clone(),
                x.root.clone(),
                x.options.clone(),
                x.fs_type.clone(),
                x.super_options.clone(),
            )
        })
        .collect()
}

#[test]
fn unmount_mode_mounts_again_at_the_same_places_with_the_same_options() {
    if !root("unmount_mode_mounts_again_at_the_same_places_with_the_same_options") {
        return;
    }
    let _ns = MOUNT_NAMESPACES.read().unwrap_or_else(|p| p.into_inner());
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "noatime,nodev,commit=7");
    std::fs::create_dir(m.dir.join("sub")).unwrap();
    std::fs::write(m.dir.join("sub/file"), b"hello").unwrap();
    // A read-only bind mount of a subdirectory.
    let bind_tmp = tempfile::tempdir().unwrap();
    let bind = bind_tmp.path().join("bind");
    std::fs::create_dir(&bind).unwrap();
    assert!(Command::new("mount")
        .arg("--bind")
        .arg(m.dir.join("sub"))
        .arg(&bind)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("mount")
        .args(["-o", "remount,bind,ro,nosuid"])
        .arg(&bind)
        .status()
        .unwrap()
        .success());
    struct Unbind(PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unbind = Unbind(bind.clone());

    let before = shape(&mounts_of(&vol.dev));
    assert_eq!(before.len(), 2);
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    let id = take_q(&vol.dev, &chain, &intents, &["--quiesce", "unmount"]);
    let after = shape(&mounts_of(&vol.dev));
    assert_eq!(
        before, after,
        "mounts differ after an unmount-mode snapshot"
    );
    assert_eq!(std::fs::read(bind.join("file")).unwrap(), b"hello");

    // The snapshot is a clean filesystem.
    let r = restore_image(&chain, &id);
    let check = Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(&r.image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A busy mount: the snapshot fails, says so, and nothing changes.
    let held = std::fs::File::open(m.dir.join("sub/file")).unwrap();
    let out = cli(take_args(
        &vol.dev,
        &chain,
        &intents,
        &["--quiesce", "unmount"],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("busy") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(
        shape(&mounts_of(&vol.dev)),
        before,
        "a failed unmount-mode snapshot changed the mounts"
    );
    assert_eq!(list_json(&chain).len(), 1, "a failed snapshot was recorded");
    drop(held);
}

#[test]
fn mode_none_refuses_a_mounted_device_and_blocks_mounts_while_it_runs() {
    if !root("mode_none_refuses_a_mounted_device_and_blocks_mounts_while_it_runs") {
        return;
    }
    let _ns = MOUNT_NAMESPACES.read().unwrap_or_else(|p| p.into_inner());
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    {
        let m = Mounted::new(&vol.dev, "ext4", "");
        std::fs::write(m.dir.join("f"), b"x").unwrap();
        let out = cli(take_args(
            &vol.dev,
            &chain,
            &intents,
            &["--quiesce", "none"],
        ));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("crash-consistent") && err.contains("force"),
            "{err}"
        );
        // Forced: taken, crash-consistent.
        take_q(
            &vol.dev,
            &chain,
            &intents,
            &["--quiesce", "none", "--force"],
        );
    }
    // Unmounted: while the scan runs, nobody can mount the device.
    let signal = state.path().join("paused");
    let mut child = Command::new(bin("blocksnap"))
        .args(take_args(
            &vol.dev,
            &chain,
            &intents,
            &["--quiesce", "none"],
        ))
        .env("BLOCKSNAP_FAULT_POINT", "mid-scan")
        .env("BLOCKSNAP_FAULT_SIGNAL_FILE", &signal)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !signal.exists() {
        assert!(Instant::now() < deadline, "the take never reached mid-scan");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mnt = tempfile::tempdir().unwrap();
    let out = Command::new("mount")
        .arg(&vol.dev)
        .arg(mnt.path())
        .output()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    if out.status.success() {
        let _ = nix::mount::umount2(mnt.path(), nix::mount::MntFlags::MNT_DETACH);
        panic!("mount succeeded while a mode-none snapshot held the device");
    }
    // The killed take left a torn tail; the next one cuts it and succeeds.
    let id = take_q(&vol.dev, &chain, &intents, &["--quiesce", "none"]);
    let r = restore_image(&chain, &id);
    assert_same(
        &read_all(&r.image),
        &read_all(&vol.dev),
        "after killed take",
    );
    assert_eq!(list_json(&chain).len(), 2);
}

#[test]
fn exceeding_the_maximum_freeze_time_abandons_the_snapshot_and_thaws() {
    if !root("exceeding_the_maximum_freeze_time_abandons_the_snapshot_and_thaws") {
        return;
    }
    let vol = Loop::new(256 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    std::fs::write(m.dir.join("bulk"), random_bytes(8, 128 << 20)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    // Without tracking the whole scan runs frozen and outlives 5 ms (with
    // it, the freeze covers only the last pre-copy round, often under 5 ms).
    let out = cli(take_args(
        &vol.dev,
        &chain,
        &intents,
        &["--max-freeze-seconds", "0.005", "--no-tracking"],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("maximum") && err.contains("thawed"), "{err}");
    assert!(!is_frozen(&m.dir));
    assert_writable(&m.dir);
    assert!(
        std::fs::read_dir(&intents).map(|d| d.count()).unwrap_or(0) == 0,
        "intent marker left behind"
    );
    // Nothing half-made in the chain.
    let c = blocksnap::chain::Chain::open(&chain, blocksnap::chain::Access::Read).unwrap();
    assert!(c.snapshots().is_empty());
}

#[test]
fn a_killed_freezer_is_thawed_by_thaw_all() {
    if !root("a_killed_freezer_is_thawed_by_thaw_all") {
        return;
    }
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    let signal = state.path().join("frozen");
    let mut child = Command::new(bin("blocksnap"))
        .args(take_args(&vol.dev, &chain, &intents, &[]))
        .env("BLOCKSNAP_FAULT_POINT", "after-freeze")
        .env("BLOCKSNAP_FAULT_SIGNAL_FILE", &signal)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !signal.exists() {
        assert!(
            Instant::now() < deadline,
            "the take never froze the filesystem"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(is_frozen(&m.dir));
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel does not thaw on its own.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        is_frozen(&m.dir),
        "expected the filesystem to stay frozen after SIGKILL"
    );
    let out = cli_ok([
        "thaw".as_ref(),
        "--all".as_ref(),
        "--intent-dir".as_ref(),
        intents.as_os_str(),
    ]);
    assert!(out.contains("thawed"), "{out}");
    assert!(!is_frozen(&m.dir));
    assert_writable(&m.dir);
    assert_eq!(
        std::fs::read_dir(&intents).unwrap().count(),
        0,
        "marker not removed"
    );
    // A second run finds nothing to do, and thaw by device reports "not frozen".
    cli_ok([
        "thaw".as_ref(),
        "--all".as_ref(),
        "--intent-dir".as_ref(),
        intents.as_os_str(),
    ]);
    let out = cli_ok([
        "thaw".as_ref(),
        vol.dev.as_os_str(),
        "--intent-dir".as_ref(),
        intents.as_os_str(),
    ]);
    assert!(out.contains("not frozen"), "{out}");
}

#[test]
fn someone_elses_freeze_is_reported_and_left_alone() {
    if !root("someone_elses_freeze_is_reported_and_left_alone") {
        return;
    }
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let intents = state.path().join("intents");
    assert!(Command::new("fsfreeze")
        .arg("-f")
        .arg(&m.dir)
        .status()
        .unwrap()
        .success());
    let out = cli(take_args(
        &vol.dev,
        &chain,
        &intents,
        &["--quiesce", "freeze"],
    ));
    let still = is_frozen(&m.dir);
    assert!(Command::new("fsfreeze")
        .arg("-u")
        .arg(&m.dir)
        .status()
        .unwrap()
        .success());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already frozen by someone else"), "{err}");
    assert!(still, "blocksnap thawed a freeze it did not own");
}

#[test]
fn a_chain_on_the_volume_itself_is_refused_before_freezing() {
    if !root("a_chain_on_the_volume_itself_is_refused_before_freezing") {
        return;
    }
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    let state = tempfile::tempdir().unwrap();
    let out = cli(take_args(
        &vol.dev,
        &m.dir.join("self.chain"),
        &state.path().join("i"),
        &[],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("on the filesystem being snapshotted") || err.contains("lives on it"),
        "{err}"
    );
    assert!(!is_frozen(&m.dir));
}

/// Under systemd's ProtectSystem= the daemon has its own mount namespace,
/// a slave of the host's. Unmount mode must still unmount and mount again
/// where the host sees it: run the take in such a namespace and check.
#[test]
fn unmount_mode_works_from_a_private_mount_namespace() {
    if !root("unmount_mode_works_from_a_private_mount_namespace") {
        return;
    }
    let _ns = MOUNT_NAMESPACES.write().unwrap_or_else(|p| p.into_inner());
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    // As on a systemd host: mounts are shared, the service's copies slaves.
    let shared = SharedDir::new();
    let m = Mounted::at(&vol.dev, "ext4", "noatime", &shared.dir.path().join("mnt"));
    std::fs::write(m.dir.join("f"), b"data").unwrap();
    let before = shape(&mounts_of(&vol.dev));
    let state = tempfile::tempdir().unwrap();
    let chain = state.path().join("vol.chain");
    let host_ns = format!("/proc/{}/ns/mnt", std::process::id());
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "--"])
        .env("BLOCKSNAP_HOST_MOUNT_NS", &host_ns)
        .arg(bin("blocksnap"))
        .args(take_args(
            &vol.dev,
            &chain,
            &state.path().join("i"),
            &["--quiesce", "unmount"],
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "take in a private namespace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        shape(&mounts_of(&vol.dev)),
        before,
        "the host's mounts differ afterwards"
    );
    assert_eq!(std::fs::read(m.dir.join("f")).unwrap(), b"data");
    assert_eq!(list_json(&chain).len(), 1);
}
