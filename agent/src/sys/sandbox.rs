//! Pod sandbox namespaces (effectful): a network, IPC and UTS namespace per pod, created on a
//! dedicated OS thread (namespaces are per thread) and kept alive by bind mounts of
//! `/proc/thread-self/ns/*` under `<run-dir>/sandboxes/<id>/`. Containers join them by path,
//! the way the kubelet's pause container shares them. No process is left running for it.
//! A `hostNetwork` pod's `net` and `uts` files and a `hostIPC` pod's `ipc` file are the
//! agent's own (the node's) namespaces, bound the same way.
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

/// Whose a sandbox is: written to `<dir>/owner.json` before any namespace or network exists,
/// so that whatever a crash leaves behind can be torn down (CNI DEL needs the pod's identity)
/// and attributed to its pod, or found to belong to none.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxOwner {
    /// Pod UID.
    pub uid: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// A hostNetwork pod (no CNI attachment).
    #[serde(default)]
    pub host_network: bool,
    /// A hostIPC pod: the `ipc` file is the node's IPC namespace.
    #[serde(default)]
    pub host_ipc: bool,
}

impl SandboxOwner {
    /// True when this sandbox `id` belongs to the pod `uid`: by its owner record, or (a record
    /// torn by a crash) by the UID prefix of the id (`<first 12 alphanumerics of uid>-s<n>`).
    pub fn owned_by(owner: Option<&SandboxOwner>, id: &str, uid: &str) -> bool {
        match owner {
            Some(o) => o.uid == uid,
            None => id
                .split_once("-s")
                .is_some_and(|(p, _)| p == id_prefix(uid)),
        }
    }
}

/// The UID part of a sandbox id.
pub fn id_prefix(uid: &str) -> String {
    uid.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect()
}

