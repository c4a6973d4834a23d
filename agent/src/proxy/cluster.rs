//! Cluster mode's in-agent proxier (`--kubeconfig` with `--proxy-mode iptables|nftables|ipvs`):
//! the proxier `hako-proxy` runs, fed by the same Service and EndpointSlice watchers
//! (`hako_proxier::kube::spawn_watchers` and its `Mapper`), so one binary can be the node's
//! kubelet and kube-proxy. `--proxy-mode none` (the cluster-mode default) leaves Services to
//! `hako-proxy` or kube-proxy.
//!
//! Effectful: a thread of its own (the watchers run on another, with their own tokio
//! runtime), programming the kernel through the chosen backend. The sync cadence (rate limit,
//! back-off, hourly full resync, the kube-proxy metrics and the healthz timestamp) is
//! `hako_proxier::runner::Runner`'s, fed by a `WatchSource`; this module adds the agent's
//! metrics and log line through the runner's observer. [`masquerade_cidr`] and the observer
//! are unit-tested with a fake backend.

use crate::api::healthz::AgentMetrics;
use crate::proxy::standalone::ProxyMode;
use hako_proxier::kube::{WatchError, WatchEvent};
use hako_proxier::metrics;
use hako_proxier::runner::{
    RunEnd, Runner, RunnerConfig, SharedStatus, SyncEvent, SyncWhen, WatchSource,
};
use hako_proxier::{Proxier, SyncError};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// What the in-agent proxier needs.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Dataplane ([`ProxyMode::None`]: nothing is started).
    pub mode: ProxyMode,
    /// The node's kubeconfig (nodes may list and watch Services and EndpointSlices).
    pub kubeconfig: PathBuf,
    /// Node name: endpoints with this `nodeName` are local (`externalTrafficPolicy` /
    /// `internalTrafficPolicy: Local`).
    pub node_name: String,
    /// iptables flavour ("", "nft", "legacy") for the iptables and IPVS modes.
    pub iptables_variant: String,
    /// Traffic to a ClusterIP from outside this CIDR is masqueraded (see [`masquerade_cidr`]).
    pub cluster_cidr: Option<String>,
    /// Shortest interval between two syncs (events in between are batched).
    pub min_sync_period: Duration,
    /// Prometheus metrics (`/metrics`, kube-proxy's names), as kube-proxy's
    /// `--metrics-bind-address`; None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz` and `/livez` as kube-proxy's `--healthz-bind-address` (200 while a sync
    /// succeeded within the last two minutes, else 503); None: not served.
    pub healthz_addr: Option<SocketAddr>,
}

/// Parses a `--proxy-*-bind-address` flag ("" disables).
pub fn bind_address(s: &str) -> Result<Option<SocketAddr>, ProxyError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.trim()
        .parse()
        .map(Some)
        .map_err(|e| ProxyError::Address(s.to_string(), e))
}

/// How long the proxier stays healthy without a successful sync (kube-proxy: twice its
/// 60 s healthz timeout base).
const HEALTHY_WITHIN: Duration = Duration::from_secs(120);

/// The runner's timing: a check (and a sync, changed or not) at most every
/// `min_sync_period`, back-off 100 ms to 30 s while syncs fail, a full resync hourly (the
/// proxier's own `full_period`).
fn runner_config(min_sync_period: Duration) -> RunnerConfig {
    RunnerConfig {
        min_sync_period,
        sync_period: Duration::from_secs(3600),
        sync_when: SyncWhen::EveryPeriod,
        backoff_min: hako_proxier::runner::BACKOFF_MIN,
        backoff_max: hako_proxier::runner::BACKOFF_MAX,
    }
}

/// The sync runner with the agent's observer ([`observe`]).
fn runner(min_sync_period: Duration) -> Runner {
    let runner = Runner::new(runner_config(min_sync_period));
    let status = runner.status();
    runner.with_observer(move |ev| observe(&status, ev))
}

