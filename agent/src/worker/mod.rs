//! Pod workers and the pod manager (effectful): one tokio task per pod drives
//! [`compute_actions`] through the real effects — the pod sandbox (namespaces + CNI), images
//! (`hako_shim::image::ImageStore`), containers (`hako-shim`), probes and lifecycle hooks —
//! and writes the pod's status and events to `<root>/pods/<uid>/status.json`.
//!
//! # The seam for pod sources
//!
//! Any source (the manifest directory, the kube-apiserver) feeds the same [`PodManager`]:
//!
//! ```ignore
//! let mgr = PodManager::new(config);                 // inside a tokio runtime
//! let mut rx = mgr.subscribe();                      // status changes: PodStatusEvent
//! mgr.sync(DesiredState { pods, config_maps, secrets }); // level-triggered, whole set
//! while let Ok(ev) = rx.recv().await { /* report ev.status for ev.uid */ }
//! ```
//!
//! - [`PodManager::sync`] takes the complete desired set. A pod is keyed by its UID: a new UID
//!   starts a worker (which first re-adopts whatever containers and sandbox the node already
//!   has for that UID), a known UID gets the new object (a `deletionTimestamp` makes the
//!   worker terminate the pod gracefully and then report `terminated`), and a UID that is no
//!   longer in the set is terminated gracefully and forgotten. ConfigMaps and Secrets are the
//!   objects env and volumes may reference. The first `sync` also removes pods the node still
//!   has on disk but that are not desired (orphans of a previous run).
//! - [`PodManager::subscribe`] yields a [`PodStatusEvent`] each time a pod's status or events
//!   change, and once with `terminated = true` when a pod was stopped and removed.
//! - [`PodManager::pods`] returns the current pods with status.

use crate::api::healthz::AgentMetrics;
use crate::model::actions::{self, compute_actions, termination_order, Action};
use crate::model::backoff::{self, BackoffConfig, RestartBackoff};
use crate::model::observed::{
    ObservedContainer, ObservedPod, ObservedSandbox, ProbeResult, RuntimeState, StartFailure,
};
use crate::model::probe::{ProbeOutcome, ProbeSpec, ProbeTarget, ProbeType, ProbeWorker, Prober};
use crate::model::record::PodRecord;
use crate::model::{dns, env, qos, status};
use crate::sys::cni::{self, Attachment, CniConfig};
use crate::sys::prober::RealProber;
use crate::sys::runtime::{self, ContainerMeta};
use crate::sys::sandbox::{self, SandboxOwner, SandboxPaths};
use crate::sys::state;
use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::image::{ImageStore, PullPolicy};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, LifecycleHandler, Pod, PodStatus, Probe, Secret,
};
use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Node-level configuration of the workers.
#[derive(Clone)]
pub struct AgentConfig {
    /// State root (`/var/lib/hako`): pod records, images, CNI cache.
    pub root_dir: PathBuf,
    /// Run dir (`/run/hako`): shim state (`containers/`), sandbox namespaces (`sandboxes/`).
    pub run_dir: PathBuf,
    /// Pod log dir (`/var/log/pods`).
    pub pod_log_dir: PathBuf,
    /// The shim runtime.
    pub shim: ShimRuntime,
    /// Image store.
    pub images: Arc<ImageStore>,
    /// CNI.
    pub cni: CniConfig,
    /// cgroup filesystem root (None: /sys/fs/cgroup).
    pub cgroup_root: Option<PathBuf>,
    /// Parent of `kubepods` ("" for the hierarchy root).
    pub cgroup_parent: String,
    /// DNS settings.
    pub dns: dns::DnsSettings,
    /// Node memory capacity (bytes) for the Burstable oom_score_adj.
    pub memory_capacity: i128,
    /// Node IP for status.hostIP.
    pub host_ip: Option<String>,
    /// Restart back-off (also used for image pull back-off).
    pub backoff: BackoffConfig,
    /// How often a worker re-evaluates its pod without any event.
    pub sync_period: Duration,
    /// How often CNI CHECK runs per pod.
    pub cni_check_period: Duration,
    /// Directory of Localhost seccomp profiles (`--seccomp-profile-root`).
    pub seccomp_profile_root: PathBuf,
    /// CRI log rotation size in bytes (`--container-log-max-size`, 10Mi).
    pub container_log_max_size: u64,
    /// CRI log files kept per container, current included (`--container-log-max-files`, 5).
    pub container_log_max_files: u32,
}

/// Desired state from a source.
#[derive(Debug, Clone, Default)]
pub struct DesiredState {
    /// Every pod that should run (UID set).
    pub pods: Vec<Pod>,
    /// ConfigMaps the pods may reference.
    pub config_maps: Vec<ConfigMap>,
    /// Secrets the pods may reference.
    pub secrets: Vec<Secret>,
}

/// A status change of one pod.
#[derive(Debug, Clone)]
pub struct PodStatusEvent {
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The new status.
    pub status: PodStatus,
    /// The pod was stopped and its state removed (last event for this UID).
    pub terminated: bool,
}

type ObjMap<T> = BTreeMap<(String, String), T>;

#[derive(Default)]
struct Objects {
    config_maps: ObjMap<ConfigMap>,
    secrets: ObjMap<Secret>,
    /// ServiceAccount tokens by pod UID (cluster mode, [`PodManager::set_tokens`]).
    tokens: BTreeMap<String, crate::sys::volumes::projection::PodTokens>,
    generation: u64,
}

enum Msg {
    Update(Box<Pod>),
    Delete,
    /// ConfigMaps, Secrets or tokens changed: look at the pod's volumes again.
    Wake,
}

/// A worker as the manager sees it. Messages go only on a change — the pod object differs from
/// the last one sent, the referenced objects' generation moved, the pod left the desired set —
/// so that a worker busy stopping containers does not queue a copy of its pod per sync (with
/// 100 pods being deleted that queued ~10,000 pod copies and the allocator kept the peak).
struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    last: Pod,
    deleting: bool,
    /// Set once the pod is being deleted: the worker's long waits (an image pull) give way.
    deletion: tokio::sync::watch::Sender<bool>,
}

/// Owns the pod workers; the seam between pod sources and the node (see the module docs).
pub struct PodManager {
    cfg: Arc<AgentConfig>,
    objects: Arc<RwLock<Objects>>,
    workers: Mutex<HashMap<String, Handle>>,
    status_tx: broadcast::Sender<PodStatusEvent>,
    pods: Arc<Mutex<BTreeMap<String, Pod>>>,
    first_sync: Mutex<bool>,
    metrics: Arc<AgentMetrics>,
    sandbox_slots: Arc<tokio::sync::Semaphore>,
    /// When sandboxes that belong to no pod were last looked for, and whether a teardown of
    /// such sandboxes is running.
    sandbox_gc: Mutex<Option<std::time::Instant>>,
    sandbox_gc_running: Arc<std::sync::atomic::AtomicBool>,
    /// The objects' generation the workers were last woken for.
    woken_generation: std::sync::atomic::AtomicU64,
}

/// How often sandboxes that belong to no pod are looked for (besides the first sync).
const SANDBOX_GC_PERIOD: Duration = Duration::from_secs(60);

/// The one way a sandbox is torn down, from whatever exists of it: CNI DEL (with the cached
/// result and config, or with the current network list when nothing was cached, as libcni
/// and containerd do), then the namespace mounts, the owner record and the directory. A failed
/// DEL keeps the sandbox — its netns and owner record — so that a later pass can DEL again;
/// nothing is dropped half torn down.
fn teardown(
    cni: &CniConfig,
    paths: &SandboxPaths,
    a: &Attachment,
    host_network: bool,
) -> Result<(), String> {
    if !host_network {
        let mut a = a.clone();
        if !paths.exists() {
            // Gone with a reboot or never mounted: DEL still releases addresses and host links.
            a.netns = PathBuf::new();
        }
        cni.del(&a).map_err(|e| format!("CNI DEL: {e}"))?;
    }
    sandbox::remove(paths).map_err(|e| e.to_string())
}

/// The CNI attachment of a sandbox known only by its directory (and owner record, if any).
fn orphan_attachment(paths: &SandboxPaths, owner: &SandboxOwner) -> Attachment {
    Attachment {
        container_id: paths.id(),
        netns: paths.net(),
        ifname: "eth0".into(),
        pod_namespace: owner.namespace.clone(),
        pod_name: owner.name.clone(),
        pod_uid: owner.uid.clone(),
    }
}

/// Sandbox creations (netns + CNI ADD) that run at once: 2 per CPU. In a burst of new pods the
/// blocking pool serves tasks in order, so without this limit every pod's sandbox is queued
/// ahead of the first pod's container and all pods finish together at the end of the burst;
/// with it, pods whose sandbox is ready start their containers while later sandboxes wait.
fn sandbox_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

