//! `SqliteStore`: the catalog in SQLite (`state_dir/catalog.db`), with
//! every record also kept in a notes file beside its chain or image (see
//! [`super::notes`]) so the catalog can be rebuilt when it is lost or
//! damaged.
//!
//! - WAL journal, `synchronous=FULL`: a commit is on disk when it returns.
//! - One writer (a mutex around one connection); readers use their own
//!   connections from a small pool and never wait for the writer.
//! - Indexed columns for every filter and sort key, plus the record as
//!   JSON, so a new record field (with a serde default) needs no migration.
//! - `apply`: in one SQLite transaction, write the changes, append their
//!   notes entries and fsync them, then commit. A crash between the two is
//!   repaired on open (the notes are newer: their change is replayed if all
//!   its entries were written, dropped otherwise). A failure before the
//!   commit undoes the appended notes, so a failed apply leaves no trace.
//! - On open: a `catalog.json` from older versions is migrated (and kept as
//!   `catalog.json.migrated`); a catalog SQLite cannot read is moved to
//!   `damaged/` (never deleted) and rebuilt from the notes files.
//!
//! docs/STATE.md describes the layout and the recovery procedure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::stat::SFlag;
use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::notes::{self, Loc, Outcome};
use super::{Change, Page, SnapshotQuery, SortDir, SortKey, Store, StoreError, VolumeQuery};
use crate::daemon::catalog::{Catalog, SnapshotRecord, VolumeKind, VolumeRecord};
use crate::statedir::{StateDir, StateDirError};

/// The catalog's file name in the state directory.
pub const DB_NAME: &str = "catalog.db";
/// The catalog file of blocksnapd before the SQLite catalog.
pub const JSON_NAME: &str = "catalog.json";
const SQLITE_FILES: [&str; 4] = [
    "catalog.db",
    "catalog.db-wal",
    "catalog.db-shm",
    "catalog.db-journal",
];

/// A notes file is compacted once it holds more than twice its live
/// records plus this many entries.
const COMPACT_SLACK: u64 = 16;
/// Reader connections kept open between reads.
const READER_POOL: usize = 8;
/// The WAL is checkpointed (by a background thread, never in `apply`)
/// after this many commits.
const CHECKPOINT_EVERY: u64 = 64;
/// The planner's statistics are refreshed (`PRAGMA optimize`, in the
/// background) after this many commits: which index serves a list depends
/// on how many records each tenant and volume has.
const OPTIMIZE_EVERY: u64 = 4096;

/// Schema migrations: `MIGRATIONS[i]` takes the schema from version `i` to
/// `i + 1`. Only ever append.
const MIGRATIONS: &[&str] = &[
    // 1: the first SQLite catalog.
    "CREATE TABLE schema_version (
        version INTEGER PRIMARY KEY,
        applied_us INTEGER NOT NULL,
        by_version TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY NOT NULL,
        volume_id TEXT NOT NULL,
        tenant TEXT,
        status TEXT NOT NULL,
        name TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        updated_us INTEGER NOT NULL,
        size INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX snapshots_volume ON snapshots(volume_id, created_us);
    CREATE INDEX snapshots_tenant ON snapshots(tenant, created_us);
    CREATE INDEX snapshots_created ON snapshots(created_us, id);
    CREATE INDEX snapshots_created_desc ON snapshots(created_us DESC, id);
    CREATE INDEX snapshots_updated ON snapshots(updated_us, id);
    CREATE INDEX snapshots_name ON snapshots(name, id);
    CREATE INDEX snapshots_status ON snapshots(status, created_us);
    CREATE INDEX snapshots_size ON snapshots(size, id);
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY NOT NULL,
        made INTEGER NOT NULL,
        tenant TEXT,
        status TEXT NOT NULL,
        name TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        updated_us INTEGER NOT NULL,
        size INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX volumes_tenant ON volumes(tenant, created_us);
    CREATE INDEX volumes_created ON volumes(created_us, id);
    CREATE INDEX volumes_created_desc ON volumes(created_us DESC, id);
    CREATE TABLE notes (
        file TEXT PRIMARY KEY NOT NULL,
        len INTEGER NOT NULL,
        entries INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('seq', '0');",
];

#[cfg(test)]
thread_local! {
    /// Unit tests: stop `apply` at this point as a crash would.
    static CRASH_AT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
thread_local! {
    /// Unit tests: fail `apply` at this point as an I/O error would.
    static FAIL_AT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A crash (in unit tests) at `point`: `apply` stops there, undoes nothing;
/// or a failure there, which `apply` undoes.
fn crash_point(point: &'static str) -> Result<(), SqliteError> {
    #[cfg(test)]
    if CRASH_AT.with(|c| c.get()) == Some(point) {
        return Err(SqliteError::SimulatedCrash);
    }
    #[cfg(test)]
    if FAIL_AT.with(|c| c.get()) == Some(point) {
        return Err(SqliteError::Notes {
            path: PathBuf::from(point),
            source: std::io::Error::other("injected failure"),
        });
    }
    let _ = point;
    Ok(())
}

/// What the SQLite store's errors carry inside a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[cfg(test)]
    #[error("simulated crash")]
    SimulatedCrash,
    #[error("the catalog database failed")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot write the notes file {path}")]
    Notes {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move {from} aside to {to}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("cannot start the catalog's background thread")]
    Thread(#[source] std::io::Error),
    #[error("a catalog record cannot be read back")]
    Json(#[from] serde_json::Error),
    #[error("volume id {0:?} cannot be kept: it is not a valid volume id (letters, digits, '.', '-', '_', at most 64)")]
    BadVolumeId(String),
    #[error("an earlier failed save could not be undone in {0}; restart blocksnapd, which repairs the catalog from its notes")]
    Poisoned(PathBuf),
    #[error("the catalog {path} was written by a newer blocksnapd (schema version {found}; this one knows up to {known}); run the newer version, or move the catalog aside to rebuild it from the notes files")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

fn werr(e: impl Into<SqliteError>) -> StoreError {
    StoreError::Write(Box::new(e.into()))
}

fn rerr(e: impl Into<SqliteError>) -> StoreError {
    StoreError::Read(Box::new(e.into()))
}

/// Where the catalog came from when it was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenedFrom {
    /// The existing catalog database.
    Catalog,
    /// There was none (and no notes): a new, empty catalog.
    New,
    /// Migrated from the `catalog.json` of an older blocksnapd, kept as `kept_as`.
    Json { kept_as: PathBuf },
    /// Rebuilt from the notes files because of `reason`.
    Notes { reason: String },
}

/// What [`SqliteStore::open`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    pub from: OpenedFrom,
    /// Files moved out of the way (from, to); never deleted.
    pub moved_aside: Vec<(PathBuf, PathBuf)>,
    /// Records taken from notes newer than the catalog (a change whose
    /// commit a crash cut short, or a catalog that lost recent commits).
    pub replayed: usize,
    /// Notes entries of a change cut short before all of them were written: ignored.
    pub incomplete: usize,
    /// Notes lines whose checksum or contents were bad, or torn tails.
    pub bad_lines: usize,
    /// Notes files rewritten from the catalog (missing, damaged, out of date, compacted).
    pub notes_rewritten: usize,
    /// Notes files of places with no records any more, removed.
    pub notes_removed: usize,
    pub snapshots: usize,
    pub volumes: usize,
    /// Anything else an operator should know.
    pub warnings: Vec<String>,
}

impl OpenReport {
    fn new() -> OpenReport {
        OpenReport {
            from: OpenedFrom::Catalog,
            moved_aside: Vec::new(),
            replayed: 0,
            incomplete: 0,
            bad_lines: 0,
            notes_rewritten: 0,
            notes_removed: 0,
            snapshots: 0,
            volumes: 0,
            warnings: Vec::new(),
        }
    }

    /// Whether the catalog was migrated.
    pub fn migrated(&self) -> bool {
        matches!(self.from, OpenedFrom::Json { .. })
    }

    /// Whether the catalog was rebuilt from the notes files.
    pub fn rebuilt(&self) -> bool {
        matches!(self.from, OpenedFrom::Notes { .. })
    }

    /// Log the report: a warning when anything was repaired, moved or
    /// replayed, otherwise an info line.
    pub fn log(&self) {
        if self.eventful() {
            tracing::warn!("{self}");
        } else {
            tracing::info!("{self}");
        }
    }

    /// Whether anything happened an operator should hear about (log it as a warning).
    pub fn eventful(&self) -> bool {
        !matches!(self.from, OpenedFrom::Catalog | OpenedFrom::New)
            || !self.moved_aside.is_empty()
            || self.replayed > 0
            || self.incomplete > 0
            || self.bad_lines > 0
            || !self.warnings.is_empty()
    }
}

impl std::fmt::Display for OpenReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.from {
            OpenedFrom::Catalog => write!(f, "catalog opened")?,
            OpenedFrom::New => write!(f, "new catalog")?,
            OpenedFrom::Json { kept_as } => write!(
                f,
                "catalog migrated from {JSON_NAME} (kept as {})",
                kept_as.display()
            )?,
            OpenedFrom::Notes { reason } => {
                write!(f, "catalog rebuilt from the notes files ({reason})")?
            }
        }
        write!(
            f,
            ": {} snapshot(s), {} volume record(s)",
            self.snapshots, self.volumes
        )?;
        for (from, to) in &self.moved_aside {
            write!(f, "; moved {} to {}", from.display(), to.display())?;
        }
        if self.replayed > 0 {
            write!(
                f,
                "; {} record(s) replayed from notes newer than the catalog",
                self.replayed
            )?;
        }
        if self.incomplete > 0 {
            write!(
                f,
                "; {} notes entr(ies) of a change cut short ignored",
                self.incomplete
            )?;
        }
        if self.bad_lines > 0 {
            write!(f, "; {} damaged notes line(s) skipped", self.bad_lines)?;
        }
        if self.notes_rewritten > 0 || self.notes_removed > 0 {
            write!(
                f,
                "; notes files rewritten: {}, removed: {}",
                self.notes_rewritten, self.notes_removed
            )?;
        }
        for w in &self.warnings {
            write!(f, "; {w}")?;
        }
        Ok(())
    }
}

/// The catalog in SQLite with notes beside the chains.
pub struct SqliteStore {
    db_path: PathBuf,
    writer: Mutex<Writer>,
    readers: Mutex<Vec<Connection>>,
    /// Wakes the background thread that checkpoints the WAL.
    background: Option<(
        std::sync::mpsc::SyncSender<Chore>,
        std::thread::JoinHandle<()>,
    )>,
}

/// Work for the background thread.
#[derive(Clone, Copy, Debug)]
enum Chore {
    Checkpoint,
    Optimize,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.background.take() {
            // Close the channel (the writer holds the other sender).
            lock(&self.writer).chores = None;
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// The background thread: checkpoints and statistics off the apply path.
fn background(path: PathBuf, rx: std::sync::mpsc::Receiver<Chore>) {
    let conn = match open_conn(&path, false) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "cannot open the catalog for checkpoints: {e}; SQLite's own checkpoints take over"
            );
            return;
        }
    };
    while let Ok(chore) = rx.recv() {
        let r = match chore {
            Chore::Checkpoint => conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())),
            Chore::Optimize => conn.execute_batch("PRAGMA optimize"),
        };
        if let Err(e) = r {
            tracing::warn!("catalog {chore:?} failed: {e}");
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("db_path", &self.db_path)
            .finish()
    }
}

