//! Creation of the container's first process: fork from the (single-threaded) shim into new
//! pid/mnt/uts/ipc namespaces (or the pod's), overlayfs rootfs, standard mounts, pivot_root,
//! masked paths, hostname, user, capabilities, rlimits, oom_score_adj, cgroup; then wait for
//! `start` and exec. Effectful: every system call of the sequence goes through
//! [`crate::sys::Syscall`] ([`LinuxSyscall`] in the shim, a recording fake in the unit tests
//! below), so the order and arguments of the sequence are tested without root.
//!
//! The rootfs comes from an image and may hold hostile symlinks, and a destination may lie in
//! a volume another container is changing: every mount destination is resolved inside the
//! rootfs descriptor ([`Resolve::InRoot`], runc's semantics), missing entries are made with
//! *at calls on the parent's descriptor, and mounts go onto `/proc/self/fd/N` of the opened
//! destination, never onto a joined path.
#![allow(unsafe_code)]

use crate::saferoot::{fd_path, Resolve, Root};
use crate::spec::{ContainerSpec, Mount, Rootfs};
use crate::sys::{LinuxSyscall, SysError, Syscall};
use crate::users;
use caps::{CapSet, Capability};
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid};
use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Default `PATH` when the spec's env has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Container creation errors.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A pipe, fork or namespace call in the shim failed.
    #[error("{0}: {1}")]
    Sys(&'static str, SysError),
    /// A pid namespace file (the shim's own, or the pod's to join) could not be opened.
    #[error("container setup failed: open {}: {}", .0.display(), .1)]
    OpenNamespace(PathBuf, io::Error),
    /// The shim's hook after the fork (pidfd, cgroup) failed; the child was killed.
    #[error("container setup failed: {0}")]
    AfterFork(Box<dyn std::error::Error + Send + Sync>),
    /// A bind-mount source does not exist.
    #[error("mount source {0} does not exist (destination {1})")]
    MissingMountSource(String, String),
    /// A capability name is unknown.
    #[error(transparent)]
    Capability(#[from] crate::capabilities::UnknownCapability),
    /// The seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The container process reported a setup failure.
    #[error("container setup failed: {0}")]
    Setup(String),
    /// Reading the setup report failed.
    #[error("read setup report: {0}")]
    Report(io::Error),
}

/// What the forked child needs, prepared before fork.
pub struct InitPlan {
    spec: ContainerSpec,
    rootfs: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    caps: HashSet<Capability>,
    cgroup_procs: Vec<PathBuf>,
    oom_score_adj: Option<i32>,
    seccomp: Option<seccompiler::BpfProgram>,
    cgroup_view: Option<crate::cgroup::View>,
}

/// The oom_score_adj to write: the requested one, or the lowest settable value (the current
/// one) when lowering needs CAP_SYS_RESOURCE and the process lacks it. Pure.
pub fn clamp_oom_score_adj(requested: i32, current: i32, has_sys_resource: bool) -> i32 {
    let r = requested.clamp(-1000, 1000);
    if r < current && !has_sys_resource {
        current
    } else {
        r
    }
}

/// Read this process's oom_score_adj and whether it may lower it.
pub fn current_oom_score_adj() -> (i32, bool) {
    let cur = fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let has = caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_RESOURCE).unwrap_or(false);
    (cur, has)
}

impl InitPlan {
    /// Prepare a plan; checks mount sources and capability names before anything is made.
    pub fn new(
        spec: &ContainerSpec,
        state_dir: &Path,
        cgroup_procs: Vec<PathBuf>,
        oom_score_adj: Option<i32>,
    ) -> Result<Self, CreateError> {
        for m in &spec.mounts {
            let bind = m.kind.as_deref().unwrap_or("bind") == "bind";
            if bind && !Path::new(&m.source).exists() {
                return Err(CreateError::MissingMountSource(
                    m.source.clone(),
                    m.destination.clone(),
                ));
            }
        }
        let caps = if spec.privileged {
            caps::all()
        } else {
            match &spec.process.capabilities {
                Some(names) => crate::capabilities::parse_set(names)?,
                None => crate::capabilities::default_set(),
            }
        };
        let seccomp = match &spec.seccomp {
            _ if spec.privileged => None,
            p => crate::seccomp::compile(p, &caps)?,
        };
        Ok(Self {
            seccomp,
            spec: spec.clone(),
            rootfs: state_dir.join("rootfs"),
            upper: state_dir.join("upper"),
            work: state_dir.join("work"),
            caps,
            cgroup_procs,
            oom_score_adj,
            cgroup_view: None,
        })
    }

    /// Give the container its own cgroup namespace (made right after it joins its cgroups,
    /// so their leaves are its root) and mount `view` at `/sys/fs/cgroup` inside it,
    /// read-only unless privileged (runc's cgroupns + cgroup mount).
    pub fn with_cgroup_view(mut self, view: crate::cgroup::View) -> Self {
        self.cgroup_view = Some(view);
        self
    }
}

/// A created (not yet started) container process.
pub struct Init {
    /// Host pid of the container's PID 1.
    pub pid: Pid,
    /// Read end of the container's stdout.
    pub stdout: File,
    /// Read end of the container's stderr.
    pub stderr: File,
    /// Write end of the container's stdin (`process.stdin`).
    pub stdin: Option<File>,
    report: File,
    start: Option<File>,
}

fn pipe() -> Result<(File, File), CreateError> {
    let (r, w) =
        unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| CreateError::Sys("pipe2", e.into()))?;
    Ok((File::from(r), File::from(w)))
}

/// Fork the container process. The calling process must be single-threaded. `after_fork`
/// runs in the parent while the child sets itself up (e.g. moving it into its cgroup, which
/// is slow on cgroup v1); an error there kills the child.
pub fn create<E>(
    plan: &InitPlan,
    after_fork: impl FnOnce(Pid) -> Result<(), E>,
) -> Result<Init, CreateError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let sys = LinuxSyscall;
    for d in [&plan.rootfs, &plan.upper, &plan.work] {
        let _ = fs::create_dir_all(d);
    }
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (rep_r, rep_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let (in_r, in_w) = match plan.spec.process.stdin {
        true => pipe().map(|(r, w)| (Some(r), Some(w)))?,
        false => (None, None),
    };
    // The pid namespace applies to the shim's next child only: switch for the fork, then
    // switch back (a process whose children would land elsewhere cannot start threads).
    let own = Path::new("/proc/self/ns/pid");
    let own_pid_ns =
        File::open(own).map_err(|e| CreateError::OpenNamespace(own.to_path_buf(), e))?;
    enter_pid_namespace(&sys, &plan.spec)?;
    // SAFETY: the shim is single-threaded when it creates the container, so the child may
    // allocate and run ordinary code until exec.
    let forked = unsafe { unistd::fork() };
    if !matches!(forked, Ok(ForkResult::Child)) {
        sys.setns(own_pid_ns.as_fd(), CloneFlags::CLONE_NEWPID)
            .map_err(|e| CreateError::Sys("setns back to the shim's pid namespace", e))?;
    }
    match forked.map_err(|e| CreateError::Sys("fork", e.into()))? {
        ForkResult::Child => {
            drop((out_r, err_r, rep_r, start_w, in_w));
            let mut rep = rep_w;
            let stdio = ChildStdio {
                stdin: in_r,
                stdout: out_w,
                stderr: err_w,
            };
            let res = child(plan, stdio, &mut rep, start_r);
            let msg = match res {
                Ok(never) => match never {},
                Err(m) => m,
            };
            let _ = rep.write_all(format!("E{msg}").as_bytes());
            // SAFETY: _exit never returns and skips atexit handlers of the forked shim.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop((out_w, err_w, rep_w, start_r, in_r));
            let mut init = Init {
                pid: child,
                stdout: out_r,
                stderr: err_r,
                stdin: in_w,
                report: rep_r,
                start: Some(start_w),
            };
            if let Err(e) = after_fork(child) {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(CreateError::AfterFork(e.into()));
            }
            let mut b = [0u8; 1];
            let n = init.report.read(&mut b).map_err(CreateError::Report)?;
            if n == 1 && b[0] == b'R' {
                return Ok(init);
            }
            let mut msg = String::new();
            let _ = init.report.read_to_string(&mut msg);
            let _ = nix::sys::wait::waitpid(child, None);
            Err(CreateError::Setup(if msg.is_empty() {
                "container process died during setup".into()
            } else {
                msg
            }))
        }
    }
}

/// Put the shim's next child into the pod's pid namespace (`shareProcessNamespace`), or
/// into a new one.
fn enter_pid_namespace(sys: &dyn Syscall, spec: &ContainerSpec) -> Result<(), CreateError> {
    match &spec.namespaces.pid {
        Some(p) => {
            let f = File::open(p).map_err(|e| CreateError::OpenNamespace(p.clone(), e))?;
            sys.setns(f.as_fd(), CloneFlags::CLONE_NEWPID)
                .map_err(|e| CreateError::Sys("setns pid", e))
        }
        None => sys
            .unshare(CloneFlags::CLONE_NEWPID)
            .map_err(|e| CreateError::Sys("unshare pid", e)),
    }
}

impl Init {
    /// Let the process exec its program; returns the exec error if there was one.
    pub fn start(&mut self) -> Result<(), CreateError> {
        let Some(mut w) = self.start.take() else {
            return Ok(());
        };
        w.write_all(b"S").map_err(CreateError::Report)?;
        drop(w);
        let mut msg = String::new();
        self.report
            .read_to_string(&mut msg)
            .map_err(CreateError::Report)?;
        match msg.strip_prefix('E') {
            Some(m) => Err(CreateError::Setup(m.to_string())),
            None => Ok(()),
        }
    }

    /// Whether `start` has been called.
    pub fn started(&self) -> bool {
        self.start.is_none()
    }
}

