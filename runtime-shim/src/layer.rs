//! Unpacking of one image layer (gzip, zstd or plain tar) into its own directory in overlayfs
//! form: `.wh.<name>` whiteouts become 0/0 character devices and `.wh..wh..opq` marks its
//! directory opaque (`trusted.overlay.opaque=y`). Ownership, modes (setuid/setgid/sticky
//! included), mtimes and `SCHILY.xattr.*` xattrs are kept; device nodes and FIFOs are created
//! as containerd creates them when running as root.
//!
//! The archive is untrusted. Every entry is created with `*at` system calls on a directory
//! descriptor obtained from a [`saferoot::Root`] on the layer directory with
//! [`Resolve::Beneath`]: a parent path may go through a symlink only while it stays inside
//! the layer, a symlink entry is data (its target is never followed while unpacking), an
//! existing entry is replaced by `unlinkat` on its parent (never through a symlink), a hard
//! link must name a regular file or symlink already unpacked from this layer, and whiteouts,
//! devices and opaque markers are created on descriptors, never through a path. An entry
//! that would leave the layer (`..`, a symlink to an absolute or outside directory, a hard
//! link outside) fails the unpack with a [`LayerError`] naming it.
//!
//! [`classify`] and [`plan`] (what an entry is and what to do with it) are pure; the rest is
//! effectful (root needed for ownership, devices and trusted xattrs).
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;

use crate::saferoot::{self, Resolve, Root, SafeRootError};

/// Mode of parent directories the archive does not list.
const PARENT_MODE: u32 = 0o755;

/// Layer unpack errors. Errors about one entry name it (as written in the archive).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading the archive stream failed.
    #[error("unpack layer into {0}: {1}")]
    Io(PathBuf, io::Error),
    /// An entry path (or hard link target) contains `..` or names nothing.
    #[error("layer entry {0:?} escapes the layer root")]
    BadPath(String),
    /// The compression is not supported.
    #[error("unsupported layer compression ({0})")]
    Compression(&'static str),
    /// The layer directory could not be opened.
    #[error("open layer directory: {0}")]
    Dest(SafeRootError),
    /// Resolving the entry inside the layer failed; an escape (a parent that is a symlink
    /// leaving the layer) ends up here.
    #[error("layer entry {entry:?} refused: {source}")]
    Confined {
        /// The entry name.
        entry: String,
        /// Why.
        source: SafeRootError,
    },
    /// A hard link whose target is not a file unpacked earlier from this layer.
    #[error("layer entry {entry:?}: hard link to {target:?} refused: {why}")]
    Hardlink {
        /// The entry name.
        entry: String,
        /// The link target as written in the archive.
        target: String,
        /// Why.
        why: &'static str,
    },
    /// A header field of the entry is unusable.
    #[error("layer entry {entry:?}: bad header: {source}")]
    Header {
        /// The entry name.
        entry: String,
        /// Why.
        source: io::Error,
    },
    /// Reading the entry's data or writing it into the layer failed.
    #[error("layer entry {entry:?}: write: {source}")]
    Data {
        /// The entry name.
        entry: String,
        /// Why.
        source: io::Error,
    },
    /// A system call on the entry failed.
    #[error("layer entry {entry:?}: {op}: {errno}")]
    Syscall {
        /// The entry name.
        entry: String,
        /// The operation.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
}

impl LayerError {
    /// The archive entry the error is about, if it is about one.
    pub fn entry(&self) -> Option<&str> {
        match self {
            LayerError::BadPath(e)
            | LayerError::Confined { entry: e, .. }
            | LayerError::Hardlink { entry: e, .. }
            | LayerError::Header { entry: e, .. }
            | LayerError::Data { entry: e, .. }
            | LayerError::Syscall { entry: e, .. } => Some(e),
            LayerError::Io(..) | LayerError::Compression(_) | LayerError::Dest(_) => None,
        }
    }
}

/// Compression of a layer, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Detect compression from magic bytes. Pure.
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// What a tar entry name means for overlayfs. Pure.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular entry at this relative path (empty: the layer root itself).
    Regular(PathBuf),
    /// Delete `path` from lower layers.
    Whiteout(PathBuf),
    /// Hide the lower contents of this directory.
    Opaque(PathBuf),
    /// Another `.wh..wh.` metadata name (aufs hard link directories): not unpacked.
    Meta(PathBuf),
}

/// An archive path made relative: leading `/`, empty and `.` components dropped, `..`
/// refused (it is never resolved, even when it would stay inside). Pure.
fn rel_path(name: &[u8]) -> Result<PathBuf, LayerError> {
    let mut rel = PathBuf::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(LayerError::BadPath(lossy(name))),
            c => rel.push(OsStr::from_bytes(c)),
        }
    }
    Ok(rel)
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Classify an entry path (relative, `..` rejected). Pure.
pub fn classify(path: &Path) -> Result<EntryKind, LayerError> {
    let rel = rel_path(path.as_os_str().as_bytes())?;
    let name = rel
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == b".wh..wh..opq" {
        Ok(EntryKind::Opaque(parent))
    } else if name.starts_with(b".wh..wh.") {
        Ok(EntryKind::Meta(rel))
    } else if let Some(rest) = name.strip_prefix(b".wh.") {
        if rest.is_empty() || rest == b"." || rest == b".." {
            return Err(LayerError::BadPath(path.display().to_string()));
        }
        Ok(EntryKind::Whiteout(parent.join(OsStr::from_bytes(rest))))
    } else {
        Ok(EntryKind::Regular(rel))
    }
}

