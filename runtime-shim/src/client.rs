//! The agent's side of the runtime: start a `hako-shim` process per container and talk to
//! it over its unix socket; list and re-adopt containers from the state root. Effectful.
//!
//! A pid read from a state file is only a hint: the process it named may be gone and the
//! pid reused. [`Runtime::force_delete`] signals a recorded process only through a pidfd
//! opened for the pid and then checked against the recorded start time.

use crate::pidfd::PidFd;
use crate::protocol::{ExecRequest, ExecResult, Request, Response};
use crate::spec::ContainerSpec;
use crate::state::{self, State};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Runtime client errors, naming the container.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The spec is invalid.
    #[error(transparent)]
    Invalid(#[from] crate::spec::SpecError),
    /// A container with this id already has a state directory.
    #[error("container {0} already exists")]
    Exists(String),
    /// The shim could not create the container.
    #[error("create container {0}: {1}")]
    Create(String, String),
    /// The shim's socket could not be reached (the shim is gone).
    #[error("container {0}: shim unreachable: {1}")]
    Unreachable(String, io::Error),
    /// The shim answered with an error.
    #[error("container {0}: {1}")]
    Shim(String, String),
    /// A streamed request (exec stream, stdin attach) failed.
    #[error("container {0}: {1}")]
    Stream(String, crate::stream::StreamError),
    /// Local I/O failed.
    #[error("container {0}: {1}")]
    Io(String, io::Error),
}

/// Where shims live and which binary to run.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The `hako-shim` binary.
    pub shim_binary: PathBuf,
    /// State root: one directory per container (`/run/hako/containers`).
    pub state_root: PathBuf,
}

impl Runtime {
    /// A runtime with the given binary and state root.
    pub fn new(shim_binary: impl Into<PathBuf>, state_root: impl Into<PathBuf>) -> Self {
        Self {
            shim_binary: shim_binary.into(),
            state_root: state_root.into(),
        }
    }

    /// State directory of a container.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.state_root.join(id)
    }

    /// Create a container: start its shim (which outlives the caller) and wait until the
    /// container process is set up and waiting for `start`. On failure nothing is left.
    pub fn create(&self, spec: &ContainerSpec) -> Result<ShimClient, ClientError> {
        spec.validate()?;
        let id = spec.id.clone();
        let io_err = |e| ClientError::Io(id.clone(), e);
        std::fs::create_dir_all(&self.state_root).map_err(io_err)?;
        let dir = self.dir(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ClientError::Exists(id))
            }
            Err(e) => return Err(io_err(e)),
        }
        let data = serde_json::to_vec_pretty(spec).map_err(|e| io_err(io::Error::other(e)))?;
        if let Err(e) = std::fs::write(dir.join(state::SPEC_FILE), data) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io_err(e));
        }
        let out = Command::new(&self.shim_binary)
            .arg("create")
            .arg("--state-dir")
            .arg(&dir)
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ClientError::Create(
                    id,
                    format!("run {}: {e}", self.shim_binary.display()),
                ));
            }
        };
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(ClientError::Create(id, msg));
        }
        Ok(self.client(&id))
    }

    /// A client for an existing container.
    pub fn client(&self, id: &str) -> ShimClient {
        ShimClient {
            id: id.to_string(),
            dir: self.dir(id),
        }
    }

    /// Remove a container whose shim is gone (or will not answer): SIGKILL the recorded shim
    /// and container processes that are still the recorded ones (pid + start time, through
    /// a pidfd), then every process left in the container's cgroup, and remove its cgroup
    /// directories and its state directory. A live shim is asked to delete first.
    pub fn force_delete(&self, id: &str) -> Result<(), ClientError> {
        let c = self.client(id);
        if c.delete().is_ok() {
            return Ok(());
        }
        let dir = self.dir(id);
        if let Ok(st) = c.recorded_state() {
            use nix::sys::signal::Signal;
            // The shim first, so that it does not act on the container meanwhile.
            let shim = match st.shim_start_time {
                Some(t) => recorded_process(st.shim_pid, t),
                None => legacy_shim(st.shim_pid, &dir),
            };
            // A state file without a start time cannot name the container's process: its
            // cgroup below is the only way to it.
            let init = match (st.status, st.pid_start_time) {
                (state::Status::Stopped, _) | (_, None) => None,
                (_, Some(t)) => recorded_process(st.pid, t),
            };
            for fd in [shim, init].into_iter().flatten() {
                let _ = fd.signal(Signal::SIGKILL);
            }
            if let Err(e) = crate::cgroup::kill_all(&st.cgroup_dirs) {
                tracing::warn!(container = id, error = %e, "kill the container's cgroup");
            }
            for d in st.cgroup_dirs.iter() {
                for _ in 0..50 {
                    match std::fs::remove_dir(d) {
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => break,
                    }
                }
            }
        }
        let rootfs = dir.join("rootfs");
        let dev = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        };
        if dev(&rootfs).is_some() && dev(&rootfs) != dev(&dir) {
            return Err(ClientError::Shim(
                id.to_string(),
                "rootfs still mounted; state kept".into(),
            ));
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::Io(id.to_string(), e)),
        }
    }

    /// Every container with a state directory (for re-adoption after a restart).
    pub fn list(&self) -> Result<Vec<State>, ClientError> {
        state::list(&self.state_root).map_err(|e| ClientError::Io("*".into(), e))
    }
}

