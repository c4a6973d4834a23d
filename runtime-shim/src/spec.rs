//! The container description the shim runs (a small, serialisable subset of an OCI runtime
//! spec plus hako's extras: log path, cgroup parent, namespace paths to join). Pure.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything the shim needs to create one container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Container id: `[A-Za-z0-9_.-]`, 1..=64 characters.
    pub id: String,
    /// Root filesystem.
    pub rootfs: Rootfs,
    /// The process to run as PID 1.
    pub process: Process,
    /// Hostname of the container's UTS namespace (unset: keep the UTS namespace's name).
    pub hostname: Option<String>,
    /// Namespace paths to join instead of creating a new namespace (`/proc/<pid>/ns/net`,
    /// `/run/netns/<name>`). The network namespace is never created: unset means the shim's.
    pub namespaces: NamespacePaths,
    /// Extra mounts (volumes), applied in order after the standard ones.
    pub mounts: Vec<Mount>,
    /// Mount the rootfs read-only.
    pub readonly_rootfs: bool,
    /// Paths masked inside the container (runc's defaults when `None`).
    pub masked_paths: Option<Vec<String>>,
    /// Paths remounted read-only inside the container (runc's defaults when `None`).
    pub readonly_paths: Option<Vec<String>>,
    /// Privileged: all capabilities, nothing masked, /sys read-write.
    pub privileged: bool,
    /// Resource limits and the cgroup to put the container in.
    pub cgroup: Option<CgroupSpec>,
    /// CRI-format log file for stdout/stderr.
    pub log: Option<LogSpec>,
    /// Seccomp profile (ignored when privileged).
    pub seccomp: crate::seccomp::SeccompProfile,
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Rootfs {
    /// No rootfs configured (invalid for `create`).
    #[default]
    None,
    /// An existing directory, bind-mounted (shared with every container that uses it).
    Dir(PathBuf),
    /// Read-only layer directories, lowest first, under an overlayfs whose upper and work
    /// directories live in the container's state directory.
    Layers(Vec<PathBuf>),
}

/// Namespaces to join.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct NamespacePaths {
    /// Network namespace (the pod's).
    pub net: Option<PathBuf>,
    /// IPC namespace (the pod's, when the pod shares it).
    pub ipc: Option<PathBuf>,
    /// UTS namespace (the pod's, when the pod shares it).
    pub uts: Option<PathBuf>,
    /// PID namespace (the pod's, when `shareProcessNamespace`).
    pub pid: Option<PathBuf>,
}

/// The container's process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Process {
    /// argv; `args[0]` is looked up in the container's `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// User: numeric ids, or names resolved in the container's /etc/passwd and /etc/group.
    pub user: User,
    /// Capabilities (`CAP_` prefix optional). `None`: containerd's default set.
    pub capabilities: Option<Vec<String>>,
    /// Set no_new_privs before exec.
    pub no_new_privileges: bool,
    /// rlimits, e.g. `RLIMIT_NOFILE`.
    pub rlimits: Vec<Rlimit>,
    /// Requested oom_score_adj; clamped to the lowest settable value without CAP_SYS_RESOURCE.
    pub oom_score_adj: Option<i32>,
    /// stdin is a pipe whose write end the shim keeps for attach (`attachStdin`); else
    /// `/dev/null`.
    pub stdin: bool,
}

/// User and groups of a process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct User {
    /// `uid`, `name`, `uid:gid`, `name:group` (image `USER` syntax); empty means root.
    pub spec: String,
    /// Supplementary group ids added to the user's groups from /etc/group.
    pub additional_gids: Vec<u32>,
}

/// One rlimit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, `RLIMIT_NPROC`, `RLIMIT_CORE`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit.
    pub soft: u64,
}

/// A bind mount (volume) or a special filesystem.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Mount {
    /// Path inside the container.
    pub destination: String,
    /// Host path (bind) or filesystem source.
    pub source: String,
    /// `bind` (default) or a filesystem type such as `tmpfs`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `ro`, `rw`, `rprivate`, `rslave`, `rshared`, `nosuid`, `nodev`, `noexec`, or data.
    pub options: Vec<String>,
}

