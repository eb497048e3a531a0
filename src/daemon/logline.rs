//! The message text of the daemon's operation outcome lines.
//!
//! Under journald, `journalctl -u blocksnapd` shows only a line's message;
//! the structured fields (VOLUME=, CHANGED_BYTES=, ...) are stored but hidden
//! unless asked for. So each outcome line carries its values in the message
//! itself, in one fixed shape: `WHAT OUTCOME: volume V, snapshot S, ...`.
//! Call sites keep their structured fields as well.

use std::fmt::Display;
use std::time::Duration;

use crate::util::human_bytes;

/// `67108864 B (64.0 MiB)`; small values without the repeat.
fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{n} B ({})", human_bytes(n))
    }
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A snapshot was committed.
pub fn snapshot_available(
    volume: impl Display,
    snapshot: impl Display,
    changed_bytes: u64,
    stored_bytes: u64,
    freeze: Duration,
    duration: Duration,
    quiesce: impl Display,
) -> String {
    format!(
        "snapshot available: volume {volume}, snapshot {snapshot}, changed {}, stored {}, \
         freeze window {} ({quiesce}), duration {}",
        bytes(changed_bytes),
        bytes(stored_bytes),
        millis(freeze),
        seconds(duration)
    )
}

/// A snapshot failed; `cause` is the whole error chain.
pub fn snapshot_failed(volume: impl Display, snapshot: impl Display, cause: &str) -> String {
    format!("snapshot failed: volume {volume}, snapshot {snapshot}: {cause}")
}

/// A snapshot was requested through the API.
pub fn snapshot_requested(
    volume: impl Display,
    snapshot: impl Display,
    force: bool,
    full: bool,
) -> String {
    let forced = if force { ", forced" } else { "" };
    let full = if full { ", full" } else { "" };
    format!("snapshot requested: volume {volume}, snapshot {snapshot}{forced}{full}")
}

/// A snapshot was deleted (merged into the next one where needed).
pub fn snapshot_deleted(
    volume: impl Display,
    snapshot: impl Display,
    merged_blocks: u64,
    released_bytes: u64,
) -> String {
    format!(
        "snapshot deleted: volume {volume}, snapshot {snapshot}, merged {merged_blocks} block(s) \
         into the next snapshot, released {}",
        bytes(released_bytes)
    )
}

/// Deleting a snapshot failed.
pub fn snapshot_delete_failed(volume: impl Display, snapshot: impl Display, cause: &str) -> String {
    format!("snapshot delete failed: volume {volume}, snapshot {snapshot}: {cause}")
}

/// A volume was requested through the API (from a snapshot, or blank).
pub fn volume_requested(
    volume: impl Display,
    snapshot: Option<impl Display>,
    size_bytes: u64,
) -> String {
    match snapshot {
        Some(s) => format!(
            "volume requested: volume {volume}, from snapshot {s}, size {}",
            bytes(size_bytes)
        ),
        None => format!(
            "volume requested: volume {volume}, blank, size {}",
            bytes(size_bytes)
        ),
    }
}

/// A volume the daemon made is attached and usable.
pub fn volume_available(volume: impl Display, device: impl Display, size_bytes: u64) -> String {
    format!(
        "volume available: volume {volume}, device {device}, size {}",
        bytes(size_bytes)
    )
}

/// Making a volume failed.
pub fn volume_failed(volume: impl Display, cause: &str) -> String {
    format!("volume creation failed: volume {volume}: {cause}")
}

/// A made volume was deleted.
pub fn volume_deleted(volume: impl Display) -> String {
    format!("volume deleted: volume {volume}")
}

/// Deleting a made volume failed.
pub fn volume_delete_failed(volume: impl Display, cause: &str) -> String {
    format!("volume delete failed: volume {volume}: {cause}")
}

/// A revert was requested through the API.
pub fn revert_requested(volume: impl Display, snapshot: impl Display) -> String {
    format!("revert requested: volume {volume}, to snapshot {snapshot}")
}

/// A volume was reverted to a snapshot.
pub fn volume_reverted(
    volume: impl Display,
    snapshot: impl Display,
    blocks_checked: u64,
    blocks_written: u64,
    duration: Duration,
) -> String {
    format!(
        "volume reverted: volume {volume}, to snapshot {snapshot}, checked {blocks_checked} \
         block(s), wrote {blocks_written} block(s), duration {}",
        seconds(duration)
    )
}

/// A revert failed.
pub fn revert_failed(volume: impl Display, snapshot: impl Display, cause: &str) -> String {
    format!("revert failed: volume {volume}, to snapshot {snapshot}: {cause}")
}

/// A backup was requested through the API.
pub fn backup_requested(
    volume: impl Display,
    backup: impl Display,
    snapshot: impl Display,
    remote: impl Display,
) -> String {
    format!(
        "backup requested: volume {volume}, backup {backup}, snapshot {snapshot}, remote {remote}"
    )
}

/// A backup is complete on its remote.
pub fn backup_available(
    volume: impl Display,
    backup: impl Display,
    changed_bytes: u64,
    sent_bytes: u64,
) -> String {
    format!(
        "backup available: volume {volume}, backup {backup}, changed {}, sent {}",
        bytes(changed_bytes),
        bytes(sent_bytes)
    )
}

/// A backup failed; `cause` is the whole error chain.
pub fn backup_failed(volume: impl Display, backup: impl Display, cause: &str) -> String {
    format!("backup failed: volume {volume}, backup {backup}: {cause}")
}

/// A restore of a backup into a new volume was requested.
pub fn backup_restore_requested(backup: impl Display, volume: impl Display) -> String {
    format!("backup restore requested: backup {backup}, new volume {volume}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_line_carries_every_value() {
        let l = snapshot_available(
            "vol",
            "7793e0f4-8544-4923-a210-c49436e20a06",
            67_108_864,
            348_160,
            Duration::from_micros(117_714),
            Duration::from_millis(250),
            "froze the filesystem at /mnt/vol",
        );
        assert_eq!(
            l,
            "snapshot available: volume vol, snapshot 7793e0f4-8544-4923-a210-c49436e20a06, \
             changed 67108864 B (64.0 MiB), stored 348160 B (340.0 KiB), freeze window 117.7 ms \
             (froze the filesystem at /mnt/vol), duration 0.25 s"
        );
    }

    #[test]
    fn other_outcomes_name_volume_and_snapshot() {
        assert_eq!(
            snapshot_deleted("vol", "s1", 3, 12288),
            "snapshot deleted: volume vol, snapshot s1, merged 3 block(s) into the next \
             snapshot, released 12288 B (12.0 KiB)"
        );
        assert_eq!(
            volume_available("v2", "/dev/loop3", 1 << 30),
            "volume available: volume v2, device /dev/loop3, size 1073741824 B (1.0 GiB)"
        );
        assert_eq!(
            volume_reverted("vol", "s1", 256, 4, Duration::from_millis(1500)),
            "volume reverted: volume vol, to snapshot s1, checked 256 block(s), wrote 4 \
             block(s), duration 1.50 s"
        );
        assert_eq!(
            snapshot_failed("vol", "s1", "cannot freeze: busy"),
            "snapshot failed: volume vol, snapshot s1: cannot freeze: busy"
        );
        assert_eq!(
            volume_requested("v2", None::<&str>, 512),
            "volume requested: volume v2, blank, size 512 B"
        );
    }
}
