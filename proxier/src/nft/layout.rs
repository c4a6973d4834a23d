//! The nftables layout as pure data: which sets, chains, rules and elements the model needs.
//! Per service port: one chain (`svc-*`) whose rule picks `numgen random mod N` as a slot
//! and looks `id . slot` up in one of [`SHARDS`] shared `endpoints-<k>` data maps
//! (k = id mod SHARDS) for the DNAT address and port; a verdict map keyed by
//! `daddr . l4proto . dport` reaches the service chains. With ClientIP affinity the chain
//! also keeps `id*MAX_SLOTS . client` → endpoint id ([`endpoint_ids`], stable while the
//! endpoint exists) in one of [`SHARDS`] shared dynamic maps `affinity-<k>`. See the README for the measurements behind this layout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use super::wire::{
    u32_len, ElemData, Expr, Hook, SetData, SetSpec, Verdict, BASE_NETWORK, BASE_TRANSPORT,
    HOOK_OUTPUT, HOOK_POSTROUTING, HOOK_PREROUTING, META_L4PROTO, META_MARK, NFPROTO_IPV4,
    NFPROTO_IPV6, REG32,
};
use crate::iptables::{service_chain, RenderOpts};
use crate::model::{Endpoint, Model, ServiceKey, ServicePort};

/// Table name.
pub const TABLE: &str = "hako";
/// Verdict map: `daddr . l4proto . dport` → goto service chain.
pub const SERVICE_IPS: &str = "service-ips";
/// Verdict map: `l4proto . dport` → goto external chain, for local addresses.
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
/// Verdict map (filter): `daddr . l4proto . dport` → goto reject / drop.
pub const NO_ENDPOINT_IPS: &str = "no-endpoint-ips";
/// Verdict map (filter): `l4proto . dport` → goto reject.
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
/// Verdict map (filter): LB `daddr . l4proto . dport` → jump firewall chain.
pub const FIREWALL_IPS: &str = "firewall-ips";
/// Data maps `endpoints-<k>`: `service id * MAX_SLOTS + slot` → `addr . port`.
pub const ENDPOINTS: &str = "endpoints-";
/// Number of endpoint maps. The kernel re-validates every element of a data map against
/// every rule bound to it, so one map bound by every service rule costs O(rules × elements)
/// on a full load; shards divide that by SHARDS², while few named sets keep set lookups
/// cheap.
pub const SHARDS: u32 = 64;

/// Endpoint slots per service chain: map keys are `id * MAX_SLOTS + slot`.
pub const MAX_SLOTS: u32 = 4096;

/// The endpoint map of service id `id`.
pub fn endpoints_map(id: u32) -> String {
    format!("{ENDPOINTS}{}", id % SHARDS)
}

/// Dynamic maps `affinity-<k>` (ClientIP affinity): `id*MAX_SLOTS . client address` →
/// endpoint id, entries timing out after the service's affinity timeout.
pub const AFFINITY: &str = "affinity-";

/// The affinity map of service id `id`.
pub fn affinity_map(id: u32) -> String {
    format!("{AFFINITY}{}", id % SHARDS)
}

/// Most entries of one affinity map (the services of a shard share it; a full map makes
/// new clients balance without affinity).
pub const AFFINITY_MAX: u32 = 1 << 20;

/// Default timeout of affinity entries (every rule gives its service's own).
const AFFINITY_DEFAULT_MS: u64 = 10_800_000;

/// Affinity ids of a chain's endpoints (`addr . port` data), in the order given. An id is a
/// hash (32-bit FNV-1a) of the endpoint's address and port, so it does not depend on the
/// other endpoints: affinity entries of the remaining endpoints stay valid when one goes
/// away. Two endpoints of one chain with the same hash: the one with the smaller
/// `addr . port` keeps it, the next takes the next free value (so when the smaller one goes
/// away, the other's id changes and its clients pick again). An id equal to a slot key of
/// the chain is harmless: the id rules come first, so such a recorded slot simply pins the
/// client to that id's endpoint.
pub fn endpoint_ids(eps: &[Vec<u8>]) -> Vec<u32> {
    assign_ids(eps, fnv1a)
}

fn fnv1a(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5, |h: u32, x| {
        (h ^ u32::from(*x)).wrapping_mul(0x0100_0193)
    })
}

/// [`endpoint_ids`] with the hash given (tests force collisions).
pub fn assign_ids(eps: &[Vec<u8>], hash: impl Fn(&[u8]) -> u32) -> Vec<u32> {
    let mut order: Vec<usize> = (0..eps.len()).collect();
    order.sort_by(|a, b| eps[*a].cmp(&eps[*b]));
    let mut used = BTreeSet::new();
    let mut ids = vec![0; eps.len()];
    for i in order {
        let mut id = hash(&eps[i]);
        while !used.insert(id) {
            id = id.wrapping_add(1);
        }
        ids[i] = id;
    }
    ids
}

