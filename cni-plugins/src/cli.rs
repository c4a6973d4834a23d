//! Entry point: the CNI protocol, or the operator commands `hako-cni overlay sync|show`
//! when called with arguments. Effectful.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::overlay::{self, OverlayConfig, OverlayError, Peer};

#[derive(Parser)]
#[command(
    name = "hako-cni",
    about = "hako CNI plugin (run without arguments as a CNI plugin)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// The VXLAN overlay device and its peer entries.
    #[command(subcommand)]
    Overlay(OverlayCmd),
}

#[derive(Subcommand)]
enum OverlayCmd {
    /// Ensure the device and converge FDB, neighbour and route entries to a peer file.
    Sync {
        /// JSON array of {node_ip, pod_cidr, vtep_mac}.
        #[arg(long)]
        peers: PathBuf,
        #[command(flatten)]
        dev: DevArgs,
    },
    /// Print the device and its entries as JSON.
    Show {
        #[command(flatten)]
        dev: DevArgs,
    },
}

#[derive(Args)]
struct DevArgs {
    /// VXLAN device name.
    #[arg(long, default_value = "hako.1")]
    dev: String,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    vni: u32,
    /// UDP port.
    #[arg(long, default_value_t = 4789)]
    port: u16,
    /// Underlay interface (default: the default route's).
    #[arg(long)]
    underlay_if: Option<String>,
    /// Underlay address (default: the underlay interface's first).
    #[arg(long)]
    underlay_ip: Option<IpAddr>,
    /// Where the VTEP MAC is persisted.
    #[arg(long, default_value = "/var/lib/hako/overlay")]
    state_dir: PathBuf,
}

impl DevArgs {
    fn config(self) -> OverlayConfig {
        OverlayConfig {
            dev: self.dev,
            vni: self.vni,
            port: self.port,
            underlay_if: self.underlay_if,
            underlay_ip: self.underlay_ip,
            state_dir: self.state_dir,
        }
    }
}

fn print(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    );
}

/// A failed operator command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The peer file could not be read.
    #[error("reading {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// The peer file is not a JSON array of peers.
    #[error("parsing {}", .0.display())]
    Parse(PathBuf, #[source] serde_json::Error),
    /// The overlay could not be set up or read.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

/// `error: cause: cause ...`, the whole source chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn overlay_main(cmd: OverlayCmd) -> Result<(), CliError> {
    match cmd {
        OverlayCmd::Sync { peers, dev } => {
            let text =
                std::fs::read_to_string(&peers).map_err(|e| CliError::Read(peers.clone(), e))?;
            let list: Vec<Peer> =
                serde_json::from_str(&text).map_err(|e| CliError::Parse(peers.clone(), e))?;
            let cfg = dev.config();
            let info = overlay::ensure_device(&cfg)?;
            let report = overlay::sync_peers(&cfg, &list)?;
            print(&serde_json::json!({ "device": info, "report": report }));
        }
        OverlayCmd::Show { dev } => {
            let (info, state) = overlay::read_state(&dev.config())?;
            let fdb: Vec<_> = state
                .fdb
                .iter()
                .map(|(m, ip)| serde_json::json!({"mac": crate::netlink::fmt_mac(m), "dst": ip}))
                .collect();
            let neigh: Vec<_> = state
                .neigh
                .iter()
                .map(|(ip, m)| serde_json::json!({"ip": ip, "mac": crate::netlink::fmt_mac(m)}))
                .collect();
            let routes: Vec<_> = state
                .routes
                .iter()
                .map(|(d, g)| serde_json::json!({"dst": d, "gw": g}))
                .collect();
            print(
                &serde_json::json!({ "device": info, "fdb": fdb, "neighbours": neigh, "routes": routes }),
            );
        }
    }
    Ok(())
}

/// Runs the binary; returns the exit code.
pub fn main() -> i32 {
    if std::env::args_os().len() <= 1 {
        return crate::skel::main();
    }
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs piped to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAKO_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
            }),
        )
        .try_init();
    match cli.cmd {
        Top::Overlay(cmd) => match overlay_main(cmd) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{}", chain(&e));
                1
            }
        },
    }
}
