//! Removing what a proxy mode left behind, as `kube-proxy --cleanup` does
//! (`CleanupLeftovers` of pkg/proxy/{iptables,ipvs,nftables}): iptables chains and the jump
//! rules into them (both families, every iptables flavour asked for), the nf_tables tables,
//! IPVS virtual services, the ipsets of IPVS mode and its dummy device.
//!
//! The planning is pure ([`plan_iptables`] turns `iptables-save` output into an
//! `iptables-restore --noflush` payload; [`Scope`] says which chains a mode owns); the
//! effects ([`cleanup`]) run `iptables-save`/`iptables-restore` and talk netlink in the calling
//! thread's network namespace. Every step is attempted; the failures are returned together.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::process::Stdio;

use nix::sys::socket::SockProtocol;

use crate::iptables::{Family, Iptables, RealIptables};
use crate::ipvs::ipset::{self, SETS};
use crate::ipvs::nl::{MsgBuilder, NlError, Socket, NLM_F_REQUEST};
use crate::nft::wire::{Batch, NFPROTO_IPV4, NFPROTO_IPV6};

/// What to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything of every mode (`--cleanup`).
    All,
    /// What only iptables mode creates: per-service chains and its own fixed chains (kept
    /// when starting in IPVS mode, which shares KUBE-SERVICES, KUBE-POSTROUTING, ...).
    IptablesOnly,
    /// What only IPVS mode creates: its fixed chains, virtual services, ipsets and the
    /// dummy device (kept when starting in iptables mode).
    IpvsOnly,
}

/// Chains both iptables and IPVS mode create.
pub const SHARED_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-CANARY",
];
/// Fixed chains of iptables mode alone.
pub const IPTABLES_CHAINS: &[&str] = &[
    "KUBE-NODEPORTS",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-PROXY-FIREWALL",
];
/// Prefixes of iptables mode's per-service chains (kube-proxy's, plus the old KUBE-XLB-).
pub const IPTABLES_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];
/// Fixed chains of IPVS mode alone (kube-proxy's names; hako uses the first three).
pub const IPVS_CHAINS: &[&str] = &[
    "KUBE-NODE-PORT",
    "KUBE-IPVS-FILTER",
    "KUBE-EXTERNAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-IPVS-OUT-FILTER",
];
/// nf_tables tables removed by a full cleanup: hako's, and kube-proxy's nftables mode's.
pub const NFT_TABLES: &[&str] = &[crate::nft::layout::TABLE, "kube-proxy"];

impl Scope {
    /// Whether this scope removes the iptables chain `name`.
    pub fn owns_chain(self, name: &str) -> bool {
        let iptables = IPTABLES_CHAINS.contains(&name)
            || IPTABLES_PREFIXES.iter().any(|p| name.starts_with(p));
        let ipvs = IPVS_CHAINS.contains(&name);
        match self {
            Self::All => iptables || ipvs || SHARED_CHAINS.contains(&name),
            Self::IptablesOnly => iptables,
            Self::IpvsOnly => ipvs,
        }
    }
    fn ipvs(self) -> bool {
        matches!(self, Self::All | Self::IpvsOnly)
    }
}

/// Whether a saved rule matches one of IPVS mode's ipsets (`-m set --match-set NAME`).
fn matches_our_set(rule: &str) -> bool {
    let mut it = rule.split_whitespace();
    while let Some(w) = it.next() {
        if w == "--match-set" {
            if let Some(name) = it.next() {
                if SETS.iter().any(|(n, _, _)| *n == name) {
                    return true;
                }
            }
        }
    }
    false
}

/// The target of a rule (`-j X` or `-g X`), from an `iptables-save` line.
fn rule_target(rule: &str) -> Option<&str> {
    let mut it = rule.split_whitespace();
    while let Some(w) = it.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return it.next();
        }
    }
    None
}

