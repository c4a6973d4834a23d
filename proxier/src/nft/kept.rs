//! What the nftables backend keeps between syncs, as compact records. Pure.
//!
//! A partial sync must delete exactly what a changed service programmed before, so the
//! backend remembers, per service and family: its chains (name and a 64-bit hash of their
//! rules: a chain is rewritten when the hash differs), its map elements (set, key, data) and
//! its endpoint addresses (for the hairpin set's reference counts). Each service is one
//! byte record ([`Rec`]) holding its key and those three lists; set names are interned
//! ([`SetNames`]); all records live back to back in one arena with an index sorted by
//! service key ([`Kept`]), and are decoded into a [`View`] only for the services a partial
//! sync touches.
//!
//! Why an arena and not one allocation per service: what RSS shows after a full sync is
//! not the size of what is kept but the pages it pins. Anything long-lived allocated during
//! the full sync lands among the render's transient blocks, and one live block keeps its
//! whole page resident after they are freed. At 10,000 services the per-service trees (and
//! even one small box per service) pinned tens of MiB that way; the arena, the index, the
//! chain-id table ([`super::layout::Ids`], inline keys, sized before the render) and the
//! hairpin counts ([`Counts`]) are a handful of large blocks.
//!
//! Record layout (integers in native byte order):
//!
//! ```text
//! u16 namespace length, namespace, u16 name length, name
//! u32 chains,   each: u8 name length, name, u64 hash of the rules
//! u32 elements, each: u16 set id, u8 key length, key, u8 kind (0 none, 1 verdict,
//!                     2 value), u8 data length, data (verdict: code byte, chain name)
//! u8 address length, u32 addresses, each: the address bytes
//! ```

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::layout::SvcObjs;
use super::wire::{ElemData, Verdict};
use crate::model::ServiceKey;

/// A service's objects could not be recorded (a field longer than its length byte allows),
/// or a record could not be read back (never expected: records are only built here).
#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    /// A name, key or list too long for the record's length field.
    #[error("nftables state of service {service}: {what} too long to record")]
    TooLong {
        /// The service.
        service: String,
        /// What (chain name, element key, ...).
        what: &'static str,
    },
    /// More distinct set names than a set id can number.
    #[error("nftables state: more than {} set names", u16::MAX)]
    TooManySets,
    /// A record that does not decode.
    #[error("nftables state: a kept record is corrupt")]
    Corrupt,
    /// The records outgrew 4 GiB.
    #[error("nftables state: more than 4 GiB of records")]
    ArenaFull,
}

/// Set names interned to small ids: records hold the id, not the name. The layout has a
/// fixed, small number of sets (about 140), so the table never shrinks.
#[derive(Debug, Default, Clone)]
pub struct SetNames {
    names: Vec<String>,
    ids: HashMap<String, u16>,
}

impl SetNames {
    /// The id of `name`, assigned on first use.
    pub fn id(&mut self, name: &str) -> Result<u16, KeptError> {
        if let Some(i) = self.ids.get(name) {
            return Ok(*i);
        }
        let i = u16::try_from(self.names.len()).map_err(|_| KeptError::TooManySets)?;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), i);
        Ok(i)
    }

    /// The name of set `id`.
    pub fn name(&self, id: u16) -> Option<&str> {
        self.names.get(usize::from(id)).map(String::as_str)
    }
}

/// A 64-bit hash of a chain's rules (SipHash with fixed keys: stable within the process,
/// which is all the comparison of two syncs needs).
pub fn rules_hash(rules: &[super::layout::Rule]) -> u64 {
    let mut h = DefaultHasher::new();
    rules.hash(&mut h);
    h.finish()
}

const KIND_NONE: u8 = 0;
const KIND_VERDICT: u8 = 1;
const KIND_VALUE: u8 = 2;

