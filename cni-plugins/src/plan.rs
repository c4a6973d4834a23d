//! The commands as data. `plan()` turns the configuration, the IPAM reservation and the
//! runtime arguments into a [`NetPlan`]: the ordered ADD steps (bridge, masquerade, veth
//! pair, hairpin, container addresses and routes), the undo of each step, and the result
//! to report once the kernel has named the MACs. `plan_del` and `plan_check` do the same
//! for DEL and CHECK, `gc_releases`/`is_orphan_veth` for GC. Pure: no netlink, no files,
//! no netns; `plugin` applies the plans through the `AttachNet`/`DetachNet` seams.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{Attachment, NetConf, Network, RouteConf};
use crate::ipam::{Owner, Range};
use crate::masq;
use crate::netlink::fmt_mac;
use crate::skel::{codes, CniError, Env};
use crate::version::{CniResult, Interface, IpConfig, Route};

/// Prefix of host-side veth names.
pub const HOST_VETH_PREFIX: &str = "hako";

/// Host-side veth name: `hako` + 11 hex digits of sha256(container id, ifname).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0u8]);
    h.update(ifname.as_bytes());
    let hex = hex::encode(h.finalize());
    format!("{HOST_VETH_PREFIX}{}", &hex[..11])
}

/// True for a host veth name this plugin makes (`hako` + 11 hex digits).
pub fn is_host_veth_name(name: &str) -> bool {
    name.starts_with(HOST_VETH_PREFIX) && name.len() == HOST_VETH_PREFIX.len() + 11
}

/// The bridge's MAC, derived from its name (locally administered, unicast).
pub fn bridge_mac(bridge: &str) -> [u8; 6] {
    let d = Sha256::digest(format!("hako-bridge\0{bridge}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&d[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The bridge as ADD wants it. An existing bridge keeps its MAC and MTU; a new one is made
/// with these, up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Bridge name (`bridge`).
    pub name: String,
    /// MTU of a new bridge.
    pub mtu: u32,
    /// MAC of a new bridge (derived from its name, so it does not follow its ports).
    pub mac: [u8; 6],
    /// Set promiscuous mode (`promiscMode`).
    pub promisc: bool,
    /// Gateway addresses to hold (`isGateway`; empty otherwise).
    pub gateways: Vec<IpNet>,
    /// Turn on IPv4 forwarding (`isGateway` with an IPv4 range).
    pub forward_ipv4: bool,
    /// Turn on IPv6 forwarding (`isGateway` with an IPv6 range).
    pub forward_ipv6: bool,
    /// `vlan` (0: none): the bridge itself a tagged member of the VLAN, and the gateway
    /// addresses on `<bridge>.<vlan>` instead of the bridge.
    pub vlan: u16,
    /// VLAN filtering on (`vlan` or `vlanTrunk` set).
    pub vlan_filtering: bool,
}

/// The veth pair of one attachment. The container end is not moved after the fact: it is
/// created inside the pod netns by the same request (`IFLA_NET_NS_FD` on the peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host end (`hako` + 11 hex), enslaved to the bridge and up.
    pub host: String,
    /// Container end (`CNI_IFNAME`).
    pub container: String,
    /// The pod netns the container end is made in (`CNI_NETNS`; applied through the
    /// namespace file opened before the plan).
    pub netns: PathBuf,
    /// MTU of both ends.
    pub mtu: u32,
    /// Fixed MAC of the container end (`runtimeConfig.mac`, `args.cni.mac`, `CNI_ARGS
    /// MAC=`); the kernel picks one otherwise.
    pub mac: Option<[u8; 6]>,
}

/// Inside the pod netns: addresses, link up, routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Interface name (`CNI_IFNAME`).
    pub ifname: String,
    /// One address per range, with the range's prefix length.
    pub addrs: Vec<IpNet>,
    /// Default route(s) via the gateway (`isDefaultGateway`), then the `ipam.routes` of
    /// the same family, per range.
    pub routes: Vec<(IpNet, IpAddr)>,
    /// IPv6 duplicate address detection (`enabledad`; off by default, as the reference).
    pub dad: bool,
}

