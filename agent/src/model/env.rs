//! Container environment resolution: value, envFrom (prefix), configMapKeyRef, secretKeyRef,
//! fieldRef (Downward API), resourceFieldRef (divisor), `$(VAR)` expansion exactly as
//! Kubernetes' expansion package does, and the service-link variables of the kubelet's
//! `getServiceEnvVarMap` + `envvars.FromServices` (pure).

use crate::model::quantity;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use std::collections::BTreeMap;
use std::sync::Arc;
use thiserror::Error;

/// A failure that makes the kubelet report CreateContainerConfigError; the Display text is the
/// kubelet's message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvError {
    /// The ConfigMap does not exist.
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    /// The Secret does not exist.
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    /// The key is not in the ConfigMap.
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKey {
        /// Key.
        key: String,
        /// Namespace.
        namespace: String,
        /// ConfigMap name.
        name: String,
    },
    /// The key is not in the Secret.
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKey {
        /// Key.
        key: String,
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// Unsupported fieldRef path.
    #[error("unsupported fieldPath: {0}")]
    FieldPath(String),
    /// Unsupported resourceFieldRef resource.
    #[error("unsupported container resource : {0}")]
    Resource(String),
    /// resourceFieldRef names a container that does not exist.
    #[error("container {0} not found")]
    Container(String),
    /// The Service source has not listed yet (the kubelet waits for its service informer
    /// before it builds the environment of a pod from the apiserver).
    #[error("services have not yet been read at least once, cannot construct envvars")]
    ServicesNotListed,
}

impl EnvError {
    /// The container waiting reason for this error.
    pub const REASON: &'static str = "CreateContainerConfigError";
}

/// What env resolution may read besides the pod.
#[derive(Debug, Clone, Default)]
pub struct EnvContext<'a> {
    /// ConfigMaps of the pod's namespace by name.
    pub config_maps: BTreeMap<String, &'a ConfigMap>,
    /// Secrets of the pod's namespace by name.
    pub secrets: BTreeMap<String, &'a Secret>,
    /// Pod IPs (first is status.podIP).
    pub pod_ips: Vec<String>,
    /// Host IPs (first is status.hostIP).
    pub host_ips: Vec<String>,
    /// Node allocatable, used for limits that are not set (kubelet defaultPodLimitsForDownwardAPI).
    pub node_allocatable: BTreeMap<String, String>,
    /// The Services for the service-link variables (None: no Service source).
    pub services: Option<&'a ServiceFeed>,
}

/// What the node knows of Services (the kubelet's service lister).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ServiceFeed {
    /// No Service source (a node without an apiserver): no service variables, as a kubelet
    /// without a service lister.
    #[default]
    Absent,
    /// A Service source that has not completed its first list: pods from the apiserver wait
    /// ([`EnvError::ServicesNotListed`]); static pods go on without service variables.
    NotListed,
    /// Every Service the source has that yields variables (all namespaces), shared between
    /// the Service feed and the workers.
    Listed(Arc<ServiceLinks>),
}

/// One port of a [`ServiceLink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPort {
    /// Port name ("" when unnamed).
    pub name: String,
    /// Service port.
    pub port: i32,
    /// Protocol as the Service spells it ("" means TCP).
    pub protocol: String,
}

/// What the service-link variables read of one Service: its ClusterIP and ports. The node
/// watches every Service of the cluster, so the feed keeps this instead of the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLink {
    /// The ClusterIP.
    pub cluster_ip: String,
    /// The ports, in the Service's order (at least one).
    pub ports: Vec<LinkPort>,
}

impl ServiceLink {
    /// The link of `s`; None for a Service that yields no variables (headless,
    /// ExternalName, no ClusterIP or no port).
    pub fn of(s: &Service) -> Option<Self> {
        let sp = s.spec.as_ref().filter(|_| has_cluster_ip(s))?;
        Some(Self {
            cluster_ip: sp.cluster_ip.clone().unwrap_or_default(),
            ports: sp
                .ports
                .iter()
                .flatten()
                .map(|p| LinkPort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port,
                    protocol: p.protocol.clone().unwrap_or_default(),
                })
                .collect(),
        })
    }
}

