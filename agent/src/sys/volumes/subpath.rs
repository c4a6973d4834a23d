//! subPath mounts made the way the kubelet makes them since CVE-2017-1002101 and
//! CVE-2021-25741 (effectful: openat2, mkdirat, mount(2), umount2(2)).
//!
//! A volume's contents belong to the pod: any container that shares the volume may swap a
//! directory for a symlink at any time. So a subPath is never joined to the volume path and
//! mounted by name. Instead [`prepare`]:
//! 1. opens the volume directory and resolves the subPath beneath it
//!    ([`Resolve::Beneath`]: symlinks that stay inside the volume are followed, one that
//!    leaves it is an error), creating missing directories with `mkdirat` on the parent's
//!    descriptor (emptyDir and hostPath only);
//! 2. re-opens the evaluated path with no symlinks allowed at all ([`Resolve::NoSymlinks`])
//!    and checks it is the same inode (so a swap between the two steps is an error);
//! 3. bind-mounts that descriptor (`/proc/self/fd/N`) onto an agent-owned path,
//!    `<root>/pods/<uid>/volume-subpaths/<volume>/<container>/<mount index>`, which becomes the
//!    bind source the runtime sees. Nothing is ever created outside the volume.
//!
//! [`clean_container`] (before a container's mounts are made again) and [`clean_pod`] (pod
//! teardown, also of pods left over from an earlier run) unmount those and remove them with
//! `rmdir`/`unlink`, never recursively, so a mount that could not be undone is never
//! descended into.

use super::mount::{is_mount_point, mounts_under};
use hako_shim::saferoot::{fd_path, Resolve, Root, SafeRootError};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fstat, Mode, SFlag};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Directory of every subPath bind mount of a pod: `<root>/pods/<uid>/volume-subpaths`.
pub fn subpaths_dir(root: &Path, uid: &str) -> PathBuf {
    root.join("pods").join(uid).join("volume-subpaths")
}

/// subPath failures; the Display text names the subPath (it becomes the container's
/// CreateContainerConfigError message).
#[derive(Debug, Error)]
pub enum SubPathError {
    /// The subPath (after symlinks) names something outside the volume.
    #[error("subPath {sub_path:?} resolves outside the volume")]
    Outside {
        /// The subPath as written.
        sub_path: String,
    },
    /// The subPath changed while it was being resolved (a symlink swapped in).
    #[error("subPath {sub_path:?} changed while it was being resolved")]
    Changed {
        /// The subPath as written.
        sub_path: String,
    },
    /// The subPath could not be opened or created inside the volume.
    #[error("subPath {sub_path:?}: {source}")]
    Resolve {
        /// The subPath as written.
        sub_path: String,
        /// Resolution error.
        source: SafeRootError,
    },
    /// A system call on the descriptor or the bind target failed.
    #[error("subPath {sub_path:?}: {op} {}: {errno}", path.display())]
    Sys {
        /// The subPath as written.
        sub_path: String,
        /// Operation.
        op: &'static str,
        /// Path it was done on.
        path: PathBuf,
        /// Error.
        errno: Errno,
    },
    /// A name that cannot be a path component (container or volume name).
    #[error("{what} {name:?} cannot name a subPath mount directory")]
    BadName {
        /// `container` or `volume`.
        what: &'static str,
        /// The name.
        name: String,
    },
}

