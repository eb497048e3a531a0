//! Making a volume consistent for the length of a scan: freeze its mounted
//! filesystem, unmount it, or hold the unmounted device exclusively.
//!
//! A frozen filesystem stalls every writer on the host and the kernel never
//! thaws it on its own, so every freeze here is bounded: a guard thaws on
//! every way out (success, error, panic), a watchdog thaws when the maximum
//! freeze time runs out, and an intent marker on disk lets the next start (or
//! `blocksnap thaw --all`) thaw a freeze whose owner was killed.
//!
//! The system calls go through the [`System`] trait so the decisions here are
//! testable without root.

pub mod intent;
pub mod mountinfo;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use mountinfo::Mount;

/// How a volume is made consistent for a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Freeze a mounted filesystem; otherwise hold the device exclusively.
    #[default]
    Auto,
    /// Freeze the mounted filesystem (FIFREEZE) for the scan.
    Freeze,
    /// Unmount every mount of the device for the scan, then mount it again.
    Unmount,
    /// Do nothing; the device must not be mounted (or the snapshot forced).
    None,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Freeze => "freeze",
            Mode::Unmount => "unmount",
            Mode::None => "none",
        })
    }
}

/// Errors of the quiesce layer.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("cannot read the mount table")]
    Mounts(#[source] io::Error),
    #[error("the filesystem at {mount_point} is already frozen by someone else; blocksnap does not thaw a freeze it does not own: thaw it with `fsfreeze -u {mount_point}` once its owner is done, then retry")]
    AlreadyFrozen { mount_point: PathBuf },
    #[error("cannot freeze the filesystem at {mount_point}")]
    Freeze {
        mount_point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot thaw the filesystem at {mount_point}; writers on it are stalled until it is thawed: run `blocksnap thaw {mount_point}` or `fsfreeze -u {mount_point}`")]
    Thaw {
        mount_point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the freeze intent marker in {dir}; refusing to freeze without it")]
    Marker {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{device} is mounted at {mount_point} and its quiesce mode is none: a snapshot now would only be crash-consistent; unmount it, use quiesce auto, freeze or unmount, or force the snapshot")]
    MountedWithoutQuiesce {
        device: PathBuf,
        mount_point: PathBuf,
    },
    #[error("cannot unmount {mount_point}: it is busy (a process has files open there; `fuser -vm {mount_point}` shows which); nothing was changed")]
    UnmountBusy { mount_point: PathBuf },
    #[error("cannot unmount {mount_point}")]
    Unmount {
        mount_point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not mount {device} again after the snapshot; NOT MOUNTED: {missing}")]
    Remount { device: PathBuf, missing: String },
    #[error("{path} is on the filesystem being snapshotted (mounted at {mount_point}); freezing or unmounting it would deadlock or lose the snapshot: keep chains and state on another filesystem")]
    OnSnapshottedFilesystem { path: PathBuf, mount_point: PathBuf },
    #[error("the filesystem at {mount_point} stayed frozen for the maximum of {max:?} (max_freeze_seconds); it was thawed and the snapshot abandoned: raise the limit or use quiesce unmount for this volume")]
    FreezeExpired { mount_point: PathBuf, max: Duration },
    #[error("{path} is a regular file, which cannot be frozen or unmounted; use quiesce auto or none and make sure nothing writes it during the snapshot")]
    FileCannotQuiesce { path: PathBuf },
}

/// A frozen filesystem: the descriptor it was frozen through.
#[derive(Debug)]
pub struct Frozen {
    pub mount_point: PathBuf,
    pub fd: Option<OwnedFd>,
}

/// One step of putting mounts back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountOp {
    /// Mount the device itself.
    Device {
        source: PathBuf,
        target: PathBuf,
        fs_type: String,
        flags: u64,
        data: String,
    },
    /// Bind-mount `from` (a path under an already restored mount) at `target`,
    /// then apply the per-mount `flags`.
    Bind {
        from: PathBuf,
        target: PathBuf,
        flags: u64,
    },
}

impl MountOp {
    pub fn target(&self) -> &Path {
        match self {
            MountOp::Device { target, .. } | MountOp::Bind { target, .. } => target,
        }
    }

    /// A shell command an operator could run to do the same by hand.
    pub fn command(&self) -> String {
        match self {
            MountOp::Device {
                source,
                target,
                fs_type,
                flags,
                data,
            } => {
                let mut opts = flag_names(*flags);
                if !data.is_empty() {
                    opts.push(data.clone());
                }
                let o = if opts.is_empty() {
                    String::new()
                } else {
                    format!(" -o {}", opts.join(","))
                };
                format!(
                    "mount -t {fs_type}{o} {} {}",
                    source.display(),
                    target.display()
                )
            }
            MountOp::Bind { from, target, .. } => {
                format!("mount --bind {} {}", from.display(), target.display())
            }
        }
    }
}

/// The system calls quiescing needs.
pub trait System: Send + Sync {
    /// Every mount of the device at `device`.
    fn mounts_of(&self, device: &Path) -> io::Result<Vec<Mount>>;
    fn freeze(&self, mount_point: &Path) -> io::Result<Frozen>;
    fn thaw_frozen(&self, frozen: &Frozen) -> io::Result<()>;
    /// Thaw by path (for leftovers whose descriptor is gone).
    fn thaw(&self, mount_point: &Path) -> io::Result<()>;
    fn unmount(&self, mount_point: &Path) -> io::Result<()>;
    fn mount(&self, op: &MountOp) -> io::Result<()>;
    /// The filesystem (st_dev) `path` lives on.
    fn fs_of(&self, path: &Path) -> io::Result<u64>;
}

/// The real system.
#[derive(Debug, Default, Clone, Copy)]
pub struct Host;

impl System for Host {
    fn mounts_of(&self, device: &Path) -> io::Result<Vec<Mount>> {
        let md = std::fs::metadata(device)?;
        use std::os::unix::fs::FileTypeExt;
        if !md.file_type().is_block_device() {
            return Ok(Vec::new());
        }
        Ok(mountinfo::mounts_of(&mountinfo::read()?, md.rdev(), device))
    }

    fn freeze(&self, mount_point: &Path) -> io::Result<Frozen> {
        let dir = open_dir(mount_point)?;
        crate::sys::freeze(dir.as_fd())?;
        Ok(Frozen {
            mount_point: mount_point.to_path_buf(),
            fd: Some(dir.into()),
        })
    }

    fn thaw_frozen(&self, frozen: &Frozen) -> io::Result<()> {
        match &frozen.fd {
            Some(fd) => crate::sys::thaw(fd.as_fd()),
            None => self.thaw(&frozen.mount_point),
        }
    }

    fn thaw(&self, mount_point: &Path) -> io::Result<()> {
        let dir = open_dir(mount_point)?;
        crate::sys::thaw(dir.as_fd())
    }

    fn unmount(&self, mount_point: &Path) -> io::Result<()> {
        let target = cstr(mount_point)?;
        in_host_mount_namespace(|| {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), 0) }
        })
    }

    fn mount(&self, op: &MountOp) -> io::Result<()> {
        match op {
            MountOp::Device {
                source,
                target,
                fs_type,
                flags,
                data,
            } => {
                let (s, t) = (cstr(source)?, cstr(target)?);
                let (f, d) = (cstr(Path::new(fs_type))?, cstr(Path::new(data))?);
                let flags = *flags;
                let with_data = !data.is_empty();
                in_host_mount_namespace(|| {
                    let data_ptr = if with_data {
                        d.as_ptr() as *const libc::c_void
                    } else {
                        std::ptr::null()
                    };
                    // SAFETY: every pointer is a valid NUL-terminated string
                    // (or null for no data) that outlives the call.
                    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, data_ptr) }
                })
            }
            MountOp::Bind {
                from,
                target,
                flags,
            } => {
                let (s, t) = (cstr(from)?, cstr(target)?);
                let flags = *flags;
                in_host_mount_namespace(|| {
                    // SAFETY: valid NUL-terminated paths; a null fs type and
                    // data are allowed for bind mounts and remounts.
                    let rc = unsafe {
                        libc::mount(
                            s.as_ptr(),
                            t.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        )
                    };
                    if rc != 0 || flags == 0 {
                        return rc;
                    }
                    // SAFETY: as above.
                    unsafe {
                        libc::mount(
                            std::ptr::null(),
                            t.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REMOUNT | libc::MS_BIND | flags,
                            std::ptr::null(),
                        )
                    }
                })
            }
        }
    }

    fn fs_of(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.dev())
    }
}