/// Kind of a special file entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// What unpacking one entry does. Paths are relative to the layer root. Pure data.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing (the root directory itself, pax global headers, aufs metadata).
    Skip,
    /// Create the directory, or keep an existing one and update its metadata.
    Dir(PathBuf),
    /// Create a regular file with the entry's data.
    File(PathBuf),
    /// Create a symlink with this target (stored, never followed).
    Symlink(PathBuf, OsString),
    /// Link the (earlier, regular) entry at the second path here.
    Hardlink(PathBuf, PathBuf),
    /// Create a device node or FIFO.
    Node(PathBuf, NodeKind),
    /// Create an overlayfs whiteout (0/0 character device).
    Whiteout(PathBuf),
    /// Mark the directory opaque.
    Opaque(PathBuf),
}

/// Decide what to do with an entry from its raw name, type and link name. Pure.
///
/// Unknown entry types are regular files (POSIX, as the tar crate and GNU tar do); an old
/// header whose name ends in `/` is a directory.
pub fn plan(name: &[u8], ty: tar::EntryType, link: Option<&[u8]>) -> Result<Action, LayerError> {
    use tar::EntryType as T;
    if ty.is_pax_global_extensions()
        || ty.is_pax_local_extensions()
        || ty.is_gnu_longname()
        || ty.is_gnu_longlink()
    {
        return Ok(Action::Skip);
    }
    let rel = match classify(Path::new(OsStr::from_bytes(name)))? {
        EntryKind::Opaque(dir) => return Ok(Action::Opaque(dir)),
        EntryKind::Whiteout(p) => return Ok(Action::Whiteout(p)),
        EntryKind::Meta(_) => return Ok(Action::Skip),
        EntryKind::Regular(rel) => rel,
    };
    let is_dir =
        ty == T::Directory || (name.ends_with(b"/") && !(ty.is_symlink() || ty.is_hard_link()));
    if rel.as_os_str().is_empty() {
        // "./" or "/": the layer root is the store's directory, not the archive's.
        return if is_dir {
            Ok(Action::Skip)
        } else {
            Err(LayerError::BadPath(lossy(name)))
        };
    }
    let link_of = |what: &str| -> Result<&[u8], LayerError> {
        match link {
            Some(l) if !l.is_empty() => Ok(l),
            _ => Err(LayerError::Header {
                entry: lossy(name),
                source: io::Error::other(format!("{what} without a link name")),
            }),
        }
    };
    Ok(match ty {
        _ if is_dir => Action::Dir(rel),
        T::Symlink => Action::Symlink(rel, OsStr::from_bytes(link_of("symlink")?).into()),
        T::Link => {
            let target = rel_path(link_of("hard link")?).map_err(|_| LayerError::Hardlink {
                entry: lossy(name),
                target: lossy(link.unwrap_or_default()),
                why: "its target contains ..",
            })?;
            if target.as_os_str().is_empty() {
                return Err(LayerError::Hardlink {
                    entry: lossy(name),
                    target: lossy(link.unwrap_or_default()),
                    why: "it names the layer root",
                });
            }
            if target == rel {
                Action::Skip
            } else {
                Action::Hardlink(rel, target)
            }
        }
        T::Char => Action::Node(rel, NodeKind::Char),
        T::Block => Action::Node(rel, NodeKind::Block),
        T::Fifo => Action::Node(rel, NodeKind::Fifo),
        _ => Action::File(rel),
    })
}

/// Unpack a layer stream (compression detected) into `dest`, which must exist.
pub fn unpack(src: impl Read, dest: &Path) -> Result<(), LayerError> {
    let io_err = |e| LayerError::Io(dest.to_path_buf(), e);
    let mut br = BufReader::new(src);
    let head = br.fill_buf().map_err(io_err)?.to_vec();
    match detect(&head) {
        Compression::Gzip => unpack_tar(flate2::read::GzDecoder::new(br), dest),
        Compression::None => unpack_tar(br, dest),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(br) {
            Ok(d) => unpack_tar(d, dest),
            Err(_) => Err(LayerError::Compression("zstd")),
        },
    }
}

fn unpack_tar(src: impl Read, dest: &Path) -> Result<(), LayerError> {
    let io_err = |e| LayerError::Io(dest.to_path_buf(), e);
    let root = Root::open(dest).map_err(LayerError::Dest)?;
    let mut u = Unpacker {
        root,
        linkable: HashSet::new(),
        dirs: Vec::new(),
    };
    let mut ar = tar::Archive::new(src);
    for entry in ar.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        u.entry(&mut entry)?;
    }
    u.finish();
    Ok(())
}

