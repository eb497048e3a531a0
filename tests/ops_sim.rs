//! The daemon's operations on the simulated host (daemon::sim) with the
//! in-memory catalog: claims, conflicts, panics, failed saves, interrupted
//! reverts, and a model-based test of random concurrent operations. No
//! root, no devices: these run in every `cargo test`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blocksnap::config::Config;
use blocksnap::daemon::backups::BackupStatus;
use blocksnap::daemon::catalog::{SnapStatus, VolStatus};
use blocksnap::daemon::ops::{
    BackupFilter, Caller, CreateBackup, CreateSnapshot, CreateVolume, MetadataChange, OpError, Ops,
    RestoreBackup, RevertVolume, UpdateSnapshot, VolumeStatus,
};
use blocksnap::daemon::sim::{Action, SimEngine, Step};
use blocksnap::daemon::store::{MemStore, SnapshotQuery, Store, VolumeQuery};
use blocksnap::daemon::Daemon;
use proptest::prelude::*;
use uuid::Uuid;

const T1: &str = "tenant-one";
const T2: &str = "tenant-two";
const BLOCKS: usize = 16;

/// A daemon on the simulator: volumes vol-a (tenant one) and vol-b (every
/// tenant), both quiesce none and unmounted.
struct World {
    dir: tempfile::TempDir,
    config: Config,
    sim: Arc<SimEngine>,
    store: Arc<MemStore>,
    d: Option<Arc<Daemon>>,
}

fn blocks(seed: u64) -> Vec<u64> {
    (0..BLOCKS as u64)
        .map(|i| seed.wrapping_mul(1000) + i + 1)
        .collect()
}

impl World {
    fn new() -> World {
        World::build(false)
    }

    /// With `remote`, vol-a backs up to remote "sim" (the simulator's).
    fn build(remote: bool) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut vols = String::new();
        if remote {
            use std::os::unix::fs::PermissionsExt;
            let creds = dir.path().join("creds.toml");
            std::fs::write(&creds, "access_key_id = \"a\"\nsecret_access_key = \"b\"\n").unwrap();
            std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
            vols.push_str(&format!(
                "[[remotes]]\nname = \"sim\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"sim-bucket\"\ncredentials_file = \"{}\"\n\n",
                creds.display()
            ));
        }
        for (v, tenant) in [("vol-a", Some(T1)), ("vol-b", None)] {
            let dev = dir.path().join(format!("{v}.img"));
            std::fs::write(&dev, b"sim").unwrap();
            let backup = if remote && v == "vol-a" {
                "backup_remote = \"sim\"\n"
            } else {
                ""
            };
            vols.push_str(&format!(
                "[[volumes]]\nid = \"{v}\"\ndevice = \"{}\"\nquiesce = \"none\"\n{backup}{}\n",
                dev.display(),
                tenant
                    .map(|t| format!("tenant = \"{t}\""))
                    .unwrap_or_default()
            ));
        }
        let text = format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\nmax_made_volumes = 1000\n\n[[tokens]]\ntenant = \"{T1}\"\ntoken = \"token-one\"\n\n[[tokens]]\ntenant = \"{T2}\"\ntoken = \"token-two\"\n\n{vols}",
            dir.path().join("sock").display(),
            dir.path().join("state").display(),
        );
        let path = dir.path().join("blocksnap.toml");
        let config = Config::parse(&path, &text).unwrap();
        let sim = SimEngine::new();
        for (i, v) in config.volumes.iter().enumerate() {
            sim.add_device(&v.device, blocks(i as u64 + 1));
        }
        let mut w = World {
            dir,
            config,
            sim,
            store: Arc::new(MemStore::new()),
            d: None,
        };
        w.start();
        w
    }

    fn start(&mut self) {
        let store = self.store.clone();
        let d = Daemon::start(
            self.config.clone(),
            self.sim.clone(),
            Box::new(move |_| Ok(store as Arc<dyn Store>)),
        )
        .unwrap();
        self.d = Some(d);
    }

    /// Wait for the jobs, then drop the daemon (its lock with it).
    fn stop(&mut self) {
        let d = self.d.take().unwrap();
        assert!(d.wait_idle(Duration::from_secs(10)));
        // The job threads drop their references as they end.
        for _ in 0..200 {
            if Arc::strong_count(&d) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(d);
    }

    fn d(&self) -> &Arc<Daemon> {
        self.d.as_ref().unwrap()
    }
    fn ops(&self) -> Ops {
        self.d().ops()
    }
    fn idle(&self) {
        assert!(
            self.d().wait_idle(Duration::from_secs(20)),
            "jobs still running"
        );
    }
    fn device(&self, v: &str) -> PathBuf {
        self.config
            .volumes
            .iter()
            .find(|x| x.id == v)
            .unwrap()
            .device
            .clone()
    }
    fn chain(&self, v: &str) -> PathBuf {
        self.d().chain_path(v)
    }
    fn snapshot_blocks(&self, v: &str, id: Uuid) -> Vec<u64> {
        self.try_snapshot_blocks(v, id)
            .expect("snapshot in the simulated chain")
    }
    fn try_snapshot_blocks(&self, v: &str, id: Uuid) -> Option<Vec<u64>> {
        self.sim
            .snapshots(&self.chain(v))
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.blocks)
    }
    /// Take a snapshot and wait for it.
    fn snap(&self, c: &Caller, v: &str) -> Uuid {
        let s = self
            .ops()
            .create_snapshot(c, create(v))
            .expect("snapshot accepted");
        self.idle();
        let r = self.d().store().snapshot(s.record.id).unwrap().unwrap();
        assert_eq!(r.status, SnapStatus::Available, "{r:?}");
        s.record.id
    }
}

