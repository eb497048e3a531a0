//! The seam between the daemon and the host: devices, mounts, loop devices,
//! freezing, and the chain engine's operations (take, delete, restore,
//! revert). The daemon only ever calls [`Engine`]; [`HostEngine`] does the
//! real work, and the simulator in [`super::sim`] stands in for it in tests
//! that run without root, in-process and fast.
//!
//! Every call blocks: the daemon makes them from its jobs and from the
//! blocking pool, never from an async worker.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::chain::format::TakeRecord;
use crate::chain::{self, Access, Chain, ChainError};
use crate::device::DeviceError;
use crate::quiesce;
use crate::revert::RevertError;
use crate::take::{Progress, TakeError, TakeOptions};

/// Everything a take needs, taken from the request (a job never reads its
/// inputs back from the catalog).
#[derive(Clone, Debug)]
pub struct TakeJob {
    pub volume: String,
    pub device: PathBuf,
    pub chain: PathBuf,
    pub snapshot_id: Uuid,
    pub name: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    pub block_size: Option<u32>,
    /// Store every block instead of an increment (asked for; the way on
    /// after the device shrank).
    pub full: bool,
    pub quiesce: quiesce::Options,
    /// Write tracking watches the volume between takes (`track_writes`).
    pub tracked: bool,
    /// Every this many snapshots, a full diff checks tracking (0: never).
    pub verify_every: u32,
}

/// Everything a backup needs, taken from the request.
#[derive(Clone, Debug)]
pub struct BackupJob {
    /// The volume (its name on the remote).
    pub volume: String,
    pub chain: PathBuf,
    pub snapshot: Uuid,
    /// The new backup's id (the same when an interrupted one is resumed).
    pub backup: Uuid,
    pub remote: crate::config::RemoteConfig,
    pub incremental: bool,
    pub name: String,
    pub description: String,
}

/// What a take did.
#[derive(Clone, Debug, PartialEq)]
pub struct Taken {
    pub device_size: u64,
    pub changed_bytes: u64,
    pub stored_bytes: u64,
    pub freeze: Duration,
    pub duration: Duration,
    /// How the volume was quiesced, for the log.
    pub quiesce: String,
    /// How it was taken (tracked or a full scan, rounds, ...).
    pub record: TakeRecord,
}

/// A live snapshot as its chain file holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainSnapshot {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    pub created_us: i64,
    pub device_size: u64,
    pub changed_bytes: u64,
    pub stored_bytes: u64,
    pub freeze_us: u64,
}

/// What a delete did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    pub merged_blocks: u64,
    pub reclaimed_bytes: u64,
}

/// What a revert did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverted {
    pub blocks_checked: u64,
    pub blocks_written: u64,
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Take(#[from] TakeError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Revert(#[from] RevertError),
    #[error(transparent)]
    Restore(#[from] chain::restore::RestoreError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Quiesce(#[from] quiesce::QuiesceError),
    #[error(transparent)]
    Backup(Box<crate::backup::BackupError>),
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A failure the simulator was told to inject.
    #[error("{what} (injected by the simulator)")]
    Simulated { what: String, partial: bool },
}

impl From<crate::backup::BackupError> for EngineError {
    fn from(e: crate::backup::BackupError) -> Self {
        EngineError::Backup(Box::new(e))
    }
}

impl EngineError {
    pub fn io(action: &'static str, path: &Path, source: io::Error) -> EngineError {
        EngineError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The take (or backup) stopped because the daemon is shutting down.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, EngineError::Take(TakeError::Cancelled))
            || matches!(self, EngineError::Backup(b) if matches!(**b, crate::backup::BackupError::Cancelled))
    }

    /// The backup is not on the remote.
    pub fn is_unknown_backup(&self) -> bool {
        matches!(self, EngineError::Backup(b) if matches!(**b, crate::backup::BackupError::UnknownBackup { .. }))
    }

    /// The disk holding the chain is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            EngineError::Take(t) => t.is_disk_full(),
            EngineError::Chain(c) => c.is_disk_full(),
            _ => false,
        }
    }

    /// A revert failed after it may have written to the device.
    pub fn partly_reverted(&self) -> bool {
        match self {
            EngineError::Revert(r) => r.partly_reverted(),
            EngineError::Simulated { partial, .. } => *partial,
            _ => false,
        }
    }
}

