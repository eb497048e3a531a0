//! Appending one segment to a chain, crash-safely.
//!
//! Order of writes: meta area and data, then index and footer; fdatasync;
//! then the 512-byte commit record at the segment's start; fdatasync. Until
//! the commit record is durable the segment does not exist: a crash leaves a
//! tail whose first sector is zero, which the next writer cuts off.
//!
//! Memory does not grow with the segment: the index's extent records (with
//! a fingerprint and crc per data block, 12 bytes a block) are written to an
//! unnamed temporary file beside the chain as they close, and copied into the
//! segment, merged with the blocks defined again out of order, when it is
//! finished. Only the extent still growing (at most [`EXTENT_BLOCKS`]
//! blocks) and those out-of-order blocks are held.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

use uuid::Uuid;

use super::format::*;
use super::{Chain, ChainError};
use crate::sys;
use crate::util::WriteBehind;

/// What a segment defines.
#[derive(Clone, Debug)]
pub struct SegmentPlan {
    pub kind: SegmentKind,
    pub snapshot_id: Uuid,
    pub seq: u64,
    pub device_size: u64,
    pub full: bool,
    pub meta: SegMeta,
    pub removes: Vec<Uuid>,
}

/// A segment being appended. Dropping it without [`SegmentWriter::commit`]
/// cuts the file back to where the segment started.
#[derive(Debug)]
pub struct SegmentWriter<'c> {
    chain: &'c mut Chain,
    plan: SegmentPlan,
    start: u64,
    header_len: u64,
    meta_bytes: Vec<u8>,
    data_pos: u64,
    /// The extents appended in block order, spilled as they close.
    in_order: Extents<BufWriter<File>>,
    /// Blocks appended out of order or again (a take's later rounds): the
    /// newest definition of each, merged over the in-order extents when the
    /// index is written.
    overrides: BTreeMap<u64, Override>,
    /// The index once written (by [`SegmentWriter::defined_bytes`] or the
    /// commit); nothing may be appended after it.
    finished: Option<Finished>,
    behind: WriteBehind,
    /// Data appended but not yet written: small appends (a tracked take's
    /// scattered blocks) go to the file in writes of up to
    /// [`COALESCE_BYTES`], which costs a fraction of one write per block.
    /// It ends at `data_pos`; nothing reads it before the index is written,
    /// and a crash loses only an uncommitted segment.
    pending: Vec<u8>,
    /// Scratch for the crcs of one append.
    crcs: Vec<u32>,
    done: bool,
}

/// The largest write the segment writer gathers small appends into.
const COALESCE_BYTES: usize = 1 << 20;

/// Longest extent the writer makes (a longer run becomes several adjacent
/// extents): the growing extent's fingerprints and crcs are held in memory
/// until it closes, 12 bytes a block, so at most 768 KiB.
pub const EXTENT_BLOCKS: u32 = 1 << 16;

/// A block defined after the in-order appends passed it.
#[derive(Clone, Copy, Debug)]
struct Override {
    location: Location,
    print: u64,
    crc: u32,
}

/// The written index, and what it defines.
#[derive(Clone, Copy, Debug)]
struct Finished {
    len: u64,
    crc: u32,
    all: u64,
    zero: u64,
}

/// The extent still growing.
#[derive(Debug)]
struct Open {
    block: u64,
    count: u32,
    location: Location,
    prints: Vec<u64>,
    crcs: Vec<u32>,
}

/// Extent records encoded into `out` as they close, adjacent appends
/// joined into one extent up to `cap` blocks.
#[derive(Debug)]
struct Extents<W: Write> {
    out: W,
    bs: u64,
    cap: u32,
    /// The device's size, for the bytes the extents define.
    size: u64,
    open: Option<Open>,
    buf: Vec<u8>,
    /// Extent records and bytes encoded so far (closed extents only).
    records: u64,
    bytes: u64,
    /// Bytes of the device the closed extents define, and of those zero.
    all: u64,
    zero: u64,
    /// The block after the last one pushed.
    end: u64,
}

impl<W: Write> Extents<W> {
    fn new(out: W, bs: u64, cap: u32, size: u64) -> Self {
        Extents {
            out,
            bs,
            cap,
            size,
            open: None,
            buf: Vec::new(),
            records: 0,
            bytes: 0,
            all: 0,
            zero: 0,
            end: 0,
        }
    }

