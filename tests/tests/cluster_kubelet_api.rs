//! The kubelet API of a cluster-mode agent against the apiserver fixture: TLS with a
//! self-signed serving certificate, anonymous and unknown tokens refused (401), an
//! authenticated user without `nodes/proxy` refused (403, decided by SubjectAccessReview), and a
//! permitted user reading a container's CRI log (tailLines, timestamps, limitBytes). Runs the
//! real `hako-agent` (build it first) and `curl`. No root.

mod tls_support;

use hako_tests::agent::target_bin;
use hako_tests::apiserver::{ApiServer, User};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// (HTTP code, body) of a GET through curl (-k: the certificate is self-signed).
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    get_with(port, path, token, &[])
}

fn get_with(port: u16, path: &str, token: Option<&str>, extra: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "-o", "-", "-w", "\n%{http_code}"]);
    cmd.args(extra);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn openssl(dir: &std::path::Path, args: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl {args}"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl {args}");
}

/// A CA and a client certificate it signed (CN=user, O=group) in `dir`: ca.crt, <name>.crt/key.
fn make_certs(dir: &std::path::Path, ca: &str, name: &str, subj: &str) {
    openssl(dir, &format!("req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN={ca} -keyout {ca}.key -out {ca}.crt"));
    openssl(
        dir,
        &format!("req -newkey rsa:2048 -nodes -subj {subj} -keyout {name}.key -out {name}.csr"),
    );
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .expect("ext");
    openssl(dir, &format!("x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -days 1 -extfile client.ext -out {name}.crt"));
}

