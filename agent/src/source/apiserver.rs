//! The apiserver as pod source and status sink (effectful): watches the pods bound to this
//! node (`spec.nodeName=<node>`; relists on 410 Gone and follows bookmarks through the
//! kube-runtime watcher), admits or rejects them like the kubelet, feeds the admitted ones with
//! their ConfigMaps and Secrets (each fetched and watched by name, never listed) to the pod
//! manager, patches `pods/<name>/status` (coalesced, flushed every 100 ms), and finishes
//! graceful deletions with a grace-0 delete carrying a UID precondition. The workers' events
//! (Pulling, Pulled, Created, Started, Killing, BackOff, Unhealthy, FailedMount, ...) are
//! forwarded as core/v1 Events in the pod's namespace. The PersistentVolumeClaims of the pods'
//! `persistentVolumeClaim` volumes and the PersistentVolumes they are bound to are read with
//! GET by name ([`Claims`]; a node may not list or watch them), as the kubelet's volume manager
//! does, and handed to the workers with the pods. A separate Service feed
//! ([`spawn_service_feed`]) watches every Service for the containers' service-link variables.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
    PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::chrono::Utc;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::model::admit::{self, Rejection};
use crate::node::tokens::TokenManager;
use crate::node::Ctx;
use crate::worker::{DesiredState, PodManager, PodStatusEvent};

type ObjKey = (&'static str, String, String);

/// Watched ConfigMaps and Secrets, by (kind, namespace, name).
#[derive(Default)]
struct Objects {
    config_maps: BTreeMap<(String, String), ConfigMap>,
    secrets: BTreeMap<(String, String), Secret>,
    watchers: HashMap<ObjKey, tokio::task::JoinHandle<()>>,
    /// Objects whose watch has listed them at least once (present or absent).
    synced: BTreeSet<ObjKey>,
}

enum ObjEvent {
    ConfigMap(String, String, Option<ConfigMap>),
    Secret(String, String, Option<Secret>),
    /// The watch of this object completed a (re)list.
    Listed(ObjKey),
}

/// How long a new pod waits for the first list of the ConfigMaps and Secrets it references
/// before it is handed to the workers anyway (a refused or failing watch then shows up as
/// the workers' FailedMount / CreateContainerConfigError / pull error).
const OBJECT_WAIT: Duration = Duration::from_secs(5);

/// Watches one object by name (`metadata.name=` field selector; the Node authorizer allows
/// nothing wider). A (re)list reports the object's state and then [`ObjEvent::Listed`].
async fn watch_one<K>(
    client: Client,
    key: ObjKey,
    tx: mpsc::UnboundedSender<ObjEvent>,
    wrap: fn(String, String, Option<K>) -> ObjEvent,
) where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let (kind, ns, name) = key.clone();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let api: Api<K> = Api::namespaced(client, &ns);
    let mut s = watcher(api, cfg).boxed();
    let mut listed: Option<Option<K>> = None;
    while let Some(ev) = s.next().await {
        let msg = match ev {
            Ok(watcher::Event::Apply(o)) => Some(Some(o)),
            Ok(watcher::Event::Delete(_)) => Some(None),
            Ok(watcher::Event::Init) => {
                listed = Some(None);
                None
            }
            Ok(watcher::Event::InitApply(o)) => {
                listed = Some(Some(o));
                None
            }
            Ok(watcher::Event::InitDone) => {
                let o = listed.take().flatten();
                let _ = tx.send(wrap(ns.clone(), name.clone(), o));
                let _ = tx.send(ObjEvent::Listed(key.clone()));
                None
            }
            Err(e) => {
                tracing::debug!("watch {kind} {ns}/{name}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                None
            }
        };
        if let Some(o) = msg {
            let _ = tx.send(wrap(ns.clone(), name.clone(), o));
        }
    }
}

fn spawn_object_watch(
    client: Client,
    key: ObjKey,
    tx: mpsc::UnboundedSender<ObjEvent>,
) -> tokio::task::JoinHandle<()> {
    if key.0 == "configmaps" {
        tokio::spawn(watch_one::<ConfigMap>(client, key, tx, ObjEvent::ConfigMap))
    } else {
        tokio::spawn(watch_one::<Secret>(client, key, tx, ObjEvent::Secret))
    }
}

/// The ConfigMaps and Secrets `p` references (imagePullSecrets included).
fn object_refs(p: &Pod) -> Vec<ObjKey> {
    let (ns, _) = ns_name(p);
    let mut v: Vec<ObjKey> = admit::references(p, "configmaps")
        .into_iter()
        .map(|n| ("configmaps", ns.clone(), n))
        .collect();
    v.extend(
        admit::references(p, "secrets")
            .into_iter()
            .map(|n| ("secrets", ns.clone(), n)),
    );
    v
}

/// The claims `p`'s `persistentVolumeClaim` volumes name, as (namespace, name).
fn claim_refs(p: &Pod) -> Vec<(String, String)> {
    let (ns, _) = ns_name(p);
    p.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| (ns.clone(), c.claim_name.clone()))
        .collect()
}

