//! Streaming exec over the shim socket (effectful). The shim starts the process in the
//! container and hands its stdio to the caller as file descriptors (`SCM_RIGHTS`) with the
//! first response line, so the caller reads and writes the process directly while it runs
//! (no copying through the shim); the second response line carries the exit code once the
//! process has exited. With a terminal the caller gets the terminal's master side (resize
//! it with [`resize`]); without one it gets stdin (when asked), stdout and stderr pipes.
#![allow(unsafe_code)]

use crate::protocol::{ExecRequest, Request, Response};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::fs::File;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Client-side errors of a streamed request.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The request could not be encoded.
    #[error(transparent)]
    Encode(serde_json::Error),
    /// Sending the request or receiving the answer failed.
    #[error(transparent)]
    Io(io::Error),
    /// The shim's answer line is not a response.
    #[error("bad response {line:?}: {source}")]
    BadResponse {
        /// The line received.
        line: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The shim answered with an error (its message).
    #[error("{0}")]
    Shim(String),
    /// `attachStdin` was answered with other than one descriptor.
    #[error("attach: unexpected descriptors from the shim")]
    AttachDescriptors,
    /// `execStream` was answered with descriptors that do not match the request.
    #[error("exec stream: unexpected descriptors from the shim")]
    ExecDescriptors,
    /// The exit line carries no exit code.
    #[error("exec stream: no exit code")]
    NoExitCode,
}

/// Sends one request line on a connected shim socket and receives the answer line with its
/// descriptors; an error answer becomes [`StreamError::Shim`].
fn request(conn: &UnixStream, req: &Request) -> Result<(Response, Vec<OwnedFd>), StreamError> {
    let mut data = serde_json::to_vec(req).map_err(StreamError::Encode)?;
    data.push(b'\n');
    (&*conn).write_all(&data).map_err(StreamError::Io)?;
    let (line, fds) = recv_line_with_fds(conn).map_err(StreamError::Io)?;
    let resp = parse_response(line)?;
    Ok((resp, fds))
}

fn parse_response(line: String) -> Result<Response, StreamError> {
    let resp: Response = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(source) => return Err(StreamError::BadResponse { line, source }),
    };
    match resp.error {
        Some(e) => Err(StreamError::Shim(e)),
        None => Ok(resp),
    }
}

/// The descriptors of a running streamed exec, in the order they travel.
#[derive(Debug, Default)]
pub struct ExecStdio {
    /// Terminal master (tty execs): input, output and resize.
    pub tty: Option<File>,
    /// Write end of the process's stdin (non-tty execs that asked for stdin).
    pub stdin: Option<File>,
    /// Read end of its stdout (non-tty).
    pub stdout: Option<File>,
    /// Read end of its stderr (non-tty).
    pub stderr: Option<File>,
}

