//! Root test of a pod run by a cluster-mode agent: the pod is created in the apiserver fixture
//! bound to the node, runs under the real pod workers (hako-shim, CNI, local registry image),
//! its status round-trips through `pods/<name>/status` (phase, podIP, hostIP, qosClass,
//! container statuses, readiness), a ConfigMap update reaches the running container's volume,
//! a static pod appears as a mirror pod, and a graceful deletion ends with the agent's
//! grace-0 delete carrying the UID precondition.
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::ApiServer;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn wait_for<T>(what: &str, secs: u64, env: &AgentEnv, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; agent log:\n{}",
            env.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cond(p: &Value, t: &str) -> Value {
    p["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .map(|c| c["status"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn pod_runs_reports_status_and_is_deleted_gracefully() {
    let mut env = AgentEnv::new("clpod");
    let srv = env
        .ns
        .run(ApiServer::start)
        .expect("netns")
        .expect("fixture");
    let kc = env.root.parent().expect("tmp").join("kubeconfig");
    srv.write_kubeconfig(&kc, &srv.node_token("node1"))
        .expect("kubeconfig");
    env.args.extend(
        [
            "--kubeconfig",
            kc.to_str().expect("path"),
            "--kubelet-port",
            "0",
            "--node-lease-renew-interval",
            "1",
            "--node-status-update-frequency",
            "1",
        ]
        .map(String::from),
    );
    env.start();
    wait_for("node Ready", 30, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True")
    });
    srv.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default"}, "data": {"k": "v1"}}))
        .expect("cm");
    let created = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 3,
                "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                "containers": [{"name": "c", "image": env.image("sleep"),
                    "command": ["sh", "-c", "sleep 2; touch /tmp/ready; exec sleep 3600"],
                    "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}],
                    "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1}}]}}))
        .expect("pod");
    let uid = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();

    // Running first (not ready), then Ready once the probe passes.
    let running = wait_for("Running", 60, &env, || {
        srv.get("", "pods", "default", "web")
            .filter(|p| p["status"]["phase"] == "Running")
    });
    let st = &running["status"];
    assert!(
        st["podIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.88.0.")),
        "{st}"
    );
    assert_eq!(st["hostIP"], "10.88.0.1", "{st}");
    assert_eq!(st["qosClass"], "BestEffort", "{st}");
    assert!(st["startTime"].is_string(), "{st}");
    assert_eq!(st["containerStatuses"][0]["name"], "c");
    assert!(
        st["containerStatuses"][0]["state"]["running"].is_object(),
        "{st}"
    );
    let ready = wait_for("Ready", 30, &env, || {
        srv.get("", "pods", "default", "web")
            .filter(|p| cond(p, "Ready") == "True")
    });
    assert_eq!(ready["status"]["containerStatuses"][0]["ready"], true);

    // The workers' events reach the apiserver in the pod's namespace.
    wait_for("events", 15, &env, || {
        let reasons: Vec<String> = srv
            .list("", "events")
            .iter()
            .filter(|e| {
                e["involvedObject"]["name"] == "web" && e["metadata"]["namespace"] == "default"
            })
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect();
        ["Created", "Started"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
            .then_some(())
    });

    // ConfigMap update reaches the running container's volume.
    let cid = ready["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("hako://"))
        .expect("containerID")
        .to_string();
    let state: Value = serde_json::from_slice(
        &std::fs::read(env.run.join("containers").join(&cid).join("state.json")).expect("state"),
    )
    .expect("state json");
    let pid = state["pid"].as_i64().expect("pid");
    let file = format!("/proc/{pid}/root/cfg/k");
    assert_eq!(std::fs::read_to_string(&file).expect("cfg").trim(), "v1");
    srv.merge_patch(
        "",
        "configmaps",
        "default",
        "cfg",
        "",
        &json!({"data": {"k": "v2"}}),
    )
    .expect("update cm");
    wait_for("ConfigMap update in the volume", 30, &env, || {
        (std::fs::read_to_string(&file).ok()?.trim() == "v2").then_some(())
    });

    // A static pod from --pod-manifest-path runs and appears as a mirror pod with its status.
    env.write_manifest(
        "static.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static\nspec:\n  containers:\n  - name: s\n    image: {}\n",
            env.image("sleep")
        ),
    );
    let mirror = wait_for("mirror pod Running", 60, &env, || {
        srv.get("", "pods", "default", "static-node1")
            .filter(|p| p["status"]["phase"] == "Running")
    });
    assert!(
        mirror["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string(),
        "{mirror}"
    );
    assert_eq!(mirror["metadata"]["ownerReferences"][0]["kind"], "Node");
    env.remove_manifest("static.yaml");
    wait_for("mirror pod removed", 30, &env, || {
        srv.get("", "pods", "default", "static-node1")
            .is_none()
            .then_some(())
    });

    // Graceful deletion: the agent stops the pod, then deletes it with grace 0 + UID.
    let d = srv
        .delete(
            "",
            "pods",
            "default",
            "web",
            &json!({"gracePeriodSeconds": 3}),
        )
        .expect("delete");
    assert!(d["metadata"]["deletionTimestamp"].is_string());
    wait_for("pod removed by the agent", 30, &env, || {
        srv.get("", "pods", "default", "web")
            .is_none()
            .then_some(())
    });
    let del = srv
        .requests()
        .into_iter()
        .find(|r| r.user == "system:node:node1" && r.method == "DELETE" && r.attrs.name == "web")
        .expect("the agent's delete");
    let body: Value = serde_json::from_str(&del.body).expect("body");
    assert_eq!(body["gracePeriodSeconds"], 0);
    assert_eq!(body["preconditions"]["uid"], Value::from(uid));
    let forbidden: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:node:node1" && r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    env.stop();
}
