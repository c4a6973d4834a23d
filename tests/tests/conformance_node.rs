//! Root tests of upstream v1.28 `[NodeConformance]` specs (test/e2e/common/node) through the
//! apiserver fixture, with the specs' pod shapes and the outcomes they assert:
//! - KubeletManagedEtcHosts: a pod-network container gets the kubelet-managed /etc/hosts, a
//!   container that mounts /etc/hosts itself gets that file, a hostNetwork pod gets the node's
//!   file under the "(host network)" header;
//! - Container Runtime blackbox: a termination message written by a non-root user at a
//!   non-default path is reported;
//! - PodOSRejection: a pod for another OS is rejected with `PodOSNotSupported`;
//! - Pods: `activeDeadlineSeconds` set on a running pod fails it with `DeadlineExceeded`;
//! - Pods: readiness gates hold `Ready` until their conditions are "True".
#![cfg(feature = "root")]

use hako_tests::apiserver::patch::strategic_merge_patch;
use hako_tests::cluster::{cluster_env, condition as cond, container_pid, wait_for};
use serde_json::{json, Value};

fn pod(name: &str, spec: Value) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1}});
    if let (Some(dst), Value::Object(src)) = (p["spec"].as_object_mut(), spec) {
        for (k, v) in src {
            dst.insert(k, v);
        }
    }
    p
}

