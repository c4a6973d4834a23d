//! The commands: ADD (bridge, veth, addresses, routes, masquerade) under an undo guard,
//! idempotent DEL, CHECK, GC and STATUS. Effectful (netlink, netns entry, IPAM store, nft).

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlag, LinkInfo, LinkMessage,
};
use netlink_packet_route::AddressFamily;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{resolve, Attachment, NetConf, Network};
use crate::ipam::{IpamError, Range, Store};
use crate::netlink::{self, fmt_mac, Netlink, NlError};
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

/// The bridge's MAC, derived from its name (locally administered, unicast).
pub fn bridge_mac(bridge: &str) -> [u8; 6] {
    let d = Sha256::digest(format!("hako-bridge\0{bridge}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&d[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// True when the link is of `kind`.
fn is_kind(l: &LinkMessage, kind: InfoKind) -> bool {
    l.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(k) if *k == kind)))
    })
}

fn nl_err(e: NlError) -> CniError {
    CniError::new(codes::NETLINK, "netlink request failed", e.to_string())
}

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Exhausted(..) => CniError::new(
            codes::IPAM_EXHAUSTED,
            "address range exhausted",
            e.to_string(),
        ),
        _ => CniError::new(codes::IPAM_STORE, "IPAM store failed", e.to_string()),
    }
}

/// Runs `f` on a fresh OS thread inside the network namespace `ns`.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> Result<T, CniError> {
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| CniError::new(codes::NETNS, "cannot enter netns", e.to_string()))?;
            Ok(f())
        });
        h.join().unwrap_or_else(|_| {
            Err(CniError::new(
                codes::INTERNAL,
                "netns worker panicked",
                String::new(),
            ))
        })
    })
}

fn open_netns(path: &Path, missing_code: u32) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            missing_code,
            "cannot open network namespace",
            format!("{}: {e}", path.display()),
        )
    })
}

fn network(conf: &NetConf) -> Result<Network, CniError> {
    let text = match std::fs::read_to_string(&conf.subnet_file) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(CniError::new(
                codes::IO,
                "cannot read subnet file",
                format!("{}: {e}", conf.subnet_file.display()),
            ))
        }
    };
    Ok(resolve(conf, text.as_deref())?)
}

fn write_sysctl_1(path: &str) {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = std::fs::write(path, "1") {
        tracing::warn!("cannot set {path}: {e}");
    }
}

/// Ensures the bridge with its gateway addresses, up. Returns (bridge, newly created).
fn ensure_bridge(
    nl: &mut Netlink,
    conf: &NetConf,
    net: &Network,
) -> Result<(LinkMessage, bool), CniError> {
    let mut created = false;
    let br = match nl.link_by_name(&conf.bridge).map_err(nl_err)? {
        Some(b) => b,
        None => {
            let mut m = LinkMessage::default();
            m.attributes
                .push(LinkAttribute::IfName(conf.bridge.clone()));
            m.attributes.push(LinkAttribute::Mtu(net.mtu));
            // A fixed MAC keeps the bridge from taking over its ports' addresses.
            m.attributes
                .push(LinkAttribute::Address(bridge_mac(&conf.bridge).to_vec()));
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            m.header.flags = vec![LinkFlag::Up];
            m.header.change_mask = vec![LinkFlag::Up];
            match nl.link_add(&format!("add bridge {}", conf.bridge), m) {
                Ok(()) => created = true,
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(nl_err(e)),
            }
            nl.link_by_name(&conf.bridge)
                .map_err(nl_err)?
                .ok_or_else(|| {
                    CniError::new(
                        codes::TRY_AGAIN,
                        "bridge vanished while being created",
                        conf.bridge.clone(),
                    )
                })?
        }
    };
    if !is_kind(&br, InfoKind::Bridge) {
        return Err(CniError::new(
            codes::INVALID_CONFIG,
            "invalid network configuration",
            format!("{} exists and is not a bridge", conf.bridge),
        ));
    }
    let idx = br.header.index;
    if !br.header.flags.contains(&LinkFlag::Up) {
        nl.link_up(idx).map_err(nl_err)?;
    }
    if conf.promisc_mode && !br.header.flags.contains(&LinkFlag::Promisc) {
        let mut m = LinkMessage::default();
        m.header.index = idx;
        m.header.flags = vec![LinkFlag::Promisc];
        m.header.change_mask = vec![LinkFlag::Promisc];
        nl.link_set("set bridge promisc", m).map_err(nl_err)?;
    }
    if conf.is_gateway {
        let have: HashSet<IpNet> = nl
            .addrs(idx)
            .map_err(nl_err)?
            .iter()
            .filter_map(netlink::addr_net)
            .collect();
        for r in &net.ranges {
            let gw = r.gateway_net();
            if !have.contains(&gw) {
                netlink::ignore_exists(nl.addr_add(idx, gw)).map_err(nl_err)?;
            }
        }
        if net.ranges.iter().any(|r| r.subnet.addr().is_ipv4()) {
            write_sysctl_1("/proc/sys/net/ipv4/ip_forward");
        }
        if net.ranges.iter().any(|r| r.subnet.addr().is_ipv6()) {
            write_sysctl_1("/proc/sys/net/ipv6/conf/all/forwarding");
        }
    }
    Ok((br, created))
}