/// What the agent adds to each sync the runner ran: its own metrics, the "service rules
/// synced" line, and the kube-proxy figures of syncs that wrote nothing (the runner records
/// only syncs that wrote rules; this proxier has always recorded every successful sync in
/// `kubeproxy_sync_proxy_rules_duration_seconds`, so its figures stay as they were).
fn observe(status: &SharedStatus, ev: &SyncEvent<'_>) {
    match ev {
        SyncEvent::Synced { stats, took, .. } => {
            if stats.is_idle() {
                let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                st.metrics.observe_sync(false, *took, 0);
            }
            AgentMetrics::shared().observe_proxy_sync(*took);
            if stats.full || stats.services_written > 0 {
                tracing::info!(
                    full = stats.full,
                    services = stats.services_written,
                    rules = stats.rules,
                    took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                    "service rules synced"
                );
            }
        }
        SyncEvent::Failed { .. } => AgentMetrics::shared().proxy_sync_error(),
    }
}

/// Starts the endpoints that were asked for, reading the runner's status.
fn serve(status: &SharedStatus, opts: &ProxyOptions) -> Result<(), ProxyError> {
    if let Some(a) = opts.metrics_addr {
        let st = status.clone();
        metrics::serve(a, move |path| match path {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                st.lock().map(|s| s.metrics.render()).unwrap_or_default(),
            ),
            _ => (404, "text/plain", "not found\n".into()),
        })
        .map_err(|e| ProxyError::Bind(a, e))?;
    }
    if let Some(a) = opts.healthz_addr {
        let st = status.clone();
        metrics::serve(a, move |path| {
            if path != "/healthz" && path != "/livez" {
                return (404, "text/plain", "not found\n".into());
            }
            let age = st
                .lock()
                .ok()
                .and_then(|s| s.last_success.map(|t| t.elapsed()));
            healthz(age)
        })
        .map_err(|e| ProxyError::Bind(a, e))?;
    }
    Ok(())
}

/// The `/healthz` answer for the age of the last successful sync (None: none yet), in
/// kube-proxy's JSON shape.
fn healthz(age: Option<Duration>) -> (u16, &'static str, String) {
    let (code, last) = match age {
        Some(a) if a <= HEALTHY_WITHIN => (200, format!("{:.0}s ago", a.as_secs_f64())),
        Some(a) => (503, format!("{:.0}s ago", a.as_secs_f64())),
        None => (503, "never".to_string()),
    };
    (
        code,
        "application/json",
        format!(
            "{{\"lastUpdated\": \"{last}\", \"healthy\": {}}}\n",
            code == 200
        ),
    )
}

/// The CIDR the proxier treats as "pod traffic" (not masqueraded towards a ClusterIP): the
/// first IPv4 `--cluster-cidr` (else the first one); without one, the node's own pod CIDR
/// (kube-proxy's `--detect-local-mode=NodeCIDR`: only this node's pods count as local, which
/// is all a node's proxier sees in PREROUTING). None when neither is known.
pub fn masquerade_cidr(cluster: &[IpNet], node_pod_cidrs: &[IpNet]) -> Option<String> {
    let pick = |v: &[IpNet]| {
        v.iter()
            .find(|c| matches!(c, IpNet::V4(_)))
            .or_else(|| v.first())
            .map(|c| c.trunc().to_string())
    };
    pick(cluster).or_else(|| pick(node_pod_cidrs))
}

/// Why the proxier did not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The backend could not be set up (e.g. IPVS without the ip_vs modules). The cause is
    /// in the message, not a `source`, so it is printed once.
    #[error("proxy mode {0:?}: {1}")]
    Backend(ProxyMode, SyncError),
    /// The watchers could not start (kubeconfig); the cause is in the message.
    #[error("Service/EndpointSlice watchers: {0}")]
    Watchers(WatchError),
    /// The thread could not start.
    #[error("proxier thread: {0}")]
    Thread(std::io::Error),
    /// A `--proxy-*-bind-address` flag is not an address.
    #[error("bind address {0:?}: {1}")]
    Address(String, std::net::AddrParseError),
    /// The metrics or healthz endpoint could not listen.
    #[error("listening on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Starts the proxier thread: builds the backend and the watchers (errors are returned at
