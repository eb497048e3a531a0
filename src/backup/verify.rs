//! Checking backups on the remote: every manifest they need decodes and
//! authenticates, their series is unbroken and defines every block, and
//! every object they reference is there, authenticates (or matches its
//! content hash) and holds blocks that match their checksums. Each problem
//! names the object or manifest and the backups it breaks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use serde::Serialize;
use uuid::Uuid;

use super::crypto::{self, Name, Sum};
use super::manifest::{Loc, Manifest, ObjectRef, Overlay};
use super::{cancelled, lock, BackupError, Progress, Remote};

/// A problem verify found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// A manifest that is missing, or does not decode or authenticate.
    Manifest {
        backup: Uuid,
        key: String,
        detail: String,
    },
    /// A backup whose parent is not on the remote.
    BrokenSeries {
        backup: Uuid,
        parent: Uuid,
    },
    /// A backup whose series leaves blocks undefined.
    Incomplete {
        backup: Uuid,
        blocks: u64,
    },
    MissingObject {
        key: String,
        backups: Vec<Uuid>,
    },
    DamagedObject {
        key: String,
        detail: String,
        backups: Vec<Uuid>,
    },
    /// An object that authenticates but holds blocks not matching the
    /// checksums its manifests give.
    DamagedBlocks {
        key: String,
        blocks: u64,
        backups: Vec<Uuid>,
    },
}

fn ids(v: &[Uuid]) -> String {
    v.iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Manifest {
                backup,
                key,
                detail,
            } => write!(f, "manifest {key} of backup {backup}: {detail}"),
            Problem::BrokenSeries { backup, parent } => write!(
                f,
                "backup {backup} needs backup {parent}, which is not on the remote"
            ),
            Problem::Incomplete { backup, blocks } => {
                write!(f, "backup {backup} leaves {blocks} block(s) undefined")
            }
            Problem::MissingObject { key, backups } => {
                write!(f, "object {key} is missing (needed by backups {})", ids(backups))
            }
            Problem::DamagedObject {
                key,
                detail,
                backups,
            } => write!(
                f,
                "object {key} is damaged: {detail} (needed by backups {})",
                ids(backups)
            ),
            Problem::DamagedBlocks {
                key,
                blocks,
                backups,
            } => write!(
                f,
                "object {key} holds {blocks} block(s) that fail their checksums (needed by backups {})",
                ids(backups)
            ),
        }
    }
}

/// What verify checked and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backups: usize,
    pub objects: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The blocks of one object to check.
struct Check {
    obj: ObjectRef,
    /// Plaintext offset -> (length, checksum).
    blocks: BTreeMap<u64, (u64, Sum)>,
    backups: BTreeSet<Uuid>,
}

