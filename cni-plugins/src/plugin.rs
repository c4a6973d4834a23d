//! The commands applied: ADD (reserve, `plan()`, apply the steps under an undo guard), DEL,
//! CHECK, GC and STATUS. Effectful: the kernel through `AttachNet`/`DetachNet` (netlink in
//! `LinkNet`), the IPAM store through `IpamStore`, netns entry on a dedicated thread. What
//! each command does is decided in `plan`.

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, InfoVlan,
    LinkAttribute, LinkFlag, LinkInfo, LinkMessage,
};
use netlink_packet_route::AddressFamily;
use serde_json::Value;

use crate::config::{
    parse_subnet_env, resolve, Attachment, IpamMode, NetConf, Network, DEFAULT_MTU,
};
use crate::delegate::{find_in_path, ExecIpam, IpamPlugin};
use crate::ipam::{DiskStore, IpamError, IpamStore, Range};
use crate::masq;
use crate::netlink::{self, Netlink, NlError};
use crate::plan::{self, BridgeSpec, ContainerView, Macs, NetPlan, Step, UndoStep};
use crate::skel::{codes, CniError, Env};
use crate::spoofchk;
use crate::version::CniResult;

pub use crate::plan::{bridge_mac, container_routes, host_veth_name, HOST_VETH_PREFIX};

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
fn ensure_bridge(nl: &mut Netlink, spec: &BridgeSpec) -> Result<(LinkMessage, bool), CniError> {
    let mut created = false;
    let br = match nl.link_by_name(&spec.name).map_err(nl_err)? {
        Some(b) => b,
        None => {
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(spec.name.clone()));
            m.attributes.push(LinkAttribute::Mtu(spec.mtu));
            // A fixed MAC keeps the bridge from taking over its ports' addresses.
            m.attributes.push(LinkAttribute::Address(spec.mac.to_vec()));
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            m.header.flags = vec![LinkFlag::Up];
            m.header.change_mask = vec![LinkFlag::Up];
            match nl.link_add(&format!("add bridge {}", spec.name), m) {
                Ok(()) => created = true,
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(nl_err(e)),
            }
            nl.link_by_name(&spec.name)
                .map_err(nl_err)?
                .ok_or_else(|| {
                    CniError::new(
                        codes::TRY_AGAIN,
                        "bridge vanished while being created",
                        spec.name.clone(),
                    )
                })?
        }
    };
    if !is_kind(&br, InfoKind::Bridge) {
        return Err(CniError::new(
            codes::INVALID_CONFIG,
            "invalid network configuration",
            format!("{} exists and is not a bridge", spec.name),
        ));
    }
    let idx = br.header.index;
    if !br.header.flags.contains(&LinkFlag::Up) {
        nl.link_up(idx).map_err(nl_err)?;
    }
    if spec.promisc && !br.header.flags.contains(&LinkFlag::Promisc) {
        let mut m = LinkMessage::default();
        m.header.index = idx;
        m.header.flags = vec![LinkFlag::Promisc];
        m.header.change_mask = vec![LinkFlag::Promisc];
        nl.link_set("set bridge promisc", m).map_err(nl_err)?;
    }
    if spec.vlan_filtering {
        set_vlan_filtering(nl, spec, idx)?;
    }
    // With a VLAN the gateway lives on <bridge>.<vlan>, as the reference's.
    let gw_idx = if spec.vlan != 0 {
        ensure_bridge_vlan(nl, spec, idx)?
    } else {
        idx
    };
    if !spec.gateways.is_empty() {
        let have: HashSet<IpNet> = nl
            .addrs(gw_idx)
            .map_err(nl_err)?
            .iter()
            .filter_map(netlink::addr_net)
            .collect();
        for gw in &spec.gateways {
            if !have.contains(gw) {
                netlink::ignore_exists(nl.addr_add(gw_idx, *gw)).map_err(nl_err)?;
            }
        }
    }
    if spec.forward_ipv4 {
        write_sysctl_1("/proc/sys/net/ipv4/ip_forward");
    }
    if spec.forward_ipv6 {
        write_sysctl_1("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    Ok((br, created))
}

/// BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED.
const PVID_UNTAGGED: u16 = 2 | 4;

/// VLAN filtering on the bridge (code 2 naming the fields on kernels without it).
fn set_vlan_filtering(nl: &mut Netlink, spec: &BridgeSpec, bridge: u32) -> Result<(), CniError> {
    let mut m = LinkMessage::default();
    m.header.index = bridge;
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bridge),
        LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(1)])),
    ]));
    nl.link_change("set bridge vlan_filtering 1", m)
        .map_err(|e| {
            if e.errno() == Some(libc::EOPNOTSUPP) {
                CniError::new(
                    codes::UNSUPPORTED_FIELD,
                    "unsupported field in network configuration",
                    format!(
                        "vlan {} / vlanTrunk: this kernel's bridge has no VLAN filtering \
                         (CONFIG_BRIDGE_VLAN_FILTERING): {e}",
                        spec.vlan
                    ),
                )
            } else {
                nl_err(e)
            }
        })?;
    Ok(())
}

/// The bridge itself a tagged member of `spec.vlan`, and the `<bridge>.<vlan>` link (up)
/// for the gateway addresses; returns that link's index.
fn ensure_bridge_vlan(nl: &mut Netlink, spec: &BridgeSpec, bridge: u32) -> Result<u32, CniError> {
    nl.bridge_vlan(bridge, spec.vlan, 0, true, true)
        .map_err(nl_err)?;
    let name = format!("{}.{}", spec.name, spec.vlan);
    if nl.link_by_name(&name).map_err(nl_err)?.is_none() {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.clone()));
        m.attributes.push(LinkAttribute::Link(bridge));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(spec.vlan)])),
        ]));
        netlink::ignore_exists(nl.link_add(&format!("add vlan link {name}"), m)).map_err(nl_err)?;
    }
    let l = nl
        .link_by_name(&name)
        .map_err(nl_err)?
        .ok_or_else(|| CniError::new(codes::TRY_AGAIN, "vlan link vanished", name.clone()))?;
    if !l.header.flags.contains(&LinkFlag::Up) {
        nl.link_up(l.header.index).map_err(nl_err)?;
    }
    Ok(l.header.index)
}

/// As the reference's `setupVeth`: out of VLAN 1 (unless kept), `vid` as PVID untagged,
/// the trunk tagged, and VLAN 1 back as native VLAN when only a trunk is given.
fn set_port_vlan(
    nl: &mut Netlink,
    index: u32,
    vid: u16,
    trunk: &[u16],
    keep_default: bool,
) -> Result<(), NlError> {
    if !keep_default {
        netlink::ignore_missing(nl.bridge_vlan(index, 1, 0, false, false))?;
    }
    if vid != 0 {
        nl.bridge_vlan(index, vid, PVID_UNTAGGED, false, true)?;
    }
    for t in trunk {
        nl.bridge_vlan(index, *t, 0, false, true)?;
    }
    if vid == 0 && !trunk.is_empty() {
        nl.bridge_vlan(index, 1, PVID_UNTAGGED, false, true)?;
    }
    Ok(())
}

fn set_port_option(
    nl: &mut Netlink,
    index: u32,
    option: InfoBridgePort,
    op: &str,
) -> Result<(), NlError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![option])),
    ]));
    nl.link_change(op, m)
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

