//! Agent root tests: probes (exec, httpGet over HTTP and HTTPS, tcpSocket, grpc; startup,
//! liveness, readiness) and their consequences; native sidecars; postStart/preStop hooks
//! (exec, httpGet, sleep) and the termination grace; the agent's metrics.
#![cfg(feature = "root")]

use hako_tests::agent::{metric, AgentEnv};
use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn ready(env: &AgentEnv, pod: &str) -> Option<bool> {
    let r = env.record(pod)?;
    let c = r["pod"]["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    Some(c["status"] == "True")
}

fn has_event(env: &AgentEnv, pod: &str, reason: &str, text: &str) -> bool {
    env.events(pod)
        .iter()
        .any(|(r, m)| r == reason && m.contains(text))
}

#[test]
fn liveness_exec_restarts_and_startup_probe_gates_and_kills() {
    let mut env = AgentEnv::new("alive");
    let img = env.image("sleep");
    env.write_manifest(
        "live.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: live}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "touch /tmp/healthy; sleep 2; rm /tmp/healthy; exec sleep 3600"]
    livenessProbe:
      exec: {{command: [test, -f, /tmp/healthy]}}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {{name: slowstart}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "exec sleep 3600"]
    startupProbe:
      exec: {{command: [test, -f, /tmp/started]}}
      periodSeconds: 1
      failureThreshold: 3
    livenessProbe:
      exec: {{command: [sh, -c, "echo liveness ran > /proc/1/fd/1; exit 1"]}}
      periodSeconds: 1
"#
        ),
    );
    env.start();
    env.wait_for("liveness restart", T, |e| {
        let s = e.container_status("live", "c")?;
        (s["restartCount"].as_i64()? >= 1).then_some(())
    });
    assert!(has_event(
        &env,
        "live",
        "Unhealthy",
        "Liveness probe failed"
    ));
    assert!(has_event(
        &env,
        "live",
        "Killing",
        "failed liveness probe, will be restarted"
    ));
    // The startup probe never passes: the container is restarted, liveness never ran.
    env.wait_for("startup probe restart", T, |e| {
        let s = e.container_status("slowstart", "c")?;
        (s["restartCount"].as_i64()? >= 1).then_some(())
    });
    assert!(has_event(
        &env,
        "slowstart",
        "Unhealthy",
        "Startup probe failed"
    ));
    assert!(has_event(
        &env,
        "slowstart",
        "Killing",
        "failed startup probe"
    ));
    let s = env.container_status("slowstart", "c").unwrap();
    assert_eq!(s["started"], false, "{s}");
    let logs = env.cli(&["logs", "slowstart-node1"]);
    assert!(!String::from_utf8_lossy(&logs.stdout).contains("liveness ran"));
    assert!(!has_event(&env, "slowstart", "Unhealthy", "Liveness"));
}

#[test]
fn readiness_http_and_tcp_flip_ready() {
    let mut env = AgentEnv::new("aready");
    let img = env.image("sleep");
    env.write_manifest(
        "web.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "mkdir -p /www; exec httpd -f -p 8080 -h /www"]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe:
      httpGet: {{path: /ready, port: http}}
      periodSeconds: 1
      failureThreshold: 1
    livenessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: tcp}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "mkdir -p /www; exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {{port: 9999}}
      periodSeconds: 1
"#
        ),
    );
    env.start();
    env.wait_for("web running, not ready", T, |e| {
        (e.phase("web")? == "Running"
            && has_event(
                e,
                "web",
                "Unhealthy",
                "Readiness probe failed: HTTP probe failed with statuscode: 404",
            ))
        .then_some(())
    });
    assert_eq!(ready(&env, "web"), Some(false));
    let out = env.cli(&[
        "exec",
        "web-node1",
        "--",
        "sh",
        "-c",
        "echo ok > /www/ready",
    ]);
    assert!(out.status.success(), "{out:?}");
    env.wait_for("web Ready", T, |e| ready(e, "web").filter(|r| *r));
    let out = env.cli(&["exec", "web-node1", "--", "rm", "/www/ready"]);
    assert!(out.status.success(), "{out:?}");
    env.wait_for("web not Ready again", T, |e| {
        ready(e, "web").filter(|r| !*r)
    });
    // tcp liveness passes: never restarted.
    let s = env.container_status("web", "c").unwrap();
    assert_eq!(s["restartCount"], 0, "{s}");
    assert!(!has_event(&env, "web", "Killing", "liveness"));
    // tcp readiness on a closed port: running but never ready.
    env.wait_for("tcp readiness failure", T, |e| {
        has_event(e, "tcp", "Unhealthy", "Readiness probe failed: dial tcp").then_some(())
    });
    assert_eq!(env.phase("tcp").as_deref(), Some("Running"));
    assert_eq!(ready(&env, "tcp"), Some(false));
    let out = env.cli(&["get", "pods"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("tcp-node1") && l.contains("0/1")),
        "{text}"
    );
    // AGE comes from the start time (static pods have no creationTimestamp).
    assert!(
        text.lines()
            .filter(|l| l.contains("-node1"))
            .all(|l| !l.contains("<unknown>")),
        "{text}"
    );
    // The workers feed the metrics server.
    let m = env.metrics();
    let v = |s: &str| metric(&m, s).unwrap_or(-1.0);
    assert_eq!(v("kubelet_running_pods"), 2.0, "{m}");
    assert_eq!(
        v("kubelet_running_containers{container_state=\"running\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        v("kubelet_started_containers_total{container_type=\"container\"}"),
        2.0,
        "{m}"
    );
    for (kind, result) in [
        ("Readiness", "failed"),
        ("Readiness", "successful"),
        ("Liveness", "successful"),
    ] {
        let s = format!("prober_probe_total{{probe_type=\"{kind}\",result=\"{result}\"}}");
        assert!(v(&s) >= 1.0, "{s} in\n{m}");
    }
    assert_eq!(v("kubelet_pod_start_duration_seconds_count"), 2.0, "{m}");
    assert_eq!(
        v("hako_agent_image_pulls_total{result=\"pulled\"}").max(0.0)
            + v("hako_agent_image_pulls_total{result=\"present\"}").max(0.0),
        2.0,
        "{m}"
    );
    assert!(v("kubelet_pod_worker_duration_seconds_count") >= 2.0, "{m}");
}

