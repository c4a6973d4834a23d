//! Upstream v1.28 volume specs (test/e2e/common/storage and node/expansion.go) run against a
//! cluster-mode agent through the apiserver fixture: the same pod specs and the same expected
//! output lines. The e2e specs run agnhost `mounttest`; the busybox image has no agnhost, so
//! the container prints mounttest's lines itself with a shell function (`content of file
//! "F": C`, `mode of file "F": -rw-r--r--` as Go's FileMode prints a plain file, `owner GID of
//! F: N`). Each test is one spec (or one spec family); every one of them failed on the agent
//! before its fix (fsGroup ownership, node allocatable cpu in downwardAPI volumes,
//! subPathExpr, downwardAPI updates).
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use hako_tests::apiserver::ApiServer;
use hako_tests::cluster::{cluster_env, condition as cond, wait_for};
use serde_json::{json, Value};

/// mounttest's output, from a shell: `content F`, `mode F`, `perm F`, `gid F`.
const MOUNTTEST: &str = r#"content() { printf 'content of file "%s": %s\n' "$1" "$(cat "$1")"; }
mode() { printf 'mode of file "%s": %s\n' "$1" "$(stat -L -c %A "$1")"; }
perm() { printf 'perms of file "%s": %s\n' "$1" "$(stat -L -c %A "$1")"; }
gid() { printf 'owner GID of %s: %s\n' "$1" "$(stat -L -c %g "$1")"; }
"#;

/// A started cluster-mode agent whose node is Ready.
fn start(tag: &str) -> (AgentEnv, ApiServer) {
    let (mut env, srv) = cluster_env(tag);
    env.start();
    wait_for("node Ready", 60, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True")
    });
    (env, srv)
}

/// A pod of namespace default on node1 with one container `name` running `script` (after the
/// mounttest functions) in the busybox image, restartPolicy Never.
fn pod(env: &AgentEnv, name: &str, container: Value, spec: Value) -> Value {
    let mut c = json!({"image": env.image("sleep")});
    if let (Some(dst), Value::Object(src)) = (c.as_object_mut(), container) {
        for (k, v) in src {
            dst.insert(k, v);
        }
    }
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "node1", "restartPolicy": "Never", "containers": [c]}});
    if let (Some(dst), Value::Object(src)) = (p["spec"].as_object_mut(), spec) {
        for (k, v) in src {
            dst.insert(k, v);
        }
    }
    p
}

fn sh(script: &str) -> Value {
    json!(["sh", "-c", format!("{MOUNTTEST}{script}")])
}

/// The container's log lines (CRI format; partial records joined), all attempts.
fn logs(env: &AgentEnv, pod: &str, c: &str) -> String {
    let prefix = format!("default_{pod}_");
    let Some(dir) = std::fs::read_dir(&env.logs).ok().and_then(|rd| {
        rd.flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join(c))
    }) else {
        return String::new();
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = String::new();
    for f in files {
        for l in std::fs::read_to_string(f).unwrap_or_default().lines() {
            let mut it = l.splitn(4, ' ');
            let (_, _, tag, msg) = (it.next(), it.next(), it.next(), it.next());
            out.push_str(msg.unwrap_or(""));
            if tag != Some("P") {
                out.push('\n');
            }
        }
    }
    out
}

/// e2e's TestContainerOutput: the pod succeeds and its log has every expected line.
fn expect_output(env: &AgentEnv, srv: &ApiServer, p: Value, want: &[String]) {
    let name = p["metadata"]["name"].as_str().expect("name").to_string();
    let c = p["spec"]["containers"][0]["name"]
        .as_str()
        .expect("container")
        .to_string();
    srv.create(p).expect("pod");
    let phase = wait_for(&format!("pod {name} finished"), 90, env, || {
        let p = srv.get("", "pods", "default", &name)?;
        let ph = p["status"]["phase"].as_str()?.to_string();
        (ph == "Succeeded" || ph == "Failed").then_some(ph)
    });
    let out = logs(env, &name, &c);
    let events: Vec<String> = srv
        .list("", "events")
        .iter()
        .filter(|e| e["involvedObject"]["name"] == name.as_str())
        .map(|e| format!("{} {}", e["reason"], e["message"]))
        .collect();
    assert_eq!(
        phase, "Succeeded",
        "pod {name}: log:\n{out}\nevents: {events:?}"
    );
    for w in want {
        assert!(
            out.lines().any(|l| l == w),
            "pod {name}: want line {w:?}; log:\n{out}\nevents: {events:?}"
        );
    }
}

