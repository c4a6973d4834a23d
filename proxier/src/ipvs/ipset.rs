//! ipsets over nfnetlink (include/uapi/linux/netfilter/ipset/ip_set.h): message encoding
//! (pure), the sets IPVS mode uses and their members, and a small client. No `ipset`
//! process is involved.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use nix::sys::socket::SockProtocol;

use super::nl::{MsgBuilder, NlError, Socket, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_REQUEST};
use crate::model::{Endpoint, Protocol, ServicePort};

/// nfnetlink subsystem id of ipset.
pub const NFNL_SUBSYS_IPSET: u16 = 6;
/// Protocol version spoken.
pub const IPSET_PROTOCOL: u8 = 7;

/// Commands.
pub mod cmd {
    /// Create a set.
    pub const CREATE: u16 = 2;
    /// Destroy a set.
    pub const DESTROY: u16 = 3;
    /// Flush a set.
    pub const FLUSH: u16 = 4;
    /// Swap two sets.
    pub const SWAP: u16 = 6;
    /// Add an element.
    pub const ADD: u16 = 9;
    /// Delete an element.
    pub const DEL: u16 = 10;
}

const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_SETNAME2: u16 = 3;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_DATA: u16 = 7;
const ATTR_IP: u16 = 1;
const ATTR_PORT: u16 = 4;
const ATTR_PORT_TO: u16 = 5;
const ATTR_PROTO: u16 = 7;
const ATTR_IP2: u16 = 20;
const ATTR_CIDR2: u16 = 21;
const ATTR_IPADDR_IPV4: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
/// Longest set name (without the NUL).
pub const MAX_NAME: usize = 31;

/// Set types IPVS mode uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetType {
    /// `hash:ip`.
    HashIp,
    /// `hash:ip,port`.
    HashIpPort,
    /// `hash:ip,port,ip`.
    HashIpPortIp,
    /// `hash:ip,port,net`.
    HashIpPortNet,
    /// `bitmap:port` (0-65535).
    BitmapPort,
}

impl SetType {
    /// Kernel type name.
    pub fn name(self) -> &'static str {
        match self {
            Self::HashIp => "hash:ip",
            Self::HashIpPort => "hash:ip,port",
            Self::HashIpPortIp => "hash:ip,port,ip",
            Self::HashIpPortNet => "hash:ip,port,net",
            Self::BitmapPort => "bitmap:port",
        }
    }
    fn revision(self) -> u8 {
        match self {
            Self::HashIp | Self::BitmapPort => 0,
            Self::HashIpPort | Self::HashIpPortIp | Self::HashIpPortNet => 1,
        }
    }
}

/// One set member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry {
    /// `ip`.
    Ip(IpAddr),
    /// `ip,proto:port`.
    IpPort(IpAddr, u8, u16),
    /// `ip,proto:port,ip`.
    IpPortIp(IpAddr, u8, u16, IpAddr),
    /// `ip,proto:port,net/len`.
    IpPortNet(IpAddr, u8, u16, IpAddr, u8),
    /// `port`.
    Port(u16),
}

/// The sets of IPVS mode: (name, type, what it holds).
pub const SETS: &[(&str, SetType, &str)] = &[
    (
        "KUBE-CLUSTER-IP",
        SetType::HashIpPort,
        "cluster IP + port of every service",
    ),
    (
        "KUBE-EXTERNAL-IP",
        SetType::HashIpPort,
        "external IP + port",
    ),
    (
        "KUBE-LOAD-BALANCER",
        SetType::HashIpPort,
        "load balancer ingress IP + port",
    ),
    (
        "KUBE-EXTERNAL-LOCAL",
        SetType::HashIpPort,
        "external/LB IP + port with externalTrafficPolicy Local",
    ),
    (
        "KUBE-LOOP-BACK",
        SetType::HashIpPortIp,
        "local endpoint IP + port + the same IP (hairpin)",
    ),
    ("KUBE-NODE-PORT-TCP", SetType::BitmapPort, "TCP node ports"),
    ("KUBE-NODE-PORT-UDP", SetType::BitmapPort, "UDP node ports"),
    (
        "KUBE-NODE-PORT-SCTP",
        SetType::BitmapPort,
        "SCTP node ports",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-TCP",
        SetType::BitmapPort,
        "TCP node ports with externalTrafficPolicy Local",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-UDP",
        SetType::BitmapPort,
        "UDP node ports with externalTrafficPolicy Local",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-SCTP",
        SetType::BitmapPort,
        "SCTP node ports with externalTrafficPolicy Local",
    ),
    (
        "KUBE-IPVS-IPS",
        SetType::HashIp,
        "every address on the IPVS dummy device",
    ),
    (
        "KUBE-LOAD-BALANCER-FW",
        SetType::HashIpPort,
        "load balancer IP + port with loadBalancerSourceRanges",
    ),
    (
        "KUBE-LOAD-BALANCER-SOURCE-CIDR",
        SetType::HashIpPortNet,
        "load balancer IP + port + allowed source range",
    ),
];

