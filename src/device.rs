//! Opening a snapshot source (a block device or a regular image file) and
//! reading it through a read-only memory map without ever dying of SIGBUS.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

use crate::sigbus;
use crate::sys;

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is in use (mounted or opened exclusively by someone else); unmount it or choose a quiesce mode that freezes or unmounts it")]
    Busy { path: PathBuf },
    #[error("{path} is neither a block device nor a regular file")]
    NotADevice { path: PathBuf },
    #[error("cannot read the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is empty; there is nothing to snapshot")]
    Empty { path: PathBuf },
    #[error("cannot invalidate the page cache of {path} (BLKFLSBUF needs CAP_SYS_ADMIN)")]
    Invalidate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot map {path} into memory")]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read error on {path} at byte offset {offset}; the device may be failing, check the kernel log (dmesg)")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// What kind of thing a source is, and its identity (to recognise it again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A block device, by its device number.
    Block { rdev: u64 },
    /// A regular file, by filesystem device and inode.
    File { dev: u64, ino: u64 },
}

impl Identity {
    /// The identity of whatever is at `path` (following symlinks).
    pub fn of_path(path: &Path) -> io::Result<Identity> {
        let md = std::fs::metadata(path)?;
        Ok(Identity::of_metadata(&md))
    }

    pub fn of_metadata(md: &std::fs::Metadata) -> Identity {
        if md.file_type().is_block_device() {
            Identity::Block { rdev: md.rdev() }
        } else {
            Identity::File {
                dev: md.dev(),
                ino: md.ino(),
            }
        }
    }

    pub fn is_block(&self) -> bool {
        matches!(self, Identity::Block { .. })
    }
}

/// An open snapshot source.
#[derive(Debug)]
pub struct Device {
    path: PathBuf,
    file: File,
    size: u64,
    identity: Identity,
}

