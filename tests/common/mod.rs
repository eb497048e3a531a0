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

/// A test that creates a mount namespace copies every mount that exists at
/// that moment, and such a copy keeps a device busy after its test unmounts
/// it. Tests that need a device free after unmounting hold this for reading,
/// tests that create namespaces for writing.
pub static MOUNT_NAMESPACES: std::sync::RwLock<()> = std::sync::RwLock::new(());

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

    /// A loop device over a file that stays where it is (not copied).
    pub fn over_path(file: &Path) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        Loop::over(dir, file.to_path_buf())
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

/// Whether the filesystem mounted at `mp` is frozen: a freeze attempt
/// answers EBUSY. If the probe froze it, it is thawed again at once.
pub fn is_frozen(mp: &Path) -> bool {
    let dir = std::fs::File::open(mp).unwrap();
    match blocksnap::sys::freeze(std::os::fd::AsFd::as_fd(&dir)) {
        Ok(()) => {
            blocksnap::sys::thaw(std::os::fd::AsFd::as_fd(&dir)).unwrap();
            false
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
        Err(e) => panic!("freeze probe of {} failed: {e}", mp.display()),
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
    _tmp: Option<tempfile::TempDir>,
}

impl Mounted {
    pub fn new(dev: &Path, fs: &str, options: &str) -> Mounted {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        let mut m = Mounted::at(dev, fs, options, &dir);
        m._tmp = Some(tmp);
        m
    }

    /// Mount at `dir` (created), which the caller owns.
    pub fn at(dev: &Path, fs: &str, options: &str, dir: &Path) -> Mounted {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = None;
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

/// A temporary directory bind-mounted onto itself and made a shared mount,
/// as every mount is on a systemd host; unmounted on drop.
pub struct SharedDir {
    pub dir: tempfile::TempDir,
}

impl SharedDir {
    pub fn new() -> SharedDir {
        let dir = tempfile::tempdir().unwrap();
        for args in [vec!["--bind"], vec!["--make-shared"]] {
            let mut cmd = Command::new("mount");
            cmd.args(&args).arg(dir.path());
            if args[0] == "--bind" {
                cmd.arg(dir.path());
            }
            assert!(cmd.status().unwrap().success(), "mount {args:?} failed");
        }
        SharedDir { dir }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
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

// ---------------------------------------------------------------- daemon

pub const TENANT: &str = "yourAccountID";
pub const TOKEN: &str = "yourAuthToken";
pub const TENANT2: &str = "otherAccount";
pub const TOKEN2: &str = "otherAuthToken";

/// A running blocksnapd with its own socket and state directory; stopped
/// (SIGTERM, then SIGKILL) on drop, and any loop device it attached for a
/// volume made from a snapshot is detached.
pub struct DaemonProc {
    pub child: Option<std::process::Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft and hard) to start the daemon with.
    pub nofile: Option<u64>,
}

impl DaemonProc {
    /// Write a config with the two test tenants, `daemon_extra` lines in
    /// [daemon] and `volumes` (TOML), and start the daemon.
    pub fn start(daemon_extra: &str, volumes: &str) -> DaemonProc {
        DaemonProc::start_with_env(daemon_extra, volumes, &[])
    }

    pub fn start_with_env(daemon_extra: &str, volumes: &str, env: &[(&str, &str)]) -> DaemonProc {
        let mut d = DaemonProc::configure(daemon_extra, volumes, env);
        d.spawn();
        d
    }

    /// Write the config as `start_with_env` does, without starting.
    pub fn configure(daemon_extra: &str, volumes: &str, env: &[(&str, &str)]) -> DaemonProc {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/blocksnap.sock");
        let config = dir.path().join("blocksnap.toml");
        // A state_dir in `daemon_extra` replaces the default one.
        let custom_state = daemon_extra
            .lines()
            .find_map(|l| l.trim().strip_prefix("state_dir = "))
            .map(|v| PathBuf::from(v.trim_matches('"')));
        let state = custom_state
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let state_line = match custom_state {
            Some(_) => String::new(),
            None => format!("state_dir = \"{}\"\n", state.display()),
        };
        let text = format!(
            "[daemon]\nsocket = \"{}\"\n{state_line}{daemon_extra}\n\n[[tokens]]\ntenant = \"{TENANT}\"\ntoken = \"{TOKEN}\"\n\n[[tokens]]\ntenant = \"{TENANT2}\"\ntoken = \"{TOKEN2}\"\n\n{volumes}\n",
            socket.display(),
        );
        std::fs::write(&config, text).unwrap();
        DaemonProc {
            child: None,
            log: dir.path().join("daemon.log"),
            dir,
            socket,
            state,
            config,
            env: env
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            nofile: None,
        }
    }

    /// Start (again) and wait until /healthz answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin("blocksnapd"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("BLOCKSNAP_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "blocksnapd exited at start ({status}):\n{}",
                        self.log_text()
                    );
                }
            }
            if let Ok(r) = try_http(&self.socket, "GET", "/healthz", None, None, &[]) {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "blocksnapd did not answer:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Replace the environment for the next spawn.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                panic!("blocksnapd did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Call the API as the first tenant.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        http(
            &self.socket,
            method,
            &format!("/v1/{TENANT}{path}"),
            Some(TOKEN),
            body,
        )
    }

    /// A request that may meet a daemon that is dying: `None` if no answer came.
    pub fn try_request(&self, method: &str, path: &str, body: &str) -> Option<Resp> {
        let body = (!body.is_empty()).then_some(body);
        try_http(
            &self.socket,
            method,
            &format!("/v1/{TENANT}{path}"),
            Some(TOKEN),
            body,
            &[],
        )
        .ok()
    }

    /// A GET that may meet a daemon that is dying: `None` if it got no answer.
    pub fn try_call(&self, method: &str, path: &str) -> Option<Resp> {
        try_http(
            &self.socket,
            method,
            &format!("/v1/{TENANT}{path}"),
            Some(TOKEN),
            None,
            &[],
        )
        .ok()
    }

    /// Poll a snapshot until its status is not `creating` / `deleting`.
    pub fn wait_snapshot(&self, id: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let r = self.call("GET", &format!("/snapshots/{id}"), None);
            if r.status == 404 {
                return serde_json::Value::Null;
            }
            let s = r.json()["snapshot"].clone();
            if s["status"] != "creating" && s["status"] != "deleting" {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "snapshot {id} stuck: {s}\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Poll a volume until its status is not in `busy`.
    pub fn wait_volume(&self, id: &str, busy: &[&str]) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let r = self.call("GET", &format!("/volumes/{id}"), None);
            if r.status == 404 {
                return serde_json::Value::Null;
            }
            let v = r.json()["volume"].clone();
            if !busy.iter().any(|b| v["status"] == *b) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "volume {id} stuck: {v}\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Create a snapshot of `volume` and wait for it; returns its id.
    pub fn snapshot(&self, volume: &str, name: &str) -> String {
        let r = self.call(
            "POST",
            "/snapshots",
            Some(&format!(
                r#"{{"snapshot": {{"volume_id": "{volume}", "display_name": "{name}"}}}}"#
            )),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
        let s = self.wait_snapshot(&id);
        assert_eq!(s["status"], "available", "{s}\n{}", self.log_text());
        id
    }

    /// The chain file of a volume.
    pub fn chain(&self, volume: &str) -> PathBuf {
        self.state.join("chains").join(format!("{volume}.chain"))
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Loop devices of volumes made from snapshots.
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                    if Path::new(b.trim()).starts_with(&self.state) {
                        let dev = PathBuf::from("/dev").join(e.file_name());
                        cleanup_mounts_of(&dev);
                        let _ = loopdev::detach(&dev);
                    }
                }
            }
        }
    }
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    /// The error body's name and message, asserting the reference's shape.
    pub fn error(&self) -> (String, String) {
        let v = self.json();
        let m = v.as_object().expect("error body is an object");
        assert_eq!(m.len(), 1, "error body has one key: {v}");
        let (name, inner) = m.iter().next().unwrap();
        assert_eq!(
            inner["code"], self.status,
            "code in body matches status: {v}"
        );
        (
            name.clone(),
            inner["message"].as_str().unwrap_or("").to_string(),
        )
    }
}

/// One HTTP/1.1 request over a Unix socket (test-side client).
pub fn try_http(
    socket: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    extra_headers: &[(&str, &str)],
) -> std::io::Result<Resp> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("X-Auth-Token: {t}\r\n"));
    }
    let has_ct = extra_headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if let Some(b) = body {
        if !has_ct {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        // The server may answer (413) and close before the body is sent.
        match s.write_all(b.as_bytes()) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            other => other?,
        }
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::other(format!(
            "unparsable response: {:?}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Resp {
    try_http(socket, method, path, token, body, &[]).unwrap()
}

pub fn parse_response(raw: &[u8]) -> Option<Resp> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let n =
                usize::from_str_radix(std::str::from_utf8(&rest[..nl]).ok()?.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(rest.get(nl + 2..nl + 2 + n)?);
            rest = rest.get(nl + 2 + n + 2..)?;
        }
        body = out;
    }
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A volume table entry for the config.
pub fn volume_toml(id: &str, device: &Path, extra: &str) -> String {
    format!(
        "[[volumes]]\nid = \"{id}\"\ndevice = \"{}\"\n{extra}\n",
        device.display()
    )
}

/// A snapshot restored into an image file in its own temporary directory.
pub struct Restored {
    _dir: tempfile::TempDir,
    pub image: PathBuf,
}

/// Restore snapshot `id` of `chain` into a new image file.
pub fn restore_image(chain: &Path, id: &str) -> Restored {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("restored.img");
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        image.as_os_str(),
    ]);
    Restored { _dir: dir, image }
}

