//! Network configuration: decoding the stdin JSON, validation, and resolving address ranges,
//! MTU and cluster networks from the config or the node's subnet file. Pure.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::ipam::{Range, RangeError};
pub use crate::masq::Backend as MasqBackend;
use crate::version;

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "hako0";
/// Default subnet file written by the node agent.
pub const DEFAULT_SUBNET_FILE: &str = "/run/hako/subnet.env";
/// Parent of the default IPAM data directories.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/cni/networks";
/// Parent of hako's own state directories when IPAM is delegated.
pub const DEFAULT_DELEGATED_ROOT: &str = "/var/lib/cni/hako";
/// MTU used when neither the config nor the subnet file names one.
pub const DEFAULT_MTU: u32 = 1500;

/// A configuration problem, with the CNI error code it maps to.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Not JSON, or not the expected shape (code 6).
    #[error("cannot decode network configuration: {0}")]
    Decode(String),
    /// Decoded but invalid (code 7).
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    /// A range that cannot be used (code 7).
    #[error("invalid network configuration: {0}")]
    Range(#[from] RangeError),
    /// A field whose value this plugin does not implement (code 2), named.
    #[error("unsupported field {field}: {why}")]
    Unsupported {
        /// The field, as spelled in the config.
        field: &'static str,
        /// Why, and what to use instead.
        why: String,
    },
    /// cniVersion not spoken (code 1).
    #[error("incompatible CNI version {0:?} (supported: {supported})", supported = version::SUPPORTED.join(", "))]
    Version(String),
}

impl ConfigError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            ConfigError::Decode(_) => 6,
            ConfigError::Invalid(_) | ConfigError::Range(_) => 7,
            ConfigError::Version(_) => 1,
            ConfigError::Unsupported { .. } => 2,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    bridge: Option<String>,
    mtu: Option<u32>,
    is_gateway: Option<bool>,
    is_default_gateway: Option<bool>,
    hairpin_mode: Option<bool>,
    promisc_mode: Option<bool>,
    ip_masq: Option<bool>,
    ip_masq_backend: Option<String>,
    vlan: Option<i64>,
    vlan_trunk: Option<Value>,
    #[serde(rename = "macspoofchk")]
    mac_spoof_chk: Option<bool>,
    disable_container_interface: Option<bool>,
    port_isolation: Option<bool>,
    preserve_default_vlan: Option<bool>,
    #[serde(rename = "enabledad")]
    enable_dad: Option<bool>,
    runtime_config: Option<Value>,
    args: Option<Value>,
    cluster_network: Option<OneOrMany>,
    subnet_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    log_file: Option<PathBuf>,
    log_level: Option<String>,
    ipam: Option<Value>,
    dns: Option<Value>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RangeItem {
    One(RawRange),
    Set(Vec<RawRange>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    ranges: Option<Vec<RangeItem>>,
    routes: Option<Vec<RawRoute>>,
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: String,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRoute {
    dst: String,
    gw: Option<String>,
}

/// One `vlanTrunk` entry: a single `id`, or a `minID`..`maxID` range, or both.
#[derive(Debug, Deserialize)]
struct RawTrunk {
    #[serde(rename = "minID")]
    min_id: Option<i64>,
    #[serde(rename = "maxID")]
    max_id: Option<i64>,
    id: Option<i64>,
}

/// The reference's `collectVlanTrunk`: every VLAN named, sorted, each once, 1..4094.
fn collect_vlan_trunk(items: &[RawTrunk]) -> Result<Vec<u16>, ConfigError> {
    let vid = |v: i64, what: &str| {
        u16::try_from(v)
            .ok()
            .filter(|v| (1..=4094).contains(v))
            .ok_or_else(|| {
                ConfigError::Invalid(format!("vlanTrunk: incorrect trunk {what} parameter"))
            })
    };
    let mut out = std::collections::BTreeSet::new();
    for t in items {
        match (t.min_id, t.max_id) {
            (Some(lo), Some(hi)) => {
                let (lo, hi) = (vid(lo, "minID")?, vid(hi, "maxID")?);
                if hi < lo {
                    return Err(ConfigError::Invalid(
                        "vlanTrunk: minID is greater than maxID in trunk parameter".into(),
                    ));
                }
                out.extend(lo..=hi);
            }
            (None, Some(_)) | (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "vlanTrunk: minID and maxID should be configured simultaneously".into(),
                ))
            }
            (None, None) => {}
        }
        if let Some(id) = t.id {
            out.insert(vid(id, "id")?);
        }
    }
    Ok(out.into_iter().collect())
}

