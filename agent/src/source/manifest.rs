//! Manifest directory model: parses multi-document YAML/JSON into Pods, ConfigMaps, Secrets and
//! Services, applies static-pod defaults, validates, and diffs snapshots into events (pure).

use crate::model::quantity;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolume, PersistentVolumeClaim, Pod, Probe, Secret, Service,
    Toleration,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use thiserror::Error;

/// Annotation holding the static pod's content hash (the kubelet's `kubernetes.io/config.hash`).
pub const CONFIG_HASH_ANNOTATION: &str = "kubernetes.io/config.hash";
/// Annotation naming the pod source (`file`).
pub const CONFIG_SOURCE_ANNOTATION: &str = "kubernetes.io/config.source";
/// Annotation naming the manifest file a pod came from.
pub const CONFIG_FILE_ANNOTATION: &str = "hako.dev/config.file";
/// Seconds of a container's `sleep` lifecycle handler (`hook`: `postStart` or `preStop`), from
/// the pod's spec (init containers, then containers); None when the hook has no `sleep`.
pub fn lifecycle_sleep(pod: &Pod, container: &str, hook: &str) -> Option<u64> {
    let spec = pod.spec.as_ref()?;
    let c = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == container)?;
    let l = c.lifecycle.as_ref()?;
    let h = match hook {
        "postStart" => l.post_start.as_ref()?,
        "preStop" => l.pre_stop.as_ref()?,
        _ => return None,
    };
    u64::try_from(h.sleep.as_ref()?.seconds).ok()
}

/// Checks the lifecycle `sleep` handlers of a raw pod document as the apiserver validates
/// them: `seconds` a non-negative integer not above `terminationGracePeriodSeconds`, and
/// `sleep` the only handler of its hook.
fn check_lifecycle_sleep(value: &Value, problems: &mut Vec<String>) {
    let grace = value
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30);
    for field in ["initContainers", "containers"] {
        let Some(list) = value
            .pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for (i, c) in list.iter().enumerate() {
            for hook in ["postStart", "preStop"] {
                let Some(h) = c.pointer(&format!("/lifecycle/{hook}")) else {
                    continue;
                };
                let Some(sleep) = h.get("sleep") else {
                    continue;
                };
                let f = format!("spec.{field}[{i}].lifecycle.{hook}");
                let others = ["exec", "httpGet", "tcpSocket"]
                    .iter()
                    .filter(|k| h.get(**k).is_some())
                    .count();
                if others > 0 {
                    problems.push(format!(
                        "{f}: Forbidden: may not specify more than 1 handler type"
                    ));
                    continue;
                }
                match sleep.get("seconds").and_then(Value::as_i64) {
                    Some(n) if (0..=grace).contains(&n) => {}
                    _ => problems.push(format!(
                        "{f}.sleep.seconds: Invalid value {}: must be greater than or equal to 0 and less than or equal to terminationGracePeriodSeconds ({grace})",
                        sleep.get("seconds").map(Value::to_string).unwrap_or_else(|| "null".into())
                    )),
                }
            }
        }
    }
}

/// YAML 1.1 octal literals in file modes: `defaultMode: 0644` is 420 for kubectl (YAML 1.1),
/// but a YAML 1.2 parser reads the plain scalar `0644` as the string "0644". Every `mode` and
/// `defaultMode` under `spec.volumes` holding such a string of octal digits with a leading 0
/// becomes its number; a leading-0 string with other digits is reported.
fn octal_modes(value: &mut Value, problems: &mut Vec<String>) {
    fn walk(v: &mut Value, path: &str, problems: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    let p = format!("{path}.{k}");
                    if k == "mode" || k == "defaultMode" {
                        if let Value::String(t) = x {
                            let digits = t.strip_prefix('+').unwrap_or(t);
                            if digits.len() > 1
                                && digits.starts_with('0')
                                && digits.bytes().all(|b| b.is_ascii_digit())
                            {
                                match i64::from_str_radix(digits, 8) {
                                    Ok(n) => *x = Value::from(n),
                                    Err(_) => problems.push(format!(
                                        "{p}: Invalid value {t:?}: not an octal number"
                                    )),
                                }
                            }
                        }
                    } else {
                        walk(x, &p, problems);
                    }
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter_mut().enumerate() {
                    walk(x, &format!("{path}[{i}]"), problems);
                }
            }
            _ => {}
        }
    }
    if let Some(vols) = value.pointer_mut("/spec/volumes") {
        walk(vols, "spec.volumes", problems);
    }
}

