//! kube-proxy-compatible iptables backend: a pure `render()` producing `iptables-restore`
//! input (full or partial), and the `Iptables` effect trait with a real implementation
//! (`iptables-restore --noflush -w`, one process per sync) and a fake.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base32::Alphabet;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, Model, ServiceKey, ServicePort};

/// Masquerade mark, as kube-proxy.
pub const MASQ_MARK: &str = "0x4000/0x4000";
/// Canary chain in mangle: when it is gone, the next sync is a full one.
pub const CANARY: &str = "KUBE-PROXY-CANARY";

/// Options that shape the rules.
#[derive(Debug, Clone, Default)]
pub struct RenderOpts {
    /// Pod CIDR of the cluster: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidr: Option<String>,
    /// Masquerade all service traffic.
    pub masquerade_all: bool,
    /// Node port addresses (CIDRs); empty = every local address.
    pub nodeport_addresses: Vec<String>,
    /// IPv4 NodePorts answered on 127.0.0.0/8 too (kube-proxy's
    /// `--iptables-localhost-nodeports`, on by default in `hako-proxy`), when the node port
    /// addresses include the loopback range. The backend then sets `route_localnet=1` and
    /// adds kube-proxy's safety rule (`KUBE-FIREWALL`: drop to 127.0.0.0/8 from elsewhere
    /// unless DNATed or established). iptables mode only (nftables and IPVS never answer
    /// NodePorts on loopback, as kube-proxy).
    pub localhost_nodeports: bool,
}

/// The chain of kube-proxy's (and the kubelet's) martian-source drop rule.
pub const FIREWALL: &str = "KUBE-FIREWALL";

/// kube-proxy's rule making localhost NodePorts safe (https://issue.k8s.io/90259): with
/// `route_localnet=1`, packets to 127.0.0.0/8 from elsewhere would otherwise be routed.
pub const LOCALNET_DROP: &str = "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP";

/// The jumps to [`FIREWALL`] from the built-in chains (kube-proxy's kubelet jump chains).
pub const FIREWALL_JUMPS: &[(&str, &str, &str)] = &[
    ("filter", "INPUT", "-j KUBE-FIREWALL"),
    ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
];

/// Whether IPv4 `cidr` (`a.b.c.d/n` or an address) holds 127.0.0.1. Unparsable: false.
fn holds_ipv4_loopback(cidr: &str) -> bool {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let (Ok(a), Ok(len)) = (
        addr.trim().parse::<std::net::Ipv4Addr>(),
        len.trim().parse::<u32>(),
    ) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(a) & mask == u32::from(std::net::Ipv4Addr::LOCALHOST) & mask
}

/// Whether IPv4 `cidr` lies inside 127.0.0.0/8 (only loopback addresses).
fn inside_ipv4_loopback(cidr: &str) -> bool {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    addr.trim()
        .parse::<std::net::Ipv4Addr>()
        .is_ok_and(|a| a.is_loopback())
        && len
            .trim()
            .parse::<u32>()
            .is_ok_and(|l| (8..=32).contains(&l))
}

/// Whether the `fam` proxier answers NodePorts on localhost: IPv4, the option on, and the
/// node port addresses (all local addresses when none is given) holding 127.0.0.1 — as
/// kube-proxy's `ContainsIPv4Loopback`.
pub fn localhost_nodeports(fam: Family, opts: &RenderOpts) -> bool {
    if fam != Family::V4 || !opts.localhost_nodeports {
        return false;
    }
    let v4: Vec<&String> = opts
        .nodeport_addresses
        .iter()
        .filter(|a| fam.has_cidr(a))
        .collect();
    v4.is_empty() || v4.iter().any(|a| holds_ipv4_loopback(a))
}

/// Rules per table of the iptables mode (kube-proxy's `table` label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableRules {
    /// filter rules owned after the sync.
    pub filter_total: usize,
    /// nat rules owned after the sync.
    pub nat_total: usize,
    /// filter rules written by the sync.
    pub filter_last: usize,
    /// nat rules written by the sync.
    pub nat_last: usize,
}

impl std::ops::AddAssign for TableRules {
    fn add_assign(&mut self, o: Self) {
        self.filter_total += o.filter_total;
        self.nat_total += o.nat_total;
        self.filter_last += o.filter_last;
        self.nat_last += o.nat_last;
    }
}

fn hash16(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let enc = base32::encode(Alphabet::Rfc4648 { padding: true }, &digest);
    enc[..16].to_string()
}

/// kube-proxy's `portProtoHash`-based chain name: prefix + 16 chars of
/// base32(sha256(servicePortName + protocol)).
pub fn service_chain(prefix: &str, sp: &ServicePort) -> String {
    format!(
        "{prefix}{}",
        hash16(&format!("{}{}", sp.port_name_string(), sp.protocol.lower()))
    )
}

/// kube-proxy's `servicePortEndpointChainName`.
pub fn endpoint_chain(sp: &ServicePort, ep: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!(
            "{}{}{}",
            sp.port_name_string(),
            sp.protocol.lower(),
            ep.addr()
        ))
    )
}

/// Chains (nat) owned by one service port, with whether each is needed.
#[derive(Debug, Clone)]
struct SvcChains {
    svc: String,
    svl: String,
    ext: String,
    fw: String,
}

impl SvcChains {
    fn of(sp: &ServicePort) -> Self {
        Self {
            svc: service_chain("KUBE-SVC-", sp),
            svl: service_chain("KUBE-SVL-", sp),
            ext: service_chain("KUBE-EXT-", sp),
            fw: service_chain("KUBE-FW-", sp),
        }
    }
}

/// IP family of one iptables proxier (kube-proxy runs one per family; dual-stack = both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Family {
    /// IPv4: `iptables-restore`.
    #[default]
    V4,
    /// IPv6: `ip6tables-restore`.
    V6,
}

impl Family {
    /// Whether `ip` belongs to this family.
    pub fn has(self, ip: &IpAddr) -> bool {
        match self {
            Self::V4 => ip.is_ipv4(),
            Self::V6 => ip.is_ipv6(),
        }
    }

    /// Whether a CIDR (or address) text belongs to this family.
    pub fn has_cidr(self, cidr: &str) -> bool {
        cidr.contains(':') == (self == Self::V6)
    }

    /// The `-m recent --mask` of a whole address, as iptables-save prints it.
    fn full_mask(self) -> &'static str {
        match self {
            Self::V4 => "255.255.255.255",
            Self::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        }
    }
}

