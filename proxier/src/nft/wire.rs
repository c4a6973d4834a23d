//! nf_tables netlink encoding: messages, attributes and the expressions the layout uses
//! (constants from the kernel's `include/uapi/linux/netfilter/nf_tables.h`), one atomic
//! batch per transaction, and a small socket client (no `nft` process).

use std::fmt;

use nix::sys::socket::{setsockopt, sockopt};

/// NFNL_SUBSYS_NFTABLES.
const SUBSYS: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

/// nf_tables message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// NFT_MSG_NEWTABLE.
    NewTable = 0,
    /// NFT_MSG_DELTABLE.
    DelTable = 2,
    /// NFT_MSG_NEWCHAIN.
    NewChain = 3,
    /// NFT_MSG_DELCHAIN.
    DelChain = 5,
    /// NFT_MSG_NEWRULE.
    NewRule = 6,
    /// NFT_MSG_GETRULE.
    GetRule = 7,
    /// NFT_MSG_DELRULE.
    DelRule = 8,
    /// NFT_MSG_NEWSET.
    NewSet = 9,
    /// NFT_MSG_DELSET.
    DelSet = 11,
    /// NFT_MSG_NEWSETELEM.
    NewSetElem = 12,
    /// NFT_MSG_DELSETELEM.
    DelSetElem = 14,
}

/// Netfilter families.
pub const NFPROTO_IPV4: u8 = 2;
/// IPv6.
pub const NFPROTO_IPV6: u8 = 10;

// Attribute numbers.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;

/// Set flags.
pub const NFT_SET_MAP: u32 = 0x8;
/// Elements time out.
pub const NFT_SET_TIMEOUT: u32 = 0x10;
/// Updated from the packet path (dynamic).
pub const NFT_SET_EVAL: u32 = 0x20;
/// Data type of verdict maps.
pub const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// Registers: the verdict register and the 32-bit data registers `NFT_REG32_00 + n`.
pub const REG_VERDICT: u32 = 0;
/// First 32-bit data register (NFT_REG32_00).
pub const REG32: u32 = 8;

/// Hooks (NF_INET_*).
pub const HOOK_PREROUTING: u32 = 0;
/// Output.
pub const HOOK_OUTPUT: u32 = 3;
/// Postrouting.
pub const HOOK_POSTROUTING: u32 = 4;

/// Payload bases.
pub const BASE_NETWORK: u32 = 1;
/// Transport header.
pub const BASE_TRANSPORT: u32 = 2;

/// Meta keys.
pub const META_MARK: u32 = 3;
/// Layer-4 protocol.
pub const META_L4PROTO: u32 = 16;

