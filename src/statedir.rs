//! The daemon's state directory, checked once and then used through a
//! directory file descriptor.
//!
//! A state directory another user can write into lets that user plant a
//! symlink where the daemon writes (`catalog.json.tmp -> /etc/shadow`) and
//! have root overwrite its target. So:
//! - [`StateDir::open`] refuses a state directory that is not owned by the
//!   daemon's user (root) or that group or others can write, and any parent
//!   directory that someone else could use to swap it (not owned by root or
//!   us, or writable by group/others without the sticky bit), both along the
//!   path as configured and along its canonical form;
//! - subdirectories ([`StateDir::subdir`]) get the same check;
//! - every file in it is opened relative to the directory's descriptor with
//!   `O_NOFOLLOW`, temporary files get unique names and `O_EXCL`, and files
//!   and directories the daemon makes are 0600 and 0700 whatever the umask.
//!
//! [`check`] runs the same checks without creating anything, for
//! `blocksnapd --check-config`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// The subdirectories the daemon creates at start.
pub const DAEMON_SUBDIRS: [&str; 3] = ["chains", "volumes", "freeze-intents"];
/// Every subdirectory the daemon creates files in (`damaged/` only when it
/// moves something aside).
pub const CHECKED_SUBDIRS: [&str; 4] = ["chains", "volumes", "freeze-intents", "damaged"];

/// Why a state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot use the state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is owned by uid {owner}; blocksnapd (uid {euid}) keeps its state only in directories it owns and parents owned by root or itself: chown it or choose another state_dir")]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("{path} can be written by group or others (mode {mode:04o}), so another user could plant files where blocksnapd writes: chmod go-w it or choose another state_dir")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("the state directory must be an absolute path, not {path}")]
    Relative { path: PathBuf },
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The state directory (or one of its subdirectories), opened and checked.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// A file name inside a directory: one component, no `/`, not `.`/`..`.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(())
}