/// The canonical bytes of element data: (kind, bytes). Two data are equal iff their
/// encodings are.
fn data_bytes(d: &ElemData, out: &mut Vec<u8>) -> u8 {
    match d {
        ElemData::None => KIND_NONE,
        ElemData::Verdict(v) => {
            out.push(match v {
                Verdict::Accept => 0,
                Verdict::Drop => 1,
                Verdict::Return => 2,
                Verdict::Jump(_) => 3,
                Verdict::Goto(_) => 4,
            });
            if let Some(t) = v.target() {
                out.extend_from_slice(t.as_bytes());
            }
            KIND_VERDICT
        }
        ElemData::Value(b) => {
            out.extend_from_slice(b);
            KIND_VALUE
        }
    }
}

/// The element data that [`data_bytes`] encoded.
pub fn decode_data(kind: u8, b: &[u8]) -> Option<ElemData> {
    match kind {
        KIND_NONE => Some(ElemData::None),
        KIND_VALUE => Some(ElemData::Value(b.to_vec())),
        KIND_VERDICT => {
            let (code, name) = b.split_first()?;
            let name = || std::str::from_utf8(name).ok().map(str::to_string);
            Some(ElemData::Verdict(match code {
                0 => Verdict::Accept,
                1 => Verdict::Drop,
                2 => Verdict::Return,
                3 => Verdict::Jump(name()?),
                4 => Verdict::Goto(name()?),
                _ => return None,
            }))
        }
        _ => None,
    }
}

/// One service's programmed objects of one family, as bytes (see the module's layout):
/// owned ([`Record`]) or borrowed from the [`Kept`] arena ([`RecordRef`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec<B>(B);

/// A record of its own (a partial sync's new records, before they join the arena).
pub type Record = Rec<Box<[u8]>>;
/// A record inside the [`Kept`] arena.
pub type RecordRef<'a> = Rec<&'a [u8]>;

struct Writer<'a> {
    b: &'a mut Vec<u8>,
    service: &'a ServiceKey,
}

impl Writer<'_> {
    fn too_long(&self, what: &'static str) -> KeptError {
        KeptError::TooLong {
            service: self.service.to_string(),
            what,
        }
    }

    fn short(&mut self, what: &'static str, v: &[u8]) -> Result<(), KeptError> {
        let n = u8::try_from(v.len()).map_err(|_| self.too_long(what))?;
        self.b.push(n);
        self.b.extend_from_slice(v);
        Ok(())
    }

    fn long(&mut self, what: &'static str, v: &[u8]) -> Result<(), KeptError> {
        let n = u16::try_from(v.len()).map_err(|_| self.too_long(what))?;
        self.b.extend_from_slice(&n.to_ne_bytes());
        self.b.extend_from_slice(v);
        Ok(())
    }

    fn count(&mut self, what: &'static str, n: usize) -> Result<(), KeptError> {
        let n = u32::try_from(n).map_err(|_| self.too_long(what))?;
        self.b.extend_from_slice(&n.to_ne_bytes());
        Ok(())
    }
}

impl Record {
    /// Records `o`, the objects of service `key`.
    pub fn encode(key: &ServiceKey, o: &SvcObjs, sets: &mut SetNames) -> Result<Self, KeptError> {
        let mut b = Vec::with_capacity(256);
        encode_into(&mut b, key, o, sets)?;
        Ok(Rec(b.into_boxed_slice()))
    }
}

