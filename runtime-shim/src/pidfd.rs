//! Process handles that cannot outlive their process: `pidfd_open`, `pidfd_send_signal` and
//! `waitid(P_PIDFD)`, and process identity from disk as pid + start time (field 22 of
//! `/proc/<pid>/stat`). A signal sent through a [`PidFd`] reaches the process it was opened
//! for or nobody: never a later process that was given the same pid. Effectful wrappers; the
//! `/proc/<pid>/stat` parser is pure.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// pidfd errors, naming the pid.
#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    /// `pidfd_open` failed (`ESRCH`: no such process).
    #[error("pidfd_open {0}: {1}")]
    Open(i32, Errno),
    /// The process has exited (and may have been reaped): nothing was signalled.
    #[error("process {0} has exited")]
    Exited(i32),
    /// `pidfd_send_signal` failed for another reason.
    #[error("pidfd_send_signal {0} to {1}: {2}")]
    Signal(&'static str, i32, Errno),
    /// `waitid(P_PIDFD)` failed.
    #[error("waitid on the pidfd of {0}: {1}")]
    Wait(i32, Errno),
    /// `/proc/<pid>/stat` could not be read.
    #[error("read /proc/{0}/stat: {1}")]
    Stat(i32, io::Error),
    /// `/proc/<pid>/stat` did not have the expected form.
    #[error("/proc/{0}/stat: {1}")]
    Parse(i32, StatError),
}

/// Why a `/proc/<pid>/stat` line could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StatError {
    /// No `(comm)` field.
    #[error("no ( ... ) command field")]
    NoComm,
    /// Fewer than 22 fields.
    #[error("too few fields")]
    Short,
    /// Field 22 is not a number.
    #[error("start time is not a number")]
    BadStartTime,
}

/// The start time of a process (field 22 of `/proc/<pid>/stat`, clock ticks after boot)
/// from the text of that file. The command name (field 2) is in parentheses and may itself
/// hold spaces and parentheses: the fields after it are counted from its *last* `)`. Pure.
pub fn parse_start_time(stat: &str) -> Result<u64, StatError> {
    let open = stat.find('(').ok_or(StatError::NoComm)?;
    let close = stat.rfind(')').ok_or(StatError::NoComm)?;
    if close < open {
        return Err(StatError::NoComm);
    }
    // Field 3 (state) is the first after the command; field 22 is 19 further on.
    stat[close + 1..]
        .split_ascii_whitespace()
        .nth(22 - 3)
        .ok_or(StatError::Short)?
        .parse()
        .map_err(|_| StatError::BadStartTime)
}

/// The start time of process `pid` as this process's `/proc` shows it.
pub fn start_time(pid: i32) -> Result<u64, PidfdError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| PidfdError::Stat(pid, e))?;
    parse_start_time(&text).map_err(|e| PidfdError::Parse(pid, e))
}

