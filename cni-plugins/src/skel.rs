//! The CNI protocol: environment, stdin, command dispatch, result or error JSON on stdout,
//! logs on stderr and an optional log file. Environment parsing is pure; `main` is effectful.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::config::{valid_ifname, ConfigError, NetConf};
use crate::version::{self, Command};

/// A CNI error: code, message and details, rendered as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} ({code}){}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's code (1-99) or one of hako's own (100+).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer details.
    pub details: String,
}

/// hako's own error codes (100+).
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field of the network configuration this plugin (or kernel) does not support.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Internal failure.
    pub const INTERNAL: u32 = 100;
    /// A netlink request failed.
    pub const NETLINK: u32 = 101;
    /// The address range is exhausted.
    pub const IPAM_EXHAUSTED: u32 = 102;
    /// The IPAM store failed.
    pub const IPAM_STORE: u32 = 103;
    /// The network namespace could not be entered.
    pub const NETNS: u32 = 104;
    /// CHECK found a difference from the previous result.
    pub const CHECK_MISMATCH: u32 = 105;
    /// Masquerade rules could not be installed.
    pub const MASQUERADE: u32 = 106;
    /// The attachment already exists.
    pub const EXISTS: u32 = 107;
    /// The delegated IPAM plugin could not be run, timed out or answered garbage.
    pub const IPAM_PLUGIN: u32 = 108;
    /// The `macspoofchk` rules could not be applied.
    pub const SPOOFCHK: u32 = 109;
}

