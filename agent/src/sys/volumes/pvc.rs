//! `persistentVolumeClaim` volumes (pure): the claim → bound PersistentVolume resolution of the
//! kubelet's volume manager (`getPVCExtractPV` + `getPVSpec` of the desired-state populator),
//! the PV's `nodeAffinity` check (`CheckNodeAffinity`, done before every mount), the read-only
//! rule, and which PV sources this node mounts: `local` (bind mount of an existing path) and
//! `hostPath` (the host path itself, with the hostPath type checks). Every other PV source is
//! refused with its name.
//!
//! The objects come from an [`ObjectSource`]: in cluster mode the claims and volumes the
//! apiserver source fetched by name (GET, as the Node authorizer allows), in standalone mode
//! the PersistentVolume and PersistentVolumeClaim documents of the manifest directory.

use super::ObjectSource;
use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, PersistentVolume, PersistentVolumeClaimVolumeSource,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use thiserror::Error;

/// Why a claim does not resolve to a volume this node can mount. Display texts follow the
/// kubelet's populator messages.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClaimError {
    /// The claim does not exist (or could not be read).
    #[error("failed to fetch PVC from API server: persistentvolumeclaims \"{0}\" not found")]
    ClaimNotFound(String),
    /// The claim is being deleted.
    #[error("can't start pod because PVC {namespace}/{name} is being deleted")]
    ClaimDeleting {
        /// Namespace.
        namespace: String,
        /// Claim name.
        name: String,
    },
    /// The claim is not bound to a volume yet.
    #[error("PVC {namespace}/{name} has non-bound phase ({phase:?}) or empty pvc.Spec.VolumeName ({volume:?})")]
    NotBound {
        /// Namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// `status.phase`.
        phase: String,
        /// `spec.volumeName`.
        volume: String,
    },
    /// The bound volume does not exist.
    #[error("failed to fetch PV {0:?} from API server: persistentvolumes \"{0}\" not found")]
    VolumeNotFound(String),
    /// The volume is not bound back to the claim.
    #[error("found PV object {pv:?} but it has a nil pv.Spec.ClaimRef indicating it is not yet bound to the claim")]
    NoClaimRef {
        /// PV name.
        pv: String,
    },
    /// The volume's claimRef names another claim.
    #[error("found PV object {pv:?} but its pv.Spec.ClaimRef ({claim_ref}) does not point to the claim ({claim})")]
    ClaimRefMismatch {
        /// PV name.
        pv: String,
        /// What the PV's claimRef names.
        claim_ref: String,
        /// The claim.
        claim: String,
    },
}

/// Why a resolved volume cannot be mounted on this node.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MountRefusal {
    /// The PV's `nodeAffinity` does not match this node.
    #[error("MountVolume.NodeAffinity check failed for volume \"{pv}\" : no matching NodeSelectorTerms: the volume is for nodes matching {terms}, node {node:?} does not match")]
    NodeAffinity {
        /// PV name.
        pv: String,
        /// The required terms, readable.
        terms: String,
        /// This node's name.
        node: String,
    },
    /// A PV source this node does not mount.
    #[error("MountVolume.SetUp failed for volume \"{pv}\" : unsupported persistent volume type: {what} (this node mounts local and hostPath volumes)")]
    Unsupported {
        /// PV name.
        pv: String,
        /// The source field (`nfs`, `csi`, ...).
        what: String,
    },
    /// `volumeMode: Block`.
    #[error("MountVolume.SetUp failed for volume \"{pv}\" : volumeMode Block is not supported (Filesystem only)")]
    Block {
        /// PV name.
        pv: String,
    },
}

/// What the PV gives the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PvSource {
    /// `local.path`: bind-mounted into the pod's volume directory.
    Local {
        /// The path on the node (must exist).
        path: PathBuf,
    },
    /// `hostPath`: used as is.
    HostPath {
        /// The path on the node.
        path: PathBuf,
        /// `hostPath.type` ("" when unset).
        type_: String,
    },
}

/// A claim resolved to its volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedClaim {
    /// The claim name.
    pub claim: String,
    /// The PV name.
    pub pv: String,
    /// Its source.
    pub source: PvSource,
    /// Mounted read-only: the pod volume's `readOnly`, or a PV whose only access mode is
    /// `ReadOnlyMany`.
    pub readonly: bool,
}

