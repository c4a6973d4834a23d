//! Path resolution confined to a directory ("root"), for code that creates or opens files
//! below a directory whose contents it does not trust (an image layer being unpacked, a
//! volume a container can write to).
//!
//! A [`Root`] holds an `O_PATH` descriptor of the directory. Every lookup starts from that
//! descriptor and follows the [`Resolve`] rule for symlinks and `..`: the kernel does it with
//! `openat2(2)` (`RESOLVE_BENEATH`, `RESOLVE_IN_ROOT`, `RESOLVE_NO_SYMLINKS`, always with
//! `RESOLVE_NO_MAGICLINKS`); where `openat2` is missing (`ENOSYS`) or keeps failing with
//! `EAGAIN`, a walk opens one component at a time with `O_PATH|O_NOFOLLOW`, reads symlinks
//! with `readlinkat` and applies the same rule (at most 40 symlinks, `..` never above the
//! root). Directories are created with `mkdirat` on the parent's descriptor, never by path,
//! so a symlink swapped in by the untrusted side cannot redirect a creation outside the root.
//!
//! Effectful (file system). Errors name the offending path relative to the root.
#![allow(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;
/// How often `openat2` is retried when it reports `EAGAIN` (a concurrent rename or mount)
/// before the component walk takes over.
const EAGAIN_RETRIES: usize = 32;

/// How symlinks met while resolving a path inside a root are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Any symlink component (final one included) is an error (O_NOFOLLOW walk; kubelet subPath).
    NoSymlinks,
    /// Symlinks are followed while they stay beneath the root; one that leaves it (absolute
    /// target, `..` above the root) is an error (openat2 RESOLVE_BENEATH).
    Beneath,
    /// Symlinks are resolved as if the root were `/` (openat2 RESOLVE_IN_ROOT; runc securejoin).
    InRoot,
}

/// Errors of confined path resolution. `rel` is the path relative to the root that failed.
#[derive(Debug, thiserror::Error)]
pub enum SafeRootError {
    /// The root directory itself could not be opened.
    #[error("open root directory {root}: {errno}")]
    Root {
        /// The root directory.
        root: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// The relative path cannot name what was asked (empty, or ending in `.` or `..` where a
    /// name is needed).
    #[error("{rel:?} in {root}: {why}")]
    InvalidPath {
        /// The root directory.
        root: PathBuf,
        /// The path relative to the root.
        rel: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Resolution would leave the root (`..` above it, an absolute symlink with
    /// [`Resolve::Beneath`]).
    #[error("{rel:?} in {root}: resolution escapes the root")]
    Escape {
        /// The root directory.
        root: PathBuf,
        /// The path relative to the root.
        rel: PathBuf,
    },
    /// A component is a symlink and [`Resolve::NoSymlinks`] was asked for.
    #[error("{rel:?} in {root}: a path component is a symlink")]
    Symlink {
        /// The root directory.
        root: PathBuf,
        /// The path relative to the root.
        rel: PathBuf,
    },
    /// More than 40 symlinks were met.
    #[error("{rel:?} in {root}: too many levels of symbolic links")]
    Loop {
        /// The root directory.
        root: PathBuf,
        /// The path relative to the root.
        rel: PathBuf,
    },
    /// A system call failed.
    #[error("{rel:?} in {root}: {op}: {errno}")]
    Io {
        /// The root directory.
        root: PathBuf,
        /// The path relative to the root.
        rel: PathBuf,
        /// The operation.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
}

impl SafeRootError {
    /// The path relative to the root that failed (`None` when the root itself failed).
    pub fn rel(&self) -> Option<&Path> {
        match self {
            SafeRootError::Root { .. } => None,
            SafeRootError::InvalidPath { rel, .. }
            | SafeRootError::Escape { rel, .. }
            | SafeRootError::Symlink { rel, .. }
            | SafeRootError::Loop { rel, .. }
            | SafeRootError::Io { rel, .. } => Some(rel),
        }
    }

    /// The errno this error corresponds to (`EXDEV` for an escape, `ELOOP` for a refused
    /// symlink or a loop, `EINVAL` for an invalid path), for callers that branch on
    /// `ENOENT`/`EEXIST`.
    pub fn errno(&self) -> Errno {
        match self {
            SafeRootError::Root { errno, .. } | SafeRootError::Io { errno, .. } => *errno,
            SafeRootError::InvalidPath { .. } => Errno::EINVAL,
            SafeRootError::Escape { .. } => Errno::EXDEV,
            SafeRootError::Symlink { .. } | SafeRootError::Loop { .. } => Errno::ELOOP,
        }
    }
}

/// An open directory that confines path resolution.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// Takes ownership of a descriptor a nix call just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open-like system call and nothing else
    // owns it, so handing it to an OwnedFd (which closes it once) is sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The non-empty `/`-separated segments of `rel`, `.` and `..` kept (they are resolved by
/// the rule, not lexically). A leading `/` means the root.
fn segments(rel: &Path) -> Vec<&OsStr> {
    rel.as_os_str()
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|s| !s.is_empty())
        .map(OsStr::from_bytes)
        .collect()
}

/// `rel` without leading slashes, or "." for the root itself (what openat2 is given).
fn kernel_path(rel: &Path) -> &OsStr {
    let b = rel.as_os_str().as_bytes();
    let start = b.iter().position(|c| *c != b'/').unwrap_or(b.len());
    if start == b.len() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(&b[start..])
    }
}

impl Root {
    /// Open directory `path` (`O_PATH|O_DIRECTORY|O_CLOEXEC`) as a root. `path` is trusted.
    pub fn open(path: &Path) -> Result<Root, SafeRootError> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| SafeRootError::Root {
            root: path.to_path_buf(),
            errno,
        })?;
        Ok(Root {
            fd: owned(fd),
            path: path.to_path_buf(),
        })
    }

