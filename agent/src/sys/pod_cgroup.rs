//! The pod-level cgroup (`kubepods[/<qos>]/pod<uid>`, the kubelet's cgroupfs layout): made
//! with the pod's limits ([`crate::model::qos::pod_cgroup_resources`]) before its containers,
//! whose cgroups live under it, and removed with the pod. Effectful (cgroup files under an
//! injected root, through `hako_shim::cgroup`).

use crate::model::qos::{self, PodCgroupResources};
use hako_shim::cgroup::{Cgroup, CgroupError, Layout, V1_CONTROLLERS};
use hako_shim::spec::CgroupSpec;
use k8s_openapi::api::core::v1::PodSpec;
use std::path::{Path, PathBuf};

/// The cgroup filesystem root, `/sys/fs/cgroup` unless injected.
pub fn root_or_default(root: Option<&Path>) -> PathBuf {
    root.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The cgroup spec of a pod cgroup at `path` (relative to the hierarchy root). Pure.
pub fn pod_cgroup_spec(root: Option<&Path>, path: &str, res: &PodCgroupResources) -> CgroupSpec {
    CgroupSpec {
        root: root.map(Path::to_path_buf),
        path: path.to_string(),
        cpu_shares: Some(res.cpu_shares),
        cpu_quota: res.cpu_quota,
        cpu_period: res.cpu_quota.map(|_| qos::CPU_PERIOD_US),
        memory_limit: res.memory_limit,
        pids_limit: None,
    }
}

/// Make (or update) the pod cgroup at `path` and write the pod's limits. Limits are written
/// before any container cgroup exists below it, so v1's "a child's CFS quota may not exceed
/// its parent's" holds (the pod's quota is at least every container's). The QoS cgroup above
/// it then gets its cpu shares ([`update_qos_shares`]).
pub fn ensure(root: Option<&Path>, path: &str, spec: &PodSpec) -> Result<(), CgroupError> {
    let res = qos::pod_cgroup_resources(spec);
    Cgroup::create(&pod_cgroup_spec(root, path, &res))?;
    update_qos_shares(root, path);
    Ok(())
}

/// Remove the pod cgroup directory in every hierarchy (v1: one per controller; v2: the
/// unified one). A directory that still holds container cgroups or is already gone is left.
/// The QoS cgroup's shares are recomputed without it.
pub fn remove(root: Option<&Path>, path: &str) {
    let base = root_or_default(root);
    for ctrl in V1_CONTROLLERS.iter().copied().chain([""]) {
        let _ = std::fs::remove_dir(base.join(ctrl).join(path));
    }
    update_qos_shares(root, path);
}

/// The QoS cgroups' cpu shares as the kubelet's QoS container manager sets them with
/// `--cgroups-per-qos`: `besteffort` gets the minimum (2), `burstable` the sum of its pods'
/// shares (their cpu requests, at least 2), so that Guaranteed pods, directly under `kubepods`,
/// keep what they requested against both classes under contention. `pod_path` is a pod
/// cgroup's path; nothing is done for a Guaranteed pod. Best effort: a failed write is logged.
pub fn update_qos_shares(root: Option<&Path>, pod_path: &str) {
    let Some((qos_dir, class)) = Path::new(pod_path)
        .parent()
        .and_then(|q| Some((q, q.file_name()?.to_str()?)))
    else {
        return;
    };
    if class != "burstable" && class != "besteffort" {
        return;
    }
    let base = root_or_default(root);
    let Ok(layout) = hako_shim::cgroup::detect(&base) else {
        return;
    };
    let (dir, file) = match layout {
        Layout::V1 => (base.join("cpu").join(qos_dir), "cpu.shares"),
        Layout::V2 => (base.join(qos_dir), "cpu.weight"),
    };
    let children: Vec<u64> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pod"))
        .filter_map(|e| std::fs::read_to_string(e.path().join(file)).ok())
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let shares = qos_shares(class, layout, &children);
    let value = match layout {
        Layout::V1 => shares,
        Layout::V2 => hako_shim::cgroup::shares_to_weight(shares),
    };
    if let Err(e) = std::fs::write(dir.join(file), value.to_string()) {
        tracing::warn!(cgroup = %dir.display(), "QoS cgroup {file}: {e}");
    }
}

/// The shares of QoS cgroup `class` from its pods' `cpu.shares` (v1) or `cpu.weight` (v2,
/// turned back into shares by inverting runc's conversion). Pure.
fn qos_shares(class: &str, layout: Layout, children: &[u64]) -> u64 {
    const MIN_SHARES: u64 = 2;
    if class == "besteffort" {
        return MIN_SHARES;
    }
    let sum: u64 = children
        .iter()
        .map(|&v| match layout {
            Layout::V1 => v,
            Layout::V2 => 2 + (v.max(1) - 1) * 262_142 / 9999,
        })
        .sum();
    sum.clamp(MIN_SHARES, 262_144)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::fs;

    fn guaranteed(cpu: &str, mem: &str) -> PodSpec {
        let l: std::collections::BTreeMap<String, Quantity> = [
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
        ]
        .into();
        PodSpec {
            containers: vec![Container {
                name: "c".into(),
                resources: Some(ResourceRequirements {
                    limits: Some(l),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn fake_v1_root_gets_the_pod_limits_and_is_removed() {
        let d = tempfile::tempdir().unwrap();
        for c in ["cpu", "memory", "pids"] {
            fs::create_dir(d.path().join(c)).unwrap();
        }
        let path = "kubepods/podu1";
        ensure(Some(d.path()), path, &guaranteed("500m", "64Mi")).unwrap();
        let rd = |f: &str| fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(
            rd("memory/kubepods/podu1/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(rd("cpu/kubepods/podu1/cpu.cfs_quota_us"), "50000");
        assert_eq!(rd("cpu/kubepods/podu1/cpu.shares"), "512");
        // Files written by the fake make rmdir fail, as a busy cgroup would; empty it first.
        for c in ["cpu", "memory"] {
            for e in fs::read_dir(d.path().join(c).join(path)).unwrap() {
                fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
        remove(Some(d.path()), path);
        assert!(!d.path().join("memory").join(path).exists());
        assert!(!d.path().join("pids").join(path).exists());
    }

    #[test]
    fn fake_v2_root_gets_the_pod_limits() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        ensure(
            Some(d.path()),
            "kubepods/podu2",
            &guaranteed("1500m", "1Gi"),
        )
        .unwrap();
        let pod = d.path().join("kubepods/podu2");
        let rd = |f: &str| fs::read_to_string(pod.join(f)).unwrap();
        assert_eq!(rd("memory.max"), (1u64 << 30).to_string());
        assert_eq!(rd("cpu.max"), "150000 100000");
        // 1536 shares in runc's conversion.
        assert_eq!(rd("cpu.weight"), "59");
        assert_eq!(
            fs::read_to_string(d.path().join("kubepods/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
    }

    #[test]
    fn qos_cgroups_get_their_pods_shares() {
        assert_eq!(qos_shares("besteffort", Layout::V1, &[2, 2]), 2);
        assert_eq!(qos_shares("burstable", Layout::V1, &[]), 2);
        assert_eq!(qos_shares("burstable", Layout::V1, &[512, 102]), 614);
        // v2 weights back to shares: 1024 shares is weight 39, 39 → 998 (runc's rounding).
        assert_eq!(qos_shares("burstable", Layout::V2, &[39]), 998);
        assert_eq!(
            qos_shares("burstable", Layout::V1, &[200_000, 200_000]),
            262_144
        );

        let d = tempfile::tempdir().unwrap();
        for c in ["cpu", "memory", "pids"] {
            fs::create_dir(d.path().join(c)).unwrap();
        }
        let mut burstable = guaranteed("500m", "64Mi");
        burstable.containers[0].resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), Quantity("250m".into()))].into()),
            ..Default::default()
        });
        let shares = |q: &str| {
            fs::read_to_string(d.path().join("cpu/kubepods").join(q).join("cpu.shares")).unwrap()
        };
        ensure(Some(d.path()), "kubepods/burstable/poda", &burstable).unwrap();
        ensure(Some(d.path()), "kubepods/burstable/podb", &burstable).unwrap();
        assert_eq!(shares("burstable"), "512");
        ensure(
            Some(d.path()),
            "kubepods/besteffort/podc",
            &PodSpec::default(),
        )
        .unwrap();
        assert_eq!(shares("besteffort"), "2");
        // A Guaranteed pod leaves both alone.
        ensure(Some(d.path()), "kubepods/podg", &guaranteed("1", "64Mi")).unwrap();
        assert_eq!(shares("burstable"), "512");
        // Pod b goes: burstable keeps a's share (the fake's files make rmdir fail: empty it).
        let b = d.path().join("cpu/kubepods/burstable/podb");
        for e in fs::read_dir(&b).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        remove(Some(d.path()), "kubepods/burstable/podb");
        assert_eq!(shares("burstable"), "256");
    }

    #[test]
    fn no_hierarchy_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(ensure(Some(d.path()), "kubepods/podx", &PodSpec::default()).is_err());
    }
}
