//! The desired IPVS state of a service model and its difference from the kernel's. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::genl::{Dest, DestKey, KernelVs, VsConf, VsKey, IP_VS_SVC_F_PERSISTENT};
use crate::model::{Endpoint, Model, ServiceKey, ServicePort};

/// What a node's IPVS mode should hold for one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Virtual services with their settings and real servers (weight per server).
    pub services: BTreeMap<VsKey, (VsConf, BTreeMap<DestKey, u32>)>,
    /// Which virtual services belong to which Service.
    pub owner: BTreeMap<VsKey, ServiceKey>,
    /// Addresses for the dummy interface (cluster, external and LB IPs).
    pub addresses: BTreeSet<IpAddr>,
    /// Set members.
    pub sets: super::ipset::Members,
}

/// Shaping options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredOpts {
    /// Scheduler for every virtual service.
    pub scheduler: String,
    /// Node addresses that accept NodePorts.
    pub node_ips: Vec<IpAddr>,
}

fn dests(eps: &[&Endpoint]) -> BTreeMap<DestKey, u32> {
    eps.iter()
        .map(|e| {
            (
                DestKey {
                    addr: e.ip,
                    port: e.port,
                },
                1,
            )
        })
        .collect()
}

/// Builds the desired state of `model` (IPv4 services; IPv6 addresses are left out).
pub fn desired(model: &Model, opts: &DesiredOpts) -> Desired {
    let mut d = Desired::default();
    for (key, ports) in model {
        d.merge(&desired_service(key, ports, opts));
    }
    d
}

/// The desired state of one Service.
pub fn desired_service(key: &ServiceKey, ports: &[ServicePort], opts: &DesiredOpts) -> Desired {
    let mut d = Desired::default();
    for sp in ports {
        add_port(&mut d, key, sp, opts);
    }
    d
}

impl Desired {
    /// Adds `other` to this state.
    pub fn merge(&mut self, other: &Desired) {
        for (k, v) in &other.services {
            self.services.insert(*k, v.clone());
        }
        for (k, v) in &other.owner {
            self.owner.insert(*k, v.clone());
        }
        self.addresses.extend(other.addresses.iter().copied());
        for (s, es) in &other.sets.0 {
            self.sets.0.entry(s).or_default().extend(es.iter().copied());
        }
    }
}

fn add_port(d: &mut Desired, key: &ServiceKey, sp: &ServicePort, opts: &DesiredOpts) {
    let conf = VsConf {
        sched: opts.scheduler.clone(),
        flags: if sp.affinity_seconds.is_some() {
            IP_VS_SVC_F_PERSISTENT
        } else {
            0
        },
        timeout: sp
            .affinity_seconds
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(0),
    };
    let proto = sp.protocol.number();
    fn v4(eps: Vec<&Endpoint>) -> Vec<&Endpoint> {
        eps.into_iter().filter(|e| e.ip.is_ipv4()).collect()
    }
    let internal = v4(if sp.internal_local {
        sp.local_endpoints()
    } else {
        sp.cluster_endpoints()
    });
    let external = v4(if sp.external_local {
        sp.local_endpoints()
    } else {
        sp.cluster_endpoints()
    });
    let mut add = |addr: IpAddr, port: u16, eps: &[&Endpoint], bind: bool| {
        if !addr.is_ipv4() {
            return;
        }
        let k = VsKey { proto, addr, port };
        d.services.insert(k, (conf.clone(), dests(eps)));
        d.owner.insert(k, key.clone());
        if bind {
            d.addresses.insert(addr);
        }
    };
    for ip in &sp.cluster_ips {
        add(*ip, sp.port, &internal, true);
    }
    for ip in &sp.external_ips {
        add(*ip, sp.port, &external, true);
    }
    for ip in &sp.lb_ips {
        add(*ip, sp.port, &external, true);
    }
    if let Some(np) = sp.node_port {
        for ip in &opts.node_ips {
            add(*ip, np, &external, false);
        }
    }
    d.sets.add_port(sp, &internal);
}

/// One change to the kernel's IPVS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a virtual service.
    AddService(VsKey, VsConf),
    /// Change a virtual service's settings.
    SetService(VsKey, VsConf),
    /// Delete a virtual service (and its real servers).
    DelService(VsKey),
    /// Add a real server.
    AddDest(VsKey, DestKey, u32),
    /// Change a real server's weight (0 = draining).
    SetDest(VsKey, DestKey, u32),
    /// Delete a real server.
    DelDest(VsKey, DestKey),
}

/// Draining rules for real servers that are no longer wanted.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// Now.
    pub now: Instant,
    /// Upper bound on draining; a server is deleted after it even with connections left.
    pub bound: Duration,
}

