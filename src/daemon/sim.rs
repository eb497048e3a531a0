//! A simulated host for the daemon: devices, chains, images and loop
//! devices in memory, with failures, panics, delays and gates injected on
//! demand, and every call recorded. In the style of stratisd's SimEngine:
//! the daemon runs on it unchanged, without root, in-process and fast.
//!
//! It also watches for operations that break each other. Every call
//! declares what it reads and writes while it runs (a device, a chain, a
//! snapshot's data); two overlapping calls where one writes what the other
//! reads or writes is recorded as a violation: on the real host that is a
//! restore reading freed blocks, a revert writing under a scan, two writers
//! on one chain. A correct daemon never lets that happen, whatever the
//! interleaving; the model tests check [`SimEngine::violations`] is empty.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use super::engine::{
    BackupJob, ChainSnapshot, Deleted, Engine, EngineError, Reverted, TakeJob, Taken,
};
use crate::chain::ChainError;
use crate::device::DeviceError;
use crate::take::{Progress, TakeError};

/// Bytes per simulated block.
pub const BLOCK: u64 = 4096;

/// A point inside an engine call where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Start of a take, before anything is read.
    Take,
    /// Middle of a take's scan (the device and the chain are held).
    TakeScan,
    /// A take about to commit.
    TakeCommit,
    /// Start of a delete.
    Delete,
    /// A delete in the middle of its merge (the chain is held).
    DeleteMerge,
    /// Start of making a volume's image.
    MakeImage,
    /// Middle of restoring a snapshot into an image (the snapshot is held).
    Restore,
    Attach,
    Detach,
    Remove,
    /// Start of a revert, before the first write.
    Revert,
    /// Middle of a revert: half the differing blocks are written.
    RevertMid,
    /// Start of a backup.
    Backup,
    /// A backup uploading (the snapshot is held).
    BackupUpload,
    /// Start of a restore from a backup.
    BackupRestore,
    /// Start of a backup's delete.
    BackupDelete,
}

/// What happens at a step.
#[derive(Clone, Debug)]
pub enum Action {
    /// The call fails with [`EngineError::Simulated`].
    Fail,
    /// The call panics.
    Panic,
    /// The call waits this long, then goes on.
    Delay(Duration),
    /// The call waits until the test opens the gate of this name.
    Gate(String),
}

#[derive(Clone, Debug)]
struct Fault {
    step: Step,
    /// Only calls whose path (device, chain, image) contains this.
    target: Option<String>,
    action: Action,
    /// How many more times it fires.
    remaining: u32,
}

/// A simulated snapshot: its blocks' contents (one number per block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimSnapshot {
    pub id: Uuid,
    pub blocks: Vec<u64>,
    pub name: String,
    pub created_us: i64,
}

#[derive(Clone, Debug, Default)]
struct Device {
    blocks: Vec<u64>,
    mounted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Device(PathBuf),
    Chain(PathBuf),
    Snapshot(Uuid),
}

#[derive(Debug)]
struct Access {
    id: u64,
    target: Target,
    write: bool,
    op: String,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<PathBuf, Device>,
    chains: BTreeMap<PathBuf, Vec<SimSnapshot>>,
    images: BTreeMap<PathBuf, Vec<u64>>,
    /// Loop device → image.
    loops: BTreeMap<PathBuf, PathBuf>,
    next_loop: u32,
    active: Vec<Access>,
    next_access: u64,
    violations: Vec<String>,
    faults: Vec<Fault>,
    /// Gates: name → (open, calls waiting at it).
    gates: BTreeMap<String, (bool, usize)>,
    /// Random delays at every step: (xorshift state, maximum).
    jitter: Option<(u64, Duration)>,
    calls: Vec<String>,
    /// How each snapshot was taken.
    takes: BTreeMap<Uuid, crate::chain::format::TakeRecord>,
    /// The largest file the state directory's filesystem can hold (`None`:
    /// no limit).
    max_file: Option<u64>,
    /// Bytes free there (`None`: plenty).
    free: Option<u64>,
    /// Backups on the simulated remote: id → (volume, blocks).
    remote: BTreeMap<Uuid, (String, Vec<u64>)>,
}

