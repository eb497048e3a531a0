//! The systemd integration: unit files, sd_notify readiness and watchdog,
//! and socket activation.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The units with their binaries pointed at this build.
fn units(dir: &Path) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let service = dir.join("blocksnapd.service");
    let socket = dir.join("blocksnapd.socket");
    let text = std::fs::read_to_string(root.join("blocksnapd.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/blocksnapd",
            bin("blocksnapd").to_str().unwrap(),
        )
        .replace(
            "/usr/local/bin/blocksnap ",
            &format!("{} ", bin("blocksnap").display()),
        );
    std::fs::write(&service, text).unwrap();
    std::fs::copy(root.join("blocksnapd.socket"), &socket).unwrap();
    (service, socket)
}

#[test]
fn the_units_pass_systemd_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let (service, socket) = units(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&service)
        .arg(&socket)
        .output()
        .expect("systemd-analyze runs (.ci/run installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&service).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "TimeoutAbortSec=",
        "LimitNOFILE=65536",
        "Restart=on-failure",
        "ExecStopPost=",
        "thaw --all",
        "ProtectSystem=strict",
        "StateDirectory=blocksnap",
        "RuntimeDirectory=blocksnap",
        "DeviceAllow=block-* rw",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK",
        "IPAddressDeny=any",
        "SystemCallArchitectures=native",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "RestrictRealtime=yes",
    ] {
        assert!(text.contains(needed), "the service lacks {needed}");
    }
    assert!(
        !text.contains("PrivateDevices=yes"),
        "PrivateDevices hides the disks"
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&service)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&security.stdout);
    let score: f64 = s
        .lines()
        .find_map(|l| l.split("exposure level for blocksnapd.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {s}"));
    assert!(score <= 3.0, "exposure level {score} (README quotes 2.5)");
}

fn config(dir: &Path, socket: &Path, img: &Path) -> PathBuf {
    let cfg = dir.join("blocksnap.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\n[[tokens]]\ntenant = \"{TENANT}\"\ntoken = \"{TOKEN}\"\n{}",
            socket.display(),
            dir.join("state").display(),
            volume_toml("vol", img, "")
        ),
    )
    .unwrap();
    cfg
}

/// Kills a child on drop.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ready_is_sent_only_once_the_socket_answers_and_the_watchdog_is_fed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    let socket = dir.path().join("api.sock");
    let cfg = config(dir.path(), &socket, &img);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: exec keeps the shell's.
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" --config "$1""#)
        .arg(bin("blocksnapd"))
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    // STATUS= lines come whenever the status changes, READY=1's own included.
    let mut status = false;
    // Until READY=1: nothing before it may claim readiness; right when it
    // arrives, the socket must answer.
    loop {
        let n = notify.recv(&mut buf).expect("no READY=1 within 30 s");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        status |= msg.lines().any(|l| l.starts_with("STATUS="));
        if msg.lines().any(|l| l == "READY=1") {
            let r = http(&socket, "GET", "/healthz", None, None);
            assert_eq!(r.status, 200, "READY=1 was sent before the socket answered");
            break;
        }
        seen.push(msg);
    }
    // The watchdog (every WATCHDOG_USEC/2) and STATUS= lines follow.
    let start = Instant::now();
    let mut watchdogs = 0;
    while start.elapsed() < Duration::from_secs(3) && (watchdogs < 3 || !status) {
        let n = notify.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        watchdogs += msg.lines().filter(|l| *l == "WATCHDOG=1").count();
        status |= msg.lines().any(|l| l.starts_with("STATUS="));
    }
    assert!(
        watchdogs >= 3,
        "only {watchdogs} WATCHDOG=1 in 3 s with a 200 ms watchdog"
    );
    assert!(status, "no STATUS= line");
    // SIGTERM: STOPPING=1, exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut stopping = false;
    while let Ok(n) = notify.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 on SIGTERM");
    assert!(child.0.wait().unwrap().success());
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    make_image(&img, 1 << 20, 1);
    let configured = dir.path().join("configured.sock");
    let passed = dir.path().join("passed.sock");
    let cfg = config(dir.path(), &configured, &img);
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&passed)
        .arg(bin("blocksnapd"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate runs (.ci/run installs systemd)");
    let _child = Child(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !passed.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which answers on it.
    let r = http(
        &passed,
        "GET",
        &format!("/v1/{TENANT}/volumes"),
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["volumes"][0]["id"], "vol");
    assert!(
        !configured.exists(),
        "the daemon bound its own socket instead of using the passed one"
    );
}
