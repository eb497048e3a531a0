//! Making a backup of a chain snapshot.
//!
//! 1. Take the volume's writer lock on the remote.
//! 2. Choose the parent: the volume's newest backup (unless a full backup is
//!    asked for, or there is none, or its block size differs).
//! 3. Find the changed blocks: from this host's remembered fingerprints of
//!    the parent's snapshot when they match (no data read for unchanged
//!    blocks), otherwise by comparing every block's checksum with the
//!    parent's image as its manifests describe it. Any doubt is a full diff.
//! 4. Pack the changed data blocks, in block order, into objects named by
//!    their content. Objects already on the remote (a previous attempt that
//!    crashed, or the same bytes in another backup) are not uploaded again;
//!    an interrupted multipart upload is resumed, its finished parts kept.
//! 5. Write the manifest, last: the backup exists once it does.
//! 6. Remember the snapshot's fingerprints for the next backup.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use super::crypto::{self, Name, Sum};
use super::list::BackupInfo;
use super::manifest::{object_key, Extent, Loc, Manifest, ObjectRef, Overlay};
use super::store::{md5_etag, PutMode};
use super::{cancelled, check_volume, lock, state, BackupError, Progress, Remote};
use crate::chain::format::BLOCK_RECORD_LEN;
use crate::chain::{Chain, ChainError, Origin, Plan, Records};
use crate::fingerprint::FingerprintMap;
use crate::sys;

/// What to back up and how.
#[derive(Debug, Default, Clone)]
pub struct BackupOptions {
    /// The volume's name on the remote (its backups live under it).
    pub volume: String,
    /// Upload only what changed since the volume's newest backup (a full
    /// backup if it has none).
    pub incremental: bool,
    pub name: String,
    pub description: String,
    /// The new backup's id (default: a new random one).
    pub id: Option<Uuid>,
    pub progress: Option<Arc<Progress>>,
    pub cancel: Option<Arc<AtomicBool>>,
    /// Do not read or write this host's remembered fingerprints.
    pub no_local_state: bool,
}

/// How the changed blocks were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffSource {
    /// A full backup: every block.
    Full,
    /// This host's remembered fingerprints of the parent's snapshot.
    LocalState,
    /// Every block's checksum against the parent's manifests.
    Manifests,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    #[serde(flatten)]
    pub info: BackupInfo,
    pub diff: DiffSource,
    /// Bytes read from the chain.
    pub read_bytes: u64,
    pub objects_uploaded: u64,
    /// Objects the backup needed that were already on the remote.
    pub objects_reused: u64,
    /// Bytes of every request body sent (objects, manifest, lock).
    pub sent_bytes: u64,
    pub duration_ms: u64,
}

/// An object on its way to the remote.
struct Job {
    name: Name,
    plain: Vec<u8>,
}

/// What the remote already has.
#[derive(Default)]
struct Existing {
    objects: HashMap<String, u64>,
    uploads: HashMap<String, Vec<String>>,
}

