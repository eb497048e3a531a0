//! `blocksnapd --demo`: a daemon on a small local image, no spare disk needed.
//!
//! As root the image becomes a loop device with a mounted ext4 filesystem, so
//! snapshots take the real freeze path; unprivileged the image file itself is
//! the volume. The socket, state and config live in the demo directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use blocksnap::loopdev;

pub const VOLUME_ID: &str = "yourVolumeID";
pub const TENANT: &str = "yourAccountID";
pub const TOKEN: &str = "yourAuthToken";
const IMAGE_SIZE: u64 = 256 << 20;

/// The demo volume; unmounted and detached on drop.
#[derive(Debug)]
pub struct Demo {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub device: PathBuf,
    pub mount: Option<PathBuf>,
    loop_dev: Option<PathBuf>,
    /// The `blocksnap` the printed commands use, or why there is none.
    cli: Result<PathBuf, String>,
}

/// `blocksnap` next to this executable. `cargo run --bin blocksnapd` builds
/// only blocksnapd: run under cargo (CARGO and CARGO_MANIFEST_DIR set), the
/// demo builds blocksnap with the same profile, so that the commands it
/// prints work as printed.
fn find_or_build_cli() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?;
    let cli = dir.join("blocksnap");
    if cli.exists() {
        return Ok(cli);
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let hint = format!(
        "no blocksnap next to {}: build it with `cargo build --release --bin blocksnap`",
        exe.display()
    );
    let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        return Err(hint);
    };
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(Path::new(&manifest).join("Cargo.toml"))
        .args(["--bin", "blocksnap"]);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("blocksnapd --demo: building blocksnap for the commands it prints: {cmd:?}");
    match cmd.status() {
        Ok(st) if st.success() && cli.exists() => Ok(cli),
        Ok(st) => Err(format!("{hint} ({cmd:?} ended with {st})")),
        Err(e) => Err(format!("{hint} (cannot run cargo: {e})")),
    }
}

/// `s` as one shell word: as is when it is plain, else single-quoted.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@%,".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Volumes the demo made from snapshots (they are attached again on
        // the next start).
        let made = self.dir.join("state").join("volumes");
        if let Ok(entries) = std::fs::read_dir(&made) {
            for e in entries.flatten() {
                if let Some(ld) = loopdev::find_by_backing(&e.path()) {
                    let _ = loopdev::detach(&ld.path);
                }
            }
        }
        if let Some(m) = &self.mount {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::empty())
                .or_else(|_| nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH));
        }
        if let Some(d) = &self.loop_dev {
            let _ = loopdev::detach(d);
        }
        eprintln!(
            "demo volume released; its chain and state stay in {}",
            self.dir.display()
        );
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Set up the demo in `dir` and write its config.
pub fn prepare(dir: &Path) -> Result<Demo, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let image = dir.join("volume.img");
    if !image.exists() {
        let f = blocksnap::util::create_private(&image)
            .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
        f.set_len(IMAGE_SIZE).map_err(|e| e.to_string())?;
    }
    let mut demo = Demo {
        cli: find_or_build_cli(),
        config: dir.join("blocksnap.toml"),
        device: image.clone(),
        mount: None,
        loop_dev: None,
        dir: dir.clone(),
    };
    if blocksnap::sys::is_root() {
        let ld = match loopdev::find_by_backing(&image) {
            Some(l) => l,
            None => loopdev::attach(&image, false)
                .map_err(|e| format!("cannot attach {}: {e}", image.display()))?,
        };
        demo.loop_dev = Some(ld.path.clone());
        demo.device = ld.path.clone();
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(mnt.to_str().unwrap_or("")));
        let mount = || {
            run(Command::new("mount")
                .arg("-t")
                .arg("ext4")
                .arg(&ld.path)
                .arg(&mnt))
        };
        // Not mounted yet and not mountable: a new image, give it a filesystem.
        if !mounted && mount().is_err() {
            run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&ld.path))?;
            mount()?;
            std::fs::write(
                mnt.join("hello.txt"),
                "This file lives on the blocksnap demo volume. Change it, snapshot, restore.\n",
            )
            .map_err(|e| e.to_string())?;
        }
        demo.mount = Some(mnt);
    }
    let config = format!(
        "# Written by blocksnapd --demo. See config/blocksnap.toml for every key.\n\
         [daemon]\n\
         socket = {socket}\n\
         state_dir = {state}\n\
         socket_mode = \"0600\"\n\n\
         [[tokens]]\n\
         tenant = \"{TENANT}\"\n\
         token = \"{TOKEN}\"\n\n\
         [[volumes]]\n\
         id = \"{VOLUME_ID}\"\n\
         device = {dev}\n\
         display_name = \"demo\"\n\
         quiesce = \"auto\"\n",
        socket = toml_string(&dir.join("blocksnap.sock").to_string_lossy()),
        state = toml_string(&dir.join("state").to_string_lossy()),
        dev = toml_string(&demo.device.to_string_lossy()),
    );
    std::fs::write(&demo.config, config)
        .map_err(|e| format!("cannot write {}: {e}", demo.config.display()))?;
    Ok(demo)
}

/// What to try, printed once the daemon is about to serve.
pub fn instructions(demo: &Demo) -> String {
    let word = |p: &Path| shell_word(&p.to_string_lossy());
    let sock = word(&demo.dir.join("blocksnap.sock"));
    let chain = word(
        &demo
            .dir
            .join("state/chains")
            .join(format!("{VOLUME_ID}.chain")),
    );
    // Full paths: `cargo run` puts neither binary on PATH.
    let (cli, missing) = match &demo.cli {
        Ok(p) => (word(p), String::new()),
        Err(why) => (
            "blocksnap".to_string(),
            format!("(The blocksnap commands need the CLI: {why}.)\n"),
        ),
    };
    let volume = match &demo.mount {
        Some(m) => format!(
            "{} = {} with ext4 mounted at {} (snapshots freeze it)",
            VOLUME_ID,
            demo.device.display(),
            m.display()
        ),
        None => format!(
            "{} = the image file {} (run as root for a mounted, frozen filesystem)",
            VOLUME_ID,
            demo.device.display()
        ),
    };
    format!(
        "\nblocksnap demo\n  volume   {volume}\n  socket   {sock}\n  state    {state}\n\n\
         Try, from another terminal:\n\n\
         curl -i --unix-socket {sock} -X POST -d '{{\"snapshot\": {{\"display_name\": \"snap-001\", \"display_description\": \"Daily Backup\", \"volume_id\": \"{VOLUME_ID}\"}}}}' -H \"X-Auth-Token: {TOKEN}\" -H \"Content-Type: application/json\" http://localhost/v1/{TENANT}/snapshots\n\n\
         curl -s --unix-socket {sock} -H \"X-Auth-Token: {TOKEN}\" http://localhost/v1/{TENANT}/snapshots/detail\n\n\
         {missing}\
         export BLOCKSNAP_SOCKET={sock} BLOCKSNAP_TENANT={TENANT} BLOCKSNAP_TOKEN={TOKEN}\n\
         {cli} snapshot create {VOLUME_ID} --name first --wait\n\
         {cli} snapshot list\n\
         SNAP=$({cli} snapshot create {VOLUME_ID} --name second --wait)\n\
         {cli} volume create --snapshot \"$SNAP\" --wait\n\
         {cli} volume list\n\
         {cli} chain list {chain}\n\n\
         Stop with Ctrl-C: the demo volume is unmounted and detached.\n",
        state = demo.dir.join("state").display(),
    )
}
