//! Workload cgroups on the host's cgroup v1 (v2: `vm_cgroup.rs`): the pod cgroup
//! `kubepods[/<qos>]/pod<uid>` carries the pod's limits (sums plus overhead; none when a
//! container has none; BestEffort shares 2) and goes with the pod; inside a container,
//! `/sys/fs/cgroup` is its own cgroup namespace's view, read-only, showing its limits.
#![cfg(feature = "root")]

use hako_tests::agent::AgentEnv;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Removes, on drop, the `freezer` tree under the agent's cgroup parent, which the
/// environment's own guard does not cover.
struct FreezerGuard(PathBuf);

/// An agent environment whose freezer tree is removed after it (fields drop in order).
struct Env {
    env: AgentEnv,
    _freezer: FreezerGuard,
}

impl Env {
    fn new(tag: &str) -> Self {
        let env = AgentEnv::new(tag);
        let freezer = FreezerGuard(Path::new("/sys/fs/cgroup/freezer").join(&env.cgroup_parent));
        Env {
            env,
            _freezer: freezer,
        }
    }
}

impl Drop for FreezerGuard {
    fn drop(&mut self) {
        fn rm(p: &Path) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    rm(&e.path());
                }
            }
            let _ = std::fs::remove_dir(p);
        }
        rm(&self.0);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

fn pod(name: &str, img: &str, extra: &str, containers: &[&str]) -> String {
    let cs: String = containers
        .iter()
        .enumerate()
        .map(|(i, res)| {
            format!("  - {{name: c{i}, image: \"{img}\", command: [sleep, \"1000\"], resources: {res}}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n{cs}"
    )
}

fn uid_of(env: &AgentEnv, name: &str) -> String {
    let rec = env.wait_running(name, T);
    rec["pod"]["metadata"]["uid"].as_str().unwrap().to_string()
}

#[test]
fn pod_cgroups_carry_the_pod_limits_and_go_with_the_pod() {
    let mut e = Env::new("wcgpod");
    let env = &mut e.env;
    let img = env.image("sleep");
    // Guaranteed, two containers plus overhead: 600m cpu, 80Mi memory.
    env.write_manifest(
        "gu.yaml",
        &pod(
            "gu",
            &img,
            "  overhead: {cpu: 100m, memory: 16Mi}\n",
            &[
                "{limits: {cpu: 200m, memory: 32Mi}}",
                "{limits: {cpu: 300m, memory: 32Mi}}",
            ],
        ),
    );
    // Burstable, one container without limits: no pod limit, shares from requests.
    env.write_manifest(
        "bu.yaml",
        &pod(
            "bu",
            &img,
            "",
            &[
                "{requests: {cpu: 250m}, limits: {cpu: 500m, memory: 64Mi}}",
                "{requests: {memory: 16Mi}}",
            ],
        ),
    );
    env.write_manifest("be.yaml", &pod("be", &img, "", &["{}"]));
    env.start();

    let base = |ctrl: &str| {
        Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join(&env.cgroup_parent)
            .join("kubepods")
    };
    let gu = uid_of(env, "gu");
    let gu_mem = base("memory").join(format!("pod{gu}"));
    let gu_cpu = base("cpu").join(format!("pod{gu}"));
    assert_eq!(
        read(&gu_mem.join("memory.limit_in_bytes")),
        (80u64 << 20).to_string()
    );
    assert_eq!(read(&gu_cpu.join("cpu.cfs_quota_us")), "60000");
    assert_eq!(read(&gu_cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&gu_cpu.join("cpu.shares")), "614");
    // The containers' cgroups live under it, with their own limits.
    let pid = env.container_pid("gu", "c1").unwrap();
    let cg = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let mem = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .unwrap();
    let leaf = Path::new("/sys/fs/cgroup/memory").join(mem.trim_start_matches('/'));
    assert_eq!(leaf.parent(), Some(gu_mem.as_path()), "{cg}");
    assert_eq!(
        read(&leaf.join("memory.limit_in_bytes")),
        (32u64 << 20).to_string()
    );

    let bu = uid_of(env, "bu");
    let bu_mem = base("memory").join(format!("burstable/pod{bu}"));
    let unlimited: u64 = read(&bu_mem.join("memory.limit_in_bytes")).parse().unwrap();
    assert!(
        unlimited > 1 << 50,
        "burstable pod memory limit {unlimited}"
    );
    let bu_cpu = base("cpu").join(format!("burstable/pod{bu}"));
    assert_eq!(read(&bu_cpu.join("cpu.cfs_quota_us")), "-1");
    assert_eq!(read(&bu_cpu.join("cpu.shares")), "256");

    let be = uid_of(env, "be");
    let be_cpu = base("cpu").join(format!("besteffort/pod{be}"));
    assert_eq!(read(&be_cpu.join("cpu.shares")), "2");
    // The QoS cgroups: burstable carries its one pod's 250m (256 shares), besteffort the
    // minimum, as the kubelet's QoS container manager sets them.
    assert_eq!(read(&base("cpu").join("burstable/cpu.shares")), "256");
    assert_eq!(read(&base("cpu").join("besteffort/cpu.shares")), "2");

    // The pod cgroup goes with the pod.
    env.remove_manifest("gu.yaml");
    env.wait_for("gu's pod cgroup removed", T, |_| {
        (!gu_mem.exists() && !gu_cpu.exists()).then_some(())
    });
}

#[test]
fn container_sees_its_own_cgroup_limits_read_only() {
    let mut e = Env::new("wcgview");
    let env = &mut e.env;
    let img = env.image("sleep");
    env.write_manifest(
        "view.yaml",
        &pod("view", &img, "", &["{limits: {cpu: 250m, memory: 48Mi}}"]),
    );
    env.start();
    env.wait_running("view", T);
    let sh = |cmd: &str| {
        let out = env.cli(&["exec", "view-node1", "--", "sh", "-c", cmd]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, mem, err) = sh("cat /sys/fs/cgroup/memory/memory.limit_in_bytes");
    assert!(ok, "{err}");
    assert_eq!(mem, (48u64 << 20).to_string());
    let (ok, quota, err) =
        sh("cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us");
    assert!(ok, "{err}");
    assert_eq!(
        quota.split_whitespace().collect::<Vec<_>>(),
        ["25000", "100000"]
    );
    // The view's root is the container's own cgroup: no pod or kubepods directories in it.
    let (_, ls, _) = sh("ls /sys/fs/cgroup/memory");
    assert!(!ls.contains("kubepods") && !ls.contains("pod"), "{ls}");
    // Read-only: neither a limit nor a new group can be written.
    let (ok, _, err) = sh("echo 1000000000 > /sys/fs/cgroup/memory/memory.limit_in_bytes");
    assert!(!ok, "raised its own memory limit");
    assert!(err.contains("Read-only"), "{err}");
    let (ok, _, _) = sh("mkdir /sys/fs/cgroup/memory/x || mkdir /sys/fs/cgroup/x");
    assert!(!ok, "made a cgroup in its view");
    // From the host, the container's cgroup is the pod's child, with the limit unchanged.
    let pid = env.container_pid("view", "c0").unwrap();
    let host_cg = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let mem = host_cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .unwrap();
    assert!(mem.contains("/kubepods/pod"), "{host_cg}");
    let leaf = Path::new("/sys/fs/cgroup/memory").join(mem.trim_start_matches('/'));
    assert_eq!(
        read(&leaf.join("memory.limit_in_bytes")),
        (48u64 << 20).to_string()
    );
}
