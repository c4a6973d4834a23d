//! Creation of the container's first process: fork from the (single-threaded) shim into new
//! pid/mnt/uts/ipc namespaces (or the pod's), overlayfs rootfs, standard mounts, pivot_root,
//! masked paths, hostname, user, capabilities, rlimits, oom_score_adj, cgroup; then wait for
//! `start` and exec. Effectful: every syscall is a small wrapper here.
//!
//! The rootfs comes from an image and may hold hostile symlinks, and a destination may lie in
//! a volume another container is changing: every mount destination is resolved inside the
//! rootfs descriptor ([`Resolve::InRoot`], runc's semantics), missing entries are made with
//! *at calls on the parent's descriptor, and mounts go onto `/proc/self/fd/N` of the opened
//! destination, never onto a joined path.
#![allow(unsafe_code)]

use crate::saferoot::{fd_path, Resolve, Root};
use crate::spec::{ContainerSpec, Mount, Rootfs};
use crate::users;
use caps::{CapSet, Capability};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
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
    Sys(&'static str, nix::Error),
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
        })
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
    let (r, w) = unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| CreateError::Sys("pipe2", e))?;
    Ok((File::from(r), File::from(w)))
}

/// Fork the container process. The calling process must be single-threaded. `after_fork`
/// runs in the parent while the child sets itself up (e.g. moving it into its cgroup, which
/// is slow on cgroup v1); an error there kills the child.
pub fn create(
    plan: &InitPlan,
    after_fork: impl FnOnce(Pid) -> Result<(), String>,
) -> Result<Init, CreateError> {
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
    let own_pid_ns = File::open("/proc/self/ns/pid")
        .map_err(|e| CreateError::Setup(format!("open /proc/self/ns/pid: {e}")))?;
    match &plan.spec.namespaces.pid {
        Some(p) => {
            let f = File::open(p)
                .map_err(|e| CreateError::Setup(format!("open {}: {e}", p.display())))?;
            setns(&f, CloneFlags::CLONE_NEWPID).map_err(|e| CreateError::Sys("setns pid", e))?;
        }
        None => {
            unshare(CloneFlags::CLONE_NEWPID).map_err(|e| CreateError::Sys("unshare pid", e))?
        }
    }
    // SAFETY: the shim is single-threaded when it creates the container, so the child may
    // allocate and run ordinary code until exec.
    let forked = unsafe { unistd::fork() };
    if !matches!(forked, Ok(ForkResult::Child)) {
        setns(&own_pid_ns, CloneFlags::CLONE_NEWPID)
            .map_err(|e| CreateError::Sys("setns back to the shim's pid namespace", e))?;
    }
    match forked.map_err(|e| CreateError::Sys("fork", e))? {
        ForkResult::Child => {
            drop((out_r, err_r, rep_r, start_w, in_w));
            let mut rep = rep_w;
            let res = child(plan, out_w, err_w, &mut rep, start_r, in_r);
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
                return Err(CreateError::Setup(e));
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

enum Never {}

fn ctx<E: std::fmt::Display>(what: impl Fn() -> String) -> impl FnOnce(E) -> String {
    move |e| format!("{}: {e}", what())
}

fn mnt(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {} ({}): {e}",
            src.unwrap_or("none"),
            target.display(),
            fstype.unwrap_or("bind")
        )
    })
}

