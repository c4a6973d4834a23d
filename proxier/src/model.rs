//! Service model: k8s Services and EndpointSlices reduced to per-port service entries with
//! their endpoints. Pure.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Default ClientIP affinity timeout (seconds), as Kubernetes defaults it.
pub const DEFAULT_AFFINITY_SECONDS: i32 = 10800;

/// Namespace and name of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Lower-case name as iptables and kube-proxy's chain hashing use it.
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// Ready condition (absent = true).
    pub ready: bool,
    /// Serving condition (absent = ready).
    pub serving: bool,
    /// Terminating condition (absent = false).
    pub terminating: bool,
    /// On this node.
    pub local: bool,
}

impl Endpoint {
    /// `ip:port` (`[ip]:port` for IPv6), as kube-proxy hashes and DNATs it.
    pub fn addr(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}

/// One port of one Service, with everything the backends need to program it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The Service.
    pub key: ServiceKey,
    /// Port name (may be empty).
    pub port_name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Cluster IPs (one per family).
    pub cluster_ips: Vec<IpAddr>,
    /// Service port.
    pub port: u16,
    /// Node port, if any.
    pub node_port: Option<u16>,
    /// External IPs.
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs.
    pub lb_ips: Vec<IpAddr>,
    /// loadBalancerSourceRanges (CIDR text, validated).
    pub lb_source_ranges: Vec<String>,
    /// ClientIP affinity timeout, if affinity is on.
    pub affinity_seconds: Option<i32>,
    /// externalTrafficPolicy Local.
    pub external_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_local: bool,
    /// Endpoints, sorted.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// kube-proxy's service port name: `ns/name:port` or `ns/name` without a port name.
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            self.key.to_string()
        } else {
            format!("{}:{}", self.key, self.port_name)
        }
    }

    /// Whether the service has external entry points (node port, external or LB IPs).
    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }

    /// Endpoints used for cluster-wide traffic: ready ones, else serving terminating ones.
    pub fn cluster_endpoints(&self) -> Vec<&Endpoint> {
        pick(self.endpoints.iter())
    }

    /// Node-local endpoints under the same ready/terminating rule.
    pub fn local_endpoints(&self) -> Vec<&Endpoint> {
        pick(self.endpoints.iter().filter(|e| e.local))
    }
}

fn pick<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<&'a Endpoint> {
    let ready: Vec<_> = eps.clone().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.serving && e.terminating).collect()
}

/// Why an object (or part of one) was skipped.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// Port number outside 1..=65535.
    #[error("{object}: port {port} out of range")]
    PortRange {
        /// Object.
        object: String,
        /// Value.
        port: i32,
    },
    /// Address did not parse.
    #[error("{object}: unparsable IP {ip:?}")]
    BadIp {
        /// Object.
        object: String,
        /// Text.
        ip: String,
    },
    /// Unknown protocol.
    #[error("{object}: unsupported protocol {protocol:?}")]
    Protocol {
        /// Object.
        object: String,
        /// Text.
        protocol: String,
    },
    /// Object has no name/namespace.
    #[error("object without namespace or name")]
    NoName,
}

/// Namespace/name of a Service.
pub fn service_key(svc: &Service) -> Result<ServiceKey, ModelError> {
    Ok(ServiceKey {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().ok_or(ModelError::NoName)?,
    })
}

/// The Service an EndpointSlice belongs to, from its label.
pub fn slice_service_key(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey {
        namespace: slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: name.clone(),
    })
}

fn port16(object: &str, port: i32) -> Result<u16, ModelError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ModelError::PortRange {
            object: object.to_string(),
            port,
        }),
    }
}

fn parse_ip(object: &str, s: &str) -> Result<IpAddr, ModelError> {
    s.parse().map_err(|_| ModelError::BadIp {
        object: object.to_string(),
        ip: s.to_string(),
    })
}

