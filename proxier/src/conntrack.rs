//! Flushing stale UDP conntrack entries over ctnetlink (one netlink socket, one dump and one
//! delete message per matching entry; no `conntrack` process). Pure message encoding and
//! parsing, plus the `Conntrack` effect trait.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracing::debug;

use crate::netlink::{self, RecvError};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const CT_GET: u16 = (1 << 8) | 1;
const CT_DELETE: u16 = (1 << 8) | 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Which entries to delete: every given field must match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CtFilter {
    /// IP protocol number (17 = UDP).
    pub proto: u8,
    /// Original destination (the service address).
    pub orig_dst: Option<IpAddr>,
    /// Original destination port.
    pub orig_dport: Option<u16>,
    /// Reply source (the endpoint).
    pub reply_src: Option<IpAddr>,
}

/// One conntrack entry's tuples as far as filtering needs them, and its raw original tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Address family (AF_INET or AF_INET6), from the addresses of the original tuple.
    pub family: u8,
    /// Protocol.
    pub proto: u8,
    /// Original destination.
    pub orig_dst: Option<IpAddr>,
    /// Original destination port.
    pub orig_dport: Option<u16>,
    /// Reply source.
    pub reply_src: Option<IpAddr>,
    /// The CTA_TUPLE_ORIG attribute as received (header included), echoed in the delete.
    pub orig_attr: Vec<u8>,
}

impl CtFilter {
    /// Whether `e` matches.
    pub fn matches(&self, e: &Entry) -> bool {
        e.proto == self.proto
            && self.orig_dst.is_none_or(|d| e.orig_dst == Some(d))
            && self.orig_dport.is_none_or(|p| e.orig_dport == Some(p))
            && self.reply_src.is_none_or(|s| e.reply_src == Some(s))
    }

    /// Whether entries of `family` (AF_INET / AF_INET6) can match: false only when an
    /// address of the filter is of the other family.
    pub fn may_match_family(&self, family: u8) -> bool {
        [self.orig_dst, self.reply_src]
            .into_iter()
            .flatten()
            .all(|a| (if a.is_ipv6() { AF_INET6 } else { AF_INET }) == family)
    }
}

/// Conntrack failures.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// Socket-level failure.
    #[error("ctnetlink {op}: {source}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: nix::Error,
    },
    /// Kernel returned an error.
    #[error("ctnetlink error {0}")]
    Kernel(i32),
    /// No answer from the kernel within the receive timeout (the flush stops; the socket is
    /// one per flush, so the next one starts fresh).
    #[error("ctnetlink {op}: no answer from the kernel within {}s", .after.as_secs_f64())]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// The timeout.
        after: std::time::Duration,
    },
}

/// `recv` on a socket with `SO_RCVTIMEO`: EAGAIN is the timeout, EINTR is retried.
fn recv_timed(
    s: &netlink_sys::Socket,
    buf: &mut [u8],
    op: &'static str,
    after: std::time::Duration,
) -> Result<usize, ConntrackError> {
    netlink::recv(s, buf).map_err(|e| match e {
        RecvError::Timeout => ConntrackError::Timeout { op, after },
        RecvError::Sys(source) => ConntrackError::Sys { op, source },
    })
}

/// Deleting conntrack entries.
pub trait Conntrack: Send {
    /// Deletes every entry matching any filter; returns how many were deleted.
    fn flush(&mut self, filters: &[CtFilter]) -> Result<usize, ConntrackError>;
}

fn nlmsg(ty: u16, flags: u16, seq: u32, family: u8, payload: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version, res_id
    m.extend_from_slice(payload);
    m
}

/// The dump request for the entries of one family (`AF_INET` = 2, `AF_INET6` = 10).
pub fn dump_request(seq: u32, family: u8) -> Vec<u8> {
    nlmsg(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, &[])
}

/// The delete request for one entry.
pub fn delete_request(seq: u32, e: &Entry) -> Vec<u8> {
    nlmsg(
        CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        e.family,
        &e.orig_attr,
    )
}

/// Iterates netlink attributes: (type without flags, value, whole attribute bytes).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let whole = &b[..len];
        let val = &b[4..len];
        let adv = (len + 3) & !3;
        b = if adv >= b.len() { &[] } else { &b[adv..] };
        Some((ty, val, whole))
    })
}

fn v4(v: &[u8]) -> Option<IpAddr> {
    <[u8; 4]>::try_from(v)
        .ok()
        .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
}

fn v6(v: &[u8]) -> Option<IpAddr> {
    <[u8; 16]>::try_from(v)
        .ok()
        .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
}

