//! The client side of a streamed exec (effectful: terminal modes, signals, threads copying
//! between this process's stdio and the container process's). With a terminal (`exec -it`):
//! the local terminal goes raw for the session and is restored after, the container's
//! terminal gets the local window size before any input is forwarded, and every SIGWINCH
//! resizes it again (kubectl's `TerminalSizeQueue`). Without one (`exec -i`): stdin, stdout
//! and stderr are piped.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::mpsc;
use std::time::Duration;

use hako_shim::stream::ExecStream;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios::{self, SetArg, Termios};

/// How long the output copiers may run on after the process exited (its children can keep
/// the terminal or pipes open; whatever they write later is not waited for).
const DRAIN: Duration = Duration::from_secs(2);

/// Errors of a streamed exec's client side.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    /// The shim did not hand over the expected descriptors.
    #[error("the shim sent no {0} descriptor")]
    Missing(&'static str),
    /// Waiting for the exit code failed.
    #[error("waiting for the exit code: {0}")]
    Wait(#[from] hako_shim::stream::StreamError),
    /// Setting the local terminal up failed.
    #[error("{0}: {1}")]
    Terminal(&'static str, nix::Error),
    /// Duplicating a descriptor failed.
    #[error("duplicating the terminal descriptor: {0}")]
    Dup(std::io::Error),
}

/// Puts a terminal in raw mode; restores the saved settings on drop.
struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> RawMode<'a> {
    fn enter(fd: BorrowedFd<'a>) -> Result<Self, TermError> {
        let saved = termios::tcgetattr(fd).map_err(|e| TermError::Terminal("tcgetattr", e))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw)
            .map_err(|e| TermError::Terminal("tcsetattr", e))?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// The window size of a terminal: (cols, rows).
#[allow(unsafe_code)]
fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through a pointer to a live, writable local;
    // the descriptor is borrowed, hence open, for the duration of the call.
    let r = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Copies `from` to `to` until EOF or an error (EIO is how a terminal master reports that
/// the last slave closed); flushes after every read.
fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    return;
                }
            }
        }
    }
}

fn spawn_copy(
    from: impl Read + Send + 'static,
    to: impl Write + Send + 'static,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        copy(from, to);
        let _ = done.send(());
    });
}

/// An unbuffered handle on this process's stdout or stderr that takes no lock (`main`
/// holds the `Stdout` lock while a subcommand runs, so copier threads must not use it).
fn raw_out(fd: BorrowedFd<'_>) -> Result<File, TermError> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(TermError::Dup)
}

/// Waits for `n` copiers to finish, at most [`DRAIN`] in all.
fn drain(done: &mpsc::Receiver<()>, n: usize) {
    let until = std::time::Instant::now() + DRAIN;
    for _ in 0..n {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if done.recv_timeout(left).is_err() {
            return;
        }
    }
}

/// `exec -it`: the command on the container's terminal; returns its exit code.
pub fn exec_tty(mut stream: ExecStream, forward_stdin: bool) -> Result<i32, TermError> {
    let master = stream
        .take_stdio()
        .tty
        .ok_or(TermError::Missing("terminal"))?;
    let stdin = std::io::stdin();
    let local = stdin.as_fd();
    // SIGWINCH is blocked before any thread starts (threads inherit the mask), so only the
    // resizer thread, which waits for it, ever takes it.
    let mut winch = SigSet::empty();
    winch.add(Signal::SIGWINCH);
    winch
        .thread_block()
        .map_err(|e| TermError::Terminal("blocking SIGWINCH", e))?;
    // The size is set before any input is forwarded: a command that reads first sees it.
    if let Some((cols, rows)) = window_size(local) {
        let _ = hako_shim::stream::resize(&master, cols, rows);
    }
    let raw = RawMode::enter(local)?;
    let resizer = master.try_clone().map_err(TermError::Dup)?;
    std::thread::spawn(move || {
        while winch.wait().is_ok() {
            let stdin = std::io::stdin();
            if let Some((cols, rows)) = window_size(stdin.as_fd()) {
                let _ = hako_shim::stream::resize(&resizer, cols, rows);
            }
        }
    });
    let (tx, rx) = mpsc::channel();
    let reader = master.try_clone().map_err(TermError::Dup)?;
    spawn_copy(reader, raw_out(std::io::stdout().as_fd())?, tx.clone());
    if forward_stdin {
        // Ends with the process (this process exits); never waited for.
        let (tx_in, _) = mpsc::channel();
        spawn_copy(std::io::stdin(), master, tx_in);
    }
    let code = stream.wait_exit();
    drain(&rx, 1);
    drop(raw);
    Ok(code?)
}

/// `exec -i` without a terminal: stdin, stdout and stderr piped; returns the exit code.
pub fn exec_pipes(mut stream: ExecStream) -> Result<i32, TermError> {
    let io = stream.take_stdio();
    let (tx, rx) = mpsc::channel();
    let out: File = io.stdout.ok_or(TermError::Missing("stdout"))?;
    let err: File = io.stderr.ok_or(TermError::Missing("stderr"))?;
    spawn_copy(out, raw_out(std::io::stdout().as_fd())?, tx.clone());
    spawn_copy(err, raw_out(std::io::stderr().as_fd())?, tx.clone());
    if let Some(input) = io.stdin {
        // Dropping the pipe's write end at stdin's EOF gives the command its EOF.
        let (tx_in, _) = mpsc::channel();
        spawn_copy(std::io::stdin(), input, tx_in);
    }
    let code = stream.wait_exit();
    drain(&rx, 2);
    Ok(code?)
}
