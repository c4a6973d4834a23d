//! The one netlink socket module of the proxier's kernel clients (IPVS generic netlink,
//! ipset and nf_tables nfnetlink, rtnetlink addresses, ctnetlink): the socket
//! (`netlink-sys`), opened, bound and given its receive timeout in one place; one receive
//! with the timeout mapped to an error; and the message header framing
//! (`netlink-packet-core`'s `NetlinkBuffer`) with the `NLMSG_ERROR` code.
//!
//! Socket setup and receive are effectful; [`split`] and [`error_code`] are pure. The
//! attribute encoders of each family stay with their clients (`ipvs::nl`, `nft::wire`,
//! `conntrack`): no crate encodes nf_tables expressions or IPVS's generic netlink family.

use std::time::Duration;

use netlink_packet_core::NetlinkBuffer;
use netlink_sys::Socket;
use nix::sys::socket::{setsockopt, sockopt};

pub use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_NETFILTER, NETLINK_ROUTE};

/// Size of a netlink message header.
pub const HEADER_LEN: usize = 16;

/// A socket-level failure: what was being done and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct SysError {
    /// What was being done (`socket`, `bind`, `SO_RCVTIMEO`, `send`, `recv`).
    pub op: &'static str,
    /// The errno.
    pub source: nix::Error,
}

/// Why a receive returned nothing.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// No datagram within the socket's `SO_RCVTIMEO`.
    #[error("no answer from the kernel")]
    Timeout,
    /// The socket failed.
    #[error("recv: {0}")]
    Sys(nix::Error),
}

fn errno(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))
}

/// `SO_RCVTIMEO`'s value for `d` (at least 1 µs: zero would mean no timeout).
pub fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    use nix::sys::time::TimeValLike;
    nix::sys::time::TimeVal::microseconds(i64::try_from(d.as_micros()).unwrap_or(i64::MAX).max(1))
}

/// Opens a netlink socket of `protocol` in the calling thread's network namespace, bound
/// to a kernel-assigned port, whose receives give up after `timeout`.
pub fn open(protocol: isize, timeout: Duration) -> Result<Socket, SysError> {
    let mut s = Socket::new(protocol).map_err(|e| SysError {
        op: "socket",
        source: errno(&e),
    })?;
    s.bind_auto().map_err(|e| SysError {
        op: "bind",
        source: errno(&e),
    })?;
    setsockopt(&s, sockopt::ReceiveTimeout, &timeval(timeout)).map_err(|source| SysError {
        op: "SO_RCVTIMEO",
        source,
    })?;
    Ok(s)
}

/// Sends one datagram.
pub fn send(s: &Socket, buf: &[u8]) -> Result<(), nix::Error> {
    s.send(buf, 0).map(|_| ()).map_err(|e| errno(&e))
}

/// Receives one datagram into `buf` (a longer one is truncated); EINTR is retried, the
/// receive timeout (EAGAIN) is [`RecvError::Timeout`].
pub fn recv(s: &Socket, buf: &mut [u8]) -> Result<usize, RecvError> {
    loop {
        let mut b: &mut [u8] = &mut *buf;
        match s.recv(&mut b, 0) {
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) => match errno(&e) {
                nix::Error::EINTR => {}
                nix::Error::EAGAIN => return Err(RecvError::Timeout),
                other => return Err(RecvError::Sys(other)),
            },
        }
    }
}

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg<'a> {
    /// Message type.
    pub ty: u16,
    /// Flags.
    pub flags: u16,
    /// Sequence number.
    pub seq: u32,
    /// Payload after the header.
    pub payload: &'a [u8],
}

/// A datagram split into messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// The messages, in order.
    pub msgs: Vec<Msg<'a>>,
    /// Set when the split stopped at a header whose length does not fit (its length field,
    /// the bytes left); trailing bytes shorter than a header are ignored.
    pub bad: Option<(u32, usize)>,
}

/// Splits a datagram into its messages (4-byte aligned, as the kernel sends them).
pub fn split(mut b: &[u8]) -> Split<'_> {
    let mut msgs = Vec::new();
    while b.len() >= HEADER_LEN {
        let nb = match NetlinkBuffer::new_checked(b) {
            Ok(nb) => nb,
            Err(_) => {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                return Split {
                    msgs,
                    bad: Some((len, b.len())),
                };
            }
        };
        let len = nb.length() as usize;
        msgs.push(Msg {
            ty: nb.message_type(),
            flags: nb.flags(),
            seq: nb.sequence_number(),
            payload: nb.payload(),
        });
        let adv = len.saturating_add(3) & !3;
        b = b.get(adv..).unwrap_or(&[]);
    }
    Split { msgs, bad: None }
}

/// The code of an `NLMSG_ERROR` payload (0: an acknowledgement; else a negated errno);
/// None when the payload is too short.
pub fn error_code(payload: &[u8]) -> Option<i32> {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = u32::try_from(HEADER_LEN + payload.len()).expect("len");
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&5u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn splits_aligned_messages_and_stops_at_a_bad_length() {
        let mut d = msg(2, 7, &[1, 2, 3]);
        d.extend(msg(3, 8, &[]));
        let s = split(&d);
        assert_eq!(s.bad, None);
        assert_eq!(
            s.msgs,
            [
                Msg {
                    ty: 2,
                    flags: 5,
                    seq: 7,
                    payload: &[1, 2, 3]
                },
                Msg {
                    ty: 3,
                    flags: 5,
                    seq: 8,
                    payload: &[]
                }
            ]
        );
        // A length past the end, and one shorter than a header.
        let mut bad = msg(2, 7, &[]);
        let mut tail = msg(3, 9, &[0; 4]);
        tail[0] = 200;
        bad.extend(&tail);
        let s = split(&bad);
        assert_eq!((s.msgs.len(), s.bad), (1, Some((200, 20))));
        let mut short = msg(3, 9, &[]);
        short[0] = 8;
        assert_eq!(split(&short).bad, Some((8, 16)));
        // Fewer bytes than a header: nothing, no error.
        assert_eq!(split(&[0; 15]).msgs, []);
        assert_eq!(split(&[0; 15]).bad, None);
    }

    #[test]
    fn error_codes() {
        assert_eq!(error_code(&(-2i32).to_ne_bytes()), Some(-2));
        assert_eq!(error_code(&[0, 0]), None);
    }

    #[test]
    fn a_receive_with_nothing_asked_times_out() {
        // A socket in this thread's namespace; nothing was sent, so nothing comes.
        let s = open(NETLINK_ROUTE, Duration::from_millis(100)).expect("socket");
        let mut buf = [0u8; 64];
        assert!(matches!(recv(&s, &mut buf), Err(RecvError::Timeout)));
    }
}