/// One step of ADD, in the order applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ensure the bridge (shared by every pod; never undone).
    Bridge(BridgeSpec),
    /// Ensure the masquerade table (`ipMasq`; shared; never undone). Loaded when the
    /// bridge was created by this ADD or the rules changed.
    Masquerade(masq::Rules),
    /// Create the veth pair (undone by deleting the host end).
    Veth(VethSpec),
    /// The host end's port in `vlan` only, untagged and PVID (`vlan`; goes with the veth).
    PortVlan {
        /// VLAN id (PVID, untagged; 0: none).
        vid: u16,
        /// Tagged VLANs (`vlanTrunk`).
        trunk: Vec<u16>,
        /// Keep VLAN 1 as well (`preserveDefaultVlan`).
        keep_default: bool,
    },
    /// Port isolation on the host end's bridge port (`portIsolation`; goes with the veth).
    Isolated,
    /// Hairpin on the host end's bridge port (`hairpinMode`; goes with the veth).
    Hairpin {
        /// Host end.
        host: String,
    },
    /// Configure the container end (goes with the veth).
    Container(ContainerSpec),
    /// Admit only the container end's MAC from the host end (`macspoofchk`; undone by
    /// removing the attachment's rules).
    SpoofCheck {
        /// Host end.
        host: String,
    },
}

/// What undoes a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UndoStep {
    /// Delete a host link by name (a missing one is fine); a veth takes its peer along.
    DeleteLink(String),
    /// Remove an attachment's `macspoofchk` rules (host veth name).
    DeleteSpoofCheck(String),
}

impl Step {
    /// The undo of this step, once it has succeeded. Shared objects (bridge, masquerade
    /// table) are kept, as the reference bridge plugin does; whatever the steps after the
    /// veth do lives on the veth and goes with it.
    pub fn undo(&self) -> Option<UndoStep> {
        match self {
            Step::Veth(v) => Some(UndoStep::DeleteLink(v.host.clone())),
            Step::SpoofCheck { host } => Some(UndoStep::DeleteSpoofCheck(host.clone())),
            Step::Bridge(_)
            | Step::Masquerade(_)
            | Step::PortVlan { .. }
            | Step::Isolated
            | Step::Hairpin { .. }
            | Step::Container(_) => None,
        }
    }

    /// A short name for logs and tests.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Bridge(_) => "bridge",
            Step::Masquerade(_) => "masq",
            Step::Veth(_) => "veth",
            Step::PortVlan { .. } => "vlan",
            Step::Isolated => "isolated",
            Step::Hairpin { .. } => "hairpin",
            Step::Container(_) => "container",
            Step::SpoofCheck { .. } => "spoofchk",
        }
    }
}

/// The MACs the kernel reports once the links exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Macs {
    /// Bridge.
    pub bridge: [u8; 6],
    /// Host veth end.
    pub host: [u8; 6],
    /// Container veth end.
    pub container: [u8; 6],
}

/// The ADD result, waiting for the MACs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultPlan {
    /// Bridge name.
    pub bridge: String,
    /// Host veth name.
    pub host: String,
    /// Container interface name.
    pub ifname: String,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// `CNI_NETNS` as given.
    pub sandbox: String,
    /// Container addresses with their gateways.
    pub ips: Vec<(IpNet, IpAddr)>,
    /// Container routes.
    pub routes: Vec<(IpNet, IpAddr)>,
    /// The configured DNS block.
    pub dns: Value,
}

impl ResultPlan {
    /// The result: interfaces bridge, host veth, container end (index 2, which every
    /// address names).
    pub fn build(&self, macs: &Macs) -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: self.bridge.clone(),
                    mac: fmt_mac(&macs.bridge),
                    mtu: None,
                    sandbox: None,
                },
                Interface {
                    name: self.host.clone(),
                    mac: fmt_mac(&macs.host),
                    mtu: Some(self.mtu),
                    sandbox: None,
                },
                Interface {
                    name: self.ifname.clone(),
                    mac: fmt_mac(&macs.container),
                    mtu: Some(self.mtu),
                    sandbox: Some(self.sandbox.clone()),
                },
            ],
            ips: self
                .ips
                .iter()
                .map(|(address, gw)| IpConfig {
                    address: *address,
                    gateway: Some(*gw),
                    interface: Some(2),
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|(dst, gw)| Route {
                    dst: *dst,
                    gw: Some(*gw),
                })
                .collect(),
            dns: self.dns.clone(),
        }
    }
}

/// Everything ADD does after the reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct NetPlan {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The reserved addresses (released when ADD fails).
    pub reserved: Vec<IpAddr>,
    /// The result to report.
    pub result: ResultPlan,
}

impl NetPlan {
    /// The step names, in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(Step::name).collect()
    }
}