/// Service links by (namespace, name).
pub type ServiceLinks = BTreeMap<(String, String), ServiceLink>;

/// The links of `services` (those that yield variables), keyed by namespace and name.
pub fn service_links<'a>(services: impl IntoIterator<Item = &'a Service>) -> ServiceLinks {
    services
        .into_iter()
        .filter_map(|s| {
            let key = (
                s.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                s.metadata.name.clone().unwrap_or_default(),
            );
            ServiceLink::of(s).map(|l| (key, l))
        })
        .collect()
}

/// The annotation naming a pod's source (`api` for pods from the apiserver).
const CONFIG_SOURCE: &str = "kubernetes.io/config.source";

/// A static pod (from a manifest file or URL, not from the apiserver).
fn is_static(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONFIG_SOURCE))
        .is_some_and(|s| s != "api")
}

/// `makeEnvVariableName`: upper case, `-` becomes `_`.
fn env_name(s: &str) -> String {
    s.replace('-', "_").to_uppercase()
}

/// A Service with a ClusterIP (not headless, not ExternalName) and at least one port.
fn has_cluster_ip(s: &Service) -> bool {
    s.spec.as_ref().is_some_and(|sp| {
        !matches!(sp.cluster_ip.as_deref(), None | Some("") | Some("None"))
            && sp.ports.as_ref().is_some_and(|p| !p.is_empty())
    })
}

/// The service-link variables of one Service (`envvars.FromServices`): `{SVC}_SERVICE_HOST`,
/// `{SVC}_SERVICE_PORT` (first port), `{SVC}_SERVICE_PORT_{NAME}` per named port, and the
/// Docker link variables `{SVC}_PORT` (first port) and `{SVC}_PORT_{port}_{PROTO}[_PROTO|_PORT|_ADDR]`.
pub fn service_vars(name: &str, s: &ServiceLink) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let ip = s.cluster_ip.clone();
    let ports = &s.ports;
    let Some(first) = ports.first() else {
        return out;
    };
    let prefix = env_name(name);
    out.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
    out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
    for p in ports {
        if let Some(n) = Some(p.name.as_str()).filter(|n| !n.is_empty()) {
            out.push((
                format!("{prefix}_SERVICE_PORT_{}", env_name(n)),
                p.port.to_string(),
            ));
        }
    }
    // net.JoinHostPort: an IPv6 address in brackets.
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.clone()
    };
    for (i, p) in ports.iter().enumerate() {
        let proto = Some(p.protocol.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("TCP");
        let (lower, upper) = (proto.to_lowercase(), proto.to_uppercase());
        let url = format!("{lower}://{host}:{}", p.port);
        if i == 0 {
            out.push((format!("{prefix}_PORT"), url.clone()));
        }
        let pp = format!("{prefix}_PORT_{}_{upper}", p.port);
        out.push((pp.clone(), url));
        out.push((format!("{pp}_PROTO"), lower));
        out.push((format!("{pp}_PORT"), p.port.to_string()));
        out.push((format!("{pp}_ADDR"), ip.clone()));
    }
    out
}

/// The service-link variables of a pod in `ns` (the kubelet's `getServiceEnvVarMap`): the
/// `kubernetes` Service of `default` always, the other Services of `ns` when
/// `enableServiceLinks`; (Services without a ClusterIP have no link); a Service of `ns`
/// named `kubernetes` wins over the one of `default`. Sorted by name.
pub fn service_env(
    ns: &str,
    enable_links: bool,
    services: &ServiceLinks,
) -> BTreeMap<String, String> {
    let mut chosen: BTreeMap<&str, &ServiceLink> = BTreeMap::new();
    let master = ("default".to_string(), "kubernetes".to_string());
    if let Some(m) = services.get(&master) {
        chosen.insert("kubernetes", m);
    }
    if enable_links {
        let from = (ns.to_string(), String::new());
        for ((sns, name), s) in services.range(from..) {
            if sns != ns {
                break;
            }
            chosen.insert(name, s);
        }
    }
    chosen
        .into_iter()
        .flat_map(|(name, s)| service_vars(name, s))
        .collect()
}

