//! The operations: every rule of the daemon, between the HTTP views and the
//! engine.
//!
//! An operation takes a [`Caller`] and a typed request, checks it, claims
//! what it will read or write, records its start durably, hands the work to
//! a background job when there is any, and returns a domain result
//! ([`Snapshot`], [`Volume`], metadata) or an [`OpError`]. Views (`api`)
//! parse requests into these types and render results and errors; they hold
//! no rules. A new operation is a new method here (and a job in `jobs` if
//! it runs in the background); a new API version is a new view over the
//! same methods.
//!
//! Every method blocks (catalog and device I/O): views call them on the
//! blocking pool.

pub mod backups;
pub mod jobs;
pub mod revert_intent;
mod snapshots;
mod volumes;

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::catalog::{SnapStatus, SnapshotRecord, VolStatus};
use super::claims::{Conflict, Resource};
use super::store::{Page, StoreError};
use super::{Daemon, VolumeInfo};
use crate::defaults::{MAX_METADATA_ITEMS, MAX_TEXT};

pub use backups::{Backup, BackupFilter, CreateBackup, RestoreBackup, Restored};
pub use snapshots::{CreateSnapshot, SnapshotFilter, UpdateSnapshot};
pub use volumes::{gb, CreateVolume, RevertVolume, UpdateVolume, VolumeFilter};

/// Who asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
}

impl Caller {
    pub fn new(tenant: impl Into<String>) -> Caller {
        Caller {
            tenant: tenant.into(),
        }
    }
}

/// The operations of one daemon.
#[derive(Clone, Debug)]
pub struct Ops {
    d: Arc<Daemon>,
}

impl Ops {
    pub fn new(d: Arc<Daemon>) -> Ops {
        Ops { d }
    }
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.d
    }
}

/// A snapshot as an operation returns it: its record, live progress, and
/// how it was taken.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub record: SnapshotRecord,
    /// Percent done while it is being taken.
    pub progress: Option<f64>,
    /// How an available snapshot was taken (from its chain).
    pub take: Option<crate::chain::format::TakeRecord>,
}

/// What a volume is doing, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeStatus {
    Creating,
    Available,
    InUse,
    Deleting,
    Reverting,
    Error,
    ErrorDeleting,
}

impl VolumeStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            VolumeStatus::Creating => "creating",
            VolumeStatus::Available => "available",
            VolumeStatus::InUse => "in-use",
            VolumeStatus::Deleting => "deleting",
            VolumeStatus::Reverting => "reverting",
            VolumeStatus::Error => "error",
            VolumeStatus::ErrorDeleting => "error_deleting",
        }
    }

    fn from_claim(s: &str) -> Option<VolumeStatus> {
        Some(match s {
            "creating" => VolumeStatus::Creating,
            "deleting" => VolumeStatus::Deleting,
            "reverting" => VolumeStatus::Reverting,
            _ => return None,
        })
    }
}

/// A volume as an operation returns it: config, record and live state.
#[derive(Clone, Debug)]
pub struct Volume {
    pub info: VolumeInfo,
    pub status: VolumeStatus,
    /// The device's size now, or the recorded size.
    pub size_bytes: u64,
    /// Percent done of a revert running on it.
    pub progress: Option<f64>,
}

/// A change to a snapshot's or volume's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetadataChange {
    /// Add or replace these items.
    Merge(BTreeMap<String, String>),
    /// Make the metadata exactly this.
    Replace(BTreeMap<String, String>),
    /// Set one item.
    Set { key: String, value: String },
    /// Remove one item (it must be there).
    Delete(String),
}

/// A field of a request, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Name,
    Description,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Field::Name => "display_name",
            Field::Description => "display_description",
        })
    }
}

/// Which kind of thing a refusal is about (Cinder's "Invalid volume: ..."
/// or "Invalid snapshot: ...").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum About {
    Volume,
    Snapshot,
    Backup,
}

impl std::fmt::Display for About {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            About::Volume => "Invalid volume",
            About::Snapshot => "Invalid snapshot",
            About::Backup => "Invalid backup",
        })
    }
}

