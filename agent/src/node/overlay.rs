//! Overlay controller, pure part: the annotations a node publishes, the peer list computed
//! from all Nodes, and the subnet file for the CNI plugin.

use hako_cni::overlay::Peer;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use std::net::IpAddr;

/// Annotation holding the node's VTEP MAC.
pub const ANN_VTEP_MAC: &str = "hako.dev/vtep-mac";
/// Annotation holding the node's underlay (VXLAN endpoint) address.
pub const ANN_PUBLIC_IP: &str = "hako.dev/public-ip";
/// Annotation holding the node's pod CIDRs (comma separated) when they come from
/// `--pod-cidr` instead of `spec.podCIDRs`.
pub const ANN_POD_CIDR: &str = "hako.dev/pod-cidr";

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// The pod CIDRs of a node: `spec.podCIDRs`, `spec.podCIDR`, then the hako annotation.
pub fn node_pod_cidrs(n: &Node) -> Vec<IpNet> {
    let spec = n.spec.as_ref();
    let mut v: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if v.is_empty() {
        v.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    if v.is_empty() {
        if let Some(a) = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_POD_CIDR))
        {
            v.extend(a.split(',').map(|s| s.trim().to_string()));
        }
    }
    v.iter().filter_map(|s| s.parse().ok()).collect()
}

/// Peers for every other node that has published its VTEP MAC, underlay IP and a pod CIDR
/// (one peer per pod CIDR, so dual-stack nodes give two). Nodes being deleted are left out.
pub fn peers(nodes: &[Node], self_name: &str) -> Vec<Peer> {
    let mut out = Vec::new();
    for n in nodes {
        let name = n.metadata.name.as_deref().unwrap_or("");
        if name == self_name || n.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ann = n.metadata.annotations.clone().unwrap_or_default();
        let (Some(mac), Some(ip)) = (
            ann.get(ANN_VTEP_MAC).and_then(|m| parse_mac(m)),
            ann.get(ANN_PUBLIC_IP)
                .and_then(|i| i.trim().parse::<IpAddr>().ok()),
        ) else {
            continue;
        };
        for cidr in node_pod_cidrs(n) {
            out.push(Peer {
                node_ip: ip,
                pod_cidr: cidr.trunc(),
                vtep_mac: mac,
            });
        }
    }
    out.sort_by_key(|p| (p.pod_cidr, p.node_ip));
    out
}

/// The gateway form `10.244.3.1/24` of a pod CIDR (first host; host bits name the gateway).
pub fn gateway_form(cidr: &IpNet) -> String {
    format!(
        "{}/{}",
        hako_cni::overlay::gateway_of(cidr),
        cidr.prefix_len()
    )
}

/// The subnet file the CNI plugin reads (`/run/hako/subnet.env`).
pub fn subnet_env(cluster: &[IpNet], node: &[IpNet], mtu: u32) -> String {
    let mut s = String::from("# written by hako-agent\n");
    let (v4n, v6n): (Vec<_>, Vec<_>) = cluster.iter().partition(|c| matches!(c, IpNet::V4(_)));
    let (v4s, v6s): (Vec<_>, Vec<_>) = node.iter().partition(|c| matches!(c, IpNet::V4(_)));
    let join = |v: &[&IpNet], gw: bool| {
        v.iter()
            .map(|c| if gw { gateway_form(c) } else { c.to_string() })
            .collect::<Vec<_>>()
            .join(",")
    };
    if !v4n.is_empty() {
        s.push_str(&format!("HAKO_NETWORK={}\n", join(&v4n, false)));
    }
    if !v6n.is_empty() {
        s.push_str(&format!("HAKO_IPV6_NETWORK={}\n", join(&v6n, false)));
    }
    if !v4s.is_empty() {
        s.push_str(&format!("HAKO_SUBNET={}\n", join(&v4s, true)));
    }
    if !v6s.is_empty() {
        s.push_str(&format!("HAKO_IPV6_SUBNET={}\n", join(&v6s, true)));
    }
    s.push_str(&format!("HAKO_MTU={mtu}\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>, ann: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": ann},
                                      "spec": {"podCIDR": cidr}}))
        .expect("node")
    }

    #[test]
    fn peers_from_nodes() {
        let a = json!({ANN_VTEP_MAC: "02:00:00:00:00:01", ANN_PUBLIC_IP: "192.0.2.11"});
        let b = json!({ANN_VTEP_MAC: "02:00:00:00:00:02", ANN_PUBLIC_IP: "192.0.2.12",
                       ANN_POD_CIDR: "10.244.2.0/24,fd00:2::/64"});
        let nodes = vec![
            node("n1", Some("10.244.1.0/24"), a),
            node("n2", None, b),
            node("n3", Some("10.244.3.0/24"), json!({})),
            node(
                "n4",
                None,
                json!({ANN_VTEP_MAC: "02:00:00:00:00:04", ANN_PUBLIC_IP: "192.0.2.14"}),
            ),
        ];
        let p = peers(&nodes, "n1");
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(p[0].vtep_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(p[1].pod_cidr.to_string(), "fd00:2::/64");
        let p = peers(&nodes, "n2");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].node_ip.to_string(), "192.0.2.11");
        let mut gone = nodes.clone();
        gone[0].metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::chrono::Utc::now()),
        );
        assert!(
            peers(&gone, "n2").is_empty(),
            "a node being deleted is no peer"
        );
    }

    #[test]
    fn subnet_file_parses_in_the_plugin() {
        let text = subnet_env(
            &["10.244.0.0/16".parse().expect("net")],
            &[
                "10.244.3.0/24".parse().expect("net"),
                "fd00:3::/64".parse().expect("net"),
            ],
            1450,
        );
        assert!(text.contains("HAKO_SUBNET=10.244.3.1/24\n"), "{text}");
        let env = hako_cni::config::parse_subnet_env(&text).expect("plugin parses it");
        assert_eq!(env.subnets.len(), 2);
        assert_eq!(env.mtu, Some(1450));
        assert_eq!(
            parse_mac(&fmt_mac(&[0xde, 0xad, 0, 1, 2, 0xff])),
            Some([0xde, 0xad, 0, 1, 2, 0xff])
        );
        assert_eq!(parse_mac("zz"), None);
    }
}
