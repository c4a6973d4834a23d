//! `--nodeport-addresses primary`: the node's primary addresses, as CIDRs of one address.
//! kube-proxy takes them from the Node object; a node without an API server here takes
//! the addresses of the interface that holds each family's default route (the one traffic
//! to other nodes leaves by). The route-table parsers are pure; [`primary_addresses`]
//! reads `/proc/net` and the interfaces (effectful).

use std::net::IpAddr;

/// The interface of the IPv4 default route in `/proc/net/route` text (the one with the
/// lowest metric).
pub fn default_v4_interface(route: &str) -> Option<String> {
    route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let (iface, dest, metric, mask) = (f.first()?, f.get(1)?, f.get(6)?, f.get(7)?);
            (*dest == "00000000" && *mask == "00000000").then(|| {
                (
                    metric.parse::<u64>().unwrap_or(u64::MAX),
                    (*iface).to_string(),
                )
            })
        })
        .min()
        .map(|(_, i)| i)
}

/// The interface of the IPv6 default route in `/proc/net/ipv6_route` text (lowest metric;
/// `lo` entries, the kernel's unreachable defaults, are left out).
pub fn default_v6_interface(route: &str) -> Option<String> {
    route
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dest plen src splen nexthop metric refcnt use flags iface
            let (dest, plen, metric, iface) = (f.first()?, f.get(1)?, f.get(5)?, f.get(9)?);
            (dest.chars().all(|c| c == '0') && *plen == "00" && *iface != "lo").then(|| {
                (
                    u64::from_str_radix(metric, 16).unwrap_or(u64::MAX),
                    (*iface).to_string(),
                )
            })
        })
        .min()
        .map(|(_, i)| i)
}

/// The addresses worth a NodePort among an interface's: not loopback, not IPv6 link-local.
pub fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_unspecified(),
        IpAddr::V6(a) => {
            !a.is_loopback() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// The CIDR of one address (`/32`, `/128`).
pub fn host_cidr(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Why the primary addresses could not be found.
#[derive(Debug, thiserror::Error)]
pub enum NodeAddrError {
    /// Listing the interfaces' addresses failed.
    #[error("listing the interfaces' addresses: {0}")]
    Addrs(#[source] nix::Error),
    /// No default route, or no usable address on its interface.
    #[error("--nodeport-addresses primary: no default route with a usable address (IPv4 via {v4:?}, IPv6 via {v6:?})")]
    NoPrimary {
        /// Interface of the IPv4 default route.
        v4: Option<String>,
        /// Interface of the IPv6 default route.
        v6: Option<String>,
    },
}

/// A `/proc/net` file of the calling thread's network namespace (`/proc/net` is the
/// process leader's, which differs on a thread that entered another namespace).
fn proc_net(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/thread-self/net/{name}"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/net/{name}")))
        .ok()
}

/// The node's primary addresses as CIDRs: per family, the usable addresses of the
/// interface holding the default route (in the calling thread's network namespace).
pub fn primary_addresses() -> Result<Vec<String>, NodeAddrError> {
    let v4 = proc_net("route").and_then(|t| default_v4_interface(&t));
    let v6 = proc_net("ipv6_route").and_then(|t| default_v6_interface(&t));
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(NodeAddrError::Addrs)? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(a) = addr.as_sockaddr_in() {
            IpAddr::V4(a.ip())
        } else if let Some(a) = addr.as_sockaddr_in6() {
            IpAddr::V6(a.ip())
        } else {
            continue;
        };
        let want = match ip {
            IpAddr::V4(_) => v4.as_deref(),
            IpAddr::V6(_) => v6.as_deref(),
        };
        if want == Some(ifa.interface_name.as_str()) && usable(&ip) {
            let c = host_cidr(&ip);
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err(NodeAddrError::NoPrimary { v4, v6 });
    }
    Ok(out)
}

/// `--nodeport-addresses` as given, with `primary` replaced by the primary addresses.
pub fn resolve(given: &[String]) -> Result<Vec<String>, NodeAddrError> {
    let mut out = Vec::new();
    for a in given {
        if a.trim() == "primary" {
            out.extend(primary_addresses()?);
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_v4_interface(route).as_deref(), Some("eth0"));
        assert_eq!(default_v4_interface("Iface\tDestination\n"), None);
        let r6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1\n\
            fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        assert_eq!(default_v6_interface(r6).as_deref(), Some("eth1"));
    }

    #[test]
    fn loopback_and_link_local_are_not_primary() {
        for (ip, ok) in [
            ("10.0.0.5", true),
            ("127.0.0.1", false),
            ("fe80::1", false),
            ("fd00::5", true),
            ("::1", false),
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(usable(&ip), ok, "{ip}");
        }
        assert_eq!(host_cidr(&"10.0.0.5".parse().expect("ip")), "10.0.0.5/32");
        assert_eq!(
            resolve(&["10.0.0.0/8".into()]).expect("no lookup"),
            ["10.0.0.0/8"]
        );
    }
}