fn set_hairpin(nl: &mut Netlink, index: u32) -> Result<(), NlError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
            true,
        )])),
    ]));
    // Port options travel in IFLA_INFO_SLAVE_DATA, which only RTM_NEWLINK applies.
    nl.link_change("set hairpin", m)
}

/// The bridge as ADD found or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeLink {
    /// Interface index.
    pub index: u32,
    /// MAC address.
    pub mac: [u8; 6],
    /// Made by this invocation.
    pub created: bool,
}

/// The host side of a new veth pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLink {
    /// Interface index.
    pub index: u32,
    /// MAC address.
    pub mac: [u8; 6],
}

/// The effects of ADD, one method per step (netlink in `LinkNet`, a recorder in tests).
pub trait AttachNet {
    /// Ensures the bridge with the gateway addresses, up.
    fn ensure_bridge(&mut self, conf: &NetConf, net: &Network) -> Result<BridgeLink, CniError>;
    /// Ensures the masquerade rules (forced when the bridge was just created).
    fn ensure_masq(
        &mut self,
        conf: &NetConf,
        net: &Network,
        bridge_created: bool,
    ) -> Result<(), CniError>;
    /// Creates the veth pair `host` (on the bridge, up) / `ifname` (inside `ns`).
    fn create_veth(
        &mut self,
        host: &str,
        ifname: &str,
        mtu: u32,
        bridge: u32,
        ns: &File,
    ) -> Result<HostLink, CniError>;
    /// Turns on hairpin mode on a bridge port.
    fn set_hairpin(&mut self, index: u32) -> Result<(), CniError>;
    /// Inside `ns`: addresses, link up, routes; returns the interface's MAC.
    fn configure_container(
        &mut self,
        ns: &File,
        ifname: &str,
        addrs: &[IpNet],
        routes: &[(IpNet, IpAddr)],
    ) -> Result<[u8; 6], CniError>;
    /// Deletes a host link by name (missing is fine).
    fn delete_link(&mut self, name: &str) -> Result<(), CniError>;
}

/// `AttachNet` over rtnetlink and nft.
pub struct LinkNet(pub Netlink);

impl AttachNet for LinkNet {
    fn ensure_bridge(&mut self, conf: &NetConf, net: &Network) -> Result<BridgeLink, CniError> {
        let (br, created) = ensure_bridge(&mut self.0, conf, net)?;
        Ok(BridgeLink {
            index: br.header.index,
            mac: netlink::link_mac(&br).unwrap_or_default(),
            created,
        })
    }

    fn ensure_masq(
        &mut self,
        conf: &NetConf,
        net: &Network,
        bridge_created: bool,
    ) -> Result<(), CniError> {
        crate::masq::ensure(conf, net, bridge_created)
    }

