//! `hako-proxy --config FILE`: kube-proxy's `KubeProxyConfiguration`
//! (kubeproxy.config.k8s.io/v1alpha1) read into the settings hako has flags for. Pure: text
//! in, settings and notes out. Also the pieces other component configs reuse
//! ([`ConfigDoc`] for known/unsupported/unknown fields, [`go_duration`]).
//!
//! As kube-proxy, a zero value (`0s`, `""`, `null`, `0`, `false`) means "the default": such
//! a field sets nothing. Fields hako does not implement are noted when they carry a
//! non-zero value; fields no version of the type has are noted as unknown.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_yaml::Value;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigFileError {
    /// Not YAML/JSON, or not a mapping.
    #[error("not a YAML or JSON object: {0}")]
    Syntax(String),
    /// Another kind or API version.
    #[error("expected kind {want_kind} of {want_api}, found kind {kind:?} apiVersion {api:?}")]
    Kind {
        /// Expected kind.
        want_kind: &'static str,
        /// Expected apiVersion.
        want_api: &'static str,
        /// Kind found.
        kind: String,
        /// apiVersion found.
        api: String,
    },
    /// A field has a value of the wrong type or an invalid value.
    #[error("{field}: {why}")]
    Field {
        /// Dotted path.
        field: String,
        /// What is wrong.
        why: String,
    },
}

/// A parsed config document with bookkeeping of which fields were read.
#[derive(Debug)]
pub struct ConfigDoc {
    root: Value,
    known: BTreeSet<String>,
    /// Notes for the operator (unsupported or unknown fields), each once.
    pub notes: Vec<String>,
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || go_duration(s).is_ok_and(|d| d.is_zero()),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.values().all(is_zero),
        Value::Tagged(t) => is_zero(&t.value),
    }
}

fn field_err(field: &str, why: impl Into<String>) -> ConfigFileError {
    ConfigFileError::Field {
        field: field.to_string(),
        why: why.into(),
    }
}

impl ConfigDoc {
    /// Parses `text` (YAML or JSON) and checks `kind` and `apiVersion`.
    pub fn parse(
        text: &str,
        want_kind: &'static str,
        want_api: &'static str,
    ) -> Result<Self, ConfigFileError> {
        let root: Value =
            serde_yaml::from_str(text).map_err(|e| ConfigFileError::Syntax(e.to_string()))?;
        if !root.is_mapping() {
            return Err(ConfigFileError::Syntax(
                "the document is not a mapping".into(),
            ));
        }
        let s = |k: &str| {
            root.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (kind, api) = (s("kind"), s("apiVersion"));
        if kind != want_kind || api != want_api {
            return Err(ConfigFileError::Kind {
                want_kind,
                want_api,
                kind,
                api,
            });
        }
        let mut known = BTreeSet::new();
        known.insert("kind".to_string());
        known.insert("apiVersion".to_string());
        Ok(Self {
            root,
            known,
            notes: Vec::new(),
        })
    }

    fn lookup(&self, path: &str) -> Option<&Value> {
        let mut v = &self.root;
        for k in path.split('.') {
            v = v.get(k)?;
        }
        Some(v)
    }

    /// The value at `path`, zero or not (marks the field known).
    pub fn raw(&mut self, path: &str) -> Option<&Value> {
        self.known.insert(path.to_string());
        self.lookup(path)
    }

    /// The value at `path` unless absent or zero (marks the field known).
    pub fn value(&mut self, path: &str) -> Option<&Value> {
        self.known.insert(path.to_string());
        self.lookup(path).filter(|v| !is_zero(v))
    }

    /// A string field.
    pub fn str(&mut self, path: &str) -> Result<Option<String>, ConfigFileError> {
        match self.value(path) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(field_err(path, "expected a string")),
        }
    }

