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

use crate::config::{Attachment, NetConf, Network};
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
}

/// The veth pair of one attachment; the container end is created inside the pod netns in
/// the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host end (`hako` + 11 hex), enslaved to the bridge and up.
    pub host: String,
    /// Container end (`CNI_IFNAME`).
    pub container: String,
    /// MTU of both ends.
    pub mtu: u32,
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
    /// Hairpin on the host end's bridge port (`hairpinMode`; goes with the veth).
    Hairpin {
        /// Host end.
        host: String,
    },
    /// Configure the container end (goes with the veth).
    Container(ContainerSpec),
}

/// What undoes a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UndoStep {
    /// Delete a host link by name (a missing one is fine); a veth takes its peer along.
    DeleteLink(String),
}

impl Step {
    /// The undo of this step, once it has succeeded. Shared objects (bridge, masquerade
    /// table) are kept, as the reference bridge plugin does; whatever the steps after the
    /// veth do lives on the veth and goes with it.
    pub fn undo(&self) -> Option<UndoStep> {
        match self {
            Step::Veth(v) => Some(UndoStep::DeleteLink(v.host.clone())),
            Step::Bridge(_) | Step::Masquerade(_) | Step::Hairpin { .. } | Step::Container(_) => {
                None
            }
        }
    }

    /// A short name for logs and tests.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Bridge(_) => "bridge",
            Step::Masquerade(_) => "masq",
            Step::Veth(_) => "veth",
            Step::Hairpin { .. } => "hairpin",
            Step::Container(_) => "container",
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

/// The container's routes: default route(s) via the gateway and configured extra routes.
pub fn container_routes(conf: &NetConf, ranges: &[&Range]) -> Vec<(IpNet, IpAddr)> {
    let mut routes = Vec::new();
    for r in ranges {
        if conf.is_default_gateway {
            let any = IpNet::new(
                if r.gateway.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                },
                0,
            )
            .unwrap_or(r.subnet);
            routes.push((any, r.gateway));
        }
        for extra in &conf.routes {
            if extra.dst.addr().is_ipv4() == r.gateway.is_ipv4() {
                routes.push((extra.dst, extra.gw.unwrap_or(r.gateway)));
            }
        }
    }
    routes
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
    })];
    if conf.ip_masq {
        steps.push(Step::Masquerade(masq::rules(
            &conf.bridge,
            &conf.data_dir,
            net,
        )));
    }
    steps.push(Step::Veth(VethSpec {
        host: host.clone(),
        container: env.ifname.clone(),
        mtu: net.mtu,
    }));
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
    }));
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