/// A verdict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// NF_ACCEPT.
    Accept,
    /// NF_DROP.
    Drop,
    /// NFT_RETURN.
    Return,
    /// NFT_JUMP.
    Jump(String),
    /// NFT_GOTO.
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Self::Drop => 0,
            Self::Accept => 1,
            Self::Jump(_) => -3,
            Self::Goto(_) => -4,
            Self::Return => -5,
        }
    }

    /// Target chain of a jump or goto.
    pub fn target(&self) -> Option<&str> {
        match self {
            Self::Jump(c) | Self::Goto(c) => Some(c),
            _ => None,
        }
    }

    fn encode(&self, b: &mut Vec<u8>) {
        nest(b, NFTA_DATA_VERDICT, |b| {
            attr_u32(b, NFTA_VERDICT_CODE, self.code() as u32);
            if let Some(c) = self.target() {
                attr_str(b, NFTA_VERDICT_CHAIN, c);
            }
        });
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Accept => f.write_str("accept"),
            Self::Drop => f.write_str("drop"),
            Self::Return => f.write_str("return"),
            Self::Jump(c) => write!(f, "jump {c}"),
            Self::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// One nf_tables expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// Load `len` bytes at `base`+`offset` into `dreg`.
    Payload {
        /// Header base.
        base: u32,
        /// Offset.
        offset: u32,
        /// Length.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Load a meta key into `dreg`.
    Meta {
        /// Key.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Set a meta key from `sreg`.
    MetaSet {
        /// Key.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// Compare `sreg` with `data` (`eq` true: equal, false: not equal).
    Cmp {
        /// Source register.
        sreg: u32,
        /// Equal (true) or not equal.
        eq: bool,
        /// Value.
        data: Vec<u8>,
    },
    /// `reg = (reg & mask) ^ xor`.
    Bitwise {
        /// Register (source and destination).
        reg: u32,
        /// Mask.
        mask: Vec<u8>,
        /// Xor.
        xor: Vec<u8>,
    },
    /// Look `sreg` up in a set; with `dreg` a map (REG_VERDICT: verdict map).
    Lookup {
        /// Set name.
        set: String,
        /// Key register.
        sreg: u32,
        /// Data register.
        dreg: Option<u32>,
    },
    /// Load a value into `dreg`.
    Immediate {
        /// Register.
        dreg: u32,
        /// Value.
        data: Vec<u8>,
    },
    /// Verdict.
    Verdict(Verdict),
    /// `numgen random mod modulus offset offset` into `dreg` (host byte order u32).
    Numgen {
        /// Register.
        dreg: u32,
        /// Modulus.
        modulus: u32,
        /// Offset added to the result.
        offset: u32,
    },
    /// `fib daddr type` into `dreg`.
    FibDaddrType {
        /// Register.
        dreg: u32,
    },
    /// `fib saddr type` into `dreg`.
    FibSaddrType {
        /// Register.
        dreg: u32,
    },
    /// DNAT to address in `addr_reg`, port in `port_reg`.
    Dnat {
        /// NFPROTO_IPV4 or NFPROTO_IPV6.
        family: u8,
        /// Address register.
        addr_reg: u32,
        /// Port register.
        port_reg: u32,
    },
    /// Masquerade, fully random.
    Masquerade,
    /// Reject with an ICMP (ip) / ICMPv6 (ip6) destination unreachable of `code`.
    Reject {
        /// ICMP code (3: port unreachable; ICMPv6 4: port unreachable).
        code: u8,
    },
    /// Reject with a TCP reset (the client's connect fails at once even when the answer
    /// arrives before its SYN is fully sent, which an ICMP error does not achieve).
    RejectTcpReset,
    /// Counter.
    Counter,
    /// Refresh (or add) the key in `sreg` in a dynamic set.
    DynsetUpdate {
        /// Set name.
        set: String,
        /// Key register.
        sreg: u32,
        /// Data register (maps).
        sreg_data: Option<u32>,
        /// Timeout of the element in ms (NFTA_DYNSET_TIMEOUT); 0: the set's.
        timeout_ms: u64,
    },
    /// Remove the key in `sreg` from a dynamic map, if present (NFT_DYNSET_OP_DELETE);
    /// evaluation goes on either way. The kernel wants a data register for a map even
    /// though a delete ignores it.
    DynsetDelete {
        /// Map name.
        set: String,
        /// Key register.
        sreg: u32,
        /// Data register (written earlier in the rule; its value is not used).
        sreg_data: u32,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                let b = if *base == BASE_NETWORK { "nh" } else { "th" };
                write!(f, "payload {b}+{offset}/{len} => r{dreg}")
            }
            Self::Meta { key, dreg } => write!(f, "meta {} => r{dreg}", meta_name(*key)),
            Self::MetaSet { key, sreg } => write!(f, "meta {} set r{sreg}", meta_name(*key)),
            Self::Cmp { sreg, eq, data } => {
                write!(
                    f,
                    "cmp r{sreg} {} {}",
                    if *eq { "==" } else { "!=" },
                    hex(data)
                )
            }
            Self::Bitwise { reg, mask, xor } => {
                write!(
                    f,
                    "bitwise r{reg} = (r{reg} & {}) ^ {}",
                    hex(mask),
                    hex(xor)
                )
            }
            Self::Lookup { set, sreg, dreg } => match dreg {
                None => write!(f, "lookup r{sreg} @{set}"),
                Some(0) => write!(f, "lookup r{sreg} vmap @{set}"),
                Some(d) => write!(f, "lookup r{sreg} @{set} => r{d}"),
            },
            Self::Immediate { dreg, data } => write!(f, "immediate r{dreg} = {}", hex(data)),
            Self::Verdict(v) => write!(f, "{v}"),
            Self::Numgen {
                dreg,
                modulus,
                offset,
            } => write!(f, "numgen random mod {modulus} offset {offset} => r{dreg}"),
            Self::FibDaddrType { dreg } => write!(f, "fib daddr type => r{dreg}"),
            Self::FibSaddrType { dreg } => write!(f, "fib saddr type => r{dreg}"),
            Self::Dnat {
                addr_reg, port_reg, ..
            } => {
                write!(f, "dnat addr r{addr_reg} port r{port_reg}")
            }
            Self::Masquerade => f.write_str("masquerade fully-random"),
            Self::Reject { code } => write!(f, "reject icmp code {code}"),
            Self::RejectTcpReset => f.write_str("reject tcp reset"),
            Self::Counter => f.write_str("counter"),
            Self::DynsetUpdate {
                set,
                sreg,
                sreg_data,
                timeout_ms,
            } => {
                write!(f, "update @{set} r{sreg}")?;
                if *timeout_ms > 0 {
                    write!(f, " timeout {timeout_ms}ms")?;
                }
                match sreg_data {
                    Some(d) => write!(f, " : r{d}"),
                    None => Ok(()),
                }
            }
            Self::DynsetDelete {
                set,
                sreg,
                sreg_data,
            } => write!(f, "delete @{set} r{sreg} : r{sreg_data}"),
        }
    }
}

fn meta_name(key: u32) -> &'static str {
    match key {
        META_MARK => "mark",
        META_L4PROTO => "l4proto",
        _ => "?",
    }
}

impl Expr {
    /// Appends the expression as an NFTA_LIST_ELEM attribute.
    pub fn encode(&self, b: &mut Vec<u8>) {
        nest(b, NFTA_LIST_ELEM, |b| {
            attr_str(b, NFTA_EXPR_NAME, self.kernel_name());
            nest(b, NFTA_EXPR_DATA, |b| self.encode_data(b));
        });
    }

