//! Volume operations: list, show, make (from a snapshot or blank), update,
//! metadata, delete, revert.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::jobs::{self, Subject};
use super::revert_intent;
use super::{
    changed_metadata, check_change, check_items, check_text, check_unreserved, About, Caller,
    Field, MetadataChange, OpError, Ops, Volume, VolumeStatus,
};
use crate::daemon::catalog::{SnapStatus, SnapshotRecord, VolStatus, VolumeKind, VolumeRecord};
use crate::daemon::claims::{Resource, Want};
use crate::daemon::store::mem::{self, HasId, KeyValue};
use crate::daemon::store::{
    Change, Page, SnapshotQuery, SortDir, SortKey, StoreError, VolumeQuery,
};
use crate::defaults::{made_volume, GB};
use crate::util::now_micros;

/// A new volume: from a snapshot, from a backup, or blank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateVolume {
    pub snapshot_id: Option<String>,
    /// Restore this backup into the new volume (the restore action's
    /// operation: same claims, same job).
    pub backup_id: Option<String>,
    /// Size in GB; a size that is not a whole number of GB is given as 0.
    pub size_gb: Option<u64>,
    /// Cloning a volume or an image is refused.
    pub source_volid: Option<String>,
    pub image_ref: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// New name, description or metadata (what is `None` stays).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateVolume {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces the metadata (the daemon's own `blocksnap:` items stay).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Make a volume hold one of its snapshots again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevertVolume {
    pub snapshot_id: String,
}

/// Which volumes to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeFilter {
    /// Live status ("available", "in-use", ...).
    pub status: Option<String>,
    pub name: Option<String>,
    /// Only volumes whose name contains this (v3 `name~`).
    pub name_like: Option<String>,
    /// Only volumes holding all of these metadata items.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Only volumes of this size in GB.
    pub size_gb: Option<u64>,
    /// Order (empty: newest first); then the id ascending.
    pub sort: Vec<(SortKey, SortDir)>,
    /// Start after this volume (an unknown marker is refused).
    pub marker: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

impl HasId for Volume {
    fn id_text(&self) -> String {
        self.info.id.clone()
    }
    fn id_key(&self) -> KeyValue<'_> {
        KeyValue::Text(&self.info.id)
    }
}

/// A volume's value for a sort key: its live status and size.
fn volume_key(v: &Volume, k: SortKey) -> KeyValue<'_> {
    let r = &v.info.record;
    match k {
        SortKey::CreatedAt => KeyValue::Int(r.created_us),
        SortKey::UpdatedAt => KeyValue::Int(r.updated_us),
        SortKey::Id => KeyValue::Text(&v.info.id),
        SortKey::Name => KeyValue::Text(&r.display_name),
        SortKey::Status => KeyValue::Text(v.status.as_str()),
        SortKey::Size => KeyValue::Size(v.size_bytes),
    }
}

/// Cinder counts sizes in whole GB, rounded up.
pub fn gb(bytes: u64) -> u64 {
    bytes.div_ceil(GB)
}

impl Ops {
    /// The volumes the caller may see, newest first.
    pub fn list_volumes(&self, c: &Caller, f: &VolumeFilter) -> Result<Vec<Volume>, OpError> {
        let vols: Vec<Volume> = self
            .d
            .volumes()?
            .into_iter()
            .filter(|v| v.visible_to(&c.tenant))
            .filter(|v| f.name.as_ref().is_none_or(|n| &v.record.display_name == n))
            .filter(|v| {
                f.name_like
                    .as_ref()
                    .is_none_or(|n| v.record.display_name.contains(n.as_str()))
            })
            .filter(|v| {
                f.metadata.as_ref().is_none_or(|m| {
                    m.iter()
                        .all(|(k, val)| v.record.metadata.get(k) == Some(val))
                })
            })
            .map(|v| self.volume_of(v))
            .filter(|v| f.status.as_deref().is_none_or(|s| v.status.as_str() == s))
            .filter(|v| f.size_gb.is_none_or(|g| gb(v.size_bytes) == g))
            .collect();
        let page = Page {
            sort: if f.sort.is_empty() {
                vec![(SortKey::CreatedAt, SortDir::Desc)]
            } else {
                f.sort.clone()
            },
            marker: f.marker.clone(),
            offset: f.offset,
            limit: f.limit,
        };
        let hits = mem::page(vols.iter().collect(), &page, volume_key).map_err(|e| match e {
            StoreError::UnknownMarker(m) => OpError::BadMarker(m),
            e => e.into(),
        })?;
        Ok(hits.into_iter().cloned().collect())
    }

