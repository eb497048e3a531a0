//! Taking a snapshot: quiesce, invalidate, map, fingerprint every block,
//! append the changed ones, commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::chain::format::{
    FullReason, SegMeta, SegStats, SegmentKind, SourceId, TakeMethod, TakeRecord,
};
use crate::chain::writer::{SegmentPlan, SegmentWriter};
use crate::chain::{side_file, Chain, ChainError, Snapshot};
use crate::device::{Device, DeviceError, DirectReader, Identity};
use crate::fingerprint::{fingerprint, is_zero, MapHeader, PrintFile, PrintFileError, ZeroPrints};
use crate::quiesce::{self, QuiesceError};
use crate::track::Continuity;

/// Errors of a take.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error("{device} shrank from {was} to {now} bytes since snapshot {newest}; take a new full snapshot (--full) to start the chain over")]
    Shrunk {
        device: PathBuf,
        was: u64,
        now: u64,
        newest: Uuid,
    },
    #[error(
        "the chain file {chain} is {device} itself or lives on it; keep chains on another device"
    )]
    ChainOnDevice { chain: PathBuf, device: PathBuf },
    #[error("a snapshot with id {0} already exists in the chain")]
    DuplicateId(Uuid),
    #[error("the snapshot was cancelled")]
    Cancelled,
    #[error(transparent)]
    Map(#[from] PrintFileError),
}

impl TakeError {
    /// Whether the cause is a full disk where the chain lives.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, TakeError::Chain(c) if c.is_disk_full())
    }
}

/// Live progress of a take, for status displays.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the device to scan.
    pub total: AtomicU64,
    /// Bytes scanned so far.
    pub done: AtomicU64,
}

impl Progress {
    /// Percent done, 0.0 to 100.0.
    pub fn percent(&self) -> f64 {
        let t = self.total.load(Ordering::Relaxed);
        if t == 0 {
            0.0
        } else {
            (self.done.load(Ordering::Relaxed) as f64 * 100.0 / t as f64).min(100.0)
        }
    }
}

/// Scan tuning; the defaults come from measurements (docs/FORMAT.md, BENCHMARKS.md).
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Bytes prefaulted, hashed and released at a time.
    pub window: usize,
    /// Threads hashing each window.
    pub hash_threads: usize,
}

impl Default for Tuning {
    /// Measured defaults; `BLOCKSNAP_WINDOW_MIB` and `BLOCKSNAP_HASH_THREADS`
    /// override them for benchmarking.
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        // Measured on 2 CPUs (BENCHMARKS.md): 4 and 8 MiB windows scan
        // equally fast and 4 MiB needs less memory; a second hashing thread
        // made a warm scan 30% slower, because faulting pages in (the
        // prefetcher, or a loop device's worker) already keeps a CPU busy
        // and XXH3 on one core outruns it. Extra hashing threads are used
        // only when at least two more CPUs are free.
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Tuning {
            window: env("BLOCKSNAP_WINDOW_MIB")
                .map(|m| m.clamp(1, 256) << 20)
                .unwrap_or(4 << 20),
            hash_threads: env("BLOCKSNAP_HASH_THREADS")
                .map(|n| n.clamp(1, 16))
                .unwrap_or_else(|| cpus.saturating_sub(2).clamp(1, 4)),
        }
    }
}

/// How a take learns which blocks were written.
#[derive(Clone, Default)]
pub enum Tracking {
    /// No tracking: the device is read whole while quiesced (as before
    /// tracking existed).
    #[default]
    Off,
    /// Track writes during this take only (`blocksnap chain take`): the
    /// freeze stays short, but the device is still read whole, since nothing
    /// watched it between runs.
    SingleRun,
    /// The daemon's tracker, which watches `volume` between takes too.
    Shared {
        registry: Arc<crate::track::Registry>,
        volume: String,
    },
}

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tracking::Off => f.write_str("Off"),
            Tracking::SingleRun => f.write_str("SingleRun"),
            Tracking::Shared { volume, .. } => write!(f, "Shared({volume})"),
        }
    }
}

/// Options of a take.
#[derive(Clone, Debug, Default)]
pub struct TakeOptions {
    pub name: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    /// Block size for a new chain; must match an existing one.
    pub block_size: Option<u32>,
    /// Store every block, ignoring the previous snapshot (also allowed after
    /// the device shrank).
    pub full: bool,
    /// Id of the new snapshot (the daemon supplies its API id).
    pub snapshot_id: Option<Uuid>,
    pub quiesce: quiesce::Options,
    pub progress: Option<Arc<Progress>>,
    /// Set to stop the take early (daemon shutdown).
    pub cancel: Option<Arc<AtomicBool>>,
    pub tuning: Tuning,
    pub tracking: Tracking,
    /// With tracking, every Nth snapshot reads the whole device and checks
    /// what tracking reported against it (0: never).
    pub verify_every: u32,
}

