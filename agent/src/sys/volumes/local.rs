//! `local` PersistentVolumes (effectful), as the kubelet's local volume plugin mounts them in
//! Filesystem mode: the PV's path must exist as a directory; it is bind-mounted onto the pod's
//! volume directory (`ro` when the claim is read-only), and a writable one gets the pod's
//! `fsGroup` ownership with its `fsGroupChangePolicy` once per mount. Teardown is the pod's
//! volume teardown: the bind mount is undone, the data stays on the volume.

use super::{mount, ownership, VolumeError};
use nix::mount::{umount2, MntFlags, MsFlags};
use std::path::Path;

/// Checks that the PV's path is an existing directory (nothing is created: a local volume is
/// prepared by the node's administrator).
pub fn check(volume: &str, pv: &str, path: &Path) -> Result<(), VolumeError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(VolumeError::Invalid {
            volume: volume.to_string(),
            reason: format!(
                "local volume {pv:?}: path {} is not a directory",
                path.display()
            ),
        }),
        Err(e) => Err(VolumeError::Invalid {
            volume: volume.to_string(),
            reason: format!(
                "local volume {pv:?}: path {} does not exist: {e}",
                path.display()
            ),
        }),
    }
}

fn mount_err(path: &Path, message: String) -> VolumeError {
    VolumeError::Mount {
        path: path.to_path_buf(),
        message,
    }
}

/// Bind-mounts `source` onto `target` (made 0750 when missing), read-only when `readonly`,
/// then applies `fs_group` to a writable volume. A target that is already a mount point (an
/// agent restart) is kept as it is. When a step fails the mount is undone.
pub fn set_up(
    volume: &str,
    source: &Path,
    target: &Path,
    readonly: bool,
    fs_group: Option<ownership::FsGroup>,
) -> Result<(), VolumeError> {
    if mount::is_mount_point(target) {
        return Ok(());
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(target)
            .map_err(|e| VolumeError::Io {
                path: target.to_path_buf(),
                what: "creating volume directory".into(),
                source: e,
            })?;
    }
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| mount_err(target, format!("mount --bind {}: {e}", source.display())))?;
    let undo = |err: VolumeError| {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        err
    };
    if readonly {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| undo(mount_err(target, format!("remount read-only: {e}"))))?;
    } else if let Some(fs) = fs_group {
        ownership::set_volume_ownership(target, fs, false).map_err(|e| {
            undo(VolumeError::Invalid {
                volume: volume.to_string(),
                reason: e.to_string(),
            })
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn path_checks() {
        let d = tempfile::tempdir().unwrap();
        check("v", "pv", d.path()).unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(check("v", "pv", &f)
            .unwrap_err()
            .to_string()
            .contains("is not a directory"));
        assert!(check("v", "pv", &d.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    /// Bind mount, read-only remount, fsGroup on the writable one (root only).
    #[test]
    fn bind_read_only_and_fs_group() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("disk");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "data").unwrap();
        let rw = d.path().join("rw");
        let fs = ownership::FsGroup {
            gid: 4243,
            policy: ownership::ChangePolicy::OnRootMismatch,
        };
        set_up("v", &src, &rw, false, Some(fs)).unwrap();
        assert!(mount::is_mount_point(&rw));
        assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "data");
        assert_eq!(std::fs::metadata(src.join("f")).unwrap().gid(), 4243);
        // Again (agent restart): kept, not stacked.
        set_up("v", &src, &rw, false, Some(fs)).unwrap();
        let ro = d.path().join("ro");
        set_up("v", &src, &ro, true, None).unwrap();
        let e = std::fs::write(ro.join("g"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS));
        std::fs::write(rw.join("g"), "y").unwrap();
        mount::unmount_all(d.path()).unwrap();
        assert!(!mount::is_mount_point(&rw) && !mount::is_mount_point(&ro));
        assert_eq!(std::fs::read_to_string(src.join("g")).unwrap(), "y");
    }
}