fn ip_match(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

/// Renders a full IPv4 payload (`render_family` with `Family::V4`).
pub fn render(model: &Model, opts: &RenderOpts) -> Rendered {
    render_family(Family::V4, model, opts)
}

/// Renders a full payload of one family from scratch (no chains to delete): only that
/// family's cluster/external/LB IPs and endpoints, the `--cluster-cidr` and
/// `--nodeport-addresses` entries of that family (both options may hold one CIDR per family,
/// comma-separated).
pub fn render_family(fam: Family, model: &Model, opts: &RenderOpts) -> Rendered {
    Renderer::new(fam).full(model, opts, &BTreeSet::new())
}

/// Family-wide inputs of a render, derived once from the options.
struct Ctx {
    fam: Family,
    /// `! -s CIDR ` (or empty with `--masquerade-all`) for the off-cluster masquerade rule.
    masq_src: Option<String>,
    cluster_cidr: Option<String>,
    nodeport_addresses: Vec<String>,
    mask: &'static str,
    /// NodePorts on 127.0.0.0/8 (see [`localhost_nodeports`]).
    localhost: bool,
    /// kube-proxy's large cluster mode (see [`large_cluster`]): the endpoint chains' rules
    /// and the jumps to them go without comments.
    large: bool,
}

/// Endpoints above which kube-proxy's iptables mode drops the comments of the endpoint
/// chains' rules and of the jumps to them (its `largeClusterEndpointsThreshold`): a comment
/// match is 256 bytes in the kernel's table, so at 50,000 endpoints they are about 40 % of
/// the nat table, and every sync of iptables-legacy reads and replaces the whole table.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Whether `model` puts `fam` in large cluster mode: more than [`LARGE_CLUSTER_ENDPOINTS`]
/// endpoints of this family over all service ports, counted as kube-proxy counts them.
pub fn large_cluster(fam: Family, model: &Model) -> bool {
    let mut n = 0usize;
    for sp in model.values().flatten() {
        n += sp.endpoints.iter().filter(|e| fam.has(&e.ip)).count();
        if n > LARGE_CLUSTER_ENDPOINTS {
            return true;
        }
    }
    false
}

impl Ctx {
    fn new(fam: Family, opts: &RenderOpts, large: bool) -> Self {
        let cluster_cidr = opts.cluster_cidr.as_deref().and_then(|c| {
            c.split(',')
                .map(str::trim)
                .find(|c| fam.has_cidr(c))
                .map(str::to_string)
        });
        let masq_src = if opts.masquerade_all {
            Some(String::new())
        } else {
            cluster_cidr.as_ref().map(|c| format!("! -s {c} "))
        };
        Self {
            fam,
            masq_src,
            cluster_cidr,
            nodeport_addresses: opts
                .nodeport_addresses
                .iter()
                .filter(|a| fam.has_cidr(a))
                .cloned()
                .collect(),
            mask: fam.full_mask(),
            localhost: localhost_nodeports(fam, opts),
            large,
        }
    }
}

/// One service's share of a render: its lines in the shared chains and the names of its own
/// nat chains. Kept between syncs, so that a partial render costs only the changed services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SvcFrag {
    /// Its filter lines, then its nat `KUBE-SERVICES` lines, then its `KUBE-NODEPORTS`
    /// lines, split at `cut`.
    shared: String,
    cut: [usize; 2],
    /// Rules in `shared`.
    shared_rules: usize,
    /// Of those, rules in filter chains.
    filter_rules: usize,
    /// Its nat chains (`KUBE-SVC-*`, `KUBE-SVL-*`, `KUBE-EXT-*`, `KUBE-FW-*`, `KUBE-SEP-*`).
    chains: Vec<Box<str>>,
    /// Rules in those chains.
    chain_rules: usize,
}

impl SvcFrag {
    fn filter(&self) -> &str {
        &self.shared[..self.cut[0]]
    }
    fn nat(&self) -> &str {
        &self.shared[self.cut[0]..self.cut[1]]
    }
    fn nodeports(&self) -> &str {
        &self.shared[self.cut[1]..]
    }
}

/// Chains written by a render: declarations and rules.
#[derive(Default)]
struct ChainOut {
    decls: String,
    rules: String,
    count: usize,
}

impl ChainOut {
    fn chain(&mut self, chain: &str, rules: &str) {
        let _ = writeln!(self.decls, ":{chain} - [0:0]");
        self.count += rules.lines().count();
        self.rules.push_str(rules);
    }
}

/// Renders the rules of one service (all its ports) in one family; its chains' content goes
/// to `out`.
#[allow(clippy::too_many_lines)]
fn render_service(ctx: &Ctx, ports: &[ServicePort], out: &mut ChainOut) -> SvcFrag {
    let fam = ctx.fam;
    let mask = ctx.mask;
    let mut filter_rules = String::new();
    let mut nat_rules = String::new();
    let mut nodeports = String::new();
    let mut shared_rules = 0usize;
    let mut chains: Vec<Box<str>> = Vec::new();
    let before = out.count;
    for sp in ports {
        if !sp.cluster_ips.iter().any(|i| fam.has(i)) {
            continue;
        }
        let name = sp.port_name_string();
        let proto = sp.protocol.lower();
        let ch = SvcChains::of(sp);
        let cluster_eps: Vec<&Endpoint> = sp
            .cluster_endpoints()
            .into_iter()
            .filter(|e| fam.has(&e.ip))
            .collect();
        let local_eps: Vec<&Endpoint> = sp
            .local_endpoints()
            .into_iter()
            .filter(|e| fam.has(&e.ip))
            .collect();
        let has_ext = sp.has_external();
        let use_svc = !cluster_eps.is_empty();
        let use_svl =
            (sp.internal_local || (has_ext && sp.external_local)) && !local_eps.is_empty();
        let use_ext = has_ext && use_svc;
        let use_fw = use_ext && !sp.lb_ips.is_empty() && !sp.lb_source_ranges.is_empty();
        let internal_chain = if sp.internal_local { &ch.svl } else { &ch.svc };
        let internal_ok = if sp.internal_local { use_svl } else { use_svc };

        // Shared chains: KUBE-SERVICES entries.
        for cip in sp.cluster_ips.iter().filter(|i| fam.has(i)) {
            let d = ip_match(cip);
            if internal_ok {
                let _ = writeln!(nat_rules, "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {d} --dport {} -j {internal_chain}", sp.port);
            } else {
                let why = if use_svc {
                    "has no local endpoints"
                } else {
                    "has no endpoints"
                };
                let verdict = if use_svc { "DROP" } else { "REJECT" };
                let _ = writeln!(filter_rules, "-A KUBE-SERVICES -m comment --comment \"{name} {why}\" -m {proto} -p {proto} -d {d} --dport {} -j {verdict}", sp.port);
            }
            shared_rules += 1;
        }
        let ext_targets: Vec<(&IpAddr, &str)> = sp
            .external_ips
            .iter()
            .map(|i| (i, "external IP"))
            .chain(sp.lb_ips.iter().map(|i| (i, "loadbalancer IP")))
            .filter(|(i, _)| fam.has(i))
            .collect();
        let ext_ok = use_ext && (!sp.external_local || use_svl);
        for (ip, what) in &ext_targets {
            let d = ip_match(ip);
            if ext_ok {
                let target = if use_fw && *what == "loadbalancer IP" {
                    &ch.fw
                } else {
                    &ch.ext
                };
                let _ = writeln!(nat_rules, "-A KUBE-SERVICES -m comment --comment \"{name} {what}\" -m {proto} -p {proto} -d {d} --dport {} -j {target}", sp.port);
                if use_fw && *what == "loadbalancer IP" {
                    let _ = writeln!(filter_rules, "-A KUBE-PROXY-FIREWALL -m comment --comment \"{name} traffic not accepted by {}\" -m {proto} -p {proto} -d {d} --dport {} -j DROP", ch.fw, sp.port);
                    shared_rules += 1;
                }
            } else {
                let (why, verdict) = if use_svc {
                    ("has no local endpoints", "DROP")
                } else {
                    ("has no endpoints", "REJECT")
                };
                let _ = writeln!(filter_rules, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} {why}\" -m {proto} -p {proto} -d {d} --dport {} -j {verdict}", sp.port);
            }
            shared_rules += 1;
        }
        if let Some(np) = sp.node_port {
            if ext_ok {
                let _ = writeln!(nodeports, "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {}", ch.ext);
            } else {
                let (why, verdict) = if use_svc {
                    ("has no local endpoints", "DROP")
                } else {
                    ("has no endpoints", "REJECT")
                };
                let _ = writeln!(filter_rules, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} {why}\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {verdict}");
            }
            shared_rules += 1;
        }

        // Per-service chains.
        if use_svc {
            let mut r = String::new();
            for cip in sp.cluster_ips.iter().filter(|i| fam.has(i)) {
                if let Some(src) = &ctx.masq_src {
                    let _ = writeln!(r, "-A {} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {} {src}-j KUBE-MARK-MASQ", ch.svc, ip_match(cip), sp.port);
                }
            }
            endpoint_jumps(&mut r, &ch.svc, sp, &cluster_eps, ctx);
            out.chain(&ch.svc, &r);
            chains.push(ch.svc.as_str().into());
        }
        if use_svl {
            let mut r = String::new();
            endpoint_jumps(&mut r, &ch.svl, sp, &local_eps, ctx);
            out.chain(&ch.svl, &r);
            chains.push(ch.svl.as_str().into());
        }
        if use_ext {
            let mut r = String::new();
            if sp.external_local {
                if let Some(c) = &ctx.cluster_cidr {
                    let _ = writeln!(r, "-A {} -m comment --comment \"pod traffic for {name} external destinations\" -s {c} -j {}", ch.ext, ch.svc);
                }
                let _ = writeln!(r, "-A {} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ", ch.ext);
                let _ = writeln!(r, "-A {} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}", ch.ext, ch.svc);
                if use_svl {
                    let _ = writeln!(r, "-A {} -j {}", ch.ext, ch.svl);
                }
            } else {
                let _ = writeln!(r, "-A {} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ", ch.ext);
                let _ = writeln!(r, "-A {} -j {}", ch.ext, ch.svc);
            }
            out.chain(&ch.ext, &r);
            chains.push(ch.ext.as_str().into());
        }
        if use_fw {
            let mut r = String::new();
            for src in &sp.lb_source_ranges {
                let _ = writeln!(
                    r,
                    "-A {} -m comment --comment \"{name} loadbalancer IP\" -s {src} -j {}",
                    ch.fw, ch.ext
                );
            }
            out.chain(&ch.fw, &r);
            chains.push(ch.fw.as_str().into());
        }
        if use_svc || use_svl {
            for ep in sp.endpoints.iter().filter(|e| fam.has(&e.ip)) {
                let sep = endpoint_chain(sp, ep);
                let mut r = String::new();
                let comment = if ctx.large {
                    String::new()
                } else {
                    format!("-m comment --comment {name} ")
                };
                let _ = writeln!(
                    r,
                    "-A {sep} {comment}-s {} -j KUBE-MARK-MASQ",
                    ip_match(&ep.ip)
                );
                let recent = if sp.affinity_seconds.is_some() {
                    format!("-m recent --name {sep} --mask {mask} --rsource --set ")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    r,
                    "-A {sep} {comment}-m {proto} -p {proto} {recent}-j DNAT --to-destination {}",
                    ep.addr()
                );
                out.chain(&sep, &r);
                chains.push(sep.into());
            }
        }
    }
    let cut = [filter_rules.len(), filter_rules.len() + nat_rules.len()];
    let filter_n = filter_rules.lines().count();
    let mut shared = filter_rules;
    shared.push_str(&nat_rules);
    shared.push_str(&nodeports);
    // Kept until the service changes: no spare capacity (10,000 of them).
    shared.shrink_to_fit();
    chains.shrink_to_fit();
    SvcFrag {
        shared,
        cut,
        shared_rules,
        filter_rules: filter_n,
        chains,
        chain_rules: out.count - before,
    }
}