struct Writer {
    conn: Connection,
    /// The last committed change.
    seq: u64,
    /// Changes committed since the store was opened.
    commits: u64,
    chores: Option<std::sync::mpsc::SyncSender<Chore>>,
    chains: StateDir,
    volumes: StateDir,
    poisoned: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sizes as an order-preserving signed integer (SQLite's integers are i64).
fn size_key(n: u64) -> i64 {
    (n ^ (1 << 63)) as i64
}

fn valid_id(id: &str) -> bool {
    crate::config::valid_name(id)
}

fn open_conn(path: &Path, create: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let c = Connection::open_with_flags(path, flags)?;
    c.busy_timeout(Duration::from_secs(30))?;
    let mode: String = c.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "cannot use the WAL journal (journal_mode is {mode})"
            )),
        ));
    }
    c.pragma_update(None, "synchronous", "FULL")?;
    Ok(c)
}

/// Why an existing catalog database cannot be used.
enum Unusable {
    /// It is damaged: move it aside and rebuild.
    Damaged(String),
    /// Something else (I/O, permissions): stop.
    Fatal(SqliteError),
}

fn classify(e: rusqlite::Error) -> Unusable {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::NotADatabase | C::DatabaseCorrupt) => Unusable::Damaged(e.to_string()),
        _ => Unusable::Fatal(e.into()),
    }
}

fn open_checked(path: &Path) -> Result<Connection, Unusable> {
    let c = open_conn(path, false).map_err(classify)?;
    let check: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(classify)?;
    if check != "ok" {
        return Err(Unusable::Damaged(format!(
            "SQLite's quick_check found: {check}"
        )));
    }
    Ok(c)
}

fn schema_version(c: &Connection) -> rusqlite::Result<i64> {
    let has: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
        [],
        |r| r.get(0),
    )?;
    if !has {
        return Ok(0);
    }
    c.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )
}

fn migrate_schema(c: &mut Connection) -> rusqlite::Result<()> {
    let v = schema_version(c)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(v as usize) {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_us, by_version) VALUES (?1, ?2, ?3)",
            params![
                (i + 1) as i64,
                crate::util::now_micros(),
                env!("CARGO_PKG_VERSION")
            ],
        )?;
        tx.commit()?;
    }
    Ok(())
}

fn meta(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn set_meta(c: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

fn put_snapshot(c: &Connection, r: &SnapshotRecord, json: &str, seq: u64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO snapshots (id, volume_id, tenant, status, name, created_us, updated_us, size, seq, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT(id) DO UPDATE SET volume_id = excluded.volume_id, tenant = excluded.tenant,
           status = excluded.status, name = excluded.name, created_us = excluded.created_us,
           updated_us = excluded.updated_us, size = excluded.size, seq = excluded.seq,
           record = excluded.record",
    )?
    .execute(params![
        r.id.to_string(),
        r.volume_id,
        r.tenant,
        r.status.as_str(),
        r.display_name,
        r.created_us,
        r.updated_us,
        size_key(r.size_bytes),
        seq as i64,
        json
    ])?;
    Ok(())
}

fn put_volume(c: &Connection, r: &VolumeRecord, json: &str, seq: u64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO volumes (id, made, tenant, status, name, created_us, updated_us, size, seq, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT(id) DO UPDATE SET made = excluded.made, tenant = excluded.tenant,
           status = excluded.status, name = excluded.name, created_us = excluded.created_us,
           updated_us = excluded.updated_us, size = excluded.size, seq = excluded.seq,
           record = excluded.record",
    )?
    .execute(params![
        r.id,
        matches!(r.kind, VolumeKind::Made { .. }),
        r.tenant,
        r.status.as_str(),
        r.display_name,
        r.created_us,
        r.updated_us,
        size_key(r.size_bytes),
        seq as i64,
        json
    ])?;
    Ok(())
}

fn delete_snapshot(c: &Connection, id: Uuid) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM snapshots WHERE id = ?1")?
        .execute([id.to_string()])?;
    Ok(())
}

fn delete_volume(c: &Connection, id: &str) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM volumes WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// The records a notes file holds: (seq, is a volume, record JSON).
fn records_at(c: &Connection, loc: &Loc) -> rusqlite::Result<Vec<(u64, bool, String)>> {
    let mut out = Vec::new();
    let (sql, volume) = match loc {
        Loc::Chain(_) => (
            "SELECT seq, record FROM snapshots WHERE volume_id = ?1 ORDER BY created_us, id",
            false,
        ),
        Loc::Made(_) => (
            "SELECT seq, record FROM volumes WHERE id = ?1 AND made = 1",
            true,
        ),
    };
    let mut st = c.prepare_cached(sql)?;
    let rows = st.query_map([loc.id()], |r| {
        Ok((r.get::<_, i64>(0)? as u64, volume, r.get::<_, String>(1)?))
    })?;
    for r in rows {
        out.push(r?);
    }
    if let Loc::Chain(id) = loc {
        let mut st =
            c.prepare_cached("SELECT seq, record FROM volumes WHERE id = ?1 AND made = 0")?;
        if let Some(r) = st
            .query_row([id], |r| {
                Ok((r.get::<_, i64>(0)? as u64, true, r.get::<_, String>(1)?))
            })
            .optional()?
        {
            out.push(r);
        }
    }
    Ok(out)
}

fn live_count(c: &Connection, loc: &Loc) -> rusqlite::Result<u64> {
    let n: i64 = match loc {
        Loc::Chain(id) => c
            .prepare_cached(
                "SELECT (SELECT COUNT(*) FROM snapshots WHERE volume_id = ?1)
                      + (SELECT COUNT(*) FROM volumes WHERE id = ?1 AND made = 0)",
            )?
            .query_row([id], |r| r.get(0))?,
        Loc::Made(id) => c
            .prepare_cached("SELECT COUNT(*) FROM volumes WHERE id = ?1 AND made = 1")?
            .query_row([id], |r| r.get(0))?,
    };
    Ok(n as u64)
}

/// Every place that has records (and can have a notes file: a record
/// migrated with an id that cannot name a file is kept only in the catalog).
fn live_locs(c: &Connection) -> rusqlite::Result<BTreeSet<Loc>> {
    let mut out = BTreeSet::new();
    let mut st = c.prepare("SELECT DISTINCT volume_id FROM snapshots")?;
    for r in st.query_map([], |r| r.get::<_, String>(0))? {
        out.insert(Loc::Chain(r?));
    }
    let mut st = c.prepare("SELECT id, made FROM volumes")?;
    for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))? {
        let (id, made) = r?;
        out.insert(if made { Loc::Made(id) } else { Loc::Chain(id) });
    }
    out.retain(|l| valid_id(l.id()));
    Ok(out)
}