    /// A root from an already open directory descriptor; `path` is used in messages.
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> Root {
        Root { fd, path }
    }

    /// The root directory's descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The root directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err_io(&self, rel: &Path, op: &'static str, errno: Errno) -> SafeRootError {
        SafeRootError::Io {
            root: self.path.clone(),
            rel: rel.to_path_buf(),
            op,
            errno,
        }
    }

    fn err_escape(&self, rel: &Path) -> SafeRootError {
        SafeRootError::Escape {
            root: self.path.clone(),
            rel: rel.to_path_buf(),
        }
    }

    fn err_symlink(&self, rel: &Path) -> SafeRootError {
        SafeRootError::Symlink {
            root: self.path.clone(),
            rel: rel.to_path_buf(),
        }
    }

    fn err_invalid(&self, rel: &Path, why: &'static str) -> SafeRootError {
        SafeRootError::InvalidPath {
            root: self.path.clone(),
            rel: rel.to_path_buf(),
            why,
        }
    }

    /// Open `rel` (relative; a leading '/' is allowed and means the root) with `flags`
    /// (O_CLOEXEC and, for NoSymlinks, O_NOFOLLOW added) and RESOLVE_NO_MAGICLINKS always.
    pub fn open_at(
        &self,
        rel: &Path,
        how: Resolve,
        flags: OFlag,
        mode: Mode,
    ) -> Result<OwnedFd, SafeRootError> {
        let mut flags = flags | OFlag::O_CLOEXEC;
        if how == Resolve::NoSymlinks {
            flags |= OFlag::O_NOFOLLOW;
        }
        let fd = match self.open_kernel(rel, how, flags, mode) {
            Ok(fd) => fd,
            Err(KernelOpen::Unavailable) => self.open_walk(rel, how, flags, mode)?,
            Err(KernelOpen::Failed(e)) => return Err(e),
        };
        if how == Resolve::NoSymlinks && flags.contains(OFlag::O_PATH) {
            // With O_PATH|O_NOFOLLOW a final symlink is opened itself instead of failing.
            let st =
                nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| self.err_io(rel, "fstat", e))?;
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
                return Err(self.err_symlink(rel));
            }
        }
        Ok(fd)
    }

    /// openat2 with the rule; `Unavailable` when the kernel lacks it or keeps saying EAGAIN.
    fn open_kernel(
        &self,
        rel: &Path,
        how: Resolve,
        flags: OFlag,
        mode: Mode,
    ) -> Result<OwnedFd, KernelOpen> {
        let resolve = ResolveFlag::RESOLVE_NO_MAGICLINKS
            | match how {
                Resolve::NoSymlinks => {
                    ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH
                }
                Resolve::Beneath => ResolveFlag::RESOLVE_BENEATH,
                Resolve::InRoot => ResolveFlag::RESOLVE_IN_ROOT,
            };
        // O_CREAT/O_TMPFILE are the only flags openat2 accepts a mode with.
        let mode = if flags.intersects(OFlag::O_CREAT | OFlag::O_TMPFILE) {
            mode
        } else {
            Mode::empty()
        };
        let open_how = OpenHow::new().flags(flags).mode(mode).resolve(resolve);
        let path = kernel_path(rel);
        for _ in 0..EAGAIN_RETRIES {
            match nix::fcntl::openat2(self.fd.as_raw_fd(), path, open_how) {
                Ok(fd) => return Ok(owned(fd)),
                Err(Errno::EAGAIN) => continue,
                Err(Errno::ENOSYS) => return Err(KernelOpen::Unavailable),
                Err(Errno::EXDEV) => return Err(KernelOpen::Failed(self.err_escape(rel))),
                Err(Errno::ELOOP) if how == Resolve::NoSymlinks => {
                    return Err(KernelOpen::Failed(self.err_symlink(rel)))
                }
                Err(e) => return Err(KernelOpen::Failed(self.err_io(rel, "openat2", e))),
            }
        }
        Err(KernelOpen::Unavailable)
    }

    /// The component walk: same rule as `open_kernel`, done in user space.
    fn open_walk(
        &self,
        rel: &Path,
        how: Resolve,
        flags: OFlag,
        mode: Mode,
    ) -> Result<OwnedFd, SafeRootError> {
        // Components still to resolve, last one first (a stack).
        let mut todo: Vec<OsString> = segments(rel)
            .into_iter()
            .rev()
            .map(OsStr::to_os_string)
            .collect();
        // Directories entered below the root, innermost last; `..` pops.
        let mut dirs: Vec<OwnedFd> = Vec::new();
        let mut links = 0usize;
        let follow_final = !flags.contains(OFlag::O_NOFOLLOW);
        let path_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        while let Some(seg) = todo.pop() {
            let cur = dirs.last().map_or(self.fd.as_raw_fd(), AsRawFd::as_raw_fd);
            if seg == "." {
                continue;
            }
            if seg == ".." {
                if dirs.pop().is_none() && how != Resolve::InRoot {
                    return Err(self.err_escape(rel));
                }
                continue;
            }
            let last = todo.is_empty();
            let fd = match nix::fcntl::openat(Some(cur), seg.as_os_str(), path_flags, Mode::empty())
            {
                Ok(fd) => owned(fd),
                Err(Errno::ENOENT) if last => {
                    return nix::fcntl::openat(
                        Some(cur),
                        seg.as_os_str(),
                        flags | OFlag::O_NOFOLLOW,
                        mode,
                    )
                    .map(owned)
                    .map_err(|e| self.err_io(rel, "openat", e));
                }
                Err(e) => return Err(self.err_io(rel, "openat", e)),
            };
            let st =
                nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| self.err_io(rel, "fstat", e))?;
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFLNK {
                if how == Resolve::NoSymlinks {
                    return Err(self.err_symlink(rel));
                }
                if last && !follow_final {
                    // O_PATH|O_NOFOLLOW opens the link itself; other flags give ELOOP.
                    return nix::fcntl::openat(Some(cur), seg.as_os_str(), flags, mode)
                        .map(owned)
                        .map_err(|e| self.err_io(rel, "openat", e));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(SafeRootError::Loop {
                        root: self.path.clone(),
                        rel: rel.to_path_buf(),
                    });
                }
                let target = nix::fcntl::readlinkat(Some(fd.as_raw_fd()), "")
                    .map_err(|e| self.err_io(rel, "readlinkat", e))?;
                if target.is_empty() {
                    return Err(self.err_io(rel, "readlinkat", Errno::ENOENT));
                }
                if target.as_bytes().first() == Some(&b'/') {
                    if how == Resolve::Beneath {
                        return Err(self.err_escape(rel));
                    }
                    dirs.clear();
                }
                let target_path = Path::new(&target);
                todo.extend(
                    segments(target_path)
                        .into_iter()
                        .rev()
                        .map(OsStr::to_os_string),
                );
                continue;
            }
            if last {
                return nix::fcntl::openat(
                    Some(cur),
                    seg.as_os_str(),
                    flags | OFlag::O_NOFOLLOW,
                    mode,
                )
                .map(owned)
                .map_err(|e| self.err_io(rel, "openat", e));
            }
            if kind != SFlag::S_IFDIR {
                return Err(self.err_io(rel, "openat", Errno::ENOTDIR));
            }
            dirs.push(fd);
        }
        // The path ended on a directory (the root, `.`, `..` or a symlink to a directory).
        let cur = dirs.last().map_or(self.fd.as_raw_fd(), AsRawFd::as_raw_fd);
        nix::fcntl::openat(Some(cur), ".", flags, mode)
            .map(owned)
            .map_err(|e| self.err_io(rel, "openat", e))
    }

    fn open_dir(&self, rel: &Path, how: Resolve) -> Result<OwnedFd, SafeRootError> {
        self.open_at(rel, how, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())
    }

    /// Open directory `rel`, creating each missing component with `perm` by mkdirat on the
    /// parent's fd (never by path); returns an O_PATH|O_DIRECTORY fd of the last one.
    pub fn mkdir_all(
        &self,
        rel: &Path,
        how: Resolve,
        perm: Mode,
    ) -> Result<OwnedFd, SafeRootError> {
        match self.open_dir(rel, how) {
            Err(e) if e.errno() == Errno::ENOENT => {}
            other => return other,
        }
        let mut parent = self.open_dir(Path::new(""), how)?;
        let mut prefix = PathBuf::new();
        for seg in segments(rel) {
            prefix.push(seg);
            parent = match self.open_dir(&prefix, how) {
                Ok(fd) => fd,
                Err(e) if e.errno() == Errno::ENOENT && seg != "." && seg != ".." => {
                    match nix::sys::stat::mkdirat(Some(parent.as_raw_fd()), seg, perm) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.err_io(&prefix, "mkdirat", e)),
                    }
                    self.open_dir(&prefix, how)?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(parent)
    }

    /// The parent directory of `rel` opened (and created with `perm` when `create`), plus the
    /// final component's name (never "", "." or ".."), for *at syscalls on the entry itself.
    pub fn parent_of(
        &self,
        rel: &Path,
        how: Resolve,
        create: Option<Mode>,
    ) -> Result<(OwnedFd, OsString), SafeRootError> {
        let segs = segments(rel);
        let Some((name, parent_segs)) = segs.split_last() else {
            return Err(self.err_invalid(rel, "names the root, not an entry in it"));
        };
        if *name == "." || *name == ".." {
            return Err(self.err_invalid(rel, "ends in . or .."));
        }
        let parent: PathBuf = parent_segs.iter().collect();
        let fd = match create {
            Some(perm) => self.mkdir_all(&parent, how, perm)?,
            None => self.open_dir(&parent, how)?,
        };
        Ok((fd, name.to_os_string()))
    }
}

