//! `hako-agent`: command-line entry point (effectful: reads the manifest directory and the pod
//! records under the root dir; prints to stdout, which is the user interface).
#![allow(clippy::print_stdout)]

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use hako_agent::cli::render;
use hako_agent::model::{actions, dns, env, observed, qos, record, status};
use hako_agent::source::dir as source;
use hako_agent::source::manifest::{SourceEvent, SourcedPod, StaticPodOptions};
use hako_agent::sys::state;
use hako_proxier::logging::LogFormat;
use k8s_openapi::chrono::Utc;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// hako node agent (kubelet-like).
///
/// With --pod-manifest-path it runs the Pods described in the directory the way the kubelet
/// runs static pods: sandbox (namespaces + CNI), images, containers through hako-shim, probes,
/// hooks, restart policy and back-off; status in <root>/pods/<uid>/status.json. With --dry-run
/// it only loads, validates and prints what it would run.
#[derive(Parser, Debug)]
#[command(name = "hako-agent", version, about, long_about)]
struct Cli {
    /// A KubeletConfiguration (kubelet.config.k8s.io/v1beta1, YAML or JSON, such as kubeadm's
    /// /var/lib/kubelet/config.yaml) for the fields hako has flags for (see agent/README.md,
    /// "Usage"). Flags given on the command line override the file, as with the kubelet;
    /// fields hako does not implement are logged once and ignored.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format: text (plain, colour only on a terminal) or json (the kubelet's
    /// --logging-format).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// Log verbosity (klog's -v): 0-2 info, 3-4 debug, 5 trace for hako's crates, 6+ trace
    /// for all. Without it RUST_LOG applies (default info).
    #[arg(short = 'v', long = "v", value_name = "N", global = true)]
    verbosity: Option<u8>,
    /// Remove every rule, chain, set, table, IPVS service and dummy device that any proxy
    /// mode (iptables, ipvs, nftables; the agent's, hako-proxy's or kube-proxy's) left in this
    /// network namespace, then exit (hako-proxy --cleanup).
    #[arg(long)]
    cleanup_proxier: bool,
    /// Directory of Pod/ConfigMap/Secret/Service manifests (YAML or JSON, multi-document).
    #[arg(long, value_name = "DIR")]
    pod_manifest_path: Option<PathBuf>,
    /// State directory: pod records live in <root>/pods/<uid>/status.json.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/hako",
        global = true
    )]
    root_dir: PathBuf,
    /// Node name (spec.nodeName; static pod names get "-<node>" appended, like the kubelet).
    #[arg(long, default_value_t = default_node_name())]
    hostname_override: String,
    /// Cluster DNS server IP (repeatable) for dnsPolicy ClusterFirst.
    #[arg(long = "cluster-dns", value_name = "IP")]
    cluster_dns: Vec<String>,
    /// Cluster domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Host resolv.conf used by dnsPolicy Default.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Node memory capacity in bytes for the Burstable oom_score_adj formula (default: /proc/meminfo).
    #[arg(long)]
    memory_capacity: Option<i128>,
    /// After the dry run, keep polling the manifest directory every SECONDS and print the
    /// add/update/delete events and newly rejected documents (still runs nothing).
    #[arg(long, value_name = "SECONDS")]
    watch: Option<u64>,
    /// Load and validate the manifests, print what would run, and exit (status 1 when a
    /// document was rejected). Starts nothing.
    #[arg(long)]
    dry_run: bool,
    /// Runtime state: shim state in <run-dir>/containers, pod namespaces in <run-dir>/sandboxes.
    #[arg(long, value_name = "DIR", default_value = "/run/hako", global = true)]
    run_dir: PathBuf,
    /// Container logs: <dir>/<ns>_<pod>_<uid>/<container>/<attempt>.log (CRI format).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/log/pods",
        global = true
    )]
    pod_log_dir: PathBuf,
    /// Rotate a container's CRI log when it would pass this size (a quantity: 10Mi, 512Ki;
    /// the kubelet's --container-log-max-size).
    #[arg(long, value_name = "QUANTITY", default_value = "10Mi", value_parser = parse_log_size)]
    container_log_max_size: u64,
    /// Log files kept per container, the current one included (at least 2; the kubelet's
    /// --container-log-max-files).
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(2..))]
    container_log_max_files: u32,
    /// Directory of Localhost seccomp profiles: `localhostProfile: profiles/x.json` is read
    /// from <dir>/profiles/x.json (default <root-dir>/seccomp, the kubelet's
    /// --seccomp-profile-root layout).
    #[arg(long, value_name = "DIR")]
    seccomp_profile_root: Option<PathBuf>,
    /// Unsafe sysctls (or prefixes ending in `*`) pods may set besides the safe set,
    /// comma-separated; each must be namespaced (kernel.shm*, kernel.msg*, kernel.sem,
    /// fs.mqueue.*, net.*), as the kubelet's --allowed-unsafe-sysctls.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    allowed_unsafe_sysctls: Vec<String>,
    /// The hako-shim binary (default: next to this binary, else /usr/local/bin/hako-shim).
    #[arg(long, value_name = "FILE", env = "HAKO_SHIM_BIN", global = true)]
    shim_binary: Option<PathBuf>,
    /// CNI network configuration directory (the first *.conflist/*.conf/*.json by name is used).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// CNI plugin directory (repeatable; searched in order).
    #[arg(long = "cni-bin-dir", value_name = "DIR", default_values = ["/opt/cni/bin"])]
    cni_bin_dirs: Vec<PathBuf>,
    /// Deadline of one CNI plugin invocation, in seconds (default: what the kubelet gives a
    /// whole RunPodSandbox); past it the plugin and its process group are killed.
    #[arg(long, value_name = "SECONDS", default_value_t = hako_agent::sys::cni::DEFAULT_CNI_TIMEOUT.as_secs_f64())]
    cni_timeout: f64,
    /// Image pull progress deadline in seconds (kubelet: 1m): a pull that receives no bytes
    /// for this long is cancelled and fails with ErrImagePull.
    #[arg(long, value_name = "SECONDS", default_value_t = hako_shim::image::DEFAULT_PROGRESS_DEADLINE.as_secs_f64())]
    image_pull_progress_deadline: f64,
    /// Image GC runs when the image filesystem (the one holding <root-dir>/images) is at
    /// least this percent full (kubelet: 85; 100 turns image GC off).
    #[arg(long, value_name = "PERCENT", default_value_t = hako_agent::sys::image_gc::DEFAULT_HIGH_THRESHOLD,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: u8,
    /// Image GC frees down to this percent (kubelet: 80; below the high threshold).
    #[arg(long, value_name = "PERCENT", default_value_t = hako_agent::sys::image_gc::DEFAULT_LOW_THRESHOLD,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// Images pulled less than this ago are never garbage collected (a Go duration; kubelet: 2m).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = hako_proxier::proxy_config::go_duration)]
    minimum_image_ttl_duration: std::time::Duration,
    /// How often image GC checks the image filesystem, in seconds (the kubelet's fixed 5 min).
    #[arg(long, value_name = "SECONDS", default_value_t = hako_agent::sys::image_gc::DEFAULT_PERIOD.as_secs_f64())]
    image_gc_period: f64,
    /// Exited instances kept per container (kubelet: 1; < 0: no limit). The current and the
    /// previous instance (lastState, logs --previous) are always kept.
    #[arg(long, value_name = "N", default_value_t = hako_agent::sys::container_gc::DEFAULT_MAX_PER_POD_CONTAINER,
          allow_negative_numbers = true)]
    maximum_dead_containers_per_container: i32,
    /// Exited container instances kept on the node (kubelet: -1, no limit).
    #[arg(long, value_name = "N", default_value_t = hako_agent::sys::container_gc::DEFAULT_MAX_CONTAINERS,
          allow_negative_numbers = true)]
    maximum_dead_containers: i32,
    /// How often the node-wide dead-container pass runs (with --maximum-dead-containers ≥ 0),
    /// in seconds (the kubelet's fixed 1 min).
    #[arg(long, value_name = "SECONDS", default_value_t = hako_agent::sys::container_gc::PERIOD.as_secs_f64())]
    container_gc_period: f64,
    /// Exited instances younger than this are never removed (a Go duration; kubelet: 0).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = hako_proxier::proxy_config::go_duration)]
    minimum_container_ttl_duration: std::time::Duration,
    /// Registry host configuration directory, containerd's `config_path`:
    /// `DIR/<host[:port]>/hosts.toml` (or `DIR/_default/hosts.toml`) names mirrors, private
    /// CAs, `skip_verify` and plain HTTP per registry. A missing directory means none.
    #[arg(long, value_name = "DIR", default_value = hako_shim::image::hosts::DEFAULT_CONFIG_PATH)]
    registry_config_path: PathBuf,
    /// cgroup filesystem root.
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
    /// cgroup path that holds `kubepods` (default: the hierarchy root).
    #[arg(long, value_name = "PATH", default_value = "")]
    cgroup_parent: String,
    /// Node IP (status.hostIP; default: the source address of the default route).
    #[arg(long, value_name = "IP")]
    node_ip: Option<String>,
    /// First restart back-off delay in seconds (kubelet: 10); doubles up to --restart-backoff-max.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    restart_backoff_base: f64,
    /// Restart back-off cap in seconds (kubelet: 300); a container that ran 2x this long is reset.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    restart_backoff_max: f64,
    /// Period of the manifest directory check, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    file_check_frequency: f64,
    /// Period of each pod worker's resync without events, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    sync_frequency: f64,
    /// Period of CNI CHECK per pod, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    cni_check_frequency: f64,
    /// On SIGINT/SIGTERM, stop every pod gracefully before exiting (default: pods keep running
    /// and the next agent re-adopts them).
    #[arg(long)]
    stop_pods_on_exit: bool,
    /// Service dataplane: iptables, nftables, ipvs or none. Standalone (default iptables): the
    /// Services of the manifest directory, their endpoints the local pods their selectors
    /// match. Cluster mode (default none): the cluster's Services and EndpointSlices, as
    /// hako-proxy would program them.
    #[arg(long, value_name = "MODE")]
    proxy_mode: Option<hako_agent::proxy::standalone::ProxyMode>,
    /// iptables flavour for --proxy-mode iptables/ipvs: "" (system default), nft or legacy.
    #[arg(long, value_name = "VARIANT", default_value = "")]
    iptables_variant: String,
    /// Address of /healthz and /metrics ("" disables the server).
    #[arg(long, value_name = "ADDR", default_value = hako_agent::api::healthz::DEFAULT_ADDR)]
    healthz_bind_address: String,
    /// Cluster mode (--kubeconfig and the node registration, Lease and overlay options).
    #[command(flatten)]
    cluster: hako_agent::node::ClusterArgs,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List pods from their records (<root>/pods/*/status.json).
    Get {
        /// Resource type: pods, or events (node events such as rejected manifests).
        #[arg(value_parser = ["pods", "pod", "po", "events", "event", "ev"])]
        resource: String,
        /// Output format.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Show one pod in detail, with its events.
    Describe {
        /// Resource type: pod.
        #[arg(value_parser = ["pods", "pod", "po"])]
        resource: String,
        /// Pod name (or namespace/name).
        name: String,
        /// Output format: the pod record as YAML or JSON instead of the text.
        #[arg(short, long, value_enum)]
        output: Option<DescribeOutput>,
    },
    /// Print a container's log (CRI log files under --pod-log-dir).
    Logs {
        /// Pod name (or namespace/name).
        pod: String,
        /// Container (default: the only or first container).
        #[arg(short, long)]
        container: Option<String>,
        /// The previous instance's log.
        #[arg(short, long)]
        previous: bool,
        /// Keep printing new lines until the container exits (across log rotations).
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of the log.
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
        /// Prefix each line with its RFC 3339 time.
        #[arg(long)]
        timestamps: bool,
        /// Stop after this many bytes.
        #[arg(long, value_name = "N")]
        limit_bytes: Option<u64>,
        /// Only lines from the last SECONDS.
        #[arg(long, value_name = "SECONDS", conflicts_with = "since_time")]
        since: Option<u64>,
        /// Only lines at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        since_time: Option<String>,
    },
    /// List the images in the store: size, bytes deleting it frees (layers shared with other
    /// images excluded), last use, and whether a pod or container uses it. `images prune`
    /// deletes every unused image older than --minimum-image-ttl-duration.
    Images {
        /// `prune`: delete the unused images.
        #[arg(value_parser = ["prune"])]
        action: Option<String>,
        /// Output format: json instead of the table.
        #[arg(short, long, value_parser = ["json"])]
        output: Option<String>,
    },
    /// Run a command in a container.
    Exec {
        /// Pod name (or namespace/name).
        pod: String,
        /// Container (default: the first container).
        #[arg(short, long)]
        container: Option<String>,
        /// Pass stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Run the command on a terminal: this terminal goes raw, its size is given to the
        /// container's terminal and followed (SIGWINCH). Needs stdin to be a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// Command and arguments (after --).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DescribeOutput {
    Yaml,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    Wide,
    Yaml,
    Json,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

fn memory_capacity() -> i128 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<i128>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30)
}

/// Whether the flag `id` was given on the command line (flags override the config file).
fn given(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

fn secs_u64(d: std::time::Duration) -> u64 {
    d.as_secs().max(1)
}

/// Applies a KubeletConfiguration to the flags not given on the command line; returns the
/// notes to log once logging is up.
fn apply_config(
    cli: &mut Cli,
    m: &ArgMatches,
    path: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    use hako_agent::model::kubelet_config::parse_kubelet_config;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    let (s, notes) =
        parse_kubelet_config(&text).with_context(|| format!("--config {}", path.display()))?;
    let c = &mut cli.cluster;
    macro_rules! set {
        ($id:literal, $dst:expr, $v:expr) => {
            if !given(m, $id) {
                if let Some(v) = $v {
                    $dst = v;
                }
            }
        };
    }
    set!(
        "pod_manifest_path",
        cli.pod_manifest_path,
        s.static_pod_path.map(|p| Some(PathBuf::from(p)))
    );
    if let Some(a) = &s.address {
        let ip = a
            .parse()
            .with_context(|| format!("--config: address {a:?}"))?;
        set!("kubelet_address", c.kubelet_address, Some(ip));
    }
    set!("kubelet_port", c.kubelet_port, s.port);
    set!(
        "healthz_bind_address",
        cli.healthz_bind_address,
        s.healthz_bind_address
    );
    set!(
        "tls_cert_file",
        c.tls_cert_file,
        s.tls_cert_file.map(|p| Some(PathBuf::from(p)))
    );
    set!(
        "tls_private_key_file",
        c.tls_private_key_file,
        s.tls_private_key_file.map(|p| Some(PathBuf::from(p)))
    );
    set!(
        "client_ca_file",
        c.client_ca_file,
        s.client_ca_file.map(|p| Some(PathBuf::from(p)))
    );
    set!(
        "authentication_token_webhook_cache_ttl",
        c.authentication_token_webhook_cache_ttl,
        s.authentication_cache_ttl.map(secs_u64)
    );
    set!(
        "authorization_webhook_cache_authorized_ttl",
        c.authorization_webhook_cache_authorized_ttl,
        s.authorization_cache_authorized_ttl.map(secs_u64)
    );
    set!(
        "authorization_webhook_cache_unauthorized_ttl",
        c.authorization_webhook_cache_unauthorized_ttl,
        s.authorization_cache_unauthorized_ttl.map(secs_u64)
    );
    set!("cluster_dns", cli.cluster_dns, s.cluster_dns);
    set!("cluster_domain", cli.cluster_domain, s.cluster_domain);
    set!(
        "resolv_conf",
        cli.resolv_conf,
        s.resolv_conf.map(PathBuf::from)
    );
    if let Some(p) = &s.pod_cidr {
        let nets = p
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--config: podCIDR {p:?}"))?;
        set!("pod_cidr", c.pod_cidr, Some(nets));
    }
    set!("max_pods", c.max_pods, s.max_pods);
    set!(
        "allowed_unsafe_sysctls",
        cli.allowed_unsafe_sysctls,
        s.allowed_unsafe_sysctls
    );
    set!("cgroup_parent", cli.cgroup_parent, s.cgroup_root);
    set!("eviction_hard", c.eviction_hard, s.eviction_hard);
    let e = &mut c.eviction;
    set!("eviction_soft", e.eviction_soft, s.eviction_soft);
    set!(
        "eviction_soft_grace_period",
        e.eviction_soft_grace_period,
        s.eviction_soft_grace_period
    );
    set!(
        "eviction_minimum_reclaim",
        e.eviction_minimum_reclaim,
        s.eviction_minimum_reclaim
    );
    set!(
        "eviction_pressure_transition_period",
        e.eviction_pressure_transition_period,
        s.eviction_pressure_transition_period
    );
    set!(
        "eviction_max_pod_grace_period",
        e.eviction_max_pod_grace_period,
        s.eviction_max_pod_grace_period
    );
    set!("system_reserved", c.system_reserved, s.system_reserved);
    set!(
        "register_with_taints",
        c.register_with_taints,
        s.register_with_taints
    );
    set!(
        "sync_frequency",
        cli.sync_frequency,
        s.sync_frequency.map(|d| d.as_secs_f64())
    );
    set!(
        "file_check_frequency",
        cli.file_check_frequency,
        s.file_check_frequency.map(|d| d.as_secs_f64())
    );
    set!(
        "node_status_update_frequency",
        c.node_status_update_frequency,
        s.node_status_update_frequency.map(secs_u64)
    );
    set!(
        "node_status_report_frequency",
        c.node_status_report_frequency,
        s.node_status_report_frequency.map(secs_u64)
    );
    // The kubelet renews its Lease every quarter of the lease duration.
    set!(
        "node_lease_renew_interval",
        c.node_lease_renew_interval,
        s.node_lease_duration_seconds.map(|d| (d / 4).max(1))
    );
    if let Some(q) = &s.container_log_max_size {
        let v =
            parse_log_size(q).map_err(|e| anyhow::anyhow!("--config: containerLogMaxSize: {e}"))?;
        set!(
            "container_log_max_size",
            cli.container_log_max_size,
            Some(v)
        );
    }
    if let Some(n) = s.container_log_max_files {
        anyhow::ensure!(n >= 2, "--config: containerLogMaxFiles must be at least 2");
        set!(
            "container_log_max_files",
            cli.container_log_max_files,
            Some(n)
        );
    }
    set!(
        "image_gc_high_threshold",
        cli.image_gc_high_threshold,
        s.image_gc_high_threshold_percent
    );
    set!(
        "image_gc_low_threshold",
        cli.image_gc_low_threshold,
        s.image_gc_low_threshold_percent
    );
    set!(
        "minimum_image_ttl_duration",
        cli.minimum_image_ttl_duration,
        s.image_minimum_gc_age
    );
    set!("verbosity", cli.verbosity, s.verbosity.map(Some));
    if s.log_format.as_deref() == Some("json") {
        set!("log_format", cli.log_format, Some(LogFormat::Json));
    }
    Ok(notes)
}

/// Removes the leftovers of the proxy modes other than `mode` (all of them with
/// `full`), as kube-proxy does when it starts; returns false when a step failed.
fn proxier_cleanup(
    mode: hako_agent::proxy::standalone::ProxyMode,
    variant: &str,
    full: bool,
) -> bool {
    use hako_agent::proxy::standalone::ProxyMode;
    use hako_proxier::cleanup::{self, CleanupOpts, Scope};
    let (scope, nft) = match (full, mode) {
        (true, _) => (Scope::All, true),
        (false, ProxyMode::None) => return true,
        (false, ProxyMode::Iptables) => (Scope::IpvsOnly, true),
        (false, ProxyMode::Ipvs) => (Scope::IptablesOnly, true),
        (false, ProxyMode::Nftables) => (Scope::All, false),
    };
    let mut variants = vec![variant.to_string()];
    if full {
        variants.extend(["legacy".to_string(), "nft".to_string()]);
    }
    let opts = CleanupOpts {
        iptables_variants: variants,
        ipvs_devices: vec![hako_proxier::ipvs::DEFAULT_DEVICE.to_string()],
        ipvs_always: full,
    };
    let (report, errs) = cleanup::cleanup(scope, nft, &opts);
    if full || report != cleanup::CleanupReport::default() {
        tracing::info!(?report, full, "removed proxier leftovers");
    }
    for e in &errs {
        tracing::warn!("removing proxier leftovers: {e}");
    }
    errs.is_empty()
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches)?;
    let notes = match cli.config.clone() {
        Some(p) => apply_config(&mut cli, &matches, &p)?,
        None => Vec::new(),
    };
    hako_proxier::logging::init(cli.log_format, cli.verbosity);
    for n in notes {
        tracing::warn!("--config: {n}");
    }
    if cli.cleanup_proxier {
        if !proxier_cleanup(
            hako_agent::proxy::standalone::ProxyMode::None,
            &cli.iptables_variant,
            true,
        ) {
            std::process::exit(1);
        }
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Some(Cmd::Get { resource, .. }) if resource.starts_with("ev") => {
            for e in hako_agent::standalone::read_events(&cli.root_dir) {
                writeln!(
                    out,
                    "{}\t{}\t{}\tx{}\t{}",
                    e.last_timestamp.to_rfc3339(),
                    e.type_,
                    e.reason,
                    e.count,
                    e.message
                )?;
            }
        }
        Some(Cmd::Logs {
            pod,
            container,
            previous,
            follow,
            tail,
            timestamps,
            limit_bytes,
            since,
            since_time,
        }) => {
            let since_nanos = match (since, since_time) {
                (Some(s), _) => Some(
                    i128::try_from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_nanos(),
                    )
                    .unwrap_or(0)
                        - i128::from(*s) * 1_000_000_000,
                ),
                (None, Some(t)) => Some(
                    hako_shim::logs::parse_rfc3339(t.as_bytes())
                        .with_context(|| format!("--since-time {t:?} is not an RFC 3339 time"))?,
                ),
                (None, None) => None,
            };
            let opts = hako_agent::sys::logs::LogOptions {
                tail_lines: *tail,
                since_nanos,
                timestamps: *timestamps,
                limit_bytes: *limit_bytes,
                follow: *follow,
            };
            return hako_agent::cli::commands::logs(
                &cli.root_dir,
                &cli.pod_log_dir,
                &shim_runtime(&cli),
                pod,
                container.as_deref(),
                *previous,
                &opts,
            );
        }
        Some(Cmd::Images { action, output }) => {
            let gc = image_gc(&cli)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if action.is_some() {
                let deleted = rt.block_on(gc.prune_unused())?;
                if output.is_some() {
                    writeln!(out, "{}", serde_json::to_string_pretty(&deleted)?)?;
                } else {
                    write!(
                        out,
                        "{}",
                        hako_agent::sys::image_gc::render_deleted(&deleted)
                    )?;
                }
            } else {
                let in_use = gc.in_use();
                let list = gc.usage()?;
                if output.is_some() {
                    writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
                } else {
                    write!(
                        out,
                        "{}",
                        hako_agent::sys::image_gc::render_images(
                            &list,
                            &in_use,
                            Utc::now().timestamp()
                        )
                    )?;
                }
            }
        }
        Some(Cmd::Exec {
            pod,
            container,
            stdin,
            tty,
            command,
        }) => {
            let code = hako_agent::cli::commands::exec(
                &cli.root_dir,
                &shim_runtime(&cli),
                pod,
                container.as_deref(),
                command,
                hako_agent::cli::commands::ExecMode {
                    stdin: *stdin,
                    tty: *tty,
                },
            )?;
            std::process::exit(code);
        }
        Some(Cmd::Get { output, .. }) => {
            let (recs, bad) = state::read_records(&cli.root_dir)?;
            for b in bad {
                tracing::warn!("{b}");
            }
            match output {
                Some(Output::Json) => {
                    let pods: Vec<_> = recs.iter().map(|r| &r.pod).collect();
                    writeln!(
                        out,
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({"apiVersion":"v1","kind":"List","items":pods})
                        )?
                    )?;
                }
                Some(Output::Yaml) => {
                    let pods: Vec<_> = recs.iter().map(|r| &r.pod).collect();
                    write!(
                        out,
                        "{}",
                        serde_yaml::to_string(
                            &serde_json::json!({"apiVersion":"v1","kind":"List","items":pods})
                        )?
                    )?;
                }
                Some(Output::Wide) | None => write!(
                    out,
                    "{}",
                    render::pods_table(&recs, matches!(output, Some(Output::Wide)), Utc::now())
                )?,
            }
        }
        Some(Cmd::Describe { name, output, .. }) => {
            let (recs, _) = state::read_records(&cli.root_dir)?;
            let (ns, n) = name
                .split_once('/')
                .map(|(a, b)| (Some(a), b))
                .unwrap_or((None, name.as_str()));
            let rec = recs
                .iter()
                .find(|r| r.name() == n && ns.is_none_or(|ns| r.namespace() == ns))
                .with_context(|| {
                    format!(
                        "pod {name:?} not found under {}",
                        cli.root_dir.join("pods").display()
                    )
                })?;
            match output {
                Some(DescribeOutput::Json) => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&rec.pod)?)?
                }
                Some(DescribeOutput::Yaml) => write!(out, "{}", serde_yaml::to_string(&rec.pod)?)?,
                None => write!(out, "{}", render::describe(rec, Utc::now()))?,
            }
        }
        None if cli.cluster.kubeconfig.is_some() => {
            let node_ip = match cli.node_ip.as_deref().map(str::parse) {
                None => None,
                Some(Ok(ip)) => Some(ip),
                Some(Err(e)) => anyhow::bail!("--node-ip: {e}"),
            };
            let node = hako_agent::node::NodeSettings {
                node_name: cli.hostname_override.clone(),
                root_dir: cli.root_dir.clone(),
                node_ip,
                cni_conf_dir: cli.cni_conf_dir.clone(),
                pod_log_dir: cli.pod_log_dir.clone(),
                pod_manifest_path: cli.pod_manifest_path.clone(),
                proxy_mode: cli
                    .proxy_mode
                    .unwrap_or(hako_agent::proxy::standalone::ProxyMode::None),
                iptables_variant: cli.iptables_variant.clone(),
            };
            proxier_cleanup(node.proxy_mode, &cli.iptables_variant, false);
            let workers = match worker_config(&cli) {
                Ok(mut w) => {
                    let gc = spawn_image_gc(&cli, &w)?;
                    w.reclaim = Some(std::sync::Arc::new(gc));
                    Some(w)
                }
                Err(e) => {
                    tracing::warn!("pods will not be started: {e:#}");
                    None
                }
            };
            hako_agent::node::run(&cli.cluster, &node, workers)?;
        }
        None => {
            let Some(dir) = &cli.pod_manifest_path else {
                anyhow::bail!(
                    "nothing to do: pass --pod-manifest-path DIR, or a subcommand (see --help)"
                );
            };
            if cli.dry_run || cli.watch.is_some() {
                let ok = dry_run(&cli, dir, &mut out)?;
                if let Some(secs) = cli.watch {
                    watch(&cli, dir, secs, &mut out)?;
                }
                if !ok {
                    std::process::exit(1);
                }
            } else {
                return run_agent(&cli, dir);
            }
        }
    }
    Ok(())
}

fn secs(v: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(if v.is_finite() && v > 0.0 { v } else { 0.001 })
}

/// `--container-log-max-size`: a positive quantity of bytes.
fn parse_log_size(s: &str) -> Result<u64, String> {
    let q = hako_agent::model::quantity::parse(s).map_err(|e| e.to_string())?;
    u64::try_from(q.value())
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a positive size"))
}

fn shim_runtime(cli: &Cli) -> hako_shim::client::Runtime {
    let bin = cli.shim_binary.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("hako-shim")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin/hako-shim"))
    });
    hako_shim::client::Runtime::new(bin, cli.run_dir.join("containers"))
}

fn default_node_ip() -> Option<String> {
    // The source address the kernel picks for an outside destination (no packet is sent).
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

/// Runs the agent over the manifest directory until SIGINT/SIGTERM.
fn run_agent(cli: &Cli, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut cfg = worker_config(cli)?;
    let gc = spawn_image_gc(cli, &cfg)?;
    cfg.reclaim = Some(std::sync::Arc::new(gc));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .thread_keep_alive(std::time::Duration::from_secs(5))
        .build()?;
    let healthz_addr = match cli.healthz_bind_address.as_str() {
        "" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--healthz-bind-address {a:?}"))?,
        ),
    };
    proxier_cleanup(
        cli.proxy_mode
            .unwrap_or(hako_agent::proxy::standalone::ProxyMode::Iptables),
        &cli.iptables_variant,
        false,
    );
    let node_services = hako_agent::api::healthz::start_node_services(
        hako_agent::api::healthz::NodeServicesOptions {
            healthz_addr,
            proxy_mode: cli
                .proxy_mode
                .unwrap_or(hako_agent::proxy::standalone::ProxyMode::Iptables),
            iptables_variant: cli.iptables_variant.clone(),
            cluster_cidr: None,
            poller: hako_agent::proxy::standalone::PollerOptions {
                manifest_dir: dir.to_path_buf(),
                static_pods: StaticPodOptions {
                    node_name: cli.hostname_override.clone(),
                    suffix_node_name: true,
                },
                root: cli.root_dir.clone(),
                period: std::time::Duration::from_millis(500),
            },
        },
    )?;
    rt.spawn(hako_agent::api::healthz::heartbeat(
        node_services.metrics.clone(),
    ));
    rt.block_on(hako_agent::standalone::run(
        cfg,
        hako_agent::standalone::StandaloneOptions {
            manifest_dir: dir.to_path_buf(),
            static_pods: StaticPodOptions {
                node_name: cli.hostname_override.clone(),
                suffix_node_name: true,
            },
            file_check_frequency: secs(cli.file_check_frequency),
            stop_pods_on_exit: cli.stop_pods_on_exit,
        },
    ))
    .context("installing the signal handlers")
}

/// Polls the directory and prints each change (the loop the pod workers will hang off).
fn watch(cli: &Cli, dir: &std::path::Path, secs: u64, out: &mut impl Write) -> anyhow::Result<()> {
    let opts = StaticPodOptions {
        node_name: cli.hostname_override.clone(),
        suffix_node_name: true,
    };
    let mut src = source::DirSource::new(dir.to_path_buf(), opts);
    src.poll()?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
        let poll = match src.poll() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        for e in poll.new_errors {
            tracing::error!("skipped: {e}");
        }
        for ev in poll.events {
            let line = match ev {
                SourceEvent::PodAdded(p) => format!(
                    "ADD pod {} ({})",
                    p.pod.metadata.name.unwrap_or_default(),
                    p.file
                ),
                SourceEvent::PodUpdated { new, .. } => {
                    format!(
                        "UPDATE pod {} -> uid {} (would restart)",
                        new.pod.metadata.name.clone().unwrap_or_default(),
                        new.uid()
                    )
                }
                SourceEvent::PodDeleted(p) => format!(
                    "DELETE pod {} (would terminate gracefully)",
                    p.pod.metadata.name.unwrap_or_default()
                ),
                SourceEvent::ConfigMapChanged(k) => format!("CHANGED configmap {}/{}", k.0, k.1),
                SourceEvent::SecretChanged(k) => format!("CHANGED secret {}/{}", k.0, k.1),
                SourceEvent::ServiceChanged(k) => format!("CHANGED service {}/{}", k.0, k.1),
            };
            writeln!(out, "{line}")?;
            out.flush()?;
        }
    }
}

/// Loads, validates and prints what would run; false when any document was rejected.
fn dry_run(cli: &Cli, dir: &std::path::Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let opts = StaticPodOptions {
        node_name: cli.hostname_override.clone(),
        suffix_node_name: true,
    };
    let loaded = source::load_dir(dir, &opts)?;
    for e in &loaded.errors {
        tracing::error!("skipped: {e}");
    }
    let s = &loaded.snapshot;
    let host =
        dns::ResolvConf::parse(&std::fs::read_to_string(&cli.resolv_conf).unwrap_or_default());
    let dns_settings = dns::DnsSettings {
        cluster_dns: cli.cluster_dns.clone(),
        cluster_domain: cli.cluster_domain.clone(),
        host,
    };
    let mem = cli.memory_capacity.unwrap_or_else(memory_capacity);
    writeln!(
        out,
        "hako-agent: dry run (nothing is started): {} pod(s), {} configmap(s), {} secret(s), {} service(s), {} rejected document(s) from {}",
        s.pods.len(),
        s.config_maps.len(),
        s.secrets.len(),
        s.services.len(),
        loaded.errors.len(),
        dir.display()
    )?;
    for sp in s.pods.values() {
        describe_plan(sp, s, &dns_settings, mem, out)?;
    }
    out.flush()?;
    Ok(loaded.errors.is_empty())
}

fn describe_plan(
    sp: &SourcedPod,
    s: &hako_agent::source::manifest::Snapshot,
    dns_settings: &dns::DnsSettings,
    mem: i128,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let pod = &sp.pod;
    let Some(spec) = &pod.spec else { return Ok(()) };
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    writeln!(
        out,
        "\npod {}/{} uid={} from {}",
        ns,
        pod.metadata.name.as_deref().unwrap_or(""),
        sp.uid(),
        sp.file
    )?;
    writeln!(out, "  qosClass: {}", qos::pod_qos(spec).as_str())?;
    let plan = actions::compute_actions(
        pod,
        &observed::ObservedPod::default(),
        Utc::now(),
        &Default::default(),
    );
    writeln!(out, "  first actions: {plan:?}")?;
    let st = status::compute_status(pod, &observed::ObservedPod::default(), None, Utc::now());
    writeln!(out, "  initial phase: {}", st.phase.unwrap_or_default())?;
    let resolv = dns::pod_resolv_conf(pod, dns_settings).render();
    writeln!(
        out,
        "  resolv.conf: {}",
        resolv.trim_end().replace('\n', " | ")
    )?;
    let cms: BTreeMap<String, _> = s
        .config_maps
        .iter()
        .filter(|(k, _)| k.0 == ns)
        .map(|(k, v)| (k.1.clone(), v))
        .collect();
    let secrets: BTreeMap<String, _> = s
        .secrets
        .iter()
        .filter(|(k, _)| k.0 == ns)
        .map(|(k, v)| (k.1.clone(), v))
        .collect();
    let ctx = env::EnvContext {
        config_maps: cms,
        secrets,
        ..Default::default()
    };
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("init", c))
        .chain(spec.containers.iter().map(|c| ("", c)));
    for (kind, c) in all {
        let adj = qos::container_oom_score_adj(spec, c, mem);
        writeln!(
            out,
            "  {kind}container {}: image={} oom_score_adj={adj}",
            c.name,
            c.image.as_deref().unwrap_or("")
        )?;
        match env::resolve_env(pod, c, &ctx) {
            Ok(vars) => {
                let cmd = env::expand_command(c.command.as_deref().unwrap_or(&[]), &vars);
                let args = env::expand_command(c.args.as_deref().unwrap_or(&[]), &vars);
                if !cmd.is_empty() || !args.is_empty() {
                    writeln!(out, "    command: {:?} args: {:?}", cmd, args)?;
                }
                let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
                writeln!(out, "    env: {}", names.join(" "))?;
            }
            Err(e) => writeln!(out, "    waiting: {}: {e}", env::EnvError::REASON)?,
        }
    }
    let _ = record::FORMAT_VERSION;
    Ok(())
}

/// The pod workers' configuration from the command line (standalone and cluster mode);
/// creates the root and run directories.
fn worker_config(cli: &Cli) -> anyhow::Result<hako_agent::worker::AgentConfig> {
    for d in [&cli.root_dir, &cli.run_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let host =
        dns::ResolvConf::parse(&std::fs::read_to_string(&cli.resolv_conf).unwrap_or_default());
    let images = hako_shim::image::ImageStore::open(cli.root_dir.join("images"))
        .with_context(|| format!("opening image store under {}", cli.root_dir.display()))?
        .with_progress_deadline(secs(cli.image_pull_progress_deadline))
        .with_registry_hosts(hako_shim::image::hosts::RegistryHosts::at(
            &cli.registry_config_path,
        ));
    // A cached CNI result whose write a killed agent interrupted leaves a temporary file.
    let cni_results = cli.root_dir.join("cni").join("results");
    let swept = hako_shim::durable::remove_stale_temps(&cni_results);
    if swept > 0 {
        tracing::info!(dir = %cni_results.display(), files = swept, "removed temporary files of interrupted writes");
    }
    Ok(hako_agent::worker::AgentConfig {
        root_dir: cli.root_dir.clone(),
        run_dir: cli.run_dir.clone(),
        pod_log_dir: cli.pod_log_dir.clone(),
        shim: shim_runtime(cli),
        images: std::sync::Arc::new(images),
        cni: hako_agent::sys::cni::CniConfig {
            conf_dir: cli.cni_conf_dir.clone(),
            bin_dirs: cli.cni_bin_dirs.clone(),
            cache_dir: cli.root_dir.join("cni"),
            timeout: secs(cli.cni_timeout),
        },
        cgroup_root: cli.cgroup_root.clone(),
        cgroup_parent: cli.cgroup_parent.clone(),
        dns: dns::DnsSettings {
            cluster_dns: cli.cluster_dns.clone(),
            cluster_domain: cli.cluster_domain.clone(),
            host,
        },
        memory_capacity: cli.memory_capacity.unwrap_or_else(memory_capacity),
        host_ip: cli.node_ip.clone().or_else(default_node_ip),
        backoff: hako_agent::model::backoff::BackoffConfig {
            initial: k8s_openapi::chrono::Duration::from_std(secs(cli.restart_backoff_base))
                .unwrap_or_default(),
            max: k8s_openapi::chrono::Duration::from_std(secs(cli.restart_backoff_max))
                .unwrap_or_default(),
        },
        sync_period: secs(cli.sync_frequency),
        cni_check_period: secs(cli.cni_check_frequency),
        seccomp_profile_root: cli
            .seccomp_profile_root
            .clone()
            .unwrap_or_else(|| cli.root_dir.join("seccomp")),
        container_log_max_size: cli.container_log_max_size,
        container_log_max_files: cli.container_log_max_files,
        sysctls: hako_agent::model::admit::SysctlAllowlist::new(&cli.allowed_unsafe_sysctls)
            .context("--allowed-unsafe-sysctls")?,
        // Static pods are exempt in cluster mode, as with the kubelet; standalone mode runs
        // nothing else, so there they are the workload the eviction manager may evict.
        eviction: Some(hako_agent::eviction::EvictionConfig::from_flags(
            &cli.cluster.eviction_hard,
            &cli.cluster.eviction,
            cli.cluster.kubeconfig.is_some(),
        )?),
        container_gc: hako_agent::sys::container_gc::ContainerGcPolicy {
            max_per_pod_container: cli.maximum_dead_containers_per_container,
            max_containers: cli.maximum_dead_containers,
            min_age: cli.minimum_container_ttl_duration,
        },
        reclaim: None,
    })
}

/// The image GC policy from the command line (and --config), checked as the kubelet does.
fn image_gc_policy(cli: &Cli) -> anyhow::Result<hako_agent::sys::image_gc::ImageGcPolicy> {
    let p = hako_agent::sys::image_gc::ImageGcPolicy {
        high_threshold_percent: cli.image_gc_high_threshold,
        low_threshold_percent: cli.image_gc_low_threshold,
        min_age: cli.minimum_image_ttl_duration,
        period: secs(cli.image_gc_period),
    };
    p.validate()?;
    Ok(p)
}

/// The image GC over the store under --root-dir (for the CLI).
fn image_gc(cli: &Cli) -> anyhow::Result<hako_agent::sys::image_gc::ImageGc> {
    let store = hako_shim::image::ImageStore::open(cli.root_dir.join("images"))
        .with_context(|| format!("opening image store under {}", cli.root_dir.display()))?;
    Ok(hako_agent::sys::image_gc::ImageGc::new(
        std::sync::Arc::new(store),
        image_gc_policy(cli)?,
        cli.root_dir.clone(),
        cli.run_dir.join("containers"),
    ))
}

/// Starts the periodic image GC over the workers' store, and the node-wide pass of the
/// dead-container GC, on a thread of their own (its own runtime: it runs beside standalone and
/// cluster mode alike). Returns the GC, whose
/// [`hako_agent::sys::image_gc::ImageGc::reclaim`] the eviction manager calls.
fn spawn_image_gc(
    cli: &Cli,
    cfg: &hako_agent::worker::AgentConfig,
) -> anyhow::Result<hako_agent::sys::image_gc::ImageGc> {
    let gc = hako_agent::sys::image_gc::ImageGc::new(
        cfg.images.clone(),
        image_gc_policy(cli)?,
        cfg.root_dir.clone(),
        cfg.run_dir.join("containers"),
    );
    let run = gc.clone();
    let containers = hako_agent::sys::container_gc::ContainerGc {
        policy: cfg.container_gc,
        root_dir: cfg.root_dir.clone(),
        shim: cfg.shim.clone(),
        period: secs(cli.container_gc_period),
    };
    std::thread::Builder::new()
        .name("image-gc".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(async {
                    tokio::join!(run.run(), containers.run());
                }),
                Err(e) => tracing::error!("garbage collection not started: {e}"),
            }
        })
        .context("starting the image GC thread")?;
    Ok(gc)
}
