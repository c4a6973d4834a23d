//! Pod volumes, laid out like the kubelet's: every volume of a pod lives under
//! `<root>/pods/<uid>/volumes/<plugin>/<name>` where `<plugin>` is `kubernetes.io~empty-dir`,
//! `kubernetes.io~configmap`, `kubernetes.io~secret`, `kubernetes.io~downward-api` or
//! `kubernetes.io~projected` (hostPath volumes use the host path itself).
//!
//! `persistentVolumeClaim` volumes resolve to their bound PersistentVolume ([`pvc`]): a `local`
//! PV is bind-mounted (read-only when the claim is) onto
//! `<root>/pods/<uid>/volumes/kubernetes.io~local-volume/<name>`, a `hostPath` PV is used as is.
//! Teardown only unmounts them: the data stays on the volume.
//!
//! The pod worker calls, in order:
//! 1. [`setup_pod_volumes`] before the first container starts (idempotent: an agent restart calls
//!    it again and keeps emptyDir contents and existing tmpfs mounts). A missing non-optional
//!    ConfigMap/Secret or key is a [`VolumeError`] whose Display text is the kubelet's
//!    `MountVolume.SetUp failed for volume "x" : ...` message, for a `FailedMount` event.
//! 2. [`mounts_for_container`] per container start: the container's `volumeMounts` as
//!    [`MountSpec`]s (bind mounts: `source` on the host, `destination` in the container,
//!    `readonly`, `propagation` → `rprivate`/`rslave`/`rshared`). A subPath is resolved inside
//!    its volume descriptor by descriptor and bind-mounted onto an agent-owned path, which is
//!    the source handed to the runtime ([`subpath`]).
//! 3. [`refresh_pod_volumes`] when ConfigMaps/Secrets/tokens change or a pod update changes
//!    its labels or annotations: contents of configMap, secret, downwardAPI and projected
//!    volumes are updated in place with the atomic `..data` swap, so running containers see
//!    the new files (except through subPath mounts, as in Kubernetes).
//!
//! With a pod `fsGroup`, volumes get the group's ownership as the kubelet gives it
//! ([`ownership`]); a container's `subPathExpr` is expanded with its environment by
//! [`expand_sub_path_exprs`] before [`mounts_for_container`].
//! 4. [`teardown_pod_volumes`] after the pod's containers are gone: unmounts and removes
//!    `<root>/pods/<uid>/volume-subpaths` and `<root>/pods/<uid>/volumes`.
//!
//! Memory-backed volumes (emptyDir `medium: Memory`, secret, downwardAPI, projected) are tmpfs
//! mounts, as with the kubelet; a secret therefore never touches the disk.

pub mod atomic;
pub mod hostpath;
pub mod local;
pub mod mount;
pub mod ownership;
pub mod projection;
pub mod pvc;
pub mod subpath;

use crate::model::quantity;
use crate::source::manifest::Snapshot;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Volume,
};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use thiserror::Error;
use tracing::{debug, warn};

/// Where volumes live and how memory-backed ones are made.
#[derive(Debug, Clone)]
pub struct VolumeHost {
    /// Agent root directory (`--root-dir`, default `/var/lib/hako`).
    pub root: PathBuf,
    /// Mount tmpfs for memory-backed volumes (true in the agent; false only for unprivileged
    /// unit tests, where they become plain directories).
    pub mount_tmpfs: bool,
}

impl VolumeHost {
    /// A host rooted at `root` that mounts tmpfs.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            mount_tmpfs: true,
        }
    }

    /// `<root>/pods/<uid>/volumes`.
    pub fn volumes_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(uid).join("volumes")
    }
}

/// Read access to the ConfigMaps and Secrets a pod's volumes name (the manifest directory's
/// [`Snapshot`] now, an API server cache later).
pub trait ObjectSource {
    /// The ConfigMap `namespace/name`, if it exists.
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    /// The Secret `namespace/name`, if it exists.
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    /// The PersistentVolumeClaim `namespace/name`, if it exists.
    fn persistent_volume_claim(
        &self,
        _namespace: &str,
        _name: &str,
    ) -> Option<PersistentVolumeClaim> {
        None
    }
    /// The PersistentVolume `name`, if it exists.
    fn persistent_volume(&self, _name: &str) -> Option<PersistentVolume> {
        None
    }
    /// Claims are bound by `spec.volumeName` alone (a standalone source: no binding
    /// controller sets `status.phase` or the PV's `claimRef`).
    fn binds_by_volume_name(&self) -> bool {
        false
    }
}

impl ObjectSource for Snapshot {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        by_key(&self.config_maps, namespace, name)
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        by_key(&self.secrets, namespace, name)
    }
    fn persistent_volume_claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<PersistentVolumeClaim> {
        by_key(&self.claims, namespace, name)
    }
    fn persistent_volume(&self, name: &str) -> Option<PersistentVolume> {
        self.persistent_volumes.get(name).cloned()
    }
    fn binds_by_volume_name(&self) -> bool {
        true
    }
}

/// The object at `(namespace, name)` of a map keyed that way.
fn by_key<T: Clone>(m: &BTreeMap<(String, String), T>, namespace: &str, name: &str) -> Option<T> {
    m.get(&(namespace.to_string(), name.to_string())).cloned()
}

/// ConfigMaps and Secrets in plain maps keyed by `(namespace, name)` (tests, simple callers).
#[derive(Debug, Clone, Default)]
pub struct MapObjects {
    /// ConfigMaps.
    pub config_maps: BTreeMap<(String, String), ConfigMap>,
    /// Secrets.
    pub secrets: BTreeMap<(String, String), Secret>,
    /// PersistentVolumeClaims by `(namespace, name)`.
    pub claims: BTreeMap<(String, String), PersistentVolumeClaim>,
    /// PersistentVolumes by name.
    pub persistent_volumes: BTreeMap<String, PersistentVolume>,
    /// See [`ObjectSource::binds_by_volume_name`] (true for standalone sources).
    pub binds_by_volume_name: bool,
}

impl ObjectSource for MapObjects {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        by_key(&self.config_maps, namespace, name)
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        by_key(&self.secrets, namespace, name)
    }
    fn persistent_volume_claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<PersistentVolumeClaim> {
        by_key(&self.claims, namespace, name)
    }
    fn persistent_volume(&self, name: &str) -> Option<PersistentVolume> {
        self.persistent_volumes.get(name).cloned()
    }
    fn binds_by_volume_name(&self) -> bool {
        self.binds_by_volume_name
    }
}

