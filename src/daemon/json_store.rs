//! TEMPORARY: a [`Store`] over the old whole-file catalog.json, so the
//! daemon runs on this branch until the durable store (SQLite, with notes
//! beside the chains) is wired in its place with one line in
//! `blocksnapd`'s main. It keeps the old file format, so that store's
//! migration reads what this one wrote.
//!
//! Unlike the old catalog code it saves under its lock, in order, through a
//! uniquely named temporary file, and a change is visible only once its
//! file is durable. It still rewrites the whole file on every change, which
//! does not scale to 10^5 records; and it cannot rebuild a lost file. It is
//! also the in-memory store of tests when given no file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use uuid::Uuid;

use super::catalog::{Catalog, SnapshotRecord, VolumeRecord};
use super::store::{Change, Page, SnapshotQuery, SortDir, SortKey, Store, StoreError, VolumeQuery};

/// The catalog in memory, saved to `path` (if any) on every change.
#[derive(Debug)]
pub struct JsonStore {
    path: Option<PathBuf>,
    cat: Mutex<Catalog>,
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
        Ok(JsonStore {
            path: Some(path),
            cat: Mutex::new(cat),
        })
    }

    /// A store that lives in memory only.
    pub fn in_memory() -> JsonStore {
        JsonStore {
            path: None,
            cat: Mutex::new(Catalog::default()),
        }
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

/// The fields a list sorts by.
trait Sortable {
    fn id_text(&self) -> String;
    fn key(&self, k: SortKey) -> Key;
}

#[derive(PartialEq, PartialOrd)]
enum Key {
    Int(i64),
    Text(String),
}

impl Sortable for SnapshotRecord {
    fn id_text(&self) -> String {
        self.id.to_string()
    }
    fn key(&self, k: SortKey) -> Key {
        match k {
            SortKey::CreatedAt => Key::Int(self.created_us),
            SortKey::UpdatedAt => Key::Int(self.updated_us),
            SortKey::Id => Key::Text(self.id.to_string()),
            SortKey::Name => Key::Text(self.display_name.clone()),
            SortKey::Status => Key::Text(self.status.as_str().to_string()),
            SortKey::Size => Key::Int(self.size_bytes as i64),
        }
    }
}

impl Sortable for VolumeRecord {
    fn id_text(&self) -> String {
        self.id.clone()
    }
    fn key(&self, k: SortKey) -> Key {
        match k {
            SortKey::CreatedAt => Key::Int(self.created_us),
            SortKey::UpdatedAt => Key::Int(self.updated_us),
            SortKey::Id => Key::Text(self.id.clone()),
            SortKey::Name => Key::Text(self.display_name.clone()),
            SortKey::Status => Key::Text(self.status.as_str().to_string()),
            SortKey::Size => Key::Int(self.size_bytes as i64),
        }
    }
}

fn page<T: Sortable>(mut v: Vec<T>, p: &Page) -> Result<Vec<T>, StoreError> {
    v.sort_by(|a, b| {
        for (k, dir) in &p.sort {
            let o = a
                .key(*k)
                .partial_cmp(&b.key(*k))
                .unwrap_or(std::cmp::Ordering::Equal);
            let o = if *dir == SortDir::Desc {
                o.reverse()
            } else {
                o
            };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        a.id_text().cmp(&b.id_text())
    });
    let start = match &p.marker {
        None => 0,
        Some(m) => {
            v.iter()
                .position(|r| &r.id_text() == m)
                .ok_or_else(|| StoreError::UnknownMarker(m.clone()))?
                + 1
        }
    };
    Ok(v.into_iter()
        .skip(start)
        .skip(p.offset)
        .take(p.limit)
        .collect())
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
        *cat = next;
        Ok(())
    }

    fn snapshot(&self, id: Uuid) -> Result<Option<SnapshotRecord>, StoreError> {
        Ok(self.lock().snapshots.get(&id).cloned())
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<SnapshotRecord>, StoreError> {
        let v: Vec<SnapshotRecord> = self
            .lock()
            .snapshots
            .values()
            .filter(|r| {
                q.tenant
                    .as_ref()
                    .is_none_or(|t| r.tenant.as_ref().is_none_or(|rt| rt == t))
            })
            .filter(|r| {
                q.volumes
                    .as_ref()
                    .is_none_or(|vs| vs.contains(&r.volume_id))
            })
            .filter(|r| q.volume_id.as_ref().is_none_or(|v| &r.volume_id == v))
            .filter(|r| q.status.as_deref().is_none_or(|s| r.status.as_str() == s))
            .filter(|r| q.name.as_ref().is_none_or(|n| &r.display_name == n))
            .cloned()
            .collect();
        page(v, &q.page)
    }

    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        Ok(self.lock().volumes.get(id).cloned())
    }

    fn volumes(&self, q: &VolumeQuery) -> Result<Vec<VolumeRecord>, StoreError> {
        let v: Vec<VolumeRecord> = self
            .lock()
            .volumes
            .values()
            .filter(|r| {
                q.tenant
                    .as_ref()
                    .is_none_or(|t| r.tenant.as_ref().is_none_or(|rt| rt == t))
            })
            .filter(|r| q.status.as_deref().is_none_or(|s| r.status.as_str() == s))
            .filter(|r| q.name.as_ref().is_none_or(|n| &r.display_name == n))
            .cloned()
            .collect();
        page(v, &q.page)
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

    #[test]
    fn pages_in_order_with_markers() {
        let s = JsonStore::in_memory();
        let recs: Vec<Change> = (1..=5)
            .map(|i| Change::PutSnapshot(snap(i, (i % 3) as i64)))
            .collect();
        s.apply(&recs).unwrap();
        let ids = |q: &SnapshotQuery| -> Vec<u128> {
            s.snapshots(q)
                .unwrap()
                .iter()
                .map(|r| r.id.as_u128())
                .collect()
        };
        // created 2,2,1,1,0 for ids 2,5,1,4,3 (newest first, then by id).
        assert_eq!(ids(&SnapshotQuery::default()), [2, 5, 1, 4, 3]);
        let mut q = SnapshotQuery::default();
        q.page.marker = Some(Uuid::from_u128(5).to_string());
        q.page.limit = 2;
        assert_eq!(ids(&q), [1, 4]);
        q.page.marker = Some("nope".into());
        assert!(matches!(s.snapshots(&q), Err(StoreError::UnknownMarker(_))));
    }
}
