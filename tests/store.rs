//! The durable catalog (SqliteStore) on a real state directory: the model
//! test against MemStore (with reopens, a lost and a garbled catalog in
//! between), kill -9 in the middle of applies, migration from the old
//! catalog.json, planted symlinks, and the state directory checks at start
//! and in `blocksnapd --check-config`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blocksnap::daemon::catalog::{
    Catalog, SnapStatus, SnapshotRecord, VolStatus, VolumeKind, VolumeRecord,
};
use blocksnap::daemon::store::{
    Change, MemStore, OpenedFrom, Page, SnapshotQuery, SortDir, SortKey, SqliteStore, Store,
    StoreError, VolumeQuery,
};
use blocksnap::statedir::{StateDir, StateDirError};
use common::{bin, root};
use proptest::prelude::*;
use uuid::Uuid;

const DB_FILES: [&str; 3] = ["catalog.db", "catalog.db-wal", "catalog.db-shm"];

fn open(state: &Path) -> (SqliteStore, blocksnap::daemon::store::OpenReport) {
    SqliteStore::open(&StateDir::open(state).unwrap()).unwrap()
}

fn lose_catalog(state: &Path) {
    for n in DB_FILES {
        let _ = std::fs::remove_file(state.join(n));
    }
}

fn all_snapshots(s: &dyn Store) -> Vec<SnapshotRecord> {
    s.snapshots(&SnapshotQuery::default()).unwrap()
}

fn all_volumes(s: &dyn Store) -> Vec<VolumeRecord> {
    s.volumes(&VolumeQuery::default()).unwrap()
}

// ---- the model test ----

const STATUSES: [SnapStatus; 5] = [
    SnapStatus::Creating,
    SnapStatus::Available,
    SnapStatus::Deleting,
    SnapStatus::Error,
    SnapStatus::ErrorDeleting,
];
const VSTATUSES: [VolStatus; 5] = [
    VolStatus::Creating,
    VolStatus::Available,
    VolStatus::Deleting,
    VolStatus::Error,
    VolStatus::ErrorDeleting,
];
const VOLS: [&str; 3] = ["v0", "v1", "data.2"];
const VOL_IDS: [&str; 4] = ["v0", "v1", "m-0", "3f2e1d0c-b9a8-4776-8554-433221100fed"];
const TENANTS: [&str; 2] = ["acct", "other"];
const NAMES: [&str; 3] = ["a", "B", "b \"quoted\"\n\u{1b}[31m"];
const SIZES: [u64; 4] = [0, 1 << 30, 1 << 63, u64::MAX];

fn metadata(i: usize) -> BTreeMap<String, String> {
    match i {
        0 => BTreeMap::new(),
        1 => [("k".to_string(), "v".to_string())].into(),
        _ => [
            ("blocksnap:device".to_string(), "/dev/loop3".to_string()),
            ("ü \"x\"".to_string(), "line\nbreak\u{0}".to_string()),
        ]
        .into(),
    }
}

fn snapshot_strategy() -> impl Strategy<Value = SnapshotRecord> {
    (
        (0u128..10, 0usize..3, prop::option::of(0usize..2), 0usize..5),
        (0usize..3, 0i64..4, 0i64..3, 0usize..4, 0usize..3),
        prop::option::of("[a-z ]{0,8}"),
    )
        .prop_map(
            |((n, v, t, st), (name, c, u, sz, meta), err)| SnapshotRecord {
                id: Uuid::from_u128(n),
                volume_id: VOLS[v].into(),
                tenant: t.map(|t| TENANTS[t].into()),
                status: STATUSES[st],
                display_name: NAMES[name].into(),
                display_description: format!("desc {n}"),
                metadata: metadata(meta),
                created_us: c,
                updated_us: u,
                size_bytes: SIZES[sz],
                error: err,
                changed_bytes: n as u64,
                stored_bytes: 7,
                freeze_ms: 0.1 * n as f64,
                scheduled_us: None,
            },
        )
}

