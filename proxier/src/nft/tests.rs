//! Golden render tests of the nftables layout, reference checks, and the backend's batch
//! logic over a recording sink.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::layout::{self, Ids};
use super::wire::{decode_batch, Batch, Op, NFPROTO_IPV4};
use super::{NftablesBackend, RecordingSink};
use crate::iptables::RenderOpts;
use crate::model::ServiceKey;
use crate::proxier::{Proxier, ProxierOpts};
use crate::{config, Backend, FakeIptables, IptablesBackend};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn opts() -> RenderOpts {
    RenderOpts {
        cluster_cidr: Some("10.244.0.0/16".into()),
        ..RenderOpts::default()
    }
}

fn golden_model() -> crate::model::Model {
    model_from(config::read_dir(&testdata("")).expect("read testdata"))
}

/// The proxier's model of `objs` (node "node-a"), after one sync through a fake iptables.
fn model_from(objs: config::Objects) -> crate::model::Model {
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(FakeIptables::default(), opts())),
        ProxierOpts {
            hostname: "node-a".into(),
            render: opts(),
        },
    );
    p.replace_all(objs.services, objs.slices);
    p.sync().expect("sync");
    p.model().clone()
}

fn check_golden(name: &str, text: &str) {
    let golden = testdata(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, text).expect("write golden");
    }
    let want = std::fs::read_to_string(&golden).expect("read golden");
    assert_eq!(text, want, "render differs from {}", golden.display());
}

#[test]
fn full_render_matches_golden_and_references_resolve() {
    let model = golden_model();
    let d = layout::render(layout::IPV4, &model, &opts(), &mut Ids::default());
    let problems = d.check_refs();
    assert!(problems.is_empty(), "{problems:?}");
    let text = d.text();
    check_golden("nft-full.golden", &text);
    // Per feature (see testdata/services.yaml):
    // ClusterIP, 2 ready endpoints (the terminating one unused while ready ones exist).
    assert!(text.contains("element service-ips 10.96.0.10 . tcp . 80 : goto svc-"));
    assert!(text.contains(": 10.244.1.2:8080") && text.contains(": 10.244.1.3:8080"));
    assert!(!text.contains("10.244.2.4:8080"));
    assert!(text.contains("numgen random mod 2 offset 8192 => r8; lookup r8 @endpoints-2 => r8"));
    // Affinity: entries of the shared dynamic map with the service's 600 s timeout.
    assert!(text.contains("update @affinity-1 r8 timeout 600000ms : r13"));
    // NodePort + external IP go through the external chain (masquerade, then the service).
    assert!(text.contains("element service-nodeports tcp . 30080 : goto ext-"));
    assert!(text.contains("element service-ips 203.0.113.7 . tcp . 80 : goto ext-"));
    // LB with Local policy and source ranges: firewall chain; local endpoints chain.
    assert!(text.contains("element firewall-ips 203.0.113.9 . sctp . 443 : jump fw-"));
    assert!(text.contains("chain svl-"));
    // No endpoints: rejected on every address and the node port.
    assert!(text.contains("element no-endpoint-ips 10.96.0.15 . tcp . 80 : goto reject"));
    assert!(text.contains("element no-endpoint-nodeports tcp . 30082 : goto reject"));
    // Skipped objects do not appear.
    assert!(!text.contains("10.244.9.9") && !text.contains("10.96.0.16"));
}

#[test]
fn checker_finds_missing_targets() {
    let model = golden_model();
    let mut d = layout::render(layout::IPV4, &model, &opts(), &mut Ids::default());
    let victim = d
        .services
        .values_mut()
        .find_map(|s| {
            let name = s.chains.keys().find(|c| c.starts_with("svc-"))?.clone();
            s.chains.remove(&name);
            Some(name)
        })
        .expect("a service chain");
    let problems = d.check_refs();
    assert!(
        problems.iter().any(|p| p.contains("missing chain")),
        "{victim}: {problems:?}"
    );
}

