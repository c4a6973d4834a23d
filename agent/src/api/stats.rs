//! Per-container and per-pod usage for the kubelet API's `/metrics/resource` and
//! `/stats/summary` (what metrics-server scrapes for `kubectl top`): CPU seconds and memory
//! working set read from each running container's cgroup (v1 `cpuacct.usage`,
//! `memory.usage_in_bytes` − `total_inactive_file`; v2 `cpu.stat` `usage_usec`,
//! `memory.current` − `inactive_file`, as cAdvisor computes the working set). Pod figures are
//! the sums of their running containers. Volume figures ([`VolumeUsage`]) are the kubelet's:
//! emptyDir volumes by a `du -x`-like walk (used bytes and inodes) on top of the statfs of the
//! filesystem holding them, `local` PersistentVolumes by statfs alone; they are the `volume`
//! entries of `/stats/summary` and, for claims, the `kubelet_volume_stats_*` series of
//! `/metrics`. Reading is effectful; rendering and the figure arithmetic are pure.

use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::state::Status;
use k8s_openapi::api::core::v1::Pod;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One running container's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerUsage {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub uid: String,
    /// Container name.
    pub container: String,
    /// Cumulative CPU time in seconds.
    pub cpu_seconds: f64,
    /// Memory usage (bytes).
    pub memory_usage: u64,
    /// Working set: usage minus inactive file pages (bytes).
    pub memory_working_set: u64,
    /// Start time, seconds since the epoch.
    pub start_time: Option<i64>,
}

/// A file holding one number (a cgroup control file).
pub(crate) fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The value of `key` in a `key value` per line file (`memory.stat`, `cpu.stat`).
pub(crate) fn stat_field(p: &Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// CPU nanoseconds and (usage, working set) bytes from a container's cgroup directories
/// (effectful; figures the directories do not have are None).
pub fn cgroup_usage(dirs: &[PathBuf]) -> (Option<u64>, Option<(u64, u64)>) {
    let (mut cpu, mut mem) = (None, None);
    for d in dirs {
        if cpu.is_none() {
            cpu = read_u64(&d.join("cpuacct.usage")).or_else(|| {
                stat_field(&d.join("cpu.stat"), "usage_usec").map(|u| u.saturating_mul(1000))
            });
        }
        if mem.is_none() {
            if let Some(u) = read_u64(&d.join("memory.usage_in_bytes")) {
                let inactive =
                    stat_field(&d.join("memory.stat"), "total_inactive_file").unwrap_or(0);
                mem = Some((u, u.saturating_sub(inactive)));
            } else if let Some(u) = read_u64(&d.join("memory.current")) {
                let inactive = stat_field(&d.join("memory.stat"), "inactive_file").unwrap_or(0);
                mem = Some((u, u.saturating_sub(inactive)));
            }
        }
    }
    (cpu, mem)
}

/// The figures of every running container of `pods` (effectful, blocking: asks the shims).
pub fn collect(pods: &[Pod], root_dir: &Path, shim: &ShimRuntime) -> Vec<ContainerUsage> {
    let mut out = Vec::new();
    for p in pods {
        let Some(uid) = crate::api::kubelet_api::runtime_uid(p) else {
            continue;
        };
        let mut metas = crate::sys::runtime::read_metas(root_dir, &uid);
        metas.sort_by(|a, b| (&a.name, b.attempt).cmp(&(&b.name, a.attempt)));
        metas.dedup_by(|a, b| a.name == b.name);
        for m in metas {
            let Ok(st) = shim.client(&m.id).state() else {
                continue;
            };
            if st.status != Status::Running {
                continue;
            }
            let (cpu, mem) = cgroup_usage(&st.cgroup_dirs);
            let (usage, ws) = mem.unwrap_or((0, 0));
            #[allow(clippy::cast_precision_loss)]
            let cpu_seconds = cpu.unwrap_or(0) as f64 / 1e9;
            out.push(ContainerUsage {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                pod: p.metadata.name.clone().unwrap_or_default(),
                uid: uid.clone(),
                container: m.name,
                cpu_seconds,
                memory_usage: usage,
                memory_working_set: ws,
                start_time: st
                    .started_at
                    .as_deref()
                    .and_then(|t| k8s_openapi::chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.timestamp()),
            });
        }
    }
    out
}

/// Figures of one filesystem or volume, in bytes and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsFigures {
    /// Size of the filesystem.
    pub capacity: u64,
    /// Bytes available to unprivileged users.
    pub available: u64,
    /// Bytes used (by the volume: du for emptyDir, the whole filesystem for a PV).
    pub used: u64,
    /// Total inodes.
    pub inodes: u64,
    /// Free inodes.
    pub inodes_free: u64,
    /// Inodes used (by the volume for emptyDir, the filesystem for a PV).
    pub inodes_used: u64,
}