    fn kernel_name(&self) -> &'static str {
        match self {
            Self::Payload { .. } => "payload",
            Self::Meta { .. } | Self::MetaSet { .. } => "meta",
            Self::Cmp { .. } => "cmp",
            Self::Bitwise { .. } => "bitwise",
            Self::Lookup { .. } => "lookup",
            Self::Immediate { .. } | Self::Verdict(_) => "immediate",
            Self::Numgen { .. } => "numgen",
            Self::FibDaddrType { .. } | Self::FibSaddrType { .. } => "fib",
            Self::Dnat { .. } => "nat",
            Self::Masquerade => "masq",
            Self::Reject { .. } | Self::RejectTcpReset => "reject",
            Self::Counter => "counter",
            Self::DynsetUpdate { .. } | Self::DynsetDelete { .. } => "dynset",
        }
    }

    fn encode_data(&self, b: &mut Vec<u8>) {
        match self {
            Self::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                attr_u32(b, 1, *dreg);
                attr_u32(b, 2, *base);
                attr_u32(b, 3, *offset);
                attr_u32(b, 4, *len);
            }
            Self::Meta { key, dreg } => {
                attr_u32(b, 2, *key);
                attr_u32(b, 1, *dreg);
            }
            Self::MetaSet { key, sreg } => {
                attr_u32(b, 2, *key);
                attr_u32(b, 3, *sreg);
            }
            Self::Cmp { sreg, eq, data } => {
                attr_u32(b, 1, *sreg);
                attr_u32(b, 2, u32::from(!*eq));
                nest(b, 3, |b| attr(b, NFTA_DATA_VALUE, data));
            }
            Self::Bitwise { reg, mask, xor } => {
                attr_u32(b, 1, *reg);
                attr_u32(b, 2, *reg);
                attr_u32(b, 6, 0); // NFT_BITWISE_BOOL
                attr_u32(b, 3, u32_len(mask.len()));
                nest(b, 4, |b| attr(b, NFTA_DATA_VALUE, mask));
                nest(b, 5, |b| attr(b, NFTA_DATA_VALUE, xor));
            }
            Self::Lookup { set, sreg, dreg } => {
                attr_u32(b, 2, *sreg);
                if let Some(d) = dreg {
                    attr_u32(b, 3, *d);
                }
                attr_str(b, 1, set);
            }
            Self::Immediate { dreg, data } => {
                attr_u32(b, 1, *dreg);
                nest(b, 2, |b| attr(b, NFTA_DATA_VALUE, data));
            }
            Self::Verdict(v) => {
                attr_u32(b, 1, REG_VERDICT);
                nest(b, 2, |b| v.encode(b));
            }
            Self::Numgen {
                dreg,
                modulus,
                offset,
            } => {
                attr_u32(b, 1, *dreg);
                attr_u32(b, 2, *modulus);
                attr_u32(b, 3, 1); // NFT_NG_RANDOM
                attr_u32(b, 4, *offset);
            }
            Self::FibDaddrType { dreg } => {
                attr_u32(b, 3, 2); // NFTA_FIB_F_DADDR
                attr_u32(b, 2, 3); // NFT_FIB_RESULT_ADDRTYPE
                attr_u32(b, 1, *dreg);
            }
            Self::FibSaddrType { dreg } => {
                attr_u32(b, 3, 1); // NFTA_FIB_F_SADDR
                attr_u32(b, 2, 3);
                attr_u32(b, 1, *dreg);
            }
            Self::Dnat {
                family,
                addr_reg,
                port_reg,
            } => {
                attr_u32(b, 1, 1); // NFT_NAT_DNAT
                attr_u32(b, 2, u32::from(*family));
                attr_u32(b, 3, *addr_reg);
                attr_u32(b, 5, *port_reg);
            }
            Self::Masquerade => attr_u32(b, 1, 0x10), // NF_NAT_RANGE_PROTO_RANDOM_FULLY
            Self::Reject { code } => {
                attr_u32(b, 1, 0); // NFT_REJECT_ICMP_UNREACH
                attr(b, 2, &[*code]);
            }
            Self::RejectTcpReset => {
                attr_u32(b, 1, 1); // NFT_REJECT_TCP_RST
                attr(b, 2, &[0]);
            }
            Self::Counter => {}
            Self::DynsetUpdate {
                set,
                sreg,
                sreg_data,
                timeout_ms,
            } => {
                attr_u32(b, 4, *sreg);
                if let Some(d) = sreg_data {
                    attr_u32(b, 5, *d);
                }
                attr_u32(b, 3, 1); // NFT_DYNSET_OP_UPDATE
                if *timeout_ms > 0 {
                    attr(b, 6, &timeout_ms.to_be_bytes()); // NFTA_DYNSET_TIMEOUT
                }
                attr_str(b, 1, set);
            }
            Self::DynsetDelete {
                set,
                sreg,
                sreg_data,
            } => {
                attr_u32(b, 4, *sreg);
                attr_u32(b, 5, *sreg_data);
                attr_u32(b, 3, 2); // NFT_DYNSET_OP_DELETE
                attr_str(b, 1, set);
            }
        }
    }
}

/// Set element data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElemData {
    /// Plain set: no data.
    None,
    /// Verdict map.
    Verdict(Verdict),
    /// Data map.
    Value(Vec<u8>),
}

/// Data side of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetData {
    /// Plain set.
    None,
    /// Verdict map.
    Verdict,
    /// Data map: length and nft type id (informational).
    Value(u32, u32),
}

/// A named set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    /// Key length in bytes (concatenations padded to 4 per field).
    pub key_len: u32,
    /// nft key type id (informational, for `nft list`).
    pub key_type: u32,
    /// Data side.
    pub data: SetData,
    /// Default timeout in ms (dynamic sets with timeout); 0 = none.
    pub timeout_ms: u64,
    /// Most elements (NFTA_SET_DESC_SIZE); 0 = the kernel's default (a set filled from
    /// the packet path is then capped at 65,535).
    pub max_elems: u32,
}

/// Chain base hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `nat` or `filter`.
    pub kind: &'static str,
    /// NF_INET hook number.
    pub hooknum: u32,
    /// Priority.
    pub priority: i32,
}

/// Builds nf_tables messages into one batch buffer.
pub struct Batch {
    buf: Vec<u8>,
    family: u8,
    table: String,
    seq: u32,
    msgs: u32,
    last_start: usize,
    descr: Vec<(u32, String)>,
}

const MAX_ELEMS_BYTES: usize = 48 * 1024;

