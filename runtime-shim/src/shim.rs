//! The shim daemon: creates the container, copies its output into the CRI log, records its
//! state and exit code, and serves the lifecycle API on a unix socket until `delete`.
//! Effectful.
//!
//! Process identity: the container's PID 1 is held by a pidfd opened right after the fork
//! (while it is our unreaped child, so the pidfd names it and nothing else), and every signal
//! goes through that pidfd. The reaper observes the exit with `waitid(WNOWAIT)`, marks the
//! container exited, and only then reaps the zombie, all under the write side of
//! `Shared::exited`; whoever holds the read side and sees `false` may use the pid (signals,
//! `/proc/<pid>/ns/*` for exec) knowing it cannot have been given to another process.
#![allow(unsafe_code)]

use crate::cgroup::Cgroup;
use crate::container::{self, Init, InitPlan};
use crate::logs::{rfc3339_nano, CriLog, Stream};
use crate::pidfd::{self, PidFd, PidfdError};
use crate::protocol::{ExecRequest, ExecResult, Request, Response};
use crate::spec::ContainerSpec;
use crate::state::{self, State, Status};
use crate::sys::LinuxSyscall;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Daemon errors (reported to the creator through the ready pipe).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The spec file could not be read or parsed.
    #[error("read spec {0}: {1}")]
    Spec(PathBuf, String),
    /// The spec is invalid.
    #[error(transparent)]
    Invalid(#[from] crate::spec::SpecError),
    /// The cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The container could not be created.
    #[error(transparent)]
    Create(#[from] container::CreateError),
    /// A pidfd on the container process could not be opened.
    #[error(transparent)]
    Pidfd(#[from] PidfdError),
    /// Log, state or socket I/O failed.
    #[error("{0}: {1}")]
    Io(String, io::Error),
}

/// Why an exec into the container failed (the response's error).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The container's PID 1 has exited (or was never started).
    #[error("container {0} is not running")]
    NotRunning(String),
    /// The request has no arguments.
    #[error("exec: args is empty")]
    NoArgs,
    /// The spec's user is not in the container's /etc/passwd or /etc/group.
    #[error(transparent)]
    User(crate::users::UserError),
    /// The program is not in the container's `PATH`.
    #[error("exec: {0:?} not found in the container's PATH")]
    NotFound(String),
    /// The namespaces of the container's PID 1 could not be opened.
    #[error("open namespaces of {0}: {1}")]
    Namespaces(Pid, io::Error),
    /// No terminal could be opened in the container's devpts.
    #[error("open a terminal in {0}: {1}")]
    Terminal(Pid, io::Error),
    /// The terminal's descriptor could not be duplicated.
    #[error("dup terminal: {0}")]
    DupTerminal(io::Error),
    /// The pid namespace of the container's PID 1 could not be opened.
    #[error("open pid namespace of {0}: {1}")]
    OpenPidNamespace(Pid, io::Error),
    /// The spawning thread could not join the container's pid namespace.
    #[error("join pid namespace: {0}")]
    JoinPidNamespace(nix::Error),
    /// The process could not be started (fork, pre-exec setup or exec).
    #[error("exec {0}: {1}")]
    Spawn(String, io::Error),
    /// The spawning thread panicked.
    #[error("exec thread panicked")]
    ThreadPanicked,
    /// No pidfd could be opened on the started process (it was killed).
    #[error("exec: {0}")]
    Pidfd(PidfdError),
    /// Waiting for the process failed.
    #[error("wait exec: {0}")]
    Wait(io::Error),
}

/// Why a signal was not delivered.
#[derive(Debug, thiserror::Error)]
enum SignalError {
    /// The container has exited: nothing was signalled.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// The signal could not be sent.
    #[error(transparent)]
    Pidfd(PidfdError),
}

struct Shared {
    dir: PathBuf,
    spec: ContainerSpec,
    plan: InitPlan,
    state: Mutex<State>,
    cv: Condvar,
    init: Mutex<Init>,
    cgroup: Option<Cgroup>,
    /// The container's PID 1 (opened while it was our unreaped child).
    init_fd: PidFd,
    /// Set once PID 1 has exited, before it is reaped; the reaper holds the write side while
    /// it sets this and reaps (see the module docs).
    exited: RwLock<bool>,
}

impl Shared {
    fn snapshot(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut State)) -> State {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        if let Err(e) = state::write(&self.dir, &st) {
            tracing::error!(error = %e, "write state");
        }
        self.cv.notify_all();
        st.clone()
    }

    fn wait_stopped(&self, timeout: Option<Duration>) -> State {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.status != Status::Stopped {
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    st = self
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        st.clone()
    }

    /// Signal PID 1 through its pidfd, unless it has exited.
    fn signal(&self, sig: Signal) -> Result<(), SignalError> {
        let exited = self.exited.read().unwrap_or_else(|e| e.into_inner());
        let not_running = || SignalError::NotRunning(self.spec.id.clone());
        if *exited || self.snapshot().status == Status::Stopped {
            return Err(not_running());
        }
        match self.init_fd.signal(sig) {
            Ok(()) => Ok(()),
            Err(PidfdError::Exited(_)) => Err(not_running()),
            Err(e) => Err(SignalError::Pidfd(e)),
        }
    }

    /// SIGKILL every process in the container's cgroup (forked children and exec'd
    /// processes too, which outlive PID 1 in a shared pid namespace).
    fn kill_cgroup(&self) {
        if let Some(c) = &self.cgroup {
            if let Err(e) = c.kill_all() {
                tracing::warn!(error = %e, "kill the container's cgroup");
            }
        }
    }
}

/// Run the daemon for the container in `dir` (its `spec.json`). `ready` receives `OK <state
/// json>` or `ERR <message>`; on success this serves until `delete` and never returns.
pub fn run(dir: &Path, ready: File) -> Result<(), ShimError> {
    let mut ready = Some(ready);
    match setup(dir) {
        Ok(shared) => {
            let listener = match bind(dir) {
                Ok(l) => l,
                Err(e) => {
                    if cleanup(&shared) {
                        let _ = fs::remove_dir_all(dir);
                    }
                    report(&mut ready, &format!("ERR {e}"));
                    return Err(e);
                }
            };
            let st = shared.snapshot();
            let json = serde_json::to_string(&st).unwrap_or_default();
            report(&mut ready, &format!("OK {json}"));
            serve(shared, listener);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(dir);
            report(&mut ready, &format!("ERR {e}"));
            Err(e)
        }
    }
}

fn report(ready: &mut Option<File>, msg: &str) {
    if let Some(mut f) = ready.take() {
        let line = format!("{}\n", msg.replace('\n', " "));
        let _ = f.write_all(line.as_bytes());
    }
}

fn bind(dir: &Path) -> Result<UnixListener, ShimError> {
    let sock = dir.join(state::SOCKET);
    let _ = fs::remove_file(&sock);
    UnixListener::bind(&sock).map_err(|e| ShimError::Io(format!("bind {}", sock.display()), e))
}

fn setup(dir: &Path) -> Result<Arc<Shared>, ShimError> {
    let spec_path = dir.join(state::SPEC_FILE);
    let data =
        fs::read(&spec_path).map_err(|e| ShimError::Spec(spec_path.clone(), e.to_string()))?;
    let spec: ContainerSpec = serde_json::from_slice(&data)
        .map_err(|e| ShimError::Spec(spec_path.clone(), e.to_string()))?;
    spec.validate()?;
    let (cur, has) = container::current_oom_score_adj();
    let oom = spec
        .process
        .oom_score_adj
        .map(|r| (container::clamp_oom_score_adj(r, cur, has), r));
    if let Some((eff, req)) = oom {
        if eff != req {
            tracing::warn!(
                requested = req,
                effective = eff,
                "oom_score_adj clamped: no CAP_SYS_RESOURCE"
            );
        }
    }
    let cgroup = match &spec.cgroup {
        Some(c) => Some(Cgroup::create(c)?),
        None => None,
    };
    let res = setup_container(dir, spec, oom, cgroup.clone());
    if res.is_err() {
        if let Some(c) = &cgroup {
            c.remove();
        }
    }
    res
}

/// The part of [`setup`] after the cgroup exists (the caller removes it on error).
fn setup_container(
    dir: &Path,
    spec: ContainerSpec,
    oom: Option<(i32, i32)>,
    cgroup: Option<Cgroup>,
) -> Result<Arc<Shared>, ShimError> {
    // Open the log first: nothing to undo yet if that fails.
    let log = match &spec.log {
        Some(l) => Some(
            CriLog::open(&l.path, l.max_size, l.max_files)
                .map_err(|e| ShimError::Io(format!("open log {}", l.path.display()), e))?,
        ),
        None => None,
    };
    // Right after the fork the child is ours and unreaped: its pid cannot name another
    // process yet, so the pidfd and the start time opened now are the container's. The shim
    // also writes the child's pid to its cgroup (a no-op once the child has joined itself,
    // which it does first, before its cgroup namespace).
    let mut held: Option<(PidFd, Option<u64>)> = None;
    let join = |pid: Pid| -> Result<(), ShimError> {
        let fd = PidFd::open(pid.as_raw())?;
        held = Some((fd, pidfd::start_time(pid.as_raw()).ok()));
        match &cgroup {
            Some(c) => Ok(c.add(pid.as_raw())?),
            None => Ok(()),
        }
    };
    // With a cgroup, the child joins it itself before making its cgroup namespace (so the
    // namespace's root is the container's cgroup), and gets its `/sys/fs/cgroup` view.
    let (procs, view) = match &cgroup {
        Some(c) => (c.procs_files(), crate::cgroup::host_view()),
        None => (Vec::new(), None),
    };
    let made = InitPlan::new(&spec, dir, procs, oom.map(|o| o.0))
        .map(|plan| match view {
            Some(v) => plan.with_cgroup_view(v),
            None => plan,
        })
        .and_then(|plan| container::create(&plan, join).map(|init| (plan, init)));
    let (plan, init) = made?;
    let Some((init_fd, pid_start_time)) = held else {
        // create() succeeds only after the hook did.
        return Err(ShimError::Io(
            "container process".into(),
            io::Error::other("created without a pidfd"),
        ));
    };
    // From here on an error must also end the container process.
    let kill_init = |e: ShimError| {
        let _ = init_fd.signal(Signal::SIGKILL);
        let _ = init_fd.wait_exit(true);
        e
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    for (src, stream) in [
        (init.stdout.try_clone(), Stream::Stdout),
        (init.stderr.try_clone(), Stream::Stderr),
    ] {
        let src = src.map_err(|e| kill_init(ShimError::Io("dup output pipe".into(), e)))?;
        let log = log.clone();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            match log {
                Some(l) => {
                    if let Err(e) = l.copy_from(src, stream) {
                        tracing::error!(error = %e, "copy container output");
                    }
                }
                None => {
                    let _ = io::copy(&mut { src }, &mut io::sink());
                }
            }
            let _ = done.send(());
        });
    }
    let st = State {
        id: spec.id.clone(),
        status: Status::Created,
        shim_pid: std::process::id() as i32,
        pid: init.pid.as_raw(),
        pid_start_time,
        shim_start_time: pidfd::start_time(std::process::id() as i32).ok(),
        exit_code: None,
        reason: None,
        created_at: rfc3339_nano(SystemTime::now()),
        started_at: None,
        finished_at: None,
        oom_score_adj: oom.map(|o| o.0),
        oom_score_adj_clamped: oom.is_some_and(|(e, r)| e != r),
        cgroup_dirs: cgroup.as_ref().map(|c| c.dirs.clone()).unwrap_or_default(),
    };
    state::write(dir, &st).map_err(|e| kill_init(ShimError::Io("write state".into(), e)))?;
    // Drop our copies of the pipes' read ends held by Init: the threads own clones.
    let shared = Arc::new(Shared {
        dir: dir.to_path_buf(),
        spec,
        plan,
        state: Mutex::new(st),
        cv: Condvar::new(),
        init: Mutex::new(init),
        cgroup,
        init_fd,
        exited: RwLock::new(false),
    });
    let s2 = shared.clone();
    std::thread::spawn(move || reap(s2, done_rx));
    Ok(shared)
}