/// How often a claim that does not resolve yet (missing, not bound, PV missing) is read
/// again, and how often a resolved one is.
const CLAIM_RETRY: Duration = Duration::from_secs(2);
const CLAIM_REFRESH: Duration = Duration::from_secs(30);
/// Deadline of one GET of a claim or volume.
const CLAIM_GET_TIMEOUT: Duration = Duration::from_secs(5);

/// The PersistentVolumeClaims of the admitted pods and the PersistentVolumes they are bound
/// to, each read with GET by name (the kubelet's populator does the same; the Node
/// authorizer allows a node `get` on a claim a pod bound to it names and on the PV bound to
/// that claim, nothing wider).
#[derive(Default)]
struct Claims {
    claims: BTreeMap<(String, String), PersistentVolumeClaim>,
    volumes: BTreeMap<String, PersistentVolume>,
    /// When each wanted claim was last read (present once it has been read at all).
    fetched: HashMap<(String, String), Instant>,
}

impl Claims {
    /// The claim resolves: it exists, is Bound, and its PV was read.
    fn resolved(&self, key: &(String, String)) -> bool {
        self.claims.get(key).is_some_and(|c| {
            let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let pv = c.spec.as_ref().and_then(|s| s.volume_name.as_deref());
            bound && pv.is_some_and(|v| self.volumes.contains_key(v))
        })
    }

    fn any_unresolved(&self) -> bool {
        self.fetched.keys().any(|k| !self.resolved(k))
    }

    /// Reads the wanted claims that are due (and their PVs); forgets the others. Returns
    /// whether anything changed. A failed read (other than 404) keeps what was known.
    async fn refresh(&mut self, client: &Client, want: &BTreeSet<(String, String)>) -> bool {
        let before = (self.claims.clone(), self.volumes.clone());
        self.fetched.retain(|k, _| want.contains(k));
        self.claims.retain(|k, _| want.contains(k));
        for key in want {
            let every = if self.resolved(key) {
                CLAIM_REFRESH
            } else {
                CLAIM_RETRY
            };
            if self.fetched.get(key).is_some_and(|t| t.elapsed() < every) {
                continue;
            }
            self.fetched.insert(key.clone(), Instant::now());
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &key.0);
            match tokio::time::timeout(CLAIM_GET_TIMEOUT, api.get_opt(&key.1)).await {
                Ok(Ok(Some(c))) => {
                    self.claims.insert(key.clone(), c);
                }
                Ok(Ok(None)) => {
                    self.claims.remove(key);
                }
                Ok(Err(e)) => tracing::warn!("reading claim {}/{}: {e}", key.0, key.1),
                Err(_) => tracing::warn!("reading claim {}/{}: timed out", key.0, key.1),
            }
            let pv = self
                .claims
                .get(key)
                .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                .and_then(|c| c.spec.as_ref()?.volume_name.clone())
                .filter(|v| !v.is_empty());
            if let Some(pv) = pv {
                let api: Api<PersistentVolume> = Api::all(client.clone());
                match tokio::time::timeout(CLAIM_GET_TIMEOUT, api.get_opt(&pv)).await {
                    Ok(Ok(Some(v))) => {
                        self.volumes.insert(pv, v);
                    }
                    Ok(Ok(None)) => {
                        self.volumes.remove(&pv);
                    }
                    Ok(Err(e)) => tracing::warn!("reading persistent volume {pv}: {e}"),
                    Err(_) => tracing::warn!("reading persistent volume {pv}: timed out"),
                }
            }
        }
        let used: BTreeSet<String> = self
            .claims
            .values()
            .filter_map(|c| c.spec.as_ref()?.volume_name.clone())
            .collect();
        self.volumes.retain(|k, _| used.contains(k));
        before != (self.claims.clone(), self.volumes.clone())
    }
}

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