fn child(
    plan: &InitPlan,
    out_w: File,
    err_w: File,
    rep: &mut File,
    mut start_r: File,
    stdin: Option<File>,
) -> Result<Never, String> {
    let spec = &plan.spec;
    unistd::setsid().map_err(ctx(|| "setsid".into()))?;
    for f in &plan.cgroup_procs {
        fs::write(f, "0").map_err(ctx(|| format!("join cgroup {}", f.display())))?;
    }
    if let Some(v) = plan.oom_score_adj {
        fs::write("/proc/self/oom_score_adj", v.to_string())
            .map_err(ctx(|| format!("write oom_score_adj {v}")))?;
    }
    // stdio: /dev/null (or the attach pipe) in, pipes out.
    let null = match stdin {
        Some(r) => r,
        None => File::open("/dev/null").map_err(ctx(|| "open /dev/null".into()))?,
    };
    for (fd, target) in [
        (null.as_raw_fd(), 0),
        (out_w.as_raw_fd(), 1),
        (err_w.as_raw_fd(), 2),
    ] {
        unistd::dup2(fd, target).map_err(ctx(|| "dup2".into()))?;
    }
    drop((null, out_w, err_w));

    // Namespaces.
    let mut flags = CloneFlags::CLONE_NEWNS;
    for (path, flag, name) in [
        (&spec.namespaces.net, CloneFlags::CLONE_NEWNET, "net"),
        (&spec.namespaces.ipc, CloneFlags::CLONE_NEWIPC, "ipc"),
        (&spec.namespaces.uts, CloneFlags::CLONE_NEWUTS, "uts"),
    ] {
        match path {
            Some(p) => {
                let f = File::open(p)
                    .map_err(ctx(|| format!("open {name} namespace {}", p.display())))?;
                setns(&f, flag)
                    .map_err(ctx(|| format!("join {name} namespace {}", p.display())))?;
            }
            None if flag != CloneFlags::CLONE_NEWNET => flags |= flag,
            None => {}
        }
    }
    unshare(flags).map_err(ctx(|| "unshare mnt/uts/ipc".into()))?;
    mnt(
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
                Some("overlay"),
                root,
                Some("overlay"),
                MsFlags::empty(),
                Some(&data),
            )?;
        }
        Rootfs::None => return Err("no rootfs".into()),
    }
    // Every destination below is resolved inside the rootfs through this descriptor.
    let rootfs = Root::open(root).map_err(|e| e.to_string())?;
    standard_mounts(&rootfs, spec.privileged)?;
    for m in &spec.mounts {
        volume(&rootfs, m)?;
    }
    drop(rootfs);
    if let Some(h) = &spec.hostname {
        unistd::sethostname(h).map_err(ctx(|| format!("sethostname {h}")))?;
    }
    // pivot_root(".", ".") then detach the old root stacked under the new one.
    unistd::chdir(root).map_err(ctx(|| format!("chdir {}", root.display())))?;
    unistd::pivot_root(".", ".").map_err(ctx(|| "pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(ctx(|| "detach old root".into()))?;
    unistd::chdir("/").map_err(ctx(|| "chdir /".into()))?;

    for p in spec.effective_masked_paths() {
        mask(Path::new(&p))?;
    }
    for p in spec.effective_readonly_paths() {
        let t = Path::new(&p);
        if t.exists() {
            mnt(Some(&p), t, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
            mnt(
                None,
                t,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None,
            )?;
        }
    }

    // User (resolved inside the image) and working directory.
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let id = users::resolve(
        &spec.process.user.spec,
        &spec.process.user.additional_gids,
        &passwd,
        &group,
    )
    .map_err(|e| e.to_string())?;
    let cwd = spec.process.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).exists() {
        fs::create_dir_all(&cwd).map_err(ctx(|| format!("create cwd {cwd}")))?;
        let _ = unistd::chown(
            Path::new(&cwd),
            Some(Uid::from_raw(id.uid)),
            Some(Gid::from_raw(id.gid)),
        );
    }
    if spec.readonly_rootfs {
        mnt(
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
    let exe = find_executable(&spec.process.args[0], &path_var).ok_or_else(|| {
        format!(
            "executable {:?} not found in the container's PATH",
            spec.process.args[0]
        )
    })?;
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
    let c_exe = cstr(&exe)?;
    let c_args = spec
        .process
        .args
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;

    for r in &spec.process.rlimits {
        let res = rlimit_resource(&r.kind).ok_or_else(|| format!("unknown rlimit {}", r.kind))?;
        nix::sys::resource::setrlimit(res, r.soft, r.hard)
            .map_err(ctx(|| format!("setrlimit {}", r.kind)))?;
    }

    if let Some(f) = &plan.seccomp {
        crate::seccomp::apply(f).map_err(|e| e.to_string())?;
    }
    set_identity(&id, &plan.caps)?;
    unistd::chdir(Path::new(&cwd)).map_err(ctx(|| format!("chdir {cwd}")))?;
    if spec.process.no_new_privileges {
        nix::sys::prctl::set_no_new_privs().map_err(ctx(|| "no_new_privs".into()))?;
    }

    // Created: report, then wait for start.
    rep.write_all(b"R").map_err(ctx(|| "report ready".into()))?;
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
    let e = unistd::execve(&c_exe, &c_args, &c_env).unwrap_err();
    Err(format!("exec {exe}: {e}"))
}

/// Drop the bounding set to `set`, switch to the identity and set the capability sets.
pub fn set_identity(id: &users::Identity, set: &HashSet<Capability>) -> Result<(), String> {
    for c in caps::all() {
        if !set.contains(&c) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(ctx(|| format!("drop {c} from bounding set")))?;
        }
    }
    nix::sys::prctl::set_keepcaps(true).map_err(ctx(|| "keepcaps".into()))?;
    let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    unistd::setgroups(&groups).map_err(ctx(|| "setgroups".into()))?;
    unistd::setresgid(
        Gid::from_raw(id.gid),
        Gid::from_raw(id.gid),
        Gid::from_raw(id.gid),
    )
    .map_err(ctx(|| format!("setgid {}", id.gid)))?;
    unistd::setresuid(
        Uid::from_raw(id.uid),
        Uid::from_raw(id.uid),
        Uid::from_raw(id.uid),
    )
    .map_err(ctx(|| format!("setuid {}", id.uid)))?;
    // Only what this process holds can be kept (root here may lack CAP_SYS_RESOURCE).
    let held = caps::read(None, CapSet::Permitted).map_err(ctx(|| "read permitted".into()))?;
    let set: HashSet<Capability> = set.intersection(&held).copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(ctx(|| "clear ambient".into()))?;
    caps::set(None, CapSet::Inheritable, &HashSet::new())
        .map_err(ctx(|| "set inheritable".into()))?;
    caps::set(None, CapSet::Effective, &set).map_err(ctx(|| "set effective".into()))?;
    caps::set(None, CapSet::Permitted, &set).map_err(ctx(|| "set permitted".into()))?;
    Ok(())
}

/// Look `name` up in `path_var` (relative to the current root); names with `/` are used as is.
pub fn find_executable(name: &str, path_var: &str) -> Option<String> {
    if name.contains('/') {
        return Some(name.to_string());
    }
    path_var.split(':').filter(|d| !d.is_empty()).find_map(|d| {
        let p = format!("{}/{name}", d.trim_end_matches('/'));
        let m = fs::metadata(&p).ok()?;
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

fn same_inode(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<bool, nix::Error> {
    let (x, y) = (
        nix::sys::stat::fstat(a.as_raw_fd())?,
        nix::sys::stat::fstat(b.as_raw_fd())?,
    );
    Ok(x.st_dev == y.st_dev && x.st_ino == y.st_ino)
}

/// Resolve (and create when missing) the mount destination `path` inside `root`. A final
/// component that is a symlink is followed inside the root too (at most 40 times), so a
/// dangling `/etc/resolv.conf -> ../run/x` makes `/run/x` inside the rootfs, as runc does.
fn dest(root: &Root, path: &str, kind: DestKind) -> Result<Dest, String> {
    let mut cur = PathBuf::from(path);
    for _ in 0..40 {
        let (parent, name) = root
            .parent_of(&cur, Resolve::InRoot, Some(Mode::from_bits_truncate(0o755)))
            .map_err(ctx(|| format!("mount destination {path}")))?;
        match open_path_nofollow(parent.as_fd(), &name) {
            Ok(fd) => {
                if file_type(fd.as_fd()).map_err(ctx(|| format!("stat {path}")))? == SFlag::S_IFLNK
                {
                    let target = nix::fcntl::readlinkat(Some(parent.as_raw_fd()), name.as_os_str())
                        .map_err(ctx(|| format!("readlink {}", cur.display())))?;
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
                    Err(e) => return Err(format!("create mount destination {path}: {e}")),
                }
            }
            Err(e) => return Err(format!("open mount destination {path}: {e}")),
        }
    }
    Err(format!(
        "mount destination {path}: too many levels of symbolic links"
    ))
}

impl Dest {
    /// The root of what is now mounted on the destination: its name looked up again in the
    /// (held) parent, which crosses into the new mount.
    fn mounted(&self) -> Result<OwnedFd, String> {
        open_path_nofollow(self.parent.as_fd(), &self.name)
            .map_err(ctx(|| format!("reopen mount destination {}", self.path)))
    }

    /// Mount onto the destination's descriptor.
    fn mount(
        &self,
        src: Option<&Path>,
        what: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), String> {
        mount(src, &fd_path(self.fd.as_fd()), fstype, flags, data).map_err(|e| {
            format!(
                "mount {what} on {} ({}): {e}",
                self.path,
                fstype.unwrap_or("bind")
            )
        })
    }

    /// Change flags or propagation of what is mounted on the destination (`expect`: the
    /// inode the mount's root must be, for bind mounts).
    fn remount(&self, flags: MsFlags, expect: Option<BorrowedFd<'_>>) -> Result<(), String> {
        let top = self.mounted()?;
        if let Some(src) = expect {
            if !same_inode(top.as_fd(), src).map_err(ctx(|| format!("stat {}", self.path)))? {
                return Err(format!(
                    "mount destination {} changed while it was being mounted",
                    self.path
                ));
            }
        }
        mount(
            None::<&str>,
            &fd_path(top.as_fd()),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(|e| format!("remount {} ({flags:?}): {e}", self.path))
    }
}

/// Open a bind-mount source. Sources are paths the agent chose on the host (volume
/// directories, its own subPath bind mounts, pod files), so symlinks in them are followed,
/// as runc does for `source`; the mount is then made from the descriptor.
fn open_source(src: &str) -> Result<OwnedFd, String> {
    nix::fcntl::open(src, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map(owned)
        .map_err(ctx(|| format!("open mount source {src}")))
}

fn standard_mounts(root: &Root, privileged: bool) -> Result<(), String> {
    let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc_ = dest(root, "/proc", DestKind::Dir)?;
    proc_.mount(Some(Path::new("proc")), "proc", Some("proc"), nse, None)?;
    let sys = dest(root, "/sys", DestKind::Dir)?;
    let ro = if privileged {
        MsFlags::empty()
    } else {
        MsFlags::MS_RDONLY
    };
    if sys
        .mount(
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
        sys.mount(
            Some(&fd_path(host_sys.as_fd())),
            "/sys",
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if !privileged {
            sys.remount(
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                Some(host_sys.as_fd()),
            )?;
        }
    }
    let dev_dest = dest(root, "/dev", DestKind::Dir)?;
    dev_dest.mount(
        Some(Path::new("tmpfs")),
        "tmpfs",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    // Everything below is made in the fresh tmpfs, through its descriptor.
    let dev = Root::from_fd(dev_dest.mounted()?, PathBuf::from("/dev"));
    let devfd = dev.as_fd().as_raw_fd();
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let made = nix::sys::stat::mknodat(
            Some(devfd),
            name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        );
        if made.is_err() {
            let host = open_source(&format!("/dev/{name}"))?;
            let node = dest(&dev, name, DestKind::File)?;
            node.mount(
                Some(&fd_path(host.as_fd())),
                &format!("/dev/{name}"),
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        } else {
            let _ = nix::sys::stat::fchmodat(
                Some(devfd),
                name,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            );
        }
    }
    dest(&dev, "pts", DestKind::Dir)?.mount(
        Some(Path::new("devpts")),
        "devpts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    dest(&dev, "shm", DestKind::Dir)?.mount(
        Some(Path::new("shm")),
        "shm",
        Some("tmpfs"),
        nse,
        Some("mode=1777,size=65536k"),
    )?;
    dest(&dev, "mqueue", DestKind::Dir)?.mount(
        Some(Path::new("mqueue")),
        "mqueue",
        Some("mqueue"),
        nse,
        None,
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        unistd::symlinkat(target, Some(devfd), link)
            .map_err(ctx(|| format!("symlink /dev/{link}")))?;
    }
    Ok(())
}

fn volume(root: &Root, m: &Mount) -> Result<(), String> {
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
        let dir = file_type(src.as_fd()).map_err(ctx(|| format!("mount source {}", m.source)))?
            == SFlag::S_IFDIR;
        let target = dest(
            root,
            &m.destination,
            if dir { DestKind::Dir } else { DestKind::File },
        )?;
        target.mount(
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
            target.remount(f, Some(src.as_fd()))?;
        }
        if !prop.is_empty() {
            target.remount(prop, Some(src.as_fd()))?;
        }
    } else {
        let target = dest(root, &m.destination, DestKind::Dir)?;
        if ro {
            flags |= MsFlags::MS_RDONLY;
        }
        let d = data.join(",");
        target.mount(
            Some(Path::new(&m.source)),
            &m.source,
            Some(kind),
            flags,
            (!d.is_empty()).then_some(d.as_str()),
        )?;
        if !prop.is_empty() {
            target.remount(prop, None)?;
        }
    }
    Ok(())
}

fn mask(p: &Path) -> Result<(), String> {
    match fs::metadata(p) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => mnt(Some("tmpfs"), p, Some("tmpfs"), MsFlags::MS_RDONLY, None),
        Ok(_) => mnt(Some("/dev/null"), p, None, MsFlags::MS_BIND, None),
    }
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

/// Join the namespaces in a pre-exec hook (the forked child of the exec).
pub fn join_namespaces(fds: &[(OwnedFd, CloneFlags)]) -> io::Result<()> {
    for (fd, flag) in fds {
        setns(fd, *flag).map_err(io::Error::from)?;
    }
    Ok(())
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
}
