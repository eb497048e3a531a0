//! Write tracking against real loop devices: the tracker sees writes through
//! the device (and a partition's through its disk), reports lost records as a
//! gap, and takes built on it restore exactly what the device held.

mod common;

use std::time::Duration;

use blocksnap::track::{Continuity, Options, Registry, Target};
use common::*;

fn target(dev: &std::path::Path) -> Target {
    Target {
        volume: "v".into(),
        path: dev.to_path_buf(),
    }
}

#[test]
fn writes_through_the_device_are_marked() {
    if !root("writes_through_the_device_are_marked") {
        return;
    }
    let lo = Loop::new(64 << 20);
    let reg = Registry::start(&[target(&lo.dev)], &Options::default());
    assert!(reg.unavailable().is_none(), "{:?}", reg.unavailable());
    let mut s = reg.session("v").unwrap();
    assert_eq!(s.continuity(), &Continuity::NoSnapshotYet);
    // 8 KiB at 1 MiB and 512 bytes inside block 300, with O_DIRECT-free
    // writes plus fsync so they reach the device now.
    write_at(&lo.dev, 1 << 20, &random_bytes(1, 8192));
    write_at(&lo.dev, 300 * 4096 + 1024, &random_bytes(2, 512));
    // A read marks nothing.
    let _ = read_all(&lo.dev);
    let d = s.cut().unwrap();
    let units: Vec<u64> = d.units().collect();
    assert_eq!(units, vec![256, 257, 300], "{units:?}");
    assert!(s.cut().unwrap().is_empty());
    let id = uuid::Uuid::new_v4();
    s.commit(id);
    write_at(&lo.dev, 4096 * 7, &random_bytes(3, 4096));
    std::thread::sleep(Duration::from_millis(100));
    let s = reg.session("v").unwrap();
    assert_eq!(s.continuity(), &Continuity::Since(id));
    assert_eq!(s.since_previous().units().collect::<Vec<_>>(), vec![7]);
    // Dropped without commit: given back to the next session.
    drop(s);
    let s = reg.session("v").unwrap();
    assert_eq!(s.since_previous().units().collect::<Vec<_>>(), vec![7]);
}

#[test]
fn a_full_ring_is_a_gap() {
    if !root("a_full_ring_is_a_gap") {
        return;
    }
    let lo = Loop::new(64 << 20);
    // One page per CPU and nobody draining: a few hundred writes overflow it.
    let reg = Registry::start(
        &[target(&lo.dev)],
        &Options {
            ring_pages: 1,
            drain_every: None,
            ..Default::default()
        },
    );
    assert!(reg.unavailable().is_none(), "{:?}", reg.unavailable());
    let mut s = reg.session("v").unwrap();
    s.cut().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.dev)
        .unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..2000u64 {
        f.write_all_at(&[1u8; 4096], i * 8192).unwrap();
        f.sync_data().unwrap();
    }
    let err = s.cut().unwrap_err();
    assert!(err.contains("dropped"), "{err}");
}