#[test]
fn masquerade_all_and_nodeport_addresses_render() {
    let model = golden_model();
    let o = RenderOpts {
        masquerade_all: true,
        nodeport_addresses: vec!["192.0.2.0/24".into()],
        ..RenderOpts::default()
    };
    let d = layout::render(layout::IPV4, &model, &o, &mut Ids::default());
    assert!(d.check_refs().is_empty());
    let text = d.text();
    check_golden("nft-masquerade-all.golden", &text);
    assert!(
        !text.contains("fib daddr type"),
        "node ports only on 192.0.2.0/24"
    );
    assert!(text.contains("c0000200"));
}

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
fn partial_batches_hold_only_the_changed_service() {
    let mut p = Proxier::new(
        Box::new(NftablesBackend::with_sink(RecordingSink::default(), opts())),
        ProxierOpts::default(),
    );
    p.on_service_add(svc("a", "10.96.0.1"));
    p.on_service_add(svc("b", "10.96.0.2"));
    p.on_endpointslice_add(slice("a", &["10.0.0.1", "10.0.0.2"]));
    p.on_endpointslice_add(slice("b", &["10.0.1.1"]));
    assert!(p.sync().expect("sync").full);
    let model = p.model().clone();
    let mut be = NftablesBackend::with_sink(RecordingSink::default(), opts());
    be.apply(&model, None).expect("full");
    let full = be.sink().batches[0].clone();
    assert_eq!(
        &full[..3],
        ["add table hako", "delete table hako", "add table hako"]
    );

    // a loses one endpoint: a's chain flushed and rewritten, one endpoint element deleted
    // and one changed; nothing of b.
    p.on_endpointslice_update(slice("a", &["10.0.0.2"]));
    p.sync().expect("sync");
    let key_a = crate::model::ServiceKey {
        namespace: "ns".into(),
        name: "a".into(),
    };
    let changed: BTreeSet<_> = [key_a].into_iter().collect();
    let s = be.apply(p.model(), Some(&changed)).expect("partial");
    assert!(!s.full);
    let batch = be.sink().batches[1].clone();
    let svc_b = crate::iptables::service_chain("svc-", &model.values().nth(1).expect("b")[0]);
    assert!(batch.iter().all(|m| !m.contains(&svc_b)), "{batch:?}");
    assert!(
        batch.iter().any(|m| m.starts_with("flush chain svc-")),
        "{batch:?}"
    );
    assert!(!batch.iter().any(|m| m.contains("add chain")), "{batch:?}");
    assert!(
        batch.iter().any(|m| m.contains("element(s) of endpoints")),
        "{batch:?}"
    );
    assert!(!batch.iter().any(|m| m.contains("table")), "{batch:?}");
    // Hairpin: 10.0.0.1 is no longer an endpoint anywhere.
    assert!(
        batch.iter().any(|m| m == "delete 1 element(s) of hairpin"),
        "{batch:?}"
    );

    // No change: empty batch, nothing committed.
    let n = be.sink().batches.len();
    be.apply(p.model(), Some(&BTreeSet::new())).expect("noop");
    assert_eq!(be.sink().batches.len(), n);

    // Service removed: its elements deleted, then its chain flushed and deleted.
    p.on_service_delete(&svc("a", "10.96.0.1"));
    p.sync().expect("sync");
    be.apply(p.model(), Some(&changed)).expect("partial");
    let batch = be.sink().batches.last().expect("batch").clone();
    let flush = batch.iter().position(|m| m.starts_with("flush chain svc-"));
    let del_el = batch
        .iter()
        .position(|m| m.contains("element(s) of service-ips"));
    let del = batch
        .iter()
        .position(|m| m.starts_with("delete chain svc-"));
    assert!(
        flush.is_some() && del_el.is_some() && del.is_some(),
        "{batch:?}"
    );
    assert!(del_el < del && flush < del, "{batch:?}");
}

