//! cgroup v1 (including the hybrid layout) and v2: create a container's cgroup under an
//! injected filesystem root, write limits, add processes, read OOM kills, remove. Effectful
//! (files only); value conversion is pure.

use crate::spec::CgroupSpec;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// cgroup errors, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A directory could not be created.
    #[error("create cgroup {0}: {1}")]
    Create(PathBuf, io::Error),
    /// A control file could not be written.
    #[error("write {1:?} to {0}: {2}")]
    Write(PathBuf, String, io::Error),
    /// Neither a v2 nor a v1 hierarchy was found.
    #[error("no cgroup hierarchy under {0}")]
    NoHierarchy(PathBuf),
    /// The cgroup path is not relative or escapes the root.
    #[error("invalid cgroup path {0:?}")]
    BadPath(String),
}

/// Which cgroup layout a root has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at the root.
    V2,
    /// Per-controller v1 hierarchies (possibly with a `unified` v2 mount beside, ignored).
    V1,
}

/// v1 controllers the shim manages.
pub const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids"];

/// Detect the layout of a cgroup filesystem root.
pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
    if root.join("cgroup.controllers").exists() {
        Ok(Layout::V2)
    } else if root.join("memory").is_dir() || root.join("pids").is_dir() {
        Ok(Layout::V1)
    } else {
        Err(CgroupError::NoHierarchy(root.to_path_buf()))
    }
}

/// cpu.shares → cpu.weight, as runc converts (2..262144 → 1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// The control-file writes a spec asks for, per layout: `(controller, file, value)`;
/// controller is empty on v2. Pure.
pub fn plan_writes(spec: &CgroupSpec, layout: Layout) -> Vec<(&'static str, &'static str, String)> {
    let mut w = Vec::new();
    let period = spec.cpu_period.unwrap_or(100_000);
    match layout {
        Layout::V1 => {
            if let Some(s) = spec.cpu_shares {
                w.push(("cpu", "cpu.shares", s.to_string()));
            }
            if let Some(q) = spec.cpu_quota {
                w.push(("cpu", "cpu.cfs_period_us", period.to_string()));
                w.push(("cpu", "cpu.cfs_quota_us", q.to_string()));
            }
            if let Some(m) = spec.memory_limit {
                w.push(("memory", "memory.limit_in_bytes", m.to_string()));
            }
            if let Some(p) = spec.pids_limit {
                let v = if p <= 0 {
                    "max".to_string()
                } else {
                    p.to_string()
                };
                w.push(("pids", "pids.max", v));
            }
        }
        Layout::V2 => {
            if let Some(s) = spec.cpu_shares {
                w.push(("", "cpu.weight", shares_to_weight(s).to_string()));
            }
            if let Some(q) = spec.cpu_quota {
                let q = if q <= 0 {
                    "max".to_string()
                } else {
                    q.to_string()
                };
                w.push(("", "cpu.max", format!("{q} {period}")));
            }
            if let Some(m) = spec.memory_limit {
                w.push(("", "memory.max", m.to_string()));
                w.push(("", "memory.swap.max", "0".to_string()));
            }
            if let Some(p) = spec.pids_limit {
                let v = if p <= 0 {
                    "max".to_string()
                } else {
                    p.to_string()
                };
                w.push(("", "pids.max", v));
            }
        }
    }
    w
}

/// Kubernetes QoS class of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QosClass {
    /// Requests equal limits for every container.
    Guaranteed,
    /// Anything between.
    Burstable,
    /// No requests or limits.
    BestEffort,
}

/// The pod-level cgroup path the kubelet's cgroupfs driver uses:
/// `kubepods/pod<uid>` (Guaranteed), `kubepods/burstable/pod<uid>`,
/// `kubepods/besteffort/pod<uid>`. Pure.
pub fn pod_cgroup_path(qos: QosClass, pod_uid: &str) -> String {
    match qos {
        QosClass::Guaranteed => format!("kubepods/pod{pod_uid}"),
        QosClass::Burstable => format!("kubepods/burstable/pod{pod_uid}"),
        QosClass::BestEffort => format!("kubepods/besteffort/pod{pod_uid}"),
    }
}

/// A container's cgroup path under its pod's. Pure.
pub fn container_cgroup_path(qos: QosClass, pod_uid: &str, container_id: &str) -> String {
    format!("{}/{container_id}", pod_cgroup_path(qos, pod_uid))
}

/// A created container cgroup.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    /// Layout it was created in.
    pub v2: bool,
    /// Leaf directories (one per v1 hierarchy, one on v2).
    pub dirs: Vec<PathBuf>,
    /// Directories this cgroup created (deepest last), removed on [`Cgroup::remove`] when empty.
    pub created: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|e| CgroupError::Write(path.to_path_buf(), value.into(), e))
}

fn mkdirs(base: &Path, rel: &Path, created: &mut Vec<PathBuf>) -> Result<PathBuf, CgroupError> {
    let mut cur = base.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::create_dir(&cur) {
            Ok(()) => created.push(cur.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CgroupError::Create(cur, e)),
        }
    }
    Ok(cur)
}

