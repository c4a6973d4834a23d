//! hako service proxier: Services and EndpointSlices as kube-proxy-compatible iptables rules
//! (with nftables and IPVS backends to come behind the same `Backend` trait).

pub mod config;
pub mod conntrack;
pub mod iptables;
pub mod ipvs;
pub mod kube;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod proxier;

pub use crate::iptables::{FakeIptables, Iptables, RealIptables, RenderOpts};
pub use crate::nft::NftablesBackend;
pub use crate::proxier::{Backend, IptablesBackend, Proxier, ProxierOpts, SyncError, SyncStats};