/// Cleanup failures.
#[derive(Debug, Error)]
pub enum CleanError {
    /// A subPath bind mount could not be undone.
    #[error("unmount subPath mount {}: {errno}", path.display())]
    Unmount {
        /// Mount point.
        path: PathBuf,
        /// Error.
        errno: Errno,
    },
    /// An entry could not be removed (still mounted, not empty, ...).
    #[error("remove {}: {source}", path.display())]
    Remove {
        /// Entry.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
}

/// A name usable as one path component of our own layout.
fn component_ok(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0')
}

fn same_inode(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<bool, Errno> {
    let (x, y) = (fstat(a.as_raw_fd())?, fstat(b.as_raw_fd())?);
    Ok(x.st_dev == y.st_dev && x.st_ino == y.st_ino)
}

fn is_dir(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    let st = fstat(fd.as_raw_fd())?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

/// Opens (`O_PATH`) what `sub_path` names inside the volume directory `volume`, creating
/// missing directories (mode of the volume directory, less the umask) when `create`. See
/// the module docs for the two steps. `sub_path` must already be validated (relative, no
/// `..`).
pub fn open_sub_path(volume: &Path, sub_path: &str, create: bool) -> Result<OwnedFd, SubPathError> {
    let resolve_err = |source: SafeRootError| match source {
        SafeRootError::Escape { .. } => SubPathError::Outside {
            sub_path: sub_path.into(),
        },
        source => SubPathError::Resolve {
            sub_path: sub_path.into(),
            source,
        },
    };
    let sys = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |errno| SubPathError::Sys {
            sub_path: sub_path.into(),
            op,
            path,
            errno,
        }
    };
    let root = Root::open(volume).map_err(resolve_err)?;
    let rel = Path::new(sub_path);
    let first = match root.open_at(rel, Resolve::Beneath, OFlag::O_PATH, Mode::empty()) {
        Err(e) if create && e.errno() == Errno::ENOENT => {
            let st = fstat(root.as_fd().as_raw_fd()).map_err(sys("fstat", volume))?;
            let perm = Mode::from_bits_truncate(st.st_mode & 0o7777);
            root.mkdir_all(rel, Resolve::Beneath, perm)
                .map_err(resolve_err)?
        }
        r => r.map_err(resolve_err)?,
    };
    // Where the kernel found it, relative to the volume (the kubelet's EvalSymlinks).
    let link = |fd: BorrowedFd<'_>| {
        std::fs::read_link(fd_path(fd)).map_err(|e| {
            sys("readlink", volume)(Errno::from_raw(
                e.raw_os_error().unwrap_or(Errno::EIO as i32),
            ))
        })
    };
    let base = link(root.as_fd())?;
    let found = link(first.as_fd())?;
    let evaluated = found
        .strip_prefix(&base)
        .map_err(|_| SubPathError::Outside {
            sub_path: sub_path.into(),
        })?
        .to_path_buf();
    // Open the evaluated path again, refusing every symlink: a swap since step 1 fails here.
    let second = root
        .open_at(
            &evaluated,
            Resolve::NoSymlinks,
            OFlag::O_PATH,
            Mode::empty(),
        )
        .map_err(|e| match e.errno() {
            Errno::ELOOP | Errno::ENOENT | Errno::ENOTDIR | Errno::EXDEV => SubPathError::Changed {
                sub_path: sub_path.into(),
            },
            _ => resolve_err(e),
        })?;
    if !same_inode(first.as_fd(), second.as_fd()).map_err(sys("fstat", volume))? {
        return Err(SubPathError::Changed {
            sub_path: sub_path.into(),
        });
    }
    Ok(second)
}

/// One subPath mount to make.
pub struct SubPathMount<'a> {
    /// Agent root (`--root-dir`).
    pub root: &'a Path,
    /// Pod UID.
    pub uid: &'a str,
    /// Volume name.
    pub volume: &'a str,
    /// Host directory of the volume.
    pub volume_path: &'a Path,
    /// Whether missing directories may be created (emptyDir, hostPath).
    pub create: bool,
    /// Container name.
    pub container: &'a str,
    /// Index of the volumeMount in the container's list.
    pub index: usize,
    /// The subPath (validated: relative, no `..`).
    pub sub_path: &'a str,
}

/// Resolves the subPath inside its volume and bind-mounts it onto
/// `<root>/pods/<uid>/volume-subpaths/<volume>/<container>/<index>`; returns that path (the
/// bind source for the runtime). A mount left there by an earlier start is replaced.
pub fn prepare(m: &SubPathMount) -> Result<PathBuf, SubPathError> {
    for (what, name) in [
        ("pod uid", m.uid),
        ("volume", m.volume),
        ("container", m.container),
    ] {
        if !component_ok(name) {
            return Err(SubPathError::BadName {
                what,
                name: name.into(),
            });
        }
    }
    let fd = open_sub_path(m.volume_path, m.sub_path, m.create)?;
    let sys = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        let sub_path = m.sub_path.to_string();
        move |errno| SubPathError::Sys {
            sub_path,
            op,
            path,
            errno,
        }
    };
    let io_errno =
        |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32));
    let dir = subpaths_dir(m.root, m.uid).join(m.volume).join(m.container);
    std::fs::create_dir_all(&dir).map_err(|e| sys("mkdir", &dir)(io_errno(e)))?;
    let target = dir.join(m.index.to_string());
    unmount_stacked(&target).map_err(|e| match e {
        CleanError::Unmount { path, errno } => sys("umount", &path)(errno),
        CleanError::Remove { path, source } => sys("remove", &path)(io_errno(source)),
    })?;
    let want_dir = is_dir(fd.as_fd()).map_err(sys("fstat", &target))?;
    match std::fs::symlink_metadata(&target) {
        Ok(md) if md.is_dir() == want_dir && !md.file_type().is_symlink() => {}
        Ok(md) => {
            let r = if md.is_dir() {
                std::fs::remove_dir(&target)
            } else {
                std::fs::remove_file(&target)
            };
            r.map_err(|e| sys("remove", &target)(io_errno(e)))?;
            make_target(&target, want_dir).map_err(|e| sys("create", &target)(io_errno(e)))?;
        }
        Err(_) => {
            make_target(&target, want_dir).map_err(|e| sys("create", &target)(io_errno(e)))?
        }
    }
    mount(
        Some(&fd_path(fd.as_fd())),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind mount onto", &target))?;
    Ok(target)
}