fn cstr(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Run a mount-table change (`call` returns 0, or -1 with errno set) in the
/// host's mount namespace. Under systemd, ProtectSystem= and friends give the
/// service its own namespace whose mount changes never reach the host, so an
/// unmount there would not free the device and a remount would be invisible.
/// When our namespace differs from the host's, a forked child (single-
/// threaded, as setns needs) enters the host's namespace and makes the call.
///
/// The host's namespace is PID 1's unless `BLOCKSNAP_HOST_MOUNT_NS` names
/// another namespace file (for containers and tests).
fn in_host_mount_namespace(call: impl FnOnce() -> libc::c_int) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let host_ns =
        std::env::var("BLOCKSNAP_HOST_MOUNT_NS").unwrap_or_else(|_| "/proc/1/ns/mnt".into());
    let ns_id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let same = match (ns_id("/proc/self/ns/mnt"), ns_id(&host_ns)) {
        (Some(a), Some(b)) => a == b,
        // Cannot tell (no access to PID 1's namespace): act where we are.
        _ => true,
    };
    if same {
        return if call() == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    let ns = std::fs::File::open(&host_ns)?;
    let ns_fd = std::os::fd::AsRawFd::as_raw_fd(&ns);
    // SAFETY: the child only makes system calls (setns, the mount call,
    // _exit) on data prepared before the fork and never returns into code
    // shared with the parent.
    match unsafe { nix::unistd::fork() }.map_err(|e| io::Error::from_raw_os_error(e as i32))? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: setns on a namespace descriptor we hold open.
            let code = if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNS) } != 0 {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EPERM)
            } else if call() != 0 {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                0
            };
            // SAFETY: end the child without running the parent's destructors.
            unsafe { libc::_exit(code.clamp(0, 255)) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?
            {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
                nix::sys::wait::WaitStatus::Exited(_, code) => {
                    Err(io::Error::from_raw_os_error(code))
                }
                other => Err(io::Error::other(format!(
                    "mount helper ended with {other:?}"
                ))),
            }
        }
    }
}

