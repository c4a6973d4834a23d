//! `hako-test-registry`: runs the local OCI registry fixture for scripts (demo, benches).
//! `serve` starts a registry, pushes the standard images, prints its address on stdout and
//! runs until SIGTERM/SIGINT; `push` pushes the standard images into a running registry.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hako_tests::registry::{push_standard, Client, Registry, RegistryOptions, BUSYBOX_REPO};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

#[derive(Parser, Debug)]
#[command(
    name = "hako-test-registry",
    version,
    about = "Local OCI registry with hako's busybox test images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start docker-registry on 127.0.0.1, push the standard images, print the address and
    /// run until SIGTERM or SIGINT.
    Serve {
        /// Port on 127.0.0.1 (default: a free one).
        #[arg(long)]
        port: Option<u16>,
        /// Storage dir, kept on exit (default: a temp dir removed on exit).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Push the standard images into a running registry.
    Push {
        /// Registry address, host:port.
        #[arg(long)]
        registry: String,
    },
}

fn report(addr: &str, client: &Client) -> Result<()> {
    let pushed = push_standard(client).context("pushing the standard images")?;
    let mut err = std::io::stderr().lock();
    for (tag, m) in pushed.by_tag() {
        writeln!(
            err,
            "pushed {addr}/{BUSYBOX_REPO}:{tag} {} ({})",
            m.digest, m.media_type
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { port, dir } => {
            // Block the signals before starting the child so that none can end us before
            // cleanup; std resets the mask in the child.
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            set.thread_block().context("blocking SIGTERM/SIGINT")?;
            let mut reg = Registry::start_with(RegistryOptions {
                port,
                dir,
                ..Default::default()
            })?;
            report(reg.addr(), &reg.client())?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", reg.addr())?;
            out.flush()?;
            let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
                .context("signalfd")?;
            loop {
                if let Some(info) = sfd.read_signal().context("reading signalfd")? {
                    let sig = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0))
                        .map_or_else(|_| info.ssi_signo.to_string(), |s| s.to_string());
                    writeln!(
                        std::io::stderr(),
                        "{sig}: stopping the registry on {}",
                        reg.addr()
                    )?;
                    break;
                }
                if let Some(status) = reg.exited() {
                    anyhow::bail!(
                        "docker-registry on {} exited ({status}); log:\n{}",
                        reg.addr(),
                        reg.log_tail()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            drop(reg);
            Ok(())
        }
        Cmd::Push { registry } => {
            report(&registry, &Client::new(&registry))?;
            writeln!(std::io::stdout().lock(), "{registry}")?;
            Ok(())
        }
    }
}
