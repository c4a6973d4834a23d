//! CNI version negotiation and result shapes for 0.3.0 through 1.1.0. Pure.

use ipnet::IpNet;
use serde_json::{json, Map, Value};
use std::net::IpAddr;

/// Every cniVersion this plugin speaks, oldest first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version.
pub const LATEST: &str = "1.1.0";

/// A CNI command, as named by `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container.
    Del,
    /// Verify an attachment.
    Check,
    /// Report readiness.
    Status,
    /// Release everything not in the valid attachments.
    Gc,
    /// Report supported versions.
    Version,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    /// The oldest spec version that defines this command.
    pub fn min_version(self) -> &'static str {
        match self {
            Self::Add | Self::Del | Self::Version => "0.3.0",
            Self::Check => "0.4.0",
            Self::Status | Self::Gc => "1.1.0",
        }
    }
}

/// Parses "a.b.c" into a comparable triple.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((a, b, c))
}

/// True when the plugin speaks `v`.
pub fn is_supported(v: &str) -> bool {
    SUPPORTED.contains(&v)
}

/// True when version `v` allows `cmd`.
pub fn allows(v: &str, cmd: Command) -> bool {
    match (parse_version(v), parse_version(cmd.min_version())) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

/// The VERSION answer.
pub fn version_info(cni_version: &str) -> Value {
    json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED })
}

/// One interface of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address, lower-case colon separated.
    pub mac: String,
    /// MTU (1.1.0 field).
    pub mtu: Option<u32>,
    /// Netns path for container-side interfaces.
    pub sandbox: Option<String>,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: IpNet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
}

/// A version-independent CNI result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    /// Interfaces.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS block, passed through as given.
    pub dns: Value,
}

/// Error decoding a prevResult.
#[derive(Debug, thiserror::Error)]
#[error("prevResult: {0}")]
pub struct ResultParseError(pub String);

impl CniResult {
    /// Renders the result in the shape of `version`.
    pub fn render(&self, version: &str) -> Value {
        let old = parse_version(version).is_some_and(|v| v < (1, 0, 0));
        let mtu_ok = parse_version(version).is_some_and(|v| v >= (1, 1, 0));
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("name".into(), json!(i.name));
                m.insert("mac".into(), json!(i.mac));
                if let (true, Some(mtu)) = (mtu_ok, i.mtu) {
                    m.insert("mtu".into(), json!(mtu));
                }
                if let Some(s) = &i.sandbox {
                    m.insert("sandbox".into(), json!(s));
                }
                Value::Object(m)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = Map::new();
                if old {
                    let v = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    m.insert("version".into(), json!(v));
                }
                m.insert("address".into(), json!(ip.address.to_string()));
                if let Some(g) = ip.gateway {
                    m.insert("gateway".into(), json!(g.to_string()));
                }
                if let Some(i) = ip.interface {
                    m.insert("interface".into(), json!(i));
                }
                Value::Object(m)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("dst".into(), json!(r.dst.to_string()));
                if let Some(g) = r.gw {
                    m.insert("gw".into(), json!(g.to_string()));
                }
                Value::Object(m)
            })
            .collect();
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version));
        out.insert("interfaces".into(), Value::Array(interfaces));
        out.insert("ips".into(), Value::Array(ips));
        out.insert("routes".into(), Value::Array(routes));
        out.insert(
            "dns".into(),
            if self.dns.is_null() {
                json!({})
            } else {
                self.dns.clone()
            },
        );
        Value::Object(out)
    }

    /// Decodes a result of any supported version (a chain's prevResult).
    pub fn parse(v: &Value) -> Result<Self, ResultParseError> {
        let err = |m: &str| ResultParseError(m.to_string());
        let mut out = CniResult::default();
        if let Some(ifs) = v.get("interfaces").and_then(Value::as_array) {
            for i in ifs {
                out.interfaces.push(Interface {
                    name: i
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| err("interface without name"))?
                        .to_string(),
                    mac: i
                        .get("mac")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    mtu: i
                        .get("mtu")
                        .and_then(Value::as_u64)
                        .and_then(|m| u32::try_from(m).ok()),
                    sandbox: i.get("sandbox").and_then(Value::as_str).map(str::to_string),
                });
            }
        }
        if let Some(ips) = v.get("ips").and_then(Value::as_array) {
            for ip in ips {
                let address = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("ip without address"))?
                    .parse()
                    .map_err(|_| err("bad ip address"))?;
                let gateway = match ip.get("gateway").and_then(Value::as_str) {
                    Some(g) => Some(g.parse().map_err(|_| err("bad gateway"))?),
                    None => None,
                };
                let interface = ip
                    .get("interface")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok());
                out.ips.push(IpConfig {
                    address,
                    gateway,
                    interface,
                });
            }
        }
        if let Some(rs) = v.get("routes").and_then(Value::as_array) {
            for r in rs {
                let dst = r
                    .get("dst")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("route without dst"))?
                    .parse()
                    .map_err(|_| err("bad route dst"))?;
                let gw = match r.get("gw").and_then(Value::as_str) {
                    Some(g) => Some(g.parse().map_err(|_| err("bad route gw"))?),
                    None => None,
                };
                out.routes.push(Route { dst, gw });
            }
        }
        out.dns = v.get("dns").cloned().unwrap_or(Value::Null);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                mtu: Some(1450),
                sandbox: Some("/run/netns/x".into()),
            }],
            ips: vec![IpConfig {
                address: "10.244.1.2/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn shapes_per_version() {
        for (v, has_version, has_mtu) in [
            ("0.3.0", true, false),
            ("0.3.1", true, false),
            ("0.4.0", true, false),
            ("1.0.0", false, false),
            ("1.1.0", false, true),
        ] {
            let r = sample().render(v);
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0].get("version").is_some(), has_version, "{v}");
            assert_eq!(r["interfaces"][0].get("mtu").is_some(), has_mtu, "{v}");
            assert_eq!(r["ips"][0]["address"], "10.244.1.2/24");
            assert_eq!(r["ips"][0]["interface"], 0);
            let back = CniResult::parse(&r).unwrap();
            assert_eq!(back.ips, sample().ips);
        }
    }

    #[test]
    fn command_versions() {
        for (v, cmd, ok) in [
            ("0.3.1", Command::Check, false),
            ("0.4.0", Command::Check, true),
            ("1.0.0", Command::Gc, false),
            ("1.1.0", Command::Gc, true),
            ("1.1.0", Command::Status, true),
            ("0.3.0", Command::Add, true),
        ] {
            assert_eq!(allows(v, cmd), ok, "{v} {cmd:?}");
        }
        assert!(!is_supported("9.9.9"));
        assert!(is_supported("0.4.0"));
        assert_eq!(parse_version("1.x.0"), None);
    }
}
