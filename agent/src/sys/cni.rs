//! CNI client (effectful): runs the network configuration list found in the CNI conf dir the
//! way containerd's libcni does. ADD runs every plugin in order with the previous plugin's
//! result as `prevResult`; the final result is cached (with the config it came from) under
//! the cache dir so DEL and CHECK use the same network even if the conf dir changed; DEL runs
//! the plugins in reverse order and succeeds when nothing is cached. The loopback network
//! (`type: loopback`, interface `lo`) is brought up first, as containerd does.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Default `--cni-timeout`: what the kubelet gives a whole RunPodSandbox (twice its 2 min
/// runtime request timeout), which bounds containerd's CNI setup of that sandbox.
pub const DEFAULT_CNI_TIMEOUT: Duration = Duration::from_secs(240);

/// Most bytes kept of a plugin's stdout or stderr (the rest is read and dropped).
const MAX_PLUGIN_OUTPUT: u64 = 4 << 20;

/// CNI failures, with the plugin's code and message when it returned one.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No usable configuration in the conf dir.
    #[error("no network config found in {0}")]
    NoConfig(PathBuf),
    /// A config file is not valid JSON or lacks fields.
    #[error("network config {0}: {1}")]
    BadConfig(PathBuf, String),
    /// The plugin binary is not in any bin dir.
    #[error("failed to find plugin {0:?} in path {1:?}")]
    NoPlugin(String, Vec<PathBuf>),
    /// The plugin could not be run.
    #[error("plugin {0}: {1}")]
    Exec(String, std::io::Error),
    /// The plugin returned an error.
    #[error(transparent)]
    Plugin(Box<PluginFailure>),
    /// The plugin does not support the list's `cniVersion` (CNI error code 1).
    #[error(transparent)]
    IncompatibleVersion(Box<VersionMismatch>),
    /// Result cache I/O.
    #[error("cni cache {0}: {1}")]
    Cache(PathBuf, std::io::Error),
    /// The plugin did not finish within the deadline; it was killed with its process group.
    #[error("plugin type={plugin:?} ({command}) did not finish within {}s; killed", .after.as_secs_f64())]
    Timeout {
        /// Plugin type.
        plugin: String,
        /// ADD, DEL, CHECK.
        command: String,
        /// The deadline it ran into.
        after: Duration,
    },
}

/// A plugin's error result.
#[derive(Debug, thiserror::Error)]
#[error("plugin type={plugin:?} name={network:?} failed ({command}): code {code}: {msg}{}", details_suffix(.details))]
pub struct PluginFailure {
    /// Plugin type.
    pub plugin: String,
    /// Network name.
    pub network: String,
    /// ADD, DEL, CHECK.
    pub command: String,
    /// CNI error code.
    pub code: u64,
    /// Message.
    pub msg: String,
    /// Details.
    pub details: String,
}

/// A plugin refused the network list's `cniVersion`: which plugin, which version the list
/// asks for and which versions the plugin supports (from its `VERSION` answer, or from its
/// error message when it gives none), so that the operator can pick a version every plugin of
/// the list supports.
#[derive(Debug, thiserror::Error)]
#[error(
    "CNI plugin {plugin:?} ({}) of network {network:?} does not support cniVersion {config_version:?} \
     ({command}); it supports {}; set \"cniVersion\" in {} to a version every plugin of the list \
     supports{}",
    .binary.display(),
    supported_text(.supported, .msg),
    .config.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "the conflist".into()),
    max_common_hint(.supported, .config_version)
)]
pub struct VersionMismatch {
    /// Plugin type.
    pub plugin: String,
    /// The plugin binary that was run.
    pub binary: PathBuf,
    /// Network name.
    pub network: String,
    /// The conflist file, when the list came from one.
    pub config: Option<PathBuf>,
    /// ADD, DEL, CHECK.
    pub command: String,
    /// The list's `cniVersion`.
    pub config_version: String,
    /// What the plugin's `VERSION` command answered in `supportedVersions` (empty when it
    /// gave no usable answer).
    pub supported: Vec<String>,
    /// The plugin's own error message and details.
    pub msg: String,
}