fn open_dir(path: &Path) -> io::Result<std::fs::File> {
    // O_NOATIME: opening must not write to the filesystem we freeze.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOATIME | libc::O_CLOEXEC)
        .open(path)
}

/// Per-mount option names and their MS_* flags.
const FLAG_NAMES: &[(&str, u64)] = &[
    ("ro", libc::MS_RDONLY),
    ("nosuid", libc::MS_NOSUID),
    ("nodev", libc::MS_NODEV),
    ("noexec", libc::MS_NOEXEC),
    ("noatime", libc::MS_NOATIME),
    ("nodiratime", libc::MS_NODIRATIME),
    ("relatime", libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME),
    ("sync", libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC),
];

/// MS_* flags for a mountinfo per-mount option string.
pub fn mount_flags(options: &str) -> u64 {
    options
        .split(',')
        .filter_map(|o| FLAG_NAMES.iter().find(|(n, _)| *n == o).map(|(_, f)| *f))
        .fold(0, |a, f| a | f)
}

fn flag_names(flags: u64) -> Vec<String> {
    FLAG_NAMES
        .iter()
        .filter(|(_, f)| flags & f != 0)
        .map(|(n, _)| n.to_string())
        .collect()
}

/// The filesystem's own options, minus those that are per-mount flags.
fn data_string(super_options: &str) -> String {
    super_options
        .split(',')
        .filter(|o| !o.is_empty() && !matches!(*o, "rw" | "ro" | "seclabel"))
        .collect::<Vec<_>>()
        .join(",")
}

fn depth(p: &Path) -> usize {
    p.components().count()
}

/// Order in which to unmount: deepest mount points first.
pub fn unmount_order(mounts: &[Mount]) -> Vec<Mount> {
    let mut m = mounts.to_vec();
    m.sort_by(|a, b| {
        depth(&b.mount_point)
            .cmp(&depth(&a.mount_point))
            .then(b.id.cmp(&a.id))
    });
    m
}

/// How to put `mounts` (of `device`) back: mount the device at the first
/// whole-filesystem mount, then bind the rest from it, parents first.
pub fn remount_plan(mounts: &[Mount], device: &Path) -> Vec<MountOp> {
    let mut m = mounts.to_vec();
    m.sort_by(|a, b| {
        depth(&a.mount_point)
            .cmp(&depth(&b.mount_point))
            .then(a.id.cmp(&b.id))
    });
    let primary = m.iter().position(|x| x.root == Path::new("/")).unwrap_or(0);
    let first = m.remove(primary);
    let mut ops = vec![MountOp::Device {
        source: device.to_path_buf(),
        target: first.mount_point.clone(),
        fs_type: first.fs_type.clone(),
        flags: mount_flags(&first.options),
        data: data_string(&first.super_options),
    }];
    let base = first.mount_point.clone();
    let base_root = first.root.clone();
    for x in m {
        let rel = x.root.strip_prefix(&base_root).unwrap_or(&x.root);
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        ops.push(MountOp::Bind {
            from: base.join(rel),
            target: x.mount_point.clone(),
            flags: mount_flags(&x.options),
        });
    }
    ops
}

