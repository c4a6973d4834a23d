//! The `iptables-restore --noflush` subset hako's renderer writes, parsed into per-table
//! operations with each rule already encoded as ip_tables bytes, and applied onto a decoded
//! [`Table`] with restore's semantics. Pure.
//!
//! Lines: `*table`, `:CHAIN POLICY [p:b]` (declares a user chain, or flushes it when it
//! exists; sets a built-in chain's policy unless `-`), `-A CHAIN rule`, `-I CHAIN [n] rule`,
//! `-X CHAIN`, `COMMIT`, comments and blank lines. Rules: `-s/-d [!]`, `-i/-o [!]`,
//! `-p [!]`, matches comment, tcp/udp/sctp `--dport`, addrtype (rev 1), mark (rev 1),
//! conntrack `--ctstate` (rev 3), statistic `--mode random --probability`, recent (rev 1);
//! targets chains (`-j`/`-g`), ACCEPT, DROP, RETURN, QUEUE, MARK (rev 2), MASQUERADE, DNAT
//! (rev 2), REJECT. Anything else is an error naming the line.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use super::blob::{self, align, Rule, Table, Target, Verdict, CHAIN_MAXLEN, F_GOTO, IP, TGT_HDR};

/// A line the parser does not take, or an operation the table refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A payload line outside the subset.
    #[error("line {line}: {why}: {text}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// An operation restore would refuse (missing chain, chain in use…).
    #[error("table {table}: line {line}: {why}")]
    Apply {
        /// Table.
        table: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// A rule's target before chain names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecTarget {
    /// No `-j`.
    None,
    /// ACCEPT, DROP, QUEUE, RETURN.
    Verdict(Verdict),
    /// A user chain (`-j`, or `-g` with the goto flag).
    Chain(String),
    /// An extension target's bytes.
    Raw(Vec<u8>),
}

/// A parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// `struct ipt_ip`.
    pub ip: [u8; IP],
    /// Match bytes.
    pub matches: Vec<u8>,
    /// Target.
    pub target: SpecTarget,
}

/// One operation on a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `:CHAIN POLICY`.
    Declare {
        /// Chain.
        chain: String,
        /// New policy of a built-in chain.
        policy: Option<Verdict>,
    },
    /// `-A`.
    Append {
        /// Chain.
        chain: String,
        /// Rule.
        rule: Spec,
    },
    /// `-I` at a 1-based position.
    Insert {
        /// Chain.
        chain: String,
        /// Position.
        pos: usize,
        /// Rule.
        rule: Spec,
    },
    /// `-I` unless the same rule is in the chain already (`iptables -C || iptables -I`).
    Ensure {
        /// Chain.
        chain: String,
        /// Rule.
        rule: Spec,
    },
    /// `-X`.
    Delete(String),
}

/// The operations of one `*table` … `COMMIT` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Section {
    /// Table name.
    pub table: String,
    /// Operations with their line numbers.
    pub ops: Vec<(usize, Op)>,
}

/// Splits a line into words as iptables-restore does: whitespace outside double quotes,
/// backslash escaping a quote inside them. Words are borrowed from the line unless quotes
/// had to be taken out of their middle.
fn words(line: &str) -> Result<Vec<Cow<'_, str>>, String> {
    let mut out = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let mut q = false;
        let mut quotes = 0usize;
        let mut escaped = false;
        while i < b.len() && (q || !b[i].is_ascii_whitespace()) {
            match b[i] {
                b'\\' if q && b.get(i + 1) == Some(&b'"') => {
                    escaped = true;
                    i += 1;
                }
                b'"' => {
                    q = !q;
                    quotes += 1;
                }
                _ => {}
            }
            i += 1;
        }
        if q {
            return Err("unterminated quote".into());
        }
        let word = &line[start..i];
        if quotes == 0 {
            out.push(Cow::Borrowed(word));
        } else if quotes == 2 && !escaped && word.starts_with('"') && word.ends_with('"') {
            out.push(Cow::Borrowed(&word[1..word.len() - 1]));
        } else {
            let mut cur = String::with_capacity(word.len());
            let mut it = word.chars().peekable();
            let mut inq = false;
            while let Some(c) = it.next() {
                match c {
                    '\\' if inq && it.peek() == Some(&'"') => {
                        cur.push('"');
                        it.next();
                    }
                    '"' => inq = !inq,
                    c => cur.push(c),
                }
            }
            out.push(Cow::Owned(cur));
        }
    }
    Ok(out)
}

