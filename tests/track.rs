//! Write tracking against real loop devices: the tracker sees writes through
//! the device (and a partition's through its disk), reports lost records as a
//! gap, and takes built on it restore exactly what the device held.

mod common;

use std::time::Duration;

use blocksnap::track::{Continuity, Options, Registry, Target};
use common::*;

fn target(dev: &std::path::Path) -> Target {
    Target {
        volume: "v".into(),
        path: dev.to_path_buf(),
    }
}

#[test]
fn writes_through_the_device_are_marked() {
    if !root("writes_through_the_device_are_marked") {
        return;
    }
    let lo = Loop::new(64 << 20);
    let reg = Registry::start(&[target(&lo.dev)], &Options::default());
    assert!(reg.unavailable().is_none(), "{:?}", reg.unavailable());
    let mut s = reg.session("v").unwrap();
    assert_eq!(s.continuity(), &Continuity::NoSnapshotYet);
    // 8 KiB at 1 MiB and 512 bytes inside block 300, with O_DIRECT-free
    // writes plus fsync so they reach the device now.
    write_at(&lo.dev, 1 << 20, &random_bytes(1, 8192));
    write_at(&lo.dev, 300 * 4096 + 1024, &random_bytes(2, 512));
    // A read marks nothing.
    let _ = read_all(&lo.dev);
    let d = s.cut().unwrap();
    let units: Vec<u64> = d.units().collect();
    assert_eq!(units, vec![256, 257, 300], "{units:?}");
    assert!(s.cut().unwrap().is_empty());
    let id = uuid::Uuid::new_v4();
    s.commit(id);
    write_at(&lo.dev, 4096 * 7, &random_bytes(3, 4096));
    std::thread::sleep(Duration::from_millis(100));
    let s = reg.session("v").unwrap();
    assert_eq!(s.continuity(), &Continuity::Since(id));
    assert_eq!(s.since_previous().units().collect::<Vec<_>>(), vec![7]);
    // Dropped without commit: given back to the next session.
    drop(s);
    let s = reg.session("v").unwrap();
    assert_eq!(s.since_previous().units().collect::<Vec<_>>(), vec![7]);
}

#[test]
fn a_full_ring_is_a_gap() {
    if !root("a_full_ring_is_a_gap") {
        return;
    }
    let lo = Loop::new(64 << 20);
    // One page per CPU and nobody draining: a few hundred writes overflow it.
    let reg = Registry::start(
        &[target(&lo.dev)],
        &Options {
            ring_pages: 1,
            drain_every: None,
            ..Default::default()
        },
    );
    assert!(reg.unavailable().is_none(), "{:?}", reg.unavailable());
    let mut s = reg.session("v").unwrap();
    s.cut().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..2000u64 {
        f.write_all_at(&[1u8; 4096], i * 8192).unwrap();
        f.sync_data().unwrap();
    }
    let err = s.cut().unwrap_err();
    assert!(err.contains("dropped"), "{err}");
}

/// Trackers started at the same moment in one process (the daemon starts
/// one, but tests and `chain take` in threads start several) all get the
/// tracepoints, also where tracefs is not mounted and each start mounts it
/// for a moment: one start's unmount must not pull another's mount away.
#[test]
fn trackers_started_together_all_track() {
    if !root("trackers_started_together_all_track") {
        return;
    }
    let lo = Loop::new(16 << 20);
    let dev = lo.dev.clone();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let reg = Registry::start(
                    &[target(&dev)],
                    &Options {
                        ring_pages: 1,
                        drain_every: None,
                        ..Default::default()
                    },
                );
                reg.unavailable().map(str::to_string)
            })
        })
        .collect();
    for h in handles {
        let why = h.join().unwrap();
        assert!(why.is_none(), "a tracker started beside others: {why:?}");
    }
}

// ---------------------------------------------------------------- takes

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blocksnap::chain::format::{FullReason, TakeMethod};
use blocksnap::chain::{Access, Chain};
use blocksnap::quiesce::{self, Frozen, Host, Mount, MountOp, System};
use blocksnap::take::{take, TakeOptions, Tracking};

/// The real system, remembering when each freeze was asked for (before the
/// FIFREEZE call: writers may stall from then on).
#[derive(Default)]
struct Recording {
    freezes: Mutex<Vec<Instant>>,
}

impl System for Recording {
    fn mounts_of(&self, device: &Path) -> std::io::Result<Vec<Mount>> {
        Host.mounts_of(device)
    }
    fn freeze(&self, mount_point: &Path) -> std::io::Result<Frozen> {
        self.freezes.lock().unwrap().push(Instant::now());
        Host.freeze(mount_point)
    }
    fn thaw_frozen(&self, frozen: &Frozen) -> std::io::Result<()> {
        Host.thaw_frozen(frozen)
    }
    fn thaw(&self, mount_point: &Path) -> std::io::Result<()> {
        Host.thaw(mount_point)
    }
    fn unmount(&self, mount_point: &Path) -> std::io::Result<()> {
        Host.unmount(mount_point)
    }
    fn mount(&self, op: &MountOp) -> std::io::Result<()> {
        Host.mount(op)
    }
    fn fs_of(&self, path: &Path) -> std::io::Result<u64> {
        Host.fs_of(path)
    }
}