/// `pidfd_open(2)`, flags 0.
fn sys_pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if r < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(r).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(2)` with no siginfo (as `kill` would fill it) and flags 0.
fn sys_pidfd_send_signal(fd: BorrowedFd<'_>, sig: i32) -> Result<(), Errno> {
    // SAFETY: the fd is open for the duration of the call; a null siginfo is allowed and
    // makes the kernel fill it as kill(2) does.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A pidfd: a handle on one process (not on a pid).
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: i32,
}

/// How a process ended, from `waitid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl Exit {
    /// The exit code as shells report it: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl PidFd {
    /// Open a pidfd for `pid`. Only safe against recycling when `pid` is an unreaped child
    /// of the caller, or when the identity is checked afterwards ([`PidFd::open_checked`]).
    pub fn open(pid: i32) -> Result<Self, PidfdError> {
        if pid <= 0 {
            return Err(PidfdError::Open(pid, Errno::ESRCH));
        }
        let fd = sys_pidfd_open(pid).map_err(|e| PidfdError::Open(pid, e))?;
        Ok(Self { fd, pid })
    }

    /// Open a pidfd for `pid` read from disk and check it is still the process that started
    /// at `start_time`: the check runs after the open, so the handle is pinned to the process
    /// that was checked. `Ok(None)` when that process is gone (no process, or another one on
    /// the same pid).
    pub fn open_checked(pid: i32, start_time: u64) -> Result<Option<Self>, PidfdError> {
        let fd = match Self::open(pid) {
            Ok(fd) => fd,
            Err(PidfdError::Open(_, Errno::ESRCH)) => return Ok(None),
            Err(e) => return Err(e),
        };
        match self::start_time(pid) {
            Ok(t) if t == start_time => {}
            Ok(_) => return Ok(None),
            Err(PidfdError::Stat(_, e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        // The start time was read from /proc/<pid>, which named our process only if it had
        // not been reaped by then: still alive (or a zombie) now means it had not.
        match fd.is_alive() {
            Ok(true) => Ok(Some(fd)),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The pid the handle was opened for (in the opener's pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Send `sig` to the process. [`PidfdError::Exited`] when it is gone: then nobody was
    /// signalled.
    pub fn signal(&self, sig: Signal) -> Result<(), PidfdError> {
        match sys_pidfd_send_signal(self.fd.as_fd(), sig as i32) {
            Ok(()) => Ok(()),
            Err(Errno::ESRCH) => Err(PidfdError::Exited(self.pid)),
            Err(e) => Err(PidfdError::Signal(sig.as_str(), self.pid, e)),
        }
    }

    /// Whether the process has not been reaped yet (signal 0: permission and existence).
    pub fn is_alive(&self) -> Result<bool, PidfdError> {
        match sys_pidfd_send_signal(self.fd.as_fd(), 0) {
            Ok(()) => Ok(true),
            Err(Errno::ESRCH) => Ok(false),
            Err(e) => Err(PidfdError::Signal("0", self.pid, e)),
        }
    }

    /// Block until the process (a child of the caller) has exited. With `reap` false the
    /// zombie is left in place (`WNOWAIT`): its pid stays taken until a second call with
    /// `reap` true.
    pub fn wait_exit(&self, reap: bool) -> Result<Exit, PidfdError> {
        let mut flags = WaitPidFlag::WEXITED;
        if !reap {
            flags |= WaitPidFlag::WNOWAIT;
        }
        loop {
            match nix::sys::wait::waitid(Id::PIDFd(self.fd.as_fd()), flags) {
                Ok(WaitStatus::Exited(_, c)) => return Ok(Exit::Code(c)),
                Ok(WaitStatus::Signaled(_, s, _)) => return Ok(Exit::Signal(s as i32)),
                // Only WEXITED was asked for; anything else is not an exit.
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(PidfdError::Wait(self.pid, e)),
            }
        }
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(comm: &str, start: &str) -> String {
        // Fields 3..=21 (19 of them), then start time (22), then a few more.
        let mid = "S 1 1 1 0 -1 4194560 100 0 0 0 3 4 0 0 20 0 1 0";
        format!("42 ({comm}) {mid} {start} 12345 67 18446744073709551615")
    }

    #[test]
    fn start_time_after_tricky_command_names() {
        for comm in [
            "sleep",
            "a b",
            "x) S 1 2 3",
            ")",
            "((",
            "tab\there",
            "",
            "🦀 ) (",
        ] {
            assert_eq!(
                parse_start_time(&line(comm, "987654")),
                Ok(987654),
                "comm {comm:?}"
            );
        }
    }

    #[test]
    fn bad_stat_lines_are_errors() {
        assert_eq!(parse_start_time(""), Err(StatError::NoComm));
        assert_eq!(parse_start_time("42 sleep S 1"), Err(StatError::NoComm));
        assert_eq!(parse_start_time(") 42 ("), Err(StatError::NoComm));
        assert_eq!(
            parse_start_time("42 (sleep) S 1 2 3"),
            Err(StatError::Short)
        );
        assert_eq!(
            parse_start_time(&line("sleep", "-5")),
            Err(StatError::BadStartTime)
        );
        assert_eq!(
            parse_start_time(&line("sleep", "99999999999999999999999")),
            Err(StatError::BadStartTime)
        );
    }

    #[test]
    fn real_stat_of_this_process() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me).unwrap(), t);
        let fd = PidFd::open_checked(me, t).unwrap().expect("self is alive");
        assert!(fd.is_alive().unwrap());
        assert!(PidFd::open_checked(me, t + 1).unwrap().is_none());
    }

    #[test]
    fn signal_through_a_pidfd_and_wait_without_reaping() {
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let fd = PidFd::open(pid).unwrap();
        fd.signal(Signal::SIGKILL).unwrap();
        assert_eq!(fd.wait_exit(false).unwrap(), Exit::Signal(9));
        // Not reaped yet: the zombie still holds the pid.
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert_eq!(fd.wait_exit(true).unwrap().code(), 137);
        assert!(!fd.is_alive().unwrap());
        assert!(matches!(
            fd.signal(Signal::SIGTERM),
            Err(PidfdError::Exited(p)) if p == pid
        ));
        drop(child);
    }
}
