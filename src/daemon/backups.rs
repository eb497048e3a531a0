//! The daemon's book of backups: one record per backup made (or being
//! made) through the API, kept in `backups.json` in the state directory.
//!
//! The remote holds the backups themselves (docs/BACKUP.md); this book
//! holds what the API shows about them: who asked (the tenant), the volume
//! and snapshot, the status while the daemon works on them, and why one
//! failed. It is a small file of its own rather than a table of the
//! catalog: the catalog's contract (`store::Store`) stays as it is, and a
//! lost or damaged book costs the API's view of old backups, never a backup
//! (`blocksnap backup list --config` reads the remote itself).
//!
//! Every change is written whole and atomically (a temporary file, fsync,
//! rename, fsync of the directory) before it is answered.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::JobClaim;
use crate::backup::Progress;
use crate::statedir::StateDir;

/// The book's file in the state directory.
pub const FILE: &str = "backups.json";

/// A backup's status as Cinder names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupStatus {
    /// Being made (or waiting for the snapshot it backs up).
    #[default]
    Creating,
    Available,
    Error,
    /// Being deleted from the remote.
    Deleting,
    /// A delete failed; the backup may still be on the remote.
    ErrorDeleting,
}

impl BackupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupStatus::Creating => "creating",
            BackupStatus::Available => "available",
            BackupStatus::Error => "error",
            BackupStatus::Deleting => "deleting",
            BackupStatus::ErrorDeleting => "error_deleting",
        }
    }
}

/// One backup. Every field has a default, so a book written by an older
/// daemon still reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupRecord {
    pub id: Uuid,
    /// The volume backed up (its name on the remote too).
    pub volume_id: String,
    /// The tenant that asked for it; only it sees the backup.
    pub tenant: String,
    /// The remote (`[[remotes]]` name) it went to.
    pub remote: String,
    /// The snapshot backed up.
    pub snapshot_id: Uuid,
    /// The snapshot was taken for this backup (no snapshot_id was given).
    pub took_snapshot: bool,
    pub status: BackupStatus,
    pub name: String,
    pub description: String,
    /// Asked for as incremental.
    pub incremental: bool,
    /// The backup it is based on, once made (none: a full backup).
    pub parent_id: Option<Uuid>,
    /// The snapshot's size in bytes.
    pub size_bytes: u64,
    pub object_count: u64,
    pub changed_bytes: u64,
    pub uploaded_bytes: u64,
    pub created_us: i64,
    /// 0: never changed since it was made.
    pub updated_us: i64,
    /// When the snapshot it holds was taken.
    pub data_timestamp_us: i64,
    pub fail_reason: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct File {
    version: u32,
    backups: Vec<BackupRecord>,
}

