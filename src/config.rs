//! The daemon's configuration file (TOML). Every mistake is reported once,
//! with the file, the line and what to change.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::quiesce::Mode;

pub const DEFAULT_CONFIG: &str = "/etc/blocksnap/blocksnap.toml";
pub const DEFAULT_SOCKET: &str = "/run/blocksnap/blocksnap.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/blocksnap";

/// A configuration mistake, located.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: Option<Spanned<RawDaemon>>,
    #[serde(default)]
    tokens: Vec<Spanned<RawToken>>,
    #[serde(default)]
    volumes: Vec<Spanned<RawVolume>>,
    #[serde(default)]
    remotes: Vec<Spanned<RawRemote>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    socket: Option<Spanned<PathBuf>>,
    state_dir: Option<Spanned<PathBuf>>,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    allowed_uids: Option<Vec<u32>>,
    max_connections: Option<Spanned<usize>>,
    max_made_volumes: Option<usize>,
    request_timeout_seconds: Option<Spanned<f64>>,
    log_level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    tenant: Spanned<String>,
    token: Option<Spanned<String>>,
    token_sha256: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    id: Spanned<String>,
    device: Spanned<PathBuf>,
    display_name: Option<String>,
    display_description: Option<String>,
    quiesce: Option<Mode>,
    block_size: Option<Spanned<u32>>,
    max_freeze_seconds: Option<Spanned<f64>>,
    tenant: Option<Spanned<String>>,
    backup_remote: Option<Spanned<String>>,
    track_writes: Option<bool>,
    verify_every: Option<Spanned<i64>>,
    schedule: Option<Spanned<String>>,
    keep: Option<Spanned<RawKeep>>,
    prune_api_snapshots: Option<Spanned<bool>>,
}

/// `keep = { hourly = 24, daily = 7, weekly = 4, monthly = 12 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeep {
    hourly: Option<Spanned<i64>>,
    daily: Option<Spanned<i64>>,
    weekly: Option<Spanned<i64>>,
    monthly: Option<Spanned<i64>>,
}

/// A byte count: an integer, or a string with a unit ("16 MiB", "50MB/s").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    name: Spanned<String>,
    endpoint: Spanned<String>,
    bucket: Spanned<String>,
    prefix: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    credentials_file: Spanned<PathBuf>,
    key_file: Option<Spanned<PathBuf>>,
    bandwidth_limit: Option<Spanned<RawSize>>,
    path_style: Option<bool>,
    object_size: Option<Spanned<RawSize>>,
    part_size: Option<Spanned<RawSize>>,
    concurrency: Option<Spanned<usize>>,
    timeout_seconds: Option<Spanned<f64>>,
    retries: Option<Spanned<u32>>,
    retry_delay_seconds: Option<Spanned<f64>>,
}

/// The credentials file of a remote. No Debug: it holds secrets.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// S3 credentials. Never printed: Debug shows nothing of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

/// A configured backup remote: an S3 bucket (and prefix) on an endpoint.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    pub name: String,
    /// `http(s)://host[:port]/`, ending with a slash.
    pub endpoint: String,
    pub bucket: String,
    /// Empty, or ending with a slash.
    pub prefix: String,
    pub region: String,
    pub credentials_file: PathBuf,
    pub credentials: Credentials,
    pub key_file: Option<PathBuf>,
    pub key: Option<crate::backup::crypto::Key>,
    /// Bytes per second, both directions together per direction.
    pub bandwidth_limit: Option<u64>,
    pub path_style: bool,
    pub object_size: u64,
    pub part_size: u64,
    pub concurrency: usize,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_delay: Duration,
}

/// An API token: the SHA-256 of the secret, and the tenant it belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub tenant: String,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets, not even their hashes.
        f.debug_struct("Token")
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// A configured volume.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// Any id of letters, digits, '-', '_' and '.' (usually a UUID).
    pub id: String,
    pub device: PathBuf,
    pub display_name: String,
    pub display_description: String,
    pub quiesce: Mode,
    pub block_size: Option<u32>,
    pub max_freeze: Duration,
    /// `None`: every tenant sees it.
    pub tenant: Option<String>,
    /// The remote its backups go to.
    pub backup_remote: Option<String>,
    /// Track writes between snapshots (block devices only; default true).
    pub track_writes: bool,
    /// Every Nth snapshot reads the whole device and checks tracking against
    /// it (0: never; default [`DEFAULT_VERIFY_EVERY`]).
    pub verify_every: u32,
    /// Snapshots taken on a schedule, and how long they are kept.
    pub schedule: Option<VolumeSchedule>,
}

/// A volume's `schedule`, `keep` and `prune_api_snapshots`.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeSchedule {
    pub schedule: crate::daemon::schedule::Schedule,
    pub keep: crate::daemon::schedule::Keep,
    /// Whether the keep rules prune snapshots made through the API too
    /// (default false: those stay until they are deleted).
    pub prune_api_snapshots: bool,
}