/// Set of `addr . addr` for every endpoint: hairpin traffic is masqueraded.
pub const HAIRPIN: &str = "hairpin";
/// The chain whose rule count tells that the table is intact.
pub const CANARY_CHAIN: &str = "nat-prerouting";
/// Reject chain.
pub const REJECT: &str = "reject";

const MASQ_BIT: u32 = 0x4000;
const RTN_LOCAL: u32 = 2;

// nft type ids (informational): ipv4_addr 7, inet_proto 12, inet_service 13, mark 19.
const TYPE_MARK: u32 = 19;
const fn concat(types: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < types.len() {
        v = (v << 6) | types[i];
        i += 1;
    }
    v
}

/// A rule: its expressions.
pub type Rule = Vec<Expr>;

/// A shared chain: name, base hook, rules.
pub type ChainSpec = (String, Option<Hook>, Vec<Rule>);

/// Objects one service owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvcObjs {
    /// Regular chains and their rules.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Elements in shared maps: (set, key) → data.
    pub elems: BTreeMap<(String, Vec<u8>), ElemData>,
    /// Endpoint addresses (for the hairpin set).
    pub endpoint_ips: BTreeSet<Vec<u8>>,
}

/// Stable u32 ids for the service chains (keys of the `endpoints` map). Chain names are
/// kept inline (no allocation per chain: these entries outlive the render that makes
/// them, so they must not be scattered among its transient blocks).
#[derive(Debug, Clone, Default)]
pub struct Ids {
    map: HashMap<ChainKey, u32>,
    long: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

/// A chain name of at most 24 bytes, inline (zero-padded: names hold no NUL).
type ChainKey = [u8; 24];

fn chain_key(chain: &str) -> Option<ChainKey> {
    let mut k = [0u8; 24];
    k.get_mut(..chain.len())?.copy_from_slice(chain.as_bytes());
    Some(k)
}

impl Ids {
    /// The id of `chain`, allocated on first use.
    pub fn get(&mut self, chain: &str) -> u32 {
        let key = chain_key(chain);
        let known = match &key {
            Some(k) => self.map.get(k),
            None => self.long.get(chain),
        };
        if let Some(i) = known {
            return *i;
        }
        let i = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        match key {
            Some(k) => self.map.insert(k, i),
            None => self.long.insert(chain.to_string(), i),
        };
        i
    }

    /// Releases the id of a chain that no longer exists.
    pub fn release(&mut self, chain: &str) {
        let i = match chain_key(chain) {
            Some(k) => self.map.remove(&k),
            None => self.long.remove(chain),
        };
        if let Some(i) = i {
            self.free.push(i);
        }
    }

    /// Room for `n` chains (one allocation before a full render, not many during it).
    pub fn reserve(&mut self, n: usize) {
        self.map.reserve(n);
    }
}

/// The whole desired table.
#[derive(Debug, Clone)]
pub struct Desired {
    /// Shared sets.
    pub sets: BTreeMap<String, SetSpec>,
    /// Shared chains (base chains with hooks), in creation order.
    pub chains: Vec<ChainSpec>,
    /// Per service.
    pub services: BTreeMap<ServiceKey, SvcObjs>,
    /// Family.
    pub fam: Fam,
}

/// Address family of a table: `ip` or `ip6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fam {
    /// NFPROTO_IPV4 / NFPROTO_IPV6.
    pub nfproto: u8,
    /// Address length in bytes.
    pub alen: u32,
    /// nft family keyword.
    pub name: &'static str,
}

/// IPv4 (`table ip hako`).
pub const IPV4: Fam = Fam {
    nfproto: NFPROTO_IPV4,
    alen: 4,
    name: "ip",
};
/// IPv6 (`table ip6 hako`).
pub const IPV6: Fam = Fam {
    nfproto: NFPROTO_IPV6,
    alen: 16,
    name: "ip6",
};

impl Fam {
    /// The address bytes of `ip` when it is of this family.
    pub fn addr(self, ip: &IpAddr) -> Option<Vec<u8>> {
        match (ip, self.alen) {
            (IpAddr::V4(v), 4) => Some(v.octets().to_vec()),
            (IpAddr::V6(v), 16) => Some(v.octets().to_vec()),
            _ => None,
        }
    }

