//! Prints the full iptables-restore payload of N services × E endpoints (the bench's
//! synthetic objects) on stdout, for restore experiments by hand:
//! `cargo run --release -p hako-proxier --example bench_payload -- 10000 5 > payload`.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::io::Write as _;

use hako_proxier::iptables::render;
use hako_proxier::{FakeIptables, IptablesBackend, Proxier, ProxierOpts, RenderOpts};

mod common;
use common::{slice, svc};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let eps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let ropts = RenderOpts {
        cluster_cidr: Some("10.128.0.0/9".into()),
        ..RenderOpts::default()
    };
    let mut p = Proxier::new(
        Box::new(IptablesBackend::new(FakeIptables::default(), ropts.clone())),
        ProxierOpts {
            hostname: "n".into(),
            render: ropts.clone(),
        },
    );
    for i in 0..n {
        p.on_service_add(svc(i));
        p.on_endpointslice_add(slice(i, eps));
    }
    p.sync()?;
    let r = render(p.model(), &ropts, None, &BTreeSet::new());
    std::io::stdout().lock().write_all(r.text.as_bytes())?;
    Ok(())
}
