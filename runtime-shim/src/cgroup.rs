//! cgroup v1 (including the hybrid layout) and v2: create a container's cgroup under an
//! injected filesystem root, write limits, add processes, read OOM kills, kill every process
//! in it, remove. Effectful (files, and pidfds for the v1 kill); value conversion is pure.

use crate::pidfd::PidFd;
use crate::spec::CgroupSpec;
use nix::sys::signal::Signal;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// The v1 freezer did not reach `FROZEN` in time (the kill went ahead regardless).
    #[error("freeze {0}: still {1:?} after {2:?}")]
    Freeze(PathBuf, String, Duration),
    /// Processes were still in the cgroup after every kill round.
    #[error("cgroup {0} still holds processes {1:?}")]
    Busy(PathBuf, Vec<i32>),
}

/// Which cgroup layout a root has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at the root.
    V2,
    /// Per-controller v1 hierarchies (possibly with a `unified` v2 mount beside, ignored).
    V1,
}

/// v1 controllers the shim manages. `freezer` sets no limit: it lets [`kill_all`] stop every
/// process of the container (no fork, no exit) while it signals them one by one.
pub const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer"];

/// How long a v1 freeze may take before the kill goes ahead unfrozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);
/// Kill rounds over `cgroup.procs` when nothing can freeze the cgroup.
const KILL_ROUNDS: usize = 50;

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

/// One cgroup filesystem of the container's `/sys/fs/cgroup` view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewMount {
    /// Directory under `/sys/fs/cgroup` (empty: `/sys/fs/cgroup` itself, the v2 tree).
    pub dir: String,
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: &'static str,
    /// Mount data: the v1 hierarchy's controllers and `name=`, as the host mounted it.
    pub data: Option<String>,
}

/// What a container sees at `/sys/fs/cgroup`, from the hierarchies mounted on the host
/// (runc's cgroup mount): v2 → the unified tree mounted there; v1 → a tmpfs with each host
/// hierarchy that has a controller of [`V1_CONTROLLERS`] mounted in a directory of the same
/// name (`cpu`, `memory`, `cpu,cpuacct`, `pids`, `freezer`). Mounted inside the container's cgroup namespace, each
/// shows the container's own cgroup as its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// cgroup v2 at `/sys/fs/cgroup`.
    V2,
    /// A tmpfs holding these v1 (and hybrid v2) mounts.
    V1(Vec<ViewMount>),
}

impl View {
    /// The filesystems to mount, in order, relative to `/sys/fs/cgroup`.
    pub fn mounts(&self) -> Vec<ViewMount> {
        match self {
            View::V2 => vec![ViewMount {
                dir: String::new(),
                fstype: "cgroup2",
                data: None,
            }],
            View::V1(m) => m.clone(),
        }
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space). Pure.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && s.is_char_boundary(i + 4) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The container's cgroup view from the text of `/proc/self/mountinfo` (`mount_root` is
/// where the host mounts cgroups, normally `/sys/fs/cgroup`). `None` when no cgroup
/// filesystem is mounted there. v1 keeps only the hierarchies of [`V1_CONTROLLERS`] (those
/// the container's process joins); their mount data keeps only the controllers and `name=` of
/// each hierarchy (the kernel reuses a hierarchy only when they match exactly). Pure.
pub fn view_from_mountinfo(text: &str, mount_root: &str) -> Option<View> {
    let root = mount_root.trim_end_matches('/');
    let mut v1 = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split_whitespace().nth(4).map(unescape_mountinfo) else {
            continue;
        };
        let mut r = right.split_whitespace();
        let (Some(fstype), _, Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        if fstype == "cgroup2" && point == root {
            return Some(View::V2);
        }
        let Some(dir) = point
            .strip_prefix(root)
            .and_then(|d| d.strip_prefix('/'))
            .filter(|d| !d.is_empty() && !d.contains('/') && d != &"." && d != &"..")
        else {
            continue;
        };
        let m = match fstype {
            "cgroup" => {
                let keep: Vec<&str> = opts
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "noprefix"
                                | "clone_children"
                                | "xattr"
                                | "cpuset_v2_mode"
                        ) && !o.starts_with("release_agent=")
                    })
                    .collect();
                // Only the hierarchies a container joins: in the others (and a hybrid's
                // `unified`) its cgroup namespace root would be the shim's cgroup.
                if !keep.iter().any(|c| V1_CONTROLLERS.contains(c)) {
                    continue;
                }
                ViewMount {
                    dir: dir.to_string(),
                    fstype: "cgroup",
                    data: Some(keep.join(",")),
                }
            }
            _ => continue,
        };
        // A hierarchy mounted twice (or a remount) shows once.
        v1.retain(|x: &ViewMount| x.dir != m.dir);
        v1.push(m);
    }
    (!v1.is_empty()).then_some(View::V1(v1))
}