/// Decodes a raw pod document after the fix-ups the typed Pod cannot express (YAML 1.1 octal
/// modes), with the `sleep` handlers checked.
fn decode_pod(mut value: Value) -> Result<Pod, ManifestErrorKind> {
    let mut problems = Vec::new();
    octal_modes(&mut value, &mut problems);
    check_lifecycle_sleep(&value, &mut problems);
    if !problems.is_empty() {
        return Err(ManifestErrorKind::Invalid(problems));
    }
    serde_json::from_value::<Pod>(value).map_err(|e| ManifestErrorKind::Decode(e.to_string()))
}

/// Options for static pods from a manifest directory.
#[derive(Debug, Clone)]
pub struct StaticPodOptions {
    /// The node name: set as `spec.nodeName`, appended to pod names like the kubelet does.
    pub node_name: String,
    /// Append `-<node_name>` to pod names (kubelet behaviour for static pods).
    pub suffix_node_name: bool,
}

impl Default for StaticPodOptions {
    fn default() -> Self {
        Self {
            node_name: "localhost".into(),
            suffix_node_name: true,
        }
    }
}

/// What went wrong with one document.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestErrorKind {
    /// The document is not valid YAML/JSON.
    #[error("parse error: {0}")]
    Syntax(String),
    /// No `kind` or `apiVersion`.
    #[error("missing apiVersion or kind")]
    MissingKind,
    /// A kind the manifest source does not handle.
    #[error("unsupported object {0} (supported: v1 Pod, ConfigMap, Secret, Service, PersistentVolume, PersistentVolumeClaim, List)")]
    UnsupportedKind(String),
    /// The object does not decode into its Kubernetes type.
    #[error("decode error: {0}")]
    Decode(String),
    /// The object decoded but breaks validation rules.
    #[error("invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Another file already defines this object.
    #[error("duplicate: already defined in {0}")]
    Duplicate(String),
}

/// An error for one document of one file; the document is skipped, the rest still load.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{file}: document {doc}{}: {kind}", object_label(.object))]
pub struct ManifestError {
    /// The manifest file.
    pub file: String,
    /// 1-based document index inside the file.
    pub doc: usize,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    /// What is wrong.
    pub kind: ManifestErrorKind,
}

fn object_label(o: &Option<String>) -> String {
    o.as_ref().map(|o| format!(" ({o})")).unwrap_or_default()
}

/// A pod together with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedPod {
    /// The defaulted pod.
    pub pod: Pod,
    /// The manifest file.
    pub file: String,
}

impl SourcedPod {
    /// The pod's UID (always set after defaulting).
    pub fn uid(&self) -> &str {
        self.pod.metadata.uid.as_deref().unwrap_or("")
    }
}

/// `namespace/name` key.
pub type ObjKey = (String, String);

/// Everything loaded from a manifest directory at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Pods by namespace/name.
    pub pods: BTreeMap<ObjKey, SourcedPod>,
    /// ConfigMaps by namespace/name.
    pub config_maps: BTreeMap<ObjKey, ConfigMap>,
    /// Secrets by namespace/name.
    pub secrets: BTreeMap<ObjKey, Secret>,
    /// Services by namespace/name.
    pub services: BTreeMap<ObjKey, Service>,
    /// PersistentVolumeClaims by namespace/name: what the pods' `persistentVolumeClaim`
    /// volumes resolve against (bound by `spec.volumeName`).
    pub claims: BTreeMap<ObjKey, PersistentVolumeClaim>,
    /// PersistentVolumes by name (cluster-scoped).
    pub persistent_volumes: BTreeMap<String, PersistentVolume>,
}

/// The result of loading files: what loaded, and what was reported and skipped.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The objects that loaded.
    pub snapshot: Snapshot,
    /// One entry per skipped document.
    pub errors: Vec<ManifestError>,
}