fn secret(name: &str) -> Value {
    // value-1 / value-2 / value-3, as e2e's secretForTest.
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"data-1": "dmFsdWUtMQ==", "data-2": "dmFsdWUtMg==", "data-3": "dmFsdWUtMw=="}})
}

/// `[sig-storage] Secrets should be consumable from pods in volume as non-root with
/// defaultMode and fsGroup set [LinuxOnly] [NodeConformance] [Conformance]`, and the same spec
/// of `Projected secret`: defaultMode 0440, runAsUser 1000, fsGroup 1001. Before fsGroup
/// ownership the files were root:root 0440 and unreadable to uid 1000.
#[test]
fn secret_and_projected_secret_non_root_default_mode_fs_group() {
    let (env, srv) = start("cvsec");
    srv.create(secret("secret-test-1")).expect("secret");
    srv.create(secret("projected-secret-test-1"))
        .expect("secret");
    let sc = json!({"runAsUser": 1000, "fsGroup": 1001});
    let f = "/etc/secret-volume/data-1";
    expect_output(
        &env,
        &srv,
        pod(
            &env,
            "pod-secrets-1",
            json!({"name": "secret-volume-test",
                "command": sh(&format!("content {f}; mode {f}")),
                "volumeMounts": [{"name": "secret-volume", "mountPath": "/etc/secret-volume"}]}),
            json!({"securityContext": sc,
                "volumes": [{"name": "secret-volume",
                    "secret": {"secretName": "secret-test-1", "defaultMode": 0o440}}]}),
        ),
        &[
            format!("content of file \"{f}\": value-1"),
            format!("mode of file \"{f}\": -r--r-----"),
        ],
    );
    let f = "/etc/projected-secret-volume/data-1";
    expect_output(
        &env,
        &srv,
        pod(
            &env,
            "pod-projected-secrets-1",
            json!({"name": "projected-secret-volume-test",
                "command": sh(&format!("content {f}; mode {f}")),
                "volumeMounts": [{"name": "projected-secret-volume",
                    "mountPath": "/etc/projected-secret-volume", "readOnly": true}]}),
            json!({"securityContext": sc,
                "volumes": [{"name": "projected-secret-volume",
                    "projected": {"defaultMode": 0o440,
                        "sources": [{"secret": {"name": "projected-secret-test-1"}}]}}]}),
        ),
        &[
            format!("content of file \"{f}\": value-1"),
            format!("mode of file \"{f}\": -r--r-----"),
        ],
    );
}

/// `[sig-storage] ConfigMap should be consumable from pods in volume as non-root with
/// defaultMode and fsGroup set [LinuxOnly] [NodeFeature:FSGroup]` (defaultMode 0440,
/// runAsUser 1000, fsGroup 1001), and `[sig-storage] EmptyDir volumes when FSGroup is
/// specified [LinuxOnly] [NodeFeature:FSGroup] new files should be created with FSGroup
/// ownership when container is non-root` (fsGroup 123, runAsUser 1001).
#[test]
fn config_map_and_empty_dir_fs_group() {
    let (env, srv) = start("cvcm");
    srv.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "configmap-test-volume-1", "namespace": "default"},
        "data": {"data-1": "value-1", "data-2": "value-2", "data-3": "value-3"}}))
        .expect("cm");
    let f = "/etc/configmap-volume/data-1";
    expect_output(
        &env,
        &srv,
        pod(
            &env,
            "pod-configmaps-1",
            json!({"name": "agnhost-container",
                "command": sh(&format!("content {f}; mode {f}")),
                "volumeMounts": [{"name": "configmap-volume", "mountPath": "/etc/configmap-volume"}]}),
            json!({"securityContext": {"runAsUser": 1000, "fsGroup": 1001},
                "volumes": [{"name": "configmap-volume",
                    "configMap": {"name": "configmap-test-volume-1", "defaultMode": 0o440}}]}),
        ),
        &[
            format!("content of file \"{f}\": value-1"),
            format!("mode of file \"{f}\": -r--r-----"),
        ],
    );
    let f = "/test-volume/test-file";
    expect_output(
        &env,
        &srv,
        pod(
            &env,
            "pod-emptydir-fsgroup",
            json!({"name": "test-container",
                "command": sh(&format!(
                    "umask 0; echo 'mount-tester new file' > {f} && chmod 0660 {f}; \
                     content {f}; perm {f}; gid {f}"
                )),
                "volumeMounts": [{"name": "test-volume", "mountPath": "/test-volume"}]}),
            json!({"securityContext": {"runAsUser": 1001, "fsGroup": 123},
                "volumes": [{"name": "test-volume", "emptyDir": {}}]}),
        ),
        &[
            format!("content of file \"{f}\": mount-tester new file"),
            format!("perms of file \"{f}\": -rw-rw----"),
            format!("owner GID of {f}: 123"),
        ],
    );
}

