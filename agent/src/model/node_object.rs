//! The Node object this agent registers and reports (pure): labels, taints, capacity and
//! allocatable, node info, addresses, conditions from measurements and eviction thresholds.

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::net::IpAddr;
use thiserror::Error;

use crate::model::quantity;

/// A flag value that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FlagError {
    /// `--node-labels`.
    #[error("invalid --node-labels entry {0:?}: want key=value")]
    Label(String),
    /// `--register-with-taints`.
    #[error("invalid --register-with-taints entry {0:?}: want key[=value]:NoSchedule|PreferNoSchedule|NoExecute")]
    Taint(String),
    /// `--system-reserved`.
    #[error("invalid --system-reserved entry {0:?}: want cpu=100m, memory=256Mi, ephemeral-storage=1Gi or pid=1000")]
    Reserved(String),
    /// `--eviction-hard`.
    #[error("invalid --eviction-hard entry {0:?}: want signal<quantity or signal<percent% (memory.available, nodefs.available, nodefs.inodesFree, imagefs.available, pid.available)")]
    Eviction(String),
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, FlagError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| FlagError::Label(part.into()))?;
        if k.trim().is_empty() {
            return Err(FlagError::Label(part.into()));
        }
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Parses `key=value:Effect,key:Effect`.
pub fn parse_taints(s: &str) -> Result<Vec<Taint>, FlagError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kv, effect) = part
            .rsplit_once(':')
            .ok_or_else(|| FlagError::Taint(part.into()))?;
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(FlagError::Taint(part.into()));
        }
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (kv, None),
        };
        if k.is_empty() {
            return Err(FlagError::Taint(part.into()));
        }
        out.push(Taint {
            key: k.into(),
            value: v,
            effect: effect.into(),
            time_added: None,
        });
    }
    Ok(out)
}

/// Resources held back from pods (`--system-reserved`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reserved {
    /// Millicores.
    pub cpu_milli: i128,
    /// Bytes.
    pub memory: i128,
    /// Bytes.
    pub ephemeral_storage: i128,
}

/// Parses `cpu=100m,memory=256Mi,ephemeral-storage=1Gi` (`pid=` is accepted and ignored).
pub fn parse_reserved(s: &str) -> Result<Reserved, FlagError> {
    let mut r = Reserved::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let err = || FlagError::Reserved(part.into());
        let (k, v) = part.split_once('=').ok_or_else(err)?;
        let q = quantity::parse(v).map_err(|_| err())?;
        match k.trim() {
            "cpu" => r.cpu_milli = q.milli_value(),
            "memory" => r.memory = q.value(),
            "ephemeral-storage" => r.ephemeral_storage = q.value(),
            "pid" => {}
            _ => return Err(err()),
        }
    }
    Ok(r)
}

/// One eviction threshold: an absolute amount or a percentage of capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Bytes (or inodes / pids).
    Amount(i128),
    /// Percent of capacity.
    Percent(f64),
}

impl Threshold {
    fn amount(self, capacity: u64) -> i128 {
        match self {
            Threshold::Amount(a) => a,
            Threshold::Percent(p) => {
                let cap = i128::from(capacity);
                // Whole units are precise enough for thresholds.
                #[allow(clippy::cast_possible_truncation)]
                let v = (cap as f64 * p / 100.0) as i128;
                v
            }
        }
    }
}

/// Hard eviction thresholds (kubelet defaults: memory.available<100Mi, nodefs.available<10%,
/// nodefs.inodesFree<5%, imagefs.available<15%).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Eviction {
    /// memory.available
    pub memory_available: Option<Threshold>,
    /// nodefs.available
    pub nodefs_available: Option<Threshold>,
    /// nodefs.inodesFree
    pub nodefs_inodes_free: Option<Threshold>,
    /// imagefs.available (the image store shares the node filesystem here)
    pub imagefs_available: Option<Threshold>,
    /// pid.available
    pub pid_available: Option<Threshold>,
}

/// The kubelet's default hard eviction thresholds.
pub const DEFAULT_EVICTION_HARD: &str =
    "memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,imagefs.available<15%";

