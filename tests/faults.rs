//! Storage faults: a full disk under the chain, read errors on the device,
//! and damage anywhere in a chain file.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;

const VOL: &str = "vol";

#[test]
fn a_full_disk_fails_the_snapshot_cleanly_and_the_next_one_works() {
    if !root("a_full_disk_fails_the_snapshot_cleanly_and_the_next_one_works") {
        return;
    }
    // The state directory on its own small filesystem.
    let state_dev = Loop::new(96 << 20);
    mkfs("ext4", &state_dev.dev);
    let state_fs = Mounted::new(&state_dev.dev, "ext4", "");
    // The volume: a mounted ext4 with some data.
    let vol = Loop::new(64 << 20);
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    std::fs::write(m.dir.join("a"), random_bytes(1, 24 << 20)).unwrap();
    let state = state_fs.dir.join("state");
    let d = DaemonProc::start(
        &format!("state_dir = \"{}\"", state.display()),
        &volume_toml(VOL, &vol.dev, ""),
    );
    let first = d.snapshot(VOL, "first");
    let first_hash = restore_bytes(&d.chain(VOL), &first, d.dir.path());
    // Fill the state filesystem, then change 12 MiB of the volume.
    let filler = state_fs.dir.join("filler");
    let st = nix::sys::statvfs::statvfs(&state_fs.dir).unwrap();
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let f = std::fs::File::create(&filler).unwrap();
    f.write_all_at(&random_bytes(2, (free - (4 << 20)) as usize), 0)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::write(m.dir.join("b"), random_bytes(3, 12 << 20)).unwrap();
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    let failed = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let s = d.wait_snapshot(&failed);
    assert_eq!(s["status"], "error", "{s}");
    let why = s["blocksnap:error"].as_str().unwrap();
    assert!(
        why.contains("full") && why.contains("No space left on device"),
        "{why}"
    );
    // Thawed and writable; the chain intact; the first snapshot unchanged.
    assert!(!is_frozen(&m.dir));
    std::fs::write(m.dir.join("probe"), b"ok").unwrap();
    cli_ok([
        "chain".as_ref(),
        "verify".as_ref(),
        d.chain(VOL).as_os_str(),
    ]);
    assert_eq!(
        restore_bytes(&d.chain(VOL), &first, d.dir.path()),
        first_hash
    );
    // Space freed: the next snapshot works.
    std::fs::remove_file(&filler).unwrap();
    let next = d.snapshot(VOL, "after");
    assert_eq!(
        d.call("GET", &format!("/snapshots/{next}"), None).json()["snapshot"]["status"],
        "available"
    );
    cli_ok([
        "chain".as_ref(),
        "verify".as_ref(),
        d.chain(VOL).as_os_str(),
    ]);
    drop(d);
}

/// A FUSE filesystem with one file, `disk.img`, backed by a real file, whose
/// reads fail with EIO inside the ranges in `bad`. Opened with direct I/O so
/// every read of the loop device above it reaches us.
struct FaultyFile {
    backing: std::fs::File,
    size: u64,
    bad: Arc<Mutex<Vec<(u64, u64)>>>,
}

const TTL: Duration = Duration::from_secs(0);