impl PodManager {
    /// A manager with no pods, feeding the process's shared metrics
    /// ([`AgentMetrics::shared`], what the healthz/metrics server serves).
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        Self::with_metrics(cfg, AgentMetrics::shared())
    }

    /// A manager with no pods whose workers feed `metrics`.
    pub fn with_metrics(cfg: AgentConfig, metrics: Arc<AgentMetrics>) -> Arc<Self> {
        let (status_tx, _) = broadcast::channel(1024);
        Arc::new(Self {
            cfg: Arc::new(cfg),
            objects: Arc::default(),
            workers: Mutex::new(HashMap::new()),
            status_tx,
            pods: Arc::default(),
            first_sync: Mutex::new(true),
            metrics,
            sandbox_slots: Arc::new(tokio::sync::Semaphore::new(sandbox_slots())),
            sandbox_gc: Mutex::new(None),
            sandbox_gc_running: Arc::default(),
            woken_generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Status changes of every pod.
    pub fn subscribe(&self) -> broadcast::Receiver<PodStatusEvent> {
        self.status_tx.subscribe()
    }

    /// The current pods with their status.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of pods with a live worker (terminating ones included).
    pub fn worker_count(&self) -> usize {
        self.workers.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// Sets the ServiceAccount tokens of the pods (by UID; cluster mode). Projected volumes
    /// of the pods listed here take their serviceAccountToken files from it; a change is
    /// written into the running pods' volumes on their next pass (the next [`PodManager::sync`]
    /// wakes them).
    pub fn set_tokens(&self, tokens: BTreeMap<String, crate::sys::volumes::projection::PodTokens>) {
        if let Ok(mut o) = self.objects.write() {
            if o.tokens != tokens {
                o.tokens = tokens;
                o.generation += 1;
            }
        }
    }

    /// Applies the desired state (level-triggered; see the module docs). Must be called from
    /// within a tokio runtime.
    pub fn sync(self: &Arc<Self>, desired: DesiredState) {
        if let Ok(mut o) = self.objects.write() {
            let cms: ObjMap<ConfigMap> = desired
                .config_maps
                .into_iter()
                .map(|c| (key_of(&c.metadata), c))
                .collect();
            let secrets: ObjMap<Secret> = desired
                .secrets
                .into_iter()
                .map(|s| (key_of(&s.metadata), s))
                .collect();
            if cms != o.config_maps || secrets != o.secrets {
                o.config_maps = cms;
                o.secrets = secrets;
                o.generation += 1;
            }
        }
        let want: BTreeMap<String, Pod> = desired
            .pods
            .into_iter()
            .filter_map(|p| p.metadata.uid.clone().map(|u| (u, p)))
            .collect();
        let first = self
            .first_sync
            .lock()
            .map(|mut f| std::mem::replace(&mut *f, false))
            .unwrap_or(false);
        let mut workers = match self.workers.lock() {
            Ok(w) => w,
            Err(e) => e.into_inner(),
        };
        workers.retain(|_, h| !h.tx.is_closed());
        let generation = self.objects.read().map(|o| o.generation).unwrap_or(0);
        let wake = self
            .woken_generation
            .swap(generation, std::sync::atomic::Ordering::SeqCst)
            != generation;
        for (uid, h) in workers.iter_mut() {
            match want.get(uid) {
                Some(p) if h.last != *p => {
                    if p.metadata.deletion_timestamp.is_some() {
                        h.deletion.send_replace(true);
                    }
                    h.last = p.clone();
                    let _ = h.tx.send(Msg::Update(Box::new(p.clone())));
                }
                Some(_) if wake => {
                    let _ = h.tx.send(Msg::Wake);
                }
                Some(_) => {}
                None if !h.deleting => {
                    h.deleting = true;
                    h.deletion.send_replace(true);
                    let _ = h.tx.send(Msg::Delete);
                }
                None => {}
            }
        }
        let mut orphans: Vec<String> = Vec::new();
        if first {
            if let Ok(rd) = std::fs::read_dir(self.cfg.root_dir.join("pods")) {
                for e in rd.flatten() {
                    let uid = e.file_name().to_string_lossy().to_string();
                    if !want.contains_key(&uid) && !workers.contains_key(&uid) {
                        orphans.push(uid);
                    }
                }
            }
        }
        for (uid, pod) in want {
            if workers.contains_key(&uid) {
                continue;
            }
            let h = self.spawn_worker(pod, false);
            workers.insert(uid, h);
        }
        for uid in orphans {
            // A pod from an earlier run that is no longer wanted: adopt it, then delete it.
            let rec = state::read_record(&self.cfg.root_dir, &uid).ok().flatten();
            let pod = rec.map(|r| r.pod).unwrap_or_else(|| Pod {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    uid: Some(uid.clone()),
                    name: Some(uid.clone()),
                    namespace: Some("default".into()),
                    ..Default::default()
                },
                spec: Some(Default::default()),
                status: None,
            });
            tracing::info!(%uid, "removing orphaned pod from a previous run");
            let h = self.spawn_worker(pod, true);
            workers.insert(uid, h);
        }
        self.gc_sandboxes(first, &workers);
    }

    /// Tears down, in the background, every sandbox under the run dir that belongs to no pod
    /// with a worker: left by a crash before the pod's record named it, or kept by a failed
    /// CNI DEL of a pod that is gone. Runs at the first sync and then at most once a
    /// [`SANDBOX_GC_PERIOD`]; a pod's own stale sandboxes are its worker's to remove.
    fn gc_sandboxes(&self, first: bool, workers: &HashMap<String, Handle>) {
        use std::sync::atomic::Ordering;
        {
            let Ok(mut last) = self.sandbox_gc.lock() else {
                return;
            };
            if !first && last.is_some_and(|t| t.elapsed() < SANDBOX_GC_PERIOD) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if self.sandbox_gc_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let unowned: Vec<(SandboxPaths, SandboxOwner)> = sandbox::list(&self.cfg.run_dir)
            .into_iter()
            .filter_map(|p| {
                let owner = p.owner();
                let id = p.id();
                let owned = workers
                    .keys()
                    .any(|uid| SandboxOwner::owned_by(owner.as_ref(), &id, uid));
                (!owned).then(|| (p, owner.unwrap_or_default()))
            })
            .collect();
        if unowned.is_empty() {
            self.sandbox_gc_running.store(false, Ordering::SeqCst);
            return;
        }
        let cni = self.cfg.cni.clone();
        let running = self.sandbox_gc_running.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            for (paths, owner) in unowned {
                let id = paths.id();
                let a = orphan_attachment(&paths, &owner);
                match teardown(&cni, &paths, &a, owner.host_network) {
                    Ok(()) => tracing::info!(
                        sandbox = %id,
                        pod = %format!("{}/{}", owner.namespace, owner.name),
                        uid = %owner.uid,
                        "removed a sandbox that belongs to no pod"
                    ),
                    Err(e) => {
                        metrics.cni_error();
                        tracing::warn!(sandbox = %id, uid = %owner.uid, "could not remove a sandbox that belongs to no pod (retried later): {e}");
                    }
                }
            }
            running.store(false, Ordering::SeqCst);
        });
    }

    fn spawn_worker(self: &Arc<Self>, pod: Pod, delete: bool) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        if delete {
            let _ = tx.send(Msg::Delete);
        }
        let last = pod.clone();
        let (deletion, deletion_rx) =
            tokio::sync::watch::channel(delete || pod.metadata.deletion_timestamp.is_some());
        let w = Worker::new(self, pod, deletion_rx);
        tokio::spawn(w.run(rx));
        Handle {
            tx,
            last,
            deleting: delete,
            deletion,
        }
    }
}

/// One container instance the worker knows.
#[derive(Debug, Clone)]
struct Inst {
    meta: ContainerMeta,
    state: Option<hako_shim::state::State>,
    message: String,
    message_read: bool,
    watching: bool,
}

