//! The real system: mount-table changes, freezes and thaws on this host.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{mountinfo, Frozen, Mount, MountOp, System};

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
