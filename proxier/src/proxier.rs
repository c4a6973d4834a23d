//! The proxier: change tracking of Services and EndpointSlices, and the sync that hands the
//! changed part of the model to a backend (iptables now; nftables and IPVS plug in the same
//! way through `Backend`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::{debug, info, warn};

use crate::conntrack::{Conntrack, CtFilter};
pub use crate::iptables::TableRules;
use crate::iptables::{self, Iptables, IptablesError, RenderOpts};
use crate::model::{
    attach_endpoints, compact_service, compact_slice, service_key, slice_service_key,
    CompactService, CompactSlice, Model, ModelError, ServiceKey, ServicePort, SliceSet,
};

/// Proxier options.
#[derive(Debug, Clone, Default)]
pub struct ProxierOpts {
    /// This node's name (endpoints with this nodeName are local).
    pub hostname: String,
    /// Rule shaping options.
    pub render: RenderOpts,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Full (true) or partial.
    pub full: bool,
    /// Services whose chains were rewritten.
    pub services_written: usize,
    /// Rules in the payload.
    pub rules: usize,
    /// Size of the payload, bytes.
    pub bytes: usize,
    /// iptables mode: rules per table (owned, written).
    pub tables: Option<TableRules>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlice changes
    /// this sync programmed (network programming latency).
    pub trigger_times: Vec<SystemTime>,
}

impl SyncStats {
    /// Whether the sync found nothing to do (no rules written, no service changed, not
    /// full).
    pub fn is_idle(&self) -> bool {
        !self.full && self.rules == 0 && self.services_written == 0
    }
}

/// The annotation an EndpointSlice's controller sets to the time of the change it reflects.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Trigger times kept per Service until a sync programs them (a bound: a service whose
/// slices change faster than syncs keeps the oldest ones, which bound the latency).
const MAX_TRIGGERS: usize = 16;

/// The trigger time of a slice (RFC 3339, as the EndpointSlice controller writes it).
pub fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let v = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let t = k8s_openapi::chrono::DateTime::parse_from_rfc3339(v.trim()).ok()?;
    let secs = u64::try_from(t.timestamp()).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(secs)
            + Duration::from_nanos(u64::from(t.timestamp_subsec_nanos())),
    )
}

