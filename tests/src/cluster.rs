//! A cluster-mode agent (node `node1`) in a fresh test namespace, talking to the apiserver
//! fixture that runs in the same namespace. Effectful.

use crate::agent::AgentEnv;
use crate::apiserver::ApiServer;
use serde_json::Value;
use std::path::PathBuf;

/// The fixture started inside `env`'s namespace, and a kubeconfig for node1 next to the
/// agent's dirs (what `--kubeconfig` takes).
pub fn start_fixture(env: &AgentEnv) -> (ApiServer, PathBuf) {
    let srv = env
        .ns
        .run(ApiServer::start)
        .expect("netns")
        .expect("fixture");
    let kc = env.root.parent().expect("tmp").join("kubeconfig");
    srv.write_kubeconfig(&kc, &srv.node_token("node1"))
        .expect("kubeconfig");
    (srv, kc)
}

/// The agent (not started) and the fixture; the agent's kubeconfig holds node1's token, its
/// kubelet API is off, and it renews its Lease and node status every second.
pub fn cluster_env(tag: &str) -> (AgentEnv, ApiServer) {
    let mut env = AgentEnv::new(tag);
    let (srv, kc) = start_fixture(&env);
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
    (env, srv)
}

/// The status of condition `t` of an object (`Null` when absent).
pub fn condition(obj: &Value, t: &str) -> Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .map(|c| c["status"].clone())
        .unwrap_or(Value::Null)
}

/// Host pid of the pod's first container, from the containerID in the apiserver's status
/// (the shim's `state.json` under the agent's run dir).
pub fn container_pid(env: &AgentEnv, pod: &Value) -> i64 {
    let cid = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("hako://"))
        .expect("containerID");
    let state: Value = serde_json::from_slice(
        &std::fs::read(env.run.join("containers").join(cid).join("state.json")).expect("state"),
    )
    .expect("state json");
    state["pid"].as_i64().expect("pid")
}
