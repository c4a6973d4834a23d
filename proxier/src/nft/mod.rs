//! Netlink-native nftables backend: the layout in [`layout`], the nf_tables encoder and
//! socket in [`wire`], and [`NftablesBackend`], which programs a full sync as one atomic batch
//! (table deleted and recreated) and a partial sync as one batch holding only the changed
//! services' chains, rules and map elements. No `nft` process runs on the sync path.

pub mod layout;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use tracing::debug;

use self::layout::{Fam, Ids, SvcObjs, CANARY_CHAIN, HAIRPIN, TABLE};
use self::wire::{Batch, ElemData, NetlinkError, Socket, NFPROTO_IPV4};
use crate::iptables::RenderOpts;
use crate::model::{Model, ServiceKey};
use crate::proxier::{Backend, SyncError, SyncStats};

/// nftables backend failures.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The kernel or the socket failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A partial sync came before any full one (the next sync is full).
    #[error("nftables: partial sync without state")]
    NoState,
    /// A service's affinity set changed its timeout, which only a full sync can apply.
    #[error("nftables: set {0} changed shape; full sync needed")]
    SetShape(String),
}

impl From<NetlinkError> for SyncError {
    fn from(e: NetlinkError) -> Self {
        SyncError::Nftables(NftError::Netlink(e))
    }
}

/// Where batches go: the kernel, or a recorder for tests.
pub trait Sink: Send {
    /// Commits one batch atomically.
    fn commit(&mut self, batch: Batch) -> Result<(), NetlinkError>;
    /// Rules in the canary chain of the `family` table (None: table or chain missing).
    fn canary_rules(&mut self, family: u8) -> Result<Option<usize>, NetlinkError>;
}

/// The kernel, through an nf_tables netlink socket opened in the calling thread's network
/// namespace on first use.
#[derive(Default)]
pub struct KernelSink {
    sock: Option<Socket>,
}

impl KernelSink {
    fn sock(&mut self) -> Result<&Socket, NetlinkError> {
        if self.sock.is_none() {
            self.sock = Some(Socket::open()?);
        }
        self.sock
            .as_ref()
            .ok_or_else(|| NetlinkError::Rejected("socket".into()))
    }
}

impl Sink for KernelSink {
    fn commit(&mut self, batch: Batch) -> Result<(), NetlinkError> {
        let r = self.sock()?.commit(batch);
        if r.is_err() {
            // A fresh socket after any failure (no stale answers).
            self.sock = None;
        }
        r
    }

    fn canary_rules(&mut self, family: u8) -> Result<Option<usize>, NetlinkError> {
        let r = self.sock()?.count_rules(family, TABLE, CANARY_CHAIN);
        if r.is_err() {
            self.sock = None;
        }
        r
    }
}

#[derive(Default)]
struct Programmed {
    services: BTreeMap<ServiceKey, SvcObjs>,
    hairpin: BTreeMap<Vec<u8>, usize>,
}

/// The tables: `ip hako` and `ip6 hako`.
const FAMS: [Fam; 2] = [layout::IPV4, layout::IPV6];

/// The nftables backend.
pub struct NftablesBackend<S: Sink = KernelSink> {
    sink: S,
    opts: RenderOpts,
    ids: [Ids; 2],
    state: Option<[Programmed; 2]>,
}

impl NftablesBackend<KernelSink> {
    /// A backend programming the kernel of the calling thread's network namespace.
    pub fn new(opts: RenderOpts) -> Self {
        Self::with_sink(KernelSink::default(), opts)
    }
}

fn hairpin_key(ip: &[u8]) -> Vec<u8> {
    [ip, ip].concat()
}

impl<S: Sink> NftablesBackend<S> {
    /// A backend over `sink`.
    pub fn with_sink(sink: S, opts: RenderOpts) -> Self {
        Self {
            sink,
            opts,
            ids: [Ids::default(), Ids::default()],
            state: None,
        }
    }