#[test]
fn failure_and_canary_loss_force_full() {
    let mut be = NftablesBackend::with_sink(RecordingSink::default(), opts());
    let model = golden_model();
    assert!(be.needs_full());
    be.apply(&model, None).expect("full");
    assert!(!be.needs_full());
    be.sink().canary = Some(0);
    assert!(be.needs_full(), "flushed canary chain");
    be.sink().canary = None;
    assert!(be.needs_full(), "table gone");
    be.sink().canary = Some(1);
    be.sink().fail_next = true;
    let changed: BTreeSet<_> = model.keys().take(1).cloned().collect();
    let mut smaller = model.clone();
    smaller.remove(changed.iter().next().expect("a service"));
    assert!(be.apply(&smaller, Some(&changed)).is_err());
    assert!(be.needs_full());
    // The proxier passes None after a failure; a partial request without state is full too.
    let s = be.apply(&model, Some(&changed)).expect("full");
    assert!(s.full);
}

#[test]
fn ipv6_render_matches_golden() {
    let svc: Service = serde_yaml::from_str(
        "metadata: {name: v6, namespace: ns}\nspec: {type: NodePort, ipFamilies: [IPv4, IPv6], clusterIPs: [10.96.0.60, 'fd00:96::60'], clusterIP: 10.96.0.60, sessionAffinity: ClientIP, ports: [{name: p, port: 80, nodePort: 30060}]}",
    )
    .expect("svc");
    let s6: EndpointSlice = serde_yaml::from_str(
        "metadata: {name: v6-6, namespace: ns, labels: {kubernetes.io/service-name: v6}}\naddressType: IPv6\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: ['fd00:244:1::11']}, {addresses: ['fd00:244:1::12']}]",
    )
    .expect("slice");
    let s4 = slice("v6", &["10.0.0.1"]);
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(FakeIptables::default(), opts())),
        ProxierOpts::default(),
    );
    p.on_service_add(svc);
    p.on_endpointslice_add(s6);
    let mut s4 = s4;
    s4.metadata.name = Some("v6-4".into());
    p.on_endpointslice_add(s4);
    p.sync().expect("sync");
    let o = RenderOpts {
        cluster_cidr: Some("fd00:244::/48".into()),
        ..RenderOpts::default()
    };
    let d6 = layout::render(layout::IPV6, p.model(), &o, &mut Ids::default());
    assert!(d6.check_refs().is_empty(), "{:?}", d6.check_refs());
    let text = d6.text();
    check_golden("nft-ip6.golden", &text);
    assert!(text.starts_with("table ip6 hako"));
    assert!(text.contains("element service-ips fd00:96::60 . tcp . 80 : goto svc-"));
    assert!(text.contains(": [fd00:244:1::11]:8080") && text.contains(": [fd00:244:1::12]:8080"));
    assert!(
        !text.contains("10.0.0.1"),
        "IPv4 endpoints stay in the ip table"
    );
    assert!(text.contains("payload nh+24/16 => r8"), "ip6 daddr");
    // A dual-stack --cluster-cidr list: each family takes its own CIDR.
    let dual = RenderOpts {
        cluster_cidr: Some("10.244.0.0/16, fd00:244::/48".into()),
        ..RenderOpts::default()
    };
    let d6d = layout::render(layout::IPV6, p.model(), &dual, &mut Ids::default());
    assert_eq!(d6d.text(), text, "the IPv6 CIDR of the list is used");
    let d4d = layout::render(layout::IPV4, p.model(), &dual, &mut Ids::default());
    let d4o = layout::render(layout::IPV4, p.model(), &opts(), &mut Ids::default());
    assert_eq!(d4d.text(), d4o.text(), "the IPv4 CIDR of the list is used");
    // The IPv4 table of the same model has the IPv4 endpoint only.
    let d4 = layout::render(layout::IPV4, p.model(), &opts(), &mut Ids::default());
    let t4 = d4.text();
    assert!(t4.contains("10.0.0.1:8080") && !t4.contains("fd00"));
}

