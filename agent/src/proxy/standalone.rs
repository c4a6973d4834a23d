//! Standalone Services: the Services of the manifest directory get discovery/v1 EndpointSlices
//! built from the local pods their selectors match (the EndpointSlice controller's rules), and
//! a runner feeds them to `hako_proxier::Proxier` so a ClusterIP works with no cluster.
//!
//! [`build_slices`] is pure. [`ServiceRunner`] owns the proxier and syncs only when the
//! Services or the slices changed. [`spawn_poller`] is the agent's loop, effectful: the one
//! sync runner of `hako_proxier` (`runner::Runner`, on-change mode) over a `Poll` source that
//! every period reads the Services from the manifest directory and the pods (with status)
//! from `<root>/pods/*/status.json`, so a readiness flip recorded by a pod worker reaches the
//! dataplane within one period.

use crate::api::healthz::AgentMetrics;
use crate::source::manifest::StaticPodOptions;
use hako_proxier::runner::{RunEnd, Runner, RunnerConfig, Source, SyncEvent, SyncWhen, Wake};
use hako_proxier::{Proxier, SyncError};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the slice's manager.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// This agent's manager name.
pub const MANAGER: &str = "hako-agent";

/// Whether a pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's IPs (status.podIPs, else status.podIP).
pub fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(st) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut v: Vec<String> = st
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .filter(|ip| !ip.is_empty())
        .collect();
    if v.is_empty() {
        v.extend(st.pod_ip.clone().filter(|ip| !ip.is_empty()));
    }
    v
}

/// The EndpointSlice controller's `ShouldPodBeInEndpoints`: terminal pods are out; a pod
/// needs an IP.
fn pod_eligible(pod: &Pod) -> bool {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("");
    let restart = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let terminal = match restart {
        "Never" => phase == "Failed" || phase == "Succeeded",
        "OnFailure" => phase == "Succeeded",
        _ => phase == "Failed" || phase == "Succeeded",
    };
    !terminal && !pod_ips(pod).is_empty()
}

/// Whether the pod's labels match a Service selector (an empty selector matches nothing: such
/// Services have manually managed endpoints).
pub fn selector_matches(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    if selector.is_empty() {
        return false;
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Resolves a service port's targetPort for one pod: a number as is (default: the port), a
/// name through the pod's container ports (same protocol). None when the name is not found.
pub fn resolve_target_port(
    pod: &Pod,
    target: Option<&IntOrString>,
    port: i32,
    protocol: &str,
) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(0)) => Some(port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            let spec = pod.spec.as_ref()?;
            spec.containers
                .iter()
                .chain(
                    spec.init_containers
                        .iter()
                        .flatten()
                        .filter(|c| c.restart_policy.as_deref() == Some("Always")),
                )
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|p| p.container_port)
        }
    }
}

fn hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..5])
}

