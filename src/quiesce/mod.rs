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

mod guard;
mod host;
pub mod intent;
pub mod mountinfo;
mod plan;

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use guard::Quiesced;
use guard::{FreezeGuard, Held, UnmountGuard};
pub use host::Host;
pub use mountinfo::Mount;
use plan::rebuild_partial;
pub use plan::{mount_flags, remount_plan, unmount_order, MountOp};

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
            max_freeze: crate::defaults::MAX_FREEZE,
            intent_dir: None,
            keep_off: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    /// A fake system: mounts in memory, a set of busy mount points, a log of calls.
    #[derive(Default)]
    struct Fake {
        mounts: Mutex<Vec<Mount>>,
        busy: HashSet<PathBuf>,
        frozen: Mutex<HashSet<PathBuf>>,
        fail_mount: bool,
        log: Mutex<Vec<String>>,
    }

    pub(super) fn mnt(id: u32, root: &str, mp: &str, opts: &str) -> Mount {
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
