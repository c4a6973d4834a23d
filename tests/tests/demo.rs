//! Root test of the README's main command: `scripts/demo --once` in a fresh network namespace
//! (with a default route, as a real host has) must start the example web app, fetch its page
//! through the ClusterIP from both replicas' answers, and leave nothing behind.
//! Needs `cargo build -p hako-agent -p hako-shim -p hako-cni` with the same target dir.
#![cfg(feature = "root")]

use hako_tests::NetNs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

#[test]
fn demo_once_serves_the_page_through_the_cluster_ip_and_cleans_up() {
    hako_tests::require_root();
    let bin = hako_tests::agent::target_bin("hako-agent", "HAKO_AGENT_BIN");
    let bin_dir = bin.parent().expect("bin dir").to_path_buf();
    for b in ["hako-shim", "hako-cni", "hako-test-registry"] {
        assert!(
            bin_dir.join(b).exists(),
            "{b} missing in {}: build hako-agent, hako-shim, hako-cni first",
            bin_dir.display()
        );
    }
    let ns = NetNs::new("demo").expect("netns");
    // A default route like a host's (the ClusterIP needs a route before the DNAT).
    ns.ip(&[
        "link", "add", "hkd0", "type", "veth", "peer", "name", "hkd1",
    ])
    .expect("veth");
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "hkd0"])
        .expect("addr");
    ns.ip(&["link", "set", "hkd0", "up"]).expect("up");
    ns.ip(&["link", "set", "hkd1", "up"]).expect("up");
    ns.ip(&["route", "add", "default", "via", "192.0.2.2"])
        .expect("route");
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    let conf = tmp.path().join("net.d");
    // nsenter (not `ip netns exec`, which remounts /sys and hides the cgroup hierarchies).
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(repo().join("scripts/demo"))
        .arg("--once")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--cni-bin-dir")
        .arg(tmp.path().join("cni-bin"))
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("web-1-"), "{stdout}");
    assert!(stdout.contains("2/2"), "{stdout}");
    assert_eq!(stdout.matches("Hello from hako").count(), 2, "{stdout}");
    assert!(
        stdout.contains("color from the ConfigMap volume: teal"),
        "{stdout}"
    );
    assert!(
        stdout.contains("secret token: 12 bytes, mode 400"),
        "{stdout}"
    );
    assert!(stdout.contains("initialized at"), "{stdout}");
    // Nothing left: state, conflist, bridge, Service rules, processes in the namespace.
    assert!(!state.exists(), "state dir left");
    assert_eq!(
        std::fs::read_dir(&conf).map(|d| d.count()).unwrap_or(0),
        0,
        "conflist left"
    );
    let links = ns.ip(&["link"]).expect("links");
    assert!(!links.contains("hako0"), "{links}");
    let rules = ns.sh("iptables-save").expect("iptables-save");
    assert!(!rules.contains("KUBE-"), "{rules}");
    assert!(ns.pids().is_empty(), "processes left: {:?}", ns.pids());
}