const REC: usize = 512;
const FILES: usize = 3;

/// Record `seq` of file `file`: sequence number, file, payload, crc32.
fn record(file: usize, seq: u64) -> Vec<u8> {
    let mut r = random_bytes(seq * 31 + file as u64, REC);
    r[0..8].copy_from_slice(&seq.to_le_bytes());
    r[8..12].copy_from_slice(&(file as u32).to_le_bytes());
    let crc = crc32fast::hash(&r[..REC - 4]);
    r[REC - 4..].copy_from_slice(&crc.to_le_bytes());
    r
}

/// Records of a file as restored: how many form an unbroken, intact prefix;
/// panics on anything after it (a torn record, a gap, garbage).
fn check_records(bytes: &[u8], file: usize, what: &str) -> u64 {
    assert_eq!(
        bytes.len() % REC,
        0,
        "{what}: file {file} ends in a torn record"
    );
    for (i, r) in bytes.chunks(REC).enumerate() {
        assert_eq!(
            r,
            &record(file, i as u64)[..],
            "{what}: file {file} record {i} is wrong"
        );
    }
    (bytes.len() / REC) as u64
}

/// Appends records to FILES files, fsync after each, noting when each
/// fsync returned.
struct Writer {
    stop: Arc<AtomicBool>,
    synced: Arc<Mutex<Vec<Vec<Instant>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(Mutex::new(vec![Vec::new(); FILES]));
        let files: Vec<std::fs::File> = (0..FILES)
            .map(|i| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("log{i}")))
                    .unwrap()
            })
            .collect();
        let (s, y) = (stop.clone(), synced.clone());
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            let mut seq = [0u64; FILES];
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let mut f = &files[i];
                f.write_all(&record(i, seq[i])).unwrap();
                f.sync_all().unwrap();
                y.lock().unwrap()[i].push(Instant::now());
                seq[i] += 1;
                i = (i + 1) % FILES;
                if seq[0] % 64 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Writer {
            stop,
            synced,
            thread: Some(thread),
        }
    }

    /// Records of each file whose fsync returned before `t`.
    fn synced_before(&self, t: Instant) -> Vec<u64> {
        self.synced
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.iter().filter(|x| **x < t).count() as u64)
            .collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fsck(fs: &str, image: &Path) {
    if fs == "xfs" {
        // A frozen XFS is consistent together with its log, which
        // xfs_repair -n does not replay: mount the image once to replay it,
        // as recovery would, then check.
        let l = Loop::over_path(image);
        drop(Mounted::new(&l.dev, fs, "nouuid"));
    }
    let out = match fs {
        "ext4" => std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(image)
            .output(),
        _ => std::process::Command::new("xfs_repair")
            .args(["-n", "-f"])
            .arg(image)
            .output(),
    }
    .unwrap();
    assert!(
        out.status.success(),
        "fsck of the restored {fs} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn writer_series(fs: &str) {
    let lo = Loop::new(512 << 20);
    mkfs(fs, &lo.dev);
    let m = Mounted::new(&lo.dev, fs, "");
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let chain = work.path().join("v.chain");
    let registry = Arc::new(Registry::start(&[target(&lo.dev)], &Options::default()));
    assert!(
        registry.unavailable().is_none(),
        "{:?}",
        registry.unavailable()
    );
    let writer = Writer::start(&m.dir);
    let sys = Arc::new(Recording::default());
    let opts = TakeOptions {
        quiesce: quiesce::Options {
            intent_dir: Some(work.path().join("intents")),
            ..Default::default()
        },
        tracking: Tracking::Shared {
            registry: registry.clone(),
            volume: "v".into(),
        },
        verify_every: 3,
        ..Default::default()
    };
    let mut taken = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        let out = take(sys.clone(), &lo.dev, &chain, &opts).unwrap();
        let froze = *sys.freezes.lock().unwrap().last().unwrap();
        taken.push((out, writer.synced_before(froze)));
    }
    drop(writer);
    let methods: Vec<TakeMethod> = taken.iter().map(|(o, _)| o.record.method).collect();
    assert_eq!(
        methods,
        vec![
            // verify_every = 3: two tracked snapshots after a full read,
            // then one that verifies tracking against a full diff.
            TakeMethod::FullScan,
            TakeMethod::Tracked,
            TakeMethod::Tracked,
            TakeMethod::Verified
        ],
        "{:?}",
        taken
            .iter()
            .map(|(o, _)| o.quiesce.clone())
            .collect::<Vec<_>>()
    );
    for (o, _) in &taken {
        assert!(o.record.rounds >= 1, "no live round: {}", o.quiesce);
        assert_eq!(
            o.record.unmarked_blocks, 0,
            "tracking missed writes: {}",
            o.quiesce
        );
    }
    let c = Chain::open(&chain, Access::Read).unwrap();
    for (o, before) in &taken {
        let what = format!("{fs} snapshot {} ({})", o.snapshot.id, o.quiesce);
        let image = work.path().join("restored.img");
        let _ = std::fs::remove_file(&image);
        blocksnap::chain::restore::restore(&c, o.snapshot.id, &image, &Default::default()).unwrap();
        fsck(fs, &image);
        let rl = Loop::over_path(&image);
        let rm = Mounted::new(&rl.dev, fs, if fs == "xfs" { "ro,nouuid" } else { "ro" });
        for (i, want) in before.iter().enumerate() {
            let got = check_records(
                &std::fs::read(rm.dir.join(format!("log{i}"))).unwrap(),
                i,
                &what,
            );
            assert!(
                got >= *want,
                "{what}: file {i} holds {got} records but {want} were fsync'd before the freeze began"
            );
        }
        drop(rm);
        drop(rl);
    }
}