/// The host's cgroup view (reads `/proc/self/mountinfo`); `None` when it cannot be read or
/// holds no cgroup mount.
pub fn host_view() -> Option<View> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    view_from_mountinfo(&text, "/sys/fs/cgroup")
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

    /// SIGKILL every process in the cgroup ([`kill_all`]).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        kill_all(&self.dirs)
    }

    /// Remove the directories this cgroup created (leaf first); busy ones are left.
    pub fn remove(&self) {
        for d in self.created.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Pids listed in the `cgroup.procs` of `dirs` (the union; pids outside the reader's pid
/// namespace, shown as 0, are left out).
fn procs_of(dirs: &[PathBuf]) -> Vec<i32> {
    let mut out = Vec::new();
    for d in dirs {
        for l in fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(p) = l.trim().parse::<i32>() {
                if p > 0 && !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// SIGKILL, through a pidfd, each process listed in the cgroup; the number signalled.
/// A pid read from `cgroup.procs` may have been recycled by the time it is opened, so the
/// list is read again after the pidfds pin their processes, and a process is signalled only
/// if its pid is still listed then: had it been reaped before that second read, the signal
/// through its pidfd reaches nobody.
fn kill_listed(dirs: &[PathBuf]) -> usize {
    let fds: Vec<PidFd> = procs_of(dirs)
        .into_iter()
        .filter_map(|p| PidFd::open(p).ok())
        .collect();
    let listed = procs_of(dirs);
    fds.iter()
        .filter(|fd| listed.contains(&fd.pid()))
        .filter(|fd| fd.signal(Signal::SIGKILL).is_ok())
        .count()
}

/// Read a v1 `freezer.state` until it shows `want` (bounded).
fn await_freezer(state: &Path, want: &str, timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = fs::read_to_string(state).unwrap_or_default();
        if now.trim() == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Freeze(
                state.to_path_buf(),
                now.trim().to_string(),
                timeout,
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL every process in the cgroup whose leaf directories are `dirs` (the v2 leaf, or
/// one per v1 hierarchy), the container's forked children and exec'd processes included:
/// - v2: `cgroup.kill` (the kernel kills the whole cgroup, racing forks included);
/// - v1 with a freezer leaf: freeze, SIGKILL each process through a pidfd, thaw (frozen
///   processes cannot fork or exit, so the list cannot change under the kill; they die
///   as they thaw), as runc's `signalAllProcesses` does;
/// - otherwise: rounds of SIGKILL through pidfds until `cgroup.procs` is empty (bounded).
///
/// Then waits (bounded) for the processes to leave; [`CgroupError::Busy`] if some stay.
pub fn kill_all(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let existing: Vec<PathBuf> = dirs.iter().filter(|d| d.is_dir()).cloned().collect();
    if existing.is_empty() {
        return Ok(());
    }
    let mut freeze_err = None;
    if let Some(d) = existing.iter().find(|d| d.join("cgroup.kill").exists()) {
        write(&d.join("cgroup.kill"), "1")?;
    } else if let Some(d) = existing.iter().find(|d| d.join("freezer.state").exists()) {
        let state = d.join("freezer.state");
        write(&state, "FROZEN")?;
        freeze_err = await_freezer(&state, "FROZEN", FREEZE_TIMEOUT).err();
        kill_listed(&existing);
        write(&state, "THAWED")?;
    }
    let mut left = procs_of(&existing);
    for _ in 0..KILL_ROUNDS {
        if left.is_empty() {
            break;
        }
        kill_listed(&existing);
        std::thread::sleep(Duration::from_millis(20));
        left = procs_of(&existing);
    }
    if !left.is_empty() {
        return Err(CgroupError::Busy(existing[0].clone(), left));
    }
    if let Some(e) = freeze_err {
        tracing::warn!(error = %e, "cgroup killed without a complete freeze");
    }
    Ok(())
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
    fn kill_all_on_fake_roots() {
        use std::os::unix::process::ExitStatusExt;
        // Nothing to kill where the cgroup is gone.
        assert!(kill_all(&[PathBuf::from("/nonexistent/hako-cgroup")]).is_ok());
        // v2: one write to cgroup.kill, and the kernel does the rest.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("cgroup.kill"), "").unwrap();
        fs::write(d.path().join("cgroup.procs"), "").unwrap();
        kill_all(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("cgroup.kill")).unwrap(),
            "1"
        );
        // v1: the listed process (our child) dies through its pidfd, the freezer is thawed
        // after, and a cgroup whose list never empties is reported busy.
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let d = tempfile::tempdir().unwrap();
        let (mem, frz) = (d.path().join("memory"), d.path().join("freezer"));
        for (dir, procs) in [(&mem, format!("{pid}\n")), (&frz, format!("0\n{pid}\n"))] {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join("cgroup.procs"), procs).unwrap();
        }
        fs::write(frz.join("freezer.state"), "THAWED\n").unwrap();
        let r = kill_all(&[mem, frz.clone()]);
        assert!(
            matches!(&r, Err(CgroupError::Busy(_, p)) if p == &vec![pid]),
            "{r:?}"
        );
        assert_eq!(child.wait().unwrap().signal(), Some(9));
        assert_eq!(
            fs::read_to_string(frz.join("freezer.state")).unwrap(),
            "THAWED"
        );
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

    #[test]
    fn views_from_mountinfo() {
        let v1 = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory,clone_children
36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
44 31 0:41 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
44 31 0:41 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
42 31 0:39 / /mnt/elsewhere rw,relatime - cgroup cgroup rw,pids
43 31 0:40 / /sys/fs/cgroup/a/b rw,relatime - cgroup cgroup rw,blkio
";
        let got = view_from_mountinfo(v1, "/sys/fs/cgroup").unwrap();
        let m = |dir: &str, fstype: &'static str, data: Option<&str>| ViewMount {
            dir: dir.into(),
            fstype,
            data: data.map(Into::into),
        };
        assert_eq!(
            got,
            View::V1(vec![
                m("cpu", "cgroup", Some("cpu")),
                m("memory", "cgroup", Some("memory")),
                m("cpu,cpuacct", "cgroup", Some("cpu,cpuacct")),
                m("freezer", "cgroup", Some("freezer")),
            ])
        );
        let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(view_from_mountinfo(v2, "/sys/fs/cgroup"), Some(View::V2));
        assert_eq!(View::V2.mounts()[0].dir, "");
        assert_eq!(
            view_from_mountinfo("garbage\n1 2 3\n", "/sys/fs/cgroup"),
            None
        );
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }
}
