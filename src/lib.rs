//! blocksnap: incremental, point-in-time snapshots of local block devices.
//!
//! The library holds everything; the `blocksnap` and `blocksnapd` binaries are
//! thin front ends. Layers, bottom up:
//! - [`sys`]: every ioctl and raw system call, with SAFETY comments.
//! - [`device`]: opening a source and reading it through a SIGBUS-safe mapping.
//! - [`fingerprint`]: per-block 64-bit fingerprints and the side-file map.
//! - [`chain`]: the append-only chain file: format, writer, restore, verify, delete.
//! - [`quiesce`]: freeze / unmount / exclusive open, never leaving a filesystem frozen.
//! - [`take`]: a whole snapshot, from quiesce to commit.

pub mod backup;
pub mod chain;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod defaults;
pub mod device;
pub mod fault;
pub mod fingerprint;
pub mod loopdev;
pub mod quiesce;
pub mod revert;
pub mod sigbus;
pub mod statedir;
pub mod sys;
pub mod take;
pub mod track;
pub mod util;
