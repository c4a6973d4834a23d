//! Pod admission as the kubelet does it for pods bound to this node (pure): node selector and
//! required node affinity, NoExecute taints, host ports free, and resource fit against
//! allocatable. A rejected pod gets phase Failed with the kubelet's reason.

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};
use std::collections::BTreeMap;

use crate::model::node_object::Pressure;
use crate::model::quantity;

/// Why a pod was rejected: (reason, message), as the kubelet writes them into the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `OutOfcpu`, `OutOfmemory`, `OutOfpods`, `NodeAffinity`, `TaintToleration`,
    /// `PodOSNotSupported`, `PodOSSelectorNodeLabelDoesNotMatch`, `NodePorts`.
    pub reason: String,
    /// Human message.
    pub message: String,
}

/// The node label naming the OS, and this node's OS (the kubelet's `runtime.GOOS`).
const OS_LABEL: &str = "kubernetes.io/os";
const NODE_OS: &str = "linux";

fn reject(reason: &str, message: String) -> Rejection {
    Rejection {
        reason: reason.into(),
        message,
    }
}

fn req_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let v = labels.get(&r.key);
    let vals = r.values.clone().unwrap_or_default();
    let num = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => v.is_some_and(|v| vals.contains(v)),
        "NotIn" => v.is_none_or(|v| !vals.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" => match (v.and_then(|v| num(v)), vals.first().and_then(|x| num(x))) {
            (Some(a), Some(b)) => a > b,
            _ => false,
        },
        "Lt" => match (v.and_then(|v| num(v)), vals.first().and_then(|x| num(x))) {
            (Some(a), Some(b)) => a < b,
            _ => false,
        },
        _ => false,
    }
}

/// Whether a node matches one node selector term (requirements ANDed, fields against
/// `metadata.name`; an empty term matches nothing).
pub(crate) fn term_matches(t: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let exprs = t.match_expressions.clone().unwrap_or_default();
    let fields = t.match_fields.clone().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        // An empty term matches nothing.
        return false;
    }
    let name: BTreeMap<String, String> = [(
        "metadata.name".to_string(),
        node.metadata.name.clone().unwrap_or_default(),
    )]
    .into();
    exprs.iter().all(|r| req_matches(r, &labels)) && fields.iter().all(|r| req_matches(r, &name))
}

/// nodeSelector and requiredDuringSchedulingIgnoredDuringExecution.
pub fn node_affinity_ok(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = &pod.spec else { return true };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(sel) = &spec.node_selector {
        if sel.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return false;
        }
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        None => true,
        Some(r) => r.node_selector_terms.iter().any(|t| term_matches(t, node)),
    }
}

/// Whether a toleration tolerates a taint (key, operator Exists/Equal, value, effect).
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(e) = t.effect.as_deref().filter(|e| !e.is_empty()) {
        if e != taint.effect {
            return false;
        }
    }
    match t.key.as_deref().filter(|k| !k.is_empty()) {
        None => t.operator.as_deref() == Some("Exists"),
        Some(k) if k != taint.key => false,
        Some(_) => match t.operator.as_deref().unwrap_or("Equal") {
            "Exists" => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        },
    }
}

/// Sum of a resource's requests (max of init containers vs. the sum of regular ones, plus
/// overhead), in milli-units for cpu and units otherwise.
pub fn pod_request(pod: &Pod, resource: &str) -> i128 {
    let Some(spec) = &pod.spec else { return 0 };
    let val = |c: &k8s_openapi::api::core::v1::Container| -> i128 {
        let r = c.resources.as_ref();
        let q = r
            .and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get(resource))
            .or_else(|| {
                r.and_then(|r| r.limits.as_ref())
                    .and_then(|m| m.get(resource))
            });
        q.and_then(|q| quantity::parse(&q.0).ok())
            .map(|n| {
                if resource == "cpu" {
                    n.milli_value()
                } else {
                    n.value()
                }
            })
            .unwrap_or(0)
    };
    let main: i128 = spec.containers.iter().map(val).sum();
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(val)
        .max()
        .unwrap_or(0);
    main.max(init)
}

