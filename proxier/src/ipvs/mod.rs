//! IPVS mode (kube-proxy's `--proxy-mode ipvs`): a virtual service per ClusterIP, NodePort
//! (on each node address), external IP and load-balancer ingress IP and port, a real
//! server per endpoint with masquerading (NAT) forwarding, service addresses on a dummy
//! device, ipsets for the few iptables rules IPVS still needs, and a diff-based sync that
//! reads the kernel's table and applies only the difference. All kernel traffic is
//! netlink (generic netlink IPVS, nfnetlink ipset, rtnetlink); iptables is touched only
//! to install a fixed set of rules, whatever the number of services.

pub mod diff;
pub mod genl;
pub mod ipset;
pub mod link;
pub mod nl;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use self::diff::{desired_service, diff, Desired, DesiredOpts, Drain, Op};
use self::genl::{DestKey, IpvsClient, KernelVs, VsKey};
use self::ipset::{Entry, IpsetClient};
use self::link::LinkClient;
use self::nl::{MsgBuilder, NlError};
use crate::iptables::{Iptables, RealIptables, RenderOpts, CANARY, MASQ_MARK};
use crate::model::{Model, ServiceKey};
use crate::proxier::{Backend, SyncError, SyncStats};

pub use self::genl::MODULES;

/// Schedulers IPVS mode accepts.
pub const SCHEDULERS: &[&str] = &["rr", "wrr", "lc", "sh"];
/// Default name of the dummy device.
pub const DEFAULT_DEVICE: &str = "kube-ipvs0";

/// IPVS mode options.
#[derive(Debug, Clone)]
pub struct IpvsOpts {
    /// Scheduler of every virtual service (rr, wrr, lc, sh).
    pub scheduler: String,
    /// Dummy device holding the service addresses.
    pub device: String,
    /// Longest time a removed real server is kept (weight 0) while connections drain.
    pub drain_bound: Duration,
    /// Masquerade and NodePort address options, as for the iptables backend.
    pub render: RenderOpts,
    /// iptables flavour: "" (system default), "nft" or "legacy".
    pub iptables_variant: String,
}

impl Default for IpvsOpts {
    fn default() -> Self {
        Self {
            scheduler: "rr".into(),
            device: DEFAULT_DEVICE.into(),
            drain_bound: Duration::from_secs(900),
            render: RenderOpts::default(),
            iptables_variant: String::new(),
        }
    }
}

/// What the last sync did to the kernel (for tests and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpvsStats {
    /// Full sync.
    pub full: bool,
    /// IPVS service/destination operations applied.
    pub ops: usize,
    /// Addresses added to or removed from the dummy device.
    pub addr_changes: usize,
    /// ipset members added or removed (a full sync counts every member it loads).
    pub set_changes: usize,
    /// Virtual services in the desired state.
    pub services: usize,
    /// Real servers in the desired state.
    pub dests: usize,
}

/// IPVS backend failures.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// A netlink request (IPVS, ipset, rtnetlink) failed.
    #[error(transparent)]
    Netlink(#[from] NlError),
    /// `--ipvs-scheduler` names no scheduler hako knows.
    #[error("unknown IPVS scheduler {name:?} (one of {known})")]
    Scheduler {
        /// The name given.
        name: String,
        /// The known ones, comma-separated.
        known: String,
    },
    /// `--ipvs-device` is not a valid interface name.
    #[error("bad IPVS device name {0:?} (1 to 15 characters)")]
    Device(String),
    /// An `iptables` command for the fixed jumps could not run.
    #[error("running {cmd}: {source}")]
    Spawn {
        /// The binary.
        cmd: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An `iptables` command for the fixed jumps failed.
    #[error("{cmd}: {stderr}")]
    Iptables {
        /// The command line.
        cmd: String,
        /// Its error output.
        stderr: String,
    },
}

fn ipvs_err(e: NlError) -> SyncError {
    SyncError::Ipvs(IpvsError::Netlink(e))
}

/// The sysctls IPVS mode needs: (path under /proc/sys, value, why).
pub fn required_sysctls(kernel_release: &str) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut v = vec![
        (
            "net/ipv4/vs/conntrack",
            "1",
            "iptables masquerading of IPVS traffic",
        ),
        (
            "net/ipv4/vs/expire_nodest_conn",
            "1",
            "connections to removed real servers end at once",
        ),
        (
            "net/ipv4/vs/expire_quiescent_template",
            "1",
            "persistence does not stick to weight-0 servers",
        ),
    ];
    // Before 5.9, conn_reuse_mode=1 delays reused ports by a second; kube-proxy sets 0 there.
    let mut it = kernel_release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (maj, min) < (5, 9) {
        v.push((
            "net/ipv4/vs/conn_reuse_mode",
            "0",
            "no 1 s delay for reused source ports",
        ));
    } else {
        v.push((
            "net/ipv4/vs/conn_reuse_mode",
            "1",
            "reused source ports are rescheduled",
        ));
    }
    v
}