fn reap(shared: Arc<Shared>, logs_done: std::sync::mpsc::Receiver<()>) {
    // Observe the exit but leave the zombie: until it is reaped its pid stays taken.
    let code = match shared.init_fd.wait_exit(false) {
        Ok(exit) => exit.code(),
        Err(e) => {
            tracing::error!(error = %e, "wait for the container process");
            255
        }
    };
    {
        // Marked exited before the zombie goes: no signal or exec uses the pid after this.
        let mut exited = shared.exited.write().unwrap_or_else(|e| e.into_inner());
        *exited = true;
        if let Err(e) = shared.init_fd.wait_exit(true) {
            tracing::error!(error = %e, "reap the container process");
        }
    }
    // Let the log copiers drain what the container wrote (bounded: a process outside this
    // pid namespace may hold the pipes).
    let deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if logs_done.recv_timeout(left).is_err() {
            break;
        }
    }
    let ooms = shared.cgroup.as_ref().map(|c| c.oom_kills()).unwrap_or(0);
    let st = shared.update(|st| {
        st.status = Status::Stopped;
        st.exit_code = Some(code);
        st.reason = Some(state::reason(code, ooms).to_string());
        st.finished_at = Some(rfc3339_nano(SystemTime::now()));
    });
    tracing::info!(id = %st.id, exit_code = code, reason = ?st.reason, "container exited");
}

