//! Root test of a Service across nodes: two cluster-mode `hako-agent`s, each in its own node
//! namespace, joined by the VXLAN overlay and each running the proxier inside the agent
//! (`--proxy-mode iptables`, fed by the Service/EndpointSlice watchers). Node `node1` runs two
//! busybox httpd backend pods (real pods: registry image, hako-shim, CNI); the test writes the
//! Service and its EndpointSlice into the apiserver fixture as the EndpointSlice controller
//! would, with the pods' IPs from their status. A client pod on `node2` fetches the ClusterIP:
//! node2's rules DNAT to a pod on node1 and the packets cross the tunnel, both backends
//! answer. Removing one endpoint from the slice makes node2's rules drop it; the remaining pod
//! answers every request.
//!
//! Underlay: a veth between the two node namespaces on 10.88.0.0/24 (node1 is the agent
//! harness's namespace, whose node IP is 10.88.0.1). Pod CIDRs 10.244.1.0/24 (node1) and
//! 10.244.2.0/24 (node2) in the cluster CIDR 10.244.0.0/16.
#![cfg(feature = "root")]

use hako_tests::agent::{tail, target_bin, AgentEnv};
use hako_tests::apiserver::ApiServer;
use hako_tests::topology::{self, Node};
use hako_tests::NetNs;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const CLUSTER_IP: &str = "10.96.0.50";

/// node2's agent process (killed on drop, before its namespace goes).
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- node2 agent log (tail):\n{}",
                tail(
                    &std::fs::read_to_string(&self.log).unwrap_or_default(),
                    6000
                )
            );
        }
    }
}

fn wait_for<T>(what: &str, secs: u64, env: &AgentEnv, f: impl FnMut() -> Option<T>) -> T {
    hako_tests::poll_until(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(200),
        || format!("node1 agent log:\n{}", tail(&env.agent_log(), 6000)),
        f,
    )
}

fn ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// One HTTP GET of the ClusterIP from `ns`: the answering pod's name, or None.
fn fetch(ns: &NetNs) -> Option<String> {
    let out = ns
        .sh_output(&format!("curl -s -m 3 http://{CLUSTER_IP}/"))
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !body.is_empty()).then_some(body)
}

/// `iptables-save -t nat` of a namespace.
fn nat_rules(ns: &NetNs) -> String {
    ns.sh("iptables-save -t nat").unwrap_or_default()
}

/// Packets the VXLAN device of a namespace has sent and received.
fn vxlan_packets(ns: &NetNs) -> u64 {
    let j: Value = ns
        .ip(&["-j", "-s", "link", "show", "hako.1"])
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    let s = &j[0]["stats64"];
    s["rx"]["packets"].as_u64().unwrap_or(0) + s["tx"]["packets"].as_u64().unwrap_or(0)
}

