//! The background halves of the operations. Each job gets everything it
//! needs from its request (it never reads its inputs back from the
//! catalog), runs on its own thread holding its claim, and records its
//! outcome through the catalog before the claim is released.

use std::path::PathBuf;

use uuid::Uuid;

use super::revert_intent;
use crate::daemon::backups::BackupStatus;
use crate::daemon::catalog::{SnapStatus, VolStatus, VolumeKind};
use crate::daemon::engine::{EngineError, TakeJob};
use crate::daemon::store::{Change, StoreError};
use crate::daemon::{logline, Daemon, JobClaim};
use crate::take::TakeError;
use crate::util::error_chain;

/// What a job works on: names its thread and its log lines, and says which
/// record to mark when it panics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Take { volume: String, snapshot: Uuid },
    DeleteSnapshot { volume: String, snapshot: Uuid },
    MakeVolume { volume: String },
    DeleteVolume { volume: String },
    Revert { volume: String, snapshot: Uuid },
    Backup { volume: String, backup: Uuid },
    DeleteBackup { volume: String, backup: Uuid },
    RestoreBackup { volume: String, backup: Uuid },
}

impl Subject {
    pub(crate) fn thread_name(&self) -> String {
        match self {
            Subject::Take { .. } => "bs-take",
            Subject::DeleteSnapshot { .. } => "bs-delete-snap",
            Subject::MakeVolume { .. } => "bs-make-volume",
            Subject::DeleteVolume { .. } => "bs-delete-vol",
            Subject::Revert { .. } => "bs-revert",
            Subject::Backup { .. } => "bs-backup",
            Subject::DeleteBackup { .. } => "bs-delete-backup",
            Subject::RestoreBackup { .. } => "bs-restore-backup",
        }
        .to_string()
    }

    /// The job panicked: log it, count it, and mark its record error
    /// (releasing its claim with that change).
    pub(crate) fn panicked(&self, d: &Daemon, panic: &str, job: &JobClaim) {
        tracing::error!(job = ?self, "a job panicked: {panic}");
        d.metrics.job_panicked();
        self.fail(d, &format!("internal error: {panic}; see the log"), job);
    }

    /// The job could not be started at all (its claim is gone with it).
    pub(crate) fn not_started(&self, d: &Daemon, why: &str) {
        tracing::error!(job = ?self, "cannot start a job thread: {why}");
        let none = JobClaim::none();
        self.fail(
            d,
            &format!("internal error: cannot start the job: {why}"),
            &none,
        );
    }

    fn fail(&self, d: &Daemon, text: &str, job: &JobClaim) {
        let r = match self {
            Subject::Take { snapshot, .. } => {
                fail_snapshot(d, job, *snapshot, SnapStatus::Error, text)
            }
            Subject::DeleteSnapshot { snapshot, .. } => {
                fail_snapshot(d, job, *snapshot, SnapStatus::ErrorDeleting, text)
            }
            Subject::MakeVolume { volume } => fail_volume(d, job, volume, VolStatus::Error, text),
            Subject::DeleteVolume { volume } => {
                fail_volume(d, job, volume, VolStatus::ErrorDeleting, text)
            }
            Subject::Revert { volume, snapshot } => d
                .finish_volume(job, volume, |r| {
                    revert_intent::clear(r);
                    r.status = VolStatus::Error;
                    r.error = Some(partly_reverted(*snapshot, text));
                })
                .map(drop),
            Subject::Backup { backup, .. } => {
                super::backups::fail(d, job, *backup, BackupStatus::Error, text);
                Ok(())
            }
            Subject::DeleteBackup { backup, .. } => {
                super::backups::fail(d, job, *backup, BackupStatus::ErrorDeleting, text);
                Ok(())
            }
            Subject::RestoreBackup { volume, .. } => {
                fail_volume(d, job, volume, VolStatus::Error, text)
            }
        };
        if let Err(e) = r {
            tracing::error!(job = ?self, "cannot record that the job failed: {}", error_chain(&e));
        }
    }
}