/// The largest count a keep rule takes.
pub const MAX_KEEP: i64 = 100_000;

/// Default of `verify_every`: with hourly snapshots, once a day.
pub const DEFAULT_VERIFY_EVERY: u32 = 24;

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<(String, u32)>,
    pub allowed_uids: Option<Vec<u32>>,
    pub max_connections: usize,
    /// Volumes the API may make (each is a loop device and an image file).
    pub max_made_volumes: usize,
    pub request_timeout: Duration,
    pub log_level: Option<String>,
    pub tokens: Vec<Token>,
    pub volumes: Vec<Volume>,
    pub remotes: Vec<RemoteConfig>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// A tenant or volume id as it may appear in a URL and a file name.
pub fn valid_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && t != "."
        && t != ".."
}

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The filesystem device (st_dev) of `path` or, if it does not exist yet,
/// of its nearest existing ancestor.
fn fs_of(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    loop {
        if let Ok(md) = std::fs::metadata(&p) {
            return Some(md.dev());
        }
        if !p.pop() {
            return None;
        }
    }
}

impl Config {
    /// Read and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read the configuration: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validate `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |offset: usize, message: String| ConfigError {
            file: path.to_path_buf(),
            line: line_of(text, offset),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            err(offset, e.message().trim().to_string())
        })?;
        let (daemon, daemon_at) = match raw.daemon {
            Some(d) => {
                let at = d.span().start;
                (d.into_inner(), at)
            }
            None => (RawDaemon::default(), 0),
        };
        let socket = daemon
            .socket
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        let state_dir = daemon
            .state_dir
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        for (p, what, at) in [
            (
                &socket,
                "socket",
                daemon.socket.as_ref().map(|s| s.span().start),
            ),
            (
                &state_dir,
                "state_dir",
                daemon.state_dir.as_ref().map(|s| s.span().start),
            ),
        ] {
            if !p.is_absolute() {
                return Err(err(
                    at.unwrap_or(daemon_at),
                    format!("{what} must be an absolute path, not {}", p.display()),
                ));
            }
        }
        let socket_mode = match &daemon.socket_mode {
            None => 0o660,
            Some(m) => u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8)
                .ok()
                .filter(|v| *v <= 0o777)
                .ok_or_else(|| {
                    err(
                        m.span().start,
                        format!(
                            "socket_mode must be an octal mode such as \"0660\", not {:?}",
                            m.get_ref()
                        ),
                    )
                })?,
        };
        let socket_group = match &daemon.socket_group {
            None => None,
            Some(g) => {
                let group = nix::unistd::Group::from_name(g.get_ref())
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        err(
                            g.span().start,
                            format!("socket_group {:?} does not exist on this host (create it with groupadd)", g.get_ref()),
                        )
                    })?;
                Some((g.get_ref().clone(), group.gid.as_raw()))
            }
        };
        let max_connections = match &daemon.max_connections {
            None => crate::defaults::MAX_CONNECTIONS,
            Some(m) if *m.get_ref() >= 1 => *m.get_ref(),
            Some(m) => {
                return Err(err(
                    m.span().start,
                    "max_connections must be at least 1".into(),
                ))
            }
        };
        let request_timeout = match &daemon.request_timeout_seconds {
            None => crate::defaults::REQUEST_TIMEOUT,
            Some(t) if t.get_ref().is_finite() && *t.get_ref() > 0.0 => {
                Duration::from_secs_f64(*t.get_ref())
            }
            Some(t) => {
                return Err(err(
                    t.span().start,
                    "request_timeout_seconds must be a positive number".into(),
                ))
            }
        };

        let mut tokens = Vec::new();
        for t in &raw.tokens {
            let at = t.span().start;
            let t = t.get_ref();
            if !valid_name(t.tenant.get_ref()) {
                return Err(err(
                    t.tenant.span().start,
                    format!(
                        "tenant {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                        t.tenant.get_ref()
                    ),
                ));
            }
            let sha256 = match (&t.token, &t.token_sha256) {
                (Some(tok), None) => {
                    if tok.get_ref().len() < 8 {
                        return Err(err(
                            tok.span().start,
                            "token must be at least 8 characters".into(),
                        ));
                    }
                    token_hash(tok.get_ref())
                }
                (None, Some(h)) => {
                    let s = h.get_ref();
                    let bytes: Option<Vec<u8>> = (s.len() == 64)
                        .then(|| {
                            (0..32)
                                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
                                .collect()
                        })
                        .flatten();
                    match bytes {
                        Some(b) => b.try_into().expect("32 bytes"),
                        None => {
                            return Err(err(
                                h.span().start,
                                "token_sha256 must be 64 hex digits (sha256sum of the token)"
                                    .into(),
                            ))
                        }
                    }
                }
                _ => {
                    return Err(err(
                        at,
                        "each [[tokens]] entry needs exactly one of token or token_sha256".into(),
                    ))
                }
            };
            tokens.push(Token {
                tenant: t.tenant.get_ref().clone(),
                sha256,
            });
        }
        if tokens.is_empty() {
            return Err(err(
                text.len(),
                "no [[tokens]]: every API call needs a token; add one with a tenant and a token"
                    .into(),
            ));
        }

        let remotes = parse_remotes(&raw.remotes, &err)?;

        let mut volumes = Vec::new();
        let mut seen_ids: HashMap<String, usize> = HashMap::new();
        let mut seen_devices: HashMap<PathBuf, usize> = HashMap::new();
        let state_fs = fs_of(&state_dir);
        let socket_fs = fs_of(&socket);
        for v in &raw.volumes {
            let v = v.get_ref();
            let id_at = v.id.span().start;
            let id = v.id.get_ref().clone();
            if !valid_name(&id) {
                return Err(err(
                    id_at,
                    format!("volume id {id:?} must be 1 to 64 letters, digits, '-', '_' or '.' (a UUID is usual)"),
                ));
            }
            if let Some(first) = seen_ids.insert(id.clone(), line_of(text, id_at)) {
                return Err(err(
                    id_at,
                    format!("volume id {id} is used twice (first on line {first})"),
                ));
            }
            let dev_at = v.device.span().start;
            let device = v.device.get_ref().clone();
            let md = std::fs::metadata(&device).map_err(|e| {
                err(
                    dev_at,
                    format!(
                        "device {} of volume {id} does not exist or cannot be read: {e}",
                        device.display()
                    ),
                )
            })?;
            let ft = md.file_type();
            if !ft.is_block_device() && !ft.is_file() {
                return Err(err(
                    dev_at,
                    format!(
                        "device {} of volume {id} is neither a block device nor a regular file",
                        device.display()
                    ),
                ));
            }
            let canonical = std::fs::canonicalize(&device).unwrap_or_else(|_| device.clone());
            if let Some(first) = seen_devices.insert(canonical, line_of(text, dev_at)) {
                return Err(err(
                    dev_at,
                    format!(
                        "device {} is configured twice (first on line {first})",
                        device.display()
                    ),
                ));
            }
            if ft.is_block_device() {
                // The state directory (chains, catalog) and the socket must not
                // be on the filesystem of a volume: freezing it would deadlock.
                let on_volume = |fs: Option<u64>| -> bool {
                    let Some(fs) = fs else { return false };
                    if fs == md.rdev() {
                        return true;
                    }
                    crate::quiesce::mountinfo::read()
                        .map(|all| {
                            crate::quiesce::mountinfo::mounts_of(&all, md.rdev(), &device)
                                .iter()
                                .any(|m| fs_of(&m.mount_point) == Some(fs))
                        })
                        .unwrap_or(false)
                };
                if on_volume(state_fs) {
                    return Err(err(
                        daemon.state_dir.as_ref().map(|s| s.span().start).unwrap_or(dev_at),
                        format!(
                            "state_dir {} is on volume {id} ({}); snapshots would freeze the filesystem they write to: put state_dir on another filesystem",
                            state_dir.display(),
                            device.display()
                        ),
                    ));
                }
                if on_volume(socket_fs) {
                    return Err(err(
                        daemon
                            .socket
                            .as_ref()
                            .map(|s| s.span().start)
                            .unwrap_or(dev_at),
                        format!(
                            "socket {} is on volume {id} ({}); put it on another filesystem",
                            socket.display(),
                            device.display()
                        ),
                    ));
                }
            }
            if let Some(bs) = &v.block_size {
                crate::chain::format::check_block_size(*bs.get_ref())
                    .map_err(|e| err(bs.span().start, e.to_string()))?;
            }
            let max_freeze = match &v.max_freeze_seconds {
                None => crate::defaults::MAX_FREEZE,
                Some(s) if s.get_ref().is_finite() && *s.get_ref() > 0.0 => {
                    Duration::from_secs_f64(*s.get_ref())
                }
                Some(s) => {
                    return Err(err(
                        s.span().start,
                        "max_freeze_seconds must be a positive number".into(),
                    ))
                }
            };
            let tenant = match &v.tenant {
                None => None,
                Some(t) => {
                    if !tokens.iter().any(|k| &k.tenant == t.get_ref()) {
                        return Err(err(
                            t.span().start,
                            format!("tenant {:?} of volume {id} has no token, so nobody could use the volume", t.get_ref()),
                        ));
                    }
                    Some(t.get_ref().clone())
                }
            };
            let backup_remote = match &v.backup_remote {
                None => None,
                Some(r) if remotes.iter().any(|x| &x.name == r.get_ref()) => {
                    Some(r.get_ref().clone())
                }
                Some(r) => {
                    return Err(err(
                        r.span().start,
                        format!(
                            "backup_remote {:?} of volume {id} names no [[remotes]] entry",
                            r.get_ref()
                        ),
                    ))
                }
            };
            let verify_every = match &v.verify_every {
                None => DEFAULT_VERIFY_EVERY,
                Some(n) if (0..=1_000_000).contains(n.get_ref()) => *n.get_ref() as u32,
                Some(n) => {
                    return Err(err(
                        n.span().start,
                        "verify_every must be a number of snapshots from 0 (never) to 1000000"
                            .into(),
                    ))
                }
            };
            let schedule = parse_volume_schedule(v, &id, &err)?;
            volumes.push(Volume {
                id,
                device,
                display_name: v.display_name.clone().unwrap_or_default(),
                display_description: v.display_description.clone().unwrap_or_default(),
                quiesce: v.quiesce.unwrap_or_default(),
                block_size: v.block_size.as_ref().map(|b| *b.get_ref()),
                max_freeze,
                tenant,
                backup_remote,
                track_writes: v.track_writes.unwrap_or(true),
                verify_every,
                schedule,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            socket,
            state_dir,
            socket_mode,
            socket_group,
            allowed_uids: daemon.allowed_uids,
            max_connections,
            max_made_volumes: daemon
                .max_made_volumes
                .unwrap_or(crate::defaults::MAX_MADE_VOLUMES),
            request_timeout,
            log_level: daemon.log_level,
            tokens,
            volumes,
            remotes,
        })
    }
}

