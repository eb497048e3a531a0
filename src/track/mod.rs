//! Write tracking: which blocks of a volume were written since its last
//! snapshot, from the kernel's block tracepoints.
//!
//! A [`Registry`] opens `block:block_bio_queue`, `block:block_rq_complete` and
//! `block:block_bio_complete` with `perf_event_open` on every CPU, filtered on
//! the watched disks, and a thread drains the per-CPU rings into one
//! [`DirtySet`] per volume. A take opens a [`Session`]: it hands over the
//! blocks dirtied since the volume's previous snapshot (if tracking was
//! continuous since then) and cuts the set into rounds for the pre-copy.
//!
//! The tracker may over-report, never under-report silently: lost records,
//! undecodable rings, a changed CPU set, a resized or replaced device, and a
//! restart each break continuity ([`Continuity::Gap`]), and the next take
//! is a full diff. See docs/TRACKING.md for why this is enough and what the
//! tracker cannot see.

pub mod dirty;
pub mod perf;
pub mod ring;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use dirty::{DirtySet, UNIT};

/// A volume to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub volume: String,
    pub path: PathBuf,
}

/// Tuning of a registry.
#[derive(Clone, Debug)]
pub struct Options {
    /// Pages per CPU ring (a power of two; default 256, 1 MiB).
    pub ring_pages: usize,
    /// How often the thread drains the rings; `None`: no thread, rings are
    /// drained only when a take asks (tests use this to overflow a ring).
    pub drain_every: Option<Duration>,
    /// Memory a volume's dirty set may use before it says "everything".
    pub dirty_cap_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        let pages = std::env::var("BLOCKSNAP_TRACK_RING_PAGES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(256);
        Options {
            ring_pages: pages.clamp(1, 1 << 14),
            drain_every: Some(Duration::from_millis(20)),
            dirty_cap_bytes: 32 << 20,
        }
    }
}

/// What the kernel knows a watched device as.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Watch {
    /// Kernel device number of the whole disk (a partition's writes appear there).
    disk: u32,
    /// The volume's first byte on that disk, and its length.
    start: u64,
    len: u64,
    rdev: u64,
    /// The disk's media sequence number (changes on every new medium,
    /// including a loop device attached to another file).
    diskseq: Option<u64>,
}

fn sysfs_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// How to watch the device at `path`, or why it cannot be watched.
fn probe(path: &Path) -> Result<Watch, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !md.file_type().is_block_device() {
        return Err(format!(
            "{} is a regular file, and writes to a file cannot be traced as block I/O",
            path.display()
        ));
    }
    let rdev = md.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = crate::sys::block_device_size(std::os::fd::AsFd::as_fd(&file))
        .map_err(|e| format!("cannot read the size of {}: {e}", path.display()))?;
    if sys.join("partition").exists() {
        let start = sysfs_u64(&sys.join("start"))
            .ok_or_else(|| format!("cannot read the start of partition {}", path.display()))?;
        let parent = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or_else(|| format!("cannot find the disk of partition {}", path.display()))?;
        let devno = std::fs::read_to_string(parent.join("dev")).unwrap_or_default();
        let (pmaj, pmin) = devno
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("cannot read the disk of partition {}", path.display()))?;
        Ok(Watch {
            disk: (pmaj << 20) | pmin,
            start: start * 512,
            len: size,
            rdev,
            diskseq: sysfs_u64(&parent.join("diskseq")),
        })
    } else {
        Ok(Watch {
            disk: ring::kernel_dev(rdev),
            start: 0,
            len: size,
            rdev,
            diskseq: sysfs_u64(&sys.join("diskseq")),
        })
    }
}

/// Whether tracking has been complete since the volume's previous snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Continuity {
    /// Every write since snapshot `0` was seen.
    Since(Uuid),
    /// No snapshot was committed since tracking of the volume began.
    NoSnapshotYet,
    /// Tracking had a gap (why): the next snapshot is a full diff.
    Gap(String),
}

#[derive(Debug)]
struct Vol {
    target: Target,
    watch: Option<Watch>,
    /// Units written since the last cut (or since the baseline).
    dirty: DirtySet,
    /// Why the dirty set cannot be trusted, if something went wrong.
    gap: Option<String>,
    /// The snapshot whose final cut the dirty set counts from.
    baseline: Option<Uuid>,
    in_session: bool,
    cap: usize,
}

impl Vol {
    fn fresh(&self) -> DirtySet {
        DirtySet::with_cap(self.cap)
    }

    /// Re-probe the device; a change of identity or size is a gap.
    fn check(&mut self) {
        match (probe(&self.target.path), &self.watch) {
            (Ok(now), Some(was)) if now == *was => {}
            (Ok(now), was) => {
                if was.is_some() {
                    self.gap = Some(format!(
                        "{} was resized or replaced since tracking began",
                        self.target.path.display()
                    ));
                }
                self.watch = Some(now);
            }
            (Err(e), _) => {
                self.gap = Some(e);
                self.watch = None;
            }
        }
    }
}