    fn create_veth(
        &mut self,
        host: &str,
        ifname: &str,
        mtu: u32,
        bridge: u32,
        ns: &File,
    ) -> Result<HostLink, CniError> {
        let nl = &mut self.0;
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(ifname.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(mtu));
        peer.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(host.to_string()));
        m.attributes.push(LinkAttribute::Mtu(mtu));
        m.attributes.push(LinkAttribute::Controller(bridge));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        m.header.flags = vec![LinkFlag::Up];
        m.header.change_mask = vec![LinkFlag::Up];
        match nl.link_add(&format!("add veth {host}"), m) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {
                return Err(CniError::new(
                    codes::EXISTS,
                    "attachment exists",
                    format!("{host} on the host or {ifname} in the container already exists"),
                ))
            }
            Err(e) => return Err(nl_err(e)),
        }
        let l = nl.link_by_name(host).map_err(nl_err)?.ok_or_else(|| {
            CniError::new(codes::TRY_AGAIN, "host veth vanished", host.to_string())
        })?;
        Ok(HostLink {
            index: l.header.index,
            mac: netlink::link_mac(&l).unwrap_or_default(),
        })
    }

    fn set_hairpin(&mut self, index: u32) -> Result<(), CniError> {
        set_hairpin(&mut self.0, index).map_err(nl_err)
    }

    fn configure_container(
        &mut self,
        ns: &File,
        ifname: &str,
        addrs: &[IpNet],
        routes: &[(IpNet, IpAddr)],
    ) -> Result<[u8; 6], CniError> {
        in_netns(ns, move || -> Result<[u8; 6], CniError> {
            let mut nl = Netlink::open().map_err(nl_err)?;
            let link = nl.link_by_name(ifname).map_err(nl_err)?.ok_or_else(|| {
                CniError::new(
                    codes::NETLINK,
                    "container interface missing",
                    ifname.to_string(),
                )
            })?;
            let idx = link.header.index;
            for a in addrs {
                nl.addr_add(idx, *a).map_err(nl_err)?;
            }
            nl.link_up(idx).map_err(nl_err)?;
            for (dst, gw) in routes {
                nl.route_add(*dst, Some(*gw), idx, false, false)
                    .map_err(nl_err)?;
            }
            Ok(netlink::link_mac(&link).unwrap_or_default())
        })?
    }

    fn delete_link(&mut self, name: &str) -> Result<(), CniError> {
        self.0.link_del_name(name).map_err(nl_err)
    }
}

/// What ADD created, undone on failure.
struct Undo<'a> {
    data_dir: &'a Path,
    ips: Vec<IpAddr>,
    host_veth: Option<String>,
}