/// The type of a set of [`SETS`].
pub fn set_type(name: &str) -> Option<SetType> {
    SETS.iter().find(|(n, _, _)| *n == name).map(|(_, t, _)| *t)
}

/// Set name of the temporary twin of the `i`-th set of [`SETS`], used for atomic full
/// refreshes (set names are at most 31 bytes, so the twin is not the name plus a suffix).
pub fn temp_name(i: usize) -> String {
    format!("KUBE-HAKO-TMP-{i}")
}

fn node_port_set(p: Protocol, local: bool) -> &'static str {
    match (p, local) {
        (Protocol::Tcp, false) => "KUBE-NODE-PORT-TCP",
        (Protocol::Udp, false) => "KUBE-NODE-PORT-UDP",
        (Protocol::Sctp, false) => "KUBE-NODE-PORT-SCTP",
        (Protocol::Tcp, true) => "KUBE-NODE-PORT-LOCAL-TCP",
        (Protocol::Udp, true) => "KUBE-NODE-PORT-LOCAL-UDP",
        (Protocol::Sctp, true) => "KUBE-NODE-PORT-LOCAL-SCTP",
    }
}

/// Members per set name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members(pub BTreeMap<&'static str, BTreeSet<Entry>>);

impl Members {
    /// Adds one member.
    pub fn insert(&mut self, set: &'static str, e: Entry) {
        self.0.entry(set).or_default().insert(e);
    }

    /// Adds the members of one IPv4 service port (`eps`: the endpoints cluster traffic
    /// goes to, for the hairpin set).
    pub fn add_port(&mut self, sp: &ServicePort, eps: &[&Endpoint]) {
        let proto = sp.protocol.number();
        for ip in sp.cluster_ips.iter().filter(|i| i.is_ipv4()) {
            self.insert("KUBE-CLUSTER-IP", Entry::IpPort(*ip, proto, sp.port));
            self.insert("KUBE-IPVS-IPS", Entry::Ip(*ip));
        }
        for (set, ips) in [
            ("KUBE-EXTERNAL-IP", &sp.external_ips),
            ("KUBE-LOAD-BALANCER", &sp.lb_ips),
        ] {
            for ip in ips.iter().filter(|i| i.is_ipv4()) {
                self.insert(set, Entry::IpPort(*ip, proto, sp.port));
                self.insert("KUBE-IPVS-IPS", Entry::Ip(*ip));
                if sp.external_local {
                    self.insert("KUBE-EXTERNAL-LOCAL", Entry::IpPort(*ip, proto, sp.port));
                }
            }
        }
        let ranges: Vec<(IpAddr, u8)> = sp
            .lb_source_ranges
            .iter()
            .filter_map(|r| parse_v4_cidr(r))
            .collect();
        // A range covering everything (or none usable) means no filtering.
        if !ranges.is_empty() && !ranges.iter().any(|(_, l)| *l == 0) {
            for ip in sp.lb_ips.iter().filter(|i| i.is_ipv4()) {
                self.insert("KUBE-LOAD-BALANCER-FW", Entry::IpPort(*ip, proto, sp.port));
                for (net, len) in &ranges {
                    self.insert(
                        "KUBE-LOAD-BALANCER-SOURCE-CIDR",
                        Entry::IpPortNet(*ip, proto, sp.port, *net, *len),
                    );
                }
            }
        }
        if let Some(np) = sp.node_port {
            self.insert(node_port_set(sp.protocol, false), Entry::Port(np));
            if sp.external_local {
                self.insert(node_port_set(sp.protocol, true), Entry::Port(np));
            }
        }
        for e in eps.iter().filter(|e| e.local && e.ip.is_ipv4()) {
            self.insert("KUBE-LOOP-BACK", Entry::IpPortIp(e.ip, proto, e.port, e.ip));
        }
    }

