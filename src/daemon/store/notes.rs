//! Notes: what only the catalog knows, also kept beside the data it is
//! about, so a lost or damaged catalog can be rebuilt.
//!
//! Every record lives in one notes file, its *location*:
//! - a snapshot in `chains/VOLUME.notes`, beside `chains/VOLUME.chain`;
//! - a configured volume's record (what the API changed of it) in
//!   `chains/VOLUME.notes` too;
//! - a made volume's record in `volumes/VOLUME.notes`, beside its image
//!   (the made volume's sidecar).
//!
//! A notes file is text, one entry per line: eight hex digits of the
//! CRC-32 of the JSON that follows, a space, the JSON, a newline.
//! The JSON is `{"seq":N,"parts":P,"committed":C,"op":{...}}` where `op`
//! is one of `{"put_snapshot":RECORD}`, `{"remove_snapshot":"ID"}`,
//! `{"put_volume":RECORD}`, `{"remove_volume":"ID"}`.
//! - `seq` numbers the catalog change (one `Store::apply`) the entry
//!   belongs to; for a put it is the change that last wrote the record.
//! - `parts` is the number of entries that change wrote, over all notes
//!   files; 0 for entries copied from the catalog (a rewrite).
//! - `committed` is the highest change the catalog had committed when the
//!   entry was written.
//!
//! A change writes its entries (appended, fsync'd) before the catalog
//! commits it. Recovery trusts entries up to the highest `committed` any
//! entry names (or the catalog's own sequence, if higher), and the change
//! right after it only if all its `parts` are there (a crash between the
//! notes and the commit leaves it complete or not at all, never half).
//! Whatever deletes entries (removing the file of a place with no records
//! left, rewriting a file) first leaves a `"op":"mark"` line with the last
//! committed change in a file that stays, so no committed change is ever
//! judged incomplete.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::daemon::catalog::{SnapshotRecord, VolumeKind, VolumeRecord};

/// File name suffix of notes files.
pub const SUFFIX: &str = ".notes";

/// Which notes file a record lives in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Loc {
    /// `chains/ID.notes`: a volume's snapshots and a configured volume's record.
    Chain(String),
    /// `volumes/ID.notes`: a made volume's record.
    Made(String),
}

impl Loc {
    pub fn of_snapshot(r: &SnapshotRecord) -> Loc {
        Loc::Chain(r.volume_id.clone())
    }

    pub fn of_volume(r: &VolumeRecord) -> Loc {
        match r.kind {
            VolumeKind::Configured => Loc::Chain(r.id.clone()),
            VolumeKind::Made { .. } => Loc::Made(r.id.clone()),
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Loc::Chain(id) | Loc::Made(id) => id,
        }
    }

    /// The file name inside its directory.
    pub fn file_name(&self) -> String {
        format!("{}{SUFFIX}", self.id())
    }

    /// The key the catalog's `notes` table uses: `chains/ID.notes`.
    pub fn key(&self) -> String {
        match self {
            Loc::Chain(_) => format!("chains/{}", self.file_name()),
            Loc::Made(_) => format!("volumes/{}", self.file_name()),
        }
    }
}

/// What one entry says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    PutSnapshot(SnapshotRecord),
    RemoveSnapshot(Uuid),
    PutVolume(VolumeRecord),
    RemoveVolume(String),
    /// No record: says change `committed` was committed (see [`mark_line`]).
    Mark,
}

impl Op {
    fn is_put(&self) -> bool {
        matches!(self, Op::PutSnapshot(_) | Op::PutVolume(_))
    }
}

/// One entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub parts: u32,
    pub committed: u64,
    pub op: Op,
}

/// One line of a notes file for `entry`.
pub fn line(entry: &Entry) -> String {
    let json = serde_json::to_string(entry).expect("notes entries serialise");
    frame(&json)
}

/// One line for a put whose record is already JSON (as the catalog keeps
/// it), copied from the catalog (`parts` 0).
pub fn put_line(seq: u64, committed: u64, volume: bool, record_json: &str) -> String {
    let op = if volume { "put_volume" } else { "put_snapshot" };
    raw_line(seq, 0, committed, op, record_json)
}

/// A line saying change `seq` is committed. Written into a file that stays
/// before lines of that change are deleted (a notes file removed, or
/// rewritten), so recovery still trusts the change when its other entries
/// no longer add up to its `parts`.
pub fn mark_line(seq: u64) -> String {
    frame(&format!(
        "{{\"seq\":{seq},\"parts\":0,\"committed\":{seq},\"op\":\"mark\"}}"
    ))
}

