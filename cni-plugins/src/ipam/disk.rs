//! The IPAM store on disk: one directory per network, locked with `flock`. Effectful.
//!
//! Layout (compatible in spirit with host-local): one file per allocated address, named by
//! the address, holding `<container id>\r\n<ifname>`; `last_reserved_ip.<n>` per range;
//! `lock` taken with `flock` around every read-modify-write.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::{IpamError, IpamStore, LockedStore, Owner};

/// The on-disk store rooted at a directory (created on first lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStore {
    dir: PathBuf,
}

impl DiskStore {
    /// The store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskStore { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl IpamStore for DiskStore {
    fn lock(&self) -> Result<Box<dyn LockedStore + '_>, IpamError> {
        Ok(Box::new(Store::open(&self.dir)?))
    }
}

/// The on-disk store, locked for as long as the value lives.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating) `dir` and takes its exclusive lock.
    pub fn open(dir: &Path) -> Result<Store, IpamError> {
        let err = |e| IpamError::Store(dir.to_path_buf(), e);
        fs::create_dir_all(dir).map_err(err)?;
        let lock_path = dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(err)?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| IpamError::Lock(lock_path.clone(), e))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn err(&self, e: io::Error) -> IpamError {
        IpamError::Store(self.dir.clone(), e)
    }

    fn last_path(&self, idx: usize) -> PathBuf {
        self.dir.join(format!("last_reserved_ip.{idx}"))
    }
}

impl LockedStore for Store {
    fn used(&self) -> Result<HashSet<IpAddr>, IpamError> {
        let mut out = HashSet::new();
        for e in fs::read_dir(&self.dir).map_err(|e| self.err(e))? {
            let e = e.map_err(|e| self.err(e))?;
            if let Some(ip) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    fn allocations(&self) -> Result<Vec<(IpAddr, Owner)>, IpamError> {
        let mut out = Vec::new();
        for ip in self.used()? {
            let text = match fs::read_to_string(self.dir.join(ip.to_string())) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(e)),
            };
            let mut lines = text.lines().map(str::trim);
            let container_id = lines.next().unwrap_or("").to_string();
            let ifname = lines.next().unwrap_or("").to_string();
            out.push((
                ip,
                Owner {
                    container_id,
                    ifname,
                },
            ));
        }
        Ok(out)
    }

    fn reserve(&self, ip: IpAddr, owner: &Owner) -> Result<(), IpamError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.dir.join(ip.to_string()))
            .map_err(|e| self.err(e))?;
        f.write_all(format!("{}\r\n{}", owner.container_id, owner.ifname).as_bytes())
            .map_err(|e| self.err(e))
    }

    fn release(&self, ip: IpAddr) -> Result<(), IpamError> {
        match fs::remove_file(self.dir.join(ip.to_string())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(self.err(e)),
            _ => Ok(()),
        }
    }

    fn last_reserved(&self, idx: usize) -> Option<IpAddr> {
        fs::read_to_string(self.last_path(idx))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn set_last_reserved(&self, idx: usize, ip: IpAddr) -> Result<(), IpamError> {
        fs::write(self.last_path(idx), ip.to_string()).map_err(|e| self.err(e))
    }
}