/// Parses `--eviction-hard`.
pub fn parse_eviction(s: &str) -> Result<Eviction, FlagError> {
    let mut e = Eviction::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let err = || FlagError::Eviction(part.into());
        let (k, v) = part.split_once('<').ok_or_else(err)?;
        let t = if let Some(p) = v.trim().strip_suffix('%') {
            let p: f64 = p.parse().map_err(|_| err())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(err());
            }
            Threshold::Percent(p)
        } else {
            Threshold::Amount(quantity::parse(v).map_err(|_| err())?.value())
        };
        let slot = match k.trim() {
            "memory.available" => &mut e.memory_available,
            "nodefs.available" => &mut e.nodefs_available,
            "nodefs.inodesFree" => &mut e.nodefs_inodes_free,
            "imagefs.available" => &mut e.imagefs_available,
            "pid.available" => &mut e.pid_available,
            _ => return Err(err()),
        };
        *slot = Some(t);
    }
    Ok(e)
}

/// Static facts about the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// /etc/machine-id
    pub machine_id: String,
    /// /sys/class/dmi/id/product_uuid (or the machine id)
    pub system_uuid: String,
    /// /proc/sys/kernel/random/boot_id
    pub boot_id: String,
    /// uname -r
    pub kernel_version: String,
    /// PRETTY_NAME from os-release
    pub os_image: String,
    /// GOARCH spelling (amd64, arm64, ...)
    pub architecture: String,
    /// Host name (the Hostname address).
    pub hostname: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// MemTotal in bytes.
    pub memory_bytes: u64,
    /// Size of the filesystem holding the agent's root dir.
    pub ephemeral_storage_bytes: u64,
    /// InternalIP.
    pub internal_ip: Option<IpAddr>,
}

/// Live measurements for the pressure conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measurements {
    /// MemAvailable (bytes).
    pub memory_available: u64,
    /// MemTotal (bytes).
    pub memory_capacity: u64,
    /// Free bytes for unprivileged users on the node filesystem.
    pub nodefs_available: u64,
    /// Size of the node filesystem.
    pub nodefs_capacity: u64,
    /// Free inodes.
    pub nodefs_inodes_free: u64,
    /// Total inodes.
    pub nodefs_inodes: u64,
    /// Processes (threads count against pid_max) in use.
    pub pids_used: u64,
    /// kernel.pid_max
    pub pids_max: u64,
}

/// What the agent is told about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// `--node-labels`.
    pub labels: BTreeMap<String, String>,
    /// `--register-with-taints`.
    pub taints: Vec<Taint>,
    /// `--system-reserved`.
    pub reserved: Reserved,
    /// `--max-pods`.
    pub max_pods: u32,
    /// Hard eviction thresholds.
    pub eviction: Eviction,
    /// hako version (for containerRuntimeVersion / kubeletVersion).
    pub version: String,
    /// kubelet API port (daemonEndpoints).
    pub kubelet_port: i32,
}

/// kubeletVersion reported in nodeInfo: the Kubernetes API level hako implements (1.30: the
/// level at which `sleep` lifecycle handlers and native sidecars are on by default, both of
/// which hako runs), with the hako version as semver build metadata.
pub fn kubelet_version(version: &str) -> String {
    format!("v1.30.0+hako.{version}")
}

fn q(s: impl Into<String>) -> Quantity {
    Quantity(s.into())
}

/// Labels the kubelet sets on its Node, plus `--node-labels`.
pub fn node_labels(cfg: &NodeConfig, facts: &NodeFacts) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("kubernetes.io/hostname".into(), cfg.name.clone());
    l.insert("kubernetes.io/os".into(), "linux".into());
    l.insert("kubernetes.io/arch".into(), facts.architecture.clone());
    l.insert("beta.kubernetes.io/os".into(), "linux".into());
    l.insert("beta.kubernetes.io/arch".into(), facts.architecture.clone());
    for (k, v) in &cfg.labels {
        l.insert(k.clone(), v.clone());
    }
    l
}

