//! Opening a chain file: walking its segments, cutting a torn tail, noting
//! damage and working out which snapshots are live.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use uuid::Uuid;

use super::format::*;
use super::{Access, Chain, ChainError, Damage, Segment, Snapshot};
use crate::sys;

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
        // A new chain appears whole or not at all: its header is written and
        // made durable under a temporary name first, then linked into place
        // (which fails if someone else created it meanwhile). A crash can
        // no longer leave an empty file that no later take could open.
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(path.file_name().unwrap_or_default());
        tmp_name.push(format!(".{}.new", Uuid::new_v4().simple()));
        let tmp = path.with_file_name(tmp_name);
        let write_err = |source| ChainError::Write {
            path: path.to_path_buf(),
            source,
        };
        let existing = || -> Result<Chain, ChainError> {
            let chain = Chain::open(path, Access::Write)?;
            match block_size {
                Some(bs) if bs != chain.header.block_size => Err(ChainError::BlockSize {
                    path: path.to_path_buf(),
                    chain: chain.header.block_size,
                    requested: bs,
                }),
                _ => Ok(chain),
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(_) => return existing(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
        let created = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(file) => {
                let header = FileHeader {
                    version: VERSION,
                    chain_id: Uuid::new_v4(),
                    block_size: requested,
                    seed: rand::random(),
                    created_us: crate::util::now_micros(),
                };
                let written = sys::pwrite_full(file.as_fd(), &header.encode(), 0)
                    .and_then(|_| file.sync_all())
                    .map_err(write_err);
                crate::fault::point(crate::fault::Point::ChainCreate);
                let linked = written.map(|()| std::fs::hard_link(&tmp, path));
                let _ = std::fs::remove_file(&tmp);
                match linked? {
                    Ok(()) => {
                        crate::util::sync_parent(path).map_err(write_err)?;
                        Some(file)
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                    Err(e) => return Err(open_err(e)),
                }
            }
            Err(e) => return Err(open_err(e)),
        };
        match created {
            Some(file) => {
                let guard = lock(&file, path)?;
                Chain::load(path, file, Access::Write, Some(guard))
            }
            // Someone else created it meanwhile.
            None => existing(),
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
            records_file: OnceLock::new(),
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
                    extents: OnceLock::new(),
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
                    extents: OnceLock::new(),
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

    /// The extents of segment `i` (its index without the block records),
    /// read and checked on first use and kept while the chain is open.
    pub fn extents(&self, i: usize) -> Result<Arc<IndexExtents>, ChainError> {
        let seg = &self.segments[i];
        let r = seg.extents.get_or_init(|| {
            let info = &seg.info;
            // Reads stop at the index's end: most indexes (a merge's, an
            // increment's) are a few KiB, and chains are opened often.
            let mut r = io::BufReader::with_capacity(
                info.index_len.clamp(1, 1 << 20) as usize,
                ReadAt {
                    file: &self.file,
                    at: info.index_start(),
                    end: info.index_start() + info.index_len,
                },
            );
            let (found, crc) = scan_index(&mut r, info.index_len).map_err(index_read_error)?;
            if crc != info.index_crc {
                return Err(format!(
                    "index at offset {} fails its checksum",
                    info.index_start()
                ));
            }
            let x = found
                .ok_or_else(|| format!("index at offset {} is malformed", info.index_start()))?;
            self.check_index(info, &x.extents)?;
            Ok(Arc::new(x))
        });
        r.clone().map_err(|detail| self.index_damaged(i, detail))
    }

    /// The whole index of segment `i`, block records included (12 bytes a
    /// stored block in memory), read and checked now; not kept.
    pub fn index(&self, i: usize) -> Result<Index, ChainError> {
        let info = &self.segments[i].info;
        let read = || -> Result<Index, String> {
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
            self.check_index(info, &idx.extents)?;
            Ok(idx)
        };
        read().map_err(|detail| self.index_damaged(i, detail))
    }

    fn index_damaged(&self, i: usize, detail: String) -> ChainError {
        ChainError::SnapshotDamaged {
            path: self.path.clone(),
            id: self.segments[i].info.snapshot_id,
            detail,
        }
    }

    /// Extents must lie inside the device and their data inside the file,
    /// in a data area of this or an earlier segment.
    fn check_index(&self, info: &SegInfo, extents: &[Extent]) -> Result<(), String> {
        let bs = info.block_size as u64;
        let blocks = info.device_size.div_ceil(bs);
        for x in extents {
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

    pub(super) fn compute_live(&mut self) -> Result<(), ChainError> {
        let mut live: HashMap<Uuid, usize> = HashMap::new();
        for i in 0..self.segments.len() {
            let info = self.segments[i].info;
            if matches!(info.kind, SegmentKind::Merge | SegmentKind::Tombstone) {
                match self.extents(i) {
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
                .extents(i)
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
            take: stats.take,
            damaged,
        }
    }
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

/// Reads the chain file from `at` up to `end`, for a buffered reader.
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.end.saturating_sub(self.at) as usize);
        let n = std::os::unix::fs::FileExt::read_at(self.file, &mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn index_read_error(e: io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        "index is cut short".to_string()
    } else {
        format!("cannot read index: {e}")
    }
}