/// The effects of ADD, one method per plan step (netlink in `LinkNet`, a recorder in
/// tests).
pub trait AttachNet {
    /// Ensures the bridge with the gateway addresses, up ([`Step::Bridge`]).
    fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<BridgeLink, CniError>;
    /// Ensures the masquerade rules, forced when the bridge was just created
    /// ([`Step::Masquerade`]).
    fn ensure_masq(&mut self, rules: &masq::Rules, bridge_created: bool) -> Result<(), CniError>;
    /// Creates the veth pair `host` (on the bridge, up) / `ifname` (inside `ns`)
    /// ([`Step::Veth`]).
    fn create_veth(
        &mut self,
        host: &str,
        ifname: &str,
        mtu: u32,
        mac: Option<[u8; 6]>,
        bridge: u32,
        ns: &File,
    ) -> Result<HostLink, CniError>;
    /// Turns on port isolation on a bridge port ([`Step::Isolated`]).
    fn set_isolated(&mut self, index: u32) -> Result<(), CniError>;
    /// Puts a bridge port in VLAN `vid` (PVID, untagged), out of VLAN 1 unless
    /// `keep_default` ([`Step::PortVlan`]).
    fn set_port_vlan(
        &mut self,
        index: u32,
        vid: u16,
        trunk: &[u16],
        keep_default: bool,
    ) -> Result<(), CniError>;
    /// Turns on hairpin mode on a bridge port ([`Step::Hairpin`]).
    fn set_hairpin(&mut self, index: u32) -> Result<(), CniError>;
    /// Inside `ns`: addresses, link up, routes; returns the interface's MAC
    /// ([`Step::Container`]).
    fn configure_container(
        &mut self,
        ns: &File,
        ifname: &str,
        addrs: &[IpNet],
        routes: &[(IpNet, IpAddr)],
        dad: bool,
    ) -> Result<[u8; 6], CniError>;
    /// Admits only `mac` from the host veth `host` ([`Step::SpoofCheck`]).
    fn spoof_check(&mut self, host: &str, mac: [u8; 6]) -> Result<(), CniError>;
    /// Removes `host`'s spoof check (missing is fine) ([`UndoStep::DeleteSpoofCheck`]).
    fn delete_spoof_check(&mut self, host: &str) -> Result<(), CniError>;
    /// Deletes a host link by name (missing is fine) ([`UndoStep::DeleteLink`]).
    fn delete_link(&mut self, name: &str) -> Result<(), CniError>;
}

/// The effects of DEL (netlink in `LinkNet`, a recorder in tests).
pub trait DetachNet {
    /// Deletes the host veth `name` (the pair goes with it); returns whether it existed.
    fn delete_host_veth(&mut self, name: &str) -> Result<bool, CniError>;
    /// Deletes the veth end `ifname` inside the netns at `netns`; a missing netns or
    /// interface (or one that is not a veth) is left alone.
    fn delete_container_veth(&mut self, netns: &Path, ifname: &str) -> Result<(), CniError>;
    /// GC: the bridge's index and every named host link (`None` without the bridge).
    fn host_links(&mut self, bridge: &str) -> Result<Option<(u32, Vec<LinkView>)>, CniError>;
    /// GC: deletes a host link by index (a missing one is fine).
    fn delete_link_index(&mut self, index: u32) -> Result<(), CniError>;
}

/// A host link as GC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkView {
    /// Name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Master (bridge) index.
    pub master: Option<u32>,
}

/// `AttachNet` and `DetachNet` over rtnetlink and nft.
pub struct LinkNet {
    nl: Option<Netlink>,
}

impl LinkNet {
    /// Opens the netlink socket now (in the calling thread's netns).
    pub fn open() -> Result<Self, CniError> {
        Ok(LinkNet {
            nl: Some(Netlink::open().map_err(nl_err)?),
        })
    }

    /// Opens the socket on first use.
    pub fn lazy() -> Self {
        LinkNet { nl: None }
    }

    fn nl(&mut self) -> Result<&mut Netlink, CniError> {
        if self.nl.is_none() {
            self.nl = Some(Netlink::open().map_err(nl_err)?);
        }
        self.nl
            .as_mut()
            .ok_or_else(|| CniError::new(codes::INTERNAL, "netlink socket missing", ""))
    }
}

impl AttachNet for LinkNet {
    fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<BridgeLink, CniError> {
        let (br, created) = ensure_bridge(self.nl()?, spec)?;
        Ok(BridgeLink {
            index: br.header.index,
            mac: netlink::link_mac(&br).unwrap_or_default(),
            created,
        })
    }

    fn ensure_masq(&mut self, rules: &masq::Rules, bridge_created: bool) -> Result<(), CniError> {
        masq::ensure(rules, bridge_created)
    }

    fn create_veth(
        &mut self,
        host: &str,
        ifname: &str,
        mtu: u32,
        mac: Option<[u8; 6]>,
        bridge: u32,
        ns: &File,
    ) -> Result<HostLink, CniError> {
        let nl = self.nl()?;
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(ifname.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(mtu));
        if let Some(mac) = mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
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
        set_hairpin(self.nl()?, index).map_err(nl_err)
    }

    fn set_port_vlan(
        &mut self,
        index: u32,
        vid: u16,
        trunk: &[u16],
        keep_default: bool,
    ) -> Result<(), CniError> {
        set_port_vlan(self.nl()?, index, vid, trunk, keep_default).map_err(nl_err)
    }

    fn set_isolated(&mut self, index: u32) -> Result<(), CniError> {
        set_port_option(
            self.nl()?,
            index,
            InfoBridgePort::Isolated(true),
            "set isolated",
        )
        .map_err(nl_err)
    }

    fn configure_container(
        &mut self,
        ns: &File,
        ifname: &str,
        addrs: &[IpNet],
        routes: &[(IpNet, IpAddr)],
        dad: bool,
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
            if dad {
                // As the reference's enabledad (this thread is in the pod netns, so is
                // its /proc/sys/net).
                for knob in ["accept_dad", "enhanced_dad"] {
                    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{knob}");
                    if let Err(e) = std::fs::write(&path, "1") {
                        tracing::warn!("cannot set {path}: {e}");
                    }
                }
            }
            for a in addrs {
                nl.addr_add_dad(idx, *a, dad).map_err(nl_err)?;
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
        self.nl()?.link_del_name(name).map_err(nl_err)
    }

    fn spoof_check(&mut self, host: &str, mac: [u8; 6]) -> Result<(), CniError> {
        spoofchk::load(&spoofchk::render_add(host, &mac))
    }

    fn delete_spoof_check(&mut self, host: &str) -> Result<(), CniError> {
        spoofchk::load(&spoofchk::render_del(host))
    }
}

impl DetachNet for LinkNet {
    fn delete_host_veth(&mut self, name: &str) -> Result<bool, CniError> {
        let nl = self.nl()?;
        let had = nl.link_by_name(name).map_err(nl_err)?.is_some();
        nl.link_del_name(name).map_err(nl_err)?;
        Ok(had)
    }

    fn delete_container_veth(&mut self, netns: &Path, ifname: &str) -> Result<(), CniError> {
        let Ok(ns) = File::open(netns) else {
            return Ok(());
        };
        let ifname = ifname.to_string();
        in_netns(&ns, move || -> Result<(), CniError> {
            let mut nl = Netlink::open().map_err(nl_err)?;
            if let Some(l) = nl.link_by_name(&ifname).map_err(nl_err)? {
                if is_kind(&l, InfoKind::Veth) {
                    netlink::ignore_missing(nl.link_del_index(l.header.index)).map_err(nl_err)?;
                }
            }
            Ok(())
        })?
    }

