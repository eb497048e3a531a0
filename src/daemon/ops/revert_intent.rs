//! The durable mark of a revert in progress: the reserved metadata item
//! `blocksnap:reverting_to` = the snapshot id, on the volume's record. It is
//! saved through the catalog (with everything else the catalog keeps
//! durably) before the revert's first write and removed when the revert
//! ends, so a restart knows the device may be partly reverted. Views show
//! it with the rest of the `blocksnap:` items.

use uuid::Uuid;

use crate::daemon::catalog::VolumeRecord;

/// The metadata key.
pub const KEY: &str = "blocksnap:reverting_to";

/// The snapshot a started revert is making the volume hold.
pub fn get(r: &VolumeRecord) -> Option<Uuid> {
    r.metadata.get(KEY).and_then(|v| Uuid::parse_str(v).ok())
}

pub fn set(r: &mut VolumeRecord, snapshot: Uuid) {
    r.metadata.insert(KEY.to_string(), snapshot.to_string());
}

pub fn clear(r: &mut VolumeRecord) {
    r.metadata.remove(KEY);
}
