//! Cluster mode (`--kubeconfig`): registers this machine as a Node of a kube-apiserver, keeps
//! its Lease and status fresh, and runs the overlay controller. Effectful (kube client, tokio,
//! netlink through `hako_cni::overlay`); the objects it sends are built by the pure `node` and
//! `overlay` modules.

pub mod admit;
pub mod auth;
pub mod facts;
pub mod kubelet_api;
pub mod node;
pub mod overlay;
mod pods;
pub mod proxy;
pub mod spdy;
pub mod stats;
pub mod stream;
mod tokens;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::chrono::Utc;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

use node::{NodeConfig, NodeFacts};

/// Cluster-mode options (flattened into the `hako-agent` command line).
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Join the cluster of this kubeconfig (node credentials: CN=system:node:<name>,
    /// O=system:nodes) and run as its Node.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Extra node labels, `key=value,...`.
    #[arg(long, value_name = "LABELS", default_value = "")]
    pub node_labels: String,
    /// Taints set when the Node is first created, `key=value:Effect,...`.
    #[arg(long, value_name = "TAINTS", default_value = "")]
    pub register_with_taints: String,
    /// Resources reserved for the system, `cpu=100m,memory=256Mi,ephemeral-storage=1Gi`.
    #[arg(long, value_name = "RESOURCES", default_value = "")]
    pub system_reserved: String,
    /// Hard eviction thresholds (they also drive the pressure conditions).
    #[arg(long, value_name = "THRESHOLDS", default_value = node::DEFAULT_EVICTION_HARD)]
    pub eviction_hard: String,
    /// Pod capacity of the node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Seconds between Lease renewals (lease duration is 4×).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub node_lease_renew_interval: u64,
    /// Seconds between node status computations (a report is sent when it changed).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub node_status_update_frequency: u64,
    /// Seconds after which an unchanged node status is reported anyway.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub node_status_report_frequency: u64,
    /// Run the VXLAN overlay controller (device, subnet file, peers from all Nodes).
    #[arg(long)]
    pub overlay: bool,
    /// Pod CIDR of this node when the controller-manager does not allocate one
    /// (repeatable for dual stack; published as the `hako.dev/pod-cidr` annotation).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidr: Vec<IpNet>,
    /// Cluster pod network(s) written to the subnet file (HAKO_NETWORK).
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    pub cluster_cidr: Vec<IpNet>,
    /// Subnet file for the CNI plugin.
    #[arg(long, value_name = "FILE", default_value = "/run/hako/subnet.env")]
    pub subnet_file: PathBuf,
    /// VXLAN device name.
    #[arg(long, default_value = "hako.1")]
    pub overlay_device: String,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    pub overlay_vni: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = 4789)]
    pub overlay_port: u16,
    /// Underlay interface (default: the default-route interface).
    #[arg(long, value_name = "IFACE")]
    pub overlay_interface: Option<String>,
    /// kubelet API port (TLS; 0 disables it).
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// kubelet API listen address.
    #[arg(long, default_value = "0.0.0.0")]
    pub kubelet_address: IpAddr,
    /// kubelet API serving certificate (PEM); default: self-signed in <root-dir>/pki.
    #[arg(long, value_name = "FILE", requires = "tls_private_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Key of --tls-cert-file (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle for kubelet API client certificates (CN = user, O = groups).
    #[arg(long, value_name = "FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// kubelet API: how long a successful TokenReview is cached (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub authentication_token_webhook_cache_ttl: u64,
    /// kubelet API: how long a failed TokenReview is cached (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub authentication_token_webhook_failure_cache_ttl: u64,
    /// kubelet API: how long an allowed SubjectAccessReview is cached (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub authorization_webhook_cache_authorized_ttl: u64,
    /// kubelet API: how long a denied SubjectAccessReview is cached (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub authorization_webhook_cache_unauthorized_ttl: u64,
    /// kubelet API: TokenReviews of uncached tokens per second; beyond it (and its burst of
    /// twice as many) requests with unknown tokens get 429.
    #[arg(long, value_name = "PER_SECOND", default_value_t = 10.0)]
    pub authentication_token_review_qps: f64,
    /// kubelet API: connections served at once (more are closed on accept).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub kubelet_max_connections: usize,
    /// In-agent proxier (`--proxy-mode`): Prometheus metrics address, kube-proxy's
    /// `--metrics-bind-address` ("" disables).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub proxy_metrics_bind_address: String,
    /// In-agent proxier: `/healthz` address, kube-proxy's `--healthz-bind-address` ("" disables).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub proxy_healthz_bind_address: String,
}

