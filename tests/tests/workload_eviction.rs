//! Root test of the eviction manager for disk, in cluster mode against the apiserver fixture:
//! the agent's root dir is a small tmpfs of the test's own (so nodefs and imagefs are a
//! filesystem whose free space the test controls), the hard threshold
//! `nodefs.available<X` is set below the free space measured after mounting it, and a pod
//! that fills an emptyDir past it is evicted (Failed/Evicted with the kubelet's message)
//! while a quiet BestEffort pod keeps running; the Node reports DiskPressure and gets the
//! `node.kubernetes.io/disk-pressure:NoSchedule` taint (the fixture's TaintNodesByCondition),
//! a pod created meanwhile is refused with reason Evicted, and once the writer's emptyDir is
//! released the condition and the taint clear after the (short) pressure transition period.
//! The same in standalone mode: the writer's `status.json` shows Failed/Evicted.
#![cfg(feature = "root")]

use hako_tests::cluster::{cluster_env, condition as cond, wait_for};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A tmpfs mounted by the test; lazily detached on drop (the agent env also unmounts what is
/// under its temp dir).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0755").as_str()),
        )
        .expect("mount tmpfs");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).expect("statvfs");
    #[allow(clippy::useless_conversion)]
    let v = u64::from(s.blocks_available()) * u64::from(s.fragment_size());
    v
}

fn taint(node: &Value, key: &str) -> Option<Value> {
    node["spec"]["taints"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["key"] == key).cloned())
}

fn pod(name: &str, image: &str, script: &str, volumes: Value, mounts: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 30,
            "volumes": volumes,
            "containers": [{"name": "c", "image": image,
                "command": ["sh", "-c", script], "volumeMounts": mounts}]}})
}

#[test]
fn disk_pressure_evicts_the_emptydir_writer_then_clears() {
    let (mut env, srv) = cluster_env("evdisk");
    let fs = Tmpfs::mount(&env.root, "256m");
    let free = free_bytes(&env.root);
    // 96 MiB below the free space: the images and the quiet pod stay above it, the writer's
    // 128 MiB go below it.
    let threshold_mi = free / (1 << 20) - 96;
    let hard = format!("nodefs.available<{threshold_mi}Mi");
    env.args.extend(
        [
            "--eviction-hard",
            &hard,
            "--eviction-pressure-transition-period",
            "5s",
            "--housekeeping-interval",
            "1s",
        ]
        .map(String::from),
    );
    env.start();
    wait_for("node Ready", 30, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True" && cond(n, "DiskPressure") == "False")
    });
    let image = env.image("sleep");
    srv.create(pod("quiet", &image, "sleep 3600", json!([]), json!([])))
        .expect("quiet");
    wait_for("quiet Running", 60, &env, || {
        srv.get("", "pods", "default", "quiet")
            .filter(|p| p["status"]["phase"] == "Running")
    });
    srv.create(pod(
        "writer",
        &image,
        "dd if=/dev/zero of=/data/fill bs=1M count=128 2>/dev/null; sleep 3600",
        json!([{"name": "data", "emptyDir": {}}]),
        json!([{"name": "data", "mountPath": "/data"}]),
    ))
    .expect("writer");

    // The node reports the pressure, and the fixture's controller rule taints it.
    let node = wait_for("DiskPressure True", 60, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "DiskPressure") == "True")
    });
    let dp = node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DiskPressure").cloned())
        .expect("condition");
    assert_eq!(dp["reason"], "KubeletHasDiskPressure", "{dp}");
    let node = wait_for("disk-pressure taint", 10, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| taint(n, "node.kubernetes.io/disk-pressure").is_some())
    });
    assert_eq!(
        taint(&node, "node.kubernetes.io/disk-pressure").map(|t| t["effect"].clone()),
        Some(json!("NoSchedule"))
    );

    // The writer is evicted with the kubelet's reason and message.
    let evicted = wait_for("writer Evicted", 60, &env, || {
        srv.get("", "pods", "default", "writer")
            .filter(|p| p["status"]["phase"] == "Failed")
    });
    let st = &evicted["status"];
    assert_eq!(st["reason"], "Evicted", "{st}");
    let msg = st["message"].as_str().unwrap_or("");
    eprintln!("threshold {threshold_mi}Mi of {free} bytes free; writer: {msg}");
    assert!(
        msg.starts_with(&format!(
            "The node was low on resource: ephemeral-storage. Threshold quantity: {threshold_mi}Mi, available: "
        )),
        "{msg}"
    );
    let dt = st["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionTarget").cloned())
        .unwrap_or_default();
    assert_eq!(
        (dt["status"].as_str(), dt["reason"].as_str()),
        (Some("True"), Some("TerminationByKubelet")),
        "{st}"
    );
    let events = srv.list("", "events");
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "Evicted" && e["involvedObject"]["name"] == "writer"),
        "no Evicted event: {events:?}"
    );

    // While the node is under disk pressure, a new pod is refused as the kubelet does.
    if srv
        .get("", "nodes", "", "node1")
        .is_some_and(|n| cond(&n, "DiskPressure") == "True")
    {
        srv.create(pod("late", &image, "sleep 3600", json!([]), json!([])))
            .expect("late");
        let late = wait_for("late refused", 30, &env, || {
            srv.get("", "pods", "default", "late")
                .filter(|p| p["status"]["phase"] == "Failed")
        });
        assert_eq!(late["status"]["reason"], "Evicted", "{late}");
        assert_eq!(
            late["status"]["message"],
            "The node had condition: [DiskPressure]. "
        );
        eprintln!("a pod created under disk pressure was refused");
    }

    // The emptyDir is released, the pressure goes, and after the transition period the
    // condition and the taint clear; the quiet pod was never touched.
    wait_for("space back", 30, &env, || {
        (free_bytes(&env.root) > (threshold_mi + 64) << 20).then_some(())
    });
    let node = wait_for("DiskPressure False", 60, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "DiskPressure") == "False")
    });
    assert!(
        taint(&node, "node.kubernetes.io/disk-pressure").is_none(),
        "taint kept: {}",
        node["spec"]
    );
    let quiet = srv.get("", "pods", "default", "quiet").expect("quiet");
    assert_eq!(quiet["status"]["phase"], "Running", "{}", quiet["status"]);
    assert!(
        env.agent_log().contains("evicted pod"),
        "{}",
        hako_tests::agent::tail(&env.agent_log(), 4000)
    );
    env.stop();
    drop(env);
    drop(fs);
}