    /// A boolean field; `false` is returned too when written (not a zero value here).
    pub fn bool(&mut self, path: &str) -> Result<Option<bool>, ConfigFileError> {
        self.known.insert(path.to_string());
        match self.lookup(path) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(field_err(path, "expected true or false")),
        }
    }

    /// A non-negative integer field.
    pub fn u64(&mut self, path: &str) -> Result<Option<u64>, ConfigFileError> {
        match self.value(path) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| field_err(path, "expected a non-negative integer")),
        }
    }

    /// A list of strings.
    pub fn strings(&mut self, path: &str) -> Result<Option<Vec<String>>, ConfigFileError> {
        match self.value(path) {
            None => Ok(None),
            Some(Value::Sequence(s)) => s
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| field_err(path, "expected a list of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(field_err(path, "expected a list of strings")),
        }
    }

    /// A Go duration (`1m30s`).
    pub fn duration(&mut self, path: &str) -> Result<Option<Duration>, ConfigFileError> {
        match self.str(path) {
            Ok(None) => Ok(None),
            Ok(Some(s)) => go_duration(&s).map(Some).map_err(|e| field_err(path, e)),
            Err(_) => Err(field_err(path, "expected a duration such as 30s or 1m0s")),
        }
    }

    /// A mapping of strings (`nodeLabels`).
    pub fn string_map(
        &mut self,
        path: &str,
    ) -> Result<Option<Vec<(String, String)>>, ConfigFileError> {
        match self.value(path) {
            None => Ok(None),
            Some(Value::Mapping(m)) => m
                .iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    (Some(k), Value::String(s)) => Ok((k.to_string(), s.clone())),
                    (Some(k), Value::Bool(b)) => Ok((k.to_string(), b.to_string())),
                    (Some(k), Value::Number(n)) => Ok((k.to_string(), n.to_string())),
                    _ => Err(field_err(path, "expected a map of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(field_err(path, "expected a map of strings")),
        }
    }

    /// Fields hako reads but does not implement: a note for each that carries a value.
    pub fn unsupported(&mut self, paths: &[&str]) {
        for p in paths {
            if self.value(p).is_some() {
                self.notes
                    .push(format!("{p}: not supported by hako, ignored"));
            }
        }
    }

    /// Fields known to the type that hako ignores whatever their value (tuning of parts
    /// hako does not have, such as client QPS).
    pub fn ignored(&mut self, paths: &[&str]) {
        for p in paths {
            self.known.insert((*p).to_string());
        }
    }

    /// Notes every field that was not read as unknown (dotted path), then returns the notes.
    pub fn finish(mut self) -> Vec<String> {
        let mut unknown = Vec::new();
        walk(&self.root, "", &self.known, &mut unknown);
        unknown.sort();
        for u in unknown {
            self.notes.push(format!("{u}: unknown field, ignored"));
        }
        self.notes
    }
}

fn walk(v: &Value, prefix: &str, known: &BTreeSet<String>, out: &mut Vec<String>) {
    let Value::Mapping(m) = v else { return };
    for (k, child) in m {
        let key = match k {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let path = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        if known.contains(&path) {
            continue;
        }
        let below = format!("{path}.");
        if known.iter().any(|k| k.starts_with(&below)) {
            walk(child, &path, known, out);
        } else {
            out.push(path);
        }
    }
}

/// Parses a Go `time.Duration` text: `300ms`, `1m30s`, `2h`, `0`, `1.5s` (units ns, us, µs,
/// ms, s, m, h; no sign).
pub fn go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (such as 30s, 1m0s, 500ms)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let num: f64 = rest[..n_end].parse().map_err(|_| bad())?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..u_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[u_end..];
        total += num * mult;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// An address field: `ip:port`, or a bare IP that gets `default_port` (kube-proxy accepts
/// both for its bind addresses).
pub fn bind_address(
    field: &str,
    s: &str,
    default_port: u16,
) -> Result<SocketAddr, ConfigFileError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| field_err(field, format!("{s:?} is not an address (ip:port)")))
}

/// The proxy mode of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyModeSetting {
    /// `iptables`.
    Iptables,
    /// `ipvs`.
    Ipvs,
    /// `nftables`.
    Nftables,
}

/// Sync periods of one mode's sub-configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncSettings {
    /// `syncPeriod`.
    pub sync_period: Option<Duration>,
    /// `minSyncPeriod`.
    pub min_sync_period: Option<Duration>,
    /// `masqueradeAll` (iptables and nftables sub-configs).
    pub masquerade_all: Option<bool>,
}

