//! Writing a snapshot's image to a file or a block device.
//!
//! The plan from [`Chain::resolve`] names, for every block, the one place its
//! bytes are stored; restore reads each stored run once, checks every block's
//! crc32 on the way, and writes each target block once, in block order. Zero
//! runs become holes in files and zeroed ranges on devices.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use uuid::Uuid;

use super::read::{BlockReader, ReadError};
use super::{Chain, ChainError, Origin, Plan};
use crate::device::Identity;
use crate::sys;
use crate::util::WriteBehind;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("cannot open restore target {path}")]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restore target {path} is mounted or in use; unmount it first")]
    TargetBusy { path: PathBuf },
    #[error("restore target {path} holds {size} bytes but snapshot {id} needs {needed}; use a device at least that large")]
    TargetTooSmall {
        path: PathBuf,
        id: Uuid,
        size: u64,
        needed: u64,
    },
    #[error("restore target {path} is the chain file itself")]
    TargetIsChain { path: PathBuf },
    #[error("restore target {path} is the device this snapshot was taken from; pass --force to overwrite it (it must not be mounted)")]
    TargetIsSource { path: PathBuf },
    #[error("restore target {path} is neither a block device nor a regular file")]
    TargetKind { path: PathBuf },
    #[error("cannot write restore target {path} at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the snapshot; the target is incomplete")]
    Read(#[source] ReadError),
}

