//! VXLAN overlay between nodes: the per-node VXLAN device, and converging its FDB entries
//! (peer VTEP MAC → peer node IP), permanent neighbours (peer gateway → peer VTEP MAC) and
//! onlink routes (peer pod CIDR via peer gateway) to a desired peer list.
//!
//! `desired` and `plan` are pure; `ensure_device` and `sync_peers` are effectful (blocking
//! netlink in the calling thread's network namespace; safe to call from inside tokio via
//! `spawn_blocking` or directly, no runtime is created).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlag, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourState};
use netlink_packet_route::AddressFamily;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::netlink::{self, fmt_mac, Netlink, NlError};

/// VXLAN header overhead on an IPv4 underlay.
pub const OVERHEAD_V4: u32 = 50;
/// VXLAN header overhead on an IPv6 underlay.
pub const OVERHEAD_V6: u32 = 70;

/// Where and how the overlay device is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OverlayConfig {
    /// Device name (default `hako.1`).
    pub dev: String,
    /// VXLAN network identifier (default 1).
    pub vni: u32,
    /// UDP destination port (default 4789).
    pub port: u16,
    /// Underlay interface; default: the interface of the default route.
    pub underlay_if: Option<String>,
    /// Underlay address; default: the first address of the underlay interface.
    pub underlay_ip: Option<IpAddr>,
    /// Where the VTEP MAC is persisted (default `/var/lib/hako/overlay`).
    pub state_dir: PathBuf,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            dev: "hako.1".into(),
            vni: 1,
            port: 4789,
            underlay_if: None,
            underlay_ip: None,
            state_dir: PathBuf::from("/var/lib/hako/overlay"),
        }
    }
}

/// One peer node: the peer file holds a JSON array of these.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's underlay address (VXLAN destination).
    #[serde(alias = "nodeIP", alias = "nodeIp")]
    pub node_ip: IpAddr,
    /// The peer's pod CIDR; its first address is the peer's gateway.
    #[serde(alias = "podCIDR", alias = "podCidr")]
    pub pod_cidr: IpNet,
    /// The peer's VTEP MAC, `aa:bb:cc:dd:ee:ff` in the file.
    #[serde(alias = "vtepMAC", alias = "vtepMac", with = "mac_serde")]
    pub vtep_mac: [u8; 6],
}

/// The overlay device as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Device name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// VTEP MAC.
    #[serde(with = "mac_serde")]
    pub mac: [u8; 6],
    /// Underlay source address.
    pub local_ip: IpAddr,
    /// Device MTU.
    pub mtu: u32,
}

/// What a sync changed, counted per entry (FDB, neighbour, route).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Entries created.
    pub added: usize,
    /// Entries corrected.
    pub updated: usize,
    /// Stale entries removed.
    pub removed: usize,
}

/// An overlay failure.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NlError),
    /// No usable underlay interface or address.
    #[error("underlay: {0}")]
    Underlay(String),
    /// The device does not exist (call `ensure_device` first).
    #[error("overlay device {0} does not exist")]
    NoDevice(String),
    /// The peer list is inconsistent.
    #[error("invalid peers: {0}")]
    Invalid(String),
}

/// MAC (de)serialisation as `aa:bb:cc:dd:ee:ff`.
pub mod mac_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `aa:bb:cc:dd:ee:ff`.
    pub fn parse(s: &str) -> Option<[u8; 6]> {
        let mut mac = [0u8; 6];
        let mut n = 0;
        for (i, part) in s.split(':').enumerate() {
            if i >= 6 || part.len() != 2 {
                return None;
            }
            mac[i] = u8::from_str_radix(part, 16).ok()?;
            n += 1;
        }
        (n == 6).then_some(mac)
    }

    /// Serialises a MAC.
    pub fn serialize<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::netlink::fmt_mac(mac))
    }

    /// Deserialises a MAC.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad MAC {s:?}")))
    }
}

/// FDB, neighbour and route entries of the overlay device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct State {
    /// FDB entries (VTEP MAC, destination node IP); a MAC may appear more than once.
    pub fdb: BTreeSet<([u8; 6], IpAddr)>,
    /// Permanent neighbours: gateway → VTEP MAC.
    pub neigh: BTreeMap<IpAddr, [u8; 6]>,
    /// Routes: pod CIDR → gateway.
    pub routes: BTreeMap<IpNet, IpAddr>,
}