    /// Define `count` blocks from `first` (ascending, after every block
    /// pushed before); `prints` and `crcs` hold one entry per block for data
    /// and are empty for zero runs.
    fn push(
        &mut self,
        mut first: u64,
        mut count: u64,
        mut location: Location,
        mut prints: &[u64],
        mut crcs: &[u32],
    ) -> io::Result<()> {
        debug_assert!(first >= self.end, "extents pushed out of order");
        while count > 0 {
            let joins = self.open.as_ref().is_some_and(|o| {
                o.count < self.cap
                    && o.block + o.count as u64 == first
                    && match (o.location, location) {
                        (Location::Zero, Location::Zero) => true,
                        (Location::Data(a), Location::Data(b)) => a + o.count as u64 * self.bs == b,
                        _ => false,
                    }
            });
            if !joins {
                self.close()?;
                self.open = Some(Open {
                    block: first,
                    count: 0,
                    location,
                    prints: Vec::new(),
                    crcs: Vec::new(),
                });
            }
            let o = self.open.as_mut().expect("an open extent");
            let take = count.min((self.cap - o.count) as u64);
            o.count += take as u32;
            if let Location::Data(off) = location {
                let n = take as usize;
                o.prints.extend_from_slice(&prints[..n]);
                o.crcs.extend_from_slice(&crcs[..n]);
                prints = &prints[n..];
                crcs = &crcs[n..];
                location = Location::Data(off + take * self.bs);
            }
            first += take;
            count -= take;
            self.end = first;
            if self.open.as_ref().is_some_and(|o| o.count == self.cap) {
                self.close()?;
            }
        }
        Ok(())
    }

    /// Encode the open extent.
    fn close(&mut self) -> io::Result<()> {
        let Some(o) = self.open.take() else {
            return Ok(());
        };
        self.buf.clear();
        encode_extent(
            &mut self.buf,
            o.block,
            o.count,
            o.location,
            &o.prints,
            &o.crcs,
        );
        self.out.write_all(&self.buf)?;
        self.records += 1;
        self.bytes += self.buf.len() as u64;
        let end = o.block + o.count as u64;
        let n = (end * self.bs)
            .min(self.size)
            .saturating_sub(o.block * self.bs);
        self.all += n;
        if o.location == Location::Zero {
            self.zero += n;
        }
        Ok(())
    }
}

/// Sequential writes at a file offset, through a buffer, with a running
/// crc32 of what was written.
struct AtWriter<'f> {
    file: &'f File,
    pos: u64,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl Write for AtWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.crc.update(b);
        self.buf.extend_from_slice(b);
        if self.buf.len() >= COALESCE_BYTES {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            sys::pwrite_full(self.file.as_fd(), &self.buf, self.pos)?;
            self.pos += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// An unnamed file beside the chain for the spilled index; it disappears
/// when closed, crash or not.
fn spill_file(chain: &Chain) -> io::Result<File> {
    let dir = match chain.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmpfile = crate::util::private_options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(&dir);
    match tmpfile {
        Ok(f) => Ok(f),
        // A filesystem without O_TMPFILE: a fresh name, removed at once.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            let name = dir.join(format!(
                ".{}.index-{}",
                chain
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                Uuid::new_v4()
            ));
            let f = crate::util::private_options()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&name)?;
            std::fs::remove_file(&name)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

impl<'c> SegmentWriter<'c> {
    pub fn begin(chain: &'c mut Chain, plan: SegmentPlan) -> Result<SegmentWriter<'c>, ChainError> {
        assert_eq!(
            chain.access,
            super::Access::Write,
            "segment writer on a read-only chain"
        );
        let meta_bytes = encode_meta(&plan.meta);
        let header_len = header_len_for(meta_bytes.len());
        if header_len > MAX_HEADER_LEN {
            return Err(ChainError::Write {
                path: chain.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "name, description and metadata are too large (limit 1 MiB)",
                ),
            });
        }
        let start = chain.end;
        // Anything past the last committed segment is garbage from an aborted
        // attempt; drop it so a crash cannot mix old and new bytes.
        chain.truncate_tail()?;
        let werr = |source| ChainError::Write {
            path: chain.path.clone(),
            source,
        };
        sys::pwrite_full(chain.file.as_fd(), &meta_bytes, start + COMMIT_LEN as u64)
            .map_err(werr)?;
        let spill = spill_file(chain).map_err(werr)?;
        let data_pos = start + header_len;
        let bs = chain.block_size() as u64;
        Ok(SegmentWriter {
            in_order: Extents::new(
                BufWriter::with_capacity(COALESCE_BYTES, spill),
                bs,
                EXTENT_BLOCKS,
                plan.device_size,
            ),
            chain,
            start,
            header_len,
            meta_bytes,
            data_pos,
            overrides: BTreeMap::new(),
            finished: None,
            plan,
            behind: WriteBehind::new(data_pos),
            pending: Vec::new(),
            crcs: Vec::new(),
            done: false,
        })
    }

