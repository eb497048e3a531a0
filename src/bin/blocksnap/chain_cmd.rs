//! `blocksnap chain ...`: direct commands on chain files.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blocksnap::chain::restore::{restore, RestoreOptions};
use blocksnap::chain::verify::verify;
use blocksnap::chain::{delete::delete, Access, Chain, Snapshot};
use blocksnap::quiesce::{self, Mode, QuiesceError};
use blocksnap::take::{take, Progress, TakeError, TakeOptions, Tracking};
use blocksnap::util::{format_timestamp, human_bytes, printable};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::{Failure, EXIT_DAMAGED, EXIT_VOLUME_LEFT};

/// Default directory for freeze intent markers of `chain take`.
pub const DEFAULT_INTENT_DIR: &str = "/var/lib/blocksnap/freeze-intents";

#[derive(Subcommand, Debug)]
pub enum ChainCommand {
    /// Snapshot DEVICE (a block device or image file) into CHAIN; prints the new id last
    Take(TakeArgs),
    /// List the snapshots of CHAIN, oldest first
    List {
        chain: PathBuf,
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Write the image of snapshot SNAPSHOT_ID to TARGET (a block device, or a file created sparse)
    Restore {
        chain: PathBuf,
        snapshot_id: String,
        target: PathBuf,
        /// Allow TARGET to be the device the snapshot was taken from
        #[arg(long)]
        force: bool,
    },
    /// Check every record of every snapshot; exit 0 only if all check out
    Verify {
        chain: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete one snapshot; every other snapshot still restores exactly as before
    Delete { chain: PathBuf, snapshot_id: String },
    /// Back up snapshot SNAPSHOT_ID of CHAIN to a remote (what changed since the volume's last backup); prints the backup id last
    Backup(crate::backup_cmd::ChainBackupArgs),
}

#[derive(Args, Debug)]
pub struct TakeArgs {
    device: PathBuf,
    chain: PathBuf,
    /// Name of the snapshot
    #[arg(long, default_value = "")]
    name: String,
    /// Description of the snapshot
    #[arg(long, default_value = "")]
    description: String,
    /// Metadata KEY=VALUE (repeatable)
    #[arg(long = "meta", value_parser = parse_kv)]
    meta: Vec<(String, String)>,
    /// Block size of a new chain: a power of two from 4096 to 4194304
    #[arg(long)]
    block_size: Option<u32>,
    /// Store every block, not just the changes (also needed after the device shrank)
    #[arg(long)]
    full: bool,
    /// How to make the volume consistent: auto, freeze, unmount or none
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    quiesce: Mode,
    /// With --quiesce none on a mounted device: take a crash-consistent snapshot anyway
    #[arg(long)]
    force: bool,
    /// Longest time a filesystem may stay frozen; the snapshot is abandoned after it
    #[arg(long, default_value_t = blocksnap::defaults::MAX_FREEZE_SECONDS as f64)]
    max_freeze_seconds: f64,
    /// Where to record freeze intents so `blocksnap thaw --all` can undo a crashed freeze
    #[arg(long, default_value = DEFAULT_INTENT_DIR)]
    intent_dir: PathBuf,
    /// Print the outcome as JSON (the id is still the last line)
    #[arg(long)]
    json: bool,
    /// Do not trace writes during the scan: keep the volume quiesced for the
    /// whole scan (as before tracking existed)
    #[arg(long)]
    no_tracking: bool,
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// A snapshot as `chain list --json` prints it.
#[derive(Serialize)]
struct ListEntry {
    id: String,
    name: String,
    description: String,
    created_at: String,
    size_bytes: u64,
    changed_bytes: u64,
    zero_bytes: u64,
    stored_bytes: u64,
    freeze_ms: f64,
    scan_ms: f64,
    full: bool,
    source: String,
    metadata: BTreeMap<String, String>,
    damaged: Option<String>,
    /// How it was taken; absent for snapshots older than the take record.
    #[serde(skip_serializing_if = "Option::is_none")]
    take: Option<TakeEntry>,
}

/// The take record as `chain list --json` prints it.
#[derive(Serialize)]
struct TakeEntry {
    method: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    full_scan_reason: &'static str,
    rounds: u32,
    live_blocks: u64,
    quiesced_blocks: u64,
    tracked_blocks: u64,
    unmarked_blocks: u64,
    live_ms: f64,
    tracker_generation: String,
}

fn entry(s: &Snapshot) -> ListEntry {
    ListEntry {
        id: s.id.to_string(),
        name: s.name.clone(),
        description: s.description.clone(),
        created_at: format_timestamp(s.created_us),
        size_bytes: s.device_size,
        changed_bytes: s.changed_bytes,
        zero_bytes: s.zero_bytes,
        stored_bytes: s.stored_bytes,
        freeze_ms: s.freeze_us as f64 / 1000.0,
        scan_ms: s.scan_us as f64 / 1000.0,
        full: s.full,
        source: s.source_path.clone(),
        metadata: s.metadata.clone(),
        damaged: s.damaged.clone(),
        take: s.take.map(|t| TakeEntry {
            method: t.method.as_str(),
            full_scan_reason: t.reason.as_str(),
            rounds: t.rounds,
            live_blocks: t.live_blocks,
            quiesced_blocks: t.quiesced_blocks,
            tracked_blocks: t.tracked_blocks,
            unmarked_blocks: t.unmarked_blocks,
            live_ms: t.live_us as f64 / 1000.0,
            tracker_generation: format!("{:016x}", t.generation),
        }),
    }
}

fn progress_bar(total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    Some(pb)
}

/// Run `work` while a progress bar (on a terminal) follows `done`/`total`.
pub(crate) fn with_progress<T>(
    what: &str,
    total: impl Fn() -> u64 + Send + Sync,
    done: impl Fn() -> u64 + Send + Sync,
    work: impl FnOnce() -> T,
) -> T {
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            let mut bar: Option<indicatif::ProgressBar> = None;
            while !stop.load(Ordering::Relaxed) {
                let t = total();
                if bar.is_none() && t > 0 {
                    bar = progress_bar(t, what);
                }
                if let Some(b) = &bar {
                    b.set_length(t);
                    b.set_position(done());
                }
                // Woken at once when the work is done.
                std::thread::park_timeout(Duration::from_millis(100));
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        });
        let r = work();
        stop.store(true, Ordering::Relaxed);
        ticker.thread().unpark();
        r
    })
}