/// Kubernetes `expansion.Expand`: `$(VAR)` is replaced when VAR is known, left as is otherwise;
/// `$$` is an escaped `$`; any other `$x` is kept.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let b = input.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < b.len() {
        if b[cursor] == b'$' && cursor + 1 < b.len() {
            out.extend_from_slice(&b[checkpoint..cursor]);
            let rest = &b[cursor + 1..];
            let advance = match rest[0] {
                b'$' => {
                    out.push(b'$');
                    1
                }
                b'(' => match rest.iter().position(|c| *c == b')') {
                    Some(end) => {
                        let name = String::from_utf8_lossy(&rest[1..end]).into_owned();
                        match lookup(&name) {
                            Some(v) => out.extend_from_slice(v.as_bytes()),
                            None => out.extend_from_slice(format!("$({name})").as_bytes()),
                        }
                        end + 1
                    }
                    None => {
                        out.extend_from_slice(b"$(");
                        1
                    }
                },
                c => {
                    out.push(b'$');
                    out.push(c);
                    1
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    out.extend_from_slice(&b[checkpoint.min(b.len())..]);
    String::from_utf8_lossy(&out).into_owned()
}

fn ordered_set(env: &mut Vec<(String, String)>, k: String, v: String) {
    match env.iter_mut().find(|(n, _)| *n == k) {
        Some(e) => e.1 = v,
        None => env.push((k, v)),
    }
}

fn secret_value(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| s.string_data.as_ref().and_then(|d| d.get(key).cloned()))
}

fn secret_pairs(s: &Secret) -> Vec<(String, String)> {
    let mut m: BTreeMap<String, String> = s.string_data.clone().unwrap_or_default();
    for (k, v) in s.data.iter().flatten() {
        m.insert(k.clone(), String::from_utf8_lossy(&v.0).into_owned());
    }
    m.into_iter().collect()
}

/// Downward API field value (kubelet `podFieldSelectorRuntimeValue`).
pub fn field_value(pod: &Pod, path: &str, ctx: &EnvContext) -> Result<String, EnvError> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let sub = |prefix: &str| -> Option<String> {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_string)
    };
    if let Some(k) = sub("metadata.labels['") {
        return Ok(m
            .labels
            .as_ref()
            .and_then(|l| l.get(&k).cloned())
            .unwrap_or_default());
    }
    if let Some(k) = sub("metadata.annotations['") {
        return Ok(m
            .annotations
            .as_ref()
            .and_then(|l| l.get(&k).cloned())
            .unwrap_or_default());
    }
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => ctx.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => ctx.pod_ips.join(","),
        "status.hostIP" => ctx.host_ips.first().cloned().unwrap_or_default(),
        "status.hostIPs" => ctx.host_ips.join(","),
        other => return Err(EnvError::FieldPath(other.to_string())),
    })
}

