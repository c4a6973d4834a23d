//! Synchronous rtnetlink over one `NETLINK_ROUTE` socket of the calling thread's network
//! namespace: links, addresses, routes, neighbours and FDB entries. Effectful.
//!
//! Blocking on purpose: a CNI plugin is a short-lived process and the overlay callers may
//! sit inside tokio, so no runtime is needed or created.

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlag, AddressMessage};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, LinkAttribute, LinkFlag, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlag, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlag, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The socket itself failed.
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    /// The kernel refused a request.
    #[error("netlink {op}: {source}")]
    Kernel {
        /// What was asked.
        op: String,
        /// The kernel's errno as an io error.
        source: io::Error,
    },
    /// A reply could not be decoded.
    #[error("netlink decode: {0}")]
    Decode(String),
}

impl NlError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { source, .. } => source.raw_os_error(),
            NlError::Socket(e) => e.raw_os_error(),
            NlError::Decode(_) => None,
        }
    }

    /// True for "does not exist" refusals (ENODEV, ENOENT, ESRCH, EADDRNOTAVAIL).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// True for EEXIST.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

/// One rtnetlink socket.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

/// `Ok(None)` for not-found refusals.
pub fn optional<T>(r: Result<T, NlError>) -> Result<Option<T>, NlError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `Ok(())` for not-found refusals (idempotent deletes).
pub fn ignore_missing(r: Result<(), NlError>) -> Result<(), NlError> {
    optional(r).map(|_| ())
}

/// `Ok(())` for EEXIST (idempotent adds).
pub fn ignore_exists(r: Result<(), NlError>) -> Result<(), NlError> {
    match r {
        Err(e) if e.is_exists() => Ok(()),
        other => other,
    }
}

fn family_of(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// The IP of a route address, if it is one.
pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// The IP of a neighbour address, if it is one.
pub fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        // FDB (AF_BRIDGE) entries carry the destination as raw bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// Name of a link message.
pub fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// MAC of a link message.
pub fn link_mac(m: &LinkMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(b);
            Some(mac)
        }
        _ => None,
    })
}

/// MTU of a link message.
pub fn link_mtu(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(v) => Some(*v),
        _ => None,
    })
}

/// Master (bridge) index of a link message.
pub fn link_master(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(v) => Some(*v),
        _ => None,
    })
}

/// Formats a MAC as lower-case colon separated hex.
pub fn fmt_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An address as (prefix, flags) from an address message.
pub fn addr_net(m: &AddressMessage) -> Option<IpNet> {
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })?;
    IpNet::new(ip, m.header.prefix_len).ok()
}

/// Decodes the message at the start of `bytes` (a reply datagram may hold several).
/// netlink-packet-route 0.19 panics on some malformed attributes instead of failing (an
/// IFLA_STATS shorter than its struct, as older kernels send: rust-netlink/
/// netlink-packet-route#143): such a message is a decode error here, not a crash of the
/// plugin or of the agent's overlay controller.
pub fn decode_message(bytes: &[u8]) -> Result<NetlinkMessage<RouteNetlinkMessage>, DecodeError> {
    std::panic::catch_unwind(|| NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes))
        .map_err(|_| DecodeError::Panicked)?
        .map_err(|e| DecodeError::Invalid(e.to_string()))
}

