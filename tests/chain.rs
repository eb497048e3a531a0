//! The chain engine end to end through the `blocksnap chain` CLI: round trips
//! on image files and loop devices, deletes, damage, torn tails, increment
//! size and bad input.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use blocksnap::chain::format::{Location, COMMIT_LEN};
use blocksnap::chain::{Access, Chain};
use common::*;

fn list(chain: &Path) -> Vec<serde_json::Value> {
    let out = cli_ok([
        "chain".as_ref(),
        "list".as_ref(),
        chain.as_os_str(),
        "--json".as_ref(),
    ]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

fn ids(chain: &Path) -> Vec<String> {
    list(chain)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

/// Overwrite `count` random 4 KiB blocks (some unaligned writes too) of a file.
fn scribble(path: &Path, rng: &mut Rng, count: usize) {
    let size = std::fs::metadata(path).unwrap().len();
    for i in 0..count {
        let data = random_bytes(rng.next(), 4096);
        let off = if i % 5 == 0 {
            rng.below(size - 4096)
        } else {
            rng.below(size / 4096) * 4096
        };
        write_at(path, off, &data);
    }
}

#[test]
fn increments_on_an_image_file_restore_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    // Not a multiple of the block size: the last block is short.
    make_image(&img, (16 << 20) + 1536, 1);
    let mut rng = Rng::new(7);
    let mut expect = Vec::new();

    let full = take(&img, &chain, &["--name", "full"]);
    expect.push((full, read_all(&img)));

    scribble(&img, &mut rng, 60);
    expect.push((take(&img, &chain, &["--name", "random"]), read_all(&img)));

    // A zero run over data, and a block that is zero but for its last byte.
    write_at(&img, 2 << 20, &vec![0u8; 1 << 20]);
    let mut almost = vec![0u8; 4096];
    almost[4095] = 1;
    write_at(&img, 5 << 20, &almost);
    expect.push((take(&img, &chain, &["--name", "zeros"]), read_all(&img)));

    // The device grows by a bit more than a megabyte.
    let f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
    use std::io::Write;
    (&f).write_all(&random_bytes(9, (1 << 20) + 100)).unwrap();
    f.sync_all().unwrap();
    expect.push((take(&img, &chain, &["--name", "grown"]), read_all(&img)));

    // Nothing changed.
    expect.push((take(&img, &chain, &["--name", "same"]), read_all(&img)));

    let entries = list(&chain);
    assert_eq!(entries.len(), 5);
    assert_eq!(
        entries
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["full", "random", "zeros", "grown", "same"]
    );
    // The zero run was recognised as zeros, not stored.
    assert!(entries[2]["zero_bytes"].as_u64().unwrap() >= 1 << 20);
    assert_eq!(entries[4]["changed_bytes"].as_u64().unwrap(), 0);
    assert!(entries[4]["stored_bytes"].as_u64().unwrap() < 64 << 10);
    assert_eq!(
        entries[3]["size_bytes"].as_u64().unwrap(),
        (17 << 20) + 1636
    );
    for (id, bytes) in &expect {
        assert_same(&restore_bytes(&chain, id, dir.path()), bytes, id);
    }
    // The almost-zero block came back with its last byte.
    let zeros = restore_bytes(&chain, &expect[2].0, dir.path());
    assert_eq!(zeros[(5 << 20) + 4095], 1);
    cli_ok(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
}

#[test]
fn restores_are_sparse_where_the_image_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    write_at(&img, 10 << 20, &random_bytes(3, 1 << 20));
    let id = take(&img, &chain, &[]);
    let target = dir.path().join("out.img");
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        target.as_os_str(),
    ]);
    let md = std::fs::metadata(&target).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(
        md.blocks() * 512 < 4 << 20,
        "restored file is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
    assert_same(&read_all(&target), &read_all(&img), "sparse restore");
}

#[test]
fn loop_device_round_trip_and_block_device_targets() {
    if !root("loop_device_round_trip_and_block_device_targets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("seed.img");
    make_image(&img, 32 << 20, 2);
    let vol = Loop::from_image(&img);
    let chain = dir.path().join("vol.chain");
    let mut rng = Rng::new(11);
    let mut expect = Vec::new();
    expect.push((take(&vol.dev, &chain, &[]), read_all(&vol.dev)));
    // Writes through the block device itself.
    for _ in 0..40 {
        write_at(
            &vol.dev,
            rng.below(8192) * 4096,
            &random_bytes(rng.next(), 4096),
        );
    }
    write_at(&vol.dev, 4 << 20, &vec![0u8; 2 << 20]);
    expect.push((take(&vol.dev, &chain, &[]), read_all(&vol.dev)));
    // Grow the device and fill part of the new tail.
    vol.grow(40 << 20);
    write_at(&vol.dev, 36 << 20, &random_bytes(5, 1 << 20));
    let grown = read_all(&vol.dev);
    assert_eq!(grown.len(), 40 << 20);
    expect.push((take(&vol.dev, &chain, &[]), grown));
    for (id, bytes) in &expect {
        assert_same(&restore_bytes(&chain, id, dir.path()), bytes, id);
    }

    // Restore onto another block device, larger than the image: the image's
    // bytes land at the start, including zeroed ranges over old data.
    let target = Loop::new(48 << 20);
    write_at(&target.dev, 0, &random_bytes(77, 48 << 20));
    let (last, bytes) = expect.last().unwrap();
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        last.as_ref(),
        target.dev.as_os_str(),
    ]);
    let got = read_all(&target.dev);
    assert_same(&got[..bytes.len()], bytes, "block device restore");

    // A device smaller than the image is refused with a clear message.
    let small = Loop::new(8 << 20);
    let out = cli([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        last.as_ref(),
        small.dev.as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs") && err.contains(&(40u64 << 20).to_string()),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // The source device itself is refused unless forced.
    let out = cli([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        expect[0].0.as_ref(),
        vol.dev.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        expect[0].0.as_ref(),
        vol.dev.as_os_str(),
        "--force".as_ref(),
    ]);
    assert_same(
        &read_all(&vol.dev)[..32 << 20],
        &expect[0].1,
        "in-place restore",
    );
}

#[test]
fn delete_first_middle_and_last_keeps_every_other_snapshot_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    make_image(&img, 24 << 20, 3);
    let mut rng = Rng::new(5);
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..6 {
        if i == 1 {
            // Rewrite a large region so deleting the first snapshot frees space.
            write_at(&img, 0, &random_bytes(99, 6 << 20));
        } else if i > 0 {
            scribble(&img, &mut rng, 30);
        }
        snaps.push((
            take(&img, &chain, &["--name", &format!("s{i}")]),
            read_all(&img),
        ));
    }
    let check = |snaps: &[(String, Vec<u8>)]| {
        assert_eq!(
            ids(&chain),
            snaps.iter().map(|s| s.0.clone()).collect::<Vec<_>>()
        );
        for (id, bytes) in snaps {
            assert_same(&restore_bytes(&chain, id, dir.path()), bytes, id);
        }
        cli_ok(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
    };
    let delete = |id: &str| {
        cli_ok([
            "chain".as_ref(),
            "delete".as_ref(),
            chain.as_os_str(),
            id.as_ref(),
        ]);
    };
    // Middle.
    let victim = snaps.remove(3);
    delete(&victim.0);
    check(&snaps);
    // First: its data the second snapshot overwrote is given back.
    let before = std::fs::metadata(&chain).unwrap().blocks();
    let victim = snaps.remove(0);
    delete(&victim.0);
    check(&snaps);
    let after = std::fs::metadata(&chain).unwrap().blocks();
    assert!(
        (before - after) * 512 >= 3 << 20,
        "deleting the first snapshot released only {} bytes",
        (before.saturating_sub(after)) * 512
    );
    // Last.
    let victim = snaps.pop().unwrap();
    delete(&victim.0);
    check(&snaps);
    // A snapshot after deleting the newest compares against the right base.
    scribble(&img, &mut rng, 10);
    snaps.push((take(&img, &chain, &[]), read_all(&img)));
    check(&snaps);
    // Unknown ids are refused.
    let out = cli([
        "chain".as_ref(),
        "delete".as_ref(),
        chain.as_os_str(),
        victim.0.as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot"));
}

/// Build a chain of three snapshots and return (dir, image copies, ids).
fn three_snapshots() -> (tempfile::TempDir, Vec<(String, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    make_image(&img, 8 << 20, 4);
    let mut rng = Rng::new(9);
    let mut snaps = Vec::new();
    for i in 0..3 {
        if i > 0 {
            scribble(&img, &mut rng, 20);
        }
        snaps.push((
            take(&img, &chain, &["--name", &format!("s{i}")]),
            read_all(&img),
        ));
    }
    (dir, snaps)
}

fn flip(path: &Path, offset: u64) {
    let mut b = read_all(path);
    b[offset as usize] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

#[test]
fn damage_is_named_by_verify_and_contained() {
    let (dir, snaps) = three_snapshots();
    let chain = dir.path().join("vol.chain");
    let (seg, data_off, index_off, meta_off, commit_off) = {
        let c = Chain::open(&chain, Access::Read).unwrap();
        let s = &c.snapshots()[1];
        let seg = &c.segments()[s.segment];
        let idx = c.index(s.segment).unwrap();
        let data = idx
            .extents
            .iter()
            .find_map(|x| match x.location {
                Location::Data(o) => Some(o),
                Location::Zero => None,
            })
            .unwrap();
        (
            s.id.to_string(),
            data + 100,
            seg.info.index_start() + 30,
            seg.info.start + COMMIT_LEN as u64 + 20,
            seg.info.start + 40,
        )
    };
    for (what, offset) in [
        ("data", data_off),
        ("index", index_off),
        ("header", meta_off),
        ("commit record", commit_off),
    ] {
        let damaged = dir
            .path()
            .join(format!("damaged-{}.chain", what.replace(' ', "-")));
        std::fs::copy(&chain, &damaged).unwrap();
        flip(&damaged, offset);
        let out = cli(["chain".as_ref(), "verify".as_ref(), damaged.as_os_str()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "verify of damaged {what}: {text}"
        );
        assert!(
            text.contains(&seg),
            "verify does not name snapshot {seg} for damaged {what}: {text}"
        );
        // Restore of the damaged snapshot fails loudly.
        let target = dir.path().join(format!("t-{}", what.replace(' ', "-")));
        let out = cli([
            "chain".as_ref(),
            "restore".as_ref(),
            damaged.as_os_str(),
            seg.as_ref(),
            target.as_os_str(),
        ]);
        assert!(
            !out.status.success(),
            "restore of snapshot with damaged {what} succeeded"
        );
        // The snapshot before it still restores exactly.
        assert_same(
            &restore_bytes(&damaged, &snaps[0].0, dir.path()),
            &snaps[0].1,
            what,
        );
        let len = std::fs::metadata(&damaged).unwrap().len();
        let out = cli([
            "chain".as_ref(),
            "take".as_ref(),
            dir.path().join("vol.img").as_os_str(),
            damaged.as_os_str(),
        ]);
        if matches!(what, "header" | "commit record") {
            // Damage to the chain's structure is seen on open: writing is
            // refused and nothing is cut off.
            assert!(
                !out.status.success(),
                "take on a chain with damaged {what} succeeded"
            );
            assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
            assert_eq!(std::fs::metadata(&damaged).unwrap().len(), len);
        } else {
            // Stored data and indexes are checked by verify and restore, not
            // on every open; new snapshots can still be taken, and verify
            // still reports the old damage.
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = cli(["chain".as_ref(), "verify".as_ref(), damaged.as_os_str()]);
            assert_eq!(out.status.code(), Some(3));
            assert!(String::from_utf8_lossy(&out.stdout).contains(&seg));
        }
    }
    // A damaged file header: the chain is still readable from its segments.
    let damaged = dir.path().join("damaged-file-header.chain");
    std::fs::copy(&chain, &damaged).unwrap();
    flip(&damaged, 30);
    let out = cli(["chain".as_ref(), "verify".as_ref(), damaged.as_os_str()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("file header"));
    assert_same(
        &restore_bytes(&damaged, &snaps[2].0, dir.path()),
        &snaps[2].1,
        "file header",
    );
    // The undamaged chain is fine.
    cli_ok(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
}

#[test]
fn a_torn_tail_at_any_offset_keeps_every_earlier_snapshot() {
    let (dir, snaps) = three_snapshots();
    let chain = dir.path().join("vol.chain");
    let last_start = {
        let c = Chain::open(&chain, Access::Read).unwrap();
        c.segments().last().unwrap().info.start
    };
    let end = std::fs::metadata(&chain).unwrap().len();
    assert!(
        end - last_start < 1 << 20,
        "last segment unexpectedly large"
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&chain)
        .unwrap();
    let earlier: Vec<String> = snaps[..2].iter().map(|s| s.0.clone()).collect();
    for cut in (last_start..end).rev() {
        f.set_len(cut).unwrap();
        let c = Chain::open(&chain, Access::Read).unwrap();
        let got: Vec<String> = c.snapshots().iter().map(|s| s.id.to_string()).collect();
        assert_eq!(got, earlier, "cut at {cut}");
        assert!(
            c.damage().is_empty(),
            "cut at {cut} reported as damage: {:?}",
            c.damage()
        );
        assert_eq!(c.torn_tail(), cut - last_start);
    }
    drop(f);
    // Cut in the middle of the last segment: the next take cuts the tail off
    // and appends a good snapshot.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&chain)
        .unwrap();
    f.set_len(last_start + (end - last_start) / 2).unwrap();
    drop(f);
    for (id, bytes) in &snaps[..2] {
        assert_same(&restore_bytes(&chain, id, dir.path()), bytes, id);
    }
    let img = dir.path().join("vol.img");
    let id = take(&img, &chain, &[]);
    assert_same(
        &restore_bytes(&chain, &id, dir.path()),
        &read_all(&img),
        "after cut",
    );
    assert_eq!(ids(&chain).len(), 3);
    cli_ok(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
}

#[test]
fn an_increment_of_one_percent_stores_little_more_than_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    let size: u64 = 64 << 20;
    std::fs::write(&img, random_bytes(1, size as usize)).unwrap();
    take(&img, &chain, &[]);
    let blocks = size / 4096;
    let mut rng = Rng::new(3);
    let mut changed = std::collections::BTreeSet::new();
    while (changed.len() as u64) < blocks / 100 {
        changed.insert(rng.below(blocks));
    }
    for b in &changed {
        write_at(&img, b * 4096, &random_bytes(rng.next(), 4096));
    }
    take(&img, &chain, &[]);
    let e = &list(&chain)[1];
    let changed_bytes = e["changed_bytes"].as_u64().unwrap();
    let stored = e["stored_bytes"].as_u64().unwrap();
    // Every changed block found, and nothing else.
    assert_eq!(changed_bytes, changed.len() as u64 * 4096);
    let limit = (changed_bytes as f64 * 1.02) as u64 + (64 << 10);
    assert!(
        stored <= limit,
        "stored {stored} > {limit} for {changed_bytes} changed"
    );
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("blocksnap: error: "), "{err}");
    err
}

#[test]
fn bad_input_gives_one_clear_line_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let chain = dir.path().join("vol.chain");
    make_image(&img, 4 << 20, 6);
    let d = |p: &str| dir.path().join(p);

    let err = one_line_error(&cli([
        "chain",
        "take",
        "/nonexistent/disk",
        d("x.chain").to_str().unwrap(),
    ]));
    assert!(err.contains("/nonexistent/disk"), "{err}");
    assert!(
        !d("x.chain").exists(),
        "a chain was created for a missing device"
    );

    // Not a chain: refused, and the file is left exactly as it was.
    let notchain = d("notes.txt");
    std::fs::write(&notchain, b"these are my notes, not a chain\n").unwrap();
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "take".as_ref(),
        img.as_os_str(),
        notchain.as_os_str(),
    ]));
    assert!(err.contains("not a blocksnap chain"), "{err}");
    assert_eq!(
        std::fs::read(&notchain).unwrap(),
        b"these are my notes, not a chain\n"
    );
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "list".as_ref(),
        notchain.as_os_str(),
    ]));
    assert!(err.contains("not a blocksnap chain"), "{err}");

    let id = take(&img, &chain, &[]);

    // A newer format version.
    let newer = d("newer.chain");
    let mut b = read_all(&chain);
    b[16..20].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&b[..72]);
    b[72..76].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&newer, &b).unwrap();
    let err = one_line_error(&cli(["chain".as_ref(), "list".as_ref(), newer.as_os_str()]));
    assert!(err.contains("newer") && err.contains("upgrade"), "{err}");

    let err = one_line_error(&cli([
        "chain".as_ref(),
        "take".as_ref(),
        img.as_os_str(),
        chain.as_os_str(),
        "--block-size".as_ref(),
        "8192".as_ref(),
    ]));
    assert!(err.contains("4096"), "{err}");
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "take".as_ref(),
        img.as_os_str(),
        d("y.chain").as_os_str(),
        "--block-size".as_ref(),
        "12345".as_ref(),
    ]));
    assert!(err.contains("power of two"), "{err}");

    let err = one_line_error(&cli([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        "0b1d0a2c-0000-4000-8000-000000000000".as_ref(),
        d("o").as_os_str(),
    ]));
    assert!(err.contains("no snapshot"), "{err}");

    // Restoring over the source or over the chain itself.
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        img.as_os_str(),
    ]));
    assert!(err.contains("--force"), "{err}");
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        chain.as_os_str(),
    ]));
    assert!(err.contains("chain file itself"), "{err}");
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "take".as_ref(),
        chain.as_os_str(),
        chain.as_os_str(),
    ]));
    assert!(err.contains("itself"), "{err}");

    // A device that shrank needs --full.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(2 << 20).unwrap();
    drop(f);
    let err = one_line_error(&cli([
        "chain".as_ref(),
        "take".as_ref(),
        img.as_os_str(),
        chain.as_os_str(),
    ]));
    assert!(err.contains("shrank") && err.contains("--full"), "{err}");
    let id2 = take(&img, &chain, &["--full"]);
    assert_same(
        &restore_bytes(&chain, &id2, dir.path()),
        &read_all(&img),
        "full after shrink",
    );
    // The snapshot from before the shrink is intact.
    assert_eq!(restore_bytes(&chain, &id, dir.path()).len(), 4 << 20);
    cli_ok(["chain".as_ref(), "verify".as_ref(), chain.as_os_str()]);
}

#[test]
fn files_the_cli_creates_are_owner_only_under_umask_022() {
    set_umask(0o022);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 4 << 20, 3);
    let chain = dir.path().join("vol.chain");
    let id = take(&img, &chain, &[]);
    let restored = dir.path().join("restored.img");
    cli_ok([
        "chain".as_ref(),
        "restore".as_ref(),
        chain.as_os_str(),
        id.as_ref(),
        restored.as_os_str(),
    ]);
    for f in [chain.clone(), blocksnap::chain::side_file(&chain), restored] {
        assert_eq!(mode_of(&f), 0o600, "{} is {:o}", f.display(), mode_of(&f));
    }
}
