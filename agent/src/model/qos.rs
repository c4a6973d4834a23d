//! QoS class and `oom_score_adj` for pods and containers, per the kubelet's rules (pure).

use crate::model::quantity::{self, Nano};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use std::collections::BTreeMap;

/// Pod QoS class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    /// Every container has cpu and memory limits equal to its requests.
    Guaranteed,
    /// Neither requests nor limits anywhere.
    BestEffort,
    /// Anything else.
    Burstable,
}

impl QosClass {
    /// The name used in `status.qosClass`.
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::BestEffort => "BestEffort",
            QosClass::Burstable => "Burstable",
        }
    }
}

/// `oom_score_adj` of Guaranteed pods and node-critical pods.
pub const GUARANTEED_OOM_SCORE_ADJ: i64 = -997;
/// `oom_score_adj` of BestEffort pods.
pub const BEST_EFFORT_OOM_SCORE_ADJ: i64 = 1000;
/// `oom_score_adj` the kubelet and node agents run at.
pub const KUBELET_OOM_SCORE_ADJ: i64 = -999;

const SUPPORTED: [&str; 2] = ["cpu", "memory"];

/// Requests of a container after the API defaulting rule "a missing request defaults to the limit".
pub fn effective_requests(c: &Container) -> BTreeMap<String, Nano> {
    let mut out = BTreeMap::new();
    let Some(res) = &c.resources else {
        return out;
    };
    for (k, q) in res.limits.iter().flatten() {
        if let Ok(v) = quantity::parse(&q.0) {
            out.insert(k.clone(), v);
        }
    }
    for (k, q) in res.requests.iter().flatten() {
        if let Ok(v) = quantity::parse(&q.0) {
            out.insert(k.clone(), v);
        }
    }
    out
}

/// Limits of a container (unparseable values are ignored; validation reports them).
pub fn limits(c: &Container) -> BTreeMap<String, Nano> {
    c.resources
        .iter()
        .flat_map(|r| r.limits.iter().flatten())
        .filter_map(|(k, q)| quantity::parse(&q.0).ok().map(|v| (k.clone(), v)))
        .collect()
}

/// The pod's QoS class (kubelet `GetPodQOS`), over init and regular containers.
pub fn pod_qos(spec: &PodSpec) -> QosClass {
    let mut requests: BTreeMap<&str, Nano> = BTreeMap::new();
    let mut lims: BTreeMap<&str, Nano> = BTreeMap::new();
    let mut guaranteed = true;
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in all {
        for (k, v) in effective_requests(c) {
            if let Some(name) = SUPPORTED.iter().find(|s| **s == k) {
                if !v.is_zero() {
                    requests.entry(name).or_default().0 += v.0;
                }
            }
        }
        let mut found = 0;
        for (k, v) in limits(c) {
            if let Some(name) = SUPPORTED.iter().find(|s| **s == k) {
                if !v.is_zero() {
                    found += 1;
                    lims.entry(name).or_default().0 += v.0;
                }
            }
        }
        if found != SUPPORTED.len() {
            guaranteed = false;
        }
    }
    if requests.is_empty() && lims.is_empty() {
        return QosClass::BestEffort;
    }
    if guaranteed
        && requests.len() == lims.len()
        && lims.iter().all(|(k, v)| requests.get(k) == Some(v))
    {
        return QosClass::Guaranteed;
    }
    QosClass::Burstable
}

/// QoS class of a whole pod object (BestEffort when it has no spec).
pub fn qos_of(pod: &Pod) -> QosClass {
    pod.spec
        .as_ref()
        .map(pod_qos)
        .unwrap_or(QosClass::BestEffort)
}

/// The `oom_score_adj` for a container (kubelet `GetContainerOOMScoreAdjust`).
/// `memory_capacity` is the node's memory in bytes.
pub fn container_oom_score_adj(
    spec: &PodSpec,
    container: &Container,
    memory_capacity: i128,
) -> i64 {
    if spec.priority_class_name.as_deref() == Some("system-node-critical") {
        return GUARANTEED_OOM_SCORE_ADJ;
    }
    match pod_qos(spec) {
        QosClass::Guaranteed => return GUARANTEED_OOM_SCORE_ADJ,
        QosClass::BestEffort => return BEST_EFFORT_OOM_SCORE_ADJ,
        QosClass::Burstable => {}
    }
    let mem = effective_requests(container)
        .get("memory")
        .map(|n| n.value())
        .unwrap_or(0);
    let capacity = memory_capacity.max(1);
    let adj = 1000 - (1000 * mem) / capacity;
    let adj = i64::try_from(adj).unwrap_or(i64::MIN);
    if adj < 1000 + GUARANTEED_OOM_SCORE_ADJ {
        return 1000 + GUARANTEED_OOM_SCORE_ADJ;
    }
    if adj == BEST_EFFORT_OOM_SCORE_ADJ {
        return adj - 1;
    }
    adj
}

