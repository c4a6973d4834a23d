//! Seccomp profiles of a container and their filters. RuntimeDefault is an allowlist
//! equivalent to Docker's and containerd's default profile ([`default_profile`]); Localhost
//! profiles are OCI/Docker JSON documents ([`profile`]) that the agent reads from its
//! `--seccomp-profile-root` and passes in the spec. Both resolve, for the container's
//! capabilities, into one [`bpf::Policy`] compiled to a single BPF program (pure); [`apply`]
//! installs it (effectful).

pub mod bpf;
pub mod default_profile;
pub mod localhost;
pub mod profile;
pub mod syscalls;

use caps::Capability;
use seccompiler::BpfProgram;
use std::collections::HashSet;

/// Seccomp profile of a container. Serialised as `"Unconfined"`, `"RuntimeDefault"` or
/// `{"Localhost": {...}}` (state files written before Localhost existed still parse).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SeccompProfile {
    /// No filter (the kubelet's default without `seccompDefault`).
    #[default]
    Unconfined,
    /// The runtime's default profile.
    RuntimeDefault,
    /// A profile document from the node (`localhostProfile`).
    Localhost(Box<LocalhostProfile>),
}

/// A Localhost profile as read by the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalhostProfile {
    /// The file it came from, for messages.
    pub path: String,
    /// The parsed document.
    pub profile: profile::Profile,
}

/// Seccomp errors.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile cannot be resolved.
    #[error("seccomp profile {0}: {1}")]
    Profile(String, profile::ProfileError),
    /// The filter is too large.
    #[error("seccomp profile {0}: {1}")]
    TooLarge(String, bpf::TooLarge),
    /// The kernel refused the filter.
    #[error("install seccomp filter: {0}")]
    Apply(String),
}

/// The filter for `profile` and a container holding `caps`; `None` when unconfined. Pure.
pub fn compile(
    profile: &SeccompProfile,
    caps: &HashSet<Capability>,
) -> Result<Option<BpfProgram>, SeccompError> {
    let (name, doc) = match profile {
        SeccompProfile::Unconfined => return Ok(None),
        SeccompProfile::RuntimeDefault => ("RuntimeDefault", default_profile::profile()),
        SeccompProfile::Localhost(l) => (l.path.as_str(), l.profile.clone()),
    };
    let (policy, _skipped) = doc
        .policy(caps)
        .map_err(|e| SeccompError::Profile(name.to_string(), e))?;
    policy
        .compile()
        .map(Some)
        .map_err(|e| SeccompError::TooLarge(name.to_string(), e))
}

/// Compile the RuntimeDefault filter for `caps` (x86_64). Pure.
pub fn build(caps: &HashSet<Capability>) -> Result<BpfProgram, SeccompError> {
    compile(&SeccompProfile::RuntimeDefault, caps).map(Option::unwrap_or_default)
}

/// Install a compiled filter on the calling thread (before exec). Sets no_new_privs first,
/// which the kernel requires of a process without CAP_SYS_ADMIN.
pub fn apply(prog: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Apply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_and_new_spellings_parse() {
        let old: SeccompProfile = serde_json::from_str("\"RuntimeDefault\"").unwrap();
        assert_eq!(old, SeccompProfile::RuntimeDefault);
        let un: SeccompProfile = serde_json::from_str("\"Unconfined\"").unwrap();
        assert_eq!(un, SeccompProfile::Unconfined);
        let l = SeccompProfile::Localhost(Box::new(LocalhostProfile {
            path: "/var/lib/hako/seccomp/p.json".into(),
            profile: profile::Profile::parse(br#"{"defaultAction": "SCMP_ACT_ALLOW"}"#).unwrap(),
        }));
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<SeccompProfile>(&text).unwrap(), l);
        assert!(text.starts_with("{\"Localhost\":"), "{text}");
    }

    #[test]
    fn compiles_each_kind() {
        let caps = crate::capabilities::default_set();
        assert!(compile(&SeccompProfile::Unconfined, &caps)
            .unwrap()
            .is_none());
        assert!(!build(&caps).unwrap().is_empty());
        let bad = SeccompProfile::Localhost(Box::new(LocalhostProfile {
            path: "x.json".into(),
            profile: profile::Profile::parse(br#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#).unwrap(),
        }));
        let err = compile(&bad, &caps).unwrap_err().to_string();
        assert!(
            err.contains("x.json") && err.contains("not supported"),
            "{err}"
        );
    }
}