fn create(v: &str) -> CreateSnapshot {
    CreateSnapshot {
        volume_id: v.into(),
        ..CreateSnapshot::default()
    }
}

fn from_snapshot(id: Uuid) -> CreateVolume {
    CreateVolume {
        snapshot_id: Some(id.to_string()),
        ..CreateVolume::default()
    }
}

fn c1() -> Caller {
    Caller::new(T1)
}

#[test]
fn a_snapshot_a_volume_is_being_made_from_cannot_be_deleted() {
    let w = World::new();
    let s = w.snap(&c1(), "vol-a");
    w.sim.gate("restore");
    w.sim
        .inject(Step::Restore, None, Action::Gate("restore".into()), 1);
    let v = w.ops().create_volume(&c1(), from_snapshot(s)).unwrap();
    assert_eq!(v.status, VolumeStatus::Creating);
    assert!(w.sim.wait_at_gate("restore", 1, Duration::from_secs(5)));
    let e = w.ops().delete_snapshot(&c1(), &s.to_string()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Invalid snapshot: snapshot {s} is in use: volume {} is being created from it; try again when it has finished",
            v.info.id
        )
    );
    // A revert to it may read it at the same time.
    w.ops()
        .revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: s.to_string(),
            },
        )
        .unwrap();
    w.sim.open_gate("restore");
    w.idle();
    let made = w.ops().volume(&c1(), &v.info.id).unwrap();
    assert_eq!(made.status, VolumeStatus::Available);
    let dev = made.info.device.clone().unwrap();
    assert_eq!(
        w.sim.device_blocks(&dev).unwrap(),
        w.snapshot_blocks("vol-a", s)
    );
    // Once nothing reads it, it can go.
    w.ops().delete_snapshot(&c1(), &s.to_string()).unwrap();
    w.idle();
    assert!(w.d().store().snapshot(s).unwrap().is_none());
    assert!(w.sim.violations().is_empty(), "{:?}", w.sim.violations());
    assert!(w.d().claims.is_empty());
}

#[test]
fn a_backup_holds_its_snapshot_and_backups_of_a_volume_take_turns() {
    let mut w = World::build(true);
    let s = w.snap(&c1(), "vol-a");
    let backup_of = |snapshot: Option<Uuid>| CreateBackup {
        volume_id: "vol-a".into(),
        snapshot_id: snapshot.map(|s| s.to_string()),
        ..CreateBackup::default()
    };
    // Refusals before anything starts.
    let e = w
        .ops()
        .create_backup(
            &c1(),
            CreateBackup {
                incremental: true,
                ..backup_of(Some(s))
            },
        )
        .unwrap_err();
    assert!(matches!(e, OpError::NoPreviousBackup), "{e}");
    let e = w
        .ops()
        .create_backup(
            &c1(),
            CreateBackup {
                volume_id: "vol-b".into(),
                ..CreateBackup::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, OpError::NoBackupRemote(ref v) if v == "vol-b"),
        "{e}"
    );

    w.sim.gate("upload");
    w.sim
        .inject(Step::BackupUpload, None, Action::Gate("upload".into()), 1);
    let b = w.ops().create_backup(&c1(), backup_of(Some(s))).unwrap();
    let id = b.record.id;
    assert_eq!(b.record.status, BackupStatus::Creating);
    assert!(w.sim.wait_at_gate("upload", 1, Duration::from_secs(5)));
    // Its snapshot cannot be deleted, a second backup of the volume waits
    // its turn, the backup itself cannot be deleted yet...
    let e = w.ops().delete_snapshot(&c1(), &s.to_string()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Invalid snapshot: snapshot {s} is in use: backup {id} is being made of it; try again when it has finished")
    );
    let e = w.ops().create_backup(&c1(), backup_of(None)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Invalid backup: the backups of volume vol-a are busy: backup {id} is being created; try again when it has finished")
    );
    let e = w.ops().delete_backup(&c1(), &id.to_string()).unwrap_err();
    assert!(matches!(e, OpError::BackupNotDeletable), "{e}");
    // ...but the volume can still be snapshotted.
    let s2 = w
        .ops()
        .create_snapshot(&c1(), create("vol-a"))
        .unwrap()
        .record
        .id;
    w.sim.open_gate("upload");
    w.idle();
    let r = w.d().store().snapshot(s2).unwrap().unwrap();
    assert_eq!(r.status, SnapStatus::Available, "{r:?}");
    let b = w.ops().backup(&c1(), &id.to_string()).unwrap();
    assert_eq!(b.record.status, BackupStatus::Available, "{b:?}");
    // Another tenant sees nothing of it.
    let e = w
        .ops()
        .backup(&Caller::new(T2), &id.to_string())
        .unwrap_err();
    assert!(matches!(e, OpError::BackupNotFound(_)), "{e}");

    // A restore reads it: it cannot be deleted meanwhile, and shows so.
    w.sim.gate("restore");
    w.sim
        .inject(Step::BackupRestore, None, Action::Gate("restore".into()), 1);
    let r = w
        .ops()
        .restore_backup(&c1(), &id.to_string(), RestoreBackup::default())
        .unwrap();
    assert!(w.sim.wait_at_gate("restore", 1, Duration::from_secs(5)));
    assert_eq!(
        w.ops().backup(&c1(), &id.to_string()).unwrap().status,
        "restoring"
    );
    let e = w.ops().delete_backup(&c1(), &id.to_string()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Invalid backup: the backups of volume vol-a are busy: backup {id} is being restored into volume {}; try again when it has finished",
            r.volume_id
        )
    );
    w.sim.open_gate("restore");
    w.idle();
    let v = w.ops().volume(&c1(), &r.volume_id).unwrap();
    assert_eq!(v.status, VolumeStatus::Available);
    assert_eq!(
        w.sim
            .device_blocks(&v.info.device.clone().unwrap())
            .unwrap(),
        w.snapshot_blocks("vol-a", s)
    );

    // The record survives a restart; then the backup is deleted.
    w.stop();
    w.start();
    let b = w.ops().backup(&c1(), &id.to_string()).unwrap();
    assert_eq!(b.record.status, BackupStatus::Available);
    w.ops().delete_backup(&c1(), &id.to_string()).unwrap();
    w.idle();
    assert!(w
        .ops()
        .list_backups(&c1(), &BackupFilter::default())
        .unwrap()
        .is_empty());
    assert!(w.sim.remote_backups().is_empty());
    w.ops().delete_snapshot(&c1(), &s2.to_string()).unwrap();
    w.idle();
    assert!(w.sim.violations().is_empty(), "{:?}", w.sim.violations());
    assert!(w.d().claims.is_empty());
}

