//! Reading stored blocks back out of a chain, checked: every block against
//! the crc32 its segment's index recorded for it. Restore, revert and
//! verify all read through here, so a damaged block is reported the same
//! way whoever meets it, naming the block and where it is stored.

use std::io;
use std::os::fd::AsFd;

use uuid::Uuid;

use super::format::BLOCK_RECORD_LEN;
use super::resolve::Records;
use super::{Chain, ChainError, Origin, Plan, Run};
use crate::fingerprint::fingerprint;
use crate::sys;

/// Why stored blocks could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("snapshot {snapshot} is damaged: block {block} (device offset {offset}) stored at chain offset {chain_offset} fails its checksum")]
    Corrupt {
        snapshot: Uuid,
        block: u64,
        offset: u64,
        chain_offset: u64,
    },
}

/// Consecutive blocks of an image stored consecutively in the chain file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// First block of the image.
    pub block: u64,
    pub count: u64,
    /// Where the first block is stored.
    pub chain_offset: u64,
    /// Where the first block's record (fingerprint, crc32) is.
    pub records: u64,
}

/// Read exactly `buf.len()` bytes of the chain file at `offset`; a file that
/// ends first is an error naming where.
pub fn read_exact_at(chain: &Chain, buf: &mut [u8], offset: u64) -> Result<(), ChainError> {
    read_exact_from(chain, chain.file(), buf, offset)
}