    /// Set the device size once the device is open (before any data).
    /// The chain being written, to read its committed segments meanwhile.
    pub fn chain(&self) -> &Chain {
        self.chain
    }

    pub fn set_device_size(&mut self, size: u64) {
        self.plan.device_size = size;
        self.in_order.size = size;
    }

    fn werr(&self) -> impl FnOnce(std::io::Error) -> ChainError + '_ {
        |source| ChainError::Write {
            path: self.chain.path.clone(),
            source,
        }
    }

    /// Append stored data for blocks `first..first+prints.len()`. `data` holds
    /// the blocks back to back (only the device's last block may be short).
    pub fn append_data(
        &mut self,
        first: u64,
        data: &[u8],
        prints: &[u64],
    ) -> Result<(), ChainError> {
        assert!(
            self.finished.is_none(),
            "append after the index was written"
        );
        let bs = self.chain.block_size() as usize;
        debug_assert_eq!(data.len().div_ceil(bs), prints.len());
        let off = self.data_pos;
        crate::fault::point(crate::fault::Point::Append);
        if self.pending.len() + data.len() > COALESCE_BYTES {
            self.write_pending()?;
        }
        if data.len() >= COALESCE_BYTES {
            sys::pwrite_full(self.chain.file.as_fd(), data, off).map_err(self.werr())?;
            self.data_pos += data.len() as u64;
            self.behind.wrote(self.chain.file.as_fd(), self.data_pos);
        } else {
            if self.pending.capacity() == 0 {
                self.pending.reserve_exact(COALESCE_BYTES);
            }
            self.pending.extend_from_slice(data);
            self.data_pos += data.len() as u64;
        }
        // Blocks before the in-order end are defined again: they override.
        // The rest of the append (it may reach past that end) continues the
        // in-order extents; were they overrides too, a later in-order append
        // of the same block (a newer read of it) would lose to them.
        let again = (self.in_order.end.saturating_sub(first) as usize).min(prints.len());
        for (i, (p, block)) in prints[..again].iter().zip(data.chunks(bs)).enumerate() {
            self.overrides.insert(
                first + i as u64,
                Override {
                    location: Location::Data(off + (i * bs) as u64),
                    print: *p,
                    crc: crc32fast::hash(block),
                },
            );
        }
        if again == prints.len() {
            return Ok(());
        }
        let mut crcs = std::mem::take(&mut self.crcs);
        crcs.clear();
        crcs.extend(data[again * bs..].chunks(bs).map(crc32fast::hash));
        let pushed = self.in_order.push(
            first + again as u64,
            (prints.len() - again) as u64,
            Location::Data(off + (again * bs) as u64),
            &prints[again..],
            &crcs,
        );
        self.crcs = crcs;
        pushed.map_err(|e| self.spill_error(e))
    }

    /// The spilled index is part of writing the segment (and on the
    /// chain's filesystem): its errors are the chain's, a full disk included.
    fn spill_error(&self, source: io::Error) -> ChainError {
        ChainError::Write {
            path: self.chain.path.clone(),
            source,
        }
    }

    /// Write out the data gathered by [`SegmentWriter::append_data`].
    fn write_pending(&mut self) -> Result<(), ChainError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let off = self.data_pos - self.pending.len() as u64;
        sys::pwrite_full(self.chain.file.as_fd(), &self.pending, off).map_err(self.werr())?;
        self.pending.clear();
        self.behind.wrote(self.chain.file.as_fd(), self.data_pos);
        Ok(())
    }

    /// Record `count` all-zero blocks starting at `first`.
    pub fn append_zero(&mut self, first: u64, count: u64) -> Result<(), ChainError> {
        assert!(
            self.finished.is_none(),
            "append after the index was written"
        );
        // As for data: only the blocks before the in-order end override.
        let again = self.in_order.end.saturating_sub(first).min(count);
        for b in first..first + again {
            self.overrides.insert(
                b,
                Override {
                    location: Location::Zero,
                    print: 0,
                    crc: 0,
                },
            );
        }
        if again == count {
            return Ok(());
        }
        self.in_order
            .push(first + again, count - again, Location::Zero, &[], &[])
            .map_err(|e| self.spill_error(e))
    }

    /// Record blocks already stored elsewhere in the chain (a merge), with
    /// their fingerprints and crcs; in block order.
    pub fn append_reference(
        &mut self,
        first: u64,
        offset: u64,
        prints: &[u64],
        crcs: &[u32],
    ) -> Result<(), ChainError> {
        assert!(
            self.finished.is_none(),
            "append after the index was written"
        );
        assert!(
            first >= self.in_order.end,
            "references appended out of order"
        );
        self.in_order
            .push(
                first,
                prints.len() as u64,
                Location::Data(offset),
                prints,
                crcs,
            )
            .map_err(|e| self.spill_error(e))
    }

    /// Write the data still gathered and the index (the in-order extents
    /// merged with the blocks defined again), once.
    fn finish(&mut self) -> Result<Finished, ChainError> {
        if let Some(f) = self.finished {
            return Ok(f);
        }
        self.write_pending()?;
        self.in_order.close().map_err(|e| self.spill_error(e))?;
        self.in_order.out.flush().map_err(|e| self.spill_error(e))?;
        let bs = self.chain.block_size() as u64;
        let index_start = self.data_pos;
        let mut spill = BufReader::with_capacity(
            COALESCE_BYTES,
            self.in_order
                .out
                .get_ref()
                .try_clone()
                .map_err(|e| self.spill_error(e))?,
        );
        spill.rewind().map_err(|e| self.spill_error(e))?;
        let records = self.in_order.records;
        let overrides = std::mem::take(&mut self.overrides);
        // The head holds the number of extents, known only at the end: the
        // extents go after a head of the same length, and the crc of the
        // whole is the head's combined with theirs.
        let head_len = encode_index_head(&self.plan.removes, 0).len() as u64;
        let file = &self.chain.file;
        let path = &self.chain.path;
        let werr = |source| ChainError::Write {
            path: path.clone(),
            source,
        };
        let mut out = Extents::new(
            AtWriter {
                file,
                pos: index_start + head_len,
                buf: Vec::new(),
                crc: crc32fast::Hasher::new(),
            },
            bs,
            self.in_order.cap,
            self.plan.device_size,
        );
        merge(&mut spill, records, bs, overrides, &mut out).map_err(werr)?;
        out.close().map_err(werr)?;
        out.out.flush().map_err(werr)?;
        let head = encode_index_head(&self.plan.removes, out.records);
        sys::pwrite_full(file.as_fd(), &head, index_start).map_err(werr)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.combine(&out.out.crc);
        let f = Finished {
            len: head_len + out.bytes,
            crc: crc.finalize(),
            all: out.all,
            zero: out.zero,
        };
        self.finished = Some(f);
        Ok(f)
    }

    /// Bytes of the blocks this segment defines, and of those the all-zero
    /// ones (what a snapshot records as changed and zero bytes). Writes the
    /// index: nothing may be appended afterwards.
    pub fn defined_bytes(&mut self) -> Result<(u64, u64), ChainError> {
        let f = self.finish()?;
        Ok((f.all, f.zero))
    }

    /// Bytes of data written so far.
    fn data_len(&self) -> u64 {
        self.data_pos - self.start - self.header_len
    }

    /// Write index and footer, make them durable, then write and sync the
    /// commit record. Returns the committed segment's facts.
    pub fn commit(mut self, stats: SegStats) -> Result<SegInfo, ChainError> {
        let index = self.finish()?;
        let data_len = self.data_len();
        let len = crate::util::round_up(self.header_len + data_len + index.len + FOOTER_LEN, ALIGN);
        let info = SegInfo {
            kind: self.plan.kind,
            flags: if self.plan.full { FLAG_FULL } else { 0 },
            chain_id: self.chain.chain_id(),
            snapshot_id: self.plan.snapshot_id,
            seq: self.plan.seq,
            start: self.start,
            len,
            header_len: self.header_len,
            data_len,
            index_len: index.len,
            index_crc: index.crc,
            block_size: self.chain.block_size(),
            device_size: self.plan.device_size,
        };
        debug_assert_eq!(info.index_start(), self.data_pos);
        let fd = self.chain.file.as_fd();
        let path = self.chain.path.clone();
        let werr = |source| ChainError::Write {
            path: path.clone(),
            source,
        };
        sys::pwrite_full(fd, &encode_footer(&info), info.end() - FOOTER_LEN).map_err(werr)?;
        crate::fault::point(crate::fault::Point::CommitWritten);
        self.chain.file.sync_data().map_err(werr)?;
        crate::fault::point(crate::fault::Point::CommitSynced);
        let commit = encode_commit(&info, &stats, &self.meta_bytes);
        sys::pwrite_full(fd, &commit, info.start).map_err(werr)?;
        crate::fault::point(crate::fault::Point::CommitRecorded);
        self.chain.file.sync_data().map_err(werr)?;
        self.behind.finish(fd, info.end());
        self.done = true;
        // The segment is committed; bring the in-memory view up to date. Its
        // index is read from the file if someone asks for it.
        let seg = super::Segment {
            info,
            stats: Some(stats),
            meta: Some(self.plan.meta.clone()),
            footer_ok: true,
            extents: std::sync::OnceLock::new(),
        };
        self.chain.segments.push(seg);
        self.chain.end = info.end();
        self.chain.compute_live()?;
        Ok(info)
    }
}

