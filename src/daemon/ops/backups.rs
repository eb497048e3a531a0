//! Backup operations: list, show, create, delete, restore into a new
//! volume (Cinder's backups API), and their jobs.
//!
//! Claims:
//! - a backup holds the volume's backups exclusively (one backup or
//!   delete of a volume's backups at a time: they share the remote's
//!   writer lock) and its snapshot shared (it cannot be deleted, or merged
//!   into by a delete of its predecessor, while it is read; the volume may
//!   still be snapshotted);
//! - a delete holds the volume's backups and the backup exclusively;
//! - a restore holds the volume's backups and the backup shared (several
//!   restores run together; no backup or delete of that volume meanwhile)
//!   and the new volume exclusively.
//!
//! A backup without a snapshot_id first takes a snapshot of the volume
//! through [`Ops::create_snapshot`] (what Cinder backs up is the volume as
//! it is now) and then backs that snapshot up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::jobs::Subject;
use super::{check_text, clean_id, About, Caller, CreateSnapshot, Field, OpError, Ops};
use crate::config::RemoteConfig;
use crate::daemon::backups::{percent, BackupRecord, BackupStatus};
use crate::daemon::catalog::{SnapStatus, VolStatus, VolumeKind, VolumeRecord};
use crate::daemon::claims::{Claim, Resource, Want};
use crate::daemon::engine::BackupJob;
use crate::daemon::store::mem::{self, HasId, KeyValue};
use crate::daemon::store::{Change, Page, SortKey, StoreError, VolumeQuery};
use crate::daemon::{logline, Daemon, JobClaim};
use crate::defaults::GB;
use crate::util::{error_chain, now_micros};

/// A new backup of a volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateBackup {
    pub volume_id: String,
    /// Back up this snapshot of the volume (default: take one now).
    pub snapshot_id: Option<String>,
    /// Only what changed since the volume's newest backup.
    pub incremental: bool,
    /// Snapshot a mounted volume whose quiesce mode is none anyway.
    pub force: bool,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// Where to restore a backup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreBackup {
    /// An existing volume: refused (a backup restores into a new volume).
    pub volume_id: Option<String>,
    /// The new volume's name.
    pub name: Option<String>,
}

/// Which backups to list. Every filter that is `Some` must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupFilter {
    /// Status as the API shows it ("restoring" while a restore reads it).
    pub status: Option<String>,
    pub volume_id: Option<String>,
    /// Exact name.
    pub name: Option<String>,
    /// Names containing this (v3 `name~`).
    pub name_like: Option<String>,
    pub page: Page,
}

/// The new volume a backup is restored into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NewVolume {
    pub name: String,
    pub description: String,
    /// The caller's items (checked); `blocksnap:backup_id` is added.
    pub metadata: BTreeMap<String, String>,
    /// Size in GB asked for (at least the backup's); none: the backup's.
    pub size_gb: Option<u64>,
}

/// A backup as an operation returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct Backup {
    pub record: BackupRecord,
    /// As the API shows it: the record's, or "restoring" while a restore
    /// reads it.
    pub status: &'static str,
    /// Percent done while it is being made.
    pub progress: Option<f64>,
    /// Other backups of the book are based on it.
    pub has_dependents: bool,
}

impl HasId for Backup {
    fn id_text(&self) -> String {
        self.record.id.to_string()
    }
    fn id_key(&self) -> KeyValue<'_> {
        KeyValue::Uuid(self.record.id)
    }
}

/// A backup's value for a sort key; its status as shown.
fn backup_key(b: &Backup, k: SortKey) -> KeyValue<'_> {
    let r = &b.record;
    match k {
        SortKey::CreatedAt => KeyValue::Int(r.created_us),
        SortKey::UpdatedAt => KeyValue::Int(r.updated_us),
        SortKey::Id => KeyValue::Uuid(r.id),
        SortKey::Name => KeyValue::Text(&r.name),
        SortKey::Status => KeyValue::Text(b.status),
        SortKey::Size => KeyValue::Size(r.size_bytes),
    }
}

/// What a restore started.
#[derive(Clone, Debug, PartialEq)]
pub struct Restored {
    pub backup_id: Uuid,
    pub volume_id: String,
    pub volume_name: String,
    /// The new volume's record as made durable (status creating).
    pub record: VolumeRecord,
}

