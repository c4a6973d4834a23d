//! The network the proxier's traffic tests share: node 0 of a two-node underlay runs the
//! proxier; backends b1..bN on bridge kb (10.244.1.0/24) answer their name on 8080; a client
//! pod on bridge kc (10.244.2.0/24); node 1 is "outside". Plus the Service and EndpointSlice
//! builders and the connect/answer helpers the tests assert with.

use crate::{NetNs, Topology};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeMap;

/// The node name the proxier runs as.
pub const NODE: &str = "node-a";

/// The three backends' addresses on [`NODE`].
pub const B: [(&str, &str); 3] = [
    ("10.244.1.11", NODE),
    ("10.244.1.12", NODE),
    ("10.244.1.13", NODE),
];

/// A Service `t/<name>` with one port `p` (80; nodePort 30000 + the IP's last octet) and the
/// YAML fields in `extra` appended to its spec.
pub fn service(name: &str, ip: &str, extra: &str) -> Service {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80, nodePort: {np}}}] {extra}}}",
        np = 30000 + ip.rsplit('.').next().unwrap().parse::<u16>().unwrap(),
    ))
    .unwrap()
}

/// The EndpointSlice `<svc>-1` with port `p` = 8080 and the (ip, nodeName) endpoints.
pub fn slice(svc: &str, eps: &[(&str, &str)]) -> EndpointSlice {
    let eps: Vec<String> = eps
        .iter()
        .map(|(ip, node)| format!("{{addresses: [{ip}], nodeName: {node}}}"))
        .collect();
    serde_yaml::from_str(&format!(
        "metadata: {{name: {svc}-1, namespace: t, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{}]",
        eps.join(",")
    ))
    .unwrap()
}

/// The namespaces and backend servers (killed on drop; the namespaces go with the topology).
pub struct ServiceNet {
    /// The backends' server processes.
    pub servers: Vec<std::process::Child>,
    /// Node 0 (proxier) and node 1 (outside).
    pub topo: Topology,
    /// Backend pods by name (b1..bN).
    pub pods: BTreeMap<String, NetNs>,
    /// The client pod.
    pub client: NetNs,
}

impl Drop for ServiceNet {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl ServiceNet {
    /// Builds the network with `backends` answering backends (waits until each answers).
    pub fn new(backends: usize) -> ServiceNet {
        let topo = Topology::new(2, 1500).unwrap();
        let node = &topo.nodes[0];
        node.ns.sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
        node.add_bridge("kb", "10.244.1.1/24").unwrap();
        node.add_bridge("kc", "10.244.2.1/24").unwrap();
        // Service IPs need a route for rejects to happen in FORWARD.
        node.ns
            .ip(&["route", "add", "default", "via", "192.0.2.1"])
            .unwrap();
        let mut pods = BTreeMap::new();
        let mut servers = Vec::new();
        for i in 1..=backends {
            let pod = node
                .add_pod("kb", &format!("10.244.1.{}/24", 10 + i), "10.244.1.1")
                .unwrap();
            servers.push(
                pod.spawn(&format!("exec busybox nc -ll -p 8080 -e echo b{i}"))
                    .unwrap(),
            );
            pods.insert(format!("b{i}"), pod);
        }
        let client = node.add_pod("kc", "10.244.2.10/24", "10.244.2.1").unwrap();
        for (name, pod) in &pods {
            wait_answer(pod, "127.0.0.1 8080", name);
        }
        ServiceNet {
            servers,
            topo,
            pods,
            client,
        }
    }

    /// Node 0's namespace (where the proxier applies its rules).
    pub fn node(&self) -> &NetNs {
        &self.topo.nodes[0].ns
    }
}

/// Connects `n` times from `from` to `target` ("ip port"), returns each answer ("FAIL" on
/// failure) and the error text.
pub fn connect(from: &NetNs, target: &str, n: usize) -> (Vec<String>, String) {
    let out = from
        .sh_output(&format!(
            "for i in $(seq {n}); do busybox nc -w 2 {target} </dev/null || echo FAIL; done"
        ))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits (10 s at most) until `target` answers `want` from `ns`.
pub fn wait_answer(ns: &NetNs, target: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (got, _) = connect(ns, target, 1);
        if got.first().map(String::as_str) == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{target} in {} never answered {want}: {got:?}",
            ns.name()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How many times each answer came.
pub fn counts(answers: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.clone()).or_insert(0) += 1;
    }
    m
}
