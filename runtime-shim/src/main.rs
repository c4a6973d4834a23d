//! `hako-shim`: command-line entry point. `create` double-forks the shim daemon for one
//! container; the other subcommands are an operator's client of a running shim.
#![allow(unsafe_code)]

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hako_shim::client::Runtime;
use hako_shim::image::{ImageStore, PullPolicy};
use hako_shim::protocol::ExecRequest;
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

/// hako container shim: namespaces, cgroups and OCI image rootfs for one container
#[derive(Parser, Debug)]
#[command(name = "hako-shim", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the shim daemon for the container whose spec.json is in --state-dir; prints the
    /// created state as JSON once the container waits for start.
    Create {
        /// The container's state directory (holds spec.json).
        #[arg(long)]
        state_dir: PathBuf,
        /// An OCI bundle whose config.json becomes the container's spec.json (the container
        /// id is the state dir's name).
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Print the state of the container in --state-dir.
    State {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Start the container.
    Start {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Send a signal (number) to the container's PID 1.
    Kill {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Signal number.
        #[arg(long, default_value_t = 15)]
        signal: i32,
    },
    /// SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Grace period in seconds.
        #[arg(long, default_value_t = 30)]
        grace: u64,
    },
    /// Wait for the container to exit; exits with its code.
    Wait {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Run a command in the container.
    Exec {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Run on a terminal (its output comes back on stdout).
        #[arg(long, short = 't')]
        tty: bool,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        args: Vec<String>,
    },
    /// Pull an image into the store (`--policy Always|IfNotPresent|Never`); prints the image,
    /// the elapsed time and the process's peak RSS as JSON.
    Pull {
        /// Image store root.
        #[arg(long, default_value = "/var/lib/hako/images")]
        image_root: PathBuf,
        /// Pull policy.
        #[arg(long, default_value = "IfNotPresent")]
        policy: String,
        /// Docker config JSON file with registry credentials.
        #[arg(long)]
        docker_config: Option<PathBuf>,
        /// Registry host configuration directory (containerd's `config_path`):
        /// `DIR/<host[:port]>/hosts.toml` names mirrors, CAs, `skip_verify`, plain HTTP.
        #[arg(long, value_name = "DIR", default_value = hako_shim::image::hosts::DEFAULT_CONFIG_PATH)]
        registry_config_path: PathBuf,
        /// Image reference.
        reference: String,
    },
    /// List the images in the store with their size on disk (`size`), the bytes deleting
    /// one alone frees (`uniqueSize`: layers shared with other images excluded), the pull
    /// time and the last use (Unix seconds).
    Images {
        /// Image store root.
        #[arg(long, default_value = "/var/lib/hako/images")]
        image_root: PathBuf,
    },
    /// Delete the container (kills it first).
    Delete {
        /// The container's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

fn client(dir: &std::path::Path) -> anyhow::Result<hako_shim::client::ShimClient> {
    let root = dir.parent().context("state dir has no parent")?;
    let id = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("state dir has no name")?;
    Ok(Runtime::new("hako-shim", root).client(id))
}

fn print(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(v)?;
    writeln!(std::io::stdout().lock(), "{s}")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Create { state_dir, bundle } => {
            if let Some(b) = bundle {
                spec_from_bundle(&state_dir, &b)?;
            }
            create(state_dir)
        }
        Cmd::State { state_dir } => print(&client(&state_dir)?.state()?),
        Cmd::Start { state_dir } => print(&client(&state_dir)?.start()?),
        Cmd::Kill { state_dir, signal } => print(&client(&state_dir)?.kill(signal)?),
        Cmd::Stop { state_dir, grace } => {
            print(&client(&state_dir)?.stop(Duration::from_secs(grace))?)
        }
        Cmd::Wait { state_dir } => {
            let st = client(&state_dir)?.wait(None)?;
            print(&st)?;
            std::process::exit(st.exit_code.unwrap_or(255));
        }
        Cmd::Exec {
            state_dir,
            tty,
            args,
        } => {
            let r = client(&state_dir)?.exec(ExecRequest {
                args,
                tty,
                ..Default::default()
            })?;
            std::io::stdout().lock().write_all(r.stdout.as_bytes())?;
            std::io::stderr().lock().write_all(r.stderr.as_bytes())?;
            std::process::exit(r.exit_code);
        }
        Cmd::Delete { state_dir } => print(&client(&state_dir)?.delete()?),
        Cmd::Pull {
            image_root,
            policy,
            docker_config,
            registry_config_path,
            reference,
        } => pull(
            image_root,
            &policy,
            docker_config,
            &registry_config_path,
            &reference,
        ),
        Cmd::Images { image_root } => print(&ImageStore::open(image_root)?.usage()?),
    }
}

fn create(dir: PathBuf) -> anyhow::Result<()> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: single-threaded here; the child only forks again, calls setsid and runs the
    // daemon, which starts its threads after the container process is created.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            // One line: the container process keeps a copy of the pipe until it execs.
            let mut msg = String::new();
            std::io::BufReader::new(File::from(r)).read_line(&mut msg)?;
            let msg = msg.trim_end();
            let _ = nix::sys::wait::waitpid(child, None);
            if let Some(state) = msg.strip_prefix("OK ") {
                writeln!(std::io::stdout().lock(), "{state}")?;
                Ok(())
            } else if let Some(e) = msg.strip_prefix("ERR ") {
                bail!("{e}")
            } else {
                bail!("shim exited before reporting ({msg:?})")
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            let _ = nix::unistd::setsid();
            // SAFETY: as above; the intermediate process exits at once.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Parent { .. }) | Err(_) => {
                    // SAFETY: exit without running the parent's handlers.
                    unsafe { libc::_exit(0) }
                }
                Ok(nix::unistd::ForkResult::Child) => {}
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("shim.log"));
            if let (Ok(null), Ok(log)) = (File::open("/dev/null"), log) {
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
                let _ = nix::unistd::dup2(log.as_raw_fd(), 1);
                let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
            }
            let _ = std::env::set_current_dir("/");
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let code = match hako_shim::shim::run(&dir, File::from(w)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "shim failed");
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

fn pull(
    root: PathBuf,
    policy: &str,
    docker_config: Option<PathBuf>,
    registry_config_path: &std::path::Path,
    reference: &str,
) -> anyhow::Result<()> {
    let policy = match policy {
        "Always" => PullPolicy::Always,
        "IfNotPresent" => PullPolicy::IfNotPresent,
        "Never" => PullPolicy::Never,
        other => bail!("unknown pull policy {other:?} (Always, IfNotPresent, Never)"),
    };
    let cfg = match docker_config {
        Some(p) => {
            Some(std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?)
        }
        None => None,
    };
    let start = std::time::Instant::now();
    let store = ImageStore::open(root)?.with_registry_hosts(
        hako_shim::image::hosts::RegistryHosts::at(registry_config_path),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let img = rt.block_on(store.ensure(reference, policy, cfg.as_deref()))?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    print(&serde_json::json!({
        "image": img,
        "elapsedMs": elapsed_ms,
        "peakRssKiB": peak_rss_kib,
    }))
}

fn spec_from_bundle(dir: &std::path::Path, bundle: &std::path::Path) -> anyhow::Result<()> {
    let id = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("state dir has no name")?;
    let cfg = bundle.join("config.json");
    let text = std::fs::read_to_string(&cfg).with_context(|| format!("read {}", cfg.display()))?;
    let oci: oci_spec::runtime::Spec =
        serde_json::from_str(&text).with_context(|| format!("parse {}", cfg.display()))?;
    let spec = hako_shim::oci::from_oci(id, bundle, &oci)?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(
        dir.join(hako_shim::state::SPEC_FILE),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    Ok(())
}