struct Shared {
    perf: Option<perf::Perf>,
    vols: Vec<Vol>,
    last_cpu_check: Instant,
}

impl Shared {
    fn drain(&mut self) {
        let Some(p) = self.perf.as_mut() else {
            return;
        };
        let vols = &mut self.vols;
        let d = p.drain(|io| {
            if !io.writes || io.nr_sector == 0 {
                return;
            }
            let a = io.sector.saturating_mul(512);
            let b = a.saturating_add(io.nr_sector as u64 * 512);
            for v in vols.iter_mut() {
                let Some(w) = &v.watch else { continue };
                if w.disk != io.dev {
                    continue;
                }
                let (lo, hi) = (a.max(w.start), b.min(w.start + w.len));
                if lo < hi {
                    v.dirty.mark_bytes(lo - w.start, hi - w.start);
                }
            }
        });
        let mut why = None;
        if d.lost > 0 {
            why = Some(format!(
                "the kernel dropped {} tracing record(s): the ring buffer was full",
                d.lost
            ));
        } else if d.malformed {
            why = Some("a tracing ring held records blocksnap could not decode".to_string());
        }
        if self.last_cpu_check.elapsed() >= Duration::from_millis(500) || why.is_some() {
            self.last_cpu_check = Instant::now();
            if perf::online_cpus().ok().as_deref() != Some(p.cpus()) {
                why = Some("the set of online CPUs changed while tracking".to_string());
                // Watch the CPUs online now; everything before is a gap.
                let devs: Vec<u32> = vols
                    .iter()
                    .filter_map(|v| v.watch.as_ref().map(|w| w.disk))
                    .collect();
                match perf::Perf::open(p.ring_pages(), &devs) {
                    Ok(np) => *p = np,
                    Err(e) => tracing::error!(
                        "cannot reopen the tracer: {}",
                        crate::util::error_chain(&e)
                    ),
                }
            }
        }
        if let Some(w) = why {
            tracing::warn!(
                "write tracking has a gap: {w}; the next snapshot of every volume is a full diff"
            );
            for v in vols.iter_mut() {
                v.gap.get_or_insert_with(|| w.clone());
            }
        }
    }
}

struct Inner {
    shared: Mutex<Shared>,
    stop: AtomicBool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The tracker of a set of volumes; stops tracking when dropped.
pub struct Registry {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    unavailable: Option<String>,
    generation: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("generation", &self.generation)
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

impl Registry {
    /// Start tracking `targets`. Never fails: if the kernel's tracepoints
    /// cannot be used, [`Registry::unavailable`] says why and every session
    /// is refused (takes then scan whole devices, as without tracking).
    pub fn start(targets: &[Target], opts: &Options) -> Registry {
        let mut vols: Vec<Vol> = targets
            .iter()
            .map(|t| Vol {
                target: t.clone(),
                watch: None,
                dirty: DirtySet::with_cap(opts.dirty_cap_bytes),
                gap: None,
                baseline: None,
                in_session: false,
                cap: opts.dirty_cap_bytes,
            })
            .collect();
        for v in &mut vols {
            match probe(&v.target.path) {
                Ok(w) => v.watch = Some(w),
                Err(e) => {
                    tracing::info!(volume = %v.target.volume, "not tracking writes: {e}; its snapshots scan it whole");
                }
            }
        }
        let devs: Vec<u32> = vols
            .iter()
            .filter_map(|v| v.watch.as_ref().map(|w| w.disk))
            .collect();
        let (perf, unavailable) = if devs.is_empty() {
            (None, Some("no volume is a block device".to_string()))
        } else {
            match perf::Perf::open(opts.ring_pages, &devs) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(crate::util::error_chain(&e))),
            }
        };
        let generation = rand::random::<u64>() | 1;
        let inner = Arc::new(Inner {
            shared: Mutex::new(Shared {
                perf,
                vols,
                last_cpu_check: Instant::now(),
            }),
            stop: AtomicBool::new(false),
        });
        let thread = match (&unavailable, opts.drain_every) {
            (None, Some(every)) => {
                let i = inner.clone();
                std::thread::Builder::new()
                    .name("track-drain".into())
                    .spawn(move || {
                        while !i.stop.load(Ordering::Relaxed) {
                            // Woken as soon as a ring is a quarter full, so a
                            // burst of writes is drained before it overflows.
                            let fds = i.lock().perf.as_ref().map(|p| p.wait_fds());
                            match fds {
                                Some(f) if !f.is_empty() => perf::wait(&f, every),
                                _ => std::thread::sleep(every),
                            }
                            i.lock().drain();
                        }
                    })
                    .map_err(|e| tracing::error!("cannot start the tracking thread: {e}"))
                    .ok()
            }
            _ => None,
        };
        // Without its drain thread the rings would overflow: no tracking.
        let unavailable = match unavailable {
            None if opts.drain_every.is_some() && thread.is_none() => {
                Some("the tracking thread could not start".to_string())
            }
            u => u,
        };
        if devs.is_empty() {
            // Nothing to track: each volume already said why above.
        } else if let Some(u) = &unavailable {
            tracing::warn!("write tracking is unavailable: {u}; snapshots scan whole devices and keep filesystems frozen for the whole scan, as without tracking");
        }
        Registry {
            inner,
            thread,
            unavailable,
            generation,
        }
    }

