//! Root tests of the proxier's iptables backend with real traffic: the rules are applied
//! inside a node namespace (the proxier runs on a thread that entered it), backends answer
//! from pod namespaces, clients connect from pod namespaces or from another node.
#![cfg(feature = "root")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use hako_proxier::iptables::IptablesError;
use hako_proxier::{Iptables, IptablesBackend, Proxier, ProxierOpts, RealIptables, RenderOpts};
use hako_tests::service_net::{connect, counts, service, slice, ServiceNet, B, NODE};
use hako_tests::NetNs;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Real iptables that also keeps every payload for assertions.
#[derive(Clone)]
struct Recording {
    real: RealIptables,
    payloads: Arc<Mutex<Vec<String>>>,
}

impl Iptables for Recording {
    fn restore(&mut self, text: &str) -> Result<(), IptablesError> {
        self.payloads.lock().unwrap().push(text.to_string());
        self.real.restore(text)
    }
    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        self.real.chain_exists(table, chain)
    }
    fn ensure_base(&mut self, localhost: bool) -> Result<(), IptablesError> {
        self.real.ensure_base(localhost)
    }
    fn set_route_localnet(&mut self) -> Result<(), IptablesError> {
        self.real.set_route_localnet()
    }
    fn list_service_chains(&mut self) -> Result<BTreeSet<String>, IptablesError> {
        self.real.list_service_chains()
    }
}

struct Env {
    variant: String,
    net: ServiceNet,
    proxier: Proxier,
    payloads: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Env {
    type Target = ServiceNet;
    fn deref(&self) -> &ServiceNet {
        &self.net
    }
}

impl Env {
    /// Node 0 runs the proxier; backends b1..bN on bridge kb (10.244.1.0/24); the client pod
    /// on bridge kc (10.244.2.0/24); node 1 is "outside".
    fn new(backends: usize, variant: &str) -> Env {
        let net = ServiceNet::new(backends);
        let render = RenderOpts {
            cluster_cidr: Some("10.244.0.0/16".into()),
            ..RenderOpts::default()
        };
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let ipt = Recording {
            real: RealIptables::with_variant(variant),
            payloads: payloads.clone(),
        };
        // The canary is looked for at every sync here (hako-proxy: every 30 s), so the
        // repair test sees a flushed table at its next sync.
        let proxier = Proxier::new(
            Box::new(
                IptablesBackend::new(ipt, render.clone())
                    .with_canary_period(std::time::Duration::ZERO),
            ),
            ProxierOpts {
                hostname: NODE.into(),
                render,
            },
        );
        Env {
            variant: variant.to_string(),
            net,
            proxier,
            payloads,
        }
    }

