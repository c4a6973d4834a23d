//! The harness's own root tests: namespaces appear and disappear, closures run inside a
//! namespace, and two nodes reach each other over the underlay.
#![cfg(feature = "root")]

use hako_tests::{NetNs, Topology};
use std::path::Path;

#[test]
fn netns_is_created_and_removed_on_drop() {
    let path;
    {
        let ns = NetNs::new("t").unwrap();
        path = ns.path();
        assert!(path.exists(), "{} should exist", path.display());
        let links = ns.ip(&["-o", "link", "show"]).unwrap();
        assert!(links.contains("lo"), "{links}");
    }
    assert!(
        !Path::new(&path).exists(),
        "{} should be gone",
        path.display()
    );
}

#[test]
fn netns_is_removed_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let ns = NetNs::new("t").unwrap();
        tx.send(ns.path()).unwrap();
        panic!("boom");
    });
    assert!(r.is_err());
    let path = rx.recv().unwrap();
    assert!(!path.exists(), "{} leaked after panic", path.display());
}

#[test]
fn closure_runs_inside_the_namespace() {
    let ns = NetNs::new("t").unwrap();
    ns.ip(&[
        "link", "add", "hkdummy0", "type", "veth", "peer", "name", "hkdummy1",
    ])
    .unwrap();
    let seen = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap())
        .unwrap();
    assert!(seen.contains("hkdummy0"), "{seen}");
    let root = std::fs::read_to_string("/proc/net/dev").unwrap();
    assert!(
        !root.contains("hkdummy0"),
        "dummy leaked into the root netns"
    );
}

#[test]
fn two_nodes_ping_over_the_underlay() {
    let topo = Topology::new(2, 1500).unwrap();
    let (a, b) = (&topo.nodes[0], &topo.nodes[1]);
    let out = a.ns.sh(&format!("ping -c 2 -W 2 {}", b.ip)).unwrap();
    assert!(
        out.contains("2 received") || out.contains("2 packets received"),
        "{out}"
    );
}

#[test]
fn pods_on_a_node_bridge_reach_each_other() {
    let topo = Topology::new(1, 1500).unwrap();
    let node = &topo.nodes[0];
    node.add_bridge("cbr0", "10.244.0.1/24").unwrap();
    let p1 = node.add_pod("cbr0", "10.244.0.2/24", "10.244.0.1").unwrap();
    let _p2 = node.add_pod("cbr0", "10.244.0.3/24", "10.244.0.1").unwrap();
    let out = p1
        .sh("ping -c 1 -W 2 10.244.0.3 && ping -c 1 -W 2 10.244.0.1")
        .unwrap();
    assert!(
        out.contains("1 received") || out.contains("1 packets received"),
        "{out}"
    );
}