/// `[sig-storage] Downward API volume should provide node allocatable (cpu) as default cpu
/// limit if the limit is not set [NodeConformance] [Conformance]`, the memory one, and the
/// same two of `Projected downwardAPI`: a container without limits reads the node's
/// allocatable (upstream asserts `[1-9]`; here the exact value from the Node object). The cpu
/// file held 0 before.
#[test]
fn downward_api_default_limits_are_node_allocatable() {
    let (env, srv) = start("cvalloc");
    let node = srv.get("", "nodes", "", "node1").expect("node");
    let alloc = &node["status"]["allocatable"];
    let cpu_milli = quantity_milli(alloc["cpu"].as_str().expect("cpu"));
    let want_cpu = (cpu_milli + 999) / 1000;
    assert!(want_cpu >= 1, "{alloc}");
    let items = json!([
        {"path": "cpu_limit", "resourceFieldRef": {"containerName": "client-container",
            "resource": "limits.cpu", "divisor": "1"}},
        {"path": "memory_limit", "resourceFieldRef": {"containerName": "client-container",
            "resource": "limits.memory", "divisor": "1"}}]);
    for (name, volume) in [
        (
            "downwardapi-volume-alloc",
            json!({"name": "podinfo", "downwardAPI": {"items": items}}),
        ),
        (
            "projected-downwardapi-alloc",
            json!({"name": "podinfo", "projected": {"sources": [{"downwardAPI": {"items": items}}]}}),
        ),
    ] {
        let c = "/etc/podinfo/cpu_limit";
        let m = "/etc/podinfo/memory_limit";
        let p = pod(
            &env,
            name,
            json!({"name": "client-container",
                "command": sh(&format!("content {c}; content {m}")),
                "volumeMounts": [{"name": "podinfo", "mountPath": "/etc/podinfo"}]}),
            json!({"volumes": [volume]}),
        );
        expect_output(
            &env,
            &srv,
            p,
            &[format!("content of file \"{c}\": {want_cpu}")],
        );
        let out = logs(&env, name, "client-container");
        let mem = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("content of file \"{m}\": ")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            mem > 0,
            "{name}: memory_limit should be node allocatable: {out}"
        );
    }
}

/// A Quantity's value in thousandths (`2`, `1500m`).
fn quantity_milli(q: &str) -> i64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().expect("milli"),
        None => q.parse::<i64>().expect("cpu") * 1000,
    }
}

