//! Working out the order to unmount a device's mounts and how to mount them again.

use std::path::{Path, PathBuf};

use super::Mount;

/// One step of putting mounts back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountOp {
    /// Mount the device itself.
    Device {
        source: PathBuf,
        target: PathBuf,
        fs_type: String,
        flags: u64,
        data: String,
    },
    /// Bind-mount `from` (a path under an already restored mount) at `target`,
    /// then apply the per-mount `flags`.
    Bind {
        from: PathBuf,
        target: PathBuf,
        flags: u64,
    },
}

impl MountOp {
    pub fn target(&self) -> &Path {
        match self {
            MountOp::Device { target, .. } | MountOp::Bind { target, .. } => target,
        }
    }

    /// A shell command an operator could run to do the same by hand.
    pub fn command(&self) -> String {
        match self {
            MountOp::Device {
                source,
                target,
                fs_type,
                flags,
                data,
            } => {
                let mut opts = flag_names(*flags);
                if !data.is_empty() {
                    opts.push(data.clone());
                }
                let o = if opts.is_empty() {
                    String::new()
                } else {
                    format!(" -o {}", opts.join(","))
                };
                format!(
                    "mount -t {fs_type}{o} {} {}",
                    source.display(),
                    target.display()
                )
            }
            MountOp::Bind { from, target, .. } => {
                format!("mount --bind {} {}", from.display(), target.display())
            }
        }
    }
}

/// Per-mount option names and their MS_* flags.
const FLAG_NAMES: &[(&str, u64)] = &[
    ("ro", libc::MS_RDONLY),
    ("nosuid", libc::MS_NOSUID),
    ("nodev", libc::MS_NODEV),
    ("noexec", libc::MS_NOEXEC),
    ("noatime", libc::MS_NOATIME),
    ("nodiratime", libc::MS_NODIRATIME),
    ("relatime", libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME),
    ("sync", libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC),
];

/// MS_* flags for a mountinfo per-mount option string.
pub fn mount_flags(options: &str) -> u64 {
    options
        .split(',')
        .filter_map(|o| FLAG_NAMES.iter().find(|(n, _)| *n == o).map(|(_, f)| *f))
        .fold(0, |a, f| a | f)
}

fn flag_names(flags: u64) -> Vec<String> {
    FLAG_NAMES
        .iter()
        .filter(|(_, f)| flags & f != 0)
        .map(|(n, _)| n.to_string())
        .collect()
}

/// The filesystem's own options, minus those that are per-mount flags.
fn data_string(super_options: &str) -> String {
    super_options
        .split(',')
        .filter(|o| !o.is_empty() && !matches!(*o, "rw" | "ro" | "seclabel"))
        .collect::<Vec<_>>()
        .join(",")
}

fn depth(p: &Path) -> usize {
    p.components().count()
}

/// Order in which to unmount: deepest mount points first.
pub fn unmount_order(mounts: &[Mount]) -> Vec<Mount> {
    let mut m = mounts.to_vec();
    m.sort_by(|a, b| {
        depth(&b.mount_point)
            .cmp(&depth(&a.mount_point))
            .then(b.id.cmp(&a.id))
    });
    m
}

/// How to put `mounts` (of `device`) back: mount the device at the first
/// whole-filesystem mount, then bind the rest from it, parents first.
pub fn remount_plan(mounts: &[Mount], device: &Path) -> Vec<MountOp> {
    let mut m = mounts.to_vec();
    m.sort_by(|a, b| {
        depth(&a.mount_point)
            .cmp(&depth(&b.mount_point))
            .then(a.id.cmp(&b.id))
    });
    let primary = m.iter().position(|x| x.root == Path::new("/")).unwrap_or(0);
    let first = m.remove(primary);
    let mut ops = vec![MountOp::Device {
        source: device.to_path_buf(),
        target: first.mount_point.clone(),
        fs_type: first.fs_type.clone(),
        flags: mount_flags(&first.options),
        data: data_string(&first.super_options),
    }];
    let base = first.mount_point.clone();
    let base_root = first.root.clone();
    for x in m {
        let rel = x.root.strip_prefix(&base_root).unwrap_or(&x.root);
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        ops.push(MountOp::Bind {
            from: base.join(rel),
            target: x.mount_point.clone(),
            flags: mount_flags(&x.options),
        });
    }
    ops
}

/// The steps of `plan` that restore exactly the mounts in `back`. If the
/// device mount itself is among them it comes first as planned; binds whose
/// source mount is still in place are bound from it.
pub(super) fn rebuild_partial(plan: &[MountOp], back: &[Mount]) -> Vec<MountOp> {
    plan.iter()
        .filter(|op| back.iter().any(|m| m.mount_point == op.target()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::mnt;
    use super::*;

    #[test]
    fn remount_plan_binds_from_the_primary() {
        let m = vec![
            mnt(30, "/sub", "/srv/sub", "ro,nosuid,relatime"),
            mnt(20, "/", "/mnt/data", "rw,relatime"),
        ];
        let plan = remount_plan(&m, Path::new("/dev/loop9"));
        assert_eq!(
            plan[0],
            MountOp::Device {
                source: "/dev/loop9".into(),
                target: "/mnt/data".into(),
                fs_type: "ext4".into(),
                flags: libc::MS_RELATIME,
                data: "errors=remount-ro".into(),
            }
        );
        assert_eq!(
            plan[1],
            MountOp::Bind {
                from: "/mnt/data/sub".into(),
                target: "/srv/sub".into(),
                flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_RELATIME,
            }
        );
        assert_eq!(
            plan[0].command(),
            "mount -t ext4 -o relatime,errors=remount-ro /dev/loop9 /mnt/data"
        );
    }

    #[test]
    fn unmount_goes_deepest_first() {
        let m = vec![
            mnt(1, "/", "/a", "rw"),
            mnt(2, "/x", "/a/b/c", "rw"),
            mnt(3, "/", "/a/b", "rw"),
        ];
        let order: Vec<_> = unmount_order(&m)
            .into_iter()
            .map(|x| x.mount_point)
            .collect();
        assert_eq!(
            order,
            vec![PathBuf::from("/a/b/c"), "/a/b".into(), "/a".into()]
        );
    }
}