/// The EndpointSlices of the given Services from `pods` (the pods with their status).
///
/// Per Service with a selector: each matching, non-terminal pod with an IP becomes an endpoint
/// with `ready` = Ready condition and not terminating, `serving` = Ready condition, `terminating`
/// = deletionTimestamp set, `nodeName` = spec.nodeName, a `targetRef` to the pod, and `hostname`
/// when the pod's `subdomain` is the Service name. Pods are grouped by their resolved ports
/// (named target ports may differ between pods) and by address family, one slice per group,
/// named `<service>-<hash>` deterministically. `publishNotReadyAddresses` makes every endpoint
/// ready. Services without a selector, headless or not, get no slices.
pub fn build_slices(services: &[Service], pods: &[Pod]) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(name) = svc.metadata.name.clone() else {
            continue;
        };
        let selector = spec.selector.clone().unwrap_or_default();
        if selector.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
        let ports = spec.ports.clone().unwrap_or_default();
        // (family, resolved ports) -> endpoints
        type Group = (String, Vec<(Option<String>, i32, String)>);
        let mut groups: BTreeMap<Group, Vec<Endpoint>> = BTreeMap::new();
        for pod in pods {
            let pod_ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            if pod_ns != ns || !selector_matches(&selector, pod) || !pod_eligible(pod) {
                continue;
            }
            let mut resolved = Vec::new();
            for p in &ports {
                let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                if let Some(tp) = resolve_target_port(pod, p.target_port.as_ref(), p.port, &proto) {
                    resolved.push((p.name.clone(), tp, proto));
                }
            }
            if resolved.is_empty() && !ports.is_empty() {
                continue;
            }
            let ready_cond = pod_ready(pod);
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let ready = publish_not_ready || (ready_cond && !terminating);
            let serving = publish_not_ready || ready_cond;
            let hostname = pod
                .spec
                .as_ref()
                .filter(|s| s.subdomain.as_deref() == Some(name.as_str()))
                .and_then(|s| s.hostname.clone());
            for ip in pod_ips(pod) {
                let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
                groups
                    .entry((family.to_string(), resolved.clone()))
                    .or_default()
                    .push(Endpoint {
                        addresses: vec![ip],
                        conditions: Some(EndpointConditions {
                            ready: Some(ready),
                            serving: Some(serving),
                            terminating: Some(terminating),
                        }),
                        hostname: hostname.clone(),
                        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            namespace: Some(pod_ns.to_string()),
                            name: pod.metadata.name.clone(),
                            uid: pod.metadata.uid.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
            }
        }
        for ((family, resolved), mut endpoints) in groups {
            endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
            let key = format!("{family}/{resolved:?}");
            let labels = BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), name.clone()),
                (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
            ]);
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{}", hash(&key))),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    ..Default::default()
                },
                address_type: family,
                endpoints,
                ports: Some(
                    resolved
                        .into_iter()
                        .map(|(n, port, proto)| EndpointPort {
                            name: Some(n.unwrap_or_default()),
                            port: Some(port),
                            protocol: Some(proto),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            });
        }
    }
    out
}

/// What the proxier was last given: the Service loop's change detection.
#[derive(Debug, Default)]
struct Fed(Option<(Vec<Service>, Vec<EndpointSlice>)>);

/// What one [`Fed::feed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Feed {
    /// The Services or slices differed and were handed to the proxier.
    changed: bool,
    /// Services read.
    services: usize,
    /// Slices built.
    slices: usize,
}

impl Fed {
    /// Builds the slices of `services` from `pods` and hands both to `proxier` when they
    /// differ from what it was last given.
    fn feed(&mut self, proxier: &mut Proxier, services: Vec<Service>, pods: &[Pod]) -> Feed {
        let slices = build_slices(&services, pods);
        let mut feed = Feed {
            changed: false,
            services: services.len(),
            slices: slices.len(),
        };
        if self
            .0
            .as_ref()
            .is_none_or(|(s, e)| *s != services || *e != slices)
        {
            proxier.replace_all(services.clone(), slices.clone());
            self.0 = Some((services, slices));
            feed.changed = true;
        }
        feed
    }
}

/// The runner's timing for a poll `period`: a check every period, a sync only when the
/// Services or slices changed, a failed sync retried every period (no growth), no periodic
/// full resync.
fn runner_config(period: Duration) -> RunnerConfig {
    RunnerConfig {
        min_sync_period: period,
        sync_period: Duration::MAX,
        sync_when: SyncWhen::OnChange,
        backoff_min: period,
        backoff_max: period,
    }
}

/// Feeds the proxier and syncs when something changed.
pub struct ServiceRunner {
    proxier: Proxier,
    fed: Fed,
    /// Decides [`Self::update`]'s syncs (no rate limit: every update may sync).
    runner: Runner,
}

/// What one update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// Whether a sync ran.
    pub synced: bool,
    /// Slices computed.
    pub slices: usize,
    /// Sync duration.
    pub took: Duration,
}

impl ServiceRunner {
    /// A runner over a proxier.
    pub fn new(proxier: Proxier) -> Self {
        Self {
            proxier,
            fed: Fed::default(),
            runner: Runner::new(runner_config(Duration::ZERO)),
        }
    }