/// What the daemon asks of the host.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// Size in bytes of a block device or image file.
    fn device_size(&self, device: &Path) -> Result<u64, EngineError>;
    /// Whether the device node (or file) is there.
    fn device_exists(&self, device: &Path) -> bool;
    /// Whether the device is mounted anywhere.
    fn mounted(&self, device: &Path) -> Result<bool, EngineError>;
    /// Thaw filesystems an earlier run froze and did not thaw (at start).
    fn thaw_leftovers(&self, intent_dir: &Path);

    /// Whether a chain file exists.
    fn chain_exists(&self, chain: &Path) -> bool;
    /// The live snapshots of a chain, oldest first; a torn tail is cut off.
    fn chain_snapshots(&self, chain: &Path) -> Result<Vec<ChainSnapshot>, EngineError>;
    /// Take a snapshot (quiesce, scan, append, commit).
    fn take(
        &self,
        job: &TakeJob,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Taken, EngineError>;
    /// How a snapshot in a chain was taken, if the chain records it.
    fn take_record(&self, chain: &Path, id: Uuid) -> Option<TakeRecord>;
    /// Delete a snapshot from its chain; `None` if it was not there.
    fn delete_snapshot(&self, chain: &Path, id: Uuid) -> Result<Option<Deleted>, EngineError>;
    /// Make `device` hold snapshot `id` again, writing only what differs.
    fn revert(
        &self,
        chain: &Path,
        id: Uuid,
        device: &Path,
        progress: &Progress,
    ) -> Result<Reverted, EngineError>;

    /// Whether a file of `size` bytes can be made in `dir`: `None` if it
    /// can, else the largest size (to 4 KiB) that can. Files there are
    /// sparse: this needs no free space.
    fn largest_file(&self, dir: &Path, size: u64) -> Result<Option<u64>, EngineError>;
    /// Bytes free in `dir`'s filesystem for ordinary use (the blocks
    /// reserved for root are left to the system).
    fn free_bytes(&self, dir: &Path) -> Result<u64, EngineError>;
    /// Bytes of data (not zero blocks, which stay holes) that restoring
    /// snapshot `id` writes.
    fn image_data_bytes(&self, chain: &Path, id: Uuid) -> Result<u64, EngineError>;

    /// Create the image file of a made volume: snapshot `from` restored into
    /// it, or blank; then at least `size` bytes long and fsync'd.
    fn make_image(
        &self,
        from: Option<(&Path, Uuid)>,
        image: &Path,
        size: u64,
    ) -> Result<(), EngineError>;
    /// Attach an image file to a free loop device.
    fn attach(&self, image: &Path) -> Result<PathBuf, EngineError>;
    /// The loop device an image file is attached to, if any.
    fn attached(&self, image: &Path) -> Option<PathBuf>;
    fn detach(&self, device: &Path) -> Result<(), EngineError>;
    /// Remove a file; one that is not there is no error.
    fn remove(&self, path: &Path) -> Result<(), EngineError>;
    /// Back up a chain snapshot to a remote (resuming an interrupted
    /// backup of the same id without uploading again what is there).
    fn backup(
        &self,
        job: &BackupJob,
        progress: &Arc<crate::backup::Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<crate::backup::BackupOutcome, EngineError>;
    /// Write backup `id` of `volume` on `remote` into a new image file of
    /// `size_bytes` (the backup's size, or larger: the rest reads as zeros).
    fn restore_backup(
        &self,
        remote: &crate::config::RemoteConfig,
        volume: &str,
        id: Uuid,
        image: &Path,
        size_bytes: u64,
        progress: &Arc<crate::backup::Progress>,
    ) -> Result<(), EngineError>;
    /// Delete backup `id` of `volume` from `remote` (objects no other backup
    /// needs go with it).
    fn delete_backup(
        &self,
        remote: &crate::config::RemoteConfig,
        volume: &str,
        id: Uuid,
    ) -> Result<(), EngineError>;
}

/// The real host.
pub struct HostEngine {
    pub sys: Arc<dyn quiesce::System>,
    /// Write tracking of the configured volumes, from the start.
    pub tracker: Arc<crate::track::Registry>,
    take_records: super::takes::TakeRecords,
}

impl std::fmt::Debug for HostEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostEngine")
    }
}