impl ExecStdio {
    /// The descriptors to send, in wire order.
    pub fn fds(&self) -> Vec<RawFd> {
        [&self.tty, &self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    /// Rebuilds the set from received descriptors for a request (wire order: tty; or stdin
    /// if asked, stdout, stderr). None when the count does not match.
    pub fn from_fds(req: &ExecRequest, fds: Vec<OwnedFd>) -> Option<Self> {
        let mut it = fds.into_iter().map(File::from);
        let s = if req.tty {
            ExecStdio {
                tty: Some(it.next()?),
                ..Default::default()
            }
        } else {
            ExecStdio {
                stdin: if req.stdin { Some(it.next()?) } else { None },
                stdout: Some(it.next()?),
                stderr: Some(it.next()?),
                tty: None,
            }
        };
        it.next().is_none().then_some(s)
    }
}

/// Sends one JSON line with descriptors attached.
pub fn send_line_with_fds(conn: &UnixStream, resp: &Response, fds: &[RawFd]) -> io::Result<()> {
    let mut data = serde_json::to_vec(resp).map_err(io::Error::other)?;
    data.push(b'\n');
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let mut off = 0;
    while off < data.len() {
        let iov = [IoSlice::new(&data[off..])];
        // The descriptors go with the first bytes only.
        let c = if off == 0 { cmsgs } else { &[] };
        let n = sendmsg::<()>(conn.as_raw_fd(), &iov, c, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
        off += n;
    }
    Ok(())
}

/// Reads one JSON line and the descriptors that came with it. Reads byte-exactly up to the
/// newline (through `recvmsg` with `MSG_PEEK` sizing) so the next line stays in the socket.
pub fn recv_line_with_fds(conn: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut peek = [0u8; 4096];
        let n = nix::sys::socket::recv(conn.as_raw_fd(), &mut peek, MsgFlags::MSG_PEEK)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = peek[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let mut buf = vec![0u8; take];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let got = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(v) = c {
                    // SAFETY: the kernel just installed these descriptors in this process;
                    // nothing else owns them.
                    fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            msg.bytes
        };
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&buf[..got]);
        if line.last() == Some(&b'\n') {
            return Ok((String::from_utf8_lossy(&line).into_owned(), fds));
        }
    }
}

/// Asks for the container's stdin (`attachStdin`) on a connected shim socket: a duplicate of
/// its write end.
pub fn attach_stdin(conn: UnixStream) -> Result<File, StreamError> {
    let (_, fds) = request(&conn, &Request::AttachStdin)?;
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(File::from(fd)),
        _ => Err(StreamError::AttachDescriptors),
    }
}

/// Sets a terminal's window size (`TIOCSWINSZ` on the master; the process gets SIGWINCH).
pub fn resize(tty: &File, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from a valid pointer; the fd is open.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A streamed exec in progress (client side): its stdio and the connection that will carry
/// the exit code.
#[derive(Debug)]
pub struct ExecStream {
    /// The process's stdio.
    pub stdio: ExecStdio,
    conn: UnixStream,
}

impl ExecStream {
    /// Sends the request on a connected shim socket and receives the descriptors.
    pub fn start(conn: UnixStream, req: ExecRequest) -> Result<Self, StreamError> {
        let (_, fds) = request(&conn, &Request::ExecStream(req.clone()))?;
        let stdio = ExecStdio::from_fds(&req, fds).ok_or(StreamError::ExecDescriptors)?;
        Ok(ExecStream { stdio, conn })
    }

    /// Takes the stdio out (to move the pieces into separate tasks).
    pub fn take_stdio(&mut self) -> ExecStdio {
        std::mem::take(&mut self.stdio)
    }

    /// Blocks until the process has exited; its exit code (128+signal when killed).
    pub fn wait_exit(self) -> Result<i32, StreamError> {
        let mut line = String::new();
        BufReader::new(&self.conn)
            .read_line(&mut line)
            .map_err(StreamError::Io)?;
        parse_response(line)?
            .exec
            .map(|x| x.exit_code)
            .ok_or(StreamError::NoExitCode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn descriptors_travel_with_the_line() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let resp = Response::default();
        send_line_with_fds(&a, &resp, &[r.as_raw_fd()]).expect("send");
        drop(r);
        send_line_with_fds(&a, &resp, &[]).expect("send 2");
        let (line, fds) = recv_line_with_fds(&b).expect("recv");
        assert_eq!(line.trim(), serde_json::to_string(&resp).expect("json"));
        assert_eq!(fds.len(), 1);
        File::from(w).write_all(b"hi").expect("write");
        let mut got = [0u8; 2];
        File::from(fds.into_iter().next().expect("fd"))
            .read_exact(&mut got)
            .expect("read");
        assert_eq!(&got, b"hi");
        // The second line is still there, on its own.
        let (line2, fds2) = recv_line_with_fds(&b).expect("recv 2");
        assert_eq!(line2, line);
        assert!(fds2.is_empty());
    }

    #[test]
    fn answers_become_typed_errors() {
        let e = parse_response(r#"{"error":"container x is not running"}"#.into()).unwrap_err();
        assert!(matches!(&e, StreamError::Shim(m) if m == "container x is not running"));
        assert_eq!(e.to_string(), "container x is not running");
        let e = parse_response("nope\n".into()).unwrap_err();
        assert!(
            matches!(&e, StreamError::BadResponse { line, .. } if line == "nope\n"),
            "{e}"
        );
        assert!(parse_response("{}".into()).is_ok());
        // An attach answered with two descriptors is refused, and both are closed.
        let (a, b) = UnixStream::pair().expect("pair");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let resp = Response::default();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut line = String::new();
                BufReader::new(&a).read_line(&mut line).expect("request");
                assert!(line.contains("attachStdin"), "{line}");
                send_line_with_fds(&a, &resp, &[r.as_raw_fd(), w.as_raw_fd()]).expect("send");
            });
            let e = attach_stdin(b).unwrap_err();
            assert!(matches!(e, StreamError::AttachDescriptors), "{e}");
        });
    }

    #[test]
    fn stdio_order() {
        let fds = || -> Vec<OwnedFd> {
            (0..3)
                .map(|_| File::open("/dev/null").expect("null").into())
                .collect()
        };
        let mut req = ExecRequest {
            stdin: true,
            ..Default::default()
        };
        let s = ExecStdio::from_fds(&req, fds()).expect("3");
        assert!(s.stdin.is_some() && s.stdout.is_some() && s.stderr.is_some());
        req.stdin = false;
        assert!(ExecStdio::from_fds(&req, fds()).is_none(), "one too many");
        req.tty = true;
        let mut one = fds();
        one.truncate(1);
        assert!(ExecStdio::from_fds(&req, one).expect("tty").tty.is_some());
    }
}