/// Errors of the setup sequence in the container process (sent to the shim through the
/// report pipe, where they become [`CreateError::Setup`]). Each names the object it failed on.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `setsid` failed.
    #[error("setsid: {0}")]
    Setsid(SysError),
    /// Writing `0` to a `cgroup.procs` file failed.
    #[error("join cgroup {}: {}", .0.display(), .1)]
    JoinCgroup(PathBuf, SysError),
    /// Writing `/proc/self/oom_score_adj` failed.
    #[error("write oom_score_adj {0}: {1}")]
    OomScoreAdj(i32, SysError),
    /// `/dev/null` could not be opened for stdin.
    #[error("open /dev/null: {0}")]
    OpenDevNull(io::Error),
    /// Moving a stdio descriptor into place failed.
    #[error("dup2: {0}")]
    Dup2(SysError),
    /// A namespace file to join could not be opened.
    #[error("open {kind} namespace {}: {source}", .path.display())]
    OpenNamespace {
        /// `net`, `ipc` or `uts`.
        kind: &'static str,
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Joining a namespace failed.
    #[error("join {kind} namespace {}: {source}", .path.display())]
    JoinNamespace {
        /// `net`, `ipc` or `uts`.
        kind: &'static str,
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: SysError,
    },
    /// Creating the container's own namespaces failed.
    #[error("unshare mnt/uts/ipc: {0}")]
    Unshare(SysError),
    /// Creating the container's cgroup namespace failed.
    #[error("unshare cgroup namespace: {0}")]
    UnshareCgroup(SysError),
    /// The spec has no rootfs.
    #[error("no rootfs")]
    NoRootfs,
    /// The spec has no process arguments.
    #[error("process.args is empty")]
    NoArgs,
    /// The mounted rootfs could not be opened.
    #[error(transparent)]
    Rootfs(crate::saferoot::SafeRootError),
    /// A mount failed.
    #[error("mount {what} on {target} ({fstype}): {error}")]
    Mount {
        /// What was mounted (`none` for none).
        what: String,
        /// Where (the destination as given).
        target: String,
        /// The filesystem type (`bind` for none).
        fstype: String,
        /// The error.
        error: SysError,
    },
    /// A flag or propagation remount failed.
    #[error("remount {target} ({flags:?}): {error}")]
    Remount {
        /// The destination as given.
        target: String,
        /// The remount flags.
        flags: MsFlags,
        /// The error.
        error: SysError,
    },
    /// A mount destination could not be resolved inside the rootfs.
    #[error("mount destination {0}: {1}")]
    Destination(String, crate::saferoot::SafeRootError),
    /// A mount destination could not be opened.
    #[error("open mount destination {0}: {1}")]
    OpenDestination(String, nix::Error),
    /// A missing mount destination could not be created.
    #[error("create mount destination {0}: {1}")]
    CreateDestination(String, nix::Error),
    /// What is mounted on a destination could not be opened again.
    #[error("reopen mount destination {0}: {1}")]
    ReopenDestination(String, nix::Error),
    /// A symlink on the way to a mount destination could not be read.
    #[error("readlink {}: {}", .0.display(), .1)]
    Readlink(PathBuf, nix::Error),
    /// A mount destination leads through more than 40 symlinks.
    #[error("mount destination {0}: too many levels of symbolic links")]
    SymlinkLoop(String),
    /// A mount destination (or what is mounted on it) could not be examined.
    #[error("stat {0}: {1}")]
    Stat(String, SysError),
    /// The mount's root on a destination is not the source that was bound there.
    #[error("mount destination {0} changed while it was being mounted")]
    DestinationChanged(String),
    /// A bind-mount source could not be opened.
    #[error("open mount source {0}: {1}")]
    OpenSource(String, nix::Error),
    /// A bind-mount source could not be examined.
    #[error("mount source {0}: {1}")]
    SourceStat(String, nix::Error),
    /// A link in the container's `/dev` could not be made.
    #[error("symlink /dev/{0}: {1}")]
    DevSymlink(&'static str, nix::Error),
    /// Setting the hostname failed.
    #[error("sethostname {0}: {1}")]
    Hostname(String, SysError),
    /// Changing directory failed.
    #[error("chdir {0}: {1}")]
    Chdir(String, SysError),
    /// `pivot_root` into the rootfs failed.
    #[error("pivot_root: {0}")]
    PivotRoot(SysError),
    /// Detaching the old root failed.
    #[error("detach old root: {0}")]
    DetachOldRoot(SysError),
    /// The user could not be resolved in the image.
    #[error(transparent)]
    User(users::UserError),
    /// The working directory could not be created.
    #[error("create cwd {0}: {1}")]
    CreateCwd(String, io::Error),
    /// The program is not in the container's `PATH`.
    #[error("executable {0:?} not found in the container's PATH")]
    ExecutableNotFound(String),
    /// An argument or environment entry holds a NUL byte.
    #[error("NUL byte in {0:?}")]
    NulByte(String),
    /// An rlimit name is unknown.
    #[error("unknown rlimit {0}")]
    UnknownRlimit(String),
    /// Setting an rlimit failed.
    #[error("setrlimit {0}: {1}")]
    Rlimit(String, SysError),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(SysError),
    /// The identity or capabilities could not be set.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// `no_new_privs` could not be set.
    #[error("no_new_privs: {0}")]
    NoNewPrivs(SysError),
    /// The ready report could not be sent to the shim.
    #[error("report ready: {0}")]
    Report(io::Error),
    /// `execve` failed.
    #[error("exec {0}: {1}")]
    Exec(String, SysError),
}

/// Errors of [`set_identity`], naming the step and its object.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A capability could not be dropped from the bounding set.
    #[error("drop {0} from bounding set: {1}")]
    DropBounding(Capability, SysError),
    /// `PR_SET_KEEPCAPS` failed.
    #[error("keepcaps: {0}")]
    Keepcaps(SysError),
    /// `setgroups` failed.
    #[error("setgroups: {0}")]
    Setgroups(SysError),
    /// `setresgid` failed.
    #[error("setgid {0}: {1}")]
    Setgid(u32, SysError),
    /// `setresuid` failed.
    #[error("setuid {0}: {1}")]
    Setuid(u32, SysError),
    /// Reading or setting a capability set failed (`op` names the set).
    #[error("{op}: {source}")]
    CapSet {
        /// `read permitted`, `clear ambient`, `set inheritable`, ...
        op: &'static str,
        /// The error.
        source: SysError,
    },
}

enum Never {}