/// Capacity and allocatable (allocatable = capacity − system-reserved − hard eviction
/// threshold, like the kubelet's node allocatable).
pub fn resources(
    cfg: &NodeConfig,
    facts: &NodeFacts,
) -> (BTreeMap<String, Quantity>, BTreeMap<String, Quantity>) {
    let mut cap = BTreeMap::new();
    let mem = i128::from(facts.memory_bytes);
    let eph = i128::from(facts.ephemeral_storage_bytes);
    cap.insert("cpu".to_string(), q(facts.cpus.to_string()));
    cap.insert("memory".to_string(), q(format!("{}Ki", mem / 1024)));
    cap.insert(
        "ephemeral-storage".to_string(),
        q(format!("{}Ki", eph / 1024)),
    );
    cap.insert("pods".to_string(), q(cfg.max_pods.to_string()));
    cap.insert("hugepages-1Gi".to_string(), q("0"));
    cap.insert("hugepages-2Mi".to_string(), q("0"));
    let mut alloc = cap.clone();
    let cpu_m = (i128::from(facts.cpus) * 1000 - cfg.reserved.cpu_milli).max(0);
    alloc.insert("cpu".to_string(), q(format!("{cpu_m}m")));
    let mem_evict = cfg
        .eviction
        .memory_available
        .map(|t| t.amount(facts.memory_bytes))
        .unwrap_or(0);
    let mem_a = (mem - cfg.reserved.memory - mem_evict).max(0);
    alloc.insert("memory".to_string(), q(format!("{}Ki", mem_a / 1024)));
    let eph_evict = cfg
        .eviction
        .nodefs_available
        .map(|t| t.amount(facts.ephemeral_storage_bytes))
        .unwrap_or(0);
    let eph_a = (eph - cfg.reserved.ephemeral_storage - eph_evict).max(0);
    alloc.insert("ephemeral-storage".to_string(), q(eph_a.to_string()));
    (cap, alloc)
}

/// Node addresses: InternalIP, then Hostname.
pub fn addresses(facts: &NodeFacts) -> Vec<NodeAddress> {
    let mut a = Vec::new();
    if let Some(ip) = facts.internal_ip {
        a.push(NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        });
    }
    a.push(NodeAddress {
        type_: "Hostname".into(),
        address: facts.hostname.clone(),
    });
    a
}

/// nodeInfo.
pub fn node_info(cfg: &NodeConfig, facts: &NodeFacts) -> NodeSystemInfo {
    NodeSystemInfo {
        machine_id: facts.machine_id.clone(),
        system_uuid: facts.system_uuid.clone(),
        boot_id: facts.boot_id.clone(),
        kernel_version: facts.kernel_version.clone(),
        os_image: facts.os_image.clone(),
        operating_system: "linux".into(),
        architecture: facts.architecture.clone(),
        container_runtime_version: format!("hako://{}", cfg.version),
        kubelet_version: kubelet_version(&cfg.version),
        kube_proxy_version: kubelet_version(&cfg.version),
    }
}

/// Why the node is not ready yet (None when it is).
pub fn network_not_ready_reason(cni_config_present: bool) -> Option<String> {
    if cni_config_present {
        None
    } else {
        Some("container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized (no CNI configuration in the conf dir)".into())
    }
}

fn below(t: Option<Threshold>, available: u64, capacity: u64) -> bool {
    t.is_some_and(|t| i128::from(available) < t.amount(capacity))
}

/// The pressure signals the thresholds trip.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    /// MemoryPressure.
    pub memory: bool,
    /// DiskPressure.
    pub disk: bool,
    /// PIDPressure.
    pub pid: bool,
}

/// Evaluates the thresholds against measurements.
pub fn pressure(e: &Eviction, m: &Measurements) -> Pressure {
    Pressure {
        memory: below(e.memory_available, m.memory_available, m.memory_capacity),
        disk: below(e.nodefs_available, m.nodefs_available, m.nodefs_capacity)
            || below(e.nodefs_inodes_free, m.nodefs_inodes_free, m.nodefs_inodes)
            || below(e.imagefs_available, m.nodefs_available, m.nodefs_capacity),
        pid: below(
            e.pid_available,
            m.pids_max.saturating_sub(m.pids_used),
            m.pids_max,
        ),
    }
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
    prev: &[NodeCondition],
) -> NodeCondition {
    let st = if status { "True" } else { "False" };
    let transition = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == st)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    NodeCondition {
        type_: type_.into(),
        status: st.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(transition),
    }
}

