//! Fuzz targets for the proxier's readers of kernel replies: ctnetlink dumps (conntrack
//! cleanup), IPVS generic netlink and rtnetlink address replies, and nf_tables batch
//! verdicts.
//!
//! `fuzz_*` targets are `#[ignore]`d and run for `HAKO_FUZZ_SECONDS` (scripts/fuzz);
//! `quick_*` run a few deterministic inputs in the unit lane. See tests/fuzz/harness.rs.

#[path = "../../tests/fuzz/harness.rs"]
mod harness;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hako_proxier::conntrack::{self, CtFilter, Entry};
use hako_proxier::ipvs::genl::{self, DestKey, VsConf, VsKey};
use hako_proxier::ipvs::{link, nl};
use hako_proxier::nft::wire;
use harness::{apply, edits, fuzz, quick, raw, Edit};
use proptest::prelude::*;

const QUICK: u32 = 64;

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&u32::try_from(16 + payload.len()).unwrap_or(0).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    while m.len() % 4 != 0 {
        m.push(0);
    }
    m
}

fn attr(ty: u16, val: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&u16::try_from(4 + val.len()).unwrap_or(0).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(val);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

fn error_payload(code: i32) -> Vec<u8> {
    // The error code, then the header of the request it answers.
    let mut p = code.to_ne_bytes().to_vec();
    p.extend_from_slice(&[0; 16]);
    p
}

// ---- conntrack dumps -------------------------------------------------------------------

/// One conntrack entry of a dump: original src/dst/proto/dport, reply source.
#[derive(Debug, Clone)]
struct Ct {
    v6: bool,
    src: u128,
    dst: u128,
    proto: u8,
    dport: u16,
    reply_src: u128,
}

fn ct() -> impl Strategy<Value = Ct> {
    (
        any::<bool>(),
        any::<u128>(),
        any::<u128>(),
        prop_oneof![Just(17u8), Just(6), any::<u8>()],
        any::<u16>(),
        any::<u128>(),
    )
        .prop_map(|(v6, src, dst, proto, dport, reply_src)| Ct {
            v6,
            src,
            dst,
            proto,
            dport,
            reply_src,
        })
}

impl Ct {
    fn addr(&self, v: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(v))
        } else {
            IpAddr::V4(Ipv4Addr::from(u32::try_from(v & 0xffff_ffff).unwrap_or(0)))
        }
    }
    fn octets(&self, v: u128) -> Vec<u8> {
        match self.addr(v) {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }
    fn tuple(&self, ty: u16, src: u128, dst: u128, dport: u16) -> Vec<u8> {
        let (s, d) = if self.v6 { (3, 4) } else { (1, 2) };
        let mut ips = attr(s, &self.octets(src));
        ips.extend(attr(d, &self.octets(dst)));
        let mut proto = attr(1, &[self.proto]);
        proto.extend(attr(2, &4242u16.to_be_bytes()));
        proto.extend(attr(3, &dport.to_be_bytes()));
        let mut t = attr(1 | NLA_F_NESTED, &ips);
        t.extend(attr(2 | NLA_F_NESTED, &proto));
        attr(ty | NLA_F_NESTED, &t)
    }
    /// The message body after nlmsghdr: nfgenmsg, the tuples, a status attribute.
    fn body(&self) -> Vec<u8> {
        let mut b = vec![if self.v6 { 10 } else { 2 }, 0, 0, 0];
        b.extend(self.tuple(1, self.src, self.dst, self.dport));
        b.extend(self.tuple(2, self.reply_src, self.src, 4242));
        b.extend(attr(3, &8u32.to_be_bytes()));
        b
    }
}

fn ct_input() -> impl Strategy<Value = (Vec<Ct>, bool, Vec<Edit>)> {
    prop_oneof![
        4 => (proptest::collection::vec(ct(), 0..5), any::<bool>(), edits(8)),
        1 => raw(256).prop_map(|b| (Vec::new(), false, vec![Edit::Insert(0, b)])),
    ]
}