/// Appends the record of `o`, the objects of service `key`, to `out` (nothing on error).
fn encode_into(
    out: &mut Vec<u8>,
    key: &ServiceKey,
    o: &SvcObjs,
    sets: &mut SetNames,
) -> Result<(), KeptError> {
    let start = out.len();
    let r = encode_fields(out, key, o, sets);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_fields(
    out: &mut Vec<u8>,
    key: &ServiceKey,
    o: &SvcObjs,
    sets: &mut SetNames,
) -> Result<(), KeptError> {
    {
        let mut w = Writer {
            b: out,
            service: key,
        };
        w.long("namespace", key.namespace.as_bytes())?;
        w.long("name", key.name.as_bytes())?;
        w.count("chain list", o.chains.len())?;
        for (name, rules) in &o.chains {
            w.short("chain name", name.as_bytes())?;
            w.b.extend_from_slice(&rules_hash(rules).to_ne_bytes());
        }
        w.count("element list", o.elems.len())?;
        let mut data = Vec::new();
        for ((set, k), d) in &o.elems {
            w.b.extend_from_slice(&sets.id(set)?.to_ne_bytes());
            w.short("element key", k)?;
            data.clear();
            let kind = data_bytes(d, &mut data);
            w.b.push(kind);
            w.short("element data", &data)?;
        }
        let alen = o.endpoint_ips.first().map_or(0, Vec::len);
        if o.endpoint_ips.iter().any(|ip| ip.len() != alen) {
            return Err(w.too_long("endpoint address (mixed lengths)"));
        }
        w.b.push(u8::try_from(alen).map_err(|_| w.too_long("endpoint address"))?);
        w.count("address list", o.endpoint_ips.len())?;
        for ip in o.endpoint_ips.iter() {
            w.b.extend_from_slice(ip);
        }
        Ok(())
    }
}

impl<B: AsRef<[u8]>> Rec<B> {
    /// Bytes held (for tests and figures).
    pub fn len(&self) -> usize {
        self.0.as_ref().len()
    }

    /// Whether the record is empty (never: a record holds at least its key).
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_empty()
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.0.as_ref()
    }

    /// The service key as (namespace, name) bytes; empty slices if the record is corrupt.
    fn key(&self) -> (&[u8], &[u8]) {
        record_key(self.0.as_ref())
    }

    /// The lists, decoded.
    pub fn view(&self) -> Result<View<'_>, KeptError> {
        view_of(self.0.as_ref()).ok_or(KeptError::Corrupt)
    }
}

impl<'a> RecordRef<'a> {
    /// The lists, decoded, borrowing the arena (not this handle).
    pub fn into_view(self) -> Result<View<'a>, KeptError> {
        view_of(self.0).ok_or(KeptError::Corrupt)
    }
}

/// The lists of record bytes.
fn view_of(b: &[u8]) -> Option<View<'_>> {
    {
        let mut r = Reader { b };
        r.long()?;
        r.long()?;
        let n = r.count()?;
        let mut chains = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let name = std::str::from_utf8(r.short()?).ok()?;
            let hash = u64::from_ne_bytes(r.take(8)?.try_into().ok()?);
            chains.push((name, hash));
        }
        let n = r.count()?;
        let mut elems = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let set = u16::from_ne_bytes(r.take(2)?.try_into().ok()?);
            let key = r.short()?;
            let kind = *r.take(1)?.first()?;
            let data = r.short()?;
            elems.push(ElemRef {
                set,
                key,
                kind,
                data,
            });
        }
        let alen = usize::from(*r.take(1)?.first()?);
        let n = r.count()?;
        let mut ips = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            ips.push(r.take(alen)?);
        }
        r.b.is_empty().then_some(View { chains, elems, ips })
    }
}

/// The service key of record bytes as (namespace, name); empty slices if they are corrupt.
fn record_key(b: &[u8]) -> (&[u8], &[u8]) {
    let mut r = Reader { b };
    match (r.long(), r.long()) {
        (Some(ns), Some(n)) => (ns, n),
        _ => (&[], &[]),
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }

    fn short(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(*self.take(1)?.first()?);
        self.take(n)
    }

    fn long(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(u16::from_ne_bytes(self.take(2)?.try_into().ok()?));
        self.take(n)
    }

    fn count(&mut self) -> Option<usize> {
        let n = u32::from_ne_bytes(self.take(4)?.try_into().ok()?);
        usize::try_from(n).ok()
    }
}

/// One element of a [`View`]: set id, key, data kind and canonical data bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ElemRef<'a> {
    /// Set id ([`SetNames`]).
    pub set: u16,
    /// Key bytes.
    pub key: &'a [u8],
    /// Data kind.
    pub kind: u8,
    /// Data bytes (see [`decode_data`]).
    pub data: &'a [u8],
}

