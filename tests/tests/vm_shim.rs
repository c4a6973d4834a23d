//! hako-shim on cgroup v2 in the VM lane's guest (the host mounts v1): a memory limit leads
//! to OOMKilled, a pids limit holds, exec lands in the container's v2 cgroup, and delete kills
//! every process of the cgroup.
#![cfg(feature = "vm")]

#[path = "shim_support/mod.rs"]
mod shim_support;

use hako_shim::protocol::ExecRequest;
use hako_shim::state::Status;
use hako_tests::vm::require_guest;
use shim_support::Env;
use std::time::Duration;

#[test]
fn v2_memory_limit_leads_to_oomkilled() {
    require_guest();
    let env = Env::new("vmoom");
    let mut spec = env.spec(
        "oom",
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    let mut cg = env.cgroup("oom");
    cg.memory_limit = Some(24 << 20);
    spec.cgroup = Some(cg);
    let (st, _) = env.run(&spec);
    assert_eq!(st.reason.as_deref(), Some("OOMKilled"), "{st:?}");
    assert!(!env.stdout("oom").contains(&"survived".to_string()));
}

#[test]
fn v2_pids_limit_and_exec_cgroup() {
    require_guest();
    let env = Env::new("vmpids");
    let mut spec = env.spec("pids", &["sleep", "1000"]);
    let mut cg = env.cgroup("pids");
    cg.pids_limit = Some(5);
    cg.cpu_shares = Some(512);
    cg.cpu_quota = Some(50_000);
    spec.cgroup = Some(cg);
    let c = env.create(&spec).unwrap();
    let st = c.start().unwrap();
    assert_eq!(st.cgroup_dirs.len(), 1);
    let dir = &st.cgroup_dirs[0];
    assert_eq!(
        std::fs::read_to_string(dir.join("pids.max"))
            .unwrap()
            .trim(),
        "5"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim(),
        "50000 100000"
    );
    let r = c
        .exec(ExecRequest {
            args: vec![
                "sh".into(),
                "-c".into(),
                "cat /proc/self/cgroup; for i in 1 2 3 4 5 6; do sleep 5 & done 2>&1; wait".into(),
            ],
            timeout_ms: Some(60_000),
            ..Default::default()
        })
        .unwrap();
    let want = format!("0::/{}/kubepods/burstable/pod-pids/pids", env.cgroup_parent);
    assert_eq!(r.stdout.lines().next(), Some(want.as_str()), "{r:?}");
    assert!(
        r.stderr.contains("fork") || r.stdout.contains("fork"),
        "{r:?}"
    );
    let st = c.stop(Duration::from_millis(100)).unwrap();
    assert_eq!(st.status, Status::Stopped);
    c.delete().unwrap();
    assert!(!dir.exists());
}

/// Delete on cgroup v2 ends every process of the container through `cgroup.kill`, also the
/// children that outlive PID 1 in a shared pid namespace (the host's v1 lane uses the freezer).
#[test]
fn v2_delete_kills_the_whole_cgroup() {
    require_guest();
    let env = Env::new("vmkill");
    let mut spec = env.spec(
        "kill",
        &["sh", "-c", "sleep 1000 & sleep 1000 & exec sleep 1000"],
    );
    spec.namespaces.pid = Some("/proc/self/ns/pid".into());
    spec.cgroup = Some(env.cgroup("kill"));
    let c = env.create(&spec).unwrap();
    let st = c.start().unwrap();
    let dir = st.cgroup_dirs[0].clone();
    assert!(
        dir.join("cgroup.kill").exists(),
        "not a v2 cgroup: {}",
        dir.display()
    );
    let listed = || -> Vec<i32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listed().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "three processes: {:?}",
            listed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids = listed();
    // A process counts as gone once it is a zombie or reaped (the guest's init reaps orphans).
    let alive = |p: &i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| !s.contains(") Z "))
    };
    c.delete().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(alive) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running after delete: {:?}",
            pids.iter().filter(|p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!dir.exists(), "cgroup {} left", dir.display());
}