pub fn run(cmd: ChainCommand) -> Result<(), Failure> {
    match cmd {
        ChainCommand::Take(a) => take_cmd(a),
        ChainCommand::List { chain, json } => {
            let c = Chain::open(&chain, Access::Read)?;
            if json {
                let v: Vec<ListEntry> = c.snapshots().iter().map(entry).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serialisable")
                );
            } else {
                print_table(&c);
            }
            Ok(())
        }
        ChainCommand::Restore {
            chain,
            snapshot_id,
            target,
            force,
        } => {
            let c = Chain::open(&chain, Access::Read)?;
            let snap = c.find(&snapshot_id)?.clone();
            let done = Arc::new(AtomicU64::new(0));
            let opts = RestoreOptions {
                force,
                progress: Some(done.clone()),
            };
            let out = with_progress(
                "restore",
                || snap.device_size,
                || done.load(Ordering::Relaxed),
                || restore(&c, snap.id, &target, &opts),
            )?;
            eprintln!(
                "restored snapshot {} ({}) to {}: {} of data, {} of zeros",
                snap.id,
                human_bytes(out.image_bytes),
                target.display(),
                human_bytes(out.data_bytes),
                human_bytes(out.zero_bytes)
            );
            Ok(())
        }
        ChainCommand::Verify { chain, json } => {
            let c = Chain::open(&chain, Access::Read)?;
            let done = AtomicU64::new(0);
            let total: u64 = c.segments().iter().map(|s| s.info.data_len).sum();
            let report = with_progress(
                "verify",
                || total,
                || done.load(Ordering::Relaxed),
                || verify(&c, Some(&done)),
            );
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                );
            } else {
                for p in &report.problems {
                    println!("DAMAGED {p}");
                }
                if report.torn_tail_bytes > 0 {
                    println!(
                        "note: {} after the last snapshot belong to an interrupted take and will be cut off by the next one",
                        human_bytes(report.torn_tail_bytes)
                    );
                }
                println!(
                    "{} snapshot(s), {} in {} stored blocks checked: {}",
                    report.snapshots,
                    human_bytes(report.bytes_checked),
                    report.blocks_checked,
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
                        "chain {} is damaged: {} problem(s); snapshots not listed above still restore",
                        chain.display(),
                        report.problems.len()
                    ),
                })
            }
        }
        ChainCommand::Backup(a) => crate::backup_cmd::chain_backup(a),
        ChainCommand::Delete { chain, snapshot_id } => {
            let mut c = Chain::open(&chain, Access::Write)?;
            let id = c.find(&snapshot_id)?.id;
            let out = delete(&mut c, id)?;
            eprintln!(
                "deleted snapshot {id}: {} block(s) merged into its successor, {} released",
                out.merged_blocks,
                human_bytes(out.reclaimed_bytes)
            );
            Ok(())
        }
    }
}

