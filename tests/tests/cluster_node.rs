//! Cluster mode against the apiserver fixture: node registration content, Ready following the
//! CNI config, Lease renewal cadence, status sent only on change, node restrictions respected,
//! and survival of an apiserver restart and injected errors. Runs the real `hako-agent`
//! binary (build it first: `cargo build -p hako-agent`). No root needed: no overlay here.

use hako_tests::apiserver::ApiServer;
use hako_tests::cluster::PlainAgent;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

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
    let agent = PlainAgent::start(&srv, "n1", &args);
    let node = agent.wait_for("node registration with status", 20, || {
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
    let node = agent.wait_for("Ready=True", 10, || {
        srv.get("", "nodes", "", "n1")
            .filter(|n| condition(n, "Ready")["status"] == "True")
    });
    assert_eq!(condition(&node, "Ready")["reason"], "KubeletReady");

    // Lease: renewed about every second (the configured period), duration 4×.
    let lease = agent.wait_for("lease", 10, || {
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
    let agent = PlainAgent::start(&srv, "n2", FAST);
    let renew_time = |srv: &ApiServer| {
        srv.get("coordination.k8s.io", "leases", "kube-node-lease", "n2")
            .and_then(|l| l["spec"]["renewTime"].as_str().map(str::to_string))
    };
    agent.wait_for("lease", 20, || renew_time(&srv));
    srv.stop();
    std::thread::sleep(Duration::from_secs(3));
    let before = renew_time(&srv).expect("lease kept across stop");
    srv.restart().expect("restart");
    agent.wait_for("renewal after restart", 15, || {
        renew_time(&srv).filter(|t| *t != before)
    });
    // Transient 500s: the agent backs off and carries on.
    srv.fail_next(5);
    let after_errors = renew_time(&srv).expect("lease");
    std::thread::sleep(Duration::from_millis(1200));
    agent.wait_for("renewal after errors", 15, || {
        renew_time(&srv).filter(|t| *t != after_errors)
    });
    assert!(
        agent.log().contains("lease renewal failed"),
        "the failures were seen and logged once: {}",
        agent.log()
    );
    // Still the same process: it never exited.
    let mut agent = agent;
    assert!(agent.exited().is_none());
}