    /// A runner over the iptables backend (`variant`: `""`, `legacy` or `nft` binaries).
    pub fn iptables(node_name: &str, variant: &str, cluster_cidr: Option<String>) -> Self {
        let render = hako_proxier::RenderOpts {
            cluster_cidr,
            ..Default::default()
        };
        let backend = hako_proxier::IptablesBackend::new(
            hako_proxier::RealIptables::with_variant(variant),
            render.clone(),
        );
        Self::new(Proxier::new(
            Box::new(backend),
            hako_proxier::ProxierOpts {
                hostname: node_name.to_string(),
                render,
            },
        ))
    }

    /// Builds the slices and syncs the proxier when the Services or slices differ from the last
    /// update (or the last sync failed).
    pub fn update(
        &mut self,
        services: Vec<Service>,
        pods: &[Pod],
    ) -> Result<UpdateOutcome, SyncError> {
        let started = Instant::now();
        let feed = self.fed.feed(&mut self.proxier, services, pods);
        if feed.changed {
            self.runner.notify();
        }
        let Some(plan) = self.runner.schedule().decide(Instant::now()) else {
            return Ok(UpdateOutcome {
                synced: false,
                slices: feed.slices,
                took: Duration::ZERO,
            });
        };
        self.runner.sync_now(&mut self.proxier, plan.full)?;
        Ok(UpdateOutcome {
            synced: true,
            slices: feed.slices,
            took: started.elapsed(),
        })
    }

    /// The Service loop until `stop` is set: a [`Poll`] every `opts.period`, a sync when it
    /// fed a change (or to retry a failure), recorded in `metrics` and logged.
    fn run(mut self, opts: PollerOptions, metrics: Arc<AgentMetrics>, stop: Arc<AtomicBool>) {
        let counts = Arc::new(Mutex::new(Feed {
            changed: false,
            services: 0,
            slices: 0,
        }));
        let (m, c) = (metrics.clone(), counts.clone());
        let mut runner = Runner::new(runner_config(opts.period)).with_observer(move |ev| {
            observe(&m, &c, ev);
        });
        let mut poll = Poll {
            opts,
            metrics,
            stop,
            fed: self.fed,
            counts,
        };
        match runner.run(&mut self.proxier, &mut poll) {
            Ok(RunEnd::Closed) => {}
            Err(never) => match never {},
        }
    }
}

/// The agent's record of one sync of the Service loop: its metrics and the "service rules
/// synced" line with the counts of the last feed (`counts`). A failure is logged by the
/// runner ("proxier sync failed; retrying") and retried next period.
fn observe(metrics: &AgentMetrics, counts: &Mutex<Feed>, ev: &SyncEvent<'_>) {
    match ev {
        SyncEvent::Synced { took, .. } => {
            metrics.observe_proxy_sync(*took);
            let c = *counts.lock().unwrap_or_else(|p| p.into_inner());
            info!(
                services = c.services,
                slices = c.slices,
                took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                "service rules synced"
            );
        }
        SyncEvent::Failed { .. } => metrics.proxy_sync_error(),
    }
}

/// Options of [`spawn_poller`].
pub struct PollerOptions {
    /// Manifest directory (Services are read from it).
    pub manifest_dir: PathBuf,
    /// Static pod options (node name) for loading the directory.
    pub static_pods: StaticPodOptions,
    /// Agent root: pods with status from `<root>/pods/*/status.json`.
    pub root: PathBuf,
    /// Poll period.
    pub period: Duration,
}

/// Sleeps until `deadline` in steps of at most 100 ms; false when `stop` was set.
fn sleep_until(deadline: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => {
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
            _ => return true,
        }
    }
}

/// The pods with their status from the records (None, logged, when they cannot be read).
fn read_pods(root: &Path) -> Option<Vec<Pod>> {
    match crate::sys::state::read_records(root) {
        Ok((recs, _)) => Some(recs.into_iter().map(|r| r.pod).collect()),
        Err(e) => {
            warn!(error = %e, "services: reading pod records");
            None
        }
    }
}