/// once), then syncs for as long as the process runs. None for [`ProxyMode::None`].
///
/// Blocks the caller until start-up is done; call it from a blocking context (the watchers
/// build a tokio runtime of their own on a fresh thread, never inside the caller's).
pub fn start(opts: ProxyOptions) -> Result<Option<std::thread::JoinHandle<()>>, ProxyError> {
    if opts.mode == ProxyMode::None {
        return Ok(None);
    }
    if opts.cluster_cidr.is_none() {
        tracing::warn!(
            "proxier: no --cluster-cidr or --pod-cidr; traffic to ClusterIPs is not masqueraded"
        );
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), ProxyError>>(1);
    let handle = std::thread::Builder::new()
        .name("proxier".into())
        .spawn(move || {
            let proxier = match crate::proxy::standalone::proxier_for_mode(
                opts.mode,
                &opts.node_name,
                &opts.iptables_variant,
                opts.cluster_cidr.clone(),
            ) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    let _ = ready_tx.send(Ok(()));
                    return;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(ProxyError::Backend(opts.mode, e)));
                    return;
                }
            };
            let rx = match watch(&opts) {
                Ok(rx) => rx,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let runner = runner(opts.min_sync_period);
            if let Err(e) = serve(&runner.status(), &opts) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            tracing::info!(mode = ?opts.mode, node = %opts.node_name,
                cluster_cidr = ?opts.cluster_cidr, metrics = ?opts.metrics_addr,
                healthz = ?opts.healthz_addr, "proxier started");
            run(proxier, rx, &opts, runner);
        })
        .map_err(ProxyError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Some(handle)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(ProxyError::Thread(std::io::Error::other(
                "the proxier thread ended during start-up",
            )))
        }
    }
}

fn watch(opts: &ProxyOptions) -> Result<Receiver<WatchEvent>, ProxyError> {
    let (tx, rx) = std::sync::mpsc::channel();
    hako_proxier::kube::spawn_watchers(&opts.kubeconfig, tx).map_err(ProxyError::Watchers)?;
    Ok(rx)
}

