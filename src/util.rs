//! Small helpers shared by several layers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// fsync the directory holding `path`, so a rename or create in it is durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Mode of every file blocksnap creates: they hold device data, fingerprints
/// and their seed, or state. Whoever wants them readable changes that.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory blocksnap creates.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Options that create a file with mode 0600 (the umask can only take more
/// away). Callers add read/write/create flags.
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Create or truncate `path` for writing, owner-only: a file that already
/// existed is set to 0600 too (open(2) leaves an existing file's mode alone).
pub fn create_private(path: &Path) -> io::Result<File> {
    let f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(f)
}

/// `create_dir_all` with mode 0700 for every directory it creates.
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// Write `bytes` to `path` atomically and durably: a temporary file with a
/// unique name created with `O_EXCL | O_NOFOLLOW` (mode 0600) in the same
/// directory, fsync, rename over `path` (a symlink there is replaced, never
/// followed), fsync of the directory. Concurrent writers of the same path
/// never share a temporary file: the last rename wins, and each one's file
/// is complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::fd::AsFd;
    let (dir, name) = crate::statedir::open_parent(path)?;
    crate::statedir::replace_atomically_at(dir.as_fd(), name, bytes)
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// `%Y-%m-%dT%H:%M:%S.%f` in UTC without a zone suffix, as the API reference asks.
pub fn format_timestamp(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            frac
        ),
        Err(_) => "1970-01-01T00:00:00.000000".to_string(),
    }
}

/// The error and its causes on one line, each message once:
/// `cannot open chain x: No such file or directory`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = e.source();
    }
    out
}

/// `s` made safe to print on a terminal: control characters (C0 such as
/// ESC and newline, DEL, C1) and the Unicode controls that reorder text
/// (bidirectional overrides and isolates) are written as escapes (`\n`,
/// `\u{1b}`), so a name cannot move the cursor, recolour the screen or fake
/// a row of a table. Everything else is kept as given.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Bytes for people: 1.5 GiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Round `n` up to a multiple of `to` (a power of two).
pub fn round_up(n: u64, to: u64) -> u64 {
    (n + to - 1) & !(to - 1)
}

/// Write-behind for a file written front to back: start write-back of each
/// chunk as it fills and, once the chunk before it is on disk, drop that from
/// the page cache, so a large write does not push the host's working set out.
#[derive(Debug)]
pub struct WriteBehind {
    kicked: u64,
    dropped: u64,
}

const WRITE_BEHIND_CHUNK: u64 = 32 << 20;

impl WriteBehind {
    pub fn new(start: u64) -> WriteBehind {
        WriteBehind {
            kicked: start,
            dropped: start,
        }
    }

    /// Everything before `pos` has been written.
    pub fn wrote(&mut self, fd: std::os::fd::BorrowedFd<'_>, pos: u64) {
        if pos < self.kicked || pos - self.kicked < WRITE_BEHIND_CHUNK {
            return;
        }
        if self.kicked > self.dropped {
            let _ = crate::sys::sync_range(fd, self.dropped, self.kicked - self.dropped, true);
            let _ = crate::sys::drop_cache(fd, self.dropped, self.kicked - self.dropped);
            self.dropped = self.kicked;
        }
        let _ = crate::sys::sync_range(fd, self.kicked, pos - self.kicked, false);
        self.kicked = pos;
    }

    /// After an fsync: drop the rest up to `end` from the page cache.
    pub fn finish(&mut self, fd: std::os::fd::BorrowedFd<'_>, end: u64) {
        if end > self.dropped {
            let _ = crate::sys::drop_cache(fd, self.dropped, end - self.dropped);
            self.dropped = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_the_reference_format() {
        // 2014-06-04T20:16:17 UTC, from the seed's example response.
        assert_eq!(
            format_timestamp(1_401_912_977_000_000),
            "2014-06-04T20:16:17.000000"
        );
        assert_eq!(
            format_timestamp(1_401_912_977_123_456),
            "2014-06-04T20:16:17.123456"
        );
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open chain x")]
        struct Outer(#[source] io::Error);
        let e = Outer(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            error_chain(&e),
            "cannot open chain x: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn write_atomic_uses_unique_temporary_files_and_never_follows_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep").unwrap();
        let p = dir.path().join("catalog.json");
        // The temporary name older versions always used, planted as a link.
        std::os::unix::fs::symlink(&target, dir.path().join("catalog.json.tmp")).unwrap();
        write_atomic(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A link at the name itself is replaced, not written through.
        std::os::unix::fs::symlink(&target, dir.path().join("intent.json")).unwrap();
        write_atomic(&dir.path().join("intent.json"), b"two").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        // Many writers of one path at once: every read sees a whole file,
        // none fails, and no temporary file is left behind.
        write_atomic(&p, &[b'z'; 4096]).unwrap();
        let p = std::sync::Arc::new(p);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let b = std::fs::read(&*p).unwrap();
                    assert!(
                        b.len() == 4096 && b.iter().all(|&x| x == b[0]),
                        "torn: {} bytes",
                        b.len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        write_atomic(&p, &[b'a' + i; 4096]).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp") && n != "catalog.json.tmp")
            .collect();
        assert!(names.is_empty(), "left behind: {names:?}");
    }

    #[test]
    fn created_files_are_owner_only_even_over_a_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        // A leftover temporary file, world-readable: open(2) would keep its mode.
        let tmp = dir.path().join("catalog.json.tmp");
        std::fs::write(&tmp, b"old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        let sub = dir.path().join("a/b");
        create_private_dir_all(&sub).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&sub), 0o700);
    }

    #[test]
    fn printable_escapes_controls_and_keeps_the_rest() {
        assert_eq!(printable("daily backup é ✓"), "daily backup é ✓");
        assert_eq!(
            printable("x\u{1b}[2J\u{1b}[31mred\nfake row\r\t\u{7f}\u{9b}\u{202e}"),
            "x\\u{1b}[2J\\u{1b}[31mred\\nfake row\\r\\t\\u{7f}\\u{9b}\\u{202e}"
        );
        assert!(!printable("\u{0}\u{1f}").chars().any(|c| c.is_control()));
    }

    #[test]
    fn rounding_and_units() {
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(4096, 4096), 4096);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