#[test]
fn cidrs_parse_per_family_and_reject_bad_input() {
    let v4 = layout::IPV4;
    let v6 = layout::IPV6;
    assert_eq!(
        v4.cidr("10.244.3.7/16"),
        Some((vec![10, 244, 0, 0], vec![255, 255, 0, 0]))
    );
    assert_eq!(v4.cidr("10.0.0.1"), Some((vec![10, 0, 0, 1], vec![255; 4])));
    assert_eq!(v4.cidr("0.0.0.0/0"), Some((vec![0; 4], vec![0; 4])));
    let (net, mask) = v6.cidr("fd00:244:1::9/52").expect("v6");
    assert_eq!(&net[..8], &[0xfd, 0, 2, 0x44, 0, 1, 0, 0]);
    assert_eq!(&mask[..8], &[255, 255, 255, 255, 255, 255, 0xf0, 0]);
    for bad in [
        "10.0.0.0/33",
        "10.0.0.300/8",
        "fd00::/24",
        "x/8",
        "10.0.0.0/-1",
    ] {
        assert_eq!(v4.cidr(bad), None, "{bad}");
    }
    assert_eq!(v6.cidr("10.0.0.0/8"), None);
    assert_eq!(v6.cidr("fd00::/129"), None);
}

fn sticky(name: &str, ip: &str) -> Service {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, sessionAffinity: ClientIP, ports: [{{name: p, port: 80}}]}}"
    ))
    .expect("svc")
}

/// A synced proxier with one ClientIP-affinity service over three endpoints.
fn sticky_over_three() -> Proxier {
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(FakeIptables::default(), opts())),
        ProxierOpts::default(),
    );
    p.on_service_add(sticky("s", "10.96.0.9"));
    p.on_endpointslice_add(slice("s", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    p.sync().expect("sync");
    p
}

/// Endpoint address → affinity id, from the per-endpoint rules of the service's chain:
/// the rules that compare the client's entry with the id they write back (entry holds an
/// id), and the rules that replace a just-recorded slot with an id.
type EpIds = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;
fn affinity_ids(o: &layout::SvcObjs) -> (EpIds, EpIds) {
    use super::wire::{Expr, REG32};
    let (_, rules) = o
        .chains
        .iter()
        .find(|(n, _)| n.starts_with("svc-"))
        .expect("svc chain");
    let (mut by_id, mut by_slot) = (EpIds::new(), EpIds::new());
    for rule in rules {
        let cmp = rule.iter().find_map(|e| match e {
            Expr::Cmp { sreg, data, .. } if *sreg == REG32 + 5 => Some(data.clone()),
            _ => None,
        });
        let id = rule.iter().find_map(|e| match e {
            Expr::Immediate { dreg, data } if *dreg == REG32 + 5 => Some(data.clone()),
            _ => None,
        });
        // The last write of r8: the DNAT address (the first is the chain's key part).
        let addr = rule.iter().rev().find_map(|e| match e {
            Expr::Immediate { dreg, data } if *dreg == REG32 => Some(data.clone()),
            _ => None,
        });
        if let (Some(cmp), Some(id), Some(addr)) = (cmp, id, addr) {
            if cmp == id {
                by_id.insert(addr, id);
            } else {
                by_slot.insert(addr, id);
            }
        }
    }
    (by_id, by_slot)
}

#[test]
fn affinity_ids_stay_when_another_endpoint_goes() {
    let mut p = sticky_over_three();
    let key = crate::model::ServiceKey {
        namespace: "ns".into(),
        name: "s".into(),
    };
    let render = |m: &crate::model::Model| {
        layout::render_service(layout::IPV4, &m[&key], &opts(), &mut Ids::default())
    };
    let (before, slots_before) = affinity_ids(&render(p.model()));
    assert_eq!(before.len(), 3, "{before:?}");
    assert_eq!(
        slots_before, before,
        "a recorded slot becomes its endpoint's id"
    );
    // The first endpoint goes: the others shift down a slot but keep their ids.
    p.on_endpointslice_update(slice("s", &["10.0.0.2", "10.0.0.3"]));
    p.sync().expect("sync");
    let (after, slots_after) = affinity_ids(&render(p.model()));
    assert_eq!(after.len(), 2);
    for (ep, id) in &after {
        assert_eq!(before.get(ep), Some(id), "id of {ep:?} changed");
    }
    assert_eq!(slots_after, after);
    // Without an entry of a present endpoint, the entry is forgotten before a slot is
    // recorded (an update alone would keep a stale value).
    let o = render(p.model());
    let (_, rules) = o
        .chains
        .iter()
        .find(|(n, _)| n.starts_with("svc-"))
        .expect("svc chain");
    let record: Vec<String> = rules
        .iter()
        .find(|r| {
            r.iter()
                .any(|e| matches!(e, super::wire::Expr::Numgen { .. }))
        })
        .expect("record rule")
        .iter()
        .map(ToString::to_string)
        .collect();
    let del = record
        .iter()
        .position(|e| e.starts_with("delete @affinity-"));
    let upd = record
        .iter()
        .position(|e| e.starts_with("update @affinity-"));
    assert!(del.is_some() && del < upd, "{record:?}");
}

#[test]
fn affinity_ids_resolve_collisions_deterministically() {
    let eps = vec![vec![3u8], vec![1], vec![2]];
    // Every endpoint hashes alike: the smallest keeps the hash, the next ones follow.
    assert_eq!(layout::assign_ids(&eps, |_| 7), vec![9, 7, 8]);
    // Same ids whatever the order of the endpoints.
    let rev: Vec<Vec<u8>> = eps.iter().rev().cloned().collect();
    assert_eq!(layout::assign_ids(&rev, |_| 7), vec![8, 7, 9]);
    // Wrapping at the top of the range.
    assert_eq!(
        layout::assign_ids(&eps[..2], |_| u32::MAX),
        vec![0, u32::MAX]
    );
    // Distinct hashes are kept as they are.
    let ids = layout::endpoint_ids(&eps);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3);
    assert_eq!(layout::endpoint_ids(&eps[1..]), ids[1..].to_vec());
}