impl Cgroup {
    /// Create the cgroup of `spec` and write its limits.
    pub fn create(spec: &CgroupSpec) -> Result<Self, CgroupError> {
        let root = spec
            .root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
        let rel = Path::new(spec.path.trim_start_matches('/'));
        if rel.as_os_str().is_empty()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(CgroupError::BadPath(spec.path.clone()));
        }
        let layout = detect(&root)?;
        let mut cg = Cgroup {
            v2: layout == Layout::V2,
            dirs: Vec::new(),
            created: Vec::new(),
        };
        let res = cg.setup(&root, rel, spec, layout);
        if let Err(e) = res {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn setup(
        &mut self,
        root: &Path,
        rel: &Path,
        spec: &CgroupSpec,
        layout: Layout,
    ) -> Result<(), CgroupError> {
        match layout {
            Layout::V2 => {
                // Enable the controllers down the path.
                let mut cur = root.to_path_buf();
                let avail = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                let want: Vec<String> = ["cpu", "memory", "pids"]
                    .iter()
                    .filter(|c| avail.split_whitespace().any(|a| a == **c))
                    .map(|c| format!("+{c}"))
                    .collect();
                let comps: Vec<_> = rel.components().collect();
                for (i, c) in comps.iter().enumerate() {
                    if !want.is_empty() {
                        let _ = write(&cur.join("cgroup.subtree_control"), &want.join(" "));
                    }
                    cur.push(c);
                    match fs::create_dir(&cur) {
                        Ok(()) => self.created.push(cur.clone()),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(CgroupError::Create(cur, e)),
                    }
                    let _ = i;
                }
                self.dirs.push(cur);
            }
            Layout::V1 => {
                let mut seen = Vec::new();
                for ctrl in V1_CONTROLLERS {
                    let base = root.join(ctrl);
                    if !base.is_dir() {
                        continue;
                    }
                    let canon = fs::canonicalize(&base).unwrap_or(base.clone());
                    if seen.contains(&canon) {
                        continue;
                    }
                    seen.push(canon.clone());
                    let d = mkdirs(&canon, rel, &mut self.created)?;
                    self.dirs.push(d);
                }
            }
        }
        for (ctrl, file, value) in plan_writes(spec, layout) {
            let dir = self.dir_for(ctrl);
            if let Some(d) = dir {
                match write(&d.join(file), &value) {
                    // No swap accounting in this kernel: nothing to limit.
                    Err(CgroupError::Write(_, _, e))
                        if file == "memory.swap.max" && e.kind() == io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
        }
        Ok(())
    }

    fn dir_for(&self, ctrl: &str) -> Option<PathBuf> {
        if self.v2 {
            return self.dirs.first().cloned();
        }
        self.dirs
            .iter()
            .find(|d| {
                d.components().any(|c| {
                    c.as_os_str()
                        .to_str()
                        .is_some_and(|s| s.split(',').any(|p| p == ctrl))
                })
            })
            .cloned()
    }

    /// The `cgroup.procs` files a process must be written to.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Move `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for f in self.procs_files() {
            write(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// Number of OOM kills recorded in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, dir) = if self.v2 {
            ("memory.events", self.dirs.first().cloned())
        } else {
            ("memory.oom_control", self.dir_for("memory"))
        };
        let Some(dir) = dir else { return 0 };
        let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for f in self.procs_files() {
            for l in fs::read_to_string(f).unwrap_or_default().lines() {
                if let Ok(p) = l.trim().parse::<i32>() {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    /// Remove the directories this cgroup created (leaf first); busy ones are left.
    pub fn remove(&self) {
        for d in self.created.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_paths() {
        assert_eq!(
            pod_cgroup_path(QosClass::Guaranteed, "u1"),
            "kubepods/podu1"
        );
        assert_eq!(
            container_cgroup_path(QosClass::Burstable, "u1", "c"),
            "kubepods/burstable/podu1/c"
        );
        assert_eq!(
            pod_cgroup_path(QosClass::BestEffort, "u1"),
            "kubepods/besteffort/podu1"
        );
    }

    #[test]
    fn weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn writes_per_layout() {
        let s = CgroupSpec {
            path: "kubepods/pod1/c".into(),
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            memory_limit: Some(64 << 20),
            pids_limit: Some(20),
            ..Default::default()
        };
        let v1 = plan_writes(&s, Layout::V1);
        assert!(v1.contains(&("memory", "memory.limit_in_bytes", "67108864".into())));
        assert!(v1.contains(&("cpu", "cpu.cfs_quota_us", "50000".into())));
        let v2 = plan_writes(&s, Layout::V2);
        assert!(v2.contains(&("", "cpu.max", "50000 100000".into())));
        assert!(v2.contains(&("", "pids.max", "20".into())));
    }

    #[test]
    fn fake_v1_and_v2_roots() {
        let d = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "cpu"] {
            fs::create_dir(d.path().join(c)).unwrap();
        }
        let spec = CgroupSpec {
            root: Some(d.path().into()),
            path: "kubepods/burstable/podx/c1".into(),
            memory_limit: Some(1000),
            pids_limit: Some(5),
            ..Default::default()
        };
        let cg = Cgroup::create(&spec).unwrap();
        assert!(!cg.v2);
        let leaf = d.path().join("memory/kubepods/burstable/podx/c1");
        assert_eq!(
            fs::read_to_string(leaf.join("memory.limit_in_bytes")).unwrap(),
            "1000"
        );
        fs::write(
            leaf.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 2);

        let d2 = tempfile::tempdir().unwrap();
        fs::write(d2.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let spec2 = CgroupSpec {
            root: Some(d2.path().into()),
            ..spec
        };
        let cg2 = Cgroup::create(&spec2).unwrap();
        assert!(cg2.v2);
        let leaf2 = d2.path().join("kubepods/burstable/podx/c1");
        assert_eq!(fs::read_to_string(leaf2.join("pids.max")).unwrap(), "5");
        assert_eq!(
            fs::read_to_string(d2.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        assert!(matches!(
            Cgroup::create(&CgroupSpec {
                path: "../x".into(),
                ..spec2
            }),
            Err(CgroupError::BadPath(_))
        ));
    }
}
