//! Checking every record of every snapshot of a chain.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use uuid::Uuid;

use super::format::Location;
use super::read::{failing_blocks, read_exact_at};
use super::{Chain, Records};
use crate::sys;

/// One thing that does not check out.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The snapshot it belongs to, when known.
    pub snapshot: Option<Uuid>,
    pub name: Option<String>,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.snapshot, &self.name) {
            (Some(id), Some(n)) if !n.is_empty() => {
                write!(f, "snapshot {id} ({n}): {}", self.detail)
            }
            (Some(id), _) => write!(f, "snapshot {id}: {}", self.detail),
            _ => write!(f, "{}", self.detail),
        }
    }
}

/// The result of [`verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub snapshots: usize,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    /// Bytes after the last committed segment (left by an interrupted take;
    /// not damage, cut off by the next take).
    pub torn_tail_bytes: u64,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the chain's structure and every stored block of every live snapshot
/// against its crc32 and fingerprint.
pub fn verify(chain: &Chain, progress: Option<&AtomicU64>) -> Report {
    verify_in(chain, progress, VERIFY_BLOCKS, RECORD_BLOCKS)
}

/// [`verify`], reading `piece` blocks and `group` records (a multiple of
/// `piece`) at a time.
fn verify_in(chain: &Chain, progress: Option<&AtomicU64>, piece: u64, group: u64) -> Report {
    let mut report = Report {
        snapshots: chain.snapshots().len(),
        torn_tail_bytes: chain.torn_tail(),
        ..Default::default()
    };
    let owner = |offset: u64| {
        chain
            .segments()
            .iter()
            .find(|s| s.info.start <= offset && offset < s.info.end())
            .map(|s| s.info.snapshot_id)
    };
    for d in chain.damage() {
        let snapshot = owner(d.offset).filter(|id| !id.is_nil());
        report.problems.push(Problem {
            snapshot,
            name: None,
            detail: d.detail.clone(),
        });
    }
    let bs = chain.block_size() as u64;
    let seed = chain.seed();
    let fd = chain.file().as_fd();
    let mut buf = Vec::new();
    let mut records = Records::default();
    // Bytes no checksum covers must be zero: any other value is damage too.
    for (from, to, snapshot) in padding(chain) {
        buf.resize((to - from) as usize, 0);
        let ok = match sys::pread_full(fd, &mut buf, from) {
            Ok(n) => buf[..n].iter().all(|&b| b == 0),
            Err(_) => false,
        };
        if !ok {
            report.problems.push(Problem {
                snapshot,
                name: None,
                detail: format!(
                    "padding at chain offset {from}..{to} holds unexpected bytes (damage)"
                ),
            });
        }
    }
    for snap in chain.snapshots() {
        let problem = |detail: String| Problem {
            snapshot: Some(snap.id),
            name: Some(snap.name.clone()),
            detail,
        };
        if let Some(d) = &snap.damaged {
            if !chain
                .damage()
                .iter()
                .any(|x| x.detail.contains(&snap.id.to_string()))
            {
                report.problems.push(problem(d.clone()));
            }
        }
        let idx = match chain.extents(snap.segment) {
            Ok(i) => i,
            Err(e) => {
                report.problems.push(problem(crate::util::error_chain(&e)));
                continue;
            }
        };
        let index_start = chain.segments()[snap.segment].info.index_start();
        for (k, x) in idx.extents.iter().enumerate() {
            let Location::Data(off) = x.location else {
                continue;
            };
            // An extent is read and checked in pieces of at most
            // `piece` blocks; its records are read `group` at a
            // time, before the data they cover, so the data reads stay
            // sequential and the kernel's read-ahead keeps up.
            let mut bad: Vec<u64> = Vec::new();
            let mut unreadable = None;
            let mut done = 0u64;
            let mut held = 0u64;
            while done < x.count as u64 {
                let n = (x.count as u64 - done).min(piece);
                let first = x.block + done;
                let at = off + done * bs;
                let len = ((first + n) * bs).min(snap.device_size) - first * bs;
                let mut read = Ok(());
                if done % group == 0 {
                    held = done;
                    let r = (x.count as u64 - done).min(group);
                    read = records.read(chain, index_start + idx.record_at(k, done), r);
                }
                buf.resize(len as usize, 0);
                let read = read.and_then(|()| read_exact_at(chain, &mut buf, at));
                if let Err(e) = read {
                    unreadable = Some(format!(
                        "extent at device offset {} ({} bytes) stored at chain offset {off}: {}",
                        x.block * bs,
                        (x.end_block() * bs).min(snap.device_size) - x.block * bs,
                        crate::util::error_chain(&e)
                    ));
                    break;
                }
                // Dropped from the page cache a group at a time: each call
                // costs about a millisecond whatever its length.
                if done + n == x.count as u64 || (done + n) % group == 0 {
                    let from = off + held * bs;
                    let _ = sys::drop_cache(fd, from, at + len - from);
                }
                bad.extend(
                    failing_blocks(
                        &buf,
                        bs as usize,
                        &records,
                        (done - held) as usize,
                        Some(seed),
                    )
                    .into_iter()
                    .map(|i| first + i as u64),
                );
                report.blocks_checked += n;
                report.bytes_checked += len;
                if let Some(p) = progress {
                    p.fetch_add(len, Ordering::Relaxed);
                }
                done += n;
            }
            if let Some(u) = unreadable {
                report.problems.push(problem(u));
                continue;
            }
            if !bad.is_empty() {
                let len = (x.end_block() * bs).min(snap.device_size) - x.block * bs;
                report.problems.push(problem(format!(
                    "extent at device offset {} ({} bytes, blocks {}..{}) stored at chain offset {off}: {} block(s) fail their checksum, first block {} (device offset {})",
                    x.block * bs,
                    len,
                    x.block,
                    x.end_block(),
                    bad.len(),
                    bad[0],
                    bad[0] * bs
                )));
            }
        }
        if let Err(e) = chain.resolve(snap.id) {
            report.problems.push(problem(crate::util::error_chain(&e)));
        }
    }
    report
}

