//! The daemon's records of snapshots and volumes (status, names, metadata,
//! errors), kept in one JSON file replaced atomically on every change: a
//! temporary file, fsync, rename, fsync of the directory. The catalog is
//! small and changes a few times per operation; a whole-file rewrite is
//! simple, crash-safe and readable with `cat`. Chain files stay the source
//! of truth for data.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Status of a snapshot, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapStatus {
    Creating,
    Available,
    Deleting,
    Error,
    ErrorDeleting,
}

impl SnapStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            SnapStatus::Creating => "creating",
            SnapStatus::Available => "available",
            SnapStatus::Deleting => "deleting",
            SnapStatus::Error => "error",
            SnapStatus::ErrorDeleting => "error_deleting",
        }
    }
}

/// A snapshot record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub id: Uuid,
    pub volume_id: String,
    /// The tenant that created it; `None` (adopted from a chain file):
    /// whoever sees the volume sees it.
    #[serde(default)]
    pub tenant: Option<String>,
    pub status: SnapStatus,
    pub display_name: String,
    pub display_description: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_us: i64,
    /// Last change of the record (0: never changed since it was made).
    #[serde(default)]
    pub updated_us: i64,
    /// Volume size in bytes when the snapshot was requested.
    pub size_bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub changed_bytes: u64,
    #[serde(default)]
    pub stored_bytes: u64,
    #[serde(default)]
    pub freeze_ms: f64,
    /// Taken by the volume's schedule: the time of that run (the
    /// scheduler's clock, microseconds since the epoch); `None` for a
    /// snapshot made through the API. Only scheduled snapshots are pruned
    /// by the keep rules (unless the config says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_us: Option<i64>,
}

/// What a volume is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeKind {
    /// From the config file; cannot be deleted through the API.
    Configured,
    /// Made by the daemon: an image file in the state directory on a loop device.
    Made {
        image: PathBuf,
        #[serde(default)]
        device: Option<PathBuf>,
        #[serde(default)]
        snapshot_id: Option<Uuid>,
    },
}

/// Status of a made volume (configured ones are computed live).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolStatus {
    Creating,
    Available,
    Deleting,
    Error,
    ErrorDeleting,
}

impl VolStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            VolStatus::Creating => "creating",
            VolStatus::Available => "available",
            VolStatus::Deleting => "deleting",
            VolStatus::Error => "error",
            VolStatus::ErrorDeleting => "error_deleting",
        }
    }
}

/// A volume record: made volumes, and what the API changed of configured ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub id: String,
    pub kind: VolumeKind,
    /// Owner; `None` for a configured volume every tenant sees.
    #[serde(default)]
    pub tenant: Option<String>,
    pub status: VolStatus,
    pub display_name: String,
    pub display_description: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_us: i64,
    /// Last change of the record (0: never changed since it was made).
    #[serde(default)]
    pub updated_us: i64,
    pub size_bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// Everything the daemon remembers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub snapshots: BTreeMap<Uuid, SnapshotRecord>,
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalog {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the catalog {path} is not valid ({detail}); move it aside to rebuild it from the chain files")]
    Parse { path: PathBuf, detail: String },
    #[error("cannot write the catalog {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CatalogError::Parse {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Catalog::default()),
            Err(source) => Err(CatalogError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), CatalogError> {
        let bytes = serde_json::to_vec_pretty(self).expect("catalog serialises");
        crate::util::write_atomic(path, &bytes).map_err(|source| CatalogError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("catalog.json");
        assert_eq!(Catalog::load(&p).unwrap(), Catalog::default());
        let mut c = Catalog::default();
        let id = Uuid::new_v4();
        c.snapshots.insert(
            id,
            SnapshotRecord {
                id,
                volume_id: "vol".into(),
                tenant: Some("t".into()),
                status: SnapStatus::Available,
                display_name: "n".into(),
                display_description: String::new(),
                metadata: BTreeMap::new(),
                created_us: 1,
                updated_us: 0,
                size_bytes: 2,
                error: None,
                changed_bytes: 0,
                stored_bytes: 0,
                freeze_ms: 0.0,
                scheduled_us: None,
            },
        );
        c.save(&p).unwrap();
        assert_eq!(Catalog::load(&p).unwrap(), c);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(Catalog::load(&p), Err(CatalogError::Parse { .. })));
    }
}
