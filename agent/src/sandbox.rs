//! Pod sandbox namespaces (effectful): a network, IPC and UTS namespace per pod, created on a
//! dedicated OS thread (namespaces are per thread) and kept alive by bind mounts of
//! `/proc/thread-self/ns/*` under `<run-dir>/sandboxes/<id>/`. Containers join them by path,
//! the way the kubelet's pause container shares them. No process is left running for it.
//! The new network namespace's `lo` is brought up here, on the same thread (containerd's
//! `use_internal_loopback`), instead of running the CNI `loopback` plugin once per pod.
#![allow(unsafe_code)] // one ioctl wrapper, `set_loopback_up`

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::path::{Path, PathBuf};

/// Sandbox failures.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A step failed.
    #[error("sandbox {0}: {1}: {2}")]
    Step(String, &'static str, String),
}

/// Paths of one sandbox's namespaces.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxPaths {
    /// Directory holding the namespace files.
    pub dir: PathBuf,
}

impl SandboxPaths {
    /// Under `run_dir/sandboxes/<id>`.
    pub fn new(run_dir: &Path, id: &str) -> Self {
        Self {
            dir: run_dir.join("sandboxes").join(id),
        }
    }
    /// Network namespace file.
    pub fn net(&self) -> PathBuf {
        self.dir.join("net")
    }
    /// IPC namespace file.
    pub fn ipc(&self) -> PathBuf {
        self.dir.join("ipc")
    }
    /// UTS namespace file.
    pub fn uts(&self) -> PathBuf {
        self.dir.join("uts")
    }
    /// True when the network namespace is still mounted.
    pub fn exists(&self) -> bool {
        let (Ok(a), Ok(b)) = (std::fs::metadata(self.net()), std::fs::metadata(&self.dir)) else {
            return false;
        };
        std::os::unix::fs::MetadataExt::dev(&a) != std::os::unix::fs::MetadataExt::dev(&b)
    }
}

/// Creates the namespaces with `hostname` set in the UTS namespace. With `host_network` the
/// `net` and `uts` files refer to the agent's own namespaces (hostNetwork pods) and only the
/// IPC namespace is new.
pub fn create(
    paths: &SandboxPaths,
    hostname: &str,
    host_network: bool,
) -> Result<(), SandboxError> {
    let id = paths
        .dir
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let err = |step: &'static str, e: String| SandboxError::Step(id.clone(), step, e);
    std::fs::create_dir_all(&paths.dir).map_err(|e| err("mkdir", e.to_string()))?;
    for p in [paths.net(), paths.ipc(), paths.uts()] {
        std::fs::write(&p, b"").map_err(|e| err("create ns file", e.to_string()))?;
    }
    let p = paths.clone();
    let host = hostname.to_string();
    let res = std::thread::spawn(move || -> Result<(), (&'static str, String)> {
        if host_network {
            unshare(CloneFlags::CLONE_NEWIPC).map_err(|e| ("unshare", e.to_string()))?;
        } else {
            unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
                .map_err(|e| ("unshare", e.to_string()))?;
            nix::unistd::sethostname(&host).map_err(|e| ("sethostname", e.to_string()))?;
            set_loopback_up().map_err(|e| ("loopback up", e.to_string()))?;
        }
        for (kind, target) in [("net", p.net()), ("ipc", p.ipc()), ("uts", p.uts())] {
            let src = format!("/proc/thread-self/ns/{kind}");
            mount(
                Some(src.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ("bind mount", format!("{kind}: {e}")))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| err("thread", "panicked".into()))?;
    if let Err((step, e)) = res {
        let _ = remove(paths);
        return Err(err(step, e));
    }
    Ok(())
}

/// Sets `IFF_UP` on `lo` in the calling thread's network namespace (the kernel then adds
/// 127.0.0.1/8 and ::1, as the CNI loopback plugin's ADD leaves it).
fn set_loopback_up() -> nix::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = nix::libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: a valid socket and a pointer to an initialised ifreq that outlives the call;
    // SIOCGIFFLAGS writes only ifr_flags.
    let r = unsafe { nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCGIFFLAGS, &mut req) };
    nix::errno::Errno::result(r)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP is 0x1; ifr_flags is a short.
    let up = nix::libc::c_short::try_from(nix::libc::IFF_UP).unwrap_or(1);
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; SIOCSIFFLAGS reads the ifreq.
    let r = unsafe { nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCSIFFLAGS, &req) };
    nix::errno::Errno::result(r).map(drop)
}

/// Unmounts and removes the namespace files (missing ones are fine).
pub fn remove(paths: &SandboxPaths) -> Result<(), SandboxError> {
    let id = paths.dir.display().to_string();
    for p in [paths.net(), paths.ipc(), paths.uts()] {
        // Detach every stacked mount.
        for _ in 0..4 {
            if umount2(&p, MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SandboxError::Step(id, "remove ns file", e.to_string())),
        }
    }
    let _ = std::fs::remove_dir(&paths.dir);
    Ok(())
}