    /// Parses a CIDR of this family into (network, mask).
    pub fn cidr(self, s: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let (a, p) = s
            .split_once('/')
            .unwrap_or((s, if self.alen == 4 { "32" } else { "128" }));
        let ip: IpAddr = a.trim().parse().ok()?;
        let bytes = self.addr(&ip)?;
        let p: u32 = p.trim().parse().ok()?;
        if p > self.alen * 8 {
            return None;
        }
        let mask: Vec<u8> = (0..self.alen)
            .map(|i| {
                let bits = p.saturating_sub(i * 8).min(8);
                if bits == 0 {
                    0
                } else {
                    0xffu8 << (8 - bits)
                }
            })
            .collect();
        let net = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
        Some((net, mask))
    }

    /// Registers an address takes.
    fn regs(self) -> u32 {
        self.alen / 4
    }

    /// nft type id of addresses (ipv4_addr 7, ipv6_addr 8).
    fn addr_type(self) -> u32 {
        if self.alen == 4 {
            7
        } else {
            8
        }
    }

    fn src_offset(self) -> u32 {
        if self.alen == 4 {
            12
        } else {
            8
        }
    }

    fn dst_offset(self) -> u32 {
        if self.alen == 4 {
            16
        } else {
            24
        }
    }
}

/// Parses an IPv4 CIDR into (network, mask), both as bytes.
pub fn parse_v4_cidr(s: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    IPV4.cidr(s)
}

fn r(n: u32) -> u32 {
    REG32 + n
}

fn saddr(f: Fam, dreg: u32) -> Expr {
    Expr::Payload {
        base: BASE_NETWORK,
        offset: f.src_offset(),
        len: f.alen,
        dreg,
    }
}

fn daddr(f: Fam, dreg: u32) -> Expr {
    Expr::Payload {
        base: BASE_NETWORK,
        offset: f.dst_offset(),
        len: f.alen,
        dreg,
    }
}

fn in_cidr(load: Expr, reg: u32, cidr: (Vec<u8>, Vec<u8>), eq: bool) -> Vec<Expr> {
    let zero = vec![0; cidr.1.len()];
    vec![
        load,
        Expr::Bitwise {
            reg,
            mask: cidr.1,
            xor: zero,
        },
        Expr::Cmp {
            sreg: reg,
            eq,
            data: cidr.0,
        },
    ]
}

fn mark_masq() -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_MARK,
            dreg: r(0),
        },
        Expr::Bitwise {
            reg: r(0),
            mask: (!MASQ_BIT).to_ne_bytes().to_vec(),
            xor: MASQ_BIT.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: META_MARK,
            sreg: r(0),
        },
    ]
}

/// `daddr . l4proto . dport` key.
pub fn ip_key(ip: &[u8], proto: u8, port: u16) -> Vec<u8> {
    let p = port.to_be_bytes();
    let mut k = ip.to_vec();
    k.extend_from_slice(&[proto, 0, 0, 0, p[0], p[1], 0, 0]);
    k
}

/// `l4proto . dport` key.
pub fn port_key(proto: u8, port: u16) -> Vec<u8> {
    let p = port.to_be_bytes();
    vec![proto, 0, 0, 0, p[0], p[1], 0, 0]
}

fn ep_data(f: Fam, ep: &Endpoint) -> Option<Vec<u8>> {
    let mut d = f.addr(&ep.ip)?;
    let p = ep.port.to_be_bytes();
    d.extend_from_slice(&[p[0], p[1], 0, 0]);
    Some(d)
}

fn lookup_key3(f: Fam) -> Vec<Expr> {
    vec![
        daddr(f, r(0)),
        Expr::Meta {
            key: META_L4PROTO,
            dreg: r(f.regs()),
        },
        Expr::Payload {
            base: BASE_TRANSPORT,
            offset: 2,
            len: 2,
            dreg: r(f.regs() + 1),
        },
    ]
}

fn lookup_key2() -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_L4PROTO,
            dreg: r(0),
        },
        Expr::Payload {
            base: BASE_TRANSPORT,
            offset: 2,
            len: 2,
            dreg: r(1),
        },
    ]
}

fn nodeport_match(f: Fam, opts: &RenderOpts) -> Vec<Vec<Expr>> {
    let cidrs: Vec<_> = opts
        .nodeport_addresses
        .iter()
        .filter_map(|c| f.cidr(c))
        .collect();
    if opts.nodeport_addresses.is_empty() {
        let mut e = vec![
            Expr::FibDaddrType { dreg: r(0) },
            Expr::Cmp {
                sreg: r(0),
                eq: true,
                data: RTN_LOCAL.to_ne_bytes().to_vec(),
            },
        ];
        let lo = if f.alen == 4 {
            "127.0.0.0/8"
        } else {
            "::1/128"
        };
        if let Some(c) = f.cidr(lo) {
            e.extend(in_cidr(daddr(f, r(0)), r(0), c, false));
        }
        vec![e]
    } else {
        cidrs
            .into_iter()
            .map(|c| in_cidr(daddr(f, r(0)), r(0), c, true))
            .collect()
    }
}