#[test]
fn endpoint_removal_keeps_the_affinity_map() {
    let mut p = sticky_over_three();
    let mut be = NftablesBackend::with_sink(RecordingSink::default(), opts());
    be.apply(p.model(), None).expect("full");
    p.on_endpointslice_update(slice("s", &["10.0.0.2", "10.0.0.3"]));
    p.sync().expect("sync");
    let changed: BTreeSet<_> = p.model().keys().cloned().collect();
    be.apply(p.model(), Some(&changed)).expect("partial");
    let batch = be.sink().batches.last().expect("batch").clone();
    assert!(
        !batch.iter().any(|m| m.starts_with("flush set")),
        "the affinity map is kept: {batch:?}"
    );
    assert!(
        !batch.iter().any(|m| m.contains("set affinity-")),
        "the affinity map is neither deleted nor recreated: {batch:?}"
    );
    assert!(
        batch.iter().any(|m| m.starts_with("flush chain svc-")),
        "{batch:?}"
    );
}

/// The kernel's view of the tables, rebuilt by replaying batches: chains with their rules'
/// bytes, sets with their elements. Replaying checks what the kernel checks (a missing
/// chain, set or element, a non-empty or referenced chain, an element added again with
/// other data), so a batch that would be rejected fails here too.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SimTable {
    chains: BTreeMap<String, Vec<Vec<u8>>>,
    sets: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sim {
    tables: BTreeMap<u8, SimTable>,
}