/// A mount onto a path (before `pivot_root`: a host path; after: the container's).
fn mnt(
    sys: &dyn Syscall,
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SetupError> {
    sys.mount(src.map(Path::new), target, fstype, flags, data)
        .map_err(|error| SetupError::Mount {
            what: src.unwrap_or("none").to_string(),
            target: target.display().to_string(),
            fstype: fstype.unwrap_or("bind").to_string(),
            error,
        })
}

/// The container's standard streams before they are moved onto 0, 1 and 2.
struct ChildStdio {
    /// The attach pipe's read end (`process.stdin`), else `/dev/null` is opened.
    stdin: Option<File>,
    stdout: File,
    stderr: File,
}

/// The forked child: runs the setup sequence with the real system calls; reports ready,
/// waits for `start` and execs. Returns only on failure.
fn child(
    plan: &InitPlan,
    stdio: ChildStdio,
    rep: &mut File,
    mut start_r: File,
) -> Result<Never, SetupError> {
    let ready = move || {
        rep.write_all(b"R").map_err(SetupError::Report)?;
        let mut b = [0u8; 1];
        match start_r.read(&mut b) {
            Ok(1) => {}
            _ => {
                // The shim went away or deleted the container before start.
                // SAFETY: plain process exit.
                unsafe { libc::_exit(0) }
            }
        }
        drop(start_r);
        Ok(())
    };
    run(&LinuxSyscall, plan, stdio, ready)
}

/// The container's setup sequence, every system call through `sys`, in this order:
/// session, cgroup, oom_score_adj, stdio; join the pod's net/ipc/uts namespaces, unshare the
/// rest with a new mount namespace, make `/` private; mount the rootfs (bind or overlay), the
/// standard mounts (`/proc`, `/sys`, `/dev`) and the volumes; hostname; `pivot_root` and
/// detach the old root; masked and read-only paths; user and working directory; read-only
/// rootfs; rlimits; seccomp; identity and capabilities; chdir; no_new_privs. Then `ready`
/// (report, wait for start) and exec. Returns only on failure; the first failing step ends
/// it.
fn run(
    sys: &dyn Syscall,
    plan: &InitPlan,
    stdio: ChildStdio,
    ready: impl FnOnce() -> Result<(), SetupError>,
) -> Result<Never, SetupError> {
    let spec = &plan.spec;
    sys.setsid().map_err(SetupError::Setsid)?;
    for f in &plan.cgroup_procs {
        sys.write_file(f, "0")
            .map_err(|e| SetupError::JoinCgroup(f.clone(), e))?;
    }
    // Its own cgroup namespace, rooted at the cgroups it has just joined.
    if plan.cgroup_view.is_some() {
        sys.unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(SetupError::UnshareCgroup)?;
    }
    if let Some(v) = plan.oom_score_adj {
        sys.write_file(Path::new("/proc/self/oom_score_adj"), &v.to_string())
            .map_err(|e| SetupError::OomScoreAdj(v, e))?;
    }
    // stdio: /dev/null (or the attach pipe) in, pipes out.
    let null = match stdio.stdin {
        Some(r) => r,
        None => File::open("/dev/null").map_err(SetupError::OpenDevNull)?,
    };
    for (fd, target) in [
        (null.as_raw_fd(), 0),
        (stdio.stdout.as_raw_fd(), 1),
        (stdio.stderr.as_raw_fd(), 2),
    ] {
        sys.dup2(fd, target).map_err(SetupError::Dup2)?;
    }
    drop((null, stdio.stdout, stdio.stderr));

    // Namespaces.
    let mut flags = CloneFlags::CLONE_NEWNS;
    for (path, flag, kind) in [
        (&spec.namespaces.net, CloneFlags::CLONE_NEWNET, "net"),
        (&spec.namespaces.ipc, CloneFlags::CLONE_NEWIPC, "ipc"),
        (&spec.namespaces.uts, CloneFlags::CLONE_NEWUTS, "uts"),
    ] {
        match path {
            Some(p) => {
                let f = File::open(p).map_err(|source| SetupError::OpenNamespace {
                    kind,
                    path: p.clone(),
                    source,
                })?;
                sys.setns(f.as_fd(), flag)
                    .map_err(|source| SetupError::JoinNamespace {
                        kind,
                        path: p.clone(),
                        source,
                    })?;
            }
            None if flag != CloneFlags::CLONE_NEWNET => flags |= flag,
            None => {}
        }
    }
    sys.unshare(flags).map_err(SetupError::Unshare)?;
    mnt(
        sys,
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;

    // Root filesystem.
    let root = &plan.rootfs;
    match &spec.rootfs {
        Rootfs::Dir(d) => mnt(
            sys,
            Some(&d.to_string_lossy()),
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?,
        Rootfs::Layers(layers) => {
            let lower: Vec<String> = layers
                .iter()
                .rev()
                .map(|l| l.to_string_lossy().into_owned())
                .collect();
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.join(":"),
                plan.upper.display(),
                plan.work.display()
            );
            mnt(
                sys,
                Some("overlay"),
                root,
                Some("overlay"),
                MsFlags::empty(),
                Some(&data),
            )?;
        }
        Rootfs::None => return Err(SetupError::NoRootfs),
    }
    // Every destination below is resolved inside the rootfs through this descriptor.
    let rootfs = Root::open(root).map_err(SetupError::Rootfs)?;
    standard_mounts(sys, &rootfs, spec.privileged)?;
    if let Some(view) = &plan.cgroup_view {
        cgroup_mounts(sys, &rootfs, view, spec.privileged)?;
    }
    for m in &spec.mounts {
        volume(sys, &rootfs, m)?;
    }
    drop(rootfs);
    if let Some(h) = &spec.hostname {
        sys.sethostname(h)
            .map_err(|e| SetupError::Hostname(h.clone(), e))?;
    }
    // pivot_root(".", ".") then detach the old root stacked under the new one.
    sys.chdir(root)
        .map_err(|e| SetupError::Chdir(root.display().to_string(), e))?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .map_err(SetupError::PivotRoot)?;
    sys.umount2(Path::new("."), MntFlags::MNT_DETACH)
        .map_err(SetupError::DetachOldRoot)?;
    sys.chdir(Path::new("/"))
        .map_err(|e| SetupError::Chdir("/".into(), e))?;

    for p in spec.effective_masked_paths() {
        mask(sys, Path::new(&p))?;
    }
    for p in spec.effective_readonly_paths() {
        let t = Path::new(&p);
        if sys.metadata(t).is_ok() {
            mnt(
                sys,
                Some(&p),
                t,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            mnt(
                sys,
                None,
                t,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None,
            )?;
        }
    }

    // User (resolved inside the image) and working directory.
    let passwd = sys
        .read_to_string(Path::new("/etc/passwd"))
        .unwrap_or_default();
    let group = sys
        .read_to_string(Path::new("/etc/group"))
        .unwrap_or_default();
    let id = users::resolve(
        &spec.process.user.spec,
        &spec.process.user.additional_gids,
        &passwd,
        &group,
    )
    .map_err(SetupError::User)?;
    let cwd = spec.process.cwd.clone().unwrap_or_else(|| "/".into());
    if sys.metadata(Path::new(&cwd)).is_err() {
        sys.create_dir_all(Path::new(&cwd))
            .map_err(|e| SetupError::CreateCwd(cwd.clone(), e))?;
        let _ = sys.chown(
            Path::new(&cwd),
            Uid::from_raw(id.uid),
            Gid::from_raw(id.gid),
        );
    }
    if spec.readonly_rootfs {
        mnt(
            sys,
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }

    // Environment and executable.
    let mut env = spec.process.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", id.home));
    }
    if let Some(h) = &spec.hostname {
        if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
            env.push(format!("HOSTNAME={h}"));
        }
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let arg0 = spec.process.args.first().ok_or(SetupError::NoArgs)?;
    let exe = find_executable_in(sys, arg0, &path_var)
        .ok_or_else(|| SetupError::ExecutableNotFound(arg0.clone()))?;
    let cstr = |s: &str| CString::new(s).map_err(|_| SetupError::NulByte(s.to_string()));
    let c_exe = cstr(&exe)?;
    let c_args = spec
        .process
        .args
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;

    for r in &spec.process.rlimits {
        let res =
            rlimit_resource(&r.kind).ok_or_else(|| SetupError::UnknownRlimit(r.kind.clone()))?;
        sys.setrlimit(res, r.soft, r.hard)
            .map_err(|e| SetupError::Rlimit(r.kind.clone(), e))?;
    }

    if let Some(f) = &plan.seccomp {
        sys.load_seccomp(f).map_err(SetupError::Seccomp)?;
    }
    set_identity(sys, &id, &plan.caps)?;
    sys.chdir(Path::new(&cwd))
        .map_err(|e| SetupError::Chdir(cwd.clone(), e))?;
    if spec.process.no_new_privileges {
        sys.set_no_new_privs().map_err(SetupError::NoNewPrivs)?;
    }

    // Created: report, then wait for start.
    ready()?;
    let e = sys.execve(&c_exe, &c_args, &c_env);
    Err(SetupError::Exec(exe, e))
}

/// Drop the bounding set to `set`, switch to the identity and set the capability sets.
pub fn set_identity(
    sys: &dyn Syscall,
    id: &users::Identity,
    set: &HashSet<Capability>,
) -> Result<(), IdentityError> {
    for c in caps::all() {
        if !set.contains(&c) {
            sys.drop_bounding(c)
                .map_err(|e| IdentityError::DropBounding(c, e))?;
        }
    }
    sys.set_keepcaps(true).map_err(IdentityError::Keepcaps)?;
    let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    sys.setgroups(&groups).map_err(IdentityError::Setgroups)?;
    sys.setresgid(Gid::from_raw(id.gid))
        .map_err(|e| IdentityError::Setgid(id.gid, e))?;
    sys.setresuid(Uid::from_raw(id.uid))
        .map_err(|e| IdentityError::Setuid(id.uid, e))?;
    let capset = |op: &'static str| move |source| IdentityError::CapSet { op, source };
    // Only what this process holds can be kept (root here may lack CAP_SYS_RESOURCE).
    let held = sys
        .read_caps(CapSet::Permitted)
        .map_err(capset("read permitted"))?;
    let set: HashSet<Capability> = set.intersection(&held).copied().collect();
    sys.clear_caps(CapSet::Ambient)
        .map_err(capset("clear ambient"))?;
    sys.set_caps(CapSet::Inheritable, &HashSet::new())
        .map_err(capset("set inheritable"))?;
    sys.set_caps(CapSet::Effective, &set)
        .map_err(capset("set effective"))?;
    sys.set_caps(CapSet::Permitted, &set)
        .map_err(capset("set permitted"))?;
    Ok(())
}

/// Look `name` up in `path_var` (relative to the current root); names with `/` are used as is.
pub fn find_executable(name: &str, path_var: &str) -> Option<String> {
    find_executable_in(&LinuxSyscall, name, path_var)
}

/// [`find_executable`] with the files as `sys` sees them.
fn find_executable_in(sys: &dyn Syscall, name: &str, path_var: &str) -> Option<String> {
    if name.contains('/') {
        return Some(name.to_string());
    }
    path_var.split(':').filter(|d| !d.is_empty()).find_map(|d| {
        let p = format!("{}/{name}", d.trim_end_matches('/'));
        let m = sys.metadata(Path::new(&p)).ok()?;
        (m.is_file() && m.permissions().mode() & 0o111 != 0).then_some(p)
    })
}

fn rlimit_resource(name: &str) -> Option<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource as R;
    Some(match name.to_ascii_uppercase().as_str() {
        "RLIMIT_NOFILE" => R::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => R::RLIMIT_NPROC,
        "RLIMIT_CORE" => R::RLIMIT_CORE,
        "RLIMIT_STACK" => R::RLIMIT_STACK,
        "RLIMIT_FSIZE" => R::RLIMIT_FSIZE,
        "RLIMIT_MEMLOCK" => R::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => R::RLIMIT_AS,
        "RLIMIT_CPU" => R::RLIMIT_CPU,
        "RLIMIT_DATA" => R::RLIMIT_DATA,
        "RLIMIT_NICE" => R::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => R::RLIMIT_RTPRIO,
        "RLIMIT_SIGPENDING" => R::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => R::RLIMIT_MSGQUEUE,
        _ => return None,
    })
}

/// Whether a mount destination is a directory or a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DestKind {
    Dir,
    File,
}

/// A mount destination inside the rootfs, resolved with [`Resolve::InRoot`] (symlinks in the
/// image resolve as if the rootfs were `/`, like runc's securejoin) and created with *at calls
/// on the parent's descriptor: the parent directory, the entry's name in it and the entry
/// itself (`O_PATH|O_NOFOLLOW`). Mounts go onto `/proc/self/fd/N` of `fd`, never onto a
/// joined path, so a symlink swapped in afterwards (say by another container sharing the
/// volume the destination lies in) redirects nothing.
struct Dest {
    parent: OwnedFd,
    name: OsString,
    fd: OwnedFd,
    /// The destination as given, for messages.
    path: String,
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open_path_nofollow(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, nix::Error> {
    nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

fn file_type(fd: BorrowedFd<'_>) -> Result<SFlag, nix::Error> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)
}

fn same_inode(sys: &dyn Syscall, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<bool, SysError> {
    let (x, y) = (sys.fstat(a)?, sys.fstat(b)?);
    Ok(x.st_dev == y.st_dev && x.st_ino == y.st_ino)
}

/// Resolve (and create when missing) the mount destination `path` inside `root`. A final
/// component that is a symlink is followed inside the root too (at most 40 times), so a
/// dangling `/etc/resolv.conf -> ../run/x` makes `/run/x` inside the rootfs, as runc does.
fn dest(root: &Root, path: &str, kind: DestKind) -> Result<Dest, SetupError> {
    let mut cur = PathBuf::from(path);
    for _ in 0..40 {
        let (parent, name) = root
            .parent_of(&cur, Resolve::InRoot, Some(Mode::from_bits_truncate(0o755)))
            .map_err(|e| SetupError::Destination(path.to_string(), e))?;
        match open_path_nofollow(parent.as_fd(), &name) {
            Ok(fd) => {
                if file_type(fd.as_fd())
                    .map_err(|e| SetupError::Stat(path.to_string(), e.into()))?
                    == SFlag::S_IFLNK
                {
                    let target = nix::fcntl::readlinkat(Some(parent.as_raw_fd()), name.as_os_str())
                        .map_err(|e| SetupError::Readlink(cur.clone(), e))?;
                    // Relative targets resolve from the link's directory; absolute ones from
                    // the rootfs (parent_of treats a leading '/' as the root).
                    cur = cur
                        .parent()
                        .unwrap_or(Path::new("/"))
                        .join(Path::new(&target));
                    continue;
                }
                return Ok(Dest {
                    parent,
                    name,
                    fd,
                    path: path.to_string(),
                });
            }
            Err(nix::Error::ENOENT) => {
                let made = match kind {
                    DestKind::Dir => nix::sys::stat::mkdirat(
                        Some(parent.as_raw_fd()),
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    ),
                    DestKind::File => nix::fcntl::openat(
                        Some(parent.as_raw_fd()),
                        name.as_os_str(),
                        OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_WRONLY
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )
                    .map(|fd| drop(owned(fd))),
                };
                match made {
                    // Made now, or by someone else meanwhile: look again.
                    Ok(()) | Err(nix::Error::EEXIST) => continue,
                    Err(e) => return Err(SetupError::CreateDestination(path.to_string(), e)),
                }
            }
            Err(e) => return Err(SetupError::OpenDestination(path.to_string(), e)),
        }
    }
    Err(SetupError::SymlinkLoop(path.to_string()))
}

impl Dest {
    /// The root of what is now mounted on the destination: its name looked up again in the
    /// (held) parent, which crosses into the new mount.
    fn mounted(&self) -> Result<OwnedFd, SetupError> {
        open_path_nofollow(self.parent.as_fd(), &self.name)
            .map_err(|e| SetupError::ReopenDestination(self.path.clone(), e))
    }

    /// Mount onto the destination's descriptor.
    fn mount(
        &self,
        sys: &dyn Syscall,
        src: Option<&Path>,
        what: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SetupError> {
        sys.mount(src, &fd_path(self.fd.as_fd()), fstype, flags, data)
            .map_err(|error| SetupError::Mount {
                what: what.to_string(),
                target: self.path.clone(),
                fstype: fstype.unwrap_or("bind").to_string(),
                error,
            })
    }

    /// Change flags or propagation of what is mounted on the destination (`expect`: the
    /// inode the mount's root must be, for bind mounts).
    fn remount(
        &self,
        sys: &dyn Syscall,
        flags: MsFlags,
        expect: Option<BorrowedFd<'_>>,
    ) -> Result<(), SetupError> {
        let top = self.mounted()?;
        if let Some(src) = expect {
            if !same_inode(sys, top.as_fd(), src)
                .map_err(|e| SetupError::Stat(self.path.clone(), e))?
            {
                return Err(SetupError::DestinationChanged(self.path.clone()));
            }
        }
        sys.mount(None, &fd_path(top.as_fd()), None, flags, None)
            .map_err(|error| SetupError::Remount {
                target: self.path.clone(),
                flags,
                error,
            })
    }
}

/// The container's `/sys/fs/cgroup` (after `/sys`): v2 → the unified tree mounted there;
/// v1 → a tmpfs with each hierarchy in its directory, then the tmpfs made read-only. Made in
/// the container's cgroup namespace, so every hierarchy's root is the container's cgroup.
/// Read-only (nosuid, nodev, noexec) unless privileged.
fn cgroup_mounts(
    sys: &dyn Syscall,
    root: &Root,
    view: &crate::cgroup::View,
    privileged: bool,
) -> Result<(), SetupError> {
    let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let ro = if privileged {
        MsFlags::empty()
    } else {
        MsFlags::MS_RDONLY
    };
    let top = dest(root, "/sys/fs/cgroup", DestKind::Dir)?;
    if let crate::cgroup::View::V2 = view {
        return top.mount(
            sys,
            Some(Path::new("cgroup2")),
            "cgroup2",
            Some("cgroup2"),
            nse | ro,
            None,
        );
    }
    top.mount(
        sys,
        Some(Path::new("tmpfs")),
        "tmpfs",
        Some("tmpfs"),
        nse,
        Some("mode=755"),
    )?;
    // Everything below is made in the fresh tmpfs, through its descriptor.
    let tmpfs = Root::from_fd(top.mounted()?, PathBuf::from("/sys/fs/cgroup"));
    for m in view.mounts() {
        dest(&tmpfs, &m.dir, DestKind::Dir)?.mount(
            sys,
            Some(Path::new(m.fstype)),
            m.fstype,
            Some(m.fstype),
            nse | ro,
            m.data.as_deref(),
        )?;
    }
    if !privileged {
        top.remount(
            sys,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nse,
            None,
        )?;
    }
    Ok(())
}

/// Open a bind-mount source. Sources are paths the agent chose on the host (volume
/// directories, its own subPath bind mounts, pod files), so symlinks in them are followed,
/// as runc does for `source`; the mount is then made from the descriptor.
fn open_source(src: &str) -> Result<OwnedFd, SetupError> {
    nix::fcntl::open(src, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map(owned)
        .map_err(|e| SetupError::OpenSource(src.to_string(), e))
}

fn standard_mounts(sys: &dyn Syscall, root: &Root, privileged: bool) -> Result<(), SetupError> {
    let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc_ = dest(root, "/proc", DestKind::Dir)?;
    proc_.mount(
        sys,
        Some(Path::new("proc")),
        "proc",
        Some("proc"),
        nse,
        None,
    )?;
    let sys_dir = dest(root, "/sys", DestKind::Dir)?;
    let ro = if privileged {
        MsFlags::empty()
    } else {
        MsFlags::MS_RDONLY
    };
    if sys_dir
        .mount(
            sys,
            Some(Path::new("sysfs")),
            "sysfs",
            Some("sysfs"),
            nse | ro,
            None,
        )
        .is_err()
    {
        // Not the owner of the network namespace: bind the host's /sys instead.
        let host_sys = open_source("/sys")?;
        sys_dir.mount(
            sys,
            Some(&fd_path(host_sys.as_fd())),
            "/sys",
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if !privileged {
            sys_dir.remount(
                sys,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                Some(host_sys.as_fd()),
            )?;
        }
    }
    let dev_dest = dest(root, "/dev", DestKind::Dir)?;
    dev_dest.mount(
        sys,
        Some(Path::new("tmpfs")),
        "tmpfs",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    // Everything below is made in the fresh tmpfs, through its descriptor.
    let dev = Root::from_fd(dev_dest.mounted()?, PathBuf::from("/dev"));
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let made = sys.mknodat(
            dev.as_fd(),
            name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        );
        if made.is_err() {
            let host = open_source(&format!("/dev/{name}"))?;
            let node = dest(&dev, name, DestKind::File)?;
            node.mount(
                sys,
                Some(&fd_path(host.as_fd())),
                &format!("/dev/{name}"),
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        } else {
            let _ = sys.fchmodat(dev.as_fd(), name, Mode::from_bits_truncate(0o666));
        }
    }
    dest(&dev, "pts", DestKind::Dir)?.mount(
        sys,
        Some(Path::new("devpts")),
        "devpts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    dest(&dev, "shm", DestKind::Dir)?.mount(
        sys,
        Some(Path::new("shm")),
        "shm",
        Some("tmpfs"),
        nse,
        Some("mode=1777,size=65536k"),
    )?;
    dest(&dev, "mqueue", DestKind::Dir)?.mount(
        sys,
        Some(Path::new("mqueue")),
        "mqueue",
        Some("mqueue"),
        nse,
        None,
    )?;
    let devfd = dev.as_fd().as_raw_fd();
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        unistd::symlinkat(target, Some(devfd), link)
            .map_err(|e| SetupError::DevSymlink(link, e))?;
    }
    Ok(())
}

fn volume(sys: &dyn Syscall, root: &Root, m: &Mount) -> Result<(), SetupError> {
    let kind = m.kind.as_deref().unwrap_or("bind");
    let mut flags = MsFlags::empty();
    let mut ro = false;
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => ro = true,
            "rw" | "bind" | "rbind" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "rprivate" | "private" => prop = MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            "rslave" | "slave" => prop = MsFlags::MS_REC | MsFlags::MS_SLAVE,
            "rshared" | "shared" => prop = MsFlags::MS_REC | MsFlags::MS_SHARED,
            other => data.push(other.to_string()),
        }
    }
    if kind == "bind" {
        let src = open_source(&m.source)?;
        let dir = file_type(src.as_fd())
            .map_err(|e| SetupError::SourceStat(m.source.clone(), e))?
            == SFlag::S_IFDIR;
        let target = dest(
            root,
            &m.destination,
            if dir { DestKind::Dir } else { DestKind::File },
        )?;
        target.mount(
            sys,
            Some(&fd_path(src.as_fd())),
            &m.source,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if ro || !flags.is_empty() {
            let mut f = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
            if ro {
                f |= MsFlags::MS_RDONLY;
            }
            target.remount(sys, f, Some(src.as_fd()))?;
        }
        if !prop.is_empty() {
            target.remount(sys, prop, Some(src.as_fd()))?;
        }
    } else {
        let target = dest(root, &m.destination, DestKind::Dir)?;
        if ro {
            flags |= MsFlags::MS_RDONLY;
        }
        let d = data.join(",");
        target.mount(
            sys,
            Some(Path::new(&m.source)),
            &m.source,
            Some(kind),
            flags,
            (!d.is_empty()).then_some(d.as_str()),
        )?;
        if !prop.is_empty() {
            target.remount(sys, prop, None)?;
        }
    }
    Ok(())
}

fn mask(sys: &dyn Syscall, p: &Path) -> Result<(), SetupError> {
    match sys.metadata(p) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => mnt(
            sys,
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        ),
        Ok(_) => mnt(sys, Some("/dev/null"), p, None, MsFlags::MS_BIND, None),
    }
}

/// What an exec'd process does in its pre-exec hook, all prepared before the fork.
pub struct ExecSetup {
    /// Make stdin (a terminal) the controlling terminal of a new session.
    pub tty: bool,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<CString>,
    /// The namespaces of the container's PID 1 ([`open_namespaces`]).
    pub namespaces: Vec<(OwnedFd, CloneFlags)>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The container's seccomp filter.
    pub seccomp: Option<seccompiler::BpfProgram>,
    /// The user to become.
    pub identity: users::Identity,
    /// The capability set to keep.
    pub caps: HashSet<Capability>,
    /// Set no_new_privs last.
    pub no_new_privs: bool,
}

/// The pre-exec hook of an exec (in the forked child): controlling terminal, cgroup,
/// namespaces, chdir, seccomp, identity and capabilities, no_new_privs, in that order. The
/// error keeps the errno, which is all the parent learns of it.
pub fn exec_setup(sys: &dyn Syscall, s: &ExecSetup) -> io::Result<()> {
    let to_io = |e: SysError| match e {
        SysError::Errno(e) => io::Error::from(e),
        SysError::Io(e) => e,
        other => io::Error::other(other),
    };
    if s.tty {
        take_controlling_tty()?;
    }
    for p in &s.cgroup_procs {
        write_zero(p)?;
    }
    for (fd, flag) in &s.namespaces {
        sys.setns(fd.as_fd(), *flag).map_err(to_io)?;
    }
    sys.chdir(Path::new(&s.cwd)).map_err(to_io)?;
    if let Some(f) = &s.seccomp {
        sys.load_seccomp(f).map_err(to_io)?;
    }
    set_identity(sys, &s.identity, &s.caps).map_err(io::Error::other)?;
    if s.no_new_privs {
        sys.set_no_new_privs().map_err(to_io)?;
    }
    Ok(())
}

/// Open `/proc/<pid>/ns/<name>` for every namespace an exec joins.
pub fn open_namespaces(pid: Pid) -> io::Result<Vec<(OwnedFd, CloneFlags)>> {
    let mut out = Vec::new();
    for (name, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let f = File::open(format!("/proc/{pid}/ns/{name}"))?;
        out.push((OwnedFd::from(f), flag));
    }
    Ok(out)
}

/// Duplicate a raw fd into a `File` (for the pre-exec hook's cgroup join).
pub fn file_from_fd(fd: OwnedFd) -> File {
    // SAFETY: `fd` is owned and moved into the File.
    unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
}

impl InitPlan {
    /// The capability set the container runs with.
    pub fn caps(&self) -> &HashSet<Capability> {
        &self.caps
    }

    /// The compiled seccomp filter, if the container has one.
    pub fn seccomp(&self) -> Option<&seccompiler::BpfProgram> {
        self.seccomp.as_ref()
    }
}

/// Write `0` (the calling process) to a `cgroup.procs` file; safe to call after fork.
pub fn write_zero(path: &std::ffi::CStr) -> io::Result<()> {
    let fd = nix::fcntl::open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(io::Error::from)?;
    // SAFETY: `fd` was just opened and is owned here.
    let f = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::write(&f, b"0").map_err(io::Error::from)?;
    Ok(())
}

/// Open a terminal pair in the devpts instance of the container whose PID 1 is `pid`:
/// `(master, slave)`.
pub fn open_container_pty(pid: Pid) -> io::Result<(File, File)> {
    use std::os::fd::AsRawFd;
    let master = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/{pid}/root/dev/pts/ptmx"))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int from a valid pointer; the fd is an open ptmx.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd or -1.
    let fd = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let slave = unsafe { File::from_raw_fd(fd) };
    Ok((master, slave))
}

/// Make stdin the controlling terminal of a new session (in a pre-exec hook).
pub fn take_controlling_tty() -> io::Result<()> {
    nix::unistd::setsid().map_err(io::Error::from)?;
    // SAFETY: TIOCSCTTY on fd 0 with argument 0; no memory is passed.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_clamp() {
        for (req, cur, cap, want) in [
            (-997, 0, false, 0),
            (-997, 0, true, -997),
            (1000, 0, false, 1000),
            (500, 600, false, 600),
            (-2000, -1000, true, -1000),
        ] {
            assert_eq!(clamp_oom_score_adj(req, cur, cap), want);
        }
    }

    #[test]
    fn destinations_resolve_inside_the_rootfs() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let rootfs = d.path().join("rootfs");
        let host = d.path().join("host");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::create_dir_all(&host).unwrap();
        // Absolute symlinks naming host paths, a dangling relative one, a loop.
        symlink(host.join("hosts"), rootfs.join("etc/hosts")).unwrap();
        symlink("../run/resolv.conf", rootfs.join("etc/resolv.conf")).unwrap();
        symlink(&host, rootfs.join("data")).unwrap();
        symlink("loop2", rootfs.join("loop1")).unwrap();
        symlink("loop1", rootfs.join("loop2")).unwrap();
        let root = Root::open(&rootfs).unwrap();
        let inside = |p: &Path| rootfs.join(p.strip_prefix("/").unwrap());

        let hosts = dest(&root, "/etc/hosts", DestKind::File).unwrap();
        assert!(!host.join("hosts").exists(), "created on the host");
        assert!(inside(&host.join("hosts")).is_file());
        assert_eq!(
            fs::read_link(fd_path(hosts.fd.as_fd())).unwrap(),
            inside(&host.join("hosts"))
        );
        dest(&root, "/etc/resolv.conf", DestKind::File).unwrap();
        assert!(rootfs.join("run/resolv.conf").is_file());
        let data = dest(&root, "/data/sub", DestKind::Dir).unwrap();
        assert!(!host.join("sub").exists());
        assert!(inside(&host.join("sub")).is_dir());
        assert_eq!(data.name, "sub");
        // Existing entries are used as they are; `..` never leaves the rootfs.
        dest(&root, "/../../etc", DestKind::Dir).unwrap();
        assert!(dest(&root, "/loop1", DestKind::Dir).is_err());
        assert_eq!(fs::read_dir(&host).unwrap().count(), 0);
    }

    #[test]
    fn executables() {
        assert_eq!(find_executable("/bin/x", ""), Some("/bin/x".into()));
        assert_eq!(
            find_executable("sh", "/nonexistent:/bin"),
            Some("/bin/sh".into())
        );
        assert_eq!(find_executable("no-such-prog-xyz", "/bin"), None);
    }

    /// The setup sequence against the recording fake: no root, nothing mounted.
    mod sequence {
        use super::*;
        use crate::seccomp::SeccompProfile;
        use crate::spec::{NamespacePaths, Process, Rlimit, User};
        use crate::sys::fake::{Call, RecordingSyscall};
        use nix::errno::Errno;

        /// A state dir whose `rootfs/` already holds what the image and procfs would show.
        struct Fx {
            dir: tempfile::TempDir,
            rootfs: PathBuf,
            spec: ContainerSpec,
            cgroup_procs: Vec<PathBuf>,
            oom: Option<i32>,
        }

        impl Fx {
            fn new() -> Self {
                let dir = tempfile::tempdir().unwrap();
                let rootfs = dir.path().join("rootfs");
                for d in ["etc", "bin", "proc/acpi", "proc/sys", "layer1", "layer2"] {
                    fs::create_dir_all(rootfs.join(d)).unwrap();
                }
                fs::write(
                    rootfs.join("etc/passwd"),
                    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
                )
                .unwrap();
                fs::write(
                    rootfs.join("etc/group"),
                    "root:x:0:\napp:x:1000:\nextra:x:3000:app\n",
                )
                .unwrap();
                // Only inside the rootfs: found by the exec lookup after pivot_root only.
                let prog = rootfs.join("bin/hako-seq-prog");
                fs::write(&prog, "#!/bin/sh\n").unwrap();
                fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
                fs::write(rootfs.join("proc/kcore"), "").unwrap();
                let spec = ContainerSpec {
                    id: "seq".into(),
                    rootfs: Rootfs::Layers(vec![
                        dir.path().join("lower0"),
                        dir.path().join("lower1"),
                    ]),
                    process: Process {
                        args: vec!["hako-seq-prog".into(), "-x".into()],
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Fx {
                    dir,
                    rootfs,
                    spec,
                    cgroup_procs: Vec::new(),
                    oom: None,
                }
            }

            fn plan(&self) -> InitPlan {
                InitPlan::new(
                    &self.spec,
                    self.dir.path(),
                    self.cgroup_procs.clone(),
                    self.oom,
                )
                .unwrap()
            }

            /// Run the sequence; the error it ended with (the fake's exec "fails" with
            /// ECANCELED once reached).
            fn run(&self, sys: &RecordingSyscall) -> SetupError {
                let plan = self.plan();
                let null = || File::open("/dev/null").unwrap();
                let stdio = ChildStdio {
                    stdin: None,
                    stdout: null(),
                    stderr: null(),
                };
                match run(sys, &plan, stdio, || Ok(())) {
                    Ok(never) => match never {},
                    Err(e) => e,
                }
            }

            /// A path as the tests name it: `ROOTFS/...` below the rootfs.
            fn show(&self, p: &Path) -> String {
                match p.strip_prefix(&self.rootfs) {
                    Ok(rel) if rel.as_os_str().is_empty() => "ROOTFS".into(),
                    Ok(rel) => format!("ROOTFS/{}", rel.display()),
                    Err(_) => p.display().to_string(),
                }
            }

            /// `(source, target, fstype, flags)` of every mount, in order.
            fn mounts(&self, calls: &[Call]) -> Vec<(String, String, String, MsFlags)> {
                calls
                    .iter()
                    .filter_map(|c| match c {
                        Call::Mount {
                            source,
                            target,
                            fstype,
                            flags,
                            ..
                        } => Some((
                            source.as_deref().map(|s| self.show(s)).unwrap_or_default(),
                            self.show(target),
                            fstype.clone().unwrap_or_default(),
                            *flags,
                        )),
                        _ => None,
                    })
                    .collect()
            }
        }

        fn reached_exec(e: &SetupError) -> bool {
            matches!(e, SetupError::Exec(_, SysError::Errno(Errno::ECANCELED)))
        }

        fn first(calls: &[Call], what: &str, f: impl Fn(&Call) -> bool) -> usize {
            calls
                .iter()
                .position(f)
                .unwrap_or_else(|| panic!("no {what} in {calls:#?}"))
        }

        fn last(calls: &[Call], what: &str, f: impl Fn(&Call) -> bool) -> usize {
            calls
                .iter()
                .rposition(f)
                .unwrap_or_else(|| panic!("no {what} in {calls:#?}"))
        }

        fn is_mount(c: &Call) -> bool {
            matches!(c, Call::Mount { .. })
        }

        fn bind_ro_remount() -> MsFlags {
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY
        }

        #[test]
        fn session_cgroup_and_stdio_come_first() {
            let mut fx = Fx::new();
            fx.cgroup_procs = vec![PathBuf::from("/cg/memory/c/cgroup.procs")];
            fx.oom = Some(500);
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            assert_eq!(
                calls[..6],
                [
                    Call::Setsid,
                    Call::WriteFile("/cg/memory/c/cgroup.procs".into(), "0".into()),
                    Call::WriteFile("/proc/self/oom_score_adj".into(), "500".into()),
                    Call::Dup2(0),
                    Call::Dup2(1),
                    Call::Dup2(2),
                ]
            );
        }

        #[test]
        fn cgroup_namespace_after_the_join_and_the_view_mounted_read_only() {
            let mut fx = Fx::new();
            fx.cgroup_procs = vec![PathBuf::from("/cg/memory/c/cgroup.procs")];
            let view = crate::cgroup::View::V1(vec![
                crate::cgroup::ViewMount {
                    dir: "memory".into(),
                    fstype: "cgroup",
                    data: Some("memory".into()),
                },
                crate::cgroup::ViewMount {
                    dir: "cpu,cpuacct".into(),
                    fstype: "cgroup",
                    data: Some("cpu,cpuacct".into()),
                },
            ]);
            let plan = fx.plan().with_cgroup_view(view);
            let sys = RecordingSyscall::new();
            let null = || File::open("/dev/null").unwrap();
            let stdio = ChildStdio {
                stdin: None,
                stdout: null(),
                stderr: null(),
            };
            let err = match run(&sys, &plan, stdio, || Ok(())) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            assert!(reached_exec(&err), "{err}");
            let calls = sys.calls();
            let join = first(
                &calls,
                "cgroup join",
                |c| matches!(c, Call::WriteFile(p, _) if p.ends_with("cgroup.procs")),
            );
            let cgns = first(&calls, "cgroup namespace", |c| {
                *c == Call::Unshare(CloneFlags::CLONE_NEWCGROUP)
            });
            assert!(join < cgns && cgns < first(&calls, "mount", is_mount));
            let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            let ro = MsFlags::MS_RDONLY;
            let mounts = fx.mounts(&calls);
            let at = mounts
                .iter()
                .position(|m| m.1 == "ROOTFS/sys/fs/cgroup")
                .unwrap_or_else(|| panic!("no cgroup mount in {mounts:#?}"));
            let want =
                |s: &str, t: &str, f: &str, fl| (s.to_string(), t.to_string(), f.to_string(), fl);
            assert_eq!(
                mounts[at..at + 4],
                [
                    want("tmpfs", "ROOTFS/sys/fs/cgroup", "tmpfs", nse),
                    want("cgroup", "ROOTFS/sys/fs/cgroup/memory", "cgroup", nse | ro),
                    want(
                        "cgroup",
                        "ROOTFS/sys/fs/cgroup/cpu,cpuacct",
                        "cgroup",
                        nse | ro
                    ),
                    want("", "ROOTFS/sys/fs/cgroup", "", bind_ro_remount() | nse),
                ]
            );
            // Without a view: no cgroup namespace, nothing on /sys/fs/cgroup.
            let mut fx = Fx::new();
            fx.cgroup_procs = vec![PathBuf::from("/cg/memory/c/cgroup.procs")];
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            assert!(!calls.contains(&Call::Unshare(CloneFlags::CLONE_NEWCGROUP)));
            assert!(!fx.mounts(&calls).iter().any(|m| m.1.contains("cgroup")));
        }

        #[test]
        fn pod_namespaces_joined_before_unshare_and_mounts() {
            let mut fx = Fx::new();
            let ns = |n: &str| {
                let p = fx.dir.path().join(format!("ns-{n}"));
                fs::write(&p, "").unwrap();
                p
            };
            let (net, ipc, uts) = (ns("net"), ns("ipc"), ns("uts"));
            fx.spec.namespaces = NamespacePaths {
                net: Some(net.clone()),
                ipc: Some(ipc.clone()),
                uts: Some(uts.clone()),
                pid: None,
            };
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let at = first(&calls, "setns", |c| matches!(c, Call::Setns(..)));
            assert_eq!(
                calls[at..at + 5],
                [
                    Call::Setns(net, CloneFlags::CLONE_NEWNET),
                    Call::Setns(ipc, CloneFlags::CLONE_NEWIPC),
                    Call::Setns(uts, CloneFlags::CLONE_NEWUTS),
                    // Only the mount namespace is new: the pod's are shared.
                    Call::Unshare(CloneFlags::CLONE_NEWNS),
                    Call::Mount {
                        source: None,
                        target: "/".into(),
                        fstype: None,
                        flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                        data: None,
                    },
                ]
            );
            assert!(!calls[..at].iter().any(is_mount), "a mount before setns");

            // Nothing to join: new ipc and uts namespaces, never a new network namespace.
            let fx = Fx::new();
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            assert!(!calls.iter().any(|c| matches!(c, Call::Setns(..))));
            assert!(calls.contains(&Call::Unshare(
                CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS
            )));
        }

        #[test]
        fn pid_namespace_joined_when_shared_else_new() {
            let fx = Fx::new();
            let sys = RecordingSyscall::new();
            enter_pid_namespace(&sys, &fx.spec).unwrap();
            assert_eq!(sys.calls(), [Call::Unshare(CloneFlags::CLONE_NEWPID)]);

            let pidns = fx.dir.path().join("ns-pid");
            fs::write(&pidns, "").unwrap();
            let mut spec = fx.spec.clone();
            spec.namespaces.pid = Some(pidns.clone());
            let sys = RecordingSyscall::new();
            enter_pid_namespace(&sys, &spec).unwrap();
            assert_eq!(sys.calls(), [Call::Setns(pidns, CloneFlags::CLONE_NEWPID)]);

            // A missing namespace file fails before any call.
            spec.namespaces.pid = Some(fx.dir.path().join("gone"));
            let sys = RecordingSyscall::new();
            let err = enter_pid_namespace(&sys, &spec).unwrap_err();
            assert!(matches!(err, CreateError::OpenNamespace(..)), "{err}");
            assert!(sys.calls().is_empty());
        }

        #[test]
        fn rootfs_and_standard_mounts_then_pivot_root() {
            let fx = Fx::new();
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            let m = fx.mounts(&calls);
            let want = |src: &str, target: &str, fstype: &str, flags: MsFlags| {
                (
                    src.to_string(),
                    target.to_string(),
                    fstype.to_string(),
                    flags,
                )
            };
            assert_eq!(m[1], want("overlay", "ROOTFS", "overlay", MsFlags::empty()));
            let data = calls.iter().find_map(|c| match c {
                Call::Mount {
                    fstype: Some(t),
                    data,
                    ..
                } if t == "overlay" => data.clone(),
                _ => None,
            });
            let d = fx.dir.path().display();
            // Highest layer first in lowerdir.
            assert_eq!(
                data.unwrap(),
                format!("lowerdir={d}/lower1:{d}/lower0,upperdir={d}/upper,workdir={d}/work")
            );
            assert_eq!(m[2], want("proc", "ROOTFS/proc", "proc", nse));
            assert_eq!(
                m[3],
                want("sysfs", "ROOTFS/sys", "sysfs", nse | MsFlags::MS_RDONLY)
            );
            assert_eq!(
                m[4],
                want(
                    "tmpfs",
                    "ROOTFS/dev",
                    "tmpfs",
                    MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME
                )
            );
            let targets: Vec<&str> = m[5..8].iter().map(|x| x.1.as_str()).collect();
            assert_eq!(
                targets,
                ["ROOTFS/dev/pts", "ROOTFS/dev/shm", "ROOTFS/dev/mqueue"]
            );
            let nodes: Vec<String> = calls
                .iter()
                .filter_map(|c| match c {
                    Call::Mknod(dir, name) => Some(format!("{}/{name}", fx.show(dir))),
                    _ => None,
                })
                .collect();
            assert_eq!(
                nodes,
                ["null", "zero", "full", "random", "urandom", "tty"]
                    .map(|n| format!("ROOTFS/dev/{n}"))
            );
            // Everything of the rootfs is mounted before the pivot, which is
            // chdir(rootfs) + pivot_root(".", ".") + detach + chdir("/").
            let pivot = first(&calls, "pivot_root", |c| matches!(c, Call::PivotRoot(..)));
            assert_eq!(
                calls[pivot - 1..pivot + 3],
                [
                    Call::Chdir(fx.rootfs.clone()),
                    Call::PivotRoot(".".into(), ".".into()),
                    Call::Umount(".".into(), MntFlags::MNT_DETACH),
                    Call::Chdir("/".into()),
                ]
            );
            let below: Vec<_> = m.iter().filter(|x| x.1.starts_with("ROOTFS")).collect();
            assert_eq!(below.len(), 7, "{m:#?}");
            let last_rootfs_mount = last(
                &calls,
                "rootfs mount",
                |c| matches!(c, Call::Mount { target, .. } if target.starts_with(&fx.rootfs)),
            );
            assert!(last_rootfs_mount < pivot);
        }

        #[test]
        fn masked_and_readonly_paths_after_pivot_root() {
            let fx = Fx::new();
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let pivot = first(&calls, "pivot_root", |c| matches!(c, Call::PivotRoot(..)));
            let after = fx.mounts(&calls[pivot..]);
            let want = |src: &str, target: &str, fstype: &str, flags: MsFlags| {
                (
                    src.to_string(),
                    target.to_string(),
                    fstype.to_string(),
                    flags,
                )
            };
            // Only what exists in the container is masked: a file gets /dev/null, a
            // directory an empty read-only tmpfs; /proc/sys is bound on itself read-only.
            assert_eq!(
                after,
                [
                    want("tmpfs", "/proc/acpi", "tmpfs", MsFlags::MS_RDONLY),
                    want("/dev/null", "/proc/kcore", "", MsFlags::MS_BIND),
                    want(
                        "/proc/sys",
                        "/proc/sys",
                        "",
                        MsFlags::MS_BIND | MsFlags::MS_REC
                    ),
                    want("", "/proc/sys", "", bind_ro_remount() | MsFlags::MS_REC),
                ]
            );

            // Privileged: nothing masked, /sys read-write, no seccomp, no bounding drops.
            let mut fx = Fx::new();
            fx.spec.privileged = true;
            fx.spec.seccomp = SeccompProfile::RuntimeDefault;
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let pivot = first(&calls, "pivot_root", |c| matches!(c, Call::PivotRoot(..)));
            assert!(fx.mounts(&calls[pivot..]).is_empty());
            assert!(fx
                .mounts(&calls)
                .iter()
                .any(|m| m.2 == "sysfs" && !m.3.contains(MsFlags::MS_RDONLY)));
            assert!(!calls
                .iter()
                .any(|c| matches!(c, Call::LoadSeccomp(_) | Call::DropBounding(_))));
        }

        #[test]
        fn readonly_rootfs_remounts_root_after_the_pivot() {
            let ro_root = |calls: &[Call]| {
                calls.iter().position(|c| {
                    matches!(c, Call::Mount { source: None, target, flags, .. }
                        if target == Path::new("/") && *flags == bind_ro_remount())
                })
            };
            let fx = Fx::new();
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            assert_eq!(ro_root(&sys.calls()), None);

            let mut fx = Fx::new();
            fx.spec.readonly_rootfs = true;
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let at = ro_root(&calls).expect("read-only remount of /");
            let pivot = first(&calls, "pivot_root", |c| matches!(c, Call::PivotRoot(..)));
            assert!(at > pivot);
            // The last mount of all, before the identity changes.
            assert_eq!(last(&calls, "mount", is_mount), at);
            assert!(at < first(&calls, "setresuid", |c| matches!(c, Call::Setresuid(_))));
        }

        #[test]
        fn seccomp_after_mounts_and_rlimits_then_identity_then_exec() {
            let mut fx = Fx::new();
            fx.spec.seccomp = SeccompProfile::RuntimeDefault;
            fx.spec.process.no_new_privileges = true;
            fx.spec.process.rlimits = vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                hard: 1024,
                soft: 512,
            }];
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let seccomp = first(
                &calls,
                "seccomp",
                |c| matches!(c, Call::LoadSeccomp(n) if *n > 0),
            );
            assert!(last(&calls, "mount", is_mount) < seccomp);
            assert_eq!(
                calls[seccomp - 1],
                Call::Setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 512, 1024)
            );
            // After the filter only identity, capability, chdir, no_new_privs and exec calls
            // (all of them allowed by the default profile).
            for c in &calls[seccomp + 1..] {
                assert!(
                    matches!(
                        c,
                        Call::DropBounding(_)
                            | Call::SetKeepcaps(_)
                            | Call::Setgroups(_)
                            | Call::Setresgid(_)
                            | Call::Setresuid(_)
                            | Call::ReadCaps(_)
                            | Call::ClearCaps(_)
                            | Call::SetCaps(..)
                            | Call::Chdir(_)
                            | Call::NoNewPrivs
                            | Call::Execve(..)
                    ),
                    "{c:?} after the seccomp filter"
                );
            }
            let n = calls.len();
            assert_eq!(calls[n - 3], Call::Chdir("/".into()));
            assert_eq!(calls[n - 2], Call::NoNewPrivs);
            assert!(matches!(&calls[n - 1], Call::Execve(..)));
        }

        #[test]
        fn no_new_privs_only_when_escalation_is_not_allowed() {
            let fx = Fx::new();
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            assert!(!sys.calls().contains(&Call::NoNewPrivs));
            assert!(!sys
                .calls()
                .iter()
                .any(|c| matches!(c, Call::LoadSeccomp(_))));

            let mut fx = Fx::new();
            fx.spec.process.no_new_privileges = true;
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let nnp = first(&calls, "no_new_privs", |c| *c == Call::NoNewPrivs);
            // After the identity switch (setuid keeps working), right before exec.
            assert!(nnp > first(&calls, "setresuid", |c| matches!(c, Call::Setresuid(_))));
            assert_eq!(nnp + 2, calls.len());
        }

        #[test]
        fn hostname_set_only_when_the_spec_names_one() {
            // The pod's UTS namespace, no hostname of the container's own: left alone.
            let mut fx = Fx::new();
            let uts = fx.dir.path().join("ns-uts");
            fs::write(&uts, "").unwrap();
            fx.spec.namespaces.uts = Some(uts.clone());
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            assert!(!calls.iter().any(|c| matches!(c, Call::Sethostname(_))));
            match calls.last() {
                Some(Call::Execve(_, _, env)) => {
                    assert!(!env.iter().any(|e| e.starts_with("HOSTNAME=")), "{env:?}")
                }
                other => panic!("ended with {other:?}"),
            }

            // Its own UTS namespace with a hostname: set after the unshare, before the pivot.
            let mut fx = Fx::new();
            fx.spec.hostname = Some("web-0".into());
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let at = first(&calls, "sethostname", |c| {
                *c == Call::Sethostname("web-0".into())
            });
            let unshare = first(
                &calls,
                "unshare",
                |c| matches!(c, Call::Unshare(f) if f.contains(CloneFlags::CLONE_NEWUTS)),
            );
            assert!(unshare < at);
            assert!(at < first(&calls, "pivot_root", |c| matches!(c, Call::PivotRoot(..))));
            match calls.last() {
                Some(Call::Execve(_, _, env)) => {
                    assert!(env.contains(&"HOSTNAME=web-0".to_string()), "{env:?}")
                }
                other => panic!("ended with {other:?}"),
            }
        }

        #[test]
        fn capabilities_bounded_then_identity_then_sets() {
            let mut fx = Fx::new();
            fx.spec.process.user = User {
                spec: "app".into(),
                additional_gids: vec![4000],
            };
            fx.spec.process.cwd = Some("/home/app/work".into());
            // The shim itself lacks CAP_KILL: it cannot be kept.
            let mut held = caps::all();
            held.remove(&Capability::CAP_KILL);
            let sys = RecordingSyscall::new().permitted(held);
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let default = crate::capabilities::default_set();
            let dropped: HashSet<Capability> = calls
                .iter()
                .filter_map(|c| match c {
                    Call::DropBounding(c) => Some(*c),
                    _ => None,
                })
                .collect();
            assert_eq!(dropped, caps::all().difference(&default).copied().collect());
            let mut kept: Vec<String> = default
                .iter()
                .filter(|c| **c != Capability::CAP_KILL)
                .map(|c| c.to_string())
                .collect();
            kept.sort();
            let at = first(&calls, "keepcaps", |c| *c == Call::SetKeepcaps(true));
            assert!(
                last(&calls, "bounding drop", |c| matches!(
                    c,
                    Call::DropBounding(_)
                )) < at
            );
            assert_eq!(
                calls[at..at + 9],
                [
                    Call::SetKeepcaps(true),
                    Call::Setgroups(vec![1000, 3000, 4000]),
                    Call::Setresgid(1000),
                    Call::Setresuid(1000),
                    Call::ReadCaps("Permitted".into()),
                    Call::ClearCaps("Ambient".into()),
                    Call::SetCaps("Inheritable".into(), vec![]),
                    Call::SetCaps("Effective".into(), kept.clone()),
                    Call::SetCaps("Permitted".into(), kept),
                ]
            );
            // The missing working directory is made (as the container sees it) and handed
            // to the user; the process changes into it as that user.
            assert!(fx.rootfs.join("home/app/work").is_dir());
            let mk = first(&calls, "mkdir", |c| {
                *c == Call::CreateDirAll("/home/app/work".into())
            });
            assert_eq!(
                calls[mk + 1],
                Call::Chown("/home/app/work".into(), 1000, 1000)
            );
            assert_eq!(calls[at + 9], Call::Chdir("/home/app/work".into()));
        }

        #[test]
        fn exec_resolves_the_program_inside_the_rootfs() {
            let mut fx = Fx::new();
            fx.spec.process.env = vec!["A=1".into()];
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            assert_eq!(
                sys.calls().last(),
                Some(&Call::Execve(
                    "/bin/hako-seq-prog".into(),
                    vec!["hako-seq-prog".into(), "-x".into()],
                    vec![
                        "A=1".into(),
                        format!("PATH={DEFAULT_PATH}"),
                        "HOME=/root".into()
                    ],
                ))
            );
            // Not in the container: nothing is executed and the error names it.
            let mut fx = Fx::new();
            fx.spec.process.args = vec!["no-such-prog-in-rootfs".into()];
            let sys = RecordingSyscall::new();
            let err = fx.run(&sys);
            assert!(matches!(err, SetupError::ExecutableNotFound(_)), "{err}");
            assert!(!sys.calls().iter().any(|c| matches!(c, Call::Execve(..))));
        }

        #[test]
        fn volumes_bound_from_the_source_and_remounted() {
            let mut fx = Fx::new();
            let vol = fx.dir.path().join("vol");
            fs::create_dir_all(&vol).unwrap();
            fx.spec.mounts = vec![
                Mount {
                    destination: "/data".into(),
                    source: vol.display().to_string(),
                    kind: None,
                    options: vec!["ro".into(), "nosuid".into(), "rprivate".into()],
                },
                Mount {
                    destination: "/scratch".into(),
                    source: "tmpfs".into(),
                    kind: Some("tmpfs".into()),
                    options: vec!["size=1m".into()],
                },
            ];
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let m = fx.mounts(&calls);
            let at = m.iter().position(|x| x.1 == "ROOTFS/data").expect("/data");
            let v = vol.display().to_string();
            let s = |x: &str| x.to_string();
            assert_eq!(
                m[at..at + 4],
                [
                    (
                        v,
                        s("ROOTFS/data"),
                        s(""),
                        MsFlags::MS_BIND | MsFlags::MS_REC
                    ),
                    (
                        s(""),
                        s("ROOTFS/data"),
                        s(""),
                        bind_ro_remount() | MsFlags::MS_NOSUID
                    ),
                    (
                        s(""),
                        s("ROOTFS/data"),
                        s(""),
                        MsFlags::MS_REC | MsFlags::MS_PRIVATE
                    ),
                    (
                        s("tmpfs"),
                        s("ROOTFS/scratch"),
                        s("tmpfs"),
                        MsFlags::empty()
                    ),
                ]
            );
            assert!(calls
                .iter()
                .any(|c| matches!(c, Call::Mount { data: Some(d), .. } if d == "size=1m")));
            // Volumes come after the standard mounts.
            assert!(at > m.iter().position(|x| x.1 == "ROOTFS/dev/mqueue").unwrap());
        }

        #[test]
        fn remount_refused_when_the_destination_is_not_the_bound_source() {
            let mut fx = Fx::new();
            let vol = fx.dir.path().join("vol");
            fs::create_dir_all(&vol).unwrap();
            fx.spec.mounts = vec![Mount {
                destination: "/data".into(),
                source: vol.display().to_string(),
                kind: None,
                options: vec!["ro".into()],
            }];
            let sys = RecordingSyscall::new().binds_ineffective();
            let err = fx.run(&sys);
            assert!(
                matches!(&err, SetupError::DestinationChanged(p) if p == "/data"),
                "{err}"
            );
            // The bind was made, its read-only remount was not, and nothing followed.
            let calls = sys.calls();
            assert_eq!(fx.mounts(&calls).last().unwrap().1, "ROOTFS/data");
            assert!(
                matches!(calls.last(), Some(Call::Mount { flags, .. }) if *flags == MsFlags::MS_BIND | MsFlags::MS_REC)
            );
        }

        #[test]
        fn refused_sysfs_and_device_nodes_fall_back_to_host_binds() {
            let fx = Fx::new();
            let sys = RecordingSyscall::new()
                .fail_when(
                    |c| matches!(c, Call::Mount { fstype: Some(t), .. } if t == "sysfs"),
                    Errno::EPERM,
                )
                .fail_when(|c| matches!(c, Call::Mknod(..)), Errno::EPERM);
            assert!(reached_exec(&fx.run(&sys)));
            let calls = sys.calls();
            let m = fx.mounts(&calls);
            let s = |x: &str| x.to_string();
            let at = m.iter().position(|x| x.2 == "sysfs").unwrap();
            assert_eq!(
                m[at + 1..at + 3],
                [
                    (
                        s("/sys"),
                        s("ROOTFS/sys"),
                        s(""),
                        MsFlags::MS_BIND | MsFlags::MS_REC
                    ),
                    (
                        s(""),
                        s("ROOTFS/sys"),
                        s(""),
                        bind_ro_remount() | MsFlags::MS_REC
                    ),
                ]
            );
            let nodes: Vec<_> = m
                .iter()
                .filter(|x| x.1.starts_with("ROOTFS/dev/") && x.3 == MsFlags::MS_BIND)
                .map(|x| (x.0.as_str(), x.1.as_str()))
                .collect();
            assert_eq!(
                nodes,
                [
                    ("/dev/null", "ROOTFS/dev/null"),
                    ("/dev/zero", "ROOTFS/dev/zero"),
                    ("/dev/full", "ROOTFS/dev/full"),
                    ("/dev/random", "ROOTFS/dev/random"),
                    ("/dev/urandom", "ROOTFS/dev/urandom"),
                    ("/dev/tty", "ROOTFS/dev/tty"),
                ]
            );
            assert!(!calls.iter().any(|c| matches!(c, Call::Chmod(..))));
        }

        #[test]
        fn exec_hook_joins_then_confines_and_keeps_the_errno() {
            let dir = tempfile::tempdir().unwrap();
            let ns: Vec<(OwnedFd, CloneFlags)> = [
                ("ipc", CloneFlags::CLONE_NEWIPC),
                ("uts", CloneFlags::CLONE_NEWUTS),
                ("net", CloneFlags::CLONE_NEWNET),
                ("mnt", CloneFlags::CLONE_NEWNS),
            ]
            .iter()
            .map(|(n, f)| {
                let p = dir.path().join(n);
                fs::write(&p, "").unwrap();
                (OwnedFd::from(File::open(p).unwrap()), *f)
            })
            .collect();
            let caps = crate::capabilities::default_set();
            let setup = ExecSetup {
                tty: false,
                cgroup_procs: Vec::new(),
                namespaces: ns,
                cwd: "/srv".into(),
                seccomp: Some(crate::seccomp::build(&caps).unwrap()),
                identity: users::Identity {
                    uid: 1000,
                    gid: 1000,
                    groups: vec![1000],
                    home: "/home/app".into(),
                },
                caps,
                no_new_privs: true,
            };
            let sys = RecordingSyscall::new();
            exec_setup(&sys, &setup).unwrap();
            let calls = sys.calls();
            let joined: Vec<CloneFlags> = calls[..4]
                .iter()
                .map(|c| match c {
                    Call::Setns(p, f) => {
                        assert!(p.starts_with(dir.path()), "{p:?}");
                        *f
                    }
                    other => panic!("{other:?} before the namespaces"),
                })
                .collect();
            assert_eq!(
                joined,
                [
                    CloneFlags::CLONE_NEWIPC,
                    CloneFlags::CLONE_NEWUTS,
                    CloneFlags::CLONE_NEWNET,
                    CloneFlags::CLONE_NEWNS
                ]
            );
            // Inside the mount namespace first, then the filter, then the identity.
            assert_eq!(calls[4], Call::Chdir("/srv".into()));
            assert!(matches!(calls[5], Call::LoadSeccomp(n) if n > 0));
            let uid = first(&calls, "setresuid", |c| *c == Call::Setresuid(1000));
            assert!(uid > 5);
            assert_eq!(calls.last(), Some(&Call::NoNewPrivs));

            // A refused setns stops the hook there, and the parent learns the errno.
            let sys = RecordingSyscall::new().fail_at(2, Errno::EPERM);
            let err = exec_setup(&sys, &setup).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM));
            assert_eq!(sys.calls().len(), 3);
        }

        #[test]
        fn a_failing_step_ends_the_sequence() {
            let make = || {
                let mut fx = Fx::new();
                let vol = fx.dir.path().join("vol");
                fs::create_dir_all(&vol).unwrap();
                let uts = fx.dir.path().join("ns-uts");
                fs::write(&uts, "").unwrap();
                fx.spec.namespaces.uts = Some(uts);
                fx.spec.mounts = vec![Mount {
                    destination: "/data".into(),
                    source: vol.display().to_string(),
                    kind: None,
                    options: vec!["ro".into()],
                }];
                fx.spec.hostname = Some("h".into());
                fx.spec.readonly_rootfs = true;
                fx.spec.seccomp = SeccompProfile::RuntimeDefault;
                fx.spec.process.no_new_privileges = true;
                fx.spec.process.cwd = Some("/new".into());
                fx.spec.process.rlimits = vec![Rlimit {
                    kind: "RLIMIT_NOFILE".into(),
                    hard: 64,
                    soft: 64,
                }];
                fx.cgroup_procs = vec![PathBuf::from("/cg/cgroup.procs")];
                fx.oom = Some(1000);
                fx
            };
            let fx = make();
            let sys = RecordingSyscall::new();
            assert!(reached_exec(&fx.run(&sys)));
            let total = sys.calls().len();
            assert!(total > 70, "{total} calls");
            // Failures the sequence works around or ignores: a sysfs the netns owner
            // refuses, device nodes mknod refuses, their chmod, the new cwd's chown.
            let tolerated = |c: &Call| match c {
                Call::Mount {
                    fstype: Some(t), ..
                } => t == "sysfs",
                Call::Mknod(..) | Call::Chmod(..) | Call::Chown(..) => true,
                _ => false,
            };
            let mut stopped = 0;
            for n in 0..total {
                let fx = make();
                let sys = RecordingSyscall::new().fail_at(n, Errno::EIO);
                let err = fx.run(&sys);
                let calls = sys.calls();
                if tolerated(&calls[n]) {
                    assert!(reached_exec(&err), "step {n} {:?}: {err}", calls[n]);
                    continue;
                }
                stopped += 1;
                assert_eq!(calls.len(), n + 1, "went on after step {n} {:?}", calls[n]);
                assert!(!reached_exec(&err));
                assert!(err.to_string().contains("EIO"), "step {n}: {err}");
            }
            assert!(stopped > 50, "{stopped} of {total}");
        }
    }
}
