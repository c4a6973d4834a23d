//! Netlink requests of the IPVS (generic netlink), ipset (nfnetlink) and link/address
//! (rtnetlink) clients: attribute encoding and parsing (pure), and a socket that sends
//! batches of requests and collects their acknowledgements or dump replies. The socket
//! itself, its receive timeout and the header framing are [`crate::netlink`]'s.

use nix::sys::socket::{setsockopt, sockopt, SockProtocol};

use crate::netlink::{self, RecvError};

/// Message types and flags.
pub const NLMSG_ERROR: u16 = 2;
/// End of a dump.
pub const NLMSG_DONE: u16 = 3;
/// Request.
pub const NLM_F_REQUEST: u16 = 1;
/// Multi-part reply.
pub const NLM_F_MULTI: u16 = 2;
/// Ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 4;
/// Dump.
pub const NLM_F_DUMP: u16 = 0x300;
/// Replace (NEW).
pub const NLM_F_REPLACE: u16 = 0x100;
/// Exclusive create (NEW).
pub const NLM_F_EXCL: u16 = 0x200;
/// Create (NEW).
pub const NLM_F_CREATE: u16 = 0x400;
/// Nested attribute flag.
pub const NLA_F_NESTED: u16 = 0x8000;
/// Network byte order flag.
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// Socket-level failure.
    #[error("netlink {op}: {source}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: nix::Error,
    },
    /// The kernel answered a request with an error.
    #[error("{what}: {}", nix::errno::Errno::from_raw(*errno))]
    Kernel {
        /// The request.
        what: String,
        /// Positive errno.
        errno: i32,
    },
    /// A reply could not be parsed.
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    /// No answer from the kernel within the receive timeout; the socket is replaced before
    /// its next request.
    #[error("netlink: no answer from the kernel within {}s", .0.as_secs_f64())]
    Timeout(std::time::Duration),
}

impl NlError {
    /// The kernel errno, if this is a kernel error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Builds one netlink message: header, fixed family header, attributes.
#[derive(Debug, Clone)]
pub struct MsgBuilder {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn len16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

impl MsgBuilder {
    /// A message of type `ty` with `flags`; `fixed` is the family header (genlmsghdr,
    /// nfgenmsg, ifinfomsg...). The sequence number is set when sent.
    pub fn new(ty: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(fixed);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends an attribute.
    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        self.buf
            .extend_from_slice(&len16(4 + data.len()).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
        self
    }

    /// u8 attribute.
    pub fn u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.attr(ty, &[v])
    }
    /// u16 attribute, host order.
    pub fn u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }
    /// u32 attribute, host order.
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }
    /// u16 attribute, network order (type flags unchanged).
    pub fn be16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.attr(ty, &v.to_be_bytes())
    }
    /// u32 attribute, network order.
    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_be_bytes())
    }
    /// NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    /// Opens a nested attribute; close it with [`MsgBuilder::end`].
    pub fn begin(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub fn end(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = len16(self.buf.len() - start);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The message bytes with sequence number `seq`.
    pub fn finish(&self, seq: u32) -> Vec<u8> {
        let mut b = self.buf.clone();
        let len = len32(b.len());
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b
    }
}

pub use crate::netlink::Msg;

/// Splits a datagram into messages.
pub fn messages(b: &[u8]) -> Result<Vec<Msg<'_>>, NlError> {
    let s = netlink::split(b);
    match s.bad {
        Some((len, left)) => Err(NlError::Malformed(format!(
            "message length {len} in {left} bytes"
        ))),
        None => Ok(s.msgs),
    }
}

/// Iterates attributes: (type without the nested/byte-order flags, value).
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let v = &b[4..len];
        b = &b[pad4(len).min(b.len())..];
        Some((ty, v))
    })
}