/// The Service loop's source: at each deadline it reads the pods from the records (and
/// refreshes the pod and container gauges of `metrics` from them) and the Services from the
/// manifest directory, and feeds the proxier when they changed. Read errors are logged and
/// the check is idle (the manifest source reports bad documents itself). Ready once it has
/// fed the proxier; closed when `stop` is set.
struct Poll {
    opts: PollerOptions,
    metrics: Arc<AgentMetrics>,
    stop: Arc<AtomicBool>,
    fed: Fed,
    /// The counts of the last feed, for the observer's log line.
    counts: Arc<Mutex<Feed>>,
}

impl Source<Proxier> for Poll {
    type Error = Infallible;

    fn wait(&mut self, deadline: Instant, proxier: &mut Proxier) -> Result<Wake, Infallible> {
        if !sleep_until(deadline, &self.stop) {
            return Ok(Wake::Closed { changed: false });
        }
        let Some(pods) = read_pods(&self.opts.root) else {
            return Ok(Wake::Idle);
        };
        self.metrics.observe_pods(&pods);
        let services: Vec<Service> =
            match crate::source::dir::load_dir(&self.opts.manifest_dir, &self.opts.static_pods) {
                Ok(l) => l.snapshot.services.into_values().collect(),
                Err(e) => {
                    warn!(error = %e, "services: reading the manifest directory");
                    return Ok(Wake::Idle);
                }
            };
        let feed = self.fed.feed(proxier, services, &pods);
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = feed;
        Ok(if feed.changed {
            Wake::Changed
        } else {
            Wake::Idle
        })
    }

    fn ready(&self) -> bool {
        self.fed.0.is_some()
    }
}

/// Runs the Service loop on a thread until `stop` is set: every period, Services from the
/// manifest directory and pods from the records reach the proxier through
/// `hako_proxier::runner::Runner` (a sync only when they changed; a failed sync is retried
/// next period); the pod and container gauges of `metrics` are refreshed from the same
/// records. `runner` None ([`ProxyMode::None`]): the gauges only.
pub fn spawn_poller(
    runner: Option<ServiceRunner>,
    opts: PollerOptions,
    metrics: Arc<AgentMetrics>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("services".into())
        .spawn(move || match runner {
            Some(r) => r.run(opts, metrics, stop),
            None => {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(pods) = read_pods(&opts.root) {
                        metrics.observe_pods(&pods);
                    }
                    let next = Instant::now()
                        .checked_add(opts.period)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
                    if !sleep_until(next, &stop) {
                        break;
                    }
                }
            }
        })
}

/// The dataplane the standalone agent programs for its Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// kube-proxy-compatible iptables rules (default).
    Iptables,
    /// nf_tables over netlink.
    Nftables,
    /// IPVS (needs the ip_vs modules).
    Ipvs,
    /// No Service dataplane.
    None,
}

/// A `--proxy-mode` value that names no mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown proxy mode {0:?} (iptables, nftables, ipvs, none)")]
pub struct UnknownProxyMode(pub String);

impl std::str::FromStr for ProxyMode {
    type Err = UnknownProxyMode;
    fn from_str(s: &str) -> Result<Self, UnknownProxyMode> {
        match s {
            "iptables" | "" => Ok(Self::Iptables),
            "nftables" => Ok(Self::Nftables),
            "ipvs" => Ok(Self::Ipvs),
            "none" => Ok(Self::None),
            o => Err(UnknownProxyMode(o.to_string())),
        }
    }
}

/// A runner for `mode` (None for [`ProxyMode::None`]), with conntrack flushing of stale UDP
/// flows.
pub fn runner_for_mode(
    mode: ProxyMode,
    node_name: &str,
    iptables_variant: &str,
    cluster_cidr: Option<String>,
) -> Result<Option<ServiceRunner>, SyncError> {
    Ok(proxier_for_mode(mode, node_name, iptables_variant, cluster_cidr)?.map(ServiceRunner::new))
}

