//! Golden render tests: `testdata/services.yaml` rendered in full must equal
//! `testdata/iptables-full.golden` (set UPDATE_GOLDEN=1 to rewrite), and every jump target
//! of the payload must exist.

use std::collections::BTreeSet;
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
    let r = render(p.model(), &opts(), None, &BTreeSet::new());
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
