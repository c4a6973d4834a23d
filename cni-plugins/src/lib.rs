//! hako CNI plugin: CNI spec 1.1 protocol (`skel`), configuration (`config`), IPAM
//! (`ipam`) or a delegated IPAM plugin (`delegate`), the commands as data (`plan`, pure)
//! and applied (`plugin`), masquerade (`masq`), MAC spoof checking (`spoofchk`), the
//! VXLAN overlay library (`overlay`), rtnetlink access (`netlink`) and result shapes
//! (`version`). The code map is in the package README.

pub mod cli;
pub mod config;
pub mod delegate;
pub mod ipam;
pub mod masq;
pub mod netlink;
pub mod overlay;
pub mod plan;
pub mod plugin;
pub mod skel;
pub mod spoofchk;
pub mod version;
