//! Locks on a volume's backups, kept in the bucket so that processes on
//! different hosts (or a CLI beside the daemon) respect each other.
//!
//! - A writer (backup, delete, gc) creates `VOLUME/lock` with
//!   `If-None-Match: *`: exactly one succeeds.
//! - A reader (restore, verify) creates `VOLUME/readers/ID`. A delete or gc
//!   refuses while readers exist; a reader refuses while a delete or gc holds
//!   the lock. Backups only add objects and a manifest, so they run beside
//!   readers.
//!
//! A lock names its holder (host, pid, operation, start). One left by a
//! process of this host that no longer exists is stale and taken over; any
//! other is removed only by `blocksnap backup unlock`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::store::{PutMode, Store};
use super::BackupError;

/// Who holds a lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub op: String,
    pub since: String,
    pub token: Uuid,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a {} by process {} on host {} since {}",
            self.op, self.pid, self.host, self.since
        )
    }
}

impl Holder {
    fn me(op: &str) -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            op: op.to_string(),
            since: crate::util::format_timestamp(crate::util::now_micros()),
            token: Uuid::new_v4(),
        }
    }

    /// Held by a process of this host that is gone.
    fn is_stale(&self) -> bool {
        if self.host != hostname() {
            return false;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        matches!(
            nix::sys::signal::kill(pid, None),
            Err(nix::errno::Errno::ESRCH)
        )
    }

    /// Operations that remove what readers read.
    fn removes(&self) -> bool {
        self.op == "delete" || self.op == "gc"
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

/// A held lock; released (deleted) on drop.
#[derive(Debug)]
pub struct Guard<'a> {
    store: &'a dyn Store,
    key: String,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.delete(&self.key) {
            tracing::warn!(
                "cannot release lock {}: {}; the next operation will find it stale",
                self.key,
                crate::util::error_chain(&e)
            );
        }
    }
}

fn lock_key(volume: &str) -> String {
    format!("{volume}/lock")
}

fn readers_prefix(volume: &str) -> String {
    format!("{volume}/readers/")
}

fn read_holder(store: &dyn Store, key: &str) -> Result<Option<Holder>, BackupError> {
    Ok(store.get(key)?.map(|b| {
        serde_json::from_slice(&b).unwrap_or(Holder {
            host: "?".into(),
            pid: 0,
            op: "unknown operation (unreadable lock)".into(),
            since: "?".into(),
            token: Uuid::nil(),
        })
    }))
}

/// Take the writer lock of `volume` for `op` ("backup", "delete", "gc").
pub fn exclusive<'a>(
    store: &'a dyn Store,
    volume: &str,
    op: &str,
) -> Result<Guard<'a>, BackupError> {
    let key = lock_key(volume);
    let me = Holder::me(op);
    let body = serde_json::to_vec(&me).expect("serialisable");
    let mut took_over = false;
    loop {
        match store.put(&key, &body, PutMode::Create)? {
            super::store::Put::Done => break,
            super::store::Put::Exists => {
                let holder = read_holder(store, &key)?;
                match holder {
                    // Released meanwhile: try again.
                    None => continue,
                    // Ours: an earlier attempt of this request went through
                    // though its answer was lost.
                    Some(h) if h.token == me.token => break,
                    Some(h) if h.is_stale() && !took_over => {
                        tracing::warn!(
                            "taking over the lock of volume {volume} on remote {} left by {h}, which is gone",
                            store.remote()
                        );
                        store.delete(&key)?;
                        took_over = true;
                    }
                    Some(h) => {
                        return Err(BackupError::Locked {
                            remote: store.remote().to_string(),
                            volume: volume.to_string(),
                            holder: h.to_string(),
                        })
                    }
                }
            }
        }
    }
    let guard = Guard { store, key };
    if me.removes() {
        for r in store.list(&readers_prefix(volume))? {
            match read_holder(store, &r.key)? {
                Some(h) if h.is_stale() => store.delete(&r.key)?,
                Some(h) => {
                    return Err(BackupError::Readers {
                        remote: store.remote().to_string(),
                        volume: volume.to_string(),
                        holder: h.to_string(),
                    })
                }
                None => {}
            }
        }
    }
    Ok(guard)
}

/// Register a reader of `volume` for `op` ("restore", "verify").
pub fn shared<'a>(store: &'a dyn Store, volume: &str, op: &str) -> Result<Guard<'a>, BackupError> {
    let me = Holder::me(op);
    let key = format!("{}{}", readers_prefix(volume), me.token);
    store.put(
        &key,
        &serde_json::to_vec(&me).expect("serialisable"),
        PutMode::Overwrite,
    )?;
    let guard = Guard { store, key };
    if let Some(h) = read_holder(store, &lock_key(volume))? {
        if h.removes() && !h.is_stale() {
            return Err(BackupError::Locked {
                remote: store.remote().to_string(),
                volume: volume.to_string(),
                holder: h.to_string(),
            });
        }
    }
    Ok(guard)
}

/// Remove every lock of `volume` (after making sure their holders are gone).
pub fn unlock(store: &dyn Store, volume: &str) -> Result<Vec<Holder>, BackupError> {
    let mut removed = Vec::new();
    let mut keys = vec![lock_key(volume)];
    keys.extend(
        store
            .list(&readers_prefix(volume))?
            .into_iter()
            .map(|o| o.key),
    );
    for k in keys {
        if let Some(h) = read_holder(store, &k)? {
            store.delete(&k)?;
            removed.push(h);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::store::MemStore;

    #[test]
    fn one_writer_and_readers_exclude_removers() {
        let s = MemStore::new("r");
        let g = exclusive(&s, "v", "backup").unwrap();
        assert!(matches!(
            exclusive(&s, "v", "delete"),
            Err(BackupError::Locked { .. })
        ));
        // A backup does not keep readers out.
        let r = shared(&s, "v", "restore").unwrap();
        drop(g);
        // A delete is refused while a reader reads.
        let e = exclusive(&s, "v", "delete").unwrap_err();
        assert!(matches!(e, BackupError::Readers { .. }), "{e}");
        // ...and its failed attempt left no lock behind.
        assert!(s.get("v/lock").unwrap().is_none());
        drop(r);
        let d = exclusive(&s, "v", "delete").unwrap();
        assert!(matches!(
            shared(&s, "v", "verify"),
            Err(BackupError::Locked { .. })
        ));
        assert!(
            s.list("v/readers/").unwrap().is_empty(),
            "refused reader left"
        );
        drop(d);
        assert!(s.list("v/").unwrap().is_empty());
    }

    #[test]
    fn a_lock_of_a_dead_process_is_taken_over() {
        let s = MemStore::new("r");
        let mut dead = Holder::me("backup");
        // A pid that does not exist (beyond pid_max).
        dead.pid = 0x7fff_fff0;
        s.put(
            "v/lock",
            &serde_json::to_vec(&dead).unwrap(),
            PutMode::Create,
        )
        .unwrap();
        let g = exclusive(&s, "v", "backup").unwrap();
        drop(g);
        // One of another host is not.
        let mut other = Holder::me("backup");
        other.host = "elsewhere".into();
        s.put(
            "v/lock",
            &serde_json::to_vec(&other).unwrap(),
            PutMode::Create,
        )
        .unwrap();
        let e = exclusive(&s, "v", "backup").unwrap_err();
        assert!(e.to_string().contains("host elsewhere"), "{e}");
        assert_eq!(unlock(&s, "v").unwrap(), vec![other]);
        exclusive(&s, "v", "backup").unwrap();
    }
}