fn supported_text(supported: &[String], msg: &str) -> String {
    if supported.is_empty() {
        format!("an unknown set of versions (it said: {msg})")
    } else {
        format!("[{}]", supported.join(", "))
    }
}

/// " (for example 1.0.0)": the highest supported version below the asked one, if any.
fn max_common_hint(supported: &[String], asked: &str) -> String {
    let key = |v: &str| -> (u64, u64, u64) {
        let mut it = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        (
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    };
    supported
        .iter()
        .filter(|v| key(v) < key(asked))
        .max_by_key(|v| key(v))
        .map(|v| format!(" (for example {v})"))
        .unwrap_or_default()
}

/// The `supportedVersions` of a plugin's `VERSION` answer.
fn parse_supported_versions(stdout: &[u8]) -> Vec<String> {
    serde_json::from_slice::<Value>(stdout)
        .ok()
        .and_then(|v| v.get("supportedVersions").cloned())
        .and_then(|v| v.as_array().cloned())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn details_suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!("; {d}")
    }
}

/// Where configs, plugins and the result cache are.
#[derive(Debug, Clone)]
pub struct CniConfig {
    /// Conf dir (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Plugin dirs (`/opt/cni/bin`).
    pub bin_dirs: Vec<PathBuf>,
    /// Result cache dir (`<root>/cni`).
    pub cache_dir: PathBuf,
    /// Deadline of one plugin invocation (`--cni-timeout`); past it the plugin and everything
    /// in its process group is killed and the call fails with [`CniError::Timeout`].
    pub timeout: Duration,
}

/// Identity of one attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Sandbox id (CNI_CONTAINERID).
    pub container_id: String,
    /// Netns path.
    pub netns: PathBuf,
    /// Interface name in the pod (`eth0`).
    pub ifname: String,
    /// Pod namespace, name, uid for CNI_ARGS.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod uid.
    pub pod_uid: String,
}

impl Attachment {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }
}

/// A network configuration list.
#[derive(Debug, Clone)]
pub struct NetworkList {
    /// `name`.
    pub name: String,
    /// `cniVersion`.
    pub cni_version: String,
    /// The plugin configs.
    pub plugins: Vec<Value>,
    /// The raw bytes (cached for DEL).
    pub bytes: Vec<u8>,
    /// The file the list was read from (for error messages).
    pub path: Option<PathBuf>,
}

/// Parses a `.conflist` (or a single-plugin `.conf`, wrapped into a list).
pub fn parse_list(path: &Path, bytes: &[u8]) -> Result<NetworkList, CniError> {
    let bad = |m: String| CniError::BadConfig(path.to_path_buf(), m);
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing name".into()))?
        .to_string();
    let cni_version = v
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("0.4.0")
        .to_string();
    let plugins = match v.get("plugins") {
        Some(Value::Array(a)) if !a.is_empty() => a.clone(),
        Some(_) => return Err(bad("plugins must be a non-empty list".into())),
        None if v.get("type").is_some() => vec![v.clone()],
        None => return Err(bad("neither plugins nor type".into())),
    };
    for p in &plugins {
        if p.get("type").and_then(Value::as_str).is_none() {
            return Err(bad("a plugin has no type".into()));
        }
    }
    Ok(NetworkList {
        name,
        cni_version,
        plugins,
        bytes: bytes.to_vec(),
        path: Some(path.to_path_buf()),
    })
}

/// The first config in the conf dir by file name (`*.conflist`, `*.conf`, `*.json`), like
/// containerd's default network.
pub fn load_default(conf_dir: &Path) -> Result<NetworkList, CniError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|_| CniError::NoConfig(conf_dir.to_path_buf()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let first = files
        .first()
        .ok_or_else(|| CniError::NoConfig(conf_dir.to_path_buf()))?;
    let bytes =
        std::fs::read(first).map_err(|e| CniError::BadConfig(first.clone(), e.to_string()))?;
    parse_list(first, &bytes)
}