/// The kubelet's `MetricsStatFS` arithmetic: capacity = blocks × fragment size, available =
/// blocks available × fragment size, used = (blocks − free blocks) × fragment size, inodes
/// used = files − free files.
pub fn statfs_figures(
    blocks: u64,
    blocks_free: u64,
    blocks_avail: u64,
    fragment: u64,
    files: u64,
    files_free: u64,
) -> FsFigures {
    FsFigures {
        capacity: blocks.saturating_mul(fragment),
        available: blocks_avail.saturating_mul(fragment),
        used: blocks.saturating_sub(blocks_free).saturating_mul(fragment),
        inodes: files,
        inodes_free: files_free,
        inodes_used: files.saturating_sub(files_free),
    }
}

/// The kubelet's `MetricsDu` combination: the filesystem's capacity, available bytes and
/// inodes, with the volume's own used bytes and inodes.
pub fn du_figures(fs: FsFigures, du_bytes: u64, du_inodes: u64) -> FsFigures {
    FsFigures {
        used: du_bytes,
        inodes_used: du_inodes,
        ..fs
    }
}

/// statfs of `path` (effectful).
pub fn statfs(path: &Path) -> Option<FsFigures> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    #[allow(clippy::useless_conversion)]
    Some(statfs_figures(
        u64::from(s.blocks()),
        u64::from(s.blocks_free()),
        u64::from(s.blocks_available()),
        u64::from(s.fragment_size()),
        u64::from(s.files()),
        u64::from(s.files_free()),
    ))
}

/// Most entries one `du` walk visits (a bound on the work of one scrape).
pub const DU_MAX_ENTRIES: u64 = 1_000_000;

/// `du -x -s -B 1` and an inode count of `dir` (effectful): allocated bytes (512-byte blocks)
/// and entries, the directory itself included, never following symlinks nor leaving its
/// filesystem; stops after [`DU_MAX_ENTRIES`].
pub fn du(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(dir).ok()?;
    let dev = top.dev();
    let (mut bytes, mut inodes) = (top.blocks().saturating_mul(512), 1u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if inodes >= DU_MAX_ENTRIES {
                return Some((bytes, inodes));
            }
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            inodes += 1;
            bytes = bytes.saturating_add(m.blocks().saturating_mul(512));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Some((bytes, inodes))
}

/// One pod volume's figures (the kubelet's `VolumeStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID (the runtime UID: a static pod's own).
    pub uid: String,
    /// Volume name in the pod.
    pub name: String,
    /// The claim, for `persistentVolumeClaim` volumes.
    pub claim: Option<String>,
    /// The figures.
    pub fs: FsFigures,
}

