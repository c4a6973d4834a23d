//! Multi-node test topologies: "nodes" are network namespaces joined by a veth/bridge
//! underlay on 192.0.2.0/24 (TEST-NET-1); "pods" are namespaces attached to a node.
//! Nothing here touches the root namespace. Effectful.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::netns::NetNs;

/// Underlay prefix length.
pub const UNDERLAY_PREFIX: u8 = 24;

/// Underlay address of node `i` (0-based): 192.0.2.11, .12, ...
pub fn underlay_ip(i: usize) -> Ipv4Addr {
    let last = u8::try_from(11 + i).expect("at most 200 test nodes");
    Ipv4Addr::new(192, 0, 2, last)
}

/// A node: its namespace and its underlay address on `eth0`.
#[derive(Debug)]
pub struct Node {
    /// The node's network namespace.
    pub ns: NetNs,
    /// The node's underlay address (on `eth0`).
    pub ip: Ipv4Addr,
    /// The underlay interface name inside the node.
    pub ifname: String,
}

/// N nodes on one L2 underlay. The switch namespace holds the bridge `br0`; every node has
/// `eth0` with `192.0.2.(11+i)/24`. Dropping the topology removes every namespace (and with
/// them every link inside).
#[derive(Debug)]
pub struct Topology {
    /// Nodes in creation order.
    pub nodes: Vec<Node>,
    /// The namespace holding the underlay bridge. Dropped last.
    pub switch: NetNs,
}

impl Topology {
    /// Builds `n` nodes on an underlay with the given MTU (1500 for the usual case).
    pub fn new(n: usize, mtu: u32) -> Result<Self> {
        let switch = NetNs::new("sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "mtu", &mtu.to_string(), "up"])?;
        let mut topo = Topology {
            nodes: Vec::with_capacity(n),
            switch,
        };
        for i in 0..n {
            let ns = NetNs::new("node")?;
            let port = format!("p{i}");
            veth(&topo.switch, &port, &ns, "eth0")?;
            topo.switch.ip(&[
                "link",
                "set",
                &port,
                "master",
                "br0",
                "mtu",
                &mtu.to_string(),
                "up",
            ])?;
            let ip = underlay_ip(i);
            ns.ip(&["link", "set", "eth0", "mtu", &mtu.to_string(), "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{ip}/{UNDERLAY_PREFIX}"),
                "dev",
                "eth0",
            ])?;
            topo.nodes.push(Node {
                ns,
                ip,
                ifname: "eth0".into(),
            });
        }
        Ok(topo)
    }
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, both down.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    Ok(())
}

impl Node {
    /// Adds a bridge `name` with `gw_cidr` (e.g. `10.244.1.1/24`) inside the node, up.
    pub fn add_bridge(&self, name: &str, gw_cidr: &str) -> Result<()> {
        self.ns.ip(&["link", "add", name, "type", "bridge"])?;
        self.ns.ip(&["addr", "add", gw_cidr, "dev", name])?;
        self.ns.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// Creates a pod namespace attached to `bridge` by a veth, with `eth0` = `cidr` and a
    /// default route via `gw`. Host-side veth names are `v<ns-suffix>`-style and unique in
    /// the node.
    pub fn add_pod(&self, bridge: &str, cidr: &str, gw: &str) -> Result<NetNs> {
        let pod = NetNs::new("pod")?;
        let host_if = host_ifname(pod.name());
        veth(&self.ns, &host_if, &pod, "eth0")?;
        self.ns
            .ip(&["link", "set", &host_if, "master", bridge, "up"])?;
        pod.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", gw])?;
        Ok(pod)
    }
}

/// A host-side interface name (at most 15 bytes) derived from a namespace name.
fn host_ifname(ns_name: &str) -> String {
    let tail: String = ns_name
        .chars()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("v{}", tail.replace('-', ""))
}

/// One query over a connected UDP socket (read timeout set by the caller): sends "q" until an
/// answer comes, at most 10 times; the answer (a backend's name), or "" when none came.
pub fn udp_ask(sock: &std::net::UdpSocket) -> String {
    let mut buf = [0u8; 16];
    for _ in 0..10 {
        let _ = sock.send(b"q");
        if let Ok(n) = sock.recv(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    String::new()
}
