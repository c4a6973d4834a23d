//! Root tests of issue 18's proxier items, each in fresh namespaces: localhost NodePorts in
//! iptables mode (answered on 127.0.0.1 inside the node's namespace, with kube-proxy's
//! safety rules and `route_localnet`), none in nftables mode; and `hako-proxy --kubeconfig`
//! syncing a change at once when its last sync is older than `--min-sync-period` (and
//! batching one that comes sooner), with the kube-proxy metrics it serves.
#![cfg(feature = "root")]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hako_proxier::{IptablesBackend, NftablesBackend, Proxier, ProxierOpts, RealIptables};
use hako_proxier::{RenderOpts, SyncStats};
use hako_tests::apiserver::ApiServer;
use hako_tests::netns::require_root;
use hako_tests::service_net::{connect, service, slice, ServiceNet, B, NODE};
use hako_tests::NetNs;
use serde_json::json;

fn proxier(render: RenderOpts, nft: bool, variant: &str) -> Proxier {
    let backend: Box<dyn hako_proxier::Backend> = if nft {
        Box::new(NftablesBackend::new(render.clone()))
    } else {
        Box::new(IptablesBackend::new(
            RealIptables::with_variant(variant),
            render.clone(),
        ))
    };
    Proxier::new(
        backend,
        ProxierOpts {
            hostname: NODE.into(),
            render,
        },
    )
}

fn sync(net: &ServiceNet, p: &mut Proxier) -> SyncStats {
    net.node().run(|| p.sync()).unwrap().unwrap()
}

/// A NodePort service (30020) with backend b1, synced in the node's namespace.
fn nodeport(net: &ServiceNet, localhost: bool, nft: bool, variant: &str) -> Proxier {
    let render = RenderOpts {
        cluster_cidr: Some("10.244.0.0/16".into()),
        localhost_nodeports: localhost,
        ..RenderOpts::default()
    };
    let mut p = proxier(render, nft, variant);
    p.on_service_add(service("np", "10.96.0.20", ", type: NodePort"));
    p.on_endpointslice_add(slice("np", &B[..1]));
    assert!(sync(net, &mut p).full);
    p
}