/// One attachment named by GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
pub struct Attachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the container.
    pub ifname: String,
}

/// Who allocates the container's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpamMode {
    /// hako's own store (`ipam.type` absent, `hako` or `hako-cni`).
    Builtin,
    /// An IPAM plugin named by `ipam.type`, found in `CNI_PATH` and run with this
    /// plugin's stdin, as the reference bridge plugin does.
    Delegated(String),
}

/// A configured extra route for the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConf {
    /// Destination.
    pub dst: IpNet,
    /// Next hop (the range's gateway when absent).
    pub gw: Option<IpAddr>,
}

/// A configured range before defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeConf {
    /// The subnet (host bits may be set: they then name the gateway).
    pub subnet: IpNet,
    /// First allocatable address.
    pub start: Option<IpAddr>,
    /// Last allocatable address.
    pub end: Option<IpAddr>,
    /// Gateway (bridge) address.
    pub gateway: Option<IpAddr>,
}

/// The validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// Requested cniVersion.
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Bridge name.
    pub bridge: String,
    /// MTU override.
    pub mtu: Option<u32>,
    /// Give the bridge the gateway address.
    pub is_gateway: bool,
    /// Add a default route via the gateway in the container.
    pub is_default_gateway: bool,
    /// Hairpin mode on the host veth.
    pub hairpin_mode: bool,
    /// Promiscuous mode on the bridge.
    pub promisc_mode: bool,
    /// Masquerade traffic leaving the cluster networks.
    pub ip_masq: bool,
    /// Where the masquerade rules live (`ipMasqBackend`).
    pub ip_masq_backend: MasqBackend,
    /// Drop frames from the pod whose source MAC is not its interface's (`macspoofchk`).
    pub mac_spoof_chk: bool,
    /// Isolate the pod ports from each other (`portIsolation`): they reach only
    /// non-isolated ports (the bridge's uplinks, the gateway).
    pub port_isolation: bool,
    /// IPv6 duplicate address detection on the container addresses (`enabledad`).
    pub enable_dad: bool,
    /// Fixed MAC of the container interface (`runtimeConfig.mac`, `args.cni.mac`).
    pub mac: Option<[u8; 6]>,
    /// VLAN of the pod ports, untagged (`vlan`; 0: none, no VLAN filtering).
    pub vlan: u16,
    /// VLANs the pod ports carry tagged (`vlanTrunk`, sorted, each once).
    pub vlan_trunk: Vec<u16>,
    /// Keep VLAN 1 on the pod ports beside `vlan` (`preserveDefaultVlan`).
    pub preserve_default_vlan: bool,
    /// Built-in or delegated IPAM (`ipam.type`).
    pub ipam: IpamMode,
    /// stdin as received: what a delegated IPAM plugin is given.
    pub raw: Vec<u8>,
    /// Cluster networks (not masqueraded) from the config.
    pub cluster_networks: Vec<IpNet>,
    /// Subnet file path.
    pub subnet_file: PathBuf,
    /// IPAM store directory.
    pub data_dir: PathBuf,
    /// Optional log file.
    pub log_file: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace).
    pub log_level: String,
    /// Configured ranges (empty: from the subnet file).
    pub ranges: Vec<RangeConf>,
    /// Extra container routes.
    pub routes: Vec<RouteConf>,
    /// DNS block passed through to the result.
    pub dns: Value,
    /// A chain's previous result.
    pub prev_result: Option<Value>,
    /// GC's valid attachments.
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, ConfigError> {
    s.parse()
        .map_err(|_| ConfigError::Invalid(format!("{what}: {s:?} is not an IP address")))
}

fn parse_net(what: &str, s: &str) -> Result<IpNet, ConfigError> {
    s.parse()
        .map_err(|_| ConfigError::Invalid(format!("{what}: {s:?} is not a CIDR")))
}