/// A record's lists, borrowed from it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct View<'a> {
    /// Chains: name and hash of the rules, in name order.
    pub chains: Vec<(&'a str, u64)>,
    /// Map elements.
    pub elems: Vec<ElemRef<'a>>,
    /// Endpoint addresses, sorted.
    pub ips: Vec<&'a [u8]>,
}

/// What a partial sync changes for one service: the difference of two views.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff<'a> {
    /// Chains to create (new names).
    pub add_chains: Vec<&'a str>,
    /// Chains whose rules change or that go away: flushed.
    pub flush_chains: Vec<&'a str>,
    /// Chains that go away (also in `flush_chains`): deleted after their references.
    pub del_chains: Vec<&'a str>,
    /// Chains whose (new) rules are written: new chains and changed ones.
    pub write_chains: Vec<&'a str>,
    /// Elements to delete (gone, or data changed).
    pub del_elems: Vec<ElemRef<'a>>,
    /// Elements to add (new, or data changed).
    pub add_elems: Vec<ElemRef<'a>>,
    /// Endpoint addresses no longer used by this service.
    pub gone_ips: Vec<&'a [u8]>,
    /// Endpoint addresses newly used by this service.
    pub new_ips: Vec<&'a [u8]>,
}

/// The difference from `old` (what was programmed) to `new` (what is wanted).
pub fn diff<'a>(old: &View<'a>, new: &View<'a>) -> Diff<'a> {
    let mut d = Diff::default();
    let old_chains: HashMap<&str, u64> = old.chains.iter().copied().collect();
    let new_chains: HashMap<&str, u64> = new.chains.iter().copied().collect();
    for (name, h) in &old.chains {
        match new_chains.get(name) {
            Some(n) if n == h => {}
            Some(_) => d.flush_chains.push(name),
            None => {
                d.flush_chains.push(name);
                d.del_chains.push(name);
            }
        }
    }
    for (name, h) in &new.chains {
        match old_chains.get(name) {
            Some(o) if o == h => {}
            Some(_) => d.write_chains.push(name),
            None => {
                d.add_chains.push(name);
                d.write_chains.push(name);
            }
        }
    }
    let elem_key = |e: &ElemRef<'a>| (e.set, e.key);
    let old_elems: HashMap<(u16, &[u8]), ElemRef<'a>> =
        old.elems.iter().map(|e| (elem_key(e), *e)).collect();
    let new_elems: HashMap<(u16, &[u8]), ElemRef<'a>> =
        new.elems.iter().map(|e| (elem_key(e), *e)).collect();
    for e in &old.elems {
        if new_elems.get(&elem_key(e)) != Some(e) {
            d.del_elems.push(*e);
        }
    }
    for e in &new.elems {
        if old_elems.get(&elem_key(e)) != Some(e) {
            d.add_elems.push(*e);
        }
    }
    let old_ips: std::collections::HashSet<&[u8]> = old.ips.iter().copied().collect();
    let new_ips: std::collections::HashSet<&[u8]> = new.ips.iter().copied().collect();
    d.gone_ips = old
        .ips
        .iter()
        .copied()
        .filter(|i| !new_ips.contains(i))
        .collect();
    d.new_ips = new
        .ips
        .iter()
        .copied()
        .filter(|i| !old_ips.contains(i))
        .collect();
    d
}

/// The records of every programmed service of one family: all their bytes back to back in
/// one arena, and an index of (offset, length) sorted by service key. Two allocations
/// whatever the number of services, so the kept state never pins pages of the heap that
/// a sync's transient allocations used (which is what made the per-service trees cost far
/// more RSS than their size). A partial sync appends its new records and leaves the old
/// ones as garbage until garbage outweighs the live records, then compacts.
#[derive(Debug, Default, Clone)]
pub struct Kept {
    arena: Vec<u8>,
    index: Vec<(u32, u32)>,
    garbage: usize,
}

fn key_bytes(k: &ServiceKey) -> (&[u8], &[u8]) {
    (k.namespace.as_bytes(), k.name.as_bytes())
}

