//! Agent scale run (ignored by default; `cargo test ... --test agent_scale -- --ignored
//! --nocapture`): N pods (busybox sleep, image pulled once) from manifests to all Running;
//! prints total time, per-pod startup percentiles and the agent's peak RSS and CPU time.
//! Figures only: no timing assertion.
#![cfg(feature = "root")]
#![allow(clippy::print_stdout, clippy::cast_possible_truncation)]

use hako_tests::agent::AgentEnv;
use hako_tests::holdings::proc_status;
use std::time::{Duration, Instant};

#[test]
#[ignore]
fn scale_pods_to_running() {
    let n: usize = std::env::var("PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut env = AgentEnv::new("ascale");
    let img = env.image("sleep");
    // Pull once with a warm-up pod so the run measures pod startup, not the pull.
    env.write_manifest(
        "warm.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: warm}}\nspec:\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: c, image: \"{img}\"}}]\n"),
    );
    env.start();
    env.wait_running("warm", Duration::from_secs(60));
    // With PROBES=1 every pod also has a readiness probe and a liveness probe gated by a
    // startup probe that passes only after 30 s (idle CPU then includes probe work).
    let probes = if std::env::var("PROBES").is_ok_and(|v| v == "1") {
        ", startupProbe: {exec: {command: [sh, -c, 'test $(cut -d. -f1 /proc/uptime) -gt 0 && test -f /tmp/never']}, periodSeconds: 10, failureThreshold: 100}, readinessProbe: {tcpSocket: {port: 1}, periodSeconds: 10}, livenessProbe: {exec: {command: [\"true\"]}}"
    } else {
        ""
    };
    let mut all = String::new();
    for i in 0..n {
        all.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: c, image: \"{img}\"{probes}}}]\n"
        ));
    }
    let t0 = Instant::now();
    let t0_wall = k8s_openapi::chrono::Utc::now();
    env.write_manifest("pods.yaml", &all);
    env.wait_for("all running", Duration::from_secs(600), |e| {
        let running = e
            .records()
            .iter()
            .filter(|r| r["pod"]["status"]["phase"] == "Running")
            .count();
        (running == n + 1).then_some(())
    });
    let total = t0.elapsed();
    let mut per: Vec<f64> = env
        .records()
        .iter()
        .filter(|r| r["pod"]["metadata"]["name"] != "warm-node1")
        .filter_map(|r| {
            let s = r["pod"]["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
                .as_str()?;
            let t = k8s_openapi::chrono::DateTime::parse_from_rfc3339(s).ok()?;
            Some(
                (t.with_timezone(&k8s_openapi::chrono::Utc) - t0_wall).num_milliseconds() as f64
                    / 1000.0,
            )
        })
        .collect();
    per.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| per[((per.len() as f64 - 1.0) * p).floor() as usize];
    let pid = env.agent_pid();
    let hwm = proc_status(pid, "VmHWM:");
    let rss = proc_status(pid, "VmRSS:");
    let threads = proc_status(pid, "Threads:");
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let ticks = cpu_ticks();
    std::thread::sleep(Duration::from_secs(3));
    let idle = cpu_ticks() - ticks;
    println!(
        "pods={n} all_running={:.2}s start_since_write p50={:.2}s p99={:.2}s agent_peak_rss={}KiB rss_now={}KiB threads={} cpu={:.2}s idle_cpu_3s={:.2}s",
        total.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        hwm,
        rss,
        threads,
        ticks as f64 / 100.0,
        idle as f64 / 100.0
    );
    assert_eq!(per.len(), n);
}
