//! Root tests of upstream v1.28 `[NodeConformance]` specs against a cluster-mode agent and
//! the apiserver fixture, with the specs' pod specs and expected outputs:
//!
//! - `test/e2e/common/node/ephemeral_containers.go`: "will start an ephemeral container in an
//!   existing pod" and "should update the ephemeral containers in an existing pod" (the
//!   `ephemeralcontainers` subresource: strategic-merge PATCH, GET, PUT; the debugger's output
//!   read through the kubelet API's `/containerLogs` (what `pods/log` proxies to) and `/exec`
//!   over WebSocket), plus what the API allows on that subresource (additions only, unique
//!   names, no ports/probes, RBAC and the Node authorizer), a target container's pid
//!   namespace, and an exited ephemeral container that is never restarted;
//! - `test/e2e/common/node/sysctl.go`: "should support sysctls" (`kernel.shm_rmid_forced = 1`),
//!   "…with slashes as separator", "should reject invalid sysctls" (the apiserver's
//!   validation, in the fixture), "should not launch unsafe, but not explicitly enabled
//!   sysctls on the node" (reason `SysctlForbidden`, status and event), plus
//!   `--allowed-unsafe-sysctls` and a hostNetwork pod's net sysctl.
//!
//! - standalone: an ephemeral container added to a manifest, an unsafe sysctl refused by the
//!   pod worker.
//!
//! Runs the real `hako-agent`, `hako-shim` (build them first), `curl` and the local registry.
#![cfg(feature = "root")]

mod tls_support;

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::{ApiServer, User};
use hako_tests::cluster::{condition as cond, start_fixture, wait_for};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const KUBELET_PORT: u16 = 10250;

/// A cluster-mode agent with its kubelet API on 127.0.0.1:10250 inside the test namespace,
/// started with `extra` flags, once node1 is Ready.
fn start(tag: &str, extra: &[&str]) -> (AgentEnv, ApiServer) {
    let mut env = AgentEnv::new(tag);
    let (srv, kc) = start_fixture(&env);
    env.args.extend(
        [
            "--kubeconfig",
            kc.to_str().expect("path"),
            "--kubelet-address",
            "127.0.0.1",
            "--kubelet-port",
            "10250",
            "--node-lease-renew-interval",
            "1",
            "--node-status-update-frequency",
            "1",
        ]
        .map(String::from),
    );
    env.args.extend(extra.iter().map(|s| s.to_string()));
    env.start();
    wait_for("node Ready", 30, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True")
    });
    (env, srv)
}

/// `curl` inside the test namespace: (HTTP code, body).
fn curl(env: &AgentEnv, args: Vec<String>) -> (u16, String) {
    let out = env
        .ns
        .run(move || {
            Command::new("curl")
                .args(["-sk", "-o", "-", "-w", "\n%{http_code}"])
                .args(&args)
                .output()
        })
        .expect("netns")
        .expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A request to the apiserver fixture as the holder of `token`.
fn api(
    env: &AgentEnv,
    srv: &ApiServer,
    token: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut args = vec![
        "-X".to_string(),
        method.to_string(),
        "-H".to_string(),
        format!("Authorization: Bearer {token}"),
    ];
    if let Some(b) = body {
        args.extend([
            "-H".to_string(),
            format!("Content-Type: {content_type}"),
            "--data-binary".to_string(),
            b.to_string(),
        ]);
    }
    args.push(format!("{}{path}", srv.url()));
    let (code, body) = curl(env, args);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// `GET /containerLogs/{ns}/{pod}/{container}` on the kubelet API (the target of `pods/log`).
fn kubelet_logs(env: &AgentEnv, srv: &ApiServer, pod: &str, c: &str) -> String {
    let (code, body) = curl(
        env,
        vec![
            "-H".into(),
            format!("Authorization: Bearer {}", srv.admin_token()),
            format!("https://127.0.0.1:{KUBELET_PORT}/containerLogs/default/{pod}/{c}"),
        ],
    );
    if code == 200 {
        body
    } else {
        String::new()
    }
}

/// `/exec/{ns}/{pod}/{container}?command=...` over WebSocket (`v4.channel.k8s.io`): stdout.
fn kubelet_exec(env: &AgentEnv, srv: &ApiServer, pod: &str, c: &str, cmd: &[&str]) -> String {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let ca = std::fs::read(env.root.join("pki/kubelet.crt")).expect("serving cert");
    let q: Vec<String> = cmd
        .iter()
        .map(|a| format!("command={}", a.replace(' ', "%20")))
        .collect();
    let path = format!("/exec/default/{pod}/{c}?{}&stdout=1&stderr=1", q.join("&"));
    let token = srv.admin_token();
    env.ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let tls = tls_support::connect(&tls_support::connector(&ca), KUBELET_PORT)
                    .await
                    .expect("tls");
                let mut req = format!("wss://127.0.0.1:{KUBELET_PORT}{path}")
                    .into_client_request()
                    .expect("request");
                let h = req.headers_mut();
                h.insert(
                    "sec-websocket-protocol",
                    "v4.channel.k8s.io".parse().expect("hv"),
                );
                h.insert(
                    "authorization",
                    format!("Bearer {token}").parse().expect("hv"),
                );
                let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
                    .await
                    .expect("exec upgrade");
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(20), async {
                    while let Some(Ok(m)) = ws.next().await {
                        if let Message::Binary(b) = m {
                            if let Some((1, rest)) = b.split_first() {
                                out.extend_from_slice(rest);
                            }
                        }
                    }
                })
                .await;
                String::from_utf8_lossy(&out).into_owned()
            })
        })
        .expect("netns")
}

