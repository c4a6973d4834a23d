//! Payloads of the API-data volumes (configMap, secret, downwardAPI, projected): which files
//! with which contents and modes, from the pod and the objects it names (pure; the kubelet's
//! `MakePayload` rules).

use super::atomic::{FileProjection, Payload};
use super::{ObjectSource, PodContext, VolumeError};
use crate::model::env::{self, EnvContext};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, DownwardAPIVolumeFile, KeyToPath, Pod, ProjectedVolumeSource,
    SecretVolumeSource, ServiceAccountTokenProjection,
};
use std::collections::BTreeMap;

/// `expirationSeconds` of a serviceAccountToken projection that does not set it (the API's
/// default for the field).
pub const DEFAULT_TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// What one serviceAccountToken projection asks the TokenRequest API for: the token's
/// audience ("" = the apiserver's own audiences) and lifetime. Projections of a pod with the
/// same audience and lifetime share one token, as with the kubelet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenSpec {
    /// `audience` of the projection ("" when unset).
    pub audience: String,
    /// `expirationSeconds` of the projection.
    pub expiration_seconds: i64,
}

impl TokenSpec {
    /// The spec of one projection.
    pub fn of(p: &ServiceAccountTokenProjection) -> Self {
        TokenSpec {
            audience: p.audience.clone().unwrap_or_default(),
            expiration_seconds: p
                .expiration_seconds
                .unwrap_or(DEFAULT_TOKEN_EXPIRATION_SECONDS),
        }
    }
}

/// The tokens a node obtained for one pod: the token, or why there is none (shown in the
/// FailedMount message). `None` in [`PodContext::service_account_tokens`] means no API server
/// is available (standalone mode, static pods).
///
/// The error side stays text on purpose: it is the TokenRequest failure as the API server (or
/// the transport) worded it, recorded once by the token manager in `node/tokens.rs`, compared
/// by value there to notice a changed failure, and shared with every pod worker; the volume
/// code only quotes it in the FailedMount message and never branches on it.
pub type PodTokens = BTreeMap<TokenSpec, Result<String, String>>;

/// Every distinct token the pod's projected volumes need.
pub fn token_specs(pod: &Pod) -> Vec<TokenSpec> {
    let mut v: Vec<TokenSpec> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .map(TokenSpec::of)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The kubelet's `FsUserFrom`: the effective `runAsUser` (the container's, else the pod's)
/// when every init and regular container has one and they are all the same; None otherwise.
pub fn fs_user(pod: &Pod) -> Option<u32> {
    let spec = pod.spec.as_ref()?;
    let pod_user = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let mut user: Option<i64> = None;
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let u = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_user)?;
        if user.is_some_and(|x| x != u) {
            return None;
        }
        user = Some(u);
    }
    user.and_then(|u| u32::try_from(u).ok())
}

/// Default file mode of configMap, secret, downwardAPI and projected volumes.
pub const DEFAULT_MODE: u32 = 0o644;

/// Checks a mode field (`defaultMode` or an item's `mode`): 0..=0777.
pub fn check_mode(
    volume: &str,
    field: &str,
    mode: Option<i32>,
) -> Result<Option<u32>, VolumeError> {
    match mode {
        None => Ok(None),
        Some(m) if (0..=0o777).contains(&m) => Ok(Some(m as u32)),
        Some(m) => Err(VolumeError::Invalid {
            volume: volume.to_string(),
            reason: format!("{field}: Invalid value: {m}: must be a number between 0 and 0777 (octal), both inclusive"),
        }),
    }
}