/// Options for [`quiesce`].
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    /// Allow a crash-consistent snapshot of a mounted device in mode none.
    pub force: bool,
    pub max_freeze: Duration,
    /// Where to keep freeze intent markers; `None` skips them (tests only).
    pub intent_dir: Option<PathBuf>,
    /// Paths the snapshot writes to; refused if they are on the volume.
    pub keep_off: Vec<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Auto,
            force: false,
            max_freeze: Duration::from_secs(60),
            intent_dir: None,
            keep_off: Vec::new(),
        }
    }
}

struct FreezeState {
    frozen: Option<Frozen>,
    marker: Option<intent::Marker>,
    expired: bool,
    thaw_error: Option<io::Error>,
}

struct FreezeGuard {
    sys: Arc<dyn System>,
    state: Arc<Mutex<FreezeState>>,
    stop: Option<mpsc::Sender<()>>,
    watchdog: Option<JoinHandle<()>>,
    frozen_at: Instant,
    mount_point: PathBuf,
    max: Duration,
}

fn thaw_locked(sys: &dyn System, st: &mut FreezeState) {
    if let Some(f) = st.frozen.take() {
        match sys.thaw_frozen(&f) {
            Ok(()) => {}
            // Not frozen any more: someone thawed it by hand. Nothing to do.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(mount_point = %f.mount_point.display(), "filesystem was already thawed")
            }
            Err(e) => {
                tracing::error!(mount_point = %f.mount_point.display(), "thaw failed: {e}");
                st.thaw_error = Some(e);
                // Keep the marker: the next start retries the thaw.
                st.marker = None;
                return;
            }
        }
        if let Some(m) = st.marker.take() {
            m.clear();
        }
    }
}

impl FreezeGuard {
    fn start(
        sys: Arc<dyn System>,
        device: &Path,
        mount_point: &Path,
        opts: &Options,
        cancel: Arc<AtomicBool>,
    ) -> Result<FreezeGuard, QuiesceError> {
        let marker = match &opts.intent_dir {
            Some(dir) => Some(intent::Marker::write(dir, device, mount_point).map_err(
                |source| QuiesceError::Marker {
                    dir: dir.clone(),
                    source,
                },
            )?),
            None => None,
        };
        crate::fault::point("before-freeze");
        let frozen = match sys.freeze(mount_point) {
            Ok(f) => f,
            Err(e) => {
                if let Some(m) = marker {
                    m.clear();
                }
                return Err(if e.raw_os_error() == Some(libc::EBUSY) {
                    QuiesceError::AlreadyFrozen {
                        mount_point: mount_point.to_path_buf(),
                    }
                } else {
                    QuiesceError::Freeze {
                        mount_point: mount_point.to_path_buf(),
                        source: e,
                    }
                });
            }
        };
        let frozen_at = Instant::now();
        let state = Arc::new(Mutex::new(FreezeState {
            frozen: Some(frozen),
            marker,
            expired: false,
            thaw_error: None,
        }));
        let (tx, rx) = mpsc::channel::<()>();
        let wd_state = state.clone();
        let wd_sys = sys.clone();
        let max = opts.max_freeze;
        let mp = mount_point.to_path_buf();
        let watchdog = std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(max) {
                    let mut st = wd_state.lock().unwrap_or_else(|p| p.into_inner());
                    if st.frozen.is_some() {
                        tracing::error!(
                            mount_point = %mp.display(),
                            "maximum freeze time of {max:?} reached; thawing and abandoning the snapshot"
                        );
                        st.expired = true;
                        cancel.store(true, Ordering::SeqCst);
                        thaw_locked(wd_sys.as_ref(), &mut st);
                    }
                }
            })
            .map_err(|e| {
                // Without a watchdog we must not stay frozen.
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                thaw_locked(sys.as_ref(), &mut st);
                QuiesceError::Freeze {
                    mount_point: mount_point.to_path_buf(),
                    source: e,
                }
            })?;
        Ok(FreezeGuard {
            sys,
            state,
            stop: Some(tx),
            watchdog: Some(watchdog),
            frozen_at,
            mount_point: mount_point.to_path_buf(),
            max,
        })
    }

    fn expired(&self) -> bool {
        self.state.lock().map(|s| s.expired).unwrap_or(true)
    }

    /// Thaw (unless the watchdog already did); returns the freeze window.
    fn release(&mut self) -> Result<Duration, QuiesceError> {
        drop(self.stop.take());
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        thaw_locked(self.sys.as_ref(), &mut st);
        let window = self.frozen_at.elapsed();
        if let Some(e) = st.thaw_error.take() {
            return Err(QuiesceError::Thaw {
                mount_point: self.mount_point.clone(),
                source: e,
            });
        }
        if st.expired {
            return Err(QuiesceError::FreezeExpired {
                mount_point: self.mount_point.clone(),
                max: self.max,
            });
        }
        Ok(window)
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            if let Err(e) = self.release() {
                tracing::error!("{}", crate::util::error_chain(&e));
            }
        }
    }
}

