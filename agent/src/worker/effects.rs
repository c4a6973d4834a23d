//! The effect traits the pod worker will drive once the shim, the CNI plugin and the proxier
//! are integrated: each has a real implementation in the agent's `sys` layer (to come) and a
//! fake for tests. Only the contracts live here (pure).

use crate::model::observed::{ObservedContainer, ObservedSandbox};
use crate::model::probe::Prober;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::chrono::{DateTime, Duration, Utc};

/// Everything needed to create one container (built purely from the pod, env and volumes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Container name.
    pub name: String,
    /// Image reference and pull policy.
    pub image: String,
    /// Always, IfNotPresent or Never.
    pub pull_policy: String,
    /// Resolved command (image ENTRYPOINT/CMD rules applied by the shim).
    pub command: Vec<String>,
    /// Resolved args.
    pub args: Vec<String>,
    /// Resolved environment, in order.
    pub env: Vec<(String, String)>,
    /// oom_score_adj to apply (the shim clamps to its parent's value when it may not lower it).
    pub oom_score_adj: i64,
    /// Attempt number (restart count).
    pub attempt: u32,
    /// Hash of the container spec (for change detection on re-adoption).
    pub spec_hash: String,
    /// Log path `/var/log/pods/<ns>_<pod>_<uid>/<container>/<attempt>.log`.
    pub log_path: String,
}

/// Container runtime (hako-shim): sandboxes, containers, images, exec.
pub trait Runtime {
    /// Error type naming the object.
    type Error: std::error::Error;
    /// Pulls an image per the pull policy; errors map to ErrImagePull.
    fn ensure_image(&self, image: &str, pull_policy: &str) -> Result<String, Self::Error>;
    /// Creates the pod sandbox (netns, hostname, hosts/resolv.conf files).
    fn create_sandbox(
        &self,
        pod: &Pod,
        attempt: u32,
        hosts: &str,
        resolv_conf: &str,
    ) -> Result<ObservedSandbox, Self::Error>;
    /// Stops and removes the sandbox.
    fn remove_sandbox(&self, sandbox_id: &str) -> Result<(), Self::Error>;
    /// Creates and starts a container in the sandbox.
    fn start_container(
        &self,
        sandbox_id: &str,
        cfg: &ContainerConfig,
    ) -> Result<String, Self::Error>;
    /// preStop already ran: SIGTERM, then SIGKILL after `grace`.
    fn stop_container(&self, container_id: &str, grace: Duration) -> Result<(), Self::Error>;
    /// Every container instance of the pod the runtime knows (re-adoption after agent restart).
    fn list_containers(&self, pod_uid: &str) -> Result<Vec<ObservedContainer>, Self::Error>;
    /// Runs a command in a container with a timeout (exec probes and hooks): exit code, output.
    fn exec(
        &self,
        container_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), Self::Error>;
}

/// Pod network through a CNI conflist (`/etc/cni/net.d`), run the way containerd runs it.
pub trait PodNetwork {
    /// Error type (carries the CNI error code and message).
    type Error: std::error::Error;
    /// CNI ADD; returns the pod IPs.
    fn add(&self, pod: &Pod, sandbox_id: &str, netns: &str) -> Result<Vec<String>, Self::Error>;
    /// CNI CHECK.
    fn check(&self, pod: &Pod, sandbox_id: &str, netns: &str) -> Result<(), Self::Error>;
    /// CNI DEL (succeeds when already gone).
    fn del(&self, pod: &Pod, sandbox_id: &str, netns: &str) -> Result<(), Self::Error>;
}

/// A ready or not-ready endpoint of a standalone Service (from local pods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Pod namespace/name.
    pub pod: (String, String),
    /// Pod IP.
    pub ip: String,
    /// Pod Ready condition.
    pub ready: bool,
}

/// The proxier fed by the standalone agent (Services from the manifest dir, endpoints from pods).
pub trait ServiceProxy {
    /// Error type.
    type Error: std::error::Error;
    /// Replaces the desired state; the proxier computes and applies the difference.
    fn sync(
        &self,
        services: &[Service],
        endpoints: &[(String, String, Vec<LocalEndpoint>)],
    ) -> Result<(), Self::Error>;
}

/// Time source (real clock, or a manual one in tests).
pub trait Clock {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// Everything a pod worker needs, bundled so implementations are passed in explicitly.
pub struct Effects<'a, R: Runtime, N: PodNetwork, P: Prober, C: Clock> {
    /// Runtime.
    pub runtime: &'a R,
    /// Network.
    pub network: &'a N,
    /// Probe executor.
    pub prober: &'a P,
    /// Clock.
    pub clock: &'a C,
}