fn volume_strategy() -> impl Strategy<Value = VolumeRecord> {
    (
        (
            0usize..4,
            any::<bool>(),
            prop::option::of(0usize..2),
            0usize..5,
        ),
        (0usize..3, 0i64..4, 0i64..3, 0usize..4, 0usize..3),
    )
        .prop_map(|((i, made, t, st), (name, c, u, sz, meta))| VolumeRecord {
            id: VOL_IDS[i].into(),
            kind: if made {
                VolumeKind::Made {
                    image: PathBuf::from(format!("/var/lib/blocksnap/volumes/{}.img", VOL_IDS[i])),
                    device: (c % 2 == 0).then(|| PathBuf::from("/dev/loop5")),
                    snapshot_id: (u > 0).then(|| Uuid::from_u128(u as u128)),
                }
            } else {
                VolumeKind::Configured
            },
            tenant: t.map(|t| TENANTS[t].into()),
            status: VSTATUSES[st],
            display_name: NAMES[name].into(),
            display_description: String::new(),
            metadata: metadata(meta),
            created_us: c,
            updated_us: u,
            size_bytes: SIZES[sz],
            error: None,
        })
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => snapshot_strategy().prop_map(Change::PutSnapshot),
        2 => (0u128..12).prop_map(|n| Change::RemoveSnapshot(Uuid::from_u128(n))),
        3 => volume_strategy().prop_map(Change::PutVolume),
        1 => (0usize..5).prop_map(|i| Change::RemoveVolume(
            VOL_IDS.get(i).copied().unwrap_or("nothing").into()
        )),
    ]
}

fn page_strategy(snapshots: bool) -> impl Strategy<Value = Page> {
    let key = prop_oneof![
        Just(SortKey::CreatedAt),
        Just(SortKey::UpdatedAt),
        Just(SortKey::Id),
        Just(SortKey::Name),
        Just(SortKey::Status),
        Just(SortKey::Size),
    ];
    let dir = prop_oneof![Just(SortDir::Asc), Just(SortDir::Desc)];
    let marker = prop_oneof![
        3 => Just(None),
        2 => (0u128..12, any::<bool>()).prop_map(move |(n, upper)| {
            let m = if snapshots {
                Uuid::from_u128(n).to_string()
            } else {
                VOL_IDS.get(n as usize % 5).copied().unwrap_or("nope").to_string()
            };
            Some(if upper { m.to_uppercase() } else { m })
        }),
        1 => Just(Some("not-a-marker".to_string())),
    ];
    (
        prop::collection::vec((key, dir), 0..3),
        marker,
        0usize..3,
        prop_oneof![Just(0usize), Just(1), Just(2), Just(5), Just(usize::MAX)],
    )
        .prop_map(|(sort, marker, offset, limit)| Page {
            sort,
            marker,
            offset,
            limit,
        })
}

fn snapshot_query_strategy() -> impl Strategy<Value = SnapshotQuery> {
    (
        prop::option::of(0usize..2),
        prop::option::of(prop::collection::vec(0usize..4, 0..3)),
        prop::option::of(0usize..4),
        prop::option::of(0usize..5),
        prop::option::of(0usize..3),
        page_strategy(true),
    )
        .prop_map(|(t, vs, v, st, name, page)| SnapshotQuery {
            tenant: t.map(|t| TENANTS[t].into()),
            volumes: vs.map(|vs| {
                vs.into_iter()
                    .map(|i| VOLS.get(i).copied().unwrap_or("none").into())
                    .collect()
            }),
            volume_id: v.map(|i| VOLS.get(i).copied().unwrap_or("none").into()),
            status: st.map(|i| STATUSES[i].as_str().into()),
            name: name.map(|i| NAMES[i].into()),
            page,
        })
}