struct UnmountGuard {
    sys: Arc<dyn System>,
    device: PathBuf,
    plan: Vec<MountOp>,
    done: bool,
}

impl UnmountGuard {
    fn restore(&mut self) -> Result<(), QuiesceError> {
        self.done = true;
        let mut missing = Vec::new();
        for op in &self.plan {
            // If a parent failed to mount, its binds fail too and are listed.
            if let Err(e) = self.sys.mount(op) {
                let retried = match op {
                    MountOp::Device {
                        source,
                        target,
                        fs_type,
                        flags,
                        data,
                    } if !data.is_empty() && e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::warn!(
                            "mounting {} with its old options \"{data}\" failed ({e}); retrying without them",
                            target.display()
                        );
                        self.sys.mount(&MountOp::Device {
                            source: source.clone(),
                            target: target.clone(),
                            fs_type: fs_type.clone(),
                            flags: *flags,
                            data: String::new(),
                        })
                    }
                    _ => Err(e),
                };
                if let Err(e) = retried {
                    tracing::error!(
                        device = %self.device.display(),
                        mount_point = %op.target().display(),
                        "could not mount the volume again: {e}; mount it by hand: {}",
                        op.command()
                    );
                    missing.push(format!(
                        "{} ({e}; to fix: {})",
                        op.target().display(),
                        op.command()
                    ));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(QuiesceError::Remount {
                device: self.device.clone(),
                missing: missing.join("; "),
            })
        }
    }
}

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.restore() {
                tracing::error!("{}", crate::util::error_chain(&e));
            }
        }
    }
}

enum Held {
    Nothing,
    Frozen(FreezeGuard),
    Unmounted(UnmountGuard),
}

/// A volume held consistent. Call [`Quiesced::finish`] after the scan; if it
/// is dropped instead (error, panic), it thaws or remounts anyway.
pub struct Quiesced {
    held: Held,
    exclusive: bool,
    crash_consistent: bool,
    description: String,
}

impl std::fmt::Debug for Quiesced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiesced")
            .field("how", &self.description)
            .field("exclusive", &self.exclusive)
            .finish()
    }
}

impl Quiesced {
    /// Whether the device must be opened exclusively (O_EXCL) for the scan.
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }

    /// Whether the snapshot is only crash-consistent (forced, mounted, mode none).
    pub fn crash_consistent(&self) -> bool {
        self.crash_consistent
    }

    /// What was done, for logs: "frozen /mnt/data", "unmounted 2 mounts", ...
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Whether the maximum freeze time ran out (the scan must stop).
    pub fn expired(&self) -> bool {
        match &self.held {
            Held::Frozen(g) => g.expired(),
            _ => false,
        }
    }

    /// End the quiesce: thaw or remount. Returns how long the filesystem was
    /// frozen (zero if it was not). Fails loudly if the filesystem could not
    /// be thawed or mounted again, or if the freeze outlived its maximum.
    pub fn finish(mut self) -> Result<Duration, QuiesceError> {
        match &mut self.held {
            Held::Nothing => Ok(Duration::ZERO),
            Held::Frozen(g) => {
                let r = g.release();
                g.watchdog = None;
                r
            }
            Held::Unmounted(g) => g.restore().map(|()| Duration::ZERO),
        }
    }
}