fn span(start: usize, end: usize) -> Result<(u32, u32), KeptError> {
    let off = u32::try_from(start).map_err(|_| KeptError::ArenaFull)?;
    let len = u32::try_from(end - start).map_err(|_| KeptError::ArenaFull)?;
    Ok((off, len))
}

impl Kept {
    /// Records the services given in service key order (as a `BTreeMap<ServiceKey, _>`
    /// yields them).
    pub fn build<'a>(
        services: impl ExactSizeIterator<Item = (&'a ServiceKey, &'a SvcObjs)>,
        sets: &mut SetNames,
    ) -> Result<Self, KeptError> {
        let mut k = Self {
            index: Vec::with_capacity(services.len()),
            ..Self::default()
        };
        for (key, o) in services {
            let start = k.arena.len();
            encode_into(&mut k.arena, key, o, sets)?;
            k.index.push(span(start, k.arena.len())?);
        }
        k.arena.shrink_to_fit();
        Ok(k)
    }

    fn at(&self, (off, len): (u32, u32)) -> RecordRef<'_> {
        let off = off as usize;
        Rec(self.arena.get(off..off + len as usize).unwrap_or(&[]))
    }

    /// The record of `key`.
    pub fn get(&self, key: &ServiceKey) -> Option<RecordRef<'_>> {
        let k = key_bytes(key);
        self.index
            .binary_search_by(|s| self.at(*s).key().cmp(&k))
            .ok()
            .and_then(|i| self.index.get(i))
            .map(|s| self.at(*s))
    }

    /// Services recorded.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no service is recorded.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every record, in service key order.
    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> {
        self.index.iter().map(|s| self.at(*s))
    }

    /// Bytes held by the arena and the index (for tests and figures).
    pub fn bytes(&self) -> usize {
        self.arena.capacity() + self.index.capacity() * std::mem::size_of::<(u32, u32)>()
    }

    /// Replaces the records of the services in `changes` (sorted by key, each key once):
    /// `Some` sets a service's record, `None` forgets the service. One merge pass over the
    /// index; the new records are appended to the arena.
    pub fn update(&mut self, changes: Vec<(ServiceKey, Option<Record>)>) -> Result<(), KeptError> {
        if changes.is_empty() {
            return Ok(());
        }
        let old = std::mem::take(&mut self.index);
        let mut index = Vec::with_capacity(old.len() + changes.len());
        let mut old = old.into_iter().peekable();
        for (key, rec) in changes {
            let k = key_bytes(&key);
            while let Some(s) = old.next_if(|s| self.at(*s).key() < k) {
                index.push(s);
            }
            // The previous record of this key, if any, is replaced.
            if let Some(s) = old.next_if(|s| self.at(*s).key() == k) {
                self.garbage += s.1 as usize;
            }
            if let Some(r) = rec {
                let start = self.arena.len();
                self.arena.extend_from_slice(r.bytes());
                index.push(span(start, self.arena.len())?);
            }
        }
        index.extend(old);
        self.index = index;
        if self.garbage > 4096 && self.garbage > self.arena.len() / 2 {
            self.compact()?;
        }
        Ok(())
    }

    /// Copies the live records into a fresh arena.
    fn compact(&mut self) -> Result<(), KeptError> {
        let live = self.arena.len().saturating_sub(self.garbage);
        let mut arena = Vec::with_capacity(live);
        for s in &mut self.index {
            let (off, len) = (s.0 as usize, s.1 as usize);
            let start = arena.len();
            arena.extend_from_slice(self.arena.get(off..off + len).unwrap_or(&[]));
            *s = span(start, arena.len())?;
        }
        self.arena = arena;
        self.garbage = 0;
        Ok(())
    }
}

/// Reference counts of endpoint addresses (how many services of a family use each), for the
/// hairpin set: an address enters the set with its first user and leaves with its last.
/// Keys inline (no allocation per address).
#[derive(Debug, Default, Clone)]
pub struct Counts {
    v4: HashMap<[u8; 4], u32>,
    v6: HashMap<[u8; 16], u32>,
}

