//! A volume's snapshot chain: one append-only file of segments.
//!
//! Opening a chain walks its segments, cuts (or, read-only, ignores) a torn
//! tail left by a crash, notes damage, and works out which snapshots are live.
//! [`Chain::resolve`] turns a snapshot into the list of extents that make up
//! its image, newest segment first.

pub mod delete;
pub mod format;
pub mod restore;
pub mod verify;
pub mod writer;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use uuid::Uuid;

use crate::fingerprint::{FingerprintMap, ZeroPrints};
use crate::sys;
use format::*;

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
    index: OnceLock<Result<Arc<Index>, String>>,
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
    /// Set when the defining segment's header, meta or footer is damaged.
    pub damaged: Option<String>,
}

/// Where one run of a snapshot's image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Zero,
    /// Stored bytes at `offset` in the chain file; `segment` and `meta` locate
    /// the per-block crc32s and fingerprints in that segment's index.
    Data {
        offset: u64,
        segment: usize,
        meta: u32,
    },
}

/// A run of blocks of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub block: u64,
    pub count: u64,
    pub source: Source,
}

/// How to build the image of one snapshot: runs sorted by block, covering
/// every block exactly once.
#[derive(Debug)]
pub struct Plan {
    pub snapshot: Snapshot,
    pub block_size: u32,
    pub runs: Vec<Run>,
    indexes: HashMap<usize, Arc<Index>>,
}

impl Plan {
    pub fn device_size(&self) -> u64 {
        self.snapshot.device_size
    }

    /// Bytes of block `block` in the image (the last block may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let bs = self.block_size as u64;
        (self.device_size() - block * bs).min(bs)
    }

    /// crc32 and fingerprint of a stored block.
    pub fn block_check(&self, segment: usize, meta: u32) -> (u32, u64) {
        let idx = &self.indexes[&segment];
        (idx.crcs[meta as usize], idx.prints[meta as usize])
    }

    /// The fingerprint of every block of the image.
    pub fn fingerprints(&self, seed: u64) -> Vec<u64> {
        let bs = self.block_size as u64;
        let n = self.device_size().div_ceil(bs);
        let zero = ZeroPrints::new(seed, self.block_size as usize);
        let mut out = vec![0u64; n as usize];
        for r in &self.runs {
            for i in 0..r.count {
                let b = r.block + i;
                out[b as usize] = match r.source {
                    Source::Zero => zero.get(self.block_len(b) as usize),
                    Source::Data { segment, meta, .. } => {
                        self.indexes[&segment].prints[meta as usize + i as usize]
                    }
                };
            }
        }
        out
    }
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
}

