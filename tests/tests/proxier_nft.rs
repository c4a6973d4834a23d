//! Root tests of the proxier's netlink-native nftables backend with real traffic: the table
//! is programmed inside a node namespace (the proxier runs on a thread that entered it),
//! backends answer from pod namespaces, clients connect from pod namespaces or from another
//! node. Each test has its own namespaces, so its own `hako` table.
#![cfg(feature = "root")]

use std::collections::BTreeMap;
use std::sync::Arc;

use hako_proxier::{NftablesBackend, Proxier, ProxierOpts, RenderOpts};
use hako_tests::service_net::{connect, counts, service, slice, ServiceNet, B, NODE};
use hako_tests::NetNs;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

struct Env {
    net: ServiceNet,
    proxier: Proxier,
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
    fn new(backends: usize) -> Env {
        let net = ServiceNet::new(backends);
        let render = RenderOpts {
            cluster_cidr: Some("10.244.0.0/16".into()),
            ..RenderOpts::default()
        };
        let proxier = Proxier::new(
            Box::new(NftablesBackend::new(render.clone())),
            ProxierOpts {
                hostname: NODE.into(),
                render,
            },
        );
        Env { net, proxier }
    }

    fn sync(&mut self) -> hako_proxier::SyncStats {
        let p = &mut self.proxier;
        self.net.topo.nodes[0].ns.run(|| p.sync()).unwrap().unwrap()
    }
}

/// `nft` output in the node namespace (reading state only; the proxier itself never runs nft).
fn nft(env: &Env, args: &str) -> String {
    env.node().sh(&format!("nft {args}")).unwrap()
}

/// The chain a service IP's map element jumps to.
fn target_chain(env: &Env, ip: &str) -> String {
    let m = nft(env, "list map ip hako service-ips");
    let at = m
        .find(&format!("{ip} . tcp . 80 : goto "))
        .unwrap_or_else(|| panic!("{ip} not in map:\n{m}"));
    m[at..]
        .split("goto ")
        .nth(1)
        .unwrap()
        .split(|c: char| c == ',' || c.is_whitespace())
        .next()
        .unwrap()
        .to_string()
}

/// Rule handles of a chain.
fn handles(env: &Env, chain: &str) -> Vec<String> {
    nft(env, &format!("-a list chain ip hako {chain}"))
        .lines()
        .filter_map(|l| l.split("# handle ").nth(1).map(str::to_string))
        .collect()
}

#[test]
fn nft_clusterip_spread_affinity_reject() {
    let mut env = Env::new(3);
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

    let t = std::time::Instant::now();
    let (answers, err) = connect(&env.client, "10.96.0.12 80", 1);
    assert_eq!(answers, vec!["FAIL".to_string()]);
    assert!(err.contains("refused"), "no endpoints must refuse: {err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "refused at once, not after a timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(env.pods.len(), 3);
}

/// One TCP connection from `src` (an address of `ns`) to `dst`: the backend's answer, or
/// "FAIL: <error>".
fn ask_from(ns: &NetNs, src: &str, dst: &str) -> String {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    use std::io::Read as _;
    let src: std::net::SocketAddrV4 = format!("{src}:0").parse().unwrap();
    let dst: std::net::SocketAddrV4 = dst.parse().unwrap();
    ns.run(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let tv = nix::sys::time::TimeVal::new(2, 0);
        // Bounds the connect (SO_SNDTIMEO) and the read (SO_RCVTIMEO).
        setsockopt(&fd, sockopt::SendTimeout, &tv)?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(src))?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst))?;
        let mut out = String::new();
        std::net::TcpStream::from(fd)
            .read_to_string(&mut out)
            .map_err(|e| nix::Error::try_from(e).unwrap_or(nix::Error::EIO))?;
        Ok::<_, nix::Error>(out.trim().to_string())
    })
    .unwrap()
    .unwrap_or_else(|e| format!("FAIL: {e}"))
}

