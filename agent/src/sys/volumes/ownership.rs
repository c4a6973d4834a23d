//! fsGroup ownership of pod volumes, as the kubelet's `SetVolumeOwnership`
//! (pkg/volume/volume_linux.go) does it: every entry of the volume gets the group `fsGroup`,
//! directories get the setgid bit (so new files inherit the group), and permission bits are
//! widened for the group: `rw` (0660) on writable volumes, `r` (0440) on read-only ones
//! (configMap, secret, downwardAPI, projected), plus `x` (0110) on directories. Symlinks are
//! re-owned but never chmod-ed (a chmod would follow them).
//!
//! The mode arithmetic and the `OnRootMismatch` check are pure ([`adjusted_mode`],
//! [`requires_change`]); [`set_volume_ownership`] is the effect. It walks descriptor by
//! descriptor and never follows a symlink (directories are opened `O_NOFOLLOW`, other entries
//! are changed with `AT_SYMLINK_NOFOLLOW`), so an entry swapped for a symlink meanwhile is
//! never a way out of the volume.

use hako_shim::saferoot::{fd_path, Resolve, Root};
use k8s_openapi::api::core::v1::Pod;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fchmod, fchmodat, fstat, fstatat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{fchown, fchownat, Gid};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Bits added to every non-symlink entry of a writable volume (`rwMask`).
pub const RW_MASK: u32 = 0o660;
/// Bits added to every non-symlink entry of a read-only volume (`roMask`).
pub const RO_MASK: u32 = 0o440;
/// Bits added to directories on top of the mask (`execMask`).
pub const EXEC_MASK: u32 = 0o110;
/// The setgid bit, set on directories.
pub const SETGID: u32 = 0o2000;
/// Deepest directory nesting walked; deeper trees are an error, not a stack overflow.
pub const MAX_DEPTH: usize = 256;

/// `securityContext.fsGroupChangePolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChangePolicy {
    /// `Always` (the default): walk the whole volume every time.
    #[default]
    Always,
    /// `OnRootMismatch`: skip the walk when the volume root already has the group, the
    /// permission bits and the setgid bit.
    OnRootMismatch,
}

/// The pod's `fsGroup` and its change policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsGroup {
    /// The group id.
    pub gid: u32,
    /// `fsGroupChangePolicy`.
    pub policy: ChangePolicy,
}

impl FsGroup {
    /// The pod's `spec.securityContext.fsGroup` (None when unset or out of range) with its
    /// `fsGroupChangePolicy` (an unknown policy is treated as `Always`, which changes more,
    /// never less).
    pub fn of(pod: &Pod) -> Option<FsGroup> {
        let sc = pod.spec.as_ref()?.security_context.as_ref()?;
        let gid = u32::try_from(sc.fs_group?).ok()?;
        let policy = match sc.fs_group_change_policy.as_deref() {
            Some("OnRootMismatch") => ChangePolicy::OnRootMismatch,
            _ => ChangePolicy::Always,
        };
        Some(FsGroup { gid, policy })
    }
}

/// The mode `changeFilePermission` gives an entry: `mode | mask`, with `x` and setgid added
/// for directories. Symlinks are not chmod-ed at all (callers skip them).
pub fn adjusted_mode(mode: u32, is_dir: bool, readonly: bool) -> u32 {
    let mut mask = if readonly { RO_MASK } else { RW_MASK };
    if is_dir {
        mask |= EXEC_MASK | SETGID;
    }
    (mode & 0o7777) | mask
}

/// `requiresPermissionChange` for `OnRootMismatch`: the volume root needs a walk unless it is
/// a directory owned by the group, with at least the group's bits and setgid.
pub fn requires_change(
    root_gid: u32,
    root_mode: u32,
    is_dir: bool,
    gid: u32,
    readonly: bool,
) -> bool {
    if root_gid != gid || !is_dir {
        return true;
    }
    let want = (if readonly { RO_MASK } else { RW_MASK }) | EXEC_MASK;
    (root_mode & want) != want || root_mode & SETGID == 0
}