/// A volume's `schedule`, `keep` and `prune_api_snapshots`, checked.
fn parse_volume_schedule(
    v: &RawVolume,
    id: &str,
    err: &dyn Fn(usize, String) -> ConfigError,
) -> Result<Option<VolumeSchedule>, ConfigError> {
    let Some(text) = &v.schedule else {
        if let Some(k) = &v.keep {
            return Err(err(
                k.span().start,
                format!("keep of volume {id} needs a schedule (keep rules prune only scheduled snapshots); add schedule = \"hourly\" or remove keep"),
            ));
        }
        if let Some(p) = &v.prune_api_snapshots {
            return Err(err(
                p.span().start,
                format!("prune_api_snapshots of volume {id} needs a schedule and keep rules"),
            ));
        }
        return Ok(None);
    };
    let schedule = crate::daemon::schedule::Schedule::parse(text.get_ref()).map_err(|e| {
        err(
            text.span().start,
            format!(
                "schedule {:?} of volume {id}: {e} (examples: \"hourly\", \"daily\", \"every 15 minutes\", \"Mon..Fri *-*-* 02:30\")",
                text.get_ref()
            ),
        )
    })?;
    let mut keep = crate::daemon::schedule::Keep::default();
    if let Some(k) = &v.keep {
        let k = k.get_ref();
        for (name, raw, slot) in [
            ("hourly", &k.hourly, &mut keep.hourly),
            ("daily", &k.daily, &mut keep.daily),
            ("weekly", &k.weekly, &mut keep.weekly),
            ("monthly", &k.monthly, &mut keep.monthly),
        ] {
            if let Some(n) = raw {
                if !(0..=MAX_KEEP).contains(n.get_ref()) {
                    return Err(err(
                        n.span().start,
                        format!("keep.{name} of volume {id} must be a count from 0 to {MAX_KEEP}"),
                    ));
                }
                *slot = *n.get_ref() as u32;
            }
        }
    }
    let prune_api_snapshots = match &v.prune_api_snapshots {
        None => false,
        Some(p) if *p.get_ref() && keep.is_empty() => {
            return Err(err(
                p.span().start,
                format!("prune_api_snapshots of volume {id} needs keep rules (without keep nothing is pruned)"),
            ))
        }
        Some(p) => *p.get_ref(),
    };
    Ok(Some(VolumeSchedule {
        schedule,
        keep,
        prune_api_snapshots,
    }))
}

