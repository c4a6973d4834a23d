//! The proxier's IPVS mode in the VM lane's guest (the host kernel has no IPVS): real
//! traffic from a client pod to a ClusterIP and from another node to a NodePort, answered
//! by backend pods; rr spreading, ClientIP persistence, draining of a removed endpoint,
//! repair of a hand-deleted virtual service, and a sync that applies nothing when nothing
//! changed. The proxier runs on a thread that entered the node namespace.
#![cfg(feature = "vm")]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hako_proxier::ipvs::genl::{DestKey, VsKey};
use hako_proxier::ipvs::{IpvsBackend, IpvsOpts, IpvsStats};
use hako_proxier::{Proxier, ProxierOpts, RenderOpts, SyncStats};
use hako_tests::vm::require_guest;
use hako_tests::{NetNs, Topology};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const NODE: &str = "node-a";

fn service(name: &str, ip: &str, target: &str, extra: &str) -> Service {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80, targetPort: {target}, nodePort: {np}}}] {extra}}}",
        np = 30000 + ip.rsplit('.').next().unwrap().parse::<u16>().unwrap(),
    ))
    .unwrap()
}

fn slice(svc: &str, port: u16, ips: &[&str]) -> EndpointSlice {
    let eps: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{addresses: [{ip}], nodeName: {NODE}}}"))
        .collect();
    serde_yaml::from_str(&format!(
        "metadata: {{name: {svc}-1, namespace: t, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: p, port: {port}}}]\nendpoints: [{}]",
        eps.join(",")
    ))
    .unwrap()
}

struct Env {
    servers: Vec<std::process::Child>,
    topo: Topology,
    client: NetNs,
    _pods: Vec<NetNs>,
    proxier: Proxier,
    stats: Arc<Mutex<IpvsStats>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Env {
    /// Node 0 runs IPVS mode; backends b1..bN on bridge kb (10.244.1.0/24) answer their
    /// name on 8080 and hold the connection open on 8081; the client pod is on bridge kc
    /// (10.244.2.0/24); node 1 is "outside".
    fn new(backends: usize, scheduler: &str) -> Env {
        let topo = Topology::new(2, 1500).unwrap();
        let node = &topo.nodes[0];
        node.ns.sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
        node.add_bridge("kb", "10.244.1.1/24").unwrap();
        node.add_bridge("kc", "10.244.2.1/24").unwrap();
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=backends {
            let pod = node
                .add_pod("kb", &format!("10.244.1.{}/24", 10 + i), "10.244.1.1")
                .unwrap();
            servers.push(
                pod.spawn(&format!("exec busybox nc -ll -p 8080 -e echo b{i}"))
                    .unwrap(),
            );
            servers.push(
                pod.spawn(&format!(
                    "exec busybox nc -ll -p 8081 -e sh -c 'echo b{i}; exec sleep 30'"
                ))
                .unwrap(),
            );
            wait_answer(&pod, "127.0.0.1 8080", &format!("b{i}"));
            pods.push(pod);
        }
        let client = node.add_pod("kc", "10.244.2.10/24", "10.244.2.1").unwrap();
        let render = RenderOpts {
            cluster_cidr: Some("10.244.0.0/16".into()),
            ..RenderOpts::default()
        };
        let opts = IpvsOpts {
            scheduler: scheduler.into(),
            drain_bound: Duration::from_secs(600),
            render: render.clone(),
            ..IpvsOpts::default()
        };
        let backend = node.ns.run(|| IpvsBackend::new(opts)).unwrap().unwrap();
        let stats = backend.stats();
        let proxier = Proxier::new(
            Box::new(backend),
            ProxierOpts {
                hostname: NODE.into(),
                render,
            },
        );
        Env {
            servers,
            topo,
            client,
            _pods: pods,
            proxier,
            stats,
        }
    }

    fn node(&self) -> &NetNs {
        &self.topo.nodes[0].ns
    }

    fn sync(&mut self) -> (SyncStats, IpvsStats) {
        let p = &mut self.proxier;
        let s = self.topo.nodes[0].ns.run(|| p.sync()).unwrap().unwrap();
        (s, self.stats.lock().unwrap().clone())
    }

    /// `ipvsadm -Ln` of the node, whitespace-normalized, service and server lines only.
    fn table(&self) -> Vec<String> {
        self.node()
            .sh("ipvsadm -L -n")
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| l.starts_with("TCP") || l.starts_with("UDP") || l.starts_with("->"))
            .filter(|l| !l.contains("RemoteAddress"))
            .collect()
    }
}

/// Connects `n` times from `from` to `target` ("ip port"); each answer, "FAIL" on failure.
fn connect(from: &NetNs, target: &str, n: usize) -> Vec<String> {
    let out = from
        .sh_output(&format!(
            "for i in $(seq {n}); do busybox nc -w 3 {target} </dev/null || echo FAIL; done"
        ))
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_answer(ns: &NetNs, target: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = connect(ns, target, 1);
        if got.first().map(String::as_str) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{target} in {} never answered {want}: {got:?}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn counts(answers: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.clone()).or_insert(0) += 1;
    }
    m
}

