//! Guards that hold a volume consistent and undo it on every way out.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{intent, Frozen, MountOp, Options, QuiesceError, System};

struct FreezeState {
    frozen: Option<Frozen>,
    marker: Option<intent::Marker>,
    expired: bool,
    thaw_error: Option<io::Error>,
}

pub(super) struct FreezeGuard {
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
    pub(super) fn start(
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
        crate::fault::point(crate::fault::Point::BeforeFreeze);
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

pub(super) struct UnmountGuard {
    pub(super) sys: Arc<dyn System>,
    pub(super) device: PathBuf,
    pub(super) plan: Vec<MountOp>,
    pub(super) done: bool,
}

impl UnmountGuard {
    pub(super) fn restore(&mut self) -> Result<(), QuiesceError> {
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

pub(super) enum Held {
    Nothing,
    Frozen(FreezeGuard),
    Unmounted(UnmountGuard),
}

/// A volume held consistent. Call [`Quiesced::finish`] after the scan; if it
/// is dropped instead (error, panic), it thaws or remounts anyway.
pub struct Quiesced {
    pub(super) held: Held,
    pub(super) exclusive: bool,
    pub(super) crash_consistent: bool,
    pub(super) description: String,
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
