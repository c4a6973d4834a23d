//! Root test of a pod run by a cluster-mode agent: the pod is created in the apiserver fixture
//! bound to the node, runs under the real pod workers (hako-shim, CNI, local registry image),
//! its status round-trips through `pods/<name>/status` (phase, podIP, hostIP, qosClass,
//! container statuses, readiness), a ConfigMap update reaches the running container's volume,
//! a static pod appears as a mirror pod, and a graceful deletion ends with the agent's
//! grace-0 delete carrying the UID precondition. The Downward API env has the pod's and the
//! node's real IPs; readiness flips reach the apiserver (the delay from the probe's result to
//! the fixture receiving the status patch is printed); a Secret update reaches the volume.
//! A second test pulls from a registry that requires basic auth: without imagePullSecrets
//! the pod stays in ErrImagePull / ImagePullBackOff, with a dockerconfigjson or dockercfg
//! Secret it runs.
#![cfg(feature = "root")]

use hako_tests::cluster::{cluster_env, condition as cond, container_pid, wait_for};
use hako_tests::registry::{Registry, RegistryOptions, AUTH_PASSWORD, AUTH_USER};
use serde_json::{json, Value};
use std::time::Instant;

#[test]
fn pod_runs_reports_status_and_is_deleted_gracefully() {
    let (mut env, srv) = cluster_env("clpod");
    env.start();
    wait_for("node Ready", 30, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True")
    });
    srv.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default"}, "data": {"k": "v1"}}))
        .expect("cm");
    srv.create(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sec", "namespace": "default"}, "data": {"pw": "czE="}}))
        .expect("secret");
    // The readiness probe leaves the time of its first success (/tmp/ok) and first failure
    // (/tmp/nok) after each flip, for the latency figure.
    let probe = "if [ -f /tmp/ready ]; then [ -f /tmp/ok ] || touch /tmp/ok; rm -f /tmp/nok; \
                 else [ -f /tmp/nok ] || touch /tmp/nok; rm -f /tmp/ok; exit 1; fi";
    let env_ref = |f: &str| json!({"fieldRef": {"fieldPath": f}});
    let created = srv
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 3,
                "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}},
                            {"name": "sec", "secret": {"secretName": "sec"}}],
                "containers": [{"name": "c", "image": env.image("sleep"),
                    "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"],
                    "lifecycle": {"preStop": {"sleep": {"seconds": 2}}},
                    "env": [{"name": "POD_IP", "valueFrom": env_ref("status.podIP")},
                            {"name": "POD_IPS", "valueFrom": env_ref("status.podIPs")},
                            {"name": "HOST_IP", "valueFrom": env_ref("status.hostIP")},
                            {"name": "HOST_IPS", "valueFrom": env_ref("status.hostIPs")}],
                    "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"},
                                     {"name": "sec", "mountPath": "/sec"}],
                    "readinessProbe": {"exec": {"command": ["sh", "-c", probe]},
                                       "periodSeconds": 1, "failureThreshold": 1}}]}}))
        .expect("pod");
    let uid = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();

    // Running first (not ready), then Ready once the probe passes.
    let running = wait_for("Running", 60, &env, || {
        srv.get("", "pods", "default", "web")
            .filter(|p| p["status"]["phase"] == "Running")
    });
    let st = &running["status"];
    assert!(
        st["podIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.88.0.")),
        "{st}"
    );
    assert_eq!(st["hostIP"], "10.88.0.1", "{st}");
    assert_eq!(st["qosClass"], "BestEffort", "{st}");
    assert!(st["startTime"].is_string(), "{st}");
    assert_eq!(st["containerStatuses"][0]["name"], "c");
    assert!(
        st["containerStatuses"][0]["state"]["running"].is_object(),
        "{st}"
    );
    assert_eq!(cond(&running, "Ready"), "False", "{st}");
    let pid = container_pid(&env, &running);
    let root = format!("/proc/{pid}/root");

    // Downward API env: the pod's IP and the node's InternalIP, as reported to the apiserver.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let vars: std::collections::BTreeMap<String, String> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let node = srv.get("", "nodes", "", "node1").expect("node");
    let internal_ip = node["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .and_then(|a| a["address"].as_str())
        .expect("InternalIP")
        .to_string();
    assert_eq!(vars.get("POD_IP").map(String::as_str), st["podIP"].as_str());
    assert_eq!(
        vars.get("POD_IPS").map(String::as_str),
        st["podIP"].as_str()
    );
    assert_eq!(vars.get("HOST_IP"), Some(&internal_ip));
    assert_eq!(vars.get("HOST_IPS"), Some(&internal_ip));
    assert_eq!(st["hostIP"].as_str(), Some(internal_ip.as_str()));

    // Readiness flips reach the apiserver; the delay from the probe's result (the marker
    // file's mtime) to the fixture receiving the status patch is measured, not asserted.
    let mut delays = Vec::new();
    let mut ready = Value::Null;
    for round in 0..3 {
        for (want, marker) in [("True", "ok"), ("False", "nok")] {
            let flag = format!("{root}/tmp/ready");
            if want == "True" {
                std::fs::write(&flag, "").expect("touch ready");
            } else {
                std::fs::remove_file(&flag).expect("rm ready");
            }
            let p = wait_for(&format!("Ready={want} (round {round})"), 10, &env, || {
                srv.get("", "pods", "default", "web")
                    .filter(|p| cond(p, "Ready") == want)
            });
            let seen = Instant::now();
            let probed = std::fs::metadata(format!("{root}/tmp/{marker}"))
                .and_then(|m| m.modified())
                .expect("probe marker");
            let patch = srv
                .requests()
                .into_iter()
                .rev()
                .find(|r| {
                    r.user == "system:node:node1"
                        && r.method == "PATCH"
                        && r.path.ends_with("/pods/web/status")
                        && r.status == 200
                        && r.at <= seen
                })
                .expect("the status patch");
            let arrived = std::time::SystemTime::now() - patch.at.elapsed();
            let d = arrived.duration_since(probed).unwrap_or_default();
            delays.push(d.as_secs_f64() * 1000.0);
            if want == "True" {
                ready = p;
            }
        }
    }
    delays.sort_by(f64::total_cmp);
    eprintln!(
        "readiness change to apiserver: {} flips, min {:.0} ms, median {:.0} ms, max {:.0} ms (probe result -> status patch received)",
        delays.len(),
        delays[0],
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert_eq!(ready["status"]["containerStatuses"][0]["ready"], true);
    std::fs::write(format!("{root}/tmp/ready"), "").expect("touch ready");
    let ready = wait_for("Ready", 10, &env, || {
        srv.get("", "pods", "default", "web")
            .filter(|p| cond(p, "Ready") == "True")
    });

    // The workers' events reach the apiserver in the pod's namespace.
    wait_for("events", 15, &env, || {
        let reasons: Vec<String> = srv
            .list("", "events")
            .iter()
            .filter(|e| {
                e["involvedObject"]["name"] == "web" && e["metadata"]["namespace"] == "default"
            })
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect();
        ["Created", "Started"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
            .then_some(())
    });

    // ConfigMap and Secret updates reach the running container's volumes.
    assert_eq!(container_pid(&env, &ready), pid);
    let file = format!("{root}/cfg/k");
    assert_eq!(std::fs::read_to_string(&file).expect("cfg").trim(), "v1");
    srv.merge_patch(
        "",
        "configmaps",
        "default",
        "cfg",
        "",
        &json!({"data": {"k": "v2"}}),
    )
    .expect("update cm");
    wait_for("ConfigMap update in the volume", 30, &env, || {
        (std::fs::read_to_string(&file).ok()?.trim() == "v2").then_some(())
    });
    let sfile = format!("{root}/sec/pw");
    assert_eq!(std::fs::read_to_string(&sfile).expect("secret"), "s1");
    srv.merge_patch(
        "",
        "secrets",
        "default",
        "sec",
        "",
        &json!({"data": {"pw": "czI="}}),
    )
    .expect("update secret");
    wait_for("Secret update in the volume", 30, &env, || {
        (std::fs::read_to_string(&sfile).ok()? == "s2").then_some(())
    });

    // A static pod from --pod-manifest-path runs and appears as a mirror pod with its status.
    env.write_manifest(
        "static.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static\nspec:\n  containers:\n  - name: s\n    image: {}\n",
            env.image("sleep")
        ),
    );
    let mirror = wait_for("mirror pod Running", 60, &env, || {
        srv.get("", "pods", "default", "static-node1")
            .filter(|p| p["status"]["phase"] == "Running")
    });
    assert!(
        mirror["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string(),
        "{mirror}"
    );
    assert_eq!(mirror["metadata"]["ownerReferences"][0]["kind"], "Node");
    env.remove_manifest("static.yaml");
    wait_for("mirror pod removed", 30, &env, || {
        srv.get("", "pods", "default", "static-node1")
            .is_none()
            .then_some(())
    });

    // Graceful deletion: the agent runs the preStop sleep (a 1.29 field, typed here), stops
    // the pod (its shell exits at SIGTERM), then deletes it with grace 0 + UID.
    let deleted_at = Instant::now();
    let d = srv
        .delete(
            "",
            "pods",
            "default",
            "web",
            &json!({"gracePeriodSeconds": 3}),
        )
        .expect("delete");
    assert!(d["metadata"]["deletionTimestamp"].is_string());
    wait_for("pod removed by the agent", 30, &env, || {
        srv.get("", "pods", "default", "web")
            .is_none()
            .then_some(())
    });
    let took = deleted_at.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1800),
        "pod removed {took:?} after its deletion: the 2 s preStop sleep did not run"
    );
    let del = srv
        .requests()
        .into_iter()
        .find(|r| r.user == "system:node:node1" && r.method == "DELETE" && r.attrs.name == "web")
        .expect("the agent's delete");
    let body: Value = serde_json::from_str(&del.body).expect("body");
    assert_eq!(body["gracePeriodSeconds"], 0);
    assert_eq!(body["preconditions"]["uid"], Value::from(uid));
    let forbidden: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:node:node1" && r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    env.stop();
}

