//! IPVS column of scripts/bench-proxier, run in the VM lane's guest (the host has no IPVS).
//! Enters a fresh network namespace of its own, builds N services × E endpoints and prints
//! one tab-separated line: backend, N, E, full sync seconds, one-endpoint partial sync
//! seconds, no-op full sync seconds (the diff reads the whole table and applies nothing),
//! IPVS services + real servers (or iptables rules), peak RSS MiB.
//! Usage: bench_ipvs ipvs|iptables|iptables-legacy N E
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::time::Instant;

use hako_proxier::ipvs::{IpvsBackend, IpvsOpts};
use hako_proxier::{Backend, IptablesBackend, Proxier, ProxierOpts, RealIptables};

mod common;
use common::{rss_mib, slice, svc};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "ipvs".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let eps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    // A scratch network namespace: nothing of the caller's is touched.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    let ropts = common::render_opts();
    let backend: Box<dyn Backend> = match mode.as_str() {
        "ipvs" => Box::new(
            IpvsBackend::new(IpvsOpts {
                render: ropts.clone(),
                ..IpvsOpts::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        "iptables" => Box::new(IptablesBackend::new(RealIptables::default(), ropts.clone())),
        "iptables-legacy" => Box::new(IptablesBackend::new(
            RealIptables::with_variant("legacy"),
            ropts.clone(),
        )),
        m => anyhow::bail!("unknown backend {m:?} (ipvs, iptables or iptables-legacy)"),
    };
    let mut p = Proxier::new(
        backend,
        ProxierOpts {
            hostname: "n".into(),
            render: ropts,
        },
    );
    for i in 0..n {
        p.on_service_add(svc(i));
        p.on_endpointslice_add(slice(i, eps));
    }
    let t = Instant::now();
    let full = p.sync()?;
    let full_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(full.full, "first sync must be full");

    let mut changed = slice(n / 2, eps);
    if let Some(ep) = changed.endpoints.first_mut() {
        ep.addresses = vec!["10.127.255.1".into()];
    }
    p.on_endpointslice_update(changed);
    let t = Instant::now();
    let part = p.sync()?;
    let partial_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(!part.full, "second sync must be partial");

    p.force_full();
    let t = Instant::now();
    let again = p.sync()?;
    let noop_s = t.elapsed().as_secs_f64();
    writeln!(
        std::io::stdout().lock(),
        "{mode}\t{n}\t{eps}\t{full_s:.3}\t{partial_s:.4}\t{noop_s:.3}\t{}\t{:.0}",
        again.rules,
        rss_mib()
    )?;
    Ok(())
}
