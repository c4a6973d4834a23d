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

/// The output of one render.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    /// `iptables-restore` input.
    pub text: String,
    /// Every per-service nat chain the desired state has (for GC and partial syncs).
    pub chains: BTreeSet<String>,
    /// Rules written in this payload.
    pub rules: usize,
    /// The shared chains' rules (filter and nat), to compare with the previous sync's.
    pub shared: String,
    /// Partial renders only: the payload without the shared chains, usable when `shared`
    /// equals what the kernel already has.
    pub svc_only: Option<String>,
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

/// Renders IPv4 rules (`render_family` with `Family::V4`).
pub fn render(
    model: &Model,
    opts: &RenderOpts,
    changed: Option<&BTreeSet<ServiceKey>>,
    previous: &BTreeSet<String>,
) -> Rendered {
    render_family(Family::V4, model, opts, changed, previous)
}

/// Renders the rules of one family: only that family's cluster/external/LB IPs and
/// endpoints, the `--cluster-cidr` and `--nodeport-addresses` entries of that family (both
/// options may hold one CIDR per family, comma-separated). `changed` = None: full sync
/// (every chain written). Some(set): partial sync, per-service chains written only for those
/// services (shared chains always in full). `previous` = per-service chains believed to
/// exist; those no longer desired are flushed and deleted.
pub fn render_family(
    fam: Family,
    model: &Model,
    opts: &RenderOpts,
    changed: Option<&BTreeSet<ServiceKey>>,
    previous: &BTreeSet<String>,
) -> Rendered {
    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    let mut svc_nat_rules = String::new();
    let mut nodeports = String::new();
    let mut rules = 0usize;
    let mut desired = BTreeSet::new();

    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODEPORTS",
    ] {
        let _ = writeln!(filter_chains, ":{c} - [0:0]");
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{c} - [0:0]");
    }
    let nat_shared_len = nat_chains.len();
    // Static rules.
    let statics = [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_string(),
        format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK} -j ACCEPT"),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
    ];
    for r in statics {
        filter_rules.push_str(&r);
        filter_rules.push('\n');
        rules += 1;
    }
    let nat_statics = [
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN"),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".to_string(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_string(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".to_string(),
    ];
    for r in nat_statics {
        nat_rules.push_str(&r);
        nat_rules.push('\n');
        rules += 1;
    }

    let masq_src = if opts.masquerade_all {
        Some(String::new())
    } else {
        opts.cluster_cidr.as_deref().and_then(|c| {
            c.split(',')
                .map(str::trim)
                .find(|c| fam.has_cidr(c))
                .map(|c| format!("! -s {c} "))
        })
    };
    let cluster_cidr = opts.cluster_cidr.as_deref().and_then(|c| {
        c.split(',')
            .map(str::trim)
            .find(|c| fam.has_cidr(c))
            .map(str::to_string)
    });
    let nodeport_addresses: Vec<&String> = opts
        .nodeport_addresses
        .iter()
        .filter(|a| fam.has_cidr(a))
        .collect();
    let mask = fam.full_mask();

    for (key, ports) in model {
        let write_chains = changed.is_none_or(|c| c.contains(key));
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
                rules += 1;
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
                        rules += 1;
                    }
                } else {
                    let (why, verdict) = if use_svc {
                        ("has no local endpoints", "DROP")
                    } else {
                        ("has no endpoints", "REJECT")
                    };
                    let _ = writeln!(filter_rules, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} {why}\" -m {proto} -p {proto} -d {d} --dport {} -j {verdict}", sp.port);
                }
                rules += 1;
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
                rules += 1;
            }

            // Per-service chains. Not written (partial sync, service unchanged): only their
            // names, for the stale-chain difference.
            if !write_chains {
                for (used, c) in [
                    (use_svc, &ch.svc),
                    (use_svl, &ch.svl),
                    (use_ext, &ch.ext),
                    (use_fw, &ch.fw),
                ] {
                    if used {
                        desired.insert(c.clone());
                    }
                }
                if use_svc || use_svl {
                    for ep in sp.endpoints.iter().filter(|e| fam.has(&e.ip)) {
                        desired.insert(endpoint_chain(sp, ep));
                    }
                }
                continue;
            }
            let mut mine: Vec<(String, String)> = Vec::new(); // (chain, rules)
            if use_svc {
                let mut r = String::new();
                for cip in sp.cluster_ips.iter().filter(|i| fam.has(i)) {
                    if let Some(src) = &masq_src {
                        let _ = writeln!(r, "-A {} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {} {src}-j KUBE-MARK-MASQ", ch.svc, ip_match(cip), sp.port);
                    }
                }
                endpoint_jumps(&mut r, &ch.svc, sp, &cluster_eps, mask);
                mine.push((ch.svc.clone(), r));
            }
            if use_svl {
                let mut r = String::new();
                endpoint_jumps(&mut r, &ch.svl, sp, &local_eps, mask);
                mine.push((ch.svl.clone(), r));
            }
            if use_ext {
                let mut r = String::new();
                if sp.external_local {
                    if let Some(c) = &cluster_cidr {
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
                mine.push((ch.ext.clone(), r));
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
                mine.push((ch.fw.clone(), r));
            }
            let mut seps = Vec::new();
            if use_svc || use_svl {
                for ep in sp.endpoints.iter().filter(|e| fam.has(&e.ip)) {
                    let sep = endpoint_chain(sp, ep);
                    let mut r = String::new();
                    let _ = writeln!(
                        r,
                        "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                        ip_match(&ep.ip)
                    );
                    let recent = if sp.affinity_seconds.is_some() {
                        format!("-m recent --name {sep} --mask {mask} --rsource --set ")
                    } else {
                        String::new()
                    };
                    let _ = writeln!(r, "-A {sep} -m comment --comment {name} -m {proto} -p {proto} {recent}-j DNAT --to-destination {}", ep.addr());
                    seps.push((sep, r));
                }
            }
            mine.extend(seps);
            for (chain, r) in mine {
                let _ = writeln!(nat_chains, ":{chain} - [0:0]");
                rules += r.lines().count();
                svc_nat_rules.push_str(&r);
                desired.insert(chain);
            }
        }
    }

    // Node ports last in KUBE-SERVICES.
    if nodeport_addresses.is_empty() {
        let _ = writeln!(nat_rules, "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS");
        rules += 1;
    } else {
        for a in &nodeport_addresses {
            let _ = writeln!(nat_rules, "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d {a} -j KUBE-NODEPORTS");
            rules += 1;
        }
    }
    // Stale chains: flush then delete.
    let stale: Vec<&String> = previous.difference(&desired).collect();
    let mut svc_decls = String::new();
    for c in &stale {
        let _ = writeln!(svc_decls, ":{c} - [0:0]");
    }
    let mut deletes = String::new();
    for c in &stale {
        let _ = writeln!(deletes, "-X {c}");
    }
    let mut text = String::with_capacity(
        filter_chains.len()
            + filter_rules.len()
            + nat_chains.len()
            + nat_rules.len()
            + svc_nat_rules.len()
            + nodeports.len()
            + svc_decls.len()
            + deletes.len()
            + 64,
    );
    text.push_str("*filter\n");
    text.push_str(&filter_chains);
    text.push_str(&filter_rules);
    text.push_str("COMMIT\n*nat\n");
    text.push_str(&nat_chains);
    text.push_str(&svc_decls);
    text.push_str(&nat_rules);
    text.push_str(&nodeports);
    text.push_str(&svc_nat_rules);
    text.push_str(&deletes);
    text.push_str("COMMIT\n");
    // Shared chains' content, for skipping them when a partial sync leaves them unchanged.
    let shared = format!("{filter_rules}\u{0}{nat_rules}\u{0}{nodeports}");
    let svc_only = if changed.is_some() {
        let mut t = String::from("*nat\n");
        t.push_str(&nat_chains[nat_shared_len..]);
        t.push_str(&svc_decls);
        t.push_str(&svc_nat_rules);
        t.push_str(&deletes);
        t.push_str("COMMIT\n");
        Some(t)
    } else {
        None
    };
    Rendered {
        text,
        chains: desired,
        rules,
        shared,
        svc_only,
    }
}