/// The simulated host.
#[derive(Debug, Default)]
pub struct SimEngine {
    state: Mutex<State>,
    changed: Condvar,
}

fn err(what: impl Into<String>) -> EngineError {
    EngineError::Simulated {
        what: what.into(),
        partial: false,
    }
}

impl SimEngine {
    pub fn new() -> Arc<SimEngine> {
        Arc::new(SimEngine::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a device (a configured volume's) holding `blocks`.
    pub fn add_device(&self, path: &Path, blocks: Vec<u64>) {
        self.lock().devices.insert(
            path.to_path_buf(),
            Device {
                blocks,
                mounted: false,
            },
        );
    }

    /// What a device (or a loop device's image) holds now.
    pub fn device_blocks(&self, path: &Path) -> Option<Vec<u64>> {
        let st = self.lock();
        blocks_of(&st, path).cloned()
    }

    /// Overwrite a device's blocks, as a user of the volume would.
    pub fn write_device(&self, path: &Path, blocks: Vec<u64>) {
        let mut st = self.lock();
        if let Some(b) = blocks_of_mut(&mut st, path) {
            *b = blocks;
        }
    }

    pub fn set_mounted(&self, path: &Path, mounted: bool) {
        if let Some(d) = self.lock().devices.get_mut(path) {
            d.mounted = mounted;
        }
    }

    /// The state directory's filesystem: the largest file it holds and the
    /// bytes free (`None`: no limit). Making a volume beyond them fails as
    /// it does on a host ("File too large", "No space left on device").
    pub fn set_fs_limits(&self, max_file: Option<u64>, free: Option<u64>) {
        let mut st = self.lock();
        st.max_file = max_file;
        st.free = free;
    }

    /// The live snapshots of a chain, oldest first.
    pub fn snapshots(&self, chain: &Path) -> Vec<SimSnapshot> {
        self.lock().chains.get(chain).cloned().unwrap_or_default()
    }

    /// Loop devices attached now, with their images.
    pub fn loops(&self) -> BTreeMap<PathBuf, PathBuf> {
        self.lock().loops.clone()
    }

    /// The backups on the simulated remote: id → volume.
    pub fn remote_backups(&self) -> BTreeMap<Uuid, String> {
        self.lock()
            .remote
            .iter()
            .map(|(id, (v, _))| (*id, v.clone()))
            .collect()
    }

    /// Image files that exist.
    pub fn images(&self) -> Vec<PathBuf> {
        self.lock().images.keys().cloned().collect()
    }

    /// Inject `action` at `step`, `times` times, for calls on paths
    /// containing `target` (any call if `None`).
    pub fn inject(&self, step: Step, target: Option<&str>, action: Action, times: u32) {
        self.lock().faults.push(Fault {
            step,
            target: target.map(str::to_string),
            action,
            remaining: times,
        });
    }

    /// Forget every injected fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Sleep a random time up to `max` at every step, from `seed`, so that
    /// concurrent calls interleave differently run by run.
    pub fn jitter(&self, seed: u64, max: Duration) {
        self.lock().jitter = Some((seed | 1, max));
    }

    /// Make a gate (closed).
    pub fn gate(&self, name: &str) {
        self.lock().gates.insert(name.to_string(), (false, 0));
    }

    /// Open a gate: every call waiting at it goes on, and later ones pass.
    pub fn open_gate(&self, name: &str) {
        self.lock().gates.insert(name.to_string(), (true, 0));
        self.changed.notify_all();
    }

    /// Wait until `n` calls wait at a gate (or the timeout passes).
    pub fn wait_at_gate(&self, name: &str, n: usize, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, r) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.gates.get(name).is_none_or(|g| g.1 < n))
            .unwrap_or_else(|p| p.into_inner());
        drop(st);
        !r.timed_out()
    }

    /// Operations that broke each other (empty when the daemon is correct).
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Every call made, in order ("take vol-a", "revert vol-b to ...").
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Run the faults and the jitter for `step` of a call on `path`.
    fn step(&self, step: Step, path: &Path, partial: bool) -> Result<(), EngineError> {
        let p = path.to_string_lossy().into_owned();
        let (action, delay) = {
            let mut st = self.lock();
            let delay = match &mut st.jitter {
                Some((x, max)) if !max.is_zero() => {
                    *x ^= *x << 13;
                    *x ^= *x >> 7;
                    *x ^= *x << 17;
                    Some(Duration::from_nanos(*x % max.as_nanos() as u64))
                }
                _ => None,
            };
            let i = st.faults.iter().position(|f| {
                f.step == step
                    && f.remaining > 0
                    && f.target.as_deref().is_none_or(|t| p.contains(t))
            });
            let action = i.map(|i| {
                st.faults[i].remaining -= 1;
                st.faults[i].action.clone()
            });
            (action, delay)
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        match action {
            None => Ok(()),
            Some(Action::Fail) => Err(EngineError::Simulated {
                what: format!("{step:?} of {p} failed"),
                partial,
            }),
            Some(Action::Panic) => panic!("injected panic at {step:?} of {p}"),
            Some(Action::Delay(d)) => {
                std::thread::sleep(d);
                Ok(())
            }
            Some(Action::Gate(name)) => {
                let mut st = self.lock();
                if let Some(g) = st.gates.get_mut(&name) {
                    g.1 += 1;
                }
                self.changed.notify_all();
                let st = self
                    .changed
                    .wait_while(st, |st| st.gates.get(&name).is_some_and(|g| !g.0))
                    .unwrap_or_else(|p| p.into_inner());
                drop(st);
                Ok(())
            }
        }
    }

    /// Declare that `op` reads or writes `targets` from now on; conflicts
    /// with what other calls hold are violations.
    fn begin(&self, op: &str, targets: Vec<(Target, bool)>) -> Vec<u64> {
        let mut st = self.lock();
        st.calls.push(op.to_string());
        let mut ids = Vec::new();
        for (target, write) in targets {
            let clashes: Vec<String> = st
                .active
                .iter()
                .filter(|a| a.target == target && (write || a.write))
                .map(|a| {
                    format!(
                        "{op} {} {target:?} while {} {} it",
                        if write { "writes" } else { "reads" },
                        a.op,
                        if a.write { "writes" } else { "reads" }
                    )
                })
                .collect();
            st.violations.extend(clashes);
            st.next_access += 1;
            let id = st.next_access;
            st.active.push(Access {
                id,
                target,
                write,
                op: op.to_string(),
            });
            ids.push(id);
        }
        ids
    }

    fn end(&self, ids: &[u64]) {
        self.lock().active.retain(|a| !ids.contains(&a.id));
    }
}

/// Ends accesses on every way out of a call, panics included.
struct Held<'a> {
    sim: &'a SimEngine,
    ids: Vec<u64>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.sim.end(&self.ids);
    }
}

