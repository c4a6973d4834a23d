//! The system calls of the container setup sequence, behind one trait ([`Syscall`]), so the
//! sequence in [`crate::container`] can run against a recording fake in unit tests (youki's
//! `Syscall` with `LinuxSyscall` and its test double).
//!
//! [`LinuxSyscall`] is the real implementation: one thin wrapper per call, nothing else.
//! `fake::RecordingSyscall` (tests only) records every call with its arguments in order, mounts
//! nothing, and can be told to fail a given call. Effectful.
//!
//! What goes through the trait: namespaces (setns, unshare), mounts and unmounts, device
//! nodes, pivot_root and chdir, the process's view of files after pivot_root (metadata, reads,
//! the working directory), hostname, identity and capabilities, rlimits, no_new_privs,
//! seccomp and exec. File creation inside a root the sequence holds by descriptor
//! (`saferoot`, `mkdirat`/`openat`/`symlinkat` of mount destinations) stays direct: it needs
//! no privilege and works unchanged on a test directory.
#![allow(unsafe_code)]

use caps::{CapSet, Capability};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;

/// The error of one system call. Displays as the underlying error, so messages built on it
/// read as before the seam existed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The kernel refused the call.
    #[error(transparent)]
    Errno(#[from] nix::Error),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A capability call failed.
    #[error(transparent)]
    Caps(#[from] caps::errors::CapsError),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(Box<crate::seccomp::SeccompError>),
}

impl From<crate::seccomp::SeccompError> for SysError {
    fn from(e: crate::seccomp::SeccompError) -> Self {
        SysError::Seccomp(Box::new(e))
    }
}

/// The system calls of the container setup sequence. Paths are as the calling process sees
/// them (after `pivot_root`, the container's).
pub trait Syscall {
    /// `setsid(2)`.
    fn setsid(&self) -> Result<(), SysError>;
    /// `dup2(2)` of `fd` onto `target` (stdio).
    fn dup2(&self, fd: RawFd, target: RawFd) -> Result<(), SysError>;
    /// Write `data` to an existing file (`cgroup.procs`, `/proc/self/oom_score_adj`).
    fn write_file(&self, path: &Path, data: &str) -> Result<(), SysError>;
    /// `setns(2)` into the namespace open on `fd`.
    fn setns(&self, fd: BorrowedFd<'_>, nstype: CloneFlags) -> Result<(), SysError>;
    /// `unshare(2)`.
    fn unshare(&self, flags: CloneFlags) -> Result<(), SysError>;
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError>;
    /// `umount2(2)`.
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), SysError>;
    /// `mknodat(2)` of `name` in the directory open on `dir`.
    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        kind: SFlag,
        perm: Mode,
        dev: libc::dev_t,
    ) -> Result<(), SysError>;
    /// `fchmodat(2)` of `name` in the directory open on `dir` (symlinks followed).
    fn fchmodat(&self, dir: BorrowedFd<'_>, name: &str, mode: Mode) -> Result<(), SysError>;
    /// `fstat(2)`: what a descriptor names now (the root of what is mounted on it).
    fn fstat(&self, fd: BorrowedFd<'_>) -> Result<FileStat, SysError>;
    /// `pivot_root(2)`.
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), SysError>;
    /// `chdir(2)`.
    fn chdir(&self, path: &Path) -> Result<(), SysError>;
    /// `stat(2)` (symlinks followed) of a path as this process sees it.
    fn metadata(&self, path: &Path) -> io::Result<fs::Metadata>;
    /// Read a whole file as this process sees it.
    fn read_to_string(&self, path: &Path) -> io::Result<String>;
    /// Create a directory and its parents as this process sees them.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// `chown(2)`.
    fn chown(&self, path: &Path, uid: Uid, gid: Gid) -> Result<(), SysError>;
    /// `sethostname(2)`.
    fn sethostname(&self, name: &str) -> Result<(), SysError>;
    /// Drop one capability from the bounding set (`PR_CAPBSET_DROP`).
    fn drop_bounding(&self, cap: Capability) -> Result<(), SysError>;
    /// `PR_SET_KEEPCAPS`.
    fn set_keepcaps(&self, keep: bool) -> Result<(), SysError>;
    /// `setgroups(2)`.
    fn setgroups(&self, groups: &[Gid]) -> Result<(), SysError>;
    /// `setresgid(2)` with the same id for all three.
    fn setresgid(&self, gid: Gid) -> Result<(), SysError>;
    /// `setresuid(2)` with the same id for all three.
    fn setresuid(&self, uid: Uid) -> Result<(), SysError>;
    /// Read one capability set of this thread.
    fn read_caps(&self, set: CapSet) -> Result<HashSet<Capability>, SysError>;
    /// Clear one capability set (the ambient set).
    fn clear_caps(&self, set: CapSet) -> Result<(), SysError>;
    /// Set one capability set to exactly `caps`.
    fn set_caps(&self, set: CapSet, caps: &HashSet<Capability>) -> Result<(), SysError>;
    /// `setrlimit(2)`.
    fn setrlimit(&self, resource: Resource, soft: u64, hard: u64) -> Result<(), SysError>;
    /// `PR_SET_NO_NEW_PRIVS`.
    fn set_no_new_privs(&self) -> Result<(), SysError>;
    /// Install a seccomp filter on the calling thread (sets no_new_privs first, as the kernel
    /// requires of a process without CAP_SYS_ADMIN).
    fn load_seccomp(&self, filter: &seccompiler::BpfProgram) -> Result<(), SysError>;
    /// `execve(2)`; returns only on failure.
    fn execve(&self, path: &CStr, args: &[CString], env: &[CString]) -> SysError;
}

/// The real system calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn setsid(&self) -> Result<(), SysError> {
        nix::unistd::setsid().map(drop).map_err(SysError::from)
    }

    fn dup2(&self, fd: RawFd, target: RawFd) -> Result<(), SysError> {
        nix::unistd::dup2(fd, target)
            .map(drop)
            .map_err(SysError::from)
    }

    fn write_file(&self, path: &Path, data: &str) -> Result<(), SysError> {
        fs::write(path, data).map_err(SysError::from)
    }

    fn setns(&self, fd: BorrowedFd<'_>, nstype: CloneFlags) -> Result<(), SysError> {
        nix::sched::setns(fd, nstype).map_err(SysError::from)
    }

    fn unshare(&self, flags: CloneFlags) -> Result<(), SysError> {
        nix::sched::unshare(flags).map_err(SysError::from)
    }

    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(SysError::from)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), SysError> {
        nix::mount::umount2(target, flags).map_err(SysError::from)
    }

    fn mknodat(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        kind: SFlag,
        perm: Mode,
        dev: libc::dev_t,
    ) -> Result<(), SysError> {
        nix::sys::stat::mknodat(Some(dir.as_raw_fd()), name, kind, perm, dev)
            .map_err(SysError::from)
    }

    fn fchmodat(&self, dir: BorrowedFd<'_>, name: &str, mode: Mode) -> Result<(), SysError> {
        nix::sys::stat::fchmodat(
            Some(dir.as_raw_fd()),
            name,
            mode,
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(SysError::from)
    }

    fn fstat(&self, fd: BorrowedFd<'_>) -> Result<FileStat, SysError> {
        nix::sys::stat::fstat(fd.as_raw_fd()).map_err(SysError::from)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), SysError> {
        nix::unistd::pivot_root(new_root, put_old).map_err(SysError::from)
    }

    fn chdir(&self, path: &Path) -> Result<(), SysError> {
        nix::unistd::chdir(path).map_err(SysError::from)
    }

    fn metadata(&self, path: &Path) -> io::Result<fs::Metadata> {
        fs::metadata(path)
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn chown(&self, path: &Path, uid: Uid, gid: Gid) -> Result<(), SysError> {
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(SysError::from)
    }

    fn sethostname(&self, name: &str) -> Result<(), SysError> {
        nix::unistd::sethostname(name).map_err(SysError::from)
    }

    fn drop_bounding(&self, cap: Capability) -> Result<(), SysError> {
        caps::drop(None, CapSet::Bounding, cap).map_err(SysError::from)
    }

    fn set_keepcaps(&self, keep: bool) -> Result<(), SysError> {
        nix::sys::prctl::set_keepcaps(keep).map_err(SysError::from)
    }

    fn setgroups(&self, groups: &[Gid]) -> Result<(), SysError> {
        nix::unistd::setgroups(groups).map_err(SysError::from)
    }

    fn setresgid(&self, gid: Gid) -> Result<(), SysError> {
        nix::unistd::setresgid(gid, gid, gid).map_err(SysError::from)
    }

    fn setresuid(&self, uid: Uid) -> Result<(), SysError> {
        nix::unistd::setresuid(uid, uid, uid).map_err(SysError::from)
    }

    fn read_caps(&self, set: CapSet) -> Result<HashSet<Capability>, SysError> {
        caps::read(None, set).map_err(SysError::from)
    }

    fn clear_caps(&self, set: CapSet) -> Result<(), SysError> {
        caps::clear(None, set).map_err(SysError::from)
    }

    fn set_caps(&self, set: CapSet, caps: &HashSet<Capability>) -> Result<(), SysError> {
        caps::set(None, set, caps).map_err(SysError::from)
    }

    fn setrlimit(&self, resource: Resource, soft: u64, hard: u64) -> Result<(), SysError> {
        nix::sys::resource::setrlimit(resource, soft, hard).map_err(SysError::from)
    }

    fn set_no_new_privs(&self) -> Result<(), SysError> {
        nix::sys::prctl::set_no_new_privs().map_err(SysError::from)
    }

    fn load_seccomp(&self, filter: &seccompiler::BpfProgram) -> Result<(), SysError> {
        crate::seccomp::apply(filter).map_err(SysError::from)
    }

    fn execve(&self, path: &CStr, args: &[CString], env: &[CString]) -> SysError {
        match nix::unistd::execve(path, args, env) {
            Err(e) => SysError::from(e),
            Ok(never) => match never {},
        }
    }
}

/// A recording test double of [`Syscall`].
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::path::PathBuf;

    /// One recorded call. Descriptor paths (`/proc/self/fd/N`) are recorded as what the
    /// descriptor named at the time of the call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// `setsid`.
        Setsid,
        /// `dup2` onto a stdio number.
        Dup2(RawFd),
        /// A file write.
        WriteFile(PathBuf, String),
        /// `setns` into the namespace file named.
        Setns(PathBuf, CloneFlags),
        /// `unshare`.
        Unshare(CloneFlags),
        /// `mount`.
        Mount {
            /// Source.
            source: Option<PathBuf>,
            /// Target.
            target: PathBuf,
            /// Filesystem type.
            fstype: Option<String>,
            /// Flags.
            flags: MsFlags,
            /// Data.
            data: Option<String>,
        },
        /// `umount2`.
        Umount(PathBuf, MntFlags),
        /// `mknodat` (directory, name).
        Mknod(PathBuf, String),
        /// `fchmodat` (directory, name, mode).
        Chmod(PathBuf, String, u32),
        /// `pivot_root`.
        PivotRoot(PathBuf, PathBuf),
        /// `chdir`.
        Chdir(PathBuf),
        /// Directory creation.
        CreateDirAll(PathBuf),
        /// `chown`.
        Chown(PathBuf, u32, u32),
        /// `sethostname`.
        Sethostname(String),
        /// Bounding-set drop.
        DropBounding(Capability),
        /// `PR_SET_KEEPCAPS`.
        SetKeepcaps(bool),
        /// `setgroups`.
        Setgroups(Vec<u32>),
        /// `setresgid`.
        Setresgid(u32),
        /// `setresuid`.
        Setresuid(u32),
        /// Capability set read.
        ReadCaps(String),
        /// Capability set cleared.
        ClearCaps(String),
        /// Capability set written (sorted names).
        SetCaps(String, Vec<String>),
        /// `setrlimit`.
        Setrlimit(Resource, u64, u64),
        /// `PR_SET_NO_NEW_PRIVS`.
        NoNewPrivs,
        /// Seccomp filter installed (its length in instructions).
        LoadSeccomp(usize),
        /// `execve` (path, argv, envp).
        Execve(String, Vec<String>, Vec<String>),
    }

    type Rule = Box<dyn Fn(&Call) -> bool>;

    /// Records calls; mounts nothing. After `pivot_root(".", ".")` file queries resolve
    /// below the directory that was current, as the process would see them. A bind mount is
    /// simulated for `fstat` only: a descriptor of a bind target answers with the source's
    /// status (unless [`RecordingSyscall::binds_ineffective`]), so the sequence's check that a
    /// mount's root is its source holds as after a real bind.
    pub struct RecordingSyscall {
        calls: RefCell<Vec<Call>>,
        fail_at: Cell<Option<(usize, nix::Error)>>,
        fail_when: RefCell<Vec<(Rule, nix::Error)>>,
        permitted: RefCell<HashSet<Capability>>,
        cwd: RefCell<PathBuf>,
        root: RefCell<Option<PathBuf>>,
        binds: RefCell<Vec<(PathBuf, PathBuf)>>,
        binds_effective: Cell<bool>,
    }

    impl Default for RecordingSyscall {
        fn default() -> Self {
            Self {
                calls: RefCell::default(),
                fail_at: Cell::new(None),
                fail_when: RefCell::default(),
                permitted: RefCell::new(caps::all()),
                cwd: RefCell::new(PathBuf::from("/")),
                root: RefCell::new(None),
                binds: RefCell::default(),
                binds_effective: Cell::new(true),
            }
        }
    }

    /// What a path argument names: `/proc/self/fd/N` resolved to its target.
    fn named(p: &Path) -> PathBuf {
        if p.starts_with("/proc/self/fd") {
            fs::read_link(p).unwrap_or_else(|_| p.to_path_buf())
        } else {
            p.to_path_buf()
        }
    }

    fn fd_target(fd: BorrowedFd<'_>) -> PathBuf {
        named(&crate::saferoot::fd_path(fd))
    }

    fn set_name(set: CapSet) -> String {
        format!("{set:?}")
    }

    impl RecordingSyscall {
        /// A fake whose every call succeeds and whose permitted set is every capability.
        pub fn new() -> Self {
            Self::default()
        }

        /// Fail the call with this index (0-based, in record order) with `errno`.
        pub fn fail_at(self, index: usize, errno: nix::Error) -> Self {
            self.fail_at.set(Some((index, errno)));
            self
        }

        /// Fail every call `rule` matches with `errno`.
        pub fn fail_when(self, rule: impl Fn(&Call) -> bool + 'static, errno: nix::Error) -> Self {
            self.fail_when.borrow_mut().push((Box::new(rule), errno));
            self
        }

        /// The capabilities `read_caps(Permitted)` answers.
        pub fn permitted(self, set: HashSet<Capability>) -> Self {
            *self.permitted.borrow_mut() = set;
            self
        }

        /// Bind mounts do not take effect even for `fstat` (a destination swapped after the
        /// mount).
        pub fn binds_ineffective(self) -> Self {
            self.binds_effective.set(false);
            self
        }

        /// The calls so far.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
        }

        fn record(&self, call: Call) -> Result<(), SysError> {
            let mut calls = self.calls.borrow_mut();
            let index = calls.len();
            let failed = match self.fail_at.get() {
                Some((i, e)) if i == index => Some(e),
                _ => self
                    .fail_when
                    .borrow()
                    .iter()
                    .find(|(rule, _)| rule(&call))
                    .map(|(_, e)| *e),
            };
            calls.push(call);
            match failed {
                Some(e) => Err(SysError::Errno(e)),
                None => Ok(()),
            }
        }

        /// A path as the process sees it, on the test's file system.
        fn view(&self, p: &Path) -> PathBuf {
            let abs = if p.is_absolute() {
                p.to_path_buf()
            } else {
                self.cwd.borrow().join(p)
            };
            match &*self.root.borrow() {
                Some(root) => root.join(abs.strip_prefix("/").unwrap_or(&abs)),
                None => abs,
            }
        }
    }

    impl Syscall for RecordingSyscall {
        fn setsid(&self) -> Result<(), SysError> {
            self.record(Call::Setsid)
        }

        fn dup2(&self, _fd: RawFd, target: RawFd) -> Result<(), SysError> {
            self.record(Call::Dup2(target))
        }

        fn write_file(&self, path: &Path, data: &str) -> Result<(), SysError> {
            self.record(Call::WriteFile(path.to_path_buf(), data.to_string()))
        }

        fn setns(&self, fd: BorrowedFd<'_>, nstype: CloneFlags) -> Result<(), SysError> {
            self.record(Call::Setns(fd_target(fd), nstype))
        }

        fn unshare(&self, flags: CloneFlags) -> Result<(), SysError> {
            self.record(Call::Unshare(flags))
        }

        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> Result<(), SysError> {
            let source = source.map(named);
            let target = named(target);
            self.record(Call::Mount {
                source: source.clone(),
                target: target.clone(),
                fstype: fstype.map(str::to_string),
                flags,
                data: data.map(str::to_string),
            })?;
            if flags.contains(MsFlags::MS_BIND) && !flags.contains(MsFlags::MS_REMOUNT) {
                if let Some(s) = source {
                    self.binds.borrow_mut().push((target, s));
                }
            }
            Ok(())
        }

        fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), SysError> {
            self.record(Call::Umount(named(target), flags))
        }

        fn mknodat(
            &self,
            dir: BorrowedFd<'_>,
            name: &str,
            _kind: SFlag,
            _perm: Mode,
            _dev: libc::dev_t,
        ) -> Result<(), SysError> {
            self.record(Call::Mknod(fd_target(dir), name.to_string()))
        }

        fn fchmodat(&self, dir: BorrowedFd<'_>, name: &str, mode: Mode) -> Result<(), SysError> {
            self.record(Call::Chmod(fd_target(dir), name.to_string(), mode.bits()))
        }

        fn fstat(&self, fd: BorrowedFd<'_>) -> Result<FileStat, SysError> {
            let here = fd_target(fd);
            if self.binds_effective.get() {
                let bound = self
                    .binds
                    .borrow()
                    .iter()
                    .rev()
                    .find(|(t, _)| *t == here)
                    .map(|(_, s)| s.clone());
                if let Some(src) = bound {
                    return nix::sys::stat::stat(&src).map_err(SysError::from);
                }
            }
            nix::sys::stat::fstat(fd.as_raw_fd()).map_err(SysError::from)
        }

        fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), SysError> {
            self.record(Call::PivotRoot(
                new_root.to_path_buf(),
                put_old.to_path_buf(),
            ))?;
            let new = self.view(new_root);
            *self.root.borrow_mut() = Some(new);
            *self.cwd.borrow_mut() = PathBuf::from("/");
            Ok(())
        }

        fn chdir(&self, path: &Path) -> Result<(), SysError> {
            self.record(Call::Chdir(path.to_path_buf()))?;
            let abs = if path.is_absolute() {
                path.to_path_buf()
            } else {
                self.cwd.borrow().join(path)
            };
            *self.cwd.borrow_mut() = abs;
            Ok(())
        }

        fn metadata(&self, path: &Path) -> io::Result<fs::Metadata> {
            fs::metadata(self.view(path))
        }

        fn read_to_string(&self, path: &Path) -> io::Result<String> {
            fs::read_to_string(self.view(path))
        }

        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.record(Call::CreateDirAll(path.to_path_buf()))
                .map_err(|e| io::Error::other(e.to_string()))?;
            fs::create_dir_all(self.view(path))
        }

        fn chown(&self, path: &Path, uid: Uid, gid: Gid) -> Result<(), SysError> {
            self.record(Call::Chown(path.to_path_buf(), uid.as_raw(), gid.as_raw()))
        }

        fn sethostname(&self, name: &str) -> Result<(), SysError> {
            self.record(Call::Sethostname(name.to_string()))
        }

        fn drop_bounding(&self, cap: Capability) -> Result<(), SysError> {
            self.record(Call::DropBounding(cap))
        }

        fn set_keepcaps(&self, keep: bool) -> Result<(), SysError> {
            self.record(Call::SetKeepcaps(keep))
        }

        fn setgroups(&self, groups: &[Gid]) -> Result<(), SysError> {
            self.record(Call::Setgroups(groups.iter().map(|g| g.as_raw()).collect()))
        }

        fn setresgid(&self, gid: Gid) -> Result<(), SysError> {
            self.record(Call::Setresgid(gid.as_raw()))
        }

        fn setresuid(&self, uid: Uid) -> Result<(), SysError> {
            self.record(Call::Setresuid(uid.as_raw()))
        }

        fn read_caps(&self, set: CapSet) -> Result<HashSet<Capability>, SysError> {
            self.record(Call::ReadCaps(set_name(set)))?;
            Ok(self.permitted.borrow().clone())
        }

        fn clear_caps(&self, set: CapSet) -> Result<(), SysError> {
            self.record(Call::ClearCaps(set_name(set)))
        }

        fn set_caps(&self, set: CapSet, caps: &HashSet<Capability>) -> Result<(), SysError> {
            let mut names: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
            names.sort();
            self.record(Call::SetCaps(set_name(set), names))
        }

        fn setrlimit(&self, resource: Resource, soft: u64, hard: u64) -> Result<(), SysError> {
            self.record(Call::Setrlimit(resource, soft, hard))
        }

        fn set_no_new_privs(&self) -> Result<(), SysError> {
            self.record(Call::NoNewPrivs)
        }

        fn load_seccomp(&self, filter: &seccompiler::BpfProgram) -> Result<(), SysError> {
            self.record(Call::LoadSeccomp(filter.len()))
        }

        /// Records the call and "fails" with `ECANCELED`: a sequence that reached exec
        /// returns [`crate::container::SetupError::Exec`] with that errno.
        fn execve(&self, path: &CStr, args: &[CString], env: &[CString]) -> SysError {
            let s = |c: &CStr| c.to_string_lossy().into_owned();
            let call = Call::Execve(
                s(path),
                args.iter().map(|a| s(a)).collect(),
                env.iter().map(|e| s(e)).collect(),
            );
            match self.record(call) {
                Err(e) => e,
                Ok(()) => SysError::Errno(nix::Error::ECANCELED),
            }
        }
    }
}