/// One change to the device's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add or replace an FDB entry.
    FdbSet([u8; 6], IpAddr),
    /// Delete an FDB entry.
    FdbDel([u8; 6], IpAddr),
    /// Add or replace a permanent neighbour.
    NeighSet(IpAddr, [u8; 6]),
    /// Delete a neighbour.
    NeighDel(IpAddr),
    /// Add or replace an onlink route.
    RouteSet(IpNet, IpAddr),
    /// Delete a route.
    RouteDel(IpNet, IpAddr),
}

/// The gateway of a pod CIDR: its first address.
pub fn gateway_of(cidr: &IpNet) -> IpAddr {
    match cidr.trunc().network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(1))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))),
    }
}

/// The desired state for `peers`, skipping the node itself (`local_ip`).
pub fn desired(peers: &[Peer], local_ip: Option<IpAddr>) -> Result<State, OverlayError> {
    let mut s = State::default();
    let mut macs: BTreeMap<[u8; 6], IpAddr> = BTreeMap::new();
    for p in peers {
        if Some(p.node_ip) == local_ip {
            continue;
        }
        if p.vtep_mac[0] & 1 == 1 || p.vtep_mac == [0; 6] {
            return Err(OverlayError::Invalid(format!(
                "peer {}: VTEP MAC {} is not unicast",
                p.node_ip,
                fmt_mac(&p.vtep_mac)
            )));
        }
        if let Some(other) = macs.insert(p.vtep_mac, p.node_ip) {
            if other != p.node_ip {
                return Err(OverlayError::Invalid(format!(
                    "VTEP MAC {} claimed by {other} and {}",
                    fmt_mac(&p.vtep_mac),
                    p.node_ip
                )));
            }
        }
        let cidr = p.pod_cidr.trunc();
        if s.routes.contains_key(&cidr) {
            return Err(OverlayError::Invalid(format!(
                "pod CIDR {cidr} appears twice"
            )));
        }
        let gw = gateway_of(&cidr);
        s.fdb.insert((p.vtep_mac, p.node_ip));
        s.neigh.insert(gw, p.vtep_mac);
        s.routes.insert(cidr, gw);
    }
    Ok(s)
}

/// The operations turning `current` into `want`, in a safe order (removals first, then
/// FDB before neighbours before routes), and their counts.
pub fn plan(current: &State, want: &State) -> (Vec<Op>, SyncReport) {
    let mut ops = Vec::new();
    let mut r = SyncReport::default();
    let want_fdb_macs: BTreeSet<[u8; 6]> = want.fdb.iter().map(|(m, _)| *m).collect();
    let cur_fdb_macs: BTreeSet<[u8; 6]> = current.fdb.iter().map(|(m, _)| *m).collect();
    for (dst, gw) in &current.routes {
        if !want.routes.contains_key(dst) {
            r.removed += 1;
            ops.push(Op::RouteDel(*dst, *gw));
        }
    }
    for ip in current.neigh.keys() {
        if !want.neigh.contains_key(ip) {
            r.removed += 1;
            ops.push(Op::NeighDel(*ip));
        }
    }
    for (mac, ip) in &current.fdb {
        if !want.fdb.contains(&(*mac, *ip)) {
            if !want_fdb_macs.contains(mac) {
                r.removed += 1;
            }
            ops.push(Op::FdbDel(*mac, *ip));
        }
    }
    for (mac, ip) in &want.fdb {
        if !current.fdb.contains(&(*mac, *ip)) {
            if cur_fdb_macs.contains(mac) {
                r.updated += 1;
            } else {
                r.added += 1;
            }
            ops.push(Op::FdbSet(*mac, *ip));
        }
    }
    for (ip, mac) in &want.neigh {
        match current.neigh.get(ip) {
            Some(m) if m == mac => {}
            Some(_) => {
                r.updated += 1;
                ops.push(Op::NeighSet(*ip, *mac));
            }
            None => {
                r.added += 1;
                ops.push(Op::NeighSet(*ip, *mac));
            }
        }
    }
    for (dst, gw) in &want.routes {
        match current.routes.get(dst) {
            Some(g) if g == gw => {}
            Some(_) => {
                r.updated += 1;
                ops.push(Op::RouteSet(*dst, *gw));
            }
            None => {
                r.added += 1;
                ops.push(Op::RouteSet(*dst, *gw));
            }
        }
    }
    (ops, r)
}

/// Reads and changes the overlay device's tables.
pub trait OverlayNet {
    /// The current entries of device `ifindex`.
    fn read(&mut self, ifindex: u32) -> Result<State, OverlayError>;
    /// Applies one operation.
    fn apply(&mut self, ifindex: u32, op: &Op) -> Result<(), OverlayError>;
}

