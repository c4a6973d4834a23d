//! cgroup v2 in the VM lane's guest (the host mounts v1): a child group with a memory
//! limit is created, read back, given a process, enforced, and removed; a container's
//! `/sys/fs/cgroup` is its own cgroup (namespace root), read-only, with its limits.
#![cfg(feature = "vm")]

#[path = "shim_support/mod.rs"]
mod shim_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hako_tests::vm::{require_guest, Cgroup};

/// Kills and reaps the child on drop, so a failed assertion leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cgroup_v2_child_has_memory_limit_and_process() {
    require_guest();
    let cg = Cgroup::new("mem").unwrap();
    let path = cg.path().to_path_buf();

    let controllers = cg.read("cgroup.controllers").unwrap();
    for c in ["memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "{c} not delegated to {}: {controllers:?}",
            path.display()
        );
    }

    assert_eq!(cg.read("memory.max").unwrap(), "max");
    cg.write("memory.max", "67108864").unwrap();
    assert_eq!(cg.read("memory.max").unwrap(), "67108864");
    cg.write("pids.max", "32").unwrap();
    assert_eq!(cg.read("pids.max").unwrap(), "32");

    let child = Reaped(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    cg.add_pid(pid).unwrap();
    assert_eq!(cg.pids().unwrap(), [pid]);
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(own.trim(), format!("0::{}", cg.relative()));
    assert_eq!(cg.stat("cgroup.events", "populated").unwrap(), 1);

    drop(child);
    assert_eq!(cg.pids().unwrap(), Vec::<u32>::new());
    drop(cg);
    assert!(!path.exists(), "{} not removed", path.display());
}

#[test]
fn cgroup_v2_memory_max_is_enforced() {
    require_guest();
    let cg = Cgroup::new("oom").unwrap();
    cg.write("memory.max", &(16 << 20).to_string()).unwrap();
    cg.write("memory.swap.max", "0").ok();

    // The shell moves itself into the group, then fills 64 MiB of tmpfs: shmem pages are
    // charged to the writer's group and cannot be reclaimed without swap.
    let file = format!(
        "/dev/shm/{}",
        cg.path().file_name().unwrap().to_string_lossy()
    );
    let procs = cg.path().join("cgroup.procs");
    let status = Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$1\" && exec dd if=/dev/zero of=\"$2\" bs=1M count=64 2>/dev/null",
            "sh",
        ])
        .arg(&procs)
        .arg(&file)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    let oom_kills = cg.stat("memory.events", "oom_kill").unwrap();
    let _ = std::fs::remove_file(&file);

    assert!(
        !status.success(),
        "dd of 64 MiB succeeded under a 16 MiB memory.max"
    );
    assert!(oom_kills >= 1, "memory.events shows no oom_kill ({status})");
    assert!(
        cg.stat("memory.events", "max").unwrap() >= 1,
        "memory.events shows the limit never hit"
    );
    cg.kill_all(Duration::from_secs(5)).unwrap();
    assert!(Path::new(&file).metadata().is_err());
}

#[test]
fn container_sees_its_own_v2_cgroup_read_only() {
    require_guest();
    let env = shim_support::Env::new("vmview");
    let mut spec = env.spec(
        "view",
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /proc/self/cgroup; \
             grep ' /sys/fs/cgroup ' /proc/self/mounts | cut -d' ' -f3,4 | cut -d, -f1; \
             mkdir /sys/fs/cgroup/x 2>/dev/null && echo writable; \
             echo 1 > /sys/fs/cgroup/memory.max 2>/dev/null && echo raised; echo end",
        ],
    );
    let mut cg = env.cgroup("view");
    cg.memory_limit = Some(48 << 20);
    cg.cpu_quota = Some(25_000);
    spec.cgroup = Some(cg);
    let (st, _) = env.run(&spec);
    assert_eq!(st.exit_code, Some(0), "{st:?}");
    assert_eq!(
        env.stdout("view"),
        [
            (48u64 << 20).to_string().as_str(),
            "25000 100000",
            "0::/",
            "cgroup2 ro",
            "end",
        ]
    );
}