struct SandboxInfo {
    /// Something of it may exist on the node (netns, CNI attachment): it must be torn down
    /// before the pod is gone or a new sandbox is made.
    present: bool,
    id: String,
    attempt: u32,
    ready: bool,
    ips: Vec<String>,
    paths: SandboxPaths,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SandboxRecord {
    id: String,
    attempt: u32,
    ips: Vec<String>,
}

struct Worker {
    cfg: Arc<AgentConfig>,
    objects: Arc<RwLock<Objects>>,
    pod: Pod,
    uid: String,
    record: PodRecord,
    dirty: bool,
    sandbox: Option<SandboxInfo>,
    insts: BTreeMap<String, Inst>,
    start_failures: BTreeMap<String, StartFailure>,
    restart_backoff: RestartBackoff,
    image_backoff: RestartBackoff,
    image_failed_at: BTreeMap<String, DateTime<Utc>>,
    probes: HashMap<String, Vec<ProbeWorker>>,
    /// Probes running now (container id, index in its probe list): each runs in a task of its
    /// own, like the kubelet's prober workers, and reports on `probe_tx`; the pod's sync, status
    /// and deletion never wait for a probe.
    probes_in_flight: std::collections::HashSet<(String, usize)>,
    probe_tx: mpsc::UnboundedSender<ProbeDone>,
    probe_rx: Option<mpsc::UnboundedReceiver<ProbeDone>>,
    start_time: Option<DateTime<Utc>>,
    last_cni_check: Option<std::time::Instant>,
    status_tx: broadcast::Sender<PodStatusEvent>,
    pods: Arc<Mutex<BTreeMap<String, Pod>>>,
    exit_tx: mpsc::UnboundedSender<String>,
    exit_rx: Option<mpsc::UnboundedReceiver<String>>,
    deleting: bool,
    clamp_logged: bool,
    volumes: Option<crate::sys::volumes::PodVolumes>,
    volumes_generation: u64,
    resync_now: bool,
    /// When the worker first saw the pod (pod start latency).
    seen_at: std::time::Instant,
    /// The pod start latency was observed (or the pod was already running when adopted).
    start_observed: bool,
    metrics: Arc<AgentMetrics>,
    sandbox_slots: Arc<tokio::sync::Semaphore>,
    /// True once the pod is being deleted (set by the manager, ahead of the messages).
    deletion: tokio::sync::watch::Receiver<bool>,
}

/// A probe's result, from its task to its worker (`None`: the probe task failed).
struct ProbeDone {
    id: String,
    idx: usize,
    out: Option<ProbeOutcome>,
}

/// Durations of pod start phases measured inside a blocking task, reported by the worker.
#[derive(Debug, Default)]
struct Phases(Vec<(&'static str, Duration)>);

impl Phases {
    fn add(&mut self, phase: &'static str, d: Duration) {
        self.0.push((phase, d));
    }
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Option<T>> {
    let h = tokio::task::spawn_blocking(f);
    async move { h.await.ok() }
}

fn all_containers(pod: &Pod) -> Vec<Container> {
    pod.spec
        .as_ref()
        .map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn pull_policy(p: Option<&str>) -> PullPolicy {
    match p {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        _ => PullPolicy::IfNotPresent,
    }
}

fn hook_action(
    h: &LifecycleHandler,
    c: &Container,
) -> Result<crate::model::probe::ProbeAction, String> {
    let p = Probe {
        exec: h.exec.clone(),
        http_get: h.http_get.clone(),
        tcp_socket: h.tcp_socket.clone(),
        ..Default::default()
    };
    ProbeSpec::from_probe(&p, c)
        .map(|s| s.action)
        .map_err(|e| e.to_string())
}

/// One request to a container's shim over its socket, answered asynchronously: a wait or a
/// stop holds no thread while the container takes its time (a blocking-pool thread per
/// stopping container made the pool, and the process's memory, grow with every mass deletion).
async fn shim_request(
    sock: &std::path::Path,
    req: &hako_shim::protocol::Request,
) -> Result<hako_shim::protocol::Response, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut data = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    data.push(b'\n');
    s.write_all(&data)
        .await
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut line = String::new();
    tokio::io::BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let resp: hako_shim::protocol::Response =
        serde_json::from_str(&line).map_err(|e| format!("bad shim response {line:?}: {e}"))?;
    match resp.error {
        Some(e) => Err(e),
        None => Ok(resp),
    }
}

/// Waits for a container's exit on its shim socket (async, no polling).
async fn wait_exit(sock: PathBuf) {
    let wait = hako_shim::protocol::Request::Wait { timeout_ms: None };
    let _ = shim_request(&sock, &wait).await;
}

/// SIGTERM, SIGKILL after `grace` (the shim does both and answers at the exit); SIGKILL when
/// the stop itself fails.
async fn stop_container(sock: PathBuf, grace: Duration) {
    use hako_shim::protocol::Request;
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    // The shim answers at the exit, at the latest right after its SIGKILL at `grace`; a shim
    // that does not answer by then is not waited for longer.
    let stop = Request::Stop { grace_ms };
    match tokio::time::timeout(grace + SHIM_ANSWER, shim_request(&sock, &stop)).await {
        Ok(Ok(_)) => {}
        _ => {
            let kill = Request::Kill { signal: 9 };
            let _ = tokio::time::timeout(SHIM_ANSWER, shim_request(&sock, &kill)).await;
        }
    }
}

/// How long a shim may take to answer beyond what the request itself waits for.
const SHIM_ANSWER: Duration = Duration::from_secs(10);

impl Worker {
    /// A worker for `pod`, sharing the manager's configuration, objects, status channel,
    /// pod list, metrics and sandbox slots.
    fn new(mgr: &PodManager, pod: Pod, deletion: tokio::sync::watch::Receiver<bool>) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let cfg = mgr.cfg.clone();
        let backoff = cfg.backoff;
        Self {
            record: PodRecord::new(pod.clone()),
            cfg,
            objects: mgr.objects.clone(),
            pod,
            uid,
            dirty: true,
            sandbox: None,
            insts: BTreeMap::new(),
            start_failures: BTreeMap::new(),
            restart_backoff: RestartBackoff::new(backoff),
            image_backoff: RestartBackoff::new(backoff),
            image_failed_at: BTreeMap::new(),
            probes: HashMap::new(),
            probes_in_flight: Default::default(),
            probe_tx,
            probe_rx: Some(probe_rx),
            start_time: None,
            last_cni_check: None,
            status_tx: mgr.status_tx.clone(),
            pods: mgr.pods.clone(),
            exit_tx,
            exit_rx: Some(exit_rx),
            deleting: false,
            clamp_logged: false,
            volumes: None,
            volumes_generation: 0,
            resync_now: false,
            seen_at: std::time::Instant::now(),
            start_observed: false,
            metrics: mgr.metrics.clone(),
            sandbox_slots: mgr.sandbox_slots.clone(),
            deletion,
        }
    }

    /// Resolves once the pod is being deleted (at once if it already is).
    fn deleted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.deletion.clone();
        async move {
            // A closed channel: the manager is gone, nothing will wait for this pod.
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// One pod start phase took `d`: the `hako_agent_pod_start_phase_seconds` histogram and a
    /// debug line on the `hako_agent::startup` target (what `scripts/bench-agent` tabulates).
    fn phase(&self, phase: &'static str, d: Duration) {
        self.metrics.observe_start_phase(phase, d);
        tracing::debug!(
            target: "hako_agent::startup",
            uid = %self.uid,
            phase,
            ms = d.as_secs_f64() * 1e3,
            "pod start phase"
        );
    }

    fn phases(&self, p: &Phases) {
        for (phase, d) in &p.0 {
            self.phase(phase, *d);
        }
    }

    fn pod_dir(&self) -> PathBuf {
        self.cfg.root_dir.join("pods").join(&self.uid)
    }

    fn ns_name(&self) -> (String, String) {
        key_of(&self.pod.metadata)
    }

    fn event(&mut self, type_: &str, reason: &str, message: &str) {
        let (ns, name) = self.ns_name();
        if type_ == "Warning" {
            tracing::warn!(pod = %format!("{ns}/{name}"), reason, "{message}");
        } else {
            tracing::info!(pod = %format!("{ns}/{name}"), reason, "{message}");
        }
        self.record.add_event(type_, reason, message, Utc::now());
        self.dirty = true;
    }

    fn attachment(&self, sb_id: &str, netns: PathBuf) -> Attachment {
        let (ns, name) = self.ns_name();
        Attachment {
            container_id: sb_id.to_string(),
            netns,
            ifname: "eth0".into(),
            pod_namespace: ns,
            pod_name: name,
            pod_uid: self.uid.clone(),
        }
    }

    /// Re-adopts what the node has for this UID: the previous record (events, start time),
    /// the sandbox and every container with its shim state.
    async fn adopt(&mut self) {
        let root = self.cfg.root_dir.clone();
        let uid = self.uid.clone();
        let shim = self.cfg.shim.clone();
        let run_dir = self.cfg.run_dir.clone();
        let found = blocking(move || {
            let prev = state::read_record(&root, &uid).unwrap_or_else(|e| {
                tracing::warn!(%uid, "pod record not adopted: {e}");
                None
            });
            let sb: Option<SandboxRecord> =
                std::fs::read(root.join("pods").join(&uid).join("sandbox.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
            // This pod's sandboxes that its record does not name: left by a start that a
            // crash interrupted (before the record was written) or by an earlier attempt.
            // Its ids start with the UID's prefix: only those owner records are read.
            let prefix = format!("{}-s", sandbox::id_prefix(&uid));
            let stale: Vec<(SandboxPaths, Option<SandboxOwner>)> = sandbox::list(&run_dir)
                .into_iter()
                .filter(|p| p.id().starts_with(&prefix))
                .map(|p| {
                    let o = p.owner();
                    (p, o)
                })
                .filter(|(p, o)| {
                    SandboxOwner::owned_by(o.as_ref(), &p.id(), &uid)
                        && sb.as_ref().is_none_or(|s| s.id != p.id())
                })
                .collect();
            let sb = sb.map(|s| {
                let paths = SandboxPaths::new(&run_dir, &s.id);
                let ok = paths.exists();
                (s, paths, ok)
            });
            let metas = runtime::read_metas(&root, &uid);
            let insts: Vec<(ContainerMeta, Option<hako_shim::state::State>)> = metas
                .into_iter()
                .map(|m| {
                    let st = runtime::shim_state(&shim, &m.id);
                    (m, st)
                })
                .collect();
            (prev, sb, insts, stale)
        })
        .await;
        let Some((prev, sb, insts, stale)) = found else {
            return;
        };
        for (paths, owner) in stale {
            let id = paths.id();
            let host_network = owner.map_or_else(|| self.host_network(), |o| o.host_network);
            let a = self.attachment(&id, paths.net());
            let cni = self.cfg.cni.clone();
            match blocking(move || teardown(&cni, &paths, &a, host_network)).await {
                Some(Ok(())) => {
                    tracing::info!(uid = %self.uid, sandbox = %id, "removed a sandbox left by an interrupted start")
                }
                Some(Err(e)) => {
                    self.metrics.cni_error();
                    tracing::warn!(uid = %self.uid, sandbox = %id, "could not remove a sandbox left by an interrupted start (retried once the pod is gone): {e}")
                }
                None => {}
            }
        }
        if let Some(saved) = std::fs::read(self.pod_dir().join("backoff.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            self.restart_backoff.restore(saved);
        }
        if let Some(prev) = prev {
            self.record.events = prev.events;
            self.start_time = prev
                .pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0);
        }
        if let Some((s, paths, ok)) = sb {
            self.sandbox = Some(SandboxInfo {
                present: true,
                id: s.id,
                attempt: s.attempt,
                ready: ok,
                ips: s.ips,
                paths,
            });
        }
        let n = insts.len();
        for (m, st) in insts {
            let exited = st
                .as_ref()
                .is_some_and(|s| s.status == hako_shim::state::Status::Stopped);
            let id = m.id.clone();
            self.insts.insert(
                id.clone(),
                Inst {
                    meta: m,
                    state: st,
                    message: String::new(),
                    message_read: false,
                    watching: false,
                },
            );
            if exited {
                self.read_message(&id);
            }
        }
        if n > 0 {
            tracing::info!(uid = %self.uid, containers = n, "re-adopted pod");
        }
        let now = Utc::now();
        let running: Vec<String> = self
            .insts
            .iter()
            .filter(|(_, i)| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Running)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !running.is_empty() {
            self.start_observed = true;
        }
        for id in running {
            let started = self.insts[&id]
                .state
                .as_ref()
                .and_then(|s| s.started_at.as_deref())
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(now);
            self.setup_probes(&id, started);
            self.watch(&id);
        }
    }

    /// Keeps the restart back-off in the pod's state dir, so that an agent restart does not
    /// restart a crash-looping container at once.
    fn save_backoff(&self) {
        let path = self.pod_dir().join("backoff.json");
        let body = serde_json::to_vec(&self.restart_backoff.save()).unwrap_or_default();
        if let Err(e) = hako_shim::durable::write_file(&path, &body, 0o644) {
            tracing::warn!(uid = %self.uid, error = %e, "could not save the restart back-off");
        }
    }

    fn read_message(&mut self, id: &str) {
        let policy = self
            .container_spec(&self.insts[id].meta.name.clone())
            .and_then(|c| c.termination_message_policy);
        if let Some(i) = self.insts.get_mut(id) {
            if i.message_read {
                return;
            }
            let failed = i.state.as_ref().and_then(|s| s.exit_code).unwrap_or(0) != 0;
            i.message = runtime::termination_message(&i.meta, policy.as_deref(), failed);
            i.message_read = true;
        }
    }

    fn container_spec(&self, name: &str) -> Option<Container> {
        all_containers(&self.pod)
            .into_iter()
            .find(|c| c.name == name)
    }

    fn watch(&mut self, id: &str) {
        let Some(i) = self.insts.get_mut(id) else {
            return;
        };
        if i.watching {
            return;
        }
        i.watching = true;
        let sock = self.cfg.shim.dir(id).join(hako_shim::state::SOCKET);
        let tx = self.exit_tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            wait_exit(sock).await;
            let _ = tx.send(id);
        });
    }

    async fn refresh(&mut self, id: &str) {
        let shim = self.cfg.shim.clone();
        let cid = id.to_string();
        let st = blocking(move || runtime::shim_state(&shim, &cid))
            .await
            .flatten();
        let exited = st
            .as_ref()
            .is_some_and(|s| s.status == hako_shim::state::Status::Stopped);
        if let Some(i) = self.insts.get_mut(id) {
            i.state = st;
            i.watching = i.watching && !exited;
        }
        if exited {
            self.read_message(id);
            self.probes.remove(id);
        }
        self.dirty = true;
    }

    fn observed(&self) -> ObservedPod {
        let containers: Vec<ObservedContainer> = self
            .insts
            .values()
            .map(|i| {
                let mut o = runtime::observed_from(&i.meta, i.state.as_ref(), i.message.clone());
                if let Some(ws) = self.probes.get(&i.meta.id) {
                    for w in ws {
                        let r = Some(w.result());
                        match w.kind {
                            ProbeType::Startup => o.probes.startup = r,
                            ProbeType::Liveness => o.probes.liveness = r,
                            ProbeType::Readiness => o.probes.readiness = r,
                        }
                    }
                } else if o.state == RuntimeState::Running {
                    // No probe workers (yet): configured probes count as not passed.
                    if let Some(c) = self.container_spec(&i.meta.name) {
                        if c.startup_probe.is_some() {
                            o.probes.startup = Some(ProbeResult::Unknown);
                        }
                        if c.readiness_probe.is_some() {
                            o.probes.readiness = Some(ProbeResult::Failure);
                        }
                    }
                }
                o
            })
            .collect();
        ObservedPod {
            sandbox: self.sandbox.as_ref().map(|s| ObservedSandbox {
                id: s.id.clone(),
                attempt: s.attempt,
                ready: s.ready,
                ips: s.ips.clone(),
            }),
            containers,
            start_failures: self.start_failures.clone(),
            host_ip: self.cfg.host_ip.clone(),
            start_time: self.start_time,
        }
    }

    fn publish(&mut self, observed: &ObservedPod) {
        let prev = self.record.pod.status.clone();
        let st = status::compute_status(&self.pod, observed, prev.as_ref(), Utc::now());
        self.report_metrics(observed, &st);
        if prev.as_ref() == Some(&st) && !self.dirty {
            return;
        }
        self.dirty = false;
        let mut pod = self.pod.clone();
        pod.status = Some(st.clone());
        self.record.pod = pod.clone();
        let t = std::time::Instant::now();
        if let Err(e) = state::write_record(&self.cfg.root_dir, &self.record) {
            tracing::warn!(uid = %self.uid, "writing status: {e}");
        }
        self.phase("status_write", t.elapsed());
        if let Ok(mut m) = self.pods.lock() {
            m.insert(self.uid.clone(), pod);
        }
        let (namespace, name) = self.ns_name();
        let _ = self.status_tx.send(PodStatusEvent {
            uid: self.uid.clone(),
            namespace,
            name,
            status: st,
            terminated: false,
        });
    }

    /// Feeds the pod gauges and, once, the pod start latency (first seen → every regular
    /// container running).
    fn report_metrics(&mut self, observed: &ObservedPod, st: &PodStatus) {
        let mut g = crate::api::healthz::PodGauge {
            sandbox_running: observed.sandbox.as_ref().is_some_and(|s| s.ready),
            ..Default::default()
        };
        for c in &observed.containers {
            let i = match c.state {
                RuntimeState::Created => 0,
                RuntimeState::Running => 1,
                RuntimeState::Exited => 2,
                RuntimeState::Unknown => 3,
            };
            g.containers[i] += 1;
        }
        g.restarts = st
            .container_statuses
            .iter()
            .flatten()
            .chain(st.init_container_statuses.iter().flatten())
            .map(|c| u64::try_from(c.restart_count).unwrap_or(0))
            .sum();
        self.metrics.set_pod(&self.uid, g);
        if !self.start_observed {
            let all_running = st.container_statuses.as_ref().is_some_and(|cs| {
                !cs.is_empty()
                    && cs
                        .iter()
                        .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            });
            if all_running {
                self.start_observed = true;
                let d = self.seen_at.elapsed();
                self.metrics.observe_pod_start(d);
                tracing::debug!(
                    target: "hako_agent::startup",
                    uid = %self.uid,
                    phase = "total",
                    ms = d.as_secs_f64() * 1e3,
                    "pod started"
                );
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let (Some(mut exit_rx), Some(mut probe_rx)) = (self.exit_rx.take(), self.probe_rx.take())
        else {
            return;
        };
        self.adopt().await;
        if self.start_time.is_none() {
            self.start_time = Some(Utc::now());
        }
        loop {
            // Drain pending messages first.
            while let Ok(m) = rx.try_recv() {
                self.on_msg(m);
            }
            if self.deleting || self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate_and_remove().await;
                return;
            }
            let t0 = std::time::Instant::now();
            let progress = self.sync_once().await;
            self.metrics.observe_pod_sync(t0.elapsed());
            self.run_probes().await;
            let obs = self.observed();
            self.publish(&obs);
            let wait = if progress || std::mem::take(&mut self.resync_now) {
                Duration::ZERO
            } else {
                self.next_wake()
            };
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.on_msg(m),
                    None => self.deleting = true,
                },
                Some(id) = exit_rx.recv() => {
                    self.refresh(&id).await;
                    while let Ok(id) = exit_rx.try_recv() {
                        self.refresh(&id).await;
                    }
                }
                Some(done) = probe_rx.recv() => {
                    self.probe_done(done);
                    while let Ok(done) = probe_rx.try_recv() {
                        self.probe_done(done);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Update(p) => {
                if self.pod != *p {
                    self.pod = *p;
                    self.dirty = true;
                }
            }
            Msg::Delete => self.deleting = true,
            Msg::Wake => {}
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Utc::now();
        let mut wake =
            now + k8s_openapi::chrono::Duration::from_std(self.cfg.sync_period).unwrap_or_default();
        for (id, ws) in &self.probes {
            let running = self.insts.get(id).is_some_and(|i| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Running)
            });
            if !running {
                continue;
            }
            let startup_done = ws
                .iter()
                .find(|w| w.kind == ProbeType::Startup)
                .is_none_or(|w| w.result() == ProbeResult::Success);
            for (idx, w) in ws.iter().enumerate() {
                if self.probes_in_flight.contains(&(id.clone(), idx)) {
                    continue;
                }
                // Only probes that may run: startup until it passed, the others after.
                let gated = match w.kind {
                    ProbeType::Startup => startup_done,
                    _ => !startup_done,
                };
                if gated {
                    continue;
                }
                if let Some(d) = w.next_due() {
                    wake = wake.min(d);
                }
            }
        }
        // The next CNI CHECK.
        if let (Some(t), true) = (
            self.last_cni_check,
            self.sandbox.as_ref().is_some_and(|s| s.ready),
        ) {
            let left = self.cfg.cni_check_period.saturating_sub(t.elapsed());
            if let Ok(d) = k8s_openapi::chrono::Duration::from_std(left) {
                wake = wake.min(now + d);
            }
        }
        // Back-off expiries of exited containers.
        let obs = self.observed();
        for c in all_containers(&self.pod) {
            if let Some(l) = obs
                .latest(&c.name)
                .filter(|l| l.state == RuntimeState::Exited)
            {
                if let Some(fin) = l.finished_at {
                    let d = self.restart_backoff.get(&backoff::key(&self.uid, &c.name));
                    if fin + d > now {
                        wake = wake.min(fin + d);
                    }
                }
            }
            if let Some(t) = self.image_failed_at.get(&c.name) {
                let d = self.image_backoff.get(&backoff::key(&self.uid, &c.name));
                if *t + d > now {
                    wake = wake.min(*t + d);
                }
            }
        }
        (wake - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(5))
    }

    /// One pass of planning and acting; true when something changed that may allow the next
    /// step right away.
    async fn sync_once(&mut self) -> bool {
        let now = Utc::now();
        let obs = self.observed();
        let phase = status::compute_status(&self.pod, &obs, None, now)
            .phase
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            // Done: make sure nothing runs and the sandbox is gone, then just report.
            if self.sandbox.as_ref().is_some_and(|s| s.ready || s.present) || self.any_running() {
                // No progress while the sandbox cannot be torn down: retried after a wait.
                return self.kill_pod().await;
            }
            return false;
        }
        if !self.ensure_volumes().await {
            return false;
        }
        self.cni_check().await;
        let obs = self.observed();
        let plan = compute_actions(&self.pod, &obs, now, &self.restart_backoff);
        let mut progress = false;
        for a in plan {
            match a {
                Action::KillPod => {
                    if self.sandbox.as_ref().is_some_and(|s| s.ready || s.present)
                        || self.any_running()
                    {
                        progress = self.kill_pod().await;
                    }
                }
                Action::CreateSandbox { attempt } => {
                    if !self.create_sandbox(attempt).await {
                        return false;
                    }
                    progress = true;
                }
                Action::KillContainer { name, message, .. } => {
                    self.event("Normal", "Killing", &message);
                    let unknown = self
                        .observed()
                        .latest(&name)
                        .filter(|c| c.state == RuntimeState::Unknown)
                        .map(|c| c.id.clone());
                    if let Some(id) = unknown {
                        self.kill_unknown(&id).await;
                        progress = true;
                    } else if let Some(id) = self.latest_running(&name) {
                        let grace = self.grace();
                        self.stop_many(vec![id], grace).await;
                        progress = true;
                    }
                }
                Action::StartInitContainer { name, .. } | Action::StartContainer { name } => {
                    if self.start_container(&name).await {
                        progress = true;
                    }
                }
                Action::BackOff { name, message } => {
                    let c = self.container_spec(&name);
                    let image = c.and_then(|c| c.image).unwrap_or_default();
                    let _ = image;
                    self.event(
                        "Warning",
                        "BackOff",
                        &format!(
                            "Back-off restarting failed container {name} in pod {}",
                            self.ns_name().1
                        ),
                    );
                    self.start_failures.insert(
                        name,
                        StartFailure {
                            reason: "CrashLoopBackOff".into(),
                            message,
                        },
                    );
                }
            }
        }
        progress
    }

    /// A container whose shim is gone: SIGKILL what its record names, remove its state, and
    /// keep it as exited (137) so restart policy and back-off apply.
    async fn kill_unknown(&mut self, id: &str) {
        let shim = self.cfg.shim.clone();
        let cid = id.to_string();
        let rec = blocking(move || {
            let r = shim.client(&cid).recorded_state().ok();
            if let Err(e) = shim.force_delete(&cid) {
                tracing::warn!(container = %cid, "removing container without shim: {e}");
            }
            r
        })
        .await
        .flatten();
        if let (Some(i), Some(mut st)) = (self.insts.get_mut(id), rec) {
            st.status = hako_shim::state::Status::Stopped;
            st.exit_code = Some(137);
            st.reason = Some("Error".into());
            st.finished_at =
                Some(Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true));
            i.state = Some(st);
            i.message_read = true;
            i.watching = false;
        }
        self.probes.remove(id);
        self.dirty = true;
    }

    fn any_running(&self) -> bool {
        self.insts.values().any(|i| {
            i.state
                .as_ref()
                .is_some_and(|s| s.status != hako_shim::state::Status::Stopped)
        })
    }

    fn latest_running(&self, name: &str) -> Option<String> {
        self.observed()
            .latest(name)
            .filter(|c| c.state == RuntimeState::Running || c.state == RuntimeState::Created)
            .map(|c| c.id.clone())
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }

    async fn cni_check(&mut self) {
        let due = self
            .last_cni_check
            .is_none_or(|t| t.elapsed() >= self.cfg.cni_check_period);
        let Some(sb) = self.sandbox.as_ref().filter(|s| s.ready) else {
            return;
        };
        if !due {
            return;
        }
        self.last_cni_check = Some(std::time::Instant::now());
        let a = self.attachment(&sb.id, sb.paths.net());
        let cni = self.cfg.cni.clone();
        let netns_ok = sb.paths.exists();
        let r = blocking(move || cni.check(&a)).await;
        let failed = match r {
            Some(Ok(())) if netns_ok => None,
            Some(Ok(())) => Some("network namespace is gone".to_string()),
            Some(Err(e)) => Some(e.to_string()),
            None => None,
        };
        if let Some(e) = failed {
            self.metrics.cni_error();
            self.event(
                "Warning",
                "SandboxChanged",
                &format!("Pod sandbox changed, it will be killed and re-created: CNI CHECK: {e}"),
            );
            if let Some(s) = self.sandbox.as_mut() {
                s.ready = false;
            }
        }
    }

    async fn create_sandbox(&mut self, attempt: u32) -> bool {
        // The previous sandbox goes first (its addresses, veth and netns).
        if !self.teardown_sandbox().await {
            return false;
        }
        let id = format!("{}-s{attempt}", sandbox::id_prefix(&self.uid));
        let paths = SandboxPaths::new(&self.cfg.run_dir, &id);
        let hostname = dns::pod_hostname(&self.pod);
        let a = self.attachment(&id, paths.net());
        let cni = self.cfg.cni.clone();
        let p2 = paths.clone();
        let host_network = self.host_network();
        let host_ip = self.cfg.host_ip.clone();
        let (namespace, name) = self.ns_name();
        let owner = SandboxOwner {
            uid: self.uid.clone(),
            namespace,
            name,
            host_network,
        };
        // What undoing a creation that the pod's deletion overtook needs.
        let undo = (self.cfg.cni.clone(), paths.clone(), a.clone());
        let t = std::time::Instant::now();
        let slot = tokio::select! {
            s = self.sandbox_slots.clone().acquire_owned() => s.ok(),
            () = self.deleted() => return false,
        };
        self.phase("sandbox_slot", t.elapsed());
        let spawned = std::time::Instant::now();
        let mut task = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut phases = Phases::default();
            phases.add("blocking_queue", spawned.elapsed());
            let res = (|| -> Result<Vec<String>, String> {
                if p2.dir.exists() {
                    // Same id from a failed attempt whose DEL did not go through.
                    teardown(&cni, &p2, &a, host_network).map_err(|e| {
                        format!(
                            "could not remove the previous sandbox {:?}: {e}",
                            a.container_id
                        )
                    })?;
                }
                let t = std::time::Instant::now();
                sandbox::create(&p2, &hostname, host_network, &owner).map_err(|e| e.to_string())?;
                phases.add("sandbox_netns", t.elapsed());
                if host_network {
                    return Ok(host_ip.into_iter().collect());
                }
                let t = std::time::Instant::now();
                match cni.add(&a) {
                    Ok(r) => {
                        phases.add("cni_add", t.elapsed());
                        Ok(cni::result_ips(&r))
                    }
                    Err(e) => {
                        // Undo the whole chain at once (containerd's DEL after a failed ADD);
                        // if DEL fails too, the sandbox stays for the next attempt to DEL.
                        let undo = match teardown(&cni, &p2, &a, false) {
                            Ok(()) => String::new(),
                            Err(d) => format!(" (and the cleanup failed: {d})"),
                        };
                        Err(format!(
                            "failed to setup network for sandbox {:?}: {e}{undo}",
                            a.container_id
                        ))
                    }
                }
            })();
            (res, phases)
        });
        let (res, phases) = tokio::select! {
            r = &mut task => r.unwrap_or_else(|_| (Err("sandbox task failed".into()), Phases::default())),
            () = self.deleted() => {
                // The pod is being deleted: do not wait for the CNI chain. Its thread goes on
                // (bounded by --cni-timeout) and what it made is torn down when it returns.
                let (ns, name) = self.ns_name();
                tracing::info!(pod = %format!("{ns}/{name}"), sandbox = %id, "pod deleted during sandbox creation: not waiting for it");
                let (cni, paths, a) = undo;
                tokio::spawn(async move {
                    if let Ok((Ok(_), _)) = task.await {
                        let id = paths.id();
                        match tokio::task::spawn_blocking(move || teardown(&cni, &paths, &a, host_network)).await {
                            Ok(Ok(())) => tracing::info!(sandbox = %id, "removed a sandbox whose pod was deleted during its creation"),
                            Ok(Err(e)) => tracing::warn!(sandbox = %id, "could not remove a sandbox whose pod was deleted during its creation (the sandbox GC retries): {e}"),
                            Err(_) => {}
                        }
                    }
                });
                return false;
            }
        };
        self.phases(&phases);
        match res {
            Ok(ips) => {
                let t = std::time::Instant::now();
                if attempt > 0 {
                    self.event(
                        "Normal",
                        "SandboxChanged",
                        "Pod sandbox changed, it will be killed and re-created.",
                    );
                }
                let rec = SandboxRecord {
                    id: id.clone(),
                    attempt,
                    ips: ips.clone(),
                };
                let dir = self.pod_dir();
                let _ = std::fs::create_dir_all(&dir);
                // Adoption after an agent restart reads it: durable, and a failure is logged.
                if let Err(e) = hako_shim::durable::write_file(
                    &dir.join("sandbox.json"),
                    &serde_json::to_vec(&rec).unwrap_or_default(),
                    0o644,
                ) {
                    tracing::error!(uid = %self.uid, sandbox = %id, error = %e, "could not record the sandbox");
                }
                // hosts, resolv.conf, hostname files shared by the pod's containers.
                let hosts = dns::pod_hosts_file(&self.pod, &ips, &self.cfg.dns.cluster_domain);
                let resolv = dns::pod_resolv_conf(&self.pod, &self.cfg.dns).render();
                let _ = std::fs::write(dir.join("etc-hosts"), hosts);
                let _ = std::fs::write(dir.join("resolv.conf"), resolv);
                let _ = std::fs::write(
                    dir.join("hostname"),
                    format!("{}\n", dns::pod_hostname(&self.pod)),
                );
                self.phase("sandbox_files", t.elapsed());
                self.sandbox = Some(SandboxInfo {
                    present: true,
                    id,
                    attempt,
                    ready: true,
                    ips,
                    paths,
                });
                self.last_cni_check = Some(std::time::Instant::now());
                true
            }
            Err(e) => {
                self.metrics.sync_error("FailedCreatePodSandBox");
                self.metrics.cni_error();
                self.event(
                    "Warning",
                    "FailedCreatePodSandBox",
                    &format!("Failed to create pod sandbox: {e}"),
                );
                false
            }
        }
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    /// Tears the pod's sandbox down (see [`teardown`]); true when nothing of it is left.
    async fn teardown_sandbox(&mut self) -> bool {
        let host_network = self.host_network();
        let Some(sb) = self.sandbox.as_mut() else {
            return true;
        };
        sb.ready = false;
        if !sb.present {
            return true;
        }
        let (id, paths) = (sb.id.clone(), sb.paths.clone());
        let a = self.attachment(&id, paths.net());
        let cni = self.cfg.cni.clone();
        let r = blocking(move || teardown(&cni, &paths, &a, host_network)).await;
        match r {
            Some(Ok(())) => {
                if let Some(sb) = self.sandbox.as_mut() {
                    sb.present = false;
                }
                true
            }
            Some(Err(e)) => {
                self.metrics.cni_error();
                self.metrics.sync_error("FailedKillPod");
                self.event(
                    "Warning",
                    "FailedKillPod",
                    &format!(
                        "error killing pod: failed to destroy network for sandbox {id:?}: {e}"
                    ),
                );
                false
            }
            None => false,
        }
    }

    /// Stops every container (in termination order) and tears the sandbox down; true when the
    /// sandbox is gone.
    async fn kill_pod(&mut self) -> bool {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let obs = self.observed();
        let grace = self.grace();
        let deadline = tokio::time::Instant::now() + grace;
        for wave in termination_order(&spec, &obs) {
            let ids: Vec<String> = wave
                .iter()
                .filter_map(|n| obs.latest(n).map(|c| c.id.clone()))
                .collect();
            for n in &wave {
                self.event("Normal", "Killing", &format!("Stopping container {n}"));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.stop_many(ids, left).await;
        }
        // Created-but-never-started instances.
        let created: Vec<String> = self
            .insts
            .iter()
            .filter(|(_, i)| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Created)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !created.is_empty() {
            self.stop_many(created, Duration::ZERO).await;
        }
        self.teardown_sandbox().await
    }

    /// preStop hooks, then SIGTERM and SIGKILL when `grace` (counting preStop) runs out; the
    /// containers in `ids` are stopped in parallel.
    async fn stop_many(&mut self, ids: Vec<String>, grace: Duration) {
        let mut set = tokio::task::JoinSet::new();
        let pod_ip = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ips.first().cloned())
            .unwrap_or_default();
        for id in &ids {
            let Some(i) = self.insts.get(id) else {
                continue;
            };
            let c = self.container_spec(&i.meta.name);
            let pre_sleep =
                crate::source::manifest::lifecycle_sleep(&self.pod, &i.meta.name, "preStop");
            let pre = c
                .as_ref()
                .and_then(|c| c.lifecycle.as_ref())
                .and_then(|l| l.pre_stop.clone())
                .filter(|_| pre_sleep.is_none())
                .map(|h| c.as_ref().map(|c| hook_action(&h, c)));
            let shim = self.cfg.shim.clone();
            let id = id.clone();
            let name = i.meta.name.clone();
            let pod_ip = pod_ip.clone();
            let running = i
                .state
                .as_ref()
                .is_some_and(|s| s.status == hako_shim::state::Status::Running);
            set.spawn(async move {
                let start = tokio::time::Instant::now();
                let mut hook_err = None;
                if let (Some(secs), true) = (pre_sleep, running) {
                    // The sleep handler, cut short by the grace period.
                    let want = Duration::from_secs(secs);
                    tokio::time::sleep(want.min(grace)).await;
                    if want > grace {
                        hook_err = Some(format!(
                            "container terminated before the sleep hook finished ({secs}s > grace period {grace:?})"
                        ));
                    }
                }
                if let (Some(Some(action)), true) = (pre, running) {
                    match action {
                        Ok(action) => {
                            let shim2 = shim.clone();
                            let id2 = id.clone();
                            let r = tokio::time::timeout(
                                grace,
                                tokio::task::spawn_blocking(move || {
                                    RealProber { shim: shim2 }.run(
                                        &ProbeTarget {
                                            pod_ip,
                                            container_id: id2,
                                        },
                                        &action,
                                        k8s_openapi::chrono::Duration::from_std(grace)
                                            .unwrap_or_default(),
                                    )
                                }),
                            )
                            .await;
                            match r {
                                Ok(Ok(ProbeOutcome::Success)) => {}
                                Ok(Ok(ProbeOutcome::Failure(e))) => hook_err = Some(e),
                                Ok(Err(e)) => hook_err = Some(e.to_string()),
                                Err(_) => {
                                    hook_err =
                                        Some(format!("PreStopHook timed out after {grace:?}"))
                                }
                            }
                        }
                        Err(e) => hook_err = Some(e),
                    }
                }
                // kubelet: at least 2 s after preStop.
                let mut left = grace.saturating_sub(start.elapsed());
                if grace > Duration::ZERO
                    && left < Duration::from_secs(2)
                    && start.elapsed() > Duration::ZERO
                    && hook_err.is_none()
                    && grace >= Duration::from_secs(2)
                {
                    left = left.max(Duration::from_secs(2).min(grace));
                }
                stop_container(shim.dir(&id).join(hako_shim::state::SOCKET), left).await;
                (id, name, hook_err)
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok((id, name, err)) = r {
                if let Some(e) = err {
                    self.event(
                        "Warning",
                        "FailedPreStopHook",
                        &format!("PreStopHook failed for container {name}: {e}"),
                    );
                }
                self.refresh(&id).await;
            }
        }
    }

    async fn pull(&mut self, c: &Container) -> Option<hako_shim::image::Image> {
        let image = c.image.clone().unwrap_or_default();
        let key = backoff::key(&self.uid, &c.name);
        let now = Utc::now();
        if let Some(t) = self.image_failed_at.get(&c.name) {
            if self.image_backoff.in_backoff_since(&key, *t, now) {
                let msg = format!("Back-off pulling image {image:?}");
                self.event("Normal", "BackOff", &msg);
                self.start_failures.insert(
                    c.name.clone(),
                    StartFailure {
                        reason: "ImagePullBackOff".into(),
                        message: msg,
                    },
                );
                return None;
            }
        }
        let policy = pull_policy(c.image_pull_policy.as_deref());
        let present =
            policy != PullPolicy::Always && self.cfg.images.get(&image).ok().flatten().is_some();
        let creds = self.pull_secret();
        if !present && policy != PullPolicy::Never {
            self.event("Normal", "Pulling", &format!("Pulling image {image:?}"));
        }
        let t0 = std::time::Instant::now();
        // The pull runs in a task of its own: a deletion of the pod does not wait for it (the
        // kubelet cancels the pull's context); the pull then ends on its own, at the latest at
        // the progress deadline, and what it fetched stays in the store for the next pod.
        let images = self.cfg.images.clone();
        let (reference, creds2) = (image.clone(), creds.clone());
        let pull =
            tokio::spawn(async move { images.ensure(&reference, policy, creds2.as_deref()).await });
        let result = tokio::select! {
            r = pull => r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())),
            () = self.deleted() => {
                let (ns, name) = self.ns_name();
                tracing::info!(pod = %format!("{ns}/{name}"), %image, "pod deleted during the image pull: not waiting for it");
                return None;
            }
        };
        match result {
            Ok(img) => {
                self.metrics
                    .image_pull(if present { "present" } else { "pulled" });
                if present {
                    self.event(
                        "Normal",
                        "Pulled",
                        &format!("Container image {image:?} already present on machine"),
                    );
                } else {
                    self.event(
                        "Normal",
                        "Pulled",
                        &format!(
                            "Successfully pulled image {image:?} in {:.3}s",
                            t0.elapsed().as_secs_f64()
                        ),
                    );
                }
                self.image_failed_at.remove(&c.name);
                self.image_backoff.reset(&key);
                Some(img)
            }
            Err(e) => {
                let (reason, msg) = if policy == PullPolicy::Never {
                    (
                        "ErrImageNeverPull",
                        format!(
                            "Container image {image:?} is not present with pull policy of Never"
                        ),
                    )
                } else {
                    (
                        "ErrImagePull",
                        format!("Failed to pull image {image:?}: {e}"),
                    )
                };
                self.metrics.image_pull("failed");
                self.metrics.sync_error(reason);
                self.event("Warning", "Failed", &msg);
                self.event("Warning", "Failed", &format!("Error: {reason}"));
                self.image_backoff.next(&key, now, now);
                self.image_failed_at.insert(c.name.clone(), Utc::now());
                // Next pass reports ImagePullBackOff until the back-off expires.
                self.resync_now = true;
                self.start_failures.insert(
                    c.name.clone(),
                    StartFailure {
                        reason: reason.into(),
                        message: msg,
                    },
                );
                None
            }
        }
    }

    fn pull_secret(&self) -> Option<String> {
        let ns = self.ns_name().0;
        let names: Vec<String> = self
            .pod
            .spec
            .as_ref()?
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|r| r.name.clone())
            .collect();
        let o = self.objects.read().ok()?;
        // Every referenced Secret's docker config, merged in order (the first entry for a
        // registry wins), so that the one matching the image's registry is found.
        let mut configs: Vec<String> = Vec::new();
        for n in names {
            if let Some(s) = o.secrets.get(&(ns.clone(), n)) {
                for k in [".dockerconfigjson", ".dockercfg"] {
                    if let Some(v) = s.data.as_ref().and_then(|d| d.get(k)) {
                        configs.push(String::from_utf8_lossy(&v.0).into_owned());
                    } else if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(k)) {
                        configs.push(v.clone());
                    }
                }
            }
        }
        hako_shim::image::reference::merge_docker_configs(configs.iter().map(String::as_str))
    }