/// The output of one render.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    /// `iptables-restore` input.
    pub text: String,
    /// Rules written in this payload.
    pub rules: usize,
    /// Whether the payload rewrites the shared chains (always for a full render; for a
    /// partial one only when the changed services' lines in them changed).
    pub shared: bool,
    /// Rules per table, owned after this payload and written by it.
    pub tables: TableRules,
}

/// Incremental renderer of one family. It keeps each service's lines in the shared chains
/// and the names of its chains from the last render, so that a partial render writes the
/// changed services' chains only, renders nothing else, and rewrites the shared chains (by
/// concatenating the kept lines) only when the changed services' lines in them changed.
/// A render is speculative: after a failed restore, the caller must do a full render.
#[derive(Debug, Default)]
pub struct Renderer {
    fam: Family,
    frags: BTreeMap<ServiceKey, SvcFrag>,
    /// Whether the last render was in large cluster mode (its fragments are shaped by it).
    large: bool,
}

impl Renderer {
    /// A renderer with nothing rendered yet.
    pub fn new(fam: Family) -> Self {
        Self {
            fam,
            frags: BTreeMap::new(),
            large: false,
        }
    }

    /// The family it renders.
    pub fn family(&self) -> Family {
        self.fam
    }

    /// Every per-service nat chain of the last render.
    pub fn chains(&self) -> impl Iterator<Item = &str> {
        self.frags
            .values()
            .flat_map(|f| f.chains.iter().map(AsRef::as_ref))
    }

    /// Full render: every chain written. Chains of the last render and those in `present`
    /// (e.g. found in the kernel) that are no longer desired are flushed and deleted.
    pub fn full(
        &mut self,
        model: &Model,
        opts: &RenderOpts,
        present: &BTreeSet<String>,
    ) -> Rendered {
        self.large = large_cluster(self.fam, model);
        let ctx = Ctx::new(self.fam, opts, self.large);
        let mut stale: BTreeSet<String> = present.clone();
        stale.extend(self.chains().map(str::to_string));
        let mut out = ChainOut::default();
        self.frags.clear();
        for (key, ports) in model {
            let f = render_service(&ctx, ports, &mut out);
            self.frags.insert(key.clone(), f);
        }
        for c in self.chains() {
            stale.remove(c);
        }
        self.assemble(&ctx, true, &out, &stale)
    }

    /// Partial render of the `changed` services: their chains written, the chains they no
    /// longer need deleted, the shared chains rewritten only when their lines in them changed.
    /// When the change crosses the large cluster threshold ([`large_cluster`]), every
    /// service's chains change shape: the render is a full one.
    pub fn partial(
        &mut self,
        model: &Model,
        opts: &RenderOpts,
        changed: &BTreeSet<ServiceKey>,
    ) -> Rendered {
        if large_cluster(self.fam, model) != self.large {
            return self.full(model, opts, &BTreeSet::new());
        }
        let ctx = Ctx::new(self.fam, opts, self.large);
        let mut out = ChainOut::default();
        let mut shared = false;
        let mut stale = BTreeSet::new();
        for key in changed {
            let old = self.frags.remove(key);
            let new = model
                .get(key)
                .map(|ports| render_service(&ctx, ports, &mut out));
            let old_shared = old.as_ref().map_or("", |f| f.shared.as_str());
            let new_shared = new.as_ref().map_or("", |f| f.shared.as_str());
            shared |= old_shared != new_shared;
            if let Some(old) = old {
                for c in old.chains {
                    if !new.as_ref().is_some_and(|n| n.chains.contains(&c)) {
                        stale.insert(String::from(c));
                    }
                }
            }
            if let Some(new) = new {
                self.frags.insert(key.clone(), new);
            }
        }
        self.assemble(&ctx, shared, &out, &stale)
    }

    /// The payload: the shared chains in full when `shared` (from the kept lines), the
    /// chains in `out`, `stale` chains flushed and deleted.
    fn assemble(
        &self,
        ctx: &Ctx,
        shared: bool,
        out: &ChainOut,
        stale: &BTreeSet<String>,
    ) -> Rendered {
        let mut stale_decls = String::new();
        let mut deletes = String::new();
        for c in stale {
            let _ = writeln!(stale_decls, ":{c} - [0:0]");
            let _ = writeln!(deletes, "-X {c}");
        }
        let mut rules = out.count;
        if !shared {
            let mut text = String::with_capacity(
                out.decls.len() + out.rules.len() + 2 * stale_decls.len() + 16,
            );
            text.push_str("*nat\n");
            text.push_str(&out.decls);
            text.push_str(&stale_decls);
            text.push_str(&out.rules);
            text.push_str(&deletes);
            text.push_str("COMMIT\n");
            let (filter_total, nat_total) = self.totals(ctx);
            return Rendered {
                text,
                rules,
                shared: false,
                tables: TableRules {
                    filter_total,
                    nat_total,
                    filter_last: 0,
                    nat_last: rules,
                },
            };
        }
        let shared_len: usize = self.frags.values().map(|f| f.shared.len()).sum();
        let mut text = String::with_capacity(
            shared_len + out.decls.len() + out.rules.len() + 2 * stale_decls.len() + 4096,
        );
        text.push_str("*filter\n");
        for c in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
            "KUBE-NODEPORTS",
        ] {
            let _ = writeln!(text, ":{c} - [0:0]");
        }
        if ctx.localhost {
            let _ = writeln!(text, ":{FIREWALL} - [0:0]");
            rules += push_lines(&mut text, &[LOCALNET_DROP.to_string()]);
        }
        let statics = [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_string(),
            format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK} -j ACCEPT"),
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
        ];
        rules += push_lines(&mut text, &statics);
        for f in self.frags.values() {
            text.push_str(f.filter());
            rules += f.shared_rules;
        }
        let filter_written = rules
            - out.count
            - self
                .frags
                .values()
                .map(|f| f.shared_rules - f.filter_rules)
                .sum::<usize>();
        text.push_str("COMMIT\n*nat\n");
        for c in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            let _ = writeln!(text, ":{c} - [0:0]");
        }
        text.push_str(&out.decls);
        text.push_str(&stale_decls);
        let nat_statics = [
            format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN"),
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".to_string(),
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_string(),
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".to_string(),
        ];
        rules += push_lines(&mut text, &nat_statics);
        for f in self.frags.values() {
            text.push_str(f.nat());
        }
        // Node ports last in KUBE-SERVICES.
        rules += push_lines(&mut text, &nodeport_jumps(ctx));
        for f in self.frags.values() {
            text.push_str(f.nodeports());
        }
        text.push_str(&out.rules);
        text.push_str(&deletes);
        text.push_str("COMMIT\n");
        let (filter_total, nat_total) = self.totals(ctx);
        Rendered {
            text,
            rules,
            shared: true,
            tables: TableRules {
                filter_total,
                nat_total,
                filter_last: filter_written,
                nat_last: rules - filter_written,
            },
        }
    }

    /// Rules owned in filter and nat after a render (the kept lines, the chains, the
    /// static rules).
    fn totals(&self, ctx: &Ctx) -> (usize, usize) {
        let mut filter = 3 + usize::from(ctx.localhost);
        let mut nat = 4 + nodeport_jumps(ctx).len();
        for f in self.frags.values() {
            filter += f.filter_rules;
            nat += f.shared_rules - f.filter_rules + f.chain_rules;
        }
        (filter, nat)
    }
}

