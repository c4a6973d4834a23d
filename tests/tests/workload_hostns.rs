//! Host namespaces (issue 17): a hostNetwork pod's resolv.conf under
//! `dnsPolicy: ClusterFirstWithHostNet`; a hostPID pod sees a host process; a
//! `shareProcessNamespace` pod's containers see and signal each other's processes (the first
//! container started is PID 1, and its exit takes the others with it); a hostIPC pod sees a SysV shared memory segment the test made
//! on the host (a pod without hostIPC does not); a pod whose hostPort is taken by an admitted
//! pod is refused with the kubelet's `NodePorts` reason. Standalone agents in fresh network
//! namespaces, and a cluster-mode agent against the apiserver fixture for admission.
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::ApiServer;
use hako_tests::cluster::PlainAgent;
use serde_json::{json, Value};
use std::process::{Child, Command};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Output of `hako-agent exec POD [-c C] -- sh -c CMD` (stdout; panics on a failed exec).
fn sh(env: &AgentEnv, pod: &str, c: &str, cmd: &str) -> String {
    let out = env.cli(&["exec", pod, "-c", c, "--", "sh", "-c", cmd]);
    assert!(out.status.success(), "exec {pod}/{c} {cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A host process the test owns, killed on drop.
struct HostProcess(Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A SysV shared memory segment in the test's (the host's) IPC namespace, removed on drop.
struct HostShm(String);

impl HostShm {
    fn new() -> Self {
        let out = Command::new("ipcmk")
            .args(["-M", "4096"])
            .output()
            .expect("ipcmk");
        assert!(out.status.success(), "{out:?}");
        // "Shared memory id: N"
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let id = text
            .rsplit(':')
            .next()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
            .unwrap_or_else(|| panic!("no shm id in {text:?}"));
        HostShm(id)
    }
}

impl Drop for HostShm {
    fn drop(&mut self) {
        let _ = Command::new("ipcrm").args(["-m", &self.0]).status();
    }
}

/// True when a `/proc/sysvipc/shm` listing holds the segment `id` (second column).
fn lists_shm(listing: &str, id: &str) -> bool {
    listing
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(id))
}

#[test]
fn host_network_pod_with_cluster_first_with_host_net_gets_cluster_dns() {
    let mut env = AgentEnv::new("hnsdns");
    let img = env.image("sleep");
    for (name, policy) in [
        ("withhost", "ClusterFirstWithHostNet"),
        ("plainhost", "ClusterFirst"),
    ] {
        env.write_manifest(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n  hostNetwork: true\n  dnsPolicy: {policy}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
        );
    }
    env.start();
    env.wait_running("withhost", T);
    env.wait_running("plainhost", T);
    let r = sh(&env, "apps/withhost-node1", "c", "cat /etc/resolv.conf");
    assert!(r.lines().any(|l| l == "nameserver 10.96.0.10"), "{r}");
    assert!(
        r.lines().any(|l| l
            .starts_with("search apps.svc.cluster.local svc.cluster.local cluster.local")),
        "{r}"
    );
    assert!(r.lines().any(|l| l == "options ndots:5"), "{r}");
    // Plain ClusterFirst on the host network falls back to the node's resolver (Default).
    let r = sh(&env, "apps/plainhost-node1", "c", "cat /etc/resolv.conf");
    assert!(!r.contains("10.96.0.10"), "{r}");
    assert!(!r.contains("svc.cluster.local"), "{r}");
}

#[test]
fn host_pid_pod_sees_a_host_process() {
    let mut env = AgentEnv::new("hnspid");
    let img = env.image("sleep");
    // A distinctive argument, so the process is recognisable from inside.
    let secs = 100_000 + u32::from(rand::random::<u16>());
    let host = HostProcess(
        Command::new("sleep")
            .arg(secs.to_string())
            .spawn()
            .expect("sleep"),
    );
    let pid = host.0.id();
    for (name, host_pid) in [("hostpid", true), ("ownpid", false)] {
        env.write_manifest(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  hostPID: {host_pid}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
        );
    }
    env.start();
    env.wait_running("hostpid", T);
    env.wait_running("ownpid", T);
    let cmd = format!("tr '\\0' ' ' < /proc/{pid}/cmdline; echo");
    let seen = sh(&env, "hostpid-node1", "c", &cmd);
    assert_eq!(seen.trim(), format!("sleep {secs}"), "{seen}");
    // The node's PID 1 is visible too (it is not the container's process).
    let init = sh(
        &env,
        "hostpid-node1",
        "c",
        "tr '\\0' ' ' < /proc/1/cmdline; echo",
    );
    assert!(!init.contains("sleep"), "{init}");
    // A pod without hostPID does not see it.
    let out = env.cli(&[
        "exec",
        "ownpid-node1",
        "--",
        "sh",
        "-c",
        &format!("test -e /proc/{pid}/cmdline && tr '\\0' ' ' < /proc/{pid}/cmdline"),
    ]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&format!("sleep {secs}")),
        "{out:?}"
    );
}

#[test]
fn shared_process_namespace_containers_see_and_signal_each_other() {
    let mut env = AgentEnv::new("hnsshare");
    let img = env.image("sleep");
    env.args = vec!["--restart-backoff-base".into(), "1".into()];
    env.write_manifest(
        "share.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: share}}
spec:
  shareProcessNamespace: true
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: first, image: "{img}", command: [sleep, "3600"]}}
  - {{name: victim, image: "{img}", command: [sleep, "3601"]}}
