//! The API under abuse: hostile path parameters, stuck and idle clients, a
//! full connection table, a non-root peer, and 200 clients at once while
//! snapshots run.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

const VOL: &str = "c849a193-5275-4527-9e5a-69b2a05933aa";

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p.clone());
                }
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_path_parameters_never_reach_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 4 << 20, 1);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    let snap = d.snapshot(VOL, "s");
    // A catalog write may be under way: its temporary file is not counted.
    let before: Vec<String> = files_under(&d.state)
        .into_iter()
        .filter(|f| !f.ends_with(".tmp"))
        .collect();
    let long = "x".repeat(5000);
    let attacks = [
        "..",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc",
        "%00",
        "a%00b",
        "%ff%fe%fd",
        "0b1d0a4c0p-z040-0%8000",
        "..%5c..%5cwindows",
        "%2Fetc%2Fpasswd",
        long.as_str(),
        "%0d%0aX-Injected:%201",
        "snapshots",
        "%20",
    ];
    let routes: Vec<(&str, String)> = vec![
        ("GET", "/v1/{t}/snapshots".into()),
        ("GET", "/v1/{t}/volumes/{x}".into()),
        ("PUT", "/v1/{t}/volumes/{x}".into()),
        ("DELETE", "/v1/{t}/volumes/{x}".into()),
        ("POST", "/v1/{t}/volumes/{x}/action".into()),
        ("GET", "/v1/{t}/snapshots/{x}".into()),
        ("PUT", "/v1/{t}/snapshots/{x}".into()),
        ("DELETE", "/v1/{t}/snapshots/{x}".into()),
        ("GET", "/v1/{t}/snapshots/{x}/metadata".into()),
        ("GET", format!("/v1/{{t}}/snapshots/{snap}/metadata/{{x}}")),
        (
            "DELETE",
            format!("/v1/{{t}}/snapshots/{snap}/metadata/{{x}}"),
        ),
        ("PUT", format!("/v1/{{t}}/snapshots/{snap}/metadata/{{x}}")),
    ];
    let body = r#"{"snapshot": {"display_name": "x"}, "volume": {}, "meta": {"k": "v"}, "revert": {"snapshot_id": "x"}}"#;
    let mut tried = 0;
    for (method, route) in &routes {
        for a in &attacks {
            // Every parameter in turn: the tenant, then the id or key.
            for (t, x) in [(*a, "ok"), (TENANT, *a)] {
                if x == *a && !route.contains("{x}") {
                    continue;
                }
                let path = route.replace("{t}", t).replace("{x}", x);
                let r = try_http(&d.socket, method, &path, Some(TOKEN), Some(body), &[])
                    .unwrap_or_else(|e| {
                        panic!(
                            "{method} {}: {e}",
                            path.chars().take(120).collect::<String>()
                        )
                    });
                tried += 1;
                assert!(
                    (400..500).contains(&r.status) && r.status != 401,
                    "{method} {} answered {}: {}",
                    path.chars().take(120).collect::<String>(),
                    r.status,
                    r.body.chars().take(200).collect::<String>()
                );
                assert!(
                    r.header("X-Injected").is_none(),
                    "header injection via {path}"
                );
                // Every error in the reference's format.
                r.error();
            }
        }
    }
    assert!(tried > 250);
    assert_eq!(
        files_under(&d.state)
            .into_iter()
            .filter(|f| !f.ends_with(".tmp"))
            .collect::<Vec<_>>(),
        before,
        "an API call created or removed files"
    );
    assert_eq!(http(&d.socket, "GET", "/healthz", None, None).status, 200);
}

/// Read one response from a raw stream (for connections we hold open).
fn read_response(s: &mut UnixStream) -> Option<Resp> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        if let Some(r) = parse_response(&raw) {
            if r.header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .is_some_and(|l| r.body.len() >= l)
            {
                return Some(r);
            }
        }
    }
    parse_response(&raw)
}