/// A cluster-mode failure that stops start-up (runtime failures are retried, never fatal).
#[derive(Debug, Error)]
pub enum ClusterError {
    /// Bad flag.
    #[error(transparent)]
    Flag(#[from] node::FlagError),
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, String),
    /// The kubelet API could not start.
    #[error("kubelet API: {0}")]
    KubeletApi(kubelet_api::ApiError),
    /// The async runtime could not start.
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// The in-agent proxier (`--proxy-mode`) could not start.
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
}

/// Settings cluster mode shares with the rest of the agent's command line.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Node name.
    pub node_name: String,
    /// State directory (its filesystem is the node filesystem for capacity and pressure).
    pub root_dir: PathBuf,
    /// InternalIP (default: the IPv4 address of the default-route interface).
    pub node_ip: Option<IpAddr>,
    /// CNI configuration directory: the node is Ready once it holds a network config.
    pub cni_conf_dir: PathBuf,
    /// CRI log root (`/var/log/pods`) for the kubelet API's container logs.
    pub pod_log_dir: PathBuf,
    /// Static pod manifests (`--pod-manifest-path`): run and mirrored to the apiserver.
    pub pod_manifest_path: Option<PathBuf>,
    /// In-agent proxier (`--proxy-mode`; [`crate::services::ProxyMode::None`]: off, for
    /// hako-proxy or kube-proxy to run instead).
    pub proxy_mode: crate::services::ProxyMode,
    /// iptables flavour of the proxier ("", "nft", "legacy").
    pub iptables_variant: String,
}

/// Everything the loops share.
struct Ctx {
    client: Client,
    cfg: NodeConfig,
    facts: NodeFacts,
    args: ClusterArgs,
    node: NodeSettings,
    /// The overlay is configured (NetworkUnavailable=False).
    overlay_ready: AtomicBool,
    /// Pods bound to this node, as last seen (for the kubelet API).
    pods: kubelet_api::PodStore,
}

/// Exponential back-off from 200 ms to `max`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(200),
            max,
        }
    }
    fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(200);
    }
}

async fn client_from(path: &Path, timeout: Option<Duration>) -> Result<Client, ClusterError> {
    let err = |e: String| ClusterError::Kubeconfig(path.to_path_buf(), e);
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    if let Some(t) = timeout {
        cfg.read_timeout = Some(t);
        cfg.write_timeout = Some(t);
        cfg.connect_timeout = Some(t);
    }
    Client::try_from(cfg).map_err(|e| err(e.to_string()))
}

/// Parses the flags into the node configuration.
pub fn node_config(args: &ClusterArgs, node_name: &str) -> Result<NodeConfig, ClusterError> {
    Ok(NodeConfig {
        name: node_name.to_string(),
        labels: node::parse_labels(&args.node_labels)?,
        taints: node::parse_taints(&args.register_with_taints)?,
        reserved: node::parse_reserved(&args.system_reserved)?,
        max_pods: args.max_pods,
        eviction: node::parse_eviction(&args.eviction_hard)?,
        version: env!("CARGO_PKG_VERSION").to_string(),
        kubelet_port: i32::from(if args.kubelet_port == 0 {
            10250
        } else {
            args.kubelet_port
        }),
    })
}

/// Runs cluster mode until the process is killed. Returns only on a start-up error.
/// `workers` runs the admitted pods (None: pods are admitted or rejected and reported, but
/// nothing is started).
pub fn run(
    args: &ClusterArgs,
    node: &NodeSettings,
    workers: Option<crate::worker::AgentConfig>,
) -> Result<(), ClusterError> {
    // Blocking pool bounded as in standalone mode: a burst of 100 pod starts or deletions
    // otherwise grew it to a thread per call (100+ threads, each with its malloc arena).
    // Calls that wait for long (exec sessions, container stops) do not hold pool threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_keep_alive(Duration::from_secs(5))
        .enable_all()
        .build()
        .map_err(ClusterError::Runtime)?;
    rt.block_on(run_async(args.clone(), node.clone(), workers))
}