impl Chain {
    /// Open an existing chain.
    pub fn open(path: &Path, access: Access) -> Result<Chain, ChainError> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::Write)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ChainError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let guard = match access {
            Access::Write => Some(lock(&file, path)?),
            Access::Read => None,
        };
        Chain::load(path, file, access, guard)
    }

    /// Open the chain at `path` for writing, creating it if it does not exist
    /// with `block_size` (or the default). An existing chain must have the
    /// requested block size, if one is given.
    pub fn open_or_create(path: &Path, block_size: Option<u32>) -> Result<Chain, ChainError> {
        let requested = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        check_block_size(requested).map_err(|source| ChainError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let open_err = |source| ChainError::Open {
            path: path.to_path_buf(),
            source,
        };
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => {
                let guard = lock(&file, path)?;
                let header = FileHeader {
                    version: VERSION,
                    chain_id: Uuid::new_v4(),
                    block_size: requested,
                    seed: rand::random(),
                    created_us: crate::util::now_micros(),
                };
                let write_err = |source| ChainError::Write {
                    path: path.to_path_buf(),
                    source,
                };
                sys::pwrite_full(file.as_fd(), &header.encode(), 0).map_err(write_err)?;
                file.sync_all().map_err(write_err)?;
                crate::util::sync_parent(path).map_err(write_err)?;
                Chain::load(path, file, Access::Write, Some(guard))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let chain = Chain::open(path, Access::Write)?;
                match block_size {
                    Some(bs) if bs != chain.header.block_size => Err(ChainError::BlockSize {
                        path: path.to_path_buf(),
                        chain: chain.header.block_size,
                        requested: bs,
                    }),
                    _ => Ok(chain),
                }
            }
            Err(e) => Err(open_err(e)),
        }
    }

    fn read_err(&self, offset: u64) -> impl FnOnce(io::Error) -> ChainError + '_ {
        move |source| ChainError::Read {
            path: self.path.clone(),
            offset,
            source,
        }
    }

    fn load(
        path: &Path,
        file: File,
        access: Access,
        guard: Option<nix::fcntl::Flock<File>>,
    ) -> Result<Chain, ChainError> {
        let file_len = file
            .metadata()
            .map_err(|source| ChainError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut first = vec![0u8; FILE_HEADER_LEN as usize];
        let n =
            sys::pread_full(file.as_fd(), &mut first, 0).map_err(|source| ChainError::Read {
                path: path.to_path_buf(),
                offset: 0,
                source,
            })?;
        if n == 0 && access == Access::Write {
            // An empty file: a chain whose creation was interrupted before its
            // header was written. Only ever created by us with O_EXCL.
            return Err(ChainError::Format {
                path: path.to_path_buf(),
                source: FormatError::WrongMagic,
            });
        }
        let mut damage = Vec::new();
        let header = match FileHeader::decode(&first[..n]) {
            Ok(h) => h,
            // The magic is right but the header does not check out: every
            // segment repeats what it holds, so recover it from the first.
            Err(FormatError::HeaderChecksum) => {
                let recovered = recover_header(&file).ok_or_else(|| ChainError::Format {
                    path: path.to_path_buf(),
                    source: FormatError::HeaderChecksum,
                })?;
                damage.push(Damage {
                    offset: 0,
                    detail: "the file header is damaged (recovered from the first segment)"
                        .to_string(),
                });
                recovered
            }
            Err(source) => {
                return Err(ChainError::Format {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        check_block_size(header.block_size).map_err(|source| ChainError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let mut chain = Chain {
            path: path.to_path_buf(),
            file,
            access,
            header,
            segments: Vec::new(),
            end: FILE_HEADER_LEN,
            torn_tail: 0,
            damage,
            snapshots: Vec::new(),
            _lock: guard,
        };
        chain.walk(file_len)?;
        if access == Access::Write {
            if !chain.damage.is_empty() {
                return Err(ChainError::Damaged {
                    path: chain.path.clone(),
                    detail: chain.damage[0].detail.clone(),
                });
            }
            if chain.torn_tail > 0 {
                tracing::warn!(
                    chain = %chain.path.display(),
                    offset = chain.end,
                    bytes = chain.torn_tail,
                    "cutting off an incomplete segment left by an interrupted take or delete"
                );
                chain.truncate_tail()?;
            }
        }
        chain.compute_live()?;
        Ok(chain)
    }

    /// Cut the file back to the end of the last committed segment.
    pub(crate) fn truncate_tail(&mut self) -> Result<(), ChainError> {
        let werr = |source| ChainError::Write {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(self.end).map_err(werr)?;
        self.file.sync_all().map_err(|source| ChainError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.torn_tail = 0;
        Ok(())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, ChainError> {
        sys::pread_full(self.file.as_fd(), buf, offset).map_err(self.read_err(offset))
    }

    fn read_footer(&self, seg_end: u64) -> Result<Option<SegInfo>, ChainError> {
        if seg_end < FILE_HEADER_LEN + FOOTER_LEN {
            return Ok(None);
        }
        let mut b = vec![0u8; FOOTER_LEN as usize];
        let n = self.read_exact_at(&mut b, seg_end - FOOTER_LEN)?;
        if n != b.len() {
            return Ok(None);
        }
        Ok(decode_footer(&b).filter(|f| f.end() == seg_end && f.chain_id == self.header.chain_id))
    }

    /// Read the segment whose commit record is at `pos`, if committed.
    fn read_segment_at(&self, pos: u64, file_len: u64) -> Result<At, ChainError> {
        let mut c = vec![0u8; COMMIT_LEN];
        let n = self.read_exact_at(&mut c, pos)?;
        if n < COMMIT_LEN {
            // The file ends inside the commit record: cut short.
            return Ok(At::Truncated);
        }
        match decode_commit(&c) {
            Commit::Zero => Ok(At::Uncommitted),
            Commit::Newer(v) => Err(ChainError::Format {
                path: self.path.clone(),
                source: FormatError::NewerVersion { found: v },
            }),
            Commit::Damaged => Ok(At::Damaged),
            Commit::Valid {
                info,
                stats,
                meta_len,
                meta_crc,
            } => {
                if info.start != pos || info.chain_id != self.header.chain_id {
                    return Ok(At::Damaged);
                }
                if info.end() > file_len {
                    // Committed, but the file was cut short after the fact.
                    return Ok(At::Truncated);
                }
                let mut mb = vec![0u8; meta_len as usize];
                let n = self.read_exact_at(&mut mb, pos + COMMIT_LEN as u64)?;
                let meta = (n == mb.len() && crc32fast::hash(&mb) == meta_crc)
                    .then(|| decode_meta(&mb))
                    .flatten();
                let footer_ok = self.read_footer(info.end())? == Some(info);
                Ok(At::Segment(Box::new(Segment {
                    info,
                    stats: Some(stats),
                    meta,
                    footer_ok,
                    index: OnceLock::new(),
                })))
            }
        }
    }

    /// Find every segment; see docs/FORMAT.md, "Opening a chain".
    fn walk(&mut self, file_len: u64) -> Result<(), ChainError> {
        let mut pos = FILE_HEADER_LEN;
        loop {
            if pos >= file_len {
                break;
            }
            match self.read_segment_at(pos, file_len)? {
                At::Segment(seg) => {
                    if !seg.footer_ok {
                        self.damage.push(Damage {
                            offset: seg.info.end() - FOOTER_LEN,
                            detail: format!(
                                "footer of snapshot {} at offset {} is damaged",
                                seg.info.snapshot_id,
                                seg.info.end() - FOOTER_LEN
                            ),
                        });
                    }
                    if seg.meta.is_none() {
                        self.damage.push(Damage {
                            offset: pos + COMMIT_LEN as u64,
                            detail: format!(
                                "header (name, description, metadata) of snapshot {} at offset {} is damaged",
                                seg.info.snapshot_id, pos
                            ),
                        });
                    }
                    pos = seg.info.end();
                    self.segments.push(*seg);
                }
                At::Uncommitted | At::Truncated => {
                    // A torn tail, unless a committed segment follows it.
                    let later = self.segments_from_end(pos, file_len)?;
                    if later.iter().any(|s| s.stats.is_some()) {
                        self.damage.push(Damage {
                            offset: pos,
                            detail: format!(
                                "segment at offset {pos} is missing its commit record but later snapshots exist"
                            ),
                        });
                        self.segments.extend(later);
                        pos = self.segments.last().map(|s| s.info.end()).unwrap_or(pos);
                        continue;
                    }
                    self.torn_tail = file_len - pos;
                    break;
                }
                At::Damaged => {
                    let later = self.segments_from_end(pos, file_len)?;
                    if later.first().map(|s| s.info.start) == Some(pos) {
                        self.damage.push(Damage {
                            offset: pos,
                            detail: format!(
                                "commit record of snapshot {} at offset {pos} is damaged",
                                later[0].info.snapshot_id
                            ),
                        });
                    } else {
                        let until = later.first().map(|s| s.info.start).unwrap_or(file_len);
                        self.damage.push(Damage {
                            offset: pos,
                            detail: format!("bytes {pos}..{until} are not a readable segment"),
                        });
                    }
                    if later.is_empty() {
                        pos = file_len;
                        break;
                    }
                    self.segments.extend(later);
                    pos = self.segments.last().map(|s| s.info.end()).unwrap_or(pos);
                }
            }
        }
        self.end = pos.min(file_len);
        if self.torn_tail > 0 {
            self.end = file_len - self.torn_tail;
        }
        Ok(())
    }

    /// Walk footers back from the end of the file to `stop`, returning the
    /// segments found, oldest first. Segments whose commit record is valid
    /// carry their stats; others are known from their footer only.
    fn segments_from_end(&self, stop: u64, file_len: u64) -> Result<Vec<Segment>, ChainError> {
        let mut found = Vec::new();
        let mut end = file_len;
        while end >= stop + ALIGN {
            let Some(info) = self.read_footer(end)? else {
                break;
            };
            if info.start < stop {
                break;
            }
            let seg = match self.read_segment_at(info.start, file_len)? {
                At::Segment(s) if s.info == info => *s,
                _ => Segment {
                    info,
                    stats: None,
                    meta: None,
                    footer_ok: true,
                    index: OnceLock::new(),
                },
            };
            found.push(seg);
            if info.start == stop {
                break;
            }
            end = info.start;
        }
        found.reverse();
        // Only a run of segments that reaches back to `stop` without a gap is
        // usable; a gap is reported by the caller as damage.
        Ok(found)
    }

    /// The index of segment `i`, read and checked on first use.
    pub fn index(&self, i: usize) -> Result<Arc<Index>, ChainError> {
        let seg = &self.segments[i];
        let r = seg.index.get_or_init(|| {
            let info = &seg.info;
            let mut b = vec![0u8; info.index_len as usize];
            match sys::pread_full(self.file.as_fd(), &mut b, info.index_start()) {
                Ok(n) if n == b.len() => {}
                Ok(_) => return Err("index is cut short".to_string()),
                Err(e) => return Err(format!("cannot read index: {e}")),
            }
            if crc32fast::hash(&b) != info.index_crc {
                return Err(format!(
                    "index at offset {} fails its checksum",
                    info.index_start()
                ));
            }
            let idx = Index::decode(&b)
                .ok_or_else(|| format!("index at offset {} is malformed", info.index_start()))?;
            self.check_index(info, &idx)?;
            Ok(Arc::new(idx))
        });
        r.clone().map_err(|detail| ChainError::SnapshotDamaged {
            path: self.path.clone(),
            id: seg.info.snapshot_id,
            detail,
        })
    }

    /// Extents must lie inside the device and their data inside the file,
    /// in a data area of this or an earlier segment.
    fn check_index(&self, info: &SegInfo, idx: &Index) -> Result<(), String> {
        let bs = info.block_size as u64;
        let blocks = info.device_size.div_ceil(bs);
        for x in &idx.extents {
            if x.end_block() > blocks {
                return Err(format!(
                    "extent at block {} runs past the end of the device",
                    x.block
                ));
            }
            if let Location::Data(off) = x.location {
                let len = (x.end_block() * bs).min(info.device_size) - x.block * bs;
                let ok = self.segments.iter().any(|s| {
                    s.info.start <= info.start
                        && off >= s.info.data_start()
                        && off
                            .checked_add(len)
                            .is_some_and(|e| e <= s.info.index_start())
                });
                if !ok {
                    return Err(format!(
                        "extent at block {} points outside the chain's data",
                        x.block
                    ));
                }
            }
        }
        Ok(())
    }

    fn compute_live(&mut self) -> Result<(), ChainError> {
        let mut live: HashMap<Uuid, usize> = HashMap::new();
        for i in 0..self.segments.len() {
            let info = self.segments[i].info;
            if matches!(info.kind, SegmentKind::Merge | SegmentKind::Tombstone) {
                match self.index(i) {
                    Ok(idx) => {
                        for r in &idx.removes {
                            live.remove(r);
                        }
                    }
                    Err(e) => {
                        // Without its index a delete cannot be applied; the
                        // snapshots it would have changed stay as they were.
                        self.damage.push(Damage {
                            offset: info.start,
                            detail: crate::util::error_chain(&e),
                        });
                        continue;
                    }
                }
            }
            if info.kind != SegmentKind::Tombstone && live.insert(info.snapshot_id, i).is_some() {
                self.damage.push(Damage {
                    offset: info.start,
                    detail: format!(
                        "snapshot {} is defined twice (a duplicated segment at offset {})",
                        info.snapshot_id, info.start
                    ),
                });
            }
        }
        let mut snaps: Vec<Snapshot> = live
            .into_iter()
            .map(|(id, i)| self.describe(id, i))
            .collect();
        snaps.sort_by_key(|s| s.seq);
        self.snapshots = snaps;
        Ok(())
    }

    fn describe(&self, id: Uuid, i: usize) -> Snapshot {
        let seg = &self.segments[i];
        let stats = seg.stats.unwrap_or_default();
        let meta = seg.meta.clone().unwrap_or_default();
        let damaged = if seg.stats.is_none() {
            Some("commit record damaged".to_string())
        } else if seg.meta.is_none() {
            Some("header damaged".to_string())
        } else if !seg.footer_ok {
            Some("footer damaged".to_string())
        } else {
            None
        };
        // Stored bytes: this segment, plus data it references in segments
        // that are no longer live (merged forward by a delete).
        // Only a merge segment's index is read here (it is small and already
        // loaded to apply the merge); other indexes stay on disk until a
        // restore, verify or rebuild needs them.
        let referenced = match seg.info.kind {
            SegmentKind::Merge => self
                .index(i)
                .map(|idx| {
                    idx.extents
                        .iter()
                        .filter_map(|x| match x.location {
                            Location::Data(off) if off < seg.info.start => {
                                Some(x.count as u64 * seg.info.block_size as u64)
                            }
                            _ => None,
                        })
                        .sum()
                })
                .unwrap_or(0),
            _ => 0,
        };
        let stored_bytes = seg.info.len + referenced;
        Snapshot {
            id,
            seq: seg.info.seq,
            segment: i,
            name: meta.name,
            description: meta.description,
            metadata: meta.metadata,
            created_us: stats.created_us,
            device_size: seg.info.device_size,
            changed_bytes: stats.changed_bytes,
            zero_bytes: stats.zero_bytes,
            stored_bytes,
            freeze_us: stats.freeze_us,
            scan_us: stats.scan_us,
            full: seg.info.is_full(),
            source: meta.source,
            source_path: meta.source_path,
            damaged,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &File {
        &self.file
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

    /// The extents that make up snapshot `id`'s image. Each block of the
    /// image appears exactly once, taken from the newest segment at or before
    /// the snapshot that holds it.
    pub fn resolve(&self, id: Uuid) -> Result<Plan, ChainError> {
        let pos = self
            .snapshots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| ChainError::UnknownSnapshot {
                path: self.path.clone(),
                id: id.to_string(),
            })?;
        let target = self.snapshots[pos].clone();
        let bs = self.block_size() as u64;
        let nblocks = target.device_size.div_ceil(bs);
        let mut filled = Bitmap::new(nblocks);
        let mut remaining = nblocks;
        let mut runs = Vec::new();
        let mut indexes = HashMap::new();
        for snap in self.snapshots[..=pos].iter().rev() {
            if remaining == 0 {
                break;
            }
            let seg = snap.segment;
            let idx = self.index(seg)?;
            for x in &idx.extents {
                let end = x.end_block().min(nblocks);
                let mut b = x.block;
                while b < end {
                    let Some(start) = filled.next_clear(b, end) else {
                        break;
                    };
                    let stop = filled.next_set(start, end).unwrap_or(end);
                    filled.set_range(start, stop);
                    remaining -= stop - start;
                    let delta = start - x.block;
                    let source = match x.location {
                        Location::Zero => Source::Zero,
                        Location::Data(off) => Source::Data {
                            offset: off + delta * bs,
                            segment: seg,
                            meta: x.meta + delta as u32,
                        },
                    };
                    runs.push(Run {
                        block: start,
                        count: stop - start,
                        source,
                    });
                    b = stop;
                }
            }
            indexes.insert(seg, idx);
            if self.segments[seg].info.is_full() {
                break;
            }
        }
        if remaining != 0 {
            return Err(ChainError::SnapshotDamaged {
                path: self.path.clone(),
                id,
                detail: format!("{remaining} blocks are not stored in any segment"),
            });
        }
        runs.sort_by_key(|r| r.block);
        Ok(Plan {
            snapshot: target,
            block_size: self.block_size(),
            runs,
            indexes,
        })
    }

    /// [`Chain::resolve`], refusing a snapshot whose segment is damaged (its
    /// header, commit record or footer did not check out).
    pub fn resolve_intact(&self, id: Uuid) -> Result<Plan, ChainError> {
        let plan = self.resolve(id)?;
        match &plan.snapshot.damaged {
            Some(detail) => Err(ChainError::SnapshotDamaged {
                path: self.path.clone(),
                id,
                detail: detail.clone(),
            }),
            None => Ok(plan),
        }
    }

    /// The fingerprint map of the newest snapshot: from the side file when it
    /// matches, otherwise rebuilt from the chain's indexes.
    pub fn newest_fingerprints(
        &self,
        side_file: &Path,
    ) -> Result<Option<FingerprintMap>, ChainError> {
        let Some(newest) = self.newest() else {
            return Ok(None);
        };
        match FingerprintMap::load(side_file, self.chain_id()) {
            Ok(Some(m))
                if m.snapshot_id == newest.id
                    && m.device_size == newest.device_size
                    && m.block_size == self.block_size()
                    && m.seed == self.seed()
                    && m.prints.len() as u64
                        == newest.device_size.div_ceil(self.block_size() as u64) =>
            {
                return Ok(Some(m));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "{}; rebuilding it from the chain",
                crate::util::error_chain(&e)
            ),
        }
        let plan = self.resolve(newest.id)?;
        Ok(Some(FingerprintMap {
            chain_id: self.chain_id(),
            snapshot_id: newest.id,
            device_size: newest.device_size,
            block_size: self.block_size(),
            seed: self.seed(),
            prints: plan.fingerprints(self.seed()),
        }))
    }
}

/// Where the fingerprint side file of a chain lives.
pub fn side_file(chain: &Path) -> PathBuf {
    let mut name = chain.file_name().unwrap_or_default().to_os_string();
    name.push(".fpmap");
    chain.with_file_name(name)
}

/// Rebuild a damaged file header from the first segment's commit record.
fn recover_header(file: &File) -> Option<FileHeader> {
    let mut c = vec![0u8; COMMIT_LEN];
    let n = sys::pread_full(file.as_fd(), &mut c, FILE_HEADER_LEN).ok()?;
    match decode_commit(&c[..n]) {
        Commit::Valid { info, stats, .. } => Some(FileHeader {
            version: VERSION,
            chain_id: info.chain_id,
            block_size: info.block_size,
            seed: stats.seed,
            created_us: stats.created_us,
        }),
        _ => None,
    }
}

enum At {
    Segment(Box<Segment>),
    Uncommitted,
    Truncated,
    Damaged,
}

/// Take the chain's exclusive lock; held until the returned guard drops.
fn lock(file: &File, path: &Path) -> Result<nix::fcntl::Flock<File>, ChainError> {
    use nix::fcntl::{Flock, FlockArg};
    let dup = file.try_clone().map_err(|source| ChainError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    match Flock::lock(dup, FlockArg::LockExclusiveNonblock) {
        Ok(guard) => Ok(guard),
        Err((_, nix::Error::EWOULDBLOCK)) => Err(ChainError::Busy {
            path: path.to_path_buf(),
        }),
        Err((_, e)) => Err(ChainError::Open {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(e as i32),
        }),
    }
}

/// A plain bitmap over blocks.
#[derive(Debug)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub(crate) fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub(crate) fn set_range(&mut self, from: u64, to: u64) {
        let mut i = from;
        while i < to {
            if i % 64 == 0 && to - i >= 64 {
                self.words[(i / 64) as usize] = u64::MAX;
                i += 64;
            } else {
                self.words[(i / 64) as usize] |= 1 << (i % 64);
                i += 1;
            }
        }
    }

    /// First clear bit in `[from, to)`.
    pub(crate) fn next_clear(&self, from: u64, to: u64) -> Option<u64> {
        let mut i = from;
        while i < to {
            let w = self.words[(i / 64) as usize];
            if w == u64::MAX && i % 64 == 0 {
                i += 64;
                continue;
            }
            if w & (1 << (i % 64)) == 0 {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// First set bit in `[from, to)`.
    pub(crate) fn next_set(&self, from: u64, to: u64) -> Option<u64> {
        let mut i = from;
        while i < to {
            let w = self.words[(i / 64) as usize];
            if w == 0 && i % 64 == 0 {
                i += 64;
                continue;
            }
            if w & (1 << (i % 64)) != 0 {
                return Some(i);
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs() {
        let mut b = Bitmap::new(300);
        b.set_range(10, 20);
        b.set_range(64, 200);
        assert_eq!(b.next_clear(0, 300), Some(0));
        assert_eq!(b.next_clear(10, 300), Some(20));
        assert_eq!(b.next_set(20, 300), Some(64));
        assert_eq!(b.next_clear(64, 300), Some(200));
        assert_eq!(b.next_set(200, 300), None);
        assert!(b.get(199) && !b.get(200) && b.get(10) && !b.get(9));
        assert_eq!(b.next_clear(64, 200), None);
    }
}