impl OverlayNet for Netlink {
    fn read(&mut self, ifindex: u32) -> Result<State, OverlayError> {
        let mut s = State::default();
        for n in self.neighbours(AddressFamily::Bridge, ifindex)? {
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(b);
                    Some(m)
                }
                _ => None,
            });
            let dst = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => netlink::neigh_ip(d),
                _ => None,
            });
            if let (Some(mac), Some(dst)) = (mac, dst) {
                if mac != [0; 6] {
                    s.fdb.insert((mac, dst));
                }
            }
        }
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            for n in self.neighbours(fam, ifindex)? {
                if n.header.state != NeighbourState::Permanent {
                    continue;
                }
                let ip = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(d) => netlink::neigh_ip(d),
                    _ => None,
                });
                let mac = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(b);
                        Some(m)
                    }
                    _ => None,
                });
                if let (Some(ip), Some(mac)) = (ip, mac) {
                    s.neigh.insert(ip, mac);
                }
            }
            for r in self.routes(fam)? {
                if netlink::route_oif(&r) != Some(ifindex) {
                    continue;
                }
                if let (Some(dst), Some(gw)) = (netlink::route_dst(&r), netlink::route_gw(&r)) {
                    s.routes.insert(dst, gw);
                }
            }
        }
        Ok(s)
    }

    fn apply(&mut self, ifindex: u32, op: &Op) -> Result<(), OverlayError> {
        match op {
            Op::FdbSet(mac, ip) => self.fdb_replace(ifindex, *mac, *ip)?,
            Op::FdbDel(mac, ip) => self.fdb_del(ifindex, *mac, Some(*ip))?,
            Op::NeighSet(ip, mac) => self.neigh_replace(ifindex, *ip, *mac)?,
            Op::NeighDel(ip) => self.neigh_del(ifindex, *ip)?,
            Op::RouteSet(dst, gw) => self.route_add(*dst, Some(*gw), ifindex, true, true)?,
            Op::RouteDel(dst, gw) => self.route_del(*dst, Some(*gw), ifindex)?,
        }
        Ok(())
    }
}

/// Converges `net`'s tables for device `ifindex` to `peers`.
pub fn sync_with(
    net: &mut impl OverlayNet,
    ifindex: u32,
    local_ip: Option<IpAddr>,
    peers: &[Peer],
) -> Result<SyncReport, OverlayError> {
    let want = desired(peers, local_ip)?;
    let current = net.read(ifindex)?;
    let (ops, report) = plan(&current, &want);
    for op in &ops {
        tracing::debug!(?op, "overlay");
        net.apply(ifindex, op)?;
    }
    Ok(report)
}

fn vxlan_info(l: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
            _ => None,
        }),
        _ => None,
    })
}

fn bytes_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

fn vxlan_local(l: &LinkMessage) -> Option<IpAddr> {
    vxlan_info(l)?.iter().find_map(|i| match i {
        InfoVxlan::Local(b) | InfoVxlan::Local6(b) => bytes_ip(b),
        _ => None,
    })
}

/// Sync the overlay device's tables to `peers` (the node's own entry is skipped).
pub fn sync_peers(cfg: &OverlayConfig, peers: &[Peer]) -> Result<SyncReport, OverlayError> {
    let mut nl = Netlink::open()?;
    let dev = nl
        .link_by_name(&cfg.dev)?
        .ok_or_else(|| OverlayError::NoDevice(cfg.dev.clone()))?;
    let local = vxlan_local(&dev);
    let r = sync_with(&mut nl, dev.header.index, local, peers)?;
    tracing::info!(
        added = r.added,
        updated = r.updated,
        removed = r.removed,
        "overlay synced"
    );
    Ok(r)
}

/// The current entries of the device (for `hako-cni overlay show`).
pub fn read_state(cfg: &OverlayConfig) -> Result<(DeviceInfo, State), OverlayError> {
    let mut nl = Netlink::open()?;
    let dev = nl
        .link_by_name(&cfg.dev)?
        .ok_or_else(|| OverlayError::NoDevice(cfg.dev.clone()))?;
    let info = DeviceInfo {
        name: cfg.dev.clone(),
        ifindex: dev.header.index,
        mac: netlink::link_mac(&dev).unwrap_or_default(),
        local_ip: vxlan_local(&dev).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        mtu: netlink::link_mtu(&dev).unwrap_or(0),
    };
    let state = nl.read(dev.header.index)?;
    Ok((info, state))
}