/// [`words`], owned (for tests).
#[cfg(test)]
pub(crate) fn words_for_test(line: &str) -> Result<Vec<String>, String> {
    Ok(words(line)?.into_iter().map(Cow::into_owned).collect())
}

/// Parses a payload into its sections.
pub fn parse(text: &str) -> Result<Vec<Section>, RuleError> {
    let mut out = Vec::new();
    let mut cur: Option<Section> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let err = |why: &str| RuleError::Parse {
            line: n,
            text: line.to_string(),
            why: why.to_string(),
        };
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some(t) = l.strip_prefix('*') {
            if cur.is_some() {
                return Err(err("table without COMMIT before it"));
            }
            if t.is_empty() || t.len() >= 32 {
                return Err(err("bad table name"));
            }
            cur = Some(Section {
                table: t.to_string(),
                ops: Vec::new(),
            });
            continue;
        }
        let Some(sec) = cur.as_mut() else {
            return Err(err("outside a table"));
        };
        if l == "COMMIT" {
            out.extend(cur.take());
            continue;
        }
        if let Some(d) = l.strip_prefix(':') {
            let w: Vec<&str> = d.split_whitespace().collect();
            let (Some(chain), Some(policy)) = (w.first(), w.get(1)) else {
                return Err(err("chain declaration without policy"));
            };
            check_chain_name(chain).map_err(|e| err(&e))?;
            let policy = match *policy {
                "-" => None,
                "ACCEPT" => Some(Verdict::Accept),
                "DROP" => Some(Verdict::Drop),
                _ => return Err(err("bad policy")),
            };
            sec.ops.push((
                n,
                Op::Declare {
                    chain: (*chain).to_string(),
                    policy,
                },
            ));
            continue;
        }
        let w = words(l).map_err(|e| err(&e))?;
        let op = match w.first().map(AsRef::as_ref) {
            Some("-A" | "--append") => {
                let chain = w.get(1).ok_or_else(|| err("no chain"))?.to_string();
                Op::Append {
                    chain,
                    rule: parse_rule(&w[2..]).map_err(|e| err(&e))?,
                }
            }
            Some("-I" | "--insert") => {
                let chain = w.get(1).ok_or_else(|| err("no chain"))?.to_string();
                let (pos, rest) = match w.get(2).and_then(|p| p.parse::<usize>().ok()) {
                    Some(p) if p >= 1 => (p, &w[3..]),
                    Some(_) => return Err(err("bad rule number")),
                    None => (1, &w[2..]),
                };
                Op::Insert {
                    chain,
                    pos,
                    rule: parse_rule(rest).map_err(|e| err(&e))?,
                }
            }
            Some("-X" | "--delete-chain") if w.len() == 2 => Op::Delete(w[1].to_string()),
            _ => return Err(err("unsupported command")),
        };
        sec.ops.push((n, op));
    }
    if let Some(s) = cur {
        return Err(RuleError::Parse {
            line: text.lines().count(),
            text: format!("*{}", s.table),
            why: "table without COMMIT".into(),
        });
    }
    Ok(out)
}

fn check_chain_name(c: &str) -> Result<(), String> {
    if c.is_empty() || c.len() > CHAIN_MAXLEN || c.starts_with('-') || c.starts_with('!') {
        return Err(format!("bad chain name {c:?}"));
    }
    Ok(())
}

/// A match's bytes: header (size, name, revision) and `data` padded to `XT_ALIGN`.
fn xt_obj(name: &str, rev: u8, data: &[u8]) -> Vec<u8> {
    let size = align(TGT_HDR + data.len());
    let mut b = vec![0u8; size];
    b[..2].copy_from_slice(&u16::try_from(size).unwrap_or(0).to_ne_bytes());
    b[2..2 + name.len()].copy_from_slice(name.as_bytes());
    b[31] = rev;
    b[TGT_HDR..TGT_HDR + data.len()].copy_from_slice(data);
    b
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (a, m) = s.split_once('/').map_or((s, None), |(a, m)| (a, Some(m)));
    let addr: Ipv4Addr = a.parse().map_err(|_| format!("bad address {s:?}"))?;
    let mask = match m {
        None => Ipv4Addr::BROADCAST,
        Some(m) => match m.parse::<u32>() {
            Ok(n) if n <= 32 => Ipv4Addr::from(u32::MAX.checked_shl(32 - n).unwrap_or(0)),
            _ => m.parse().map_err(|_| format!("bad mask {s:?}"))?,
        },
    };
    Ok((Ipv4Addr::from(u32::from(addr) & u32::from(mask)), mask))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|_| format!("bad number {s:?}"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("bad port {s:?}"))
}