fn pod_path(name: &str, sub: &str) -> String {
    let sub = if sub.is_empty() {
        String::new()
    } else {
        format!("/{sub}")
    };
    format!("/api/v1/namespaces/default/pods/{name}{sub}")
}

fn ephemeral_state(srv: &ApiServer, pod: &str, c: &str) -> Option<Value> {
    let p = srv.get("", "pods", "default", pod)?;
    p["status"]["ephemeralContainerStatuses"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == c)
        .map(|s| s["state"].clone())
}

/// ephemeral_containers.go, both specs, and the subresource's rules.
#[test]
fn ephemeral_containers() {
    let (env, srv) = start("confeph", &[]);
    let admin = srv.admin_token();
    let busybox = env.image("sleep");
    let name = "ephemeral-containers-target-pod";
    let created = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "test-container-1", "image": busybox,
                    "command": ["/bin/sleep"], "args": ["10000"]}]}}))
        .expect("pod");
    assert_eq!(created["metadata"]["generation"], 1);
    wait_for("target pod Running", 60, &env, || {
        srv.get("", "pods", "default", name)
            .filter(|p| p["status"]["phase"] == "Running")
    });

    // A pod update cannot add one; the node cannot use the subresource.
    let mut via_update = srv.get("", "pods", "default", name).expect("pod");
    via_update["spec"]["ephemeralContainers"] = json!([{"name": "x", "image": busybox}]);
    let (code, st) = api(
        &env,
        &srv,
        &admin,
        "PUT",
        &pod_path(name, ""),
        "application/json",
        Some(&via_update),
    );
    assert_eq!(code, 422, "{st}");
    let debugger = json!({"name": "debugger", "image": busybox,
        "command": ["/bin/sh", "-c", "while true; do echo polo; sleep 2; done"],
        "stdin": true, "tty": true});
    let patch = json!({"spec": {"ephemeralContainers": [debugger]}});
    let smp = "application/strategic-merge-patch+json";
    let node_token = srv.node_token("node1");
    let (code, st) = api(
        &env,
        &srv,
        &node_token,
        "PATCH",
        &pod_path(name, "ephemeralcontainers"),
        smp,
        Some(&patch),
    );
    assert_eq!(code, 403, "{st}");
    // RBAC: a user needs pods/ephemeralcontainers.
    srv.add_token("alice-token", User::plain("alice"));
    let (code, _) = api(
        &env,
        &srv,
        "alice-token",
        "PATCH",
        &pod_path(name, "ephemeralcontainers"),
        smp,
        Some(&patch),
    );
    assert_eq!(code, 403);
    srv.grant("alice", "patch", "pods", "ephemeralcontainers");

    // "will start an ephemeral container in an existing pod"
    let (code, st) = api(
        &env,
        &srv,
        "alice-token",
        "PATCH",
        &pod_path(name, "ephemeralcontainers"),
        smp,
        Some(&patch),
    );
    assert_eq!(code, 200, "{st}");
    wait_for("debugger running", 60, &env, || {
        ephemeral_state(&srv, name, "debugger").filter(|s| s["running"].is_object())
    });
    let pod = srv.get("", "pods", "default", name).expect("pod");
    assert_eq!(pod["metadata"]["generation"], 2);
    assert_eq!(pod["status"]["phase"], "Running");
    let out = kubelet_exec(&env, &srv, name, "debugger", &["/bin/echo", "marco"]);
    assert!(out.contains("marco"), "exec output {out:?}");
    let log = wait_for("polo in the debugger's log", 30, &env, || {
        Some(kubelet_logs(&env, &srv, name, "debugger")).filter(|l| l.contains("polo"))
    });
    assert!(log.contains("polo"));
    // It shares the pod's network namespace: same interfaces as the target container.
    let links = |c: &str| {
        let dev = kubelet_exec(&env, &srv, name, c, &["cat", "/proc/net/dev"]);
        let mut names: Vec<String> = dev
            .lines()
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
            .collect();
        names.sort();
        names
    };
    let (a, b) = (links("test-container-1"), links("debugger"));
    assert!(a.contains(&"eth0".to_string()) && a == b, "{a:?} vs {b:?}");

    // "should update the ephemeral containers in an existing pod"
    let (code, got) = api(
        &env,
        &srv,
        &admin,
        "GET",
        &pod_path(name, "ephemeralcontainers"),
        "",
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(
        got["spec"]["ephemeralContainers"].as_array().map(Vec::len),
        Some(1)
    );
    let mut to_update = srv.get("", "pods", "default", name).expect("pod");
    let list = to_update["spec"]["ephemeralContainers"]
        .as_array_mut()
        .expect("list");
    list.push(json!({"name": "debugger2", "image": busybox,
        "imagePullPolicy": "IfNotPresent", "terminationMessagePolicy": "File",
        "command": ["sh", "-c", "echo bye"]}));
    let (code, st) = api(
        &env,
        &srv,
        &admin,
        "PUT",
        &pod_path(name, "ephemeralcontainers"),
        "application/json",
        Some(&to_update),
    );
    assert_eq!(code, 200, "{st}");
    let (_, got) = api(
        &env,
        &srv,
        &admin,
        "GET",
        &pod_path(name, "ephemeralcontainers"),
        "",
        None,
    );
    assert_eq!(
        got["spec"]["ephemeralContainers"].as_array().map(Vec::len),
        Some(2)
    );

    // debugger2 exits and is never restarted (restartPolicy Always is not for it).
    let done = wait_for("debugger2 terminated", 60, &env, || {
        ephemeral_state(&srv, name, "debugger2").filter(|s| s["terminated"].is_object())
    });
    assert_eq!(done["terminated"]["exitCode"], 0);
    std::thread::sleep(Duration::from_secs(3));
    let later = ephemeral_state(&srv, name, "debugger2").expect("status");
    assert_eq!(later, done, "an ephemeral container is not restarted");
    let statuses = srv.get("", "pods", "default", name).expect("pod")["status"]
        ["ephemeralContainerStatuses"]
        .clone();
    assert!(
        statuses
            .as_array()
            .is_some_and(|l| l.iter().all(|s| s["restartCount"] == 0)),
        "{statuses}"
    );

    // With targetContainerName it sees the target's processes (its pid namespace).
    let mut p = srv.get("", "pods", "default", name).expect("pod");
    p["spec"]["ephemeralContainers"]
        .as_array_mut()
        .expect("list")
        .push(json!({"name": "debugger3", "image": busybox,
            "targetContainerName": "test-container-1",
            "command": ["sh", "-c", "cat /proc/1/cmdline; echo; sleep 3600"]}));
    let (code, st) = api(
        &env,
        &srv,
        &admin,
        "PUT",
        &pod_path(name, "ephemeralcontainers"),
        "application/json",
        Some(&p),
    );
    assert_eq!(code, 200, "{st}");
    let log = wait_for("debugger3 output", 60, &env, || {
        Some(kubelet_logs(&env, &srv, name, "debugger3")).filter(|l| !l.is_empty())
    });
    assert!(log.contains("sleep"), "pid 1 seen by debugger3: {log:?}");

    // Additions only; names unique across all containers; no ports or probes.
    let current = srv.get("", "pods", "default", name).expect("pod");
    let with = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut p = current.clone();
        f(p["spec"]["ephemeralContainers"]
            .as_array_mut()
            .expect("list"));
        api(
            &env,
            &srv,
            &admin,
            "PUT",
            &pod_path(name, "ephemeralcontainers"),
            "application/json",
            Some(&p),
        )
    };
    let cases: [(&str, &Edit); 4] = [
        ("may not be removed", &|l| {
            l.remove(0);
        }),
        ("may not be changed", &|l| l[0]["image"] = json!("other:1")),
        ("Duplicate value: \"test-container-1\"", &|l| {
            l.push(json!({"name": "test-container-1", "image": "b:1"}))
        }),
        (
            "ports: Forbidden: cannot be set for an Ephemeral Container",
            &|l| l.push(json!({"name": "d4", "image": "b:1", "ports": [{"containerPort": 80}]})),
        ),
    ];
    for (want, f) in cases {
        let (code, st) = with(f);
        assert_eq!(code, 422, "{want}: {st}");
        assert!(
            st["message"].as_str().is_some_and(|m| m.contains(want)),
            "{want}: {st}"
        );
    }
}