/// Some place that has records, if any.
fn any_live_loc(c: &Connection) -> rusqlite::Result<Option<Loc>> {
    Ok(live_locs(c)?.into_iter().next())
}

fn notes_row(c: &Connection, loc: &Loc) -> rusqlite::Result<Option<(u64, u64)>> {
    c.prepare_cached("SELECT len, entries FROM notes WHERE file = ?1")?
        .query_row([loc.key()], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .optional()
}

fn set_notes_row(c: &Connection, loc: &Loc, len: u64, entries: u64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO notes (file, len, entries) VALUES (?1, ?2, ?3)
         ON CONFLICT(file) DO UPDATE SET len = excluded.len, entries = excluded.entries",
    )?
    .execute(params![loc.key(), len as i64, entries as i64])?;
    Ok(())
}

fn delete_notes_row(c: &Connection, loc: &Loc) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM notes WHERE file = ?1")?
        .execute([loc.key()])?;
    Ok(())
}

fn loc_of_key(key: &str) -> Option<Loc> {
    let (dir, name) = key.split_once('/')?;
    let id = name.strip_suffix(notes::SUFFIX)?.to_string();
    match dir {
        "chains" => Some(Loc::Chain(id)),
        "volumes" => Some(Loc::Made(id)),
        _ => None,
    }
}

impl Writer {
    fn dir(&self, loc: &Loc) -> &StateDir {
        match loc {
            Loc::Chain(_) => &self.chains,
            Loc::Made(_) => &self.volumes,
        }
    }

    /// A notes file's text from the catalog as `c` sees it, and its entries.
    fn notes_text(c: &Connection, loc: &Loc, committed: u64) -> Result<(String, u64), SqliteError> {
        let recs = records_at(c, loc)?;
        let mut text = String::new();
        for (seq, volume, json) in &recs {
            text.push_str(&notes::put_line(*seq, committed, *volume, json));
        }
        // The entries this replaces may have been the only proof that the
        // last change committed.
        text.push_str(&notes::mark_line(committed));
        Ok((text, recs.len() as u64 + 1))
    }

    /// Rewrite a notes file from the catalog as `c` sees it; returns (len, entries).
    fn rewrite(
        &self,
        c: &Connection,
        loc: &Loc,
        committed: u64,
    ) -> Result<(u64, u64), SqliteError> {
        let (text, n) = Self::notes_text(c, loc, committed)?;
        let dir = self.dir(loc);
        dir.replace_atomically(&loc.file_name(), text.as_bytes())
            .map_err(|source| SqliteError::Notes {
                path: dir.join(&loc.file_name()),
                source,
            })?;
        Ok((text.len() as u64, n))
    }

