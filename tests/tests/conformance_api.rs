//! Node conformance of the kubelet API and the container environment (issue 21, items 6 and
//! 8 and the "also seen"), through the apiserver fixture with a cluster-mode agent, asserting
//! what the upstream v1.28 specs assert:
//! - a last partial CRI record is printed by `/containerLogs` (the projected-volume spec's
//!   `cat` of files without a newline; follow, tailLines and timestamps too) and by
//!   `hako-agent logs`;
//! - exec over WebSocket with `channel.k8s.io` (pods.go "should support remote command
//!   execution over websockets": every message is stdout or an empty message),
//!   `base64.channel.k8s.io` and `v4.base64.channel.k8s.io`, each with its framing and error
//!   channel;
//! - service-link variables (pods.go "should contain environment variables for services");
//! - `/pods` answers a JSON PodList.
//!
//! Root: each test makes its own namespace, registry, fixture and agent (removed on drop).
#![cfg(feature = "root")]

mod tls_support;

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::{ApiServer, User};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A cluster-mode agent with its kubelet API on 127.0.0.1:10250 of its namespace, the user
/// `alice` allowed nodes/proxy (get and create); not started.
fn node(tag: &str) -> (AgentEnv, ApiServer) {
    let mut env = AgentEnv::new(tag);
    let (srv, kc) = hako_tests::cluster::start_fixture(&env);
    env.args.extend(
        [
            "--kubeconfig",
            kc.to_str().expect("path"),
            "--kubelet-address",
            "127.0.0.1",
            "--kubelet-port",
            "10250",
        ]
        .map(String::from),
    );
    srv.add_token("alice-token", User::plain("alice"));
    srv.grant("alice", "get", "nodes", "proxy");
    srv.grant("alice", "create", "nodes", "proxy");
    (env, srv)
}