/// What a `KubeProxyConfiguration` sets (None: the flag's value or default stays).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeProxySettings {
    /// `mode` ("" = the default, iptables).
    pub mode: Option<ProxyModeSetting>,
    /// `clusterCIDR` (comma-separated for dual stack).
    pub cluster_cidr: Option<String>,
    /// `hostnameOverride`.
    pub hostname_override: Option<String>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<String>,
    /// `healthzBindAddress`.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `metricsBindAddress`.
    pub metrics_bind_address: Option<SocketAddr>,
    /// `nodePortAddresses`.
    pub node_port_addresses: Option<Vec<String>>,
    /// `iptables.*`.
    pub iptables: SyncSettings,
    /// `iptables.localhostNodePorts` (`--iptables-localhost-nodeports`; an explicit `false`
    /// counts, as kube-proxy's `*bool`).
    pub iptables_localhost_nodeports: Option<bool>,
    /// `ipvs.syncPeriod`, `ipvs.minSyncPeriod`.
    pub ipvs: SyncSettings,
    /// `ipvs.scheduler`.
    pub ipvs_scheduler: Option<String>,
    /// `nftables.*`.
    pub nftables: SyncSettings,
    /// `logging.verbosity`.
    pub verbosity: Option<u8>,
    /// `logging.format` (`text` or `json`).
    pub log_format: Option<String>,
}

impl KubeProxySettings {
    /// The sub-configuration of `mode` (kube-proxy reads the periods of the active mode).
    pub fn sync_for(&self, mode: ProxyModeSetting) -> &SyncSettings {
        match mode {
            ProxyModeSetting::Iptables => &self.iptables,
            ProxyModeSetting::Ipvs => &self.ipvs,
            ProxyModeSetting::Nftables => &self.nftables,
        }
    }
}

/// kind of a KubeProxyConfiguration.
pub const KIND: &str = "KubeProxyConfiguration";
/// apiVersion of a KubeProxyConfiguration.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

fn sync(doc: &mut ConfigDoc, sub: &str, masq: bool) -> Result<SyncSettings, ConfigFileError> {
    Ok(SyncSettings {
        sync_period: doc.duration(&format!("{sub}.syncPeriod"))?,
        min_sync_period: doc.duration(&format!("{sub}.minSyncPeriod"))?,
        masquerade_all: if masq {
            doc.bool(&format!("{sub}.masqueradeAll"))?
        } else {
            None
        },
    })
}