/// The node conditions (lastTransitionTime kept from `prev` when the status did not change).
pub fn conditions(
    p: Pressure,
    not_ready: Option<&str>,
    network_unavailable: Option<&str>,
    now: DateTime<Utc>,
    prev: &[NodeCondition],
) -> Vec<NodeCondition> {
    let mut v = vec![
        if p.memory {
            cond(
                "MemoryPressure",
                true,
                "KubeletHasInsufficientMemory",
                "kubelet has insufficient memory available",
                now,
                prev,
            )
        } else {
            cond(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                now,
                prev,
            )
        },
        if p.disk {
            cond(
                "DiskPressure",
                true,
                "KubeletHasDiskPressure",
                "kubelet has disk pressure",
                now,
                prev,
            )
        } else {
            cond(
                "DiskPressure",
                false,
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
                now,
                prev,
            )
        },
        if p.pid {
            cond(
                "PIDPressure",
                true,
                "KubeletHasInsufficientPID",
                "kubelet has insufficient PID available",
                now,
                prev,
            )
        } else {
            cond(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                now,
                prev,
            )
        },
        match not_ready {
            Some(why) => cond("Ready", false, "KubeletNotReady", why, now, prev),
            None => cond(
                "Ready",
                true,
                "KubeletReady",
                "kubelet is posting ready status",
                now,
                prev,
            ),
        },
    ];
    v.push(match network_unavailable {
        Some(why) => cond("NetworkUnavailable", true, "NoRouteCreated", why, now, prev),
        None => cond(
            "NetworkUnavailable",
            false,
            "HakoIsUp",
            "hako node network is configured",
            now,
            prev,
        ),
    });
    v
}

/// The full status the agent reports.
pub fn node_status(
    cfg: &NodeConfig,
    facts: &NodeFacts,
    conditions: Vec<NodeCondition>,
) -> NodeStatus {
    let (cap, alloc) = resources(cfg, facts);
    NodeStatus {
        capacity: Some(cap),
        allocatable: Some(alloc),
        addresses: Some(addresses(facts)),
        conditions: Some(conditions),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: cfg.kubelet_port,
            }),
        }),
        node_info: Some(node_info(cfg, facts)),
        ..Default::default()
    }
}

/// The Node to create on first registration (labels, taints, annotations, status).
pub fn registration(cfg: &NodeConfig, facts: &NodeFacts, status: NodeStatus) -> Node {
    let mut ann = BTreeMap::new();
    ann.insert(
        "volumes.kubernetes.io/controller-managed-attach-detach".to_string(),
        "true".to_string(),
    );
    ann.insert("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string());
    Node {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            labels: Some(node_labels(cfg, facts)),
            annotations: Some(ann),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: if cfg.taints.is_empty() {
                None
            } else {
                Some(cfg.taints.clone())
            },
            ..Default::default()
        }),
        status: Some(status),
    }
}

