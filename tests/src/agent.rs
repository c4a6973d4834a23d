//! Harness of the agent root tests: a fresh network namespace that holds everything (the local
//! registry on its loopback, the `hako-agent` process, the CNI bridge it creates, the pods'
//! namespaces behind it), temporary root/run/log/manifest/CNI dirs, a unique cgroup parent,
//! and a drop guard that removes every container, shim, mount and cgroup even when the test
//! fails. Effectful.

use crate::netns::NetNs;
use crate::registry::Registry;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary from the same target dir as the test executable (or `$env_var`).
pub fn target_bin(name: &str, env_var: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p hako-agent -p hako-shim` with the same target dir first",
        p.display()
    );
    p
}

/// `--eviction-hard` of test agents that do not set their own: the kubelet's memory default
/// only. The disk defaults (`nodefs.available<10%`, `imagefs.available<15%`, ...) measure the
/// filesystem of the temp dirs, which the machine shares with every build, so a busy disk
/// would put the test node under DiskPressure (refusing and evicting its pods).
pub const TEST_EVICTION_HARD: &str = "memory.available<100Mi";

/// One agent under test with its own namespace, registry and directories.
pub struct AgentEnv {
    /// Temporary directory holding everything.
    pub tmp: tempfile::TempDir,
    /// The registry (inside `ns`).
    pub registry: Registry,
    /// Manifest directory.
    pub manifests: PathBuf,
    /// Agent state root.
    pub root: PathBuf,
    /// Agent run dir.
    pub run: PathBuf,
    /// Pod log dir.
    pub logs: PathBuf,
    /// cgroup parent (relative to each hierarchy root).
    pub cgroup_parent: String,
    /// Extra agent arguments.
    pub args: Vec<String>,
    agent: Option<Child>,
    starts: u32,
    /// The namespace everything lives in (dropped last).
    pub ns: NetNs,
}

fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut v: Vec<PathBuf> = ["cpu", "cpuacct", "memory", "pids", "freezer", "unified"]
        .iter()
        .map(|c| base.join(c))
        .filter(|p| p.is_dir())
        .collect();
    if base.join("cgroup.controllers").exists() {
        v.push(base.to_path_buf());
    }
    v
}

fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => break,
        }
    }
}

impl AgentEnv {
    /// A namespace with the standard images in a registry; the agent is not started yet.
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        let ns = NetNs::new(tag).expect("netns");
        let (registry, _) = ns
            .run(Registry::with_standard_images)
            .expect("enter netns")
            .expect("registry");
        let tmp = tempfile::Builder::new()
            .prefix(&format!("hako-agent-{tag}-"))
            .tempdir()
            .expect("tempdir");
        let p = tmp.path().to_path_buf();
        let conf = p.join("net.d");
        for d in ["manifests", "root", "run", "logs", "net.d", "ipam"] {
            std::fs::create_dir_all(p.join(d)).expect("mkdir");
        }
        std::fs::write(
            conf.join("10-test.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "hako-test",
                "plugins": [{
                    "type": "bridge", "bridge": "hkbr0", "isGateway": true, "ipMasq": false,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]],
                             "dataDir": p.join("ipam")}
                }]
            })
            .to_string(),
        )
        .expect("conflist");
        let cgroup_parent = format!(
            "hako-test-agent-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u16>()
        );
        AgentEnv {
            manifests: p.join("manifests"),
            root: p.join("root"),
            run: p.join("run"),
            logs: p.join("logs"),
            cgroup_parent,
            args: vec![],
            agent: None,
            starts: 0,
            registry,
            tmp,
            ns,
        }
    }

    /// Switches the network to hako-cni (from the target dir; the reference `loopback` plugin
    /// is still used for `lo`). Call before [`AgentEnv::start`].
    pub fn use_hako_cni(&mut self) {
        let p = self.tmp.path();
        std::fs::write(
            p.join("net.d").join("10-test.conflist"),
            serde_json::json!({
                "cniVersion": "1.1.0",
                "name": "hako-test",
                "plugins": [{
                    "type": "hako-cni", "bridge": "hkbr0", "isGateway": true, "ipMasq": false,
                    "dataDir": p.join("ipam"),
                    "ipam": {"ranges": [{"subnet": "10.88.0.0/24"}]}
                }]
            })
            .to_string(),
        )
        .expect("conflist");
        let dir = target_bin("hako-cni", "HAKO_CNI_BIN")
            .parent()
            .expect("bin dir")
            .display()
            .to_string();
        self.args.extend(["--cni-bin-dir".to_string(), dir]);
    }

    /// `127.0.0.1:<port>/busybox:<tag>` (tags: `sleep`, `plain`, `oci` = httpd as user app).
    pub fn image(&self, tag: &str) -> String {
        self.registry.reference(&format!("busybox:{tag}"))
    }

    /// The agent's stderr log of the current (or last) start.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("agent-{}.log", self.starts)))
            .unwrap_or_default()
    }

    /// Starts `hako-agent` inside the namespace.
    pub fn start(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        self.starts += 1;
        let log = std::fs::File::create(self.tmp.path().join(format!("agent-{}.log", self.starts)))
            .expect("agent log");
        let mut cmd = Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"));
        cmd.arg("--pod-manifest-path")
            .arg(&self.manifests)
            .arg("--root-dir")
            .arg(&self.root)
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--pod-log-dir")
            .arg(&self.logs)
            .arg("--shim-binary")
            .arg(target_bin("hako-shim", "HAKO_SHIM_BIN"))
            .arg("--cni-conf-dir")
            .arg(self.tmp.path().join("net.d"))
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(["--hostname-override", "node1", "--node-ip", "10.88.0.1"])
            .args([
                "--cluster-dns",
                "10.96.0.10",
                "--file-check-frequency",
                "0.3",
            ])
            .args(&self.args)
            .args(["--cni-bin-dir", "/usr/lib/cni"])
            .env("RUST_LOG", "info,hako_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.args.iter().any(|a| a == "--eviction-hard") {
            cmd.args(["--eviction-hard", TEST_EVICTION_HARD]);
        }
        let child = self
            .ns
            .run(move || cmd.spawn())
            .expect("enter netns")
            .expect("spawn hako-agent");
        self.agent = Some(child);
    }

    /// The agent's pid (panics when it is not running).
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").id()
    }

    /// Stops the agent with SIGTERM (pods keep running unless --stop-pods-on-exit).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Writes a manifest file (atomically, so the agent never reads half a file).
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.tmp.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.manifests.join(name)).expect("rename manifest");
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, name: &str) {
        let _ = std::fs::remove_file(self.manifests.join(name));
    }

    /// Every pod record (`status.json`) as JSON.
    pub fn records(&self) -> Vec<Value> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.root.join("pods")) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path().join("status.json")) {
                    if let Ok(j) = serde_json::from_slice::<Value>(&b) {
                        v.push(j);
                    }
                }
            }
        }
        v
    }

    /// The record of pod `name` (`<name>-node1` for static pods).
    pub fn record(&self, name: &str) -> Option<Value> {
        let full = format!("{name}-node1");
        self.records()
            .into_iter()
            .find(|r| r["pod"]["metadata"]["name"] == full.as_str())
    }

    /// Status of container `c` of pod `name` (regular or init).
    pub fn container_status(&self, name: &str, c: &str) -> Option<Value> {
        let r = self.record(name)?;
        let st = &r["pod"]["status"];
        for k in ["containerStatuses", "initContainerStatuses"] {
            if let Some(a) = st[k].as_array() {
                if let Some(s) = a.iter().find(|s| s["name"] == c) {
                    return Some(s.clone());
                }
            }
        }
        None
    }

    /// Event reasons+messages of pod `name`.
    pub fn events(&self, name: &str) -> Vec<(String, String)> {
        self.record(name)
            .and_then(|r| r["events"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or("").to_string(),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Polls `f` until it returns Some, or panics after `timeout` with the agent's log.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                let recs: Vec<String> = self
                    .records()
                    .iter()
                    .map(|r| {
                        format!(
                            "{}: {}\nevents: {}",
                            r["pod"]["metadata"]["name"], r["pod"]["status"], r["events"]
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}\n--- records:\n{}\n--- agent log (tail):\n{}",
                    recs.join("\n"),
                    tail(&self.agent_log(), 6000)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pod phase.
    pub fn phase(&self, name: &str) -> Option<String> {
        self.record(name)
            .and_then(|r| r["pod"]["status"]["phase"].as_str().map(String::from))
    }

    /// Waits until every listed container of the pod is running and ready.
    pub fn wait_running(&self, name: &str, timeout: Duration) -> Value {
        self.wait_for(&format!("pod {name} Running and Ready"), timeout, |e| {
            let r = e.record(name)?;
            let st = &r["pod"]["status"];
            let ready = st["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (st["phase"] == "Running" && ready).then_some(r)
        })
    }

    /// Runs `hako-agent ARGS` (get/describe/logs/exec) against this agent's dirs.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"));
        cmd.arg("--root-dir")
            .arg(&self.root)
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--pod-log-dir")
            .arg(&self.logs)
            .arg("--shim-binary")
            .arg(target_bin("hako-shim", "HAKO_SHIM_BIN"))
            .args(args);
        cmd.output().expect("run hako-agent")
    }

    /// Starts `hako-agent ARGS` with stdout piped (e.g. `logs -f`).
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        Command::new(target_bin("hako-agent", "HAKO_AGENT_BIN"))
            .arg("--root-dir")
            .arg(&self.root)
            .arg("--pod-log-dir")
            .arg(&self.logs)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn hako-agent")
    }

    /// Host pid of the running container `c` of pod `name` (from the shim state).
    pub fn container_pid(&self, name: &str, c: &str) -> Option<i32> {
        let s = self.container_status(name, c)?;
        let id = s["containerID"]
            .as_str()?
            .strip_prefix("hako://")?
            .to_string();
        let st: Value = serde_json::from_slice(
            &std::fs::read(self.run.join("containers").join(id).join("state.json")).ok()?,
        )
        .ok()?;
        st["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
    }

    /// Seconds between the starts of consecutive attempts of container `c` of pod `name`,
    /// from the modification times of its CRI log files `<n>.log` (each attempt writes a line
    /// as it starts and then exits at once).
    pub fn crash_gaps(&self, name: &str, c: &str) -> Vec<f64> {
        let prefix = format!("default_{name}-node1_");
        let Some(dir) = std::fs::read_dir(&self.logs).ok().and_then(|rd| {
            rd.flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path().join(c))
        }) else {
            return vec![];
        };
        let mut times: Vec<(u32, std::time::SystemTime)> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n: u32 = e
                            .file_name()
                            .to_string_lossy()
                            .strip_suffix(".log")?
                            .parse()
                            .ok()?;
                        Some((n, e.metadata().ok()?.modified().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        times.sort();
        times
            .windows(2)
            .map(|w| {
                w[1].1
                    .duration_since(w[0].1)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            })
            .collect()
    }

    /// The agent's Prometheus text from `GET /metrics` on its default healthz address
    /// (127.0.0.1:10248 inside the test namespace); empty when it does not answer.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        self.ns
            .run(|| {
                let mut s = std::net::TcpStream::connect("127.0.0.1:10248").ok()?;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out.split_once("\r\n\r\n")?.1.to_string())
            })
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Shim container state dirs under the run dir.
    pub fn shim_containers(&self) -> Vec<String> {
        std::fs::read_dir(self.run.join("containers"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The value of one sample (`name` with its labels, e.g.
/// `prober_probe_total{probe_type="Readiness",result="failed"}`) in Prometheus text; None when
/// absent.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The end of a string.
pub fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

impl Drop for AgentEnv {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- agent log (tail):\n{}", tail(&self.agent_log(), 8000));
        }
        // Containers and their shims.
        let rt = hako_shim::client::Runtime::new(
            target_bin("hako-shim", "HAKO_SHIM_BIN"),
            self.run.join("containers"),
        );
        for st in rt.list().unwrap_or_default() {
            if let Err(e) = rt.force_delete(&st.id) {
                eprintln!("hako-tests: could not delete container {}: {e}", st.id);
            }
        }
        // Mounts under the temp dir (pod namespaces), deepest first.
        let _ = crate::holdings::unmount_under(self.tmp.path());
        for r in cgroup_roots() {
            remove_tree(&r.join(&self.cgroup_parent));
        }
    }
}
