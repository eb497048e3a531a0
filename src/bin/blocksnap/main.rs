//! `blocksnap`: the command-line tool. `blocksnap chain ...` works on chain
//! files directly (no daemon needed: restores on any host); the other
//! commands talk to a running `blocksnapd`.

mod backup_cmd;
mod chain_cmd;
mod client_cmd;
mod schedule_cmd;
mod thaw_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes: 0 ok, 1 failed, 2 usage, 3 damage found, 4 a volume was left
/// unmounted or frozen (act now).
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_DAMAGED: u8 = 3;
pub const EXIT_VOLUME_LEFT: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "blocksnap",
    version,
    about = "Incremental point-in-time snapshots of block devices",
    long_about = "Incremental point-in-time snapshots of block devices.\n\n`blocksnap chain ...` works directly on chain files and needs no daemon (use it to restore on any host). The other commands talk to blocksnapd over its Unix socket."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work directly on chain files (take, list, restore, verify, delete)
    #[command(subcommand)]
    Chain(chain_cmd::ChainCommand),
    /// Backups: through blocksnapd (create, list, show, delete) or on S3-compatible remotes directly (restore, verify, list, show, delete, gc, unlock)
    #[command(subcommand)]
    Backup(backup_cmd::BackupCommand),
    /// Thaw filesystems left frozen by a blocksnap process that died
    Thaw(thaw_cmd::ThawArgs),
    /// Snapshots through blocksnapd (create, list, show, delete)
    Snapshot {
        #[command(subcommand)]
        command: client_cmd::SnapshotCommand,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Scheduled snapshots through blocksnapd (list: last and next runs)
    Schedule {
        #[command(subcommand)]
        command: schedule_cmd::ScheduleCommand,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Volumes through blocksnapd (list, show, create from a snapshot, delete, revert)
    Volume {
        #[command(subcommand)]
        command: client_cmd::VolumeCommand,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // The HTTP client's own log shows signed URLs (with the access key id)
    // at its trace level: never let it through.
    let filter = ["ureq=off", "ureq_proto=off"]
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |f, d| f.add_directive(d));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal (ExecStopPost's thaw logs to the journal).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}

/// A failure, with the exit code it should produce.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: EXIT_FAILED,
            message: blocksnap::util::error_chain(&e),
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Chain(c) => chain_cmd::run(c),
        Command::Backup(c) => backup_cmd::run(c),
        Command::Thaw(a) => thaw_cmd::run(a),
        Command::Snapshot { command, client } => client_cmd::snapshot(command, client),
        Command::Volume { command, client } => client_cmd::volume(command, client),
        Command::Schedule { command, client } => schedule_cmd::schedule(command, client),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // Messages may quote what the daemon or a chain file says.
            eprintln!(
                "blocksnap: error: {}",
                blocksnap::util::printable(&f.message)
            );
            ExitCode::from(f.code)
        }
    }
}
