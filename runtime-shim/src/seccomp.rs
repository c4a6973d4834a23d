//! The RuntimeDefault seccomp profile: the system calls Docker's and containerd's default
//! profile refuse, each allowed again when the container holds the capability that governs
//! it (as their profile does); everything else is allowed. Refused calls fail with EPERM.
//! The syscall table is pure; [`build`] compiles it with `seccompiler`.

use caps::Capability;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::{BTreeMap, HashSet};

/// Seccomp profile of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SeccompProfile {
    /// No filter (the kubelet's default without `seccompDefault`).
    #[default]
    Unconfined,
    /// The runtime's default profile.
    RuntimeDefault,
}

/// `(name, number, capability that re-allows it)`.
const DENIED: &[(&str, libc::c_long, Option<Capability>)] = &[
    ("acct", libc::SYS_acct, Some(Capability::CAP_SYS_PACCT)),
    ("add_key", libc::SYS_add_key, None),
    ("bpf", libc::SYS_bpf, Some(Capability::CAP_SYS_ADMIN)),
    (
        "clock_adjtime",
        libc::SYS_clock_adjtime,
        Some(Capability::CAP_SYS_TIME),
    ),
    (
        "clock_settime",
        libc::SYS_clock_settime,
        Some(Capability::CAP_SYS_TIME),
    ),
    (
        "delete_module",
        libc::SYS_delete_module,
        Some(Capability::CAP_SYS_MODULE),
    ),
    (
        "finit_module",
        libc::SYS_finit_module,
        Some(Capability::CAP_SYS_MODULE),
    ),
    (
        "get_mempolicy",
        libc::SYS_get_mempolicy,
        Some(Capability::CAP_SYS_NICE),
    ),
    (
        "init_module",
        libc::SYS_init_module,
        Some(Capability::CAP_SYS_MODULE),
    ),
    ("ioperm", libc::SYS_ioperm, Some(Capability::CAP_SYS_RAWIO)),
    ("iopl", libc::SYS_iopl, Some(Capability::CAP_SYS_RAWIO)),
    ("kcmp", libc::SYS_kcmp, Some(Capability::CAP_SYS_PTRACE)),
    (
        "kexec_file_load",
        libc::SYS_kexec_file_load,
        Some(Capability::CAP_SYS_BOOT),
    ),
    (
        "kexec_load",
        libc::SYS_kexec_load,
        Some(Capability::CAP_SYS_BOOT),
    ),
    ("keyctl", libc::SYS_keyctl, None),
    (
        "lookup_dcookie",
        libc::SYS_lookup_dcookie,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    ("mbind", libc::SYS_mbind, Some(Capability::CAP_SYS_NICE)),
    ("mount", libc::SYS_mount, Some(Capability::CAP_SYS_ADMIN)),
    (
        "move_pages",
        libc::SYS_move_pages,
        Some(Capability::CAP_SYS_NICE),
    ),
    (
        "name_to_handle_at",
        libc::SYS_name_to_handle_at,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    ("nfsservctl", libc::SYS_nfsservctl, None),
    (
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        Some(Capability::CAP_DAC_READ_SEARCH),
    ),
    (
        "perf_event_open",
        libc::SYS_perf_event_open,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    (
        "pivot_root",
        libc::SYS_pivot_root,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    (
        "process_vm_readv",
        libc::SYS_process_vm_readv,
        Some(Capability::CAP_SYS_PTRACE),
    ),
    (
        "process_vm_writev",
        libc::SYS_process_vm_writev,
        Some(Capability::CAP_SYS_PTRACE),
    ),
    (
        "quotactl",
        libc::SYS_quotactl,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    ("reboot", libc::SYS_reboot, Some(Capability::CAP_SYS_BOOT)),
    ("request_key", libc::SYS_request_key, None),
    (
        "set_mempolicy",
        libc::SYS_set_mempolicy,
        Some(Capability::CAP_SYS_NICE),
    ),
    ("setns", libc::SYS_setns, Some(Capability::CAP_SYS_ADMIN)),
    (
        "settimeofday",
        libc::SYS_settimeofday,
        Some(Capability::CAP_SYS_TIME),
    ),
    (
        "swapoff",
        libc::SYS_swapoff,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    ("swapon", libc::SYS_swapon, Some(Capability::CAP_SYS_ADMIN)),
    ("_sysctl", libc::SYS__sysctl, None),
    ("sysfs", libc::SYS_sysfs, None),
    (
        "umount2",
        libc::SYS_umount2,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    (
        "unshare",
        libc::SYS_unshare,
        Some(Capability::CAP_SYS_ADMIN),
    ),
    ("uselib", libc::SYS_uselib, None),
    (
        "userfaultfd",
        libc::SYS_userfaultfd,
        Some(Capability::CAP_SYS_PTRACE),
    ),
    ("ustat", libc::SYS_ustat, None),
    (
        "vhangup",
        libc::SYS_vhangup,
        Some(Capability::CAP_SYS_TTY_CONFIG),
    ),
];

/// The system calls RuntimeDefault refuses for a container holding `caps`. Pure.
pub fn denied(caps: &HashSet<Capability>) -> Vec<(&'static str, i64)> {
    DENIED
        .iter()
        .filter(|(_, _, cap)| cap.is_none_or(|c| !caps.contains(&c)))
        .map(|(n, nr, _)| (*n, *nr))
        .collect()
}

/// Seccomp errors.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter: {0}")]
pub struct SeccompError(String);

/// Compile the RuntimeDefault filter for `caps` (x86_64).
pub fn build(caps: &HashSet<Capability>) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied(caps)
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))
}

/// Install a compiled filter on the calling thread (before exec).
pub fn apply(prog: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(prog).map_err(|e| SeccompError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_re_allow_their_calls() {
        let none = denied(&HashSet::new());
        assert!(none.iter().any(|(n, _)| *n == "unshare"));
        assert!(none.iter().any(|(n, _)| *n == "keyctl"));
        let admin = denied(&[Capability::CAP_SYS_ADMIN].into_iter().collect());
        assert!(!admin.iter().any(|(n, _)| *n == "unshare" || *n == "mount"));
        assert!(
            admin.iter().any(|(n, _)| *n == "keyctl"),
            "keyring stays denied"
        );
        assert!(build(&HashSet::new()).is_ok());
    }
}
