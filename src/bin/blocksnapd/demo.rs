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
         socket = \"{dir}/blocksnap.sock\"\n\
         state_dir = \"{dir}/state\"\n\
         socket_mode = \"0600\"\n\n\
         [[tokens]]\n\
         tenant = \"{TENANT}\"\n\
         token = \"{TOKEN}\"\n\n\
         [[volumes]]\n\
         id = \"{VOLUME_ID}\"\n\
         device = \"{dev}\"\n\
         display_name = \"demo\"\n\
         quiesce = \"auto\"\n",
        dir = dir.display(),
        dev = demo.device.display(),
    );
    std::fs::write(&demo.config, config)
        .map_err(|e| format!("cannot write {}: {e}", demo.config.display()))?;
    Ok(demo)
}

/// What to try, printed once the daemon is about to serve.
pub fn instructions(demo: &Demo) -> String {
    let sock = demo.dir.join("blocksnap.sock");
    let exe = std::env::current_exe().ok();
    let cli = exe
        .as_ref()
        .and_then(|e| e.parent())
        .map(|p| p.join("blocksnap"))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "blocksnap".into());
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
         export BLOCKSNAP_SOCKET={sock} BLOCKSNAP_TENANT={TENANT} BLOCKSNAP_TOKEN={TOKEN}\n\
         {cli} snapshot create {VOLUME_ID} --name first --wait\n\
         {cli} snapshot list\n\
         {cli} volume create --snapshot <SNAPSHOT_ID> --wait\n\
         {cli} volume list\n\
         {cli} chain list {state}/chains/{VOLUME_ID}.chain\n\n\
         Stop with Ctrl-C: the demo volume is unmounted and detached.\n",
        sock = sock.display(),
        state = demo.dir.join("state").display(),
    )
}