/// Why a reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The decoder rejected the bytes.
    #[error("{0}")]
    Invalid(String),
    /// The decoder panicked on them (caught).
    #[error("malformed message (the decoder panicked)")]
    Panicked,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NlError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NlError::Socket)?;
        sock.bind_auto().map_err(NlError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NlError::Socket)?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends one request and collects the answer (every message of a dump, or the ACK).
    pub fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(NlError::Socket)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (bytes, _) = self.sock.recv_from_full().map_err(NlError::Socket)?;
            let mut off = 0usize;
            while off < bytes.len() {
                let m = decode_message(&bytes[off..])
                    .map_err(|e| NlError::Decode(format!("{op}: {e}")))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(NlError::Decode(format!("{op}: zero-length message")));
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(err) => match err.code {
                        Some(code) => {
                            return Err(NlError::Kernel {
                                op: op.to_string(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            })
                        }
                        None => {
                            if !dump {
                                return Ok(out);
                            }
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        self.request(op, msg, flags).map(|_| ())
    }

    /// Gets a link by name (`None` when there is none).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkMessage>, NlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        let r = optional(self.request(
            &format!("get link {name}"),
            RouteNetlinkMessage::GetLink(m),
            0,
        ))?;
        Ok(r.and_then(|v| {
            v.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
        }))
    }

    /// Every link.
    pub fn links(&mut self) -> Result<Vec<LinkMessage>, NlError> {
        let r = self.request(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(r.into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Creates a link (fails with EEXIST when the name is taken).
    pub fn link_add(&mut self, op: &str, m: LinkMessage) -> Result<(), NlError> {
        self.ack(
            op,
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Changes a link.
    pub fn link_set(&mut self, op: &str, m: LinkMessage) -> Result<(), NlError> {
        self.ack(op, RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Changes a link with RTM_NEWLINK (needed for link-kind and port options).
    pub fn link_change(&mut self, op: &str, m: LinkMessage) -> Result<(), NlError> {
        self.ack(op, RouteNetlinkMessage::NewLink(m), 0)
    }

    /// Sets a link up by index.
    pub fn link_up(&mut self, index: u32) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = vec![LinkFlag::Up];
        m.header.change_mask = vec![LinkFlag::Up];
        self.link_set(&format!("set link {index} up"), m)
    }

    /// Deletes a link by index.
    pub fn link_del_index(&mut self, index: u32) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.ack(
            &format!("delete link {index}"),
            RouteNetlinkMessage::DelLink(m),
            0,
        )
    }

    /// Adds (or with `add` false deletes) VLAN `vid` on a bridge port, or on the bridge
    /// itself with `on_self` (`bridge vlan add|del vid <vid> dev <link> [self]`); `flags`
    /// are `BRIDGE_VLAN_INFO_*` (PVID 2, UNTAGGED 4).
    pub fn bridge_vlan(
        &mut self,
        index: u32,
        vid: u16,
        flags: u16,
        on_self: bool,
        add: bool,
    ) -> Result<(), NlError> {
        const BRIDGE_FLAGS_SELF: u16 = 2;
        let mut m = LinkMessage::default();
        m.header.interface_family = AddressFamily::Bridge;
        m.header.index = index;
        let mut info = BridgeVlanInfo::default();
        info.flags = flags;
        info.vid = vid;
        let mut spec = Vec::new();
        if on_self {
            spec.push(AfSpecBridge::Flags(BRIDGE_FLAGS_SELF));
        }
        spec.push(AfSpecBridge::VlanInfo(info));
        m.attributes.push(LinkAttribute::AfSpecBridge(spec));
        let op = format!(
            "bridge vlan {} vid {vid} dev {index}{}",
            if add { "add" } else { "del" },
            if on_self { " self" } else { "" }
        );
        // With AF_BRIDGE, RTM_DELLINK removes the VLAN, not the link.
        let msg = if add {
            RouteNetlinkMessage::SetLink(m)
        } else {
            RouteNetlinkMessage::DelLink(m)
        };
        self.ack(&op, msg, 0)
    }

    /// Deletes a link by name; a missing link is success.
    pub fn link_del_name(&mut self, name: &str) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        ignore_missing(self.ack(
            &format!("delete link {name}"),
            RouteNetlinkMessage::DelLink(m),
            0,
        ))
    }

    /// Addresses of one link (all links when `index` is 0).
    pub fn addrs(&mut self, index: u32) -> Result<Vec<AddressMessage>, NlError> {
        let r = self.request(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(r.into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if index == 0 || a.header.index == index => {
                    Some(a)
                }
                _ => None,
            })
            .collect())
    }

    /// Adds `net` (address with prefix) to a link; IPv6 without duplicate detection.
    pub fn addr_add(&mut self, index: u32, net: IpNet) -> Result<(), NlError> {
        self.addr_add_dad(index, net, false)
    }

    /// Adds an address; IPv6 goes through duplicate address detection only with `dad`.
    pub fn addr_add_dad(&mut self, index: u32, net: IpNet, dad: bool) -> Result<(), NlError> {
        let mut m = AddressMessage::default();
        m.header.family = family_of(&net.addr());
        m.header.prefix_len = net.prefix_len();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(net.addr()));
        m.attributes.push(AddressAttribute::Address(net.addr()));
        if net.addr().is_ipv6() && !dad {
            m.attributes
                .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
        }
        self.ack(
            &format!("add address {net}"),
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Routes of the main table for one family.
    pub fn routes(&mut self, family: AddressFamily) -> Result<Vec<RouteMessage>, NlError> {
        let mut q = RouteMessage::default();
        q.header.address_family = family;
        let r = self.request("dump routes", RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)?;
        Ok(r.into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.table == RouteHeader::RT_TABLE_MAIN =>
                {
                    Some(r)
                }
                _ => None,
            })
            .collect())
    }

    /// Adds (or with `replace`, replaces) a unicast route `dst` via `gw` out of `oif`.
    pub fn route_add(
        &mut self,
        dst: IpNet,
        gw: Option<IpAddr>,
        oif: u32,
        onlink: bool,
        replace: bool,
    ) -> Result<(), NlError> {
        let m = route_msg(dst, gw, oif, onlink);
        let flags = if replace {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
        self.ack(
            &format!("add route {dst} via {gw:?}"),
            RouteNetlinkMessage::NewRoute(m),
            flags,
        )
    }

    /// Deletes a route; a missing route is success.
    pub fn route_del(&mut self, dst: IpNet, gw: Option<IpAddr>, oif: u32) -> Result<(), NlError> {
        let mut m = route_msg(dst, gw, oif, false);
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
        ignore_missing(self.ack(
            &format!("delete route {dst}"),
            RouteNetlinkMessage::DelRoute(m),
            0,
        ))
    }

    /// Neighbour (or, with `AddressFamily::Bridge`, FDB) entries of one link.
    pub fn neighbours(
        &mut self,
        family: AddressFamily,
        index: u32,
    ) -> Result<Vec<NeighbourMessage>, NlError> {
        let mut q = NeighbourMessage::default();
        q.header.family = family;
        let r = self.request(
            "dump neighbours",
            RouteNetlinkMessage::GetNeighbour(q),
            NLM_F_DUMP,
        )?;
        Ok(r.into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == index => Some(n),
                _ => None,
            })
            .collect())
    }

    /// Adds or replaces a permanent neighbour entry `ip → mac` on a link.
    pub fn neigh_replace(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<(), NlError> {
        let mut m = NeighbourMessage::default();
        m.header.family = family_of(&ip);
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        self.ack(
            &format!("replace neighbour {ip}"),
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes a neighbour entry; a missing one is success.
    pub fn neigh_del(&mut self, index: u32, ip: IpAddr) -> Result<(), NlError> {
        let mut m = NeighbourMessage::default();
        m.header.family = family_of(&ip);
        m.header.ifindex = index;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        ignore_missing(self.ack(
            &format!("delete neighbour {ip}"),
            RouteNetlinkMessage::DelNeighbour(m),
            0,
        ))
    }

    /// Adds or replaces a VXLAN FDB entry `mac → dst` (`bridge fdb replace ... self permanent`).
    pub fn fdb_replace(&mut self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<(), NlError> {
        let m = fdb_msg(index, mac, Some(dst));
        self.ack(
            &format!("replace fdb {} dst {dst}", fmt_mac(&mac)),
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes a VXLAN FDB entry; a missing one is success.
    pub fn fdb_del(
        &mut self,
        index: u32,
        mac: [u8; 6],
        dst: Option<IpAddr>,
    ) -> Result<(), NlError> {
        let m = fdb_msg(index, mac, dst);
        ignore_missing(self.ack(
            &format!("delete fdb {}", fmt_mac(&mac)),
            RouteNetlinkMessage::DelNeighbour(m),
            0,
        ))
    }
}

fn fdb_msg(index: u32, mac: [u8; 6], dst: Option<IpAddr>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = vec![NeighbourFlag::Own];
    m.attributes
        .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
    if let Some(dst) = dst {
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(dst)));
    }
    m
}

fn route_msg(dst: IpNet, gw: Option<IpAddr>, oif: u32, onlink: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family_of(&dst.addr());
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = if gw.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    m.header.kind = RouteType::Unicast;
    if onlink {
        m.header.flags = vec![RouteFlag::Onlink];
    }
    if dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(route_addr(dst.network())));
    }
    if let Some(gw) = gw {
        m.attributes.push(RouteAttribute::Gateway(route_addr(gw)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// Destination of a route message (`0.0.0.0/0` or `::/0` when absent).
pub fn route_dst(m: &RouteMessage) -> Option<IpNet> {
    let len = m.header.destination_prefix_length;
    let ip = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => route_ip(d),
            _ => None,
        })
        .or(match m.header.address_family {
            AddressFamily::Inet => Some(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            AddressFamily::Inet6 => Some(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
            _ => None,
        })?;
    IpNet::new(ip, len).ok()
}

/// Gateway of a route message.
pub fn route_gw(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_ip(g),
        _ => None,
    })
}

/// Output interface of a route message.
pub fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}