/// Why ownership could not be set.
#[derive(Debug, Error)]
pub enum OwnershipError {
    /// The volume root could not be opened as a directory (or is a symlink: ELOOP).
    #[error("opening volume directory {}: {source}", path.display())]
    OpenRoot {
        /// The volume root.
        path: PathBuf,
        /// Error.
        source: nix::Error,
    },
    /// An entry could not be read, re-owned or chmod-ed.
    #[error("setting fsGroup ownership of {}: {what}: {source}", path.display())]
    Entry {
        /// The entry (volume root joined with its relative path, for the message only).
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// Error.
        source: nix::Error,
    },
    /// The tree is nested deeper than [`MAX_DEPTH`].
    #[error("setting fsGroup ownership of {}: nested deeper than {MAX_DEPTH} directories", path.display())]
    TooDeep {
        /// The directory beyond the limit.
        path: PathBuf,
    },
}

/// Sets group ownership and group permission bits on the volume at `dir` and everything in it
/// (see the module docs). Returns false when `OnRootMismatch` found nothing to do.
pub fn set_volume_ownership(
    dir: &Path,
    fs: FsGroup,
    readonly: bool,
) -> Result<bool, OwnershipError> {
    let open_err = |source| OwnershipError::OpenRoot {
        path: dir.to_path_buf(),
        source,
    };
    let is_link = std::fs::symlink_metadata(dir)
        .map_err(|e| {
            open_err(nix::Error::from_raw(
                e.raw_os_error().unwrap_or(nix::libc::EIO),
            ))
        })?
        .file_type()
        .is_symlink();
    if is_link {
        return Err(open_err(nix::Error::ELOOP));
    }
    let root = Root::open(dir).map_err(|e| open_err(e.errno()))?;
    if fs.policy == ChangePolicy::OnRootMismatch {
        let st = fstat(root.as_fd().as_raw_fd()).map_err(open_err)?;
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        if !requires_change(st.st_gid, st.st_mode, is_dir, fs.gid, readonly) {
            return Ok(false);
        }
    }
    walk(&root, Path::new("."), fs.gid, readonly, 0)?;
    Ok(true)
}