#[test]
fn image_pull_secrets_for_a_registry_with_auth() {
    let (mut env, srv) = cluster_env("clpull");
    // A second registry that requires basic auth: images pushed with auth off, then the same
    // storage served with auth on.
    let dir = env.tmp.path().join("auth-registry");
    let reg = env
        .ns
        .run({
            let dir = dir.clone();
            move || -> Result<Registry, hako_tests::registry::RegistryError> {
                let open = Registry::start_with(RegistryOptions {
                    dir: Some(dir.clone()),
                    ..Default::default()
                })?;
                hako_tests::registry::push_standard(&open.client())?;
                drop(open);
                Registry::start_with(RegistryOptions {
                    dir: Some(dir),
                    basic_auth: true,
                    ..Default::default()
                })
            }
        })
        .expect("netns")
        .expect("auth registry");
    let image = reg.reference("busybox:sleep");
    let auth = k8s_openapi::ByteString(format!("{AUTH_USER}:{AUTH_PASSWORD}").into_bytes());
    let b64 = |v: &Value| {
        serde_json::to_value(k8s_openapi::ByteString(v.to_string().into_bytes())).expect("base64")
    };
    let auth_b64 = serde_json::to_value(&auth).expect("base64");
    // Credentials for another registry come first: the matching entry must be picked.
    let config = json!({"auths": {
        "other.example:5000": {"auth": "d3Jvbmc6d3Jvbmc="},
        reg.addr(): {"auth": auth_b64}}});
    srv.create(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": "regcred", "namespace": "default"},
        "data": {".dockerconfigjson": b64(&config)}}),
    )
    .expect("secret");
    // A pull secret for another registry only, listed first.
    let other = json!({"auths": {"other.example:5000": {"username": "u", "password": "p"}}});
    srv.create(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": "other", "namespace": "default"},
        "data": {".dockerconfigjson": b64(&other)}}),
    )
    .expect("secret");
    let legacy = json!({format!("http://{}", reg.addr()): {"auth": auth_b64}});
    srv.create(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockercfg",
        "metadata": {"name": "legacy", "namespace": "default"},
        "data": {".dockercfg": b64(&legacy)}}),
    )
    .expect("secret");
    env.start();
    let pod = |name: &str, secrets: &[&str]| {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": image, "imagePullPolicy": "Always",
                    "command": ["sleep", "3600"]}]}});
        if !secrets.is_empty() {
            let refs: Vec<Value> = secrets.iter().map(|s| json!({"name": s})).collect();
            p["spec"]["imagePullSecrets"] = Value::from(refs);
        }
        srv.create(p).expect("pod");
    };
    pod("anonymous", &[]);
    pod("wrong-registry", &["other"]);
    pod("with-secret", &["other", "regcred"]);
    pod("with-dockercfg", &["legacy"]);
    for name in ["with-secret", "with-dockercfg"] {
        wait_for(&format!("{name} Running"), 60, &env, || {
            srv.get("", "pods", "default", name)
                .filter(|p| p["status"]["phase"] == "Running")
        });
    }
    for name in ["anonymous", "wrong-registry"] {
        let waiting = wait_for(&format!("{name}: pull refused"), 60, &env, || {
            let p = srv.get("", "pods", "default", name)?;
            let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
            matches!(
                w["reason"].as_str(),
                Some("ErrImagePull" | "ImagePullBackOff")
            )
            .then(|| w.clone())
        });
        assert_eq!(
            srv.get("", "pods", "default", name).expect("pod")["status"]["phase"],
            "Pending"
        );
        eprintln!("{name} pull: {waiting}");
    }
    let forbidden: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|r| r.user == "system:node:node1" && r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    for name in [
        "anonymous",
        "wrong-registry",
        "with-secret",
        "with-dockercfg",
    ] {
        srv.delete("", "pods", "default", name, &json!({}))
            .expect("delete");
    }
    wait_for("pods removed", 30, &env, || {
        srv.list("", "pods").is_empty().then_some(())
    });
    env.stop();
    drop(reg);
}