impl Ops {
    fn find_backup(&self, c: &Caller, id: &str) -> Result<BackupRecord, OpError> {
        let uid = Uuid::parse_str(id).map_err(|_| OpError::BackupNotFound(clean_id(id)))?;
        match self.d.backups.get(uid) {
            Some(r) if r.tenant == c.tenant => Ok(r),
            _ => Err(OpError::BackupNotFound(uid.to_string())),
        }
    }

    fn backup_of(&self, record: BackupRecord, all: &[BackupRecord]) -> Backup {
        let d = &self.d;
        let status = d
            .claims
            .status_of(&Resource::Backup(record.id))
            .unwrap_or(record.status.as_str());
        let progress = match record.status {
            BackupStatus::Creating => Some(
                d.backups
                    .progress_of(record.id)
                    .map_or(0.0, |p| percent(&p)),
            ),
            _ => None,
        };
        let has_dependents = all.iter().any(|b| {
            b.parent_id == Some(record.id)
                && b.volume_id == record.volume_id
                && b.status == BackupStatus::Available
        });
        Backup {
            record,
            status,
            progress,
            has_dependents,
        }
    }

    /// The caller's backups that pass `f`'s filters, in its order (newest
    /// first by default), its page of them; an unknown marker is refused.
    pub fn list_backups(&self, c: &Caller, f: &BackupFilter) -> Result<Vec<Backup>, OpError> {
        let all = self.d.backups.all();
        let hits: Vec<Backup> = all
            .iter()
            .filter(|r| r.tenant == c.tenant)
            .filter(|r| f.volume_id.as_ref().is_none_or(|v| r.volume_id == *v))
            .filter(|r| f.name.as_ref().is_none_or(|n| r.name == *n))
            .filter(|r| {
                f.name_like
                    .as_ref()
                    .is_none_or(|n| r.name.contains(n.as_str()))
            })
            .map(|r| self.backup_of(r.clone(), &all))
            .filter(|b| f.status.as_ref().is_none_or(|s| b.status == s))
            .collect();
        let page = mem::page(hits.iter().collect(), &f.page, backup_key).map_err(|e| match e {
            StoreError::UnknownMarker(m) => OpError::BadMarker(m),
            e => e.into(),
        })?;
        Ok(page.into_iter().cloned().collect())
    }

    /// One backup; `id` as the request gave it.
    pub fn backup(&self, c: &Caller, id: &str) -> Result<Backup, OpError> {
        let r = self.find_backup(c, id)?;
        Ok(self.backup_of(r, &self.d.backups.all()))
    }

    /// The remote a volume backs up to.
    fn remote_of_volume(&self, volume: &str) -> Result<RemoteConfig, OpError> {
        let d = &self.d;
        let name = d
            .config
            .volumes
            .iter()
            .find(|v| v.id == volume)
            .and_then(|v| v.backup_remote.clone())
            .ok_or_else(|| OpError::NoBackupRemote(volume.to_string()))?;
        self.remote(&name)
    }

    fn remote(&self, name: &str) -> Result<RemoteConfig, OpError> {
        self.d
            .config
            .remotes
            .iter()
            .find(|r| r.name == name)
            .cloned()
            .ok_or_else(|| OpError::RemoteGone(name.to_string()))
    }

