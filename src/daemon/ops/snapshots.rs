//! Snapshot operations: list, show, create, rename, delete, metadata.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::jobs::{self, Subject};
use super::{
    changed_metadata, check_change, check_items, check_text, About, Caller, Field, MetadataChange,
    OpError, Ops, Snapshot,
};
use crate::daemon::catalog::{SnapStatus, SnapshotRecord, VolStatus};
use crate::daemon::claims::{Resource, Want};
use crate::daemon::engine::TakeJob;
use crate::daemon::store::mem::{self, KeyValue};
use crate::daemon::store::{Change, Page, SnapshotQuery, SortDir, SortKey, StoreError};
use crate::quiesce::{self, Mode};
use crate::util::now_micros;

/// Whether a volume's record keeps it from being snapshotted: a made
/// volume must be available; a configured one must not be marked error
/// (partly reverted).
fn unusable(configured: bool, status: VolStatus) -> bool {
    if configured {
        status == VolStatus::Error
    } else {
        status != VolStatus::Available
    }
}

/// A new snapshot of a volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateSnapshot {
    pub volume_id: String,
    /// Take a crash-consistent snapshot of a mounted volume whose quiesce
    /// mode is none.
    pub force: bool,
    /// Store every block, starting the chain over instead of building on
    /// the newest snapshot (the only way on after the device shrank).
    pub full: bool,
    pub name: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Who a snapshot is taken for.
#[derive(Clone, Copy, Debug)]
enum Origin<'a> {
    /// A request of this caller.
    Api(&'a Caller),
    /// The volume's schedule, its run at this time (microseconds).
    Schedule(i64),
}

/// New name and description (what is `None` stays).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateSnapshot {
    pub name: Option<String>,
    pub description: Option<String>,
}

/// Which snapshots to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub status: Option<String>,
    pub volume_id: Option<String>,
    pub name: Option<String>,
    /// Only snapshots holding all of these metadata items (v2/v3).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Only snapshots whose name contains this (v3 `name~`).
    pub name_like: Option<String>,
    pub page: Page,
}

/// A snapshot's value for a sort key (the store's order).
fn snapshot_key(r: &SnapshotRecord, k: SortKey) -> KeyValue<'_> {
    match k {
        SortKey::CreatedAt => KeyValue::Int(r.created_us),
        SortKey::UpdatedAt => KeyValue::Int(r.updated_us),
        SortKey::Id => KeyValue::Uuid(r.id),
        SortKey::Name => KeyValue::Text(&r.display_name),
        SortKey::Status => KeyValue::Text(r.status.as_str()),
        SortKey::Size => KeyValue::Size(r.size_bytes),
    }
}

