//! `hako-cni`: command-line entry point.

use clap::Parser;

/// hako CNI plugin: bridge, veth, IPAM and VXLAN overlay (CNI spec 1.1)
#[derive(Parser, Debug)]
#[command(name = "hako-cni", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
