//! Claims: which running operation reads or writes which volume and
//! snapshot, held as values.
//!
//! An operation asks for every resource it will read or write at once, each
//! shared (several readers may hold it) or exclusive (nobody else may). The
//! request is all or nothing: it either gets every resource or none and
//! learns which holder is in the way. The [`Claim`] it gets back releases
//! everything when it is dropped, so a claim moved into a job is released
//! when the job ends, panics, or is dropped without ever starting.
//!
//! Reading the catalog for a view never takes a claim.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

/// Something an operation reads or writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// A volume: its device and its chain file.
    Volume(String),
    /// A snapshot's data in its chain.
    Snapshot(Uuid),
    /// The backups of a volume on its remote: a backup or a delete writes
    /// them (exclusive), a restore reads them (shared).
    Backups(String),
    /// One backup (deleted exclusively, restored shared).
    Backup(Uuid),
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Volume(v) => write!(f, "volume {v}"),
            Resource::Snapshot(s) => write!(f, "snapshot {s}"),
            Resource::Backups(v) => write!(f, "the backups of volume {v}"),
            Resource::Backup(b) => write!(f, "backup {b}"),
        }
    }
}

/// How a resource is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Others may hold it shared too (readers).
    Shared,
    /// Nobody else may hold it.
    Exclusive,
}

/// One resource an operation wants, and what to tell anyone it is in the
/// way of: `what` completes "volume V is busy: ..." or "snapshot S is in
/// use: ...", e.g. "volume N is being created from it".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub resource: Resource,
    pub mode: Mode,
    pub what: String,
    /// The status a view shows for the resource while it is held (volumes:
    /// "reverting", "deleting", ...); `None` leaves the status alone.
    pub status: Option<&'static str>,
}

impl Want {
    pub fn exclusive(resource: Resource, what: impl Into<String>) -> Want {
        Want {
            resource,
            mode: Mode::Exclusive,
            what: what.into(),
            status: None,
        }
    }
    pub fn shared(resource: Resource, what: impl Into<String>) -> Want {
        Want {
            resource,
            mode: Mode::Shared,
            what: what.into(),
            status: None,
        }
    }
    pub fn showing(mut self, status: &'static str) -> Want {
        self.status = Some(status);
        self
    }
}

/// Why a claim was refused: the resource and what holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub resource: Resource,
    /// The holder's description of what it is doing with the resource.
    pub running: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.resource {
            Resource::Volume(v) => write!(f, "volume {v} is busy: {}", self.running),
            Resource::Snapshot(s) => write!(f, "snapshot {s} is in use: {}", self.running),
            Resource::Backups(v) => {
                write!(f, "the backups of volume {v} are busy: {}", self.running)
            }
            Resource::Backup(b) => write!(f, "backup {b} is in use: {}", self.running),
        }
    }
}

#[derive(Debug)]
struct Holder {
    claim: u64,
    mode: Mode,
    what: String,
    status: Option<&'static str>,
}