/// Verify every backup of `volume`, or backup `id` (and what it needs).
pub fn verify(
    remote: &Remote,
    volume: &str,
    id: Option<&str>,
    progress: Option<Arc<Progress>>,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<VerifyReport, BackupError> {
    super::check_volume(volume)?;
    let _reader = lock::shared(remote.store(), volume, "verify")?;
    let all = remote.backups(volume)?;
    let selected: Vec<(u64, Uuid)> = match id {
        Some(id) => vec![remote.find(volume, id)?],
        None => all.clone(),
    };
    let mut report = VerifyReport {
        backups: selected.len(),
        ..Default::default()
    };
    let mut loaded: HashMap<Uuid, Option<Manifest>> = HashMap::new();
    let load = |loaded: &mut HashMap<Uuid, Option<Manifest>>,
                seq: u64,
                id: Uuid,
                report: &mut VerifyReport|
     -> Result<bool, BackupError> {
        if let Some(m) = loaded.get(&id) {
            return Ok(m.is_some());
        }
        let m = match remote.manifest(volume, seq, id) {
            Ok(m) => Some(m),
            Err(e @ (BackupError::Manifest { .. } | BackupError::UnknownBackup { .. })) => {
                report.problems.push(Problem::Manifest {
                    backup: id,
                    key: super::manifest::manifest_key(volume, seq, id),
                    detail: crate::util::error_chain(&e),
                });
                None
            }
            Err(e) => return Err(e),
        };
        let ok = m.is_some();
        loaded.insert(id, m);
        Ok(ok)
    };
    let mut checks: HashMap<Name, Check> = HashMap::new();
    for &(seq, id) in &selected {
        // The lineage, as far as it can be read.
        let mut lineage = Vec::new();
        let (mut s, mut i) = (seq, id);
        let mut broken = false;
        loop {
            if !load(&mut loaded, s, i, &mut report)? {
                broken = true;
                break;
            }
            lineage.push(i);
            let parent = loaded[&i].as_ref().and_then(|m| m.parent);
            let Some(p) = parent else { break };
            match all.iter().find(|(_, x)| *x == p) {
                Some(&(ps, _)) if !lineage.contains(&p) => {
                    s = ps;
                    i = p;
                }
                _ => {
                    report.problems.push(Problem::BrokenSeries {
                        backup: i,
                        parent: p,
                    });
                    broken = true;
                    break;
                }
            }
        }
        let ms: Vec<&Manifest> = lineage.iter().filter_map(|x| loaded[x].as_ref()).collect();
        if !broken {
            if let Some(top) = ms.first() {
                let missing = Overlay::build(&ms, top.nblocks()).missing;
                if missing > 0 {
                    report.problems.push(Problem::Incomplete {
                        backup: id,
                        blocks: missing,
                    });
                }
            }
        }
        for m in ms {
            let bs = m.block_size as u64;
            for x in &m.extents {
                let Loc::Data { object, offset } = x.loc else {
                    continue;
                };
                let o = m.objects[object as usize];
                let c = checks.entry(o.name).or_insert_with(|| Check {
                    obj: o,
                    blocks: BTreeMap::new(),
                    backups: BTreeSet::new(),
                });
                c.backups.insert(id);
                for k in 0..x.count as u64 {
                    let len = m.block_len(x.block + k);
                    c.blocks
                        .insert(offset + k * bs, (len, m.sums[x.sum + k as usize]));
                }
            }
        }
    }

    // Read every object back, several at a time.
    let mut list: Vec<Check> = checks.into_values().collect();
    list.sort_by_key(|c| c.obj.name);
    let progress = progress.unwrap_or_default();
    progress.total.store(
        list.iter().map(|c| c.obj.stored_len).sum(),
        Ordering::Relaxed,
    );
    let next = AtomicUsize::new(0);
    let threads = remote.tuning.concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Result<(usize, Option<Problem>), BackupError>>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, list, progress, cancel) = (&next, &list, &progress, &cancel);
            s.spawn(move || loop {
                if cancelled(cancel) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = list.get(i) else { break };
                let r = check_object(remote, volume, c);
                progress.done.fetch_add(c.obj.stored_len, Ordering::Relaxed);
                progress
                    .transferred
                    .fetch_add(c.obj.stored_len, Ordering::Relaxed);
                let stop = r.is_err();
                if tx.send(r.map(|p| (i, p))).is_err() || stop {
                    break;
                }
            });
        }
    });
    drop(tx);
    let mut found: Vec<(usize, Problem)> = Vec::new();
    for r in rx {
        let (i, p) = r?;
        report.objects += 1;
        report.bytes += list[i].obj.stored_len;
        if let Some(p) = p {
            found.push((i, p));
        }
    }
    if cancelled(&cancel) {
        return Err(BackupError::Cancelled);
    }
    found.sort_by_key(|f| f.0);
    report.problems.extend(found.into_iter().map(|f| f.1));
    Ok(report)
}

fn check_object(remote: &Remote, volume: &str, c: &Check) -> Result<Option<Problem>, BackupError> {
    let key = c.obj.key(volume);
    let backups: Vec<Uuid> = c.backups.iter().copied().collect();
    let plain = match remote.fetch_object(volume, &c.obj) {
        Ok(p) => p,
        Err(BackupError::MissingObject { .. }) => {
            return Ok(Some(Problem::MissingObject { key, backups }))
        }
        Err(
            e @ (BackupError::DamagedObject { .. }
            | BackupError::ObjectSize { .. }
            | BackupError::NeedKey { .. }),
        ) => {
            return Ok(Some(Problem::DamagedObject {
                key,
                detail: crate::util::error_chain(&e),
                backups,
            }))
        }
        Err(e) => return Err(e),
    };
    let k = if c.obj.encrypted { remote.key() } else { None };
    let bad = c
        .blocks
        .iter()
        .filter(|(&off, &(len, sum))| {
            plain
                .get(off as usize..(off + len) as usize)
                .is_none_or(|b| crypto::block_sum(k, b) != sum)
        })
        .count() as u64;
    Ok((bad > 0).then_some(Problem::DamagedBlocks {
        key,
        blocks: bad,
        backups,
    }))
}