/// Reads a KubeProxyConfiguration; returns the settings and the notes to log (each once).
pub fn parse_kube_proxy_config(
    text: &str,
) -> Result<(KubeProxySettings, Vec<String>), ConfigFileError> {
    let mut doc = ConfigDoc::parse(text, KIND, API_VERSION)?;
    let mode = match doc.str("mode")?.as_deref() {
        None => None,
        Some("iptables") => Some(ProxyModeSetting::Iptables),
        Some("ipvs") => Some(ProxyModeSetting::Ipvs),
        Some("nftables") => Some(ProxyModeSetting::Nftables),
        Some(other) => {
            return Err(field_err(
                "mode",
                format!("{other:?} is not a mode hako has (iptables, ipvs, nftables)"),
            ))
        }
    };
    let addr = |doc: &mut ConfigDoc, f: &str, port| -> Result<_, ConfigFileError> {
        doc.str(f)?.map(|s| bind_address(f, &s, port)).transpose()
    };
    let verbosity = doc
        .u64("logging.verbosity")?
        .map(|v| u8::try_from(v).unwrap_or(u8::MAX));
    let s = KubeProxySettings {
        mode,
        cluster_cidr: doc.str("clusterCIDR")?,
        hostname_override: doc.str("hostnameOverride")?,
        kubeconfig: doc.str("clientConnection.kubeconfig")?,
        healthz_bind_address: addr(&mut doc, "healthzBindAddress", 10256)?,
        metrics_bind_address: addr(&mut doc, "metricsBindAddress", 10249)?,
        node_port_addresses: doc.strings("nodePortAddresses")?,
        iptables: sync(&mut doc, "iptables", true)?,
        ipvs: sync(&mut doc, "ipvs", false)?,
        ipvs_scheduler: doc.str("ipvs.scheduler")?,
        iptables_localhost_nodeports: doc.bool("iptables.localhostNodePorts")?,
        nftables: sync(&mut doc, "nftables", true)?,
        verbosity,
        log_format: doc.str("logging.format")?,
    };
    if let Some(f) = &s.log_format {
        if f != "text" && f != "json" {
            return Err(field_err("logging.format", format!("{f:?}: text or json")));
        }
    }
    doc.unsupported(&[
        "bindAddressHardFail",
        "enableProfiling",
        "oomScoreAdj",
        "portRange",
        "featureGates",
        "detectLocalMode",
        "detectLocal.bridgeInterface",
        "detectLocal.interfaceNamePrefix",
        "conntrack.maxPerCore",
        "conntrack.min",
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.tcpBeLiberal",
        "conntrack.udpTimeout",
        "conntrack.udpStreamTimeout",
        "iptables.masqueradeBit",
        "nftables.masqueradeBit",
        "ipvs.excludeCIDRs",
        "ipvs.strictARP",
        "ipvs.tcpTimeout",
        "ipvs.tcpFinTimeout",
        "ipvs.udpTimeout",
        "showHiddenMetricsForVersion",
        "configSyncPeriod",
        "winkernel",
    ]);
    // Known fields with no meaning for hako (client tuning, the address kube-proxy's
    // removed userspace mode bound, log flushing).
    doc.ignored(&[
        "bindAddress",
        "clientConnection.acceptContentTypes",
        "clientConnection.burst",
        "clientConnection.contentType",
        "clientConnection.qps",
        "logging.flushFrequency",
        "logging.options",
        "logging.vmodule",
        "logging.format",
        "logging.verbosity",
    ]);
    Ok((s, doc.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubeadm init` writes into the kube-proxy ConfigMap (v1.28), with a mode and a
    /// CIDR filled in and one field of no version of the type.
    const KUBEADM: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: "ipvs"
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadm_file_loads_with_defaults_for_zero_values() {
        let (s, notes) = parse_kube_proxy_config(KUBEADM).expect("loads");
        assert_eq!(s.mode, Some(ProxyModeSetting::Ipvs));
        assert_eq!(s.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        assert_eq!(
            s.kubeconfig.as_deref(),
            Some("/var/lib/kube-proxy/kubeconfig.conf")
        );
        assert_eq!(s.healthz_bind_address, None);
        assert_eq!(s.iptables.sync_period, None);
        assert_eq!(s.iptables.masquerade_all, Some(false));
        assert_eq!(s.iptables_localhost_nodeports, None);
        assert_eq!(s.verbosity, None);
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn fields_map_and_unknown_ones_are_noted() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
healthzBindAddress: 127.0.0.1
metricsBindAddress: 0.0.0.0:9100
nodePortAddresses: [192.168.0.0/16, primary]
nftables: {syncPeriod: 1m30s, minSyncPeriod: 500ms, masqueradeAll: true}
ipvs: {scheduler: wrr}
conntrack: {maxPerCore: 32768}
logging: {verbosity: 4, format: json}
surprise: 1
iptables: {extra: x, localhostNodePorts: false}
";
        let (s, notes) = parse_kube_proxy_config(text).expect("loads");
        assert_eq!(s.mode, Some(ProxyModeSetting::Nftables));
        assert_eq!(
            s.healthz_bind_address,
            Some("127.0.0.1:10256".parse().expect("addr"))
        );
        assert_eq!(
            s.metrics_bind_address,
            Some("0.0.0.0:9100".parse().expect("addr"))
        );
        assert_eq!(
            s.node_port_addresses,
            Some(vec!["192.168.0.0/16".into(), "primary".into()])
        );
        let n = s.sync_for(ProxyModeSetting::Nftables);
        assert_eq!(n.sync_period, Some(Duration::from_secs(90)));
        assert_eq!(n.min_sync_period, Some(Duration::from_millis(500)));
        assert_eq!(n.masquerade_all, Some(true));
        assert_eq!(s.ipvs_scheduler.as_deref(), Some("wrr"));
        assert_eq!(s.iptables_localhost_nodeports, Some(false));
        assert_eq!(s.verbosity, Some(4));
        assert_eq!(s.log_format.as_deref(), Some("json"));
        assert_eq!(
            notes,
            [
                "conntrack.maxPerCore: not supported by hako, ignored",
                "iptables.extra: unknown field, ignored",
                "surprise: unknown field, ignored",
            ]
        );
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        for (text, want) in [
            ("kind: Pod\napiVersion: v1\n", "expected kind"),
            ("- a\n- b\n", "not a mapping"),
            (": : :\n", "not a YAML"),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: userspace\n",
                "mode",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables: {syncPeriod: 5 minutes}\n",
                "iptables.syncPeriod",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhealthzBindAddress: nowhere\n",
                "healthzBindAddress",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: [a]\n",
                "clusterCIDR",
            ),
        ] {
            let e = parse_kube_proxy_config(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn go_durations() {
        for (s, ms) in [
            ("0", 0),
            ("0s", 0),
            ("1s", 1000),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
            ("250ms", 250),
            ("1.5s", 1500),
        ] {
            assert_eq!(go_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for s in ["", "s", "1", "-1s", "1d", "1..2s"] {
            assert!(go_duration(s).is_err(), "{s}");
        }
    }
}
