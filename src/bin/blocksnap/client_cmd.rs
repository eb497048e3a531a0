//! `blocksnap snapshot ...` and `blocksnap volume ...`: clients of blocksnapd.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use blocksnap::client::{Client, ClientError, TokenFile};
use blocksnap::util::printable;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's socket [default: /run/blocksnap/blocksnap.sock]
    #[arg(long, env = "BLOCKSNAP_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// API token (X-Auth-Token)
    #[arg(long, env = "BLOCKSNAP_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Tenant (account) id the token belongs to
    #[arg(long, env = "BLOCKSNAP_TENANT", global = true)]
    tenant: Option<String>,
    /// File with `tenant = "..."`, `token = "..."` and optionally `socket = "..."`
    #[arg(
        long,
        env = "BLOCKSNAP_TOKEN_FILE",
        default_value = "/etc/blocksnap/client.toml",
        global = true
    )]
    token_file: PathBuf,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot a volume (by id or display name)
    Create {
        volume: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Take it even if the volume is mounted and its quiesce mode is none (crash-consistent)
        #[arg(long)]
        force: bool,
        /// Store every block, starting the volume's chain over (needed after its device shrank)
        #[arg(long)]
        full: bool,
        /// Metadata KEY=VALUE (repeatable)
        #[arg(long = "meta", value_parser = crate::chain_cmd::parse_kv)]
        meta: Vec<(String, String)>,
        /// Wait until it is available (progress bar on a terminal); first, if
        /// another operation runs on the volume, wait for it to end
        #[arg(long)]
        wait: bool,
    },
    /// List snapshots
    List {
        /// Only those of this volume
        #[arg(long)]
        volume: Option<String>,
    },
    /// Show one snapshot
    Show { id: String },
    /// Delete a snapshot
    Delete {
        id: String,
        /// Wait until it is gone (after any operation running on its volume)
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// List volumes
    List,
    /// Show one volume
    Show { volume: String },
    /// Create a volume from a snapshot (a loop device over an image in the state directory)
    Create {
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        name: Option<String>,
        /// Size in GB (at least the snapshot's)
        #[arg(long)]
        size: Option<u64>,
        #[arg(long)]
        wait: bool,
    },
    /// Delete a volume made from a snapshot
    Delete {
        volume: String,
        /// Wait until it is gone (after any operation running on it)
        #[arg(long)]
        wait: bool,
    },
    /// Write a snapshot back onto its (unmounted) volume, only the blocks that differ
    Revert {
        volume: String,
        #[arg(long)]
        snapshot: String,
        /// Wait until it is done (after any operation running on the volume)
        #[arg(long)]
        wait: bool,
    },
}

impl ClientArgs {
    pub fn json(&self) -> bool {
        self.json
    }
}

pub(crate) fn client(a: &ClientArgs) -> Result<Client, Failure> {
    let file = TokenFile::load(&a.token_file).map_err(|m| Failure {
        code: crate::EXIT_FAILED,
        message: m,
    })?;
    let socket = a
        .socket
        .clone()
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from(blocksnap::config::DEFAULT_SOCKET));
    let token = a.token.clone().or(file.token).ok_or_else(|| Failure {
        code: crate::EXIT_FAILED,
        message: format!(
            "no API token: pass --token, set BLOCKSNAP_TOKEN, or put token = \"...\" in {}",
            a.token_file.display()
        ),
    })?;
    let tenant = a.tenant.clone().or(file.tenant).ok_or_else(|| Failure {
        code: crate::EXIT_FAILED,
        message: format!(
            "no tenant: pass --tenant, set BLOCKSNAP_TENANT, or put tenant = \"...\" in {}",
            a.token_file.display()
        ),
    })?;
    Ok(Client {
        socket,
        tenant,
        token,
    })
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A field for the terminal: control characters escaped.
fn shown(v: &Value, k: &str) -> String {
    printable(&s(v, k)).into_owned()
}

