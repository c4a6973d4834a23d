//! Agent root tests of container logs: bytes pass through exactly (invalid UTF-8, a
//! multibyte character split across CRI `P` records), and `logs -f` follows a fast logger
//! across size rotations with `--container-log-max-files` respected, ending when it exits.
#![cfg(feature = "root")]

use hako_tests::agent::{target_bin, AgentEnv};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// Kills and reaps a spawned CLI on drop (also when an assertion fails).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminated(env: &AgentEnv, pod: &str, c: &str) {
    env.wait_for(&format!("{pod}/{c} terminated"), T, |e| {
        let s = e.container_status(pod, c)?;
        s["state"]["terminated"].is_object().then_some(())
    });
}

fn cli_logs(env: &AgentEnv, args: &[&str]) -> Vec<u8> {
    let out = env.cli(&[&["logs"], args].concat());
    assert!(
        out.status.success(),
        "logs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn logs_pass_invalid_utf8_and_split_characters_through_exactly() {
    let mut env = AgentEnv::new("alograw");
    let img = env.image("sleep");
    // 16383 'a' then a 4-byte character: the shim cuts lines at 16 KiB, so its first byte
    // ends one `P` record and the other three start the next.
    env.write_manifest(
        "raw.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: raw}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, 'printf "bad \377 byte\n"; head -c 16383 /dev/zero | tr "\0" a; printf "\360\237\230\200!\n"; printf "caf\303\251\n"']
"#
        ),
    );
    env.start();
    terminated(&env, "raw", "c");
    let mut want = b"bad \xff byte\n".to_vec();
    want.extend(std::iter::repeat_n(b'a', 16383));
    want.extend_from_slice(b"\xf0\x9f\x98\x80!\ncaf\xc3\xa9\n");
    let got = cli_logs(&env, &["raw-node1"]);
    assert!(
        got == want,
        "got {} bytes, want {}; head {:?} tail {:?}",
        got.len(),
        want.len(),
        String::from_utf8_lossy(&got[..got.len().min(40)]),
        String::from_utf8_lossy(&got[got.len().saturating_sub(40)..])
    );
    // The file really holds the character split across two records.
    let dir = env
        .logs
        .read_dir()
        .expect("log dir")
        .next()
        .expect("pod dir");
    let log = std::fs::read(dir.expect("entry").path().join("c").join("0.log")).expect("0.log");
    assert!(
        log.windows(3).any(|w| w == b"a\xf0\n"),
        "no record ends inside the character"
    );
    // tail counts whole lines: the joined line comes out whole.
    let tail = cli_logs(&env, &["raw-node1", "--tail", "2"]);
    assert_eq!(tail, want[11..].to_vec());
    let limited = cli_logs(&env, &["raw-node1", "--limit-bytes", "7"]);
    assert_eq!(limited, b"bad \xff b".to_vec());
}

