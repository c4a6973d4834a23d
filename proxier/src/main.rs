//! `hako-proxy`: command-line entry point.

use clap::Parser;

/// hako service proxier: Services and EndpointSlices as iptables, nftables and IPVS rules
#[derive(Parser, Debug)]
#[command(name = "hako-proxy", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