/// Standalone mode (manifest directory, no apiserver): the writer is evicted the same way and
/// its `status.json` says so; the quiet pod keeps running.
#[test]
fn standalone_disk_eviction_shows_in_the_pod_record() {
    let mut env = hako_tests::agent::AgentEnv::new("evsa");
    let fs = Tmpfs::mount(&env.root, "256m");
    let free = free_bytes(&env.root);
    let threshold_mi = free / (1 << 20) - 96;
    let hard = format!("nodefs.available<{threshold_mi}Mi");
    env.args.extend(
        [
            "--eviction-hard",
            &hard,
            "--eviction-pressure-transition-period",
            "5s",
            "--housekeeping-interval",
            "1s",
        ]
        .map(String::from),
    );
    let image = env.image("sleep");
    env.write_manifest(
        "quiet.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: quiet, namespace: default}}\nspec:\n  containers:\n  - {{name: c, image: \"{image}\", command: [sleep, \"3600\"]}}\n"
        ),
    );
    env.start();
    env.wait_running("quiet", std::time::Duration::from_secs(60));
    env.write_manifest(
        "writer.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: writer, namespace: default}}\nspec:\n  volumes: [{{name: data, emptyDir: {{}}}}]\n  containers:\n  - name: c\n    image: \"{image}\"\n    command: [sh, -c, \"dd if=/dev/zero of=/data/fill bs=1M count=128 2>/dev/null; sleep 3600\"]\n    volumeMounts: [{{name: data, mountPath: /data}}]\n"
        ),
    );
    let rec = env.wait_for("writer Evicted", std::time::Duration::from_secs(60), |e| {
        e.record("writer")
            .filter(|r| r["pod"]["status"]["phase"] == "Failed")
    });
    let st = &rec["pod"]["status"];
    assert_eq!(st["reason"], "Evicted", "{st}");
    assert!(
        st["message"].as_str().is_some_and(|m| m
            .starts_with("The node was low on resource: ephemeral-storage. Threshold quantity: ")),
        "{st}"
    );
    assert!(
        env.events("writer").iter().any(|(r, _)| r == "Evicted"),
        "{:?}",
        env.events("writer")
    );
    // Not restarted: it stays Failed while the quiet pod keeps running.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(env.phase("writer").as_deref(), Some("Failed"));
    assert_eq!(env.phase("quiet").as_deref(), Some("Running"));
    env.stop();
    drop(env);
    drop(fs);
}