/// The message of a volume a revert left half done.
pub(crate) fn partly_reverted(snapshot: Uuid, why: &str) -> String {
    format!("partly reverted to {snapshot}; revert again ({why})")
}

fn fail_snapshot(
    d: &Daemon,
    job: &JobClaim,
    id: Uuid,
    status: SnapStatus,
    text: &str,
) -> Result<(), StoreError> {
    d.finish_snapshot(job, id, |r| {
        r.status = status;
        r.error = Some(text.to_string());
    })
    .map(drop)
}

fn fail_volume(
    d: &Daemon,
    job: &JobClaim,
    id: &str,
    status: VolStatus,
    text: &str,
) -> Result<(), StoreError> {
    d.finish_volume(job, id, |r| {
        r.status = status;
        r.error = Some(text.to_string());
    })
    .map(drop)
}

/// A job's outcome could not be saved: the restart's reconcile settles it.
fn unrecorded(what: &str, e: StoreError) {
    tracing::error!(
        "cannot record the outcome of {what}: {}; the next start settles it",
        error_chain(&e)
    );
}

/// Take a snapshot, then record it available or error.
pub(crate) fn take(d: &Daemon, claim: &JobClaim, job: TakeJob) {
    let id = job.snapshot_id;
    let shown = d.track_progress(&id.to_string());
    let result = d.engine.take(&job, &shown.progress, &d.shutdown);
    crate::fault::point(crate::fault::Point::BeforeCatalog);
    let r = match result {
        Ok(out) => {
            tracing::info!(
                volume = %job.volume,
                snapshot = %id,
                changed_bytes = out.changed_bytes,
                stored_bytes = out.stored_bytes,
                freeze_ms = out.freeze.as_secs_f64() * 1000.0,
                duration_ms = out.duration.as_secs_f64() * 1000.0,
                taken = out.record.method.as_str(),
                full_scan_reason = out.record.reason.as_str(),
                rounds = out.record.rounds,
                quiesced_blocks = out.record.quiesced_blocks,
                tracked_blocks = out.record.tracked_blocks,
                quiesce = %out.quiesce,
                full = job.full,
                "{}",
                logline::snapshot_available(
                    &job.volume,
                    id,
                    out.changed_bytes,
                    out.stored_bytes,
                    out.freeze,
                    out.duration,
                    &out.quiesce
                )
            );
            d.metrics.snapshot_ok(&job.volume, &out);
            d.finish_snapshot(claim, id, |r| {
                r.status = SnapStatus::Available;
                r.changed_bytes = out.changed_bytes;
                r.stored_bytes = out.stored_bytes;
                r.freeze_ms = out.freeze.as_secs_f64() * 1000.0;
                r.size_bytes = out.device_size;
                r.error = None;
            })
        }
        Err(e) => {
            let msg = take_failure(&job.volume, &e);
            tracing::error!(volume = %job.volume, snapshot = %id, "{}", logline::snapshot_failed(&job.volume, id, &msg));
            d.metrics.snapshot_failed(&job.volume);
            d.finish_snapshot(claim, id, |r| {
                r.status = SnapStatus::Error;
                r.error = Some(msg);
            })
        }
    };
    if let Err(e) = r {
        unrecorded(&format!("snapshot {id}"), e);
    }
}

/// The record's text for a failed take.
fn take_failure(volume: &str, e: &EngineError) -> String {
    if let EngineError::Take(TakeError::Shrunk {
        was, now, newest, ..
    }) = e
    {
        // What to do, through the daemon (the take's own message names
        // the command line of `blocksnap chain take`).
        return format!(
            "the device of volume {volume} shrank from {was} to {now} bytes since snapshot {newest}; take a full snapshot to start the chain over: \"full\": true in the snapshot request, or blocksnap snapshot create {volume} --full"
        );
    }
    let msg = error_chain(e);
    if e.is_disk_full() {
        format!("the disk holding the chain is full: {msg}")
    } else if e.is_cancelled() {
        "abandoned: blocksnapd is shutting down".to_string()
    } else {
        msg
    }
}

