//! TEMPORARY: a [`Store`] over the old whole-file catalog.json, so the
//! daemon runs on this branch until the durable store (SQLite, with notes
//! beside the chains) is wired in its place with one line in
//! `blocksnapd`'s main. It keeps the old file format, so that store's
//! migration reads what this one wrote.
//!
//! Unlike the old catalog code it saves under its lock, in order, through a
//! uniquely named temporary file, and a change is visible only once its
//! file is durable. It still rewrites the whole file on every change, which
//! does not scale to 10^5 records; and it cannot rebuild a lost file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use uuid::Uuid;

use super::catalog::{Catalog, SnapshotRecord, VolumeRecord};
use super::store::{Change, MemStore, SnapshotQuery, Store, StoreError, VolumeQuery};

/// The catalog in memory, saved to `path` (if any) on every change.
#[derive(Debug)]
pub struct JsonStore {
    path: Option<PathBuf>,
    /// What the file holds.
    cat: Mutex<Catalog>,
    /// The same records, for queries.
    mem: MemStore,
}

fn boxed(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl JsonStore {
    /// Open state_dir/catalog.json (missing: empty).
    pub fn open(state_dir: &Path) -> Result<JsonStore, StoreError> {
        let path = state_dir.join("catalog.json");
        let cat = Catalog::load(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: boxed(e),
        })?;
        let mem = MemStore::with_records(
            cat.snapshots.values().cloned(),
            cat.volumes.values().cloned(),
        );
        Ok(JsonStore {
            path: Some(path),
            cat: Mutex::new(cat),
            mem,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Catalog> {
        self.cat.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Write `bytes` to `path` atomically through a temporary file of a name
/// nobody else uses, created exclusively and never through a symlink.
fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    static N: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(name);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        crate::util::sync_parent(path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn apply_to(cat: &mut Catalog, changes: &[Change]) {
    for c in changes {
        match c {
            Change::PutSnapshot(r) => {
                cat.snapshots.insert(r.id, r.clone());
            }
            Change::RemoveSnapshot(id) => {
                cat.snapshots.remove(id);
            }
            Change::PutVolume(r) => {
                cat.volumes.insert(r.id.clone(), r.clone());
            }
            Change::RemoveVolume(id) => {
                cat.volumes.remove(id);
            }
        }
    }
}

impl Store for JsonStore {
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut cat = self.lock();
        let mut next = cat.clone();
        apply_to(&mut next, changes);
        if let Some(path) = &self.path {
            let bytes =
                serde_json::to_vec_pretty(&next).map_err(|e| StoreError::Write(boxed(e)))?;
            save(path, &bytes).map_err(|e| StoreError::Write(boxed(e)))?;
        }
        // Under the same lock, so reads see the changes in the order saved.
        self.mem.apply(changes)?;
        *cat = next;
        Ok(())
    }

    fn snapshot(&self, id: Uuid) -> Result<Option<SnapshotRecord>, StoreError> {
        self.mem.snapshot(id)
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.mem.snapshots(q)
    }

    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        self.mem.volume(id)
    }

    fn volumes(&self, q: &VolumeQuery) -> Result<Vec<VolumeRecord>, StoreError> {
        self.mem.volumes(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::catalog::SnapStatus;

    fn snap(n: u128, created: i64) -> SnapshotRecord {
        SnapshotRecord {
            id: Uuid::from_u128(n),
            volume_id: "v".into(),
            tenant: None,
            status: SnapStatus::Available,
            display_name: format!("s{n}"),
            display_description: String::new(),
            metadata: Default::default(),
            created_us: created,
            updated_us: 0,
            size_bytes: 0,
            error: None,
            changed_bytes: 0,
            stored_bytes: 0,
            freeze_ms: 0.0,
        }
    }

    #[test]
    fn saves_every_change_and_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = JsonStore::open(dir.path()).unwrap();
        s.apply(&[
            Change::PutSnapshot(snap(1, 10)),
            Change::PutSnapshot(snap(2, 20)),
        ])
        .unwrap();
        s.apply(&[Change::RemoveSnapshot(Uuid::from_u128(1))])
            .unwrap();
        let again = JsonStore::open(dir.path()).unwrap();
        let all = again.snapshots(&SnapshotQuery::default()).unwrap();
        assert_eq!(all, vec![snap(2, 20)]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("catalog.json")]);
    }
}