fn serve(shared: Arc<Shared>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let s = shared.clone();
        std::thread::spawn(move || handle(s, conn));
    }
}

fn handle(shared: Arc<Shared>, conn: UnixStream) {
    let mut line = String::new();
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            respond(
                &conn,
                &Response {
                    error: Some(format!("bad request: {e}")),
                    ..Default::default()
                },
            );
            return;
        }
    };
    if let Request::ExecStream(x) = &req {
        exec_stream(&shared, &conn, x);
        return;
    }
    if req == Request::AttachStdin {
        let init = shared.init.lock().unwrap_or_else(|e| e.into_inner());
        let dup = init.stdin.as_ref().map(File::try_clone);
        drop(init);
        let sent = match dup {
            Some(Ok(f)) => crate::stream::send_line_with_fds(
                &conn,
                &ok(shared.snapshot()),
                &[std::os::fd::AsRawFd::as_raw_fd(&f)],
            ),
            Some(Err(e)) => crate::stream::send_line_with_fds(&conn, &err(e), &[]),
            None => crate::stream::send_line_with_fds(
                &conn,
                &err(format!("container {} has no stdin", shared.spec.id)),
                &[],
            ),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "attach: hand over stdin");
        }
        return;
    }
    let delete = req == Request::Delete;
    let resp = dispatch(&shared, req);
    respond(&conn, &resp);
    if delete && resp.error.is_none() {
        drop(conn);
        std::process::exit(0);
    }
}

