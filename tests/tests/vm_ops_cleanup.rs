//! `hako-proxy --cleanup` and mode switches for IPVS mode, in the VM lane's guest (the host
//! kernel has no IPVS): after IPVS mode programmed Services in a fresh namespace, nothing
//! stays (no virtual service, no kube-ipvs0, no KUBE-* ipset or chain); starting in
//! iptables mode removes IPVS mode's leftovers and keeps its own rules.
#![cfg(feature = "vm")]

use std::path::PathBuf;

use hako_tests::agent::target_bin;
use hako_tests::vm::require_guest;
use hako_tests::NetNs;

const OBJECTS: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.50
  type: NodePort
  ports: [{name: p, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.5]
  conditions: {ready: true}
";

struct Env {
    ns: NetNs,
    dir: tempfile::TempDir,
}

impl Env {
    fn new(tag: &str) -> Env {
        require_guest();
        let ns = NetNs::new(tag).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), OBJECTS).unwrap();
        Env { ns, dir }
    }

    fn proxy(&self, args: &[&str]) -> String {
        let out = self
            .ns
            .command(proxy().to_str().unwrap())
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "hako-proxy {args:?}: {log}");
        log
    }

    fn sync_once(&self, mode: &str) -> String {
        let d = self.dir.path().to_str().unwrap().to_string();
        self.proxy(&[
            "--config-dir",
            &d,
            "--proxy-mode",
            mode,
            "--hostname-override",
            "n1",
            "--once",
        ])
    }

    fn ipvs(&self) -> String {
        self.ns.sh("ipvsadm -Ln").unwrap()
    }

    fn sets(&self) -> String {
        self.ns.sh("ipset list -n").unwrap()
    }

    fn device(&self) -> bool {
        self.ns
            .sh("ip link show kube-ipvs0 >/dev/null 2>&1 && echo yes || echo no")
            .unwrap()
            .trim()
            == "yes"
    }

    fn chains(&self) -> Vec<String> {
        let mut v = Vec::new();
        for t in ["nat", "filter", "mangle"] {
            let s = self.ns.sh(&format!("iptables-save -t {t}")).unwrap();
            v.extend(
                s.lines()
                    .filter(|l| l.contains("KUBE-"))
                    .map(str::to_string),
            );
        }
        v
    }
}

fn proxy() -> PathBuf {
    target_bin("hako-proxy", "HAKO_PROXY_BIN")
}

#[test]
fn cleanup_removes_ipvs_mode_state() {
    let env = Env::new("vmopsipvs");
    env.sync_once("ipvs");
    assert!(env.ipvs().contains("10.96.0.50:80"), "{}", env.ipvs());
    assert!(env.device());
    assert!(env.sets().contains("KUBE-CLUSTER-IP"), "{}", env.sets());
    assert!(env.chains().iter().any(|l| l.contains(":KUBE-IPVS-FILTER")));
    let log = env.proxy(&["--cleanup"]);
    assert!(!env.ipvs().contains("TCP"), "{}\n{log}", env.ipvs());
    assert!(!env.device(), "kube-ipvs0 left: {log}");
    assert!(!env.sets().contains("KUBE-"), "{}\n{log}", env.sets());
    assert!(env.chains().is_empty(), "{:?}\n{log}", env.chains());
}

#[test]
fn starting_in_iptables_mode_removes_ipvs_mode_state() {
    let env = Env::new("vmopssw");
    env.sync_once("ipvs");
    assert!(env.device());
    let log = env.sync_once("iptables");
    assert!(!env.ipvs().contains("TCP"), "{}\n{log}", env.ipvs());
    assert!(!env.device(), "kube-ipvs0 left: {log}");
    assert!(!env.sets().contains("KUBE-"), "{}\n{log}", env.sets());
    let chains = env.chains();
    assert!(
        !chains
            .iter()
            .any(|l| l.contains("KUBE-IPVS-FILTER") || l.contains(":KUBE-NODE-PORT ")),
        "{chains:?}"
    );
    assert!(
        chains.iter().any(|l| l.contains(":KUBE-SVC-")),
        "{chains:?}"
    );
    // And back: IPVS mode removes iptables mode's per-service chains.
    let log = env.sync_once("ipvs");
    let chains = env.chains();
    assert!(
        !chains
            .iter()
            .any(|l| l.contains(":KUBE-SVC-") || l.contains(":KUBE-SEP-")),
        "{chains:?}\n{log}"
    );
    assert!(env.ipvs().contains("10.96.0.50:80"));
    env.proxy(&["--cleanup"]);
}