/// Reads the serving certificate once the agent has written it.
fn serving_cert(env: &AgentEnv) -> Vec<u8> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = std::fs::read(env.root.join("pki/kubelet.crt")) {
            return c;
        }
        assert!(Instant::now() < end, "no serving certificate");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_phase(env: &AgentEnv, srv: &ApiServer, ns: &str, name: &str, phase: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(p) = srv.get("", "pods", ns, name) {
            if p["status"]["phase"] == phase {
                return p;
            }
        }
        assert!(
            Instant::now() < end,
            "{ns}/{name} not {phase}: {:?}\nagent log:\n{}",
            srv.get("", "pods", ns, name).map(|p| p["status"].clone()),
            hako_tests::agent::tail(&env.agent_log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (HTTP code, Content-Type, body) of an authenticated GET from inside the namespace.
fn get(env: &AgentEnv, path: &str) -> (u16, String, String) {
    let url = format!("https://127.0.0.1:10250{path}");
    let out = env
        .ns
        .run(move || {
            std::process::Command::new("curl")
                .args(["-sk", "-o", "-", "-w", "\n%{http_code} %{content_type}"])
                .args(["-H", "Authorization: Bearer alice-token"])
                .arg(url)
                .output()
        })
        .expect("netns")
        .expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = s.rsplit_once('\n').unwrap_or(("", "0"));
    let (code, ctype) = tail.split_once(' ').unwrap_or((tail, ""));
    (
        code.trim().parse().unwrap_or(0),
        ctype.trim().to_string(),
        body.to_string(),
    )
}

/// Item 6: the projected-volume spec's container writes its last bytes without a newline;
/// the kubelet prints that partial record (it returned "" here).
#[test]
fn logs_print_a_last_partial_record() {
    let (mut env, srv) = node("cflog");
    env.start();
    let _ = serving_cert(&env);
    let p = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "projected-volume", "namespace": "default"},
            "spec": {"nodeName": "node1", "restartPolicy": "Never", "containers": [
                {"name": "projected-all-volume-test", "image": env.image("sleep"),
                 "command": ["sh", "-c", "echo projected-volume && printf secret-value-1 && printf configmap-value-1"]}]}}))
        .expect("pod");
    let uid = p["metadata"]["uid"].as_str().expect("uid").to_string();
    wait_phase(&env, &srv, "default", "projected-volume", "Succeeded");
    let path = "/containerLogs/default/projected-volume/projected-all-volume-test";
    let want = "projected-volume\nsecret-value-1configmap-value-1";
    let (code, _, body) = get(&env, path);
    assert_eq!((code, body.as_str()), (200, want));
    // follow of the exited container ends with the same text.
    assert_eq!(get(&env, &format!("{path}?follow=true")).2, want);
    assert_eq!(
        get(&env, &format!("{path}?tailLines=1")).2,
        "secret-value-1configmap-value-1"
    );
    let ts = get(&env, &format!("{path}?timestamps=true")).2;
    let lines: Vec<&str> = ts.split('\n').collect();
    assert_eq!(lines.len(), 2, "{ts:?}");
    for (l, text) in lines
        .iter()
        .zip(["projected-volume", "secret-value-1configmap-value-1"])
    {
        let (t, rest) = l.split_once(' ').expect("timestamp");
        assert!(t.len() == 30 && t.ends_with('Z'), "{l:?}");
        assert_eq!(rest, text);
    }
    // `hako-agent logs` prints it too.
    let out = env.cli(&["logs", "projected-volume"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        want,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A last record cut before its newline (a runtime stopped mid-write) is printed as the
    // kubelet prints an incomplete last line.
    let log = env.logs.join(format!(
        "default_projected-volume_{uid}/projected-all-volume-test/0.log"
    ));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("log file");
    std::io::Write::write_all(&mut f, b"2026-12-07T00:00:00.000000000Z stdout F !cut")
        .expect("append");
    assert_eq!(get(&env, path).2, format!("{want}!cut\n"));
}

/// The `/pods` endpoint: a JSON v1 PodList, as the kubelet serves it.
#[test]
fn pods_endpoint_answers_json() {
    let (mut env, srv) = node("cfpods");
    env.start();
    let _ = serving_cert(&env);
    srv.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "listed", "namespace": "default"},
        "spec": {"nodeName": "node1", "containers": [
            {"name": "c", "image": env.image("sleep"), "command": ["sleep", "600"]}]}}))
        .expect("pod");
    let end = Instant::now() + Duration::from_secs(30);
    let (code, ctype, body) = loop {
        let r = get(&env, "/pods");
        if r.2.contains("\"listed\"") || Instant::now() > end {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 200, "{body}");
    assert_eq!(ctype, "application/json");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (v["kind"].as_str(), v["apiVersion"].as_str()),
        (Some("PodList"), Some("v1"))
    );
    assert_eq!(v["items"][0]["metadata"]["name"], "listed");
}

/// Standard base64 decoding (the test crate has no base64 dependency).
fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s:?}"),
        }
    };
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

fn b64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in b.chunks(3) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(c) << (16 - 8 * i);
        }
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// One exec session: (negotiated protocol, every message as (channel, payload, was text)).
type Session = (String, Vec<(u8, Vec<u8>, bool)>);