    /// The sink.
    pub fn sink(&mut self) -> &mut S {
        &mut self.sink
    }

    fn full(&mut self, model: &Model) -> Result<SyncStats, SyncError> {
        let mut b = Batch::new(NFPROTO_IPV4, TABLE);
        let mut rules = 0usize;
        let mut elems = 0usize;
        let mut states = Vec::new();
        for (fi, f) in FAMS.iter().enumerate() {
            let (st, r, e) = self.full_family(&mut b, fi, *f, model);
            states.push(st);
            rules += r;
            elems += e;
        }
        let msgs = b.len();
        self.sink.commit(b)?;
        debug!(
            messages = msgs,
            rules, elems, "nftables full sync committed"
        );
        let mut it = states.into_iter();
        if let (Some(a), Some(b)) = (it.next(), it.next()) {
            self.state = Some([a, b]);
        }
        Ok(SyncStats {
            full: true,
            services_written: model.len(),
            rules: rules + elems,
            bytes: 0,
            ..SyncStats::default()
        })
    }

    /// Adds the full table of family `f` to `b`; returns its state, rules and elements.
    fn full_family(
        &mut self,
        b: &mut Batch,
        fi: usize,
        f: Fam,
        model: &Model,
    ) -> (Programmed, usize, usize) {
        // The table is recreated: ids start afresh (no id of a vanished chain lingers).
        self.ids[fi] = Ids::default();
        let d = layout::render(f, model, &self.opts, &mut self.ids[fi]);
        b.set_family(f.nfproto);
        // Create-if-missing, delete, create: the old table goes away in the same transaction.
        b.add_table();
        b.del_table();
        b.add_table();
        for (name, s) in &d.sets {
            b.add_set(name, s);
        }
        for o in d.services.values() {
            for (name, s) in &o.sets {
                b.add_set(name, s);
            }
        }
        let mut rules = 0usize;
        for o in d.services.values() {
            for name in o.chains.keys() {
                b.add_chain(name, None);
            }
        }
        for o in d.services.values() {
            for (name, rs) in &o.chains {
                for r in rs {
                    b.add_rule(name, r);
                    rules += 1;
                }
            }
        }
        // Shared chains exist before the elements that reference them (reject).
        for (name, hook, _) in &d.chains {
            b.add_chain(name, *hook);
        }
        // Elements, grouped per set.
        let mut per_set: BTreeMap<&str, Vec<(&[u8], &ElemData)>> = BTreeMap::new();
        for o in d.services.values() {
            for ((set, key), data) in &o.elems {
                per_set.entry(set).or_default().push((key, data));
            }
        }
        let mut elems = 0usize;
        for (set, list) in &per_set {
            elems += list.len();
            b.add_elems(set, list.iter().copied());
        }
        let mut hairpin = BTreeMap::new();
        for o in d.services.values() {
            for ip in &o.endpoint_ips {
                *hairpin.entry(ip.clone()).or_insert(0) += 1;
            }
        }
        let hp: Vec<Vec<u8>> = hairpin.keys().map(|ip| hairpin_key(ip)).collect();
        elems += hp.len();
        b.add_elems(HAIRPIN, hp.iter().map(|k| (k.as_slice(), &ElemData::None)));
        for (name, _, rs) in &d.chains {
            for r in rs {
                b.add_rule(name, r);
                rules += 1;
            }
        }
        (
            Programmed {
                services: d.services,
                hairpin,
            },
            rules,
            elems,
        )
    }