/// A container's file, read through its root (`idx`: the container's index in the status).
fn container_file(
    env: &hako_tests::agent::AgentEnv,
    pod: &Value,
    idx: usize,
    path: &str,
) -> String {
    let mut one = pod.clone();
    one["status"]["containerStatuses"] = json!([pod["status"]["containerStatuses"][idx].clone()]);
    let pid = container_pid(env, &one);
    std::fs::read_to_string(format!("/proc/{pid}/root{path}"))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Applies a strategic-merge patch to a pod's status as `kubectl patch --subresource=status`
/// does (the fixture's in-process helper takes a JSON merge patch, so the merge is done here).
fn patch_status(srv: &hako_tests::apiserver::ApiServer, name: &str, patch: Value) {
    let mut p = srv.get("", "pods", "default", name).expect("pod");
    strategic_merge_patch(&mut p, &patch).expect("strategic merge");
    srv.merge_patch(
        "",
        "pods",
        "default",
        name,
        "status",
        &json!({"status": {"conditions": p["status"]["conditions"].clone()}}),
    )
    .expect("status patch");
}

#[test]
fn node_conformance_specs() {
    let (mut env, srv) = cluster_env("conform");
    env.start();
    wait_for("node Ready", 30, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True")
    });
    let sleep = env.image("sleep");
    let sleeper = |name: &str| json!({"name": name, "image": sleep, "command": ["sleep", "3600"]});

    // KubeletManagedEtcHosts (two pods as the spec: pod network, host network).
    let mut hosts_mount = sleeper("busybox-3");
    hosts_mount["volumeMounts"] = json!([{"name": "host-etc-hosts", "mountPath": "/etc/hosts"}]);
    srv.create(pod(
        "test-pod",
        json!({"volumes": [{"name": "host-etc-hosts", "hostPath": {"path": "/etc/hosts"}}],
               "containers": [sleeper("busybox-1"), hosts_mount]}),
    ))
    .expect("test-pod");
    srv.create(pod(
        "test-host-network-pod",
        json!({"hostNetwork": true, "containers": [sleeper("busybox-1")]}),
    ))
    .expect("host network pod");

    // Container Runtime blackbox: non-root user, non-default path.
    srv.create(pod(
        "termination-message",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "termination-message-container", "image": sleep,
                   "command": ["/bin/sh", "-c", "/bin/echo -n DONE > /dev/termination-custom-log"],
                   "terminationMessagePath": "/dev/termination-custom-log",
                   "securityContext": {"runAsUser": 1000}}]}),
    ))
    .expect("termination pod");

    // PodOSRejection.
    srv.create(pod(
        "wrong-os",
        json!({"os": {"name": "windows"}, "containers": [sleeper("c")]}),
    ))
    .expect("wrong-os");

    // Pods: activeDeadlineSeconds updated on a running pod; readiness gates.
    srv.create(pod("deadline", json!({"containers": [sleeper("c")]})))
        .expect("deadline pod");
    srv.create(pod(
        "gated",
        json!({"readinessGates": [{"conditionType": "k8s.io/test-condition1"},
                                  {"conditionType": "k8s.io/test-condition2"}],
               "containers": [sleeper("c")]}),
    ))
    .expect("gated pod");

    let running = |name: &'static str| {
        wait_for(name, 90, &env, || {
            srv.get("", "pods", "default", name).filter(|p| {
                p["status"]["phase"] == "Running"
                    && p["status"]["containerStatuses"]
                        .as_array()
                        .is_some_and(|a| a.iter().all(|c| c["state"]["running"].is_object()))
            })
        })
    };

    // /etc/hosts.
    let p = running("test-pod");
    let names: Vec<&str> = p["status"]["containerStatuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let idx = |n: &str| names.iter().position(|x| *x == n).expect("container");
    let managed = container_file(&env, &p, idx("busybox-1"), "/etc/hosts");
    assert!(
        managed.starts_with("# Kubernetes-managed hosts file.\n"),
        "{managed}"
    );
    let own = container_file(&env, &p, idx("busybox-3"), "/etc/hosts");
    let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    assert_eq!(
        own, node_hosts,
        "a container mounting /etc/hosts sees that file"
    );
    let h = running("test-host-network-pod");
    let host_net = container_file(&env, &h, 0, "/etc/hosts");
    assert!(
        host_net.starts_with("# Kubernetes-managed hosts file (host network).\n"),
        "{host_net}"
    );
    assert!(
        !host_net.contains("# Kubernetes-managed hosts file.\n"),
        "{host_net}"
    );
    assert!(host_net.contains(node_hosts.trim_end()), "{host_net}");

    // Termination message.
    let t = wait_for("termination-message Succeeded", 60, &env, || {
        srv.get("", "pods", "default", "termination-message")
            .filter(|p| p["status"]["phase"] == "Succeeded" || p["status"]["phase"] == "Failed")
    });
    let term = &t["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(t["status"]["phase"], "Succeeded", "{term}");
    assert_eq!(term["message"], "DONE", "{term}");

    // PodOSRejection.
    let w = wait_for("wrong-os Failed", 30, &env, || {
        srv.get("", "pods", "default", "wrong-os")
            .filter(|p| p["status"]["phase"] == "Failed")
    });
    assert_eq!(
        w["status"]["reason"], "PodOSNotSupported",
        "{}",
        w["status"]
    );

    // activeDeadlineSeconds updated to 5 on the running pod.
    running("deadline");
    srv.merge_patch(
        "",
        "pods",
        "default",
        "deadline",
        "",
        &json!({"spec": {"activeDeadlineSeconds": 5}}),
    )
    .expect("deadline patch");
    let d = wait_for("deadline Failed", 60, &env, || {
        srv.get("", "pods", "default", "deadline")
            .filter(|p| p["status"]["phase"] == "Failed")
    });
    assert_eq!(d["status"]["reason"], "DeadlineExceeded", "{}", d["status"]);
    assert_eq!(
        d["status"]["message"],
        "Pod was active on the node longer than the specified deadline"
    );

    // Readiness gates: not ready until both conditions are True, not ready again after one
    // turns False.
    running("gated");
    let ready_is = |want: &'static str| {
        wait_for(want, 30, &env, || {
            srv.get("", "pods", "default", "gated")
                .filter(|p| cond(p, "Ready") == want)
        })
    };
    let g = ready_is("False");
    assert_eq!(cond(&g, "ContainersReady"), "True", "{}", g["status"]);
    let gate = |t1: &str, t2: &str| {
        json!({"status": {"conditions": [
            {"type": "k8s.io/test-condition1", "status": t1},
            {"type": "k8s.io/test-condition2", "status": t2}]}})
    };
    patch_status(
        &srv,
        "gated",
        json!({"status": {"conditions": [
        {"type": "k8s.io/test-condition1", "status": "True"}]}}),
    );
    // Still not ready with one gate; the agent keeps the gate's condition.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let g = srv.get("", "pods", "default", "gated").expect("gated");
    assert_eq!(cond(&g, "Ready"), "False", "{}", g["status"]);
    assert_eq!(
        cond(&g, "k8s.io/test-condition1"),
        "True",
        "{}",
        g["status"]
    );
    patch_status(&srv, "gated", gate("True", "True"));
    ready_is("True");
    patch_status(&srv, "gated", gate("True", "False"));
    let g = ready_is("False");
    let ready = g["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["reason"], "ReadinessGatesNotReady", "{ready}");
}