fn nix_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether a parent directory is safe: owned by root or us, and nobody else
/// can rename entries in it (not group/other-writable, or sticky like /tmp).
fn check_parent(path: &Path, md: &std::fs::Metadata) -> Result<(), StateDirError> {
    if !md.is_dir() {
        return Err(StateDirError::NotDirectory {
            path: path.to_path_buf(),
        });
    }
    let uid = md.uid();
    if uid != 0 && uid != euid() {
        return Err(StateDirError::Owner {
            path: path.to_path_buf(),
            owner: uid,
            euid: euid(),
        });
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(StateDirError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Whether a directory the daemon writes in is safe: owned by us, and
/// nobody else can write in it.
fn check_own(path: &Path, st: &FileStat) -> Result<(), StateDirError> {
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
        return Err(StateDirError::NotDirectory {
            path: path.to_path_buf(),
        });
    }
    if st.st_uid != euid() {
        return Err(StateDirError::Owner {
            path: path.to_path_buf(),
            owner: st.st_uid,
            euid: euid(),
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StateDirError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Check every existing ancestor of `path` (as written, and canonical).
/// Returns the first missing component's path, if any.
fn check_ancestors(path: &Path) -> Result<Option<PathBuf>, StateDirError> {
    if !path.is_absolute() {
        return Err(StateDirError::Relative {
            path: path.to_path_buf(),
        });
    }
    let io_err = |p: &Path, source| StateDirError::Io {
        path: p.to_path_buf(),
        source,
    };
    let mut prefixes = Vec::new();
    let mut cur = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => cur.push("/"),
            Component::Normal(n) => cur.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            Component::Prefix(_) => {}
        }
        prefixes.push(cur.clone());
    }
    prefixes.dedup();
    let parents = &prefixes[..prefixes.len().saturating_sub(1)];
    let mut missing = None;
    for p in parents {
        match std::fs::metadata(p) {
            Ok(md) => check_parent(p, &md)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing = Some(p.clone());
                break;
            }
            Err(e) => return Err(io_err(p, e)),
        }
    }
    Ok(missing)
}

/// Check the parents of `path`'s canonical form (symlinks resolved): a
/// symlink along the configured path leads somewhere that must be as safe.
fn check_canonical(path: &Path) -> Result<(), StateDirError> {
    let real = std::fs::canonicalize(path).map_err(|source| StateDirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut cur = PathBuf::new();
    if let Some(parent) = real.parent() {
        for c in parent.components() {
            cur.push(c);
            let md = std::fs::metadata(&cur).map_err(|source| StateDirError::Io {
                path: cur.clone(),
                source,
            })?;
            check_parent(&cur, &md)?;
        }
    }
    Ok(())
}

impl StateDir {
    /// Open (creating it 0700 if missing, with its missing parents 0755) and
    /// check the state directory; makes it 0700 if it is not already.
    pub fn open(path: &Path) -> Result<StateDir, StateDirError> {
        let io_err = |p: &Path, source| StateDirError::Io {
            path: p.to_path_buf(),
            source,
        };
        if let Some(missing) = check_ancestors(path)? {
            use std::os::unix::fs::DirBuilderExt;
            let parent = path.parent().unwrap_or(Path::new("/"));
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| io_err(&missing, e))?;
            check_ancestors(path)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                match std::fs::DirBuilder::new().mode(0o700).create(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(path, e)),
                }
            }
            Err(e) => return Err(io_err(path, e)),
        }
        // The last component may be a symlink only if its target is as safe
        // as the directory would be: open what it names, then check that.
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(path, nix_io(e)))?;
        let dir = StateDir {
            path: path.to_path_buf(),
            fd,
        };
        check_canonical(path)?;
        dir.check_self()?;
        Ok(dir)
    }

    fn check_self(&self) -> Result<(), StateDirError> {
        let st = nix::sys::stat::fstat(&self.fd).map_err(|e| StateDirError::Io {
            path: self.path.clone(),
            source: nix_io(e),
        })?;
        check_own(&self.path, &st)?;
        if st.st_mode & 0o077 != 0 {
            nix::sys::stat::fchmod(&self.fd, Mode::from_bits_truncate(0o700)).map_err(|e| {
                StateDirError::Io {
                    path: self.path.clone(),
                    source: nix_io(e),
                }
            })?;
        }
        Ok(())
    }

    /// Open (creating it 0700 if missing) and check a subdirectory. A symlink
    /// in its place is refused.
    pub fn subdir(&self, name: &str) -> Result<StateDir, StateDirError> {
        let path = self.path.join(name);
        let io_err = |source| StateDirError::Io {
            path: path.clone(),
            source,
        };
        check_name(name).map_err(io_err)?;
        match nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => self.sync().map_err(io_err)?,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err(nix_io(e))),
        }
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => StateDirError::NotDirectory { path: path.clone() },
            e => io_err(nix_io(e)),
        })?;
        let dir = StateDir {
            path: path.clone(),
            fd,
        };
        dir.check_self()?;
        Ok(dir)
    }

    /// The directory's path (for messages and for code that still works by path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`, for messages.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// fsync the directory, making creates, renames and removals in it durable.
    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(&self.fd).map_err(nix_io)
    }

    /// Open an existing file for reading without following a symlink; a
    /// name that is not a regular file is an error.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        self.open_nofollow(name, OFlag::O_RDONLY)
    }

    /// Open `name` with `flags` (plus `O_NOFOLLOW | O_CLOEXEC`; new files
    /// are 0600). Anything but a regular file is refused.
    pub fn open_nofollow(&self, name: &str, flags: OFlag) -> io::Result<File> {
        check_name(name)?;
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| match e {
            Errno::ELOOP => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a symbolic link; blocksnapd does not follow links in its state directory",
                    self.path.join(name).display()
                ),
            ),
            e => nix_io(e),
        })?;
        let st = nix::sys::stat::fstat(&fd).map_err(nix_io)?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.path.join(name).display()),
            ));
        }
        // O_NONBLOCK only kept a FIFO from blocking the open; regular files
        // ignore it, but clear it anyway.
        let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(nix_io)?;
        let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(nix_io)?;
        Ok(File::from(fd))
    }

    /// Create a new file, 0600, failing if anything (a file, a symlink) has
    /// that name.
    pub fn create_private_file(&self, name: &str) -> io::Result<File> {
        let f = self.open_nofollow(name, OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL)?;
        nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(0o600)).map_err(nix_io)?;
        Ok(f)
    }

    /// Create a temporary file with a unique name (`.{base}.{pid}.{random}.tmp`).
    pub fn create_temp(&self, base: &str) -> io::Result<(String, File)> {
        loop {
            let name = format!(
                ".{base}.{}.{:016x}.tmp",
                std::process::id(),
                rand::random::<u64>()
            );
            match self.create_private_file(&name) {
                Ok(f) => return Ok((name, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Replace `name` with `bytes` atomically and durably: a unique
    /// temporary file, fsync, rename over `name` (a symlink there is
    /// replaced, never followed), fsync of the directory.
    pub fn replace_atomically(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        replace_atomically_at(self.fd.as_fd(), name, bytes)
    }

    /// Rename `from` to `to` within this directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        nix::fcntl::renameat(&self.fd, from, &self.fd, to).map_err(nix_io)
    }

    /// Rename `from` in this directory to `to` in `dir`.
    pub fn rename_into(&self, from: &str, dir: &StateDir, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        nix::fcntl::renameat(&self.fd, from, &dir.fd, to).map_err(nix_io)
    }

    /// Remove a file (not a directory); `Ok(false)` if it was not there.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        check_name(name)?;
        match nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(nix_io(e)),
        }
    }

    /// What `name` is, without following a symlink; `None` if nothing.
    pub fn kind_of(&self, name: &str) -> io::Result<Option<SFlag>> {
        check_name(name)?;
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(SFlag::from_bits_truncate(
                st.st_mode & SFlag::S_IFMT.bits(),
            ))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(nix_io(e)),
        }
    }

    /// `lstat` of `name` (a symlink is not followed); `None` if nothing.
    pub fn stat(&self, name: &str) -> io::Result<Option<FileStat>> {
        check_name(name)?;
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(nix_io(e)),
        }
    }

    /// Names in the directory (not `.`/`..`), in no particular order.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        // Listing by path is fine: only the names are used, and every open
        // goes through the descriptor.
        for e in std::fs::read_dir(&self.path)? {
            let e = e?;
            if let Some(n) = e.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        Ok(out)
    }
}

