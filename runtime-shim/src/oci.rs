//! Conversion of an OCI runtime spec (`oci-spec`, config.json) into the shim's
//! [`ContainerSpec`]: process, user, capabilities, rlimits, oom_score_adj, root, mounts,
//! namespace paths, masked/read-only paths and cgroup resources. Pure.

use crate::spec::{
    CgroupSpec, ContainerSpec, Mount, NamespacePaths, Process, Rlimit, Rootfs, User,
};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Conversion errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OciError {
    /// The spec has no process.
    #[error("OCI spec of {0}: no process")]
    NoProcess(String),
    /// The spec has no root.
    #[error("OCI spec of {0}: no root")]
    NoRoot(String),
    /// The spec asks for a namespace the shim does not support (user, cgroup, time).
    #[error("OCI spec of {0}: unsupported namespace {1}")]
    Namespace(String, String),
    /// `linux.seccomp` is not a profile the shim can enforce.
    #[error("OCI spec of {0}: linux.seccomp: {1}")]
    Seccomp(String, String),
}

fn name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Convert `oci` for container `id`. A relative root path is taken relative to `bundle`.
pub fn from_oci(id: &str, bundle: &std::path::Path, oci: &Spec) -> Result<ContainerSpec, OciError> {
    let p = oci
        .process()
        .as_ref()
        .ok_or_else(|| OciError::NoProcess(id.into()))?;
    let root = oci
        .root()
        .as_ref()
        .ok_or_else(|| OciError::NoRoot(id.into()))?;
    let user = p.user();
    let mut capabilities = None;
    if let Some(c) = p.capabilities() {
        if let Some(b) = c.bounding() {
            let mut names: Vec<String> = b.iter().map(name_of).collect();
            names.sort();
            capabilities = Some(names);
        }
    }
    let rlimits = p
        .rlimits()
        .as_ref()
        .map(|rs| {
            rs.iter()
                .map(|r| Rlimit {
                    kind: name_of(&r.typ()),
                    hard: r.hard(),
                    soft: r.soft(),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut spec = ContainerSpec {
        id: id.to_string(),
        rootfs: Rootfs::Dir(bundle.join(root.path())),
        readonly_rootfs: root.readonly().unwrap_or(false),
        hostname: oci.hostname().clone(),
        process: Process {
            args: p.args().clone().unwrap_or_default(),
            env: p.env().clone().unwrap_or_default(),
            cwd: Some(p.cwd().display().to_string()),
            user: User {
                spec: format!("{}:{}", user.uid(), user.gid()),
                additional_gids: user.additional_gids().clone().unwrap_or_default(),
            },
            capabilities,
            no_new_privileges: p.no_new_privileges().unwrap_or(false),
            rlimits,
            oom_score_adj: p.oom_score_adj(),
            stdin: false,
        },
        ..Default::default()
    };
    const STANDARD: &[&str] = &[
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ];
    for m in oci.mounts().as_deref().unwrap_or_default() {
        let dest = m.destination().display().to_string();
        if STANDARD.contains(&dest.as_str()) {
            continue; // the shim mounts these itself
        }
        let opts = m.options().clone().unwrap_or_default();
        let bind =
            m.typ().as_deref() == Some("bind") || opts.iter().any(|o| o == "bind" || o == "rbind");
        spec.mounts.push(Mount {
            destination: dest,
            source: m
                .source()
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
            kind: if bind { None } else { m.typ().clone() },
            options: opts,
        });
    }
    if let Some(l) = oci.linux() {
        let mut ns = NamespacePaths::default();
        for n in l.namespaces().as_deref().unwrap_or_default() {
            let path = n.path().clone();
            match n.typ() {
                LinuxNamespaceType::Network => ns.net = path,
                LinuxNamespaceType::Ipc => ns.ipc = path,
                LinuxNamespaceType::Uts => ns.uts = path,
                LinuxNamespaceType::Pid => ns.pid = path,
                LinuxNamespaceType::Mount => {}
                other => {
                    return Err(OciError::Namespace(
                        id.into(),
                        format!("{other:?}").to_lowercase(),
                    ))
                }
            }
        }
        spec.namespaces = ns;
        spec.masked_paths = l.masked_paths().clone();
        spec.readonly_paths = l.readonly_paths().clone();
        let mut cg = CgroupSpec {
            path: l
                .cgroups_path()
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("hako/{id}")),
            ..Default::default()
        };
        if let Some(r) = l.resources() {
            if let Some(c) = r.cpu() {
                cg.cpu_shares = c.shares();
                cg.cpu_quota = c.quota();
                cg.cpu_period = c.period();
            }
            if let Some(m) = r.memory() {
                cg.memory_limit = m.limit();
            }
            if let Some(p) = r.pids() {
                cg.pids_limit = Some(p.limit());
            }
        }
        spec.cgroup = Some(cg);
        if let Some(sc) = l.seccomp() {
            spec.seccomp = seccomp_of(id, sc)?;
        }
    }
    Ok(spec)
}

/// The bundle's `linux.seccomp` as a profile document (the same OCI format the agent reads
/// for Localhost profiles), so a bundle's filter is enforced, never dropped. Pure.
fn seccomp_of(
    id: &str,
    sc: &oci_spec::runtime::LinuxSeccomp,
) -> Result<crate::seccomp::SeccompProfile, OciError> {
    let bad = |e: String| OciError::Seccomp(id.into(), e);
    let doc = serde_json::to_vec(sc).map_err(|e| bad(e.to_string()))?;
    let profile = crate::seccomp::profile::Profile::parse(&doc).map_err(|e| bad(e.to_string()))?;
    // Refuse actions the shim cannot enforce now rather than at create time.
    profile
        .policy(&std::collections::HashSet::new())
        .map_err(|e| bad(e.to_string()))?;
    Ok(crate::seccomp::SeccompProfile::Localhost(Box::new(
        crate::seccomp::LocalhostProfile {
            path: "config.json linux.seccomp".into(),
            profile,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_config_json() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/oci-config.json"
        ))
        .unwrap();
        let oci: Spec = serde_json::from_str(&text).unwrap();
        let got = from_oci("c1", std::path::Path::new("/bundle"), &oci).unwrap();
        let want_text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/oci-config.hako.json"
        ))
        .unwrap();
        let want: ContainerSpec = serde_json::from_str(&want_text).unwrap();
        assert_eq!(got, want, "{}", serde_json::to_string_pretty(&got).unwrap());
    }

    #[test]
    fn a_bundles_seccomp_profile_is_kept() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/oci-config.json"
        ))
        .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        let oci: Spec = serde_json::from_value(v.clone()).unwrap();
        let got = from_oci("c1", std::path::Path::new("/bundle"), &oci).unwrap();
        let crate::seccomp::SeccompProfile::Localhost(p) = &got.seccomp else {
            panic!("bundle seccomp dropped: {:?}", got.seccomp);
        };
        assert_eq!(p.path, "config.json linux.seccomp");
        // An action the shim cannot enforce fails the conversion instead of running unconfined.
        v["linux"]["seccomp"]["defaultAction"] = serde_json::json!("SCMP_ACT_NOTIFY");
        let oci: Spec = serde_json::from_value(v).unwrap();
        assert!(matches!(
            from_oci("c1", std::path::Path::new("/bundle"), &oci),
            Err(OciError::Seccomp(..))
        ));
    }
}
