//! The ip_tables socket options (effectful): `IPT_SO_GET_INFO`, `IPT_SO_GET_ENTRIES`,
//! `IPT_SO_SET_REPLACE` and `IPT_SO_SET_ADD_COUNTERS` on a raw IPv4 socket, and the xtables
//! lock iptables-legacy takes around them.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::blob::Info;

const IPT_SO_SET_REPLACE: libc::c_int = 64;
const IPT_SO_SET_ADD_COUNTERS: libc::c_int = 65;
const IPT_SO_GET_INFO: libc::c_int = 64;
const IPT_SO_GET_ENTRIES: libc::c_int = 65;
/// `sizeof(struct ipt_getinfo)`.
const GETINFO: usize = 84;
/// `sizeof(struct ipt_get_entries)`.
const GET_ENTRIES: usize = 40;
/// `sizeof(struct ipt_replace)`.
pub const REPLACE: usize = 96;
/// `sizeof(struct xt_counters_info)`.
const COUNTERS_INFO: usize = 40;
/// `XT_TABLE_MAXNAMELEN`.
const TABLE_NAME: usize = 32;

/// Socket-level failures, each with the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`.
    #[error("opening the ip_tables socket: {0}")]
    Socket(std::io::Error),
    /// `IPT_SO_GET_INFO`.
    #[error("IPT_SO_GET_INFO {table}: {source}")]
    Info {
        /// Table.
        table: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `IPT_SO_GET_ENTRIES`.
    #[error("IPT_SO_GET_ENTRIES {table}: {source}")]
    Entries {
        /// Table.
        table: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `IPT_SO_SET_REPLACE` (`EAGAIN`: the table changed since it was read).
    #[error("IPT_SO_SET_REPLACE {table}: {source}")]
    Replace {
        /// Table.
        table: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `IPT_SO_SET_ADD_COUNTERS`.
    #[error("IPT_SO_SET_ADD_COUNTERS {table}: {source}")]
    Counters {
        /// Table.
        table: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A table name longer than the ABI allows.
    #[error("table name {0:?} too long")]
    Name(String),
    /// The xtables lock file could not be opened.
    #[error("opening the xtables lock {0}: {1}")]
    LockOpen(PathBuf, std::io::Error),
    /// Someone else held the xtables lock for the whole wait.
    #[error("another process held the xtables lock {0} for more than {1:?}")]
    LockBusy(PathBuf, Duration),
}

impl SysError {
    /// Whether the kernel's table changed between read and replace (`EAGAIN`).
    pub fn is_again(&self) -> bool {
        matches!(self, Self::Replace { source, .. } if source.raw_os_error() == Some(libc::EAGAIN))
    }
}

/// A raw IPv4 socket for the ip_tables socket options.
#[derive(Debug)]
pub struct Socket(OwnedFd);

fn name_buf(buf: &mut [u8], table: &str) -> Result<(), SysError> {
    if table.len() >= TABLE_NAME {
        return Err(SysError::Name(table.to_string()));
    }
    buf[..table.len()].copy_from_slice(table.as_bytes());
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Socket {
    /// Opens the socket (in the calling thread's network namespace).
    pub fn open() -> Result<Self, SysError> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(SysError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly opened descriptor owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn getsockopt(&self, opt: libc::c_int, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut len = libc::socklen_t::try_from(buf.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        // SAFETY: buf is valid for writes of len bytes and len is a valid socklen_t the
        // kernel updates; the fd is open.
        let r = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_IP,
                opt,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(usize::try_from(len).unwrap_or(0))
    }

    fn setsockopt(&self, opt: libc::c_int, buf: &[u8]) -> std::io::Result<()> {
        let len = libc::socklen_t::try_from(buf.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        // SAFETY: buf is valid for reads of len bytes; the fd is open. For
        // IPT_SO_SET_REPLACE the buffer holds a pointer to a counters buffer the caller keeps
        // alive and sized as the header says (see `replace`).
        let r = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_IP,
                opt,
                buf.as_ptr().cast(),
                len,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `IPT_SO_GET_INFO` of `table`.
    pub fn info(&self, table: &str) -> Result<Info, SysError> {
        let mut b = [0u8; GETINFO];
        name_buf(&mut b, table)?;
        self.getsockopt(IPT_SO_GET_INFO, &mut b)
            .map_err(|source| SysError::Info {
                table: table.to_string(),
                source,
            })?;
        let mut info = Info {
            valid_hooks: u32_at(&b, 32),
            num_entries: u32_at(&b, 76),
            size: u32_at(&b, 80),
            ..Info::default()
        };
        for h in 0..5 {
            info.hook_entry[h] = u32_at(&b, 36 + 4 * h);
            info.underflow[h] = u32_at(&b, 56 + 4 * h);
        }
        Ok(info)
    }

    /// `IPT_SO_GET_ENTRIES`: the `size` bytes of entries of `table`.
    pub fn entries(&self, table: &str, size: u32) -> Result<Vec<u8>, SysError> {
        let err = |source| SysError::Entries {
            table: table.to_string(),
            source,
        };
        let size_us =
            usize::try_from(size).map_err(|_| err(std::io::ErrorKind::InvalidData.into()))?;
        let mut b = vec![0u8; GET_ENTRIES + size_us];
        name_buf(&mut b, table)?;
        b[32..36].copy_from_slice(&size.to_ne_bytes());
        self.getsockopt(IPT_SO_GET_ENTRIES, &mut b).map_err(err)?;
        b.drain(..GET_ENTRIES);
        Ok(b)
    }

    /// `IPT_SO_SET_REPLACE` of `table` with `info`'s hooks; `buf` holds [`REPLACE`] bytes
    /// of room for the header, then the entries (`Table::encode_after(REPLACE)`);
    /// `old_entries` is the number of entries of the table being replaced. Returns the
    /// counters of the replaced entries, in their order.
    pub fn replace(
        &self,
        table: &str,
        info: &Info,
        buf: &mut [u8],
        old_entries: u32,
    ) -> Result<Vec<[u64; 2]>, SysError> {
        let err = |source| SysError::Replace {
            table: table.to_string(),
            source,
        };
        let n = usize::try_from(old_entries)
            .map_err(|_| err(std::io::ErrorKind::InvalidData.into()))?;
        if buf.len() < REPLACE {
            return Err(err(std::io::ErrorKind::InvalidInput.into()));
        }
        let mut counters = vec![[0u64; 2]; n.max(1)];
        let b = &mut buf[..REPLACE];
        b.fill(0);
        name_buf(b, table)?;
        b[32..36].copy_from_slice(&info.valid_hooks.to_ne_bytes());
        b[36..40].copy_from_slice(&info.num_entries.to_ne_bytes());
        b[40..44].copy_from_slice(&info.size.to_ne_bytes());
        for h in 0..5 {
            b[44 + 4 * h..48 + 4 * h].copy_from_slice(&info.hook_entry[h].to_ne_bytes());
            b[64 + 4 * h..68 + 4 * h].copy_from_slice(&info.underflow[h].to_ne_bytes());
        }
        b[84..88].copy_from_slice(&old_entries.to_ne_bytes());
        let ptr = counters.as_mut_ptr() as usize as u64;
        b[88..96].copy_from_slice(&ptr.to_ne_bytes());
        self.setsockopt(IPT_SO_SET_REPLACE, buf).map_err(err)?;
        counters.truncate(n);
        Ok(counters)
    }

    /// `IPT_SO_SET_ADD_COUNTERS`: adds `counters` to the entries of `table`, by index.
    pub fn add_counters(&self, table: &str, counters: &[[u64; 2]]) -> Result<(), SysError> {
        let err = |source| SysError::Counters {
            table: table.to_string(),
            source,
        };
        let n = u32::try_from(counters.len())
            .map_err(|_| err(std::io::ErrorKind::InvalidData.into()))?;
        let mut b = vec![0u8; COUNTERS_INFO + 16 * counters.len()];
        name_buf(&mut b, table)?;
        b[32..36].copy_from_slice(&n.to_ne_bytes());
        for (i, c) in counters.iter().enumerate() {
            let at = COUNTERS_INFO + 16 * i;
            b[at..at + 8].copy_from_slice(&c[0].to_ne_bytes());
            b[at + 8..at + 16].copy_from_slice(&c[1].to_ne_bytes());
        }
        self.setsockopt(IPT_SO_SET_ADD_COUNTERS, &b).map_err(err)
    }
}

/// The lock file iptables-legacy takes: `XTABLES_LOCKFILE`, else `/run/xtables.lock`.
pub fn default_lock_file() -> PathBuf {
    std::env::var_os("XTABLES_LOCKFILE")
        .map_or_else(|| PathBuf::from("/run/xtables.lock"), PathBuf::from)
}

/// Takes the xtables lock `path` as iptables-legacy does (`flock(LOCK_EX)` on the file,
/// created 0600), polling every 100 ms for at most `wait` (`-w 5 -W 100000`).
pub fn lock(path: &Path, wait: Duration) -> Result<nix::fcntl::Flock<std::fs::File>, SysError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| SysError::LockOpen(path.to_path_buf(), e))?;
    let deadline = Instant::now() + wait;
    loop {
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((back, errno)) => {
                if errno != nix::errno::Errno::EWOULDBLOCK && errno != nix::errno::Errno::EINTR {
                    return Err(SysError::LockOpen(
                        path.to_path_buf(),
                        std::io::Error::from(errno),
                    ));
                }
                f = back;
            }
        }
        if Instant::now() >= deadline {
            return Err(SysError::LockBusy(path.to_path_buf(), wait));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
