//! Golden render tests of the nftables layout, reference checks, and the backend's batch
//! logic over a recording sink.

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::layout::{self, Ids};
use super::{NftablesBackend, RecordingSink};
use crate::iptables::RenderOpts;
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
    let objs = config::read_dir(&testdata("")).expect("read testdata");
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
