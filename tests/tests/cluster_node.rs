//! Cluster mode against the apiserver fixture: node registration content, Ready following the
//! CNI config, Lease renewal cadence, status sent only on change, node restrictions respected,
//! and survival of an apiserver restart and injected errors. Runs the real `hako-agent`
//! binary (build it first: `cargo build -p hako-agent`). No root needed: no overlay here.

use hako_tests::agent::target_bin;
use hako_tests::apiserver::ApiServer;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    _tmp: tempfile::TempDir,
    cni_dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(srv: &ApiServer, node: &str, extra: &[&str]) -> Agent {
        let tmp = tempfile::tempdir().expect("tmp");
        let kc = tmp.path().join("kubeconfig");
        srv.write_kubeconfig(&kc, &srv.node_token(node))
            .expect("kubeconfig");
        let cni_dir = tmp.path().join("net.d");
        std::fs::create_dir_all(&cni_dir).expect("cni dir");
        let log = tmp.path().join("agent.log");
        let logf = std::fs::File::create(&log).expect("log");
        let child = Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--hostname-override", node, "--node-ip", "192.0.2.10"])
            .args(["--kubelet-port", "0"])
            .arg("--root-dir")
            .arg(tmp.path().join("root"))
            .arg("--run-dir")
            .arg(tmp.path().join("run"))
            .arg("--cni-conf-dir")
            .arg(&cni_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn hako-agent");
        Agent {
            child,
            _tmp: tmp,
            cni_dir,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_for<T>(what: &str, secs: u64, agent: &Agent, f: impl FnMut() -> Option<T>) -> T {
    hako_tests::poll_until(
        what,
        Duration::from_secs(secs),
        Duration::from_millis(100),
        || format!("agent log:\n{}", agent.log()),
        f,
    )
}

fn condition<'a>(node: &'a Value, t: &str) -> &'a Value {
    node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

fn write_conflist(dir: &Path) {
    std::fs::write(
        dir.join("10-hako.conflist"),
        r#"{"cniVersion":"1.0.0","name":"hako","plugins":[{"type":"hako-cni"}]}"#,
    )
    .expect("conflist");
}

const FAST: &[&str] = &[
    "--node-lease-renew-interval",
    "1",
    "--node-status-update-frequency",
    "1",
];

#[test]
fn registration_readiness_lease_and_restrictions() {
    let srv = ApiServer::start().expect("fixture");
    let mut args = FAST.to_vec();
    args.extend([
        "--node-labels",
        "role=edge,zone=z1",
        "--register-with-taints",
        "dedicated=infra:NoSchedule",
        "--system-reserved",
        "cpu=100m,memory=64Mi",
    ]);
    let agent = Agent::start(&srv, "n1", &args);
    let node = wait_for("node registration with status", 20, &agent, || {
        srv.get("", "nodes", "", "n1")
            .filter(|n| n["status"]["nodeInfo"].is_object())
    });
    let labels = &node["metadata"]["labels"];
    assert_eq!(labels["kubernetes.io/hostname"], "n1");
    assert_eq!(labels["kubernetes.io/os"], "linux");
    assert!(labels["kubernetes.io/arch"].is_string());
    assert_eq!(labels["role"], "edge");
    assert_eq!(labels["zone"], "z1");
    assert_eq!(
        node["spec"]["taints"][0]["key"], "dedicated",
        "registered with taints: {node}"
    );
    let st = &node["status"];
    assert_eq!(st["addresses"][0]["type"], "InternalIP");
    assert_eq!(st["addresses"][0]["address"], "192.0.2.10");
    assert_eq!(st["addresses"][1]["type"], "Hostname");
    assert_eq!(st["capacity"]["pods"], "110");
    for r in ["cpu", "memory", "ephemeral-storage"] {
        assert!(st["capacity"][r].is_string(), "capacity {r}: {st}");
        assert!(st["allocatable"][r].is_string(), "allocatable {r}");
    }
    let cpus: i64 = st["capacity"]["cpu"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("cpu");
    assert_eq!(
        st["allocatable"]["cpu"],
        Value::from(format!("{}m", cpus * 1000 - 100)),
        "allocatable cpu = capacity − system-reserved"
    );
    let info = &st["nodeInfo"];
    assert!(info["containerRuntimeVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("hako://")));
    assert!(info["kubeletVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("v1.")));
    for f in [
        "machineID",
        "bootID",
        "kernelVersion",
        "osImage",
        "architecture",
    ] {
        assert!(
            info[f].as_str().is_some_and(|v| !v.is_empty()),
            "nodeInfo.{f}: {info}"
        );
    }
    assert_eq!(st["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
    for t in [
        "MemoryPressure",
        "DiskPressure",
        "PIDPressure",
        "NetworkUnavailable",
    ] {
        assert!(condition(&node, t)["status"].is_string(), "condition {t}");
    }
    assert_eq!(condition(&node, "Ready")["status"], "False");
    assert_eq!(condition(&node, "Ready")["reason"], "KubeletNotReady");

    // A CNI config makes the node Ready.
    write_conflist(&agent.cni_dir);
    let node = wait_for("Ready=True", 10, &agent, || {
        srv.get("", "nodes", "", "n1")
            .filter(|n| condition(n, "Ready")["status"] == "True")
    });
    assert_eq!(condition(&node, "Ready")["reason"], "KubeletReady");

    // Lease: renewed about every second (the configured period), duration 4×.
    let lease = wait_for("lease", 10, &agent, || {
        srv.get("coordination.k8s.io", "leases", "kube-node-lease", "n1")
    });
    assert_eq!(lease["spec"]["holderIdentity"], "n1");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 4);
    assert_eq!(lease["metadata"]["ownerReferences"][0]["kind"], "Node");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(4500));
    let reqs = srv.requests();
    let lease_writes: Vec<Instant> = reqs
        .iter()
        .filter(|r| {
            r.at >= t0
                && r.attrs.resource == "leases"
                && matches!(r.attrs.verb.as_str(), "update" | "create")
                && r.status < 300
        })
        .map(|r| r.at)
        .collect();
    assert!(
        (3..=6).contains(&lease_writes.len()),
        "about one renewal per second in 4.5 s, got {}",
        lease_writes.len()
    );
    // Status is not re-sent while nothing changes (heartbeat only every 5 minutes).
    let status_writes = reqs
        .iter()
        .filter(|r| {
            r.at >= t0 + Duration::from_secs(1)
                && r.attrs.resource == "nodes"
                && r.attrs.subresource == "status"
        })
        .count();
    assert_eq!(status_writes, 0, "unchanged status is coalesced");

    // Node restrictions: nothing the agent asked for was refused, and it never listed secrets.
    let bad: Vec<_> = reqs
        .iter()
        .filter(|r| r.user == "system:node:n1" && r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(bad.is_empty(), "forbidden requests: {bad:?}");
    assert!(!reqs
        .iter()
        .any(|r| r.attrs.resource == "secrets" && r.attrs.name.is_empty()));
}

#[test]
fn survives_apiserver_restart_and_errors() {
    let mut srv = ApiServer::start().expect("fixture");
    let agent = Agent::start(&srv, "n2", FAST);
    let renew_time = |srv: &ApiServer| {
        srv.get("coordination.k8s.io", "leases", "kube-node-lease", "n2")
            .and_then(|l| l["spec"]["renewTime"].as_str().map(str::to_string))
    };
    wait_for("lease", 20, &agent, || renew_time(&srv));
    srv.stop();
    std::thread::sleep(Duration::from_secs(3));
    let before = renew_time(&srv).expect("lease kept across stop");
    srv.restart().expect("restart");
    wait_for("renewal after restart", 15, &agent, || {
        renew_time(&srv).filter(|t| *t != before)
    });
    // Transient 500s: the agent backs off and carries on.
    srv.fail_next(5);
    let after_errors = renew_time(&srv).expect("lease");
    std::thread::sleep(Duration::from_millis(1200));
    wait_for("renewal after errors", 15, &agent, || {
        renew_time(&srv).filter(|t| *t != after_errors)
    });
    assert!(
        agent.log().contains("lease renewal failed"),
        "the failures were seen and logged once: {}",
        agent.log()
    );
    // Still the same process: it never exited.
    let mut agent = agent;
    assert!(agent.child.try_wait().expect("wait").is_none());
}