fn localhost_nodeport_iptables(variant: &str) {
    require_root();
    let net = ServiceNet::new(1);
    let node = net.node();
    node.sh("ip link set lo up").unwrap();
    assert_eq!(
        node.sh("sysctl -n net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "0",
        "a fresh namespace starts without route_localnet"
    );
    let node_ip = net.topo.nodes[0].ip.to_string();
    let _p = nodeport(&net, true, false, variant);
    let (a, err) = connect(node, "127.0.0.1 30020", 1);
    assert_eq!(a, ["b1"], "NodePort on 127.0.0.1: {err}");
    let (a, _) = connect(node, &format!("{node_ip} 30020"), 1);
    assert_eq!(a, ["b1"], "NodePort on the node IP");
    // The source of a localhost connection is masqueraded: 127.0.0.1 cannot leave the node.
    let ct = node
        .sh("conntrack -L -p tcp 2>/dev/null | grep 'dport=30020 ' || true")
        .unwrap();
    let lo = ct
        .lines()
        .find(|l| l.contains("dst=127.0.0.1 "))
        .unwrap_or("");
    assert!(
        lo.contains("src=10.244.1.11 ") && lo.contains("dst=10.244.1.1 "),
        "masqueraded to the bridge address: {ct}"
    );
    // kube-proxy's safety rules.
    assert_eq!(
        node.sh("sysctl -n net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "1"
    );
    let ipt = RealIptables::with_variant(variant).iptables;
    let fw = node.sh(&format!("{ipt} -w -S KUBE-FIREWALL")).unwrap();
    assert!(
        fw.contains("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"),
        "{fw}"
    );
    for chain in ["INPUT", "OUTPUT"] {
        let rules = node.sh(&format!("{ipt} -w -S {chain}")).unwrap();
        assert!(
            rules
                .lines()
                .any(|l| l == format!("-A {chain} -j KUBE-FIREWALL")),
            "{chain}: {rules}"
        );
    }
    // The drop rule works: a packet to 127.0.0.1 from elsewhere (the node's own address as
    // source, not DNATed: a ping) is dropped in OUTPUT before it reaches anyone.
    let before = node
        .sh(&format!(
            "{ipt} -w -L KUBE-FIREWALL -v -x -n | awk '/DROP/ {{print $1}}'"
        ))
        .unwrap();
    let _ = node.sh_output(&format!("busybox ping -c 1 -W 1 -I {node_ip} 127.0.0.1"));
    let after = node
        .sh(&format!(
            "{ipt} -w -L KUBE-FIREWALL -v -x -n | awk '/DROP/ {{print $1}}'"
        ))
        .unwrap();
    let n = |s: &str| s.trim().parse::<u64>().unwrap_or(0);
    assert!(
        n(&after) > n(&before),
        "a martian to 127.0.0.1 must hit the drop rule: {before} -> {after}"
    );
}

fn no_localhost_nodeport_when_off(variant: &str) {
    require_root();
    let net = ServiceNet::new(1);
    let node = net.node();
    node.sh("ip link set lo up").unwrap();
    let node_ip = net.topo.nodes[0].ip.to_string();
    let _p = nodeport(&net, false, false, variant);
    let (a, _) = connect(node, &format!("{node_ip} 30020"), 1);
    assert_eq!(a, ["b1"]);
    let (a, _) = connect(node, "127.0.0.1 30020", 1);
    assert_eq!(a, ["FAIL"], "--iptables-localhost-nodeports=false");
    let nat = node
        .sh(&format!(
            "{} -w -t nat -S KUBE-SERVICES",
            RealIptables::with_variant(variant).iptables
        ))
        .unwrap();
    assert!(nat.contains("! -d 127.0.0.0/8"), "{nat}");
    assert_eq!(
        node.sh("sysctl -n net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "0"
    );
}

#[test]
fn iptables_localhost_nodeport_answers_with_safety_rules() {
    localhost_nodeport_iptables("");
}

#[test]
fn iptables_legacy_localhost_nodeport_answers_with_safety_rules() {
    localhost_nodeport_iptables("legacy");
}

#[test]
fn iptables_localhost_nodeport_off() {
    no_localhost_nodeport_when_off("");
}

#[test]
fn nftables_mode_has_no_localhost_nodeports() {
    require_root();
    let net = ServiceNet::new(1);
    let node = net.node();
    node.sh("ip link set lo up").unwrap();
    let node_ip = net.topo.nodes[0].ip.to_string();
    // The option is on, as hako-proxy's flag default; nftables mode ignores it (as
    // kube-proxy's nftables mode has no localhost NodePorts).
    let _p = nodeport(&net, true, true, "");
    let (a, _) = connect(node, &format!("{node_ip} 30020"), 1);
    assert_eq!(a, ["b1"], "NodePort on the node IP");
    let (a, _) = connect(node, "127.0.0.1 30020", 1);
    assert_eq!(a, ["FAIL"], "no NodePort on 127.0.0.1 in nftables mode");
    assert_eq!(
        node.sh("sysctl -n net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "0"
    );
}

#[test]
fn nodeport_addresses_primary_are_the_default_route_interface_addresses() {
    require_root();
    let net = ServiceNet::new(0);
    let node_ip = net.topo.nodes[0].ip.to_string();
    let got = net
        .node()
        .run(|| hako_proxier::nodeaddr::resolve(&["primary".into(), "10.0.0.0/8".into()]))
        .unwrap()
        .unwrap();
    // The node's underlay address (its default route's interface), not the bridges'.
    assert_eq!(got, [format!("{node_ip}/32"), "10.0.0.0/8".into()]);
    // Without a default route there is no primary address: an error, not an empty list.
    net.node().sh("ip route del default").unwrap();
    let routes = net.node().sh("ip route").unwrap();
    let err = net
        .node()
        .run(hako_proxier::nodeaddr::primary_addresses)
        .unwrap()
        .expect_err(&routes);
    assert!(err.to_string().contains("no default route"), "{err}");
}

// ---- the daemon ----------------------------------------------------------------------

fn proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HAKO_PROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("hako-proxy");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p hako-proxier` with the same target dir first",
        p.display()
    );
    p
}

struct Daemon(Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn api_slice(ips: &[&str], trigger: &str) -> serde_json::Value {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "t",
                     "labels": {"kubernetes.io/service-name": "web"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    })
}

fn now_rfc3339() -> String {
    k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

/// `GET /metrics` from inside the namespace.
fn metrics(ns: &NetNs) -> String {
    ns.run(|| -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect("127.0.0.1:10249")?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })
    .unwrap()
    .unwrap_or_default()
}

/// Polls `/metrics` until `pred` holds (10 s at most: the rules are in the kernel before the
/// runner records the sync).
fn metrics_when(ns: &NetNs, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(ns);
        if pred(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls the nat table until `pred` holds or `limit` passes; returns whether it held.
fn nat_within(ns: &NetNs, d: &mut Daemon, limit: Duration, pred: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if pred(&ns.sh("iptables-save -t nat").unwrap()) {
            return true;
        }
        if let Ok(Some(st)) = d.0.try_wait() {
            panic!("hako-proxy exited ({st}):\n{}", d.log());
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kube-proxy's bounded-frequency runner: with `--min-sync-period 12s`, a change that comes
/// when the last sync is older than that is programmed at once (it used to wait for the next
/// check, up to 12 s later); one that comes sooner waits for the period (batched).
#[test]
fn daemon_syncs_at_once_after_a_quiet_period_and_serves_kube_proxy_metrics() {
    require_root();
    const MIN: u64 = 12;
    let ns = NetNs::new("ptime").unwrap();
    ns.sh("ip link set lo up").unwrap();
    let api = ns.run(ApiServer::start).unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, &api.admin_token()).unwrap();
    api.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "t"},
        "spec": {"clusterIP": "10.96.0.60", "type": "NodePort",
                 "ports": [{"name": "p", "port": 80, "nodePort": 30060, "protocol": "TCP"}]}
    }))
    .unwrap();
    api.create(api_slice(&["10.244.0.5"], &now_rfc3339()))
        .unwrap();

    let log = dir.path().join("hako-proxy.log");
    let mut d = Daemon(
        ns.command(proxy_bin().to_str().unwrap())
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--min-sync-period", &format!("{MIN}s")])
            .args(["--hostname-override", "n1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    );
    assert!(
        nat_within(&ns, &mut d, Duration::from_secs(30), |nat| {
            nat.contains("10.244.0.5:8080")
        }),
        "first sync:\n{}",
        d.log()
    );
    let synced_at = Instant::now();

    // The metrics kube-proxy has: process_*, the table label, network programming.
    let m = metrics_when(&ns, "the first sync in the metrics", |m| {
        metric(m, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= Some(1.0)
    });
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}",
        "kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\"}",
        "kubeproxy_network_programming_duration_seconds_count",
    ] {
        assert!(metric(&m, name).is_some(), "{name} missing:\n{m}");
    }
    assert!(
        metric(&m, "process_resident_memory_bytes").unwrap() > 1e6,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}"
        )
        .unwrap()
            > 5.0
    );
    // Localhost NodePorts are on by default in iptables mode: the safety rule is there.
    let fw = ns.sh("iptables -w -S KUBE-FIREWALL").unwrap();
    assert!(fw.contains("block incoming localnet connections"), "{fw}");
    let programmed = metric(&m, "kubeproxy_network_programming_duration_seconds_count").unwrap();
    assert!(
        programmed >= 1.0,
        "the listed slice had a trigger time:\n{m}"
    );

    // Let the last sync grow older than the period, then change an endpoint.
    std::thread::sleep(Duration::from_secs(MIN + 1).saturating_sub(synced_at.elapsed()));
    api.merge_patch(
        "discovery.k8s.io",
        "endpointslices",
        "t",
        "web-1",
        "",
        &api_slice(&["10.244.0.6"], &now_rfc3339()),
    )
    .unwrap();
    // Programmed at once: well within the period (the old loop's next check came up to a
    // whole period later).
    assert!(
        nat_within(&ns, &mut d, Duration::from_secs(MIN / 2), |nat| {
            nat.contains("10.244.0.6:8080") && !nat.contains("10.244.0.5:8080")
        }),
        "a change after a quiet period must not wait --min-sync-period:\n{}",
        d.log()
    );
    // The next change comes right after that sync: it is batched until the period is over.
    api.merge_patch(
        "discovery.k8s.io",
        "endpointslices",
        "t",
        "web-1",
        "",
        &api_slice(&["10.244.0.7"], &now_rfc3339()),
    )
    .unwrap();
    assert!(
        !nat_within(&ns, &mut d, Duration::from_secs(2), |nat| {
            nat.contains("10.244.0.7:8080")
        }),
        "a change within the period must wait for it:\n{}",
        d.log()
    );
    assert!(
        nat_within(&ns, &mut d, Duration::from_secs(3 * MIN), |nat| {
            nat.contains("10.244.0.7:8080")
        }),
        "the batched change is programmed when the period is over:\n{}",
        d.log()
    );
    let m = metrics_when(&ns, "both changes observed", |m| {
        metric(m, "kubeproxy_network_programming_duration_seconds_count") >= Some(programmed + 2.0)
    });
    let after = metric(&m, "kubeproxy_network_programming_duration_seconds_count").unwrap();
    assert!(
        after >= programmed + 2.0,
        "both changes were observed: {programmed} -> {after}\n{m}"
    );
    drop(d);
    drop(api);
}
