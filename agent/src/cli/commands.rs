//! `logs` and `exec` subcommands (effectful: read pod records and CRI log files, talk to the
//! container's shim; print to stdout, which is the user interface).

use crate::model::record::PodRecord;
use crate::sys::state;
use anyhow::{bail, Context};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

fn find_pod(root: &Path, name: &str) -> anyhow::Result<PodRecord> {
    let (recs, _) = state::read_records(root)?;
    let (ns, n) = name
        .split_once('/')
        .map(|(a, b)| (Some(a), b))
        .unwrap_or((None, name));
    recs.into_iter()
        .find(|r| r.name() == n && ns.is_none_or(|ns| r.namespace() == ns))
        .with_context(|| {
            format!(
                "pod {name:?} not found under {}",
                root.join("pods").display()
            )
        })
}

/// Every container status of a pod: regular, init and ephemeral containers.
fn statuses(
    st: &k8s_openapi::api::core::v1::PodStatus,
) -> impl Iterator<Item = &k8s_openapi::api::core::v1::ContainerStatus> {
    st.container_statuses
        .iter()
        .flatten()
        .chain(st.init_container_statuses.iter().flatten())
        .chain(st.ephemeral_container_statuses.iter().flatten())
}

fn pick_container(rec: &PodRecord, c: Option<&str>) -> anyhow::Result<String> {
    let spec = rec.pod.spec.clone().unwrap_or_default();
    // Ephemeral containers only by name (`-c debugger`), as kubectl.
    let names: Vec<String> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .collect();
    let ephemeral = spec.ephemeral_containers.iter().flatten().map(|e| &e.name);
    if let Some(c) = c.filter(|c| ephemeral.clone().any(|n| n == c)) {
        return Ok(c.to_string());
    }
    match c {
        Some(c) if names.iter().any(|n| n == c) => Ok(c.to_string()),
        Some(c) => bail!(
            "container {c} is not valid for pod {}: choose one of {names:?}",
            rec.name()
        ),
        None => names.first().cloned().context("pod has no containers"),
    }
}

fn restart_count(rec: &PodRecord, c: &str) -> Option<i32> {
    let st = rec.pod.status.as_ref()?;
    statuses(st).find(|s| s.name == c).map(|s| s.restart_count)
}

/// Whether one container runs, for `logs -f`: its shim says so, or when the shim cannot be
/// asked (another `--run-dir`), the agent's pod record does.
struct ShimFollow {
    client: hako_shim::client::ShimClient,
    root: PathBuf,
    pod: String,
    id: String,
}

impl crate::sys::logs::FollowCtl for ShimFollow {
    fn running(&mut self) -> bool {
        match self.client.state() {
            Ok(s) => s.status == hako_shim::state::Status::Running,
            Err(_) => find_pod(&self.root, &self.pod).is_ok_and(|rec| {
                rec.pod.status.as_ref().is_some_and(|st| {
                    statuses(st).any(|c| {
                        c.container_id
                            .as_deref()
                            .and_then(|i| i.strip_prefix("hako://"))
                            == Some(self.id.as_str())
                            && c.state.as_ref().is_some_and(|s| s.running.is_some())
                    })
                })
            }),
        }
    }
}

/// `hako-agent logs POD [-c C] [--previous] [-f] [--tail N] [--timestamps] [--limit-bytes N]
/// [--since-time T]`: the bytes of the CRI log as written (no UTF-8 requirement).
pub fn logs(
    root: &Path,
    log_dir: &Path,
    shim: &hako_shim::client::Runtime,
    pod: &str,
    container: Option<&str>,
    previous: bool,
    opts: &crate::sys::logs::LogOptions,
) -> anyhow::Result<()> {
    let rec = find_pod(root, pod)?;
    let c = pick_container(&rec, container)?;
    let uid = rec.pod.metadata.uid.clone().unwrap_or_default();
    let n = u32::try_from(restart_count(&rec, &c).unwrap_or(0)).unwrap_or(0);
    let attempt = if previous {
        if n == 0 {
            bail!(
                "previous terminated container {c:?} in pod {:?} not found",
                rec.name()
            );
        }
        n - 1
    } else {
        n
    };
    let path: PathBuf = log_dir
        .join(format!("{}_{}_{uid}", rec.namespace(), rec.name()))
        .join(&c)
        .join(format!("{attempt}.log"));
    let id = crate::sys::runtime::container_id(&uid, &c, attempt);
    let mut ctl = ShimFollow {
        client: shim.client(&id),
        root: root.to_path_buf(),
        pod: pod.to_string(),
        id,
    };
    let mut out = std::io::stdout().lock();
    let mut failed: Option<std::io::Error> = None;
    crate::sys::logs::read_logs(&path, opts, &mut ctl, &mut |b| match out
        .write_all(b)
        .and_then(|()| out.flush())
    {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    })
    .with_context(|| format!("container {c:?} in pod {:?}", rec.name()))?;
    match failed {
        // The reader of a pipe went away (`logs -f | head`): not an error.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// How `exec` connects the command to this process's stdio.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecMode {
    /// `-i`: forward stdin.
    pub stdin: bool,
    /// `-t`: a terminal (used only when stdin is one, as kubectl does).
    pub tty: bool,
}

/// `hako-agent exec POD [-c C] [-i] [-t] -- CMD...`; returns the command's exit code.
pub fn exec(
    root: &Path,
    shim: &hako_shim::client::Runtime,
    pod: &str,
    container: Option<&str>,
    command: &[String],
    mode: ExecMode,
) -> anyhow::Result<i32> {
    let rec = find_pod(root, pod)?;
    let c = pick_container(&rec, container)?;
    let st = rec.pod.status.as_ref();
    let cs = st
        .and_then(|s| statuses(s).find(|s| s.name == c))
        .with_context(|| format!("container {c:?} has no status yet"))?;
    if cs.state.as_ref().and_then(|s| s.running.as_ref()).is_none() {
        bail!("container {c:?} in pod {:?} is not running", rec.name());
    }
    let id = cs
        .container_id
        .as_deref()
        .and_then(|i| i.strip_prefix("hako://"))
        .context("container has no id")?;
    let client = shim.client(id);
    if mode.stdin || mode.tty {
        let tty = mode.tty && std::io::stdin().is_terminal();
        if mode.tty && !tty {
            eprintln!("Unable to use a TTY - input is not a terminal or the right kind of file");
        }
        let req = hako_shim::protocol::ExecRequest {
            args: command.to_vec(),
            tty,
            stdin: mode.stdin,
            ..Default::default()
        };
        let stream = client
            .exec_stream(req)
            .with_context(|| format!("exec in container {c:?}"))?;
        return if tty {
            super::term::exec_tty(stream, mode.stdin)
        } else {
            super::term::exec_pipes(stream)
        }
        .with_context(|| format!("exec in container {c:?}"));
    }
    let r = client
        .exec(hako_shim::protocol::ExecRequest {
            args: command.to_vec(),
            ..Default::default()
        })
        .with_context(|| format!("exec in container {c:?}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(r.stdout.as_bytes())?;
    out.flush()?;
    eprint!("{}", r.stderr);
    Ok(r.exit_code)
}