    fn sync(&mut self) -> hako_proxier::SyncStats {
        let p = &mut self.proxier;
        let s = self.net.topo.nodes[0].ns.run(|| p.sync()).unwrap().unwrap();
        if self.variant == "legacy" {
            // The legacy flavour's IPv4 tables are written by the kernel writer; it must not
            // have fallen back to the binaries.
            let n =
                hako_proxier::iptables::KERNEL_FALLBACKS.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(n, 0, "kernel writer fell back to iptables-legacy-restore");
        }
        s
    }
}

fn clusterip_spread_affinity_reject(variant: &str) {
    let mut env = Env::new(3, variant);
    env.proxier.on_service_add(service("web", "10.96.0.10", ""));
    env.proxier.on_endpointslice_add(slice("web", &B));
    env.proxier.on_service_add(service(
        "sticky",
        "10.96.0.11",
        ", sessionAffinity: ClientIP",
    ));
    env.proxier.on_endpointslice_add(slice("sticky", &B));
    env.proxier
        .on_service_add(service("empty", "10.96.0.12", ""));
    assert!(env.sync().full);

    let (answers, _) = connect(&env.client, "10.96.0.10 80", 300);
    let c = counts(&answers);
    assert_eq!(c.values().sum::<usize>(), 300, "{c:?}");
    for b in ["b1", "b2", "b3"] {
        let n = c.get(b).copied().unwrap_or(0);
        assert!((50..=150).contains(&n), "{b} got {n} of 300: {c:?}");
    }

    let (answers, _) = connect(&env.client, "10.96.0.11 80", 30);
    let c = counts(&answers);
    assert_eq!(c.len(), 1, "affinity must stick to one backend: {c:?}");
    assert!(!c.contains_key("FAIL"), "{c:?}");

    let (answers, err) = connect(&env.client, "10.96.0.12 80", 1);
    assert_eq!(answers, vec!["FAIL".to_string()]);
    assert!(err.contains("refused"), "no endpoints must refuse: {err}");
    assert_eq!(env.pods.len(), 3);
}

fn nodeport_and_local_policy(variant: &str) {
    let mut env = Env::new(1, variant);
    let node_ip = env.topo.nodes[0].ip.to_string();
    // Cluster policy: reachable, source masqueraded.
    env.proxier
        .on_service_add(service("np", "10.96.0.20", ", type: NodePort"));
    env.proxier.on_endpointslice_add(slice("np", &B[..1]));
    // Local policy with a local endpoint: reachable, client IP kept.
    env.proxier.on_service_add(service(
        "loc",
        "10.96.0.21",
        ", type: NodePort, externalTrafficPolicy: Local",
    ));
    env.proxier.on_endpointslice_add(slice("loc", &B[..1]));
    // Local policy, endpoint on another node only: dropped.
    env.proxier.on_service_add(service(
        "remote",
        "10.96.0.22",
        ", type: NodePort, externalTrafficPolicy: Local",
    ));
    env.proxier
        .on_endpointslice_add(slice("remote", &[("10.244.1.11", "node-b")]));
    env.sync();

    let outside = &env.topo.nodes[1].ns;
    let (a, _) = connect(outside, &format!("{node_ip} 30020"), 1);
    assert_eq!(a, vec!["b1".to_string()]);
    let (a, _) = connect(outside, &format!("{node_ip} 30021"), 1);
    assert_eq!(a, vec!["b1".to_string()]);
    let ct = env
        .node()
        .sh("conntrack -L -p tcp 2>/dev/null | grep -E 'dport=3002[01] ' || true")
        .unwrap();
    let line20 = ct
        .lines()
        .find(|l| l.contains("dport=30020 "))
        .unwrap_or("");
    let line21 = ct
        .lines()
        .find(|l| l.contains("dport=30021 "))
        .unwrap_or("");
    assert!(
        line20.contains("dst=10.244.1.1 "),
        "cluster policy masquerades: {ct}"
    );
    assert!(
        line21.contains("dst=192.0.2.12 "),
        "local policy keeps the client IP: {ct}"
    );
    let (a, err) = connect(outside, &format!("{node_ip} 30022"), 1);
    assert_eq!(a, vec!["FAIL".to_string()], "no local endpoint must drop");
    assert!(!err.contains("refused"), "dropped, not rejected: {err}");
}

fn partial_sync_and_repair(variant: &str) {
    let mut env = Env::new(2, variant);
    env.proxier.on_service_add(service("one", "10.96.0.30", ""));
    env.proxier.on_endpointslice_add(slice("one", &B[..2]));
    env.proxier.on_service_add(service("two", "10.96.0.31", ""));
    env.proxier.on_endpointslice_add(slice("two", &B[..2]));
    assert!(env.sync().full);
    let ipt = if variant.is_empty() {
        "iptables".to_string()
    } else {
        format!("iptables-{variant}")
    };
    let before = env.node().sh(&format!("{ipt}-save -t nat")).unwrap();

    env.proxier.on_endpointslice_update(slice("one", &B[1..2]));
    let s = env.sync();
    assert!(!s.full, "{s:?}");
    assert_eq!(s.services_written, 1);
    let last = env.payloads.lock().unwrap().last().unwrap().clone();
    assert!(last.contains("t/one:p -> 10.244.1.12:8080"), "{last}");
    assert!(
        !last.contains("t/two:p ->"),
        "two's chains must not be written:\n{last}"
    );
    let (a, _) = connect(&env.client, "10.96.0.30 80", 20);
    assert_eq!(counts(&a).keys().collect::<Vec<_>>(), vec!["b2"]);
    let after = env.node().sh(&format!("{ipt}-save -t nat")).unwrap();
    let sep_count = |s: &str| s.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count();
    assert_eq!(sep_count(&before), 4, "{before}");
    assert_eq!(
        sep_count(&after),
        3,
        "stale endpoint chain removed:\n{after}"
    );
    let (a, _) = connect(&env.client, "10.96.0.31 80", 20);
    assert_eq!(counts(&a).len(), 2, "two still balanced: {a:?}");

    // Flush everything by hand: the next sync repairs it.
    env.node()
        .sh(&format!(
            "for t in nat filter mangle; do {ipt} -w -t $t -F; {ipt} -w -t $t -X; done"
        ))
        .unwrap();
    let (a, _) = connect(&env.client, "10.96.0.31 80", 1);
    assert_eq!(a, vec!["FAIL".to_string()]);
    assert!(env.sync().full);
    let (a, _) = connect(&env.client, "10.96.0.31 80", 1);
    assert!(a[0] == "b1" || a[0] == "b2", "{a:?}");
}

#[test]
fn iptables_clusterip_spread_affinity_reject() {
    clusterip_spread_affinity_reject("");
}

#[test]
fn iptables_legacy_clusterip_spread_affinity_reject() {
    clusterip_spread_affinity_reject("legacy");
}

#[test]
fn iptables_nodeport_and_local_policy() {
    nodeport_and_local_policy("");
}

#[test]
fn iptables_legacy_nodeport_and_local_policy() {
    nodeport_and_local_policy("legacy");
}

#[test]
fn iptables_partial_sync_and_repair() {
    partial_sync_and_repair("");
}

#[test]
fn iptables_legacy_partial_sync_and_repair() {
    partial_sync_and_repair("legacy");
}

/// A UDP server in `ns` answering every datagram with `name`, until `stop` is set.
fn udp_server(
    ns: &NetNs,
    name: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let sock = ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:5353"))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(name.as_bytes(), peer);
            }
        }
    })
}

