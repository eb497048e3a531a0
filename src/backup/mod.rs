//! Off-host backups of snapshots to S3-compatible object storage.
//!
//! The engine is blocking (the daemon runs it on its blocking pool) and
//! works on a [`Remote`]: an object store, an optional key, and tuning.
//!
//! - [`create`] uploads what the remote lacks of a chain snapshot: after the
//!   first (full) backup, only the blocks changed since the volume's previous
//!   backup, as immutable content-named objects, then a manifest, last.
//! - [`restore`] writes a backup's image to a file or block device, on any
//!   host, with nothing but the remote's settings.
//! - [`verify`] reads every object a backup needs and names what is missing
//!   or damaged.
//! - [`delete`] removes a backup, merging what later backups need into them
//!   and then the objects no backup references; [`gc`] sweeps orphans.
//! - [`list`] and [`show`] read manifests.
//!
//! docs/BACKUP.md describes the remote layout and the rules.

pub mod create;
pub mod crypto;
pub mod delete;
pub mod list;
pub mod lock;
pub mod manifest;
pub mod restore;
pub mod s3;
pub mod state;
pub mod store;
pub mod verify;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use uuid::Uuid;

pub use create::{create, BackupOptions, BackupOutcome, DiffSource};
pub use delete::{delete, gc, DeleteOutcome, GcOutcome};
pub use list::{list, show, BackupInfo, Listed};
pub use restore::{restore, RestoreOptions, RestoreOutcome};
pub use verify::{verify, Problem, VerifyReport};

use crate::chain::ChainError;
use crate::config::RemoteConfig;
use manifest::{Manifest, ManifestError};
use store::{Store, StoreError};

/// Errors of the backup engine.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error("remote {remote} cannot be used: {detail}")]
    BadRemote { remote: String, detail: String },
    #[error("volume name {volume:?} must be 1 to 64 letters, digits, '-', '_' or '.'")]
    InvalidVolume { volume: String },
    #[error("no backup {id} of volume {volume} on remote {remote} (see `blocksnap backup list`)")]
    UnknownBackup {
        remote: String,
        volume: String,
        id: String,
    },
    #[error("the manifest of backup {id} of volume {volume} on remote {remote} cannot be used")]
    Manifest {
        remote: String,
        volume: String,
        id: Uuid,
        #[source]
        source: ManifestError,
    },
    #[error("backup {id} of volume {volume} on remote {remote} needs backup {parent}, which is not on the remote; run `blocksnap backup verify`")]
    BrokenSeries {
        remote: String,
        volume: String,
        id: Uuid,
        parent: Uuid,
    },
    #[error("backup {id} of volume {volume} on remote {remote} does not define {blocks} block(s) of its image; run `blocksnap backup verify`")]
    Incomplete {
        remote: String,
        volume: String,
        id: Uuid,
        blocks: u64,
    },
    #[error("object {key} on remote {remote} is missing; run `blocksnap backup verify` to see which backups need it")]
    MissingObject { remote: String, key: String },
    #[error("object {key} on remote {remote} is encrypted; configure the remote's key_file")]
    NeedKey { remote: String, key: String },
    #[error("object {key} on remote {remote} is damaged")]
    DamagedObject {
        remote: String,
        key: String,
        #[source]
        source: crypto::OpenError,
    },
    #[error("object {key} on remote {remote} holds {found} bytes, not {expected}: it is damaged")]
    ObjectSize {
        remote: String,
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("block {block} of backup {id} fails its checksum in object {key} on remote {remote}; the restore target is incomplete")]
    BlockCorrupt {
        remote: String,
        id: Uuid,
        block: u64,
        key: String,
    },
    #[error("volume {volume} on remote {remote} is in use by {holder}; wait for it to end or, if that process is gone, run `blocksnap backup unlock --config FILE {remote} {volume}`")]
    Locked {
        remote: String,
        volume: String,
        holder: String,
    },
    #[error("backups of volume {volume} on remote {remote} are being read by {holder}; try again when that restore or verify ends")]
    Readers {
        remote: String,
        volume: String,
        holder: String,
    },
    #[error("the manifest of backup {id} of volume {volume} on remote {remote} is unreadable, so which objects it needs is unknown; nothing was deleted (fix or remove that backup first)")]
    GcRefused {
        remote: String,
        volume: String,
        id: Uuid,
    },
    #[error("snapshot {id} is damaged: block {block} stored at offset {chain_offset} of chain {path} fails its checksum")]
    ChainCorrupt {
        path: PathBuf,
        id: Uuid,
        block: u64,
        chain_offset: u64,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("cannot open restore target {path}")]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restore target {path} is mounted or in use; unmount it first")]
    TargetBusy { path: PathBuf },
    #[error("restore target {path} holds {size} bytes but the backup needs {needed}; use a device at least that large")]
    TargetTooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("restore target {path} is neither a block device nor a regular file")]
    TargetKind { path: PathBuf },
    #[error("cannot write restore target {path} at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("backup {id} cannot be merged into backup {child}: {detail}")]
    Inconsistent {
        id: Uuid,
        child: Uuid,
        detail: String,
    },
}

