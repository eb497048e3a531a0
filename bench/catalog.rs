//! The catalog's cost at 10^3, 10^4 and 10^5 records: the old whole-file
//! JSON catalog (`catalog.json` rewritten on every change) against
//! SqliteStore (SQLite + notes beside the chains).
//!
//!     cargo run --release --example catalog_bench -- [--dir DIR] [--sizes 1000,10000,100000] [--abuse]
//!
//! DIR (default target/catalog-bench) must be on the disk the daemon's
//! state would be on: the numbers are mostly fsyncs. Prints a Markdown
//! table; BENCHMARKS.md has the last one.
//!
//! - update: one snapshot renamed. JSON: clone the catalog and rewrite the
//!   file (what `Daemon::update` did); SQLite: `Store::apply`.
//! - list page: 1000 snapshots one tenant sees, newest first, after a
//!   marker. JSON: filter, sort and page the whole map in memory (what the
//!   API did); SQLite: `Store::snapshots`.
//! - `--abuse`: issue 12's case, 40 records with ~950 KB of metadata among
//!   10^4, and the cost of an unrelated rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blocksnap::daemon::catalog::{
    Catalog, SnapStatus, SnapshotRecord, VolStatus, VolumeKind, VolumeRecord,
};
use blocksnap::daemon::store::{Change, Page, SnapshotQuery, SqliteStore, Store};
use blocksnap::statedir::StateDir;
use uuid::Uuid;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn snapshot(i: u64, volumes: u64, big: bool) -> SnapshotRecord {
    let mut metadata = BTreeMap::from([
        ("schedule".to_string(), "hourly".to_string()),
        ("keep".to_string(), "48".to_string()),
    ]);
    if big {
        metadata.insert("blob".into(), "x".repeat(950_000));
    }
    SnapshotRecord {
        id: Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 | i as u128),
        volume_id: format!("vol-{:04}", i % volumes),
        tenant: Some(if i % 2 == 0 { "acct" } else { "other" }.into()),
        status: SnapStatus::Available,
        display_name: format!("hourly-{i:08}"),
        display_description: "taken by the hourly schedule".into(),
        metadata,
        created_us: 1_700_000_000_000_000 + i as i64 * 3_600_000_000,
        updated_us: 0,
        size_bytes: 64 << 30,
        error: None,
        changed_bytes: 1 << 30,
        stored_bytes: 900 << 20,
        freeze_ms: 12.5,
        scheduled_us: None,
    }
}

fn catalog(n: u64, big: u64) -> Catalog {
    let volumes = (n / 200).max(1);
    let mut c = Catalog::default();
    for i in 0..n {
        let r = snapshot(i, volumes, i < big);
        c.snapshots.insert(r.id, r);
    }
    for v in 0..volumes {
        let id = format!("vol-{v:04}");
        c.volumes.insert(
            id.clone(),
            VolumeRecord {
                id: id.clone(),
                kind: VolumeKind::Configured,
                tenant: None,
                status: VolStatus::Available,
                display_name: id,
                display_description: String::new(),
                metadata: BTreeMap::new(),
                created_us: 1,
                updated_us: 0,
                size_bytes: 64 << 30,
                error: None,
            },
        );
    }
    c
}

fn pct(mut v: Vec<Duration>) -> (f64, f64, usize) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = v.len();
    let p99 = ((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1;
    (ms(v[n / 2]), ms(v[p99]), n)
}

/// The old API's list: every visible record, sorted newest first, then a
/// page after the marker.
fn json_list(c: &Catalog, tenant: &str, marker: Uuid) -> Vec<SnapshotRecord> {
    let mut v: Vec<&SnapshotRecord> = c
        .snapshots
        .values()
        .filter(|r| r.tenant.as_deref().is_none_or(|t| t == tenant))
        .collect();
    v.sort_by(|a, b| b.created_us.cmp(&a.created_us).then(a.id.cmp(&b.id)));
    let start = v.iter().position(|r| r.id == marker).map_or(0, |i| i + 1);
    v[start..].iter().take(1000).map(|r| (*r).clone()).collect()
}

struct Row {
    what: String,
    update: (f64, f64, usize),
    list: (f64, f64, usize),
    file: u64,
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let md = e.metadata().unwrap();
            n += if md.is_dir() {
                dir_size(&e.path())
            } else {
                md.len()
            };
        }
    }
    n
}

fn bench_json(dir: &Path, n: u64, big: u64, updates: usize, lists: usize) -> Row {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("catalog.json");
    let mut c = catalog(n, big);
    c.save(&path).unwrap();
    let ids: Vec<Uuid> = c.snapshots.keys().copied().collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut up = Vec::new();
    for k in 0..updates {
        // An unrelated record (never one of the big ones).
        let id = ids[(big + rng.below(n - big)) as usize];
        let t = Instant::now();
        c.snapshots.get_mut(&id).unwrap().display_name = format!("renamed-{k}");
        let copy = c.clone();
        copy.save(&path).unwrap();
        up.push(t.elapsed());
    }
    let mut li = Vec::new();
    for _ in 0..lists {
        // A record the tenant sees (even ones are "acct"'s).
        let marker = ids[(rng.below(n / 2) * 2) as usize];
        let t = Instant::now();
        let page = json_list(&c, "acct", marker);
        std::hint::black_box(page);
        li.push(t.elapsed());
    }
    Row {
        what: "JSON file".into(),
        update: pct(up),
        list: pct(li),
        file: std::fs::metadata(&path).unwrap().len(),
    }
}

struct SqlTimes {
    migrate: Duration,
    reopen: Duration,
    rebuild: Duration,
}