fn hook(kind: &'static str, hooknum: u32, priority: i32) -> Option<Hook> {
    Some(Hook {
        kind,
        hooknum,
        priority,
    })
}

fn vmap_rule(f: Fam, prefix: Vec<Expr>, key3: bool, set: &str) -> Rule {
    let mut e = prefix;
    e.extend(if key3 { lookup_key3(f) } else { lookup_key2() });
    e.push(Expr::Lookup {
        set: set.into(),
        sreg: r(0),
        dreg: Some(0),
    });
    e
}

/// The shared sets and chains (without `lb-<N>` chains).
pub fn shared(f: Fam, opts: &RenderOpts) -> (BTreeMap<String, SetSpec>, Vec<ChainSpec>) {
    let key3 = SetSpec {
        key_len: f.alen + 8,
        key_type: concat(&[f.addr_type(), 12, 13]),
        data: SetData::Verdict,
        timeout_ms: 0,
        max_elems: 0,
    };
    let key2 = SetSpec {
        key_len: 8,
        key_type: concat(&[12, 13]),
        data: SetData::Verdict,
        timeout_ms: 0,
        max_elems: 0,
    };
    let mut sets = BTreeMap::new();
    sets.insert(SERVICE_IPS.to_string(), key3.clone());
    sets.insert(NO_ENDPOINT_IPS.to_string(), key3.clone());
    sets.insert(FIREWALL_IPS.to_string(), key3);
    sets.insert(SERVICE_NODEPORTS.to_string(), key2.clone());
    sets.insert(NO_ENDPOINT_NODEPORTS.to_string(), key2);
    for k in 0..SHARDS {
        sets.insert(
            affinity_map(k),
            SetSpec {
                key_len: 4 + f.alen,
                key_type: concat(&[TYPE_MARK, f.addr_type()]),
                data: SetData::Value(4, TYPE_MARK),
                timeout_ms: AFFINITY_DEFAULT_MS,
                max_elems: AFFINITY_MAX,
            },
        );
        sets.insert(
            endpoints_map(k),
            SetSpec {
                key_len: 4,
                key_type: TYPE_MARK,
                data: SetData::Value(f.alen + 4, concat(&[f.addr_type(), 13])),
                timeout_ms: 0,
                max_elems: 0,
            },
        );
    }
    sets.insert(
        HAIRPIN.to_string(),
        SetSpec {
            key_len: 2 * f.alen,
            key_type: concat(&[f.addr_type(), f.addr_type()]),
            data: SetData::None,
            timeout_ms: 0,
            max_elems: 0,
        },
    );
    let jump = |c: &str| vec![vec![Expr::Verdict(Verdict::Jump(c.into()))]];
    let mut services = vec![vmap_rule(f, vec![], true, SERVICE_IPS)];
    for m in nodeport_match(f, opts) {
        services.push(vmap_rule(f, m, false, SERVICE_NODEPORTS));
    }
    let mut filter = vec![
        vmap_rule(f, vec![], true, FIREWALL_IPS),
        vmap_rule(f, vec![], true, NO_ENDPOINT_IPS),
    ];
    for m in nodeport_match(f, opts) {
        filter.push(vmap_rule(f, m, false, NO_ENDPOINT_NODEPORTS));
    }
    let masq = vec![
        Expr::Meta {
            key: META_MARK,
            dreg: r(0),
        },
        Expr::Bitwise {
            reg: r(0),
            mask: MASQ_BIT.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: r(0),
            eq: false,
            data: vec![0; 4],
        },
        Expr::Meta {
            key: META_MARK,
            dreg: r(0),
        },
        Expr::Bitwise {
            reg: r(0),
            mask: (!MASQ_BIT).to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::MetaSet {
            key: META_MARK,
            sreg: r(0),
        },
        Expr::Masquerade,
    ];
    let hairpin = vec![
        saddr(f, r(0)),
        daddr(f, r(f.regs())),
        Expr::Lookup {
            set: HAIRPIN.into(),
            sreg: r(0),
            dreg: None,
        },
        Expr::Masquerade,
    ];
    let chains = vec![
        ("services".to_string(), None, services),
        ("filter-services".to_string(), None, filter),
        (
            REJECT.to_string(),
            None,
            vec![
                vec![
                    Expr::Meta {
                        key: META_L4PROTO,
                        dreg: r(0),
                    },
                    Expr::Cmp {
                        sreg: r(0),
                        eq: true,
                        data: vec![6],
                    },
                    Expr::RejectTcpReset,
                ],
                // ICMP port unreachable (code 3), ICMPv6 port unreachable (code 4).
                vec![Expr::Reject {
                    code: if f.alen == 4 { 3 } else { 4 },
                }],
            ],
        ),
        (
            "nat-prerouting".to_string(),
            hook("nat", HOOK_PREROUTING, -100),
            jump("services"),
        ),
        (
            "nat-output".to_string(),
            hook("nat", HOOK_OUTPUT, -100),
            jump("services"),
        ),
        (
            "nat-postrouting".to_string(),
            hook("nat", HOOK_POSTROUTING, 100),
            vec![masq, hairpin],
        ),
        (
            "filter-prerouting".to_string(),
            hook("filter", HOOK_PREROUTING, -110),
            jump("filter-services"),
        ),
        (
            "filter-output".to_string(),
            hook("filter", HOOK_OUTPUT, -110),
            jump("filter-services"),
        ),
    ];
    (sets, chains)
}

fn chain_suffix(sp: &ServicePort) -> String {
    service_chain("", sp)
}

/// Balancing rules of chain `chain` (id `id`) over `eps`. With affinity, in order: one rule
/// per endpoint for a client whose entry holds that endpoint's id; one rule that forgets any
/// other entry (none, or the id of an endpoint that is gone) and records a random slot; one
/// rule per endpoint that turns its just-recorded slot into its id; a last rule balancing
/// without affinity when recording failed.
fn balance(
    f: Fam,
    o: &mut SvcObjs,
    ids: &mut Ids,
    chain: &str,
    eps: &[&Endpoint],
    affinity: Option<i32>,
) -> Vec<Rule> {
    let mut eps: Vec<Vec<u8>> = eps.iter().filter_map(|e| ep_data(f, e)).collect();
    if eps.is_empty() {
        return vec![vec![Expr::Verdict(Verdict::Drop)]];
    }
    if eps.len() > MAX_SLOTS as usize {
        tracing::warn!(
            chain,
            endpoints = eps.len(),
            "using the first {MAX_SLOTS} endpoints"
        );
        eps.truncate(MAX_SLOTS as usize);
    }
    let id = ids.get(chain);
    let map = endpoints_map(id);
    let n = u32_len(eps.len());
    let base = id.wrapping_mul(MAX_SLOTS);
    for (slot, d) in eps.iter().enumerate() {
        let k = base.wrapping_add(u32_len(slot)).to_ne_bytes().to_vec();
        o.elems.insert((map.clone(), k), ElemData::Value(d.clone()));
    }
    // `dnat to numgen random mod N offset id*MAX_SLOTS map @endpoints-<k>`, with the
    // registers nft itself uses for it (so that `nft list` shows the rules).
    let numgen = |dreg: u32| Expr::Numgen {
        dreg,
        modulus: n,
        offset: base,
    };
    let to_ep = |sreg: u32| {
        [
            Expr::Lookup {
                set: map.clone(),
                sreg,
                dreg: Some(r(0)),
            },
            Expr::Dnat {
                family: f.nfproto,
                addr_reg: r(0),
                port_reg: r(f.regs()),
            },
        ]
    };
    let Some(secs) = affinity else {
        let mut e = vec![numgen(r(0))];
        e.extend(to_ep(r(0)));
        return vec![e];
    };
    // ClientIP affinity: shared dynamic maps `affinity-<k>` keyed by
    // `id*MAX_SLOTS . client address` → endpoint id, each entry with the service's affinity
    // timeout, refreshed by every new connection. Ids are stable (a hash of address and
    // port), so an endpoint going away leaves the other endpoints' clients where they are.
    let aff = affinity_map(id);
    let timeout_ms = u64::try_from(secs.max(1)).unwrap_or(1) * 1000;
    let ep_ids = endpoint_ids(&eps);
    // The key: this chain's base (r8), the client address (r9..).
    let key = || {
        [
            Expr::Immediate {
                dreg: r(0),
                data: base.to_ne_bytes().to_vec(),
            },
            saddr(f, r(1)),
        ]
    };
    // The client's entry in r13, compared with `value`; then `then`, the endpoint's DNAT.
    let per_ep = |value: u32, then: Vec<Expr>, d: &[u8]| -> Rule {
        let mut e = key().to_vec();
        e.extend([
            Expr::Lookup {
                set: aff.clone(),
                sreg: r(0),
                dreg: Some(r(5)),
            },
            Expr::Cmp {
                sreg: r(5),
                eq: true,
                data: value.to_ne_bytes().to_vec(),
            },
        ]);
        e.extend(then);
        e.extend([
            Expr::Immediate {
                dreg: r(0),
                data: d[..f.alen as usize].to_vec(),
            },
            Expr::Immediate {
                dreg: r(f.regs()),
                data: d[f.alen as usize..f.alen as usize + 2].to_vec(),
            },
            Expr::Dnat {
                family: f.nfproto,
                addr_reg: r(0),
                port_reg: r(f.regs()),
            },
        ]);
        e
    };
    let id_into_r13 = |eid: u32| Expr::Immediate {
        dreg: r(5),
        data: eid.to_ne_bytes().to_vec(),
    };
    let update = |sreg_data: u32| Expr::DynsetUpdate {
        set: aff.clone(),
        sreg: r(0),
        sreg_data: Some(sreg_data),
        timeout_ms,
    };
    let delete = |sreg_data: u32| Expr::DynsetDelete {
        set: aff.clone(),
        sreg: r(0),
        sreg_data,
    };
    // 1. The client's entry holds the id of an endpoint: refresh its timeout, DNAT there
    //    (an `update` of an existing element only refreshes it).
    let mut rules: Vec<Rule> = eps
        .iter()
        .zip(&ep_ids)
        .map(|(d, eid)| per_ep(*eid, vec![id_into_r13(*eid), update(r(5))], d))
        .collect();
    // 2. No entry, or the id of an endpoint that is gone: forget it and record a random
    //    slot (`numgen random mod N offset id*MAX_SLOTS`, what nft can show as map data).
    let mut record = key().to_vec();
    record.extend([numgen(r(6)), delete(r(6)), update(r(6))]);
    rules.push(record);
    // 3. The slot just recorded: replace it with that slot's endpoint id, DNAT there.
    for (slot, (d, eid)) in eps.iter().zip(&ep_ids).enumerate() {
        let key = base.wrapping_add(u32_len(slot));
        rules.push(per_ep(
            key,
            vec![id_into_r13(*eid), delete(r(5)), update(r(5))],
            d,
        ));
    }
    // 4. Recording failed (no room in the map): balance without affinity.
    let mut last = vec![numgen(r(6))];
    last.extend(to_ep(r(6)));
    rules.push(last);
    rules
}

/// Objects of one service port, added to `o`.
fn render_port(f: Fam, o: &mut SvcObjs, sp: &ServicePort, opts: &RenderOpts, ids: &mut Ids) {
    let h = chain_suffix(sp);
    let proto = sp.protocol.number();
    let cluster_ips: Vec<Vec<u8>> = sp.cluster_ips.iter().filter_map(|i| f.addr(i)).collect();
    let ext_ips: Vec<Vec<u8>> = sp.external_ips.iter().filter_map(|i| f.addr(i)).collect();
    let lb_ips: Vec<Vec<u8>> = sp.lb_ips.iter().filter_map(|i| f.addr(i)).collect();
    let cluster: Vec<&Endpoint> = sp
        .cluster_endpoints()
        .into_iter()
        .filter(|e| f.addr(&e.ip).is_some())
        .collect();
    let local: Vec<&Endpoint> = sp
        .local_endpoints()
        .into_iter()
        .filter(|e| f.addr(&e.ip).is_some())
        .collect();
    let elem = |o: &mut SvcObjs, set: &str, key: Vec<u8>, v: Verdict| {
        o.elems.insert((set.to_string(), key), ElemData::Verdict(v));
    };
    if cluster.is_empty() {
        let rej = Verdict::Goto(REJECT.into());
        for ip in cluster_ips.iter().chain(&ext_ips).chain(&lb_ips) {
            elem(o, NO_ENDPOINT_IPS, ip_key(ip, proto, sp.port), rej.clone());
        }
        if let Some(np) = sp.node_port {
            elem(o, NO_ENDPOINT_NODEPORTS, port_key(proto, np), rej);
        }
        return;
    }
    for e in &cluster {
        if let Some(ip) = f.addr(&e.ip) {
            o.endpoint_ips.insert(ip);
        }
    }
    let svc = format!("svc-{h}");
    let svl = format!("svl-{h}");
    let mut svc_rules = Vec::new();
    if opts.masquerade_all {
        svc_rules.push(mark_masq());
    } else if let Some(c) = opts
        .cluster_cidr
        .as_deref()
        .and_then(|c| c.split(',').find_map(|c| f.cidr(c.trim())))
    {
        let mut e = in_cidr(saddr(f, r(0)), r(0), c, false);
        e.extend(mark_masq());
        svc_rules.push(e);
    }
    svc_rules.extend(balance(f, o, ids, &svc, &cluster, sp.affinity_seconds));
    o.chains.insert(svc.clone(), svc_rules);
    let need_svl = sp.internal_local || (sp.external_local && sp.has_external());
    if need_svl {
        let rules = balance(f, o, ids, &svl, &local, sp.affinity_seconds);
        o.chains.insert(svl.clone(), rules);
    }
    let internal = if sp.internal_local { &svl } else { &svc };
    for ip in &cluster_ips {
        elem(
            o,
            SERVICE_IPS,
            ip_key(ip, proto, sp.port),
            Verdict::Goto(internal.clone()),
        );
    }
    if !sp.has_external() {
        return;
    }
    let ext = format!("ext-{h}");
    let to_svc = || Expr::Verdict(Verdict::Goto(svc.clone()));
    let mut ext_rules = Vec::new();
    if sp.external_local {
        // Pods and the node itself reach external addresses through the cluster policy;
        // everyone else only reaches local endpoints, with the client address kept.
        if let Some(c) = opts
            .cluster_cidr
            .as_deref()
            .and_then(|c| c.split(',').find_map(|c| f.cidr(c.trim())))
        {
            let mut e = in_cidr(saddr(f, r(0)), r(0), c, true);
            e.push(to_svc());
            ext_rules.push(e);
        }
        let mut e = vec![
            Expr::FibSaddrType { dreg: r(0) },
            Expr::Cmp {
                sreg: r(0),
                eq: true,
                data: RTN_LOCAL.to_ne_bytes().to_vec(),
            },
        ];
        e.extend(mark_masq());
        e.push(to_svc());
        ext_rules.push(e);
        ext_rules.push(vec![Expr::Verdict(Verdict::Goto(svl))]);
    } else {
        let mut e = mark_masq();
        e.push(to_svc());
        ext_rules.push(e);
    }
    o.chains.insert(ext.clone(), ext_rules);
    for ip in ext_ips.iter().chain(&lb_ips) {
        elem(
            o,
            SERVICE_IPS,
            ip_key(ip, proto, sp.port),
            Verdict::Goto(ext.clone()),
        );
    }
    if let Some(np) = sp.node_port {
        elem(
            o,
            SERVICE_NODEPORTS,
            port_key(proto, np),
            Verdict::Goto(ext),
        );
    }
    let ranges: Vec<_> = sp
        .lb_source_ranges
        .iter()
        .filter_map(|c| f.cidr(c))
        .collect();
    if !ranges.is_empty() && !lb_ips.is_empty() {
        let fw = format!("fw-{h}");
        let mut rules: Vec<Rule> = ranges
            .into_iter()
            .map(|c| {
                let mut e = in_cidr(saddr(f, r(0)), r(0), c, true);
                e.push(Expr::Verdict(Verdict::Return));
                e
            })
            .collect();
        rules.push(vec![Expr::Verdict(Verdict::Drop)]);
        o.chains.insert(fw.clone(), rules);
        for ip in &lb_ips {
            elem(
                o,
                FIREWALL_IPS,
                ip_key(ip, proto, sp.port),
                Verdict::Jump(fw.clone()),
            );
        }
    }
}

/// Objects of one service (all its ports).
pub fn render_service(f: Fam, ports: &[ServicePort], opts: &RenderOpts, ids: &mut Ids) -> SvcObjs {
    let mut o = SvcObjs::default();
    for sp in ports {
        render_port(f, &mut o, sp, opts, ids);
    }
    o
}

/// The whole desired table of family `f`.
pub fn render(f: Fam, model: &Model, opts: &RenderOpts, ids: &mut Ids) -> Desired {
    let (sets, chains) = shared(f, opts);
    let services = model
        .iter()
        .map(|(k, v)| (k.clone(), render_service(f, v, opts, ids)))
        .filter(|(_, o)| *o != SvcObjs::default())
        .collect();
    Desired {
        fam: f,
        sets,
        chains,
        services,
    }
}

impl Desired {
    /// Hairpin set keys.
    pub fn hairpin(&self) -> BTreeSet<Vec<u8>> {
        self.services
            .values()
            .flat_map(|s| s.endpoint_ips.iter().cloned())
            .collect()
    }

    /// Deterministic text of the whole table (golden tests).
    pub fn text(&self) -> String {
        let mut out = format!("table {} {TABLE}\n", self.fam.name);
        for (name, s) in &self.sets {
            let _ = writeln!(out, "set {name} {s:?}");
        }
        for (name, h, rules) in &self.chains {
            write_chain(&mut out, name, *h, rules);
        }
        for (k, s) in &self.services {
            let _ = writeln!(out, "# service {k}");
            for (name, rules) in &s.chains {
                write_chain(&mut out, name, None, rules);
            }
            for ((set, key), d) in &s.elems {
                let _ = writeln!(
                    out,
                    "element {set} {} : {}",
                    key_text(set, key),
                    data_text(d)
                );
            }
        }
        for ip in self.hairpin() {
            let _ = writeln!(out, "element {HAIRPIN} {}", addr_text(&ip));
        }
        out
    }

    /// Every problem with references: a goto/jump to a missing chain, a lookup of a missing
    /// set. Empty = consistent.
    pub fn check_refs(&self) -> Vec<String> {
        let mut chains: BTreeSet<String> = self.chains.iter().map(|c| c.0.clone()).collect();
        let sets: BTreeSet<String> = self.sets.keys().cloned().collect();
        for s in self.services.values() {
            chains.extend(s.chains.keys().cloned());
        }
        let mut problems = Vec::new();
        let check_rule = |where_: &str, rule: &Rule, problems: &mut Vec<String>| {
            for e in rule {
                match e {
                    Expr::Verdict(v) => {
                        if let Some(t) = v.target() {
                            if !chains.contains(t) {
                                problems.push(format!("{where_}: {v} to a missing chain"));
                            }
                        }
                    }
                    Expr::Lookup { set, .. }
                    | Expr::DynsetUpdate { set, .. }
                    | Expr::DynsetDelete { set, .. }
                        if !sets.contains(set) =>
                    {
                        problems.push(format!("{where_}: missing set @{set}"));
                    }
                    _ => {}
                }
            }
        };
        for (name, _, rules) in &self.chains {
            for rule in rules {
                check_rule(name, rule, &mut problems);
            }
        }
        for s in self.services.values() {
            for (name, rules) in &s.chains {
                for rule in rules {
                    check_rule(name, rule, &mut problems);
                }
            }
            for ((set, _), d) in &s.elems {
                if !sets.contains(set) {
                    problems.push(format!("element of missing set @{set}"));
                }
                if let ElemData::Verdict(v) = d {
                    if let Some(t) = v.target() {
                        if !chains.contains(t) {
                            problems.push(format!("element of @{set}: {v} to a missing chain"));
                        }
                    }
                }
            }
        }
        problems
    }
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key_text(set: &str, k: &[u8]) -> String {
    let proto = |p: u8| match p {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        132 => "sctp".to_string(),
        p => p.to_string(),
    };
    match k.len() {
        12 | 24 => {
            let a = k.len() - 8;
            format!(
                "{} . {} . {}",
                addr_text(&k[..a]),
                proto(k[a]),
                u16::from_be_bytes([k[a + 4], k[a + 5]])
            )
        }
        8 if !set.starts_with(ENDPOINTS) => {
            format!("{} . {}", proto(k[0]), u16::from_be_bytes([k[4], k[5]]))
        }
        4 if set.starts_with(ENDPOINTS) => {
            let v = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
            format!("id {} . slot {}", v / MAX_SLOTS, v % MAX_SLOTS)
        }
        _ => hexs(k),
    }
}

fn addr_text(b: &[u8]) -> String {
    match b.len() {
        4 => Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => hexs(b),
    }
}

fn data_text(d: &ElemData) -> String {
    match d {
        ElemData::None => String::new(),
        ElemData::Verdict(v) => v.to_string(),
        ElemData::Value(v) if v.len() == 8 => format!(
            "{}:{}",
            addr_text(&v[..4]),
            u16::from_be_bytes([v[4], v[5]])
        ),
        ElemData::Value(v) if v.len() == 20 => format!(
            "[{}]:{}",
            addr_text(&v[..16]),
            u16::from_be_bytes([v[16], v[17]])
        ),
        ElemData::Value(v) => hexs(v),
    }
}

fn write_chain(out: &mut String, name: &str, h: Option<Hook>, rules: &[Rule]) {
    match h {
        Some(h) => {
            let _ = writeln!(
                out,
                "chain {name} {{ type {} hook {} priority {} }}",
                h.kind, h.hooknum, h.priority
            );
        }
        None => {
            let _ = writeln!(out, "chain {name}");
        }
    }
    for rule in rules {
        let parts: Vec<String> = rule.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "  {}", parts.join("; "));
    }
}