/// Sets the required sysctls in the calling thread's network namespace; returns the ones
/// that could not be set, as messages.
pub fn set_sysctls() -> Vec<String> {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut failed = Vec::new();
    for (path, value, why) in required_sysctls(rel.trim()) {
        let full = format!("/proc/sys/{path}");
        let cur = std::fs::read_to_string(&full).map(|s| s.trim().to_string());
        if cur.as_deref().ok() == Some(value) {
            continue;
        }
        if let Err(e) = std::fs::write(&full, value) {
            failed.push(format!("{} = {value} ({why}): {e}", path.replace('/', ".")));
        }
    }
    failed
}

/// The fixed iptables rules of IPVS mode (`iptables-restore --noflush` input). Their number
/// does not depend on the services: membership lives in the ipsets.
pub fn base_rules(o: &RenderOpts) -> String {
    let mut t = String::new();
    t.push_str("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-NODE-PORT",
        "KUBE-EXTERNAL",
    ] {
        let _ = writeln!(t, ":{c} - [0:0]");
    }
    let cm = "-m comment --comment";
    if o.masquerade_all {
        let _ = writeln!(t, "-A KUBE-SERVICES {cm} \"service cluster IP + port, masquerade all\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ");
    } else if let Some(cidr) = o
        .cluster_cidr
        .as_deref()
        .and_then(|c| c.split(',').map(str::trim).find(|c| !c.contains(':')))
    {
        let _ = writeln!(t, "-A KUBE-SERVICES {cm} \"service cluster IP + port from outside the cluster\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s {cidr} -j KUBE-MARK-MASQ");
    }
    let _ = writeln!(t, "-A KUBE-SERVICES {cm} \"external IP + port\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -j KUBE-EXTERNAL");
    let _ = writeln!(t, "-A KUBE-SERVICES {cm} \"load balancer IP + port\" -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-EXTERNAL");
    let _ = writeln!(
        t,
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT"
    );
    let _ = writeln!(t, "-A KUBE-EXTERNAL {cm} \"externalTrafficPolicy Local keeps the client IP\" -m set --match-set KUBE-EXTERNAL-LOCAL dst,dst -j RETURN");
    let _ = writeln!(t, "-A KUBE-EXTERNAL -j KUBE-MARK-MASQ");
    for p in ["tcp", "udp", "sctp"] {
        let up = p.to_uppercase();
        let _ = writeln!(
            t,
            "-A KUBE-NODE-PORT -p {p} -m set --match-set KUBE-NODE-PORT-LOCAL-{up} dst -j RETURN"
        );
        let _ = writeln!(
            t,
            "-A KUBE-NODE-PORT -p {p} -m set --match-set KUBE-NODE-PORT-{up} dst -j KUBE-MARK-MASQ"
        );
    }
    let _ = writeln!(t, "-A KUBE-POSTROUTING {cm} \"hairpin: endpoint reaching itself through its service\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE");
    let _ = writeln!(
        t,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(t, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(t, "-A KUBE-POSTROUTING {cm} \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    let _ = writeln!(t, "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    t.push_str("COMMIT\n*filter\n");
    for c in ["KUBE-NODE-PORT", "KUBE-IPVS-FILTER", "KUBE-FORWARD"] {
        let _ = writeln!(t, ":{c} - [0:0]");
    }
    for p in ["tcp", "udp", "sctp"] {
        let up = p.to_uppercase();
        let _ = writeln!(
            t,
            "-A KUBE-NODE-PORT -p {p} -m set --match-set KUBE-NODE-PORT-{up} dst -j ACCEPT"
        );
    }
    let _ = writeln!(t, "-A KUBE-IPVS-FILTER {cm} \"loadBalancerSourceRanges\" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -m set ! --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j DROP");
    for s in ["KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-LOAD-BALANCER"] {
        let _ = writeln!(
            t,
            "-A KUBE-IPVS-FILTER -m set --match-set {s} dst,dst -j RETURN"
        );
    }
    let _ = writeln!(t, "-A KUBE-IPVS-FILTER {cm} \"other ports of service addresses\" -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT");
    let _ = writeln!(t, "-A KUBE-FORWARD -m mark --mark {MASQ_MARK} -j ACCEPT");
    let _ = writeln!(
        t,
        "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    t.push_str("COMMIT\n");
    t
}

/// Jumps from the built-in chains: (table, chain, rule arguments).
pub const JUMPS: &[(&str, &str, &[&str])] = &[
    ("nat", "PREROUTING", &["-j", "KUBE-SERVICES"]),
    ("nat", "OUTPUT", &["-j", "KUBE-SERVICES"]),
    ("nat", "POSTROUTING", &["-j", "KUBE-POSTROUTING"]),
    ("filter", "INPUT", &["-j", "KUBE-NODE-PORT"]),
    ("filter", "INPUT", &["-j", "KUBE-IPVS-FILTER"]),
    ("filter", "FORWARD", &["-j", "KUBE-FORWARD"]),
];

fn ensure_jumps(ipt: &RealIptables) -> Result<(), SyncError> {
    for (table, chain, rule) in JUMPS {
        let check = ipt
            .command(&ipt.iptables)
            .args(crate::iptables::WAIT_ARGS)
            .args(["-t", table, "-C", chain])
            .args(*rule)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if matches!(check, Ok(s) if s.success()) {
            continue;
        }
        let out = ipt
            .command(&ipt.iptables)
            .args(crate::iptables::WAIT_ARGS)
            .args(["-t", table, "-I", chain])
            .args(*rule)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| IpvsError::Spawn {
                cmd: ipt.iptables.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(IpvsError::Iptables {
                cmd: format!("{} -t {table} -I {chain} {}", ipt.iptables, rule.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }
            .into());
        }
    }
    Ok(())
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (a, l) = cidr.split_once('/').unwrap_or((cidr, "32"));
    match (a.trim().parse::<Ipv4Addr>(), l.trim().parse::<u32>()) {
        (Ok(net), Ok(len)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(ip) & mask == u32::from(net) & mask
        }
        _ => false,
    }
}

/// Node addresses that get NodePort virtual services: every IPv4 address except loopback
/// and the dummy device's, narrowed to `--nodeport-addresses` when given.
pub fn node_ips(addrs: &[link::IfAddr], dummy: u32, cidrs: &[String]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| a.index != dummy && !a.ip.is_loopback())
        .filter(|a| cidrs.is_empty() || cidrs.iter().any(|c| in_cidr(a.ip, c)))
        .map(|a| IpAddr::V4(a.ip))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The IPVS backend.
pub struct IpvsBackend {
    ipvs: IpvsClient,
    ipset: IpsetClient,
    link: LinkClient,
    ipt: RealIptables,
    opts: IpvsOpts,
    ifindex: u32,
    node_ips: Vec<IpAddr>,
    frags: BTreeMap<ServiceKey, Desired>,
    owner: BTreeMap<VsKey, ServiceKey>,
    addr_refs: BTreeMap<IpAddr, usize>,
    set_refs: BTreeMap<(&'static str, Entry), usize>,
    draining: BTreeMap<(VsKey, DestKey), Instant>,
    base_ok: bool,
    sysctls_done: bool,
    total: usize,
    stats: Arc<Mutex<IpvsStats>>,
}

/// Virtual services plus real servers of a desired state.
fn size(d: &Desired) -> usize {
    d.services.len() + d.services.values().map(|(_, ds)| ds.len()).sum::<usize>()
}

impl IpvsBackend {
    /// Opens the netlink sockets in the calling thread's network namespace. Fails with a
    /// message naming the modules when the kernel has no IPVS, and on a bad scheduler.
    pub fn new(opts: IpvsOpts) -> Result<Self, SyncError> {
        if !SCHEDULERS.contains(&opts.scheduler.as_str()) {
            return Err(IpvsError::Scheduler {
                name: opts.scheduler.clone(),
                known: SCHEDULERS.join(", "),
            }
            .into());
        }
        if opts.device.is_empty() || opts.device.len() > 15 {
            return Err(IpvsError::Device(opts.device.clone()).into());
        }
        let ipvs = IpvsClient::open().map_err(ipvs_err)?;
        Ok(Self {
            ipvs,
            ipset: IpsetClient::open().map_err(ipvs_err)?,
            link: LinkClient::open().map_err(ipvs_err)?,
            ipt: RealIptables::with_variant(&opts.iptables_variant),
            opts,
            ifindex: 0,
            node_ips: Vec::new(),
            frags: BTreeMap::new(),
            owner: BTreeMap::new(),
            addr_refs: BTreeMap::new(),
            set_refs: BTreeMap::new(),
            draining: BTreeMap::new(),
            base_ok: false,
            sysctls_done: false,
            total: 0,
            stats: Arc::default(),
        })
    }

    /// A handle on the figures of the last sync.
    pub fn stats(&self) -> Arc<Mutex<IpvsStats>> {
        self.stats.clone()
    }

    /// The IPVS client (for inspection).
    pub fn client(&mut self) -> &mut IpvsClient {
        &mut self.ipvs
    }

    fn dopts(&self) -> DesiredOpts {
        DesiredOpts {
            scheduler: self.opts.scheduler.clone(),
            node_ips: self.node_ips.clone(),
        }
    }

    fn read_kernel(
        &mut self,
        keys: Option<&BTreeSet<VsKey>>,
    ) -> Result<BTreeMap<VsKey, KernelVs>, SyncError> {
        let mut out = BTreeMap::new();
        let list: Vec<(VsKey, genl::VsConf)> = match keys {
            None => self.ipvs.services().map_err(ipvs_err)?,
            Some(ks) => {
                let mut v = Vec::new();
                for k in ks {
                    if let Some(c) = self.ipvs.service(k).map_err(ipvs_err)? {
                        v.push((*k, c));
                    }
                }
                v
            }
        };
        for (k, conf) in list {
            let dests = self.ipvs.dests(&k).map_err(ipvs_err)?;
            out.insert(k, KernelVs { conf, dests });
        }
        Ok(out)
    }

    fn apply_ops(
        &mut self,
        ops: &[Op],
        wanted: &BTreeMap<VsKey, (genl::VsConf, BTreeMap<DestKey, u32>)>,
    ) -> Result<(), SyncError> {
        let fam = self.ipvs.family();
        let msgs: Vec<(MsgBuilder, String)> = ops
            .iter()
            .map(|op| match op {
                Op::AddService(k, c) => (
                    genl::service_msg(fam, false, k, c),
                    format!("adding IPVS service {k}"),
                ),
                Op::SetService(k, c) => (
                    genl::service_msg(fam, true, k, c),
                    format!("updating IPVS service {k}"),
                ),
                Op::DelService(k) => (
                    genl::del_service_msg(fam, k),
                    format!("deleting IPVS service {k}"),
                ),
                Op::AddDest(k, d, w) => (
                    genl::dest_msg(fam, false, k, d, *w),
                    format!("adding real server {d} to {k}"),
                ),
                Op::SetDest(k, d, w) => (
                    genl::dest_msg(fam, true, k, d, *w),
                    format!("setting real server {d} of {k} to weight {w}"),
                ),
                Op::DelDest(k, d) => (
                    genl::del_dest_msg(fam, k, d),
                    format!("deleting real server {d} of {k}"),
                ),
            })
            .collect();
        let now = Instant::now();
        for op in ops {
            match op {
                Op::SetDest(k, d, 0)
                    if !wanted.get(k).is_some_and(|(_, ds)| ds.contains_key(d)) =>
                {
                    self.draining.entry((*k, *d)).or_insert(now);
                }
                Op::DelDest(k, d) => {
                    self.draining.remove(&(*k, *d));
                }
                Op::DelService(k) => self.draining.retain(|(kk, _), _| kk != k),
                _ => {}
            }
        }
        // Servers wanted again stop draining.
        self.draining
            .retain(|(k, d), _| !wanted.get(k).is_some_and(|(_, ds)| ds.contains_key(d)));
        self.ipvs.apply(&msgs).map_err(ipvs_err)
    }

    fn full_sync(&mut self, model: &Model) -> Result<SyncStats, SyncError> {
        if !self.sysctls_done {
            for f in set_sysctls() {
                warn!(sysctl = %f, "IPVS mode needs this sysctl and it could not be set");
            }
            self.sysctls_done = true;
        }
        self.ifindex = self
            .link
            .ensure_dummy(&self.opts.device)
            .map_err(ipvs_err)?;
        self.ipset.ensure_sets().map_err(ipvs_err)?;
        self.ipt.restore(&base_rules(&self.opts.render))?;
        ensure_jumps(&self.ipt)?;
        let addrs = self.link.addresses().map_err(ipvs_err)?;
        self.node_ips = node_ips(&addrs, self.ifindex, &self.opts.render.nodeport_addresses);
        let dopts = self.dopts();
        self.frags = model
            .iter()
            .map(|(k, ports)| (k.clone(), desired_service(k, ports, &dopts)))
            .collect();
        let mut want = Desired::default();
        for f in self.frags.values() {
            want.merge(f);
        }
        // Virtual services are ours when their address is on the device, wanted, or a
        // node address; anything else in the table is left alone.
        let mut ours: BTreeSet<IpAddr> = addrs
            .iter()
            .filter(|a| a.index == self.ifindex)
            .map(|a| IpAddr::V4(a.ip))
            .collect();
        ours.extend(want.addresses.iter().copied());
        ours.extend(self.node_ips.iter().copied());
        let mut current = self.read_kernel(None)?;
        current.retain(|k, _| ours.contains(&k.addr));
        let drain = Drain {
            now: Instant::now(),
            bound: self.opts.drain_bound,
        };
        let ops = diff(&current, &want.services, None, &self.draining, drain);
        self.apply_ops(&ops, &want.services)?;
        let (a, d) = self
            .link
            .sync_addresses(self.ifindex, &want.addresses)
            .map_err(ipvs_err)?;
        self.ipset.replace_all(&want.sets).map_err(ipvs_err)?;
        self.owner = want.owner.clone();
        self.addr_refs.clear();
        self.set_refs.clear();
        for f in self.frags.values() {
            for ip in &f.addresses {
                *self.addr_refs.entry(*ip).or_default() += 1;
            }
            for (s, es) in &f.sets.0 {
                for e in es {
                    *self.set_refs.entry((s, *e)).or_default() += 1;
                }
            }
        }
        self.base_ok = true;
        self.total = size(&want);
        let dests: usize = want.services.values().map(|(_, d)| d.len()).sum();
        let st = IpvsStats {
            full: true,
            ops: ops.len(),
            addr_changes: a + d,
            set_changes: want.sets.len(),
            services: want.services.len(),
            dests,
        };
        debug!(?st, "IPVS full sync");
        if let Ok(mut g) = self.stats.lock() {
            *g = st;
        }
        Ok(SyncStats {
            full: true,
            services_written: model.len(),
            rules: want.services.len() + dests,
            bytes: 0,
            ..SyncStats::default()
        })
    }

    fn partial_sync(
        &mut self,
        model: &Model,
        changed: &BTreeSet<ServiceKey>,
    ) -> Result<SyncStats, SyncError> {
        let dopts = self.dopts();
        let mut scope: BTreeSet<VsKey> = self.draining.keys().map(|(k, _)| *k).collect();
        let mut new_frags = BTreeMap::new();
        for key in changed {
            let new = model
                .get(key)
                .map(|ports| desired_service(key, ports, &dopts))
                .unwrap_or_default();
            if let Some(old) = self.frags.get(key) {
                scope.extend(old.services.keys().copied());
            }
            scope.extend(new.services.keys().copied());
            new_frags.insert(key.clone(), new);
        }
        let mut want = BTreeMap::new();
        for k in &scope {
            let owner = self.owner.get(k);
            let frag = new_frags
                .iter()
                .find(|(_, f)| f.services.contains_key(k))
                .map(|(_, f)| f)
                .or_else(|| {
                    owner
                        .filter(|o| !changed.contains(*o))
                        .and_then(|o| self.frags.get(o))
                });
            if let Some(v) = frag.and_then(|f| f.services.get(k)) {
                want.insert(*k, v.clone());
            }
        }
        let current = self.read_kernel(Some(&scope))?;
        let drain = Drain {
            now: Instant::now(),
            bound: self.opts.drain_bound,
        };
        let ops = diff(&current, &want, Some(&scope), &self.draining, drain);
        self.apply_ops(&ops, &want)?;
        // Addresses and set members, reference-counted over services.
        let mut addr_add = Vec::new();
        let mut addr_del = Vec::new();
        let mut set_msgs = Vec::new();
        for (key, new) in new_frags {
            let old = self.frags.remove(&key).unwrap_or_default();
            self.total = (self.total + size(&new)).saturating_sub(size(&old));
            for k in old.services.keys() {
                if self.owner.get(k) == Some(&key) {
                    self.owner.remove(k);
                }
            }
            for ip in &old.addresses {
                if let Some(n) = self.addr_refs.get_mut(ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.addr_refs.remove(ip);
                        addr_del.push(*ip);
                    }
                }
            }
            for (s, es) in &old.sets.0 {
                for e in es {
                    if let Some(n) = self.set_refs.get_mut(&(s, *e)) {
                        *n -= 1;
                        if *n == 0 {
                            self.set_refs.remove(&(s, *e));
                            set_msgs.push((
                                ipset::entry_msg(false, s, e),
                                format!("removing {e:?} from ipset {s}"),
                            ));
                        }
                    }
                }
            }
            for ip in &new.addresses {
                let n = self.addr_refs.entry(*ip).or_default();
                *n += 1;
                if *n == 1 {
                    addr_add.push(*ip);
                }
            }
            for (s, es) in &new.sets.0 {
                for e in es {
                    let n = self.set_refs.entry((s, *e)).or_default();
                    *n += 1;
                    if *n == 1 {
                        set_msgs.push((
                            ipset::entry_msg(true, s, e),
                            format!("adding {e:?} to ipset {s}"),
                        ));
                    }
                }
            }
            for k in new.services.keys() {
                self.owner.insert(*k, key.clone());
            }
            if !new.services.is_empty() || !new.addresses.is_empty() {
                self.frags.insert(key, new);
            }
        }
        // An address re-added by another service in the same batch is not removed.
        addr_del.retain(|ip| !addr_add.contains(ip) && !self.addr_refs.contains_key(ip));
        let v4 = |v: &[IpAddr]| -> Vec<Ipv4Addr> {
            v.iter()
                .filter_map(|i| match i {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })
                .collect()
        };
        self.link
            .change(self.ifindex, &v4(&addr_add), &v4(&addr_del))
            .map_err(ipvs_err)?;
        self.ipset.apply(&set_msgs).map_err(ipvs_err)?;
        let st = IpvsStats {
            full: false,
            ops: ops.len(),
            addr_changes: addr_add.len() + addr_del.len(),
            set_changes: set_msgs.len(),
            services: self.owner.len(),
            dests: want.values().map(|(_, d)| d.len()).sum(),
        };
        debug!(?st, "IPVS partial sync");
        if let Ok(mut g) = self.stats.lock() {
            *g = st;
        }
        Ok(SyncStats {
            full: false,
            services_written: changed.len(),
            rules: self.total,
            bytes: 0,
            ..SyncStats::default()
        })
    }

    /// Whether the kernel's virtual services (ours) are exactly the expected ones.
    fn table_intact(&mut self) -> bool {
        let Ok(list) = self.ipvs.services() else {
            return false;
        };
        let ours: BTreeSet<VsKey> = list
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| self.addr_refs.contains_key(&k.addr) || self.node_ips.contains(&k.addr))
            .collect();
        let expected: BTreeSet<VsKey> = self.owner.keys().copied().collect();
        if ours != expected {
            info!(
                missing = expected.difference(&ours).count(),
                unexpected = ours.difference(&expected).count(),
                "IPVS table differs from the last sync; full sync"
            );
            return false;
        }
        true
    }
}

impl Backend for IpvsBackend {
    fn apply(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncStats, SyncError> {
        let r = match changed {
            Some(c) if self.base_ok => self.partial_sync(model, c),
            _ => self.full_sync(model),
        };
        if r.is_err() {
            self.base_ok = false;
        }
        r
    }

    fn needs_full(&mut self) -> bool {
        if !self.base_ok {
            return true;
        }
        if nix::net::if_::if_nametoindex(self.opts.device.as_str()).ok() != Some(self.ifindex) {
            info!(device = %self.opts.device, "IPVS device gone; full sync");
            return true;
        }
        if !matches!(self.ipt.chain_exists("mangle", CANARY), Ok(true)) {
            info!("canary chain gone; full sync");
            return true;
        }
        !self.table_intact()
    }

    fn has_pending_work(&self) -> bool {
        !self.draining.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_fixed_and_mention_the_cluster_cidr() {
        let o = RenderOpts {
            cluster_cidr: Some("10.244.0.0/16".into()),
            ..RenderOpts::default()
        };
        let t = base_rules(&o);
        let rules = t.lines().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(rules, 27, "{t}");
        assert!(t.contains(
            "-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"
        ));
        // Every set the rules name exists in the set list.
        for w in t.split_whitespace().collect::<Vec<_>>().windows(2) {
            if w[0] == "--match-set" {
                assert!(ipset::set_type(w[1]).is_some(), "unknown set {}", w[1]);
            }
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ipvs-rules.txt");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &t).expect("write golden");
        }
        let golden = std::fs::read_to_string(path).expect("golden");
        assert_eq!(
            t, golden,
            "testdata/ipvs-rules.txt is out of date (UPDATE_GOLDEN=1)"
        );
    }

    #[test]
    fn sysctls_per_kernel() {
        let old = required_sysctls("5.4.0-100-generic");
        assert!(old.contains(&(
            "net/ipv4/vs/conn_reuse_mode",
            "0",
            "no 1 s delay for reused source ports"
        )));
        let new = required_sysctls("6.1.0-27-amd64");
        assert!(new
            .iter()
            .any(|(p, v, _)| *p == "net/ipv4/vs/conn_reuse_mode" && *v == "1"));
        assert!(new
            .iter()
            .any(|(p, v, _)| *p == "net/ipv4/vs/conntrack" && *v == "1"));
    }

    #[test]
    fn node_ips_skip_loopback_and_the_device() {
        let a = |index, ip: &str| link::IfAddr {
            index,
            ip: ip.parse().expect("ip"),
            prefix: 24,
        };
        let addrs = [
            a(1, "127.0.0.1"),
            a(2, "192.0.2.1"),
            a(3, "10.96.0.1"),
            a(4, "198.51.100.4"),
        ];
        assert_eq!(
            node_ips(&addrs, 3, &[]),
            [
                "192.0.2.1".parse::<IpAddr>().expect("ip"),
                "198.51.100.4".parse().expect("ip")
            ]
        );
        assert_eq!(
            node_ips(&addrs, 3, &["192.0.2.0/24".into()]),
            ["192.0.2.1".parse::<IpAddr>().expect("ip")]
        );
    }
}