    /// Number of members over all sets.
    pub fn len(&self) -> usize {
        self.0.values().map(BTreeSet::len).sum()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An IPv4 CIDR (`a.b.c.d/len` or a bare address) with the host bits cleared.
pub fn parse_v4_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, l) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
    let ip: std::net::Ipv4Addr = a.trim().parse().ok()?;
    let len: u8 = l.trim().parse().ok()?;
    if len > 32 {
        return None;
    }
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Some((IpAddr::V4((u32::from(ip) & mask).into()), len))
}

fn base(command: u16, flags: u16) -> MsgBuilder {
    let mut m = MsgBuilder::new(
        (NFNL_SUBSYS_IPSET << 8) | command,
        flags,
        &[NFPROTO_IPV4, 0, 0, 0],
    );
    m.u8(ATTR_PROTOCOL, IPSET_PROTOCOL);
    m
}

/// CREATE (an existing compatible set is not an error: no NLM_F_EXCL).
pub fn create_msg(name: &str, t: SetType) -> MsgBuilder {
    let mut m = base(cmd::CREATE, NLM_F_REQUEST);
    m.str(ATTR_SETNAME, name)
        .str(ATTR_TYPENAME, t.name())
        .u8(ATTR_REVISION, t.revision())
        .u8(ATTR_FAMILY, NFPROTO_IPV4);
    m.begin(ATTR_DATA | NLA_F_NESTED);
    if t == SetType::BitmapPort {
        m.be16(ATTR_PORT | NLA_F_NET_BYTEORDER, 0)
            .be16(ATTR_PORT_TO | NLA_F_NET_BYTEORDER, 65535);
    }
    m.end();
    m
}

/// DESTROY, FLUSH.
pub fn name_msg(command: u16, name: &str) -> MsgBuilder {
    let mut m = base(command, NLM_F_REQUEST);
    m.str(ATTR_SETNAME, name);
    m
}

/// SWAP `a` and `b`.
pub fn swap_msg(a: &str, b: &str) -> MsgBuilder {
    let mut m = base(cmd::SWAP, NLM_F_REQUEST);
    m.str(ATTR_SETNAME, a).str(ATTR_SETNAME2, b);
    m
}

fn ip_attr(m: &mut MsgBuilder, ty: u16, ip: &IpAddr) {
    if let IpAddr::V4(v4) = ip {
        m.begin(ty | NLA_F_NESTED)
            .attr(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &v4.octets())
            .end();
    }
}

/// ADD (`add`) or DEL of one member; without NLM_F_EXCL, adding a present member or
/// deleting an absent one is not an error.
pub fn entry_msg(add: bool, set: &str, e: &Entry) -> MsgBuilder {
    let mut m = base(if add { cmd::ADD } else { cmd::DEL }, NLM_F_REQUEST);
    m.str(ATTR_SETNAME, set);
    m.begin(ATTR_DATA | NLA_F_NESTED);
    match e {
        Entry::Ip(ip) => ip_attr(&mut m, ATTR_IP, ip),
        Entry::IpPort(ip, proto, port) => {
            ip_attr(&mut m, ATTR_IP, ip);
            m.be16(ATTR_PORT | NLA_F_NET_BYTEORDER, *port)
                .u8(ATTR_PROTO, *proto);
        }
        Entry::IpPortIp(ip, proto, port, ip2) => {
            ip_attr(&mut m, ATTR_IP, ip);
            m.be16(ATTR_PORT | NLA_F_NET_BYTEORDER, *port)
                .u8(ATTR_PROTO, *proto);
            ip_attr(&mut m, ATTR_IP2, ip2);
        }
        Entry::IpPortNet(ip, proto, port, net, len) => {
            ip_attr(&mut m, ATTR_IP, ip);
            m.be16(ATTR_PORT | NLA_F_NET_BYTEORDER, *port)
                .u8(ATTR_PROTO, *proto);
            ip_attr(&mut m, ATTR_IP2, net);
            m.u8(ATTR_CIDR2, *len);
        }
        Entry::Port(p) => {
            m.be16(ATTR_PORT | NLA_F_NET_BYTEORDER, *p);
        }
    }
    m.end();
    m
}

