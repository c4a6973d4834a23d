//! The eviction manager's loop (effectful: /proc, cgroup files, statvfs, the pod tree on
//! disk, the shims, the pod manager). Each pass measures the signals, lets
//! [`State::observe`](super::thresholds::State::observe) decide, publishes the pressure
//! conditions, and evicts at most one pod; after an eviction it waits (up to 30 s, the
//! kubelet's `podCleanupTimeout`) for the pod's containers to stop before the next pass.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::state::Status;
use k8s_openapi::api::core::v1::Pod;

use super::rank::{self, Candidate, ContainerStats, PodStats};
use super::thresholds::{self, Observation, Observations, Resource, Signal, State};
use super::{EvictionConfig, NodePressure, NodeReclaim};
use crate::worker::PodManager;

/// How long the manager waits for an evicted pod's containers to stop.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Files counted in one directory tree before the walk gives up (a bound on each pass).
const WALK_LIMIT: u64 = 1_000_000;

/// Where the manager measures.
#[derive(Debug, Clone)]
pub struct EvictionPaths {
    /// The agent's root dir: its filesystem is nodefs; pods' emptyDirs live under it.
    pub root_dir: PathBuf,
    /// The image store (imagefs).
    pub image_dir: PathBuf,
    /// CRI logs (`/var/log/pods`).
    pub pod_log_dir: PathBuf,
    /// The cgroup filesystem root (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
}

/// The eviction manager (see the module docs).
pub struct EvictionManager {
    cfg: EvictionConfig,
    paths: EvictionPaths,
    pressure: Arc<NodePressure>,
    pods: Option<Arc<PodManager>>,
    shim: Option<ShimRuntime>,
    reclaim: Arc<dyn NodeReclaim>,
    state: State,
    started: Instant,
}

use crate::api::stats::{read_u64, stat_field};

fn meminfo(field: &str) -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `memory.available` as the kubelet computes it: capacity − working set of the root
/// cgroup (usage − inactive file pages). cgroup v1: the memory hierarchy's root
/// `memory.usage_in_bytes` and `total_inactive_file`; v2: the root has no `memory.current`,
/// so usage is MemTotal − MemFree (as runc's fs2 reads the root) and `inactive_file` comes
/// from the root `memory.stat`.
pub fn memory_observation(cgroup_root: &Path) -> Option<Observation> {
    let capacity = meminfo("MemTotal:")?;
    let v1 = cgroup_root.join("memory");
    let ws = if let Some(u) = read_u64(&v1.join("memory.usage_in_bytes")) {
        u.saturating_sub(stat_field(&v1.join("memory.stat"), "total_inactive_file").unwrap_or(0))
    } else if cgroup_root.join("cgroup.controllers").exists() {
        let usage = capacity.saturating_sub(meminfo("MemFree:")?);
        usage.saturating_sub(
            stat_field(&cgroup_root.join("memory.stat"), "inactive_file").unwrap_or(0),
        )
    } else {
        capacity.saturating_sub(meminfo("MemAvailable:")?)
    };
    Some(Observation {
        available: i128::from(capacity.saturating_sub(ws)),
        capacity: i128::from(capacity),
    })
}

/// (bytes available, bytes capacity, inodes free, inodes) of the filesystem holding `p`.
fn fs_observation(p: &Path) -> Option<(Observation, Observation)> {
    let mut dir = p.to_path_buf();
    while !dir.exists() {
        dir = dir.parent()?.to_path_buf();
    }
    let s = nix::sys::statvfs::statvfs(&dir).ok()?;
    #[allow(clippy::useless_conversion)]
    let frag = i128::from(s.fragment_size());
    #[allow(clippy::useless_conversion)]
    Some((
        Observation {
            available: i128::from(s.blocks_available()) * frag,
            capacity: i128::from(s.blocks()) * frag,
        },
        Observation {
            available: i128::from(s.files_free()),
            capacity: i128::from(s.files()),
        },
    ))
}