fn print_table(c: &Chain) {
    println!(
        "{:<36}  {:<16}  {:<26}  {:>10}  {:>10}  {:>10}  {:>9}  {:<9}",
        "ID", "NAME", "CREATED", "SIZE", "CHANGED", "STORED", "FREEZE", "TAKEN"
    );
    for s in c.snapshots() {
        let mut name = printable(&s.name).into_owned();
        if name.chars().count() > 16 {
            name = name.chars().take(15).collect::<String>() + "…";
        }
        println!(
            "{:<36}  {:<16}  {:<26}  {:>10}  {:>10}  {:>10}  {:>9}  {:<9}{}",
            s.id,
            name,
            format_timestamp(s.created_us),
            human_bytes(s.device_size),
            human_bytes(s.changed_bytes),
            human_bytes(s.stored_bytes),
            format!("{:.1}ms", s.freeze_us as f64 / 1000.0),
            s.take.map_or("-", |t| t.method.as_str()),
            if s.damaged.is_some() { "  DAMAGED" } else { "" }
        );
    }
}

fn take_cmd(a: TakeArgs) -> Result<(), Failure> {
    if !(a.max_freeze_seconds > 0.0 && a.max_freeze_seconds.is_finite()) {
        return Err(Failure {
            code: crate::EXIT_FAILED,
            message: "--max-freeze-seconds must be a positive number".into(),
        });
    }
    let progress = Arc::new(Progress::default());
    let opts = TakeOptions {
        name: a.name,
        description: a.description,
        metadata: a.meta.into_iter().collect(),
        block_size: a.block_size,
        full: a.full,
        quiesce: quiesce::Options {
            mode: a.quiesce,
            force: a.force,
            max_freeze: Duration::from_secs_f64(a.max_freeze_seconds),
            intent_dir: Some(a.intent_dir),
            keep_off: Vec::new(),
        },
        progress: Some(progress.clone()),
        // Tracking during this run keeps the freeze short; nothing tracks
        // between runs, so the device is still read whole.
        tracking: if a.no_tracking {
            Tracking::Off
        } else {
            Tracking::SingleRun
        },
        ..Default::default()
    };
    let r = with_progress(
        "snapshot",
        || progress.total.load(Ordering::Relaxed),
        || progress.done.load(Ordering::Relaxed),
        || take(Arc::new(quiesce::Host), &a.device, &a.chain, &opts),
    );
    match r {
        Ok(out) => {
            if a.json {
                #[derive(Serialize)]
                struct Out {
                    #[serde(flatten)]
                    entry: ListEntry,
                    duration_ms: f64,
                    quiesce: String,
                }
                let o = Out {
                    entry: entry(&out.snapshot),
                    duration_ms: out.duration.as_secs_f64() * 1000.0,
                    quiesce: out.quiesce.clone(),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&o).expect("serialisable")
                );
            } else {
                if out.record.method == blocksnap::chain::format::TakeMethod::FullScan
                    && out.record.reason == blocksnap::chain::format::FullReason::SingleRun
                {
                    eprintln!("note: read the whole device: `blocksnap chain take` cannot track writes between runs (blocksnapd does); it tracked writes during this run to keep the freeze short");
                }
                println!(
                    "snapshot of {} ({}): {} changed, {} stored, frozen {:.1} ms, took {:.2} s; {}",
                    a.device.display(),
                    human_bytes(out.snapshot.device_size),
                    human_bytes(out.changed_bytes),
                    human_bytes(out.stored_bytes),
                    out.freeze.as_secs_f64() * 1000.0,
                    out.duration.as_secs_f64(),
                    out.quiesce
                );
            }
            println!("{}", out.snapshot.id);
            Ok(())
        }
        Err(e) => {
            let code = match &e {
                TakeError::Quiesce(QuiesceError::Remount { .. } | QuiesceError::Thaw { .. }) => {
                    EXIT_VOLUME_LEFT
                }
                _ => crate::EXIT_FAILED,
            };
            Err(Failure {
                code,
                message: blocksnap::util::error_chain(&e),
            })
        }
    }
}