/// Why an operation refused or failed. The views map each variant to an
/// HTTP status and error name in one place (`api::errors`); the messages
/// are Cinder's where Cinder has one.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    // ---- not found (404)
    #[error("Snapshot {0} could not be found.")]
    SnapshotNotFound(String),
    #[error("Volume {0} could not be found.")]
    VolumeNotFound(String),
    /// The snapshot a volume is to be made from.
    #[error("snapshot id:{0} not found")]
    SourceSnapshotNotFound(String),
    #[error("Metadata item was not found")]
    MetadataItemNotFound,
    #[error("The resource could not be found.")]
    NotFound,
    #[error("Backup {0} could not be found.")]
    BackupNotFound(String),

    // ---- bad input (400)
    #[error("Invalid input received: {field} is longer than {MAX_TEXT} characters")]
    TooLong { field: Field },
    #[error("Invalid metadata: Metadata property key blank.")]
    MetadataKeyBlank,
    #[error("Invalid input received: metadata keys starting with blocksnap: are reserved")]
    ReservedMetadataKey,
    #[error("Invalid input received: size must be a whole number of GB from 1 to {max}")]
    BadSize { max: u64 },
    #[error("Invalid input received: a volume needs a snapshot_id or a size")]
    NoSource,
    #[error("Invalid input received: Volume size {want}GB cannot be smaller than the snapshot size {snapshot}GB. They must be >= original snapshot size.")]
    SmallerThanSnapshot { want: u64, snapshot: u64 },
    #[error("Invalid input received: Volume size {want}GB cannot be smaller than the backup size {backup}GB. It must be >= backup size.")]
    SmallerThanBackup { want: u64, backup: u64 },
    #[error("Invalid input received: backup_id cannot be combined with snapshot_id, source_volid or imageRef")]
    BackupSourceCombined,
    #[error(
        "Invalid input received: snapshot_id cannot be combined with source_volid or imageRef"
    )]
    SourcesCombined,
    #[error("Invalid input received: blocksnap creates volumes from snapshots (snapshot_id) or blank (size); cloning volumes and images is not supported")]
    CloneUnsupported,
    #[error("the list marker {0} names no item of this list")]
    BadMarker(String),
    #[error("Invalid input received: blocksnap restores a backup into a new volume; omit volume_id (restoring onto an existing volume is not supported)")]
    RestoreOntoVolume,

    // ---- refused in this state (400)
    #[error("Invalid snapshot: Originating snapshot status must be one of available values")]
    SourceSnapshotNotAvailable,
    #[error("Invalid snapshot: Snapshot status must be available")]
    RevertSnapshotNotAvailable,
    #[error("Invalid snapshot: Volume Snapshot status must be available or error")]
    SnapshotNotDeletable,
    #[error("Invalid snapshot: snapshot {snapshot} belongs to volume {owner}, not {volume}")]
    SnapshotOfOtherVolume {
        snapshot: Uuid,
        owner: String,
        volume: String,
    },
    #[error("Invalid volume: must be available")]
    VolumeNotAvailable,
    #[error("Invalid volume: the device of volume {0} cannot be read")]
    DeviceUnreadable(String),
    #[error("Invalid volume: volume {id} is configured in {config}; it can only be removed there")]
    VolumeConfigured { id: String, config: String },
    #[error("Invalid volume: Volume still has {0} dependent snapshots")]
    DependentSnapshots(usize),
    #[error("Invalid volume: Volume status must be available or error")]
    VolumeNotDeletable,
    #[error("Invalid volume: the volume is in use (mounted); unmount it first")]
    VolumeMounted,
    #[error("Invalid volume: the volume is mounted; unmount it to revert it (its filesystem would be overwritten under the mount)")]
    MountedForRevert,
    /// A revert is refused when the volume's size is not the snapshot's
    /// (as Cinder does): it would leave the newer data past the snapshot's
    /// end, or cannot hold the snapshot.
    #[error("Invalid volume: volume {volume} is {volume_bytes} bytes but snapshot {snapshot} is {snapshot_bytes} bytes; a volume is reverted only to a snapshot of its current size (make a new volume from the snapshot instead)")]
    RevertSizeDiffers {
        volume: String,
        snapshot: Uuid,
        volume_bytes: u64,
        snapshot_bytes: u64,
    },
    /// The device shrank since the newest snapshot: only a full snapshot
    /// can be taken.
    #[error("Invalid volume: the device of volume {volume} shrank from {was} to {now} bytes since snapshot {snapshot}; take a full snapshot to start the chain over: \"full\": true in the snapshot request, or blocksnap snapshot create VOLUME --full")]
    DeviceShrank {
        volume: String,
        snapshot: Uuid,
        was: u64,
        now: u64,
    },
    #[error("Invalid volume: volume {0} has no backup_remote in blocksnapd's configuration; add one naming a [[remotes]] entry to back it up")]
    NoBackupRemote(String),
    #[error("Invalid backup: the remote {0} of this backup is no longer configured")]
    RemoteGone(String),
    #[error("Invalid backup: No backups available to do an incremental backup.")]
    NoPreviousBackup,
    #[error("Invalid snapshot: Snapshot status must be available")]
    BackupSnapshotNotAvailable,
    #[error("Invalid backup: Backup status must be available")]
    BackupNotAvailable,
    #[error("Invalid backup: Backup status must be available or error")]
    BackupNotDeletable,
    /// The backup a volume is to be made from (Cinder's create flow).
    #[error("Invalid backup: Originating backup status must be one of 'available' values")]
    SourceBackupNotAvailable,
    /// Something running holds what this operation needs.
    #[error("{about}: {conflict}; try again when it has finished")]
    InUse { about: About, conflict: Conflict },

    // ---- over a limit (413)
    #[error("Invalid metadata size: Metadata property key greater than {MAX_TEXT} characters.")]
    MetadataKeyTooLong,
    #[error("Invalid metadata size: Metadata property value greater than {MAX_TEXT} characters.")]
    MetadataValueTooLong,
    #[error("Maximum number of metadata items exceeds {MAX_METADATA_ITEMS}")]
    TooManyMetadataItems,
    #[error(
        "VolumeLimitExceeded: Maximum number of volumes allowed ({0}) exceeded (max_made_volumes)"
    )]
    VolumeLimit(usize),

    /// The filesystem holding the made volumes' images cannot hold a file
    /// of the size asked for (Cinder's VolumeSizeExceedsLimit).
    #[error("VolumeSizeExceedsLimit: Requested volume size {size_gb}G is larger than maximum allowed limit {max_gb}G: the filesystem holding the daemon's volume images cannot make a file of {size_bytes} bytes (at most {max_bytes})")]
    VolumeTooLarge {
        size_gb: u64,
        size_bytes: u64,
        max_gb: u64,
        max_bytes: u64,
    },
    /// Writing a volume's data needs more space than is free.
    #[error("Insufficient free space for volume creation: snapshot {snapshot} has {need} bytes of data to write, the filesystem holding the daemon's volume images has {free} bytes free")]
    NoRoom {
        snapshot: Uuid,
        need: u64,
        free: u64,
    },

    // ---- the daemon's fault (500)
    #[error("the catalog could not be read or changed; nothing was done")]
    Store(#[from] StoreError),
    #[error("the backup book could not be changed; nothing was done")]
    Book(#[from] crate::daemon::backups::BookError),
}

impl OpError {
    fn in_use(about: About) -> impl FnOnce(Conflict) -> OpError {
        move |conflict| OpError::InUse { about, conflict }
    }
}

/// An id from a request, cleaned for a message: no control characters, at
/// most 64 characters.
pub fn clean_id(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Names and descriptions: Cinder's limit.
pub(crate) fn check_text(field: Field, v: Option<&str>) -> Result<(), OpError> {
    match v {
        Some(s) if s.chars().count() > MAX_TEXT => Err(OpError::TooLong { field }),
        _ => Ok(()),
    }
}

/// Metadata items as given: keys of 1 to 255 characters, values of at most
/// 255 (Cinder: a blank key is 400, a long key or value 413).
pub(crate) fn check_items(m: &BTreeMap<String, String>) -> Result<(), OpError> {
    for (k, v) in m {
        if k.is_empty() {
            return Err(OpError::MetadataKeyBlank);
        }
        if k.chars().count() > MAX_TEXT {
            return Err(OpError::MetadataKeyTooLong);
        }
        if v.chars().count() > MAX_TEXT {
            return Err(OpError::MetadataValueTooLong);
        }
    }
    Ok(())
}

/// Reserved keys (the daemon's own, `blocksnap:...`) cannot be set.
pub(crate) fn check_unreserved<'a>(
    keys: impl IntoIterator<Item = &'a String>,
) -> Result<(), OpError> {
    if keys.into_iter().any(|k| k.starts_with(RESERVED)) {
        return Err(OpError::ReservedMetadataKey);
    }
    Ok(())
}

/// The prefix of metadata keys the daemon sets itself.
pub const RESERVED: &str = "blocksnap:";

/// Items of a change, less the daemon's own items given back unchanged:
/// clients that replace metadata send back all they read (cinderclient's
/// `metadata unset` from 3.15 reads the metadata, drops the key and PUTs
/// the rest), and that is no attempt to set them.
fn without_unchanged_reserved(
    current: &BTreeMap<String, String>,
    items: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    items
        .iter()
        .filter(|(k, v)| !(k.starts_with(RESERVED) && current.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The metadata a change leaves, checked against the item limit. With
/// `reserved`, the items the daemon set itself (`blocksnap:...`) stay
/// whatever the change, cannot be changed (given back unchanged, they are
/// ignored), and do not count.
pub(crate) fn changed_metadata(
    current: &BTreeMap<String, String>,
    change: &MetadataChange,
    reserved: bool,
) -> Result<BTreeMap<String, String>, OpError> {
    let ours = |k: &String| reserved && k.starts_with(RESERVED);
    let mut m = current.clone();
    match change {
        MetadataChange::Merge(items) => {
            let items = if reserved {
                let items = without_unchanged_reserved(current, items);
                check_unreserved(items.keys())?;
                items
            } else {
                items.clone()
            };
            m.extend(items);
        }
        MetadataChange::Replace(items) => {
            let items = if reserved {
                let items = without_unchanged_reserved(current, items);
                check_unreserved(items.keys())?;
                items
            } else {
                items.clone()
            };
            m.retain(|k, _| ours(k));
            m.extend(items);
        }
        MetadataChange::Set { key, value } => {
            if reserved && !(ours(key) && current.get(key) == Some(value)) {
                check_unreserved([key])?;
            }
            m.insert(key.clone(), value.clone());
        }
        MetadataChange::Delete(key) => {
            if ours(key) || m.remove(key).is_none() {
                return Err(OpError::MetadataItemNotFound);
            }
        }
    }
    if m.keys().filter(|k| !ours(k)).count() > MAX_METADATA_ITEMS {
        return Err(OpError::TooManyMetadataItems);
    }
    Ok(m)
}

/// Check a metadata change's items as given.
pub(crate) fn check_change(change: &MetadataChange) -> Result<(), OpError> {
    match change {
        MetadataChange::Merge(m) | MetadataChange::Replace(m) => check_items(m),
        MetadataChange::Set { key, value } => {
            let m = BTreeMap::from([(key.clone(), value.clone())]);
            check_items(&m)
        }
        MetadataChange::Delete(_) => Ok(()),
    }
}

impl Ops {
    /// A volume the caller may see.
    pub fn find_volume(&self, c: &Caller, id: &str) -> Result<VolumeInfo, OpError> {
        let not_found = || OpError::VolumeNotFound(clean_id(id));
        if !crate::config::valid_name(id) {
            return Err(not_found());
        }
        self.d
            .volume(id)?
            .filter(|v| v.visible_to(&c.tenant))
            .ok_or_else(not_found)
    }

    /// Whether the caller may see a snapshot record.
    fn sees(&self, c: &Caller, r: &SnapshotRecord) -> Result<bool, OpError> {
        Ok(match &r.tenant {
            Some(t) => t == &c.tenant,
            None => self
                .d
                .volume(&r.volume_id)?
                .is_some_and(|v| v.visible_to(&c.tenant)),
        })
    }

    /// A snapshot record the caller may see; `id` as given in a request.
    pub(crate) fn find_snapshot_record(
        &self,
        c: &Caller,
        id: &str,
    ) -> Result<SnapshotRecord, OpError> {
        let uid = Uuid::parse_str(id).map_err(|_| OpError::SnapshotNotFound(clean_id(id)))?;
        match self.d.store().snapshot(uid)? {
            Some(r) if self.sees(c, &r)? => Ok(r),
            _ => Err(OpError::SnapshotNotFound(uid.to_string())),
        }
    }

    fn snapshot_of(&self, record: SnapshotRecord) -> Snapshot {
        let progress = match record.status {
            SnapStatus::Creating => self
                .d
                .progress_of(&record.id.to_string())
                .map(|p| p.percent()),
            _ => None,
        };
        let take = match record.status {
            SnapStatus::Available => self
                .d
                .engine
                .take_record(&self.d.chain_path(&record.volume_id), record.id),
            _ => None,
        };
        Snapshot {
            record,
            progress,
            take,
        }
    }

    /// A volume's live state.
    pub(crate) fn volume_of(&self, info: VolumeInfo) -> Volume {
        let d = &self.d;
        let claimed = d
            .claims
            .status_of(&Resource::Volume(info.id.clone()))
            .and_then(VolumeStatus::from_claim);
        let r = &info.record;
        let status = if let Some(s) = claimed {
            s
        } else if revert_intent::get(r).is_some() {
            VolumeStatus::Reverting
        } else if r.status != VolStatus::Available {
            match r.status {
                VolStatus::Creating => VolumeStatus::Creating,
                VolStatus::Deleting => VolumeStatus::Deleting,
                VolStatus::ErrorDeleting => VolumeStatus::ErrorDeleting,
                _ => VolumeStatus::Error,
            }
        } else {
            match &info.device {
                Some(dev) if d.engine.device_exists(dev) => {
                    if d.mounted(&info) == Some(true) {
                        VolumeStatus::InUse
                    } else {
                        VolumeStatus::Available
                    }
                }
                _ => VolumeStatus::Error,
            }
        };
        let size_bytes = d.device_size(&info).unwrap_or(r.size_bytes);
        let progress = d.progress_of(&info.id).map(|p| p.percent());
        Volume {
            info,
            status,
            size_bytes,
            progress,
        }
    }

    /// Ids of the volumes the caller may see (for metrics).
    pub fn visible_volume_ids(&self, c: &Caller) -> Result<Vec<String>, OpError> {
        Ok(self
            .d
            .volumes()?
            .into_iter()
            .filter(|v| v.visible_to(&c.tenant))
            .map(|v| v.id)
            .collect())
    }
}

/// A page of a list as the views ask for it.
pub fn page(offset: usize, limit: usize) -> Page {
    Page {
        offset,
        limit,
        ..Page::default()
    }
}

#[cfg(test)]
mod metadata_tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn reserved_items_given_back_unchanged_are_no_change() {
        let current = m(&[("blocksnap:device", "/dev/loop7"), ("role", "copy")]);
        // cinderclient 9's `metadata VOL unset role`: GET, drop, PUT the rest.
        let after = changed_metadata(
            &current,
            &MetadataChange::Replace(m(&[("blocksnap:device", "/dev/loop7")])),
            true,
        )
        .unwrap();
        assert_eq!(after, m(&[("blocksnap:device", "/dev/loop7")]));
        let after = changed_metadata(
            &current,
            &MetadataChange::Merge(m(&[("blocksnap:device", "/dev/loop7"), ("a", "1")])),
            true,
        )
        .unwrap();
        assert_eq!(after.get("a").map(String::as_str), Some("1"));
        let same = MetadataChange::Set {
            key: "blocksnap:device".into(),
            value: "/dev/loop7".into(),
        };
        assert_eq!(changed_metadata(&current, &same, true).unwrap(), current);
        // Changing or adding one is still refused.
        for change in [
            MetadataChange::Replace(m(&[("blocksnap:device", "/dev/sda")])),
            MetadataChange::Merge(m(&[("blocksnap:new", "x")])),
            MetadataChange::Set {
                key: "blocksnap:device".into(),
                value: "/dev/sda".into(),
            },
        ] {
            assert!(
                matches!(
                    changed_metadata(&current, &change, true),
                    Err(OpError::ReservedMetadataKey)
                ),
                "{change:?}"
            );
        }
    }
}