fn is_mirror(p: &Pod) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
}

/// The mirror pod of a static pod: same metadata and spec, the config hash as the mirror
/// annotation, owned by the Node.
fn mirror_of(p: &Pod, node: &Node) -> Pod {
    let mut m = p.clone();
    let hash = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| {
            a.get(crate::source::manifest::CONFIG_HASH_ANNOTATION)
                .cloned()
        })
        .unwrap_or_default();
    m.metadata.uid = None;
    m.metadata.resource_version = None;
    m.metadata.creation_timestamp = None;
    m.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(MIRROR_ANNOTATION.into(), hash);
    m.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.metadata.name.clone().unwrap_or_default(),
            uid: node.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            ..Default::default()
        },
    ]);
    m.status = None;
    m
}

fn uid_of(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn ns_name(p: &Pod) -> (String, String) {
    (
        p.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

fn is_terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

/// Creates an Event for `pod` (count and timestamps from `ev`); returns its name.
async fn create_event(
    client: &Client,
    pod: &Pod,
    node: &str,
    ev: &crate::model::record::PodEvent,
) -> Option<String> {
    let (ns, name) = ns_name(pod);
    let e = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        reason: Some(ev.reason.clone()),
        message: Some(ev.message.clone()),
        type_: Some(ev.type_.clone()),
        count: Some(i32::try_from(ev.count).unwrap_or(i32::MAX)),
        first_timestamp: Some(Time(ev.first_timestamp)),
        last_timestamp: Some(Time(ev.last_timestamp)),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("kubelet".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.into()),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    match api.create(&PostParams::default(), &e).await {
        Ok(created) => created.metadata.name,
        Err(err) => {
            tracing::debug!("event {} for {ns}/{name}: {err}", ev.reason);
            None
        }
    }
}

async fn event(client: &Client, pod: &Pod, node: &str, type_: &str, reason: &str, message: &str) {
    let now = Utc::now();
    let ev = crate::model::record::PodEvent {
        type_: type_.into(),
        reason: reason.into(),
        message: message.into(),
        first_timestamp: now,
        last_timestamp: now,
        count: 1,
    };
    let _ = create_event(client, pod, node, &ev).await;
}

/// Sent events: (uid, reason, message) → (Event name, count).
type SentEvents = HashMap<(String, String, String), (String, u32)>;

/// Forwards the worker's events for one pod (from its record) to the apiserver: new ones are
/// created, repeated ones get their count and lastTimestamp patched.
async fn forward_events(ctx: &Ctx, pod: &Pod, sent: &mut SentEvents) {
    let uid = uid_of(pod);
    forward_events_for(ctx, pod, &uid, sent).await;
}

/// Like [`forward_events`], with the record of `uid` (a static pod's) shown on `pod` (its
/// mirror).
async fn forward_events_for(ctx: &Ctx, pod: &Pod, uid: &str, sent: &mut SentEvents) {
    let uid = uid.to_string();
    let path = crate::sys::state::record_path(&ctx.node.root_dir, &uid);
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    let Ok(rec) = serde_json::from_slice::<crate::model::record::PodRecord>(&bytes) else {
        return;
    };
    let (ns, _) = ns_name(pod);
    for ev in &rec.events {
        let key = (uid.clone(), ev.reason.clone(), ev.message.clone());
        match sent.get(&key).cloned() {
            None => {
                if let Some(name) = create_event(&ctx.client, pod, &ctx.cfg.name, ev).await {
                    sent.insert(key, (name, ev.count));
                }
            }
            Some((name, count)) if ev.count > count => {
                let api: Api<Event> = Api::namespaced(ctx.client.clone(), &ns);
                let p = serde_json::json!({"count": ev.count, "lastTimestamp": Time(ev.last_timestamp)});
                if api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(p))
                    .await
                    .is_ok()
                {
                    sent.insert(key, (name, ev.count));
                }
            }
            Some(_) => {}
        }
    }
}

async fn patch_status(
    client: &Client,
    ns: &str,
    name: &str,
    uid: &str,
    st: &PodStatus,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({"metadata": {"uid": uid}, "status": st});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(body))
        .await
        .map(|_| ())
}

async fn final_delete(client: &Client, ns: &str, name: &str, uid: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "pod deleted after termination"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!("deleting {ns}/{name}: {e}"),
    }
}