/// The chain a verdict element data attribute names (NFTA_DATA_VERDICT / NFTA_VERDICT_CHAIN).
fn verdict_chain(data: &[u8]) -> Option<String> {
    fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
            if len < 4 || len > b.len() {
                break;
            }
            out.push((u16::from_ne_bytes([b[2], b[3]]) & 0x7fff, &b[4..len]));
            b = b.get((len + 3) & !3..).unwrap_or(&[]);
        }
        out
    }
    let v = attrs(data).into_iter().find(|a| a.0 == 2)?.1;
    let c = attrs(v).into_iter().find(|a| a.0 == 2)?.1;
    Some(String::from_utf8_lossy(c.split(|b| *b == 0).next()?).into_owned())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Sim {
    /// What differs from `other`: chains and set elements of one but not the other.
    fn differences(&self, other: &Sim) -> Vec<String> {
        let mut out = Vec::new();
        for (f, t) in &self.tables {
            let Some(o) = other.tables.get(f) else {
                out.push(format!("table {f} only here"));
                continue;
            };
            for (c, rules) in &t.chains {
                if o.chains.get(c) != Some(rules) {
                    out.push(format!("{f} chain {c} differs or is extra"));
                }
            }
            for c in o.chains.keys().filter(|c| !t.chains.contains_key(*c)) {
                out.push(format!("{f} chain {c} missing"));
            }
            for (s, elems) in &t.sets {
                let empty = BTreeMap::new();
                let oe = o.sets.get(s).unwrap_or(&empty);
                for (k, d) in elems {
                    if oe.get(k) != Some(d) {
                        out.push(format!("{f} {s}: element {k:?} extra or other data"));
                    }
                }
                for k in oe.keys().filter(|k| !elems.contains_key(*k)) {
                    out.push(format!("{f} {s}: element {k:?} missing"));
                }
            }
        }
        out
    }

    /// Applies one batch atomically (all or nothing, as the kernel).
    fn apply(&mut self, ops: &[Op]) -> Result<(), String> {
        let mut next = self.clone();
        for op in ops {
            next.op(op).map_err(|e| format!("{op:?}: {e}"))?;
        }
        *self = next;
        Ok(())
    }

    fn op(&mut self, op: &Op) -> Result<(), &'static str> {
        fn table<'a>(s: &'a mut Sim, f: &u8) -> Result<&'a mut SimTable, &'static str> {
            s.tables.get_mut(f).ok_or("no table")
        }
        match op {
            Op::AddTable(f) => {
                self.tables.entry(*f).or_default();
            }
            Op::DelTable(f) => {
                self.tables.remove(f).ok_or("no table")?;
            }
            Op::AddChain(f, c) => {
                table(self, f)?.chains.entry(c.clone()).or_default();
            }
            Op::DelChain(f, c) => {
                let t = table(self, f)?;
                if !t.chains.get(c).ok_or("no chain")?.is_empty() {
                    return Err("chain not empty");
                }
                let name = [c.as_bytes(), &[0]].concat();
                let used = t.chains.values().flatten().any(|r| contains(r, &name))
                    || t.sets
                        .values()
                        .flat_map(|s| s.values())
                        .any(|d| contains(d, &name));
                if used {
                    return Err("chain in use");
                }
                t.chains.remove(c);
            }
            Op::FlushChain(f, c) => table(self, f)?.chains.get_mut(c).ok_or("no chain")?.clear(),
            Op::AddRule(f, c, r) => table(self, f)?
                .chains
                .get_mut(c)
                .ok_or("no chain")?
                .push(r.clone()),
            Op::AddSet(f, s) => {
                table(self, f)?.sets.entry(s.clone()).or_default();
            }
            Op::DelSet(f, s) => {
                table(self, f)?.sets.remove(s).ok_or("no set")?;
            }
            Op::AddElems(f, s, elems) => {
                let t = table(self, f)?;
                for (_, d) in elems {
                    if let Some(c) = verdict_chain(d) {
                        if !t.chains.contains_key(&c) {
                            return Err("element: verdict to a missing chain");
                        }
                    }
                }
                let set = t.sets.get_mut(s).ok_or("no set")?;
                for (k, d) in elems {
                    match set.get(k) {
                        Some(old) if old != d => return Err("element exists with other data"),
                        _ => {
                            set.insert(k.clone(), d.clone());
                        }
                    }
                }
            }
            Op::DelElems(f, s, keys) => {
                let set = table(self, f)?.sets.get_mut(s).ok_or("no set")?;
                for k in keys {
                    set.remove(k).ok_or("no element")?;
                }
            }
            Op::FlushSet(f, s) => table(self, f)?.sets.get_mut(s).ok_or("no set")?.clear(),
        }
        Ok(())
    }
}

/// The model of a multi-document YAML of Services and EndpointSlices (node "node-a").
fn model_of(yaml: &str) -> crate::model::Model {
    let mut objs = config::Objects::default();
    config::parse(yaml, "test", &mut objs);
    model_from(objs)
}