impl From<StoreError> for BackupError {
    fn from(e: StoreError) -> Self {
        BackupError::Store(Box::new(e))
    }
}

/// Progress of a long operation, for a progress bar or the API.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes to process (read and check, or restore); grows as it is known.
    pub total: AtomicU64,
    /// Bytes processed so far.
    pub done: AtomicU64,
    /// Bytes sent to or received from the remote.
    pub transferred: AtomicU64,
}

/// Tuning of a remote, from its configuration.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Most plaintext bytes per object.
    pub object_size: u64,
    /// Objects larger than this go up in parts of this size.
    pub part_size: u64,
    /// Requests in flight.
    pub concurrency: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            object_size: 16 << 20,
            part_size: 8 << 20,
            concurrency: 4,
        }
    }
}

/// A configured remote, ready to use.
#[derive(Debug, Clone)]
pub struct Remote {
    pub name: String,
    /// Endpoint, bucket and prefix: tells two remotes' contents apart.
    pub identity: String,
    store: Arc<dyn Store>,
    key: Option<crypto::Key>,
    pub tuning: Tuning,
}

impl Remote {
    /// The remote configured by `cfg` (an S3 client; nothing is sent yet).
    pub fn open(cfg: &RemoteConfig) -> Result<Remote, BackupError> {
        let store = s3::S3Store::new(cfg).map_err(|detail| BackupError::BadRemote {
            remote: cfg.name.clone(),
            detail,
        })?;
        Ok(Remote {
            name: cfg.name.clone(),
            identity: format!("{} {} {}", cfg.endpoint, cfg.bucket, cfg.prefix),
            store: Arc::new(store),
            key: cfg.key.clone(),
            tuning: Tuning {
                object_size: cfg.object_size,
                part_size: cfg.part_size,
                concurrency: cfg.concurrency,
            },
        })
    }

