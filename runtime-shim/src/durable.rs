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
}