/// The container's routes: default route(s) via the gateway and configured extra routes,
/// one route per destination. An explicit default route in `ipam.routes` takes the place
/// of `isDefaultGateway`'s (with its own `gw` when it names one), so the two combined give
/// one default route, never a duplicate the kernel would refuse (EEXIST).
pub fn container_routes(conf: &NetConf, ranges: &[&Range]) -> Vec<(IpNet, IpAddr)> {
    let mut routes: Vec<(IpNet, IpAddr)> = Vec::new();
    let push = |routes: &mut Vec<(IpNet, IpAddr)>, dst: IpNet, gw: IpAddr| {
        if !routes.iter().any(|(d, _)| *d == dst) {
            routes.push((dst, gw));
        }
    };
    for r in ranges {
        let any = IpNet::new(
            if r.gateway.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            0,
        )
        .unwrap_or(r.subnet);
        let explicit_default = conf.routes.iter().any(|x| x.dst == any);
        if conf.is_default_gateway && !explicit_default {
            push(&mut routes, any, r.gateway);
        }
        for extra in &conf.routes {
            if extra.dst.addr().is_ipv4() == r.gateway.is_ipv4() {
                push(&mut routes, extra.dst, extra.gw.unwrap_or(r.gateway));
            }
        }
    }
    routes
}

/// `CNI_ARGS MAC=` (the reference's `MacEnvArgs`), when it is a unicast MAC.
pub fn env_mac(env: &Env) -> Option<[u8; 6]> {
    env.args
        .get("MAC")
        .and_then(|m| crate::config::parse_mac(m))
}

/// With a delegated IPAM: the configuration and network as the IPAM plugin's result
/// makes them. Each address becomes a one-address range whose gateway is the result's,
/// else the subnet's first address (the reference's `calcGatewayIP`); the result's routes
/// replace `ipam.routes` and its DNS block the configured one (when it has one). The MTU
/// is given (config, subnet file or default); cluster networks are the configured ones,
/// else the result's subnets.
pub fn delegated_network(conf: &NetConf, ipam: &CniResult, mtu: u32) -> (NetConf, Network) {
    let ranges: Vec<Range> = ipam
        .ips
        .iter()
        .map(|i| {
            let subnet = i.address.trunc();
            let gateway = i.gateway.unwrap_or_else(|| next_ip(subnet.network()));
            Range {
                subnet,
                start: i.address.addr(),
                end: i.address.addr(),
                gateway,
            }
        })
        .collect();
    let mut conf = conf.clone();
    conf.routes = ipam
        .routes
        .iter()
        .map(|r| RouteConf {
            dst: r.dst,
            gw: r.gw,
        })
        .collect();
    if !ipam.dns.is_null() && ipam.dns != serde_json::json!({}) {
        conf.dns = ipam.dns.clone();
    }
    let mut cluster = conf.cluster_networks.clone();
    for r in &ranges {
        if !cluster
            .iter()
            .any(|c| c.addr().is_ipv4() == r.subnet.addr().is_ipv4())
        {
            cluster.push(r.subnet);
        }
    }
    (
        conf,
        Network {
            ranges,
            mtu,
            cluster,
        },
    )
}

fn next_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(1))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))),
    }
}

/// ADD as data: from the configuration, the resolved network, the runtime arguments and
/// the reservation (one address per range, in range order), the steps and the result.
pub fn plan(env: &Env, conf: &NetConf, net: &Network, reserved: &[(IpAddr, &Range)]) -> NetPlan {
    let host = host_veth_name(&env.container_id, &env.ifname);
    let has = |v4: bool| net.ranges.iter().any(|r| r.subnet.addr().is_ipv4() == v4);
    let mut steps = vec![Step::Bridge(BridgeSpec {
        name: conf.bridge.clone(),
        mtu: net.mtu,
        mac: bridge_mac(&conf.bridge),
        promisc: conf.promisc_mode,
        gateways: if conf.is_gateway {
            net.ranges.iter().map(Range::gateway_net).collect()
        } else {
            vec![]
        },
        forward_ipv4: conf.is_gateway && has(true),
        forward_ipv6: conf.is_gateway && has(false),
        vlan: conf.vlan,
        vlan_filtering: conf.vlan != 0 || !conf.vlan_trunk.is_empty(),
    })];
    if conf.ip_masq {
        steps.push(Step::Masquerade(masq::rules(
            &conf.bridge,
            &conf.data_dir,
            net,
            conf.ip_masq_backend,
        )));
    }
    let netns = env.netns.clone().unwrap_or_default();
    steps.push(Step::Veth(VethSpec {
        host: host.clone(),
        container: env.ifname.clone(),
        netns: netns.clone(),
        mtu: net.mtu,
        mac: conf.mac.or_else(|| env_mac(env)),
    }));
    if conf.vlan != 0 || !conf.vlan_trunk.is_empty() {
        steps.push(Step::PortVlan {
            vid: conf.vlan,
            trunk: conf.vlan_trunk.clone(),
            keep_default: conf.preserve_default_vlan,
        });
    }
    if conf.port_isolation {
        steps.push(Step::Isolated);
    }
    if conf.hairpin_mode {
        steps.push(Step::Hairpin { host: host.clone() });
    }
    let addrs: Vec<IpNet> = reserved.iter().map(|(ip, r)| r.with_prefix(*ip)).collect();
    let ranges: Vec<&Range> = reserved.iter().map(|(_, r)| *r).collect();
    let routes = container_routes(conf, &ranges);
    steps.push(Step::Container(ContainerSpec {
        ifname: env.ifname.clone(),
        addrs: addrs.clone(),
        routes: routes.clone(),
        dad: conf.enable_dad,
    }));
    if conf.mac_spoof_chk {
        steps.push(Step::SpoofCheck { host: host.clone() });
    }
    NetPlan {
        steps,
        reserved: reserved.iter().map(|(ip, _)| *ip).collect(),
        result: ResultPlan {
            bridge: conf.bridge.clone(),
            host,
            ifname: env.ifname.clone(),
            mtu: net.mtu,
            sandbox: env.netns.clone().unwrap_or_default().display().to_string(),
            ips: addrs
                .into_iter()
                .zip(ranges.iter().map(|r| r.gateway))
                .collect(),
            routes,
            dns: conf.dns.clone(),
        },
    }
}