fn volume_query_strategy() -> impl Strategy<Value = VolumeQuery> {
    (
        prop::option::of(0usize..2),
        prop::option::of(0usize..5),
        prop::option::of(0usize..3),
        page_strategy(false),
    )
        .prop_map(|(t, st, name, page)| VolumeQuery {
            tenant: t.map(|t| TENANTS[t].into()),
            status: st.map(|i| VSTATUSES[i].as_str().into()),
            name: name.map(|i| NAMES[i].into()),
            page,
        })
}

#[derive(Clone, Debug)]
enum Step {
    Apply(Vec<Change>),
    Snapshots(SnapshotQuery),
    Volumes(VolumeQuery),
    Reopen,
    LoseCatalog,
    GarbleCatalog,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => prop::collection::vec(change_strategy(), 1..4).prop_map(Step::Apply),
        6 => snapshot_query_strategy().prop_map(Step::Snapshots),
        3 => volume_query_strategy().prop_map(Step::Volumes),
        1 => Just(Step::Reopen),
        1 => Just(Step::LoseCatalog),
        1 => Just(Step::GarbleCatalog),
    ]
}

/// Both answers, compared: equal records, or both the same error kind.
fn same<T: PartialEq + std::fmt::Debug>(
    sql: Result<Vec<T>, StoreError>,
    mem: Result<Vec<T>, StoreError>,
    what: &dyn std::fmt::Debug,
) -> Result<(), TestCaseError> {
    match (sql, mem) {
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{:?}", what),
        (Err(StoreError::UnknownMarker(a)), Err(StoreError::UnknownMarker(b))) => {
            prop_assert_eq!(a, b)
        }
        (a, b) => prop_assert!(false, "{:?}: sqlite {:?}, model {:?}", what, a, b),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// SqliteStore answers every query as MemStore (the contract's model)
    /// does, after any changes, reopens, and a lost or garbled catalog
    /// rebuilt from the notes.
    #[test]
    fn sqlite_store_behaves_like_the_model(steps in prop::collection::vec(step_strategy(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mem = MemStore::new();
        let (mut s, _) = open(&state);
        for step in &steps {
            match step {
                Step::Apply(changes) => {
                    s.apply(changes).unwrap();
                    mem.apply(changes).unwrap();
                }
                Step::Snapshots(q) => same(s.snapshots(q), mem.snapshots(q), q)?,
                Step::Volumes(q) => same(s.volumes(q), mem.volumes(q), q)?,
                Step::Reopen => {
                    drop(s);
                    let (n, r) = open(&state);
                    prop_assert_eq!(r.from, OpenedFrom::Catalog);
                    prop_assert_eq!(r.replayed, 0);
                    s = n;
                }
                Step::LoseCatalog | Step::GarbleCatalog => {
                    drop(s);
                    if matches!(step, Step::LoseCatalog) {
                        lose_catalog(&state);
                    } else {
                        use std::os::unix::fs::FileExt;
                        let f = std::fs::OpenOptions::new().write(true).open(state.join("catalog.db")).unwrap();
                        f.write_all_at(b"this is not what SQLite wrote here", 0).unwrap();
                    }
                    let (n, r) = open(&state);
                    let has_records = !mem.dump().0.is_empty() || !mem.dump().1.is_empty();
                    if has_records {
                        prop_assert!(r.rebuilt(), "{}", r);
                    }
                    if matches!(step, Step::GarbleCatalog) {
                        prop_assert!(!r.moved_aside.is_empty(), "{}", r);
                    }
                    s = n;
                }
            }
            let (snaps, vols) = mem.dump();
            let mut got = all_snapshots(&s);
            got.sort_by_key(|r| r.id);
            prop_assert_eq!(got, snaps);
            let mut got = all_volumes(&s);
            got.sort_by(|a, b| a.id.cmp(&b.id));
            prop_assert_eq!(got, vols);
        }
    }
}

// ---- kill -9 in the middle of applies ----

fn crash_snapshot(i: u128) -> SnapshotRecord {
    SnapshotRecord {
        id: Uuid::from_u128(i),
        volume_id: format!("v{}", i % 4),
        tenant: Some(TENANTS[(i % 2) as usize].into()),
        status: SnapStatus::Available,
        display_name: format!("s{i}"),
        display_description: String::new(),
        metadata: [("n".to_string(), i.to_string())].into(),
        created_us: i as i64,
        updated_us: 0,
        size_bytes: 1 << 20,
        error: None,
        changed_bytes: 0,
        stored_bytes: 0,
        freeze_ms: 0.0,
        scheduled_us: None,
    }
}

fn crash_volume(i: u128) -> VolumeRecord {
    VolumeRecord {
        id: format!("m{i}"),
        kind: VolumeKind::Made {
            image: PathBuf::from(format!("/x/m{i}.img")),
            device: None,
            snapshot_id: Some(Uuid::from_u128(i)),
        },
        tenant: Some(TENANTS[(i % 2) as usize].into()),
        status: VolStatus::Available,
        display_name: format!("m{i}"),
        display_description: String::new(),
        metadata: BTreeMap::new(),
        created_us: i as i64,
        updated_us: 0,
        size_bytes: 1 << 20,
        error: None,
    }
}

/// Change `i`: snapshot i and made volume m{i} together; every third one
/// also removes the pair three before it.
fn crash_change(i: u128, start: u128) -> Vec<Change> {
    let mut c = vec![
        Change::PutSnapshot(crash_snapshot(i)),
        Change::PutVolume(crash_volume(i)),
    ];
    if i % 3 == 0 && i >= start + 3 {
        c.push(Change::RemoveSnapshot(Uuid::from_u128(i - 3)));
        c.push(Change::RemoveVolume(format!("m{}", i - 3)));
    }
    c
}

/// The child of `kill_9_during_applies_loses_no_answered_change` (the same
/// test run again in a child process, told so by the environment): applies
/// changes forever, printing "ok N" once change N's apply returned.
fn store_crash_child(dir: &str) -> ! {
    use std::io::Write;
    let start: u128 = std::env::var("BLOCKSNAP_STORE_CHILD_START")
        .unwrap()
        .parse()
        .unwrap();
    let (s, _) = open(Path::new(dir));
    let mut out = std::io::stdout().lock();
    for i in start.. {
        s.apply(&crash_change(i, start)).unwrap();
        writeln!(out, "ok {i}").unwrap();
        out.flush().unwrap();
    }
    unreachable!("change numbers ran out")
}

#[test]
fn kill_9_during_applies_loses_no_answered_change() {
    if let Ok(dir) = std::env::var("BLOCKSNAP_STORE_CHILD_DIR") {
        store_crash_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut rng = common::Rng::new(0x5eed);
    let mut start: u128 = 1;
    // Pairs whose change was answered and not removed by an answered change.
    let mut expect_present: Vec<u128> = Vec::new();
    let mut expect_absent: Vec<u128> = Vec::new();
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill_9_during_applies_loses_no_answered_change",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BLOCKSNAP_STORE_CHILD_DIR", &state)
            .env("BLOCKSNAP_STORE_CHILD_START", start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = l.strip_prefix("ok ").and_then(|n| n.parse::<u128>().ok()) {
                    let _ = tx.send(n);
                }
            }
        });
        // Kill it at a random moment once it is well under way.
        let mut acked = Vec::new();
        while acked.len() < 5 {
            match rx.recv_timeout(std::time::Duration::from_secs(120)) {
                Ok(n) => acked.push(n),
                Err(_) => {
                    let _ = child.kill();
                    panic!("round {round}: the child answered only {acked:?}");
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.below(400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
        let last = *acked.last().unwrap();
        for &i in &acked {
            expect_present.push(i);
            if i % 3 == 0 && i >= start + 3 {
                expect_present.retain(|&p| p != i - 3);
                expect_absent.push(i - 3);
            }
        }
        let (s, r) = open(&state);
        assert_eq!(r.from, OpenedFrom::Catalog, "round {round}: {r}");
        // The one change in flight when it was killed may be there or not
        // (whole: checked below).
        if s.snapshot(Uuid::from_u128(last + 1)).unwrap().is_some() {
            expect_present.push(last + 1);
            if (last + 1) % 3 == 0 && last + 1 >= start + 3 {
                expect_present.retain(|&p| p != last - 2);
                expect_absent.push(last - 2);
            }
        }
        assert!(r.moved_aside.is_empty(), "round {round}: {r}");
        for &i in &expect_present {
            let snap = s.snapshot(Uuid::from_u128(i)).unwrap();
            assert_eq!(
                snap.map(|r| r.display_name),
                Some(format!("s{i}")),
                "round {round}: answered change {i} lost ({r})"
            );
            assert!(s.volume(&format!("m{i}")).unwrap().is_some());
        }
        for &i in &expect_absent {
            assert!(s.snapshot(Uuid::from_u128(i)).unwrap().is_none());
            assert!(s.volume(&format!("m{i}")).unwrap().is_none());
        }
        // Whole changes only: a snapshot and its volume come and go together.
        let snaps = all_snapshots(&s);
        let vols = all_volumes(&s);
        assert_eq!(snaps.len(), vols.len(), "round {round}");
        for sn in &snaps {
            let i = sn.id.as_u128();
            assert!(
                vols.iter().any(|v| v.id == format!("m{i}")),
                "round {round}: {i}"
            );
            assert!(i <= last + 1, "round {round}: {i} was never applied");
        }
        drop(s);
        start = last + 10;
    }
    // And the notes alone hold the same.
    let (s, _) = open(&state);
    let (snaps, vols) = (all_snapshots(&s), all_volumes(&s));
    drop(s);
    lose_catalog(&state);
    let (s, r) = open(&state);
    assert!(r.rebuilt(), "{r}");
    assert_eq!(all_snapshots(&s), snaps);
    assert_eq!(all_volumes(&s), vols);
}

// ---- concurrency ----

#[test]
fn concurrent_writers_and_readers_see_every_answered_change() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (s, _) = open(&state);
    let s = std::sync::Arc::new(s);
    let writers: Vec<_> = (0..8u128)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut r = crash_snapshot(w + 1);
                for k in 0..25 {
                    r.display_name = format!("w{w}-{k}");
                    r.metadata.insert(format!("k{k}"), format!("{w}"));
                    s.apply(&[Change::PutSnapshot(r.clone())]).unwrap();
                    // Read your write, from any connection.
                    assert_eq!(s.snapshot(r.id).unwrap().as_ref(), Some(&r));
                    let q = SnapshotQuery {
                        volume_id: Some(r.volume_id.clone()),
                        ..Default::default()
                    };
                    assert!(s.snapshots(&q).unwrap().contains(&r));
                }
                r
            })
        })
        .collect();
    let last: Vec<SnapshotRecord> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut want = last.clone();
    want.sort_by_key(|r| r.id);
    assert_eq!(sorted(&*s).0, want);
    drop(s);
    lose_catalog(&state);
    let (s, r) = open(&state);
    assert!(r.rebuilt(), "{r}");
    assert_eq!(sorted(&s).0, want);
}