/// A volume by id (any id, not only UUIDs) or, failing that, by display name.
async fn resolve_volume(c: &Client, v: &str) -> Result<String, ClientError> {
    if blocksnap::config::valid_name(v) {
        match c.call(Method::GET, &format!("/volumes/{v}"), None).await {
            Ok(_) => return Ok(v.to_string()),
            Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let (_, list) = c.call(Method::GET, "/volumes", None).await?;
    let hits: Vec<String> = list["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["display_name"] == v)
        .map(|x| s(x, "id"))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ClientError::Api {
            status: 404,
            message: format!("no volume is named {v:?}"),
        }),
        _ => Err(ClientError::Api {
            status: 400,
            message: format!("{} volumes are named {v:?}; use the id", hits.len()),
        }),
    }
}

fn bar(what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(10000);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent}% {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    Some(pb)
}

fn percent(p: &Value) -> f64 {
    p.as_str()
        .and_then(|x| x.trim_end_matches('%').parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Poll `path` until its `key` object's status is no longer one of `busy`.
async fn wait(
    c: &Client,
    path: &str,
    key: &str,
    busy: &[&str],
    what: &str,
) -> Result<Value, ClientError> {
    let pb = bar(what);
    loop {
        let r = c.call(Method::GET, path, None).await;
        let v = match r {
            Ok((_, v)) => v[key].clone(),
            // A delete is done when the item is gone.
            Err(ClientError::Api { status: 404, .. }) if busy.contains(&"deleting") => {
                if let Some(pb) = pb {
                    pb.finish_and_clear();
                }
                return Ok(Value::Null);
            }
            Err(e) => return Err(e),
        };
        let status = s(&v, "status");
        if let Some(pb) = &pb {
            let p = percent(&v["os-extended-snapshot-attributes:progress"])
                .max(percent(&v["blocksnap:progress"]));
            pb.set_position((p * 100.0) as u64);
        }
        if !busy.contains(&status.as_str()) {
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Send a request that starts an operation. With `--wait`, one the daemon
/// refuses because another operation runs on the volume (one at a time)
/// waits for that one to end, up to ten minutes, instead of failing.
async fn start_operation(
    c: &Client,
    method: Method,
    path: &str,
    body: Option<Value>,
    wait: bool,
) -> Result<(hyper::StatusCode, Value), ClientError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut told = false;
    loop {
        match c.call(method.clone(), path, body.clone()).await {
            Err(ClientError::Api {
                status: 400,
                message,
            }) if wait
                && message.contains(" is busy: ")
                && std::time::Instant::now() < deadline =>
            {
                if !told {
                    eprintln!("{}; waiting", printable(&message));
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

fn failed_status(v: &Value, what: &str) -> Result<(), Failure> {
    let st = s(v, "status");
    if st.starts_with("error") {
        let why = v["blocksnap:error"]
            .as_str()
            .unwrap_or("see the daemon's log");
        return Err(Failure {
            code: crate::EXIT_FAILED,
            message: format!("{what} ended with status {st}: {why}"),
        });
    }
    Ok(())
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

fn snapshot_table(list: &[Value]) {
    println!(
        "{:<36}  {:<36}  {:<14}  {:<20}  {:>5}  {:<26}",
        "ID", "VOLUME", "STATUS", "NAME", "GB", "CREATED"
    );
    for x in list {
        println!(
            "{:<36}  {:<36}  {:<14}  {:<20}  {:>5}  {:<26}",
            shown(x, "id"),
            shown(x, "volume_id"),
            shown(x, "status"),
            shown(x, "display_name"),
            shown(x, "size"),
            shown(x, "created_at")
        );
    }
}

fn volume_table(list: &[Value]) {
    println!(
        "{:<36}  {:<10}  {:>5}  {:<20}  {:<14}",
        "ID", "STATUS", "GB", "NAME", "DEVICE"
    );
    for x in list {
        println!(
            "{:<36}  {:<10}  {:>5}  {:<20}  {:<14}",
            shown(x, "id"),
            shown(x, "status"),
            shown(x, "size"),
            shown(x, "display_name"),
            printable(x["metadata"]["blocksnap:device"].as_str().unwrap_or(""))
        );
    }
}

fn details(v: &Value) {
    if let Some(m) = v.as_object() {
        for (k, val) in m {
            // Nested values (metadata) print as JSON, which leaves DEL and
            // C1 controls as they are: escaped too.
            let text = match val {
                Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            println!("{:<44} {}", printable(k), printable(&text));
        }
    }
}

pub fn snapshot(cmd: SnapshotCommand, a: ClientArgs) -> Result<(), Failure> {
    let c = client(&a)?;
    runtime().block_on(async {
        match cmd {
            SnapshotCommand::Create {
                volume,
                name,
                description,
                force,
                full,
                meta,
                wait: w,
            } => {
                let vid = resolve_volume(&c, &volume).await?;
                let meta: serde_json::Map<String, Value> =
                    meta.into_iter().map(|(k, v)| (k, json!(v))).collect();
                let mut body = json!({"snapshot": {
                    "volume_id": vid,
                    "force": force,
                    "display_name": name.unwrap_or_default(),
                    "display_description": description.unwrap_or_default(),
                    "metadata": meta,
                }});
                // Only when asked: a daemon before `full` refuses the field.
                if full {
                    body["snapshot"]["full"] = json!(true);
                }
                let (_, v) = start_operation(&c, Method::POST, "/snapshots", Some(body), w).await?;
                let mut snap = v["snapshot"].clone();
                let id = s(&snap, "id");
                if w {
                    snap = wait(
                        &c,
                        &format!("/snapshots/{id}"),
                        "snapshot",
                        &["creating"],
                        "snapshot",
                    )
                    .await?;
                    if a.json {
                        print_json(&snap);
                    }
                    failed_status(&snap, &format!("snapshot {id}"))?;
                } else if a.json {
                    print_json(&snap);
                }
                if !a.json {
                    eprintln!("snapshot {}: {}", printable(&id), shown(&snap, "status"));
                    println!("{}", printable(&id));
                }
                Ok(())
            }
            SnapshotCommand::List { volume } => {
                let path = match volume {
                    Some(v) => format!(
                        "/snapshots/detail?volume_id={}",
                        resolve_volume(&c, &v).await?
                    ),
                    None => "/snapshots/detail".to_string(),
                };
                let (_, v) = c.call(Method::GET, &path, None).await?;
                if a.json {
                    print_json(&v["snapshots"]);
                } else {
                    snapshot_table(
                        v["snapshots"]
                            .as_array()
                            .map(|x| x.as_slice())
                            .unwrap_or(&[]),
                    );
                }
                Ok(())
            }
            SnapshotCommand::Show { id } => {
                let (_, v) = c
                    .call(Method::GET, &format!("/snapshots/{id}"), None)
                    .await?;
                if a.json {
                    print_json(&v["snapshot"]);
                } else {
                    details(&v["snapshot"]);
                }
                Ok(())
            }
            SnapshotCommand::Delete { id, wait: w } => {
                start_operation(&c, Method::DELETE, &format!("/snapshots/{id}"), None, w).await?;
                if w {
                    let v = wait(
                        &c,
                        &format!("/snapshots/{id}"),
                        "snapshot",
                        &["deleting"],
                        "delete",
                    )
                    .await?;
                    if !v.is_null() {
                        failed_status(&v, &format!("delete of snapshot {id}"))?;
                    }
                }
                eprintln!("snapshot {id}: {}", if w { "deleted" } else { "deleting" });
                Ok(())
            }
        }
    })
}

pub fn volume(cmd: VolumeCommand, a: ClientArgs) -> Result<(), Failure> {
    let c = client(&a)?;
    runtime().block_on(async {
        match cmd {
            VolumeCommand::List => {
                let (_, v) = c.call(Method::GET, "/volumes/detail", None).await?;
                if a.json {
                    print_json(&v["volumes"]);
                } else {
                    volume_table(v["volumes"].as_array().map(|x| x.as_slice()).unwrap_or(&[]));
                }
                Ok(())
            }
            VolumeCommand::Show { volume } => {
                let id = resolve_volume(&c, &volume).await?;
                let (_, v) = c.call(Method::GET, &format!("/volumes/{id}"), None).await?;
                if a.json {
                    print_json(&v["volume"]);
                } else {
                    details(&v["volume"]);
                }
                Ok(())
            }
            VolumeCommand::Create {
                snapshot,
                name,
                size,
                wait: w,
            } => {
                let mut body = json!({"volume": {"snapshot_id": snapshot, "display_name": name.unwrap_or_default()}});
                if let Some(sz) = size {
                    body["volume"]["size"] = json!(sz);
                }
                let (_, v) = c.call(Method::POST, "/volumes", Some(body)).await?;
                let mut vol = v["volume"].clone();
                let id = s(&vol, "id");
                if w {
                    vol = wait(&c, &format!("/volumes/{id}"), "volume", &["creating"], "volume").await?;
                    failed_status(&vol, &format!("volume {id}"))?;
                }
                if a.json {
                    print_json(&vol);
                } else {
                    eprintln!(
                        "volume {}: {}{}",
                        printable(&id),
                        shown(&vol, "status"),
                        vol["metadata"]["blocksnap:device"]
                            .as_str()
                            .map(|d| format!(" on {}", printable(d)))
                            .unwrap_or_default()
                    );
                    println!("{}", printable(&id));
                }
                Ok(())
            }
            VolumeCommand::Delete { volume, wait: w } => {
                let id = resolve_volume(&c, &volume).await?;
                start_operation(&c, Method::DELETE, &format!("/volumes/{id}"), None, w).await?;
                if w {
                    let v = wait(&c, &format!("/volumes/{id}"), "volume", &["deleting"], "delete").await?;
                    if !v.is_null() {
                        failed_status(&v, &format!("delete of volume {id}"))?;
                    }
                }
                eprintln!("volume {id}: {}", if w { "deleted" } else { "deleting" });
                Ok(())
            }
            VolumeCommand::Revert {
                volume,
                snapshot,
                wait: w,
            } => {
                let id = resolve_volume(&c, &volume).await?;
                start_operation(
                    &c,
                    Method::POST,
                    &format!("/volumes/{id}/action"),
                    Some(json!({"revert": {"snapshot_id": snapshot}})),
                    w,
                )
                .await?;
                if w {
                    let v = wait(&c, &format!("/volumes/{id}"), "volume", &["reverting"], "revert").await?;
                    if let Some(e) = v["blocksnap:error"].as_str() {
                        return Err(Failure {
                            code: crate::EXIT_FAILED,
                            message: format!("revert of volume {id} failed: {e}"),
                        });
                    }
                    eprintln!(
                        "volume {id} reverted to snapshot {snapshot}: {} block(s) written",
                        v["metadata"]["blocksnap:reverted_blocks"].as_str().unwrap_or("?")
                    );
                } else {
                    eprintln!("volume {id}: reverting to snapshot {snapshot}");
                }
                Ok(())
            }
        }
    })
}

/// `blocksnap backup ...` through blocksnapd (Cinder's v3 backups API).
#[derive(Debug)]
pub enum DaemonBackup {
    Create {
        volume: String,
        snapshot: Option<String>,
        incremental: bool,
        force: bool,
        name: Option<String>,
        description: Option<String>,
        wait: bool,
    },
    List {
        volume: Option<String>,
    },
    Show {
        id: String,
    },
    Delete {
        id: String,
        wait: bool,
    },
}

/// A v3 backups path of the client's project.
fn backups_path(c: &Client, rest: &str) -> String {
    format!("/v3/{}/backups{rest}", c.tenant)
}

/// Poll a backup until it is no longer creating (or deleting), with a
/// progress bar on a terminal; `Null` once a deleted one is gone.
async fn wait_backup(c: &Client, id: &str, busy: &[&str]) -> Result<Value, ClientError> {
    let pb = bar("backup");
    let path = backups_path(c, &format!("/{id}"));
    let done = |pb: Option<indicatif::ProgressBar>| {
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
    };
    loop {
        let v = match c.raw(Method::GET, &path, None).await {
            Ok((_, v)) => v["backup"].clone(),
            Err(ClientError::Api { status: 404, .. }) if busy.contains(&"deleting") => {
                done(pb);
                return Ok(Value::Null);
            }
            Err(e) => return Err(e),
        };
        if let Some(pb) = &pb {
            pb.set_position((percent(&v["blocksnap:progress"]) * 100.0) as u64);
        }
        if !busy.contains(&s(&v, "status").as_str()) {
            done(pb);
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn backup_table(list: &[Value]) {
    println!(
        "{:<36}  {:<36}  {:<14}  {:>5}  {:<11}  {:<26}  NAME",
        "ID", "VOLUME", "STATUS", "GB", "KIND", "CREATED"
    );
    for x in list {
        println!(
            "{:<36}  {:<36}  {:<14}  {:>5}  {:<11}  {:<26}  {}",
            shown(x, "id"),
            shown(x, "volume_id"),
            shown(x, "status"),
            shown(x, "size"),
            if x["is_incremental"] == true {
                "incremental"
            } else {
                "full"
            },
            shown(x, "created_at"),
            shown(x, "name")
        );
    }
}

pub fn backup(cmd: DaemonBackup, a: ClientArgs) -> Result<(), Failure> {
    let c = client(&a)?;
    runtime().block_on(async {
        match cmd {
            DaemonBackup::Create {
                volume,
                snapshot,
                incremental,
                force,
                name,
                description,
                wait: w,
            } => {
                let vid = resolve_volume(&c, &volume).await?;
                let body = json!({"backup": {
                    "volume_id": vid,
                    "snapshot_id": snapshot,
                    "incremental": incremental,
                    "force": force,
                    "name": name,
                    "description": description,
                }});
                let (_, v) = c
                    .raw(Method::POST, &backups_path(&c, ""), Some(body))
                    .await?;
                let id = s(&v["backup"], "id");
                let mut b = v["backup"].clone();
                if w {
                    b = wait_backup(&c, &id, &["creating"]).await?;
                }
                if a.json {
                    print_json(&b);
                } else {
                    eprintln!(
                        "backup {}: {}",
                        printable(&id),
                        if w {
                            shown(&b, "status")
                        } else {
                            "creating".into()
                        }
                    );
                    println!("{}", printable(&id));
                }
                if w && s(&b, "status") != "available" {
                    return Err(Failure {
                        code: crate::EXIT_FAILED,
                        message: format!(
                            "backup {} ended with status {}: {}",
                            printable(&id),
                            shown(&b, "status"),
                            printable(b["fail_reason"].as_str().unwrap_or("see the daemon's log"))
                        ),
                    });
                }
                Ok(())
            }
            DaemonBackup::List { volume } => {
                let path = match volume {
                    Some(v) => backups_path(
                        &c,
                        &format!("/detail?volume_id={}", resolve_volume(&c, &v).await?),
                    ),
                    None => backups_path(&c, "/detail"),
                };
                // The daemon answers at most a page (1000, as Cinder): follow
                // the next links to the end.
                let mut items: Vec<Value> = Vec::new();
                let mut next = Some(path);
                let mut pages = 0;
                while let Some(path) = next.take() {
                    let (_, v) = c.raw(Method::GET, &path, None).await?;
                    items.extend(v["backups"].as_array().cloned().unwrap_or_default());
                    pages += 1;
                    next = next_page(&v, "backups_links").filter(|_| pages < MAX_PAGES);
                }
                if a.json {
                    print_json(&Value::Array(items));
                } else {
                    backup_table(&items);
                }
                Ok(())
            }
            DaemonBackup::Show { id } => {
                let (_, v) = c
                    .raw(Method::GET, &backups_path(&c, &format!("/{id}")), None)
                    .await?;
                if a.json {
                    print_json(&v["backup"]);
                } else {
                    details(&v["backup"]);
                }
                Ok(())
            }
            DaemonBackup::Delete { id, wait: w } => {
                c.raw(Method::DELETE, &backups_path(&c, &format!("/{id}")), None)
                    .await?;
                if w {
                    let v = wait_backup(&c, &id, &["deleting"]).await?;
                    if !v.is_null() {
                        return Err(Failure {
                            code: crate::EXIT_FAILED,
                            message: format!(
                                "backup {} ended with status {}: {}",
                                printable(&id),
                                shown(&v, "status"),
                                printable(
                                    v["fail_reason"].as_str().unwrap_or("see the daemon's log")
                                )
                            ),
                        });
                    }
                    eprintln!("backup {} deleted", printable(&id));
                } else {
                    eprintln!("backup {}: deleting", printable(&id));
                }
                Ok(())
            }
        }
    })
}

/// More pages than any list can have (a daemon answering the same page
/// forever must not keep the CLI looping).
const MAX_PAGES: usize = 100_000;

/// The path and query of a list answer's `next` link (Cinder's
/// `..._links`), to ask the daemon for the next page.
fn next_page(answer: &Value, links: &str) -> Option<String> {
    let href = answer[links]
        .as_array()?
        .iter()
        .find(|l| l["rel"] == "next")?["href"]
        .as_str()?;
    let url = url::Url::parse(href).ok()?;
    Some(match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_is_the_next_links_path_and_query() {
        let answer = json!({
            "backups": [],
            "backups_links": [
                {"rel": "self", "href": "http://localhost/v3/t/backups/detail"},
                {"rel": "next", "href": "http://localhost/v3/t/backups/detail?limit=2&marker=ab-c%20d"}
            ]
        });
        assert_eq!(
            next_page(&answer, "backups_links").as_deref(),
            Some("/v3/t/backups/detail?limit=2&marker=ab-c%20d")
        );
        assert_eq!(next_page(&json!({"backups": []}), "backups_links"), None);
        let last = json!({"backups_links": [{"rel": "self", "href": "http://localhost/x"}]});
        assert_eq!(next_page(&last, "backups_links"), None);
    }
}
