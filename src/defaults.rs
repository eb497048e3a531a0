//! Every default and limit in one place. The config file, the CLI, the
//! quiesce layer and the daemon all read them from here; config/blocksnap.toml
//! documents the ones an operator can change.

use std::time::Duration;

use crate::quiesce::Mode;

/// How long a filesystem may stay frozen for one snapshot (`max_freeze_seconds`).
pub const MAX_FREEZE_SECONDS: u64 = 60;
pub const MAX_FREEZE: Duration = Duration::from_secs(MAX_FREEZE_SECONDS);

/// One gigabyte as the API counts volume sizes.
pub const GB: u64 = 1 << 30;

/// Volumes the daemon makes from snapshots (or blank) are snapshotted like
/// configured volumes with these settings.
pub mod made_volume {
    use super::*;
    pub const QUIESCE: Mode = Mode::Auto;
    pub const MAX_FREEZE: Duration = super::MAX_FREEZE;
    /// `None`: the chain's default block size.
    pub const BLOCK_SIZE: Option<u32> = None;
    /// Largest size the API accepts for a volume, in GB.
    pub const MAX_GB: u64 = 65536;
}

/// `max_made_volumes`: each made volume is a loop device and an image file.
pub const MAX_MADE_VOLUMES: usize = 64;
/// `max_connections`.
pub const MAX_CONNECTIONS: usize = 1024;
/// `request_timeout_seconds`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping daemon waits for running operations.
pub const STOP_WAIT: Duration = Duration::from_secs(60);

/// Names, descriptions, metadata keys and values: Cinder's column size.
pub const MAX_TEXT: usize = 255;
/// Metadata items per snapshot or volume (reserved `blocksnap:` keys the
/// daemon sets itself do not count). Cinder bounds metadata through its
/// `metadata_items` quota; 128 is that quota's usual default.
pub const MAX_METADATA_ITEMS: usize = 128;
/// Largest and default page of a list.
pub const LIST_LIMIT: usize = 1000;
/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;