fn tuple(v: &[u8]) -> (Option<IpAddr>, Option<IpAddr>, u8, Option<u16>) {
    let (mut src, mut dst, mut proto, mut dport) = (None, None, 0, None);
    for (t, val, _) in attrs(v) {
        match t {
            CTA_TUPLE_IP => {
                for (t, val, _) in attrs(val) {
                    match t {
                        CTA_IP_V4_SRC => src = v4(val),
                        CTA_IP_V4_DST => dst = v4(val),
                        CTA_IP_V6_SRC => src = v6(val),
                        CTA_IP_V6_DST => dst = v6(val),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, val, _) in attrs(val) {
                    match t {
                        CTA_PROTO_NUM => proto = val.first().copied().unwrap_or(0),
                        CTA_PROTO_DST_PORT if val.len() == 2 => {
                            dport = Some(u16::from_be_bytes([val[0], val[1]]));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (src, dst, proto, dport)
}

/// Parses one conntrack message body (after nlmsghdr and nfgenmsg).
pub fn parse_entry(body: &[u8]) -> Option<Entry> {
    let mut e = Entry {
        family: AF_INET,
        proto: 0,
        orig_dst: None,
        orig_dport: None,
        reply_src: None,
        orig_attr: Vec::new(),
    };
    for (t, val, whole) in attrs(body) {
        match t {
            CTA_TUPLE_ORIG => {
                let (src, dst, proto, dport) = tuple(val);
                if matches!(src.or(dst), Some(IpAddr::V6(_))) {
                    e.family = AF_INET6;
                }
                e.proto = proto;
                e.orig_dst = dst;
                e.orig_dport = dport;
                e.orig_attr = whole.to_vec();
            }
            CTA_TUPLE_REPLY => e.reply_src = tuple(val).0,
            _ => {}
        }
    }
    (!e.orig_attr.is_empty()).then_some(e)
}

/// Splits a datagram into netlink messages: (type, body after nlmsghdr). A message whose
/// length does not fit ends the split.
pub fn messages(b: &[u8]) -> Vec<(u16, &[u8])> {
    netlink::split(b)
        .msgs
        .into_iter()
        .map(|m| (m.ty, m.payload))
        .collect()
}

/// ctnetlink in the calling thread's network namespace; its socket's receives give up after
/// [`crate::NETLINK_RECV_TIMEOUT`].
#[derive(Debug, Default, Clone)]
pub struct NetlinkConntrack;

/// A bound ctnetlink socket whose receives give up after `timeout`.
fn ct_socket(timeout: std::time::Duration) -> Result<netlink_sys::Socket, ConntrackError> {
    netlink::open(netlink::NETLINK_NETFILTER, timeout).map_err(|e| ConntrackError::Sys {
        op: e.op,
        source: e.source,
    })
}

impl Conntrack for NetlinkConntrack {
    fn flush(&mut self, filters: &[CtFilter]) -> Result<usize, ConntrackError> {
        if filters.is_empty() {
            return Ok(0);
        }
        let sys = |op| move |source| ConntrackError::Sys { op, source };
        let timeout = crate::NETLINK_RECV_TIMEOUT;
        let sock = ct_socket(timeout)?;
        // One dump per family a filter can match (a filter without addresses matches both).
        let fams: Vec<u8> = [AF_INET, AF_INET6]
            .into_iter()
            .filter(|&f| filters.iter().any(|flt| flt.may_match_family(f)))
            .collect();
        let mut buf = vec![0u8; 1 << 16];
        let mut victims = Vec::new();
        for (i, fam) in fams.into_iter().enumerate() {
            let seq = u32::try_from(i + 1).unwrap_or(1);
            netlink::send(&sock, &dump_request(seq, fam)).map_err(sys("send dump"))?;
            'dump: loop {
                let n = recv_timed(&sock, &mut buf, "recv dump", timeout)?;
                for (ty, body) in messages(&buf[..n]) {
                    match ty {
                        NLMSG_DONE => break 'dump,
                        NLMSG_ERROR => {
                            let code = body
                                .get(..4)
                                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                            if code != 0 {
                                return Err(ConntrackError::Kernel(code));
                            }
                        }
                        _ => {
                            if let Some(e) = body.get(4..).and_then(parse_entry) {
                                if filters.iter().any(|f| f.matches(&e)) {
                                    victims.push(e);
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut deleted = 0;
        for (i, e) in victims.iter().enumerate() {
            let seq = u32::try_from(i + 3).unwrap_or(u32::MAX);
            netlink::send(&sock, &delete_request(seq, e)).map_err(sys("send delete"))?;
            let n = recv_timed(&sock, &mut buf, "recv ack", timeout)?;
            for (ty, body) in messages(&buf[..n]) {
                if ty == NLMSG_ERROR {
                    let code = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if code == 0 {
                        deleted += 1;
                    } else {
                        debug!(code, "conntrack delete (entry probably gone already)");
                    }
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_answer_is_a_timeout_error() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let d = std::time::Duration::from_millis(200);
            let fd = ct_socket(d).expect("socket");
            let mut buf = [0u8; 64];
            let _ = tx.send(recv_timed(&fd, &mut buf, "recv dump", d));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a receive without an answer returned");
        assert!(matches!(r, Err(ConntrackError::Timeout { .. })), "{r:?}");
    }

    fn attr(ty: u16, val: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + val.len()).expect("len").to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(val);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn tuple_attr(ty: u16, src: &[u8], dst: &[u8], proto: u8, dport: u16) -> Vec<u8> {
        let (s, d) = if src.len() == 16 {
            (CTA_IP_V6_SRC, CTA_IP_V6_DST)
        } else {
            (CTA_IP_V4_SRC, CTA_IP_V4_DST)
        };
        let ip = [attr(s, src), attr(d, dst)].concat();
        let pr = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(2, &1234u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        attr(
            ty | 0x8000,
            &[
                attr(CTA_TUPLE_IP | 0x8000, &ip),
                attr(CTA_TUPLE_PROTO | 0x8000, &pr),
            ]
            .concat(),
        )
    }

    #[test]
    fn parse_filter_and_delete_encoding() {
        // As the kernel sends it: orig 10.244.2.10 -> 10.96.0.40:53/udp, reply from 10.244.1.11.
        let orig = tuple_attr(CTA_TUPLE_ORIG, &[10, 244, 2, 10], &[10, 96, 0, 40], 17, 53);
        let reply = tuple_attr(
            CTA_TUPLE_REPLY,
            &[10, 244, 1, 11],
            &[10, 244, 2, 10],
            17,
            1234,
        );
        let body = [orig.clone(), reply, attr(3, &[0, 0, 0, 8])].concat();
        let e = parse_entry(&body).expect("entry");
        assert_eq!(e.proto, 17);
        assert_eq!(e.orig_dst, Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40))));
        assert_eq!(e.orig_dport, Some(53));
        assert_eq!(e.reply_src, Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 11))));
        let cases = [
            (
                CtFilter {
                    proto: 17,
                    orig_dst: None,
                    orig_dport: None,
                    reply_src: Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 11))),
                },
                true,
            ),
            (
                CtFilter {
                    proto: 17,
                    orig_dst: None,
                    orig_dport: None,
                    reply_src: Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 12))),
                },
                false,
            ),
            (
                CtFilter {
                    proto: 6,
                    orig_dst: None,
                    orig_dport: None,
                    reply_src: None,
                },
                false,
            ),
            (
                CtFilter {
                    proto: 17,
                    orig_dst: Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40))),
                    orig_dport: Some(53),
                    reply_src: None,
                },
                true,
            ),
            (
                CtFilter {
                    proto: 17,
                    orig_dst: Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40))),
                    orig_dport: Some(54),
                    reply_src: None,
                },
                false,
            ),
        ];
        for (f, want) in cases {
            assert_eq!(f.matches(&e), want, "{f:?}");
        }
        let del = delete_request(7, &e);
        assert_eq!(
            u32::from_ne_bytes([del[0], del[1], del[2], del[3]]) as usize,
            del.len()
        );
        assert_eq!(u16::from_ne_bytes([del[4], del[5]]), 0x102);
        assert_eq!(&del[20..], &orig[..]);
        let msgs = messages(&del);
        assert_eq!(msgs.len(), 1);
    }

    #[test]
    fn ipv6_entries_parse_and_delete_as_ipv6() {
        let a = |s: &str| s.parse::<Ipv6Addr>().expect("ip").octets();
        let orig = tuple_attr(CTA_TUPLE_ORIG, &a("fd00:9::2"), &a("fd00:96::60"), 17, 53);
        let reply = tuple_attr(
            CTA_TUPLE_REPLY,
            &a("fd00:244:1::11"),
            &a("fd00:9::2"),
            17,
            1234,
        );
        let e = parse_entry(&[orig.clone(), reply].concat()).expect("entry");
        assert_eq!(e.family, AF_INET6);
        assert_eq!(e.orig_dst, Some("fd00:96::60".parse().expect("ip")));
        assert_eq!(e.reply_src, Some("fd00:244:1::11".parse().expect("ip")));
        let f = CtFilter {
            proto: 17,
            orig_dst: None,
            orig_dport: None,
            reply_src: Some("fd00:244:1::11".parse().expect("ip")),
        };
        assert!(f.matches(&e));
        assert!(f.may_match_family(AF_INET6) && !f.may_match_family(AF_INET));
        let del = delete_request(3, &e);
        assert_eq!(del[16], AF_INET6, "nfgenmsg family of the delete");
        assert_eq!(&del[20..], &orig[..]);
        assert_eq!(dump_request(1, AF_INET6)[16], AF_INET6);
    }
}