/// The jumps from `KUBE-SERVICES` to `KUBE-NODEPORTS`, last in the chain, as kube-proxy: for
/// every local address (less loopback unless localhost NodePorts are on; never `::1`), or
/// for each `--nodeport-addresses` CIDR (loopback-only CIDRs left out unless localhost
/// NodePorts are on).
fn nodeport_jumps(ctx: &Ctx) -> Vec<String> {
    let last = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    if ctx.nodeport_addresses.is_empty() {
        let not_lo = match ctx.fam {
            Family::V6 => " ! -d ::1/128",
            Family::V4 if !ctx.localhost => " ! -d 127.0.0.0/8",
            Family::V4 => "",
        };
        return vec![format!(
            "{last} -m addrtype --dst-type LOCAL{not_lo} -j KUBE-NODEPORTS"
        )];
    }
    ctx.nodeport_addresses
        .iter()
        .filter(|a| match ctx.fam {
            Family::V4 => ctx.localhost || !inside_ipv4_loopback(a),
            Family::V6 => !a
                .split('/')
                .next()
                .and_then(|x| x.trim().parse::<std::net::Ipv6Addr>().ok())
                .is_some_and(|x| x.is_loopback()),
        })
        .map(|a| format!("{last} -d {a} -j KUBE-NODEPORTS"))
        .collect()
}

/// Appends `lines`, one per line; returns how many.
fn push_lines(text: &mut String, lines: &[String]) -> usize {
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    lines.len()
}

fn endpoint_jumps(r: &mut String, chain: &str, sp: &ServicePort, eps: &[&Endpoint], ctx: &Ctx) {
    let mask = ctx.mask;
    let name = sp.port_name_string();
    let seps: Vec<String> = eps.iter().map(|e| endpoint_chain(sp, e)).collect();
    // `-m comment --comment "ns/svc:port -> ip:port" ` unless in large cluster mode.
    let comment = |ep: &Endpoint| {
        if ctx.large {
            String::new()
        } else {
            format!("-m comment --comment \"{name} -> {}\" ", ep.addr())
        }
    };
    if let Some(secs) = sp.affinity_seconds {
        for (sep, ep) in seps.iter().zip(eps) {
            let c = comment(ep);
            let _ = writeln!(r, "-A {chain} {c}-m recent --name {sep} --mask {mask} --rsource --rcheck --seconds {secs} --reap -j {sep}");
        }
    }
    let n = seps.len();
    for (i, (sep, ep)) in seps.iter().zip(eps).enumerate() {
        let c = comment(ep);
        if i + 1 < n {
            #[allow(clippy::cast_precision_loss)]
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                r,
                "-A {chain} {c}-m statistic --mode random --probability {p:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(r, "-A {chain} {c}-j {sep}");
        }
    }
}

/// Jumps from the built-in chains into ours, as kube-proxy installs them (table, chain, rule).
pub const JUMPS: &[(&str, &str, &str)] = &[
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "INPUT", "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
];

/// Seconds an `iptables`/`iptables-restore` call waits for the xtables lock before it gives
/// up (kube-proxy's `-w 5`): a lock held forever by someone else fails the sync instead of
/// hanging it, and the next sync (a full one) tries again.
pub const LOCK_WAIT_SECS: &str = "5";

/// The lock arguments of every `iptables`/`iptables-restore` call, as kube-proxy passes them
/// (`-w 5 -W 100000`: wait at most 5 s, polling every 100 ms). Both flavours of iptables 1.8
/// accept them; the legacy flavour takes the lock (`/run/xtables.lock`, or the file named by
/// `XTABLES_LOCKFILE`), the nf_tables flavour needs none and ignores `-w`; 1.8.9 ignores `-W`
/// with a warning on stderr. `iptables-save` takes no lock (and the legacy one rejects `-w`).
pub const WAIT_ARGS: [&str; 4] = ["-w", LOCK_WAIT_SECS, "-W", "100000"];

/// The warning iptables 1.8.9 prints for `-W`, left out of error messages.
const W_IGNORED: &str = "Ignoring deprecated --wait-interval option.";

/// Whether a failed call's stderr says that the xtables lock was not had in time.
pub fn is_lock_failure(stderr: &str) -> bool {
    stderr.contains("holding the xtables lock") || stderr.contains("Can't lock")
}

/// Effects on the kernel's iptables.
pub trait Iptables: Send {
    /// Feeds `text` to `iptables-restore --noflush -w 5 -W 100000`.
    fn restore(&mut self, text: &str) -> Result<(), IptablesError>;
    /// Whether `chain` exists in `table`.
    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, IptablesError>;
    /// Creates the chains and jump rules from built-in chains (idempotent) and the canary;
    /// with `localhost` also [`FIREWALL`] and its jumps from INPUT and OUTPUT.
    fn ensure_base(&mut self, localhost: bool) -> Result<(), IptablesError>;
    /// Sets `net.ipv4.conf.all.route_localnet=1` in this network namespace (localhost
    /// NodePorts), unless it is 1 already.
    fn set_route_localnet(&mut self) -> Result<(), IptablesError>;
    /// Per-service chain names (KUBE-SVC/SVL/EXT/FW/SEP) present in nat.
    fn list_service_chains(&mut self) -> Result<BTreeSet<String>, IptablesError>;
}

/// iptables failures.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The command could not run.
    #[error("running {cmd}: {source}")]
    Spawn {
        /// Command.
        cmd: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The xtables lock was held by someone else for the whole wait; nothing was changed.
    #[error("{cmd}: another process held the xtables lock for more than {LOCK_WAIT_SECS}s; gave up (the next sync retries in full): {stderr}")]
    Lock {
        /// Command.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
    /// The command failed.
    #[error("{cmd} failed: {stderr}")]
    Failed {
        /// Command.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
    /// A sysctl could not be read or set.
    #[error("setting {path} to 1 (localhost NodePorts; --iptables-localhost-nodeports=false turns them off): {source}")]
    Sysctl {
        /// The /proc/sys file.
        path: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// The sysctl that lets packets to 127.0.0.0/8 be routed off the loopback device after DNAT.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// Whether a chain name is one of ours per service.
pub fn is_service_chain(c: &str) -> bool {
    [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
    ]
    .iter()
    .any(|p| c.starts_with(p))
}

/// The real thing: runs `iptables`/`iptables-restore` (or the `-legacy` variants).
#[derive(Debug, Clone)]
pub struct RealIptables {
    /// `iptables`, `iptables-legacy` or `iptables-nft`.
    pub iptables: String,
    /// Matching restore binary.
    pub restore: String,
    /// Matching save binary.
    pub save: String,
    /// Whether the binaries are the nf_tables flavour (None: not asked yet).
    nft_flavour: Option<bool>,
    /// The xtables lock file the legacy flavour takes (`XTABLES_LOCKFILE`; None: its
    /// default `/run/xtables.lock`, or whatever this process's environment says).
    lock_file: Option<std::path::PathBuf>,
    /// Family of the binaries.
    family: Family,
    /// Who writes the tables.
    writer: Writer,
    /// Whether a kernel-writer failure was logged at warn level already.
    warned: bool,
}

/// Calls of this process that the kernel writer could not serve and the iptables binaries did
/// (see `RealIptables::fell_back`); tests assert it stays 0.
pub static KERNEL_FALLBACKS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Who writes the legacy tables: `iptables-restore`, or the kernel writer
/// ([`crate::xtables`]: `IPT_SO_SET_REPLACE` on a raw socket, no process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Writer {
    /// The kernel writer for the legacy flavour and IPv4, `iptables-restore` otherwise.
    #[default]
    Auto,
    /// Always `iptables-restore`.
    Restore,
    /// The kernel writer (the nf_tables flavour and IPv6 still go through restore).
    Kernel,
}

impl std::str::FromStr for Writer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "restore" => Ok(Self::Restore),
            "kernel" => Ok(Self::Kernel),
            o => Err(format!(
                "{o:?}: the iptables writer is auto, restore or kernel"
            )),
        }
    }
}

