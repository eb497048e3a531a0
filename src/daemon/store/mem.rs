//! `MemStore`: the catalog in memory (two ordered maps behind a mutex).
//!
//! It keeps the `Store` contract exactly (filters, sort orders, markers,
//! offsets, atomic applies) and is the model the durable store is tested
//! against, and the store the operations layer's simulator tests use.
//! Nothing is durable: a process that ends forgets everything.
//!
//! `fail_next_applies(n)` makes the next `n` applies fail (and change
//! nothing), so callers can test that a failed save answers 500 and starts
//! nothing.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Mutex;

use uuid::Uuid;

use super::{Change, Page, SnapshotQuery, SortDir, SortKey, Store, StoreError, VolumeQuery};
use crate::daemon::catalog::{SnapshotRecord, VolumeRecord};

#[derive(Debug, Default)]
struct Maps {
    snapshots: BTreeMap<Uuid, SnapshotRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    fail_next: usize,
    applies: u64,
}

/// The catalog in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    maps: Mutex<Maps>,
}

/// The error a `MemStore` apply fails with when told to.
#[derive(Debug, thiserror::Error)]
#[error("injected failure (MemStore::fail_next_applies)")]
pub struct InjectedFailure;

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// A store holding these records.
    pub fn with_records(
        snapshots: impl IntoIterator<Item = SnapshotRecord>,
        volumes: impl IntoIterator<Item = VolumeRecord>,
    ) -> MemStore {
        let s = MemStore::new();
        {
            let mut m = s.lock();
            m.snapshots = snapshots.into_iter().map(|r| (r.id, r)).collect();
            m.volumes = volumes.into_iter().map(|r| (r.id.clone(), r)).collect();
        }
        s
    }

    /// The next `n` calls of `apply` fail with `StoreError::Write` and change nothing.
    pub fn fail_next_applies(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// How many applies have succeeded so far.
    pub fn applies(&self) -> u64 {
        self.lock().applies
    }

    /// Every record, in id order (for comparing stores in tests).
    pub fn dump(&self) -> (Vec<SnapshotRecord>, Vec<VolumeRecord>) {
        let m = self.lock();
        (
            m.snapshots.values().cloned().collect(),
            m.volumes.values().cloned().collect(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemStore {
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut m = self.lock();
        if m.fail_next > 0 {
            m.fail_next -= 1;
            return Err(StoreError::Write(Box::new(InjectedFailure)));
        }
        // No change can fail on its own, so applying them in order is atomic.
        for c in changes {
            match c {
                Change::PutSnapshot(r) => {
                    m.snapshots.insert(r.id, r.clone());
                }
                Change::RemoveSnapshot(id) => {
                    m.snapshots.remove(id);
                }
                Change::PutVolume(r) => {
                    m.volumes.insert(r.id.clone(), r.clone());
                }
                Change::RemoveVolume(id) => {
                    m.volumes.remove(id);
                }
            }
        }
        m.applies += 1;
        Ok(())
    }

    fn snapshot(&self, id: Uuid) -> Result<Option<SnapshotRecord>, StoreError> {
        Ok(self.lock().snapshots.get(&id).cloned())
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<SnapshotRecord>, StoreError> {
        let m = self.lock();
        let hits: Vec<&SnapshotRecord> = m
            .snapshots
            .values()
            .filter(|r| snapshot_matches(r, q))
            .collect();
        page(hits, &q.page, snapshot_key).map(|v| v.into_iter().cloned().collect())
    }

    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        Ok(self.lock().volumes.get(id).cloned())
    }

    fn volumes(&self, q: &VolumeQuery) -> Result<Vec<VolumeRecord>, StoreError> {
        let m = self.lock();
        let hits: Vec<&VolumeRecord> = m
            .volumes
            .values()
            .filter(|r| volume_matches(r, q))
            .collect();
        page(hits, &q.page, volume_key).map(|v| v.into_iter().cloned().collect())
    }
}

/// Whether a snapshot record passes every filter of `q`.
pub fn snapshot_matches(r: &SnapshotRecord, q: &SnapshotQuery) -> bool {
    q.tenant
        .as_ref()
        .is_none_or(|t| r.tenant.as_ref().is_none_or(|rt| rt == t))
        && q.volumes
            .as_ref()
            .is_none_or(|vs| vs.contains(&r.volume_id))
        && q.volume_id.as_ref().is_none_or(|v| *v == r.volume_id)
        && q.status.as_ref().is_none_or(|s| s == r.status.as_str())
        && q.name.as_ref().is_none_or(|n| *n == r.display_name)
}

/// Whether a volume record passes every filter of `q`.
pub fn volume_matches(r: &VolumeRecord, q: &VolumeQuery) -> bool {
    q.tenant
        .as_ref()
        .is_none_or(|t| r.tenant.as_ref().is_none_or(|rt| rt == t))
        && q.status.as_ref().is_none_or(|s| s == r.status.as_str())
        && q.name.as_ref().is_none_or(|n| *n == r.display_name)
}

/// One sort key's value of a record.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyValue<'a> {
    Int(i64),
    Size(u64),
    Text(&'a str),
    /// Ids: snapshot ids compare as their hyphenated lower-case text does.
    Uuid(Uuid),
}

fn snapshot_key(r: &SnapshotRecord, k: SortKey) -> KeyValue<'_> {
    match k {
        SortKey::CreatedAt => KeyValue::Int(r.created_us),
        SortKey::UpdatedAt => KeyValue::Int(r.updated_us),
        SortKey::Id => KeyValue::Uuid(r.id),
        SortKey::Name => KeyValue::Text(&r.display_name),
        SortKey::Status => KeyValue::Text(r.status.as_str()),
        SortKey::Size => KeyValue::Size(r.size_bytes),
    }
}

fn volume_key(r: &VolumeRecord, k: SortKey) -> KeyValue<'_> {
    match k {
        SortKey::CreatedAt => KeyValue::Int(r.created_us),
        SortKey::UpdatedAt => KeyValue::Int(r.updated_us),
        SortKey::Id => KeyValue::Text(&r.id),
        SortKey::Name => KeyValue::Text(&r.display_name),
        SortKey::Status => KeyValue::Text(r.status.as_str()),
        SortKey::Size => KeyValue::Size(r.size_bytes),
    }
}

/// Records with an id, for the tie-break and the marker.
pub trait HasId {
    fn id_text(&self) -> String;
    fn id_key(&self) -> KeyValue<'_>;
}

impl HasId for SnapshotRecord {
    fn id_text(&self) -> String {
        self.id.to_string()
    }
    fn id_key(&self) -> KeyValue<'_> {
        KeyValue::Uuid(self.id)
    }
}