// ---- migration, loss, damage ----

fn fixture() -> Catalog {
    serde_json::from_slice(&std::fs::read("tests/fixtures/catalog-v0.json").unwrap()).unwrap()
}

fn sorted(s: &dyn Store) -> (Vec<SnapshotRecord>, Vec<VolumeRecord>) {
    let mut a = all_snapshots(s);
    a.sort_by_key(|r| r.id);
    let mut b = all_volumes(s);
    b.sort_by(|x, y| x.id.cmp(&y.id));
    (a, b)
}

#[test]
fn catalog_json_is_migrated_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let text = std::fs::read("tests/fixtures/catalog-v0.json").unwrap();
    std::fs::write(state.join("catalog.json"), &text).unwrap();
    let cat = fixture();
    let want = (
        cat.snapshots.values().cloned().collect::<Vec<_>>(),
        cat.volumes.values().cloned().collect::<Vec<_>>(),
    );
    let (s, r) = open(&state);
    assert_eq!(
        r.from,
        OpenedFrom::Json {
            kept_as: state.join("catalog.json.migrated")
        },
        "{r}"
    );
    assert_eq!((r.snapshots, r.volumes), (3, 2));
    assert!(!state.join("catalog.json").exists());
    assert_eq!(
        std::fs::read(state.join("catalog.json.migrated")).unwrap(),
        text
    );
    assert_eq!(sorted(&s), want);
    // What only the catalog knew is in the notes beside the chains.
    for f in [
        "chains/data.notes",
        "chains/logs.notes",
        "volumes/3f2e1d0c-b9a8-4776-8554-433221100fed.notes",
    ] {
        assert!(state.join(f).is_file(), "{f}");
    }
    // Tenants still see only their own and the unowned.
    let q = SnapshotQuery {
        tenant: Some("other".into()),
        ..Default::default()
    };
    let names: Vec<String> = s
        .snapshots(&q)
        .unwrap()
        .into_iter()
        .map(|r| r.display_name)
        .collect();
    assert_eq!(names, ["failed one", "adopted"]);
    drop(s);
    // Not migrated twice.
    let (s, r) = open(&state);
    assert_eq!(r.from, OpenedFrom::Catalog);
    drop(s);
    // A crash after the migration's commit, before the old file was
    // renamed: the next open finishes it.
    std::fs::rename(
        state.join("catalog.json.migrated"),
        state.join("catalog.json"),
    )
    .unwrap();
    {
        let c = rusqlite::Connection::open(state.join("catalog.db")).unwrap();
        c.execute(
            "INSERT INTO meta (key, value) VALUES ('json_pending', '1')",
            [],
        )
        .unwrap();
    }
    let (s, r) = open(&state);
    assert!(r.migrated(), "{r}");
    assert!(!state.join("catalog.json").exists());
    assert_eq!(sorted(&s), want);
    drop(s);
    // An old catalog.json put back later is ignored, and said so.
    std::fs::write(state.join("catalog.json"), b"{}").unwrap();
    let (s, r) = open(&state);
    assert_eq!(r.from, OpenedFrom::Catalog);
    assert!(r.warnings.iter().any(|w| w.contains("ignored")), "{r}");
    assert_eq!(sorted(&s), want);
}