/// Read only the `[[remotes]]` of a configuration file: the daemon's, or a
/// small file with nothing else (for restoring on another host). The whole
/// file must still be well-formed; volumes and tokens are not checked.
pub fn load_remotes(path: &Path) -> Result<Vec<RemoteConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        message: format!("cannot read the configuration: {e}"),
    })?;
    let err = |offset: usize, message: String| ConfigError {
        file: path.to_path_buf(),
        line: line_of(&text, offset),
        message,
    };
    let raw: RawConfig = toml::from_str(&text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        err(offset, e.message().trim().to_string())
    })?;
    parse_remotes(&raw.remotes, &err)
}

/// Parse a byte count: an integer, or a number with a unit (B, KB, KiB,
/// MB, MiB, GB, GiB; an optional "/s").
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1048576.0,
        "GB" => 1e9,
        "GiB" => 1073741824.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

/// Refuse a secret file that others may read or write, or that is not a
/// regular file.
pub fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is open to group or others (mode {mode:04o}); it holds secrets: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

fn load_credentials(path: &Path) -> Result<Credentials, String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?;
    let raw: RawCredentials = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(0);
        // Only messages that cannot echo a secret value.
        let m = e.message();
        let what = if m.contains("unknown field") || m.contains("missing field") {
            m.trim().to_string()
        } else {
            "expected access_key_id and secret_access_key strings".to_string()
        };
        format!("credentials file {}:{line}: {what}", path.display())
    })?;
    if raw.access_key_id.is_empty() || raw.secret_access_key.is_empty() {
        return Err(format!(
            "credentials file {}: access_key_id and secret_access_key must not be empty",
            path.display()
        ));
    }
    Ok(Credentials {
        access_key_id: raw.access_key_id,
        secret_access_key: raw.secret_access_key,
        session_token: raw.session_token,
    })
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
}