    /// A remote over any store (tests, tools).
    pub fn with_store(
        name: &str,
        store: Arc<dyn Store>,
        key: Option<crypto::Key>,
        tuning: Tuning,
    ) -> Remote {
        Remote {
            name: name.to_string(),
            identity: format!("store {name}"),
            store,
            key,
            tuning,
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn key(&self) -> Option<&crypto::Key> {
        self.key.as_ref()
    }

    /// The volumes with anything on the remote.
    pub fn volumes(&self) -> Result<Vec<String>, BackupError> {
        Ok(self
            .store
            .list_dirs("")?
            .into_iter()
            .filter_map(|d| d.strip_suffix('/').map(str::to_string))
            .filter(|v| crate::config::valid_name(v))
            .collect())
    }

    /// The backups of `volume`: (seq, id), oldest first.
    pub fn backups(&self, volume: &str) -> Result<Vec<(u64, Uuid)>, BackupError> {
        check_volume(volume)?;
        let mut out: Vec<(u64, Uuid)> = self
            .store
            .list(&format!("{volume}/backups/"))?
            .iter()
            .filter_map(|o| manifest::parse_manifest_key(&o.key))
            .filter(|(v, _, _)| *v == volume)
            .map(|(_, s, i)| (s, i))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Find a backup by id or a unique prefix of at least 8 characters.
    pub fn find(&self, volume: &str, id: &str) -> Result<(u64, Uuid), BackupError> {
        let all = self.backups(volume)?;
        let unknown = || BackupError::UnknownBackup {
            remote: self.name.clone(),
            volume: volume.to_string(),
            id: id.to_string(),
        };
        if let Ok(u) = Uuid::parse_str(id) {
            return all.into_iter().find(|(_, i)| *i == u).ok_or_else(unknown);
        }
        let lower = id.to_ascii_lowercase();
        if lower.len() < 8 {
            return Err(unknown());
        }
        let mut hits = all
            .into_iter()
            .filter(|(_, i)| i.to_string().starts_with(&lower));
        match (hits.next(), hits.next()) {
            (Some(h), None) => Ok(h),
            _ => Err(unknown()),
        }
    }

    /// Read and check one manifest.
    pub fn manifest(&self, volume: &str, seq: u64, id: Uuid) -> Result<Manifest, BackupError> {
        let key = manifest::manifest_key(volume, seq, id);
        let bytes = self
            .store
            .get(&key)?
            .ok_or_else(|| BackupError::UnknownBackup {
                remote: self.name.clone(),
                volume: volume.to_string(),
                id: id.to_string(),
            })?;
        Manifest::decode(&bytes, self.key.as_ref(), volume, seq, id).map_err(|source| {
            BackupError::Manifest {
                remote: self.name.clone(),
                volume: volume.to_string(),
                id,
                source,
            }
        })
    }

    /// A backup and its ancestors, newest first, down to a full backup.
    pub fn lineage(
        &self,
        volume: &str,
        all: &[(u64, Uuid)],
        seq: u64,
        id: Uuid,
    ) -> Result<Vec<Manifest>, BackupError> {
        let mut out = vec![self.manifest(volume, seq, id)?];
        while let Some(parent) = out.last().and_then(|m| m.parent) {
            let child = out.last().map(|m| m.id).unwrap_or(id);
            let Some(&(ps, _)) = all.iter().find(|(_, i)| *i == parent) else {
                return Err(BackupError::BrokenSeries {
                    remote: self.name.clone(),
                    volume: volume.to_string(),
                    id: child,
                    parent,
                });
            };
            if out.iter().any(|m| m.id == parent) || out.len() > all.len() {
                return Err(BackupError::BrokenSeries {
                    remote: self.name.clone(),
                    volume: volume.to_string(),
                    id: child,
                    parent,
                });
            }
            out.push(self.manifest(volume, ps, parent)?);
        }
        Ok(out)
    }

    fn missing(&self, key: &str) -> BackupError {
        BackupError::MissingObject {
            remote: self.name.clone(),
            key: key.to_string(),
        }
    }

    /// Download object `o` of `volume` and check it: its size, its
    /// authentication (or content hash) against its name.
    pub fn fetch_object(
        &self,
        volume: &str,
        o: &manifest::ObjectRef,
    ) -> Result<Vec<u8>, BackupError> {
        let key = o.key(volume);
        let mut bytes = self.store.get(&key)?.ok_or_else(|| self.missing(&key))?;
        if bytes.len() as u64 != o.stored_len {
            return Err(BackupError::ObjectSize {
                remote: self.name.clone(),
                key,
                expected: o.stored_len,
                found: bytes.len() as u64,
            });
        }
        let k = if o.encrypted {
            Some(self.key.as_ref().ok_or_else(|| BackupError::NeedKey {
                remote: self.name.clone(),
                key: key.clone(),
            })?)
        } else {
            None
        };
        crypto::open_object(k, &o.name, &key, &mut bytes).map_err(|source| {
            BackupError::DamagedObject {
                remote: self.name.clone(),
                key: key.clone(),
                source,
            }
        })?;
        if bytes.len() as u64 != o.plain_len {
            return Err(BackupError::ObjectSize {
                remote: self.name.clone(),
                key,
                expected: o.plain_len,
                found: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }
}

fn check_volume(volume: &str) -> Result<(), BackupError> {
    if crate::config::valid_name(volume) {
        Ok(())
    } else {
        Err(BackupError::InvalidVolume {
            volume: volume.to_string(),
        })
    }
}

fn cancelled(c: &Option<Arc<std::sync::atomic::AtomicBool>>) -> bool {
    c.as_ref()
        .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
}

#[cfg(test)]
mod tests;
