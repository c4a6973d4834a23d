//! The layout of an ip_tables table blob (`struct ipt_entry` after `struct ipt_entry` as
//! `IPT_SO_GET_ENTRIES` returns it and `IPT_SO_SET_REPLACE` takes it) decoded into chains
//! and encoded back. Pure: bytes in, bytes out.
//!
//! A blob is built-in chains (rules, then the policy entry at the hook's underflow) and user
//! chains (an `ERROR` entry naming the chain, rules, a `RETURN` entry), ended by an `ERROR`
//! entry named `ERROR`. Rules keep their `ipt_ip` and their match and target bytes as they
//! came; only standard-target verdicts are decoded (to chain references and
//! ACCEPT/DROP/QUEUE/RETURN) and re-encoded as offsets, so rules of other users pass
//! through byte for byte.

use std::collections::HashMap;

/// `sizeof(struct ipt_entry)`.
pub const ENTRY: usize = 112;
/// `sizeof(struct ipt_ip)`.
pub const IP: usize = 84;
/// `sizeof(struct xt_entry_target)` (and of `xt_entry_match`).
pub const TGT_HDR: usize = 32;
/// `XT_ALIGN(sizeof(struct xt_standard_target))`.
pub const STD_TGT: usize = 40;
/// `XT_ALIGN(sizeof(struct xt_error_target))`.
pub const ERR_TGT: usize = 64;
/// `XT_FUNCTION_MAXNAMELEN - 1`: a chain name's longest length (`XT_EXTENSION_MAXNAMELEN`
/// is 29 with the NUL; chain names are 30 with it).
pub const CHAIN_MAXLEN: usize = 28;
/// `IPT_F_GOTO` in `ipt_ip.flags`.
pub const F_GOTO: u8 = 0x02;

/// The hooks in order, and the names of their built-in chains.
pub const HOOKS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// `XT_ALIGN`: 8 on every 64-bit target this runs on (`__alignof__(struct _xt_align)`).
pub const fn align(n: usize) -> usize {
    (n + 7) & !7
}

/// An encoded table: its info, its entries, and for each entry the index of the old entry
/// whose counters it carries.
pub type Encoded = (Info, Vec<u8>, Vec<Option<u32>>);

/// A standard target's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `-NF_ACCEPT - 1`.
    Accept,
    /// `-NF_DROP - 1`.
    Drop,
    /// `-NF_QUEUE - 1`.
    Queue,
    /// `XT_RETURN` (`-NF_REPEAT - 1`).
    Return,
    /// No target: the next rule (the offset of the next entry).
    Fallthrough,
    /// A jump (or goto, by the entry's `IPT_F_GOTO`) to the chain with this index.
    Jump(usize),
}

/// Bytes of a rule: a range of the blob its table was decoded from (nothing copied), or
/// bytes of its own (a rule added since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bytes {
    /// `src[start..end]` of the table.
    Src(u32, u32),
    /// Its own.
    Own(Vec<u8>),
}

impl Bytes {
    /// Length.
    pub fn len(&self) -> usize {
        match self {
            Self::Src(a, b) => (*b as usize).saturating_sub(*a as usize),
            Self::Own(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, `src` being the blob of the table.
    pub fn get<'a>(&'a self, src: &'a [u8]) -> &'a [u8] {
        match self {
            Self::Src(a, b) => src.get(*a as usize..*b as usize).unwrap_or(&[]),
            Self::Own(v) => v,
        }
    }
}

/// A rule's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The standard target.
    Standard(Verdict),
    /// Any other target, its bytes (header included) as they are.
    Raw(Bytes),
}

impl Target {
    fn size(&self) -> usize {
        match self {
            Self::Standard(_) => STD_TGT,
            Self::Raw(b) => b.len(),
        }
    }
}

/// One entry: a rule, a policy, a chain head or tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `struct ipt_ip` as it is.
    pub ip: [u8; IP],
    /// `nfcache` (the kernel ignores it; kept for identity).
    pub nfcache: u32,
    /// `comefrom` (the kernel clears it on replace; kept for identity).
    pub comefrom: u32,
    /// Counters as read (the kernel ignores them on replace; see `old`).
    pub counters: [u64; 2],
    /// The match bytes between the entry and its target.
    pub matches: Bytes,
    /// The target.
    pub target: Target,
    /// Index of this entry in the blob it was decoded from (its counters are carried over
    /// after a replace); `None` for a new entry.
    pub old: Option<u32>,
}

impl Rule {
    /// A new entry with no matches and all-zero `ipt_ip`.
    pub fn new(target: Target) -> Self {
        Self {
            ip: [0; IP],
            nfcache: 0,
            comefrom: 0,
            counters: [0; 2],
            matches: Bytes::Own(Vec::new()),
            target,
            old: None,
        }
    }