    /// Rewrite many notes files at once (at open): every temporary file
    /// written, one `syncfs` instead of an fsync each, then the renames and
    /// one fsync per directory. Returns (loc, len, entries) of each.
    fn rewrite_many(
        &self,
        c: &Connection,
        locs: &[Loc],
        committed: u64,
    ) -> Result<Vec<(Loc, u64, u64)>, SqliteError> {
        let mut temps: Vec<(Loc, String, u64, u64)> = Vec::new();
        let r = (|| -> Result<(), SqliteError> {
            for loc in locs {
                let (text, n) = Self::notes_text(c, loc, committed)?;
                let dir = self.dir(loc);
                let notes_err = |source| SqliteError::Notes {
                    path: dir.join(&loc.file_name()),
                    source,
                };
                let (tmp, mut f) = dir.create_temp(&loc.file_name()).map_err(notes_err)?;
                temps.push((loc.clone(), tmp, text.len() as u64, n));
                f.write_all(text.as_bytes()).map_err(notes_err)?;
            }
            for d in [&self.chains, &self.volumes] {
                nix::unistd::syncfs(d).map_err(|e| SqliteError::Notes {
                    path: d.path().to_path_buf(),
                    source: std::io::Error::from_raw_os_error(e as i32),
                })?;
            }
            for (loc, tmp, _, _) in &temps {
                let dir = self.dir(loc);
                dir.rename(tmp, &loc.file_name())
                    .map_err(|source| SqliteError::Notes {
                        path: dir.join(&loc.file_name()),
                        source,
                    })?;
            }
            for d in [&self.chains, &self.volumes] {
                d.sync().map_err(|source| SqliteError::Notes {
                    path: d.path().to_path_buf(),
                    source,
                })?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            for (loc, tmp, _, _) in &temps {
                let _ = self.dir(loc).remove(tmp);
            }
            return Err(e);
        }
        Ok(temps
            .into_iter()
            .map(|(loc, _, len, n)| (loc, len, n))
            .collect())
    }

    /// Append a mark (change `self.seq` is committed) to `loc`'s notes.
    fn append_mark(&self, c: &Connection, loc: &Loc) -> Result<(), SqliteError> {
        let dir = self.dir(loc);
        let name = loc.file_name();
        let notes_err = |source| SqliteError::Notes {
            path: dir.join(&name),
            source,
        };
        let line = notes::mark_line(self.seq);
        let mut f = dir
            .open_nofollow(&name, OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT)
            .map_err(notes_err)?;
        let pre = f.metadata().map_err(notes_err)?.len();
        f.write_all(line.as_bytes()).map_err(notes_err)?;
        f.sync_data().map_err(notes_err)?;
        if pre == 0 {
            dir.sync().map_err(notes_err)?;
        }
        if let Some((len, entries)) = notes_row(c, loc)? {
            if len == pre {
                set_notes_row(c, loc, pre + line.len() as u64, entries + 1)?;
            }
        }
        Ok(())
    }

    /// Remove the notes files of places with no records left. First a mark
    /// goes into a file that stays (`keep`, or any place with records), so
    /// the entries removed never leave a committed change looking cut short.
    fn retire(&self, c: &Connection, empty: &[Loc], keep: Option<Loc>) -> Result<(), SqliteError> {
        let Some((last, rest)) = empty.split_last() else {
            return Ok(());
        };
        let keep = match keep {
            Some(k) => Some(k),
            None => any_live_loc(c)?,
        };
        // With nothing left anywhere, the last file to go holds the mark
        // until the others are gone.
        self.append_mark(c, keep.as_ref().unwrap_or(last))?;
        let remove = |loc: &Loc| -> Result<(), SqliteError> {
            let dir = self.dir(loc);
            dir.remove(&loc.file_name())
                .and_then(|_| dir.sync())
                .map_err(|source| SqliteError::Notes {
                    path: dir.join(&loc.file_name()),
                    source,
                })?;
            delete_notes_row(c, loc)?;
            Ok(())
        };
        for loc in rest {
            remove(loc)?;
        }
        if keep.as_ref() != Some(last) {
            remove(last)?;
        }
        Ok(())
    }

    fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(p) = &self.poisoned {
            return Err(werr(SqliteError::Poisoned(p.clone())));
        }
        // What each record ends as.
        let mut snaps: BTreeMap<Uuid, Option<&SnapshotRecord>> = BTreeMap::new();
        let mut vols: BTreeMap<&str, Option<&VolumeRecord>> = BTreeMap::new();
        for c in changes {
            match c {
                Change::PutSnapshot(r) => {
                    if !valid_id(&r.volume_id) {
                        return Err(werr(SqliteError::BadVolumeId(r.volume_id.clone())));
                    }
                    snaps.insert(r.id, Some(r));
                }
                Change::RemoveSnapshot(id) => {
                    snaps.insert(*id, None);
                }
                Change::PutVolume(r) => {
                    if !valid_id(&r.id) {
                        return Err(werr(SqliteError::BadVolumeId(r.id.clone())));
                    }
                    vols.insert(&r.id, Some(r));
                }
                Change::RemoveVolume(id) => {
                    vols.insert(id, None);
                }
            }
        }
        let seq = self.seq + 1;
        let mut appended = Vec::new();
        if let Err(e) = self.commit_change(&snaps, &vols, seq, &mut appended) {
            #[cfg(test)]
            if matches!(e, SqliteError::SimulatedCrash) {
                // A crash runs nothing after it: no undo, no more changes.
                self.poisoned = Some(PathBuf::from("simulated crash"));
                return Err(werr(e));
            }
            // The transaction is rolled back; take back the notes too.
            self.undo(&appended);
            return Err(werr(e));
        }
        self.seq = seq;
        self.commits += 1;
        if let Some(tx) = &self.chores {
            // A full queue means the chore is pending anyway.
            if self.commits % CHECKPOINT_EVERY == 0 {
                let _ = tx.try_send(Chore::Checkpoint);
            }
            if self.commits % OPTIMIZE_EVERY == 0 {
                let _ = tx.try_send(Chore::Optimize);
            }
        }
        // Tidy up: files of places without records go; files grown well
        // past their live records are compacted. Failures here lose
        // nothing (the catalog has it all; open repairs the notes).
        let touched: Vec<Loc> = appended.into_iter().map(|a| a.0).collect();
        if let Err(e) = self.tidy(&touched) {
            tracing::warn!("{}", crate::util::error_chain(&e));
        }
        Ok(())
    }

    /// One change in one transaction: the rows, the notes (appended and
    /// fsync'd, listed in `appended` as they are), the commit.
    fn commit_change(
        &self,
        snaps: &BTreeMap<Uuid, Option<&SnapshotRecord>>,
        vols: &BTreeMap<&str, Option<&VolumeRecord>>,
        seq: u64,
        appended: &mut Vec<(Loc, u64)>,
    ) -> Result<(), SqliteError> {
        let committed = self.seq;
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        // The entries by notes file: (op, payload JSON).
        let mut per_loc: BTreeMap<Loc, Vec<(&'static str, String)>> = BTreeMap::new();
        // The rows: record JSON for puts.
        let mut snap_rows: Vec<(Uuid, Option<(&SnapshotRecord, String)>)> = Vec::new();
        let mut vol_rows: Vec<(&str, Option<(&VolumeRecord, String)>)> = Vec::new();
        for (&id, fin) in snaps {
            let before: Option<String> = tx
                .prepare_cached("SELECT volume_id FROM snapshots WHERE id = ?1")?
                .query_row([id.to_string()], |r| r.get(0))
                .optional()?;
            let before = before.map(Loc::Chain);
            let removal = || ("remove_snapshot", format!("\"{id}\""));
            match fin {
                Some(r) => {
                    let json = serde_json::to_string(r)?;
                    let loc = Loc::of_snapshot(r);
                    if let Some(b) = before.filter(|b| *b != loc) {
                        per_loc.entry(b).or_default().push(removal());
                    }
                    per_loc
                        .entry(loc)
                        .or_default()
                        .push(("put_snapshot", json.clone()));
                    snap_rows.push((id, Some((r, json))));
                }
                None => {
                    if let Some(b) = before {
                        per_loc.entry(b).or_default().push(removal());
                        snap_rows.push((id, None));
                    }
                }
            }
        }
        for (&id, fin) in vols {
            let before: Option<bool> = tx
                .prepare_cached("SELECT made FROM volumes WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            let before = before.map(|made| {
                if made {
                    Loc::Made(id.to_string())
                } else {
                    Loc::Chain(id.to_string())
                }
            });
            let removal = || {
                (
                    "remove_volume",
                    serde_json::to_string(id).expect("a string"),
                )
            };
            match fin {
                Some(r) => {
                    let json = serde_json::to_string(r)?;
                    let loc = Loc::of_volume(r);
                    if let Some(b) = before.filter(|b| *b != loc) {
                        per_loc.entry(b).or_default().push(removal());
                    }
                    per_loc
                        .entry(loc)
                        .or_default()
                        .push(("put_volume", json.clone()));
                    vol_rows.push((id, Some((r, json))));
                }
                None => {
                    if let Some(b) = before {
                        per_loc.entry(b).or_default().push(removal());
                        vol_rows.push((id, None));
                    }
                }
            }
        }
        // Records migrated with an id that cannot name a file have no notes.
        per_loc.retain(|l, _| valid_id(l.id()));
        // A notes file that is not what the catalog last recorded (lost,
        // damaged, replaced) is first rewritten from the catalog.
        let mut entries_before = BTreeMap::new();
        for loc in per_loc.keys() {
            let dir = self.dir(loc);
            let name = loc.file_name();
            let st = dir.stat(&name).map_err(|source| SqliteError::Notes {
                path: dir.join(&name),
                source,
            })?;
            let row = notes_row(&tx, loc)?;
            let fine = match (&st, row) {
                (Some(st), Some((len, _))) => {
                    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
                        && st.st_size as u64 == len
                }
                (None, None) | (None, Some((0, _))) => true,
                _ => false,
            };
            let entries = if fine {
                row.map_or(0, |r| r.1)
            } else {
                let (len, entries) = self.rewrite(&tx, loc, committed)?;
                set_notes_row(&tx, loc, len, entries)?;
                entries
            };
            entries_before.insert(loc.clone(), entries);
        }
        for (id, row) in &snap_rows {
            match row {
                Some((r, json)) => put_snapshot(&tx, r, json, seq)?,
                None => delete_snapshot(&tx, *id)?,
            }
        }
        for (id, row) in &vol_rows {
            match row {
                Some((r, json)) => put_volume(&tx, r, json, seq)?,
                None => delete_volume(&tx, id)?,
            }
        }
        // The notes, durable before the commit.
        let parts: usize = per_loc.values().map(Vec::len).sum();
        let mut new_in = BTreeSet::new();
        for (loc, ops) in &per_loc {
            let mut text = String::new();
            for (op, payload) in ops {
                text.push_str(&notes::raw_line(seq, parts as u32, committed, op, payload));
            }
            let dir = self.dir(loc);
            let name = loc.file_name();
            let notes_err = |source| SqliteError::Notes {
                path: dir.join(&name),
                source,
            };
            let mut f = dir
                .open_nofollow(&name, OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT)
                .map_err(notes_err)?;
            let pre = f.metadata().map_err(notes_err)?.len();
            appended.push((loc.clone(), pre));
            if pre == 0 {
                new_in.insert(matches!(loc, Loc::Made(_)));
            }
            f.write_all(text.as_bytes()).map_err(notes_err)?;
            f.sync_data().map_err(notes_err)?;
            crash_point("after-one-notes-file")?;
            if live_count(&tx, loc)? == 0 {
                delete_notes_row(&tx, loc)?;
            } else {
                set_notes_row(
                    &tx,
                    loc,
                    pre + text.len() as u64,
                    entries_before[loc] + ops.len() as u64,
                )?;
            }
        }
        for made in new_in {
            let dir = if made { &self.volumes } else { &self.chains };
            dir.sync().map_err(|source| SqliteError::Notes {
                path: dir.path().to_path_buf(),
                source,
            })?;
        }
        set_meta(&tx, "seq", &seq.to_string())?;
        crash_point("before-commit")?;
        tx.commit()?;
        Ok(())
    }

    /// After a commit: remove the files of places the change emptied,
    /// compact files grown well past their live records.
    fn tidy(&self, touched: &[Loc]) -> Result<(), SqliteError> {
        let mut empty = Vec::new();
        let mut alive = Vec::new();
        for loc in touched {
            let live = live_count(&self.conn, loc)?;
            if live == 0 {
                empty.push(loc.clone());
            } else {
                alive.push((loc.clone(), live));
            }
        }
        self.retire(&self.conn, &empty, alive.first().map(|a| a.0.clone()))?;
        for (loc, live) in alive {
            if let Some((_, entries)) = notes_row(&self.conn, &loc)? {
                if entries > 2 * live + COMPACT_SLACK {
                    let (len, entries) = self.rewrite(&self.conn, &loc, self.seq)?;
                    set_notes_row(&self.conn, &loc, len, entries)?;
                }
            }
        }
        Ok(())
    }

    /// Take back the notes appended by a change that did not commit; if
    /// that fails, refuse further changes (a restart repairs the notes).
    fn undo(&mut self, appended: &[(Loc, u64)]) {
        for (loc, pre) in appended {
            let dir = self.dir(loc);
            let name = loc.file_name();
            let r = dir.open_nofollow(&name, OFlag::O_WRONLY).and_then(|f| {
                f.set_len(*pre)?;
                f.sync_all()
            });
            if let Err(source) = r {
                let path = dir.join(&name);
                tracing::error!(
                    "{}",
                    crate::util::error_chain(&SqliteError::Notes {
                        path: path.clone(),
                        source
                    })
                );
                self.poisoned = Some(path);
            }
        }
    }
}

/// A notes file found on disk.
struct Found {
    loc: Loc,
    bytes: Vec<u8>,
}

/// Read every notes file (regular files named `ID.notes` with a valid id)
/// in chains/ and volumes/. Anything else with that suffix (a symlink, a
/// directory) is moved to `damaged/`.
fn read_all_notes(
    state: &StateDir,
    chains: &StateDir,
    volumes: &StateDir,
    report: &mut OpenReport,
) -> Result<Vec<Found>, SqliteError> {
    let mut out = Vec::new();
    for (dir, made) in [(chains, false), (volumes, true)] {
        let names = dir.names().map_err(|source| SqliteError::ReadFile {
            path: dir.path().to_path_buf(),
            source,
        })?;
        for name in names {
            let Some(id) = name.strip_suffix(notes::SUFFIX) else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            let loc = if made {
                Loc::Made(id.to_string())
            } else {
                Loc::Chain(id.to_string())
            };
            let read_err = |source| SqliteError::ReadFile {
                path: dir.join(&name),
                source,
            };
            let regular = dir.stat(&name).map_err(read_err)?.is_some_and(|st| {
                SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
            });
            if !regular {
                move_aside(state, dir, &name, report)?;
                continue;
            }
            let mut bytes = Vec::new();
            dir.open_read(&name)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(read_err)?;
            out.push(Found { loc, bytes });
        }
    }
    Ok(out)
}

/// Move `name` in `dir` to `damaged/NAME.TIMESTAMP`, never overwriting.
fn move_aside(
    state: &StateDir,
    dir: &StateDir,
    name: &str,
    report: &mut OpenReport,
) -> Result<(), SqliteError> {
    let damaged = state.subdir("damaged")?;
    let stamp = crate::util::format_timestamp(crate::util::now_micros()).replace([':', '-'], "");
    let mut to = format!("{name}.{stamp}Z");
    let mut n = 1;
    while damaged
        .stat(&to)
        .map_err(|source| SqliteError::ReadFile {
            path: damaged.join(&to),
            source,
        })?
        .is_some()
    {
        to = format!("{name}.{stamp}Z.{n}");
        n += 1;
    }
    dir.rename_into(name, &damaged, &to)
        .and_then(|()| damaged.sync())
        .and_then(|()| dir.sync())
        .map_err(|source| SqliteError::MoveAside {
            from: dir.join(name),
            to: damaged.join(&to),
            source,
        })?;
    tracing::warn!(from = %dir.join(name).display(), to = %damaged.join(&to).display(), "moved aside");
    report.moved_aside.push((dir.join(name), damaged.join(&to)));
    Ok(())
}

/// Apply recovered record states to the catalog; returns how many.
fn apply_outcomes(c: &Connection, outcomes: &[Outcome]) -> Result<usize, SqliteError> {
    for o in outcomes {
        match o {
            Outcome::Snapshot(_, seq, Some(r)) => {
                put_snapshot(c, r, &serde_json::to_string(r)?, *seq)?
            }
            Outcome::Snapshot(id, _, None) => delete_snapshot(c, *id)?,
            Outcome::Volume(_, seq, Some(r)) => put_volume(c, r, &serde_json::to_string(r)?, *seq)?,
            Outcome::Volume(id, _, None) => delete_volume(c, id)?,
        }
    }
    Ok(outcomes.len())
}

impl SqliteStore {
    /// Open the catalog in `state` (checked with [`StateDir::open`]),
    /// creating, migrating, repairing or rebuilding it as needed; the
    /// report says which. Creates `chains/` and `volumes/` if missing.
    pub fn open(state: &StateDir) -> Result<(SqliteStore, OpenReport), StoreError> {
        let db_path = state.join(DB_NAME);
        let open_err = |e: SqliteError| StoreError::Open {
            path: db_path.clone(),
            source: Box::new(e),
        };
        let mut report = OpenReport::new();
        let chains = state.subdir("chains").map_err(|e| open_err(e.into()))?;
        let volumes = state.subdir("volumes").map_err(|e| open_err(e.into()))?;
        let (conn, damaged) = open_or_move_aside(state, &mut report).map_err(open_err)?;
        let seq: u64 = meta(&conn, "seq")
            .map_err(|e| open_err(e.into()))?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let origin = meta(&conn, "origin").map_err(|e| open_err(e.into()))?;
        let mut w = Writer {
            conn,
            seq,
            commits: 0,
            chores: None,
            chains,
            volumes,
            poisoned: None,
        };
        match origin {
            None => populate(state, &mut w, damaged, &mut report).map_err(open_err)?,
            Some(_) => {
                sync_notes(state, &mut w, false, &mut report).map_err(open_err)?;
                finish_json(state, &mut w, &mut report).map_err(open_err)?;
            }
        }
        let count = |t: &str| -> Result<usize, StoreError> {
            w.conn
                .query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as usize)
                .map_err(|e| open_err(e.into()))
        };
        report.snapshots = count("snapshots")?;
        report.volumes = count("volumes")?;
        // Statistics for the planner (a no-op when they are current), and
        // checkpoints from now on in the background.
        w.conn
            .execute_batch("PRAGMA optimize = 0x10002;")
            .map_err(|e| open_err(e.into()))?;
        w.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| open_err(e.into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let path = db_path.clone();
        let handle = std::thread::Builder::new()
            .name("catalog-checkpoint".into())
            .spawn(move || background(path, rx))
            .map_err(|e| open_err(SqliteError::Thread(e)))?;
        w.chores = Some(tx.clone());
        Ok((
            SqliteStore {
                db_path: db_path.clone(),
                writer: Mutex::new(w),
                readers: Mutex::new(Vec::new()),
                background: Some((tx, handle)),
            },
            report,
        ))
    }

