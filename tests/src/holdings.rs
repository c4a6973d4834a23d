//! What a node holds for its pods, counted from the outside: sandbox dirs and their netns
//! mounts, veths on the test bridge, IPAM reservations, CNI cache entries, shim containers; and
//! small /proc and mount helpers the chaos, soak and scale tests share. Effectful (reads only,
//! except [`unmount_under`]).

use crate::agent::AgentEnv;
use std::path::Path;

/// What the node holds; tests compare it with what their running pods need.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holdings {
    /// Directories under `<run>/sandboxes`.
    pub sandboxes: usize,
    /// Sandbox network namespace mounts.
    pub ns_mounts: usize,
    /// Links enslaved to the test bridge `hkbr0`.
    pub veths: usize,
    /// IPAM reservations under the test's IPAM dir.
    pub ipam: usize,
    /// CNI result cache entries.
    pub cache: usize,
    /// Containers the shim knows.
    pub containers: usize,
}

impl Holdings {
    /// What `pods` running single-container pods hold.
    pub fn for_pods(pods: usize) -> Holdings {
        Holdings {
            sandboxes: pods,
            ns_mounts: pods,
            veths: pods,
            ipam: pods,
            cache: pods,
            containers: pods,
        }
    }
}

/// Counts what `env`'s node holds.
pub fn holdings(env: &AgentEnv) -> Holdings {
    let veths = env
        .ns
        .ip(&["-o", "link", "show", "master", "hkbr0"])
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    Holdings {
        sandboxes: dir_entries(&env.run.join("sandboxes")).len(),
        ns_mounts: mounts_under(&env.run.join("sandboxes"))
            .iter()
            .filter(|m| m.ends_with("/net"))
            .count(),
        veths,
        ipam: ip_files(&env.tmp.path().join("ipam")).len(),
        cache: dir_entries(&env.root.join("cni").join("results")).len(),
        containers: env.shim_containers().len(),
    }
}

/// Names in a directory (none when it is missing).
pub fn dir_entries(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// IPAM reservations: files named by an address, in `d` and its subdirectories (host-local
/// keeps one directory per network).
pub fn ip_files(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(ip_files(&e.path()));
        } else if name.parse::<std::net::IpAddr>().is_ok() {
            out.push(name);
        }
    }
    out
}

/// Mount points under `prefix` in this mount namespace.
pub fn mounts_under(prefix: &Path) -> Vec<String> {
    let prefix = prefix.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// Detaches every mount under `prefix`, deepest first; returns the failures.
pub fn unmount_under(prefix: &Path) -> Vec<(String, nix::Error)> {
    let mut mounts = mounts_under(prefix);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts
        .into_iter()
        .filter_map(|m| {
            nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH)
                .err()
                .map(|e| (m, e))
        })
        .collect()
}

/// A number from `/proc/<pid>/status` (`VmRSS:`, `VmHWM:` in KiB, `Threads:`); 0 if absent.
pub fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
