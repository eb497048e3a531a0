//! Bringing the catalog in line with the chain files and the host after a
//! start: finish or fail what a crash interrupted, adopt snapshots taken
//! with the CLI, reattach made volumes, resume interrupted reverts.

use std::collections::BTreeSet;
use std::sync::Arc;

use uuid::Uuid;

use super::catalog::{SnapStatus, SnapshotRecord, VolStatus, VolumeKind};
use super::claims::{Resource, Want};
use super::engine::ChainSnapshot;
use super::ops::jobs::{self, Subject};
use super::ops::revert_intent;
use super::store::{Change, SnapshotQuery, StoreError, VolumeQuery};
use super::{configured_record, Daemon, VolumeInfo};
use crate::util::error_chain;

pub(super) fn reconcile(d: &Arc<Daemon>) -> Result<(), StoreError> {
    configured_volumes(d)?;
    for v in d.volumes()? {
        snapshots_of(d, &v)?;
    }
    made_volumes(d)?;
    for v in d.volumes()? {
        if let Some(snapshot) = revert_intent::get(&v.record) {
            interrupted_revert(d, v, snapshot)?;
        }
    }
    Ok(())
}

/// Configured volumes get a record (and so a creation time) on the first
/// start that sees them, follow the config's tenant, and lose their record
/// when the config no longer has them.
fn configured_volumes(d: &Daemon) -> Result<(), StoreError> {
    let mut changes = Vec::new();
    let records = d.store().volumes(&VolumeQuery::default())?;
    for r in &records {
        if r.kind == VolumeKind::Configured && !d.config.volumes.iter().any(|v| v.id == r.id) {
            changes.push(Change::RemoveVolume(r.id.clone()));
        }
    }
    for v in &d.config.volumes {
        match records.iter().find(|r| r.id == v.id) {
            None => changes.push(Change::PutVolume(configured_record(
                v,
                crate::util::now_micros(),
            ))),
            Some(r) if r.tenant != v.tenant || r.kind != VolumeKind::Configured => {
                let mut r = r.clone();
                r.tenant = v.tenant.clone();
                r.kind = VolumeKind::Configured;
                changes.push(Change::PutVolume(r));
            }
            Some(_) => {}
        }
    }
    d.apply(&changes)
}