/// Options of a restore.
#[derive(Debug, Default)]
pub struct RestoreOptions {
    /// Allow the target to be the device the snapshot was taken from.
    pub force: bool,
    /// Bytes of the image written so far, for progress reporting.
    pub progress: Option<std::sync::Arc<AtomicU64>>,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOutcome {
    pub image_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

enum TargetKind {
    /// A file we created: zero runs are already holes.
    NewFile,
    /// An existing file: zero runs are punched.
    File,
    /// A block device: zero runs are BLKZEROOUT.
    Device,
}

/// Restore snapshot `id` of `chain` to `target`.
pub fn restore(
    chain: &Chain,
    id: Uuid,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, RestoreError> {
    let plan = chain.resolve_intact(id)?;
    let (file, kind) = open_target(chain, &plan, target, opts)?;
    write_image(chain, &plan, &file, kind, target, opts)
}

fn open_target(
    chain: &Chain,
    plan: &Plan,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<(File, TargetKind), RestoreError> {
    let terr = |source| RestoreError::Target {
        path: target.to_path_buf(),
        source,
    };
    let needed = plan.device_size();
    match std::fs::metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Owner-only, as the device it comes from usually is.
            let file = crate::util::private_options()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(target)
                .map_err(terr)?;
            file.set_len(needed).map_err(terr)?;
            Ok((file, TargetKind::NewFile))
        }
        Err(e) => Err(terr(e)),
        Ok(md) => {
            let identity = Identity::of_metadata(&md);
            let chain_md = chain.file().metadata().map_err(terr)?;
            if identity == Identity::of_metadata(&chain_md) {
                return Err(RestoreError::TargetIsChain {
                    path: target.to_path_buf(),
                });
            }
            let src = plan.snapshot.source;
            let same_source = match identity {
                Identity::Block { rdev } => src.kind == 1 && src.a == rdev,
                Identity::File { dev, ino } => src.kind == 2 && src.a == dev && src.b == ino,
            };
            if same_source && !opts.force {
                return Err(RestoreError::TargetIsSource {
                    path: target.to_path_buf(),
                });
            }
            let ft = md.file_type();
            if ft.is_block_device() {
                // O_EXCL on a block device fails while it is mounted.
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
                    .open(target)
                    .map_err(|e| {
                        if e.raw_os_error() == Some(libc::EBUSY) {
                            RestoreError::TargetBusy {
                                path: target.to_path_buf(),
                            }
                        } else {
                            terr(e)
                        }
                    })?;
                let size = sys::block_device_size(file.as_fd()).map_err(terr)?;
                if size < needed {
                    return Err(RestoreError::TargetTooSmall {
                        path: target.to_path_buf(),
                        id: plan.snapshot.id,
                        size,
                        needed,
                    });
                }
                Ok((file, TargetKind::Device))
            } else if ft.is_file() {
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(target)
                    .map_err(terr)?;
                file.set_len(needed).map_err(terr)?;
                Ok((file, TargetKind::File))
            } else {
                Err(RestoreError::TargetKind {
                    path: target.to_path_buf(),
                })
            }
        }
    }
}

/// Reads are batched into buffers of up to this many bytes.
const BATCH: u64 = 8 << 20;

/// A filled buffer on its way to the writer.
struct Batch {
    buf: Vec<u8>,
    /// (target offset, length, offset in buf) pieces.
    pieces: Vec<(u64, u64, usize)>,
}

fn write_image(
    chain: &Chain,
    plan: &Plan,
    file: &File,
    kind: TargetKind,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, RestoreError> {
    let bs = plan.block_size as u64;
    let size = plan.device_size();
    let mut out = RestoreOutcome {
        image_bytes: size,
        ..Default::default()
    };
    let wfd = file.as_fd();
    let werr = |offset: u64| {
        move |source| RestoreError::Write {
            path: target.to_path_buf(),
            offset,
            source,
        }
    };
    // Zero runs first: they need no reads and on a device they are cheap.
    for r in &plan.runs {
        if r.source != Origin::Zero {
            continue;
        }
        let off = r.block * bs;
        let len = (r.count * bs).min(size - off);
        out.zero_bytes += len;
        match kind {
            TargetKind::NewFile => {}
            TargetKind::File => sys::punch_hole(wfd, off, len).map_err(werr(off))?,
            TargetKind::Device => zero_device(file, off, len).map_err(werr(off))?,
        }
    }

    // Data runs: a reader (this thread) fills buffers and checks crcs, a
    // writer thread writes them; two buffers in flight overlap the two.
    let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        empty_tx.send(Vec::with_capacity(BATCH as usize)).unwrap();
    }
    let progress = opts.progress.clone();
    let zero_bytes = out.zero_bytes;
    let result = std::thread::scope(|s| -> Result<u64, RestoreError> {
        let writer = s.spawn(move || -> Result<(), RestoreError> {
            let mut written: u64 = 0;
            // Pieces arrive in block order, so the target is written front to back.
            let mut behind = WriteBehind::new(0);
            for batch in full_rx {
                for &(toff, len, boff) in &batch.pieces {
                    sys::pwrite_full(wfd, &batch.buf[boff..boff + len as usize], toff)
                        .map_err(werr(toff))?;
                    written += len;
                    behind.wrote(wfd, toff + len);
                    if let Some(p) = &progress {
                        p.store(zero_bytes + written, Ordering::Relaxed);
                    }
                }
                #[cfg(test)]
                test_hooks::slow_writer();
                // The reader may be done and gone; every queued batch must
                // still be written, so a failed hand-back is not a reason to stop.
                let _ = empty_tx.send(batch.buf);
            }
            Ok(())
        });
        let read = read_batches(chain, plan, full_tx, empty_rx);
        let wrote = writer.join().expect("restore writer panicked");
        let data = read?;
        wrote?;
        Ok(data)
    });
    out.data_bytes = result?;
    file.sync_all().map_err(werr(0))?;
    let _ = sys::drop_cache(wfd, 0, size);
    Ok(out)
}

fn read_batches(
    chain: &Chain,
    plan: &Plan,
    full_tx: mpsc::SyncSender<Batch>,
    empty_rx: mpsc::Receiver<Vec<u8>>,
) -> Result<u64, RestoreError> {
    let bs = plan.block_size as u64;
    let reader = BlockReader::new(chain, plan);
    let all = reader.pieces(BATCH / bs);
    let mut total = 0u64;
    let mut next = 0;
    while next < all.len() {
        let Ok(mut buf) = empty_rx.recv() else {
            break;
        };
        buf.clear();
        // Take pieces while they fit; the reader checks every block before
        // any of it goes anywhere.
        let first = next;
        let mut used = 0u64;
        while next < all.len() && used + reader.len(&all[next]) <= BATCH {
            used += reader.len(&all[next]);
            next += 1;
        }
        let batch = &all[first..next];
        reader.read(&mut buf, batch).map_err(RestoreError::Read)?;
        let mut pieces_out = Vec::with_capacity(batch.len());
        let mut boff = 0usize;
        for p in batch {
            let len = reader.len(p);
            pieces_out.push((p.block * bs, len, boff));
            boff += len as usize;
        }
        total += used;
        if full_tx
            .send(Batch {
                buf,
                pieces: pieces_out,
            })
            .is_err()
        {
            break;
        }
    }
    Ok(total)
}

/// Zero a range of a block device: BLKZEROOUT for whole sectors, plain
/// writes for an unaligned tail.
fn zero_device(file: &File, off: u64, len: u64) -> io::Result<()> {
    let fd = file.as_fd();
    let aligned = len & !511;
    if aligned > 0 {
        if let Err(e) = sys::zero_out(fd, off, aligned) {
            // Some devices refuse BLKZEROOUT; write zeros instead.
            tracing::debug!("BLKZEROOUT failed ({e}); writing zeros");
            write_zeros(fd, off, aligned)?;
        }
    }
    if len > aligned {
        write_zeros(fd, off + aligned, len - aligned)?;
    }
    Ok(())
}

fn write_zeros(fd: std::os::fd::BorrowedFd<'_>, mut off: u64, mut len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    while len > 0 {
        let n = len.min(zeros.len() as u64);
        sys::pwrite_full(fd, &zeros[..n as usize], off)?;
        off += n;
        len -= n;
    }
    Ok(())
}
#[cfg(test)]
mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};
    /// Milliseconds the writer sleeps after each batch (tests only).
    pub static WRITER_DELAY_MS: AtomicU64 = AtomicU64::new(0);
    pub fn slow_writer() {
        let ms = WRITER_DELAY_MS.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::take::{take, TakeOptions};

    /// A writer slower than the reader: the reader finishes first and drops
    /// its end of the buffer channel; the last batches must still be written.
    #[test]
    fn a_slow_writer_still_writes_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let data: Vec<u8> = (0..(40u64 << 20) / 8)
            .flat_map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).to_le_bytes())
            .collect();
        std::fs::write(&img, &data).unwrap();
        let chain_path = dir.path().join("c");
        let out = take(
            std::sync::Arc::new(crate::quiesce::Host),
            &img,
            &chain_path,
            &TakeOptions::default(),
        )
        .unwrap();
        test_hooks::WRITER_DELAY_MS.store(50, std::sync::atomic::Ordering::Relaxed);
        let chain = Chain::open(&chain_path, super::super::Access::Read).unwrap();
        let target = dir.path().join("out");
        let r = restore(&chain, out.snapshot.id, &target, &RestoreOptions::default());
        test_hooks::WRITER_DELAY_MS.store(0, std::sync::atomic::Ordering::Relaxed);
        r.unwrap();
        assert!(
            std::fs::read(&target).unwrap() == data,
            "restored image differs"
        );
    }
}