/// What a full sync of `model` writes, with the chain ids `be` has now (so that it can be
/// compared with what `be`'s partial syncs left).
fn full_with_ids(be: &NftablesBackend<RecordingSink>, model: &crate::model::Model) -> Sim {
    let mut fresh = NftablesBackend::with_sink(RecordingSink::default(), opts());
    fresh.ids = be.ids.clone();
    let mut b = Batch::new(NFPROTO_IPV4, layout::TABLE);
    for (fi, f) in [layout::IPV4, layout::IPV6].into_iter().enumerate() {
        let _ = fresh.full_family(&mut b, fi, f, model);
    }
    let (buf, _, _) = b.finish();
    let mut sim = Sim::default();
    sim.apply(&decode_batch(&buf)).expect("full batch replays");
    sim
}

fn changed_keys(a: &crate::model::Model, b: &crate::model::Model) -> BTreeSet<ServiceKey> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Replays the last batch `be` committed on `sim`.
fn replay_last(sim: &mut Sim, be: &mut NftablesBackend<RecordingSink>) -> Result<(), String> {
    let buf = be.sink().raw.last().expect("a batch").clone();
    sim.apply(&decode_batch(&buf))
}

fn svc_yaml(name: &str, ip: &str, extra: &str, ports: &str) -> String {
    format!(
        "---\nkind: Service\napiVersion: v1\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{ports}]{extra}}}\n"
    )
}

fn slice_yaml(svc: &str, ips: &[&str], ports: &str) -> String {
    let eps: Vec<String> = ips
        .iter()
        .map(|i| format!("{{addresses: [{i}], nodeName: node-a}}"))
        .collect();
    format!(
        "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: {svc}-x, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{ports}]\nendpoints: [{}]\n",
        eps.join(",")
    )
}

const P80: &str = "{name: p, port: 80}";
const SP80: &str = "{name: p, port: 8080}";
const P80_443: &str = "{name: p, port: 80}, {name: q, port: 443}";
const SP80_443: &str = "{name: p, port: 8080}, {name: q, port: 8443}";