#[test]
fn stuck_and_idle_clients_do_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    // The stalled body holds one of the 40 connections until its 408 (after
    // request_timeout_seconds): long enough for the table to be checked full
    // below even on a loaded machine (2 s was not, under the whole suite,
    // and 6 s failed once beside the 200-client load test; the idle ones
    // end at the 10 s header timeout).
    let d = DaemonProc::start(
        "max_connections = 40\nrequest_timeout_seconds = 9",
        &volume_toml(VOL, &img, ""),
    );
    let started = Instant::now();
    // A client that sends half a request and waits, and one that sends the
    // headers and part of a body.
    let mut half = UnixStream::connect(&d.socket).unwrap();
    half.write_all(b"GET /v1/yourAccountID/snap").unwrap();
    let mut slow_body = UnixStream::connect(&d.socket).unwrap();
    slow_body
        .write_all(format!("POST /v1/{TENANT}/snapshots HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"snap").as_bytes())
        .unwrap();
    // 30 idle connections.
    let idle: Vec<UnixStream> = (0..30)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    // Others are served at once.
    let t0 = Instant::now();
    let r = http(
        &d.socket,
        "GET",
        &format!("/v1/{TENANT}/snapshots"),
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a normal request waited {:?} behind stuck clients",
        t0.elapsed()
    );
    // The connection table is full (40): one more is answered 503 and closed.
    // First let the daemon see that the request above closed its
    // connection: otherwise its slot may still count, one of the extras is
    // refused instead, and the table has room again for the one that should.
    std::thread::sleep(Duration::from_millis(700));
    let extra: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut over = UnixStream::connect(&d.socket).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = read_response(&mut over).unwrap_or_else(|| {
        panic!(
            "no 503 answer {:?} after the start (a connection of the full table may have ended)\n{}",
            started.elapsed(),
            d.log_text()
        )
    });
    assert_eq!(r.status, 503);
    assert_eq!(r.error().0, "serviceUnavailable");
    // The slow body times out with 408 after request_timeout_seconds.
    slow_body
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = read_response(&mut slow_body).expect("an answer to the stalled body");
    assert_eq!(r.status, 408, "{}", r.body);
    // Cinder's Fault names only the codes it lists; 408 (like 422) is
    // computeFault there, and in the reference.
    assert_eq!(r.error().0, "computeFault", "{}", r.body);
    assert!(r.header("x-compute-request-id").is_some(), "{r:?}");
    // Idle and half-sent connections are closed after the header timeout (10 s).
    half.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let n = half.read(&mut buf).unwrap_or(0);
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 408"),
        "half request got {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(
        t0.elapsed() < Duration::from_secs(14),
        "the stuck connection was never closed"
    );
    drop(idle);
    drop(extra);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        http(
            &d.socket,
            "GET",
            &format!("/v1/{TENANT}/volumes"),
            Some(TOKEN),
            None
        )
        .status,
        200
    );
    // Hundreds of idle connections under the default limit do not matter either.
    drop(d);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    let idle: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let t0 = Instant::now();
    assert_eq!(
        http(
            &d.socket,
            "GET",
            &format!("/v1/{TENANT}/snapshots/detail"),
            Some(TOKEN),
            None
        )
        .status,
        200
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a request waited {:?} behind idle connections",
        t0.elapsed()
    );
    drop(idle);
}