impl Device {
    /// Open `path` read-only. With `exclusive`, a block device is opened with
    /// `O_EXCL`, which fails while it is mounted and, while held, makes any
    /// mount of it fail.
    pub fn open(path: &Path, exclusive: bool) -> Result<Device, DeviceError> {
        let md = std::fs::metadata(path).map_err(|source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let ft = md.file_type();
        if !ft.is_block_device() && !ft.is_file() {
            return Err(DeviceError::NotADevice {
                path: path.to_path_buf(),
            });
        }
        let mut opts = OpenOptions::new();
        opts.read(true);
        let mut flags = libc::O_CLOEXEC;
        if exclusive && ft.is_block_device() {
            flags |= libc::O_EXCL;
        }
        opts.custom_flags(flags);
        let file = opts.open(path).map_err(|e| open_error(path, e))?;
        Device::from_file(path, file)
    }

    /// Open a block device or file for reading and writing (a revert), with
    /// `O_EXCL` on a block device so it cannot be mounted meanwhile.
    pub fn open_rw(path: &Path) -> Result<Device, DeviceError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
            .open(path)
            .map_err(|e| open_error(path, e))?;
        let md = file.metadata().map_err(|source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if !md.file_type().is_block_device() && !md.file_type().is_file() {
            return Err(DeviceError::NotADevice {
                path: path.to_path_buf(),
            });
        }
        Device::from_file(path, file)
    }

    /// Size and identity of an opened source.
    fn from_file(path: &Path, file: File) -> Result<Device, DeviceError> {
        let md = file.metadata().map_err(|source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let identity = Identity::of_metadata(&md);
        let size = if identity.is_block() {
            sys::block_device_size(file.as_fd()).map_err(|source| DeviceError::Size {
                path: path.to_path_buf(),
                source,
            })?
        } else {
            md.len()
        };
        Ok(Device {
            path: path.to_path_buf(),
            file,
            size,
            identity,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Make the next read see every write that reached the device, including
    /// writes a mounted filesystem made around the block device's page cache.
    /// Must be called with no mapping of the device alive (the kernel skips
    /// mapped pages). A no-op for regular files, whose page cache is coherent.
    pub fn invalidate_cache(&self) -> Result<(), DeviceError> {
        if self.identity.is_block() {
            sys::flush_block_buffers(self.file.as_fd()).map_err(|source| {
                DeviceError::Invalidate {
                    path: self.path.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Map the whole source read-only. The mapping takes its length from the
    /// size read at open (a block device's metadata length is 0).
    pub fn map(&self) -> Result<DeviceMap<'_>, DeviceError> {
        if self.size == 0 {
            return Err(DeviceError::Empty {
                path: self.path.clone(),
            });
        }
        let len = usize::try_from(self.size).map_err(|_| DeviceError::Map {
            path: self.path.clone(),
            source: io::Error::other("device larger than the address space"),
        })?;
        // SAFETY: the mapping is read-only and shared. Its contents can change
        // under us if someone writes the device; we only ever copy or hash the
        // bytes, never rely on them being stable across reads, and any data we
        // store is re-hashed from a private copy. Accesses that would fault
        // with SIGBUS are caught by the registered handler (see sigbus.rs).
        let mmap = unsafe { MmapOptions::new().len(len).map(&self.file) }.map_err(|source| {
            DeviceError::Map {
                path: self.path.clone(),
                source,
            }
        })?;
        let _ = mmap.advise(Advice::Sequential);
        let registration = sigbus::Registration::new(mmap.as_ptr(), len);
        Ok(DeviceMap {
            source: self,
            mmap,
            registration,
        })
    }
}

/// EBUSY on open means mounted or held exclusively by someone else.
fn open_error(path: &Path, source: io::Error) -> DeviceError {
    if source.raw_os_error() == Some(libc::EBUSY) {
        DeviceError::Busy {
            path: path.to_path_buf(),
        }
    } else {
        DeviceError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A read-only mapping of a whole source.
#[derive(Debug)]
pub struct DeviceMap<'a> {
    source: &'a Device,
    // Field order matters: the registration is dropped before the mapping.
    registration: sigbus::Registration,
    mmap: Mmap,
}

impl DeviceMap<'_> {
    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// Fault in `[offset, offset+len)` so that reading it cannot raise SIGBUS.
    /// On an I/O error, find the first failing sector with `pread` and report it.
    pub fn populate(&self, offset: u64, len: usize) -> Result<(), DeviceError> {
        match self
            .mmap
            .advise_range(Advice::PopulateRead, offset as usize, len)
        {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Kernel older than 5.14: fall back to touching through pread,
                // which reports errors instead of signalling.
                self.probe(offset, len)
            }
            Err(e) => Err(self.locate_error(offset, len, e)),
        }
    }

    fn probe(&self, offset: u64, len: usize) -> Result<(), DeviceError> {
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            match sys::pread_full(self.source.file.as_fd(), &mut buf[..n], pos) {
                Ok(got) if got == n => pos += n as u64,
                Ok(_) => {
                    return Err(DeviceError::Read {
                        path: self.source.path.clone(),
                        offset: pos,
                        source: io::Error::from(io::ErrorKind::UnexpectedEof),
                    })
                }
                Err(e) => return Err(self.locate_error(pos, n, e)),
            }
        }
        Ok(())
    }

    /// Narrow an error in `[offset, offset+len)` down to the first 512-byte
    /// sector that fails to read.
    fn locate_error(&self, offset: u64, len: usize, original: io::Error) -> DeviceError {
        let fd = self.source.file.as_fd();
        let mut sector = [0u8; 512];
        let mut pos = offset;
        let end = offset + len as u64;
        // Step through in 64 KiB pieces first, then sectors inside the failing piece.
        let mut piece = vec![0u8; 64 << 10];
        while pos < end {
            let n = ((end - pos) as usize).min(piece.len());
            match sys::pread_full(fd, &mut piece[..n], pos) {
                Ok(got) if got == n => {
                    pos += n as u64;
                    continue;
                }
                Ok(got) => {
                    return DeviceError::Read {
                        path: self.source.path.clone(),
                        offset: pos + got as u64,
                        source: io::Error::from(io::ErrorKind::UnexpectedEof),
                    }
                }
                Err(_) => {
                    let piece_end = pos + n as u64;
                    while pos < piece_end {
                        let m = ((piece_end - pos) as usize).min(512);
                        if let Err(e) = sys::pread_full(fd, &mut sector[..m], pos) {
                            return DeviceError::Read {
                                path: self.source.path.clone(),
                                offset: pos,
                                source: e,
                            };
                        }
                        pos += m as u64;
                    }
                }
            }
        }
        // pread could read everything: report the window with the prefault's error.
        DeviceError::Read {
            path: self.source.path.clone(),
            offset,
            source: original,
        }
    }

    /// The bytes of `[offset, offset+len)`. Call [`populate`] first and
    /// [`check`] after using them.
    ///
    /// [`populate`]: DeviceMap::populate
    /// [`check`]: DeviceMap::check
    pub fn bytes(&self, offset: u64, len: usize) -> &[u8] {
        &self.mmap[offset as usize..offset as usize + len]
    }

    /// Fail if any access since the last check raised SIGBUS (and read zeros).
    pub fn check(&self) -> Result<(), DeviceError> {
        match self.registration.take_fault() {
            None => Ok(()),
            Some(offset) => Err(DeviceError::Read {
                path: self.source.path.clone(),
                offset: offset & !511,
                source: io::Error::from_raw_os_error(libc::EIO),
            }),
        }
    }

    /// Drop `[offset, offset+len)` from this mapping and from the page cache,
    /// so a scan does not evict the host's working set.
    pub fn release(&self, offset: u64, len: usize) {
        // SAFETY: MADV_DONTNEED on a shared, read-only file mapping only drops
        // our page table entries; later reads fault the data in again from the
        // file. No reference into this range is held across this call.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset as usize, len)
        };
        let _ = sys::drop_cache(self.source.file.as_fd(), offset, len as u64);
    }
}

/// The one windowed scan of a device, used by takes and reverts: a
/// prefetcher thread faults in the next window (`MADV_POPULATE_READ`, so a
/// read error is an error, not a SIGBUS) while `each` works on the current
/// one; each window is released (unmapped and dropped from the page cache)
/// once `each` is done with it, so at most two windows are resident.
/// `each(offset, len)` reads through `map.bytes` and calls `map.check` before
/// trusting them. Returns `Ok(false)` if `stop` ended the scan early.
pub fn scan_windows<E: From<DeviceError>>(
    map: &DeviceMap<'_>,
    size: u64,
    window: u64,
    stop: &(dyn Fn() -> bool + Sync),
    mut each: impl FnMut(u64, usize) -> Result<(), E>,
) -> Result<bool, E> {
    let window = window.max(4096);
    let nwin = size.div_ceil(window);
    std::thread::scope(|s| -> Result<bool, E> {
        // A rendezvous channel: one window prefaulted while one is used.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<u64, DeviceError>>(0);
        s.spawn(move || {
            for w in 0..nwin {
                if stop() {
                    break;
                }
                let off = w * window;
                let len = window.min(size - off) as usize;
                let r = map.populate(off, len);
                let failed = r.is_err();
                if tx.send(r.map(|()| off)).is_err() || failed {
                    break;
                }
            }
        });
        let mut done = 0;
        for msg in rx.iter() {
            let off = msg?;
            if stop() {
                return Ok(false);
            }
            let len = window.min(size - off) as usize;
            each(off, len)?;
            map.check()?;
            map.release(off, len);
            done += 1;
        }
        Ok(done == nwin)
    })
}

/// Reads of chosen ranges straight from the device (`O_DIRECT`), bypassing
/// the block device's page cache, which a mounted filesystem does not keep
/// coherent: what is read is what the device holds now. Where `O_DIRECT` is
/// refused (some filesystems holding image files), reads are buffered, after
/// dropping the range from the page cache.
#[derive(Debug)]
pub struct DirectReader {
    path: PathBuf,
    file: File,
    direct: bool,
    buf: Vec<u8>,
    cap: usize,
}

const DIRECT_ALIGN: usize = 4096;

impl DirectReader {
    /// Open `path` for reads of up to `cap` bytes (a multiple of 4096).
    pub fn open(path: &Path, cap: usize) -> Result<DirectReader, DeviceError> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open(0).map_err(|e| open_error(path, e))?, false)
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let cap = cap.div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
        Ok(DirectReader {
            path: path.to_path_buf(),
            file,
            direct,
            buf: vec![0u8; cap + DIRECT_ALIGN],
            cap,
        })
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The `len` bytes at `offset` (a multiple of 4096; `len` at most the
    /// capacity). Fewer bytes come back only at the end of the device.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<&[u8], DeviceError> {
        let len = len.min(self.cap);
        let skew = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        let want = if self.direct {
            len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
        } else {
            let _ = sys::drop_cache(self.file.as_fd(), offset, len as u64);
            len
        };
        let buf = &mut self.buf[skew..skew + want];
        let got = sys::pread_full(self.file.as_fd(), buf, offset).map_err(|source| {
            DeviceError::Read {
                path: self.path.clone(),
                offset,
                source,
            }
        })?;
        Ok(&self.buf[skew..skew + got.min(len)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_and_reads_a_regular_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let src = Device::open(f.path(), false).unwrap();
        assert_eq!(src.size(), 20000);
        assert!(!src.identity().is_block());
        let map = src.map().unwrap();
        map.populate(0, 20000).unwrap();
        assert_eq!(map.bytes(0, 20000), &data[..]);
        map.check().unwrap();
        map.release(0, 20000);
        // Still readable after release (faults back in).
        assert_eq!(map.bytes(4096, 10), &data[4096..4106]);
    }

    #[test]
    fn direct_reads_and_windowed_scans_see_the_file() {
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 5000u32).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let mut r = DirectReader::open(f.path(), 1 << 20).unwrap();
        assert_eq!(r.read(8192, 4096).unwrap(), &data[8192..12288]);
        // The end of the file comes back short.
        let end = data.len() as u64 / 4096 * 4096;
        assert_eq!(r.read(end, 8192).unwrap(), &data[end as usize..]);
        let src = Device::open(f.path(), false).unwrap();
        let map = src.map().unwrap();
        let mut seen = Vec::new();
        let done = scan_windows::<DeviceError>(&map, src.size(), 1 << 20, &|| false, |off, len| {
            seen.extend_from_slice(map.bytes(off, len));
            Ok(())
        })
        .unwrap();
        assert!(done);
        assert!(seen == data);
        let stopped =
            scan_windows::<DeviceError>(&map, src.size(), 1 << 20, &|| true, |_, _| Ok(()))
                .unwrap();
        assert!(!stopped);
    }

    #[test]
    fn empty_source_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let src = Device::open(f.path(), false).unwrap();
        assert!(matches!(src.map(), Err(DeviceError::Empty { .. })));
    }

    #[test]
    fn missing_source_names_the_path() {
        let err = Device::open(Path::new("/nonexistent/blocksnap-dev"), false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/blocksnap-dev"));
    }

    /// A file truncated after it was opened: the mapping now extends past the
    /// end of the file, and touching those pages would raise SIGBUS. The
    /// prefault must report the offset instead, and a direct access must be
    /// caught by the handler rather than kill the test process.
    #[test]
    fn read_past_end_is_an_error_not_a_signal() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 64 << 10]).unwrap();
        f.flush().unwrap();
        let src = Device::open(f.path(), false).unwrap();
        let map = src.map().unwrap();
        f.as_file().set_len(8192).unwrap();
        let err = map.populate(0, 64 << 10).unwrap_err();
        match err {
            DeviceError::Read { offset, .. } => assert_eq!(offset, 8192),
            other => panic!("unexpected error {other}"),
        }
        // Direct access to a page beyond EOF: the handler turns the SIGBUS into
        // zeros plus a recorded fault.
        let b = map.bytes(32 << 10, 16);
        assert_eq!(b, &[0u8; 16]);
        match map.check() {
            Err(DeviceError::Read { offset, .. }) => assert_eq!(offset, 32 << 10),
            other => panic!("expected a recorded fault, got {other:?}"),
        }
        map.check().unwrap();
    }
}