/// `value[/mask]` with mask all ones by default.
fn parse_mark(s: &str) -> Result<(u32, u32), String> {
    match s.split_once('/') {
        Some((v, m)) => Ok((parse_u32(v)?, parse_u32(m)?)),
        None => Ok((parse_u32(s)?, u32::MAX)),
    }
}

fn proto_num(p: &str) -> Result<u16, String> {
    Ok(match p {
        "all" | "0" => 0,
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        p => p.parse().map_err(|_| format!("unknown protocol {p:?}"))?,
    })
}

fn addrtype(s: &str) -> Result<u16, String> {
    let mut v = 0u16;
    for t in s.split(',') {
        let bit = match t {
            "UNSPEC" => 0,
            "UNICAST" => 1,
            "LOCAL" => 2,
            "BROADCAST" => 3,
            "ANYCAST" => 4,
            "MULTICAST" => 5,
            "BLACKHOLE" => 6,
            "UNREACHABLE" => 7,
            "PROHIBIT" => 8,
            "THROW" => 9,
            "NAT" => 10,
            "XRESOLVE" => 11,
            _ => return Err(format!("unknown address type {t:?}")),
        };
        v |= 1 << bit;
    }
    Ok(v)
}

fn ctstates(s: &str) -> Result<u16, String> {
    let mut v = 0u16;
    for t in s.split(',') {
        v |= match t {
            "INVALID" => 1 << 0,
            "ESTABLISHED" => 1 << 1,
            "RELATED" => 1 << 2,
            "NEW" => 1 << 3,
            "SNAT" => 1 << 6,
            "DNAT" => 1 << 7,
            "UNTRACKED" => 1 << 8,
            _ => return Err(format!("unknown conntrack state {t:?}")),
        };
    }
    Ok(v)
}

/// The match being built and its data.
enum Building {
    Comment(Vec<u8>),
    Ports {
        name: &'static str,
        dport: Option<u16>,
        inv: bool,
    },
    Addrtype([u8; 8]),
    Mark([u8; 12]),
    Conntrack([u8; 164]),
    Statistic {
        random: bool,
        p: Option<f64>,
    },
    Recent(Box<[u8; 228]>),
}

impl Building {
    fn new(name: &str) -> Result<Self, String> {
        Ok(match name {
            "comment" => Self::Comment(Vec::new()),
            "tcp" => Self::Ports {
                name: "tcp",
                dport: None,
                inv: false,
            },
            "udp" => Self::Ports {
                name: "udp",
                dport: None,
                inv: false,
            },
            "sctp" => Self::Ports {
                name: "sctp",
                dport: None,
                inv: false,
            },
            "addrtype" => Self::Addrtype([0; 8]),
            "mark" => Self::Mark([0; 12]),
            "conntrack" => Self::Conntrack([0; 164]),
            "statistic" => Self::Statistic {
                random: false,
                p: None,
            },
            "recent" => {
                let mut b = Box::new([0u8; 228]);
                // libxt_recent's defaults: name DEFAULT, source side, mask all ones.
                b[10..17].copy_from_slice(b"DEFAULT");
                b[212..216].copy_from_slice(&[0xff; 4]);
                Self::Recent(b)
            }
            m => return Err(format!("unsupported match {m:?}")),
        })
    }