/// Read the spilled extent records back one at a time, merge the blocks
/// defined again over them (the newest definition wins), and push the
/// result, in block order, to `out`.
fn merge<R: Read, W: Write>(
    spill: &mut R,
    records: u64,
    bs: u64,
    overrides: BTreeMap<u64, Override>,
    out: &mut Extents<W>,
) -> io::Result<()> {
    let mut ov = overrides.into_iter().peekable();
    let emit = |out: &mut Extents<W>, b: u64, o: Override| match o.location {
        Location::Zero => out.push(b, 1, Location::Zero, &[], &[]),
        Location::Data(_) => out.push(b, 1, o.location, &[o.print], &[o.crc]),
    };
    let mut head = [0u8; EXTENT_RECORD_LEN as usize];
    let mut blocks = Vec::new();
    let (mut prints, mut crcs) = (Vec::new(), Vec::new());
    for _ in 0..records {
        spill.read_exact(&mut head)?;
        let (block, count, location) = decode_extent_head(&head).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "spilled index record is malformed",
            )
        })?;
        prints.clear();
        crcs.clear();
        if let Location::Data(_) = location {
            blocks.resize(count as usize * BLOCK_RECORD_LEN as usize, 0);
            spill.read_exact(&mut blocks)?;
            for r in blocks.chunks_exact(BLOCK_RECORD_LEN as usize) {
                prints.push(u64::from_le_bytes(r[..8].try_into().expect("8 bytes")));
                crcs.push(u32::from_le_bytes(r[8..].try_into().expect("4 bytes")));
            }
        }
        let end = block + count as u64;
        let mut b = block;
        while b < end {
            while let Some((k, o)) = ov.next_if(|(k, _)| *k < b) {
                emit(out, k, o)?;
            }
            let next = ov
                .peek()
                .map(|(k, _)| *k)
                .filter(|k| *k < end)
                .unwrap_or(end);
            if next > b {
                let d = (b - block) as usize;
                let n = (next - b) as usize;
                match location {
                    Location::Zero => out.push(b, next - b, Location::Zero, &[], &[])?,
                    Location::Data(off) => out.push(
                        b,
                        next - b,
                        Location::Data(off + d as u64 * bs),
                        &prints[d..d + n],
                        &crcs[d..d + n],
                    )?,
                }
            }
            if next < end {
                let (k, o) = ov.next().expect("peeked");
                emit(out, k, o)?;
                b = next + 1;
            } else {
                b = end;
            }
        }
    }
    for (k, o) in ov {
        emit(out, k, o)?;
    }
    Ok(())
}