/// One volume's snapshot records against its chain.
fn snapshots_of(d: &Daemon, v: &VolumeInfo) -> Result<(), StoreError> {
    let path = d.chain_path(&v.id);
    let live: Vec<ChainSnapshot> = if d.engine.chain_exists(&path) {
        d.engine.chain_snapshots(&path).unwrap_or_else(|e| {
            tracing::error!(volume = %v.id, "{}", error_chain(&e));
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let in_chain = |id: Uuid| live.iter().any(|s| s.id == id);
    let records = d.store().snapshots(&SnapshotQuery {
        volume_id: Some(v.id.clone()),
        ..SnapshotQuery::default()
    })?;
    let mut changes = Vec::new();
    let mut gone = BTreeSet::new();
    for mut r in records.iter().cloned() {
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
            SnapStatus::Deleting => {
                match d.engine.delete_snapshot(&path, r.id) {
                    Ok(_) => {
                        changes.push(Change::RemoveSnapshot(r.id));
                        gone.insert(r.id);
                    }
                    Err(e) => {
                        r.status = SnapStatus::ErrorDeleting;
                        r.error = Some(error_chain(&e));
                        changes.push(Change::PutSnapshot(r.clone()));
                    }
                }
                tracing::info!(snapshot = %r.id, "finished a delete interrupted by a restart");
                continue;
            }
            _ => continue,
        }
        changes.push(Change::PutSnapshot(r));
    }
    // Snapshots in the chain the catalog does not know (taken with the
    // CLI, or a lost catalog) are adopted; not those just deleted.
    for s in live.iter().filter(|s| !gone.contains(&s.id)) {
        if records.iter().any(|r| r.id == s.id) {
            continue;
        }
        changes.push(Change::PutSnapshot(SnapshotRecord {
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
            scheduled_us: None,
        }));
    }
    d.apply(&changes)
}

/// Made volumes: reattach, or finish what was interrupted.
fn made_volumes(d: &Daemon) -> Result<(), StoreError> {
    let mut changes = Vec::new();
    for mut r in d.store().volumes(&VolumeQuery::default())? {
        let VolumeKind::Made { image, device, .. } = &mut r.kind else {
            continue;
        };
        match r.status {
            VolStatus::Creating => {
                r.status = VolStatus::Error;
                r.error = Some(
                    "interrupted: blocksnapd stopped while this volume was being created".into(),
                );
            }
            VolStatus::Deleting => {
                if let Some(dev) = device.take() {
                    let _ = d.engine.detach(&dev);
                }
                let chain = d.chain_path(&r.id);
                for p in [image.clone(), crate::chain::side_file(&chain), chain] {
                    if let Err(e) = d.engine.remove(&p) {
                        tracing::warn!(volume = %r.id, "{}", error_chain(&e));
                    }
                }
                changes.push(Change::RemoveVolume(r.id.clone()));
                continue;
            }
            VolStatus::Available => match d.engine.attached(image) {
                Some(dev) => *device = Some(dev),
                None => match d.engine.attach(image) {
                    Ok(dev) => {
                        tracing::info!(volume = %r.id, device = %dev.display(), "reattached volume image");
                        *device = Some(dev);
                    }
                    Err(e) => {
                        r.status = VolStatus::Error;
                        r.error = Some(error_chain(&e));
                        *device = None;
                    }
                },
            },
            _ => {}
        }
        if let VolumeKind::Made {
            device: Some(dev), ..
        } = &r.kind
        {
            r.metadata
                .insert("blocksnap:device".into(), dev.display().to_string());
        }
        changes.push(Change::PutVolume(r));
    }
    d.apply(&changes)
}

/// A revert a crash interrupted: resumed to the end when nothing stands in
/// its way (it writes only blocks that differ, so running it again is
/// safe), otherwise the volume is marked partly reverted.
fn interrupted_revert(d: &Arc<Daemon>, v: VolumeInfo, snapshot: Uuid) -> Result<(), StoreError> {
    let snap = d
        .store()
        .snapshot(snapshot)?
        .filter(|s| s.status == SnapStatus::Available && s.volume_id == v.id);
    let snap_ok = snap.is_some();
    let blocker = match &v.device {
        None => Some("its device is not attached".to_string()),
        Some(dev) if !d.engine.device_exists(dev) => {
            Some(format!("its device {} is missing", dev.display()))
        }
        Some(dev) => match d.engine.mounted(dev) {
            Ok(true) => Some(format!("{} is mounted now", dev.display())),
            Err(e) => Some(format!(
                "cannot tell whether {} is mounted: {}",
                dev.display(),
                error_chain(&e)
            )),
            Ok(false) if !snap_ok => Some(format!("snapshot {snapshot} is not available")),
            Ok(false) => None,
        },
    };
    if let Some(why) = blocker {
        tracing::error!(volume = %v.id, snapshot = %snapshot, "a revert interrupted by a restart cannot be resumed: {why}; the volume is marked partly reverted");
        let text = jobs::partly_reverted(
            snapshot,
            &format!("the revert was interrupted by a restart and cannot be resumed: {why}"),
        );
        d.update_volume(&v.id, |r| {
            revert_intent::clear(r);
            r.status = VolStatus::Error;
            r.error = Some(text);
        })?;
        return Ok(());
    }
    let claim = d.claims.acquire(vec![
        Want::exclusive(
            Resource::Volume(v.id.clone()),
            format!("volume {} is being reverted to snapshot {snapshot}", v.id),
        )
        .showing("reverting"),
        Want::shared(
            Resource::Snapshot(snapshot),
            format!("volume {} is being reverted to it", v.id),
        ),
    ]);
    let claim = match claim {
        Ok(c) => c,
        Err(conflict) => {
            // Only earlier resumed reverts run now; one per volume.
            let text = jobs::partly_reverted(snapshot, &conflict.to_string());
            d.update_volume(&v.id, |r| {
                revert_intent::clear(r);
                r.status = VolStatus::Error;
                r.error = Some(text);
            })?;
            return Ok(());
        }
    };
    tracing::warn!(volume = %v.id, snapshot = %snapshot, "resuming a revert interrupted by a restart");
    let job = jobs::RevertJob {
        volume: v.id.clone(),
        device: v.device.clone().expect("checked above"),
        chain: d.chain_path(&v.id),
        snapshot,
        snapshot_size: snap.map_or(0, |s| s.size_bytes),
        resumed: true,
    };
    d.spawn(
        Subject::Revert {
            volume: v.id.clone(),
            snapshot,
        },
        claim,
        move |d, claim| jobs::revert(d, claim, job),
    );
    Ok(())
}