fn endpoint_jumps(r: &mut String, chain: &str, sp: &ServicePort, eps: &[&Endpoint], mask: &str) {
    let name = sp.port_name_string();
    let seps: Vec<String> = eps.iter().map(|e| endpoint_chain(sp, e)).collect();
    if let Some(secs) = sp.affinity_seconds {
        for (sep, ep) in seps.iter().zip(eps) {
            let _ = writeln!(r, "-A {chain} -m comment --comment \"{name} -> {}\" -m recent --name {sep} --mask {mask} --rsource --rcheck --seconds {secs} --reap -j {sep}", ep.addr());
        }
    }
    let n = seps.len();
    for (i, (sep, ep)) in seps.iter().zip(eps).enumerate() {
        if i + 1 < n {
            #[allow(clippy::cast_precision_loss)]
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(r, "-A {chain} -m comment --comment \"{name} -> {}\" -m statistic --mode random --probability {p:.10} -j {sep}", ep.addr());
        } else {
            let _ = writeln!(
                r,
                "-A {chain} -m comment --comment \"{name} -> {}\" -j {sep}",
                ep.addr()
            );
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

/// Effects on the kernel's iptables.
pub trait Iptables: Send {
    /// Feeds `text` to `iptables-restore --noflush -w`.
    fn restore(&mut self, text: &str) -> Result<(), IptablesError>;
    /// Whether `chain` exists in `table`.
    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, IptablesError>;
    /// Creates the chains and jump rules from built-in chains (idempotent) and the canary.
    fn ensure_base(&mut self) -> Result<(), IptablesError>;
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
    /// The command failed.
    #[error("{cmd} failed: {stderr}")]
    Failed {
        /// Command.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
}

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
        }
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
        let mut child = Command::new(prog)
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
            Err(IptablesError::Failed {
                cmd,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

fn split_rule(rule: &str) -> Vec<String> {
    // Rules here quote only comments; split on spaces outside quotes.
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut q = false;
    for ch in rule.chars() {
        match ch {
            '"' => q = !q,
            ' ' if !q => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Iptables for RealIptables {
    fn restore(&mut self, text: &str) -> Result<(), IptablesError> {
        let (at, zero) = nft_zero_split(text);
        let pieces = if zero && self.is_nft_flavour() {
            vec![&text[..at], "-Z\n", &text[at..]]
        } else {
            vec![text]
        };
        self.run_pieces(&self.restore.clone(), &["--noflush", "-w"], Some(pieces))
            .map(|_| ())
    }

    fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        match self.run(
            &self.iptables.clone(),
            &["-w", "-t", table, "-S", chain, "1"],
            None,
        ) {
            Ok(_) => Ok(true),
            Err(IptablesError::Failed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn ensure_base(&mut self) -> Result<(), IptablesError> {
        let ipt = self.iptables.clone();
        let mut base = String::from("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n*filter\n");
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
        self.restore(&base)?;
        for (table, chain, rule) in JUMPS {
            let mut args = vec![
                "-w".to_string(),
                "-t".into(),
                (*table).into(),
                "-C".into(),
                (*chain).into(),
            ];
            args.extend(split_rule(rule));
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            if self.run(&ipt, &a, None).is_err() {
                args[3] = "-I".into();
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                self.run(&ipt, &a, None)?;
            }
        }
        Ok(())
    }

    fn list_service_chains(&mut self) -> Result<BTreeSet<String>, IptablesError> {
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
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(st.chains.get(table).is_some_and(|s| s.contains(chain)))
    }

    fn ensure_base(&mut self) -> Result<(), IptablesError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.chains
            .entry("mangle".into())
            .or_default()
            .insert(CANARY.into());
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
