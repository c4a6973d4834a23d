//! `hako-proxy`: the proxier as a daemon, fed from a directory of Service/EndpointSlice YAML
//! files (re-read on change), with metrics and healthz endpoints like kube-proxy's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use hako_proxier::metrics;
use hako_proxier::runner::{DirSource, RunEnd, Runner, RunnerConfig, WatchSource};
use hako_proxier::{IptablesBackend, Proxier, ProxierOpts, RenderOpts};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Iptables,
    Nftables,
    Ipvs,
}

/// hako service proxier: Services and EndpointSlices as kube-proxy-compatible rules
#[derive(Parser, Debug)]
#[command(name = "hako-proxy", version, about)]
struct Cli {
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
    /// Log as JSON.
    #[arg(long)]
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
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
        Box::new(IptablesBackend::real(&cli.iptables_variant, render))
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