/// Every signal hako measures (effectful, blocking).
pub fn observe(paths: &EvictionPaths) -> Observations {
    let mut o = Observations::new();
    if let Some(m) = memory_observation(&paths.cgroup_root) {
        o.insert(Signal::MemoryAvailable, m);
    }
    if let Some((bytes, inodes)) = fs_observation(&paths.root_dir) {
        o.insert(Signal::NodeFsAvailable, bytes);
        o.insert(Signal::NodeFsInodesFree, inodes);
    }
    if let Some((bytes, _)) = fs_observation(&paths.image_dir) {
        o.insert(Signal::ImageFsAvailable, bytes);
    }
    let pid_max = read_u64(Path::new("/proc/sys/kernel/pid_max")).unwrap_or(32768);
    let threads_max = read_u64(Path::new("/proc/sys/kernel/threads-max")).unwrap_or(pid_max);
    let max = pid_max.min(threads_max);
    if let Ok(si) = nix::sys::sysinfo::sysinfo() {
        o.insert(
            Signal::PidAvailable,
            Observation {
                available: i128::from(max) - i128::from(si.process_count()),
                capacity: i128::from(max),
            },
        );
    }
    o
}

/// (bytes, inodes) of a directory tree, not following symlinks nor leaving its filesystem
/// (the kubelet's `du`), bounded by [`WALK_LIMIT`] entries.
pub fn disk_usage(root: &Path) -> Option<(u64, u64)> {
    let top = std::fs::symlink_metadata(root).ok()?;
    let dev = top.dev();
    let (mut bytes, mut inodes, mut seen) = (0u64, 0u64, 0u64);
    let mut stack = vec![(root.to_path_buf(), top)];
    while let Some((p, md)) = stack.pop() {
        seen += 1;
        if seen > WALK_LIMIT {
            break;
        }
        bytes = bytes.saturating_add(md.blocks().saturating_mul(512));
        inodes += 1;
        if md.is_dir() {
            let Ok(rd) = std::fs::read_dir(&p) else {
                continue;
            };
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.dev() == dev {
                        stack.push((e.path(), m));
                    }
                }
            }
        }
    }
    Some((bytes, inodes))
}

/// A pod's figures (effectful, blocking): memory working set and processes of its running
/// containers, writable layers and logs per container, and its disk-backed emptyDirs.
pub fn pod_stats(pod: &Pod, paths: &EvictionPaths, shim: &ShimRuntime) -> Option<PodStats> {
    let uid = pod.metadata.uid.clone()?;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut metas = crate::sys::runtime::read_metas(&paths.root_dir, &uid);
    metas.sort_by(|a, b| (&a.name, b.attempt).cmp(&(&b.name, a.attempt)));
    let mut s = PodStats::default();
    let log_dir = paths.pod_log_dir.join(format!("{ns}_{name}_{uid}"));
    let mut latest: BTreeMap<String, ContainerStats> = BTreeMap::new();
    for m in &metas {
        let client = shim.client(&m.id);
        let upper = disk_usage(&client.dir().join("upper"));
        if let Some((b, i)) = upper {
            s.ephemeral_bytes += b;
            s.inodes += i;
        }
        let first = !latest.contains_key(&m.name);
        let mut cs = ContainerStats {
            name: m.name.clone(),
            rootfs_bytes: upper.map(|u| u.0),
            ..Default::default()
        };
        if first {
            if let Ok(st) = client.state() {
                if st.status == Status::Running {
                    let (_, mem) = crate::api::stats::cgroup_usage(&st.cgroup_dirs);
                    let ws = mem.map(|m| m.1);
                    s.memory_working_set += ws.unwrap_or(0);
                    cs.memory_working_set = ws;
                    s.processes += st
                        .cgroup_dirs
                        .iter()
                        .find_map(|d| read_u64(&d.join("pids.current")))
                        .unwrap_or(0);
                }
            }
            let logs = disk_usage(&log_dir.join(&m.name));
            if let Some((b, i)) = logs {
                s.ephemeral_bytes += b;
                s.inodes += i;
            }
            cs.logs_bytes = logs.map(|l| l.0).or(Some(0));
            latest.insert(m.name.clone(), cs);
        } else if let (Some(u), Some(l)) = (upper, latest.get_mut(&m.name)) {
            // Writable layers of earlier instances count for the container too.
            l.rootfs_bytes = Some(l.rootfs_bytes.unwrap_or(0) + u.0);
        }
    }
    let empty_dirs = paths
        .root_dir
        .join("pods")
        .join(&uid)
        .join("volumes")
        .join("kubernetes.io~empty-dir");
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(ed) = &v.empty_dir else { continue };
        if ed.medium.as_deref() == Some("Memory") {
            continue;
        }
        if let Some((b, i)) = disk_usage(&empty_dirs.join(&v.name)) {
            s.ephemeral_bytes += b;
            s.inodes += i;
        }
    }
    s.containers = latest.into_values().collect();
    Some(s)
}