#[test]
fn deletes_are_refused_while_a_revert_or_the_next_take_runs() {
    let w = World::new();
    let s1 = w.snap(&c1(), "vol-a");
    let s2 = w.snap(&c1(), "vol-a");
    // During a revert to s1: neither s1 nor another snapshot of the volume.
    w.sim.gate("g");
    w.sim
        .inject(Step::RevertMid, None, Action::Gate("g".into()), 1);
    w.sim.write_device(&w.device("vol-a"), blocks(99));
    w.ops()
        .revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: s1.to_string(),
            },
        )
        .unwrap();
    assert!(w.sim.wait_at_gate("g", 1, Duration::from_secs(5)));
    for s in [s1, s2] {
        let e = w.ops().delete_snapshot(&c1(), &s.to_string()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Invalid snapshot: volume vol-a is busy: volume vol-a is being reverted to snapshot {s1}; try again when it has finished")
        );
    }
    assert_eq!(
        w.ops().volume(&c1(), "vol-a").unwrap().status,
        VolumeStatus::Reverting
    );
    w.sim.open_gate("g");
    w.idle();
    assert_eq!(w.sim.device_blocks(&w.device("vol-a")).unwrap(), blocks(1));
    // During the next take: its predecessor cannot be merged away under it.
    w.sim.gate("t");
    w.sim
        .inject(Step::TakeScan, None, Action::Gate("t".into()), 1);
    let s3 = w.ops().create_snapshot(&c1(), create("vol-a")).unwrap();
    assert!(w.sim.wait_at_gate("t", 1, Duration::from_secs(5)));
    let e = w.ops().delete_snapshot(&c1(), &s2.to_string()).unwrap_err();
    assert!(
        matches!(e, OpError::InUse { .. })
            && e.to_string()
                .contains(&format!("snapshot {} is being created", s3.record.id)),
        "{e}"
    );
    w.sim.open_gate("t");
    w.idle();
    for s in [s1, s2, s3.record.id] {
        w.ops().delete_snapshot(&c1(), &s.to_string()).unwrap();
        w.idle();
    }
    assert!(w.sim.snapshots(&w.chain("vol-a")).is_empty());
    assert!(w.sim.violations().is_empty(), "{:?}", w.sim.violations());
}

/// A client that sees a snapshot available and at once asks for the next
/// operation on its volume is never told the volume is busy.
#[test]
fn once_an_outcome_is_seen_the_volume_is_free() {
    let w = World::new();
    for _ in 0..200 {
        let s = w.ops().create_snapshot(&c1(), create("vol-b")).unwrap();
        let id = s.record.id;
        while w.d().store().snapshot(id).unwrap().unwrap().status == SnapStatus::Creating {
            std::hint::spin_loop();
        }
        w.ops()
            .delete_snapshot(&c1(), &id.to_string())
            .expect("the volume is free once its snapshot is available");
        while w.d().store().snapshot(id).unwrap().is_some() {
            std::hint::spin_loop();
        }
    }
    w.idle();
}

#[test]
fn a_panicking_job_releases_its_claims_and_marks_its_record() {
    let w = World::new();
    w.sim.inject(Step::TakeScan, None, Action::Panic, 1);
    let s = w.ops().create_snapshot(&c1(), create("vol-a")).unwrap();
    w.idle();
    let r = w.d().store().snapshot(s.record.id).unwrap().unwrap();
    assert_eq!(r.status, SnapStatus::Error);
    let e = r.error.unwrap();
    assert!(
        e.starts_with("internal error: injected panic at TakeScan") && e.ends_with("; see the log"),
        "{e}"
    );
    assert!(w.d().claims.is_empty(), "{:?}", w.d().claims.describe());
    assert_eq!(w.d().metrics.panics(), 1);
    // The volume is free again.
    let ok = w.snap(&c1(), "vol-a");
    // A revert that panics halfway leaves the volume marked.
    w.sim.write_device(&w.device("vol-a"), blocks(7));
    w.sim.inject(Step::RevertMid, None, Action::Panic, 1);
    w.ops()
        .revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: ok.to_string(),
            },
        )
        .unwrap();
    w.idle();
    let v = w.ops().volume(&c1(), "vol-a").unwrap();
    assert_eq!(v.status, VolumeStatus::Error);
    let e = v.info.record.error.clone().unwrap();
    assert!(
        e.starts_with(&format!(
            "partly reverted to {ok}; revert again (internal error: injected panic"
        )),
        "{e}"
    );
    assert!(w.d().claims.is_empty());
    // A volume marked partly reverted takes no snapshot until reverted again.
    assert!(matches!(
        w.ops().create_snapshot(&c1(), create("vol-a")),
        Err(OpError::VolumeNotAvailable)
    ));
    w.ops()
        .revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: ok.to_string(),
            },
        )
        .unwrap();
    w.idle();
    let v = w.ops().volume(&c1(), "vol-a").unwrap();
    assert_eq!(v.status, VolumeStatus::Available, "{:?}", v.info.record);
    assert_eq!(w.sim.device_blocks(&w.device("vol-a")).unwrap(), blocks(1));
    // Making a volume that panics: the volume is error, deletable.
    w.sim.inject(Step::MakeImage, None, Action::Panic, 1);
    let m = w.ops().create_volume(&c1(), from_snapshot(ok)).unwrap();
    w.idle();
    let made = w.ops().volume(&c1(), &m.info.id).unwrap();
    assert_eq!(made.status, VolumeStatus::Error);
    w.ops().delete_volume(&c1(), &m.info.id).unwrap();
    w.idle();
    assert!(w.d().store().volume(&m.info.id).unwrap().is_none());
    assert_eq!(w.d().metrics.panics(), 3);
}

