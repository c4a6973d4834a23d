//! `NetNs`: a uniquely named network namespace that is deleted on drop, even while a test
//! panics, together with the processes still running inside it. Effectful.

use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Prefix of every namespace the harness creates; the leak check in `scripts/test` looks
/// for it.
pub const PREFIX: &str = "hk";

/// Panics unless the process runs as root: root tests fail rather than skip without it.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "hako root tests need root (run `sudo scripts/test` or `cargo test -p hako-tests --features root` as root)"
    );
}

/// A short random-enough suffix: pid, a process-wide counter and random bits.
fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u16 = rand::random();
    format!("{:x}{:x}{:04x}", std::process::id() & 0xfff, n, r)
}

/// Runs a command to completion and fails with its stderr when it exits non-zero.
pub fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {program}"))?;
    check_output(&format!("{cmd:?}"), out)
}

fn check_output(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`/run/netns/<name>`), removed on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `hk<tag>-<unique>` with its loopback up. `tag` should be a few letters.
    pub fn new(tag: &str) -> Result<Self> {
        require_root();
        let name = format!("{PREFIX}{tag}-{}", unique_suffix());
        run("ip", ["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, as CNI_NETNS expects it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> ARGS...` and returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", all)
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `sh -c script` inside the namespace and returns stdout; fails on non-zero exit.
    pub fn sh(&self, script: &str) -> Result<String> {
        let mut cmd = self.command("sh");
        cmd.args(["-c", script]).stdin(Stdio::null());
        let out = cmd.output().context("spawning ip netns exec")?;
        check_output(&format!("[{}] {script}", self.name), out)
    }

    /// Runs `sh -c script` inside the namespace and returns its full output, whatever the
    /// exit status.
    pub fn sh_output(&self, script: &str) -> Result<Output> {
        let mut cmd = self.command("sh");
        cmd.args(["-c", script]).stdin(Stdio::null());
        cmd.output().context("spawning ip netns exec")
    }

    /// Starts a background `sh -c script` inside the namespace. It is killed when the
    /// namespace is dropped, if not before.
    pub fn spawn(&self, script: &str) -> Result<Child> {
        let mut cmd = self.command("sh");
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.spawn().context("spawning background process in netns")
    }

    /// Runs `f` on a dedicated OS thread that has entered this namespace, and returns its
    /// value. A panic inside `f` is propagated to the caller. Netlink sockets opened inside
    /// `f` belong to this namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns into test netns")?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// PIDs of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        run("ip", ["netns", "pids", &self.name])
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Err(e) = run("ip", ["netns", "delete", &self.name]) {
            eprintln!("hako-tests: could not delete netns {}: {e:#}", self.name);
        }
    }
}
