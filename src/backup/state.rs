//! What this host remembers of a volume's last backup to a remote: the
//! backup's id and the chain fingerprints of the snapshot it holds. With it,
//! the next incremental backup knows the changed blocks from the chain's
//! indexes alone, without reading unchanged data. It stays on this host
//! (the fingerprints are seeded with the chain's secret seed), beside the
//! chain: `CHAIN.backup-REMOTE-VOLUME.json` and `.fpmap`.
//!
//! Losing it costs time, never correctness: without a matching state the
//! next backup compares every block with the previous backup's manifests.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::fingerprint::FingerprintMap;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    /// The remote's endpoint, bucket and prefix.
    pub remote: String,
    pub volume: String,
    pub backup_id: Uuid,
    pub snapshot_id: Uuid,
    pub chain_id: Uuid,
}

/// The two files of the state of `chain` for `remote_name`/`volume`.
pub fn paths(chain: &Path, remote_name: &str, volume: &str) -> (PathBuf, PathBuf) {
    let mut base = chain.file_name().unwrap_or_default().to_os_string();
    base.push(format!(".backup-{remote_name}-{volume}"));
    let mut json = base.clone();
    json.push(".json");
    let mut map = base;
    map.push(".fpmap");
    (chain.with_file_name(json), chain.with_file_name(map))
}

/// The remembered state, if there is one that matches.
pub fn load(
    chain: &Path,
    remote_name: &str,
    chain_id: Uuid,
    want: &Header,
) -> Option<FingerprintMap> {
    let (json, map) = paths(chain, remote_name, &want.volume);
    let text = std::fs::read(&json).ok()?;
    let h: Header = serde_json::from_slice(&text).ok()?;
    if h != *want {
        tracing::info!(
            "local backup state {} is for backup {}, not {}; comparing with the remote's manifests instead",
            json.display(),
            h.backup_id,
            want.backup_id
        );
        return None;
    }
    match FingerprintMap::load(&map, chain_id) {
        Ok(Some(m)) if m.snapshot_id == h.snapshot_id => Some(m),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(
                "{}; comparing with the remote's manifests instead",
                crate::util::error_chain(&e)
            );
            None
        }
    }
}

/// Remember `header` and `prints` (durably: the map first, then the header).
pub fn save(
    chain: &Path,
    remote_name: &str,
    header: &Header,
    prints: &FingerprintMap,
) -> std::io::Result<()> {
    let (json, map) = paths(chain, remote_name, &header.volume);
    // The old header first, so a crash never pairs it with the new map.
    match std::fs::remove_file(&json) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    prints.save(&map)?;
    crate::util::write_atomic(
        &json,
        &serde_json::to_vec_pretty(header).expect("serialisable"),
    )
}
