//! Pod workers and the pod manager (effectful): one tokio task per pod drives
//! [`compute_actions`](crate::model::actions::compute_actions) through the effect traits of
//! [`effects`] — the pod sandbox (namespaces + CNI), images and containers (`hako-shim`),
//! volumes, probes and lifecycle hooks, the clock — and publishes the pod's status and events
//! (`<root>/pods/<uid>/status.json` with the real effects of `crate::sys::effects`).
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
//!
//! # Where each concern lives
//!
//! - this file: the worker's state, its loop (`Worker::run`: messages, exits, probe results,
//!   timers) and the final removal of the pod;
//! - `manager`: [`PodManager`] — workers per UID, orphans of a previous run, sandbox GC;
//! - `sync`: one pass — observe, `compute_actions`, dispatch;
//! - `sandbox`: create (namespaces + CNI ADD), teardown (CNI DEL), CNI CHECK;
//! - `containers`: start (env, mounts, spec), stop, kill, exit watches, GC of old instances;
//! - `hooks`: postStart/preStop handlers; `images`: pulls and their back-off;
//! - `probes`: probe scheduling and results; `volumes`: the pod's volumes;
//! - `adopt`: re-adoption after an agent restart; `publish`: status, events, metrics.

pub mod effects;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

mod adopt;
mod containers;
mod hooks;
mod images;
mod manager;
mod probes;
mod publish;
mod sandbox;
mod sync;
mod volumes;

pub use manager::PodManager;

use effects::Effects;

use crate::api::healthz::AgentMetrics;
use crate::model::backoff::{self, BackoffConfig, RestartBackoff};
use crate::model::dns;
use crate::model::observed::{ProbeResult, RuntimeState, StartFailure};
use crate::model::probe::{ProbeOutcome, ProbeType, ProbeWorker};
use crate::model::record::PodRecord;
use crate::sys::cni::CniConfig;
use crate::sys::runtime::{self, ContainerMeta};
use crate::sys::sandbox::SandboxPaths;
use hako_shim::client::Runtime as ShimRuntime;
use hako_shim::image::ImageStore;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodStatus, Secret};
use k8s_openapi::chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

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
    /// The sysctls pods may set (the safe set and `--allowed-unsafe-sysctls`).
    pub sysctls: crate::model::admit::SysctlAllowlist,
    /// The eviction manager [`PodManager::new`] starts (None: no eviction, no pressure).
    pub eviction: Option<crate::eviction::EvictionConfig>,
    /// Dead-container GC (`--maximum-dead-containers-per-container` and co).
    pub container_gc: crate::sys::container_gc::ContainerGcPolicy,
    /// The node-level disk reclaim the eviction manager runs before evicting for disk pressure
    /// (the image GC; None: nothing is reclaimed first).
    pub reclaim: Option<Arc<dyn crate::eviction::NodeReclaim>>,
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
    /// PersistentVolumeClaims the pods' `persistentVolumeClaim` volumes resolve against.
    pub claims: Vec<k8s_openapi::api::core::v1::PersistentVolumeClaim>,
    /// PersistentVolumes the claims are bound to.
    pub persistent_volumes: Vec<k8s_openapi::api::core::v1::PersistentVolume>,
    /// This node as the apiserver has it (cluster mode: claims must be `Bound`, PV affinity is
    /// checked against its labels); `None` for a standalone source (claims bind by
    /// `spec.volumeName`, affinity is checked against the host's standard labels).
    pub node: Option<k8s_openapi::api::core::v1::Node>,
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
    /// Services for the service-link variables ([`PodManager::set_services`]).
    services: crate::model::env::ServiceFeed,
    /// PersistentVolumeClaims by (namespace, name), PersistentVolumes by name, and the node
    /// (see [`DesiredState::node`]).
    claims: ObjMap<k8s_openapi::api::core::v1::PersistentVolumeClaim>,
    persistent_volumes: BTreeMap<String, k8s_openapi::api::core::v1::PersistentVolume>,
    node: Option<k8s_openapi::api::core::v1::Node>,
    generation: u64,
}

enum Msg {
    Update(Box<Pod>),
    Delete,
    /// ConfigMaps, Secrets or tokens changed: look at the pod's volumes again.
    Wake,
    /// The eviction manager evicts the pod.
    Evict(Box<Evicted>),
}

/// An eviction order: the pod is killed with `grace` and stays `Failed`/`Evicted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// The kubelet's eviction message.
    pub(crate) message: String,
    /// Termination grace period of the kill.
    pub(crate) grace: Duration,
}

fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
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
    /// What the worker reaches the machine through.
    fx: Effects,
    exit_tx: mpsc::UnboundedSender<String>,
    exit_rx: Option<mpsc::UnboundedReceiver<String>>,
    deleting: bool,
    clamp_logged: bool,
    /// The DeadlineExceeded event was recorded.
    deadline_noted: bool,
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
    /// The pod was refused before anything of it ran (its sysctls): it stays Failed with this
    /// reason and nothing of it is started.
    rejected: Option<crate::model::admit::Rejection>,
    /// The pod was evicted: it is killed with the order's grace period and never restarted.
    evicted: Option<Evicted>,
    /// The volumes of the evicted pod were torn down.
    volumes_released: bool,
    /// The node's pressure conditions (the eviction manager's), for admission.
    pressure: Arc<crate::eviction::NodePressure>,
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