/// The VTEP MAC: persisted in `state_dir/<dev>.mac`, derived from the device name and
/// underlay address the first time (locally administered, unicast).
pub fn vtep_mac(cfg: &OverlayConfig, local_ip: IpAddr) -> [u8; 6] {
    let path = cfg.state_dir.join(format!("{}.mac", cfg.dev));
    if let Some(m) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| mac_serde::parse(s.trim()))
    {
        return m;
    }
    let mac = derive_mac(&cfg.dev, local_ip);
    if std::fs::create_dir_all(&cfg.state_dir).is_ok() {
        if let Err(e) = std::fs::write(&path, fmt_mac(&mac)) {
            tracing::warn!("cannot persist VTEP MAC in {}: {e}", path.display());
        }
    }
    mac
}

/// The derived VTEP MAC for a device name and underlay address.
pub fn derive_mac(dev: &str, local_ip: IpAddr) -> [u8; 6] {
    let mut h = Sha256::new();
    h.update(b"hako-vtep\0");
    h.update(dev.as_bytes());
    h.update([0]);
    h.update(local_ip.to_string().as_bytes());
    let d = h.finalize();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&d[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// (ifindex, address, mtu) of the underlay.
fn underlay(nl: &mut Netlink, cfg: &OverlayConfig) -> Result<(u32, IpAddr, u32), OverlayError> {
    let addrs = nl.addrs(0)?;
    let links = nl.links()?;
    let mtu_of = |idx: u32| {
        links
            .iter()
            .find(|l| l.header.index == idx)
            .and_then(netlink::link_mtu)
            .unwrap_or(1500)
    };
    if let Some(ip) = cfg.underlay_ip {
        let a = addrs
            .iter()
            .find(|a| netlink::addr_net(a).map(|n| n.addr()) == Some(ip))
            .ok_or_else(|| OverlayError::Underlay(format!("no interface has {ip}")))?;
        return Ok((a.header.index, ip, mtu_of(a.header.index)));
    }
    let idx = match &cfg.underlay_if {
        Some(name) => links
            .iter()
            .find(|l| netlink::link_name(l) == Some(name.as_str()))
            .map(|l| l.header.index)
            .ok_or_else(|| OverlayError::Underlay(format!("no interface {name}")))?,
        None => nl
            .routes(AddressFamily::Inet)?
            .iter()
            .find(|r| r.header.destination_prefix_length == 0)
            .and_then(netlink::route_oif)
            .ok_or_else(|| {
                OverlayError::Underlay("no default route; set underlay_if or underlay_ip".into())
            })?,
    };
    let mut cands: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| a.header.index == idx)
        .filter_map(netlink::addr_net)
        .map(|n| n.addr())
        .filter(|ip| match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    cands.sort_by_key(|ip| ip.is_ipv6());
    let ip = cands
        .first()
        .copied()
        .ok_or_else(|| OverlayError::Underlay(format!("interface {idx} has no address")))?;
    Ok((idx, ip, mtu_of(idx)))
}

/// Ensures the VXLAN device (learning off, MTU = underlay MTU − 50, stable VTEP MAC), up.
pub fn ensure_device(cfg: &OverlayConfig) -> Result<DeviceInfo, OverlayError> {
    let mut nl = Netlink::open()?;
    let (uidx, local, umtu) = underlay(&mut nl, cfg)?;
    let overhead = if local.is_ipv4() {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    };
    let mtu = umtu.saturating_sub(overhead);
    let mac = vtep_mac(cfg, local);
    let mut existing = nl.link_by_name(&cfg.dev)?;
    if let Some(l) = &existing {
        let info = vxlan_info(l);
        let ok = info.is_some_and(|v| {
            v.contains(&InfoVxlan::Id(cfg.vni))
                && v.contains(&InfoVxlan::Port(cfg.port))
                && v.contains(&InfoVxlan::Learning(false))
                && v.contains(&InfoVxlan::Link(uidx))
                && vxlan_local(l) == Some(local)
        });
        if !ok {
            tracing::warn!(dev = %cfg.dev, "overlay device differs; recreating");
            netlink::ignore_missing(nl.link_del_index(l.header.index))?;
            existing = None;
        }
    }
    let link = match existing {
        Some(l) => l,
        None => {
            let local_attr = match local {
                IpAddr::V4(a) => InfoVxlan::Local(a.octets().to_vec()),
                IpAddr::V6(a) => InfoVxlan::Local6(a.octets().to_vec()),
            };
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(cfg.dev.clone()));
            m.attributes.push(LinkAttribute::Mtu(mtu));
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
            m.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(vec![
                    InfoVxlan::Id(cfg.vni),
                    local_attr,
                    InfoVxlan::Link(uidx),
                    InfoVxlan::Port(cfg.port),
                    InfoVxlan::Learning(false),
                ])),
            ]));
            m.header.flags = vec![LinkFlag::Up];
            m.header.change_mask = vec![LinkFlag::Up];
            netlink::ignore_exists(nl.link_add(&format!("add vxlan {}", cfg.dev), m))?;
            nl.link_by_name(&cfg.dev)?
                .ok_or_else(|| OverlayError::NoDevice(cfg.dev.clone()))?
        }
    };
    let idx = link.header.index;
    let mut fix = LinkMessage::default();
    fix.header.index = idx;
    let mut needs = false;
    if netlink::link_mac(&link) != Some(mac) {
        fix.attributes.push(LinkAttribute::Address(mac.to_vec()));
        needs = true;
    }
    if netlink::link_mtu(&link) != Some(mtu) {
        fix.attributes.push(LinkAttribute::Mtu(mtu));
        needs = true;
    }
    if !link.header.flags.contains(&LinkFlag::Up) {
        fix.header.flags = vec![LinkFlag::Up];
        fix.header.change_mask = vec![LinkFlag::Up];
        needs = true;
    }
    if needs {
        nl.link_set(&format!("fix {}", cfg.dev), fix)?;
    }
    Ok(DeviceInfo {
        name: cfg.dev.clone(),
        ifindex: idx,
        mac,
        local_ip: local,
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str, cidr: &str, last: u8) -> Peer {
        Peer {
            node_ip: ip.parse().unwrap(),
            pod_cidr: cidr.parse().unwrap(),
            vtep_mac: [2, 0, 0, 0, 0, last],
        }
    }

    #[test]
    fn peer_file_format() {
        let text = r#"[{"node_ip":"192.0.2.12","pod_cidr":"10.244.2.0/24","vtep_mac":"02:00:00:00:00:02"},
                       {"nodeIP":"192.0.2.13","podCIDR":"fd10:3::/64","vtepMAC":"02:00:00:00:00:03"}]"#;
        let peers: Vec<Peer> = serde_json::from_str(text).unwrap();
        assert_eq!(peers[0], peer("192.0.2.12", "10.244.2.0/24", 2));
        assert_eq!(peers[1].pod_cidr, "fd10:3::/64".parse::<IpNet>().unwrap());
        let back = serde_json::to_string(&peers[0]).unwrap();
        assert!(back.contains(r#""vtep_mac":"02:00:00:00:00:02""#), "{back}");
        assert!(serde_json::from_str::<Vec<Peer>>(
            r#"[{"node_ip":"1.2.3.4","pod_cidr":"10.0.0.0/24","vtep_mac":"02:00"}]"#
        )
        .is_err());
    }

    #[test]
    fn desired_skips_self_and_rejects_conflicts() {
        let peers = [
            peer("192.0.2.11", "10.244.1.0/24", 1),
            peer("192.0.2.12", "10.244.2.0/24", 2),
        ];
        let s = desired(&peers, Some("192.0.2.11".parse().unwrap())).unwrap();
        assert_eq!(s.fdb.len(), 1);
        assert_eq!(
            s.routes[&"10.244.2.0/24".parse::<IpNet>().unwrap()],
            "10.244.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            s.neigh[&"10.244.2.1".parse::<IpAddr>().unwrap()],
            [2, 0, 0, 0, 0, 2]
        );
        let dup = [
            peer("192.0.2.12", "10.244.2.0/24", 2),
            peer("192.0.2.13", "10.244.2.0/24", 3),
        ];
        assert!(desired(&dup, None).is_err());
        let mac_dup = [
            peer("192.0.2.12", "10.244.2.0/24", 2),
            peer("192.0.2.13", "10.244.3.0/24", 2),
        ];
        assert!(desired(&mac_dup, None).is_err());
        let mut mc = peer("192.0.2.12", "10.244.2.0/24", 2);
        mc.vtep_mac[0] = 1;
        assert!(desired(&[mc], None).is_err());
    }

    #[test]
    fn plan_adds_fixes_removes_and_is_idempotent() {
        let a = peer("192.0.2.12", "10.244.2.0/24", 2);
        let b = peer("192.0.2.13", "10.244.3.0/24", 3);
        let want = desired(&[a.clone(), b.clone()], None).unwrap();
        let (ops, r) = plan(&State::default(), &want);
        assert_eq!(
            r,
            SyncReport {
                added: 6,
                updated: 0,
                removed: 0
            }
        );
        assert_eq!(ops.len(), 6);
        assert!(matches!(ops[0], Op::FdbSet(..)));
        assert!(matches!(ops[5], Op::RouteSet(..)));
        let (ops, r) = plan(&want, &want);
        assert!(ops.is_empty());
        assert_eq!(r, SyncReport::default());
        // b moved to another node IP and a was removed.
        let mut b2 = b.clone();
        b2.node_ip = "192.0.2.99".parse().unwrap();
        let want2 = desired(&[b2], None).unwrap();
        let (ops, r) = plan(&want, &want2);
        assert_eq!(
            r,
            SyncReport {
                added: 0,
                updated: 1,
                removed: 3
            }
        );
        assert_eq!(ops[0], Op::RouteDel(a.pod_cidr, gateway_of(&a.pod_cidr)));
        assert!(ops.contains(&Op::FdbDel(b.vtep_mac, b.node_ip)));
        assert!(ops.contains(&Op::FdbSet(b.vtep_mac, "192.0.2.99".parse().unwrap())));
        // A wrong neighbour MAC and a wrong route gateway are corrected.
        let mut cur = want.clone();
        cur.neigh
            .insert(gateway_of(&a.pod_cidr), [2, 9, 9, 9, 9, 9]);
        cur.routes
            .insert(a.pod_cidr, "10.244.2.77".parse().unwrap());
        let (ops, r) = plan(&cur, &want);
        assert_eq!(
            r,
            SyncReport {
                added: 0,
                updated: 2,
                removed: 0
            }
        );
        assert_eq!(ops.len(), 2);
    }

    struct Fake {
        state: State,
        applied: Vec<Op>,
    }

    impl OverlayNet for Fake {
        fn read(&mut self, _: u32) -> Result<State, OverlayError> {
            Ok(self.state.clone())
        }
        fn apply(&mut self, _: u32, op: &Op) -> Result<(), OverlayError> {
            match op {
                Op::FdbSet(m, i) => {
                    self.state.fdb.insert((*m, *i));
                }
                Op::FdbDel(m, i) => {
                    self.state.fdb.remove(&(*m, *i));
                }
                Op::NeighSet(i, m) => {
                    self.state.neigh.insert(*i, *m);
                }
                Op::NeighDel(i) => {
                    self.state.neigh.remove(i);
                }
                Op::RouteSet(d, g) => {
                    self.state.routes.insert(*d, *g);
                }
                Op::RouteDel(d, _) => {
                    self.state.routes.remove(d);
                }
            }
            self.applied.push(op.clone());
            Ok(())
        }
    }

    #[test]
    fn sync_converges_through_the_trait() {
        let mut f = Fake {
            state: State::default(),
            applied: vec![],
        };
        let peers = [
            peer("192.0.2.12", "10.244.2.0/24", 2),
            peer("192.0.2.13", "10.244.3.0/24", 3),
        ];
        let r = sync_with(&mut f, 7, None, &peers).unwrap();
        assert_eq!(r.added, 6);
        assert_eq!(f.state, desired(&peers, None).unwrap());
        f.applied.clear();
        let r = sync_with(&mut f, 7, None, &peers).unwrap();
        assert_eq!(r, SyncReport::default());
        assert!(f.applied.is_empty(), "second sync must be a no-op");
        let r = sync_with(&mut f, 7, None, &peers[..1]).unwrap();
        assert_eq!(r.removed, 3);
        assert_eq!(f.state, desired(&peers[..1], None).unwrap());
    }

    #[test]
    fn mac_is_stable_and_local_unicast() {
        let ip: IpAddr = "192.0.2.11".parse().unwrap();
        let m = derive_mac("hako.1", ip);
        assert_eq!(m, derive_mac("hako.1", ip));
        assert_eq!(m[0] & 3, 2);
        assert_ne!(m, derive_mac("hako.1", "192.0.2.12".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let cfg = OverlayConfig {
            state_dir: dir.path().into(),
            ..Default::default()
        };
        let first = vtep_mac(&cfg, ip);
        // Persisted: a different underlay address later keeps the same MAC.
        assert_eq!(vtep_mac(&cfg, "192.0.2.99".parse().unwrap()), first);
    }
}
