//! Deleting a snapshot without changing what any other snapshot restores to.
//!
//! Deleting snapshot K whose successor is S: the blocks of K that S did not
//! change are part of S's image, so they are merged forward. Nothing is
//! copied: a new, small *merge* segment redefines S with an index that points
//! at S's own data and at K's surviving data where they already are, and
//! declares K (and S's old definition) removed. Deleting the newest snapshot
//! appends a *tombstone* segment. Either is committed like any segment, so a
//! crash before the commit leaves the chain as it was, and after it the
//! delete is complete. Afterwards the bytes no live snapshot references any
//! more are punched out of the file (`reclaim`), which is idempotent and
//! safe to repeat after a crash.

use std::os::fd::AsFd;

use uuid::Uuid;

use super::format::{Location, SegMeta, SegmentKind, BLOCK_RECORD_LEN};
use super::writer::{SegmentPlan, SegmentWriter};
use super::{Bitmap, Chain, ChainError, Records};
use crate::sys;

/// What a delete did.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteOutcome {
    /// Blocks of the deleted snapshot merged into its successor.
    pub merged_blocks: u64,
    /// Bytes given back to the filesystem.
    pub reclaimed_bytes: u64,
}

/// Delete live snapshot `id`.
pub fn delete(chain: &mut Chain, id: Uuid) -> Result<DeleteOutcome, ChainError> {
    let pos = chain
        .snapshots()
        .iter()
        .position(|s| s.id == id)
        .ok_or_else(|| ChainError::UnknownSnapshot {
            path: chain.path().to_path_buf(),
            id: id.to_string(),
        })?;
    let snaps = chain.snapshots().to_vec();
    let victim = &snaps[pos];
    let mut out = DeleteOutcome::default();
    let successor = snaps.get(pos + 1).filter(|s| !s.full);
    match successor {
        None => {
            // The newest snapshot, or one whose successor is full and needs
            // nothing from it: a tombstone is enough.
            let plan = SegmentPlan {
                kind: SegmentKind::Tombstone,
                snapshot_id: Uuid::nil(),
                seq: chain.next_seq(),
                device_size: victim.device_size,
                full: false,
                meta: SegMeta::default(),
                removes: vec![id],
            };
            let w = SegmentWriter::begin(chain, plan)?;
            w.commit(Default::default())?;
        }
        Some(succ) => {
            let bs = chain.block_size() as u64;
            // Extents only: the block records are read piece by piece as
            // they are copied into the merge segment's index.
            let k_idx = chain.extents(victim.segment)?;
            let s_idx = chain.extents(succ.segment)?;
            let k_start = chain.segments()[victim.segment].info.index_start();
            let s_start = chain.segments()[succ.segment].info.index_start();
            let nblocks = succ.device_size.div_ceil(bs);
            // Blocks the successor stores itself.
            let mut covered = Bitmap::new(nblocks);
            for x in &s_idx.extents {
                covered.set_range(x.block, x.end_block().min(nblocks));
            }
            // Pieces of the victim's extents the successor did not change.
            enum Piece {
                Zero(u64, u64),
                Data(u64, u64, u64, u64),
                Own(usize),
            }
            let mut pieces: Vec<(u64, Piece)> = Vec::new();
            for (k, x) in k_idx.extents.iter().enumerate() {
                let end = x.end_block().min(nblocks);
                let mut b = x.block;
                while b < end {
                    let Some(start) = covered.next_clear(b, end) else {
                        break;
                    };
                    let stop = covered.next_set(start, end).unwrap_or(end);
                    let d = start - x.block;
                    out.merged_blocks += stop - start;
                    pieces.push((
                        start,
                        match x.location {
                            Location::Zero => Piece::Zero(start, stop - start),
                            Location::Data(off) => Piece::Data(
                                start,
                                stop - start,
                                off + d * bs,
                                k_start + k_idx.record_at(k, d),
                            ),
                        },
                    ));
                    b = stop;
                }
            }
            for (i, x) in s_idx.extents.iter().enumerate() {
                pieces.push((x.block, Piece::Own(i)));
            }
            pieces.sort_by_key(|p| p.0);
            let succ_seg = &chain.segments()[succ.segment];
            let plan = SegmentPlan {
                kind: SegmentKind::Merge,
                snapshot_id: succ.id,
                seq: succ.seq,
                device_size: succ.device_size,
                full: victim.full,
                meta: succ_seg.meta.clone().unwrap_or_default(),
                removes: vec![id, succ.id],
            };
            let mut stats = succ_seg.stats.unwrap_or_default();
            let parent = chain
                .segments()
                .get(victim.segment)
                .and_then(|s| s.stats)
                .map(|s| s.parent_id)
                .unwrap_or_default();
            stats.parent_id = parent;
            let mut w = SegmentWriter::begin(chain, plan)?;
            let mut copy = RecordCopy::default();
            for (_, p) in pieces {
                match p {
                    Piece::Zero(b, n) => w.append_zero(b, n)?,
                    Piece::Data(b, n, off, at) => copy.reference(&mut w, b, n, off, at)?,
                    Piece::Own(i) => {
                        let x = s_idx.extents[i];
                        match x.location {
                            Location::Zero => w.append_zero(x.block, x.count as u64)?,
                            Location::Data(off) => copy.reference(
                                &mut w,
                                x.block,
                                x.count as u64,
                                off,
                                s_start + s_idx.record_at(i, 0),
                            )?,
                        }
                    }
                }
            }
            w.commit(stats)?;
        }
    }
    crate::fault::point(crate::fault::Point::DeleteReclaim);
    out.reclaimed_bytes = reclaim(chain)?;
    Ok(out)
}