fn allocatable(node: &Node, resource: &str) -> Option<i128> {
    let q = node.status.as_ref()?.allocatable.as_ref()?.get(resource)?;
    let n = quantity::parse(&q.0).ok()?;
    Some(if resource == "cpu" {
        n.milli_value()
    } else {
        n.value()
    })
}

/// Admits `pod` on `node` next to the already admitted, still active pods `others`.
pub fn admit(pod: &Pod, node: &Node, others: &[&Pod]) -> Result<(), Rejection> {
    // The eviction manager's admit handler comes first, as in the kubelet.
    admit_pressure(pod, node_pressure(node), true)?;
    // The OS checks come first, as in the kubelet's predicate admit handler.
    let node_os = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OS_LABEL))
        .filter(|os| os.as_str() == NODE_OS)
        .map_or(NODE_OS, String::as_str);
    let pod_os_label = pod.metadata.labels.as_ref().and_then(|l| l.get(OS_LABEL));
    if pod_os_label.is_some_and(|os| os != node_os) {
        return Err(reject(
            "PodOSSelectorNodeLabelDoesNotMatch",
            "Failed to admit pod as the `kubernetes.io/os` label doesn't match node label".into(),
        ));
    }
    let pod_os = pod.spec.as_ref().and_then(|s| s.os.as_ref());
    if pod_os.is_some_and(|os| os.name != NODE_OS) {
        return Err(reject(
            "PodOSNotSupported",
            "Failed to admit pod as the OS field doesn't match node OS".into(),
        ));
    }
    // User namespaces (`hostUsers: false`) need id-mapped mounts hako does not set up yet:
    // refused here rather than run with the node's user ids.
    if pod.spec.as_ref().and_then(|s| s.host_users) == Some(false) {
        return Err(reject(
            "UserNamespacesNotSupported",
            "Pod was rejected: hostUsers: false (user namespaces) is not supported by this node"
                .into(),
        ));
    }
    if !node_affinity_ok(pod, node) {
        return Err(reject(
            "NodeAffinity",
            "Pod was rejected: Predicate NodeAffinity failed".into(),
        ));
    }
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    for taint in node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
    {
        // The kubelet only enforces NoExecute taints at admission.
        if taint.effect == "NoExecute" && !tolerations.iter().any(|t| tolerates(t, &taint)) {
            return Err(reject(
                "TaintToleration",
                format!(
                    "Pod was rejected: Predicate TaintToleration failed: node(s) had untolerated taint {{{}: {}}}",
                    taint.key,
                    taint.value.as_deref().unwrap_or("")
                ),
            ));
        }
    }
    if host_ports_conflict(pod, others) {
        return Err(reject(
            "NodePorts",
            "Pod was rejected: Predicate NodePorts failed".into(),
        ));
    }
    if let Some(max) = allocatable(node, "pods") {
        let used = i128::try_from(others.len()).unwrap_or(i128::MAX);
        if used + 1 > max {
            return Err(reject(
                "OutOfpods",
                format!("Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: {used}, capacity: {max}"),
            ));
        }
    }
    for r in ["cpu", "memory", "ephemeral-storage"] {
        let want = pod_request(pod, r);
        if want == 0 {
            continue;
        }
        let Some(cap) = allocatable(node, r) else {
            continue;
        };
        let used: i128 = others.iter().map(|p| pod_request(p, r)).sum();
        if used + want > cap {
            return Err(reject(
                &format!("OutOf{r}"),
                format!("Pod was rejected: Node didn't have enough resource: {r}, requested: {want}, used: {used}, capacity: {cap}"),
            ));
        }
    }
    Ok(())
}

/// The `(protocol, hostIP, hostPort)` a pod claims on the node, as the scheduler's
/// `GetHostPorts` reads them: ports of the containers with a non-zero `hostPort`, protocol
/// `TCP` and hostIP `0.0.0.0` when unset.
pub fn host_ports(pod: &Pod) -> Vec<(String, String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| {
            (
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.host_ip
                    .clone()
                    .filter(|ip| !ip.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".into()),
                p.host_port.unwrap_or(0),
            )
        })
        .collect()
}