/// Why `open_kernel` did not give a descriptor.
enum KernelOpen {
    /// No openat2 (ENOSYS) or persistent EAGAIN: use the walk.
    Unavailable,
    /// A real failure.
    Failed(SafeRootError),
}

/// `/proc/self/fd/N` of an fd, for mount(2) sources and targets and *xattr calls.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    /// root/a/b/file plus symlinks of every kind; `out` is a directory outside the root.
    fn fixture() -> (tempfile::TempDir, Root, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let out = t.path().join("out");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(root.join("a/b/file"), b"in").unwrap();
        std::fs::write(out.join("file"), b"out").unwrap();
        symlink("a/b", root.join("rel")).unwrap();
        symlink("/a", root.join("abs")).unwrap();
        symlink("../../../../../a", root.join("up")).unwrap();
        symlink(&out, root.join("out")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        symlink("a/b/file", root.join("fin")).unwrap();
        symlink("b/../../a", root.join("a/inner")).unwrap();
        let r = Root::open(&root).unwrap();
        (t, r, out)
    }

    /// Outcome of an open: the inode opened, or the errno.
    fn outcome(r: Result<OwnedFd, SafeRootError>) -> Result<u64, Errno> {
        r.map(|fd| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino)
            .map_err(|e| e.errno())
    }

    #[test]
    fn open_table_kernel_and_walk_agree() {
        let (_t, r, _out) = fixture();
        let ino = |p: &str| std::fs::symlink_metadata(r.path().join(p)).unwrap().ino();
        let file = Ok(ino("a/b/file"));
        let a = Ok(ino("a"));
        use Resolve::*;
        let cases: Vec<(&str, Resolve, Result<u64, Errno>)> = vec![
            ("a/b/file", NoSymlinks, file),
            ("a/b/file", Beneath, file),
            ("/a/b/file", InRoot, file),
            ("", Beneath, Ok(ino("."))),
            ("a/b/../b/file", Beneath, file),
            ("rel/file", NoSymlinks, Err(Errno::ELOOP)),
            ("rel/file", Beneath, file),
            ("rel/file", InRoot, file),
            ("abs/b/file", NoSymlinks, Err(Errno::ELOOP)),
            ("abs/b/file", Beneath, Err(Errno::EXDEV)),
            ("abs/b/file", InRoot, file),
            ("../a", NoSymlinks, Err(Errno::EXDEV)),
            ("../a", Beneath, Err(Errno::EXDEV)),
            ("../a", InRoot, a),
            ("a/../../a", Beneath, Err(Errno::EXDEV)),
            ("up", Beneath, Err(Errno::EXDEV)),
            ("up", InRoot, a),
            ("a/inner/b/file", Beneath, file),
            ("out/file", Beneath, Err(Errno::EXDEV)),
            ("out/file", InRoot, Err(Errno::ENOENT)),
            ("loop1", Beneath, Err(Errno::ELOOP)),
            ("loop1", InRoot, Err(Errno::ELOOP)),
            ("fin", Beneath, file),
            ("fin", NoSymlinks, Err(Errno::ELOOP)),
            ("a/b/file/x", Beneath, Err(Errno::ENOTDIR)),
            ("a/missing", Beneath, Err(Errno::ENOENT)),
        ];
        for (rel, how, want) in cases {
            for flags in [OFlag::O_PATH, OFlag::O_RDONLY] {
                let kernel = outcome(r.open_at(Path::new(rel), how, flags, Mode::empty()));
                let mut wflags = flags | OFlag::O_CLOEXEC;
                if how == NoSymlinks {
                    wflags |= OFlag::O_NOFOLLOW;
                }
                let walk = r.open_walk(Path::new(rel), how, wflags, Mode::empty());
                let walk = if how == NoSymlinks && flags == OFlag::O_PATH {
                    // open_at's final-symlink check is shared; apply it the same way.
                    match walk {
                        Ok(fd)
                            if SFlag::from_bits_truncate(
                                nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_mode,
                            ) & SFlag::S_IFMT
                                == SFlag::S_IFLNK =>
                        {
                            Err(Errno::ELOOP)
                        }
                        other => outcome(other),
                    }
                } else {
                    outcome(walk)
                };
                assert_eq!(kernel, want, "kernel {rel} {how:?} {flags:?}");
                assert_eq!(walk, want, "walk {rel} {how:?} {flags:?}");
            }
        }
    }

    #[test]
    fn errors_name_the_relative_path() {
        let (_t, r, _out) = fixture();
        let e = r
            .open_at(
                Path::new("abs/b/file"),
                Resolve::Beneath,
                OFlag::O_RDONLY,
                Mode::empty(),
            )
            .unwrap_err();
        assert!(matches!(e, SafeRootError::Escape { .. }), "{e}");
        assert_eq!(e.rel(), Some(Path::new("abs/b/file")));
        assert!(e.to_string().contains("abs/b/file"), "{e}");
        let e = r
            .open_at(
                Path::new("rel/file"),
                Resolve::NoSymlinks,
                OFlag::O_RDONLY,
                Mode::empty(),
            )
            .unwrap_err();
        assert!(matches!(e, SafeRootError::Symlink { .. }), "{e}");
    }

    #[test]
    fn create_through_open_at_stays_inside() {
        let (_t, r, out) = fixture();
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let m = Mode::from_bits_truncate(0o600);
        r.open_at(Path::new("rel/new"), Resolve::Beneath, flags, m)
            .unwrap();
        assert!(r.path().join("a/b/new").exists());
        let e = r
            .open_at(Path::new("out/new"), Resolve::Beneath, flags, m)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EXDEV);
        let e = r
            .open_at(Path::new("out/new"), Resolve::InRoot, flags, m)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::ENOENT);
        assert!(!out.join("new").exists());
        // The walk creates the same way.
        let f = flags | OFlag::O_CLOEXEC;
        r.open_walk(Path::new("rel/new2"), Resolve::Beneath, f, m)
            .unwrap();
        assert!(r.path().join("a/b/new2").exists());
        assert!(r
            .open_walk(Path::new("out/new"), Resolve::Beneath, f, m)
            .is_err());
        assert!(!out.join("new").exists());
    }

    #[test]
    fn mkdir_all_creates_by_fd_and_refuses_escapes() {
        let (_t, r, out) = fixture();
        let perm = Mode::from_bits_truncate(0o755);
        let fd = r
            .mkdir_all(Path::new("n/m/o"), Resolve::Beneath, perm)
            .unwrap();
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
        assert_eq!(
            st.st_ino,
            std::fs::metadata(r.path().join("n/m/o")).unwrap().ino()
        );
        r.mkdir_all(Path::new("rel/c/d"), Resolve::Beneath, perm)
            .unwrap();
        assert!(r.path().join("a/b/c/d").is_dir());
        r.mkdir_all(Path::new("a/b"), Resolve::NoSymlinks, perm)
            .unwrap();
        for (rel, how) in [
            ("out/x/y", Resolve::Beneath),
            ("out/x/y", Resolve::NoSymlinks),
            ("../x", Resolve::Beneath),
            ("rel/x", Resolve::NoSymlinks),
            ("a/b/file/x", Resolve::Beneath),
        ] {
            assert!(r.mkdir_all(Path::new(rel), how, perm).is_err(), "{rel}");
        }
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        assert!(!r.path().parent().unwrap().join("x").exists());
        // InRoot: an absolute symlink resolves inside.
        r.mkdir_all(Path::new("abs/z"), Resolve::InRoot, perm)
            .unwrap();
        assert!(r.path().join("a/z").is_dir());
    }

    #[test]
    fn parent_of_splits_and_confines() {
        let (_t, r, out) = fixture();
        let (fd, name) = r
            .parent_of(Path::new("rel/new"), Resolve::Beneath, None)
            .unwrap();
        assert_eq!(name, "new");
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
        assert_eq!(
            st.st_ino,
            std::fs::metadata(r.path().join("a/b")).unwrap().ino()
        );
        let (_, name) = r
            .parent_of(
                Path::new("/p/q/.wh.x"),
                Resolve::Beneath,
                Some(Mode::from_bits_truncate(0o755)),
            )
            .unwrap();
        assert_eq!(name, ".wh.x");
        assert!(r.path().join("p/q").is_dir());
        assert_eq!(
            r.parent_of(
                Path::new("out/.wh.file"),
                Resolve::Beneath,
                Some(Mode::empty())
            )
            .unwrap_err()
            .errno(),
            Errno::EXDEV
        );
        assert!(out.join("file").exists());
        for bad in ["", "/", "a/..", "a/.", "."] {
            let e = r
                .parent_of(Path::new(bad), Resolve::Beneath, None)
                .unwrap_err();
            assert!(matches!(e, SafeRootError::InvalidPath { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn fd_path_names_the_open_file() {
        let (_t, r, _out) = fixture();
        let fd = r
            .open_at(
                Path::new("a/b"),
                Resolve::Beneath,
                OFlag::O_PATH,
                Mode::empty(),
            )
            .unwrap();
        assert_eq!(
            std::fs::read_link(fd_path(fd.as_fd())).unwrap(),
            r.path().join("a/b")
        );
        let from = Root::from_fd(
            r.open_at(
                Path::new(""),
                Resolve::Beneath,
                OFlag::O_PATH,
                Mode::empty(),
            )
            .unwrap(),
            r.path().to_path_buf(),
        );
        assert!(from
            .open_at(
                Path::new("a/b/file"),
                Resolve::Beneath,
                OFlag::O_RDONLY,
                Mode::empty()
            )
            .is_ok());
        assert!(from.as_fd().as_raw_fd() >= 0);
        assert!(matches!(
            Root::open(&r.path().join("a/b/file")),
            Err(SafeRootError::Root { .. })
        ));
    }
}
