//! A whole chain file of arbitrary bytes: opening (read-only and for writing),
//! listing, resolving, fingerprinting, verifying and restoring never panic.
#![no_main]

use blocksnap::chain::restore::{restore, RestoreOptions};
use blocksnap::chain::verify::verify;
use blocksnap::chain::{Access, Chain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile_dir();
    let path = dir.join("fuzz.chain");
    std::fs::write(&path, data).unwrap();
    if let Ok(chain) = Chain::open(&path, Access::Read) {
        for s in chain.snapshots() {
            if let Ok(plan) = chain.resolve(s.id) {
                // Cap the work: fuzzed sizes can be huge.
                if plan.device_size() <= 1 << 22 {
                    let _ = plan.fingerprints(chain.seed());
                    let target = dir.join("out.img");
                    let _ = std::fs::remove_file(&target);
                    let _ = restore(&chain, s.id, &target, &RestoreOptions::default());
                    let _ = std::fs::remove_file(&target);
                }
            }
        }
        if chain.snapshots().iter().all(|s| s.device_size <= 1 << 22) {
            let _ = verify(&chain, None);
        }
    }
    // A writer cuts torn tails: it must never cut a valid snapshot.
    let before: Option<Vec<_>> = Chain::open(&path, Access::Read)
        .ok()
        .filter(|c| c.damage().is_empty())
        .map(|c| c.snapshots().iter().map(|s| s.id).collect());
    if let Ok(w) = Chain::open(&path, Access::Write) {
        let after: Vec<_> = w.snapshots().iter().map(|s| s.id).collect();
        drop(w);
        if let Some(b) = before {
            assert_eq!(b, after, "opening for writing changed the snapshots");
        }
        let again = Chain::open(&path, Access::Read).unwrap();
        assert_eq!(
            again.snapshots().iter().map(|s| s.id).collect::<Vec<_>>(),
            after
        );
    }
});

fn tempfile_dir() -> std::path::PathBuf {
    // One directory per process, in memory when /dev/shm exists.
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let d =
            std::path::PathBuf::from(base).join(format!("blocksnap-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        extern "C" fn remove() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe { libc::atexit(remove) };
        d
    })
    .clone()
}
