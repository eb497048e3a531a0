//! Crash injection: SIGKILL at every fault point (and at random moments),
//! seeded and reproducible, then check that nothing was lost and nothing
//! is left frozen.
//!
//! BLOCKSNAP_CRASH_SEED picks the seed (printed on failure);
//! BLOCKSNAP_CRASH_POINTS the number of injected crashes (default 50; the
//! long form in RELIABILITY.md uses 500).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blocksnap::fault::{Operation, Point};
use common::*;
use sha2::Digest;

fn seed() -> u64 {
    std::env::var("BLOCKSNAP_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261127)
}

fn crashes() -> usize {
    std::env::var("BLOCKSNAP_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// sha256 of a snapshot's restored image.
fn restore_hash(chain: &Path, id: &str, tmp: &Path) -> String {
    let t = tmp.join("h.img");
    let _ = std::fs::remove_file(&t);
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        t.as_os_str(),
    ]);
    let mut f = std::fs::File::open(&t).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    std::fs::remove_file(&t).unwrap();
    format!("{:x}", h.finalize())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Snapshot,
    Delete,
    Volume,
    Revert,
}

impl Op {
    fn operation(self) -> Operation {
        match self {
            Op::Snapshot => Operation::Take,
            Op::Delete => Operation::Delete,
            Op::Volume => Operation::MakeVolume,
            Op::Revert => Operation::Revert,
        }
    }
}

/// sha256 of a device or file.
fn file_hash(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Wait until the daemon died or `done` says the operation finished.
fn until_dead_or(d: &mut DaemonProc, mut done: impl FnMut(&DaemonProc) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = d.child.as_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                d.child = None;
                return true;
            }
        }
        if done(d) {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "operation neither finished nor crashed:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the harness asked for, and whether the answer arrived.
enum Issued {
    Create { id: Option<String> },
    Delete { id: String, accepted: bool },
    Volume,
    Revert { to: String, accepted: bool },
}

#[test]
fn the_daemon_survives_sigkill_anywhere() {
    if !root("the_daemon_survives_sigkill_anywhere") {
        return;
    }
    let seed = seed();
    let n = crashes();
    eprintln!("crash harness: seed {seed}, {n} crashes (BLOCKSNAP_CRASH_SEED to reproduce)");
    let mut rng = Rng::new(seed);
    let a = Loop::new(64 << 20);
    mkfs("ext4", &a.dev);
    let m = Mounted::new(&a.dev, "ext4", "");
    let b = Loop::new(32 << 20);
    write_at(&b.dev, 0, &random_bytes(seed, 32 << 20));
    let vols = format!(
        "{}{}",
        volume_toml("vol-a", &a.dev, ""),
        volume_toml("vol-b", &b.dev, "quiesce = \"none\"")
    );
    let mut d = DaemonProc::start("", &vols);
    let tmp = tempfile::tempdir().unwrap();
    // Every available snapshot: its volume and the hash of its restored image.
    let mut known: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut plan: Vec<(Op, &str)> = Vec::new();
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        if plan.is_empty() {
            // One round over every point, in a seeded order.
            for op in [Op::Snapshot, Op::Delete, Op::Volume, Op::Revert] {
                plan.extend(
                    Point::on(op.operation())
                        .into_iter()
                        .map(|p| (op, p.name())),
                );
            }
            plan.extend([
                (Op::Snapshot, "random"),
                (Op::Delete, "random"),
                (Op::Snapshot, "random"),
                (Op::Revert, "random"),
            ]);
            for k in (1..plan.len()).rev() {
                plan.swap(k, rng.below(k as u64 + 1) as usize);
            }
        }
        let (op, point) = plan.pop().unwrap();
        // Reverts need an unmounted volume: vol-b.
        let vol = if op == Op::Revert || rng.below(3) == 0 {
            "vol-b"
        } else {
            "vol-a"
        };
        // Change the volume so the snapshot has something to store.
        if vol == "vol-a" {
            let p = m.dir.join(format!("f{}", rng.below(8)));
            std::fs::write(
                &p,
                random_bytes(rng.next(), (rng.below(4) as usize + 1) << 20),
            )
            .unwrap();
            nix::unistd::sync();
        } else {
            for _ in 0..50 {
                write_at(
                    &b.dev,
                    rng.below(8192) * 4096,
                    &random_bytes(rng.next(), 4096),
                );
            }
        }
        // Deletes and volumes need an available snapshot to work on, reverts
        // one of vol-b.
        if (op != Op::Snapshot && known.is_empty())
            || (op == Op::Revert && !known.values().any(|(v, _)| v == "vol-b"))
        {
            let id = d.snapshot(vol, "base");
            let h = restore_hash(&d.chain(vol), &id, tmp.path());
            known.insert(id, (vol.to_string(), h));
            if op == Op::Revert {
                // Something to revert.
                for _ in 0..50 {
                    write_at(
                        &b.dev,
                        rng.below(8192) * 4096,
                        &random_bytes(rng.next(), 4096),
                    );
                }
            }
        }
        let hit = if point == "append" {
            1 + rng.below(3)
        } else {
            1
        };
        let hit_s = hit.to_string();
        d.stop();
        if point == "random" {
            d.set_env(&[]);
        } else {
            d.set_env(&[
                ("BLOCKSNAP_FAULT_POINT", point),
                ("BLOCKSNAP_FAULT_ACTION", "kill"),
                ("BLOCKSNAP_FAULT_HIT", &hit_s),
            ]);
        }
        d.spawn();
        let target = if op == Op::Revert {
            let of_b: Vec<&String> = known
                .iter()
                .filter(|(_, (v, _))| v == "vol-b")
                .map(|(id, _)| id)
                .collect();
            Some(of_b[rng.below(of_b.len() as u64) as usize].clone())
        } else {
            known
                .keys()
                .nth(rng.below(known.len().max(1) as u64) as usize)
                .cloned()
        };
        // The job can crash the daemon before the answer to the request that
        // started it is sent: a lost answer, as a real client may see.
        let issued = match op {
            Op::Snapshot => {
                let r = d.try_request(
                    "POST",
                    "/snapshots",
                    &format!(r#"{{"snapshot": {{"volume_id": "{vol}"}}}}"#),
                );
                Issued::Create {
                    id: r.map(|r| {
                        assert_eq!(r.status, 200, "{}", r.body);
                        r.json()["snapshot"]["id"].as_str().unwrap().to_string()
                    }),
                }
            }
            Op::Delete => {
                let id = target.clone().unwrap();
                let r = d.try_request("DELETE", &format!("/snapshots/{id}"), "");
                if let Some(r) = &r {
                    assert_eq!(r.status, 202, "{}", r.body);
                }
                Issued::Delete {
                    id,
                    accepted: r.is_some(),
                }
            }
            Op::Volume => {
                let id = target.clone().unwrap();
                if let Some(r) = d.try_request(
                    "POST",
                    "/volumes",
                    &format!(r#"{{"volume": {{"snapshot_id": "{id}"}}}}"#),
                ) {
                    assert_eq!(r.status, 200, "{}", r.body);
                }
                Issued::Volume
            }
            Op::Revert => {
                let id = target.clone().unwrap();
                let r = d.try_request(
                    "POST",
                    "/volumes/vol-b/action",
                    &format!(r#"{{"revert": {{"snapshot_id": "{id}"}}}}"#),
                );
                if let Some(r) = &r {
                    assert_eq!(r.status, 202, "{}", r.body);
                }
                Issued::Revert {
                    to: id,
                    accepted: r.is_some(),
                }
            }
        };
        let crashed = if point == "random" {
            std::thread::sleep(Duration::from_millis(rng.below(150)));
            d.kill9();
            true
        } else {
            until_dead_or(&mut d, |d| match &issued {
                Issued::Create { id: Some(id) } => d
                    .try_call("GET", &format!("/snapshots/{id}"))
                    .is_some_and(|r| r.json()["snapshot"]["status"] != "creating"),
                Issued::Delete { id, accepted: true } => d
                    .try_call("GET", &format!("/snapshots/{id}"))
                    .is_some_and(|r| r.status == 404),
                Issued::Revert { .. } => d
                    .try_call("GET", "/volumes/vol-b")
                    .is_some_and(|r| r.json()["volume"]["status"] != "reverting"),
                Issued::Volume => d.try_call("GET", "/volumes/detail").is_some_and(|r| {
                    !r.json()["volumes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|v| v["status"] == "creating")
                }),
                // The answer was lost: the daemon is dying or dead.
                _ => false,
            })
        };
        if !crashed {
            // The point was not on this operation's path: crash now instead.
            d.kill9();
        }
        *hits.entry(format!("{op:?}:{point}:{crashed}")).or_default() += 1;
        d.set_env(&[]);
        d.spawn();
        let ctx = format!("crash {i} (seed {seed}): {op:?} at {point}");
        // A revert whose intent was recorded is resumed by the start.
        let vb = d.wait_volume("vol-b", &["reverting"]);
        if let Issued::Revert { to, accepted } = &issued {
            // Nothing stops it (vol-b is not mounted), so an interrupted
            // revert is resumed to the end: never left half done.
            assert_ne!(vb["status"], "error", "{ctx}: revert not resumed: {vb}");
            assert!(
                vb["metadata"]["blocksnap:reverting_to"].is_null(),
                "{ctx}: {vb}"
            );
            // The intent is durable before the answer: an accepted revert
            // completed (a lost answer may have lost the request too).
            if *accepted {
                assert_eq!(
                    vb["metadata"]["blocksnap:reverted_to"],
                    to.as_str(),
                    "{ctx}: an accepted revert did not complete: {vb}"
                );
            }
            if *accepted {
                assert_eq!(
                    file_hash(&b.dev),
                    known[to].1,
                    "{ctx}: volume reverted to {to} does not hold it"
                );
            }
        }

        // Nothing frozen; the filesystem still there and writable.
        assert!(!is_frozen(&m.dir), "{ctx}: filesystem left frozen");
        std::fs::write(m.dir.join("probe"), b"ok")
            .unwrap_or_else(|e| panic!("{ctx}: not writable: {e}"));
        // No operation left half-done; an accepted delete is complete.
        let list = d.call("GET", "/snapshots/detail", None).json();
        let listed: BTreeMap<String, String> = list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_string(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for (id, status) in &listed {
            assert!(
                status == "available" || status == "error",
                "{ctx}: snapshot {id} is {status} after restart"
            );
        }
        if let Issued::Delete { id, accepted } = &issued {
            if *accepted {
                assert!(
                    !listed.contains_key(id),
                    "{ctx}: an accepted delete did not complete"
                );
            }
            if !listed.contains_key(id) {
                known.remove(id);
            }
        }
        // Every snapshot that was available still is, and restores exactly as before.
        for (id, (v, h)) in &known {
            assert_eq!(
                listed.get(id).map(String::as_str),
                Some("available"),
                "{ctx}: snapshot {id}"
            );
            assert_eq!(
                &restore_hash(&d.chain(v), id, tmp.path()),
                h,
                "{ctx}: snapshot {id} restores differently"
            );
        }
        // New snapshots: a committed one is kept, an interrupted one is error (and removed).
        for (id, status) in &listed {
            if known.contains_key(id) {
                continue;
            }
            if let Issued::Create { id: Some(created) } = &issued {
                assert_eq!(id, created, "{ctx}: a snapshot nobody asked for");
            }
            if status == "available" {
                let h = restore_hash(&d.chain(vol), id, tmp.path());
                known.insert(id.clone(), (vol.to_string(), h));
            } else {
                assert_eq!(
                    d.call("DELETE", &format!("/snapshots/{id}"), None).status,
                    202,
                    "{ctx}"
                );
                let after = d.wait_snapshot(id);
                assert!(
                    after.is_null(),
                    "{ctx}: error snapshot not deleted: {after}\n{}",
                    d.log_text()
                );
            }
        }
        // Volumes made from snapshots: available or error, never half-made; removed again.
        for v in d.call("GET", "/volumes/detail", None).json()["volumes"]
            .as_array()
            .unwrap()
            .clone()
        {
            let vid = v["id"].as_str().unwrap();
            if vid == "vol-a" || vid == "vol-b" {
                continue;
            }
            assert!(
                v["status"] == "available" || v["status"] == "error",
                "{ctx}: made volume is {}",
                v["status"]
            );
            assert_eq!(
                d.call("DELETE", &format!("/volumes/{vid}"), None).status,
                202,
                "{ctx}"
            );
            assert!(
                d.wait_volume(vid, &["deleting"]).is_null(),
                "{ctx}: volume not deleted"
            );
        }
        for v in ["vol-a", "vol-b"] {
            if d.chain(v).exists() {
                let out = cli(["chain".as_ref(), "verify".as_ref(), d.chain(v).as_os_str()]);
                assert!(
                    out.status.success(),
                    "{ctx}: {v} chain does not verify: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        // Keep the chains short.
        while known.len() > 5 {
            let id = known.keys().next().unwrap().clone();
            assert_eq!(
                d.call("DELETE", &format!("/snapshots/{id}"), None).status,
                202
            );
            assert!(d.wait_snapshot(&id).is_null());
            known.remove(&id);
        }
    }
    eprintln!("crash harness: {hits:?}");
    // Every point the code has, from the one list of them.
    let daemon_ops = [
        Operation::Take,
        Operation::Delete,
        Operation::MakeVolume,
        Operation::Revert,
    ];
    for p in Point::ALL
        .iter()
        .filter(|p| p.operations().iter().any(|o| daemon_ops.contains(o)))
    {
        assert!(
            hits.keys()
                .any(|k| k.contains(&format!(":{}:true", p.name()))),
            "fault point {p} never crashed the daemon: {hits:?}"
        );
    }
}

/// The CLI's `chain take` and `chain delete`, killed at each point of their
/// write path: the commit record decides, exactly.
#[test]
fn the_cli_survives_sigkill_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dev.img");
    make_image(&img, 16 << 20, 3);
    let chain = dir.path().join("dev.chain");
    let mut rng = Rng::new(seed());
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    let first = take(&img, &chain, &[]);
    known.insert(first.clone(), restore_hash(&chain, &first, dir.path()));
    let killed = |args: &[&std::ffi::OsStr], point: &str, hit: u64| {
        let out = Command::new(bin("blocksnap"))
            .args(args)
            .env("BLOCKSNAP_FAULT_POINT", point)
            .env("BLOCKSNAP_FAULT_ACTION", "kill")
            .env("BLOCKSNAP_FAULT_HIT", hit.to_string())
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: not killed ({:?}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let check = |known: &BTreeMap<String, String>, ctx: &str| {
        let c = blocksnap::chain::Chain::open(&chain, blocksnap::chain::Access::Read).unwrap();
        let ids: Vec<String> = c.snapshots().iter().map(|s| s.id.to_string()).collect();
        let mut want: Vec<String> = known.keys().cloned().collect();
        let mut got = ids.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{ctx}");
        for (id, h) in known {
            assert_eq!(&restore_hash(&chain, id, dir.path()), h, "{ctx}: {id}");
        }
        let out = cli(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
        assert!(
            out.status.success(),
            "{ctx}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    // A take killed while it creates a new chain leaves no chain (only a
    // temporary file); the next take creates it.
    let fresh = dir.path().join("fresh.chain");
    killed(
        &[
            "chain".as_ref(),
            "take".as_ref(),
            img.as_os_str(),
            fresh.as_os_str(),
        ],
        Point::ChainCreate.name(),
        1,
    );
    assert!(!fresh.exists(), "a half-created chain was left in place");
    let id = take(&img, &fresh, &[]);
    assert_eq!(restore_hash(&fresh, &id, dir.path()), {
        let mut h = sha2::Sha256::new();
        h.update(read_all(&img));
        format!("{:x}", h.finalize())
    });
    for round in 0..2 {
        for point in [
            Point::Append,
            Point::MidScan,
            Point::AfterScan,
            Point::BeforeCommit,
            Point::CommitWritten,
            Point::CommitSynced,
            Point::CommitRecorded,
            Point::AfterCommit,
        ] {
            let point = point.name();
            for _ in 0..30 {
                write_at(
                    &img,
                    rng.below(4096) * 4096,
                    &random_bytes(rng.next(), 4096),
                );
            }
            let before: Vec<String> = known.keys().cloned().collect();
            // "append" happens many times per take: crash at a later one too.
            let hit = if point == "append" { 1 + round } else { 1 };
            killed(
                &[
                    "chain".as_ref(),
                    "take".as_ref(),
                    img.as_os_str(),
                    chain.as_os_str(),
                ],
                point,
                hit,
            );
            let c = blocksnap::chain::Chain::open(&chain, blocksnap::chain::Access::Read).unwrap();
            let new: Vec<String> = c
                .snapshots()
                .iter()
                .map(|s| s.id.to_string())
                .filter(|id| !before.contains(id))
                .collect();
            // The snapshot exists exactly when its commit record was written.
            let committed = matches!(point, "commit-recorded" | "after-commit");
            assert_eq!(
                new.len(),
                usize::from(committed),
                "take killed at {point}: {new:?}"
            );
            for id in new {
                let h = restore_hash(&chain, &id, dir.path());
                known.insert(id, h);
            }
            check(&known, &format!("take killed at {point}"));
        }
        for point in [
            Point::CommitWritten,
            Point::CommitSynced,
            Point::CommitRecorded,
            Point::DeleteReclaim,
        ] {
            let point = point.name();
            let victim = known
                .keys()
                .nth(rng.below(known.len() as u64) as usize)
                .unwrap()
                .clone();
            killed(
                &[
                    "chain".as_ref(),
                    "delete".as_ref(),
                    chain.as_os_str(),
                    victim.as_ref(),
                ],
                point,
                1,
            );
            if matches!(point, "commit-recorded" | "delete-reclaim") {
                known.remove(&victim);
            }
            check(&known, &format!("delete killed at {point}"));
            // Keep at least two snapshots around to delete from.
            if known.len() < 3 {
                let id = take(&img, &chain, &[]);
                known.insert(id.clone(), restore_hash(&chain, &id, dir.path()));
            }
        }
    }
    // After all that, a normal take and delete still work.
    let id = take(&img, &chain, &[]);
    assert_eq!(restore_hash(&chain, &id, dir.path()), {
        let mut h = sha2::Sha256::new();
        h.update(read_all(&img));
        format!("{:x}", h.finalize())
    });
}