/// Partial syncs over the compact kept state: for each change, the tables that the full
/// sync of the first state plus the partial sync of the second leave are exactly those a
/// full sync of the second writes (nothing stale kept, nothing missing, no batch the kernel
/// would reject), and the same back again.
#[test]
fn partial_syncs_leave_exactly_what_a_full_sync_writes() {
    let base = || {
        [
            svc_yaml("a", "10.96.0.1", "", P80),
            slice_yaml("a", &["10.0.0.1", "10.0.0.2"], SP80),
            svc_yaml("b", "10.96.0.2", "", P80_443),
            slice_yaml("b", &["10.0.1.1", "10.0.0.9"], SP80_443),
            svc_yaml("c", "10.96.0.3", "", P80),
            slice_yaml("c", &["10.0.2.1", "10.0.0.9"], SP80),
        ]
        .concat()
    };
    let with = |i: usize, s: String| {
        let mut v: Vec<String> = base()
            .split("---\n")
            .filter(|d| !d.is_empty())
            .map(|d| format!("---\n{d}"))
            .collect();
        if i < v.len() {
            v[i] = s;
        } else {
            v.push(s);
        }
        v.concat()
    };
    let without = |drop_: &[usize]| {
        base()
            .split("---\n")
            .filter(|d| !d.is_empty())
            .enumerate()
            .filter(|(i, _)| !drop_.contains(i))
            .map(|(_, d)| format!("---\n{d}"))
            .collect::<String>()
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "one endpoint replaced",
            with(1, slice_yaml("a", &["10.0.0.2", "10.0.0.3"], SP80)),
        ),
        (
            "one endpoint removed",
            with(1, slice_yaml("a", &["10.0.0.2"], SP80)),
        ),
        (
            "an address shared with another service removed from one",
            with(3, slice_yaml("b", &["10.0.1.1"], SP80_443)),
        ),
        ("a service removed", without(&[2, 3])),
        (
            "a service and its slice removed, another's slice too",
            without(&[0, 1, 5]),
        ),
        (
            "a port removed",
            with(2, svc_yaml("b", "10.96.0.2", "", P80)),
        ),
        (
            "affinity turned on",
            with(
                0,
                svc_yaml("a", "10.96.0.1", ", sessionAffinity: ClientIP", P80),
            ),
        ),
        (
            "every endpoint removed (reject elements)",
            with(1, slice_yaml("a", &[], SP80)),
        ),
        (
            "NodePort added",
            with(
                0,
                svc_yaml(
                    "a",
                    "10.96.0.1",
                    ", type: NodePort",
                    "{name: p, port: 80, nodePort: 30001}",
                ),
            ),
        ),
        (
            "NodePort with a Local policy",
            with(
                0,
                svc_yaml(
                    "a",
                    "10.96.0.1",
                    ", type: NodePort, externalTrafficPolicy: Local",
                    "{name: p, port: 80, nodePort: 30001}",
                ),
            ),
        ),
        (
            "cluster IP changed",
            with(0, svc_yaml("a", "10.96.0.11", "", P80)),
        ),
        (
            "a service added",
            with(
                99,
                [
                    svc_yaml("d", "10.96.0.4", "", P80),
                    slice_yaml("d", &["10.0.0.1"], SP80),
                ]
                .concat(),
            ),
        ),
    ];
    for (what, after_yaml) in cases {
        let before = model_of(&base());
        let after = model_of(&after_yaml);
        let changed = changed_keys(&before, &after);
        assert!(!changed.is_empty(), "{what}: the case changes nothing");
        let mut be = NftablesBackend::with_sink(RecordingSink::default(), opts());
        let mut sim = Sim::default();
        be.apply(&before, None).expect("full");
        replay_last(&mut sim, &mut be).expect("full batch replays");
        for (step, (from, to)) in [(&before, &after), (&after, &before)]
            .into_iter()
            .enumerate()
        {
            let ch = changed_keys(from, to);
            let s = be.apply(to, Some(&ch)).expect("partial");
            assert!(!s.full, "{what}");
            replay_last(&mut sim, &mut be).unwrap_or_else(|e| panic!("{what} ({step}): {e}"));
            let want = full_with_ids(&be, to);
            assert!(
                sim == want,
                "{what} ({step}): tables differ from a full sync: {:?}",
                sim.differences(&want)
            );
        }
    }
}

/// The replay itself notices a stale element and a missing deletion (so the test above can
/// fail): a partial batch with one element deletion left out differs from the full sync.
#[test]
fn the_replay_catches_a_kept_stale_element() {
    let before = model_of(
        &[
            svc_yaml("a", "10.96.0.1", "", P80),
            slice_yaml("a", &["10.0.0.1", "10.0.0.2"], SP80),
        ]
        .concat(),
    );
    let after = model_of(
        &[
            svc_yaml("a", "10.96.0.1", "", P80),
            slice_yaml("a", &["10.0.0.2"], SP80),
        ]
        .concat(),
    );
    let mut be = NftablesBackend::with_sink(RecordingSink::default(), opts());
    let mut sim = Sim::default();
    be.apply(&before, None).expect("full");
    replay_last(&mut sim, &mut be).expect("replays");
    be.apply(&after, Some(&changed_keys(&before, &after)))
        .expect("partial");
    let buf = be.sink().raw.last().expect("batch").clone();
    let ops: Vec<Op> = decode_batch(&buf)
        .into_iter()
        .filter(|o| !matches!(o, Op::DelElems(_, s, _) if s == "hairpin"))
        .collect();
    let mut broken = sim.clone();
    broken.apply(&ops).expect("still a valid batch");
    assert_ne!(
        broken,
        full_with_ids(&be, &after),
        "the stale hairpin element is seen"
    );
    sim.apply(&decode_batch(&buf)).expect("replays");
    let want = full_with_ids(&be, &after);
    assert!(sim == want, "{:?}", sim.differences(&want));
}