/// Async form of [`run`].
pub async fn run_async(
    args: ClusterArgs,
    node: NodeSettings,
    workers: Option<crate::worker::AgentConfig>,
) -> Result<(), ClusterError> {
    let Some(path) = args.kubeconfig.clone() else {
        return Err(ClusterError::Kubeconfig(
            PathBuf::new(),
            "no --kubeconfig".into(),
        ));
    };
    let cfg = node_config(&args, &node.node_name)?;
    // Short timeouts for the heartbeat paths: a hung apiserver must not stall the Lease.
    let client = client_from(&path, Some(Duration::from_secs(10))).await?;
    let watch_client = client_from(&path, None).await?;
    let facts = facts::gather(node.node_ip, &node.node_name, &node.root_dir);
    tracing::info!(node = %node.node_name, ip = ?facts.internal_ip, "joining the cluster");
    let ctx = Arc::new(Ctx {
        client,
        cfg,
        facts,
        args,
        node,
        overlay_ready: AtomicBool::new(false),
        pods: Default::default(),
    });
    if ctx.args.kubelet_port != 0 {
        let mut sans = vec![ctx.cfg.name.clone(), "localhost".into(), "127.0.0.1".into()];
        sans.extend(ctx.facts.internal_ip.map(|i| i.to_string()));
        let opts = kubelet_api::ApiOptions {
            addr: std::net::SocketAddr::new(ctx.args.kubelet_address, ctx.args.kubelet_port),
            cert: ctx
                .args
                .tls_cert_file
                .clone()
                .zip(ctx.args.tls_private_key_file.clone()),
            pki_dir: ctx.node.root_dir.join("pki"),
            sans,
            pod_log_dir: ctx.node.pod_log_dir.clone(),
            node_name: ctx.cfg.name.clone(),
            client_ca: ctx.args.client_ca_file.clone(),
            root_dir: ctx.node.root_dir.clone(),
            shim: workers.as_ref().map(|w| w.shim.clone()),
            run_dir: workers.as_ref().map(|w| w.run_dir.clone()),
            auth: auth::AuthOptions {
                authn_ttl: Duration::from_secs(ctx.args.authentication_token_webhook_cache_ttl),
                authn_failure_ttl: Duration::from_secs(
                    ctx.args.authentication_token_webhook_failure_cache_ttl,
                ),
                authz_allowed_ttl: Duration::from_secs(
                    ctx.args.authorization_webhook_cache_authorized_ttl,
                ),
                authz_denied_ttl: Duration::from_secs(
                    ctx.args.authorization_webhook_cache_unauthorized_ttl,
                ),
                review_rate: ctx.args.authentication_token_review_qps.max(0.1),
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                review_burst: (ctx.args.authentication_token_review_qps * 2.0).clamp(1.0, 10_000.0)
                    as u32,
                ..Default::default()
            },
            limits: kubelet_api::Limits {
                max_connections: ctx.args.kubelet_max_connections,
                ..Default::default()
            },
        };
        kubelet_api::start(ctx.client.clone(), opts, ctx.pods.clone())
            .await
            .map_err(ClusterError::KubeletApi)?;
    }
    if ctx.node.proxy_mode != crate::services::ProxyMode::None {
        let popts = proxy::ProxyOptions {
            mode: ctx.node.proxy_mode,
            kubeconfig: path.clone(),
            node_name: ctx.cfg.name.clone(),
            iptables_variant: ctx.node.iptables_variant.clone(),
            cluster_cidr: proxy::masquerade_cidr(&ctx.args.cluster_cidr, &ctx.args.pod_cidr),
            min_sync_period: Duration::from_secs(1),
            metrics_addr: proxy::bind_address(&ctx.args.proxy_metrics_bind_address)?,
            healthz_addr: proxy::bind_address(&ctx.args.proxy_healthz_bind_address)?,
        };
        // Blocking start-up (backend, watchers) off the async workers.
        tokio::task::spawn_blocking(move || proxy::start(popts))
            .await
            .map_err(|e| {
                ClusterError::Proxy(proxy::ProxyError::Thread(std::io::Error::other(e)))
            })??;
    }
    let status = tokio::spawn(status_loop(ctx.clone()));
    let lease = tokio::spawn(lease_loop(ctx.clone()));
    // The Downward API's status.hostIP(s) and the pods' hostIP are the Node's InternalIP.
    let manager = workers.map(|mut w| {
        if let Some(ip) = ctx.facts.internal_ip {
            w.host_ip = Some(ip.to_string());
        }
        crate::worker::PodManager::new(w)
    });
    let pods = tokio::spawn(pods::pod_loop(ctx.clone(), watch_client.clone(), manager));
    let overlay = if ctx.args.overlay {
        Some(tokio::spawn(overlay_loop(ctx.clone(), watch_client)))
    } else {
        None
    };
    // The loops never return; a panic in one is logged and the process keeps the others.
    let _ = status.await;
    let _ = lease.await;
    let _ = pods.await;
    if let Some(o) = overlay {
        let _ = o.await;
    }
    Ok(())
}