    fn partial(
        &mut self,
        model: &Model,
        changed: &BTreeSet<ServiceKey>,
    ) -> Result<SyncStats, SyncError> {
        let Some(mut states) = self.state.take() else {
            return Err(NftError::NoState.into());
        };
        let mut b = Batch::new(NFPROTO_IPV4, TABLE);
        let mut rules = 0usize;
        let mut elems = 0usize;
        let mut done = Vec::new();
        for (fi, f) in FAMS.iter().enumerate() {
            b.set_family(f.nfproto);
            match self.partial_family(&mut b, fi, *f, &states[fi], model, changed) {
                Ok((apply, r, e)) => {
                    done.push(apply);
                    rules += r;
                    elems += e;
                }
                Err(e) => return Err(e),
            }
        }
        let msgs = b.len();
        if msgs > 0 {
            self.sink.commit(b)?;
        }
        debug!(
            messages = msgs,
            rules, elems, "nftables partial sync committed"
        );
        for (fi, (del_chains, hairpin, new_objs)) in done.into_iter().enumerate() {
            for c in &del_chains {
                self.ids[fi].release(c);
            }
            let st = &mut states[fi];
            st.hairpin = hairpin;
            for (key, o) in new_objs {
                if o == SvcObjs::default() {
                    st.services.remove(&key);
                } else {
                    st.services.insert(key, o);
                }
            }
        }
        self.state = Some(states);
        Ok(SyncStats {
            full: false,
            services_written: changed.len(),
            rules: rules + elems,
            bytes: 0,
            ..SyncStats::default()
        })
    }

    /// Adds the changes of family `f` to `b`; returns what to record once committed (chains
    /// deleted, hairpin counts, new objects), rules and elements written.
    #[allow(clippy::type_complexity)]
    fn partial_family(
        &mut self,
        b: &mut Batch,
        fi: usize,
        f: Fam,
        st: &Programmed,
        model: &Model,
        changed: &BTreeSet<ServiceKey>,
    ) -> Result<
        (
            (
                Vec<String>,
                BTreeMap<Vec<u8>, usize>,
                BTreeMap<ServiceKey, SvcObjs>,
            ),
            usize,
            usize,
        ),
        SyncError,
    > {
        let mut new_objs: BTreeMap<ServiceKey, SvcObjs> = BTreeMap::new();
        for key in changed {
            let o = model
                .get(key)
                .map(|ports| layout::render_service(f, ports, &self.opts, &mut self.ids[fi]))
                .unwrap_or_default();
            new_objs.insert(key.clone(), o);
        }
        let empty = SvcObjs::default();
        let mut rules = 0usize;
        let mut elems = 0usize;
        let mut del_chains = Vec::new();
        let mut del_sets = Vec::new();
        let mut del_elems: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut add_elems: BTreeMap<String, Vec<(Vec<u8>, ElemData)>> = BTreeMap::new();
        // 1. New sets and chains (empty), so that everything below can reference them.
        for (key, new) in &new_objs {
            let old = st.services.get(key).unwrap_or(&empty);
            for (name, s) in &new.sets {
                match old.sets.get(name) {
                    Some(o) if o == s => {}
                    Some(_) => {
                        // Timeout changed: the set is recreated below (after its users).
                        return Err(NftError::SetShape(name.clone()).into());
                    }
                    None => b.add_set(name, s),
                }
            }
            for name in new.chains.keys() {
                if !old.chains.contains_key(name) {
                    b.add_chain(name, None);
                }
            }
        }
        // 2. Flush chains whose rules change or that go away; write the new rules.
        for (key, new) in &new_objs {
            let old = st.services.get(key).unwrap_or(&empty);
            for (name, old_rules) in &old.chains {
                match new.chains.get(name) {
                    Some(r) if r == old_rules => {}
                    Some(_) => b.flush_chain(name),
                    None => {
                        b.flush_chain(name);
                        del_chains.push(name.clone());
                    }
                }
            }
            for (name, rs) in &new.chains {
                if old.chains.get(name) != Some(rs) {
                    for r in rs {
                        b.add_rule(name, r);
                        rules += 1;
                    }
                }
            }
            for name in old.sets.keys() {
                if !new.sets.contains_key(name) {
                    del_sets.push(name.clone());
                }
            }
            // Affinity entries of a removed endpoint stay until their client's next
            // connection (the chain's last rule forgets them) or their timeout: entries
            // of the other endpoints stay valid (ids do not depend on other endpoints).
            for ((set, k), d) in &old.elems {
                if new.elems.get(&(set.clone(), k.clone())) != Some(d) {
                    del_elems.entry(set.clone()).or_default().push(k.clone());
                }
            }
            for ((set, k), d) in &new.elems {
                if old.elems.get(&(set.clone(), k.clone())) != Some(d) {
                    add_elems
                        .entry(set.clone())
                        .or_default()
                        .push((k.clone(), d.clone()));
                }
            }
        }
        // Hairpin set: reference counts per endpoint address.
        let mut hairpin = st.hairpin.clone();
        let mut hp_del = Vec::new();
        let mut hp_add = Vec::new();
        for (key, new) in &new_objs {
            let old = st.services.get(key).unwrap_or(&empty);
            for ip in old.endpoint_ips.difference(&new.endpoint_ips) {
                if let Some(c) = hairpin.get_mut(ip) {
                    *c -= 1;
                    if *c == 0 {
                        hairpin.remove(ip);
                        hp_del.push(hairpin_key(ip));
                    }
                }
            }
            for ip in new.endpoint_ips.difference(&old.endpoint_ips) {
                let c = hairpin.entry(ip.clone()).or_insert(0);
                *c += 1;
                if *c == 1 {
                    hp_add.push(hairpin_key(ip));
                }
            }
        }
        // A key both removed and re-added (address moved between services) stays.
        hp_del.retain(|k| !hp_add.contains(k));
        hp_add.retain(|k| !st.hairpin.contains_key(&k[..k.len() / 2]));
        // 3. Elements: deletions before additions (a changed value is delete + add).
        for (set, keys) in &del_elems {
            elems += keys.len();
            b.del_elems(set, keys.iter().map(Vec::as_slice));
        }
        if !hp_del.is_empty() {
            b.del_elems(HAIRPIN, hp_del.iter().map(Vec::as_slice));
        }
        for (set, list) in &add_elems {
            elems += list.len();
            b.add_elems(set, list.iter().map(|(k, d)| (k.as_slice(), d)));
        }
        if !hp_add.is_empty() {
            b.add_elems(
                HAIRPIN,
                hp_add.iter().map(|k| (k.as_slice(), &ElemData::None)),
            );
        }
        elems += hp_del.len() + hp_add.len();
        // 4. Now-unreferenced chains and sets.
        for c in &del_chains {
            b.del_chain(c);
        }
        for s in &del_sets {
            b.del_set(s);
        }
        Ok(((del_chains, hairpin, new_objs), rules, elems))
    }
}

