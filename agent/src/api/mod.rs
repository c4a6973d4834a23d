//! The agent's servers: the kubelet API on :10250 ([`kubelet_api`], authenticated and
//! authorized by [`auth`], queries read by [`query`], streaming through [`stream`] and [`spdy`], usage from [`stats`]) and
//! the local healthz/metrics server ([`healthz`], the kubelet's :10248).

pub mod auth;
pub mod healthz;
pub mod kubelet_api;
pub mod query;
pub mod spdy;
pub mod stats;
pub mod stream;
