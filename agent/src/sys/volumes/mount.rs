//! tmpfs mounts for memory-backed volumes and the mount table reader used to find and undo them
//! (effectful: mount(2), umount2(2), /proc/self/mountinfo; the parser is pure).

use super::VolumeError;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// Decodes the octal escapes (`\040` for space) of a mountinfo path.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (field 5) of a mountinfo text.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Mount points of this process at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Whether `dir` itself is a mount point.
pub fn is_mount_point(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_points(&text).iter().any(|p| p == dir)
}

/// Mounts a tmpfs on `dir` (`size=` when given, mode 0777 like an emptyDir), unless one is
/// already there (re-adoption after an agent restart).
pub fn mount_tmpfs(dir: &Path, size: Option<u64>) -> Result<(), VolumeError> {
    if is_mount_point(dir) {
        return Ok(());
    }
    let mut data = String::from("mode=0777");
    if let Some(s) = size {
        data.push_str(&format!(",size={s}"));
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| VolumeError::Mount {
        path: dir.to_path_buf(),
        message: format!("mount -t tmpfs -o {data}: {e}"),
    })
}

/// Unmounts everything at or below `dir` (deepest first, lazily so a busy reader does not block
/// the teardown).
pub fn unmount_all(dir: &Path) -> Result<(), VolumeError> {
    for m in mounts_under(dir) {
        if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                return Err(VolumeError::Mount {
                    path: m,
                    message: format!("umount: {e}"),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let t = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                 99 22 0:50 / /var/lib/hako/pods/u/volumes/kubernetes.io~secret/my\\040secret rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(t),
            [
                PathBuf::from("/proc"),
                PathBuf::from("/var/lib/hako/pods/u/volumes/kubernetes.io~secret/my secret")
            ]
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }
}