/// The pod's ephemeral containers as containers (what the runtime starts): the fields the API
/// forbids for them (ports, probes, lifecycle, resources, resize and restart policy) are
/// dropped, whatever the source sent, and `targetContainerName` is returned beside each.
fn ephemeral_containers(pod: &Pod) -> Vec<(Container, Option<String>)> {
    let list = pod
        .spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_deref())
        .unwrap_or(&[]);
    list.iter()
        .filter_map(|ec| {
            let mut v = serde_json::to_value(ec).ok()?;
            let obj = v.as_object_mut()?;
            let target = obj
                .remove("targetContainerName")
                .and_then(|t| t.as_str().map(str::to_string))
                .filter(|t| !t.is_empty());
            for f in [
                "ports",
                "livenessProbe",
                "readinessProbe",
                "startupProbe",
                "lifecycle",
                "resources",
                "resizePolicy",
                "restartPolicy",
            ] {
                obj.remove(f);
            }
            let c: Container = serde_json::from_value(v).ok()?;
            Some((c, target))
        })
        .collect()
}

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
            fx: mgr.effects.clone(),
            exit_tx,
            exit_rx: Some(exit_rx),
            deleting: false,
            clamp_logged: false,
            deadline_noted: false,
            volumes: None,
            volumes_generation: 0,
            resync_now: false,
            seen_at: std::time::Instant::now(),
            start_observed: false,
            metrics: mgr.metrics.clone(),
            sandbox_slots: mgr.sandbox_slots.clone(),
            deletion,
            rejected: None,
            evicted: None,
            volumes_released: false,
            pressure: mgr.pressure.clone(),
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

    fn pod_dir(&self) -> PathBuf {
        self.cfg.root_dir.join("pods").join(&self.uid)
    }

    fn ns_name(&self) -> (String, String) {
        key_of(&self.pod.metadata)
    }

    fn container_spec(&self, name: &str) -> Option<Container> {
        all_containers(&self.pod)
            .into_iter()
            .find(|c| c.name == name)
            .or_else(|| {
                ephemeral_containers(&self.pod)
                    .into_iter()
                    .map(|(c, _)| c)
                    .find(|c| c.name == name)
            })
    }

    /// The target container of ephemeral container `name`: `Some(None)` for an ephemeral
    /// container without one, `None` when `name` is not an ephemeral container.
    fn ephemeral_target(&self, name: &str) -> Option<Option<String>> {
        ephemeral_containers(&self.pod)
            .into_iter()
            .find(|(c, _)| c.name == name)
            .map(|(_, t)| t)
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    fn grace(&self) -> Duration {
        if let Some(e) = &self.evicted {
            return e.grace;
        }
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

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let (Some(mut exit_rx), Some(mut probe_rx)) = (self.exit_rx.take(), self.probe_rx.take())
        else {
            return;
        };
        self.adopt().await;
        if self.start_time.is_none() {
            self.start_time = Some(self.fx.clock.now());
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
            let progress = self
                .sync_once()
                .instrument(tracing::debug_span!("sync"))
                .await;
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
            Msg::Evict(e) => {
                if self.evicted.is_none() && self.rejected.is_none() {
                    self.event("Warning", crate::eviction::REASON, &e.message);
                    self.evicted = Some(*e);
                    self.resync_now = true;
                }
            }
        }
    }

    fn next_wake(&self) -> Duration {
        let now = self.fx.clock.now();
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
        // The active deadline.
        if let Some(d) = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| crate::model::status::active_deadline(s, self.start_time))
        {
            if d > now {
                wake = wake.min(d);
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

    /// Graceful termination, then removal of everything the pod had on the node.
    async fn terminate_and_remove(&mut self) {
        // A sandbox whose DEL failed stays for the manager's sandbox GC to retry.
        self.kill_pod().await;
        let ids: Vec<String> = self.insts.keys().cloned().collect();
        let rt = self.fx.runtime.clone();
        let vols = self.fx.volumes.clone();
        let root = self.cfg.root_dir.clone();
        let uid = self.uid.clone();
        let cg_root = self.cfg.cgroup_root.clone();
        let pod_cg = self
            .pod
            .spec
            .as_ref()
            .map(|s| runtime::pod_cgroup(&self.cfg.cgroup_parent, s, &uid));
        blocking(move || {
            for id in ids {
                let _ = rt.force_delete(&id);
            }
            if let Err(e) = vols.teardown(&uid) {
                tracing::warn!(%uid, "volume teardown: {e}; keeping the pod directory");
                return;
            }
            if let Some(cg) = pod_cg {
                crate::sys::pod_cgroup::remove(cg_root.as_deref(), &cg);
            }
            let _ = std::fs::remove_dir_all(root.join("pods").join(&uid));
        })
        .await;
        self.metrics.remove_pod(&self.uid);
        let (namespace, name) = self.ns_name();
        tracing::info!(pod = %format!("{namespace}/{name}"), uid = %self.uid, "pod removed");
        self.fx.sink.removed(&self.record);
    }
}