/// Blocks read and checked at a time (8 MiB of 4 KiB blocks).
const VERIFY_BLOCKS: u64 = 2048;
/// Block records read at a time (768 KiB); a multiple of VERIFY_BLOCKS.
const RECORD_BLOCKS: u64 = 32 * VERIFY_BLOCKS;

/// Ranges of the file that must be zero: the rest of the file header, and
/// in each segment the header area after the meta area and the gap between
/// the index and the footer.
fn padding(chain: &Chain) -> Vec<(u64, u64, Option<Uuid>)> {
    use super::format::{COMMIT_LEN, FILE_HEADER_LEN, FOOTER_LEN};
    let mut out = vec![(76, FILE_HEADER_LEN, None)];
    for s in chain.segments() {
        let id = (!s.info.snapshot_id.is_nil()).then_some(s.info.snapshot_id);
        if let Some(meta) = &s.meta {
            let meta_end =
                s.info.start + COMMIT_LEN as u64 + super::format::encode_meta(meta).len() as u64;
            if meta_end < s.info.data_start() {
                out.push((meta_end, s.info.data_start(), id));
            }
        }
        let index_end = s.info.index_start() + s.info.index_len;
        let footer = s.info.end() - FOOTER_LEN;
        if index_end < footer {
            out.push((index_end, footer, id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Access;
    use crate::take::{take, TakeOptions};

    /// An extent longer than a group of records (as older builds wrote
    /// them) is checked block by block against the right records, and a
    /// damaged block in a later group is the one named.
    #[test]
    fn long_extents_are_checked_group_by_group() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let data = crate::chain::read::patterned(1 << 20);
        std::fs::write(&img, &data).unwrap();
        let path = dir.path().join("c");
        let sys = std::sync::Arc::new(crate::quiesce::Host);
        take(sys, &img, &path, &TakeOptions::default()).unwrap();
        let chain = Chain::open(&path, Access::Read).unwrap();
        let seg = chain.snapshots()[0].segment;
        let idx = chain.extents(seg).unwrap();
        assert_eq!(idx.extents.len(), 1, "one extent of 256 blocks");
        let Location::Data(off) = idx.extents[0].location else {
            panic!("{idx:?}")
        };
        for (piece, group) in [(2, 6), (5, 5), (7, 21), (256, 256)] {
            let r = verify_in(&chain, None, piece, group);
            assert!(r.ok(), "{piece}/{group}: {:?}", r.problems);
            assert_eq!(r.blocks_checked, 256);
            assert_eq!(r.bytes_checked, 1 << 20);
        }
        drop(chain);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(b"X", off + 200 * 4096 + 9).unwrap();
        }
        let chain = Chain::open(&path, Access::Read).unwrap();
        for (piece, group) in [(2, 6), (7, 21)] {
            let r = verify_in(&chain, None, piece, group);
            assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
            let d = &r.problems[0].detail;
            assert!(
                d.contains("1 block(s) fail their checksum, first block 200 "),
                "{d}"
            );
        }
    }
}