/// Resolves the claim of a pod volume in `namespace` to its bound PV, as the kubelet's
/// populator does: the claim must exist, not be terminating, be `Bound` with a
/// `spec.volumeName` (standalone sources, which have no binding controller, accept a claim
/// with `spec.volumeName` and no status), the PV must exist and its `claimRef` must point back
/// to the claim (by UID when both have one, by namespace/name otherwise).
pub fn resolve_claim(
    namespace: &str,
    src: &PersistentVolumeClaimVolumeSource,
    objects: &dyn ObjectSource,
) -> Result<PersistentVolume, ClaimError> {
    let name = src.claim_name.as_str();
    let claim = objects
        .persistent_volume_claim(namespace, name)
        .ok_or_else(|| ClaimError::ClaimNotFound(name.to_string()))?;
    if claim.metadata.deletion_timestamp.is_some() {
        return Err(ClaimError::ClaimDeleting {
            namespace: namespace.into(),
            name: name.into(),
        });
    }
    let phase = claim
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let volume = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    let bound = phase == "Bound" || (phase.is_empty() && objects.binds_by_volume_name());
    if !bound || volume.is_empty() {
        return Err(ClaimError::NotBound {
            namespace: namespace.into(),
            name: name.into(),
            phase,
            volume,
        });
    }
    let pv = objects
        .persistent_volume(&volume)
        .ok_or_else(|| ClaimError::VolumeNotFound(volume.clone()))?;
    let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    match claim_ref {
        None if objects.binds_by_volume_name() => {}
        None => return Err(ClaimError::NoClaimRef { pv: volume }),
        Some(r) => {
            let uid_mismatch = matches!((r.uid.as_deref(), claim.metadata.uid.as_deref()),
                (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() && a != b);
            let name_mismatch = r.name.as_deref().is_some_and(|n| n != name)
                || r.namespace
                    .as_deref()
                    .is_some_and(|n| !n.is_empty() && n != namespace);
            if uid_mismatch || name_mismatch {
                return Err(ClaimError::ClaimRefMismatch {
                    pv: volume,
                    claim_ref: format!(
                        "{}/{} uid {:?}",
                        r.namespace.as_deref().unwrap_or(""),
                        r.name.as_deref().unwrap_or(""),
                        r.uid.as_deref().unwrap_or("")
                    ),
                    claim: format!(
                        "{namespace}/{name} uid {:?}",
                        claim.metadata.uid.as_deref().unwrap_or("")
                    ),
                });
            }
        }
    }
    Ok(pv)
}

fn requirement_text(r: &NodeSelectorRequirement) -> String {
    let vals = r.values.clone().unwrap_or_default();
    if vals.is_empty() {
        format!("{} {}", r.key, r.operator)
    } else {
        format!("{} {} [{}]", r.key, r.operator, vals.join(", "))
    }
}

/// `CheckNodeAffinity`: a PV with `nodeAffinity.required` is usable only on nodes matching one
/// of its terms (requirements of a term are ANDed; an empty term matches nothing; fields match
/// `metadata.name`). A PV without node affinity is usable anywhere.
pub fn check_node_affinity(pv: &PersistentVolume, node: &Node) -> Result<(), MountRefusal> {
    let Some(required) = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    else {
        return Ok(());
    };
    if required
        .node_selector_terms
        .iter()
        .any(|t| crate::model::admit::term_matches(t, node))
    {
        return Ok(());
    }
    let terms: Vec<String> = required
        .node_selector_terms
        .iter()
        .map(|t| {
            let reqs: Vec<String> = t
                .match_expressions
                .iter()
                .flatten()
                .chain(t.match_fields.iter().flatten())
                .map(requirement_text)
                .collect();
            format!("({})", reqs.join(" and "))
        })
        .collect();
    Err(MountRefusal::NodeAffinity {
        pv: pv.metadata.name.clone().unwrap_or_default(),
        terms: if terms.is_empty() {
            "no terms".into()
        } else {
            terms.join(" or ")
        },
        node: node.metadata.name.clone().unwrap_or_default(),
    })
}

/// PV spec fields that are not a volume source.
const NOT_SOURCES: &[&str] = &[
    "accessModes",
    "capacity",
    "claimRef",
    "mountOptions",
    "nodeAffinity",
    "persistentVolumeReclaimPolicy",
    "storageClassName",
    "volumeAttributesClassName",
    "volumeMode",
];

/// The mountable source of a PV (`local` or `hostPath`), its affinity checked against `node`,
/// with the read-only rule applied (`pod_readonly` is the pod volume's `readOnly`).
pub fn mountable(
    claim: &str,
    pv: &PersistentVolume,
    node: &Node,
    pod_readonly: bool,
) -> Result<ResolvedClaim, MountRefusal> {
    let name = pv.metadata.name.clone().unwrap_or_default();
    check_node_affinity(pv, node)?;
    let spec = pv.spec.clone().unwrap_or_default();
    if spec.volume_mode.as_deref() == Some("Block") {
        return Err(MountRefusal::Block { pv: name });
    }
    let source = if let Some(l) = &spec.local {
        PvSource::Local {
            path: PathBuf::from(&l.path),
        }
    } else if let Some(h) = &spec.host_path {
        PvSource::HostPath {
            path: PathBuf::from(&h.path),
            type_: h.type_.clone().unwrap_or_default(),
        }
    } else {
        let value = serde_json::to_value(&spec).unwrap_or_default();
        let what = value
            .as_object()
            .and_then(|o| {
                o.keys()
                    .find(|k| !NOT_SOURCES.contains(&k.as_str()))
                    .cloned()
            })
            .unwrap_or_else(|| "none given".into());
        return Err(MountRefusal::Unsupported { pv: name, what });
    };
    let modes = spec.access_modes.unwrap_or_default();
    let pv_readonly = !modes.is_empty() && modes.iter().all(|m| m == "ReadOnlyMany");
    Ok(ResolvedClaim {
        claim: claim.to_string(),
        pv: name,
        source,
        readonly: pod_readonly || pv_readonly,
    })
}

/// The Node a standalone agent checks PV affinity against: the pod's `spec.nodeName` (the
/// agent's node name, `--hostname-override`, which the manifest source sets on its pods) or
/// else the host name, with the labels the kubelet gives every node
/// (`kubernetes.io/hostname` = the node name, `kubernetes.io/os`, `kubernetes.io/arch`).
pub fn standalone_node(node_name: Option<&str>) -> Node {
    let host = node_name
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_default()
        .to_lowercase();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), host.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
    ]);
    let mut n = Node::default();
    n.metadata.name = Some(host);
    n.metadata.labels = Some(labels);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::volumes::MapObjects;
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;

    fn pv(y: &str) -> PersistentVolume {
        serde_yaml::from_str(y).unwrap()
    }

    fn node(name: &str, zone: &str) -> Node {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, labels: {{kubernetes.io/hostname: {name}, zone: '{zone}', rank: '5'}}}}"
        ))
        .unwrap()
    }

    const LOCAL: &str = r#"
