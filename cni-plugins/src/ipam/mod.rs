//! Host-local style IPAM: range arithmetic and the round-robin allocator, the allocation
//! store seam ([`IpamStore`], [`LockedStore`]) and [`MemStore`], an in-memory store for
//! tests. Pure (no files); the directory store under a file lock is [`disk`].

use std::cell::{RefCell, RefMut};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::IpNet;

use crate::config::RangeConf;

pub mod disk;

pub use disk::{DiskStore, Store};

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// A range that cannot be used (configuration code 7).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Fewer than two usable addresses.
    #[error("subnet {0} is too small")]
    TooSmall(IpNet),
    /// The gateway, start or end lies outside the subnet (or is of the other family).
    #[error("{what} {ip} is outside {subnet}")]
    Outside {
        /// `gateway`, `rangeStart` or `rangeEnd`.
        what: &'static str,
        /// The offending address.
        ip: IpAddr,
        /// The range's subnet.
        subnet: IpNet,
    },
    /// `rangeStart` comes after `rangeEnd`.
    #[error("rangeStart {start} is after rangeEnd {end}")]
    Reversed {
        /// First address.
        start: IpAddr,
        /// Last address.
        end: IpAddr,
    },
}

/// One allocation range, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The subnet (network address, host bits clear).
    pub subnet: IpNet,
    /// First allocatable address.
    pub start: IpAddr,
    /// Last allocatable address.
    pub end: IpAddr,
    /// Gateway (never allocated).
    pub gateway: IpAddr,
}

impl Range {
    /// Applies defaults (gateway = network + 1, or the host bits of the subnet when set;
    /// start = network + 1; end = broadcast − 1 for IPv4, last address for IPv6) and checks
    /// that everything lies inside the subnet.
    pub fn from_conf(c: &RangeConf) -> Result<Range, RangeError> {
        let subnet = c.subnet.trunc();
        let v4 = subnet.addr().is_ipv4();
        if (v4 && subnet.prefix_len() > 30) || (!v4 && subnet.prefix_len() > 126) {
            return Err(RangeError::TooSmall(c.subnet));
        }
        let net = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast());
        let host_bits_gw = (c.subnet.addr() != subnet.network()).then(|| c.subnet.addr());
        let gateway = c
            .gateway
            .or(host_bits_gw)
            .unwrap_or_else(|| from_u128(net + 1, v4));
        let start = c.start.unwrap_or_else(|| from_u128(net + 1, v4));
        let end = c
            .end
            .unwrap_or_else(|| from_u128(if v4 { last - 1 } else { last }, v4));
        for (what, ip) in [
            ("gateway", gateway),
            ("rangeStart", start),
            ("rangeEnd", end),
        ] {
            if !subnet.contains(&ip) || ip.is_ipv4() != v4 {
                return Err(RangeError::Outside { what, ip, subnet });
            }
        }
        if to_u128(start) > to_u128(end) {
            return Err(RangeError::Reversed { start, end });
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }

    /// True for the network, broadcast (IPv4) and gateway addresses.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        ip == self.subnet.network()
            || ip == self.gateway
            || (ip.is_ipv4() && ip == self.subnet.broadcast())
    }

    /// The gateway with the subnet's prefix length (the bridge address).
    pub fn gateway_net(&self) -> IpNet {
        IpNet::new(self.gateway, self.subnet.prefix_len()).unwrap_or(self.subnet)
    }

    /// `ip` with the subnet's prefix length.
    pub fn with_prefix(&self, ip: IpAddr) -> IpNet {
        IpNet::new(ip, self.subnet.prefix_len()).unwrap_or(self.subnet)
    }

    /// The next free address after `last` (round-robin, wrapping), skipping reserved and
    /// used addresses; `None` when the range is exhausted.
    pub fn next_free(&self, last: Option<IpAddr>, used: &HashSet<IpAddr>) -> Option<IpAddr> {
        let v4 = self.start.is_ipv4();
        let (s, e) = (to_u128(self.start), to_u128(self.end));
        // A whole IPv6 space (`::/0` from `::`) has 2^128 addresses: one more than a u128.
        let size = e.checked_sub(s)?.saturating_add(1);
        let mut cur = match last.map(to_u128) {
            Some(l) if l >= s && l < e => l + 1,
            _ => s,
        };
        // Every failed step visits a distinct used or reserved address, so a free one turns
        // up within used + 4 steps unless the range is smaller than that.
        let budget = size.min(used.len() as u128 + 4);
        for _ in 0..budget {
            let ip = from_u128(cur, v4);
            if !self.is_reserved(ip) && !used.contains(&ip) {
                return Some(ip);
            }
            cur = if cur >= e { s } else { cur + 1 };
        }
        None
    }
}