impl HostEngine {
    /// The host, tracking writes to the configured volumes that ask for it
    /// from now on.
    pub fn new(sys: Arc<dyn quiesce::System>, config: &crate::config::Config) -> Arc<HostEngine> {
        let tracker = Arc::new(crate::track::Registry::start(
            &config
                .volumes
                .iter()
                .filter(|v| v.track_writes)
                .map(|v| crate::track::Target {
                    volume: v.id.clone(),
                    path: v.device.clone(),
                })
                .collect::<Vec<_>>(),
            &Default::default(),
        ));
        Arc::new(HostEngine {
            sys,
            tracker,
            take_records: Default::default(),
        })
    }
}

impl Engine for HostEngine {
    fn device_size(&self, device: &Path) -> Result<u64, EngineError> {
        Ok(crate::device::Device::open(device, false)?.size())
    }

    fn device_exists(&self, device: &Path) -> bool {
        device.exists()
    }

    fn mounted(&self, device: &Path) -> Result<bool, EngineError> {
        let m = self
            .sys
            .mounts_of(device)
            .map_err(quiesce::QuiesceError::Mounts)?;
        Ok(!m.is_empty())
    }

    fn thaw_leftovers(&self, intent_dir: &Path) {
        for o in quiesce::intent::thaw_leftovers(self.sys.as_ref(), intent_dir) {
            if let quiesce::intent::Outcome::Failed(mp, e) = o {
                tracing::error!(mount_point = %mp.display(), "could not thaw a filesystem left frozen: {e}");
            }
        }
    }

    fn chain_exists(&self, chain: &Path) -> bool {
        chain.exists()
    }