/// cgroup placement and limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CgroupSpec {
    /// cgroup filesystem root (default `/sys/fs/cgroup`); tests inject another.
    pub root: Option<PathBuf>,
    /// Path relative to the hierarchy root, e.g. `kubepods/burstable/pod<uid>/<id>`.
    pub path: String,
    /// CPU shares (v1) / converted to cpu.weight (v2).
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per period.
    pub cpu_quota: Option<i64>,
    /// CFS period in microseconds (default 100000).
    pub cpu_period: Option<u64>,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Maximum number of tasks.
    pub pids_limit: Option<i64>,
}

/// CRI log file settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct LogSpec {
    /// Path of the current log file.
    pub path: PathBuf,
    /// Rotate when the file exceeds this many bytes (0: never).
    pub max_size: u64,
    /// Files kept, the current one included (the kubelet's `--container-log-max-files`):
    /// rotated files are `<path>.<YYYYMMDD-HHMMSS>`; 0 or 1 truncates in place instead.
    pub max_files: u32,
}

/// Spec validation errors.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The id is empty, too long or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid container id {0:?}")]
    BadId(String),
    /// No process args.
    #[error("container {0}: process.args is empty")]
    NoArgs(String),
    /// No rootfs.
    #[error("container {0}: no rootfs")]
    NoRootfs(String),
    /// Mount destination is not absolute.
    #[error("container {0}: mount destination {1:?} is not absolute")]
    BadMount(String, String),
}

/// runc's default masked paths.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's default read-only paths.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Is `id` a valid container id?
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && id != "."
        && id != ".."
}

impl ContainerSpec {
    /// Check the spec before anything is created.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_id(&self.id) {
            return Err(SpecError::BadId(self.id.clone()));
        }
        if self.process.args.is_empty() {
            return Err(SpecError::NoArgs(self.id.clone()));
        }
        if self.rootfs == Rootfs::None {
            return Err(SpecError::NoRootfs(self.id.clone()));
        }
        for m in &self.mounts {
            if !m.destination.starts_with('/') {
                return Err(SpecError::BadMount(self.id.clone(), m.destination.clone()));
            }
        }
        Ok(())
    }

    /// The masked paths in force.
    pub fn effective_masked_paths(&self) -> Vec<String> {
        if self.privileged {
            return Vec::new();
        }
        match &self.masked_paths {
            Some(p) => p.clone(),
            None => DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The read-only paths in force.
    pub fn effective_readonly_paths(&self) -> Vec<String> {
        if self.privileged {
            return Vec::new();
        }
        match &self.readonly_paths {
            Some(p) => p.clone(),
            None => DEFAULT_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for (id, ok) in [
            ("a", true),
            ("web-0_x.y", true),
            ("", false),
            ("..", false),
            ("a/b", false),
            (&"x".repeat(65), false),
        ] {
            assert_eq!(valid_id(id), ok, "{id}");
        }
    }

    #[test]
    fn validate() {
        let mut s = ContainerSpec {
            id: "c1".into(),
            rootfs: Rootfs::Dir("/tmp".into()),
            process: Process {
                args: vec!["true".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(s.validate(), Ok(()));
        s.mounts.push(Mount {
            destination: "rel".into(),
            ..Default::default()
        });
        assert_eq!(
            s.validate(),
            Err(SpecError::BadMount("c1".into(), "rel".into()))
        );
        s.mounts.clear();
        s.process.args.clear();
        assert_eq!(s.validate(), Err(SpecError::NoArgs("c1".into())));
    }

    #[test]
    fn json_round_trip() {
        let j = r#"{"id":"c","rootfs":{"layers":["/a","/b"]},"process":{"args":["sh"],"user":{"spec":"app"}}}"#;
        let s: ContainerSpec = serde_json::from_str(j).unwrap();
        assert_eq!(s.rootfs, Rootfs::Layers(vec!["/a".into(), "/b".into()]));
        assert_eq!(s.process.user.spec, "app");
        let back: ContainerSpec =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
