//! OpenStack's own clients against the real blocksnapd (issue 13): today's
//! python-cinderclient (CLI and Python API), openstacksdk's block_storage,
//! python-openstackclient, and python-cinderclient 4.3 on API v1, each on a
//! real loop device with a mounted ext4, through a socat bridge from
//! 127.0.0.1 to the daemon's Unix socket.
//!
//! The clients live in virtualenvs that scripts/install-deps.sh makes
//! (scripts/install-clients.sh); tests/clients/drive.py runs one client
//! operation and prints what the client answered as JSON. This file decides
//! what is right: the answers, and the data (a volume made from a snapshot
//! and a reverted volume are compared byte for byte with the snapshot).

mod backup_support;
mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const VOL: &str = "5aa119a8-d25b-45a7-8d1b-88e127885635";
/// Bytes of the file the tests write on the mounted volume.
const FILE_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------- clients

/// Where scripts/install-clients.sh puts the virtualenvs.
fn venv_root() -> PathBuf {
    std::env::var_os("BLOCKSNAP_CLIENT_VENVS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/blocksnap-clients"))
}

/// The Python of a client virtualenv ("current" or "legacy"). Missing: the
/// test skips, or fails where skipping is forbidden (CI).
fn client_python(test: &str, venv: &str) -> Option<PathBuf> {
    let py = venv_root().join(venv).join("bin/python");
    if py.exists() {
        return Some(py);
    }
    let why = format!(
        "the OpenStack clients are not installed in {}; run scripts/install-deps.sh",
        venv_root().join(venv).display()
    );
    if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// A TCP bridge on 127.0.0.1 to the daemon's socket (the clients speak
/// TCP only); the socat process is stopped on drop.
struct Bridge {
    child: Child,
    port: u16,
}

impl Bridge {
    fn new(socket: &Path) -> Bridge {
        // A port the kernel just handed out; socat binds it with reuseaddr.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("UNIX-CONNECT:{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat runs (scripts/install-deps.sh installs it)");
        let b = Bridge { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client, pointed at one endpoint.
struct Client {
    python: PathBuf,
    name: &'static str,
    url: String,
    microversion: Option<&'static str>,
}

impl Client {
    /// Run one operation; the client's answer as JSON.
    fn run(&self, op: &str, args: &[&str]) -> Value {
        let out = self.output(op, args);
        assert!(
            out.status.success(),
            "{} {op} {args:?} failed:\n{}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{} {op}: not JSON ({e}): {}",
                self.name,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn output(&self, op: &str, args: &[&str]) -> std::process::Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/drive.py");
        let mut cmd = Command::new(&self.python);
        cmd.arg(script)
            .arg(self.name)
            .arg(op)
            .args(args)
            .env("BLOCKSNAP_URL", &self.url)
            .env("BLOCKSNAP_TOKEN", TOKEN)
            .env("BLOCKSNAP_PROJECT", TENANT)
            .env("HOME", std::env::temp_dir());
        match self.microversion {
            Some(v) => cmd.env("BLOCKSNAP_VOLUME_API_VERSION", v),
            None => cmd.env_remove("BLOCKSNAP_VOLUME_API_VERSION"),
        };
        cmd.output().unwrap()
    }

    fn at(&self, microversion: &'static str) -> Client {
        Client {
            python: self.python.clone(),
            name: self.name,
            url: self.url.clone(),
            microversion: Some(microversion),
        }
    }
}

// ---------------------------------------------------------------- the volume

/// A mounted ext4 on a loop device, configured as volume VOL of a running
/// daemon, with a bridge to its socket.
struct Setup {
    mount: Option<Mounted>,
    vol: Loop,
    d: DaemonProc,
    bridge: Bridge,
    content: Vec<u8>,
}

impl Setup {
    fn new(seed: u64) -> Setup {
        Setup::with(seed, "", "")
    }

    /// With `extra` TOML after the volume (remotes) and `vol_extra` in it.
    fn with(seed: u64, extra: &str, vol_extra: &str) -> Setup {
        let vol = Loop::new(64 << 20);
        mkfs("ext4", &vol.dev);
        let m = Mounted::new(&vol.dev, "ext4", "");
        let content = random_bytes(seed, FILE_BYTES);
        std::fs::write(m.dir.join("data"), &content).unwrap();
        nix::unistd::sync();
        let d = DaemonProc::start(
            "",
            &format!(
                "{}\n{extra}",
                volume_toml(
                    VOL,
                    &vol.dev,
                    &format!("display_name = \"data\"\n{vol_extra}")
                )
            ),
        );
        let bridge = Bridge::new(&d.socket);
        Setup {
            mount: Some(m),
            vol,
            d,
            bridge,
            content,
        }
    }

    fn client(&self, python: &Path, name: &'static str, api: &str) -> Client {
        Client {
            python: python.to_path_buf(),
            name,
            url: format!("http://127.0.0.1:{}/{api}/{TENANT}", self.bridge.port),
            microversion: None,
        }
    }

    /// A volume's v1 record, as the seed's API shows it.
    fn v1_volume(&self, id: &str) -> Value {
        self.d
            .wait_volume(id, &["creating", "deleting", "reverting"])
    }
}

/// What the test checks of a snapshot a client created.
fn check_snapshot(got: &Value, name: &str, description: &str) {
    assert_eq!(got["name"], name, "{got}");
    assert_eq!(got["description"], description, "{got}");
    assert_eq!(got["volume_id"], VOL, "{got}");
    assert!(
        uuid::Uuid::parse_str(got["id"].as_str().unwrap_or("")).is_ok(),
        "{got}"
    );
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v["id"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The made volume holds the snapshot byte for byte (compared with the
/// chain's own restore of it), and the file written before the snapshot.
fn check_made_volume(s: &Setup, made: &str, snap: &str) {
    let v = s.v1_volume(made);
    assert_eq!(v["status"], "available", "{v}\n{}", s.d.log_text());
    let dev = v["metadata"]["blocksnap:device"]
        .as_str()
        .unwrap_or_else(|| panic!("no device in {v}"))
        .to_string();
    let restored = restore_image(&s.d.chain(VOL), snap);
    let want = read_all(&restored.image);
    let got = read_all(Path::new(&dev));
    assert_same(&got[..want.len()], &want, "volume made from the snapshot");
    let (m, _l, _r) = restore_and_mount(&s.d.chain(VOL), snap);
    assert!(
        std::fs::read(m.dir.join("data")).unwrap() == s.content,
        "the file in the snapshot differs from what was written"
    );
}

/// Unmount the volume, scribble on it, revert it with `revert` and check it
/// holds the snapshot again, byte for byte.
fn check_revert(s: &mut Setup, snap: &str, revert: impl FnOnce()) {
    drop(s.mount.take());
    let restored = restore_image(&s.d.chain(VOL), snap);
    let want = read_all(&restored.image);
    for b in [0u64, 7, 1000, 16383] {
        write_at(&s.vol.dev, b * 4096, &random_bytes(b + 99, 4096));
    }
    assert!(read_all(&s.vol.dev) != want, "scribbling changed nothing");
    revert();
    let v = s.v1_volume(VOL);
    assert_ne!(v["status"], "error", "{v}\n{}", s.d.log_text());
    assert_eq!(
        v["metadata"]["blocksnap:reverted_to"],
        snap,
        "{v}\n{}",
        s.d.log_text()
    );
    assert_same(&read_all(&s.vol.dev), &want, "reverted volume");
}

fn wait_snapshot_gone(s: &Setup, id: &str) {
    assert!(
        s.d.wait_snapshot(id).is_null(),
        "snapshot {id} still there\n{}",
        s.d.log_text()
    );
}

// ---------------------------------------------------------------- tests

/// python-cinderclient 9.x, CLI and Python API: everything the issue lists.
fn cinderclient_9(test: &str, name: &'static str, seed: u64) {
    if !root(test) {
        return;
    }
    let Some(py) = client_python(test, "current") else {
        return;
    };
    let mut s = Setup::new(seed);
    let c = s.client(&py, name, "v3");

    // list and show.
    assert!(ids(&c.run("volumes", &[])).contains(&VOL.to_string()));
    let v = c.run("volume", &[VOL]);
    assert_eq!(
        (v["id"].as_str(), v["name"].as_str()),
        (Some(VOL), Some("data")),
        "{v}"
    );
    assert_eq!(v["size"], 1, "{v}");

    // snapshot-create, -show, -list.
    let snap = c.run("create-snapshot", &[VOL, "s1", "first", "k=v"]);
    check_snapshot(&snap, "s1", "first");
    let sid = snap["id"].as_str().unwrap().to_string();
    assert_eq!(s.d.wait_snapshot(&sid)["status"], "available");
    let shown = c.run("snapshot", &[&sid]);
    check_snapshot(&shown, "s1", "first");
    assert_eq!(shown["status"], "available");
    assert_eq!(shown["metadata"], json!({"k": "v"}));
    assert_eq!(shown["size"], 1);
    assert_eq!(
        shown["os-extended-snapshot-attributes:progress"], "100%",
        "{shown}"
    );
    assert!(ids(&c.run("snapshots", &[])).contains(&sid));

    // snapshot-rename.
    c.run("rename-snapshot", &[&sid, "s1-renamed", "second"]);
    check_snapshot(&c.run("snapshot", &[&sid]), "s1-renamed", "second");

    // snapshot metadata: set, unset, replace, show.
    c.run("snapshot-metadata", &[&sid, "set", "a=1", "b=2"]);
    assert_eq!(
        c.run("snapshot-metadata", &[&sid, "show"]),
        json!({"k": "v", "a": "1", "b": "2"})
    );
    c.run("snapshot-metadata", &[&sid, "unset", "a"]);
    assert_eq!(
        c.run("snapshot-metadata", &[&sid, "show"]),
        json!({"k": "v", "b": "2"})
    );
    c.run("snapshot-metadata", &[&sid, "replace", "x=9"]);
    assert_eq!(
        c.run("snapshot-metadata", &[&sid, "show"]),
        json!({"x": "9"})
    );

    // A volume from the snapshot, its metadata, and its delete.
    let made = c.run("create-volume", &[&sid, "made"]);
    let mid = made["id"].as_str().unwrap().to_string();
    assert_eq!(made["snapshot_id"], sid.as_str(), "{made}");
    check_made_volume(&s, &mid, &sid);
    assert_eq!(c.run("volume", &[&mid])["name"], "made");
    c.run("volume-metadata", &[&mid, "set", "role=copy"]);
    let meta = c.run("volume-metadata", &[&mid, "show"]);
    assert_eq!(meta["role"], "copy", "{meta}");
    c.run("volume-metadata", &[&mid, "unset", "role"]);
    assert!(c
        .run("volume-metadata", &[&mid, "show"])
        .get("role")
        .is_none());
    c.run("delete-volume", &[&mid]);
    assert!(s.d.wait_volume(&mid, &["deleting"]).is_null());

    // revert-to-snapshot at 3.40 (the latest snapshot, as Cinder wants).
    let c340 = c.at("3.40");
    check_revert(&mut s, &sid, || {
        c340.run("revert", &[VOL, &sid]);
    });

    // snapshot-delete.
    c.run("delete-snapshot", &[&sid]);
    wait_snapshot_gone(&s, &sid);
    assert!(!ids(&c.run("snapshots", &[])).contains(&sid));
}

#[test]
fn cinderclient_9_cli() {
    cinderclient_9("cinderclient_9_cli", "cinder-cli", 91);
}

#[test]
fn cinderclient_9_python_api() {
    cinderclient_9("cinderclient_9_python_api", "cinder-api", 92);
}

/// python-cinderclient's Python API on the Unix socket itself, through
/// requests-unixsocket: no bridge, no TCP.
#[test]
fn cinderclient_python_api_on_the_unix_socket() {
    let test = "cinderclient_python_api_on_the_unix_socket";
    if !root(test) {
        return;
    }
    let Some(py) = client_python(test, "current") else {
        return;
    };
    let s = Setup::new(96);
    let sock: String =
        s.d.socket
            .to_str()
            .unwrap()
            .bytes()
            .map(|b| match b {
                b'/' => "%2F".to_string(),
                b => (b as char).to_string(),
            })
            .collect();
    let c = Client {
        python: py,
        name: "cinder-api-unix",
        url: format!("http+unix://{sock}/v3/{TENANT}"),
        microversion: None,
    };
    assert!(ids(&c.run("volumes", &[])).contains(&VOL.to_string()));
    let snap = c.run("create-snapshot", &[VOL, "unix", "over the socket", "k=v"]);
    check_snapshot(&snap, "unix", "over the socket");
    let sid = snap["id"].as_str().unwrap().to_string();
    assert_eq!(s.d.wait_snapshot(&sid)["status"], "available");
    check_snapshot(&c.run("snapshot", &[&sid]), "unix", "over the socket");
    c.run("delete-snapshot", &[&sid]);
    wait_snapshot_gone(&s, &sid);
}

/// A boolean as a client shows it: JSON, or Python's text in a CLI table.
fn flag(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "True" => Some(true),
        Value::String(s) if s == "False" => Some(false),
        _ => None,
    }
}

/// Poll a backup through a client until it is no longer creating.
fn wait_backup(c: &Client, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let b = c.run("backup", &[id]);
        if b["status"] != "creating" {
            return b;
        }
        assert!(Instant::now() < deadline, "backup {id} stuck: {b}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// cinderclient 9's backup-create/-list/-show/-delete (CLI) and its Python
/// API's backups and restores, against moto.
#[test]
fn cinderclient_backups() {
    let test = "cinderclient_backups";
    if !root(test) || !backup_support::have_server(test) {
        return;
    }
    let Some(py) = client_python(test, "current") else {
        return;
    };
    let server = backup_support::S3Server::start();
    let files = backup_support::remote_files(&server.endpoint(), None, "");
    let remotes = std::fs::read_to_string(&files.config).unwrap();
    let s = Setup::with(97, &remotes, "backup_remote = \"s3\"");
    let cli = s.client(&py, "cinder-cli", "v3");
    let api = s.client(&py, "cinder-api", "v3");

    let b = cli.run("backup-create", &[VOL, "nightly", "false"]);
    let id = b["id"].as_str().unwrap().to_string();
    let b = wait_backup(&api, &id);
    assert_eq!(b["status"], "available", "{b}\n{}", s.d.log_text());
    assert_eq!(flag(&b["is_incremental"]), Some(false), "{b}");
    assert_eq!(b["name"], "nightly", "{b}");
    let b2 = api.run("backup-create", &[VOL, "incr", "true"]);
    let id2 = b2["id"].as_str().unwrap().to_string();
    let b2 = wait_backup(&cli, &id2);
    assert_eq!(b2["status"], "available", "{b2}\n{}", s.d.log_text());
    assert_eq!(flag(&b2["is_incremental"]), Some(true), "{b2}");
    let listed = ids(&cli.run("backups", &[]));
    assert!(listed.contains(&id) && listed.contains(&id2), "{listed:?}");
    assert_eq!(ids(&api.run("backups", &[])).len(), 2);

    // A restore makes a new volume holding the snapshot the backup holds.
    let r = api.run("backup-restore", &[&id2, "restored"]);
    assert_eq!(r["backup_id"], id2.as_str(), "{r}");
    assert_eq!(r["volume_name"], "restored", "{r}");
    let snap = b2["snapshot_id"].as_str().unwrap().to_string();
    check_made_volume(&s, r["volume_id"].as_str().unwrap(), &snap);

    // One page of one (cinderclient stops at its limit, or follows
    // backups_links to reach it), by name: "incr" before "nightly".
    assert_eq!(
        ids(&cli.run("backups-page", &["1", "name:asc"])),
        [id2.as_str()]
    );
    assert_eq!(
        ids(&api.run("backups-page", &["1", "name:desc"])),
        [id.as_str()]
    );
    assert_eq!(
        ids(&api.run("backups-page", &["2", "name:asc"])),
        [id2.clone(), id.clone()]
    );

    // A volume from a backup (3.47): `cinder create --backup-id` and
    // volumes.create(backup_id=...) hold the snapshot the backup holds.
    let made = cli
        .at("3.47")
        .run("create-volume-from-backup", &[&id, "from-nightly"]);
    assert_eq!(made["name"], "from-nightly", "{made}");
    let full_snap = b["snapshot_id"].as_str().unwrap().to_string();
    check_made_volume(&s, made["id"].as_str().unwrap(), &full_snap);
    let made = api
        .at("3.47")
        .run("create-volume-from-backup", &[&id2, "from-incr"]);
    assert_eq!(made["status"], "creating", "{made}");
    check_made_volume(&s, made["id"].as_str().unwrap(), &snap);

    cli.run("backup-delete", &[&id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids(&api.run("backups", &[])).contains(&id) {
        assert!(Instant::now() < deadline, "backup {id} not deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn openstacksdk_block_storage() {
    let test = "openstacksdk_block_storage";
    if !root(test) {
        return;
    }
    let Some(py) = client_python(test, "current") else {
        return;
    };
    let s = Setup::new(93);
    let c = s.client(&py, "sdk", "v3");
    // volumes.
    let vols = c.run("volumes", &[]);
    assert!(ids(&vols).contains(&VOL.to_string()), "{vols}");
    assert_eq!(c.run("volume", &[VOL])["name"], "data");
    // create_snapshot, get_snapshot, snapshots.
    let snap = c.run("create-snapshot", &[VOL, "sdk-snap", "from the sdk", "k=v"]);
    check_snapshot(&snap, "sdk-snap", "from the sdk");
    let sid = snap["id"].as_str().unwrap().to_string();
    assert_eq!(s.d.wait_snapshot(&sid)["status"], "available");
    let got = c.run("snapshot", &[&sid]);
    check_snapshot(&got, "sdk-snap", "from the sdk");
    assert_eq!(got["metadata"], json!({"k": "v"}));
    assert!(ids(&c.run("snapshots", &[])).contains(&sid));
    // create_volume from the snapshot.
    let made = c.run("create-volume", &[&sid, "sdk-made"]);
    let mid = made["id"].as_str().unwrap().to_string();
    check_made_volume(&s, &mid, &sid);
    c.run("delete-volume", &[&mid]);
    assert!(s.d.wait_volume(&mid, &["deleting"]).is_null());
    // delete_snapshot.
    c.run("delete-snapshot", &[&sid]);
    wait_snapshot_gone(&s, &sid);
}

#[test]
fn openstackclient_volume_snapshot() {
    let test = "openstackclient_volume_snapshot";
    if !root(test) {
        return;
    }
    let Some(py) = client_python(test, "current") else {
        return;
    };
    let s = Setup::new(94);
    let c = s.client(&py, "osc", "v3");
    // openstack volume snapshot create / show / list / delete.
    let snap = c.run("create-snapshot", &[VOL, "osc-snap", "from osc", "k=v"]);
    check_snapshot(&snap, "osc-snap", "from osc");
    let sid = snap["id"].as_str().unwrap().to_string();
    assert_eq!(s.d.wait_snapshot(&sid)["status"], "available");
    let got = c.run("snapshot", &[&sid]);
    check_snapshot(&got, "osc-snap", "from osc");
    assert_eq!(got["status"], "available");
    assert!(ids(&c.run("snapshots", &[])).contains(&sid));
    c.run("delete-snapshot", &[&sid]);
    wait_snapshot_gone(&s, &sid);
}

#[test]
fn cinderclient_4_3_on_api_v1() {
    let test = "cinderclient_4_3_on_api_v1";
    if !root(test) {
        return;
    }
    let Some(py) = client_python(test, "legacy") else {
        return;
    };
    let s = Setup::new(95);
    let c = s.client(&py, "cinder-v1", "v1");
    assert!(ids(&c.run("volumes", &[])).contains(&VOL.to_string()));
    assert_eq!(c.run("volume", &[VOL])["name"], "data");
    // 4.3's v1 snapshot-create has no --metadata.
    let snap = c.run("create-snapshot", &[VOL, "v1-snap", "from 4.3"]);
    check_snapshot(&snap, "v1-snap", "from 4.3");
    let sid = snap["id"].as_str().unwrap().to_string();
    assert_eq!(s.d.wait_snapshot(&sid)["status"], "available");
    check_snapshot(&c.run("snapshot", &[&sid]), "v1-snap", "from 4.3");
    assert!(ids(&c.run("snapshots", &[])).contains(&sid));
    c.run("rename-snapshot", &[&sid, "v1-renamed", "renamed by 4.3"]);
    check_snapshot(&c.run("snapshot", &[&sid]), "v1-renamed", "renamed by 4.3");
    c.run("snapshot-metadata", &[&sid, "set", "a=1", "b=2"]);
    assert_eq!(
        c.run("snapshot-metadata", &[&sid, "show"]),
        json!({"a": "1", "b": "2"})
    );
    c.run("snapshot-metadata", &[&sid, "unset", "a"]);
    c.run("snapshot-metadata", &[&sid, "replace", "x=9"]);
    assert_eq!(
        c.run("snapshot-metadata", &[&sid, "show"]),
        json!({"x": "9"})
    );
    // `cinder create --snapshot-id ID 1`: the body carries attach_status,
    // user_id, project_id and status, which the API ignores.
    let made = c.run("create-volume", &[&sid, "v1-made"]);
    let mid = made["id"].as_str().unwrap().to_string();
    check_made_volume(&s, &mid, &sid);
    c.run("volume-metadata", &[&mid, "set", "role=copy"]);
    assert_eq!(c.run("volume-metadata", &[&mid, "show"])["role"], "copy");
    c.run("delete-volume", &[&mid]);
    assert!(s.d.wait_volume(&mid, &["deleting"]).is_null());
    c.run("delete-snapshot", &[&sid]);
    wait_snapshot_gone(&s, &sid);
}

/// Version discovery needs no token; v3 answers echo the microversion.
#[test]
fn version_discovery_and_microversions() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 4 << 20, 7);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    let get = |path: &str, headers: &[(&str, &str)]| {
        try_http(&d.socket, "GET", path, None, None, headers).unwrap()
    };
    let r = get("/", &[]);
    assert_eq!(r.status, 300, "{}", r.body);
    let v = r.json();
    let versions = v["versions"].as_array().unwrap();
    let id_list: Vec<&str> = versions.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(id_list, ["v1.0", "v2.0", "v3.0"]);
    let max = versions[2]["version"].as_str().unwrap().to_string();
    assert_eq!(versions[2]["min_version"], "3.0");
    assert_eq!(versions[2]["links"][1]["href"], "http://localhost/v3/");
    for (path, id) in [
        ("/v3/", "v3.0"),
        ("/v3", "v3.0"),
        ("/v2/", "v2.0"),
        ("/v2", "v2.0"),
        ("/v1/", "v1.0"),
        ("/v1", "v1.0"),
        (&format!("/v3/{TENANT}") as &str, "v3.0"),
        (&format!("/v3/{TENANT}/") as &str, "v3.0"),
    ] {
        let r = get(path, &[]);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let v = r.json();
        assert_eq!(v["versions"].as_array().unwrap().len(), 1, "{path}: {v}");
        assert_eq!(v["versions"][0]["id"], id, "{path}");
    }
    // v3 answers carry the version asked for, and Vary.
    let path = format!("/v3/{TENANT}/snapshots");
    let r = try_http(
        &d.socket,
        "GET",
        &path,
        Some(TOKEN),
        None,
        &[("OpenStack-API-Version", "volume 3.40")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("OpenStack-API-Version"), Some("volume 3.40"));
    assert!(r
        .header("Vary")
        .is_some_and(|v| v.contains("OpenStack-API-Version")));
    let r = try_http(&d.socket, "GET", &path, Some(TOKEN), None, &[]).unwrap();
    assert_eq!(r.header("OpenStack-API-Version"), Some("volume 3.0"));
    let r = try_http(
        &d.socket,
        "GET",
        &path,
        Some(TOKEN),
        None,
        &[("OpenStack-API-Version", "volume latest")],
    )
    .unwrap();
    assert_eq!(
        r.header("OpenStack-API-Version"),
        Some(format!("volume {max}").as_str())
    );
    let r = try_http(
        &d.socket,
        "GET",
        &path,
        Some(TOKEN),
        None,
        &[("OpenStack-API-Version", "volume 3.99")],
    )
    .unwrap();
    assert_eq!(r.status, 406, "{}", r.body);
    assert_eq!(
        r.error(),
        (
            "computeFault".to_string(),
            format!(
                "Version 3.99 is not supported by the API. Minimum is 3.0 and maximum is {max}."
            )
        )
    );
    // v1 and v2 answers carry no microversion.
    let r = d.call("GET", "/snapshots", None);
    assert_eq!(r.status, 200);
    assert!(r.header("OpenStack-API-Version").is_none());
    let r = try_http(
        &d.socket,
        "GET",
        &format!("/v2/{TENANT}/snapshots"),
        Some(TOKEN),
        None,
        &[("OpenStack-API-Version", "volume 3.40")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("OpenStack-API-Version").is_none());
}