impl HasId for VolumeRecord {
    fn id_text(&self) -> String {
        self.id.clone()
    }
    fn id_key(&self) -> KeyValue<'_> {
        KeyValue::Text(&self.id)
    }
}

/// The order `page` sorts by: the keys in turn, then the id ascending.
pub fn compare<R: HasId>(
    a: &R,
    b: &R,
    sort: &[(SortKey, SortDir)],
    key: for<'r> fn(&'r R, SortKey) -> KeyValue<'r>,
) -> Ordering {
    for &(k, dir) in sort {
        let o = key(a, k).cmp(&key(b, k));
        let o = match dir {
            SortDir::Asc => o,
            SortDir::Desc => o.reverse(),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.id_key().cmp(&b.id_key())
}

/// Sort `hits`, start after the marker, skip `offset`, keep `limit`.
pub fn page<'a, R: HasId>(
    mut hits: Vec<&'a R>,
    p: &Page,
    key: for<'r> fn(&'r R, SortKey) -> KeyValue<'r>,
) -> Result<Vec<&'a R>, StoreError> {
    hits.sort_by(|a, b| compare(*a, *b, &p.sort, key));
    let start = match &p.marker {
        None => 0,
        Some(m) => match hits.iter().position(|r| marker_is(*r, m)) {
            Some(i) => i + 1,
            None => return Err(StoreError::UnknownMarker(m.clone())),
        },
    };
    Ok(hits
        .into_iter()
        .skip(start)
        .skip(p.offset)
        .take(p.limit)
        .collect())
}