    /// Takes `--opt` (its value from `next`); `inv` when a `!` came before it.
    fn option(
        &mut self,
        opt: &str,
        inv: bool,
        next: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<(), String> {
        let no_inv = |ok: bool| {
            if inv && !ok {
                Err(format!("! not supported before {opt}"))
            } else {
                Ok(())
            }
        };
        match (self, opt) {
            (Self::Comment(c), "--comment") => {
                no_inv(false)?;
                let v = next()?;
                if v.len() > 255 {
                    return Err("comment longer than 255 characters".into());
                }
                *c = v.into_bytes();
            }
            (Self::Ports { dport, inv: i, .. }, "--dport" | "--destination-port") => {
                *dport = Some(parse_port(&next()?)?);
                *i = inv;
            }
            (Self::Addrtype(b), "--src-type" | "--dst-type") => {
                let v = addrtype(&next()?)?;
                if opt == "--src-type" {
                    put16(b, 0, v);
                    b[4] |= u8::from(inv);
                } else {
                    put16(b, 2, v);
                    b[4] |= 2 * u8::from(inv);
                }
            }
            (Self::Mark(b), "--mark") => {
                let (v, m) = parse_mark(&next()?)?;
                put32(b, 0, v);
                put32(b, 4, m);
                b[8] = u8::from(inv);
            }
            (Self::Conntrack(b), "--ctstate") => {
                let s = ctstates(&next()?)?;
                // match_flags at 146, invert_flags at 148, state_mask at 150.
                let flags = u16::from_ne_bytes([b[146], b[147]]) | 1;
                put16(b, 146, flags);
                if inv {
                    let f = u16::from_ne_bytes([b[148], b[149]]) | 1;
                    put16(b, 148, f);
                }
                put16(b, 150, s);
            }
            (Self::Statistic { random, .. }, "--mode") => {
                no_inv(false)?;
                if next()? != "random" {
                    return Err("statistic: only --mode random".into());
                }
                *random = true;
            }
            (Self::Statistic { p, .. }, "--probability") => {
                no_inv(false)?;
                let v: f64 = next()?.parse().map_err(|_| "bad probability".to_string())?;
                if !(0.0..=1.0).contains(&v) {
                    return Err("probability out of range".into());
                }
                *p = Some(v);
            }
            (Self::Recent(b), o) => {
                // seconds 0, hit_count 4, check_set 8, invert 9, name 10..210, side 210,
                // mask 212..228.
                match o {
                    "--set" | "--rcheck" | "--update" | "--remove" => {
                        let bit = match o {
                            "--rcheck" => 1,
                            "--set" => 2,
                            "--update" => 4,
                            _ => 8,
                        };
                        if b[8] & 0x0f != 0 {
                            return Err("recent: one of --set/--rcheck/--update/--remove".into());
                        }
                        b[8] |= bit;
                        b[9] = u8::from(inv);
                    }
                    "--seconds" => {
                        no_inv(false)?;
                        put32(&mut b[..], 0, parse_u32(&next()?)?);
                    }
                    "--reap" => {
                        no_inv(false)?;
                        b[8] |= 32;
                    }
                    "--name" => {
                        no_inv(false)?;
                        let v = next()?;
                        if v.is_empty() || v.len() >= 200 {
                            return Err("recent: bad name".into());
                        }
                        // As libxt_recent: the name and its NUL over the default
                        // ("DEFAULT"), whatever follows left as it is.
                        b[10..10 + v.len()].copy_from_slice(v.as_bytes());
                        b[10 + v.len()] = 0;
                    }
                    "--mask" => {
                        no_inv(false)?;
                        let m: Ipv4Addr = next()?
                            .parse()
                            .map_err(|_| "recent: bad mask".to_string())?;
                        b[212..228].fill(0);
                        b[212..216].copy_from_slice(&m.octets());
                    }
                    "--rsource" => b[210] = 0,
                    "--rdest" => b[210] = 1,
                    _ => return Err(format!("unsupported option {o}")),
                }
            }
            (_, o) => return Err(format!("unsupported option {o}")),
        }
        Ok(())
    }

    fn finish(self, proto: u16) -> Result<Vec<u8>, String> {
        Ok(match self {
            Self::Comment(c) => {
                let mut d = [0u8; 256];
                d[..c.len()].copy_from_slice(&c);
                xt_obj("comment", 0, &d)
            }
            Self::Ports { name, dport, inv } => {
                let want = match name {
                    "tcp" => 6,
                    "udp" => 17,
                    _ => 132,
                };
                if proto != want {
                    return Err(format!("-m {name} needs -p {name}"));
                }
                let (lo, hi) = dport.map_or((0, u16::MAX), |p| (p, p));
                match name {
                    "tcp" => {
                        let mut d = [0u8; 12];
                        put16(&mut d, 2, u16::MAX);
                        put16(&mut d, 4, lo);
                        put16(&mut d, 6, hi);
                        d[11] = if inv { 0x02 } else { 0 };
                        xt_obj("tcp", 0, &d)
                    }
                    "udp" => {
                        let mut d = [0u8; 10];
                        put16(&mut d, 2, u16::MAX);
                        put16(&mut d, 4, lo);
                        put16(&mut d, 6, hi);
                        d[8] = if inv { 0x02 } else { 0 };
                        xt_obj("udp", 0, &d)
                    }
                    _ => {
                        // dpts at 0, spts at 4 (libxt_sctp leaves them 0), chunkmap 8..264,
                        // chunk_match_type 264, flag_info 268, flag_count 280, flags 284,
                        // invflags 288.
                        let mut d = [0u8; 292];
                        // libxt_sctp's init: every flag_info's chunktype 0xff.
                        for k in 0..4 {
                            d[268 + 3 * k] = 0xff;
                        }
                        if let Some(p) = dport {
                            put16(&mut d, 0, p);
                            put16(&mut d, 2, p);
                            put32(&mut d, 284, 0x02);
                            if inv {
                                put32(&mut d, 288, 0x02);
                            }
                        }
                        xt_obj("sctp", 0, &d)
                    }
                }
            }
            Self::Addrtype(d) => xt_obj("addrtype", 1, &d),
            Self::Mark(d) => xt_obj("mark", 1, &d),
            Self::Conntrack(d) => xt_obj("conntrack", 3, &d),
            Self::Statistic { random, p } => {
                let (true, Some(p)) = (random, p) else {
                    return Err("statistic: needs --mode random --probability".into());
                };
                let mut d = [0u8; 24];
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let v = (p * f64::from(0x8000_0000u32)).round() as u32;
                put32(&mut d, 4, v);
                // libxt_statistic sets u.nth.count = every - packet whatever the mode.
                put32(&mut d, 12, v);
                xt_obj("statistic", 0, &d)
            }
            Self::Recent(d) => {
                if d[8] & 0x0f == 0 {
                    return Err("recent: needs --set, --rcheck, --update or --remove".into());
                }
                xt_obj("recent", 1, &d[..])
            }
        })
    }
}

/// Encodes a target extension with its options.
fn target(name: &str, opts: &[(bool, String, Option<String>)]) -> Result<Vec<u8>, String> {
    let get =
        |o: &str| -> Option<Option<String>> { opts.iter().find(|x| x.1 == o).map(|x| x.2.clone()) };
    let known: &[&str] = match name {
        "MARK" => &[
            "--or-mark",
            "--xor-mark",
            "--set-xmark",
            "--set-mark",
            "--and-mark",
        ],
        "MASQUERADE" => &["--random-fully"],
        "DNAT" => &["--to-destination"],
        "REJECT" => &["--reject-with"],
        _ => &[],
    };
    for (inv, o, _) in opts {
        if *inv || !known.contains(&o.as_str()) {
            return Err(format!("{name}: unsupported option {o}"));
        }
    }
    if opts.len() > 1 && name != "MASQUERADE" {
        return Err(format!("{name}: one option only"));
    }
    Ok(match name {
        "MARK" => {
            let (o, v) = opts
                .first()
                .map(|x| (x.1.as_str(), x.2.clone().unwrap_or_default()))
                .ok_or("MARK: no option")?;
            let (mark, mask) = match o {
                "--set-xmark" => parse_mark(&v)?,
                "--set-mark" => {
                    let (m, k) = parse_mark(&v)?;
                    (m, m | k)
                }
                "--or-mark" => {
                    let m = parse_u32(&v)?;
                    (m, m)
                }
                "--xor-mark" => (parse_u32(&v)?, 0),
                _ => (0, !parse_u32(&v)?),
            };
            let mut d = [0u8; 8];
            put32(&mut d, 0, mark);
            put32(&mut d, 4, mask);
            xt_obj("MARK", 2, &d)
        }
        "MASQUERADE" => {
            let mut d = [0u8; 20];
            put32(&mut d, 0, 1);
            if get("--random-fully").is_some() {
                put32(&mut d, 4, 1 << 4);
            }
            xt_obj("MASQUERADE", 0, &d)
        }
        "DNAT" => {
            let v = get("--to-destination")
                .flatten()
                .ok_or("DNAT: needs --to-destination")?;
            let (ip, port) = match v.split_once(':') {
                Some((i, p)) => (i, Some(parse_port(p)?)),
                None => (v.as_str(), None),
            };
            let ip: Ipv4Addr = ip.parse().map_err(|_| format!("DNAT: bad address {v:?}"))?;
            // flags 0, min_addr 4, max_addr 20, min_proto 36, max_proto 38, base_proto 40.
            let mut d = [0u8; 44];
            let mut flags = 1;
            d[4..8].copy_from_slice(&ip.octets());
            d[20..24].copy_from_slice(&ip.octets());
            if let Some(p) = port {
                flags |= 2;
                d[36..38].copy_from_slice(&p.to_be_bytes());
                d[38..40].copy_from_slice(&p.to_be_bytes());
            }
            put32(&mut d, 0, flags);
            xt_obj("DNAT", 2, &d)
        }
        "REJECT" => {
            let with = match get("--reject-with").flatten().as_deref() {
                None | Some("icmp-port-unreachable" | "port-unreach") => 3u32,
                Some("icmp-net-unreachable" | "net-unreach") => 0,
                Some("icmp-host-unreachable" | "host-unreach") => 1,
                Some("icmp-proto-unreachable" | "proto-unreach") => 2,
                Some("icmp-net-prohibited" | "net-prohib") => 5,
                Some("icmp-host-prohibited" | "host-prohib") => 6,
                Some("tcp-reset" | "tcp-rst") => 7,
                Some("icmp-admin-prohibited" | "admin-prohib") => 8,
                Some(o) => return Err(format!("REJECT: unsupported --reject-with {o}")),
            };
            xt_obj("REJECT", 0, &with.to_ne_bytes())
        }
        n => return Err(format!("unsupported target {n}")),
    })
}

/// Options of targets that take a value.
fn target_takes_value(o: &str) -> bool {
    o != "--random-fully"
}

/// Parses a rule's words (after `-A CHAIN`).
pub fn parse_rule<S: AsRef<str>>(w: &[S]) -> Result<Spec, String> {
    let mut ip = [0u8; IP];
    let mut proto = 0u16;
    let mut matches = Vec::new();
    let mut cur: Option<Building> = None;
    let mut tgt: Option<(String, bool)> = None;
    let mut topts: Vec<(bool, String, Option<String>)> = Vec::new();
    let mut inv = false;
    let mut seen = [false; 5];
    let mut i = 0;
    let take = |i: &mut usize| -> Result<String, String> {
        *i += 1;
        w.get(*i)
            .map(|v| v.as_ref().to_string())
            .ok_or_else(|| format!("{} needs a value", w[*i - 1].as_ref()))
    };
    let once = |seen: &mut [bool; 5], k: usize, o: &str| {
        if seen[k] {
            Err(format!("{o} given twice"))
        } else {
            seen[k] = true;
            Ok(())
        }
    };
    while i < w.len() {
        let o = w[i].as_ref();
        if o == "!" {
            if inv {
                return Err("! twice".into());
            }
            inv = true;
            i += 1;
            continue;
        }
        match o {
            "-s" | "--source" | "-d" | "--destination" => {
                let src = o == "-s" || o == "--source";
                once(&mut seen, usize::from(!src), o)?;
                let (a, m) = parse_cidr(&take(&mut i)?)?;
                let at = if src { 0 } else { 4 };
                ip[at..at + 4].copy_from_slice(&a.octets());
                ip[at + 8..at + 12].copy_from_slice(&m.octets());
                if inv {
                    ip[83] |= if src { 0x08 } else { 0x10 };
                }
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let inp = o.starts_with("-i") || o == "--in-interface";
                once(&mut seen, if inp { 2 } else { 3 }, o)?;
                let name = take(&mut i)?;
                if name.is_empty() || name.len() >= 16 {
                    return Err(format!("bad interface {name:?}"));
                }
                let (at, mat) = if inp { (16, 48) } else { (32, 64) };
                ip[at..at + name.len()].copy_from_slice(name.as_bytes());
                let ones = match name.strip_suffix('+') {
                    Some(p) => p.len(),
                    None => name.len() + 1,
                };
                ip[mat..mat + ones].fill(0xff);
                if inv {
                    ip[83] |= if inp { 0x01 } else { 0x02 };
                }
            }
            "-p" | "--protocol" => {
                once(&mut seen, 4, o)?;
                proto = proto_num(&take(&mut i)?)?;
                ip[80..82].copy_from_slice(&proto.to_ne_bytes());
                if inv {
                    ip[83] |= 0x40;
                }
            }
            "-m" | "--match" => {
                if inv {
                    return Err("! before -m".into());
                }
                if tgt.is_some() {
                    return Err("-m after the target".into());
                }
                if let Some(b) = cur.take() {
                    pending_matches(&mut matches, b);
                }
                cur = Some(Building::new(&take(&mut i)?)?);
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                if inv || tgt.is_some() {
                    return Err("bad target".into());
                }
                if let Some(b) = cur.take() {
                    pending_matches(&mut matches, b);
                }
                tgt = Some((take(&mut i)?, o == "-g" || o == "--goto"));
            }
            o if o.starts_with("--") => {
                if tgt.is_some() {
                    let v = if target_takes_value(o) {
                        Some(take(&mut i)?)
                    } else {
                        None
                    };
                    topts.push((inv, o.to_string(), v));
                } else {
                    let Some(b) = cur.as_mut() else {
                        return Err(format!("option {o} without a match"));
                    };
                    let mut j = i;
                    b.option(o, inv, &mut || take(&mut j))?;
                    i = j;
                }
            }
            o => return Err(format!("unexpected {o:?}")),
        }
        inv = false;
        i += 1;
    }
    if inv {
        return Err("trailing !".into());
    }
    if let Some(b) = cur.take() {
        pending_matches(&mut matches, b);
    }
    // Matches were kept as builders until -p was known: encode now.
    let mut bytes = Vec::new();
    for b in matches {
        bytes.extend(b.finish(proto)?);
    }
    let target = match tgt {
        None => {
            if !topts.is_empty() {
                return Err("target options without a target".into());
            }
            SpecTarget::None
        }
        Some((t, goto)) => {
            let verdict = match t.as_str() {
                "ACCEPT" => Some(Verdict::Accept),
                "DROP" => Some(Verdict::Drop),
                "QUEUE" => Some(Verdict::Queue),
                "RETURN" => Some(Verdict::Return),
                _ => None,
            };
            let ext = matches!(t.as_str(), "MARK" | "MASQUERADE" | "DNAT" | "REJECT");
            if goto {
                if verdict.is_some() || ext || !topts.is_empty() {
                    return Err(format!("-g {t}: goto needs a chain"));
                }
                ip[82] |= F_GOTO;
                SpecTarget::Chain(t)
            } else if let Some(v) = verdict {
                if !topts.is_empty() {
                    return Err(format!("{t} takes no options"));
                }
                SpecTarget::Verdict(v)
            } else if ext {
                SpecTarget::Raw(target(&t, &topts)?)
            } else {
                if !topts.is_empty() {
                    return Err(format!("unsupported target {t}"));
                }
                check_chain_name(&t)?;
                SpecTarget::Chain(t)
            }
        }
    };
    Ok(Spec {
        ip,
        matches: bytes,
        target,
    })
}

fn pending_matches(v: &mut Vec<Building>, b: Building) {
    v.push(b);
}

/// A table being changed, with the references to each chain.
pub struct Editor {
    /// The table.
    pub table: Table,
    refs: Vec<u32>,
}

impl Editor {
    /// Starts editing `table`.
    pub fn new(table: Table) -> Self {
        let mut refs = vec![0u32; table.chains.len()];
        for c in &table.chains {
            for r in &c.rules {
                if let Some(j) = r.jump() {
                    refs[j] += 1;
                }
            }
        }
        Self { table, refs }
    }