/// What a snapshot delete needs.
#[derive(Clone, Debug)]
pub(crate) struct DeleteSnapshotJob {
    pub volume: String,
    pub chain: PathBuf,
    pub snapshot: Uuid,
}

/// Delete a snapshot from its chain, then forget its record.
pub(crate) fn delete_snapshot(d: &Daemon, claim: &JobClaim, job: DeleteSnapshotJob) {
    let id = job.snapshot;
    let r = match d.engine.delete_snapshot(&job.chain, id) {
        Ok(out) => {
            if let Some(out) = out {
                tracing::info!(volume = %job.volume, snapshot = %id, merged_blocks = out.merged_blocks, released_bytes = out.reclaimed_bytes, "{}", logline::snapshot_deleted(&job.volume, id, out.merged_blocks, out.reclaimed_bytes));
            }
            d.finish_apply(claim, &[Change::RemoveSnapshot(id)])
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!(volume = %job.volume, snapshot = %id, "{}", logline::snapshot_delete_failed(&job.volume, id, &msg));
            d.finish_snapshot(claim, id, |r| {
                r.status = SnapStatus::ErrorDeleting;
                r.error = Some(msg);
            })
            .map(drop)
        }
    };
    if let Err(e) = r {
        unrecorded(&format!("the delete of snapshot {id}"), e);
    }
}

/// What making a volume needs.
#[derive(Clone, Debug)]
pub(crate) struct MakeVolumeJob {
    pub volume: String,
    pub image: PathBuf,
    /// The chain and snapshot to restore; `None` for a blank volume.
    pub from: Option<(PathBuf, Uuid)>,
    pub size_bytes: u64,
}

/// Write a made volume's image, attach it, record it available or error.
pub(crate) fn make_volume(d: &Daemon, claim: &JobClaim, job: MakeVolumeJob) {
    let id = &job.volume;
    let r = d
        .engine
        .make_image(
            job.from.as_ref().map(|(c, s)| (c.as_path(), *s)),
            &job.image,
            job.size_bytes,
        )
        .and_then(|()| {
            crate::fault::point(crate::fault::Point::VolumeAttach);
            d.engine.attach(&job.image)
        });
    let saved = match r {
        Ok(dev) => {
            tracing::info!(volume = %id, device = %dev.display(), size_bytes = job.size_bytes, "{}", logline::volume_available(id, dev.display(), job.size_bytes));
            d.finish_volume(claim, id, |r| {
                r.status = VolStatus::Available;
                r.error = None;
                r.metadata
                    .insert("blocksnap:device".into(), dev.display().to_string());
                if let VolumeKind::Made { device, .. } = &mut r.kind {
                    *device = Some(dev);
                }
            })
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!(volume = %id, "{}", logline::volume_failed(id, &msg));
            if let Err(e) = d.engine.remove(&job.image) {
                tracing::warn!(volume = %id, "{}", error_chain(&e));
            }
            d.finish_volume(claim, id, |r| {
                r.status = VolStatus::Error;
                r.error = Some(msg);
            })
        }
    };
    if let Err(e) = saved {
        unrecorded(&format!("volume {id}"), e);
    }
}

/// What deleting a made volume needs.
#[derive(Clone, Debug)]
pub(crate) struct DeleteVolumeJob {
    pub volume: String,
    pub image: PathBuf,
    pub device: Option<PathBuf>,
    pub chain: PathBuf,
}

/// Detach a made volume and remove its files, then forget its record.
pub(crate) fn delete_volume(d: &Daemon, claim: &JobClaim, job: DeleteVolumeJob) {
    let id = &job.volume;
    let r = (|| -> Result<(), EngineError> {
        if let Some(dev) = &job.device {
            d.engine.detach(dev)?;
        }
        d.engine.remove(&job.image)?;
        d.engine.remove(&crate::chain::side_file(&job.chain))?;
        d.engine.remove(&job.chain)
    })();
    let saved = match r {
        Ok(()) => {
            tracing::info!(volume = %id, "{}", logline::volume_deleted(id));
            d.finish_apply(claim, &[Change::RemoveVolume(id.clone())])
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!(volume = %id, "{}", logline::volume_delete_failed(id, &msg));
            d.finish_volume(claim, id, |r| {
                r.status = VolStatus::ErrorDeleting;
                r.error = Some(msg);
            })
            .map(drop)
        }
    };
    if let Err(e) = saved {
        unrecorded(&format!("the delete of volume {id}"), e);
    }
}