/// Whether `marker` names record `r` (snapshot ids in any case the UUID parser takes).
fn marker_is<R: HasId>(r: &R, marker: &str) -> bool {
    match r.id_key() {
        KeyValue::Uuid(id) => Uuid::parse_str(marker).is_ok_and(|m| m == id),
        _ => r.id_text() == marker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::catalog::{SnapStatus, VolStatus, VolumeKind};

    fn snap(n: u128, vol: &str, tenant: Option<&str>, created: i64, name: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: Uuid::from_u128(n),
            volume_id: vol.into(),
            tenant: tenant.map(Into::into),
            status: SnapStatus::Available,
            display_name: name.into(),
            display_description: String::new(),
            metadata: BTreeMap::new(),
            created_us: created,
            updated_us: 0,
            size_bytes: 1 << 20,
            error: None,
            changed_bytes: 0,
            stored_bytes: 0,
            freeze_ms: 0.0,
            scheduled_us: None,
        }
    }

    fn vol(id: &str, tenant: Option<&str>, status: VolStatus) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            kind: VolumeKind::Configured,
            tenant: tenant.map(Into::into),
            status,
            display_name: id.into(),
            display_description: String::new(),
            metadata: BTreeMap::new(),
            created_us: 5,
            updated_us: 0,
            size_bytes: 0,
            error: None,
        }
    }

    fn ids(v: &[SnapshotRecord]) -> Vec<u128> {
        v.iter().map(|r| r.id.as_u128()).collect()
    }

    #[test]
    fn filters_sorts_and_pages() {
        let s = MemStore::new();
        s.apply(&[
            Change::PutSnapshot(snap(1, "a", Some("t1"), 10, "x")),
            Change::PutSnapshot(snap(2, "a", Some("t2"), 30, "y")),
            Change::PutSnapshot(snap(3, "b", None, 20, "x")),
            Change::PutSnapshot(snap(4, "b", Some("t1"), 20, "z")),
        ])
        .unwrap();
        // Default: newest first, ties by id ascending.
        let all = s.snapshots(&SnapshotQuery::default()).unwrap();
        assert_eq!(ids(&all), [2, 3, 4, 1]);
        // Tenant t1 sees its own and unowned ones.
        let q = SnapshotQuery {
            tenant: Some("t1".into()),
            ..Default::default()
        };
        assert_eq!(ids(&s.snapshots(&q).unwrap()), [3, 4, 1]);
        let q = SnapshotQuery {
            volumes: Some(vec!["b".into()]),
            name: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(ids(&s.snapshots(&q).unwrap()), [3]);
        let q = SnapshotQuery {
            volume_id: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(ids(&s.snapshots(&q).unwrap()), [2, 1]);
        // Name ascending then created descending.
        let mut q = SnapshotQuery::default();
        q.page.sort = vec![
            (SortKey::Name, SortDir::Asc),
            (SortKey::CreatedAt, SortDir::Desc),
        ];
        assert_eq!(ids(&s.snapshots(&q).unwrap()), [3, 1, 2, 4]);
        // Marker, offset, limit.
        q.page.marker = Some(Uuid::from_u128(3).to_string().to_uppercase());
        assert_eq!(ids(&s.snapshots(&q).unwrap()), [1, 2, 4]);
        q.page.offset = 1;
        q.page.limit = 1;
        assert_eq!(ids(&s.snapshots(&q).unwrap()), [2]);
        q.page.marker = Some(Uuid::from_u128(99).to_string());
        assert!(matches!(
            s.snapshots(&q),
            Err(StoreError::UnknownMarker(m)) if m == Uuid::from_u128(99).to_string()
        ));
        // A marker outside the filtered list is unknown to that list.
        let q = SnapshotQuery {
            volume_id: Some("a".into()),
            page: Page {
                marker: Some(Uuid::from_u128(3).to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(matches!(s.snapshots(&q), Err(StoreError::UnknownMarker(_))));
    }

    #[test]
    fn volumes_filter_by_tenant_and_status() {
        let s = MemStore::new();
        s.apply(&[
            Change::PutVolume(vol("c", None, VolStatus::Available)),
            Change::PutVolume(vol("m1", Some("t1"), VolStatus::Creating)),
            Change::PutVolume(vol("m2", Some("t2"), VolStatus::Available)),
        ])
        .unwrap();
        let q = VolumeQuery {
            tenant: Some("t1".into()),
            ..Default::default()
        };
        let got: Vec<String> = s.volumes(&q).unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(got, ["c", "m1"]);
        let q = VolumeQuery {
            status: Some("available".into()),
            page: Page {
                sort: vec![(SortKey::Id, SortDir::Desc)],
                ..Default::default()
            },
            ..Default::default()
        };
        let got: Vec<String> = s.volumes(&q).unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(got, ["m2", "c"]);
        s.apply(&[
            Change::RemoveVolume("m2".into()),
            Change::RemoveVolume("none".into()),
        ])
        .unwrap();
        assert!(s.volume("m2").unwrap().is_none());
        assert!(s.volume("c").unwrap().is_some());
    }

    #[test]
    fn a_failed_apply_changes_nothing() {
        let s = MemStore::new();
        s.fail_next_applies(1);
        let r = s.apply(&[Change::PutSnapshot(snap(1, "a", None, 1, "x"))]);
        assert!(matches!(r, Err(StoreError::Write(_))));
        assert!(s.snapshot(Uuid::from_u128(1)).unwrap().is_none());
        assert_eq!(s.applies(), 0);
        s.apply(&[Change::PutSnapshot(snap(1, "a", None, 1, "x"))])
            .unwrap();
        assert!(s.snapshot(Uuid::from_u128(1)).unwrap().is_some());
        assert_eq!(s.applies(), 1);
    }
}