/// What the network looks like, for a failure message.
fn diagnose(client: &NetNs, nodes: &[&NetNs], pod_ip: &str) -> String {
    let mut out = String::new();
    let show = |ns: &NetNs, cmd: &str| {
        ns.sh_output(cmd)
            .map(|o| {
                format!(
                    "$ {cmd}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    };
    out.push_str(&show(
        client,
        &format!("curl -sS -m 3 http://{pod_ip}:8080/"),
    ));
    out.push_str(&show(client, &format!("ping -c 1 -W 2 {pod_ip}")));
    for ns in nodes {
        out.push_str(&format!("--- {}\n", ns.name()));
        out.push_str(&show(
            ns,
            "ip route; ip neigh show dev hako.1; bridge fdb show dev hako.1; ip -d link show hako.1; iptables-save -t filter",
        ));
    }
    out
}

fn slice(pods: &[(String, String)]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(name, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node1",
                   "targetRef": {"kind": "Pod", "namespace": "default", "name": name}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abcde", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

#[test]
fn a_pod_on_one_node_reaches_pods_on_another_through_a_service() {
    // node1: the agent harness (registry, shim, CNI bridge for 10.244.1.0/24).
    let mut env = AgentEnv::new("csvc");
    let tmp = tempfile::Builder::new()
        .prefix("hako-csvc-")
        .tempdir()
        .expect("tmp");
    let node2 = Node {
        ns: NetNs::new("csvc2").expect("netns"),
        ip: "10.88.0.2".parse().expect("ip"),
        ifname: "eth0".into(),
    };
    topology::veth(&env.ns, "eth0", &node2.ns, "eth0").expect("underlay veth");
    env.ns
        .ip(&["addr", "add", "10.88.0.1/24", "dev", "eth0"])
        .expect("addr");
    env.ns.ip(&["link", "set", "eth0", "up"]).expect("up");
    node2
        .ns
        .ip(&["addr", "add", "10.88.0.2/24", "dev", "eth0"])
        .expect("addr");
    node2.ns.ip(&["link", "set", "eth0", "up"]).expect("up");
    for ns in [&env.ns, &node2.ns] {
        ns.sh("sysctl -qw net.ipv4.ip_forward=1")
            .expect("forwarding");
    }
    // node1's pods get 10.244.1.0/24 from the bridge plugin.
    let p = env.tmp.path().to_path_buf();
    std::fs::write(
        p.join("net.d").join("10-test.conflist"),
        json!({"cniVersion": "1.0.0", "name": "hako-test",
            "plugins": [{"type": "bridge", "bridge": "hkbr0", "isGateway": true, "isDefaultGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                         "dataDir": p.join("ipam")}}]})
        .to_string(),
    )
    .expect("conflist");
    // node2's client pod on a bridge of its own.
    node2.add_bridge("cni0", "10.244.2.1/24").expect("bridge");
    let client = node2
        .add_pod("cni0", "10.244.2.5/24", "10.244.2.1")
        .expect("client pod");

    let srv = node2
        .ns
        .run(|| {
            ApiServer::start_on(("10.88.0.2".parse::<std::net::IpAddr>().expect("ip"), 0).into())
        })
        .expect("netns")
        .expect("fixture");

    // Nodes may list Services but not EndpointSlices (the Node authorizer's rules): a node
    // running the proxier needs the grant an operator gives it with
    // `kubectl create clusterrolebinding hako-node-proxier --clusterrole=system:node-proxier
    // --group=system:nodes`.
    for node in ["node1", "node2"] {
        for verb in ["list", "watch"] {
            srv.grant(&format!("system:node:{node}"), verb, "endpointslices", "");
        }
    }
    let kc1 = tmp.path().join("kubeconfig-node1");
    srv.write_kubeconfig(&kc1, &srv.node_token("node1"))
        .expect("kubeconfig");
    let common = |cidr: &str, subnet: &std::path::Path| -> Vec<String> {
        [
            "--kubelet-port",
            "0",
            "--overlay",
            "--overlay-interface",
            "eth0",
            "--pod-cidr",
            cidr,
            "--cluster-cidr",
            "10.244.0.0/16",
            "--proxy-mode",
            "iptables",
            "--node-lease-renew-interval",
            "1",
            "--node-status-update-frequency",
            "1",
            "--subnet-file",
            subnet.to_str().expect("path"),
        ]
        .map(String::from)
        .to_vec()
    };
    env.args
        .extend(["--kubeconfig".to_string(), kc1.display().to_string()]);
    env.args.extend(common(
        "10.244.1.0/24",
        &tmp.path().join("subnet-node1.env"),
    ));
    env.start();

    let kc2 = tmp.path().join("kubeconfig-node2");
    srv.write_kubeconfig(&kc2, &srv.node_token("node2"))
        .expect("kubeconfig");
    let d2 = tmp.path().join("node2");
    std::fs::create_dir_all(d2.join("net.d")).expect("dir");
    let log = tmp.path().join("agent-node2.log");
    let child = node2
        .ns
        .command(
            target_bin("hako-agent", "HAKO_AGENT_BIN")
                .to_str()
                .expect("path"),
        )
        .args(["--eviction-hard", hako_tests::agent::TEST_EVICTION_HARD])
        .arg("--kubeconfig")
        .arg(&kc2)
        .args(["--hostname-override", "node2", "--node-ip", "10.88.0.2"])
        .args(common(
            "10.244.2.0/24",
            &tmp.path().join("subnet-node2.env"),
        ))
        .arg("--root-dir")
        .arg(d2.join("root"))
        .arg("--run-dir")
        .arg(d2.join("run"))
        .arg("--pod-log-dir")
        .arg(d2.join("logs"))
        .arg("--cni-conf-dir")
        .arg(d2.join("net.d"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn node2 agent");
    let agent2 = Agent { child, log };

    // Two backend pods on node1, like a Deployment's replicas.
    let cmd = "mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 8080 -h /www";
    for name in ["web-1", "web-2"] {
        srv.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1, "hostname": name,
                "containers": [{"name": "httpd", "image": env.image("sleep"),
                    "command": ["sh", "-c", cmd],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"port": 8080}, "periodSeconds": 1}}]}}))
            .expect("pod");
    }
    let pods: Vec<(String, String)> = ["web-1", "web-2"]
        .iter()
        .map(|name| {
            wait_for(&format!("{name} Running and Ready"), 90, &env, || {
                let p = srv.get("", "pods", "default", name)?;
                let ip = p["status"]["podIP"].as_str()?.to_string();
                (p["status"]["phase"] == "Running" && ready(&p)).then_some((name.to_string(), ip))
            })
        })
        .collect();
    for (_, ip) in &pods {
        assert!(ip.starts_with("10.244.1."), "pod IP {ip} from node1's CIDR");
    }

    // The Service and its EndpointSlice, as the EndpointSlice controller writes them.
    srv.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}}))
        .expect("service");
    srv.create(slice(&pods)).expect("endpointslice");

    // node2's in-agent proxier programs both endpoints.
    wait_for("node2's rules for both endpoints", 30, &env, || {
        let r = nat_rules(&node2.ns);
        (r.contains(CLUSTER_IP) && pods.iter().all(|(_, ip)| r.contains(&format!("{ip}:8080"))))
            .then_some(())
    });
    // The in-agent proxier's kube-proxy endpoints: /healthz on :10256 once the sync that
    // wrote those rules has finished (the rules are visible while it still runs), sync
    // figures on 127.0.0.1:10249/metrics.
    let healthz = wait_for("/healthz 200 after the first sync", 10, &env, || {
        let h = node2
            .ns
            .sh("curl -s -m 3 -w ' %{http_code}' http://127.0.0.1:10256/healthz")
            .unwrap_or_default();
        h.ends_with(" 200").then_some(h)
    });
    assert!(healthz.contains("\"healthy\": true"), "{healthz}");
    let metrics = node2
        .ns
        .sh("curl -s -m 3 http://127.0.0.1:10249/metrics")
        .unwrap_or_default();
    let syncs = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(syncs.is_some_and(|n| n >= 1), "{metrics}");
    // The overlay is up both ways (peers converged) before traffic is checked.
    wait_for("overlay peers", 30, &env, || {
        let a = node2.ns.ip(&["route", "show", "10.244.1.0/24"]).ok()?;
        let b = env.ns.ip(&["route", "show", "10.244.2.0/24"]).ok()?;
        (a.contains("dev hako.1") && b.contains("dev hako.1")).then_some(())
    });

    let before = vxlan_packets(&node2.ns);
    let mut answered: BTreeSet<String> = BTreeSet::new();
    let mut n = 0;
    let end = Instant::now() + Duration::from_secs(30);
    while answered.len() < 2 && Instant::now() < end {
        if let Some(who) = fetch(&client) {
            answered.insert(who);
            n += 1;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(
        answered,
        BTreeSet::from(["web-1".to_string(), "web-2".to_string()]),
        "both backends on node1 answer the ClusterIP from node2's pod ({n} answers); node2 nat:\n{}\n{}\nnode2 agent log:\n{}",
        nat_rules(&node2.ns),
        diagnose(&client, &[&node2.ns, &env.ns], &pods[0].1),
        tail(&std::fs::read_to_string(&agent2.log).unwrap_or_default(), 4000)
    );
    let crossed = vxlan_packets(&node2.ns) - before;
    assert!(
        crossed >= 2 * n,
        "the requests crossed the VXLAN device ({crossed} packets for {n} requests)"
    );

    // The endpoint of web-1 leaves the slice: node2 drops it; web-2 answers everything.
    let gone = pods[0].1.clone();
    srv.merge_patch(
        "discovery.k8s.io",
        "endpointslices",
        "default",
        "web-abcde",
        "",
        &json!({"endpoints": slice(&pods[1..])["endpoints"]}),
    )
    .expect("update slice");
    wait_for("node2's rules without web-1", 30, &env, || {
        let r = nat_rules(&node2.ns);
        (!r.contains(&format!("{gone}:8080")) && r.contains(&format!("{}:8080", pods[1].1)))
            .then_some(())
    });
    let answers: Vec<Option<String>> = (0..12).map(|_| fetch(&client)).collect();
    assert!(
        answers.iter().all(|a| a.as_deref() == Some("web-2")),
        "only web-2 answers after web-1 left the slice: {answers:?}"
    );

    // Nodes only ever did what the Node authorizer allows.
    let forbidden: Vec<String> = srv
        .requests()
        .into_iter()
        .filter(|r| r.user.starts_with("system:node:") && r.status == 403)
        .map(|r| format!("{} {} {}", r.user, r.method, r.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");

    drop(agent2);
    env.stop();
    drop(client);
    drop(node2);
    drop(srv);
}