fn valid_cidr(s: &str) -> bool {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, len),
        None => (s, "32"),
    };
    match (ip.trim().parse::<IpAddr>(), len.parse::<u8>()) {
        (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32,
        (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128,
        _ => false,
    }
}

/// What the proxier keeps of a Service once converted: its service ports without endpoints
/// (empty for headless and ExternalName services). The k8s object itself is not kept.
pub type CompactService = Vec<ServicePort>;

/// One port of an EndpointSlice, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlicePort {
    name: String,
    protocol: Option<Protocol>,
    port: Option<i32>,
}

/// One endpoint of an EndpointSlice, as kept: its first address parsed (or the error naming
/// the slice), its conditions, and whether it is on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceEndpoint {
    /// The error is boxed: it is rare, and unboxed it would make every endpoint 64 bytes.
    ip: Option<Result<IpAddr, Box<ModelError>>>,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// What the proxier keeps of an EndpointSlice once converted (a few bytes per endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactSlice {
    object: String,
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

/// The compact EndpointSlices of one Service by slice name: a sorted vector (a Service has
/// one slice or a few; a `BTreeMap` would allocate a node for eleven per Service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceSet(Vec<(Box<str>, CompactSlice)>);

impl SliceSet {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(name))
    }

    /// The slice named `name`.
    pub fn get(&self, name: &str) -> Option<&CompactSlice> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// Adds or replaces the slice named `name`; returns the one replaced.
    pub fn insert(&mut self, name: String, slice: CompactSlice) -> Option<CompactSlice> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, slice)),
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (name.into_boxed_str(), slice));
                None
            }
        }
    }

    /// Removes the slice named `name`.
    pub fn remove(&mut self, name: &str) -> Option<CompactSlice> {
        let i = self.find(name).ok()?;
        let (_, s) = self.0.remove(i);
        self.0.shrink_to_fit();
        Some(s)
    }

    /// No slice.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The slices, by name.
    pub fn values(&self) -> impl Iterator<Item = &CompactSlice> {
        self.0.iter().map(|(_, s)| s)
    }
}

/// Converts an EndpointSlice to what `attach_endpoints` needs; `hostname` decides locality.
pub fn compact_slice(slice: &EndpointSlice, hostname: &str) -> CompactSlice {
    let object = format!(
        "EndpointSlice {}/{}",
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        slice.metadata.name.as_deref().unwrap_or("")
    );
    let ports = slice
        .ports
        .iter()
        .flatten()
        .map(|sp| SlicePort {
            name: sp.name.clone().unwrap_or_default(),
            protocol: Protocol::parse(sp.protocol.as_deref()),
            port: sp.port,
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .map(|ep| {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            SliceEndpoint {
                // One address per endpoint is used, as kube-proxy does.
                ip: ep
                    .addresses
                    .first()
                    .map(|a| parse_ip(&object, a).map_err(Box::new)),
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: ep.node_name.as_deref() == Some(hostname),
            }
        })
        .collect();
    CompactSlice {
        object,
        ports,
        endpoints,
    }
}

/// Builds the service ports of one Service from it and its slices. Headless and
/// ExternalName services yield nothing. Bad ports/addresses are errors naming the object;
/// bad endpoints are skipped and returned as warnings.
pub fn build_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    hostname: &str,
    warnings: &mut Vec<ModelError>,
) -> Result<Vec<ServicePort>, ModelError> {
    let ports = compact_service(svc)?;
    let compact: Vec<CompactSlice> = slices.iter().map(|s| compact_slice(s, hostname)).collect();
    let refs: Vec<&CompactSlice> = compact.iter().collect();
    Ok(attach_endpoints(&ports, &refs, warnings))
}

/// The service ports of a Service without endpoints (see `attach_endpoints`).
pub fn compact_service(svc: &Service) -> Result<CompactService, ModelError> {
    let key = service_key(svc)?;
    let object = format!("Service {key}");
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(Vec::new());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let mut ip_texts: Vec<&str> = spec
        .cluster_ips
        .as_ref()
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if ip_texts.is_empty() {
        if let Some(ip) = spec.cluster_ip.as_deref() {
            ip_texts.push(ip);
        }
    }
    if ip_texts.is_empty() || ip_texts.iter().any(|s| *s == "None" || s.is_empty()) {
        return Ok(Vec::new());
    }
    let cluster_ips = ip_texts
        .iter()
        .map(|s| parse_ip(&object, s))
        .collect::<Result<Vec<_>, _>>()?;
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|s| parse_ip(&object, s))
        .collect::<Result<Vec<_>, _>>()?;
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .map(|s| parse_ip(&object, s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut lb_source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        if valid_cidr(r) {
            lb_source_ranges.push(r.trim().to_string());
        } else {
            return Err(ModelError::BadIp {
                object,
                ip: r.clone(),
            });
        }
    }
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_SECONDS)
    });
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let with_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));

    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol =
            Protocol::parse(p.protocol.as_deref()).ok_or_else(|| ModelError::Protocol {
                object: object.clone(),
                protocol: p.protocol.clone().unwrap_or_default(),
            })?;
        let port = port16(&object, p.port)?;
        let node_port = match p.node_port {
            Some(np) if with_node_ports => Some(port16(&object, np)?),
            _ => None,
        };
        out.push(ServicePort {
            key: key.clone(),
            port_name: p.name.clone().unwrap_or_default(),
            protocol,
            cluster_ips: cluster_ips.clone(),
            port,
            node_port,
            external_ips: external_ips.clone(),
            lb_ips: lb_ips.clone(),
            lb_source_ranges: lb_source_ranges.clone(),
            affinity_seconds,
            external_local,
            internal_local,
            endpoints: Vec::new(),
        });
    }
    // Kept until the Service changes: no spare capacity.
    out.shrink_to_fit();
    Ok(out)
}