fn log_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn follow_goes_on_across_rotation_and_ends_when_the_container_exits() {
    let mut env = AgentEnv::new("alogrot");
    env.args.extend(
        [
            "--container-log-max-size",
            "2Ki",
            "--container-log-max-files",
            "3",
        ]
        .map(String::from),
    );
    let img = env.image("sleep");
    env.write_manifest(
        "rot.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: rot}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, 'sleep 2; i=0; while [ $i -lt 400 ]; do echo "line $i"; i=$((i+1)); sleep 0.01; done']
"#
        ),
    );
    env.start();
    env.wait_running("rot", T);
    let mut follow = Reap(
        Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
            .args(["--eviction-hard", hako_tests::agent::TEST_EVICTION_HARD])
            .arg("--root-dir")
            .arg(&env.root)
            .arg("--run-dir")
            .arg(&env.run)
            .arg("--pod-log-dir")
            .arg(&env.logs)
            .arg("--shim-binary")
            .arg(target_bin("hako-shim", "HAKO_SHIM_BIN"))
            .args(["logs", "rot-node1", "-f"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn logs -f"),
    );
    let mut stdout = follow.0.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let pod_dir: PathBuf = env.wait_for("pod log dir", T, |e| {
        e.logs
            .read_dir()
            .ok()?
            .next()?
            .ok()
            .map(|d| d.path().join("c"))
    });
    // While it runs: never more than 3 files; it does rotate.
    let deadline = Instant::now() + T;
    let mut max_seen = 0;
    let mut rotated_seen = false;
    let status = loop {
        let files = log_files(&pod_dir);
        max_seen = max_seen.max(files.len());
        rotated_seen |= files.iter().any(|f| f.starts_with("0.log."));
        if let Some(st) = follow.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "logs -f did not end after the container exited; files {files:?}\n{}",
            hako_tests::agent::tail(&env.agent_log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().expect("reader");
    let mut err = String::new();
    if let Some(mut e) = follow.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "logs -f: {status:?} {err}");
    terminated(&env, "rot", "c");
    let text = String::from_utf8_lossy(&out);
    let want: String = (0..400).map(|i| format!("line {i}\n")).collect();
    assert!(
        text == want,
        "followed output differs: {} lines, first {:?}, last {:?}",
        text.lines().count(),
        text.lines().next(),
        text.lines().last()
    );
    assert!(rotated_seen, "no rotation happened");
    assert!(max_seen <= 3, "saw {max_seen} log files (max-files 3)");
    let files = log_files(&pod_dir);
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(
        files.iter().all(|f| f == "0.log"
            || f.strip_prefix("0.log.")
                .is_some_and(|s| s.len() >= 15 && s.as_bytes()[8] == b'-')),
        "{files:?}"
    );
}

/// Body bytes and HTTP code of a GET to the kubelet API through curl (`-k`: self-signed).
fn api_get(port: u16, path: &str, token: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sk", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let s = out.stdout;
    let nl = s.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&s[(nl + 1).min(s.len())..])
        .trim()
        .parse()
        .unwrap_or(0);
    (code, s[..nl].to_vec())
}

#[test]
fn kubelet_api_container_logs_are_byte_exact() {
    use hako_tests::apiserver::{ApiServer, User};
    let srv = ApiServer::start().expect("fixture");
    let tmp = tempfile::tempdir().expect("tmp");
    let kc = tmp.path().join("kubeconfig");
    srv.write_kubeconfig(&kc, &srv.node_token("n1"))
        .expect("kubeconfig");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let logs = tmp.path().join("logs");
    let _agent = Reap(
        Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
            .args(["--eviction-hard", hako_tests::agent::TEST_EVICTION_HARD])
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--hostname-override", "n1", "--node-ip", "192.0.2.10"])
            .args(["--kubelet-address", "127.0.0.1"])
            .args(["--kubelet-port", &port.to_string()])
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
    let p = srv
        .create(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "raw", "namespace": "default"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "127.0.0.1:1/x:1"}]}}))
        .expect("pod");
    let uid = p["metadata"]["uid"].as_str().expect("uid").to_string();
    let dir = logs.join(format!("default_raw_{uid}/c"));
    std::fs::create_dir_all(&dir).expect("log dir");
    // An invalid byte; a 4-byte character split across a P record and its F record, with a
    // stderr line between them; a rotated file that is not read.
    let mut log = Vec::new();
    log.extend_from_slice(b"2026-11-28T10:00:00.000000001Z stdout F bad \xff byte\n");
    log.extend_from_slice(b"2026-11-28T10:00:01.000000001Z stdout P smile \xf0\x9f\n");
    log.extend_from_slice(b"2026-11-28T10:00:01.000000002Z stderr F err\n");
    log.extend_from_slice(b"2026-11-28T10:00:01.000000003Z stdout F \x98\x80!\n");
    std::fs::write(dir.join("0.log"), &log).expect("log");
    std::fs::write(
        dir.join("0.log.20261128-095959"),
        b"2026-11-28T09:59:59.000000001Z stdout F old\n",
    )
    .expect("rotated");
    srv.add_token("alice-token", User::plain("alice"));
    srv.grant("alice", "get", "nodes", "proxy");
    let path = "/containerLogs/default/raw/c";
    let end = Instant::now() + T;
    let (code, body) = loop {
        let r = api_get(port, path, "alice-token");
        if (r.0 != 404 && r.0 != 0) || Instant::now() > end {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        body,
        b"bad \xff byte\nsmile \xf0\x9ferr\n\x98\x80!\n".to_vec(),
        "records pass through as written"
    );
    let (_, body) = api_get(port, &format!("{path}?tailLines=2"), "alice-token");
    assert_eq!(
        body,
        b"err\nsmile \xf0\x9f\x98\x80!\n".to_vec(),
        "tail joins lines"
    );
    let (_, body) = api_get(
        port,
        &format!("{path}?sinceTime=2026-11-28T10:00:01Z&tailLines=9&timestamps=true"),
        "alice-token",
    );
    assert_eq!(
        body,
        b"2026-11-28T10:00:01.000000002Z err\n2026-11-28T10:00:01.000000001Z smile \xf0\x9f\x98\x80!\n"
            .to_vec()
    );
    let (_, body) = api_get(port, &format!("{path}?limitBytes=5"), "alice-token");
    assert_eq!(body, b"bad \xff".to_vec());
    // follow on a container that no runtime runs: everything, then the end.
    let (code, body) = api_get(port, &format!("{path}?follow=true"), "alice-token");
    assert_eq!(code, 200);
    assert_eq!(
        body,
        b"bad \xff byte\nsmile \xf0\x9ferr\n\x98\x80!\n".to_vec()
    );
}