impl CniError {
    /// A new error.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error JSON.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> Self {
        let msg = match e {
            ConfigError::Decode(_) => "failed to decode network configuration",
            ConfigError::Invalid(_) | ConfigError::Range(_) => "invalid network configuration",
            ConfigError::Version(_) => "incompatible CNI version",
            ConfigError::Unsupported { .. } => "unsupported field in network configuration",
        };
        CniError::new(e.code(), msg, e.to_string())
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH` entries.
    pub path: Vec<PathBuf>,
}

fn env_err(msg: impl Into<String>) -> CniError {
    CniError::new(codes::INVALID_ENV, "invalid environment variables", msg)
}

/// True for container ids the spec allows (alphanumerics, `_`, `.`, `-`, starting
/// alphanumeric).
pub fn valid_container_id(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Parses the environment through `get`.
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
    let cmd = nonempty("CNI_COMMAND").ok_or_else(|| env_err("CNI_COMMAND is not set"))?;
    let command = Command::parse(&cmd)
        .ok_or_else(|| env_err(format!("CNI_COMMAND {cmd:?} is not a CNI command")))?;
    let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let container_id = nonempty("CNI_CONTAINERID").unwrap_or_default();
    let ifname = nonempty("CNI_IFNAME").unwrap_or_default();
    let netns = nonempty("CNI_NETNS").map(PathBuf::from);
    if needs_attachment {
        if container_id.is_empty() {
            return Err(env_err("CNI_CONTAINERID is not set"));
        }
        if !valid_container_id(&container_id) {
            return Err(env_err(format!(
                "CNI_CONTAINERID {container_id:?} may hold only letters, digits, '_', '.', '-'"
            )));
        }
        if ifname.is_empty() {
            return Err(env_err("CNI_IFNAME is not set"));
        }
        if !valid_ifname(&ifname) {
            return Err(env_err(format!(
                "CNI_IFNAME {ifname:?} is not a valid interface name"
            )));
        }
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(env_err("CNI_NETNS is not set"));
        }
    }
    let mut args = BTreeMap::new();
    if let Some(a) = nonempty("CNI_ARGS") {
        for kv in a.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| env_err(format!("CNI_ARGS: {kv:?} is not KEY=VALUE")))?;
            args.insert(k.to_string(), v.to_string());
        }
    }
    let path = get("CNI_PATH")
        .map(|p| {
            p.split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    Ok(Env {
        command,
        container_id,
        netns,
        ifname,
        args,
        path,
    })
}

fn init_logging(level: &str, file: Option<&PathBuf>) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let level = level
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::WARN);
    let stderr = std::io::stderr.with_max_level(level);
    let f = file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    // netlink-packet-route warns about attributes newer than itself; not ours to report.
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "{},netlink_packet_route=error",
        level.as_str().to_lowercase()
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match f {
        Some(f) => builder
            .with_writer(stderr.and(std::sync::Mutex::new(f)))
            .try_init(),
        None => builder.with_writer(stderr).try_init(),
    };
}

fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Runs one CNI invocation from the process environment and stdin; returns the exit code.
pub fn main() -> i32 {
    let mut input = Vec::new();
    let env = parse_env(|k| std::env::var(k).ok());
    let env = match env {
        Ok(e) => e,
        Err(e) => {
            init_logging("warn", None);
            tracing::error!(code = e.code, "{e}");
            emit(&e.to_json(version::LATEST));
            return 1;
        }
    };
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        let e = CniError::new(codes::IO, "cannot read stdin", e.to_string());
        emit(&e.to_json(version::LATEST));
        return 1;
    }
    if env.command == Command::Version {
        let v: Option<String> = serde_json::from_slice::<Value>(&input)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
            .filter(|v| version::is_supported(v));
        emit(&version::version_info(
            v.as_deref().unwrap_or(version::LATEST),
        ));
        return 0;
    }
    let conf = match NetConf::parse(&input) {
        Ok(c) => c,
        Err(e) => {
            init_logging("warn", None);
            let e = CniError::from(e);
            tracing::error!(code = e.code, "{e}");
            emit(&e.to_json(version::LATEST));
            return 1;
        }
    };
    init_logging(&conf.log_level, conf.log_file.as_ref());
    if !version::allows(&conf.cni_version, env.command) {
        let e = CniError::new(
            codes::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "{:?} needs cniVersion {} or later, got {}",
                env.command,
                env.command.min_version(),
                conf.cni_version
            ),
        );
        emit(&e.to_json(&conf.cni_version));
        return 1;
    }
    let span = tracing::info_span!(
        "cni",
        command = ?env.command,
        container = %env.container_id,
        ifname = %env.ifname,
        network = %conf.name,
        pod_namespace = env.args.get("K8S_POD_NAMESPACE").map(String::as_str).unwrap_or(""),
        pod_name = env.args.get("K8S_POD_NAME").map(String::as_str).unwrap_or("")
    );
    let _g = span.enter();
    let r = match env.command {
        Command::Add => crate::plugin::add(&env, &conf).map(Some),
        Command::Del => crate::plugin::del(&env, &conf).map(|_| None),
        Command::Check => crate::plugin::check(&env, &conf).map(|_| None),
        Command::Status => crate::plugin::status(&env, &conf).map(|_| None),
        Command::Gc => crate::plugin::gc(&env, &conf).map(|_| None),
        Command::Version => Ok(None),
    };
    match r {
        Ok(Some(v)) => {
            emit(&v);
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::error!(code = e.code, "{e}");
            emit(&e.to_json(&conf.cni_version));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_env(|k| m.get(k).cloned())
    }

    #[test]
    fn env_parsing() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args["K8S_POD_NAME"], "web-0");
        assert_eq!(e.path.len(), 2);
        // DEL without a netns is fine; STATUS needs nothing.
        assert!(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0")
        ])
        .is_ok());
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
    }

    #[test]
    fn env_errors_are_code_4() {
        for pairs in [
            vec![],
            vec![("CNI_COMMAND", "FROB")],
            vec![("CNI_COMMAND", "ADD")],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_IFNAME", "eth0"),
            ],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "et/h0"),
            ],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a/b"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "eth0"),
            ],
            vec![
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "novalue"),
            ],
        ] {
            let e = env(&pairs).unwrap_err();
            assert_eq!(e.code, 4, "{pairs:?}");
        }
    }

    #[test]
    fn error_json() {
        let e = CniError::new(7, "invalid network configuration", "mtu 10");
        let v = e.to_json("1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["details"], "mtu 10");
        let v = CniError::new(11, "try again", "").to_json("1.1.0");
        assert!(v.get("details").is_none());
    }
}