#[test]
fn kubelet_api_client_certificates() {
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    make_certs(
        d,
        "ca",
        "apiserver",
        "/O=kubelet-api/CN=kube-apiserver-kubelet-client",
    );
    make_certs(d, "evil", "mallory", "/O=system:masters/CN=mallory");
    let kc = d.join("kubeconfig");
    srv.write_kubeconfig(&kc, &srv.node_token("n1"))
        .expect("kubeconfig");
    let port = free_port();
    let _agent = Agent(
        Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
            .args(["--eviction-hard", hako_tests::agent::TEST_EVICTION_HARD])
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--hostname-override", "n1", "--node-ip", "192.0.2.10"])
            .args([
                "--kubelet-address",
                "127.0.0.1",
                "--kubelet-port",
                &port.to_string(),
            ])
            .arg("--client-ca-file")
            .arg(d.join("ca.crt"))
            // Permissions granted mid-test apply at once (denials are cached 30 s by default).
            .args(["--authorization-webhook-cache-unauthorized-ttl", "0"])
            .arg("--root-dir")
            .arg(d.join("root"))
            .arg("--run-dir")
            .arg(d.join("run"))
            .arg("--cni-conf-dir")
            .arg(d.join("net.d"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while get(port, "/healthz", None).0 == 0 {
        assert!(Instant::now() < end, "kubelet API did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let cert = |n: &str| {
        let c = d.join(format!("{n}.crt")).display().to_string();
        let k = d.join(format!("{n}.key")).display().to_string();
        (c, k)
    };
    let (c, k) = cert("apiserver");
    let with_cert = ["--cert", c.as_str(), "--key", k.as_str()];
    let (code, body) = get_with(port, "/healthz", None, &with_cert);
    assert_eq!(code, 403, "known user, no permission yet: {body}");
    assert!(
        body.contains("user=kube-apiserver-kubelet-client"),
        "{body}"
    );
    srv.grant("kube-apiserver-kubelet-client", "get", "nodes", "proxy");
    let (code, body) = get_with(port, "/healthz", None, &with_cert);
    assert_eq!((code, body.as_str()), (200, "ok"));
    // A certificate from another CA does not authenticate (the handshake fails).
    let (c, k) = cert("mallory");
    let (code, _) = get_with(
        port,
        "/healthz",
        None,
        &["--cert", c.as_str(), "--key", k.as_str()],
    );
    assert_ne!(code, 200);
    assert_eq!(
        get(port, "/healthz", None).0,
        401,
        "no certificate, no token"
    );
}

#[test]
fn kubelet_api_authn_authz_and_logs() {
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let kc = tmp.path().join("kubeconfig");
    srv.write_kubeconfig(&kc, &srv.node_token("n1"))
        .expect("kubeconfig");
    let port = free_port();
    let logs = tmp.path().join("logs");
    let _agent = Agent(
        Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
            .args(["--eviction-hard", hako_tests::agent::TEST_EVICTION_HARD])
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--hostname-override", "n1", "--node-ip", "192.0.2.10"])
            .args([
                "--kubelet-address",
                "127.0.0.1",
                "--kubelet-port",
                &port.to_string(),
            ])
            .arg("--root-dir")
            .arg(tmp.path().join("root"))
            .arg("--run-dir")
            .arg(tmp.path().join("run"))
            .arg("--pod-log-dir")
            .arg(&logs)
            // Permissions granted mid-test apply at once (denials are cached 30 s by default).
            .args(["--authorization-webhook-cache-unauthorized-ttl", "0"])
            .arg("--cni-conf-dir")
            .arg(tmp.path().join("net.d"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    // A pod bound to the node, with a CRI log as the runtime writes it.
    let p = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "127.0.0.1:1/x:1"}]}}))
        .expect("pod");
    let uid = p["metadata"]["uid"].as_str().expect("uid").to_string();
    let dir = logs.join(format!("default_web_{uid}/c"));
    std::fs::create_dir_all(&dir).expect("log dir");
    std::fs::write(
        dir.join("0.log"),
        "2026-11-28T10:00:00.000000001Z stdout F first\n2026-11-28T10:00:01.000000001Z stderr P sec\n2026-11-28T10:00:01.000000002Z stderr F ond\n2026-11-28T10:00:02.000000001Z stdout F third\n",
    )
    .expect("log");

    let end = Instant::now() + Duration::from_secs(20);
    while get(port, "/healthz", None).0 == 0 {
        assert!(Instant::now() < end, "kubelet API did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    srv.add_token("alice-token", User::plain("alice"));
    srv.add_token("bob-token", User::plain("bob"));
    srv.grant("alice", "get", "nodes", "proxy");

    let path = "/containerLogs/default/web/c";
    assert_eq!(get(port, path, None).0, 401, "anonymous refused");
    assert_eq!(get(port, path, Some("no-such-token")).0, 401);
    let (code, body) = get(port, path, Some("bob-token"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("subresource=proxy"), "{body}");

    // The pod must be known to the agent (from its watch) before its logs are served.
    let end = Instant::now() + Duration::from_secs(15);
    let (code, body) = loop {
        let r = get(port, path, Some("alice-token"));
        if r.0 != 404 || Instant::now() > end {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "first\nsecond\nthird\n");
    let (_, body) = get(
        port,
        &format!("{path}?tailLines=1&timestamps=true"),
        Some("alice-token"),
    );
    assert_eq!(body, "2026-11-28T10:00:02.000000001Z third\n");
    let (_, body) = get(port, &format!("{path}?limitBytes=8"), Some("alice-token"));
    assert_eq!(body, "first\nse");
    let (code, body) = get(port, "/pods", Some("alice-token"));
    assert_eq!(code, 200);
    let pods: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(pods["items"][0]["metadata"]["name"], "web");
    // Metrics and stats are authorized as nodes/metrics and nodes/stats.
    let (code, body) = get(port, "/metrics/resource", Some("alice-token"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("subresource=metrics"), "{body}");
    srv.grant("alice", "get", "nodes", "metrics");
    srv.grant("alice", "get", "nodes", "stats");
    let (code, body) = get(port, "/metrics/resource", Some("alice-token"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("node_cpu_usage_seconds_total "), "{body}");
    assert!(body.contains("node_memory_working_set_bytes "), "{body}");
    let (code, body) = get(port, "/stats/summary", Some("alice-token"));
    assert_eq!(code, 200, "{body}");
    let sum: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(sum["node"]["nodeName"], "n1");
    assert!(sum["node"]["memory"]["workingSetBytes"]
        .as_u64()
        .is_some_and(|m| m > 0));
    assert!(sum["node"]["fs"]["capacityBytes"]
        .as_u64()
        .is_some_and(|m| m > 0));
    assert_eq!(sum["pods"][0]["podRef"]["name"], "web");
    // The decisions were the apiserver's: TokenReview and SubjectAccessReview were asked.
    let reqs = srv.requests();
    assert!(reqs
        .iter()
        .any(|r| r.attrs.resource == "tokenreviews" && r.user == "system:node:n1"));
    assert!(reqs
        .iter()
        .any(|r| r.attrs.resource == "subjectaccessreviews" && r.user == "system:node:n1"));
    assert!(
        tmp.path().join("root/pki/kubelet.crt").exists(),
        "self-signed cert kept"
    );
}

/// A WebSocket client of the kubelet API inside a test namespace (TLS trusting the agent's
/// self-signed serving certificate).
#[cfg(feature = "root")]
mod ws {
    use futures::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{self, Message};

    pub type Ws =
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

    /// Connects; Err(HTTP status) when the upgrade is refused.
    pub async fn connect(
        port: u16,
        path: &str,
        token: Option<&str>,
        protocols: &str,
        ca: &[u8],
    ) -> Result<(Ws, String), u16> {
        let tls = super::tls_support::connect(&super::tls_support::connector(ca), port)
            .await
            .expect("tls handshake");
        let mut req = format!("wss://127.0.0.1:{port}{path}")
            .into_client_request()
            .expect("request");
        if !protocols.is_empty() {
            req.headers_mut()
                .insert("sec-websocket-protocol", protocols.parse().expect("hv"));
        }
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().expect("hv"));
        }
        match tokio_tungstenite::client_async(req, tls).await {
            Ok((ws, resp)) => {
                let p = resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                Ok((ws, p))
            }
            Err(tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("websocket: {e}"),
        }
    }

    pub async fn send(ws: &mut Ws, channel: u8, data: &[u8]) {
        let mut v = vec![channel];
        v.extend_from_slice(data);
        ws.send(Message::Binary(v)).await.expect("send");
    }

    /// Frames until the server closes (or `limit` passes), concatenated per channel.
    pub async fn collect(ws: &mut Ws, limit: Duration) -> std::collections::BTreeMap<u8, Vec<u8>> {
        let mut out = std::collections::BTreeMap::<u8, Vec<u8>>::new();
        let _ = tokio::time::timeout(limit, async {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(b) = m {
                    if let Some((&c, rest)) = b.split_first() {
                        out.entry(c).or_default().extend_from_slice(rest);
                    }
                }
            }
        })
        .await;
        out
    }

    /// A stand-in for the apiserver's pod subresource proxy, for `kubectl`: answers
    /// `GET /api/v1/namespaces/{ns}/pods/{name}` with `pod`, and forwards
    /// `.../pods/{name}/exec|attach?container=c&...` to the kubelet's `/exec/{ns}/{name}/{c}`
    /// (and `.../portforward` to `/portForward/{ns}/{name}`) with `token`, relaying the upgraded
    /// connection as the apiserver's upgrade-aware proxy does.
    pub async fn apiserver_proxy(
        l: tokio::net::TcpListener,
        kubelet: u16,
        ca: Vec<u8>,
        token: String,
        pod: String,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = l.accept().await {
            let (ca, token, pod) = (ca.clone(), token.clone(), pod.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut lines = text.split("\r\n");
                let first = lines.next().unwrap_or("");
                let mut parts = first.split(' ');
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (path, q) = target.split_once('?').unwrap_or((target, ""));
                let segs: Vec<&str> = path
                    .strip_prefix("/api/v1/namespaces/")
                    .unwrap_or("")
                    .split('/')
                    .collect();
                // Discovery, enough for kubectl to map `pods`.
                let discovery = match path {
                    "/api" => Some(
                        r#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[]}"#,
                    ),
                    "/apis" => Some(r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#),
                    "/api/v1" => Some(
                        r#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list"],"shortNames":["po"]},{"name":"pods/exec","singularName":"","namespaced":true,"kind":"PodExecOptions","verbs":["create","get"]}]}"#,
                    ),
                    _ => None,
                };
                if let Some(d) = discovery {
                    let r = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{d}", d.len());
                    let _ = c.write_all(r.as_bytes()).await;
                    return;
                }
                let new_path = match segs.as_slice() {
                    [_, "pods", _] => {
                        let r = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{pod}", pod.len());
                        let _ = c.write_all(r.as_bytes()).await;
                        return;
                    }
                    [ns, "pods", name, op @ ("exec" | "attach")] => {
                        let mut container = "";
                        let rest: Vec<&str> = q
                            .split('&')
                            .filter(|kv| match kv.strip_prefix("container=") {
                                Some(v) => {
                                    container = v;
                                    false
                                }
                                None => true,
                            })
                            .collect();
                        format!("/{op}/{ns}/{name}/{container}?{}", rest.join("&"))
                    }
                    [ns, "pods", name, "portforward"] => format!("/portForward/{ns}/{name}?{q}"),
                    _ => {
                        let _ = c
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                };
                let mut req = format!("{method} {new_path} HTTP/1.1\r\n");
                for l in lines.filter(|l| !l.is_empty()) {
                    let lower = l.to_ascii_lowercase();
                    if !lower.starts_with("authorization:") && !lower.starts_with("host:") {
                        req.push_str(l);
                        req.push_str("\r\n");
                    }
                }
                req.push_str(&format!(
                    "Host: 127.0.0.1:{kubelet}\r\nAuthorization: Bearer {token}\r\n\r\n"
                ));
                let mut up = tls(kubelet, &ca).await;
                if up.write_all(req.as_bytes()).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    }

    async fn tls(port: u16, ca: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        super::tls_support::connect(&super::tls_support::connector(ca), port)
            .await
            .expect("tls handshake")
    }

    /// Frames until one on `channel` contains `needle` (or `limit` passes): all of that channel.
    pub async fn until(ws: &mut Ws, channel: u8, needle: &str, limit: Duration) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(limit, async {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(b) = m {
                    if b.first() == Some(&channel) {
                        got.extend_from_slice(&b[1..]);
                        if String::from_utf8_lossy(&got).contains(needle) {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }
}

/// kubectl ≥ 1.30 is on PATH (WebSocket v5 remote commands by default, SPDY on request);
/// without it the kubectl part of the streaming test is skipped with a message (the same
/// streams are still checked with the test's own WebSocket client).
#[cfg(feature = "root")]
fn kubectl_with_websockets() -> bool {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output();
    let minor = out
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| {
            let c = &v["clientVersion"];
            Some((
                c["major"].as_str()?.parse::<u32>().ok()?,
                c["minor"]
                    .as_str()?
                    .trim_end_matches('+')
                    .parse::<u32>()
                    .ok()?,
            ))
        });
    match minor {
        Some((1, m)) if m >= 30 => true,
        other => {
            eprintln!(
                "SKIPPED: the kubectl exec/attach/port-forward checks need kubectl >= 1.30 on PATH (found {other:?})"
            );
            false
        }
    }
}

/// Root: exec (stdin through `cat`, a non-zero exit code on channel 3, a terminal resize seen
/// by `stty size`), attach, port-forward to an httpd in the pod, and the metrics endpoints,
/// against a pod the cluster-mode agent runs under its workers.
#[cfg(feature = "root")]
#[test]
fn kubelet_api_streaming_and_metrics() {
    use hako_tests::agent::AgentEnv;
    use std::time::Duration;
    let mut env = AgentEnv::new("kapi");
    let (srv, kc) = hako_tests::cluster::start_fixture(&env);
    let port = 10250u16;
    env.args.extend(
        [
            "--kubeconfig",
            kc.to_str().expect("path"),
            "--kubelet-address",
            "127.0.0.1",
            "--kubelet-port",
            "10250",
            // Permissions granted mid-test apply at once (denials are cached 30 s by default).
            "--authorization-webhook-cache-unauthorized-ttl",
            "0",
        ]
        .map(String::from),
    );
    env.start();
    srv.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1, "containers": [
            {"name": "app", "image": env.image("sleep"),
             "command": ["sh", "-c", "i=0; while true; do echo tick $i; echo tock $i >&2; i=$((i+1)); sleep 0.2; done"]},
            {"name": "web", "image": env.image("sleep"),
             "command": ["sh", "-c", "mkdir -p /www && echo hello-from-the-pod > /www/index.html && exec httpd -f -p 8080 -h /www"]},
            {"name": "echo", "image": env.image("sleep"), "stdin": true,
             "command": ["sh", "-c", "while read l; do echo got:$l; done"]}]}}))
        .expect("pod");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let running = srv
            .get("", "pods", "default", "web")
            .is_some_and(|p| p["status"]["phase"] == "Running");
        if running {
            break;
        }
        assert!(
            Instant::now() < end,
            "pod not Running; agent log:\n{}",
            env.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    srv.add_token("alice-token", User::plain("alice"));
    srv.add_token("bob-token", User::plain("bob"));
    srv.grant("alice", "get", "nodes", "proxy");
    // SPDY upgrades are POSTs: `create` (the kubelet maps the method to the verb).
    srv.grant("alice", "create", "nodes", "proxy");
    let ca = std::fs::read(env.root.join("pki/kubelet.crt")).expect("serving cert");
    let pod_json = srv
        .get("", "pods", "default", "web")
        .expect("pod")
        .to_string();
    let tok = Some("alice-token");
    let kubectl_ok = kubectl_with_websockets();
    let t0 = Instant::now();
    let log = env.agent_log();
    let results = env
        .ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                use ws::*;
                let v5 = "v5.channel.k8s.io";
                let v4 = "v4.channel.k8s.io";
                let lim = Duration::from_secs(15);
                let exec = "/exec/default/web/app?command=cat&stdin=1&stdout=1&stderr=1";
                // Anonymous and unauthorized callers are refused before any upgrade.
                assert_eq!(connect(port, exec, None, v5, &ca).await.err(), Some(401));
                assert_eq!(
                    connect(port, exec, Some("bob-token"), v5, &ca).await.err(),
                    Some(403)
                );
                // No common subprotocol: refused (channel.k8s.io is served since issue 21).
                assert_eq!(
                    connect(port, exec, tok, "v9.channel.k8s.io", &ca).await.err(),
                    Some(400)
                );

                // stdin through cat, closed with the v5 close signal.
                let (mut s, proto) = connect(port, exec, tok, &format!("{v5},{v4}"), &ca)
                    .await
                    .expect("exec");
                assert_eq!(proto, v5);
                send(&mut s, 0, b"hello through stdin\n").await;
                send(&mut s, 0, b"second line\n").await;
                send(&mut s, 255, &[0]).await;
                let out = collect(&mut s, lim).await;
                let stdout = String::from_utf8_lossy(out.get(&1).map_or(&[][..], |v| v)).into_owned();
                assert_eq!(stdout, "hello through stdin\nsecond line\n");
                let st: serde_json::Value =
                    serde_json::from_slice(out.get(&3).expect("status")).expect("status json");
                assert_eq!(st["status"], "Success", "{st}");

                // A non-zero exit code, stderr on channel 2 (v4).
                let (mut s, proto) = connect(
                    port,
                    "/exec/default/web/app?command=sh&command=-c&command=echo%20oops%20%3E%262%3B%20exit%203&stdout=1&stderr=1",
                    tok,
                    v4,
                    &ca,
                )
                .await
                .expect("exec 2");
                assert_eq!(proto, v4);
                let out = collect(&mut s, lim).await;
                assert_eq!(out.get(&2).map(|v| v.as_slice()), Some(&b"oops\n"[..]));
                let st: serde_json::Value =
                    serde_json::from_slice(out.get(&3).expect("status")).expect("status json");
                assert_eq!(st["status"], "Failure", "{st}");
                assert_eq!(st["reason"], "NonZeroExitCode", "{st}");
                assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode", "{st}");
                assert_eq!(st["details"]["causes"][0]["message"], "3", "{st}");

                // A terminal: the resize reaches the process.
                let (mut s, _) = connect(
                    port,
                    "/exec/default/web/app?command=sh&command=-c&command=sleep%201%3B%20stty%20size&stdin=1&stdout=1&tty=1",
                    tok,
                    v5,
                    &ca,
                )
                .await
                .expect("exec tty");
                send(&mut s, 4, br#"{"Width":123,"Height":45}"#).await;
                let out = collect(&mut s, lim).await;
                let tty = String::from_utf8_lossy(out.get(&1).map_or(&[][..], |v| v)).into_owned();
                assert!(tty.contains("45 123"), "stty size said {tty:?}");

                // Attach: the container's output as it is written.
                let (mut s, _) =
                    connect(port, "/attach/default/web/app?stdout=1&stderr=1", tok, v5, &ca)
                        .await
                        .expect("attach");
                let o = until(&mut s, 1, "tick", lim).await;
                assert!(o.contains("tick "), "attach stdout: {o:?}");
                let e = until(&mut s, 2, "tock", lim).await;
                assert!(e.contains("tock "), "attach stderr: {e:?}");
                drop(s);
                // Attach with stdin to a container whose spec has `stdin: true`.
                let (mut s, _) =
                    connect(port, "/attach/default/web/echo?stdin=1&stdout=1", tok, v5, &ca)
                        .await
                        .expect("attach stdin");
                send(&mut s, 0, b"ping\n").await;
                let o = until(&mut s, 1, "got:ping", lim).await;
                assert!(o.contains("got:ping\n"), "attach stdin echo: {o:?}");
                drop(s);

                // Port-forward to the httpd inside the pod's network namespace.
                let (mut s, _) =
                    connect(port, "/portForward/default/web?ports=8080", tok, v4, &ca)
                        .await
                        .expect("port-forward");
                let mut first = Vec::new();
                while first.len() < 2 {
                    match futures::StreamExt::next(&mut s).await {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => first.push(b),
                        other => panic!("port-forward: {other:?}"),
                    }
                }
                assert_eq!(first[0], vec![0, 0x90, 0x1f], "data channel opens with the port (LE)");
                assert_eq!(first[1], vec![1, 0x90, 0x1f], "error channel opens with the port (LE)");
                send(&mut s, 0, b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").await;
                let out = collect(&mut s, lim).await;
                let page = String::from_utf8_lossy(out.get(&0).map_or(&[][..], |v| v)).into_owned();
                assert!(page.starts_with("HTTP/1.") && page.contains("hello-from-the-pod"), "{page:?}");
                assert!(out.get(&1).is_none_or(|e| e.is_empty()), "error channel: {out:?}");

                // Figures (printed, not asserted): exec round trips and a port-forward download.
                let n = 10u32;
                let t = Instant::now();
                for _ in 0..n {
                    let (mut s, _) =
                        connect(port, "/exec/default/web/app?command=true&stdout=1", tok, v5, &ca)
                            .await
                            .expect("exec true");
                    let out = collect(&mut s, lim).await;
                    assert!(out.contains_key(&3), "status of exec true");
                }
                let per_exec = t.elapsed() / n;
                let (mut s, _) = connect(
                    port,
                    "/exec/default/web/web?command=sh&command=-c&command=dd%20if%3D%2Fdev%2Fzero%20of%3D%2Fwww%2Fbig%20bs%3D1048576%20count%3D16&stderr=1",
                    tok,
                    v5,
                    &ca,
                )
                .await
                .expect("exec dd");
                let out = collect(&mut s, lim).await;
                let st: serde_json::Value =
                    serde_json::from_slice(out.get(&3).expect("status")).expect("status json");
                assert_eq!(st["status"], "Success", "{st}");
                let (mut s, _) =
                    connect(port, "/portForward/default/web?ports=8080", tok, v4, &ca)
                        .await
                        .expect("port-forward 2");
                let t = Instant::now();
                send(&mut s, 0, b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n").await;
                let out = collect(&mut s, lim).await;
                let secs = t.elapsed().as_secs_f64();
                let got = out.get(&0).map_or(0, Vec::len);
                assert!(got > 16 << 20, "downloaded {got} bytes");
                #[allow(clippy::cast_precision_loss)]
                let mib_s = (got as f64 / f64::from(1u32 << 20)) / secs;
                if kubectl_ok {
                // The real kubectl (WebSocket v5) through an apiserver-like proxy: stdin, and
                // the exit code from the status on channel 3.
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let server = format!("http://{}", l.local_addr().expect("addr"));
                tokio::spawn(apiserver_proxy(l, port, ca.clone(), "alice-token".into(), pod_json));
                let kubectl = |args: &[&str]| {
                    let mut c = tokio::process::Command::new("kubectl");
                    c.args(["--kubeconfig", "/dev/null", "--server", &server, "-n", "default"])
                        .args(args)
                        .stdin(std::process::Stdio::piped())
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped());
                    c
                };
                let mut child = kubectl(&["exec", "-i", "web", "-c", "app", "--", "cat"])
                    .spawn()
                    .expect("kubectl");
                {
                    use tokio::io::AsyncWriteExt;
                    let mut i = child.stdin.take().expect("stdin");
                    i.write_all(b"hello from kubectl\n").await.expect("write");
                }
                let out = tokio::time::timeout(lim, child.wait_with_output())
                    .await
                    .expect("kubectl exec in time")
                    .expect("kubectl exec");
                assert_eq!(
                    (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
                    (Some(0), "hello from kubectl\n"),
                    "kubectl exec -i: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let out = tokio::time::timeout(
                    lim,
                    kubectl(&["exec", "web", "-c", "app", "--", "sh", "-c", "echo out; exit 7"]).output(),
                )
                .await
                .expect("kubectl exec in time")
                .expect("kubectl exec");
                assert_eq!(
                    (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
                    (Some(7), "out\n"),
                    "kubectl exec exit code: {}",
                    String::from_utf8_lossy(&out.stderr)
                );

                // The same over SPDY (what kubectl falls back to, and what apiservers 1.30+
                // speak to the kubelet for it).
                let mut child = kubectl(&["exec", "-i", "web", "-c", "app", "--", "cat"])
                    .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
                    .spawn()
                    .expect("kubectl");
                {
                    use tokio::io::AsyncWriteExt;
                    let mut i = child.stdin.take().expect("stdin");
                    i.write_all(b"hello over spdy\n").await.expect("write");
                }
                let out = tokio::time::timeout(lim, child.wait_with_output())
                    .await
                    .expect("kubectl exec (SPDY) in time")
                    .expect("kubectl exec (SPDY)");
                assert_eq!(
                    (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
                    (Some(0), "hello over spdy\n"),
                    "kubectl exec -i over SPDY: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                // Bulk input (as `kubectl cp` sends a tar): 4 MiB through stdin over SPDY.
                let mut child = kubectl(&["exec", "-i", "web", "-c", "app", "--", "wc", "-c"])
                    .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
                    .spawn()
                    .expect("kubectl");
                {
                    use tokio::io::AsyncWriteExt;
                    let mut i = child.stdin.take().expect("stdin");
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..4 {
                        i.write_all(&chunk).await.expect("write");
                    }
                }
                let out = tokio::time::timeout(lim, child.wait_with_output())
                    .await
                    .expect("kubectl exec wc (SPDY) in time")
                    .expect("kubectl exec wc (SPDY)");
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    "4194304",
                    "kubectl exec -i wc -c over SPDY: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let out = tokio::time::timeout(
                    lim,
                    kubectl(&["exec", "web", "-c", "app", "--", "sh", "-c", "echo out; echo err >&2; exit 5"])
                        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
                        .output(),
                )
                .await
                .expect("kubectl exec (SPDY) in time")
                .expect("kubectl exec (SPDY)");
                assert_eq!(
                    (
                        out.status.code(),
                        String::from_utf8_lossy(&out.stdout).as_ref(),
                        String::from_utf8_lossy(&out.stderr).lines().next()
                    ),
                    (Some(5), "out\n", Some("err")),
                    "kubectl exec over SPDY: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                // kubectl port-forward: a local port to the pod's httpd, over SPDY, and by
                // default (kubectl tries SPDY tunnelled in a WebSocket, which is refused, and
                // falls back to SPDY).
                for ws_env in ["false", "true"] {
                let mut child = kubectl(&["port-forward", "--address", "127.0.0.1", "pod/web", ":8080"])
                    .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", ws_env)
                    .kill_on_drop(true)
                    .spawn()
                    .expect("kubectl port-forward");
                let mut so = child.stdout.take().expect("stdout");
                let local = tokio::time::timeout(lim, async {
                    use tokio::io::AsyncReadExt;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = so.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return None;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let t = String::from_utf8_lossy(&got).into_owned();
                        if let Some(p) = t
                            .split("127.0.0.1:")
                            .nth(1)
                            .and_then(|r| r.split(' ').next())
                            .and_then(|p| p.parse::<u16>().ok())
                        {
                            return Some(p);
                        }
                    }
                })
                .await
                .ok()
                .flatten()
                .expect("kubectl port-forward local port");
                for _ in 0..2 {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", local))
                        .await
                        .expect("connect to kubectl port-forward");
                    c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await.expect("write");
                    let mut page = String::new();
                    tokio::time::timeout(lim, c.read_to_string(&mut page))
                        .await
                        .expect("page in time")
                        .expect("page");
                    assert!(page.contains("hello-from-the-pod"), "via kubectl port-forward: {page:?}");
                }
                let _ = child.kill().await;
                }

                // kubectl attach -i to the `stdin: true` container: input in, output back
                // (WebSocket, then SPDY).
                for ws_env in ["true", "false"] {
                let mut child = kubectl(&["attach", "-i", "web", "-c", "echo"])
                    .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", ws_env)
                    .kill_on_drop(true)
                    .spawn()
                    .expect("kubectl attach");
                let mut stdin = child.stdin.take().expect("stdin");
                let mut stdout = child.stdout.take().expect("stdout");
                let seen = tokio::time::timeout(lim, async {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // Repeat: the first line may be written before the attach is set up.
                        let _ = stdin.write_all(b"from-kubectl\n").await;
                        match tokio::time::timeout(Duration::from_millis(500), stdout.read(&mut buf)).await {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                            Err(_) => {}
                        }
                        if String::from_utf8_lossy(&got).contains("got:from-kubectl") {
                            break;
                        }
                    }
                    String::from_utf8_lossy(&got).into_owned()
                })
                .await
                .unwrap_or_default();
                let _ = child.kill().await;
                assert!(seen.contains("got:from-kubectl\n"), "kubectl attach output ({ws_env}): {seen:?}");
                }

                }

                eprintln!(
                    "figures: exec round trip (connect, TLS, upgrade, run `true`, status) {per_exec:?}; port-forward download 16 MiB at {mib_s:.0} MiB/s"
                );
            })
        })
        .map_err(|e| format!("{e}; agent log:\n{log}"));
    results.expect("netns");
    eprintln!("streaming checks took {:?}", t0.elapsed());

    // Metrics: nodes/metrics and nodes/stats.
    let curl = |path: &str, token: &str| -> (u16, String) {
        let out = env
            .ns
            .command("curl")
            .args(["-sk", "-o", "-", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .output()
            .expect("curl");
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    };
    assert_eq!(curl("/metrics", "alice-token").0, 403);
    srv.grant("alice", "get", "nodes", "metrics");
    srv.grant("alice", "get", "nodes", "stats");
    let (code, body) = curl("/metrics", "alice-token");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("# TYPE kubelet_running_pods gauge"), "{body}");
    assert!(body.contains("\nkubelet_running_pods 1\n"), "{body}");
    assert!(
        body.contains("kubelet_running_containers{container_state=\"running\"} 3\n"),
        "{body}"
    );
    let (code, body) = curl("/metrics/resource", "alice-token");
    assert_eq!(code, 200, "{body}");
    let line = body
        .lines()
        .find(|l| {
            l.starts_with(
                "container_memory_working_set_bytes{container=\"app\",namespace=\"default\",pod=\"web\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no container working set: {body}"));
    let ws: u64 = line
        .split(' ')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!(ws > 0, "{line}");
    assert!(
        body.contains("container_cpu_usage_seconds_total{container=\"web\",namespace=\"default\",pod=\"web\"} "),
        "{body}"
    );
    assert!(
        body.contains("pod_cpu_usage_seconds_total{namespace=\"default\",pod=\"web\"} "),
        "{body}"
    );
    let (code, body) = curl("/stats/summary", "alice-token");
    assert_eq!(code, 200, "{body}");
    let sum: serde_json::Value = serde_json::from_str(&body).expect("json");
    let pod = &sum["pods"][0];
    assert_eq!(pod["podRef"]["name"], "web");
    assert_eq!(pod["containers"].as_array().map(Vec::len), Some(3), "{pod}");
    assert!(
        pod["memory"]["workingSetBytes"]
            .as_u64()
            .is_some_and(|m| m > 0),
        "{pod}"
    );
    assert!(
        pod["cpu"]["usageCoreNanoSeconds"]
            .as_u64()
            .is_some_and(|c| c > 0),
        "{pod}"
    );
    // The agent's own metrics are served here too.
    let (_, body) = curl("/metrics", "alice-token");
    assert!(
        body.contains("kubelet_started_containers_total{container_type=\"container\"} 3\n"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE kubelet_pod_start_duration_seconds histogram"),
        "{body}"
    );

    // A static pod: its mirror is in /pods, and its logs are served by the mirror's name.
    env.write_manifest(
        "static.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static\nspec:\n  containers:\n  - name: s\n    image: {}\n    command: [sh, -c, 'echo static-says-hi; exec sleep 3600']\n",
            env.image("sleep")
        ),
    );
    let end = Instant::now() + Duration::from_secs(60);
    let logs = loop {
        let (code, body) = curl("/containerLogs/default/static-node1/s", "alice-token");
        if code == 200 && !body.is_empty() {
            break body;
        }
        assert!(
            Instant::now() < end,
            "static pod logs ({code}: {body}); agent log:\n{}",
            env.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(logs, "static-says-hi\n");
    let (code, body) = curl("/pods", "alice-token");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert!(names.contains(&"static-node1"), "{names:?}");
    assert!(names.contains(&"web"), "{names:?}");
}