    /// Start a backup: answered once its record (status creating) is
    /// durable; the snapshot (if one is taken) and the upload run in the
    /// background.
    pub fn create_backup(&self, c: &Caller, req: CreateBackup) -> Result<Backup, OpError> {
        check_text(Field::Name, req.name.as_deref())?;
        check_text(Field::Description, req.description.as_deref())?;
        let vol = self.find_volume(c, &req.volume_id)?;
        let remote = self.remote_of_volume(&vol.id)?;
        let d = &self.d;
        let has_backup = |all: &[BackupRecord]| {
            all.iter()
                .any(|b| b.volume_id == vol.id && b.status == BackupStatus::Available)
        };
        if req.incremental && !has_backup(&d.backups.all()) {
            return Err(OpError::NoPreviousBackup);
        }
        let given = match &req.snapshot_id {
            Some(sid) => {
                let s = self.find_snapshot_record(c, sid)?;
                if s.volume_id != vol.id {
                    return Err(OpError::SnapshotOfOtherVolume {
                        snapshot: s.id,
                        owner: s.volume_id,
                        volume: vol.id.clone(),
                    });
                }
                if s.status != SnapStatus::Available {
                    return Err(OpError::BackupSnapshotNotAvailable);
                }
                Some(s)
            }
            None => None,
        };
        let id = Uuid::new_v4();
        let mut wants = vec![Want::exclusive(
            Resource::Backups(vol.id.clone()),
            format!("backup {id} is being created"),
        )];
        if let Some(s) = &given {
            wants.push(Want::shared(
                Resource::Snapshot(s.id),
                format!("backup {id} is being made of it"),
            ));
        }
        let mut claim = d
            .claims
            .acquire(wants)
            .map_err(OpError::in_use(About::Backup))?;
        let snap = match given {
            Some(s) => s,
            None => {
                // The volume as it is now: a snapshot first, through its
                // own operation (its rules, its claim, its job).
                let s = self.create_snapshot(
                    c,
                    CreateSnapshot {
                        volume_id: vol.id.clone(),
                        force: req.force,
                        full: false,
                        name: Some(format!("backup {id}")),
                        description: Some(format!("taken for backup {id}")),
                        metadata: Default::default(),
                    },
                )?;
                // Nobody can delete it while it is being taken; from now on
                // this backup reads it.
                d.claims
                    .extend(
                        &mut claim,
                        vec![Want::shared(
                            Resource::Snapshot(s.record.id),
                            format!("backup {id} is being made of it"),
                        )],
                    )
                    .map_err(OpError::in_use(About::Snapshot))?;
                s.record
            }
        };
        let record = BackupRecord {
            id,
            volume_id: vol.id.clone(),
            tenant: c.tenant.clone(),
            remote: remote.name.clone(),
            snapshot_id: snap.id,
            took_snapshot: req.snapshot_id.is_none(),
            status: BackupStatus::Creating,
            name: req.name.unwrap_or_default(),
            description: req.description.unwrap_or_default(),
            incremental: req.incremental,
            parent_id: None,
            size_bytes: snap.size_bytes,
            object_count: 0,
            changed_bytes: 0,
            uploaded_bytes: 0,
            created_us: now_micros(),
            updated_us: 0,
            data_timestamp_us: snap.created_us,
            fail_reason: None,
        };
        d.backups.write(None, |m| -> Result<(), OpError> {
            // Under the claim: an incremental backup needs one to build on,
            // and a delete that just finished may have removed it.
            if req.incremental && !has_backup(&m.values().cloned().collect::<Vec<_>>()) {
                return Err(OpError::NoPreviousBackup);
            }
            m.insert(id, record.clone());
            Ok(())
        })?;
        tracing::info!(volume = %vol.id, backup = %id, snapshot = %snap.id, remote = %remote.name, incremental = req.incremental, "{}", logline::backup_requested(&vol.id, id, snap.id, &remote.name));
        spawn_backup(d, claim, &record, remote);
        Ok(Backup {
            record,
            status: BackupStatus::Creating.as_str(),
            progress: Some(0.0),
            has_dependents: false,
        })
    }

    /// Start deleting a backup: answered once its record says deleting.
    /// Backups based on it stay restorable (docs/BACKUP.md, "Delete and
    /// gc"), so a backup with dependents may be deleted too.
    pub fn delete_backup(&self, c: &Caller, id: &str) -> Result<(), OpError> {
        let r = self.find_backup(c, id)?;
        let deletable = |s: BackupStatus| {
            matches!(
                s,
                BackupStatus::Available | BackupStatus::Error | BackupStatus::ErrorDeleting
            )
        };
        if !deletable(r.status) {
            return Err(OpError::BackupNotDeletable);
        }
        let remote = self.remote(&r.remote)?;
        let d = &self.d;
        let claim = d
            .claims
            .acquire(vec![
                Want::exclusive(
                    Resource::Backups(r.volume_id.clone()),
                    format!("backup {} is being deleted", r.id),
                ),
                Want::exclusive(Resource::Backup(r.id), "it is being deleted"),
            ])
            .map_err(OpError::in_use(About::Backup))?;
        let ok = d.backups.write(None, |m| -> Result<bool, OpError> {
            match m.get_mut(&r.id) {
                Some(rec) if deletable(rec.status) => {
                    rec.status = BackupStatus::Deleting;
                    rec.updated_us = now_micros();
                    Ok(true)
                }
                _ => Ok(false),
            }
        })?;
        if !ok {
            return Err(OpError::BackupNotDeletable);
        }
        tracing::info!(volume = %r.volume_id, backup = %r.id, "backup delete requested");
        spawn_delete(d, claim, &r, remote);
        Ok(())
    }

