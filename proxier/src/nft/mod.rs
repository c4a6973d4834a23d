//! Netlink-native nftables backend: the layout in [`layout`], the nf_tables encoder and
//! socket in [`wire`], and [`NftablesBackend`], which programs a full sync as one atomic batch
//! (table deleted and recreated) and a partial sync as one batch holding only the changed
//! services' chains, rules and map elements. No `nft` process runs on the sync path.

pub mod kept;
pub mod layout;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use tracing::debug;

use self::kept::{Counts, Kept, KeptError, Record, RecordRef, SetNames};
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
    /// The kept state of a service could not be recorded or read (the next sync is full).
    #[error(transparent)]
    Kept(#[from] KeptError),
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

/// What one family's table holds beyond the shared objects: per service its compact record,
/// and the reference counts of endpoint addresses behind the hairpin set.
#[derive(Default)]
struct Programmed {
    services: Kept,
    hairpin: Counts,
}

/// The tables: `ip hako` and `ip6 hako`.
const FAMS: [Fam; 2] = [layout::IPV4, layout::IPV6];

/// The nftables backend.
pub struct NftablesBackend<S: Sink = KernelSink> {
    sink: S,
    opts: RenderOpts,
    ids: [Ids; 2],
    sets: SetNames,
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

impl From<KeptError> for SyncError {
    fn from(e: KeptError) -> Self {
        SyncError::Nftables(NftError::Kept(e))
    }
}

impl<S: Sink> NftablesBackend<S> {
    /// A backend over `sink`.
    pub fn with_sink(sink: S, opts: RenderOpts) -> Self {
        // The shared set names, interned before any sync (so that their entries are not
        // allocated in the middle of a full sync's transient blocks).
        let mut sets = SetNames::default();
        for f in FAMS {
            for name in layout::shared(f, &opts).0.keys() {
                let _ = sets.id(name);
            }
        }
        Self {
            sink,
            opts,
            ids: [Ids::default(), Ids::default()],
            sets,
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
        let mut desired = Vec::new();
        for (fi, f) in FAMS.iter().enumerate() {
            // The table is recreated: ids start afresh (no id of a vanished chain lingers).
            self.ids[fi] = Ids::default();
            // About one chain per service port of the family (more grow the table once).
            let ports = model
                .values()
                .flatten()
                .filter(|sp| sp.cluster_ips.iter().any(|ip| f.addr(ip).is_some()))
                .count();
            self.ids[fi].reserve(ports);
            let (d, r, e) = self.full_family(&mut b, fi, *f, model);
            desired.push(d);
            rules += r;
            elems += e;
        }
        let msgs = b.len();
        self.sink.commit(b)?;
        debug!(
            messages = msgs,
            rules, elems, "nftables full sync committed"
        );
        // Only now, with the batch gone, the compact records: they are allocated after (not
        // among) the render's many small blocks, which are then freed together.
        let mut states = Vec::new();
        for d in desired {
            states.push(self.programmed(d)?);
        }
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

    /// What a full sync of `services` leaves programmed.
    fn programmed(
        &mut self,
        services: BTreeMap<ServiceKey, SvcObjs>,
    ) -> Result<Programmed, KeptError> {
        let kept = Kept::build(services.iter(), &mut self.sets)?;
        drop(services);
        let services = kept;
        let mut hairpin = Counts::of(&services)?;
        hairpin.shrink();
        Ok(Programmed { services, hairpin })
    }

    /// Adds the full table of family `f` to `b`; returns its services' objects, rules and
    /// elements.
    fn full_family(
        &mut self,
        b: &mut Batch,
        fi: usize,
        f: Fam,
        model: &Model,
    ) -> (BTreeMap<ServiceKey, SvcObjs>, usize, usize) {
        let d = layout::render(f, model, &self.opts, &mut self.ids[fi]);
        b.set_family(f.nfproto);
        // Create-if-missing, delete, create: the old table goes away in the same transaction.
        b.add_table();
        b.del_table();
        b.add_table();
        for (name, s) in &d.sets {
            b.add_set(name, s);
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
        drop(per_set);
        let hairpin: BTreeSet<&[u8]> = d
            .services
            .values()
            .flat_map(|o| o.endpoint_ips.iter().map(Vec::as_slice))
            .collect();
        let hp: Vec<Vec<u8>> = hairpin.iter().map(|ip| hairpin_key(ip)).collect();
        elems += hp.len();
        b.add_elems(HAIRPIN, hp.iter().map(|k| (k.as_slice(), &ElemData::None)));
        for (name, _, rs) in &d.chains {
            for r in rs {
                b.add_rule(name, r);
                rules += 1;
            }
        }
        drop(hairpin);
        (d.services, rules, elems)
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
            let (apply, r, e) = self.partial_family(&mut b, fi, *f, &states[fi], model, changed)?;
            done.push(apply);
            rules += r;
            elems += e;
        }
        let msgs = b.len();
        if msgs > 0 {
            self.sink.commit(b)?;
        }
        debug!(
            messages = msgs,
            rules, elems, "nftables partial sync committed"
        );
        // Committed: record it (a failure above left `state` None, so the next sync is full).
        for (fi, apply) in done.into_iter().enumerate() {
            for c in &apply.del_chains {
                self.ids[fi].release(c);
            }
            let st = &mut states[fi];
            for ip in &apply.gone_ips {
                st.hairpin.dec(ip);
            }
            for ip in &apply.new_ips {
                st.hairpin.inc(ip);
            }
            st.services.update(apply.records)?;
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

    /// Adds the changes of family `f` to `b`; returns what to record once committed, rules
    /// and elements written.
    #[allow(clippy::too_many_arguments)]
    fn partial_family(
        &mut self,
        b: &mut Batch,
        fi: usize,
        f: Fam,
        st: &Programmed,
        model: &Model,
        changed: &BTreeSet<ServiceKey>,
    ) -> Result<(Applied, usize, usize), SyncError> {
        let mut news: Vec<(ServiceKey, SvcObjs, Option<Record>)> = Vec::new();
        for key in changed {
            let o = model
                .get(key)
                .map(|ports| layout::render_service(f, ports, &self.opts, &mut self.ids[fi]))
                .unwrap_or_default();
            let rec = if o == SvcObjs::default() {
                None
            } else {
                Some(Record::encode(key, &o, &mut self.sets)?)
            };
            news.push((key.clone(), o, rec));
        }
        let empty = kept::View::default();
        let mut rules = 0usize;
        let mut elems = 0usize;
        let mut del_chains: Vec<String> = Vec::new();
        let mut del_elems: BTreeMap<u16, Vec<&[u8]>> = BTreeMap::new();
        let mut add_elems: BTreeMap<u16, Vec<(&[u8], ElemData)>> = BTreeMap::new();
        let mut gone_ips: Vec<Vec<u8>> = Vec::new();
        let mut new_ips: Vec<Vec<u8>> = Vec::new();
        let mut diffs = Vec::with_capacity(news.len());
        for (key, _, rec) in &news {
            let old = st.services.get(key).map(RecordRef::into_view).transpose()?;
            let new = rec.as_ref().map(Record::view).transpose()?;
            diffs.push(kept::diff(
                old.as_ref().unwrap_or(&empty),
                new.as_ref().unwrap_or(&empty),
            ));
        }
        // 1. New chains (empty), so that everything below can reference them.
        for d in &diffs {
            for name in &d.add_chains {
                b.add_chain(name, None);
            }
        }
        // 2. Flush chains whose rules change or that go away; write the new rules.
        for ((_, o, _), d) in news.iter().zip(&diffs) {
            for name in &d.flush_chains {
                b.flush_chain(name);
            }
            del_chains.extend(d.del_chains.iter().map(|c| c.to_string()));
            for name in &d.write_chains {
                for r in o.chains.get(*name).map(Vec::as_slice).unwrap_or_default() {
                    b.add_rule(name, r);
                    rules += 1;
                }
            }
            // Affinity entries of a removed endpoint stay until their client's next
            // connection (the chain's last rule forgets them) or their timeout: entries
            // of the other endpoints stay valid (ids do not depend on other endpoints).
            for e in &d.del_elems {
                del_elems.entry(e.set).or_default().push(e.key);
            }
            for e in &d.add_elems {
                let data = kept::decode_data(e.kind, e.data).ok_or(KeptError::Corrupt)?;
                add_elems.entry(e.set).or_default().push((e.key, data));
            }
            gone_ips.extend(d.gone_ips.iter().map(|i| i.to_vec()));
            new_ips.extend(d.new_ips.iter().map(|i| i.to_vec()));
        }
        // Hairpin set: an address leaves with its last user and enters with its first,
        // over all changed services together (an address moving between two of them stays).
        let mut counts: BTreeMap<&[u8], i64> = BTreeMap::new();
        for ip in &gone_ips {
            *counts.entry(ip).or_default() -= 1;
        }
        for ip in &new_ips {
            *counts.entry(ip).or_default() += 1;
        }
        let mut hp_del = Vec::new();
        let mut hp_add = Vec::new();
        for (ip, delta) in &counts {
            let before = st.hairpin.contains(ip);
            let users = i64::from(st.hairpin.count(ip)) + delta;
            if before && users <= 0 {
                hp_del.push(hairpin_key(ip));
            } else if !before && users > 0 {
                hp_add.push(hairpin_key(ip));
            }
        }
        // 3. Elements: deletions before additions (a changed value is delete + add).
        let set_name = |id: u16| self.sets.name(id).ok_or(KeptError::Corrupt);
        for (set, keys) in &del_elems {
            elems += keys.len();
            b.del_elems(set_name(*set)?, keys.iter().copied());
        }
        if !hp_del.is_empty() {
            b.del_elems(HAIRPIN, hp_del.iter().map(Vec::as_slice));
        }
        for (set, list) in &add_elems {
            elems += list.len();
            b.add_elems(set_name(*set)?, list.iter().map(|(k, d)| (*k, d)));
        }
        if !hp_add.is_empty() {
            b.add_elems(
                HAIRPIN,
                hp_add.iter().map(|k| (k.as_slice(), &ElemData::None)),
            );
        }
        elems += hp_del.len() + hp_add.len();
        // 4. Now-unreferenced chains.
        for c in &del_chains {
            b.del_chain(c);
        }
        drop(del_elems);
        drop(add_elems);
        drop(diffs);
        let records = news.into_iter().map(|(k, _, r)| (k, r)).collect();
        Ok((
            Applied {
                del_chains,
                gone_ips,
                new_ips,
                records,
            },
            rules,
            elems,
        ))
    }
}

/// What a partial sync of one family changes in the kept state once its batch is committed.
struct Applied {
    /// Chains deleted (their ids are released).
    del_chains: Vec<String>,
    /// Endpoint addresses one changed service no longer uses (one entry per service).
    gone_ips: Vec<Vec<u8>>,
    /// Endpoint addresses one changed service newly uses (one entry per service).
    new_ips: Vec<Vec<u8>>,
    /// New records of the changed services (None: nothing programmed any more).
    records: Vec<(ServiceKey, Option<Record>)>,
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
    /// The bytes of each committed batch.
    pub raw: Vec<Vec<u8>>,
}

impl Sink for RecordingSink {
    fn commit(&mut self, batch: Batch) -> Result<(), NetlinkError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(NetlinkError::Rejected("injected failure".into()));
        }
        let (buf, _, descr) = batch.finish();
        self.batches.push(descr.into_iter().map(|d| d.1).collect());
        self.raw.push(buf);
        self.canary = Some(1);
        Ok(())
    }

    fn canary_rules(&mut self, _family: u8) -> Result<Option<usize>, NetlinkError> {
        Ok(self.canary)
    }
}