fn check_ct((entries, with_error, ed): &(Vec<Ct>, bool, Vec<Edit>)) -> Result<(), String> {
    let mut wire = Vec::new();
    for (i, c) in entries.iter().enumerate() {
        wire.extend(nlmsg(1 << 8, 2, u32::try_from(i).unwrap_or(0), &c.body()));
    }
    if *with_error {
        wire.extend(nlmsg(NLMSG_ERROR, 0, 9, &error_payload(-1)));
    }
    wire.extend(nlmsg(NLMSG_DONE, 2, 9, &0u32.to_ne_bytes()));
    let wire = apply(wire, ed);
    let filter = CtFilter {
        proto: 17,
        orig_dst: None,
        orig_dport: None,
        reply_src: None,
    };
    let mut got: Vec<Entry> = Vec::new();
    for (ty, body) in conntrack::messages(&wire) {
        if ty == NLMSG_ERROR || ty == NLMSG_DONE {
            continue;
        }
        if let Some(e) = body.get(4..).and_then(conntrack::parse_entry) {
            let _ = (filter.matches(&e), filter.may_match_family(e.family));
            let _ = conntrack::delete_request(1, &e);
            got.push(e);
        }
    }
    if !ed.is_empty() {
        return Ok(());
    }
    if got.len() != entries.len() {
        return Err(format!("parsed {} entries of {}", got.len(), entries.len()));
    }
    for (g, c) in got.iter().zip(entries) {
        let want = (
            if c.v6 { 10 } else { 2 },
            c.proto,
            Some(c.addr(c.dst)),
            Some(c.dport),
            Some(c.addr(c.reply_src)),
        );
        if (g.family, g.proto, g.orig_dst, g.orig_dport, g.reply_src) != want {
            return Err(format!("parsed {g:?} for {c:?}"));
        }
        // The delete echoes the original tuple as received.
        let del = conntrack::delete_request(1, g);
        if !del.ends_with(&c.tuple(1, c.src, c.dst, c.dport)) {
            return Err("the delete request does not echo the original tuple".into());
        }
    }
    Ok(())
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_conntrack_dump() {
    fuzz("fuzz_conntrack_dump", ct_input(), check_ct);
}

#[test]
fn quick_conntrack_dump() {
    quick(QUICK, ct_input(), check_ct);
}

// ---- IPVS generic netlink and rtnetlink addresses --------------------------------------

#[derive(Debug, Clone)]
enum Ipvs {
    Service(VsKey, VsConf),
    Dest(VsKey, DestKey, u32),
    Family(u16),
    Addr(u32, Ipv4Addr),
    Error(i32),
}

fn vs_key() -> impl Strategy<Value = VsKey> {
    (
        prop_oneof![Just(6u8), Just(17), Just(132)],
        ip(),
        any::<u16>(),
    )
        .prop_map(|(proto, addr, port)| VsKey { proto, addr, port })
}

fn ipvs() -> impl Strategy<Value = Ipvs> {
    let conf = (
        prop_oneof![
            Just("rr".to_string()),
            Just("wrr".to_string()),
            "[a-z]{0,15}"
        ],
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(sched, flags, timeout)| VsConf {
            sched,
            flags,
            timeout,
        });
    prop_oneof![
        (vs_key(), conf).prop_map(|(k, c)| Ipvs::Service(k, c)),
        (vs_key(), ip(), any::<u16>(), any::<u32>()).prop_map(|(k, addr, port, w)| Ipvs::Dest(
            k,
            DestKey { addr, port },
            w
        )),
        any::<u16>().prop_map(Ipvs::Family),
        (any::<u32>(), any::<u32>()).prop_map(|(i, a)| Ipvs::Addr(i, Ipv4Addr::from(a))),
        prop_oneof![Just(0), Just(-2), Just(i32::MIN), any::<i32>()].prop_map(Ipvs::Error),
    ]
}

fn ipvs_bytes(m: &Ipvs, seq: u32) -> Vec<u8> {
    match m {
        Ipvs::Service(k, c) => genl::service_msg(0x20, false, k, c).finish(seq),
        Ipvs::Dest(k, d, w) => genl::dest_msg(0x20, false, k, d, *w).finish(seq),
        Ipvs::Family(id) => {
            let mut p = vec![1u8, 2, 0, 0];
            p.extend(attr(2, b"IPVS\0"));
            p.extend(attr(1, &id.to_ne_bytes()));
            nlmsg(genl::GENL_ID_CTRL, 0, seq, &p)
        }
        Ipvs::Addr(i, a) => link::addr_msg(true, *i, *a).finish(seq),
        Ipvs::Error(code) => nlmsg(NLMSG_ERROR, 0, seq, &error_payload(*code)),
    }
}

fn check_ipvs((msgs, ed): &(Vec<Ipvs>, Vec<Edit>)) -> Result<(), String> {
    let mut wire = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        wire.extend(ipvs_bytes(m, u32::try_from(i).unwrap_or(0)));
    }
    let wire = apply(wire, ed);
    let Ok(split) = nl::messages(&wire) else {
        if ed.is_empty() {
            return Err("valid messages do not split".into());
        }
        return Ok(());
    };
    let mut read = Vec::new();
    for m in &split {
        let service = genl::parse_service(m.payload);
        let dest = genl::parse_dest(m.payload, 2);
        let family = genl::parse_family_id(m.payload);
        let addr = link::parse_addr(m.payload);
        let code = nl::error_code(m.payload);
        for (_, v) in nl::attrs(m.payload.get(4..).unwrap_or(&[])) {
            for (_, inner) in nl::attrs(v) {
                let _ = (nl::get_u16(inner), nl::get_u32(inner), nl::get_be16(inner));
                let _ = nl::get_str(inner);
            }
        }
        read.push((m.ty, service, dest, family, addr, code));
    }
    if !ed.is_empty() {
        return Ok(());
    }
    if read.len() != msgs.len() {
        return Err(format!("split {} messages of {}", read.len(), msgs.len()));
    }
    for ((_, service, dest, family, addr, code), m) in read.iter().zip(msgs) {
        let ok = match m {
            Ipvs::Service(k, c) => service.as_ref() == Some(&(*k, c.clone())),
            Ipvs::Dest(_, d, w) => dest.as_ref().is_some_and(|x| x.key == *d && x.weight == *w),
            Ipvs::Family(id) => *family == Some(*id),
            Ipvs::Addr(i, a) => {
                *addr
                    == Some(link::IfAddr {
                        index: *i,
                        ip: *a,
                        prefix: 32,
                    })
            }
            // Only an ack reads as 0, i32::MIN included.
            Ipvs::Error(c) => code.is_some_and(|e| (e == 0) == (*c == 0)),
        };
        if !ok {
            return Err(format!(
                "read {:?} for {m:?}",
                (service, dest, family, addr, code)
            ));
        }
    }
    Ok(())
}