    /// Start restoring a backup into a new volume: answered once the new
    /// volume's record (status creating) is durable.
    pub fn restore_backup(
        &self,
        c: &Caller,
        id: &str,
        req: RestoreBackup,
    ) -> Result<Restored, OpError> {
        let r = self.find_backup(c, id)?;
        if req.volume_id.is_some() {
            return Err(OpError::RestoreOntoVolume);
        }
        check_text(Field::Name, req.name.as_deref())?;
        if r.status != BackupStatus::Available {
            return Err(OpError::BackupNotAvailable);
        }
        let name = req
            .name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("restore_backup_{}", r.id));
        let description = format!("restored from backup {}", r.id);
        self.restore_into_new(
            c,
            r,
            NewVolume {
                name,
                description,
                ..NewVolume::default()
            },
            OpError::BackupNotAvailable,
        )
    }

    /// The backup a new volume is to be made from (`POST /volumes` with a
    /// backup_id), as Cinder's create flow checks it: unknown is a 404,
    /// not available a 400.
    pub(super) fn source_backup(&self, c: &Caller, id: &str) -> Result<BackupRecord, OpError> {
        let r = self.find_backup(c, id)?;
        if r.status != BackupStatus::Available {
            return Err(OpError::SourceBackupNotAvailable);
        }
        Ok(r)
    }

    /// Restore available backup `r` into a new volume `v`: the one way a
    /// volume is made from a backup (the restore action and a volume
    /// create with a backup_id). `gone` is the refusal when the backup
    /// stopped being available before the claim was taken.
    pub(super) fn restore_into_new(
        &self,
        c: &Caller,
        r: BackupRecord,
        v: NewVolume,
        gone: OpError,
    ) -> Result<Restored, OpError> {
        let size_bytes = restored_size(r.size_bytes, v.size_gb)?;
        let remote = self.remote(&r.remote)?;
        let d = &self.d;
        let max = d.config.max_made_volumes;
        let made = |s: &dyn crate::daemon::store::Store| -> Result<usize, OpError> {
            Ok(s.volumes(&VolumeQuery::default())?
                .iter()
                .filter(|v| matches!(v.kind, VolumeKind::Made { .. }))
                .count())
        };
        if made(d.store())? >= max {
            return Err(OpError::VolumeLimit(max));
        }
        let vid = Uuid::new_v4().to_string();
        let claim = d
            .claims
            .acquire(vec![
                Want::exclusive(
                    Resource::Volume(vid.clone()),
                    format!("volume {vid} is being restored from backup {}", r.id),
                )
                .showing("creating"),
                Want::shared(
                    Resource::Backups(r.volume_id.clone()),
                    format!("backup {} is being restored into volume {vid}", r.id),
                ),
                Want::shared(
                    Resource::Backup(r.id),
                    format!("volume {vid} is being restored from it"),
                )
                .showing("restoring"),
            ])
            .map_err(OpError::in_use(About::Backup))?;
        // Under the claim: it cannot be deleted from now on; check it was
        // not before.
        if d.backups
            .get(r.id)
            .is_none_or(|b| b.status != BackupStatus::Available)
        {
            return Err(gone);
        }
        let NewVolume {
            name,
            description,
            mut metadata,
            ..
        } = v;
        metadata.insert("blocksnap:backup_id".to_string(), r.id.to_string());
        let image = d.image_path(&vid);
        let record = VolumeRecord {
            id: vid.clone(),
            kind: VolumeKind::Made {
                image: image.clone(),
                device: None,
                snapshot_id: None,
            },
            tenant: Some(c.tenant.clone()),
            status: VolStatus::Creating,
            display_name: name.clone(),
            display_description: description,
            metadata,
            created_us: now_micros(),
            updated_us: 0,
            size_bytes,
            error: None,
        };
        d.write(|s| -> Result<(), OpError> {
            if made(s)? >= max {
                return Err(OpError::VolumeLimit(max));
            }
            s.apply(&[Change::PutVolume(record.clone())])?;
            Ok(())
        })?;
        tracing::info!(volume = %vid, backup = %r.id, "{}", logline::backup_restore_requested(r.id, &vid));
        let job = RestoreJob {
            backup: r.id,
            source_volume: r.volume_id.clone(),
            remote,
            volume: vid.clone(),
            image,
            size_bytes,
        };
        d.spawn(
            Subject::RestoreBackup {
                volume: vid.clone(),
                backup: r.id,
            },
            claim,
            move |d, claim| restore(d, claim, job),
        );
        Ok(Restored {
            backup_id: r.id,
            volume_id: vid,
            volume_name: name,
            record,
        })
    }
}