    fn resolve_env(&self, c: &Container) -> Result<Vec<(String, String)>, env::EnvError> {
        let ns = self.ns_name().0;
        let guard = self.objects.read();
        let empty = Objects::default();
        let o = guard.as_deref().unwrap_or(&empty);
        let ctx = env::EnvContext {
            config_maps: o
                .config_maps
                .iter()
                .filter(|(k, _)| k.0 == ns)
                .map(|(k, v)| (k.1.clone(), v))
                .collect(),
            secrets: o
                .secrets
                .iter()
                .filter(|(k, _)| k.0 == ns)
                .map(|(k, v)| (k.1.clone(), v))
                .collect(),
            pod_ips: self
                .sandbox
                .as_ref()
                .map(|s| s.ips.clone())
                .unwrap_or_default(),
            host_ips: self.cfg.host_ip.iter().cloned().collect(),
            node_allocatable: BTreeMap::from([
                ("memory".to_string(), self.cfg.memory_capacity.to_string()),
                (
                    "cpu".to_string(),
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                        .to_string(),
                ),
            ]),
        };
        let mut pod = self.pod.clone();
        let obs = self.observed();
        pod.status = Some(status::compute_status(&self.pod, &obs, None, Utc::now()));
        env::resolve_env(&pod, c, &ctx)
    }