/// Copies stored blocks' records from the indexes they are in into the
/// index of the merge segment being written, a bounded number at a time.
#[derive(Default)]
struct RecordCopy {
    records: Records,
    prints: Vec<u64>,
    crcs: Vec<u32>,
}

impl RecordCopy {
    /// Define blocks `block..block + count`, stored at `offset`, whose
    /// records are at chain offset `records_at`.
    fn reference(
        &mut self,
        w: &mut SegmentWriter<'_>,
        block: u64,
        count: u64,
        offset: u64,
        records_at: u64,
    ) -> Result<(), ChainError> {
        let bs = w.chain().block_size() as u64;
        let mut done = 0;
        while done < count {
            let k = (count - done).min(COPY_RECORDS);
            self.records
                .read(w.chain(), records_at + done * BLOCK_RECORD_LEN, k)?;
            self.prints.clear();
            self.crcs.clear();
            for i in 0..k as usize {
                self.prints.push(self.records.print(i));
                self.crcs.push(self.records.crc(i));
            }
            w.append_reference(block + done, offset + done * bs, &self.prints, &self.crcs)?;
            done += k;
        }
        Ok(())
    }
}

/// Records copied at a time (768 KiB of them).
const COPY_RECORDS: u64 = 65536;

/// Punch out of the file the stored bytes that no live snapshot references.
/// Headers, indexes and footers of dead segments stay, so the file remains
/// walkable. Returns the bytes punched.
pub fn reclaim(chain: &Chain) -> Result<u64, ChainError> {
    let bs = chain.block_size() as u64;
    let mut referenced: Vec<(u64, u64)> = Vec::new();
    let mut live_segments = std::collections::HashSet::new();
    for snap in chain.snapshots() {
        live_segments.insert(snap.segment);
        let idx = chain.extents(snap.segment)?;
        for x in &idx.extents {
            if let Location::Data(off) = x.location {
                let len = (x.end_block() * bs).min(snap.device_size) - x.block * bs;
                referenced.push((off, off + len));
            }
        }
    }
    referenced.sort_unstable();
    let fd = chain.file().as_fd();
    let mut punched = 0u64;
    for (i, seg) in chain.segments().iter().enumerate() {
        if live_segments.contains(&i) || seg.info.data_len == 0 {
            continue;
        }
        let (start, end) = (seg.info.data_start(), seg.info.index_start());
        // Complement of the referenced ranges within [start, end).
        let mut cursor = start;
        let first = referenced.partition_point(|r| r.1 <= start);
        for &(a, b) in &referenced[first..] {
            if a >= end {
                break;
            }
            if a > cursor {
                punched += punch(fd, cursor, a)?;
            }
            cursor = cursor.max(b);
        }
        if cursor < end {
            punched += punch(fd, cursor, end)?;
        }
    }
    if punched > 0 {
        chain
            .file()
            .sync_all()
            .map_err(|source| ChainError::Write {
                path: chain.path().to_path_buf(),
                source,
            })?;
    }
    Ok(punched)
}

/// Punch the whole 4 KiB pages inside `[a, b)`; returns the bytes punched.
fn punch(fd: std::os::fd::BorrowedFd<'_>, a: u64, b: u64) -> Result<u64, ChainError> {
    let a = crate::util::round_up(a, 4096);
    let b = b & !4095;
    if b <= a {
        return Ok(0);
    }
    match sys::punch_hole(fd, a, b - a) {
        Ok(()) => Ok(b - a),
        // A filesystem without hole punching keeps the bytes; nothing is lost.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(0),
        Err(e) => {
            tracing::warn!("could not punch unused chain bytes {a}..{b}: {e}");
            Ok(0)
        }
    }
}