impl SandboxPaths {
    /// The owner record.
    pub fn owner_file(&self) -> PathBuf {
        self.dir.join("owner.json")
    }
    /// The sandbox id (the directory's name).
    pub fn id(&self) -> String {
        self.dir
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    }
    /// The owner record, when readable.
    pub fn owner(&self) -> Option<SandboxOwner> {
        std::fs::read(self.owner_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// Every sandbox directory under `run_dir/sandboxes` (effectful).
pub fn list(run_dir: &Path) -> Vec<SandboxPaths> {
    let dir = run_dir.join("sandboxes");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    let mut v: Vec<SandboxPaths> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| SandboxPaths { dir: e.path() })
        .collect();
    v.sort_by(|a, b| a.dir.cmp(&b.dir));
    v
}

/// Creates the namespaces with `hostname` set in the UTS namespace and the pod's `sysctls`
/// (paths under `/proc/sys` and values, already admitted) written in them before any
/// container joins. With `host_network` the `net` and `uts` files refer to the agent's own
/// namespaces (hostNetwork pods) and only the IPC namespace is new: a `net/` sysctl is then
/// refused. With `owner.host_ipc` the `ipc` file is the agent's IPC namespace (hostIPC pods)
/// and an IPC sysctl is refused. The owner record is written (durably) first.
pub fn create(
    paths: &SandboxPaths,
    hostname: &str,
    host_network: bool,
    owner: &SandboxOwner,
    sysctls: &[(String, String)],
) -> Result<(), SandboxError> {
    let id = paths.id();
    let err = |step: &'static str, e: String| SandboxError::Step(id.clone(), step, e);
    std::fs::create_dir_all(&paths.dir).map_err(|e| err("mkdir", e.to_string()))?;
    let record = serde_json::to_vec(owner).map_err(|e| err("owner record", e.to_string()))?;
    hako_shim::durable::write_file(&paths.owner_file(), &record, 0o644)
        .map_err(|e| err("owner record", e.to_string()))?;
    for p in [paths.net(), paths.ipc(), paths.uts()] {
        std::fs::write(&p, b"").map_err(|e| err("create ns file", e.to_string()))?;
    }
    let p = paths.clone();
    let host = hostname.to_string();
    let sysctls = sysctls.to_vec();
    let host_ipc = owner.host_ipc;
    let res = std::thread::spawn(move || -> Result<(), (&'static str, String)> {
        let mut flags = CloneFlags::empty();
        if !host_ipc {
            flags |= CloneFlags::CLONE_NEWIPC;
        }
        if !host_network {
            flags |= CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWUTS;
        }
        if !flags.is_empty() {
            unshare(flags).map_err(|e| ("unshare", e.to_string()))?;
        }
        if !host_network {
            nix::unistd::sethostname(&host).map_err(|e| ("sethostname", e.to_string()))?;
            set_loopback_up().map_err(|e| ("loopback up", e.to_string()))?;
        }
        // /proc/sys/{net,kernel} answer for the namespaces of the thread that opens them.
        write_sysctls(&sysctls, host_network, host_ipc)?;
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

/// Writes each sysctl (path under `/proc/sys`, value) in the calling thread's namespaces.
fn write_sysctls(
    sysctls: &[(String, String)],
    host_network: bool,
    host_ipc: bool,
) -> Result<(), (&'static str, String)> {
    use std::io::Write;
    for (path, value) in sysctls {
        let plain = path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
        if !plain
            || !(path.starts_with("net/")
                || path.starts_with("kernel/")
                || path.starts_with("fs/mqueue/"))
        {
            return Err(("sysctl", format!("{path}: not a namespaced sysctl")));
        }
        if host_network && path.starts_with("net/") {
            return Err((
                "sysctl",
                format!("{path}: the pod uses the host's network namespace"),
            ));
        }
        let ipc = path.starts_with("kernel/shm")
            || path.starts_with("kernel/msg")
            || path.starts_with("kernel/sem")
            || path.starts_with("fs/mqueue/");
        if host_ipc && ipc {
            return Err((
                "sysctl",
                format!("{path}: the pod uses the host's IPC namespace"),
            ));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(Path::new("/proc/sys").join(path))
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| ("sysctl", format!("{}={value}: {e}", path.replace('/', "."))))?;
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
    match std::fs::remove_file(paths.owner_file()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SandboxError::Step(id, "remove owner record", e.to_string())),
    }
    // An agent killed inside the owner record's durable write left its temporary file: it
    // would keep the directory (and the sandbox in every listing) for ever.
    hako_shim::durable::remove_stale_temps(&paths.dir);
    match std::fs::remove_dir(&paths.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(sandbox = %id, "sandbox directory not removed: {e}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_by_record_or_by_id_prefix() {
        let uid = "6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7f8";
        assert_eq!(id_prefix(uid), "6f1c2a3b4d5e");
        let id = format!("{}-s3", id_prefix(uid));
        let mine = SandboxOwner {
            uid: uid.into(),
            ..Default::default()
        };
        let other = SandboxOwner {
            uid: "other".into(),
            ..Default::default()
        };
        assert!(SandboxOwner::owned_by(Some(&mine), &id, uid));
        // The record wins over the id.
        assert!(!SandboxOwner::owned_by(Some(&other), &id, uid));
        // No record (torn by a crash): the id's prefix decides.
        assert!(SandboxOwner::owned_by(None, &id, uid));
        assert!(!SandboxOwner::owned_by(None, "6f1c2a3b4d5f-s0", uid));
        assert!(!SandboxOwner::owned_by(None, "6f1c2a3b4d5e", uid));
        assert!(!SandboxOwner::owned_by(None, "", uid));
    }

    #[test]
    fn host_namespaces_refuse_their_sysctls() {
        let one = |p: &str| vec![(p.to_string(), "1".to_string())];
        // Refused before anything is written (the paths are checked first).
        for (path, host_net, host_ipc) in [
            ("net/ipv4/ip_forward", true, false),
            ("kernel/shmmax", false, true),
            ("kernel/msgmax", false, true),
            ("kernel/sem", false, true),
            ("fs/mqueue/msg_max", false, true),
        ] {
            let e = write_sysctls(&one(path), host_net, host_ipc).unwrap_err();
            assert!(e.1.contains("the pod uses the host's"), "{path}: {e:?}");
        }
        // An old owner record (before hostIPC existed) reads as a pod-private IPC namespace.
        let o: SandboxOwner =
            serde_json::from_str(r#"{"uid":"u","namespace":"n","name":"p","hostNetwork":true}"#)
                .unwrap();
        assert!(o.host_network && !o.host_ipc);
    }

    #[test]
    fn remove_takes_a_torn_owner_write_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = SandboxPaths::new(tmp.path(), "abc-s0");
        std::fs::create_dir_all(&p.dir).unwrap();
        // What a writer killed between its temporary file and the rename leaves.
        let dead = u32::MAX - 1;
        std::fs::write(p.dir.join(format!(".owner.json.{dead}.0.tmp")), b"{").unwrap();
        remove(&p).unwrap();
        assert!(!p.dir.exists());
        assert!(list(tmp.path()).is_empty());
    }

    #[test]
    fn list_and_owner_record() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(list(tmp.path()).is_empty());
        let a = SandboxPaths::new(tmp.path(), "b-s0");
        let b = SandboxPaths::new(tmp.path(), "a-s1");
        std::fs::create_dir_all(&a.dir).unwrap();
        std::fs::create_dir_all(&b.dir).unwrap();
        std::fs::write(tmp.path().join("sandboxes").join("stray-file"), b"").unwrap();
        let owner = SandboxOwner {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            host_network: true,
            host_ipc: false,
        };
        std::fs::write(a.owner_file(), serde_json::to_vec(&owner).unwrap()).unwrap();
        std::fs::write(b.owner_file(), b"{torn").unwrap();
        let l = list(tmp.path());
        assert_eq!(l, vec![b.clone(), a.clone()]);
        assert_eq!(a.owner(), Some(owner));
        assert_eq!(b.owner(), None);
        assert_eq!(a.id(), "b-s0");
        // remove() takes the record and the directory too.
        remove(&a).unwrap();
        assert!(!a.dir.exists());
        remove(&a).unwrap();
    }
}