/// One line from its parts; `op` is the variant name (`put_snapshot`...)
/// and `payload` its JSON.
pub fn raw_line(seq: u64, parts: u32, committed: u64, op: &str, payload: &str) -> String {
    frame(&format!(
        "{{\"seq\":{seq},\"parts\":{parts},\"committed\":{committed},\"op\":{{\"{op}\":{payload}}}}}"
    ))
}

fn frame(json: &str) -> String {
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()))
}

/// A notes file read back.
#[derive(Debug, Default)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    /// Lines whose checksum or contents were bad (skipped).
    pub bad_lines: usize,
    /// Bytes after the last newline (a write cut short).
    pub torn_tail: usize,
}

/// Split `bytes` into checked lines; `parse` also decodes the JSON.
fn scan(bytes: &[u8], parse: bool) -> Parsed {
    let mut out = Parsed::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            out.torn_tail = rest.len();
            break;
        };
        let l = &rest[..nl];
        rest = &rest[nl + 1..];
        let ok = (|| {
            if l.len() < 10 || l[8] != b' ' {
                return None;
            }
            let crc = u32::from_str_radix(std::str::from_utf8(&l[..8]).ok()?, 16).ok()?;
            let json = &l[9..];
            if crc32fast::hash(json) != crc {
                return None;
            }
            if parse {
                let e: Entry = serde_json::from_slice(json).ok()?;
                out.entries.push(e);
            }
            Some(())
        })();
        if ok.is_none() {
            out.bad_lines += 1;
        }
    }
    out
}

/// Read every entry of a notes file.
pub fn parse(bytes: &[u8]) -> Parsed {
    scan(bytes, true)
}

/// Whether every line of a notes file is whole and its checksum right
/// (without decoding the JSON).
pub fn intact(bytes: &[u8]) -> bool {
    let p = scan(bytes, false);
    p.bad_lines == 0 && p.torn_tail == 0
}

/// The state of one record as recovery decides it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Snapshot(Uuid, u64, Option<SnapshotRecord>),
    Volume(String, u64, Option<VolumeRecord>),
}

/// What [`recover`] decided.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Each record's latest state (a put or a removal) with its `seq`.
    pub outcomes: Vec<Outcome>,
    /// The highest change now known to be committed.
    pub seq: u64,
    /// The highest `seq` any entry carries (the next change must be above it).
    pub max_seen: u64,
    /// Entries of a change cut short by a crash (not all its parts written): ignored.
    pub incomplete: usize,
}