impl Batch {
    /// A new batch for `table` of `family`.
    pub fn new(family: u8, table: &str) -> Self {
        let mut b = Self {
            buf: Vec::with_capacity(1 << 16),
            family,
            table: table.to_string(),
            seq: 1,
            msgs: 0,
            last_start: 0,
            descr: Vec::new(),
        };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, |b| {
            // nfgenmsg: AF_UNSPEC, version 0, res_id = NFNL_SUBSYS_NFTABLES (big endian).
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&SUBSYS.to_be_bytes());
        });
        b
    }

    fn header(&mut self, ty: u16, flags: u16, body: impl FnOnce(&mut Vec<u8>)) -> u32 {
        let start = self.buf.len();
        let seq = self.seq;
        self.seq += 1;
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        body(&mut self.buf);
        let len = u32_len(self.buf.len() - start);
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.last_start = start;
        seq
    }

    fn msg(&mut self, ty: MsgType, flags: u16, what: String, body: impl FnOnce(&mut Vec<u8>)) {
        let fam = self.family;
        let seq = self.header((SUBSYS << 8) | ty as u16, NLM_F_REQUEST | flags, |b| {
            b.extend_from_slice(&[fam, 0, 0, 0]);
            body(b);
        });
        self.msgs += 1;
        self.descr.push((seq, what));
    }

    /// Messages from now on are for the `family` table of the same name.
    pub fn set_family(&mut self, family: u8) {
        self.family = family;
    }

    /// Number of nf_tables messages so far.
    pub fn len(&self) -> u32 {
        self.msgs
    }

    /// Whether the batch holds no nf_tables message.
    pub fn is_empty(&self) -> bool {
        self.msgs == 0
    }

    /// Adds the table (no error if it exists).
    pub fn add_table(&mut self) {
        let t = self.table.clone();
        self.msg(
            MsgType::NewTable,
            NLM_F_CREATE,
            format!("add table {t}"),
            |b| attr_str(b, NFTA_TABLE_NAME, &t),
        );
    }

    /// Deletes the table.
    pub fn del_table(&mut self) {
        let t = self.table.clone();
        self.msg(MsgType::DelTable, 0, format!("delete table {t}"), |b| {
            attr_str(b, NFTA_TABLE_NAME, &t)
        });
    }

    /// Adds a chain, a base chain with `hook`.
    pub fn add_chain(&mut self, name: &str, hook: Option<Hook>) {
        let t = self.table.clone();
        self.msg(
            MsgType::NewChain,
            NLM_F_CREATE,
            format!("add chain {name}"),
            |b| {
                attr_str(b, NFTA_CHAIN_TABLE, &t);
                attr_str(b, NFTA_CHAIN_NAME, name);
                if let Some(h) = hook {
                    nest(b, NFTA_CHAIN_HOOK, |b| {
                        attr_u32(b, NFTA_HOOK_HOOKNUM, h.hooknum);
                        attr_u32(b, NFTA_HOOK_PRIORITY, h.priority as u32);
                    });
                    attr_u32(b, NFTA_CHAIN_POLICY, 1);
                    attr_str(b, NFTA_CHAIN_TYPE, h.kind);
                }
            },
        );
    }

    /// Deletes a chain (must be empty and unreferenced by then).
    pub fn del_chain(&mut self, name: &str) {
        let t = self.table.clone();
        self.msg(MsgType::DelChain, 0, format!("delete chain {name}"), |b| {
            attr_str(b, NFTA_CHAIN_TABLE, &t);
            attr_str(b, NFTA_CHAIN_NAME, name);
        });
    }

    /// Removes every rule of a chain.
    pub fn flush_chain(&mut self, name: &str) {
        let t = self.table.clone();
        self.msg(MsgType::DelRule, 0, format!("flush chain {name}"), |b| {
            attr_str(b, NFTA_RULE_TABLE, &t);
            attr_str(b, NFTA_RULE_CHAIN, name);
        });
    }

    /// Appends a rule to a chain.
    pub fn add_rule(&mut self, chain: &str, exprs: &[Expr]) {
        let t = self.table.clone();
        self.msg(
            MsgType::NewRule,
            NLM_F_CREATE | NLM_F_APPEND,
            format!("add rule {chain}"),
            |b| {
                attr_str(b, NFTA_RULE_TABLE, &t);
                attr_str(b, NFTA_RULE_CHAIN, chain);
                nest(b, NFTA_RULE_EXPRESSIONS, |b| {
                    for e in exprs {
                        e.encode(b);
                    }
                });
            },
        );
    }

    /// Adds a named set or map.
    pub fn add_set(&mut self, name: &str, s: &SetSpec) {
        let t = self.table.clone();
        // The kernel requires a set id (unique within the transaction).
        let id = self.seq;
        self.msg(
            MsgType::NewSet,
            NLM_F_CREATE,
            format!("add set {name}"),
            |b| {
                attr_str(b, NFTA_SET_TABLE, &t);
                attr_str(b, NFTA_SET_NAME, name);
                let mut flags = 0;
                if s.data != SetData::None {
                    flags |= NFT_SET_MAP;
                }
                if s.timeout_ms > 0 {
                    flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
                }
                attr_u32(b, NFTA_SET_FLAGS, flags);
                attr_u32(b, NFTA_SET_KEY_TYPE, s.key_type);
                attr_u32(b, NFTA_SET_KEY_LEN, s.key_len);
                match s.data {
                    SetData::None => {}
                    SetData::Verdict => attr_u32(b, NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT),
                    SetData::Value(len, ty) => {
                        attr_u32(b, NFTA_SET_DATA_TYPE, ty);
                        attr_u32(b, NFTA_SET_DATA_LEN, len);
                    }
                }
                if s.timeout_ms > 0 {
                    attr(b, NFTA_SET_TIMEOUT, &s.timeout_ms.to_be_bytes());
                }
                if s.max_elems > 0 {
                    nest(b, NFTA_SET_DESC, |b| {
                        attr_u32(b, NFTA_SET_DESC_SIZE, s.max_elems);
                    });
                }
                attr_u32(b, NFTA_SET_ID, id);
            },
        );
    }

    /// Deletes a named set (unreferenced by then).
    pub fn del_set(&mut self, name: &str) {
        let t = self.table.clone();
        self.msg(MsgType::DelSet, 0, format!("delete set {name}"), |b| {
            attr_str(b, NFTA_SET_TABLE, &t);
            attr_str(b, NFTA_SET_NAME, name);
        });
    }

    /// Adds elements (chunked into messages that fit netlink's 64 KiB attribute limit).
    pub fn add_elems<'a>(
        &mut self,
        set: &str,
        elems: impl IntoIterator<Item = (&'a [u8], &'a ElemData)>,
    ) {
        self.elems(MsgType::NewSetElem, NLM_F_CREATE, set, elems);
    }

    /// Deletes elements by key.
    pub fn del_elems<'a>(&mut self, set: &str, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.elems(
            MsgType::DelSetElem,
            0,
            set,
            keys.into_iter().map(|k| (k, &ElemData::None)),
        );
    }

    /// Removes every element of a set.
    pub fn flush_set(&mut self, set: &str) {
        let t = self.table.clone();
        self.msg(MsgType::DelSetElem, 0, format!("flush set {set}"), |b| {
            attr_str(b, NFTA_SET_ELEM_LIST_TABLE, &t);
            attr_str(b, NFTA_SET_ELEM_LIST_SET, set);
        });
    }

    fn elems<'a>(
        &mut self,
        ty: MsgType,
        flags: u16,
        set: &str,
        elems: impl IntoIterator<Item = (&'a [u8], &'a ElemData)>,
    ) {
        let mut chunk = Vec::new();
        let mut n = 0usize;
        let verb = if ty == MsgType::NewSetElem {
            "add"
        } else {
            "delete"
        };
        let t = self.table.clone();
        let flush = |this: &mut Self, chunk: &mut Vec<u8>, n: &mut usize| {
            if *n == 0 {
                return;
            }
            let body = std::mem::take(chunk);
            this.msg(ty, flags, format!("{verb} {n} element(s) of {set}"), |b| {
                attr_str(b, NFTA_SET_ELEM_LIST_TABLE, &t);
                attr_str(b, NFTA_SET_ELEM_LIST_SET, set);
                let start = b.len();
                b.extend_from_slice(&[0; 2]);
                b.extend_from_slice(&(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED).to_ne_bytes());
                b.extend_from_slice(&body);
                let len = u16_len(b.len() - start);
                b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
            });
            *n = 0;
        };
        for (key, data) in elems {
            nest(&mut chunk, NFTA_LIST_ELEM, |b| {
                nest(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, key));
                match data {
                    ElemData::None => {}
                    ElemData::Verdict(v) => nest(b, NFTA_SET_ELEM_DATA, |b| v.encode(b)),
                    ElemData::Value(v) => {
                        nest(b, NFTA_SET_ELEM_DATA, |b| attr(b, NFTA_DATA_VALUE, v));
                    }
                }
            });
            n += 1;
            if chunk.len() > MAX_ELEMS_BYTES {
                flush(self, &mut chunk, &mut n);
            }
        }
        flush(self, &mut chunk, &mut n);
    }

    /// Closes the batch: the last nf_tables message asks for an ACK. Returns the bytes,
    /// the sequence number whose answer ends the transaction, and message descriptions.
    pub fn finish(mut self) -> (Vec<u8>, u32, Vec<(u32, String)>) {
        let last_seq = self.seq - 1;
        if self.msgs > 0 {
            let flags_at = self.last_start + 6;
            let f = u16::from_ne_bytes([self.buf[flags_at], self.buf[flags_at + 1]]) | NLM_F_ACK;
            self.buf[flags_at..flags_at + 2].copy_from_slice(&f.to_ne_bytes());
        }
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, |b| {
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&SUBSYS.to_be_bytes());
        });
        (self.buf, last_seq, self.descr)
    }
}