    fn chain_snapshots(&self, path: &Path) -> Result<Vec<ChainSnapshot>, EngineError> {
        // Opened for writing to cut off a torn tail; a chain another process
        // holds (a CLI take) is read as it is.
        let c = match Chain::open(path, Access::Write) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{}", crate::util::error_chain(&e));
                Chain::open(path, Access::Read)?
            }
        };
        Ok(c.snapshots()
            .iter()
            .map(|s| ChainSnapshot {
                id: s.id,
                name: s.name.clone(),
                description: s.description.clone(),
                metadata: s.metadata.clone(),
                created_us: s.created_us,
                device_size: s.device_size,
                changed_bytes: s.changed_bytes,
                stored_bytes: s.stored_bytes,
                freeze_us: s.freeze_us,
            })
            .collect())
    }

    fn take(
        &self,
        job: &TakeJob,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Taken, EngineError> {
        let opts = TakeOptions {
            name: job.name.clone(),
            description: job.description.clone(),
            metadata: job.metadata.clone(),
            block_size: job.block_size,
            full: job.full,
            snapshot_id: Some(job.snapshot_id),
            quiesce: job.quiesce.clone(),
            progress: Some(progress.clone()),
            cancel: Some(cancel.clone()),
            tuning: Default::default(),
            tracking: if job.tracked {
                crate::take::Tracking::Shared {
                    registry: self.tracker.clone(),
                    volume: job.volume.clone(),
                }
            } else {
                crate::take::Tracking::Off
            },
            verify_every: job.verify_every,
        };
        let out = crate::take::take(self.sys.clone(), &job.device, &job.chain, &opts)?;
        Ok(Taken {
            device_size: out.snapshot.device_size,
            changed_bytes: out.changed_bytes,
            stored_bytes: out.stored_bytes,
            freeze: out.freeze,
            duration: out.duration,
            quiesce: out.quiesce,
            record: out.record,
        })
    }

    fn take_record(&self, chain: &Path, id: Uuid) -> Option<TakeRecord> {
        self.take_records.get(chain, id)
    }

    fn delete_snapshot(&self, path: &Path, id: Uuid) -> Result<Option<Deleted>, EngineError> {
        if !path.exists() {
            return Ok(None);
        }
        let mut c = Chain::open(path, Access::Write)?;
        if !c.snapshots().iter().any(|s| s.id == id) {
            return Ok(None);
        }
        crate::fault::point(crate::fault::Point::DeleteBeforeCommit);
        let out = chain::delete::delete(&mut c, id)?;
        crate::fault::point(crate::fault::Point::DeleteAfterCommit);
        Ok(Some(Deleted {
            merged_blocks: out.merged_blocks,
            reclaimed_bytes: out.reclaimed_bytes,
        }))
    }

    fn revert(
        &self,
        chain: &Path,
        id: Uuid,
        device: &Path,
        progress: &Progress,
    ) -> Result<Reverted, EngineError> {
        let c = Chain::open(chain, Access::Read)?;
        let out = crate::revert::revert(&c, id, device, Some(progress))?;
        Ok(Reverted {
            blocks_checked: out.blocks_checked,
            blocks_written: out.blocks_written,
        })
    }

    fn largest_file(&self, dir: &Path, size: u64) -> Result<Option<u64>, EngineError> {
        let f = probe_file(dir).map_err(|e| EngineError::io("create a size probe in", dir, e))?;
        let fits = |n: u64| -> Result<bool, EngineError> {
            if i64::try_from(n).is_err() {
                return Ok(false);
            }
            match f.set_len(n) {
                Ok(()) => Ok(true),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)) => {
                    Ok(false)
                }
                Err(e) => Err(EngineError::io("set the size of a size probe in", dir, e)),
            }
        };
        let r = if fits(size)? {
            None
        } else {
            // The largest size that fits, to 4 KiB: a binary search over
            // sparse sizes (no data is written).
            const STEP: u64 = 4096;
            let (mut lo, mut hi) = (0u64, size / STEP);
            while lo + 1 < hi {
                let mid = lo + (hi - lo) / 2;
                if fits(mid * STEP)? {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            Some(lo * STEP)
        };
        // Unnamed (O_TMPFILE) or already unlinked: closing frees it.
        drop(f);
        Ok(r)
    }

    fn free_bytes(&self, dir: &Path) -> Result<u64, EngineError> {
        let st = nix::sys::statvfs::statvfs(dir)
            .map_err(|e| EngineError::io("read the free space of", dir, e.into()))?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    fn image_data_bytes(&self, chain: &Path, id: Uuid) -> Result<u64, EngineError> {
        let c = Chain::open(chain, Access::Read)?;
        let plan = c.resolve(id)?;
        let bs = plan.block_size as u64;
        Ok(plan
            .runs
            .iter()
            .filter(|r| matches!(r.source, chain::Origin::Data { .. }))
            .map(|r| {
                // The last block may be short.
                let end = ((r.block + r.count) * bs).min(plan.device_size());
                end.saturating_sub(r.block * bs)
            })
            .sum())
    }

    fn make_image(
        &self,
        from: Option<(&Path, Uuid)>,
        image: &Path,
        size: u64,
    ) -> Result<(), EngineError> {
        if let Some((chain, snap)) = from {
            let c = Chain::open(chain, Access::Read)?;
            crate::fault::point(crate::fault::Point::VolumeRestore);
            chain::restore::restore(&c, snap, image, &Default::default())?;
        } else {
            crate::util::create_private(image).map_err(|e| EngineError::io("create", image, e))?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(|e| EngineError::io("open", image, e))?;
        let len = f
            .metadata()
            .map_err(|e| EngineError::io("read the size of", image, e))?
            .len();
        if len < size {
            f.set_len(size)
                .map_err(|e| EngineError::io("set the size of", image, e))?;
        }
        f.sync_all().map_err(|e| EngineError::io("fsync", image, e))
    }

    fn attach(&self, image: &Path) -> Result<PathBuf, EngineError> {
        crate::loopdev::attach(image, false)
            .map(|ld| ld.path)
            .map_err(|e| EngineError::io("attach a loop device to", image, e))
    }

    fn attached(&self, image: &Path) -> Option<PathBuf> {
        crate::loopdev::find_by_backing(image).map(|ld| ld.path)
    }

    fn detach(&self, device: &Path) -> Result<(), EngineError> {
        crate::loopdev::detach(device).map_err(|e| EngineError::io("detach", device, e))
    }

    fn remove(&self, path: &Path) -> Result<(), EngineError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io("remove", path, e)),
        }
    }

    fn backup(
        &self,
        job: &BackupJob,
        progress: &Arc<crate::backup::Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<crate::backup::BackupOutcome, EngineError> {
        let remote = crate::backup::Remote::open(&job.remote)?;
        let c = Chain::open(&job.chain, Access::Read)?;
        let opts = crate::backup::BackupOptions {
            volume: job.volume.clone(),
            incremental: job.incremental,
            name: job.name.clone(),
            description: job.description.clone(),
            id: Some(job.backup),
            progress: Some(progress.clone()),
            cancel: Some(cancel.clone()),
            no_local_state: false,
        };
        Ok(crate::backup::create(&c, job.snapshot, &remote, &opts)?)
    }

    fn restore_backup(
        &self,
        remote: &crate::config::RemoteConfig,
        volume: &str,
        id: Uuid,
        image: &Path,
        size_bytes: u64,
        progress: &Arc<crate::backup::Progress>,
    ) -> Result<(), EngineError> {
        let remote = crate::backup::Remote::open(remote)?;
        // What an interrupted attempt left goes first: the restore makes a
        // new owner-only file of the backup's size (zero blocks stay holes).
        self.remove(image)?;
        let opts = crate::backup::RestoreOptions {
            progress: Some(progress.clone()),
            cancel: None,
        };
        crate::backup::restore(&remote, volume, &id.to_string(), image, &opts)?;
        // A volume asked larger than the backup: the rest reads as zeros
        // (a hole), durable before the volume is said available.
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)
            .map_err(|e| EngineError::io("open the restored image", image, e))?;
        let len = f
            .metadata()
            .map_err(|e| EngineError::io("read the size of the restored image", image, e))?
            .len();
        if len < size_bytes {
            f.set_len(size_bytes)
                .map_err(|e| EngineError::io("grow the restored image", image, e))?;
            f.sync_all()
                .map_err(|e| EngineError::io("sync the grown image", image, e))?;
        }
        Ok(())
    }

    fn delete_backup(
        &self,
        remote: &crate::config::RemoteConfig,
        volume: &str,
        id: Uuid,
    ) -> Result<(), EngineError> {
        let remote = crate::backup::Remote::open(remote)?;
        crate::backup::delete(&remote, volume, &id.to_string())?;
        Ok(())
    }
}