/// Make `device` consistent according to `opts`. `cancel` is set if the
/// maximum freeze time runs out, so the scan can stop early.
pub fn quiesce(
    sys: Arc<dyn System>,
    device: &Path,
    opts: &Options,
    cancel: Arc<AtomicBool>,
) -> Result<Quiesced, QuiesceError> {
    let is_block = {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(device)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false)
    };
    if !is_block {
        // An image file: nothing to freeze or unmount.
        return match opts.mode {
            Mode::Freeze | Mode::Unmount => Err(QuiesceError::FileCannotQuiesce {
                path: device.to_path_buf(),
            }),
            _ => Ok(Quiesced {
                held: Held::Nothing,
                exclusive: false,
                crash_consistent: false,
                description: "image file, read as is".into(),
            }),
        };
    }
    let mounts = sys.mounts_of(device).map_err(QuiesceError::Mounts)?;
    let exclusive = |what: &str| Quiesced {
        held: Held::Nothing,
        exclusive: true,
        crash_consistent: false,
        description: what.to_string(),
    };
    if mounts.is_empty() {
        return Ok(exclusive("not mounted; held exclusively"));
    }
    let check_keep_off = || -> Result<(), QuiesceError> {
        for m in &mounts {
            let Ok(vol_fs) = sys.fs_of(&m.mount_point) else {
                continue;
            };
            for p in &opts.keep_off {
                // Check the path itself or, if it does not exist yet, its parent.
                let probe = if p.exists() {
                    p.clone()
                } else {
                    p.parent().map(Path::to_path_buf).unwrap_or_default()
                };
                if sys.fs_of(&probe).ok() == Some(vol_fs) {
                    return Err(QuiesceError::OnSnapshottedFilesystem {
                        path: p.clone(),
                        mount_point: m.mount_point.clone(),
                    });
                }
            }
        }
        Ok(())
    };
    match opts.mode {
        Mode::None => {
            if !opts.force {
                return Err(QuiesceError::MountedWithoutQuiesce {
                    device: device.to_path_buf(),
                    mount_point: mounts[0].mount_point.clone(),
                });
            }
            tracing::warn!(
                device = %device.display(),
                "snapshot of a mounted device without quiescing (forced): crash-consistent only"
            );
            Ok(Quiesced {
                held: Held::Nothing,
                exclusive: false,
                crash_consistent: true,
                description: "mounted, forced without quiescing (crash-consistent)".into(),
            })
        }
        Mode::Auto | Mode::Freeze => {
            check_keep_off()?;
            // One freeze per filesystem: any mount point reaches the superblock.
            let mp = mounts
                .iter()
                .find(|m| m.root == Path::new("/"))
                .unwrap_or(&mounts[0])
                .mount_point
                .clone();
            let guard = FreezeGuard::start(sys, device, &mp, opts, cancel)?;
            Ok(Quiesced {
                held: Held::Frozen(guard),
                exclusive: false,
                crash_consistent: false,
                description: format!("froze the filesystem at {}", mp.display()),
            })
        }
        Mode::Unmount => {
            check_keep_off()?;
            let plan = remount_plan(&mounts, device);
            let mut guard = UnmountGuard {
                sys: sys.clone(),
                device: device.to_path_buf(),
                plan: Vec::new(),
                done: false,
            };
            let order = unmount_order(&mounts);
            for (i, m) in order.iter().enumerate() {
                if let Err(e) = sys.unmount(&m.mount_point) {
                    // Put back what we already took away, in reverse.
                    let undone: Vec<&Mount> = order[..i].iter().collect();
                    let back: Vec<Mount> = undone.into_iter().cloned().collect();
                    guard.plan = if back.is_empty() {
                        Vec::new()
                    } else {
                        rebuild_partial(&plan, &back)
                    };
                    guard.restore()?;
                    return Err(if e.raw_os_error() == Some(libc::EBUSY) {
                        QuiesceError::UnmountBusy {
                            mount_point: m.mount_point.clone(),
                        }
                    } else {
                        QuiesceError::Unmount {
                            mount_point: m.mount_point.clone(),
                            source: e,
                        }
                    });
                }
            }
            guard.plan = plan;
            Ok(Quiesced {
                held: Held::Unmounted(guard),
                exclusive: true,
                crash_consistent: false,
                description: format!("unmounted {} mount(s)", mounts.len()),
            })
        }
    }
}