/// The figures of every emptyDir and `local` PersistentVolume of `pods` that is set up under
/// `root_dir` (effectful, blocking). hostPath volumes (also hostPath PVs) have none, as with
/// the kubelet; configMap, secret, downwardAPI and projected volumes are left out here.
pub fn collect_volumes(pods: &[Pod], root_dir: &Path) -> Vec<VolumeUsage> {
    let mut out = Vec::new();
    for p in pods {
        let Some(uid) = crate::api::kubelet_api::runtime_uid(p) else {
            continue;
        };
        if uid.contains('/') || uid.starts_with('.') {
            continue;
        }
        let base = root_dir.join("pods").join(&uid).join("volumes");
        for v in p.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            if v.name.contains('/') || v.name.starts_with('.') {
                continue;
            }
            let (fs, claim) = if v.empty_dir.is_some() {
                let dir = base.join("kubernetes.io~empty-dir").join(&v.name);
                let (Some(fs), Some((b, i))) = (statfs(&dir), du(&dir)) else {
                    continue;
                };
                (du_figures(fs, b, i), None)
            } else if let Some(c) = &v.persistent_volume_claim {
                let dir = base.join("kubernetes.io~local-volume").join(&v.name);
                if !crate::sys::volumes::mount::is_mount_point(&dir) {
                    continue;
                }
                let Some(fs) = statfs(&dir) else { continue };
                (fs, Some(c.claim_name.clone()))
            } else {
                continue;
            };
            out.push(VolumeUsage {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                pod: p.metadata.name.clone().unwrap_or_default(),
                uid: uid.clone(),
                name: v.name.clone(),
                claim,
                fs,
            });
        }
    }
    out
}

/// A volume metric's name, help and value.
type VolumeSeries = (&'static str, &'static str, fn(&FsFigures) -> u64);

/// The `kubelet_volume_stats_*` series of `/metrics` (claims only, labels `namespace` and
/// `persistentvolumeclaim`, as the kubelet's volume stats collector; a claim mounted by
/// several pods is reported once).
pub fn render_volume_metrics(vols: &[VolumeUsage]) -> String {
    let mut o = String::new();
    let mut seen = std::collections::BTreeMap::new();
    for v in vols {
        if let Some(c) = &v.claim {
            seen.entry((v.namespace.clone(), c.clone())).or_insert(v.fs);
        }
    }
    let series: [VolumeSeries; 6] = [
        (
            "kubelet_volume_stats_capacity_bytes",
            "Capacity in bytes of the volume",
            |f| f.capacity,
        ),
        (
            "kubelet_volume_stats_available_bytes",
            "Number of available bytes in the volume",
            |f| f.available,
        ),
        (
            "kubelet_volume_stats_used_bytes",
            "Number of used bytes in the volume",
            |f| f.used,
        ),
        (
            "kubelet_volume_stats_inodes",
            "Maximum number of inodes in the volume",
            |f| f.inodes,
        ),
        (
            "kubelet_volume_stats_inodes_free",
            "Number of free inodes in the volume",
            |f| f.inodes_free,
        ),
        (
            "kubelet_volume_stats_inodes_used",
            "Number of used inodes in the volume",
            |f| f.inodes_used,
        ),
    ];
    for (name, help, value) in series {
        let _ = writeln!(o, "# HELP {name} [ALPHA] {help}\n# TYPE {name} gauge");
        for ((ns, claim), fs) in &seen {
            let _ = writeln!(
                o,
                "{name}{{namespace=\"{}\",persistentvolumeclaim=\"{}\"}} {}",
                esc(ns),
                esc(claim),
                value(fs)
            );
        }
    }
    o
}

/// The `volume` entries of one pod in `/stats/summary`.
fn summary_volumes(uid: &str, vols: &[VolumeUsage], time: &str) -> Vec<serde_json::Value> {
    vols.iter()
        .filter(|v| v.uid == uid)
        .map(|v| {
            let mut j = serde_json::json!({"time": time, "name": v.name,
                "availableBytes": v.fs.available, "capacityBytes": v.fs.capacity,
                "usedBytes": v.fs.used, "inodesFree": v.fs.inodes_free,
                "inodes": v.fs.inodes, "inodesUsed": v.fs.inodes_used});
            if let Some(c) = &v.claim {
                j["pvcRef"] = serde_json::json!({"name": c, "namespace": v.namespace});
            }
            j
        })
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric's name, type, help and value of a container.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ContainerUsage) -> Option<String>,
);