/// Decide each record's latest state from entries read from notes files:
/// only entries newer than `known` (the catalog's own sequence; 0 when
/// rebuilding), trusting those up to the highest committed mark and the
/// one change after it if it is complete. For each record the entry with
/// the highest `seq` wins; at equal `seq` (a record moved between files in
/// one change) a put wins over a removal.
pub fn recover(entries: impl IntoIterator<Item = Entry>, known: u64) -> Recovered {
    let entries: Vec<Entry> = entries.into_iter().collect();
    let committed = entries
        .iter()
        .map(|e| e.committed)
        .max()
        .unwrap_or(0)
        .max(known);
    let max_seen = entries.iter().map(|e| e.seq).max().unwrap_or(0).max(known);
    // The change after the last committed one counts only if whole.
    let next = committed + 1;
    let next_entries: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.seq == next && e.parts > 0)
        .collect();
    let next_complete = !next_entries.is_empty()
        && next_entries
            .iter()
            .all(|e| e.parts as usize == next_entries.len());
    let trusted =
        |e: &Entry| e.seq > known && (e.seq <= committed || (e.seq == next && next_complete));
    let incomplete = entries
        .iter()
        .filter(|e| e.seq > known && !trusted(e))
        .count();
    // key -> (seq, is_put, entry index)
    let mut best: BTreeMap<(bool, String), (u64, bool, usize)> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if !trusted(e) {
            continue;
        }
        let key = match &e.op {
            Op::PutSnapshot(r) => (false, r.id.to_string()),
            Op::RemoveSnapshot(id) => (false, id.to_string()),
            Op::PutVolume(r) => (true, r.id.clone()),
            Op::RemoveVolume(id) => (true, id.clone()),
            Op::Mark => continue,
        };
        let cand = (e.seq, e.op.is_put(), i);
        match best.get(&key) {
            Some(&(s, put, _)) if (s, put) > (e.seq, e.op.is_put()) => {}
            _ => {
                best.insert(key, cand);
            }
        }
    }
    let outcomes = best
        .into_values()
        .map(|(seq, _, i)| match &entries[i].op {
            Op::PutSnapshot(r) => Outcome::Snapshot(r.id, seq, Some(r.clone())),
            Op::RemoveSnapshot(id) => Outcome::Snapshot(*id, seq, None),
            Op::PutVolume(r) => Outcome::Volume(r.id.clone(), seq, Some(r.clone())),
            Op::RemoveVolume(id) => Outcome::Volume(id.clone(), seq, None),
            Op::Mark => unreachable!("marks name no record"),
        })
        .collect();
    let seq = if next_complete { next } else { committed };
    Recovered {
        outcomes,
        seq,
        max_seen,
        incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::catalog::SnapStatus;

    fn snap(n: u128, name: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: Uuid::from_u128(n),
            volume_id: "v".into(),
            tenant: Some("t".into()),
            status: SnapStatus::Available,
            display_name: name.into(),
            display_description: "line one\nline two".into(),
            metadata: [("k".to_string(), "v\u{1b}".to_string())].into(),
            created_us: 1,
            updated_us: 2,
            size_bytes: 3,
            error: None,
            changed_bytes: 0,
            stored_bytes: 0,
            freeze_ms: 0.5,
            scheduled_us: Some(4),
        }
    }

    fn put(seq: u64, parts: u32, committed: u64, n: u128, name: &str) -> Entry {
        Entry {
            seq,
            parts,
            committed,
            op: Op::PutSnapshot(snap(n, name)),
        }
    }

    #[test]
    fn lines_round_trip_and_damage_is_seen() {
        let a = put(1, 1, 0, 1, "a");
        let mut bytes = line(&a).into_bytes();
        let json = serde_json::to_string(&snap(2, "b")).unwrap();
        bytes.extend_from_slice(put_line(2, 1, false, &json).as_bytes());
        let p = parse(&bytes);
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.entries[0], a);
        assert_eq!(p.entries[1], put(2, 0, 1, 2, "b"));
        assert!(intact(&bytes));
        // A flipped byte in the first line: that line is bad, the rest reads.
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        let p = parse(&bad);
        assert_eq!((p.entries.len(), p.bad_lines, p.torn_tail), (1, 1, 0));
        assert!(!intact(&bad));
        // A torn tail.
        let torn = &bytes[..bytes.len() - 5];
        let p = parse(torn);
        assert_eq!(p.entries.len(), 1);
        assert!(p.torn_tail > 0);
        assert!(!intact(torn));
    }

    #[test]
    fn recovery_takes_the_latest_and_only_whole_changes() {
        let r = recover(
            vec![
                put(1, 1, 0, 1, "a"),
                put(2, 2, 1, 1, "b"),
                put(2, 2, 1, 2, "x"),
                // change 3 wrote one of its two entries before a crash
                put(3, 2, 2, 1, "c"),
            ],
            0,
        );
        assert_eq!(r.seq, 2);
        assert_eq!(r.max_seen, 3);
        assert_eq!(r.incomplete, 1);
        let names: Vec<String> = r
            .outcomes
            .iter()
            .map(|o| match o {
                Outcome::Snapshot(_, _, Some(s)) => s.display_name.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(names, ["b", "x"]);
        // Whole: change 3 counts.
        let r = recover(
            vec![
                put(2, 2, 1, 1, "b"),
                put(3, 2, 2, 1, "c"),
                Entry {
                    seq: 3,
                    parts: 2,
                    committed: 2,
                    op: Op::RemoveSnapshot(Uuid::from_u128(2)),
                },
            ],
            0,
        );
        assert_eq!(r.seq, 3);
        assert!(r
            .outcomes
            .contains(&Outcome::Snapshot(Uuid::from_u128(2), 3, None)));
        // Change 3 lost one entry (its file was removed after the commit),
        // but a mark says it was committed.
        let mut es = vec![put(2, 2, 1, 1, "b"), put(3, 2, 2, 1, "c")];
        let p = parse(mark_line(3).as_bytes());
        es.extend(p.entries);
        let r = recover(es, 0);
        assert_eq!((r.seq, r.incomplete), (3, 0));
        assert!(
            matches!(&r.outcomes[..], [Outcome::Snapshot(_, 3, Some(s))] if s.display_name == "c")
        );
        // Entries the catalog already has are left out.
        let r = recover(vec![put(2, 1, 1, 1, "b")], 2);
        assert!(r.outcomes.is_empty());
        // A move between files in one change: the put wins.
        let r = recover(
            vec![
                put(4, 2, 3, 1, "moved"),
                Entry {
                    seq: 4,
                    parts: 2,
                    committed: 3,
                    op: Op::RemoveSnapshot(Uuid::from_u128(1)),
                },
            ],
            3,
        );
        assert!(matches!(
            &r.outcomes[..],
            [Outcome::Snapshot(_, 4, Some(_))]
        ));
    }
}
