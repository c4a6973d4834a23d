//! IPVS over generic netlink (family "IPVS", include/uapi/linux/ip_vs.h): message encoding
//! and parsing (pure) and a small client (`IpvsClient`) for services and destinations.

use std::net::IpAddr;

use nix::sys::socket::SockProtocol;

use super::nl::{self, MsgBuilder, NlError, Socket, NLA_F_NESTED, NLM_F_DUMP, NLM_F_REQUEST};

/// Generic netlink controller.
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// IPVS generic netlink version.
pub const IPVS_GENL_VERSION: u8 = 1;

/// IPVS commands.
pub mod cmd {
    /// Add a virtual service.
    pub const NEW_SERVICE: u8 = 1;
    /// Modify a virtual service.
    pub const SET_SERVICE: u8 = 2;
    /// Delete a virtual service.
    pub const DEL_SERVICE: u8 = 3;
    /// Get (dump) virtual services.
    pub const GET_SERVICE: u8 = 4;
    /// Add a real server.
    pub const NEW_DEST: u8 = 5;
    /// Modify a real server.
    pub const SET_DEST: u8 = 6;
    /// Delete a real server.
    pub const DEL_DEST: u8 = 7;
    /// Get (dump) the real servers of a service.
    pub const GET_DEST: u8 = 8;
    /// Get version and table size.
    pub const GET_INFO: u8 = 15;
}

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;

const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;

const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

/// Persistent service (ClientIP affinity).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// Masquerading (NAT) forwarding.
pub const IP_VS_CONN_F_MASQ: u32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A virtual service's identity: protocol, address, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    /// IP protocol number.
    pub proto: u8,
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for VsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            6 => "TCP",
            17 => "UDP",
            132 => "SCTP",
            _ => "?",
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{p} {a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "{p} [{a}]:{}", self.port),
        }
    }
}

/// A virtual service's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsConf {
    /// Scheduler name (rr, wrr, lc, sh...).
    pub sched: String,
    /// Flags (only `IP_VS_SVC_F_PERSISTENT` is compared).
    pub flags: u32,
    /// Persistence timeout, seconds.
    pub timeout: u32,
}

impl VsConf {
    /// Whether two configurations are equivalent (the kernel adds the HASHED flag and keeps
    /// a timeout without persistence).
    pub fn same(&self, other: &VsConf) -> bool {
        let p = self.flags & IP_VS_SVC_F_PERSISTENT;
        self.sched == other.sched
            && p == other.flags & IP_VS_SVC_F_PERSISTENT
            && (p == 0 || self.timeout == other.timeout)
    }
}

/// A real server's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestKey {
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for DestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// A real server as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    /// Identity.
    pub key: DestKey,
    /// Weight.
    pub weight: u32,
    /// Forwarding method (low 3 bits of the connection flags).
    pub fwd: u32,
    /// Active connections.
    pub active: u32,
    /// Inactive connections.
    pub inactive: u32,
}

fn af(a: &IpAddr) -> u16 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// Addresses are sent as a 16-byte `union nf_inet_addr`, as ipvsadm does.
fn addr16(a: &IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => b.copy_from_slice(&v.octets()),
    }
    b
}