    fn rule(&self, spec: Spec) -> Result<Rule, String> {
        let target = match spec.target {
            SpecTarget::None => Target::Standard(Verdict::Fallthrough),
            SpecTarget::Verdict(v) => Target::Standard(v),
            SpecTarget::Raw(b) => Target::Raw(blob::Bytes::Own(b)),
            SpecTarget::Chain(c) => {
                let i = self
                    .table
                    .chain(&c)
                    .ok_or_else(|| format!("no chain/target/match by the name {c}"))?;
                if self.table.chains[i].hook.is_some() {
                    return Err(format!("cannot jump to built-in chain {c}"));
                }
                Target::Standard(Verdict::Jump(i))
            }
        };
        let mut r = Rule::new(target);
        r.ip = spec.ip;
        r.matches = blob::Bytes::Own(spec.matches);
        Ok(r)
    }

    fn chain_of(&self, c: &str) -> Result<usize, String> {
        self.table
            .chain(c)
            .ok_or_else(|| format!("no chain by the name {c}"))
    }

    fn add_ref(&mut self, r: &Rule) {
        if let Some(j) = r.jump() {
            if j >= self.refs.len() {
                self.refs.resize(j + 1, 0);
            }
            self.refs[j] += 1;
        }
    }

    /// Applies one operation.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        self.apply_owned_op(op.clone())
    }