/// The backend every one of 5 connections from `src` reaches (panics unless it is one).
fn stuck_backend(ns: &NetNs, src: &str, dst: &str) -> String {
    let answers: Vec<String> = (0..5).map(|_| ask_from(ns, src, dst)).collect();
    let c = counts(&answers);
    assert_eq!(c.len(), 1, "client {src} must stick to one backend: {c:?}");
    let b = c.into_keys().next().unwrap();
    assert!(b.starts_with('b'), "client {src}: {b}");
    b
}

/// ClientIP affinity across endpoint changes: an endpoint going away (or coming back) moves
/// only its own clients; those get a new backend and keep it.
#[test]
fn nft_affinity_survives_endpoint_changes() {
    let mut env = Env::new(3);
    // Twelve client addresses on the client pod (10.244.2.10 is its first).
    let srcs: Vec<String> = (10..22).map(|i| format!("10.244.2.{i}")).collect();
    for s in &srcs[1..] {
        env.client
            .ip(&["addr", "add", &format!("{s}/24"), "dev", "eth0"])
            .unwrap();
    }
    env.proxier.on_service_add(service(
        "sticky",
        "10.96.0.13",
        ", sessionAffinity: ClientIP",
    ));
    env.proxier.on_endpointslice_add(slice("sticky", &B));
    assert!(env.sync().full);
    let svc = "10.96.0.13:80";
    let all = |env: &Env| -> BTreeMap<String, String> {
        srcs.iter()
            .map(|s| (s.clone(), stuck_backend(&env.client, s, svc)))
            .collect()
    };
    let ep = |b: &str| B[b[1..].parse::<usize>().unwrap() - 1];
    let first = all(&env);
    // Client A and a client B on another backend; z is the backend neither uses.
    let a = &srcs[0];
    let x = first[a].clone();
    let b = srcs
        .iter()
        .find(|s| first[*s] != x)
        .unwrap_or_else(|| panic!("all 12 clients on {x} (odds 1 in 177,147): {first:?}"));
    let y = first[b].clone();
    let z = ["b1", "b2", "b3"]
        .into_iter()
        .find(|n| *n != x && *n != y)
        .unwrap();

    // z's endpoint goes: every client of x and y keeps its backend (before stable ids the
    // whole affinity map was flushed); z's own clients move and stick.
    env.proxier
        .on_endpointslice_update(slice("sticky", &[ep(&x), ep(&y)]));
    assert!(!env.sync().full);
    let second = all(&env);
    for (s, was) in &first {
        if was == z {
            assert_ne!(second[s], z, "client {s} still on the removed endpoint");
        } else {
            assert_eq!(&second[s], was, "client {s} moved when {z} went away");
        }
    }

    // z comes back (slots shift again): nobody moves.
    env.proxier.on_endpointslice_update(slice("sticky", &B));
    assert!(!env.sync().full);
    assert_eq!(all(&env), second, "an added endpoint moved clients");

    // A's endpoint goes: A gets another backend and keeps it; B and every client not on x
    // stay where they were.
    let remaining: Vec<_> = B.iter().copied().filter(|e| *e != ep(&x)).collect();
    env.proxier
        .on_endpointslice_update(slice("sticky", &remaining));
    assert!(!env.sync().full);
    let third = all(&env);
    assert_ne!(third[a], x, "client A still on its removed endpoint");
    assert_eq!(third[b], y, "client B moved");
    for (s, was) in &second {
        if *was != x {
            assert_eq!(&third[s], was, "client {s} moved when {x} went away");
        }
    }
    // A keeps its new backend.
    assert_eq!(stuck_backend(&env.client, a, svc), third[a]);
    // nft still reads the table (the proxier itself never runs nft).
    let listing = nft(&env, "list table ip hako");
    assert!(listing.contains("delete @affinity-"), "{listing}");
}

