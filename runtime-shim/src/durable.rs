//! Durable replacement of a small file (effectful): the one helper every state file that must
//! survive a crash goes through, in the shim and in the agent. The data is written to a new
//! temporary file beside the target (created with the final mode, `O_EXCL`), fsynced, renamed
//! over the target, and the directory is fsynced, so after a crash the path holds either the
//! old content or the new one, never a torn or empty file.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary names differ per process and per call, so concurrent writers of one path never
/// share a temporary file (the last rename wins).
fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Replaces `path` with `data` (file mode `mode`), durably; creates the parent directory.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
    }
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Removes the temporary files of [`write_file`] in `dir` whose writer is gone (a process
/// killed between the write and the rename leaves one; the target itself is intact). Files of
/// a live process are kept: it may be writing them now. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_writer(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The writer's pid of a temporary name `.<name>.<pid>.<n>.tmp`; None for any other name.
fn temp_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?;
    let target = parts.next()?;
    if target.is_empty() || n.parse::<u64>().is_err() {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_mode_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        write_file(&p, b"one", 0o600).unwrap();
        write_file(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(d.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
        // A failed write (the target is a directory) removes its temporary file.
        let dirp = d.path().join("sub/dir");
        std::fs::create_dir(&dirp).unwrap();
        std::fs::write(dirp.join("x"), "x").unwrap();
        assert!(write_file(&dirp, b"x", 0o644).is_err());
        assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 2);
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let dead = u32::MAX - 1; // above pid_max: never a live process
        let me = std::process::id();
        for n in [
            format!(".net-c1-eth0.{dead}.0.tmp"),
            format!(".net-c2-eth0.{me}.3.tmp"),
            "net-c1-eth0".to_string(),
            ".hidden".to_string(),
            format!(".x.{dead}.y.tmp"),
        ] {
            std::fs::write(d.path().join(n), "x").unwrap();
        }
        assert_eq!(remove_stale_temps(d.path()), 1);
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let kept_live = format!(".net-c2-eth0.{me}.3.tmp");
        let bad = format!(".x.{dead}.y.tmp");
        assert_eq!(
            names,
            [".hidden", kept_live.as_str(), bad.as_str(), "net-c1-eth0"]
        );
        assert_eq!(
            temp_writer(
                &temp_path(Path::new("/d/a.b"))
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
            ),
            Some(me)
        );
        assert_eq!(remove_stale_temps(&d.path().join("missing")), 0);
    }
}
