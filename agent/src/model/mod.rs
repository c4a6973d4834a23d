//! The pure Kubernetes logic of the agent: no tokio, nix, std::fs or std::process here. Time
//! comes in as a parameter, so everything is unit-tested without root.

pub mod actions;
pub mod admit;
pub mod backoff;
pub mod dns;
pub mod env;
pub mod kubelet_config;
pub mod node_object;
pub mod observed;
pub mod probe;
pub mod qos;
pub mod quantity;
pub mod record;
pub mod status;