/// Restore a snapshot of an ext4 volume, check it with fsck.ext4 -n and mount
/// it read-only; returns the guards (mount first) and the restored image.
pub fn restore_and_mount(chain: &Path, id: &str) -> (Mounted, Loop, Restored) {
    let restored = restore_image(chain, id);
    let image = restored.image.clone();
    let check = Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "fsck.ext4 -n found problems in snapshot {id}:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let l = Loop::from_image(&image);
    let m = Mounted::new(&l.dev, "ext4", "ro");
    (m, l, restored)
}

/// Make a request as user `uid` (group `uid` too) from a forked child.
/// `Err(errno)` if it could not connect.
pub fn as_user(uid: u32, socket: &Path, path: &str, token: Option<&str>) -> Result<Resp, i32> {
    use std::io::Read;
    let (mut rx, mut tx) = std::os::unix::net::UnixStream::pair().unwrap();
    // SAFETY: the child drops privileges, makes one request, writes the
    // answer to a socket and leaves with _exit; glibc keeps malloc usable
    // after fork.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(rx);
            let _ = nix::unistd::setgroups(&[]);
            let _ = nix::unistd::setgid(nix::unistd::Gid::from_raw(uid));
            let msg = if nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).is_err() {
                "E:-1".to_string()
            } else {
                match try_http(socket, "GET", path, token, None, &[]) {
                    Ok(r) => format!("S:{}\n{}", r.status, r.body),
                    Err(e) => format!("E:{}", e.raw_os_error().unwrap_or(0)),
                }
            };
            let _ = tx.write_all(msg.as_bytes());
            // SAFETY: end the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(tx);
            let mut s = String::new();
            rx.read_to_string(&mut s).unwrap();
            nix::sys::wait::waitpid(child, None).unwrap();
            if let Some(e) = s.strip_prefix("E:") {
                return Err(e.parse().unwrap_or_else(|_| panic!("child said {s:?}")));
            }
            let (status, body) = s
                .strip_prefix("S:")
                .and_then(|r| r.split_once('\n'))
                .expect("child answer");
            Ok(Resp {
                status: status.parse().unwrap(),
                headers: Vec::new(),
                body: body.to_string(),
            })
        }
    }
}

/// The status of a request made as user `uid`.
pub fn as_user_status(
    uid: u32,
    socket: &Path,
    path: &str,
    token: Option<&str>,
) -> Result<u16, i32> {
    as_user(uid, socket, path, token).map(|r| r.status)
}

/// The permission bits of a file or directory.
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Set the umask of the test process (inherited by the binaries it runs).
pub fn set_umask(mask: u32) {
    // SAFETY: umask has no failure mode; it changes one process attribute.
    unsafe { libc::umask(mask as libc::mode_t) };
}
