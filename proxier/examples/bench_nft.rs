//! nftables benchmark driver for scripts/bench-proxier: run inside a scratch network
//! namespace. Builds N services × E endpoints, programs them with the netlink nftables
//! backend, then prints one tab-separated line: "nftables", N, E, render seconds, full sync
//! seconds, one-endpoint partial sync seconds, "-" (no bare restore), rules + elements of the
//! full sync, peak RSS MiB.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use hako_proxier::nft::layout::{self, Ids};
use hako_proxier::NftablesBackend;

mod common;
use common::{loaded_proxier, render_opts, rss_mib, size_args, slice};

fn main() -> anyhow::Result<()> {
    let (n, eps) = size_args();
    let ropts = render_opts();
    let mut p = loaded_proxier(Box::new(NftablesBackend::new(ropts.clone())), n, eps);
    let t = Instant::now();
    let full = p.sync()?;
    let full_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(full.full, "first sync must be full");

    let t = Instant::now();
    let d = layout::render(layout::IPV4, p.model(), &ropts, &mut Ids::default());
    let render_s = t.elapsed().as_secs_f64();
    drop(d);

    // One endpoint of one service changes; the median of several such updates.
    let mut times = Vec::new();
    for k in 0..5usize {
        let i = n / 2 + k;
        let mut changed = slice(i, eps);
        if let Some(ep) = changed.endpoints.first_mut() {
            ep.addresses = vec![format!("10.127.255.{}", 1 + k)];
        }
        p.on_endpointslice_update(changed);
        let t = Instant::now();
        let part = p.sync()?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(!part.full, "update sync must be partial");
    }
    times.sort_by(f64::total_cmp);
    let partial_s = times[times.len() / 2];
    println!(
        "nftables\t{n}\t{eps}\t{render_s:.3}\t{full_s:.3}\t{partial_s:.4}\t-\t{}\t{:.0}",
        full.rules,
        rss_mib()
    );
    Ok(())
}
