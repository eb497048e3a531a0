//! Parsing /proc/self/mountinfo.

use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub id: u32,
    pub parent: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted here ("/" unless a bind mount of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (ro/rw, nosuid, nodev, noexec, atime flags).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options (the filesystem's own data string).
    pub super_options: String,
}

impl Mount {
    /// Whether the per-mount options say read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undo mountinfo's octal escapes (\040 for space, \011, \012, \134).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let oct = std::str::from_utf8(oct).unwrap_or("0");
                if let Ok(v) = u8::from_str_radix(oct, 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of a mountinfo file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let mut parts = line.split(' ');
    let id = parts.next()?.parse().ok()?;
    let parent = parts.next()?.parse().ok()?;
    let (major, minor) = parts.next()?.split_once(':')?;
    let major = major.parse().ok()?;
    let minor = minor.parse().ok()?;
    let root = PathBuf::from(unescape(parts.next()?));
    let mount_point = PathBuf::from(unescape(parts.next()?));
    let options = parts.next()?.to_string();
    // Optional fields end with a lone "-".
    for p in parts.by_ref() {
        if p == "-" {
            break;
        }
    }
    let fs_type = parts.next()?.to_string();
    let source = unescape(parts.next()?);
    let super_options = parts.next().unwrap_or("").to_string();
    Some(Mount {
        id,
        parent,
        major,
        minor,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
    })
}

/// The mounts of the block device with number `rdev` (bind mounts included).
/// Matches on major:minor, and on the source path for filesystems such as
/// btrfs that report an anonymous device number.
pub fn mounts_of(all: &[Mount], rdev: u64, device: &Path) -> Vec<Mount> {
    let major = nix::sys::stat::major(rdev) as u32;
    let minor = nix::sys::stat::minor(rdev) as u32;
    let canonical = std::fs::canonicalize(device).ok();
    all.iter()
        .filter(|m| {
            (m.major == major && m.minor == minor)
                || (m.source.starts_with('/')
                    && canonical.is_some()
                    && std::fs::canonicalize(&m.source).ok() == canonical)
        })
        .cloned()
        .collect()
}

/// Read this process's mount table.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 7:3 / /mnt/data rw,nosuid,nodev,relatime shared:50 - ext4 /dev/loop3 rw,errors=remount-ro
99 22 7:3 /sub /srv/with\\040space ro,relatime shared:50 - ext4 /dev/loop3 rw,errors=remount-ro
100 22 0:45 / /mnt/btr rw,relatime - btrfs /dev/loop4 rw,space_cache=v2,subvolid=5,subvol=/
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/data"));
        assert_eq!(m[1].options, "rw,nosuid,nodev,relatime");
        assert_eq!(m[1].super_options, "rw,errors=remount-ro");
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!((m[1].major, m[1].minor), (7, 3));
        assert_eq!(m[2].mount_point, PathBuf::from("/srv/with space"));
        assert_eq!(m[2].root, PathBuf::from("/sub"));
        assert!(m[2].read_only());
        assert!(!m[1].read_only());
    }

    #[test]
    fn finds_bind_mounts_by_device_number() {
        let m = parse(SAMPLE);
        let rdev = nix::sys::stat::makedev(7, 3);
        let found = mounts_of(&m, rdev, Path::new("/nonexistent/loop3"));
        assert_eq!(found.len(), 2);
        assert!(found.iter().all(|x| x.source == "/dev/loop3"));
    }

    #[test]
    fn skips_garbage_lines() {
        assert!(parse("nonsense\n1 2 x y\n").is_empty());
    }
}