/// The operations that turn `current` into `desired` for the virtual services in `scope`
/// (None = all of them). Real servers that are no longer wanted are set to weight 0 first
/// and deleted once they have no active connection (closing and closed TCP connections
/// are expired by `expire_nodest_conn`) or have drained for longer than the bound
/// (`draining` holds when they started); UDP servers are deleted at once, since UDP
/// "connections" only end by timeout. Virtual services not wanted are deleted.
pub fn diff(
    current: &BTreeMap<VsKey, KernelVs>,
    desired: &BTreeMap<VsKey, (VsConf, BTreeMap<DestKey, u32>)>,
    scope: Option<&BTreeSet<VsKey>>,
    draining: &BTreeMap<(VsKey, DestKey), Instant>,
    drain: Drain,
) -> Vec<Op> {
    let in_scope = |k: &VsKey| scope.is_none_or(|s| s.contains(k));
    let mut ops = Vec::new();
    for k in current.keys().filter(|k| in_scope(k)) {
        if !desired.contains_key(k) {
            ops.push(Op::DelService(*k));
        }
    }
    for (k, (conf, want)) in desired.iter().filter(|(k, _)| in_scope(k)) {
        let Some(cur) = current.get(k) else {
            ops.push(Op::AddService(*k, conf.clone()));
            for (dk, w) in want {
                ops.push(Op::AddDest(*k, *dk, *w));
            }
            continue;
        };
        if !conf.same(&cur.conf) {
            ops.push(Op::SetService(*k, conf.clone()));
        }
        let have: BTreeMap<DestKey, &Dest> = cur.dests.iter().map(|d| (d.key, d)).collect();
        for (dk, w) in want {
            match have.get(dk) {
                None => ops.push(Op::AddDest(*k, *dk, *w)),
                Some(d) if d.weight != *w || d.fwd != super::genl::IP_VS_CONN_F_MASQ => {
                    ops.push(Op::SetDest(*k, *dk, *w));
                }
                Some(_) => {}
            }
        }
        for (dk, d) in &have {
            if want.contains_key(dk) {
                continue;
            }
            let udp = k.proto == 17;
            let idle = d.active == 0;
            let expired = draining
                .get(&(*k, *dk))
                .is_some_and(|t| drain.now.saturating_duration_since(*t) >= drain.bound);
            if udp || idle || expired {
                ops.push(Op::DelDest(*k, *dk));
            } else if d.weight != 0 {
                ops.push(Op::SetDest(*k, *dk, 0));
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build_service;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn vk(addr: &str, port: u16) -> VsKey {
        VsKey {
            proto: 6,
            addr: addr.parse().expect("ip"),
            port,
        }
    }
    fn dk(addr: &str) -> DestKey {
        DestKey {
            addr: addr.parse().expect("ip"),
            port: 8080,
        }
    }
    fn rr() -> VsConf {
        VsConf {
            sched: "rr".into(),
            flags: 0,
            timeout: 0,
        }
    }
    fn kd(addr: &str, weight: u32, active: u32) -> Dest {
        Dest {
            key: dk(addr),
            weight,
            fwd: 0,
            active,
            inactive: 0,
        }
    }
    fn drain() -> Drain {
        Drain {
            now: Instant::now(),
            bound: Duration::from_secs(60),
        }
    }

    fn model(yaml_svc: &str, yaml_slice: &str) -> Model {
        let svc: Service = serde_yaml::from_str(yaml_svc).expect("svc");
        let sl: EndpointSlice = serde_yaml::from_str(yaml_slice).expect("slice");
        let ports = build_service(&svc, &[&sl], "node-a", &mut Vec::new()).expect("build");
        let mut m = Model::new();
        m.insert(ports[0].key.clone(), ports);
        m
    }

    #[test]
    fn desired_state_of_a_nodeport_with_affinity() {
        let m = model(
            "metadata: {name: web, namespace: ns}
spec: {type: NodePort, clusterIP: 10.96.0.10, externalIPs: [198.51.100.7], sessionAffinity: ClientIP,
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}},
  ports: [{name: http, port: 80, nodePort: 30080}]}",
            "metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11]}
- {addresses: [10.244.1.12], conditions: {ready: false, serving: true, terminating: true}}",
        );
        let d = desired(
            &m,
            &DesiredOpts {
                scheduler: "wrr".into(),
                node_ips: vec![
                    "192.0.2.1".parse().expect("ip"),
                    "192.0.2.2".parse().expect("ip"),
                ],
            },
        );
        let keys: Vec<String> = d.services.keys().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            [
                "TCP 10.96.0.10:80",
                "TCP 192.0.2.1:30080",
                "TCP 192.0.2.2:30080",
                "TCP 198.51.100.7:80"
            ]
        );
        let (conf, ds) = &d.services[&vk("10.96.0.10", 80)];
        assert_eq!(conf.sched, "wrr");
        assert_eq!(conf.flags, IP_VS_SVC_F_PERSISTENT);
        assert_eq!(conf.timeout, 600);
        // The terminating endpoint is not used while a ready one exists.
        assert_eq!(ds.keys().copied().collect::<Vec<_>>(), [dk("10.244.1.11")]);
        let addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.96.0.10", "198.51.100.7"]);
    }

    #[test]
    fn nothing_changed_means_no_ops() {
        let mut desired = BTreeMap::new();
        desired.insert(
            vk("10.96.0.1", 80),
            (
                rr(),
                BTreeMap::from([(dk("10.0.0.1"), 1), (dk("10.0.0.2"), 1)]),
            ),
        );
        let mut current = BTreeMap::new();
        current.insert(
            vk("10.96.0.1", 80),
            KernelVs {
                conf: VsConf {
                    flags: 2, // HASHED, set by the kernel
                    timeout: 300,
                    ..rr()
                },
                dests: vec![kd("10.0.0.1", 1, 3), kd("10.0.0.2", 1, 0)],
            },
        );
        assert_eq!(
            diff(&current, &desired, None, &BTreeMap::new(), drain()),
            []
        );
    }

    #[test]
    fn table_of_changes() {
        let s = vk("10.96.0.1", 80);
        let want =
            |ds: &[&str]| BTreeMap::from([(s, (rr(), ds.iter().map(|a| (dk(a), 1)).collect()))]);
        let have = |ds: Vec<Dest>| {
            BTreeMap::from([(
                s,
                KernelVs {
                    conf: rr(),
                    dests: ds,
                },
            )])
        };
        let old = Instant::now() - Duration::from_secs(120);
        let recent = Instant::now();
        type Case = (
            &'static str,
            BTreeMap<VsKey, KernelVs>,
            BTreeMap<VsKey, (VsConf, BTreeMap<DestKey, u32>)>,
            BTreeMap<(VsKey, DestKey), Instant>,
            Vec<Op>,
        );
        let cases: Vec<Case> = vec![
            (
                "new service",
                BTreeMap::new(),
                want(&["10.0.0.1"]),
                BTreeMap::new(),
                vec![Op::AddService(s, rr()), Op::AddDest(s, dk("10.0.0.1"), 1)],
            ),
            (
                "service gone",
                have(vec![kd("10.0.0.1", 1, 0)]),
                BTreeMap::new(),
                BTreeMap::new(),
                vec![Op::DelService(s)],
            ),
            (
                "removed endpoint with connections drains",
                have(vec![kd("10.0.0.1", 1, 0), kd("10.0.0.2", 1, 2)]),
                want(&["10.0.0.1"]),
                BTreeMap::new(),
                vec![Op::SetDest(s, dk("10.0.0.2"), 0)],
            ),
            (
                "draining endpoint still busy is left alone",
                have(vec![kd("10.0.0.1", 1, 0), kd("10.0.0.2", 0, 2)]),
                want(&["10.0.0.1"]),
                BTreeMap::from([((s, dk("10.0.0.2")), recent)]),
                vec![],
            ),
            (
                "drained endpoint is deleted (closing connections do not count)",
                have(vec![
                    kd("10.0.0.1", 1, 0),
                    Dest {
                        inactive: 3,
                        ..kd("10.0.0.2", 0, 0)
                    },
                ]),
                want(&["10.0.0.1"]),
                BTreeMap::from([((s, dk("10.0.0.2")), recent)]),
                vec![Op::DelDest(s, dk("10.0.0.2"))],
            ),
            (
                "draining past the bound is deleted",
                have(vec![kd("10.0.0.1", 1, 0), kd("10.0.0.2", 0, 5)]),
                want(&["10.0.0.1"]),
                BTreeMap::from([((s, dk("10.0.0.2")), old)]),
                vec![Op::DelDest(s, dk("10.0.0.2"))],
            ),
            (
                "scheduler and weight repaired",
                BTreeMap::from([(
                    s,
                    KernelVs {
                        conf: VsConf {
                            sched: "lc".into(),
                            ..rr()
                        },
                        dests: vec![kd("10.0.0.1", 0, 0)],
                    },
                )]),
                want(&["10.0.0.1"]),
                BTreeMap::new(),
                vec![Op::SetService(s, rr()), Op::SetDest(s, dk("10.0.0.1"), 1)],
            ),
        ];
        for (name, cur, des, draining, ops) in cases {
            assert_eq!(diff(&cur, &des, None, &draining, drain()), ops, "{name}");
        }
    }

    #[test]
    fn udp_endpoints_are_removed_at_once_and_scope_limits_the_diff() {
        let u = VsKey {
            proto: 17,
            ..vk("10.96.0.2", 53)
        };
        let other = vk("10.96.0.3", 80);
        let current = BTreeMap::from([
            (
                u,
                KernelVs {
                    conf: rr(),
                    dests: vec![
                        kd("10.0.0.1", 1, 0),
                        Dest {
                            inactive: 4,
                            ..kd("10.0.0.2", 1, 0)
                        },
                    ],
                },
            ),
            (
                other,
                KernelVs {
                    conf: rr(),
                    dests: vec![],
                },
            ),
        ]);
        let desired = BTreeMap::from([(u, (rr(), BTreeMap::from([(dk("10.0.0.1"), 1)])))]);
        let scope = BTreeSet::from([u]);
        assert_eq!(
            diff(&current, &desired, Some(&scope), &BTreeMap::new(), drain()),
            [Op::DelDest(u, dk("10.0.0.2"))]
        );
    }
}