/// First attribute of type `ty`.
pub fn attr(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// u16, host order.
pub fn get_u16(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}
/// u32, host order.
pub fn get_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}
/// u16, network order.
pub fn get_be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}
/// NUL-terminated string.
pub fn get_str(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// The errno of an NLMSG_ERROR payload (0 = ack). A code of i32::MIN, which no errno
/// negates to, reads as i32::MAX: still an error.
pub fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?).saturating_neg())
}

pub use crate::netlink::timeval;

/// A netlink socket of one protocol in the calling thread's network namespace.
#[derive(Debug)]
pub struct Socket {
    fd: netlink_sys::Socket,
    proto: SockProtocol,
    timeout: std::time::Duration,
    /// A receive timed out: answers may still arrive for old requests, so the next request
    /// goes through a fresh socket.
    stale: bool,
    seq: u32,
    rbuf: Vec<u8>,
}

/// Messages per datagram when sending batches.
const BATCH: usize = 200;

impl Socket {
    /// Opens and binds a socket of `proto` whose receives give up after
    /// [`crate::NETLINK_RECV_TIMEOUT`].
    pub fn open(proto: SockProtocol) -> Result<Self, NlError> {
        Self::open_with_timeout(proto, crate::NETLINK_RECV_TIMEOUT)
    }

    /// The same with another receive timeout.
    pub fn open_with_timeout(
        proto: SockProtocol,
        timeout: std::time::Duration,
    ) -> Result<Self, NlError> {
        Ok(Self {
            fd: Self::open_fd(proto, timeout)?,
            proto,
            timeout,
            stale: false,
            seq: 1,
            rbuf: vec![0; 1 << 16],
        })
    }

    fn open_fd(
        proto: SockProtocol,
        timeout: std::time::Duration,
    ) -> Result<netlink_sys::Socket, NlError> {
        let fd = netlink::open(proto as isize, timeout).map_err(|e| NlError::Sys {
            op: e.op,
            source: e.source,
        })?;
        // Room for the acknowledgements of a whole batch.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
        let _ = setsockopt(&fd, sockopt::SndBuf, &(4 << 20));
        Ok(fd)
    }