/// The service ports with their endpoints from the slices (named target ports resolved,
/// sorted, duplicates dropped). Bad endpoints are skipped and returned as warnings.
pub fn attach_endpoints(
    ports: &[ServicePort],
    slices: &[&CompactSlice],
    warnings: &mut Vec<ModelError>,
) -> Vec<ServicePort> {
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let mut endpoints = Vec::new();
        for slice in slices {
            let Some(sp) = slice
                .ports
                .iter()
                .find(|sp| sp.name == p.port_name && sp.protocol == Some(p.protocol))
            else {
                continue;
            };
            let Some(raw_port) = sp.port else { continue };
            let ep_port = match port16(&slice.object, raw_port) {
                Ok(p) => p,
                Err(e) => {
                    warnings.push(e);
                    continue;
                }
            };
            for ep in &slice.endpoints {
                match &ep.ip {
                    None => {}
                    Some(Ok(ip)) => endpoints.push(Endpoint {
                        ip: *ip,
                        port: ep_port,
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        local: ep.local,
                    }),
                    Some(Err(e)) => warnings.push((**e).clone()),
                }
            }
        }
        endpoints.sort();
        endpoints.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        endpoints.shrink_to_fit();
        let mut sp = p.clone();
        sp.endpoints = endpoints;
        out.push(sp);
    }
    out
}