    fn config_error(&mut self, name: &str, msg: String) {
        self.metrics.sync_error("CreateContainerConfigError");
        self.event("Warning", "Failed", &format!("Error: {msg}"));
        self.start_failures.insert(
            name.to_string(),
            StartFailure {
                reason: "CreateContainerConfigError".into(),
                message: msg,
            },
        );
    }

    /// Pull, create, start, postStart; true when the container runs.
    async fn start_container(&mut self, name: &str) -> bool {
        let Some(c) = self.container_spec(name) else {
            return false;
        };
        let Some(sb) = self.sandbox.as_ref().filter(|s| s.ready) else {
            return false;
        };
        let sb_paths = sb.paths.clone();
        let pod_ip = sb.ips.first().cloned().unwrap_or_default();
        let now = Utc::now();
        let obs = self.observed();
        let prev = obs.latest(name).cloned();
        let key = backoff::key(&self.uid, name);
        if let Some(p) = prev.as_ref().filter(|p| p.state == RuntimeState::Exited) {
            if let Some(fin) = p.finished_at {
                if self.restart_backoff.in_backoff_since(&key, fin, now) {
                    return false;
                }
            }
        }
        let t = std::time::Instant::now();
        let Some(image) = self.pull(&c).await else {
            return false;
        };
        self.phase("image", t.elapsed());
        let t_spec = std::time::Instant::now();
        let vars = match self.resolve_env(&c) {
            Ok(v) => v,
            Err(e) => {
                self.config_error(name, e.to_string());
                return false;
            }
        };
        let attempt = prev.as_ref().map(|p| p.attempt + 1).unwrap_or(0);
        let id = runtime::container_id(&self.uid, name, attempt);
        let (ns, pod_name) = self.ns_name();
        let log_path = self
            .cfg
            .pod_log_dir
            .join(format!("{ns}_{pod_name}_{}", self.uid))
            .join(name)
            .join(format!("{attempt}.log"));
        let pod_dir = self.pod_dir();
        let term_dir = pod_dir.join("termination").join(&id);
        let _ = std::fs::create_dir_all(&term_dir);
        let term_log = term_dir.join("termination-log");
        let _ = std::fs::write(&term_log, b"");
        let term_path = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        let mut mounts = vec![
            runtime::bind(&pod_dir.join("etc-hosts"), "/etc/hosts", false),
            runtime::bind(&pod_dir.join("resolv.conf"), "/etc/resolv.conf", false),
            runtime::bind(&pod_dir.join("hostname"), "/etc/hostname", false),
        ];
        mounts.push(runtime::bind(&term_log, &term_path, false));
        if let Some(vols) = &self.volumes {
            match crate::sys::volumes::mounts_for_container(vols, &c) {
                Ok(ms) => mounts.extend(ms.into_iter().map(|m| hako_shim::spec::Mount {
                    options: m.oci_options(),
                    destination: m.destination,
                    source: m.source.display().to_string(),
                    kind: None,
                })),
                Err(e) => {
                    self.config_error(name, e.to_string());
                    return false;
                }
            }
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let wanted = qos::container_oom_score_adj(&spec, &c, self.cfg.memory_capacity);
        let layers = self.cfg.images.layer_dirs(&image);
        let command = env::expand_command(c.command.as_deref().unwrap_or(&[]), &vars);
        let args = env::expand_command(c.args.as_deref().unwrap_or(&[]), &vars);
        let cs = runtime::build_spec(
            &self.pod,
            &c,
            runtime::SpecInputs {
                id: &id,
                env: &vars,
                command,
                args,
                image: &image,
                layers,
                sandbox: &sb_paths,
                mounts,
                oom_score_adj: wanted,
                cgroup_root: self.cfg.cgroup_root.clone(),
                cgroup_parent: &self.cfg.cgroup_parent,
                log_path: log_path.clone(),
                log_max_size: self.cfg.container_log_max_size,
                log_max_files: self.cfg.container_log_max_files,
                seccomp_profile_root: &self.cfg.seccomp_profile_root,
            },
        );
        let cs = match cs {
            Ok(s) => s,
            Err(e) => {
                self.config_error(name, e);
                return false;
            }
        };
        let meta = ContainerMeta {
            id: id.clone(),
            pod_uid: self.uid.clone(),
            name: name.to_string(),
            attempt,
            spec_hash: actions::container_hash(&c),
            image: c.image.clone().unwrap_or_default(),
            image_id: image.id.clone(),
            termination_log: term_log,
            log_path,
        };
        if let Some(p) = prev.as_ref().filter(|p| p.state == RuntimeState::Exited) {
            if let Some(fin) = p.finished_at {
                self.restart_backoff.next(&key, fin, now);
                self.save_backoff();
            }
        }
        let shim = self.cfg.shim.clone();
        let root = self.cfg.root_dir.clone();
        let m2 = meta.clone();
        self.phase("spec", t_spec.elapsed());
        let spawned = std::time::Instant::now();
        let (created, phases) = blocking(move || {
            let mut phases = Phases::default();
            phases.add("blocking_queue", spawned.elapsed());
            let r = (|| -> Result<hako_shim::state::State, String> {
                runtime::write_meta(&root, &m2).map_err(|e| e.to_string())?;
                let _ = shim.force_delete(&m2.id);
                let t = std::time::Instant::now();
                let cl = shim.create(&cs).map_err(|e| e.to_string())?;
                phases.add("shim_create", t.elapsed());
                let t = std::time::Instant::now();
                let st = cl.start().map_err(|e| e.to_string())?;
                phases.add("shim_start", t.elapsed());
                Ok(st)
            })();
            (r, phases)
        })
        .await
        .unwrap_or_else(|| (Err("create task failed".into()), Phases::default()));
        self.phases(&phases);
        match created {
            Ok(st) => {
                self.start_failures.remove(name);
                let is_init = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .is_some_and(|ic| ic.iter().any(|c| c.name == name));
                self.metrics.container_started_as(
                    if is_init {
                        "init_container"
                    } else {
                        "container"
                    },
                    attempt > 0,
                );
                if st.oom_score_adj_clamped && !self.clamp_logged {
                    self.clamp_logged = true;
                    self.event(
                        "Normal",
                        "OOMScoreAdjClamped",
                        &format!(
                            "oom_score_adj {wanted} for container {name} raised to {} (no CAP_SYS_RESOURCE; the parent's value is the lowest allowed)",
                            st.oom_score_adj.unwrap_or_default()
                        ),
                    );
                }
                self.event("Normal", "Created", &format!("Created container {name}"));
                self.event("Normal", "Started", &format!("Started container {name}"));
                let started = st
                    .started_at
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_else(Utc::now);
                self.insts.insert(
                    id.clone(),
                    Inst {
                        meta,
                        state: Some(st),
                        message: String::new(),
                        message_read: false,
                        watching: false,
                    },
                );
                self.watch(&id);
                self.gc_instances(name).await;
                // postStart: the container is not Running until it returns.
                let post_sleep =
                    crate::source::manifest::lifecycle_sleep(&self.pod, name, "postStart");
                let post = c.lifecycle.as_ref().and_then(|l| l.post_start.clone());
                // A deletion of the pod does not wait for the hook: the container is stopped
                // next, and the hook's process with it.
                if let Some(secs) = post_sleep {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(secs)) => {}
                        () = self.deleted() => return true,
                    }
                } else if let Some(h) = post {
                    let r = match hook_action(&h, &c) {
                        Ok(action) => {
                            let shim = self.cfg.shim.clone();
                            let target = ProbeTarget {
                                pod_ip,
                                container_id: id.clone(),
                            };
                            let hook = blocking(move || {
                                RealProber { shim }.run(
                                    &target,
                                    &action,
                                    k8s_openapi::chrono::Duration::seconds(30),
                                )
                            });
                            tokio::select! {
                                r = hook => r.unwrap_or(ProbeOutcome::Failure("hook task failed".into())),
                                () = self.deleted() => {
                                    tracing::info!(uid = %self.uid, container = %name, "pod deleted during postStart: not waiting for the hook");
                                    return true;
                                }
                            }
                        }
                        Err(e) => ProbeOutcome::Failure(e),
                    };
                    if let ProbeOutcome::Failure(e) = r {
                        self.event(
                            "Warning",
                            "FailedPostStartHook",
                            &format!("PostStartHook failed: {e}"),
                        );
                        self.event(
                            "Normal",
                            "Killing",
                            &format!("FailedPostStartHook: stopping container {name}"),
                        );
                        self.stop_many(vec![id.clone()], self.grace()).await;
                        return true;
                    }
                }
                self.setup_probes(&id, started);
                true
            }
            Err(e) => {
                self.metrics.shim_error();
                self.metrics.sync_error("CreateContainerError");
                runtime::remove_meta(&self.cfg.root_dir, &self.uid, &id);
                self.event("Warning", "Failed", &format!("Error: {e}"));
                self.start_failures.insert(
                    name.to_string(),
                    StartFailure {
                        reason: "CreateContainerError".into(),
                        message: e,
                    },
                );
                false
            }
        }
    }

    /// Keeps the two newest instances of a container (current and previous, for lastState
    /// and `logs --previous`); older exited ones are deleted.
    async fn gc_instances(&mut self, name: &str) {
        let mut of: Vec<(u32, String)> = self
            .insts
            .values()
            .filter(|i| i.meta.name == name)
            .map(|i| (i.meta.attempt, i.meta.id.clone()))
            .collect();
        of.sort();
        while of.len() > 2 {
            let (_, id) = of.remove(0);
            self.insts.remove(&id);
            self.probes.remove(&id);
            runtime::remove_meta(&self.cfg.root_dir, &self.uid, &id);
            let shim = self.cfg.shim.clone();
            let term = self.pod_dir().join("termination").join(&id);
            blocking(move || {
                let _ = shim.force_delete(&id);
                let _ = std::fs::remove_dir_all(term);
            })
            .await;
        }
    }

    fn setup_probes(&mut self, id: &str, started: DateTime<Utc>) {
        let Some(i) = self.insts.get(id) else { return };
        let Some(c) = self.container_spec(&i.meta.name) else {
            return;
        };
        let mut ws = Vec::new();
        for (kind, p) in [
            (ProbeType::Startup, &c.startup_probe),
            (ProbeType::Liveness, &c.liveness_probe),
            (ProbeType::Readiness, &c.readiness_probe),
        ] {
            let Some(p) = p else { continue };
            match ProbeSpec::from_probe(p, &c) {
                Ok(s) => {
                    let mut w = ProbeWorker::new(kind, s);
                    w.container_started(started);
                    ws.push(w);
                }
                Err(e) => {
                    let msg = format!("{kind:?} probe: {e}");
                    self.event("Warning", "Unhealthy", &msg);
                }
            }
        }
        if !ws.is_empty() {
            self.probes.insert(id.to_string(), ws);
        }
    }

    /// Starts every probe that is due and not already running, each in a task of its own.
    async fn run_probes(&mut self) {
        let now = Utc::now();
        let pod_ip = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ips.first().cloned())
            .unwrap_or_default();
        for (id, ws) in &self.probes {
            let running = self.insts.get(id).is_some_and(|i| {
                i.state
                    .as_ref()
                    .is_some_and(|s| s.status == hako_shim::state::Status::Running)
            });
            let startup_done = ws
                .iter()
                .find(|w| w.kind == ProbeType::Startup)
                .is_none_or(|w| w.result() == ProbeResult::Success);
            for (idx, w) in ws.iter().enumerate() {
                if !w.due(now, running, startup_done)
                    || !self.probes_in_flight.insert((id.clone(), idx))
                {
                    continue;
                }
                let shim = self.cfg.shim.clone();
                let target = ProbeTarget {
                    pod_ip: pod_ip.clone(),
                    container_id: id.clone(),
                };
                let action = w.spec.action.clone();
                let timeout = w.spec.timeout;
                let id = id.clone();
                let tx = self.probe_tx.clone();
                tokio::spawn(async move {
                    let out = tokio::task::spawn_blocking(move || {
                        RealProber { shim }.run(&target, &action, timeout)
                    })
                    .await
                    .ok();
                    // The worker may be gone (the pod was removed): nothing to report to.
                    let _ = tx.send(ProbeDone { id, idx, out });
                });
            }
        }
    }

    /// A probe finished: its result goes to its worker (events, metrics, status).
    fn probe_done(&mut self, done: ProbeDone) {
        let ProbeDone { id, idx, out } = done;
        self.probes_in_flight.remove(&(id.clone(), idx));
        let Some(out) = out else { return };
        let Some(w) = self.probes.get_mut(&id).and_then(|ws| ws.get_mut(idx)) else {
            return;
        };
        let kind = w.kind;
        let changed = w.record(Utc::now(), &out);
        let k = match kind {
            ProbeType::Startup => "Startup",
            ProbeType::Liveness => "Liveness",
            ProbeType::Readiness => "Readiness",
        };
        self.metrics.probe_result(
            k,
            match out {
                ProbeOutcome::Success => "successful",
                ProbeOutcome::Failure(_) => "failed",
            },
        );
        if let ProbeOutcome::Failure(msg) = &out {
            self.event("Warning", "Unhealthy", &format!("{k} probe failed: {msg}"));
        }
        if changed.is_some() {
            self.dirty = true;
        }
    }

    /// Graceful termination, then removal of everything the pod had on the node.
    fn volume_objects(&self) -> (crate::sys::volumes::MapObjects, u64) {
        let o = self.objects.read();
        match o.as_deref() {
            Ok(o) => (
                crate::sys::volumes::MapObjects {
                    config_maps: o.config_maps.clone(),
                    secrets: o.secrets.clone(),
                },
                o.generation,
            ),
            Err(_) => (Default::default(), 0),
        }
    }

    /// Sets up the pod's volumes once (idempotent, also after an agent restart), and refreshes
    /// configMap/secret/downwardAPI/projected contents when the objects changed. False while a
    /// volume cannot be set up (FailedMount).
    async fn ensure_volumes(&mut self) -> bool {
        let has = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| !v.is_empty());
        if !has {
            return true;
        }
        let (generation, objects) = {
            let (objects, g) = self.volume_objects();
            (g, objects)
        };
        if self.volumes.is_some() && generation == self.volumes_generation {
            return true;
        }
        let host = crate::sys::volumes::VolumeHost::new(self.cfg.root_dir.clone());
        let pod = self.pod.clone();
        let pod_ips = self
            .sandbox
            .as_ref()
            .map(|s| s.ips.clone())
            .unwrap_or_default();
        let host_ips: Vec<String> = self.cfg.host_ip.iter().cloned().collect();
        let mem = self.cfg.memory_capacity.to_string();
        let existing = self.volumes.clone();
        let tokens = self
            .objects
            .read()
            .ok()
            .and_then(|o| o.tokens.get(&self.uid).cloned());
        let t = std::time::Instant::now();
        let r = blocking(move || {
            let mut ctx = crate::sys::volumes::PodContext::new(&pod, &objects);
            ctx.pod_ips = pod_ips;
            ctx.host_ips = host_ips;
            ctx.service_account_tokens = tokens;
            ctx.node_allocatable = BTreeMap::from([("memory".to_string(), mem)]);
            match existing {
                Some(v) => crate::sys::volumes::refresh_pod_volumes(&host, &ctx, &v).map(|_| v),
                None => crate::sys::volumes::setup_pod_volumes(&host, &ctx),
            }
        })
        .await;
        self.phase("volumes", t.elapsed());
        match r {
            Some(Ok(v)) => {
                self.volumes = Some(v);
                self.volumes_generation = generation;
                true
            }
            Some(Err(e)) => {
                self.metrics.sync_error("FailedMount");
                self.event("Warning", "FailedMount", &e.to_string());
                if self.volumes.is_some() {
                    // Refresh failed: old contents stay; try again on the next change.
                    self.volumes_generation = generation;
                    return true;
                }
                false
            }
            None => false,
        }
    }

    async fn terminate_and_remove(&mut self) {
        // A sandbox whose DEL failed stays for the manager's sandbox GC to retry.
        self.kill_pod().await;
        let ids: Vec<String> = self.insts.keys().cloned().collect();
        let shim = self.cfg.shim.clone();
        let root = self.cfg.root_dir.clone();
        let uid = self.uid.clone();
        let cg_root = self
            .cfg
            .cgroup_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
        let pod_cg = self
            .pod
            .spec
            .as_ref()
            .map(|s| runtime::pod_cgroup(&self.cfg.cgroup_parent, s, &uid));
        blocking(move || {
            for id in ids {
                let _ = shim.force_delete(&id);
            }
            let host = crate::sys::volumes::VolumeHost::new(root.clone());
            if let Err(e) = crate::sys::volumes::teardown_pod_volumes(&host, &uid) {
                tracing::warn!(%uid, "volume teardown: {e}; keeping the pod directory");
                return;
            }
            if let Some(cg) = pod_cg {
                for ctrl in hako_shim::cgroup::V1_CONTROLLERS
                    .iter()
                    .copied()
                    .chain([""])
                {
                    let _ = std::fs::remove_dir(cg_root.join(ctrl).join(&cg));
                }
            }
            let _ = std::fs::remove_dir_all(root.join("pods").join(&uid));
        })
        .await;
        if let Ok(mut m) = self.pods.lock() {
            m.remove(&self.uid);
        }
        self.metrics.remove_pod(&self.uid);
        let (namespace, name) = self.ns_name();
        tracing::info!(pod = %format!("{namespace}/{name}"), uid = %self.uid, "pod removed");
        let _ = self.status_tx.send(PodStatusEvent {
            uid: self.uid.clone(),
            namespace,
            name,
            status: self.record.pod.status.clone().unwrap_or_default(),
            terminated: true,
        });
    }
}