/// Splits a multi-document YAML stream at `---` lines.
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            docs.push(String::new());
        } else if line.trim_end() == "..." {
            continue;
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

/// Loads a set of `(file name, contents)` pairs, in the given order.
pub fn load(files: &[(String, String)], opts: &StaticPodOptions) -> Loaded {
    let mut out = Loaded::default();
    for (file, text) in files {
        load_file(file, text, opts, &mut out);
    }
    out
}

fn load_file(file: &str, text: &str, opts: &StaticPodOptions, out: &mut Loaded) {
    for (i, doc) in split_documents(text).iter().enumerate() {
        let err = |object: Option<String>, kind| ManifestError {
            file: file.to_string(),
            doc: i + 1,
            object,
            kind,
        };
        if doc.trim().is_empty()
            || doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let value: Value = match serde_yaml::from_str(doc) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.errors
                    .push(err(None, ManifestErrorKind::Syntax(e.to_string())));
                continue;
            }
        };
        load_value(file, i + 1, value, opts, out);
    }
}

fn load_value(file: &str, doc: usize, value: Value, opts: &StaticPodOptions, out: &mut Loaded) {
    let err = |object: Option<String>, kind| ManifestError {
        file: file.to_string(),
        doc,
        object,
        kind,
    };
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let ns = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    if kind.is_empty() || api.is_empty() {
        out.errors.push(err(None, ManifestErrorKind::MissingKind));
        return;
    }
    let label = Some(format!("{kind} {ns}/{name}"));
    if api != "v1" {
        out.errors.push(err(
            label,
            ManifestErrorKind::UnsupportedKind(format!("{api} {kind}")),
        ));
        return;
    }
    match kind.as_str() {
        "List" => {
            let items = value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                load_value(file, doc, item, opts, out);
            }
        }
        "Pod" => match decode_pod(value) {
            Err(kind) => out.errors.push(err(label, kind)),
            Ok(pod) => {
                let problems = validate_pod(&pod);
                if !problems.is_empty() {
                    out.errors
                        .push(err(label, ManifestErrorKind::Invalid(problems)));
                    return;
                }
                let pod = apply_static_defaults(pod, file, opts);
                let key = key_of(&pod.metadata);
                let label = Some(format!("Pod {}/{}", key.0, key.1));
                if let Some(first) = out.snapshot.pods.get(&key) {
                    out.errors
                        .push(err(label, ManifestErrorKind::Duplicate(first.file.clone())));
                    return;
                }
                out.snapshot.pods.insert(
                    key,
                    SourcedPod {
                        pod,
                        file: file.to_string(),
                    },
                );
            }
        },
        "ConfigMap" => insert_obj::<ConfigMap>(
            value,
            label,
            &err,
            &mut out.snapshot.config_maps,
            &mut out.errors,
        ),
        "Secret" => insert_obj::<Secret>(
            value,
            label,
            &err,
            &mut out.snapshot.secrets,
            &mut out.errors,
        ),
        "Service" => insert_obj::<Service>(
            value,
            label,
            &err,
            &mut out.snapshot.services,
            &mut out.errors,
        ),
        "PersistentVolumeClaim" => insert_obj::<PersistentVolumeClaim>(
            value,
            label,
            &err,
            &mut out.snapshot.claims,
            &mut out.errors,
        ),
        "PersistentVolume" => {
            let label = Some(format!("PersistentVolume {name}"));
            match serde_json::from_value::<PersistentVolume>(value) {
                Err(e) => out
                    .errors
                    .push(err(label, ManifestErrorKind::Decode(e.to_string()))),
                Ok(mut pv) => {
                    pv.metadata.namespace = None;
                    let mut problems = Vec::new();
                    check_name(&name, "metadata.name", &mut problems);
                    if !problems.is_empty() {
                        out.errors
                            .push(err(label, ManifestErrorKind::Invalid(problems)));
                    } else if out.snapshot.persistent_volumes.contains_key(&name) {
                        out.errors.push(err(
                            label,
                            ManifestErrorKind::Duplicate("an earlier document".into()),
                        ));
                    } else {
                        out.snapshot.persistent_volumes.insert(name.clone(), pv);
                    }
                }
            }
        }
        _ => out.errors.push(err(
            label,
            ManifestErrorKind::UnsupportedKind(format!("{api} {kind}")),
        )),
    }
}