/// A length as u32 (saturating; netlink lengths are far below).
pub fn u32_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn u16_len(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn pad(b: &mut Vec<u8>) {
    while b.len() % 4 != 0 {
        b.push(0);
    }
}

/// Appends an attribute.
pub fn attr(b: &mut Vec<u8>, ty: u16, val: &[u8]) {
    b.extend_from_slice(&u16_len(4 + val.len()).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(val);
    pad(b);
}

fn attr_u32(b: &mut Vec<u8>, ty: u16, v: u32) {
    attr(b, ty, &v.to_be_bytes());
}

fn attr_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(b, ty, &v);
}

fn nest(b: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    b.extend_from_slice(&[0; 2]);
    b.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    f(b);
    let len = u16_len(b.len() - start);
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Socket-level failure.
    #[error("nf_tables netlink {op}: {source}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: nix::Error,
    },
    /// The kernel rejected the batch (nothing of it was applied).
    #[error("nf_tables rejected the batch: {0}")]
    Rejected(String),
    /// No answer from the kernel within the receive timeout (the sink replaces the socket).
    #[error("nf_tables netlink {op}: no answer from the kernel within {}s", .after.as_secs_f64())]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// The timeout.
        after: std::time::Duration,
    },
}

/// An nf_tables netlink socket in the calling thread's network namespace.
pub struct Socket {
    fd: netlink_sys::Socket,
    timeout: std::time::Duration,
}

fn sys(op: &'static str) -> impl Fn(nix::Error) -> NetlinkError {
    move |source| NetlinkError::Sys { op, source }
}

/// Splits a datagram of the kernel's replies into (type, sequence number, payload after
/// nlmsghdr); a message whose length does not fit ends the split.
pub fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    crate::netlink::split(buf)
        .msgs
        .into_iter()
        .map(|m| (m.ty, m.seq, m.payload))
        .collect()
}

/// The text of an NLMSG_ERROR code (a negated errno; i32::MIN, which negates to no errno,
/// reads as an unknown one).
pub fn errno_text(code: i32) -> String {
    nix::errno::Errno::from_raw(code.saturating_neg())
        .desc()
        .to_string()
}