/// Ownership, mode, mtime and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: Mode,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(e: &mut tar::Entry<'_, R>, entry: &str) -> Result<Meta, LayerError> {
        let bad = |source| LayerError::Header {
            entry: entry.to_string(),
            source,
        };
        let h = e.header();
        let id = |v: u64| u32::try_from(v).map_err(|_| bad(io::Error::other("id above 2^32")));
        let uid = id(h.uid().map_err(bad)?)?;
        let gid = id(h.gid().map_err(bad)?)?;
        let mode = Mode::from_bits_truncate(h.mode().map_err(bad)? & 0o7777);
        let mtime = TimeSpec::new(
            i64::try_from(h.mtime().map_err(bad)?).unwrap_or(i64::MAX),
            0,
        );
        let mut xattrs = Vec::new();
        if let Ok(Some(exts)) = e.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    if let Ok(k) = CString::new(key) {
                        xattrs.push((k, ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        Ok(Meta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }
}

/// State of one unpack: the layer root, the inodes hard links may name, directories whose
/// mtime is set at the end (creating entries in them changes it).
struct Unpacker {
    root: Root,
    linkable: HashSet<(u64, u64)>,
    dirs: Vec<(PathBuf, (u64, u64), TimeSpec)>,
}

fn ino(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

impl Unpacker {
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), LayerError> {
        let name = e.path_bytes().into_owned();
        let entry = lossy(&name);
        let link = e.link_name_bytes().map(|l| l.into_owned());
        let action = plan(&name, e.header().entry_type(), link.as_deref())?;
        let confined = |source| LayerError::Confined {
            entry: entry.clone(),
            source,
        };
        let sys = |op: &'static str| {
            let entry = entry.clone();
            move |errno| LayerError::Syscall { entry, op, errno }
        };
        let parent_mode = Mode::from_bits_truncate(PARENT_MODE);
        match action {
            Action::Skip => {}
            Action::Opaque(dir) => {
                self.root
                    .mkdir_all(&dir, Resolve::Beneath, parent_mode)
                    .map_err(confined)?;
                let fd = self
                    .root
                    .open_at(
                        &dir,
                        Resolve::Beneath,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                        Mode::empty(),
                    )
                    .map_err(confined)?;
                fsetxattr(fd.as_fd(), c"trusted.overlay.opaque", b"y")
                    .map_err(sys("set trusted.overlay.opaque"))?;
            }
            Action::Whiteout(path) => {
                let (dir, name) = self.parent(&path, &entry)?;
                remove_at(dir.as_fd(), &name).map_err(sys("remove existing"))?;
                nix::sys::stat::mknodat(
                    Some(dir.as_raw_fd()),
                    name.as_os_str(),
                    SFlag::S_IFCHR,
                    Mode::empty(),
                    0,
                )
                .map_err(sys("mknodat whiteout"))?;
            }
            Action::Dir(path) => {
                let meta = Meta::read(e, &entry)?;
                let (dir, name) = self.parent(&path, &entry)?;
                let exists = lstat_at(dir.as_fd(), &name).map_err(sys("fstatat"))?;
                match exists {
                    Some(st) if file_type(&st) == SFlag::S_IFDIR => {}
                    other => {
                        if other.is_some() {
                            remove_at(dir.as_fd(), &name).map_err(sys("remove existing"))?;
                        }
                        nix::sys::stat::mkdirat(
                            Some(dir.as_raw_fd()),
                            name.as_os_str(),
                            Mode::from_bits_truncate(0o700),
                        )
                        .map_err(sys("mkdirat"))?;
                    }
                }
                let fd = open_child(
                    dir.as_fd(),
                    &name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                    Mode::empty(),
                )
                .map_err(sys("open directory"))?;
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(sys("fstat"))?;
                meta_on_fd(fd.as_fd(), &meta, false, &entry)?;
                self.dirs.push((path, ino(&st), meta.mtime));
            }
            Action::File(path) => {
                let meta = Meta::read(e, &entry)?;
                let (dir, name) = self.parent(&path, &entry)?;
                remove_at(dir.as_fd(), &name).map_err(sys("remove existing"))?;
                let fd = open_child(
                    dir.as_fd(),
                    &name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(sys("create file"))?;
                let mut file = std::fs::File::from(fd);
                io::copy(e, &mut file).map_err(|source| LayerError::Data {
                    entry: entry.clone(),
                    source,
                })?;
                let st = nix::sys::stat::fstat(file.as_raw_fd()).map_err(sys("fstat"))?;
                meta_on_fd(file.as_fd(), &meta, true, &entry)?;
                self.linkable.insert(ino(&st));
            }
            Action::Symlink(path, target) => {
                let meta = Meta::read(e, &entry)?;
                let (dir, name) = self.parent(&path, &entry)?;
                remove_at(dir.as_fd(), &name).map_err(sys("remove existing"))?;
                nix::unistd::symlinkat(target.as_os_str(), Some(dir.as_raw_fd()), name.as_os_str())
                    .map_err(sys("symlinkat"))?;
                let st = self.meta_on_node(dir.as_fd(), &name, SFlag::S_IFLNK, &meta, &entry)?;
                self.linkable.insert(ino(&st));
            }
            Action::Node(path, kind) => {
                let meta = Meta::read(e, &entry)?;
                let h = e.header();
                let bad = |source| LayerError::Header {
                    entry: entry.clone(),
                    source,
                };
                let (major, minor) = if kind == NodeKind::Fifo {
                    (0, 0)
                } else {
                    (
                        h.device_major().map_err(bad)?.unwrap_or(0),
                        h.device_minor().map_err(bad)?.unwrap_or(0),
                    )
                };
                let sflag = match kind {
                    NodeKind::Char => SFlag::S_IFCHR,
                    NodeKind::Block => SFlag::S_IFBLK,
                    NodeKind::Fifo => SFlag::S_IFIFO,
                };
                let (dir, name) = self.parent(&path, &entry)?;
                remove_at(dir.as_fd(), &name).map_err(sys("remove existing"))?;
                nix::sys::stat::mknodat(
                    Some(dir.as_raw_fd()),
                    name.as_os_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )
                .map_err(sys("mknodat"))?;
                self.meta_on_node(dir.as_fd(), &name, sflag, &meta, &entry)?;
            }
            Action::Hardlink(path, target) => {
                let refuse = |why| LayerError::Hardlink {
                    entry: entry.clone(),
                    target: lossy(link.as_deref().unwrap_or_default()),
                    why,
                };
                let (tdir, tname) = self
                    .root
                    .parent_of(&target, Resolve::Beneath, None)
                    .map_err(|e| match e.errno() {
                        Errno::ENOENT | Errno::ENOTDIR => refuse("no such entry in this layer"),
                        _ => confined(e),
                    })?;
                let st = lstat_at(tdir.as_fd(), &tname)
                    .map_err(sys("fstatat link target"))?
                    .ok_or_else(|| refuse("no such entry in this layer"))?;
                let t = file_type(&st);
                if !(t == SFlag::S_IFREG || t == SFlag::S_IFLNK) {
                    return Err(refuse("not a regular file or symlink"));
                }
                if !self.linkable.contains(&ino(&st)) {
                    return Err(refuse("not unpacked from this layer"));
                }
                let (dir, name) = self.parent(&path, &entry)?;
                if let Some(cur) = lstat_at(dir.as_fd(), &name).map_err(sys("fstatat"))? {
                    if ino(&cur) == ino(&st) {
                        return Ok(());
                    }
                    remove_at(dir.as_fd(), &name).map_err(sys("remove existing"))?;
                }
                nix::unistd::linkat(
                    Some(tdir.as_raw_fd()),
                    tname.as_os_str(),
                    Some(dir.as_raw_fd()),
                    name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(sys("linkat"))?;
            }
        }
        Ok(())
    }

    /// The entry's parent directory (created with [`PARENT_MODE`] when missing, beneath the
    /// layer root) and its own name.
    fn parent(&self, path: &Path, entry: &str) -> Result<(OwnedFd, OsString), LayerError> {
        self.root
            .parent_of(
                path,
                Resolve::Beneath,
                Some(Mode::from_bits_truncate(PARENT_MODE)),
            )
            .map_err(|source| LayerError::Confined {
                entry: entry.to_string(),
                source,
            })
    }

    /// Ownership, xattrs, mode (not for symlinks) and mtime of a node just created in `dir`
    /// (symlink, device, FIFO), through an `O_PATH|O_NOFOLLOW` descriptor of the node itself.
    fn meta_on_node(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        want: SFlag,
        meta: &Meta,
        entry: &str,
    ) -> Result<FileStat, LayerError> {
        let sys = |op: &'static str| {
            move |errno| LayerError::Syscall {
                entry: entry.to_string(),
                op,
                errno,
            }
        };
        let fd = open_child(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(sys("open node"))?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(sys("fstat"))?;
        if file_type(&st) != want {
            return Err(sys("fstat")(Errno::EEXIST));
        }
        nix::unistd::fchownat(
            Some(fd.as_raw_fd()),
            "",
            Some(meta.uid.into()),
            Some(meta.gid.into()),
            AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(sys("fchownat"))?;
        // /proc/self/fd/N of an O_PATH descriptor resolves to the node itself, also for a
        // symlink (the magic link is not followed further).
        let p = saferoot::fd_path(fd.as_fd());
        for (k, v) in &meta.xattrs {
            xattr_result(setxattr_path(&p, k, v), k, want, entry)?;
        }
        if want != SFlag::S_IFLNK {
            nix::sys::stat::fchmodat(
                None,
                &p,
                meta.mode,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(sys("chmod"))?;
        }
        nix::sys::stat::utimensat(
            None,
            &p,
            &meta.mtime,
            &meta.mtime,
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        )
        .map_err(sys("utimensat"))?;
        Ok(st)
    }

    /// Directory mtimes, last, on the directories the archive listed that are still there.
    fn finish(self) {
        for (path, id, mtime) in &self.dirs {
            let Ok(fd) = self.root.open_at(
                path,
                Resolve::Beneath,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
            ) else {
                continue;
            };
            match nix::sys::stat::fstat(fd.as_raw_fd()) {
                Ok(st) if ino(&st) == *id => {}
                _ => continue,
            }
            let p = saferoot::fd_path(fd.as_fd());
            if let Err(e) = nix::sys::stat::utimensat(
                None,
                &p,
                mtime,
                mtime,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            ) {
                tracing::warn!(dir = %path.display(), error = %e, "layer directory mtime not set");
            }
        }
    }
}

/// Ownership, xattrs, mode (after chown, which clears setuid) and, for files, mtime through
/// an open descriptor.
fn meta_on_fd(fd: BorrowedFd<'_>, meta: &Meta, times: bool, entry: &str) -> Result<(), LayerError> {
    let sys = |op: &'static str| {
        move |errno| LayerError::Syscall {
            entry: entry.to_string(),
            op,
            errno,
        }
    };
    nix::unistd::fchown(fd.as_raw_fd(), Some(meta.uid.into()), Some(meta.gid.into()))
        .map_err(sys("fchown"))?;
    let kind = if times {
        SFlag::S_IFREG
    } else {
        SFlag::S_IFDIR
    };
    for (k, v) in &meta.xattrs {
        xattr_result(fsetxattr(fd, k, v), k, kind, entry)?;
    }
    nix::sys::stat::fchmod(fd.as_raw_fd(), meta.mode).map_err(sys("fchmod"))?;
    if times {
        nix::sys::stat::futimens(fd.as_raw_fd(), &meta.mtime, &meta.mtime)
            .map_err(sys("futimens"))?;
    }
    Ok(())
}

/// An xattr the file system cannot hold (ENOTSUP), or a `user.` one on a node that cannot
/// have them (EPERM), is skipped with a warning as containerd does; other errors fail.
fn xattr_result(
    r: Result<(), Errno>,
    key: &CString,
    kind: SFlag,
    entry: &str,
) -> Result<(), LayerError> {
    match r {
        Ok(()) => Ok(()),
        Err(Errno::ENOTSUP) => {
            tracing::warn!(entry, key = ?key, "xattr not supported here, skipped");
            Ok(())
        }
        Err(Errno::EPERM)
            if key.as_bytes().starts_with(b"user.")
                && kind != SFlag::S_IFREG
                && kind != SFlag::S_IFDIR =>
        {
            tracing::warn!(entry, key = ?key, "user xattr on a special file, skipped");
            Ok(())
        }
        Err(errno) => Err(LayerError::Syscall {
            entry: entry.to_string(),
            op: "setxattr",
            errno,
        }),
    }
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC)` for one component.
fn open_child(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )?;
    // SAFETY: `fd` was just returned by a successful openat and is owned by nothing else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, `None` when absent.
fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<FileStat>, Errno> {
    match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remove whatever is at `name` in `dir` (a directory with its contents), never following
/// a symlink: tar overwrite semantics for a later entry with the same name. Depth-first
/// without recursion (a hostile tree can be deep); one descriptor per level is held.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if file_type(&st) != SFlag::S_IFDIR {
        return nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    // Each level: the directory, its name in the level below, subdirectories still to go.
    let mut stack = vec![enter_dir(dir, name)?];
    loop {
        let next = match stack.last_mut() {
            None => return Ok(()),
            Some(top) => match top.pending.pop() {
                Some(sub) => Some(enter_dir(top.fd.as_fd(), &sub)?),
                None => None,
            },
        };
        match next {
            Some(level) => stack.push(level),
            None => {
                let Some(done) = stack.pop() else {
                    return Ok(());
                };
                drop(done.fd);
                let parent = stack.last().map_or(dir, |l| l.fd.as_fd());
                nix::unistd::unlinkat(
                    Some(parent.as_raw_fd()),
                    done.name.as_os_str(),
                    nix::unistd::UnlinkatFlags::RemoveDir,
                )?;
            }
        }
    }
}

/// A directory being emptied by [`remove_at`].
struct Level {
    fd: OwnedFd,
    name: OsString,
    pending: Vec<OsString>,
}

/// Open directory `name` in `dir`, unlink everything in it but subdirectories and return
/// those as pending.
fn enter_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Level, Errno> {
    let fd = open_child(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    let io = |e: io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    // Listing through /proc/self/fd of our own descriptor reads exactly that directory.
    let names: Vec<OsString> = std::fs::read_dir(saferoot::fd_path(fd.as_fd()))
        .map_err(io)?
        .map(|d| d.map(|d| d.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    let mut pending = Vec::new();
    for n in names {
        match lstat_at(fd.as_fd(), &n)? {
            Some(st) if file_type(&st) == SFlag::S_IFDIR => pending.push(n),
            Some(_) => nix::unistd::unlinkat(
                Some(fd.as_raw_fd()),
                n.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )?,
            None => {}
        }
    }
    Ok(Level {
        fd,
        name: name.to_os_string(),
        pending,
    })
}

/// fsetxattr(2) on an open (not O_PATH) descriptor.
fn fsetxattr(fd: BorrowedFd<'_>, key: &std::ffi::CStr, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: `fd` is a live descriptor, `key` is NUL-terminated, `value` is a live buffer
    // of `value.len()` bytes; all outlive the call.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// setxattr(2) following the path (used on `/proc/self/fd/N` only).
fn setxattr_path(path: &Path, key: &std::ffi::CStr, value: &[u8]) -> Result<(), Errno> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `p` and `key` are NUL-terminated and `value` is a live buffer of
    // `value.len()` bytes; all outlive the call.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn classify_table() {
        for (p, want) in [
            ("etc/passwd", EntryKind::Regular("etc/passwd".into())),
            ("./a/.wh.b", EntryKind::Whiteout("a/b".into())),
            ("a/.wh..wh..opq", EntryKind::Opaque("a".into())),
            (".wh..wh..opq", EntryKind::Opaque("".into())),
            ("a/.wh..wh.plnk", EntryKind::Meta("a/.wh..wh.plnk".into())),
            ("/x", EntryKind::Regular("x".into())),
            ("a//./b/", EntryKind::Regular("a/b".into())),
            ("./", EntryKind::Regular("".into())),
        ] {
            assert_eq!(classify(Path::new(p)).unwrap(), want, "{p}");
        }
        for bad in [
            "../etc",
            "a/../../b",
            "a/..",
            "x/../.wh.y",
            "a/.wh.",
            "a/.wh..",
            "a/.wh...",
        ] {
            assert!(
                matches!(classify(Path::new(bad)), Err(LayerError::BadPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn plan_table() {
        use tar::EntryType as T;
        let p = |s: &str| PathBuf::from(s);
        for (name, ty, link, want) in [
            ("a/", T::Directory, None, Action::Dir(p("a"))),
            ("a/", T::Regular, None, Action::Dir(p("a"))),
            ("./", T::Directory, None, Action::Skip),
            ("a/f", T::Regular, None, Action::File(p("a/f"))),
            ("a/f", T::Continuous, None, Action::File(p("a/f"))),
            ("a/f", T::new(b'Z'), None, Action::File(p("a/f"))),
            (
                "x",
                T::Symlink,
                Some("/etc/shadow"),
                Action::Symlink(p("x"), "/etc/shadow".into()),
            ),
            (
                "x",
                T::Symlink,
                Some("../../.."),
                Action::Symlink(p("x"), "../../..".into()),
            ),
            (
                "h",
                T::Link,
                Some("/a/f"),
                Action::Hardlink(p("h"), p("a/f")),
            ),
            ("h", T::Link, Some("h"), Action::Skip),
            ("d", T::Char, None, Action::Node(p("d"), NodeKind::Char)),
            ("d", T::Block, None, Action::Node(p("d"), NodeKind::Block)),
            ("d", T::Fifo, None, Action::Node(p("d"), NodeKind::Fifo)),
            ("x/.wh.s", T::Symlink, Some("/"), Action::Whiteout(p("x/s"))),
            ("x/.wh..wh..opq", T::Regular, None, Action::Opaque(p("x"))),
            ("g", T::XGlobalHeader, None, Action::Skip),
        ] {
            assert_eq!(
                plan(name.as_bytes(), ty, link.map(str::as_bytes)).unwrap(),
                want,
                "{name} {ty:?}"
            );
        }
        for (name, ty, link) in [
            ("../x", T::Regular, None),
            ("h", T::Link, Some("../../etc/passwd")),
            ("h", T::Link, Some("/")),
            ("h", T::Link, None),
            ("s", T::Symlink, Some("")),
            (".", T::Regular, None),
        ] {
            let e = plan(name.as_bytes(), ty, link.map(str::as_bytes)).unwrap_err();
            assert!(e.entry().is_some(), "{name}: {e}");
        }
    }

    /// One raw tar entry: name, type, link name, data.
    type RawEntry<'a> = (&'a str, tar::EntryType, Option<&'a str>, &'a [u8]);

    /// A tar of raw entries, owned by the caller's ids.
    fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, ty, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_size(data.len() as u64);
            h.set_mode(if ty.is_dir() { 0o755 } else { 0o644 });
            h.set_mtime(1_000_000);
            h.set_uid(nix::unistd::getuid().as_raw().into());
            h.set_gid(nix::unistd::getgid().as_raw().into());
            // Raw names (`..` included) go into the header bytes directly.
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A layer dir next to a host dir with a sentinel file; both in one tempdir.
    struct Scene {
        _t: tempfile::TempDir,
        layer: PathBuf,
        host: PathBuf,
    }

    fn scene() -> Scene {
        let t = tempfile::tempdir().unwrap();
        let layer = t.path().join("layer");
        let host = t.path().join("host");
        std::fs::create_dir(&layer).unwrap();
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("secret"), b"s").unwrap();
        Scene { _t: t, layer, host }
    }

    fn host_unchanged(s: &Scene) {
        let names: Vec<_> = std::fs::read_dir(&s.host)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("secret")]);
        let m = std::fs::symlink_metadata(s.host.join("secret")).unwrap();
        assert!(m.is_file());
        assert_eq!(std::fs::read(s.host.join("secret")).unwrap(), b"s");
    }

    #[test]
    fn unpacks_every_compression() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(nix::unistd::getuid().as_raw().into());
        h.set_gid(nix::unistd::getgid().as_raw().into());
        b.append_data(&mut h, "a/f", &b"hi"[..]).unwrap();
        let plain = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&plain[..], 1).unwrap();
        for data in [plain.clone(), gz, zst] {
            let d = tempfile::tempdir().unwrap();
            unpack(&data[..], d.path()).unwrap();
            assert_eq!(std::fs::read(d.path().join("a/f")).unwrap(), b"hi");
        }
    }

    #[test]
    fn unpacks_files_dirs_links_and_metadata() {
        use tar::EntryType as T;
        let s = scene();
        let data = raw_tar(&[
            ("d/", T::Directory, None, b""),
            ("d/f", T::Regular, None, b"one"),
            ("d/l", T::Symlink, Some("/nowhere/at/all"), b""),
            ("d/rel", T::Symlink, Some("f"), b""),
            ("via/", T::Directory, None, b""),
            ("d/h", T::Link, Some("d/f"), b""),
            // A later entry with the same name replaces the earlier one, also a symlink.
            ("d/l", T::Regular, None, b"two"),
            ("d/f2", T::Symlink, Some("/host"), b""),
            ("d/f2", T::Regular, None, b"three"),
            // A parent through a symlink that stays inside is followed.
            ("inside", T::Symlink, Some("via"), b""),
            ("inside/x", T::Regular, None, b"in"),
            ("p", T::Fifo, None, b""),
        ]);
        unpack(&data[..], &s.layer).unwrap();
        let l = &s.layer;
        assert_eq!(std::fs::read(l.join("d/f")).unwrap(), b"one");
        assert_eq!(std::fs::read(l.join("d/l")).unwrap(), b"two");
        assert_eq!(std::fs::read(l.join("d/f2")).unwrap(), b"three");
        assert_eq!(std::fs::read_link(l.join("d/rel")).unwrap(), Path::new("f"));
        assert_eq!(std::fs::read(l.join("via/x")).unwrap(), b"in");
        let f = std::fs::metadata(l.join("d/f")).unwrap();
        let h = std::fs::metadata(l.join("d/h")).unwrap();
        assert_eq!((f.ino(), f.nlink()), (h.ino(), 2));
        assert_eq!(f.mode() & 0o7777, 0o644);
        assert_eq!(f.mtime(), 1_000_000);
        assert_eq!(std::fs::metadata(l.join("d")).unwrap().mtime(), 1_000_000);
        assert_eq!(
            std::fs::symlink_metadata(l.join("inside")).unwrap().mtime(),
            1_000_000
        );
        assert!(std::fs::symlink_metadata(l.join("p"))
            .unwrap()
            .file_type()
            .is_fifo());
        host_unchanged(&s);
    }

    /// `getxattr` without following a final symlink; `None` when absent.
    fn get_xattr(p: &Path, key: &std::ffi::CStr) -> Option<Vec<u8>> {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let mut v = vec![0u8; 256];
        // SAFETY: NUL-terminated strings and a live buffer of `v.len()` bytes.
        let n =
            unsafe { libc::lgetxattr(c.as_ptr(), key.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        let n = usize::try_from(n).ok()?;
        v.truncate(n);
        Some(v)
    }

    #[test]
    fn xattrs_from_pax_headers_land_on_the_entry_itself() {
        use tar::EntryType as T;
        let s = scene();
        let root = nix::unistd::geteuid().is_root();
        let mut b = tar::Builder::new(Vec::new());
        let entry = |b: &mut tar::Builder<Vec<u8>>, name: &str, ty: T, link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(ty);
            h.set_size(if ty == T::Regular { 1 } else { 0 });
            h.set_mode(0o644);
            h.set_mtime(1_000_000);
            h.set_uid(nix::unistd::getuid().as_raw().into());
            h.set_gid(nix::unistd::getgid().as_raw().into());
            match link {
                Some(l) => b.append_link(&mut h, name, l).unwrap(),
                None => {
                    let data: &[u8] = if ty == T::Regular { b"x" } else { b"" };
                    b.append_data(&mut h, name, data).unwrap();
                }
            }
        };
        b.append_pax_extensions([("SCHILY.xattr.user.hako", &b"file"[..])])
            .unwrap();
        entry(&mut b, "f", T::Regular, None);
        b.append_pax_extensions([("SCHILY.xattr.user.hako", &b"dir"[..])])
            .unwrap();
        entry(&mut b, "d", T::Directory, None);
        // On a symlink to the host: set on the link (trusted.* as root), never its target;
        // a user.* one is not possible on a symlink and is skipped.
        let host = s.host.join("secret");
        let mut exts: Vec<(&str, &[u8])> = vec![("SCHILY.xattr.user.hako", b"link")];
        if root {
            exts.push(("SCHILY.xattr.trusted.hako", b"link"));
        }
        b.append_pax_extensions(exts).unwrap();
        entry(&mut b, "l", T::Symlink, Some(host.to_str().unwrap()));
        let data = b.into_inner().unwrap();
        unpack(&data[..], &s.layer).unwrap();
        let k = c"user.hako";
        assert_eq!(
            get_xattr(&s.layer.join("f"), k).as_deref(),
            Some(&b"file"[..])
        );
        assert_eq!(
            get_xattr(&s.layer.join("d"), k).as_deref(),
            Some(&b"dir"[..])
        );
        assert_eq!(get_xattr(&s.layer.join("l"), k), None);
        if root {
            assert_eq!(
                get_xattr(&s.layer.join("l"), c"trusted.hako").as_deref(),
                Some(&b"link"[..])
            );
        }
        assert_eq!(get_xattr(&host, c"trusted.hako"), None);
        assert_eq!(get_xattr(&host, k), None);
        host_unchanged(&s);
    }

    #[test]
    fn a_later_entry_replaces_a_directory_tree_without_following_symlinks() {
        use tar::EntryType as T;
        let s = scene();
        let host = s.host.to_str().unwrap().to_string();
        let deep = "t/".to_string() + &"d/".repeat(300);
        let deep_file = format!("{deep}f");
        let data = raw_tar(&[
            ("t/", T::Directory, None, b""),
            ("t/a", T::Regular, None, b"a"),
            ("t/out", T::Symlink, Some(&host), b""),
            ("t/sub/", T::Directory, None, b""),
            ("t/sub/x", T::Symlink, Some(&host), b""),
            ("t", T::Regular, None, b"file now"),
        ]);
        // Long names need GNU long-name headers: build the deep part with the tar crate.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(nix::unistd::getuid().as_raw().into());
        h.set_gid(nix::unistd::getgid().as_raw().into());
        b.append_data(&mut h, &deep_file, &b"z"[..]).unwrap();
        let mut deep_tar = b.into_inner().unwrap();
        deep_tar.truncate(deep_tar.len() - 1024);
        deep_tar.extend_from_slice(&data);
        unpack(&deep_tar[..], &s.layer).unwrap();
        assert_eq!(std::fs::read(s.layer.join("t")).unwrap(), b"file now");
        host_unchanged(&s);
    }

    #[test]
    fn refuses_escapes_and_names_the_entry() {
        use tar::EntryType as T;
        let s = scene();
        let host = s.host.to_str().unwrap().to_string();
        let secret = format!("{host}/secret");
        let cases: Vec<(Vec<RawEntry<'_>>, &str)> = vec![
            // Whiteout through a symlink to a host directory.
            (
                vec![
                    ("x", T::Symlink, Some(&host), b""),
                    ("x/.wh.secret", T::Regular, None, b""),
                ],
                "x/.wh.secret",
            ),
            // Opaque marker through a symlink.
            (
                vec![
                    ("x", T::Symlink, Some(&host), b""),
                    ("x/.wh..wh..opq", T::Regular, None, b""),
                ],
                "x/.wh..wh..opq",
            ),
            // A file through a symlink.
            (
                vec![
                    ("x", T::Symlink, Some(&host), b""),
                    ("x/secret", T::Regular, None, b"pwned"),
                ],
                "x/secret",
            ),
            // Relative symlink leaving with `..`.
            (
                vec![
                    ("x", T::Symlink, Some("../host"), b""),
                    ("x/new", T::Regular, None, b"pwned"),
                ],
                "x/new",
            ),
            // Chain: a -> /b (absolute, refused even though b is inside), b -> host.
            (
                vec![
                    ("b", T::Symlink, Some(&host), b""),
                    ("a", T::Symlink, Some("/b"), b""),
                    ("a/new", T::Regular, None, b"pwned"),
                ],
                "a/new",
            ),
            // Hard links to a host path, absolute or with `..`.
            (vec![("h", T::Link, Some(&secret), b"")], "h"),
            (vec![("h", T::Link, Some("../host/secret"), b"")], "h"),
            (
                vec![
                    ("x", T::Symlink, Some(&host), b""),
                    ("h", T::Link, Some("x/secret"), b""),
                ],
                "h",
            ),
            // `..` names.
            (
                vec![("../host/secret", T::Regular, None, b"pwned")],
                "../host/secret",
            ),
            (
                vec![("a/../../host/new", T::Directory, None, b"")],
                "a/../../host/new",
            ),
            // A device node through a symlink.
            (
                vec![
                    ("x", T::Symlink, Some(&host), b""),
                    ("x/null", T::Fifo, None, b""),
                ],
                "x/null",
            ),
        ];
        for (entries, bad) in cases {
            let d = tempfile::tempdir_in(s.layer.parent().unwrap()).unwrap();
            let e = unpack(&raw_tar(&entries)[..], d.path()).unwrap_err();
            assert_eq!(e.entry(), Some(bad), "{e}");
            assert!(e.to_string().contains(bad), "{e}");
            host_unchanged(&s);
        }
        // A hard link to a file that exists in the layer dir but not from this archive.
        std::fs::write(s.layer.join("pre"), b"p").unwrap();
        let e = unpack(&raw_tar(&[("h", T::Link, Some("pre"), b"")])[..], &s.layer).unwrap_err();
        assert!(matches!(e, LayerError::Hardlink { .. }), "{e}");
    }

    #[test]
    fn whiteout_opaque_and_devices_as_root() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        use tar::EntryType as T;
        let s = scene();
        let mut data = raw_tar(&[
            ("a/", T::Directory, None, b""),
            ("a/.wh.gone", T::Regular, None, b""),
            ("a/.wh..wh..opq", T::Regular, None, b""),
            ("b/.wh.x", T::Regular, None, b""),
        ]);
        // A device node entry with numbers 1,3 (appended before the end-of-archive blocks).
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(T::Char);
        h.set_path("null").unwrap();
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_mode(0o4666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_000_000);
        h.set_size(0);
        h.set_cksum();
        data.truncate(data.len() - 1024);
        data.extend_from_slice(h.as_bytes());
        data.extend_from_slice(&[0u8; 1024]);
        unpack(&data[..], &s.layer).unwrap();
        let wh = std::fs::symlink_metadata(s.layer.join("a/gone")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(s.layer.join("b/x").symlink_metadata().is_ok());
        let mut v = [0u8; 4];
        let p = CString::new(s.layer.join("a").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a 4-byte buffer that outlive the call.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                v.len(),
            )
        };
        assert_eq!((n, v[0]), (1, b'y'));
        let null = std::fs::symlink_metadata(s.layer.join("null")).unwrap();
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o4666);
        host_unchanged(&s);
    }
}