/// A dataplane backend.
pub trait Backend: Send {
    /// Programs the model. `changed` None = full sync.
    fn apply(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncStats, SyncError>;
    /// Whether the kernel state was lost (canary gone) and a full sync is due.
    fn needs_full(&mut self) -> bool;
    /// Whether the backend has work of its own due even when nothing changed (IPVS real
    /// servers draining): the next sync then calls `apply` with an empty change set.
    fn has_pending_work(&self) -> bool {
        false
    }
}

/// Sync failures.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// iptables failed.
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    /// The nftables backend failed.
    #[error(transparent)]
    Nftables(#[from] crate::nft::NftError),
    /// The IPVS backend failed.
    #[error(transparent)]
    Ipvs(#[from] crate::ipvs::IpvsError),
}

/// One family's iptables proxier state (kube-proxy runs one proxier per family).
struct FamilyState<I: Iptables> {
    ipt: I,
    renderer: iptables::Renderer,
    base_ok: bool,
}

impl<I: Iptables> FamilyState<I> {
    fn new(fam: iptables::Family, ipt: I) -> Self {
        Self {
            ipt,
            renderer: iptables::Renderer::new(fam),
            base_ok: false,
        }
    }

    fn apply(
        &mut self,
        opts: &RenderOpts,
        model: &Model,
        changed: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncStats, SyncError> {
        let full = changed.is_none() || !self.base_ok;
        // The renderer's state is speculative: until a restore succeeds, the next sync is a
        // full one.
        self.base_ok = false;
        let r = match changed {
            Some(c) if !full => self.renderer.partial(model, opts, c),
            _ => {
                let localhost = iptables::localhost_nodeports(self.renderer.family(), opts);
                self.ipt.ensure_base(localhost)?;
                if localhost {
                    self.ipt.set_route_localnet()?;
                }
                // Everything of ours in the kernel is candidate for GC.
                let present = self.ipt.list_service_chains()?;
                self.renderer.full(model, opts, &present)
            }
        };
        self.ipt.restore(&r.text)?;
        self.base_ok = true;
        Ok(SyncStats {
            full,
            services_written: if full {
                model.len()
            } else {
                changed.map_or(0, BTreeSet::len)
            },
            rules: r.rules,
            bytes: r.text.len(),
            tables: Some(r.tables),
            trigger_times: Vec::new(),
        })
    }
}

/// The iptables backend: IPv4 through `iptables-restore`, and with `with_ipv6` IPv6
/// through `ip6tables-restore` in the same layout (dual-stack).
pub struct IptablesBackend<I: Iptables> {
    fams: Vec<FamilyState<I>>,
    opts: RenderOpts,
    /// How often the canary chain is looked for (an `iptables` process per family).
    canary_period: Duration,
    last_canary: Option<Instant>,
}

/// How often the iptables backend looks for its canary chain: kube-proxy's iptables
/// monitor runs every `--iptables-sync-period` (30 s by default), not at every sync.
pub const CANARY_PERIOD: Duration = Duration::from_secs(30);

impl<I: Iptables> IptablesBackend<I> {
    /// An IPv4 backend over `ipt`.
    pub fn new(ipt: I, opts: RenderOpts) -> Self {
        Self {
            fams: vec![FamilyState::new(iptables::Family::V4, ipt)],
            opts,
            canary_period: CANARY_PERIOD,
            last_canary: None,
        }
    }

    /// Looks for the canary chain at most every `period` (default [`CANARY_PERIOD`];
    /// zero: at every sync).
    #[must_use]
    pub fn with_canary_period(mut self, period: Duration) -> Self {
        self.canary_period = period;
        self
    }

    /// Adds the IPv6 proxier over `ipt6` (an `ip6tables` implementation, e.g.
    /// `RealIptables::with_variant_family(v, Family::V6)`).
    #[must_use]
    pub fn with_ipv6(mut self, ipt6: I) -> Self {
        self.fams.push(FamilyState::new(iptables::Family::V6, ipt6));
        self
    }
}

impl IptablesBackend<iptables::RealIptables> {
    /// The backend over the real `iptables` binaries of `variant` ("", "nft", "legacy"),
    /// dual-stack as kube-proxy runs: a second proxier through `ip6tables` when the kernel has
    /// IPv6 and the ip6tables binaries run (else IPv4 only, with a warning).
    pub fn real(variant: &str, opts: RenderOpts) -> Self {
        let b = Self::new(iptables::RealIptables::with_variant(variant), opts);
        let ip6 = iptables::RealIptables::with_variant_family(variant, iptables::Family::V6);
        if std::path::Path::new("/proc/sys/net/ipv6").exists() && ip6.available() {
            info!(binary = %ip6.restore, "IPv6 services through ip6tables");
            b.with_ipv6(ip6)
        } else {
            warn!("no IPv6 (kernel or ip6tables missing): IPv6 services are not programmed");
            b
        }
    }
}

impl<I: Iptables> Backend for IptablesBackend<I> {
    fn apply(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncStats, SyncError> {
        let mut total = SyncStats::default();
        let mut tables = TableRules::default();
        for f in &mut self.fams {
            let st = f.apply(&self.opts, model, changed)?;
            total.full |= st.full;
            total.services_written = total.services_written.max(st.services_written);
            total.rules += st.rules;
            total.bytes += st.bytes;
            tables += st.tables.unwrap_or_default();
        }
        total.tables = Some(tables);
        Ok(total)
    }

    fn needs_full(&mut self) -> bool {
        if self.fams.iter().any(|f| !f.base_ok) {
            return true;
        }
        // The canary costs an `iptables` process per family: looked for once per period
        // (kube-proxy's monitor), not at every sync.
        let now = Instant::now();
        if self
            .last_canary
            .is_some_and(|t| now.saturating_duration_since(t) < self.canary_period)
        {
            return false;
        }
        self.last_canary = Some(now);
        self.fams
            .iter_mut()
            .any(|f| !matches!(f.ipt.chain_exists("mangle", iptables::CANARY), Ok(true)))
    }
}

/// Services + slices in, kernel rules out.
pub struct Proxier {
    backend: Box<dyn Backend>,
    opts: ProxierOpts,
    /// Services as converted (the k8s objects are not kept).
    services: BTreeMap<ServiceKey, Result<CompactService, ModelError>>,
    /// EndpointSlices as converted, by Service and slice name.
    slices: BTreeMap<ServiceKey, SliceSet>,
    slice_owner: BTreeMap<(String, String), ServiceKey>,
    model: Model,
    dirty: BTreeSet<ServiceKey>,
    need_full: bool,
    last_full: Option<Instant>,
    /// Full resync period (kube-proxy's `--iptables-sync-period` role).
    pub full_period: Duration,
    conntrack: Option<Box<dyn Conntrack>>,
    pending_ct: BTreeSet<CtFilter>,
    /// Trigger times of slice changes not yet programmed, per Service.
    triggers: BTreeMap<ServiceKey, Vec<SystemTime>>,
}

/// UDP conntrack entries made stale by a change from `old` to `new`: entries answered by a
/// removed endpoint, and entries to a service that gains its first endpoint.
pub fn stale_udp(old: Option<&Vec<ServicePort>>, new: Option<&Vec<ServicePort>>) -> Vec<CtFilter> {
    let mut out = Vec::new();
    let find = |set: Option<&Vec<ServicePort>>, sp: &ServicePort| {
        set.and_then(|v| {
            v.iter()
                .find(|o| o.port_name == sp.port_name && o.protocol == sp.protocol)
                .cloned()
        })
    };
    for sp in old.into_iter().flatten() {
        if sp.protocol != crate::model::Protocol::Udp {
            continue;
        }
        let now = find(new, sp);
        let now_eps: Vec<_> = now
            .as_ref()
            .map(|n| {
                n.cluster_endpoints()
                    .into_iter()
                    .map(|e| (e.ip, e.port))
                    .collect()
            })
            .unwrap_or_default();
        for ep in sp.cluster_endpoints() {
            if !now_eps.contains(&(ep.ip, ep.port)) {
                out.push(CtFilter {
                    proto: 17,
                    orig_dst: None,
                    orig_dport: None,
                    reply_src: Some(ep.ip),
                });
            }
        }
    }
    for sp in new.into_iter().flatten() {
        if sp.protocol != crate::model::Protocol::Udp || sp.cluster_endpoints().is_empty() {
            continue;
        }
        let before = find(old, sp).is_some_and(|o| !o.cluster_endpoints().is_empty());
        if !before {
            for ip in sp
                .cluster_ips
                .iter()
                .chain(&sp.external_ips)
                .chain(&sp.lb_ips)
            {
                out.push(CtFilter {
                    proto: 17,
                    orig_dst: Some(*ip),
                    orig_dport: Some(sp.port),
                    reply_src: None,
                });
            }
            if let Some(np) = sp.node_port {
                out.push(CtFilter {
                    proto: 17,
                    orig_dst: None,
                    orig_dport: Some(np),
                    reply_src: None,
                });
            }
        }
    }
    out
}

impl Proxier {
    /// A proxier over `backend`. The first sync is a full one.
    pub fn new(backend: Box<dyn Backend>, opts: ProxierOpts) -> Self {
        Self {
            backend,
            opts,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            model: Model::new(),
            dirty: BTreeSet::new(),
            need_full: true,
            last_full: None,
            full_period: Duration::from_secs(3600),
            conntrack: None,
            pending_ct: BTreeSet::new(),
            triggers: BTreeMap::new(),
        }
    }

    /// Keeps the trigger time of a slice change of `key` until a sync programs it.
    fn note_trigger(&mut self, key: &ServiceKey, slice: &EndpointSlice) {
        if let Some(t) = trigger_time(slice) {
            let v = self.triggers.entry(key.clone()).or_default();
            if v.len() < MAX_TRIGGERS && !v.contains(&t) {
                v.push(t);
            }
        }
    }

    /// Flushes stale UDP conntrack entries through `ct` after each successful sync. Without
    /// it no conntrack entry is touched.
    #[must_use]
    pub fn with_conntrack(mut self, ct: Box<dyn Conntrack>) -> Self {
        self.conntrack = Some(ct);
        self
    }

    /// Service added or updated.
    pub fn on_service_update(&mut self, svc: Service) {
        match service_key(&svc) {
            Ok(k) => {
                let c = compact_service(&svc);
                drop(svc);
                // A relist hands over every Service again: unchanged is no change.
                if self.services.get(&k) != Some(&c) {
                    self.dirty.insert(k.clone());
                    self.services.insert(k, c);
                }
            }
            Err(e) => warn!(error = %e, "skipping Service"),
        }
    }

    /// Service added.
    pub fn on_service_add(&mut self, svc: Service) {
        self.on_service_update(svc);
    }

    /// Service deleted.
    pub fn on_service_delete(&mut self, svc: &Service) {
        if let Ok(k) = service_key(svc) {
            self.services.remove(&k);
            self.dirty.insert(k);
        }
    }

    /// EndpointSlice added or updated.
    pub fn on_endpointslice_update(&mut self, slice: EndpointSlice) {
        let ns = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(name) = slice.metadata.name.clone() else {
            warn!("skipping EndpointSlice without a name");
            return;
        };
        let Some(key) = slice_service_key(&slice) else {
            warn!(slice = %format!("{ns}/{name}"), "skipping EndpointSlice without kubernetes.io/service-name label");
            return;
        };
        if let Some(old) = self
            .slice_owner
            .insert((ns.clone(), name.clone()), key.clone())
        {
            if old != key {
                if let Some(m) = self.slices.get_mut(&old) {
                    m.remove(&name);
                }
                self.dirty.insert(old);
            }
        }
        let compact = compact_slice(&slice, &self.opts.hostname);
        // A relist hands over every slice again: an unchanged one is no change (no dirty
        // service, no trigger time for the programming-latency metric).
        if self.slices.get(&key).and_then(|m| m.get(&name)) == Some(&compact) {
            return;
        }
        self.note_trigger(&key, &slice);
        drop(slice);
        self.slices
            .entry(key.clone())
            .or_default()
            .insert(name, compact);
        self.dirty.insert(key);
    }

    /// EndpointSlice added.
    pub fn on_endpointslice_add(&mut self, slice: EndpointSlice) {
        self.on_endpointslice_update(slice);
    }

    /// EndpointSlice deleted.
    pub fn on_endpointslice_delete(&mut self, slice: &EndpointSlice) {
        let ns = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = slice.metadata.name.clone().unwrap_or_default();
        self.forget_slice(ns, name);
    }

    fn forget_slice(&mut self, ns: String, name: String) {
        if let Some(key) = self.slice_owner.remove(&(ns, name.clone())) {
            if let Some(m) = self.slices.get_mut(&key) {
                m.remove(&name);
                if m.is_empty() {
                    self.slices.remove(&key);
                }
            }
            self.dirty.insert(key);
        }
    }

    /// Forgets every Service for which `keep(namespace, name)` is false (the end of a
    /// relist: what the list did not name was deleted meanwhile).
    pub fn retain_services(&mut self, keep: impl Fn(&str, &str) -> bool) {
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !keep(&k.namespace, &k.name))
            .cloned()
            .collect();
        for k in gone {
            self.services.remove(&k);
            self.dirty.insert(k);
        }
    }

    /// Forgets every EndpointSlice for which `keep(namespace, name)` is false.
    pub fn retain_slices(&mut self, keep: impl Fn(&str, &str) -> bool) {
        let gone: Vec<(String, String)> = self
            .slice_owner
            .keys()
            .filter(|(ns, name)| !keep(ns, name))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.forget_slice(ns, name);
        }
    }

    /// Replaces the whole input set (config-dir reload, relist): computes the differences.
    pub fn replace_all(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let new_keys: BTreeSet<ServiceKey> = services
            .iter()
            .filter_map(|s| service_key(s).ok())
            .collect();
        for k in self.services.keys() {
            if !new_keys.contains(k) {
                self.dirty.insert(k.clone());
            }
        }
        self.services.retain(|k, _| new_keys.contains(k));
        for s in services {
            if let Ok(k) = service_key(&s) {
                let c = compact_service(&s);
                if self.services.get(&k) != Some(&c) {
                    self.services.insert(k.clone(), c);
                    self.dirty.insert(k);
                }
            } else {
                warn!("skipping Service without a name");
            }
        }
        let mut new_slices: BTreeMap<ServiceKey, SliceSet> = BTreeMap::new();
        let mut owner = BTreeMap::new();
        for sl in slices {
            let ns = sl
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let (Some(name), Some(key)) = (sl.metadata.name.clone(), slice_service_key(&sl)) else {
                warn!(slice = ?sl.metadata.name, namespace = %ns, "skipping EndpointSlice without name or service label");
                continue;
            };
            owner.insert((ns, name.clone()), key.clone());
            let c = compact_slice(&sl, &self.opts.hostname);
            if self.slices.get(&key).and_then(|m| m.get(&name)) != Some(&c) {
                self.note_trigger(&key, &sl);
            }
            new_slices.entry(key).or_default().insert(name, c);
        }
        for k in self.slices.keys().chain(new_slices.keys()) {
            if self.slices.get(k) != new_slices.get(k) {
                self.dirty.insert(k.clone());
            }
        }
        self.slices = new_slices;
        self.slice_owner = owner;
    }

    /// Forces the next sync to be a full one.
    pub fn force_full(&mut self) {
        self.need_full = true;
    }

    /// The current model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn rebuild(&mut self, key: &ServiceKey) -> Option<Vec<ServicePort>> {
        let ports = match self.services.get(key)? {
            Ok(p) => p,
            Err(e) => {
                warn!(service = %key, error = %e, "skipping Service");
                return None;
            }
        };
        let slices: Vec<&CompactSlice> = self
            .slices
            .get(key)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        let mut warnings = Vec::new();
        let r = attach_endpoints(ports, &slices, &mut warnings);
        for w in warnings {
            warn!(service = %key, error = %w, "skipping endpoint");
        }
        (!r.is_empty()).then_some(r)
    }

    /// Folds pending changes into the model and programs the backend: full at start, after
    /// failures, when the canary is gone and every `full_period`; partial otherwise (only the
    /// services whose model changed; none = nothing to do).
    pub fn sync(&mut self) -> Result<SyncStats, SyncError> {
        let started = Instant::now();
        let mut changed = BTreeSet::new();
        let mut triggers = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let new = self.rebuild(&key);
            let old = self.model.get(&key);
            // A change that did not change the model programs nothing: its trigger
            // times are dropped (kube-proxy drops those of reverted changes).
            let t = self.triggers.remove(&key);
            if new.as_ref() != old {
                triggers.extend(t.into_iter().flatten());
                if self.conntrack.is_some() {
                    self.pending_ct.extend(stale_udp(old, new.as_ref()));
                }
                changed.insert(key.clone());
                match new {
                    Some(p) => {
                        self.model.insert(key, p);
                    }
                    None => {
                        self.model.remove(&key);
                    }
                }
            }
        }
        let periodic = self
            .last_full
            .is_none_or(|t| t.elapsed() >= self.full_period);
        let full = self.need_full || periodic || self.backend.needs_full();
        if !full && changed.is_empty() && !self.backend.has_pending_work() {
            debug!("nothing changed");
            return Ok(SyncStats::default());
        }
        let res = self
            .backend
            .apply(&self.model, if full { None } else { Some(&changed) });
        match res {
            Ok(mut stats) => {
                stats.trigger_times = triggers;
                if stats.full {
                    self.last_full = Some(Instant::now());
                }
                self.need_full = false;
                if let Some(ct) = self.conntrack.as_mut() {
                    let filters: Vec<CtFilter> =
                        std::mem::take(&mut self.pending_ct).into_iter().collect();
                    match ct.flush(&filters) {
                        Ok(n) if n > 0 => info!(deleted = n, "flushed stale UDP conntrack entries"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "flushing stale UDP conntrack entries"),
                    }
                }
                info!(
                    full = stats.full,
                    services = stats.services_written,
                    rules = stats.rules,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "synced"
                );
                Ok(stats)
            }
            Err(e) => {
                self.need_full = true;
                warn!(error = %e, "sync failed; next sync is a full one");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::{check_jumps, FakeIptables};
    use crate::model::build_service;

    fn svc(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}"
        ))
        .expect("svc")
    }
    fn slice(name: &str, ips: &[&str]) -> EndpointSlice {
        let eps: Vec<String> = ips
            .iter()
            .map(|i| format!("{{addresses: [{i}]}}"))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}-x, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{}]",
            eps.join(",")
        ))
        .expect("slice")
    }

    #[test]
    fn partial_sync_writes_only_changed_service() {
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(fake, RenderOpts::default())),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        p.on_service_add(svc("b", "10.96.0.2"));
        p.on_endpointslice_add(slice("a", &["10.0.0.1", "10.0.0.2"]));
        p.on_endpointslice_add(slice("b", &["10.0.1.1"]));
        let s = p.sync().expect("sync");
        assert!(s.full);
        // No-op change: nothing written.
        p.on_endpointslice_update(slice("b", &["10.0.1.1"]));
        assert_eq!(p.sync().expect("sync"), SyncStats::default());
        // One endpoint removed from a.
        p.on_endpointslice_update(slice("a", &["10.0.0.1"]));
        let s = p.sync().expect("sync");
        assert!(!s.full);
        assert_eq!(s.services_written, 1);
        let st = st.lock().expect("lock");
        let last = st.restores.last().expect("payload");
        assert!(last.contains("10.0.0.1:8080"));
        assert!(
            !last.contains("DNAT --to-destination 10.0.1.1:8080"),
            "b not rewritten:\n{last}"
        );
        assert!(
            last.contains("-X KUBE-SEP-"),
            "stale endpoint chain removed:\n{last}"
        );
        // An endpoint-only change leaves every shared chain alone: no KUBE-SERVICES line, no
        // filter table, just a's chains.
        assert!(
            !last.contains("KUBE-SERVICES") && !last.contains("*filter"),
            "shared chains not rewritten:\n{last}"
        );
        assert_eq!(
            last.lines().filter(|l| l.starts_with("-A ")).count(),
            3,
            "a's service chain jump and its endpoint's two rules:\n{last}"
        );
        let nat = &st.chains["nat"];
        assert_eq!(nat.iter().filter(|c| c.starts_with("KUBE-SEP-")).count(), 2);
    }

    #[test]
    fn failure_forces_full_and_unknown_slice_is_harmless() {
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(fake, RenderOpts::default())),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        p.on_endpointslice_add(slice("zzz", &["10.0.9.9"]));
        assert!(p.sync().expect("sync").full);
        st.lock().expect("lock").fail_next = true;
        p.on_endpointslice_add(slice("a", &["10.0.0.1"]));
        assert!(p.sync().is_err());
        let s = p.sync().expect("sync");
        assert!(s.full);
        let st = st.lock().expect("lock");
        let last = st.restores.last().expect("payload");
        assert!(check_jumps(last).is_empty(), "{:?}", check_jumps(last));
        assert!(!last.contains("10.0.9.9"));
    }

    #[test]
    fn stale_udp_filters() {
        let udp = |eps: &[&str]| -> Vec<ServicePort> {
            let svc: Service = serde_yaml::from_str(
                "metadata: {name: d, namespace: ns}\nspec: {clusterIP: 10.96.0.40, ports: [{name: p, port: 53, protocol: UDP}]}",
            )
            .expect("svc");
            let list: Vec<String> = eps
                .iter()
                .map(|i| format!("{{addresses: [{i}]}}"))
                .collect();
            let sl: EndpointSlice = serde_yaml::from_str(&format!(
                "metadata: {{name: d-1, namespace: ns, labels: {{kubernetes.io/service-name: d}}}}\naddressType: IPv4\nports: [{{name: p, port: 5353, protocol: UDP}}]\nendpoints: [{}]",
                list.join(",")
            ))
            .expect("slice");
            build_service(&svc, &[&sl], "me", &mut Vec::new()).expect("build")
        };
        let ep = |s: &str| CtFilter {
            proto: 17,
            orig_dst: None,
            orig_dport: None,
            reply_src: Some(s.parse().expect("ip")),
        };
        let svcf = CtFilter {
            proto: 17,
            orig_dst: Some("10.96.0.40".parse().expect("ip")),
            orig_dport: Some(53),
            reply_src: None,
        };
        type Case = (
            Option<Vec<ServicePort>>,
            Option<Vec<ServicePort>>,
            Vec<CtFilter>,
        );
        let cases: Vec<Case> = vec![
            (
                Some(udp(&["10.0.0.1", "10.0.0.2"])),
                Some(udp(&["10.0.0.2"])),
                vec![ep("10.0.0.1")],
            ),
            (Some(udp(&[])), Some(udp(&["10.0.0.2"])), vec![svcf.clone()]),
            (None, Some(udp(&["10.0.0.2"])), vec![svcf]),
            (Some(udp(&["10.0.0.1"])), None, vec![ep("10.0.0.1")]),
            (
                Some(udp(&["10.0.0.1"])),
                Some(udp(&["10.0.0.1", "10.0.0.3"])),
                vec![],
            ),
        ];
        for (old, new, want) in cases {
            assert_eq!(
                stale_udp(old.as_ref(), new.as_ref()),
                want,
                "{old:?} -> {new:?}"
            );
        }
    }

    #[test]
    fn canary_loss_forces_full() {
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(fake, RenderOpts::default())),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        assert!(p.sync().expect("sync").full);
        st.lock().expect("lock").chains.clear();
        p.on_endpointslice_add(slice("a", &["10.0.0.1"]));
        assert!(p.sync().expect("sync").full);
    }

    #[test]
    fn the_canary_is_looked_for_once_per_period_not_per_sync() {
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(fake, RenderOpts::default())),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        assert!(p.sync().expect("sync").full);
        for i in 0..20 {
            p.on_endpointslice_add(slice("a", &[&format!("10.0.0.{}", i + 1)]));
            assert!(!p.sync().expect("sync").full);
            assert!(p.sync().expect("idle sync").is_idle());
        }
        // One `iptables -S KUBE-PROXY-CANARY` in 41 syncs (it was one per sync).
        assert_eq!(st.lock().expect("lock").canary_checks, 1);

        // With a zero period every sync looks, and a lost canary is found at once.
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let mut p = Proxier::new(
            Box::new(
                IptablesBackend::new(fake, RenderOpts::default())
                    .with_canary_period(Duration::ZERO),
            ),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        p.sync().expect("sync");
        p.sync().expect("sync");
        st.lock().expect("lock").chains.clear();
        assert!(p.sync().expect("sync").full);
        assert_eq!(st.lock().expect("lock").canary_checks, 2);
    }

    #[test]
    fn localhost_nodeports_set_route_localnet_and_count_rules_per_table() {
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let opts = RenderOpts {
            localhost_nodeports: true,
            ..RenderOpts::default()
        };
        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(fake, opts.clone())),
            ProxierOpts {
                render: opts,
                ..ProxierOpts::default()
            },
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        p.on_endpointslice_add(slice("a", &["10.0.0.1"]));
        let s = p.sync().expect("sync");
        let state = st.lock().expect("lock");
        assert!(state.route_localnet);
        assert!(state.chains["filter"].contains(iptables::FIREWALL));
        assert!(state.restores[0].contains(iptables::LOCALNET_DROP));
        // filter: 3 KUBE-FORWARD + the drop; nat: 4 static + the nodeports jump + the
        // service's jump, its SVC chain (1 endpoint jump) and SEP chain (2 rules).
        let t = s.tables.expect("iptables tables");
        assert_eq!((t.filter_total, t.nat_total), (4, 9), "{t:?}");
        assert_eq!((t.filter_last, t.nat_last), (4, 9), "{t:?}");
        assert_eq!(t.filter_last + t.nat_last, s.rules);
        drop(state);
        // Off: no sysctl, no drop rule.
        let fake = FakeIptables::default();
        let st = fake.state.clone();
        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(fake, RenderOpts::default())),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        p.sync().expect("sync");
        let state = st.lock().expect("lock");
        assert!(!state.route_localnet);
        assert!(!state.restores[0].contains("KUBE-FIREWALL"));
    }

    fn triggered(name: &str, ips: &[&str], at: &str) -> EndpointSlice {
        let mut s = slice(name, ips);
        s.metadata.annotations = Some(
            [(TRIGGER_TIME_ANNOTATION.to_string(), at.to_string())]
                .into_iter()
                .collect(),
        );
        s
    }

    #[test]
    fn trigger_times_of_programmed_changes_are_handed_to_the_sync() {
        let t = |s: &str| -> SystemTime { trigger_time(&triggered("x", &[], s)).expect("parsed") };
        assert_eq!(
            t("2024-03-01T10:00:00Z"),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_287_200)
        );
        assert_eq!(
            t("2024-03-01T11:00:00.5+01:00"),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_287_200_500)
        );
        assert_eq!(trigger_time(&triggered("x", &[], "yesterday")), None);
        assert_eq!(trigger_time(&slice("x", &[])), None);

        let mut p = Proxier::new(
            Box::new(IptablesBackend::new(
                FakeIptables::default(),
                RenderOpts::default(),
            )),
            ProxierOpts::default(),
        );
        p.on_service_add(svc("a", "10.96.0.1"));
        p.on_endpointslice_add(triggered("a", &["10.0.0.1"], "2024-03-01T10:00:00Z"));
        let s = p.sync().expect("sync");
        assert_eq!(s.trigger_times, [t("2024-03-01T10:00:00Z")]);
        // An update that changes nothing programs nothing: its time is dropped.
        p.on_endpointslice_add(triggered("a", &["10.0.0.1"], "2024-03-01T10:00:05Z"));
        assert!(p.sync().expect("sync").is_idle());
        p.on_endpointslice_add(triggered("a", &["10.0.0.2"], "2024-03-01T10:00:09Z"));
        assert_eq!(
            p.sync().expect("sync").trigger_times,
            [t("2024-03-01T10:00:09Z")]
        );
        // A relist with a changed slice counts too; an unchanged one does not.
        p.replace_all(
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            vec![
                triggered("a", &["10.0.0.2"], "2024-03-01T10:01:00Z"),
                triggered("b", &["10.0.0.3"], "2024-03-01T10:02:00Z"),
            ],
        );
        assert_eq!(
            p.sync().expect("sync").trigger_times,
            [t("2024-03-01T10:02:00Z")]
        );
    }
}