    fn size(&self) -> usize {
        ENTRY + self.matches.len() + self.target.size()
    }

    /// Whether this is a goto (`-g`) rather than a jump.
    pub fn is_goto(&self) -> bool {
        self.ip[82] & F_GOTO != 0
    }

    /// The chain this rule jumps or goes to.
    pub fn jump(&self) -> Option<usize> {
        match self.target {
            Target::Standard(Verdict::Jump(c)) => Some(c),
            _ => None,
        }
    }

    /// Whether two rules of a table whose blob is `src` are the same rule (`iptables -C`):
    /// everything but counters, `nfcache`, `comefrom` and history.
    pub fn same(&self, o: &Self, src: &[u8]) -> bool {
        self.ip == o.ip
            && self.matches.get(src) == o.matches.get(src)
            && match (&self.target, &o.target) {
                (Target::Raw(a), Target::Raw(b)) => a.get(src) == b.get(src),
                (a, b) => a == b,
            }
    }
}

/// A chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its name.
    pub name: String,
    /// The hook of a built-in chain.
    pub hook: Option<usize>,
    /// The `ERROR` head entry of a user chain.
    pub head: Option<Rule>,
    /// Its rules.
    pub rules: Vec<Rule>,
    /// The policy entry of a built-in chain, the `RETURN` entry of a user chain.
    pub tail: Rule,
    /// Deleted (`-X`): indices of the other chains stay valid.
    pub deleted: bool,
}

impl Chain {
    /// A new, empty user chain.
    pub fn user(name: &str) -> Self {
        Self {
            name: name.to_string(),
            hook: None,
            head: Some(Rule::new(Target::Raw(Bytes::Own(error_target(name))))),
            rules: Vec::new(),
            tail: Rule::new(Target::Standard(Verdict::Return)),
            deleted: false,
        }
    }
}

/// A decoded table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its name (`filter`, `nat`, …).
    pub name: String,
    /// `valid_hooks`.
    pub valid_hooks: u32,
    /// Chains, in blob order; deleted ones stay as tombstones.
    pub chains: Vec<Chain>,
    /// The final `ERROR` entry.
    pub end: Rule,
    /// Entries in the blob it was decoded from (`num_counters` of the replace).
    pub old_entries: u32,
    /// Chain name → index.
    index: HashMap<String, usize>,
    /// The blob it was decoded from: the bytes of the rules read.
    pub src: Vec<u8>,
}

/// What `IPT_SO_GET_INFO` says of a table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Info {
    /// `valid_hooks`.
    pub valid_hooks: u32,
    /// `hook_entry`.
    pub hook_entry: [u32; 5],
    /// `underflow`.
    pub underflow: [u32; 5],
    /// `num_entries`.
    pub num_entries: u32,
    /// `size`.
    pub size: u32,
}

/// A blob that is not a table as the kernel builds them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// An entry runs past the blob or has impossible offsets.
    #[error("table {table}: bad entry at offset {offset}")]
    Entry {
        /// Table.
        table: String,
        /// Byte offset.
        offset: usize,
    },
    /// The chain structure is not the one iptables builds.
    #[error("table {table}: unexpected layout at offset {offset}: {what}")]
    Layout {
        /// Table.
        table: String,
        /// Byte offset.
        offset: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The encoded table is too large for the ABI's 32-bit offsets.
    #[error("table {0}: too large")]
    TooLarge(String),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

/// A C string in `b` (up to the first NUL).
pub fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |n| &b[..n])
}

/// The bytes of an `ERROR` target naming `name` (a user chain's head).
pub fn error_target(name: &str) -> Vec<u8> {
    let mut t = vec![0u8; ERR_TGT];
    t[..2].copy_from_slice(&u16::try_from(ERR_TGT).unwrap_or(0).to_ne_bytes());
    t[2..7].copy_from_slice(b"ERROR");
    let n = name.len().min(CHAIN_MAXLEN + 1);
    t[TGT_HDR..TGT_HDR + n].copy_from_slice(&name.as_bytes()[..n]);
    t
}