/// Everything volume setup reads besides the host: the pod and the objects and addresses its
/// volumes may project.
pub struct PodContext<'a> {
    /// The pod (metadata.uid is required).
    pub pod: &'a Pod,
    /// ConfigMaps and Secrets.
    pub objects: &'a dyn ObjectSource,
    /// Pod IPs (reserved for downwardAPI fields that need them; volumes accept metadata fields).
    pub pod_ips: Vec<String>,
    /// Host IPs.
    pub host_ips: Vec<String>,
    /// Node allocatable (`cpu`, `memory`, ...): resourceFieldRef of an unset limit.
    pub node_allocatable: BTreeMap<String, String>,
    /// ServiceAccount tokens issued for the pod (cluster mode); `None` without an API server.
    pub service_account_tokens: Option<projection::PodTokens>,
    /// This node (name and labels) for PersistentVolume node affinity; `None`: the
    /// standalone node of [`pvc::standalone_node`] (named after the pod's `spec.nodeName`).
    pub node: Option<Node>,
}

impl<'a> PodContext<'a> {
    /// A context with no addresses and no allocatable.
    pub fn new(pod: &'a Pod, objects: &'a dyn ObjectSource) -> Self {
        Self {
            pod,
            objects,
            pod_ips: Vec::new(),
            host_ips: Vec::new(),
            node_allocatable: BTreeMap::new(),
            service_account_tokens: None,
            node: None,
        }
    }
}

/// Volume failures. Display texts follow the kubelet's FailedMount event messages.
#[derive(Debug, Error)]
pub enum VolumeError {
    /// The pod has no UID (static pods always get one from the manifest source).
    #[error("pod has no metadata.uid")]
    NoUid,
    /// A referenced ConfigMap/Secret does not exist and the volume is not optional.
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : {kind} \"{name}\" not found")]
    NotFound {
        /// Volume name.
        volume: String,
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// An item's key is missing from the object.
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : {message}")]
    MissingKey {
        /// Volume name.
        volume: String,
        /// Kubelet's message.
        message: String,
    },
    /// The volume spec is invalid (mode, path, field).
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : {reason}")]
    Invalid {
        /// Volume name.
        volume: String,
        /// What is wrong.
        reason: String,
    },
    /// A hostPath type check failed.
    #[error(
        "MountVolume.SetUp failed for volume \"{volume}\" : hostPath type check failed: {message}"
    )]
    HostPathType {
        /// Volume name.
        volume: String,
        /// What was found.
        message: String,
    },
    /// A `persistentVolumeClaim` that does not resolve to a bound volume (the pod waits; the
    /// kubelet's populator message).
    #[error("Unable to attach or mount volumes: unmounted volumes=[{volume}]: error processing PVC {namespace}/{claim}: {source}")]
    Claim {
        /// Volume name.
        volume: String,
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        claim: String,
        /// Why.
        source: Box<pvc::ClaimError>,
    },
    /// The claim's volume cannot be mounted here (node affinity, unsupported source).
    #[error("{0}")]
    PvRefused(#[from] Box<pvc::MountRefusal>),
    /// A volume source this agent does not implement.
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : unsupported volume type: {what}")]
    Unsupported {
        /// Volume name.
        volume: String,
        /// Which source.
        what: String,
    },
    /// A volumeMount names no volume of the pod, or its subPath is invalid.
    #[error("container {container}: volumeMount {mount:?}: {reason}")]
    BadMount {
        /// Container name.
        container: String,
        /// Mount name.
        mount: String,
        /// What is wrong.
        reason: String,
    },
    /// An invalid payload path.
    #[error("invalid path: {0}")]
    InvalidPath(String),
    /// A payload the atomic writer refuses.
    #[error("invalid path: {0}")]
    Payload(#[from] atomic::PathError),
    /// An `items[].path` (or projected file path) of a volume is invalid.
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : {source}")]
    ItemPath {
        /// Volume name.
        volume: String,
        /// What is wrong with the path.
        source: atomic::PathError,
    },
    /// A volumeMount's subPath is invalid.
    #[error("container {container}: volumeMount {mount:?}: {source}")]
    SubPath {
        /// Container name.
        container: String,
        /// Mount name.
        mount: String,
        /// What is wrong.
        source: SubPathError,
    },
    /// A mount or unmount failed.
    #[error("{}: {message}", path.display())]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Error.
        message: String,
    },
    /// A filesystem operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Operation.
        what: String,
        /// Error.
        source: std::io::Error,
    },
}

impl VolumeError {
    /// The event reason the worker reports for this error.
    pub const REASON: &'static str = "FailedMount";
}

/// What kind of volume, with what its refresh needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// emptyDir (memory-backed when `memory`).
    EmptyDir {
        /// tmpfs.
        memory: bool,
    },
    /// hostPath: the path is on the host.
    HostPath,
    /// configMap.
    ConfigMap,
    /// secret (tmpfs).
    Secret,
    /// downwardAPI (tmpfs).
    DownwardApi,
    /// projected (tmpfs).
    Projected,
    /// A `local` PersistentVolume bind-mounted into the pod's volume directory.
    Local,
}

impl VolumeKind {
    /// The kubelet plugin directory name (`kubernetes.io~empty-dir`, ...); None for hostPath.
    pub fn plugin_dir(&self) -> Option<&'static str> {
        Some(match self {
            VolumeKind::EmptyDir { .. } => "kubernetes.io~empty-dir",
            VolumeKind::HostPath => return None,
            VolumeKind::ConfigMap => "kubernetes.io~configmap",
            VolumeKind::Secret => "kubernetes.io~secret",
            VolumeKind::DownwardApi => "kubernetes.io~downward-api",
            VolumeKind::Projected => "kubernetes.io~projected",
            VolumeKind::Local => "kubernetes.io~local-volume",
        })
    }

    /// API-data volumes: their contents come from objects, are refreshed, and are always
    /// mounted read-only into containers (as the kubelet does).
    pub fn is_api_data(&self) -> bool {
        matches!(
            self,
            VolumeKind::ConfigMap
                | VolumeKind::Secret
                | VolumeKind::DownwardApi
                | VolumeKind::Projected
        )
    }

    fn memory_backed(&self) -> bool {
        matches!(
            self,
            VolumeKind::EmptyDir { memory: true }
                | VolumeKind::Secret
                | VolumeKind::DownwardApi
                | VolumeKind::Projected
        )
    }
}

/// One set-up volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVolume {
    /// Kind.
    pub kind: VolumeKind,
    /// Host path that containers bind-mount.
    pub path: PathBuf,
    /// Mounted read-only into every container (a read-only claim).
    pub readonly: bool,
}

/// The set-up volumes of a pod, by volume name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodVolumes {
    /// Pod UID.
    pub uid: String,
    /// Agent root directory; subPath bind mounts live under
    /// `<root>/pods/<uid>/volume-subpaths`.
    pub root: PathBuf,
    /// Volumes by name.
    pub volumes: BTreeMap<String, PodVolume>,
}