#[test]
fn a_failed_save_answers_an_error_and_starts_nothing() {
    let w = World::new();
    let calls = w.sim.calls().len();
    w.store.fail_next_applies(1);
    let e = w.ops().create_snapshot(&c1(), create("vol-a")).unwrap_err();
    assert!(matches!(e, OpError::Store(_)), "{e}");
    assert_eq!(
        w.sim.calls().len(),
        calls,
        "a take ran: {:?}",
        w.sim.calls()
    );
    assert!(w.d().claims.is_empty());
    assert!(w
        .d()
        .store()
        .snapshots(&SnapshotQuery::default())
        .unwrap()
        .is_empty());
    let s = w.snap(&c1(), "vol-a");
    w.store.fail_next_applies(1);
    assert!(matches!(
        w.ops().create_volume(&c1(), from_snapshot(s)),
        Err(OpError::Store(_))
    ));
    w.store.fail_next_applies(1);
    assert!(matches!(
        w.ops().revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: s.to_string()
            }
        ),
        Err(OpError::Store(_))
    ));
    w.idle();
    assert!(w.d().claims.is_empty());
    assert!(w.sim.images().is_empty());
    let v = w.ops().volume(&c1(), "vol-a").unwrap();
    assert!(!v
        .info
        .record
        .metadata
        .contains_key("blocksnap:reverting_to"));
}

#[test]
fn an_update_during_a_job_is_not_lost_when_the_job_ends() {
    let w = World::new();
    w.sim.gate("t");
    w.sim
        .inject(Step::TakeScan, None, Action::Gate("t".into()), 1);
    let s = w.ops().create_snapshot(&c1(), create("vol-a")).unwrap();
    assert!(w.sim.wait_at_gate("t", 1, Duration::from_secs(5)));
    let id = s.record.id.to_string();
    w.ops()
        .update_snapshot(
            &c1(),
            &id,
            UpdateSnapshot {
                name: Some("renamed".into()),
                description: None,
            },
        )
        .unwrap();
    w.ops()
        .change_snapshot_metadata(
            &c1(),
            &id,
            MetadataChange::Set {
                key: "k".into(),
                value: "v".into(),
            },
        )
        .unwrap();
    w.sim.open_gate("t");
    w.idle();
    let r = w.d().store().snapshot(s.record.id).unwrap().unwrap();
    assert_eq!(r.status, SnapStatus::Available);
    assert_eq!(r.display_name, "renamed");
    assert_eq!(r.metadata["k"], "v");
}

#[test]
fn metadata_keeps_cinders_limits() {
    let w = World::new();
    let s = w.snap(&c1(), "vol-a").to_string();
    let set = |k: String, v: String| {
        w.ops()
            .change_snapshot_metadata(&c1(), &s, MetadataChange::Set { key: k, value: v })
    };
    assert!(set("k".repeat(255), "v".repeat(255)).is_ok());
    assert!(matches!(
        set("k".repeat(256), "v".into()),
        Err(OpError::MetadataKeyTooLong)
    ));
    assert!(matches!(
        set("k".into(), "v".repeat(256)),
        Err(OpError::MetadataValueTooLong)
    ));
    assert!(matches!(
        set(String::new(), "v".into()),
        Err(OpError::MetadataKeyBlank)
    ));
    let many: BTreeMap<String, String> = (0..127).map(|i| (format!("m{i}"), "x".into())).collect();
    w.ops()
        .change_snapshot_metadata(&c1(), &s, MetadataChange::Merge(many))
        .unwrap();
    assert!(matches!(
        set("one-too-many".into(), "v".into()),
        Err(OpError::TooManyMetadataItems)
    ));
    // Replacing stays within the limit.
    let few = BTreeMap::from([("a".to_string(), "b".to_string())]);
    w.ops()
        .change_snapshot_metadata(&c1(), &s, MetadataChange::Replace(few))
        .unwrap();
    // The daemon's own items on a volume do not count and cannot be set.
    let e = w
        .ops()
        .change_volume_metadata(
            &c1(),
            "vol-a",
            MetadataChange::Set {
                key: "blocksnap:device".into(),
                value: "/dev/sda".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(e, OpError::ReservedMetadataKey));
}

/// The records a crash mid-revert leaves, then a start.
#[test]
fn an_interrupted_revert_is_resumed_or_marked_partly_reverted() {
    let mut w = World::new();
    let s = w.snap(&c1(), "vol-a");
    w.sim.write_device(&w.device("vol-a"), blocks(50));
    // A revert stopped halfway, as a kill -9 leaves it: intent recorded,
    // half the blocks written.
    w.sim.gate("never");
    w.sim
        .inject(Step::RevertMid, None, Action::Gate("never".into()), 1);
    w.ops()
        .revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: s.to_string(),
            },
        )
        .unwrap();
    assert!(w.sim.wait_at_gate("never", 1, Duration::from_secs(5)));
    let half = w.sim.device_blocks(&w.device("vol-a")).unwrap();
    assert_ne!(half, blocks(1));
    assert_ne!(half, blocks(50));
    let after_crash = w.store.dump();
    // "Restart" on the records as they were at the crash.
    let crashed_store = Arc::new(MemStore::with_records(after_crash.0, after_crash.1));
    w.sim.open_gate("never");
    w.stop();
    w.sim.write_device(&w.device("vol-a"), half.clone());
    w.store = crashed_store.clone();
    w.start();
    w.idle();
    let v = w.ops().volume(&c1(), "vol-a").unwrap();
    assert_eq!(v.status, VolumeStatus::Available, "{:?}", v.info.record);
    assert_eq!(w.sim.device_blocks(&w.device("vol-a")).unwrap(), blocks(1));
    assert_eq!(
        v.info.record.metadata["blocksnap:reverted_to"],
        s.to_string()
    );
    assert!(!v
        .info
        .record
        .metadata
        .contains_key("blocksnap:reverting_to"));
    // Again, but mounted at the restart: it cannot be resumed.
    w.stop();
    w.sim.write_device(&w.device("vol-a"), half);
    w.store = Arc::new(MemStore::with_records(crashed_store.dump().0, {
        let mut v = crashed_store.dump().1;
        for r in &mut v {
            if r.id == "vol-a" {
                r.metadata
                    .insert("blocksnap:reverting_to".into(), s.to_string());
                r.metadata.remove("blocksnap:reverted_to");
            }
        }
        v
    }));
    w.sim.set_mounted(&w.device("vol-a"), true);
    w.start();
    w.idle();
    let v = w.ops().volume(&c1(), "vol-a").unwrap();
    assert_eq!(v.status, VolumeStatus::Error);
    let e = v.info.record.error.clone().unwrap();
    assert!(
        e.starts_with(&format!("partly reverted to {s}; revert again (the revert was interrupted by a restart and cannot be resumed: ")) && e.contains("mounted"),
        "{e}"
    );
    assert!(!v.info.record.metadata.contains_key("blocksnap:reverted_to"));
    assert!(!v
        .info
        .record
        .metadata
        .contains_key("blocksnap:reverting_to"));
}