/// An empty file in `dir` nobody else can see or open: unnamed
/// (O_TMPFILE), or, where the filesystem has no unnamed files, created
/// under a unique name (O_EXCL, no symlink followed) and unlinked at once.
fn probe_file(dir: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = std::fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir);
    match tmp {
        Ok(f) => Ok(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            let path = dir.join(format!(".size-probe-{}", Uuid::new_v4()));
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Arc<HostEngine> {
        let config = crate::config::Config::parse(
            Path::new("t.toml"),
            "[daemon]\nsocket = \"/tmp/x.sock\"\nstate_dir = \"/tmp/x\"\n\n[[tokens]]\ntenant = \"t\"\ntoken = \"a-long-token\"\n",
        )
        .unwrap();
        HostEngine::new(Arc::new(crate::quiesce::Host), &config)
    }

    #[test]
    fn the_largest_file_is_found_without_leaving_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = host();
        assert_eq!(e.largest_file(dir.path(), 1 << 30).unwrap(), None);
        let max = e
            .largest_file(dir.path(), u64::MAX)
            .unwrap()
            .expect("no filesystem holds a file of 16 EiB");
        assert!(max >= 1 << 30 && max % 4096 == 0, "{max}");
        assert_eq!(e.largest_file(dir.path(), max).unwrap(), None);
        assert_eq!(e.largest_file(dir.path(), max + 4096).unwrap(), Some(max));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(e.largest_file(&dir.path().join("missing"), 1).is_err());
    }
}