/// True when a host port of `pod` is already taken by one of `others` (the kubelet's NodePorts
/// predicate): same protocol and port, and the same hostIP or either of them the wildcard.
pub fn host_ports_conflict(pod: &Pod, others: &[&Pod]) -> bool {
    let want = host_ports(pod);
    if want.is_empty() {
        return false;
    }
    let used: Vec<(String, String, i32)> = others.iter().flat_map(|o| host_ports(o)).collect();
    want.iter().any(|(proto, ip, port)| {
        used.iter().any(|(p2, ip2, port2)| {
            p2 == proto && port2 == port && (ip == ip2 || ip == "0.0.0.0" || ip2 == "0.0.0.0")
        })
    })
}

/// The pressure conditions a Node reports.
pub fn node_pressure(node: &Node) -> Pressure {
    let is_true = |t: &str| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    Pressure {
        memory: is_true("MemoryPressure"),
        disk: is_true("DiskPressure"),
        pid: is_true("PIDPressure"),
    }
}

/// The eviction manager's admit handler: under memory pressure alone only BestEffort pods
/// are refused (unless they tolerate `node.kubernetes.io/memory-pressure:NoSchedule`); under
/// disk or PID pressure every pod is; critical pods always pass (static ones too when
/// `static_pods_protected`). Reason `Evicted`, message "The node had condition:
/// [MemoryPressure]. ".
pub fn admit_pressure(
    pod: &Pod,
    p: Pressure,
    static_pods_protected: bool,
) -> Result<(), Rejection> {
    if p == Pressure::default() || crate::eviction::rank::is_critical(pod, static_pods_protected) {
        return Ok(());
    }
    let mut conds = Vec::new();
    if p.memory {
        conds.push("MemoryPressure");
    }
    if p.disk {
        conds.push("DiskPressure");
    }
    if p.pid {
        conds.push("PIDPressure");
    }
    if conds == ["MemoryPressure"] {
        let best_effort = pod.spec.as_ref().is_some_and(|s| {
            crate::model::qos::pod_qos(s) == crate::model::qos::QosClass::BestEffort
        });
        let taint = Taint {
            key: "node.kubernetes.io/memory-pressure".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let tolerated = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| tolerates(t, &taint)));
        if !best_effort || tolerated {
            return Ok(());
        }
    }
    Err(reject(
        crate::eviction::REASON,
        format!("The node had condition: [{}]. ", conds.join(" ")),
    ))
}

/// Names of ConfigMaps (kind "configmaps") or Secrets ("secrets") a pod references.
pub fn references(pod: &Pod, kind: &str) -> Vec<String> {
    let v = serde_json::to_value(pod).unwrap_or_default();
    let spec = &v["spec"];
    let mut out = Vec::new();
    let s = |x: &serde_json::Value| x.as_str().map(str::to_string);
    if kind == "secrets" {
        for ips in spec["imagePullSecrets"].as_array().into_iter().flatten() {
            out.extend(s(&ips["name"]));
        }
    }
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        match kind {
            "configmaps" => out.extend(s(&vol["configMap"]["name"])),
            _ => out.extend(s(&vol["secret"]["secretName"])),
        }
        for src in vol["projected"]["sources"].as_array().into_iter().flatten() {
            match kind {
                "configmaps" => out.extend(s(&src["configMap"]["name"])),
                _ => out.extend(s(&src["secret"]["name"])),
            }
        }
    }
    for f in ["containers", "initContainers"] {
        for c in spec[f].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                match kind {
                    "configmaps" => out.extend(s(&e["valueFrom"]["configMapKeyRef"]["name"])),
                    _ => out.extend(s(&e["valueFrom"]["secretKeyRef"]["name"])),
                }
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                match kind {
                    "configmaps" => out.extend(s(&e["configMapRef"]["name"])),
                    _ => out.extend(s(&e["secretRef"]["name"])),
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The kernel namespace a sysctl belongs to, as the kubelet knows them
/// (`k8s.io/component-helpers/node/util/sysctl`): only these may be set per pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    /// The IPC namespace (`kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`).
    Ipc,
    /// The network namespace (`net.*`).
    Net,
}

impl SysctlNamespace {
    fn as_str(self) -> &'static str {
        match self {
            SysctlNamespace::Ipc => "ipc",
            SysctlNamespace::Net => "net",
        }
    }
}