#[test]
fn revert_metadata_describes_only_the_last_completed_revert() {
    let w = World::new();
    let s1 = w.snap(&c1(), "vol-a");
    w.sim.write_device(&w.device("vol-a"), blocks(5));
    let s2 = w.snap(&c1(), "vol-a");
    let revert = |s: Uuid| {
        w.ops()
            .revert_volume(
                &c1(),
                "vol-a",
                RevertVolume {
                    snapshot_id: s.to_string(),
                },
            )
            .unwrap();
        w.idle();
        w.ops().volume(&c1(), "vol-a").unwrap()
    };
    let v = revert(s1);
    assert_eq!(
        v.info.record.metadata["blocksnap:reverted_to"],
        s1.to_string()
    );
    assert_eq!(v.info.record.metadata["blocksnap:reverted_blocks"], "16");
    w.sim.inject(Step::RevertMid, None, Action::Fail, 1);
    let v = revert(s2);
    assert_eq!(v.status, VolumeStatus::Error);
    assert!(!v.info.record.metadata.contains_key("blocksnap:reverted_to"));
    assert!(!v
        .info
        .record
        .metadata
        .contains_key("blocksnap:reverted_blocks"));
    let v = revert(s2);
    assert_eq!(v.status, VolumeStatus::Available);
    assert_eq!(
        v.info.record.metadata["blocksnap:reverted_to"],
        s2.to_string()
    );
    assert_eq!(v.info.record.error, None);
    // A failure before the first write leaves the volume as it was.
    w.sim.inject(Step::Revert, None, Action::Fail, 1);
    let v = revert(s1);
    assert_eq!(v.status, VolumeStatus::Available);
    assert!(v.info.record.error.is_some());
    assert_eq!(w.sim.device_blocks(&w.device("vol-a")).unwrap(), blocks(5));
}

/// Issue 12 item 7: a volume larger than the largest file the state
/// directory's filesystem holds, or from a snapshot with more data than is
/// free, is refused when asked (413), leaving no record and no image.
#[test]
fn a_volume_the_filesystem_cannot_hold_is_refused_when_asked() {
    const GB: u64 = 1 << 30;
    let w = World::new();
    let s = w.snap(&c1(), "vol-a");
    // ext4 with 4 KiB blocks.
    w.sim.set_fs_limits(Some(16 * 1024 * GB - 4096), None);
    let blank = |gb: u64| CreateVolume {
        size_gb: Some(gb),
        ..CreateVolume::default()
    };
    let made = || {
        w.store
            .volumes(&VolumeQuery::default())
            .unwrap()
            .into_iter()
            .filter(|v| v.id != "vol-a" && v.id != "vol-b")
            .count()
    };
    let e = w.ops().create_volume(&c1(), blank(65536)).unwrap_err();
    match &e {
        OpError::VolumeTooLarge {
            size_gb: 65536,
            max_gb: 16383,
            ..
        } => {}
        e => panic!("{e:?}"),
    }
    assert!(
        e.to_string().contains("65536G") && e.to_string().contains("16383G"),
        "{e}"
    );
    assert_eq!(made(), 0);
    assert!(w.sim.images().is_empty());
    // The largest whole size that fits is made (a small limit: the
    // simulator keeps every block in memory).
    w.sim.set_fs_limits(Some(2 * GB - 4096), None);
    assert!(matches!(
        w.ops().create_volume(&c1(), blank(2)),
        Err(OpError::VolumeTooLarge { max_gb: 1, .. })
    ));
    w.ops().create_volume(&c1(), blank(1)).unwrap();
    w.idle();
    assert_eq!(made(), 1);
    // From a snapshot: its 16 blocks of data need room.
    w.sim.set_fs_limits(None, Some(15 * 4096));
    let e = w.ops().create_volume(&c1(), from_snapshot(s)).unwrap_err();
    match &e {
        OpError::NoRoom {
            need: 65536,
            free: 61440,
            ..
        } => {}
        e => panic!("{e:?}"),
    }
    assert_eq!(made(), 1);
    w.sim.set_fs_limits(None, Some(16 * 4096));
    w.ops().create_volume(&c1(), from_snapshot(s)).unwrap();
    w.idle();
    assert_eq!(made(), 2);
    assert!(w
        .store
        .volumes(&VolumeQuery::default())
        .unwrap()
        .iter()
        .all(|v| v.status == VolStatus::Available || v.id.starts_with("vol-")));
}