impl Socket {
    /// Opens the socket; its receives give up after [`crate::NETLINK_RECV_TIMEOUT`].
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_with_timeout(crate::NETLINK_RECV_TIMEOUT)
    }

    /// The same with another receive timeout.
    pub fn open_with_timeout(timeout: std::time::Duration) -> Result<Self, NetlinkError> {
        let fd = crate::netlink::open(crate::netlink::NETLINK_NETFILTER, timeout).map_err(|e| {
            NetlinkError::Sys {
                op: e.op,
                source: e.source,
            }
        })?;
        // Errors carry the offending message; leave room for many.
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(8 << 20));
        Ok(Self { fd, timeout })
    }

    /// One datagram: EAGAIN (the receive timeout) is [`NetlinkError::Timeout`], EINTR is
    /// retried.
    fn recv_into(&self, buf: &mut [u8], op: &'static str) -> Result<usize, NetlinkError> {
        crate::netlink::recv(&self.fd, buf).map_err(|e| match e {
            crate::netlink::RecvError::Timeout => NetlinkError::Timeout {
                op,
                after: self.timeout,
            },
            crate::netlink::RecvError::Sys(source) => NetlinkError::Sys { op, source },
        })
    }

    /// Sends a finished batch in one message and waits for the kernel's verdict: all of it
    /// applied, or none of it (the error names the first failing message).
    pub fn commit(&self, batch: Batch) -> Result<(), NetlinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (buf, last, descr) = batch.finish();
        // The whole batch must go in one skb.
        let want = buf.len() + (1 << 16);
        setsockopt(&self.fd, sockopt::SndBufForce, &want).map_err(sys("SO_SNDBUFFORCE"))?;
        crate::netlink::send(&self.fd, &buf).map_err(sys("send"))?;
        let mut rbuf = vec![0u8; 1 << 20];
        let mut first_err: Option<String> = None;
        loop {
            let n = self.recv_into(&mut rbuf, "recv")?;
            for (ty, seq, body) in messages(&rbuf[..n]) {
                if ty != NLMSG_ERROR {
                    continue;
                }
                let code = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if code != 0 && first_err.is_none() {
                    let what = descr
                        .binary_search_by_key(&seq, |d| d.0)
                        .ok()
                        .map_or("?", |i| descr[i].1.as_str());
                    first_err = Some(format!("{what}: {}", errno_text(code)));
                }
                if seq == last {
                    return match first_err {
                        Some(e) => Err(NetlinkError::Rejected(e)),
                        None => Ok(()),
                    };
                }
            }
        }
    }

    /// Counts the rules of `chain` in `table` (None: table or chain absent).
    pub fn count_rules(
        &self,
        family: u8,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, NetlinkError> {
        let mut b = Vec::new();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&((SUBSYS << 8) | MsgType::GetRule as u16).to_ne_bytes());
        b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        b.extend_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&[family, 0, 0, 0]);
        attr_str(&mut b, NFTA_RULE_TABLE, table);
        attr_str(&mut b, NFTA_RULE_CHAIN, chain);
        let len = u32_len(b.len());
        b[..4].copy_from_slice(&len.to_ne_bytes());
        crate::netlink::send(&self.fd, &b).map_err(sys("send dump"))?;
        let mut rbuf = vec![0u8; 1 << 16];
        let mut n_rules = 0;
        loop {
            let n = self.recv_into(&mut rbuf, "recv dump")?;
            for (ty, _, body) in messages(&rbuf[..n]) {
                match ty {
                    NLMSG_DONE => return Ok(Some(n_rules)),
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if code == -libc_enoent() {
                            return Ok(None);
                        }
                        if code != 0 {
                            return Err(NetlinkError::Rejected(format!(
                                "listing {table}/{chain}: {}",
                                errno_text(code)
                            )));
                        }
                    }
                    t if t == (SUBSYS << 8) | MsgType::NewRule as u16 => n_rules += 1,
                    _ => {}
                }
            }
        }
    }
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

/// One message of a batch, decoded back (tests replay batches on a simulated table).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// NFT_MSG_NEWTABLE.
    AddTable(u8),
    /// NFT_MSG_DELTABLE.
    DelTable(u8),
    /// NFT_MSG_NEWCHAIN: family, name.
    AddChain(u8, String),
    /// NFT_MSG_DELCHAIN.
    DelChain(u8, String),
    /// NFT_MSG_DELRULE without a handle: the chain is flushed.
    FlushChain(u8, String),
    /// NFT_MSG_NEWRULE: family, chain, the expressions' bytes.
    AddRule(u8, String, Vec<u8>),
    /// NFT_MSG_NEWSET.
    AddSet(u8, String),
    /// NFT_MSG_DELSET.
    DelSet(u8, String),
    /// NFT_MSG_NEWSETELEM: family, set, (key, data attribute bytes).
    AddElems(u8, String, Vec<(Vec<u8>, Vec<u8>)>),
    /// NFT_MSG_DELSETELEM with elements: family, set, keys.
    DelElems(u8, String, Vec<Vec<u8>>),
    /// NFT_MSG_DELSETELEM without elements: the set is flushed.
    FlushSet(u8, String),
}