impl Ops {
    /// The snapshots the caller may see, newest first (or as `f` sorts).
    pub fn list_snapshots(&self, c: &Caller, f: &SnapshotFilter) -> Result<Vec<Snapshot>, OpError> {
        let q = SnapshotQuery {
            tenant: Some(c.tenant.clone()),
            volumes: Some(self.visible_volume_ids(c)?),
            volume_id: f.volume_id.clone(),
            status: f.status.clone(),
            name: f.name.clone(),
            page: f.page.clone(),
        };
        let bad_marker = |e| match e {
            StoreError::UnknownMarker(m) => OpError::BadMarker(m),
            e => e.into(),
        };
        if f.metadata.is_none() && f.name_like.is_none() {
            let records = self.d.store().snapshots(&q).map_err(bad_marker)?;
            return Ok(records.into_iter().map(|r| self.snapshot_of(r)).collect());
        }
        // Filters the store does not index: all matches of the others,
        // then these, then the page.
        let all = SnapshotQuery {
            page: Page {
                sort: f.page.sort.clone(),
                ..Page::default()
            },
            ..q
        };
        let records = self.d.store().snapshots(&all)?;
        let hits: Vec<&SnapshotRecord> = records
            .iter()
            .filter(|r| {
                f.metadata
                    .as_ref()
                    .is_none_or(|m| m.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
            })
            .filter(|r| {
                f.name_like
                    .as_ref()
                    .is_none_or(|n| r.display_name.contains(n.as_str()))
            })
            .collect();
        let page = mem::page(hits, &f.page, snapshot_key).map_err(bad_marker)?;
        Ok(page
            .into_iter()
            .map(|r| self.snapshot_of(r.clone()))
            .collect())
    }

    /// One snapshot; `id` as the request gave it.
    pub fn snapshot(&self, c: &Caller, id: &str) -> Result<Snapshot, OpError> {
        Ok(self.snapshot_of(self.find_snapshot_record(c, id)?))
    }

    /// Start a snapshot of a volume: answered once its record (status
    /// creating) is durable; the take runs in the background.
    pub fn create_snapshot(&self, c: &Caller, req: CreateSnapshot) -> Result<Snapshot, OpError> {
        self.start_snapshot(Origin::Api(c), req)
    }

    /// Start a scheduled snapshot of a volume (the scheduler's run at
    /// `run_us`): the same operation as [`Ops::create_snapshot`], with the
    /// same claims, but owned by no tenant (whoever sees the volume sees
    /// it) and marked scheduled, so only the keep rules prune it.
    pub(crate) fn create_scheduled_snapshot(
        &self,
        run_us: i64,
        req: CreateSnapshot,
    ) -> Result<Snapshot, OpError> {
        self.start_snapshot(Origin::Schedule(run_us), req)
    }

    fn start_snapshot(&self, origin: Origin<'_>, req: CreateSnapshot) -> Result<Snapshot, OpError> {
        check_text(Field::Name, req.name.as_deref())?;
        check_text(Field::Description, req.description.as_deref())?;
        check_items(&req.metadata)?;
        let metadata = changed_metadata(
            &BTreeMap::new(),
            &MetadataChange::Merge(req.metadata),
            false,
        )?;
        let vol = match origin {
            Origin::Api(c) => self.find_volume(c, &req.volume_id)?,
            Origin::Schedule(_) => self
                .d
                .volume(&req.volume_id)?
                .ok_or_else(|| OpError::VolumeNotFound(super::clean_id(&req.volume_id)))?,
        };
        let d = &self.d;
        let mounted = d.mounted(&vol).unwrap_or(false);
        let size = d.device_size(&vol);
        if unusable(vol.configured, vol.record.status) {
            return Err(OpError::VolumeNotAvailable);
        }
        // A mounted volume is snapshotted safely by freezing or unmounting
        // it; with quiesce none only a forced, crash-consistent snapshot is
        // possible.
        if mounted && vol.quiesce == Mode::None && !req.force {
            return Err(OpError::VolumeNotAvailable);
        }
        let size = size.ok_or_else(|| OpError::DeviceUnreadable(vol.id.clone()))?;
        if !req.full {
            self.check_not_shrunk(&vol.id, size)?;
        }
        let device = vol
            .device
            .clone()
            .ok_or_else(|| OpError::DeviceUnreadable(vol.id.clone()))?;
        let id = Uuid::new_v4();
        let claim = d
            .claims
            .acquire(vec![Want::exclusive(
                Resource::Volume(vol.id.clone()),
                format!("snapshot {id} is being created"),
            )])
            .map_err(OpError::in_use(About::Volume))?;
        let record = SnapshotRecord {
            id,
            volume_id: vol.id.clone(),
            tenant: match origin {
                Origin::Api(c) => Some(c.tenant.clone()),
                Origin::Schedule(_) => None,
            },
            status: SnapStatus::Creating,
            display_name: req.name.unwrap_or_default(),
            display_description: req.description.unwrap_or_default(),
            metadata,
            created_us: now_micros(),
            updated_us: 0,
            size_bytes: size,
            error: None,
            changed_bytes: 0,
            stored_bytes: 0,
            freeze_ms: 0.0,
            scheduled_us: match origin {
                Origin::Schedule(t) => Some(t),
                Origin::Api(_) => None,
            },
        };
        // Under the claim: check the volume was not marked meanwhile (a
        // revert that just failed halfway records that before it releases).
        d.write(|s| -> Result<(), OpError> {
            if let Some(r) = s.volume(&vol.id)? {
                if unusable(vol.configured, r.status) {
                    return Err(OpError::VolumeNotAvailable);
                }
            }
            s.apply(&[Change::PutSnapshot(record.clone())])?;
            Ok(())
        })?;
        tracing::info!(volume = %vol.id, snapshot = %id, force = req.force, full = req.full, "{}", crate::daemon::logline::snapshot_requested(&vol.id, id, req.force, req.full));
        // Made volumes are not tracked (they are not in the config).
        let cfg = d.config.volumes.iter().find(|c| c.id == vol.id);
        let mut keep_off = vec![d.config.state_dir.clone(), d.config.socket.clone()];
        keep_off.dedup();
        let job = TakeJob {
            volume: vol.id.clone(),
            device,
            chain: d.chain_path(&vol.id),
            snapshot_id: id,
            name: record.display_name.clone(),
            description: record.display_description.clone(),
            metadata: record.metadata.clone(),
            block_size: vol.block_size,
            full: req.full,
            quiesce: quiesce::Options {
                mode: vol.quiesce,
                force: req.force,
                max_freeze: vol.max_freeze,
                intent_dir: Some(d.intent_dir()),
                keep_off,
            },
            tracked: cfg.is_some_and(|c| c.track_writes),
            verify_every: cfg.map_or(0, |c| c.verify_every),
        };
        d.spawn(
            Subject::Take {
                volume: vol.id.clone(),
                snapshot: id,
            },
            claim,
            move |d, claim| jobs::take(d, claim, job),
        );
        Ok(Snapshot {
            record,
            progress: None,
            take: None,
        })
    }

    /// Rename a snapshot or change its description.
    pub fn update_snapshot(
        &self,
        c: &Caller,
        id: &str,
        req: UpdateSnapshot,
    ) -> Result<Snapshot, OpError> {
        let r = self.find_snapshot_record(c, id)?;
        check_text(Field::Name, req.name.as_deref())?;
        check_text(Field::Description, req.description.as_deref())?;
        let (_, rec) = self
            .d
            .update_snapshot(r.id, |rec| {
                if let Some(n) = req.name {
                    rec.display_name = n;
                }
                if let Some(n) = req.description {
                    rec.display_description = n;
                }
            })?
            .ok_or(OpError::NotFound)?;
        Ok(self.snapshot_of(rec))
    }

    /// Start deleting a snapshot: answered once its record says deleting;
    /// the delete (and the merge into its successor) runs in the background.
    pub fn delete_snapshot(&self, c: &Caller, id: &str) -> Result<(), OpError> {
        let r = self.find_snapshot_record(c, id)?;
        self.start_delete(r)
    }

    /// Start deleting a snapshot the keep rules no longer keep: the same
    /// operation as [`Ops::delete_snapshot`] (claims, merge), on the
    /// scheduler's behalf.
    pub(crate) fn prune_snapshot(&self, id: Uuid) -> Result<(), OpError> {
        let r = self
            .d
            .store()
            .snapshot(id)?
            .ok_or_else(|| OpError::SnapshotNotFound(id.to_string()))?;
        self.start_delete(r)
    }

    fn start_delete(&self, r: SnapshotRecord) -> Result<(), OpError> {
        let deletable = |s: SnapStatus| matches!(s, SnapStatus::Available | SnapStatus::Error);
        if !deletable(r.status) {
            return Err(OpError::SnapshotNotDeletable);
        }
        let d = &self.d;
        let mut wants = vec![
            Want::exclusive(
                Resource::Volume(r.volume_id.clone()),
                format!("snapshot {} is being deleted", r.id),
            ),
            Want::exclusive(Resource::Snapshot(r.id), "it is being deleted"),
        ];
        if let Some(next) = self.successor(&r)? {
            wants.push(Want::exclusive(
                Resource::Snapshot(next),
                format!("snapshot {} is being deleted and merged into it", r.id),
            ));
        }
        let claim = d
            .claims
            .acquire(wants)
            .map_err(OpError::in_use(About::Snapshot))?;
        // Under the claim: nothing else can change its status now.
        let (ok, rec) = d
            .update_snapshot(r.id, |rec| {
                let ok = deletable(rec.status);
                if ok {
                    rec.status = SnapStatus::Deleting;
                }
                ok
            })?
            .ok_or_else(|| OpError::SnapshotNotFound(r.id.to_string()))?;
        if !ok {
            return Err(OpError::SnapshotNotDeletable);
        }
        tracing::info!(volume = %rec.volume_id, snapshot = %rec.id, "snapshot delete requested");
        let job = jobs::DeleteSnapshotJob {
            chain: d.chain_path(&rec.volume_id),
            volume: rec.volume_id.clone(),
            snapshot: rec.id,
        };
        d.spawn(
            Subject::DeleteSnapshot {
                volume: rec.volume_id,
                snapshot: rec.id,
            },
            claim,
            move |d, claim| jobs::delete_snapshot(d, claim, job),
        );
        Ok(())
    }

    /// An increment needs a device at least as large as the newest
    /// snapshot's; after a shrink only a full snapshot can be taken (the
    /// take checks again against the chain itself).
    fn check_not_shrunk(&self, volume: &str, size: u64) -> Result<(), OpError> {
        let q = SnapshotQuery {
            volume_id: Some(volume.to_string()),
            status: Some(SnapStatus::Available.as_str().to_string()),
            page: Page {
                sort: vec![(SortKey::CreatedAt, SortDir::Desc)],
                limit: 1,
                ..Page::default()
            },
            ..SnapshotQuery::default()
        };
        match self.d.store().snapshots(&q)?.into_iter().next() {
            Some(newest) if size < newest.size_bytes => Err(OpError::DeviceShrank {
                volume: volume.to_string(),
                snapshot: newest.id,
                was: newest.size_bytes,
                now: size,
            }),
            _ => Ok(()),
        }
    }

    /// The snapshot a delete merges into: the next one of the same volume.
    fn successor(&self, r: &SnapshotRecord) -> Result<Option<Uuid>, OpError> {
        let q = SnapshotQuery {
            volume_id: Some(r.volume_id.clone()),
            status: Some(SnapStatus::Available.as_str().to_string()),
            page: Page {
                sort: vec![(SortKey::CreatedAt, SortDir::Asc)],
                ..Page::default()
            },
            ..SnapshotQuery::default()
        };
        Ok(self
            .d
            .store()
            .snapshots(&q)?
            .into_iter()
            .find(|s| (s.created_us, s.id) > (r.created_us, r.id))
            .map(|s| s.id))
    }

    /// A snapshot's metadata.
    pub fn snapshot_metadata(
        &self,
        c: &Caller,
        id: &str,
    ) -> Result<BTreeMap<String, String>, OpError> {
        Ok(self.find_snapshot_record(c, id)?.metadata)
    }

    /// Change a snapshot's metadata; returns all of it afterwards.
    pub fn change_snapshot_metadata(
        &self,
        c: &Caller,
        id: &str,
        change: MetadataChange,
    ) -> Result<BTreeMap<String, String>, OpError> {
        let r = self.find_snapshot_record(c, id)?;
        check_change(&change)?;
        let (m, _) = self
            .d
            .update_snapshot(r.id, |rec| -> Result<_, OpError> {
                let m = changed_metadata(&rec.metadata, &change, false)?;
                rec.metadata = m.clone();
                Ok(m)
            })?
            .ok_or(OpError::NotFound)?;
        m
    }
}
