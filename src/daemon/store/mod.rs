//! The contract between the daemon and its catalog: what it remembers about
//! snapshots and volumes beyond what the chain files hold (tenant, names,
//! metadata, status, errors, made volumes, operations in progress).
//!
//! Two engineers build on this file at once: the operations layer (which
//! only ever talks to `dyn Store`, and tests against an in-memory store),
//! and the durable store (SQLite, with what only the catalog knows also
//! recorded next to the chains so a lost catalog file can be rebuilt).
//! Change it only by adding: new `Change` variants, new query fields with
//! defaults.
//!
//! Rules every implementation keeps:
//! - `apply` is atomic (all changes of a call or none) and durable when it
//!   returns `Ok`: a crash afterwards never loses them. Calls are applied in
//!   the order they return; one writer at a time.
//! - If `apply` fails, nothing of that call is visible to later reads, and
//!   the caller answers 500 and does not start the operation.
//! - Reads see every change whose `apply` has returned.
//! - Calls block (disk I/O): async code calls them on the blocking pool,
//!   never on an async worker.

pub mod mem;
pub mod notes;
pub mod sqlite;

pub use mem::MemStore;
pub use sqlite::{OpenReport, OpenedFrom, SqliteStore};

use uuid::Uuid;

use super::catalog::{SnapshotRecord, VolumeRecord};

/// One change to the catalog.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Insert or replace a snapshot record (by id).
    PutSnapshot(SnapshotRecord),
    /// Forget a snapshot record; no error if it is not there.
    RemoveSnapshot(Uuid),
    /// Insert or replace a volume record (by id).
    PutVolume(VolumeRecord),
    /// Forget a volume record; no error if it is not there.
    RemoveVolume(String),
}

/// Sort keys the API offers (Cinder's `sort=key:dir`, `sort_key`/`sort_dir`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    CreatedAt,
    UpdatedAt,
    Id,
    Name,
    Status,
    Size,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortDir {
    Asc,
    Desc,
}

/// A page of a list. Records are ordered by `sort` (then by id ascending to
/// make the order total); `marker` starts the page after the record with
/// that id in that order (an unknown marker is an error the API answers 400);
/// then `offset` records are skipped and at most `limit` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub sort: Vec<(SortKey, SortDir)>,
    pub marker: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

impl Default for Page {
    /// Newest first, everything.
    fn default() -> Page {
        Page {
            sort: vec![(SortKey::CreatedAt, SortDir::Desc)],
            marker: None,
            offset: 0,
            limit: usize::MAX,
        }
    }
}

/// Which snapshots to list. Every filter that is `Some` must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotQuery {
    /// Only snapshots whose record's `tenant` is this tenant or `None`
    /// (unowned: visible to whoever sees the volume, see `volumes`).
    pub tenant: Option<String>,
    /// Only snapshots of these volumes.
    pub volumes: Option<Vec<String>>,
    pub volume_id: Option<String>,
    /// Status as the API spells it ("available", ...).
    pub status: Option<String>,
    /// Exact display name.
    pub name: Option<String>,
    pub page: Page,
}

/// Which volume records to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeQuery {
    /// Only records whose `tenant` is this tenant or `None`.
    pub tenant: Option<String>,
    pub status: Option<String>,
    pub name: Option<String>,
    pub page: Page,
}

/// Why the catalog could not be read or changed. Implementations put their
/// own error (SQLite, I/O) in `source`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the catalog {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot read the catalog")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot save a change to the catalog; the change was not made")]
    Write(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the list marker {0} names no record in this list")]
    UnknownMarker(String),
}

/// The catalog.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Apply `changes` atomically and durably, in order.
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError>;
    fn snapshot(&self, id: Uuid) -> Result<Option<SnapshotRecord>, StoreError>;
    fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<SnapshotRecord>, StoreError>;
    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError>;
    fn volumes(&self, q: &VolumeQuery) -> Result<Vec<VolumeRecord>, StoreError>;
}