const V_ACCEPT: i32 = -2;
const V_DROP: i32 = -1;
const V_QUEUE: i32 = -4;
const V_RETURN: i32 = -5;

impl Table {
    /// Decodes `blob` (`info.size` bytes of entries) of table `name` (a copy of it is kept).
    pub fn decode(name: &str, info: &Info, blob: &[u8]) -> Result<Self, BlobError> {
        Self::decode_owned(name, info, blob.to_vec())
    }

    /// Decodes `blob` of table `name`, keeping it: the rules are ranges of it.
    pub fn decode_owned(name: &str, info: &Info, src: Vec<u8>) -> Result<Self, BlobError> {
        let blob = &src[..];
        let entry_err = |offset| BlobError::Entry {
            table: name.to_string(),
            offset,
        };
        let layout = |offset, what| BlobError::Layout {
            table: name.to_string(),
            offset,
            what,
        };
        // Pass 1: entries.
        let mut raw: Vec<(usize, Rule, i32, bool)> =
            Vec::with_capacity(usize::try_from(info.num_entries).unwrap_or(0).min(1 << 24));
        let at = |x: usize| u32::try_from(x).map_err(|_| entry_err(x));
        let mut off = 0usize;
        while off < blob.len() {
            if off + ENTRY > blob.len() {
                return Err(entry_err(off));
            }
            let e = &blob[off..];
            let t_off = usize::from(u16_at(e, 88));
            let next = usize::from(u16_at(e, 90));
            if t_off < ENTRY || next < t_off + TGT_HDR || off + next > blob.len() || next % 8 != 0 {
                return Err(entry_err(off));
            }
            let t_size = usize::from(u16_at(e, t_off));
            if t_off + t_size != next || t_size < TGT_HDR {
                return Err(entry_err(off));
            }
            let mut ip = [0u8; IP];
            ip.copy_from_slice(&e[..IP]);
            let tgt = &e[t_off..next];
            let tname = cstr(&tgt[2..31]);
            let err_head = tname == b"ERROR";
            let mut verdict = 0;
            let target = if tname.is_empty() && tgt[31] == 0 && t_size == STD_TGT {
                verdict = i32::from_ne_bytes([tgt[32], tgt[33], tgt[34], tgt[35]]);
                Target::Standard(Verdict::Fallthrough)
            } else {
                Target::Raw(Bytes::Src(at(off + t_off)?, at(off + next)?))
            };
            let rule = Rule {
                ip,
                nfcache: u32_at(e, 84),
                comefrom: u32_at(e, 92),
                counters: [u64_at(e, 96), u64_at(e, 104)],
                matches: Bytes::Src(at(off + ENTRY)?, at(off + t_off)?),
                target,
                old: Some(u32::try_from(raw.len()).map_err(|_| entry_err(off))?),
            };
            raw.push((off, rule, verdict, err_head));
            off += next;
        }
        if u32::try_from(raw.len()).ok() != Some(info.num_entries) {
            return Err(layout(off, "entry count differs from the table's"));
        }
        // Pass 2: chains.
        let mut chains: Vec<Chain> = Vec::new();
        let mut starts: HashMap<usize, usize> = HashMap::new();
        let mut cur: Option<Chain> = None;
        let mut end = None;
        let n = raw.len();
        // A user chain ends with the entry before the next head: a plain RETURN.
        let close_user = |cur: &mut Option<Chain>,
                          chains: &mut Vec<Chain>,
                          verdicts: &[(usize, i32)],
                          off: usize|
         -> Result<(), BlobError> {
            if let Some(mut c) = cur.take() {
                let Some(tail) = c.rules.pop() else {
                    return Err(layout(off, "user chain without its RETURN entry"));
                };
                let v = verdicts.last().map_or(0, |x| x.1);
                if !(tail.matches.is_empty()
                    && v == V_RETURN
                    && matches!(tail.target, Target::Standard(_)))
                {
                    return Err(layout(off, "user chain not ended by RETURN"));
                }
                c.tail = tail;
                chains.push(c);
            }
            Ok(())
        };
        let mut entries: Vec<(usize, i32)> = Vec::with_capacity(n);
        for (i, (off, rule, verdict, err_head)) in raw.into_iter().enumerate() {
            let hook = (0..5).find(|&h| {
                info.valid_hooks & (1 << h) != 0
                    && usize::try_from(info.hook_entry[h]).ok() == Some(off)
            });
            let underflow = (0..5).any(|h| {
                info.valid_hooks & (1 << h) != 0
                    && usize::try_from(info.underflow[h]).ok() == Some(off)
            });
            if hook.is_some() || err_head {
                if cur.as_ref().is_some_and(|c| c.hook.is_some()) {
                    return Err(layout(off, "chain start inside a built-in chain"));
                }
                close_user(&mut cur, &mut chains, &entries, off)?;
            }
            if let Some(h) = hook {
                starts.insert(off, chains.len());
                cur = Some(Chain {
                    name: HOOKS[h].to_string(),
                    hook: Some(h),
                    head: None,
                    rules: Vec::new(),
                    tail: Rule::new(Target::Standard(Verdict::Accept)),
                    deleted: false,
                });
            }
            if err_head {
                if i + 1 == n {
                    end = Some(rule);
                    break;
                }
                let Target::Raw(t) = &rule.target else {
                    return Err(layout(off, "chain head"));
                };
                let t = t.get(blob);
                let cname =
                    String::from_utf8_lossy(cstr(t.get(TGT_HDR..).unwrap_or(&[]))).into_owned();
                // The chain starts at the next entry.
                starts.insert(off + rule.size(), chains.len());
                cur = Some(Chain {
                    name: cname,
                    hook: None,
                    head: Some(rule),
                    rules: Vec::new(),
                    tail: Rule::new(Target::Standard(Verdict::Return)),
                    deleted: false,
                });
                entries.push((off, 0));
                continue;
            }
            let Some(c) = cur.as_mut() else {
                return Err(layout(off, "entry outside any chain"));
            };
            entries.push((off, verdict));
            if underflow {
                if c.hook.is_none() {
                    return Err(layout(off, "underflow inside a user chain"));
                }
                let mut c = cur.take().unwrap_or_else(|| Chain::user(""));
                c.tail = rule;
                chains.push(c);
            } else {
                c.rules.push(rule);
            }
        }
        let Some(end) = end else {
            return Err(layout(blob.len(), "no end entry"));
        };
        if cur.is_some() {
            return Err(layout(blob.len(), "unterminated chain"));
        }
        // Pass 3: verdicts.
        let mut k = 0usize;
        for c in &mut chains {
            if c.head.is_some() {
                k += 1;
            }
            for r in c.rules.iter_mut().chain(std::iter::once(&mut c.tail)) {
                let (off, v) = entries[k];
                k += 1;
                if !matches!(r.target, Target::Standard(_)) {
                    continue;
                }
                let next = off + r.size();
                let verdict = match v {
                    V_ACCEPT => Verdict::Accept,
                    V_DROP => Verdict::Drop,
                    V_QUEUE => Verdict::Queue,
                    V_RETURN => Verdict::Return,
                    v if v >= 0 => {
                        let to = usize::try_from(v).unwrap_or(usize::MAX);
                        if to == next {
                            Verdict::Fallthrough
                        } else if let Some(&ci) = starts.get(&to) {
                            Verdict::Jump(ci)
                        } else {
                            return Err(layout(off, "jump to no chain start"));
                        }
                    }
                    _ => return Err(layout(off, "unknown verdict")),
                };
                r.target = Target::Standard(verdict);
            }
        }
        let index = chains
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Ok(Self {
            name: name.to_string(),
            valid_hooks: info.valid_hooks,
            chains,
            end,
            old_entries: info.num_entries,
            index,
            src,
        })
    }