/// What a revert needs.
#[derive(Clone, Debug)]
pub(crate) struct RevertJob {
    pub volume: String,
    pub device: PathBuf,
    pub chain: PathBuf,
    pub snapshot: Uuid,
    /// The snapshot's size: the device must still be that size when the
    /// revert starts writing.
    pub snapshot_size: u64,
    /// Resumed after a restart: the device may already be partly reverted.
    pub resumed: bool,
}

/// Revert a device, then record the outcome and clear the intent. The
/// revert metadata then describes this revert, and only if it completed.
pub(crate) fn revert(d: &Daemon, claim: &JobClaim, job: RevertJob) {
    let id = &job.volume;
    let snap = job.snapshot;
    let started = std::time::Instant::now();
    let shown = d.track_progress(id);
    crate::fault::point(crate::fault::Point::RevertBeforeWrite);
    // The device may have grown or shrunk since the request was checked:
    // then nothing is written.
    let changed = match d.engine.device_size(&job.device) {
        Ok(now) if now != job.snapshot_size => Some(format!(
            "refused: the device {} is {now} bytes but snapshot {snap} is {} bytes; nothing was written (a volume is reverted only to a snapshot of its current size)",
            job.device.display(),
            job.snapshot_size
        )),
        _ => None,
    };
    let r = match changed {
        Some(msg) => Err((msg, false)),
        None => d
            .engine
            .revert(&job.chain, snap, &job.device, &shown.progress)
            .map_err(|e| (error_chain(&e), e.partly_reverted())),
    };
    crate::fault::point(crate::fault::Point::RevertBeforeCatalog);
    let saved = match r {
        Ok(out) => {
            tracing::info!(volume = %id, snapshot = %snap, blocks_checked = out.blocks_checked, blocks_written = out.blocks_written, resumed = job.resumed, "{}", logline::volume_reverted(id, snap, out.blocks_checked, out.blocks_written, started.elapsed()));
            d.metrics.reverted(id, out.blocks_written);
            d.finish_volume(claim, id, |r| {
                revert_intent::clear(r);
                r.status = VolStatus::Available;
                r.error = None;
                r.metadata
                    .insert("blocksnap:reverted_to".into(), snap.to_string());
                r.metadata.insert(
                    "blocksnap:reverted_blocks".into(),
                    out.blocks_written.to_string(),
                );
            })
        }
        Err((msg, wrote)) => {
            tracing::error!(volume = %id, snapshot = %snap, resumed = job.resumed, "{}", logline::revert_failed(id, snap, &msg));
            // Nothing written (and nothing left by an earlier run): the
            // volume is as it was.
            let partial = job.resumed || wrote;
            d.finish_volume(claim, id, |r| {
                revert_intent::clear(r);
                if partial {
                    r.status = VolStatus::Error;
                    r.error = Some(partly_reverted(snap, &msg));
                } else {
                    r.error = Some(msg);
                }
            })
        }
    };
    if let Err(e) = saved {
        unrecorded(&format!("the revert of volume {id}"), e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrunk_device_says_how_to_take_a_full_snapshot_through_the_daemon() {
        let newest = Uuid::from_u128(7);
        let e = EngineError::Take(TakeError::Shrunk {
            device: "/dev/loop9".into(),
            was: 32 << 20,
            now: 24 << 20,
            newest,
        });
        let m = take_failure("vol-a", &e);
        assert!(
            m.contains("shrank from 33554432 to 25165824 bytes")
                && m.contains(&newest.to_string())
                && m.contains(r#""full": true"#)
                && m.contains("blocksnap snapshot create vol-a --full"),
            "{m}"
        );
    }
}
