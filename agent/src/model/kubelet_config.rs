//! `hako-agent --config FILE`: the kubelet's `KubeletConfiguration`
//! (kubelet.config.k8s.io/v1beta1) read into the settings hako has flags for. Pure: text in,
//! settings and notes out; `main` applies them under the flags given on the command line.
//!
//! As the kubelet, a zero value (`0s`, `""`, `null`, `0`) means "the default": such a field
//! sets nothing (kubeadm writes `0s` for most periods). Fields of the type that hako does not
//! implement are noted when they carry a value; fields the type does not have are noted as
//! unknown. `cgroupDriver: systemd` (kubeadm's default) is noted: hako drives cgroupfs.

use std::time::Duration;

use hako_proxier::proxy_config::{ConfigDoc, ConfigFileError};

/// kind of a KubeletConfiguration.
pub const KIND: &str = "KubeletConfiguration";
/// apiVersion of a KubeletConfiguration.
pub const API_VERSION: &str = "kubelet.config.k8s.io/v1beta1";

/// What a `KubeletConfiguration` sets (None: the flag's value or default stays).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeletSettings {
    /// `staticPodPath` (`--pod-manifest-path`).
    pub static_pod_path: Option<String>,
    /// `address` (kubelet API listen address).
    pub address: Option<String>,
    /// `port` (kubelet API).
    pub port: Option<u16>,
    /// `healthzBindAddress` + `healthzPort` as `ip:port` (either alone takes the default of
    /// the other: 127.0.0.1, 10248); `""` when `healthzPort: 0` disables it.
    pub healthz_bind_address: Option<String>,
    /// `tlsCertFile`.
    pub tls_cert_file: Option<String>,
    /// `tlsPrivateKeyFile`.
    pub tls_private_key_file: Option<String>,
    /// `authentication.x509.clientCAFile`.
    pub client_ca_file: Option<String>,
    /// `authentication.webhook.cacheTTL`.
    pub authentication_cache_ttl: Option<Duration>,
    /// `authorization.webhook.cacheAuthorizedTTL`.
    pub authorization_cache_authorized_ttl: Option<Duration>,
    /// `authorization.webhook.cacheUnauthorizedTTL`.
    pub authorization_cache_unauthorized_ttl: Option<Duration>,
    /// `clusterDNS`.
    pub cluster_dns: Option<Vec<String>>,
    /// `clusterDomain`.
    pub cluster_domain: Option<String>,
    /// `resolvConf`.
    pub resolv_conf: Option<String>,
    /// `podCIDR`.
    pub pod_cidr: Option<String>,
    /// `maxPods`.
    pub max_pods: Option<u32>,
    /// `cgroupRoot` (`--cgroup-parent`).
    pub cgroup_root: Option<String>,
    /// `evictionHard` as `signal<value,...` (sorted by signal).
    pub eviction_hard: Option<String>,
    /// `evictionSoft` as `signal<value,...` (sorted by signal).
    pub eviction_soft: Option<String>,
    /// `evictionSoftGracePeriod` as `signal=duration,...`.
    pub eviction_soft_grace_period: Option<String>,
    /// `evictionMinimumReclaim` as `signal=value,...`.
    pub eviction_minimum_reclaim: Option<String>,
    /// `evictionPressureTransitionPeriod` (a Go duration).
    pub eviction_pressure_transition_period: Option<String>,
    /// `evictionMaxPodGracePeriod` (seconds).
    pub eviction_max_pod_grace_period: Option<i64>,
    /// `systemReserved` as `name=quantity,...`.
    pub system_reserved: Option<String>,
    /// `registerWithTaints` as `key=value:Effect,...`.
    pub register_with_taints: Option<String>,
    /// `syncFrequency`.
    pub sync_frequency: Option<Duration>,
    /// `fileCheckFrequency`.
    pub file_check_frequency: Option<Duration>,
    /// `nodeStatusUpdateFrequency`.
    pub node_status_update_frequency: Option<Duration>,
    /// `nodeStatusReportFrequency`.
    pub node_status_report_frequency: Option<Duration>,
    /// `nodeLeaseDurationSeconds`.
    pub node_lease_duration_seconds: Option<u64>,
    /// `containerLogMaxSize` (a quantity text).
    pub container_log_max_size: Option<String>,
    /// `containerLogMaxFiles`.
    pub container_log_max_files: Option<u32>,
    /// `allowedUnsafeSysctls` (`--allowed-unsafe-sysctls`).
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    /// `imageGCHighThresholdPercent` (`--image-gc-high-threshold`).
    pub image_gc_high_threshold_percent: Option<u8>,
    /// `imageGCLowThresholdPercent` (`--image-gc-low-threshold`).
    pub image_gc_low_threshold_percent: Option<u8>,
    /// `imageMinimumGCAge` (`--minimum-image-ttl-duration`).
    pub image_minimum_gc_age: Option<Duration>,
    /// `logging.verbosity`.
    pub verbosity: Option<u8>,
    /// `logging.format` (`text` or `json`).
    pub log_format: Option<String>,
}