    fn host_links(&mut self, bridge: &str) -> Result<Option<(u32, Vec<LinkView>)>, CniError> {
        let nl = self.nl()?;
        let Some(br) = nl.link_by_name(bridge).map_err(nl_err)? else {
            return Ok(None);
        };
        let links = nl
            .links()
            .map_err(nl_err)?
            .iter()
            .filter_map(|l| {
                Some(LinkView {
                    name: netlink::link_name(l)?.to_string(),
                    index: l.header.index,
                    master: netlink::link_master(l),
                })
            })
            .collect();
        Ok(Some((br.header.index, links)))
    }

    fn delete_link_index(&mut self, index: u32) -> Result<(), CniError> {
        netlink::ignore_missing(self.nl()?.link_del_index(index)).map_err(nl_err)
    }
}

/// Undoes what a failed ADD made: the undo steps in reverse, then the reservation.
fn undo(links: &mut dyn AttachNet, store: &dyn IpamStore, steps: &[UndoStep], ips: &[IpAddr]) {
    undo_links(links, steps);
    if !ips.is_empty() {
        match store.lock() {
            Ok(s) => {
                for ip in ips {
                    if let Err(e) = s.release(*ip) {
                        tracing::warn!("undo: releasing {ip}: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!("undo: {e}"),
        }
    }
}

/// The undo steps in reverse.
fn undo_links(links: &mut dyn AttachNet, steps: &[UndoStep]) {
    for u in steps.iter().rev() {
        match u {
            UndoStep::DeleteSpoofCheck(host) => {
                if let Err(e) = links.delete_spoof_check(host) {
                    tracing::warn!("undo: spoof check of {host}: {e}");
                }
            }
            UndoStep::DeleteLink(name) => {
                if let Err(e) = links.delete_link(name) {
                    tracing::warn!("undo: deleting {name}: {e}");
                }
            }
        }
    }
}

/// The delegated IPAM plugin of `conf` (`None` for the built-in IPAM), from `CNI_PATH`.
fn ipam_plugin(env: &Env, conf: &NetConf) -> Result<Option<ExecIpam>, CniError> {
    match &conf.ipam {
        IpamMode::Builtin => Ok(None),
        IpamMode::Delegated(t) => Ok(Some(ExecIpam {
            bin: find_in_path(t, &env.path)?,
            stdin: conf.raw.clone(),
        })),
    }
}

/// The pod MTU without built-in ranges: the config's, the subnet file's, else 1500.
fn delegated_mtu(conf: &NetConf) -> Result<u32, CniError> {
    if let Some(m) = conf.mtu {
        return Ok(m);
    }
    match std::fs::read_to_string(&conf.subnet_file) {
        Ok(t) => Ok(parse_subnet_env(&t)?.mtu.unwrap_or(DEFAULT_MTU)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DEFAULT_MTU),
        Err(e) => Err(CniError::new(
            codes::IO,
            "cannot read subnet file",
            format!("{}: {e}", conf.subnet_file.display()),
        )),
    }
}

/// ADD: returns the result JSON in the requested version's shape.
pub fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    if let Some(ipam) = ipam_plugin(env, conf)? {
        let mtu = delegated_mtu(conf)?;
        let ns = open_netns(&env.netns.clone().unwrap_or_default(), codes::INVALID_ENV)?;
        let mut links = LinkNet::open()?;
        return add_delegated(&mut links, &ipam, env, conf, mtu, &ns);
    }
    let net = network(conf)?;
    let netns_path = env.netns.clone().unwrap_or_default();
    let ns = open_netns(&netns_path, codes::INVALID_ENV)?;
    let mut links = LinkNet::open()?;
    add_with(&mut links, env, conf, &net, &ns)
}

/// ADD over any `AttachNet`, with the IPAM store in `conf.data_dir`.
pub fn add_with(
    links: &mut dyn AttachNet,
    env: &Env,
    conf: &NetConf,
    net: &Network,
    ns: &File,
) -> Result<Value, CniError> {
    add_with_store(links, &DiskStore::new(&conf.data_dir), env, conf, net, ns)
}

/// One reserved address and its range.
type Reservation<'n> = (IpAddr, &'n Range);

/// A failed reservation: the error, and what was reserved before it (to release).
type ReserveFailure = (Vec<IpAddr>, CniError);

/// Reserves one address per range for (container id, ifname) under the store's lock
/// (held only for this). On failure, returns what was reserved so far with the error.
fn reserve<'n>(
    store: &dyn IpamStore,
    env: &Env,
    net: &'n Network,
) -> Result<Vec<Reservation<'n>>, ReserveFailure> {
    let locked = store.lock().map_err(|e| (vec![], ipam_err(e)))?;
    let held = locked
        .find(&env.container_id, &env.ifname)
        .map_err(|e| (vec![], ipam_err(e)))?;
    if !held.is_empty() {
        return Err((
            vec![],
            CniError::new(
                codes::EXISTS,
                "attachment exists",
                format!(
                    "{} {} already holds addresses; DEL it first",
                    env.container_id, env.ifname
                ),
            ),
        ));
    }
    let mut used = locked.used().map_err(|e| (vec![], ipam_err(e)))?;
    let mut out = Vec::new();
    for (i, r) in net.ranges.iter().enumerate() {
        match locked.allocate(i, r, &mut used, &env.container_id, &env.ifname) {
            Ok(ip) => out.push((ip, r)),
            Err(e) => return Err((out.into_iter().map(|(ip, _)| ip).collect(), ipam_err(e))),
        }
    }
    Ok(out)
}

/// Applies the plan's steps in order; every step that succeeds pushes its undo.
fn apply(
    links: &mut dyn AttachNet,
    plan: &NetPlan,
    ns: &File,
    undo: &mut Vec<UndoStep>,
) -> Result<Macs, CniError> {
    let mut state = Applied::default();
    apply_steps(links, plan.steps.iter(), ns, undo, &mut state)?;
    Ok(state.macs)
}

/// What the steps applied so far made (links and MACs).
#[derive(Debug, Default)]
struct Applied {
    macs: Macs,
    bridge: Option<BridgeLink>,
    host: Option<HostLink>,
}

/// Applies `steps` in order on top of `state`; every step that succeeds pushes its undo.
fn apply_steps<'p>(
    links: &mut dyn AttachNet,
    steps: impl Iterator<Item = &'p Step>,
    ns: &File,
    undo: &mut Vec<UndoStep>,
    state: &mut Applied,
) -> Result<(), CniError> {
    for step in steps {
        match step {
            Step::Bridge(spec) => {
                let b = links.ensure_bridge(spec)?;
                // Made by an earlier ensure of this ADD counts as made now.
                let created = b.created || state.bridge.is_some_and(|o| o.created);
                state.bridge = Some(BridgeLink { created, ..b });
                state.macs.bridge = b.mac;
            }
            Step::Masquerade(rules) => {
                links.ensure_masq(rules, state.bridge.is_some_and(|b| b.created))?
            }
            Step::Veth(v) => {
                let bridge = state.bridge.map(|b| b.index).unwrap_or_default();
                let host = links.create_veth(&v.host, &v.container, v.mtu, v.mac, bridge, ns)?;
                state.macs.host = host.mac;
                state.host = Some(host);
            }
            Step::PortVlan {
                vid,
                trunk,
                keep_default,
            } => links.set_port_vlan(
                state.host.map(|h| h.index).unwrap_or_default(),
                *vid,
                trunk,
                *keep_default,
            )?,
            Step::Isolated => {
                links.set_isolated(state.host.map(|h| h.index).unwrap_or_default())?
            }
            Step::Hairpin { .. } => {
                links.set_hairpin(state.host.map(|h| h.index).unwrap_or_default())?
            }
            Step::Container(c) => {
                state.macs.container =
                    links.configure_container(ns, &c.ifname, &c.addrs, &c.routes, c.dad)?
            }
            Step::SpoofCheck { host } => links.spoof_check(host, state.macs.container)?,
        }
        undo.extend(step.undo());
    }
    Ok(())
}