fn vk(ip: &str, port: u16) -> VsKey {
    VsKey {
        proto: 6,
        addr: ip.parse().unwrap(),
        port,
    }
}

const B3: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];

#[test]
fn clusterip_nodeport_rr_and_persistence_with_real_traffic() {
    require_guest();
    let mut env = Env::new(3, "rr");
    let node_ip = env.topo.nodes[0].ip.to_string();
    env.proxier
        .on_service_add(service("web", "10.96.0.10", "8080", ", type: NodePort"));
    env.proxier.on_endpointslice_add(slice("web", 8080, &B3));
    env.proxier.on_service_add(service(
        "sticky",
        "10.96.0.11",
        "8080",
        ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}",
    ));
    env.proxier.on_endpointslice_add(slice("sticky", 8080, &B3));
    let (s, st) = env.sync();
    assert!(s.full);
    // ClusterIP x2 + the NodePort on each of the node's 3 addresses (eth0, kb, kc); 3
    // servers each.
    assert_eq!((st.services, st.dests), (5, 15), "{st:?}");

    let table = env.table();
    assert!(
        table.contains(&"TCP 10.96.0.10:80 rr".to_string())
            && table.contains(&format!("TCP {node_ip}:30010 rr"))
            && table
                .iter()
                .any(|l| l.starts_with("TCP 10.96.0.11:80 rr persistent 600")),
        "{table:#?}"
    );
    let dev = env
        .node()
        .ip(&["-4", "addr", "show", "dev", "kube-ipvs0"])
        .unwrap();
    assert!(
        dev.contains("10.96.0.10/32") && dev.contains("10.96.0.11/32"),
        "{dev}"
    );
    let set = env.node().sh("ipset list KUBE-CLUSTER-IP").unwrap();
    assert!(set.contains("10.96.0.10,tcp:80"), "{set}");
    let np = env.node().sh("ipset list KUBE-NODE-PORT-TCP").unwrap();
    assert!(np.contains("30010"), "{np}");

    // rr: 12 connections, 4 to each backend.
    let c = counts(&connect(&env.client, "10.96.0.10 80", 12));
    assert_eq!(
        c,
        BTreeMap::from([("b1".into(), 4), ("b2".into(), 4), ("b3".into(), 4)]),
        "rr spread"
    );
    // Persistence: one client stays on one backend.
    let c = counts(&connect(&env.client, "10.96.0.11 80", 8));
    assert_eq!(
        c.len(),
        1,
        "persistence must keep the client on one backend: {c:?}"
    );
    assert!(!c.contains_key("FAIL"), "{c:?}");
    // NodePort from the other node via the node address (masqueraded, so replies return).
    let outside = &env.topo.nodes[1].ns;
    let c = counts(&connect(outside, &format!("{node_ip} 30010"), 3));
    assert_eq!(c.values().sum::<usize>(), 3);
    assert!(!c.contains_key("FAIL"), "NodePort from outside: {c:?}");

    // loadBalancerSourceRanges: the LB IP answers the client pod's range only.
    env.proxier.on_service_add(
        serde_yaml::from_str(
            "metadata: {name: lb, namespace: t}
spec: {type: LoadBalancer, clusterIP: 10.96.0.12, loadBalancerSourceRanges: [10.244.2.0/24],
  ports: [{name: p, port: 80, targetPort: 8080}]}
status: {loadBalancer: {ingress: [{ip: 203.0.113.50}]}}",
        )
        .unwrap(),
    );
    env.proxier
        .on_endpointslice_add(slice("lb", 8080, &B3[..1]));
    env.sync();
    let outside = &env.topo.nodes[1].ns;
    outside
        .ip(&["route", "add", "203.0.113.50", "via", &node_ip])
        .unwrap();
    assert_eq!(connect(&env.client, "203.0.113.50 80", 1), ["b1"]);
    assert_eq!(
        connect(outside, "203.0.113.50 80", 1),
        ["FAIL"],
        "a source outside loadBalancerSourceRanges must be dropped"
    );

    // The iptables rules do not grow with services: the same count after more services.
    let rules = |env: &Env| {
        env.node()
            .sh("iptables-save | grep -c -- '^-A KUBE-' || true")
            .unwrap()
            .trim()
            .to_string()
    };
    let before = rules(&env);
    for i in 0..5 {
        let ip = format!("10.96.1.{}", 10 + i);
        env.proxier
            .on_service_add(service(&format!("more{i}"), &ip, "8080", ""));
    }
    let (s, st) = env.sync();
    assert!(!s.full);
    assert_eq!(st.ops, 5, "five new virtual services, no servers: {st:?}");
    assert_eq!(rules(&env), before);
}