/// An nfnetlink socket for ipset requests in the calling thread's network namespace.
pub struct IpsetClient {
    sock: Socket,
}

impl IpsetClient {
    /// Opens the socket.
    pub fn open() -> Result<Self, NlError> {
        Ok(Self {
            sock: Socket::open(SockProtocol::NetlinkNetFilter)?,
        })
    }

    /// Sends `msgs` (acknowledged, in batches); errors name the failing request.
    pub fn apply(&mut self, msgs: &[(MsgBuilder, String)]) -> Result<(), NlError> {
        let reqs: Vec<MsgBuilder> = msgs.iter().map(|(m, _)| m.clone()).collect();
        self.sock.batch(&reqs, &[], &|i| {
            msgs.get(i).map(|(_, w)| w.clone()).unwrap_or_default()
        })
    }

    /// Creates every set of [`SETS`] (present ones are kept).
    pub fn ensure_sets(&mut self) -> Result<(), NlError> {
        let msgs: Vec<_> = SETS
            .iter()
            .map(|(n, t, _)| {
                (
                    create_msg(n, *t),
                    format!("creating ipset {n} ({})", t.name()),
                )
            })
            .collect();
        self.apply(&msgs)
    }

    /// Replaces the members of every set atomically per set: fills a temporary twin,
    /// swaps it in and destroys the old contents.
    pub fn replace_all(&mut self, members: &Members) -> Result<(), NlError> {
        let empty = BTreeSet::new();
        for (i, (name, t, _)) in SETS.iter().enumerate() {
            let mut msgs = Vec::new();
            let tmp = temp_name(i);
            // A leftover twin from an interrupted refresh is removed first (errors ignored).
            let _ = self
                .sock
                .batch(&[name_msg(cmd::DESTROY, &tmp)], &[], &|_| String::new());
            msgs.push((create_msg(&tmp, *t), format!("creating ipset {tmp}")));
            for e in members.0.get(name).unwrap_or(&empty) {
                msgs.push((
                    entry_msg(true, &tmp, e),
                    format!("adding {e:?} to ipset {tmp}"),
                ));
            }
            msgs.push((
                swap_msg(&tmp, name),
                format!("swapping ipsets {tmp} and {name}"),
            ));
            msgs.push((
                name_msg(cmd::DESTROY, &tmp),
                format!("destroying ipset {tmp}"),
            ));
            self.apply(&msgs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs::nl;

    #[test]
    fn entry_message_layout() {
        let e = Entry::IpPort("10.96.0.10".parse().expect("ip"), 6, 80);
        let b = entry_msg(true, "KUBE-CLUSTER-IP", &e).finish(5);
        let msgs = nl::messages(&b).expect("parse");
        assert_eq!(msgs[0].ty, (6 << 8) | 9);
        // nfgenmsg: AF_INET, version 0, res_id 0.
        assert_eq!(&msgs[0].payload[..4], &[2, 0, 0, 0]);
        let a = &msgs[0].payload[4..];
        assert_eq!(nl::attr(a, ATTR_PROTOCOL), Some(&[7u8][..]));
        assert_eq!(
            nl::get_str(nl::attr(a, ATTR_SETNAME).expect("name")),
            "KUBE-CLUSTER-IP"
        );
        let data = nl::attr(a, ATTR_DATA).expect("data");
        let ip = nl::attr(data, ATTR_IP).expect("ip");
        assert_eq!(nl::attr(ip, ATTR_IPADDR_IPV4), Some(&[10u8, 96, 0, 10][..]));
        assert_eq!(nl::attr(data, ATTR_PORT), Some(&[0u8, 80][..]));
        assert_eq!(nl::attr(data, ATTR_PROTO), Some(&[6u8][..]));
        // The DATA attribute `ipset add KUBE-CLUSTER-IP 10.96.0.10,tcp:80` sends (captured
        // with strace on kernel 6.18), without its trailing LINENO attribute.
        let captured = [
            0x0c, 0x00, 0x01, 0x80, 0x08, 0x00, 0x01, 0x40, 0x0a, 0x60, 0x00, 0x0a, 0x06, 0x00,
            0x04, 0x40, 0x00, 0x50, 0x00, 0x00, 0x05, 0x00, 0x07, 0x00, 0x06, 0x00, 0x00, 0x00,
        ];
        assert_eq!(data, &captured[..]);
    }

    #[test]
    fn source_range_entry_matches_ipset() {
        // DATA of `ipset add T 198.51.100.7,tcp:80,10.0.0.0/8` (hash:ip,port,net), captured
        // with strace on kernel 6.18, without its trailing LINENO attribute.
        let captured = [
            0x0c, 0x00, 0x01, 0x80, 0x08, 0x00, 0x01, 0x40, 0xc6, 0x33, 0x64, 0x07, 0x06, 0x00,
            0x04, 0x40, 0x00, 0x50, 0x00, 0x00, 0x05, 0x00, 0x07, 0x00, 0x06, 0x00, 0x00, 0x00,
            0x0c, 0x00, 0x14, 0x80, 0x08, 0x00, 0x01, 0x40, 0x0a, 0x00, 0x00, 0x00, 0x05, 0x00,
            0x15, 0x00, 0x08, 0x00, 0x00, 0x00,
        ];
        let (net, len) = parse_v4_cidr("10.1.2.3/8").expect("cidr");
        let e = Entry::IpPortNet("198.51.100.7".parse().expect("ip"), 6, 80, net, len);
        let b = entry_msg(true, "T", &e).finish(1);
        let msgs = nl::messages(&b).expect("parse");
        let data = nl::attr(&msgs[0].payload[4..], ATTR_DATA).expect("data");
        assert_eq!(data, &captured[..]);
        assert_eq!(
            parse_v4_cidr("0.0.0.0/0"),
            Some(("0.0.0.0".parse().expect("ip"), 0))
        );
        assert_eq!(parse_v4_cidr("10.0.0.1/33"), None);
        assert_eq!(parse_v4_cidr("fd00::/8"), None);
    }

    #[test]
    fn set_names_fit_the_kernel_limit() {
        for (i, (name, _, _)) in SETS.iter().enumerate() {
            assert!(name.len() <= MAX_NAME, "{name}");
            assert!(temp_name(i).len() <= MAX_NAME);
            assert!(SETS.iter().all(|(n, _, _)| *n != temp_name(i)));
        }
    }

    #[test]
    fn bitmap_port_create_matches_ipset() {
        // `ipset create KUBE-NODE-PORT-TCP bitmap:port range 0-65535`: DATA holds
        // PORT 0 and PORT_TO 65535, network order, with the byte-order flag.
        let b = create_msg("KUBE-NODE-PORT-TCP", SetType::BitmapPort).finish(1);
        let msgs = nl::messages(&b).expect("parse");
        let a = &msgs[0].payload[4..];
        let data = nl::attr(a, ATTR_DATA).expect("data");
        assert_eq!(
            data,
            &[
                0x06, 0x00, 0x04, 0x40, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x05, 0x40, 0xff, 0xff,
                0x00, 0x00
            ][..]
        );
        assert_eq!(
            nl::get_str(nl::attr(a, ATTR_TYPENAME).expect("type")),
            "bitmap:port"
        );
    }
}