/// ADD over any `AttachNet` and `IpamStore`: reserve, plan, apply, build the result;
/// undo everything on failure.
pub fn add_with_store(
    links: &mut dyn AttachNet,
    store: &dyn IpamStore,
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
    let reserved = match reserve(store, env, net) {
        Ok(r) => r,
        Err((ips, e)) => {
            undo(links, store, &[], &ips);
            return Err(e);
        }
    };
    let plan = plan::plan(env, conf, net, &reserved);
    let mut undo_steps = Vec::new();
    match apply(links, &plan, ns, &mut undo_steps) {
        Ok(macs) => {
            let addrs: Vec<IpNet> = plan.result.ips.iter().map(|(a, _)| *a).collect();
            tracing::info!(ips = ?addrs, "attached");
            let result = plan::merge_prev(prev, plan.result.build(&macs));
            Ok(result.render(&conf.cni_version))
        }
        Err(e) => {
            undo(links, store, &undo_steps, &plan.reserved);
            Err(e)
        }
    }
}

/// ADD with a delegated IPAM, as the reference bridge: the IPAM plugin's ADD first, its
/// result planned and applied like a reservation, and its DEL when a later step fails.
pub fn add_delegated(
    links: &mut dyn AttachNet,
    ipam: &dyn IpamPlugin,
    env: &Env,
    conf: &NetConf,
    mtu: u32,
    ns: &File,
) -> Result<Value, CniError> {
    let prev = match &conf.prev_result {
        Some(p) => Some(CniResult::parse(p).map_err(|e| {
            CniError::new(codes::DECODE, "failed to decode prevResult", e.to_string())
        })?),
        None => None,
    };
    // As the reference: bridge and veth first (dhcp's IPAM runs on the container
    // interface), then the IPAM plugin, then addresses, routes, gateways and masquerade.
    let l2_net = Network {
        ranges: vec![],
        mtu,
        cluster: vec![],
    };
    let l2 = plan::plan(env, conf, &l2_net, &[]);
    let mut undo_steps = Vec::new();
    let mut state = Applied::default();
    let layer2 = l2.steps.iter().filter(|s| {
        matches!(
            s,
            Step::Bridge(_) | Step::Veth(_) | Step::PortVlan { .. } | Step::Hairpin { .. }
        )
    });
    if let Err(e) = apply_steps(links, layer2, ns, &mut undo_steps, &mut state) {
        undo_links(links, &undo_steps);
        return Err(e);
    }
    let answer = match ipam.call("ADD") {
        Ok(a) => a,
        Err(e) => {
            undo_links(links, &undo_steps);
            return Err(e);
        }
    };
    let release = |why: &CniError| {
        tracing::warn!("ADD failed ({why}): releasing the IPAM allocation");
        if let Err(e) = ipam.call("DEL") {
            tracing::warn!("undo: IPAM DEL: {e}");
        }
    };
    let result = CniResult::parse(&answer)
        .map_err(|e| {
            CniError::new(
                codes::DECODE,
                "failed to decode the IPAM result",
                e.to_string(),
            )
        })
        .and_then(|r| {
            if r.ips.is_empty() {
                Err(CniError::new(
                    codes::IPAM_PLUGIN,
                    "IPAM plugin returned missing IP config",
                    String::new(),
                ))
            } else {
                Ok(r)
            }
        });
    let ipam_result = match result {
        Ok(r) => r,
        Err(e) => {
            undo_links(links, &undo_steps);
            release(&e);
            return Err(e);
        }
    };
    let (conf, net) = plan::delegated_network(conf, &ipam_result, mtu);
    let reserved: Vec<(IpAddr, &Range)> = net.ranges.iter().map(|r| (r.start, r)).collect();
    let plan = plan::plan(env, &conf, &net, &reserved);
    let layer3 = plan.steps.iter().filter(|s| {
        !matches!(
            s,
            Step::Veth(_) | Step::PortVlan { .. } | Step::Hairpin { .. }
        )
    });
    match apply_steps(links, layer3, ns, &mut undo_steps, &mut state) {
        Ok(()) => {
            let addrs: Vec<IpNet> = plan.result.ips.iter().map(|(a, _)| *a).collect();
            tracing::info!(ips = ?addrs, "attached (delegated IPAM)");
            let result = plan::merge_prev(prev, plan.result.build(&state.macs));
            Ok(result.render(&conf.cni_version))
        }
        Err(e) => {
            undo_links(links, &undo_steps);
            release(&e);
            Err(e)
        }
    }
}

/// DEL: releases the addresses and removes the veth; anything missing is success.
pub fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if conf.mac_spoof_chk {
        spoofchk::load(&spoofchk::render_del(&plan::plan_del(env).host))?;
    }
    if let IpamMode::Delegated(_) = conf.ipam {
        // As the reference: the interface first, then the IPAM plugin's DEL (so a missing
        // plugin still leaves no interface behind).
        detach(&mut LinkNet::lazy(), &plan::plan_del(env))?;
        if let Some(ipam) = ipam_plugin(env, conf)? {
            ipam.call("DEL")?;
        }
        return Ok(());
    }
    // The socket opens after the release, so a DEL releases even without netlink.
    del_with(&mut LinkNet::lazy(), &DiskStore::new(&conf.data_dir), env)
}

/// DEL over any `DetachNet` and `IpamStore`.
pub fn del_with(
    links: &mut dyn DetachNet,
    store: &dyn IpamStore,
    env: &Env,
) -> Result<(), CniError> {
    let plan = plan::plan_del(env);
    {
        let locked = store.lock().map_err(ipam_err)?;
        let released = locked
            .release_owner(&plan.owner.container_id, &plan.owner.ifname)
            .map_err(ipam_err)?;
        tracing::info!(ips = ?released, "released");
    }
    detach(links, &plan)
}

