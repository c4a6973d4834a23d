//! The kubelet API against unauthenticated and abusive clients: 10,000 random bearer tokens
//! (bounded TokenReviews, bounded memory), idle and slow-header connections (cut off, and
//! `/healthz` still answers), a SPDY header block that inflates past the cap (the session
//! ends, the agent stays healthy), the serving key's mode, and SubjectAccessReviews cached per
//! TTL and carrying the whole identity (the fixture refuses reviews that drop uid/extra).
//! Runs the real `hako-agent` (build it first) against the apiserver fixture, only on
//! 127.0.0.1. Root: the SPDY test bind-mounts a namespace the test made.

#![cfg(feature = "root")]

mod tls_support;

use hako_tests::agent::target_bin;
use hako_tests::apiserver::{ApiServer, User};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tls_support::Tls;

struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts an agent for node n1 on `port` with state under `dir`, and waits for its API.
fn start_agent(srv: &ApiServer, dir: &Path, port: u16, extra: &[&str]) -> Agent {
    let kc = dir.join("kubeconfig");
    srv.write_kubeconfig(&kc, &srv.node_token("n1"))
        .expect("kubeconfig");
    let child = Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
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
        .args(extra)
        .arg("--root-dir")
        .arg(dir.join("root"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--pod-log-dir")
        .arg(dir.join("logs"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let agent = Agent { child };
    let end = Instant::now() + Duration::from_secs(30);
    while curl(port, "/healthz", None).0 == 0 {
        assert!(Instant::now() < end, "kubelet API did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    agent
}

/// (HTTP code, body) of a GET through curl (0: no answer).
fn curl(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "-m", "10", "-o", "-", "-w", "\n%{http_code}"]);
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

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TLS client trusting the agent's self-signed certificate.
fn connector(ca_file: &Path) -> tokio_rustls::TlsConnector {
    tls_support::connector(&std::fs::read(ca_file).expect("agent certificate"))
}

/// Reads one HTTP/1.1 response with a Content-Length body; its status.
async fn read_response(s: &mut Tls, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Ok(code);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn random_token() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..40)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[r.gen_range(0..36)]))
        .collect()
}

/// `n` GETs of /healthz with random tokens over `conns` kept-alive connections; the count of
/// each status.
async fn flood(c: &tokio_rustls::TlsConnector, port: u16, n: usize, conns: usize) -> Vec<u16> {
    let per = n / conns;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            let mut s: Option<Tls> = None;
            let mut buf = Vec::new();
            let mut i = 0;
            while i < per {
                if s.is_none() {
                    s = tls_support::connect(&c, port).await.ok();
                    buf.clear();
                    if s.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
                let Some(st) = s.as_mut() else { continue };
                let req = format!(
                    "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
                    random_token()
                );
                let ok = match st.write_all(req.as_bytes()).await {
                    Ok(()) => read_response(st, &mut buf).await.ok(),
                    Err(_) => None,
                };
                match ok {
                    Some(code) => {
                        codes.push(code);
                        i += 1;
                    }
                    None => s = None,
                }
            }
            codes
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("flood task"));
    }
    all
}

#[test]
fn random_tokens_cost_bounded_reviews_and_memory() {
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let agent = start_agent(&srv, tmp.path(), port, &[]);
    let c = connector(&tmp.path().join("root/pki/kubelet.crt"));
    let rt = rt();
    // A known client, reviewed before the flood (cached).
    let admin = srv.admin_token();
    assert_eq!(curl(port, "/healthz", Some(&admin)).0, 200);
    // Warm up (allocator, TLS), then wait for the bucket to refill.
    rt.block_on(flood(&c, port, 200, 4));
    std::thread::sleep(Duration::from_secs(3));
    let before = rss_kib(agent.child.id());
    let reviews0 = srv.token_reviews();
    let t0 = Instant::now();
    let codes = rt.block_on(flood(&c, port, 10_000, 20));
    let elapsed = t0.elapsed().as_secs_f64();
    let reviews = srv.token_reviews() - reviews0;
    let after = rss_kib(agent.child.id());
    assert_eq!(codes.len(), 10_000);
    let (n401, n429) = (
        codes.iter().filter(|&&c| c == 401).count(),
        codes.iter().filter(|&&c| c == 429).count(),
    );
    assert_eq!(n401 + n429, 10_000, "only 401 and 429: {codes:?}");
    // The bucket: a burst of 20, then 10 per second (default flags); a few for timing slack.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bound = 20 + (10.0 * elapsed).ceil() as u64 + 5;
    eprintln!(
        "10,000 random tokens in {elapsed:.1} s: {reviews} TokenReviews (bound {bound}), \
         {n401} x 401, {n429} x 429, RSS {before} -> {after} KiB"
    );
    assert!(
        reviews <= bound,
        "{reviews} TokenReviews for 10,000 random tokens in {elapsed:.1} s (bound {bound})"
    );
    assert!(
        after.saturating_sub(before) < 5 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The known client is served at once (its review is cached); a new token right after the
    // flood may be throttled (429) until the bucket refills.
    assert_eq!(curl(port, "/healthz", Some(&admin)).0, 200);
}

#[test]
fn idle_and_slow_connections_do_not_block_healthz() {
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _agent = start_agent(&srv, tmp.path(), port, &[]);
    let c = connector(&tmp.path().join("root/pki/kubelet.crt"));
    let admin = srv.admin_token();
    let rt = rt();
    rt.block_on(async {
        // 200 TLS connections that never send a request, and 20 that never finish the
        // handshake.
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(tls_support::connect(&c, port).await.expect("idle tls"));
        }
        let mut raw = Vec::new();
        for _ in 0..20 {
            raw.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("tcp"),
            );
        }
        // A client that made one request and keeps the connection idle.
        let mut kept = tls_support::connect(&c, port)
            .await
            .expect("kept-alive tls");
        let req = format!(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {admin}\r\n\r\n"
        );
        kept.write_all(req.as_bytes()).await.expect("request");
        let mut kbuf = Vec::new();
        assert_eq!(
            read_response(&mut kept, &mut kbuf).await.expect("response"),
            200
        );
        // A client sending its request head a byte at a time.
        let slow = tls_support::connect(&c, port).await.expect("slow tls");
        let (mut rd, mut wr) = tokio::io::split(slow);
        let start = Instant::now();
        let dripper = tokio::spawn(async move {
            let head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".repeat(1000);
            for b in head {
                if wr.write_all(&[b]).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let cut = tokio::spawn(async move {
            let mut b = [0u8; 256];
            loop {
                match rd.read(&mut b).await {
                    Ok(0) | Err(_) => return start.elapsed(),
                    Ok(_) => {}
                }
            }
        });
        // /healthz answers promptly meanwhile.
        let t = Instant::now();
        let port2 = port;
        let admin2 = admin.clone();
        let (code, _) = tokio::task::spawn_blocking(move || curl(port2, "/healthz", Some(&admin2)))
            .await
            .expect("curl");
        let took = t.elapsed();
        assert_eq!(
            code, 200,
            "healthz with 220 idle connections and a slow client"
        );
        assert!(took < Duration::from_secs(2), "healthz took {took:?}");
        // The slow client is cut off (header read deadline, 10 s).
        let at = tokio::time::timeout(Duration::from_secs(25), cut)
            .await
            .expect("the slow-header client was not cut off within 25 s")
            .expect("reader");
        dripper.abort();
        eprintln!("slow-header client cut off after {at:?}");
        assert!(at < Duration::from_secs(20), "{at:?}");
        // So are the idle ones (TLS handshake and header deadlines).
        for s in idle.iter_mut().take(10) {
            let mut b = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "idle TLS connection still open"
            );
        }
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "idle kept-alive connection still open"
        );
        for s in raw.iter_mut().take(5) {
            let mut b = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "handshake-less connection still open"
            );
        }
    });
    assert_eq!(curl(port, "/healthz", Some(&admin)).0, 200);
}

