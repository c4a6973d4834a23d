//! The RuntimeDefault profile as an allowlist, equivalent on x86_64 to the default profile of
//! Docker (moby/profiles `default.json`) and containerd (`contrib/seccomp`): anything not
//! listed fails with EPERM; some calls are allowed only to a container holding a capability,
//! some only with harmless arguments; `clone3` fails with ENOSYS without CAP_SYS_ADMIN so that
//! libc falls back to `clone`, whose flags can be checked. Not allowed to anyone: io_uring,
//! keyrings, kexec, `pivot_root`, swap, `userfaultfd`, obsolete calls. Calls only for other
//! architectures or the 32-bit ABIs are left out (those ABIs are refused as a whole). Pure.

use super::profile::{Action, Arg, Filter, Op, Profile, Syscall};
use caps::Capability;

/// Who a group of calls applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Every container.
    Always,
    /// Containers holding the capability.
    With(Capability),
    /// Containers not holding the capability.
    Without(Capability),
}

/// What the filter does for a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Allow the call.
    Allow,
    /// Fail with ENOSYS (so that libc tries an older call).
    Enosys,
}

/// A group of calls with one action, one condition on the container, and at most one
/// condition on the first argument: `(op, value, valueTwo)` as in the profile format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// System call names.
    pub names: &'static [&'static str],
    /// Who the group applies to.
    pub when: When,
    /// Its action.
    pub act: Act,
    /// Condition on argument 0.
    pub arg0: Option<(Op, u64, u64)>,
}

const fn allow(names: &'static [&'static str], when: When) -> Group {
    Group {
        names,
        when,
        act: Act::Allow,
        arg0: None,
    }
}

const fn allow_arg0(name: &'static [&'static str], op: Op, value: u64, two: u64) -> Group {
    Group {
        names: name,
        when: When::Always,
        act: Act::Allow,
        arg0: Some((op, value, two)),
    }
}

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
/// CLONE_NEWPID | CLONE_NEWNET`: the flags `clone` may not carry without CAP_SYS_ADMIN.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
const AF_ALG: u64 = 38;
const AF_NFC: u64 = 39;
const AF_VSOCK: u64 = 40;

use Capability::*;
use When::{Always, With, Without};