#[test]
fn drain_repair_and_noop() {
    require_guest();
    let mut env = Env::new(2, "rr");
    env.proxier
        .on_service_add(service("hold", "10.96.0.30", "8081", ""));
    env.proxier
        .on_endpointslice_add(slice("hold", 8081, &B3[..2]));
    assert!(env.sync().0.full);

    // Nothing changed: a full sync reads the table and applies nothing.
    env.proxier.force_full();
    let (s, st) = env.sync();
    assert!(s.full);
    assert_eq!(
        (st.ops, st.addr_changes),
        (0, 0),
        "a no-op full sync must not touch IPVS or the device: {st:?}"
    );

    // A long connection to one backend.
    let mut held = env
        .client
        .command("sh")
        .args(["-c", "exec busybox nc 10.96.0.30 80 >/dev/null"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let k = vk("10.96.0.30", 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let dests = env
            .node()
            .run(|| {
                let mut c = hako_proxier::ipvs::genl::IpvsClient::open().unwrap();
                c.dests(&k).unwrap()
            })
            .unwrap();
        if let Some(d) = dests.iter().find(|d| d.active == 1) {
            break d.key;
        }
        assert!(Instant::now() < deadline, "no active connection: {dests:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let other: &str = if busy.addr.to_string() == B3[0] {
        B3[1]
    } else {
        B3[0]
    };
    let other_name = if other == B3[0] { "b1" } else { "b2" };

    // The busy endpoint is removed: weight 0 while its connection lives, new connections
    // go to the other one only.
    env.proxier
        .on_endpointslice_update(slice("hold", 8081, &[other]));
    env.sync();
    let dests = env
        .node()
        .run(|| {
            let mut c = hako_proxier::ipvs::genl::IpvsClient::open().unwrap();
            c.dests(&k).unwrap()
        })
        .unwrap();
    let d = dests
        .iter()
        .find(|d| d.key == busy)
        .expect("draining server kept");
    assert_eq!((d.weight, d.active), (0, 1), "{dests:?}");
    // (The servers on 8081 hold connections open: each client takes the first line and
    // leaves after 2 s.)
    let out = env
        .client
        .sh_output(
            "for i in 1 2 3 4; do timeout 2 busybox nc 10.96.0.30 80 </dev/null | head -n 1; done",
        )
        .unwrap();
    let answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let c = counts(&answers);
    assert_eq!(
        c,
        BTreeMap::from([(other_name.to_string(), 4)]),
        "new connections avoid the draining server"
    );

    // The connection ends: the next sync (nothing changed in the model) deletes it.
    let _ = held.kill();
    let _ = held.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        env.sync();
        let dests = env
            .node()
            .run(|| {
                let mut c = hako_proxier::ipvs::genl::IpvsClient::open().unwrap();
                c.dests(&k).unwrap()
            })
            .unwrap();
        let keys: Vec<DestKey> = dests.iter().map(|d| d.key).collect();
        if !keys.contains(&busy) {
            assert_eq!(keys.len(), 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drained server never deleted: {dests:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A virtual service deleted by hand is restored by the next sync.
    env.node().sh("ipvsadm -D -t 10.96.0.30:80").unwrap();
    assert!(!env.table().iter().any(|l| l.contains("10.96.0.30:80")));
    let (s, st) = env.sync();
    assert!(s.full, "the missing service forces a full sync");
    assert_eq!(st.ops, 2, "service and its one server re-added: {st:?}");
    let out = env
        .client
        .sh_output("timeout 2 busybox nc 10.96.0.30 80 </dev/null | head -n 1")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), other_name);
}

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

#[test]
fn hako_proxy_ipvs_mode_once() {
    require_guest();
    let node = NetNs::new("ipvsd").unwrap();
    node.ip(&["link", "add", "eth0", "type", "dummy"]).unwrap();
    node.ip(&["addr", "add", "192.0.2.50/24", "dev", "eth0"])
        .unwrap();
    node.ip(&["link", "set", "eth0", "up"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec: {type: NodePort, clusterIP: 10.96.5.5, ports: [{name: p, port: 80, nodePort: 30555}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: [10.244.9.9]}]\n",
    )
    .unwrap();
    let out = node
        .command(proxy_bin().to_str().unwrap())
        .args([
            "--proxy-mode",
            "ipvs",
            "--ipvs-scheduler",
            "wrr",
            "--once",
            "--config-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = node.sh("ipvsadm -L -n").unwrap();
    assert!(
        table.contains("10.96.5.5:80 wrr") && table.contains("192.0.2.50:30555 wrr"),
        "{table}"
    );
    assert!(table.contains("10.244.9.9:8080"), "{table}");
    for (k, v) in [("conntrack", "1"), ("expire_nodest_conn", "1")] {
        let got = node.sh(&format!("cat /proc/sys/net/ipv4/vs/{k}")).unwrap();
        assert_eq!(got.trim(), v, "net.ipv4.vs.{k}");
    }
    // A bad scheduler is a clear start-up error.
    let out = node
        .command(proxy_bin().to_str().unwrap())
        .args([
            "--proxy-mode",
            "ipvs",
            "--ipvs-scheduler",
            "fifo",
            "--once",
            "--config-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown IPVS scheduler"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
