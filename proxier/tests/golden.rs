//! Golden render tests: `testdata/services.yaml` rendered in full must equal
//! `testdata/iptables-full.golden` (set UPDATE_GOLDEN=1 to rewrite), and every jump target
//! of the payload must exist.

use std::path::PathBuf;

use hako_proxier::config;
use hako_proxier::iptables::{check_jumps, render, RenderOpts};
use hako_proxier::{FakeIptables, IptablesBackend, Proxier, ProxierOpts};

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

#[test]
fn full_render_matches_golden() {
    let objs = config::read_dir(&testdata("")).expect("read testdata");
    let fake = FakeIptables::default();
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(fake, opts())),
        ProxierOpts {
            hostname: "node-a".into(),
            render: opts(),
        },
    );
    p.replace_all(objs.services, objs.slices);
    p.sync().expect("sync");
    let r = render(p.model(), &opts());
    let problems = check_jumps(&r.text);
    assert!(problems.is_empty(), "{problems:?}");
    let golden = testdata("iptables-full.golden");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &r.text).expect("write golden");
    }
    let want = std::fs::read_to_string(&golden).expect("read golden");
    assert_eq!(r.text, want, "render differs from {}", golden.display());
    // Skipped objects do not appear; the rest do.
    assert!(
        !r.text.contains("bad-ip") && !r.text.contains("bad-port") && !r.text.contains("headless")
    );
    assert!(!r.text.contains("10.244.9.9"));
    assert!(r.text.contains("ns3/empty has no endpoints"));
}

/// IPv6 (ip6tables) render of `testdata/dualstack/` against `testdata/iptables-ip6.golden`:
/// the same kube-proxy layout, IPv6 addresses only; the IPv4 render of the same objects
/// holds only the IPv4 half of the dual-stack service.
#[test]
fn ipv6_render_matches_golden() {
    use hako_proxier::iptables::{render_family, Family};
    let objs = config::read_dir(&testdata("dualstack")).expect("read testdata/dualstack");
    let opts = RenderOpts {
        cluster_cidr: Some("10.244.0.0/16,fd00:244::/48".into()),
        ..RenderOpts::default()
    };
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(FakeIptables::default(), opts.clone())),
        ProxierOpts {
            hostname: "node-a".into(),
            render: opts.clone(),
        },
    );
    p.replace_all(objs.services, objs.slices);
    p.sync().expect("sync");
    let r6 = render_family(Family::V6, p.model(), &opts);
    let problems = check_jumps(&r6.text);
    assert!(problems.is_empty(), "{problems:?}");
    let golden = testdata("iptables-ip6.golden");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &r6.text).expect("write golden");
    }
    let want = std::fs::read_to_string(&golden).expect("read golden");
    assert_eq!(r6.text, want, "render differs from {}", golden.display());
    // Per-family content.
    assert!(!r6.text.contains("10.96.") && !r6.text.contains("10.244."));
    assert!(r6.text.contains("! -s fd00:244::/48 -j KUBE-MARK-MASQ"));
    assert!(r6
        .text
        .contains("--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource"));
    assert!(r6
        .text
        .contains("DNAT --to-destination [fd00:244:1::2]:8080"));
    assert!(r6.text.contains("-d fd00:96::14/128 --dport 80 -j REJECT"));
    let r4 = render_family(Family::V4, p.model(), &opts);
    assert!(check_jumps(&r4.text).is_empty());
    assert!(r4.text.contains("-d 10.96.0.60/32"), "{}", r4.text);
    assert!(!r4.text.contains("fd00:"), "{}", r4.text);
    // The dual-stack service's chains have the same names in both families (same hash).
    let svc = |t: &str| {
        t.lines()
            .find(|l| l.contains("ns1/dual:http cluster IP\" -m tcp"))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(svc(&r4.text), svc(&r6.text));
    assert!(svc(&r6.text).is_some_and(|c| c.starts_with("KUBE-SVC-")));
}