/// An IPAM store failure.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The data directory could not be created or read.
    #[error("IPAM store {0}: {1}")]
    Store(PathBuf, io::Error),
    /// The lock could not be taken.
    #[error("IPAM lock {0}: {1}")]
    Lock(PathBuf, nix::errno::Errno),
    /// No free address is left.
    #[error("no free address left in range {0} ({1} allocated)")]
    Exhausted(IpNet, usize),
}

/// Owner record of one allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// Container id.
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// Where allocations live. `lock` takes the store's exclusive lock; every read and change
/// goes through the returned handle, and the lock is released when the handle drops.
/// Callers keep the handle only while reserving or releasing (never across netlink work).
pub trait IpamStore {
    /// Takes the exclusive lock (blocking while another process holds it).
    fn lock(&self) -> Result<Box<dyn LockedStore + '_>, IpamError>;
}

/// The operations of a locked store. The required methods are the storage primitives; the
/// provided ones (`find`, `allocate`, `release_owner`) are the allocator, the same for every
/// store.
pub trait LockedStore {
    /// Every allocated address (cheap: no owner records read).
    fn used(&self) -> Result<HashSet<IpAddr>, IpamError>;
    /// Every allocation with its owner.
    fn allocations(&self) -> Result<Vec<(IpAddr, Owner)>, IpamError>;
    /// Records `ip` as held by `owner`; fails when `ip` is already recorded.
    fn reserve(&self, ip: IpAddr, owner: &Owner) -> Result<(), IpamError>;
    /// Forgets one address (a missing one is fine).
    fn release(&self, ip: IpAddr) -> Result<(), IpamError>;
    /// The address last reserved in range `idx` (`None`: none yet, or unreadable).
    fn last_reserved(&self, idx: usize) -> Option<IpAddr>;
    /// Remembers `ip` as the last reservation in range `idx` (round robin resumes after it).
    fn set_last_reserved(&self, idx: usize, ip: IpAddr) -> Result<(), IpamError>;

    /// Addresses held by `id` + `ifname`.
    fn find(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        Ok(self
            .allocations()?
            .into_iter()
            .filter(|(_, o)| o.container_id == id && o.ifname == ifname)
            .map(|(ip, _)| ip)
            .collect())
    }

    /// Allocates the next free address of `range` (index `idx`) to `id` + `ifname`:
    /// round robin after the last reservation, skipping reserved and `used` addresses;
    /// `used` gains the new address.
    fn allocate(
        &self,
        idx: usize,
        range: &Range,
        used: &mut HashSet<IpAddr>,
        id: &str,
        ifname: &str,
    ) -> Result<IpAddr, IpamError> {
        let last = self.last_reserved(idx);
        let in_range = used.iter().filter(|ip| range.subnet.contains(*ip)).count();
        let ip = range
            .next_free(last, used)
            .ok_or(IpamError::Exhausted(range.subnet, in_range))?;
        self.reserve(
            ip,
            &Owner {
                container_id: id.to_string(),
                ifname: ifname.to_string(),
            },
        )?;
        used.insert(ip);
        self.set_last_reserved(idx, ip)?;
        Ok(ip)
    }

    /// Releases everything `id` + `ifname` holds; returns what was released.
    fn release_owner(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let ips = self.find(id, ifname)?;
        for ip in &ips {
            self.release(*ip)?;
        }
        Ok(ips)
    }
}

/// What a [`MemStore`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemState {
    /// Allocations by address.
    pub allocations: BTreeMap<IpAddr, Owner>,
    /// Last reservation per range index.
    pub last: HashMap<usize, IpAddr>,
    /// When set, every change fails with this errno (a full or read-only disk).
    pub fail_writes: Option<i32>,
}

/// An in-memory store with the disk store's semantics (a second `reserve` of one address
/// fails, a missing `release` is fine). Locking twice at once is an error instead of a
/// deadlock.
#[derive(Debug, Default)]
pub struct MemStore {
    state: RefCell<MemState>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> MemState {
        self.state.borrow().clone()
    }

    /// Changes the contents directly (test setup).
    pub fn edit(&self, f: impl FnOnce(&mut MemState)) {
        f(&mut self.state.borrow_mut())
    }
}

const MEM_PATH: &str = "<memory>";