/// Mount propagation of one volumeMount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// `None` (default): `rprivate`.
    #[default]
    Private,
    /// `HostToContainer`: `rslave`.
    HostToContainer,
    /// `Bidirectional` (privileged containers only): `rshared`.
    Bidirectional,
}

impl Propagation {
    /// The OCI mount option.
    pub fn oci_option(self) -> &'static str {
        match self {
            Propagation::Private => "rprivate",
            Propagation::HostToContainer => "rslave",
            Propagation::Bidirectional => "rshared",
        }
    }
}

/// One bind mount for the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Host path.
    pub source: PathBuf,
    /// Path in the container (`mountPath`).
    pub destination: String,
    /// Read-only bind.
    pub readonly: bool,
    /// Propagation.
    pub propagation: Propagation,
}

impl MountSpec {
    /// OCI mount options: `rbind`, `ro`/`rw`, propagation.
    pub fn oci_options(&self) -> Vec<String> {
        vec![
            "rbind".into(),
            if self.readonly { "ro" } else { "rw" }.into(),
            self.propagation.oci_option().into(),
        ]
    }
}

/// The kind of a volume spec, or an error naming an unsupported source.
pub fn volume_kind(v: &Volume) -> Result<VolumeKind, VolumeError> {
    if let Some(e) = &v.empty_dir {
        let memory = match e.medium.as_deref().unwrap_or("") {
            "" => false,
            "Memory" => true,
            m => {
                return Err(VolumeError::Invalid {
                    volume: v.name.clone(),
                    reason: format!("emptyDir medium {m:?} is not supported (\"\" or \"Memory\")"),
                })
            }
        };
        return Ok(VolumeKind::EmptyDir { memory });
    }
    if v.host_path.is_some() {
        return Ok(VolumeKind::HostPath);
    }
    if v.config_map.is_some() {
        return Ok(VolumeKind::ConfigMap);
    }
    if v.secret.is_some() {
        return Ok(VolumeKind::Secret);
    }
    if v.downward_api.is_some() {
        return Ok(VolumeKind::DownwardApi);
    }
    if v.projected.is_some() {
        return Ok(VolumeKind::Projected);
    }
    let value = serde_json::to_value(v).unwrap_or_default();
    let what = value
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        .unwrap_or_else(|| "none given".into());
    Err(VolumeError::Unsupported {
        volume: v.name.clone(),
        what,
    })
}

/// A volume name usable as a directory name (DNS-1123 label like the API requires).
fn valid_volume_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// The payload of an API-data volume.
fn payload(
    v: &Volume,
    kind: &VolumeKind,
    ctx: &PodContext,
) -> Result<atomic::Payload, VolumeError> {
    match kind {
        VolumeKind::ConfigMap => v
            .config_map
            .as_ref()
            .map_or(Ok(atomic::Payload::new()), |s| {
                projection::config_map(&v.name, s, ctx)
            }),
        VolumeKind::Secret => v.secret.as_ref().map_or(Ok(atomic::Payload::new()), |s| {
            projection::secret(&v.name, s, ctx)
        }),
        VolumeKind::DownwardApi => v
            .downward_api
            .as_ref()
            .map_or(Ok(atomic::Payload::new()), |s| {
                projection::downward_api(&v.name, s, ctx)
            }),
        VolumeKind::Projected => v
            .projected
            .as_ref()
            .map_or(Ok(atomic::Payload::new()), |s| {
                projection::projected(&v.name, s, ctx)
            }),
        _ => Ok(atomic::Payload::new()),
    }
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| VolumeError::Io {
        path,
        what,
        source: e,
    }
}

fn pod_volumes_spec(pod: &Pod) -> Vec<Volume> {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
}

/// Validates every volume and computes every payload without touching the filesystem, so a
/// pod with one bad volume gets no half-made volumes.
/// One volume of the plan: its spec, where it goes, its payload (API-data volumes) and the
/// resolved claim (`persistentVolumeClaim` volumes).
struct Planned {
    v: Volume,
    pv: PodVolume,
    payload: atomic::Payload,
    claim: Option<pvc::ResolvedClaim>,
}

/// Resolves a `persistentVolumeClaim` volume to its bound PV, checked against this node.
fn plan_claim(
    v: &Volume,
    src: &k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource,
    ctx: &PodContext,
) -> Result<pvc::ResolvedClaim, VolumeError> {
    let ns = ctx
        .pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let pv = pvc::resolve_claim(&ns, src, ctx.objects).map_err(|source| VolumeError::Claim {
        volume: v.name.clone(),
        namespace: ns.clone(),
        claim: src.claim_name.clone(),
        source: Box::new(source),
    })?;
    let standalone;
    let node = match &ctx.node {
        Some(n) => n,
        None => {
            standalone =
                pvc::standalone_node(ctx.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()));
            &standalone
        }
    };
    let r = pvc::mountable(&src.claim_name, &pv, node, src.read_only.unwrap_or(false))
        .map_err(Box::new)?;
    let path = match &r.source {
        pvc::PvSource::Local { path } | pvc::PvSource::HostPath { path, .. } => path,
    };
    if !path.is_absolute() {
        return Err(VolumeError::Invalid {
            volume: v.name.clone(),
            reason: format!(
                "persistent volume {:?}: path {:?} must be an absolute path",
                r.pv,
                path.display()
            ),
        });
    }
    Ok(r)
}

fn plan(host: &VolumeHost, ctx: &PodContext) -> Result<Vec<Planned>, VolumeError> {
    let uid = ctx
        .pod
        .metadata
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or(VolumeError::NoUid)?;
    if uid.contains('/') || uid.starts_with('.') {
        return Err(VolumeError::InvalidPath(format!("pod uid {uid:?}")));
    }
    let base = host.volumes_dir(uid);
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for v in pod_volumes_spec(ctx.pod) {
        if !valid_volume_name(&v.name) {
            return Err(VolumeError::Invalid {
                volume: v.name.clone(),
                reason: "volume name must be a DNS-1123 label".into(),
            });
        }
        if !seen.insert(v.name.clone()) {
            return Err(VolumeError::Invalid {
                volume: v.name.clone(),
                reason: "duplicate volume name".into(),
            });
        }
        if let Some(src) = &v.persistent_volume_claim {
            let r = plan_claim(&v, src, ctx)?;
            let (kind, path) = match &r.source {
                pvc::PvSource::Local { .. } => (
                    VolumeKind::Local,
                    base.join(VolumeKind::Local.plugin_dir().unwrap_or("unknown"))
                        .join(&v.name),
                ),
                pvc::PvSource::HostPath { path, .. } => (VolumeKind::HostPath, path.clone()),
            };
            out.push(Planned {
                pv: PodVolume {
                    kind,
                    path,
                    readonly: r.readonly,
                },
                v,
                payload: atomic::Payload::new(),
                claim: Some(r),
            });
            continue;
        }
        let kind = volume_kind(&v)?;
        let path = match (&kind, &v.host_path) {
            (VolumeKind::HostPath, Some(h)) => {
                if !Path::new(&h.path).is_absolute() {
                    return Err(VolumeError::Invalid {
                        volume: v.name.clone(),
                        reason: format!("hostPath.path {:?} must be an absolute path", h.path),
                    });
                }
                PathBuf::from(&h.path)
            }
            _ => base
                .join(kind.plugin_dir().unwrap_or("unknown"))
                .join(&v.name),
        };
        let p = payload(&v, &kind, ctx)?;
        out.push(Planned {
            v,
            pv: PodVolume {
                kind,
                path,
                readonly: false,
            },
            payload: p,
            claim: None,
        });
    }
    Ok(out)
}

