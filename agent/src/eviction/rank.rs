//! Which pod goes first, and what it is told (pure): the kubelet's `rankMemoryPressure`,
//! `rankDiskPressureFunc` and `rankPIDPressure`, its critical-pod rule and its
//! `evictionMessage`.

use k8s_openapi::api::core::v1::Pod;

use super::thresholds::{Observations, Resource, Threshold};
use crate::model::quantity;

/// The lowest priority of a critical pod (`scheduling.SystemCriticalPriority`).
pub const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// One container's usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// Container name.
    pub name: String,
    /// Memory working set (bytes), when running.
    pub memory_working_set: Option<u64>,
    /// Writable layer (bytes).
    pub rootfs_bytes: Option<u64>,
    /// CRI log files (bytes).
    pub logs_bytes: Option<u64>,
}

/// What a pod uses, as the eviction manager sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Containers that have figures.
    pub containers: Vec<ContainerStats>,
    /// Memory working set of the pod (sum of its containers).
    pub memory_working_set: u64,
    /// Ephemeral storage: emptyDir (disk) + logs + writable layers.
    pub ephemeral_bytes: u64,
    /// Inodes of the same.
    pub inodes: u64,
    /// Processes in the pod's cgroups.
    pub processes: u64,
}

/// A pod with its figures.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The pod.
    pub pod: Pod,
    /// Its usage (None: no figures, counted as using nothing).
    pub stats: Option<PodStats>,
}

/// The pod's priority (`spec.priority`, 0 when unset).
pub fn priority(p: &Pod) -> i32 {
    p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// Whether the kubelet would refuse to evict the pod (`kubelettypes.IsCriticalPod`): a
/// static or mirror pod (when `static_pods_protected`), or priority ≥ 2000000000.
pub fn is_critical(p: &Pod, static_pods_protected: bool) -> bool {
    if priority(p) >= SYSTEM_CRITICAL_PRIORITY {
        return true;
    }
    if !static_pods_protected {
        return false;
    }
    let ann = p.metadata.annotations.as_ref();
    let source = ann.and_then(|a| a.get("kubernetes.io/config.source"));
    source.is_some_and(|s| s != "api")
        || ann.is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
}

/// A container's request of `resource` in units (requests, else limits as the apiserver
/// defaults them).
fn container_request(c: &k8s_openapi::api::core::v1::Container, resource: &str) -> i128 {
    let r = c.resources.as_ref();
    r.and_then(|r| r.requests.as_ref())
        .and_then(|m| m.get(resource))
        .or_else(|| {
            r.and_then(|r| r.limits.as_ref())
                .and_then(|m| m.get(resource))
        })
        .and_then(|q| quantity::parse(&q.0).ok())
        .map_or(0, |n| n.value())
}

fn usage(c: &Candidate, r: Resource) -> Option<i128> {
    let s = c.stats.as_ref()?;
    Some(i128::from(match r {
        Resource::Memory => s.memory_working_set,
        Resource::EphemeralStorage => s.ephemeral_bytes,
        Resource::Inodes => s.inodes,
        Resource::Pids => s.processes,
    }))
}

fn request(c: &Candidate, r: Resource) -> i128 {
    match r {
        Resource::Memory => crate::model::admit::pod_request(&c.pod, "memory"),
        Resource::EphemeralStorage => crate::model::admit::pod_request(&c.pod, "ephemeral-storage"),
        Resource::Inodes | Resource::Pids => 0,
    }
}

/// Whether usage exceeds requests (no figures: it does not).
fn exceeds(c: &Candidate, r: Resource) -> bool {
    usage(c, r).is_some_and(|u| u > request(c, r))
}

/// Sorts the pods into eviction order for a starved resource: memory and disk — pods above
/// their requests first, then lower priority first, then the most usage above requests;
/// pids — lower priority first, then the most processes. Ties keep the input order.
pub fn rank(pods: &mut [Candidate], r: Resource) {
    pods.sort_by(|a, b| {
        let by_priority = priority(a.pod_ref()).cmp(&priority(b.pod_ref()));
        match r {
            Resource::Pids => {
                by_priority.then_with(|| usage(b, r).unwrap_or(0).cmp(&usage(a, r).unwrap_or(0)))
            }
            _ => {
                let over = |c: &Candidate| usage(c, r).unwrap_or(0) - request(c, r);
                exceeds(b, r)
                    .cmp(&exceeds(a, r))
                    .then(by_priority)
                    .then_with(|| over(b).cmp(&over(a)))
            }
        }
    });
}

impl Candidate {
    fn pod_ref(&self) -> &Pod {
        &self.pod
    }
}

/// A byte or unit count as `resource.NewQuantity(v, BinarySI).String()` prints it: the
/// largest binary suffix that divides it exactly, else the plain number.
pub fn binary_si(v: i128) -> String {
    if v == 0 {
        return "0".into();
    }
    let mut n = v;
    let mut i = 0;
    while i < 6 && n % 1024 == 0 {
        n /= 1024;
        i += 1;
    }
    let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i];
    format!("{n}{suffix}")
}

