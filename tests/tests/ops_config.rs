//! Config files and logs of the daemons, as operators of the kubelet and kube-proxy use them:
//! a KubeProxyConfiguration drives `hako-proxy` (mode, addresses, periods, logging), a
//! kubeadm-style KubeletConfiguration drives `hako-agent` (static pod path, cluster DNS and
//! domain, healthz address, logging), flags given on the command line override the files,
//! unsupported and unknown fields are warned about once, and logs written to a pipe or file
//! carry no ANSI escapes; `--log-format json` gives one JSON object per line and `-v N`
//! selects the levels.
#![cfg(feature = "root")]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hako_tests::agent::{target_bin, AgentEnv};
use hako_tests::netns::require_root;
use hako_tests::NetNs;

const OBJECTS: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: p, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.5]
  conditions: {ready: true}
";

const PROXY_CONFIG: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16
hostnameOverride: n1
healthzBindAddress: 127.0.0.1:12256
metricsBindAddress: 127.0.0.1:12249
clientConnection: {kubeconfig: '', qps: 0}
nftables: {minSyncPeriod: 100ms, syncPeriod: 30s}
iptables: {masqueradeAll: false, minSyncPeriod: 0s, syncPeriod: 0s}
conntrack: {maxPerCore: 32768, min: null}
surpriseField: 1
logging: {verbosity: 4, format: json}
";

/// A kubelet config as `kubeadm init` writes it, with the test's DNS, domain, healthz port
/// and static pod path, plus one field no version of the type has.
fn kubelet_config(static_pods: &Path, healthz_port: u16, verbosity: u8) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
authentication:
  anonymous:
    enabled: false
  webhook:
    cacheTTL: 0s
    enabled: true
  x509:
    clientCAFile: /etc/kubernetes/pki/ca.crt
authorization:
  mode: Webhook
  webhook:
    cacheAuthorizedTTL: 0s
    cacheUnauthorizedTTL: 0s
cgroupDriver: systemd
clusterDNS:
- 10.96.0.99
clusterDomain: example.local
containerRuntimeEndpoint: \"\"
cpuManagerReconcilePeriod: 0s
evictionPressureTransitionPeriod: 0s
fileCheckFrequency: 0s
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
httpCheckFrequency: 0s
imageMinimumGCAge: 0s
kind: KubeletConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: \"0\"
  verbosity: {verbosity}
memorySwap: {{}}
nodeStatusReportFrequency: 0s
nodeStatusUpdateFrequency: 0s
rotateCertificates: true
runtimeRequestTimeout: 0s
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
staticPodPath: {}
streamingConnectionIdleTimeout: 0s
syncFrequency: 0s
volumeStatsAggPeriod: 0s
unknownKnob: 3
",
        static_pods.display()
    )
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proxy() -> PathBuf {
    target_bin("hako-proxy", "HAKO_PROXY_BIN")
}

fn agent() -> PathBuf {
    target_bin("hako-agent", "HAKO_AGENT_BIN")
}

/// GET `path` on `addr` from inside `ns`: (status code, body), None when unreachable.
fn http_get(ns: &NetNs, addr: &str, path: &str) -> Option<(u16, String)> {
    let (addr, path) = (addr.to_string(), path.to_string());
    ns.run(move || {
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let code = resp.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, resp))
    })
    .ok()
    .flatten()
}

/// Polls `f` every 200 ms until it gives a value, `limit` at most.
fn wait<T>(what: &str, limit: Duration, log: &Path, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_no_escapes(log: &str) {
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in a log that is not a terminal:\n{log}"
    );
}