fn parse_remotes(
    raw: &[Spanned<RawRemote>],
    err: &dyn Fn(usize, String) -> ConfigError,
) -> Result<Vec<RemoteConfig>, ConfigError> {
    let mut out: Vec<RemoteConfig> = Vec::new();
    for r in raw {
        let r = r.get_ref();
        let name = r.name.get_ref().clone();
        if !valid_name(&name) {
            return Err(err(
                r.name.span().start,
                format!("remote name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(err(
                r.name.span().start,
                format!("remote {name} is configured twice"),
            ));
        }
        let ep = r.endpoint.get_ref();
        let endpoint = match url::Url::parse(ep) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.query().is_none()
                    && u.username().is_empty()
                    && u.password().is_none() =>
            {
                let mut s = u.to_string();
                if !s.ends_with('/') {
                    s.push('/');
                }
                s
            }
            _ => {
                return Err(err(
                    r.endpoint.span().start,
                    format!("endpoint of remote {name} must be an http:// or https:// URL such as \"https://s3.example.com\" (without credentials or a query)"),
                ))
            }
        };
        let bucket = r.bucket.get_ref().clone();
        if !valid_bucket(&bucket) {
            return Err(err(
                r.bucket.span().start,
                format!("bucket {bucket:?} of remote {name} must be 3 to 63 lower-case letters, digits, '.' or '-'"),
            ));
        }
        let prefix = match &r.prefix {
            None => String::new(),
            Some(p) => {
                let t = p.get_ref().trim_matches('/');
                let ok = t
                    .split('/')
                    .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
                    && t.bytes().all(|b| b.is_ascii_graphic());
                if t.is_empty() {
                    String::new()
                } else if ok {
                    format!("{t}/")
                } else {
                    return Err(err(
                        p.span().start,
                        format!("prefix {:?} of remote {name} must be printable ASCII path segments without spaces, '.' or '..'", p.get_ref()),
                    ));
                }
            }
        };
        let region = r
            .region
            .as_ref()
            .map(|x| x.get_ref().clone())
            .unwrap_or_else(|| "us-east-1".into());
        let cpath = r.credentials_file.get_ref().clone();
        let credentials = load_credentials(&cpath).map_err(|m| {
            err(
                r.credentials_file.span().start,
                format!("credentials_file of remote {name}: {m}"),
            )
        })?;
        let (key_file, key) = match &r.key_file {
            None => (None, None),
            Some(k) => {
                let at = k.span().start;
                let path = k.get_ref().clone();
                check_private(&path)
                    .map_err(|m| err(at, format!("key_file of remote {name}: {m}")))?;
                let key = crate::backup::crypto::Key::load(&path).map_err(|e| {
                    err(
                        at,
                        format!(
                            "key_file of remote {name}: {}",
                            crate::util::error_chain(&e)
                        ),
                    )
                })?;
                (Some(path), Some(key))
            }
        };
        let size = |v: &Option<Spanned<RawSize>>,
                    what: &str,
                    default: u64,
                    min: u64,
                    max: u64|
         -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => {
                    let n = match s.get_ref() {
                        RawSize::Int(n) => Some(*n),
                        RawSize::Text(t) => parse_size(t),
                    };
                    match n {
                        Some(n) if (min..=max).contains(&n) => Ok(n),
                        _ => Err(err(
                            s.span().start,
                            format!("{what} of remote {name} must be a size from {} to {} (bytes, or a number with B, KiB, MiB, GiB)", crate::util::human_bytes(min), crate::util::human_bytes(max)),
                        )),
                    }
                }
            }
        };
        let bandwidth_limit = match &r.bandwidth_limit {
            None => None,
            Some(_) => Some(size(
                &r.bandwidth_limit,
                "bandwidth_limit",
                0,
                64 << 10,
                u64::MAX / 2,
            )?),
        };
        let object_size = size(&r.object_size, "object_size", 16 << 20, 1 << 20, 1 << 30)?;
        let part_size = size(&r.part_size, "part_size", 8 << 20, 5 << 20, 1 << 30)?;
        let concurrency = match &r.concurrency {
            None => 4,
            Some(c) if (1..=64).contains(c.get_ref()) => *c.get_ref(),
            Some(c) => {
                return Err(err(
                    c.span().start,
                    format!("concurrency of remote {name} must be from 1 to 64"),
                ))
            }
        };
        let seconds = |v: &Option<Spanned<f64>>,
                       what: &str,
                       default: f64|
         -> Result<Duration, ConfigError> {
            match v {
                None => Ok(Duration::from_secs_f64(default)),
                Some(t) if t.get_ref().is_finite() && *t.get_ref() > 0.0 && *t.get_ref() < 1e6 => {
                    Ok(Duration::from_secs_f64(*t.get_ref()))
                }
                Some(t) => Err(err(
                    t.span().start,
                    format!("{what} of remote {name} must be a positive number of seconds"),
                )),
            }
        };
        let timeout = seconds(&r.timeout_seconds, "timeout_seconds", 60.0)?;
        let retry_delay = seconds(&r.retry_delay_seconds, "retry_delay_seconds", 0.5)?;
        let retries = match &r.retries {
            None => 8,
            Some(n) if *n.get_ref() <= 100 => *n.get_ref(),
            Some(n) => {
                return Err(err(
                    n.span().start,
                    format!("retries of remote {name} must be at most 100"),
                ))
            }
        };
        out.push(RemoteConfig {
            name,
            endpoint,
            bucket,
            prefix,
            region,
            credentials_file: cpath,
            credentials,
            key_file,
            key,
            bandwidth_limit,
            path_style: r.path_style.unwrap_or(true),
            object_size,
            part_size,
            concurrency,
            timeout,
            retries,
            retry_delay,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/blocksnap/test.toml"), text)
    }

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    const TOKENS: &str = "[[tokens]]\ntenant = \"acct\"\ntoken = \"secret-token\"\n";

    #[test]
    fn a_full_config_parses() {
        let img = image();
        let text = format!(
            "[daemon]\nsocket = \"/run/x.sock\"\nstate_dir = \"/var/lib/x\"\nsocket_mode = \"0600\"\nallowed_uids = [0, 1000]\n\n{TOKENS}\n[[tokens]]\ntenant = \"other\"\ntoken_sha256 = \"{}\"\n\n[[volumes]]\nid = \"c849a193-5275-4527-9e5a-69b2a05933aa\"\ndevice = \"{}\"\ndisplay_name = \"data\"\nquiesce = \"unmount\"\nblock_size = 8192\nmax_freeze_seconds = 5\ntenant = \"acct\"\ntrack_writes = false\nverify_every = 6\n",
            "ab".repeat(32),
            img.path().display()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.allowed_uids, Some(vec![0, 1000]));
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(c.tokens[0].sha256, token_hash("secret-token"));
        assert_eq!(c.tokens[1].sha256, [0xab; 32]);
        let v = &c.volumes[0];
        assert_eq!(v.quiesce, Mode::Unmount);
        assert_eq!(v.block_size, Some(8192));
        assert_eq!(v.max_freeze, Duration::from_secs(5));
        assert_eq!(v.tenant.as_deref(), Some("acct"));
        assert!(!v.track_writes);
        assert_eq!(v.verify_every, 6);
        assert!(!format!("{:?}", c.tokens[0]).contains("ab"));
    }

    #[test]
    fn every_mistake_names_its_line() {
        let img = image();
        let dev = img.path().display().to_string();
        let vol = |id: &str, dev: &str| format!("[[volumes]]\nid = \"{id}\"\ndevice = \"{dev}\"\n");
        let id = "c849a193-5275-4527-9e5a-69b2a05933aa";
        let id2 = "d849a193-5275-4527-9e5a-69b2a05933aa";
        let cases: Vec<(String, usize, &str)> = vec![
            (
                format!("{TOKENS}[daemon]\nsockett = \"/x\"\n"),
                5,
                "unknown field",
            ),
            (
                format!("{TOKENS}{}", vol("not/a/name", &dev)),
                5,
                "letters, digits",
            ),
            (
                format!("{TOKENS}{}{}", vol(id, &dev), vol(id, "/dev/null")),
                8,
                "used twice",
            ),
            (
                format!("{TOKENS}{}{}", vol(id, &dev), vol(id2, &dev)),
                9,
                "configured twice",
            ),
            (
                format!("{TOKENS}{}", vol(id, "/nonexistent/disk")),
                6,
                "does not exist",
            ),
            (
                format!("{TOKENS}{}", vol(id, "/dev/null")),
                6,
                "neither a block device",
            ),
            (
                format!("{TOKENS}{}quiesce = \"sometimes\"\n", vol(id, &dev)),
                7,
                "unknown variant",
            ),
            (
                format!("{TOKENS}{}block_size = 1000\n", vol(id, &dev)),
                7,
                "power of two",
            ),
            (
                format!("{TOKENS}{}max_freeze_seconds = -1\n", vol(id, &dev)),
                7,
                "positive",
            ),
            (
                format!("{TOKENS}{}verify_every = -3\n", vol(id, &dev)),
                7,
                "verify_every",
            ),
            (
                format!("{TOKENS}{}track_writes = \"yes\"\n", vol(id, &dev)),
                7,
                "invalid type",
            ),
            (
                format!("{TOKENS}{}verify_evry = 3\n", vol(id, &dev)),
                7,
                "unknown field",
            ),
            (
                format!("{TOKENS}{}tenant = \"ghost\"\n", vol(id, &dev)),
                7,
                "has no token",
            ),
            (
                "[[tokens]]\ntenant = \"a\"\n".to_string(),
                1,
                "exactly one of token",
            ),
            (
                "[[tokens]]\ntenant = \"a\"\ntoken_sha256 = \"xyz\"\n".to_string(),
                3,
                "64 hex",
            ),
            (
                "[[tokens]]\ntenant = \"a/b\"\ntoken = \"secret-token\"\n".to_string(),
                2,
                "letters, digits",
            ),
            (
                "[daemon]\nsocket = \"/x\"\n".to_string(),
                3,
                "no [[tokens]]",
            ),
            (
                format!("[daemon]\nstate_dir = \"relative\"\n{TOKENS}"),
                2,
                "absolute",
            ),
            (
                format!("[daemon]\nsocket_mode = \"rw\"\n{TOKENS}"),
                2,
                "octal",
            ),
            (
                format!("[daemon]\nsocket_group = \"no-such-group-xyz\"\n{TOKENS}"),
                2,
                "does not exist",
            ),
            ("this is not toml".to_string(), 1, ""),
        ];
        for (text, line, needle) in cases {
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.line, line, "wrong line for {needle:?}: {e}\n{text}");
            assert!(
                e.message.contains(needle),
                "message {:?} lacks {needle:?}",
                e.message
            );
            assert!(
                e.to_string().starts_with("/etc/blocksnap/test.toml:"),
                "{e}"
            );
        }
    }

    #[test]
    fn schedules_and_keep_rules() {
        let img = image();
        let dev = img.path().display();
        let c = parse(&format!(
            "{TOKENS}[[volumes]]\nid = \"v\"\ndevice = \"{dev}\"\nschedule = \"Mon..Fri *-*-* 02:30\"\nkeep = {{ hourly = 24, monthly = 12 }}\nprune_api_snapshots = true\n"
        ))
        .unwrap();
        let s = c.volumes[0].schedule.as_ref().unwrap();
        assert_eq!(s.schedule.to_string(), "Mon..Fri *-*-* 02:30");
        assert_eq!(
            s.keep,
            crate::daemon::schedule::Keep {
                hourly: 24,
                monthly: 12,
                ..Default::default()
            }
        );
        assert!(s.prune_api_snapshots);
        let c = parse(&format!(
            "{TOKENS}[[volumes]]\nid = \"v\"\ndevice = \"{dev}\"\nschedule = \"every 15 minutes\"\n"
        ))
        .unwrap();
        let s = c.volumes[0].schedule.as_ref().unwrap();
        assert!(s.keep.is_empty());
        assert!(!s.prune_api_snapshots);
        let c = parse(&format!(
            "{TOKENS}[[volumes]]\nid = \"v\"\ndevice = \"{dev}\"\n"
        ))
        .unwrap();
        assert!(c.volumes[0].schedule.is_none());
    }

    #[test]
    fn schedule_mistakes_name_their_line_and_field() {
        let img = image();
        let vol = format!(
            "{TOKENS}[[volumes]]\nid = \"v\"\ndevice = \"{}\"\n",
            img.path().display()
        );
        for (extra, line, needle) in [
            (
                "schedule = \"*-*-* 25:00\"\n",
                7,
                "hour: 25 is not in 0..23",
            ),
            ("schedule = \"sometimes\"\n", 7, "not a schedule"),
            ("schedule = \"every 10 seconds\"\n", 7, "interval"),
            ("schedule = 5\n", 7, "invalid type"),
            (
                "schedule = \"daily\"\nkeep = { hourly = 24, yearly = 2 }\n",
                8,
                "unknown field",
            ),
            (
                "schedule = \"daily\"\nkeep = { daily = -1 }\n",
                8,
                "keep.daily",
            ),
            (
                "schedule = \"daily\"\nkeep = { daily = 1 }\nprune_api_snapshots = \"yes\"\n",
                9,
                "invalid type",
            ),
            ("keep = { daily = 7 }\n", 7, "needs a schedule"),
            ("prune_api_snapshots = false\n", 7, "needs a schedule"),
            (
                "schedule = \"daily\"\nprune_api_snapshots = true\n",
                8,
                "needs keep rules",
            ),
            ("schedulle = \"daily\"\n", 7, "unknown field"),
        ] {
            let text = format!("{vol}{extra}");
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.line, line, "wrong line for {needle:?}: {e}\n{text}");
            assert!(e.message.contains(needle), "{e} lacks {needle:?}");
        }
    }

    /// A credentials file (mode 0600) and a key file in a temp dir.
    fn secrets() -> (tempfile::TempDir, PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("creds.toml");
        std::fs::write(
            &c,
            "access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"very-secret-value\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = d.path().join("key");
        std::fs::write(&k, [7u8; 32]).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        (d, c, k)
    }

    #[test]
    fn remotes_parse_and_never_show_their_secrets() {
        let (_d, c, k) = secrets();
        let img = image();
        let text = format!(
            "{TOKENS}[[remotes]]\nname = \"offsite\"\nendpoint = \"http://127.0.0.1:9000\"\nbucket = \"backups\"\nprefix = \"/host1/\"\ncredentials_file = \"{}\"\nkey_file = \"{}\"\nbandwidth_limit = \"50 MiB/s\"\nobject_size = \"32MiB\"\n\n[[volumes]]\nid = \"v1\"\ndevice = \"{}\"\nbackup_remote = \"offsite\"\n",
            c.display(),
            k.display(),
            img.path().display()
        );
        let cfg = parse(&text).unwrap();
        let r = &cfg.remotes[0];
        assert_eq!(r.endpoint, "http://127.0.0.1:9000/");
        assert_eq!(r.prefix, "host1/");
        assert_eq!(r.region, "us-east-1");
        assert_eq!(r.bandwidth_limit, Some(50 << 20));
        assert_eq!(r.object_size, 32 << 20);
        assert_eq!(r.credentials.secret_access_key, "very-secret-value");
        assert!(r.key.is_some());
        assert_eq!(cfg.volumes[0].backup_remote.as_deref(), Some("offsite"));
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("very-secret") && !dbg.contains("AKIAEXAMPLE"),
            "{dbg}"
        );
        // The remotes alone, from the daemon's file: volumes not checked.
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            text.replace(&img.path().display().to_string(), "/gone"),
        )
        .unwrap();
        let rs = load_remotes(f.path()).unwrap();
        assert_eq!(rs[0].name, "offsite");
        assert_eq!(parse_size("1.5KiB"), Some(1536));
        assert_eq!(parse_size("10 MB/s"), Some(10_000_000));
        assert_eq!(parse_size("ten"), None);
    }

    #[test]
    fn remote_mistakes_name_their_line() {
        use std::os::unix::fs::PermissionsExt;
        let (d, c, k) = secrets();
        let open = d.path().join("open.toml");
        std::fs::copy(&c, &open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let bad_creds = d.path().join("bad.toml");
        std::fs::write(
            &bad_creds,
            "access_key_id = 12345678\nsecret_access_key = \"s3cr3t-v4lue\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&bad_creds, std::fs::Permissions::from_mode(0o600)).unwrap();
        let img = image();
        let remote = |extra: &str, creds: &Path| {
            format!(
                "{TOKENS}[[remotes]]\nname = \"r\"\nendpoint = \"http://h:1\"\nbucket = \"bkt\"\ncredentials_file = \"{}\"\n{extra}",
                creds.display()
            )
        };
        let cases: Vec<(String, usize, &str)> = vec![
            (remote("", &open), 8, "chmod 600"),
            (
                remote("", &bad_creds),
                8,
                "access_key_id and secret_access_key",
            ),
            (remote("colour = \"red\"\n", &c), 9, "unknown field"),
            (remote("bucket2 = 1\n", &c), 9, "unknown field"),
            (
                remote(&format!("key_file = \"{}\"\n", open.display()), &c),
                9,
                "chmod 600",
            ),
            (
                remote(&format!("key_file = \"{}\"\n", c.display()), &c),
                9,
                "32 random bytes",
            ),
            (
                remote("bandwidth_limit = \"fast\"\n", &c),
                9,
                "bandwidth_limit",
            ),
            (remote("part_size = 1024\n", &c), 9, "part_size"),
            (remote("concurrency = 0\n", &c), 9, "concurrency"),
            (
                remote("", &c).replace("http://h:1", "ftp://h"),
                6,
                "http://",
            ),
            (remote("", &c).replace("bkt", "Bad_Bucket"), 7, "bucket"),
            (
                format!(
                    "{}[[volumes]]\nid = \"v\"\ndevice = \"{}\"\nbackup_remote = \"nope\"\n",
                    remote("", &c),
                    img.path().display()
                ),
                12,
                "names no [[remotes]]",
            ),
            (
                format!("{}{}", remote("", &c), remote("", &c).replace(TOKENS, "")),
                10,
                "twice",
            ),
        ];
        for (text, line, needle) in cases {
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.line, line, "wrong line for {needle:?}: {e}\n{text}");
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
            assert!(
                !e.message.contains("s3cr3t") && !e.message.contains("12345678"),
                "{e}"
            );
        }
        let _ = k;
    }

    #[test]
    fn tenants_are_url_safe() {
        assert!(valid_name("yourAccountID"));
        assert!(valid_name("c849a193-5275-4527-9e5a-69b2a05933aa"));
        assert!(valid_name("a-b_c.9"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
