//! Checking every record of every snapshot of a chain.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use uuid::Uuid;

use super::format::Location;
use super::read::{failing_blocks, read_exact_at};
use super::Chain;
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
        let idx = match chain.index(snap.segment) {
            Ok(i) => i,
            Err(e) => {
                report.problems.push(problem(crate::util::error_chain(&e)));
                continue;
            }
        };
        for x in &idx.extents {
            let Location::Data(off) = x.location else {
                continue;
            };
            let len = (x.end_block() * bs).min(snap.device_size) - x.block * bs;
            buf.resize(len as usize, 0);
            if let Err(e) = read_exact_at(chain, &mut buf, off) {
                report.problems.push(problem(format!(
                    "extent at device offset {} ({len} bytes) stored at chain offset {off}: {}",
                    x.block * bs,
                    crate::util::error_chain(&e)
                )));
                continue;
            }
            let _ = sys::drop_cache(fd, off, len);
            let m = x.meta as usize;
            let n = x.count as usize;
            let bad: Vec<u64> = failing_blocks(
                &buf,
                bs as usize,
                &idx.crcs[m..m + n],
                Some((&idx.prints[m..m + n], seed)),
            )
            .into_iter()
            .map(|i| x.block + i as u64)
            .collect();
            report.blocks_checked += x.count as u64;
            report.bytes_checked += len;
            if let Some(p) = progress {
                p.fetch_add(len, Ordering::Relaxed);
            }
            if !bad.is_empty() {
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