/// Back up snapshot `snapshot` of `chain` to `remote`.
pub fn create(
    chain: &Chain,
    snapshot: Uuid,
    remote: &Remote,
    opts: &BackupOptions,
) -> Result<BackupOutcome, BackupError> {
    check_volume(&opts.volume)?;
    let t0 = Instant::now();
    let store = remote.store();
    let sent0 = store.bytes_sent();
    let volume = opts.volume.as_str();
    let plan = chain.resolve_intact(snapshot)?;
    let _lock = lock::exclusive(store, volume, "backup")?;
    let all = remote.backups(volume)?;
    let seq = all.last().map_or(1, |l| l.0 + 1);
    let bs = plan.block_size;
    let size = plan.device_size();
    let n = size.div_ceil(bs as u64);
    let new_prints = plan.fingerprints(chain)?;

    let mut parent = None;
    if opts.incremental {
        if let Some(&(ps, pid)) = all.last() {
            let p = remote.manifest(volume, ps, pid)?;
            if p.block_size != bs {
                tracing::warn!(
                    "backup {} of volume {volume} uses {} byte blocks and the chain {} byte blocks; making a full backup",
                    p.id,
                    p.block_size,
                    bs
                );
            } else {
                parent = Some(p);
            }
        }
    }

    // How to tell a changed block.
    let mut diff = Diff::Full;
    if let Some(p) = &parent {
        let want = state::Header {
            remote: remote.identity.clone(),
            volume: volume.to_string(),
            backup_id: p.id,
            snapshot_id: p.snapshot_id,
            chain_id: chain.chain_id(),
        };
        let local = if opts.no_local_state {
            None
        } else {
            state::load(chain.path(), &remote.name, chain.chain_id(), &want).filter(|m| {
                m.block_size == bs
                    && m.seed == chain.seed()
                    && m.device_size == p.device_size
                    && m.prints.len() as u64 == p.nblocks()
            })
        };
        diff = match local {
            Some(m) => Diff::Local(m.prints),
            None => {
                let lineage = remote.lineage(volume, &all, p.seq, p.id)?;
                let refs: Vec<&Manifest> = lineage.iter().collect();
                let ov = Overlay::build(&refs, p.nblocks());
                if ov.missing > 0 {
                    return Err(BackupError::Incomplete {
                        remote: remote.name.clone(),
                        volume: volume.to_string(),
                        id: p.id,
                        blocks: ov.missing,
                    });
                }
                Diff::Manifests(ov.block_sums(p.nblocks()))
            }
        };
    }
    let diff_source = match &diff {
        Diff::Full => DiffSource::Full,
        Diff::Local(_) => DiffSource::LocalState,
        Diff::Manifests(_) => DiffSource::Manifests,
    };
    // Blocks the parent did not have at this length: always changed.
    let beyond = |b: u64| -> bool {
        match &parent {
            None => true,
            Some(p) => {
                b >= p.nblocks()
                    || (b == p.nblocks() - 1
                        && p.block_len(b) != super::manifest::block_len(size, bs, b))
            }
        }
    };

    let existing = existing(remote, volume)?;
    let progress = opts.progress.clone().unwrap_or_default();
    let to_read: u64 = plan
        .runs
        .iter()
        .filter(|r| matches!(r.source, Origin::Data { .. }))
        .map(|r| {
            (0..r.count)
                .filter(|i| match &diff {
                    Diff::Local(old) => {
                        let b = r.block + i;
                        beyond(b) || old[b as usize] != new_prints[b as usize]
                    }
                    _ => true,
                })
                .map(|i| plan.block_len(r.block + i))
                .sum::<u64>()
        })
        .sum();
    progress.total.store(to_read, Ordering::Relaxed);

    let key = remote.key();
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<BackupError>> = Mutex::new(None);
    let uploaded_objects = AtomicU64::new(0);
    let uploaded_bytes = AtomicU64::new(0);
    let (tx, rx) = mpsc::sync_channel::<Job>(remote.tuning.concurrency.max(1));
    let rx = Mutex::new(rx);
    let fail = |e: BackupError| {
        failed.store(true, Ordering::Relaxed);
        let mut g = first_error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    };

    let built = std::thread::scope(|s| -> Result<Builder, BackupError> {
        for _ in 0..remote.tuning.concurrency.max(1) {
            s.spawn(|| loop {
                let job = {
                    let g = rx.lock().unwrap_or_else(|e| e.into_inner());
                    g.recv()
                };
                let Ok(job) = job else { break };
                if failed.load(Ordering::Relaxed) || cancelled(&opts.cancel) {
                    continue;
                }
                match upload(remote, volume, job, &existing, &opts.cancel) {
                    Ok(bytes) => {
                        uploaded_objects.fetch_add(1, Ordering::Relaxed);
                        uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
                        progress.transferred.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(e) => fail(e),
                }
            });
        }
        let mut b = Builder {
            volume,
            key,
            object_size: remote.tuning.object_size,
            existing: &existing,
            queued: HashSet::new(),
            tx: Some(tx),
            objects: Vec::new(),
            extents: Vec::new(),
            sums: Vec::new(),
            pack: Vec::new(),
            pack_obj: None,
            changed_bytes: 0,
            zero_bytes: 0,
            read_bytes: 0,
            reused: 0,
        };
        let r = scan(
            chain,
            &plan,
            &diff,
            &new_prints,
            &beyond,
            &mut b,
            &progress,
            opts,
            &failed,
        );
        let r = r.and_then(|()| b.flush());
        if r.is_err() {
            // Stop the uploaders: nothing they send now will be used.
            failed.store(true, Ordering::Relaxed);
        }
        // Let the uploaders drain and stop.
        b.tx = None;
        r.map(|()| b)
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let b = built?;
    if cancelled(&opts.cancel) {
        return Err(BackupError::Cancelled);
    }

    let m = Manifest {
        volume: volume.to_string(),
        id: opts.id.unwrap_or_else(Uuid::new_v4),
        parent: parent.as_ref().map(|p| p.id),
        seq,
        created_us: crate::util::now_micros(),
        snapshot_id: plan.snapshot.id,
        snapshot_created_us: plan.snapshot.created_us,
        snapshot_name: plan.snapshot.name.clone(),
        name: opts.name.clone(),
        description: opts.description.clone(),
        device_size: size,
        block_size: bs,
        changed_bytes: b.changed_bytes,
        zero_bytes: b.zero_bytes,
        uploaded_bytes: uploaded_bytes.load(Ordering::Relaxed),
        key_id: key.map(|k| k.id()).unwrap_or([0; 8]),
        objects: b.objects,
        extents: b.extents,
        sums: b.sums,
    };
    debug_assert_eq!(m.check(), Ok(()));
    if m.parent.is_none() {
        debug_assert_eq!(m.extents.iter().map(|x| x.count as u64).sum::<u64>(), n);
    }
    let encoded = m.encode(key);
    match store.put(&m.key(), &encoded, PutMode::Create)? {
        super::store::Put::Done => {}
        // An earlier attempt of this put went through though its answer
        // was lost: the same bytes are there.
        super::store::Put::Exists if store.get(&m.key())?.as_deref() == Some(&encoded[..]) => {}
        super::store::Put::Exists => {
            return Err(BackupError::BadRemote {
                remote: remote.name.clone(),
                detail: format!("a backup with id {} already exists", m.id),
            })
        }
    }

    if !opts.no_local_state {
        let header = state::Header {
            remote: remote.identity.clone(),
            volume: volume.to_string(),
            backup_id: m.id,
            snapshot_id: plan.snapshot.id,
            chain_id: chain.chain_id(),
        };
        let map = FingerprintMap {
            chain_id: chain.chain_id(),
            snapshot_id: plan.snapshot.id,
            device_size: size,
            block_size: bs,
            seed: chain.seed(),
            prints: new_prints,
        };
        if let Err(e) = state::save(chain.path(), &remote.name, &header, &map) {
            tracing::warn!(
                "cannot remember backup {} beside chain {}: {e}; the next backup will compare with the manifests instead",
                m.id,
                chain.path().display()
            );
        }
    }
    tracing::info!(
        remote = %remote.name,
        volume,
        backup = %m.id,
        changed = m.changed_bytes,
        uploaded = m.uploaded_bytes,
        "backup complete"
    );
    Ok(BackupOutcome {
        info: BackupInfo::of(&m),
        diff: diff_source,
        read_bytes: b.read_bytes,
        objects_uploaded: uploaded_objects.load(Ordering::Relaxed),
        objects_reused: b.reused,
        sent_bytes: store.bytes_sent() - sent0,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

enum Diff {
    Full,
    Local(Vec<u64>),
    Manifests(Vec<Option<Sum>>),
}

/// Objects and unfinished uploads already under the volume.
fn existing(remote: &Remote, volume: &str) -> Result<Existing, BackupError> {
    let prefix = format!("{volume}/objects/");
    let mut e = Existing::default();
    for o in remote.store().list(&prefix)? {
        e.objects.insert(o.key, o.size);
    }
    for u in remote.store().list_multipart(&prefix)? {
        e.uploads.entry(u.key).or_default().push(u.upload_id);
    }
    Ok(e)
}

/// Collects the manifest while packing changed blocks into objects.
struct Builder<'a> {
    volume: &'a str,
    key: Option<&'a crypto::Key>,
    object_size: u64,
    existing: &'a Existing,
    queued: HashSet<Name>,
    tx: Option<mpsc::SyncSender<Job>>,
    objects: Vec<ObjectRef>,
    extents: Vec<Extent>,
    sums: Vec<Sum>,
    pack: Vec<u8>,
    pack_obj: Option<u32>,
    changed_bytes: u64,
    zero_bytes: u64,
    read_bytes: u64,
    reused: u64,
}

impl Builder<'_> {
    fn push_extent(&mut self, block: u64, loc: Loc, sum: usize, bs: u64) {
        if let Some(p) = self.extents.last_mut() {
            if p.end() == block && p.count < u32::MAX {
                let cont = match (p.loc, loc) {
                    (Loc::Zero, Loc::Zero) => true,
                    (
                        Loc::Data {
                            object: po,
                            offset: poff,
                        },
                        Loc::Data { object, offset },
                    ) => po == object && poff + p.count as u64 * bs == offset,
                    _ => false,
                };
                if cont {
                    p.count += 1;
                    return;
                }
            }
        }
        self.extents.push(Extent {
            block,
            count: 1,
            loc,
            sum,
        });
    }

    fn zero(&mut self, block: u64, len: u64, bs: u64) {
        self.changed_bytes += len;
        self.zero_bytes += len;
        self.push_extent(block, Loc::Zero, 0, bs);
    }

    fn data(&mut self, block: u64, data: &[u8], sum: Sum, bs: u64) -> Result<(), BackupError> {
        self.changed_bytes += data.len() as u64;
        if !self.pack.is_empty() && self.pack.len() as u64 + data.len() as u64 > self.object_size {
            self.flush()?;
        }
        let obj = match self.pack_obj {
            Some(o) => o,
            None => {
                self.objects.push(ObjectRef {
                    name: [0; 32],
                    stored_len: 0,
                    plain_len: 0,
                    encrypted: false,
                });
                let o = (self.objects.len() - 1) as u32;
                self.pack_obj = Some(o);
                o
            }
        };
        let offset = self.pack.len() as u64;
        self.pack.extend_from_slice(data);
        let at = self.sums.len();
        self.sums.push(sum);
        self.push_extent(
            block,
            Loc::Data {
                object: obj,
                offset,
            },
            at,
            bs,
        );
        Ok(())
    }

    /// Close the current object: name it, and upload it unless the remote has it.
    fn flush(&mut self) -> Result<(), BackupError> {
        let Some(obj) = self.pack_obj.take() else {
            return Ok(());
        };
        let plain = std::mem::take(&mut self.pack);
        let name = crypto::object_name(self.key, &plain);
        let plain_len = plain.len() as u64;
        let stored_len = plain_len
            + if self.key.is_some() {
                crypto::TAG_LEN as u64
            } else {
                0
            };
        self.objects[obj as usize] = ObjectRef {
            name,
            stored_len,
            plain_len,
            encrypted: self.key.is_some(),
        };
        let on_remote =
            self.existing.objects.get(&object_key(self.volume, &name)) == Some(&stored_len);
        if on_remote || !self.queued.insert(name) {
            self.reused += 1;
            return Ok(());
        }
        if let Some(tx) = &self.tx {
            // A send fails only when every uploader stopped on an error,
            // which the caller reports.
            let _ = tx.send(Job { name, plain });
        }
        Ok(())
    }
}

/// Walk the snapshot's runs in block order, feeding changed blocks to `b`.
#[allow(clippy::too_many_arguments)]
fn scan(
    chain: &Chain,
    plan: &Plan,
    diff: &Diff,
    new_prints: &[u64],
    beyond: &dyn Fn(u64) -> bool,
    b: &mut Builder<'_>,
    progress: &Progress,
    opts: &BackupOptions,
    failed: &AtomicBool,
) -> Result<(), BackupError> {
    let bs = plan.block_size as u64;
    let key = b.key;
    for r in &plan.runs {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        if cancelled(&opts.cancel) {
            return Err(BackupError::Cancelled);
        }
        match r.source {
            Origin::Zero => {
                for i in 0..r.count {
                    let blk = r.block + i;
                    let changed = match diff {
                        Diff::Full => true,
                        Diff::Local(old) => {
                            beyond(blk) || old[blk as usize] != new_prints[blk as usize]
                        }
                        Diff::Manifests(sums) => beyond(blk) || sums[blk as usize].is_some(),
                    };
                    if changed {
                        b.zero(blk, plan.block_len(blk), bs);
                    }
                }
            }
            Origin::Data { offset, records } => {
                // Sub-runs to read: with the local state only the changed
                // blocks, otherwise all of them.
                let mut subs: Vec<(u64, u64)> = Vec::new();
                match diff {
                    Diff::Local(old) => {
                        let mut i = 0;
                        while i < r.count {
                            let ch = |i: u64| {
                                let blk = r.block + i;
                                beyond(blk) || old[blk as usize] != new_prints[blk as usize]
                            };
                            if !ch(i) {
                                i += 1;
                                continue;
                            }
                            let start = i;
                            while i < r.count && ch(i) {
                                i += 1;
                            }
                            subs.push((start, i - start));
                        }
                    }
                    _ => subs.push((0, r.count)),
                }
                for (start, count) in subs {
                    read_run(
                        chain,
                        plan,
                        r.block + start,
                        count,
                        offset + start * bs,
                        records + start * BLOCK_RECORD_LEN,
                        &mut |blk, data| {
                            progress
                                .done
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                            b.read_bytes += data.len() as u64;
                            let sum = crypto::block_sum(key, data);
                            if let Diff::Manifests(sums) = diff {
                                if !beyond(blk) && sums[blk as usize] == Some(sum) {
                                    return Ok(());
                                }
                            }
                            b.data(blk, data, sum, bs)
                        },
                    )?;
                    if cancelled(&opts.cancel) {
                        return Err(BackupError::Cancelled);
                    }
                }
            }
        }
    }
    Ok(())
}

/// What [`read_run`] calls for each block.
type BlockFn<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), BackupError>;

/// Bytes read from the chain per pread.
const READ_BATCH: u64 = 8 << 20;

/// Read `count` stored blocks from `chain_offset`, checking each one's crc32.
#[allow(clippy::too_many_arguments)]
fn read_run(
    chain: &Chain,
    plan: &Plan,
    first: u64,
    count: u64,
    chain_offset: u64,
    records_at: u64,
    f: BlockFn<'_>,
) -> Result<(), BackupError> {
    let bs = plan.block_size as u64;
    let fd = chain.file().as_fd();
    let per = (READ_BATCH / bs).max(1);
    let mut buf = Vec::new();
    let mut records = Records::default();
    let mut done = 0;
    while done < count {
        let k = (count - done).min(per);
        records.read(chain, records_at + done * BLOCK_RECORD_LEN, k)?;
        let b0 = first + done;
        let len = (b0 + k) * bs;
        let len = len.min(plan.device_size()) - b0 * bs;
        let off = chain_offset + done * bs;
        buf.resize(len as usize, 0);
        let got = sys::pread_full(fd, &mut buf, off).map_err(|source| ChainError::Read {
            path: chain.path().to_path_buf(),
            offset: off,
            source,
        })?;
        if got as u64 != len {
            return Err(ChainError::Read {
                path: chain.path().to_path_buf(),
                offset: off + got as u64,
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            }
            .into());
        }
        let _ = sys::drop_cache(fd, off, len);
        let mut at = 0usize;
        for i in 0..k {
            let blk = b0 + i;
            let bl = plan.block_len(blk) as usize;
            let data = &buf[at..at + bl];
            if crc32fast::hash(data) != records.crc(i as usize) {
                return Err(BackupError::ChainCorrupt {
                    path: chain.path().to_path_buf(),
                    id: plan.snapshot.id,
                    block: blk,
                    chain_offset: off + i * bs,
                });
            }
            f(blk, data)?;
            at += bl;
        }
        done += k;
    }
    Ok(())
}

/// Upload one object (sealing it first when the remote has a key); returns
/// the bytes stored.
fn upload(
    remote: &Remote,
    volume: &str,
    job: Job,
    existing: &Existing,
    cancel: &Option<Arc<AtomicBool>>,
) -> Result<u64, BackupError> {
    let store = remote.store();
    let key = object_key(volume, &job.name);
    let mut buf = job.plain;
    if let Some(k) = remote.key() {
        crypto::seal_object(k, &job.name, &key, &mut buf);
    }
    let part = remote.tuning.part_size.max(5 << 20) as usize;
    if buf.len() <= part {
        store.put(&key, &buf, PutMode::Overwrite)?;
        return Ok(buf.len() as u64);
    }
    // Resume the newest unfinished upload of this object, keeping the
    // parts that are there and intact (sealing is deterministic, so the
    // same part has the same MD5).
    let mut resumed = None;
    if let Some(ids) = existing.uploads.get(&key) {
        if let Some(id) = ids.last() {
            match store.list_parts(&key, id) {
                Ok(parts) => resumed = Some((id.clone(), parts)),
                Err(e) => tracing::warn!(
                    "cannot resume the upload of {key}, starting it again: {}",
                    crate::util::error_chain(&e)
                ),
            }
        }
    }
    let (upload_id, have) = match resumed {
        Some(r) => r,
        None => (store.create_multipart(&key)?, Vec::new()),
    };
    let mut etags = Vec::new();
    for (i, chunk) in buf.chunks(part).enumerate() {
        if cancelled(cancel) {
            return Err(BackupError::Cancelled);
        }
        let number = (i + 1) as u16;
        let etag = md5_etag(chunk);
        if have
            .iter()
            .any(|p| p.number == number && p.etag == etag && p.size == chunk.len() as u64)
        {
            etags.push((number, etag));
            continue;
        }
        let got = store.upload_part(&key, &upload_id, number, chunk)?;
        etags.push((number, got));
    }
    store.complete_multipart(&key, &upload_id, &etags)?;
    Ok(buf.len() as u64)
}
