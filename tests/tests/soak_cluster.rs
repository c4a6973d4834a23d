//! Soak root test in cluster mode: `SOAK_CYCLES` cycles (3) of `SOAK_PODS` pods (20) created
//! through the apiserver fixture, Running, deleted gracefully and gone from the apiserver.
//! After every cycle the node must hold nothing of them — sandbox dirs, netns mounts, veths,
//! IPAM reservations, CNI cache entries, containers, shim processes, pod dirs, cgroups — and
//! the agent's RSS and thread count are printed per cycle. The bound on RSS growth is loose
//! (a leak of per-pod state grows by megabytes per cycle); the figures are the point.
//! `scripts/bench-agent --soak` runs it at 100 pods × 10 cycles on the release build.
#![cfg(feature = "root")]
#![allow(clippy::print_stdout)]

use hako_tests::cluster::{cluster_env, condition};
use hako_tests::holdings::{dir_entries, holdings, ip_files, mounts_under, proc_status, Holdings};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pod and container cgroups under the agent's cgroup parent, in every hierarchy (the
/// node-level QoS cgroups `kubepods`, `kubepods/burstable` and `kubepods/besteffort` stay, as
/// the kubelet's do).
fn cgroups(parent: &str) -> Vec<String> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots: Vec<_> = ["cpu", "memory", "pids", "unified"]
        .iter()
        .map(|c| base.join(c).join(parent))
        .collect();
    roots.push(base.join(parent));
    fn walk(d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = e.path().display().to_string();
                let qos = ["/kubepods", "/kubepods/burstable", "/kubepods/besteffort"]
                    .iter()
                    .any(|q| p.ends_with(q));
                if !qos {
                    out.push(p);
                }
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    for r in &roots {
        walk(r, &mut out);
    }
    out
}

#[test]
fn pod_churn_leaves_nothing_and_memory_flat() {
    let pods = env_or("SOAK_PODS", 20);
    let cycles = env_or("SOAK_CYCLES", 3);
    let (mut env, srv) = cluster_env("soak");
    env.start();
    let t = Duration::from_secs(60 + 3 * pods as u64);
    let wait = |what: &str, f: &mut dyn FnMut() -> Option<String>| {
        let end = Instant::now() + t;
        let mut last = String::new();
        while Instant::now() < end {
            match f() {
                None => return,
                Some(s) => last = s,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out waiting for {what}: {last}\nagent log:\n{}",
            hako_tests::agent::tail(&env.agent_log(), 6000)
        );
    };
    wait("node Ready", &mut || {
        let n = srv.get("", "nodes", "", "node1");
        (n.as_ref().map(|n| condition(n, "Ready")) != Some(json!("True")))
            .then(|| "not Ready".into())
    });
    let pid = env.agent_pid();
    let img = env.image("sleep");
    let mut figures = Vec::new();
    for cycle in 0..cycles {
        for i in 0..pods {
            srv.create(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("s{cycle}-{i}"), "namespace": "default",
                             "labels": {"app": "soak"}},
                "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": img,
                        "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}]}}))
                .expect("create pod");
        }
        wait(
            &format!("cycle {cycle}: {pods} pods Running and Ready"),
            &mut || {
                let list = srv.list("", "pods");
                let ready = list
                    .iter()
                    .filter(|p| {
                        p["status"]["phase"] == "Running" && condition(p, "Ready") == "True"
                    })
                    .count();
                (ready < pods).then(|| format!("{ready} of {pods}"))
            },
        );
        let rss_full = proc_status(pid, "VmRSS:");
        let threads_full = proc_status(pid, "Threads:");
        for i in 0..pods {
            srv.delete("", "pods", "default", &format!("s{cycle}-{i}"), &json!({}))
                .expect("delete pod");
        }
        wait(
            &format!("cycle {cycle}: pods gone from the apiserver"),
            &mut || {
                let n = srv.list("", "pods").len();
                (n > 0).then(|| format!("{n} left"))
            },
        );
        let ipam = env.tmp.path().join("ipam");
        wait(
            &format!("cycle {cycle}: nothing left on the node"),
            &mut || {
                let h = holdings(&env);
                let run_containers = dir_entries(&env.run.join("containers"));
                let pod_dirs = dir_entries(&env.root.join("pods"));
                let addrs = ip_files(&ipam);
                let cg = cgroups(&env.cgroup_parent);
                let mounts = mounts_under(env.tmp.path());
                let left = usize::from(h != Holdings::default())
                    + run_containers.len()
                    + pod_dirs.len()
                    + addrs.len()
                    + cg.len()
                    + mounts.len();
                (left > 0).then(|| {
                    format!(
                        "{h:?}, shim dirs {run_containers:?}, pod dirs {pod_dirs:?}, \
                     addresses {addrs:?}, cgroups {cg:?}, mounts {mounts:?}"
                    )
                })
            },
        );
        // Give the worker tasks and the blocking pool's idle threads time to end.
        std::thread::sleep(Duration::from_secs(2));
        let rss_empty = proc_status(pid, "VmRSS:");
        let threads_empty = proc_status(pid, "Threads:");
        println!(
            "soak cycle {cycle}: {pods} pods running: RSS {:.1} MiB, {threads_full} threads; \
             all deleted: RSS {:.1} MiB, {threads_empty} threads",
            rss_full as f64 / 1024.0,
            rss_empty as f64 / 1024.0
        );
        figures.push((rss_full, rss_empty, threads_empty));
    }
    if std::env::var_os("SOAK_AGENT_LOG").is_some() {
        println!("agent log:\n{}", env.agent_log());
    }
    let (first_full, first_empty, _) = figures[0];
    let (last_full, last_empty, last_threads) = figures[figures.len() - 1];
    println!(
        "soak: {cycles} cycles of {pods} pods: RSS with pods {:.1} → {:.1} MiB, empty {:.1} → {:.1} MiB",
        first_full as f64 / 1024.0,
        last_full as f64 / 1024.0,
        first_empty as f64 / 1024.0,
        last_empty as f64 / 1024.0
    );
    // Loose bounds: per-pod state that outlives its pod grows RSS by a few MiB per cycle.
    assert!(
        last_empty <= first_empty + 16 * 1024,
        "RSS grew from {first_empty} KiB to {last_empty} KiB over {cycles} cycles"
    );
    assert!(last_threads <= 40, "{last_threads} threads after the churn");
}
