//! `hako-proxy --cleanup` and `hako-agent --cleanup-proxier` in fresh network namespaces:
//! after Services were programmed in iptables or nftables mode, nothing of any mode stays
//! (no KUBE-* chain or jump in any table of either family, no `hako` nf_tables table, no
//! dummy device), while rules and chains of others (the kubelet's KUBE-FIREWALL, a user's
//! rule) stay. Starting in one mode removes the other mode's leftovers. IPVS mode is covered
//! in the VM lane (`vm_ops_cleanup.rs`): this host kernel has no IPVS.
#![cfg(feature = "root")]

use std::path::{Path, PathBuf};
use std::process::Output;

use hako_tests::agent::target_bin;
use hako_tests::netns::require_root;
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
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  clusterIP: 10.96.0.51
  ports: [{name: p, port: 81, protocol: TCP}]
";

struct Env {
    ns: NetNs,
    dir: tempfile::TempDir,
}

impl Env {
    fn new(tag: &str) -> Env {
        require_root();
        let ns = NetNs::new(tag).unwrap();
        ns.sh("ip link set lo up").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("objects")).unwrap();
        std::fs::write(dir.path().join("objects/web.yaml"), OBJECTS).unwrap();
        Env { ns, dir }
    }

    fn objects(&self) -> PathBuf {
        self.dir.path().join("objects")
    }

    /// Runs a binary inside the namespace; its output (stderr is the log).
    fn run(&self, bin: &Path, args: &[&str]) -> Output {
        self.ns
            .command(bin.to_str().unwrap())
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// `hako-proxy --once` in `mode` over the objects; asserts success.
    fn sync_once(&self, mode: &str) -> String {
        let objects = self.objects();
        let out = self.run(
            &proxy(),
            &[
                "--config-dir",
                objects.to_str().unwrap(),
                "--proxy-mode",
                mode,
                "--cluster-cidr",
                "10.244.0.0/16",
                "--hostname-override",
                "n1",
                "--once",
            ],
        );
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "hako-proxy {mode} --once: {log}");
        log
    }

    fn cleanup(&self, bin: &Path, flag: &str) -> String {
        let out = self.run(bin, &[flag]);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{} {flag} failed ({}): {log}",
            bin.display(),
            out.status
        );
        log
    }

    /// Every table of both families in the default iptables flavour (the one the proxier
    /// used) and in the legacy one.
    fn iptables_dump(&self) -> String {
        let mut s = String::new();
        for save in ["iptables-save", "ip6tables-save", "iptables-legacy-save"] {
            for t in ["nat", "filter", "mangle"] {
                s.push_str(
                    &self
                        .ns
                        .sh(&format!("{save} -t {t} 2>/dev/null || true"))
                        .unwrap(),
                );
            }
        }
        s
    }

    fn kube_lines(&self) -> Vec<String> {
        self.iptables_dump()
            .lines()
            .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL"))
            .map(str::to_string)
            .collect()
    }

    fn nft_tables(&self) -> String {
        self.ns.sh("nft list tables").unwrap()
    }
}

fn proxy() -> PathBuf {
    target_bin("hako-proxy", "HAKO_PROXY_BIN")
}

fn agent() -> PathBuf {
    target_bin("hako-agent", "HAKO_AGENT_BIN")
}

/// Chains and rules of others that every cleanup must keep.
fn add_foreign_rules(env: &Env) {
    env.ns
        .sh("iptables -t filter -N KUBE-FIREWALL && iptables -t filter -A INPUT -j KUBE-FIREWALL \
             && iptables -t nat -A PREROUTING -p tcp --dport 9999 -m comment --comment keep-me -j ACCEPT")
        .unwrap();
}

fn assert_foreign_rules(env: &Env) {
    let dump = env.iptables_dump();
    assert!(
        dump.contains(":KUBE-FIREWALL"),
        "foreign chain removed:\n{dump}"
    );
    assert!(
        dump.contains("-A INPUT -j KUBE-FIREWALL"),
        "foreign jump removed:\n{dump}"
    );
    assert!(dump.contains("keep-me"), "foreign rule removed:\n{dump}");
}