/// Appends this plugin's result to a chain's previous result (interface indexes shifted;
/// the previous DNS block kept unless empty).
pub fn merge_prev(prev: Option<CniResult>, mut result: CniResult) -> CniResult {
    let Some(mut p) = prev else {
        return result;
    };
    let off = p.interfaces.len();
    for ip in &mut result.ips {
        ip.interface = ip.interface.map(|i| i + off);
    }
    p.interfaces.append(&mut result.interfaces);
    p.ips.append(&mut result.ips);
    p.routes.append(&mut result.routes);
    if p.dns.is_null() || p.dns == serde_json::json!({}) {
        p.dns = result.dns;
    }
    p
}

/// DEL as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelPlan {
    /// Whose addresses to release.
    pub owner: Owner,
    /// Host veth to delete (the pair goes with it).
    pub host: String,
    /// When the host end is already gone: the netns and interface whose veth end to
    /// delete, if the netns is still there.
    pub container: Option<(PathBuf, String)>,
}

/// DEL: release (container id, ifname), delete the host veth, else the container end.
pub fn plan_del(env: &Env) -> DelPlan {
    DelPlan {
        owner: Owner {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
        },
        host: host_veth_name(&env.container_id, &env.ifname),
        container: env.netns.clone().map(|p| (p, env.ifname.clone())),
    }
}

/// The error CHECK reports for a difference from prevResult (code 105).
pub fn mismatch(details: String) -> CniError {
    CniError::new(
        codes::CHECK_MISMATCH,
        "attachment differs from prevResult",
        details,
    )
}

/// CHECK as data: what the attachment should look like, from prevResult.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckPlan {
    /// Container interface.
    pub ifname: String,
    /// Its MTU, when the result names one.
    pub mtu: Option<u32>,
    /// Its addresses.
    pub addrs: Vec<IpNet>,
    /// Routes that must exist through it (any next hop when `None`).
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
    /// Host veth that must be on `bridge`.
    pub host: String,
    /// Bridge.
    pub bridge: String,
    /// Whose allocation must hold `addrs`.
    pub owner: Owner,
}

/// CHECK: the expectations from a decoded prevResult (105 when it has no interface named
/// `CNI_IFNAME` with a sandbox).
pub fn plan_check(env: &Env, conf: &NetConf, prev: &CniResult) -> Result<CheckPlan, CniError> {
    let cidx = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| mismatch(format!("prevResult has no interface {}", env.ifname)))?;
    Ok(CheckPlan {
        ifname: env.ifname.clone(),
        mtu: prev.interfaces[cidx].mtu,
        addrs: prev
            .ips
            .iter()
            .filter(|i| i.interface == Some(cidx))
            .map(|i| i.address)
            .collect(),
        routes: prev.routes.iter().map(|r| (r.dst, r.gw)).collect(),
        host: host_veth_name(&env.container_id, &env.ifname),
        bridge: conf.bridge.clone(),
        owner: Owner {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
        },
    })
}

/// The container interface as CHECK observed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerView {
    /// Interface index.
    pub index: u32,
    /// MTU, when reported.
    pub mtu: Option<u32>,
    /// Addresses on it.
    pub addrs: HashSet<IpNet>,
    /// Main-table routes of both families: (dst, gateway, output interface).
    pub routes: Vec<(Option<IpNet>, Option<IpAddr>, Option<u32>)>,
}