/// A ConfigMap/Secret key: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`.
pub fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k != "."
        && k != ".."
        && !k.starts_with("..")
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// Maps keyed data to files: all keys with `default_mode`, or only `items` (each with its own
/// mode). `what` names the object for errors (`configmap`, `secret`).
fn key_payload(
    volume: &str,
    what: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<Payload, VolumeError> {
    let mut out = Payload::new();
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (k, v) in data {
                if !valid_key(k) {
                    return Err(VolumeError::Invalid {
                        volume: volume.to_string(),
                        reason: format!("{what} key {k:?} is not a valid file name"),
                    });
                }
                out.insert(
                    k.clone(),
                    FileProjection {
                        data: v.clone(),
                        mode: default_mode,
                        owner: None,
                    },
                );
            }
        }
        Some(items) => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    if optional {
                        continue;
                    }
                    return Err(VolumeError::MissingKey {
                        volume: volume.to_string(),
                        message: format!("{what} references non-existent config key: {}", it.key),
                    });
                };
                let mode = check_mode(volume, "items.mode", it.mode)?.unwrap_or(default_mode);
                super::atomic::validate_path(&it.path).map_err(|source| VolumeError::ItemPath {
                    volume: volume.to_string(),
                    source,
                })?;
                out.insert(
                    it.path.clone(),
                    FileProjection {
                        data: v.clone(),
                        mode,
                        owner: None,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// A ConfigMap's data and binaryData as bytes.
fn config_map_data(
    src: &dyn ObjectSource,
    ns: &str,
    name: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let cm = src.config_map(ns, name)?;
    let mut m: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.unwrap_or_default() {
        m.insert(k, v.0);
    }
    Some(m)
}

/// A Secret's data (and stringData, which wins like the API server merges it) as bytes.
fn secret_data(src: &dyn ObjectSource, ns: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let s = src.secret(ns, name)?;
    let mut m: BTreeMap<String, Vec<u8>> = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in s.string_data.unwrap_or_default() {
        m.insert(k, v.into_bytes());
    }
    Some(m)
}

fn namespace(ctx: &PodContext) -> String {
    ctx.pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// Payload of a configMap volume. A missing ConfigMap is an empty volume when `optional`, an
/// error (`configmap "NAME" not found`) otherwise.
pub fn config_map(
    volume: &str,
    s: &ConfigMapVolumeSource,
    ctx: &PodContext,
) -> Result<Payload, VolumeError> {
    let mode = check_mode(volume, "defaultMode", s.default_mode)?.unwrap_or(DEFAULT_MODE);
    let optional = s.optional.unwrap_or(false);
    match config_map_data(ctx.objects, &namespace(ctx), &s.name) {
        Some(d) => key_payload(volume, "configmap", &d, s.items.as_ref(), mode, optional),
        None if optional => Ok(Payload::new()),
        None => Err(VolumeError::NotFound {
            volume: volume.to_string(),
            kind: "configmap",
            name: s.name.clone(),
        }),
    }
}

/// Payload of a secret volume (same rules as configMap).
pub fn secret(
    volume: &str,
    s: &SecretVolumeSource,
    ctx: &PodContext,
) -> Result<Payload, VolumeError> {
    let mode = check_mode(volume, "defaultMode", s.default_mode)?.unwrap_or(DEFAULT_MODE);
    let optional = s.optional.unwrap_or(false);
    let name = s.secret_name.clone().unwrap_or_default();
    match secret_data(ctx.objects, &namespace(ctx), &name) {
        Some(d) => key_payload(volume, "secret", &d, s.items.as_ref(), mode, optional),
        None if optional => Ok(Payload::new()),
        None => Err(VolumeError::NotFound {
            volume: volume.to_string(),
            kind: "secret",
            name,
        }),
    }
}

/// Go's `%q` for the label/annotation files (`key="value"` lines).
fn go_quote(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                o.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn format_map(m: Option<&BTreeMap<String, String>>) -> String {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={}", go_quote(v)))
            .collect::<Vec<_>>()
            .join("\n")
    })
    .unwrap_or_default()
}

/// Value of one downwardAPI file: fieldRef (metadata.name, namespace, uid, labels,
/// annotations, `labels['k']`, `annotations['k']`) or resourceFieldRef (containerName required).
pub fn downward_value(
    volume: &str,
    f: &DownwardAPIVolumeFile,
    ctx: &PodContext,
) -> Result<String, VolumeError> {
    let bad = |reason: String| VolumeError::Invalid {
        volume: volume.to_string(),
        reason,
    };
    let env_ctx = EnvContext {
        pod_ips: ctx.pod_ips.clone(),
        host_ips: ctx.host_ips.clone(),
        node_allocatable: ctx.node_allocatable.clone(),
        ..Default::default()
    };
    match (&f.field_ref, &f.resource_field_ref) {
        (Some(r), None) => match r.field_path.as_str() {
            "metadata.labels" => Ok(format_map(ctx.pod.metadata.labels.as_ref())),
            "metadata.annotations" => Ok(format_map(ctx.pod.metadata.annotations.as_ref())),
            p @ ("metadata.name" | "metadata.namespace" | "metadata.uid") => {
                env::field_value(ctx.pod, p, &env_ctx).map_err(|e| bad(e.to_string()))
            }
            p if (p.starts_with("metadata.labels['") || p.starts_with("metadata.annotations['"))
                && p.ends_with("']") =>
            {
                env::field_value(ctx.pod, p, &env_ctx).map_err(|e| bad(e.to_string()))
            }
            p => Err(bad(format!(
                "{}: fieldRef.fieldPath: Unsupported value: {p:?}: supported values: \"metadata.annotations\", \"metadata.labels\", \"metadata.name\", \"metadata.namespace\", \"metadata.uid\"",
                f.path
            ))),
        },
        (None, Some(r)) => {
            let cname = r
                .container_name
                .as_deref()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| bad(format!("{}: resourceFieldRef.containerName: Required value", f.path)))?;
            let spec = ctx.pod.spec.as_ref().ok_or_else(|| bad("pod has no spec".into()))?;
            let c = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == cname)
                .ok_or_else(|| bad(format!("{}: container {cname} not found", f.path)))?;
            env::resource_value(ctx.pod, c, None, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()), &env_ctx)
                .map_err(|e| bad(e.to_string()))
        }
        _ => Err(bad(format!("{}: exactly one of fieldRef and resourceFieldRef is required", f.path))),
    }
}

