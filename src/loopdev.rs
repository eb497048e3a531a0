//! Attaching image files as loop devices, so a volume made from a snapshot
//! is a real block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys::{self, LoopConfig};

/// An attached loop device. Not detached on drop: volumes outlive the
/// process; tests wrap it in their own guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub number: u32,
    pub path: PathBuf,
}

fn err_ctx(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Attach `backing` to a free loop device. Safe against other processes
/// attaching at the same time (a device taken under us is skipped).
pub fn attach(backing: &Path, read_only: bool) -> io::Result<LoopDevice> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .map_err(err_ctx(format!("cannot open {}", backing.display())))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(err_ctx("cannot open /dev/loop-control".into()))?;
    let canonical = std::fs::canonicalize(backing)?;
    let mut last_err = None;
    for _ in 0..64 {
        let n = sys::loop_ctl_get_free(ctl.as_fd())?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match open_node(&path) {
            Ok(d) => d,
            Err(e) => {
                last_err = Some(e);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut config = LoopConfig {
            fd: std::os::fd::AsRawFd::as_raw_fd(&file) as u32,
            ..Default::default()
        };
        if read_only {
            config.info.lo_flags |= sys::LO_FLAGS_READ_ONLY;
        }
        let name = canonical.as_os_str().as_encoded_bytes();
        let k = name.len().min(63);
        config.info.lo_file_name[..k].copy_from_slice(&name[..k]);
        match sys::loop_configure(dev.as_fd(), &config) {
            Ok(()) => return Ok(LoopDevice { number: n, path }),
            // Someone else attached it between GET_FREE and CONFIGURE.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(err_ctx(format!("cannot attach {}", path.display()))(e)),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free loop device")))
}

fn open_node(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Detach a loop device (the kernel finishes when its last user closes it).
pub fn detach(path: &Path) -> io::Result<()> {
    let dev = open_node(path)?;
    match sys::loop_clear(dev.as_fd()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Tell a loop device its backing file changed size (`LOOP_SET_CAPACITY`).
pub fn refresh_capacity(path: &Path) -> io::Result<()> {
    let dev = open_node(path)?;
    sys::loop_set_capacity(dev.as_fd())
}

/// The loop device currently backed by `backing`, if any.
pub fn find_by_backing(backing: &Path) -> Option<LoopDevice> {
    let want = std::fs::canonicalize(backing).ok()?;
    for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("loop")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim()) == want {
            return Some(LoopDevice {
                number: n,
                path: PathBuf::from(format!("/dev/loop{n}")),
            });
        }
    }
    None
}