impl CheckPlan {
    /// Compares the container side: MTU, then addresses, then routes (105 on the first
    /// difference).
    pub fn compare_container(&self, v: &ContainerView) -> Result<(), CniError> {
        let ifname = &self.ifname;
        if let (Some(w), Some(h)) = (self.mtu, v.mtu) {
            if w != h {
                return Err(mismatch(format!("{ifname} mtu {h}, expected {w}")));
            }
        }
        for a in &self.addrs {
            if !v.addrs.contains(a) {
                return Err(mismatch(format!("address {a} missing on {ifname}")));
            }
        }
        for (dst, gw) in &self.routes {
            let found = v.routes.iter().any(|(d, g, oif)| {
                *d == Some(*dst) && (gw.is_none() || g == gw) && *oif == Some(v.index)
            });
            if !found {
                let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(mismatch(format!("route {dst}{via} missing")));
            }
        }
        Ok(())
    }

    /// Compares the host side: the host veth's master is the bridge (indexes, `None` when
    /// the link is missing).
    pub fn compare_host(
        &self,
        bridge: Option<u32>,
        host_master: Option<Option<u32>>,
    ) -> Result<(), CniError> {
        match (bridge, host_master) {
            (Some(b), Some(Some(m))) if b == m => Ok(()),
            _ => Err(mismatch(format!(
                "host veth {} missing or not on {}",
                self.host, self.bridge
            ))),
        }
    }

    /// Compares the IPAM allocation: every address is held by this attachment.
    pub fn compare_store(&self, held: &HashSet<IpAddr>) -> Result<(), CniError> {
        for a in &self.addrs {
            if !held.contains(&a.addr()) {
                return Err(mismatch(format!(
                    "{} is not allocated to this attachment",
                    a.addr()
                )));
            }
        }
        Ok(())
    }
}

/// GC: the allocations whose owner is not a valid attachment, in the given order.
pub fn gc_releases(
    allocations: Vec<(IpAddr, Owner)>,
    valid: &HashSet<Attachment>,
) -> Vec<(IpAddr, Owner)> {
    allocations
        .into_iter()
        .filter(|(_, o)| {
            !valid.contains(&Attachment {
                container_id: o.container_id.clone(),
                ifname: o.ifname.clone(),
            })
        })
        .collect()
}

