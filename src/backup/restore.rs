//! Writing a backup's image to a file or block device, on any host.
//!
//! The manifests of the backup and its ancestors name, for every block, the
//! one object and offset its bytes are in. Each needed object is downloaded
//! once (several at a time), authenticated (or checked against its content
//! hash) and every block taken from it is checked against its checksum
//! before it is written; each target block is written once. Zero blocks are
//! holes in a new file, punched in an existing one, zeroed on a device.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use serde::Serialize;
use uuid::Uuid;

use super::manifest::{Manifest, Overlay, Src};
use super::{cancelled, crypto, lock, BackupError, Progress, Remote};
use crate::sys;

/// Options of a restore.
#[derive(Debug, Default, Clone)]
pub struct RestoreOptions {
    pub progress: Option<Arc<Progress>>,
    pub cancel: Option<Arc<AtomicBool>>,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RestoreOutcome {
    pub backup_id: Uuid,
    pub image_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub objects: u64,
    /// Bytes downloaded.
    pub fetched_bytes: u64,
}

#[derive(PartialEq, Eq)]
enum Kind {
    NewFile,
    File,
    Device,
}

/// Restore backup `id` (or a unique prefix of it) of `volume` to `target`.
pub fn restore(
    remote: &Remote,
    volume: &str,
    id: &str,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, BackupError> {
    super::check_volume(volume)?;
    let _reader = lock::shared(remote.store(), volume, "restore")?;
    let all = remote.backups(volume)?;
    let (seq, id) = remote.find(volume, id)?;
    let lineage = remote.lineage(volume, &all, seq, id)?;
    let top = &lineage[0];
    let refs: Vec<&Manifest> = lineage.iter().collect();
    let overlay = Overlay::build(&refs, top.nblocks());
    if overlay.missing > 0 {
        return Err(BackupError::Incomplete {
            remote: remote.name.clone(),
            volume: volume.to_string(),
            id,
            blocks: overlay.missing,
        });
    }
    let (file, kind) = open_target(target, top.device_size)?;
    write_image(remote, volume, top, &overlay, &file, kind, target, opts)
}

fn open_target(target: &Path, needed: u64) -> Result<(File, Kind), BackupError> {
    let terr = |source| BackupError::Target {
        path: target.to_path_buf(),
        source,
    };
    match std::fs::metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Owner-only, as every file blocksnap creates.
            let file = crate::util::private_options()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(target)
                .map_err(terr)?;
            file.set_len(needed).map_err(terr)?;
            Ok((file, Kind::NewFile))
        }
        Err(e) => Err(terr(e)),
        Ok(md) => {
            let ft = md.file_type();
            if ft.is_block_device() {
                // O_EXCL on a block device fails while it is mounted.
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
                    .open(target)
                    .map_err(|e| {
                        if e.raw_os_error() == Some(libc::EBUSY) {
                            BackupError::TargetBusy {
                                path: target.to_path_buf(),
                            }
                        } else {
                            terr(e)
                        }
                    })?;
                let size = sys::block_device_size(file.as_fd()).map_err(terr)?;
                if size < needed {
                    return Err(BackupError::TargetTooSmall {
                        path: target.to_path_buf(),
                        size,
                        needed,
                    });
                }
                Ok((file, Kind::Device))
            } else if ft.is_file() {
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(target)
                    .map_err(terr)?;
                file.set_len(needed).map_err(terr)?;
                Ok((file, Kind::File))
            } else {
                Err(BackupError::TargetKind {
                    path: target.to_path_buf(),
                })
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_image(
    remote: &Remote,
    volume: &str,
    top: &Manifest,
    overlay: &Overlay,
    file: &File,
    kind: Kind,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, BackupError> {
    let bs = top.block_size as u64;
    let size = top.device_size;
    let fd = file.as_fd();
    let werr = |offset: u64| {
        move |source| BackupError::Write {
            path: target.to_path_buf(),
            offset,
            source,
        }
    };
    let progress = opts.progress.clone().unwrap_or_default();
    progress.total.store(size, Ordering::Relaxed);
    let mut out = RestoreOutcome {
        backup_id: top.id,
        image_bytes: size,
        ..Default::default()
    };
    // Zero runs: nothing to fetch.
    for r in &overlay.runs {
        if r.src != Src::Zero {
            continue;
        }
        let off = r.block * bs;
        let len = (r.count * bs).min(size - off);
        out.zero_bytes += len;
        match kind {
            Kind::NewFile => {}
            Kind::File => sys::punch_hole(fd, off, len).map_err(werr(off))?,
            Kind::Device => zero_device(file, off, len).map_err(werr(off))?,
        }
        progress.done.fetch_add(len, Ordering::Relaxed);
    }

    // Data runs, grouped by object, objects in the order of their first block.
    let mut by_object: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut order: Vec<u32> = Vec::new();
    for (i, r) in overlay.runs.iter().enumerate() {
        if let Src::Data { object, .. } = r.src {
            by_object
                .entry(object)
                .or_insert_with(|| {
                    order.push(object);
                    Vec::new()
                })
                .push(i);
        }
    }
    out.objects = order.len() as u64;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let threads = remote.tuning.concurrency.max(1);
    let (tx, rx) = mpsc::sync_channel::<Result<(u32, Vec<u8>), BackupError>>(threads);
    let result = std::thread::scope(|s| -> Result<(), BackupError> {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, stop, order) = (&next, &stop, &order);
            s.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&obj) = order.get(i) else { break };
                let r = remote
                    .fetch_object(volume, &overlay.objects[obj as usize])
                    .map(|b| (obj, b));
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            });
        }
        drop(tx);
        let r = (|| {
            for got in rx.iter() {
                if cancelled(&opts.cancel) {
                    return Err(BackupError::Cancelled);
                }
                let (obj, plain) = got?;
                let o = &overlay.objects[obj as usize];
                progress
                    .transferred
                    .fetch_add(o.stored_len, Ordering::Relaxed);
                out.fetched_bytes += o.stored_len;
                let key = if o.encrypted { remote.key() } else { None };
                for &ri in &by_object[&obj] {
                    let r = overlay.runs[ri];
                    let Src::Data { offset, sum, .. } = r.src else {
                        continue;
                    };
                    let off = r.block * bs;
                    let len = (r.count * bs).min(size - off);
                    let bytes = &plain[offset as usize..(offset + len) as usize];
                    for (i, block) in bytes.chunks(bs as usize).enumerate() {
                        if crypto::block_sum(key, block) != overlay.sums[sum + i] {
                            return Err(BackupError::BlockCorrupt {
                                remote: remote.name.clone(),
                                id: top.id,
                                block: r.block + i as u64,
                                key: o.key(volume),
                            });
                        }
                    }
                    sys::pwrite_full(fd, bytes, off).map_err(werr(off))?;
                    out.data_bytes += len;
                    progress.done.fetch_add(len, Ordering::Relaxed);
                }
            }
            Ok(())
        })();
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
            // Take what downloaders still hand over until they all stop.
            for _ in rx.iter() {}
        }
        r
    });
    result?;
    file.sync_all().map_err(werr(0))?;
    let _ = sys::drop_cache(fd, 0, size);
    Ok(out)
}

/// Zero a range of a block device: BLKZEROOUT for whole sectors, plain
/// writes for an unaligned tail or where the device refuses it.
fn zero_device(file: &File, off: u64, len: u64) -> io::Result<()> {
    let fd = file.as_fd();
    let aligned = len & !511;
    if aligned > 0 && sys::zero_out(fd, off, aligned).is_err() {
        write_zeros(fd, off, aligned)?;
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