/// Issue 12 item 8: after the device shrank, an increment is refused with
/// a message saying how to take a full snapshot; a full one is taken and
/// recorded as asked for.
#[test]
fn after_a_shrink_only_a_full_snapshot_is_taken() {
    let w = World::new();
    let s = w.snap(&c1(), "vol-a");
    w.sim
        .write_device(&w.device("vol-a"), blocks(3)[..BLOCKS / 2].to_vec());
    let e = w.ops().create_snapshot(&c1(), create("vol-a")).unwrap_err();
    assert!(
        matches!(e, OpError::DeviceShrank { snapshot, .. } if snapshot == s),
        "{e:?}"
    );
    let m = e.to_string();
    assert!(m.contains(r#""full": true"#) && m.contains("--full"), "{m}");
    let full = w
        .ops()
        .create_snapshot(
            &c1(),
            CreateSnapshot {
                full: true,
                ..create("vol-a")
            },
        )
        .unwrap();
    w.idle();
    let got = w
        .ops()
        .snapshot(&c1(), &full.record.id.to_string())
        .unwrap();
    assert_eq!(got.record.status, SnapStatus::Available, "{:?}", got.record);
    assert_eq!(
        got.take.map(|t| t.reason),
        Some(blocksnap::chain::format::FullReason::Requested)
    );
    assert_eq!(
        w.snapshot_blocks("vol-a", full.record.id),
        blocks(3)[..BLOCKS / 2].to_vec()
    );
    // From then on increments again.
    w.snap(&c1(), "vol-a");
    // A shrink after the request was checked: the take refuses, and the
    // record says how to go on.
    w.sim.gate("shrink");
    w.sim
        .inject(Step::Take, None, Action::Gate("shrink".into()), 1);
    let s = w.ops().create_snapshot(&c1(), create("vol-a")).unwrap();
    assert!(w.sim.wait_at_gate("shrink", 1, Duration::from_secs(5)));
    w.sim
        .write_device(&w.device("vol-a"), blocks(6)[..BLOCKS / 4].to_vec());
    w.sim.open_gate("shrink");
    w.idle();
    let r = w.d().store().snapshot(s.record.id).unwrap().unwrap();
    assert_eq!(r.status, SnapStatus::Error);
    let e = r.error.unwrap_or_default();
    assert!(
        e.contains("shrank") && e.contains(r#""full": true"#) && e.contains("--full"),
        "{e}"
    );
}

/// Issue 12 item 9: a revert to a snapshot of another size is refused,
/// writing nothing.
#[test]
fn a_revert_to_a_snapshot_of_another_size_is_refused() {
    let w = World::new();
    let s = w.snap(&c1(), "vol-a");
    let mut grown = blocks(4);
    grown.extend(blocks(5));
    w.sim.write_device(&w.device("vol-a"), grown.clone());
    let e = w
        .ops()
        .revert_volume(
            &c1(),
            "vol-a",
            RevertVolume {
                snapshot_id: s.to_string(),
            },
        )
        .unwrap_err();
    match &e {
        OpError::RevertSizeDiffers {
            volume_bytes,
            snapshot_bytes,
            ..
        } => {
            assert_eq!(*volume_bytes, 2 * BLOCKS as u64 * 4096);
            assert_eq!(*snapshot_bytes, BLOCKS as u64 * 4096);
        }
        e => panic!("{e:?}"),
    }
    w.idle();
    assert_eq!(w.sim.device_blocks(&w.device("vol-a")).unwrap(), grown);
    let v = w.ops().volume(&c1(), "vol-a").unwrap();
    assert_eq!(v.status, VolumeStatus::Available);
    assert!(!v.info.record.metadata.contains_key("blocksnap:reverted_to"));
}

// ---------------------------------------------------------------- the model

#[derive(Clone, Debug)]
enum Act {
    Snapshot(usize),
    DeleteSnapshot(usize),
    MakeVolume(usize),
    DeleteVolume(usize),
    Revert(usize),
    Rename(usize),
    SetMeta(usize),
    SetVolumeMeta(usize),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => (0usize..2).prop_map(Act::Snapshot),
        2 => any::<usize>().prop_map(Act::DeleteSnapshot),
        2 => any::<usize>().prop_map(Act::MakeVolume),
        1 => any::<usize>().prop_map(Act::DeleteVolume),
        2 => any::<usize>().prop_map(Act::Revert),
        2 => any::<usize>().prop_map(Act::Rename),
        2 => any::<usize>().prop_map(Act::SetMeta),
        1 => (0usize..2).prop_map(Act::SetVolumeMeta),
    ]
}

type Blocks = Vec<u64>;

/// What was answered, for the checks after every job has ended.
#[derive(Debug, Default)]
struct Answers {
    /// Snapshot → its volume, for every snapshot whose create was answered.
    created: BTreeMap<Uuid, String>,
    deleted: BTreeSet<Uuid>,
    /// Made volume → the blocks of the snapshot it was made from (when
    /// they could be read around the answer).
    made: BTreeMap<String, Option<Vec<u64>>>,
    made_deleted: BTreeSet<String>,
    /// Accepted reverts per volume: the snapshots' blocks.
    reverts: BTreeMap<String, Vec<(Uuid, Option<Blocks>)>>,
    renames: BTreeMap<Uuid, BTreeSet<String>>,
    meta: BTreeMap<Uuid, BTreeSet<String>>,
    volume_meta: BTreeMap<String, BTreeSet<String>>,
    refusals: Vec<String>,
}

fn run_model(threads: Vec<Vec<Act>>, seed: u64) -> Result<(), TestCaseError> {
    let w = World::new();
    w.sim.jitter(seed, Duration::from_millis(3));
    let answers = Mutex::new(Answers::default());
    for v in ["vol-a", "vol-b"] {
        let id = w.snap(&c1(), v);
        answers.lock().unwrap().created.insert(id, v.into());
    }
    let vols = ["vol-a", "vol-b"];
    let counter = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|sc| {
        for acts in &threads {
            let (w, answers, counter) = (&w, &answers, &counter);
            sc.spawn(move || {
                let ops = w.ops();
                let c = c1();
                for a in acts {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let pick_snapshot = |k: usize| -> Option<(Uuid, String)> {
                        let a = answers.lock().unwrap();
                        let live: Vec<_> = a
                            .created
                            .iter()
                            .filter(|(id, _)| !a.deleted.contains(id))
                            .collect();
                        // The newest few: operations meet on the same ones.
                        let live = &live[live.len().saturating_sub(3)..];
                        (!live.is_empty()).then(|| {
                            let (id, v) = live[k % live.len()];
                            (*id, v.clone())
                        })
                    };
                    let refused = |e: OpError| {
                        // Refusals are fine; the daemon's own failures are not.
                        assert!(!matches!(e, OpError::Store(_)), "{e}");
                        answers.lock().unwrap().refusals.push(e.to_string());
                    };
                    match a {
                        Act::Snapshot(v) => match ops.create_snapshot(&c, create(vols[*v])) {
                            Ok(s) => {
                                answers
                                    .lock()
                                    .unwrap()
                                    .created
                                    .insert(s.record.id, vols[*v].into());
                            }
                            Err(e) => refused(e),
                        },
                        Act::DeleteSnapshot(k) => {
                            let Some((id, _)) = pick_snapshot(*k) else {
                                continue;
                            };
                            match ops.delete_snapshot(&c, &id.to_string()) {
                                Ok(()) => {
                                    answers.lock().unwrap().deleted.insert(id);
                                }
                                Err(e) => refused(e),
                            }
                        }
                        Act::MakeVolume(k) => {
                            let Some((id, v)) = pick_snapshot(*k) else {
                                continue;
                            };
                            // Snapshots never change: what it holds now is
                            // what the volume must hold.
                            let before = w.try_snapshot_blocks(&v, id);
                            match ops.create_volume(&c, from_snapshot(id)) {
                                Ok(m) => {
                                    let b = before.or_else(|| w.try_snapshot_blocks(&v, id));
                                    answers.lock().unwrap().made.insert(m.info.id, b);
                                }
                                Err(e) => refused(e),
                            }
                        }
                        Act::DeleteVolume(k) => {
                            let made: Vec<String> = {
                                let a = answers.lock().unwrap();
                                a.made
                                    .keys()
                                    .filter(|m| !a.made_deleted.contains(*m))
                                    .cloned()
                                    .collect()
                            };
                            if made.is_empty() {
                                continue;
                            }
                            let m = &made[k % made.len()];
                            match ops.delete_volume(&c, m) {
                                Ok(()) => {
                                    answers.lock().unwrap().made_deleted.insert(m.clone());
                                }
                                Err(e) => refused(e),
                            }
                        }
                        Act::Revert(k) => {
                            let Some((id, v)) = pick_snapshot(*k) else {
                                continue;
                            };
                            let before = w.try_snapshot_blocks(&v, id);
                            let r = ops.revert_volume(
                                &c,
                                &v,
                                RevertVolume {
                                    snapshot_id: id.to_string(),
                                },
                            );
                            match r {
                                Ok(()) => {
                                    let b = before.or_else(|| w.try_snapshot_blocks(&v, id));
                                    answers
                                        .lock()
                                        .unwrap()
                                        .reverts
                                        .entry(v)
                                        .or_default()
                                        .push((id, b));
                                }
                                Err(e) => refused(e),
                            }
                        }
                        Act::Rename(k) => {
                            let Some((id, _)) = pick_snapshot(*k) else {
                                continue;
                            };
                            let name = format!("name-{n}");
                            let r = ops.update_snapshot(
                                &c,
                                &id.to_string(),
                                UpdateSnapshot {
                                    name: Some(name.clone()),
                                    description: None,
                                },
                            );
                            match r {
                                Ok(_) => {
                                    answers
                                        .lock()
                                        .unwrap()
                                        .renames
                                        .entry(id)
                                        .or_default()
                                        .insert(name);
                                }
                                Err(e) => refused(e),
                            }
                        }
                        Act::SetMeta(k) => {
                            let Some((id, _)) = pick_snapshot(*k) else {
                                continue;
                            };
                            let key = format!("key-{n}");
                            let r = ops.change_snapshot_metadata(
                                &c,
                                &id.to_string(),
                                MetadataChange::Set {
                                    key: key.clone(),
                                    value: "v".into(),
                                },
                            );
                            match r {
                                Ok(_) => {
                                    answers
                                        .lock()
                                        .unwrap()
                                        .meta
                                        .entry(id)
                                        .or_default()
                                        .insert(key);
                                }
                                Err(e) => refused(e),
                            }
                        }
                        Act::SetVolumeMeta(v) => {
                            let key = format!("key-{n}");
                            let r = ops.change_volume_metadata(
                                &c,
                                vols[*v],
                                MetadataChange::Set {
                                    key: key.clone(),
                                    value: "v".into(),
                                },
                            );
                            match r {
                                Ok(_) => {
                                    answers
                                        .lock()
                                        .unwrap()
                                        .volume_meta
                                        .entry(vols[*v].into())
                                        .or_default()
                                        .insert(key);
                                }
                                Err(e) => refused(e),
                            }
                        }
                    }
                }
            });
        }
    });
    w.idle();
    let a = answers.into_inner().unwrap();
    let d = w.d();
    let ctx = format!("{threads:?}");
    // Nothing broke anything.
    prop_assert!(
        w.sim.violations().is_empty(),
        "{:?}\n{ctx}",
        w.sim.violations()
    );
    prop_assert!(d.claims.is_empty(), "{:?}", d.claims.describe());
    for r in a.refusals.iter() {
        prop_assert!(
            r.starts_with("Invalid") || r.contains("could not be found") || r.contains("not found"),
            "unexpected refusal: {r}"
        );
    }
    // Every answered create is there, unless an answered delete took it.
    let snaps = d.store().snapshots(&SnapshotQuery::default()).unwrap();
    for (id, v) in &a.created {
        let rec = snaps.iter().find(|r| r.id == *id);
        let in_chain = w.sim.snapshots(&w.chain(v)).iter().any(|s| s.id == *id);
        if a.deleted.contains(id) {
            prop_assert!(
                rec.is_none() && !in_chain,
                "deleted {id} is still there\n{ctx}"
            );
        } else {
            let rec = rec.unwrap_or_else(|| panic!("answered snapshot {id} lost\n{ctx}"));
            prop_assert_eq!(rec.status, SnapStatus::Available, "{:?}", rec);
            prop_assert!(in_chain, "{id} missing from the chain");
            if let Some(names) = a.renames.get(id) {
                prop_assert!(
                    names.contains(&rec.display_name),
                    "rename of {id} lost: {:?}",
                    rec
                );
            }
            for k in a.meta.get(id).into_iter().flatten() {
                prop_assert!(rec.metadata.contains_key(k), "metadata {k} of {id} lost");
            }
        }
    }
    prop_assert_eq!(snaps.len(), a.created.len() - a.deleted.len());
    // Made volumes hold their snapshots; deleted ones are gone.
    let vol_records = d.store().volumes(&VolumeQuery::default()).unwrap();
    for (m, b) in &a.made {
        let rec = vol_records.iter().find(|r| &r.id == m);
        if a.made_deleted.contains(m) {
            prop_assert!(rec.is_none(), "deleted volume {m} is still there");
        } else {
            let rec = rec.unwrap_or_else(|| panic!("answered volume {m} lost"));
            prop_assert_eq!(rec.status, VolStatus::Available, "{:?}", rec);
            let v = d.volume(m).unwrap().unwrap();
            let got = w.sim.device_blocks(v.device.as_ref().unwrap()).unwrap();
            if let Some(b) = b {
                prop_assert_eq!(&got, b, "volume {} does not hold its snapshot", m);
            }
        }
    }
    prop_assert_eq!(w.sim.loops().len(), a.made.len() - a.made_deleted.len());
    // Each volume: every accepted revert completed, the metadata names the
    // last one, and the device holds that snapshot.
    for v in vols {
        let info = d.volume(v).unwrap().unwrap();
        let m = &info.record.metadata;
        prop_assert!(!m.contains_key("blocksnap:reverting_to"));
        prop_assert_eq!(info.record.status, VolStatus::Available);
        for k in a.volume_meta.get(v).into_iter().flatten() {
            prop_assert!(m.contains_key(k), "volume metadata {k} of {v} lost");
        }
        if let Some(reverts) = a.reverts.get(v) {
            let last: Uuid = m["blocksnap:reverted_to"].parse().unwrap();
            let (_, b) = reverts
                .iter()
                .find(|(id, _)| *id == last)
                .expect("the last revert was accepted");
            if let Some(b) = b {
                prop_assert_eq!(&w.sim.device_blocks(&w.device(v)).unwrap(), b);
            }
        }
    }
    // And it still works.
    for v in vols {
        w.snap(&c1(), v);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random interleavings of concurrent operations against the simulator
    /// and the in-memory catalog: no answered operation is lost and no
    /// operation breaks another.
    #[test]
    fn concurrent_operations_never_break_each_other(
        threads in prop::collection::vec(prop::collection::vec(act(), 1..10), 2..6),
        seed in any::<u64>(),
    ) {
        run_model(threads, seed)?;
    }
}

#[test]
fn tenants_see_only_their_own() {
    let w = World::new();
    let c2 = Caller::new(T2);
    let a = w.snap(&c1(), "vol-a");
    let b1 = w.snap(&c1(), "vol-b");
    let b2 = w.snap(&c2, "vol-b");
    let ids = |c: &Caller| -> BTreeSet<Uuid> {
        w.ops()
            .list_snapshots(c, &Default::default())
            .unwrap()
            .into_iter()
            .map(|s| s.record.id)
            .collect()
    };
    assert_eq!(ids(&c1()), BTreeSet::from([a, b1]));
    assert_eq!(ids(&c2), BTreeSet::from([b2]));
    assert!(matches!(
        w.ops().snapshot(&c2, &a.to_string()),
        Err(OpError::SnapshotNotFound(_))
    ));
    assert!(matches!(
        w.ops().volume(&c2, "vol-a"),
        Err(OpError::VolumeNotFound(_))
    ));
    let _ = Path::new(w.dir.path());
}
