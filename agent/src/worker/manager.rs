//! The pod manager (effectful): the seam between pod sources and the workers — one worker per
//! pod UID, messages only on a change, orphans of a previous run, and the GC of sandboxes that
//! belong to no pod.

use super::effects::Effects;
use super::sandbox::orphan_attachment;
use super::{key_of, AgentConfig, DesiredState, Msg, ObjMap, Objects, PodStatusEvent, Worker};
use crate::api::healthz::AgentMetrics;
use crate::sys::sandbox::{SandboxOwner, SandboxPaths};
use crate::sys::state;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;

/// A worker as the manager sees it. Messages go only on a change — the pod object differs from
/// the last one sent, the referenced objects' generation moved, the pod left the desired set —
/// so that a worker busy stopping containers does not queue a copy of its pod per sync (with
/// 100 pods being deleted that queued ~10,000 pod copies and the allocator kept the peak).
pub(super) struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    last: Pod,
    deleting: bool,
    /// Set once the pod is being deleted: the worker's long waits (an image pull) give way.
    deletion: tokio::sync::watch::Sender<bool>,
}

/// Owns the pod workers; the seam between pod sources and the node (see the module docs).
pub struct PodManager {
    pub(super) cfg: Arc<AgentConfig>,
    pub(super) objects: Arc<RwLock<Objects>>,
    pub(super) workers: Mutex<HashMap<String, Handle>>,
    pub(super) status_tx: broadcast::Sender<PodStatusEvent>,
    pub(super) pods: Arc<Mutex<BTreeMap<String, Pod>>>,
    pub(super) first_sync: Mutex<bool>,
    pub(super) metrics: Arc<AgentMetrics>,
    pub(super) sandbox_slots: Arc<tokio::sync::Semaphore>,
    /// When sandboxes that belong to no pod were last looked for, and whether a teardown of
    /// such sandboxes is running.
    pub(super) sandbox_gc: Mutex<Option<std::time::Instant>>,
    pub(super) sandbox_gc_running: Arc<std::sync::atomic::AtomicBool>,
    /// The objects' generation the workers were last woken for.
    pub(super) woken_generation: std::sync::atomic::AtomicU64,
    /// What the workers reach the machine through.
    pub(super) effects: Effects,
    /// The node's pressure conditions (written by the eviction manager).
    pub(super) pressure: Arc<crate::eviction::NodePressure>,
}

/// How often sandboxes that belong to no pod are looked for (besides the first sync).
pub(super) const SANDBOX_GC_PERIOD: Duration = Duration::from_secs(60);

/// Sandbox creations (netns + CNI ADD) that run at once: 2 per CPU. In a burst of new pods the
/// blocking pool serves tasks in order, so without this limit every pod's sandbox is queued
/// ahead of the first pod's container and all pods finish together at the end of the burst;
/// with it, pods whose sandbox is ready start their containers while later sandboxes wait.
pub(super) fn sandbox_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