/// Execs over WebSocket offering `protocol`; sends `stdin` (framed for the protocol) first.
async fn exec(
    ca: &[u8],
    query: &str,
    protocol: &str,
    stdin: Option<&[u8]>,
) -> Result<Session, u16> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{self, Message};
    let tls = tls_support::connect(&tls_support::connector(ca), 10250)
        .await
        .expect("tls");
    let mut req = format!("wss://127.0.0.1:10250/exec/default/ws/main?{query}")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().expect("hv"));
    req.headers_mut()
        .insert("authorization", "Bearer alice-token".parse().expect("hv"));
    let (mut ws, resp) = match tokio_tungstenite::client_async(req, tls).await {
        Ok(x) => x,
        Err(tungstenite::Error::Http(r)) => return Err(r.status().as_u16()),
        Err(e) => panic!("websocket: {e}"),
    };
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let base64 = proto.contains("base64");
    if let Some(d) = stdin {
        let m = if base64 {
            Message::Text(format!("0{}", b64_encode(d)))
        } else {
            Message::Binary([&[0u8][..], d].concat())
        };
        ws.send(m).await.expect("send");
    }
    let mut msgs = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) => {
                    if let Some((&c, rest)) = b.split_first() {
                        msgs.push((c, rest.to_vec(), false));
                    }
                }
                Message::Text(t) => {
                    if let Some((&c, rest)) = t.as_bytes().split_first() {
                        let rest = std::str::from_utf8(rest).expect("ascii");
                        msgs.push((c.wrapping_sub(b'0'), b64(rest), true));
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await;
    Ok((proto, msgs))
}

fn channel(msgs: &[(u8, Vec<u8>, bool)], c: u8) -> String {
    let b: Vec<u8> = msgs
        .iter()
        .filter(|m| m.0 == c)
        .flat_map(|m| m.1.clone())
        .collect();
    String::from_utf8_lossy(&b).into_owned()
}

/// Item 8: exec over WebSocket with the pre-v4 and base64 subprotocols.
#[test]
fn exec_over_websockets_with_the_older_subprotocols() {
    let (mut env, srv) = node("cfws");
    env.start();
    srv.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ws", "namespace": "default"},
        "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1, "containers": [
            {"name": "main", "image": env.image("sleep"),
             "command": ["/bin/sh", "-c", "echo container is alive; sleep 600"]}]}}))
        .expect("pod");
    wait_phase(&env, &srv, "default", "ws", "Running");
    let ca = serving_cert(&env);
    let echo = "command=echo&command=remote+execution+test&stdout=1&stderr=1";
    let fail = "command=sh&command=-c&command=exit%203&stdout=1&stderr=1";
    let stdin = "command=head&command=-n&command=1&stdin=1&stdout=1&stderr=1";
    let results = env
        .ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut r = Vec::new();
                for (p, q, input) in [
                    ("channel.k8s.io", echo, None),
                    ("base64.channel.k8s.io", echo, None),
                    ("v4.base64.channel.k8s.io", echo, None),
                    ("channel.k8s.io", fail, None),
                    ("base64.channel.k8s.io", fail, None),
                    (
                        "base64.channel.k8s.io",
                        stdin,
                        Some(&b"through base64 stdin\n"[..]),
                    ),
                    ("v9.channel.k8s.io", echo, None),
                ] {
                    r.push((p, q, exec(&ca, q, p, input).await));
                }
                r
            })
        })
        .expect("netns");
    let mut it = results.into_iter();
    let mut next = |want: &str| {
        let (p, q, r) = it.next().expect("result");
        assert_eq!(p, want);
        let (proto, msgs) = r.unwrap_or_else(|code| panic!("{p} {q}: HTTP {code}"));
        assert_eq!(proto, p);
        // base64 protocols send text messages only, the binary ones binary only.
        assert!(
            msgs.iter().all(|m| m.2 == p.contains("base64")),
            "{p}: {msgs:?}"
        );
        msgs
    };
    // The upstream spec: every message is stdout, or an empty message on another channel;
    // the output holds the text. v1 writes nothing on the error channel on success.
    for p in ["channel.k8s.io", "base64.channel.k8s.io"] {
        let msgs = next(p);
        for (c, data, _) in &msgs {
            assert!(
                *c == 1 || data.is_empty(),
                "{p}: message on channel {c}: {data:?}"
            );
        }
        assert!(
            channel(&msgs, 1).contains("remote execution test"),
            "{p}: {msgs:?}"
        );
    }
    // v4: the metav1.Status JSON on the error channel.
    let msgs = next("v4.base64.channel.k8s.io");
    assert_eq!(channel(&msgs, 1), "remote execution test\n");
    let st: Value = serde_json::from_str(&channel(&msgs, 3)).expect("status json");
    assert_eq!(st["status"], "Success", "{st}");
    // v1 failure: the status message as text.
    for p in ["channel.k8s.io", "base64.channel.k8s.io"] {
        let msgs = next(p);
        let e = channel(&msgs, 3);
        assert!(
            e.starts_with("command terminated with non-zero exit code") && e.contains('3'),
            "{p}: {e:?}"
        );
        assert!(
            serde_json::from_str::<Value>(&e).is_err(),
            "{p}: not JSON: {e}"
        );
    }
    // base64 stdin is decoded.
    let msgs = next("base64.channel.k8s.io");
    assert_eq!(channel(&msgs, 1), "through base64 stdin\n");
    // A protocol nobody serves is refused before the upgrade.
    let (_, _, r) = it.next().expect("result");
    assert_eq!(r.err(), Some(400));
}

