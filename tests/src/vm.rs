//! Helpers for tests that run inside the VM lane's guest (`scripts/vm-test`, feature
//! `vm`): detecting the guest, and cgroup v2 child groups that kill their members and
//! remove themselves on drop. Effectful.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::require_root;

/// Where the guest mounts the cgroup v2 hierarchy.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";

/// Prefix of every cgroup the helpers create.
pub const CGROUP_PREFIX: &str = "hako-test-";

/// True inside the VM lane's guest: `scripts/vm-test` sets `HAKO_VM=1` there.
pub fn in_guest() -> bool {
    std::env::var_os("HAKO_VM").is_some_and(|v| v == "1")
}

/// True when `path` is the root of a mounted cgroup v2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Panics unless this runs as root inside the VM lane's guest with cgroup v2 mounted:
/// `vm` tests fail rather than skip elsewhere.
pub fn require_guest() {
    require_root();
    assert!(
        in_guest(),
        "this test needs the VM lane's guest kernel: run it with scripts/vm-test \
         (e.g. `scripts/vm-test --test vm_ipvs`), not directly on the host"
    );
    assert!(
        is_cgroup2(Path::new(CGROUP2_ROOT)),
        "{CGROUP2_ROOT} is not a cgroup v2 mount in this guest"
    );
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u16 = rand::random();
    format!("{:x}-{n:x}-{r:04x}", std::process::id())
}

/// A child cgroup `hako-test-<tag>-<unique>` of the cgroup v2 root. On drop its
/// processes are killed (`cgroup.kill`) and the directory is removed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the child group under [`CGROUP2_ROOT`].
    pub fn new(tag: &str) -> Result<Self> {
        Self::new_in(Path::new(CGROUP2_ROOT), tag)
    }

    /// Creates the child group under `parent`, a directory of a cgroup v2 hierarchy.
    pub fn new_in(parent: &Path, tag: &str) -> Result<Self> {
        let path = parent.join(format!("{CGROUP_PREFIX}{tag}-{}", unique_suffix()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The group's path relative to the hierarchy root, as `/proc/<pid>/cgroup` shows it.
    pub fn relative(&self) -> String {
        let rel = self
            .path
            .strip_prefix(CGROUP2_ROOT)
            .unwrap_or(&self.path)
            .display()
            .to_string();
        format!("/{}", rel.trim_start_matches('/'))
    }

    /// Writes `value` to the interface file `file` (e.g. `memory.max`).
    pub fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.path.join(file);
        fs::write(&p, value).with_context(|| format!("writing {value:?} to {}", p.display()))
    }

    /// Reads the interface file `file`, trimmed.
    pub fn read(&self, file: &str) -> Result<String> {
        let p = self.path.join(file);
        let s = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(s.trim().to_string())
    }

    /// Moves process `pid` into the group.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The processes in the group (`cgroup.procs`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let procs = self.read("cgroup.procs")?;
        procs
            .lines()
            .map(|l| {
                l.trim()
                    .parse()
                    .with_context(|| format!("bad pid {l:?} in {}", self.path.display()))
            })
            .collect()
    }

    /// A counter from a flat-keyed file such as `memory.events` (`oom_kill 1`).
    pub fn stat(&self, file: &str, key: &str) -> Result<u64> {
        let text = self.read(file)?;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            if it.next() == Some(key) {
                if let Some(v) = it.next() {
                    return v
                        .parse()
                        .with_context(|| format!("bad value for {key} in {file}: {line:?}"));
                }
            }
        }
        bail!("no {key} in {}/{file}", self.path.display())
    }

    /// Kills every process in the group and waits (up to `timeout`) until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        self.write("cgroup.kill", "1")?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.stat("cgroup.events", "populated")? == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} still populated after {timeout:?}", self.path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all(Duration::from_secs(10)) {
            eprintln!("hako-tests: {e:#}");
        }
        // An emptied group can still be briefly busy; retry a little.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!(
                        "hako-tests: could not remove cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