/// Whether two statuses differ in anything but heartbeat times (so a report is due).
pub fn status_changed(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        s
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> NodeFacts {
        NodeFacts {
            machine_id: "m".into(),
            system_uuid: "u".into(),
            boot_id: "b".into(),
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            architecture: "amd64".into(),
            hostname: "host1".into(),
            cpus: 4,
            memory_bytes: 8 << 30,
            ephemeral_storage_bytes: 100 << 30,
            internal_ip: "192.0.2.11".parse().ok(),
        }
    }

    fn cfg() -> NodeConfig {
        NodeConfig {
            name: "n1".into(),
            labels: parse_labels("role=edge, zone=a").expect("labels"),
            taints: parse_taints("dedicated=gpu:NoSchedule,spot:NoExecute").expect("taints"),
            reserved: parse_reserved("cpu=500m,memory=1Gi").expect("reserved"),
            max_pods: 110,
            eviction: parse_eviction(DEFAULT_EVICTION_HARD).expect("eviction"),
            version: "0.1.0".into(),
            kubelet_port: 10250,
        }
    }

    #[test]
    fn flags_parse_and_reject() {
        let t = parse_taints("a=b:NoExecute").expect("t");
        assert_eq!(
            (
                t[0].key.as_str(),
                t[0].value.as_deref(),
                t[0].effect.as_str()
            ),
            ("a", Some("b"), "NoExecute")
        );
        assert!(parse_taints("a=b").is_err());
        assert!(parse_taints("a=b:Sometimes").is_err());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_reserved("gpu=1").is_err());
        assert!(parse_eviction("memory.available>1").is_err());
        assert!(parse_eviction("nodefs.available<200%").is_err());
    }

    #[test]
    fn capacity_and_allocatable() {
        let (cap, alloc) = resources(&cfg(), &facts());
        assert_eq!(cap["cpu"].0, "4");
        assert_eq!(cap["memory"].0, "8388608Ki");
        assert_eq!(cap["pods"].0, "110");
        assert_eq!(alloc["cpu"].0, "3500m");
        // 8Gi − 1Gi reserved − 100Mi eviction.
        assert_eq!(alloc["memory"].0, format!("{}Ki", (7 * 1024 - 100) * 1024));
        // 100Gi − 10%.
        assert_eq!(
            alloc["ephemeral-storage"].0,
            ((100i128 << 30) * 9 / 10).to_string()
        );
    }

    #[test]
    fn registration_content() {
        let f = facts();
        let c = cfg();
        let now = Utc::now();
        let st = node_status(
            &c,
            &f,
            conditions(Pressure::default(), None, None, now, &[]),
        );
        let n = registration(&c, &f, st);
        let l = n.metadata.labels.clone().unwrap_or_default();
        assert_eq!(l["kubernetes.io/hostname"], "n1");
        assert_eq!(l["kubernetes.io/arch"], "amd64");
        assert_eq!(l["role"], "edge");
        assert_eq!(n.spec.and_then(|s| s.taints).map(|t| t.len()), Some(2));
        let st = n.status.unwrap_or_default();
        let info = st.node_info.unwrap_or_default();
        assert_eq!(info.container_runtime_version, "hako://0.1.0");
        assert_eq!(info.kubelet_version, "v1.30.0+hako.0.1.0");
        let addrs = st.addresses.unwrap_or_default();
        assert_eq!(addrs[0].type_, "InternalIP");
        assert_eq!(addrs[1].address, "host1");
        assert_eq!(
            st.daemon_endpoints
                .and_then(|d| d.kubelet_endpoint)
                .map(|e| e.port),
            Some(10250)
        );
    }

    #[test]
    fn pressure_from_thresholds() {
        let e = parse_eviction(&format!("{DEFAULT_EVICTION_HARD},pid.available<10%")).expect("e");
        let ok = Measurements {
            memory_available: 1 << 30,
            memory_capacity: 8 << 30,
            nodefs_available: 50 << 30,
            nodefs_capacity: 100 << 30,
            nodefs_inodes_free: 1000,
            nodefs_inodes: 2000,
            pids_used: 100,
            pids_max: 1000,
        };
        assert_eq!(pressure(&e, &ok), Pressure::default());
        let low_mem = Measurements {
            memory_available: 50 << 20,
            ..ok
        };
        assert!(pressure(&e, &low_mem).memory);
        let low_disk = Measurements {
            nodefs_available: 12 << 30,
            ..ok
        };
        assert!(
            pressure(&e, &low_disk).disk,
            "imagefs 15% trips on the shared filesystem"
        );
        let inodes = Measurements {
            nodefs_inodes_free: 50,
            ..ok
        };
        assert!(pressure(&e, &inodes).disk);
        let pids = Measurements {
            pids_used: 950,
            ..ok
        };
        assert!(pressure(&e, &pids).pid);
    }

    #[test]
    fn conditions_keep_transition_times() {
        let t0 = Utc::now() - k8s_openapi::chrono::Duration::seconds(100);
        let first = conditions(Pressure::default(), Some("no cni"), Some("no cni"), t0, &[]);
        let ready = first
            .iter()
            .find(|c| c.type_ == "Ready")
            .cloned()
            .expect("ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("KubeletNotReady"));
        let t1 = Utc::now();
        let second = conditions(Pressure::default(), None, None, t1, &first);
        let mp0 = first
            .iter()
            .find(|c| c.type_ == "MemoryPressure")
            .expect("mp");
        let mp1 = second
            .iter()
            .find(|c| c.type_ == "MemoryPressure")
            .expect("mp");
        assert_eq!(mp0.last_transition_time, mp1.last_transition_time);
        assert_eq!(mp1.last_heartbeat_time, Some(Time(t1)));
        let r1 = second.iter().find(|c| c.type_ == "Ready").expect("ready");
        assert_eq!(r1.status, "True");
        assert_eq!(r1.last_transition_time, Some(Time(t1)));
        let a = node_status(&cfg(), &facts(), first.clone());
        let mut later = first.clone();
        for c in &mut later {
            c.last_heartbeat_time = Some(Time(t1));
        }
        assert!(!status_changed(&a, &node_status(&cfg(), &facts(), later)));
        assert!(status_changed(&a, &node_status(&cfg(), &facts(), second)));
    }
}