#[test]
fn cleanup_removes_iptables_mode_rules() {
    let env = Env::new("opsclipt");
    add_foreign_rules(&env);
    env.sync_once("iptables");
    let before = env.kube_lines();
    for want in [
        ":KUBE-SERVICES",
        ":KUBE-POSTROUTING",
        ":KUBE-NODEPORTS",
        ":KUBE-SVC-",
        ":KUBE-SEP-",
        "-j KUBE-SERVICES",
        ":KUBE-PROXY-CANARY",
    ] {
        assert!(
            before.iter().any(|l| l.contains(want)),
            "{want} not programmed:\n{}",
            before.join("\n")
        );
    }
    let log = env.cleanup(&proxy(), "--cleanup");
    let after = env.kube_lines();
    assert!(
        after.is_empty(),
        "left after --cleanup:\n{}\n--- log:\n{log}",
        after.join("\n")
    );
    assert_foreign_rules(&env);
    // A second cleanup finds nothing and still succeeds.
    env.cleanup(&proxy(), "--cleanup");
}

#[test]
fn cleanup_removes_the_nftables_table() {
    let env = Env::new("opsclnft");
    env.sync_once("nftables");
    assert!(
        env.nft_tables().contains("table ip hako"),
        "{}",
        env.nft_tables()
    );
    let set = env.ns.sh("nft list table ip hako").unwrap();
    assert!(set.contains("10.96.0.50"), "{set}");
    let log = env.cleanup(&agent(), "--cleanup-proxier");
    let tables = env.nft_tables();
    assert!(
        !tables.contains("hako"),
        "left after --cleanup-proxier:\n{tables}\n--- log:\n{log}"
    );
    assert!(env.kube_lines().is_empty());
}

#[test]
fn agent_cleanup_proxier_removes_iptables_mode_rules() {
    let env = Env::new("opsclagt");
    add_foreign_rules(&env);
    env.sync_once("iptables");
    assert!(!env.kube_lines().is_empty());
    let log = env.cleanup(&agent(), "--cleanup-proxier");
    let after = env.kube_lines();
    assert!(
        after.is_empty(),
        "left:\n{}\n--- log:\n{log}",
        after.join("\n")
    );
    assert_foreign_rules(&env);
}

#[test]
fn starting_in_one_mode_removes_the_other_modes_leftovers() {
    let env = Env::new("opsclsw");
    add_foreign_rules(&env);
    env.sync_once("iptables");
    assert!(env.kube_lines().iter().any(|l| l.contains(":KUBE-SVC-")));
    // iptables -> nftables: the iptables chains go, the nf_tables table comes.
    let log = env.sync_once("nftables");
    let left = env.kube_lines();
    assert!(
        left.is_empty(),
        "iptables leftovers after starting in nftables mode:\n{}\n--- log:\n{log}",
        left.join("\n")
    );
    assert!(env.nft_tables().contains("table ip hako"));
    assert_foreign_rules(&env);
    // nftables -> iptables: the table goes, the chains come back.
    let log = env.sync_once("iptables");
    assert!(
        !env.nft_tables().contains("hako"),
        "nf_tables leftovers after starting in iptables mode:\n{}\n--- log:\n{log}",
        env.nft_tables()
    );
    assert!(env.kube_lines().iter().any(|l| l.contains(":KUBE-SVC-")));
    // An IPVS-mode leftover chain (as IPVS mode would leave it) goes when iptables mode
    // starts; the iptables mode's own chains stay.
    env.ns
        .sh("iptables -t nat -N KUBE-NODE-PORT && iptables -t nat -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
        .unwrap();
    env.sync_once("iptables");
    let lines = env.kube_lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("KUBE-NODE-PORT ") || l.ends_with("KUBE-NODE-PORT")),
        "IPVS chain left:\n{}",
        lines.join("\n")
    );
    assert!(lines.iter().any(|l| l.contains(":KUBE-SVC-")));
}
