//! Shared helpers of the shim root tests: the `hako-shim` binary, a busybox rootfs built in a
//! temp dir, and an environment that deletes every container, shim and cgroup it made.
#![allow(dead_code)]

use hako_shim::client::{Runtime, ShimClient};
use hako_shim::logs::{parse_record, Record};
use hako_shim::spec::{CgroupSpec, ContainerSpec, LogSpec, Process, Rootfs};
use hako_shim::state::{State, Status};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The shim binary: `$HAKO_SHIM_BIN`, or `hako-shim` next to the test binary's directory
/// (built by `cargo build -p hako-shim` / `cargo test --workspace`).
pub fn shim_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HAKO_SHIM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("hako-shim");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p hako-shim` with the same target dir first",
        p.display()
    );
    p
}

/// Write a busybox root filesystem (with `root` and `app` users) under `dir`.
pub fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "tmp", "home/app", "proc", "sys", "dev"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        if name != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(name));
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
    )
    .unwrap();
    std::os::unix::fs::chown(dir.join("home/app"), Some(1000), Some(1000)).unwrap();
}

/// A test environment: temp state root, busybox rootfs, unique cgroup parent.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub rt: Runtime,
    pub rootfs: PathBuf,
    pub cgroup_parent: String,
    made: Mutex<Vec<String>>,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        hako_tests::require_root();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("hako-shim-{tag}-"))
            .tempdir()
            .unwrap();
        let rootfs = tmp.path().join("busybox");
        busybox_rootfs(&rootfs);
        let rt = Runtime::new(shim_bin(), tmp.path().join("state"));
        Env {
            cgroup_parent: format!(
                "hako-test-{tag}-{}-{:x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            tmp,
            rt,
            rootfs,
            made: Mutex::new(Vec::new()),
        }
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.tmp.path().join("logs").join(id).join("0.log")
    }

    /// A spec running `args` from the busybox rootfs with a CRI log.
    pub fn spec(&self, id: &str, args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            id: id.into(),
            rootfs: Rootfs::Dir(self.rootfs.clone()),
            process: Process {
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            log: Some(LogSpec {
                path: self.log_path(id),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A cgroup under this environment's unique parent, pod-style.
    pub fn cgroup(&self, id: &str) -> CgroupSpec {
        CgroupSpec {
            path: format!("{}/kubepods/burstable/pod-{id}/{id}", self.cgroup_parent),
            ..Default::default()
        }
    }

    /// Clean this container up on drop (for containers created outside [`Env::create`]).
    pub fn track(&self, id: &str) {
        self.made.lock().unwrap().push(id.to_string());
    }

    pub fn create(
        &self,
        spec: &ContainerSpec,
    ) -> Result<ShimClient, hako_shim::client::ClientError> {
        self.made.lock().unwrap().push(spec.id.clone());
        self.rt.create(spec)
    }

    /// Create, start, wait (bounded) and return the final state and the log records.
    pub fn run(&self, spec: &ContainerSpec) -> (State, Vec<Record>) {
        let c = self.create(spec).expect("create");
        c.start().expect("start");
        let st = c.wait(Some(Duration::from_secs(60))).expect("wait");
        assert_eq!(
            st.status,
            Status::Stopped,
            "container {} did not stop",
            spec.id
        );
        let recs = self.records(&spec.id);
        c.delete().expect("delete");
        (st, recs)
    }

    pub fn records(&self, id: &str) -> Vec<Record> {
        let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
        text.lines()
            .map(|l| parse_record(l).unwrap_or_else(|| panic!("not a CRI log line: {l:?}")))
            .collect()
    }

    pub fn stdout(&self, id: &str) -> Vec<String> {
        self.records(id)
            .into_iter()
            .filter(|r| r.stream == "stdout")
            .map(|r| r.line)
            .collect()
    }
}

/// Removes empty directories bottom-up (cgroup directories cannot be removed recursively).
pub fn rmdir_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

impl Drop for Env {
    fn drop(&mut self) {
        let ids = self.made.lock().map(|m| m.clone()).unwrap_or_default();
        for id in ids {
            // force_delete signals only processes whose start time matches the state file
            // (never a recycled pid) and kills what is left in the container's cgroup.
            if self.rt.client(&id).delete().is_err() {
                let _ = self.rt.force_delete(&id);
            }
        }
        let root = Path::new("/sys/fs/cgroup");
        let mut bases = vec![root.to_path_buf()];
        for c in hako_shim::cgroup::V1_CONTROLLERS {
            bases.push(root.join(c));
        }
        for b in bases {
            let d = b.join(&self.cgroup_parent);
            // Processes may take a moment to leave after SIGKILL.
            for _ in 0..50 {
                rmdir_tree(&d);
                if !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