/// A change to a pod's list of ephemeral containers.
type Edit = dyn Fn(&mut Vec<Value>);

fn sysctl_pod(name: &str, image: &str, sysctls: Value, extra: Value) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "node1", "restartPolicy": "Never",
            "securityContext": {"sysctls": sysctls},
            "containers": [{"name": "test-container", "image": image,
                "command": ["/bin/busybox", "sysctl", "kernel.shm_rmid_forced"]}]}});
    if let (Some(dst), Value::Object(src)) = (p["spec"].as_object_mut(), extra) {
        for (k, v) in src {
            dst.insert(k, v);
        }
    }
    p
}

fn phase(srv: &ApiServer, name: &str) -> Option<String> {
    srv.get("", "pods", "default", name)
        .and_then(|p| p["status"]["phase"].as_str().map(str::to_string))
        .filter(|p| p == "Succeeded" || p == "Failed")
}

/// sysctl.go: safe sysctls applied in the pod's namespaces (both separators), unsafe ones
/// refused with SysctlForbidden unless `--allowed-unsafe-sysctls` allows them, net sysctls
/// refused for hostNetwork pods.
#[test]
fn sysctls() {
    let (env, srv) = start("confsys", &[]);
    let img = env.image("sleep");
    let host_range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("host value");
    let host_rmid = std::fs::read_to_string("/proc/sys/kernel/shm_rmid_forced").expect("host");
    // "should support sysctls" and "... with slashes as separator"
    for (name, key) in [
        ("sysctl-dots", "kernel.shm_rmid_forced"),
        ("sysctl-slashes", "kernel/shm_rmid_forced"),
    ] {
        srv.create(sysctl_pod(
            name,
            &img,
            json!([{"name": key, "value": "1"}]),
            json!({}),
        ))
        .expect("pod");
    }
    // A safe net sysctl, read back in the pod.
    let mut net = sysctl_pod(
        "sysctl-net",
        &img,
        json!([{"name": "net.ipv4.ip_local_port_range", "value": "1024 65000"}]),
        json!({}),
    );
    net["spec"]["containers"][0]["command"] =
        json!(["/bin/busybox", "sysctl", "net.ipv4.ip_local_port_range"]);
    srv.create(net).expect("pod");
    // Unsafe (the spec's kernel.msgmax); a net sysctl on the host's network namespace.
    srv.create(sysctl_pod(
        "sysctl-unsafe",
        &img,
        json!([{"name": "kernel.shm_rmid_forced", "value": "0"},
               {"name": "kernel.msgmax", "value": "10000000000"}]),
        json!({}),
    ))
    .expect("pod");
    srv.create(sysctl_pod(
        "sysctl-hostnet",
        &img,
        json!([{"name": "net.ipv4.ip_local_port_range", "value": "1024 65000"}]),
        json!({"hostNetwork": true}),
    ))
    .expect("pod");

    // "should reject invalid sysctls": the apiserver refuses the invalid names only.
    let (code, st) = api(
        &env,
        &srv,
        &srv.admin_token(),
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        Some(&sysctl_pod(
            "sysctl-invalid",
            &img,
            json!([{"name": "foo-", "value": "bar"},
                   {"name": "kernel.shmmax", "value": "100000000"},
                   {"name": "safe-and-unsafe", "value": "100000000"},
                   {"name": "bar..", "value": "42"}]),
            json!({}),
        )),
    );
    assert_eq!(code, 422, "{st}");
    let msg = st["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("Invalid value: \"foo-\"") && msg.contains("Invalid value: \"bar..\""),
        "{msg}"
    );
    assert!(
        !msg.contains("safe-and-unsafe") && !msg.contains("kernel.shmmax"),
        "{msg}"
    );
    // A hostNetwork pod still has its own IPC namespace: its IPC sysctls are allowed.
    srv.create(sysctl_pod(
        "sysctl-hostnet-ipc",
        &img,
        json!([{"name": "kernel.shm_rmid_forced", "value": "1"}]),
        json!({"hostNetwork": true}),
    ))
    .expect("pod");

    for name in ["sysctl-dots", "sysctl-slashes", "sysctl-hostnet-ipc"] {
        let ph = wait_for("sysctl pod done", 60, &env, || phase(&srv, name));
        assert_eq!(ph, "Succeeded", "{name}");
        let log = kubelet_logs(&env, &srv, name, "test-container");
        assert!(
            log.contains("kernel.shm_rmid_forced = 1"),
            "{name}: {log:?}"
        );
    }
    let ph = wait_for("sysctl-net done", 60, &env, || phase(&srv, "sysctl-net"));
    assert_eq!(ph, "Succeeded");
    let log = kubelet_logs(&env, &srv, "sysctl-net", "test-container");
    let norm: String = log.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        norm.contains("net.ipv4.ip_local_port_range = 1024 65000"),
        "{log:?}"
    );
    // Nothing reached the host's namespaces.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("host"),
        host_range
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/shm_rmid_forced").expect("host"),
        host_rmid
    );

    // "should not launch unsafe, but not explicitly enabled sysctls on the node"
    for (name, msg) in [
        (
            "sysctl-unsafe",
            "Pod was rejected: forbidden sysctl: \"kernel.msgmax\" not allowlisted",
        ),
        (
            "sysctl-hostnet",
            "Pod was rejected: forbidden sysctl: \"net.ipv4.ip_local_port_range\" not allowed with host net enabled",
        ),
    ] {
        let ph = wait_for("rejection", 30, &env, || phase(&srv, name));
        assert_eq!(ph, "Failed", "{name}");
        let st = srv.get("", "pods", "default", name).expect("pod")["status"].clone();
        assert_eq!(st["reason"], "SysctlForbidden", "{st}");
        assert_eq!(st["message"], msg, "{st}");
        assert!(st["containerStatuses"].is_null(), "nothing ran: {st}");
        let ev = wait_for("SysctlForbidden event", 20, &env, || {
            srv.list("", "events")
                .into_iter()
                .find(|e| e["involvedObject"]["name"] == name && e["reason"] == "SysctlForbidden")
        });
        assert_eq!(ev["type"], "Warning");
    }
}