/// The "also seen": service-link variables as pods.go "should contain environment variables
/// for services" expects them, plus the kubelet's rules around them.
#[test]
fn containers_get_service_link_variables() {
    let (mut env, srv) = node("cfsvc");
    let svc = |ns: &str, name: &str, spec: Value| {
        srv.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}))
            .expect("service");
    };
    svc(
        "default",
        "kubernetes",
        json!({"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}),
    );
    svc(
        "e2e",
        "fooservice",
        json!({"clusterIP": "10.96.0.20", "selector": {"name": "x"}, "ports": [{"port": 8765, "protocol": "TCP", "targetPort": 8080}]}),
    );
    svc(
        "e2e",
        "headless",
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
    );
    svc(
        "other",
        "elsewhere",
        json!({"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}),
    );
    env.start();
    let pod = |name: &str, links: bool| {
        srv.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "e2e"},
            "spec": {"nodeName": "node1", "restartPolicy": "Never", "enableServiceLinks": links,
                "containers": [{"name": "env3cont", "image": env.image("sleep"),
                    "command": ["sh", "-c", "env"],
                    "env": [{"name": "FOOSERVICE_SERVICE_PORT", "value": "mine"},
                            {"name": "URL", "value": "http://$(FOOSERVICE_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"}]}]}}))
            .expect("pod");
    };
    pod("client-envvars", true);
    pod("client-nolinks", false);
    let env_of = |name: &str| -> std::collections::BTreeMap<String, String> {
        wait_phase(&env, &srv, "e2e", name, "Succeeded");
        let (code, _, body) = get(&env, &format!("/containerLogs/e2e/{name}/env3cont"));
        assert_eq!(code, 200, "{body}");
        body.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let e = env_of("client-envvars");
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
        ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
        ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
        ("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1"),
        ("FOOSERVICE_SERVICE_HOST", "10.96.0.20"),
        // The container's own value wins.
        ("FOOSERVICE_SERVICE_PORT", "mine"),
        ("FOOSERVICE_PORT", "tcp://10.96.0.20:8765"),
        ("FOOSERVICE_PORT_8765_TCP_PORT", "8765"),
        ("FOOSERVICE_PORT_8765_TCP_PROTO", "tcp"),
        ("FOOSERVICE_PORT_8765_TCP", "tcp://10.96.0.20:8765"),
        ("FOOSERVICE_PORT_8765_TCP_ADDR", "10.96.0.20"),
        // $(VAR) sees the service variables.
        ("URL", "http://10.96.0.20:443"),
    ] {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k} in {e:?}");
    }
    assert!(!e.keys().any(|k| k.starts_with("HEADLESS_")), "{e:?}");
    assert!(!e.keys().any(|k| k.starts_with("ELSEWHERE_")), "{e:?}");
    // enableServiceLinks: false keeps the master service only.
    let e = env_of("client-nolinks");
    assert_eq!(
        e.get("KUBERNETES_SERVICE_HOST").map(String::as_str),
        Some("10.96.0.1")
    );
    assert_eq!(
        e.get("KUBERNETES_SERVICE_PORT").map(String::as_str),
        Some("443")
    );
    assert!(!e.contains_key("FOOSERVICE_SERVICE_HOST"), "{e:?}");
    assert_eq!(
        e.get("URL").map(String::as_str),
        Some("http://$(FOOSERVICE_SERVICE_HOST):443")
    );
}