/// The proxier for `mode` (None for [`ProxyMode::None`]) with conntrack flushing of stale UDP
/// flows: what the standalone Service loop and cluster mode's in-agent proxier both run.
/// Fails when the backend cannot be set up (IPVS without the ip_vs modules).
pub fn proxier_for_mode(
    mode: ProxyMode,
    node_name: &str,
    iptables_variant: &str,
    cluster_cidr: Option<String>,
) -> Result<Option<Proxier>, SyncError> {
    let render = hako_proxier::RenderOpts {
        cluster_cidr,
        ..Default::default()
    };
    let backend: Box<dyn hako_proxier::Backend> = match mode {
        ProxyMode::None => return Ok(None),
        ProxyMode::Iptables => Box::new(hako_proxier::IptablesBackend::real(
            iptables_variant,
            render.clone(),
        )),
        ProxyMode::Nftables => Box::new(hako_proxier::NftablesBackend::new(render.clone())),
        ProxyMode::Ipvs => Box::new(hako_proxier::ipvs::IpvsBackend::new(
            hako_proxier::ipvs::IpvsOpts {
                render: render.clone(),
                iptables_variant: iptables_variant.to_string(),
                ..Default::default()
            },
        )?),
    };
    let proxier = Proxier::new(
        backend,
        hako_proxier::ProxierOpts {
            hostname: node_name.to_string(),
            render,
        },
    )
    .with_conntrack(Box::new(hako_proxier::conntrack::NetlinkConntrack));
    Ok(Some(proxier))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &str, ip: &str, ready: bool, extra: &str) -> Pod {
        serde_yaml::from_str(&format!(
            r#"
metadata: {{name: {name}, namespace: default, uid: uid-{name}, labels: {labels} {extra}}}
spec:
  nodeName: node-a
  containers:
  - name: web
    image: busybox
    ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]
status:
  phase: Running
  podIP: "{ip}"
  podIPs: [{{ip: "{ip}"}}]
  conditions: [{{type: Ready, status: "{}"}}]
"#,
            if ready { "True" } else { "False" }
        ))
        .unwrap()
    }

    fn svc(y: &str) -> Service {
        serde_yaml::from_str(y).unwrap()
    }

    const SVC: &str = "metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9090}]}";

    #[test]
    fn slices_from_matching_pods() {
        let pods = vec![
            pod("a", "{app: web}", "10.244.0.2", true, ""),
            pod("b", "{app: web}", "10.244.0.3", false, ""),
            pod("c", "{app: other}", "10.244.0.4", true, ""),
            pod("d", "{app: web}", "", true, ""),
            pod(
                "e",
                "{app: web}",
                "10.244.0.6",
                true,
                ", deletionTimestamp: \"2026-01-01T00:00:00Z\"",
            ),
        ];
        let s = build_slices(&[svc(SVC)], &pods);
        assert_eq!(s.len(), 1);
        let sl = &s[0];
        assert_eq!(sl.address_type, "IPv4");
        assert!(sl.metadata.name.as_ref().unwrap().starts_with("web-"));
        assert_eq!(
            sl.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        let ports: Vec<(String, i32)> = sl
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect();
        assert_eq!(
            ports,
            [("http".to_string(), 8080), ("metrics".to_string(), 9090)]
        );
        let eps: Vec<(String, bool, bool, bool)> = sl
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (
                    e.addresses[0].clone(),
                    c.ready.unwrap(),
                    c.serving.unwrap(),
                    c.terminating.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            eps,
            [
                ("10.244.0.2".to_string(), true, true, false),
                ("10.244.0.3".to_string(), false, false, false),
                ("10.244.0.6".to_string(), false, true, true),
            ]
        );
        assert_eq!(sl.endpoints[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(
            sl.endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("a")
        );
        // Deterministic.
        assert_eq!(build_slices(&[svc(SVC)], &pods), s);
    }

    #[test]
    fn unresolvable_names_protocols_and_selectorless() {
        let pods = vec![pod("a", "{app: web}", "10.244.0.2", true, "")];
        // Named port with the wrong protocol does not resolve: only the numeric port stays.
        let s = build_slices(
            &[svc("metadata: {name: w}\nspec: {selector: {app: web}, ports: [{name: x, port: 53, protocol: TCP, targetPort: dns}, {name: y, port: 1, targetPort: 2}]}")],
            &pods,
        );
        assert_eq!(s[0].ports.as_ref().unwrap().len(), 1);
        assert_eq!(s[0].ports.as_ref().unwrap()[0].port, Some(2));
        let s = build_slices(
            &[svc("metadata: {name: w}\nspec: {selector: {app: web}, ports: [{name: x, port: 53, protocol: UDP, targetPort: dns}]}")],
            &pods,
        );
        assert_eq!(s[0].ports.as_ref().unwrap()[0].port, Some(5353));
        assert!(build_slices(
            &[svc("metadata: {name: w}\nspec: {ports: [{port: 80}]}")],
            &pods
        )
        .is_empty());
        // publishNotReadyAddresses.
        let pods = vec![pod("b", "{app: web}", "10.244.0.3", false, "")];
        let s = build_slices(&[svc("metadata: {name: w}\nspec: {selector: {app: web}, publishNotReadyAddresses: true, ports: [{port: 80}]}")], &pods);
        assert_eq!(
            s[0].endpoints[0].conditions.as_ref().unwrap().ready,
            Some(true)
        );
        // Terminal pods leave.
        let mut p = pod("c", "{app: web}", "10.244.0.4", false, "");
        p.status.as_mut().unwrap().phase = Some("Failed".into());
        assert!(build_slices(&[svc(SVC)], &[p]).is_empty());
    }

    #[test]
    fn runner_syncs_only_on_change() {
        let (proxier, state) = fake_proxier();
        let mut r = ServiceRunner::new(proxier);
        let mut pods = vec![pod("a", "{app: web}", "10.244.0.2", true, "")];
        assert!(r.update(vec![svc(SVC)], &pods).unwrap().synced);
        let n = state.lock().unwrap().restores.len();
        assert!(last_restore(&state).contains("10.244.0.2:8080"));
        assert!(!r.update(vec![svc(SVC)], &pods).unwrap().synced);
        assert_eq!(state.lock().unwrap().restores.len(), n);
        // Readiness flips: the endpoint leaves the rules.
        pods[0] = unready(&pods[0]);
        assert!(r.update(vec![svc(SVC)], &pods).unwrap().synced);
        assert!(!last_restore(&state).contains("10.244.0.2:8080"));
        // A failed sync is retried by the next update, with nothing new.
        let pods = vec![pod("b", "{app: web}", "10.244.0.3", true, "")];
        state.lock().unwrap().fail_next = true;
        assert!(r.update(vec![svc(SVC)], &pods).is_err());
        assert!(!last_restore(&state).contains("10.244.0.3:8080"));
        assert!(r.update(vec![svc(SVC)], &pods).unwrap().synced);
        assert!(last_restore(&state).contains("10.244.0.3:8080"));
        assert!(!r.update(vec![svc(SVC)], &pods).unwrap().synced);
    }

    /// The pod with its Ready condition False.
    fn unready(p: &Pod) -> Pod {
        let mut p = p.clone();
        if let Some(c) = p.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            c[0].status = "False".into();
        }
        p
    }

    /// Writes the pod's status record under `root`, as a pod worker does.
    fn record(root: &Path, p: &Pod) {
        crate::sys::state::write_record(root, &crate::model::record::PodRecord::new(p.clone()))
            .unwrap();
    }

    /// The last restore payload the fake iptables received ("" before any).
    fn last_restore(state: &Mutex<hako_proxier::iptables::FakeState>) -> String {
        state
            .lock()
            .unwrap()
            .restores
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// A manifest dir with the web Service, and a root whose records hold `pods`.
    fn poll_env(pods: &[Pod]) -> (tempfile::TempDir, PollerOptions) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("svc.yaml"),
            format!("apiVersion: v1\nkind: Service\n{SVC}\n"),
        )
        .unwrap();
        let root = tmp.path().join("root");
        for p in pods {
            crate::sys::state::write_record(
                &root,
                &crate::model::record::PodRecord::new(p.clone()),
            )
            .unwrap();
        }
        let opts = PollerOptions {
            manifest_dir: dir,
            static_pods: StaticPodOptions::default(),
            root,
            period: Duration::from_millis(20),
        };
        (tmp, opts)
    }

    fn fake_proxier() -> (Proxier, Arc<Mutex<hako_proxier::iptables::FakeState>>) {
        let fake = hako_proxier::FakeIptables::default();
        let state = fake.state.clone();
        let backend = hako_proxier::IptablesBackend::new(fake, Default::default());
        (Proxier::new(Box::new(backend), Default::default()), state)
    }

    #[test]
    fn poll_feeds_changes_only_and_closes_on_stop() {
        let ready = pod("a", "{app: web}", "10.244.0.2", true, "");
        let (_tmp, opts) = poll_env(std::slice::from_ref(&ready));
        let (mut proxier, _) = fake_proxier();
        let metrics = Arc::new(AgentMetrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let root = opts.root.clone();
        let mut poll = Poll {
            opts,
            metrics: metrics.clone(),
            stop: stop.clone(),
            fed: Fed::default(),
            counts: Arc::new(Mutex::new(Feed {
                changed: false,
                services: 0,
                slices: 0,
            })),
        };
        assert!(!poll.ready(), "nothing fed yet");
        let now = Instant::now;
        assert_eq!(poll.wait(now(), &mut proxier), Ok(Wake::Changed));
        assert!(poll.ready());
        assert_eq!(
            *poll.counts.lock().unwrap(),
            Feed {
                changed: true,
                services: 1,
                slices: 1
            }
        );
        assert_eq!(poll.wait(now(), &mut proxier), Ok(Wake::Idle));
        // A readiness flip recorded by the pod worker is a change.
        record(&root, &unready(&ready));
        assert_eq!(poll.wait(now(), &mut proxier), Ok(Wake::Changed));
        assert_eq!(poll.wait(now(), &mut proxier), Ok(Wake::Idle));
        assert!(
            metrics.render().contains("kubelet_running_pods"),
            "pod gauges refreshed"
        );
        stop.store(true, Ordering::Relaxed);
        let far = now() + Duration::from_secs(3600);
        assert_eq!(
            poll.wait(far, &mut proxier),
            Ok(Wake::Closed { changed: false })
        );
    }

    #[test]
    fn the_loop_programs_the_pods_and_a_readiness_flip_then_stops() {
        let ready = pod("a", "{app: web}", "10.244.0.2", true, "");
        let (_tmp, opts) = poll_env(std::slice::from_ref(&ready));
        let root = opts.root.clone();
        let (proxier, state) = fake_proxier();
        let metrics = Arc::new(AgentMetrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let t = spawn_poller(
            Some(ServiceRunner::new(proxier)),
            opts,
            metrics.clone(),
            stop.clone(),
        )
        .unwrap();
        let last = || last_restore(&state);
        let errors = |m: &AgentMetrics| m.proxy_sync_errors.load(Ordering::Relaxed);
        let until = |what: &str, f: &dyn Fn() -> bool| {
            let end = Instant::now() + Duration::from_secs(20);
            while !f() {
                assert!(Instant::now() < end, "{what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        until("the ready pod programmed", &|| {
            last().contains("10.244.0.2:8080")
        });
        // The flip's first sync fails; the next period retries it.
        state.lock().unwrap().fail_next = true;
        record(&root, &unready(&ready));
        until("the unready pod gone from the rules", &|| {
            !last().contains("10.244.0.2:8080")
        });
        // Nothing changes any more: no further syncs.
        let n = state.lock().unwrap().restores.len();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            state.lock().unwrap().restores.len(),
            n,
            "synced without a change"
        );
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        // Two syncs and the failure, in the agent's metrics.
        assert_eq!(errors(&metrics), 1);
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"),
            "{text}"
        );
    }
}
