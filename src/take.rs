//! Taking a snapshot: quiesce, invalidate, map, fingerprint every block,
//! append the changed ones, commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::chain::format::{SegMeta, SegStats, SegmentKind, SourceId};
use crate::chain::writer::{SegmentPlan, SegmentWriter};
use crate::chain::{side_file, Chain, ChainError, Snapshot};
use crate::device::{Device, DeviceError, DeviceMap, Identity};
use crate::fingerprint::{fingerprint, is_zero, FingerprintMap, ZeroPrints};
use crate::quiesce::{self, QuiesceError};

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
}

/// Snapshot `device` into the chain at `chain_path` (created on first use).
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
    let mut old = if opts.full {
        None
    } else {
        match chain.newest_fingerprints(&side) {
            Ok(m) => m,
            // The map cannot be rebuilt from a damaged index: a full snapshot
            // needs nothing from earlier segments, so backups keep working.
            Err(e @ ChainError::SnapshotDamaged { .. }) => {
                tracing::error!(
                    "{}; taking a full snapshot instead of an increment",
                    crate::util::error_chain(&e)
                );
                None
            }
            Err(e) => return Err(e.into()),
        }
    };
    let id = opts.snapshot_id.unwrap_or_else(Uuid::new_v4);
    if chain.snapshots().iter().any(|s| s.id == id) {
        return Err(TakeError::DuplicateId(id));
    }
    let bs = chain.block_size() as u64;
    let seed = chain.seed();
    let seq = chain.next_seq();
    let parent_id = old.as_ref().map(|m| m.snapshot_id).unwrap_or_default();

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
        full: old.is_none(),
        meta,
        removes: Vec::new(),
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
    // Declared after the writer so that on any error it is dropped (thawed
    // or remounted) first, before the abandoned segment is cut off.
    let held = quiesce::quiesce(sys, device, &qopts, cancel.own.clone())?;
    crate::fault::point(crate::fault::Point::AfterFreeze);
    let quiesce_desc = held.description().to_string();

    let scanned = (|| -> Result<(ScanResult, u64), TakeError> {
        let source = Device::open(device, held.exclusive())?;
        let size = source.size();
        if let Some(o) = &old {
            if size < o.device_size {
                return Err(TakeError::Shrunk {
                    device: device.to_path_buf(),
                    was: o.device_size,
                    now: size,
                    newest: o.snapshot_id,
                });
            }
        }
        // After the freeze and with no mapping of ours alive: drop whatever the
        // block device's page cache still holds from before.
        source.invalidate_cache()?;
        let map = source.map()?;
        writer.set_device_size(size);
        if let Some(p) = &opts.progress {
            p.total.store(size, Ordering::Relaxed);
        }
        // One map in memory: the old fingerprints are replaced by the new
        // ones as the scan goes.
        let prints = old
            .as_mut()
            .map(|m| std::mem::take(&mut m.prints))
            .unwrap_or_default();
        let r = scan(
            &map,
            size,
            prints,
            seed,
            bs,
            &mut writer,
            &cancel,
            opts.progress.as_deref(),
            &opts.tuning,
        )?;
        crate::fault::point(crate::fault::Point::AfterScan);
        Ok((r, size))
    })();
    let finished = held.finish();
    let (result, size) = match (scanned, finished) {
        (Ok(r), Ok(_)) if cancel.is_set() => {
            drop(r);
            return Err(TakeError::Cancelled);
        }
        (Ok(r), Ok(window)) => (
            ScanResult {
                freeze: window,
                ..r.0
            },
            r.1,
        ),
        // Thaw or remount trouble, or an expired freeze, says more than
        // whatever the scan ran into because of it.
        (Err(e), Err(q)) => {
            tracing::debug!("scan ended with: {}", crate::util::error_chain(&e));
            return Err(q.into());
        }
        (Ok(_), Err(q)) => return Err(q.into()),
        (Err(e), Ok(_)) => return Err(e),
    };

    crate::fault::point(crate::fault::Point::BeforeCommit);
    let stats = SegStats {
        created_us: crate::util::now_micros(),
        parent_id,
        seed,
        changed_bytes: result.changed_bytes,
        zero_bytes: result.zero_bytes,
        freeze_us: result.freeze.as_micros() as u64,
        scan_us: result.scan.as_micros() as u64,
    };
    let info = writer.commit(stats)?;
    crate::fault::point(crate::fault::Point::AfterCommit);

    let map = FingerprintMap {
        chain_id: chain.chain_id(),
        snapshot_id: id,
        device_size: size,
        block_size: bs as u32,
        seed,
        prints: result.prints,
    };
    if let Err(e) = map.save(&side) {
        tracing::warn!(
            "could not save the fingerprint map {}: {e}; the next snapshot rebuilds it",
            side.display()
        );
    }
    let snapshot = chain.find(&id.to_string())?.clone();
    Ok(TakeOutcome {
        snapshot,
        changed_bytes: result.changed_bytes,
        zero_bytes: result.zero_bytes,
        stored_bytes: info.len,
        freeze: result.freeze,
        duration: started.elapsed(),
        quiesce: quiesce_desc,
    })
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