fn make_target(target: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        std::fs::create_dir(target)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map(drop)
    }
}

/// Unmounts everything mounted on `p` (mounts may be stacked), lazily.
fn unmount_stacked(p: &Path) -> Result<(), CleanError> {
    for _ in 0..16 {
        if !is_mount_point(p) {
            return Ok(());
        }
        match umount2(p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(errno) => {
                return Err(CleanError::Unmount {
                    path: p.into(),
                    errno,
                })
            }
        }
    }
    if is_mount_point(p) {
        return Err(CleanError::Unmount {
            path: p.into(),
            errno: Errno::EBUSY,
        });
    }
    Ok(())
}

/// Removes one entry of our layout without ever descending into it: `unlink` for a file,
/// `rmdir` for an (empty) directory.
fn remove_entry(p: &Path) -> Result<(), CleanError> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => std::fs::remove_dir(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|source| CleanError::Remove {
        path: p.into(),
        source,
    })
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Unmounts and removes the subPath mounts of one container
/// (`volume-subpaths/*/<container>/*`).
pub fn clean_container(root: &Path, uid: &str, container: &str) -> Result<(), CleanError> {
    if !component_ok(container) || !component_ok(uid) {
        return Ok(());
    }
    for vol in entries(&subpaths_dir(root, uid)) {
        let cdir = vol.join(container);
        for m in entries(&cdir) {
            unmount_stacked(&m)?;
            remove_entry(&m)?;
        }
        remove_entry(&cdir)?;
    }
    Ok(())
}

/// Unmounts and removes every subPath mount of a pod, then `volume-subpaths` itself.
/// Succeeds when it is already gone; fails (leaving the rest in place) when anything stays
/// mounted.
pub fn clean_pod(root: &Path, uid: &str) -> Result<(), CleanError> {
    let dir = subpaths_dir(root, uid);
    for m in mounts_under(&dir) {
        unmount_stacked(&m)?;
    }
    for vol in entries(&dir) {
        for cdir in entries(&vol) {
            for m in entries(&cdir) {
                unmount_stacked(&m)?;
                remove_entry(&m)?;
            }
            remove_entry(&cdir)?;
        }
        remove_entry(&vol)?;
    }
    remove_entry(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolves_inside_and_refuses_escapes() {
        let t = tempfile::tempdir().unwrap();
        let vol = t.path().join("vol");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(vol.join("real/inner")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        symlink("real", vol.join("inlink")).unwrap();
        symlink(&outside, vol.join("abs")).unwrap();
        symlink("../outside", vol.join("rel")).unwrap();
        std::fs::write(vol.join("real/f"), "x").unwrap();

        // In-volume symlinks are followed (configMap keys are symlinks into ..data).
        let fd = open_sub_path(&vol, "inlink/inner", false).unwrap();
        assert_eq!(
            std::fs::read_link(fd_path(fd.as_fd())).unwrap(),
            std::fs::canonicalize(vol.join("real/inner")).unwrap()
        );
        assert!(open_sub_path(&vol, "inlink/f", false).is_ok());

        for sp in ["abs", "rel", "abs/x", "rel/x/y"] {
            let e = open_sub_path(&vol, sp, true).unwrap_err();
            assert!(matches!(e, SubPathError::Outside { .. }), "{sp}: {e}");
            assert!(e.to_string().contains(sp), "{e}");
        }
        assert_eq!(entries(&outside).len(), 0, "nothing created outside");

        // Missing directories are created inside, only when allowed.
        assert!(open_sub_path(&vol, "new/a/b", false).is_err());
        assert!(!vol.join("new").exists());
        open_sub_path(&vol, "new/a/b", true).unwrap();
        assert!(vol.join("new/a/b").is_dir());
        open_sub_path(&vol, "inlink/made", true).unwrap();
        assert!(vol.join("real/made").is_dir());
    }

    #[test]
    fn names_are_checked() {
        for n in ["", ".", "..", "a/b"] {
            assert!(!component_ok(n), "{n:?}");
        }
        assert!(component_ok("c-1"));
    }
}
