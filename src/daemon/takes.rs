//! How each snapshot was taken, read from the chain files for the API's
//! detail views (`blocksnap:taken`, ...). Cached per chain and reread only
//! when the chain file's length changes (every commit and delete appends).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use uuid::Uuid;

use crate::chain::format::TakeRecord;
use crate::chain::{Access, Chain};

/// A chain's take records, and the chain's length when they were read.
type Cached = (u64, HashMap<Uuid, TakeRecord>);

/// Take records by chain file.
#[derive(Debug, Default)]
pub struct TakeRecords {
    cache: Mutex<HashMap<std::path::PathBuf, Cached>>,
}

impl TakeRecords {
    /// The take record of snapshot `id` in the chain at `chain`, if any.
    pub fn get(&self, chain: &Path, id: Uuid) -> Option<TakeRecord> {
        let len = std::fs::metadata(chain).ok()?.len();
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match c.get(chain) {
            Some((l, m)) if *l == len => return m.get(&id).copied(),
            _ => {}
        }
        let ch = Chain::open(chain, Access::Read).ok()?;
        let m: HashMap<Uuid, TakeRecord> = ch
            .snapshots()
            .iter()
            .filter_map(|s| s.take.map(|t| (s.id, t)))
            .collect();
        let r = m.get(&id).copied();
        c.insert(chain.to_path_buf(), (len, m));
        r
    }
}

/// The `blocksnap:` keys of a take record in a snapshot's detail view.
pub fn detail_keys(t: &TakeRecord) -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let mut v = vec![
        ("blocksnap:taken", json!(t.method.as_str())),
        ("blocksnap:rounds", json!(t.rounds)),
        ("blocksnap:live_blocks", json!(t.live_blocks)),
        ("blocksnap:quiesced_blocks", json!(t.quiesced_blocks)),
        ("blocksnap:tracked_blocks", json!(t.tracked_blocks)),
    ];
    // A full snapshot stores every block and builds on no earlier one:
    // asked for, or the chain's first (also after a damaged index).
    let full = matches!(
        t.reason,
        crate::chain::format::FullReason::Requested | crate::chain::format::FullReason::First
    );
    v.push(("blocksnap:full", json!(full)));
    if !t.reason.as_str().is_empty() {
        v.push(("blocksnap:full_scan_reason", json!(t.reason.as_str())));
    }
    if t.method == crate::chain::format::TakeMethod::Verified {
        v.push(("blocksnap:unmarked_blocks", json!(t.unmarked_blocks)));
    }
    v
}