/// The table.
pub const GROUPS: &[Group] = &[
    allow(
        &[
            "accept",
            "accept4",
            "access",
            "adjtimex",
            "alarm",
            "bind",
            "brk",
            "cachestat",
            "capget",
            "capset",
            "chdir",
            "chmod",
            "chown",
            "clock_adjtime",
            "clock_getres",
            "clock_gettime",
            "clock_nanosleep",
            "close",
            "close_range",
            "connect",
            "copy_file_range",
            "creat",
            "dup",
            "dup2",
            "dup3",
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_ctl_old",
            "epoll_pwait",
            "epoll_pwait2",
            "epoll_wait",
            "epoll_wait_old",
            "eventfd",
            "eventfd2",
            "execve",
            "execveat",
            "exit",
            "exit_group",
            "faccessat",
            "faccessat2",
            "fadvise64",
            "fallocate",
            "fanotify_mark",
            "fchdir",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "fchown",
            "fchownat",
            "fcntl",
            "fdatasync",
            "fgetxattr",
            "flistxattr",
            "flock",
            "fork",
            "fremovexattr",
            "fsetxattr",
            "fstat",
            "fstatfs",
            "fsync",
            "ftruncate",
            "futex",
            "futex_requeue",
            "futex_wait",
            "futex_waitv",
            "futex_wake",
            "futimesat",
            "getcpu",
            "getcwd",
            "getdents",
            "getdents64",
            "getegid",
            "geteuid",
            "getgid",
            "getgroups",
            "getitimer",
            "getpeername",
            "getpgid",
            "getpgrp",
            "getpid",
            "getppid",
            "getpriority",
            "getrandom",
            "getresgid",
            "getresuid",
            "getrlimit",
            "get_robust_list",
            "getrusage",
            "getsid",
            "getsockname",
            "getsockopt",
            "get_thread_area",
            "gettid",
            "gettimeofday",
            "getuid",
            "getxattr",
            "getxattrat",
            "inotify_add_watch",
            "inotify_init",
            "inotify_init1",
            "inotify_rm_watch",
            "io_cancel",
            "ioctl",
            "io_destroy",
            "io_getevents",
            "io_pgetevents",
            "ioprio_get",
            "ioprio_set",
            "io_setup",
            "io_submit",
            "kill",
            "landlock_add_rule",
            "landlock_create_ruleset",
            "landlock_restrict_self",
            "lchown",
            "lgetxattr",
            "link",
            "linkat",
            "listen",
            "listmount",
            "listxattr",
            "listxattrat",
            "llistxattr",
            "lremovexattr",
            "lseek",
            "lsetxattr",
            "lstat",
            "madvise",
            "map_shadow_stack",
            "membarrier",
            "memfd_create",
            "memfd_secret",
            "mincore",
            "mkdir",
            "mkdirat",
            "mknod",
            "mknodat",
            "mlock",
            "mlock2",
            "mlockall",
            "mmap",
            "mprotect",
            "mq_getsetattr",
            "mq_notify",
            "mq_open",
            "mq_timedreceive",
            "mq_timedsend",
            "mq_unlink",
            "mremap",
            "mseal",
            "msgctl",
            "msgget",
            "msgrcv",
            "msgsnd",
            "msync",
            "munlock",
            "munlockall",
            "munmap",
            "name_to_handle_at",
            "nanosleep",
            "newfstatat",
            "open",
            "openat",
            "openat2",
            "pause",
            "pidfd_open",
            "pidfd_send_signal",
            "pipe",
            "pipe2",
            "pkey_alloc",
            "pkey_free",
            "pkey_mprotect",
            "poll",
            "ppoll",
            "prctl",
            "pread64",
            "preadv",
            "preadv2",
            "prlimit64",
            "process_mrelease",
            "pselect6",
            "pwrite64",
            "pwritev",
            "pwritev2",
            "read",
            "readahead",
            "readlink",
            "readlinkat",
            "readv",
            "recvfrom",
            "recvmmsg",
            "recvmsg",
            "remap_file_pages",
            "removexattr",
            "removexattrat",
            "rename",
            "renameat",
            "renameat2",
            "restart_syscall",
            "rmdir",
            "rseq",
            "rt_sigaction",
            "rt_sigpending",
            "rt_sigprocmask",
            "rt_sigqueueinfo",
            "rt_sigreturn",
            "rt_sigsuspend",
            "rt_sigtimedwait",
            "rt_tgsigqueueinfo",
            "sched_getaffinity",
            "sched_getattr",
            "sched_getparam",
            "sched_get_priority_max",
            "sched_get_priority_min",
            "sched_getscheduler",
            "sched_rr_get_interval",
            "sched_setaffinity",
            "sched_setattr",
            "sched_setparam",
            "sched_setscheduler",
            "sched_yield",
            "seccomp",
            "select",
            "semctl",
            "semget",
            "semop",
            "semtimedop",
            "sendfile",
            "sendmmsg",
            "sendmsg",
            "sendto",
            "setfsgid",
            "setfsuid",
            "setgid",
            "setgroups",
            "setitimer",
            "setpgid",
            "setpriority",
            "setregid",
            "setresgid",
            "setresuid",
            "setreuid",
            "setrlimit",
            "set_robust_list",
            "setsid",
            "setsockopt",
            "set_thread_area",
            "set_tid_address",
            "setuid",
            "setxattr",
            "setxattrat",
            "shmat",
            "shmctl",
            "shmdt",
            "shmget",
            "shutdown",
            "sigaltstack",
            "signalfd",
            "signalfd4",
            "socketpair",
            "splice",
            "stat",
            "statfs",
            "statmount",
            "statx",
            "symlink",
            "symlinkat",
            "sync",
            "sync_file_range",
            "syncfs",
            "sysinfo",
            "tee",
            "tgkill",
            "time",
            "timer_create",
            "timer_delete",
            "timer_getoverrun",
            "timer_gettime",
            "timer_settime",
            "timerfd_create",
            "timerfd_gettime",
            "timerfd_settime",
            "times",
            "tkill",
            "truncate",
            "umask",
            "uname",
            "unlink",
            "unlinkat",
            "uretprobe",
            "utime",
            "utimensat",
            "utimes",
            "vfork",
            "vmsplice",
            "wait4",
            "waitid",
            "write",
            "writev",
        ],
        Always,
    ),
    allow(&["arch_prctl", "modify_ldt"], Always),
    allow(&["process_vm_readv", "process_vm_writev", "ptrace"], Always),
    // Address families other than AF_ALG and AF_VSOCK.
    allow_arg0(&["socket"], Op::Lt, AF_ALG, 0),
    allow_arg0(&["socket"], Op::Eq, AF_NFC, 0),
    allow_arg0(&["socket"], Op::Gt, AF_VSOCK, 0),
    // PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query 0xffffffff.
    allow_arg0(&["personality"], Op::Eq, 0x0, 0),
    allow_arg0(&["personality"], Op::Eq, 0x8, 0),
    allow_arg0(&["personality"], Op::Eq, 0x2_0000, 0),
    allow_arg0(&["personality"], Op::Eq, 0x2_0008, 0),
    allow_arg0(&["personality"], Op::Eq, 0xffff_ffff, 0),
    allow(&["open_by_handle_at"], With(CAP_DAC_READ_SEARCH)),
    allow(
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "lsm_get_self_attr",
            "lsm_list_modules",
            "lsm_set_self_attr",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
        With(CAP_SYS_ADMIN),
    ),
    Group {
        names: &["clone"],
        when: Without(CAP_SYS_ADMIN),
        act: Act::Allow,
        arg0: Some((Op::MaskedEq, CLONE_NAMESPACE_FLAGS, 0)),
    },
    Group {
        names: &["clone3"],
        when: Without(CAP_SYS_ADMIN),
        act: Act::Enosys,
        arg0: None,
    },
    allow(&["reboot"], With(CAP_SYS_BOOT)),
    allow(&["chroot"], With(CAP_SYS_CHROOT)),
    allow(
        &["delete_module", "init_module", "finit_module"],
        With(CAP_SYS_MODULE),
    ),
    allow(&["acct"], With(CAP_SYS_PACCT)),
    allow(
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
        With(CAP_SYS_PTRACE),
    ),
    allow(&["iopl", "ioperm"], With(CAP_SYS_RAWIO)),
    allow(&["settimeofday", "clock_settime"], With(CAP_SYS_TIME)),
    allow(&["vhangup"], With(CAP_SYS_TTY_CONFIG)),
    allow(
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
        With(CAP_SYS_NICE),
    ),
    allow(&["syslog"], With(CAP_SYSLOG)),
    allow(&["bpf"], With(CAP_BPF)),
    allow(&["perf_event_open"], With(CAP_PERFMON)),
];