fn ownership_error(volume: &str, e: ownership::OwnershipError) -> VolumeError {
    VolumeError::Invalid {
        volume: volume.to_string(),
        reason: e.to_string(),
    }
}

/// Writes an API-data volume's payload. With an fsGroup, file modes get the group's read bits
/// first (so an unchanged payload compares equal to what is on disk), and the whole volume is
/// re-owned before `..data` is swapped, as the kubelet's secret/configMap/downwardAPI/projected
/// plugins do through `SetVolumeOwnership`. They pass no fsGroupChangePolicy (a policy that
/// skipped the walk would leave each update's new files without the group), so neither does
/// this: every write walks the volume.
fn write_api_data(
    volume: &str,
    path: &Path,
    mut p: atomic::Payload,
    fs_group: Option<ownership::FsGroup>,
) -> Result<bool, VolumeError> {
    let Some(fs) = fs_group else {
        return atomic::write(path, &p);
    };
    for f in p.values_mut() {
        f.mode = ownership::adjusted_mode(f.mode, false, true) & 0o777;
    }
    let fs = ownership::FsGroup {
        policy: ownership::ChangePolicy::Always,
        ..fs
    };
    atomic::write_with(path, &p, &|| {
        ownership::set_volume_ownership(path, fs, true)
            .map(|_| ())
            .map_err(|e| ownership_error(volume, e))
    })
}

/// emptyDir `sizeLimit` in bytes (tmpfs `size=`).
fn size_limit(v: &Volume) -> Result<Option<u64>, VolumeError> {
    let Some(q) = v.empty_dir.as_ref().and_then(|e| e.size_limit.as_ref()) else {
        return Ok(None);
    };
    let n = quantity::parse(&q.0).map_err(|e| VolumeError::Invalid {
        volume: v.name.clone(),
        reason: format!("emptyDir.sizeLimit {:?}: {e}", q.0),
    })?;
    Ok(u64::try_from(n.value()).ok().filter(|s| *s > 0))
}

/// Creates every volume of the pod (see the module docs). Nothing is created when any volume
/// is invalid or names a missing non-optional object.
pub fn setup_pod_volumes(host: &VolumeHost, ctx: &PodContext) -> Result<PodVolumes, VolumeError> {
    let planned = plan(host, ctx)?;
    let uid = ctx.pod.metadata.uid.clone().unwrap_or_default();
    for Planned { v, pv, claim, .. } in &planned {
        if let Some(c) = claim {
            match &c.source {
                pvc::PvSource::HostPath { path, type_ } => hostpath::check(&v.name, path, type_)?,
                pvc::PvSource::Local { path } => local::check(&v.name, &c.pv, path)?,
            }
        } else if pv.kind == VolumeKind::HostPath {
            let t = v
                .host_path
                .as_ref()
                .and_then(|h| h.type_.clone())
                .unwrap_or_default();
            hostpath::check(&v.name, &pv.path, &t)?;
        } else {
            size_limit(v)?;
        }
    }
    let mut out = PodVolumes {
        uid,
        root: host.root.clone(),
        volumes: BTreeMap::new(),
    };
    let fs_group = ownership::FsGroup::of(ctx.pod);
    for Planned {
        v,
        pv,
        payload: p,
        claim,
    } in planned
    {
        if let Some(c) = &claim {
            if let pvc::PvSource::Local { path } = &c.source {
                local::set_up(&v.name, path, &pv.path, c.readonly, fs_group)?;
            }
            // hostPath volumes get no fsGroup ownership, as with the kubelet.
            out.volumes.insert(v.name.clone(), pv);
            continue;
        }
        if pv.kind != VolumeKind::HostPath {
            // A volume made now (not one kept from before an agent restart) gets the fsGroup
            // walk, as the kubelet's emptyDir SetUp does once: it is empty, so nothing of the
            // pod's is walked.
            let mut fresh = !pv.path.exists();
            std::fs::create_dir_all(&pv.path).map_err(io(&pv.path, "creating volume directory"))?;
            if pv.kind.memory_backed() {
                fresh |= host.mount_tmpfs && !mount::is_mount_point(&pv.path);
                if host.mount_tmpfs {
                    mount::mount_tmpfs(&pv.path, size_limit(&v)?)?;
                } else {
                    warn!(volume = %v.name, "memory-backed volume is a plain directory (tmpfs disabled)");
                }
            }
            if !pv.kind.is_api_data() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&pv.path, std::fs::Permissions::from_mode(0o777))
                    .map_err(io(&pv.path, "chmod"))?;
                if let Some(fs) = fs_group.filter(|_| fresh) {
                    ownership::set_volume_ownership(&pv.path, fs, false)
                        .map_err(|e| ownership_error(&v.name, e))?;
                }
            }
        }
        if pv.kind.is_api_data() {
            let changed = write_api_data(&v.name, &pv.path, p, fs_group)?;
            debug!(volume = %v.name, changed, "volume contents written");
        }
        out.volumes.insert(v.name.clone(), pv);
    }
    Ok(out)
}