fn current_status(ctx: &Ctx, prev: &[k8s_openapi::api::core::v1::NodeCondition]) -> NodeStatus {
    let m = facts::measure(&ctx.node.root_dir);
    let p = node::pressure(&ctx.cfg.eviction, &m);
    let cni = facts::cni_config_present(&ctx.node.cni_conf_dir);
    let not_ready = node::network_not_ready_reason(cni);
    let net_unavailable = if ctx.args.overlay {
        (!ctx.overlay_ready.load(Ordering::Relaxed))
            .then(|| "the hako overlay is not configured yet".to_string())
    } else {
        not_ready.clone()
    };
    let conds = node::conditions(
        p,
        not_ready.as_deref(),
        net_unavailable.as_deref(),
        Utc::now(),
        prev,
    );
    node::node_status(&ctx.cfg, &ctx.facts, conds)
}

/// Creates the Node, or patches labels/annotations of an existing one (taints are only set
/// at creation, as NodeRestriction forbids a node to change them). Returns the Node's UID.
async fn register(ctx: &Ctx, status: &NodeStatus) -> Result<String, kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let want = node::registration(&ctx.cfg, &ctx.facts, status.clone());
    match api.create(&PostParams::default(), &want).await {
        Ok(n) => {
            tracing::info!(node = %ctx.cfg.name, "node registered");
            return Ok(n.metadata.uid.unwrap_or_default());
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let patch = serde_json::json!({"metadata": {
        "labels": want.metadata.labels, "annotations": want.metadata.annotations}});
    let n = api
        .patch(
            &ctx.cfg.name,
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await?;
    tracing::info!(node = %ctx.cfg.name, "node exists; labels updated");
    Ok(n.metadata.uid.unwrap_or_default())
}

async fn send_status(ctx: &Ctx, status: &NodeStatus) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        &ctx.cfg.name,
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await
    .map(|_| ())
}

async fn status_loop(ctx: Arc<Ctx>) {
    let every = Duration::from_secs(ctx.args.node_status_update_frequency.max(1));
    let report_every = Duration::from_secs(ctx.args.node_status_report_frequency.max(1));
    let mut backoff = Backoff::new(every);
    let mut registered = false;
    let mut last: Option<(NodeStatus, Instant)> = None;
    loop {
        let prev = last
            .as_ref()
            .and_then(|(s, _)| s.conditions.clone())
            .unwrap_or_default();
        let st = current_status(&ctx, &prev);
        if !registered {
            match register(&ctx, &st).await {
                Ok(_) => registered = true,
                Err(e) => {
                    let d = backoff.fail();
                    tracing::warn!("node registration failed (retry in {d:?}): {e}");
                    tokio::time::sleep(d).await;
                    continue;
                }
            }
        }
        let due = match &last {
            None => true,
            Some((s, at)) => node::status_changed(s, &st) || at.elapsed() >= report_every,
        };
        if due {
            match send_status(&ctx, &st).await {
                Ok(()) => {
                    backoff.reset();
                    last = Some((st, Instant::now()));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    tracing::warn!("node object is gone; registering again");
                    registered = false;
                    continue;
                }
                Err(e) => {
                    let d = backoff.fail();
                    tracing::warn!("node status update failed (retry in {d:?}): {e}");
                    tokio::time::sleep(d).await;
                    continue;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

const LEASE_NS: &str = "kube-node-lease";

fn new_lease(ctx: &Ctx, node_uid: Option<&str>) -> Lease {
    let renew = Duration::from_secs(ctx.args.node_lease_renew_interval.max(1));
    let secs = i32::try_from(renew.as_secs().saturating_mul(4)).unwrap_or(40);
    Lease {
        metadata: ObjectMeta {
            name: Some(ctx.cfg.name.clone()),
            namespace: Some(LEASE_NS.into()),
            owner_references: node_uid.filter(|u| !u.is_empty()).map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: ctx.cfg.name.clone(),
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(ctx.cfg.name.clone()),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(Utc::now())),
            ..Default::default()
        }),
    }
}

/// One renewal: update the cached lease (optimistic concurrency), or fetch/create it.
async fn renew(ctx: &Ctx, cached: &mut Option<Lease>) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NS);
    if let Some(mut l) = cached.take() {
        if l.metadata.owner_references.is_none() {
            // The lease may predate the Node (both start together): own it once the Node exists,
            // so it is garbage-collected with the Node.
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            if let Some(uid) = nodes
                .get_opt(&ctx.cfg.name)
                .await?
                .and_then(|n| n.metadata.uid)
            {
                l.metadata.owner_references = new_lease(ctx, Some(&uid)).metadata.owner_references;
            }
        }
        let renew_s =
            i32::try_from(ctx.args.node_lease_renew_interval.saturating_mul(4)).unwrap_or(40);
        let spec = l.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(MicroTime(Utc::now()));
        spec.holder_identity = Some(ctx.cfg.name.clone());
        spec.lease_duration_seconds = Some(renew_s);
        match api.replace(&ctx.cfg.name, &PostParams::default(), &l).await {
            Ok(n) => {
                *cached = Some(n);
                return Ok(());
            }
            // Conflict or gone: fall through to a fresh read.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    match api.get_opt(&ctx.cfg.name).await? {
        Some(mut l) => {
            let spec = l.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(MicroTime(Utc::now()));
            spec.holder_identity = Some(ctx.cfg.name.clone());
            *cached = Some(
                api.replace(&ctx.cfg.name, &PostParams::default(), &l)
                    .await?,
            );
        }
        None => {
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            let uid = nodes
                .get_opt(&ctx.cfg.name)
                .await?
                .and_then(|n| n.metadata.uid);
            *cached = Some(
                api.create(&PostParams::default(), &new_lease(ctx, uid.as_deref()))
                    .await?,
            );
        }
    }
    Ok(())
}

async fn lease_loop(ctx: Arc<Ctx>) {
    let every = Duration::from_secs(ctx.args.node_lease_renew_interval.max(1));
    let mut backoff = Backoff::new(every);
    let mut cached: Option<Lease> = None;
    let mut failing = false;
    loop {
        match renew(&ctx, &mut cached).await {
            Ok(()) => {
                if failing {
                    tracing::info!("lease renewal recovered");
                }
                failing = false;
                backoff.reset();
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                cached = None;
                let d = backoff.fail();
                if !failing {
                    tracing::warn!("lease renewal failed (retrying with back-off): {e}");
                }
                failing = true;
                tokio::time::sleep(d).await;
            }
        }
    }
}

fn overlay_cfg(ctx: &Ctx) -> hako_cni::overlay::OverlayConfig {
    hako_cni::overlay::OverlayConfig {
        dev: ctx.args.overlay_device.clone(),
        vni: ctx.args.overlay_vni,
        port: ctx.args.overlay_port,
        underlay_if: ctx.args.overlay_interface.clone(),
        underlay_ip: ctx.node.node_ip,
        state_dir: ctx.node.root_dir.join("overlay"),
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    hako_shim::durable::write_file(path, text.as_bytes(), 0o644)
}

/// Overlay controller: device, subnet file and own annotations once the pod CIDR is known,
/// then peers converged from a watch of all Nodes (and resynced every minute).
async fn overlay_loop(ctx: Arc<Ctx>, watch_client: Client) {
    use kube::runtime::watcher;
    let nodes_api: Api<Node> = Api::all(watch_client);
    let own: Api<Node> = Api::all(ctx.client.clone());
    let ocfg = overlay_cfg(&ctx);
    let mut backoff = Backoff::new(Duration::from_secs(30));
    let mut known: BTreeMap<String, Node> = BTreeMap::new();
    let mut configured = false;
    let mut stream = watcher(nodes_api.clone(), watcher::Config::default()).boxed();
    let mut resync = tokio::time::interval(Duration::from_secs(60));
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut relist: Option<BTreeMap<String, Node>> = None;
    loop {
        let changed = tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(n))) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    known.insert(name, n);
                    true
                }
                Some(Ok(watcher::Event::Delete(n))) => {
                    known.remove(n.metadata.name.as_deref().unwrap_or(""));
                    true
                }
                Some(Ok(watcher::Event::Init)) => {
                    relist = Some(BTreeMap::new());
                    false
                }
                Some(Ok(watcher::Event::InitApply(n))) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    relist.get_or_insert_with(BTreeMap::new).insert(name, n);
                    false
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // A (re)list is complete: it replaces what was known, so nodes deleted
                    // while the watch was down are dropped too.
                    known = relist.take().unwrap_or_default();
                    true
                }
                Some(Err(e)) => {
                    let d = backoff.fail();
                    tracing::warn!("node watch failed (retry in {d:?}): {e}");
                    tokio::time::sleep(d).await;
                    false
                }
                None => {
                    stream = watcher(nodes_api.clone(), watcher::Config::default()).boxed();
                    false
                }
            },
            _ = resync.tick() => true,
            _ = retry.tick(), if !configured => true,
        };
        if !changed {
            continue;
        }
        backoff.reset();
        if !configured {
            match configure(&ctx, &ocfg, &own, known.get(&ctx.cfg.name)).await {
                Ok(true) => {
                    configured = true;
                    ctx.overlay_ready.store(true, Ordering::Relaxed);
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("overlay setup failed (retrying): {e}");
                    continue;
                }
            }
        }
        let all: Vec<Node> = known.values().cloned().collect();
        let peers = overlay::peers(&all, &ctx.cfg.name);
        let cfg2 = ocfg.clone();
        match tokio::task::spawn_blocking(move || hako_cni::overlay::sync_peers(&cfg2, &peers))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("overlay peer sync failed: {e}"),
            Err(e) => tracing::warn!("overlay peer sync panicked: {e}"),
        }
    }
}