impl<S: Sink> Backend for NftablesBackend<S> {
    fn apply(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncStats, SyncError> {
        let res = match changed {
            Some(c) if self.state.is_some() => self.partial(model, c),
            _ => self.full(model),
        };
        if res.is_err() {
            self.state = None;
        }
        res
    }

    fn needs_full(&mut self) -> bool {
        if self.state.is_none() {
            return true;
        }
        FAMS.iter()
            .any(|f| !matches!(self.sink.canary_rules(f.nfproto), Ok(Some(n)) if n > 0))
    }
}

/// Records batches instead of committing them (unit tests of the backend logic).
#[derive(Default)]
pub struct RecordingSink {
    /// Descriptions of the messages of each committed batch.
    pub batches: Vec<Vec<String>>,
    /// Answer of `canary_rules`.
    pub canary: Option<usize>,
    /// Fail the next commit.
    pub fail_next: bool,
}

impl Sink for RecordingSink {
    fn commit(&mut self, batch: Batch) -> Result<(), NetlinkError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(NetlinkError::Rejected("injected failure".into()));
        }
        let (_, _, descr) = batch.finish();
        self.batches.push(descr.into_iter().map(|d| d.1).collect());
        self.canary = Some(1);
        Ok(())
    }

    fn canary_rules(&mut self, _family: u8) -> Result<Option<usize>, NetlinkError> {
        Ok(self.canary)
    }
}