/// True for a plugin name that stays inside the `CNI_PATH` directory it is looked up in.
pub fn valid_plugin_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`); `None` when it is not a unicast MAC.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// True for names the kernel accepts as interface names.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

impl NetConf {
    /// Decodes and validates stdin.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Decode(e.to_string()))?;
        let raw: RawConf =
            serde_json::from_value(value).map_err(|e| ConfigError::Decode(e.to_string()))?;
        let cni_version = raw
            .cni_version
            .ok_or_else(|| ConfigError::Invalid("cniVersion is missing".into()))?;
        if !version::is_supported(&cni_version) {
            return Err(ConfigError::Version(cni_version));
        }
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ConfigError::Invalid("name is missing".into()))?;
        if name.contains('/') || name.starts_with('.') {
            return Err(ConfigError::Invalid(format!(
                "name {name:?} may not contain '/' or start with '.'"
            )));
        }
        if raw.plugin_type.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::Invalid("type is empty".into()));
        }
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        if !valid_ifname(&bridge) {
            return Err(ConfigError::Invalid(format!(
                "bridge {bridge:?} is not a valid interface name"
            )));
        }
        if let Some(mtu) = raw.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(ConfigError::Invalid(format!(
                    "mtu {mtu} is outside 576..65535"
                )));
            }
        }
        let cluster_networks = match raw.cluster_network {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![parse_net("clusterNetwork", &s)?],
            Some(OneOrMany::Many(v)) => v
                .iter()
                .map(|s| parse_net("clusterNetwork", s))
                .collect::<Result<_, _>>()?,
        };
        let mut ranges = Vec::new();
        let mut routes = Vec::new();
        let mut ipam_data_dir = None;
        let ipam_type = match raw.ipam.as_ref().map(|v| v.get("type")) {
            None | Some(None) | Some(Some(Value::Null)) => None,
            Some(Some(Value::String(t))) => Some(t.clone()),
            Some(Some(other)) => {
                return Err(ConfigError::Decode(format!(
                    "ipam.type: expected a string, got {other}"
                )))
            }
        };
        let ipam_mode = match ipam_type.as_deref() {
            None | Some("" | "hako" | "hako-cni") => IpamMode::Builtin,
            Some(t) if !valid_plugin_name(t) => {
                return Err(ConfigError::Invalid(format!(
                    "ipam.type {t:?} is not a plugin name (no '/', not '.' or '..')"
                )))
            }
            Some(t) => IpamMode::Delegated(t.to_string()),
        };
        // A delegated plugin owns the rest of the ipam block (its own format).
        let builtin_ipam = match (&ipam_mode, raw.ipam) {
            (IpamMode::Builtin, Some(v)) => Some(
                serde_json::from_value::<RawIpam>(v)
                    .map_err(|e| ConfigError::Decode(format!("ipam: {e}")))?,
            ),
            _ => None,
        };
        if let Some(ipam) = builtin_ipam {
            for item in ipam.ranges.unwrap_or_default() {
                let set = match item {
                    RangeItem::One(r) => vec![r],
                    RangeItem::Set(v) => v,
                };
                for r in set {
                    ranges.push(RangeConf {
                        subnet: parse_net("ipam.ranges.subnet", &r.subnet)?,
                        start: r
                            .range_start
                            .as_deref()
                            .map(|s| parse_ip("rangeStart", s))
                            .transpose()?,
                        end: r
                            .range_end
                            .as_deref()
                            .map(|s| parse_ip("rangeEnd", s))
                            .transpose()?,
                        gateway: r
                            .gateway
                            .as_deref()
                            .map(|s| parse_ip("gateway", s))
                            .transpose()?,
                    });
                }
            }
            for r in ipam.routes.unwrap_or_default() {
                routes.push(RouteConf {
                    dst: parse_net("ipam.routes.dst", &r.dst)?,
                    gw: r
                        .gw
                        .as_deref()
                        .map(|s| parse_ip("ipam.routes.gw", s))
                        .transpose()?,
                });
            }
            ipam_data_dir = ipam.data_dir;
        }
        // Validate ranges now so bad config is code 7 before anything happens.
        let mut seen_v4 = false;
        let mut seen_v6 = false;
        for r in &ranges {
            Range::from_conf(r)?;
            let seen = if r.subnet.addr().is_ipv4() {
                &mut seen_v4
            } else {
                &mut seen_v6
            };
            if *seen {
                return Err(ConfigError::Invalid(
                    "at most one IPv4 and one IPv6 range are supported".into(),
                ));
            }
            *seen = true;
        }
        // With a delegated IPAM the default directory is not host-local's (which is
        // DEFAULT_DATA_ROOT/<name>): only hako's masquerade markers live here then.
        let data_dir = raw
            .data_dir
            .or(ipam_data_dir)
            .unwrap_or_else(|| match ipam_mode {
                IpamMode::Builtin => PathBuf::from(DEFAULT_DATA_ROOT).join(&name),
                IpamMode::Delegated(_) => PathBuf::from(DEFAULT_DELEGATED_ROOT).join(&name),
            });
        let log_level = raw.log_level.unwrap_or_else(|| "warn".into());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "logLevel {log_level:?}: use error, warn, info, debug or trace"
            )));
        }
        let ip_masq_backend = match raw.ip_masq_backend.as_deref() {
            None | Some("" | "nftables") => MasqBackend::Nftables,
            Some("iptables") => MasqBackend::Iptables,
            Some(o) => {
                return Err(ConfigError::Invalid(format!(
                    "ipMasqBackend {o:?}: use \"iptables\" or \"nftables\""
                )))
            }
        };
        let vlan = match raw.vlan {
            None => 0,
            Some(v) => u16::try_from(v)
                .ok()
                .filter(|v| *v <= 4094)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "invalid VLAN ID {v} (must be between 0 and 4094)"
                    ))
                })?,
        };
        if vlan != 0 && bridge.len() + 1 + vlan.to_string().len() > 15 {
            return Err(ConfigError::Invalid(format!(
                "bridge {bridge:?} with vlan {vlan}: the gateway interface name \
                 {bridge}.{vlan} is longer than 15 characters"
            )));
        }
        let vlan_trunk = match raw.vlan_trunk {
            None | Some(Value::Null) => vec![],
            Some(v) => collect_vlan_trunk(
                &serde_json::from_value::<Vec<RawTrunk>>(v)
                    .map_err(|e| ConfigError::Decode(format!("vlanTrunk: {e}")))?,
            )?,
        };
        if raw.disable_container_interface == Some(true) {
            return Err(ConfigError::Unsupported {
                field: "disableContainerInterface",
                why: "the container interface is always configured; omit it or set false".into(),
            });
        }
        // As the reference: runtimeConfig.mac over args.cni.mac (over CNI_ARGS MAC=, which
        // `plan::env_mac` reads).
        let mac_value = |v: Option<&Value>, what: &str| -> Result<Option<[u8; 6]>, ConfigError> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(m)) if m.is_empty() => Ok(None),
                Some(Value::String(m)) => parse_mac(m)
                    .map(Some)
                    .ok_or_else(|| ConfigError::Invalid(format!("{what}: {m:?} is not a MAC"))),
                Some(o) => Err(ConfigError::Invalid(format!("{what}: {o} is not a MAC"))),
            }
        };
        let mac = match mac_value(
            raw.runtime_config.as_ref().and_then(|r| r.get("mac")),
            "runtimeConfig.mac",
        )? {
            Some(m) => Some(m),
            None => mac_value(
                raw.args
                    .as_ref()
                    .and_then(|a| a.get("cni"))
                    .and_then(|c| c.get("mac")),
                "args.cni.mac",
            )?,
        };
        let promisc_mode = raw.promisc_mode.unwrap_or(false);
        if promisc_mode && raw.hairpin_mode == Some(true) {
            return Err(ConfigError::Invalid(
                "cannot set hairpin mode and promiscuous mode at the same time".into(),
            ));
        }
        // hairpinMode defaults on, except beside promiscMode (the two exclude each other).
        let hairpin_mode = raw.hairpin_mode.unwrap_or(!promisc_mode);
        Ok(NetConf {
            cni_version,
            name,
            bridge,
            mtu: raw.mtu,
            is_gateway: raw.is_gateway.unwrap_or(true),
            is_default_gateway: raw.is_default_gateway.unwrap_or(true),
            hairpin_mode,
            promisc_mode,
            ip_masq: raw.ip_masq.unwrap_or(true),
            ip_masq_backend,
            mac_spoof_chk: raw.mac_spoof_chk.unwrap_or(false),
            port_isolation: raw.port_isolation.unwrap_or(false),
            enable_dad: raw.enable_dad.unwrap_or(false),
            mac,
            vlan,
            vlan_trunk,
            preserve_default_vlan: raw.preserve_default_vlan.unwrap_or(false),
            ipam: ipam_mode,
            raw: bytes.to_vec(),
            cluster_networks,
            subnet_file: raw
                .subnet_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SUBNET_FILE)),
            data_dir,
            log_file: raw.log_file,
            log_level,
            ranges,
            routes,
            dns: raw.dns.unwrap_or(Value::Null),
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }
}

/// The node subnet file (`KEY=VALUE` lines, like flannel's `subnet.env`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// Cluster networks (`HAKO_NETWORK`, `HAKO_IPV6_NETWORK`).
    pub networks: Vec<IpNet>,
    /// Node pod subnets (`HAKO_SUBNET`, `HAKO_IPV6_SUBNET`); host bits name the gateway.
    pub subnets: Vec<IpNet>,
    /// Pod MTU (`HAKO_MTU`).
    pub mtu: Option<u32>,
}

/// Parses a subnet file. Values may be comma separated lists; quotes are stripped.
pub fn parse_subnet_env(text: &str) -> Result<SubnetEnv, ConfigError> {
    let mut env = SubnetEnv::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfigError::Invalid(format!(
                "subnet file: line {line:?} is not KEY=VALUE"
            )));
        };
        let v = v.trim().trim_matches('"');
        let list = || -> Result<Vec<IpNet>, ConfigError> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| parse_net(&format!("subnet file {k}"), s))
                .collect()
        };
        match k.trim() {
            "HAKO_NETWORK" | "HAKO_IPV6_NETWORK" => env.networks.extend(list()?),
            "HAKO_SUBNET" | "HAKO_IPV6_SUBNET" => env.subnets.extend(list()?),
            "HAKO_MTU" => {
                env.mtu = Some(v.parse().map_err(|_| {
                    ConfigError::Invalid(format!("subnet file: HAKO_MTU {v:?} is not a number"))
                })?)
            }
            _ => {}
        }
    }
    Ok(env)
}

/// Everything an attachment needs, after defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// One range per family.
    pub ranges: Vec<Range>,
    /// Pod MTU.
    pub mtu: u32,
    /// Destinations that are not masqueraded.
    pub cluster: Vec<IpNet>,
}

/// Combines the config with the subnet file's content (`None`: no file).
pub fn resolve(conf: &NetConf, subnet_env: Option<&str>) -> Result<Network, ConfigError> {
    let env = match subnet_env {
        Some(t) => parse_subnet_env(t)?,
        None => SubnetEnv::default(),
    };
    let range_confs: Vec<RangeConf> = if conf.ranges.is_empty() {
        if env.subnets.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "no ipam.ranges in the config and no HAKO_SUBNET in {}",
                conf.subnet_file.display()
            )));
        }
        env.subnets
            .iter()
            .map(|s| RangeConf {
                subnet: *s,
                start: None,
                end: None,
                gateway: None,
            })
            .collect()
    } else {
        conf.ranges.clone()
    };
    let ranges = range_confs
        .iter()
        .map(Range::from_conf)
        .collect::<Result<Vec<_>, _>>()?;
    let mtu = conf.mtu.or(env.mtu).unwrap_or(DEFAULT_MTU);
    let mut cluster = if conf.cluster_networks.is_empty() {
        env.networks.clone()
    } else {
        conf.cluster_networks.clone()
    };
    for r in &ranges {
        if !cluster
            .iter()
            .any(|c| c.addr().is_ipv4() == r.subnet.addr().is_ipv4())
        {
            cluster.push(r.subnet);
        }
    }
    Ok(Network {
        ranges,
        mtu,
        cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, ConfigError> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.1.0","name":"pods","type":"hako-cni"{extra}}}"#)
                .as_bytes(),
        )
    }

    #[test]
    fn defaults() {
        let c = conf("").unwrap();
        assert_eq!(c.bridge, "hako0");
        assert!(c.is_gateway && c.is_default_gateway && c.hairpin_mode && c.ip_masq);
        assert!(!c.promisc_mode);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/networks/pods"));
        assert_eq!(c.subnet_file, PathBuf::from("/run/hako/subnet.env"));
    }

    #[test]
    fn errors_and_codes() {
        for (input, code) in [
            (r#"{"cniVersion":"1.1.0","name":"#.to_string(), 6),
            ("[]".to_string(), 6),
            (r#"{"cniVersion":"9.9.9","name":"x"}"#.to_string(), 1),
            (r#"{"name":"x"}"#.to_string(), 7),
            (r#"{"cniVersion":"1.0.0"}"#.to_string(), 7),
            (r#"{"cniVersion":"1.0.0","name":"a/b"}"#.to_string(), 7),
            (
                r#"{"cniVersion":"1.0.0","name":"x","bridge":"a/b"}"#.to_string(),
                7,
            ),
            (r#"{"cniVersion":"1.0.0","name":"x","mtu":10}"#.to_string(), 7),
            (
                r#"{"cniVersion":"1.0.0","name":"x","ipam":{"ranges":[{"subnet":"10.0.0.0/33"}]}}"#
                    .to_string(),
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","ipam":{"ranges":[{"subnet":"10.0.0.0/24","rangeStart":"10.0.1.5"}]}}"#
                    .to_string(),
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","ipam":{"ranges":[{"subnet":"10.0.0.0/24"},{"subnet":"10.0.1.0/24"}]}}"#
                    .to_string(),
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","ipam":{"type":"../sbin/x"}}"#.to_string(),
                7,
            ),
            (r#"{"cniVersion":"1.0.0","name":"x","ipam":{"type":3}}"#.to_string(), 6),
            (r#"{"cniVersion":"1.0.0","name":"x","vlan":5000}"#.to_string(), 7),
            (r#"{"cniVersion":"1.0.0","name":"x","vlan":-1}"#.to_string(), 7),
            (
                r#"{"cniVersion":"1.0.0","name":"x","bridge":"abcdefghijkl","vlan":100}"#
                    .to_string(),
                7,
            ),
            (r#"{"cniVersion":"1.0.0","name":"x","vlanTrunk":[{"id":0}]}"#.to_string(), 7),
            (r#"{"cniVersion":"1.0.0","name":"x","vlanTrunk":[{"minID":5}]}"#.to_string(), 7),
            (
                r#"{"cniVersion":"1.0.0","name":"x","vlanTrunk":[{"minID":9,"maxID":5}]}"#
                    .to_string(),
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","disableContainerInterface":true}"#.to_string(),
                2,
            ),
            (r#"{"cniVersion":"1.0.0","name":"x","ipMasqBackend":"pf"}"#.to_string(), 7),
            (
                r#"{"cniVersion":"1.0.0","name":"x","runtimeConfig":{"mac":"01:00:00:00:00:01"}}"#
                    .to_string(),
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","args":{"cni":{"mac":"02:00:00:00:00"}}}"#
                    .to_string(),
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","hairpinMode":true,"promiscMode":true}"#
                    .to_string(),
                7,
            ),
        ] {
            let e = NetConf::parse(input.as_bytes()).unwrap_err();
            assert_eq!(e.code(), code, "{input}: {e}");
        }
    }

    #[test]
    fn ipam_type_selects_builtin_or_delegated() {
        for (extra, want) in [
            ("", IpamMode::Builtin),
            (r#","ipam":{"type":"hako"}"#, IpamMode::Builtin),
            (
                r#","ipam":{"type":"hako-cni","ranges":[{"subnet":"10.0.0.0/24"}]}"#,
                IpamMode::Builtin,
            ),
            (
                r#","ipam":{"type":"host-local","ranges":[[{"subnet":"10.0.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}]}"#,
                IpamMode::Delegated("host-local".into()),
            ),
            // The delegated plugin's own format is not ours to judge.
            (
                r#","ipam":{"type":"static","addresses":[{"address":"10.0.0.5/24"}]}"#,
                IpamMode::Delegated("static".into()),
            ),
            (
                r#","ipam":{"type":"whereabouts","range":"10.0.0.0/24","ranges":"x"}"#,
                IpamMode::Delegated("whereabouts".into()),
            ),
        ] {
            let c = conf(extra).unwrap_or_else(|e| panic!("{extra}: {e}"));
            assert_eq!(c.ipam, want, "{extra}");
            if let IpamMode::Delegated(_) = want {
                assert!(c.ranges.is_empty() && c.routes.is_empty());
                assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/hako/pods"));
            }
        }
        // promiscMode alone turns hairpin's default off instead of failing.
        let c = conf(r#","promiscMode":true"#).unwrap();
        assert!(c.promisc_mode && !c.hairpin_mode);
        let c = conf(r#","vlan":0,"macspoofchk":false,"ipMasqBackend":"nftables""#).unwrap();
        assert_eq!(c.ip_masq_backend, MasqBackend::Nftables);
        let c = conf(
            r#","runtimeConfig":{"mac":"02:00:00:00:00:07"},"args":{"cni":{"mac":"02:00:00:00:00:08"}},"portIsolation":true"#,
        )
        .unwrap();
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 7]));
        assert!(c.port_isolation && !c.enable_dad);
        assert!(conf(r#","enabledad":true"#).unwrap().enable_dad);
        let c = conf(r#","args":{"cni":{"mac":"02-00-00-00-00-08"}}"#).unwrap();
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 8]));
        let c = conf(r#","vlan":100,"preserveDefaultVlan":true"#).unwrap();
        assert_eq!((c.vlan, c.preserve_default_vlan), (100, true));
        let c = conf(r#","vlanTrunk":[{"id":7},{"minID":3,"maxID":5},{"id":4}]"#).unwrap();
        assert_eq!(c.vlan_trunk, [3, 4, 5, 7]);
        let c = conf(r#","ipMasqBackend":"iptables""#).unwrap();
        assert_eq!(c.ip_masq_backend, MasqBackend::Iptables);
    }

    #[test]
    fn ranges_nested_and_flat() {
        let c = conf(
            r#","ipam":{"ranges":[[{"subnet":"10.1.0.0/24","gateway":"10.1.0.254"}],{"subnet":"fd00::/64"}],"routes":[{"dst":"192.168.0.0/16"}]}"#,
        )
        .unwrap();
        assert_eq!(c.ranges.len(), 2);
        let n = resolve(&c, None).unwrap();
        assert_eq!(n.ranges[0].gateway, "10.1.0.254".parse::<IpAddr>().unwrap());
        assert_eq!(n.ranges[1].gateway, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(n.mtu, 1500);
        assert_eq!(c.routes[0].dst, "192.168.0.0/16".parse::<IpNet>().unwrap());
        // Without a cluster network, each range's own subnet is not masqueraded.
        assert_eq!(n.cluster.len(), 2);
    }

    #[test]
    fn subnet_file() {
        let text = "# written by hako-agent\nHAKO_NETWORK=10.244.0.0/16\nHAKO_SUBNET=10.244.3.1/24\nHAKO_IPV6_SUBNET=\"fd10:3::/64\"\nHAKO_MTU=1450\n";
        let env = parse_subnet_env(text).unwrap();
        assert_eq!(env.mtu, Some(1450));
        let c = conf("").unwrap();
        let n = resolve(&c, Some(text)).unwrap();
        assert_eq!(n.mtu, 1450);
        assert_eq!(n.ranges.len(), 2);
        assert_eq!(
            n.ranges[0].subnet,
            "10.244.3.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(n.ranges[0].gateway, "10.244.3.1".parse::<IpAddr>().unwrap());
        assert_eq!(n.cluster[0], "10.244.0.0/16".parse::<IpNet>().unwrap());
        // The config's mtu wins over the file.
        let c = conf(r#","mtu":1400"#).unwrap();
        assert_eq!(resolve(&c, Some(text)).unwrap().mtu, 1400);
        assert_eq!(
            resolve(&c, None).unwrap_err().code(),
            7,
            "no ranges anywhere"
        );
        assert!(parse_subnet_env("HAKO_MTU=big").is_err());
        assert!(parse_subnet_env("garbage").is_err());
    }

    #[test]
    fn ifnames() {
        for (n, ok) in [
            ("eth0", true),
            ("", false),
            ("a/b", false),
            ("..", false),
            ("a b", false),
            ("0123456789abcdef", false),
            ("0123456789abcde", true),
        ] {
            assert_eq!(valid_ifname(n), ok, "{n:?}");
        }
    }

    #[test]
    fn gc_attachments() {
        let c = conf(r#","cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]"#)
            .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }
}
