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

/// Polls `f` (every 100 ms) until it returns Some; panics after `secs` with the agent's log.
pub fn wait_for<T>(what: &str, secs: u64, env: &AgentEnv, f: impl FnMut() -> Option<T>) -> T {
    crate::poll_until(
        what,
        std::time::Duration::from_secs(secs),
        std::time::Duration::from_millis(100),
        || format!("agent log:\n{}", env.agent_log()),
        f,
    )
}

/// A cluster-mode `hako-agent` that needs no root: started outside any namespace, with its
/// kubelet API off and every directory in its own temporary dir (removed with it). For tests
/// of registration, Lease, admission and the pod watch, where no pod is started.
pub struct PlainAgent {
    child: std::process::Child,
    tmp: tempfile::TempDir,
    /// The (initially empty) `--cni-conf-dir`.
    pub cni_dir: PathBuf,
}

impl Drop for PlainAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PlainAgent {
    /// Starts the agent as node `node` of `srv` (InternalIP 192.0.2.10) with `extra` flags.
    pub fn start(srv: &ApiServer, node: &str, extra: &[&str]) -> PlainAgent {
        let tmp = tempfile::tempdir().expect("tmp");
        let kc = tmp.path().join("kubeconfig");
        srv.write_kubeconfig(&kc, &srv.node_token(node))
            .expect("kubeconfig");
        let cni_dir = tmp.path().join("net.d");
        std::fs::create_dir_all(&cni_dir).expect("cni dir");
        let logf = std::fs::File::create(tmp.path().join("agent.log")).expect("log");
        let child =
            std::process::Command::new(crate::agent::target_bin("hako-agent", "HAKO_AGENT_BIN"))
                .arg("--kubeconfig")
                .arg(&kc)
                .args(["--hostname-override", node, "--node-ip", "192.0.2.10"])
                .args(["--kubelet-port", "0"])
                .arg("--root-dir")
                .arg(tmp.path().join("root"))
                .arg("--run-dir")
                .arg(tmp.path().join("run"))
                .arg("--pod-log-dir")
                .arg(tmp.path().join("logs"))
                .arg("--cni-conf-dir")
                .arg(&cni_dir)
                .args(extra)
                .args(if extra.contains(&"--eviction-hard") {
                    &[][..]
                } else {
                    &["--eviction-hard", crate::agent::TEST_EVICTION_HARD][..]
                })
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(logf)
                .spawn()
                .expect("spawn hako-agent");
        PlainAgent {
            child,
            tmp,
            cni_dir,
        }
    }

    /// The agent's exit status, if it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    /// Polls `f` (every 100 ms) until it returns Some; panics after `secs` with the log.
    pub fn wait_for<T>(&self, what: &str, secs: u64, f: impl FnMut() -> Option<T>) -> T {
        crate::poll_until(
            what,
            std::time::Duration::from_secs(secs),
            std::time::Duration::from_millis(100),
            || format!("agent log:\n{}", self.log()),
            f,
        )
    }
}