/// `--allowed-unsafe-sysctls` (globs, as the kubelet): kernel.msg* is allowed and applied in
/// the pod's IPC namespace, another unsafe sysctl is still refused.
#[test]
fn sysctls_allowed_unsafe() {
    let (env, srv) = start("confsysu", &["--allowed-unsafe-sysctls", "kernel.msg*"]);
    let img = env.image("sleep");
    let host_msgmax = std::fs::read_to_string("/proc/sys/kernel/msgmax").expect("host");
    let mut p = sysctl_pod(
        "sysctl-msg",
        &img,
        json!([{"name": "kernel.msgmax", "value": "12345"}]),
        json!({}),
    );
    p["spec"]["containers"][0]["command"] = json!(["/bin/busybox", "sysctl", "kernel.msgmax"]);
    srv.create(p).expect("pod");
    srv.create(sysctl_pod(
        "sysctl-other",
        &img,
        json!([{"name": "net.core.somaxconn", "value": "1024"}]),
        json!({}),
    ))
    .expect("pod");
    let ph = wait_for("sysctl-msg done", 60, &env, || phase(&srv, "sysctl-msg"));
    assert_eq!(ph, "Succeeded");
    let log = kubelet_logs(&env, &srv, "sysctl-msg", "test-container");
    assert!(log.contains("kernel.msgmax = 12345"), "{log:?}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/msgmax").expect("host"),
        host_msgmax
    );
    let ph = wait_for("rejection", 30, &env, || phase(&srv, "sysctl-other"));
    assert_eq!(ph, "Failed");
    let st = srv.get("", "pods", "default", "sysctl-other").expect("pod")["status"].clone();
    assert_eq!(st["reason"], "SysctlForbidden", "{st}");
}