/// Pod IPs (without prefix length) of a CNI result (0.3+ `ips`, or 0.2 `ip4`/`ip6`).
pub fn result_ips(result: &Value) -> Vec<String> {
    let strip = |s: &str| s.split('/').next().unwrap_or("").to_string();
    let mut out: Vec<String> = result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .map(strip)
        .collect();
    for k in ["ip4", "ip6"] {
        if let Some(a) = result
            .get(k)
            .and_then(|v| v.get("ip"))
            .and_then(Value::as_str)
        {
            out.push(strip(a));
        }
    }
    out
}

fn version_at_least(v: &str, major: u64, minor: u64) -> bool {
    let mut it = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Why a bounded run of a child failed.
enum Bounded {
    Io(std::io::Error),
    Timeout,
}

/// Feeds `input` to the child, collects its stdout and stderr and waits for it, all within
/// `timeout`. Past it the child's process group (the child is its leader) gets SIGKILL — while
/// the leader is still unreaped, so the group id cannot name anyone else — and it is reaped.
fn run_bounded(
    child: &mut std::process::Child,
    input: Vec<u8>,
    timeout: Duration,
) -> Result<std::process::Output, Bounded> {
    let deadline = Instant::now() + timeout;
    if let Some(mut w) = child.stdin.take() {
        // A writer thread: a plugin that does not read its stdin must not block us.
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let mut readers = 0;
    for (is_out, r) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
    ] {
        let Some(r) = r else { continue };
        readers += 1;
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut r = r;
            let _ = r.by_ref().take(MAX_PLUGIN_OUTPUT).read_to_end(&mut buf);
            // Drain the rest so the plugin is not blocked on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
            let _ = tx.send((is_out, buf));
        });
    }
    drop(tx);
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let kill_group = |child: &mut std::process::Child| {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    };
    // Exited (but not reaped: WNOWAIT keeps the group id ours) within the deadline?
    let mut nap = Duration::from_millis(1);
    loop {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        match waitid(
            Id::Pid(pgid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => break,
            Err(e) => return Err(Bounded::Io(e.into())),
        }
        let now = Instant::now();
        if now >= deadline {
            kill_group(child);
            return Err(Bounded::Timeout);
        }
        std::thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(50));
    }
    // Its output, which a forked straggler holding the pipes could still withhold.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => stdout = b,
            Ok((false, b)) => stderr = b,
            Err(_) => {
                kill_group(child);
                return Err(Bounded::Timeout);
            }
        }
    }
    let status = child.wait().map_err(Bounded::Io)?;
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

