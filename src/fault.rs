//! Named fault points for crash tests.
//!
//! Production code calls [`point`] at the moments a crash matters (after a
//! freeze, mid-scan, before a commit, ...). Unless `BLOCKSNAP_FAULT_POINT` is
//! set in the environment this is a single relaxed load. With it set to a
//! point's name, the N-th time (`BLOCKSNAP_FAULT_HIT`, default 1) that point
//! is reached the process either kills itself with SIGKILL
//! (`BLOCKSNAP_FAULT_ACTION=kill`), or touches `BLOCKSNAP_FAULT_SIGNAL_FILE`
//! and then sleeps until it is killed (`pause`, the default) or for a while
//! before going on (`delay:MILLISECONDS`), so a test can act at exactly that
//! moment. Never set these on a production host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

#[derive(Debug)]
struct Config {
    point: String,
    hit: u64,
    action: Action,
    signal_file: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Pause,
    Kill,
    Delay(u64),
}

static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn config() -> &'static Option<Config> {
    CONFIG.get_or_init(|| {
        let point = std::env::var("BLOCKSNAP_FAULT_POINT").ok()?;
        Some(Config {
            point,
            hit: std::env::var("BLOCKSNAP_FAULT_HIT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            action: match std::env::var("BLOCKSNAP_FAULT_ACTION").as_deref() {
                Ok("kill") => Action::Kill,
                Ok(a) if a.starts_with("delay:") => Action::Delay(a[6..].parse().unwrap_or(1000)),
                _ => Action::Pause,
            },
            signal_file: std::env::var("BLOCKSNAP_FAULT_SIGNAL_FILE").ok(),
        })
    })
}

/// Every point name, for tests that iterate over them.
pub const POINTS: &[&str] = &[
    // Snapshot: quiesce, scan, append, the commit protocol, the catalog.
    "before-freeze",
    "after-freeze",
    "append",
    "mid-scan",
    "after-scan",
    "before-commit",
    "commit-written",
    "commit-synced",
    "commit-recorded",
    "after-commit",
    "before-catalog",
    // Delete and its merge.
    "delete-before-commit",
    "delete-after-commit",
    "delete-reclaim",
    // Volume creation.
    "volume-restore",
    "volume-attach",
];

/// A place where a crash test may stop or kill the process.
pub fn point(name: &str) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.point != name {
        return;
    }
    let n = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n != cfg.hit {
        return;
    }
    if let Action::Kill = cfg.action {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(f) = &cfg.signal_file {
        let _ = std::fs::write(f, name);
    }
    match cfg.action {
        Action::Delay(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        _ => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
    }
}