/// Standalone (`--pod-manifest-path`): an ephemeral container added to a manifest joins the
/// running pod (same UID, the app container not restarted) and its output is in its CRI log;
/// a manifest pod with an unsafe sysctl is refused by the worker with SysctlForbidden.
#[test]
fn standalone_manifest_ephemeral_and_sysctl() {
    let mut env = AgentEnv::new("confsa");
    env.start();
    let img = env.image("sleep");
    let base = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: dbg\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {img}\n    command: [sleep, '10000']\n"
    );
    env.write_manifest("dbg.yaml", &base);
    let first = env.wait_running("dbg", Duration::from_secs(60));
    let uid = first["pod"]["metadata"]["uid"].clone();
    let app_id = first["pod"]["status"]["containerStatuses"][0]["containerID"].clone();
    env.write_manifest(
        "dbg.yaml",
        &format!(
            "{base}  ephemeralContainers:\n  - name: debugger\n    image: {img}\n    command: [sh, -c, 'echo polo; sleep 3600']\n"
        ),
    );
    let rec = env.wait_for("debugger running", Duration::from_secs(60), |e| {
        let r = e.record("dbg")?;
        let running = r["pod"]["status"]["ephemeralContainerStatuses"]
            .as_array()?
            .iter()
            .any(|s| s["name"] == "debugger" && s["state"]["running"].is_object());
        running.then_some(r)
    });
    assert_eq!(rec["pod"]["metadata"]["uid"], uid, "the same pod");
    assert_eq!(
        rec["pod"]["status"]["containerStatuses"][0]["containerID"], app_id,
        "app not restarted"
    );
    let dir = env.logs.join(format!(
        "default_dbg-node1_{}/debugger/0.log",
        uid.as_str().unwrap_or("")
    ));
    let log = env.wait_for("debugger log", Duration::from_secs(20), |_| {
        std::fs::read_to_string(&dir)
            .ok()
            .filter(|l| l.contains("polo"))
    });
    assert!(log.contains("stdout F polo"), "{log:?}");
    // The node's CLI reaches the ephemeral container by name, as kubectl does.
    let out = env.cli(&["logs", "dbg-node1", "-c", "debugger"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "polo\n", "{out:?}");
    let out = env.cli(&["exec", "dbg-node1", "-c", "debugger", "--", "echo", "marco"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "marco\n", "{out:?}");

    env.write_manifest(
        "unsafe.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: unsafe\nspec:\n  securityContext:\n    sysctls:\n    - {{name: kernel.msgmax, value: '10000000000'}}\n  containers:\n  - name: c\n    image: {img}\n    command: [sleep, '10000']\n"
        ),
    );
    let st = env.wait_for("unsafe pod refused", Duration::from_secs(30), |e| {
        let r = e.record("unsafe")?;
        (r["pod"]["status"]["phase"] == "Failed").then(|| r["pod"]["status"].clone())
    });
    assert_eq!(st["reason"], "SysctlForbidden", "{st}");
    assert!(st["containerStatuses"].is_null(), "{st}");
    assert!(env
        .events("unsafe")
        .iter()
        .any(|(r, m)| r == "SysctlForbidden" && m.contains("\"kernel.msgmax\" not allowlisted")));
    env.stop();
}