    /// One volume.
    pub fn volume(&self, c: &Caller, id: &str) -> Result<Volume, OpError> {
        Ok(self.volume_of(self.find_volume(c, id)?))
    }

    /// Start making a volume: answered once its record (status creating) is
    /// durable; the image is written and attached in the background.
    pub fn create_volume(&self, c: &Caller, req: CreateVolume) -> Result<Volume, OpError> {
        check_text(Field::Name, req.name.as_deref())?;
        check_text(Field::Description, req.description.as_deref())?;
        check_items(&req.metadata)?;
        check_unreserved(req.metadata.keys())?;
        let metadata =
            changed_metadata(&BTreeMap::new(), &MetadataChange::Merge(req.metadata), true)?;
        if let Some(n) = req.size_gb {
            if n == 0 || n > made_volume::MAX_GB {
                return Err(OpError::BadSize {
                    max: made_volume::MAX_GB,
                });
            }
        }
        if req.snapshot_id.is_some() && (req.source_volid.is_some() || req.image_ref.is_some()) {
            return Err(OpError::SourcesCombined);
        }
        if req.backup_id.is_some()
            && (req.snapshot_id.is_some() || req.source_volid.is_some() || req.image_ref.is_some())
        {
            return Err(OpError::BackupSourceCombined);
        }
        if let Some(bid) = &req.backup_id {
            let backup = self.source_backup(c, bid)?;
            let backup_gb = gb(backup.size_bytes);
            if let Some(want) = req.size_gb.filter(|&w| w > backup_gb) {
                self.check_room(None, want * GB)?;
            }
            let out = self.restore_into_new(
                c,
                backup,
                super::backups::NewVolume {
                    name: req.name.unwrap_or_default(),
                    description: req.description.unwrap_or_default(),
                    metadata,
                    size_gb: req.size_gb,
                },
                OpError::SourceBackupNotAvailable,
            )?;
            // As recorded when answered, as below.
            let size_bytes = out.record.size_bytes;
            let info = crate::daemon::Daemon::made_info(out.record).expect("a made volume");
            return Ok(Volume {
                info,
                status: VolumeStatus::Creating,
                size_bytes,
                progress: None,
            });
        }
        if req.source_volid.is_some() || req.image_ref.is_some() {
            return Err(OpError::CloneUnsupported);
        }
        let d = &self.d;
        let (source, size_bytes) = match &req.snapshot_id {
            Some(sid) => {
                let uid = Uuid::parse_str(sid)
                    .map_err(|_| OpError::SourceSnapshotNotFound(super::clean_id(sid)))?;
                let snap = self
                    .find_snapshot_record(c, &uid.to_string())
                    .map_err(|e| match e {
                        OpError::SnapshotNotFound(_) => {
                            OpError::SourceSnapshotNotFound(uid.to_string())
                        }
                        e => e,
                    })?;
                if snap.status != SnapStatus::Available {
                    return Err(OpError::SourceSnapshotNotAvailable);
                }
                let snap_gb = gb(snap.size_bytes);
                let want = req.size_gb.unwrap_or(snap_gb);
                if want < snap_gb {
                    return Err(OpError::SmallerThanSnapshot {
                        want,
                        snapshot: snap_gb,
                    });
                }
                // Exactly the snapshot's bytes unless a larger size was asked for.
                let bytes = if req.size_gb.is_some() && want > snap_gb {
                    want * GB
                } else {
                    snap.size_bytes
                };
                (Some(snap), bytes)
            }
            None => (None, req.size_gb.ok_or(OpError::NoSource)? * GB),
        };
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
        self.check_room(source.as_ref(), size_bytes)?;
        let id = Uuid::new_v4().to_string();
        let mut wants = vec![Want::exclusive(
            Resource::Volume(id.clone()),
            format!("volume {id} is being created"),
        )
        .showing("creating")];
        if let Some(s) = &source {
            wants.push(Want::shared(
                Resource::Snapshot(s.id),
                format!("volume {id} is being created from it"),
            ));
        }
        let claim = d
            .claims
            .acquire(wants)
            .map_err(OpError::in_use(About::Snapshot))?;
        let image = d.image_path(&id);
        let record = VolumeRecord {
            id: id.clone(),
            kind: VolumeKind::Made {
                image: image.clone(),
                device: None,
                snapshot_id: source.as_ref().map(|s| s.id),
            },
            tenant: Some(c.tenant.clone()),
            status: VolStatus::Creating,
            display_name: req.name.unwrap_or_default(),
            display_description: req.description.unwrap_or_default(),
            metadata,
            created_us: now_micros(),
            updated_us: 0,
            size_bytes,
            error: None,
        };
        d.write(|s| -> Result<(), OpError> {
            // Under the claim: the snapshot cannot be deleted from now on;
            // check it was not deleted before.
            if let Some(src) = &source {
                if s.snapshot(src.id)?
                    .is_none_or(|r| r.status != SnapStatus::Available)
                {
                    return Err(OpError::SourceSnapshotNotAvailable);
                }
            }
            if made(s)? >= max {
                return Err(OpError::VolumeLimit(max));
            }
            s.apply(&[Change::PutVolume(record.clone())])?;
            Ok(())
        })?;
        tracing::info!(volume = %id, snapshot = ?source.as_ref().map(|s| s.id), size_bytes, "{}", crate::daemon::logline::volume_requested(&id, source.as_ref().map(|s| &s.id), size_bytes));
        let job = jobs::MakeVolumeJob {
            volume: id.clone(),
            image,
            from: source.as_ref().map(|s| (d.chain_path(&s.volume_id), s.id)),
            size_bytes,
        };
        d.spawn(
            Subject::MakeVolume { volume: id.clone() },
            claim,
            move |d, claim| jobs::make_volume(d, claim, job),
        );
        // As recorded when answered: being created, of the size asked for.
        let info = crate::daemon::Daemon::made_info(record).expect("a made volume");
        Ok(Volume {
            info,
            status: VolumeStatus::Creating,
            size_bytes,
            progress: None,
        })
    }