/// What a take did.
#[derive(Clone, Debug)]
pub struct TakeOutcome {
    pub snapshot: Snapshot,
    pub changed_bytes: u64,
    pub zero_bytes: u64,
    pub stored_bytes: u64,
    pub freeze: Duration,
    pub duration: Duration,
    pub quiesce: String,
    /// How it was taken (also in `snapshot.take`).
    pub record: TakeRecord,
}

/// Pre-copy rounds end once fewer blocks than this were written during the
/// last one, once a round no longer shrinks the set, or after MAX_ROUNDS.
const SETTLED_BLOCKS: usize = 64;
const MAX_ROUNDS: u32 = 8;
/// Largest single read of written blocks, and readers kept busy at once.
const DIRECT_READ: usize = 256 << 10;
const DIRECT_READERS: usize = 16;
/// At most this many runs, and bytes, go to one reader at a time.
const BATCH_RUNS: usize = 64;
const BATCH_BYTES: u64 = DIRECT_READ as u64;
/// Readers run at most this many batches ahead of the one being stored, so
/// the data in flight stays bounded (64 x 256 KiB) whatever the device.
const BATCHES_AHEAD: usize = 64;
/// Verification remembers at most this many unreported changed blocks.
const MAX_CANDIDATES: usize = 1 << 20;