/// Chain declarations in a `*nat` section from which an nf_tables-flavour restore gets a
/// leading `-Z` (see `nft_restore_text`).
pub const NFT_ZERO_THRESHOLD: usize = 2000;

/// The payload as the nf_tables flavour of `iptables-restore` should get it: when the `*nat`
/// section declares at least `NFT_ZERO_THRESHOLD` chains, a `-Z` (zero counters, no chain)
/// is inserted right after `*nat`. Why: iptables-nft 1.8.x records every chain name a
/// command mentions (its chain and its jump target) in a sorted linked list, inserting with a
/// linear scan (`cache_chain_list_insert` in nft-cache.c), which makes a 60k-chain payload
/// quadratic (10,000 × 5 services: not done after 340 s). A command without a chain switches
/// that list off for the rest of the table (`all_chains`: the whole chain cache is fetched
/// instead); `-Z` is the only such command that changes nothing but counters. Measured here
/// (4,000 × 5, empty table): 68 s without, 3.5 s with. Its cost: the table's existing rules
/// get their counters reset (about 3 s at 170k rules), so small payloads (partial syncs) go
/// without it. Returns (text before the insertion point, whether to insert).
pub fn nft_zero_split(text: &str) -> (usize, bool) {
    let Some(nat) = text.find("*nat\n") else {
        return (0, false);
    };
    let start = nat + "*nat\n".len();
    let end = text[start..]
        .find("\nCOMMIT\n")
        .map_or(text.len(), |e| start + e);
    let decls = text[start..end]
        .split('\n')
        .filter(|l| l.starts_with(':'))
        .take(NFT_ZERO_THRESHOLD)
        .count();
    (start, decls >= NFT_ZERO_THRESHOLD)
}

impl Default for RealIptables {
    fn default() -> Self {
        Self::with_variant("")
    }
}

impl RealIptables {
    /// `""` for the default alternative, `"legacy"` or `"nft"`.
    pub fn with_variant(v: &str) -> Self {
        Self::with_variant_family(v, Family::V4)
    }

    /// The same for one family: `ip6tables{,-legacy,-nft}{,-restore,-save}` for IPv6.
    pub fn with_variant_family(v: &str, fam: Family) -> Self {
        let sfx = if v.is_empty() {
            String::new()
        } else {
            format!("-{v}")
        };
        let base = match fam {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        Self {
            iptables: format!("{base}{sfx}"),
            restore: format!("{base}{sfx}-restore"),
            save: format!("{base}{sfx}-save"),
            nft_flavour: match v {
                "nft" => Some(true),
                "legacy" => Some(false),
                _ => None,
            },
            lock_file: None,
            family: fam,
            writer: Writer::Auto,
            warned: false,
        }
    }

    /// The same binaries with `writer` writing the tables.
    #[must_use]
    pub fn with_writer(mut self, writer: Writer) -> Self {
        self.writer = writer;
        self
    }

    /// The kernel writer, when it writes this family's tables: the legacy flavour (the
    /// nf_tables flavour has no ip_tables tables) and IPv4, unless `Writer::Restore`.
    fn kernel(&mut self) -> Option<crate::xtables::KernelWriter> {
        if self.writer == Writer::Restore || self.family != Family::V4 || self.is_nft_flavour() {
            return None;
        }
        Some(crate::xtables::KernelWriter::new(self.lock_file.clone()))
    }

    /// Logs a kernel-writer failure that falls back to the binaries: at warn level once, at
    /// debug level after.
    fn fell_back(&mut self, what: &str, e: &crate::xtables::XtError) {
        KERNEL_FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.warned {
            tracing::debug!(error = %e, "kernel iptables writer: {what} through the iptables binaries instead");
        } else {
            self.warned = true;
            tracing::warn!(error = %e, "kernel iptables writer: {what} through the iptables binaries instead (logged once)");
        }
    }

    /// A command for one of these binaries, with this lock file in its environment.
    pub fn command(&self, prog: &str) -> Command {
        let mut command = Command::new(prog);
        if let Some(l) = &self.lock_file {
            command.env("XTABLES_LOCKFILE", l);
        }
        command
    }

    /// The same binaries taking `path` as their xtables lock (`XTABLES_LOCKFILE`), e.g. to
    /// keep a test off the host's lock.
    pub fn with_lock_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.lock_file = Some(path.into());
        self
    }

    /// Whether these are the nf_tables flavour (`iptables --version` says `nf_tables`),
    /// asked once.
    pub fn is_nft_flavour(&mut self) -> bool {
        if let Some(f) = self.nft_flavour {
            return f;
        }
        let f = self
            .run(&self.iptables, &["--version"], None)
            .is_ok_and(|v| v.contains("nf_tables"));
        self.nft_flavour = Some(f);
        f
    }

    /// Whether the `iptables` binary of this variant runs (`--version`).
    pub fn available(&self) -> bool {
        self.run(&self.iptables, &["--version"], None).is_ok()
    }

    fn run(&self, prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
        self.run_pieces(prog, args, stdin.map(|s| vec![s]))
    }

    fn run_pieces(
        &self,
        prog: &str,
        args: &[&str],
        stdin: Option<Vec<&str>>,
    ) -> Result<String, IptablesError> {
        let cmd = format!("{prog} {}", args.join(" "));
        let mut child = self
            .command(prog)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| IptablesError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        if let (Some(pieces), Some(mut w)) = (stdin, child.stdin.take()) {
            for text in pieces {
                w.write_all(text.as_bytes())
                    .map_err(|source| IptablesError::Spawn {
                        cmd: cmd.clone(),
                        source,
                    })?;
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|source| IptablesError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.trim() != W_IGNORED)
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_string();
            Err(if is_lock_failure(&stderr) {
                IptablesError::Lock { cmd, stderr }
            } else {
                IptablesError::Failed { cmd, stderr }
            })
        }
    }
}

fn split_rule(rule: &str) -> Vec<String> {
    // Rules here quote only comments; split on spaces outside quotes.
    crate::xtables::split_words(rule)
}

/// The error of a kernel write that did not get the xtables lock in time (as restore's
/// `-w 5` would fail): the sync fails, nothing was written.
fn kernel_lock_error(e: &crate::xtables::XtError) -> IptablesError {
    IptablesError::Lock {
        cmd: "IPT_SO_SET_REPLACE".into(),
        stderr: e.to_string(),
    }
}

