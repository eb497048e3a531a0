//! Shared helpers for the integration tests: privilege checks, loop devices,
//! filesystems and mounts wrapped in guards that clean up even when a test
//! fails, and running the real binaries.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blocksnap::loopdev;

/// Whether this test can run: true as root. Unprivileged, it prints why it
/// skips, unless BLOCKSNAP_REQUIRE_ROOT_TESTS=1 (as in CI), where it fails.
pub fn root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test} needs root (loop devices, mounts, freezing) and BLOCKSNAP_REQUIRE_ROOT_TESTS=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root for loop devices, mounts and freezing; run the suite as root (see README)");
    false
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A small deterministic generator for offsets.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Write `data` at `offset` of `path` (file or device) and fsync it.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// Read all of a file or device.
pub fn read_all(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// Build an image: random data in 1 MiB runs with zero runs between.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut rng = Rng::new(seed);
    let mut off = 0u64;
    while off < size {
        let n = (1u64 << 20).min(size - off);
        if rng.below(10) < 6 {
            f.write_all(&random_bytes(rng.next(), n as usize)).unwrap();
        } else {
            f.write_all(&vec![0u8; n as usize]).unwrap();
        }
        off += n;
    }
    f.sync_all().unwrap();
}

/// A loop device over a file in a temporary directory; detached on drop,
/// after thawing and unmounting anything on it.
pub struct Loop {
    pub dev: PathBuf,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    /// A loop device of `size` bytes, zero-filled (sparse).
    pub fn new(size: u64) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        let f = std::fs::File::create(&backing).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        Loop::over(dir, backing)
    }

    /// A loop device over an existing image copied into a temp dir.
    pub fn from_image(image: &Path) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::copy(image, &backing).unwrap();
        Loop::over(dir, backing)
    }

    fn over(dir: tempfile::TempDir, backing: PathBuf) -> Loop {
        let ld = loopdev::attach(&backing, false).expect("attach loop device");
        Loop {
            dev: ld.path,
            backing,
            _dir: dir,
        }
    }

    /// Grow the backing file and tell the loop device.
    pub fn grow(&self, new_size: u64) {
        let f = OpenOptions::new().write(true).open(&self.backing).unwrap();
        f.set_len(new_size).unwrap();
        loopdev::refresh_capacity(&self.dev).unwrap();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        cleanup_mounts_of(&self.dev);
        for _ in 0..50 {
            if loopdev::detach(&self.dev).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Thaw and unmount every mount of `dev` (best effort, for guards).
pub fn cleanup_mounts_of(dev: &Path) {
    use blocksnap::quiesce::{Host, System};
    let host = Host;
    if let Ok(mounts) = host.mounts_of(dev) {
        for m in blocksnap::quiesce::unmount_order(&mounts) {
            let _ = host.thaw(&m.mount_point);
            if nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Make a filesystem on `dev`.
pub fn mkfs(fs: &str, dev: &Path) {
    let out = match fs {
        "ext4" => Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(dev)
            .output(),
        "xfs" => Command::new("mkfs.xfs")
            .args(["-q", "-f"])
            .arg(dev)
            .output(),
        other => panic!("no mkfs for {other}"),
    }
    .unwrap_or_else(|e| {
        panic!("mkfs.{fs} not runnable ({e}); .ci/run installs e2fsprogs and xfsprogs")
    });
    assert!(
        out.status.success(),
        "mkfs.{fs} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A filesystem mounted on a temporary directory; thawed and unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mounted {
    pub fn new(dev: &Path, fs: &str, options: &str) -> Mounted {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let mut cmd = Command::new("mount");
        cmd.arg("-t").arg(fs);
        if !options.is_empty() {
            cmd.arg("-o").arg(options);
        }
        let out = cmd.arg(dev).arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted { dir, _tmp: tmp }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        use blocksnap::quiesce::System;
        let _ = blocksnap::quiesce::Host.thaw(&self.dir);
        for _ in 0..20 {
            match nix::mount::umount2(&self.dir, nix::mount::MntFlags::empty()) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The path of a built binary of this package.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "blocksnap" => PathBuf::from(env!("CARGO_BIN_EXE_blocksnap")),
        "blocksnapd" => PathBuf::from(env!("CARGO_BIN_EXE_blocksnapd")),
        _ => panic!("unknown binary {name}"),
    }
}

/// Run `blocksnap` with `args`.
pub fn cli<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(bin("blocksnap"))
        .args(args)
        .env("BLOCKSNAP_LOG", "warn")
        .output()
        .unwrap()
}

/// Run `blocksnap`, assert success, return stdout.
pub fn cli_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = cli(&args);
    assert!(
        out.status.success(),
        "blocksnap {:?} failed ({}): {}{}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The snapshot id a `chain take` printed (its last line).
pub fn last_line(s: &str) -> String {
    s.trim_end().lines().last().unwrap_or("").trim().to_string()
}

/// A chain take through the CLI; returns the id.
pub fn take(device: &Path, chain: &Path, extra: &[&str]) -> String {
    let mut args: Vec<std::ffi::OsString> =
        vec!["chain".into(), "take".into(), device.into(), chain.into()];
    args.extend(extra.iter().map(|s| s.into()));
    let out = cli_ok(&args);
    let id = last_line(&out);
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "not a uuid: {id:?}");
    id
}

/// Restore through the CLI into a new file and return its bytes.
pub fn restore_bytes(chain: &Path, id: &str, dir: &Path) -> Vec<u8> {
    let target = dir.join(format!("restore-{id}.img"));
    let _ = std::fs::remove_file(&target);
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        target.as_os_str(),
    ]);
    let b = read_all(&target);
    std::fs::remove_file(&target).unwrap();
    b
}

/// Assert two images are equal, reporting the first differing offset.
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if a != b {
        let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
        panic!("{what}: first difference at byte {i} (block {})", i / 4096);
    }
}