/// The size of a volume restored from a backup of `backup_bytes`: exactly
/// the backup's bytes unless a larger size in GB was asked for; smaller
/// than the backup's size in GB is refused (Cinder's create flow).
fn restored_size(backup_bytes: u64, size_gb: Option<u64>) -> Result<u64, OpError> {
    let backup_gb = backup_bytes.div_ceil(GB);
    match size_gb {
        Some(want) if want < backup_gb => Err(OpError::SmallerThanBackup {
            want,
            backup: backup_gb,
        }),
        Some(want) if want > backup_gb => Ok(want * GB),
        _ => Ok(backup_bytes),
    }
}

fn spawn_backup(d: &Arc<Daemon>, claim: Claim, r: &BackupRecord, remote: RemoteConfig) {
    let job = BackupJob {
        volume: r.volume_id.clone(),
        chain: d.chain_path(&r.volume_id),
        snapshot: r.snapshot_id,
        backup: r.id,
        remote,
        incremental: r.incremental,
        name: r.name.clone(),
        description: r.description.clone(),
    };
    d.spawn(
        Subject::Backup {
            volume: r.volume_id.clone(),
            backup: r.id,
        },
        claim,
        move |d, claim| backup(d, claim, job),
    );
}

fn spawn_delete(d: &Arc<Daemon>, claim: Claim, r: &BackupRecord, remote: RemoteConfig) {
    let (volume, id) = (r.volume_id.clone(), r.id);
    d.spawn(
        Subject::DeleteBackup {
            volume: volume.clone(),
            backup: id,
        },
        claim,
        move |d, claim| delete(d, claim, &remote, &volume, id),
    );
}

/// Mark a backup failed with its last change (releasing the job's claim).
pub(crate) fn fail(d: &Daemon, job: &JobClaim, id: Uuid, status: BackupStatus, why: &str) {
    if let Err(e) = d.backups.update(Some(job), id, |r| {
        r.status = status;
        r.fail_reason = Some(why.to_string());
    }) {
        tracing::error!(backup = %id, "cannot record that the backup failed: {}", error_chain(&e));
    }
}

/// How long a backup waits between looks at the snapshot it waits for.
const TAKE_POLL: Duration = Duration::from_millis(100);

/// Wait for the snapshot a backup took to be taken; `Err` says why the
/// backup cannot go on (`None`: the daemon is stopping).
fn wait_for_take(d: &Daemon, snapshot: Uuid) -> Result<(), Option<String>> {
    loop {
        match d.store().snapshot(snapshot) {
            Ok(Some(r)) => match r.status {
                SnapStatus::Available => return Ok(()),
                SnapStatus::Creating => {
                    if d.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(None);
                    }
                    std::thread::sleep(TAKE_POLL);
                }
                _ => {
                    return Err(Some(format!(
                        "the snapshot {snapshot} taken for this backup failed: {}",
                        r.error.unwrap_or_else(|| r.status.as_str().to_string())
                    )))
                }
            },
            Ok(None) => {
                return Err(Some(format!(
                    "the snapshot {snapshot} taken for this backup is gone"
                )))
            }
            Err(e) => return Err(Some(error_chain(&e))),
        }
    }
}