/// x86_64 calls of the table that the `libc` crate has no number for yet: they stay refused
/// until it has (a program gets EPERM and falls back, as on an older kernel).
pub const NOT_IN_LIBC: &[&str] = &[
    "cachestat",
    "futex_requeue",
    "futex_wait",
    "futex_wake",
    "getxattrat",
    "io_pgetevents",
    "listmount",
    "listxattrat",
    "lsm_get_self_attr",
    "lsm_list_modules",
    "lsm_set_self_attr",
    "map_shadow_stack",
    "removexattrat",
    "setxattrat",
    "statmount",
    "uretprobe",
];

/// The table as a profile document (the form Localhost profiles take).
pub fn profile() -> Profile {
    let caps = |c: Option<Capability>| Filter {
        caps: c.map(|c| vec![c.to_string()]).unwrap_or_default(),
        ..Filter::default()
    };
    Profile {
        default_action: Action::Errno,
        default_errno_ret: Some(libc::EPERM as u32),
        architectures: vec!["SCMP_ARCH_X86_64".into()],
        syscalls: GROUPS
            .iter()
            .map(|g| {
                let (inc, exc) = match g.when {
                    Always => (None, None),
                    With(c) => (Some(c), None),
                    Without(c) => (None, Some(c)),
                };
                let (action, errno_ret) = match g.act {
                    Act::Allow => (Action::Allow, None),
                    Act::Enosys => (Action::Errno, Some(libc::ENOSYS as u32)),
                };
                Syscall {
                    names: g.names.iter().map(|n| n.to_string()).collect(),
                    name: None,
                    action,
                    errno_ret,
                    args: g
                        .arg0
                        .map(|(op, value, value_two)| Arg {
                            index: 0,
                            value,
                            value_two,
                            op,
                        })
                        .into_iter()
                        .collect(),
                    includes: caps(inc),
                    excludes: caps(exc),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::bpf::{run, X32_SYSCALL_BIT};
    use super::super::syscalls::number;
    use super::*;
    use std::collections::HashSet;

    const ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0000 | 1;
    const ENOSYS: u32 = 0x0005_0000 | 38;

    fn set(c: &[Capability]) -> HashSet<Capability> {
        c.iter().copied().collect()
    }

    fn prog(c: &[Capability]) -> Vec<seccompiler::sock_filter> {
        let (p, _) = profile().policy(&set(c)).unwrap();
        p.compile().unwrap()
    }

    fn call(prog: &[seccompiler::sock_filter], name: &str, args: [u64; 6]) -> u32 {
        let nr = u32::try_from(number(name).unwrap()).unwrap();
        run(prog, ARCH, nr, args)
    }

    #[test]
    fn every_name_has_a_number_or_is_listed_as_missing() {
        for g in GROUPS {
            for n in g.names {
                assert!(
                    number(n).is_some() != NOT_IN_LIBC.contains(n),
                    "{n}: number {:?}",
                    number(n)
                );
            }
        }
        let (_, skipped) = profile().policy(&caps::all()).unwrap();
        assert_eq!(skipped, NOT_IN_LIBC);
    }

    #[test]
    fn no_duplicates() {
        let mut seen = HashSet::new();
        for g in GROUPS {
            for n in g.names {
                assert!(
                    seen.insert((n, format!("{:?}/{:?}", g.when, g.arg0))),
                    "{n}"
                );
            }
        }
        for bad in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "keyctl",
        ] {
            assert!(!seen.iter().any(|(n, _)| **n == bad), "{bad} listed");
        }
    }

    #[test]
    fn compiles_for_several_capability_sets() {
        for c in [
            &[][..],
            &[CAP_SYS_ADMIN],
            &[CAP_SYS_PTRACE, CAP_SYS_NICE],
            &[CAP_CHOWN, CAP_NET_BIND_SERVICE, CAP_SETUID, CAP_SETGID],
        ] {
            assert!(prog(c).len() < 4096);
        }
        assert!(prog(&caps::all().into_iter().collect::<Vec<_>>()).len() < 4096);
        let default = crate::capabilities::default_set();
        assert!(profile().policy(&default).unwrap().0.compile().is_ok());
    }

    #[test]
    fn what_a_default_container_may_do() {
        let p = prog(
            &crate::capabilities::default_set()
                .into_iter()
                .collect::<Vec<_>>(),
        );
        let z = [0u64; 6];
        for ok in [
            "read",
            "write",
            "execve",
            "fork",
            "wait4",
            "exit_group",
            "capset",
        ] {
            assert_eq!(call(&p, ok, z), ALLOW, "{ok}");
        }
        // clone as fork and as pthread_create; not with CLONE_NEWUSER or CLONE_NEWNS.
        assert_eq!(call(&p, "clone", [0x11, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "clone", [0x3d_0f00, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "clone", [0x1000_0011, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(&p, "clone", [0x2_0011, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(&p, "clone3", z), ENOSYS);
        for denied in [
            "unshare",
            "setns",
            "mount",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "keyctl",
            "add_key",
            "kexec_load",
            "pivot_root",
            "userfaultfd",
            "bpf",
            "reboot",
            "kcmp",
        ] {
            assert_eq!(call(&p, denied, z), EPERM, "{denied}");
        }
        assert_eq!(call(&p, "socket", [2, 1, 0, 0, 0, 0]), ALLOW, "AF_INET");
        assert_eq!(call(&p, "socket", [AF_VSOCK, 1, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(&p, "socket", [AF_ALG, 5, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(&p, "socket", [AF_NFC, 1, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "personality", [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
        // The x32 ABI's read (0 | X32_SYSCALL_BIT) and i386's ABI.
        assert_eq!(run(&p, ARCH, X32_SYSCALL_BIT, z), EPERM);
        assert_eq!(run(&p, ARCH, X32_SYSCALL_BIT | 56, z), EPERM);
        assert_eq!(run(&p, 0x4000_0003, 1, z), 0x8000_0000);
    }

    #[test]
    fn capabilities_allow_their_calls() {
        let admin = prog(&[CAP_SYS_ADMIN]);
        let z = [0u64; 6];
        for ok in [
            "unshare",
            "mount",
            "fsopen",
            "move_mount",
            "setns",
            "clone3",
            "bpf",
        ] {
            assert_eq!(call(&admin, ok, z), ALLOW, "{ok}");
        }
        assert_eq!(call(&admin, "clone", [0x1000_0011, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&admin, "io_uring_setup", z), EPERM);
        assert_eq!(call(&admin, "keyctl", z), EPERM);
        let ptrace = prog(&[CAP_SYS_PTRACE]);
        assert_eq!(call(&ptrace, "ptrace", z), ALLOW);
        assert_eq!(call(&ptrace, "mount", z), EPERM);
        assert_eq!(call(&prog(&[CAP_SYS_TIME]), "clock_settime", z), ALLOW);
        assert_eq!(call(&prog(&[CAP_SYS_BOOT]), "reboot", z), ALLOW);
        assert_eq!(call(&prog(&[CAP_SYS_MODULE]), "finit_module", z), ALLOW);
        assert_eq!(call(&prog(&[CAP_BPF]), "bpf", z), ALLOW);
        assert_eq!(call(&prog(&[CAP_PERFMON]), "perf_event_open", z), ALLOW);
        assert_eq!(call(&prog(&[CAP_SYSLOG]), "syslog", z), ALLOW);
        assert_eq!(call(&prog(&[CAP_SYS_NICE]), "mbind", z), ALLOW);
    }
}