impl CniConfig {
    fn find_plugin(&self, ty: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NoPlugin(ty.to_string(), self.bin_dirs.clone()))
    }

    fn cache_path(&self, net: &str, a: &Attachment) -> PathBuf {
        self.cache_dir
            .join("results")
            .join(format!("{net}-{}-{}", a.container_id, a.ifname))
    }

    fn exec(
        &self,
        command: &str,
        list: &NetworkList,
        plugin: &Value,
        prev: Option<&Value>,
        a: &Attachment,
    ) -> Result<Option<Value>, CniError> {
        let ty = plugin.get("type").and_then(Value::as_str).unwrap_or("");
        let bin = self.find_plugin(ty)?;
        let mut conf = plugin.clone();
        if let Some(o) = conf.as_object_mut() {
            o.insert("name".into(), json!(list.name));
            o.insert("cniVersion".into(), json!(list.cni_version));
            if let Some(p) = prev {
                o.insert("prevResult".into(), p.clone());
            }
        }
        let stdin = serde_json::to_vec(&conf).unwrap_or_default();
        let path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", a.cni_args())
            .env("CNI_PATH", path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            // Its own process group, so a timeout kills whatever it forked too.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CniError::Exec(ty.to_string(), e))?;
        let out = run_bounded(&mut child, stdin, self.timeout).map_err(|e| match e {
            Bounded::Io(e) => CniError::Exec(ty.to_string(), e),
            Bounded::Timeout => CniError::Timeout {
                plugin: ty.to_string(),
                command: command.to_string(),
                after: self.timeout,
            },
        })?;
        let stdout: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            let (code, msg, details) = match &stdout {
                Some(v) => (
                    v.get("code").and_then(Value::as_u64).unwrap_or(999),
                    v.get("msg")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    v.get("details")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                ),
                None => (
                    999,
                    format!("exit status {}", out.status),
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ),
            };
            if code == 1 {
                // "incompatible CNI versions": ask the plugin what it supports (libcni's
                // VERSION query) so that the error names the versions to choose from.
                return Err(CniError::IncompatibleVersion(Box::new(VersionMismatch {
                    plugin: ty.to_string(),
                    supported: self.supported_versions(&bin, &list.cni_version),
                    binary: bin,
                    network: list.name.clone(),
                    config: list.path.clone(),
                    command: command.to_string(),
                    config_version: list.cni_version.clone(),
                    msg: format!("{msg}{}", details_suffix(&details)),
                })));
            }
            return Err(CniError::Plugin(Box::new(PluginFailure {
                plugin: ty.to_string(),
                network: list.name.clone(),
                command: command.to_string(),
                code,
                msg,
                details,
            })));
        }
        Ok(stdout)
    }

    /// A plugin's `supportedVersions` (`CNI_COMMAND=VERSION`, bounded by the plugin deadline);
    /// empty when it gives no usable answer.
    fn supported_versions(&self, bin: &Path, config_version: &str) -> Vec<String> {
        let Ok(mut child) = Command::new(bin)
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            return Vec::new();
        };
        let input =
            serde_json::to_vec(&json!({ "cniVersion": config_version })).unwrap_or_default();
        match run_bounded(&mut child, input, self.timeout.min(Duration::from_secs(10))) {
            Ok(out) => parse_supported_versions(&out.stdout),
            Err(_) => Vec::new(),
        }
    }

    /// Brings up `lo` in the netns with the `loopback` plugin (skipped when not installed).
    pub fn loopback_up(&self, a: &Attachment) -> Result<(), CniError> {
        if self.find_plugin("loopback").is_err() {
            tracing::warn!("CNI loopback plugin not found; lo stays down in pod netns");
            return Ok(());
        }
        let list = NetworkList {
            name: "cni-loopback".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![json!({"type": "loopback"})],
            bytes: vec![],
            path: None,
        };
        let lo = Attachment {
            ifname: "lo".into(),
            ..a.clone()
        };
        self.exec("ADD", &list, &list.plugins[0], None, &lo)?;
        Ok(())
    }

    /// ADD through the default network; returns the final result (cached for DEL/CHECK).
    pub fn add(&self, a: &Attachment) -> Result<Value, CniError> {
        let list = load_default(&self.conf_dir)?;
        let mut prev: Option<Value> = None;
        for (i, p) in list.plugins.iter().enumerate() {
            match self.exec("ADD", &list, p, prev.as_ref(), a) {
                Ok(r) => prev = r.or(prev),
                Err(e) => {
                    // Undo what the earlier plugins did (libcni leaves this to the caller;
                    // containerd runs DEL on a failed ADD).
                    for q in list.plugins[..=i].iter().rev() {
                        let _ = self.exec("DEL", &list, q, prev.as_ref(), a);
                    }
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or_else(|| json!({"cniVersion": list.cni_version}));
        let path = self.cache_path(&list.name, a);
        let cache = json!({
            "kind": "cniCacheV1",
            "containerId": a.container_id,
            "ifName": a.ifname,
            "networkName": list.name,
            "config": String::from_utf8_lossy(&list.bytes),
            "result": result,
        });
        // DEL after an agent restart needs it: durable (a torn cache would leak the attachment).
        hako_shim::durable::write_file(
            &path,
            &serde_json::to_vec(&cache).unwrap_or_default(),
            0o644,
        )
        .map_err(|e| CniError::Cache(path.clone(), e))?;
        Ok(result)
    }

    fn cached(&self, a: &Attachment) -> Option<(PathBuf, NetworkList, Value)> {
        let dir = self.cache_dir.join("results");
        let suffix = format!("-{}-{}", a.container_id, a.ifname);
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(&suffix) {
                continue;
            }
            let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            let cfg = v.get("config").and_then(Value::as_str)?.as_bytes().to_vec();
            let list = parse_list(&e.path(), &cfg).ok()?;
            let result = v.get("result").cloned().unwrap_or(Value::Null);
            return Some((e.path(), list, result));
        }
        None
    }

    /// The cached ADD result of an attachment (after an agent restart).
    pub fn cached_result(&self, a: &Attachment) -> Option<Value> {
        self.cached(a).map(|(_, _, r)| r)
    }

    /// DEL in reverse plugin order with the cached config and result; the cache entry is
    /// removed on success. Nothing cached: DEL through the current default network.
    pub fn del(&self, a: &Attachment) -> Result<(), CniError> {
        let (path, list, prev) = match self.cached(a) {
            Some((p, l, r)) => (Some(p), l, Some(r)),
            None => match load_default(&self.conf_dir) {
                Ok(l) => (None, l, None),
                Err(_) => return Ok(()),
            },
        };
        for p in list.plugins.iter().rev() {
            self.exec("DEL", &list, p, prev.as_ref(), a)?;
        }
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// CHECK (CNI ≥ 0.4.0) with the cached result; a no-op for older versions.
    pub fn check(&self, a: &Attachment) -> Result<(), CniError> {
        let Some((_, list, prev)) = self.cached(a) else {
            return Ok(());
        };
        if !version_at_least(&list.cni_version, 0, 4) {
            return Ok(());
        }
        for p in &list.plugins {
            self.exec("CHECK", &list, p, Some(&prev), a)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_ips() {
        let l = parse_list(
            Path::new("x.conflist"),
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert_eq!(l.plugins.len(), 2);
        let c = parse_list(Path::new("x.conf"), br#"{"name":"n","type":"bridge"}"#).unwrap();
        assert_eq!(c.plugins.len(), 1);
        assert!(parse_list(Path::new("x"), br#"{"name":"n","plugins":[{}]}"#).is_err());
        let r = json!({"ips":[{"address":"10.1.0.5/24"},{"address":"fd00::5/64"}]});
        assert_eq!(result_ips(&r), vec!["10.1.0.5", "fd00::5"]);
        assert!(version_at_least("1.0.0", 0, 4));
        assert!(!version_at_least("0.3.1", 0, 4));
    }

    fn plugin_dir(script: &str) -> (tempfile::TempDir, CniConfig) {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("slow");
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = CniConfig {
            conf_dir: d.path().into(),
            bin_dirs: vec![d.path().into()],
            cache_dir: d.path().join("cache"),
            timeout: Duration::from_millis(500),
        };
        (d, cfg)
    }

    fn attachment() -> Attachment {
        Attachment {
            container_id: "c".into(),
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
        }
    }

    fn list() -> NetworkList {
        parse_list(
            Path::new("x.conflist"),
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"slow"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_hung_plugin_and_what_it_forked_are_killed_at_the_deadline() {
        let (d, cfg) = plugin_dir("");
        // The script writes into its own dir, known only now.
        let script = format!(
            "#!/bin/sh\nsleep 600 &\necho $! > {}/child\nsleep 600\n",
            d.path().display()
        );
        std::fs::write(d.path().join("slow"), script).unwrap();
        let l = list();
        let (tx, rx) = mpsc::channel();
        let cfg2 = cfg.clone();
        std::thread::spawn(move || {
            let _ = tx.send(cfg2.exec("ADD", &l, &l.plugins[0], None, &attachment()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("exec of a hung plugin returned within 30 s");
        assert!(
            matches!(r, Err(CniError::Timeout { ref command, .. }) if command == "ADD"),
            "{r:?}"
        );
        let pid: i32 = std::fs::read_to_string(d.path().join("child"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed with the group (it may linger as a zombie of init for a moment).
        let gone = (0..100).any(|_| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = st.is_empty() || st.split(' ').nth(2) == Some("Z");
            if !dead {
                std::thread::sleep(Duration::from_millis(50));
            }
            dead
        });
        assert!(gone, "forked child {pid} survived the timeout");
    }

    #[test]
    fn a_plugin_within_the_deadline_is_unaffected() {
        let (_d, cfg) = plugin_dir(
            "#!/bin/sh\ncat >/dev/null\necho '{\"cniVersion\":\"1.0.0\",\"ips\":[{\"address\":\"10.0.0.2/24\"}]}'\n",
        );
        let l = list();
        let r = cfg
            .exec("ADD", &l, &l.plugins[0], None, &attachment())
            .unwrap()
            .unwrap();
        assert_eq!(result_ips(&r), vec!["10.0.0.2"]);
        let (_d, cfg) = plugin_dir("#!/bin/sh\necho '{\"code\":7,\"msg\":\"bad\"}'\nexit 1\n");
        match cfg.exec("ADD", &l, &l.plugins[0], None, &attachment()) {
            Err(CniError::Plugin(f)) => assert_eq!((f.code, f.msg.as_str()), (7, "bad")),
            r => panic!("{r:?}"),
        }
    }

    /// A plugin speaking like the reference plugins' skel: VERSION answers its supported
    /// versions, ADD with a newer cniVersion fails with code 1.
    const SKEL_LIKE: &str = "#!/bin/sh\ncat >/dev/null\nif [ \"$CNI_COMMAND\" = VERSION ]; then\n  echo '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.3.1\",\"0.4.0\",\"1.0.0\"]}'\n  exit 0\nfi\necho '{\"code\":1,\"msg\":\"incompatible CNI versions\",\"details\":\"config is \\\"1.1.0\\\", plugin supports [\\\"0.3.1\\\" \\\"0.4.0\\\" \\\"1.0.0\\\"]\"}'\nexit 1\n";

    #[test]
    fn a_version_mismatch_names_the_plugin_and_the_versions() {
        let (_d, cfg) = plugin_dir(SKEL_LIKE);
        let l = parse_list(
            Path::new("/etc/cni/net.d/10-x.conflist"),
            br#"{"cniVersion":"1.1.0","name":"n","plugins":[{"type":"slow"}]}"#,
        )
        .unwrap();
        let e = cfg
            .exec("ADD", &l, &l.plugins[0], None, &attachment())
            .unwrap_err();
        let CniError::IncompatibleVersion(m) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(m.plugin, "slow");
        assert_eq!(m.config_version, "1.1.0");
        assert_eq!(m.supported, vec!["0.3.1", "0.4.0", "1.0.0"]);
        let text = e.to_string();
        for want in [
            "\"slow\"",
            "cniVersion \"1.1.0\"",
            "[0.3.1, 0.4.0, 1.0.0]",
            "/etc/cni/net.d/10-x.conflist",
            "for example 1.0.0",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
    }

    #[test]
    fn a_mismatch_without_a_version_answer_keeps_the_plugin_message() {
        let (_d, cfg) = plugin_dir(
            "#!/bin/sh\ncat >/dev/null\necho '{\"code\":1,\"msg\":\"incompatible CNI versions\"}'\nexit 1\n",
        );
        let l = list();
        let e = cfg
            .exec("ADD", &l, &l.plugins[0], None, &attachment())
            .unwrap_err();
        assert!(matches!(&e, CniError::IncompatibleVersion(m) if m.supported.is_empty()));
        assert!(
            e.to_string()
                .contains("unknown set of versions (it said: incompatible CNI versions)"),
            "{e}"
        );
    }

    #[test]
    fn max_common_hint_picks_the_highest_lower_version() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            max_common_hint(&v(&["0.4.0", "1.0.0", "0.10.0"]), "1.1.0"),
            " (for example 1.0.0)"
        );
        assert_eq!(max_common_hint(&v(&["1.1.0"]), "1.0.0"), "");
        assert_eq!(
            parse_supported_versions(br#"{"supportedVersions":["1.0.0"]}"#),
            vec!["1.0.0"]
        );
        assert!(parse_supported_versions(b"garbage").is_empty());
    }
}
