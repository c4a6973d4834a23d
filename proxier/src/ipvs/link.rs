//! The dummy device that holds the service addresses (kube-proxy's `kube-ipvs0`) and the
//! node's addresses, over rtnetlink.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use nix::sys::socket::SockProtocol;

use super::nl::{
    self, MsgBuilder, NlError, Socket, NLA_F_NESTED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const AF_INET: u8 = 2;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;

/// RTM_NEWLINK creating a dummy device `name` (left down, as kube-proxy leaves kube-ipvs0:
/// its addresses are local all the same).
pub fn new_dummy_msg(name: &str) -> MsgBuilder {
    let mut m = MsgBuilder::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        &[0; 16],
    );
    m.str(IFLA_IFNAME, name);
    m.begin(IFLA_LINKINFO | NLA_F_NESTED)
        .str(IFLA_INFO_KIND, "dummy")
        .end();
    m
}

fn ifaddrmsg(index: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = AF_INET;
    h[1] = 32;
    h[4..].copy_from_slice(&index.to_ne_bytes());
    h
}

/// RTM_NEWADDR / RTM_DELADDR of `ip/32` on interface `index`.
pub fn addr_msg(add: bool, index: u32, ip: Ipv4Addr) -> MsgBuilder {
    let (ty, flags) = if add {
        (RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL)
    } else {
        (RTM_DELADDR, NLM_F_REQUEST)
    };
    let mut m = MsgBuilder::new(ty, flags, &ifaddrmsg(index));
    m.attr(IFA_LOCAL, &ip.octets())
        .attr(IFA_ADDRESS, &ip.octets());
    m
}

/// One IPv4 address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IfAddr {
    /// Interface index.
    pub index: u32,
    /// Address.
    pub ip: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

/// Parses one RTM_NEWADDR payload.
pub fn parse_addr(payload: &[u8]) -> Option<IfAddr> {
    if payload.first() != Some(&AF_INET) {
        return None;
    }
    let prefix = *payload.get(1)?;
    let index = nl::get_u32(payload.get(4..8)?)?;
    let attrs = payload.get(8..)?;
    let v = nl::attr(attrs, IFA_LOCAL).or_else(|| nl::attr(attrs, IFA_ADDRESS))?;
    let o: [u8; 4] = v.get(..4)?.try_into().ok()?;
    Some(IfAddr {
        index,
        ip: Ipv4Addr::from(o),
        prefix,
    })
}

/// rtnetlink client in the calling thread's network namespace.
pub struct LinkClient {
    sock: Socket,
}

impl LinkClient {
    /// Opens the socket.
    pub fn open() -> Result<Self, NlError> {
        Ok(Self {
            sock: Socket::open(SockProtocol::NetlinkRoute)?,
        })
    }

    /// Creates the dummy device `name` unless it exists; returns its index.
    pub fn ensure_dummy(&mut self, name: &str) -> Result<u32, NlError> {
        if let Ok(i) = nix::net::if_::if_nametoindex(name) {
            return Ok(i);
        }
        self.sock.batch(&[new_dummy_msg(name)], &[EEXIST], &|_| {
            format!("creating dummy device {name} (is the dummy module loaded?)")
        })?;
        nix::net::if_::if_nametoindex(name).map_err(|source| NlError::Sys {
            op: "if_nametoindex",
            source,
        })
    }

    /// Every IPv4 address of the namespace.
    pub fn addresses(&mut self) -> Result<Vec<IfAddr>, NlError> {
        let m = MsgBuilder::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, &ifaddrmsg(0));
        let msgs = self.sock.request(&m, "listing addresses", &mut |_| {})?;
        Ok(msgs
            .iter()
            .filter(|(ty, _)| *ty == RTM_NEWADDR)
            .filter_map(|(_, p)| parse_addr(p))
            .collect())
    }

    /// Makes the /32 addresses of interface `index` exactly `want`; returns (added, removed).
    pub fn sync_addresses(
        &mut self,
        index: u32,
        want: &BTreeSet<IpAddr>,
    ) -> Result<(usize, usize), NlError> {
        let have: BTreeSet<IpAddr> = self
            .addresses()?
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| IpAddr::V4(a.ip))
            .collect();
        let add: Vec<Ipv4Addr> = want.difference(&have).filter_map(v4).collect();
        let del: Vec<Ipv4Addr> = have.difference(want).filter_map(v4).collect();
        self.change(index, &add, &del)?;
        Ok((add.len(), del.len()))
    }

    /// Adds and removes addresses on interface `index` (present/absent ones are fine).
    pub fn change(
        &mut self,
        index: u32,
        add: &[Ipv4Addr],
        del: &[Ipv4Addr],
    ) -> Result<(), NlError> {
        let mut reqs: Vec<MsgBuilder> = add.iter().map(|ip| addr_msg(true, index, *ip)).collect();
        reqs.extend(del.iter().map(|ip| addr_msg(false, index, *ip)));
        let n_add = add.len();
        self.sock.batch(&reqs, &[EEXIST, EADDRNOTAVAIL], &|i| {
            if i < n_add {
                format!("adding {} to the IPVS device", add[i])
            } else {
                format!(
                    "removing {} from the IPVS device",
                    del.get(i - n_add).copied().unwrap_or(Ipv4Addr::UNSPECIFIED)
                )
            }
        })
    }
}

fn v4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_round_trips() {
        let b = addr_msg(true, 7, Ipv4Addr::new(10, 96, 0, 10)).finish(3);
        let msgs = nl::messages(&b).expect("parse");
        assert_eq!(msgs[0].ty, RTM_NEWADDR);
        assert_eq!(
            parse_addr(msgs[0].payload),
            Some(IfAddr {
                index: 7,
                ip: Ipv4Addr::new(10, 96, 0, 10),
                prefix: 32
            })
        );
    }
}