#[derive(Debug, Default)]
struct ScanResult {
    prints: Vec<u64>,
    changed_bytes: u64,
    zero_bytes: u64,
    freeze: Duration,
    scan: Duration,
}

/// Changed blocks waiting to be written: a private copy, so what is stored,
/// its crc and its fingerprint all describe the same bytes even if the
/// device is written under us.
struct Stage {
    first: u64,
    count: u64,
    data: Vec<u8>,
    prints: Vec<u64>,
}

const STAGE_MAX: usize = 4 << 20;

impl Stage {
    fn flush(
        &mut self,
        writer: &mut SegmentWriter<'_>,
        prints: &mut [u64],
        seed: u64,
        bs: usize,
    ) -> Result<(), TakeError> {
        if self.count == 0 {
            return Ok(());
        }
        self.prints.clear();
        for (i, block) in self.data.chunks(bs).enumerate() {
            let p = fingerprint(block, seed);
            prints[self.first as usize + i] = p;
            self.prints.push(p);
        }
        writer.append_data(self.first, &self.data, &self.prints)?;
        self.data.clear();
        self.count = 0;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn scan(
    map: &DeviceMap<'_>,
    size: u64,
    mut prints: Vec<u64>,
    seed: u64,
    bs: u64,
    writer: &mut SegmentWriter<'_>,
    cancel: &Cancel,
    progress: Option<&Progress>,
    tuning: &Tuning,
) -> Result<ScanResult, TakeError> {
    let started = Instant::now();
    let nblocks = size.div_ceil(bs);
    // Blocks the previous snapshot had; the rest (a grown device) are new.
    let old_len = prints.len() as u64;
    prints.resize(nblocks as usize, 0);
    let zero = ZeroPrints::new(seed, bs as usize);
    let window = ((tuning.window as u64 / bs).max(1) * bs).min(size.div_ceil(bs) * bs);
    let mut fresh = vec![0u64; (window / bs) as usize];
    let nwin = size.div_ceil(window);
    let block_len = |b: u64| (size - b * bs).min(bs) as usize;
    let mut changed_bytes = 0u64;
    let mut zero_bytes = 0u64;
    let mut stage = Stage {
        first: 0,
        count: 0,
        data: Vec::with_capacity(STAGE_MAX),
        prints: Vec::new(),
    };

    std::thread::scope(|s| -> Result<(), TakeError> {
        // A prefetcher faults in the next window while this thread hashes the
        // current one; the rendezvous channel keeps at most two windows resident.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<u64, DeviceError>>(0);
        s.spawn(move || {
            for w in 0..nwin {
                if cancel.is_set() {
                    break;
                }
                let off = w * window;
                let len = window.min(size - off) as usize;
                let r = map.populate(off, len);
                let failed = r.is_err();
                if tx.send(r.map(|()| off)).is_err() || failed {
                    break;
                }
            }
        });
        let mut done_windows = 0;
        for msg in rx.iter() {
            let off = msg?;
            if cancel.is_set() {
                return Err(TakeError::Cancelled);
            }
            let len = window.min(size - off);
            let b0 = off / bs;
            let b1 = (off + len).div_ceil(bs);
            let fresh = &mut fresh[..(b1 - b0) as usize];
            crate::fingerprint::hash_blocks(
                map.bytes(off, len as usize),
                bs as usize,
                seed,
                fresh,
                tuning.hash_threads,
            );
            map.check()?;
            for b in b0..b1 {
                let new = fresh[(b - b0) as usize];
                let unchanged = b < old_len && prints[b as usize] == new;
                prints[b as usize] = new;
                if unchanged {
                    continue;
                }
                let blen = block_len(b);
                changed_bytes += blen as u64;
                let data = map.bytes(b * bs, blen);
                if prints[b as usize] == zero.get(blen) && is_zero(data) {
                    stage.flush(writer, &mut prints, seed, bs as usize)?;
                    writer.append_zero(b, 1);
                    zero_bytes += blen as u64;
                    continue;
                }
                if stage.count > 0
                    && (stage.first + stage.count != b || stage.data.len() + blen > STAGE_MAX)
                {
                    stage.flush(writer, &mut prints, seed, bs as usize)?;
                }
                if stage.count == 0 {
                    stage.first = b;
                }
                stage.data.extend_from_slice(data);
                stage.count += 1;
            }
            map.check()?;
            map.release(off, len as usize);
            done_windows += 1;
            if let Some(p) = progress {
                p.done.store(off + len, Ordering::Relaxed);
            }
            if done_windows == nwin.div_ceil(2) {
                crate::fault::point(crate::fault::Point::MidScan);
            }
        }
        if done_windows != nwin {
            return Err(TakeError::Cancelled);
        }
        stage.flush(writer, &mut prints, seed, bs as usize)?;
        Ok(())
    })?;
    Ok(ScanResult {
        prints,
        changed_bytes,
        zero_bytes,
        freeze: Duration::ZERO,
        scan: started.elapsed(),
    })
}
