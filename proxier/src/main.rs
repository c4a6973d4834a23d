//! `hako-proxy`: the proxier as a daemon, fed from a directory of Service/EndpointSlice YAML
//! files (re-read on change), with metrics and healthz endpoints like kube-proxy's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use hako_proxier::cleanup::{self, CleanupOpts, Scope};
use hako_proxier::logging::{self, LogFormat};
use hako_proxier::metrics;
use hako_proxier::proxy_config::{self, ProxyModeSetting};
use hako_proxier::runner::{DirSource, RunEnd, Runner, RunnerConfig, WatchSource};
use hako_proxier::{IptablesBackend, Proxier, ProxierOpts, RenderOpts};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Iptables,
    Nftables,
    Ipvs,
}

/// hako service proxier: Services and EndpointSlices as kube-proxy-compatible rules
#[derive(Parser, Debug)]
#[command(name = "hako-proxy", version, about)]
struct Cli {
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1, YAML or JSON): its mode,
    /// clusterCIDR, hostnameOverride, clientConnection.kubeconfig, bind addresses,
    /// nodePortAddresses, the active mode's sync periods and masqueradeAll, ipvs.scheduler and
    /// logging. Flags given on the command line override the file; fields hako does not
    /// implement are logged once.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Remove every rule, chain, set, table, IPVS service and dummy device that any mode
    /// (iptables, ipvs, nftables; hako's or kube-proxy's) left in this network namespace,
    /// then exit (kube-proxy's --cleanup). Exits 1 when a step failed.
    #[arg(long)]
    cleanup: bool,
    /// Log format: text (plain, colour only on a terminal) or json.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log verbosity (klog's -v): 0-2 info, 3-4 debug, 5 trace for hako, 6+ trace for all.
    /// Without it RUST_LOG applies (default info).
    #[arg(short = 'v', long = "v", value_name = "N")]
    verbosity: Option<u8>,
    /// Directory of YAML files with Services and EndpointSlices (re-read on change).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// kubeconfig for API watchers of Services and EndpointSlices.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Dataplane.
    #[arg(long, value_enum, default_value = "iptables")]
    proxy_mode: Mode,
    /// iptables flavour: "" (system default), "nft" or "legacy".
    #[arg(long, default_value = "")]
    iptables_variant: String,
    /// Who writes the iptables-legacy tables: "kernel" (IPT_SO_SET_REPLACE on a socket, no
    /// process; payloads outside its subset fall back to iptables-restore), "restore"
    /// (iptables-restore), or "auto" (kernel for the legacy flavour and IPv4, restore for
    /// the nf_tables flavour and IPv6).
    #[arg(long, default_value = "auto")]
    iptables_writer: hako_proxier::iptables::Writer,
    /// Pod CIDR; traffic from outside it to ClusterIPs is masqueraded.
    #[arg(long)]
    cluster_cidr: Option<String>,
    /// Masquerade all service traffic.
    #[arg(long)]
    masquerade_all: bool,
    /// CIDRs whose local addresses accept NodePorts (default: all local addresses;
    /// `primary`: the addresses of the default route's interface).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// iptables mode: NodePorts also on 127.0.0.0/8 (sets route_localnet=1 and adds the
    /// KUBE-FIREWALL martian-source drop), as kube-proxy's flag of the same name.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    iptables_localhost_nodeports: bool,
    /// Node name (endpoints with this nodeName are local). Default: the hostname.
    #[arg(long)]
    hostname_override: Option<String>,
    /// Minimum interval between syncs.
    #[arg(long, default_value = "1s", value_parser = parse_dur)]
    min_sync_period: Duration,
    /// Full resync period.
    #[arg(long, default_value = "1h", value_parser = parse_dur)]
    sync_period: Duration,
    /// Metrics address.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// Healthz address.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// IPVS scheduler (ipvs mode): rr, wrr, lc or sh.
    #[arg(long, default_value = "rr")]
    ipvs_scheduler: String,
    /// Dummy device holding the service addresses (ipvs mode).
    #[arg(long, default_value = hako_proxier::ipvs::DEFAULT_DEVICE)]
    ipvs_device: String,
    /// Longest time a removed real server keeps draining at weight 0 (ipvs mode).
    #[arg(long, default_value = "15m", value_parser = parse_dur)]
    ipvs_drain_timeout: Duration,
    /// Sync once and exit.
    #[arg(long)]
    once: bool,
    /// Log as JSON (same as --log-format json).
    #[arg(long, hide = true)]
    log_json: bool,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Ok(Duration::from_secs_f64(v * mult))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether the flag `id` was given on the command line (flags override the config file).