impl Iptables for RealIptables {
    fn restore(&mut self, text: &str) -> Result<(), IptablesError> {
        if let Some(k) = self.kernel() {
            match k.restore(text, &[]) {
                Ok(_) => return Ok(()),
                Err(e @ crate::xtables::XtError::Lock(_)) => return Err(kernel_lock_error(&e)),
                Err(e) => self.fell_back("restore", &e),
            }
        }
        let (at, zero) = nft_zero_split(text);
        let pieces = if zero && self.is_nft_flavour() {
            vec![&text[..at], "-Z\n", &text[at..]]
        } else {
            vec![text]
        };
        let mut args = vec!["--noflush"];
        args.extend(WAIT_ARGS);
        self.run_pieces(&self.restore.clone(), &args, Some(pieces))
            .map(|_| ())
    }

    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        if let Some(k) = self.kernel() {
            match k.has_chain(table, chain) {
                Ok(b) => return Ok(b),
                Err(e) => self.fell_back("chain lookup", &e),
            }
        }
        let mut args = WAIT_ARGS.to_vec();
        args.extend(["-t", table, "-S", chain, "1"]);
        match self.run(&self.iptables.clone(), &args, None) {
            Ok(_) => Ok(true),
            Err(IptablesError::Failed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn set_route_localnet(&mut self) -> Result<(), IptablesError> {
        let err = |source| IptablesError::Sysctl {
            path: ROUTE_LOCALNET,
            source,
        };
        if std::fs::read_to_string(ROUTE_LOCALNET).map_err(err)?.trim() == "1" {
            return Ok(());
        }
        tracing::info!("setting route_localnet=1 to allow NodePorts on localhost; --iptables-localhost-nodeports=false or --nodeport-addresses without loopback turn this off");
        std::fs::write(ROUTE_LOCALNET, "1\n").map_err(err)
    }

    fn ensure_base(&mut self, localhost: bool) -> Result<(), IptablesError> {
        let ipt = self.iptables.clone();
        let mut base = String::from("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n*filter\n");
        if localhost {
            // Flushed and refilled in one transaction: the drop rule is never missing.
            let _ = writeln!(base, ":{FIREWALL} - [0:0]\n{LOCALNET_DROP}");
        }
        for c in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
            "KUBE-NODEPORTS",
        ] {
            let _ = writeln!(base, ":{c} - [0:0]");
        }
        base.push_str("COMMIT\n*nat\n");
        for c in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            let _ = writeln!(base, ":{c} - [0:0]");
        }
        base.push_str("COMMIT\n");
        let extra = if localhost { FIREWALL_JUMPS } else { &[] };
        if let Some(k) = self.kernel() {
            // One transaction per table: the chains, then each jump unless present.
            let jumps: Vec<(&str, &str, &str)> = JUMPS.iter().chain(extra).copied().collect();
            match k.restore(&base, &jumps) {
                Ok(_) => return Ok(()),
                Err(e @ crate::xtables::XtError::Lock(_)) => return Err(kernel_lock_error(&e)),
                Err(e) => self.fell_back("base chains", &e),
            }
        }
        self.restore(&base)?;
        for (table, chain, rule) in JUMPS.iter().chain(extra) {
            let mut args: Vec<String> = WAIT_ARGS.iter().map(|a| (*a).to_string()).collect();
            let op = args.len() + 2;
            args.extend([
                "-t".to_string(),
                (*table).into(),
                "-C".into(),
                (*chain).into(),
            ]);
            args.extend(split_rule(rule));
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            match self.run(&ipt, &a, None) {
                Ok(_) => continue,
                Err(
                    e @ (IptablesError::Lock { .. }
                    | IptablesError::Spawn { .. }
                    | IptablesError::Sysctl { .. }),
                ) => return Err(e),
                Err(IptablesError::Failed { .. }) => {}
            }
            args[op] = "-I".into();
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            self.run(&ipt, &a, None)?;
        }
        Ok(())
    }

    fn list_service_chains(&mut self) -> Result<BTreeSet<String>, IptablesError> {
        if let Some(k) = self.kernel() {
            match k.user_chains("nat", is_service_chain) {
                Ok(c) => return Ok(c),
                Err(e) => self.fell_back("chain listing", &e),
            }
        }
        let out = self.run(&self.save.clone(), &["-t", "nat"], None)?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| is_service_chain(c))
            .map(str::to_string)
            .collect())
    }
}

/// Shared state of the fake, readable by the test that made it.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Every payload restored, in order.
    pub restores: Vec<String>,
    /// Chains per table, as the fake's "kernel" holds them.
    pub chains: BTreeMap<String, BTreeSet<String>>,
    /// Make the next restore fail.
    pub fail_next: bool,
    /// `route_localnet` was set.
    pub route_localnet: bool,
    /// Calls of `chain_exists` (the canary check).
    pub canary_checks: usize,
}

/// A fake that records payloads and tracks declared/deleted chains.
#[derive(Debug, Clone, Default)]
pub struct FakeIptables {
    /// The shared state.
    pub state: Arc<Mutex<FakeState>>,
}

impl Iptables for FakeIptables {
    fn restore(&mut self, text: &str) -> Result<(), IptablesError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.fail_next {
            st.fail_next = false;
            return Err(IptablesError::Failed {
                cmd: "fake".into(),
                stderr: "injected".into(),
            });
        }
        st.restores.push(text.to_string());
        let mut table = String::new();
        for l in text.lines() {
            if let Some(t) = l.strip_prefix('*') {
                table = t.to_string();
            } else if let Some(c) = l.strip_prefix(':') {
                let c = c.split_whitespace().next().unwrap_or_default().to_string();
                st.chains.entry(table.clone()).or_default().insert(c);
            } else if let Some(c) = l.strip_prefix("-X ") {
                if let Some(set) = st.chains.get_mut(&table) {
                    set.remove(c.trim());
                }
            }
        }
        Ok(())
    }

    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.canary_checks += 1;
        Ok(st.chains.get(table).is_some_and(|s| s.contains(chain)))
    }

    fn ensure_base(&mut self, localhost: bool) -> Result<(), IptablesError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.chains
            .entry("mangle".into())
            .or_default()
            .insert(CANARY.into());
        if localhost {
            st.chains
                .entry("filter".into())
                .or_default()
                .insert(FIREWALL.into());
        }
        Ok(())
    }

    fn set_route_localnet(&mut self) -> Result<(), IptablesError> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .route_localnet = true;
        Ok(())
    }

    fn list_service_chains(&mut self) -> Result<BTreeSet<String>, IptablesError> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(st
            .chains
            .get("nat")
            .map(|s| s.iter().filter(|c| is_service_chain(c)).cloned().collect())
            .unwrap_or_default())
    }
}

