//! Named fault points for crash tests.
//!
//! Production code calls [`point`] at the moments a crash matters (after a
//! freeze, mid-scan, before a commit, mid-revert, ...). Every point is a
//! variant of [`Point`]; the crash harness iterates over [`Point::ALL`], so
//! a point added here is a point the harness kills at. Unless
//! `BLOCKSNAP_FAULT_POINT` is set in the environment, [`point`] is a single
//! load. With it set to a point's name, the N-th time
//! (`BLOCKSNAP_FAULT_HIT`, default 1) that point is reached the process
//! kills itself with SIGKILL (`BLOCKSNAP_FAULT_ACTION=kill`), panics
//! (`panic`), or touches `BLOCKSNAP_FAULT_SIGNAL_FILE` and then sleeps until
//! it is killed (`pause`, the default) or for a while before going on
//! (`delay:MILLISECONDS`), so a test can act at exactly that moment. Never
//! set these on a production host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The operations fault points lie on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Taking a snapshot (daemon or `blocksnap chain take`).
    Take,
    /// Deleting a snapshot (daemon or `blocksnap chain delete`).
    Delete,
    /// Making a volume from a snapshot.
    MakeVolume,
    /// Reverting a volume to a snapshot.
    Revert,
    /// Creating a new chain file (the first take of a volume).
    CreateChain,
}

/// Every place a crash test may stop or kill the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Point {
    /// A new chain's header written under its temporary name, not yet
    /// linked into place.
    ChainCreate,
    BeforeFreeze,
    AfterFreeze,
    /// Each batch of changed blocks appended to a segment.
    Append,
    MidScan,
    AfterScan,
    BeforeCommit,
    /// The commit record written, not yet fsync'd (takes and deletes).
    CommitWritten,
    CommitSynced,
    CommitRecorded,
    AfterCommit,
    /// A take done, its record not yet updated.
    BeforeCatalog,
    DeleteBeforeCommit,
    DeleteAfterCommit,
    DeleteReclaim,
    VolumeRestore,
    VolumeAttach,
    /// The revert's intent recorded, nothing written yet.
    RevertBeforeWrite,
    /// Half the device compared and its differing blocks written.
    RevertMid,
    /// The device reverted and synced, the record not yet updated.
    RevertBeforeCatalog,
}

impl Point {
    pub const ALL: &'static [Point] = &[
        Point::ChainCreate,
        Point::BeforeFreeze,
        Point::AfterFreeze,
        Point::Append,
        Point::MidScan,
        Point::AfterScan,
        Point::BeforeCommit,
        Point::CommitWritten,
        Point::CommitSynced,
        Point::CommitRecorded,
        Point::AfterCommit,
        Point::BeforeCatalog,
        Point::DeleteBeforeCommit,
        Point::DeleteAfterCommit,
        Point::DeleteReclaim,
        Point::VolumeRestore,
        Point::VolumeAttach,
        Point::RevertBeforeWrite,
        Point::RevertMid,
        Point::RevertBeforeCatalog,
    ];

    /// The name `BLOCKSNAP_FAULT_POINT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Point::ChainCreate => "chain-create",
            Point::BeforeFreeze => "before-freeze",
            Point::AfterFreeze => "after-freeze",
            Point::Append => "append",
            Point::MidScan => "mid-scan",
            Point::AfterScan => "after-scan",
            Point::BeforeCommit => "before-commit",
            Point::CommitWritten => "commit-written",
            Point::CommitSynced => "commit-synced",
            Point::CommitRecorded => "commit-recorded",
            Point::AfterCommit => "after-commit",
            Point::BeforeCatalog => "before-catalog",
            Point::DeleteBeforeCommit => "delete-before-commit",
            Point::DeleteAfterCommit => "delete-after-commit",
            Point::DeleteReclaim => "delete-reclaim",
            Point::VolumeRestore => "volume-restore",
            Point::VolumeAttach => "volume-attach",
            Point::RevertBeforeWrite => "revert-before-write",
            Point::RevertMid => "revert-mid",
            Point::RevertBeforeCatalog => "revert-before-catalog",
        }
    }

    pub fn from_name(name: &str) -> Option<Point> {
        Point::ALL.iter().copied().find(|p| p.name() == name)
    }

    /// The operations whose path passes this point.
    pub fn operations(self) -> &'static [Operation] {
        use Operation::*;
        match self {
            Point::BeforeFreeze
            | Point::AfterFreeze
            | Point::Append
            | Point::MidScan
            | Point::AfterScan
            | Point::BeforeCommit
            | Point::AfterCommit
            | Point::BeforeCatalog => &[Take],
            Point::CommitWritten | Point::CommitSynced | Point::CommitRecorded => &[Take, Delete],
            Point::DeleteBeforeCommit | Point::DeleteAfterCommit | Point::DeleteReclaim => {
                &[Delete]
            }
            Point::VolumeRestore | Point::VolumeAttach => &[MakeVolume],
            Point::RevertBeforeWrite | Point::RevertMid | Point::RevertBeforeCatalog => &[Revert],
            Point::ChainCreate => &[CreateChain],
        }
    }

    /// The points on an operation's path, in no particular order.
    pub fn on(op: Operation) -> Vec<Point> {
        Point::ALL
            .iter()
            .copied()
            .filter(|p| p.operations().contains(&op))
            .collect()
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug)]
struct Config {
    point: Point,
    hit: u64,
    action: Action,
    signal_file: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Pause,
    Kill,
    Panic,
    Delay(u64),
}

static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn config() -> &'static Option<Config> {
    CONFIG.get_or_init(|| {
        let name = std::env::var("BLOCKSNAP_FAULT_POINT").ok()?;
        let Some(point) = Point::from_name(&name) else {
            eprintln!("BLOCKSNAP_FAULT_POINT={name:?} names no fault point; it is ignored");
            return None;
        };
        Some(Config {
            point,
            hit: std::env::var("BLOCKSNAP_FAULT_HIT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            action: match std::env::var("BLOCKSNAP_FAULT_ACTION").as_deref() {
                Ok("kill") => Action::Kill,
                Ok("panic") => Action::Panic,
                Ok(a) if a.starts_with("delay:") => Action::Delay(a[6..].parse().unwrap_or(1000)),
                _ => Action::Pause,
            },
            signal_file: std::env::var("BLOCKSNAP_FAULT_SIGNAL_FILE").ok(),
        })
    })
}

/// A place where a crash test may stop, kill or panic the process.
pub fn point(p: Point) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.point != p {
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
        let _ = std::fs::write(f, p.name());
    }
    match cfg.action {
        Action::Panic => panic!("injected panic at fault point {p}"),
        Action::Delay(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        _ => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_every_point_is_on_a_path() {
        for p in Point::ALL {
            assert_eq!(Point::from_name(p.name()), Some(*p));
            assert!(!p.operations().is_empty());
        }
        let mut names: Vec<_> = Point::ALL.iter().map(|p| p.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Point::ALL.len());
        assert!(Point::on(Operation::Revert).contains(&Point::RevertMid));
    }
}