/// The Service feed of the pod workers (the kubelet's service informer): marks the Services
/// as not yet listed at once (so that pods from the apiserver wait for the first list, as
/// the kubelet does), then watches all Services (the Node authorizer allows list/watch) and
/// hands the set to the workers after every list and every change the variables can see.
/// Each object is reduced to its [`ServiceLink`](crate::model::env::ServiceLink) as it
/// arrives and dropped: the node keeps no copy of the cluster's Services, and the workers
/// share the feed's map (copied only when it changes while they hold it).
pub(crate) fn spawn_service_feed(
    client: Client,
    manager: Arc<PodManager>,
) -> tokio::task::JoinHandle<()> {
    use crate::model::env::{ServiceFeed, ServiceLink, ServiceLinks};
    use k8s_openapi::api::core::v1::Service;
    manager.set_services(ServiceFeed::NotListed);
    tokio::spawn(async move {
        let api: Api<Service> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        let key = |s: &Service| {
            (
                s.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                s.metadata.name.clone().unwrap_or_default(),
            )
        };
        let mut all: Arc<ServiceLinks> = Arc::default();
        let mut relist: Option<ServiceLinks> = None;
        let mut listed = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(s)) => {
                    let (k, link) = (key(&s), ServiceLink::of(&s));
                    if all.get(&k) == link.as_ref() {
                        // Status, labels or another field the variables do not read.
                        continue;
                    }
                    let m = Arc::make_mut(&mut all);
                    match link {
                        Some(l) => m.insert(k, l),
                        None => m.remove(&k),
                    };
                }
                Ok(watcher::Event::Delete(s)) => {
                    let k = key(&s);
                    if !all.contains_key(&k) {
                        continue;
                    }
                    Arc::make_mut(&mut all).remove(&k);
                }
                Ok(watcher::Event::Init) => {
                    relist = Some(ServiceLinks::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(s)) => {
                    if let Some(l) = ServiceLink::of(&s) {
                        relist
                            .get_or_insert_with(ServiceLinks::new)
                            .insert(key(&s), l);
                    }
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    all = Arc::new(relist.take().unwrap_or_default());
                    listed = true;
                }
                Err(e) => {
                    tracing::warn!("service watch: {e} (the watcher re-lists)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            if listed {
                manager.set_services(ServiceFeed::Listed(Arc::clone(&all)));
            }
        }
    })
}