impl Counts {
    /// Counts every address of every record.
    pub fn of(kept: &Kept) -> Result<Self, KeptError> {
        let mut c = Self::default();
        // Sized once (at most this many distinct addresses), not grown step by step.
        let (mut n4, mut n6) = (0, 0);
        for r in kept.iter() {
            for ip in r.into_view()?.ips {
                match ip.len() {
                    4 => n4 += 1,
                    _ => n6 += 1,
                }
            }
        }
        c.v4.reserve(n4);
        c.v6.reserve(n6);
        for r in kept.iter() {
            for ip in r.into_view()?.ips {
                c.inc(ip);
            }
        }
        Ok(c)
    }

    /// One more user of `ip`; true when it is the first.
    pub fn inc(&mut self, ip: &[u8]) -> bool {
        let n = if let Ok(a) = <[u8; 4]>::try_from(ip) {
            self.v4.entry(a).or_insert(0)
        } else if let Ok(a) = <[u8; 16]>::try_from(ip) {
            self.v6.entry(a).or_insert(0)
        } else {
            return false;
        };
        *n += 1;
        *n == 1
    }

    /// One user of `ip` fewer; true when it was the last.
    pub fn dec(&mut self, ip: &[u8]) -> bool {
        fn dec_in<const N: usize>(m: &mut HashMap<[u8; N], u32>, ip: &[u8]) -> bool {
            let Ok(a) = <[u8; N]>::try_from(ip) else {
                return false;
            };
            match m.get_mut(&a) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    m.remove(&a);
                    true
                }
                None => false,
            }
        }
        dec_in(&mut self.v4, ip) || dec_in(&mut self.v6, ip)
    }

    /// How many services use `ip`.
    pub fn count(&self, ip: &[u8]) -> u32 {
        let n = if let Ok(a) = <[u8; 4]>::try_from(ip) {
            self.v4.get(&a)
        } else if let Ok(a) = <[u8; 16]>::try_from(ip) {
            self.v6.get(&a)
        } else {
            None
        };
        n.copied().unwrap_or(0)
    }

    /// Whether some service uses `ip`.
    pub fn contains(&self, ip: &[u8]) -> bool {
        self.count(ip) > 0
    }

    /// Addresses counted.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether no address is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every address counted (any order).
    pub fn addrs(&self) -> impl Iterator<Item = &[u8]> {
        self.v4
            .keys()
            .map(|a| a.as_slice())
            .chain(self.v6.keys().map(|a| a.as_slice()))
    }

    /// Gives back spare capacity.
    pub fn shrink(&mut self) {
        self.v4.shrink_to_fit();
        self.v6.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::nft::wire::Expr;

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn goto(c: &str) -> ElemData {
        ElemData::Verdict(Verdict::Goto(c.into()))
    }

    /// A service with chain `svc-x` (one rule: DNAT over `eps`) and its elements.
    fn objs(eps: &[[u8; 4]], ip_key: &[u8]) -> SvcObjs {
        let mut o = SvcObjs::default();
        o.chains.insert(
            "svc-x".into(),
            vec![vec![Expr::Numgen {
                dreg: 8,
                modulus: u32::try_from(eps.len()).unwrap_or(0),
                offset: 0,
            }]],
        );
        o.elems
            .insert(("service-ips".into(), ip_key.to_vec()), goto("svc-x"));
        for (slot, ep) in eps.iter().enumerate() {
            o.elems.insert(
                (
                    "endpoints-1".into(),
                    vec![u8::try_from(slot).unwrap_or(0), 0, 0, 0],
                ),
                ElemData::Value([&ep[..], &[0x1f, 0x90, 0, 0]].concat()),
            );
            o.endpoint_ips.insert(ep.to_vec());
        }
        o
    }

    #[test]
    fn records_round_trip() {
        let mut sets = SetNames::default();
        let o = objs(&[[10, 0, 0, 1], [10, 0, 0, 2]], &[10, 96, 0, 1]);
        let r = Record::encode(&key("ns", "a"), &o, &mut sets).expect("encode");
        let v = r.view().expect("view");
        assert_eq!(v.chains.len(), 1);
        assert_eq!(v.chains[0].0, "svc-x");
        assert_eq!(v.chains[0].1, rules_hash(&o.chains["svc-x"]));
        assert_eq!(v.ips, vec![&[10, 0, 0, 1][..], &[10, 0, 0, 2][..]]);
        let back: BTreeMap<(String, Vec<u8>), ElemData> = v
            .elems
            .iter()
            .map(|e| {
                let set = sets.name(e.set).expect("set name").to_string();
                let d = decode_data(e.kind, e.data).expect("data");
                ((set, e.key.to_vec()), d)
            })
            .collect();
        assert_eq!(back, o.elems);
        // One allocation, a few bytes per element.
        assert!(r.len() < 128, "{}", r.len());
        // A truncated record is refused, not misread.
        let cut = Rec(&r.bytes()[..r.len() - 1]);
        assert!(cut.view().is_err());
        // Names longer than their length byte are refused.
        let mut long = o.clone();
        long.chains.insert("c".repeat(300), vec![]);
        assert!(Record::encode(&key("ns", "a"), &long, &mut sets).is_err());
    }

    #[test]
    fn diff_deletes_exactly_what_is_gone() {
        let mut sets = SetNames::default();
        let k = key("ns", "a");
        let rec = |o: &SvcObjs, sets: &mut SetNames| Record::encode(&k, o, sets).expect("encode");
        let a = rec(
            &objs(&[[10, 0, 0, 1], [10, 0, 0, 2]], &[10, 96, 0, 1]),
            &mut sets,
        );
        // (case, new state, elements deleted (set, key), added, chains flushed, gone ips)
        type Case<'a> = (&'a str, Option<SvcObjs>, usize, usize, usize, Vec<Vec<u8>>);
        let cases: Vec<Case> = vec![
            (
                "unchanged",
                Some(objs(&[[10, 0, 0, 1], [10, 0, 0, 2]], &[10, 96, 0, 1])),
                0,
                0,
                0,
                vec![],
            ),
            // Slot 0 changes value (delete + add), slot 1 goes, the rule changes.
            (
                "first endpoint removed",
                Some(objs(&[[10, 0, 0, 2]], &[10, 96, 0, 1])),
                2,
                1,
                1,
                vec![vec![10, 0, 0, 1]],
            ),
            (
                "cluster IP changed",
                Some(objs(&[[10, 0, 0, 1], [10, 0, 0, 2]], &[10, 96, 0, 9])),
                1,
                1,
                0,
                vec![],
            ),
            (
                "service removed",
                None,
                3,
                0,
                1,
                vec![vec![10, 0, 0, 1], vec![10, 0, 0, 2]],
            ),
        ];
        for (what, new, del, add, flush, gone) in cases {
            let old = a.view().expect("old");
            let new_rec = new.as_ref().map(|o| rec(o, &mut sets));
            let new_view = new_rec
                .as_ref()
                .map(|r| r.view().expect("new"))
                .unwrap_or_default();
            let d = diff(&old, &new_view);
            assert_eq!(d.del_elems.len(), del, "{what}: {d:?}");
            assert_eq!(d.add_elems.len(), add, "{what}: {d:?}");
            assert_eq!(d.flush_chains.len(), flush, "{what}: {d:?}");
            assert_eq!(
                d.gone_ips,
                gone.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                "{what}"
            );
            // Applying the diff to the old elements gives exactly the new ones.
            let mut have: Vec<ElemRef> = old.elems.clone();
            have.retain(|e| !d.del_elems.contains(e));
            have.extend(d.add_elems.iter().copied());
            have.sort();
            let mut want = new_view.elems.clone();
            want.sort();
            assert_eq!(have, want, "{what}");
            if new.is_none() {
                assert_eq!(d.del_chains, ["svc-x"], "{what}");
            } else {
                assert!(d.del_chains.is_empty(), "{what}");
            }
        }
    }

    #[test]
    fn kept_records_stay_sorted_and_replace() {
        let mut sets = SetNames::default();
        let o = objs(&[[10, 0, 0, 1]], &[10, 96, 0, 1]);
        let rec = |ns: &str, n: &str, sets: &mut SetNames| {
            Record::encode(&key(ns, n), &o, sets).expect("encode")
        };
        let mut kept = Kept::default();
        kept.update(vec![
            (key("a", "x"), Some(rec("a", "x", &mut sets))),
            (key("b", "x"), Some(rec("b", "x", &mut sets))),
            (key("b", "y"), Some(rec("b", "y", &mut sets))),
        ])
        .expect("update");
        let o2 = objs(&[[10, 0, 0, 2]], &[10, 96, 0, 1]);
        let r2 = Record::encode(&key("b", "x"), &o2, &mut sets).expect("encode");
        kept.update(vec![
            (key("a", "w"), Some(rec("a", "w", &mut sets))),
            (key("b", "x"), Some(r2.clone())),
            (key("b", "y"), None),
            (key("c", "z"), None),
        ])
        .expect("update");
        assert_eq!(kept.len(), 3);
        assert!(kept.get(&key("a", "w")).is_some());
        assert!(kept.get(&key("a", "x")).is_some());
        assert_eq!(
            kept.get(&key("b", "x")).map(|r| r.bytes().to_vec()),
            Some(r2.bytes().to_vec())
        );
        assert!(kept.get(&key("b", "y")).is_none());
        assert!(kept.get(&key("c", "z")).is_none());
        let keys: Vec<_> = kept
            .iter()
            .map(|r| (r.key().0.to_vec(), r.key().1.to_vec()))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn kept_arena_compacts_its_garbage() {
        let mut sets = SetNames::default();
        let mut kept = Kept::default();
        let keys: Vec<ServiceKey> = (0..50).map(|i| key("ns", &format!("s{i:02}"))).collect();
        let o = objs(&[[10, 0, 0, 1]], &[10, 96, 0, 1]);
        let first: Vec<_> = keys
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    Some(Record::encode(k, &o, &mut sets).expect("encode")),
                )
            })
            .collect();
        kept.update(first).expect("update");
        let live = kept.bytes();
        // Every service rewritten many times: the arena stays within a few times its live size.
        for round in 0..200u8 {
            let o = objs(&[[10, 0, 1, round]], &[10, 96, 0, 1]);
            let k = &keys[usize::from(round) % keys.len()];
            let r = Record::encode(k, &o, &mut sets).expect("encode");
            kept.update(vec![(k.clone(), Some(r))]).expect("update");
        }
        assert_eq!(kept.len(), 50);
        assert!(kept.bytes() < 4 * live + 8192, "{} vs {live}", kept.bytes());
        // The last record of each service is the one kept.
        let last = kept
            .get(&keys[199 % 50])
            .expect("kept")
            .into_view()
            .expect("view");
        assert_eq!(last.ips, vec![&[10, 0, 1, 199][..]]);
        for k in &keys {
            assert!(kept.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn counts_enter_with_the_first_and_leave_with_the_last_user() {
        let mut c = Counts::default();
        assert!(c.inc(&[10, 0, 0, 1]));
        assert!(!c.inc(&[10, 0, 0, 1]));
        assert!(c.inc(&[0xfd; 16]));
        assert_eq!(c.count(&[10, 0, 0, 1]), 2);
        assert!(!c.dec(&[10, 0, 0, 1]));
        assert!(c.dec(&[10, 0, 0, 1]));
        assert!(!c.contains(&[10, 0, 0, 1]));
        assert!(!c.dec(&[10, 0, 0, 1]), "no underflow");
        assert!(c.contains(&[0xfd; 16]));
        assert!(!c.inc(&[1, 2, 3]), "odd lengths are not counted");
        assert_eq!(c.len(), 1);
    }
}