#[test]
fn writer_series_on_ext4() {
    if !root("writer_series_on_ext4") {
        return;
    }
    writer_series("ext4");
}

#[test]
fn writer_series_on_xfs() {
    if !root("writer_series_on_xfs") {
        return;
    }
    writer_series("xfs");
}

fn untracked_opts() -> TakeOptions {
    TakeOptions::default()
}

fn restored(chain: &Path, id: uuid::Uuid, dir: &Path) -> Vec<u8> {
    let c = Chain::open(chain, Access::Read).unwrap();
    let p: PathBuf = dir.join(format!("{id}.img"));
    blocksnap::chain::restore::restore(&c, id, &p, &Default::default()).unwrap();
    let b = read_all(&p);
    std::fs::remove_file(&p).unwrap();
    b
}

/// The kernel drops records (a one-page ring nobody drains): the next take
/// must read the whole device, and its snapshot equals an untracked one.
#[test]
fn lost_records_mean_a_full_diff() {
    if !root("lost_records_mean_a_full_diff") {
        return;
    }
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = work.path().join("img");
    make_image(&image, 32 << 20, 5);
    let lo = Loop::over_path(&image);
    let registry = Arc::new(Registry::start(
        &[target(&lo.dev)],
        &Options {
            ring_pages: 1,
            drain_every: None,
            ..Default::default()
        },
    ));
    let tracked = TakeOptions {
        tracking: Tracking::Shared {
            registry: registry.clone(),
            volume: "v".into(),
        },
        verify_every: 0,
        ..Default::default()
    };
    let chain = work.path().join("tracked.chain");
    let sys = Arc::new(Host);
    take(sys.clone(), &lo.dev, &chain, &tracked).unwrap();
    // Few writes: tracked, and right.
    write_at(&lo.dev, 4096 * 3, &random_bytes(9, 4096));
    let t = take(sys.clone(), &lo.dev, &chain, &tracked).unwrap();
    assert_eq!(
        t.record.method,
        TakeMethod::Tracked,
        "{} ({:?})",
        t.quiesce,
        registry.unavailable()
    );
    assert_eq!(t.record.tracked_blocks, 1);
    // Thousands of writes overflow the ring before anyone drains it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..3000u64 {
        f.write_all_at(&random_bytes(i, 4096), (i * 2 % 8192) * 4096)
            .unwrap();
        f.sync_data().unwrap();
    }
    let t = take(sys.clone(), &lo.dev, &chain, &tracked).unwrap();
    assert_eq!(t.record.method, TakeMethod::FullScan, "{}", t.quiesce);
    assert_eq!(t.record.reason, FullReason::Gap);
    // The same moment, untracked, into another chain.
    let plain = work.path().join("plain.chain");
    let u = take(sys, &lo.dev, &plain, &untracked_opts()).unwrap();
    let device = read_all(&lo.dev);
    let a = restored(&chain, t.snapshot.id, work.path());
    let b = restored(&plain, u.snapshot.id, work.path());
    assert_same(&a, &b, "tracked chain vs untracked chain");
    assert_same(&a, &device, "snapshot vs device");
}

