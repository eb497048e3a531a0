//! `blocksnap backup ...` and `blocksnap chain backup`: backups on a remote,
//! used directly with the remote's settings from a configuration file (the
//! daemon's, or a small file with only `[[remotes]]`): no daemon needed, so
//! a new host restores with nothing but that file, its credentials and key.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blocksnap::backup::{self, BackupOptions, Listed, Progress, Remote, RestoreOptions};
use blocksnap::chain::{Access, Chain};
use blocksnap::config::{self, DEFAULT_CONFIG};
use blocksnap::util::{human_bytes, printable};
use clap::{Args, Subcommand};

use crate::chain_cmd::with_progress;
use crate::client_cmd::{self, ClientArgs, DaemonBackup};
use crate::{Failure, EXIT_DAMAGED, EXIT_FAILED};

/// Where the remotes are configured.
#[derive(Args, Debug)]
pub struct ConfigArg {
    /// Configuration file with the [[remotes]] (the daemon's, or one with only remotes)
    #[arg(long, env = "BLOCKSNAP_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Write backup BACKUP_ID of VOLUME on REMOTE to TARGET (a block device, or a file created sparse)
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        remote: String,
        volume: String,
        backup_id: String,
        target: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Read back every object the backups of VOLUME (or BACKUP_ID) need; exit 0 only if all check out
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        remote: String,
        volume: String,
        backup_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Back up a volume through blocksnapd (a new snapshot of it, or --snapshot)
    Create {
        /// The volume (id or display name)
        volume: String,
        /// Back up this snapshot of the volume instead of taking one now
        #[arg(long)]
        snapshot: Option<String>,
        /// Upload only what changed since the volume's newest backup
        #[arg(long)]
        incremental: bool,
        /// Snapshot a mounted volume whose quiesce mode is none anyway (crash-consistent)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Wait until it is available (progress bar on a terminal)
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List backups: through blocksnapd (no REMOTE), or on REMOTE directly (of VOLUME, or of every volume)
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// REMOTE [VOLUME]: read the remote directly (with --config), not through blocksnapd
        #[arg(num_args = 0..=2)]
        args: Vec<String>,
        /// Through blocksnapd: only the backups of this volume
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one backup: BACKUP_ID through blocksnapd, or REMOTE VOLUME BACKUP_ID directly
    Show {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(num_args = 1..=3, value_name = "[REMOTE VOLUME] BACKUP_ID")]
        args: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete one backup (BACKUP_ID through blocksnapd, or REMOTE VOLUME BACKUP_ID directly); every other backup still restores exactly
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(num_args = 1..=3, value_name = "[REMOTE VOLUME] BACKUP_ID")]
        args: Vec<String>,
        /// Through blocksnapd: wait until it is gone
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete objects of VOLUME no backup needs (left by interrupted backups or deletes)
    Gc {
        #[command(flatten)]
        config: ConfigArg,
        remote: String,
        volume: String,
    },
    /// Remove the locks of VOLUME left by a process that is gone (check first that it is)
    Unlock {
        #[command(flatten)]
        config: ConfigArg,
        remote: String,
        volume: String,
    },
}

/// `blocksnap chain backup`.
#[derive(Args, Debug)]
pub struct ChainBackupArgs {
    chain: PathBuf,
    snapshot_id: String,
    #[command(flatten)]
    config: ConfigArg,
    /// The remote (a [[remotes]] name in the configuration)
    #[arg(long)]
    remote: String,
    /// The volume's name on the remote
    #[arg(long)]
    volume: String,
    /// Upload every block, not only what changed since the volume's newest backup
    #[arg(long)]
    full: bool,
    #[arg(long, default_value = "")]
    name: String,
    #[arg(long, default_value = "")]
    description: String,
    /// Ignore this host's record of the last backup: compare with the remote's manifests
    #[arg(long)]
    no_local_state: bool,
    /// Print the outcome as JSON (the id is still the last line)
    #[arg(long)]
    json: bool,
}

