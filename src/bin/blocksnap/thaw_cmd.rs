//! `blocksnap thaw DEVICE | --all`: undo freezes whose owner died.

use std::path::PathBuf;

use blocksnap::quiesce::intent::{thaw_leftovers, Outcome};
use blocksnap::quiesce::{Host, System};
use clap::Args;

use crate::Failure;

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["device", "all"]))]
pub struct ThawArgs {
    /// Thaw the filesystem on this device (or mounted at this directory), whoever froze it
    device: Option<PathBuf>,
    /// Thaw every filesystem a dead blocksnap process left frozen (for ExecStopPost=)
    #[arg(long)]
    all: bool,
    /// Directories holding freeze intent markers (default: the daemon's and the CLI's)
    #[arg(long = "intent-dir")]
    intent_dirs: Vec<PathBuf>,
    /// Daemon config to find the daemon's state directory in
    #[arg(long, default_value = "/etc/blocksnap/blocksnap.toml")]
    config: PathBuf,
}

fn default_dirs(config: &std::path::Path) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(crate::chain_cmd::DEFAULT_INTENT_DIR)];
    if let Some(state) = blocksnap_state_dir(config) {
        dirs.push(state.join("freeze-intents"));
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The daemon's state directory from its config, read leniently (a broken
/// config must not stop an emergency thaw).
fn blocksnap_state_dir(config: &std::path::Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    v.get("daemon")?
        .get("state_dir")?
        .as_str()
        .map(PathBuf::from)
}

pub fn run(a: ThawArgs) -> Result<(), Failure> {
    let host = Host;
    let mut failed = Vec::new();
    if let Some(dev) = &a.device {
        // A directory: thaw the filesystem mounted there. A device: thaw its mounts.
        let targets: Vec<PathBuf> = if dev.is_dir() {
            vec![dev.clone()]
        } else {
            host.mounts_of(dev)?
                .into_iter()
                .map(|m| m.mount_point)
                .collect()
        };
        if targets.is_empty() {
            println!("{} is not mounted; nothing to thaw", dev.display());
        }
        // One thaw per filesystem is enough; further mounts report "not frozen".
        for mp in targets {
            match host.thaw(&mp) {
                Ok(()) => println!("thawed {}", mp.display()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    println!("{} was not frozen", mp.display())
                }
                Err(e) => failed.push(format!("{}: {e}", mp.display())),
            }
        }
    }
    let dirs = if a.intent_dirs.is_empty() {
        default_dirs(&a.config)
    } else {
        a.intent_dirs.clone()
    };
    if a.all || a.device.is_some() {
        for dir in dirs {
            for o in thaw_leftovers(&host, &dir) {
                match o {
                    Outcome::Thawed(mp) => {
                        println!("thawed {} (left frozen by a dead blocksnap)", mp.display())
                    }
                    Outcome::NotFrozen(_) | Outcome::Stale(_) => {}
                    Outcome::OwnerAlive(mp, pid) => println!(
                        "left {} alone: its blocksnap process {pid} is still running",
                        mp.display()
                    ),
                    Outcome::Failed(mp, e) => failed.push(format!("{}: {e}", mp.display())),
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            code: crate::EXIT_VOLUME_LEFT,
            message: format!("could not thaw: {}", failed.join("; ")),
        })
    }
}