#[test]
fn a_lost_or_garbled_catalog_is_rebuilt_with_tenants_names_metadata_and_made_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::copy("tests/fixtures/catalog-v0.json", state.join("catalog.json")).unwrap();
    let (s, _) = open(&state);
    // Changes after the migration: a rename, metadata, a new made volume.
    let mut snap = s
        .snapshot("0b9f3e2a-5d1c-4c55-9a0e-2f1f6c3b8d01".parse().unwrap())
        .unwrap()
        .unwrap();
    snap.display_name = "renamed".into();
    snap.metadata.insert("added".into(), "later".into());
    let mut vol = crash_volume(77);
    vol.tenant = Some("other".into());
    s.apply(&[Change::PutSnapshot(snap), Change::PutVolume(vol)])
        .unwrap();
    let want = sorted(&s);
    drop(s);

    lose_catalog(&state);
    let (s, r) = open(&state);
    assert!(r.rebuilt(), "{r}");
    assert!(r.moved_aside.is_empty());
    assert_eq!(sorted(&s), want);
    drop(s);

    // Garbled: moved aside (kept), rebuilt.
    std::fs::write(state.join("catalog.db"), b"\0garbage\0".repeat(1000)).unwrap();
    let (s, r) = open(&state);
    assert!(
        matches!(&r.from, OpenedFrom::Notes { reason } if reason.contains("damaged")),
        "{r}"
    );
    assert_eq!(r.moved_aside.len(), 1, "{r}");
    let (from, to) = &r.moved_aside[0];
    assert_eq!(from, &state.join("catalog.db"));
    assert!(to.starts_with(state.join("damaged")));
    assert_eq!(std::fs::read(to).unwrap(), b"\0garbage\0".repeat(1000));
    assert_eq!(sorted(&s), want);
    let q = VolumeQuery {
        tenant: Some("acct".into()),
        ..Default::default()
    };
    assert!(s.volumes(&q).unwrap().iter().all(|v| v.id != "m77"));
    drop(s);

    // An empty (0-byte) catalog, as a crash of the old code could leave.
    std::fs::write(state.join("catalog.db"), b"").unwrap();
    let _ = std::fs::remove_file(state.join("catalog.db-wal"));
    let (s, r) = open(&state);
    assert!(r.rebuilt(), "{r}");
    assert_eq!(sorted(&s), want);
}