fn open_remote(config: &Path, name: &str) -> Result<Remote, Failure> {
    let remotes = config::load_remotes(config)?;
    let cfg = remotes
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| Failure {
            code: EXIT_FAILED,
            message: format!(
                "no remote {name:?} in {} (it has: {})",
                config.display(),
                if remotes.is_empty() {
                    "none".to_string()
                } else {
                    remotes
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        })?;
    Ok(Remote::open(cfg)?)
}

fn json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

pub fn chain_backup(a: ChainBackupArgs) -> Result<(), Failure> {
    let remote = open_remote(&a.config.config, &a.remote)?;
    let chain = Chain::open(&a.chain, Access::Read)?;
    let snap = chain.find(&a.snapshot_id)?.clone();
    let progress = Arc::new(Progress::default());
    let opts = BackupOptions {
        volume: a.volume.clone(),
        incremental: !a.full,
        name: a.name,
        description: a.description,
        progress: Some(progress.clone()),
        no_local_state: a.no_local_state,
        ..Default::default()
    };
    let out = with_progress(
        "backup",
        || progress.total.load(Ordering::Relaxed),
        || progress.done.load(Ordering::Relaxed),
        || backup::create(&chain, snap.id, &remote, &opts),
    )?;
    if a.json {
        json(&out);
    } else {
        println!(
            "{} backup of snapshot {} to {}/{}: {} changed, {} uploaded in {} object(s) ({} already there), {:.2} s",
            if out.info.full { "full" } else { "incremental" },
            snap.id,
            a.remote,
            a.volume,
            human_bytes(out.info.changed_bytes),
            human_bytes(out.info.uploaded_bytes),
            out.objects_uploaded,
            out.objects_reused,
            out.duration_ms as f64 / 1000.0
        );
    }
    println!("{}", out.info.id);
    Ok(())
}

/// `REMOTE VOLUME BACKUP_ID` is the direct form; a lone `BACKUP_ID` goes
/// through blocksnapd (`daemon`, whose outcome ends the command: `Err(None)`
/// is its success).
fn direct_or_daemon(
    args: Vec<String>,
    daemon: impl FnOnce(String) -> Result<(), Failure>,
) -> Result<(String, String, String), Option<Failure>> {
    match <[String; 3]>::try_from(args) {
        Ok([r, v, id]) => Ok((r, v, id)),
        Err(args) if args.len() == 1 => {
            let id = args.into_iter().next().unwrap_or_default();
            Err(daemon(id).err())
        }
        Err(_) => Err(Some(Failure {
            code: EXIT_FAILED,
            message: "give BACKUP_ID (through blocksnapd) or REMOTE VOLUME BACKUP_ID (the remote directly, with --config)".into(),
        })),
    }
}

pub fn run(cmd: BackupCommand) -> Result<(), Failure> {
    match cmd {
        BackupCommand::Restore {
            config,
            remote,
            volume,
            backup_id,
            target,
            json: as_json,
        } => {
            let r = open_remote(&config.config, &remote)?;
            let progress = Arc::new(Progress::default());
            let opts = RestoreOptions {
                progress: Some(progress.clone()),
                cancel: None,
            };
            let out = with_progress(
                "restore",
                || progress.total.load(Ordering::Relaxed),
                || progress.done.load(Ordering::Relaxed),
                || backup::restore(&r, &volume, &backup_id, &target, &opts),
            )?;
            if as_json {
                json(&out);
            } else {
                eprintln!(
                    "restored backup {} ({}) to {}: {} of data from {} object(s), {} of zeros",
                    out.backup_id,
                    human_bytes(out.image_bytes),
                    target.display(),
                    human_bytes(out.data_bytes),
                    out.objects,
                    human_bytes(out.zero_bytes)
                );
            }
            Ok(())
        }
        BackupCommand::Verify {
            config,
            remote,
            volume,
            backup_id,
            json: as_json,
        } => {
            let r = open_remote(&config.config, &remote)?;
            let progress = Arc::new(Progress::default());
            let report = with_progress(
                "verify",
                || progress.total.load(Ordering::Relaxed),
                || progress.done.load(Ordering::Relaxed),
                || {
                    backup::verify(
                        &r,
                        &volume,
                        backup_id.as_deref(),
                        Some(progress.clone()),
                        None,
                    )
                },
            )?;
            if as_json {
                json(&report);
            } else {
                for p in &report.problems {
                    println!("DAMAGED {}", printable(&p.to_string()));
                }
                println!(
                    "{} backup(s), {} object(s), {} checked: {}",
                    report.backups,
                    report.objects,
                    human_bytes(report.bytes),
                    if report.ok() {
                        "all ok".to_string()
                    } else {
                        format!("{} problem(s)", report.problems.len())
                    }
                );
            }
            if report.ok() {
                Ok(())
            } else {
                Err(Failure {
                    code: EXIT_DAMAGED,
                    message: format!(
                        "backups of volume {volume} on remote {remote} are damaged: {} problem(s); backups not named above still restore",
                        report.problems.len()
                    ),
                })
            }
        }
        BackupCommand::Create {
            volume,
            snapshot,
            incremental,
            force,
            name,
            description,
            wait,
            client,
        } => client_cmd::backup(
            DaemonBackup::Create {
                volume,
                snapshot,
                incremental,
                force,
                name,
                description,
                wait,
            },
            client,
        ),
        BackupCommand::List {
            config,
            args,
            volume: only,
            client,
        } => {
            let (remote, volume) = match args.as_slice() {
                [] => return client_cmd::backup(DaemonBackup::List { volume: only }, client),
                [r] => (r.clone(), None),
                [r, v] => (r.clone(), Some(v.clone())),
                _ => unreachable!("clap allows 0 to 2"),
            };
            let as_json = client.json();
            let r = open_remote(&config.config, &remote)?;
            let all = backup::list(&r, volume.as_deref())?;
            if as_json {
                json(&all);
                return Ok(());
            }
            println!(
                "{:<36}  {:<20}  {:<26}  {:<11}  {:>10}  {:>10}  {:>10}  NAME",
                "ID", "VOLUME", "CREATED", "KIND", "SIZE", "CHANGED", "UPLOADED"
            );
            for l in &all {
                match l {
                    Listed::Ok(b) => println!(
                        "{:<36}  {:<20}  {:<26}  {:<11}  {:>10}  {:>10}  {:>10}  {}",
                        b.id,
                        printable(&b.volume),
                        b.created_at,
                        if b.full { "full" } else { "incremental" },
                        human_bytes(b.size_bytes),
                        human_bytes(b.changed_bytes),
                        human_bytes(b.uploaded_bytes),
                        printable(&b.name)
                    ),
                    Listed::Unreadable {
                        id, volume, error, ..
                    } => println!(
                        "{:<36}  {:<20}  UNREADABLE: {}",
                        printable(&id.to_string()),
                        printable(volume),
                        printable(&error.to_string())
                    ),
                }
            }
            Ok(())
        }
        BackupCommand::Show {
            config,
            args,
            client,
        } => {
            let (remote, volume, backup_id) = match direct_or_daemon(args, |id| {
                client_cmd::backup(DaemonBackup::Show { id }, client)
            }) {
                Ok(t) => t,
                Err(done) => return done.map_or(Ok(()), Err),
            };
            let r = open_remote(&config.config, &remote)?;
            json(&backup::show(&r, &volume, &backup_id)?);
            Ok(())
        }
        BackupCommand::Delete {
            config,
            args,
            wait,
            client,
        } => {
            let as_json = client.json();
            let (remote, volume, backup_id) = match direct_or_daemon(args, |id| {
                client_cmd::backup(DaemonBackup::Delete { id, wait }, client)
            }) {
                Ok(t) => t,
                Err(done) => return done.map_or(Ok(()), Err),
            };
            let r = open_remote(&config.config, &remote)?;
            let out = backup::delete(&r, &volume, &backup_id)?;
            if as_json {
                json(&out);
            } else {
                eprintln!(
                    "deleted backup {}: merged into {} later backup(s); {} object(s) ({}) no backup needs were removed",
                    out.backup_id,
                    out.merged_into.len(),
                    out.gc.objects_deleted,
                    human_bytes(out.gc.bytes_freed)
                );
            }
            Ok(())
        }
        BackupCommand::Gc {
            config,
            remote,
            volume,
        } => {
            let r = open_remote(&config.config, &remote)?;
            let out = backup::gc(&r, &volume)?;
            eprintln!(
                "removed {} object(s) ({}) no backup needs and aborted {} unfinished upload(s)",
                out.objects_deleted,
                human_bytes(out.bytes_freed),
                out.uploads_aborted
            );
            Ok(())
        }
        BackupCommand::Unlock {
            config,
            remote,
            volume,
        } => {
            let r = open_remote(&config.config, &remote)?;
            let removed = backup::lock::unlock(r.store(), &volume)?;
            if removed.is_empty() {
                eprintln!("volume {volume} on remote {remote} had no locks");
            }
            for h in removed {
                eprintln!("removed the lock of {}", printable(&h.to_string()));
            }
            Ok(())
        }
    }
}