/// `[sig-node] Variable Expansion should allow substituting values in a volume subpath
/// [Conformance]`, and the two refusals (`should fail substituting values in a volume subpath
/// with absolute path` / `with backticks`, [Slow] upstream): the expanded subPath must be
/// relative and without `..`, otherwise the container stays in CreateContainerConfigError.
/// Before, every subPathExpr was refused.
#[test]
fn sub_path_expr() {
    let (env, srv) = start("cvexpr");
    let name = "var-expansion-subpath";
    expect_output(
        &env,
        &srv,
        pod(
            &env,
            name,
            json!({"name": "dapi-container",
                "command": ["sh", "-c", format!("test -d /testcontainer/{name};echo $?")],
                "env": [{"name": "POD_NAME", "value": name}],
                "volumeMounts": [
                    {"name": "workdir1", "mountPath": "/logscontainer", "subPathExpr": "$(POD_NAME)"},
                    {"name": "workdir1", "mountPath": "/testcontainer"}]}),
            json!({"volumes": [{"name": "workdir1", "emptyDir": {}}]}),
        ),
        &["0".to_string()],
    );
    for (name, value) in [
        ("var-expansion-absolute", "/tmp"),
        ("var-expansion-backticks", ".."),
    ] {
        let mut p = pod(
            &env,
            name,
            json!({"name": "dapi-container",
                "command": ["sh", "-c", "sleep 1"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef":
                    {"fieldPath": "metadata.annotations['mysubpath']"}}}],
                "volumeMounts": [
                    {"name": "workdir1", "mountPath": "/logscontainer", "subPathExpr": "$(POD_NAME)"},
                    {"name": "workdir1", "mountPath": "/testcontainer"}]}),
            json!({"volumes": [{"name": "workdir1", "emptyDir": {}}]}),
        );
        p["metadata"]["annotations"] = json!({"mysubpath": value});
        srv.create(p).expect("pod");
        let st = wait_for(
            &format!("{name} CreateContainerConfigError"),
            60,
            &env,
            || {
                let p = srv.get("", "pods", "default", name)?;
                let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
                (w["reason"] == "CreateContainerConfigError").then(|| w.clone())
            },
        );
        assert!(
            st["message"]
                .as_str()
                .is_some_and(|m| m.contains("subPath")),
            "{name}: {st}"
        );
    }
}

/// `[sig-storage] Downward API volume should update annotations on modification` and `should
/// update labels on modification` ([NodeConformance] [Conformance]): a running container
/// reading the file in a loop sees the new value after the pod is updated. Before, the file
/// kept the old value.
#[test]
fn downward_api_labels_and_annotations_follow_updates() {
    let (env, srv) = start("cvupd");
    for (name, file, meta, patch, before, after) in [
        (
            "annotationupdate",
            "annotations",
            json!({"annotations": {"builder": "bar"}}),
            json!({"metadata": {"annotations": {"builder": "foo"}}}),
            "builder=\"bar\"",
            "builder=\"foo\"",
        ),
        (
            "labelsupdate",
            "labels",
            json!({"labels": {"key1": "value1", "key2": "value2"}}),
            json!({"metadata": {"labels": {"key3": "value3"}}}),
            "key1=\"value1\"",
            "key3=\"value3\"",
        ),
    ] {
        let f = format!("/etc/podinfo/{file}");
        let mut p = pod(
            &env,
            name,
            json!({"name": "client-container",
                "command": sh(&format!(
                    "while true; do content {f}; echo; sleep 1; done"
                )),
                "volumeMounts": [{"name": "podinfo", "mountPath": "/etc/podinfo"}]}),
            json!({"terminationGracePeriodSeconds": 1,
                "volumes": [{"name": "podinfo", "downwardAPI": {"items": [
                    {"path": file, "fieldRef": {"fieldPath": format!("metadata.{file}")}}]}}]}),
        );
        p["metadata"]
            .as_object_mut()
            .expect("metadata")
            .extend(meta.as_object().expect("meta").clone());
        srv.create(p).expect("pod");
        let seen = |want: &str| {
            let want = want.to_string();
            wait_for(&format!("{name}: {want} in the log"), 90, &env, || {
                logs(&env, name, "client-container")
                    .lines()
                    .any(|l| l.contains(&want))
                    .then_some(())
            })
        };
        seen(before);
        srv.merge_patch("", "pods", "default", name, "", &patch)
            .expect("update pod");
        seen(after);
        // Updated in place: the same container kept running.
        let p = srv.get("", "pods", "default", name).expect("pod");
        assert_eq!(p["status"]["phase"], "Running", "{name}");
        assert_eq!(
            p["status"]["containerStatuses"][0]["restartCount"], 0,
            "{name}"
        );
        srv.delete(
            "",
            "pods",
            "default",
            name,
            &json!({"gracePeriodSeconds": 1}),
        )
        .expect("delete");
    }
}