/// resourceFieldRef value (kubelet `ExtractContainerResourceValue`): cpu rounds up in millis
/// over the divisor, memory/ephemeral-storage round up in units.
pub fn resource_value(
    pod: &Pod,
    container: &Container,
    container_name: Option<&str>,
    resource: &str,
    divisor: Option<&str>,
    ctx: &EnvContext,
) -> Result<String, EnvError> {
    let c = match container_name.filter(|n| !n.is_empty()) {
        None => container,
        Some(n) => pod
            .spec
            .iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .find(|c| c.name == n)
            .ok_or_else(|| EnvError::Container(n.to_string()))?,
    };
    let (kind, res) = resource
        .split_once('.')
        .ok_or_else(|| EnvError::Resource(resource.to_string()))?;
    if !["cpu", "memory", "ephemeral-storage"].contains(&res) && !res.starts_with("hugepages-") {
        return Err(EnvError::Resource(resource.to_string()));
    }
    let r = c.resources.as_ref();
    let q = match kind {
        "limits" => r
            .and_then(|r| r.limits.as_ref())
            .and_then(|m| m.get(res))
            .map(|q| q.0.clone())
            .or_else(|| ctx.node_allocatable.get(res).cloned()),
        "requests" => r
            .and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get(res))
            .map(|q| q.0.clone()),
        _ => return Err(EnvError::Resource(resource.to_string())),
    };
    let v = q.and_then(|q| quantity::parse(&q).ok()).unwrap_or_default();
    let d = divisor
        .and_then(|d| quantity::parse(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(quantity::Nano(1_000_000_000));
    let n = if res == "cpu" {
        ceil(v.milli_value(), d.milli_value().max(1))
    } else {
        ceil(v.value(), d.value().max(1))
    };
    Ok(n.to_string())
}

fn ceil(a: i128, b: i128) -> i128 {
    (a + b - 1).div_euclid(b)
}

/// Resolves a container's environment (kubelet `makeEnvironmentVariables`): envFrom first, then
/// env in order; each value may refer to earlier variables with `$(VAR)`. Missing optional
/// references are skipped; missing required ones fail with the kubelet's message.
pub fn resolve_env(
    pod: &Pod,
    container: &Container,
    ctx: &EnvContext,
) -> Result<Vec<(String, String)>, EnvError> {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let service = match ctx.services {
        None | Some(ServiceFeed::Absent) => BTreeMap::new(),
        Some(ServiceFeed::NotListed) if is_static(pod) => BTreeMap::new(),
        Some(ServiceFeed::NotListed) => return Err(EnvError::ServicesNotListed),
        Some(ServiceFeed::Listed(all)) => service_env(
            &ns,
            pod.spec
                .as_ref()
                .and_then(|s| s.enable_service_links)
                .unwrap_or(true),
            all,
        ),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match ctx.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        ordered_set(&mut env, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
            }
        }
        if let Some(r) = &from.secret_ref {
            match ctx.secrets.get(&r.name) {
                Some(s) => {
                    for (k, v) in secret_pairs(s) {
                        ordered_set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::SecretNotFound(r.name.clone())),
            }
        }
    }
    for e in container.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) if !v.is_empty() => {
                let snapshot = env.clone();
                // The container's variables first, then the service variables.
                expand(v, &|name| {
                    snapshot
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .or_else(|| service.get(name).cloned())
                })
            }
            (_, Some(src)) => {
                if let Some(f) = &src.field_ref {
                    field_value(pod, &f.field_path, ctx)?
                } else if let Some(r) = &src.resource_field_ref {
                    resource_value(
                        pod,
                        container,
                        r.container_name.as_deref(),
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                        ctx,
                    )?
                } else if let Some(r) = &src.config_map_key_ref {
                    let optional = r.optional == Some(true);
                    match ctx.config_maps.get(&r.name) {
                        None if optional => continue,
                        None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
                        Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                            Some(v) => v.clone(),
                            None if optional => continue,
                            None => {
                                return Err(EnvError::ConfigMapKey {
                                    key: r.key.clone(),
                                    namespace: ns,
                                    name: r.name.clone(),
                                })
                            }
                        },
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let optional = r.optional == Some(true);
                    match ctx.secrets.get(&r.name) {
                        None if optional => continue,
                        None => return Err(EnvError::SecretNotFound(r.name.clone())),
                        Some(s) => match secret_value(s, &r.key) {
                            Some(v) => v,
                            None if optional => continue,
                            None => {
                                return Err(EnvError::SecretKey {
                                    key: r.key.clone(),
                                    namespace: ns,
                                    name: r.name.clone(),
                                })
                            }
                        },
                    }
                } else {
                    String::new()
                }
            }
            _ => String::new(),
        };
        ordered_set(&mut env, e.name.clone(), value);
    }
    // Service variables after the container's own; a name the container sets is its own.
    for (k, v) in service {
        if !env.iter().any(|(n, _)| *n == k) {
            env.push((k, v));
        }
    }
    Ok(env)
}