/// Desired state: every service port, grouped by Service.
pub type Model = BTreeMap<ServiceKey, Vec<ServicePort>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("service yaml")
    }
    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("slice yaml")
    }

    const SVC: &str = "metadata: {name: web, namespace: ns}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: http}]}";

    #[test]
    fn named_ports_and_conditions() {
        let s = svc(SVC);
        let sl = slice(
            "metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.0.1], nodeName: me}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [bogus]}",
        );
        let mut w = Vec::new();
        let ports = build_service(&s, &[&sl], "me", &mut w).expect("build");
        assert_eq!(ports.len(), 1);
        let p = &ports[0];
        assert_eq!(p.port_name_string(), "ns/web:http");
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(p.cluster_endpoints().len(), 1);
        assert_eq!(p.cluster_endpoints()[0].addr(), "10.0.0.1:8080");
        assert!(p.cluster_endpoints()[0].local);
        assert_eq!(w.len(), 1, "bogus address reported");
    }

    #[test]
    fn terminating_used_only_without_ready() {
        let s = svc(SVC);
        let sl = slice(
            "metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}",
        );
        let ports = build_service(&s, &[&sl], "me", &mut Vec::new()).expect("build");
        let eps = ports[0].cluster_endpoints();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr(), "10.0.0.2:8080");
    }

    #[test]
    fn bad_and_headless() {
        let cases = [
            ("metadata: {name: h, namespace: ns}\nspec: {clusterIP: None, ports: [{port: 80}]}", Ok(0)),
            ("metadata: {name: b, namespace: ns}\nspec: {clusterIP: 10.1, ports: [{port: 80}]}", Err("unparsable IP")),
            ("metadata: {name: p, namespace: ns}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 70000}]}", Err("out of range")),
            ("metadata: {name: n, namespace: ns}\nspec: {type: NodePort, clusterIP: 10.0.0.1, ports: [{port: 80, nodePort: 30080}]}", Ok(1)),
        ];
        for (y, want) in cases {
            let got = build_service(&svc(y), &[], "me", &mut Vec::new());
            match (got, want) {
                (Ok(v), Ok(n)) => assert_eq!(v.len(), n, "{y}"),
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{e}"),
                (g, w) => panic!("{y}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn the_compact_service_keeps_every_field_the_renderers_read() {
        let s = svc("metadata: {name: lb, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.9
  clusterIPs: [10.96.0.9, fd00::9]
  externalIPs: [192.0.2.7]
  loadBalancerSourceRanges: [198.51.100.0/24]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports: [{name: https, port: 443, protocol: UDP, nodePort: 30443}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.4}, {hostname: only.a.name}]}}");
        let c = compact_service(&s).expect("compact");
        assert_eq!(c.len(), 1);
        let p = &c[0];
        let ip = |t: &str| t.parse::<IpAddr>().expect("ip");
        assert_eq!(p.port_name_string(), "ns/lb:https");
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(p.cluster_ips, [ip("10.96.0.9"), ip("fd00::9")]);
        assert_eq!((p.port, p.node_port), (443, Some(30443)));
        assert_eq!(p.external_ips, [ip("192.0.2.7")]);
        assert_eq!(
            p.lb_ips,
            [ip("203.0.113.4")],
            "hostname-only ingress skipped"
        );
        assert_eq!(p.lb_source_ranges, ["198.51.100.0/24"]);
        assert_eq!(p.affinity_seconds, Some(60));
        assert!(p.external_local && p.internal_local);
        assert!(p.endpoints.is_empty());
        assert_eq!(c.capacity(), 1, "no spare capacity kept");
    }

    #[test]
    fn slice_sets_stay_sorted_and_replace_by_name() {
        let sl = |n: &str, ip: &str| {
            compact_slice(
                &slice(&format!(
                    "metadata: {{name: {n}, namespace: ns}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]"
                )),
                "me",
            )
        };
        let mut set = SliceSet::default();
        assert!(set.insert("b".into(), sl("b", "10.0.0.2")).is_none());
        assert!(set.insert("a".into(), sl("a", "10.0.0.1")).is_none());
        assert!(set.insert("c".into(), sl("c", "10.0.0.3")).is_none());
        let old = set.insert("b".into(), sl("b", "10.0.0.9"));
        assert_eq!(old, Some(sl("b", "10.0.0.2")));
        let objects: Vec<&str> = set.values().map(|s| s.object.as_str()).collect();
        assert_eq!(
            objects,
            [
                "EndpointSlice ns/a",
                "EndpointSlice ns/b",
                "EndpointSlice ns/c"
            ]
        );
        assert_eq!(set.get("b"), Some(&sl("b", "10.0.0.9")));
        assert_eq!(set.remove("a"), Some(sl("a", "10.0.0.1")));
        assert_eq!(set.remove("a"), None);
        assert!(set.get("a").is_none());
        set.remove("b");
        set.remove("c");
        assert!(set.is_empty());
    }
}