/// Every other field of the v1beta1 type (v1.28 to v1.32): hako has no equivalent, so a
/// value in one of them is noted and ignored.
const UNSUPPORTED: &[&str] = &[
    "enableServer",
    "podLogsDir",
    "httpCheckFrequency",
    "staticPodURL",
    "staticPodURLHeader",
    "readOnlyPort",
    "tlsCipherSuites",
    "tlsMinVersion",
    "rotateCertificates",
    "serverTLSBootstrap",
    "authentication.anonymous.enabled",
    "registryPullQPS",
    "registryBurst",
    "eventRecordQPS",
    "eventBurst",
    "enableContentionProfiling",
    "oomScoreAdj",
    "streamingConnectionIdleTimeout",
    "imageMaximumGCAge",
    "volumeStatsAggPeriod",
    "kubeletCgroups",
    "systemCgroups",
    "cpuManagerPolicy",
    "cpuManagerPolicyOptions",
    "cpuManagerReconcilePeriod",
    "memoryManagerPolicy",
    "topologyManagerPolicy",
    "topologyManagerScope",
    "topologyManagerPolicyOptions",
    "qosReserved",
    "runtimeRequestTimeout",
    "hairpinMode",
    "podPidsLimit",
    "runOnce",
    "cpuCFSQuotaPeriod",
    "nodeStatusMaxImages",
    "maxOpenFiles",
    "maxParallelImagePulls",
    "podsPerCore",
    "protectKernelDefaults",
    "iptablesMasqueradeBit",
    "iptablesDropBit",
    "featureGates",
    "memorySwap",
    "containerLogMaxWorkers",
    "containerLogMonitorInterval",
    "kubeReserved",
    "reservedSystemCPUs",
    "showHiddenMetricsForVersion",
    "systemReservedCgroup",
    "kubeReservedCgroup",
    "volumePluginDir",
    "providerID",
    "kernelMemcgNotification",
    "enableSystemLogQuery",
    "shutdownGracePeriod",
    "shutdownGracePeriodCriticalPods",
    "shutdownGracePeriodByPodPriority",
    "reservedMemory",
    "seccompDefault",
    "memoryThrottlingFactor",
    "tracing",
    "imageServiceEndpoint",
    "crashLoopBackOff",
    "userNamespaces",
    "singleProcessOOMKill",
    "imagePullCredentialsVerificationPolicy",
    "preloadedImagesVerificationAllowlist",
    "mergeDefaultEvictionSettings",
];

/// Fields whose default is true: noted when set to false (what hako always does).
const ALWAYS_ON: &[&str] = &[
    "authentication.webhook.enabled",
    "registerNode",
    "cgroupsPerQOS",
    "cpuCFSQuota",
    "enableControllerAttachDetach",
    "makeIPTablesUtilChains",
    "failSwapOn",
    "enableDebuggingHandlers",
    "enableSystemLogHandler",
    "enableProfilingHandler",
    "enableDebugFlagsHandler",
    "localStorageCapacityIsolation",
    "failCgroupV1",
];