    /// [`SqliteStore::open`] on the state directory at `state_dir`, checked
    /// with [`StateDir::open`] first (what `Daemon::start` wants).
    pub fn open_path(state_dir: &Path) -> Result<(SqliteStore, OpenReport), StoreError> {
        let state = StateDir::open(state_dir).map_err(|e| StoreError::Open {
            path: state_dir.join(DB_NAME),
            source: Box::new(e),
        })?;
        SqliteStore::open(&state)
    }

    /// The catalog database's path.
    pub fn path(&self) -> &Path {
        &self.db_path
    }

    fn read<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let conn = lock(&self.readers).pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = open_conn(&self.db_path, false).map_err(rerr)?;
                c.pragma_update(None, "query_only", true).map_err(rerr)?;
                c
            }
        };
        let r = {
            let tx = conn.unchecked_transaction().map_err(rerr)?;
            let r = f(&tx);
            drop(tx);
            r
        };
        let mut pool = lock(&self.readers);
        if pool.len() < READER_POOL {
            pool.push(conn);
        }
        r
    }
}

/// Open the catalog database, creating it (0600) if missing. A damaged
/// one (or anything but regular files at its names) is moved to
/// `damaged/` and a new one made; the reason comes back.
fn open_or_move_aside(
    state: &StateDir,
    report: &mut OpenReport,
) -> Result<(Connection, Option<String>), SqliteError> {
    let path = state.join(DB_NAME);
    let io = |name: &str, source| SqliteError::ReadFile {
        path: state.join(name),
        source,
    };
    let mut reason = None;
    for name in SQLITE_FILES {
        if let Some(k) = state.kind_of(name).map_err(|e| io(name, e))? {
            if k != SFlag::S_IFREG {
                reason = Some(format!(
                    "{} was not a regular file",
                    state.join(name).display()
                ));
            }
        }
    }
    if reason.is_none() {
        let exists = state
            .kind_of(DB_NAME)
            .map_err(|e| io(DB_NAME, e))?
            .is_some();
        if exists {
            match open_checked(&path) {
                Ok(mut c) => {
                    let v = schema_version(&c)?;
                    if v as usize > MIGRATIONS.len() {
                        return Err(SqliteError::TooNew {
                            path,
                            found: v,
                            known: MIGRATIONS.len(),
                        });
                    }
                    migrate_schema(&mut c)?;
                    return Ok((c, None));
                }
                Err(Unusable::Damaged(why)) => {
                    reason = Some(format!("{} is damaged: {why}", path.display()))
                }
                Err(Unusable::Fatal(e)) => return Err(e),
            }
        }
    }
    if reason.is_some() {
        for name in SQLITE_FILES {
            if state.kind_of(name).map_err(|e| io(name, e))?.is_some() {
                move_aside(state, state, name, report)?;
            }
        }
    }
    if state
        .kind_of(DB_NAME)
        .map_err(|e| io(DB_NAME, e))?
        .is_none()
    {
        // 0600 whatever the umask; SQLite gives its -wal and -shm the same mode.
        state
            .create_private_file(DB_NAME)
            .map_err(|e| io(DB_NAME, e))?;
        state.sync().map_err(|e| io(".", e))?;
    }
    let mut c = open_conn(&path, false)?;
    migrate_schema(&mut c)?;
    Ok((c, reason))
}