/// Every claim held now.
#[derive(Debug, Default)]
pub struct Claims {
    held: Mutex<HashMap<Resource, Vec<Holder>>>,
    next: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Claims {
    pub fn new() -> Arc<Claims> {
        Arc::new(Claims::default())
    }

    /// Take every resource in `wants`, or none of them.
    pub fn acquire(self: &Arc<Self>, wants: Vec<Want>) -> Result<Claim, Conflict> {
        let mut held = lock(&self.held);
        for w in &wants {
            if let Some(holders) = held.get(&w.resource) {
                let blocking = holders
                    .iter()
                    .find(|h| w.mode == Mode::Exclusive || h.mode == Mode::Exclusive);
                if let Some(h) = blocking {
                    return Err(Conflict {
                        resource: w.resource.clone(),
                        running: h.what.clone(),
                    });
                }
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut resources = Vec::with_capacity(wants.len());
        for w in wants {
            held.entry(w.resource.clone()).or_default().push(Holder {
                claim: id,
                mode: w.mode,
                what: w.what,
                status: w.status,
            });
            resources.push(w.resource);
        }
        Ok(Claim {
            claims: self.clone(),
            id,
            resources,
        })
    }

    /// Add `wants` to a claim already held, all or nothing (for an
    /// operation that learns what it reads only after it started, such as a
    /// backup of the snapshot it took itself).
    pub fn extend(&self, claim: &mut Claim, wants: Vec<Want>) -> Result<(), Conflict> {
        let mut held = lock(&self.held);
        for w in &wants {
            if let Some(holders) = held.get(&w.resource) {
                let blocking = holders.iter().find(|h| {
                    h.claim != claim.id && (w.mode == Mode::Exclusive || h.mode == Mode::Exclusive)
                });
                if let Some(h) = blocking {
                    return Err(Conflict {
                        resource: w.resource.clone(),
                        running: h.what.clone(),
                    });
                }
            }
        }
        for w in wants {
            held.entry(w.resource.clone()).or_default().push(Holder {
                claim: claim.id,
                mode: w.mode,
                what: w.what,
                status: w.status,
            });
            claim.resources.push(w.resource);
        }
        Ok(())
    }

    /// The status to show for a resource while it is held, if any holder
    /// set one (the first that did).
    pub fn status_of(&self, r: &Resource) -> Option<&'static str> {
        lock(&self.held)
            .get(r)
            .and_then(|hs| hs.iter().find_map(|h| h.status))
    }

    /// What holds a resource now, if anything (for messages and tests).
    pub fn holders(&self, r: &Resource) -> Vec<String> {
        lock(&self.held)
            .get(r)
            .map(|hs| hs.iter().map(|h| h.what.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        lock(&self.held).is_empty()
    }

    /// Everything held, as "resource: what" lines (for tests and debugging).
    pub fn describe(&self) -> Vec<String> {
        let held = lock(&self.held);
        let mut out: Vec<String> = held
            .iter()
            .flat_map(|(r, hs)| hs.iter().map(move |h| format!("{r}: {}", h.what)))
            .collect();
        out.sort();
        out
    }

    fn release(&self, id: u64, resources: &[Resource]) {
        let mut held = lock(&self.held);
        for r in resources {
            if let Some(hs) = held.get_mut(r) {
                hs.retain(|h| h.claim != id);
                if hs.is_empty() {
                    held.remove(r);
                }
            }
        }
    }
}

/// Resources held by one operation; released on drop.
#[derive(Debug)]
pub struct Claim {
    claims: Arc<Claims>,
    id: u64,
    resources: Vec<Resource>,
}

impl Claim {
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.release(self.id, &self.resources);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(v: &str) -> Resource {
        Resource::Volume(v.into())
    }

    #[test]
    fn shared_readers_exclude_a_writer_and_the_reverse() {
        let c = Claims::new();
        let s = Resource::Snapshot(Uuid::from_u128(7));
        let a = c
            .acquire(vec![Want::shared(
                s.clone(),
                "volume a is being created from it",
            )])
            .unwrap();
        let b = c
            .acquire(vec![Want::shared(
                s.clone(),
                "volume b is being created from it",
            )])
            .unwrap();
        let e = c
            .acquire(vec![Want::exclusive(s.clone(), "it is being deleted")])
            .unwrap_err();
        assert_eq!(e.resource, s);
        assert_eq!(
            e.to_string(),
            format!(
                "snapshot {} is in use: volume a is being created from it",
                Uuid::from_u128(7)
            )
        );
        drop(a);
        assert!(c.acquire(vec![Want::exclusive(s.clone(), "x")]).is_err());
        drop(b);
        let x = c.acquire(vec![Want::exclusive(s.clone(), "x")]).unwrap();
        assert!(c.acquire(vec![Want::shared(s.clone(), "y")]).is_err());
        drop(x);
        assert!(c.is_empty());
    }

    #[test]
    fn all_or_nothing() {
        let c = Claims::new();
        let held = c
            .acquire(vec![Want::exclusive(
                vol("b"),
                "snapshot s is being created",
            )])
            .unwrap();
        let e = c
            .acquire(vec![
                Want::exclusive(vol("a"), "one"),
                Want::exclusive(vol("b"), "two"),
            ])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "volume b is busy: snapshot s is being created"
        );
        // Nothing of the refused request stayed behind.
        assert!(c.acquire(vec![Want::exclusive(vol("a"), "three")]).is_ok());
        drop(held);
        assert!(c.is_empty());
    }

    #[test]
    fn an_extended_claim_is_released_whole() {
        let c = Claims::new();
        let s = Resource::Snapshot(Uuid::from_u128(9));
        let mut claim = c
            .acquire(vec![Want::exclusive(
                Resource::Backups("a".into()),
                "backup b is being created",
            )])
            .unwrap();
        let writer = c
            .acquire(vec![Want::exclusive(s.clone(), "deleting")])
            .unwrap();
        let e = c
            .extend(
                &mut claim,
                vec![Want::shared(s.clone(), "backup b reads it")],
            )
            .unwrap_err();
        assert_eq!(e.running, "deleting");
        drop(writer);
        c.extend(
            &mut claim,
            vec![Want::shared(s.clone(), "backup b reads it")],
        )
        .unwrap();
        assert_eq!(
            c.acquire(vec![Want::exclusive(s.clone(), "x")])
                .unwrap_err()
                .to_string(),
            format!(
                "snapshot {} is in use: backup b reads it",
                Uuid::from_u128(9)
            )
        );
        drop(claim);
        assert!(c.is_empty());
    }

    #[test]
    fn released_when_a_holder_panics_or_is_never_run() {
        let c = Claims::new();
        let claim = c
            .acquire(vec![Want::exclusive(vol("a"), "x").showing("reverting")])
            .unwrap();
        assert_eq!(c.status_of(&vol("a")), Some("reverting"));
        let r = std::thread::spawn(move || {
            let _held = claim;
            panic!("job panicked");
        })
        .join();
        assert!(r.is_err());
        assert!(c.is_empty());
        let claim = c.acquire(vec![Want::exclusive(vol("a"), "x")]).unwrap();
        let job = move || drop(claim);
        drop(job);
        assert!(c.is_empty());
    }
}