/// Expands `$(VAR)` in command and args with the resolved environment (kubelet
/// `ExpandContainerCommandAndArgs`).
pub fn expand_command(args: &[String], env: &[(String, String)]) -> Vec<String> {
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    args.iter().map(|a| expand(a, &lookup)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_table() {
        let vars: BTreeMap<&str, &str> = [("VAR_A", "A"), ("VAR_B", "B"), ("EMPTY", "")]
            .into_iter()
            .collect();
        let lookup = |n: &str| vars.get(n).map(|v| v.to_string());
        // cases from kubernetes third_party/forked/golang/expansion/expand_test.go
        let table = [
            ("$(VAR_A)", "A"),
            ("___$(VAR_B)___", "___B___"),
            ("$(VAR_A)-$(VAR_B)", "A-B"),
            ("$(EMPTY)", ""),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$$(VAR_A)", "$(VAR_A)"),
            ("$$$(VAR_A)", "$A"),
            ("$$$$(VAR_A)", "$$(VAR_A)"),
            ("$(VAR_A", "$(VAR_A"),
            ("$VAR_A", "$VAR_A"),
            ("$", "$"),
            ("f$", "f$"),
            ("$$", "$"),
            ("$()", "$()"),
            ("$(VAR_A)$(VAR_B)$$", "AB$"),
            ("no vars", "no vars"),
            ("$(VAR_A)ü", "Aü"),
        ];
        for (input, want) in table {
            assert_eq!(expand(input, &lookup), want, "{input}");
        }
    }

    fn pod() -> Pod {
        serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, uid: u-1, labels: {app: web}, annotations: {note: hi}}
spec:
  nodeName: node1
  serviceAccountName: sa
  containers:
  - name: c
    image: busybox
    resources: {requests: {cpu: 250m, memory: 64Mi}, limits: {memory: 128Mi}}
"#,
        )
        .unwrap()
    }

    fn cm() -> ConfigMap {
        serde_yaml::from_str("metadata: {name: cfg}\ndata: {mode: fast, level: '3'}").unwrap()
    }
    fn secret() -> Secret {
        serde_yaml::from_str("metadata: {name: sec}\ndata: {password: aHVudGVyMg==}").unwrap()
    }

    fn run(env_yaml: &str) -> Result<Vec<(String, String)>, EnvError> {
        let p = pod();
        let mut c = p.spec.as_ref().unwrap().containers[0].clone();
        let extra: Container = serde_yaml::from_str(&format!("name: c\n{env_yaml}")).unwrap();
        c.env = extra.env;
        c.env_from = extra.env_from;
        let (cm, s) = (cm(), secret());
        let ctx = EnvContext {
            config_maps: [("cfg".to_string(), &cm)].into_iter().collect(),
            secrets: [("sec".to_string(), &s)].into_iter().collect(),
            pod_ips: vec!["10.1.0.5".into(), "fd00::5".into()],
            host_ips: vec!["192.0.2.10".into()],
            node_allocatable: [
                ("cpu".to_string(), "2".to_string()),
                ("memory".to_string(), "4Gi".to_string()),
            ]
            .into_iter()
            .collect(),
            services: None,
        };
        resolve_env(&p, &c, &ctx)
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn resolve_table() {
        type Want = Result<Vec<(String, String)>, EnvError>;
        let table: Vec<(&str, Want)> = vec![
            ("env: [{name: A, value: x}, {name: B, value: '$(A)-y'}, {name: C, value: '$$(A)'}]", Ok(kv(&[("A", "x"), ("B", "x-y"), ("C", "$(A)")]))),
            ("env: [{name: B, value: '$(A)'}, {name: A, value: x}]", Ok(kv(&[("B", "$(A)"), ("A", "x")]))),
            ("envFrom: [{prefix: CFG_, configMapRef: {name: cfg}}]", Ok(kv(&[("CFG_level", "3"), ("CFG_mode", "fast")]))),
            ("envFrom: [{secretRef: {name: sec}}]\nenv: [{name: P, value: 'pw=$(password)'}]", Ok(kv(&[("password", "hunter2"), ("P", "pw=hunter2")]))),
            ("envFrom: [{configMapRef: {name: nope, optional: true}}]", Ok(vec![])),
            ("envFrom: [{configMapRef: {name: nope}}]", Err(EnvError::ConfigMapNotFound("nope".into()))),
            ("env: [{name: M, valueFrom: {configMapKeyRef: {name: cfg, key: mode}}}]", Ok(kv(&[("M", "fast")]))),
            ("env: [{name: M, valueFrom: {configMapKeyRef: {name: cfg, key: nokey}}}]", Err(EnvError::ConfigMapKey { key: "nokey".into(), namespace: "prod".into(), name: "cfg".into() })),
            ("env: [{name: M, valueFrom: {configMapKeyRef: {name: cfg, key: nokey, optional: true}}}]", Ok(vec![])),
            ("env: [{name: S, valueFrom: {secretKeyRef: {name: sec, key: password}}}]", Ok(kv(&[("S", "hunter2")]))),
            ("env: [{name: S, valueFrom: {secretKeyRef: {name: missing, key: k}}}]", Err(EnvError::SecretNotFound("missing".into()))),
            ("env: [{name: S, valueFrom: {secretKeyRef: {name: missing, key: k, optional: true}}}]", Ok(vec![])),
            ("env: [{name: S, valueFrom: {secretKeyRef: {name: sec, key: k}}}]", Err(EnvError::SecretKey { key: "k".into(), namespace: "prod".into(), name: "sec".into() })),
            (
                "env: [{name: N, valueFrom: {fieldRef: {fieldPath: metadata.name}}}, {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}, {name: U, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}, {name: L, valueFrom: {fieldRef: {fieldPath: \"metadata.labels['app']\"}}}, {name: AN, valueFrom: {fieldRef: {fieldPath: \"metadata.annotations['note']\"}}}, {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}, {name: SA, valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}}, {name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}, {name: IPS, valueFrom: {fieldRef: {fieldPath: status.podIPs}}}, {name: H, valueFrom: {fieldRef: {fieldPath: status.hostIP}}}]",
                Ok(kv(&[("N", "web"), ("NS", "prod"), ("U", "u-1"), ("L", "web"), ("AN", "hi"), ("NODE", "node1"), ("SA", "sa"), ("IP", "10.1.0.5"), ("IPS", "10.1.0.5,fd00::5"), ("H", "192.0.2.10")])),
            ),
            ("env: [{name: X, valueFrom: {fieldRef: {fieldPath: spec.bogus}}}]", Err(EnvError::FieldPath("spec.bogus".into()))),
            (
                "env: [{name: RC, valueFrom: {resourceFieldRef: {resource: requests.cpu, divisor: 1m}}}, {name: RC1, valueFrom: {resourceFieldRef: {resource: requests.cpu}}}, {name: LM, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}, {name: LC, valueFrom: {resourceFieldRef: {resource: limits.cpu}}}, {name: RM, valueFrom: {resourceFieldRef: {resource: requests.memory}}}]",
                Ok(kv(&[("RC", "250"), ("RC1", "1"), ("LM", "128"), ("LC", "2"), ("RM", "67108864")])),
            ),
            ("env: [{name: X, valueFrom: {resourceFieldRef: {resource: limits.gpu}}}]", Err(EnvError::Resource("limits.gpu".into()))),
        ];
        for (y, want) in table {
            assert_eq!(run(y), want, "{y}");
        }
    }

    fn svc(y: &str) -> Service {
        serde_yaml::from_str(y).unwrap()
    }

    fn service_list() -> Vec<Service> {
        [
            "metadata: {name: kubernetes, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443, protocol: TCP}]}",
            "metadata: {name: fooservice, namespace: prod}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 8765}]}",
            "metadata: {name: redis-master, namespace: prod}\nspec: {clusterIP: 10.96.0.11, ports: [{name: redis, port: 6379}, {name: dns-udp, port: 53, protocol: UDP}]}",
            "metadata: {name: headless, namespace: prod}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            "metadata: {name: ext, namespace: prod}\nspec: {type: ExternalName, externalName: example.org}",
            "metadata: {name: noports, namespace: prod}\nspec: {clusterIP: 10.96.0.12}",
            "metadata: {name: elsewhere, namespace: other}\nspec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}",
            "metadata: {name: v6, namespace: six}\nspec: {clusterIP: 'fd00::10', ports: [{port: 80}]}",
        ]
        .iter()
        .map(|y| svc(y))
        .collect()
    }

    fn services() -> ServiceLinks {
        service_links(&service_list())
    }

    #[test]
    fn a_service_link_keeps_what_the_variables_read() {
        let links = services();
        // Headless, ExternalName and port-less Services yield no variables: not kept.
        let names: Vec<&str> = links.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "kubernetes",
                "elsewhere",
                "fooservice",
                "redis-master",
                "v6"
            ]
        );
        let redis = &links[&("prod".to_string(), "redis-master".to_string())];
        assert_eq!(redis.cluster_ip, "10.96.0.11");
        assert_eq!(
            redis.ports,
            [
                LinkPort {
                    name: "redis".into(),
                    port: 6379,
                    protocol: String::new()
                },
                LinkPort {
                    name: "dns-udp".into(),
                    port: 53,
                    protocol: "UDP".into()
                }
            ]
        );
    }

    #[test]
    fn service_link_variables_follow_the_kubelet() {
        let all = services();
        let env = service_env("prod", true, &all);
        let want: BTreeMap<String, String> = kv(&[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
            ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
            ("KUBERNETES_PORT_443_TCP_PORT", "443"),
            ("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1"),
            ("FOOSERVICE_SERVICE_HOST", "10.96.0.10"),
            ("FOOSERVICE_SERVICE_PORT", "8765"),
            ("FOOSERVICE_PORT", "tcp://10.96.0.10:8765"),
            ("FOOSERVICE_PORT_8765_TCP", "tcp://10.96.0.10:8765"),
            ("FOOSERVICE_PORT_8765_TCP_PROTO", "tcp"),
            ("FOOSERVICE_PORT_8765_TCP_PORT", "8765"),
            ("FOOSERVICE_PORT_8765_TCP_ADDR", "10.96.0.10"),
            ("REDIS_MASTER_SERVICE_HOST", "10.96.0.11"),
            ("REDIS_MASTER_SERVICE_PORT", "6379"),
            ("REDIS_MASTER_SERVICE_PORT_REDIS", "6379"),
            ("REDIS_MASTER_SERVICE_PORT_DNS_UDP", "53"),
            ("REDIS_MASTER_PORT", "tcp://10.96.0.11:6379"),
            ("REDIS_MASTER_PORT_6379_TCP", "tcp://10.96.0.11:6379"),
            ("REDIS_MASTER_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_MASTER_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_MASTER_PORT_6379_TCP_ADDR", "10.96.0.11"),
            ("REDIS_MASTER_PORT_53_UDP", "udp://10.96.0.11:53"),
            ("REDIS_MASTER_PORT_53_UDP_PROTO", "udp"),
            ("REDIS_MASTER_PORT_53_UDP_PORT", "53"),
            ("REDIS_MASTER_PORT_53_UDP_ADDR", "10.96.0.11"),
        ])
        .into_iter()
        .collect();
        assert_eq!(env, want);
        // enableServiceLinks: false keeps only the master service; other namespaces see theirs.
        let off = service_env("prod", false, &all);
        assert_eq!(off.len(), 8, "{off:?}");
        assert!(off.keys().all(|k| k.starts_with("KUBERNETES_")), "{off:?}");
        let six = service_env("six", true, &all);
        assert_eq!(six["V6_PORT"], "tcp://[fd00::10]:80");
        assert_eq!(six["V6_SERVICE_HOST"], "fd00::10");
        assert!(!six.contains_key("ELSEWHERE_SERVICE_HOST"));
        // A `kubernetes` Service of the pod's own namespace wins over default's, in any order.
        let mut list = service_list();
        list.insert(0, svc("metadata: {name: kubernetes, namespace: prod}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 80}]}"));
        assert_eq!(
            service_env("prod", true, &service_links(&list))["KUBERNETES_SERVICE_HOST"],
            "10.96.0.99"
        );
        list.reverse();
        assert_eq!(
            service_env("prod", true, &service_links(&list))["KUBERNETES_SERVICE_HOST"],
            "10.96.0.99"
        );
        // Even with service links off, default's master Service is the one taken.
        assert_eq!(
            service_env("prod", false, &service_links(&list))["KUBERNETES_SERVICE_HOST"],
            "10.96.0.1"
        );
        // A namespace that sorts right after the pod's is not read as the pod's.
        list.push(svc("metadata: {name: next, namespace: prod-2}\nspec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}"));
        assert!(!service_env("prod", true, &service_links(&list)).contains_key("NEXT_SERVICE_HOST"));
        // Nothing without services.
        assert!(service_env("prod", true, &ServiceLinks::new()).is_empty());
    }

    #[test]
    fn service_links_in_the_container_env() {
        let p = pod();
        let feed = ServiceFeed::Listed(Arc::new(services()));
        let resolve = |env_yaml: &str, pod: &Pod, feed: &ServiceFeed| {
            let extra: Container = serde_yaml::from_str(&format!("name: c\n{env_yaml}")).unwrap();
            let ctx = EnvContext {
                services: Some(feed),
                ..Default::default()
            };
            resolve_env(pod, &extra, &ctx)
        };
        // The container's value wins; its own variables come first; `$(SVC_...)` expands.
        let env = resolve(
            "env: [{name: FOOSERVICE_SERVICE_HOST, value: mine}, {name: U, value: 'http://$(FOOSERVICE_SERVICE_HOST):$(FOOSERVICE_SERVICE_PORT)'}]",
            &p,
            &feed,
        )
        .unwrap();
        assert_eq!(env[0], ("FOOSERVICE_SERVICE_HOST".into(), "mine".into()));
        assert_eq!(env[1], ("U".into(), "http://mine:8765".into()));
        assert_eq!(
            env.iter()
                .filter(|(k, _)| k == "FOOSERVICE_SERVICE_HOST")
                .count(),
            1
        );
        assert!(env.contains(&("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into())));
        assert_eq!(env.len(), 2 + 28 - 1);
        // Not listed yet: an apiserver pod waits, a static pod goes on without them.
        assert_eq!(
            resolve("env: []", &p, &ServiceFeed::NotListed),
            Err(EnvError::ServicesNotListed)
        );
        let mut st = p.clone();
        st.metadata.annotations = Some(
            [(CONFIG_SOURCE.to_string(), "file".to_string())]
                .into_iter()
                .collect(),
        );
        assert_eq!(resolve("env: []", &st, &ServiceFeed::NotListed), Ok(vec![]));
        // No Service source: none.
        assert_eq!(resolve("env: []", &p, &ServiceFeed::Absent), Ok(vec![]));
        // enableServiceLinks: false.
        let mut off = p.clone();
        off.spec.as_mut().unwrap().enable_service_links = Some(false);
        let env = resolve("env: []", &off, &feed).unwrap();
        assert_eq!(env.len(), 8);
    }

    #[test]
    fn command_expansion() {
        let env = kv(&[("PORT", "8080")]);
        let args: Vec<String> = vec!["--port=$(PORT)".into(), "$$(PORT)".into(), "$(NOPE)".into()];
        assert_eq!(
            expand_command(&args, &env),
            vec!["--port=8080", "$(PORT)", "$(NOPE)"]
        );
    }

    #[test]
    fn error_messages_match_kubelet() {
        assert_eq!(
            EnvError::ConfigMapNotFound("a".into()).to_string(),
            "configmap \"a\" not found"
        );
        assert_eq!(
            EnvError::SecretKey {
                key: "k".into(),
                namespace: "ns".into(),
                name: "s".into()
            }
            .to_string(),
            "couldn't find key k in Secret ns/s"
        );
    }
}