/// Rewrites the contents of the pod's configMap, secret, downwardAPI and projected volumes from
/// the current objects; returns whether any volume changed. Every volume is attempted; when one
/// fails (say its ConfigMap was deleted) its old contents stay, the others are still updated,
/// and the first error is returned.
pub fn refresh_pod_volumes(
    host: &VolumeHost,
    ctx: &PodContext,
    vols: &PodVolumes,
) -> Result<bool, VolumeError> {
    let _ = host;
    let mut changed = false;
    let mut first_err = None;
    for v in pod_volumes_spec(ctx.pod) {
        let Some(pv) = vols.volumes.get(&v.name) else {
            continue;
        };
        if !pv.kind.is_api_data() {
            continue;
        }
        let fs_group = ownership::FsGroup::of(ctx.pod);
        match payload(&v, &pv.kind, ctx)
            .and_then(|p| write_api_data(&v.name, &pv.path, p, fs_group))
        {
            Ok(c) => changed |= c,
            Err(e) => {
                warn!(volume = %v.name, error = %e, "volume refresh failed; keeping the old contents");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(changed),
    }
}

/// Unmounts and removes the pod's subPath mounts (`<root>/pods/<uid>/volume-subpaths`), then
/// `<root>/pods/<uid>/volumes` (hostPath sources are never touched). Succeeds when they are
/// already gone.
pub fn teardown_pod_volumes(host: &VolumeHost, uid: &str) -> Result<(), VolumeError> {
    if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
        return Err(VolumeError::InvalidPath(format!("pod uid {uid:?}")));
    }
    subpath::clean_pod(&host.root, uid).map_err(|e| VolumeError::Mount {
        path: subpath::subpaths_dir(&host.root, uid),
        message: e.to_string(),
    })?;
    let dir = host.volumes_dir(uid);
    mount::unmount_all(&dir)?;
    let left = mount::mounts_under(&dir);
    if !left.is_empty() {
        return Err(VolumeError::Mount {
            path: left[0].clone(),
            message: "still mounted; not removing the volume directory".into(),
        });
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::Io {
            path: dir,
            what: "removing".into(),
            source: e,
        }),
    }
}

/// Why a volumeMount's subPath is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubPathError {
    /// The subPath is absolute.
    #[error("subPath {0:?} must be a relative path")]
    Absolute(String),
    /// The subPath has a `..` element.
    #[error("subPath {0:?} must not contain '..'")]
    ParentDir(String),
    /// A `$(VAR)` of a subPathExpr names a variable the container does not have (or has
    /// empty); the kubelet's `ExpandContainerVolumeMounts` message.
    #[error("subPathExpr {expr:?}: missing value for {}", vars.join(", "))]
    MissingValue {
        /// The subPathExpr as written.
        expr: String,
        /// The variables without a value, sorted.
        vars: Vec<String>,
    },
}

/// Expands one subPathExpr with the container's environment as the kubelet does
/// (`ExpandContainerVolumeMounts`): `$(VAR)` takes VAR's value, `$$` is a `$`; a reference to
/// a variable that is not set or is empty is an error naming it (the kubelet refuses to start
/// the container rather than mount a different directory). The result still goes through the
/// subPath checks (relative, no `..`).
pub fn expand_sub_path_expr(expr: &str, env: &[(String, String)]) -> Result<String, SubPathError> {
    let missing = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let out = crate::model::env::expand(expr, &|k| {
        let v = env
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty());
        if v.is_none() {
            missing.borrow_mut().insert(k.to_string());
        }
        Some(v.unwrap_or_default())
    });
    let missing = missing.into_inner();
    if !missing.is_empty() {
        return Err(SubPathError::MissingValue {
            expr: expr.to_string(),
            vars: missing.into_iter().collect(),
        });
    }
    Ok(out)
}

/// The container with every `subPathExpr` expanded into `subPath` (see
/// [`expand_sub_path_expr`]), ready for [`mounts_for_container`]. `env` is the container's
/// resolved environment.
pub fn expand_sub_path_exprs(
    c: &Container,
    env: &[(String, String)],
) -> Result<Container, VolumeError> {
    let mut c = c.clone();
    let name = c.name.clone();
    for m in c.volume_mounts.iter_mut().flatten() {
        let Some(expr) = m.sub_path_expr.take().filter(|e| !e.is_empty()) else {
            continue;
        };
        let sp = expand_sub_path_expr(&expr, env).map_err(|source| VolumeError::SubPath {
            container: name.clone(),
            mount: m.name.clone(),
            source,
        })?;
        check_sub_path(&sp).map_err(|source| VolumeError::SubPath {
            container: name.clone(),
            mount: m.name.clone(),
            source,
        })?;
        m.sub_path = Some(sp);
    }
    Ok(c)
}

/// Validates a subPath: relative, no `..` element.
fn check_sub_path(p: &str) -> Result<(), SubPathError> {
    if Path::new(p).is_absolute() {
        return Err(SubPathError::Absolute(p.to_string()));
    }
    if Path::new(p).components().any(|c| c == Component::ParentDir) {
        return Err(SubPathError::ParentDir(p.to_string()));
    }
    Ok(())
}