/// The namespace of a (dot-separated) sysctl, `None` when it is not known to be namespaced.
pub fn sysctl_namespace(name: &str) -> Option<SysctlNamespace> {
    if name == "kernel.sem" {
        return Some(SysctlNamespace::Ipc);
    }
    [
        ("kernel.shm", SysctlNamespace::Ipc),
        ("kernel.msg", SysctlNamespace::Ipc),
        ("fs.mqueue.", SysctlNamespace::Ipc),
        ("net.", SysctlNamespace::Net),
    ]
    .into_iter()
    .find(|(p, _)| name.starts_with(p))
    .map(|(_, ns)| ns)
}

/// The sysctls the kubelet v1.28 allows without `--allowed-unsafe-sysctls`
/// (`pkg/kubelet/sysctl/safe_sysctls.go`; `net.ipv4.ip_local_reserved_ports` needs kernel 3.16,
/// which every supported kernel has; the `tcp_keepalive_*` ones came with v1.29).
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
];

/// The dot-separated form of a sysctl name: a name whose first separator is `/` has its `/`
/// and `.` swapped (`net/ipv4/conf/eno2.100/rp_filter` is `net.ipv4.conf.eno2/100.rp_filter`),
/// as the kubelet's `ConvertSysctlVariableToDotsSeparator`.
pub fn sysctl_dots(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => name
            .chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                c => c,
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// The path of a (dot-separated) sysctl under `/proc/sys`: dots are directory separators and
/// a `/` stands for a dot inside one component.
pub fn sysctl_path(dots: &str) -> String {
    dots.chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect()
}

/// A valid sysctl name (the API's `^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$`,
/// at most 253 characters): no empty, `.` or `..` component can come out of it.
pub fn valid_sysctl_name(name: &str) -> bool {
    let seg_ok = |s: &str| {
        let b = s.as_bytes();
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        !b.is_empty()
            && b.first().is_some_and(alnum)
            && b.last().is_some_and(alnum)
            && b.iter().all(|c| alnum(c) || *c == b'-' || *c == b'_')
    };
    !name.is_empty() && name.len() <= 253 && name.split(['.', '/']).all(seg_ok)
}

/// Why a `--allowed-unsafe-sysctls` pattern was refused (at startup, as the kubelet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysctlPatternError {
    /// Not a sysctl name, or a name followed by one `*`.
    #[error("sysctl {0:?} must have at most 253 characters and be a sysctl name or a prefix ending in '*'")]
    Invalid(String),
    /// Not known to be namespaced: it would change the whole node.
    #[error("the sysctl {0:?} are not known to be namespaced")]
    NotNamespaced(String),
}

/// The sysctls pods may set: the safe set plus the operator's `--allowed-unsafe-sysctls`
/// (names or prefixes ending in `*`), each known to be namespaced (kubelet `patternAllowlist`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlAllowlist {
    exact: BTreeMap<String, SysctlNamespace>,
    prefixes: Vec<(String, SysctlNamespace)>,
}

impl Default for SysctlAllowlist {
    fn default() -> Self {
        Self::new(&[]).unwrap_or(SysctlAllowlist {
            exact: BTreeMap::new(),
            prefixes: Vec::new(),
        })
    }
}

impl SysctlAllowlist {
    /// The safe set plus `unsafe_patterns`.
    pub fn new(unsafe_patterns: &[String]) -> Result<Self, SysctlPatternError> {
        let mut w = SysctlAllowlist {
            exact: BTreeMap::new(),
            prefixes: Vec::new(),
        };
        let patterns = SAFE_SYSCTLS
            .iter()
            .map(|s| s.to_string())
            .chain(unsafe_patterns.iter().map(|s| s.trim().to_string()))
            .filter(|s| !s.is_empty());
        for p in patterns {
            let (name, glob) = match p.strip_suffix('*') {
                Some(n) => (n, true),
                None => (p.as_str(), false),
            };
            let stem = name.trim_end_matches(['.', '/']);
            if name.contains('*')
                || (!stem.is_empty() && !valid_sysctl_name(stem))
                || (stem.is_empty() && !glob)
            {
                return Err(SysctlPatternError::Invalid(p.clone()));
            }
            let dots = sysctl_dots(name);
            let Some(ns) = sysctl_namespace(&dots) else {
                return Err(SysctlPatternError::NotNamespaced(sysctl_dots(&p)));
            };
            if glob {
                w.prefixes.push((dots, ns));
            } else {
                w.exact.insert(dots, ns);
            }
        }
        Ok(w)
    }