    /// The live chain named `name`.
    pub fn chain(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Adds an empty user chain; returns its index.
    pub fn add_chain(&mut self, name: &str) -> usize {
        let i = self.chains.len();
        self.chains.push(Chain::user(name));
        self.index.insert(name.to_string(), i);
        i
    }

    /// Marks chain `i` deleted.
    pub fn delete_chain(&mut self, i: usize) {
        let c = &mut self.chains[i];
        c.deleted = true;
        c.rules = Vec::new();
        let name = std::mem::take(&mut c.name);
        self.index.remove(&name);
    }

    /// The live chains in the order iptables lays them out: built-in chains by hook, then
    /// user chains by name.
    pub fn order(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.chains.len())
            .filter(|&i| !self.chains[i].deleted)
            .collect();
        v.sort_by(|&a, &b| {
            let (a, b) = (&self.chains[a], &self.chains[b]);
            (a.hook.unwrap_or(usize::MAX), &a.name).cmp(&(b.hook.unwrap_or(usize::MAX), &b.name))
        });
        v
    }

    /// Encodes the table: (info of the new table, entry bytes, for each new entry the index
    /// of the old entry whose counters it carries).
    pub fn encode(&self) -> Result<Encoded, BlobError> {
        self.encode_after(0)
    }

    /// [`Table::encode`] with `header` zero bytes before the entries (room for the
    /// `ipt_replace` header, so the entries need not be copied again); offsets count from
    /// the first entry.
    pub fn encode_after(&self, header: usize) -> Result<Encoded, BlobError> {
        let order = self.order();
        // Offsets of chain starts.
        let mut start = vec![0usize; self.chains.len()];
        let mut off = 0usize;
        let mut total_entries = 1usize;
        for &ci in &order {
            let c = &self.chains[ci];
            if let Some(h) = &c.head {
                off += h.size();
                total_entries += 1;
            }
            start[ci] = off;
            for r in &c.rules {
                off += r.size();
            }
            off += c.tail.size();
            total_entries += c.rules.len() + 1;
        }
        let size = off + self.end.size();
        let too_large = || BlobError::TooLarge(self.name.clone());
        let mut info = Info {
            valid_hooks: self.valid_hooks,
            num_entries: u32::try_from(total_entries).map_err(|_| too_large())?,
            size: u32::try_from(size).map_err(|_| too_large())?,
            // What the kernel reports for hooks the table has not (it ignores them).
            hook_entry: [u32::MAX; 5],
            underflow: [u32::MAX; 5],
        };
        let mut out = Vec::with_capacity(header + size);
        out.resize(header, 0);
        let mut old = Vec::with_capacity(total_entries);
        for &ci in &order {
            let c = &self.chains[ci];
            if let Some(h) = &c.head {
                write_entry(&mut out, &self.src, header, h, &start, &mut old)?;
            }
            if let Some(h) = c.hook {
                info.hook_entry[h] = u32::try_from(out.len() - header).map_err(|_| too_large())?;
            }
            for r in &c.rules {
                write_entry(&mut out, &self.src, header, r, &start, &mut old)?;
            }
            if let Some(h) = c.hook {
                info.underflow[h] = u32::try_from(out.len() - header).map_err(|_| too_large())?;
            }
            write_entry(&mut out, &self.src, header, &c.tail, &start, &mut old)?;
        }
        write_entry(&mut out, &self.src, header, &self.end, &start, &mut old)?;
        Ok((info, out, old))
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    src: &[u8],
    header: usize,
    r: &Rule,
    start: &[usize],
    old: &mut Vec<Option<u32>>,
) -> Result<(), BlobError> {
    let at = out.len() - header;
    let t_off = ENTRY + r.matches.len();
    let next = t_off + r.target.size();
    let big = || BlobError::TooLarge(String::new());
    out.extend_from_slice(&r.ip);
    out.extend_from_slice(&r.nfcache.to_ne_bytes());
    out.extend_from_slice(&u16::try_from(t_off).map_err(|_| big())?.to_ne_bytes());
    out.extend_from_slice(&u16::try_from(next).map_err(|_| big())?.to_ne_bytes());
    out.extend_from_slice(&r.comefrom.to_ne_bytes());
    out.extend_from_slice(&r.counters[0].to_ne_bytes());
    out.extend_from_slice(&r.counters[1].to_ne_bytes());
    out.extend_from_slice(r.matches.get(src));
    match &r.target {
        Target::Raw(b) => out.extend_from_slice(b.get(src)),
        Target::Standard(v) => {
            let verdict: i32 = match v {
                Verdict::Accept => V_ACCEPT,
                Verdict::Drop => V_DROP,
                Verdict::Queue => V_QUEUE,
                Verdict::Return => V_RETURN,
                Verdict::Fallthrough => i32::try_from(at + next).map_err(|_| big())?,
                Verdict::Jump(c) => i32::try_from(start[*c]).map_err(|_| big())?,
            };
            let mut t = [0u8; STD_TGT];
            t[..2].copy_from_slice(&u16::try_from(STD_TGT).unwrap_or(0).to_ne_bytes());
            t[TGT_HDR..TGT_HDR + 4].copy_from_slice(&verdict.to_ne_bytes());
            out.extend_from_slice(&t);
        }
    }
    old.push(r.old);
    Ok(())
}
