//! Deleting a backup, and sweeping objects no backup needs.
//!
//! Deleting backup K, in an order that is safe at every step:
//! 1. Every backup whose parent is K gets a new manifest with K's blocks it
//!    does not override merged in and K's parent as its parent (full if K
//!    was full). The replacement is one PUT: readers see the old manifest
//!    or the new one, and both describe the same image.
//! 2. K's manifest is deleted: K no longer exists.
//! 3. Objects that no remaining manifest references are deleted, and
//!    unfinished multipart uploads aborted (gc).
//!
//! A crash after 1 leaves K and its merged children (all restorable); after
//! 2, orphan objects that the next delete or gc removes. Gc never deletes
//! anything while a manifest cannot be read (it might need any object).

use std::collections::HashSet;

use serde::Serialize;
use uuid::Uuid;

use super::manifest::{Loc, Manifest, Overlay};
use super::store::PutMode;
use super::{check_volume, lock, BackupError, Remote};

/// What a delete did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeleteOutcome {
    pub backup_id: Uuid,
    /// Backups whose manifests absorbed the deleted one's blocks.
    pub merged_into: Vec<Uuid>,
    #[serde(flatten)]
    pub gc: GcOutcome,
}

/// What a gc did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcOutcome {
    pub objects_deleted: u64,
    pub bytes_freed: u64,
    pub uploads_aborted: u64,
}

/// Delete backup `id` (or a unique prefix) of `volume`.
pub fn delete(remote: &Remote, volume: &str, id: &str) -> Result<DeleteOutcome, BackupError> {
    check_volume(volume)?;
    let store = remote.store();
    let _lock = lock::exclusive(store, volume, "delete")?;
    let all = remote.backups(volume)?;
    let (seq, id) = remote.find(volume, id)?;
    let k = remote.manifest(volume, seq, id)?;
    // Children: every backup whose parent is K. Any manifest that cannot be
    // read might be one: refuse rather than break it further.
    let mut children = Vec::new();
    for &(s, i) in &all {
        if i == id {
            continue;
        }
        let m = remote.manifest(volume, s, i)?;
        if m.parent == Some(id) {
            children.push(m);
        }
    }
    let mut merged = Vec::new();
    for c in &children {
        merged.push(merge(&k, c)?);
    }
    for m in &merged {
        store.put(&m.key(), &m.encode(remote.key()), PutMode::Overwrite)?;
    }
    store.delete(&k.key())?;
    tracing::info!(remote = %remote.name, volume, backup = %id, merged = merged.len(), "backup deleted");
    let gc = sweep(remote, volume)?;
    Ok(DeleteOutcome {
        backup_id: id,
        merged_into: merged.iter().map(|m| m.id).collect(),
        gc,
    })
}

/// Child `c` of `k` redefined to stand without `k`: the same image.
fn merge(k: &Manifest, c: &Manifest) -> Result<Manifest, BackupError> {
    let inconsistent = |detail: String| BackupError::Inconsistent {
        id: k.id,
        child: c.id,
        detail,
    };
    if k.block_size != c.block_size {
        return Err(inconsistent("their block sizes differ".into()));
    }
    let overlay = Overlay::build(&[c, k], c.nblocks());
    let mut m = c.clone();
    m.parent = k.parent;
    if k.is_full() && overlay.missing > 0 {
        return Err(inconsistent(format!(
            "{} block(s) would be undefined",
            overlay.missing
        )));
    }
    let (objects, extents, sums) = overlay.into_parts(c.block_size);
    m.objects = objects;
    m.extents = extents;
    m.sums = sums;
    // What the merged manifest lists now differs from its new parent.
    m.changed_bytes = 0;
    m.zero_bytes = 0;
    for x in &m.extents {
        let bytes: u64 = (x.block..x.end()).map(|b| m.block_len(b)).sum();
        m.changed_bytes += bytes;
        if x.loc == Loc::Zero {
            m.zero_bytes += bytes;
        }
    }
    m.check().map_err(inconsistent)?;
    Ok(m)
}

/// Delete the objects of `volume` that no backup references, and abort its
/// unfinished uploads (from interrupted backups).
pub fn gc(remote: &Remote, volume: &str) -> Result<GcOutcome, BackupError> {
    check_volume(volume)?;
    let _lock = lock::exclusive(remote.store(), volume, "gc")?;
    sweep(remote, volume)
}

fn sweep(remote: &Remote, volume: &str) -> Result<GcOutcome, BackupError> {
    let store = remote.store();
    let mut referenced = HashSet::new();
    for (s, i) in remote.backups(volume)? {
        let m = match remote.manifest(volume, s, i) {
            Ok(m) => m,
            Err(BackupError::Manifest { .. }) => {
                return Err(BackupError::GcRefused {
                    remote: remote.name.clone(),
                    volume: volume.to_string(),
                    id: i,
                })
            }
            Err(e) => return Err(e),
        };
        for o in &m.objects {
            referenced.insert(o.key(volume));
        }
    }
    let mut out = GcOutcome::default();
    let prefix = format!("{volume}/objects/");
    for u in store.list_multipart(&prefix)? {
        store.abort_multipart(&u.key, &u.upload_id)?;
        out.uploads_aborted += 1;
    }
    for o in store.list(&prefix)? {
        if !referenced.contains(&o.key) {
            store.delete(&o.key)?;
            out.objects_deleted += 1;
            out.bytes_freed += o.size;
        }
    }
    Ok(out)
}