/// Syncs from the watchers forever; if the watcher thread ever dies, it is started again
/// (every 5 s until it starts) and its relist replaces what the proxier knew. The runner,
/// and with it the metrics and the healthz timestamp, carries on across restarts.
fn run(
    mut proxier: Proxier,
    mut rx: Receiver<WatchEvent>,
    opts: &ProxyOptions,
    mut runner: Runner,
) {
    loop {
        match runner.run(&mut proxier, &mut WatchSource::new(rx)) {
            Ok(RunEnd::Closed) => {}
            Err(never) => match never {},
        }
        tracing::error!("proxier: the Service/EndpointSlice watchers stopped; restarting them");
        rx = loop {
            std::thread::sleep(Duration::from_secs(5));
            match watch(opts) {
                Ok(r) => break r,
                Err(e) => tracing::warn!("proxier: {e}"),
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hako_proxier::kube::Mapper;
    use hako_proxier::kube::WatchEvent::{Service as S, Slice as L};
    use kube::runtime::watcher::Event;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    #[test]
    fn masquerade_cidr_prefers_the_cluster_cidr() {
        assert_eq!(
            masquerade_cidr(
                &[net("fd00:244::/48"), net("10.244.0.0/16")],
                &[net("10.244.3.0/24")]
            )
            .as_deref(),
            Some("10.244.0.0/16")
        );
        assert_eq!(
            masquerade_cidr(&[], &[net("10.244.3.7/24")]).as_deref(),
            Some("10.244.3.0/24"),
            "node CIDR, truncated"
        );
        assert_eq!(
            masquerade_cidr(&[net("fd00:244::/48")], &[]).as_deref(),
            Some("fd00:244::/48")
        );
        assert_eq!(masquerade_cidr(&[], &[]), None);
    }

    fn svc() -> k8s_openapi::api::core::v1::Service {
        serde_yaml::from_str(
            "metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.50, ports: [{name: http, port: 80, targetPort: 8080}]}",
        )
        .expect("svc")
    }

    fn slice(ips: &[&str]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let eps: Vec<String> = ips
            .iter()
            .map(|ip| {
                format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: node-b}}")
            })
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]",
            eps.join(", ")
        ))
        .expect("slice")
    }

    /// Sends `evs` on a fresh channel and runs `runner` until it closes, continuing `mapper`
    /// (what was listed stays listed); returns the mapper for the next feed.
    fn feed(
        runner: &mut Runner,
        proxier: &mut Proxier,
        mapper: Mapper,
        evs: Vec<WatchEvent>,
    ) -> Mapper {
        let (tx, rx) = std::sync::mpsc::channel();
        for e in evs {
            tx.send(e).expect("send");
        }
        drop(tx);
        let mut src = WatchSource::with_mapper(rx, mapper);
        match runner.run(proxier, &mut src) {
            Ok(RunEnd::Closed) => {}
            Err(never) => match never {},
        }
        src.into_mapper()
    }

    /// `kubeproxy_sync_proxy_rules_duration_seconds_count` (all syncs) and the partial
    /// one, as `/metrics` shows them.
    fn sync_counts(runner: &Runner) -> (u64, u64) {
        let text = runner.status().lock().expect("status").metrics.render();
        let count = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        (
            count("kubeproxy_sync_proxy_rules_duration_seconds_count "),
            count("kubeproxy_sync_partial_proxy_rules_duration_seconds_count "),
        )
    }

    #[test]
    fn healthz_follows_the_last_successful_sync() {
        assert_eq!(healthz(None).0, 503);
        let (code, ctype, body) = healthz(Some(Duration::from_secs(3)));
        assert_eq!((code, ctype), (200, "application/json"));
        assert!(body.contains("\"lastUpdated\": \"3s ago\""), "{body}");
        assert_eq!(healthz(Some(Duration::from_secs(121))).0, 503);
        assert_eq!(bind_address("").ok(), Some(None));
        assert_eq!(
            bind_address("127.0.0.1:10249").ok(),
            Some(Some("127.0.0.1:10249".parse().expect("addr")))
        );
        assert!(bind_address("localhost").is_err());
    }

    #[test]
    fn watch_events_reach_the_rules_only_after_both_lists() {
        let fake = hako_proxier::FakeIptables::default();
        let state = fake.state.clone();
        let backend = hako_proxier::IptablesBackend::new(fake, Default::default());
        let mut proxier = Proxier::new(
            Box::new(backend),
            hako_proxier::ProxierOpts {
                hostname: "node-a".into(),
                ..Default::default()
            },
        );
        let last = || {
            state
                .lock()
                .expect("state")
                .restores
                .last()
                .cloned()
                .unwrap_or_default()
        };
        let mut runner = runner(Duration::from_millis(5));
        let last_success = |r: &Runner| r.status().lock().expect("status").last_success;
        // Services listed, slices not yet: nothing is programmed (no half picture).
        let mapper = feed(
            &mut runner,
            &mut proxier,
            Mapper::default(),
            vec![
                S(Event::Init),
                S(Event::InitApply(svc())),
                S(Event::InitDone),
            ],
        );
        assert_eq!(last(), "");
        assert!(last_success(&runner).is_none(), "no sync yet");
        // Slices listed: the sync programs both endpoints.
        let mapper = feed(
            &mut runner,
            &mut proxier,
            mapper,
            vec![
                L(Event::Init),
                L(Event::InitApply(slice(&["10.244.2.5", "10.244.2.6"]))),
                L(Event::InitDone),
            ],
        );
        assert!(last_success(&runner).is_some());
        assert_eq!(sync_counts(&runner), (1, 0));
        let rules = last();
        assert!(rules.contains("10.96.0.50/32"), "{rules}");
        assert!(rules.contains("10.244.2.5:8080"), "{rules}");
        assert!(rules.contains("10.244.2.6:8080"), "{rules}");
        // An endpoint leaves: the next sync drops it.
        let mapper = feed(
            &mut runner,
            &mut proxier,
            mapper,
            vec![L(Event::Apply(slice(&["10.244.2.6"])))],
        );
        let rules = last();
        assert!(!rules.contains("10.244.2.5:8080"), "{rules}");
        assert!(rules.contains("10.244.2.6:8080"), "{rules}");
        assert_eq!(sync_counts(&runner), (2, 1));
        // Nothing new: the check still syncs (a no-op for the rules) and, as this proxier
        // always did, counts it and refreshes the healthz timestamp.
        let restores = state.lock().expect("state").restores.len();
        let before = last_success(&runner);
        feed(&mut runner, &mut proxier, mapper, vec![]);
        assert_eq!(state.lock().expect("state").restores.len(), restores);
        assert_eq!(sync_counts(&runner), (3, 2));
        assert!(last_success(&runner) > before);
    }
}