/// Every non-empty line parses as a JSON object with a level; returns them.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l:?}\n{log}"));
            assert!(v["level"].is_string(), "no level: {l}");
            v
        })
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn kube_proxy_configuration_drives_hako_proxy() {
    require_root();
    let ns = NetNs::new("opscfgp").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    std::fs::write(objects.join("web.yaml"), OBJECTS).unwrap();
    let cfg = dir.path().join("kube-proxy.yaml");
    std::fs::write(&cfg, PROXY_CONFIG).unwrap();
    let log_path = dir.path().join("proxy.log");
    let d = Daemon(
        ns.command(proxy().to_str().unwrap())
            .arg("--config")
            .arg(&cfg)
            .arg("--config-dir")
            .arg(&objects)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    // mode: nftables from the file.
    wait(
        "the service in the nf_tables table",
        Duration::from_secs(30),
        &log_path,
        || {
            ns.sh("nft list table ip hako 2>/dev/null || true")
                .unwrap()
                .contains("10.96.0.50")
                .then_some(())
        },
    );
    // The bind addresses from the file (the defaults would be 0.0.0.0:10256 and :10249).
    let (code, _) = wait(
        "healthz on 127.0.0.1:12256",
        Duration::from_secs(30),
        &log_path,
        || http_get(&ns, "127.0.0.1:12256", "/healthz"),
    );
    assert_eq!(code, 200);
    let (code, body) = http_get(&ns, "127.0.0.1:12249", "/metrics").expect("metrics address");
    assert_eq!(code, 200, "{body}");
    assert!(http_get(&ns, "127.0.0.1:10256", "/healthz").is_none());
    drop(d);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_no_escapes(&log);
    // logging.format json and logging.verbosity 4 from the file.
    let lines = json_lines(&log);
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "verbosity 4 shows debug events:\n{log}"
    );
    // Each note once.
    assert_eq!(count(&log, "surpriseField: unknown field"), 1, "{log}");
    assert_eq!(
        count(&log, "conntrack.maxPerCore: not supported"),
        1,
        "{log}"
    );

    // Flags override the file: iptables mode, text logs, -v 0 (no debug even with RUST_LOG).
    let out = ns
        .command(proxy().to_str().unwrap())
        .arg("--config")
        .arg(&cfg)
        .arg("--config-dir")
        .arg(&objects)
        .args([
            "--proxy-mode",
            "iptables",
            "--log-format",
            "text",
            "-v",
            "0",
            "--once",
        ])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert_no_escapes(&log);
    assert!(!log.contains("DEBUG"), "-v 0 hides debug events:\n{log}");
    assert!(log.contains(" INFO ") || log.contains("INFO"), "{log}");
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "--log-format text wins over logging.format json:\n{log}"
    );
    let nat = ns.sh("iptables-save -t nat").unwrap();
    assert!(
        nat.contains("-d 10.96.0.50/32") && nat.contains(":KUBE-SVC-"),
        "{nat}"
    );
    // Starting in iptables mode removed the nftables mode's table.
    assert!(!ns.sh("nft list tables").unwrap().contains("hako"));
    ns.sh("iptables-save >/dev/null").unwrap();
    let out = ns
        .command(proxy().to_str().unwrap())
        .arg("--cleanup")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn hako_proxy_verbosity_selects_levels() {
    require_root();
    let ns = NetNs::new("opscfgv").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), OBJECTS).unwrap();
    let run = |extra: &[&str]| {
        let out = ns
            .command(proxy().to_str().unwrap())
            .arg("--config-dir")
            .arg(dir.path())
            .args(["--proxy-mode", "nftables", "--once"])
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {log}");
        assert_no_escapes(&log);
        log
    };
    let quiet = run(&[]);
    assert!(!quiet.contains("DEBUG"), "default is info:\n{quiet}");
    let v4 = run(&["-v", "4"]);
    assert!(v4.contains("DEBUG"), "-v 4 shows debug:\n{v4}");
    assert!(!v4.contains("TRACE"), "{v4}");
    let json = run(&["--v=4", "--log-format", "json"]);
    let lines = json_lines(&json);
    assert!(lines.iter().any(|l| l["level"] == "DEBUG"), "{json}");
    ns.command(proxy().to_str().unwrap())
        .arg("--cleanup")
        .output()
        .unwrap();
}

