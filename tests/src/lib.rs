//! Harness for hako's root integration tests: uniquely named network namespaces that are
//! removed on drop, closures run inside a namespace on a dedicated OS thread, multi-node
//! underlay topologies on documentation addresses, a local OCI registry and the VM lane.
//!
//! Effectful by design: everything here creates real kernel objects, and only inside
//! namespaces it made itself.

pub mod agent;
pub mod apiserver;
pub mod cluster;
pub mod holdings;
pub mod images;
pub mod netns;
pub mod registry;
pub mod service_net;
pub mod topology;
pub mod vm;

pub use netns::{require_root, NetNs};
pub use topology::{Node, Topology};

/// Polls `f` every `period` until it returns Some, or panics after `timeout` with `what` and
/// the text `context` gives (an agent's log, typically).
pub fn poll_until<T>(
    what: &str,
    timeout: std::time::Duration,
    period: std::time::Duration,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let end = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}; {}",
            context()
        );
        std::thread::sleep(period);
    }
}