impl IpamStore for MemStore {
    fn lock(&self) -> Result<Box<dyn LockedStore + '_>, IpamError> {
        let st = self
            .state
            .try_borrow_mut()
            .map_err(|_| IpamError::Lock(PathBuf::from(MEM_PATH), nix::errno::Errno::EDEADLK))?;
        Ok(Box::new(MemLocked(RefCell::new(st))))
    }
}

struct MemLocked<'a>(RefCell<RefMut<'a, MemState>>);

impl<'a> MemLocked<'a> {
    fn write(&self) -> Result<RefMut<'_, RefMut<'a, MemState>>, IpamError> {
        let st = self.0.borrow_mut();
        match st.fail_writes {
            Some(errno) => Err(IpamError::Store(
                PathBuf::from(MEM_PATH),
                io::Error::from_raw_os_error(errno),
            )),
            None => Ok(st),
        }
    }
}

impl LockedStore for MemLocked<'_> {
    fn used(&self) -> Result<HashSet<IpAddr>, IpamError> {
        Ok(self.0.borrow().allocations.keys().copied().collect())
    }

    fn allocations(&self) -> Result<Vec<(IpAddr, Owner)>, IpamError> {
        Ok(self
            .0
            .borrow()
            .allocations
            .iter()
            .map(|(ip, o)| (*ip, o.clone()))
            .collect())
    }

    fn reserve(&self, ip: IpAddr, owner: &Owner) -> Result<(), IpamError> {
        let mut st = self.write()?;
        if st.allocations.contains_key(&ip) {
            return Err(IpamError::Store(
                PathBuf::from(MEM_PATH),
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
        st.allocations.insert(ip, owner.clone());
        Ok(())
    }

    fn release(&self, ip: IpAddr) -> Result<(), IpamError> {
        self.write()?.allocations.remove(&ip);
        Ok(())
    }

    fn last_reserved(&self, idx: usize) -> Option<IpAddr> {
        self.0.borrow().last.get(&idx).copied()
    }

    fn set_last_reserved(&self, idx: usize, ip: IpAddr) -> Result<(), IpamError> {
        self.write()?.last.insert(idx, ip);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Range {
        Range::from_conf(&RangeConf {
            subnet: s.parse().unwrap(),
            start: None,
            end: None,
            gateway: None,
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_and_reserved() {
        let r = range("10.0.0.0/29");
        assert_eq!(r.gateway, ip("10.0.0.1"));
        assert_eq!(r.start, ip("10.0.0.1"));
        assert_eq!(r.end, ip("10.0.0.6"));
        assert!(r.is_reserved(ip("10.0.0.0")));
        assert!(r.is_reserved(ip("10.0.0.7")));
        assert!(r.is_reserved(ip("10.0.0.1")));
        let r = range("10.0.0.9/29");
        assert_eq!(r.gateway, ip("10.0.0.9"), "host bits name the gateway");
        assert_eq!(r.subnet, "10.0.0.8/29".parse::<IpNet>().unwrap());
        let r6 = range("fd00::/120");
        assert_eq!(r6.gateway, ip("fd00::1"));
        assert_eq!(r6.end, ip("fd00::ff"));
    }

    #[test]
    fn round_robin_and_exhaustion() {
        let r = range("10.0.0.0/29"); // .2 .. .6 allocatable
        let mut used = HashSet::new();
        let mut last = None;
        let mut got = vec![];
        for _ in 0..5 {
            let a = r.next_free(last, &used).unwrap();
            used.insert(a);
            last = Some(a);
            got.push(a.to_string());
        }
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        assert_eq!(r.next_free(last, &used), None);
        // Release .3: round robin continues after the last one and wraps to .3.
        used.remove(&ip("10.0.0.3"));
        assert_eq!(r.next_free(last, &used), Some(ip("10.0.0.3")));
        // Release .5 too: after last=.3 the next is .5, not the lower one.
        used.remove(&ip("10.0.0.5"));
        assert_eq!(
            r.next_free(Some(ip("10.0.0.3")), &used),
            Some(ip("10.0.0.5"))
        );
    }

    #[test]
    fn large_v6_range_is_fast() {
        let r = range("fd00::/64");
        let used: HashSet<_> = (2..1000u128)
            .map(|i| from_u128((0xfd00u128 << 112) + i, false))
            .collect();
        assert_eq!(r.next_free(None, &used), Some(ip("fd00::3e8")));
    }

    #[test]
    fn bad_ranges() {
        for (s, start, end, gw) in [
            ("10.0.0.0/31", None, None, None),
            ("10.0.0.0/24", Some("10.0.1.1"), None, None),
            ("10.0.0.0/24", Some("10.0.0.9"), Some("10.0.0.5"), None),
            ("10.0.0.0/24", None, None, Some("fd00::1")),
        ] {
            let c = RangeConf {
                subnet: s.parse().unwrap(),
                start: start.map(ip),
                end: end.map(ip),
                gateway: gw.map(ip),
            };
            assert!(Range::from_conf(&c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn store_allocates_finds_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.9.0.0/29");
        let store = Store::open(dir.path()).unwrap();
        let mut used = store.used().unwrap();
        let a = store.allocate(0, &r, &mut used, "c1", "eth0").unwrap();
        let b = store.allocate(0, &r, &mut used, "c2", "eth0").unwrap();
        assert_ne!(a, b);
        assert_eq!(store.find("c1", "eth0").unwrap(), vec![a]);
        assert!(store.find("c1", "eth1").unwrap().is_empty());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.release_owner("c1", "eth0").unwrap(), vec![a]);
        assert_eq!(store.used().unwrap().len(), 1);
        // Round robin continues past b even though a is free again.
        let mut used = store.used().unwrap();
        let c = store.allocate(0, &r, &mut used, "c3", "eth0").unwrap();
        assert_eq!(c, ip("10.9.0.4"));
        for _ in 0..3 {
            store.allocate(0, &r, &mut used, "x", "eth0").unwrap();
        }
        let e = store.allocate(0, &r, &mut used, "y", "eth0").unwrap_err();
        assert!(e.to_string().contains("no free address"), "{e}");
    }

    /// The same sequence against the disk store and the in-memory one gives the same
    /// answers, so tests on `MemStore` say something about `DiskStore`.
    #[test]
    fn disk_and_memory_stores_agree() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskStore::new(dir.path().join("net"));
        let mem = MemStore::new();
        let r = range("10.9.0.0/29"); // .2 .. .6
        let stores: [&dyn IpamStore; 2] = [&disk, &mem];
        let mut answers = Vec::new();
        for store in stores {
            let s = store.lock().unwrap();
            let mut used = s.used().unwrap();
            let mut got = vec![];
            for id in ["a", "b", "c"] {
                got.push(s.allocate(0, &r, &mut used, id, "eth0").unwrap());
            }
            // A second reservation of a held address fails; the owner is unchanged.
            assert!(s
                .reserve(
                    got[0],
                    &Owner {
                        container_id: "z".into(),
                        ifname: "eth0".into()
                    }
                )
                .is_err());
            s.release(got[1]).unwrap();
            s.release(got[1]).unwrap(); // missing is fine
            let mut used = s.used().unwrap();
            got.push(s.allocate(0, &r, &mut used, "d", "eth0").unwrap());
            got.extend(s.release_owner("a", "eth0").unwrap());
            let mut all = s.allocations().unwrap();
            all.sort();
            let last = s.last_reserved(0);
            let exhausted = {
                let mut used = s.used().unwrap();
                s.allocate(0, &r, &mut used, "e", "eth0").unwrap();
                s.allocate(0, &r, &mut used, "f", "eth0").unwrap();
                s.allocate(0, &r, &mut used, "g", "eth0").unwrap();
                s.allocate(0, &r, &mut used, "h", "eth0")
                    .unwrap_err()
                    .to_string()
            };
            answers.push((got, all, last, exhausted));
        }
        assert_eq!(answers[0], answers[1]);
        let (got, all, last, exhausted) = &answers[0];
        assert_eq!(
            got,
            &["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.2"]
                .map(ip)
                .to_vec()
        );
        assert_eq!(all.len(), 2);
        assert_eq!(*last, Some(ip("10.9.0.5")));
        assert_eq!(
            exhausted,
            "no free address left in range 10.9.0.0/29 (5 allocated)"
        );
    }

    #[test]
    fn memory_store_refuses_a_second_lock_and_can_fail_writes() {
        let mem = MemStore::new();
        let held = mem.lock().unwrap();
        assert!(matches!(mem.lock(), Err(IpamError::Lock(..))));
        drop(held);
        mem.edit(|s| s.fail_writes = Some(libc::EIO));
        let s = mem.lock().unwrap();
        let mut used = HashSet::new();
        let e = s
            .allocate(0, &range("10.9.0.0/29"), &mut used, "a", "eth0")
            .unwrap_err();
        assert!(matches!(e, IpamError::Store(..)), "{e}");
        assert!(used.is_empty());
        drop(s);
        assert!(mem.snapshot().allocations.is_empty());
    }
}