/// A pidfd on the process recorded as `pid` started at `start_time`, if it still runs.
fn recorded_process(pid: i32, start_time: u64) -> Option<PidFd> {
    if pid <= 1 {
        return None;
    }
    PidFd::open_checked(pid, start_time).ok().flatten()
}

/// A pidfd on the shim of a state file written before start times were recorded: the
/// process on that pid must have the state directory on its command line, checked after
/// the pidfd pins it (and it must still be alive after the check).
fn legacy_shim(pid: i32, dir: &Path) -> Option<PidFd> {
    if pid <= 1 {
        return None;
    }
    let fd = PidFd::open(pid).ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = String::from_utf8_lossy(&cmd).contains(&*dir.to_string_lossy());
    (ours && fd.is_alive().ok()?).then_some(fd)
}

/// A connection target for one container's shim.
#[derive(Debug, Clone)]
pub struct ShimClient {
    id: String,
    dir: PathBuf,
}

impl ShimClient {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let sock = self.dir.join(state::SOCKET);
        let mut conn =
            UnixStream::connect(&sock).map_err(|e| ClientError::Unreachable(self.id.clone(), e))?;
        let mut data = serde_json::to_vec(req)
            .map_err(|e| ClientError::Io(self.id.clone(), io::Error::other(e)))?;
        data.push(b'\n');
        conn.write_all(&data)
            .map_err(|e| ClientError::Unreachable(self.id.clone(), e))?;
        let mut line = String::new();
        BufReader::new(&conn)
            .read_line(&mut line)
            .map_err(|e| ClientError::Unreachable(self.id.clone(), e))?;
        let resp: Response = serde_json::from_str(&line).map_err(|e| {
            ClientError::Unreachable(
                self.id.clone(),
                io::Error::other(format!("bad response {line:?}: {e}")),
            )
        })?;
        match resp.error {
            Some(e) => Err(ClientError::Shim(self.id.clone(), e)),
            None => Ok(resp),
        }
    }

    fn state_of(&self, r: Response) -> Result<State, ClientError> {
        r.state
            .ok_or_else(|| ClientError::Shim(self.id.clone(), "response without state".into()))
    }

    /// Current state from the shim.
    pub fn state(&self) -> Result<State, ClientError> {
        let r = self.call(&Request::State)?;
        self.state_of(r)
    }

    /// Last state recorded on disk (works when the shim is gone).
    pub fn recorded_state(&self) -> Result<State, ClientError> {
        state::read(&self.dir).map_err(|e| ClientError::Io(self.id.clone(), e))
    }

    /// Exec the container's program.
    pub fn start(&self) -> Result<State, ClientError> {
        let r = self.call(&Request::Start)?;
        self.state_of(r)
    }

    /// Send a signal to PID 1.
    pub fn kill(&self, signal: i32) -> Result<State, ClientError> {
        let r = self.call(&Request::Kill { signal })?;
        self.state_of(r)
    }

    /// SIGTERM, SIGKILL after `grace`; returns the stopped state.
    pub fn stop(&self, grace: Duration) -> Result<State, ClientError> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let r = self.call(&Request::Stop { grace_ms })?;
        self.state_of(r)
    }

    /// Wait for the exit (or the timeout).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<State, ClientError> {
        let timeout_ms = timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        let r = self.call(&Request::Wait { timeout_ms })?;
        self.state_of(r)
    }

    /// Run a process inside the container.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecResult, ClientError> {
        let r = self.call(&Request::Exec(req))?;
        r.exec.ok_or_else(|| {
            ClientError::Shim(self.id.clone(), "response without exec result".into())
        })
    }

    /// Start a process inside the container with its stdio handed over while it runs
    /// ([`crate::stream::ExecStream`]; `wait` on it for the exit code).
    pub fn exec_stream(&self, req: ExecRequest) -> Result<crate::stream::ExecStream, ClientError> {
        let sock = self.dir.join(state::SOCKET);
        let conn =
            UnixStream::connect(&sock).map_err(|e| ClientError::Unreachable(self.id.clone(), e))?;
        crate::stream::ExecStream::start(conn, req)
            .map_err(|e| ClientError::Stream(self.id.clone(), e))
    }

    /// A duplicate of the write end of the container's stdin (containers created with
    /// `process.stdin`); the shim keeps its own, so closing this one does not close stdin.
    pub fn attach_stdin(&self) -> Result<std::fs::File, ClientError> {
        let sock = self.dir.join(state::SOCKET);
        let conn =
            UnixStream::connect(&sock).map_err(|e| ClientError::Unreachable(self.id.clone(), e))?;
        crate::stream::attach_stdin(conn).map_err(|e| ClientError::Stream(self.id.clone(), e))
    }

    /// Kill what runs, remove everything of the container; the shim exits.
    pub fn delete(&self) -> Result<State, ClientError> {
        let r = self.call(&Request::Delete)?;
        self.state_of(r)
    }
}