fn blocks_of<'a>(st: &'a State, path: &Path) -> Option<&'a Vec<u64>> {
    match st.loops.get(path) {
        Some(img) => st.images.get(img),
        None => st.devices.get(path).map(|d| &d.blocks),
    }
}

fn blocks_of_mut<'a>(st: &'a mut State, path: &Path) -> Option<&'a mut Vec<u64>> {
    match st.loops.get(path).cloned() {
        Some(img) => st.images.get_mut(&img),
        None => st.devices.get_mut(path).map(|d| &mut d.blocks),
    }
}

fn no_device(path: &Path) -> EngineError {
    EngineError::Device(DeviceError::Open {
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

impl Engine for SimEngine {
    fn device_size(&self, device: &Path) -> Result<u64, EngineError> {
        let st = self.lock();
        blocks_of(&st, device)
            .map(|b| b.len() as u64 * BLOCK)
            .ok_or_else(|| no_device(device))
    }

    fn device_exists(&self, device: &Path) -> bool {
        blocks_of(&self.lock(), device).is_some()
    }

    fn mounted(&self, device: &Path) -> Result<bool, EngineError> {
        Ok(self.lock().devices.get(device).is_some_and(|d| d.mounted))
    }

    fn thaw_leftovers(&self, intent_dir: &Path) {
        self.lock()
            .calls
            .push(format!("thaw leftovers in {}", intent_dir.display()));
    }

    fn chain_exists(&self, chain: &Path) -> bool {
        self.lock().chains.contains_key(chain)
    }

    fn chain_snapshots(&self, chain: &Path) -> Result<Vec<ChainSnapshot>, EngineError> {
        Ok(self
            .snapshots(chain)
            .into_iter()
            .map(|s| ChainSnapshot {
                id: s.id,
                name: s.name,
                description: String::new(),
                metadata: BTreeMap::new(),
                created_us: s.created_us,
                device_size: s.blocks.len() as u64 * BLOCK,
                changed_bytes: s.blocks.len() as u64 * BLOCK,
                stored_bytes: s.blocks.len() as u64 * BLOCK,
                freeze_us: 0,
            })
            .collect())
    }

    fn take(
        &self,
        job: &TakeJob,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Taken, EngineError> {
        self.step(Step::Take, &job.device, false)?;
        let size = self.device_size(&job.device)?;
        let mounted = self.mounted(&job.device)?;
        if mounted && job.quiesce.mode == crate::quiesce::Mode::None && !job.quiesce.force {
            return Err(EngineError::Quiesce(
                crate::quiesce::QuiesceError::MountedWithoutQuiesce {
                    device: job.device.clone(),
                    mount_point: "/sim".into(),
                },
            ));
        }
        let _held = Held {
            sim: self,
            ids: self.begin(
                &format!("take of {}", job.volume),
                vec![
                    (Target::Device(job.device.clone()), false),
                    (Target::Chain(job.chain.clone()), true),
                    (Target::Snapshot(job.snapshot_id), true),
                ],
            ),
        };
        progress.total.store(size, Ordering::Relaxed);
        progress.done.store(size / 2, Ordering::Relaxed);
        self.step(Step::TakeScan, &job.device, false)?;
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Take(TakeError::Cancelled));
        }
        let blocks = self
            .device_blocks(&job.device)
            .ok_or_else(|| no_device(&job.device))?;
        self.step(Step::TakeCommit, &job.chain, false)?;
        let mut st = self.lock();
        let chain = st.chains.entry(job.chain.clone()).or_default();
        if chain.iter().any(|s| s.id == job.snapshot_id) {
            return Err(EngineError::Take(TakeError::DuplicateId(job.snapshot_id)));
        }
        // As the host: an increment cannot follow a shrink.
        if let Some(newest) = chain
            .last()
            .filter(|n| !job.full && n.blocks.len() > blocks.len())
        {
            return Err(EngineError::Take(TakeError::Shrunk {
                device: job.device.clone(),
                was: newest.blocks.len() as u64 * BLOCK,
                now: size,
                newest: newest.id,
            }));
        }
        let first = chain.is_empty();
        chain.push(SimSnapshot {
            id: job.snapshot_id,
            blocks,
            name: job.name.clone(),
            created_us: crate::util::now_micros(),
        });
        use crate::chain::format::{FullReason, TakeMethod, TakeRecord};
        let record = TakeRecord {
            method: TakeMethod::FullScan,
            reason: match (job.full, first) {
                (true, _) => FullReason::Requested,
                (false, true) => FullReason::First,
                (false, false) => FullReason::Unavailable,
            },
            ..Default::default()
        };
        st.takes.insert(job.snapshot_id, record);
        progress.done.store(size, Ordering::Relaxed);
        Ok(Taken {
            device_size: size,
            changed_bytes: size,
            stored_bytes: size,
            freeze: Duration::from_millis(1),
            duration: Duration::from_millis(2),
            quiesce: "simulated".into(),
            record,
        })
    }

    fn take_record(&self, chain: &Path, id: Uuid) -> Option<crate::chain::format::TakeRecord> {
        let st = self.lock();
        st.chains.get(chain)?.iter().find(|s| s.id == id)?;
        st.takes.get(&id).copied()
    }

    fn delete_snapshot(&self, chain: &Path, id: Uuid) -> Result<Option<Deleted>, EngineError> {
        self.step(Step::Delete, chain, false)?;
        let successor = {
            let st = self.lock();
            let Some(snaps) = st.chains.get(chain) else {
                return Ok(None);
            };
            let Some(pos) = snaps.iter().position(|s| s.id == id) else {
                return Ok(None);
            };
            snaps.get(pos + 1).map(|s| s.id)
        };
        let mut targets = vec![
            (Target::Chain(chain.to_path_buf()), true),
            (Target::Snapshot(id), true),
        ];
        // The successor is redefined by the merge.
        if let Some(s) = successor {
            targets.push((Target::Snapshot(s), true));
        }
        let _held = Held {
            sim: self,
            ids: self.begin(&format!("delete of snapshot {id}"), targets),
        };
        self.step(Step::DeleteMerge, chain, false)?;
        let mut st = self.lock();
        let snaps = st.chains.entry(chain.to_path_buf()).or_default();
        let before = snaps.len();
        snaps.retain(|s| s.id != id);
        Ok((snaps.len() < before).then_some(Deleted {
            merged_blocks: 1,
            reclaimed_bytes: BLOCK,
        }))
    }

    fn revert(
        &self,
        chain: &Path,
        id: Uuid,
        device: &Path,
        progress: &Progress,
    ) -> Result<Reverted, EngineError> {
        self.step(Step::Revert, device, false)?;
        let (want, have, mounted) = {
            let st = self.lock();
            let want = st
                .chains
                .get(chain)
                .and_then(|c| c.iter().find(|s| s.id == id))
                .map(|s| s.blocks.clone())
                .ok_or_else(|| {
                    EngineError::Chain(ChainError::UnknownSnapshot {
                        path: chain.to_path_buf(),
                        id: id.to_string(),
                    })
                })?;
            let have = blocks_of(&st, device)
                .cloned()
                .ok_or_else(|| no_device(device))?;
            let mounted = st.devices.get(device).is_some_and(|d| d.mounted);
            (want, have, mounted)
        };
        if mounted {
            return Err(EngineError::Device(DeviceError::Busy {
                path: device.to_path_buf(),
            }));
        }
        if have.len() < want.len() {
            return Err(EngineError::Revert(crate::revert::RevertError::TooSmall {
                path: device.to_path_buf(),
                id,
                size: have.len() as u64 * BLOCK,
                needed: want.len() as u64 * BLOCK,
            }));
        }
        let _held = Held {
            sim: self,
            ids: self.begin(
                &format!("revert of {} to {id}", device.display()),
                vec![
                    (Target::Snapshot(id), false),
                    (Target::Device(device.to_path_buf()), true),
                ],
            ),
        };
        progress
            .total
            .store(want.len() as u64 * BLOCK, Ordering::Relaxed);
        let differ: Vec<usize> = (0..want.len()).filter(|&i| have[i] != want[i]).collect();
        let half = differ.len() / 2;
        let write = |blocks: &[usize]| {
            let mut st = self.lock();
            if let Some(b) = blocks_of_mut(&mut st, device) {
                for &i in blocks {
                    b[i] = want[i];
                }
            }
        };
        write(&differ[..half]);
        progress
            .done
            .store(want.len() as u64 * BLOCK / 2, Ordering::Relaxed);
        self.step(Step::RevertMid, device, half > 0)?;
        write(&differ[half..]);
        progress
            .done
            .store(want.len() as u64 * BLOCK, Ordering::Relaxed);
        Ok(Reverted {
            blocks_checked: want.len() as u64,
            blocks_written: differ.len() as u64,
        })
    }

    fn largest_file(&self, _dir: &Path, size: u64) -> Result<Option<u64>, EngineError> {
        Ok(self.lock().max_file.filter(|&m| size > m))
    }

    fn free_bytes(&self, _dir: &Path) -> Result<u64, EngineError> {
        Ok(self.lock().free.unwrap_or(u64::MAX))
    }

    fn image_data_bytes(&self, chain: &Path, id: Uuid) -> Result<u64, EngineError> {
        let st = self.lock();
        let s = st
            .chains
            .get(chain)
            .and_then(|c| c.iter().find(|s| s.id == id))
            .ok_or_else(|| {
                EngineError::Chain(ChainError::UnknownSnapshot {
                    path: chain.to_path_buf(),
                    id: id.to_string(),
                })
            })?;
        Ok(s.blocks.iter().filter(|&&b| b != 0).count() as u64 * BLOCK)
    }

    fn make_image(
        &self,
        from: Option<(&Path, Uuid)>,
        image: &Path,
        size: u64,
    ) -> Result<(), EngineError> {
        self.step(Step::MakeImage, image, false)?;
        let (max_file, free) = {
            let st = self.lock();
            (st.max_file, st.free)
        };
        if max_file.is_some_and(|m| size > m) {
            return Err(EngineError::io(
                "set the size of",
                image,
                std::io::Error::from_raw_os_error(libc::EFBIG),
            ));
        }
        let mut blocks = match from {
            Some((chain, id)) => {
                let _held = Held {
                    sim: self,
                    ids: self.begin(
                        &format!("restore of {id} into {}", image.display()),
                        vec![(Target::Snapshot(id), false)],
                    ),
                };
                self.step(Step::Restore, image, false)?;
                let st = self.lock();
                st.chains
                    .get(chain)
                    .and_then(|c| c.iter().find(|s| s.id == id))
                    .map(|s| s.blocks.clone())
                    .ok_or_else(|| {
                        EngineError::Chain(ChainError::SnapshotDamaged {
                            path: chain.to_path_buf(),
                            id,
                            detail: "its blocks are gone".into(),
                        })
                    })?
            }
            None => Vec::new(),
        };
        let data = blocks.iter().filter(|&&b| b != 0).count() as u64 * BLOCK;
        if free.is_some_and(|f| data > f) {
            return Err(EngineError::io(
                "write",
                image,
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        let n = size.div_ceil(BLOCK) as usize;
        if blocks.len() < n {
            blocks.resize(n, 0);
        }
        self.lock().images.insert(image.to_path_buf(), blocks);
        Ok(())
    }

    fn attach(&self, image: &Path) -> Result<PathBuf, EngineError> {
        self.step(Step::Attach, image, false)?;
        let mut st = self.lock();
        if !st.images.contains_key(image) {
            return Err(err(format!("no image {}", image.display())));
        }
        st.next_loop += 1;
        let dev = PathBuf::from(format!("/dev/simloop{}", st.next_loop));
        st.loops.insert(dev.clone(), image.to_path_buf());
        st.calls.push(format!("attach {}", image.display()));
        Ok(dev)
    }

    fn attached(&self, image: &Path) -> Option<PathBuf> {
        self.lock()
            .loops
            .iter()
            .find(|(_, i)| *i == image)
            .map(|(d, _)| d.clone())
    }

    fn detach(&self, device: &Path) -> Result<(), EngineError> {
        self.step(Step::Detach, device, false)?;
        let _held = Held {
            sim: self,
            ids: self.begin(
                &format!("detach of {}", device.display()),
                vec![(Target::Device(device.to_path_buf()), true)],
            ),
        };
        self.lock().loops.remove(device);
        Ok(())
    }

    fn remove(&self, path: &Path) -> Result<(), EngineError> {
        self.step(Step::Remove, path, false)?;
        let is_chain = self.lock().chains.contains_key(path);
        let _held = Held {
            sim: self,
            ids: self.begin(
                &format!("removal of {}", path.display()),
                vec![(
                    if is_chain {
                        Target::Chain(path.to_path_buf())
                    } else {
                        Target::Device(path.to_path_buf())
                    },
                    true,
                )],
            ),
        };
        let mut st = self.lock();
        st.images.remove(path);
        st.chains.remove(path);
        Ok(())
    }
    fn backup(
        &self,
        job: &BackupJob,
        progress: &Arc<crate::backup::Progress>,
        _cancel: &Arc<AtomicBool>,
    ) -> Result<crate::backup::BackupOutcome, EngineError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.step(Step::Backup, &job.chain, false)?;
        let _held = Held {
            sim: self,
            ids: self.begin(
                &format!("backup {} of {}", job.backup, job.snapshot),
                vec![(Target::Snapshot(job.snapshot), false)],
            ),
        };
        let snap = self
            .lock()
            .chains
            .get(&job.chain)
            .and_then(|c| c.iter().find(|s| s.id == job.snapshot).cloned())
            .ok_or_else(|| err(format!("snapshot {} is not in its chain", job.snapshot)))?;
        let size = snap.blocks.len() as u64 * BLOCK;
        progress.total.store(size, Relaxed);
        self.step(Step::BackupUpload, &job.chain, false)?;
        progress.done.store(size, Relaxed);
        let mut st = self.lock();
        let parent = if job.incremental {
            st.remote
                .iter()
                .filter(|(_, (v, _))| *v == job.volume)
                .map(|(id, _)| *id)
                .next_back()
        } else {
            None
        };
        st.remote
            .insert(job.backup, (job.volume.clone(), snap.blocks.clone()));
        st.calls.push(format!("backup {}", job.backup));
        Ok(crate::backup::BackupOutcome {
            info: crate::backup::BackupInfo {
                id: job.backup,
                volume: job.volume.clone(),
                seq: st.remote.len() as u64,
                parent_id: parent,
                full: parent.is_none(),
                created_at: String::new(),
                created_us: 0,
                snapshot_id: job.snapshot,
                snapshot_name: snap.name.clone(),
                snapshot_created_at: String::new(),
                name: job.name.clone(),
                description: job.description.clone(),
                size_bytes: size,
                block_size: BLOCK as u32,
                changed_bytes: size,
                zero_bytes: 0,
                uploaded_bytes: size,
                objects: 1,
                encrypted: false,
            },
            diff: crate::backup::DiffSource::Full,
            read_bytes: size,
            objects_uploaded: 1,
            objects_reused: 0,
            sent_bytes: size,
            duration_ms: 0,
        })
    }

    fn restore_backup(
        &self,
        _remote: &crate::config::RemoteConfig,
        volume: &str,
        id: Uuid,
        image: &Path,
        _size_bytes: u64,
        _progress: &Arc<crate::backup::Progress>,
    ) -> Result<(), EngineError> {
        self.step(Step::BackupRestore, image, false)?;
        let _held = Held {
            sim: self,
            ids: self.begin(
                &format!("restore of backup {id} into {}", image.display()),
                vec![(Target::Device(image.to_path_buf()), true)],
            ),
        };
        let mut st = self.lock();
        let blocks = match st.remote.get(&id) {
            Some((v, b)) if v == volume => b.clone(),
            _ => return Err(err(format!("no backup {id} of volume {volume}"))),
        };
        st.images.insert(image.to_path_buf(), blocks);
        Ok(())
    }

    fn delete_backup(
        &self,
        _remote: &crate::config::RemoteConfig,
        volume: &str,
        id: Uuid,
    ) -> Result<(), EngineError> {
        self.step(Step::BackupDelete, Path::new(volume), false)?;
        let mut st = self.lock();
        match st.remote.get(&id) {
            Some((v, _)) if v == volume => {
                st.remote.remove(&id);
                st.calls.push(format!("delete backup {id}"));
                Ok(())
            }
            _ => Err(crate::backup::BackupError::UnknownBackup {
                remote: "sim".into(),
                volume: volume.into(),
                id: id.to_string(),
            }
            .into()),
        }
    }
}