#[test]
fn nft_nodeport_and_local_policy() {
    let mut env = Env::new(1);
    let node_ip = env.topo.nodes[0].ip.to_string();
    env.proxier
        .on_service_add(service("np", "10.96.0.20", ", type: NodePort"));
    env.proxier.on_endpointslice_add(slice("np", &B[..1]));
    env.proxier.on_service_add(service(
        "loc",
        "10.96.0.21",
        ", type: NodePort, externalTrafficPolicy: Local",
    ));
    env.proxier.on_endpointslice_add(slice("loc", &B[..1]));
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

#[test]
fn nft_partial_sync_and_repair() {
    let mut env = Env::new(2);
    env.proxier.on_service_add(service("one", "10.96.0.30", ""));
    env.proxier.on_endpointslice_add(slice("one", &B[..2]));
    env.proxier.on_service_add(service("two", "10.96.0.31", ""));
    env.proxier.on_endpointslice_add(slice("two", &B[..2]));
    env.proxier.on_service_add(service(
        "three",
        "10.96.0.32",
        ", sessionAffinity: ClientIP",
    ));
    env.proxier.on_endpointslice_add(slice("three", &B[..2]));
    assert!(env.sync().full);
    let one = target_chain(&env, "10.96.0.30");
    let two = target_chain(&env, "10.96.0.31");
    let three = target_chain(&env, "10.96.0.32");
    let two_before = handles(&env, &two);
    let three_before = handles(&env, &three);
    let one_before = handles(&env, &one);
    assert!(!two_before.is_empty() && !three_before.is_empty());
    let eps_map = |env: &Env, chain: &str| {
        let c = nft(env, &format!("list chain ip hako {chain}"));
        let m = c
            .split("map @")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        nft(env, &format!("list map ip hako {m}"))
    };
    let eps_before = eps_map(&env, &one);

    // One endpoint of "one" and one of "three" go away.
    env.proxier.on_endpointslice_update(slice("one", &B[1..2]));
    let s = env.sync();
    assert!(!s.full, "{s:?}");
    assert_eq!(s.services_written, 1);
    // two's chain is untouched (same rule handles); one's rule was rewritten.
    assert_eq!(handles(&env, &two), two_before);
    assert_eq!(handles(&env, &three), three_before);
    assert_ne!(handles(&env, &one), one_before);
    let eps_after = eps_map(&env, &one);
    assert_ne!(eps_before, eps_after);
    let (a, _) = connect(&env.client, "10.96.0.30 80", 20);
    assert_eq!(counts(&a).keys().collect::<Vec<_>>(), vec!["b2"]);
    let (a, _) = connect(&env.client, "10.96.0.31 80", 20);
    assert_eq!(counts(&a).len(), 2, "two still balanced: {a:?}");

    // Affinity service loses an endpoint: only its chain changes; it still answers.
    env.proxier
        .on_endpointslice_update(slice("three", &B[1..2]));
    assert!(!env.sync().full);
    assert_eq!(handles(&env, &two), two_before);
    let (a, _) = connect(&env.client, "10.96.0.32 80", 5);
    assert_eq!(counts(&a).keys().collect::<Vec<_>>(), vec!["b2"]);

    // Delete the table by hand: the next sync notices and repairs it.
    env.node().sh("nft delete table ip hako").unwrap();
    let (a, _) = connect(&env.client, "10.96.0.31 80", 1);
    assert_eq!(a, vec!["FAIL".to_string()]);
    assert!(env.sync().full);
    let (a, _) = connect(&env.client, "10.96.0.31 80", 1);
    assert!(a[0] == "b1" || a[0] == "b2", "{a:?}");

    // Flush its rules by hand: repaired too.
    env.node().sh("nft flush table ip hako").unwrap();
    assert!(env.sync().full);
    let (a, _) = connect(&env.client, "10.96.0.31 80", 1);
    assert!(a[0] == "b1" || a[0] == "b2", "{a:?}");
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

#[test]
fn nft_udp_flow_moves_after_endpoint_removal() {
    let mut env = Env::new(0);
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
    env.proxier = std::mem::replace(
        &mut env.proxier,
        Proxier::new(
            Box::new(NftablesBackend::new(RenderOpts::default())),
            ProxierOpts::default(),
        ),
    )
    .with_conntrack(Box::new(hako_proxier::conntrack::NetlinkConntrack));
    let (svc, sl) = udp_svc("10.244.1.11");
    env.proxier.on_service_add(svc);
    env.proxier.on_endpointslice_add(sl);
    env.sync();
    assert_eq!(ask(), "b1");
    assert_eq!(ask(), "b1", "same flow, same backend");
    let (_, sl) = udp_svc("10.244.1.12");
    env.proxier.on_endpointslice_update(sl);
    assert!(!env.sync().full);
    assert_eq!(
        ask(),
        "b2",
        "the flow must move once its endpoint is removed"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn nft_hairpin_and_load_balancer_source_ranges() {
    let mut env = Env::new(1);
    let node_ip = env.topo.nodes[0].ip.to_string();
    // Hairpin: the only backend reaches itself through its service.
    env.proxier.on_service_add(service("hp", "10.96.0.50", ""));
    env.proxier.on_endpointslice_add(slice("hp", &B[..1]));
    // A load balancer IP open only to 198.51.100.0/24 (not the outside node).
    let lb = |ranges: &str| -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: lb, namespace: t}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.51, loadBalancerSourceRanges: [{ranges}], ports: [{{name: p, port: 80, nodePort: 30051}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.9}}]}}}}"
        ))
        .unwrap()
    };
    env.proxier.on_service_add(lb("198.51.100.0/24"));
    env.proxier.on_endpointslice_add(slice("lb", &B[..1]));
    assert!(env.sync().full);

    let b1 = &env.pods["b1"];
    // As with kube-proxy, the bridge ports need hairpin mode (the CNI bridge plugin's
    // hairpinMode) when bridged traffic goes through netfilter.
    env.node()
        .sh("for p in $(ls /sys/class/net/kb/brif); do bridge link set dev $p hairpin on; done")
        .unwrap();
    let (a, err) = connect(b1, "10.96.0.50 80", 3);
    let ct = env
        .node()
        .sh("conntrack -L -p tcp 2>/dev/null | grep 'dst=10.96.0.50 ' || true")
        .unwrap();
    assert_eq!(a, vec!["b1".to_string(); 3], "hairpin: {err}\n{ct}");
    assert!(
        !ct.is_empty() && ct.lines().all(|l| l.contains("dst=10.244.1.1 ")),
        "hairpin traffic is masqueraded to the node: {ct}"
    );

    let outside = &env.topo.nodes[1].ns;
    outside
        .ip(&["route", "add", "203.0.113.9/32", "via", &node_ip])
        .unwrap();
    let (a, err) = connect(outside, "203.0.113.9 80", 1);
    assert_eq!(a, vec!["FAIL".to_string()], "source not in the ranges");
    assert!(!err.contains("refused"), "dropped, not rejected: {err}");
    env.proxier
        .on_service_update(lb("198.51.100.0/24, 192.0.2.0/24"));
    assert!(!env.sync().full);
    let outside = &env.topo.nodes[1].ns;
    let (a, _) = connect(outside, "203.0.113.9 80", 1);
    assert_eq!(a, vec!["b1".to_string()], "source now allowed");
}

