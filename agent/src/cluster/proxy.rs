//! Cluster mode's in-agent proxier (`--kubeconfig` with `--proxy-mode iptables|nftables|ipvs`):
//! the proxier `hako-proxy` runs, fed by the same Service and EndpointSlice watchers
//! (`hako_proxier::kube::spawn_watchers` and its `Mapper`), so one binary can be the node's
//! kubelet and kube-proxy. `--proxy-mode none` (the cluster-mode default) leaves Services to
//! `hako-proxy` or kube-proxy.
//!
//! Effectful: a thread of its own (the watchers run on another, with their own tokio
//! runtime), programming the kernel through the chosen backend. [`masquerade_cidr`] and the
//! event pump are pure enough to be unit-tested with a fake backend.

use crate::services::ProxyMode;
use hako_proxier::kube::{Mapper, WatchEvent};
use hako_proxier::Proxier;
use ipnet::IpNet;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

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
    /// The backend could not be set up (e.g. IPVS without the ip_vs modules).
    #[error("proxy mode {0:?}: {1}")]
    Backend(ProxyMode, String),
    /// The watchers could not start (kubeconfig).
    #[error("Service/EndpointSlice watchers: {0}")]
    Watchers(String),
    /// The thread could not start.
    #[error("proxier thread: {0}")]
    Thread(std::io::Error),
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
            let proxier = match crate::services::proxier_for_mode(
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
                    let _ = ready_tx.send(Err(ProxyError::Backend(opts.mode, format!("{e:#}"))));
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
            let _ = ready_tx.send(Ok(()));
            tracing::info!(mode = ?opts.mode, node = %opts.node_name,
                cluster_cidr = ?opts.cluster_cidr, "proxier started");
            run(proxier, rx, &opts);
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
    hako_proxier::kube::spawn_watchers(&opts.kubeconfig, tx)
        .map_err(|e| ProxyError::Watchers(format!("{e:#}")))?;
    Ok(rx)
}

/// Syncs from the watchers forever; if the watcher thread ever dies, it is started again and
/// its relist replaces what the proxier knew.
fn run(mut proxier: Proxier, mut rx: Receiver<WatchEvent>, opts: &ProxyOptions) {
    loop {
        let mut mapper = Mapper::default();
        pump(&mut proxier, &mut mapper, &rx, opts.min_sync_period);
        tracing::error!("proxier: the Service/EndpointSlice watchers stopped; restarting them");
        loop {
            std::thread::sleep(Duration::from_secs(5));
            match watch(opts) {
                Ok(r) => {
                    rx = r;
                    break;
                }
                Err(e) => tracing::warn!("proxier: {e}"),
            }
        }
    }
}

/// Feeds watch events to the proxier and syncs at most every `min_period` (once both kinds
/// were listed), backing off up to 30 s while syncs fail. Returns when the channel closes.
fn pump(
    proxier: &mut Proxier,
    mapper: &mut Mapper,
    rx: &Receiver<WatchEvent>,
    min_period: Duration,
) {
    let mut wait = min_period;
    let mut failing = false;
    let mut closed = false;
    while !closed {
        let until = Instant::now() + wait;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(ev) => mapper.handle(ev, proxier),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    // Program what was received, then hand back.
                    closed = true;
                    break;
                }
            }
        }
        if !mapper.ready() {
            continue;
        }
        let t = Instant::now();
        match proxier.sync() {
            Ok(s) => {
                if s.full || s.services_written > 0 {
                    tracing::info!(
                        full = s.full,
                        services = s.services_written,
                        rules = s.rules,
                        took_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "service rules synced"
                    );
                }
                if failing {
                    tracing::info!("proxier sync recovered");
                }
                failing = false;
                wait = min_period;
            }
            Err(e) => {
                wait = (wait * 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
                tracing::warn!("proxier sync failed (retry in {wait:?}): {e}");
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// Sends `evs` on a fresh channel and pumps until it closes.
    fn feed(proxier: &mut Proxier, mapper: &mut Mapper, evs: Vec<WatchEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        for e in evs {
            tx.send(e).expect("send");
        }
        drop(tx);
        pump(proxier, mapper, &rx, Duration::from_millis(5));
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
        let mut mapper = Mapper::default();
        // Services listed, slices not yet: nothing is programmed (no half picture).
        feed(
            &mut proxier,
            &mut mapper,
            vec![
                S(Event::Init),
                S(Event::InitApply(svc())),
                S(Event::InitDone),
            ],
        );
        assert_eq!(last(), "");
        // Slices listed: the sync programs both endpoints.
        feed(
            &mut proxier,
            &mut mapper,
            vec![
                L(Event::Init),
                L(Event::InitApply(slice(&["10.244.2.5", "10.244.2.6"]))),
                L(Event::InitDone),
            ],
        );
        let rules = last();
        assert!(rules.contains("10.96.0.50/32"), "{rules}");
        assert!(rules.contains("10.244.2.5:8080"), "{rules}");
        assert!(rules.contains("10.244.2.6:8080"), "{rules}");
        // An endpoint leaves: the next sync drops it.
        feed(
            &mut proxier,
            &mut mapper,
            vec![L(Event::Apply(slice(&["10.244.2.6"])))],
        );
        let rules = last();
        assert!(!rules.contains("10.244.2.5:8080"), "{rules}");
        assert!(rules.contains("10.244.2.6:8080"), "{rules}");
    }
}
