//! Support for the backup tests: a real S3 server (moto, started per test on
//! an ephemeral loopback port and stopped on every path), a fault-injecting
//! HTTP proxy between blocksnap and it, and remote configuration files.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BUCKET: &str = "blocksnap-test";
/// Test credentials, distinctive so a leak into output is found.
pub const ACCESS_KEY: &str = "AKIABLOCKSNAPTEST42";
pub const SECRET_KEY: &str = "sEcReT-blocksnap-test-4242";

/// The Python of the virtualenv scripts/install-deps.sh makes.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BLOCKSNAP_S3_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-s3/bin/python");
    p.exists().then_some(p)
}

/// Whether the S3 server can run here; if not, say why (and fail in CI).
pub fn have_server(test: &str) -> bool {
    if python().is_some() {
        return true;
    }
    if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test} needs the S3 test server: run scripts/install-deps.sh (it makes .venv-s3 with moto)");
    }
    eprintln!("SKIPPED {test}: no S3 test server; run scripts/install-deps.sh (it makes .venv-s3 with moto)");
    false
}

/// A moto S3 server with bucket [`BUCKET`]; killed on drop. It also exits
/// by itself when this process ends (its stdin closes).
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    pub fn start() -> S3Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3server.py");
        let mut child = Command::new(python().expect("have_server() first"))
            .arg(script)
            .arg(BUCKET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the S3 test server");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut server = S3Server { child, port: 0 };
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("the S3 test server exited before it served");
            }
            if let Some(p) = line.trim().strip_prefix("PORT ") {
                server.port = p.parse().unwrap();
                break;
            }
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Entry {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub status: u16,
    pub body_len: u64,
    /// Answered by the proxy with an injected fault.
    pub injected: bool,
    /// Held longer than the client waits.
    pub slowed: bool,
}

impl Entry {
    /// The object (or part) a successful upload wrote: path, plus the part
    /// number for a part upload.
    pub fn upload_id(&self) -> Option<String> {
        if self.method != "PUT" || self.status != 200 || self.injected {
            return None;
        }
        let (path, query) = self.target.split_once('?').unwrap_or((&self.target, ""));
        let part = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("partNumber="))
            .map(|n| format!("#part{n}"))
            .unwrap_or_default();
        Some(format!("{path}{part}"))
    }
}

/// What to do to requests.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer every Nth request (counting from 1) with an error status...
    pub fail_every: Option<u64>,
    /// ...alternating through these statuses.
    pub statuses: Vec<u16>,
    /// Hold every Mth request whose method and path contain `slow_match`
    /// this long before forwarding it.
    pub slow_every: Option<u64>,
    pub slow_match: (String, String),
    pub slow_for: Duration,
    /// Answer every request with 503.
    pub fail_all: bool,
}

#[derive(Default)]
struct State {
    log: Mutex<Vec<Entry>>,
    faults: Mutex<Faults>,
    count: Mutex<u64>,
    slow_count: Mutex<u64>,
}

/// A fault-injecting HTTP/1.1 proxy in front of the S3 server.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        let sp = sp.clone();
                        std::thread::spawn(move || serve(conn, upstream, &st, &sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, state, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    pub fn log(&self) -> Vec<Entry> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, upstream: u16, st: &State, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    while !stop.load(Ordering::Relaxed) {
        // The request head.
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or("");
        let mut parts = first.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut len = 0u64;
        let mut rest_head = String::new();
        for l in lines {
            if l.is_empty() {
                continue;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            assert!(
                !lower.starts_with("transfer-encoding"),
                "the proxy takes only Content-Length bodies: {l}"
            );
            if lower.starts_with("connection:") {
                continue;
            }
            rest_head.push_str(l);
            rest_head.push_str("\r\n");
        }
        let mut body = vec![0u8; len as usize];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (fail, slow) = {
            let mut c = st.count.lock().unwrap();
            *c += 1;
            let n = *c;
            let f = st.faults.lock().unwrap();
            let fail = if f.fail_all {
                Some(503)
            } else {
                f.fail_every.filter(|e| n % e == 0).map(|e| {
                    let s = &f.statuses;
                    if s.is_empty() {
                        500
                    } else {
                        s[((n / e) as usize) % s.len()]
                    }
                })
            };
            let slow = f.slow_every.filter(|e| n % e == 0).map(|_| f.slow_for);
            (fail, slow)
        };
        let entry = |status: u16, injected: bool| Entry {
            method: method.clone(),
            target: target.clone(),
            status,
            body_len: len,
            injected,
            slowed: slow.is_some(),
        };
        if let Some(status) = fail {
            let msg = "<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>injected fault</Message></Error>";
            let resp = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{msg}",
                msg.len()
            );
            st.log.lock().unwrap().push(entry(status, true));
            if conn.write_all(resp.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        if let Some(d) = slow {
            std::thread::sleep(d);
        }
        let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
            return;
        };
        let fwd = format!("{first}\r\n{rest_head}Connection: close\r\n\r\n");
        if up.write_all(fwd.as_bytes()).is_err() || up.write_all(&body).is_err() {
            return;
        }
        let mut resp = Vec::new();
        if up.read_to_end(&mut resp).is_err() {
            return;
        }
        let status: u16 = String::from_utf8_lossy(&resp[..resp.len().min(64)])
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // The client may have given up (a timeout): then nothing was answered.
        if conn.write_all(&resp).is_err() {
            st.log.lock().unwrap().push(entry(0, false));
            return;
        }
        st.log.lock().unwrap().push(entry(status, false));
        // Upstream closes after each answer; so do we, to keep framing simple.
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
}

/// Files that configure a remote: credentials, optional key, remotes file.
pub struct RemoteFiles {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub key: Option<PathBuf>,
}

/// Write a remotes file for remote "s3" at `endpoint`, with extra keys.
pub fn remote_files(endpoint: &str, key: Option<&[u8; 32]>, extra: &str) -> RemoteFiles {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.toml");
    std::fs::write(
        &creds,
        format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key_path = key.map(|k| {
        let p = dir.path().join("backup.key");
        std::fs::write(&p, k).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    });
    let key_line = key_path
        .as_ref()
        .map(|p| format!("key_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let config = dir.path().join("remotes.toml");
    std::fs::write(
        &config,
        format!(
            "[[remotes]]\nname = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{BUCKET}\"\nprefix = \"site-a\"\ncredentials_file = \"{}\"\n{key_line}{extra}",
            creds.display()
        ),
    )
    .unwrap();
    RemoteFiles {
        dir,
        config,
        key: key_path,
    }
}
