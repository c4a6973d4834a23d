//! The agent's effects on the machine: the container runtime through `hako-shim`
//! ([`runtime`]), the CNI chain ([`cni`]), pod sandbox namespaces ([`sandbox`]), volumes
//! ([`volumes`]), pod records on disk ([`state`]), probe and hook handlers ([`prober`]),
//! container log files ([`logs`]) and pod-level cgroups ([`pod_cgroup`]); [`effects`]
//! implements the pod worker's effect traits on them.

pub mod cni;
pub mod container_gc;
pub mod effects;
pub mod image_gc;
pub mod logs;
pub mod pod_cgroup;
pub mod prober;
pub mod runtime;
pub mod sandbox;
pub mod state;
pub mod volumes;
