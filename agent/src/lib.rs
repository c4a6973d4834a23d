//! hako node agent library: the kubelet-like agent, grouped by what a reader looks for (the
//! code map is in `agent/README.md`):
//!
//! - [`model`]: pure Kubernetes logic — planning, back-off, status, QoS, env, DNS, probes.
//! - [`source`]: where pods come from — the manifest directory or the apiserver.
//! - [`worker`]: the pod workers and the pod manager, driving the model through effects.
//! - [`sys`]: the effects — shim client, CNI exec, sandbox namespaces, volumes, state files.
//! - [`eviction`]: the eviction manager — pressure signals, conditions, evictions.
//! - [`node`]: cluster mode — Node registration and status, the Lease, the overlay.
//! - [`api`]: the kubelet API (10250), its streams, stats and the healthz/metrics server.
//! - [`proxy`]: Services, standalone or from the apiserver, through `hako-proxier`.
//! - [`cli`]: the command line's subcommands and text output.
//! - [`standalone`]: standalone mode's loop (cluster mode's is [`node::run`]).

pub mod api;
pub mod cli;
pub mod eviction;
pub mod model;
pub mod node;
pub mod proxy;
pub mod source;
pub mod standalone;
pub mod sys;
pub mod worker;
