//! The agent's health and metrics server (the kubelet's 127.0.0.1:10248): `GET /healthz` is
//! `ok` (200) while the sync loop is alive — it called [`AgentMetrics::heartbeat`] within the
//! staleness window — and 503 otherwise; `GET /metrics` is the Prometheus text exposition of
//! [`AgentMetrics`]. HTTP/1.1 through hyper on a thread and runtime of its own, one task per
//! connection with deadlines (an idle client no longer holds up everyone else); the Prometheus
//! text is written here (see [`AgentMetrics::render`]).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::StatusCode;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Default address, like the kubelet's healthz port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:10248";

/// Histogram buckets (seconds) for sync durations.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The kubelet's buckets of `kubelet_pod_start_duration_seconds`.
const POD_START_BUCKETS: [f64; 25] = [
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0,
    300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    buckets: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::with_buckets(&BUCKETS)
    }
}

impl Histogram {
    fn with_buckets(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            counts: vec![0; buckets.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, o: &mut String, name: &str, help: &str) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(o, name, "");
    }

    /// The sample lines of one series; `labels` (`k="v"`, may be empty) go before `le`.
    fn render_series(&self, o: &mut String, name: &str, labels: &str) {
        let (pre, only) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        for (i, b) in self.buckets.iter().enumerate() {
            let _ = writeln!(o, "{name}_bucket{{{pre}le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(o, "{name}_bucket{{{pre}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(o, "{name}_sum{only} {}", self.sum);
        let _ = writeln!(o, "{name}_count{only} {}", self.count);
    }
}

/// The `phase` label values of `hako_agent_pod_start_phase_seconds`, in the order a pod goes
/// through them: the wait for one of the sandbox creation slots (`sandbox_slot`, 2 per CPU),
/// the wait for a blocking-pool thread (`blocking_queue`), the sandbox
/// namespaces (`sandbox_netns`, loopback up included), CNI ADD (`cni_add`), the pod files
/// (`sandbox_files`: hosts, resolv.conf, hostname, sandbox record), volume setup (`volumes`),
/// image resolution (`image`), the container spec (`spec`), `shim_create` and `shim_start`,
/// and each status record write (`status_write`).
pub const START_PHASES: [&str; 11] = [
    "sandbox_slot",
    "blocking_queue",
    "sandbox_netns",
    "cni_add",
    "sandbox_files",
    "volumes",
    "image",
    "spec",
    "shim_create",
    "shim_start",
    "status_write",
];

/// Agent metrics, shared (`Arc`) between the pod workers, the service loop and the server.
#[derive(Debug)]
pub struct AgentMetrics {
    started: Instant,
    last_heartbeat_ms: AtomicU64,
    /// Pods whose phase is Running.
    pub pods_running: AtomicU64,
    /// Containers currently running.
    pub containers_running: AtomicU64,
    /// Containers started (including restarts).
    pub containers_started: AtomicU64,
    /// CNI ADD/DEL/CHECK failures.
    pub cni_errors: AtomicU64,
    /// hako-shim (runtime) failures.
    pub shim_errors: AtomicU64,
    /// Image pull failures.
    pub image_pull_errors: AtomicU64,
    /// Service rule sync failures.
    pub proxy_sync_errors: AtomicU64,
    /// Sum of the containers' restart counts (from the pod records).
    pub container_restarts: AtomicU64,
    pod_sync: Mutex<Histogram>,
    proxy_sync: Mutex<Histogram>,
    pod_start: Mutex<Histogram>,
    /// Pod start phases by name ([`START_PHASES`]).
    start_phases: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Containers started, by type (`container`, `init_container`).
    started_by_type: Mutex<BTreeMap<&'static str, u64>>,
    /// Container restarts (starts of an attempt after the first).
    restarts_total: AtomicU64,
    /// Probe runs by (type, result).
    probes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Image pulls by result (`pulled`, `present`, `failed`).
    image_pulls: Mutex<BTreeMap<&'static str, u64>>,
    /// Pod sync errors by reason (the event reason).
    sync_errors: Mutex<BTreeMap<String, u64>>,
    /// The pod workers report their pods here (set once a worker reported).
    workers_attached: AtomicBool,
    live: Mutex<BTreeMap<String, PodGauge>>,
}

/// What one pod worker reports for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodGauge {
    /// The pod has a ready sandbox (the kubelet's "running pod").
    pub sandbox_running: bool,
    /// Containers by state: created, running, exited, unknown.
    pub containers: [u64; 4],
    /// Sum of the containers' restart counts.
    pub restarts: u64,
}

/// The `container_state` label values of [`PodGauge::containers`], in order.
pub const CONTAINER_STATES: [&str; 4] = ["created", "running", "exited", "unknown"];

/// A probe kind label (`Liveness`, `Readiness`, `Startup`) and result label (`successful`,
/// `failed`, `unknown`), as the kubelet's `prober_probe_total`.
pub type ProbeLabels = (&'static str, &'static str);

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_heartbeat_ms: AtomicU64::new(u64::MAX),
            pods_running: AtomicU64::new(0),
            containers_running: AtomicU64::new(0),
            containers_started: AtomicU64::new(0),
            cni_errors: AtomicU64::new(0),
            shim_errors: AtomicU64::new(0),
            image_pull_errors: AtomicU64::new(0),
            proxy_sync_errors: AtomicU64::new(0),
            container_restarts: AtomicU64::new(0),
            pod_sync: Mutex::default(),
            proxy_sync: Mutex::default(),
            pod_start: Mutex::new(Histogram::with_buckets(&POD_START_BUCKETS)),
            start_phases: Mutex::default(),
            started_by_type: Mutex::default(),
            restarts_total: AtomicU64::new(0),
            probes: Mutex::default(),
            image_pulls: Mutex::default(),
            sync_errors: Mutex::default(),
            workers_attached: AtomicBool::new(false),
            live: Mutex::default(),
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl AgentMetrics {
    /// A new set, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The process's set: what [`start_node_services`] serves and what the pod workers feed
    /// by default.
    pub fn shared() -> Arc<Self> {
        static SHARED: std::sync::OnceLock<Arc<AgentMetrics>> = std::sync::OnceLock::new();
        SHARED.get_or_init(Self::new).clone()
    }

    /// The sync loop is alive (call once per loop iteration).
    pub fn heartbeat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last heartbeat (None before the first).
    pub fn since_heartbeat(&self) -> Option<Duration> {
        let last = self.last_heartbeat_ms.load(Ordering::Relaxed);
        (last != u64::MAX).then(|| {
            self.started
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
        })
    }

    /// Healthy when the loop beat within `max_age`.
    pub fn healthy(&self, max_age: Duration) -> bool {
        self.since_heartbeat().is_some_and(|d| d <= max_age)
    }

    /// One pod sync (worker iteration) took `d`.
    pub fn observe_pod_sync(&self, d: Duration) {
        if let Ok(mut h) = self.pod_sync.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// One service rules sync took `d`.
    pub fn observe_proxy_sync(&self, d: Duration) {
        if let Ok(mut h) = self.proxy_sync.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// A pod went from first seen to all containers running in `d` (the kubelet's pod start SLI).
    pub fn observe_pod_start(&self, d: Duration) {
        if let Ok(mut h) = self.pod_start.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// One pod start phase (one of [`START_PHASES`]) took `d`.
    pub fn observe_start_phase(&self, phase: &'static str, d: Duration) {
        if let Ok(mut m) = self.start_phases.lock() {
            m.entry(phase).or_default().observe(d.as_secs_f64());
        }
    }

    /// A container was started.
    pub fn container_started(&self) {
        inc(&self.containers_started);
    }

    /// A container of the given type (`container` or `init_container`) was started;
    /// `restart`: it is not the container's first attempt.
    pub fn container_started_as(&self, container_type: &'static str, restart: bool) {
        inc(&self.containers_started);
        if restart {
            inc(&self.restarts_total);
        }
        if let Ok(mut m) = self.started_by_type.lock() {
            *m.entry(container_type).or_default() += 1;
        }
    }

    /// One probe ran: `kind` `Liveness`/`Readiness`/`Startup`, `result`
    /// `successful`/`failed`/`unknown`.
    pub fn probe_result(&self, kind: &'static str, result: &'static str) {
        if let Ok(mut m) = self.probes.lock() {
            *m.entry((kind, result)).or_default() += 1;
        }
    }

    /// An image was made available: `result` `pulled`, `present` or `failed` (failures also
    /// count in the image pull errors).
    pub fn image_pull(&self, result: &'static str) {
        if result == "failed" {
            inc(&self.image_pull_errors);
        }
        if let Ok(mut m) = self.image_pulls.lock() {
            *m.entry(result).or_default() += 1;
        }
    }

    /// A pod sync step failed; `reason` is the event reason (`FailedCreatePodSandBox`,
    /// `FailedMount`, `CreateContainerError`, ...).
    pub fn sync_error(&self, reason: &str) {
        if let Ok(mut m) = self.sync_errors.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// A pod worker's current view of its pod (replaces the previous one). From the first
    /// call on, the pod gauges come from the workers rather than from [`Self::observe_pods`].
    pub fn set_pod(&self, uid: &str, g: PodGauge) {
        self.workers_attached.store(true, Ordering::Relaxed);
        if let Ok(mut m) = self.live.lock() {
            m.insert(uid.to_string(), g);
        }
    }

    /// The pod is gone from the node.
    pub fn remove_pod(&self, uid: &str) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(uid);
        }
    }
    /// A CNI operation failed.
    pub fn cni_error(&self) {
        inc(&self.cni_errors);
    }
    /// A runtime (shim) operation failed.
    pub fn shim_error(&self) {
        inc(&self.shim_errors);
    }
    /// An image pull failed.
    pub fn image_pull_error(&self) {
        inc(&self.image_pull_errors);
    }
    /// A service rules sync failed.
    pub fn proxy_sync_error(&self) {
        inc(&self.proxy_sync_errors);
    }

    /// Refreshes the pod gauges from the pods' recorded status: pods in phase Running,
    /// containers (init and sidecar included) in state running, and the restart count sum.
    pub fn observe_pods(&self, pods: &[k8s_openapi::api::core::v1::Pod]) {
        let mut running = 0u64;
        let mut containers = 0u64;
        let mut restarts = 0u64;
        for p in pods {
            let Some(st) = p.status.as_ref() else {
                continue;
            };
            if st.phase.as_deref() == Some("Running") {
                running += 1;
            }
            for c in st
                .container_statuses
                .iter()
                .flatten()
                .chain(st.init_container_statuses.iter().flatten())
            {
                if c.state.as_ref().is_some_and(|s| s.running.is_some()) {
                    containers += 1;
                }
                restarts += u64::try_from(c.restart_count).unwrap_or(0);
            }
        }
        self.pods_running.store(running, Ordering::Relaxed);
        self.containers_running.store(containers, Ordering::Relaxed);
        self.container_restarts.store(restarts, Ordering::Relaxed);
    }

    /// Prometheus text exposition (names follow the kubelet's where one exists).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let attached = self.workers_attached.load(Ordering::Relaxed);
        let live: Vec<PodGauge> = self
            .live
            .lock()
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        let (pods, by_state, restarts) = if attached {
            let mut by_state = [0u64; 4];
            for p in &live {
                for (i, n) in p.containers.iter().enumerate() {
                    by_state[i] += n;
                }
            }
            (
                live.iter().filter(|p| p.sandbox_running).count() as u64,
                by_state,
                live.iter().map(|p| p.restarts).sum(),
            )
        } else {
            (
                ld(&self.pods_running),
                [0, ld(&self.containers_running), 0, 0],
                ld(&self.container_restarts),
            )
        };
        g(
            &mut o,
            "kubelet_running_pods",
            "gauge",
            "Number of pods that have a running pod sandbox",
            pods,
        );
        let _ = writeln!(
            o,
            "# HELP kubelet_running_containers Number of containers currently running\n# TYPE kubelet_running_containers gauge"
        );
        for (i, st) in CONTAINER_STATES.iter().enumerate() {
            let _ = writeln!(
                o,
                "kubelet_running_containers{{container_state=\"{st}\"}} {}",
                by_state[i]
            );
        }
        g(
            &mut o,
            "hako_agent_container_restarts",
            "gauge",
            "Sum of the restart counts of the containers on the node",
            restarts,
        );
        g(
            &mut o,
            "hako_agent_container_restarts_total",
            "counter",
            "Container restarts performed by this agent",
            ld(&self.restarts_total),
        );
        let labelled = |o: &mut String, name: &str, help: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in rows {
                let _ = writeln!(o, "{name}{{{labels}}} {v}");
            }
        };
        labelled(
            &mut o,
            "kubelet_started_containers_total",
            "Cumulative number of containers started",
            self.started_by_type
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(t, v)| (format!("container_type=\"{t}\""), *v))
                        .collect()
                })
                .unwrap_or_default(),
        );
        labelled(
            &mut o,
            "prober_probe_total",
            "Cumulative number of liveness, readiness or startup probe runs",
            self.probes
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|((k, r), v)| (format!("probe_type=\"{k}\",result=\"{r}\""), *v))
                        .collect()
                })
                .unwrap_or_default(),
        );
        labelled(
            &mut o,
            "hako_agent_image_pulls_total",
            "Images made available for containers, by result (pulled, present, failed)",
            self.image_pulls
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(r, v)| (format!("result=\"{r}\""), *v))
                        .collect()
                })
                .unwrap_or_default(),
        );
        labelled(
            &mut o,
            "hako_agent_pod_sync_errors_total",
            "Failed pod sync steps, by event reason",
            self.sync_errors
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(r, v)| {
                            (
                                format!("reason=\"{}\"", r.replace(['"', '\\', '\n'], "_")),
                                *v,
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        );
        g(
            &mut o,
            "hako_agent_containers_started_total",
            "counter",
            "Containers started, restarts included",
            ld(&self.containers_started),
        );
        g(
            &mut o,
            "hako_agent_cni_errors_total",
            "counter",
            "Failed CNI operations",
            ld(&self.cni_errors),
        );
        g(
            &mut o,
            "hako_agent_runtime_errors_total",
            "counter",
            "Failed container runtime (hako-shim) operations",
            ld(&self.shim_errors),
        );
        g(
            &mut o,
            "hako_agent_image_pull_errors_total",
            "counter",
            "Failed image pulls",
            ld(&self.image_pull_errors),
        );
        g(
            &mut o,
            "hako_agent_proxy_sync_errors_total",
            "counter",
            "Failed service rule syncs",
            ld(&self.proxy_sync_errors),
        );
        let hb = self.since_heartbeat().map_or(-1.0, |d| d.as_secs_f64());
        let _ = writeln!(o, "# HELP hako_agent_sync_loop_last_heartbeat_age_seconds Seconds since the sync loop last ran (-1: never)\n# TYPE hako_agent_sync_loop_last_heartbeat_age_seconds gauge\nhako_agent_sync_loop_last_heartbeat_age_seconds {hb}");
        if let Ok(h) = self.pod_sync.lock() {
            h.render(
                &mut o,
                "kubelet_pod_worker_duration_seconds",
                "Duration in seconds to sync a single pod",
            );
        }
        if let Ok(h) = self.pod_start.lock() {
            h.render(
                &mut o,
                "kubelet_pod_start_duration_seconds",
                "Duration in seconds from the agent seeing a pod to all its containers running",
            );
        }
        if let Ok(m) = self.start_phases.lock() {
            let name = "hako_agent_pod_start_phase_seconds";
            let _ = writeln!(
                o,
                "# HELP {name} Duration in seconds of each phase of starting a pod\n# TYPE {name} histogram"
            );
            for phase in START_PHASES {
                if let Some(h) = m.get(phase) {
                    h.render_series(&mut o, name, &format!("phase=\"{phase}\""));
                }
            }
        }
        if let Ok(h) = self.proxy_sync.lock() {
            h.render(
                &mut o,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "Service rules sync latency in seconds",
            );
        }
        o
    }
}

