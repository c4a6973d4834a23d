//! Root tests of the kernel iptables-legacy writer (`hako_proxier::xtables`): the same
//! rendered payloads applied with `iptables-legacy-restore --noflush` in one fresh netns and
//! with the kernel writer in another must leave identical tables, both as
//! `iptables-legacy-save` prints them and byte for byte as the kernel returns them; rules of
//! other users added first survive unchanged.
#![cfg(feature = "root")]

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::Stdio;

use hako_proxier::iptables::{Family, Renderer, JUMPS, LOCALNET_DROP};
use hako_proxier::model::{Endpoint, Model, Protocol, ServiceKey, ServicePort};
use hako_proxier::xtables::{self, blob::Table, sys::Socket, KernelWriter};
use hako_proxier::RenderOpts;
use hako_tests::NetNs;

fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port,
        ready: true,
        serving: true,
        terminating: false,
        local,
    }
}

fn port(name: &str, proto: Protocol, cip: &str, port: u16) -> ServicePort {
    ServicePort {
        key: ServiceKey {
            namespace: "t".into(),
            name: name.into(),
        },
        port_name: "p".into(),
        protocol: proto,
        cluster_ips: vec![cip.parse().unwrap()],
        port,
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

/// Every shape the renderer writes: ClusterIP (tcp, udp, sctp), NodePort, LoadBalancer with
/// source ranges and external IPs, ClientIP affinity, Local policies (with and without local
/// endpoints), no endpoints.
fn model() -> Model {
    let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let mut v = Vec::new();
    let mut web = port("web", Protocol::Tcp, "10.96.0.10", 80);
    web.endpoints = vec![
        ep("10.244.1.2", 8080, false),
        ep("10.244.1.3", 8080, true),
        ep("10.244.1.4", 8080, false),
    ];
    v.push(web);
    let mut dns = port("dns", Protocol::Udp, "10.96.0.53", 53);
    dns.endpoints = vec![ep("10.244.1.9", 53, false)];
    v.push(dns);
    let mut sc = port("sc", Protocol::Sctp, "10.96.0.60", 9000);
    sc.endpoints = vec![ep("10.244.1.10", 9000, false)];
    v.push(sc);
    let mut np = port("np", Protocol::Tcp, "10.96.0.20", 80);
    np.node_port = Some(30080);
    np.endpoints = vec![ep("10.244.1.5", 8080, false), ep("10.244.1.6", 8080, false)];
    v.push(np);
    let mut lb = port("lb", Protocol::Tcp, "10.96.0.30", 443);
    lb.node_port = Some(30443);
    lb.lb_ips = ips(&["192.0.2.10"]);
    lb.external_ips = ips(&["198.51.100.7"]);
    lb.lb_source_ranges = vec!["203.0.113.0/24".into(), "10.0.0.0/8".into()];
    lb.endpoints = vec![ep("10.244.1.7", 8443, false)];
    v.push(lb);
    let mut sticky = port("sticky", Protocol::Tcp, "10.96.0.11", 80);
    sticky.affinity_seconds = Some(10800);
    sticky.endpoints = vec![ep("10.244.1.2", 8080, false), ep("10.244.1.3", 8080, false)];
    v.push(sticky);
    let mut local = port("local", Protocol::Tcp, "10.96.0.40", 80);
    local.node_port = Some(30040);
    local.lb_ips = ips(&["192.0.2.40"]);
    local.external_local = true;
    local.endpoints = vec![ep("10.244.1.2", 8080, true), ep("10.244.2.2", 8080, false)];
    v.push(local);
    let mut remote = port("remote", Protocol::Tcp, "10.96.0.41", 80);
    remote.node_port = Some(30041);
    remote.external_local = true;
    remote.internal_local = true;
    remote.endpoints = vec![ep("10.244.2.3", 8080, false)];
    v.push(remote);
    let mut empty = port("empty", Protocol::Tcp, "10.96.0.12", 80);
    empty.node_port = Some(30012);
    empty.external_ips = ips(&["198.51.100.12"]);
    v.push(empty);
    let mut m = Model::new();
    for p in v {
        m.insert(p.key.clone(), vec![p]);
    }
    m
}

fn opts() -> RenderOpts {
    RenderOpts {
        cluster_cidr: Some("10.244.0.0/16".into()),
        ..RenderOpts::default()
    }
}

/// `ensure_base`'s chains as a restore payload, and its jumps.
fn base() -> (String, Vec<(&'static str, &'static str, &'static str)>) {
    let mut t = String::from("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n*filter\n");
    t.push_str(":KUBE-FIREWALL - [0:0]\n");
    t.push_str(LOCALNET_DROP);
    t.push('\n');
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODEPORTS",
    ] {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    t.push_str("COMMIT\n*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    t.push_str("COMMIT\n");
    let mut jumps: Vec<_> = JUMPS.to_vec();
    jumps.extend([
        ("filter", "INPUT", "-j KUBE-FIREWALL"),
        ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
    ]);
    (t, jumps)
}

/// Two namespaces with the same foreign rules, a lock file of their own.
struct Pair {
    restore: NetNs,
    kernel: NetNs,
    lock: tempfile::TempDir,
}

/// Rules another user (Docker-like, a firewall) put there first.
const FOREIGN: &str = "
iptables-legacy -w -t filter -N DOCKER
iptables-legacy -w -t filter -A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m multiport --dports 80,443 -j ACCEPT
iptables-legacy -w -t filter -A DOCKER -m limit --limit 5/min -j LOG --log-prefix 'dock: '
iptables-legacy -w -t filter -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
iptables-legacy -w -t filter -A FORWARD -j DOCKER
iptables-legacy -w -t filter -A INPUT -p tcp --dport 22 -m state --state NEW -j ACCEPT
iptables-legacy -w -t filter -P FORWARD DROP
iptables-legacy -w -t nat -N DOCKER
iptables-legacy -w -t nat -A DOCKER -i docker0 -j RETURN
iptables-legacy -w -t nat -A DOCKER ! -i docker0 -p tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
iptables-legacy -w -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
iptables-legacy -w -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
iptables-legacy -w -t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -g DOCKER
";

impl Pair {
    fn new(foreign: bool) -> Pair {
        let p = Pair {
            restore: NetNs::new("xtr").unwrap(),
            kernel: NetNs::new("xtk").unwrap(),
            lock: tempfile::tempdir().unwrap(),
        };
        if foreign {
            for ns in [&p.restore, &p.kernel] {
                ns.sh(&format!(
                    "export XTABLES_LOCKFILE={}; {FOREIGN}",
                    p.lock_path()
                ))
                .unwrap();
            }
        }
        p
    }

    fn lock_path(&self) -> String {
        self.lock.path().join("xtables.lock").display().to_string()
    }

    /// The payload through iptables-legacy-restore in one netns and the kernel writer in
    /// the other; each must succeed.
    fn apply(&self, text: &str) {
        let mut child = self
            .restore
            .command("iptables-legacy-restore")
            .args(["--noflush", "-w", "5"])
            .env("XTABLES_LOCKFILE", self.lock_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "iptables-legacy-restore: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let w = KernelWriter::new(Some(self.lock.path().join("xtables.lock")));
        self.kernel
            .run(|| w.restore(text, &[]))
            .unwrap()
            .unwrap_or_else(|e| panic!("kernel writer: {e}\n{text}"));
    }

    /// Ensures `jumps` as ensure_base does: `-C || -I` with the binary in one netns, the
    /// kernel writer in the other.
    fn ensure(&self, text: &str, jumps: &[(&str, &str, &str)]) {
        let l = self.lock_path();
        let mut script = format!("export XTABLES_LOCKFILE={l}; printf '%s' '{text}' | iptables-legacy-restore --noflush -w 5\n");
        for (t, c, r) in jumps {
            script.push_str(&format!(
                "iptables-legacy -w -t {t} -C {c} {r} 2>/dev/null || iptables-legacy -w -t {t} -I {c} {r}\n"
            ));
        }
        self.restore.sh(&script).unwrap();
        let w = KernelWriter::new(Some(self.lock.path().join("xtables.lock")));
        self.kernel
            .run(|| w.restore(text, jumps))
            .unwrap()
            .unwrap_or_else(|e| panic!("kernel writer: {e}"));
    }

    /// Both namespaces' tables must be identical, as saved and as blobs.
    fn assert_same(&self, what: &str) {
        for table in ["filter", "nat", "mangle"] {
            let a = save(&self.restore, table);
            let b = save(&self.kernel, table);
            if a != b {
                let diff: Vec<String> = a
                    .lines()
                    .zip(b.lines())
                    .filter(|(x, y)| x != y)
                    .take(5)
                    .map(|(x, y)| format!("restore: {x}\nkernel:  {y}"))
                    .collect();
                panic!(
                    "{what}: {table} differs ({} vs {} lines):\n{}",
                    a.lines().count(),
                    b.lines().count(),
                    diff.join("\n")
                );
            }
            let ba = blob(&self.restore, table);
            let bb = blob(&self.kernel, table);
            assert_eq!(ba.0, bb.0, "{what}: {table} info differs");
            if ba.1 != bb.1 {
                let at = ba.1.iter().zip(&bb.1).position(|(x, y)| x != y);
                panic!(
                    "{what}: {table} blobs differ ({} vs {} bytes) first at {at:?}",
                    ba.1.len(),
                    bb.1.len()
                );
            }
        }
    }
}

/// `iptables-legacy-save -t table` without counters and comment lines.
fn save(ns: &NetNs, table: &str) -> String {
    let out = ns
        .command("iptables-legacy-save")
        .args(["-t", table])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                // ":CHAIN POLICY [p:b]": counters stripped.
                l.rsplit_once(' ').map_or(l, |(a, _)| a).to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The table as the kernel returns it, counters zeroed.
fn blob(ns: &NetNs, table: &str) -> (xtables::blob::Info, Vec<u8>) {
    let t = table.to_string();
    let (info, b) = ns
        .run(move || {
            let s = Socket::open().unwrap();
            xtables::read(&s, &t).unwrap()
        })
        .unwrap();
    let mut t = Table::decode(table, &info, &b).unwrap();
    for c in &mut t.chains {
        for r in c
            .rules
            .iter_mut()
            .chain(std::iter::once(&mut c.tail))
            .chain(c.head.iter_mut())
        {
            r.counters = [0; 2];
            r.comefrom = 0;
        }
    }
    t.end.counters = [0; 2];
    t.end.comefrom = 0;
    let (info2, b2, _) = t.encode().unwrap();
    assert_eq!(info2, info, "decode then encode changes the info");
    (info, b2)
}

#[test]
fn kernel_writer_matches_restore_full_and_partial() {
    let pair = Pair::new(true);
    let (base_text, jumps) = base();
    pair.ensure(&base_text, &jumps);
    pair.assert_same("base");
    // Ensuring again changes nothing.
    pair.ensure(&base_text, &jumps);
    pair.assert_same("base again");

    let mut m = model();
    let mut r = Renderer::new(Family::V4);
    let full = r.full(&m, &opts(), &BTreeSet::new());
    pair.apply(&full.text);
    pair.assert_same("full sync");

    // One service changes its endpoints, one goes away: a partial payload with -X.
    let web = ServiceKey {
        namespace: "t".into(),
        name: "web".into(),
    };
    let lb = ServiceKey {
        namespace: "t".into(),
        name: "lb".into(),
    };
    m.get_mut(&web).unwrap()[0].endpoints.pop();
    m.remove(&lb);
    let changed: BTreeSet<ServiceKey> = [web, lb].into_iter().collect();
    let part = r.partial(&m, &opts(), &changed);
    assert!(part.text.contains("-X KUBE-"), "{}", part.text);
    pair.apply(&part.text);
    pair.assert_same("partial sync");

    // A full sync again over the same tables.
    let full = r.full(&m, &opts(), &BTreeSet::new());
    pair.apply(&full.text);
    pair.assert_same("second full sync");

    // The foreign rules are still there, as they were.
    let nat = save(&pair.kernel, "nat");
    for l in [
        "-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -g DOCKER",
    ] {
        assert!(nat.contains(l), "{l} missing:\n{nat}");
    }
    let filter = save(&pair.kernel, "filter");
    assert!(
        filter.contains("-m multiport --dports 80,443 -j ACCEPT"),
        "{filter}"
    );
    assert!(filter.contains(":FORWARD DROP"), "{filter}");
}

#[test]
fn kernel_writer_refuses_what_restore_refuses() {
    let pair = Pair::new(false);
    let w = KernelWriter::new(Some(pair.lock.path().join("xtables.lock")));
    // A jump to a chain that does not exist, and a -X of a chain in use: errors, nothing
    // written.
    for bad in [
        "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j KUBE-NOWHERE\nCOMMIT\n",
        "*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n-X KUBE-B\nCOMMIT\n",
        "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -m frobnicate -j ACCEPT\nCOMMIT\n",
    ] {
        let before = save(&pair.kernel, "nat");
        let r = pair.kernel.run(|| w.restore(bad, &[])).unwrap();
        assert!(r.is_err(), "{bad}");
        assert_eq!(save(&pair.kernel, "nat"), before, "{bad}");
        let rc = pair
            .restore
            .command("sh")
            .args([
                "-c",
                &format!("printf '{bad}' | iptables-legacy-restore --noflush"),
            ])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!rc.success(), "restore took {bad}");
    }
}

#[test]
fn kernel_writer_keeps_counters_of_kept_rules() {
    let pair = Pair::new(false);
    let ns = &pair.kernel;
    ns.sh("iptables-legacy -t filter -A OUTPUT -o lo -p icmp -j ACCEPT; ping -c 3 -i 0.2 -W 1 127.0.0.1 >/dev/null")
        .unwrap();
    let w = KernelWriter::new(Some(pair.lock.path().join("xtables.lock")));
    ns.run(|| {
        w.restore(
            "*filter\n:KUBE-X - [0:0]\n-A KUBE-X -j RETURN\nCOMMIT\n",
            &[],
        )
    })
    .unwrap()
    .unwrap();
    let out = ns.sh("iptables-legacy-save -c -t filter").unwrap();
    let line = out
        .lines()
        .find(|l| l.contains("-o lo -p icmp"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(!line.starts_with("[0:"), "counters lost: {line}");
}