/// A write into a loop device's backing file never passes the loop device's
/// block layer: tracking cannot see it. The verification diff does: it
/// counts the block and its snapshot holds the write.
#[test]
fn verification_catches_writes_tracking_cannot_see() {
    if !root("verification_catches_writes_tracking_cannot_see") {
        return;
    }
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = work.path().join("img");
    make_image(&image, 32 << 20, 6);
    let lo = Loop::over_path(&image);
    let registry = Arc::new(Registry::start(&[target(&lo.dev)], &Options::default()));
    let mut opts = TakeOptions {
        tracking: Tracking::Shared {
            registry: registry.clone(),
            volume: "v".into(),
        },
        verify_every: 0,
        ..Default::default()
    };
    let chain = work.path().join("c.chain");
    let sys = Arc::new(Host);
    take(sys.clone(), &lo.dev, &chain, &opts).unwrap();
    // Seen: through the device. Unseen: straight into the backing file.
    write_at(&lo.dev, 4096 * 10, &random_bytes(1, 4096));
    write_at(&image, 4096 * 2000, &random_bytes(2, 4096));
    write_at(&image, 4096 * 2001, &random_bytes(3, 4096));
    let t = take(sys.clone(), &lo.dev, &chain, &opts).unwrap();
    assert_eq!(t.record.method, TakeMethod::Tracked);
    assert_eq!(t.record.tracked_blocks, 1, "{}", t.quiesce);
    // The tracked snapshot missed what it could not see (documented).
    let a = restored(&chain, t.snapshot.id, work.path());
    assert_ne!(
        &a[2000 * 4096..2001 * 4096],
        &read_all(&lo.dev)[2000 * 4096..2001 * 4096]
    );
    opts.verify_every = 1;
    let v = take(sys, &lo.dev, &chain, &opts).unwrap();
    assert_eq!(v.record.method, TakeMethod::Verified, "{}", v.quiesce);
    assert_eq!(v.record.unmarked_blocks, 2, "{}", v.quiesce);
    let b = restored(&chain, v.snapshot.id, work.path());
    assert_same(&b, &read_all(&lo.dev), "verified snapshot vs device");
}

/// A tracked increment of thousands of scattered blocks, long runs and
/// blocks written back to zero (what the readers hand out in batches and
/// the chain writer gathers into larger writes) restores exactly what the
/// device holds, as an untracked snapshot of the same moment does.
#[test]
fn tracked_increment_of_scattered_blocks_restores_the_device() {
    if !root("tracked_increment_of_scattered_blocks_restores_the_device") {
        return;
    }
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = work.path().join("img");
    let blocks = 16384u64;
    make_image(&image, blocks * 4096, 7);
    let lo = Loop::over_path(&image);
    let registry = Arc::new(Registry::start(&[target(&lo.dev)], &Options::default()));
    let opts = TakeOptions {
        tracking: Tracking::Shared {
            registry: registry.clone(),
            volume: "v".into(),
        },
        verify_every: 0,
        ..Default::default()
    };
    let chain = work.path().join("c.chain");
    let sys = Arc::new(Host);
    take(sys.clone(), &lo.dev, &chain, &opts).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut rng = Rng::new(70);
    let mut written = std::collections::BTreeSet::new();
    for i in 0..3000u64 {
        let b = rng.below(blocks);
        // One in ten scattered blocks goes back to zero.
        let data = if i % 10 == 0 {
            vec![0u8; 4096]
        } else {
            random_bytes(1000 + i, 4096)
        };
        f.write_all_at(&data, b * 4096).unwrap();
        written.insert(b);
        if i % 100 == 99 {
            f.sync_data().unwrap();
        }
    }
    // A run longer than one read, and the device's last block.
    f.write_all_at(&random_bytes(5, 3 << 20), 9000 * 4096)
        .unwrap();
    written.extend(9000..9000 + 768);
    f.write_all_at(&random_bytes(6, 4096), (blocks - 1) * 4096)
        .unwrap();
    written.insert(blocks - 1);
    f.sync_data().unwrap();
    drop(f);
    let t = take(sys.clone(), &lo.dev, &chain, &opts).unwrap();
    assert_eq!(t.record.method, TakeMethod::Tracked, "{}", t.quiesce);
    assert!(
        t.record.tracked_blocks >= written.len() as u64,
        "tracking reported {} blocks for {} written",
        t.record.tracked_blocks,
        written.len()
    );
    // Every stored block's crc and fingerprint describe its bytes (the
    // fingerprints of blocks read into our own buffers are not recomputed).
    let report =
        blocksnap::chain::verify::verify(&Chain::open(&chain, Access::Read).unwrap(), None);
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.blocks_checked >= written.len() as u64);
    let plain = work.path().join("plain.chain");
    let u = take(sys, &lo.dev, &plain, &untracked_opts()).unwrap();
    let device = read_all(&lo.dev);
    let a = restored(&chain, t.snapshot.id, work.path());
    assert_same(&a, &device, "tracked snapshot vs device");
    assert_same(
        &a,
        &restored(&plain, u.snapshot.id, work.path()),
        "tracked chain vs untracked chain",
    );
}
