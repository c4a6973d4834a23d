//! `hako-shim`: command-line entry point.

use clap::Parser;

/// hako container shim: namespaces, cgroups and OCI image rootfs for one container
#[derive(Parser, Debug)]
#[command(name = "hako-shim", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