fn active(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Failed" | "Succeeded")) && p.metadata.deletion_timestamp.is_none()
}

impl EvictionManager {
    /// A manager that publishes into `pressure` and evicts through `pods` (None: conditions
    /// only). `reclaim` runs before pods are evicted for disk.
    pub fn new(
        cfg: EvictionConfig,
        paths: EvictionPaths,
        pressure: Arc<NodePressure>,
        pods: Option<Arc<PodManager>>,
        shim: Option<ShimRuntime>,
        reclaim: Arc<dyn NodeReclaim>,
    ) -> Self {
        pressure.set_static_pods_protected(cfg.static_pods_protected);
        Self {
            cfg,
            paths,
            pressure,
            pods,
            shim,
            reclaim,
            state: State::default(),
            started: Instant::now(),
        }
    }

    /// Runs the passes forever (spawn it).
    pub async fn run(mut self) {
        tracing::info!(
            thresholds = ?self.cfg.thresholds.iter().map(|t| format!("{}<{:?} grace {:?}", t.signal.as_str(), t.value, t.grace_period)).collect::<Vec<_>>(),
            interval = ?self.cfg.monitoring_interval,
            "eviction manager started"
        );
        loop {
            let evicted = self.pass().await;
            match evicted {
                Some(uid) => self.wait_cleanup(&uid).await,
                None => tokio::time::sleep(self.cfg.monitoring_interval).await,
            }
        }
    }

    async fn measure(&self) -> Observations {
        let paths = self.paths.clone();
        tokio::task::spawn_blocking(move || observe(&paths))
            .await
            .unwrap_or_default()
    }

