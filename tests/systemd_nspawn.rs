//! The units under a real systemd: this machine's own systemd booted in a
//! container with systemd-nspawn, the unit files installed exactly as the
//! README says (copied verbatim, enabled with `systemctl enable`), and a
//! oneshot probe unit that checks them and powers the container off.
//!
//! The probe checks socket activation, Type=notify readiness, the seed's curl
//! call through the socket on a mounted ext4 filesystem (the freeze path,
//! with the unit's DevicePolicy=closed and DeviceAllow= in force), a restart
//! after SIGKILL with the filesystem frozen (ExecStopPost thaws it), the
//! watchdog restarting a daemon that stops feeding it, a stop while a
//! snapshot holds the filesystem frozen, and the journal lines.
//!
//! How the container is made (each point was needed on this kind of VM):
//! - `/usr` is bound read-only from the host, `/etc` is a minimal copy with
//!   os-release, and this build's binaries are bound onto `/usr/local/bin`,
//!   where the units expect them.
//! - The loop device node is bound in and its filesystem, mounted on the
//!   host, is bound to `/mnt/vol`: the daemon sees a mounted ext4 and
//!   freezes it; the test checks from the host that it ends up thawed.
//! - `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`: on a host with the hybrid cgroup
//!   layout the container would get cgroup v1, whose device controller is
//!   not delegated, and DevicePolicy= would silently do nothing. With the
//!   unified hierarchy systemd enforces it with a BPF device program, which
//!   needs `--system-call-filter=bpf` (nspawn blocks bpf() by default).
//! - nspawn runs in a cgroup of its own, so parallel runs do not share
//!   nspawn's `payload` cgroup, and a run that hangs can be killed whole.
//! - `--register=no --keep-unit`: no machined, no host systemd needed.

mod common;

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whole-run limit: boot, every check and the power-off take about 30 s.
const DEADLINE: Duration = Duration::from_secs(180);

/// The checks, run inside the container by probe.service. `@...@` are
/// filled in by the test. Everything it prints goes to /probe/probe.log; its
/// verdict, `PASS` or `FAIL: why`, to /probe/result.
const PROBE: &str = r##"#!/bin/bash
set -u
S=/run/blocksnap/blocksnap.sock
T='@TOKEN@'
U='http://localhost/v1/@TENANT@'
DEV='@DEV@'
MNT=/mnt/vol
SVC=blocksnapd.service
HIT=/run/blocksnap/fault-hit
CFG=/etc/blocksnap/blocksnap.toml

fail() {
    echo "FAIL: $*"
    echo "FAIL: $*" > /probe/result
    exit 1
}
step() { echo; echo "== $(date +%T.%N | cut -c1-12) $*"; }
prop() { systemctl show -P "$1" "$SVC"; }
# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.1 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local n=$((secs * 10))
    while ((n-- > 0)); do
        "$@" && return 0
        sleep 0.1
    done
    fail "$what (waited ${secs} s)"
}
# Whether $MNT is frozen: freezing a frozen filesystem answers EBUSY.
frozen() {
    local err
    if err=$(fsfreeze --freeze "$MNT" 2>&1); then
        fsfreeze --unfreeze "$MNT"
        return 1
    fi
    case "$err" in *"Device or resource busy"*) return 0 ;; esac
    fail "the freeze probe of $MNT failed: $err"
}
thawed() { ! frozen; }
api() { curl -sS --max-time 30 --unix-socket "$S" -H "X-Auth-Token: $T" "$@"; }
# field NAME: the value of the first "NAME": ... in the JSON on stdin.
field() { grep -o "\"$1\": *[^,}]*" | head -n1 | sed 's/^"[^"]*": *//; s/^"//; s/"$//'; }
status_of() { api "$U/snapshots/$1" | field status; }
snapshot_settled() { local s; s=$(status_of "$1"); [ "$s" != creating ] && [ "$s" != deleting ]; }
create_snapshot() {
    api -X POST -H 'Content-Type: application/json' \
        -d "{\"snapshot\": {\"display_name\": \"$1\", \"volume_id\": \"vol\"}}" "$U/snapshots" | field id
}
active() { [ "$(prop ActiveState)" = active ]; }
restarted_after() { [ "$(prop NRestarts)" -gt "$1" ] && active; }
journal() { journalctl -u "$SVC" -o cat --no-pager; }
# Restart the daemon (the start limit reset: the test restarts it often).
restart() {
    systemctl reset-failed "$SVC"
    systemctl restart "$SVC" || fail "systemctl restart $SVC failed"
}
# Restart the daemon with a fault point armed for this start only.
restart_with_fault() {
    rm -f "$HIT"
    systemctl set-environment BLOCKSNAP_FAULT_SIGNAL_FILE="$HIT" "$@"
    restart
    systemctl unset-environment BLOCKSNAP_FAULT_POINT BLOCKSNAP_FAULT_ACTION BLOCKSNAP_FAULT_SIGNAL_FILE
}

