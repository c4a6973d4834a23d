//! Cluster mode (`--kubeconfig`): the wiring that joins this machine to a kube-apiserver.
//! [`registrar`] registers the Node and keeps its status fresh, [`lease`] renews its Lease,
//! [`network`] runs the overlay controller; pods come through [`crate::source::apiserver`].
//! Effectful (kube client, tokio); the objects sent are built by the pure
//! [`crate::model::node_object`] and [`overlay`].

pub mod facts;
mod lease;
mod network;
pub mod overlay;
mod registrar;
pub mod tokens;

use crate::api::{auth, kubelet_api};
use crate::model::node_object;
use crate::proxy::cluster as proxy;
use crate::source::apiserver;

use ipnet::IpNet;
use kube::Client;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

use node_object::{NodeConfig, NodeFacts};

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
    #[arg(long, value_name = "THRESHOLDS", default_value = node_object::DEFAULT_EVICTION_HARD)]
    pub eviction_hard: String,
    /// The other eviction flags (soft thresholds, grace periods, minimum reclaim, pressure
    /// transition period, monitoring interval).
    #[command(flatten)]
    pub eviction: crate::eviction::EvictionArgs,
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
    Flag(#[from] node_object::FlagError),
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, String),
    /// A bad eviction flag.
    #[error(transparent)]
    Eviction(#[from] crate::eviction::EvictionConfigError),
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
    /// In-agent proxier (`--proxy-mode`; [`crate::proxy::standalone::ProxyMode::None`]: off, for
    /// hako-proxy or kube-proxy to run instead).
    pub proxy_mode: crate::proxy::standalone::ProxyMode,
    /// iptables flavour of the proxier ("", "nft", "legacy").
    pub iptables_variant: String,
}

/// Everything the loops share.
pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) cfg: NodeConfig,
    pub(crate) facts: NodeFacts,
    pub(crate) args: ClusterArgs,
    pub(crate) node: NodeSettings,
    /// The overlay is configured (NetworkUnavailable=False).
    pub(crate) overlay_ready: AtomicBool,
    /// Pods bound to this node, as last seen (for the kubelet API).
    pub(crate) pods: kubelet_api::PodStore,
    /// The pressure conditions of the eviction manager.
    pub(crate) pressure: Arc<crate::eviction::NodePressure>,
}

/// Exponential back-off from 200 ms to `max`.
pub(crate) struct Backoff {
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
        labels: node_object::parse_labels(&args.node_labels)?,
        taints: node_object::parse_taints(&args.register_with_taints)?,
        reserved: node_object::parse_reserved(&args.system_reserved)?,
        max_pods: args.max_pods,
        eviction: node_object::parse_eviction(&args.eviction_hard)?,
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
    let worker_shim = workers
        .as_ref()
        .map(|w| (w.shim.clone(), w.run_dir.clone()));
    // The Downward API's status.hostIP(s) and the pods' hostIP are the Node's InternalIP.
    let manager = workers.map(|mut w| {
        if let Some(ip) = facts.internal_ip {
            w.host_ip = Some(ip.to_string());
        }
        crate::worker::PodManager::new(w)
    });
    // The pressure conditions come from the pod manager's eviction manager; without pod
    // workers an eviction manager runs for the conditions alone.
    let pressure = match &manager {
        Some(m) => m.pressure(),
        None => {
            let p = Arc::new(crate::eviction::NodePressure::default());
            let ecfg = crate::eviction::EvictionConfig::from_flags(
                &args.eviction_hard,
                &args.eviction,
                true,
            )?;
            let paths = crate::eviction::EvictionPaths {
                root_dir: node.root_dir.clone(),
                image_dir: node.root_dir.join("images"),
                pod_log_dir: node.pod_log_dir.clone(),
                cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            };
            let em = crate::eviction::EvictionManager::new(
                ecfg,
                paths,
                p.clone(),
                None,
                None,
                Arc::new(crate::eviction::NoReclaim),
            );
            tokio::spawn(em.run());
            p
        }
    };
    let ctx = Arc::new(Ctx {
        client,
        cfg,
        facts,
        args,
        node,
        overlay_ready: AtomicBool::new(false),
        pods: Default::default(),
        pressure,
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
            shim: worker_shim.as_ref().map(|w| w.0.clone()),
            run_dir: worker_shim.as_ref().map(|w| w.1.clone()),
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
    if ctx.node.proxy_mode != crate::proxy::standalone::ProxyMode::None {
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
    let status = tokio::spawn(registrar::status_loop(ctx.clone()));
    let lease = tokio::spawn(lease::lease_loop(ctx.clone()));
    let _services = manager
        .clone()
        .map(|m| apiserver::spawn_service_feed(watch_client.clone(), m));
    let pods = tokio::spawn(apiserver::pod_loop(
        ctx.clone(),
        watch_client.clone(),
        manager,
    ));
    let overlay = if ctx.args.overlay {
        Some(tokio::spawn(network::overlay_loop(
            ctx.clone(),
            watch_client,
        )))
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