impl Undo<'_> {
    fn run(&self, net: &mut dyn AttachNet) {
        if let Some(name) = &self.host_veth {
            if let Err(e) = net.delete_link(name) {
                tracing::warn!("undo: deleting {name}: {e}");
            }
        }
        if !self.ips.is_empty() {
            match Store::open(self.data_dir) {
                Ok(s) => {
                    for ip in &self.ips {
                        if let Err(e) = s.release(*ip) {
                            tracing::warn!("undo: releasing {ip}: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("undo: {e}"),
            }
        }
    }
}

/// ADD: returns the result JSON in the requested version's shape.
pub fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let net = network(conf)?;
    let netns_path = env.netns.clone().unwrap_or_default();
    let ns = open_netns(&netns_path, codes::INVALID_ENV)?;
    let mut links = LinkNet(Netlink::open().map_err(nl_err)?);
    add_with(&mut links, env, conf, &net, &ns)
}

/// ADD over any `AttachNet`: reserve, attach, build the result; undo everything on failure.
pub fn add_with(
    links: &mut dyn AttachNet,
    env: &Env,
    conf: &NetConf,
    net: &Network,
    ns: &File,
) -> Result<Value, CniError> {
    let prev = match &conf.prev_result {
        Some(p) => Some(CniResult::parse(p).map_err(|e| {
            CniError::new(codes::DECODE, "failed to decode prevResult", e.to_string())
        })?),
        None => None,
    };
    // Reserve addresses first: the lock is held only for this.
    let mut undo = Undo {
        data_dir: &conf.data_dir,
        ips: vec![],
        host_veth: None,
    };
    let ips: Vec<(IpAddr, &Range)> = {
        let store = Store::open(&conf.data_dir).map_err(ipam_err)?;
        if !store
            .find(&env.container_id, &env.ifname)
            .map_err(ipam_err)?
            .is_empty()
        {
            return Err(CniError::new(
                codes::EXISTS,
                "attachment exists",
                format!(
                    "{} {} already holds addresses; DEL it first",
                    env.container_id, env.ifname
                ),
            ));
        }
        let mut used = store.used().map_err(ipam_err)?;
        let mut out = Vec::new();
        for (i, r) in net.ranges.iter().enumerate() {
            match store.allocate(i, r, &mut used, &env.container_id, &env.ifname) {
                Ok(ip) => {
                    undo.ips.push(ip);
                    out.push((ip, r));
                }
                Err(e) => {
                    drop(store);
                    undo.run(links);
                    return Err(ipam_err(e));
                }
            }
        }
        out
    };
    let netns_path = env.netns.clone().unwrap_or_default();
    match attach(links, env, conf, net, ns, &netns_path, &ips, &mut undo) {
        Ok(mut result) => {
            if let Some(mut p) = prev {
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
                result = p;
            }
            Ok(result.render(&conf.cni_version))
        }
        Err(e) => {
            undo.run(links);
            Err(e)
        }
    }
}

/// The container's routes: default route(s) via the gateway and configured extra routes.
pub fn container_routes(conf: &NetConf, ranges: &[&Range]) -> Vec<(IpNet, IpAddr)> {
    let mut routes = Vec::new();
    for r in ranges {
        if conf.is_default_gateway {
            let any = IpNet::new(
                if r.gateway.is_ipv4() {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
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

#[allow(clippy::too_many_arguments)]
fn attach(
    links: &mut dyn AttachNet,
    env: &Env,
    conf: &NetConf,
    net: &Network,
    ns: &File,
    netns_path: &Path,
    ips: &[(IpAddr, &Range)],
    undo: &mut Undo<'_>,
) -> Result<CniResult, CniError> {
    let br = links.ensure_bridge(conf, net)?;
    if conf.ip_masq {
        links.ensure_masq(conf, net, br.created)?;
    }
    let host = host_veth_name(&env.container_id, &env.ifname);
    let host_link = links.create_veth(&host, &env.ifname, net.mtu, br.index, ns)?;
    undo.host_veth = Some(host.clone());
    if conf.hairpin_mode {
        links.set_hairpin(host_link.index)?;
    }
    let addrs: Vec<IpNet> = ips.iter().map(|(ip, r)| r.with_prefix(*ip)).collect();
    let ranges: Vec<&Range> = ips.iter().map(|(_, r)| *r).collect();
    let routes = container_routes(conf, &ranges);
    let cmac = links.configure_container(ns, &env.ifname, &addrs, &routes)?;
    let mut result = CniResult {
        interfaces: vec![
            Interface {
                name: conf.bridge.clone(),
                mac: fmt_mac(&br.mac),
                mtu: None,
                sandbox: None,
            },
            Interface {
                name: host,
                mac: fmt_mac(&host_link.mac),
                mtu: Some(net.mtu),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: fmt_mac(&cmac),
                mtu: Some(net.mtu),
                sandbox: Some(netns_path.display().to_string()),
            },
        ],
        ips: vec![],
        routes: vec![],
        dns: conf.dns.clone(),
    };
    for ((_, r), a) in ips.iter().zip(&addrs) {
        result.ips.push(IpConfig {
            address: *a,
            gateway: Some(r.gateway),
            interface: Some(2),
        });
    }
    result.routes = routes
        .into_iter()
        .map(|(dst, gw)| Route { dst, gw: Some(gw) })
        .collect();
    tracing::info!(ips = ?addrs, "attached");
    Ok(result)
}

/// DEL: releases the addresses and removes the veth; anything missing is success.
pub fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    {
        let store = Store::open(&conf.data_dir).map_err(ipam_err)?;
        let released = store
            .release_owner(&env.container_id, &env.ifname)
            .map_err(ipam_err)?;
        tracing::info!(ips = ?released, "released");
    }
    let host = host_veth_name(&env.container_id, &env.ifname);
    let mut nl = Netlink::open().map_err(nl_err)?;
    let had_host = nl.link_by_name(&host).map_err(nl_err)?.is_some();
    nl.link_del_name(&host).map_err(nl_err)?;
    if !had_host {
        // Deleting the host end removes the pair; without it, clean the container side.
        if let Some(p) = &env.netns {
            if let Ok(ns) = File::open(p) {
                let ifname = env.ifname.clone();
                in_netns(&ns, move || -> Result<(), CniError> {
                    let mut nl = Netlink::open().map_err(nl_err)?;
                    if let Some(l) = nl.link_by_name(&ifname).map_err(nl_err)? {
                        if is_kind(&l, InfoKind::Veth) {
                            netlink::ignore_missing(nl.link_del_index(l.header.index))
                                .map_err(nl_err)?;
                        }
                    }
                    Ok(())
                })??;
            }
        }
    }
    Ok(())
}

fn mismatch(details: String) -> CniError {
    CniError::new(
        codes::CHECK_MISMATCH,
        "attachment differs from prevResult",
        details,
    )
}

/// CHECK: the container interface, its addresses and routes, the host veth and the IPAM
/// allocation match the previous result.
pub fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            codes::INVALID_CONFIG,
            "invalid network configuration",
            "CHECK needs prevResult",
        )
    })?;
    let prev = CniResult::parse(prev)
        .map_err(|e| CniError::new(codes::DECODE, "failed to decode prevResult", e.to_string()))?;
    let netns_path = env.netns.clone().unwrap_or_default();
    let ns = open_netns(&netns_path, codes::UNKNOWN_CONTAINER)?;
    let cidx = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| mismatch(format!("prevResult has no interface {}", env.ifname)))?;
    let want_addrs: Vec<IpNet> = prev
        .ips
        .iter()
        .filter(|i| i.interface == Some(cidx))
        .map(|i| i.address)
        .collect();
    let want_mtu = prev.interfaces[cidx].mtu;
    let want_routes: Vec<(IpNet, Option<IpAddr>)> =
        prev.routes.iter().map(|r| (r.dst, r.gw)).collect();
    let ifname = env.ifname.clone();
    let want_addrs_in = want_addrs.clone();
    in_netns(&ns, move || -> Result<(), CniError> {
        let want_addrs = want_addrs_in;
        let mut nl = Netlink::open().map_err(nl_err)?;
        let link = nl.link_by_name(&ifname).map_err(nl_err)?.ok_or_else(|| {
            CniError::new(
                codes::UNKNOWN_CONTAINER,
                "container interface missing",
                format!("no {ifname} in the container"),
            )
        })?;
        let idx = link.header.index;
        if let (Some(w), Some(h)) = (want_mtu, netlink::link_mtu(&link)) {
            if w != h {
                return Err(mismatch(format!("{ifname} mtu {h}, expected {w}")));
            }
        }
        let have: HashSet<IpNet> = nl
            .addrs(idx)
            .map_err(nl_err)?
            .iter()
            .filter_map(netlink::addr_net)
            .collect();
        for a in &want_addrs {
            if !have.contains(a) {
                return Err(mismatch(format!("address {a} missing on {ifname}")));
            }
        }
        let mut routes = nl.routes(AddressFamily::Inet).map_err(nl_err)?;
        routes.extend(nl.routes(AddressFamily::Inet6).map_err(nl_err)?);
        for (dst, gw) in &want_routes {
            let found = routes.iter().any(|r| {
                netlink::route_dst(r) == Some(*dst)
                    && (gw.is_none() || netlink::route_gw(r) == *gw)
                    && netlink::route_oif(r) == Some(idx)
            });
            if !found {
                let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(mismatch(format!("route {dst}{via} missing")));
            }
        }
        Ok(())
    })??;
    let host = host_veth_name(&env.container_id, &env.ifname);
    let mut nl = Netlink::open().map_err(nl_err)?;
    let br = nl.link_by_name(&conf.bridge).map_err(nl_err)?;
    let hl = nl.link_by_name(&host).map_err(nl_err)?;
    match (br, hl) {
        (Some(b), Some(h)) if netlink::link_master(&h) == Some(b.header.index) => {}
        _ => {
            return Err(mismatch(format!(
                "host veth {host} missing or not on {}",
                conf.bridge
            )))
        }
    }
    let store = Store::open(&conf.data_dir).map_err(ipam_err)?;
    let held: HashSet<IpAddr> = store
        .find(&env.container_id, &env.ifname)
        .map_err(ipam_err)?
        .into_iter()
        .collect();
    for a in &want_addrs {
        if !held.contains(&a.addr()) {
            return Err(mismatch(format!(
                "{} is not allocated to this attachment",
                a.addr()
            )));
        }
    }
    Ok(())
}

/// STATUS: ranges resolvable, IPAM store usable, a free address left.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |d: String| CniError::new(codes::NOT_AVAILABLE, "plugin not available", d);
    let net = network(conf).map_err(|e| unavailable(e.details))?;
    let store = Store::open(&conf.data_dir).map_err(|e| unavailable(e.to_string()))?;
    let probe = conf.data_dir.join(".status-probe");
    std::fs::write(&probe, b"")
        .map_err(|e| unavailable(format!("{} not writable: {e}", conf.data_dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    let used = store.used().map_err(|e| unavailable(e.to_string()))?;
    let mut nl = Netlink::open().map_err(|e| unavailable(e.to_string()))?;
    if let Some(br) = nl
        .link_by_name(&conf.bridge)
        .map_err(|e| unavailable(e.to_string()))?
    {
        if !is_kind(&br, InfoKind::Bridge) {
            return Err(unavailable(format!(
                "{} exists and is not a bridge",
                conf.bridge
            )));
        }
    }
    for r in &net.ranges {
        if r.next_free(None, &used).is_none() {
            return Err(unavailable(format!("range {} is exhausted", r.subnet)));
        }
    }
    Ok(())
}

/// GC: releases allocations and removes host veths not in `cni.dev/valid-attachments`.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    // Without the list every allocation would look stale: refuse rather than wipe.
    let valid: HashSet<Attachment> = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| {
            CniError::new(
                codes::INVALID_CONFIG,
                "invalid network configuration",
                "GC needs cni.dev/valid-attachments",
            )
        })?
        .into_iter()
        .collect();
    let valid_hosts: HashSet<String> = valid
        .iter()
        .map(|a| host_veth_name(&a.container_id, &a.ifname))
        .collect();
    {
        let store = Store::open(&conf.data_dir).map_err(ipam_err)?;
        for (ip, owner) in store.allocations().map_err(ipam_err)? {
            let a = Attachment {
                container_id: owner.container_id,
                ifname: owner.ifname,
            };
            if !valid.contains(&a) {
                tracing::info!(%ip, container = %a.container_id, "gc: releasing");
                store.release(ip).map_err(ipam_err)?;
            }
        }
    }
    let mut nl = Netlink::open().map_err(nl_err)?;
    let Some(br) = nl.link_by_name(&conf.bridge).map_err(nl_err)? else {
        return Ok(());
    };
    for l in nl.links().map_err(nl_err)? {
        let Some(name) = netlink::link_name(&l) else {
            continue;
        };
        if netlink::link_master(&l) == Some(br.header.index)
            && name.starts_with(HOST_VETH_PREFIX)
            && name.len() == HOST_VETH_PREFIX.len() + 11
            && !valid_hosts.contains(name)
        {
            tracing::info!(link = name, "gc: removing orphan veth");
            netlink::ignore_missing(nl.link_del_index(l.header.index)).map_err(nl_err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("hako"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(host_veth_name("ab", "ceth0"), host_veth_name("abc", "eth0"));
    }

    use crate::config::resolve;
    use crate::skel::parse_env;
    use std::collections::HashMap;

    /// Records every step; fails the step named in `fail_at`.
    #[derive(Default)]
    struct Fake {
        fail_at: Option<&'static str>,
        steps: Vec<String>,
        links: HashSet<String>,
    }

    impl Fake {
        fn step(&mut self, s: &'static str) -> Result<(), CniError> {
            self.steps.push(s.to_string());
            if self.fail_at == Some(s) {
                return Err(CniError::new(codes::NETLINK, "injected", s));
            }
            Ok(())
        }
    }

    impl AttachNet for Fake {
        fn ensure_bridge(&mut self, _: &NetConf, _: &Network) -> Result<BridgeLink, CniError> {
            self.step("bridge")?;
            Ok(BridgeLink {
                index: 1,
                mac: [2, 0, 0, 0, 0, 1],
                created: true,
            })
        }
        fn ensure_masq(&mut self, _: &NetConf, _: &Network, created: bool) -> Result<(), CniError> {
            assert!(created);
            self.step("masq")
        }
        fn create_veth(
            &mut self,
            host: &str,
            _: &str,
            mtu: u32,
            bridge: u32,
            _: &File,
        ) -> Result<HostLink, CniError> {
            assert_eq!((mtu, bridge), (1400, 1));
            self.step("veth")?;
            self.links.insert(host.to_string());
            Ok(HostLink {
                index: 5,
                mac: [2, 0, 0, 0, 0, 5],
            })
        }
        fn set_hairpin(&mut self, index: u32) -> Result<(), CniError> {
            assert_eq!(index, 5);
            self.step("hairpin")
        }
        fn configure_container(
            &mut self,
            _: &File,
            _: &str,
            addrs: &[IpNet],
            routes: &[(IpNet, IpAddr)],
        ) -> Result<[u8; 6], CniError> {
            assert_eq!(addrs.len(), 2);
            assert_eq!(routes.len(), 3, "two defaults and one extra route");
            self.step("container")?;
            Ok([2, 0, 0, 0, 0, 9])
        }
        fn delete_link(&mut self, name: &str) -> Result<(), CniError> {
            self.steps.push("delete".into());
            self.links.remove(name);
            Ok(())
        }
    }

    fn setup(dir: &Path) -> (Env, NetConf, Network) {
        let conf = NetConf::parse(
            format!(
                r#"{{"cniVersion":"1.1.0","name":"n","mtu":1400,"dataDir":"{}","ipam":{{"ranges":[{{"subnet":"10.5.0.0/24"}},{{"subnet":"fd05::/64"}}],"routes":[{{"dst":"192.168.0.0/16"}}]}}}}"#,
                dir.display()
            )
            .as_bytes(),
        )
        .unwrap();
        let net = resolve(&conf, None).unwrap();
        let m: HashMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .collect();
        let env = parse_env(|k| m.get(k).map(|v| v.to_string())).unwrap();
        (env, conf, net)
    }

    #[test]
    fn add_success_builds_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let (env, conf, net) = setup(dir.path());
        let ns = File::open("/dev/null").unwrap();
        let mut f = Fake::default();
        let r = add_with(&mut f, &env, &conf, &net, &ns).unwrap();
        assert_eq!(f.steps, ["bridge", "masq", "veth", "hairpin", "container"]);
        assert_eq!(r["ips"][0]["address"], "10.5.0.2/24");
        assert_eq!(r["ips"][1]["address"], "fd05::2/64");
        assert_eq!(r["interfaces"][2]["mac"], "02:00:00:00:00:09");
        assert_eq!(r["interfaces"][2]["sandbox"], "/run/netns/x");
        assert_eq!(r["routes"].as_array().unwrap().len(), 3);
        // A second ADD of the same attachment is refused and changes nothing.
        let mut g = Fake::default();
        let e = add_with(&mut g, &env, &conf, &net, &ns).unwrap_err();
        assert_eq!(e.code, codes::EXISTS);
        assert!(g.steps.is_empty());
        assert_eq!(Store::open(dir.path()).unwrap().used().unwrap().len(), 2);
    }

    #[test]
    fn add_failure_at_every_step_undoes_everything() {
        for step in ["bridge", "masq", "veth", "hairpin", "container"] {
            let dir = tempfile::tempdir().unwrap();
            let (env, conf, net) = setup(dir.path());
            let ns = File::open("/dev/null").unwrap();
            let mut f = Fake {
                fail_at: Some(step),
                ..Default::default()
            };
            let e = add_with(&mut f, &env, &conf, &net, &ns).unwrap_err();
            assert_eq!(e.details, step);
            assert!(f.links.is_empty(), "{step}: veth left behind");
            let veth_made = matches!(step, "hairpin" | "container");
            assert_eq!(
                f.steps.last().map(String::as_str) == Some("delete"),
                veth_made,
                "{step}: {:?}",
                f.steps
            );
            assert!(
                Store::open(dir.path()).unwrap().used().unwrap().is_empty(),
                "{step}: reservation left behind"
            );
        }
    }
}
