//! A volume's snapshot chain: one append-only file of segments.
//!
//! Opening a chain walks its segments, cuts (or, read-only, ignores) a torn
//! tail left by a crash, notes damage, and works out which snapshots are live.
//! [`Chain::resolve`] turns a snapshot into the list of extents that make up
//! its image, newest segment first.

pub mod delete;
pub mod format;
mod open;
pub mod read;
mod resolve;
pub mod restore;
pub mod verify;
pub mod writer;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use uuid::Uuid;

use format::*;

pub(crate) use resolve::Bitmap;
pub use resolve::{Origin, Plan, PrintCursor, Records, Run};

/// Errors of the chain layer.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("cannot open chain file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("chain file {path} is in use by another blocksnap process (a take or delete is running); try again when it ends")]
    Busy { path: PathBuf },
    #[error("chain file {path} is damaged ({detail}); run `blocksnap chain verify {path}` and restore what you need into a new chain")]
    Damaged { path: PathBuf, detail: String },
    #[error("no snapshot {id} in chain {path} (see `blocksnap chain list {path}`)")]
    UnknownSnapshot { path: PathBuf, id: String },
    #[error("snapshot {id} in chain {path} is damaged: {detail}")]
    SnapshotDamaged {
        path: PathBuf,
        id: Uuid,
        detail: String,
    },
    #[error("chain {path} uses {chain} byte blocks, not {requested}; use --block-size {chain} or a new chain file")]
    BlockSize {
        path: PathBuf,
        chain: u32,
        requested: u32,
    },
    #[error("cannot read chain file {path} at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot write chain file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ChainError {
    /// Whether the underlying cause is a full disk.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ChainError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT))
    }
}

/// How to open a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read only; a torn tail is ignored, not cut. Takes no lock.
    Read,
    /// Read and write, holding the chain's exclusive lock; a torn tail is cut.
    Write,
}

/// One segment as found in the file.
#[derive(Debug)]
pub struct Segment {
    pub info: SegInfo,
    /// From the commit record; `None` when it is damaged.
    pub stats: Option<SegStats>,
    /// From the meta area; `None` when it (or the commit record) is damaged.
    pub meta: Option<SegMeta>,
    pub footer_ok: bool,
    extents: OnceLock<Result<Arc<IndexExtents>, String>>,
}

impl Segment {
    /// Whether every structural part checked out on open.
    pub fn is_intact(&self) -> bool {
        self.stats.is_some() && self.meta.is_some() && self.footer_ok
    }
}

/// A live snapshot of the chain.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub id: Uuid,
    pub seq: u64,
    /// Index into [`Chain::segments`] of the segment that defines it.
    pub segment: usize,
    pub name: String,
    pub description: String,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub created_us: i64,
    pub device_size: u64,
    pub changed_bytes: u64,
    pub zero_bytes: u64,
    pub stored_bytes: u64,
    pub freeze_us: u64,
    pub scan_us: u64,
    pub full: bool,
    pub source: SourceId,
    pub source_path: String,
    /// How it was taken (tracked or full scan, rounds, blocks re-read while
    /// quiesced); `None` for snapshots taken before the record existed.
    pub take: Option<TakeRecord>,
    /// Set when the defining segment's header, meta or footer is damaged.
    pub damaged: Option<String>,
}

/// Damage found while opening.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub detail: String,
}

/// An open chain file.
#[derive(Debug)]
pub struct Chain {
    path: PathBuf,
    file: File,
    access: Access,
    header: FileHeader,
    segments: Vec<Segment>,
    /// End of the last segment: where the next one goes.
    end: u64,
    /// Bytes after `end` that are not a committed segment (read-only opens).
    torn_tail: u64,
    damage: Vec<Damage>,
    snapshots: Vec<Snapshot>,
    /// The exclusive lock of a writer.
    _lock: Option<nix::fcntl::Flock<File>>,
    /// A second open of the same file for reading index records: reads
    /// there do not disturb the kernel's read-ahead of the data reads
    /// through `file` (read-ahead state is per open file).
    records_file: OnceLock<Option<File>>,
}

impl Chain {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The file to read index records through (see `records_file`); the
    /// chain's own file if it cannot be opened again.
    pub(crate) fn records_file(&self) -> &File {
        self.records_file
            .get_or_init(|| {
                use std::os::fd::AsRawFd;
                File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd())).ok()
            })
            .as_ref()
            .unwrap_or(&self.file)
    }
    pub fn header(&self) -> &FileHeader {
        &self.header
    }
    pub fn chain_id(&self) -> Uuid {
        self.header.chain_id
    }
    pub fn block_size(&self) -> u32 {
        self.header.block_size
    }
    pub fn seed(&self) -> u64 {
        self.header.seed
    }
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
    pub fn end(&self) -> u64 {
        self.end
    }
    pub fn access(&self) -> Access {
        self.access
    }
    /// Bytes after the last committed segment that were ignored (read-only).
    pub fn torn_tail(&self) -> u64 {
        self.torn_tail
    }
    pub fn damage(&self) -> &[Damage] {
        &self.damage
    }
    /// Live snapshots, oldest first.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }
    pub fn newest(&self) -> Option<&Snapshot> {
        self.snapshots.last()
    }
    pub fn next_seq(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.info.seq)
            .max()
            .map_or(1, |s| s + 1)
    }

    /// Find a live snapshot by id (or a unique prefix of at least 8 characters).
    pub fn find(&self, id: &str) -> Result<&Snapshot, ChainError> {
        let unknown = || ChainError::UnknownSnapshot {
            path: self.path.clone(),
            id: id.to_string(),
        };
        if let Ok(u) = Uuid::parse_str(id) {
            return self
                .snapshots
                .iter()
                .find(|s| s.id == u)
                .ok_or_else(unknown);
        }
        let lower = id.to_ascii_lowercase();
        if lower.len() < 8 {
            return Err(unknown());
        }
        let mut hits = self
            .snapshots
            .iter()
            .filter(|s| s.id.to_string().starts_with(&lower));
        match (hits.next(), hits.next()) {
            (Some(s), None) => Ok(s),
            _ => Err(unknown()),
        }
    }
}

/// Where the fingerprint side file of a chain lives.
pub fn side_file(chain: &Path) -> PathBuf {
    let mut name = chain.file_name().unwrap_or_default().to_os_string();
    name.push(".fpmap");
    chain.with_file_name(name)
}