fn quantity_text(c: &k8s_openapi::api::core::v1::Container, resource: &str) -> String {
    let r = c.resources.as_ref();
    r.and_then(|r| r.requests.as_ref())
        .and_then(|m| m.get(resource))
        .or_else(|| {
            r.and_then(|r| r.limits.as_ref())
                .and_then(|m| m.get(resource))
        })
        .map_or_else(|| "0".to_string(), |q| q.0.clone())
}

/// The kubelet's eviction message: "The node was low on resource: memory. Threshold
/// quantity: 100Mi, available: 51200Ki. Container hog was using 300Mi, request is 0, has
/// larger consumption of memory. "
pub fn message(r: Resource, c: &Candidate, thresholds: &[Threshold], obs: &Observations) -> String {
    let mut m = format!("The node was low on resource: {}. ", r.as_str());
    if let Some((t, o)) = thresholds
        .iter()
        .find(|t| t.signal.resource() == r)
        .and_then(|t| obs.get(&t.signal).map(|o| (t, o)))
    {
        m.push_str(&format!(
            "Threshold quantity: {}, available: {}. ",
            binary_si(t.value.amount(o.capacity)),
            binary_si(o.available)
        ));
    }
    let (Some(stats), Some(spec)) = (&c.stats, &c.pod.spec) else {
        return m;
    };
    let resource = match r {
        Resource::Memory => "memory",
        Resource::EphemeralStorage => "ephemeral-storage",
        _ => return m,
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for cs in &stats.containers {
        let Some(spec_c) = containers.clone().find(|x| x.name == cs.name) else {
            continue;
        };
        let used = match r {
            Resource::Memory => cs.memory_working_set,
            _ => cs.rootfs_bytes.zip(cs.logs_bytes).map(|(a, b)| a + b),
        };
        if let Some(u) = used.map(i128::from) {
            if u > container_request(spec_c, resource) {
                m.push_str(&format!(
                    "Container {} was using {}, request is {}, has larger consumption of {}. ",
                    cs.name,
                    binary_si(u),
                    quantity_text(spec_c, resource),
                    resource
                ));
            }
        }
    }
    m
}

/// The first pod of a ranked list that may be evicted (not critical).
pub fn pick(ranked: &[Candidate], static_pods_protected: bool) -> Option<&Candidate> {
    ranked
        .iter()
        .find(|c| !is_critical(&c.pod, static_pods_protected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eviction::thresholds::{Observation, Signal, Value};

    fn pod(name: &str, mem_req: Option<&str>, prio: i32) -> Pod {
        let res = match mem_req {
            Some(r) => serde_json::json!({"requests": {"memory": r}, "limits": {"memory": r}}),
            None => serde_json::json!({}),
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "uid": name, "namespace": "default"},
            "spec": {"priority": prio, "containers": [{"name": "c", "image": "busybox", "resources": res}]}
        }))
        .expect("pod")
    }

    fn cand(p: Pod, mem: u64) -> Candidate {
        Candidate {
            pod: p,
            stats: Some(PodStats {
                containers: vec![ContainerStats {
                    name: "c".into(),
                    memory_working_set: Some(mem),
                    rootfs_bytes: Some(mem / 2),
                    logs_bytes: Some(mem / 2),
                }],
                memory_working_set: mem,
                ephemeral_bytes: mem,
                inodes: 1,
                processes: mem / (1 << 20),
            }),
        }
    }

    fn names(v: &[Candidate]) -> Vec<String> {
        v.iter()
            .map(|c| c.pod.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn memory_ranking_as_the_kubelet() {
        // Guaranteed within requests, a burstable one above its requests, two BestEffort
        // pods (one bigger), a high-priority BestEffort.
        let mut v = vec![
            cand(pod("guaranteed", Some("512Mi"), 0), 400 << 20),
            cand(pod("small-be", None, 0), 10 << 20),
            cand(pod("burst-over", Some("100Mi"), 0), 300 << 20),
            cand(pod("big-be", None, 0), 200 << 20),
            cand(pod("important-be", None, 1000), 900 << 20),
        ];
        rank(&mut v, Resource::Memory);
        assert_eq!(
            names(&v),
            [
                "burst-over",
                "big-be",
                "small-be",
                "important-be",
                "guaranteed"
            ]
        );
        // Usage within requests always comes after usage above them, whatever the priority.
        let mut v = vec![
            cand(pod("within-low-prio", Some("1Gi"), -5), 100 << 20),
            cand(pod("over-high-prio", Some("1Mi"), 100), 2 << 20),
        ];
        rank(&mut v, Resource::Memory);
        assert_eq!(names(&v), ["over-high-prio", "within-low-prio"]);
        // No figures: counted as within requests.
        let mut v = vec![
            Candidate {
                pod: pod("unknown", None, 0),
                stats: None,
            },
            cand(pod("known", None, 0), 1),
        ];
        rank(&mut v, Resource::Memory);
        assert_eq!(names(&v), ["known", "unknown"]);
    }

    #[test]
    fn disk_and_pid_ranking() {
        let mut v = vec![
            cand(pod("a", None, 0), 10 << 20),
            cand(pod("b", None, 0), 50 << 20),
            cand(pod("c", None, -1), 1 << 20),
        ];
        rank(&mut v, Resource::EphemeralStorage);
        assert_eq!(names(&v), ["c", "b", "a"]);
        rank(&mut v, Resource::Pids);
        assert_eq!(names(&v), ["c", "b", "a"]);
        let mut v = vec![
            cand(pod("few", None, 0), 2 << 20),
            cand(pod("many", None, 0), 9 << 20),
        ];
        rank(&mut v, Resource::Pids);
        assert_eq!(names(&v), ["many", "few"]);
    }

    #[test]
    fn critical_pods_are_skipped() {
        let mut crit = pod("crit", None, SYSTEM_CRITICAL_PRIORITY);
        let v = vec![cand(crit.clone(), 1 << 30), cand(pod("x", None, 0), 1)];
        assert_eq!(
            pick(&v, true)
                .and_then(|c| c.pod.metadata.name.clone())
                .as_deref(),
            Some("x")
        );
        crit.spec.as_mut().expect("spec").priority = Some(0);
        crit.metadata.annotations = Some(
            [(
                "kubernetes.io/config.source".to_string(),
                "file".to_string(),
            )]
            .into(),
        );
        assert!(is_critical(&crit, true), "static pod in cluster mode");
        assert!(
            !is_critical(&crit, false),
            "standalone: the manifest dir is the workload"
        );
        let api: Pod = {
            let mut p = crit.clone();
            p.metadata.annotations =
                Some([("kubernetes.io/config.source".to_string(), "api".to_string())].into());
            p
        };
        assert!(!is_critical(&api, true));
        assert!(pick(&[cand(pod("c", None, SYSTEM_CRITICAL_PRIORITY), 1)], false).is_none());
    }

    #[test]
    fn messages_as_the_kubelet() {
        assert_eq!(binary_si(100 << 20), "100Mi");
        assert_eq!(binary_si(51200 << 10), "50Mi");
        assert_eq!(binary_si(1536), "1536");
        assert_eq!(binary_si(3 << 10), "3Ki");
        assert_eq!(binary_si(0), "0");
        let t = vec![Threshold {
            signal: Signal::MemoryAvailable,
            value: Value::Quantity(100 << 20),
            grace_period: std::time::Duration::ZERO,
            min_reclaim: None,
        }];
        let o: Observations = [(
            Signal::MemoryAvailable,
            Observation {
                available: 51 << 20,
                capacity: 1 << 30,
            },
        )]
        .into();
        let hog = cand(pod("hog", None, 0), 300 << 20);
        assert_eq!(
            message(Resource::Memory, &hog, &t, &o),
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51Mi. Container c was using 300Mi, request is 0, has larger consumption of memory. "
        );
        let within = cand(pod("g", Some("512Mi"), 0), 300 << 20);
        assert_eq!(
            message(Resource::Memory, &within, &t, &o),
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51Mi. "
        );
        let disk_t = vec![Threshold {
            signal: Signal::NodeFsAvailable,
            value: Value::Percentage(0.1),
            grace_period: std::time::Duration::ZERO,
            min_reclaim: None,
        }];
        let disk_o: Observations = [(
            Signal::NodeFsAvailable,
            Observation {
                available: 1 << 20,
                capacity: 100 << 20,
            },
        )]
        .into();
        let w = cand(pod("writer", None, 0), 8 << 20);
        assert_eq!(
            message(Resource::EphemeralStorage, &w, &disk_t, &disk_o),
            "The node was low on resource: ephemeral-storage. Threshold quantity: 10Mi, available: 1Mi. Container c was using 8Mi, request is 0, has larger consumption of ephemeral-storage. "
        );
    }
}
