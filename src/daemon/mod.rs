//! blocksnapd: the daemon's state and the operations it runs in the
//! background. `api` turns HTTP calls into these; `server` owns the socket.

pub mod api;
pub mod catalog;
pub mod logline;
pub mod metrics;
pub mod server;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use crate::chain::{self, Access, Chain};
use crate::config::{self, Config};
use crate::quiesce::{self, Mode, System};
use crate::take::{self, Progress, TakeOptions};
use crate::util::error_chain;
use catalog::{Catalog, SnapStatus, SnapshotRecord, VolStatus, VolumeKind, VolumeRecord};

pub const GB: u64 = 1 << 30;

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
    #[error("another blocksnapd is running with state directory {path} (it holds {path}/blocksnapd.lock)")]
    AlreadyRunning { path: PathBuf },
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
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

/// What is running on a volume.
#[derive(Clone, Debug)]
pub struct Busy {
    pub what: String,
    pub status: Option<&'static str>,
}

/// A volume as the API sees it, configured or made.
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
    catalog: Mutex<Catalog>,
    busy: Mutex<HashMap<String, Busy>>,
    /// Live progress by snapshot id (takes) or volume id (reverts).
    progress: Mutex<HashMap<String, Arc<Progress>>>,
    pub sys: Arc<dyn System>,
    /// Set on SIGTERM: running scans stop, are thawed and marked error.
    pub shutdown: Arc<AtomicBool>,
    pub metrics: metrics::Metrics,
    running: Mutex<usize>,
    idle: std::sync::Condvar,
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
fn configured_record(v: &config::Volume, created_us: i64) -> VolumeRecord {
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
    pub fn intent_dir(&self) -> PathBuf {
        self.config.state_dir.join("freeze-intents")
    }
    fn catalog_path(&self) -> PathBuf {
        self.config.state_dir.join("catalog.json")
    }

    /// Open the state directory, take its lock, thaw leftovers and bring the
    /// catalog in line with the chain files.
    pub fn start(config: Config, sys: Arc<dyn System>) -> Result<Arc<Daemon>, StartError> {
        let state = config.state_dir.clone();
        for d in [
            &state,
            &state.join("chains"),
            &state.join("volumes"),
            &state.join("freeze-intents"),
        ] {
            crate::util::create_private_dir_all(d).map_err(|source| StartError::StateDir {
                path: d.clone(),
                source,
            })?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700));
        let lock_path = state.join("blocksnapd.lock");
        let lock_file = crate::util::private_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
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
        let d = Daemon {
            metrics: metrics::Metrics::default(),
            catalog: Mutex::new(Catalog::default()),
            busy: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            sys,
            shutdown: Arc::new(AtomicBool::new(false)),
            running: Mutex::new(0),
            idle: std::sync::Condvar::new(),
            _lock: lock_file,
            config,
        };
        // Freezes left by an earlier run of ours, first of all.
        for o in quiesce::intent::thaw_leftovers(d.sys.as_ref(), &d.intent_dir()) {
            if let quiesce::intent::Outcome::Failed(mp, e) = o {
                tracing::error!(mount_point = %mp.display(), "could not thaw a filesystem left frozen: {e}");
            }
        }
        let cat = Catalog::load(&d.catalog_path())?;
        *lock(&d.catalog) = cat;
        d.reconcile();
        d.save();
        Ok(Arc::new(d))
    }

    fn save(&self) {
        let cat = lock(&self.catalog).clone();
        if let Err(e) = cat.save(&self.catalog_path()) {
            tracing::error!("{}", error_chain(&e));
        }
    }

    /// Apply `f` to the catalog and persist it.
    pub fn update<R>(&self, f: impl FnOnce(&mut Catalog) -> R) -> R {
        let (r, snapshot) = {
            let mut c = lock(&self.catalog);
            let r = f(&mut c);
            (r, c.clone())
        };
        if let Err(e) = snapshot.save(&self.catalog_path()) {
            tracing::error!("{}", error_chain(&e));
        }
        r
    }

    /// Read the catalog.
    pub fn read<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        f(&lock(&self.catalog))
    }

    /// Bring the catalog in line with the chain files after a start.
    fn reconcile(&self) {
        let volumes = self.volumes();
        let mut cat = lock(&self.catalog);
        // Configured volumes the config no longer has lose their overrides.
        let configured: Vec<String> = self.config.volumes.iter().map(|v| v.id.clone()).collect();
        cat.volumes
            .retain(|id, r| r.kind != VolumeKind::Configured || configured.contains(id));
        // Configured volumes get a record (and so a creation time) on the
        // first start that sees them.
        for v in &self.config.volumes {
            cat.volumes
                .entry(v.id.clone())
                .or_insert_with(|| configured_record(v, crate::util::now_micros()));
        }
        for v in &volumes {
            let path = self.chain_path(&v.id);
            let live: Vec<chain::Snapshot> = if path.exists() {
                match Chain::open(&path, Access::Write) {
                    Ok(c) => c.snapshots().to_vec(),
                    Err(e) => {
                        tracing::error!(volume = %v.id, "{}", error_chain(&e));
                        match Chain::open(&path, Access::Read) {
                            Ok(c) => c.snapshots().to_vec(),
                            Err(_) => Vec::new(),
                        }
                    }
                }
            } else {
                Vec::new()
            };
            let in_chain = |id: Uuid| live.iter().any(|s| s.id == id);
            let mut finish_delete = Vec::new();
            for r in cat.snapshots.values_mut().filter(|r| r.volume_id == v.id) {
                match r.status {
                    SnapStatus::Creating if in_chain(r.id) => {
                        tracing::warn!(snapshot = %r.id, "snapshot was committed just before the daemon stopped; it is available");
                        r.status = SnapStatus::Available;
                    }
                    SnapStatus::Creating => {
                        r.status = SnapStatus::Error;
                        r.error = Some("interrupted: blocksnapd stopped while this snapshot was being taken; its partial data was discarded".into());
                        tracing::warn!(snapshot = %r.id, "snapshot interrupted by a daemon restart is now error");
                    }
                    SnapStatus::Available if !in_chain(r.id) => {
                        r.status = SnapStatus::Error;
                        r.error = Some(format!("missing from the chain file {}", path.display()));
                    }
                    SnapStatus::Deleting => finish_delete.push(r.id),
                    _ => {}
                }
            }
            let mut gone = Vec::new();
            for id in finish_delete {
                if in_chain(id) {
                    match Chain::open(&path, Access::Write)
                        .and_then(|mut c| chain::delete::delete(&mut c, id))
                    {
                        Ok(_) => {
                            cat.snapshots.remove(&id);
                            gone.push(id);
                        }
                        Err(e) => {
                            if let Some(r) = cat.snapshots.get_mut(&id) {
                                r.status = SnapStatus::ErrorDeleting;
                                r.error = Some(error_chain(&e));
                            }
                        }
                    }
                } else {
                    cat.snapshots.remove(&id);
                }
                tracing::info!(snapshot = %id, "finished a delete interrupted by a restart");
            }
            // Snapshots in the chain the catalog does not know (taken with the
            // CLI, or a lost catalog) are adopted; not those just deleted.
            for s in live.iter().filter(|s| !gone.contains(&s.id)) {
                if let std::collections::btree_map::Entry::Vacant(e) = cat.snapshots.entry(s.id) {
                    e.insert(SnapshotRecord {
                        id: s.id,
                        volume_id: v.id.clone(),
                        tenant: None,
                        status: SnapStatus::Available,
                        display_name: s.name.clone(),
                        display_description: s.description.clone(),
                        metadata: s.metadata.clone(),
                        created_us: s.created_us,
                        updated_us: 0,
                        size_bytes: s.device_size,
                        error: None,
                        changed_bytes: s.changed_bytes,
                        stored_bytes: s.stored_bytes,
                        freeze_ms: s.freeze_us as f64 / 1000.0,
                    });
                }
            }
        }
        // Made volumes: reattach, or finish what was interrupted.
        let made: Vec<String> = cat
            .volumes
            .values()
            .filter(|r| matches!(r.kind, VolumeKind::Made { .. }))
            .map(|r| r.id.clone())
            .collect();
        for id in made {
            let r = cat.volumes.get_mut(&id).expect("listed");
            let VolumeKind::Made { image, device, .. } = &mut r.kind else {
                continue;
            };
            match r.status {
                VolStatus::Creating => {
                    r.status = VolStatus::Error;
                    r.error = Some(
                        "interrupted: blocksnapd stopped while this volume was being created"
                            .into(),
                    );
                }
                VolStatus::Deleting => {
                    if let Some(d) = device.take() {
                        let _ = crate::loopdev::detach(&d);
                    }
                    let _ = std::fs::remove_file(&*image);
                    cat.volumes.remove(&id);
                    continue;
                }
                VolStatus::Available => match crate::loopdev::find_by_backing(image) {
                    Some(ld) => *device = Some(ld.path),
                    None => match crate::loopdev::attach(image, false) {
                        Ok(ld) => {
                            tracing::info!(volume = %id, device = %ld.path.display(), "reattached volume image");
                            *device = Some(ld.path);
                        }
                        Err(e) => {
                            r.status = VolStatus::Error;
                            r.error = Some(format!("cannot attach {}: {e}", image.display()));
                            *device = None;
                        }
                    },
                },
                _ => {}
            }
            if let VolumeKind::Made {
                device: Some(d), ..
            } = &r.kind
            {
                r.metadata
                    .insert("blocksnap:device".into(), d.display().to_string());
            }
        }
    }

    /// Every volume: configured ones (with what the API changed), then made ones.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let cat = lock(&self.catalog);
        let mut out = Vec::new();
        for v in &self.config.volumes {
            let record = cat
                .volumes
                .get(&v.id)
                .cloned()
                .unwrap_or_else(|| configured_record(v, 0));
            out.push(VolumeInfo {
                id: v.id.clone(),
                device: Some(v.device.clone()),
                configured: true,
                tenant: v.tenant.clone(),
                quiesce: v.quiesce,
                block_size: v.block_size,
                max_freeze: v.max_freeze,
                record,
            });
        }
        for r in cat.volumes.values() {
            if let VolumeKind::Made { device, .. } = &r.kind {
                out.push(VolumeInfo {
                    id: r.id.clone(),
                    device: device.clone(),
                    configured: false,
                    tenant: r.tenant.clone(),
                    quiesce: Mode::Auto,
                    block_size: None,
                    max_freeze: Duration::from_secs(60),
                    record: r.clone(),
                });
            }
        }
        out
    }

    pub fn volume(&self, id: &str) -> Option<VolumeInfo> {
        self.volumes().into_iter().find(|v| v.id == id)
    }

    /// Size in bytes of a volume's device, if it can be read.
    pub fn device_size(&self, v: &VolumeInfo) -> Option<u64> {
        let dev = v.device.as_ref()?;
        crate::device::Device::open(dev, false)
            .ok()
            .map(|s| s.size())
    }

    /// Whether a volume's device is mounted.
    pub fn mounted(&self, v: &VolumeInfo) -> bool {
        v.device
            .as_ref()
            .and_then(|d| self.sys.mounts_of(d).ok())
            .is_some_and(|m| !m.is_empty())
    }

    /// What is running on a volume, if anything.
    pub fn busy(&self, volume: &str) -> Option<Busy> {
        lock(&self.busy).get(volume).cloned()
    }

    /// Claim a volume for an operation; fails with what is running.
    pub fn claim(&self, volume: &str, busy: Busy) -> Result<(), Busy> {
        let mut b = lock(&self.busy);
        if let Some(cur) = b.get(volume) {
            return Err(cur.clone());
        }
        b.insert(volume.to_string(), busy);
        Ok(())
    }

    fn release(&self, volume: &str) {
        lock(&self.busy).remove(volume);
    }

    pub fn progress_of(&self, id: &str) -> Option<Arc<Progress>> {
        lock(&self.progress).get(id).cloned()
    }

    /// Run `job` on the blocking pool, counted so shutdown can wait for it.
    pub fn spawn(self: &Arc<Self>, job: impl FnOnce(&Daemon) + Send + 'static) {
        *lock(&self.running) += 1;
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            struct Done<'a>(&'a Daemon);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    let mut n = lock(&self.0.running);
                    *n -= 1;
                    self.0.idle.notify_all();
                }
            }
            let _done = Done(&d);
            job(&d);
        });
    }

    /// Number of operations running.
    pub fn running(&self) -> usize {
        *lock(&self.running)
    }

    /// Ask running operations to stop and wait up to `timeout` for them.
    pub fn stop_and_wait(&self, timeout: Duration) -> bool {
        self.shutdown.store(true, Ordering::SeqCst);
        let n = lock(&self.running);
        let (n, _) = self
            .idle
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n == 0
    }

    /// The snapshot job: take it, then record the outcome.
    pub fn run_snapshot(&self, volume: VolumeInfo, id: Uuid, force: bool) {
        let progress = Arc::new(Progress::default());
        lock(&self.progress).insert(id.to_string(), progress.clone());
        let (name, description, metadata) = self.read(|c| {
            let r = &c.snapshots[&id];
            (
                r.display_name.clone(),
                r.display_description.clone(),
                r.metadata.clone(),
            )
        });
        let device = volume.device.clone().unwrap_or_default();
        let mut keep_off = vec![self.config.state_dir.clone(), self.config.socket.clone()];
        keep_off.dedup();
        let opts = TakeOptions {
            name,
            description,
            metadata,
            block_size: volume.block_size,
            full: false,
            snapshot_id: Some(id),
            quiesce: quiesce::Options {
                mode: volume.quiesce,
                force,
                max_freeze: volume.max_freeze,
                intent_dir: Some(self.intent_dir()),
                keep_off,
            },
            progress: Some(progress),
            cancel: Some(self.shutdown.clone()),
            tuning: Default::default(),
        };
        let result = take::take(
            self.sys.clone(),
            &device,
            &self.chain_path(&volume.id),
            &opts,
        );
        crate::fault::point("before-catalog");
        match result {
            Ok(out) => {
                tracing::info!(
                    volume = %volume.id,
                    snapshot = %id,
                    changed_bytes = out.changed_bytes,
                    stored_bytes = out.stored_bytes,
                    freeze_ms = out.freeze.as_secs_f64() * 1000.0,
                    duration_ms = out.duration.as_secs_f64() * 1000.0,
                    quiesce = %out.quiesce,
                    "{}",
                    logline::snapshot_available(
                        &volume.id,
                        id,
                        out.changed_bytes,
                        out.stored_bytes,
                        out.freeze,
                        out.duration,
                        &out.quiesce
                    )
                );
                self.metrics.snapshot_ok(&volume.id, &out);
                self.update(|c| {
                    if let Some(r) = c.snapshots.get_mut(&id) {
                        r.status = SnapStatus::Available;
                        r.changed_bytes = out.changed_bytes;
                        r.stored_bytes = out.stored_bytes;
                        r.freeze_ms = out.freeze.as_secs_f64() * 1000.0;
                        r.size_bytes = out.snapshot.device_size;
                    }
                });
            }
            Err(e) => {
                let msg = error_chain(&e);
                let msg = if e.is_disk_full() {
                    format!("the disk holding the chain is full: {msg}")
                } else if matches!(e, take::TakeError::Cancelled) {
                    "abandoned: blocksnapd is shutting down".to_string()
                } else {
                    msg
                };
                tracing::error!(volume = %volume.id, snapshot = %id, "{}", logline::snapshot_failed(&volume.id, id, &msg));
                self.metrics.snapshot_failed(&volume.id);
                self.update(|c| {
                    if let Some(r) = c.snapshots.get_mut(&id) {
                        r.status = SnapStatus::Error;
                        r.error = Some(msg);
                    }
                });
            }
        }
        lock(&self.progress).remove(&id.to_string());
        self.release(&volume.id);
    }

    /// The delete job.
    pub fn run_delete_snapshot(&self, volume: &str, id: Uuid) {
        let path = self.chain_path(volume);
        let r = (|| -> Result<(), chain::ChainError> {
            if !path.exists() {
                return Ok(());
            }
            let mut c = Chain::open(&path, Access::Write)?;
            if c.snapshots().iter().any(|s| s.id == id) {
                crate::fault::point("delete-before-commit");
                let out = chain::delete::delete(&mut c, id)?;
                crate::fault::point("delete-after-commit");
                tracing::info!(volume = %volume, snapshot = %id, merged_blocks = out.merged_blocks, released_bytes = out.reclaimed_bytes, "{}", logline::snapshot_deleted(volume, id, out.merged_blocks, out.reclaimed_bytes));
            }
            Ok(())
        })();
        match r {
            Ok(()) => self.update(|c| {
                c.snapshots.remove(&id);
            }),
            Err(e) => {
                let msg = error_chain(&e);
                tracing::error!(volume = %volume, snapshot = %id, "{}", logline::snapshot_delete_failed(volume, id, &msg));
                self.update(|c| {
                    if let Some(r) = c.snapshots.get_mut(&id) {
                        r.status = SnapStatus::ErrorDeleting;
                        r.error = Some(msg);
                    }
                });
            }
        }
        self.release(volume);
    }

    /// The volume-from-snapshot job (or a blank volume when `from` is None).
    pub fn run_create_volume(&self, id: &str, from: Option<(String, Uuid)>, size: u64) {
        let image = self.volumes_dir().join(format!("{id}.img"));
        let r = (|| -> Result<PathBuf, String> {
            if let Some((src_volume, snap)) = from {
                let c = Chain::open(&self.chain_path(&src_volume), Access::Read)
                    .map_err(|e| error_chain(&e))?;
                crate::fault::point("volume-restore");
                chain::restore::restore(&c, snap, &image, &Default::default())
                    .map_err(|e| error_chain(&e))?;
            } else {
                crate::util::create_private(&image)
                    .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .map_err(|e| format!("cannot open {}: {e}", image.display()))?;
            if f.metadata().map(|m| m.len()).unwrap_or(0) < size {
                f.set_len(size)
                    .map_err(|e| format!("cannot size {}: {e}", image.display()))?;
            }
            f.sync_all().map_err(|e| e.to_string())?;
            crate::fault::point("volume-attach");
            let ld = crate::loopdev::attach(&image, false)
                .map_err(|e| format!("cannot attach a loop device: {e}"))?;
            Ok(ld.path)
        })();
        match r {
            Ok(dev) => {
                tracing::info!(volume = %id, device = %dev.display(), size_bytes = size, "{}", logline::volume_available(id, dev.display(), size));
                self.update(|c| {
                    if let Some(r) = c.volumes.get_mut(id) {
                        r.status = VolStatus::Available;
                        r.metadata
                            .insert("blocksnap:device".into(), dev.display().to_string());
                        if let VolumeKind::Made { device, .. } = &mut r.kind {
                            *device = Some(dev);
                        }
                    }
                });
            }
            Err(msg) => {
                tracing::error!(volume = %id, "{}", logline::volume_failed(id, &msg));
                let _ = std::fs::remove_file(&image);
                self.update(|c| {
                    if let Some(r) = c.volumes.get_mut(id) {
                        r.status = VolStatus::Error;
                        r.error = Some(msg);
                    }
                });
            }
        }
        self.release(id);
    }

    /// The delete-volume job (made volumes only).
    pub fn run_delete_volume(&self, id: &str) {
        let rec = self.read(|c| c.volumes.get(id).cloned());
        let r = (|| -> Result<(), String> {
            let Some(VolumeRecord {
                kind: VolumeKind::Made { image, device, .. },
                ..
            }) = rec
            else {
                return Ok(());
            };
            if let Some(d) = device {
                crate::loopdev::detach(&d)
                    .map_err(|e| format!("cannot detach {}: {e}", d.display()))?;
            }
            match std::fs::remove_file(&image) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", image.display())),
            }
            let chain = self.chain_path(id);
            let _ = std::fs::remove_file(chain::side_file(&chain));
            let _ = std::fs::remove_file(&chain);
            Ok(())
        })();
        match r {
            Ok(()) => {
                tracing::info!(volume = %id, "{}", logline::volume_deleted(id));
                self.update(|c| {
                    c.volumes.remove(id);
                });
            }
            Err(msg) => {
                tracing::error!(volume = %id, "{}", logline::volume_delete_failed(id, &msg));
                self.update(|c| {
                    if let Some(r) = c.volumes.get_mut(id) {
                        r.status = VolStatus::ErrorDeleting;
                        r.error = Some(msg);
                    }
                });
            }
        }
        self.release(id);
    }

    /// The revert job.
    pub fn run_revert(&self, volume: VolumeInfo, snapshot: Uuid) {
        let started = std::time::Instant::now();
        let progress = Arc::new(Progress::default());
        lock(&self.progress).insert(volume.id.clone(), progress.clone());
        let device = volume.device.clone().unwrap_or_default();
        let r = Chain::open(&self.chain_path(&volume.id), Access::Read)
            .map_err(crate::revert::RevertError::from)
            .and_then(|c| crate::revert::revert(&c, snapshot, &device, Some(&progress)));
        match r {
            Ok(out) => {
                tracing::info!(volume = %volume.id, snapshot = %snapshot, blocks_checked = out.blocks_checked, blocks_written = out.blocks_written, "{}", logline::volume_reverted(&volume.id, snapshot, out.blocks_checked, out.blocks_written, started.elapsed()));
                self.metrics.reverted(&volume.id, out.blocks_written);
                self.update(|c| {
                    let r = c
                        .volumes
                        .entry(volume.id.clone())
                        .or_insert_with(|| volume.record.clone());
                    r.metadata
                        .insert("blocksnap:reverted_to".into(), snapshot.to_string());
                    r.metadata.insert(
                        "blocksnap:reverted_blocks".into(),
                        out.blocks_written.to_string(),
                    );
                    r.error = None;
                });
            }
            Err(e) => {
                let msg = error_chain(&e);
                tracing::error!(volume = %volume.id, snapshot = %snapshot, "{}", logline::revert_failed(&volume.id, snapshot, &msg));
                self.update(|c| {
                    let r = c
                        .volumes
                        .entry(volume.id.clone())
                        .or_insert_with(|| volume.record.clone());
                    r.error = Some(msg);
                });
            }
        }
        lock(&self.progress).remove(&volume.id);
        self.release(&volume.id);
    }
}