/// The pod loop. `manager` is None when the agent runs without a container runtime (pods are
/// then admitted or rejected and reported, but not started).
pub(crate) async fn pod_loop(
    ctx: Arc<Ctx>,
    watch_client: Client,
    manager: Option<Arc<PodManager>>,
) {
    let node_name = ctx.cfg.name.clone();
    let api: Api<Pod> = Api::all(watch_client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut stream = watcher(api, cfg).boxed();
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, Pod>> = None;
    let mut admitted: BTreeSet<String> = BTreeSet::new();
    let mut rejected: HashMap<String, Rejection> = HashMap::new();
    let mut reported_reject: BTreeSet<String> = BTreeSet::new();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut pending: HashMap<String, (String, String, PodStatus)> = HashMap::new();
    let mut sent_events: SentEvents = HashMap::new();
    // Static pods (uid → pod) and the mirror pods seen in the watch ((ns, name) → pod).
    let mut static_pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut mirrors: BTreeMap<(String, String), Pod> = BTreeMap::new();
    let static_opts = crate::source::manifest::StaticPodOptions {
        node_name: node_name.clone(),
        suffix_node_name: true,
    };
    let mut static_tick = tokio::time::interval(Duration::from_secs(2));
    // Pods handed to the workers, and when the others were first admitted.
    let mut handed: BTreeSet<String> = BTreeSet::new();
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut object_wait = tokio::time::interval(Duration::from_secs(3600));
    let mut tokens = TokenManager::default();
    let mut token_tick = tokio::time::interval(Duration::from_secs(1));
    let mut objects = Objects::default();
    let mut claims = Claims::default();
    let mut claim_tick = tokio::time::interval(CLAIM_RETRY);
    let (otx, mut orx) = mpsc::unbounded_channel();
    let mut status_rx = manager.as_ref().map(|m| m.subscribe());
    let mut flush = tokio::time::interval(Duration::from_millis(100));
    let mut resync = tokio::time::interval(Duration::from_secs(10));
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut node: Option<Node> = None;
    loop {
        let mut changed = false;
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(p))) => { pods.insert(uid_of(&p), p); changed = true; }
                Some(Ok(watcher::Event::Delete(p))) => {
                    if is_mirror(&p) {
                        mirrors.remove(&ns_name(&p));
                    }
                    pods.remove(&uid_of(&p));
                    changed = true;
                }
                Some(Ok(watcher::Event::Init)) => relist = Some(BTreeMap::new()),
                Some(Ok(watcher::Event::InitApply(p))) => { relist.get_or_insert_with(BTreeMap::new).insert(uid_of(&p), p); }
                Some(Ok(watcher::Event::InitDone)) => { pods = relist.take().unwrap_or_default(); changed = true; }
                Some(Err(e)) => {
                    tracing::warn!("pod watch: {e} (the watcher re-lists)");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None => {}
            },
            Some(ev) = orx.recv() => {
                match ev {
                    ObjEvent::ConfigMap(ns, n, o) => match o { Some(o) => { objects.config_maps.insert((ns, n), o); } None => { objects.config_maps.remove(&(ns, n)); } },
                    ObjEvent::Secret(ns, n, o) => match o { Some(o) => { objects.secrets.insert((ns, n), o); } None => { objects.secrets.remove(&(ns, n)); } },
                    ObjEvent::Listed(k) => { objects.synced.insert(k); }
                }
                changed = true;
            }
            ev = async { match status_rx.as_mut() { Some(r) => r.recv().await.ok(), None => std::future::pending().await } } => {
                if let Some(PodStatusEvent { uid, namespace, name, status, terminated }) = ev {
                    if terminated {
                        pending.remove(&uid);
                        if pods.get(&uid).is_some_and(|p| p.metadata.deletion_timestamp.is_some()) && deleted.insert(uid.clone()) {
                            final_delete(&ctx.client, &namespace, &name, &uid).await;
                        }
                    } else if let Some(p) = pods.get(&uid).cloned() {
                        pending.insert(uid, (namespace, name, status));
                        forward_events(&ctx, &p, &mut sent_events).await;
                    } else if static_pods.contains_key(&uid) {
                        // Status of a static pod goes to its mirror pod (with the mirror's UID).
                        if let Some(m) = mirrors.get(&(namespace.clone(), name.clone())) {
                            let muid = uid_of(m);
                            pending.insert(muid.clone(), (namespace, name, status));
                            let m = m.clone();
                            forward_events_for(&ctx, &m, &uid, &mut sent_events).await;
                        }
                    }
                }
            }
            _ = flush.tick() => {
                let batch: Vec<_> = pending.drain().collect();
                for (uid, (ns, name, st)) in batch {
                    if let Err(e) = patch_status(&ctx.client, &ns, &name, &uid, &st).await {
                        match e {
                            kube::Error::Api(r) if r.code == 404 || r.code == 409 => {}
                            e => { tracing::warn!("status of {ns}/{name}: {e}"); pending.entry(uid).or_insert((ns, name, st)); }
                        }
                    }
                }
            }
            _ = resync.tick() => changed = true,
            _ = claim_tick.tick(), if claims.any_unresolved() => changed = true,
            _ = object_wait.tick() => changed = true,
            _ = token_tick.tick(), if manager.is_some() => {
                let running: Vec<&Pod> = pods.values().filter(|p| handed.contains(&uid_of(p))).collect();
                changed = tokens.due(&running);
            }
            _ = static_tick.tick(), if ctx.node.pod_manifest_path.is_some() => {
                if let Some(dir) = &ctx.node.pod_manifest_path {
                    match crate::source::dir::load_dir(dir, &static_opts) {
                        Ok(l) => {
                            let now: BTreeMap<String, Pod> = l
                                .snapshot
                                .pods
                                .values()
                                .map(|sp| (sp.uid().to_string(), sp.pod.clone()))
                                .collect();
                            if now != static_pods {
                                static_pods = now;
                                changed = true;
                            }
                        }
                        Err(e) => tracing::warn!("static pods: {e}"),
                    }
                }
            }
        }
        if !changed {
            continue;
        }
        if let Ok(n) = nodes.get(&node_name).await {
            node = Some(n);
        }
        let Some(node) = node.as_ref() else { continue };
        // Mirror pods are the apiserver's view of static pods: never run them from the watch.
        let watched_mirrors: Vec<String> = pods
            .iter()
            .filter(|(_, p)| is_mirror(p))
            .map(|(u, _)| u.clone())
            .collect();
        for u in &watched_mirrors {
            if let Some(p) = pods.get(u) {
                mirrors.insert(ns_name(p), p.clone());
            }
        }
        for u in &watched_mirrors {
            pods.remove(u);
        }
        // Create missing mirror pods; delete mirrors whose static pod is gone.
        let mirror_api = |ns: &str| -> Api<Pod> { Api::namespaced(ctx.client.clone(), ns) };
        for sp in static_pods.values() {
            let key = ns_name(sp);
            if let std::collections::btree_map::Entry::Vacant(slot) = mirrors.entry(key.clone()) {
                match mirror_api(&key.0)
                    .create(&PostParams::default(), &mirror_of(sp, node))
                    .await
                {
                    Ok(m) => {
                        slot.insert(m);
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        if let Ok(m) = mirror_api(&key.0).get(&key.1).await {
                            if is_mirror(&m) {
                                slot.insert(m);
                            }
                        }
                    }
                    Err(e) => tracing::warn!("mirror pod {}/{}: {e}", key.0, key.1),
                }
            }
        }
        let wanted: BTreeSet<(String, String)> = static_pods.values().map(ns_name).collect();
        for (key, m) in &mirrors {
            if !wanted.contains(key) && ctx.node.pod_manifest_path.is_some() {
                let muid = uid_of(m);
                if deleted.insert(muid.clone()) {
                    final_delete(&ctx.client, &key.0, &key.1, &muid).await;
                }
            }
        }
        // Admission, oldest first (creationTimestamp), against pods already admitted.
        let mut order: Vec<&Pod> = pods.values().collect();
        order.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
        let mut newly_rejected = Vec::new();
        for p in &order {
            let uid = uid_of(p);
            if admitted.contains(&uid)
                || rejected.contains_key(&uid)
                || is_terminal(p)
                || p.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let others: Vec<&Pod> = order
                .iter()
                .filter(|o| admitted.contains(&uid_of(o)) && !is_terminal(o))
                .copied()
                .collect();
            let admitted_here = admit::admit(p, node, &others)
                .and_then(|()| manager.as_ref().map_or(Ok(()), |m| m.sysctls().admit(p)));
            match admitted_here {
                Ok(()) => {
                    admitted.insert(uid);
                }
                Err(r) => {
                    newly_rejected.push(((*p).clone(), r.clone()));
                    rejected.insert(uid, r);
                }
            }
        }
        for (p, r) in newly_rejected {
            let uid = uid_of(&p);
            if !reported_reject.insert(uid.clone()) {
                continue;
            }
            tracing::info!(pod = %p.metadata.name.as_deref().unwrap_or(""), reason = %r.reason, "pod rejected");
            let (ns, name) = ns_name(&p);
            let st = PodStatus {
                phase: Some("Failed".into()),
                reason: Some(r.reason.clone()),
                message: Some(r.message.clone()),
                start_time: Some(Time(Utc::now())),
                host_ip: ctx.facts.internal_ip.map(|i| i.to_string()),
                ..Default::default()
            };
            if let Err(e) = patch_status(&ctx.client, &ns, &name, &uid, &st).await {
                tracing::warn!("rejecting {ns}/{name}: {e}");
                reported_reject.remove(&uid);
            }
            event(
                &ctx.client,
                &p,
                &node_name,
                "Warning",
                &r.reason,
                &r.message,
            )
            .await;
        }
        // Pods being deleted that have no worker (never admitted) are removed right away.
        for p in pods.values() {
            let uid = uid_of(p);
            let has_worker = manager.is_some() && admitted.contains(&uid);
            if p.metadata.deletion_timestamp.is_some() && !has_worker && deleted.insert(uid.clone())
            {
                let (ns, name) = ns_name(p);
                final_delete(&ctx.client, &ns, &name, &uid).await;
            }
        }
        // Forget pods that are gone from the apiserver.
        admitted.retain(|u| pods.contains_key(u));
        rejected.retain(|u, _| pods.contains_key(u));
        reported_reject.retain(|u| pods.contains_key(u));
        deleted.retain(|u| pods.contains_key(u) || mirrors.values().any(|m| uid_of(m) == *u));
        sent_events.retain(|k, _| pods.contains_key(&k.0) || static_pods.contains_key(&k.0));
        // ConfigMaps and Secrets of the admitted pods: watch each by name.
        let mut want: BTreeSet<ObjKey> = BTreeSet::new();
        for p in pods.values().filter(|p| admitted.contains(&uid_of(p))) {
            want.extend(object_refs(p));
        }
        objects.watchers.retain(|k, h| {
            let keep = want.contains(k);
            if !keep {
                h.abort();
            }
            keep
        });
        objects.synced.retain(|k| want.contains(k));
        for k in want {
            if let std::collections::hash_map::Entry::Vacant(e) = objects.watchers.entry(k) {
                let h = spawn_object_watch(watch_client.clone(), e.key().clone(), otx.clone());
                e.insert(h);
            }
        }
        // Their PersistentVolumeClaims and PersistentVolumes: read by name.
        if manager.is_some() {
            let want: BTreeSet<(String, String)> = pods
                .values()
                .filter(|p| {
                    admitted.contains(&uid_of(p)) && p.metadata.deletion_timestamp.is_none()
                })
                .flat_map(claim_refs)
                .collect();
            claims.refresh(&ctx.client, &want).await;
        }
        if let Ok(mut store) = ctx.pods.write() {
            // What the kubelet API serves: the bound pods and the mirrors of the static pods
            // (their containers are found under the static pod's UID).
            let mut all = pods.clone();
            for (key, m) in &mirrors {
                if wanted.contains(key) {
                    all.insert(uid_of(m), m.clone());
                }
            }
            *store = all;
        }
        if let Some(m) = &manager {
            // A pod goes to the workers once the objects it references were listed (or after
            // OBJECT_WAIT), with its ServiceAccount tokens already requested, so that its
            // first volume setup and image pull see them; afterwards it stays.
            first_seen.retain(|u, _| admitted.contains(u));
            let mut waiting = false;
            for p in pods.values().filter(|p| admitted.contains(&uid_of(p))) {
                let uid = uid_of(p);
                if handed.contains(&uid) {
                    continue;
                }
                let since = *first_seen.entry(uid.clone()).or_insert_with(Instant::now);
                let listed = object_refs(p).iter().all(|k| objects.synced.contains(k))
                    && claim_refs(p).iter().all(|k| claims.fetched.contains_key(k));
                if listed || since.elapsed() >= OBJECT_WAIT {
                    handed.insert(uid);
                } else {
                    waiting = true;
                }
            }
            handed.retain(|u| admitted.contains(u));
            if waiting {
                object_wait.reset_after(Duration::from_millis(500));
            }
            let running: Vec<&Pod> = pods
                .values()
                .filter(|p| handed.contains(&uid_of(p)))
                .collect();
            if tokens.sync(&ctx, &running).await {
                m.set_tokens(tokens.tokens());
            }
            let desired = DesiredState {
                pods: pods
                    .values()
                    .filter(|p| handed.contains(&uid_of(p)))
                    .chain(static_pods.values())
                    .cloned()
                    .collect(),
                config_maps: objects.config_maps.values().cloned().collect(),
                secrets: objects.secrets.values().cloned().collect(),
                claims: claims.claims.values().cloned().collect(),
                persistent_volumes: claims.volumes.values().cloned().collect(),
                node: Some(node.clone()),
            };
            m.sync(desired);
        }
    }
}
