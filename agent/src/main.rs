//! `hako-agent`: command-line entry point (effectful: reads the manifest directory and the pod
//! records under the root dir; prints to stdout, which is the user interface).
#![allow(clippy::print_stdout)]

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hako_agent::manifest::{SourceEvent, SourcedPod, StaticPodOptions};
use hako_agent::{actions, dns, env, observed, qos, record, render, source, state, status};
use k8s_openapi::chrono::Utc;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// hako node agent (kubelet-like).
///
/// THIS VERSION RUNS NOTHING. With --pod-manifest-path it loads and validates the manifests,
/// reports every malformed document, and prints what it would run for each pod (QoS class,
/// oom_score_adj, first planned actions, resolved environment, resolv.conf). Starting sandboxes
/// and containers lands with the runtime, CNI and proxier integration.
#[derive(Parser, Debug)]
#[command(name = "hako-agent", version, about, long_about)]
struct Cli {
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
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List pods from their records (<root>/pods/*/status.json).
    Get {
        /// Resource type: pods.
        #[arg(value_parser = ["pods", "pod", "po"])]
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
    },
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut out = std::io::stdout().lock();
    match &cli.command {
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
        Some(Cmd::Describe { name, .. }) => {
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
            write!(out, "{}", render::describe(rec, Utc::now()))?;
        }
        None => {
            let Some(dir) = &cli.pod_manifest_path else {
                anyhow::bail!(
                    "nothing to do: pass --pod-manifest-path DIR, or a subcommand (see --help)"
                );
            };
            let ok = dry_run(&cli, dir, &mut out)?;
            if let Some(secs) = cli.watch {
                watch(&cli, dir, secs, &mut out)?;
            }
            if !ok {
                std::process::exit(1);
            }
        }
    }
    Ok(())
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
        "hako-agent: dry run (nothing is started yet): {} pod(s), {} configmap(s), {} secret(s), {} service(s), {} rejected document(s) from {}",
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
    s: &hako_agent::manifest::Snapshot,
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