/// Why the book cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("cannot read the backup book {path}; move it aside to start without it (the backups stay on their remote: `blocksnap backup list --config FILE REMOTE`)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the backup book {path} is damaged; move it aside to start without it (the backups stay on their remote: `blocksnap backup list --config FILE REMOTE`)")]
    Damaged {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the backup book {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The backups, in memory and on disk.
pub struct Book {
    dir: StateDir,
    records: Mutex<BTreeMap<Uuid, BackupRecord>>,
    progress: Mutex<HashMap<Uuid, Arc<Progress>>>,
}

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Book")
            .field("dir", &self.dir.path())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Book {
    /// Read the book of the state directory `state` (empty if there is none).
    pub fn open(state: &Path) -> Result<Book, BookError> {
        let path = state.join(FILE);
        let read = |source| BookError::Read {
            path: path.clone(),
            source,
        };
        let dir = StateDir::open(state).map_err(|e| read(io::Error::other(e.to_string())))?;
        let mut records = BTreeMap::new();
        match dir.open_read(FILE) {
            Ok(mut f) => {
                let mut text = Vec::new();
                io::Read::read_to_end(&mut f, &mut text).map_err(read)?;
                let file: File =
                    serde_json::from_slice(&text).map_err(|source| BookError::Damaged {
                        path: path.clone(),
                        source,
                    })?;
                for r in file.backups {
                    records.insert(r.id, r);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(read(e)),
        }
        Ok(Book {
            dir,
            records: Mutex::new(records),
            progress: Mutex::new(HashMap::new()),
        })
    }

    fn save(&self, records: &BTreeMap<Uuid, BackupRecord>) -> Result<(), BookError> {
        let file = File {
            version: 1,
            backups: records.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("serialisable");
        self.dir
            .replace_atomically(FILE, &bytes)
            .map_err(|source| BookError::Write {
                path: self.dir.join(FILE),
                source,
            })
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Vec<BackupRecord> {
        let mut v: Vec<BackupRecord> = lock(&self.records).values().cloned().collect();
        v.sort_by_key(|r| (r.created_us, r.id));
        v
    }

    pub fn get(&self, id: Uuid) -> Option<BackupRecord> {
        lock(&self.records).get(&id).cloned()
    }

    /// Run `f` on the book as its only writer (checks and the change it
    /// decides on see the same records); what `f` leaves is saved durably
    /// before this returns, and kept in memory only if that worked.
    pub(crate) fn write<R, E: From<BookError>>(
        &self,
        release: Option<&JobClaim>,
        f: impl FnOnce(&mut BTreeMap<Uuid, BackupRecord>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut g = lock(&self.records);
        if let Some(j) = release {
            j.release();
        }
        let mut copy = g.clone();
        let r = f(&mut copy)?;
        if copy != *g {
            self.save(&copy)?;
            *g = copy;
        }
        Ok(r)
    }

    /// Change one record (stamping `updated_us`); `None` if it is gone.
    pub(crate) fn update(
        &self,
        release: Option<&JobClaim>,
        id: Uuid,
        f: impl FnOnce(&mut BackupRecord),
    ) -> Result<Option<BackupRecord>, BookError> {
        self.write(release, |m| {
            Ok(m.get_mut(&id).map(|r| {
                f(r);
                r.updated_us = crate::util::now_micros().max(r.created_us + 1);
                r.clone()
            }))
        })
    }

    /// Live progress of a running backup.
    pub fn progress_of(&self, id: Uuid) -> Option<Arc<Progress>> {
        lock(&self.progress).get(&id).cloned()
    }

    pub(crate) fn track(&self, id: Uuid) -> ProgressGuard<'_> {
        let p = Arc::new(Progress::default());
        lock(&self.progress).insert(id, p.clone());
        ProgressGuard {
            book: self,
            id,
            progress: p,
        }
    }
}

/// Live progress shown while held.
pub(crate) struct ProgressGuard<'a> {
    book: &'a Book,
    id: Uuid,
    pub progress: Arc<Progress>,
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        lock(&self.book.progress).remove(&self.id);
    }
}

/// Percent done of a backup's progress.
pub fn percent(p: &Progress) -> f64 {
    use std::sync::atomic::Ordering::Relaxed;
    let total = p.total.load(Relaxed);
    if total == 0 {
        return 0.0;
    }
    (p.done.load(Relaxed) as f64 * 100.0 / total as f64).min(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_old_books_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let b = Book::open(dir.path()).unwrap();
        assert!(b.all().is_empty());
        let r = BackupRecord {
            id: Uuid::from_u128(5),
            volume_id: "v".into(),
            tenant: "t".into(),
            created_us: 10,
            ..BackupRecord::default()
        };
        b.write(None, |m| {
            m.insert(r.id, r.clone());
            Ok::<_, BookError>(())
        })
        .unwrap();
        let u = b
            .update(None, r.id, |r| r.status = BackupStatus::Available)
            .unwrap()
            .unwrap();
        assert!(u.updated_us > 10);
        let again = Book::open(dir.path()).unwrap();
        assert_eq!(again.all(), vec![u]);
        // A record with fields missing (an older daemon's) reads with defaults.
        std::fs::write(
            dir.path().join(FILE),
            br#"{"backups":[{"id":"00000000-0000-0000-0000-000000000007","volume_id":"v"}]}"#,
        )
        .unwrap();
        let old = Book::open(dir.path()).unwrap().all();
        assert_eq!(old[0].status, BackupStatus::Creating);
        assert_eq!(old[0].fail_reason, None);
        std::fs::write(dir.path().join(FILE), b"{nope").unwrap();
        assert!(matches!(
            Book::open(dir.path()),
            Err(BookError::Damaged { .. })
        ));
    }
}