fn given(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

/// Applies a KubeProxyConfiguration to the flags not given on the command line; returns the
/// notes to log once logging is up.
fn apply_config(
    cli: &mut Cli,
    m: &ArgMatches,
    path: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    let (s, notes) = proxy_config::parse_kube_proxy_config(&text)
        .with_context(|| format!("--config {}", path.display()))?;
    if !given(m, "proxy_mode") {
        if let Some(mode) = s.mode {
            cli.proxy_mode = match mode {
                ProxyModeSetting::Iptables => Mode::Iptables,
                ProxyModeSetting::Ipvs => Mode::Ipvs,
                ProxyModeSetting::Nftables => Mode::Nftables,
            };
        }
    }
    let set = |given: bool, dst: &mut String, v: &Option<String>| {
        if let (false, Some(v)) = (given, v) {
            dst.clone_from(v);
        }
    };
    let mut cidr = cli.cluster_cidr.clone().unwrap_or_default();
    set(given(m, "cluster_cidr"), &mut cidr, &s.cluster_cidr);
    cli.cluster_cidr = (!cidr.is_empty()).then_some(cidr);
    if !given(m, "hostname_override") && s.hostname_override.is_some() {
        cli.hostname_override.clone_from(&s.hostname_override);
    }
    if !given(m, "kubeconfig") && !given(m, "config_dir") {
        if let Some(k) = &s.kubeconfig {
            cli.kubeconfig = Some(PathBuf::from(k));
        }
    }
    if let (false, Some(a)) = (given(m, "healthz_bind_address"), s.healthz_bind_address) {
        cli.healthz_bind_address = a;
    }
    if let (false, Some(a)) = (given(m, "metrics_bind_address"), s.metrics_bind_address) {
        cli.metrics_bind_address = a;
    }
    if let (false, Some(a)) = (given(m, "nodeport_addresses"), &s.node_port_addresses) {
        cli.nodeport_addresses.clone_from(a);
    }
    let mode = match cli.proxy_mode {
        Mode::Iptables => ProxyModeSetting::Iptables,
        Mode::Ipvs => ProxyModeSetting::Ipvs,
        Mode::Nftables => ProxyModeSetting::Nftables,
    };
    let sync = s.sync_for(mode);
    if let (false, Some(d)) = (given(m, "sync_period"), sync.sync_period) {
        cli.sync_period = d;
    }
    if let (false, Some(d)) = (given(m, "min_sync_period"), sync.min_sync_period) {
        cli.min_sync_period = d;
    }
    if let (false, Some(b)) = (given(m, "masquerade_all"), sync.masquerade_all) {
        cli.masquerade_all = b;
    }
    if let (false, Some(b)) = (
        given(m, "iptables_localhost_nodeports"),
        s.iptables_localhost_nodeports,
    ) {
        cli.iptables_localhost_nodeports = b;
    }
    set(
        given(m, "ipvs_scheduler"),
        &mut cli.ipvs_scheduler,
        &s.ipvs_scheduler,
    );
    if !given(m, "verbosity") && s.verbosity.is_some() {
        cli.verbosity = s.verbosity;
    }
    if !given(m, "log_format") && !cli.log_json && s.log_format.as_deref() == Some("json") {
        cli.log_format = LogFormat::Json;
    }
    Ok(notes)
}

/// The iptables backend over the real binaries of `variant` with `writer`, dual-stack as
/// `IptablesBackend::real` (IPv6 through ip6tables when the kernel and the binaries have it).
fn iptables_backend(
    variant: &str,
    writer: hako_proxier::iptables::Writer,
    render: RenderOpts,
) -> IptablesBackend<hako_proxier::RealIptables> {
    use hako_proxier::iptables::Family;
    let b = IptablesBackend::new(
        hako_proxier::RealIptables::with_variant(variant).with_writer(writer),
        render,
    );
    let ip6 =
        hako_proxier::RealIptables::with_variant_family(variant, Family::V6).with_writer(writer);
    if std::path::Path::new("/proc/sys/net/ipv6").exists() && ip6.available() {
        tracing::info!(binary = %ip6.restore, "IPv6 services through ip6tables");
        b.with_ipv6(ip6)
    } else {
        tracing::warn!("no IPv6 (kernel or ip6tables missing): IPv6 services are not programmed");
        b
    }
}

/// The cleanup options of this command line: its iptables flavour (all of them for
/// --cleanup) and both dummy device names.
fn cleanup_opts(cli: &Cli, full: bool) -> CleanupOpts {
    let mut variants = vec![cli.iptables_variant.clone()];
    if full {
        variants.extend(["legacy".to_string(), "nft".to_string()]);
    }
    let mut devices = vec![cli.ipvs_device.clone()];
    if cli.ipvs_device != hako_proxier::ipvs::DEFAULT_DEVICE {
        devices.push(hako_proxier::ipvs::DEFAULT_DEVICE.to_string());
    }
    CleanupOpts {
        iptables_variants: variants,
        ipvs_devices: devices,
        ipvs_always: full,
    }
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches)?;
    let notes = match cli.config.clone() {
        Some(p) => apply_config(&mut cli, &matches, &p)?,
        None => Vec::new(),
    };
    let format = if cli.log_json {
        LogFormat::Json
    } else {
        cli.log_format
    };
    logging::init(format, cli.verbosity);
    for n in notes {
        tracing::warn!("--config: {n}");
    }
    if cli.cleanup {
        let (report, errs) = cleanup::cleanup(Scope::All, true, &cleanup_opts(&cli, true));
        tracing::info!(
            chains = report.chains,
            nft_tables = report.nft_tables,
            ipvs_services = report.ipvs_services,
            devices = report.devices,
            ipsets = report.ipsets,
            "cleanup done"
        );
        for e in &errs {
            tracing::error!("cleanup: {e}");
        }
        if !errs.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    // As kube-proxy: starting in one mode removes what the other modes left.
    let (scope, nft) = match cli.proxy_mode {
        Mode::Iptables => (Scope::IpvsOnly, true),
        Mode::Ipvs => (Scope::IptablesOnly, true),
        Mode::Nftables => (Scope::All, false),
    };
    let (report, errs) = cleanup::cleanup(scope, nft, &cleanup_opts(&cli, false));
    if report != cleanup::CleanupReport::default() {
        tracing::info!(mode = ?cli.proxy_mode, ?report, "removed other modes' leftovers");
    }
    for e in errs {
        tracing::warn!("removing other modes' leftovers: {e}");
    }
    let dir = match (&cli.config_dir, &cli.kubeconfig) {
        (Some(_), Some(_)) => bail!("--config-dir and --kubeconfig exclude each other"),
        (None, None) => bail!("--config-dir DIR or --kubeconfig FILE is required"),
        (d, _) => d.clone(),
    };
    let render = RenderOpts {
        cluster_cidr: cli.cluster_cidr.clone(),
        masquerade_all: cli.masquerade_all,
        nodeport_addresses: hako_proxier::nodeaddr::resolve(&cli.nodeport_addresses)?,
        localhost_nodeports: cli.iptables_localhost_nodeports
            && matches!(cli.proxy_mode, Mode::Iptables),
    };
    let opts = ProxierOpts {
        hostname: cli.hostname_override.clone().unwrap_or_else(hostname),
        render: render.clone(),
    };
    let backend: Box<dyn hako_proxier::Backend> = if matches!(cli.proxy_mode, Mode::Ipvs) {
        let o = hako_proxier::ipvs::IpvsOpts {
            scheduler: cli.ipvs_scheduler.clone(),
            device: cli.ipvs_device.clone(),
            drain_bound: cli.ipvs_drain_timeout,
            render: render.clone(),
            iptables_variant: cli.iptables_variant.clone(),
        };
        Box::new(hako_proxier::ipvs::IpvsBackend::new(o).context("starting IPVS mode")?)
    } else if matches!(cli.proxy_mode, Mode::Nftables) {
        Box::new(hako_proxier::NftablesBackend::new(render))
    } else {
        Box::new(iptables_backend(
            &cli.iptables_variant,
            cli.iptables_writer,
            render,
        ))
    };
    let mut proxier = Proxier::new(backend, opts)
        .with_conntrack(Box::new(hako_proxier::conntrack::NetlinkConntrack));
    // The runner decides the periodic full resync; the proxier's own check agrees.
    proxier.full_period = cli.sync_period;
    let mut runner = Runner::new(RunnerConfig::new(cli.min_sync_period, cli.sync_period));
    let status = runner.status();

    let healthy_within = cli.sync_period.max(Duration::from_secs(60)) * 2;
    if !cli.once {
        let st = status.clone();
        metrics::serve(cli.metrics_bind_address, move |path| match path {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                st.lock().map(|s| s.metrics.render()).unwrap_or_default(),
            ),
            _ => (404, "text/plain", "not found\n".into()),
        })
        .with_context(|| format!("binding {}", cli.metrics_bind_address))?;
        let st = status.clone();
        metrics::serve(cli.healthz_bind_address, move |path| {
            if path != "/healthz" && path != "/livez" {
                return (404, "text/plain", "not found\n".into());
            }
            // Healthy from the start until a sync is overdue.
            let age = st
                .lock()
                .map(|s| s.last_success.unwrap_or(s.started).elapsed())
                .unwrap_or_default();
            let code = if age <= healthy_within { 200 } else { 503 };
            (
                code,
                "application/json",
                format!(
                    "{{\"lastUpdated\": \"{:.0}s ago\", \"currentTime\": \"\"}}\n",
                    age.as_secs_f64()
                ),
            )
        })
        .with_context(|| format!("binding {}", cli.healthz_bind_address))?;
    }

    match (&cli.kubeconfig, dir) {
        (Some(kc), _) => {
            let (tx, rx) = std::sync::mpsc::channel();
            hako_proxier::kube::spawn_watchers(kc, tx)?;
            let mut source = WatchSource::new(rx);
            if cli.once {
                runner
                    .run_once(&mut proxier, &mut source)
                    .map_err(|_| anyhow::anyhow!("the API watchers stopped"))??;
                return Ok(());
            }
            match runner.run(&mut proxier, &mut source) {
                Ok(RunEnd::Closed) => bail!("the API watchers stopped"),
                Err(never) => match never {},
            }
        }
        (None, Some(dir)) => {
            let mut source = DirSource::new(dir.clone());
            let reading = || format!("reading {}", dir.display());
            if cli.once {
                runner
                    .run_once(&mut proxier, &mut source)
                    .with_context(reading)??;
                return Ok(());
            }
            match runner
                .run(&mut proxier, &mut source)
                .with_context(reading)?
            {
                RunEnd::Closed => bail!("the config directory source stopped"),
            }
        }
        (None, None) => bail!("--config-dir DIR or --kubeconfig FILE is required"),
    }
}