#[test]
fn a_garbage_catalog_json_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("catalog.json"), b"").unwrap();
    let (s, r) = open(&state);
    assert!(r.warnings.iter().any(|w| w.contains("not valid")), "{r}");
    assert_eq!(r.moved_aside.len(), 1, "{r}");
    assert!(!state.join("catalog.json").exists());
    assert!(all_snapshots(&s).is_empty());
}

// ---- the state directory ----

fn precious(dir: &Path) -> PathBuf {
    let target = dir.join("precious");
    std::fs::write(&target, b"root's secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    target
}

fn unchanged(target: &Path) {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::read(target).unwrap(), b"root's secret");
    assert_eq!(std::fs::metadata(target).unwrap().mode() & 0o7777, 0o600);
}

#[test]
fn planted_symlinks_in_the_state_directory_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = precious(dir.path());
    let state = dir.path().join("state");
    let (s, _) = open(&state);
    s.apply(&[
        Change::PutSnapshot(crash_snapshot(1)),
        Change::PutVolume(crash_volume(1)),
    ])
    .unwrap();
    drop(s);
    // The catalog's own names.
    for name in ["catalog.db-wal", "catalog.db-shm", "catalog.db"] {
        let _ = std::fs::remove_file(state.join(name));
        std::os::unix::fs::symlink(&target, state.join(name)).unwrap();
        let (s, r) = open(&state);
        assert!(r.rebuilt(), "{name}: {r}");
        assert!(
            r.moved_aside.iter().any(|(f, _)| f == &state.join(name)),
            "{name}: {r}"
        );
        assert!(s.snapshot(Uuid::from_u128(1)).unwrap().is_some(), "{name}");
        s.apply(&[Change::PutSnapshot(crash_snapshot(2))]).unwrap();
        drop(s);
        unchanged(&target);
    }
    // The old catalog's names.
    std::os::unix::fs::symlink(&target, state.join("catalog.json")).unwrap();
    std::os::unix::fs::symlink(&target, state.join("catalog.json.tmp")).unwrap();
    let (s, _) = open(&state);
    drop(s);
    unchanged(&target);
    // A notes file: moved aside, rewritten from the catalog.
    let notes = state.join("chains/v1.notes");
    std::fs::remove_file(&notes).unwrap();
    std::os::unix::fs::symlink(&target, &notes).unwrap();
    let (s, r) = open(&state);
    assert!(r.moved_aside.iter().any(|(f, _)| f == &notes), "{r}");
    assert!(std::fs::symlink_metadata(&notes).unwrap().is_file());
    // ... and while running: replaced, not written through.
    let notes = state.join("volumes/m1.notes");
    std::fs::remove_file(&notes).unwrap();
    std::os::unix::fs::symlink(&target, &notes).unwrap();
    let mut v = crash_volume(1);
    v.display_name = "renamed".into();
    s.apply(&[Change::PutVolume(v)]).unwrap();
    assert!(std::fs::symlink_metadata(&notes).unwrap().is_file());
    unchanged(&target);
    // The old whole-file catalog's save (still what the daemon uses until
    // the store is wired in) does not follow catalog.json.tmp either.
    blocksnap::daemon::catalog::Catalog::default()
        .save(&state.join("catalog.json"))
        .unwrap();
    unchanged(&target);
}

