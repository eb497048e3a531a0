//! Listing backups: what their manifests say.

use serde::Serialize;
use uuid::Uuid;

use super::manifest::Manifest;
use super::{BackupError, Remote};

/// A backup as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupInfo {
    pub id: Uuid,
    pub volume: String,
    pub seq: u64,
    pub parent_id: Option<Uuid>,
    pub full: bool,
    pub created_at: String,
    pub created_us: i64,
    pub snapshot_id: Uuid,
    pub snapshot_name: String,
    pub snapshot_created_at: String,
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub changed_bytes: u64,
    pub zero_bytes: u64,
    pub uploaded_bytes: u64,
    pub objects: usize,
    pub encrypted: bool,
}

impl BackupInfo {
    pub fn of(m: &Manifest) -> BackupInfo {
        BackupInfo {
            id: m.id,
            volume: m.volume.clone(),
            seq: m.seq,
            parent_id: m.parent,
            full: m.is_full(),
            created_at: crate::util::format_timestamp(m.created_us),
            created_us: m.created_us,
            snapshot_id: m.snapshot_id,
            snapshot_name: m.snapshot_name.clone(),
            snapshot_created_at: crate::util::format_timestamp(m.snapshot_created_us),
            name: m.name.clone(),
            description: m.description.clone(),
            size_bytes: m.device_size,
            block_size: m.block_size,
            changed_bytes: m.changed_bytes,
            zero_bytes: m.zero_bytes,
            uploaded_bytes: m.uploaded_bytes,
            objects: m.objects.len(),
            encrypted: m.key_id != [0; 8],
        }
    }
}

/// One line of a listing: a backup, or one whose manifest cannot be read.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Listed {
    Ok(BackupInfo),
    Unreadable {
        id: Uuid,
        volume: String,
        seq: u64,
        error: String,
    },
}

/// The backups of `volume`, or of every volume, oldest first per volume.
pub fn list(remote: &Remote, volume: Option<&str>) -> Result<Vec<Listed>, BackupError> {
    let volumes = match volume {
        Some(v) => vec![v.to_string()],
        None => remote.volumes()?,
    };
    let mut out = Vec::new();
    for v in volumes {
        for (seq, id) in remote.backups(&v)? {
            out.push(match remote.manifest(&v, seq, id) {
                Ok(m) => Listed::Ok(BackupInfo::of(&m)),
                Err(e @ BackupError::Manifest { .. }) => Listed::Unreadable {
                    id,
                    volume: v.clone(),
                    seq,
                    error: crate::util::error_chain(&e),
                },
                Err(e) => return Err(e),
            });
        }
    }
    Ok(out)
}

/// One backup (by id or a unique prefix).
pub fn show(remote: &Remote, volume: &str, id: &str) -> Result<BackupInfo, BackupError> {
    let (seq, id) = remote.find(volume, id)?;
    Ok(BackupInfo::of(&remote.manifest(volume, seq, id)?))
}
