//! Memory-pressure eviction in the VM lane's guest (cgroup v2, small memory), in cluster
//! mode against the apiserver fixture: a Guaranteed pod runs, the hard threshold
//! `memory.available<X` is set 200 MiB below what is available then (the agent restarts with
//! it; pods are re-adopted), and a BestEffort pod that fills a memory-backed emptyDir with
//! 400 MiB is evicted (Failed/Evicted, the kubelet's message) while the Guaranteed pod keeps
//! running; the Node reports MemoryPressure and gets the `node.kubernetes.io/memory-pressure`
//! taint (the fixture's TaintNodesByCondition), and both clear after the (short) pressure
//! transition period.
#![cfg(feature = "vm")]

use hako_tests::cluster::{cluster_env, condition as cond, wait_for};
use hako_tests::vm::require_guest;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A tmpfs mounted by the test (the guest's root is an overlay over 9p, where image layers
/// cannot get their overlay xattrs and container overlays cannot have their upper dirs);
/// lazily detached on drop (the agent env also unmounts what is under its temp dir).
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

fn meminfo(field: &str) -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    m.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .expect("field")
        * 1024
}

/// `memory.available` as the kubelet computes it on cgroup v2: MemTotal − (MemTotal −
/// MemFree − inactive_file of the root cgroup).
fn memory_available() -> u64 {
    let stat = std::fs::read_to_string("/sys/fs/cgroup/memory.stat").expect("memory.stat");
    let inactive: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("inactive_file "))
        .and_then(|v| v.trim().parse().ok())
        .expect("inactive_file");
    meminfo("MemFree:") + inactive
}

fn taint(node: &Value, key: &str) -> bool {
    node["spec"]["taints"].as_array().is_some_and(|ts| {
        ts.iter()
            .any(|t| t["key"] == key && t["effect"] == "NoSchedule")
    })
}

#[test]
fn best_effort_memory_hog_is_evicted_before_the_guaranteed_pod() {
    require_guest();
    let (mut env, srv) = cluster_env("evmem");
    let root_fs = Tmpfs::mount(&env.root, "128m");
    let run_fs = Tmpfs::mount(&env.run, "128m");
    env.args.extend(
        [
            "--eviction-hard",
            "memory.available<1Mi",
            "--eviction-pressure-transition-period",
            "5s",
            "--housekeeping-interval",
            "1s",
        ]
        .map(String::from),
    );
    env.start();
    wait_for("node Ready", 120, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "Ready") == "True")
    });
    let image = env.image("sleep");
    srv.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "guaranteed", "namespace": "default"},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": image,
            "command": ["sleep", "3600"],
            "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}}}]}}))
        .expect("guaranteed");
    wait_for("guaranteed Running", 180, &env, || {
        srv.get("", "pods", "default", "guaranteed")
            .filter(|p| p["status"]["phase"] == "Running")
    });

    // The threshold: 200 MiB below what is available now, with everything but the hog up.
    let avail_mi = memory_available() >> 20;
    assert!(
        avail_mi > 600,
        "the guest has only {avail_mi} MiB available"
    );
    let threshold_mi = avail_mi - 200;
    env.stop();
    let i = env
        .args
        .iter()
        .position(|a| a == "memory.available<1Mi")
        .expect("flag");
    env.args[i] = format!("memory.available<{threshold_mi}Mi");
    env.start();
    wait_for("no MemoryPressure", 120, &env, || {
        srv.get("", "nodes", "", "node1").filter(|n| {
            cond(n, "MemoryPressure") == "False" && !taint(n, "node.kubernetes.io/memory-pressure")
        })
    });

    srv.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hog", "namespace": "default"},
        "spec": {"nodeName": "node1",
            "volumes": [{"name": "m", "emptyDir": {"medium": "Memory"}}],
            "containers": [{"name": "c", "image": image,
                "command": ["sh", "-c", "dd if=/dev/zero of=/m/fill bs=1M count=400 2>/dev/null; sleep 3600"],
                "volumeMounts": [{"name": "m", "mountPath": "/m"}]}]}}))
    .expect("hog");

    let node = wait_for("MemoryPressure True", 180, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "MemoryPressure") == "True")
    });
    let mp = node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "MemoryPressure").cloned())
        .expect("condition");
    assert_eq!(mp["reason"], "KubeletHasInsufficientMemory", "{mp}");
    wait_for("memory-pressure taint", 30, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| taint(n, "node.kubernetes.io/memory-pressure"))
    });

    let hog = wait_for("hog Evicted", 120, &env, || {
        srv.get("", "pods", "default", "hog")
            .filter(|p| p["status"]["phase"] == "Failed")
    });
    let st = &hog["status"];
    assert_eq!(st["reason"], "Evicted", "{st}");
    let msg = st["message"].as_str().unwrap_or("");
    eprintln!("threshold {threshold_mi}Mi of {avail_mi}Mi available; hog: {msg}");
    assert!(
        msg.starts_with(&format!(
            "The node was low on resource: memory. Threshold quantity: {threshold_mi}Mi, available: "
        )),
        "{msg}"
    );
    assert!(
        msg.contains("Container c was using ")
            && msg.ends_with("request is 0, has larger consumption of memory. "),
        "{msg}"
    );
    let g = srv.get("", "pods", "default", "guaranteed").expect("g");
    assert_eq!(
        g["status"]["phase"], "Running",
        "evicted before the hog? {}",
        g["status"]
    );

    let node = wait_for("MemoryPressure False", 120, &env, || {
        srv.get("", "nodes", "", "node1")
            .filter(|n| cond(n, "MemoryPressure") == "False")
    });
    assert!(
        !taint(&node, "node.kubernetes.io/memory-pressure"),
        "{}",
        node["spec"]
    );
    let g = srv.get("", "pods", "default", "guaranteed").expect("g");
    assert_eq!(g["status"]["phase"], "Running", "{}", g["status"]);
    assert!(g["status"]["reason"].is_null(), "{}", g["status"]);
    env.stop();
    drop(env);
    drop(run_fs);
    drop(root_fs);
}
