//! Prints the full iptables-restore payload of N services × E endpoints (the bench's
//! synthetic objects) on stdout, for restore experiments by hand:
//! `cargo run --release -p hako-proxier --example bench_payload -- 10000 5 > payload`.
#![allow(clippy::print_stdout)]

use std::io::Write as _;

use hako_proxier::iptables::render;
use hako_proxier::{FakeIptables, IptablesBackend};

mod common;
use common::{loaded_proxier, render_opts, size_args};

fn main() -> anyhow::Result<()> {
    let (n, eps) = size_args();
    let ropts = render_opts();
    let backend = IptablesBackend::new(FakeIptables::default(), ropts.clone());
    let mut p = loaded_proxier(Box::new(backend), n, eps);
    p.sync()?;
    let r = render(p.model(), &ropts);
    std::io::stdout().lock().write_all(r.text.as_bytes())?;
    Ok(())
}