fn respond(mut conn: &UnixStream, resp: &Response) {
    let mut data = serde_json::to_vec(resp).unwrap_or_default();
    data.push(b'\n');
    let _ = conn.write_all(&data);
}

fn ok(st: State) -> Response {
    Response {
        state: Some(st),
        ..Default::default()
    }
}

fn err(e: impl std::fmt::Display) -> Response {
    Response {
        error: Some(e.to_string()),
        ..Default::default()
    }
}

fn dispatch(shared: &Arc<Shared>, req: Request) -> Response {
    match req {
        Request::State => ok(shared.snapshot()),
        Request::Start => {
            let mut init = shared.init.lock().unwrap_or_else(|e| e.into_inner());
            if init.started() {
                return err(format!("container {} already started", shared.spec.id));
            }
            match init.start() {
                Ok(()) => ok(shared.update(|st| {
                    if st.status == Status::Created {
                        st.status = Status::Running;
                    }
                    st.started_at = Some(rfc3339_nano(SystemTime::now()));
                })),
                Err(e) => err(e),
            }
        }
        Request::Kill { signal } => match Signal::try_from(signal) {
            Ok(sig) => match shared.signal(sig) {
                Ok(()) => ok(shared.snapshot()),
                Err(e) => err(e),
            },
            Err(e) => err(format!("signal {signal}: {e}")),
        },
        // Only PID 1 is signalled (in its own pid namespace its end takes every process
        // with it, as for the kubelet); delete kills the whole cgroup.
        Request::Stop { grace_ms } => {
            let st = shared.snapshot();
            if st.status == Status::Created {
                let _ = shared.signal(Signal::SIGKILL);
            } else if st.status == Status::Running {
                let _ = shared.signal(Signal::SIGTERM);
                let st = shared.wait_stopped(Some(Duration::from_millis(grace_ms)));
                if st.status != Status::Stopped {
                    let _ = shared.signal(Signal::SIGKILL);
                }
            }
            ok(shared.wait_stopped(None))
        }
        Request::Wait { timeout_ms } => {
            ok(shared.wait_stopped(timeout_ms.map(Duration::from_millis)))
        }
        Request::Exec(x) => match exec(shared, &x) {
            Ok(r) => Response {
                state: Some(shared.snapshot()),
                exec: Some(r),
                ..Default::default()
            },
            Err(e) => err(e),
        },
        Request::ExecStream(_) | Request::AttachStdin => {
            err("streaming requests are answered on their own connection")
        }
        Request::Delete => {
            let _ = shared.signal(Signal::SIGKILL);
            shared.kill_cgroup();
            let st = shared.wait_stopped(None);
            // Whatever was started in the cgroup after the first kill.
            shared.kill_cgroup();
            if cleanup(shared) {
                // Gone before the answer: the caller may reuse the id at once.
                let _ = fs::remove_dir_all(&shared.dir);
            }
            ok(st)
        }
    }
}

