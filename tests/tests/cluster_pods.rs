//! Cluster-mode pods against the apiserver fixture: kubelet admission (rejected pods get phase
//! Failed with the kubelet's reason and a Warning event), ConfigMaps watched by name only,
//! graceful deletion finished with a grace-0 delete carrying the UID precondition, and the pod
//! watch surviving an apiserver restart and a 410 Gone (relist). Runs the real `hako-agent`
//! (build it first). No root: the admitted pod is not expected to start here.

use hako_tests::apiserver::ApiServer;
use hako_tests::cluster::PlainAgent;
use serde_json::{json, Value};

/// The agent as node `node`, with a NoExecute taint and 1 s Lease and status periods.
fn start(srv: &ApiServer, node: &str) -> PlainAgent {
    PlainAgent::start(
        srv,
        node,
        &[
            "--register-with-taints",
            "dedicated=infra:NoExecute",
            "--node-lease-renew-interval",
            "1",
            "--node-status-update-frequency",
            "1",
        ],
    )
}

fn pod(name: &str, node: &str, spec: Value) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node,
                 "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}],
                 "containers": [{"name": "c", "image": "127.0.0.1:1/none:1"}]}});
    if let (Some(dst), Value::Object(src)) = (p["spec"].as_object_mut(), spec) {
        for (k, v) in src {
            dst.insert(k, v);
        }
    }
    p
}

fn failed_reason(srv: &ApiServer, name: &str) -> Option<String> {
    let p = srv.get("", "pods", "default", name)?;
    (p["status"]["phase"] == "Failed")
        .then(|| p["status"]["reason"].as_str().unwrap_or("").to_string())
}

#[test]
fn admission_deletion_and_watch_resilience() {
    let mut srv = ApiServer::start().expect("fixture");
    let agent = start(&srv, "n1");
    agent.wait_for("node", 20, || {
        srv.get("", "nodes", "", "n1")
            .filter(|n| n["status"]["allocatable"]["cpu"].is_string())
    });

    srv.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default"}, "data": {"k": "v"}}))
        .expect("cm");
    // Rejections as the kubelet reports them.
    let cases = [
        (
            "too-big",
            json!({"containers": [{"name": "c", "image": "i:1",
                "resources": {"requests": {"cpu": "100000"}}}]}),
            "OutOfcpu",
        ),
        (
            "wrong-node",
            json!({"nodeSelector": {"disk": "ssd"}}),
            "NodeAffinity",
        ),
        ("untolerated", json!({"tolerations": []}), "TaintToleration"),
        (
            "user-ns",
            json!({"hostUsers": false}),
            "UserNamespacesNotSupported",
        ),
    ];
    for (name, spec, _) in &cases {
        srv.create(pod(name, "n1", spec.clone())).expect("pod");
    }
    // An admissible pod that uses a ConfigMap, and one for another node.
    srv.create(pod(
        "ok",
        "n1",
        json!({"volumes": [{"name": "v", "configMap": {"name": "cfg"}}]}),
    ))
    .expect("pod");
    srv.create(pod(
        "elsewhere",
        "n2",
        json!({"nodeSelector": {"disk": "ssd"}}),
    ))
    .expect("pod");
    for (name, _, reason) in &cases {
        let got = agent.wait_for("rejection", 15, || failed_reason(&srv, name));
        assert_eq!(&got, reason, "{name}");
        let msg = srv.get("", "pods", "default", name).expect("pod")["status"]["message"].clone();
        assert!(
            msg.as_str()
                .is_some_and(|m| m.starts_with("Pod was rejected")),
            "{msg}"
        );
    }
    let events = agent.wait_for("events", 10, || {
        let ev = srv.list("", "events");
        (ev.len() >= 3).then_some(ev)
    });
    assert!(events.iter().any(|e| e["reason"] == "OutOfcpu"
        && e["involvedObject"]["name"] == "too-big"
        && e["type"] == "Warning"));
    assert!(
        failed_reason(&srv, "ok").is_none(),
        "admissible pod not rejected"
    );
    assert!(
        failed_reason(&srv, "elsewhere").is_none(),
        "other node's pod untouched"
    );

    // The ConfigMap is watched by name, never listed.
    agent.wait_for("configmap watch", 10, || {
        srv.requests()
            .iter()
            .any(|r| {
                r.user == "system:node:n1"
                    && r.attrs.resource == "configmaps"
                    && r.attrs.name == "cfg"
                    && r.status == 200
            })
            .then_some(())
    });

    // Restart mid-watch, then a compaction (the next watch gets 410 and the agent relists).
    srv.restart().expect("restart");
    srv.create(pod(
        "after-restart",
        "n1",
        json!({"nodeSelector": {"disk": "ssd"}}),
    ))
    .expect("pod");
    assert_eq!(
        agent.wait_for("rejection after restart", 20, || failed_reason(
            &srv,
            "after-restart"
        )),
        "NodeAffinity"
    );
    srv.compact();
    srv.restart().expect("restart");
    srv.create(pod(
        "after-410",
        "n1",
        json!({"nodeSelector": {"disk": "ssd"}}),
    ))
    .expect("pod");
    assert_eq!(
        agent.wait_for("rejection after 410", 30, || failed_reason(
            &srv,
            "after-410"
        )),
        "NodeAffinity"
    );

    let reqs = srv.requests();
    let bad: Vec<_> = reqs
        .iter()
        .filter(|r| r.user == "system:node:n1" && r.status == 403)
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    assert!(bad.is_empty(), "forbidden requests: {bad:?}");
    assert!(!reqs.iter().any(|r| r.user == "system:node:n1"
        && matches!(r.attrs.resource.as_str(), "configmaps" | "secrets")
        && r.attrs.name.is_empty()));
}

#[test]
fn graceful_deletion_uses_uid_precondition() {
    let srv = ApiServer::start().expect("fixture");
    let agent = start(&srv, "n3");
    agent.wait_for("node", 20, || srv.get("", "nodes", "", "n3"));
    // Rejected (untolerated NoExecute taint), so no worker holds it; then made Running again
    // so that the apiserver's graceful path applies to the delete.
    srv.create(pod("g", "n3", json!({"tolerations": []})))
        .expect("pod");
    agent.wait_for("rejection", 15, || failed_reason(&srv, "g"));
    srv.merge_patch(
        "",
        "pods",
        "default",
        "g",
        "status",
        &json!({"status": {"phase": "Running"}}),
    )
    .expect("status");
    let uid = srv.get("", "pods", "default", "g").expect("pod")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let p = srv
        .delete(
            "",
            "pods",
            "default",
            "g",
            &json!({"gracePeriodSeconds": 30}),
        )
        .expect("graceful delete");
    assert!(p["metadata"]["deletionTimestamp"].is_string());
    agent.wait_for("final delete", 15, || {
        srv.get("", "pods", "default", "g").is_none().then_some(())
    });
    let del = srv
        .requests()
        .into_iter()
        .find(|r| r.user == "system:node:n3" && r.method == "DELETE" && r.attrs.name == "g")
        .expect("the agent deleted the pod");
    assert_eq!(del.status, 200);
    let body: Value = serde_json::from_str(&del.body).expect("DeleteOptions body");
    assert_eq!(body["gracePeriodSeconds"], 0, "{body}");
    assert_eq!(body["preconditions"]["uid"], Value::from(uid), "{body}");
}