/// Beats [`AgentMetrics::heartbeat`] every second for as long as the runtime that drives it
/// is responsive: spawned on the agent's single-threaded runtime, it stops beating when the
/// sync loop blocks or dies.
pub async fn heartbeat(metrics: Arc<AgentMetrics>) {
    loop {
        metrics.heartbeat();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What the standalone agent runs beside its pod workers.
pub struct NodeServicesOptions {
    /// healthz/metrics address (None: no server).
    pub healthz_addr: Option<SocketAddr>,
    /// Service dataplane.
    pub proxy_mode: crate::proxy::standalone::ProxyMode,
    /// iptables flavour ("", "nft", "legacy").
    pub iptables_variant: String,
    /// Pod CIDR (traffic from outside it to a ClusterIP is masqueraded).
    pub cluster_cidr: Option<String>,
    /// Services source, records and period.
    pub poller: crate::proxy::standalone::PollerOptions,
}

/// The healthz/metrics server and the Service loop; both stop when this is dropped.
pub struct NodeServices {
    /// Shared metrics (pass to [`heartbeat`] and the workers).
    pub metrics: Arc<AgentMetrics>,
    server: Option<Server>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl NodeServices {
    /// The server's bound address.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(Server::addr)
    }
}

impl Drop for NodeServices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.poller.take() {
            let _ = t.join();
        }
        self.server.take();
    }
}