/// The container's volumeMounts as bind mounts (see [`MountSpec`]). Effectful for subPath
/// mounts, which it makes (see [`subpath`]); the container's earlier subPath mounts are
/// removed first.
///
/// - API-data volumes are always read-only, like the kubelet mounts them.
/// - `subPath` is resolved inside the volume fd by fd (symlinks may not lead outside it, a
///   symlink swapped in meanwhile is an error), bind-mounted onto
///   `<root>/pods/<uid>/volume-subpaths/<volume>/<container>/<index>`, and that path is the
///   mount's source; for emptyDir and hostPath a missing subPath directory is created inside
///   the volume. A `subPathExpr` must have been expanded first ([`expand_sub_path_exprs`]).
/// - `mountPropagation: Bidirectional` needs a privileged container.
pub fn mounts_for_container(
    vols: &PodVolumes,
    c: &Container,
) -> Result<Vec<MountSpec>, VolumeError> {
    let mut out = Vec::new();
    subpath::clean_container(&vols.root, &vols.uid, &c.name).map_err(|e| VolumeError::Mount {
        path: subpath::subpaths_dir(&vols.root, &vols.uid),
        message: e.to_string(),
    })?;
    for (index, m) in c.volume_mounts.iter().flatten().enumerate() {
        let bad = |reason: String| VolumeError::BadMount {
            container: c.name.clone(),
            mount: m.name.clone(),
            reason,
        };
        let v = vols
            .volumes
            .get(&m.name)
            .ok_or_else(|| bad(format!("no volume named {:?} in the pod", m.name)))?;
        if !m.mount_path.starts_with('/') {
            return Err(bad(format!(
                "mountPath {:?} must be absolute",
                m.mount_path
            )));
        }
        if m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(bad(
                "subPathExpr must be expanded with the container's environment first".into(),
            ));
        }
        let propagation = match m.mount_propagation.as_deref().unwrap_or("None") {
            "None" | "" => Propagation::Private,
            "HostToContainer" => Propagation::HostToContainer,
            "Bidirectional" => {
                let privileged = c
                    .security_context
                    .as_ref()
                    .and_then(|s| s.privileged)
                    .unwrap_or(false);
                if !privileged {
                    return Err(bad("Bidirectional mount propagation is available only to privileged containers".into()));
                }
                Propagation::Bidirectional
            }
            p => return Err(bad(format!("unsupported mountPropagation {p:?}"))),
        };
        let mut source = v.path.clone();
        if let Some(sp) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            check_sub_path(sp).map_err(|source| VolumeError::SubPath {
                container: c.name.clone(),
                mount: m.name.clone(),
                source,
            })?;
            source = subpath::prepare(&subpath::SubPathMount {
                root: &vols.root,
                uid: &vols.uid,
                volume: &m.name,
                volume_path: &v.path,
                create: matches!(
                    v.kind,
                    VolumeKind::EmptyDir { .. } | VolumeKind::HostPath | VolumeKind::Local
                ),
                container: &c.name,
                index,
                sub_path: sp,
            })
            .map_err(|e| bad(e.to_string()))?;
        }
        out.push(MountSpec {
            source,
            destination: m.mount_path.clone(),
            readonly: m.read_only.unwrap_or(false) || v.kind.is_api_data() || v.readonly,
            propagation,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(y: &str) -> Pod {
        serde_yaml::from_str(y).unwrap()
    }

    const POD: &str = r#"
metadata: {name: web, namespace: default, uid: uid-1}
spec:
  containers:
  - name: c
    image: busybox
    volumeMounts:
    - {name: cache, mountPath: /cache}
    - {name: cfg, mountPath: /etc/cfg}
    - {name: cfg, mountPath: /etc/greeting, subPath: greeting}
    - {name: host, mountPath: /host, readOnly: true, mountPropagation: HostToContainer}
  volumes:
  - {name: cache, emptyDir: {}}
  - {name: cfg, configMap: {name: cfg}}
  - {name: host, hostPath: {path: HOST, type: Directory}}
"#;

    fn objs() -> MapObjects {
        let mut o = MapObjects::default();
        o.config_maps.insert(
            ("default".into(), "cfg".into()),
            serde_yaml::from_str("metadata: {name: cfg}\ndata: {greeting: hi}").unwrap(),
        );
        o
    }

    #[test]
    fn layout_mounts_refresh_teardown() {
        let root = tempfile::tempdir().unwrap();
        let hostdir = tempfile::tempdir().unwrap();
        let host = VolumeHost {
            root: root.path().into(),
            mount_tmpfs: false,
        };
        let p = pod(&POD.replace("HOST", hostdir.path().to_str().unwrap()));
        let mut o = objs();
        let vols = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap();
        let base = root.path().join("pods/uid-1/volumes");
        assert_eq!(
            vols.volumes["cache"].path,
            base.join("kubernetes.io~empty-dir/cache")
        );
        assert_eq!(
            vols.volumes["cfg"].path,
            base.join("kubernetes.io~configmap/cfg")
        );
        assert_eq!(vols.volumes["host"].path, hostdir.path());
        assert_eq!(
            std::fs::read_to_string(base.join("kubernetes.io~configmap/cfg/greeting")).unwrap(),
            "hi"
        );
        let mut c = p.spec.as_ref().unwrap().containers[0].clone();
        let root_user = nix::unistd::geteuid().is_root();
        if !root_user {
            // subPath mounts are bind mounts: without privileges, check the rest only.
            c.volume_mounts.as_mut().unwrap()[2].sub_path = None;
        }
        let ms = mounts_for_container(&vols, &c).unwrap();
        assert_eq!(ms.len(), 4);
        assert!(!ms[0].readonly);
        assert!(ms[1].readonly, "configMap volumes are read-only");
        if root_user {
            // The configMap key (a symlink into ..data) is bind-mounted onto an agent path.
            let want = root.path().join("pods/uid-1/volume-subpaths/cfg/c/2");
            assert_eq!(ms[2].source, want);
            assert!(ms[2].readonly);
            assert!(mount::is_mount_point(&want));
            assert_eq!(std::fs::read_to_string(&want).unwrap(), "hi");
            // A second start replaces the mount instead of stacking another.
            mounts_for_container(&vols, &c).unwrap();
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let n = mount::mount_points(&text)
                .iter()
                .filter(|m| **m == want)
                .count();
            assert_eq!(n, 1);
        }
        assert_eq!(ms[3].propagation, Propagation::HostToContainer);
        assert_eq!(ms[3].oci_options(), ["rbind", "ro", "rslave"]);
        // Refresh: unchanged, then changed.
        assert!(!refresh_pod_volumes(&host, &PodContext::new(&p, &o), &vols).unwrap());
        o.config_maps.insert(
            ("default".into(), "cfg".into()),
            serde_yaml::from_str("metadata: {name: cfg}\ndata: {greeting: hello}").unwrap(),
        );
        assert!(refresh_pod_volumes(&host, &PodContext::new(&p, &o), &vols).unwrap());
        assert_eq!(
            std::fs::read_to_string(base.join("kubernetes.io~configmap/cfg/greeting")).unwrap(),
            "hello"
        );
        // Deleted ConfigMap: error, old contents kept.
        o.config_maps.clear();
        assert!(refresh_pod_volumes(&host, &PodContext::new(&p, &o), &vols).is_err());
        assert_eq!(
            std::fs::read_to_string(base.join("kubernetes.io~configmap/cfg/greeting")).unwrap(),
            "hello"
        );
        // Setup again (agent restart) keeps emptyDir contents.
        std::fs::write(base.join("kubernetes.io~empty-dir/cache/f"), "x").unwrap();
        let o = objs();
        setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap();
        assert!(base.join("kubernetes.io~empty-dir/cache/f").exists());
        teardown_pod_volumes(&host, "uid-1").unwrap();
        assert!(!base.exists());
        assert!(!root.path().join("pods/uid-1/volume-subpaths").exists());
        assert!(hostdir.path().exists());
        teardown_pod_volumes(&host, "uid-1").unwrap();
    }

    #[test]
    fn nothing_created_when_a_volume_fails() {
        let root = tempfile::tempdir().unwrap();
        let host = VolumeHost {
            root: root.path().into(),
            mount_tmpfs: false,
        };
        let p = pod(&POD.replace("HOST", "/nonexistent/hako-test"));
        let o = objs();
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap_err();
        assert!(e.to_string().contains("hostPath type check failed"), "{e}");
        assert!(!root.path().join("pods").exists());
        let p = pod(&POD.replace("HOST", "/tmp"));
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &MapObjects::default())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.SetUp failed for volume \"cfg\" : configmap \"cfg\" not found"
        );
        assert!(!root.path().join("pods").exists());
    }

    #[test]
    fn mount_errors() {
        let vols = PodVolumes {
            uid: "u".into(),
            root: "/nonexistent/hako-root".into(),
            volumes: [(
                "v".to_string(),
                PodVolume {
                    kind: VolumeKind::ConfigMap,
                    path: "/tmp".into(),
                    readonly: false,
                },
            )]
            .into(),
        };
        let c = |m: &str| -> Container {
            serde_yaml::from_str(&format!("{{name: c, volumeMounts: [{m}]}}")).unwrap()
        };
        for (m, want) in [
            ("{name: x, mountPath: /a}", "no volume named"),
            ("{name: v, mountPath: a}", "must be absolute"),
            (
                "{name: v, mountPath: /a, subPath: ../etc}",
                "must not contain '..'",
            ),
            ("{name: v, mountPath: /a, subPath: /etc}", "relative"),
            (
                "{name: v, mountPath: /a, mountPropagation: Bidirectional}",
                "privileged",
            ),
            (
                "{name: v, mountPath: /a, mountPropagation: Sideways}",
                "unsupported",
            ),
            (
                "{name: v, mountPath: /a, subPathExpr: $(X)}",
                "subPathExpr must be expanded",
            ),
        ] {
            let e = mounts_for_container(&vols, &c(m)).unwrap_err().to_string();
            assert!(e.contains(want), "{m}: {e}");
        }
    }

    #[test]
    fn kinds_and_names() {
        let v: Volume = serde_yaml::from_str("{name: x, nfs: {server: s, path: /}}").unwrap();
        assert!(volume_kind(&v).unwrap_err().to_string().contains("nfs"));
        let v: Volume = serde_yaml::from_str("{name: x, emptyDir: {medium: HugePages}}").unwrap();
        assert!(volume_kind(&v).is_err());
        assert!(valid_volume_name("a-1"));
        assert!(!valid_volume_name("A") && !valid_volume_name("../x") && !valid_volume_name(""));
    }

    #[test]
    fn sub_path_expr_expansion() {
        let env: Vec<(String, String)> = [("POD_NAME", "foo"), ("EMPTY", ""), ("UP", "..")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (expr, want) in [
            ("$(POD_NAME)", Ok("foo")),
            ("logs/$(POD_NAME)/x", Ok("logs/foo/x")),
            ("$$(POD_NAME)", Ok("$(POD_NAME)")),
            ("plain", Ok("plain")),
            ("$(NOPE)", Err("missing value for NOPE")),
            ("$(EMPTY)/$(NOPE)", Err("missing value for EMPTY, NOPE")),
        ] {
            let got = expand_sub_path_expr(expr, &env).map_err(|e| e.to_string());
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w), "{expr}"),
                Err(w) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(w)),
                    "{expr}: {got:?}"
                ),
            }
        }
        let c = |expr: &str| -> Container {
            serde_yaml::from_str(&format!(
                "{{name: c, volumeMounts: [{{name: v, mountPath: /a, subPathExpr: '{expr}'}}, {{name: v, mountPath: /b}}]}}"
            ))
            .unwrap()
        };
        let out = expand_sub_path_exprs(&c("$(POD_NAME)"), &env).unwrap();
        let m = out.volume_mounts.as_ref().unwrap();
        assert_eq!(m[0].sub_path.as_deref(), Some("foo"));
        assert_eq!(m[0].sub_path_expr, None);
        assert_eq!(m[1].sub_path, None);
        // The expanded value goes through the subPath checks.
        for (expr, want) in [
            ("/$(POD_NAME)", "must be a relative path"),
            ("$(UP)", "must not contain '..'"),
            ("a/$(UP)/b", "must not contain '..'"),
            ("$(NOPE)", "missing value for NOPE"),
        ] {
            let e = expand_sub_path_exprs(&c(expr), &env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.starts_with("container c: volumeMount \"v\""),
                "{expr}: {e}"
            );
        }
    }

    /// fsGroup: group ownership, setgid directories and group read bits on API-data volumes
    /// (also after an update), a group-writable setgid emptyDir; root only (chown).
    #[test]
    fn fs_group_ownership() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let host = VolumeHost {
            root: root.path().into(),
            mount_tmpfs: false,
        };
        let p = pod(r#"
metadata: {name: web, namespace: default, uid: uid-fs}
spec:
  securityContext: {runAsUser: 1000, fsGroup: 4242}
  containers: [{name: c, image: busybox}]
  volumes:
  - {name: sec, secret: {secretName: s, defaultMode: 0o440}}
  - {name: cfg, configMap: {name: cfg, items: [{key: greeting, path: sub/g, mode: 0o400}]}}
  - {name: scratch, emptyDir: {}}
"#);
        let mut o = objs();
        o.secrets.insert(
            ("default".into(), "s".into()),
            serde_yaml::from_str("metadata: {name: s}\ndata: {data-1: dmFsdWUtMQ==}").unwrap(),
        );
        let vols = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap();
        let md = |p: PathBuf| std::fs::metadata(p).unwrap();
        let sec = vols.volumes["sec"].path.clone();
        let f = md(sec.join("data-1"));
        assert_eq!((f.gid(), f.mode() & 0o7777), (4242, 0o440));
        let g = md(vols.volumes["cfg"].path.join("sub/g"));
        assert_eq!(
            (g.gid(), g.mode() & 0o7777),
            (4242, 0o440),
            "item mode 0400 + group read"
        );
        let d = md(vols.volumes["cfg"].path.join("sub"));
        assert_eq!(d.mode() & 0o2000, 0o2000, "setgid directory");
        let e = md(vols.volumes["scratch"].path.clone());
        assert_eq!((e.gid(), e.mode() & 0o7777), (4242, 0o2777));
        // Unchanged: no rewrite. Changed: the new files have the group too.
        assert!(!refresh_pod_volumes(&host, &PodContext::new(&p, &o), &vols).unwrap());
        o.secrets.insert(
            ("default".into(), "s".into()),
            serde_yaml::from_str("metadata: {name: s}\ndata: {data-1: dmFsdWUtMg==}").unwrap(),
        );
        assert!(refresh_pod_volumes(&host, &PodContext::new(&p, &o), &vols).unwrap());
        let f = md(sec.join("data-1"));
        assert_eq!((f.gid(), f.mode() & 0o7777), (4242, 0o440));
        assert_eq!(
            std::fs::read_to_string(sec.join("data-1")).unwrap(),
            "value-2"
        );
        teardown_pod_volumes(&host, "uid-fs").unwrap();
    }

    /// A claim bound to a local PV: bind-mounted, read-only where asked, torn down without
    /// touching the data; a PV for another node makes nothing (root only: bind mounts).
    #[test]
    fn claims_mount_local_volumes() {
        use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let disk = tempfile::tempdir().unwrap();
        std::fs::write(disk.path().join("kept"), "1").unwrap();
        let host = VolumeHost {
            root: root.path().into(),
            mount_tmpfs: false,
        };
        let p = pod(r#"
metadata: {name: web, namespace: default, uid: uid-pv}
spec:
  containers:
  - name: c
    image: busybox
    volumeMounts: [{name: data, mountPath: /data}, {name: ro, mountPath: /ro}]
  volumes:
  - {name: data, persistentVolumeClaim: {claimName: data}}
  - {name: ro, persistentVolumeClaim: {claimName: data, readOnly: true}}
"#);
        let mut o = MapObjects::default();
        let claim: PersistentVolumeClaim = serde_yaml::from_str(
            "metadata: {name: data, namespace: default}\nspec: {volumeName: pv1}\nstatus: {phase: Bound}",
        )
        .unwrap();
        o.claims.insert(("default".into(), "data".into()), claim);
        let pv = |node: &str| -> PersistentVolume {
            serde_yaml::from_str(&format!(
                "metadata: {{name: pv1}}\nspec: {{local: {{path: '{}'}}, claimRef: {{namespace: default, name: data}}, nodeAffinity: {{required: {{nodeSelectorTerms: [{{matchFields: [{{key: metadata.name, operator: In, values: [{node}]}}]}}]}}}}}}",
                disk.path().display()
            ))
            .unwrap()
        };
        let node: Node = serde_yaml::from_str("metadata: {name: n1}").unwrap();
        o.persistent_volumes.insert("pv1".into(), pv("n2"));
        let mut ctx = PodContext::new(&p, &o);
        ctx.node = Some(node.clone());
        let e = setup_pod_volumes(&host, &ctx).unwrap_err();
        assert!(e.to_string().contains("NodeAffinity check failed"), "{e}");
        assert!(!root.path().join("pods").exists(), "nothing made");
        o.persistent_volumes.insert("pv1".into(), pv("n1"));
        let mut ctx = PodContext::new(&p, &o);
        ctx.node = Some(node);
        let vols = setup_pod_volumes(&host, &ctx).unwrap();
        let data = &vols.volumes["data"];
        assert_eq!(
            data.path,
            root.path()
                .join("pods/uid-pv/volumes/kubernetes.io~local-volume/data")
        );
        assert!(!data.readonly && vols.volumes["ro"].readonly);
        assert_eq!(
            std::fs::read_to_string(data.path.join("kept")).unwrap(),
            "1"
        );
        let ms = mounts_for_container(&vols, &p.spec.as_ref().unwrap().containers[0]).unwrap();
        assert_eq!(
            ms.iter().map(|m| m.readonly).collect::<Vec<_>>(),
            [false, true]
        );
        std::fs::write(data.path.join("new"), "2").unwrap();
        teardown_pod_volumes(&host, "uid-pv").unwrap();
        assert!(!root.path().join("pods/uid-pv/volumes").exists());
        assert_eq!(
            std::fs::read_to_string(disk.path().join("new")).unwrap(),
            "2"
        );
        assert!(
            disk.path().join("kept").exists(),
            "the data stays on the volume"
        );
        // An unbound claim: the populator's message, nothing made.
        let mut o2 = o.clone();
        o2.claims.clear();
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &o2)).unwrap_err();
        assert!(
            e.to_string()
                .contains("error processing PVC default/data: failed to fetch PVC"),
            "{e}"
        );
        assert!(!root.path().join("pods/uid-pv/volumes").exists());
    }

    /// A claim bound to a hostPath PV uses the host path itself after the hostPath type
    /// check; other sources are refused by name (no privileges needed).
    #[test]
    fn claims_on_host_path_and_unsupported_volumes() {
        use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
        let root = tempfile::tempdir().unwrap();
        let hostdir = tempfile::tempdir().unwrap();
        let host = VolumeHost {
            root: root.path().into(),
            mount_tmpfs: false,
        };
        let p = pod(
            "metadata: {name: web, namespace: default, uid: uid-hp}\nspec:\n  containers: [{name: c, image: busybox, volumeMounts: [{name: data, mountPath: /data}]}]\n  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]",
        );
        let objects = |source: &str| {
            let mut o = MapObjects::default();
            let claim: PersistentVolumeClaim = serde_yaml::from_str(
                "metadata: {name: data, namespace: default}\nspec: {volumeName: pv1}\nstatus: {phase: Bound}",
            )
            .unwrap();
            o.claims.insert(("default".into(), "data".into()), claim);
            let pv: PersistentVolume = serde_yaml::from_str(&format!(
                "metadata: {{name: pv1}}\nspec: {{accessModes: [ReadOnlyMany], claimRef: {{namespace: default, name: data}}, {source}}}"
            ))
            .unwrap();
            o.persistent_volumes.insert("pv1".into(), pv);
            o
        };
        let o = objects(&format!(
            "hostPath: {{path: '{}', type: Directory}}",
            hostdir.path().display()
        ));
        let vols = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap();
        let v = &vols.volumes["data"];
        assert_eq!(
            (&v.kind, v.path.as_path(), v.readonly),
            (&VolumeKind::HostPath, hostdir.path(), true),
            "ReadOnlyMany only: read-only"
        );
        let ms = mounts_for_container(&vols, &p.spec.as_ref().unwrap().containers[0]).unwrap();
        assert!(ms[0].readonly);
        let o = objects("hostPath: {path: /nonexistent/hako-pv, type: Directory}");
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap_err();
        assert!(e.to_string().contains("hostPath type check failed"), "{e}");
        let o = objects("nfs: {server: s, path: /}");
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported persistent volume type: nfs"),
            "{e}"
        );
        let o = objects("local: {path: relative/dir}");
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap_err();
        assert!(e.to_string().contains("must be an absolute path"), "{e}");
        let o = objects("local: {path: /nonexistent/hako-pv}");
        let e = setup_pod_volumes(&host, &PodContext::new(&p, &o)).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!root.path().join("pods").exists(), "nothing made");
    }

    /// A refused subPath keeps the message the mount error carried when it was a string.
    #[test]
    fn sub_path_messages_are_unchanged() {
        assert_eq!(check_sub_path("a/b"), Ok(()));
        let e = |p: &str| VolumeError::SubPath {
            container: "c".into(),
            mount: "data".into(),
            source: check_sub_path(p).unwrap_err(),
        };
        assert_eq!(
            e("/etc").to_string(),
            "container c: volumeMount \"data\": subPath \"/etc\" must be a relative path"
        );
        assert_eq!(
            e("a/../..").to_string(),
            "container c: volumeMount \"data\": subPath \"a/../..\" must not contain '..'"
        );
    }
}