/// The steps of `plan` that restore exactly the mounts in `back`. If the
/// device mount itself is among them it comes first as planned; binds whose
/// source mount is still in place are bound from it.
fn rebuild_partial(plan: &[MountOp], back: &[Mount]) -> Vec<MountOp> {
    plan.iter()
        .filter(|op| back.iter().any(|m| m.mount_point == op.target()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A fake system: mounts in memory, a set of busy mount points, a log of calls.
    #[derive(Default)]
    struct Fake {
        mounts: Mutex<Vec<Mount>>,
        busy: HashSet<PathBuf>,
        frozen: Mutex<HashSet<PathBuf>>,
        fail_mount: bool,
        log: Mutex<Vec<String>>,
    }

    fn mnt(id: u32, root: &str, mp: &str, opts: &str) -> Mount {
        Mount {
            id,
            parent: 1,
            major: 7,
            minor: 9,
            root: root.into(),
            mount_point: mp.into(),
            options: opts.into(),
            fs_type: "ext4".into(),
            source: "/dev/loop9".into(),
            super_options: "rw,errors=remount-ro".into(),
        }
    }

    impl System for Fake {
        fn mounts_of(&self, _: &Path) -> io::Result<Vec<Mount>> {
            Ok(self.mounts.lock().unwrap().clone())
        }
        fn freeze(&self, mp: &Path) -> io::Result<Frozen> {
            self.log
                .lock()
                .unwrap()
                .push(format!("freeze {}", mp.display()));
            if !self.frozen.lock().unwrap().insert(mp.to_path_buf()) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            Ok(Frozen {
                mount_point: mp.to_path_buf(),
                fd: None,
            })
        }
        fn thaw_frozen(&self, f: &Frozen) -> io::Result<()> {
            self.thaw(&f.mount_point)
        }
        fn thaw(&self, mp: &Path) -> io::Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("thaw {}", mp.display()));
            if self.frozen.lock().unwrap().remove(mp) {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        }
        fn unmount(&self, mp: &Path) -> io::Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("umount {}", mp.display()));
            if self.busy.contains(mp) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            self.mounts.lock().unwrap().retain(|m| m.mount_point != mp);
            Ok(())
        }
        fn mount(&self, op: &MountOp) -> io::Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("mount {}", op.target().display()));
            if self.fail_mount {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
        fn fs_of(&self, p: &Path) -> io::Result<u64> {
            Ok(if p.starts_with("/mnt/data") { 99 } else { 1 })
        }
    }

    fn block_device() -> Option<PathBuf> {
        // quiesce() checks the path is a block device; any will do for the fake.
        std::fs::read_dir("/dev")
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(p)
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false)
            })
    }

    fn opts(mode: Mode) -> Options {
        Options {
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn remount_plan_binds_from_the_primary() {
        let m = vec![
            mnt(30, "/sub", "/srv/sub", "ro,nosuid,relatime"),
            mnt(20, "/", "/mnt/data", "rw,relatime"),
        ];
        let plan = remount_plan(&m, Path::new("/dev/loop9"));
        assert_eq!(
            plan[0],
            MountOp::Device {
                source: "/dev/loop9".into(),
                target: "/mnt/data".into(),
                fs_type: "ext4".into(),
                flags: libc::MS_RELATIME,
                data: "errors=remount-ro".into(),
            }
        );
        assert_eq!(
            plan[1],
            MountOp::Bind {
                from: "/mnt/data/sub".into(),
                target: "/srv/sub".into(),
                flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_RELATIME,
            }
        );
        assert_eq!(
            plan[0].command(),
            "mount -t ext4 -o relatime,errors=remount-ro /dev/loop9 /mnt/data"
        );
    }

    #[test]
    fn unmount_goes_deepest_first() {
        let m = vec![
            mnt(1, "/", "/a", "rw"),
            mnt(2, "/x", "/a/b/c", "rw"),
            mnt(3, "/", "/a/b", "rw"),
        ];
        let order: Vec<_> = unmount_order(&m)
            .into_iter()
            .map(|x| x.mount_point)
            .collect();
        assert_eq!(
            order,
            vec![PathBuf::from("/a/b/c"), "/a/b".into(), "/a".into()]
        );
    }

    #[test]
    fn busy_unmount_puts_back_what_it_took() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake {
            busy: ["/mnt/data".into()].into_iter().collect(),
            ..Default::default()
        });
        *fake.mounts.lock().unwrap() = vec![
            mnt(20, "/", "/mnt/data", "rw"),
            mnt(30, "/sub", "/mnt/data/deep/er", "rw"),
        ];
        let err =
            quiesce(fake.clone(), &dev, &opts(Mode::Unmount), Default::default()).unwrap_err();
        assert!(matches!(err, QuiesceError::UnmountBusy { .. }), "{err}");
        let log = fake.log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                "umount /mnt/data/deep/er",
                "umount /mnt/data",
                "mount /mnt/data/deep/er"
            ]
        );
    }

    #[test]
    fn failed_remount_is_loud_and_names_the_mount() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake {
            fail_mount: true,
            ..Default::default()
        });
        *fake.mounts.lock().unwrap() = vec![mnt(20, "/", "/mnt/data", "rw")];
        let q = quiesce(fake.clone(), &dev, &opts(Mode::Unmount), Default::default()).unwrap();
        assert!(q.exclusive());
        let err = q.finish().unwrap_err();
        let msg = crate::util::error_chain(&err);
        assert!(msg.contains("NOT MOUNTED: /mnt/data"), "{msg}");
        assert!(msg.contains("mount -t ext4"), "{msg}");
    }

    #[test]
    fn freeze_is_thawed_on_finish_on_drop_and_on_panic() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake::default());
        *fake.mounts.lock().unwrap() = vec![mnt(20, "/", "/mnt/data", "rw")];
        let q = quiesce(fake.clone(), &dev, &opts(Mode::Auto), Default::default()).unwrap();
        assert!(fake.frozen.lock().unwrap().contains(Path::new("/mnt/data")));
        q.finish().unwrap();
        assert!(fake.frozen.lock().unwrap().is_empty());

        let q = quiesce(fake.clone(), &dev, &opts(Mode::Freeze), Default::default()).unwrap();
        drop(q);
        assert!(fake.frozen.lock().unwrap().is_empty());

        let f2 = fake.clone();
        let d2 = dev.clone();
        let r = std::thread::spawn(move || {
            let _q = quiesce(f2, &d2, &opts(Mode::Freeze), Default::default()).unwrap();
            panic!("scan blew up");
        })
        .join();
        assert!(r.is_err());
        assert!(fake.frozen.lock().unwrap().is_empty());
    }

    #[test]
    fn someone_elses_freeze_is_not_thawed() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake::default());
        *fake.mounts.lock().unwrap() = vec![mnt(20, "/", "/mnt/data", "rw")];
        fake.frozen.lock().unwrap().insert("/mnt/data".into());
        let err = quiesce(fake.clone(), &dev, &opts(Mode::Freeze), Default::default()).unwrap_err();
        assert!(matches!(err, QuiesceError::AlreadyFrozen { .. }));
        assert!(fake.frozen.lock().unwrap().contains(Path::new("/mnt/data")));
        assert!(!fake
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("thaw")));
    }

    #[test]
    fn watchdog_thaws_at_the_limit() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake::default());
        *fake.mounts.lock().unwrap() = vec![mnt(20, "/", "/mnt/data", "rw")];
        let cancel = Arc::new(AtomicBool::new(false));
        let o = Options {
            mode: Mode::Freeze,
            max_freeze: Duration::from_millis(20),
            ..Default::default()
        };
        let q = quiesce(fake.clone(), &dev, &o, cancel.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(cancel.load(Ordering::SeqCst));
        assert!(q.expired());
        assert!(
            fake.frozen.lock().unwrap().is_empty(),
            "watchdog did not thaw"
        );
        let err = q.finish().unwrap_err();
        assert!(matches!(err, QuiesceError::FreezeExpired { .. }));
    }

    #[test]
    fn mounted_device_with_mode_none_needs_force() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake::default());
        *fake.mounts.lock().unwrap() = vec![mnt(20, "/", "/mnt/data", "rw")];
        let err = quiesce(fake.clone(), &dev, &opts(Mode::None), Default::default()).unwrap_err();
        assert!(err.to_string().contains("crash-consistent"));
        let o = Options {
            mode: Mode::None,
            force: true,
            ..Default::default()
        };
        let q = quiesce(fake.clone(), &dev, &o, Default::default()).unwrap();
        assert!(q.crash_consistent() && !q.exclusive());
    }

    #[test]
    fn state_on_the_volume_is_refused_before_freezing() {
        let Some(dev) = block_device() else { return };
        let fake = Arc::new(Fake::default());
        *fake.mounts.lock().unwrap() = vec![mnt(20, "/", "/mnt/data", "rw")];
        let o = Options {
            mode: Mode::Freeze,
            keep_off: vec!["/mnt/data/chains/x.chain".into()],
            ..Default::default()
        };
        let err = quiesce(fake.clone(), &dev, &o, Default::default()).unwrap_err();
        assert!(matches!(err, QuiesceError::OnSnapshottedFilesystem { .. }));
        assert!(
            fake.log.lock().unwrap().is_empty(),
            "must refuse before freezing"
        );
    }
}
