//! Per-container and per-pod usage for the kubelet API's `/metrics/resource` and
//! `/stats/summary` (what metrics-server scrapes for `kubectl top`): CPU seconds and memory
//! working set read from each running container's cgroup (v1 `cpuacct.usage`,
//! `memory.usage_in_bytes` − `total_inactive_file`; v2 `cpu.stat` `usage_usec`,
//! `memory.current` − `inactive_file`, as cAdvisor computes the working set). Pod figures are
//! the sums of their running containers. Reading is effectful; rendering is pure.

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

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn stat_field(p: &Path, key: &str) -> Option<u64> {
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
/// containers and their sums (`time` is the RFC 3339 sample time).
pub fn summary_pods(pods: &[Pod], cs: &[ContainerUsage], time: &str) -> Vec<serde_json::Value> {
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
        let s = summary_pods(&[pod], &cs, "now");
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