/// Attributes of `b`: (type without flags, payload).
#[cfg(test)]
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// Decodes the nf_tables messages of a finished batch (BEGIN and END left out).
#[cfg(test)]
pub fn decode_batch(buf: &[u8]) -> Vec<Op> {
    let get = |a: &[(u16, &[u8])], ty: u16| a.iter().find(|x| x.0 == ty).map(|x| x.1.to_vec());
    let name = |a: &[(u16, &[u8])], ty: u16| {
        get(a, ty)
            .map(|v| {
                String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap_or(&[])).into_owned()
            })
            .unwrap_or_default()
    };
    let mut ops = Vec::new();
    for m in crate::netlink::split(buf).msgs {
        if m.ty >> 8 != SUBSYS || m.payload.len() < 4 {
            continue;
        }
        let fam = m.payload[0];
        let a = attrs(&m.payload[4..]);
        let ty = m.ty & 0xff;
        let op = match ty {
            0 => Op::AddTable(fam),
            2 => Op::DelTable(fam),
            3 => Op::AddChain(fam, name(&a, NFTA_CHAIN_NAME)),
            5 => Op::DelChain(fam, name(&a, NFTA_CHAIN_NAME)),
            6 => Op::AddRule(
                fam,
                name(&a, NFTA_RULE_CHAIN),
                get(&a, NFTA_RULE_EXPRESSIONS).unwrap_or_default(),
            ),
            8 => Op::FlushChain(fam, name(&a, NFTA_RULE_CHAIN)),
            9 => Op::AddSet(fam, name(&a, NFTA_SET_NAME)),
            11 => Op::DelSet(fam, name(&a, NFTA_SET_NAME)),
            12 | 14 => {
                let set = name(&a, NFTA_SET_ELEM_LIST_SET);
                let Some(list) = get(&a, NFTA_SET_ELEM_LIST_ELEMENTS) else {
                    ops.push(Op::FlushSet(fam, set));
                    continue;
                };
                let elems: Vec<(Vec<u8>, Vec<u8>)> = attrs(&list)
                    .into_iter()
                    .map(|(_, e)| {
                        let e = attrs(e);
                        let key = get(&e, NFTA_SET_ELEM_KEY)
                            .and_then(|k| get(&attrs(&k), NFTA_DATA_VALUE))
                            .unwrap_or_default();
                        (key, get(&e, NFTA_SET_ELEM_DATA).unwrap_or_default())
                    })
                    .collect();
                if ty == 12 {
                    Op::AddElems(fam, set, elems)
                } else {
                    Op::DelElems(fam, set, elems.into_iter().map(|e| e.0).collect())
                }
            }
            _ => continue,
        };
        ops.push(op);
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_answer_is_a_timeout_error() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let s =
                Socket::open_with_timeout(std::time::Duration::from_millis(200)).expect("socket");
            let mut buf = [0u8; 64];
            let _ = tx.send(s.recv_into(&mut buf, "recv").map(|_| ()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a receive without an answer returned");
        assert!(matches!(r, Err(NetlinkError::Timeout { .. })), "{r:?}");
    }

    /// The nfgenmsg + attributes of the NEWRULE message of `rule`, as `Batch` encodes it.
    fn rule_bytes(chain: &str, exprs: &[Expr]) -> String {
        let mut b = Batch::new(NFPROTO_IPV4, "t");
        b.add_rule(chain, exprs);
        let (buf, _, _) = b.finish();
        let msgs = messages(&buf);
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1].0, (10 << 8) | 6);
        hex(msgs[1].2)
    }

    // Reference bytes: `nft --debug=mnl add rule ip t c <rule>` (nftables 1.0.6, kernel 6.18),
    // the nfgenmsg and attributes of the NEWRULE message.
    const REF_COUNTER_ACCEPT: &str = "0200000006000100740000000600020063000000a8000480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a000001140001800c000100636f756e7465720004000280300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c0002800800010000000001";
    const REF_VMAP: &str = "0200000006000100740000000600020063000000c4000480340001800c0001007061796c6f61640024000280080001000000000108000200000000010800030000000010080004000000000424000180090001006d657461000000001400028008000200000000100800010000000009340001800c0001007061796c6f61640024000280080001000000000a080002000000000208000300000000020800040000000002340001800b0001006c6f6f6b757000002400028008000200000000010800030000000000060001006d0000000800040000000001";
    const REF_FIB_REJECT: &str = "02000000060001007400000006000200630000007c0004802800018008000100666962001c0002800800030000000002080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800800010002000000240001800b00010072656a65637400001400028008000100000000000500020003000000";
    const REF_TCP_RESET: &str = "02000000060001007400000006000200630000007800048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000240001800b00010072656a65637400001400028008000100000000010500020000000000";
    const REF_GOTO: &str = "02000000060001007400000006000200630000003c000480380001800e000100696d6d656469617465000000240002800800010000000000180002801400028008000100fffffffc0600020063000000";
    // `delete @affm { ip saddr : 0x1 }` on a map (nftables 1.0.6, kernel 6.18).
    const REF_DYNSET_DELETE: &str = "0200000006000100740000000600020063000000a4000480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c0001800e000100696d6d6564696174650000001800028008000100000000020c0002800800010001000000400001800b00010064796e736574000030000280080004000000000108000500000000020800030000000002090001006166666d000000000800020000000002";
    // `update @aff { ip saddr timeout 5s }`.
    const REF_DYNSET_TIMEOUT: &str = "020000000600010074000000060002006300000078000480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004400001800b00010064796e736574000030000280080004000000000108000300000000010c00060000000000000013880800010061666600080002000000008e";
    const REF_DYNSET: &str = "02000000060001007400000006000200630000006c000480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004340001800b00010064796e7365740000240002800800040000000001080003000000000108000100616666000800020000000003";

    #[test]
    fn rules_match_nft_bytes() {
        let daddr = |dreg| Expr::Payload {
            base: BASE_NETWORK,
            offset: 16,
            len: 4,
            dreg,
        };
        assert_eq!(
            rule_bytes(
                "c",
                &[
                    daddr(1),
                    Expr::Cmp {
                        sreg: 1,
                        eq: true,
                        data: vec![10, 0, 0, 1]
                    },
                    Expr::Counter,
                    Expr::Verdict(Verdict::Accept),
                ]
            ),
            REF_COUNTER_ACCEPT
        );
        // nft adds the set id (NFTA_LOOKUP_SET_ID) after the name; names suffice for the
        // kernel, so the reference is compared without its last attribute.
        let vmap = rule_bytes(
            "c",
            &[
                daddr(1),
                Expr::Meta {
                    key: META_L4PROTO,
                    dreg: 9,
                },
                Expr::Payload {
                    base: BASE_TRANSPORT,
                    offset: 2,
                    len: 2,
                    dreg: 10,
                },
                Expr::Lookup {
                    set: "m".into(),
                    sreg: 1,
                    dreg: Some(0),
                },
            ],
        );
        assert_eq!(without_set_id(REF_VMAP), vmap);
        assert_eq!(
            rule_bytes(
                "c",
                &[
                    Expr::FibDaddrType { dreg: 1 },
                    Expr::Cmp {
                        sreg: 1,
                        eq: true,
                        data: 2u32.to_ne_bytes().to_vec()
                    },
                    Expr::Reject { code: 3 },
                ]
            ),
            REF_FIB_REJECT
        );
        assert_eq!(
            rule_bytes("c", &[Expr::Verdict(Verdict::Goto("c".into()))]),
            REF_GOTO
        );
        assert_eq!(
            rule_bytes(
                "c",
                &[
                    Expr::Meta {
                        key: META_L4PROTO,
                        dreg: 1
                    },
                    Expr::Cmp {
                        sreg: 1,
                        eq: true,
                        data: vec![6]
                    },
                    Expr::RejectTcpReset,
                ]
            ),
            REF_TCP_RESET
        );
        let update = |timeout_ms| {
            rule_bytes(
                "c",
                &[
                    saddr4(),
                    Expr::DynsetUpdate {
                        set: "aff".into(),
                        sreg: 1,
                        sreg_data: None,
                        timeout_ms,
                    },
                ],
            )
        };
        assert_eq!(without_set_id(REF_DYNSET), update(0));
        assert_eq!(without_set_id(REF_DYNSET_TIMEOUT), update(5000));
        let delete = rule_bytes(
            "c",
            &[
                saddr4(),
                Expr::Immediate {
                    dreg: 2,
                    data: 1u32.to_ne_bytes().to_vec(),
                },
                Expr::DynsetDelete {
                    set: "affm".into(),
                    sreg: 1,
                    sreg_data: 2,
                },
            ],
        );
        assert_eq!(without_set_id(REF_DYNSET_DELETE), delete);
    }

    /// `ip saddr` into register 1.
    fn saddr4() -> Expr {
        Expr::Payload {
            base: BASE_NETWORK,
            offset: 12,
            len: 4,
            dreg: 1,
        }
    }

    /// Drops the trailing 8-byte set id attribute and fixes the enclosing lengths (the
    /// rule's expression list, the list element and its data nest).
    fn without_set_id(h: &str) -> String {
        let mut b: Vec<u8> = (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
            .collect();
        b.truncate(b.len() - 8);
        // Walk: nfgenmsg(4), table attr, chain attr, then expressions nest.
        let mut off = 4;
        for _ in 0..2 {
            let l = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
            off += (l + 3) & !3;
        }
        let fix = |b: &mut Vec<u8>, at: usize| {
            let l = u16::from_ne_bytes([b[at], b[at + 1]]) - 8;
            b[at..at + 2].copy_from_slice(&l.to_ne_bytes());
        };
        fix(&mut b, off);
        // The last expression (list elem) and its data nest.
        let mut e = off + 4;
        let mut last = e;
        while e < b.len() {
            last = e;
            let l = u16::from_ne_bytes([b[e], b[e + 1]]) as usize;
            e += (l + 3) & !3;
        }
        fix(&mut b, last);
        // Data nest: after the name attr.
        let name = last + 4;
        let nl = u16::from_ne_bytes([b[name], b[name + 1]]) as usize;
        fix(&mut b, name + ((nl + 3) & !3));
        hex(&b)
    }

    #[test]
    fn batch_frames_and_acks_last() {
        let mut b = Batch::new(NFPROTO_IPV4, "hako");
        b.add_table();
        let key = [1u8; 8];
        let elems: Vec<(Vec<u8>, ElemData)> = (0..3000u32)
            .map(|i| {
                let mut k = key.to_vec();
                k[..4].copy_from_slice(&i.to_ne_bytes());
                (k, ElemData::Value(vec![0; 8]))
            })
            .collect();
        b.add_elems("eps", elems.iter().map(|(k, d)| (k.as_slice(), d)));
        let n = b.len();
        assert!(n > 2, "elements chunked into several messages: {n}");
        let (buf, last, descr) = b.finish();
        let msgs = messages(&buf);
        assert_eq!(msgs.first().map(|m| m.0), Some(NFNL_MSG_BATCH_BEGIN));
        assert_eq!(msgs.last().map(|m| m.0), Some(NFNL_MSG_BATCH_END));
        assert_eq!(u32_len(msgs.len()), n + 2);
        assert_eq!(descr.last().map(|d| d.0), Some(last));
        // Only the last nf_tables message asks for an ACK; every element message fits.
        for (i, m) in msgs.iter().enumerate() {
            assert!(m.2.len() < 65536, "message {i} too big");
        }
        let flags: Vec<u16> = {
            let mut off = 0;
            let mut v = Vec::new();
            while off < buf.len() {
                let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                    as usize;
                v.push(u16::from_ne_bytes([buf[off + 6], buf[off + 7]]));
                off += len;
            }
            v
        };
        let acked: Vec<usize> = flags
            .iter()
            .enumerate()
            .filter(|(_, f)| *f & NLM_F_ACK != 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(acked, vec![msgs.len() - 2]);
    }
}