fn ipvs_input() -> impl Strategy<Value = (Vec<Ipvs>, Vec<Edit>)> {
    prop_oneof![
        4 => (proptest::collection::vec(ipvs(), 0..5), edits(8)),
        1 => raw(256).prop_map(|b| (Vec::new(), vec![Edit::Insert(0, b)])),
    ]
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_ipvs_netlink() {
    fuzz("fuzz_ipvs_netlink", ipvs_input(), check_ipvs);
}

#[test]
fn quick_ipvs_netlink() {
    quick(QUICK, ipvs_input(), check_ipvs);
}

/// An NLMSG_ERROR carrying i32::MIN has no errno to negate: reading it overflowed (a panic
/// in debug builds). It must read as an error, not as an ack.
#[test]
fn netlink_error_code_of_i32_min() {
    harness::once("netlink_error_code_of_i32_min", i32::MIN, |c| {
        let code = nl::error_code(&error_payload(*c));
        if code.is_none_or(|e| e <= 0) {
            return Err(format!("read as {code:?}"));
        }
        let _ = wire::errno_text(*c);
        Ok(())
    });
}

// ---- nf_tables batch verdicts ----------------------------------------------------------

#[derive(Debug, Clone)]
enum Verdict {
    Ack(u32),
    Error(u32, i32),
    Rule(u32),
    Done(u32),
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        any::<u32>().prop_map(Verdict::Ack),
        (
            any::<u32>(),
            prop_oneof![
                Just(-2),
                Just(-17),
                Just(i32::MIN),
                Just(i32::MAX),
                any::<i32>()
            ]
        )
            .prop_map(|(s, c)| Verdict::Error(s, c)),
        any::<u32>().prop_map(Verdict::Rule),
        any::<u32>().prop_map(Verdict::Done),
    ]
}

fn verdict_msg(v: &Verdict) -> (u16, u32, Vec<u8>) {
    match v {
        Verdict::Ack(s) => (NLMSG_ERROR, *s, error_payload(0)),
        Verdict::Error(s, c) => (NLMSG_ERROR, *s, error_payload(*c)),
        Verdict::Rule(s) => ((10 << 8) | 6, *s, vec![2, 0, 0, 0]),
        Verdict::Done(s) => (NLMSG_DONE, *s, 0u32.to_ne_bytes().to_vec()),
    }
}

fn check_nft((vs, ed): &(Vec<Verdict>, Vec<Edit>)) -> Result<(), String> {
    let msgs: Vec<(u16, u32, Vec<u8>)> = vs.iter().map(verdict_msg).collect();
    let mut wire = Vec::new();
    for (ty, seq, p) in &msgs {
        wire.extend(nlmsg(*ty, 0, *seq, p));
    }
    let wire = apply(wire, ed);
    let got = wire::messages(&wire);
    for (ty, _, body) in &got {
        if *ty == NLMSG_ERROR {
            // As Socket::commit and count_rules read a verdict.
            let code = body
                .get(..4)
                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            if code != 0 {
                let _ = wire::errno_text(code);
            }
        }
    }
    if ed.is_empty() {
        let back: Vec<(u16, u32, Vec<u8>)> =
            got.iter().map(|(t, s, b)| (*t, *s, b.to_vec())).collect();
        if back != msgs {
            return Err(format!("split into {back:?}"));
        }
    }
    Ok(())
}

fn nft_input() -> impl Strategy<Value = (Vec<Verdict>, Vec<Edit>)> {
    prop_oneof![
        4 => (proptest::collection::vec(verdict(), 0..6), edits(8)),
        1 => raw(256).prop_map(|b| (Vec::new(), vec![Edit::Insert(0, b)])),
    ]
}

#[test]
#[ignore = "fuzz target: scripts/fuzz"]
fn fuzz_nft_replies() {
    fuzz("fuzz_nft_replies", nft_input(), check_nft);
}

#[test]
fn quick_nft_replies() {
    quick(QUICK, nft_input(), check_nft);
}