step "the config passes --check-config (README)"
blocksnapd --config "$CFG" --check-config || fail "blocksnapd --check-config failed"

step "boot: the enabled socket and service are up, Type=notify readiness"
wait_for 30 "blocksnapd.service active after boot" active
[ "$(systemctl show -P ActiveState blocksnapd.socket)" = active ] || fail "blocksnapd.socket is not active"
[ "$(prop Type)" = notify ] || fail "Type is $(prop Type)"
# With Type=notify the unit is active only once READY=1 came; STATUS= too.
case "$(prop StatusText)" in serving*) ;; *) fail "StatusText is '$(prop StatusText)'" ;; esac
[ "$(stat -c '%a %G' "$S")" = "660 blocksnap" ] || fail "socket is $(stat -c '%a %G' "$S")"
pid=$(prop MainPID)
limits=$(grep 'Max open files' "/proc/$pid/limits")
echo "$limits"
[ "$(prop LimitNOFILE)" = 65536 ] || fail "LimitNOFILE is $(prop LimitNOFILE)"
read -r soft hard <<<"$(echo "$limits" | awk '{print $4, $5}')"
[ "$soft" = "$hard" ] || fail "the daemon did not raise its soft open-file limit: $limits"
journal | grep -q "open files: limit $soft" || fail "no log line with the open-file limit"

step "socket activation: the service stopped, the socket starts it on a connection"
systemctl stop "$SVC" || fail "systemctl stop"
[ "$(prop ActiveState)" = inactive ] || fail "service still $(prop ActiveState) after stop"
[ "$(systemctl show -P SubState blocksnapd.socket)" = listening ] || fail "the socket is not listening"
[ "$(curl -sS --max-time 30 --unix-socket "$S" http://localhost/healthz)" = ok ] || fail "healthz through the socket"
active || fail "the connection did not start the service"
journal | grep -q "using the socket passed by systemd" || fail "the daemon did not use the passed socket"

step "the seed's curl call: a snapshot of the mounted ext4 through the socket"
echo "some data" > "$MNT/file" && sync
out=$(curl -sS -i --max-time 30 --unix-socket "$S" -X POST -d \
   '{"snapshot": {"display_name": "snap-001", "display_description": "Daily Backup",
     "volume_id": "vol"}}' \
   -H "X-Auth-Token: $T" -H "Content-Type: application/json" "$U/snapshots")
echo "$out"
case "$(echo "$out" | head -n1)" in "HTTP/1.1 200"*) ;; *) fail "seed call answered: $out" ;; esac
id=$(echo "$out" | field id)
[ -n "$id" ] || fail "no snapshot id in: $out"
wait_for 60 "snapshot $id to settle" snapshot_settled "$id"
detail=$(api "$U/snapshots/detail")
echo "$detail"
[ "$(status_of "$id")" = available ] || fail "snapshot $id: $(api "$U/snapshots/$id")"
freeze_ms=$(echo "$detail" | field 'blocksnap:freeze_ms')
awk "BEGIN { exit !($freeze_ms > 0) }" || fail "snapshot $id did not freeze (freeze_ms $freeze_ms)"
thawed || fail "$MNT left frozen after a snapshot"
line=$(journal | grep "snapshot available: volume vol, snapshot $id,")
echo "$line"
echo "$line" | grep -Eq "changed [0-9]+ B .*stored [0-9]+ B .*freeze window [0-9.]+ ms .*duration [0-9.]+ s" \
    || fail "the snapshot's journal line lacks its numbers: '$line'"
