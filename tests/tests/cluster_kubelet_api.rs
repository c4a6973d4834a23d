//! The kubelet API of a cluster-mode agent against the apiserver fixture: TLS with a
//! self-signed serving certificate, anonymous and unknown tokens refused (401), an
//! authenticated user without `nodes/proxy` refused (403, decided by SubjectAccessReview), and a
//! permitted user reading a container's CRI log (tailLines, timestamps, limitBytes). Runs the
//! real `hako-agent` (build it first) and `curl`. No root.

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
