//! The VXLAN overlay: two nodes on an underlay, pods attached by hako-cni on each, peers
//! converged through the library and the `hako-cni overlay` CLI; traffic crosses as UDP/4789
//! and removing a peer removes its entries.
#![cfg(feature = "root")]

mod cni_support;

use cni_support::{cni_bin, exec, result_ipv4, Call, TestNet};
use hako_cni::overlay::{self, OverlayConfig, Peer, SyncReport};
use hako_tests::{NetNs, Topology};
use serde_json::json;
use std::net::IpAddr;

fn ping(ns: &NetNs, ip: &str) -> bool {
    ns.sh_output(&format!("ping -c 2 -i 0.2 -W 2 {ip}"))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Packets counted by an nft rule matching UDP/4789 arriving at `ns`.
fn vxlan_counter(ns: &NetNs) -> u64 {
    let out = ns.sh("nft list chain inet hkcount input").unwrap();
    out.split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

#[test]
fn pods_on_two_nodes_talk_over_vxlan_and_stale_peers_go_away() {
    hako_tests::require_root();
    let topo = Topology::new(2, 1500).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut nets = Vec::new();
    let mut pods = Vec::new();
    let mut infos = Vec::new();
    let mut cfgs = Vec::new();
    for (i, node) in topo.nodes.iter().enumerate() {
        let n = i + 1;
        let net = TestNet::from_subnet_file(&format!(
            "HAKO_NETWORK=10.244.0.0/16\nHAKO_SUBNET=10.244.{n}.1/24\nHAKO_IPV6_NETWORK=fd44::/48\nHAKO_IPV6_SUBNET=fd44:0:{n}::/64\nHAKO_MTU=1450\n"
        ));
        let pod = NetNs::new("pod").unwrap();
        let r = exec(
            &node.ns,
            &Call::attach("ADD", &format!("ov{n}"), &pod),
            &net.conf,
        );
        assert!(result_ipv4(r.result()).starts_with(&format!("10.244.{n}.")));
        let cfg = OverlayConfig {
            underlay_if: Some(node.ifname.clone()),
            state_dir: state.path().join(format!("node{n}")),
            ..Default::default()
        };
        let info = node
            .ns
            .run(|| overlay::ensure_device(&cfg))
            .unwrap()
            .unwrap();
        assert_eq!(info.name, "hako.1");
        assert_eq!(info.mtu, 1450, "underlay 1500 - 50");
        assert_eq!(info.local_ip, IpAddr::V4(node.ip));
        // Idempotent and stable: the same device and MAC again.
        let again = node
            .ns
            .run(|| overlay::ensure_device(&cfg))
            .unwrap()
            .unwrap();
        assert_eq!(again, info);
        let d = node.ns.ip(&["-d", "link", "show", "hako.1"]).unwrap();
        assert!(
            d.contains("vxlan id 1") && d.contains("dstport 4789") && d.contains("nolearning"),
            "{d}"
        );
        nets.push(net);
        pods.push(pod);
        infos.push(info);
        cfgs.push(cfg);
    }
    let peers: Vec<Peer> = infos
        .iter()
        .enumerate()
        .map(|(i, d)| Peer {
            node_ip: d.local_ip,
            pod_cidr: format!("10.244.{}.0/24", i + 1).parse().unwrap(),
            vtep_mac: d.mac,
        })
        .collect();
    // Dual stack: the IPv6 pod CIDRs are peers with the same node IP and VTEP MAC.
    let peers6: Vec<Peer> = infos
        .iter()
        .enumerate()
        .map(|(i, d)| Peer {
            node_ip: d.local_ip,
            pod_cidr: format!("fd44:0:{}::/64", i + 1).parse().unwrap(),
            vtep_mac: d.mac,
        })
        .collect();
    let all: Vec<Peer> = peers.iter().chain(&peers6).cloned().collect();
    // Node 1 through the library (its own entry is skipped), node 2 through the CLI.
    let (a, b) = (&topo.nodes[0], &topo.nodes[1]);
    let r =
        a.ns.run(|| overlay::sync_peers(&cfgs[0], &peers))
            .unwrap()
            .unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 3,
            updated: 0,
            removed: 0
        }
    );
    let r =
        a.ns.run(|| overlay::sync_peers(&cfgs[0], &peers))
            .unwrap()
            .unwrap();
    assert_eq!(r, SyncReport::default(), "second sync must change nothing");
    let peer_file = state.path().join("peers.json");
    std::fs::write(&peer_file, serde_json::to_string(&peers).unwrap()).unwrap();
    let cli = |ns: &NetNs, args: &str| -> serde_json::Value {
        let out = ns
            .sh(&format!("{} overlay {args}", cni_bin().display()))
            .unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let out = cli(
        &b.ns,
        &format!(
            "sync --peers {} --underlay-if eth0 --state-dir {}",
            peer_file.display(),
            cfgs[1].state_dir.display()
        ),
    );
    assert_eq!(out["report"]["added"], 3, "{out}");
    // Entries as the kernel has them on node 1.
    let fdb = a.ns.sh("bridge fdb show dev hako.1").unwrap();
    let mac_b = hako_cni::netlink::fmt_mac(&infos[1].mac);
    assert!(fdb.contains(&format!("{mac_b} dst {}", b.ip)), "{fdb}");
    let neigh = a.ns.ip(&["neigh", "show", "dev", "hako.1"]).unwrap();
    assert!(
        neigh.contains(&format!("10.244.2.1 lladdr {mac_b} PERMANENT")),
        "{neigh}"
    );
    let route = a.ns.ip(&["route", "show", "10.244.2.0/24"]).unwrap();
    assert!(
        route.contains("via 10.244.2.1 dev hako.1") && route.contains("onlink"),
        "{route}"
    );
    // Count UDP/4789 arriving at node 2, then ping pod 1 -> pod 2.
    b.ns.sh("nft add table inet hkcount && nft add chain inet hkcount input '{ type filter hook input priority 0; }' && nft add rule inet hkcount input udp dport 4789 counter")
        .unwrap();
    let before = vxlan_counter(&b.ns);
    let ip_b = nets[1].allocated()[0].clone();
    assert!(
        ping(&pods[0], &ip_b),
        "pod on node 1 cannot reach pod on node 2"
    );
    let after = vxlan_counter(&b.ns);
    assert!(
        after >= before + 2,
        "no VXLAN packets on the underlay ({before} -> {after})"
    );
    // Dual stack: adding the IPv6 pod CIDRs adds only their neighbour and route (the FDB
    // entry per node is shared), and IPv6 pod traffic crosses the same tunnel.
    let r =
        a.ns.run(|| overlay::sync_peers(&cfgs[0], &all))
            .unwrap()
            .unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 2,
            updated: 0,
            removed: 0
        }
    );
    std::fs::write(&peer_file, serde_json::to_string(&all).unwrap()).unwrap();
    let out = cli(
        &b.ns,
        &format!(
            "sync --peers {} --underlay-if eth0 --state-dir {}",
            peer_file.display(),
            cfgs[1].state_dir.display()
        ),
    );
    assert_eq!(out["report"]["added"], 2, "{out}");
    let ip6_b = nets[1].allocated()[1].clone();
    assert!(ip6_b.starts_with("fd44:0:2::"), "{ip6_b}");
    let before = vxlan_counter(&b.ns);
    assert!(
        ping(&pods[0], &ip6_b),
        "IPv6: pod on node 1 cannot reach pod on node 2"
    );
    assert!(vxlan_counter(&b.ns) >= before + 2);
    // A wrong entry is corrected.
    a.ns.ip(&[
        "route",
        "replace",
        "10.244.2.0/24",
        "via",
        "10.244.2.9",
        "dev",
        "hako.1",
        "onlink",
    ])
    .unwrap();
    let r =
        a.ns.run(|| overlay::sync_peers(&cfgs[0], &all))
            .unwrap()
            .unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 0,
            updated: 1,
            removed: 0
        }
    );
    // Removing node 2 from node 1's peers removes its FDB, neighbour and route entries
    // (one FDB entry, two neighbours, two routes).
    let only_a = [peers[0].clone(), peers6[0].clone()];
    let r =
        a.ns.run(|| overlay::sync_peers(&cfgs[0], &only_a))
            .unwrap()
            .unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 0,
            updated: 0,
            removed: 5
        }
    );
    let show = cli(&a.ns, "show");
    assert_eq!(show["fdb"], json!([]), "{show}");
    assert_eq!(show["neighbours"], json!([]), "{show}");
    assert_eq!(show["routes"], json!([]), "{show}");
    assert!(!a
        .ns
        .sh("bridge fdb show dev hako.1")
        .unwrap()
        .contains(&mac_b));
    assert!(a
        .ns
        .ip(&["route", "show", "10.244.2.0/24"])
        .unwrap()
        .trim()
        .is_empty());
    assert!(
        !ping(&pods[0], &ip_b),
        "traffic still flows after the peer was removed"
    );
    // The VTEP MAC survives a restart: delete the device, ensure it again.
    a.ns.ip(&["link", "del", "hako.1"]).unwrap();
    let again =
        a.ns.run(|| overlay::ensure_device(&cfgs[0]))
            .unwrap()
            .unwrap();
    assert_eq!(again.mac, infos[0].mac);
    for (i, node) in topo.nodes.iter().enumerate() {
        let id = format!("ov{}", i + 1);
        assert!(exec(&node.ns, &Call::attach("DEL", &id, &pods[i]), &nets[i].conf).ok);
    }
}