"#
        ),
    );
    env.start();
    env.wait_running("share", T);
    env.wait_for("both containers running", T, |e| {
        let s = e.container_status("share", "victim")?;
        s["state"]["running"].is_object().then_some(())
    });
    // PID 1 of the pod's namespace is the first container started.
    let init = sh(
        &env,
        "share-node1",
        "victim",
        "tr '\\0' ' ' < /proc/1/cmdline; echo",
    );
    assert_eq!(init.trim(), "sleep 3600", "{init}");
    // The first container finds the other's process...
    let find = "for d in /proc/[0-9]*; do \
                [ \"$(tr '\\0' ' ' < $d/cmdline 2>/dev/null)\" = 'sleep 3601 ' ] && echo ${d#/proc/}; \
                done; true";
    let pid = sh(&env, "share-node1", "first", find);
    let pid = pid.trim();
    assert!(
        !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()),
        "victim not visible from the first container: {pid:?}"
    );
    // ...and kills it: the victim container terminates and is restarted.
    sh(&env, "share-node1", "first", &format!("kill -9 {pid}"));
    env.wait_for("victim restarted", T, |e| {
        let s = e.container_status("share", "victim")?;
        (s["restartCount"].as_u64()? >= 1).then_some(())
    });
    let s = env.container_status("share", "victim").expect("status");
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 137, "{s}");
    // The first container kept running.
    let f = env.container_status("share", "first").expect("status");
    assert_eq!(f["restartCount"], 0, "{f}");
    // PID 1 exiting (killed from the host, an ancestor namespace) takes the other container
    // with it; both restart and share a new namespace again.
    let first = env.container_pid("share", "first").expect("first pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill PID 1");
    env.wait_for("both restarted and running", T, |e| {
        let f = e.container_status("share", "first")?;
        let v = e.container_status("share", "victim")?;
        (f["restartCount"].as_u64()? >= 1
            && v["restartCount"].as_u64()? >= 2
            && f["state"]["running"].is_object()
            && v["state"]["running"].is_object())
        .then_some(())
    });
    let s = env.container_status("share", "victim").expect("status");
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 137, "{s}");
    let ns = |c: &str| sh(&env, "share-node1", c, "readlink /proc/self/ns/pid");
    let (a, b) = (ns("first"), ns("victim"));
    assert!(a.starts_with("pid:["), "{a}");
    assert_eq!(a, b);
}

#[test]
fn host_ipc_pod_sees_the_hosts_shared_memory() {
    let shm = HostShm::new();
    let mut env = AgentEnv::new("hnsipc");
    let img = env.image("sleep");
    for (name, host_ipc) in [("hostipc", true), ("ownipc", false)] {
        env.write_manifest(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  hostIPC: {host_ipc}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
        );
    }
    env.start();
    env.wait_running("hostipc", T);
    env.wait_running("ownipc", T);
    let seen = sh(&env, "hostipc-node1", "c", "cat /proc/sysvipc/shm");
    assert!(lists_shm(&seen, &shm.0), "shm {} not in {seen}", shm.0);
    let own = sh(&env, "ownipc-node1", "c", "cat /proc/sysvipc/shm");
    assert!(
        !lists_shm(&own, &shm.0),
        "pod-private IPC shows {}: {own}",
        shm.0
    );
}

fn port_pod(name: &str, ports: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "hp1",
                 "containers": [{"name": "c", "image": "127.0.0.1:1/none:1", "ports": ports}]}})
}

fn failed(srv: &ApiServer, name: &str) -> Option<(String, String)> {
    let p = srv.get("", "pods", "default", name)?;
    (p["status"]["phase"] == "Failed").then(|| {
        (
            p["status"]["reason"].as_str().unwrap_or("").to_string(),
            p["status"]["message"].as_str().unwrap_or("").to_string(),
        )
    })
}

#[test]
fn host_port_conflict_is_refused_at_admission() {
    let srv = ApiServer::start().expect("fixture");
    let agent = PlainAgent::start(&srv, "hp1", &["--node-status-update-frequency", "1"]);
    agent.wait_for("node", 20, || {
        srv.get("", "nodes", "", "hp1")
            .filter(|n| n["status"]["allocatable"]["cpu"].is_string())
    });
    srv.create(port_pod(
        "a-first",
        json!([{"containerPort": 80, "hostPort": 18080}]),
    ))
    .expect("pod");
    // The first pod is admitted (the agent reports on it) before the others arrive.
    agent.wait_for("first pod handled", 30, || {
        srv.get("", "pods", "default", "a-first")
            .filter(|p| p["status"]["conditions"].is_array())
    });
    for (name, ports) in [
        (
            "b-conflict",
            json!([{"containerPort": 8080, "hostPort": 18080}]),
        ),
        (
            "c-other-port",
            json!([{"containerPort": 80, "hostPort": 18081}]),
        ),
        (
            "d-udp",
            json!([{"containerPort": 80, "hostPort": 18080, "protocol": "UDP"}]),
        ),
    ] {
        srv.create(port_pod(name, ports)).expect("pod");
    }
    let (reason, message) = agent.wait_for("rejection", 30, || failed(&srv, "b-conflict"));
    assert_eq!(reason, "NodePorts");
    assert_eq!(message, "Pod was rejected: Predicate NodePorts failed");
    // The others are handled (admitted) and not refused.
    for name in ["c-other-port", "d-udp"] {
        agent.wait_for("handled", 30, || {
            srv.get("", "pods", "default", name)
                .filter(|p| p["status"]["conditions"].is_array())
        });
        assert_eq!(failed(&srv, name), None, "{name}");
    }
    assert_eq!(failed(&srv, "a-first"), None);
    let events = agent.wait_for("event", 10, || {
        let ev = srv.list("", "events");
        ev.iter()
            .any(|e| e["reason"] == "NodePorts" && e["involvedObject"]["name"] == "b-conflict")
            .then_some(ev)
    });
    assert!(!events.is_empty());
}