    /// Applies one operation, its rule moved into the table.
    pub fn apply_owned_op(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Declare { chain, policy } => match self.table.chain(&chain) {
                Some(i) if self.table.chains[i].hook.is_some() => {
                    if let Some(p) = policy {
                        let t = &mut self.table.chains[i].tail;
                        t.target = Target::Standard(p);
                        t.counters = [0; 2];
                        t.old = None;
                    }
                }
                Some(i) => {
                    if policy.is_some() {
                        return Err(format!("cannot set the policy of user chain {chain}"));
                    }
                    for r in std::mem::take(&mut self.table.chains[i].rules) {
                        if let Some(j) = r.jump() {
                            self.refs[j] -= 1;
                        }
                    }
                }
                None => {
                    if policy.is_some() {
                        return Err(format!("{chain} is not a built-in chain"));
                    }
                    let i = self.table.add_chain(&chain);
                    self.refs.resize(i + 1, 0);
                }
            },
            Op::Append { chain, rule } => {
                let c = self.chain_of(&chain)?;
                let r = self.rule(rule)?;
                self.add_ref(&r);
                self.table.chains[c].rules.push(r);
            }
            Op::Insert { chain, pos, rule } => {
                let c = self.chain_of(&chain)?;
                let r = self.rule(rule)?;
                let rules = &self.table.chains[c].rules;
                if pos > rules.len() + 1 {
                    return Err(format!("index of insertion too big in {chain}"));
                }
                self.add_ref(&r);
                self.table.chains[c].rules.insert(pos - 1, r);
            }
            Op::Ensure { chain, rule } => {
                let c = self.chain_of(&chain)?;
                let r = self.rule(rule)?;
                let src = &self.table.src;
                if !self.table.chains[c].rules.iter().any(|x| x.same(&r, src)) {
                    self.add_ref(&r);
                    self.table.chains[c].rules.insert(0, r);
                }
            }
            Op::Delete(chain) => {
                let c = self.chain_of(&chain)?;
                let ch = &self.table.chains[c];
                if ch.hook.is_some() {
                    return Err(format!("cannot delete built-in chain {chain}"));
                }
                if self.refs.get(c).copied().unwrap_or(0) > 0 {
                    return Err(format!("chain {chain} is referenced"));
                }
                if !ch.rules.is_empty() {
                    return Err(format!("chain {chain} is not empty"));
                }
                self.table.delete_chain(c);
            }
        }
        Ok(())
    }

    /// Applies a section's operations, moving its rules into the table.
    pub fn apply_owned(&mut self, s: Section) -> Result<(), RuleError> {
        let table = s.table;
        for (line, op) in s.ops {
            self.apply_owned_op(op).map_err(|why| RuleError::Apply {
                table: table.clone(),
                line,
                why,
            })?;
        }
        Ok(())
    }

    /// Applies a section's operations.
    pub fn apply_section(&mut self, s: &Section) -> Result<(), RuleError> {
        for (line, op) in &s.ops {
            self.apply(op).map_err(|why| RuleError::Apply {
                table: s.table.clone(),
                line: *line,
                why,
            })?;
        }
        Ok(())
    }
}

/// Whether a blob's chain names include `name` (an `ERROR` head naming it), without
/// decoding the rest.
pub fn blob_has_chain(blob: &[u8], name: &str) -> bool {
    blob_user_chains(blob).any(|c| c == name.as_bytes())
}

/// The user chain names of a blob, in order.
pub fn blob_user_chains(blob: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        while off + blob::ENTRY <= blob.len() {
            let e = &blob[off..];
            let t_off = usize::from(u16::from_ne_bytes([e[88], e[89]]));
            let next = usize::from(u16::from_ne_bytes([e[90], e[91]]));
            if next == 0 || t_off + TGT_HDR > next || off + next > blob.len() {
                return None;
            }
            off += next;
            let t = &e[t_off..next];
            if blob::cstr(&t[2..31]) == b"ERROR" && t.len() > TGT_HDR {
                let n = blob::cstr(&t[TGT_HDR..]);
                if n != b"ERROR" {
                    return Some(n);
                }
            }
        }
        None
    })
}
