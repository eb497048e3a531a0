//! Every ioctl and raw system call blocksnap makes, in one place.
//!
//! Each function is a thin, safe wrapper: it takes a borrowed file descriptor
//! (so the descriptor is open for the whole call) and returns `io::Result`.
//! Nothing here has policy; callers decide what an error means.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

// Block device ioctls, from <linux/fs.h>.
nix::ioctl_read!(ioctl_blkgetsize64, 0x12, 114, u64);
nix::ioctl_none!(ioctl_blkflsbuf, 0x12, 97);
nix::ioctl_write_ptr_bad!(
    ioctl_blkzeroout,
    nix::request_code_none!(0x12, 127),
    [u64; 2]
);

// Filesystem freeze, from <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
nix::ioctl_readwrite!(ioctl_fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(ioctl_fithaw, b'X', 120, libc::c_int);

// Loop devices, from <linux/loop.h>. These predate the _IO encoding.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
nix::ioctl_none_bad!(ioctl_loop_clr_fd, LOOP_CLR_FD);
nix::ioctl_none_bad!(ioctl_loop_set_capacity, LOOP_SET_CAPACITY);
nix::ioctl_read_bad!(ioctl_loop_get_status64, LOOP_GET_STATUS64, LoopInfo64);
nix::ioctl_write_ptr_bad!(ioctl_loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_none_bad!(ioctl_loop_ctl_get_free, LOOP_CTL_GET_FREE);

/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` from <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: `fd` is a valid open descriptor for the duration of the call and
    // `size` is a live, properly aligned u64 the kernel writes exactly 8 bytes to.
    unsafe { ioctl_blkgetsize64(fd.as_raw_fd(), &mut size) }.map_err(errno)?;
    Ok(size)
}

/// Write back and invalidate the block device's page cache (`BLKFLSBUF`).
/// Pages still mapped by some process are skipped by the kernel, so callers
/// drop their mappings first. Needs CAP_SYS_ADMIN.
pub fn flush_block_buffers(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is a valid open descriptor; BLKFLSBUF takes no argument.
    unsafe { ioctl_blkflsbuf(fd.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

/// Zero `len` bytes at `offset` of a block device (`BLKZEROOUT`); both must be
/// multiples of the logical sector size.
pub fn zero_out(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: `fd` is valid; `range` is a live [u64; 2] the kernel only reads.
    unsafe { ioctl_blkzeroout(fd.as_raw_fd(), &range) }.map_err(errno)?;
    Ok(())
}

/// Freeze the filesystem whose mount point `fd` is open on (`FIFREEZE`).
/// `EBUSY` means it is already frozen, by someone else.
pub fn freeze(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: `fd` is a valid descriptor of a directory; the kernel ignores the
    // argument, which still points at a live c_int.
    unsafe { ioctl_fifreeze(fd.as_raw_fd(), &mut unused) }.map_err(errno)?;
    Ok(())
}

/// Thaw the filesystem whose mount point `fd` is open on (`FITHAW`).
/// `EINVAL` means it was not frozen.
pub fn thaw(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: as for `freeze`.
    unsafe { ioctl_fithaw(fd.as_raw_fd(), &mut unused) }.map_err(errno)?;
    Ok(())
}

/// Ask /dev/loop-control for a free loop device number.
pub fn loop_ctl_get_free(ctl: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: `ctl` is a valid descriptor of /dev/loop-control; the ioctl takes no argument.
    let n = unsafe { ioctl_loop_ctl_get_free(ctl.as_raw_fd()) }.map_err(errno)?;
    Ok(n as u32)
}

/// Attach a backing file to a loop device in one step (`LOOP_CONFIGURE`).
pub fn loop_configure(dev: BorrowedFd<'_>, config: &LoopConfig) -> io::Result<()> {
    // SAFETY: `dev` is a valid loop device descriptor and `config` points at a
    // fully initialised `struct loop_config` the kernel only reads.
    unsafe { ioctl_loop_configure(dev.as_raw_fd(), config) }.map_err(errno)?;
    Ok(())
}

/// Detach a loop device from its backing file (`LOOP_CLR_FD`).
pub fn loop_clear(dev: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `dev` is a valid loop device descriptor; the ioctl takes no argument.
    unsafe { ioctl_loop_clr_fd(dev.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

/// Re-read the size of a loop device's backing file (`LOOP_SET_CAPACITY`).
pub fn loop_set_capacity(dev: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `dev` is a valid loop device descriptor; the ioctl takes no argument.
    unsafe { ioctl_loop_set_capacity(dev.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

/// Status of a loop device (`LOOP_GET_STATUS64`); `ENXIO` if unattached.
pub fn loop_status(dev: BorrowedFd<'_>) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::default();
    // SAFETY: `dev` is valid and `info` is a live `struct loop_info64` the kernel writes.
    unsafe { ioctl_loop_get_status64(dev.as_raw_fd(), &mut info) }.map_err(errno)?;
    Ok(info)
}

/// Start write-back of a byte range without waiting, or (with `wait`) write it
/// back and wait for it, so the range can then be dropped from the page cache.
pub fn sync_range(fd: BorrowedFd<'_>, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: plain system call on a valid descriptor with integer arguments.
    let rc = unsafe { libc::sync_file_range(fd.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Tell the kernel a byte range of a file is not needed in the page cache.
pub fn drop_cache(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on a valid descriptor with integer arguments.
    let rc = unsafe {
        libc::posix_fadvise(
            fd.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Deallocate a byte range of a regular file, keeping its size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::FallocateFlags;
    nix::fcntl::fallocate(
        fd,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(errno)
}

/// Positioned read that retries on EINTR and short reads; returns the number
/// of bytes read (less than `buf.len()` only at end of file).
pub fn pread_full(fd: BorrowedFd<'_>, mut buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        match nix::sys::uio::pread(fd, buf, offset as i64) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                offset += n as u64;
                buf = &mut buf[n..];
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(total)
}

/// Positioned write of the whole buffer, retrying on EINTR and short writes.
pub fn pwrite_full(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::sys::uio::pwrite(fd, buf, offset as i64) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                offset += n as u64;
                buf = &buf[n..];
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

/// The kernel's boot id, to tell records of this boot from older ones.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether the process has CAP_SYS_ADMIN-level privileges (is root).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// This process's open-file limit (RLIMIT_NOFILE): `(soft, hard)`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Set this process's open-file limit (RLIMIT_NOFILE).
pub fn set_nofile_limit(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