/// IPv6: the `ip6 hako` table DNATs a ClusterIP (with ClientIP affinity) to an IPv6 backend
/// and refuses a service without endpoints, in namespaces of its own (node, client,
/// backend).
#[test]
fn nft_ipv6_clusterip_and_reject() {
    hako_tests::netns::require_root();
    let node = NetNs::new("n6").unwrap();
    let client = NetNs::new("c6").unwrap();
    let backend = NetNs::new("b6").unwrap();
    // No duplicate address detection: addresses (link-local ones too) usable at once.
    for ns in [&node, &client, &backend] {
        ns.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0")
            .unwrap();
    }
    let link = |peer: &NetNs, here: &str, there: &str, a_here: &str, a_there: &str, gw: &str| {
        node.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            peer.name(),
        ])
        .unwrap();
        node.ip(&["addr", "add", a_here, "dev", here, "nodad"])
            .unwrap();
        node.ip(&["link", "set", here, "up"]).unwrap();
        peer.ip(&["addr", "add", a_there, "dev", there, "nodad"])
            .unwrap();
        peer.ip(&["link", "set", there, "up"]).unwrap();
        peer.ip(&["route", "add", "default", "via", gw]).unwrap();
    };
    link(
        &client,
        "c0",
        "c1",
        "fd00:9::1/64",
        "fd00:9::2/64",
        "fd00:9::1",
    );
    link(
        &backend,
        "b0",
        "b1",
        "fd00:244:1::1/64",
        "fd00:244:1::11/64",
        "fd00:244:1::1",
    );
    node.sh("sysctl -qw net.ipv6.conf.all.forwarding=1")
        .unwrap();
    let listener = backend
        .run(|| std::net::TcpListener::bind("[::]:8080"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = std::thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, peer)) => {
                        use std::io::Write as _;
                        let _ = c.set_nonblocking(false);
                        let _ = writeln!(c, "{}", peer.ip());
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    });
    let mut proxier = Proxier::new(
        Box::new(NftablesBackend::new(RenderOpts::default())),
        ProxierOpts::default(),
    );
    let svc = |name: &str, ip: &str| -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: t}}\nspec: {{ipFamilies: [IPv6], clusterIPs: ['{ip}'], clusterIP: '{ip}', sessionAffinity: ClientIP, ports: [{{name: p, port: 80}}]}}"
        ))
        .unwrap()
    };
    proxier.on_service_add(svc("v6", "fd00:96::60"));
    proxier.on_service_add(svc("v6empty", "fd00:96::61"));
    proxier.on_endpointslice_add(
        serde_yaml::from_str(
            "metadata: {name: v6-1, namespace: t, labels: {kubernetes.io/service-name: v6}}\naddressType: IPv6\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: ['fd00:244:1::11']}]",
        )
        .unwrap(),
    );
    assert!(node.run(|| proxier.sync()).unwrap().unwrap().full);
    let dial = |ip: &str| {
        client
            .run(|| {
                let addr: std::net::SocketAddr = format!("[{ip}]:80").parse().unwrap();
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
                    .and_then(|mut s| {
                        use std::io::Read as _;
                        let mut out = String::new();
                        s.read_to_string(&mut out).map(|_| out)
                    })
            })
            .unwrap()
    };
    // Neighbour discovery of the fresh links may cost the first SYN: a few tries.
    let mut first = dial("fd00:96::60");
    for _ in 0..3 {
        if first.is_ok() {
            break;
        }
        first = dial("fd00:96::60");
    }
    let got = first.unwrap_or_else(|e| {
        let dbg = node
            .sh("ip -6 addr; ip -6 route; ip -6 neigh; conntrack -L -f ipv6 2>&1; sysctl net.ipv6.conf.all.forwarding")
            .unwrap();
        let dbg2 = backend.sh("ip -6 addr; ip -6 route; ss -ltn").unwrap();
        panic!("ClusterIP not answered: {e}\n{dbg}\n{dbg2}")
    });
    assert_eq!(
        got.trim(),
        "fd00:9::2",
        "DNAT to the IPv6 backend, client address kept"
    );
    // ClientIP affinity: the second connection goes through the remembered entry.
    assert_eq!(dial("fd00:96::60").unwrap().trim(), "fd00:9::2");
    let t = std::time::Instant::now();
    let err = dial("fd00:96::61").expect_err("no endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    let listing = node.sh("nft list table ip6 hako").unwrap();
    assert!(
        listing.contains("fd00:96::60 . tcp . 80 : goto svc-"),
        "{listing}"
    );
    // The client's affinity entry holds the endpoint's id (the value its rule compares).
    let entry = listing
        .lines()
        .find(|l| l.contains("fd00:9::2 expires"))
        .unwrap_or_else(|| panic!("no affinity entry: {listing}"));
    let id = entry
        .rsplit(": ")
        .next()
        .unwrap()
        .trim_end_matches([' ', '}']);
    assert!(
        listing.contains(&format!(" : {id} }} dnat to [fd00:244:1::11]:8080")),
        "{entry}\n{listing}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
}

/// Partial syncs that remove a port of a service, then a whole service, leave nothing of
/// them in the kernel: no chain, no service-ips element, no endpoint element, no hairpin
/// element of an address nobody else uses; the rest still answers.
#[test]
fn nft_partial_removals_leave_nothing_behind() {
    let mut env = Env::new(2);
    let two_ports = |ports: &str| -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: multi, namespace: t}}\nspec: {{clusterIP: 10.96.0.40, ports: [{ports}]}}"
        ))
        .unwrap()
    };
    let multi_slice: EndpointSlice = serde_yaml::from_str(&format!(
        "metadata: {{name: multi-1, namespace: t, labels: {{kubernetes.io/service-name: multi}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}, {{name: q, port: 8080}}]\nendpoints: [{{addresses: [{}]}}, {{addresses: [{}]}}]",
        B[0].0, B[1].0
    ))
    .unwrap();
    env.proxier
        .on_service_add(two_ports("{name: p, port: 80}, {name: q, port: 81}"));
    env.proxier.on_endpointslice_add(multi_slice);
    // "gone" has an address no other service uses (no server behind it: never connected).
    env.proxier
        .on_service_add(service("gone", "10.96.0.41", ""));
    env.proxier
        .on_endpointslice_add(slice("gone", &[("10.244.1.99", NODE)]));
    env.proxier
        .on_service_add(service("stay", "10.96.0.42", ""));
    env.proxier.on_endpointslice_add(slice("stay", &B[1..2]));
    assert!(env.sync().full);
    let table = |env: &Env| nft(env, "list table ip hako");
    let count = |t: &str, pat: &str| t.matches(pat).count();
    let t = table(&env);
    assert_eq!(count(&t, "chain svc-"), 4, "{t}");
    assert_eq!(
        count(&t, " . 8080"),
        2 + 2 + 1 + 1,
        "endpoint elements:\n{t}"
    );
    assert!(t.contains("10.96.0.40 . tcp . 81 : goto svc-"), "{t}");
    assert!(t.contains("10.244.1.99 . 10.244.1.99"), "hairpin:\n{t}");
    let (a, _) = connect(&env.client, "10.96.0.40 81", 4);
    assert!(!counts(&a).contains_key("FAIL"), "{a:?}");

    // Port q goes: its chain, its service-ips element and its two endpoint elements.
    env.proxier
        .on_service_update(two_ports("{name: p, port: 80}"));
    assert!(!env.sync().full);
    let t = table(&env);
    assert_eq!(count(&t, "chain svc-"), 3, "{t}");
    assert_eq!(count(&t, " . 8080"), 2 + 1 + 1, "endpoint elements:\n{t}");
    assert!(!t.contains("10.96.0.40 . tcp . 81"), "{t}");
    assert!(t.contains("10.96.0.40 . tcp . 80 : goto svc-"), "{t}");

    // Service "gone" goes (service and slice): nothing of it stays, hairpin included.
    env.proxier
        .on_endpointslice_delete(&slice("gone", &[("10.244.1.99", NODE)]));
    env.proxier
        .on_service_delete(&service("gone", "10.96.0.41", ""));
    assert!(!env.sync().full);
    let t = table(&env);
    assert_eq!(count(&t, "chain svc-"), 2, "{t}");
    assert_eq!(count(&t, " . 8080"), 2 + 1, "endpoint elements:\n{t}");
    assert!(!t.contains("10.96.0.41"), "{t}");
    assert!(!t.contains("10.244.1.99"), "hairpin element left:\n{t}");
    assert!(t.contains(&format!("{0} . {0}", B[1].0)), "{t}");

    // What stays still works; the removed port no longer answers.
    let (a, _) = connect(&env.client, "10.96.0.40 80", 20);
    assert_eq!(counts(&a).len(), 2, "{a:?}");
    let (a, _) = connect(&env.client, "10.96.0.42 80", 3);
    assert_eq!(counts(&a).keys().collect::<Vec<_>>(), vec!["b2"]);
    let (a, _) = connect(&env.client, "10.96.0.40 81", 1);
    assert_eq!(a, vec!["FAIL".to_string()]);
}
