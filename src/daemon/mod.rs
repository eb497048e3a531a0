//! blocksnapd: the daemon's state (catalog, claims, live progress, jobs).
//!
//! Layers, from the socket down:
//! - `server`: the Unix socket, connection limits, graceful stop.
//! - `api`: HTTP views (v1 now): parse a request, call one operation,
//!   render its result or its error.
//! - `ops`: the operations (create a snapshot, make a volume, revert, ...):
//!   the daemon's rules, claims, catalog changes and background jobs.
//! - `engine`: the host (devices, mounts, loop devices, the chain engine),
//!   real or simulated (`sim`).
//! - `store`: the catalog, behind the `Store` contract.

pub mod api;
pub mod backups;
pub mod catalog;
pub mod claims;
pub mod discovery;
pub mod engine;
pub mod logline;
pub mod metrics;
pub mod microversion;
pub mod ops;
mod reconcile;
pub mod schedule;
pub mod server;
pub mod sim;
pub mod store;
pub mod takes;
pub mod views;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use crate::config::{self, Config};
use crate::defaults;
use crate::quiesce::Mode;
use crate::take::Progress;
use catalog::{SnapshotRecord, VolStatus, VolumeKind, VolumeRecord};
use claims::Claims;
use engine::Engine;
use store::{Change, Store, StoreError, VolumeQuery};