/// A canned HTTP/2 gRPC health response (SETTINGS, HEADERS :status 200, DATA with status).
fn grpc_pod(name: &str, img: &str, status: u8) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command:
    - sh
    - -c
    - |
      printf '\000\000\000\004\000\000\000\000\000\000\000\001\001\004\000\000\000\001\210\000\000\007\000\000\000\000\000\001\000\000\000\000\002\010\00{status}' > /tmp/resp
      exec nc -ll -p 50051 -e sh -c 'cat /tmp/resp; sleep 1'
    readinessProbe:
      grpc: {{port: 50051}}
      periodSeconds: 1
      timeoutSeconds: 2
"#
    )
}

#[test]
fn grpc_health_probe() {
    let mut env = AgentEnv::new("agrpc");
    let img = env.image("sleep");
    env.write_manifest("serving.yaml", &grpc_pod("serving", &img, 1));
    env.write_manifest("notserving.yaml", &grpc_pod("notserving", &img, 2));
    env.start();
    env.wait_running("serving", T);
    env.wait_for("NOT_SERVING reported", T, |e| {
        has_event(
            e,
            "notserving",
            "Unhealthy",
            "service unhealthy (responded with status 2)",
        )
        .then_some(())
    });
    assert_eq!(ready(&env, "notserving"), Some(false));
}

fn log_lines(env: &AgentEnv, pod: &str, c: &str) -> Vec<(DateTime<Utc>, String)> {
    let prefix = format!("default_{pod}-node1_");
    let dir = std::fs::read_dir(&env.logs)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join(c).join("0.log"))
        .unwrap();
    std::fs::read_to_string(dir)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(4, ' ');
            let t = DateTime::parse_from_rfc3339(it.next()?)
                .ok()?
                .with_timezone(&Utc);
            Some((t, it.nth(2)?.to_string()))
        })
        .collect()
}

fn at(lines: &[(DateTime<Utc>, String)], text: &str) -> DateTime<Utc> {
    lines
        .iter()
        .find(|(_, l)| l == text)
        .unwrap_or_else(|| panic!("{text:?} not in {lines:?}"))
        .0
}

fn status_time(s: &Value, path: &[&str]) -> DateTime<Utc> {
    let mut v = s;
    for p in path {
        v = &v[p];
    }
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("{path:?} in {s}")))
        .unwrap()
        .with_timezone(&Utc)
}