/// Remove the cgroup and the container's filesystem state; false when the rootfs is still
/// mounted here (then nothing under the state dir is touched).
fn cleanup(shared: &Shared) -> bool {
    if let Some(c) = &shared.cgroup {
        c.remove();
    }
    // The rootfs is mounted only in the container's mount namespace; never descend into it
    // should it be a mount point here.
    let rootfs = shared.dir.join("rootfs");
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    if dev(&rootfs).is_some() && dev(&rootfs) != dev(&shared.dir) {
        tracing::error!(path = %rootfs.display(), "rootfs still mounted; left in place");
        return false;
    }
    for d in ["rootfs", "upper", "work"] {
        let _ = fs::remove_dir_all(shared.dir.join(d));
    }
    true
}

/// A streamed exec: the process's stdio goes to the caller with the first line (see
/// [`crate::stream`]), its exit code with the second once it has exited.
fn exec_stream(shared: &Arc<Shared>, conn: &UnixStream, x: &ExecRequest) {
    let (mut child, master) = match spawn_exec(shared, x, true) {
        Ok(c) => c,
        Err(e) => return respond(conn, &err(e)),
    };
    let stdio = crate::stream::ExecStdio {
        tty: master,
        stdin: child
            .stdin
            .take()
            .map(|p| File::from(std::os::fd::OwnedFd::from(p))),
        stdout: child
            .stdout
            .take()
            .map(|p| File::from(std::os::fd::OwnedFd::from(p))),
        stderr: child
            .stderr
            .take()
            .map(|p| File::from(std::os::fd::OwnedFd::from(p))),
    };
    let sent = crate::stream::send_line_with_fds(conn, &ok(shared.snapshot()), &stdio.fds());
    // Our copies go: the caller holds the only ends now.
    drop(stdio);
    if let Err(e) = sent {
        tracing::warn!(error = %e, "exec stream: hand over stdio");
    }
    let exit_code = match child.wait() {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|s| 128 + s))
            .unwrap_or(255),
        Err(e) => return respond(conn, &err(format!("wait exec: {e}"))),
    };
    respond(
        conn,
        &Response {
            exec: Some(ExecResult {
                exit_code,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
}

fn exec(shared: &Arc<Shared>, x: &ExecRequest) -> Result<ExecResult, ExecError> {
    let (child, master) = spawn_exec(shared, x, false)?;
    collect_exec(child, master, x)
}

/// Starts an exec'd process in the container: `(child, terminal master)`. With `stream`
/// and `x.stdin` its stdin is a pipe (else /dev/null, or the terminal).
fn spawn_exec(
    shared: &Arc<Shared>,
    x: &ExecRequest,
    stream: bool,
) -> Result<(std::process::Child, Option<File>), ExecError> {
    // Held until the process is spawned: PID 1 cannot be reaped (and its pid reused) while
    // its /proc entries are read and its namespaces joined.
    let exited = shared.exited.read().unwrap_or_else(|e| e.into_inner());
    let st = shared.snapshot();
    if *exited || st.status != Status::Running {
        return Err(ExecError::NotRunning(st.id));
    }
    if x.args.is_empty() {
        return Err(ExecError::NoArgs);
    }
    let pid = Pid::from_raw(st.pid);
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let read = |p: &str| fs::read_to_string(root.join(p)).unwrap_or_default();
    let spec = &shared.spec;
    let id = crate::users::resolve(
        &spec.process.user.spec,
        &spec.process.user.additional_gids,
        &read("etc/passwd"),
        &read("etc/group"),
    )
    .map_err(ExecError::User)?;
    let mut env = spec.process.env.clone();
    env.extend(x.env.iter().cloned());
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(container::DEFAULT_PATH)
        .to_string();
    let exe = if x.args[0].contains('/') {
        x.args[0].clone()
    } else {
        path_var
            .split(':')
            .map(|d| format!("{}/{}", d.trim_end_matches('/'), x.args[0]))
            .find(|p| fs::metadata(root.join(p.trim_start_matches('/'))).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| ExecError::NotFound(x.args[0].clone()))?
    };
    let ns = container::open_namespaces(pid).map_err(|e| ExecError::Namespaces(pid, e))?;
    let procs: Vec<std::ffi::CString> = shared
        .cgroup
        .as_ref()
        .map(|c| c.procs_files())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
        .collect();
    let cwd = x
        .cwd
        .clone()
        .or_else(|| spec.process.cwd.clone())
        .unwrap_or_else(|| "/".into());
    let hook = container::ExecSetup {
        tty: x.tty,
        cgroup_procs: procs,
        namespaces: ns,
        cwd,
        seccomp: shared.plan.seccomp().cloned(),
        identity: id,
        caps: shared.plan_caps(),
        no_new_privs: spec.process.no_new_privileges,
    };
    let mut cmd = Command::new(&exe);
    cmd.arg0(&x.args[0]).args(&x.args[1..]).env_clear();
    let tty = x.tty;
    let mut master = None;
    if tty {
        let (m, slave) =
            container::open_container_pty(pid).map_err(|e| ExecError::Terminal(pid, e))?;
        let dup = |f: &File| f.try_clone().map_err(ExecError::DupTerminal);
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        master = Some(m);
        if !env.iter().any(|e| e.starts_with("TERM=")) {
            cmd.env("TERM", "xterm");
        }
    } else {
        cmd.stdin(if stream && x.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    for e in &env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        cmd.env("PATH", container::DEFAULT_PATH);
    }
    // SAFETY: the hook runs in the forked child before exec and only makes system calls
    // (open/write, setns, chdir, set*id, capset, prctl) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || container::exec_setup(&LinuxSyscall, &hook));
    }
    // Fork from a thread that joined the container's pid namespace for its children; that
    // thread ends right after (it could not start threads any more).
    let pidns = File::open(format!("/proc/{pid}/ns/pid"))
        .map_err(|e| ExecError::OpenPidNamespace(pid, e))?;
    let child = std::thread::spawn(move || {
        nix::sched::setns(&pidns, nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(ExecError::JoinPidNamespace)?;
        cmd.spawn().map_err(|e| ExecError::Spawn(exe, e))
    })
    .join()
    .map_err(|_| ExecError::ThreadPanicked)??;
    drop(exited);
    Ok((child, master))
}

/// Waits for an exec'd process and collects its output (bounded by `x.timeout_ms`).
fn collect_exec(
    child: std::process::Child,
    master: Option<File>,
    x: &ExecRequest,
) -> Result<ExecResult, ExecError> {
    let mut child = child;
    // Not waited for yet, so the pid is still the exec'd process's: the timer kills it
    // through this pidfd, which cannot reach whoever gets the pid after the wait below.
    let fd = match PidFd::open(child.id() as i32) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ExecError::Pidfd(e));
        }
    };
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let timeout = x.timeout_ms.map(Duration::from_millis);
    let timer = std::thread::spawn(move || match timeout {
        Some(t) => {
            if rx.recv_timeout(t).is_err() {
                let _ = fd.signal(Signal::SIGKILL);
                return true;
            }
            false
        }
        None => false,
    });
    // The spawning thread dropped `cmd` and with it our copies of the terminal's slave end.
    let reader = master.map(|mut m| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            // EIO once every slave fd is closed.
            while let Ok(n) = m.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
            let _ = done_tx.send(());
        });
        (buf, done_rx)
    });
    let out = child.wait_with_output().map_err(ExecError::Wait);
    // A background process may keep the terminal open: answer with what came within 1 s.
    let tty_out = reader.map(|(buf, done)| {
        let _ = done.recv_timeout(Duration::from_secs(1));
        std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()))
    });
    let _ = tx.send(());
    let timed_out = timer.join().unwrap_or(false);
    let out = out?;
    let exit_code = out
        .status
        .code()
        .or_else(|| out.status.signal().map(|s| 128 + s))
        .unwrap_or(255);
    let stdout = tty_out.unwrap_or(out.stdout);
    Ok(ExecResult {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        timed_out,
    })
}

impl Shared {
    fn plan_caps(&self) -> std::collections::HashSet<caps::Capability> {
        self.plan.caps().clone()
    }
}
