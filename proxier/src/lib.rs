//! hako service proxier: Services and EndpointSlices as kube-proxy-compatible iptables rules
//! (with nftables and IPVS backends to come behind the same `Backend` trait).

pub mod cleanup;
pub mod config;
pub mod conntrack;
pub mod iptables;
pub mod ipvs;
pub mod kube;
pub mod logging;
pub mod mem;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod nft;
pub mod nodeaddr;
pub mod process;
pub mod proxier;
pub mod proxy_config;
pub mod runner;
pub mod xtables;

/// How long a netlink socket of the IPVS, ipset, link, conntrack and nf_tables clients waits
/// for the kernel's next answer (`SO_RCVTIMEO`) before the request fails with a timeout error
/// (the next sync then starts from a fresh socket). The kernel answers within milliseconds;
/// this only bounds a sync that would otherwise hang forever.
pub const NETLINK_RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub use crate::iptables::{FakeIptables, Iptables, RealIptables, RenderOpts};
pub use crate::nft::NftablesBackend;
pub use crate::proxier::{Backend, IptablesBackend, Proxier, ProxierOpts, SyncError, SyncStats};
