//! Root test of the overlay controller: two `hako-agent`s in cluster mode, each in its own
//! node namespace, against the apiserver fixture (served on node 1's underlay address). Each
//! publishes its VTEP MAC and underlay IP on its Node, writes the subnet file, and converges
//! the other as a peer (FDB, neighbour, route); a pod on node 1 pings a pod on node 2 through
//! the VXLAN tunnel; deleting node 2's Node removes its entries on node 1.
#![cfg(feature = "root")]

use hako_tests::agent::target_bin;
use hako_tests::apiserver::ApiServer;
use hako_tests::{require_root, NetNs, Topology};
use serde_json::json;
use std::process::{Child, Stdio};
use std::time::Duration;

struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn logs(agents: &[Agent]) -> String {
    agents
        .iter()
        .map(|a| std::fs::read_to_string(&a.log).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

fn wait_for<T>(what: &str, secs: u64, agents: &[Agent], f: impl FnMut() -> Option<T>) -> T {
    hako_tests::poll_until(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(200),
        || format!("agent logs:\n{}", logs(agents)),
        f,
    )
}

fn ping(ns: &NetNs, ip: &str) -> bool {
    ns.sh_output(&format!("ping -c 2 -i 0.2 -W 2 {ip}"))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn two_agents_form_an_overlay() {
    require_root();
    let topo = Topology::new(2, 1500).expect("topology");
    let tmp = tempfile::tempdir().expect("tmp");
    let api_ip = topo.nodes[0].ip;
    let srv = topo.nodes[0]
        .ns
        .run(move || ApiServer::start_on((api_ip, 0).into()))
        .expect("netns")
        .expect("fixture");
    let mut agents = Vec::new();
    let mut pods = Vec::new();
    for (i, node) in topo.nodes.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let dir = tmp.path().join(&name);
        std::fs::create_dir_all(dir.join("net.d")).expect("dir");
        let kc = dir.join("kubeconfig");
        srv.write_kubeconfig(&kc, &srv.node_token(&name))
            .expect("kubeconfig");
        node.ns
            .sh("sysctl -qw net.ipv4.ip_forward=1")
            .expect("forwarding");
        node.add_bridge("cni0", &format!("10.244.{}.1/24", i + 1))
            .expect("bridge");
        pods.push(
            node.add_pod(
                "cni0",
                &format!("10.244.{}.5/24", i + 1),
                &format!("10.244.{}.1", i + 1),
            )
            .expect("pod"),
        );
        let log = dir.join("agent.log");
        let child = node
            .ns
            .command(
                target_bin("hako-agent", "HAKO_AGENT_BIN")
                    .to_str()
                    .expect("path"),
            )
            .args(["--eviction-hard", hako_tests::agent::TEST_EVICTION_HARD])
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--hostname-override", &name])
            .args(["--node-ip", &node.ip.to_string()])
            .args(["--overlay", "--overlay-interface", "eth0"])
            .args(["--pod-cidr", &format!("10.244.{}.0/24", i + 1)])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .args([
                "--node-lease-renew-interval",
                "1",
                "--node-status-update-frequency",
                "1",
            ])
            .arg("--subnet-file")
            .arg(dir.join("subnet.env"))
            .arg("--root-dir")
            .arg(dir.join("root"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--cni-conf-dir")
            .arg(dir.join("net.d"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn agent");
        agents.push(Agent { child, log });
    }

    // Both nodes publish their VTEP MAC and underlay IP.
    let macs: Vec<String> = (1..=2)
        .map(|i| {
            wait_for("VTEP annotations", 30, &agents, || {
                let n = srv.get("", "nodes", "", &format!("n{i}"))?;
                let ann = &n["metadata"]["annotations"];
                assert!(
                    ann["hako.dev/public-ip"].is_null()
                        || ann["hako.dev/public-ip"] == json!(format!("192.0.2.{}", 10 + i)),
                    "{ann}"
                );
                ann["hako.dev/vtep-mac"].as_str().map(str::to_string)
            })
        })
        .collect();
    let subnet = std::fs::read_to_string(tmp.path().join("n1/subnet.env")).expect("subnet file");
    assert!(subnet.contains("HAKO_SUBNET=10.244.1.1/24"), "{subnet}");
    assert!(subnet.contains("HAKO_NETWORK=10.244.0.0/16"), "{subnet}");
    assert!(subnet.contains("HAKO_MTU=1450"), "{subnet}");

    // Each node has the other as a peer.
    for (me, other) in [(0usize, 1usize), (1, 0)] {
        let ns = &topo.nodes[me].ns;
        let peer_ip = topo.nodes[other].ip.to_string();
        let gw = format!("10.244.{}.1", other + 1);
        let cidr = format!("10.244.{}.0/24", other + 1);
        wait_for("peer entries", 30, &agents, || {
            let fdb = ns.sh("bridge fdb show dev hako.1").ok()?;
            let neigh = ns.ip(&["neigh", "show", "dev", "hako.1"]).ok()?;
            let route = ns.ip(&["route", "show", &cidr]).ok()?;
            (fdb.contains(&format!("{} dst {peer_ip}", macs[other]))
                && neigh.contains(&format!("{gw} lladdr {} PERMANENT", macs[other]))
                && route.contains(&format!("via {gw} dev hako.1")))
            .then_some(())
        });
    }
    // Ready follows the overlay: NetworkUnavailable=False once configured.
    wait_for("NetworkUnavailable=False", 15, &agents, || {
        let n = srv.get("", "nodes", "", "n1")?;
        n["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "False")
            .then_some(())
    });
    assert!(
        ping(&pods[0], "10.244.2.5"),
        "pod on n1 reaches pod on n2 over VXLAN"
    );

    // Node n2 leaves: its agent stops and its Node is deleted; n1 drops its entries.
    drop(agents.pop());
    srv.delete("", "nodes", "", "n2", &json!({}))
        .expect("delete node");
    let ns = &topo.nodes[0].ns;
    wait_for("peer removal", 20, &agents, || {
        let fdb = ns.sh("bridge fdb show dev hako.1").ok()?;
        let route = ns.ip(&["route", "show", "10.244.2.0/24"]).ok()?;
        (!fdb.contains(&macs[1]) && route.trim().is_empty()).then_some(())
    });
    assert!(!ping(&pods[0], "10.244.2.5"));
    drop(agents);
    drop(pods);
}