#[test]
fn sidecars_hooks_and_termination_order() {
    let mut env = AgentEnv::new("aside");
    let img = env.image("sleep");
    let trap = |name: &str| {
        format!("trap 'echo stopping {name}; exit 0' TERM; echo started {name}; while true; do sleep 0.1; done")
    };
    env.write_manifest(
        "side.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: side}}
spec:
  terminationGracePeriodSeconds: 10
  initContainers:
  - name: proxy
    image: "{img}"
    restartPolicy: Always
    command: [sh, -c, "{proxy}"]
  - name: setup
    image: "{img}"
    command: [sh, -c, "sleep 1; echo setup done"]
  containers:
  - name: main
    image: "{img}"
    command: [sh, -c, "{main}"]
    lifecycle:
      postStart:
        exec: {{command: [sh, -c, "echo poststart > /proc/1/fd/1"]}}
      preStop:
        exec: {{command: [sh, -c, "echo prestop > /proc/1/fd/1; sleep 1"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: stubborn}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "trap '' TERM; while true; do sleep 0.1; done"]
---
apiVersion: v1
kind: Pod
metadata: {{name: badhook}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "exec sleep 3600"]
    lifecycle:
      postStart:
        exec: {{command: [sh, -c, "exit 7"]}}
"#,
            proxy = trap("proxy"),
            main = trap("main"),
        ),
    );
    env.start();
    env.wait_running("side", T);
    env.wait_running("stubborn", T);
    // Sidecar started before the next init container; main after it finished.
    let proxy = env.container_status("side", "proxy").unwrap();
    let setup = env.container_status("side", "setup").unwrap();
    let main = env.container_status("side", "main").unwrap();
    assert!(
        proxy["state"]["running"].is_object(),
        "sidecar keeps running: {proxy}"
    );
    assert!(
        status_time(&setup, &["state", "terminated", "startedAt"])
            >= status_time(&proxy, &["state", "running", "startedAt"])
    );
    assert!(
        status_time(&main, &["state", "running", "startedAt"])
            >= status_time(&setup, &["state", "terminated", "finishedAt"])
    );
    assert_eq!(
        env.record("side").unwrap()["pod"]["status"]["containerStatuses"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // postStart ran.
    env.wait_for("poststart line", T, |e| {
        log_lines(e, "side", "main")
            .iter()
            .any(|(_, l)| l == "poststart")
            .then_some(())
    });
    // A failing postStart kills the container (and it is restarted).
    env.wait_for("FailedPostStartHook", T, |e| {
        has_event(e, "badhook", "FailedPostStartHook", "PostStartHook failed").then_some(())
    });

    // Termination: preStop, then SIGTERM to main; the sidecar only after main is gone.
    let t0 = Instant::now();
    env.remove_manifest("side.yaml");
    env.wait_for("pods removed", T, |e| {
        (e.record("side").is_none() && e.record("stubborn").is_none()).then_some(())
    });
    let main_log = log_lines(&env, "side", "main");
    let proxy_log = log_lines(&env, "side", "proxy");
    let prestop = at(&main_log, "prestop");
    let main_stop = at(&main_log, "stopping main");
    let proxy_stop = at(&proxy_log, "stopping proxy");
    assert!(
        main_stop >= prestop + k8s_openapi::chrono::Duration::milliseconds(900),
        "{main_log:?}"
    );
    assert!(
        proxy_stop >= main_stop,
        "main {main_stop} proxy {proxy_stop}"
    );
    // The stubborn container ignores SIGTERM: killed at its 2 s grace period, not before.
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(
        env.shim_containers().iter().all(|c| !c.contains("main")),
        "{:?}",
        env.shim_containers()
    );
}

/// A process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_probes_and_hooks_and_sleep_hooks() {
    let mut env = AgentEnv::new("ahttps");
    let img = env.image("sleep");
    // A TLS server with a self-signed certificate on the agent's loopback (openssl s_server
    // answers every GET with 200).
    let dir = env.tmp.path().to_path_buf();
    let gen = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=probe.test", "-keyout"])
        .arg(dir.join("k.pem"))
        .arg("-out")
        .arg(dir.join("c.pem"))
        .output()
        .expect("openssl");
    assert!(gen.status.success(), "{gen:?}");
    let mut cmd = std::process::Command::new("openssl");
    cmd.args([
        "s_server",
        "-accept",
        "127.0.0.1:8443",
        "-www",
        "-quiet",
        "-cert",
    ])
    .arg(dir.join("c.pem"))
    .arg("-key")
    .arg(dir.join("k.pem"))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let _server = KillOnDrop(env.ns.run(move || cmd.spawn()).unwrap().expect("s_server"));
    env.write_manifest(
        "tls.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: tls}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "exec sleep 3600"]
    readinessProbe:
      httpGet: {{scheme: HTTPS, host: 127.0.0.1, port: 8443, path: /ready}}
      periodSeconds: 1
    lifecycle:
      postStart:
        httpGet: {{scheme: HTTPS, host: 127.0.0.1, port: 8443, path: /started}}
---
apiVersion: v1
kind: Pod
metadata: {{name: plain}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      httpGet: {{scheme: HTTPS, port: 8080}}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: sleeper}}
spec:
  terminationGracePeriodSeconds: 10
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "trap 'echo got TERM; exit 0' TERM; echo started; while true; do sleep 0.1; done"]
    lifecycle:
      postStart:
        sleep: {{seconds: 2}}
      preStop:
        sleep: {{seconds: 2}}
"#
        ),
    );
    env.start();
    // postStart sleep: the pod is Running only 2 s after its container started.
    let (seen, rec) = env.wait_for("sleeper Running", T, |e| {
        let r = e.record("sleeper")?;
        (r["pod"]["status"]["phase"] == "Running").then(|| (Utc::now(), r))
    });
    let started = status_time(
        &rec["pod"]["status"]["containerStatuses"][0],
        &["state", "running", "startedAt"],
    );
    assert!(
        seen - started >= k8s_openapi::chrono::Duration::milliseconds(1800),
        "Running seen {seen}, container started {started}"
    );
    // HTTPS readiness and postStart against a self-signed certificate pass.
    env.wait_running("tls", T);
    assert!(!has_event(&env, "tls", "FailedPostStartHook", ""));
    let s = env.container_status("tls", "c").unwrap();
    assert_eq!(s["restartCount"], 0, "{s}");
    // HTTPS against a plain HTTP server fails the probe.
    env.wait_for("HTTPS probe failure", T, |e| {
        has_event(
            e,
            "plain",
            "Unhealthy",
            "Readiness probe failed: Get \"https://",
        )
        .then_some(())
    });
    assert_eq!(ready(&env, "plain"), Some(false));
    // preStop sleep: SIGTERM comes 2 s after the deletion is seen.
    let removed = Utc::now();
    env.remove_manifest("tls.yaml");
    env.wait_for("sleeper removed", T, |e| {
        e.record("sleeper").is_none().then_some(())
    });
    let lines = log_lines(&env, "sleeper", "c");
    let term = at(&lines, "got TERM");
    assert!(
        term - removed >= k8s_openapi::chrono::Duration::milliseconds(1900),
        "SIGTERM at {term}, manifest removed at {removed}: {lines:?}"
    );
    assert!(
        term - removed < k8s_openapi::chrono::Duration::seconds(8),
        "{term} {removed}"
    );
}