    /// Whether the filesystem holding the images can make this volume: a
    /// file of its size (sparse), and, made from a snapshot, room for the
    /// snapshot's data (its zero blocks stay holes). Checked when asked, so
    /// that a volume that cannot be made is refused instead of accepted
    /// and then failed; volumes being made at the same time share the free
    /// space, so the job can still find the disk full.
    fn check_room(&self, source: Option<&SnapshotRecord>, size_bytes: u64) -> Result<(), OpError> {
        let d = &self.d;
        let dir = d.volumes_dir();
        let unknown = |what: &str, e: &crate::daemon::engine::EngineError| {
            tracing::warn!(dir = %dir.display(), "cannot tell {what}: {}; going on", crate::util::error_chain(e));
        };
        match d.engine.largest_file(&dir, size_bytes) {
            Ok(None) => {}
            Ok(Some(max_bytes)) => {
                tracing::info!(dir = %dir.display(), size_bytes, max_bytes, "volume refused: larger than the largest file the filesystem can hold");
                return Err(OpError::VolumeTooLarge {
                    size_gb: gb(size_bytes),
                    size_bytes,
                    max_gb: max_bytes / GB,
                    max_bytes,
                });
            }
            Err(e) => unknown("the largest file size", &e),
        }
        let Some(snap) = source else {
            return Ok(());
        };
        let need = match d
            .engine
            .image_data_bytes(&d.chain_path(&snap.volume_id), snap.id)
        {
            Ok(n) => n,
            Err(e) => {
                unknown("how much data the snapshot holds", &e);
                return Ok(());
            }
        };
        match d.engine.free_bytes(&dir) {
            Ok(free) if need > free => {
                tracing::info!(dir = %dir.display(), snapshot = %snap.id, need, free, "volume refused: not enough free space");
                Err(OpError::NoRoom {
                    snapshot: snap.id,
                    need,
                    free,
                })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                unknown("the free space", &e);
                Ok(())
            }
        }
    }