/// Sets the overlay up once the pod CIDR is known: VXLAN device, subnet file, annotations.
/// Ok(false) while the pod CIDR is not known yet.
async fn configure(
    ctx: &Ctx,
    ocfg: &hako_cni::overlay::OverlayConfig,
    own: &Api<Node>,
    me: Option<&Node>,
) -> Result<bool, String> {
    let from_flag = !ctx.args.pod_cidr.is_empty();
    let cidrs: Vec<IpNet> = if from_flag {
        ctx.args.pod_cidr.clone()
    } else {
        let Some(n) = me else { return Ok(false) };
        let spec_cidrs: Vec<IpNet> = n
            .spec
            .as_ref()
            .map(|s| {
                s.pod_cidrs
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .chain(s.pod_cidr.clone())
                    .filter_map(|c| c.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut v = spec_cidrs;
        v.dedup();
        if v.is_empty() {
            tracing::info!("waiting for spec.podCIDR (or pass --pod-cidr)");
            return Ok(false);
        }
        v
    };
    let c2 = ocfg.clone();
    let dev = tokio::task::spawn_blocking(move || hako_cni::overlay::ensure_device(&c2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let text = overlay::subnet_env(&ctx.args.cluster_cidr, &cidrs, dev.mtu);
    write_atomic(&ctx.args.subnet_file, &text)
        .map_err(|e| format!("writing {}: {e}", ctx.args.subnet_file.display()))?;
    let mut ann = serde_json::Map::new();
    ann.insert(
        overlay::ANN_VTEP_MAC.into(),
        overlay::fmt_mac(&dev.mac).into(),
    );
    ann.insert(
        overlay::ANN_PUBLIC_IP.into(),
        dev.local_ip.to_string().into(),
    );
    if from_flag {
        let list: Vec<String> = cidrs.iter().map(|c| c.trunc().to_string()).collect();
        ann.insert(overlay::ANN_POD_CIDR.into(), list.join(",").into());
    }
    own.patch(
        &ctx.cfg.name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": ann}})),
    )
    .await
    .map_err(|e| format!("annotating node: {e}"))?;
    tracing::info!(dev = %dev.name, mac = %overlay::fmt_mac(&dev.mac), ip = %dev.local_ip,
        subnet_file = %ctx.args.subnet_file.display(), "overlay configured");
    Ok(true)
}
