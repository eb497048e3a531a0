//! Freeze intent markers: written (and made durable) before a filesystem is
//! frozen and removed after it is thawed, so that whoever starts next (the
//! daemon, or `blocksnap thaw --all` from `ExecStopPost=`) can thaw a freeze
//! whose owner died. The kernel never thaws on its own.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::System;

/// What a marker records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    pub device: PathBuf,
    pub mount_point: PathBuf,
    pub pid: u32,
    pub boot_id: String,
    pub created_us: i64,
}

/// A marker on disk; removed by [`Marker::clear`] (not on drop: a marker
/// must outlive a crash).
#[derive(Debug)]
pub struct Marker {
    path: PathBuf,
}

impl Marker {
    /// Write a marker for freezing `mount_point` of `device` into `dir`.
    pub fn write(dir: &Path, device: &Path, mount_point: &Path) -> io::Result<Marker> {
        crate::util::create_private_dir_all(dir)?;
        let intent = Intent {
            device: device.to_path_buf(),
            mount_point: mount_point.to_path_buf(),
            pid: std::process::id(),
            boot_id: crate::sys::boot_id(),
            created_us: crate::util::now_micros(),
        };
        let name = format!(
            "freeze-{}-{}.json",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let path = dir.join(name);
        let bytes = serde_json::to_vec_pretty(&intent).map_err(io::Error::other)?;
        crate::util::write_atomic(&path, &bytes)?;
        Ok(Marker { path })
    }

    /// Remove the marker once the filesystem is thawed.
    pub fn clear(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(
                "could not remove freeze marker {}: {e}",
                self.path.display()
            );
        }
        let _ = crate::util::sync_parent(&self.path);
    }
}

/// What [`thaw_leftovers`] did with one marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The filesystem was frozen and is thawed now.
    Thawed(PathBuf),
    /// It was not frozen (any more).
    NotFrozen(PathBuf),
    /// The marker is from an earlier boot; freezes do not survive reboots.
    Stale(PathBuf),
    /// Its owner is still running; left alone.
    OwnerAlive(PathBuf, u32),
    /// Thawing failed.
    Failed(PathBuf, String),
}

fn owner_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with("blocksnap"))
        .unwrap_or(false)
}

/// Thaw every filesystem a marker in `dir` says was frozen by a process
/// that is gone, and remove those markers.
pub fn thaw_leftovers(sys: &dyn System, dir: &Path) -> Vec<Outcome> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let boot = crate::sys::boot_id();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let intent: Intent = match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(i) => i,
            None => {
                tracing::warn!("ignoring unreadable freeze marker {}", path.display());
                continue;
            }
        };
        let outcome = if intent.boot_id != boot {
            Outcome::Stale(intent.mount_point.clone())
        } else if owner_alive(intent.pid) {
            out.push(Outcome::OwnerAlive(intent.mount_point.clone(), intent.pid));
            continue;
        } else {
            match sys.thaw(&intent.mount_point) {
                Ok(()) => Outcome::Thawed(intent.mount_point.clone()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    Outcome::NotFrozen(intent.mount_point.clone())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Outcome::NotFrozen(intent.mount_point.clone())
                }
                Err(e) => {
                    out.push(Outcome::Failed(intent.mount_point.clone(), e.to_string()));
                    continue;
                }
            }
        };
        match &outcome {
            Outcome::Thawed(mp) => tracing::warn!(
                mount_point = %mp.display(),
                device = %intent.device.display(),
                pid = intent.pid,
                "thawed a filesystem left frozen by an earlier blocksnap run"
            ),
            other => tracing::info!("freeze marker {}: {:?}", path.display(), other),
        }
        let _ = std::fs::remove_file(&path);
        out.push(outcome);
    }
    let _ = crate::util::sync_parent(&dir.join("x"));
    out
}