    /// Rename a volume, change its description or replace its metadata.
    pub fn update_volume(
        &self,
        c: &Caller,
        id: &str,
        req: UpdateVolume,
    ) -> Result<Volume, OpError> {
        let v = self.find_volume(c, id)?;
        check_text(Field::Name, req.name.as_deref())?;
        check_text(Field::Description, req.description.as_deref())?;
        let change = req.metadata.map(MetadataChange::Replace);
        if let Some(ch) = &change {
            check_change(ch)?;
        }
        let (r, rec) = self
            .d
            .update_volume(&v.id, |r| -> Result<(), OpError> {
                let m = match &change {
                    Some(ch) => Some(changed_metadata(&r.metadata, ch, true)?),
                    None => None,
                };
                if let Some(n) = req.name {
                    r.display_name = n;
                }
                if let Some(n) = req.description {
                    r.display_description = n;
                }
                if let Some(m) = m {
                    r.metadata = m;
                }
                Ok(())
            })?
            .ok_or_else(|| OpError::VolumeNotFound(v.id.clone()))?;
        r?;
        Ok(self.volume_of(crate::daemon::VolumeInfo { record: rec, ..v }))
    }

    /// A volume's metadata.
    pub fn volume_metadata(
        &self,
        c: &Caller,
        id: &str,
    ) -> Result<BTreeMap<String, String>, OpError> {
        Ok(self.find_volume(c, id)?.record.metadata)
    }

    /// Change a volume's metadata (its `blocksnap:` items stay); returns all
    /// of it afterwards.
    pub fn change_volume_metadata(
        &self,
        c: &Caller,
        id: &str,
        change: MetadataChange,
    ) -> Result<BTreeMap<String, String>, OpError> {
        let v = self.find_volume(c, id)?;
        check_change(&change)?;
        let (m, _) = self
            .d
            .update_volume(&v.id, |r| -> Result<_, OpError> {
                let m = changed_metadata(&r.metadata, &change, true)?;
                r.metadata = m.clone();
                Ok(m)
            })?
            .ok_or_else(|| OpError::VolumeNotFound(v.id.clone()))?;
        m
    }

    /// Start deleting a made volume: answered once its record says
    /// deleting; it is detached and removed in the background.
    pub fn delete_volume(&self, c: &Caller, id: &str) -> Result<(), OpError> {
        let v = self.find_volume(c, id)?;
        let d = &self.d;
        if v.configured {
            return Err(OpError::VolumeConfigured {
                id: v.id.clone(),
                config: d.config.path.display().to_string(),
            });
        }
        let dependents = |s: &dyn crate::daemon::store::Store| -> Result<usize, OpError> {
            Ok(s.snapshots(&SnapshotQuery {
                volume_id: Some(v.id.clone()),
                page: Page::default(),
                ..SnapshotQuery::default()
            })?
            .len())
        };
        let n = dependents(d.store())?;
        if n > 0 {
            return Err(OpError::DependentSnapshots(n));
        }
        let deletable = |s: VolStatus| matches!(s, VolStatus::Available | VolStatus::Error);
        if !deletable(v.record.status) {
            return Err(OpError::VolumeNotDeletable);
        }
        if d.mounted(&v).unwrap_or(true) {
            return Err(OpError::VolumeMounted);
        }
        let claim = d
            .claims
            .acquire(vec![Want::exclusive(
                Resource::Volume(v.id.clone()),
                format!("volume {} is being deleted", v.id),
            )
            .showing("deleting")])
            .map_err(OpError::in_use(About::Volume))?;
        // Under the claim no snapshot of it can start; check none was taken
        // before, and that its status still allows it.
        let rec = d.write(|s| -> Result<VolumeRecord, OpError> {
            let n = dependents(s)?;
            if n > 0 {
                return Err(OpError::DependentSnapshots(n));
            }
            let mut r = s
                .volume(&v.id)?
                .ok_or_else(|| OpError::VolumeNotFound(v.id.clone()))?;
            if !deletable(r.status) {
                return Err(OpError::VolumeNotDeletable);
            }
            r.status = VolStatus::Deleting;
            r.updated_us = now_micros();
            s.apply(&[Change::PutVolume(r.clone())])?;
            Ok(r)
        })?;
        let VolumeKind::Made { image, device, .. } = rec.kind else {
            return Err(OpError::VolumeNotDeletable);
        };
        tracing::info!(volume = %v.id, "volume delete requested");
        let job = jobs::DeleteVolumeJob {
            volume: v.id.clone(),
            image,
            device,
            chain: d.chain_path(&v.id),
        };
        d.spawn(
            Subject::DeleteVolume {
                volume: v.id.clone(),
            },
            claim,
            move |d, claim| jobs::delete_volume(d, claim, job),
        );
        Ok(())
    }