/// The `iptables-restore --noflush` payload that removes the chains `scope` owns from an
/// `iptables-save` dump: the rules of other chains that jump into them are deleted (`-D`
/// with the rule as saved), and so are, when the scope removes IPVS mode, the rules of
/// other chains that match its ipsets (they would keep the sets busy); the chains are
/// flushed (declared) and deleted (`-X`). Empty when there is nothing to remove.
pub fn plan_iptables(save: &str, scope: Scope) -> String {
    let mut out = String::new();
    let mut table: Option<&str> = None;
    let mut chains: Vec<&str> = Vec::new();
    let mut rules: Vec<&str> = Vec::new();
    let mut flush = |table: Option<&str>, chains: &mut Vec<&str>, rules: &mut Vec<&str>| {
        let Some(t) = table else { return };
        let doomed: BTreeSet<&str> = chains
            .iter()
            .copied()
            .filter(|c| scope.owns_chain(c))
            .collect();
        let jumps: Vec<String> = rules
            .iter()
            .filter_map(|r| {
                let rest = r.strip_prefix("-A ")?;
                let chain = rest.split_whitespace().next()?;
                let target = rule_target(rest).unwrap_or("");
                let uses_set = scope.ipvs() && matches_our_set(rest);
                (!doomed.contains(chain) && (doomed.contains(target) || uses_set))
                    .then(|| format!("-D {rest}"))
            })
            .collect();
        if !doomed.is_empty() || !jumps.is_empty() {
            let _ = writeln!(out, "*{t}");
            for c in &doomed {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            for j in &jumps {
                let _ = writeln!(out, "{j}");
            }
            for c in &doomed {
                let _ = writeln!(out, "-X {c}");
            }
            out.push_str("COMMIT\n");
        }
        chains.clear();
        rules.clear();
    };
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t);
        } else if let Some(c) = line.strip_prefix(':') {
            if let Some(name) = c.split_whitespace().next() {
                chains.push(name);
            }
        } else if line.starts_with("-A ") {
            rules.push(line);
        } else if line == "COMMIT" {
            flush(table, &mut chains, &mut rules);
            table = None;
        }
    }
    out
}

/// Cleanup options.
#[derive(Debug, Clone, Default)]
pub struct CleanupOpts {
    /// iptables flavours to clean ("" = the system default, "legacy", "nft").
    pub iptables_variants: Vec<String>,
    /// Dummy devices of IPVS mode to delete (hako's `--ipvs-device`, kube-proxy's kube-ipvs0).
    pub ipvs_devices: Vec<String>,
    /// Remove IPVS virtual services only when one of the devices exists (a mode switch), or
    /// always (`--cleanup`, which like kube-proxy's flushes every virtual service).
    pub ipvs_always: bool,
}

/// What a cleanup did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// iptables chains removed (per flavour and family, `family/table/chain`).
    pub chains: usize,
    /// nf_tables tables removed.
    pub nft_tables: usize,
    /// IPVS virtual services removed.
    pub ipvs_services: usize,
    /// Dummy devices removed.
    pub devices: usize,
    /// ipsets destroyed.
    pub ipsets: usize,
}

/// One step that failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// An iptables binary could not run or failed.
    #[error("{cmd}: {detail}")]
    Iptables {
        /// The command.
        cmd: String,
        /// What went wrong.
        detail: String,
    },
    /// A netlink request failed (IPVS, ipset, link).
    #[error("{what}: {source}")]
    Netlink {
        /// The step.
        what: String,
        /// Cause.
        source: NlError,
    },
    /// An nf_tables request failed.
    #[error("deleting nf_tables table {table}: {source}")]
    Nft {
        /// The table.
        table: String,
        /// Cause.
        source: crate::nft::wire::NetlinkError,
    },
}

/// The iptables chains of `scope` in one flavour and family; returns how many were removed.
fn clean_iptables(variant: &str, fam: Family, scope: Scope) -> Result<usize, CleanupError> {
    let mut ipt = RealIptables::with_variant_family(variant, fam);
    if !ipt.available() {
        return Ok(0);
    }
    let mut total = 0;
    // Tables in the order kube-proxy cleans them; each its own restore, so a table the
    // kernel lacks (no iptable_nat) does not stop the others.
    for table in ["nat", "filter", "mangle"] {
        let cmd = format!("{} -t {table}", ipt.save);
        let out = ipt
            .command(&ipt.save)
            .args(["-t", table])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| CleanupError::Iptables {
                cmd: cmd.clone(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            // No such table in this kernel/flavour: nothing of ours can be in it.
            tracing::debug!(cmd, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "skipped");
            continue;
        }
        let text = plan_iptables(&String::from_utf8_lossy(&out.stdout), scope);
        if text.is_empty() {
            continue;
        }
        let n = text.lines().filter(|l| l.starts_with("-X ")).count();
        ipt.restore(&text).map_err(|e| CleanupError::Iptables {
            cmd: format!("{} --noflush", ipt.restore),
            detail: e.to_string(),
        })?;
        tracing::info!(iptables = %ipt.iptables, table, chains = n, "removed chains");
        total += n;
    }
    Ok(total)
}

fn clean_nft(tables: &[&str]) -> Result<usize, CleanupError> {
    let sock = crate::nft::wire::Socket::open().map_err(|source| CleanupError::Nft {
        table: tables.join(","),
        source,
    })?;
    let mut n = 0;
    for t in tables {
        for fam in [NFPROTO_IPV4, NFPROTO_IPV6] {
            let mut b = Batch::new(fam, t);
            b.del_table();
            match sock.commit(b) {
                Ok(()) => n += 1,
                // ENOENT: no such table.
                Err(crate::nft::wire::NetlinkError::Rejected(m))
                    if m.ends_with(&crate::nft::wire::errno_text(
                        -(nix::errno::Errno::ENOENT as i32),
                    )) => {}
                Err(source) => {
                    return Err(CleanupError::Nft {
                        table: (*t).to_string(),
                        source,
                    })
                }
            }
        }
    }
    Ok(n)
}

const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const ENODEV: i32 = 19;

fn del_link_msg(name: &str) -> MsgBuilder {
    let mut m = MsgBuilder::new(RTM_DELLINK, NLM_F_REQUEST, &[0; 16]);
    m.str(IFLA_IFNAME, name);
    m
}

fn nl(what: &str) -> impl FnOnce(NlError) -> CleanupError + '_ {
    move |source| CleanupError::Netlink {
        what: what.to_string(),
        source,
    }
}