/// Re-owns and chmods directory `rel` of `root` (opened with no symlink anywhere in the
/// path), then each entry, descending into subdirectories.
fn walk(
    root: &Root,
    rel: &Path,
    gid: u32,
    readonly: bool,
    depth: usize,
) -> Result<(), OwnershipError> {
    let shown = root.path().join(rel);
    if depth > MAX_DEPTH {
        return Err(OwnershipError::TooDeep { path: shown });
    }
    let entry_err = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| OwnershipError::Entry {
            path: p,
            what,
            source,
        }
    };
    let d = root
        .open_at(
            rel,
            Resolve::NoSymlinks,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(|e| entry_err("open", &shown)(e.errno()))?;
    let fd = d.as_raw_fd();
    let st = fstat(fd).map_err(entry_err("stat", &shown))?;
    fchown(fd, None, Some(Gid::from_raw(gid))).map_err(entry_err("chown", &shown))?;
    let mode = adjusted_mode(st.st_mode, true, readonly);
    fchmod(fd, Mode::from_bits_truncate(mode)).map_err(entry_err("chmod", &shown))?;
    // The listing reads the directory the descriptor holds, whatever its path is now.
    let names: Vec<std::ffi::OsString> = std::fs::read_dir(fd_path(d.as_fd()))
        .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| {
            entry_err("reading directory", &shown)(nix::Error::from_raw(
                e.raw_os_error().unwrap_or(nix::libc::EIO),
            ))
        })?;
    for name in names {
        let child_rel = rel.join(&name);
        let child = root.path().join(&child_rel);
        let name = Path::new(&name);
        let st = fstatat(Some(fd), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(entry_err("stat", &child))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            walk(root, &child_rel, gid, readonly, depth + 1)?;
            continue;
        }
        fchownat(
            Some(fd),
            name,
            None,
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(entry_err("chown", &child))?;
        if kind == SFlag::S_IFLNK {
            continue;
        }
        let mode = adjusted_mode(st.st_mode, false, readonly);
        fchmodat(
            Some(fd),
            name,
            Mode::from_bits_truncate(mode),
            FchmodatFlags::NoFollowSymlink,
        )
        .map_err(entry_err("chmod", &child))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_set_volume_ownership() {
        // (mode, dir, readonly) -> adjusted
        for (mode, dir, ro, want) in [
            (0o400, false, true, 0o440),
            (0o440, false, true, 0o440),
            (0o644, false, true, 0o644),
            (0o600, false, true, 0o640),
            (0o644, false, false, 0o664),
            (0o000, false, false, 0o660),
            (0o755, true, true, 0o2755),
            (0o700, true, false, 0o2770),
            (0o777, true, false, 0o2777),
            (0o1777, true, false, 0o3777),
        ] {
            assert_eq!(
                adjusted_mode(mode, dir, ro),
                want,
                "{mode:o} dir={dir} ro={ro}"
            );
        }
    }

    #[test]
    fn on_root_mismatch() {
        // Matching root: no walk.
        assert!(!requires_change(1001, 0o2775, true, 1001, false));
        assert!(!requires_change(1001, 0o2550, true, 1001, true));
        // Wrong group, missing setgid, missing bits, not a directory.
        assert!(requires_change(0, 0o2775, true, 1001, false));
        assert!(requires_change(1001, 0o775, true, 1001, false));
        assert!(requires_change(1001, 0o2755, true, 1001, false));
        assert!(requires_change(1001, 0o2775, false, 1001, false));
    }

    #[test]
    fn fs_group_of_pod() {
        let p: Pod = serde_yaml::from_str(
            "spec: {containers: [], securityContext: {fsGroup: 1001, fsGroupChangePolicy: OnRootMismatch}}",
        )
        .unwrap();
        assert_eq!(
            FsGroup::of(&p),
            Some(FsGroup {
                gid: 1001,
                policy: ChangePolicy::OnRootMismatch
            })
        );
        let p: Pod =
            serde_yaml::from_str("spec: {containers: [], securityContext: {fsGroup: -1}}").unwrap();
        assert_eq!(FsGroup::of(&p), None);
        let p: Pod = serde_yaml::from_str("spec: {containers: []}").unwrap();
        assert_eq!(FsGroup::of(&p), None);
    }

    /// The walk itself (chown needs root; as another user only the no-op path is checked).
    #[test]
    fn walk_sets_group_bits_and_leaves_symlink_targets_alone() {
        use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let v = t.path().join("v");
        std::fs::create_dir_all(v.join("sub")).unwrap();
        std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(v.join("sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(v.join("sub/f"), "x").unwrap();
        std::fs::set_permissions(v.join("sub/f"), std::fs::Permissions::from_mode(0o400)).unwrap();
        symlink(outside.path(), v.join("escape")).unwrap();
        let fs = FsGroup {
            gid: 4242,
            policy: ChangePolicy::Always,
        };
        assert!(set_volume_ownership(&v, fs, true).unwrap());
        let md = |p: &Path| std::fs::symlink_metadata(p).unwrap();
        assert_eq!(md(&v).gid(), 4242);
        assert_eq!(md(&v).mode() & 0o7777, 0o2755);
        assert_eq!(md(&v.join("sub")).mode() & 0o7777, 0o2750);
        assert_eq!(md(&v.join("sub/f")).gid(), 4242);
        assert_eq!(md(&v.join("sub/f")).mode() & 0o7777, 0o440);
        assert_eq!(md(&v.join("escape")).gid(), 4242, "the link itself");
        let o = md(outside.path());
        assert_eq!(
            (o.gid(), o.mode() & 0o7777),
            (0, 0o600),
            "the target untouched"
        );
        // OnRootMismatch: the root matches now, nothing is walked.
        std::fs::set_permissions(v.join("sub/f"), std::fs::Permissions::from_mode(0o400)).unwrap();
        let lazy = FsGroup {
            policy: ChangePolicy::OnRootMismatch,
            ..fs
        };
        assert!(!set_volume_ownership(&v, lazy, true).unwrap());
        assert_eq!(md(&v.join("sub/f")).mode() & 0o7777, 0o400);
        // A symlink as the volume root is refused.
        let link = t.path().join("link");
        symlink(&v, &link).unwrap();
        assert!(set_volume_ownership(&link, fs, true).is_err());
    }
}