metadata: {name: pv1}
spec:
  accessModes: [ReadWriteOnce]
  local: {path: /mnt/disk1}
  claimRef: {namespace: default, name: data, uid: claim-uid}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [n1]}]
"#;

    fn objects(claim: &str, pvs: &[&str]) -> MapObjects {
        let mut o = MapObjects::default();
        if !claim.is_empty() {
            let c: PersistentVolumeClaim = serde_yaml::from_str(claim).unwrap();
            o.claims.insert(
                (
                    c.metadata.namespace.clone().unwrap_or_default(),
                    c.metadata.name.clone().unwrap_or_default(),
                ),
                c,
            );
        }
        for p in pvs {
            let p = pv(p);
            o.persistent_volumes
                .insert(p.metadata.name.clone().unwrap_or_default(), p);
        }
        o
    }

    const BOUND: &str = "metadata: {namespace: default, name: data, uid: claim-uid}\nspec: {volumeName: pv1}\nstatus: {phase: Bound}";

    fn src(name: &str) -> PersistentVolumeClaimVolumeSource {
        PersistentVolumeClaimVolumeSource {
            claim_name: name.into(),
            read_only: None,
        }
    }

    #[test]
    fn claim_resolution_errors() {
        let ok = objects(BOUND, &[LOCAL]);
        let got = resolve_claim("default", &src("data"), &ok).unwrap();
        assert_eq!(got.metadata.name.as_deref(), Some("pv1"));
        let cases: Vec<(MapObjects, &str, ClaimError)> = vec![
            (objects(BOUND, &[LOCAL]), "nope", ClaimError::ClaimNotFound("nope".into())),
            (
                objects(
                    "metadata: {namespace: default, name: data}\nspec: {}\nstatus: {phase: Pending}",
                    &[LOCAL],
                ),
                "data",
                ClaimError::NotBound {
                    namespace: "default".into(),
                    name: "data".into(),
                    phase: "Pending".into(),
                    volume: String::new(),
                },
            ),
            (
                objects(
                    "metadata: {namespace: default, name: data}\nspec: {volumeName: pv1}",
                    &[LOCAL],
                ),
                "data",
                ClaimError::NotBound {
                    namespace: "default".into(),
                    name: "data".into(),
                    phase: String::new(),
                    volume: "pv1".into(),
                },
            ),
            (objects(BOUND, &[]), "data", ClaimError::VolumeNotFound("pv1".into())),
            (
                objects(BOUND, &["metadata: {name: pv1}\nspec: {local: {path: /x}}"]),
                "data",
                ClaimError::NoClaimRef { pv: "pv1".into() },
            ),
            (
                objects(
                    BOUND,
                    &["metadata: {name: pv1}\nspec: {local: {path: /x}, claimRef: {namespace: default, name: data, uid: other}}"],
                ),
                "data",
                ClaimError::ClaimRefMismatch {
                    pv: "pv1".into(),
                    claim_ref: "default/data uid \"other\"".into(),
                    claim: "default/data uid \"claim-uid\"".into(),
                },
            ),
            (
                objects(
                    "metadata: {namespace: default, name: data, deletionTimestamp: '2024-01-01T00:00:00Z'}\nspec: {volumeName: pv1}\nstatus: {phase: Bound}",
                    &[LOCAL],
                ),
                "data",
                ClaimError::ClaimDeleting {
                    namespace: "default".into(),
                    name: "data".into(),
                },
            ),
        ];
        for (o, claim, want) in cases {
            assert_eq!(
                resolve_claim("default", &src(claim), &o).unwrap_err(),
                want,
                "{claim}"
            );
        }
        assert!(ClaimError::ClaimNotFound("c".into())
            .to_string()
            .contains("persistentvolumeclaims \"c\" not found"));
    }

    /// Standalone sources bind by `spec.volumeName` alone: no status, no claimRef needed.
    #[test]
    fn standalone_binding() {
        struct Standalone(MapObjects);
        impl ObjectSource for Standalone {
            fn config_map(
                &self,
                _: &str,
                _: &str,
            ) -> Option<k8s_openapi::api::core::v1::ConfigMap> {
                None
            }
            fn secret(&self, _: &str, _: &str) -> Option<k8s_openapi::api::core::v1::Secret> {
                None
            }
            fn persistent_volume_claim(&self, ns: &str, n: &str) -> Option<PersistentVolumeClaim> {
                self.0.persistent_volume_claim(ns, n)
            }
            fn persistent_volume(&self, n: &str) -> Option<PersistentVolume> {
                self.0.persistent_volume(n)
            }
            fn binds_by_volume_name(&self) -> bool {
                true
            }
        }
        let o = Standalone(objects(
            "metadata: {namespace: default, name: data}\nspec: {volumeName: pv1}",
            &["metadata: {name: pv1}\nspec: {local: {path: /x}}"],
        ));
        assert!(resolve_claim("default", &src("data"), &o).is_ok());
        // A claimRef naming another claim is still refused.
        let o = Standalone(objects(
            "metadata: {namespace: default, name: data}\nspec: {volumeName: pv1}",
            &["metadata: {name: pv1}\nspec: {local: {path: /x}, claimRef: {namespace: default, name: other}}"],
        ));
        assert!(matches!(
            resolve_claim("default", &src("data"), &o),
            Err(ClaimError::ClaimRefMismatch { .. })
        ));
    }

    #[test]
    fn node_affinity_matching() {
        let with_terms = |terms: &str| {
            pv(&format!(
                "metadata: {{name: pv1}}\nspec: {{local: {{path: /x}}, nodeAffinity: {{required: {{nodeSelectorTerms: {terms}}}}}}}"
            ))
        };
        let n1 = node("n1", "a");
        for (terms, want) in [
            ("[{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [n1]}]}]", true),
            ("[{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [n2]}]}]", false),
            // Terms are ORed.
            ("[{matchExpressions: [{key: zone, operator: In, values: [b]}]}, {matchExpressions: [{key: zone, operator: In, values: [a]}]}]", true),
            // Requirements of one term are ANDed.
            ("[{matchExpressions: [{key: zone, operator: In, values: [a]}, {key: kubernetes.io/hostname, operator: NotIn, values: [n1]}]}]", false),
            ("[{matchExpressions: [{key: zone, operator: Exists}]}]", true),
            ("[{matchExpressions: [{key: disk, operator: DoesNotExist}]}]", true),
            ("[{matchExpressions: [{key: rank, operator: Gt, values: ['3']}]}]", true),
            ("[{matchExpressions: [{key: rank, operator: Lt, values: ['3']}]}]", false),
            ("[{matchFields: [{key: metadata.name, operator: In, values: [n1]}]}]", true),
            ("[{matchFields: [{key: metadata.name, operator: In, values: [n2]}]}]", false),
            // An empty term matches nothing; no terms match nothing.
            ("[{}]", false),
            ("[]", false),
        ] {
            assert_eq!(
                check_node_affinity(&with_terms(terms), &n1).is_ok(),
                want,
                "{terms}"
            );
        }
        // No nodeAffinity: anywhere.
        assert!(
            check_node_affinity(&pv("metadata: {name: p}\nspec: {local: {path: /x}}"), &n1).is_ok()
        );
        let e = check_node_affinity(&pv(LOCAL), &node("n2", "a")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MountVolume.NodeAffinity check failed for volume \"pv1\" : no matching NodeSelectorTerms: the volume is for nodes matching (kubernetes.io/hostname In [n1]), node \"n2\" does not match"
        );
    }

    #[test]
    fn sources_and_read_only() {
        let n1 = node("n1", "a");
        let r = mountable("data", &pv(LOCAL), &n1, false).unwrap();
        assert_eq!(
            r.source,
            PvSource::Local {
                path: "/mnt/disk1".into()
            }
        );
        assert!(!r.readonly);
        assert!(mountable("data", &pv(LOCAL), &n1, true).unwrap().readonly);
        let rox = pv("metadata: {name: p}\nspec: {accessModes: [ReadOnlyMany], hostPath: {path: /srv, type: Directory}}");
        let r = mountable("data", &rox, &n1, false).unwrap();
        assert!(r.readonly, "ReadOnlyMany only");
        assert_eq!(
            r.source,
            PvSource::HostPath {
                path: "/srv".into(),
                type_: "Directory".into()
            }
        );
        let rwx = pv("metadata: {name: p}\nspec: {accessModes: [ReadOnlyMany, ReadWriteOnce], hostPath: {path: /srv}}");
        assert!(!mountable("data", &rwx, &n1, false).unwrap().readonly);
        let nfs = pv("metadata: {name: p}\nspec: {accessModes: [ReadWriteMany], capacity: {storage: 1Gi}, nfs: {server: s, path: /}}");
        let e = mountable("data", &nfs, &n1, false).unwrap_err();
        assert_eq!(
            e,
            MountRefusal::Unsupported {
                pv: "p".into(),
                what: "nfs".into()
            }
        );
        assert!(e
            .to_string()
            .contains("unsupported persistent volume type: nfs"));
        let block = pv("metadata: {name: p}\nspec: {volumeMode: Block, local: {path: /dev/sdb}}");
        assert!(matches!(
            mountable("data", &block, &n1, false),
            Err(MountRefusal::Block { .. })
        ));
        // Affinity is checked before anything else.
        assert!(matches!(
            mountable("data", &pv(LOCAL), &node("n2", "a"), false),
            Err(MountRefusal::NodeAffinity { .. })
        ));
    }
}