fn parse_addr(family: u16, v: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => {
            let o: [u8; 4] = v.get(..4)?.try_into().ok()?;
            Some(IpAddr::from(o))
        }
        AF_INET6 => {
            let o: [u8; 16] = v.get(..16)?.try_into().ok()?;
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

fn genl(family: u16, command: u8, flags: u16) -> MsgBuilder {
    MsgBuilder::new(family, flags, &[command, IPVS_GENL_VERSION, 0, 0])
}

fn svc_id(m: &mut MsgBuilder, k: &VsKey) {
    m.u16(SVC_AF, af(&k.addr))
        .u16(SVC_PROTOCOL, u16::from(k.proto))
        .attr(SVC_ADDR, &addr16(&k.addr))
        .be16(SVC_PORT, k.port);
}

/// The family-id lookup for "IPVS".
pub fn get_family_request() -> MsgBuilder {
    let mut m = MsgBuilder::new(GENL_ID_CTRL, NLM_F_REQUEST, &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
    m.str(CTRL_ATTR_FAMILY_NAME, "IPVS");
    m
}

/// NEW_SERVICE (or SET_SERVICE with `set`).
pub fn service_msg(family: u16, set: bool, k: &VsKey, c: &VsConf) -> MsgBuilder {
    let command = if set {
        cmd::SET_SERVICE
    } else {
        cmd::NEW_SERVICE
    };
    let mut m = genl(family, command, NLM_F_REQUEST);
    m.begin(CMD_ATTR_SERVICE | NLA_F_NESTED);
    svc_id(&mut m, k);
    let mut flags = [0u8; 8];
    flags[..4].copy_from_slice(&c.flags.to_ne_bytes());
    flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
    let netmask: u32 = if k.addr.is_ipv4() { u32::MAX } else { 128 };
    m.str(SVC_SCHED_NAME, &c.sched)
        .attr(SVC_FLAGS, &flags)
        .u32(SVC_TIMEOUT, c.timeout)
        .u32(SVC_NETMASK, netmask)
        .end();
    m
}

/// DEL_SERVICE.
pub fn del_service_msg(family: u16, k: &VsKey) -> MsgBuilder {
    let mut m = genl(family, cmd::DEL_SERVICE, NLM_F_REQUEST);
    m.begin(CMD_ATTR_SERVICE | NLA_F_NESTED);
    svc_id(&mut m, k);
    m.end();
    m
}

/// GET_SERVICE: a dump of all services, or one service.
pub fn get_service_msg(family: u16, k: Option<&VsKey>) -> MsgBuilder {
    match k {
        None => genl(family, cmd::GET_SERVICE, NLM_F_REQUEST | NLM_F_DUMP),
        Some(k) => {
            let mut m = genl(family, cmd::GET_SERVICE, NLM_F_REQUEST);
            m.begin(CMD_ATTR_SERVICE | NLA_F_NESTED);
            svc_id(&mut m, k);
            m.end();
            m
        }
    }
}

/// NEW_DEST / SET_DEST (masquerading forwarding, no thresholds).
pub fn dest_msg(family: u16, set: bool, k: &VsKey, d: &DestKey, weight: u32) -> MsgBuilder {
    let command = if set { cmd::SET_DEST } else { cmd::NEW_DEST };
    let mut m = genl(family, command, NLM_F_REQUEST);
    m.begin(CMD_ATTR_SERVICE | NLA_F_NESTED);
    svc_id(&mut m, k);
    m.end();
    m.begin(CMD_ATTR_DEST | NLA_F_NESTED)
        .attr(DEST_ADDR, &addr16(&d.addr))
        .be16(DEST_PORT, d.port)
        .u16(DEST_ADDR_FAMILY, af(&d.addr))
        .u32(DEST_FWD_METHOD, IP_VS_CONN_F_MASQ)
        .u32(DEST_WEIGHT, weight)
        .u32(DEST_U_THRESH, 0)
        .u32(DEST_L_THRESH, 0)
        .end();
    m
}

/// DEL_DEST.
pub fn del_dest_msg(family: u16, k: &VsKey, d: &DestKey) -> MsgBuilder {
    let mut m = genl(family, cmd::DEL_DEST, NLM_F_REQUEST);
    m.begin(CMD_ATTR_SERVICE | NLA_F_NESTED);
    svc_id(&mut m, k);
    m.end();
    m.begin(CMD_ATTR_DEST | NLA_F_NESTED)
        .attr(DEST_ADDR, &addr16(&d.addr))
        .be16(DEST_PORT, d.port)
        .u16(DEST_ADDR_FAMILY, af(&d.addr))
        .end();
    m
}

/// GET_DEST dump for one service.
pub fn get_dest_msg(family: u16, k: &VsKey) -> MsgBuilder {
    let mut m = genl(family, cmd::GET_DEST, NLM_F_REQUEST | NLM_F_DUMP);
    m.begin(CMD_ATTR_SERVICE | NLA_F_NESTED);
    svc_id(&mut m, k);
    m.end();
    m
}

/// Parses a service message's payload (genlmsghdr + attributes). Fwmark services (no
/// address) yield None.
pub fn parse_service(payload: &[u8]) -> Option<(VsKey, VsConf)> {
    let s = nl::attr(payload.get(4..)?, CMD_ATTR_SERVICE)?;
    let family = nl::get_u16(nl::attr(s, SVC_AF)?)?;
    let proto = u8::try_from(nl::get_u16(nl::attr(s, SVC_PROTOCOL)?)?).ok()?;
    let addr = parse_addr(family, nl::attr(s, SVC_ADDR)?)?;
    let port = nl::get_be16(nl::attr(s, SVC_PORT)?)?;
    let sched = nl::attr(s, SVC_SCHED_NAME).map(nl::get_str)?;
    let flags = nl::attr(s, SVC_FLAGS).and_then(nl::get_u32).unwrap_or(0);
    let timeout = nl::attr(s, SVC_TIMEOUT).and_then(nl::get_u32).unwrap_or(0);
    Some((
        VsKey { proto, addr, port },
        VsConf {
            sched,
            flags,
            timeout,
        },
    ))
}

/// Parses a destination message's payload.
pub fn parse_dest(payload: &[u8], svc_family: u16) -> Option<Dest> {
    let d = nl::attr(payload.get(4..)?, CMD_ATTR_DEST)?;
    let family = nl::attr(d, DEST_ADDR_FAMILY)
        .and_then(nl::get_u16)
        .unwrap_or(svc_family);
    let addr = parse_addr(family, nl::attr(d, DEST_ADDR)?)?;
    let port = nl::get_be16(nl::attr(d, DEST_PORT)?)?;
    let get = |t| nl::attr(d, t).and_then(nl::get_u32).unwrap_or(0);
    Some(Dest {
        key: DestKey { addr, port },
        weight: get(DEST_WEIGHT),
        fwd: get(DEST_FWD_METHOD) & 7,
        active: get(DEST_ACTIVE_CONNS),
        inactive: get(DEST_INACT_CONNS),
    })
}

/// Parses the controller's reply to the family lookup.
pub fn parse_family_id(payload: &[u8]) -> Option<u16> {
    nl::get_u16(nl::attr(payload.get(4..)?, CTRL_ATTR_FAMILY_ID)?)
}

/// A virtual service and its real servers, as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelVs {
    /// Settings.
    pub conf: VsConf,
    /// Real servers.
    pub dests: Vec<Dest>,
}

/// Modules IPVS mode needs.
pub const MODULES: &str = "ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh nf_conntrack";

/// A receiver of raw reply datagrams.
pub type Tap = Box<dyn FnMut(&[u8]) + Send>;

/// A generic netlink IPVS client in the calling thread's network namespace.
pub struct IpvsClient {
    sock: Socket,
    family: u16,
    /// Receives every raw reply datagram of dumps (for captures); None normally.
    pub tap: Option<Tap>,
}

impl IpvsClient {
    /// Opens a socket and resolves the IPVS family. Fails with a message naming the
    /// modules when the kernel has no IPVS.
    pub fn open() -> Result<Self, NlError> {
        let mut sock = Socket::open(SockProtocol::NetlinkGeneric)?;
        let r = sock.request(
            &get_family_request(),
            "resolving the IPVS family",
            &mut |_| {},
        );
        let family = match r {
            Ok(msgs) => msgs
                .iter()
                .find_map(|(_, p)| parse_family_id(p))
                .ok_or_else(|| NlError::Malformed("no family id in reply".into()))?,
            Err(NlError::Kernel { errno, .. }) if errno == libc_enoent() => {
                return Err(NlError::Kernel {
                    what: format!(
                        "the kernel has no IPVS (generic netlink family \"IPVS\" not found); \
                         load the modules: modprobe -a {MODULES}"
                    ),
                    errno,
                })
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            sock,
            family,
            tap: None,
        })
    }

    /// The resolved family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    fn dump(&mut self, m: &MsgBuilder, what: &str) -> Result<Vec<(u16, Vec<u8>)>, NlError> {
        let mut tap = self.tap.take();
        let r = self.sock.request(m, what, &mut |d| {
            if let Some(t) = tap.as_mut() {
                t(d);
            }
        });
        self.tap = tap;
        r
    }

    /// All virtual services (fwmark services are skipped).
    pub fn services(&mut self) -> Result<Vec<(VsKey, VsConf)>, NlError> {
        let msgs = self.dump(&get_service_msg(self.family, None), "listing IPVS services")?;
        Ok(msgs.iter().filter_map(|(_, p)| parse_service(p)).collect())
    }

    /// One virtual service, None when it does not exist.
    pub fn service(&mut self, k: &VsKey) -> Result<Option<VsConf>, NlError> {
        match self.dump(
            &get_service_msg(self.family, Some(k)),
            "getting an IPVS service",
        ) {
            Ok(msgs) => Ok(msgs
                .iter()
                .filter_map(|(_, p)| parse_service(p))
                .find(|(kk, _)| kk == k)
                .map(|(_, c)| c)),
            // ESRCH: no such service.
            Err(NlError::Kernel { errno: 3, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Real servers of one service.
    pub fn dests(&mut self, k: &VsKey) -> Result<Vec<Dest>, NlError> {
        let msgs = self.dump(&get_dest_msg(self.family, k), "listing IPVS destinations")?;
        let fam = af(&k.addr);
        Ok(msgs
            .iter()
            .filter_map(|(_, p)| parse_dest(p, fam))
            .collect())
    }

    /// Sends messages in batches; errors name the message.
    pub fn apply(&mut self, msgs: &[(MsgBuilder, String)]) -> Result<(), NlError> {
        let reqs: Vec<MsgBuilder> = msgs.iter().map(|(m, _)| m.clone()).collect();
        self.sock.batch(&reqs, &[], &|i| {
            msgs.get(i).map(|(_, w)| w.clone()).unwrap_or_default()
        })
    }
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k() -> VsKey {
        VsKey {
            proto: 6,
            addr: "10.96.0.10".parse().expect("ip"),
            port: 80,
        }
    }

    #[test]
    fn service_message_round_trips() {
        let c = VsConf {
            sched: "rr".into(),
            flags: IP_VS_SVC_F_PERSISTENT,
            timeout: 10800,
        };
        let m = service_msg(0x22, false, &k(), &c).finish(1);
        let msgs = nl::messages(&m).expect("parse");
        assert_eq!(msgs[0].ty, 0x22);
        assert_eq!(msgs[0].payload[0], cmd::NEW_SERVICE);
        let (kk, cc) = parse_service(msgs[0].payload).expect("service");
        assert_eq!(kk, k());
        assert_eq!(cc, c);
    }

    #[test]
    fn dest_message_round_trips() {
        let d = DestKey {
            addr: "10.244.1.5".parse().expect("ip"),
            port: 8080,
        };
        let m = dest_msg(0x22, true, &k(), &d, 0).finish(1);
        let msgs = nl::messages(&m).expect("parse");
        assert_eq!(msgs[0].payload[0], cmd::SET_DEST);
        let got = parse_dest(msgs[0].payload, 2).expect("dest");
        assert_eq!(got.key, d);
        assert_eq!(got.weight, 0);
        assert_eq!(got.fwd, IP_VS_CONN_F_MASQ);
    }

    /// (direction, genl payload, command line) of each captured message.
    fn captures() -> Vec<(String, Vec<u8>, String)> {
        include_str!("../../testdata/ipvs-capture.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                let dir = it.next().unwrap_or_default().to_string();
                let hex = it.next().unwrap_or_default();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                let cmd = it
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .trim_start_matches("# ");
                (dir, bytes, cmd.to_string())
            })
            .collect()
    }

    #[test]
    fn new_service_encoding_matches_ipvsadm_byte_for_byte() {
        let caps = captures();
        let (_, want, _) = caps
            .iter()
            .find(|(d, b, _)| d == "send" && b[0] == cmd::NEW_SERVICE)
            .expect("captured NEW_SERVICE");
        let k = VsKey {
            proto: 6,
            addr: "10.96.0.11".parse().expect("ip"),
            port: 80,
        };
        let c = VsConf {
            sched: "wrr".into(),
            flags: IP_VS_SVC_F_PERSISTENT,
            timeout: 600,
        };
        let m = service_msg(0x20, false, &k, &c).finish(1);
        let msgs = nl::messages(&m).expect("parse");
        assert_eq!(msgs[0].payload, &want[..]);
    }

    #[test]
    fn new_dest_encoding_means_what_ipvsadm_sent() {
        let caps = captures();
        let (_, theirs, _) = caps
            .iter()
            .find(|(d, b, _)| d == "send" && b[0] == cmd::NEW_DEST)
            .expect("captured NEW_DEST");
        let k = VsKey {
            proto: 6,
            addr: "10.96.0.11".parse().expect("ip"),
            port: 80,
        };
        let d = DestKey {
            addr: "10.244.1.6".parse().expect("ip"),
            port: 8080,
        };
        let m = dest_msg(0x20, false, &k, &d, 0).finish(1);
        let ours = nl::messages(&m).expect("parse")[0].payload.to_vec();
        assert_eq!(ours[0], theirs[0]);
        // Same service identity and the same destination, forwarding and weight.
        let id = |p: &[u8]| {
            let s = nl::attr(&p[4..], CMD_ATTR_SERVICE).expect("service");
            [SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT].map(|t| nl::attr(s, t).map(<[u8]>::to_vec))
        };
        assert_eq!(id(&ours), id(theirs));
        assert_eq!(parse_dest(&ours, AF_INET), parse_dest(theirs, AF_INET));
        for t in [
            DEST_ADDR_FAMILY,
            DEST_ADDR,
            DEST_PORT,
            DEST_FWD_METHOD,
            DEST_WEIGHT,
        ] {
            let get = |p: &[u8]| {
                nl::attr(nl::attr(&p[4..], CMD_ATTR_DEST).expect("dest"), t).map(<[u8]>::to_vec)
            };
            assert_eq!(get(&ours), get(theirs), "attribute {t}");
        }
    }

    #[test]
    fn kernel_dump_replies_parse() {
        let caps = captures();
        let services: Vec<(VsKey, VsConf)> = caps
            .iter()
            .filter(|(d, b, c)| d == "recv" && b[0] == cmd::NEW_SERVICE && c == "ipvsadm -L -n")
            .filter_map(|(_, b, _)| parse_service(b))
            .collect();
        let shown: Vec<String> = services
            .iter()
            .map(|(k, c)| {
                format!(
                    "{k} {} p={} t={}",
                    c.sched,
                    c.flags & IP_VS_SVC_F_PERSISTENT,
                    c.timeout
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "TCP 10.96.0.10:80 rr p=0 t=0",
                "TCP 10.96.0.11:80 wrr p=1 t=600"
            ]
        );
        let dests: Vec<Dest> = caps
            .iter()
            .filter(|(d, b, c)| d == "recv" && b[0] == cmd::NEW_DEST && c == "ipvsadm -L -n")
            .filter_map(|(_, b, _)| parse_dest(b, AF_INET))
            .collect();
        let shown: Vec<String> = dests
            .iter()
            .map(|d| {
                format!(
                    "{} w={} fwd={} a={} i={}",
                    d.key, d.weight, d.fwd, d.active, d.inactive
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "10.244.1.5:8080 w=1 fwd=0 a=0 i=0",
                "10.244.1.6:8080 w=0 fwd=0 a=0 i=0"
            ]
        );
        // A truncated reply is rejected, not a panic.
        for (_, b, _) in &caps {
            for cut in [0, 3, 7, b.len() / 2] {
                let _ = parse_service(&b[..cut.min(b.len())]);
                let _ = parse_dest(&b[..cut.min(b.len())], AF_INET);
            }
        }
    }

    #[test]
    fn conf_equivalence_ignores_kernel_flags() {
        let want = VsConf {
            sched: "rr".into(),
            flags: 0,
            timeout: 0,
        };
        let kernel = VsConf {
            sched: "rr".into(),
            flags: 2,
            timeout: 300,
        };
        assert!(want.same(&kernel));
        let persistent = VsConf {
            flags: IP_VS_SVC_F_PERSISTENT,
            timeout: 60,
            ..want.clone()
        };
        assert!(!persistent.same(&kernel));
        assert!(!want.same(&VsConf {
            sched: "lc".into(),
            ..kernel
        }));
    }
}