pub use defaults::GB;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    UnsafeStateDir(#[from] crate::statedir::StateDirError),
    #[error("another blocksnapd is running with state directory {path} (it holds {path}/blocksnapd.lock)")]
    AlreadyRunning { path: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Backups(#[from] backups::BookError),
    #[error("cannot set up the socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a live blocksnapd already answers on {path}; stop it first")]
    SocketInUse { path: PathBuf },
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
}

/// A volume as the daemon sees it, configured or made: what the config says
/// and what the catalog records.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub id: String,
    pub device: Option<PathBuf>,
    pub configured: bool,
    pub tenant: Option<String>,
    pub quiesce: Mode,
    pub block_size: Option<u32>,
    pub max_freeze: Duration,
    pub record: VolumeRecord,
}

impl VolumeInfo {
    pub fn visible_to(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

/// The daemon.
pub struct Daemon {
    pub config: Config,
    store: Arc<dyn Store>,
    /// Held around every read-modify-write of the catalog, so no change is
    /// computed from a record another change is replacing.
    writer: Mutex<()>,
    pub claims: Arc<Claims>,
    /// Live progress by snapshot id (takes) or volume id (reverts).
    progress: Mutex<HashMap<String, Arc<Progress>>>,
    pub engine: Arc<dyn Engine>,
    /// Set on SIGTERM: running scans stop, are thawed and marked error.
    pub shutdown: Arc<AtomicBool>,
    pub metrics: metrics::Metrics,
    /// The backups made through the API (`backups.json`).
    pub backups: backups::Book,
    running: Mutex<usize>,
    idle: std::sync::Condvar,
    /// The scheduler, once installed (`schedule::install`).
    scheduler: std::sync::OnceLock<Arc<schedule::Scheduler>>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("state_dir", &self.config.state_dir)
            .finish()
    }
}

/// The record of a configured volume the API has not changed yet.
pub(crate) fn configured_record(v: &config::Volume, created_us: i64) -> VolumeRecord {
    VolumeRecord {
        id: v.id.clone(),
        kind: VolumeKind::Configured,
        tenant: v.tenant.clone(),
        status: VolStatus::Available,
        display_name: v.display_name.clone(),
        display_description: v.display_description.clone(),
        metadata: BTreeMap::new(),
        created_us,
        updated_us: 0,
        size_bytes: 0,
        error: None,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens the catalog once the state directory is set up and locked.
pub type OpenStore<'a> = dyn FnOnce(&Path) -> Result<Arc<dyn Store>, StoreError> + 'a;

impl Daemon {
    pub fn chains_dir(&self) -> PathBuf {
        self.config.state_dir.join("chains")
    }
    /// A volume's chain. Volume ids are checked names (config) or UUIDs
    /// (made here), never paths from a request.
    pub fn chain_path(&self, volume: &str) -> PathBuf {
        self.chains_dir().join(format!("{volume}.chain"))
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.config.state_dir.join("volumes")
    }
    pub fn image_path(&self, volume: &str) -> PathBuf {
        self.volumes_dir().join(format!("{volume}.img"))
    }
    pub fn intent_dir(&self) -> PathBuf {
        self.config.state_dir.join("freeze-intents")
    }

    /// Open the state directory and take its lock, thaw leftovers, open the
    /// catalog with `open_store`, bring it in line with the chain files and
    /// resume (or mark) what a crash interrupted.
    pub fn start(
        config: Config,
        engine: Arc<dyn Engine>,
        open_store: Box<OpenStore<'_>>,
    ) -> Result<Arc<Daemon>, StartError> {
        let state = config.state_dir.clone();
        // Owned by us, nobody else can write in it, no symlink followed.
        let state_dir = crate::statedir::StateDir::open(&state)?;
        for sub in crate::statedir::DAEMON_SUBDIRS {
            state_dir.subdir(sub)?;
        }
        let lock_path = state.join("blocksnapd.lock");
        let lock_file = state_dir
            .open_nofollow(
                "blocksnapd.lock",
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CREAT,
            )
            .map_err(|source| StartError::StateDir {
                path: lock_path.clone(),
                source,
            })?;
        let lock_file =
            match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err(_) => {
                    return Err(StartError::AlreadyRunning {
                        path: state.clone(),
                    })
                }
            };
        // Freezes left by an earlier run of ours, first of all.
        engine.thaw_leftovers(&state.join("freeze-intents"));
        let store = open_store(&state)?;
        let book = backups::Book::open(&state)?;
        let d = Arc::new(Daemon {
            backups: book,
            metrics: metrics::Metrics::default(),
            store,
            writer: Mutex::new(()),
            claims: Claims::new(),
            progress: Mutex::new(HashMap::new()),
            engine,
            shutdown: Arc::new(AtomicBool::new(false)),
            running: Mutex::new(0),
            idle: std::sync::Condvar::new(),
            scheduler: std::sync::OnceLock::new(),
            _lock: lock_file,
            config,
        });
        reconcile::reconcile(&d)?;
        ops::backups::resume(&d);
        Ok(d)
    }

    /// The catalog, for reads. Changes go through [`Daemon::write`] and the
    /// `update_*` helpers.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Run `f` as the catalog's only writer: what it reads stays current
    /// until it returns, so a change computed from a record never replaces
    /// a newer one.
    pub(crate) fn write<R, E>(&self, f: impl FnOnce(&dyn Store) -> Result<R, E>) -> Result<R, E> {
        self.write_releasing(None, f)
    }

    /// As [`Daemon::write`], first releasing a job's claim: an operation that
    /// gets the claim from now on records its own start only after this
    /// change (it needs the writer too), and nobody sees the job's outcome
    /// while its claim is still held.
    fn write_releasing<R, E>(
        &self,
        release: Option<&JobClaim>,
        f: impl FnOnce(&dyn Store) -> Result<R, E>,
    ) -> Result<R, E> {
        let _w = lock(&self.writer);
        if let Some(j) = release {
            j.release();
        }
        f(self.store.as_ref())
    }

    /// Apply changes durably.
    pub(crate) fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.write(|s| s.apply(changes))
    }

    /// A job's last change: release its claim and apply `changes`.
    pub(crate) fn finish_apply(
        &self,
        job: &JobClaim,
        changes: &[Change],
    ) -> Result<(), StoreError> {
        self.write_releasing(Some(job), |s| s.apply(changes))
    }

    /// Change one snapshot record; `None` if there is none. The change is
    /// durable when this returns `Ok`.
    pub(crate) fn update_snapshot<R>(
        &self,
        id: Uuid,
        f: impl FnOnce(&mut SnapshotRecord) -> R,
    ) -> Result<Option<(R, SnapshotRecord)>, StoreError> {
        self.change_snapshot(None, id, f)
    }

    /// A job's last change to a snapshot record, releasing its claim.
    pub(crate) fn finish_snapshot<R>(
        &self,
        job: &JobClaim,
        id: Uuid,
        f: impl FnOnce(&mut SnapshotRecord) -> R,
    ) -> Result<Option<(R, SnapshotRecord)>, StoreError> {
        self.change_snapshot(Some(job), id, f)
    }

    fn change_snapshot<R>(
        &self,
        release: Option<&JobClaim>,
        id: Uuid,
        f: impl FnOnce(&mut SnapshotRecord) -> R,
    ) -> Result<Option<(R, SnapshotRecord)>, StoreError> {
        self.write_releasing(release, |s| {
            let Some(mut rec) = s.snapshot(id)? else {
                return Ok(None);
            };
            let before = rec.clone();
            let r = f(&mut rec);
            if rec != before {
                rec.updated_us = crate::util::now_micros();
                s.apply(&[Change::PutSnapshot(rec.clone())])?;
            }
            Ok(Some((r, rec)))
        })
    }

    /// Change one volume record (a configured volume without one gets its
    /// default record first); `None` if there is no such volume.
    pub(crate) fn update_volume<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut VolumeRecord) -> R,
    ) -> Result<Option<(R, VolumeRecord)>, StoreError> {
        self.change_volume(None, id, f)
    }

    /// A job's last change to a volume record, releasing its claim.
    pub(crate) fn finish_volume<R>(
        &self,
        job: &JobClaim,
        id: &str,
        f: impl FnOnce(&mut VolumeRecord) -> R,
    ) -> Result<Option<(R, VolumeRecord)>, StoreError> {
        self.change_volume(Some(job), id, f)
    }

    fn change_volume<R>(
        &self,
        release: Option<&JobClaim>,
        id: &str,
        f: impl FnOnce(&mut VolumeRecord) -> R,
    ) -> Result<Option<(R, VolumeRecord)>, StoreError> {
        self.write_releasing(release, |s| {
            let mut rec = match s.volume(id)? {
                Some(r) => r,
                None => match self.config.volumes.iter().find(|v| v.id == id) {
                    Some(v) => configured_record(v, crate::util::now_micros()),
                    None => return Ok(None),
                },
            };
            let before = rec.clone();
            let r = f(&mut rec);
            if rec != before {
                rec.updated_us = crate::util::now_micros();
                s.apply(&[Change::PutVolume(rec.clone())])?;
            }
            Ok(Some((r, rec)))
        })
    }

    fn configured_info(&self, v: &config::Volume, record: VolumeRecord) -> VolumeInfo {
        VolumeInfo {
            id: v.id.clone(),
            device: Some(v.device.clone()),
            configured: true,
            tenant: v.tenant.clone(),
            quiesce: v.quiesce,
            block_size: v.block_size,
            max_freeze: v.max_freeze,
            record,
        }
    }

    pub(crate) fn made_info(record: VolumeRecord) -> Option<VolumeInfo> {
        let VolumeKind::Made { device, .. } = &record.kind else {
            return None;
        };
        Some(VolumeInfo {
            id: record.id.clone(),
            device: device.clone(),
            configured: false,
            tenant: record.tenant.clone(),
            quiesce: defaults::made_volume::QUIESCE,
            block_size: defaults::made_volume::BLOCK_SIZE,
            max_freeze: defaults::made_volume::MAX_FREEZE,
            record,
        })
    }

    /// Every volume: configured ones (with what the API changed), then made
    /// ones.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, StoreError> {
        let records: BTreeMap<String, VolumeRecord> = self
            .store
            .volumes(&VolumeQuery::default())?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let mut out = Vec::new();
        for v in &self.config.volumes {
            let record = records
                .get(&v.id)
                .cloned()
                .unwrap_or_else(|| configured_record(v, 0));
            out.push(self.configured_info(v, record));
        }
        out.extend(records.into_values().filter_map(Daemon::made_info));
        Ok(out)
    }

    /// One volume, configured or made.
    pub fn volume(&self, id: &str) -> Result<Option<VolumeInfo>, StoreError> {
        if let Some(v) = self.config.volumes.iter().find(|v| v.id == id) {
            let record = self
                .store
                .volume(id)?
                .unwrap_or_else(|| configured_record(v, 0));
            return Ok(Some(self.configured_info(v, record)));
        }
        Ok(self.store.volume(id)?.and_then(Daemon::made_info))
    }

    /// Size in bytes of a volume's device, if it can be read.
    pub fn device_size(&self, v: &VolumeInfo) -> Option<u64> {
        self.engine.device_size(v.device.as_ref()?).ok()
    }

    /// Whether a volume's device is mounted; `None` if that cannot be told.
    pub fn mounted(&self, v: &VolumeInfo) -> Option<bool> {
        match &v.device {
            Some(d) => self.engine.mounted(d).ok(),
            None => Some(false),
        }
    }

    pub fn progress_of(&self, id: &str) -> Option<Arc<Progress>> {
        lock(&self.progress).get(id).cloned()
    }

    /// Show live progress under `key` until the guard is dropped.
    pub(crate) fn track_progress(&self, key: &str) -> ProgressGuard<'_> {
        let p = Arc::new(Progress::default());
        lock(&self.progress).insert(key.to_string(), p.clone());
        ProgressGuard {
            d: self,
            key: key.to_string(),
            progress: p,
        }
    }

    /// Run `job` on its own thread holding `claim`, counted so shutdown can
    /// wait for it. The job releases the claim with its last catalog change
    /// (`finish_*`); whatever way it ends, panics included, the claim is
    /// released, and if it is dropped unstarted too. A panic is caught,
    /// logged and counted, and `subject`'s record is marked error.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        subject: ops::jobs::Subject,
        claim: claims::Claim,
        job: impl FnOnce(&Daemon, &JobClaim) + Send + 'static,
    ) {
        struct Done(Arc<Daemon>);
        impl Drop for Done {
            fn drop(&mut self) {
                let mut n = lock(&self.0.running);
                *n -= 1;
                self.0.idle.notify_all();
            }
        }
        *lock(&self.running) += 1;
        let done = Done(self.clone());
        let s = subject.clone();
        let held = JobClaim(Mutex::new(Some(claim)));
        let spawned = std::thread::Builder::new()
            .name(subject.thread_name())
            .spawn(move || {
                let d = done.0.clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&d, &held)));
                if let Err(payload) = r {
                    let msg = panic_message(payload.as_ref());
                    s.panicked(&d, &msg, &held);
                }
                held.release();
                drop(done);
            });
        if let Err(e) = spawned {
            subject.not_started(self, &e.to_string());
        }
    }

    /// Number of operations running.
    pub fn running(&self) -> usize {
        *lock(&self.running)
    }

    /// Ask running operations to stop and wait up to `timeout` for them.
    pub fn stop_and_wait(&self, timeout: Duration) -> bool {
        self.shutdown.store(true, Ordering::SeqCst);
        self.wait_idle(timeout)
    }

    /// Wait up to `timeout` until no operation runs.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let n = lock(&self.running);
        let (n, _) = self
            .idle
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n == 0
    }

    /// The scheduler of the configured schedules, if one is installed.
    pub fn scheduler(&self) -> Option<&Arc<schedule::Scheduler>> {
        self.scheduler.get()
    }

    /// The operations layer.
    pub fn ops(self: &Arc<Self>) -> ops::Ops {
        ops::Ops::new(self.clone())
    }
}

/// A running job's claim, released with its last catalog change.
#[derive(Debug)]
pub(crate) struct JobClaim(Mutex<Option<claims::Claim>>);

impl JobClaim {
    /// No claim (a job that never started).
    pub(crate) fn none() -> JobClaim {
        JobClaim(Mutex::new(None))
    }

    pub(crate) fn release(&self) {
        drop(lock(&self.0).take());
    }
}

/// Live progress shown while held.
#[derive(Debug)]
pub(crate) struct ProgressGuard<'a> {
    d: &'a Daemon,
    key: String,
    pub progress: Arc<Progress>,
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        lock(&self.d.progress).remove(&self.key);
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