    /// One pass; returns the UID of the pod it evicted.
    pub async fn pass(&mut self) -> Option<String> {
        let obs = self.measure().await;
        let now = self.started.elapsed().as_secs_f64();
        let before = self.state.pressure();
        let d = self.state.observe(
            &self.cfg.thresholds,
            &obs,
            now,
            self.cfg.pressure_transition_period,
        );
        let p = self.state.pressure();
        if p != before {
            tracing::info!(
                memory = p.memory,
                disk = p.disk,
                pid = p.pid,
                "node pressure conditions changed"
            );
        }
        self.pressure.set(p);
        let t = d.to_reclaim.first()?.clone();
        let resource = t.signal.resource();
        tracing::warn!(
            signal = t.signal.as_str(),
            "eviction threshold met: attempting to reclaim {}",
            resource.as_str()
        );
        if matches!(resource, Resource::EphemeralStorage | Resource::Inodes)
            && self.reclaim_node(&t, &obs).await
        {
            tracing::info!(
                "eviction manager: able to reduce resource pressure without evicting pods"
            );
            return None;
        }
        let mgr = self.pods.clone()?;
        let shim = self.shim.clone()?;
        let pods: Vec<Pod> = mgr.pods().into_iter().filter(active).collect();
        if pods.is_empty() {
            tracing::warn!("eviction thresholds are met, but no pods are active to evict");
            return None;
        }
        let paths = self.paths.clone();
        let mut cands = tokio::task::spawn_blocking(move || {
            pods.into_iter()
                .map(|p| {
                    let stats = pod_stats(&p, &paths, &shim);
                    Candidate { pod: p, stats }
                })
                .collect::<Vec<_>>()
        })
        .await
        .ok()?;
        rank::rank(&mut cands, resource);
        let hard = t.is_hard();
        for c in cands
            .iter()
            .filter(|c| !rank::is_critical(&c.pod, self.cfg.static_pods_protected))
        {
            let uid = c.pod.metadata.uid.clone().unwrap_or_default();
            let msg = rank::message(resource, c, &d.to_reclaim, &obs);
            let grace = self.cfg.grace(
                hard,
                c.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds),
            );
            if mgr.evict(&uid, msg.clone(), grace) {
                tracing::warn!(
                    pod = %format!("{}/{}", c.pod.metadata.namespace.as_deref().unwrap_or(""), c.pod.metadata.name.as_deref().unwrap_or("")),
                    signal = t.signal.as_str(),
                    ?grace,
                    "evicted pod: {msg}"
                );
                return Some(uid);
            }
        }
        tracing::warn!("eviction manager: unable to evict any pods from the node");
        None
    }

    /// Node-level reclaim for a disk threshold; true when no threshold is met any more.
    async fn reclaim_node(&self, t: &thresholds::Threshold, obs: &Observations) -> bool {
        let want = obs.get(&t.signal).map_or(0, |o| {
            let target =
                t.value.amount(o.capacity) + t.min_reclaim.map_or(0, |m| m.amount(o.capacity));
            u64::try_from(target - o.available).unwrap_or(0)
        });
        match self.reclaim.reclaim_disk(want).await {
            Ok(0) => return false,
            Ok(n) => tracing::info!(freed = n, "node-level reclaim freed disk space"),
            Err(e) => {
                tracing::warn!("{e}");
                return false;
            }
        }
        let after = self.measure().await;
        thresholds::thresholds_met(&self.cfg.thresholds, &after, true).is_empty()
    }

    async fn wait_cleanup(&self, uid: &str) {
        let Some(mgr) = &self.pods else { return };
        let until = Instant::now() + CLEANUP_TIMEOUT;
        while Instant::now() < until {
            let done = mgr
                .pods()
                .iter()
                .find(|p| p.metadata.uid.as_deref() == Some(uid))
                .is_none_or(|p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.phase.as_deref() == Some("Failed")
                            && s.container_statuses
                                .iter()
                                .flatten()
                                .all(|c| c.state.as_ref().is_none_or(|s| s.running.is_none()))
                    })
                });
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::info!(%uid, "eviction manager: timed out waiting for the evicted pod to be cleaned up");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn du_counts_files_and_dirs() {
        let d = std::env::temp_dir().join(format!("hako-evict-du-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        std::fs::write(d.join("sub/a"), vec![7u8; 64 << 10]).expect("write");
        std::os::unix::fs::symlink("/usr", d.join("link")).expect("symlink");
        let (bytes, inodes) = disk_usage(&d).expect("du");
        let _ = std::fs::remove_dir_all(&d);
        assert!(bytes >= 64 << 10, "{bytes}");
        assert!(bytes < 1 << 20, "the symlink is not followed: {bytes}");
        assert_eq!(inodes, 4);
        assert!(disk_usage(Path::new("/nonexistent/hako")).is_none());
    }

    #[test]
    fn node_observations() {
        let d = std::env::temp_dir();
        let o = observe(&EvictionPaths {
            root_dir: d.clone(),
            image_dir: d.join("images-not-made"),
            pod_log_dir: d.clone(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        });
        let m = o.get(&Signal::MemoryAvailable).expect("memory");
        assert!(m.available > 0 && m.available <= m.capacity);
        let n = o.get(&Signal::NodeFsAvailable).expect("nodefs");
        assert!(n.capacity > 0);
        assert_eq!(o.get(&Signal::ImageFsAvailable), Some(n), "same filesystem");
        let p = o.get(&Signal::PidAvailable).expect("pids");
        assert!(p.available > 0 && p.available < p.capacity);
    }
}