/// Back a snapshot up, then record the backup available or error. A backup
/// the daemon's stop interrupts stays creating, and is resumed at the next
/// start.
fn backup(d: &Daemon, claim: &JobClaim, job: BackupJob) {
    let id = job.backup;
    if let Err(why) = wait_for_take(d, job.snapshot) {
        match why {
            Some(why) => {
                tracing::error!(volume = %job.volume, backup = %id, "{}", logline::backup_failed(&job.volume, id, &why));
                fail(d, claim, id, BackupStatus::Error, &why);
            }
            None => {
                tracing::info!(volume = %job.volume, backup = %id, "backup interrupted by the stop; it resumes at the next start")
            }
        }
        return;
    }
    let shown = d.backups.track(id);
    let r = d.engine.backup(&job, &shown.progress, &d.shutdown);
    match r {
        Ok(out) => {
            tracing::info!(
                volume = %job.volume,
                backup = %id,
                snapshot = %job.snapshot,
                parent = ?out.info.parent_id,
                changed_bytes = out.info.changed_bytes,
                sent_bytes = out.sent_bytes,
                objects_uploaded = out.objects_uploaded,
                duration_ms = out.duration_ms,
                "{}",
                logline::backup_available(&job.volume, id, out.info.changed_bytes, out.sent_bytes)
            );
            let saved = d.backups.update(Some(claim), id, |r| {
                r.status = BackupStatus::Available;
                r.parent_id = out.info.parent_id;
                r.size_bytes = out.info.size_bytes;
                r.object_count = out.info.objects as u64;
                r.changed_bytes = out.info.changed_bytes;
                r.uploaded_bytes = out.info.uploaded_bytes;
                r.fail_reason = None;
            });
            if let Err(e) = saved {
                tracing::error!(backup = %id, "cannot record that the backup is available: {}; it is on the remote (`blocksnap backup list --config`)", error_chain(&e));
            }
        }
        Err(e) if e.is_cancelled() => {
            tracing::info!(volume = %job.volume, backup = %id, "backup interrupted by the stop; it resumes at the next start");
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!(volume = %job.volume, backup = %id, "{}", logline::backup_failed(&job.volume, id, &msg));
            fail(d, claim, id, BackupStatus::Error, &msg);
        }
    }
}

/// Delete a backup from its remote, then forget its record.
fn delete(d: &Daemon, claim: &JobClaim, remote: &RemoteConfig, volume: &str, id: Uuid) {
    match d.engine.delete_backup(remote, volume, id) {
        // Not on the remote: a failed backup, or a delete a crash cut short.
        Ok(()) => {}
        Err(e) if e.is_unknown_backup() => {}
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!(volume = %volume, backup = %id, "backup delete failed: {msg}");
            fail(d, claim, id, BackupStatus::ErrorDeleting, &msg);
            return;
        }
    }
    tracing::info!(volume = %volume, backup = %id, "backup deleted");
    // As on the remote: its children now build on its parent (or are full).
    let forgot = d.backups.write(Some(claim), |m| {
        let parent = m.remove(&id).and_then(|r| r.parent_id);
        for r in m.values_mut().filter(|r| r.parent_id == Some(id)) {
            r.parent_id = parent;
        }
        Ok::<_, crate::daemon::backups::BookError>(())
    });
    if let Err(e) = forgot {
        tracing::error!(backup = %id, "cannot forget the deleted backup: {}", error_chain(&e));
    }
}

/// What a restore needs.
#[derive(Debug)]
struct RestoreJob {
    backup: Uuid,
    /// The backed-up volume (the backup's name space on the remote).
    source_volume: String,
    remote: RemoteConfig,
    volume: String,
    image: std::path::PathBuf,
    /// The new volume's size: the backup's, or larger.
    size_bytes: u64,
}