    /// kubelet `validateSysctl`: allowlisted, and not for a namespace the pod shares with the
    /// host.
    fn check(&self, name: &str, host_net: bool, host_ipc: bool) -> Result<(), String> {
        let dots = sysctl_dots(name);
        let ns = self.exact.get(&dots).copied().or_else(|| {
            self.prefixes
                .iter()
                .find(|(p, _)| dots.starts_with(p.as_str()))
                .map(|(_, ns)| *ns)
        });
        match ns {
            Some(ns @ SysctlNamespace::Ipc) if host_ipc => Err(format!(
                "{dots:?} not allowed with host {} enabled",
                ns.as_str()
            )),
            Some(ns @ SysctlNamespace::Net) if host_net => Err(format!(
                "{dots:?} not allowed with host {} enabled",
                ns.as_str()
            )),
            Some(_) if valid_sysctl_name(&dots) => Ok(()),
            _ => Err(format!("{dots:?} not allowlisted")),
        }
    }

    /// Admits the pod's `securityContext.sysctls` (reason `SysctlForbidden` and the kubelet's
    /// message otherwise).
    pub fn admit(&self, pod: &Pod) -> Result<(), Rejection> {
        let Some(spec) = &pod.spec else { return Ok(()) };
        let sysctls = spec
            .security_context
            .as_ref()
            .and_then(|s| s.sysctls.as_deref())
            .unwrap_or(&[]);
        for s in sysctls {
            if let Err(e) = self.check(
                &s.name,
                spec.host_network.unwrap_or(false),
                spec.host_ipc.unwrap_or(false),
            ) {
                return Err(reject(
                    SYSCTL_FORBIDDEN,
                    format!("Pod was rejected: forbidden sysctl: {e}"),
                ));
            }
        }
        Ok(())
    }
}

/// The kubelet's reason for a pod refused for its sysctls.
pub const SYSCTL_FORBIDDEN: &str = "SysctlForbidden";