/// [`read_exact_at`] for index records, through the chain's second open
/// of its file.
pub(crate) fn read_records_at(
    chain: &Chain,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ChainError> {
    read_exact_from(chain, chain.records_file(), buf, offset)
}

fn read_exact_from(
    chain: &Chain,
    file: &std::fs::File,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ChainError> {
    let err = |offset, source| ChainError::Read {
        path: chain.path().to_path_buf(),
        offset,
        source,
    };
    let n = sys::pread_full(file.as_fd(), buf, offset).map_err(|e| err(offset, e))?;
    if n != buf.len() {
        return Err(err(
            offset + n as u64,
            io::Error::from(io::ErrorKind::UnexpectedEof),
        ));
    }
    Ok(())
}

/// The blocks of `data` (block size `bs`, the last one possibly short)
/// whose crc32 is not the one `records` holds for it (from record `first`
/// on), or, with the chain's seed, whose fingerprint is not either.
pub fn failing_blocks(
    data: &[u8],
    bs: usize,
    records: &Records,
    first: usize,
    seed: Option<u64>,
) -> Vec<usize> {
    data.chunks(bs)
        .enumerate()
        .filter(|(i, block)| {
            crc32fast::hash(block) != records.crc(first + *i)
                || seed.is_some_and(|seed| fingerprint(block, seed) != records.print(first + *i))
        })
        .map(|(i, _)| i)
        .collect()
}

/// Reads a snapshot's stored blocks, as its plan locates them.
#[derive(Debug)]
pub struct BlockReader<'a> {
    chain: &'a Chain,
    plan: &'a Plan,
}

impl<'a> BlockReader<'a> {
    pub fn new(chain: &'a Chain, plan: &'a Plan) -> BlockReader<'a> {
        BlockReader { chain, plan }
    }

    /// Bytes of the image `s` covers (the image's last block may be short).
    pub fn len(&self, s: &Stored) -> u64 {
        let bs = self.plan.block_size as u64;
        (s.count * bs).min(self.plan.device_size() - s.block * bs)
    }

    /// The plan's stored runs in block order, each cut to at most
    /// `max_blocks` blocks.
    pub fn pieces(&self, max_blocks: u64) -> Vec<Stored> {
        let bs = self.plan.block_size as u64;
        let mut out = Vec::new();
        for r in &self.plan.runs {
            let Origin::Data { offset, records } = r.source else {
                continue;
            };
            let mut done = 0;
            while done < r.count {
                let count = (r.count - done).min(max_blocks.max(1));
                out.push(Stored {
                    block: r.block + done,
                    count,
                    chain_offset: offset + done * bs,
                    records: records + done * BLOCK_RECORD_LEN,
                });
                done += count;
            }
        }
        out
    }

    /// Where image block `block` of data run `run` is stored (one block);
    /// `None` for a zero run or a block outside the run.
    pub fn block(&self, run: &Run, block: u64) -> Option<Stored> {
        let Origin::Data { offset, records } = run.source else {
            return None;
        };
        if block < run.block || block >= run.block + run.count {
            return None;
        }
        let k = block - run.block;
        Some(Stored {
            block,
            count: 1,
            chain_offset: offset + k * self.plan.block_size as u64,
            records: records + k * BLOCK_RECORD_LEN,
        })
    }

    /// Append the bytes of `pieces` to `buf`, in order, reading pieces that
    /// are adjacent in the chain file with one read, and check every block
    /// before returning. What was read is dropped from the page cache.
    pub fn read(&self, buf: &mut Vec<u8>, pieces: &[Stored]) -> Result<(), ReadError> {
        let start = buf.len();
        let mut i = 0;
        while i < pieces.len() {
            let from = pieces[i].chain_offset;
            let mut len = self.len(&pieces[i]);
            let mut j = i + 1;
            while j < pieces.len() && pieces[j].chain_offset == from + len {
                len += self.len(&pieces[j]);
                j += 1;
            }
            let at = buf.len();
            buf.resize(at + len as usize, 0);
            read_exact_at(self.chain, &mut buf[at..], from)?;
            let _ = sys::drop_cache(self.chain.file().as_fd(), from, len);
            i = j;
        }
        self.check(&buf[start..], pieces)
    }

    /// Check `data`, the bytes of `pieces` one after the other, against
    /// the crc32s their segments' indexes hold. Records that lie close
    /// together in the file (a run's, or neighbouring small extents') are
    /// read with one pread.
    fn check(&self, data: &[u8], pieces: &[Stored]) -> Result<(), ReadError> {
        let bs = self.plan.block_size as u64;
        let mut records = Records::default();
        let mut at = 0usize;
        let mut i = 0;
        while i < pieces.len() {
            let from = pieces[i].records;
            let mut end = from + pieces[i].count * BLOCK_RECORD_LEN;
            let mut j = i + 1;
            while j < pieces.len() {
                let (r, n) = (pieces[j].records, pieces[j].count * BLOCK_RECORD_LEN);
                if r < end || r - end > RECORD_GAP || r + n - from > RECORD_SPAN {
                    break;
                }
                end = r + n;
                j += 1;
            }
            records.read_span(self.chain, from, end - from)?;
            for p in &pieces[i..j] {
                for k in 0..p.count {
                    let b = p.block + k;
                    let blen = self.plan.block_len(b) as usize;
                    let o = at + (k * bs) as usize;
                    let crc = records.crc_at((p.records - from + k * BLOCK_RECORD_LEN) as usize);
                    if crc32fast::hash(&data[o..o + blen]) != crc {
                        return Err(ReadError::Corrupt {
                            snapshot: self.plan.snapshot.id,
                            block: b,
                            offset: b * bs,
                            chain_offset: p.chain_offset + k * bs,
                        });
                    }
                }
                at += self.len(p) as usize;
            }
            i = j;
        }
        Ok(())
    }
}

/// `len` bytes (a multiple of 8) of a pattern with no zero block, for tests.
#[cfg(test)]
pub(crate) fn patterned(len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).to_le_bytes())
        .collect()
}