/// Fill a catalog that has no records yet: from `catalog.json` if there is
/// one, else from the notes files.
fn populate(
    state: &StateDir,
    w: &mut Writer,
    damaged: Option<String>,
    report: &mut OpenReport,
) -> Result<(), SqliteError> {
    let json = match state
        .kind_of(JSON_NAME)
        .map_err(|source| SqliteError::ReadFile {
            path: state.join(JSON_NAME),
            source,
        })? {
        None => None,
        Some(SFlag::S_IFREG) => {
            let mut bytes = Vec::new();
            state
                .open_read(JSON_NAME)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|source| SqliteError::ReadFile {
                    path: state.join(JSON_NAME),
                    source,
                })?;
            match serde_json::from_slice::<Catalog>(&bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    report.warnings.push(format!(
                        "{} is not valid ({e}); rebuilt from the notes and the chains instead",
                        state.join(JSON_NAME).display()
                    ));
                    move_aside(state, state, JSON_NAME, report)?;
                    None
                }
            }
        }
        Some(_) => {
            report.warnings.push(format!(
                "{} is not a regular file; not followed",
                state.join(JSON_NAME).display()
            ));
            move_aside(state, state, JSON_NAME, report)?;
            None
        }
    };
    let found = read_all_notes(state, &w.chains, &w.volumes, report)?;
    let tx = rusqlite::Transaction::new_unchecked(&w.conn, TransactionBehavior::Immediate)?;
    let seq;
    if let Some(cat) = json {
        // Notes left by a newer run (then a downgrade) are out of date:
        // number past them and rewrite them all from the migrated catalog.
        let max_seen = found
            .iter()
            .flat_map(|f| notes::parse(&f.bytes).entries)
            .map(|e| e.seq)
            .max()
            .unwrap_or(0);
        seq = max_seen + 1;
        for r in cat.snapshots.values() {
            put_snapshot(&tx, r, &serde_json::to_string(r)?, seq)?;
            if !valid_id(&r.volume_id) {
                report.warnings.push(format!(
                    "snapshot {} has volume id {:?}, which cannot name a notes file; it is kept only in the catalog",
                    r.id, r.volume_id
                ));
            }
        }
        for r in cat.volumes.values() {
            put_volume(&tx, r, &serde_json::to_string(r)?, seq)?;
            if !valid_id(&r.id) {
                report.warnings.push(format!(
                    "volume id {:?} cannot name a notes file; its record is kept only in the catalog",
                    r.id
                ));
            }
        }
        set_meta(&tx, "origin", "json")?;
        set_meta(&tx, "json_pending", "1")?;
    } else {
        let mut entries = Vec::new();
        for f in &found {
            let p = notes::parse(&f.bytes);
            report.bad_lines += p.bad_lines + usize::from(p.torn_tail > 0);
            entries.extend(p.entries);
        }
        let r = notes::recover(entries, 0);
        report.incomplete = r.incomplete;
        let puts: Vec<Outcome> = r
            .outcomes
            .into_iter()
            .filter(|o| {
                matches!(
                    o,
                    Outcome::Snapshot(_, _, Some(_)) | Outcome::Volume(_, _, Some(_))
                )
            })
            .collect();
        apply_outcomes(&tx, &puts)?;
        seq = r.max_seen.max(r.seq);
        report.from = match (damaged, found.is_empty()) {
            (Some(why), _) => OpenedFrom::Notes { reason: why },
            (None, true) => OpenedFrom::New,
            (None, false) => OpenedFrom::Notes {
                reason: format!("there was no {}", state.join(DB_NAME).display()),
            },
        };
        set_meta(
            &tx,
            "origin",
            if found.is_empty() { "new" } else { "notes" },
        )?;
    }
    set_meta(&tx, "seq", &seq.to_string())?;
    tx.commit()?;
    w.seq = seq;
    sync_notes(state, w, true, report)?;
    finish_json(state, w, report)?;
    Ok(())
}

/// After a migration from catalog.json: once the notes are written, keep
/// the old file as catalog.json.migrated.
fn finish_json(
    state: &StateDir,
    w: &mut Writer,
    report: &mut OpenReport,
) -> Result<(), SqliteError> {
    let exists = state
        .kind_of(JSON_NAME)
        .map_err(|source| SqliteError::ReadFile {
            path: state.join(JSON_NAME),
            source,
        })?
        .is_some();
    let pending = meta(&w.conn, "json_pending")?.is_some();
    if !exists {
        if pending {
            w.conn
                .execute("DELETE FROM meta WHERE key = 'json_pending'", [])?;
        }
        return Ok(());
    }
    if !pending {
        report.warnings.push(format!(
            "{} is beside the catalog database and was ignored; the catalog database is what counts",
            state.join(JSON_NAME).display()
        ));
        return Ok(());
    }
    if !matches!(report.from, OpenedFrom::Json { .. }) {
        // A migration a crash interrupted after its commit: the notes were
        // rewritten above only if asked; make sure.
        sync_notes(state, w, true, report)?;
    }
    let mut kept = format!("{JSON_NAME}.migrated");
    let mut n = 1;
    while state
        .kind_of(&kept)
        .map_err(|source| SqliteError::ReadFile {
            path: state.join(&kept),
            source,
        })?
        .is_some()
    {
        kept = format!("{JSON_NAME}.migrated.{n}");
        n += 1;
    }
    state
        .rename(JSON_NAME, &kept)
        .and_then(|()| state.sync())
        .map_err(|source| SqliteError::MoveAside {
            from: state.join(JSON_NAME),
            to: state.join(&kept),
            source,
        })?;
    w.conn
        .execute("DELETE FROM meta WHERE key = 'json_pending'", [])?;
    report.from = OpenedFrom::Json {
        kept_as: state.join(&kept),
    };
    Ok(())
}