/// IPVS virtual services, the dummy devices and the ipsets.
fn clean_ipvs(opts: &CleanupOpts, report: &mut CleanupReport) -> Vec<CleanupError> {
    let mut errs = Vec::new();
    let devices: Vec<&String> = opts
        .ipvs_devices
        .iter()
        .filter(|d| nix::net::if_::if_nametoindex(d.as_str()).is_ok())
        .collect();
    // Without a dummy device there is no sign that IPVS mode ran here: virtual services and
    // sets (and the kernel modules a request would load) are left alone, except on --cleanup.
    if !opts.ipvs_always && devices.is_empty() {
        return errs;
    }
    {
        match crate::ipvs::genl::IpvsClient::open() {
            // No IPVS in this kernel: no virtual service can exist.
            Err(e) => tracing::debug!(error = %e, "IPVS not available, no services to remove"),
            Ok(mut c) => match c.services() {
                Err(e) => errs.push(nl("listing IPVS services")(e)),
                Ok(list) => {
                    let fam = c.family();
                    let msgs: Vec<_> = list
                        .iter()
                        .map(|(k, _)| {
                            (
                                crate::ipvs::genl::del_service_msg(fam, k),
                                format!("deleting IPVS service {k:?}"),
                            )
                        })
                        .collect();
                    match c.apply(&msgs) {
                        Ok(()) => report.ipvs_services += msgs.len(),
                        Err(e) => errs.push(nl("deleting IPVS services")(e)),
                    }
                }
            },
        }
    }
    if !devices.is_empty() {
        match Socket::open(SockProtocol::NetlinkRoute) {
            Err(e) => errs.push(nl("opening rtnetlink")(e)),
            Ok(mut s) => {
                for d in devices {
                    match s.batch(&[del_link_msg(d)], &[ENODEV], &|_| format!("deleting {d}")) {
                        Ok(()) => report.devices += 1,
                        Err(e) => errs.push(nl("deleting the IPVS dummy device")(e)),
                    }
                }
            }
        }
    }
    // The sets go last: iptables rules that match them keep them busy.
    match Socket::open(SockProtocol::NetlinkNetFilter) {
        Err(e) => errs.push(nl("opening nfnetlink")(e)),
        Ok(mut s) => {
            let names: Vec<String> = SETS
                .iter()
                .map(|(n, _, _)| (*n).to_string())
                .chain((0..SETS.len()).map(ipset::temp_name))
                .collect();
            for n in names {
                let msg = ipset::name_msg(ipset::cmd::DESTROY, &n);
                match s.batch(&[msg], &[], &|_| format!("destroying ipset {n}")) {
                    Ok(()) => report.ipsets += 1,
                    // ENOENT: no such set; EPROTONOSUPPORT/ENOENT when ip_set is absent.
                    Err(NlError::Kernel { errno, .. })
                        if errno == (nix::errno::Errno::ENOENT as i32)
                            || errno == (nix::errno::Errno::EPROTONOSUPPORT as i32) => {}
                    Err(e) => errs.push(nl("destroying ipsets")(e)),
                }
            }
        }
    }
    errs
}