/// A user made for the test, removed afterwards.
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn create() -> TestUser {
        let name = format!("bsnap{}", std::process::id() % 100000);
        let out = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .output()
            .expect("useradd");
        assert!(
            out.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uid = nix::unistd::User::from_name(&name)
            .unwrap()
            .unwrap()
            .uid
            .as_raw();
        TestUser { name, uid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .arg(&self.name)
            .output();
    }
}

#[test]
fn a_non_root_peer_is_checked_by_uid_token_and_socket_mode() {
    if !root("a_non_root_peer_is_checked_by_uid_token_and_socket_mode") {
        return;
    }
    let user = TestUser::create();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    use std::os::unix::fs::PermissionsExt;
    // The socket lives in the temp dir; let the user reach it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vols = volume_toml(VOL, &img, "");
    let path = format!("/v1/{TENANT}/snapshots");
    // A daemon whose socket directory the user can reach.
    let start = |extra: &str| {
        let d = DaemonProc::start(extra, &vols);
        for dir in [d.dir.path(), d.socket.parent().unwrap()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        d
    };

    // Allowed uid and a good token: 200; no token: 401; not in allowed_uids: 403.
    let d = start(&format!(
        "socket_mode = \"0666\"\nallowed_uids = [0, {}]",
        user.uid
    ));
    assert_eq!(
        as_user_status(user.uid, &d.socket, &path, Some(TOKEN)),
        Ok(200)
    );
    assert_eq!(as_user_status(user.uid, &d.socket, &path, None), Ok(401));
    assert_eq!(
        as_user_status(user.uid, &d.socket, &path, Some(TOKEN2)),
        Ok(400),
        "another tenant's token"
    );
    drop(d);
    let d = start("socket_mode = \"0666\"\nallowed_uids = [0]");
    assert_eq!(
        as_user_status(user.uid, &d.socket, &path, Some(TOKEN)),
        Ok(403)
    );
    assert_eq!(
        http(&d.socket, "GET", &path, Some(TOKEN), None).status,
        200,
        "root is allowed"
    );
    drop(d);
    // Socket mode 0660 owned by root's group: the user cannot even connect.
    let d = start("socket_mode = \"0660\"");
    assert_eq!(
        as_user_status(user.uid, &d.socket, &path, Some(TOKEN)),
        Err(libc::EACCES)
    );
    // ...unless the socket's group is one of the user's.
    let gname = format!("bsg{}", std::process::id() % 100000);
    assert!(std::process::Command::new("groupadd")
        .args(["--system", &gname])
        .status()
        .unwrap()
        .success());
    struct Group(String);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = std::process::Command::new("groupdel").arg(&self.0).output();
        }
    }
    let _g = Group(gname.clone());
    drop(d);
    let d = start(&format!(
        "socket_mode = \"0660\"\nsocket_group = \"{gname}\""
    ));
    use std::os::unix::fs::MetadataExt;
    let gid = nix::unistd::Group::from_name(&gname)
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().gid(),
        gid,
        "the socket's group"
    );
    assert_eq!(std::fs::metadata(&d.socket).unwrap().mode() & 0o777, 0o660);
    // The user's primary group is its own; as a member of nothing it still cannot connect.
    assert_eq!(
        as_user_status(user.uid, &d.socket, &path, Some(TOKEN)),
        Err(libc::EACCES)
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn two_hundred_clients_while_snapshots_run() {
    let seconds: u64 = std::env::var("BLOCKSNAP_LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    make_image(&a, 192 << 20, 1);
    make_image(&b, 192 << 20, 2);
    let vols = format!(
        "{}{}",
        volume_toml("vol-a", &a, ""),
        volume_toml("vol-b", &b, "")
    );
    let d = DaemonProc::start_with_env("", &vols, &[("BLOCKSNAP_LOG", "info")]);
    let first = d.snapshot("vol-a", "seed");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Snapshots keep running on both volumes for the whole test.
    let snapper = {
        let stop = stop.clone();
        let socket = d.socket.clone();
        std::thread::spawn(move || {
            let mut done = 0;
            let mut older: Vec<String> = Vec::new();
            let mut rng = Rng::new(5);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut ids = Vec::new();
                for (v, img) in [("vol-a", &a), ("vol-b", &b)] {
                    for _ in 0..200 {
                        write_at(
                            img,
                            rng.below(49152) * 4096,
                            &random_bytes(rng.next(), 4096),
                        );
                    }
                    let r = http(
                        &socket,
                        "POST",
                        &format!("/v1/{TENANT}/snapshots"),
                        Some(TOKEN),
                        Some(&format!(r#"{{"snapshot": {{"volume_id": "{v}"}}}}"#)),
                    );
                    assert_eq!(r.status, 200, "{}", r.body);
                    ids.push(r.json()["snapshot"]["id"].as_str().unwrap().to_string());
                }
                for id in &ids {
                    loop {
                        let r = http(
                            &socket,
                            "GET",
                            &format!("/v1/{TENANT}/snapshots/{id}"),
                            Some(TOKEN),
                            None,
                        );
                        let st = r.json()["snapshot"]["status"].as_str().unwrap().to_string();
                        if st != "creating" {
                            assert_eq!(st, "available", "{}", r.body);
                            done += 1;
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                // Keep about ten snapshots per volume, as a retention policy would.
                older.extend(ids);
                while older.len() > 20 {
                    let id = older.remove(0);
                    let r = http(
                        &socket,
                        "DELETE",
                        &format!("/v1/{TENANT}/snapshots/{id}"),
                        Some(TOKEN),
                        None,
                    );
                    assert_eq!(r.status, 202, "{}", r.body);
                    // One operation per volume: wait for the delete to end.
                    while http(
                        &socket,
                        "GET",
                        &format!("/v1/{TENANT}/snapshots/{id}"),
                        Some(TOKEN),
                        None,
                    )
                    .status
                        != 404
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            done
        })
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let socket = d.socket.clone();
            let first = first.clone();
            std::thread::spawn(move || {
                let paths = [
                    format!("/v1/{TENANT}/snapshots"),
                    format!("/v1/{TENANT}/snapshots/{first}"),
                    format!("/v1/{TENANT}/snapshots/detail"),
                    format!("/v1/{TENANT}/volumes/detail"),
                ];
                let mut lat = Vec::new();
                let mut errors = Vec::new();
                let mut k = i;
                while Instant::now() < deadline {
                    let p = &paths[k % paths.len()];
                    k += 1;
                    let t0 = Instant::now();
                    match try_http(&socket, "GET", p, Some(TOKEN), None, &[]) {
                        Ok(r) if r.status == 200 => lat.push(t0.elapsed()),
                        Ok(r) => errors.push(format!("{p}: {} {}", r.status, r.body)),
                        Err(e) => errors.push(format!("{p}: {e}")),
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for c in clients {
        let (l, e) = c.join().unwrap();
        lat.extend(l);
        errors.extend(e);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let snapshots = snapper.join().unwrap();
    lat.sort();
    eprintln!(
        "load: {} requests from 200 clients in {seconds} s ({:.0}/s), {} errors; latency p50 {:?}, p99 {:?}, max {:?}; {snapshots} snapshots finished meanwhile",
        lat.len(),
        lat.len() as f64 / seconds as f64,
        errors.len(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        snapshots >= 2,
        "the snapshots did not finish during the load"
    );
}

/// Send raw bytes on a new connection and read the answer.
fn raw_exchange(socket: &std::path::Path, raw: &[u8]) -> Option<Resp> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The daemon may answer and close before everything is sent.
    let _ = s.write_all(raw);
    read_response(&mut s)
}

#[test]
fn requests_the_http_layer_refuses_get_json_error_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    let d = DaemonProc::start("", &volume_toml(VOL, &img, ""));
    let head =
        format!("GET /v1/{TENANT}/snapshots HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n");
    let mut many = head.clone();
    for i in 0..200 {
        many.push_str(&format!("X-Filler-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let big = format!("{head}X-Big: {}\r\n\r\n", "a".repeat(80 << 10));
    let long_uri = format!(
        "GET /v1/{TENANT}/snapshots?x={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(80 << 10)
    );
    // Names as Cinder's Fault gives them: 400 badRequest, any code it does
    // not list (431) computeFault.
    let cases: [(&str, &[u8], u16, &str); 6] = [
        ("200 headers", many.as_bytes(), 431, "computeFault"),
        ("an 80 KiB header", big.as_bytes(), 431, "computeFault"),
        ("an 80 KiB URI", long_uri.as_bytes(), 431, "computeFault"),
        (
            "a garbage request line",
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
            400,
            "badRequest",
        ),
        (
            "no HTTP version",
            b"GET /healthz\r\n\r\n",
            400,
            "badRequest",
        ),
        (
            "a header without a colon",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nnot a header\r\n\r\n",
            400,
            "badRequest",
        ),
    ];
    for (what, raw, code, name) in cases {
        let r = raw_exchange(&d.socket, raw).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(r.status, code, "{what}: {r:?}");
        assert_eq!(r.error().0, name, "{what}: {}", r.body);
        assert!(!r.error().1.is_empty(), "{what}: no message");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{what}: {r:?}"
        );
        assert!(
            r.header("x-compute-request-id").is_some(),
            "{what}: no request id: {r:?}"
        );
    }
    // Answers the router makes are left alone, and the daemon still serves.
    let r = http(
        &d.socket,
        "POST",
        &format!("/v1/{TENANT}/snapshots"),
        Some(TOKEN),
        Some("{not json"),
    );
    assert_eq!((r.status, r.error().0.as_str()), (400, "badRequest"));
    assert_eq!(http(&d.socket, "GET", "/healthz", None, None).status, 200);
}

/// Answers waiting on `conns` after a moment: 503 bodies counted, and the
/// connections that got nothing (still held by the daemon).
fn answers(conns: &mut [UnixStream], wait: Duration) -> (usize, usize) {
    std::thread::sleep(wait);
    let (mut refused, mut held) = (0, 0);
    for c in conns.iter_mut() {
        c.set_nonblocking(true).unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        if raw.is_empty() {
            held += 1;
            continue;
        }
        let r = parse_response(&raw)
            .unwrap_or_else(|| panic!("not HTTP: {:?}", String::from_utf8_lossy(&raw)));
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.error().0, "serviceUnavailable");
        refused += 1;
    }
    (refused, held)
}

#[test]
fn a_low_open_file_limit_caps_connections_and_the_work_still_has_room() {
    if !root("a_low_open_file_limit_caps_connections_and_the_work_still_has_room") {
        return;
    }
    let lp = Loop::new(32 << 20);
    mkfs("ext4", &lp.dev);
    let _m = Mounted::new(&lp.dev, "ext4", "");
    let hit = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&hit).unwrap();
    let limit: u64 = 256;
    let mut d = DaemonProc::configure(
        "max_made_volumes = 2",
        &volume_toml(VOL, &lp.dev, ""),
        &[
            ("BLOCKSNAP_LOG", "info"),
            ("BLOCKSNAP_FAULT_POINT", "before-freeze"),
            ("BLOCKSNAP_FAULT_ACTION", "delay:3000"),
            ("BLOCKSNAP_FAULT_SIGNAL_FILE", hit.to_str().unwrap()),
        ],
    );
    d.nofile = Some(limit);
    d.spawn();
    // 64 for the daemon and 8 for each of 1 + 2 volumes' operations.
    let cap = 256 - 64 - 8 * 3;
    // A snapshot accepted first, held just before its freeze while the
    // connections pile up; it needs files (mount table, device, chain) after.
    let r = d.call(
        "POST",
        "/snapshots",
        Some(&format!(r#"{{"snapshot": {{"volume_id": "{VOL}"}}}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["snapshot"]["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    while !hit.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no fault hit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 1.1 x the limit: the first `cap` are held, the rest answered 503 at once.
    let total = (limit * 11 / 10) as usize;
    let t0 = Instant::now();
    let mut conns: Vec<UnixStream> = (0..total)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let (refused, held) = answers(&mut conns, Duration::from_millis(1500));
    assert!(
        held <= cap && refused >= total - cap,
        "{refused} refused, {held} held of {total}; at most {cap} may be held\n{}",
        d.log_text()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the 503 answers took {:?}",
        t0.elapsed()
    );
    // The snapshot runs while the connections are held, and succeeds.
    let t0 = Instant::now();
    let ended = |log: &str| {
        log.contains(&format!("volume {VOL}, snapshot {id},"))
            || log.contains(&format!("volume {VOL}, snapshot {id}:"))
    };
    while !ended(&d.log_text()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.log_text()
            .contains(&format!("snapshot available: volume {VOL}, snapshot {id},")),
        "{}",
        d.log_text()
    );
    // Once the daemon has seen them go, the table has room again.
    drop(conns);
    let t0 = Instant::now();
    while d.try_call("GET", "/snapshots").map(|r| r.status) != Some(200) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no room after the connections closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.wait_snapshot(&id)["status"], "available");
    assert!(
        !d.log_text().contains("Too many open files"),
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains(&format!(
            "open files: limit {limit} leaves room for {cap} connection(s)"
        )),
        "{}",
        d.log_text()
    );
}

#[test]
fn when_descriptors_run_out_waiting_clients_get_503_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    let d = DaemonProc::start_with_env(
        "",
        &volume_toml(VOL, &img, ""),
        &[("BLOCKSNAP_LOG", "info")],
    );
    let pid = d.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    // Lower the running daemon's limit to a few more than it has open, as
    // if something else had used the room the connection cap left.
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    let hard = own.rlim_max;
    let set = |n: u64| {
        let r = libc::rlimit {
            rlim_cur: n.min(hard),
            rlim_max: hard,
        };
        // SAFETY: prlimit reads the struct we pass and writes nothing.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &r, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    set(open + 6);
    let t0 = Instant::now();
    let mut conns: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let (refused, held) = answers(&mut conns, Duration::from_millis(1500));
    assert!(
        refused >= 30,
        "{refused} refused, {held} held: clients wait instead of getting 503\n{}",
        d.log_text()
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    let warnings = d.log_text().matches("accept failed").count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} accept warnings for one burst\n{}",
        d.log_text()
    );
    drop(conns);
    set(hard);
    std::thread::sleep(Duration::from_millis(100));
    let r = d.call("GET", "/snapshots", None);
    assert_eq!(r.status, 200, "{}", r.body);
}