    /// Replaces the socket after a timeout (same protocol and timeout, sequence numbers go on).
    fn refresh(&mut self) -> Result<(), NlError> {
        if self.stale {
            self.fd = Self::open_fd(self.proto, self.timeout)?;
            self.stale = false;
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send_all(&self, buf: &[u8]) -> Result<(), NlError> {
        netlink::send(&self.fd, buf).map_err(|source| NlError::Sys { op: "send", source })?;
        Ok(())
    }

    fn recv_datagram(&mut self) -> Result<Vec<u8>, NlError> {
        match netlink::recv(&self.fd, &mut self.rbuf) {
            Ok(n) => Ok(self.rbuf[..n].to_vec()),
            Err(RecvError::Timeout) => {
                self.stale = true;
                Err(NlError::Timeout(self.timeout))
            }
            Err(RecvError::Sys(source)) => Err(NlError::Sys { op: "recv", source }),
        }
    }

    /// Sends requests (each gets NLM_F_ACK) in batches and waits for every ack. Every
    /// request is attempted; the first kernel error is returned with the request's name
    /// (`what(i)`), except errnos listed in `ignore`.
    pub fn batch(
        &mut self,
        reqs: &[MsgBuilder],
        ignore: &[i32],
        what: &dyn Fn(usize) -> String,
    ) -> Result<(), NlError> {
        self.refresh()?;
        let mut first_err = None;
        for (chunk_no, chunk) in reqs.chunks(BATCH).enumerate() {
            let mut buf = Vec::new();
            let mut pending = std::collections::BTreeMap::new();
            for (i, r) in chunk.iter().enumerate() {
                let seq = self.next_seq();
                let mut b = r.finish(seq);
                let flags = u16::from_ne_bytes([b[6], b[7]]) | NLM_F_ACK;
                b[6..8].copy_from_slice(&flags.to_ne_bytes());
                buf.extend_from_slice(&b);
                pending.insert(seq, chunk_no * BATCH + i);
            }
            self.send_all(&buf)?;
            while !pending.is_empty() {
                let d = self.recv_datagram()?;
                for m in messages(&d)? {
                    if m.ty != NLMSG_ERROR {
                        continue;
                    }
                    let Some(idx) = pending.remove(&m.seq) else {
                        continue;
                    };
                    let code = error_code(m.payload).unwrap_or(0);
                    if code != 0 && !ignore.contains(&code) && first_err.is_none() {
                        first_err = Some(NlError::Kernel {
                            what: what(idx),
                            errno: code,
                        });
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sends one request and returns the payloads of its reply messages (a dump when the
    /// request has NLM_F_DUMP, else one reply or an ack). Raw datagrams are passed to
    /// `tap` (for captures).
    pub fn request(
        &mut self,
        req: &MsgBuilder,
        what: &str,
        tap: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<(u16, Vec<u8>)>, NlError> {
        self.refresh()?;
        let seq = self.next_seq();
        let b = req.finish(seq);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut b = b;
        if !dump {
            let f = flags | NLM_F_ACK;
            b[6..8].copy_from_slice(&f.to_ne_bytes());
        }
        self.send_all(&b)?;
        let mut out = Vec::new();
        loop {
            let d = self.recv_datagram()?;
            tap(&d);
            let mut done = false;
            for m in messages(&d)? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        let code = error_code(m.payload).unwrap_or(0);
                        if code != 0 {
                            return Err(NlError::Kernel {
                                what: what.to_string(),
                                errno: code,
                            });
                        }
                        done = true;
                    }
                    ty => {
                        out.push((ty, m.payload.to_vec()));
                        if !dump && m.flags & NLM_F_MULTI == 0 {
                            // A single reply; the ack follows.
                        }
                    }
                }
            }
            if done {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_round_trip() {
        let mut m = MsgBuilder::new(0x20, NLM_F_REQUEST, &[4, 1, 0, 0]);
        m.begin(1).u16(1, 2).str(6, "rr").end().u32(4, 7);
        let b = m.finish(9);
        let msgs = messages(&b).expect("parse");
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].ty, 0x20);
        assert_eq!(msgs[0].seq, 9);
        let a = &msgs[0].payload[4..];
        let nested = attr(a, 1).expect("nested");
        assert_eq!(get_u16(attr(nested, 1).expect("af")), Some(2));
        assert_eq!(get_str(attr(nested, 6).expect("sched")), "rr");
        assert_eq!(get_u32(attr(a, 4).expect("u32")), Some(7));
        // Padding: "rr\0" is 3 bytes, padded to 4.
        assert_eq!(nested.len(), 8 + 8);
    }

    /// A kernel that does not answer: the receive gives up at the timeout (instead of blocking
    /// the sync forever) and the next request works on a fresh socket.
    #[test]
    fn a_missing_answer_times_out_and_the_next_request_uses_a_fresh_socket() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Socket::open_with_timeout(
                SockProtocol::NetlinkRoute,
                std::time::Duration::from_millis(200),
            )
            .expect("socket");
            // Nothing was asked, so nothing will come.
            let first = s.recv_datagram().map(|_| ());
            // RTM_GETLINK dump: answered.
            let dump = MsgBuilder::new(18, NLM_F_REQUEST | NLM_F_DUMP, &[0; 16]);
            let links = s.request(&dump, "listing links", &mut |_| {});
            let _ = tx.send((first, links.map(|l| l.len())));
        });
        let (first, links) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a receive without an answer returned");
        assert!(matches!(first, Err(NlError::Timeout(_))), "{first:?}");
        assert!(links.expect("dump after the timeout") >= 1);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut m = MsgBuilder::new(1, 0, &[]).finish(1);
        m[0] = 200;
        assert!(messages(&m).is_err());
        assert_eq!(attrs(&[9, 0, 1]).count(), 0);
        assert_eq!(attrs(&[200, 0, 1, 0, 0]).count(), 0);
    }
}
