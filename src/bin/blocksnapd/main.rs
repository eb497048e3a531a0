//! `blocksnapd`: serves the Block Storage v1 snapshot API on a Unix socket.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blocksnap::clock::{Clock, FileClock, SystemClock, TEST_CLOCK_ENV};
use blocksnap::config::{Config, DEFAULT_CONFIG};
use blocksnap::daemon::engine::HostEngine;
use blocksnap::daemon::store::SqliteStore;
use blocksnap::daemon::store::Store;
use blocksnap::daemon::{schedule, server, Daemon};
use blocksnap::util::error_chain;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "blocksnapd",
    version,
    about = "Block device snapshot daemon (Block Storage v1 API on a Unix socket)"
)]
struct Args {
    /// Configuration file
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Validate the configuration and exit
    #[arg(long)]
    check_config: bool,
    /// Run on a small demo volume in DIR (created; as root a loop device with
    /// a mounted ext4), printing calls to try
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "demo", conflicts_with = "check_config")]
    demo: Option<PathBuf>,
}

/// Logs go to the journal when systemd runs us, otherwise to stderr.
fn init_logging(level: Option<&str>) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    // The HTTP client backups use logs signed URLs (with the access key id)
    // at its trace level: never let it through, whatever BLOCKSNAP_LOG says.
    let filter = ["ureq=off", "ureq_proto=off"]
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |f, d| f.add_directive(d));
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    if under_systemd {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only on a terminal: a file, a pipe or the journal
                // gets plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let demo = match &args.demo {
        Some(dir) => match demo::prepare(dir) {
            Ok(d) => {
                args.config = d.config.clone();
                Some(d)
            }
            Err(e) => {
                eprintln!("blocksnapd: error: cannot set up the demo: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blocksnapd: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        // The state directory as the daemon would find it at start.
        let state = match blocksnap::statedir::check(&config.state_dir) {
            Ok(blocksnap::statedir::CheckOutcome::Ok) => "",
            Ok(blocksnap::statedir::CheckOutcome::WouldCreate) => ", created at start",
            Err(e) => {
                eprintln!(
                    "blocksnapd: error: {}: {}",
                    args.config.display(),
                    error_chain(&e)
                );
                return ExitCode::FAILURE;
            }
        };
        println!(
            "{}: ok ({} volume(s), {} token(s), socket {}, state in {}{state})",
            args.config.display(),
            config.volumes.len(),
            config.tokens.len(),
            config.socket.display(),
            config.state_dir.display()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_level.as_deref());
    // Before anything opens files: the connection limit is measured from it.
    match server::raise_open_files_limit() {
        Ok(f) if f.was < f.limit => tracing::info!(
            "open files: raised the soft limit from {} to the hard limit {}",
            f.was,
            f.limit
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("open files: cannot read or raise the limit: {e}"),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let engine = HostEngine::new(Arc::new(blocksnap::quiesce::Host), &config);
        // The catalog: SQLite in the state directory, with notes beside
        // the chains to rebuild it from if it is ever lost.
        let d = Daemon::start(
            config,
            engine,
            Box::new(|dir| {
                let (store, report) = SqliteStore::open_path(dir)?;
                report.log();
                Ok(Arc::new(store) as Arc<dyn Store>)
            }),
        )?;
        let l = server::listen(&d)?;
        // Scheduled snapshots: on the real clock, or (tests only) on the
        // time in BLOCKSNAP_TEST_CLOCK_FILE.
        let clock: Arc<dyn Clock> = match FileClock::from_env() {
            Some(c) => {
                tracing::warn!(
                    "{TEST_CLOCK_ENV} is set: schedules run on the time read from {} (for tests only)",
                    std::env::var(TEST_CLOCK_ENV).unwrap_or_default()
                );
                Arc::new(c)
            }
            None => Arc::new(SystemClock),
        };
        if let Some(s) = schedule::install(&d, clock, schedule::Scheduler::local_time_zone()) {
            tokio::spawn(schedule::run_loop(d.clone(), s));
        }
        if let Some(demo) = &demo {
            println!("{}", demo::instructions(demo));
        }
        tracing::info!(
            socket = %l.path.display(),
            volumes = d.config.volumes.len(),
            state_dir = %d.config.state_dir.display(),
            "blocksnapd starting"
        );
        server::run(d, l)
            .await
            .map_err(blocksnap::daemon::StartError::Signals)
    });
    drop(demo);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!("{msg}");
            eprintln!("blocksnapd: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
