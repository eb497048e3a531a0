//! Resolving a snapshot into the runs of blocks that make up its image.

use uuid::Uuid;

use super::format::*;
use super::{Chain, ChainError, Snapshot};
use crate::fingerprint::ZeroPrints;

/// Where one run of a snapshot's image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Zero,
    /// Stored bytes at `offset` in the chain file, blocks back to back;
    /// `records` is where the first block's fingerprint and crc32 are in
    /// its segment's index (the others follow, [`BLOCK_RECORD_LEN`] bytes
    /// each). They are read as blocks are, so a plan holds no per-block data.
    Data {
        offset: u64,
        records: u64,
    },
}

/// A run of blocks of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub block: u64,
    pub count: u64,
    pub source: Origin,
}

/// How to build the image of one snapshot: runs sorted by block, covering
/// every block exactly once.
#[derive(Debug)]
pub struct Plan {
    pub snapshot: Snapshot,
    pub block_size: u32,
    pub runs: Vec<Run>,
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

    /// The fingerprint of every block of the image (8 bytes a block of the
    /// device: for callers that hold it whole anyway).
    pub fn fingerprints(&self, chain: &Chain) -> Result<Vec<u64>, ChainError> {
        let n = self.device_size().div_ceil(self.block_size as u64);
        let mut out = vec![0u64; n as usize];
        self.visit_fingerprints(chain, |b, p| out[b as usize] = p)?;
        Ok(out)
    }

    /// Call `f(block, fingerprint)` for every block of the image, in order,
    /// reading the stored blocks' fingerprints from `chain` as it goes.
    pub fn visit_fingerprints(
        &self,
        chain: &Chain,
        mut f: impl FnMut(u64, u64),
    ) -> Result<(), ChainError> {
        let mut c = self.print_cursor(chain);
        for b in 0..self.device_size().div_ceil(self.block_size as u64) {
            f(b, c.get(b)?);
        }
        Ok(())
    }

    /// A cursor over the image's fingerprints (see [`PrintCursor`]).
    pub fn print_cursor<'a>(&'a self, chain: &'a Chain) -> PrintCursor<'a> {
        PrintCursor {
            plan: self,
            chain,
            zero: ZeroPrints::new(chain.seed(), self.block_size as usize),
            run: 0,
            records: Records::default(),
            held: 0,
            count: 0,
        }
    }
}

/// The fingerprints of a plan's blocks, asked for in increasing block
/// order, read from the chain a bounded number of records at a time.
#[derive(Debug)]
pub struct PrintCursor<'a> {
    plan: &'a Plan,
    chain: &'a Chain,
    zero: ZeroPrints,
    run: usize,
    records: Records,
    /// The records held are those of blocks `held..held + count` of run `run`.
    held: u64,
    count: u64,
}

impl PrintCursor<'_> {
    /// The fingerprint of block `b`; `b` must not be below the last asked.
    pub fn get(&mut self, b: u64) -> Result<u64, ChainError> {
        let runs = &self.plan.runs;
        while runs[self.run].block + runs[self.run].count <= b {
            self.run += 1;
            self.count = 0;
        }
        let r = runs[self.run];
        debug_assert!(r.block <= b, "blocks asked for out of order");
        match r.source {
            Origin::Zero => Ok(self.zero.get(self.plan.block_len(b) as usize)),
            Origin::Data { records, .. } => {
                if b < self.held || b >= self.held + self.count {
                    let k = (r.block + r.count - b).min(RECORDS_PER_READ);
                    self.records
                        .read(self.chain, records + (b - r.block) * BLOCK_RECORD_LEN, k)?;
                    self.held = b;
                    self.count = k;
                }
                Ok(self.records.print((b - self.held) as usize))
            }
        }
    }
}

/// Block records read per pread when walking a plan's fingerprints.
const RECORDS_PER_READ: u64 = 65536;

/// Block records (fingerprint and crc32 of stored blocks) read from a
/// segment's index.
#[derive(Debug, Default)]
pub struct Records {
    bytes: Vec<u8>,
}

impl Records {
    /// Read the `count` records at chain offset `at`, replacing what was held.
    pub fn read(&mut self, chain: &Chain, at: u64, count: u64) -> Result<(), ChainError> {
        self.bytes.clear();
        self.bytes.resize((count * BLOCK_RECORD_LEN) as usize, 0);
        super::read::read_records_at(chain, &mut self.bytes, at)
    }

    /// Read `len` bytes of records at chain offset `at` (a span that may
    /// hold other bytes between the records wanted; see [`Records::crc_at`]).
    pub(crate) fn read_span(&mut self, chain: &Chain, at: u64, len: u64) -> Result<(), ChainError> {
        self.bytes.clear();
        self.bytes.resize(len as usize, 0);
        super::read::read_records_at(chain, &mut self.bytes, at)
    }

    /// The fingerprint in record `i` (counted in records from the start).
    pub fn print(&self, i: usize) -> u64 {
        let at = i * BLOCK_RECORD_LEN as usize;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }

    /// The crc32 in record `i`.
    pub fn crc(&self, i: usize) -> u32 {
        let at = i * BLOCK_RECORD_LEN as usize + 8;
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }

    /// The crc32 of the record at byte `at` of what is held.
    pub(crate) fn crc_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at + 8..at + 12].try_into().unwrap())
    }
}

impl Chain {
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
        for snap in self.snapshots[..=pos].iter().rev() {
            if remaining == 0 {
                break;
            }
            let seg = snap.segment;
            let idx = self.extents(seg)?;
            let index_start = self.segments[seg].info.index_start();
            for (k, x) in idx.extents.iter().enumerate() {
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
                        Location::Zero => Origin::Zero,
                        Location::Data(off) => Origin::Data {
                            offset: off + delta * bs,
                            records: index_start + idx.record_at(k, delta),
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

    /// Every block's fingerprint, walked whole (checked against the data)
    /// or asked for at strides (the cursor reloading its records mid-run),
    /// across data runs of two segments and zero runs.
    #[test]
    fn the_print_cursor_agrees_with_the_whole_list() {
        use crate::take::{take, TakeOptions};
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mut data = crate::chain::read::patterned(1 << 20);
        data[100 * 4096..120 * 4096].fill(0);
        std::fs::write(&img, &data).unwrap();
        let path = dir.path().join("c");
        let sys = std::sync::Arc::new(crate::quiesce::Host);
        take(sys.clone(), &img, &path, &TakeOptions::default()).unwrap();
        for b in [3usize, 4, 9, 110, 200, 255] {
            data[b * 4096..(b + 1) * 4096].fill(b as u8 ^ 0x5a);
        }
        data[30 * 4096..31 * 4096].fill(0);
        std::fs::write(&img, &data).unwrap();
        let id = take(sys, &img, &path, &TakeOptions::default())
            .unwrap()
            .snapshot
            .id;
        let chain = Chain::open(&path, super::super::Access::Read).unwrap();
        let plan = chain.resolve(id).unwrap();
        assert!(plan.runs.len() > 8, "{:?}", plan.runs);
        let all = plan.fingerprints(&chain).unwrap();
        assert_eq!(all.len(), 256);
        for (b, p) in all.iter().enumerate() {
            let blk = &data[b * 4096..(b + 1) * 4096];
            assert_eq!(
                *p,
                crate::fingerprint::fingerprint(blk, chain.seed()),
                "block {b}"
            );
        }
        for step in [1, 2, 3, 7, 64] {
            let mut c = plan.print_cursor(&chain);
            for b in (0..256).step_by(step) {
                assert_eq!(c.get(b as u64).unwrap(), all[b], "step {step}, block {b}");
            }
        }
    }

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