fn downward_items(
    volume: &str,
    items: Option<&Vec<DownwardAPIVolumeFile>>,
    default_mode: u32,
    ctx: &PodContext,
    out: &mut Payload,
) -> Result<(), VolumeError> {
    for f in items.into_iter().flatten() {
        super::atomic::validate_path(&f.path).map_err(|source| VolumeError::ItemPath {
            volume: volume.to_string(),
            source,
        })?;
        let mode = check_mode(volume, "items.mode", f.mode)?.unwrap_or(default_mode);
        let v = downward_value(volume, f, ctx)?;
        out.insert(
            f.path.clone(),
            FileProjection {
                data: v.into_bytes(),
                mode,
                owner: None,
            },
        );
    }
    Ok(())
}

/// Payload of a downwardAPI volume.
pub fn downward_api(
    volume: &str,
    s: &k8s_openapi::api::core::v1::DownwardAPIVolumeSource,
    ctx: &PodContext,
) -> Result<Payload, VolumeError> {
    let mode = check_mode(volume, "defaultMode", s.default_mode)?.unwrap_or(DEFAULT_MODE);
    let mut out = Payload::new();
    downward_items(volume, s.items.as_ref(), mode, ctx, &mut out)?;
    Ok(out)
}

/// Payload of a projected volume: configMap, secret, downwardAPI and serviceAccountToken
/// sources merged in order (a later source wins a path). A serviceAccountToken source takes
/// its token from [`PodContext::service_account_tokens`] (issued through the TokenRequest API
/// in cluster mode); without an API server (standalone mode, static pods) it is rejected with a
/// clear error, as are clusterTrustBundle sources.
pub fn projected(
    volume: &str,
    s: &ProjectedVolumeSource,
    ctx: &PodContext,
) -> Result<Payload, VolumeError> {
    let mode = check_mode(volume, "defaultMode", s.default_mode)?.unwrap_or(DEFAULT_MODE);
    let ns = namespace(ctx);
    let mut out = Payload::new();
    for src in s.sources.iter().flatten() {
        if let Some(c) = &src.config_map {
            let optional = c.optional.unwrap_or(false);
            match config_map_data(ctx.objects, &ns, &c.name) {
                Some(d) => out.extend(key_payload(
                    volume,
                    "configmap",
                    &d,
                    c.items.as_ref(),
                    mode,
                    optional,
                )?),
                None if optional => {}
                None => {
                    return Err(VolumeError::NotFound {
                        volume: volume.to_string(),
                        kind: "configmap",
                        name: c.name.clone(),
                    })
                }
            }
        } else if let Some(c) = &src.secret {
            let optional = c.optional.unwrap_or(false);
            match secret_data(ctx.objects, &ns, &c.name) {
                Some(d) => out.extend(key_payload(
                    volume,
                    "secret",
                    &d,
                    c.items.as_ref(),
                    mode,
                    optional,
                )?),
                None if optional => {}
                None => {
                    return Err(VolumeError::NotFound {
                        volume: volume.to_string(),
                        kind: "secret",
                        name: c.name.clone(),
                    })
                }
            }
        } else if let Some(d) = &src.downward_api {
            downward_items(volume, d.items.as_ref(), mode, ctx, &mut out)?;
        } else if let Some(t) = &src.service_account_token {
            let Some(tokens) = &ctx.service_account_tokens else {
                return Err(VolumeError::Unsupported {
                    volume: volume.to_string(),
                    what: "projected serviceAccountToken source (needs a kube-apiserver; not available to static pods)".into(),
                });
            };
            super::atomic::validate_path(&t.path).map_err(|source| VolumeError::ItemPath {
                volume: volume.to_string(),
                source,
            })?;
            let token = match tokens.get(&TokenSpec::of(t)) {
                Some(Ok(tok)) => tok.clone(),
                Some(Err(e)) => {
                    return Err(VolumeError::Invalid {
                        volume: volume.to_string(),
                        reason: format!("failed to fetch token: {e}"),
                    })
                }
                None => {
                    return Err(VolumeError::Invalid {
                        volume: volume.to_string(),
                        reason: "failed to fetch token: not requested yet".into(),
                    })
                }
            };
            // The kubelet writes the token 0600 and owned by the pod's user when every
            // container runs as the same user (`FsUserFrom`), and 0600 when the pod has an
            // fsGroup (the ownership walk then adds the group's read bit), whatever
            // defaultMode says.
            let owner = fs_user(ctx.pod);
            let mode = if owner.is_some() || super::ownership::FsGroup::of(ctx.pod).is_some() {
                0o600
            } else {
                mode
            };
            out.insert(
                t.path.clone(),
                FileProjection {
                    data: token.into_bytes(),
                    mode,
                    owner,
                },
            );
        } else {
            return Err(VolumeError::Unsupported {
                volume: volume.to_string(),
                what: "projected source kind".into(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::volumes::MapObjects;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Volume};

    fn objs() -> MapObjects {
        let cm: ConfigMap = serde_yaml::from_str(
            "metadata: {name: cfg, namespace: default}\ndata: {greeting: hello, color: blue}\nbinaryData: {bin: AAE=}\n",
        )
        .unwrap();
        let s: Secret = serde_yaml::from_str(
            "metadata: {name: sec, namespace: default}\ndata: {password: aHVudGVyMg==}\n",
        )
        .unwrap();
        let mut o = MapObjects::default();
        o.config_maps.insert(("default".into(), "cfg".into()), cm);
        o.secrets.insert(("default".into(), "sec".into()), s);
        o
    }

    fn pod() -> Pod {
        serde_yaml::from_str(
            r#"
metadata: {name: web, namespace: default, uid: u-1, labels: {app: web, tier: "a\"b"}, annotations: {note: x}}
spec:
  containers:
  - name: c
    image: busybox
    resources: {limits: {memory: 64Mi, cpu: 500m}, requests: {cpu: 250m}}
"#,
        )
        .unwrap()
    }

    fn vol(y: &str) -> Volume {
        serde_yaml::from_str(y).unwrap()
    }

    fn text(p: &Payload, k: &str) -> String {
        String::from_utf8(p[k].data.clone()).unwrap()
    }

    #[test]
    fn config_map_all_keys_items_and_modes() {
        let o = objs();
        let pod = pod();
        let ctx = PodContext::new(&pod, &o);
        let v = vol("{name: c, configMap: {name: cfg}}");
        let p = config_map("c", v.config_map.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(p.keys().collect::<Vec<_>>(), ["bin", "color", "greeting"]);
        assert_eq!(p["bin"].data, vec![0, 1]);
        assert_eq!(p["greeting"].mode, 0o644);
        let v = vol("{name: c, configMap: {name: cfg, defaultMode: 0o400, items: [{key: greeting, path: sub/g.txt}, {key: color, path: c, mode: 0o600}]}}");
        let p = config_map("c", v.config_map.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(text(&p, "sub/g.txt"), "hello");
        assert_eq!(p["sub/g.txt"].mode, 0o400);
        assert_eq!(p["c"].mode, 0o600);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn missing_objects_and_keys() {
        let o = objs();
        let pod = pod();
        let ctx = PodContext::new(&pod, &o);
        let v = vol("{name: c, configMap: {name: nope}}");
        let e = config_map("c", v.config_map.as_ref().unwrap(), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.SetUp failed for volume \"c\" : configmap \"nope\" not found"
        );
        let v = vol("{name: c, configMap: {name: nope, optional: true}}");
        assert!(config_map("c", v.config_map.as_ref().unwrap(), &ctx)
            .unwrap()
            .is_empty());
        let v = vol("{name: c, configMap: {name: cfg, items: [{key: missing, path: m}]}}");
        let e = config_map("c", v.config_map.as_ref().unwrap(), &ctx).unwrap_err();
        assert!(
            e.to_string()
                .contains("references non-existent config key: missing"),
            "{e}"
        );
        let v = vol("{name: s, secret: {secretName: gone}}");
        let e = secret("s", v.secret.as_ref().unwrap(), &ctx).unwrap_err();
        assert!(e.to_string().contains("secret \"gone\" not found"));
        let v = vol("{name: c, configMap: {name: cfg, defaultMode: 1024}}");
        assert!(config_map("c", v.config_map.as_ref().unwrap(), &ctx).is_err());
        let v = vol("{name: c, configMap: {name: cfg, items: [{key: color, path: ../x}]}}");
        assert!(config_map("c", v.config_map.as_ref().unwrap(), &ctx).is_err());
    }

    #[test]
    fn secret_bytes() {
        let o = objs();
        let pod = pod();
        let ctx = PodContext::new(&pod, &o);
        let v = vol("{name: s, secret: {secretName: sec, defaultMode: 0o440}}");
        let p = secret("s", v.secret.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(text(&p, "password"), "hunter2");
        assert_eq!(p["password"].mode, 0o440);
    }

    #[test]
    fn downward_api_fields() {
        let o = objs();
        let pod = pod();
        let ctx = PodContext::new(&pod, &o);
        let v = vol(r#"
name: d
downwardAPI:
  items:
  - {path: name, fieldRef: {fieldPath: metadata.name}}
  - {path: ns, fieldRef: {fieldPath: metadata.namespace}}
  - {path: uid, fieldRef: {fieldPath: metadata.uid}}
  - {path: labels, fieldRef: {fieldPath: metadata.labels}}
  - {path: app, fieldRef: {fieldPath: "metadata.labels['app']"}}
  - {path: annotations, fieldRef: {fieldPath: metadata.annotations}}
  - {path: mem, resourceFieldRef: {containerName: c, resource: limits.memory, divisor: 1Mi}}
  - {path: cpu, resourceFieldRef: {containerName: c, resource: requests.cpu, divisor: 1m}}
"#);
        let p = downward_api("d", v.downward_api.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(text(&p, "name"), "web");
        assert_eq!(text(&p, "ns"), "default");
        assert_eq!(text(&p, "uid"), "u-1");
        assert_eq!(text(&p, "labels"), "app=\"web\"\ntier=\"a\\\"b\"");
        assert_eq!(text(&p, "app"), "web");
        assert_eq!(text(&p, "annotations"), "note=\"x\"");
        assert_eq!(text(&p, "mem"), "64");
        assert_eq!(text(&p, "cpu"), "250");
        let v = vol(
            "{name: d, downwardAPI: {items: [{path: ip, fieldRef: {fieldPath: status.podIP}}]}}",
        );
        assert!(downward_api("d", v.downward_api.as_ref().unwrap(), &ctx).is_err());
        let v = vol("{name: d, downwardAPI: {items: [{path: m, resourceFieldRef: {resource: limits.memory}}]}}");
        assert!(downward_api("d", v.downward_api.as_ref().unwrap(), &ctx)
            .unwrap_err()
            .to_string()
            .contains("containerName"));
    }

    /// A limit that is not set reads as node allocatable (what the worker passes in), the
    /// same as the env var path.
    #[test]
    fn downward_default_limits_are_node_allocatable() {
        let o = objs();
        let pod: Pod = serde_yaml::from_str(
            "metadata: {name: p, namespace: default, uid: u}\nspec: {containers: [{name: client-container, image: i}]}",
        )
        .unwrap();
        let mut ctx = PodContext::new(&pod, &o);
        ctx.node_allocatable = [
            ("cpu".to_string(), "2".to_string()),
            ("memory".to_string(), "1Gi".to_string()),
        ]
        .into();
        let v = vol(r#"
name: podinfo
downwardAPI:
  items:
  - {path: cpu_limit, resourceFieldRef: {containerName: client-container, resource: limits.cpu, divisor: "1"}}
  - {path: memory_limit, resourceFieldRef: {containerName: client-container, resource: limits.memory, divisor: "1"}}
"#);
        let p = downward_api("podinfo", v.downward_api.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(text(&p, "cpu_limit"), "2");
        assert_eq!(text(&p, "memory_limit"), "1073741824");
    }

    #[test]
    fn token_mode_with_fs_group() {
        let o = objs();
        let mut pod = pod();
        let v = vol("{name: t, projected: {defaultMode: 0o644, sources: [{serviceAccountToken: {path: token}}, {configMap: {name: cfg, items: [{key: color, path: c}]}}]}}");
        let mut tokens = PodTokens::new();
        tokens.insert(
            TokenSpec::of(
                v.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
                    .service_account_token
                    .as_ref()
                    .unwrap(),
            ),
            Ok("tok".into()),
        );
        let run = |pod: &Pod| {
            let mut ctx = PodContext::new(pod, &o);
            ctx.service_account_tokens = Some(tokens.clone());
            projected("t", v.projected.as_ref().unwrap(), &ctx).unwrap()
        };
        assert_eq!(run(&pod)["token"].mode, 0o644);
        pod.spec.as_mut().unwrap().security_context =
            Some(serde_yaml::from_str("{fsGroup: 1001}").unwrap());
        let p = run(&pod);
        assert_eq!(p["token"].mode, 0o600, "kubelet: 0600 when fsGroup is set");
        assert_eq!(p["c"].mode, 0o644, "other files keep defaultMode");
        assert_eq!(p["token"].owner, None, "no common runAsUser");
        // Every container runs as 1234 (the pod's user): 0600 and owned by it.
        pod.spec.as_mut().unwrap().security_context =
            Some(serde_yaml::from_str("{runAsUser: 1234}").unwrap());
        let p = run(&pod);
        assert_eq!((p["token"].mode, p["token"].owner), (0o600, Some(1234)));
        assert_eq!(p["c"].owner, None, "only the token gets the pod's user");
    }

    /// `FsUserFrom`: the one effective runAsUser of all init and regular containers.
    #[test]
    fn fs_user_from_pod() {
        let p = |y: &str| -> Pod { serde_yaml::from_str(y).unwrap() };
        for (y, want) in [
            ("spec: {securityContext: {runAsUser: 7}, containers: [{name: a}, {name: b}]}", Some(7)),
            ("spec: {securityContext: {runAsUser: 7}, containers: [{name: a, securityContext: {runAsUser: 8}}]}", Some(8)),
            ("spec: {securityContext: {runAsUser: 7}, containers: [{name: a}, {name: b, securityContext: {runAsUser: 8}}]}", None),
            ("spec: {containers: [{name: a, securityContext: {runAsUser: 8}}, {name: b}]}", None),
            ("spec: {initContainers: [{name: i, securityContext: {runAsUser: 9}}], containers: [{name: a, securityContext: {runAsUser: 8}}]}", None),
            ("spec: {securityContext: {runAsUser: 0}, containers: [{name: a}]}", Some(0)),
            ("spec: {containers: [{name: a}]}", None),
        ] {
            assert_eq!(fs_user(&p(y)), want, "{y}");
        }
    }

    #[test]
    fn projected_merges_sources() {
        let o = objs();
        let pod = pod();
        let ctx = PodContext::new(&pod, &o);
        let v = vol(r#"
name: p
projected:
  defaultMode: 0o444
  sources:
  - configMap: {name: cfg, items: [{key: greeting, path: cfg/greeting}]}
  - secret: {name: sec, items: [{key: password, path: sec/pw, mode: 0o400}]}
  - downwardAPI: {items: [{path: podname, fieldRef: {fieldPath: metadata.name}}]}
  - configMap: {name: absent, optional: true}
"#);
        let p = projected("p", v.projected.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(text(&p, "cfg/greeting"), "hello");
        assert_eq!(p["cfg/greeting"].mode, 0o444);
        assert_eq!(text(&p, "sec/pw"), "hunter2");
        assert_eq!(p["sec/pw"].mode, 0o400);
        assert_eq!(text(&p, "podname"), "web");
        let v = vol("{name: p, projected: {sources: [{serviceAccountToken: {path: token}}]}}");
        assert!(projected("p", v.projected.as_ref().unwrap(), &ctx)
            .unwrap_err()
            .to_string()
            .contains("serviceAccountToken"));
    }

    #[test]
    fn projected_service_account_token() {
        let o = objs();
        let mut pod = pod();
        let v = vol(r#"
name: kube-api-access-x
projected:
  defaultMode: 420
  sources:
  - serviceAccountToken: {expirationSeconds: 3607, path: token}
  - serviceAccountToken: {audience: vault, path: vault/token}
  - configMap: {name: cfg, items: [{key: color, path: ca.crt}]}
  - downwardAPI: {items: [{path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}]}
"#);
        pod.spec.as_mut().unwrap().volumes = Some(vec![v.clone()]);
        let specs = token_specs(&pod);
        let api = TokenSpec {
            audience: String::new(),
            expiration_seconds: 3607,
        };
        let vault = TokenSpec {
            audience: "vault".into(),
            expiration_seconds: DEFAULT_TOKEN_EXPIRATION_SECONDS,
        };
        assert_eq!(specs, [api.clone(), vault.clone()]);
        let mut ctx = PodContext::new(&pod, &o);
        let mut tokens = PodTokens::new();
        tokens.insert(api.clone(), Ok("tok-api".into()));
        ctx.service_account_tokens = Some(tokens.clone());
        let e = projected("kube-api-access-x", v.projected.as_ref().unwrap(), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.SetUp failed for volume \"kube-api-access-x\" : failed to fetch token: not requested yet"
        );
        tokens.insert(vault.clone(), Err("403 Forbidden".into()));
        ctx.service_account_tokens = Some(tokens.clone());
        let e = projected("kube-api-access-x", v.projected.as_ref().unwrap(), &ctx).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("failed to fetch token: 403 Forbidden"),
            "{e}"
        );
        tokens.insert(vault, Ok("tok-vault".into()));
        ctx.service_account_tokens = Some(tokens);
        let p = projected("kube-api-access-x", v.projected.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(text(&p, "token"), "tok-api");
        assert_eq!(p["token"].mode, 0o644);
        assert_eq!(text(&p, "vault/token"), "tok-vault");
        assert_eq!(text(&p, "ca.crt"), "blue");
        assert_eq!(text(&p, "namespace"), "default");
        let bad = vol("{name: p, projected: {sources: [{serviceAccountToken: {path: ../t}}]}}");
        assert!(projected("p", bad.projected.as_ref().unwrap(), &ctx).is_err());
    }

    #[test]
    fn keys() {
        assert!(valid_key("a.b-c_d"));
        for k in ["", ".", "..", "..x", "a/b", "a b"] {
            assert!(!valid_key(k), "{k}");
        }
    }
}
