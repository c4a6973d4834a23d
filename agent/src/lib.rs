//! hako node agent library: the pure core of the kubelet-like agent (pod model, planning,
//! status, probes, env, DNS) and the thin effect layers (`source`, `sys`) around it.

pub mod actions;
pub mod backoff;
pub mod cluster;
pub mod cni;
pub mod dirwatch;
pub mod dns;
pub mod env;
pub mod integration;
pub mod logs;
pub mod manifest;
pub mod observed;
pub mod probe;
pub mod prober;
pub mod qos;
pub mod quantity;
pub mod record;
pub mod render;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod services;
pub mod source;
pub mod standalone;
pub mod state;
pub mod status;
pub mod volumes;
pub mod worker;
