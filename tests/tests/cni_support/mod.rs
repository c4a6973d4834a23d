//! Shared helpers of the CNI root tests: the `hako-cni` binary, running a plugin inside a
//! node namespace exactly as a CNI client would (env, stdin, stdout), libcni-style chains,
//! and per-test network configs with a temporary IPAM directory.
#![allow(dead_code)]

use hako_tests::NetNs;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The plugin binary: `$HAKO_CNI_BIN`, else `hako-cni` in this test binary's target
/// directory. When it is missing it is built once with `cargo build -p hako-cni` into the
/// same target directory, so `cargo test -p hako-tests --features root` works on its own.
pub fn cni_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("HAKO_CNI_BIN") {
            return p.into();
        }
        let exe = std::env::current_exe().expect("current_exe");
        let debug_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let p = debug_dir.join("hako-cni");
        if !p.exists() {
            let target_dir = debug_dir.parent().expect("target root").to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "-p", "hako-cni", "--bin", "hako-cni"])
                .env("CARGO_TARGET_DIR", &target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("running cargo build -p hako-cni");
            assert!(st.success(), "cargo build -p hako-cni failed");
        }
        assert!(p.exists(), "{} missing after build", p.display());
        p
    })
    .clone()
}

/// What one plugin invocation returned.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status was 0.
    pub ok: bool,
    /// stdout parsed as JSON (`Null` when empty).
    pub json: Value,
    /// Raw stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl Outcome {
    /// The error code of a failed invocation.
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure, got {}", self.stdout);
        self.json["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {} / {}", self.stdout, self.stderr))
    }

    /// The result of a successful invocation.
    pub fn result(&self) -> &Value {
        assert!(self.ok, "plugin failed: {} / {}", self.stdout, self.stderr);
        &self.json
    }
}

/// One invocation's environment.
#[derive(Debug, Clone, Default)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: Option<&'a str>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<&'a str>,
    pub args: Option<&'a str>,
}

impl<'a> Call<'a> {
    /// An attachment command (ADD, DEL, CHECK) for `id` in `pod`, ifname eth0.
    pub fn attach(command: &'a str, id: &'a str, pod: &NetNs) -> Self {
        Call {
            command,
            container_id: Some(id),
            netns: Some(pod.path()),
            ifname: Some("eth0"),
            args: Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test"),
        }
    }

    /// A command without attachment (STATUS, GC, VERSION).
    pub fn plain(command: &'a str) -> Self {
        Call {
            command,
            ..Default::default()
        }
    }
}

/// Runs `bin` inside `node` with the call's environment and raw stdin bytes.
pub fn exec_raw(bin: &Path, node: &NetNs, call: &Call<'_>, stdin: &[u8]) -> Outcome {
    let cni_path = format!("{}:/usr/lib/cni", bin.parent().expect("bin dir").display());
    exec_raw_in(bin, node, call, stdin, &cni_path)
}

/// [`exec_raw`] with a given `CNI_PATH`.
pub fn exec_raw_in(
    bin: &Path,
    node: &NetNs,
    call: &Call<'_>,
    stdin: &[u8],
    cni_path: &str,
) -> Outcome {
    let mut cmd = node.command(bin.to_str().expect("utf-8 path"));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_PATH", cni_path);
    if let Some(v) = call.container_id {
        cmd.env("CNI_CONTAINERID", v);
    }
    if let Some(v) = &call.netns {
        cmd.env("CNI_NETNS", v);
    }
    if let Some(v) = call.ifname {
        cmd.env("CNI_IFNAME", v);
    }
    if let Some(v) = call.args {
        cmd.env("CNI_ARGS", v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting for plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {stdout:?}"))
    };
    Outcome {
        ok: out.status.success(),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs hako-cni inside `node` with `conf` on stdin.
pub fn exec(node: &NetNs, call: &Call<'_>, conf: &Value) -> Outcome {
    exec_raw(&cni_bin(), node, call, conf.to_string().as_bytes())
}

/// A network for one test: name, temporary IPAM directory, bridge name, config builder.
pub struct TestNet {
    pub dir: tempfile::TempDir,
    pub conf: Value,
}

impl TestNet {
    /// A config with the given ranges (`ipam.ranges` entries) and version 1.1.0.
    pub fn new(ranges: Value) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hako-cni-test-")
            .tempdir()
            .expect("tempdir");
        let conf = json!({
            "cniVersion": "1.1.0",
            "name": "hakotest",
            "type": "hako-cni",
            "bridge": "hako0",
            "dataDir": dir.path().join("ipam"),
            "subnetFile": dir.path().join("subnet.env"),
            "ipam": { "ranges": ranges },
        });
        TestNet { dir, conf }
    }

    /// A config that takes its ranges from a subnet file in the temp dir.
    pub fn from_subnet_file(text: &str) -> Self {
        let mut n = Self::new(json!([]));
        std::fs::write(n.dir.path().join("subnet.env"), text).expect("writing subnet.env");
        n.conf.as_object_mut().expect("object").remove("ipam");
        n
    }

    /// The IPAM data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Addresses currently allocated in the store.
    pub fn allocated(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The config with extra fields merged in.
    pub fn with(&self, extra: Value) -> Value {
        let mut c = self.conf.clone();
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        c
    }
}

/// Host-side veths made by hako-cni in `node` (`hako` + 11 hex digits).
pub fn host_veths(node: &NetNs) -> Vec<String> {
    let out = node.ip(&["-o", "link", "show"]).expect("ip link");
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("hako") && n.len() == 15)
        .collect()
}

/// The first IPv4 address of the result.
pub fn result_ipv4(r: &Value) -> String {
    r["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i["address"].as_str())
        .find(|a| !a.contains(':'))
        .expect("an IPv4 address")
        .split('/')
        .next()
        .expect("addr")
        .to_string()
}

/// Runs a conflist's plugins as libcni does: ADD in order, each with the previous result
/// as `prevResult`; returns the final result.
pub fn chain_add(node: &NetNs, list: &Value, call: &Call<'_>) -> Value {
    let mut prev: Option<Value> = None;
    for p in list["plugins"].as_array().expect("plugins") {
        let conf = plugin_conf(list, p, prev.as_ref());
        let out = run_chained(node, &conf, call);
        prev = Some(out.result().clone());
    }
    prev.expect("at least one plugin")
}

/// CHECK in order (every plugin gets the cached final result), or DEL in reverse order.
pub fn chain_run(node: &NetNs, list: &Value, call: &Call<'_>, cached: &Value) -> Vec<Outcome> {
    let mut plugins: Vec<&Value> = list["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .collect();
    if call.command == "DEL" {
        plugins.reverse();
    }
    plugins
        .into_iter()
        .map(|p| run_chained(node, &plugin_conf(list, p, Some(cached)), call))
        .collect()
}

fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut c = plugin.clone();
    let o = c.as_object_mut().expect("plugin object");
    o.insert("name".into(), list["name"].clone());
    o.insert("cniVersion".into(), list["cniVersion"].clone());
    if let Some(p) = prev {
        o.insert("prevResult".into(), p.clone());
    }
    c
}

fn run_chained(node: &NetNs, conf: &Value, call: &Call<'_>) -> Outcome {
    let ty = conf["type"].as_str().expect("type");
    let bin = if ty == "hako-cni" {
        cni_bin()
    } else {
        PathBuf::from("/usr/lib/cni").join(ty)
    };
    exec_raw(&bin, node, call, conf.to_string().as_bytes())
}