/// Deletes the host veth, else the container end.
fn detach(links: &mut dyn DetachNet, plan: &plan::DelPlan) -> Result<(), CniError> {
    if !links.delete_host_veth(&plan.host)? {
        // Deleting the host end removes the pair; without it, clean the container side.
        if let Some((netns, ifname)) = &plan.container {
            links.delete_container_veth(netns, ifname)?;
        }
    }
    Ok(())
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
    let ipam = ipam_plugin(env, conf)?;
    if let Some(p) = &ipam {
        p.call("CHECK")?;
    }
    let want = plan::plan_check(env, conf, &prev)?;
    let ifname = want.ifname.clone();
    let view = in_netns(&ns, move || -> Result<ContainerView, CniError> {
        let mut nl = Netlink::open().map_err(nl_err)?;
        let link = nl.link_by_name(&ifname).map_err(nl_err)?.ok_or_else(|| {
            CniError::new(
                codes::UNKNOWN_CONTAINER,
                "container interface missing",
                format!("no {ifname} in the container"),
            )
        })?;
        let index = link.header.index;
        let addrs = nl
            .addrs(index)
            .map_err(nl_err)?
            .iter()
            .filter_map(netlink::addr_net)
            .collect();
        let mut routes = nl.routes(AddressFamily::Inet).map_err(nl_err)?;
        routes.extend(nl.routes(AddressFamily::Inet6).map_err(nl_err)?);
        Ok(ContainerView {
            index,
            mtu: netlink::link_mtu(&link),
            addrs,
            routes: routes
                .iter()
                .map(|r| {
                    (
                        netlink::route_dst(r),
                        netlink::route_gw(r),
                        netlink::route_oif(r),
                    )
                })
                .collect(),
        })
    })??;
    want.compare_container(&view)?;
    let mut nl = Netlink::open().map_err(nl_err)?;
    let br = nl.link_by_name(&want.bridge).map_err(nl_err)?;
    let hl = nl.link_by_name(&want.host).map_err(nl_err)?;
    want.compare_host(
        br.map(|b| b.header.index),
        hl.as_ref().map(netlink::link_master),
    )?;
    if ipam.is_some() {
        // The IPAM plugin's CHECK vouched for the allocation.
        return Ok(());
    }
    let store = DiskStore::new(&conf.data_dir);
    let locked = store.lock().map_err(ipam_err)?;
    let held: HashSet<IpAddr> = locked
        .find(&want.owner.container_id, &want.owner.ifname)
        .map_err(ipam_err)?
        .into_iter()
        .collect();
    want.compare_store(&held)
}