fn bench_sqlite(dir: &Path, n: u64, big: u64, updates: usize, lists: usize) -> (Row, SqlTimes) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let c = catalog(n, big);
    c.save(&dir.join("catalog.json")).unwrap();
    let t = Instant::now();
    let (s, r) = SqliteStore::open(&StateDir::open(dir).unwrap()).unwrap();
    let migrate = t.elapsed();
    assert!(r.migrated(), "{r}");
    let mut recs: Vec<SnapshotRecord> = c.snapshots.values().cloned().collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut up = Vec::new();
    for k in 0..updates {
        let i = (big + rng.below(n - big)) as usize;
        recs[i].display_name = format!("renamed-{k}");
        let change = [Change::PutSnapshot(recs[i].clone())];
        let t = Instant::now();
        s.apply(&change).unwrap();
        up.push(t.elapsed());
    }
    let mut li = Vec::new();
    for _ in 0..lists {
        let marker = recs[(rng.below(n / 2) * 2) as usize].id;
        let q = SnapshotQuery {
            tenant: Some("acct".into()),
            page: Page {
                marker: Some(marker.to_string()),
                limit: 1000,
                ..Default::default()
            },
            ..Default::default()
        };
        let t = Instant::now();
        let page = s.snapshots(&q).unwrap();
        li.push(t.elapsed());
        std::hint::black_box(page);
    }
    drop(s);
    let t = Instant::now();
    let (s, _) = SqliteStore::open(&StateDir::open(dir).unwrap()).unwrap();
    let reopen = t.elapsed();
    drop(s);
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let t = Instant::now();
    let (s, r) = SqliteStore::open(&StateDir::open(dir).unwrap()).unwrap();
    let rebuild = t.elapsed();
    assert!(r.rebuilt(), "{r}");
    assert_eq!(r.snapshots as u64, n);
    drop(s);
    let size = std::fs::metadata(dir.join("catalog.db")).unwrap().len();
    (
        Row {
            what: "SqliteStore".into(),
            update: pct(up),
            list: pct(li),
            file: size,
        },
        SqlTimes {
            migrate,
            reopen,
            rebuild,
        },
    )
}

/// What the disk itself costs: one 300-byte append + fdatasync, and two
/// of them to two files in a row (an update's minimum: the notes, then
/// SQLite's WAL).
fn fsync_floor(dir: &Path) -> ((f64, f64, usize), (f64, f64, usize)) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let open = |n: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(n))
            .unwrap()
    };
    let (mut a, mut b) = (open("a"), open("b"));
    let line = [b'x'; 300];
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..500 {
        let t = Instant::now();
        a.write_all(&line).unwrap();
        a.sync_data().unwrap();
        one.push(t.elapsed());
        let t = Instant::now();
        a.write_all(&line).unwrap();
        a.sync_data().unwrap();
        b.write_all(&line).unwrap();
        b.sync_data().unwrap();
        two.push(t.elapsed());
    }
    let _ = std::fs::remove_dir_all(dir);
    (pct(one), pct(two))
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
}

fn main() {
    let mut dir = PathBuf::from("target/catalog-bench");
    let mut sizes = vec![1_000u64, 10_000, 100_000];
    let mut abuse = false;
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = PathBuf::from(args.next().expect("--dir DIR")),
            "--sizes" => {
                sizes = args
                    .next()
                    .expect("--sizes N,N")
                    .split(',')
                    .map(|s| s.parse().expect("a number"))
                    .collect()
            }
            "--abuse" => abuse = true,
            "--keep" => keep = true,
            _ => panic!("usage: catalog_bench [--dir DIR] [--sizes N,N,...] [--abuse] [--keep]"),
        }
    }
    let dir = std::path::absolute(&dir).unwrap();
    println!(
        "| records | catalog | update p50 | update p99 | list page p50 | list page p99 | on disk |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut extra = Vec::new();
    let mut run = |label: String, n: u64, big: u64| {
        // Fewer samples where one JSON rewrite takes long.
        let json_updates = match n {
            0..=2_000 => 1000,
            2_001..=20_000 => 200,
            _ => 30,
        };
        let json_lists = if n > 20_000 { 50 } else { 200 };
        let j = bench_json(
            &dir.join(format!("json-{n}")),
            n,
            big,
            json_updates,
            json_lists,
        );
        let (s, times) = bench_sqlite(&dir.join(format!("sqlite-{n}")), n, big, 1000, 200);
        let notes = dir_size(&dir.join(format!("sqlite-{n}/chains")));
        for r in [j, s] {
            println!(
                "| {label} | {} | {:.2} ms | {:.2} ms (n={}) | {:.2} ms | {:.2} ms (n={}) | {} |",
                r.what,
                r.update.0,
                r.update.1,
                r.update.2,
                r.list.0,
                r.list.1,
                r.list.2,
                mib(r.file)
            );
        }
        extra.push(format!(
            "- {label}: migration from catalog.json {:.2} s, reopen {:.3} s, rebuild from the notes {:.2} s; notes files {}",
            times.migrate.as_secs_f64(),
            times.reopen.as_secs_f64(),
            times.rebuild.as_secs_f64(),
            mib(notes)
        ));
    };
    for &n in &sizes {
        run(format!("{n}"), n, 0);
    }
    if abuse {
        run("10000 + 40 × 950 KB metadata".into(), 10_040, 40);
    }
    println!();
    for e in extra {
        println!("{e}");
    }
    let (one, two) = fsync_floor(&dir.join("floor"));
    println!(
        "- the disk under {}: one append + fdatasync p50 {:.2} ms, p99 {:.2} ms; two in a row p50 {:.2} ms, p99 {:.2} ms (n={})",
        dir.display(),
        one.0,
        one.1,
        two.0,
        two.1,
        two.2
    );
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