#[test]
fn serving_key_is_private_and_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let key = tmp.path().join("root/pki/kubelet.key");
    let mode = |p: &Path| std::fs::metadata(p).expect("key").permissions().mode() & 0o777;
    {
        let _agent = start_agent(&srv, tmp.path(), free_port(), &[]);
        assert_eq!(mode(&key), 0o600, "a new self-signed key");
    }
    // A key left readable by an older agent is fixed on start.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let _agent = start_agent(&srv, tmp.path(), free_port(), &[]);
    assert_eq!(mode(&key), 0o600, "an existing key");
}

#[test]
fn access_reviews_are_cached_per_ttl_and_carry_the_identity() {
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _agent = start_agent(
        &srv,
        tmp.path(),
        port,
        &["--authorization-webhook-cache-authorized-ttl", "4"],
    );
    let user = User::plain("alice").with_identity(
        "uid-alice-1",
        "authentication.kubernetes.io/credential-id",
        "JTI=abc",
    );
    srv.add_token("alice-token", user);
    srv.grant("alice", "get", "nodes", "proxy");
    let of_alice = || {
        srv.access_reviews()
            .into_iter()
            .filter(|s| s["user"] == "alice")
            .collect::<Vec<_>>()
    };
    let tr0 = srv.token_reviews();
    for _ in 0..20 {
        let (code, body) = curl(port, "/healthz", Some("alice-token"));
        assert_eq!((code, body.as_str()), (200, "ok"));
    }
    let sars = of_alice();
    assert_eq!(sars.len(), 1, "one SubjectAccessReview per TTL: {sars:?}");
    assert_eq!(srv.token_reviews() - tr0, 1, "one TokenReview per TTL");
    let s = &sars[0];
    assert_eq!(s["uid"], "uid-alice-1");
    assert_eq!(s["groups"], json!(["system:authenticated"]));
    assert_eq!(
        s["extra"]["authentication.kubernetes.io/credential-id"],
        json!(["JTI=abc"])
    );
    assert_eq!(s["resourceAttributes"]["subresource"], "proxy");
    assert_eq!(s["resourceAttributes"]["name"], "n1");
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(curl(port, "/healthz", Some("alice-token")).0, 200);
    assert_eq!(of_alice().len(), 2, "asked again once the TTL ran out");
    // A `get` grant on nodes/proxy does not open exec, attach or portForward (their
    // WebSocket form is a GET, authorized as `create`).
    for path in [
        "/exec/default/p/c?command=id&stdout=1",
        "/attach/default/p/c?stdout=1",
        "/portForward/default/p?ports=80",
    ] {
        let (code, body) = curl(port, path, Some("alice-token"));
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("verb=create"), "{body}");
    }
}

