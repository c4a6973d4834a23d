//! `hako-agent`: command-line entry point.

use clap::Parser;

/// hako node agent: runs Pods from a manifest directory or a kube-apiserver
#[derive(Parser, Debug)]
#[command(name = "hako-agent", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