/// Probes run in tasks of their own (the kubelet's prober workers): a readiness probe that
/// takes 37 s does not hold up the pod's deletion, which finishes within its 1 s grace period.
#[test]
fn a_slow_probe_does_not_hold_up_the_pod() {
    let mut env = AgentEnv::new("pslow");
    let img = env.image("sleep");
    env.write_manifest(
        "slow.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: slow}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{img}\"\n    readinessProbe: {{exec: {{command: [sleep, \"37\"]}}, periodSeconds: 1, timeoutSeconds: 60}}\n"),
    );
    env.start();
    // Running, not ready: the first probe has not finished.
    env.wait_for("pod Running", Duration::from_secs(60), |e| {
        (e.phase("slow").as_deref() == Some("Running")).then_some(())
    });
    // The first probe is running (a `sleep 37` in the container).
    env.wait_for("the probe to run", Duration::from_secs(30), |_| {
        sleep_37_runs().then_some(())
    });
    let t0 = Instant::now();
    env.remove_manifest("slow.yaml");
    env.wait_for(
        "pod removed while its probe runs",
        Duration::from_secs(15),
        |e| e.records().is_empty().then_some(()),
    );
    eprintln!(
        "pod removed {:.1} s after its manifest, its 37 s probe still running",
        t0.elapsed().as_secs_f64()
    );
    // The probe's process went with the container.
    env.wait_for(
        "the probe's process to be gone",
        Duration::from_secs(10),
        |_| (!sleep_37_runs()).then_some(()),
    );
}

fn sleep_37_runs() -> bool {
    proc_with_cmdline("sleep\x0037\x00")
}

/// A pod deleted while a postStart hook runs does not wait for the hook: the container is
/// stopped (and the hook's process with it) within the grace period.
#[test]
fn deletion_does_not_wait_for_a_post_start_hook() {
    let mut env = AgentEnv::new("phook");
    let img = env.image("sleep");
    env.write_manifest(
        "hook.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: hook}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{img}\"\n    lifecycle: {{postStart: {{exec: {{command: [sleep, \"38\"]}}}}}}\n"),
    );
    env.start();
    env.wait_for("the hook to run", Duration::from_secs(60), |_| {
        proc_with_cmdline("sleep\x0038\x00").then_some(())
    });
    let t0 = Instant::now();
    env.remove_manifest("hook.yaml");
    env.wait_for(
        "pod removed during its postStart hook",
        Duration::from_secs(15),
        |e| e.agent_log().contains("pod removed").then_some(()),
    );
    eprintln!(
        "pod removed {:.1} s after its manifest, during its 38 s postStart hook",
        t0.elapsed().as_secs_f64()
    );
    env.wait_for(
        "the hook's process to be gone",
        Duration::from_secs(10),
        |_| (!proc_with_cmdline("sleep\x0038\x00")).then_some(()),
    );
}

fn proc_with_cmdline(cmdline: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| std::fs::read_to_string(p.path().join("cmdline")).ok())
        .any(|c| c == cmdline)
}