impl PodManager {
    /// A manager with no pods, feeding the process's shared metrics
    /// ([`AgentMetrics::shared`], what the healthz/metrics server serves). With
    /// `cfg.eviction` it also starts the eviction manager over its pods (in the current
    /// tokio runtime), which keeps [`PodManager::pressure`] up to date.
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        let m = Self::with_metrics(cfg, AgentMetrics::shared());
        let reclaim = m
            .cfg
            .reclaim
            .clone()
            .unwrap_or_else(|| Arc::new(crate::eviction::NoReclaim));
        m.start_eviction(reclaim);
        m
    }

    /// Starts the eviction manager of `cfg.eviction` (if any) over this manager's pods, with
    /// `reclaim` as the node-level disk reclaim that runs before pods are evicted.
    pub fn start_eviction(self: &Arc<Self>, reclaim: Arc<dyn crate::eviction::NodeReclaim>) {
        let Some(ecfg) = self.cfg.eviction.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no async runtime: the eviction manager does not run");
            return;
        };
        let paths = crate::eviction::EvictionPaths {
            root_dir: self.cfg.root_dir.clone(),
            image_dir: self.cfg.root_dir.join("images"),
            pod_log_dir: self.cfg.pod_log_dir.clone(),
            cgroup_root: self
                .cfg
                .cgroup_root
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("/sys/fs/cgroup")),
        };
        let em = crate::eviction::EvictionManager::new(
            ecfg,
            paths,
            self.pressure.clone(),
            Some(self.clone()),
            Some(self.cfg.shim.clone()),
            reclaim,
        );
        rt.spawn(em.run().instrument(tracing::info_span!("eviction")));
    }

    /// A manager with no pods whose workers feed `metrics`.
    pub fn with_metrics(cfg: AgentConfig, metrics: Arc<AgentMetrics>) -> Arc<Self> {
        Self::build(cfg, metrics, None)
    }

    /// A manager whose workers reach the machine through `effects` (fakes in tests); its
    /// [`PodManager::pods`] and [`PodManager::subscribe`] are fed only by `effects.sink`.
    pub fn with_effects(
        cfg: AgentConfig,
        metrics: Arc<AgentMetrics>,
        effects: Effects,
    ) -> Arc<Self> {
        Self::build(cfg, metrics, Some(effects))
    }

    fn build(cfg: AgentConfig, metrics: Arc<AgentMetrics>, effects: Option<Effects>) -> Arc<Self> {
        let (status_tx, _) = broadcast::channel(1024);
        let pods: Arc<Mutex<BTreeMap<String, Pod>>> = Arc::default();
        let effects =
            effects.unwrap_or_else(|| Effects::real(&cfg, pods.clone(), status_tx.clone()));
        Arc::new(Self {
            cfg: Arc::new(cfg),
            objects: Arc::default(),
            workers: Mutex::new(HashMap::new()),
            status_tx,
            pods,
            first_sync: Mutex::new(true),
            metrics,
            sandbox_slots: Arc::new(tokio::sync::Semaphore::new(sandbox_slots())),
            sandbox_gc: Mutex::new(None),
            sandbox_gc_running: Arc::default(),
            woken_generation: std::sync::atomic::AtomicU64::new(0),
            effects,
            pressure: Arc::default(),
        })
    }

    /// The node's pressure conditions the workers admit new pods against; the eviction
    /// manager writes them.
    pub fn pressure(&self) -> Arc<crate::eviction::NodePressure> {
        self.pressure.clone()
    }

    /// Evicts the pod `uid` (the eviction manager's kill): its worker records the Evicted
    /// event, kills it with `grace` and reports it `Failed`/`Evicted` with `message` from then
    /// on. False when the pod has no worker or is being deleted.
    pub fn evict(&self, uid: &str, message: String, grace: Duration) -> bool {
        let Ok(workers) = self.workers.lock() else {
            return false;
        };
        match workers.get(uid) {
            Some(h) if !h.deleting && !h.tx.is_closed() => {
                h.tx.send(Msg::Evict(Box::new(super::Evicted { message, grace })))
                    .is_ok()
            }
            _ => false,
        }
    }

    /// The sysctls pods may set (for sources that admit pods themselves).
    pub fn sysctls(&self) -> &crate::model::admit::SysctlAllowlist {
        &self.cfg.sysctls
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

    /// Sets the Services the containers' service-link variables come from (cluster mode:
    /// [`ServiceFeed::NotListed`](crate::model::env::ServiceFeed) until the Service watch has
    /// listed once). A change wakes the workers on the next [`PodManager::sync`]; containers
    /// already running keep their environment.
    pub fn set_services(&self, services: crate::model::env::ServiceFeed) {
        if let Ok(mut o) = self.objects.write() {
            if o.services != services {
                o.services = services;
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
            let claims: ObjMap<_> = desired
                .claims
                .into_iter()
                .map(|c| (key_of(&c.metadata), c))
                .collect();
            let pvs: BTreeMap<String, _> = desired
                .persistent_volumes
                .into_iter()
                .map(|v| (v.metadata.name.clone().unwrap_or_default(), v))
                .collect();
            // Only what PV affinity reads counts as a node change (not its status).
            let node = desired.node.map(|n| {
                let mut m = k8s_openapi::api::core::v1::Node::default();
                m.metadata.name = n.metadata.name;
                m.metadata.labels = n.metadata.labels;
                m
            });
            if claims != o.claims || pvs != o.persistent_volumes || node != o.node {
                o.claims = claims;
                o.persistent_volumes = pvs;
                o.node = node;
                o.generation += 1;
            }
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
        let unowned: Vec<(SandboxPaths, SandboxOwner)> = self
            .effects
            .network
            .list()
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
        let net = self.effects.network.clone();
        let running = self.sandbox_gc_running.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            for (paths, owner) in unowned {
                let id = paths.id();
                let a = orphan_attachment(&paths, &owner);
                match net.teardown(&paths, &a, owner.host_network) {
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
        let (namespace, name) = key_of(&pod.metadata);
        let span = tracing::info_span!(
            "pod",
            %namespace,
            %name,
            uid = %pod.metadata.uid.as_deref().unwrap_or_default()
        );
        let w = Worker::new(self, pod, deletion_rx);
        tokio::spawn(w.run(rx).instrument(span));
        Handle {
            tx,
            last,
            deleting: delete,
            deletion,
        }
    }
}
