//! Machine facts and live measurements for the Node object (effectful: reads /proc, /sys,
//! /etc and statvfs).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::model::node_object::{Measurements, NodeFacts};

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
}

fn os_image() -> String {
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Ok(t) = std::fs::read_to_string(p) {
            if let Some(v) = t.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")) {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "Linux".into()
}

/// GOARCH spelling of the machine architecture.
pub fn go_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
    .to_string()
}

fn cpus() -> u32 {
    let n = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The interface of the IPv4 default route (from /proc/net/route, in this network namespace).
pub fn default_route_interface() -> Option<String> {
    let t = std::fs::read_to_string("/proc/net/route").ok()?;
    t.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })
}

/// The first IPv4 address of an interface.
pub fn interface_ipv4(ifname: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        if ifa.interface_name != ifname {
            return None;
        }
        ifa.address.and_then(|a| a.as_sockaddr_in().map(|s| s.ip()))
    })
}

/// Static facts. `node_ip` overrides the default-route interface's address.
pub fn gather(node_ip: Option<IpAddr>, hostname: &str, fs_root: &Path) -> NodeFacts {
    let machine_id = read_trim("/etc/machine-id")
        .or_else(|| read_trim("/var/lib/dbus/machine-id"))
        .unwrap_or_default();
    let internal_ip = node_ip.or_else(|| {
        default_route_interface()
            .and_then(|i| interface_ipv4(&i))
            .map(IpAddr::V4)
    });
    NodeFacts {
        system_uuid: read_trim("/sys/class/dmi/id/product_uuid")
            .unwrap_or_else(|| machine_id.clone()),
        machine_id,
        boot_id: read_trim("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
        kernel_version: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        os_image: os_image(),
        architecture: go_arch(),
        hostname: hostname.to_string(),
        cpus: cpus(),
        memory_bytes: meminfo("MemTotal:").unwrap_or(0),
        ephemeral_storage_bytes: fs_stats(fs_root).map_or(0, |s| s.1),
        internal_ip,
    }
}

/// (available bytes, size bytes, free inodes, total inodes) of the filesystem holding `p`.
fn fs_stats(p: &Path) -> Option<(u64, u64, u64, u64)> {
    let mut dir = p.to_path_buf();
    while !dir.exists() {
        dir = dir.parent()?.to_path_buf();
    }
    let s = nix::sys::statvfs::statvfs(&dir).ok()?;
    #[allow(clippy::useless_conversion)]
    let frag = u64::from(s.fragment_size());
    #[allow(clippy::useless_conversion)]
    Some((
        u64::from(s.blocks_available()) * frag,
        u64::from(s.blocks()) * frag,
        u64::from(s.files_available()),
        u64::from(s.files()),
    ))
}

/// Live measurements (memory, node filesystem, pids).
pub fn measure(fs_root: &Path) -> Measurements {
    let (avail, size, ifree, itotal) = fs_stats(fs_root).unwrap_or((0, 0, 0, 0));
    let pids_used = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0);
    Measurements {
        memory_available: meminfo("MemAvailable:").unwrap_or(0),
        memory_capacity: meminfo("MemTotal:").unwrap_or(0),
        nodefs_available: avail,
        nodefs_capacity: size,
        nodefs_inodes_free: ifree,
        nodefs_inodes: itotal,
        pids_used: u64::try_from(pids_used).unwrap_or(u64::MAX),
        pids_max: read_trim("/proc/sys/kernel/pid_max")
            .and_then(|s| s.parse().ok())
            .unwrap_or(32768),
    }
}

/// Whether the CNI conf dir holds a network configuration (`*.conf`, `*.conflist`, `*.json`).
pub fn cni_config_present(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok).any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json")
            })
        })
        .unwrap_or(false)
}