/// Bring the notes files and the catalog in line: replay notes newer than
/// the catalog, rewrite notes files that are not what the catalog recorded
/// (or all of them, with `force`), remove those of places with no records.
fn sync_notes(
    state: &StateDir,
    w: &mut Writer,
    force: bool,
    report: &mut OpenReport,
) -> Result<(), SqliteError> {
    let rows: HashMap<String, (u64, u64)> = {
        let mut st = w.conn.prepare("SELECT file, len, entries FROM notes")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let found = read_all_notes(state, &w.chains, &w.volumes, report)?;
    let mut stale: BTreeSet<Loc> = BTreeSet::new();
    let mut on_disk: BTreeSet<Loc> = BTreeSet::new();
    let mut entries = Vec::new();
    for f in &found {
        on_disk.insert(f.loc.clone());
        let recorded = rows.get(&f.loc.key()).map_or(0, |r| r.0);
        if force || f.bytes.len() as u64 != recorded || !notes::intact(&f.bytes) {
            stale.insert(f.loc.clone());
            if !force {
                let p = notes::parse(&f.bytes);
                report.bad_lines += p.bad_lines + usize::from(p.torn_tail > 0);
                entries.extend(p.entries);
            }
        }
    }
    let tx = rusqlite::Transaction::new_unchecked(&w.conn, TransactionBehavior::Immediate)?;
    if !entries.is_empty() {
        let r = notes::recover(entries, w.seq);
        report.replayed += apply_outcomes(&tx, &r.outcomes)?;
        report.incomplete += r.incomplete;
        let seq = r.max_seen.max(r.seq).max(w.seq);
        set_meta(&tx, "seq", &seq.to_string())?;
        w.seq = seq;
    }
    let live = live_locs(&tx)?;
    let mut all: BTreeSet<Loc> = live.clone();
    all.extend(on_disk.iter().cloned());
    all.extend(rows.keys().filter_map(|k| loc_of_key(k)));
    let mut to_rewrite = Vec::new();
    let mut empty = Vec::new();
    for loc in &all {
        let key = loc.key();
        if live.contains(loc) {
            if force || stale.contains(loc) || !on_disk.contains(loc) || !rows.contains_key(&key) {
                to_rewrite.push(loc.clone());
            }
        } else if on_disk.contains(loc) {
            empty.push(loc.clone());
            report.notes_removed += 1;
        } else if rows.contains_key(&key) {
            delete_notes_row(&tx, loc)?;
        }
    }
    for (loc, len, n) in w.rewrite_many(&tx, &to_rewrite, w.seq)? {
        set_notes_row(&tx, &loc, len, n)?;
        report.notes_rewritten += 1;
    }
    let rewritten = to_rewrite.first().cloned();
    w.retire(&tx, &empty, rewritten)?;
    tx.commit()?;
    for d in [&w.chains, &w.volumes] {
        d.sync().map_err(|source| SqliteError::Notes {
            path: d.path().to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

// ---- reads ----

fn sort_column(k: SortKey) -> &'static str {
    match k {
        SortKey::CreatedAt => "created_us",
        SortKey::UpdatedAt => "updated_us",
        SortKey::Id => "id",
        SortKey::Name => "name",
        SortKey::Status => "status",
        SortKey::Size => "size",
    }
}

/// One page of `table` under `filters` (SQL with `?` and their values).
fn list(
    c: &Connection,
    table: &str,
    filters: Vec<(String, Vec<Value>)>,
    page: &Page,
    marker: Option<Option<String>>,
) -> Result<Vec<String>, StoreError> {
    let mut wh: Vec<String> = Vec::new();
    let mut vals: Vec<Value> = Vec::new();
    for (sql, v) in filters {
        wh.push(sql);
        vals.extend(v);
    }
    let cols: Vec<(&str, SortDir)> = page
        .sort
        .iter()
        .map(|&(k, d)| (sort_column(k), d))
        .chain(std::iter::once(("id", SortDir::Asc)))
        .collect();
    if let Some(m) = marker {
        // The marker's own sort values, under the same filters.
        let Some(m_id) = m else {
            return Err(StoreError::UnknownMarker(
                page.marker.clone().unwrap_or_default(),
            ));
        };
        let sel: Vec<&str> = cols.iter().map(|c| c.0).collect();
        let mut w2 = wh.clone();
        w2.push("id = ?".into());
        let mut v2 = vals.clone();
        v2.push(Value::Text(m_id));
        let sql = format!(
            "SELECT {} FROM {table} WHERE {}",
            sel.join(", "),
            w2.join(" AND ")
        );
        let at: Option<Vec<Value>> = c
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_row(rusqlite::params_from_iter(v2), |r| {
                    (0..sel.len()).map(|i| r.get::<_, Value>(i)).collect()
                })
                .optional()
            })
            .map_err(rerr)?;
        let Some(at) = at else {
            return Err(StoreError::UnknownMarker(
                page.marker.clone().unwrap_or_default(),
            ));
        };
        // After the marker in this order: the first key that differs
        // decides.
        let mut ors = Vec::new();
        for i in 0..cols.len() {
            let mut ands = Vec::new();
            for (j, col) in cols.iter().enumerate().take(i) {
                ands.push(format!("{} = ?", col.0));
                vals.push(at[j].clone());
            }
            let op = match cols[i].1 {
                SortDir::Asc => ">",
                SortDir::Desc => "<",
            };
            ands.push(format!("{} {op} ?", cols[i].0));
            vals.push(at[i].clone());
            ors.push(format!("({})", ands.join(" AND ")));
        }
        wh.push(format!("({})", ors.join(" OR ")));
        // The same bound on the first key alone, so an index on it can
        // start at the marker instead of filtering from the first row.
        let op = match cols[0].1 {
            SortDir::Asc => ">=",
            SortDir::Desc => "<=",
        };
        wh.push(format!("{} {op} ?", cols[0].0));
        vals.push(at[0].clone());
    }
    let order: Vec<String> = cols
        .iter()
        .map(|(c, d)| {
            format!(
                "{c} {}",
                match d {
                    SortDir::Asc => "ASC",
                    SortDir::Desc => "DESC",
                }
            )
        })
        .collect();
    let sql = format!(
        "SELECT record FROM {table}{} ORDER BY {} LIMIT ? OFFSET ?",
        if wh.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", wh.join(" AND "))
        },
        order.join(", ")
    );
    vals.push(Value::Integer(i64::try_from(page.limit).unwrap_or(-1)));
    vals.push(Value::Integer(
        i64::try_from(page.offset).unwrap_or(i64::MAX),
    ));
    let mut st = c.prepare_cached(&sql).map_err(rerr)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(vals), |r| r.get::<_, String>(0))
        .map_err(rerr)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(rerr)
}

fn common_filters(
    tenant: &Option<String>,
    status: &Option<String>,
    name: &Option<String>,
) -> Vec<(String, Vec<Value>)> {
    let mut f = Vec::new();
    if let Some(t) = tenant {
        f.push((
            "(tenant = ? OR tenant IS NULL)".to_string(),
            vec![Value::Text(t.clone())],
        ));
    }
    if let Some(s) = status {
        f.push(("status = ?".to_string(), vec![Value::Text(s.clone())]));
    }
    if let Some(n) = name {
        f.push(("name = ?".to_string(), vec![Value::Text(n.clone())]));
    }
    f
}

