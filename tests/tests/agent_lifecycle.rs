//! Agent root tests: init container order, env and Downward API, QoS and oom_score_adj,
//! logs and exec, ImagePullBackOff, malformed manifests, CrashLoopBackOff timing, OOMKilled.
#![cfg(feature = "root")]

use hako_tests::agent::{metric, AgentEnv};
use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("no time in {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

#[test]
fn init_containers_run_in_order_before_the_main_container() {
    let mut env = AgentEnv::new("ainit");
    let img = env.image("sleep");
    env.write_manifest(
        "init.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: init}}
spec:
  terminationGracePeriodSeconds: 1
  initContainers:
  - {{name: first, image: "{img}", command: [sh, -c, "sleep 1; echo first done"]}}
  - {{name: second, image: "{img}", command: [sh, -c, "sleep 1; echo second done"]}}
  containers:
  - {{name: main, image: "{img}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ticker}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: c, image: "{img}", command: [sh, -c, "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"]}}
"#
        ),
    );
    env.start();
    env.wait_running("init", T);
    let first = env.container_status("init", "first").unwrap();
    let second = env.container_status("init", "second").unwrap();
    let main = env.container_status("init", "main").unwrap();
    let t1 = &first["state"]["terminated"];
    let t2 = &second["state"]["terminated"];
    assert_eq!(t1["reason"], "Completed", "{first}");
    assert_eq!(t2["exitCode"], 0, "{second}");
    assert!(
        time(&t2["startedAt"]) >= time(&t1["finishedAt"]),
        "{first}\n{second}"
    );
    assert!(
        time(&main["state"]["running"]["startedAt"]) >= time(&t2["finishedAt"]),
        "{second}\n{main}"
    );
    // describe shows the events.
    let out = env.cli(&["describe", "pod", "init-node1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Pulled",
        "Created",
        "Started container first",
        "Started container main",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    // logs -f follows a container that keeps writing.
    env.wait_running("ticker", T);
    let mut follow = env.cli_spawn(&["logs", "ticker-node1", "-f"]);
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 8 {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen.len() >= 8, "{seen:?}");
    let n: Vec<u32> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    // logs of an init container
    let out = env.cli(&["logs", "init-node1", "-c", "second"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "second done\n");
    let conds = env.record("init").unwrap()["pod"]["status"]["conditions"].clone();
    let cond = |t: &str| {
        conds
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .map(|c| c["status"].clone())
    };
    for t in ["Initialized", "Ready", "ContainersReady", "PodScheduled"] {
        assert_eq!(cond(t), Some(Value::from("True")), "{t}: {conds}");
    }
}

#[test]
fn env_downward_api_configmap_secret_and_exec() {
    let mut env = AgentEnv::new("aenv");
    let img = env.image("sleep");
    env.write_manifest(
        "env.yaml",
        &format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{color: blue, size: large}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata:
  name: envpod
  labels: {{app: demo}}
  annotations: {{note: hello}}
spec:
  terminationGracePeriodSeconds: 1
  serviceAccountName: robot
  containers:
  - name: c
    image: "{img}"
    command: [sh, -c, "echo started $(LATE); exec sleep 3600"]
    resources: {{limits: {{memory: 64Mi}}, requests: {{memory: 32Mi}}}}
    envFrom:
    - {{prefix: CM_, configMapRef: {{name: settings}}}}
    env:
    - {{name: GREETING, value: "hi $(POD_NAME)"}}
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: LATE, value: "name=$(POD_NAME)"}}
    - {{name: POD_NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
    - {{name: POD_UID, valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}}}
    - {{name: APP, valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['app']"}}}}}}
    - {{name: NOTE, valueFrom: {{fieldRef: {{fieldPath: "metadata.annotations['note']"}}}}}}
    - {{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
    - {{name: SA, valueFrom: {{fieldRef: {{fieldPath: spec.serviceAccountName}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: HOST_IP, valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}}}
    - {{name: MEM_LIMIT, valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}}}
    - {{name: COLOR, valueFrom: {{configMapKeyRef: {{name: settings, key: color}}}}}}
    - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
"#
        ),
    );
    env.start();
    let rec = env.wait_running("envpod", T);
    let st = &rec["pod"]["status"];
    let pod_ip = st["podIP"].as_str().unwrap().to_string();
    assert!(pod_ip.starts_with("10.88.0."), "{st}");
    let uid = rec["pod"]["metadata"]["uid"].as_str().unwrap().to_string();
    let out = env.cli(&["exec", "envpod-node1", "--", "env"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let vars: std::collections::BTreeMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).collect();
    for (k, v) in [
        ("GREETING", "hi $(POD_NAME)"),
        ("POD_NAME", "envpod-node1"),
        ("LATE", "name=envpod-node1"),
        ("POD_NS", "default"),
        ("POD_UID", uid.as_str()),
        ("APP", "demo"),
        ("NOTE", "hello"),
        ("NODE", "node1"),
        ("SA", "robot"),
        ("POD_IP", pod_ip.as_str()),
        ("HOST_IP", "10.88.0.1"),
        ("MEM_LIMIT", "64"),
        ("COLOR", "blue"),
        ("CM_color", "blue"),
        ("CM_size", "large"),
        ("PASSWORD", "s3cret"),
        ("HOSTNAME", "envpod-node1"),
    ] {
        assert_eq!(vars.get(k).copied(), Some(v), "{k} in\n{text}");
    }
    // command $(VAR) expansion, seen in the log
    let out = env.cli(&["logs", "envpod-node1"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "started name=envpod-node1\n"
    );
    // The pod's own hostname, /etc/hosts and resolv.conf.
    let out = env.cli(&[
        "exec",
        "envpod-node1",
        "--",
        "sh",
        "-c",
        "hostname; cat /etc/resolv.conf; grep envpod /etc/hosts",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.starts_with("envpod-node1\n"), "{text}");
    assert!(text.contains("nameserver 10.96.0.10"), "{text}");
    assert!(
        text.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{text}"
    );
    assert!(text.contains("options ndots:5"), "{text}");
    assert!(text.contains(&format!("{pod_ip}\tenvpod-node1")), "{text}");
    // The pod's IP answers inside its own netns (eth0 from the bridge plugin).
    let out = env.cli(&[
        "exec",
        "envpod-node1",
        "--",
        "sh",
        "-c",
        "ip -4 addr show eth0",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&pod_ip),
        "{out:?}"
    );
}

fn can_lower_oom_score_adj() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << 24) != 0
}

#[test]
fn qos_classes_set_oom_score_adj() {
    let mut env = AgentEnv::new("aqos");
    let img = env.image("sleep");
    let pod = |name: &str, res: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\", resources: {res}}}\n"
        )
    };
    env.write_manifest("be.yaml", &pod("be", "{}"));
    env.write_manifest("bu.yaml", &pod("bu", "{requests: {memory: 256Mi}}"));
    env.write_manifest("gu.yaml", &pod("gu", "{limits: {memory: 64Mi, cpu: 100m}}"));
    env.args = vec!["--memory-capacity".into(), "1073741824".into()];
    env.start();
    let parent: i64 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let guaranteed = if can_lower_oom_score_adj() {
        -997
    } else {
        parent.max(-997)
    };
    for (name, qos, want) in [
        ("be", "BestEffort", 1000),
        ("bu", "Burstable", 750),
        ("gu", "Guaranteed", guaranteed),
    ] {
        let rec = env.wait_running(name, T);
        assert_eq!(rec["pod"]["status"]["qosClass"], qos);
        let pid = env.container_pid(name, "c").unwrap();
        let adj: i64 = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(adj, want, "{name}");
        // cgroup placement: kubepods/<qos>/pod<uid>/<container>
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let uid = rec["pod"]["metadata"]["uid"].as_str().unwrap();
        let part = match qos {
            "Guaranteed" => format!("kubepods/pod{uid}/"),
            "Burstable" => format!("kubepods/burstable/pod{uid}/"),
            _ => format!("kubepods/besteffort/pod{uid}/"),
        };
        assert!(cg.contains(&part), "{part} not in {cg}");
    }
    // Guaranteed memory limit applied.
    let pid = env.container_pid("gu", "c").unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mem = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .unwrap();
    let limit =
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory{mem}/memory.limit_in_bytes"))
            .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
}

#[test]
fn image_pull_backoff_and_malformed_manifest_leave_other_pods_running() {
    let mut env = AgentEnv::new("aimg");
    let img = env.image("sleep");
    let missing = env.image("does-not-exist");
    env.args = vec!["--restart-backoff-base".into(), "1".into()];
    env.write_manifest(
        "good.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: good}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.write_manifest(
        "missing.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: missing}}\nspec:\n  containers:\n  - {{name: c, image: \"{missing}\"}}\n"),
    );
    env.write_manifest("broken.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nspec:\n  containers:\n  - {name: c}\n");
    env.write_manifest("garbage.yaml", "this: [is not\n");
    env.write_manifest(
        "nonroot.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: nonroot}}\nspec:\n  securityContext: {{runAsNonRoot: true}}\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.write_manifest(
        "hostnet.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: hostnet}}\nspec:\n  hostNetwork: true\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: \"{img}\"}}\n"),
    );
    env.start();
    env.wait_running("good", T);
    env.wait_for("ImagePullBackOff", T, |e| {
        let s = e.container_status("missing", "c")?;
        (s["state"]["waiting"]["reason"] == "ImagePullBackOff").then_some(())
    });
    let ev = env.events("missing");
    assert!(
        ev.iter()
            .any(|(r, m)| r == "Failed" && m.contains("Failed to pull image")),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|(r, m)| r == "BackOff" && m.contains("Back-off pulling image")),
        "{ev:?}"
    );
    // It retries (ErrImagePull again after the back-off).
    env.wait_for("a second pull attempt", T, |e| {
        let n = e.record("missing")?["events"]
            .as_array()?
            .iter()
            .find(|x| x["reason"] == "Pulling")?["count"]
            .as_u64()?;
        (n >= 2).then_some(())
    });
    // runAsNonRoot with an image that runs as root is refused.
    env.wait_for("runAsNonRoot refused", T, |e| {
        let s = e.container_status("nonroot", "c")?;
        let w = &s["state"]["waiting"];
        (w["reason"] == "CreateContainerConfigError"
            && w["message"] == "container has runAsNonRoot and image will run as root")
            .then_some(())
    });
    // hostNetwork: the pod sees the agent's network (the CNI bridge) and has the node IP.
    let rec = env.wait_running("hostnet", T);
    assert_eq!(rec["pod"]["status"]["podIP"], "10.88.0.1");
    let out = env.cli(&["exec", "hostnet-node1", "--", "ip", "link", "show", "hkbr0"]);
    assert!(out.status.success(), "{out:?}");
    // Malformed manifests: logged and recorded, the good pod keeps running.
    let log = env.agent_log();
    assert!(
        log.contains("broken.yaml: document 1 (Pod default/broken)"),
        "{log}"
    );
    assert!(log.contains("garbage.yaml"), "{log}");
    let out = env.cli(&["get", "events"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FailedManifest") && text.contains("broken.yaml"),
        "{text}"
    );
    assert!(env.record("broken").is_none());
    let out = env.cli(&["get", "pods"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("good-node1") && l.contains("Running")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("missing-node1")
            && (l.contains("ImagePullBackOff") || l.contains("ErrImagePull"))),
        "{text}"
    );
    // The failed pulls and the config error are counted.
    let m = env.metrics();
    let v = |s: &str| metric(&m, s).unwrap_or(0.0);
    assert!(
        v("hako_agent_image_pulls_total{result=\"failed\"}") >= 2.0,
        "{m}"
    );
    assert!(v("hako_agent_image_pull_errors_total") >= 2.0, "{m}");
    assert!(
        v("hako_agent_pod_sync_errors_total{reason=\"ErrImagePull\"}") >= 2.0,
        "{m}"
    );
    assert!(
        v("hako_agent_pod_sync_errors_total{reason=\"CreateContainerConfigError\"}") >= 1.0,
        "{m}"
    );
}

#[test]
fn crash_loop_backoff_doubles_and_oom_kill_is_reported() {
    let mut env = AgentEnv::new("acrash");
    let img = env.image("sleep");
    env.args = vec![
        "--restart-backoff-base".into(),
        "1".into(),
        "--restart-backoff-max".into(),
        "8".into(),
        // Every attempt's log stays (its mtime times the back-off): exited instances beyond
        // the default one are removed with their logs otherwise.
        "--maximum-dead-containers-per-container".into(),
        "10".into(),
    ];
    env.write_manifest(
        "crash.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: crash}}\nspec:\n  containers:\n  - {{name: c, image: \"{img}\", command: [sh, -c, \"echo boom; echo boom > /dev/termination-log; exit 3\"]}}\n"),
    );
    env.start();
    // Collect the start times of 4 attempts.
    env.wait_for("4 restarts", Duration::from_secs(90), |e| {
        let s = e.container_status("crash", "c")?;
        (s["restartCount"].as_i64()? >= 4).then_some(())
    });
    let s = env.container_status("crash", "c").unwrap();
    let last = &s["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 3, "{s}");
    assert_eq!(last["reason"], "Error", "{s}");
    assert_eq!(last["message"], "boom\n", "{s}");
    // The gaps between a finish and the next start grow: ~0, 1, 2, 4 s (base 1 s).
    let ev = env.record("crash").unwrap()["events"].clone();
    let backoffs = ev
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "BackOff")
        .map(|e| e["count"].as_u64().unwrap())
        .sum::<u64>();
    assert!(backoffs >= 1, "{ev}");
    let st = env.record("crash").unwrap()["pod"]["status"].clone();
    let cs = &st["containerStatuses"][0];
    let waiting = cs["state"]["waiting"]["reason"].as_str().unwrap_or("");
    if !waiting.is_empty() {
        assert_eq!(waiting, "CrashLoopBackOff", "{cs}");
    }
    let timing = env.crash_gaps("crash", "c");
    assert!(timing.len() >= 3, "{timing:?}");
    // gap[i] = start(i+1) - finish(i); expected back-offs 0, 1, 2, 4 ...
    // The first restart takes no back-off; it may wait for the worker's next pass (≤ 1 s),
    // plus the container's first start, which took up to 4.75 s while the machine was also
    // building and linking (fsyncs of the state files wait behind that I/O). The doubling
    // below is what the back-off is judged by.
    assert!(
        timing[0] < 6.0,
        "{timing:?}; agent log:\n{}",
        env.agent_log()
    );
    assert!(timing[1] >= 0.9 && timing[1] < 2.5, "{timing:?}");
    assert!(timing[2] >= 1.9 && timing[2] < 4.5, "{timing:?}");
    if timing.len() > 3 {
        assert!(timing[3] >= 3.9, "{timing:?}");
    }
    // logs --previous: the previous attempt's output.
    let out = env.cli(&["logs", "crash-node1", "--previous"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "boom\n", "{out:?}");
    // OOM: reason OOMKilled, restarted (OnFailure). Started only now, so that its memory
    // reclaim does not load the machine while the crash loop's gaps are measured.
    env.write_manifest(
        "oom.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: oom}}\nspec:\n  restartPolicy: OnFailure\n  containers:\n  - {{name: c, image: \"{img}\", command: [sh, -c, \"tail /dev/zero\"], resources: {{limits: {{memory: 16Mi}}}}}}\n"),
    );
    env.wait_for("OOMKilled and restarted", T, |e| {
        let s = e.container_status("oom", "c")?;
        let last = &s["lastState"]["terminated"];
        (last["reason"] == "OOMKilled" && s["restartCount"].as_i64()? >= 1).then_some(())
    });
}

#[test]
fn volumes_configmap_update_emptydir_secret_and_failed_mount() {
    let mut env = AgentEnv::new("avol");
    let img = env.image("sleep");
    let cm = |v: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: page}}\ndata: {{index.html: \"{v}\"}}\n")
    };
    env.write_manifest("cm.yaml", &cm("version one"));
    env.write_manifest(
        "vol.yaml",
        &format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: token}}
stringData: {{token: abc123}}
---
apiVersion: v1
kind: Pod
metadata: {{name: vol}}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - {{name: page, configMap: {{name: page, items: [{{key: index.html, path: index.html, mode: 0640}}]}}}}
  - {{name: scratch, emptyDir: {{}}}}
  - name: token
    secret:
      secretName: token
      defaultMode: 0600
  initContainers:
  - {{name: prep, image: "{img}", command: [sh, -c, "echo from-init > /scratch/note"], volumeMounts: [{{name: scratch, mountPath: /scratch}}]}}
  containers:
  - name: c
    image: "{img}"
    volumeMounts:
    - {{name: page, mountPath: /page}}
    - {{name: scratch, mountPath: /scratch}}
    - {{name: token, mountPath: /token}}
---
apiVersion: v1
kind: Pod
metadata: {{name: nomount}}
spec:
  volumes: [{{name: x, configMap: {{name: absent}}}}]
  containers: [{{name: c, image: "{img}", volumeMounts: [{{name: x, mountPath: /x}}]}}]
"#
        ),
    );
    env.start();
    env.wait_running("vol", T);
    let exec = |cmd: &str| {
        let out = env.cli(&["exec", "vol-node1", "--", "sh", "-c", cmd]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(exec("cat /page/index.html"), "version one");
    assert_eq!(exec("cat /scratch/note"), "from-init\n");
    assert_eq!(exec("cat /token/token"), "abc123");
    // YAML 1.1 octal modes, as kubectl reads them.
    assert_eq!(exec("stat -L -c %a /token/token"), "600\n");
    assert_eq!(exec("stat -L -c %a /page/index.html"), "640\n");
    assert!(
        exec("grep ' /token ' /proc/mounts").contains("tmpfs"),
        "secret not on tmpfs"
    );
    // The ConfigMap changes: the running container sees the new content (..data swap).
    env.write_manifest("cm.yaml", &cm("version two"));
    env.wait_for("configmap update in the container", T, |_| {
        (exec("cat /page/index.html") == "version two").then_some(())
    });
    let s = env.container_status("vol", "c").unwrap();
    assert_eq!(s["restartCount"], 0);
    // A missing ConfigMap: FailedMount, pod stays Pending.
    env.wait_for("FailedMount", T, |e| {
        e.events("nomount")
            .iter()
            .any(|(r, m)| r == "FailedMount" && m.contains("absent"))
            .then_some(())
    });
    assert_eq!(env.phase("nomount").as_deref(), Some("Pending"));
}