/// The value actually applied when lowering `oom_score_adj` may be impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomScoreDecision {
    /// The value to write.
    pub value: i64,
    /// The wanted value when it had to be raised to the parent's (to log once and show in events).
    pub clamped_from: Option<i64>,
}

/// containerd's `restrict_oom_score_adj`: without CAP_SYS_RESOURCE a process may not go below
/// its parent's current value, so a lower wanted value is raised to the parent's.
pub fn restrict_oom_score_adj(
    wanted: i64,
    parent_current: i64,
    can_lower: bool,
) -> OomScoreDecision {
    if !can_lower && wanted < parent_current {
        OomScoreDecision {
            value: parent_current,
            clamped_from: Some(wanted),
        }
    } else {
        OomScoreDecision {
            value: wanted,
            clamped_from: None,
        }
    }
}

/// The limits of a pod-level cgroup (kubelet `ResourceConfigForPod`, CFS quota enforced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodCgroupResources {
    /// `cpu.shares` from the summed cpu requests (BestEffort: 2).
    pub cpu_shares: u64,
    /// CFS quota in microseconds per [`CPU_PERIOD_US`], when every container has a cpu limit.
    pub cpu_quota: Option<i64>,
    /// Memory limit in bytes, when every container has a memory limit.
    pub memory_limit: Option<i64>,
}

/// The CFS period the kubelet uses (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest `cpu.shares` the kubelet writes.
pub const MIN_SHARES: u64 = 2;
/// Smallest CFS quota the kubelet writes (1 ms).
pub const MIN_QUOTA_US: i64 = 1000;

/// cpu millis → `cpu.shares` (kubelet `MilliCPUToShares`).
pub fn milli_cpu_to_shares(milli: i128) -> u64 {
    if milli <= 0 {
        return MIN_SHARES;
    }
    u64::try_from(milli * 1024 / 1000)
        .unwrap_or(u64::MAX)
        .clamp(MIN_SHARES, 262_144)
}

/// cpu millis → CFS quota for [`CPU_PERIOD_US`] (kubelet `MilliCPUToQuota`; 0 → none).
pub fn milli_cpu_to_quota(milli: i128) -> Option<i64> {
    if milli <= 0 {
        return None;
    }
    let q = milli * i128::from(CPU_PERIOD_US) / 1000;
    Some(i64::try_from(q).unwrap_or(i64::MAX).max(MIN_QUOTA_US))
}

/// Per resource: the pod's total (`max(sum of regular containers and restartable init
/// containers, largest other init container)` + `overhead`), and whether every
/// container declares it in `of`. Pure.
fn pod_total(
    spec: &PodSpec,
    resource: &str,
    of: impl Fn(&Container) -> BTreeMap<String, Nano>,
) -> (i128, bool) {
    let mut declared = true;
    let mut sum: i128 = 0;
    let mut init_max: i128 = 0;
    for c in spec.init_containers.iter().flatten() {
        let v = of(c).get(resource).map(|n| n.0);
        declared &= v.is_some();
        let v = v.unwrap_or(0);
        if c.restart_policy.as_deref() == Some("Always") {
            sum += v;
            init_max = init_max.max(sum);
        } else {
            init_max = init_max.max(sum + v);
        }
    }
    for c in &spec.containers {
        let v = of(c).get(resource).map(|n| n.0);
        declared &= v.is_some();
        sum += v.unwrap_or(0);
    }
    let overhead = spec
        .overhead
        .as_ref()
        .and_then(|o| o.get(resource))
        .and_then(|q| quantity::parse(&q.0).ok())
        .map(|n| n.0)
        .unwrap_or(0);
    (sum.max(init_max) + overhead, declared)
}