/// A bind mount of a namespace file, undone on drop.
struct BindMount(PathBuf);

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn spdy_header_bomb_ends_the_session_only() {
    use flate2::{Compress, Compression, FlushCompress};
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _agent = start_agent(&srv, tmp.path(), port, &[]);
    // A pod the node knows but does not run (its node selector does not match), with a
    // sandbox record pointing at a namespace this test made.
    let p = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "bomb", "namespace": "default"},
            "spec": {"nodeName": "n1", "nodeSelector": {"no-such-label": "x"},
                     "containers": [{"name": "c", "image": "127.0.0.1:1/x:1"}]}}))
        .expect("pod");
    let uid = p["metadata"]["uid"].as_str().expect("uid").to_string();
    let ns = hako_tests::netns::NetNs::new("kb").expect("netns");
    let sid = "bombsandbox-s0";
    let rec = tmp.path().join("root/pods").join(&uid);
    std::fs::create_dir_all(&rec).expect("pod dir");
    std::fs::write(
        rec.join("sandbox.json"),
        json!({"id": sid, "attempt": 0, "ips": []}).to_string(),
    )
    .expect("record");
    let sdir = tmp.path().join("run/sandboxes").join(sid);
    std::fs::create_dir_all(&sdir).expect("sandbox dir");
    std::fs::write(sdir.join("net"), b"").expect("net file");
    let st = Command::new("mount")
        .arg("--bind")
        .arg(ns.path())
        .arg(sdir.join("net"))
        .status()
        .expect("mount");
    assert!(st.success());
    let _mount = BindMount(sdir.join("net"));
    let admin = srv.admin_token();
    // Wait until the agent lists the pod.
    let end = Instant::now() + Duration::from_secs(20);
    while !curl(port, "/pods", Some(&admin)).1.contains(&uid) {
        assert!(Instant::now() < end, "the agent did not list the pod");
        std::thread::sleep(Duration::from_millis(200));
    }
    // 64 MiB of zeros: a zlib stream of about 64 KiB.
    let mut z = Compress::new(Compression::best(), true);
    let mut block = Vec::with_capacity(128 * 1024);
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        let before = z.total_in();
        z.compress_vec(&zeros, &mut block, FlushCompress::None)
            .expect("deflate");
        assert_eq!(z.total_in() - before, 1 << 20, "output room");
    }
    z.compress_vec(&[], &mut block, FlushCompress::Sync)
        .expect("flush");
    assert!(block.len() < 100 * 1024, "{}", block.len());
    let c = connector(&tmp.path().join("root/pki/kubelet.crt"));
    let rt = rt();
    let outcome = rt.block_on(async {
        let mut s = tls_support::connect(&c, port).await.expect("tls");
        let req = format!(
            "POST /portForward/default/bomb HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {admin}\r\n\
             Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\
             Content-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("upgrade request");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).await.expect("read head");
            assert_ne!(n, 0, "closed during the upgrade");
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // SYN_STREAM 1: stream id, associated id, priority, then the block.
        let mut body = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&block);
        let len = u32::try_from(body.len()).expect("len").to_be_bytes();
        let mut f = vec![0x80, 3, 0, 1, 0, len[1], len[2], len[3]];
        f.extend_from_slice(&body);
        s.write_all(&f).await.expect("syn");
        // The session must end: GOAWAY and/or EOF (or a reset), never a SYN_REPLY.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        (r.is_ok(), got)
    });
    let (ended, got) = outcome;
    assert!(
        ended,
        "the session stayed open after the header bomb ({got:?})"
    );
    assert!(
        got.is_empty() || got.starts_with(&[0x80, 3, 0, 7]),
        "only GOAWAY before the end: {got:?}"
    );
    // The agent is healthy and small.
    assert_eq!(curl(port, "/healthz", Some(&admin)).0, 200);
}