/// Known fields without meaning for hako whatever their value.
const IGNORED: &[&str] = &[
    "contentType",
    "kubeAPIQPS",
    "kubeAPIBurst",
    "containerRuntimeEndpoint",
    "configMapAndSecretChangeDetectionStrategy",
    "enforceNodeAllocatable",
    "logging.flushFrequency",
    "logging.options",
    "logging.vmodule",
];

fn field(field: &str, why: impl Into<String>) -> ConfigFileError {
    ConfigFileError::Field {
        field: field.to_string(),
        why: why.into(),
    }
}

fn small<T: TryFrom<u64>>(path: &str, v: Option<u64>) -> Result<Option<T>, ConfigFileError> {
    v.map(|v| T::try_from(v).map_err(|_| field(path, format!("{v} is out of range"))))
        .transpose()
}

fn percent(path: &str, v: Option<u64>) -> Result<Option<u8>, ConfigFileError> {
    match v {
        Some(p) if p > 100 => Err(field(path, format!("{p} is not a percentage (0-100)"))),
        _ => small(path, v),
    }
}

/// Reads a KubeletConfiguration; returns the settings and the notes to log (each once).
pub fn parse_kubelet_config(text: &str) -> Result<(KubeletSettings, Vec<String>), ConfigFileError> {
    let mut doc = ConfigDoc::parse(text, KIND, API_VERSION)?;
    let healthz_ip = doc.str("healthzBindAddress")?;
    // healthzPort is a pointer field: an explicit 0 disables the endpoint.
    let healthz_off = doc.raw("healthzPort").and_then(serde_yaml::Value::as_u64) == Some(0);
    let healthz_port: Option<u16> = small("healthzPort", doc.u64("healthzPort")?)?;
    let healthz_bind_address = match (healthz_ip, healthz_port) {
        _ if healthz_off => Some(String::new()),
        (None, None) => None,
        (ip, port) => {
            let ip = ip.unwrap_or_else(|| "127.0.0.1".into());
            let ip = if ip.contains(':') && !ip.starts_with('[') {
                format!("[{ip}]")
            } else {
                ip
            };
            Some(format!("{ip}:{}", port.unwrap_or(10248)))
        }
    };
    let eviction_hard = doc.string_map("evictionHard")?.map(|m| {
        let mut v: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}<{v}")).collect();
        v.sort();
        v.join(",")
    });
    let joined = |m: Option<std::collections::BTreeMap<String, String>>, sep: &str| {
        m.map(|m| {
            let mut v: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}{sep}{v}")).collect();
            v.sort();
            v.join(",")
        })
    };
    let eviction_soft = joined(
        doc.string_map("evictionSoft")?
            .map(|m| m.into_iter().collect()),
        "<",
    );
    let eviction_soft_grace_period = joined(
        doc.string_map("evictionSoftGracePeriod")?
            .map(|m| m.into_iter().collect()),
        "=",
    );
    let eviction_minimum_reclaim = joined(
        doc.string_map("evictionMinimumReclaim")?
            .map(|m| m.into_iter().collect()),
        "=",
    );
    let eviction_pressure_transition_period = doc
        .duration("evictionPressureTransitionPeriod")?
        .map(|d| format!("{}ms", d.as_millis()));
    let eviction_max_pod_grace_period = doc
        .u64("evictionMaxPodGracePeriod")?
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let system_reserved = doc.string_map("systemReserved")?.map(|m| {
        m.into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    let register_with_taints = match doc.value("registerWithTaints").cloned() {
        None => None,
        Some(serde_yaml::Value::Sequence(ts)) => {
            let mut out = Vec::new();
            for t in ts {
                let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                let (key, value, effect) = (s("key"), s("value"), s("effect"));
                if key.is_empty() || effect.is_empty() {
                    return Err(field(
                        "registerWithTaints",
                        "each taint needs key and effect",
                    ));
                }
                out.push(if value.is_empty() {
                    format!("{key}:{effect}")
                } else {
                    format!("{key}={value}:{effect}")
                });
            }
            Some(out.join(","))
        }
        Some(_) => return Err(field("registerWithTaints", "expected a list of taints")),
    };
    let verbosity = doc
        .u64("logging.verbosity")?
        .map(|v| u8::try_from(v).unwrap_or(u8::MAX));
    let log_format = doc.str("logging.format")?;
    if let Some(f) = &log_format {
        if f != "text" && f != "json" {
            return Err(field("logging.format", format!("{f:?}: text or json")));
        }
    }
    let s = KubeletSettings {
        static_pod_path: doc.str("staticPodPath")?,
        address: doc.str("address")?,
        port: small("port", doc.u64("port")?)?,
        healthz_bind_address,
        tls_cert_file: doc.str("tlsCertFile")?,
        tls_private_key_file: doc.str("tlsPrivateKeyFile")?,
        client_ca_file: doc.str("authentication.x509.clientCAFile")?,
        authentication_cache_ttl: doc.duration("authentication.webhook.cacheTTL")?,
        authorization_cache_authorized_ttl: doc
            .duration("authorization.webhook.cacheAuthorizedTTL")?,
        authorization_cache_unauthorized_ttl: doc
            .duration("authorization.webhook.cacheUnauthorizedTTL")?,
        cluster_dns: doc.strings("clusterDNS")?,
        cluster_domain: doc.str("clusterDomain")?,
        resolv_conf: doc.str("resolvConf")?,
        pod_cidr: doc.str("podCIDR")?,
        max_pods: small("maxPods", doc.u64("maxPods")?)?,
        cgroup_root: doc.str("cgroupRoot")?,
        eviction_hard,
        eviction_soft,
        eviction_soft_grace_period,
        eviction_minimum_reclaim,
        eviction_pressure_transition_period,
        eviction_max_pod_grace_period,
        system_reserved,
        register_with_taints,
        sync_frequency: doc.duration("syncFrequency")?,
        file_check_frequency: doc.duration("fileCheckFrequency")?,
        node_status_update_frequency: doc.duration("nodeStatusUpdateFrequency")?,
        node_status_report_frequency: doc.duration("nodeStatusReportFrequency")?,
        node_lease_duration_seconds: doc.u64("nodeLeaseDurationSeconds")?,
        container_log_max_size: doc.str("containerLogMaxSize")?,
        container_log_max_files: small("containerLogMaxFiles", doc.u64("containerLogMaxFiles")?)?,
        allowed_unsafe_sysctls: doc.strings("allowedUnsafeSysctls")?,
        image_gc_high_threshold_percent: percent(
            "imageGCHighThresholdPercent",
            doc.u64("imageGCHighThresholdPercent")?,
        )?,
        image_gc_low_threshold_percent: percent(
            "imageGCLowThresholdPercent",
            doc.u64("imageGCLowThresholdPercent")?,
        )?,
        image_minimum_gc_age: doc.duration("imageMinimumGCAge")?,
        verbosity,
        log_format,
    };
    match doc.str("authorization.mode")?.as_deref() {
        None | Some("Webhook") => {}
        Some(m) => doc.notes.push(format!(
            "authorization.mode: {m} is not supported by hako (it always asks the apiserver: Webhook), ignored"
        )),
    }
    match doc.str("cgroupDriver")?.as_deref() {
        None | Some("cgroupfs") => {}
        Some(d) => doc.notes.push(format!(
            "cgroupDriver: {d} is not supported by hako, which writes cgroupfs directly (under --cgroup-root/--cgroup-parent); the driver of the container runtime does not apply"
        )),
    }
    if doc.bool("serializeImagePulls")? == Some(true) {
        doc.notes.push(
            "serializeImagePulls: true is not supported by hako (pods pull their images in parallel), ignored"
                .into(),
        );
    }
    doc.unsupported(UNSUPPORTED);
    for p in ALWAYS_ON {
        if doc.bool(p)? == Some(false) {
            doc.notes.push(format!(
                "{p}: false is not supported by hako (always on), ignored"
            ));
        }
    }
    doc.ignored(IGNORED);
    Ok((s, doc.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/var/lib/kubelet/config.yaml` as `kubeadm init` (v1.28) writes it.
    pub const KUBEADM: &str = r#"apiVersion: kubelet.config.k8s.io/v1beta1
authentication:
  anonymous:
    enabled: false
  webhook:
    cacheTTL: 0s
    enabled: true
  x509:
    clientCAFile: /etc/kubernetes/pki/ca.crt
authorization:
  mode: Webhook
  webhook:
    cacheAuthorizedTTL: 0s
    cacheUnauthorizedTTL: 0s
cgroupDriver: systemd
clusterDNS:
- 10.96.0.10
clusterDomain: cluster.local
containerRuntimeEndpoint: ""
cpuManagerReconcilePeriod: 0s
evictionPressureTransitionPeriod: 0s
fileCheckFrequency: 0s
healthzBindAddress: 127.0.0.1
healthzPort: 10248
httpCheckFrequency: 0s
imageMinimumGCAge: 0s
kind: KubeletConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
memorySwap: {}
nodeStatusReportFrequency: 0s
nodeStatusUpdateFrequency: 0s
resolvConf: /run/systemd/resolve/resolv.conf
rotateCertificates: true
runtimeRequestTimeout: 0s
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
staticPodPath: /etc/kubernetes/manifests
streamingConnectionIdleTimeout: 0s
syncFrequency: 0s
volumeStatsAggPeriod: 0s
"#;

    #[test]
    fn kubeadm_config_loads_with_notes_for_what_hako_lacks() {
        let (s, notes) = parse_kubelet_config(KUBEADM).expect("loads");
        assert_eq!(
            s.static_pod_path.as_deref(),
            Some("/etc/kubernetes/manifests")
        );
        assert_eq!(s.cluster_dns, Some(vec!["10.96.0.10".to_string()]));
        assert_eq!(s.cluster_domain.as_deref(), Some("cluster.local"));
        assert_eq!(s.healthz_bind_address.as_deref(), Some("127.0.0.1:10248"));
        assert_eq!(
            s.client_ca_file.as_deref(),
            Some("/etc/kubernetes/pki/ca.crt")
        );
        assert_eq!(
            s.resolv_conf.as_deref(),
            Some("/run/systemd/resolve/resolv.conf")
        );
        // Zero values are defaults, not settings.
        assert_eq!(s.sync_frequency, None);
        assert_eq!(s.authentication_cache_ttl, None);
        assert_eq!(s.verbosity, None);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("cgroupDriver: systemd is not supported"));
        assert_eq!(
            notes[1],
            "rotateCertificates: not supported by hako, ignored"
        );
    }

    #[test]
    fn fields_map_onto_flags() {
        let text = "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 11250
healthzBindAddress: 0.0.0.0
maxPods: 20
podCIDR: 10.244.3.0/24
allowedUnsafeSysctls: [kernel.msg*, net.core.somaxconn]
evictionHard: {nodefs.available: 5%, memory.available: 50Mi}
evictionSoft: {memory.available: 300Mi, nodefs.available: 15%}
evictionSoftGracePeriod: {nodefs.available: 2m, memory.available: 1m30s}
evictionMinimumReclaim: {memory.available: 50Mi}
evictionPressureTransitionPeriod: 30s
evictionMaxPodGracePeriod: 20
systemReserved: {cpu: 100m, memory: 128Mi}
registerWithTaints: [{key: a, value: b, effect: NoSchedule}, {key: c, effect: NoExecute}]
syncFrequency: 1m30s
nodeLeaseDurationSeconds: 20
containerLogMaxSize: 5Mi
containerLogMaxFiles: 3
imageGCHighThresholdPercent: 90
imageGCLowThresholdPercent: 70
imageMinimumGCAge: 5m
authentication: {webhook: {enabled: false, cacheTTL: 1m}}
authorization: {mode: AlwaysAllow, webhook: {cacheAuthorizedTTL: 10s}}
serializeImagePulls: false
logging: {verbosity: 4, format: json}
readOnlyPort: 10255
notAField: 1
";
        let (s, notes) = parse_kubelet_config(text).expect("loads");
        assert_eq!(s.address.as_deref(), Some("127.0.0.1"));
        assert_eq!(s.port, Some(11250));
        assert_eq!(s.healthz_bind_address.as_deref(), Some("0.0.0.0:10248"));
        assert_eq!(s.max_pods, Some(20));
        assert_eq!(
            s.allowed_unsafe_sysctls,
            Some(vec![
                "kernel.msg*".to_string(),
                "net.core.somaxconn".to_string()
            ])
        );
        assert_eq!(s.pod_cidr.as_deref(), Some("10.244.3.0/24"));
        assert_eq!(
            s.eviction_hard.as_deref(),
            Some("memory.available<50Mi,nodefs.available<5%")
        );
        assert_eq!(
            s.eviction_soft.as_deref(),
            Some("memory.available<300Mi,nodefs.available<15%")
        );
        assert_eq!(
            s.eviction_soft_grace_period.as_deref(),
            Some("memory.available=1m30s,nodefs.available=2m")
        );
        assert_eq!(
            s.eviction_minimum_reclaim.as_deref(),
            Some("memory.available=50Mi")
        );
        assert_eq!(
            s.eviction_pressure_transition_period.as_deref(),
            Some("30000ms")
        );
        assert_eq!(s.eviction_max_pod_grace_period, Some(20));
        assert_eq!(s.system_reserved.as_deref(), Some("cpu=100m,memory=128Mi"));
        assert_eq!(
            s.register_with_taints.as_deref(),
            Some("a=b:NoSchedule,c:NoExecute")
        );
        assert_eq!(s.sync_frequency, Some(Duration::from_secs(90)));
        assert_eq!(s.node_lease_duration_seconds, Some(20));
        assert_eq!(s.container_log_max_size.as_deref(), Some("5Mi"));
        assert_eq!(s.container_log_max_files, Some(3));
        assert_eq!(
            (
                s.image_gc_high_threshold_percent,
                s.image_gc_low_threshold_percent,
                s.image_minimum_gc_age
            ),
            (Some(90), Some(70), Some(Duration::from_secs(300)))
        );
        assert_eq!(s.authentication_cache_ttl, Some(Duration::from_secs(60)));
        assert_eq!(
            s.authorization_cache_authorized_ttl,
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            (s.verbosity, s.log_format.as_deref()),
            (Some(4), Some("json"))
        );
        let off = parse_kubelet_config(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nhealthzPort: 0\n",
        )
        .expect("loads");
        assert_eq!(off.0.healthz_bind_address.as_deref(), Some(""));
        assert_eq!(
            notes,
            [
                "authorization.mode: AlwaysAllow is not supported by hako (it always asks the apiserver: Webhook), ignored",
                "readOnlyPort: not supported by hako, ignored",
                "authentication.webhook.enabled: false is not supported by hako (always on), ignored",
                "notAField: unknown field, ignored",
            ]
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let head = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n";
        for (body, want) in [
            ("port: 70000\n", "port"),
            ("maxPods: -1\n", "maxPods"),
            ("clusterDNS: 10.0.0.10\n", "clusterDNS"),
            ("syncFrequency: soon\n", "syncFrequency"),
            ("registerWithTaints: [{key: a}]\n", "registerWithTaints"),
            ("logging: {format: xml}\n", "logging.format"),
            ("evictionHard: [a]\n", "evictionHard"),
            (
                "imageGCHighThresholdPercent: 101\n",
                "imageGCHighThresholdPercent",
            ),
        ] {
            let e = parse_kubelet_config(&format!("{head}{body}"))
                .expect_err(body)
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = parse_kubelet_config("apiVersion: v1\nkind: Pod\n").expect_err("kind");
        assert!(e.to_string().contains("KubeletConfiguration"));
    }
}