#[test]
fn kubeadm_kubelet_configuration_loads_and_flags_override_it() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("manifests");
    std::fs::create_dir(&pods).unwrap();
    std::fs::write(
        pods.join("web.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default}\nspec:\n  containers: [{name: c, image: busybox}]\n",
    )
    .unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, kubelet_config(&pods, 11248, 0)).unwrap();
    let dry = |extra: &[&str]| {
        let out = std::process::Command::new(agent())
            .arg("--config")
            .arg(&cfg)
            .arg("--root-dir")
            .arg(dir.path().join("root"))
            .args(["--hostname-override", "n1", "--dry-run"])
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {stdout}{stderr}");
        assert_no_escapes(&stderr);
        (stdout, stderr)
    };
    // staticPodPath, clusterDNS and clusterDomain from the file.
    let (stdout, stderr) = dry(&[]);
    assert!(stdout.contains("pod default/web-n1"), "{stdout}");
    assert!(
        stdout.contains(
            "resolv.conf: search default.svc.example.local svc.example.local example.local | nameserver 10.96.0.99 |"
        ),
        "{stdout}"
    );
    // The unsupported and unknown fields, each warned once.
    for note in [
        "cgroupDriver: systemd is not supported",
        "rotateCertificates: not supported",
        "unknownKnob: unknown field",
    ] {
        assert_eq!(count(&stderr, note), 1, "{note}:\n{stderr}");
    }
    assert_eq!(
        stderr.lines().filter(|l| l.contains("WARN")).count(),
        3,
        "{stderr}"
    );
    // A flag given on the command line wins over the file.
    let (stdout, _) = dry(&[
        "--cluster-dns",
        "10.96.0.10",
        "--cluster-domain",
        "other.test",
    ]);
    assert!(
        stdout.contains(
            "search default.svc.other.test svc.other.test other.test | nameserver 10.96.0.10 |"
        ),
        "{stdout}"
    );
    // A file that is not a KubeletConfiguration is refused with its path.
    std::fs::write(&cfg, "apiVersion: v1\nkind: Pod\n").unwrap();
    let out = std::process::Command::new(agent())
        .arg("--config")
        .arg(&cfg)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expected kind KubeletConfiguration"),
        "{stderr}"
    );
}

#[test]
fn kubelet_configuration_drives_a_running_agent_with_json_logs() {
    let mut env = AgentEnv::new("opscfga");
    let cfg = env.tmp.path().join("config.yaml");
    // logging.verbosity 2 = info: the harness's RUST_LOG (hako_agent=debug) no longer applies.
    std::fs::write(&cfg, kubelet_config(&env.manifests, 11248, 2)).unwrap();
    env.args.extend([
        "--config".to_string(),
        cfg.display().to_string(),
        "--log-format".to_string(),
        "json".to_string(),
    ]);
    env.write_manifest(
        "dns.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: dns, namespace: default}}\nspec:\n  containers: [{{name: c, image: {}, command: [sleep, '3600']}}]\n",
            env.image("sleep")
        ),
    );
    env.start();
    env.wait_running("dns", Duration::from_secs(120));
    // clusterDomain from the file; clusterDNS from the harness's --cluster-dns flag.
    let out = env.cli(&["exec", "dns-node1", "--", "cat", "/etc/resolv.conf"]);
    let resolv = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert!(
        resolv.contains("search default.svc.example.local"),
        "{resolv}"
    );
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(!resolv.contains("10.96.0.99"), "{resolv}");
    // healthzBindAddress + healthzPort from the file.
    let log_path = env.tmp.path().join("agent-1.log");
    let (code, body) = wait(
        "healthz on 127.0.0.1:11248",
        Duration::from_secs(30),
        &log_path,
        || http_get(&env.ns, "127.0.0.1:11248", "/healthz"),
    );
    assert_eq!(code, 200, "{body}");
    let log = env.agent_log();
    assert_no_escapes(&log);
    let lines = json_lines(&log);
    assert!(
        !lines.iter().any(|l| l["level"] == "DEBUG"),
        "logging.verbosity 2 hides debug events:\n{log}"
    );
    assert!(lines.iter().any(|l| l["level"] == "INFO"), "{log}");
    assert_eq!(
        count(&log, "cgroupDriver: systemd is not supported"),
        1,
        "{log}"
    );
    assert_eq!(count(&log, "unknownKnob: unknown field"), 1, "{log}");
}