impl AsFd for StateDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Replace `name` in the directory `dir` atomically (see
/// [`StateDir::replace_atomically`]).
pub fn replace_atomically_at(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> io::Result<()> {
    check_name(name)?;
    let base = name.trim_start_matches('.');
    let (tmp, mut f) = loop {
        let tmp = format!(
            ".{base}.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        );
        match nix::fcntl::openat(
            dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => break (tmp, File::from(fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(nix_io(e)),
        }
    };
    let written = (|| {
        nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(0o600)).map_err(nix_io)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        nix::fcntl::renameat(dir, tmp.as_str(), dir, name).map_err(nix_io)
    })();
    if let Err(e) = written {
        let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    nix::unistd::fsync(dir).map_err(nix_io)
}

/// Open the directory holding `path` (following symlinks in the directory
/// path itself, which its owner controls) for `*at` calls.
pub fn open_parent(path: &Path) -> io::Result<(OwnedFd, &str)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(OsStr::to_str).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_io)?;
    Ok((fd, name))
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The directory exists and is safe.
    Ok,
    /// It does not exist yet; its existing parents are safe and it would be
    /// created.
    WouldCreate,
}

/// Check a state directory as [`StateDir::open`] would, creating nothing:
/// for `blocksnapd --check-config`.
pub fn check(path: &Path) -> Result<CheckOutcome, StateDirError> {
    if check_ancestors(path)?.is_some() {
        return Ok(CheckOutcome::WouldCreate);
    }
    let io_err = |p: &Path, source| StateDirError::Io {
        path: p.to_path_buf(),
        source,
    };
    let st = match nix::sys::stat::stat(path) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(CheckOutcome::WouldCreate),
        Err(e) => return Err(io_err(path, nix_io(e))),
    };
    check_canonical(path)?;
    check_own(path, &st)?;
    for sub in CHECKED_SUBDIRS {
        let p = path.join(sub);
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(StateDirError::NotDirectory { path: p });
            }
            Ok(_) => {
                let st = nix::sys::stat::lstat(&p).map_err(|e| io_err(&p, nix_io(e)))?;
                check_own(&p, &st)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p, e)),
        }
    }
    Ok(CheckOutcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_private_dirs_and_files() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("a/b/state");
        let d = StateDir::open(&state).unwrap();
        d.subdir("chains").unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("chains")), 0o700);
        // An existing state directory others may read is made private.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = StateDir::open(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        let f = d.create_private_file("x").unwrap();
        drop(f);
        assert_eq!(mode(&state.join("x")), 0o600);
        assert!(d.create_private_file("x").is_err(), "O_EXCL");
        d.replace_atomically("y", b"hello").unwrap();
        assert_eq!(std::fs::read(state.join("y")).unwrap(), b"hello");
        assert_eq!(mode(&state.join("y")), 0o600);
        assert_eq!(d.names().unwrap().len(), 3, "no temporary file is left");
    }

    #[test]
    fn refuses_directories_others_can_write() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateDir::open(&state).unwrap_err();
        assert!(matches!(e, StateDirError::Writable { .. }), "{e}");
        assert!(matches!(check(&state), Err(StateDirError::Writable { .. })));
        // A parent writable by others (without the sticky bit).
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o757)).unwrap();
        let e = StateDir::open(&state.join("inner")).unwrap_err();
        assert!(
            matches!(e, StateDirError::Writable { ref path, .. } if path == t.path()),
            "{e}"
        );
        // With the sticky bit (like /tmp) it is fine.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        StateDir::open(&state.join("inner")).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // A subdirectory others can write.
        let d = StateDir::open(&state).unwrap();
        std::fs::create_dir(state.join("volumes")).unwrap();
        std::fs::set_permissions(
            state.join("volumes"),
            std::fs::Permissions::from_mode(0o775),
        )
        .unwrap();
        assert!(matches!(
            d.subdir("volumes"),
            Err(StateDirError::Writable { .. })
        ));
        assert!(matches!(check(&state), Err(StateDirError::Writable { .. })));
        assert!(check(Path::new("relative")).is_err());
    }

    #[test]
    fn never_follows_a_planted_symlink() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let state = t.path().join("state");
        let d = StateDir::open(&state).unwrap();
        std::os::unix::fs::symlink(&target, state.join("link")).unwrap();
        assert!(d.open_read("link").is_err());
        assert!(d
            .open_nofollow("link", OFlag::O_WRONLY | OFlag::O_TRUNC)
            .is_err());
        assert!(d.create_private_file("link").is_err());
        // Replacing replaces the link itself.
        d.replace_atomically("link", b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(std::fs::read(state.join("link")).unwrap(), b"new");
        // A subdirectory that is a symlink is refused.
        std::os::unix::fs::symlink(t.path(), state.join("chains")).unwrap();
        assert!(matches!(
            d.subdir("chains"),
            Err(StateDirError::NotDirectory { .. })
        ));
        assert!(matches!(
            check(&state),
            Err(StateDirError::NotDirectory { .. })
        ));
        assert!(d.open_read("../target").is_err());
    }
}