impl Drop for SegmentWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.chain.truncate_tail() {
                tracing::warn!(
                    "could not cut off an abandoned segment: {}; the next take or delete will",
                    crate::util::error_chain(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Origin;

    /// A new chain in a temporary directory.
    fn new_chain() -> (tempfile::TempDir, Chain) {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::open_or_create(&dir.path().join("c"), None).unwrap();
        (dir, chain)
    }

    /// The plan of a chain's first (full) snapshot of `device_size` bytes.
    fn full_plan(device_size: u64) -> (Uuid, SegmentPlan) {
        let id = Uuid::new_v4();
        let plan = SegmentPlan {
            kind: SegmentKind::Snapshot,
            snapshot_id: id,
            seq: 1,
            device_size,
            full: true,
            meta: SegMeta::default(),
            removes: Vec::new(),
        };
        (id, plan)
    }

    /// Blocks defined again or out of order (a take's later rounds) win over
    /// the in-order appends, and every block is defined once.
    #[test]
    fn later_definitions_override_earlier_ones() {
        let (_dir, mut chain) = new_chain();
        let (id, plan) = full_plan(30 * 4096);
        let block = |v: u8| vec![v; 4096];
        let mut w = SegmentWriter::begin(&mut chain, plan).unwrap();
        let mut data = Vec::new();
        for v in 0..5u8 {
            data.extend(block(v + 1));
        }
        w.append_data(0, &data, &[1, 2, 3, 4, 5]).unwrap();
        w.append_zero(5, 25).unwrap();
        // Round two: block 2 changed, block 3 became zero, block 7 (inside
        // the zero run) got data.
        w.append_data(2, &block(33), &[33]).unwrap();
        w.append_zero(3, 1).unwrap();
        w.append_data(7, &block(77), &[77]).unwrap();
        // Round three: block 2 again.
        w.append_data(2, &block(99), &[99]).unwrap();
        let (all, zero) = w.defined_bytes().unwrap();
        assert_eq!(all, 30 * 4096);
        // 5..30 zero, less block 7 (data), plus block 3.
        assert_eq!(zero, 25 * 4096);
        w.commit(SegStats::default()).unwrap();
        let plan = chain.resolve(id).unwrap();
        let prints = plan.fingerprints(&chain).unwrap();
        assert_eq!(&prints[..3], &[1, 2, 99]);
        assert_eq!(prints[4], 5);
        assert_eq!(prints[7], 77);
        let mut covered = 0;
        for r in &plan.runs {
            covered += r.count;
            if r.block <= 3 && 3 < r.block + r.count {
                assert_eq!(r.source, Origin::Zero);
            }
        }
        assert_eq!(covered, 30);
        // The data of block 2 is round three's.
        let r = plan
            .runs
            .iter()
            .find(|r| r.block <= 2 && 2 < r.block + r.count)
            .unwrap();
        let Origin::Data { offset, .. } = r.source else {
            panic!("block 2 is not data")
        };
        let mut b = vec![0u8; 4096];
        let at = offset + (2 - r.block) * 4096;
        sys::pread_full(chain.file().as_fd(), &mut b, at).unwrap();
        assert_eq!(b, block(99));
    }

    /// Small appends are gathered into larger writes, large ones written
    /// straight through between them: every block still reads back from
    /// where the index says it is.
    #[test]
    fn gathered_appends_land_where_the_index_says() {
        let (_dir, mut chain) = new_chain();
        let blocks = 1200u64;
        let (id, plan) = full_plan(blocks * 4096);
        // Each block holds its number, so a block written at the wrong
        // offset cannot read back right.
        let block = |b: u64| {
            let mut v = vec![0u8; 4096];
            for (i, c) in v.chunks_mut(8).enumerate() {
                c.copy_from_slice(&(b * 1000 + i as u64 + 1).to_le_bytes());
            }
            v
        };
        let mut w = SegmentWriter::begin(&mut chain, plan).unwrap();
        let mut b = 0u64;
        while b < blocks {
            if b == 300 || b == 800 {
                // 1.2 MiB, then exactly 1 MiB at once: written straight
                // through, after what was gathered before them.
                let n = if b == 300 { 300 } else { 256 };
                let data: Vec<u8> = (b..b + n).flat_map(block).collect();
                let prints: Vec<u64> = (b..b + n).collect();
                w.append_data(b, &data, &prints).unwrap();
                b += n;
            } else if b % 7 == 3 {
                w.append_zero(b, 1).unwrap();
                b += 1;
            } else {
                w.append_data(b, &block(b), &[b]).unwrap();
                b += 1;
            }
        }
        // An earlier block again (a later round), gathered too.
        w.append_data(5, &block(5_000), &[5_000]).unwrap();
        w.commit(SegStats::default()).unwrap();
        let plan = chain.resolve(id).unwrap();
        let mut seen = 0;
        for r in &plan.runs {
            for k in 0..r.count {
                let b = r.block + k;
                match r.source {
                    Origin::Zero => assert!(
                        b % 7 == 3 && !(300..600).contains(&b) && !(800..1056).contains(&b),
                        "block {b}"
                    ),
                    Origin::Data { offset, .. } => {
                        let mut got = vec![0u8; 4096];
                        sys::pread_full(chain.file().as_fd(), &mut got, offset + k * 4096).unwrap();
                        let want = if b == 5 { block(5_000) } else { block(b) };
                        assert!(got == want, "block {b} reads back wrong");
                    }
                }
                seen += 1;
            }
        }
        assert_eq!(seen, blocks);
    }

    /// One random take-like sequence: a first pass in block order (data
    /// runs, zero runs, gaps), then rounds that define blocks again, with
    /// extents capped at `cap` blocks so that runs are split and spilled.
    /// The committed segment, read back from a freshly opened chain,
    /// restores exactly the model's image, and the defined bytes match.
    fn model_case(seed: u64, cap: u32) {
        let mut x = seed | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let blocks = 64 + rnd(200);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut chain = Chain::open_or_create(&path, None).unwrap();
        let seed_prints = chain.seed();
        // A full, all-zero snapshot first: what the segment under test does
        // not define comes from it.
        let plan = |seq: u64, full: bool| SegmentPlan {
            kind: SegmentKind::Snapshot,
            snapshot_id: Uuid::new_v4(),
            seq,
            device_size: blocks * 4096,
            full,
            meta: SegMeta::default(),
            removes: Vec::new(),
        };
        let mut w = SegmentWriter::begin(&mut chain, plan(1, true)).unwrap();
        w.append_zero(0, blocks).unwrap();
        w.commit(SegStats::default()).unwrap();
        let plan = plan(2, false);
        let id = plan.snapshot_id;
        // None: not defined by the segment; Some(None): zero; Some(data).
        let mut model: Vec<Option<Option<Vec<u8>>>> = vec![None; blocks as usize];
        let mut w = SegmentWriter::begin(&mut chain, plan).unwrap();
        w.in_order.cap = cap;
        let mut version = 0u64;
        let mut data_of = |b: u64| {
            version += 1;
            let mut v = vec![0u8; 4096];
            for (i, c) in v.chunks_mut(8).enumerate() {
                c.copy_from_slice(&(b << 40 | version << 16 | i as u64).to_le_bytes());
            }
            v
        };
        let print = |d: &[u8]| crate::fingerprint::fingerprint(d, seed_prints);
        let mut b = 0u64;
        while b < blocks {
            let n = (1 + rnd(6)).min(blocks - b);
            match rnd(3) {
                0 => {}
                1 => {
                    w.append_zero(b, n).unwrap();
                    for k in b..b + n {
                        model[k as usize] = Some(None);
                    }
                }
                _ => {
                    let mut data = Vec::new();
                    let mut prints = Vec::new();
                    for k in b..b + n {
                        let d = data_of(k);
                        prints.push(print(&d));
                        data.extend_from_slice(&d);
                        model[k as usize] = Some(Some(d));
                    }
                    w.append_data(b, &data, &prints).unwrap();
                }
            }
            b += n;
        }
        for _round in 0..rnd(4) {
            let mut b = rnd(blocks);
            while b < blocks {
                if rnd(4) == 0 {
                    w.append_zero(b, 1).unwrap();
                    model[b as usize] = Some(None);
                    b += 1;
                } else {
                    // Runs of a few blocks, some reaching past the blocks
                    // the first pass defined.
                    let n = (1 + rnd(3)).min(blocks - b);
                    let mut data = Vec::new();
                    let mut prints = Vec::new();
                    for k in b..b + n {
                        let d = data_of(k);
                        prints.push(print(&d));
                        data.extend_from_slice(&d);
                        model[k as usize] = Some(Some(d));
                    }
                    w.append_data(b, &data, &prints).unwrap();
                    b += n;
                }
                b += rnd(9);
            }
        }
        let (all, zero) = w.defined_bytes().unwrap();
        let defined = model.iter().filter(|m| m.is_some()).count() as u64;
        let zeros = model.iter().filter(|m| matches!(m, Some(None))).count() as u64;
        assert_eq!((all, zero), (defined * 4096, zeros * 4096));
        w.commit(SegStats::default()).unwrap();
        drop(chain);
        let chain = Chain::open(&path, crate::chain::Access::Read).unwrap();
        let image = dir.path().join("image");
        crate::chain::restore::restore(&chain, id, &image, &Default::default()).unwrap();
        let got = std::fs::read(&image).unwrap();
        for (b, m) in model.iter().enumerate() {
            let want = match m {
                Some(Some(d)) => d.clone(),
                _ => vec![0u8; 4096],
            };
            assert!(
                got[b * 4096..(b + 1) * 4096] == want[..],
                "seed {seed} cap {cap}: block {b} restores wrong"
            );
        }
        let prints = chain.resolve(id).unwrap().fingerprints(&chain).unwrap();
        for (b, m) in model.iter().enumerate() {
            if let Some(Some(d)) = m {
                assert_eq!(
                    prints[b],
                    print(d),
                    "seed {seed} cap {cap}: block {b}'s fingerprint"
                );
            }
        }
        // Extents never exceed the cap, and the index was spilled and read
        // back through the file (nothing cached from the writer).
        let idx = chain.index(chain.snapshots()[1].segment).unwrap();
        assert!(idx.extents.iter().all(|x| x.count <= cap));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn spilled_index_restores_the_model(seed in proptest::prelude::any::<u64>(), cap in 1u32..6) {
            model_case(seed, cap);
        }
    }

    #[test]
    fn spilled_index_with_the_real_cap() {
        for seed in 1..20 {
            model_case(seed, EXTENT_BLOCKS);
        }
    }

    /// A later round's run that reaches past the blocks the first pass
    /// defined, then a newer read of one of those blocks (the re-read under
    /// freeze): the newest read is what the snapshot holds. (Found by the
    /// model test: the run's blocks past the in-order end used to become
    /// overrides, which beat the newer in-order append.)
    #[test]
    fn a_newer_read_past_the_first_pass_wins() {
        let (dir, mut chain) = new_chain();
        let (id, plan) = full_plan(8 * 4096);
        let block = |v: u8| vec![v; 4096];
        let mut w = SegmentWriter::begin(&mut chain, plan).unwrap();
        // First pass: blocks 0..4 (4..8 come later).
        let first: Vec<u8> = (0..4u8).flat_map(|v| block(v + 1)).collect();
        w.append_data(0, &first, &[1, 2, 3, 4]).unwrap();
        // A live round: blocks 3, 4, 5 written meanwhile.
        let round: Vec<u8> = [30u8, 40, 50].iter().flat_map(|&v| block(v)).collect();
        w.append_data(3, &round, &[30, 40, 50]).unwrap();
        // Under freeze: block 4 again, and zeros for 5 and 6; then the rest.
        w.append_data(4, &block(44), &[44]).unwrap();
        w.append_zero(5, 2).unwrap();
        w.append_zero(7, 1).unwrap();
        w.commit(SegStats::default()).unwrap();
        let restored = dir.path().join("img");
        crate::chain::restore::restore(&chain, id, &restored, &Default::default()).unwrap();
        let got = std::fs::read(&restored).unwrap();
        let want: Vec<u8> = [1u8, 2, 3, 30, 44, 0, 0, 0]
            .iter()
            .flat_map(|&v| block(v))
            .collect();
        for b in 0..8 {
            assert!(
                got[b * 4096..(b + 1) * 4096] == want[b * 4096..(b + 1) * 4096],
                "block {b} holds {} instead of {}",
                got[b * 4096],
                want[b * 4096]
            );
        }
    }
}