/// GC: true for a link on the bridge that looks like one of ours and belongs to no valid
/// attachment (`valid_hosts`: their host veth names).
pub fn is_orphan_veth(
    name: &str,
    master: Option<u32>,
    bridge: u32,
    valid_hosts: &HashSet<String>,
) -> bool {
    master == Some(bridge) && is_host_veth_name(name) && !valid_hosts.contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resolve;
    use crate::skel::parse_env;
    use serde_json::json;
    use std::collections::HashMap;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn env(id: &str, ifname: &str) -> Env {
        let m: HashMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", "/run/netns/pod"),
            ("CNI_IFNAME", ifname),
        ]
        .into_iter()
        .collect();
        parse_env(|k| m.get(k).map(|v| v.to_string())).unwrap()
    }

    /// A configuration with `extra` JSON members, resolved without a subnet file.
    fn conf(extra: &str) -> (NetConf, Network) {
        let c = NetConf::parse(
            format!(r#"{{"cniVersion":"1.1.0","name":"pods","dataDir":"/var/lib/x"{extra}}}"#)
                .as_bytes(),
        )
        .unwrap();
        let n = resolve(&c, None).unwrap();
        (c, n)
    }

    const V4: &str = r#","ipam":{"ranges":[{"subnet":"10.5.0.0/24"}]}"#;

    /// The plan for `extra`, with the given addresses reserved in range order.
    fn plan_for(extra: &str, ips: &[&str]) -> (NetConf, Network, NetPlan) {
        let (c, n) = conf(extra);
        let reserved: Vec<(IpAddr, &Range)> =
            ips.iter().zip(&n.ranges).map(|(a, r)| (ip(a), r)).collect();
        let p = plan(&env("c1", "eth0"), &c, &n, &reserved);
        (c.clone(), n.clone(), p)
    }

    fn bridge(p: &NetPlan) -> &BridgeSpec {
        match &p.steps[0] {
            Step::Bridge(b) => b,
            s => panic!("first step {s:?}"),
        }
    }

    fn container(p: &NetPlan) -> &ContainerSpec {
        match p.steps.last() {
            Some(Step::Container(c)) => c,
            s => panic!("last step {s:?}"),
        }
    }

    #[test]
    fn default_config_plans_every_step_in_order() {
        let (_, _, p) = plan_for(V4, &["10.5.0.2"]);
        assert_eq!(
            p.step_names(),
            ["bridge", "masq", "veth", "hairpin", "container"]
        );
        let host = host_veth_name("c1", "eth0");
        assert_eq!(
            bridge(&p),
            &BridgeSpec {
                name: "hako0".into(),
                mtu: 1500,
                mac: bridge_mac("hako0"),
                promisc: false,
                gateways: vec![net("10.5.0.1/24")],
                forward_ipv4: true,
                forward_ipv6: false,
                vlan: 0,
                vlan_filtering: false,
            }
        );
        assert_eq!(
            p.steps[2],
            Step::Veth(VethSpec {
                host: host.clone(),
                container: "eth0".into(),
                netns: "/run/netns/pod".into(),
                mtu: 1500,
                mac: None,
            })
        );
        assert_eq!(p.steps[3], Step::Hairpin { host: host.clone() });
        assert_eq!(
            container(&p),
            &ContainerSpec {
                ifname: "eth0".into(),
                addrs: vec![net("10.5.0.2/24")],
                routes: vec![(net("0.0.0.0/0"), ip("10.5.0.1"))],
                dad: false,
            }
        );
        assert_eq!(p.reserved, vec![ip("10.5.0.2")]);
        // Only the veth has an undo: the bridge and the masquerade table are shared.
        let undos: Vec<_> = p.steps.iter().filter_map(Step::undo).collect();
        assert_eq!(undos, vec![UndoStep::DeleteLink(host)]);
    }

    #[test]
    fn is_gateway_off_leaves_the_bridge_without_addresses_or_forwarding() {
        let (_, _, p) = plan_for(&format!(r#","isGateway":false{V4}"#), &["10.5.0.2"]);
        let b = bridge(&p);
        assert!(b.gateways.is_empty(), "{b:?}");
        assert!(!b.forward_ipv4 && !b.forward_ipv6);
        // isDefaultGateway is separate: the container still routes via the gateway.
        assert_eq!(
            container(&p).routes,
            vec![(net("0.0.0.0/0"), ip("10.5.0.1"))]
        );
    }

    #[test]
    fn ip_masq_on_renders_the_bridge_table_and_off_drops_the_step() {
        let (c, n, p) = plan_for(
            &format!(r#","clusterNetwork":"10.0.0.0/8"{V4}"#),
            &["10.5.0.2"],
        );
        let Step::Masquerade(r) = &p.steps[1] else {
            panic!("{:?}", p.steps[1]);
        };
        assert_eq!(r.table, "hako_cni_hako0");
        assert_eq!(r.marker_dir, c.data_dir);
        assert_eq!(r.script, masq::render("hako0", &n));
        assert!(
            r.script.contains(
                "ip saddr 10.5.0.0/24 ip daddr != { 10.0.0.0/8, 224.0.0.0/4 } masquerade"
            ),
            "{}",
            r.script
        );
        let (_, _, p) = plan_for(&format!(r#","ipMasq":false{V4}"#), &["10.5.0.2"]);
        assert_eq!(p.step_names(), ["bridge", "veth", "hairpin", "container"]);
    }

    #[test]
    fn hairpin_off_and_promisc_on() {
        let (_, _, p) = plan_for(
            &format!(r#","hairpinMode":false,"promiscMode":true{V4}"#),
            &["10.5.0.2"],
        );
        assert_eq!(p.step_names(), ["bridge", "masq", "veth", "container"]);
        assert!(bridge(&p).promisc);
    }

    #[test]
    fn custom_mtu_reaches_bridge_veth_and_result() {
        let (_, _, p) = plan_for(&format!(r#","mtu":9000{V4}"#), &["10.5.0.2"]);
        assert_eq!(bridge(&p).mtu, 9000);
        let Step::Veth(v) = &p.steps[2] else {
            panic!("{:?}", p.steps[2]);
        };
        assert_eq!(v.mtu, 9000);
        let r = p.result.build(&Macs::default());
        assert_eq!(r.interfaces[0].mtu, None, "the bridge reports no MTU");
        assert_eq!(r.interfaces[1].mtu, Some(9000));
        assert_eq!(r.interfaces[2].mtu, Some(9000));
    }

    #[test]
    fn dual_stack_plans_both_families() {
        let (_, _, p) = plan_for(
            r#","bridge":"br1","ipam":{"ranges":[{"subnet":"10.5.0.0/24"},{"subnet":"fd05::/64","gateway":"fd05::fe"}]}"#,
            &["10.5.0.7", "fd05::7"],
        );
        let b = bridge(&p);
        assert_eq!(b.name, "br1");
        assert_eq!(b.mac, bridge_mac("br1"));
        assert_eq!(b.gateways, vec![net("10.5.0.1/24"), net("fd05::fe/64")]);
        assert!(b.forward_ipv4 && b.forward_ipv6);
        let c = container(&p);
        assert_eq!(c.addrs, vec![net("10.5.0.7/24"), net("fd05::7/64")]);
        assert_eq!(
            c.routes,
            vec![
                (net("0.0.0.0/0"), ip("10.5.0.1")),
                (net("::/0"), ip("fd05::fe"))
            ]
        );
        assert_eq!(
            p.result.ips,
            vec![
                (net("10.5.0.7/24"), ip("10.5.0.1")),
                (net("fd05::7/64"), ip("fd05::fe"))
            ]
        );
    }

    #[test]
    fn vlan_puts_the_port_in_the_vlan_after_the_veth() {
        let (_, _, p) = plan_for(
            r#","vlan":100,"ipam":{"ranges":[{"subnet":"10.48.0.0/24"}]}"#,
            &["10.48.0.2"],
        );
        assert_eq!(
            p.step_names(),
            ["bridge", "masq", "veth", "vlan", "hairpin", "container"]
        );
        assert_eq!(bridge(&p).vlan, 100);
        assert_eq!(
            p.steps[3],
            Step::PortVlan {
                vid: 100,
                trunk: vec![],
                keep_default: false
            }
        );
        let (_, _, p) = plan_for(
            r#","ipam":{"ranges":[{"subnet":"10.48.0.0/24"}]}"#,
            &["10.48.0.2"],
        );
        assert!(!p.step_names().contains(&"vlan"));
    }

    #[test]
    fn explicit_default_route_and_is_default_gateway_give_one_route() {
        // podman's shape: isGateway + ipam.routes 0.0.0.0/0 (isDefaultGateway on by default).
        let (_, _, p) = plan_for(
            r#","ipam":{"ranges":[{"subnet":"10.88.0.0/24"}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"0.0.0.0/0","gw":"10.88.0.9"}]}"#,
            &["10.88.0.2"],
        );
        assert_eq!(
            container(&p).routes,
            [(net("0.0.0.0/0"), ip("10.88.0.1"))],
            "one default route via the gateway"
        );
        let (_, _, p) = plan_for(
            r#","isDefaultGateway":false,"ipam":{"ranges":[{"subnet":"10.88.0.0/24"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.88.0.9"}]}"#,
            &["10.88.0.2"],
        );
        assert_eq!(container(&p).routes, [(net("0.0.0.0/0"), ip("10.88.0.9"))]);
    }

    #[test]
    fn static_routes_from_ipam_follow_their_family_and_gateway() {
        let (_, _, p) = plan_for(
            r#","isDefaultGateway":false,"ipam":{"ranges":[{"subnet":"10.5.0.0/24"},{"subnet":"fd05::/64"}],"routes":[{"dst":"192.168.0.0/16"},{"dst":"fd99::/64","gw":"fd05::99"},{"dst":"172.16.0.0/12","gw":"10.5.0.254"}]}"#,
            &["10.5.0.2", "fd05::2"],
        );
        assert_eq!(
            container(&p).routes,
            vec![
                (net("192.168.0.0/16"), ip("10.5.0.1")),
                (net("172.16.0.0/12"), ip("10.5.0.254")),
                (net("fd99::/64"), ip("fd05::99")),
            ]
        );
        assert_eq!(p.result.routes, container(&p).routes);
    }

    #[test]
    fn result_names_the_macs_and_appends_to_prev_result() {
        let (_, _, p) = plan_for(
            &format!(r#","dns":{{"nameservers":["10.96.0.10"]}}{V4}"#),
            &["10.5.0.2"],
        );
        let macs = Macs {
            bridge: [2, 0, 0, 0, 0, 1],
            host: [2, 0, 0, 0, 0, 2],
            container: [2, 0, 0, 0, 0, 3],
        };
        let r = p.result.build(&macs);
        let names: Vec<_> = r.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            ["hako0", host_veth_name("c1", "eth0").as_str(), "eth0"]
        );
        assert_eq!(r.interfaces[2].mac, "02:00:00:00:00:03");
        assert_eq!(r.interfaces[2].sandbox.as_deref(), Some("/run/netns/pod"));
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.ips[0].gateway, Some(ip("10.5.0.1")));
        assert_eq!(r.dns, json!({"nameservers": ["10.96.0.10"]}));
        // Chained after a plugin that reported one interface: indexes shift by one, the
        // previous entries come first, and an empty previous DNS block is replaced.
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: "00:00:00:00:00:00".into(),
                mtu: None,
                sandbox: Some("/run/netns/pod".into()),
            }],
            ips: vec![],
            routes: vec![Route {
                dst: net("10.96.0.0/12"),
                gw: None,
            }],
            dns: json!({}),
        };
        let m = merge_prev(Some(prev), r.clone());
        assert_eq!(m.interfaces.len(), 4);
        assert_eq!(m.interfaces[0].name, "lo");
        assert_eq!(m.ips[0].interface, Some(3));
        assert_eq!(m.routes.len(), 2);
        assert_eq!(m.routes[0].dst, net("10.96.0.0/12"));
        assert_eq!(m.dns, r.dns);
        assert_eq!(merge_prev(None, r.clone()), r);
    }

    #[test]
    fn del_plan_names_the_owner_the_host_veth_and_the_fallback() {
        let p = plan_del(&env("c9", "net1"));
        assert_eq!(p.owner.container_id, "c9");
        assert_eq!(p.owner.ifname, "net1");
        assert_eq!(p.host, host_veth_name("c9", "net1"));
        assert_eq!(
            p.container,
            Some((PathBuf::from("/run/netns/pod"), "net1".to_string()))
        );
    }

    #[test]
    fn check_compares_mtu_addresses_routes_host_and_store() {
        let (c, _, p) = plan_for(V4, &["10.5.0.2"]);
        let prev = p.result.build(&Macs::default());
        let want = plan_check(&env("c1", "eth0"), &c, &prev).unwrap();
        assert_eq!(want.addrs, vec![net("10.5.0.2/24")]);
        let good = ContainerView {
            index: 7,
            mtu: Some(1500),
            addrs: [net("10.5.0.2/24"), net("fe80::1/64")]
                .into_iter()
                .collect(),
            routes: vec![(Some(net("0.0.0.0/0")), Some(ip("10.5.0.1")), Some(7))],
        };
        want.compare_container(&good).unwrap();
        for (view, needle) in [
            (
                ContainerView {
                    mtu: Some(1400),
                    ..good.clone()
                },
                "eth0 mtu 1400, expected 1500",
            ),
            (
                ContainerView {
                    addrs: HashSet::new(),
                    ..good.clone()
                },
                "address 10.5.0.2/24 missing on eth0",
            ),
            (
                ContainerView {
                    routes: vec![(Some(net("0.0.0.0/0")), Some(ip("10.5.0.9")), Some(7))],
                    ..good.clone()
                },
                "route 0.0.0.0/0 via 10.5.0.1 missing",
            ),
            (
                ContainerView {
                    index: 8,
                    ..good.clone()
                },
                "route 0.0.0.0/0 via 10.5.0.1 missing",
            ),
        ] {
            let e = want.compare_container(&view).unwrap_err();
            assert_eq!(
                (e.code, e.details.as_str()),
                (codes::CHECK_MISMATCH, needle)
            );
        }
        want.compare_host(Some(3), Some(Some(3))).unwrap();
        for (br, host) in [
            (None, Some(Some(3))),
            (Some(3), None),
            (Some(3), Some(Some(4))),
            (Some(3), Some(None)),
        ] {
            assert_eq!(
                want.compare_host(br, host).unwrap_err().code,
                codes::CHECK_MISMATCH
            );
        }
        want.compare_store(&[ip("10.5.0.2")].into_iter().collect())
            .unwrap();
        let e = want.compare_store(&HashSet::new()).unwrap_err();
        assert_eq!(e.details, "10.5.0.2 is not allocated to this attachment");
        // A prevResult without this interface is a mismatch before anything is read.
        let e = plan_check(&env("c1", "eth1"), &c, &prev).unwrap_err();
        assert_eq!(e.code, codes::CHECK_MISMATCH);
    }

    #[test]
    fn gc_keeps_valid_attachments_and_only_our_orphan_veths() {
        let owner = |c: &str, i: &str| Owner {
            container_id: c.into(),
            ifname: i.into(),
        };
        let valid: HashSet<Attachment> = [Attachment {
            container_id: "keep".into(),
            ifname: "eth0".into(),
        }]
        .into_iter()
        .collect();
        let allocs = vec![
            (ip("10.5.0.2"), owner("keep", "eth0")),
            (ip("10.5.0.3"), owner("keep", "eth1")),
            (ip("10.5.0.4"), owner("gone", "eth0")),
        ];
        let released: Vec<IpAddr> = gc_releases(allocs, &valid)
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(released, vec![ip("10.5.0.3"), ip("10.5.0.4")]);
        let hosts: HashSet<String> = [host_veth_name("keep", "eth0")].into_iter().collect();
        let gone = host_veth_name("gone", "eth0");
        assert!(is_orphan_veth(&gone, Some(4), 4, &hosts));
        assert!(!is_orphan_veth(
            &host_veth_name("keep", "eth0"),
            Some(4),
            4,
            &hosts
        ));
        assert!(!is_orphan_veth(&gone, Some(5), 4, &hosts), "other bridge");
        assert!(!is_orphan_veth(&gone, None, 4, &hosts), "no bridge");
        assert!(!is_orphan_veth("hakoeth", Some(4), 4, &hosts), "not ours");
        assert!(
            !is_orphan_veth("vethabcdef12345", Some(4), 4, &hosts),
            "not ours"
        );
    }
}