/// The pod cgroup's limits (kubelet `ResourceConfigForPod` with CFS quota): shares from the
/// summed cpu requests; cpu quota and memory limit from the summed limits, but only when
/// every container declares that limit (no limit otherwise); Guaranteed pods always have
/// all three, BestEffort pods only the minimum shares. Pure.
pub fn pod_cgroup_resources(spec: &PodSpec) -> PodCgroupResources {
    let qos = pod_qos(spec);
    if qos == QosClass::BestEffort {
        return PodCgroupResources {
            cpu_shares: MIN_SHARES,
            ..Default::default()
        };
    }
    let nano_to_milli = |n: i128| Nano(n).milli_value();
    let (cpu_req, _) = pod_total(spec, "cpu", effective_requests);
    let (cpu_lim, cpu_declared) = pod_total(spec, "cpu", limits);
    let (mem_lim, mem_declared) = pod_total(spec, "memory", limits);
    let guaranteed = qos == QosClass::Guaranteed;
    PodCgroupResources {
        cpu_shares: milli_cpu_to_shares(nano_to_milli(cpu_req)),
        cpu_quota: (guaranteed || cpu_declared)
            .then(|| milli_cpu_to_quota(nano_to_milli(cpu_lim)))
            .flatten(),
        memory_limit: (guaranteed || mem_declared)
            .then(|| i64::try_from(Nano(mem_lim).value()).unwrap_or(i64::MAX))
            .filter(|m| *m > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn c(name: &str, req: &[(&str, &str)], lim: &[(&str, &str)]) -> Container {
        let m = |v: &[(&str, &str)]| {
            (!v.is_empty()).then(|| {
                v.iter()
                    .map(|(k, q)| (k.to_string(), Quantity(q.to_string())))
                    .collect()
            })
        };
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                requests: m(req),
                limits: m(lim),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn spec(init: Vec<Container>, main: Vec<Container>) -> PodSpec {
        PodSpec {
            init_containers: (!init.is_empty()).then_some(init),
            containers: main,
            ..Default::default()
        }
    }

    const CPU_MEM: &[(&str, &str)] = &[("cpu", "100m"), ("memory", "64Mi")];

    #[test]
    fn qos_table() {
        let table: Vec<(&str, PodSpec, QosClass)> = vec![
            (
                "no resources",
                spec(vec![], vec![c("a", &[], &[])]),
                QosClass::BestEffort,
            ),
            (
                "equal req/lim",
                spec(vec![], vec![c("a", CPU_MEM, CPU_MEM)]),
                QosClass::Guaranteed,
            ),
            (
                "limits only default requests",
                spec(vec![], vec![c("a", &[], CPU_MEM)]),
                QosClass::Guaranteed,
            ),
            (
                "requests only",
                spec(vec![], vec![c("a", CPU_MEM, &[])]),
                QosClass::Burstable,
            ),
            (
                "cpu limit only",
                spec(vec![], vec![c("a", &[], &[("cpu", "1")])]),
                QosClass::Burstable,
            ),
            (
                "req below limit",
                spec(
                    vec![],
                    vec![c("a", &[("cpu", "50m"), ("memory", "64Mi")], CPU_MEM)],
                ),
                QosClass::Burstable,
            ),
            (
                "second container besteffort",
                spec(vec![], vec![c("a", CPU_MEM, CPU_MEM), c("b", &[], &[])]),
                QosClass::Burstable,
            ),
            (
                "init container without limits",
                spec(vec![c("i", &[], &[])], vec![c("a", CPU_MEM, CPU_MEM)]),
                QosClass::Burstable,
            ),
            (
                "init container guaranteed",
                spec(
                    vec![c("i", CPU_MEM, CPU_MEM)],
                    vec![c("a", CPU_MEM, CPU_MEM)],
                ),
                QosClass::Guaranteed,
            ),
            (
                "init only has requests",
                spec(vec![c("i", CPU_MEM, &[])], vec![c("a", &[], &[])]),
                QosClass::Burstable,
            ),
            (
                "only unsupported resource",
                spec(vec![], vec![c("a", &[("ephemeral-storage", "1Gi")], &[])]),
                QosClass::BestEffort,
            ),
            (
                "zero requests",
                spec(vec![], vec![c("a", &[("cpu", "0")], &[])]),
                QosClass::BestEffort,
            ),
        ];
        for (name, s, want) in table {
            assert_eq!(pod_qos(&s), want, "{name}");
        }
    }

    #[test]
    fn oom_score_adj_table() {
        let gib: i128 = 1 << 30;
        let cap = 4 * gib;
        let table: Vec<(&str, PodSpec, i64)> = vec![
            (
                "guaranteed",
                spec(vec![], vec![c("a", CPU_MEM, CPU_MEM)]),
                -997,
            ),
            ("besteffort", spec(vec![], vec![c("a", &[], &[])]), 1000),
            (
                "burstable 1Gi of 4Gi",
                spec(vec![], vec![c("a", &[("memory", "1Gi")], &[])]),
                750,
            ),
            (
                "burstable no memory",
                spec(vec![], vec![c("a", &[("cpu", "1")], &[])]),
                999,
            ),
            (
                "burstable huge request",
                spec(vec![], vec![c("a", &[("memory", "4Gi")], &[])]),
                3,
            ),
            (
                "burstable above capacity",
                spec(vec![], vec![c("a", &[("memory", "8Gi")], &[])]),
                3,
            ),
            (
                "burstable tiny",
                spec(vec![], vec![c("a", &[("memory", "1Mi")], &[])]),
                999,
            ),
        ];
        for (name, s, want) in table {
            assert_eq!(
                container_oom_score_adj(&s, &s.containers[0], cap),
                want,
                "{name}"
            );
        }
        let mut critical = spec(vec![], vec![c("a", &[], &[])]);
        critical.priority_class_name = Some("system-node-critical".into());
        assert_eq!(
            container_oom_score_adj(&critical, &critical.containers[0], cap),
            -997
        );
    }

    #[test]
    fn restrict_table() {
        let table = [
            (-997, 0, false, 0, Some(-997)),
            (-997, 0, true, -997, None),
            (1000, 0, false, 1000, None),
            (750, -999, false, 750, None),
            (-997, -999, false, -997, None),
        ];
        for (wanted, parent, can, value, clamped) in table {
            assert_eq!(
                restrict_oom_score_adj(wanted, parent, can),
                OomScoreDecision {
                    value,
                    clamped_from: clamped
                },
                "{wanted} {parent} {can}"
            );
        }
    }

    fn pod_cg(
        init: Vec<Container>,
        main: Vec<Container>,
        overhead: &[(&str, &str)],
    ) -> PodCgroupResources {
        let mut s = spec(init, main);
        if !overhead.is_empty() {
            s.overhead = Some(
                overhead
                    .iter()
                    .map(|(k, q)| (k.to_string(), Quantity(q.to_string())))
                    .collect(),
            );
        }
        pod_cgroup_resources(&s)
    }

    #[test]
    fn pod_cgroup_resources_table() {
        let g = |n: &str, cpu: &str, mem: &str| c(n, &[], &[("cpu", cpu), ("memory", mem)]);
        let cases: Vec<(&str, PodCgroupResources, PodCgroupResources)> = vec![
            (
                "guaranteed: sums of two containers",
                pod_cg(
                    vec![],
                    vec![g("a", "250m", "64Mi"), g("b", "250m", "64Mi")],
                    &[],
                ),
                PodCgroupResources {
                    cpu_shares: 512,
                    cpu_quota: Some(50_000),
                    memory_limit: Some(128 << 20),
                },
            ),
            (
                "guaranteed plus overhead",
                pod_cg(
                    vec![],
                    vec![g("a", "500m", "100Mi")],
                    &[("cpu", "100m"), ("memory", "20Mi")],
                ),
                PodCgroupResources {
                    cpu_shares: 614,
                    cpu_quota: Some(60_000),
                    memory_limit: Some(120 << 20),
                },
            ),
            (
                "besteffort: minimum shares only",
                pod_cg(vec![], vec![c("a", &[], &[])], &[]),
                PodCgroupResources {
                    cpu_shares: 2,
                    cpu_quota: None,
                    memory_limit: None,
                },
            ),
            (
                "burstable: one container without limits means no pod limit",
                pod_cg(
                    vec![],
                    vec![
                        c("a", &[("cpu", "100m")], &[("cpu", "1"), ("memory", "1Gi")]),
                        c("b", &[("memory", "10Mi")], &[]),
                    ],
                    &[],
                ),
                PodCgroupResources {
                    cpu_shares: 102,
                    cpu_quota: None,
                    memory_limit: None,
                },
            ),
            (
                "burstable: memory limits everywhere, cpu only requested",
                pod_cg(
                    vec![],
                    vec![
                        c("a", &[("cpu", "200m")], &[("memory", "32Mi")]),
                        c("b", &[], &[("memory", "32Mi")]),
                    ],
                    &[],
                ),
                PodCgroupResources {
                    cpu_shares: 204,
                    cpu_quota: None,
                    memory_limit: Some(64 << 20),
                },
            ),
            (
                "a larger init container sets the pod's size",
                pod_cg(
                    vec![g("init", "2", "1Gi")],
                    vec![g("a", "500m", "100Mi")],
                    &[],
                ),
                PodCgroupResources {
                    cpu_shares: 2048,
                    cpu_quota: Some(200_000),
                    memory_limit: Some(1 << 30),
                },
            ),
            (
                "tiny cpu limit: quota floor 1ms",
                pod_cg(vec![], vec![g("a", "1m", "8Mi")], &[]),
                PodCgroupResources {
                    cpu_shares: 2,
                    cpu_quota: Some(1000),
                    memory_limit: Some(8 << 20),
                },
            ),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
    }
}