impl FaultyFile {
    fn attr(&self, ino: u64) -> fuser::FileAttr {
        let (kind, perm, size) = if ino == 1 {
            (fuser::FileType::Directory, 0o755, 0)
        } else {
            (fuser::FileType::RegularFile, 0o600, self.size)
        };
        fuser::FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl fuser::Filesystem for FaultyFile {
    fn lookup(
        &mut self,
        _: &fuser::Request<'_>,
        parent: u64,
        name: &OsStr,
        reply: fuser::ReplyEntry,
    ) {
        if parent == 1 && name == "disk.img" {
            reply.entry(&TTL, &self.attr(2), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }
    fn getattr(
        &mut self,
        _: &fuser::Request<'_>,
        ino: u64,
        _: Option<u64>,
        reply: fuser::ReplyAttr,
    ) {
        reply.attr(&TTL, &self.attr(ino));
    }
    fn open(&mut self, _: &fuser::Request<'_>, _: u64, _: i32, reply: fuser::ReplyOpen) {
        reply.opened(0, 1 /* FOPEN_DIRECT_IO */);
    }
    fn read(
        &mut self,
        _: &fuser::Request<'_>,
        _: u64,
        _: u64,
        offset: i64,
        size: u32,
        _: i32,
        _: Option<u64>,
        reply: fuser::ReplyData,
    ) {
        let (a, b) = (offset as u64, offset as u64 + size as u64);
        if self
            .bad
            .lock()
            .unwrap()
            .iter()
            .any(|&(x, y)| a < y && x < b)
        {
            reply.error(libc::EIO);
            return;
        }
        let mut buf = vec![0u8; size as usize];
        let n = self.backing.read_at(&mut buf, offset as u64).unwrap_or(0);
        reply.data(&buf[..n]);
    }
    fn write(
        &mut self,
        _: &fuser::Request<'_>,
        _: u64,
        _: u64,
        offset: i64,
        data: &[u8],
        _: u32,
        _: i32,
        _: Option<u64>,
        reply: fuser::ReplyWrite,
    ) {
        match self.backing.write_all_at(data, offset as u64) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(libc::EIO),
        }
    }
    fn flush(&mut self, _: &fuser::Request<'_>, _: u64, _: u64, _: u64, reply: fuser::ReplyEmpty) {
        reply.ok();
    }
    fn fsync(&mut self, _: &fuser::Request<'_>, _: u64, _: u64, _: bool, reply: fuser::ReplyEmpty) {
        let _ = self.backing.sync_data();
        reply.ok();
    }
}

#[test]
fn read_errors_fail_the_snapshot_naming_the_offset() {
    if !root("read_errors_fail_the_snapshot_naming_the_offset") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing_path = dir.path().join("backing");
    let size: u64 = 64 << 20;
    std::fs::File::create(&backing_path)
        .unwrap()
        .set_len(size)
        .unwrap();
    let bad = Arc::new(Mutex::new(Vec::new()));
    let fs = FaultyFile {
        backing: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&backing_path)
            .unwrap(),
        size,
        bad: bad.clone(),
    };
    let mnt = dir.path().join("fuse");
    std::fs::create_dir(&mnt).unwrap();
    let session = fuser::spawn_mount2(
        fs,
        &mnt,
        &[fuser::MountOption::FSName("blocksnap-faulty".into())],
    )
    .expect("FUSE mount (as root, /dev/fuse)");
    let vol = Loop::over_path(&mnt.join("disk.img"));
    mkfs("ext4", &vol.dev);
    let m = Mounted::new(&vol.dev, "ext4", "");
    std::fs::write(m.dir.join("a"), random_bytes(1, 1 << 20)).unwrap();
    let d = DaemonProc::start("", &volume_toml(VOL, &vol.dev, ""));
    d.snapshot(VOL, "good");
    // Reads of 4 KiB at 40 MiB (free space of the filesystem) now fail.
    // The daemon tracks writes, so its increment reads only written blocks:
    // write that block (through the device) so the increment must read it.
    let at: u64 = 40 << 20;
    write_at(&vol.dev, at, &random_bytes(7, 4096));
    bad.lock().unwrap().push((at, at + 4096));
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let s = d.wait_snapshot(&id);
    assert_eq!(s["status"], "error", "{s}");
    let why = s["blocksnap:error"].as_str().unwrap();
    assert!(
        why.contains(&format!("offset {at}")),
        "the error does not name offset {at}: {why}"
    );
    // The daemon keeps serving, the filesystem is thawed.
    assert_eq!(http(&d.socket, "GET", "/healthz", None, None).status, 200);
    assert_eq!(d.call("GET", "/snapshots", None).status, 200);
    assert!(!is_frozen(&m.dir));
    std::fs::write(m.dir.join("probe"), b"ok").unwrap();
    // The CLI says the same, with a non-zero exit.
    let state = tempfile::tempdir().unwrap();
    let out = cli([
        "chain".as_ref(),
        "take".as_ref(),
        vol.dev.as_os_str(),
        state.path().join("c.chain").as_os_str(),
        "--intent-dir".as_ref(),
        state.path().join("i").as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("offset {at}")));
    // Errors gone: snapshots work again.
    bad.lock().unwrap().clear();
    d.snapshot(VOL, "good-again");
    cli_ok([
        "chain".as_ref(),
        "verify".as_ref(),
        d.chain(VOL).as_os_str(),
    ]);
    drop(d);
    drop(m);
    drop(vol);
    drop(session);
}

/// Damage at seeded random bytes anywhere in a chain file (data, indexes,
/// headers, footers, padding), truncation, and a duplicated segment: verify
/// reports each, and undamaged snapshots restore.
#[test]
fn verify_finds_damage_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    make_image(&img, 4 << 20, 8);
    let mut rng = Rng::new(11);
    let mut snaps = Vec::new();
    for i in 0..3 {
        if i > 0 {
            for _ in 0..20 {
                write_at(
                    &img,
                    rng.below(1024) * 4096,
                    &random_bytes(rng.next(), 4096),
                );
            }
        }
        snaps.push((take(&img, &chain, &[]), read_all(&img)));
    }
    let original = read_all(&chain);
    let damaged = dir.path().join("damaged.chain");
    for k in 0..150 {
        let off = rng.below(original.len() as u64) as usize;
        let mut b = original.clone();
        b[off] ^= 1 << rng.below(8);
        std::fs::write(&damaged, &b).unwrap();
        let out = cli(["chain".as_ref(), "verify".as_ref(), damaged.as_os_str()]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "flip {k} at offset {off} went unnoticed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A segment duplicated at the end.
    let last_start = {
        let c = blocksnap::chain::Chain::open(&chain, blocksnap::chain::Access::Read).unwrap();
        c.segments().last().unwrap().info.start as usize
    };
    let mut b = original.clone();
    b.extend_from_slice(&original[last_start..]);
    std::fs::write(&damaged, &b).unwrap();
    let out = cli(["chain".as_ref(), "verify".as_ref(), damaged.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (id, bytes) in &snaps {
        assert_same(
            &restore_bytes(&damaged, id, dir.path()),
            bytes,
            "after a duplicated segment",
        );
    }
    // Truncated in the middle of an earlier segment: later snapshots are lost,
    // earlier ones restore, and it is reported.
    let second_start = {
        let c = blocksnap::chain::Chain::open(&chain, blocksnap::chain::Access::Read).unwrap();
        c.segments()[1].info.start as usize
    };
    std::fs::write(&damaged, &original[..second_start + 5000]).unwrap();
    let c = blocksnap::chain::Chain::open(&damaged, blocksnap::chain::Access::Read).unwrap();
    assert_eq!(c.snapshots().len(), 1);
    assert_same(
        &restore_bytes(&damaged, &snaps[0].0, dir.path()),
        &snaps[0].1,
        "after truncation",
    );
    cli_ok(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
}