if journal | grep -q $'\e'; then fail "ANSI escape codes in the journal"; fi

step "DevicePolicy=closed and DeviceAllow= are in force in the service's cgroup"
# A character device DeviceAllow= does not list; opening it works here, in
# the probe's own cgroup, so a refusal below is the policy's.
[ -c /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; } || fail "no /dev/net/tun"
(exec 3</dev/net/tun) || fail "/dev/net/tun cannot be opened even outside the service"
cg=/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' "/proc/$(prop MainPID)/cgroup")
sh -c "echo \$\$ > $cg/cgroup.procs
       if (exec 3</dev/net/tun) 2>/dev/null; then echo tun-opened; else echo tun-refused; fi
       if (exec 3<$DEV); then echo loop-opened; else echo loop-refused; fi" > /run/devices.txt 2>&1
cat /run/devices.txt
grep -q tun-refused /run/devices.txt || fail "a device DeviceAllow= does not list was opened: DevicePolicy is not in force"
grep -q loop-opened /run/devices.txt || fail "the block device was refused in the service's cgroup"

step "SIGKILL while the filesystem is frozen: ExecStopPost thaws, Restart= restarts"
restart_with_fault BLOCKSNAP_FAULT_POINT=after-freeze
id2=$(create_snapshot killed)
wait_for 30 "the daemon to reach after-freeze" test -e "$HIT"
frozen || fail "$MNT not frozen at the after-freeze fault point"
n=$(prop NRestarts)
pid=$(prop MainPID)
kill -KILL "$pid"
wait_for 30 "a restart after SIGKILL" restarted_after "$n"
[ "$(prop MainPID)" != "$pid" ] || fail "same main pid after the restart"
thawed || fail "$MNT still frozen after SIGKILL and the restart"
journal | grep -q "thawed $MNT (left frozen by a dead blocksnap)" || fail "ExecStopPost did not thaw $MNT"
[ "$(status_of "$id2")" = error ] || fail "the killed snapshot is $(status_of "$id2")"
id3=$(create_snapshot after-kill)
wait_for 60 "snapshot $id3 to settle" snapshot_settled "$id3"
[ "$(status_of "$id3")" = available ] || fail "a snapshot after the restart: $(api "$U/snapshots/$id3")"

step "the watchdog restarts a daemon that stops feeding it"
mkdir -p /run/systemd/system/$SVC.d
# No core dump of the aborted daemon on the host running the test.
printf '[Service]\nWatchdogSec=3s\nLimitCORE=0\n' > /run/systemd/system/$SVC.d/probe-watchdog.conf
systemctl daemon-reload
restart
n=$(prop NRestarts)
pid=$(prop MainPID)
kill -STOP "$pid"
wait_for 60 "a restart after the watchdog fired" restarted_after "$n"
journal | grep -q "Watchdog timeout" || fail "no watchdog timeout in the journal"
rm -r /run/systemd/system/$SVC.d
systemctl daemon-reload
[ "$(curl -sS --max-time 30 --unix-socket "$S" http://localhost/healthz)" = ok ] || fail "healthz after the watchdog restart"

step "systemctl stop while a snapshot holds the filesystem frozen"
restart_with_fault BLOCKSNAP_FAULT_POINT=after-freeze BLOCKSNAP_FAULT_ACTION=delay:3000
id4=$(create_snapshot stopped)
wait_for 30 "the daemon to reach after-freeze" test -e "$HIT"
frozen || fail "$MNT not frozen at the after-freeze fault point"
timeout 120 systemctl stop "$SVC" || fail "systemctl stop failed or hung"
[ "$(prop ActiveState)" = inactive ] || fail "service $(prop ActiveState) after stop"
thawed || fail "$MNT still frozen after systemctl stop"
restart
[ "$(status_of "$id4")" = error ] || fail "the stopped snapshot is $(status_of "$id4")"
api "$U/snapshots/$id4" | grep -q "abandoned: blocksnapd is shutting down" \
    || fail "the stopped snapshot does not say why: $(api "$U/snapshots/$id4")"