/// Restore a backup into a new image, attach it, record the volume
/// available or error.
fn restore(d: &Daemon, claim: &JobClaim, job: RestoreJob) {
    let id = &job.volume;
    let progress = Arc::new(crate::backup::Progress::default());
    let r = d
        .engine
        .restore_backup(
            &job.remote,
            &job.source_volume,
            job.backup,
            &job.image,
            job.size_bytes,
            &progress,
        )
        .and_then(|()| d.engine.attach(&job.image));
    let saved = match r {
        Ok(dev) => {
            tracing::info!(volume = %id, backup = %job.backup, device = %dev.display(), size_bytes = job.size_bytes, "{}", logline::volume_available(id, dev.display(), job.size_bytes));
            d.finish_volume(claim, id, |r| {
                r.status = VolStatus::Available;
                r.error = None;
                r.metadata
                    .insert("blocksnap:device".into(), dev.display().to_string());
                if let VolumeKind::Made { device, .. } = &mut r.kind {
                    *device = Some(dev);
                }
            })
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!(volume = %id, backup = %job.backup, "{}", logline::volume_failed(id, &msg));
            if let Err(e) = d.engine.remove(&job.image) {
                tracing::warn!(volume = %id, "{}", error_chain(&e));
            }
            d.finish_volume(claim, id, |r| {
                r.status = VolStatus::Error;
                r.error = Some(format!("restore of backup {} failed: {msg}", job.backup));
            })
        }
    };
    if let Err(e) = saved {
        tracing::error!(
            "cannot record the outcome of volume {id}: {}; the next start settles it",
            error_chain(&e)
        );
    }
}

/// At start (after the catalog is reconciled): resume the backups and
/// deletes a stop or crash interrupted, or mark them error when what they
/// need is gone.
pub fn resume(d: &Arc<Daemon>) {
    let none = JobClaim::none();
    for r in d.backups.all() {
        match r.status {
            BackupStatus::Creating => {
                let snap_ok = matches!(
                    d.store().snapshot(r.snapshot_id),
                    Ok(Some(s)) if s.status == SnapStatus::Available
                );
                let remote = d.config.remotes.iter().find(|x| x.name == r.remote);
                let (true, Some(remote)) = (snap_ok, remote) else {
                    fail(
                        d,
                        &none,
                        r.id,
                        BackupStatus::Error,
                        "interrupted: blocksnapd stopped while this backup was being made, and its snapshot or remote is gone",
                    );
                    continue;
                };
                let claim = d.claims.acquire(vec![
                    Want::exclusive(
                        Resource::Backups(r.volume_id.clone()),
                        format!("backup {} is being created", r.id),
                    ),
                    Want::shared(
                        Resource::Snapshot(r.snapshot_id),
                        format!("backup {} is being made of it", r.id),
                    ),
                ]);
                match claim {
                    Ok(claim) => {
                        tracing::info!(volume = %r.volume_id, backup = %r.id, "resuming an interrupted backup");
                        spawn_backup(d, claim, &r, remote.clone());
                    }
                    Err(c) => fail(
                        d,
                        &none,
                        r.id,
                        BackupStatus::Error,
                        &format!("interrupted, and cannot be resumed: {c}"),
                    ),
                }
            }
            BackupStatus::Deleting => {
                let remote = d.config.remotes.iter().find(|x| x.name == r.remote);
                let claim = d.claims.acquire(vec![
                    Want::exclusive(
                        Resource::Backups(r.volume_id.clone()),
                        format!("backup {} is being deleted", r.id),
                    ),
                    Want::exclusive(Resource::Backup(r.id), "it is being deleted"),
                ]);
                match (remote, claim) {
                    (Some(remote), Ok(claim)) => {
                        tracing::info!(volume = %r.volume_id, backup = %r.id, "resuming an interrupted backup delete");
                        spawn_delete(d, claim, &r, remote.clone());
                    }
                    _ => fail(
                        d,
                        &none,
                        r.id,
                        BackupStatus::ErrorDeleting,
                        "interrupted: blocksnapd stopped while this backup was being deleted; delete it again",
                    ),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_from_a_backup_is_at_least_the_backups_size() {
        let mib = 1 << 20;
        // The backup's exact bytes when no size, or its own size, is asked.
        assert_eq!(restored_size(6 * mib, None).unwrap(), 6 * mib);
        assert_eq!(restored_size(6 * mib, Some(1)).unwrap(), 6 * mib);
        assert_eq!(restored_size(2 * GB, Some(2)).unwrap(), 2 * GB);
        // Larger: whole GB.
        assert_eq!(restored_size(6 * mib, Some(3)).unwrap(), 3 * GB);
        // Smaller than the backup's size in GB (rounded up): Cinder's 400.
        let e = restored_size(GB + 4096, Some(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid input received: Volume size 1GB cannot be smaller than the backup size 2GB. It must be >= backup size."
        );
        assert_eq!(
            crate::daemon::api::errors::status_of(&e),
            axum::http::StatusCode::BAD_REQUEST
        );
    }
}