trait HasMeta {
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}
impl HasMeta for ConfigMap {
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}
impl HasMeta for Secret {
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}
impl HasMeta for PersistentVolumeClaim {
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}
impl HasMeta for Service {
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

fn insert_obj<T: serde::de::DeserializeOwned + HasMeta>(
    value: Value,
    label: Option<String>,
    err: &dyn Fn(Option<String>, ManifestErrorKind) -> ManifestError,
    map: &mut BTreeMap<ObjKey, T>,
    errors: &mut Vec<ManifestError>,
) {
    match serde_json::from_value::<T>(value) {
        Err(e) => errors.push(err(label, ManifestErrorKind::Decode(e.to_string()))),
        Ok(mut obj) => {
            let meta = obj.meta_mut();
            if meta.namespace.as_deref().unwrap_or("").is_empty() {
                meta.namespace = Some("default".into());
            }
            let mut problems = Vec::new();
            check_name(
                meta.name.as_deref().unwrap_or(""),
                "metadata.name",
                &mut problems,
            );
            if !problems.is_empty() {
                errors.push(err(label, ManifestErrorKind::Invalid(problems)));
                return;
            }
            let key = key_of(meta);
            if map.contains_key(&key) {
                errors.push(err(
                    label,
                    ManifestErrorKind::Duplicate("an earlier document".into()),
                ));
                return;
            }
            map.insert(key, obj);
        }
    }
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_name(name: &str, field: &str, problems: &mut Vec<String>) {
    if name.is_empty() {
        problems.push(format!("{field}: Required value"));
    } else if name.len() > 253 || !name.split('.').all(is_dns_label) {
        problems.push(format!(
            "{field}: Invalid value {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        ));
    }
}

/// Validates a pod as decoded from a manifest; returns one message per problem.
pub fn validate_pod(pod: &Pod) -> Vec<String> {
    let mut p = Vec::new();
    check_name(
        pod.metadata.name.as_deref().unwrap_or(""),
        "metadata.name",
        &mut p,
    );
    if let Some(ns) = pod.metadata.namespace.as_deref() {
        if !ns.is_empty() && !is_dns_label(ns) {
            p.push(format!(
                "metadata.namespace: Invalid value {ns:?}: must be a DNS label"
            ));
        }
    }
    let Some(spec) = &pod.spec else {
        p.push("spec: Required value".into());
        return p;
    };
    if spec.containers.is_empty() {
        p.push("spec.containers: Required value".into());
    }
    if let Some(rp) = spec.restart_policy.as_deref() {
        if !["Always", "OnFailure", "Never"].contains(&rp) {
            p.push(format!("spec.restartPolicy: Unsupported value {rp:?}: supported values: \"Always\", \"OnFailure\", \"Never\""));
        }
    }
    if let Some(dp) = spec.dns_policy.as_deref() {
        if !["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"].contains(&dp) {
            p.push(format!("spec.dnsPolicy: Unsupported value {dp:?}"));
        }
        if dp == "None"
            && spec
                .dns_config
                .as_ref()
                .and_then(|c| c.nameservers.as_ref())
                .is_none_or(|n| n.is_empty())
        {
            p.push("spec.dnsConfig.nameservers: Required value: must provide at least one DNS nameserver when dnsPolicy is None".into());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    let groups: [(&str, &[Container]); 2] = [
        (
            "spec.initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("spec.containers", &spec.containers),
    ];
    for (field, list) in groups {
        for (i, c) in list.iter().enumerate() {
            let f = format!("{field}[{i}]");
            if !is_dns_label(&c.name) {
                p.push(format!(
                    "{f}.name: Invalid value {:?}: must be a DNS label",
                    c.name
                ));
            } else if !seen.insert(c.name.clone()) {
                p.push(format!("{f}.name: Duplicate value {:?}", c.name));
            }
            if c.image.as_deref().unwrap_or("").is_empty() {
                p.push(format!("{f}.image: Required value"));
            }
            match (field, c.restart_policy.as_deref()) {
                (_, None) => {}
                ("spec.initContainers", Some("Always")) => {}
                (_, Some(rp)) => p.push(format!("{f}.restartPolicy: Unsupported value {rp:?}")),
            }
            if let Some(r) = &c.resources {
                for (kind, m) in [("limits", &r.limits), ("requests", &r.requests)] {
                    for (k, q) in m.iter().flatten() {
                        match quantity::parse(&q.0) {
                            Err(_) => p.push(format!(
                                "{f}.resources.{kind}[{k}]: Invalid value {:?}",
                                q.0
                            )),
                            Ok(v) if v.0 < 0 => {
                                p.push(format!("{f}.resources.{kind}[{k}]: must be non-negative"))
                            }
                            Ok(_) => {}
                        }
                    }
                }
                let lim = crate::model::qos::limits(c);
                for (k, q) in r.requests.iter().flatten() {
                    if let (Ok(req), Some(l)) = (quantity::parse(&q.0), lim.get(k)) {
                        if req > *l {
                            p.push(format!("{f}.resources.requests[{k}]: must be less than or equal to {k} limit"));
                        }
                    }
                }
            }
            for (pname, probe) in [
                ("livenessProbe", &c.liveness_probe),
                ("startupProbe", &c.startup_probe),
                ("readinessProbe", &c.readiness_probe),
            ] {
                let Some(pr) = probe else { continue };
                check_probe(
                    &format!("{f}.{pname}"),
                    pr,
                    pname != "readinessProbe",
                    &mut p,
                );
            }
            for (j, e) in c.env.iter().flatten().enumerate() {
                if e.name.is_empty() {
                    p.push(format!("{f}.env[{j}].name: Required value"));
                }
            }
        }
    }
    p
}

fn check_probe(f: &str, pr: &Probe, success_must_be_one: bool, p: &mut Vec<String>) {
    let handlers = [
        pr.exec.is_some(),
        pr.http_get.is_some(),
        pr.tcp_socket.is_some(),
        pr.grpc.is_some(),
    ];
    match handlers.iter().filter(|h| **h).count() {
        0 => p.push(format!("{f}: Required value: must specify a handler type")),
        1 => {}
        _ => p.push(format!(
            "{f}: Forbidden: may not specify more than 1 handler type"
        )),
    }
    if success_must_be_one && pr.success_threshold.is_some_and(|s| s != 1) {
        p.push(format!("{f}.successThreshold: Invalid value: must be 1"));
    }
    for (name, v) in [
        ("initialDelaySeconds", pr.initial_delay_seconds),
        ("periodSeconds", pr.period_seconds),
        ("timeoutSeconds", pr.timeout_seconds),
        ("successThreshold", pr.success_threshold),
        ("failureThreshold", pr.failure_threshold),
    ] {
        if v.is_some_and(|v| v < 0 || (v == 0 && name != "initialDelaySeconds")) {
            p.push(format!(
                "{f}.{name}: Invalid value {}: must be greater than {}",
                v.unwrap_or(0),
                i32::from(name != "initialDelaySeconds") - 1
            ));
        }
    }
}

/// Pull policy default: Always for `:latest` or untagged images, else IfNotPresent.
pub fn default_pull_policy(image: &str) -> &'static str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_container(c: &mut Container) {
    if c.image_pull_policy.is_none() {
        c.image_pull_policy = Some(default_pull_policy(c.image.as_deref().unwrap_or("")).into());
    }
    c.termination_message_path
        .get_or_insert_with(|| "/dev/termination-log".into());
    c.termination_message_policy
        .get_or_insert_with(|| "File".into());
    for port in c.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".into());
    }
    if let Some(r) = &mut c.resources {
        if let Some(lim) = &r.limits {
            let req = r.requests.get_or_insert_with(BTreeMap::new);
            for (k, v) in lim {
                req.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    for probe in [
        &mut c.liveness_probe,
        &mut c.readiness_probe,
        &mut c.startup_probe,
    ]
    .into_iter()
    .flatten()
    {
        probe.period_seconds.get_or_insert(10);
        probe.timeout_seconds.get_or_insert(1);
        probe.success_threshold.get_or_insert(1);
        probe.failure_threshold.get_or_insert(3);
        if let Some(h) = &mut probe.http_get {
            h.path.get_or_insert_with(|| "/".into());
            h.scheme.get_or_insert_with(|| "HTTP".into());
        }
    }
}

/// Applies API-server defaults and the kubelet's static-pod defaults: namespace `default`, name
/// suffixed with the node name, `spec.nodeName`, a UID derived from the content and the source
/// path (sha256, first 16 bytes in hex), the config hash/source annotations, the NoExecute
/// toleration and phase Pending.
pub fn apply_static_defaults(mut pod: Pod, file: &str, opts: &StaticPodOptions) -> Pod {
    if pod.metadata.uid.as_deref().unwrap_or("").is_empty() {
        // Ephemeral containers added to a manifest update the pod, they do not make a new one
        // (as the ephemeralcontainers subresource leaves a pod's UID alone).
        let mut hashed = pod.clone();
        if let Some(s) = &mut hashed.spec {
            s.ephemeral_containers = None;
        }
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&hashed).unwrap_or_default());
        h.update(format!("host:{}", opts.node_name));
        h.update(format!("file:{file}"));
        pod.metadata.uid = Some(hex::encode(&h.finalize()[..16]));
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if opts.suffix_node_name {
        pod.metadata.name = pod.metadata.name.map(|n| format!("{n}-{}", opts.node_name));
    }
    if pod.metadata.namespace.as_deref().unwrap_or("").is_empty() {
        pod.metadata.namespace = Some("default".into());
    }
    let ann = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(CONFIG_HASH_ANNOTATION.into(), uid);
    ann.insert(CONFIG_SOURCE_ANNOTATION.into(), "file".into());
    ann.insert(CONFIG_FILE_ANNOTATION.into(), file.into());
    if let Some(spec) = &mut pod.spec {
        spec.node_name = Some(opts.node_name.clone());
        spec.restart_policy.get_or_insert_with(|| "Always".into());
        spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
        spec.termination_grace_period_seconds.get_or_insert(30);
        spec.enable_service_links.get_or_insert(true);
        spec.scheduler_name
            .get_or_insert_with(|| "default-scheduler".into());
        for c in spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut())
        {
            default_container(c);
        }
        let tol = Toleration {
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        };
        let tols = spec.tolerations.get_or_insert_with(Vec::new);
        if !tols.contains(&tol) {
            tols.push(tol);
        }
    }
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase = Some("Pending".into());
    pod
}

/// A change between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A new pod.
    PodAdded(Box<SourcedPod>),
    /// The pod's manifest changed (new UID): the old pod is stopped and the new one started.
    PodUpdated {
        /// The running pod.
        old: Box<SourcedPod>,
        /// Its replacement.
        new: Box<SourcedPod>,
    },
    /// The pod was removed: terminate it gracefully.
    PodDeleted(Box<SourcedPod>),
    /// A ConfigMap was added, changed or removed.
    ConfigMapChanged(ObjKey),
    /// A Secret was added, changed or removed.
    SecretChanged(ObjKey),
    /// A Service was added, changed or removed.
    ServiceChanged(ObjKey),
}

fn changed_keys<T: PartialEq>(old: &BTreeMap<ObjKey, T>, new: &BTreeMap<ObjKey, T>) -> Vec<ObjKey> {
    let mut keys: Vec<ObjKey> = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend(new.keys().filter(|k| !old.contains_key(*k)).cloned());
    keys.sort();
    keys
}

/// Diffs two snapshots into events: deletions first, then updates, then additions, each sorted by key.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<SourceEvent> {
    let mut ev = Vec::new();
    for (k, p) in &old.pods {
        if !new.pods.contains_key(k) {
            ev.push(SourceEvent::PodDeleted(Box::new(p.clone())));
        }
    }
    for (k, p) in &new.pods {
        match old.pods.get(k) {
            Some(o) if o.uid() != p.uid() || o != p => ev.push(SourceEvent::PodUpdated {
                old: Box::new(o.clone()),
                new: Box::new(p.clone()),
            }),
            _ => {}
        }
    }
    for (k, p) in &new.pods {
        if !old.pods.contains_key(k) {
            ev.push(SourceEvent::PodAdded(Box::new(p.clone())));
        }
    }
    ev.extend(
        changed_keys(&old.config_maps, &new.config_maps)
            .into_iter()
            .map(SourceEvent::ConfigMapChanged),
    );
    ev.extend(
        changed_keys(&old.secrets, &new.secrets)
            .into_iter()
            .map(SourceEvent::SecretChanged),
    );
    ev.extend(
        changed_keys(&old.services, &new.services)
            .into_iter()
            .map(SourceEvent::ServiceChanged),
    );
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    const WEB: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  containers:\n  - name: web\n    image: busybox:1.36\n    resources:\n      limits: {cpu: 100m, memory: 64Mi}\n";

    /// PersistentVolumes (cluster-scoped, by name) and PersistentVolumeClaims load, and a
    /// pod's claim resolves against them (bound by spec.volumeName, standalone rules).
    #[test]
    fn loads_persistent_volumes_and_claims() {
        use crate::sys::volumes::{pvc, ObjectSource};
        let text = "apiVersion: v1\nkind: PersistentVolume\nmetadata: {name: disk1, namespace: ignored}\nspec: {local: {path: /mnt/disk1}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec: {volumeName: disk1}\n---\napiVersion: v1\nkind: PersistentVolume\nmetadata: {name: disk1}\nspec: {local: {path: /other}}\n";
        let l = load(
            &files(&[("/m/pv.yaml", text)]),
            &StaticPodOptions::default(),
        );
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert!(
            l.errors[0].to_string().contains("PersistentVolume disk1"),
            "{}",
            l.errors[0]
        );
        let s = &l.snapshot;
        assert_eq!(s.persistent_volumes["disk1"].metadata.namespace, None);
        assert!(s.binds_by_volume_name());
        let src = k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource {
            claim_name: "data".into(),
            read_only: None,
        };
        let pv = pvc::resolve_claim("default", &src, s).unwrap();
        assert_eq!(
            pv.spec.unwrap().local.unwrap().path,
            "/mnt/disk1",
            "the first document wins"
        );
    }

    #[test]
    fn loads_multi_document_and_defaults() {
        let text = format!(
            "{WEB}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{a: b}}\n---\n# comment only\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: prod}}\nstringData: {{k: v}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  selector: {{app: web}}\n  ports: [{{port: 80}}]\n"
        );
        let l = load(
            &files(&[("/m/web.yaml", &text)]),
            &StaticPodOptions::default(),
        );
        assert_eq!(l.errors, vec![]);
        let s = &l.snapshot;
        let p = &s.pods[&("default".to_string(), "web-localhost".to_string())];
        let spec = p.pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("localhost"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            spec.containers[0].image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
        let req = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(req["memory"].0, "64Mi");
        assert_eq!(p.uid().len(), 32);
        assert_eq!(
            p.pod.metadata.annotations.as_ref().unwrap()[CONFIG_HASH_ANNOTATION],
            p.uid()
        );
        assert!(s
            .config_maps
            .contains_key(&("default".into(), "cfg".into())));
        assert!(s.secrets.contains_key(&("prod".into(), "s".into())));
        assert!(s.services.contains_key(&("default".into(), "web".into())));
    }

    #[test]
    fn uid_is_deterministic_and_content_dependent() {
        let opts = StaticPodOptions::default();
        let a = load(&files(&[("/m/a.yaml", WEB)]), &opts);
        let b = load(&files(&[("/m/a.yaml", WEB)]), &opts);
        let c = load(&files(&[("/m/b.yaml", WEB)]), &opts);
        let d = load(
            &files(&[("/m/a.yaml", &WEB.replace("1.36", "1.37"))]),
            &opts,
        );
        let uid = |l: &Loaded| l.snapshot.pods.values().next().unwrap().uid().to_string();
        assert_eq!(uid(&a), uid(&b));
        assert_ne!(uid(&a), uid(&c));
        assert_ne!(uid(&a), uid(&d));
        // Adding an ephemeral container updates the same pod.
        let e = load(
            &files(&[(
                "/m/a.yaml",
                &format!(
                    "{WEB}  ephemeralContainers:\n  - name: debugger\n    image: busybox:1.36\n"
                ),
            )]),
            &opts,
        );
        assert_eq!(e.errors, vec![]);
        assert_eq!(uid(&a), uid(&e));
        let pod = &e.snapshot.pods.values().next().unwrap().pod;
        assert_eq!(
            pod.spec
                .as_ref()
                .unwrap()
                .ephemeral_containers
                .as_ref()
                .map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn json_and_list() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j"},"spec":{"containers":[{"name":"c","image":"busybox"}]}}]}"#;
        let l = load(&files(&[("/m/j.json", json)]), &StaticPodOptions::default());
        assert_eq!(l.errors, vec![]);
        let p = l.snapshot.pods.values().next().unwrap();
        assert_eq!(
            p.pod.spec.as_ref().unwrap().containers[0]
                .image_pull_policy
                .as_deref(),
            Some("Always")
        );
    }

    #[test]
    fn errors_name_file_and_object_and_skip_only_that_document() {
        let table: Vec<(&str, &str)> = vec![
            ("key: [unclosed", "/m/x.yaml: document 1: parse error"),
            ("apiVersion: v1\nmetadata: {name: a}\n", "/m/x.yaml: document 1: missing apiVersion or kind"),
            ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n", "/m/x.yaml: document 1 (Deployment default/d): unsupported object apps/v1 Deployment"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: c, image: i}]}\n", "/m/x.yaml: document 1 (Pod default/Bad_Name): invalid: metadata.name: Invalid value"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n", "/m/x.yaml: document 1 (Pod default/p): invalid: spec.containers: Required value"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n", "invalid: spec.containers[0].image: Required value"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}, {name: c, image: i}]}\n", "spec.containers[1].name: Duplicate value \"c\""),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {restartPolicy: Sometimes, containers: [{name: c, image: i}]}\n", "spec.restartPolicy: Unsupported value \"Sometimes\""),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, resources: {limits: {memory: lots}}}]}\n", "spec.containers[0].resources.limits[memory]: Invalid value \"lots\""),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, livenessProbe: {successThreshold: 2, exec: {command: [x]}}}]}\n", "livenessProbe.successThreshold: Invalid value: must be 1"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, restartPolicy: Always}]}\n", "spec.containers[0].restartPolicy: Unsupported value"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 5}\n", "(Pod default/p): decode error"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {dnsPolicy: None, containers: [{name: c, image: i}]}\n", "dnsConfig.nameservers: Required value"),
        ];
        for (bad, want) in table {
            let text = format!("{bad}\n---\n{WEB}");
            let l = load(
                &files(&[("/m/x.yaml", &text)]),
                &StaticPodOptions::default(),
            );
            assert_eq!(l.errors.len(), 1, "{bad}: {:?}", l.errors);
            let msg = l.errors[0].to_string();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
            assert_eq!(l.snapshot.pods.len(), 1, "{bad}: the good pod still loads");
        }
    }

    #[test]
    fn duplicate_pod_across_files() {
        let l = load(
            &files(&[("/m/a.yaml", WEB), ("/m/b.yaml", WEB)]),
            &StaticPodOptions::default(),
        );
        assert_eq!(l.snapshot.pods.len(), 1);
        assert_eq!(l.errors[0].to_string(), "/m/b.yaml: document 1 (Pod default/web-localhost): duplicate: already defined in /m/a.yaml");
    }

    #[test]
    fn pull_policy_table() {
        for (img, want) in [
            ("busybox", "Always"),
            ("busybox:latest", "Always"),
            ("busybox:1.36", "IfNotPresent"),
            ("localhost:5000/busybox", "Always"),
            ("localhost:5000/busybox:v1", "IfNotPresent"),
            ("busybox@sha256:abc", "IfNotPresent"),
        ] {
            assert_eq!(default_pull_policy(img), want, "{img}");
        }
    }

    #[test]
    fn diff_table() {
        let opts = StaticPodOptions::default();
        let web2 = WEB.replace("name: web\n  labels", "name: web2\n  labels");
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: b}\n";
        let snap = |fs: &[(&str, &str)]| load(&files(fs), &opts).snapshot;
        let s0 = snap(&[]);
        let s1 = snap(&[("/m/a.yaml", WEB), ("/m/c.yaml", cm)]);
        let s2 = snap(&[
            ("/m/a.yaml", &WEB.replace("1.36", "1.37")),
            ("/m/c.yaml", cm),
        ]);
        let s3 = snap(&[
            ("/m/b.yaml", &web2),
            ("/m/c.yaml", &cm.replace("a: b", "a: c")),
        ]);
        let kinds = |e: Vec<SourceEvent>| -> Vec<String> {
            e.iter()
                .map(|e| match e {
                    SourceEvent::PodAdded(p) => {
                        format!("add {}", p.pod.metadata.name.clone().unwrap_or_default())
                    }
                    SourceEvent::PodUpdated { new, .. } => format!(
                        "update {}",
                        new.pod.metadata.name.clone().unwrap_or_default()
                    ),
                    SourceEvent::PodDeleted(p) => {
                        format!("delete {}", p.pod.metadata.name.clone().unwrap_or_default())
                    }
                    SourceEvent::ConfigMapChanged(k) => format!("cm {}", k.1),
                    SourceEvent::SecretChanged(k) => format!("secret {}", k.1),
                    SourceEvent::ServiceChanged(k) => format!("svc {}", k.1),
                })
                .collect()
        };
        let table: Vec<(&Snapshot, &Snapshot, Vec<&str>)> = vec![
            (&s0, &s1, vec!["add web-localhost", "cm cfg"]),
            (&s1, &s1, vec![]),
            (&s1, &s2, vec!["update web-localhost"]),
            (
                &s2,
                &s3,
                vec!["delete web-localhost", "add web2-localhost", "cm cfg"],
            ),
            (&s3, &s0, vec!["delete web2-localhost", "cm cfg"]),
        ];
        for (i, (a, b, want)) in table.into_iter().enumerate() {
            assert_eq!(kinds(diff(a, b)), want, "case {i}");
        }
    }
}
