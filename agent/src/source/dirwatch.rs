//! Wakes the manifest directory loop when the directory changes (effectful: one inotify
//! descriptor watching a directory, read through tokio's reactor), the way the kubelet's file
//! source watches its static pod path. The periodic re-read stays as the fallback. The
//! descriptor is nix's [`Inotify`]; the one unsafe block left is tokio's registration
//! contract (the descriptor stays open while registered), which no safe API covers.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use tokio::io::unix::AsyncFd;

/// The inotify instance, as tokio's reactor registers it (by its raw descriptor).
struct Watcher(Inotify);

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify watch on one directory (entries created, removed, renamed, written).
pub struct DirWatch {
    fd: AsyncFd<Watcher>,
}

impl DirWatch {
    /// Watches `dir` (not recursively). Must be called inside a tokio runtime.
    pub fn new(dir: &Path) -> io::Result<Self> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        ino.add_watch(dir, mask)?;
        #[allow(unsafe_code)]
        // SAFETY: the Inotify moves into the AsyncFd and is closed only when the AsyncFd is
        // dropped, so the descriptor stays open and the same for the registration's lifetime.
        let fd = unsafe { AsyncFd::register(Watcher(ino)) }?;
        Ok(Self { fd })
    }

    /// Waits until at least one change was reported, then drains every pending event.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|w| w.get_ref().0.read_events().map_err(io::Error::from)) {
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
        while self
            .fd
            .get_ref()
            .0
            .read_events()
            .is_ok_and(|e| !e.is_empty())
        {}
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