/// Snapshot `device` into the chain at `chain_path` (created on first use).
///
/// With tracking, the device is read while the volume is live, then what was
/// written meanwhile is read again in rounds while that set keeps shrinking,
/// and only then is the volume quiesced, to read what was written since the
/// last round: the freeze lasts as long as that, whatever the device's size.
/// See docs/TRACKING.md.
pub fn take(
    sys: Arc<dyn quiesce::System>,
    device: &Path,
    chain_path: &Path,
    opts: &TakeOptions,
) -> Result<TakeOutcome, TakeError> {
    let started = Instant::now();
    let dev_identity = Identity::of_path(device).map_err(|source| DeviceError::Open {
        path: device.to_path_buf(),
        source,
    })?;
    // The chain (or, before it exists, its directory) must not be on the
    // device: checked before anything is created.
    let probe = if chain_path.exists() {
        chain_path.to_path_buf()
    } else {
        match chain_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    if let Ok(md) = std::fs::metadata(&probe) {
        use std::os::unix::fs::MetadataExt;
        let on_device = match dev_identity {
            Identity::Block { rdev } => md.dev() == rdev,
            file @ Identity::File { .. } => Identity::of_metadata(&md) == file,
        };
        if on_device {
            return Err(TakeError::ChainOnDevice {
                chain: chain_path.to_path_buf(),
                device: device.to_path_buf(),
            });
        }
    }
    let mut chain = Chain::open_or_create(chain_path, opts.block_size)?;
    let side = side_file(chain_path);
    let id = opts.snapshot_id.unwrap_or_else(Uuid::new_v4);
    if chain.snapshots().iter().any(|s| s.id == id) {
        return Err(TakeError::DuplicateId(id));
    }
    let bs = chain.block_size() as u64;
    let seed = chain.seed();
    let seq = chain.next_seq();
    let chain_id = chain.chain_id();
    let newest = if opts.full {
        None
    } else {
        chain.newest().cloned()
    };
    // Snapshots since the last one that read the whole device.
    let tracked_streak = chain
        .snapshots()
        .iter()
        .rev()
        .take_while(|s| s.take.is_some_and(|t| t.method == TakeMethod::Tracked))
        .count() as u32;

    // Tracking: a tracker of our own for this run, or the daemon's.
    let local_registry;
    let session = match &opts.tracking {
        Tracking::Off => Err("write tracking is off".to_string()),
        Tracking::SingleRun if !dev_identity.is_block() => {
            Err("an image file's writes cannot be traced".to_string())
        }
        Tracking::SingleRun => {
            local_registry = crate::track::Registry::start(
                &[crate::track::Target {
                    volume: "device".into(),
                    path: device.to_path_buf(),
                }],
                &crate::track::Options::default(),
            );
            local_registry.session("device")
        }
        Tracking::Shared { registry, volume } => registry.session(volume),
    };
    let (mut session, untracked) = match session {
        Ok(s) => (Some(s), None),
        Err(why) => (None, Some(why)),
    };
    let mut record = TakeRecord {
        generation: session.as_ref().map_or(0, |s| s.generation()),
        ..Default::default()
    };
    // What the first pass reads: the blocks tracking reported, or all.
    let (method, reason) = match (&newest, &session) {
        _ if opts.full => (TakeMethod::FullScan, FullReason::Requested),
        (None, _) => (TakeMethod::FullScan, FullReason::First),
        (Some(_), None) if !dev_identity.is_block() => {
            (TakeMethod::FullScan, FullReason::ImageFile)
        }
        (Some(_), None) => (TakeMethod::FullScan, FullReason::Unavailable),
        (Some(_), Some(_)) if matches!(opts.tracking, Tracking::SingleRun) => {
            (TakeMethod::FullScan, FullReason::SingleRun)
        }
        (Some(n), Some(s)) => match s.continuity() {
            Continuity::NoSnapshotYet => (TakeMethod::FullScan, FullReason::NotYetTracked),
            Continuity::Gap(_) => (TakeMethod::FullScan, FullReason::Gap),
            Continuity::Since(b) if *b != n.id => (TakeMethod::FullScan, FullReason::OtherBaseline),
            Continuity::Since(_) if s.since_previous().is_all() => {
                (TakeMethod::FullScan, FullReason::Gap)
            }
            Continuity::Since(_)
                if opts.verify_every > 0 && tracked_streak + 1 >= opts.verify_every =>
            {
                (TakeMethod::Verified, FullReason::Verification)
            }
            Continuity::Since(_) => (TakeMethod::Tracked, FullReason::None),
        },
    };
    let (mut method, mut reason) = (method, reason);
    match (&untracked, reason) {
        (_, FullReason::None) => {}
        (Some(why), _) if newest.is_some() => {
            tracing::debug!(device = %device.display(), "reading the whole device: {why}")
        }
        (_, FullReason::Gap) => {
            if let Some(Continuity::Gap(why)) = session.as_ref().map(|s| s.continuity()) {
                tracing::warn!(device = %device.display(), "reading the whole device: tracking had a gap: {why}");
            }
        }
        _ => {}
    }

    let parent_id = newest.as_ref().map(|m| m.id).unwrap_or_default();
    let source_id = match dev_identity {
        Identity::Block { rdev } => SourceId {
            kind: 1,
            a: rdev,
            b: 0,
        },
        Identity::File { dev, ino } => SourceId {
            kind: 2,
            a: dev,
            b: ino,
        },
    };
    let meta = SegMeta {
        source: source_id,
        source_path: device.display().to_string(),
        name: opts.name.clone(),
        description: opts.description.clone(),
        metadata: opts.metadata.clone(),
    };
    // The size is known only once the device is open; the plan's size is
    // filled in below, before anything depends on it.
    let plan = SegmentPlan {
        kind: SegmentKind::Snapshot,
        snapshot_id: id,
        seq,
        device_size: 0,
        full: newest.is_none(),
        meta,
        removes: Vec::new(),
    };
    // The previous snapshot's fingerprints, before the writer borrows the chain.
    let old_map = match &newest {
        None => OldMap::None,
        Some(n) => {
            let valid = MapHeader::read(&side).is_some_and(|h| {
                h.chain_id == chain_id
                    && h.snapshot_id == n.id
                    && h.device_size == n.device_size
                    && h.block_size == bs as u32
                    && h.seed == seed
                    && h.count == n.device_size.div_ceil(bs)
            });
            if valid {
                OldMap::File
            } else {
                match chain.resolve(n.id) {
                    Ok(p) => OldMap::Rebuild(Box::new(p)),
                    // The map cannot be rebuilt from a damaged index: a full
                    // snapshot needs nothing from earlier segments.
                    Err(e @ ChainError::SnapshotDamaged { .. }) => {
                        tracing::error!(
                            "{}; taking a full snapshot instead of an increment",
                            crate::util::error_chain(&e)
                        );
                        OldMap::Damaged
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    let (newest, plan) = if matches!(old_map, OldMap::Damaged) {
        method = TakeMethod::FullScan;
        reason = FullReason::First;
        (None, SegmentPlan { full: true, ..plan })
    } else {
        (newest, plan)
    };
    let parent_id = if newest.is_some() {
        parent_id
    } else {
        Uuid::nil()
    };
    let mut writer = SegmentWriter::begin(&mut chain, plan)?;

    // The freeze watchdog sets our own flag; the caller's (daemon shutdown)
    // is only read.
    let cancel = Cancel {
        own: Arc::new(AtomicBool::new(false)),
        outer: opts.cancel.clone(),
    };
    let mut qopts = opts.quiesce.clone();
    qopts.keep_off.push(chain_path.to_path_buf());
    qopts.keep_off.push(side.clone());
    if let Some(d) = &qopts.intent_dir {
        qopts.keep_off.push(d.clone());
    }
    let mounted = dev_identity.is_block()
        && sys
            .mounts_of(device)
            .map(|m| !m.is_empty())
            .unwrap_or(false);
    // Pre-copy when tracking lets us, and quiescing would stop writers.
    let precopy = session.is_some() && mounted && qopts.mode != quiesce::Mode::None;
    // Declared after the writer so that on any error it is dropped (thawed
    // or remounted) first, before the abandoned segment is cut off.
    let mut held = if precopy {
        None
    } else {
        let h = quiesce::quiesce(sys.clone(), device, &qopts, cancel.own.clone())?;
        crate::fault::point(crate::fault::Point::AfterFreeze);
        Some(h)
    };
    let mut quiesce_desc = held
        .as_ref()
        .map(|h| h.description().to_string())
        .unwrap_or_default();

    let mut scanned = (|| -> Result<(PrintFile, u64), TakeError> {
        let dev = Device::open(device, held.as_ref().is_some_and(|h| h.exclusive()))?;
        let size = dev.size();
        if let Some(o) = &newest {
            if size < o.device_size {
                return Err(TakeError::Shrunk {
                    device: device.to_path_buf(),
                    was: o.device_size,
                    now: size,
                    newest: o.id,
                });
            }
            if size != o.device_size && method != TakeMethod::FullScan {
                method = TakeMethod::FullScan;
                reason = FullReason::Gap;
            }
        }
        // With no mapping of ours alive: drop whatever the block device's
        // page cache still holds from before.
        dev.invalidate_cache()?;
        writer.set_device_size(size);
        let nblocks = size.div_ceil(bs);
        let mut prints = match &old_map {
            OldMap::File => PrintFile::create(&side, Some(&side), nblocks),
            OldMap::Rebuild(p) => {
                let mut f = PrintFile::create(&side, None, nblocks).map_err(TakeError::Map)?;
                let f_ref = &mut f;
                p.visit_fingerprints(writer.chain(), |b, v| {
                    if b < nblocks {
                        f_ref.set(b, v);
                        if b % 65536 == 65535 {
                            f_ref.release(b - 65535, b + 1);
                        }
                    }
                })?;
                f.release(0, nblocks);
                Ok(f)
            }
            OldMap::None | OldMap::Damaged => PrintFile::create(&side, None, nblocks),
        }
        .map_err(TakeError::Map)?;
        let old_len = newest.as_ref().map_or(0, |o| o.device_size.div_ceil(bs));
        if let Some(p) = &opts.progress {
            p.total.store(size, Ordering::Relaxed);
        }
        let mut pass = Pass {
            writer: &mut writer,
            prints: &mut prints,
            old_len,
            size,
            bs,
            seed,
            zero: ZeroPrints::new(seed, bs as usize),
            cancel: &cancel,
            progress: opts.progress.as_deref(),
            tuning: &opts.tuning,
            stage: Stage {
                first: 0,
                count: 0,
                data: Vec::with_capacity(STAGE_MAX),
                prints: Vec::new(),
                rehash: true,
            },
            mid_scan: !precopy,
        };
        let per_unit = (bs / crate::track::UNIT).max(1);
        // Readers of written blocks, needed only with tracking.
        let mut readers = if session.is_some() {
            (0..DIRECT_READERS)
                .map(|_| DirectReader::open(device, DIRECT_READ))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let live_started = Instant::now();
        let mut candidates: Vec<u64> = Vec::new();
        let mut candidates_dropped = 0u64;
        // The first pass.
        let first_blocks = match method {
            TakeMethod::Tracked => {
                let s = session.as_ref().expect("tracked takes have a session");
                let blocks = s.since_previous().blocks(bs, nblocks);
                record.tracked_blocks = blocks.len() as u64;
                pass.dirty(&mut readers, &blocks)?
            }
            TakeMethod::Verified => {
                let s = session.as_ref().expect("verified takes have a session");
                record.tracked_blocks = s.since_previous().blocks(bs, nblocks).len() as u64;
                pass.full(&dev, |b| {
                    if !s.reported(b * per_unit, per_unit) {
                        if candidates.len() < MAX_CANDIDATES {
                            candidates.push(b);
                        } else {
                            candidates_dropped += 1;
                        }
                    }
                })?
            }
            TakeMethod::FullScan => pass.full(&dev, |_| {})?,
        };
        let mut gap_during: Option<String> = None;
        let mut pending: Vec<u64> = Vec::new();
        if precopy {
            record.rounds = 1;
            record.live_blocks = first_blocks;
            let s = session.as_mut().expect("pre-copy has a session");
            let mut last = usize::MAX;
            loop {
                let d = match s.cut() {
                    Ok(d) if !d.is_all() => d,
                    Ok(_) => {
                        gap_during = Some("too many blocks were written to track".into());
                        break;
                    }
                    Err(why) => {
                        gap_during = Some(why);
                        break;
                    }
                };
                let blocks = d.blocks(bs, nblocks);
                if blocks.len() <= SETTLED_BLOCKS
                    || blocks.len() >= last
                    || record.rounds >= MAX_ROUNDS
                {
                    pending = blocks;
                    break;
                }
                last = blocks.len();
                record.live_blocks += pass.dirty(&mut readers, &blocks)?;
                record.rounds += 1;
            }
            record.live_us = live_started.elapsed().as_micros() as u64;
            let h = quiesce::quiesce(sys.clone(), device, &qopts, cancel.own.clone())?;
            quiesce_desc = h.description().to_string();
            held = Some(h);
            crate::fault::point(crate::fault::Point::AfterFreeze);
            pass.mid_scan = true;
        } else {
            record.quiesced_blocks = first_blocks;
        }
        // Quiesced now. Unmounted: hold the device so nobody mounts it.
        let _hold = match &held {
            Some(h) if h.exclusive() && precopy => Some(Device::open(device, true)?),
            _ => None,
        };
        if let Some(s) = session.as_mut() {
            dev.invalidate_cache()?;
            if gap_during.is_none() {
                match s.cut() {
                    Ok(d) if !d.is_all() => {
                        let mut blocks = d.blocks(bs, nblocks);
                        blocks.extend_from_slice(&pending);
                        blocks.sort_unstable();
                        blocks.dedup();
                        record.quiesced_blocks += pass.dirty(&mut readers, &blocks)?;
                    }
                    Ok(_) => gap_during = Some("too many blocks were written to track".into()),
                    Err(why) => gap_during = Some(why),
                }
            }
            if let Some(why) = &gap_during {
                // What was read live cannot be trusted: read it all again,
                // quiesced (a long freeze, but a correct snapshot).
                tracing::warn!(device = %device.display(), "tracking had a gap during the snapshot ({why}); reading the whole device again while it is quiesced");
                record.quiesced_blocks += pass.full(&dev, |_| {})?;
                method = TakeMethod::FullScan;
                reason = FullReason::GapDuringTake;
            }
        }
        // Quiesced passes may have read nothing: the point is still passed.
        pass.mid_point();
        if method == TakeMethod::Verified {
            let unmarked: Vec<u64> = candidates
                .into_iter()
                .filter(|&b| {
                    !session
                        .as_ref()
                        .is_some_and(|s| s.reported(b * per_unit, per_unit))
                })
                .collect();
            record.unmarked_blocks = unmarked.len() as u64 + candidates_dropped;
            if record.unmarked_blocks > 0 {
                let first: Vec<String> = unmarked.iter().take(8).map(|b| b.to_string()).collect();
                tracing::error!(
                    device = %device.display(),
                    unmarked_blocks = record.unmarked_blocks,
                    "verification: {} block(s) changed since the previous snapshot without tracking seeing a write (first: {}); written around the block layer (a loop device's backing file, passthrough commands, another host)? This snapshot used the full diff",
                    record.unmarked_blocks,
                    first.join(", ")
                );
            }
        }
        pass.stage_flush()?;
        crate::fault::point(crate::fault::Point::AfterScan);
        drop(pass);
        Ok((prints, size))
    })();
    let finished = held
        .take()
        .map(|h| h.finish())
        .unwrap_or(Ok(Duration::ZERO));
    if cancel.is_set() {
        if let (Ok(_), Ok(_)) = (&scanned, &finished) {
            scanned = Err(TakeError::Cancelled);
        }
    }
    let (prints, size, freeze) = match (scanned, finished) {
        (Ok((p, size)), Ok(window)) => (p, size, window),
        // Thaw or remount trouble, or an expired freeze, says more than
        // whatever the scan ran into because of it.
        (Err(e), Err(q)) => {
            tracing::debug!("scan ended with: {}", crate::util::error_chain(&e));
            return Err(q.into());
        }
        (Ok(_), Err(q)) => return Err(q.into()),
        (Err(e), Ok(_)) => return Err(e),
    };
    record.method = method;
    record.reason = reason;

    crate::fault::point(crate::fault::Point::BeforeCommit);
    let (changed_bytes, zero_bytes) = writer.defined_bytes()?;
    let sealed = prints
        .seal(&MapHeader {
            chain_id,
            snapshot_id: id,
            device_size: size,
            block_size: bs as u32,
            seed,
            count: size.div_ceil(bs),
        })
        .map_err(TakeError::Map)?;
    let stats = SegStats {
        created_us: crate::util::now_micros(),
        parent_id,
        seed,
        changed_bytes,
        zero_bytes,
        freeze_us: freeze.as_micros() as u64,
        scan_us: started.elapsed().as_micros() as u64,
        take: Some(record),
    };
    let info = writer.commit(stats)?;
    crate::fault::point(crate::fault::Point::AfterCommit);
    if let Some(s) = session.take() {
        s.commit(id);
    }
    if let Err(e) = sealed.install(&side) {
        tracing::warn!(
            "could not install the fingerprint map {}: {e}; the next snapshot rebuilds it",
            side.display()
        );
    }
    let snapshot = chain.find(&id.to_string())?.clone();
    Ok(TakeOutcome {
        snapshot,
        changed_bytes,
        zero_bytes,
        stored_bytes: info.len,
        freeze,
        duration: started.elapsed(),
        quiesce: format!("{quiesce_desc}; {}", describe_quiesce(&record)),
        record,
    })
}

/// One line on how a snapshot was taken, for logs and the CLI.
pub fn describe_quiesce(r: &TakeRecord) -> String {
    let how = match r.method {
        TakeMethod::Tracked => format!("tracked: read {} written block(s)", r.tracked_blocks),
        TakeMethod::Verified => format!(
            "verified tracking with a full diff: {} unreported changed block(s)",
            r.unmarked_blocks
        ),
        TakeMethod::FullScan => format!("full scan ({})", r.reason.as_str()),
    };
    if r.rounds > 0 {
        format!(
            "{how}; {} live round(s) read {} block(s), {} re-read while quiesced",
            r.rounds, r.live_blocks, r.quiesced_blocks
        )
    } else {
        format!("{how}; {} block(s) read while quiesced", r.quiesced_blocks)
    }
}

/// Where the previous snapshot's fingerprints come from.
enum OldMap {
    /// No previous snapshot (or a full snapshot was asked for).
    None,
    /// The side file matches the newest snapshot.
    File,
    /// Rebuilt from the chain's indexes.
    Rebuild(Box<crate::chain::Plan>),
    /// The newest snapshot's indexes are damaged: take a full snapshot.
    Damaged,
}

/// Why a scan should stop early: the freeze watchdog fired (own) or the
/// caller is shutting down (outer).
#[derive(Debug)]
struct Cancel {
    own: Arc<AtomicBool>,
    outer: Option<Arc<AtomicBool>>,
}

impl Cancel {
    fn is_set(&self) -> bool {
        self.own.load(Ordering::Relaxed)
            || self
                .outer
                .as_ref()
                .is_some_and(|o| o.load(Ordering::Relaxed))
    }
}

/// Changed blocks waiting to be written: a private copy, so what is stored,
/// its crc and its fingerprint all describe the same bytes even if the
/// device is written under us.
struct Stage {
    first: u64,
    count: u64,
    data: Vec<u8>,
    /// The fingerprint of each staged block, as [`Pass::consider`] had it.
    prints: Vec<u64>,
    /// The staged data was copied from the device's mapping after it was
    /// fingerprinted (it may have changed in between): fingerprint the copy
    /// again. Blocks read into a buffer of our own were fingerprinted from
    /// that buffer, the same bytes as the copy.
    rehash: bool,
}

const STAGE_MAX: usize = 4 << 20;

impl Stage {
    fn flush(
        &mut self,
        writer: &mut SegmentWriter<'_>,
        prints: &mut PrintFile,
        seed: u64,
        bs: usize,
    ) -> Result<(), TakeError> {
        if self.count == 0 {
            return Ok(());
        }
        if self.rehash {
            self.prints.clear();
            self.prints
                .extend(self.data.chunks(bs).map(|block| fingerprint(block, seed)));
        }
        debug_assert_eq!(self.prints.len() as u64, self.count);
        for (i, p) in self.prints.iter().enumerate() {
            prints.set(self.first + i as u64, *p);
        }
        writer.append_data(self.first, &self.data, &self.prints)?;
        self.data.clear();
        self.prints.clear();
        self.count = 0;
        Ok(())
    }
}

/// How far the readers of written blocks may run ahead of the consumer.
#[derive(Default)]
struct Window {
    /// Batches stored so far, and whether the consumer has stopped.
    state: std::sync::Mutex<(usize, bool)>,
    moved: std::sync::Condvar,
}

impl Window {
    /// Wait until batch `i` is within [`BATCHES_AHEAD`] of the consumer.
    /// False: stop reading (the consumer is gone or the take cancelled).
    fn wait_for(&self, i: usize, cancel: &Cancel) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.1 || cancel.is_set() {
                return false;
            }
            if i < st.0 + BATCHES_AHEAD {
                return true;
            }
            // A timeout, so a cancelled take is noticed without a wake-up.
            st = self
                .moved
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stored(&self, n: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = n;
        self.moved.notify_all();
    }

    fn stop_on_drop(&self) -> impl Drop + '_ {
        struct Stop<'w>(&'w Window);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
                self.0.moved.notify_all();
            }
        }
        Stop(self)
    }
}

/// What one take's passes over the device share.
struct Pass<'a, 'c> {
    writer: &'a mut SegmentWriter<'c>,
    prints: &'a mut PrintFile,
    /// Blocks the previous snapshot had; the rest (a grown device) are new.
    old_len: u64,
    size: u64,
    bs: u64,
    seed: u64,
    zero: ZeroPrints,
    cancel: &'a Cancel,
    progress: Option<&'a Progress>,
    tuning: &'a Tuning,
    stage: Stage,
    /// Fire the "mid-scan" fault point halfway through the next pass (the
    /// first one that runs while the volume is quiesced).
    mid_scan: bool,
}

impl Pass<'_, '_> {
    fn mid_point(&mut self) {
        if std::mem::take(&mut self.mid_scan) {
            crate::fault::point(crate::fault::Point::MidScan);
        }
    }

    fn block_len(&self, b: u64) -> usize {
        (self.size - b * self.bs).min(self.bs) as usize
    }

    fn stage_flush(&mut self) -> Result<(), TakeError> {
        self.stage
            .flush(self.writer, self.prints, self.seed, self.bs as usize)
    }

    /// Whether what is staged next comes from the mapping (see
    /// [`Stage::rehash`]); what is staged already is stored first.
    fn stage_mode(&mut self, from_map: bool) -> Result<(), TakeError> {
        self.stage_flush()?;
        self.stage.rehash = from_map;
        Ok(())
    }

    /// Block `b` holds `data` (fingerprint `new`): store it if it differs
    /// from what the snapshot holds so far. Returns whether it did.
    fn consider(&mut self, b: u64, data: &[u8], new: u64) -> Result<bool, TakeError> {
        if b < self.old_len && self.prints.get(b) == new {
            return Ok(false);
        }
        if new == self.zero.get(data.len()) && is_zero(data) {
            self.stage_flush()?;
            self.writer.append_zero(b, 1)?;
            self.prints.set(b, new);
            return Ok(true);
        }
        if self.stage.count > 0
            && (self.stage.first + self.stage.count != b
                || self.stage.data.len() + data.len() > STAGE_MAX)
        {
            self.stage_flush()?;
        }
        if self.stage.count == 0 {
            self.stage.first = b;
        }
        self.stage.data.extend_from_slice(data);
        self.stage.prints.push(new);
        self.stage.count += 1;
        Ok(true)
    }

    /// Read and compare every block, through the windowed mapping.
    /// `changed(b)` hears of each block that differs from the previous
    /// snapshot. Returns the blocks read.
    fn full(&mut self, dev: &Device, mut changed: impl FnMut(u64)) -> Result<u64, TakeError> {
        self.stage_mode(true)?;
        let (size, bs) = (self.size, self.bs);
        let map = dev.map()?;
        let window = ((self.tuning.window as u64 / bs).max(1) * bs).min(size.div_ceil(bs) * bs);
        let mut fresh = vec![0u64; (window / bs) as usize];
        let threads = self.tuning.hash_threads;
        let cancel = self.cancel;
        let done = crate::device::scan_windows(
            &map,
            size,
            window,
            &|| cancel.is_set(),
            |off, len| -> Result<(), TakeError> {
                let b0 = off / bs;
                let b1 = (off + len as u64).div_ceil(bs);
                let fresh = &mut fresh[..(b1 - b0) as usize];
                crate::fingerprint::hash_blocks(
                    map.bytes(off, len),
                    bs as usize,
                    self.seed,
                    fresh,
                    threads,
                );
                map.check()?;
                for b in b0..b1 {
                    let data = map.bytes(b * bs, self.block_len(b));
                    if self.consider(b, data, fresh[(b - b0) as usize])? {
                        changed(b);
                    }
                }
                map.check()?;
                // Store what is staged now, so its fingerprints are set
                // before this window's part of the map is released (a later
                // flush would fault those pages in again, one per window,
                // for the rest of the take).
                self.stage_flush()?;
                self.prints.release(b0, b1);
                if let Some(p) = self.progress {
                    p.done.store(off + len as u64, Ordering::Relaxed);
                }
                if off + len as u64 >= size / 2 {
                    self.mid_point();
                }
                Ok(())
            },
        )?;
        if !done {
            return Err(TakeError::Cancelled);
        }
        self.stage_flush()?;
        Ok(size.div_ceil(bs))
    }

    /// Read `blocks` (ascending) straight from the device and compare them.
    /// Several readers keep requests in flight (a device answers a queue of
    /// small reads much faster than one at a time); their results are
    /// processed in block order. Returns the blocks read.
    fn dirty(&mut self, readers: &mut [DirectReader], blocks: &[u64]) -> Result<u64, TakeError> {
        self.stage_mode(false)?;
        let bs = self.bs;
        let size = self.size;
        let max_run = (readers[0].capacity() as u64 / bs).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in blocks {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == b && *n < max_run => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        // Runs are handed out and handed back in batches: one message per
        // batch, not per run (a run is often a single scattered block, and
        // waking the consumer for each cost more than reading it).
        // Few runs (a quiesced re-read) stay one per batch, so that every
        // reader has one in flight.
        let per_batch = (runs.len() / (readers.len() * 4)).clamp(1, BATCH_RUNS);
        let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
        let mut bytes = 0u64;
        for (i, &(_, n)) in runs.iter().enumerate() {
            match batches.last_mut() {
                Some(r) if r.len() < per_batch && bytes + n * bs <= BATCH_BYTES => {
                    r.end = i + 1;
                    bytes += n * bs;
                }
                _ => {
                    batches.push(i..i + 1);
                    bytes = n * bs;
                }
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let window = Window::default();
        let cancel = self.cancel;
        let done = std::thread::scope(|s| -> Result<usize, TakeError> {
            // However the consumer leaves, no reader is left waiting.
            let _stop = window.stop_on_drop();
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<Vec<u8>, DeviceError>)>(
                readers.len() * 2,
            );
            for r in readers.iter_mut() {
                let (tx, runs, batches, next, window) =
                    (tx.clone(), &runs, &batches, &next, &window);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= batches.len() || !window.wait_for(i, cancel) {
                        break;
                    }
                    let mut out = Vec::new();
                    let res = runs[batches[i].clone()].iter().try_for_each(|&(first, n)| {
                        let len = ((first + n) * bs).min(size) - first * bs;
                        let d = r.read(first * bs, len as usize)?;
                        let got = d.len() as u64;
                        out.extend_from_slice(d);
                        if got != len {
                            return Err(DeviceError::Read {
                                path: r.path().to_path_buf(),
                                offset: first * bs + got,
                                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                            });
                        }
                        Ok(())
                    });
                    if tx.send((i, res.map(|()| out))).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            let mut waiting = BTreeMap::new();
            let mut want = 0usize;
            for (i, res) in rx.iter() {
                waiting.insert(i, res);
                while let Some(res) = waiting.remove(&want) {
                    let data = res?;
                    let mut at = 0usize;
                    for &(first, n) in &runs[batches[want].clone()] {
                        for b in first..first + n {
                            let blen = self.block_len(b);
                            let block = &data[at..at + blen];
                            at += blen;
                            let p = fingerprint(block, self.seed);
                            self.consider(b, block, p)?;
                        }
                        self.stage_flush()?;
                    }
                    self.prints.release_if_busy();
                    want += 1;
                    window.stored(want);
                    if want * 2 >= batches.len() {
                        self.mid_point();
                    }
                }
            }
            Ok(want)
        })?;
        if done != batches.len() {
            return Err(TakeError::Cancelled);
        }
        Ok(blocks.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel() -> Cancel {
        Cancel {
            own: Arc::new(AtomicBool::new(false)),
            outer: None,
        }
    }

    /// A reader waits while its batch is too far ahead, goes on once the
    /// consumer catches up, and stops when the consumer leaves.
    #[test]
    fn readers_stay_within_the_window() {
        let w = Window::default();
        let c = cancel();
        assert!(w.wait_for(BATCHES_AHEAD - 1, &c));
        std::thread::scope(|s| {
            let ahead = s.spawn(|| w.wait_for(BATCHES_AHEAD + 5, &c));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!ahead.is_finished(), "a reader ran past the window");
            w.stored(6);
            assert!(ahead.join().unwrap());
            let stuck = s.spawn(|| w.wait_for(1000, &c));
            std::thread::sleep(Duration::from_millis(50));
            drop(w.stop_on_drop());
            assert!(
                !stuck.join().unwrap(),
                "a reader kept going after the consumer left"
            );
        });
        let c = cancel();
        c.own.store(true, Ordering::Relaxed);
        assert!(!Window::default().wait_for(0, &c));
    }
}
