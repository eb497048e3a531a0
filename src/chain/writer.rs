//! Appending one segment to a chain, crash-safely.
//!
//! Order of writes: meta area and data, then index and footer; fdatasync;
//! then the 512-byte commit record at the segment's start; fdatasync. Until
//! the commit record is durable the segment does not exist: a crash leaves a
//! tail whose first sector is zero, which the next writer cuts off.

use std::os::fd::AsFd;

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
    index: Index,
    /// Blocks appended out of order or again (a take's later rounds): the
    /// newest definition of each, merged over `index` at commit.
    overrides: std::collections::BTreeMap<u64, Override>,
    behind: WriteBehind,
    /// Data appended but not yet written: small appends (a tracked take's
    /// scattered blocks) go to the file in writes of up to
    /// [`COALESCE_BYTES`], which costs a fraction of one write per block.
    /// It ends at `data_pos`; nothing reads it before [`SegmentWriter::commit`]
    /// writes it out, and a crash loses only an uncommitted segment.
    pending: Vec<u8>,
    done: bool,
}

/// The largest write the segment writer gathers small appends into.
const COALESCE_BYTES: usize = 1 << 20;

/// A block defined after the in-order appends passed it.
#[derive(Clone, Copy, Debug)]
struct Override {
    location: Location,
    print: u64,
    crc: u32,
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
        let data_pos = start + header_len;
        Ok(SegmentWriter {
            chain,
            start,
            header_len,
            meta_bytes,
            data_pos,
            index: Index {
                removes: plan.removes.clone(),
                ..Default::default()
            },
            overrides: Default::default(),
            plan,
            behind: WriteBehind::new(data_pos),
            pending: Vec::new(),
            done: false,
        })
    }

    /// Set the device size once the device is open (before any data).
    pub fn set_device_size(&mut self, size: u64) {
        self.plan.device_size = size;
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
        if first < self.in_order_end() {
            for (i, (p, block)) in prints.iter().zip(data.chunks(bs)).enumerate() {
                self.overrides.insert(
                    first + i as u64,
                    Override {
                        location: Location::Data(off + (i * bs) as u64),
                        print: *p,
                        crc: crc32fast::hash(block),
                    },
                );
            }
            return Ok(());
        }
        let meta = self.index.prints.len();
        self.index.prints.extend_from_slice(prints);
        self.index.crcs.extend(data.chunks(bs).map(crc32fast::hash));
        self.push(first, prints.len() as u64, Location::Data(off), meta as u32);
        Ok(())
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
    pub fn append_zero(&mut self, first: u64, count: u64) {
        if first < self.in_order_end() {
            for b in first..first + count {
                self.overrides.insert(
                    b,
                    Override {
                        location: Location::Zero,
                        print: 0,
                        crc: 0,
                    },
                );
            }
            return;
        }
        self.push(first, count, Location::Zero, 0);
    }

    /// The block after the last one appended in order.
    fn in_order_end(&self) -> u64 {
        self.index.extents.last().map_or(0, |x| x.end_block())
    }

    /// Merge the blocks appended out of order over the in-order index.
    fn merge_overrides(&mut self) {
        if self.overrides.is_empty() {
            return;
        }
        let bs = self.chain.block_size() as u64;
        let base = std::mem::take(&mut self.index);
        self.index.removes = base.removes.clone();
        let overrides = std::mem::take(&mut self.overrides);
        let mut ov = overrides.into_iter().peekable();
        let emit_ov = |w: &mut Self, b: u64, o: Override| match o.location {
            Location::Zero => w.push(b, 1, Location::Zero, 0),
            Location::Data(_) => {
                let meta = w.index.prints.len() as u32;
                w.index.prints.push(o.print);
                w.index.crcs.push(o.crc);
                w.push(b, 1, o.location, meta);
            }
        };
        for x in &base.extents {
            let mut b = x.block;
            while b < x.end_block() {
                while let Some((k, o)) = ov.next_if(|(k, _)| *k < b) {
                    emit_ov(self, k, o);
                }
                let next = ov
                    .peek()
                    .map(|(k, _)| *k)
                    .filter(|k| *k < x.end_block())
                    .unwrap_or(x.end_block());
                if next > b {
                    let d = b - x.block;
                    match x.location {
                        Location::Zero => self.push(b, next - b, Location::Zero, 0),
                        Location::Data(off) => {
                            let m = (x.meta as u64 + d) as usize;
                            let n = (next - b) as usize;
                            let meta = self.index.prints.len() as u32;
                            self.index.prints.extend_from_slice(&base.prints[m..m + n]);
                            self.index.crcs.extend_from_slice(&base.crcs[m..m + n]);
                            self.push(b, next - b, Location::Data(off + d * bs), meta);
                        }
                    }
                }
                if next < x.end_block() {
                    let (k, o) = ov.next().expect("peeked");
                    emit_ov(self, k, o);
                    b = next + 1;
                } else {
                    b = x.end_block();
                }
            }
        }
        for (k, o) in ov {
            emit_ov(self, k, o);
        }
    }

    /// Bytes of the blocks this segment defines, and of those the all-zero
    /// ones (what a snapshot records as changed and zero bytes).
    pub fn defined_bytes(&mut self) -> (u64, u64) {
        self.merge_overrides();
        let bs = self.chain.block_size() as u64;
        let size = self.plan.device_size;
        let (mut all, mut zero) = (0u64, 0u64);
        for x in &self.index.extents {
            let n = (x.end_block() * bs).min(size).saturating_sub(x.block * bs);
            all += n;
            if x.location == Location::Zero {
                zero += n;
            }
        }
        (all, zero)
    }

    /// Record blocks already stored elsewhere in the chain (a merge), with
    /// their fingerprints and crcs.
    pub fn append_reference(&mut self, first: u64, offset: u64, prints: &[u64], crcs: &[u32]) {
        let meta = self.index.prints.len();
        self.index.prints.extend_from_slice(prints);
        self.index.crcs.extend_from_slice(crcs);
        self.push(
            first,
            prints.len() as u64,
            Location::Data(offset),
            meta as u32,
        );
    }

    fn push(&mut self, first: u64, mut count: u64, location: Location, mut meta: u32) {
        let bs = self.chain.block_size() as u64;
        let mut first = first;
        let mut location = location;
        // Extend the previous extent when this one continues it on the device
        // and, for data, in the file.
        if let Some(last) = self.index.extents.last_mut() {
            let contiguous = last.end_block() == first
                && match (last.location, location) {
                    (Location::Zero, Location::Zero) => true,
                    (Location::Data(a), Location::Data(b)) => {
                        a + last.count as u64 * bs == b
                            && last.meta as u64 + last.count as u64 == meta as u64
                    }
                    _ => false,
                };
            if contiguous {
                let room = (u32::MAX - last.count) as u64;
                let take = room.min(count);
                last.count += take as u32;
                count -= take;
                if count == 0 {
                    return;
                }
                first += take;
                if let Location::Data(b) = location {
                    location = Location::Data(b + take * bs);
                    meta += take as u32;
                }
            }
        }
        while count > 0 {
            let c = count.min(u32::MAX as u64);
            self.index.extents.push(Extent {
                block: first,
                count: c as u32,
                location,
                meta,
            });
            count -= c;
            first += c;
            if let Location::Data(b) = location {
                location = Location::Data(b + c * bs);
                meta += c as u32;
            }
        }
    }

    /// Bytes of data written so far.
    pub fn data_len(&self) -> u64 {
        self.data_pos - self.start - self.header_len
    }

    /// The segment's total length if committed now.
    pub fn projected_len(&self) -> u64 {
        crate::util::round_up(
            self.header_len + self.data_len() + self.index.encoded_len() + FOOTER_LEN,
            ALIGN,
        )
    }

    /// Write index and footer, make them durable, then write and sync the
    /// commit record. Returns the committed segment's facts.
    pub fn commit(mut self, stats: SegStats) -> Result<SegInfo, ChainError> {
        self.write_pending()?;
        self.merge_overrides();
        let index_bytes = self.index.encode();
        let data_len = self.data_len();
        let len = crate::util::round_up(
            self.header_len + data_len + index_bytes.len() as u64 + FOOTER_LEN,
            ALIGN,
        );
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
            index_len: index_bytes.len() as u64,
            index_crc: crc32fast::hash(&index_bytes),
            block_size: self.chain.block_size(),
            device_size: self.plan.device_size,
        };
        let fd = self.chain.file.as_fd();
        let path = self.chain.path.clone();
        let werr = |source| ChainError::Write {
            path: path.clone(),
            source,
        };
        sys::pwrite_full(fd, &index_bytes, info.index_start()).map_err(werr)?;
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
        // The segment is committed; bring the in-memory view up to date.
        let index = std::sync::Arc::new(std::mem::take(&mut self.index));
        let seg = super::Segment {
            info,
            stats: Some(stats),
            meta: Some(self.plan.meta.clone()),
            footer_ok: true,
            index: std::sync::OnceLock::from(Ok(index)),
        };
        self.chain.segments.push(seg);
        self.chain.end = info.end();
        self.chain.compute_live()?;
        Ok(info)
    }
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

    /// Blocks defined again or out of order (a take's later rounds) win over
    /// the in-order appends, and every block is defined once.
    #[test]
    fn later_definitions_override_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut chain = Chain::open_or_create(&path, None).unwrap();
        let id = Uuid::new_v4();
        let plan = SegmentPlan {
            kind: SegmentKind::Snapshot,
            snapshot_id: id,
            seq: 1,
            device_size: 30 * 4096,
            full: true,
            meta: SegMeta::default(),
            removes: Vec::new(),
        };
        let block = |v: u8| vec![v; 4096];
        let mut w = SegmentWriter::begin(&mut chain, plan).unwrap();
        let mut data = Vec::new();
        for v in 0..5u8 {
            data.extend(block(v + 1));
        }
        w.append_data(0, &data, &[1, 2, 3, 4, 5]).unwrap();
        w.append_zero(5, 25);
        // Round two: block 2 changed, block 3 became zero, block 7 (inside
        // the zero run) got data.
        w.append_data(2, &block(33), &[33]).unwrap();
        w.append_zero(3, 1);
        w.append_data(7, &block(77), &[77]).unwrap();
        // Round three: block 2 again.
        w.append_data(2, &block(99), &[99]).unwrap();
        let (all, zero) = w.defined_bytes();
        assert_eq!(all, 30 * 4096);
        // 5..30 zero, less block 7 (data), plus block 3.
        assert_eq!(zero, 25 * 4096);
        w.commit(SegStats::default()).unwrap();
        let plan = chain.resolve(id).unwrap();
        let prints = plan.fingerprints(chain.seed());
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut chain = Chain::open_or_create(&path, None).unwrap();
        let id = Uuid::new_v4();
        let blocks = 1200u64;
        let plan = SegmentPlan {
            kind: SegmentKind::Snapshot,
            snapshot_id: id,
            seq: 1,
            device_size: blocks * 4096,
            full: true,
            meta: SegMeta::default(),
            removes: Vec::new(),
        };
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
                w.append_zero(b, 1);
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
}