/// Checks an `iptables-restore` payload: every `-j` target is a declared chain of the same
/// table or a built-in target, and every `-A` chain is declared. Returns the problems.
pub fn check_jumps(text: &str) -> Vec<String> {
    const TARGETS: &[&str] = &[
        "ACCEPT",
        "DROP",
        "REJECT",
        "RETURN",
        "DNAT",
        "SNAT",
        "MASQUERADE",
        "MARK",
    ];
    let mut problems = Vec::new();
    let mut declared = BTreeSet::new();
    let mut pending: Vec<(String, String)> = Vec::new();
    for l in text.lines() {
        if l.starts_with('*') {
            declared.clear();
        } else if let Some(c) = l.strip_prefix(':') {
            declared.insert(c.split_whitespace().next().unwrap_or_default().to_string());
        } else if l == "COMMIT" {
            for (chain, target) in pending.drain(..) {
                if !declared.contains(&chain) {
                    problems.push(format!("rule in undeclared chain {chain}"));
                }
                if !declared.contains(&target) && !TARGETS.contains(&target.as_str()) {
                    problems.push(format!("{chain} jumps to missing {target}"));
                }
            }
        } else if let Some(rest) = l.strip_prefix("-A ") {
            let toks = split_rule(rest);
            let chain = toks.first().cloned().unwrap_or_default();
            let target = toks
                .iter()
                .position(|t| t == "-j")
                .and_then(|i| toks.get(i + 1))
                .cloned()
                .unwrap_or_default();
            pending.push((chain, target));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceKey};

    fn sp(ns: &str, name: &str, port_name: &str, proto: Protocol) -> ServicePort {
        ServicePort {
            key: ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            },
            port_name: port_name.into(),
            protocol: proto,
            cluster_ips: vec!["10.0.0.1".parse().expect("ip")],
            port: 80,
            node_port: None,
            external_ips: vec![],
            lb_ips: vec![],
            lb_source_ranges: vec![],
            affinity_seconds: None,
            external_local: false,
            internal_local: false,
            endpoints: vec![],
        }
    }

    /// A model of `services` Services with `eps` endpoints each, the first with session
    /// affinity.
    fn big_model(services: usize, eps: usize) -> Model {
        let mut m = Model::new();
        for i in 0..services {
            let mut p = sp("ns", &format!("s{i}"), "p", Protocol::Tcp);
            p.cluster_ips = vec![format!("10.96.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .expect("ip")];
            p.affinity_seconds = (i == 0).then_some(60);
            p.endpoints = (0..eps)
                .map(|j| Endpoint {
                    ip: format!("10.244.{}.{}", i / 250, j + 1).parse().expect("ip"),
                    port: 8080,
                    ready: true,
                    serving: true,
                    terminating: false,
                    local: false,
                })
                .collect();
            m.insert(p.key.clone(), vec![p]);
        }
        m
    }

    #[test]
    fn large_clusters_drop_the_endpoint_comments_as_kube_proxy() {
        let opts = RenderOpts::default();
        let endpoint_rule = |l: &&str| {
            l.starts_with("-A KUBE-SEP-")
                || l.starts_with("-A KUBE-SVC-")
                || l.starts_with("-A KUBE-SVL-")
        };
        // 200 x 5 = 1,000 endpoints: not above the threshold, every rule has its comment.
        let small = big_model(200, 5);
        assert!(!large_cluster(Family::V4, &small));
        let text = render_family(Family::V4, &small, &opts).text;
        let eps: Vec<&str> = text.lines().filter(endpoint_rule).collect();
        assert!(eps.len() > 2000);
        assert!(eps.iter().all(|l| l.contains("-m comment")), "{eps:?}");
        // One more endpoint: the endpoint chains' rules and the jumps to them go without;
        // the KUBE-SERVICES entries keep theirs, and the rules are otherwise the same.
        let mut large = small.clone();
        let first = large.values_mut().next().expect("a service");
        let mut extra = first[0].endpoints[0].clone();
        extra.ip = "10.244.9.9".parse().expect("ip");
        first[0].endpoints.push(extra.clone());
        assert!(large_cluster(Family::V4, &large));
        // The same endpoints as IPv6 do not count for IPv4.
        assert!(!large_cluster(Family::V6, &large));
        let big = render_family(Family::V4, &large, &opts).text;
        let eps_big: Vec<&str> = big.lines().filter(endpoint_rule).collect();
        assert_eq!(
            eps_big.len(),
            eps.len() + 4,
            "one SEP chain (2 rules), its jump and its affinity check"
        );
        assert!(
            eps_big.iter().all(|l| !l.contains("-m comment")),
            "{eps_big:?}"
        );
        assert!(big
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .all(|l| l.contains("-m comment")));
        assert!(big.contains("-m recent --name KUBE-SEP-"), "affinity kept");
        let strip = |l: &str| {
            let l = l.to_string();
            match (
                l.find("-m comment --comment \""),
                l.find("-m comment --comment "),
            ) {
                (Some(a), _) => {
                    let end = l[a + 22..].find('"').expect("closing quote") + a + 24;
                    format!("{}{}", &l[..a], &l[end..])
                }
                (None, Some(a)) => {
                    let rest = &l[a + 21..];
                    let end = rest.find(' ').map_or(l.len(), |e| a + 21 + e + 1);
                    format!("{}{}", &l[..a], &l[end..])
                }
                _ => l,
            }
        };
        let stripped: BTreeSet<String> = eps.iter().map(|l| strip(l)).collect();
        let bare: BTreeSet<String> = eps_big.iter().map(|l| (*l).to_string()).collect();
        // Only the comments differ, but for the jumps of the service that got an endpoint
        // (its probabilities are now sixths).
        let differ: Vec<&String> = stripped.difference(&bare).collect();
        assert_eq!(differ.len(), 5, "{differ:?}");
        let chain = differ[0].split(' ').nth(1).expect("chain");
        assert!(chain.starts_with("KUBE-SVC-"), "{differ:?}");
        assert!(
            differ
                .iter()
                .all(|l| l.starts_with(&format!("-A {chain} "))),
            "{differ:?}"
        );
        // A partial render that crosses the threshold rewrites every service (a full
        // render), and crossing back restores the comments.
        let mut r = Renderer::new(Family::V4);
        r.full(&small, &opts, &BTreeSet::new());
        let key = large.keys().next().expect("key").clone();
        let up = r.partial(&large, &opts, &BTreeSet::from([key.clone()]));
        assert_eq!(up.text, big, "crossing up is a full render");
        let down = r.partial(&small, &opts, &BTreeSet::from([key]));
        let rules = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("-A "))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            rules(&down.text),
            rules(&text),
            "crossing down is a full render"
        );
        assert_eq!(
            down.text
                .lines()
                .filter(|l| l.starts_with("-X KUBE-SEP-"))
                .count(),
            1,
            "the extra endpoint's chain is deleted"
        );
    }

    /// `-A` lines of the filter and nat sections of a payload.
    fn rules_per_table(text: &str) -> (usize, usize) {
        let (mut f, mut n, mut table) = (0, 0, "");
        for l in text.lines() {
            if let Some(t) = l.strip_prefix('*') {
                table = if t == "filter" { "filter" } else { "nat" };
            } else if l.starts_with("-A ") {
                if table == "filter" {
                    f += 1;
                } else {
                    n += 1;
                }
            }
        }
        (f, n)
    }

    fn nodeport_model() -> Model {
        let mut p = sp("ns", "np", "p", Protocol::Tcp);
        p.node_port = Some(30080);
        p.endpoints = vec![Endpoint {
            ip: "10.244.1.5".parse().expect("ip"),
            port: 8080,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
        }];
        let mut m = Model::new();
        m.insert(p.key.clone(), vec![p]);
        m
    }

    #[test]
    fn localhost_nodeports_as_kube_proxy() {
        let jump = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
        // (localhost option, --nodeport-addresses, family) -> (KUBE-FIREWALL rule, jumps)
        type Case<'a> = (bool, &'a [&'a str], Family, bool, &'a [&'a str]);
        let cases: &[Case] = &[
            (
                true,
                &[],
                Family::V4,
                true,
                &["-m addrtype --dst-type LOCAL -j"],
            ),
            (
                false,
                &[],
                Family::V4,
                false,
                &["-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j"],
            ),
            (
                true,
                &[],
                Family::V6,
                false,
                &["-m addrtype --dst-type LOCAL ! -d ::1/128 -j"],
            ),
            // Addresses without loopback: off, as kube-proxy's ContainsIPv4Loopback.
            (
                true,
                &["10.0.0.0/8"],
                Family::V4,
                false,
                &["-d 10.0.0.0/8 -j"],
            ),
            (
                true,
                &["127.0.0.0/8", "10.0.0.0/8"],
                Family::V4,
                true,
                &["-d 127.0.0.0/8 -j", "-d 10.0.0.0/8 -j"],
            ),
            (true, &["0.0.0.0/0"], Family::V4, true, &["-d 0.0.0.0/0 -j"]),
            (
                false,
                &["127.0.0.1/32", "10.0.0.0/8"],
                Family::V4,
                false,
                &["-d 10.0.0.0/8 -j"],
            ),
            (
                true,
                &["::1/128", "fd00::/8"],
                Family::V6,
                false,
                &["-d fd00::/8 -j"],
            ),
        ];
        for (on, addrs, fam, firewall, jumps) in cases {
            let opts = RenderOpts {
                localhost_nodeports: *on,
                nodeport_addresses: addrs.iter().map(|a| (*a).to_string()).collect(),
                ..RenderOpts::default()
            };
            let mut model = nodeport_model();
            if *fam == Family::V6 {
                for p in model.values_mut().flatten() {
                    p.cluster_ips = vec!["fd00:96::1".parse().expect("ip")];
                    p.endpoints[0].ip = "fd00:244::5".parse().expect("ip");
                }
            }
            let case = format!("{on} {addrs:?} {fam:?}");
            assert_eq!(localhost_nodeports(*fam, &opts), *firewall, "{case}");
            let text = Renderer::new(*fam)
                .full(&model, &opts, &BTreeSet::new())
                .text;
            assert!(
                check_jumps(&text).is_empty(),
                "{case}: {:?}",
                check_jumps(&text)
            );
            assert_eq!(text.contains(":KUBE-FIREWALL - [0:0]"), *firewall, "{case}");
            assert_eq!(
                text.lines().any(|l| l == LOCALNET_DROP),
                *firewall,
                "{case}"
            );
            let got: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix(jump))
                .map(|l| l.trim_start().trim_end_matches(" KUBE-NODEPORTS"))
                .collect();
            assert_eq!(got, *jumps, "{case}");
        }
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Independent computation of base32(sha256(x))[:16], kube-proxy's algorithm.
        let cases = [
            ("ns1/svc1:p80", "tcp", "KUBE-SVC-XPGD46QRK7WJZT7O"),
            ("ns2/svc2:p80", "tcp", "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
        ];
        for (n, p, want) in cases {
            let (key, port) = n.split_once(':').expect("colon");
            let (ns, name) = key.split_once('/').expect("slash");
            let s = sp(
                ns,
                name,
                port,
                if p == "tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
            );
            assert_eq!(service_chain("KUBE-SVC-", &s), want, "{n}");
        }
        let s = sp("ns1", "svc1", "p80", Protocol::Tcp);
        let ep = Endpoint {
            ip: "10.180.0.1".parse().expect("ip"),
            port: 80,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
        };
        assert_eq!(endpoint_chain(&s, &ep), "KUBE-SEP-SXIVWICOYRO3J4NJ");
    }

    /// Partial renders over a sequence of changes keep the same per-service state and leave
    /// the same set of chains in the kernel as a full render of the final model, and rewrite
    /// the shared chains only when a changed service's lines in them changed.
    #[test]
    fn partial_renders_agree_with_full_renders() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let ep = |i: u64| Endpoint {
            ip: format!("10.1.0.{}", i + 1).parse().expect("ip"),
            port: 8080,
            ready: true,
            serving: true,
            terminating: false,
            local: i % 2 == 0,
        };
        let opts = RenderOpts {
            cluster_cidr: Some("10.1.0.0/16".into()),
            ..RenderOpts::default()
        };
        let mut model = Model::new();
        let mut r = Renderer::new(Family::V4);
        let mut kernel: BTreeSet<String> = BTreeSet::new();
        let shared_lines = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| {
                    [
                        "KUBE-SERVICES",
                        "KUBE-NODEPORTS",
                        "KUBE-EXTERNAL-SERVICES",
                        "KUBE-PROXY-FIREWALL",
                    ]
                    .iter()
                    .any(|c| l.starts_with(&format!("-A {c} ")))
                })
                .map(str::to_string)
                .collect()
        };
        let mut kernel_shared = Vec::new();
        let apply = |text: &str, kernel: &mut BTreeSet<String>, kernel_shared: &mut Vec<String>| {
            if text.starts_with("*filter") {
                *kernel_shared = shared_lines(text);
            }
            for l in text.lines() {
                if let Some(c) = l.strip_prefix(':') {
                    let c = c.split_whitespace().next().unwrap_or_default();
                    if is_service_chain(c) {
                        kernel.insert(c.to_string());
                    }
                } else if let Some(c) = l.strip_prefix("-X ") {
                    kernel.remove(c);
                }
            }
        };
        apply(
            &r.full(&model, &opts, &BTreeSet::new()).text,
            &mut kernel,
            &mut kernel_shared,
        );
        let (mut quiet, mut loud) = (0, 0);
        let mut last_tables;
        for step in 0..400 {
            let i = next(8);
            let key = ServiceKey {
                namespace: "ns".into(),
                name: format!("s{i}"),
            };
            let mut ports = model.get(&key).cloned().unwrap_or_else(|| {
                let mut p = sp("ns", &key.name, "p", Protocol::Tcp);
                p.cluster_ips = vec![format!("10.96.0.{}", i + 1).parse().expect("ip")];
                vec![p]
            });
            let endpoints_only = match next(6) {
                0 | 1 => {
                    let e = ep(next(6));
                    let eps = &mut ports[0].endpoints;
                    match eps.iter().position(|x| x.ip == e.ip) {
                        Some(at) => drop(eps.remove(at)),
                        None => {
                            eps.push(e);
                            eps.sort_by_key(|x| x.ip);
                        }
                    }
                    true
                }
                2 => {
                    ports[0].node_port = ports[0]
                        .node_port
                        .xor(Some(30000 + u16::try_from(i).expect("small")));
                    false
                }
                3 => {
                    ports[0].internal_local ^= true;
                    false
                }
                4 => {
                    ports[0].affinity_seconds = ports[0].affinity_seconds.xor(Some(60));
                    false
                }
                _ => {
                    if model.remove(&key).is_none() {
                        model.insert(key.clone(), ports);
                    }
                    ports = Vec::new();
                    false
                }
            };
            if !ports.is_empty() {
                let had_eps = model.get(&key).is_some_and(|p| !p[0].endpoints.is_empty());
                let has_eps = !ports[0].endpoints.is_empty();
                let local_same = model.get(&key).is_some_and(|p| {
                    p[0].endpoints.iter().any(|e| e.local)
                        == ports[0].endpoints.iter().any(|e| e.local)
                });
                let quiet_expected = endpoints_only && had_eps && has_eps && local_same;
                model.insert(key.clone(), ports);
                let out = r.partial(&model, &opts, &BTreeSet::from([key.clone()]));
                if quiet_expected {
                    assert!(
                        !out.shared,
                        "step {step}: endpoint-only change rewrote shared chains"
                    );
                }
                if out.shared {
                    loud += 1
                } else {
                    quiet += 1
                }
                apply(&out.text, &mut kernel, &mut kernel_shared);
                last_tables = out.tables;
            } else {
                let out = r.partial(&model, &opts, &BTreeSet::from([key.clone()]));
                apply(&out.text, &mut kernel, &mut kernel_shared);
                last_tables = out.tables;
            }
            let mut fresh = Renderer::new(Family::V4);
            let want = fresh.full(&model, &opts, &BTreeSet::new());
            // Rules owned per table after a partial render = those a full render writes.
            let (f, n) = rules_per_table(&want.text);
            assert_eq!(
                (want.tables.filter_last, want.tables.nat_last),
                (f, n),
                "step {step}: full render's counts"
            );
            assert_eq!(
                (last_tables.filter_total, last_tables.nat_total),
                (f, n),
                "step {step}: owned rules after the partial render"
            );
            assert_eq!(r.frags, fresh.frags, "step {step}: kept state differs");
            let want_chains: BTreeSet<String> = fresh.chains().map(str::to_string).collect();
            assert_eq!(
                kernel_shared,
                shared_lines(&want.text),
                "step {step}: shared chains"
            );
            assert_eq!(kernel, want_chains, "step {step}: chains in the kernel");
            assert!(check_jumps(&want.text).is_empty());
        }
        assert!(
            quiet > 20 && loud > 20,
            "both kinds exercised: {quiet} / {loud}"
        );
    }

    #[test]
    fn checker_finds_missing_targets() {
        let bad = "*nat\n:A - [0:0]\n-A A -j B\n-A C -j ACCEPT\nCOMMIT\n";
        assert_eq!(check_jumps(bad).len(), 2);
        assert!(check_jumps("*nat\n:A - [0:0]\n:B - [0:0]\n-A A -j B\nCOMMIT\n").is_empty());
    }

    #[test]
    fn nft_zero_only_for_large_nat_sections() {
        let small = "*filter\n:A - [0:0]\nCOMMIT\n*nat\n:B - [0:0]\n-A B -j C\nCOMMIT\n";
        assert!(!nft_zero_split(small).1);
        let mut big = String::from("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n");
        for i in 0..NFT_ZERO_THRESHOLD {
            big.push_str(&format!(":KUBE-SEP-{i} - [0:0]\n"));
        }
        big.push_str("COMMIT\n");
        let (at, zero) = nft_zero_split(&big);
        assert!(zero);
        assert!(big[..at].ends_with("*nat\n"));
        assert!(big[at..].starts_with(":KUBE-SEP-0 "));
        // Declarations in filter do not count.
        let filter_only = big.replace("*nat", "*filter");
        assert!(!nft_zero_split(&filter_only).1);
    }
}
