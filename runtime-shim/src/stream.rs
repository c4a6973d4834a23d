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
pub fn attach_stdin(conn: UnixStream) -> Result<File, String> {
    let mut data = serde_json::to_vec(&Request::AttachStdin).map_err(|e| e.to_string())?;
    data.push(b'\n');
    (&conn).write_all(&data).map_err(|e| e.to_string())?;
    let (line, fds) = recv_line_with_fds(&conn).map_err(|e| e.to_string())?;
    let resp: Response =
        serde_json::from_str(&line).map_err(|e| format!("bad response {line:?}: {e}"))?;
    if let Some(e) = resp.error {
        return Err(e);
    }
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(File::from(fd)),
        _ => Err("attach: unexpected descriptors from the shim".into()),
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
    pub fn start(conn: UnixStream, req: ExecRequest) -> Result<Self, String> {
        let mut data =
            serde_json::to_vec(&Request::ExecStream(req.clone())).map_err(|e| e.to_string())?;
        data.push(b'\n');
        (&conn).write_all(&data).map_err(|e| e.to_string())?;
        let (line, fds) = recv_line_with_fds(&conn).map_err(|e| e.to_string())?;
        let resp: Response =
            serde_json::from_str(&line).map_err(|e| format!("bad response {line:?}: {e}"))?;
        if let Some(e) = resp.error {
            return Err(e);
        }
        let stdio = ExecStdio::from_fds(&req, fds)
            .ok_or_else(|| "exec stream: unexpected descriptors from the shim".to_string())?;
        Ok(ExecStream { stdio, conn })
    }

    /// Takes the stdio out (to move the pieces into separate tasks).
    pub fn take_stdio(&mut self) -> ExecStdio {
        std::mem::take(&mut self.stdio)
    }

    /// Blocks until the process has exited; its exit code (128+signal when killed).
    pub fn wait(self) -> Result<i32, String> {
        let mut line = String::new();
        BufReader::new(&self.conn)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let resp: Response =
            serde_json::from_str(&line).map_err(|e| format!("bad response {line:?}: {e}"))?;
        if let Some(e) = resp.error {
            return Err(e);
        }
        resp.exec
            .map(|x| x.exit_code)
            .ok_or_else(|| "exec stream: no exit code".to_string())
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
