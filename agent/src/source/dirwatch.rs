//! Wakes the manifest directory loop when the directory changes (effectful: one inotify
//! descriptor watching a directory, read through tokio's reactor), the way the kubelet's file
//! source watches its static pod path. The periodic re-read stays as the fallback.
#![allow(unsafe_code)] // inotify_init1 and inotify_add_watch (nix's inotify feature is off)

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;

/// An inotify watch on one directory (entries created, removed, renamed, written).
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    /// Watches `dir` (not recursively). Must be called inside a tokio runtime.
    pub fn new(dir: &Path) -> io::Result<Self> {
        use nix::libc;
        // SAFETY: no pointers are passed; the flags are valid.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CLOSE_WRITE
            | libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd moves into the AsyncFd and is closed only when it is dropped, so
        // the descriptor stays open and the same for the AsyncFd's whole lifetime.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(Self { fd })
    }

    /// Waits until at least one change was reported, then drains every pending event.
    pub async fn changed(&self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf).map_err(io::Error::from)
            });
            match read {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        self.drain();
        Ok(())
    }

    /// Reads and drops what is pending (non-blocking).
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        while nix::unistd::read(self.fd.get_ref().as_raw_fd(), &mut buf).is_ok_and(|n| n > 0) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_on_rename_into_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let stage = tempfile::tempdir_in(dir.path()).unwrap();
        let watched = dir.path().join("m");
        std::fs::create_dir(&watched).unwrap();
        let w = DirWatch::new(&watched).unwrap();
        // Nothing happened yet.
        assert!(tokio::time::timeout(Duration::from_millis(50), w.changed())
            .await
            .is_err());
        std::fs::write(stage.path().join("a.yaml"), "x").unwrap();
        std::fs::rename(stage.path().join("a.yaml"), watched.join("a.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after a rename")
            .unwrap();
        // Drained: no stale wake-up.
        assert!(tokio::time::timeout(Duration::from_millis(50), w.changed())
            .await
            .is_err());
        std::fs::remove_file(watched.join("a.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("no wake-up after a removal")
            .unwrap();
    }
}