/// STATUS: ranges resolvable, IPAM store usable, a free address left.
pub fn status(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if let Some(p) = ipam_plugin(env, conf)? {
        return p.call("STATUS").map(|_| ());
    }
    let unavailable = |d: String| CniError::new(codes::NOT_AVAILABLE, "plugin not available", d);
    let net = network(conf).map_err(|e| unavailable(e.details))?;
    let disk = DiskStore::new(&conf.data_dir);
    let store = disk.lock().map_err(|e| unavailable(e.to_string()))?;
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
pub fn gc(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if let Some(p) = ipam_plugin(env, conf)? {
        // The IPAM plugin collects its own allocations; the veths are ours.
        p.call("GC")?;
        return gc_links(&mut LinkNet::lazy(), conf, &valid_attachments(conf)?);
    }
    // The socket opens after the release, as DEL's does.
    gc_with(&mut LinkNet::lazy(), &DiskStore::new(&conf.data_dir), conf)
}

/// GC over any `DetachNet` and `IpamStore`.
pub fn gc_with(
    links: &mut dyn DetachNet,
    store: &dyn IpamStore,
    conf: &NetConf,
) -> Result<(), CniError> {
    let valid = valid_attachments(conf)?;
    {
        let locked = store.lock().map_err(ipam_err)?;
        let allocations = locked.allocations().map_err(ipam_err)?;
        for (ip, owner) in plan::gc_releases(allocations, &valid) {
            tracing::info!(%ip, container = %owner.container_id, "gc: releasing");
            locked.release(ip).map_err(ipam_err)?;
        }
    }
    gc_links(links, conf, &valid)
}

/// GC's `cni.dev/valid-attachments`: without the list every allocation would look stale,
/// so GC refuses rather than wipes.
fn valid_attachments(conf: &NetConf) -> Result<HashSet<Attachment>, CniError> {
    Ok(conf
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
        .collect())
}

/// GC of host veths on the bridge that belong to no valid attachment.
fn gc_links(
    links: &mut dyn DetachNet,
    conf: &NetConf,
    valid: &HashSet<Attachment>,
) -> Result<(), CniError> {
    let valid_hosts: HashSet<String> = valid
        .iter()
        .map(|a| host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let Some((bridge, host_links)) = links.host_links(&conf.bridge)? else {
        return Ok(());
    };
    for l in host_links {
        if plan::is_orphan_veth(&l.name, l.master, bridge, &valid_hosts) {
            tracing::info!(link = l.name, "gc: removing orphan veth");
            links.delete_link_index(l.index)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{LockedStore, Store};

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
        fn ensure_bridge(&mut self, _: &BridgeSpec) -> Result<BridgeLink, CniError> {
            self.step("bridge")?;
            Ok(BridgeLink {
                index: 1,
                mac: [2, 0, 0, 0, 0, 1],
                created: true,
            })
        }
        fn ensure_masq(&mut self, _: &masq::Rules, created: bool) -> Result<(), CniError> {
            assert!(created);
            self.step("masq")
        }
        fn create_veth(
            &mut self,
            host: &str,
            _: &str,
            mtu: u32,
            _: Option<[u8; 6]>,
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
        fn set_port_vlan(&mut self, _: u32, _: u16, _: &[u16], _: bool) -> Result<(), CniError> {
            self.steps.push("vlan".into());
            Ok(())
        }
        fn set_isolated(&mut self, _: u32) -> Result<(), CniError> {
            Ok(())
        }
        fn configure_container(
            &mut self,
            _: &File,
            _: &str,
            addrs: &[IpNet],
            routes: &[(IpNet, IpAddr)],
            _: bool,
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
        fn spoof_check(&mut self, _: &str, _: [u8; 6]) -> Result<(), CniError> {
            self.steps.push("spoofchk".into());
            Ok(())
        }
        fn delete_spoof_check(&mut self, _: &str) -> Result<(), CniError> {
            self.steps.push("delete spoofchk".into());
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

/// Delegated IPAM against a recording IPAM plugin.
#[cfg(test)]
mod delegated_tests {
    use super::*;
    use crate::skel::parse_env;
    use std::cell::RefCell;
    use std::collections::HashMap;

    struct FakeIpam {
        calls: RefCell<Vec<String>>,
        add: Result<Value, CniError>,
    }

    impl IpamPlugin for FakeIpam {
        fn call(&self, command: &str) -> Result<Value, CniError> {
            self.calls.borrow_mut().push(command.to_string());
            match command {
                "ADD" => self.add.clone(),
                _ => Ok(Value::Null),
            }
        }
    }

    #[derive(Default)]
    struct Links {
        fail_container: bool,
        steps: Vec<String>,
        routes: Vec<(IpNet, IpAddr)>,
        addrs: Vec<IpNet>,
        gateways: Vec<IpNet>,
    }

    impl AttachNet for Links {
        fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<BridgeLink, CniError> {
            self.steps.push("bridge".into());
            self.gateways = spec.gateways.clone();
            Ok(BridgeLink {
                index: 1,
                mac: [2, 0, 0, 0, 0, 1],
                created: false,
            })
        }
        fn ensure_masq(&mut self, _: &masq::Rules, _: bool) -> Result<(), CniError> {
            self.steps.push("masq".into());
            Ok(())
        }
        fn create_veth(
            &mut self,
            _: &str,
            _: &str,
            mtu: u32,
            _: Option<[u8; 6]>,
            _: u32,
            _: &File,
        ) -> Result<HostLink, CniError> {
            self.steps.push(format!("veth mtu {mtu}"));
            Ok(HostLink {
                index: 5,
                mac: [2, 0, 0, 0, 0, 5],
            })
        }
        fn set_hairpin(&mut self, _: u32) -> Result<(), CniError> {
            self.steps.push("hairpin".into());
            Ok(())
        }
        fn set_port_vlan(&mut self, _: u32, _: u16, _: &[u16], _: bool) -> Result<(), CniError> {
            self.steps.push("vlan".into());
            Ok(())
        }
        fn set_isolated(&mut self, _: u32) -> Result<(), CniError> {
            Ok(())
        }
        fn configure_container(
            &mut self,
            _: &File,
            _: &str,
            addrs: &[IpNet],
            routes: &[(IpNet, IpAddr)],
            _: bool,
        ) -> Result<[u8; 6], CniError> {
            self.steps.push("container".into());
            self.addrs = addrs.to_vec();
            self.routes = routes.to_vec();
            if self.fail_container {
                return Err(CniError::new(codes::NETLINK, "injected", "container"));
            }
            Ok([2, 0, 0, 0, 0, 9])
        }
        fn delete_link(&mut self, _: &str) -> Result<(), CniError> {
            self.steps.push("delete".into());
            Ok(())
        }
        fn spoof_check(&mut self, _: &str, _: [u8; 6]) -> Result<(), CniError> {
            self.steps.push("spoofchk".into());
            Ok(())
        }
        fn delete_spoof_check(&mut self, _: &str) -> Result<(), CniError> {
            self.steps.push("delete spoofchk".into());
            Ok(())
        }
    }

    fn env() -> Env {
        let m: HashMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .collect();
        parse_env(|k| m.get(k).map(|v| v.to_string())).unwrap()
    }

    /// podman's bridge conflist entry (host-local, explicit default route without gw).
    fn podman_conf(version: &str) -> NetConf {
        NetConf::parse(
            format!(
                r#"{{"cniVersion":"{version}","name":"podman","type":"hako-cni","bridge":"cni-podman0","isGateway":true,"ipMasq":true,"hairpinMode":true,"mtu":1400,"ipam":{{"type":"host-local","routes":[{{"dst":"0.0.0.0/0"}}],"ranges":[[{{"subnet":"10.88.0.0/16","gateway":"10.88.0.1"}}]]}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn host_local_answer() -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.88.0.2/16", "gateway": "10.88.0.1"},
                    {"address": "fd88::2/64"}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.88.0.254"}],
            "dns": {}
        })
    }

    #[test]
    fn host_local_result_is_applied_with_one_default_route_per_family() {
        let conf = podman_conf("1.0.0");
        assert_eq!(conf.ipam, IpamMode::Delegated("host-local".into()));
        let ipam = FakeIpam {
            calls: RefCell::default(),
            add: Ok(host_local_answer()),
        };
        let mut links = Links::default();
        let ns = File::open("/dev/null").unwrap();
        let r = add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap();
        assert_eq!(*ipam.calls.borrow(), ["ADD"]);
        assert_eq!(
            links.steps,
            [
                "bridge",
                "veth mtu 1400",
                "hairpin",
                "bridge",
                "masq",
                "container"
            ]
        );
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(links.addrs, [n("10.88.0.2/16"), n("fd88::2/64")]);
        assert_eq!(links.gateways, [n("10.88.0.1/16"), n("fd88::1/64")]);
        // isDefaultGateway (hako's default) + the explicit default: one default route.
        assert_eq!(
            links.routes,
            [
                (n("0.0.0.0/0"), a("10.88.0.1")),
                (n("192.168.0.0/16"), a("10.88.0.254")),
                (n("::/0"), a("fd88::1")),
            ]
        );
        assert_eq!(r["ips"][0]["address"], "10.88.0.2/16");
        assert_eq!(r["ips"][0]["interface"], 2);
        assert_eq!(r["ips"][1]["gateway"], "fd88::1");
        assert_eq!(r["routes"].as_array().unwrap().len(), 3);
        assert_eq!(r["cniVersion"], "1.0.0");
    }

    #[test]
    fn a_failed_step_after_ipam_releases_through_the_plugin() {
        let conf = podman_conf("0.4.0");
        let ipam = FakeIpam {
            calls: RefCell::default(),
            add: Ok(host_local_answer()),
        };
        let mut links = Links {
            fail_container: true,
            ..Default::default()
        };
        let ns = File::open("/dev/null").unwrap();
        let e = add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap_err();
        assert_eq!(e.details, "container");
        assert_eq!(links.steps.last().map(String::as_str), Some("delete"));
        assert_eq!(*ipam.calls.borrow(), ["ADD", "DEL"]);
    }

    #[test]
    fn ipam_errors_and_empty_results() {
        let conf = podman_conf("1.0.0");
        let ns = File::open("/dev/null").unwrap();
        // The plugin's own error is returned as is; nothing is made, nothing released.
        let ipam = FakeIpam {
            calls: RefCell::default(),
            add: Err(CniError::new(
                11,
                "IPAM plugin failed",
                "no IP addresses available",
            )),
        };
        let mut links = Links::default();
        let e = add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap_err();
        assert_eq!(e.code, 11);
        assert_eq!(
            links.steps,
            ["bridge", "veth mtu 1400", "hairpin", "delete"]
        );
        assert_eq!(*ipam.calls.borrow(), ["ADD"]);
        links.steps.clear();
        // A result without addresses is refused and released.
        let ipam = FakeIpam {
            calls: RefCell::default(),
            add: Ok(serde_json::json!({"cniVersion": "1.0.0", "ips": []})),
        };
        let e = add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap_err();
        assert_eq!(e.code, codes::IPAM_PLUGIN);
        assert_eq!(links.steps.last().map(String::as_str), Some("delete"));
        assert_eq!(*ipam.calls.borrow(), ["ADD", "DEL"]);
    }

    #[test]
    fn macspoofchk_follows_the_container_step_and_is_undone() {
        let mut conf = podman_conf("1.0.0");
        conf.mac_spoof_chk = true;
        let ipam = FakeIpam {
            calls: RefCell::default(),
            add: Ok(host_local_answer()),
        };
        let mut links = Links::default();
        let ns = File::open("/dev/null").unwrap();
        add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap();
        assert_eq!(links.steps.last().map(String::as_str), Some("spoofchk"));
        let mut links = Links {
            fail_container: true,
            ..Default::default()
        };
        add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap_err();
        assert!(!links.steps.contains(&"spoofchk".to_string()));
    }

    #[test]
    fn explicit_default_route_with_gw_wins_over_is_default_gateway() {
        let conf = podman_conf("1.0.0");
        let ipam = FakeIpam {
            calls: RefCell::default(),
            add: Ok(serde_json::json!({
                "cniVersion": "1.0.0",
                "ips": [{"address": "10.88.0.2/16"}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.9"}]
            })),
        };
        let mut links = Links::default();
        let ns = File::open("/dev/null").unwrap();
        add_delegated(&mut links, &ipam, &env(), &conf, 1400, &ns).unwrap();
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(links.routes, [(n("0.0.0.0/0"), a("10.88.0.9"))]);
        // No gateway in the result: the subnet's first address, as the reference.
        assert_eq!(links.gateways, [n("10.88.0.1/16")]);
    }
}

/// ADD and DEL against the in-memory store and a recording network.
#[cfg(test)]
mod seam_tests {
    use super::*;
    use crate::ipam::{MemStore, Owner};
    use crate::skel::parse_env;
    use std::collections::{BTreeMap, HashMap};

    /// Records each call as a line; fails the call whose line starts with `fail`.
    #[derive(Default)]
    struct Rec {
        fail: Option<&'static str>,
        calls: Vec<String>,
        /// Host links that exist (for DEL).
        host_links: HashSet<String>,
        /// The links GC sees (`None`: no bridge); the bridge's index is 3.
        ports: Option<Vec<LinkView>>,
    }

    impl Rec {
        fn call(&mut self, line: String) -> Result<(), CniError> {
            let fail = self.fail.is_some_and(|f| line.starts_with(f));
            self.calls.push(line);
            if fail {
                return Err(CniError::new(codes::NETLINK, "injected", ""));
            }
            Ok(())
        }
    }

    impl AttachNet for Rec {
        fn ensure_bridge(&mut self, s: &BridgeSpec) -> Result<BridgeLink, CniError> {
            self.call(format!(
                "bridge {} mtu {} gw {:?}",
                s.name, s.mtu, s.gateways
            ))?;
            Ok(BridgeLink {
                index: 3,
                mac: [2, 0, 0, 0, 0, 3],
                created: false,
            })
        }
        fn ensure_masq(&mut self, r: &masq::Rules, created: bool) -> Result<(), CniError> {
            self.call(format!("masq {} created={created}", r.table))
        }
        fn create_veth(
            &mut self,
            host: &str,
            ifname: &str,
            mtu: u32,
            _: Option<[u8; 6]>,
            bridge: u32,
            _: &File,
        ) -> Result<HostLink, CniError> {
            self.call(format!("veth {host}/{ifname} mtu {mtu} on {bridge}"))?;
            self.host_links.insert(host.to_string());
            Ok(HostLink {
                index: 9,
                mac: [2, 0, 0, 0, 0, 9],
            })
        }
        fn set_hairpin(&mut self, index: u32) -> Result<(), CniError> {
            self.call(format!("hairpin {index}"))
        }
        fn set_port_vlan(
            &mut self,
            index: u32,
            vid: u16,
            _: &[u16],
            keep: bool,
        ) -> Result<(), CniError> {
            self.call(format!("vlan {vid} on {index} keep_default={keep}"))
        }
        fn set_isolated(&mut self, _: u32) -> Result<(), CniError> {
            Ok(())
        }
        fn configure_container(
            &mut self,
            _: &File,
            ifname: &str,
            addrs: &[IpNet],
            routes: &[(IpNet, IpAddr)],
            _: bool,
        ) -> Result<[u8; 6], CniError> {
            self.call(format!("container {ifname} {addrs:?} {routes:?}"))?;
            Ok([2, 0, 0, 0, 0, 0x0c])
        }
        fn delete_link(&mut self, name: &str) -> Result<(), CniError> {
            self.host_links.remove(name);
            self.call(format!("delete {name}"))
        }
        fn spoof_check(&mut self, host: &str, mac: [u8; 6]) -> Result<(), CniError> {
            self.call(format!("spoofchk {host} {}", crate::netlink::fmt_mac(&mac)))
        }
        fn delete_spoof_check(&mut self, host: &str) -> Result<(), CniError> {
            self.call(format!("delete spoofchk {host}"))
        }
    }

    impl DetachNet for Rec {
        fn delete_host_veth(&mut self, name: &str) -> Result<bool, CniError> {
            let had = self.host_links.remove(name);
            self.call(format!("delete host {name}"))?;
            Ok(had)
        }
        fn delete_container_veth(&mut self, netns: &Path, ifname: &str) -> Result<(), CniError> {
            self.call(format!("delete container {} {ifname}", netns.display()))
        }
        fn host_links(&mut self, bridge: &str) -> Result<Option<(u32, Vec<LinkView>)>, CniError> {
            self.call(format!("links {bridge}"))?;
            Ok(self.ports.clone().map(|p| (3, p)))
        }
        fn delete_link_index(&mut self, index: u32) -> Result<(), CniError> {
            self.call(format!("delete index {index}"))
        }
    }

    fn env(cmd: &str, id: &str, netns: Option<&str>) -> Env {
        let mut m: HashMap<&str, &str> = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .collect();
        if let Some(n) = netns {
            m.insert("CNI_NETNS", n);
        }
        parse_env(|k| m.get(k).map(|v| v.to_string())).unwrap()
    }

    fn conf(ranges: &str) -> (NetConf, Network) {
        let c = NetConf::parse(
            format!(r#"{{"cniVersion":"1.1.0","name":"n","dataDir":"/nonexistent/hako-test","ipam":{{"ranges":{ranges}}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        let n = resolve(&c, None).unwrap();
        (c, n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn held(store: &MemStore) -> BTreeMap<IpAddr, Owner> {
        store.snapshot().allocations
    }

    fn add(
        rec: &mut Rec,
        store: &MemStore,
        id: &str,
        c: &NetConf,
        n: &Network,
    ) -> Result<Value, CniError> {
        let ns = File::open("/dev/null").unwrap();
        add_with_store(rec, store, &env("ADD", id, Some("/run/netns/p")), c, n, &ns)
    }

    #[test]
    fn add_applies_the_plan_and_records_the_reservation() {
        let (c, n) = conf(r#"[{"subnet":"10.7.0.0/24"}]"#);
        let store = MemStore::new();
        let mut rec = Rec::default();
        let r = add(&mut rec, &store, "c1", &c, &n).unwrap();
        let host = host_veth_name("c1", "eth0");
        assert_eq!(
            rec.calls,
            [
                "bridge hako0 mtu 1500 gw [10.7.0.1/24]".to_string(),
                "masq hako_cni_hako0 created=false".into(),
                format!("veth {host}/eth0 mtu 1500 on 3"),
                "hairpin 9".into(),
                "container eth0 [10.7.0.2/24] [(0.0.0.0/0, 10.7.0.1)]".into(),
            ]
        );
        assert_eq!(r["ips"][0]["address"], "10.7.0.2/24");
        assert_eq!(r["interfaces"][0]["mac"], "02:00:00:00:00:03");
        assert_eq!(r["interfaces"][1]["mac"], "02:00:00:00:00:09");
        assert_eq!(r["interfaces"][2]["mac"], "02:00:00:00:00:0c");
        assert_eq!(held(&store), [(ip("10.7.0.2"), owner("c1"))].into());
        assert_eq!(store.snapshot().last.get(&0), Some(&ip("10.7.0.2")));
        // The next ADD continues round robin after the last reservation.
        let r = add(&mut Rec::default(), &store, "c2", &c, &n).unwrap();
        assert_eq!(r["ips"][0]["address"], "10.7.0.3/24");
    }

    #[test]
    fn exhausted_range_is_code_102_and_releases_the_other_family() {
        // 10.8.0.0/30: .1 is the gateway, .2 the only address; fd08::/126: ::2, ::3.
        let (c, n) = conf(r#"[{"subnet":"10.8.0.0/30"},{"subnet":"fd08::/126"}]"#);
        let store = MemStore::new();
        add(&mut Rec::default(), &store, "c1", &c, &n).unwrap();
        let before = held(&store);
        let mut rec = Rec::default();
        let e = add(&mut rec, &store, "c2", &c, &n).unwrap_err();
        assert_eq!(e.code, codes::IPAM_EXHAUSTED);
        assert_eq!(e.msg, "address range exhausted");
        assert_eq!(
            e.details,
            "no free address left in range 10.8.0.0/30 (1 allocated)"
        );
        assert!(rec.calls.is_empty(), "{:?}", rec.calls);
        assert_eq!(held(&store), before);
        // IPv4 free again, IPv6 full: the IPv4 address reserved first is released.
        store.edit(|s| {
            s.allocations.remove(&ip("10.8.0.2"));
            s.allocations.insert(ip("fd08::3"), owner("x"));
        });
        let before = held(&store);
        let e = add(&mut Rec::default(), &store, "c3", &c, &n).unwrap_err();
        assert_eq!(e.code, codes::IPAM_EXHAUSTED);
        assert!(e.details.contains("fd08::/126"), "{e}");
        assert_eq!(held(&store), before);
    }

    #[test]
    fn duplicate_attachment_is_code_107_and_changes_nothing() {
        let (c, n) = conf(r#"[{"subnet":"10.7.0.0/24"}]"#);
        let store = MemStore::new();
        add(&mut Rec::default(), &store, "c1", &c, &n).unwrap();
        let before = store.snapshot();
        let mut rec = Rec::default();
        let e = add(&mut rec, &store, "c1", &c, &n).unwrap_err();
        assert_eq!(e.code, codes::EXISTS);
        assert_eq!(e.details, "c1 eth0 already holds addresses; DEL it first");
        assert!(rec.calls.is_empty());
        assert_eq!(store.snapshot(), before);
    }

    #[test]
    fn store_failure_is_code_103_before_any_link() {
        let (c, n) = conf(r#"[{"subnet":"10.7.0.0/24"}]"#);
        let store = MemStore::new();
        store.edit(|s| s.fail_writes = Some(libc::ENOSPC));
        let mut rec = Rec::default();
        let e = add(&mut rec, &store, "c1", &c, &n).unwrap_err();
        assert_eq!(e.code, codes::IPAM_STORE);
        assert!(rec.calls.is_empty());
        assert!(held(&store).is_empty());
    }

    #[test]
    fn failure_after_the_veth_deletes_it_then_releases() {
        let (c, n) = conf(r#"[{"subnet":"10.7.0.0/24"},{"subnet":"fd07::/64"}]"#);
        let host = host_veth_name("c1", "eth0");
        for (fail, undone) in [
            ("bridge", false),
            ("masq", false),
            ("veth", false),
            ("hairpin", true),
            ("container", true),
        ] {
            let store = MemStore::new();
            let mut rec = Rec {
                fail: Some(fail),
                ..Default::default()
            };
            let e = add(&mut rec, &store, "c1", &c, &n).unwrap_err();
            assert_eq!(e.msg, "injected", "{fail}");
            assert!(held(&store).is_empty(), "{fail}: reservation left behind");
            assert!(rec.host_links.is_empty(), "{fail}: veth left behind");
            let deleted = rec.calls.last() == Some(&format!("delete {host}"));
            assert_eq!(deleted, undone, "{fail}: {:?}", rec.calls);
            assert!(rec.calls.iter().any(|l| l.starts_with(fail)));
        }
    }

    #[test]
    fn del_releases_only_this_attachment_and_deletes_its_veth() {
        let (c, n) = conf(r#"[{"subnet":"10.7.0.0/24"}]"#);
        let store = MemStore::new();
        let mut rec = Rec::default();
        add(&mut rec, &store, "c1", &c, &n).unwrap();
        add(&mut rec, &store, "c2", &c, &n).unwrap();
        rec.calls.clear();
        del_with(&mut rec, &store, &env("DEL", "c1", Some("/run/netns/p"))).unwrap();
        assert_eq!(held(&store), [(ip("10.7.0.3"), owner("c2"))].into());
        assert_eq!(
            rec.calls,
            [format!("delete host {}", host_veth_name("c1", "eth0"))]
        );
        // Again: nothing held, no host veth: the container side is cleaned, still success.
        rec.calls.clear();
        del_with(&mut rec, &store, &env("DEL", "c1", Some("/run/netns/p"))).unwrap();
        assert_eq!(
            rec.calls,
            [
                format!("delete host {}", host_veth_name("c1", "eth0")),
                "delete container /run/netns/p eth0".into()
            ]
        );
        // Without CNI_NETNS only the host side is tried.
        rec.calls.clear();
        del_with(&mut rec, &store, &env("DEL", "c1", None)).unwrap();
        assert_eq!(rec.calls.len(), 1);
        assert_eq!(held(&store).len(), 1);
    }

    #[test]
    fn del_store_failure_is_code_103_and_touches_no_link() {
        let store = MemStore::new();
        store.edit(|s| {
            s.allocations.insert(ip("10.7.0.2"), owner("c1"));
            s.fail_writes = Some(libc::EROFS);
        });
        let mut rec = Rec::default();
        let e = del_with(&mut rec, &store, &env("DEL", "c1", None)).unwrap_err();
        assert_eq!(e.code, codes::IPAM_STORE);
        assert!(rec.calls.is_empty());
        assert_eq!(held(&store).len(), 1);
    }

    #[test]
    fn gc_releases_stale_allocations_and_deletes_only_orphan_veths_on_the_bridge() {
        let with_valid = |v: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"1.1.0","name":"n","dataDir":"/nonexistent/x"{v}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let store = MemStore::new();
        store.edit(|s| {
            s.allocations.insert(ip("10.7.0.2"), owner("keep"));
            s.allocations.insert(ip("fd07::2"), owner("keep"));
            s.allocations.insert(ip("10.7.0.3"), owner("gone"));
        });
        let view = |name: String, index: u32, master: Option<u32>| LinkView {
            name,
            index,
            master,
        };
        let mut rec = Rec {
            ports: Some(vec![
                view("hako0".into(), 3, None),
                view(host_veth_name("keep", "eth0"), 10, Some(3)),
                view(host_veth_name("gone", "eth0"), 11, Some(3)),
                view(host_veth_name("other", "eth0"), 12, Some(4)),
                view("eth0".into(), 2, None),
                view("vethfe01".into(), 13, Some(3)),
            ]),
            ..Default::default()
        };
        // Without the list GC refuses (7) and touches nothing.
        let e = gc_with(&mut rec, &store, &with_valid("")).unwrap_err();
        assert_eq!(e.code, codes::INVALID_CONFIG);
        assert!(rec.calls.is_empty());
        assert_eq!(held(&store).len(), 3);
        let c =
            with_valid(r#","cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]"#);
        gc_with(&mut rec, &store, &c).unwrap();
        assert_eq!(
            held(&store),
            [
                (ip("10.7.0.2"), owner("keep")),
                (ip("fd07::2"), owner("keep"))
            ]
            .into()
        );
        assert_eq!(rec.calls, ["links hako0", "delete index 11"]);
        // No bridge: the store is still collected, no link is touched.
        store.edit(|s| {
            s.allocations.insert(ip("10.7.0.4"), owner("gone"));
        });
        let mut rec = Rec::default();
        gc_with(&mut rec, &store, &c).unwrap();
        assert_eq!(rec.calls, ["links hako0"]);
        assert_eq!(held(&store).len(), 2);
    }
}