/// With `flush`, the flow moves to the new endpoint; without it, conntrack keeps it on the
/// removed one (which shows the flush is what moves it).
fn udp_flow_after_endpoint_removal(variant: &str, flush: bool) {
    let mut env = Env::new(0, variant);
    let node = &env.topo.nodes[0];
    let b1 = node.add_pod("kb", "10.244.1.11/24", "10.244.1.1").unwrap();
    let b2 = node.add_pod("kb", "10.244.1.12/24", "10.244.1.1").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let servers = [
        udp_server(&b1, "b1", stop.clone()),
        udp_server(&b2, "b2", stop.clone()),
    ];
    let client = env
        .client
        .run(|| {
            let s = std::net::UdpSocket::bind("10.244.2.10:40000")?;
            s.connect("10.96.0.40:53")?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let ask = || hako_tests::topology::udp_ask(&client);
    let udp_svc = |slice_eps: &str| -> (Service, EndpointSlice) {
        (
            serde_yaml::from_str(
                "metadata: {name: dns, namespace: t}\nspec: {clusterIP: 10.96.0.40, ports: [{name: p, port: 53, protocol: UDP}]}",
            )
            .unwrap(),
            serde_yaml::from_str(&format!(
                "metadata: {{name: dns-1, namespace: t, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{name: p, port: 5353, protocol: UDP}}]\nendpoints: [{{addresses: [{slice_eps}]}}]"
            ))
            .unwrap(),
        )
    };
    let (svc, sl) = udp_svc("10.244.1.11");
    if flush {
        env.proxier = std::mem::replace(
            &mut env.proxier,
            Proxier::new(
                Box::new(IptablesBackend::new(
                    RealIptables::with_variant(variant),
                    RenderOpts::default(),
                )),
                ProxierOpts::default(),
            ),
        )
        .with_conntrack(Box::new(hako_proxier::conntrack::NetlinkConntrack));
    }
    env.proxier.on_service_add(svc);
    env.proxier.on_endpointslice_add(sl);
    env.sync();
    assert_eq!(ask(), "b1");
    assert_eq!(ask(), "b1", "same flow, same backend");
    let (_, sl) = udp_svc("10.244.1.12");
    env.proxier.on_endpointslice_update(sl);
    assert!(!env.sync().full);
    // b1 still answers if anything still sends it traffic: only the flush moves the flow.
    if flush {
        assert_eq!(
            ask(),
            "b2",
            "the flow must move once its endpoint is removed"
        );
    } else {
        assert_eq!(
            ask(),
            "b1",
            "without a flush conntrack keeps the old endpoint"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn iptables_udp_flow_moves_after_endpoint_removal() {
    udp_flow_after_endpoint_removal("", true);
}

#[test]
fn iptables_udp_flow_stays_without_conntrack_flush() {
    udp_flow_after_endpoint_removal("", false);
}

#[test]
fn iptables_legacy_udp_flow_moves_after_endpoint_removal() {
    udp_flow_after_endpoint_removal("legacy", true);
}

/// TCP and UDP servers in `ns` on `[::]:8080` / `[::]:5353` answering `name`, until `stop`.
fn v6_servers(
    ns: &NetNs,
    name: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (tcp, udp) = ns
        .run(|| {
            Ok::<_, std::io::Error>((
                std::net::TcpListener::bind("[::]:8080")?,
                std::net::UdpSocket::bind("[::]:5353")?,
            ))
        })
        .unwrap()
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_millis(20)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((mut c, _)) = tcp.accept() {
                use std::io::Write as _;
                let _ = c.set_nonblocking(false);
                let _ = writeln!(c, "{name}");
            }
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(name.as_bytes(), peer);
            }
        }
    })
}

/// IPv6 through ip6tables (dual-stack backend): a client namespace reaches an IPv6
/// ClusterIP answered by backends in two other namespaces, a service without endpoints
/// refuses at once, and a UDP flow moves after its endpoint is removed (IPv6 conntrack
/// entries flushed over netlink). ULA addresses, inside the test's namespaces only.
fn ipv6_clusterip_reject_udp(variant: &str) {
    use hako_proxier::iptables::Family;
    hako_tests::netns::require_root();
    let node = NetNs::new("n6").unwrap();
    let client = NetNs::new("c6").unwrap();
    let b1 = NetNs::new("b61").unwrap();
    let b2 = NetNs::new("b62").unwrap();
    for ns in [&node, &client, &b1, &b2] {
        ns.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0")
            .unwrap();
    }
    let link = |peer: &NetNs, here: &str, net: &str| {
        node.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            peer.name(),
        ])
        .unwrap();
        node.ip(&["addr", "add", &format!("{net}1/64"), "dev", here, "nodad"])
            .unwrap();
        node.ip(&["link", "set", here, "up"]).unwrap();
        peer.ip(&[
            "addr",
            "add",
            &format!("{net}11/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
        peer.ip(&["link", "set", "eth0", "up"]).unwrap();
        peer.ip(&["link", "set", "lo", "up"]).unwrap();
        peer.ip(&["route", "add", "default", "via", &format!("{net}1")])
            .unwrap();
    };
    link(&client, "c0", "fd00:9::");
    link(&b1, "v1", "fd00:244:1::");
    link(&b2, "v2", "fd00:244:2::");
    node.sh("sysctl -qw net.ipv6.conf.all.forwarding=1")
        .unwrap();
    // Service IPs need a route for rejects to happen in FORWARD (as the v4 tests do); not
    // back out of the client's link, where the kernel's redirect would use up the ICMPv6
    // rate-limit token that the REJECT's port-unreachable needs.
    node.sh("ip -6 route add default via fd00:244:2::11 dev v2")
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let servers = [
        v6_servers(&b1, "b1", stop.clone()),
        v6_servers(&b2, "b2", stop.clone()),
    ];
    let render = RenderOpts {
        cluster_cidr: Some("10.244.0.0/16,fd00:244::/48".into()),
        ..RenderOpts::default()
    };
    let backend = IptablesBackend::new(RealIptables::with_variant(variant), render.clone())
        .with_ipv6(RealIptables::with_variant_family(variant, Family::V6));
    let mut proxier = Proxier::new(
        Box::new(backend),
        ProxierOpts {
            hostname: NODE.into(),
            render,
        },
    )
    .with_conntrack(Box::new(hako_proxier::conntrack::NetlinkConntrack));
    let svc = |name: &str, ip: &str, port: &str| -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: t}}\nspec: {{ipFamilies: [IPv6], clusterIPs: ['{ip}'], clusterIP: '{ip}', ports: [{port}]}}"
        ))
        .unwrap()
    };
    let slice6 = |name: &str, port: &str, ips: &[&str]| -> EndpointSlice {
        let eps: Vec<String> = ips
            .iter()
            .map(|i| format!("{{addresses: ['{i}']}}"))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv6\nports: [{port}]\nendpoints: [{}]",
            eps.join(",")
        ))
        .unwrap()
    };
    proxier.on_service_add(svc("web6", "fd00:96::60", "{name: p, port: 80}"));
    proxier.on_endpointslice_add(slice6(
        "web6",
        "{name: p, port: 8080}",
        &["fd00:244:1::11", "fd00:244:2::11"],
    ));
    proxier.on_service_add(svc("empty6", "fd00:96::61", "{name: p, port: 80}"));
    let udp_port = "{name: p, port: 53, protocol: UDP}";
    let udp_target = "{name: p, port: 5353, protocol: UDP}";
    proxier.on_service_add(svc("dns6", "fd00:96::53", udp_port));
    proxier.on_endpointslice_add(slice6("dns6", udp_target, &["fd00:244:1::11"]));
    assert!(node.run(|| proxier.sync()).unwrap().unwrap().full);

    let dial = |ip: &str| {
        client
            .run(|| {
                let addr: std::net::SocketAddr = format!("[{ip}]:80").parse().unwrap();
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
                    .and_then(|mut s| {
                        use std::io::Read as _;
                        let mut out = String::new();
                        s.read_to_string(&mut out).map(|_| out.trim().to_string())
                    })
            })
            .unwrap()
    };
    // Neighbour discovery of the fresh links may cost a first SYN: retries count as failures
    // only when every one of them fails.
    let mut seen = BTreeMap::new();
    let mut fails = Vec::new();
    for _ in 0..60 {
        match dial("fd00:96::60") {
            Ok(who) => *seen.entry(who).or_insert(0) += 1,
            Err(e) => fails.push(e.to_string()),
        }
    }
    let dbg = || {
        node.sh("ip6tables-save -t nat 2>&1 | head -40; ip -6 route; ip -6 neigh")
            .unwrap_or_default()
    };
    assert!(
        fails.len() <= 3,
        "failures {fails:?}, answers {seen:?}\n{}",
        dbg()
    );
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b2"],
        "both IPv6 backends answer: {seen:?}\n{}",
        dbg()
    );
    let err = dial("fd00:96::61").expect_err("no endpoints");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{err}\n{}",
        node.sh("ip6tables-save -c -t filter; ip6tables-legacy-save -c -t filter; ip -6 route")
            .unwrap_or_default()
    );
    // Refused (an ICMPv6 port unreachable from the REJECT), not a timeout. Observed: the
    // client's TCP acts on the answer to the SYN retransmission (~1 s), not the first one.
    let save = if variant.is_empty() {
        "ip6tables-save".to_string()
    } else {
        format!("ip6tables-{variant}-save")
    };
    let nat = node.sh(&format!("{save} -t nat")).unwrap();
    assert!(
        nat.contains("-d fd00:96::60/128 -p tcp -m comment --comment \"t/web6:p cluster IP\"")
            || nat.contains("t/web6:p cluster IP"),
        "{nat}"
    );
    assert!(
        nat.contains("--to-destination [fd00:244:2::11]:8080"),
        "{nat}"
    );

    // UDP: the flow sticks to b1, then moves to b2 once b1's endpoint is removed.
    let sock = client
        .run(|| {
            let s = std::net::UdpSocket::bind("[fd00:9::11]:40000")?;
            s.connect("[fd00:96::53]:53")?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let ask = || hako_tests::topology::udp_ask(&sock);
    assert_eq!(ask(), "b1");
    assert_eq!(ask(), "b1", "same flow, same backend");
    proxier.on_endpointslice_update(slice6("dns6", udp_target, &["fd00:244:2::11"]));
    assert!(!node.run(|| proxier.sync()).unwrap().unwrap().full);
    assert_eq!(
        ask(),
        "b2",
        "the IPv6 flow must move once its endpoint is removed"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn ip6tables_clusterip_reject_udp_flow() {
    ipv6_clusterip_reject_udp("");
}

#[test]
fn ip6tables_legacy_clusterip_reject_udp_flow() {
    ipv6_clusterip_reject_udp("legacy");
}