/// Removes what `scope` owns, in the calling thread's network namespace: iptables chains
/// first (they reference the ipsets), then nf_tables tables (full cleanup and when leaving
/// nftables mode: `Scope::All` and the iptables-based scopes below), IPVS services,
/// devices and sets. `nft`: whether to delete the nf_tables tables too.
pub fn cleanup(scope: Scope, nft: bool, opts: &CleanupOpts) -> (CleanupReport, Vec<CleanupError>) {
    let mut report = CleanupReport::default();
    let mut errs = Vec::new();
    let mut variants: Vec<&str> = Vec::new();
    for v in &opts.iptables_variants {
        if !variants.contains(&v.as_str()) {
            variants.push(v);
        }
    }
    for v in variants {
        for fam in [Family::V4, Family::V6] {
            match clean_iptables(v, fam, scope) {
                Ok(n) => report.chains += n,
                Err(e) => errs.push(e),
            }
        }
    }
    if nft {
        let tables: &[&str] = if scope == Scope::All {
            NFT_TABLES
        } else {
            &NFT_TABLES[..1]
        };
        match clean_nft(tables) {
            Ok(n) => report.nft_tables += n,
            Err(e) => errs.push(e),
        }
    }
    if scope.ipvs() {
        errs.extend(clean_ipvs(opts, &mut report));
    }
    (report, errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-ABC - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XYZ - [0:0]
:KUBE-NODE-PORT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j DOCKER
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-XYZ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SVC-XYZ -j KUBE-SEP-ABC
-A KUBE-SEP-ABC -p tcp -j DNAT --to-destination 10.0.0.2:80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
";

    fn chains_removed(plan: &str) -> Vec<&str> {
        plan.lines().filter_map(|l| l.strip_prefix("-X ")).collect()
    }

    #[test]
    fn all_removes_every_chain_of_ours_and_the_jumps() {
        let p = plan_iptables(SAVE, Scope::All);
        assert_eq!(
            chains_removed(&p),
            [
                "KUBE-MARK-MASQ",
                "KUBE-NODE-PORT",
                "KUBE-NODEPORTS",
                "KUBE-POSTROUTING",
                "KUBE-SEP-ABC",
                "KUBE-SERVICES",
                "KUBE-SVC-XYZ"
            ]
        );
        let dels: Vec<&str> = p.lines().filter(|l| l.starts_with("-D ")).collect();
        assert_eq!(
            dels,
            [
                "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            ]
        );
        // Someone else's chains and tables are left alone (kubelet's KUBE-FIREWALL, DOCKER).
        assert!(!p.contains("DOCKER") && !p.contains("*filter") && !p.contains("KUBE-FIREWALL"));
        assert!(p.starts_with("*nat\n") && p.ends_with("COMMIT\n"));
        // Flushes (declarations) come before any -D/-X.
        let first_cmd = p.lines().position(|l| l.starts_with('-')).unwrap_or(0);
        assert!(p.lines().skip(first_cmd).all(|l| !l.starts_with(':')));
    }

    #[test]
    fn mode_scopes_keep_the_shared_chains() {
        let p = plan_iptables(SAVE, Scope::IptablesOnly);
        assert_eq!(
            chains_removed(&p),
            ["KUBE-NODEPORTS", "KUBE-SEP-ABC", "KUBE-SVC-XYZ"]
        );
        // The shared KUBE-SERVICES stays, so its jump into a removed chain goes.
        assert!(p.contains(
            "-D KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-XYZ"
        ));
        assert!(!p.contains("-D PREROUTING"));
        let p = plan_iptables(SAVE, Scope::IpvsOnly);
        assert_eq!(chains_removed(&p), ["KUBE-NODE-PORT"]);
        assert!(p.contains("-D KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT"));
    }

    #[test]
    fn ipvs_scopes_release_the_sets() {
        let save = "*nat
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-POSTROUTING -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-POSTROUTING -m set --match-set SOMEONE-ELSES dst -j MASQUERADE
COMMIT
";
        let p = plan_iptables(save, Scope::IpvsOnly);
        assert_eq!(chains_removed(&p), Vec::<&str>::new());
        let dels: Vec<&str> = p.lines().filter(|l| l.starts_with("-D ")).collect();
        assert_eq!(dels.len(), 2, "{p}");
        assert!(dels
            .iter()
            .all(|d| d.contains("KUBE-CLUSTER-IP") || d.contains("KUBE-LOOP-BACK")));
        // iptables mode's own cleanup leaves set rules alone (no sets to release).
        assert_eq!(plan_iptables(save, Scope::IptablesOnly), "");
    }

    #[test]
    fn nothing_to_do() {
        assert_eq!(plan_iptables("", Scope::All), "");
        assert_eq!(
            plan_iptables("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", Scope::All),
            ""
        );
        // Garbage does not panic and plans nothing.
        assert_eq!(plan_iptables("-A\n*\n:\nCOMMIT\n-A X -j", Scope::All), "");
    }

    #[test]
    fn goto_targets_count() {
        assert_eq!(rule_target("X -m foo -g KUBE-SVC-A"), Some("KUBE-SVC-A"));
        assert_eq!(rule_target("X -j"), None);
    }
}