/// Records of pieces at most this far apart are read together...
const RECORD_GAP: u64 = 4096;
/// ...in spans of at most this many bytes.
const RECORD_SPAN: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Access;
    use crate::take::{take, TakeOptions};

    /// Scattered blocks of an increment, each its own extent with its
    /// records between other extents' heads, and a run from the full
    /// snapshot before it: read in one call (their records in spans), every
    /// block is checked against its own record, and a bad one is named.
    #[test]
    fn scattered_blocks_are_checked_against_their_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mut data = crate::chain::read::patterned(1 << 20);
        std::fs::write(&img, &data).unwrap();
        let chain_path = dir.path().join("c");
        let sys = std::sync::Arc::new(crate::quiesce::Host);
        take(sys.clone(), &img, &chain_path, &TakeOptions::default()).unwrap();
        for b in [3usize, 5, 9, 10, 200, 255] {
            data[b * 4096..(b + 1) * 4096].fill(b as u8 ^ 0x5a);
        }
        std::fs::write(&img, &data).unwrap();
        let id = take(sys, &img, &chain_path, &TakeOptions::default())
            .unwrap()
            .snapshot
            .id;
        let chain = Chain::open(&chain_path, Access::Read).unwrap();
        let plan = chain.resolve(id).unwrap();
        let r = BlockReader::new(&chain, &plan);
        let pieces = r.pieces(1 << 20);
        assert!(pieces.len() >= 7, "{pieces:?}");
        let mut buf = Vec::new();
        r.read(&mut buf, &pieces).unwrap();
        let differ: Vec<usize> = (0..256)
            .filter(|b| buf[b * 4096..(b + 1) * 4096] != data[b * 4096..(b + 1) * 4096])
            .collect();
        assert!(differ.is_empty(), "{differ:?} {pieces:?}");
        let mut prints = Vec::new();
        plan.visit_fingerprints(&chain, |b, p| prints.push((b, p)))
            .unwrap();
        for (b, p) in prints {
            let blk = &data[b as usize * 4096..(b as usize + 1) * 4096];
            assert_eq!(p, fingerprint(blk, chain.seed()), "block {b}");
        }
        // Block 10 (the second of the extent of blocks 9 and 10) is damaged.
        let run = plan
            .runs
            .iter()
            .find(|x| x.block <= 10 && 10 < x.block + x.count)
            .unwrap();
        let at = r.block(run, 10).unwrap().chain_offset;
        drop(chain);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&chain_path)
                .unwrap();
            f.write_all_at(b"X", at + 100).unwrap();
        }
        let chain = Chain::open(&chain_path, Access::Read).unwrap();
        let plan = chain.resolve(id).unwrap();
        let r = BlockReader::new(&chain, &plan);
        match r.read(&mut Vec::new(), &r.pieces(1 << 20)) {
            Err(ReadError::Corrupt { block, .. }) => assert_eq!(block, 10),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_block_is_checked_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let data = crate::chain::read::patterned(1 << 20);
        std::fs::write(&img, &data).unwrap();
        let chain_path = dir.path().join("c");
        let sys = std::sync::Arc::new(crate::quiesce::Host);
        let out = take(sys, &img, &chain_path, &TakeOptions::default()).unwrap();
        let id = out.snapshot.id;
        let chain = Chain::open(&chain_path, Access::Read).unwrap();
        let plan = chain.resolve(id).unwrap();
        let r = BlockReader::new(&chain, &plan);
        let pieces = r.pieces(16);
        assert_eq!(pieces.iter().map(|p| p.count).sum::<u64>(), 256);
        let mut buf = Vec::new();
        r.read(&mut buf, &pieces).unwrap();
        assert!(buf == data);
        // Damage block 37 in the file: reading it names it.
        let p = r.block(&plan.runs[0], 37).unwrap();
        drop(chain);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&chain_path)
                .unwrap();
            f.write_all_at(b"X", p.chain_offset + 5).unwrap();
        }
        let chain = Chain::open(&chain_path, Access::Read).unwrap();
        let plan = chain.resolve(id).unwrap();
        let r = BlockReader::new(&chain, &plan);
        let mut buf = Vec::new();
        match r.read(&mut buf, &r.pieces(1000)) {
            Err(ReadError::Corrupt {
                block,
                chain_offset,
                ..
            }) => {
                assert_eq!(block, 37);
                assert_eq!(chain_offset, p.chain_offset);
            }
            other => panic!("{other:?}"),
        }
        let mut records = Records::default();
        records.read(&chain, p.records, 1).unwrap();
        let good = failing_blocks(
            &data[37 * 4096..38 * 4096],
            4096,
            &records,
            0,
            Some(chain.seed()),
        );
        assert!(good.is_empty());
        let bad = failing_blocks(&data[36 * 4096..37 * 4096], 4096, &records, 0, None);
        assert_eq!(bad, [0]);
    }
}
