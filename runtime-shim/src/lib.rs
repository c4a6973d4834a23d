//! hako container shim: namespaces, cgroups and OCI image rootfs for one container.
//!
//! The library is what the agent uses: [`spec`] describes a container, [`client`] creates a
//! shim process for it and talks to the shim over its unix socket, [`state`] finds shims
//! after a restart, and [`image`] pulls and stores images.

pub mod capabilities;
pub mod cgroup;
pub mod client;
pub mod container;
pub mod durable;
pub mod image;
pub mod layer;
pub mod logs;
pub mod oci;
pub mod pidfd;
pub mod protocol;
pub mod saferoot;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod state;
pub mod stream;
pub mod sys;
pub mod users;