step "journal"
journal
echo PASS > /probe/result
"##;

/// The probe's unit: runs the checks, then powers the container off.
const PROBE_UNIT: &str = "[Unit]
Description=blocksnap test probe
After=multi-user.target blocksnapd.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/bash /probe/probe.sh
StandardOutput=append:/probe/probe.log
StandardError=inherit
TimeoutStartSec=150

[Install]
WantedBy=multi-user.target
";

/// A cgroup of the running hierarchies (v2 and, on a hybrid host, the v1
/// name=systemd one) for nspawn, so that everything in the container can be
/// found and killed.
struct Cgroups {
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    fn new(name: &str) -> Cgroups {
        let mut dirs = Vec::new();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctl), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let root = match (id, ctl) {
                ("0", "") if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
                    PathBuf::from("/sys/fs/cgroup")
                }
                ("0", "") => PathBuf::from("/sys/fs/cgroup/unified"),
                (_, "name=systemd") => PathBuf::from("/sys/fs/cgroup/systemd"),
                _ => continue,
            };
            let dir = root.join(path.trim_start_matches('/')).join(name);
            if std::fs::create_dir(&dir).is_ok() {
                dirs.push(dir);
            }
        }
        Cgroups { dirs }
    }

    /// `cgroup.procs` paths for a pre_exec hook to write to.
    fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap()
            })
            .collect()
    }

    /// Kill everything in them.
    fn kill(&self) {
        for d in &self.dirs {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            for entry in walkdir(d) {
                if let Ok(procs) = std::fs::read_to_string(entry.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.kill();
        for d in &self.dirs {
            // Deepest first; a cgroup goes once its processes are reaped.
            for _ in 0..50 {
                let mut all = walkdir(d);
                all.reverse();
                for c in &all {
                    let _ = std::fs::remove_dir(c);
                }
                if !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A directory and every directory below it, parents first.
fn walkdir(d: &Path) -> Vec<PathBuf> {
    let mut out = vec![d.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// The booted container: killed (with everything in its cgroup) on drop.
struct Container {
    child: Option<std::process::Child>,
    cgroups: Cgroups,
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                self.cgroups.kill();
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A root directory for the container: /usr comes from the host at boot.
fn make_root(root: &Path, dev: &Path) {
    for d in [
        "etc/systemd/system",
        "etc/blocksnap",
        "usr",
        "var/log/journal",
        "var/lib",
        "var/tmp",
        "tmp",
        "mnt/vol",
        "probe",
        "dev",
        "proc",
        "sys",
        "run",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // Merged /usr: the top-level links the host has.
    for l in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if let Ok(target) = std::fs::read_link(Path::new("/").join(l)) {
            std::os::unix::fs::symlink(target, root.join(l)).unwrap();
        }
    }
    std::fs::copy("/usr/lib/os-release", root.join("etc/os-release")).unwrap();
    for f in [
        "passwd",
        "group",
        "shadow",
        "gshadow",
        "nsswitch.conf",
        "login.defs",
    ] {
        let _ = std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f));
    }
    std::fs::write(root.join("etc/machine-id"), "").unwrap();
    // Debian's awk, editor, ... are links through /etc/alternatives.
    std::fs::create_dir_all(root.join("etc/alternatives")).unwrap();
    if let Ok(rd) = std::fs::read_dir("/etc/alternatives") {
        for e in rd.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let _ = std::os::unix::fs::symlink(
                    target,
                    root.join("etc/alternatives").join(e.file_name()),
                );
            }
        }
    }
    // The README's install steps, against this root.
    run_ok(
        Command::new("groupadd")
            .arg("--root")
            .arg(root)
            .args(["--system", "blocksnap"]),
    );
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let system = root.join("etc/systemd/system");
    for u in ["blocksnapd.service", "blocksnapd.socket"] {
        std::fs::copy(units.join(u), system.join(u)).unwrap();
    }
    std::fs::write(system.join("blocksnap-probe.service"), PROBE_UNIT).unwrap();
    let config = root.join("etc/blocksnap/blocksnap.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"/run/blocksnap/blocksnap.sock\"\nstate_dir = \"/var/lib/blocksnap\"\n\
             socket_mode = \"0660\"\nsocket_group = \"blocksnap\"\n\n\
             [[tokens]]\ntenant = \"{TENANT}\"\ntoken = \"{TOKEN}\"\n\n{}",
            volume_toml("vol", dev, "quiesce = \"freeze\"")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    run_ok(Command::new("systemctl").arg("--root").arg(root).args([
        "enable",
        "blocksnapd.socket",
        "blocksnapd.service",
        "blocksnap-probe.service",
    ]));
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn the_units_work_under_a_booted_systemd() {
    if !root("the_units_work_under_a_booted_systemd") {
        return;
    }
    assert!(
        Command::new("systemd-nspawn")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false),
        "systemd-nspawn is missing: scripts/install-deps.sh installs systemd-container"
    );
    let lp = Loop::new(64 << 20);
    mkfs("ext4", &lp.dev);
    let mnt = Mounted::new(&lp.dev, "ext4", "");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    make_root(&root, &lp.dev);
    std::fs::write(
        out.join("probe.sh"),
        PROBE
            .replace("@TOKEN@", TOKEN)
            .replace("@TENANT@", TENANT)
            .replace("@DEV@", lp.dev.to_str().unwrap()),
    )
    .unwrap();
    let bindir = bin("blocksnapd").parent().unwrap().to_path_buf();
    assert!(
        bindir.join("blocksnap").exists(),
        "no blocksnap next to blocksnapd"
    );

    let name = format!("blocksnap-test-{}", std::process::id());
    let cgroups = Cgroups::new(&name);
    let procs = cgroups.procs_files();
    let console = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let mut cmd = Command::new("systemd-nspawn");
    cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        .args(["--register=no", "--keep-unit", "--console=pipe"])
        .arg(format!("--machine={name}"))
        .arg("--directory")
        .arg(&root)
        .arg("--bind-ro=/usr")
        .arg(format!("--bind-ro={}:/usr/local/bin", bindir.display()))
        .arg(format!("--bind={}:/probe", out.display()))
        .arg(format!("--bind={}", lp.dev.display()))
        // DeviceAllow= names it; volumes made from snapshots attach loops.
        .arg("--bind=/dev/loop-control")
        .arg(format!("--bind={}:/mnt/vol", mnt.dir.display()))
        .arg("--system-call-filter=bpf")
        .arg("--boot")
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console);
    // SAFETY: between fork and exec the hook only calls open, write and
    // close on paths prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut container = Container {
        child: Some(cmd.spawn().expect("systemd-nspawn starts")),
        cgroups,
    };
    let status = loop {
        if let Some(s) = container.child.as_mut().unwrap().try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(container);
    let elapsed = start.elapsed();

    let result = std::fs::read_to_string(out.join("result")).unwrap_or_default();
    let passed = status.is_some() && result.trim() == "PASS";
    if !passed {
        let journal = Command::new("journalctl")
            .arg("--directory")
            .arg(root.join("var/log/journal"))
            .args(["--no-pager", "-o", "short-monotonic"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let probe = std::fs::read_to_string(out.join("probe.log")).unwrap_or_default();
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
        panic!(
            "the probe in the container did not pass ({}; nspawn {status:?} after {elapsed:.1?}): {}\n\
             ---- probe output ----\n{}\n---- container journal (last 200 lines) ----\n{}\n\
             ---- console (last 40 lines) ----\n{}",
            if status.is_none() { "timed out" } else { "finished" },
            if result.is_empty() { "no verdict" } else { result.trim() },
            tail(&probe, 150),
            tail(&journal, 200),
            tail(&console, 40)
        );
    }
    assert!(
        !is_frozen(&mnt.dir),
        "the filesystem was left frozen after the container stopped"
    );
    // Shown with --nocapture (libtest keeps a passing test's output).
    eprintln!(
        "{}\ncontainer run took {elapsed:.1?}",
        std::fs::read_to_string(out.join("probe.log")).unwrap_or_default()
    );
}