#[test]
fn files_the_store_makes_are_private() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (s, _) = open(&state);
    s.apply(&[
        Change::PutSnapshot(crash_snapshot(1)),
        Change::PutVolume(crash_volume(1)),
    ])
    .unwrap();
    for f in [
        "catalog.db",
        "catalog.db-wal",
        "chains/v1.notes",
        "volumes/m1.notes",
    ] {
        let m = std::fs::metadata(state.join(f)).unwrap().mode() & 0o777;
        assert_eq!(m, 0o600, "{f}");
    }
    for d in ["", "chains", "volumes"] {
        let m = std::fs::metadata(state.join(d)).unwrap().mode() & 0o777;
        assert_eq!(m, 0o700, "{d}");
    }
}

fn check_config(state: &Path, dir: &Path) -> std::process::Output {
    let cfg = dir.join("check.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\n[[tokens]]\ntenant = \"t\"\ntoken = \"secret-token\"\n",
            dir.join("s.sock").display(),
            state.display()
        ),
    )
    .unwrap();
    Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap()
}

fn start_daemon(state: &Path, dir: &Path) -> std::process::Output {
    let cfg = dir.join("start.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\n[[tokens]]\ntenant = \"t\"\ntoken = \"secret-token\"\n",
            dir.join("s.sock").display(),
            state.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It must refuse at once; if it is still running after 10 s, stop it
    // and fail below.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_state_directory_others_can_write_is_refused_at_start_and_by_check_config() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = check_config(&state, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("can be written by group or others")
            && err.contains(&*state.to_string_lossy()),
        "{err}"
    );
    let out = start_daemon(&state, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon started: {err}");
    assert!(err.contains("can be written by group or others"), "{err}");
    assert!(!state.join("chains").exists(), "nothing was created in it");
    // A parent directory others can write (without the sticky bit).
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = check_config(&state.join("inner"), dir.path());
    assert!(!out.status.success());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // Fine: accepted, and says it will create it.
    let out = check_config(&state.join("inner"), dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("created at start"), "{text}");
}

#[test]
fn a_state_directory_owned_by_another_user_is_refused() {
    if !root("a_state_directory_owned_by_another_user_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = precious(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // What the ordinary user did: own the directory, plant a link.
    std::os::unix::fs::symlink(&target, state.join("catalog.json.tmp")).unwrap();
    std::os::unix::fs::symlink(&target, state.join("catalog.db")).unwrap();
    let nobody = nix::unistd::Uid::from_raw(65534);
    nix::unistd::chown(&state, Some(nobody), None).unwrap();
    assert!(matches!(
        StateDir::open(&state),
        Err(StateDirError::Owner { owner: 65534, .. })
    ));
    let out = check_config(&state, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("owned by uid 65534"), "{err}");
    let out = start_daemon(&state, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon started: {err}");
    assert!(err.contains("owned by uid 65534"), "{err}");
    unchanged(&target);
    // A subdirectory owned by another user.
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    std::fs::remove_file(state.join("catalog.db")).unwrap();
    std::fs::create_dir(state.join("chains")).unwrap();
    nix::unistd::chown(&state.join("chains"), Some(nobody), None).unwrap();
    let out = check_config(&state, dir.path());
    assert!(!out.status.success());
    let out = start_daemon(&state, dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("owned by uid 65534"));
    // A parent owned by another user.
    let parent = dir.path().join("theirs");
    std::fs::create_dir(&parent).unwrap();
    nix::unistd::chown(&parent, Some(nobody), None).unwrap();
    assert!(matches!(
        StateDir::open(&parent.join("state")),
        Err(StateDirError::Owner { .. })
    ));
    assert!(!parent.join("state").exists());
    unchanged(&target);
}