    /// Why tracking is off altogether, if it is.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// A random number that changes with every start of a tracker.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `volume`'s writes are being tracked now.
    pub fn tracks(&self, volume: &str) -> bool {
        self.unavailable.is_none()
            && self
                .inner
                .lock()
                .vols
                .iter()
                .any(|v| v.target.volume == volume && v.watch.is_some())
    }

    /// Start a take of `volume`. `Err` says why it is not tracked.
    pub fn session(&self, volume: &str) -> Result<Session, String> {
        if let Some(u) = &self.unavailable {
            return Err(format!("write tracking is unavailable: {u}"));
        }
        let mut s = self.inner.lock();
        s.drain();
        let idx = s
            .vols
            .iter()
            .position(|v| v.target.volume == volume)
            .ok_or_else(|| {
                format!("volume {volume} is not tracked (not configured when blocksnapd started)")
            })?;
        let v = &mut s.vols[idx];
        if v.in_session {
            return Err(format!("another take of volume {volume} is tracking it"));
        }
        v.check();
        if v.watch.is_none() {
            return Err(v
                .gap
                .take()
                .unwrap_or_else(|| "the device cannot be traced".into()));
        }
        let continuity = match (v.gap.take(), v.baseline) {
            (Some(g), _) => {
                v.baseline = None;
                Continuity::Gap(g)
            }
            (None, Some(b)) => Continuity::Since(b),
            (None, None) => Continuity::NoSnapshotYet,
        };
        let fresh = v.fresh();
        let d0 = std::mem::replace(&mut v.dirty, fresh);
        v.in_session = true;
        Ok(Session {
            inner: self.inner.clone(),
            idx,
            continuity,
            d0,
            cuts: DirtySet::default(),
            generation: self.generation,
            done: false,
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.inner.lock().perf = None;
    }
}

/// One take's view of a volume's tracking. Dropped without
/// [`Session::commit`], everything it took is given back, so the next take
/// still knows every block written since the last committed snapshot.
pub struct Session {
    inner: Arc<Inner>,
    idx: usize,
    continuity: Continuity,
    d0: DirtySet,
    cuts: DirtySet,
    generation: u64,
    done: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("continuity", &self.continuity)
            .finish()
    }
}

impl Session {
    pub fn continuity(&self) -> &Continuity {
        &self.continuity
    }

    /// Units written between the previous snapshot's final cut and the
    /// start of this session (meaningful only with [`Continuity::Since`]).
    pub fn since_previous(&self) -> &DirtySet {
        &self.d0
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Drain the rings and hand over the units written since the last cut
    /// (or the session's start). `Err` if tracking had a gap meanwhile: what
    /// was read since the session began can then not be trusted.
    pub fn cut(&mut self) -> Result<DirtySet, String> {
        let mut s = self.inner.lock();
        s.drain();
        let v = &mut s.vols[self.idx];
        v.check();
        if let Some(g) = &v.gap {
            return Err(g.clone());
        }
        let fresh = v.fresh();
        let d = std::mem::replace(&mut v.dirty, fresh);
        self.cuts.union(&d);
        Ok(d)
    }

    /// Whether tracking reported any unit of `[first, first + n)` written
    /// since the previous snapshot (before or during this session).
    pub fn reported(&self, first: u64, n: u64) -> bool {
        (first..first + n).any(|u| self.d0.contains(u) || self.cuts.contains(u))
    }

    /// The take committed `snapshot`: from the last cut on, the dirty set
    /// counts from it.
    pub fn commit(mut self, snapshot: Uuid) {
        let mut s = self.inner.lock();
        let v = &mut s.vols[self.idx];
        v.baseline = Some(snapshot);
        v.in_session = false;
        self.done = true;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut s = self.inner.lock();
        let v = &mut s.vols[self.idx];
        v.dirty.union(&self.d0);
        v.dirty.union(&self.cuts);
        v.in_session = false;
    }
}