/// The pod's sysctls as (path under `/proc/sys`, value), in spec order; only meaningful for a
/// pod [`SysctlAllowlist::admit`] admitted.
pub fn pod_sysctls(pod: &Pod) -> Vec<(String, String)> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.sysctls.as_ref())
        .map(|l| {
            l.iter()
                .map(|s| (sysctl_path(&sysctl_dots(&s.name)), s.value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "n1", "labels": {"disk": "ssd", "gen": "5"}},
            "spec": {"taints": [{"key": "dedicated", "value": "infra", "effect": "NoExecute"},
                                {"key": "soft", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "2", "memory": "1Gi", "pods": "3"}}}),
        )
        .expect("node")
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}],
            "containers": [{"name": "c", "image": "i"}]}});
        crate::model::admit::tests::merge(&mut p, extra);
        serde_json::from_value(p).expect("pod")
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn host_port_conflicts_as_the_nodeports_predicate() {
        let with = |ports: serde_json::Value| {
            pod(json!({"spec": {"containers": [{"name": "c", "image": "i", "ports": ports}]}}))
        };
        let taken = with(json!([{"containerPort": 80, "hostPort": 8080},
                                {"containerPort": 53, "hostPort": 5353, "protocol": "UDP",
                                 "hostIP": "127.0.0.1"}]));
        let cases = [
            (
                "same port, default proto and ip",
                json!([{"containerPort": 1, "hostPort": 8080}]),
                true,
            ),
            (
                "same port, explicit TCP on one ip",
                json!([{"containerPort": 1, "hostPort": 8080, "protocol": "TCP", "hostIP": "10.0.0.1"}]),
                true,
            ),
            (
                "same port, UDP",
                json!([{"containerPort": 1, "hostPort": 8080, "protocol": "UDP"}]),
                false,
            ),
            (
                "other port",
                json!([{"containerPort": 80, "hostPort": 8081}]),
                false,
            ),
            (
                "containerPort only",
                json!([{"containerPort": 8080}]),
                false,
            ),
            (
                "UDP wildcard vs specific ip",
                json!([{"containerPort": 1, "hostPort": 5353, "protocol": "UDP"}]),
                true,
            ),
            (
                "UDP same ip",
                json!([{"containerPort": 1, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.1"}]),
                true,
            ),
            (
                "UDP other ip",
                json!([{"containerPort": 1, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.2"}]),
                false,
            ),
            (
                "TCP on the UDP port",
                json!([{"containerPort": 1, "hostPort": 5353}]),
                false,
            ),
        ];
        for (name, ports, conflict) in cases {
            let p = with(ports);
            let got = admit(&p, &node(), &[&taken]).err();
            assert_eq!(got.is_some(), conflict, "{name}");
            if let Some(r) = got {
                assert_eq!(r.reason, "NodePorts", "{name}");
                assert_eq!(r.message, "Pod was rejected: Predicate NodePorts failed");
            }
            // Nothing admitted yet: no conflict.
            assert!(admit(&p, &node(), &[]).is_ok(), "{name}");
        }
    }

    fn reason(p: &Pod, others: &[&Pod]) -> Option<String> {
        admit(p, &node(), others).err().map(|r| r.reason)
    }

    #[test]
    fn user_namespaces_are_refused() {
        let users = |v| reason(&pod(json!({"spec": {"hostUsers": v}})), &[]);
        assert_eq!(users(json!(true)), None);
        assert_eq!(users(json!(null)), None);
        assert_eq!(
            users(json!(false)).as_deref(),
            Some("UserNamespacesNotSupported")
        );
    }

    #[test]
    fn os_checks_as_the_kubelet() {
        let os = |extra| reason(&pod(extra), &[]);
        assert_eq!(os(json!({"spec": {"os": {"name": "linux"}}})), None);
        assert_eq!(
            os(json!({"spec": {"os": {"name": "windows"}}})).as_deref(),
            Some("PodOSNotSupported")
        );
        assert_eq!(
            os(json!({"metadata": {"labels": {"kubernetes.io/os": "linux"}}})),
            None
        );
        // The label check comes first and compares the pod's own label.
        assert_eq!(
            os(
                json!({"metadata": {"labels": {"kubernetes.io/os": "windows"}},
                      "spec": {"os": {"name": "windows"}}})
            )
            .as_deref(),
            Some("PodOSSelectorNodeLabelDoesNotMatch")
        );
    }

    #[test]
    fn admission_table() {
        assert_eq!(reason(&pod(json!({})), &[]), None);
        assert_eq!(
            reason(
                &pod(json!({"spec": {"nodeSelector": {"disk": "ssd"}}})),
                &[]
            ),
            None
        );
        assert_eq!(
            reason(
                &pod(json!({"spec": {"nodeSelector": {"disk": "hdd"}}})),
                &[]
            )
            .as_deref(),
            Some("NodeAffinity")
        );
        let aff = |op: &str, vals: serde_json::Value| {
            pod(
                json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "gen", "operator": op, "values": vals}]}]}}}}}),
            )
        };
        assert_eq!(reason(&aff("Gt", json!(["4"])), &[]), None);
        assert_eq!(
            reason(&aff("Lt", json!(["4"])), &[]).as_deref(),
            Some("NodeAffinity")
        );
        assert_eq!(reason(&aff("In", json!(["5", "6"])), &[]), None);
        assert_eq!(
            reason(&aff("NotIn", json!(["5"])), &[]).as_deref(),
            Some("NodeAffinity")
        );
        let untolerated: Pod = serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        )
        .expect("pod");
        assert_eq!(
            reason(&untolerated, &[]).as_deref(),
            Some("TaintToleration")
        );
        let big = pod(json!({"spec": {"containers": [{"name": "c", "image": "i",
            "resources": {"requests": {"cpu": "1500m"}}}]}}));
        assert_eq!(reason(&big, &[]), None);
        assert_eq!(reason(&big, &[&big]).as_deref(), Some("OutOfcpu"));
        let mem = pod(json!({"spec": {"containers": [{"name": "c", "image": "i",
            "resources": {"limits": {"memory": "2Gi"}}}]}}));
        assert_eq!(reason(&mem, &[]).as_deref(), Some("OutOfmemory"));
        let p = pod(json!({}));
        assert_eq!(reason(&p, &[&p, &p, &p]).as_deref(), Some("OutOfpods"));
    }

    #[test]
    fn toleration_rules() {
        let t = Taint {
            key: "k".into(),
            value: Some("v".into()),
            effect: "NoExecute".into(),
            time_added: None,
        };
        let tol = |v: serde_json::Value| -> Toleration { serde_json::from_value(v).expect("t") };
        assert!(tolerates(&tol(json!({"operator": "Exists"})), &t));
        assert!(tolerates(&tol(json!({"key": "k", "value": "v"})), &t));
        assert!(!tolerates(&tol(json!({"key": "k", "value": "w"})), &t));
        assert!(!tolerates(
            &tol(json!({"key": "k", "operator": "Exists", "effect": "NoSchedule"})),
            &t
        ));
    }

    #[test]
    fn references_of_a_pod() {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {
            "imagePullSecrets": [{"name": "pull"}],
            "volumes": [{"name": "a", "configMap": {"name": "cm1"}}, {"name": "b", "secret": {"secretName": "s1"}},
                        {"name": "c", "projected": {"sources": [{"configMap": {"name": "kube-root-ca.crt"}}]}}],
            "containers": [{"name": "c", "image": "i", "envFrom": [{"configMapRef": {"name": "cm2"}}],
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}}]}]}}))
        .expect("pod");
        assert_eq!(
            references(&p, "configmaps"),
            ["cm1", "cm2", "kube-root-ca.crt"]
        );
        assert_eq!(references(&p, "secrets"), ["pull", "s1", "s2"]);
    }

    #[test]
    fn sysctl_admission_table() {
        let safe = SysctlAllowlist::default();
        let ok = |w: &SysctlAllowlist, extra: serde_json::Value| {
            w.admit(&pod(json!({ "spec": extra })))
                .map_err(|r| (r.reason, r.message))
        };
        let sys = |n: &str| json!({"securityContext": {"sysctls": [{"name": n, "value": "1"}]}});
        // The safe set, either separator.
        assert_eq!(ok(&safe, sys("kernel.shm_rmid_forced")), Ok(()));
        assert_eq!(ok(&safe, sys("kernel/shm_rmid_forced")), Ok(()));
        assert_eq!(ok(&safe, sys("net.ipv4.ip_local_port_range")), Ok(()));
        assert_eq!(ok(&safe, json!({})), Ok(()));
        // Unsafe without the flag, with the kubelet's reason and message.
        assert_eq!(
            ok(&safe, sys("kernel.msgmax")),
            Err((
                "SysctlForbidden".to_string(),
                "Pod was rejected: forbidden sysctl: \"kernel.msgmax\" not allowlisted".to_string()
            ))
        );
        assert!(ok(&safe, sys("net.ipv4.tcp_keepalive_time")).is_err());
        // Sharing the namespace with the host.
        let mut hn = sys("net.ipv4.ip_local_port_range");
        hn["hostNetwork"] = json!(true);
        assert_eq!(
            ok(&safe, hn).unwrap_err().1,
            "Pod was rejected: forbidden sysctl: \"net.ipv4.ip_local_port_range\" not allowed with host net enabled"
        );
        let mut hi = sys("kernel.shm_rmid_forced");
        hi["hostIPC"] = json!(true);
        assert!(ok(&safe, hi)
            .unwrap_err()
            .1
            .ends_with("not allowed with host ipc enabled"));
        let mut hn_ipc = sys("kernel.shm_rmid_forced");
        hn_ipc["hostNetwork"] = json!(true);
        assert_eq!(ok(&safe, hn_ipc), Ok(()));
        // --allowed-unsafe-sysctls: names and globs, namespaced only.
        let w = SysctlAllowlist::new(&["kernel.msg*".into(), "net.core.somaxconn".into()]).unwrap();
        assert_eq!(ok(&w, sys("kernel.msgmax")), Ok(()));
        assert_eq!(ok(&w, sys("net.core.somaxconn")), Ok(()));
        assert!(ok(&w, sys("net.core.rmem_max")).is_err());
        // Names that are not sysctl names never pass, whatever the globs.
        let all = SysctlAllowlist::new(&["net.*".into()]).unwrap();
        assert!(ok(&all, sys("net.ipv4/../../x")).is_err());
        assert!(ok(&all, sys("net..x")).is_err());
        assert_eq!(ok(&all, sys("net.ipv4.conf.eth0.rp_filter")), Ok(()));
        for bad in ["kernel.hostname", "vm.swappiness", "*", "fs.*"] {
            assert!(
                matches!(
                    SysctlAllowlist::new(&[bad.into()]),
                    Err(SysctlPatternError::NotNamespaced(_))
                ),
                "{bad}"
            );
        }
        for bad in ["net.*.x", "Net.Core", "net.core.x**"] {
            assert!(
                matches!(
                    SysctlAllowlist::new(&[bad.into()]),
                    Err(SysctlPatternError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn sysctl_names_and_paths() {
        assert_eq!(
            sysctl_dots("net/ipv4/conf/eno2.100/rp_filter"),
            "net.ipv4.conf.eno2/100.rp_filter"
        );
        assert_eq!(
            sysctl_dots("net.ipv4.conf.eno2/100.rp_filter"),
            "net.ipv4.conf.eno2/100.rp_filter"
        );
        assert_eq!(
            sysctl_path("net.ipv4.conf.eno2/100.rp_filter"),
            "net/ipv4/conf/eno2.100/rp_filter"
        );
        let p: Pod = serde_json::from_value(json!({"spec": {"containers": [],
            "securityContext": {"sysctls": [{"name": "kernel/shm_rmid_forced", "value": "1"},
                                            {"name": "net.ipv4.ping_group_range", "value": "0 200"}]}}}))
        .unwrap();
        assert_eq!(
            pod_sysctls(&p),
            vec![
                ("kernel/shm_rmid_forced".to_string(), "1".to_string()),
                ("net/ipv4/ping_group_range".to_string(), "0 200".to_string())
            ]
        );
    }

    #[test]
    fn pressure_admission_as_the_kubelet() {
        let be = pod(serde_json::json!({}));
        let burst = pod(
            serde_json::json!({"spec": {"containers": [{"name": "c", "image": "i",
            "resources": {"requests": {"memory": "10Mi"}}}]}}),
        );
        let tolerant = pod(serde_json::json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"}]}}));
        let critical = pod(serde_json::json!({"spec": {"priority": 2_000_000_000}}));
        let mem = Pressure {
            memory: true,
            ..Default::default()
        };
        let disk = Pressure {
            disk: true,
            ..Default::default()
        };
        let both = Pressure {
            memory: true,
            disk: true,
            pid: false,
        };
        let cases: &[(&str, &Pod, Pressure, Option<&str>)] = &[
            ("no pressure", &be, Pressure::default(), None),
            (
                "memory: BestEffort refused",
                &be,
                mem,
                Some("The node had condition: [MemoryPressure]. "),
            ),
            ("memory: Burstable admitted", &burst, mem, None),
            (
                "memory: tolerating BestEffort admitted",
                &tolerant,
                mem,
                None,
            ),
            (
                "disk: every pod refused",
                &burst,
                disk,
                Some("The node had condition: [DiskPressure]. "),
            ),
            (
                "both",
                &burst,
                both,
                Some("The node had condition: [MemoryPressure DiskPressure]. "),
            ),
            ("critical always admitted", &critical, both, None),
        ];
        for (name, p, pr, want) in cases {
            let got = admit_pressure(p, *pr, true).err();
            assert_eq!(got.as_ref().map(|r| r.message.as_str()), *want, "{name}");
            if let Some(r) = got {
                assert_eq!(r.reason, "Evicted", "{name}");
            }
        }
        // Through the Node's conditions (cluster mode).
        let mut n = node();
        n.status.get_or_insert_with(Default::default).conditions =
            Some(vec![k8s_openapi::api::core::v1::NodeCondition {
                type_: "MemoryPressure".into(),
                status: "True".into(),
                ..Default::default()
            }]);
        assert_eq!(reason(&be, &[]), None);
        assert_eq!(
            admit(&be, &n, &[]).err().map(|r| r.reason).as_deref(),
            Some("Evicted")
        );
        assert!(admit(&burst, &n, &[]).is_ok());
    }
}