/// The container and pod part of `/metrics/resource` (Prometheus text; `ts` in ms).
pub fn render_resource(cs: &[ContainerUsage], ts: i64) -> String {
    let mut o = String::new();
    let series: [Series; 3] = [
        (
            "container_cpu_usage_seconds_total",
            "counter",
            "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
            |c| Some(c.cpu_seconds.to_string()),
        ),
        (
            "container_memory_working_set_bytes",
            "gauge",
            "[STABLE] Current working set of the container in bytes",
            |c| Some(c.memory_working_set.to_string()),
        ),
        (
            "container_start_time_seconds",
            "gauge",
            "[STABLE] Start time of the container since unix epoch in seconds",
            |c| c.start_time.map(|t| t.to_string()),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for c in cs {
            if let Some(v) = value(c) {
                let _ = writeln!(
                    o,
                    "{name}{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {v} {ts}",
                    esc(&c.container),
                    esc(&c.namespace),
                    esc(&c.pod)
                );
            }
        }
    }
    let pods = by_pod(cs);
    let _ = writeln!(o, "# HELP pod_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the pod in core-seconds\n# TYPE pod_cpu_usage_seconds_total counter");
    for (ns, pod, cpu, _, _) in &pods {
        let _ = writeln!(
            o,
            "pod_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"{}\"}} {cpu} {ts}",
            esc(ns),
            esc(pod)
        );
    }
    let _ = writeln!(o, "# HELP pod_memory_working_set_bytes [STABLE] Current working set of the pod in bytes\n# TYPE pod_memory_working_set_bytes gauge");
    for (ns, pod, _, _, ws) in &pods {
        let _ = writeln!(
            o,
            "pod_memory_working_set_bytes{{namespace=\"{}\",pod=\"{}\"}} {ws} {ts}",
            esc(ns),
            esc(pod)
        );
    }
    o
}

/// The kubelet's own `/metrics` (Prometheus text): `kubelet_node_name`, then the agent's
/// metrics (`agent`, [`crate::api::healthz::AgentMetrics::render`]: running pods and containers by
/// state, starts, probe results, pod start and worker durations, errors), the same set the
/// agent serves on its healthz address.
pub fn render_kubelet_metrics(node: &str, agent: &str) -> String {
    format!(
        "# HELP kubelet_node_name [ALPHA] The node's name. The count is always 1.\n\
         # TYPE kubelet_node_name gauge\n\
         kubelet_node_name{{node=\"{}\"}} 1\n{agent}",
        esc(node),
    )
}

/// (namespace, pod, cpu seconds, memory usage, working set) per pod, in first-seen order.
fn by_pod(cs: &[ContainerUsage]) -> Vec<(String, String, f64, u64, u64)> {
    let mut v: Vec<(String, String, f64, u64, u64)> = Vec::new();
    for c in cs {
        match v.iter_mut().find(|p| p.0 == c.namespace && p.1 == c.pod) {
            Some(p) => {
                p.2 += c.cpu_seconds;
                p.3 += c.memory_usage;
                p.4 += c.memory_working_set;
            }
            None => v.push((
                c.namespace.clone(),
                c.pod.clone(),
                c.cpu_seconds,
                c.memory_usage,
                c.memory_working_set,
            )),
        }
    }
    v
}

/// The `pods` section of `/stats/summary`: every pod, with the figures of its running
/// containers and their sums, and its volumes' figures (`time` is the RFC 3339 sample time).
pub fn summary_pods(
    pods: &[Pod],
    cs: &[ContainerUsage],
    vols: &[VolumeUsage],
    time: &str,
) -> Vec<serde_json::Value> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let ns = |s: f64| (s * 1e9) as u64;
    pods.iter()
        .map(|p| {
            let uid = crate::api::kubelet_api::runtime_uid(p).unwrap_or_default();
            let mine: Vec<&ContainerUsage> = cs.iter().filter(|c| c.uid == uid).collect();
            let containers: Vec<serde_json::Value> = mine
                .iter()
                .map(|c| {
                    let start = c
                        .start_time
                        .and_then(|t| k8s_openapi::chrono::DateTime::from_timestamp(t, 0))
                        .map(|t| t.to_rfc3339());
                    serde_json::json!({"name": c.container, "startTime": start,
                        "cpu": {"time": time, "usageCoreNanoSeconds": ns(c.cpu_seconds)},
                        "memory": {"time": time, "usageBytes": c.memory_usage,
                                   "workingSetBytes": c.memory_working_set}})
                })
                .collect();
            let cpu: f64 = mine.iter().map(|c| c.cpu_seconds).sum();
            let usage: u64 = mine.iter().map(|c| c.memory_usage).sum();
            let ws: u64 = mine.iter().map(|c| c.memory_working_set).sum();
            let start = p.status.as_ref().and_then(|s| s.start_time.as_ref()).map(|t| t.0.to_rfc3339());
            let mut v = serde_json::json!({"podRef": {"name": p.metadata.name, "namespace": p.metadata.namespace,
                    "uid": p.metadata.uid},
                "startTime": start, "containers": containers});
            let volumes = summary_volumes(&uid, vols, time);
            if !volumes.is_empty() {
                v["volume"] = serde_json::Value::Array(volumes);
            }
            if !mine.is_empty() {
                v["cpu"] = serde_json::json!({"time": time, "usageCoreNanoSeconds": ns(cpu)});
                v["memory"] = serde_json::json!({"time": time, "usageBytes": usage, "workingSetBytes": ws});
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cu(pod: &str, c: &str, cpu: f64, ws: u64) -> ContainerUsage {
        ContainerUsage {
            namespace: "default".into(),
            pod: pod.into(),
            uid: format!("u-{pod}"),
            container: c.into(),
            cpu_seconds: cpu,
            memory_usage: ws + 10,
            memory_working_set: ws,
            start_time: Some(1_700_000_000),
        }
    }

    #[test]
    fn volume_figures() {
        // statfs: used counts free (not just available) blocks; inodes used = files - free.
        let f = statfs_figures(1000, 300, 250, 4096, 500, 120);
        assert_eq!(
            f,
            FsFigures {
                capacity: 4_096_000,
                available: 1_024_000,
                used: 2_867_200,
                inodes: 500,
                inodes_free: 120,
                inodes_used: 380
            }
        );
        assert_eq!(
            statfs_figures(10, 20, 0, 4096, 0, 1).used,
            0,
            "no underflow"
        );
        // du: the volume's own use on top of the filesystem's size.
        let d = du_figures(f, 8192, 3);
        assert_eq!(
            (d.used, d.inodes_used, d.capacity, d.inodes),
            (8192, 3, 4_096_000, 500)
        );
        // A real walk: the directory, a file of 10000 bytes and a subdirectory.
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("sub")).expect("mkdir");
        std::fs::write(t.path().join("sub/f"), vec![1u8; 10_000]).expect("w");
        let (bytes, inodes) = du(t.path()).expect("du");
        assert_eq!(inodes, 3);
        assert!(bytes >= 10_000, "{bytes}");
        // A pod's emptyDir under a root dir, and a claim that is not mounted (skipped).
        let root = tempfile::tempdir().expect("tmp");
        let ed = root
            .path()
            .join("pods/u1/volumes/kubernetes.io~empty-dir/scratch");
        std::fs::create_dir_all(&ed).expect("mkdir");
        std::fs::write(ed.join("x"), vec![0u8; 5000]).expect("w");
        let pod: Pod = serde_yaml::from_str(
            "metadata: {name: p, namespace: ns, uid: u1}\nspec:\n  containers: []\n  volumes:\n  - {name: scratch, emptyDir: {}}\n  - {name: data, persistentVolumeClaim: {claimName: c}}\n  - {name: h, hostPath: {path: /}}",
        )
        .expect("pod");
        let v = collect_volumes(&[pod], root.path());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].name.as_str(), v[0].fs.inodes_used), ("scratch", 2));
        assert!(v[0].fs.used >= 5000 && v[0].fs.capacity > 0, "{v:?}");
    }

    #[test]
    fn cgroup_v1_and_v2_files() {
        let t = tempfile::tempdir().expect("tmp");
        let (cpu, mem, v2) = (
            t.path().join("cpu"),
            t.path().join("mem"),
            t.path().join("v2"),
        );
        for d in [&cpu, &mem, &v2] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(cpu.join("cpuacct.usage"), "1500000000\n").expect("w");
        std::fs::write(mem.join("memory.usage_in_bytes"), "1000\n").expect("w");
        std::fs::write(
            mem.join("memory.stat"),
            "cache 5\ninactive_file 1\ntotal_inactive_file 300\n",
        )
        .expect("w");
        assert_eq!(
            cgroup_usage(&[cpu, mem]),
            (Some(1_500_000_000), Some((1000, 700)))
        );
        std::fs::write(v2.join("cpu.stat"), "usage_usec 2000\nuser_usec 1\n").expect("w");
        std::fs::write(v2.join("memory.current"), "4096\n").expect("w");
        std::fs::write(v2.join("memory.stat"), "anon 1\ninactive_file 96\n").expect("w");
        assert_eq!(cgroup_usage(&[v2]), (Some(2_000_000), Some((4096, 4000))));
        assert_eq!(cgroup_usage(&[]), (None, None));
    }

    #[test]
    fn resource_text_and_summary() {
        let cs = [cu("web", "a", 1.5, 100), cu("web", "b", 0.5, 50)];
        let t = render_resource(&cs, 7);
        assert!(
            t.contains("container_cpu_usage_seconds_total{container=\"a\",namespace=\"default\",pod=\"web\"} 1.5 7\n"),
            "{t}"
        );
        assert!(
            t.contains("container_memory_working_set_bytes{container=\"b\",namespace=\"default\",pod=\"web\"} 50 7\n"),
            "{t}"
        );
        assert!(
            t.contains("pod_cpu_usage_seconds_total{namespace=\"default\",pod=\"web\"} 2 7\n"),
            "{t}"
        );
        assert!(
            t.contains("pod_memory_working_set_bytes{namespace=\"default\",pod=\"web\"} 150 7\n"),
            "{t}"
        );
        assert!(
            t.contains("container_start_time_seconds{container=\"a\""),
            "{t}"
        );
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.uid = Some("u-web".into());
        let vols = [VolumeUsage {
            namespace: "default".into(),
            pod: "web".into(),
            uid: "u-web".into(),
            name: "data".into(),
            claim: Some("data-claim".into()),
            fs: statfs_figures(100, 40, 30, 4096, 1000, 900),
        }];
        let s = summary_pods(&[pod], &cs, &vols, "now");
        assert_eq!(s[0]["volume"][0]["name"], "data");
        assert_eq!(s[0]["volume"][0]["usedBytes"], 60 * 4096);
        assert_eq!(s[0]["volume"][0]["pvcRef"]["name"], "data-claim");
        let m = render_volume_metrics(&vols);
        for line in [
            "kubelet_volume_stats_capacity_bytes{namespace=\"default\",persistentvolumeclaim=\"data-claim\"} 409600\n",
            "kubelet_volume_stats_available_bytes{namespace=\"default\",persistentvolumeclaim=\"data-claim\"} 122880\n",
            "kubelet_volume_stats_used_bytes{namespace=\"default\",persistentvolumeclaim=\"data-claim\"} 245760\n",
            "kubelet_volume_stats_inodes{namespace=\"default\",persistentvolumeclaim=\"data-claim\"} 1000\n",
            "kubelet_volume_stats_inodes_free{namespace=\"default\",persistentvolumeclaim=\"data-claim\"} 900\n",
            "kubelet_volume_stats_inodes_used{namespace=\"default\",persistentvolumeclaim=\"data-claim\"} 100\n",
        ] {
            assert!(m.contains(line), "{m}");
        }
        assert_eq!(s[0]["containers"].as_array().map(Vec::len), Some(2));
        assert_eq!(s[0]["cpu"]["usageCoreNanoSeconds"], 2_000_000_000u64);
        assert_eq!(s[0]["memory"]["workingSetBytes"], 150);
        let k = render_kubelet_metrics("n1", "kubelet_running_pods 1\n");
        assert!(
            k.ends_with("kubelet_node_name{node=\"n1\"} 1\nkubelet_running_pods 1\n"),
            "{k}"
        );
    }
}