impl Store for SqliteStore {
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        lock(&self.writer).apply(changes)
    }

    fn snapshot(&self, id: Uuid) -> Result<Option<SnapshotRecord>, StoreError> {
        self.read(|c| {
            let json: Option<String> = c
                .prepare_cached("SELECT record FROM snapshots WHERE id = ?1")
                .and_then(|mut st| st.query_row([id.to_string()], |r| r.get(0)).optional())
                .map_err(rerr)?;
            json.map(|j| serde_json::from_str(&j).map_err(rerr))
                .transpose()
        })
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut f = common_filters(&q.tenant, &q.status, &q.name);
        if let Some(vs) = &q.volumes {
            if vs.is_empty() {
                f.push(("0".to_string(), vec![]));
            } else {
                f.push((
                    format!("volume_id IN ({})", vec!["?"; vs.len()].join(", ")),
                    vs.iter().map(|v| Value::Text(v.clone())).collect(),
                ));
            }
        }
        if let Some(v) = &q.volume_id {
            f.push(("volume_id = ?".to_string(), vec![Value::Text(v.clone())]));
        }
        let marker = q
            .page
            .marker
            .as_ref()
            .map(|m| Uuid::parse_str(m).ok().map(|u| u.to_string()));
        self.read(|c| {
            list(c, "snapshots", f, &q.page, marker)?
                .iter()
                .map(|j| serde_json::from_str(j).map_err(rerr))
                .collect()
        })
    }

    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        self.read(|c| {
            let json: Option<String> = c
                .prepare_cached("SELECT record FROM volumes WHERE id = ?1")
                .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
                .map_err(rerr)?;
            json.map(|j| serde_json::from_str(&j).map_err(rerr))
                .transpose()
        })
    }

    fn volumes(&self, q: &VolumeQuery) -> Result<Vec<VolumeRecord>, StoreError> {
        let f = common_filters(&q.tenant, &q.status, &q.name);
        let marker = q.page.marker.clone().map(Some);
        self.read(|c| {
            list(c, "volumes", f, &q.page, marker)?
                .iter()
                .map(|j| serde_json::from_str(j).map_err(rerr))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::catalog::{SnapStatus, VolStatus};

    fn snap(n: u128, vol: &str, name: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: Uuid::from_u128(n),
            volume_id: vol.into(),
            tenant: Some("acct".into()),
            status: SnapStatus::Available,
            display_name: name.into(),
            display_description: "d".into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
            created_us: n as i64,
            updated_us: 0,
            size_bytes: 1 << 30,
            error: None,
            changed_bytes: 1,
            stored_bytes: 2,
            freeze_ms: 0.25,
            // A scheduled one's mark round-trips (a field with a serde
            // default: no migration).
            scheduled_us: (n % 2 == 0).then_some(n as i64 + 7),
        }
    }

    fn made(id: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            kind: VolumeKind::Made {
                image: PathBuf::from(format!("/x/volumes/{id}.img")),
                device: Some(PathBuf::from("/dev/loop9")),
                snapshot_id: Some(Uuid::from_u128(1)),
            },
            tenant: Some("acct".into()),
            status: VolStatus::Available,
            display_name: name.into(),
            display_description: String::new(),
            metadata: Default::default(),
            created_us: 5,
            updated_us: 6,
            size_bytes: 1 << 30,
            error: None,
        }
    }

    struct T {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl T {
        fn new() -> T {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state");
            T { _dir: dir, path }
        }
        fn open(&self) -> (SqliteStore, OpenReport) {
            SqliteStore::open(&StateDir::open(&self.path).unwrap()).unwrap()
        }
        fn lose_catalog(&self) {
            for n in SQLITE_FILES {
                let _ = std::fs::remove_file(self.path.join(n));
            }
        }
        fn names(&self, s: &SqliteStore) -> Vec<String> {
            let mut v: Vec<String> = s
                .snapshots(&SnapshotQuery::default())
                .unwrap()
                .into_iter()
                .map(|r| r.display_name)
                .collect();
            v.extend(
                s.volumes(&VolumeQuery::default())
                    .unwrap()
                    .into_iter()
                    .map(|r| format!("vol:{}", r.display_name)),
            );
            v.sort();
            v
        }
    }

    fn pair(n: u128, name: &str) -> Vec<Change> {
        vec![
            Change::PutSnapshot(snap(n, "v", name)),
            Change::PutVolume(made(&format!("m{n}"), name)),
        ]
    }

    #[test]
    fn a_crash_before_the_commit_is_replayed_whole() {
        let t = T::new();
        let (s, r) = t.open();
        assert_eq!(r.from, OpenedFrom::New);
        s.apply(&pair(1, "a")).unwrap();
        CRASH_AT.with(|c| c.set(Some("before-commit")));
        assert!(s.apply(&pair(2, "b")).is_err());
        CRASH_AT.with(|c| c.set(None));
        assert_eq!(t.names(&s), ["a", "vol:a"], "not committed");
        drop(s);
        let (s, r) = t.open();
        assert_eq!(r.from, OpenedFrom::Catalog);
        assert_eq!(r.replayed, 2, "{r}");
        assert_eq!(t.names(&s), ["a", "b", "vol:a", "vol:b"]);
        s.apply(&pair(3, "c")).unwrap();
        drop(s);
        t.lose_catalog();
        let (s, r) = t.open();
        assert!(r.rebuilt(), "{r}");
        assert_eq!(t.names(&s), ["a", "b", "c", "vol:a", "vol:b", "vol:c"]);
    }

    #[test]
    fn a_crash_between_notes_files_leaves_nothing_of_the_change() {
        let t = T::new();
        let (s, _) = t.open();
        s.apply(&pair(1, "a")).unwrap();
        CRASH_AT.with(|c| c.set(Some("after-one-notes-file")));
        assert!(s.apply(&pair(2, "b")).is_err());
        CRASH_AT.with(|c| c.set(None));
        drop(s);
        let (s, r) = t.open();
        assert_eq!(r.replayed, 0, "{r}");
        assert_eq!(r.incomplete, 1, "{r}");
        assert_eq!(t.names(&s), ["a", "vol:a"]);
        drop(s);
        // The half change is gone from the notes too: a rebuild agrees.
        t.lose_catalog();
        let (s, r) = t.open();
        assert!(r.rebuilt());
        assert_eq!(r.incomplete, 0, "{r}");
        assert_eq!(t.names(&s), ["a", "vol:a"]);
        // And the same half change while rebuilding (catalog lost at the
        // crash) is not taken either.
        CRASH_AT.with(|c| c.set(Some("after-one-notes-file")));
        assert!(s.apply(&pair(3, "c")).is_err());
        CRASH_AT.with(|c| c.set(None));
        drop(s);
        t.lose_catalog();
        let (s, r) = t.open();
        assert_eq!(r.incomplete, 1, "{r}");
        assert_eq!(t.names(&s), ["a", "vol:a"]);
    }

    #[test]
    fn a_failed_apply_leaves_no_trace() {
        let t = T::new();
        let (s, _) = t.open();
        s.apply(&pair(1, "a")).unwrap();
        let notes = t.path.join("chains/v.notes");
        let before = std::fs::read(&notes).unwrap();
        FAIL_AT.with(|c| c.set(Some("after-one-notes-file")));
        let e = s.apply(&pair(2, "b")).unwrap_err();
        FAIL_AT.with(|c| c.set(None));
        assert!(matches!(e, StoreError::Write(_)), "{e}");
        assert_eq!(
            std::fs::read(&notes).unwrap(),
            before,
            "appended notes taken back"
        );
        assert_eq!(t.names(&s), ["a", "vol:a"]);
        // Still usable.
        s.apply(&pair(3, "c")).unwrap();
        // A real failure: a directory where the made volume's notes go.
        std::fs::create_dir_all(t.path.join("volumes/m4.notes/x")).unwrap();
        assert!(s.apply(&pair(4, "d")).is_err());
        std::fs::remove_dir_all(t.path.join("volumes/m4.notes")).unwrap();
        assert_eq!(t.names(&s), ["a", "c", "vol:a", "vol:c"]);
        drop(s);
        let (s, r) = t.open();
        assert_eq!(r.replayed, 0, "{r}");
        assert_eq!(t.names(&s), ["a", "c", "vol:a", "vol:c"]);
        drop(s);
        t.lose_catalog();
        let (s, _) = t.open();
        assert_eq!(t.names(&s), ["a", "c", "vol:a", "vol:c"]);
    }

    #[test]
    fn notes_stay_small_and_go_with_their_records() {
        let t = T::new();
        let (s, _) = t.open();
        s.apply(&[Change::PutSnapshot(snap(1, "v", "x"))]).unwrap();
        for i in 0..200 {
            s.apply(&[Change::PutSnapshot(snap(2, "v", &format!("r{i}")))])
                .unwrap();
        }
        let lines = std::fs::read_to_string(t.path.join("chains/v.notes"))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * 2 + COMPACT_SLACK as usize + 1, "{lines} lines");
        s.apply(&[Change::RemoveSnapshot(Uuid::from_u128(1))])
            .unwrap();
        s.apply(&[Change::RemoveSnapshot(Uuid::from_u128(2))])
            .unwrap();
        assert!(!t.path.join("chains/v.notes").exists());
        s.apply(&[Change::PutSnapshot(snap(3, "v", "last"))])
            .unwrap();
        drop(s);
        t.lose_catalog();
        let (s, _) = t.open();
        assert_eq!(t.names(&s), ["last"]);
    }

    #[test]
    fn lost_or_damaged_notes_are_rewritten_from_the_catalog() {
        let t = T::new();
        let (s, _) = t.open();
        s.apply(&pair(1, "a")).unwrap();
        s.apply(&pair(2, "b")).unwrap();
        // Lost while running: the next change first restores the file.
        std::fs::remove_file(t.path.join("chains/v.notes")).unwrap();
        s.apply(&[Change::PutSnapshot(snap(3, "v", "c"))]).unwrap();
        drop(s);
        // Damaged while stopped: open rewrites it.
        let p = t.path.join("volumes/m1.notes");
        let mut b = std::fs::read(&p).unwrap();
        b[12] ^= 0x20;
        std::fs::write(&p, b).unwrap();
        let (s, r) = t.open();
        assert_eq!(r.notes_rewritten, 1, "{r}");
        assert_eq!(r.bad_lines, 1, "{r}");
        drop(s);
        t.lose_catalog();
        let (s, _) = t.open();
        assert_eq!(t.names(&s), ["a", "b", "c", "vol:a", "vol:b"]);
    }

    #[test]
    fn a_catalog_that_lost_recent_commits_gets_them_back_from_the_notes() {
        let t = T::new();
        let (s, _) = t.open();
        s.apply(&pair(1, "a")).unwrap();
        drop(s);
        let old = std::fs::read(t.path.join(DB_NAME)).unwrap();
        let (s, _) = t.open();
        s.apply(&pair(2, "b")).unwrap();
        s.apply(&[Change::RemoveSnapshot(Uuid::from_u128(1))])
            .unwrap();
        s.apply(&[Change::PutSnapshot(snap(2, "v", "b2"))]).unwrap();
        drop(s);
        // An old copy of the catalog comes back (a restored backup, a lost WAL).
        t.lose_catalog();
        std::fs::write(t.path.join(DB_NAME), old).unwrap();
        let (s, r) = t.open();
        assert_eq!(r.from, OpenedFrom::Catalog);
        assert!(r.replayed >= 3, "{r}");
        assert_eq!(t.names(&s), ["b2", "vol:a", "vol:b"]);
    }

    #[test]
    fn a_migrated_id_that_cannot_name_a_file_stays_in_the_catalog_only() {
        let t = T::new();
        std::fs::create_dir_all(&t.path).unwrap();
        let mut cat = Catalog::default();
        let odd = snap(1, "bad id/..", "odd");
        let fine = snap(2, "v", "fine");
        cat.snapshots.insert(odd.id, odd.clone());
        cat.snapshots.insert(fine.id, fine);
        std::fs::write(t.path.join(JSON_NAME), serde_json::to_vec(&cat).unwrap()).unwrap();
        let (s, r) = t.open();
        assert!(r.migrated(), "{r}");
        assert!(r.warnings.iter().any(|w| w.contains("bad id")), "{r}");
        assert_eq!(t.names(&s), ["fine", "odd"]);
        // It can still be changed and removed; new records with such ids are refused.
        s.apply(&[Change::RemoveSnapshot(odd.id)]).unwrap();
        assert!(s.apply(&[Change::PutSnapshot(odd)]).is_err());
        drop(s);
        let (s, r) = t.open();
        assert_eq!(r.from, OpenedFrom::Catalog, "{r}");
        assert_eq!(t.names(&s), ["fine"]);
    }

    #[test]
    fn a_catalog_from_a_newer_version_is_refused_untouched() {
        let t = T::new();
        let (s, _) = t.open();
        drop(s);
        let c = Connection::open(t.path.join(DB_NAME)).unwrap();
        c.execute(
            "INSERT INTO schema_version (version, applied_us, by_version) VALUES (99, 0, 'x')",
            [],
        )
        .unwrap();
        drop(c);
        let e = SqliteStore::open(&StateDir::open(&t.path).unwrap()).unwrap_err();
        assert!(
            crate::util::error_chain(&e).contains("newer blocksnapd"),
            "{e}"
        );
        assert!(t.path.join(DB_NAME).exists());
        assert!(!t.path.join("damaged").exists());
    }
}