/// Why the node services could not start. The texts are those the agent printed before the
/// error became typed; the healthz bind error is part of the message (not a `source`), as it was.
#[derive(Debug, thiserror::Error)]
pub enum NodeServicesError {
    /// The healthz/metrics listener could not be bound.
    #[error("healthz server on {addr}: {error}")]
    Healthz {
        /// The address asked for.
        addr: SocketAddr,
        /// The bind (or listener setup) error.
        error: std::io::Error,
    },
    /// The Service proxier for the chosen mode could not be set up (its own error, unchanged).
    #[error(transparent)]
    Proxier(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The Service loop's thread could not be spawned.
    #[error(transparent)]
    Poller(std::io::Error),
}

/// Starts the healthz/metrics server (healthy while [`heartbeat`] beats within 10 s) and the
/// Service loop ([`crate::proxy::standalone::spawn_poller`]).
pub fn start_node_services(opts: NodeServicesOptions) -> Result<NodeServices, NodeServicesError> {
    let metrics = AgentMetrics::shared();
    let server = match opts.healthz_addr {
        Some(a) => Some(
            start(a, metrics.clone(), Duration::from_secs(10))
                .map_err(|error| NodeServicesError::Healthz { addr: a, error })?,
        ),
        None => None,
    };
    let runner = crate::proxy::standalone::runner_for_mode(
        opts.proxy_mode,
        &opts.poller.static_pods.node_name,
        &opts.iptables_variant,
        opts.cluster_cidr.clone(),
    )
    .map_err(|e| NodeServicesError::Proxier(e.into()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let poller =
        crate::proxy::standalone::spawn_poller(runner, opts.poller, metrics.clone(), stop.clone())
            .map_err(NodeServicesError::Poller)?;
    Ok(NodeServices {
        metrics,
        server,
        stop,
        poller: Some(poller),
    })
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stops the accept loop; the runtime goes with its thread, closing every connection.
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The response for one request path: (status, content type, body).
pub fn respond(
    metrics: &AgentMetrics,
    max_age: Duration,
    method: &str,
    path: &str,
) -> (u16, &'static str, String) {
    let path = path.split('?').next().unwrap_or("/");
    if method != "GET" && method != "HEAD" {
        return (
            405,
            "text/plain; charset=utf-8",
            "method not allowed\n".into(),
        );
    }
    match path {
        "/healthz" => {
            if metrics.healthy(max_age) {
                (200, "text/plain; charset=utf-8", "ok".into())
            } else {
                let age = metrics
                    .since_heartbeat()
                    .map_or("never ran".to_string(), |d| {
                        format!("last ran {:.1}s ago", d.as_secs_f64())
                    });
                (
                    503,
                    "text/plain; charset=utf-8",
                    format!("sync loop is not running: {age}\n"),
                )
            }
        }
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            404,
            "text/plain; charset=utf-8",
            "404 page not found\n".into(),
        ),
    }
}

/// Connections served at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 64;
/// Deadline for a request head (an idle or slow client is dropped after it).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for a whole connection (one request and its answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `/healthz` and `/metrics` on a thread of its own (with its own
/// small tokio runtime, so a blocked sync loop cannot delay the answer that it is blocked)
/// until the [`Server`] is dropped. `max_age`: the healthz staleness window for the sync
/// loop heartbeat. HTTP/1.1 through hyper, one task per connection: an idle or slow client
/// holds only its own connection, for at most [`HEADER_READ_TIMEOUT`].
pub fn start(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    max_age: Duration,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("healthz".into())
        .spawn(move || rt.block_on(serve(listener, metrics, max_age, stopped)))?;
    Ok(Server {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The accept loop; returns (dropping the listener and, with the runtime, every
/// connection) when `stopped` fires or its sender is dropped.
async fn serve(
    listener: TcpListener,
    metrics: Arc<AgentMetrics>,
    max_age: Duration,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "healthz listener");
            return;
        }
    };
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let tcp = tokio::select! {
            _ = &mut stopped => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    debug!(error = %e, "healthz accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            debug!("healthz: connection limit reached, closing a new connection");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let r = answer(&metrics, max_age, req.method().as_str(), req.uri());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .title_case_headers(true)
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            if let Err(e) = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                debug!(error = %e, "healthz connection timed out");
            }
        });
    }
}

/// The HTTP answer to one request ([`respond`]'s status, type and body; no body for HEAD;
/// the connection closes after it, as clients of this port expect).
fn answer(
    metrics: &AgentMetrics,
    max_age: Duration,
    method: &str,
    uri: &hyper::Uri,
) -> hyper::Response<Full<Bytes>> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let (code, ctype, body) = respond(metrics, max_age, method, path);
    debug!(method, path, code, "healthz request");
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn start_phases_render_as_labelled_series() {
        let m = AgentMetrics::new();
        m.observe_start_phase("cni_add", Duration::from_millis(7));
        m.observe_start_phase("cni_add", Duration::from_millis(30));
        m.observe_start_phase("shim_create", Duration::from_millis(2));
        let o = m.render();
        let n = "hako_agent_pod_start_phase_seconds";
        assert_eq!(
            o.matches(&format!("# TYPE {n} histogram")).count(),
            1,
            "{o}"
        );
        assert!(
            o.contains(&format!("{n}_bucket{{phase=\"cni_add\",le=\"0.01\"}} 1\n")),
            "{o}"
        );
        assert!(
            o.contains(&format!("{n}_bucket{{phase=\"cni_add\",le=\"+Inf\"}} 2\n")),
            "{o}"
        );
        assert!(
            o.contains(&format!("{n}_count{{phase=\"cni_add\"}} 2\n")),
            "{o}"
        );
        assert!(
            o.contains(&format!("{n}_count{{phase=\"shim_create\"}} 1\n")),
            "{o}"
        );
        // Phases never observed have no series.
        assert!(!o.contains("phase=\"volumes\""), "{o}");
        // Unlabelled histograms keep their plain form.
        assert!(
            o.contains("kubelet_pod_start_duration_seconds_count 0\n"),
            "{o}"
        );
    }

    #[test]
    fn healthz_follows_heartbeat_and_metrics_render() {
        let m = AgentMetrics::new();
        let srv = start(
            "127.0.0.1:0".parse().unwrap(),
            m.clone(),
            Duration::from_millis(300),
        )
        .unwrap();
        let r = get(srv.addr(), "/healthz");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("never ran"));
        m.heartbeat();
        let r = get(srv.addr(), "/healthz");
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nok"),
            "{r}"
        );
        std::thread::sleep(Duration::from_millis(400));
        assert!(get(srv.addr(), "/healthz").starts_with("HTTP/1.1 503"));
        m.container_started();
        m.container_started();
        m.cni_error();
        m.pods_running.store(3, Ordering::Relaxed);
        m.observe_pod_sync(Duration::from_millis(20));
        let r = get(srv.addr(), "/metrics");
        assert!(r.starts_with("HTTP/1.1 200"));
        assert!(r.contains("\nkubelet_running_pods 3\n"), "{r}");
        assert!(r.contains("\nhako_agent_containers_started_total 2\n"));
        assert!(r.contains("\nhako_agent_cni_errors_total 1\n"));
        assert!(r.contains("kubelet_pod_worker_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(r.contains("kubelet_pod_worker_duration_seconds_bucket{le=\"0.01\"} 0\n"));
        assert!(r.contains("kubelet_pod_worker_duration_seconds_count 1\n"));
        assert!(get(srv.addr(), "/nope").starts_with("HTTP/1.1 404"));
        let addr = srv.addr();
        drop(srv);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "server stopped on drop"
        );
    }

    #[test]
    fn an_idle_client_does_not_stall_healthz() {
        let m = AgentMetrics::new();
        m.heartbeat();
        let srv = start("127.0.0.1:0".parse().unwrap(), m, Duration::from_secs(60)).unwrap();
        // Connects and sends nothing (a port scan, a stuck probe, a slowloris).
        let idle = std::net::TcpStream::connect(srv.addr()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let r = s.read_to_string(&mut out);
        assert!(
            r.is_ok() && out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
            "{r:?} {out:?}"
        );
        drop(idle);
    }

    #[test]
    fn methods() {
        let m = AgentMetrics::default();
        assert_eq!(
            respond(&m, Duration::from_secs(1), "POST", "/healthz").0,
            405
        );
        assert_eq!(
            respond(&m, Duration::from_secs(1), "GET", "/metrics?x=1").0,
            200
        );
    }

    /// The bind failure reads as it did when it was an `anyhow!` message, and (as then) it
    /// carries no separate cause, so `main` prints no extra "Caused by" line.
    #[test]
    fn node_services_error_text_is_unchanged() {
        use std::error::Error as _;
        let addr: SocketAddr = "127.0.0.1:10248".parse().unwrap();
        let error = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let want = format!("healthz server on 127.0.0.1:10248: {error}");
        let e = NodeServicesError::Healthz { addr, error };
        assert_eq!(e.to_string(), want);
        assert!(e.source().is_none());
        let inner = std::io::Error::other("iptables-restore not found");
        let e = NodeServicesError::Proxier(Box::new(inner));
        assert_eq!(e.to_string(), "iptables-restore not found");
    }
}