    /// Start reverting a volume to one of its snapshots: answered once the
    /// revert is recorded durably (before its first write); the revert runs
    /// in the background and, after a crash, is resumed or the volume is
    /// marked partly reverted.
    pub fn revert_volume(&self, c: &Caller, id: &str, req: RevertVolume) -> Result<(), OpError> {
        let v = self.find_volume(c, id)?;
        let snap = self.find_snapshot_record(c, &req.snapshot_id)?;
        if snap.volume_id != v.id {
            return Err(OpError::SnapshotOfOtherVolume {
                snapshot: snap.id,
                owner: snap.volume_id,
                volume: v.id,
            });
        }
        if snap.status != SnapStatus::Available {
            return Err(OpError::RevertSnapshotNotAvailable);
        }
        let d = &self.d;
        if d.mounted(&v).unwrap_or(true) {
            return Err(OpError::MountedForRevert);
        }
        let device = v
            .device
            .clone()
            .ok_or_else(|| OpError::DeviceUnreadable(v.id.clone()))?;
        // Cinder reverts only a volume of its snapshot's size: a grown one
        // would keep its newer data past the snapshot's end, a shrunk one
        // cannot hold it. The job checks again right before it writes.
        let now = d
            .device_size(&v)
            .ok_or_else(|| OpError::DeviceUnreadable(v.id.clone()))?;
        if now != snap.size_bytes {
            return Err(OpError::RevertSizeDiffers {
                volume: v.id.clone(),
                snapshot: snap.id,
                volume_bytes: now,
                snapshot_bytes: snap.size_bytes,
            });
        }
        let claim = d
            .claims
            .acquire(vec![
                Want::exclusive(
                    Resource::Volume(v.id.clone()),
                    format!("volume {} is being reverted to snapshot {}", v.id, snap.id),
                )
                .showing(VolumeStatus::Reverting.as_str()),
                Want::shared(
                    Resource::Snapshot(snap.id),
                    format!("volume {} is being reverted to it", v.id),
                ),
            ])
            .map_err(OpError::in_use(About::Volume))?;
        // The intent is durable before the first write; the metadata of the
        // last completed revert goes, as it no longer describes the device.
        d.write(|s| -> Result<(), OpError> {
            if s.snapshot(snap.id)?
                .is_none_or(|r| r.status != SnapStatus::Available)
            {
                return Err(OpError::RevertSnapshotNotAvailable);
            }
            let mut r = match s.volume(&v.id)? {
                Some(r) => r,
                None => v.record.clone(),
            };
            r.metadata.retain(|k, _| !k.starts_with(REVERT_KEYS));
            revert_intent::set(&mut r, snap.id);
            r.updated_us = now_micros();
            s.apply(&[Change::PutVolume(r)])?;
            Ok(())
        })?;
        tracing::info!(volume = %v.id, snapshot = %snap.id, "{}", crate::daemon::logline::revert_requested(&v.id, snap.id));
        let job = jobs::RevertJob {
            volume: v.id.clone(),
            device,
            chain: d.chain_path(&v.id),
            snapshot: snap.id,
            snapshot_size: snap.size_bytes,
            resumed: false,
        };
        d.spawn(
            Subject::Revert {
                volume: v.id.clone(),
                snapshot: snap.id,
            },
            claim,
            move |d, claim| jobs::revert(d, claim, job),
        );
        Ok(())
    }
}

/// The metadata items describing the last completed revert.
pub(crate) const REVERT_KEYS: &str = "blocksnap:reverted_";
